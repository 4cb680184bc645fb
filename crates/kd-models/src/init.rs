//! Seeded weights and dropout: candle's CPU RNG cannot be seeded, so all randomness of a model
//! comes from ChaCha streams derived from the run's seed.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Arc, Mutex};

/// A `VarMap` whose new variables are drawn from a ChaCha stream keyed by `(seed, name)`: a
/// variable's initial value depends on the seed and its name only, not on creation order.
#[derive(Clone)]
pub struct SeededVarMap {
    pub varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    pub fn new(seed: u64) -> Self {
        Self {
            varmap: VarMap::new(),
            seed,
        }
    }

    /// A `VarBuilder` that creates trainable variables in this map.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    fn init(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        let n = shape.elem_count();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(fnv1a(name.as_bytes()));
        let (dist, a, b) = match init {
            Init::Const(v) => return vec![v as f32; n],
            Init::Uniform { lo, up } => (NormalOrUniform::Uniform, lo, up),
            Init::Randn { mean, stdev } => (NormalOrUniform::Normal, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => (dist, -(3f64.sqrt()) * std, 3f64.sqrt() * std),
                    NormalOrUniform::Normal => (dist, 0.0, std),
                }
            }
        };
        (0..n)
            .map(|_| match dist {
                NormalOrUniform::Uniform => (a + (b - a) * unit(&mut rng)) as f32,
                NormalOrUniform::Normal => (a + b * normal(&mut rng)) as f32,
            })
            .collect()
    }
}

/// Uniform in [0, 1) from 53 random bits.
pub fn unit(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Standard normal by Box-Muller: our own draw, so values depend on the seed alone.
fn normal(rng: &mut impl RngCore) -> f64 {
    let u1 = 1.0 - unit(rng);
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// FNV-1a: a stable 64-bit hash of a name (std's hasher may change between releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned varmap".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.init(&s, name, h);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("variable {name} has no shape given")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// The dropout masks' random stream, shared by a model's dropout layers.
#[derive(Clone, Debug)]
pub struct DropoutRng(Arc<Mutex<ChaCha8Rng>>);

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(fnv1a(b"dropout"));
        Self(Arc::new(Mutex::new(rng)))
    }

    /// How far the stream has advanced (with the seed, all that a resumed run needs).
    pub fn word_pos(&self) -> u128 {
        self.0
            .lock()
            .map(|r| r.get_word_pos())
            .unwrap_or_else(|p| p.into_inner().get_word_pos())
    }

    pub fn set_word_pos(&self, pos: u128) {
        match self.0.lock() {
            Ok(mut r) => r.set_word_pos(pos),
            Err(p) => p.into_inner().set_word_pos(pos),
        }
    }

    /// Streams for the `parts` of one batch trained apart (`kd_train::halves`): each starts
    /// where this one stands, on a ChaCha stream of its own, so a part's masks do not depend on
    /// which part draws first. [`Self::advance_past`] moves this one on afterwards.
    pub fn split(&self, parts: usize) -> Vec<DropoutRng> {
        let rng = match self.0.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        };
        (0..parts as u64)
            .map(|i| {
                let mut part = rng.clone();
                part.set_stream(rng.get_stream().wrapping_add(1 + i));
                part.set_word_pos(rng.get_word_pos());
                DropoutRng(Arc::new(Mutex::new(part)))
            })
            .collect()
    }

    /// Moves this stream on by every word that `parts` (from [`Self::split`]) drew, so the next
    /// split starts past all of them.
    pub fn advance_past(&self, parts: &[DropoutRng]) {
        let start = self.word_pos();
        let drawn: u128 = parts.iter().map(|p| p.word_pos() - start).sum();
        self.set_word_pos(start + drawn);
    }

    /// Runs `f` with the dropout layers that it runs on this thread drawing from this stream
    /// instead of their own.
    pub fn draw_in<R>(&self, f: impl FnOnce() -> R) -> R {
        let previous = DRAWING_FROM.with(|s| s.replace(Some(self.clone())));
        let _restore = Restore(previous);
        f()
    }
}

thread_local! {
    /// The stream that [`DropoutRng::draw_in`] set for this thread.
    static DRAWING_FROM: std::cell::RefCell<Option<DropoutRng>> =
        const { std::cell::RefCell::new(None) };
}

/// Puts back the thread's previous stream, even if the closure unwinds.
struct Restore(Option<DropoutRng>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        DRAWING_FROM.with(|s| *s.borrow_mut() = previous);
    }
}

/// Inverted dropout with masks from a [`DropoutRng`]; the identity in eval mode.
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f64,
    rng: DropoutRng,
}

impl Dropout {
    pub fn new(p: f64, rng: &DropoutRng) -> Self {
        Self {
            p,
            rng: rng.clone(),
        }
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(xs.clone());
        }
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let n = xs.elem_count();
        let stream = DRAWING_FROM
            .with(|s| s.borrow().clone())
            .unwrap_or_else(|| self.rng.clone());
        let mask: Vec<f32> = {
            let mut rng = stream
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned rng".into()))?;
            (0..n)
                .map(|_| if unit(&mut *rng) < keep { scale } else { 0.0 })
                .collect()
        };
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dropout layer's mask on 64 ones, as the kept positions.
    fn mask(d: &Dropout) -> Vec<bool> {
        let x = Tensor::ones(64, DType::F32, &Device::Cpu).unwrap();
        let y = d.forward_t(&x, true).unwrap().to_vec1::<f32>().unwrap();
        y.iter().map(|v| *v > 0.0).collect()
    }

    /// The parts of a split draw their own masks (different from each other and from the
    /// stream's own), the same whichever draws first; `draw_in` gives the layer back its own
    /// stream afterwards; `advance_past` moves the stream on by what both parts drew.
    #[test]
    fn split_streams_draw_their_own_masks_in_any_order() {
        let rng = DropoutRng::new(9);
        let layer = Dropout::new(0.5, &rng);
        let parts = rng.split(2);
        let first = parts[0].draw_in(|| mask(&layer));
        let second = parts[1].draw_in(|| mask(&layer));
        assert_ne!(first, second);
        assert_eq!(rng.word_pos(), 0, "the layer drew from the parts' streams");
        let again = DropoutRng::new(9).split(2);
        assert_eq!(again[1].draw_in(|| mask(&layer)), second);
        assert_eq!(again[0].draw_in(|| mask(&layer)), first);
        let drawn = parts[0].word_pos() + parts[1].word_pos();
        rng.advance_past(&parts);
        assert_eq!(rng.word_pos(), drawn);
        let own = mask(&layer);
        assert_ne!(own, first);
        assert_eq!(
            rng.word_pos(),
            drawn * 3 / 2,
            "the layer drew from its own stream again"
        );
    }

    #[test]
    fn same_seed_same_weights_whatever_the_order() {
        let a = SeededVarMap::new(3);
        let b = SeededVarMap::new(3);
        let c = SeededVarMap::new(4);
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let dev = Device::Cpu;
        let wa = a
            .var_builder(&dev)
            .get_with_hints((8, 4), "x.weight", init)
            .unwrap();
        b.var_builder(&dev)
            .get_with_hints(3, "y.bias", init)
            .unwrap();
        let wb = b
            .var_builder(&dev)
            .get_with_hints((8, 4), "x.weight", init)
            .unwrap();
        let wc = c
            .var_builder(&dev)
            .get_with_hints((8, 4), "x.weight", init)
            .unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&wa), v(&wb));
        assert_ne!(v(&wa), v(&wc));
    }

    #[test]
    fn init_has_the_requested_statistics() {
        let m = SeededVarMap::new(0);
        let vb = m.var_builder(&Device::Cpu);
        let w = vb
            .get_with_hints((256, 100), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)
            .unwrap();
        let std = w
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let want = (2.0f32 / 100.0).sqrt();
        assert!(
            (std - want).abs() < 0.02 * want * 5.0,
            "std {std}, want {want}"
        );
        let u = vb
            .get_with_hints(10000, "u", Init::Uniform { lo: -0.5, up: 0.5 })
            .unwrap();
        let (lo, hi) = (
            u.min(0).unwrap().to_scalar::<f32>().unwrap(),
            u.max(0).unwrap().to_scalar::<f32>().unwrap(),
        );
        assert!(lo >= -0.5 && hi < 0.5 && lo < -0.49 && hi > 0.49);
    }

    #[test]
    fn dropout_is_seeded_scaled_and_off_in_eval() {
        let xs = Tensor::ones((4, 1000), DType::F32, &Device::Cpu).unwrap();
        let a = Dropout::new(0.4, &DropoutRng::new(1))
            .forward_t(&xs, true)
            .unwrap();
        let b = Dropout::new(0.4, &DropoutRng::new(1))
            .forward_t(&xs, true)
            .unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        let kept = v(&a).iter().filter(|&&x| x > 0.0).count() as f64 / 4000.0;
        assert!((kept - 0.6).abs() < 0.03, "{kept}");
        assert!(v(&a)
            .iter()
            .all(|&x| x == 0.0 || (x - 1.0 / 0.6).abs() < 1e-6));
        let e = Dropout::new(0.4, &DropoutRng::new(1))
            .forward_t(&xs, false)
            .unwrap();
        assert_eq!(v(&e), v(&xs));
    }
}

/// How a model's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitScheme {
    /// The seed's GoogLeNet: convolutions Kaiming-normal (fan-out, ReLU), linear layers
    /// N(0, 0.01), biases zero.
    Seed,
    /// PyTorch's defaults: weights and biases U(±1/√fan_in).
    Torch,
}

pub fn inits(scheme: InitScheme, fan_in: usize, conv: bool) -> (Init, Init) {
    let bound = 1.0 / (fan_in as f64).sqrt();
    match (scheme, conv) {
        (InitScheme::Seed, true) => (
            Init::Kaiming {
                dist: NormalOrUniform::Normal,
                fan: FanInOut::FanOut,
                non_linearity: NonLinearity::ReLU,
            },
            Init::Const(0.0),
        ),
        (InitScheme::Seed, false) => (
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            Init::Const(0.0),
        ),
        (InitScheme::Torch, _) => (
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        ),
    }
}
