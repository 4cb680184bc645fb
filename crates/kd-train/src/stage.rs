//! What a stage binary needs before it trains: its pipeline, its folder, its data.

use crate::config::PipelineConfig;
pub use crate::layout::{self, check_tag, parse_tag, stage_name};
use crate::manifest::Manifest;
use crate::train::Subset;
use crate::TrainError;
use candle_core::{Device, Tensor};
use kd_data::Dataset;
use kd_models::InputSpec;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A trained model of a pipeline, by the stage that trained it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum TrainedModel {
    /// The distilled student (`student-kd/`).
    #[value(name = "student-kd", alias = "student")]
    StudentKd,
    /// The student trained on labels alone (`student-baseline/`).
    #[value(name = "student-baseline", alias = "baseline")]
    StudentBaseline,
    /// The teacher (`teacher/`).
    Teacher,
}

impl TrainedModel {
    /// The `just` recipe that trains it.
    pub fn recipe(self) -> &'static str {
        match self {
            TrainedModel::StudentKd => "student",
            TrainedModel::StudentBaseline => "baseline",
            TrainedModel::Teacher => "teacher",
        }
    }

    /// The stage folder that holds it.
    pub fn stage(self) -> &'static str {
        match self {
            TrainedModel::StudentKd => crate::layout::STUDENT_KD,
            TrainedModel::StudentBaseline => layout::STUDENT_BASELINE,
            TrainedModel::Teacher => layout::TEACHER,
        }
    }
}

impl std::fmt::Display for TrainedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.stage())
    }
}

/// The class names of a trained model, from the `class_indices.json` beside its checkpoint
/// (`{"0": "T-shirt/top", ...}`), in index order.
pub fn class_names(path: &std::path::Path) -> Result<Vec<String>, TrainError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::file(path, format!("cannot read the class names: {e}")))?;
    let map: BTreeMap<String, String> = serde_json::from_str(&text)
        .map_err(|e| TrainError::file(path, format!("not a class index: {e}")))?;
    let mut names = vec![None; map.len()];
    for (k, v) in map {
        let i = k
            .parse::<usize>()
            .ok()
            .filter(|&i| i < names.len())
            .ok_or_else(|| TrainError::file(path, format!("class index {k:?} out of range")))?;
        names[i] = Some(v);
    }
    names
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| TrainError::file(path, "class indices are not 0..n"))
}

/// Flags every stage takes.
#[derive(clap::Args, Debug, Clone)]
pub struct PipelineArgs {
    /// Pipeline file (dataset, models, hyper-parameters).
    #[arg(long, default_value = "pipelines/fashion-mnist.toml")]
    pub pipeline: PathBuf,
    /// Root of all outputs; a stage writes to <ARTIFACTS>/<pipeline name>/<stage>/.
    #[arg(long, default_value = "artifacts")]
    pub artifacts: PathBuf,
    /// Override a value of the pipeline file, e.g. --set student.temperature=4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Dataset folder in MNIST format (overrides data.dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run even if the outputs are up to date with the inputs and settings (and start training
    /// over, ignoring any resume state).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Continue an interrupted training run from its last complete epoch (rerunning the same
    /// command does so too; --resume fails if there is nothing to resume).
    #[arg(long)]
    pub resume: bool,
    /// Photos that do not decode are skipped and counted instead of failing (data.skip_bad_images).
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Where to compute: cpu, cuda, cuda:N or auto (overrides the pipeline file's `device`).
    #[arg(long)]
    pub device: Option<crate::device::DeviceChoice>,
}

/// The usual training flags, shorthands for `--set <section>.<key>=...`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrainArgs {
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl TrainArgs {
    pub fn sets(&self, section: &str) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(x) = self.epochs {
            v.push(format!("{section}.epochs={x}"));
        }
        if let Some(x) = self.batch_size {
            v.push(format!("{section}.batch_size={x}"));
        }
        if let Some(x) = self.lr {
            v.push(format!("{section}.lr={x:e}"));
        }
        if let Some(x) = self.seed {
            v.push(format!("{section}.seed={x}"));
        }
        v
    }
}

/// A resolved pipeline: its name (the file's stem), settings and output root.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub config: PipelineConfig,
    pub root: PathBuf,
    pub force: bool,
    pub resume: bool,
}

impl PipelineArgs {
    /// Reads the pipeline file with `--set`, `--data-dir` and the stage's own shorthands
    /// (`extra`, applied last).
    pub fn open(&self, extra: &[String]) -> Result<Pipeline, TrainError> {
        let mut sets = self.overrides.clone();
        if let Some(dir) = &self.data_dir {
            sets.push(format!(
                "data.dir={}",
                toml::Value::String(dir.display().to_string())
            ));
        }
        if self.skip_bad_images {
            sets.push("data.skip_bad_images=true".into());
        }
        if let Some(device) = self.device {
            sets.push(format!("device=\"{device}\""));
        }
        sets.extend_from_slice(extra);
        let config = PipelineConfig::load(&self.pipeline, &sets)?;
        let name = self
            .pipeline
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| TrainError::file(&self.pipeline, "not a file name"))?;
        Ok(Pipeline {
            root: self.artifacts.join(&name),
            name,
            config,
            force: self.force,
            resume: self.resume,
        })
    }
}

impl Pipeline {
    /// `<artifacts>/<pipeline>/<stage>`.
    pub fn dir(&self, stage: &str) -> PathBuf {
        self.root.join(stage)
    }

    /// The file a tagged stage reads from an upstream stage: the same tag's, when that tagged
    /// run has it, else the pipeline's own (`<stage>/<file>`).
    pub fn input(&self, stage: &str, file: &str, tag: Option<&str>) -> PathBuf {
        let own = self.dir(stage).join(file);
        match tag {
            Some(t) => {
                let tagged = self.dir(&stage_name(stage, Some(t))).join(file);
                if tagged.is_file() {
                    tagged
                } else {
                    own
                }
            }
            None => own,
        }
    }

    /// The manifest in `dir` if the stage need not run again (and `--force` was not given).
    /// Logs why a stage runs (or that it is skipped, and why).
    pub fn up_to_date(
        &self,
        stage: &str,
        dir: &std::path::Path,
        key: &str,
        settings: &serde_json::Value,
        inputs: &BTreeMap<String, String>,
    ) -> Option<Manifest> {
        self.up_to_date_at(stage, &Manifest::path(dir), key, settings, inputs)
    }

    /// [`Pipeline::up_to_date`] for the manifest file `path`.
    pub fn up_to_date_at(
        &self,
        stage: &str,
        path: &std::path::Path,
        key: &str,
        settings: &serde_json::Value,
        inputs: &BTreeMap<String, String>,
    ) -> Option<Manifest> {
        if self.force {
            tracing::info!("{stage}: running (--force)");
            return None;
        }
        match Manifest::staleness_at(path, key, settings, inputs) {
            None => {
                tracing::info!(
                    "{stage}: up to date — same inputs and settings as the run recorded in {}; skipped (--force reruns it)",
                    path.display()
                );
                Manifest::read_at(path).ok()
            }
            Some(why) => {
                tracing::info!("{stage}: running — {why}");
                None
            }
        }
    }

    /// The data settings that change a result.
    pub fn data_settings(&self) -> crate::record::DataSettings {
        let d = &self.config.data;
        crate::record::DataSettings {
            name: d.name.clone(),
            format: d.format,
            classes: d.classes,
            val_size: d.val_size,
            split_seed: d.split_seed,
            image_size: d.image_size,
            test_fraction: d.test_fraction,
            mean: d.mean.clone(),
            std: d.std.clone(),
            labels: d.labels,
            label_seed: d.labels.map(|_| d.label_seed),
        }
    }

    pub fn load_data(&self) -> Result<LoadedData, TrainError> {
        let d = &self.config.data;
        let opts = d.load_options().map_err(TrainError::Other)?;
        let t0 = std::time::Instant::now();
        let mut dataset = Dataset::load(&opts)?;
        if !dataset.skipped.is_empty() {
            let shown: Vec<String> = dataset
                .skipped
                .iter()
                .take(5)
                .map(|(p, why)| format!("{}: {why}", p.display()))
                .collect();
            tracing::warn!(
                "data: skipped {} unreadable file(s): {}",
                dataset.skipped.len(),
                shown.join("; ")
            );
        }
        let (mut train_rows, val_rows) = dataset.validation_split(d.val_size, d.split_seed)?;
        let train_fingerprint = dataset.train.fingerprint();
        let labelled_rows = match d.labels {
            None => train_rows.clone(),
            Some(budget) => kd_data::labels::stratified(
                &dataset.train.labels,
                &train_rows,
                budget.count(train_rows.len()),
                dataset.classes,
                d.label_seed,
            )?,
        };
        let n = dataset.train.len();
        train_rows.extend((n - dataset.unlabelled) as u32..n as u32);
        let device = Device::Cpu;
        let compute = self.config.device.open()?;
        let label_mask = (labelled_rows.len() < train_rows.len())
            .then(|| hide_labels(&mut dataset, &train_rows, &labelled_rows));
        let loaded = LoadedData {
            spec: InputSpec {
                channels: dataset.train.channels,
                height: dataset.train.height,
                width: dataset.train.width,
                classes: dataset.classes,
            },
            train_images: dataset.train.to_tensor(&dataset.normalization, &device)?,
            train_labels: dataset.train.labels_tensor(&device)?,
            test_images: dataset.test.to_tensor(&dataset.normalization, &device)?,
            test_labels: dataset.test.labels_tensor(&device)?,
            all_rows: (0..n as u32).collect(),
            test_rows: (0..dataset.test.len() as u32).collect(),
            train_fingerprint,
            test_fingerprint: dataset.test.fingerprint(),
            device: compute,
            train_rows,
            labelled_rows,
            val_rows,
            label_mask,
            dataset,
        };
        if let Some(mask) = &loaded.label_mask {
            tracing::info!(
                "data: {} of {} training images keep their label (data.labels = {}, seed {}); the other {} are the unlabelled transfer set",
                loaded.labelled_rows.len(),
                loaded.train_rows.len(),
                d.labels.map_or("all".to_string(), |b| b.to_string()),
                d.label_seed,
                mask.iter().filter(|&&m| m == 0).count()
            );
        }
        tracing::info!(
            "data: {} — {} training images ({} train / {} validation), {} test, {} classes, {:.1}s",
            loaded.dataset.name,
            loaded.dataset.train.len(),
            loaded.train_rows.len(),
            loaded.val_rows.len(),
            loaded.dataset.test.len(),
            loaded.dataset.classes,
            t0.elapsed().as_secs_f64()
        );
        Ok(loaded)
    }
}

/// A dataset in memory as tensors, with its splits.
pub struct LoadedData {
    pub dataset: Dataset,
    pub spec: InputSpec,
    pub train_images: Tensor,
    pub train_labels: Tensor,
    pub test_images: Tensor,
    pub test_labels: Tensor,
    /// Rows of the training file used for training (labelled or not) / held out for validation.
    pub train_rows: Vec<u32>,
    pub val_rows: Vec<u32>,
    /// The training rows that carry a label (all of `train_rows` unless `data.labels` or
    /// unlabelled photos say otherwise): what the teacher and the baseline train on.
    pub labelled_rows: Vec<u32>,
    /// One byte per row of the training file, 1 where the row carries a label (validation rows
    /// do); `None` when every row does.
    pub label_mask: Option<Vec<u8>>,
    /// Every row of the training file (what the knowledge file covers) and of the test file.
    pub all_rows: Vec<u32>,
    pub test_rows: Vec<u32>,
    pub train_fingerprint: String,
    pub test_fingerprint: String,
    /// Where the models compute (`device` in the pipeline file). The images stay in memory on
    /// the CPU, where batches are gathered and augmented; each batch is then moved there.
    pub device: Device,
}

impl LoadedData {
    pub fn train(&self) -> Subset<'_> {
        Subset {
            images: &self.train_images,
            labels: &self.train_labels,
            rows: &self.train_rows,
        }
    }
    /// The labelled training rows.
    pub fn labelled(&self) -> Subset<'_> {
        Subset {
            images: &self.train_images,
            labels: &self.train_labels,
            rows: &self.labelled_rows,
        }
    }
    pub fn val(&self) -> Subset<'_> {
        Subset {
            images: &self.train_images,
            labels: &self.train_labels,
            rows: &self.val_rows,
        }
    }
    pub fn all_train(&self) -> Subset<'_> {
        Subset {
            images: &self.train_images,
            labels: &self.train_labels,
            rows: &self.all_rows,
        }
    }
    pub fn test(&self) -> Subset<'_> {
        Subset {
            images: &self.test_images,
            labels: &self.test_labels,
            rows: &self.test_rows,
        }
    }

    /// The data's part of a stage's inputs.
    pub fn inputs(&self) -> BTreeMap<String, String> {
        let mut inputs = BTreeMap::from([
            ("dataset.train".to_string(), self.train_fingerprint.clone()),
            ("dataset.test".to_string(), self.test_fingerprint.clone()),
        ]);
        if let Some(f) = self.label_mask_fingerprint() {
            inputs.insert("dataset.labelled".to_string(), f);
        }
        inputs
    }

    /// The fingerprint of the label mask, when some training rows carry no label.
    pub fn label_mask_fingerprint(&self) -> Option<String> {
        self.label_mask
            .as_deref()
            .map(kd_data::labels::mask_fingerprint)
    }

    /// Optimiser steps in one pass over every training row, labelled or not: an epoch's length
    /// for every stage when only some rows carry a label, so the teacher and the baseline (which
    /// train on the labelled rows) get as many steps per epoch as the KD student.
    pub fn steps_per_pass(&self, batch_size: usize) -> usize {
        self.train_rows.len().div_ceil(batch_size.max(1))
    }
}

/// Zeroes the labels of the training rows outside `labelled` (so nothing can learn from them)
/// and returns the label mask of every row of the training file.
fn hide_labels(dataset: &mut Dataset, train_rows: &[u32], labelled: &[u32]) -> Vec<u8> {
    let mut mask = vec![1u8; dataset.train.len()];
    for &r in train_rows {
        mask[r as usize] = 0;
    }
    for &r in labelled {
        mask[r as usize] = 1;
    }
    for (label, m) in dataset.train.labels.iter_mut().zip(&mask) {
        if *m == 0 {
            *label = 0;
        }
    }
    mask
}

/// Threads candle's matmul and convolutions use (RAYON_NUM_THREADS, else all cores).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_must_be_zero_to_n() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("class_indices.json");
        std::fs::write(&p, r#"{"1": "b", "0": "a"}"#).unwrap();
        assert_eq!(class_names(&p).unwrap(), ["a", "b"]);
        std::fs::write(&p, r#"{"0": "a", "2": "c"}"#).unwrap();
        let e = class_names(&p).unwrap_err().to_string();
        assert!(
            e.contains("class_indices.json") && e.contains("\"2\""),
            "{e}"
        );
    }
}
