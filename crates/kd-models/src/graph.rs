//! A model's eval-mode computation as a plain graph of standard operators on NCHW tensors
//! (convolution, ReLU, pools, concatenation, flatten, fully connected), with its weights:
//! what an exporter (ONNX) writes. Dropout is gone and BatchNorm is folded into the
//! convolutions, as in a loaded model's inference path.

use crate::pool::{Pool2d, PoolKind};
use candle_core::{Result, Tensor};

/// One operator; every value is NCHW (or `[N, features]` after a flatten).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// 2-D convolution with a bias: inputs `x, weight [c_out, c_in, k, k], bias [c_out]`.
    Conv {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    Relu,
    /// Max or average pool (PyTorch's rules: ceil mode, padding counted in the average).
    Pool(Pool2d),
    /// Concatenation on the channel axis.
    Concat,
    /// The mean over each channel's plane: `[N, C, H, W]` → `[N, C, 1, 1]`.
    GlobalAveragePool,
    /// `[N, C, H, W]` → `[N, C·H·W]` in (channel, y, x) order.
    Flatten,
    /// Fully connected: inputs `x [N, in], weight [out, in], bias [out]`; `x · weightᵀ + bias`.
    Linear,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<String>,
    pub output: String,
}

/// The graph of one model: input `input`, then `nodes` in order, the heads' values as outputs.
#[derive(Debug, Clone)]
pub struct InferenceGraph {
    pub input: String,
    pub nodes: Vec<Node>,
    /// `(head name, value)`, `main` first.
    pub outputs: Vec<(String, String)>,
    /// Constant tensors by name (weights and biases, f32).
    pub weights: Vec<(String, Tensor)>,
}

/// Builds an [`InferenceGraph`] op by op, naming values `v0, v1, ...` and weights by the
/// checkpoint's names.
#[derive(Debug)]
pub struct GraphBuilder {
    graph: InferenceGraph,
    next: usize,
}

impl GraphBuilder {
    pub fn new(input: &str) -> Self {
        Self {
            graph: InferenceGraph {
                input: input.to_string(),
                nodes: vec![],
                outputs: vec![],
                weights: vec![],
            },
            next: 0,
        }
    }

    fn node(&mut self, op: Op, inputs: Vec<String>) -> String {
        let output = format!("v{}", self.next);
        self.next += 1;
        self.graph.nodes.push(Node {
            op,
            inputs,
            output: output.clone(),
        });
        output
    }

    /// A weight tensor under `name` (made unique if the name is taken).
    pub fn weight(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let taken = |n: &str| self.graph.weights.iter().any(|(w, _)| w == n);
        let mut unique = name.to_string();
        let mut i = 1;
        while taken(&unique) {
            unique = format!("{name}.{i}");
            i += 1;
        }
        self.graph
            .weights
            .push((unique.clone(), t.to_dtype(candle_core::DType::F32)?));
        Ok(unique)
    }

    pub fn conv(
        &mut self,
        x: &str,
        weight: &str,
        bias: &str,
        geometry: (usize, usize, usize),
    ) -> String {
        let (kernel, stride, padding) = geometry;
        let op = Op::Conv {
            kernel,
            stride,
            padding,
        };
        self.node(op, vec![x.into(), weight.into(), bias.into()])
    }

    pub fn relu(&mut self, x: &str) -> String {
        self.node(Op::Relu, vec![x.into()])
    }

    pub fn pool(&mut self, x: &str, pool: Pool2d) -> String {
        self.node(Op::Pool(pool), vec![x.into()])
    }

    pub fn concat(&mut self, xs: &[String]) -> String {
        self.node(Op::Concat, xs.to_vec())
    }

    pub fn global_average_pool(&mut self, x: &str) -> String {
        self.node(Op::GlobalAveragePool, vec![x.into()])
    }

    pub fn flatten(&mut self, x: &str) -> String {
        self.node(Op::Flatten, vec![x.into()])
    }

    pub fn linear(&mut self, x: &str, weight: &str, bias: &str) -> String {
        self.node(Op::Linear, vec![x.into(), weight.into(), bias.into()])
    }

    pub fn finish(mut self, outputs: Vec<(String, String)>) -> InferenceGraph {
        self.graph.outputs = outputs;
        self.graph
    }
}

impl Pool2d {
    pub fn is_max(&self) -> bool {
        self.kind == PoolKind::Max
    }
}
