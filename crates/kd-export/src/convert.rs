//! An inference graph (`kd_models::graph`) as an ONNX model, in ONNX's own schema.
//!
//! Opset 17 (ONNX 1.12+; ONNX Runtime 1.12+ reads it), IR version 8. The input is `pixels`,
//! float32 `[batch, C, H, W]` with values 0–255 (the batch dimension is dynamic); the
//! normalisation `(pixels / 255 − mean) / std` is the graph's first two nodes, so a caller passes
//! raw pixels. One output per head (`main`, `aux1`, `aux2`), `[batch, classes]` logits.

use crate::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use kd_data::Normalization;
use kd_models::graph::{InferenceGraph, Node, Op};
use kd_models::pool::PoolKind;

pub const OPSET: i64 = 17;
pub const IR_VERSION: i64 = 8;
pub const INPUT: &str = "pixels";

/// What the model's metadata properties say, beside its graph.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `[C, H, W]` of one image.
    pub input: [usize; 3],
    pub classes: usize,
    pub normalization: Normalization,
    /// `key → value` metadata properties (class names, preprocessing, provenance).
    pub properties: Vec<(String, String)>,
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(i),
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints,
        ..Default::default()
    }
}

fn node(op_type: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op_type.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: Some(format!("{op_type}:{output}")),
        attribute,
        ..Default::default()
    }
}

/// A float32 initializer, little-endian raw data.
fn initializer(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(data.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// A float32 value with dimensions (`None`: the dynamic batch dimension).
fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                None => tensor_shape_proto::dimension::Value::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One of our operators as ONNX nodes.
fn convert(n: &Node) -> Vec<NodeProto> {
    let ins: Vec<&str> = n.inputs.iter().map(String::as_str).collect();
    let out = n.output.as_str();
    let one = |p: NodeProto| vec![p];
    match &n.op {
        Op::Conv {
            kernel,
            stride,
            padding,
        } => {
            let (k, s, p) = (*kernel as i64, *stride as i64, *padding as i64);
            one(node(
                "Conv",
                &ins,
                out,
                vec![
                    attr_ints("kernel_shape", vec![k, k]),
                    attr_ints("strides", vec![s, s]),
                    attr_ints("pads", vec![p, p, p, p]),
                ],
            ))
        }
        Op::Relu => one(node("Relu", &ins, out, vec![])),
        Op::Pool(pool) => {
            let (k, s, p) = (pool.kernel as i64, pool.stride as i64, pool.padding as i64);
            let mut attrs = vec![
                attr_ints("kernel_shape", vec![k, k]),
                attr_ints("strides", vec![s, s]),
                attr_ints("pads", vec![p, p, p, p]),
                attr_int("ceil_mode", pool.ceil_mode as i64),
            ];
            let op = match pool.kind {
                PoolKind::Max => "MaxPool",
                PoolKind::Avg => {
                    // PyTorch's default: the padding counts in the divisor.
                    attrs.push(attr_int("count_include_pad", 1));
                    "AveragePool"
                }
            };
            one(node(op, &ins, out, attrs))
        }
        Op::Concat => one(node("Concat", &ins, out, vec![attr_int("axis", 1)])),
        Op::GlobalAveragePool => one(node("GlobalAveragePool", &ins, out, vec![])),
        Op::Flatten => one(node("Flatten", &ins, out, vec![attr_int("axis", 1)])),
        Op::Linear => one(node("Gemm", &ins, out, vec![attr_int("transB", 1)])),
    }
}

/// `(pixels / 255 − mean) / std` as `pixels · scale − shift`, per channel (the same arithmetic
/// as `kd_data::ImageSet::to_tensor`, so the model sees the same f32 values).
fn normalisation(info: &ModelInfo, output: &str) -> (Vec<NodeProto>, Vec<TensorProto>) {
    let n = &info.normalization;
    let c = info.input[0];
    let scale: Vec<f32> = n.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
    let shift: Vec<f32> = n.mean.iter().zip(&n.std).map(|(m, s)| m / s).collect();
    let nodes = vec![
        node(
            "Mul",
            &[INPUT, "preprocess.scale"],
            "preprocess.scaled",
            vec![],
        ),
        node(
            "Sub",
            &["preprocess.scaled", "preprocess.shift"],
            output,
            vec![],
        ),
    ];
    let inits = vec![
        initializer("preprocess.scale", &[1, c, 1, 1], &scale),
        initializer("preprocess.shift", &[1, c, 1, 1], &shift),
    ];
    (nodes, inits)
}

/// The ONNX model of `graph` (whose input is the normalised image).
pub fn model(
    graph: &InferenceGraph,
    info: &ModelInfo,
    name: &str,
) -> candle_core::Result<ModelProto> {
    let (mut nodes, mut inits) = normalisation(info, &graph.input);
    nodes.extend(graph.nodes.iter().flat_map(convert));
    for (weight_name, t) in &graph.weights {
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        inits.push(initializer(weight_name, t.dims(), &data));
    }
    let [c, h, w] = info.input;
    let outputs = graph
        .outputs
        .iter()
        .map(|(head, value)| {
            nodes.push(node("Identity", &[value], head, vec![]));
            value_info(head, &[None, Some(info.classes)])
        })
        .collect();
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("kd-export".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(format!(
            "{name}: input `{INPUT}` float32 [batch, {c}, {h}, {w}], values 0-255; outputs: logits [batch, {}] per head",
            info.classes
        )),
        graph: Some(GraphProto {
            name: Some(name.into()),
            node: nodes,
            initializer: inits,
            input: vec![value_info(INPUT, &[None, Some(c), Some(h), Some(w)])],
            output: outputs,
            ..Default::default()
        }),
        metadata_props: info
            .properties
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: Some(k.clone()),
                value: Some(v.clone()),
            })
            .collect(),
        ..Default::default()
    })
}
