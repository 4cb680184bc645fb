//! The pipeline file (`pipelines/<name>.toml`): `[data]`, `[teacher]`, `[knowledge]`, `[student]`.
//!
//! Unknown keys are refused with the key named; every value can be overridden from the command
//! line with `--set section.key=value` (parsed as TOML, so `--set student.temperature=4`).

use kd_data::{Augment, DataFormat, DataSource, FolderOptions, LoadOptions, Normalization};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("pipeline file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Where every stage computes (`--device` overrides it): `cpu`, `cuda`, `cuda:N` or `auto`
    /// (the GPU when the binary has CUDA and one answers). Not part of any stage's freshness key.
    #[serde(default)]
    pub device: crate::device::DeviceChoice,
    pub data: DataConfig,
    pub teacher: TeacherConfig,
    #[serde(default)]
    pub knowledge: KnowledgeConfig,
    pub student: StudentConfig,
    /// What `just compare` and `just sweep` run (`kd-experiment`).
    #[serde(default)]
    pub experiment: crate::experiment::ExperimentConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `fashion-mnist` (checked against the published checksums) or any other name for data in
    /// MNIST format.
    #[serde(default = "default_dataset")]
    pub name: String,
    /// `idx` (MNIST's format), `image-folder` (photos in class folders) or `cifar10` (binary).
    #[serde(default)]
    pub format: Format,
    /// `dir` (a folder in MNIST format) or `hub` (download through candle-datasets).
    #[serde(default)]
    pub source: Source,
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    #[serde(default = "default_classes")]
    pub classes: usize,
    #[serde(default = "yes")]
    pub verify_checksums: bool,
    /// Use only the first N training / test images (small pipelines).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Training images held out for checkpoint selection.
    #[serde(default = "default_val_size")]
    pub val_size: usize,
    /// Seed of the validation split (the same for teacher and students) and, for a single
    /// ImageFolder root, of the train/test split.
    #[serde(default)]
    pub split_seed: u64,
    /// ImageFolder: the side of the square model input.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// ImageFolder with a single root: the share of each class held out for the test split.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// ImageFolder: skip (and count) files that do not decode instead of failing.
    #[serde(default)]
    pub skip_bad_images: bool,
    /// Per-channel normalisation `(x/255 - mean) / std`; the default is the dataset's own.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// Keep the labels of only this many training images (an integer), or this share of them (a
    /// number below 1): chosen per class, seeded by `label_seed`. The other training images
    /// become the unlabelled transfer set: the teacher and the baseline never see them, the
    /// precompute and the KD student do. Validation and test images keep their labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<LabelBudget>,
    /// Seed of the choice of labelled images.
    #[serde(default)]
    pub label_seed: u64,
    /// ImageFolder: photos without a class, added to the transfer set [default: the root's
    /// `unlabelled/` folder, if there is one].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlabelled_dir: Option<PathBuf>,
}

/// How the dataset's files are laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// MNIST's IDX files.
    #[default]
    Idx,
    /// Photos in one folder per class.
    ImageFolder,
    /// CIFAR-10's binary batches.
    Cifar10,
}

/// Where the dataset comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A folder (`data.dir`).
    #[default]
    Dir,
    /// The Hugging Face hub, through candle-datasets (needs the internet).
    Hub,
}

/// How the knowledge file stores logits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
}

/// How many training images keep their label: a count, or a share of the training split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelBudget {
    Count(usize),
    Fraction(f64),
}

impl LabelBudget {
    /// The number of labelled images out of `n`.
    pub fn count(&self, n: usize) -> usize {
        match *self {
            LabelBudget::Count(c) => c,
            LabelBudget::Fraction(f) => (f * n as f64).round() as usize,
        }
    }
}

impl std::fmt::Display for LabelBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelBudget::Count(c) => write!(f, "{c}"),
            LabelBudget::Fraction(x) => write!(f, "{x}"),
        }
    }
}

/// Learning-rate schedule over all steps of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay from `lr` to 0, per step.
    Cosine,
    Constant,
}

/// The settings every training section holds (`[teacher]`, `[student]`), declared once: the
/// section's own fields follow, and `train()` turns them into the loop's [`TrainSettings`].
macro_rules! training_section {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            pub arch: String,
            pub epochs: usize,
            pub batch_size: usize,
            pub lr: f64,
            #[serde(default = "cosine")]
            pub schedule: Schedule,
            #[serde(default)]
            pub weight_decay: f64,
            #[serde(default)]
            pub seed: u64,
            /// Augment while training: random crop (padding `crop_padding`) + flip for small
            /// images, RandomResizedCrop + flip for photos.
            #[serde(default)]
            pub augment: bool,
            #[serde(default = "default_crop_padding")]
            pub crop_padding: usize,
            /// Optimiser steps per epoch [default: one pass over the training split, labelled or
            /// not].
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub epoch_steps: Option<usize>,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// What the training loop needs from this section.
            pub fn train(&self, data: &DataConfig) -> TrainSettings {
                TrainSettings {
                    epochs: self.epochs,
                    batch_size: self.batch_size,
                    lr: self.lr,
                    schedule: self.schedule,
                    weight_decay: self.weight_decay,
                    seed: self.seed,
                    augment: data.augmentation(self.augment, self.crop_padding),
                    epoch_steps: self.epoch_steps,
                }
            }
        }
    };
}

training_section! {
    /// `[teacher]`.
    pub struct TeacherConfig {
        /// Loss = CE(main) + aux_weight · (CE(aux1) + CE(aux2)), as the seed trains GoogLeNet.
        #[serde(default = "default_aux_weight")]
        pub aux_weight: f64,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnowledgeConfig {
    /// Batch size of the teacher's inference over the training set.
    #[serde(default = "default_knowledge_batch")]
    pub batch_size: usize,
    /// Views per training image: 1 = the image as it is; K > 1 adds K - 1 augmented views (the
    /// student's augmentation), each stored with its parameters so the student can replay it.
    #[serde(default = "one")]
    pub views: usize,
    /// Seed of the stored views.
    #[serde(default)]
    pub view_seed: u64,
    /// Precision of the stored logits: "f32" or "f16".
    #[serde(default)]
    pub dtype: Precision,
    /// Keep only the k largest logits per row (plus one for the rest); 0 keeps all.
    #[serde(default)]
    pub top_k: usize,
}

fn one() -> usize {
    1
}

impl Default for KnowledgeConfig {
    fn default() -> Self {
        Self {
            batch_size: default_knowledge_batch(),
            views: 1,
            view_seed: 0,
            dtype: Precision::F32,
            top_k: 0,
        }
    }
}

training_section! {
    /// `[student]`.
    pub struct StudentConfig {
        /// Hinton KD: loss = hard_weight · CE + soft_weight · Σ_h w_h · T² · KL(teacher_h ‖ student).
        pub temperature: f64,
        pub hard_weight: f64,
        pub soft_weight: f64,
        /// Weight of each teacher head's soft targets, by head name (`main`, `aux1`, `aux2`).
        pub head_weights: BTreeMap<String, f64>,
        /// A student without augmentation reading a K-view knowledge file: the teacher's logits for
        /// view 0 (`first`, the image as it is) or averaged over the K views (`mean`: the teacher's
        /// test-time-augmentation ensemble). An augmenting student always replays the stored views.
        #[serde(default, skip_serializing_if = "ViewTargets::is_first")]
        pub view_targets: ViewTargets,
        /// Z-score the student's and the teacher's logits before the temperature in the soft loss
        /// (logit standardisation: match the shape of the teacher's answer, not its scale).
        #[serde(default, skip_serializing_if = "is_false")]
        pub standardize_logits: bool,
        /// Decoupled KD: each head's soft loss is `TCKD + dkd_beta · NCKD` instead of the KL (which
        /// is `TCKD + (1 − p_target) · NCKD`); unset keeps Hinton's KL.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub dkd_beta: Option<f64>,
    }
}

fn is_false(b: &bool) -> bool {
    !b
}

/// Which of a K-view knowledge file's logits a student without augmentation learns from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewTargets {
    /// View 0: the teacher's answer for the image as the student sees it.
    #[default]
    First,
    /// The mean of the K views' logits (a geometric-mean ensemble at every temperature).
    Mean,
}

impl ViewTargets {
    pub fn is_first(&self) -> bool {
        *self == ViewTargets::First
    }
}

/// What the training loop needs, whichever model it trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub seed: u64,
    pub augment: Option<Augment>,
    /// Optimiser steps per epoch; `None`: one pass over the rows trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_steps: Option<usize>,
}

impl DataConfig {
    /// The training augmentation of this kind of data.
    /// The training augmentation for this kind of data, if `on`.
    pub fn augmentation(&self, on: bool, crop_padding: usize) -> Option<Augment> {
        on.then(|| match self.format {
            Format::ImageFolder => Augment::resized_crop(self.image_size),
            Format::Idx | Format::Cifar10 => Augment::CropFlip { crop_padding },
        })
    }
}

impl DataConfig {
    pub fn load_options(&self) -> Result<LoadOptions, String> {
        let source = match self.source {
            Source::Dir => DataSource::Dir(self.dir.clone()),
            Source::Hub => DataSource::Hub,
        };
        let format = match self.format {
            Format::Idx => DataFormat::Idx,
            Format::ImageFolder => DataFormat::ImageFolder(FolderOptions {
                size: self.image_size,
                test_fraction: self.test_fraction,
                split_seed: self.split_seed,
                skip_bad_images: self.skip_bad_images,
                unlabelled: self.unlabelled_dir.clone(),
            }),
            Format::Cifar10 => DataFormat::Cifar10,
        };
        if !(0.0..1.0).contains(&self.test_fraction) {
            return Err(format!(
                "data.test_fraction must be in [0, 1), not {}",
                self.test_fraction
            ));
        }
        let normalization = match (&self.mean, &self.std) {
            (Some(mean), Some(std)) => {
                if !std.iter().all(|s| s.is_finite() && *s > 0.0) {
                    return Err("data.std must be positive".into());
                }
                Some(Normalization {
                    mean: mean.clone(),
                    std: std.clone(),
                })
            }
            (None, None) => None,
            _ => return Err("data.mean and data.std go together".into()),
        };
        Ok(LoadOptions {
            name: self.name.clone(),
            format,
            source,
            verify_checksums: self.verify_checksums,
            classes: self.classes,
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            normalization,
        })
    }
}

fn default_dataset() -> String {
    "fashion-mnist".into()
}
fn default_image_size() -> usize {
    224
}
fn default_test_fraction() -> f64 {
    0.2
}
fn default_dir() -> PathBuf {
    PathBuf::from(kd_data::fashion_mnist::DEBIAN_DIR)
}
fn default_classes() -> usize {
    10
}
fn yes() -> bool {
    true
}
fn default_val_size() -> usize {
    5000
}
fn cosine() -> Schedule {
    Schedule::Cosine
}
fn default_crop_padding() -> usize {
    2
}
fn default_aux_weight() -> f64 {
    0.3
}
fn default_knowledge_batch() -> usize {
    256
}

impl PipelineConfig {
    /// Reads a pipeline file and applies `--set key=value` overrides, then checks the values.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, overrides, path)
    }

    /// A pipeline file's text with `--set` overrides; `path` names it in errors.
    pub fn parse(text: &str, overrides: &[String], path: &Path) -> Result<Self, ConfigError> {
        let file_err = |message: String| ConfigError::File {
            path: path.to_path_buf(),
            message,
        };
        let mut value: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| file_err(e.message().to_string()))?;
        for arg in overrides {
            apply_override(&mut value, arg)?;
        }
        // The path of the value that does not fit (`teacher.epochs: invalid value ...`).
        let config: Self = serde_path_to_error::deserialize(toml::Value::Table(value))
            .map_err(|e| file_err(format!("{}: {}", e.path(), e.inner().message())))?;
        config.validate().map_err(file_err)?;
        Ok(config)
    }

    /// Refuses values no run can use, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        self.check_counts()?;
        self.check_numbers()?;
        self.check_models()?;
        self.check_combinations()?;
        self.data.load_options()?;
        self.experiment.validate()
    }

    /// Epochs, batch sizes, views, classes, sizes: at least 1 (and epochs not absurd).
    fn check_counts(&self) -> Result<(), String> {
        let (t, s, d) = (&self.teacher, &self.student, &self.data);
        let positive = [
            ("teacher.epochs", t.epochs),
            ("teacher.batch_size", t.batch_size),
            ("student.epochs", s.epochs),
            ("student.batch_size", s.batch_size),
            ("knowledge.batch_size", self.knowledge.batch_size),
            ("knowledge.views", self.knowledge.views),
            ("data.classes", d.classes),
            ("data.image_size", d.image_size),
            ("data.val_size", d.val_size),
            ("data.train_limit", d.train_limit.unwrap_or(1)),
            ("data.test_limit", d.test_limit.unwrap_or(1)),
            ("teacher.epoch_steps", t.epoch_steps.unwrap_or(1)),
            ("student.epoch_steps", s.epoch_steps.unwrap_or(1)),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} must be at least 1"));
        }
        for (key, v) in [("teacher.epochs", t.epochs), ("student.epochs", s.epochs)] {
            if v > MAX_EPOCHS {
                return Err(format!("{key} {v} is more than {MAX_EPOCHS}"));
            }
        }
        Ok(())
    }

    /// Rates positive, weights zero or more, all finite.
    fn check_numbers(&self) -> Result<(), String> {
        let s = &self.student;
        let rates = [
            ("teacher.lr", self.teacher.lr),
            ("student.lr", s.lr),
            ("student.temperature", s.temperature),
        ];
        for (key, v) in rates {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{key} must be a positive number, not {v}"));
            }
        }
        let mut weights = vec![
            ("student.hard_weight".to_string(), s.hard_weight),
            ("student.soft_weight".to_string(), s.soft_weight),
            ("teacher.aux_weight".to_string(), self.teacher.aux_weight),
            (
                "teacher.weight_decay".to_string(),
                self.teacher.weight_decay,
            ),
            ("student.weight_decay".to_string(), s.weight_decay),
        ];
        weights.extend(
            s.head_weights
                .iter()
                .map(|(h, w)| (format!("student.head_weights.{h}"), *w)),
        );
        weights.extend(s.dkd_beta.map(|b| ("student.dkd_beta".to_string(), b)));
        for (key, v) in weights {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{key} must be zero or more, not {v}"));
            }
        }
        Ok(())
    }

    /// Known architectures, and a student that learns something.
    fn check_models(&self) -> Result<(), String> {
        for (key, arch) in [
            ("teacher.arch", &self.teacher.arch),
            ("student.arch", &self.student.arch),
        ] {
            kd_models::heads(arch).map_err(|e| format!("{key}: {e}"))?;
        }
        let s = &self.student;
        if s.hard_weight == 0.0 && s.soft_weight == 0.0 {
            return Err(
                "student.hard_weight and student.soft_weight are both 0: the student would learn nothing"
                    .into(),
            );
        }
        if s.head_weights.values().all(|w| *w == 0.0) && s.soft_weight > 0.0 {
            return Err("student.head_weights must give some head a positive weight".into());
        }
        Ok(())
    }

    /// Settings that are fine alone but not together.
    fn check_combinations(&self) -> Result<(), String> {
        let (s, k) = (&self.student, &self.knowledge);
        if k.top_k >= self.data.classes && k.top_k > 0 {
            return Err(format!(
                "knowledge.top_k {} must be below data.classes ({}); 0 keeps every class",
                k.top_k, self.data.classes
            ));
        }
        if s.standardize_logits && s.dkd_beta.is_some() {
            return Err(
                "student.standardize_logits and student.dkd_beta do not combine: set one".into(),
            );
        }
        if s.view_targets == ViewTargets::Mean && s.augment {
            return Err(
                "student.view_targets = \"mean\" is for a student without augmentation \
                 (student.augment = true replays each stored view with its own logits)"
                    .into(),
            );
        }
        match self.data.labels {
            Some(LabelBudget::Fraction(f)) if !(f > 0.0 && f <= 1.0) => Err(format!(
                "data.labels {f} must be a count of images or a share in (0, 1]"
            )),
            Some(LabelBudget::Count(0)) => Err("data.labels must be at least 1".into()),
            Some(_) if s.dkd_beta.is_some() => Err(
                "student.dkd_beta needs every training image's label (decoupled KD splits \
                 on the true class); it does not combine with data.labels"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

/// The most epochs a run may ask for (a guard against typos that would overflow the step count).
pub const MAX_EPOCHS: usize = 1_000_000;

/// `section.key=value`: the value is TOML (`4`, `"cosine"`, `true`, `[1, 2]`), or a bare string.
fn apply_override(root: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |message: &str| ConfigError::Override {
        arg: arg.to_string(),
        message: message.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected KEY=VALUE"))?;
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").ok_or_else(|| err("no value"))?,
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, path) = parts.split_last().ok_or_else(|| err("empty key"))?;
    let mut table = root;
    for p in path {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| err(&format!("{p} is not a section")))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[data]
[teacher]
arch = "googlenet"
epochs = 1
batch_size = 128
lr = 1e-3
[student]
arch = "student-cnn"
epochs = 2
batch_size = 128
lr = 2e-3
temperature = 5.0
hard_weight = 0.55
soft_weight = 0.45
head_weights = { main = 1.0, aux1 = 0.3, aux2 = 0.3 }
"#;

    fn load(text: &str, overrides: &[&str]) -> Result<PipelineConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, text).unwrap();
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        PipelineConfig::load(&p, &o).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.data.val_size, 5000);
        assert_eq!(c.teacher.aux_weight, 0.3);
        assert_eq!(c.knowledge.batch_size, 256);
        let c = load(
            MINIMAL,
            &[
                "student.temperature=4",
                "student.schedule=\"constant\"",
                "data.train_limit=100",
            ],
        )
        .unwrap();
        assert_eq!(c.student.temperature, 4.0);
        assert_eq!(c.student.schedule, Schedule::Constant);
        assert_eq!(c.data.train_limit, Some(100));
        let c = load(MINIMAL, &["data.dir=/somewhere/else"]).unwrap();
        assert_eq!(c.data.dir, PathBuf::from("/somewhere/else"));
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let cases: [(&[&str], &str); 12] = [
            (&["data.val_size=0"], "data.val_size"),
            (&["teacher.epoch=3"], "epoch"),
            (&["student.temperature=0"], "student.temperature"),
            (&["student.hard_weight=-1"], "student.hard_weight"),
            (&["teacher.epochs=0"], "teacher.epochs"),
            (&["student.lr=\"fast\""], "invalid type"),
            (
                &["student.head_weights.aux1=-0.3"],
                "student.head_weights.aux1",
            ),
            (&["data.source=\"ftp\""], "data.source"),
            (
                &["student.augment=true", "student.view_targets=\"mean\""],
                "student.view_targets",
            ),
            (&["student.dkd_beta=-1"], "student.dkd_beta"),
            (
                &["student.dkd_beta=8", "student.standardize_logits=true"],
                "do not combine",
            ),
            (
                &["student.view_targets=\"median\""],
                "`median`, expected `first` or `mean`",
            ),
        ];
        for (o, want) in cases {
            let e = load(MINIMAL, o).unwrap_err();
            assert!(e.contains(want) && e.contains("p.toml"), "{o:?}: {e}");
        }
        let e = load(&MINIMAL.replace("[data]", "[data]\ncolour = 1"), &[]).unwrap_err();
        assert!(e.contains("colour"), "{e}");
        assert!(load(MINIMAL, &["nonsense"])
            .unwrap_err()
            .contains("KEY=VALUE"));
    }

    #[test]
    fn shipped_pipelines_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                PipelineConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2);
    }
}
