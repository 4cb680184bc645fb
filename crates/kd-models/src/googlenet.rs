//! GoogLeNet (Szegedy et al., 2015, "Going deeper with convolutions") with its two auxiliary
//! classifiers, as the seed article builds it (conv + ReLU blocks, no BatchNorm).
//!
//! Configurations: `googlenet`, the seed's network with channels / 4 and a small-input stem
//! for 28×28 images; `googlenet-bn`, the same with torchvision's BatchNorm blocks (conv without
//! bias → BatchNorm → ReLU), which trains to a clearly better teacher; and `googlenet-224`, the
//! seed's network unchanged for 224×224 photos.
//! Tensor names follow the PyTorch state dict (`inception3a.branch2.1.conv.weight`, ...).

use crate::conv::{swap_batch_and_channels, Conv};
use crate::graph::{GraphBuilder, InferenceGraph};
use crate::init::{Dropout, DropoutRng};
use crate::layers::{linear, BasicConv, Dense, InitScheme};
use crate::pool::Pool2d;
use crate::{Classifier, InputSpec};
use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Channels of one inception block: `(c1, c3_reduce, c3, c5_reduce, c5, pool_proj)`.
type InceptionChannels = (usize, usize, usize, usize, usize, usize);

/// The shape of a GoogLeNet.
#[derive(Debug, Clone)]
pub struct GoogLeNetConfig {
    /// The 224-px ImageNet stem (7×7/s2 conv, pool, 1×1, 3×3, pool) or the small-input stem
    /// (3×3, 1×1, 3×3, pool).
    pub imagenet_stem: bool,
    pub stem: (usize, usize, usize),
    /// Blocks 3a, 3b, 4a..4e, 5a, 5b.
    pub blocks: [InceptionChannels; 9],
    /// Auxiliary heads: average pool (kernel, stride), 1×1 conv channels, hidden width.
    pub aux_pool: (usize, usize),
    pub aux_conv: usize,
    pub aux_hidden: usize,
    /// Spatial size after the aux pool (its flattened length is `aux_conv * aux_spatial²`).
    pub aux_spatial: usize,
    /// BatchNorm after every convolution (torchvision's `BasicConv2d`).
    pub batch_norm: bool,
}

impl GoogLeNetConfig {
    /// `googlenet`: the seed's network with channels / 4, for 28×28 inputs (MODELS.md).
    pub fn small() -> Self {
        Self {
            imagenet_stem: false,
            stem: (16, 16, 48),
            blocks: [
                (16, 24, 32, 4, 8, 8),
                (32, 32, 48, 8, 24, 16),
                (48, 24, 52, 4, 12, 16),
                (40, 28, 56, 6, 16, 16),
                (32, 32, 64, 6, 16, 16),
                (28, 36, 72, 8, 16, 16),
                (64, 40, 80, 8, 32, 32),
                (64, 40, 80, 8, 32, 32),
                (96, 48, 96, 12, 32, 32),
            ],
            aux_pool: (3, 2),
            aux_conv: 32,
            aux_hidden: 256,
            aux_spatial: 3,
            batch_norm: false,
        }
    }

    /// `googlenet-bn`: [`Self::small`] with BatchNorm after every convolution.
    pub fn small_bn() -> Self {
        Self {
            batch_norm: true,
            ..Self::small()
        }
    }

    /// `googlenet-224`: the seed's `GoogLeNet(aux_logits=True)` at 224×224.
    pub fn imagenet() -> Self {
        Self {
            imagenet_stem: true,
            stem: (64, 64, 192),
            blocks: [
                (64, 96, 128, 16, 32, 32),
                (128, 128, 192, 32, 96, 64),
                (192, 96, 208, 16, 48, 64),
                (160, 112, 224, 24, 64, 64),
                (128, 128, 256, 24, 64, 64),
                (112, 144, 288, 32, 64, 64),
                (256, 160, 320, 32, 128, 128),
                (256, 160, 320, 32, 128, 128),
                (384, 192, 384, 48, 128, 128),
            ],
            aux_pool: (5, 3),
            aux_conv: 128,
            aux_hidden: 1024,
            aux_spatial: 4,
            batch_norm: false,
        }
    }
}

fn out_channels(c: &InceptionChannels) -> usize {
    c.0 + c.2 + c.4 + c.5
}

/// Four parallel branches concatenated on channels: 1×1 | 1×1→3×3 | 1×1→5×5 | pool→1×1.
#[derive(Debug, Clone)]
struct Inception {
    branch1: BasicConv,
    branch2: [BasicConv; 2],
    branch3: [BasicConv; 2],
    branch4: BasicConv,
    /// A loaded model's three 1×1 convolutions that read the block's input (branch 1 and the
    /// reductions of branches 2 and 3) as one ([`Conv::stacked`]), for inference.
    pointwise: Option<Conv>,
}

impl Inception {
    fn new(cin: usize, c: InceptionChannels, bn: bool, vb: VarBuilder) -> Result<Self> {
        let (c1, c3r, c3, c5r, c5, pp) = c;
        let mut block = Self {
            branch1: BasicConv::new(cin, c1, (1, 1, 0), bn, vb.pp("branch1"))?,
            branch2: [
                BasicConv::new(cin, c3r, (1, 1, 0), bn, vb.pp("branch2.0"))?,
                BasicConv::new(c3r, c3, (3, 1, 1), bn, vb.pp("branch2.1"))?,
            ],
            branch3: [
                BasicConv::new(cin, c5r, (1, 1, 0), bn, vb.pp("branch3.0"))?,
                BasicConv::new(c5r, c5, (5, 1, 2), bn, vb.pp("branch3.1"))?,
            ],
            branch4: BasicConv::new(cin, pp, (1, 1, 0), bn, vb.pp("branch4.1"))?,
            pointwise: None,
        };
        let firsts = [&block.branch1, &block.branch2[0], &block.branch3[0]];
        let frozen: Option<Vec<&Conv>> = firsts.iter().map(|b| b.frozen_conv()).collect();
        block.pointwise = frozen.map(|convs| Conv::stacked(&convs)).transpose()?;
        Ok(block)
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let chain = |convs: &[BasicConv], xs: &Tensor| -> Result<Tensor> {
            convs
                .iter()
                .try_fold(xs.clone(), |xs, conv| conv.forward_t(&xs, train))
        };
        let firsts = [&self.branch1, &self.branch2[0], &self.branch3[0]];
        let (b1, b2, b3) = match (&self.pointwise, train) {
            (Some(stacked), false) => self.branches(&stacked.forward_relu(xs)?, train)?,
            (_, true) => self.branches(&BasicConv::forward_stacked(&firsts, xs)?, train)?,
            (None, false) => (
                chain(std::slice::from_ref(&self.branch1), xs)?,
                chain(&self.branch2, xs)?,
                chain(&self.branch3, xs)?,
            ),
        };
        let pooled = Pool2d::max(3, 1).padding(1).forward(xs)?;
        let b4 = chain(std::slice::from_ref(&self.branch4), &pooled)?;
        Tensor::cat(&[b1, b2, b3, b4], 0)
    }

    /// Branches 1 to 3 from the output of their three first convolutions stacked (branch 1's
    /// channels, then the two reductions'): narrows of it (views, no copy), the reductions then
    /// through their 3×3 and 5×5 blocks.
    fn branches(&self, y: &Tensor, train: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let mut at = 0;
        let mut take = |c: usize| {
            at += c;
            y.narrow(0, at - c, c)
        };
        let b1 = take(self.branch1.out_channels())?;
        let r2 = take(self.branch2[0].out_channels())?;
        let r3 = take(self.branch3[0].out_channels())?;
        let b2 = self.branch2[1].forward_t(&r2, train)?;
        Ok((b1, b2, self.branch3[1].forward_t(&r3, train)?))
    }

    fn export(&self, g: &mut GraphBuilder, x: &str, name: &str) -> Result<String> {
        let b1 = self.branch1.export(g, x, &format!("{name}.branch1"))?;
        let b2 = self.branch2[0].export(g, x, &format!("{name}.branch2.0"))?;
        let b2 = self.branch2[1].export(g, &b2, &format!("{name}.branch2.1"))?;
        let b3 = self.branch3[0].export(g, x, &format!("{name}.branch3.0"))?;
        let b3 = self.branch3[1].export(g, &b3, &format!("{name}.branch3.1"))?;
        let pooled = g.pool(x, Pool2d::max(3, 1).padding(1));
        let b4 = self
            .branch4
            .export(g, &pooled, &format!("{name}.branch4.1"))?;
        Ok(g.concat(&[b1, b2, b3, b4]))
    }
}

/// Auxiliary classifier: avg-pool → 1×1 conv → flatten → dropout → fc+ReLU → dropout → fc.
#[derive(Debug, Clone)]
struct AuxHead {
    pool: Pool2d,
    conv: BasicConv,
    fc1: Dense,
    fc2: Dense,
    dropout: Dropout,
}

impl AuxHead {
    fn new(
        cin: usize,
        cfg: &GoogLeNetConfig,
        classes: usize,
        rng: &DropoutRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let flat = cfg.aux_conv * cfg.aux_spatial * cfg.aux_spatial;
        let bn = cfg.batch_norm;
        Ok(Self {
            pool: Pool2d::avg(cfg.aux_pool.0, cfg.aux_pool.1),
            conv: BasicConv::new(cin, cfg.aux_conv, (1, 1, 0), bn, vb.pp("conv"))?,
            fc1: linear(flat, cfg.aux_hidden, InitScheme::Seed, vb.pp("fc1"))?,
            fc2: linear(cfg.aux_hidden, classes, InitScheme::Seed, vb.pp("fc2"))?,
            dropout: Dropout::new(0.5, rng),
        })
    }

    /// `[c, batch, h, w]` → logits `[batch, classes]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = self.conv.forward_t(&self.pool.forward(xs)?, train)?;
        // Flatten in PyTorch's (channel, y, x) order.
        let xs = swap_batch_and_channels(&xs)?.flatten_from(1)?;
        let xs = self
            .dropout
            .forward_t(&xs, train)?
            .apply(&self.fc1)?
            .relu()?;
        self.dropout.forward_t(&xs, train)?.apply(&self.fc2)
    }

    fn export(&self, g: &mut GraphBuilder, x: &str, name: &str) -> Result<String> {
        let pooled = g.pool(x, self.pool);
        let z = self.conv.export(g, &pooled, &format!("{name}.conv"))?;
        let flat = g.flatten(&z);
        let hidden = self.fc1.export(g, &flat, &format!("{name}.fc1"))?;
        let hidden = g.relu(&hidden);
        self.fc2.export(g, &hidden, &format!("{name}.fc2"))
    }
}

/// GoogLeNet returning `[main, aux1, aux2]` logits, in training and in eval mode.
#[derive(Debug, Clone)]
pub struct GoogLeNet {
    stem: Vec<BasicConv>,
    imagenet_stem: bool,
    blocks: Vec<Inception>,
    aux1: AuxHead,
    aux2: AuxHead,
    dropout: Dropout,
    fc: Dense,
    device: Device,
}

const BLOCK_NAMES: [&str; 9] = [
    "inception3a",
    "inception3b",
    "inception4a",
    "inception4b",
    "inception4c",
    "inception4d",
    "inception4e",
    "inception5a",
    "inception5b",
];

impl GoogLeNet {
    pub fn new(
        cfg: &GoogLeNetConfig,
        spec: &InputSpec,
        rng: &DropoutRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (s1, s2, s3) = cfg.stem;
        let bn = cfg.batch_norm;
        let stem = if cfg.imagenet_stem {
            vec![
                BasicConv::new(spec.channels, s1, (7, 2, 3), bn, vb.pp("conv1"))?,
                BasicConv::new(s1, s2, (1, 1, 0), bn, vb.pp("conv2"))?,
                BasicConv::new(s2, s3, (3, 1, 1), bn, vb.pp("conv3"))?,
            ]
        } else {
            vec![
                BasicConv::new(spec.channels, s1, (3, 1, 1), bn, vb.pp("conv1"))?,
                BasicConv::new(s1, s2, (1, 1, 0), bn, vb.pp("conv2"))?,
                BasicConv::new(s2, s3, (3, 1, 1), bn, vb.pp("conv3"))?,
            ]
        };
        let mut blocks = Vec::with_capacity(9);
        let mut cin = s3;
        for (c, name) in cfg.blocks.iter().zip(BLOCK_NAMES) {
            blocks.push(Inception::new(cin, *c, bn, vb.pp(name))?);
            cin = out_channels(c);
        }
        let aux1_in = out_channels(&cfg.blocks[2]);
        let aux2_in = out_channels(&cfg.blocks[5]);
        Ok(Self {
            device: vb.device().clone(),
            stem,
            imagenet_stem: cfg.imagenet_stem,
            blocks,
            aux1: AuxHead::new(aux1_in, cfg, spec.classes, rng, vb.pp("aux1"))?,
            aux2: AuxHead::new(aux2_in, cfg, spec.classes, rng, vb.pp("aux2"))?,
            dropout: Dropout::new(0.4, rng),
            fc: linear(cin, spec.classes, InitScheme::Seed, vb.pp("fc"))?,
        })
    }
}

impl GoogLeNet {
    pub const HEADS: &'static [&'static str] = &["main", "aux1", "aux2"];
}

impl Classifier for GoogLeNet {
    fn heads(&self) -> &'static [&'static str] {
        Self::HEADS
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn trains_in_halves(&self) -> bool {
        true
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let pool = Pool2d::max(3, 2).ceil();
        // Channels-first inside the network: see `conv`.
        let mut xs = self.stem[0].forward_t(&swap_batch_and_channels(xs)?, train)?;
        if self.imagenet_stem {
            xs = pool.forward(&xs)?;
        }
        xs = self.stem[1].forward_t(&xs, train)?;
        xs = pool.forward(&self.stem[2].forward_t(&xs, train)?)?;
        let mut aux = Vec::with_capacity(2);
        for (i, block) in self.blocks.iter().enumerate() {
            xs = block.forward_t(&xs, train)?;
            match i {
                1 | 6 => xs = pool.forward(&xs)?,
                2 => aux.push(self.aux1.forward_t(&xs, train)?),
                5 => aux.push(self.aux2.forward_t(&xs, train)?),
                _ => {}
            }
        }
        let xs = xs.mean(3)?.mean(2)?.t()?;
        let main = self.dropout.forward_t(&xs, train)?.apply(&self.fc)?;
        Ok([vec![main], aux].concat())
    }

    fn inference_graph(&self, input: &str) -> Result<InferenceGraph> {
        let mut g = GraphBuilder::new(input);
        let pool = Pool2d::max(3, 2).ceil();
        let mut x = self.stem[0].export(&mut g, input, "conv1")?;
        if self.imagenet_stem {
            x = g.pool(&x, pool);
        }
        x = self.stem[1].export(&mut g, &x, "conv2")?;
        x = self.stem[2].export(&mut g, &x, "conv3")?;
        x = g.pool(&x, pool);
        let mut outputs = Vec::with_capacity(3);
        for (i, (block, name)) in self.blocks.iter().zip(BLOCK_NAMES).enumerate() {
            x = block.export(&mut g, &x, name)?;
            match i {
                1 | 6 => x = g.pool(&x, pool),
                2 => outputs.push(("aux1".to_string(), self.aux1.export(&mut g, &x, "aux1")?)),
                5 => outputs.push(("aux2".to_string(), self.aux2.export(&mut g, &x, "aux2")?)),
                _ => {}
            }
        }
        let pooled = g.global_average_pool(&x);
        let flat = g.flatten(&pooled);
        let main = self.fc.export(&mut g, &flat, "fc")?;
        outputs.insert(0, ("main".to_string(), main));
        Ok(g.finish(outputs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::rand;
    use crate::tests::FASHION;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// A GoogLeNet from `tensors` (plain tensors: a loaded model).
    fn loaded(cfg: &GoogLeNetConfig, tensors: &VarMap) -> GoogLeNet {
        let tensors = tensors
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        GoogLeNet::new(cfg, &FASHION, &DropoutRng::new(0), vb).unwrap()
    }

    #[test]
    fn stacked_pointwise_convolutions_keep_the_bits() {
        for cfg in [GoogLeNetConfig::small(), GoogLeNetConfig::small_bn()] {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            let live = GoogLeNet::new(&cfg, &FASHION, &DropoutRng::new(0), vb).unwrap();
            // A model being trained stacks nothing: its weights change after every step.
            assert!(live.blocks.iter().all(|b| b.pointwise.is_none()));
            let net = loaded(&cfg, &vars);
            assert!(net.blocks.iter().all(|b| b.pointwise.is_some()));
            let mut unstacked = net.clone();
            for block in &mut unstacked.blocks {
                block.pointwise = None;
            }
            let xs = Tensor::from_vec(rand(&[5, 1, 28, 28], 7), (5, 1, 28, 28), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let a = net.forward_t(&xs, false).unwrap();
            let b = unstacked.forward_t(&xs, false).unwrap();
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(v(a), v(b), "batch_norm: {}", cfg.batch_norm);
            }
        }
    }
}

#[cfg(test)]
mod stacked_training {
    use super::*;
    use crate::conv::tests::{max_rel_diff, rand};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use std::collections::HashMap;

    fn tensor(shape: &[usize], seed: u64) -> Tensor {
        let t = Tensor::from_vec(rand(shape, seed), shape, &Device::Cpu).unwrap();
        t.to_dtype(DType::F32).unwrap()
    }

    fn snapshot(vars: &VarMap) -> HashMap<String, Tensor> {
        let data = vars.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect()
    }

    fn restore(vars: &VarMap, to: &HashMap<String, Tensor>) {
        for (k, v) in vars.data().lock().unwrap().iter() {
            v.set(&to[k]).unwrap();
        }
    }

    /// The block's output, every variable's gradient (and the input's) for a fixed random
    /// weighting of the output, and the variables after the step (BatchNorm's running
    /// statistics move in training).
    fn step(
        vars: &VarMap,
        xs: &Var,
        forward: impl Fn(&Tensor) -> Tensor,
    ) -> (Vec<f32>, HashMap<String, Tensor>, HashMap<String, Tensor>) {
        let y = forward(xs.as_tensor());
        let weighting = tensor(y.dims(), 11);
        let grads = (&y * &weighting)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let data = vars.data().lock().unwrap();
        let mut g: HashMap<String, Tensor> = data
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), grads.get(v.as_tensor())?.clone())))
            .collect();
        drop(data);
        g.insert("input".into(), grads.get(xs.as_tensor()).unwrap().clone());
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (v, g, snapshot(vars))
    }

    #[test]
    fn stacked_first_convolutions_train_as_the_branches() {
        for bn in [false, true] {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            let block = Inception::new(12, (8, 6, 8, 4, 4, 4), bn, vb).unwrap();
            let xs = Var::from_tensor(&tensor(&[12, 3, 6, 5], 3)).unwrap();
            let before = snapshot(&vars);
            let stacked = step(&vars, &xs, |xs| block.forward_t(xs, true).unwrap());
            restore(&vars, &before);
            let unstacked = step(&vars, &xs, |xs| {
                let b1 = block.branch1.forward_t(xs, true).unwrap();
                let b2 = block.branch2[0].forward_t(xs, true).unwrap();
                let b2 = block.branch2[1].forward_t(&b2, true).unwrap();
                let b3 = block.branch3[0].forward_t(xs, true).unwrap();
                let b3 = block.branch3[1].forward_t(&b3, true).unwrap();
                let pooled = Pool2d::max(3, 1).padding(1).forward(xs).unwrap();
                let b4 = block.branch4.forward_t(&pooled, true).unwrap();
                Tensor::cat(&[b1, b2, b3, b4], 0).unwrap()
            });
            // The same output and running statistics, to the bit (each channel's own sums) ...
            assert_eq!(stacked.0, unstacked.0, "batch_norm: {bn}");
            for (name, t) in &stacked.2 {
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(v(t), v(&unstacked.2[name]), "{name}");
            }
            // ... and every gradient up to rounding: the input's sums the three convolutions'
            // contributions in one product instead of three products and two additions.
            assert_eq!(stacked.1.len(), unstacked.1.len());
            assert!(stacked.1.len() > 12, "{} gradients", stacked.1.len());
            for (name, g) in &stacked.1 {
                let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let d = max_rel_diff(&f64(g), &f64(&unstacked.1[name]));
                assert!(d < 1e-5, "{name}: {d}");
            }
        }
    }
}
