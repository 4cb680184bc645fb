//! Building blocks: convolutions and linear layers with an explicit initialisation scheme.

use crate::conv::Conv;
pub use crate::init::{inits, InitScheme};
use crate::norm::BatchNormRelu;
use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

/// A fully connected layer (candle's `Linear`) that counts its multiply-adds.
#[derive(Debug, Clone)]
pub struct Dense {
    inner: Linear,
    macs_per_row: usize,
}

impl Dense {
    /// This layer in an inference graph, weights named `<name>.weight` and `<name>.bias`.
    pub fn export(
        &self,
        g: &mut crate::graph::GraphBuilder,
        x: &str,
        name: &str,
    ) -> Result<String> {
        let w = g.weight(&format!("{name}.weight"), self.inner.weight())?;
        let bias = self
            .inner
            .bias()
            .ok_or_else(|| candle_core::Error::Msg(format!("{name} has no bias")))?;
        let b = g.weight(&format!("{name}.bias"), bias)?;
        Ok(g.linear(x, &w, &b))
    }
}

impl Module for Dense {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::macs::add(self.macs_per_row * xs.dim(0)?);
        self.inner.forward(xs)
    }
}

pub fn linear(cin: usize, cout: usize, scheme: InitScheme, vb: VarBuilder) -> Result<Dense> {
    let (wi, bi) = inits(scheme, cin, false);
    let w = vb.get_with_hints((cout, cin), "weight", wi)?;
    let b = vb.get_with_hints(cout, "bias", bi)?;
    Ok(Dense {
        inner: Linear::new(w, Some(b)),
        macs_per_row: cin * cout,
    })
}

/// Conv2d followed by ReLU, on `[c, batch, h, w]`: the seed's `BasicConv2d` (no BatchNorm),
/// or with `batch_norm` torchvision's (conv without bias → BatchNorm → ReLU).
#[derive(Debug, Clone)]
pub struct BasicConv {
    conv: Conv,
    norm: Option<BatchNormRelu>,
    /// A frozen model's BatchNorm folded into the convolution (`W·γ/σ`, bias `β − μ·γ/σ`), so
    /// inference costs what the plain block costs.
    folded: Option<Conv>,
}

impl BasicConv {
    pub fn new(
        cin: usize,
        cout: usize,
        (kernel, stride, padding): (usize, usize, usize),
        batch_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        type Make = fn(usize, usize, usize, usize, usize, InitScheme, VarBuilder) -> Result<Conv>;
        let make: Make = if batch_norm {
            Conv::without_bias
        } else {
            Conv::new
        };
        let conv = make(
            cin,
            cout,
            kernel,
            stride,
            padding,
            InitScheme::Seed,
            vb.pp("conv"),
        )?;
        let norm = batch_norm
            .then(|| BatchNormRelu::new(cout, vb.pp("bn")))
            .transpose()?;
        let folded = match &norm {
            Some(bn) if bn.is_frozen() => {
                let (scale, shift) = bn.scale_shift()?;
                Some(conv.folded(&scale, shift)?)
            }
            _ => None,
        };
        Ok(Self { conv, norm, folded })
    }

    /// The block in an inference graph: convolution (with its BatchNorm folded in) and ReLU.
    /// A BatchNorm block must come from a loaded model, whose BatchNorm is folded.
    pub fn export(
        &self,
        g: &mut crate::graph::GraphBuilder,
        x: &str,
        name: &str,
    ) -> Result<String> {
        match (&self.folded, &self.norm) {
            (Some(folded), _) => folded.export_relu(g, x, &format!("{name}.conv")),
            (None, None) => self.conv.export_relu(g, x, &format!("{name}.conv")),
            (None, Some(_)) => candle_core::bail!(
                "{name}: BatchNorm is folded only in a loaded model; export a checkpoint"
            ),
        }
    }

    /// The convolution (with a bias) whose ReLU is this block in inference, when it is fixed: a
    /// loaded model's, with its BatchNorm folded in. `None` while the block is being trained.
    pub fn frozen_conv(&self) -> Option<&Conv> {
        match (&self.folded, &self.norm) {
            (Some(folded), _) => Some(folded),
            (None, None) => Some(&self.conv).filter(|c| c.is_frozen()),
            (None, Some(_)) => None,
        }
    }

    /// Blocks that read the same input, in training, as one: their convolutions stacked
    /// ([`Conv::stacked`]), one product, and one BatchNorm + ReLU op over all their channels
    /// ([`BatchNormRelu::forward_stacked`]; per channel, so each block's values), or the stacked
    /// bias + ReLU. The output has their channels one after another. Every block must have a
    /// BatchNorm, or none.
    pub fn forward_stacked(blocks: &[&BasicConv], xs: &Tensor) -> Result<Tensor> {
        let convs: Vec<&Conv> = blocks.iter().map(|b| &b.conv).collect();
        let conv = Conv::stacked(&convs)?;
        let norms: Vec<&BatchNormRelu> = blocks.iter().filter_map(|b| b.norm.as_ref()).collect();
        match norms.len() {
            0 => conv.forward_relu(xs),
            n if n == blocks.len() => BatchNormRelu::forward_stacked(&norms, &conv.matmul(xs)?),
            _ => candle_core::bail!("stacking blocks with and without BatchNorm"),
        }
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.conv.out_channels()
    }

    /// Dropout-free, but BatchNorm uses batch statistics only when `train` is true.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if let (Some(folded), false) = (&self.folded, train) {
            return folded.forward_relu(xs);
        }
        match &self.norm {
            None => self.conv.forward_relu(xs),
            Some(bn) => bn.forward_t(&self.conv.matmul(xs)?, train),
        }
    }
}
