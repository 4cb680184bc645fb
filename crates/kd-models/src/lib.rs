//! Teacher and student networks, selected by name, and the layers candle lacks.
//!
//! | name | what | parameters |
//! |---|---|---|
//! | `googlenet` | the seed's GoogLeNet, channels / 4, 28×28 input, aux heads | 538,330 (10 classes) |
//! | `googlenet-bn` | `googlenet` with BatchNorm after every convolution (torchvision's blocks) | 540,214 (10 classes) |
//! | `googlenet-224` | the seed's GoogLeNet at 224×224, aux heads | 10,318,655 (5 classes) |
//! | `student-cnn` | the seed's student adapted to 28×28 | 20,490 (10 classes) |
//! | `student-seed` | the seed's `Studentmodel` at 224×224 | 41,029 (5 classes) |

pub mod adam;
pub mod conv;
mod cpu;
pub mod device;
mod gemm;
pub mod googlenet;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // kernel launches and `DeviceRepr` for their arguments; each has its SAFETY
mod gpu;
pub mod graph;
mod im2col;
mod implicit;
pub mod init;
pub mod layers;
pub mod macs;
pub mod meeting;
pub mod norm;
pub mod pool;
pub mod portable;
pub mod student;
pub mod timing;

pub use implicit::ImplicitUse;
pub use init::{Dropout, DropoutRng, SeededVarMap};
pub use pool::Pool2d;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A classifier with one or more heads; head 0 is the one evaluated.
pub trait Classifier: Send + Sync {
    /// Names of the heads `forward_t` returns, in order (`main` first).
    fn heads(&self) -> &'static [&'static str];
    /// Logits `[batch, classes]` of every head. Dropout is active only when `train` is true.
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>>;
    /// Whether a training step may run the batch as two halves at once (`kd_train::halves`):
    /// every row computed from that row alone but for BatchNorm, whose halves meet to share the
    /// whole batch's statistics ([`meeting`]). Yes for the models measured faster so (the GoogLeNets).
    fn trains_in_halves(&self) -> bool {
        false
    }
    /// The eval-mode computation as a graph of standard operators, input `input` (NCHW), one
    /// output per head, named as [`Classifier::heads`].
    fn inference_graph(&self, input: &str) -> candle_core::Result<graph::InferenceGraph>;
    /// Where the weights are: inputs go there before [`Classifier::forward_t`].
    fn device(&self) -> &Device;
}

/// The input a model is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

/// The architectures this crate builds, by name.
pub const ARCHITECTURES: [&str; 5] = [
    "googlenet",
    "googlenet-bn",
    "googlenet-224",
    "student-cnn",
    "student-seed",
];

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown architecture {0:?} (known: {list})", list = ARCHITECTURES.join(", "))]
    UnknownArchitecture(String),
    #[error("{0}")]
    Input(String),
    #[error("{name}={value:?}: expected {expected}")]
    Environment {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Builds `arch` with the variables of `vb`.
pub fn build(
    arch: &str,
    spec: &InputSpec,
    rng: &DropoutRng,
    vb: VarBuilder,
) -> Result<Box<dyn Classifier>> {
    use googlenet::{GoogLeNet, GoogLeNetConfig};
    use student::{StudentCnn, StudentConfig};
    Ok(match arch {
        "googlenet" => Box::new(GoogLeNet::new(&GoogLeNetConfig::small(), spec, rng, vb)?),
        "googlenet-bn" => Box::new(GoogLeNet::new(&GoogLeNetConfig::small_bn(), spec, rng, vb)?),
        "googlenet-224" => Box::new(GoogLeNet::new(&GoogLeNetConfig::imagenet(), spec, rng, vb)?),
        "student-cnn" => Box::new(StudentCnn::new(&StudentConfig::small(), spec, rng, vb)?),
        "student-seed" => Box::new(StudentCnn::new(&StudentConfig::seed(), spec, rng, vb)?),
        other => return Err(ModelError::UnknownArchitecture(other.to_string())),
    })
}

/// The heads `arch` returns, in order, without building it.
pub fn heads(arch: &str) -> Result<&'static [&'static str]> {
    match arch {
        "googlenet" | "googlenet-bn" | "googlenet-224" => Ok(googlenet::GoogLeNet::HEADS),
        "student-cnn" | "student-seed" => Ok(student::StudentCnn::HEADS),
        other => Err(ModelError::UnknownArchitecture(other.to_string())),
    }
}

/// A model being trained: the network and its variables.
pub struct Trainable {
    pub model: Box<dyn Classifier>,
    pub vars: SeededVarMap,
    /// The dropout masks' stream, shared with the model's dropout layers.
    pub dropout: DropoutRng,
}

impl Trainable {
    /// A freshly initialised `arch`; weights and dropout masks follow `seed`.
    pub fn new(arch: &str, spec: &InputSpec, seed: u64, device: &Device) -> Result<Self> {
        let vars = SeededVarMap::new(seed);
        let dropout = DropoutRng::new(seed);
        let model = build(arch, spec, &dropout, vars.var_builder(device))?;
        Ok(Self {
            model,
            vars,
            dropout,
        })
    }

    /// Trained parameters (BatchNorm's running statistics are stored but not counted, as in
    /// PyTorch).
    pub fn num_parameters(&self) -> usize {
        self.named_tensors()
            .iter()
            .filter(|(name, _)| !norm::is_buffer(name))
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// The current weights by name (what a checkpoint stores).
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        let data = match self.vars.varmap.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }
}

/// Refuses an input the architecture cannot take (too small for its convolutions and pools, or
/// a channel count it was not built for), before any training: one zero image goes through it.
pub fn check_input(arch: &str, spec: &InputSpec) -> Result<()> {
    let model = Trainable::new(arch, spec, 0, &Device::Cpu)?;
    let x = Tensor::zeros(
        (1, spec.channels, spec.height, spec.width),
        DType::F32,
        &Device::Cpu,
    )?;
    model.model.forward_t(&x, false).map(drop).map_err(|e| {
        ModelError::Input(format!(
            "{arch} does not take {}x{}x{} images (channels x height x width): {e}",
            spec.channels, spec.height, spec.width
        ))
    })
}

/// Parameter count of `arch` for `spec`, without training anything.
pub fn num_parameters(arch: &str, spec: &InputSpec) -> Result<usize> {
    Ok(Trainable::new(arch, spec, 0, &Device::Cpu)?.num_parameters())
}

/// Loads a checkpoint as a frozen model built from plain tensors (no variables, so inference
/// records no graph). Every tensor the architecture needs must be there with its shape, and no
/// other; the error names the file and the first tensor that differs.
pub fn load_frozen(
    arch: &str,
    spec: &InputSpec,
    path: &Path,
    device: &Device,
) -> Result<Box<dyn Classifier>> {
    let err = |message: String| ModelError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let expected = Trainable::new(arch, spec, 0, &Device::Cpu)?.named_tensors();
    let mut names: Vec<&String> = expected.keys().collect();
    names.sort();
    for name in names {
        match tensors.get(name) {
            None => {
                return Err(err(format!(
                    "tensor {name} is missing (is this a {arch} checkpoint?)"
                )))
            }
            Some(t) if t.dims() != expected[name].dims() => {
                return Err(err(format!(
                    "tensor {name} has shape {:?}, {arch} wants {:?}",
                    t.dims(),
                    expected[name].dims()
                )))
            }
            Some(t) if t.dtype() != DType::F32 => {
                return Err(err(format!(
                    "tensor {name} is {:?}, expected F32",
                    t.dtype()
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors.keys().filter(|k| !expected.contains_key(*k)).min() {
        return Err(err(format!(
            "unexpected tensor {extra} (is this a {arch} checkpoint?)"
        )));
    }
    frozen(arch, spec, tensors, device)
}

/// `arch` built from plain tensors (inference only: no variables, no graph). Tensors of a model
/// being trained (its variables) are detached first: a frozen model's BatchNorm is folded into
/// its convolutions only when its statistics are not variables.
pub fn frozen(
    arch: &str,
    spec: &InputSpec,
    tensors: HashMap<String, Tensor>,
    device: &Device,
) -> Result<Box<dyn Classifier>> {
    let tensors = tensors.into_iter().map(|(k, t)| (k, t.detach())).collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    build(arch, spec, &DropoutRng::new(0), vb)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const FASHION: InputSpec = InputSpec {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    const FLOWERS: InputSpec = InputSpec {
        channels: 3,
        height: 224,
        width: 224,
        classes: 5,
    };

    /// The vendored candle's narrow backward (`vendor/candle-core/PATCH.md`): narrows' gradients
    /// meet in one buffer in place — disjoint ranges copied, an overlapping one added, and a
    /// contribution of another op added on top — with candle's zero-padded sums' values.
    #[test]
    fn narrow_gradients_meet_as_zero_padded_sums() {
        let dev = &Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::zeros((6, 2), DType::F32, dev).unwrap())
            .unwrap();
        let w = |rows: usize, k: f32| {
            let v: Vec<f32> = (0..rows * 2).map(|i| k + i as f32).collect();
            Tensor::from_vec(v, (rows, 2), dev).unwrap()
        };
        let term = |start: usize, rows: usize, k: f32| {
            let part = x.as_tensor().narrow(0, start, rows).unwrap();
            (part * w(rows, k)).unwrap().sum_all().unwrap()
        };
        // With and without a contribution of another op (which ends the in-place buffer).
        for other in [0.0, 100.0] {
            let whole = (x.as_tensor() * w(6, other)).unwrap().sum_all().unwrap();
            let mut terms = vec![term(0, 2, 1.0), term(4, 2, 10.0), term(1, 2, 20.0)];
            if other != 0.0 {
                terms.push(whole);
            }
            let loss = terms.into_iter().reduce(|a, b| (a + b).unwrap()).unwrap();
            let g = loss.backward().unwrap();
            let got = g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let mut want = vec![vec![0f32; 2]; 6];
            if other != 0.0 {
                want = w(6, other).to_vec2::<f32>().unwrap();
            }
            for (start, rows, k) in [(0, 2, 1.0), (4, 2, 10.0), (1, 2, 20.0)] {
                for (r, row) in w(rows, k).to_vec2::<f32>().unwrap().iter().enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        want[start + r][c] += v;
                    }
                }
            }
            assert_eq!(got, want, "another op's contribution: {}", other != 0.0);
        }
    }

    #[test]
    fn parameter_counts_match_the_reference() {
        // docs/reference/models.md (counted in PyTorch).
        assert_eq!(num_parameters("googlenet", &FASHION).unwrap(), 538_330);
        // docs/reference/models.md: the BatchNorm teacher (torchvision's BasicConv2d blocks).
        assert_eq!(num_parameters("googlenet-bn", &FASHION).unwrap(), 540_214);
        assert_eq!(num_parameters("student-cnn", &FASHION).unwrap(), 20_490);
        assert_eq!(
            num_parameters("googlenet-224", &FLOWERS).unwrap(),
            10_318_655
        );
        assert_eq!(num_parameters("student-seed", &FLOWERS).unwrap(), 41_029);
        assert!(matches!(
            num_parameters("resnet", &FASHION),
            Err(ModelError::UnknownArchitecture(_))
        ));
    }

    #[test]
    fn multiply_adds_match_the_reference() {
        // MODELS.md: 3.16 GFLOP (googlenet-224 with aux heads; multiply-adds counted as 2) and
        // 132.5 MFLOP (student-seed) per 224x224 image.
        for (arch, gflop) in [("googlenet-224", 3.16), ("student-seed", 0.1325)] {
            let m = Trainable::new(arch, &FLOWERS, 0, &Device::Cpu).unwrap();
            let xs = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
            let (_, macs) = macs::count(|| m.model.forward_t(&xs, false).unwrap());
            let got = 2.0 * macs as f64 / 1e9;
            assert!(
                (got - gflop).abs() / gflop < 0.01,
                "{arch}: {got:.4} GFLOP, reference {gflop}"
            );
        }
    }

    #[test]
    fn the_small_models_take_cifar_sized_rgb() {
        let cifar = InputSpec {
            channels: 3,
            height: 32,
            width: 32,
            classes: 10,
        };
        let xs = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        for arch in ["googlenet", "student-cnn"] {
            let m = Trainable::new(arch, &cifar, 0, &Device::Cpu).unwrap();
            let heads = m.model.forward_t(&xs, true).unwrap();
            assert!(heads.iter().all(|h| h.dims() == [2, 10]), "{arch}");
        }
    }

    #[test]
    fn teacher_returns_three_heads_in_train_and_eval() {
        let m = Trainable::new("googlenet", &FASHION, 0, &Device::Cpu).unwrap();
        let xs = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        for train in [true, false] {
            let heads = m.model.forward_t(&xs, train).unwrap();
            assert_eq!(heads.len(), 3);
            assert!(heads.iter().all(|h| h.dims() == [2, 10]));
        }
        assert_eq!(m.model.heads(), ["main", "aux1", "aux2"]);
        // Eval mode is deterministic (no dropout), train mode is not.
        let xs = Tensor::ones((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let e1 = m.model.forward_t(&xs, false).unwrap();
        let e2 = m.model.forward_t(&xs, false).unwrap();
        assert_eq!(v(&e1[1]), v(&e2[1]));
        let t1 = m.model.forward_t(&xs, true).unwrap();
        assert_ne!(v(&t1[1]), v(&e1[1]));
    }

    #[test]
    fn batch_norm_statistics_travel_with_the_checkpoint() {
        let m = Trainable::new("googlenet-bn", &FASHION, 0, &Device::Cpu).unwrap();
        let xs = Tensor::arange(0f32, 4.0 * 784.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 1, 28, 28))
            .unwrap()
            .affine(1.0 / 3136.0, -0.5)
            .unwrap();
        let stat = |m: &HashMap<String, Tensor>| {
            m["inception4a.branch2.1.bn.running_var"]
                .to_vec1::<f32>()
                .unwrap()
        };
        let fresh = stat(&m.named_tensors());
        assert!(fresh.iter().all(|&v| v == 1.0));
        // Training-mode forwards move the running statistics ...
        for _ in 0..3 {
            m.model.forward_t(&xs, true).unwrap();
        }
        let tensors = m.named_tensors();
        assert_ne!(stat(&tensors), fresh);
        // ... which the checkpoint carries: the frozen model (BatchNorm folded into its
        // convolutions) evaluates as the trained one, up to rounding.
        let dir = tempfile_dir("bn");
        let path = dir.join("bn.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let frozen = load_frozen("googlenet-bn", &FASHION, &path, &Device::Cpu).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a = m.model.forward_t(&xs, false).unwrap();
        let b = frozen.forward_t(&xs, false).unwrap();
        for (a, b) in a.iter().zip(&b) {
            for (x, y) in v(a).iter().zip(v(b)) {
                assert!((x - y).abs() < 1e-4 * (1.0 + x.abs()), "{x} vs {y}");
            }
        }
        // Frozen from the live model's variables, it is the same folded model, to the bit.
        let live = super::frozen("googlenet-bn", &FASHION, tensors.clone(), &Device::Cpu).unwrap();
        let c = live.forward_t(&xs, false).unwrap();
        for (b, c) in b.iter().zip(&c) {
            assert_eq!(v(b), v(c));
        }
        // Eval mode uses the running statistics, not the batch's: one image alone gives the same
        // logits as inside the batch.
        let one = frozen
            .forward_t(&xs.narrow(0, 1, 1).unwrap(), false)
            .unwrap();
        let row: Vec<f32> = v(&b[0])[10..20].to_vec();
        for (x, y) in v(&one[0]).iter().zip(&row) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        // A checkpoint without the statistics is refused by name.
        let mut partial = tensors.clone();
        partial.remove("conv1.bn.running_mean");
        candle_core::safetensors::save(&partial, &path).unwrap();
        let e = load_frozen("googlenet-bn", &FASHION, &path, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("conv1.bn.running_mean") && e.contains("missing"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kd-models-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn checkpoint_for_another_architecture_is_refused() {
        let dir = tempfile_dir("test");
        let path = dir.join("student.safetensors");
        let student = Trainable::new("student-cnn", &FASHION, 0, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&student.named_tensors(), &path).unwrap();
        assert!(load_frozen("student-cnn", &FASHION, &path, &Device::Cpu).is_ok());
        let e = load_frozen("googlenet", &FASHION, &path, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("student.safetensors") && e.contains("missing"),
            "{e}"
        );
        let e = load_frozen(
            "student-cnn",
            &InputSpec {
                classes: 5,
                ..FASHION
            },
            &path,
            &Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("tensor fc.") && e.contains("shape"), "{e}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let e = load_frozen("student-cnn", &FASHION, &path, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("student.safetensors") && e.contains("cannot read"),
            "truncated: {e}"
        );
        std::fs::write(&path, b"garbage").unwrap();
        let e = load_frozen("student-cnn", &FASHION, &path, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
