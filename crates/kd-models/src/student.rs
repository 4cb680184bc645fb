//! The seed article's student: two conv + ReLU + max-pool stages and one linear classifier.
//!
//! `student-cnn` is its 28×28 adaptation (MODELS.md, 20,490 parameters for 10 classes);
//! `student-seed` is the seed's `Studentmodel` at 224×224 (41,029 parameters for 5 classes).

use crate::conv::{swap_batch_and_channels, Conv};
use crate::init::{Dropout, DropoutRng};
use crate::layers::{linear, Dense, InitScheme};
use crate::pool::Pool2d;
use crate::{Classifier, InputSpec};
use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;

/// One conv stage: `(out_channels, kernel, stride, padding)`, then ReLU and `pool`.
#[derive(Debug, Clone)]
pub struct StudentConfig {
    pub convs: [(usize, usize, usize, usize); 2],
    pub pool: Pool2d,
}

impl StudentConfig {
    pub fn small() -> Self {
        Self {
            convs: [(16, 3, 1, 1), (32, 3, 1, 1)],
            pool: Pool2d::max(2, 2),
        }
    }

    pub fn seed() -> Self {
        Self {
            convs: [(32, 7, 2, 3), (32, 3, 2, 1)],
            pool: Pool2d::max(3, 2),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StudentCnn {
    convs: Vec<Conv>,
    pool: Pool2d,
    dropout: Dropout,
    fc: Dense,
    device: Device,
}

fn conv_out(len: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if len + 2 * p < k {
        candle_core::bail!("a {k}x{k} convolution does not fit an input of {len} pixels");
    }
    Ok((len + 2 * p - k) / s + 1)
}

impl StudentCnn {
    pub fn new(
        cfg: &StudentConfig,
        spec: &InputSpec,
        rng: &DropoutRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (mut cin, mut h, mut w) = (spec.channels, spec.height, spec.width);
        let mut convs = Vec::new();
        for (i, &(cout, k, s, p)) in cfg.convs.iter().enumerate() {
            convs.push(Conv::new(
                cin,
                cout,
                k,
                s,
                p,
                InitScheme::Torch,
                vb.pp(format!("conv{}", i + 1)),
            )?);
            h = cfg.pool.out_len(conv_out(h, k, s, p)?)?;
            w = cfg.pool.out_len(conv_out(w, k, s, p)?)?;
            cin = cout;
        }
        Ok(Self {
            device: vb.device().clone(),
            convs,
            pool: cfg.pool,
            dropout: Dropout::new(0.4, rng),
            fc: linear(cin * h * w, spec.classes, InitScheme::Torch, vb.pp("fc"))?,
        })
    }
}

impl StudentCnn {
    pub const HEADS: &'static [&'static str] = &["main"];
}

impl Classifier for StudentCnn {
    fn heads(&self) -> &'static [&'static str] {
        Self::HEADS
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        // Channels-first inside the network (see `conv`), PyTorch's flatten order at the end.
        let mut xs = swap_batch_and_channels(xs)?;
        for conv in &self.convs {
            xs = self.pool.forward(&conv.forward_relu(&xs)?)?;
        }
        let xs = swap_batch_and_channels(&xs)?.flatten_from(1)?;
        let xs = self.dropout.forward_t(&xs, train)?;
        Ok(vec![xs.apply(&self.fc)?])
    }

    fn inference_graph(&self, input: &str) -> Result<crate::graph::InferenceGraph> {
        let mut g = crate::graph::GraphBuilder::new(input);
        let mut x = input.to_string();
        for (i, conv) in self.convs.iter().enumerate() {
            let z = conv.export_relu(&mut g, &x, &format!("conv{}", i + 1))?;
            x = g.pool(&z, self.pool);
        }
        let flat = g.flatten(&x);
        let main = self.fc.export(&mut g, &flat, "fc")?;
        Ok(g.finish(vec![("main".into(), main)]))
    }
}
