//! Typed run records: what each stage writes into its manifest (`metrics`, `run`) and what the
//! stages after it read back as the same types, never by string keys.

use crate::config::{LabelBudget, StudentConfig, TeacherConfig, TrainSettings};
use crate::metrics::FitReport;
use crate::TrainError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The data settings that decide a result, as every stage records them (where the files live
/// does not: their fingerprints are inputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSettings {
    pub name: String,
    pub format: crate::config::Format,
    pub classes: usize,
    pub val_size: usize,
    pub split_seed: u64,
    pub image_size: usize,
    pub test_fraction: f64,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<LabelBudget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_seed: Option<u64>,
}

/// The teacher stage's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherSettings {
    pub data: DataSettings,
    pub teacher: TeacherConfig,
}

/// The KD student's settings (everything of `[student]`: the KD loss decides its result).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KdSettings {
    pub data: DataSettings,
    pub student: StudentConfig,
}

/// The baseline's settings: not the KD settings, so changing those does not retrain it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineSettings {
    pub data: DataSettings,
    pub arch: String,
    pub train: TrainSettings,
}

/// Any settings record as the JSON the manifest stores and its key hashes.
pub fn to_json(settings: &impl Serialize) -> Result<serde_json::Value, TrainError> {
    serde_json::to_value(settings).map_err(|e| TrainError::Other(e.to_string()))
}

/// The metrics of a training stage (teacher, KD student, baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub architecture: String,
    pub parameters: usize,
    pub fit: FitReport,
    /// The kept checkpoint (best on validation) on the test set, read once.
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub test_images: usize,
    /// Training images that carry a label, when not all do (`data.labels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled_images: Option<usize>,
    /// The knowledge file a KD student learned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge: Option<String>,
}

/// The metrics of the precompute stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeRecord {
    pub rows: usize,
    pub classes: usize,
    pub heads: Vec<String>,
    pub batch_size: usize,
    /// The teacher's inference time; `None` for a file merged from shards.
    pub inference_seconds: Option<f64>,
    pub images_per_sec: Option<f64>,
    pub bytes: u64,
    pub bytes_per_image: f64,
    pub views: usize,
    /// How the logits are stored (`f32`, `f16`, `top-3 f16`, ...).
    pub storage: String,
    /// Merged from this many shards.
    pub shards: Option<usize>,
    /// How often each head's arg-max agrees with the labels of the labelled training rows.
    pub train_accuracy_per_head: BTreeMap<String, f64>,
    /// Rows that carry a label, when not all do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled_rows: Option<usize>,
}

/// How ONNX Runtime's outputs agree with ours on one head.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadAgreement {
    /// The largest |ONNX Runtime − candle| over every logit of the test set.
    pub max_abs_diff: f32,
    /// Test images whose top-1 class differs between the two.
    pub top1_disagreements: usize,
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuntimeCheck {
    pub onnx: String,
    pub onnxruntime: String,
    pub threads: usize,
    pub test_images: usize,
    /// Test accuracy of the main head, as ONNX Runtime computes it and as candle does.
    pub test_accuracy: f64,
    pub candle_test_accuracy: f64,
    pub heads: BTreeMap<String, HeadAgreement>,
    /// Median latency of one image at batch 1, and images per second at batch 256.
    pub latency_ms_batch1: f64,
    pub throughput_batch256: f64,
    pub candle_latency_ms_batch1: f64,
    pub candle_throughput_batch256: f64,
}

/// What the export stage records.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportRecord {
    pub file: String,
    pub bytes: u64,
    pub architecture: String,
    pub opset: i64,
    pub heads: Vec<String>,
    /// `[C, H, W]` of one image.
    pub input: [usize; 3],
    pub classes: Vec<String>,
    /// ONNX Runtime's run on the test set, held against ours; `None` when it was not run.
    pub runtime: Option<RuntimeCheck>,
}

/// Where a run sits in an experiment: its seed, the variant it belongs to and the runs it is
/// held against. Set from the stage's flags (`kd-experiment` passes them); not part of the
/// freshness key, so relabelling a run does not retrain it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct RunRecord {
    /// The study this run belongs to: the seeds of `just compare` (every variant, every label
    /// count) or the grid of `just sweep`.
    #[arg(long, value_enum, hide = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study: Option<Study>,
    /// The experiment variant this run belongs to ("" for the pipeline's own settings; e.g.
    /// `aug`, `views8`, `labels-5000`, `f16`).
    #[arg(long, default_value = "", hide = true)]
    #[serde(default)]
    pub variant: String,
    /// The run this one is held against as its control, as a folder under the pipeline's
    /// artifacts (e.g. `runs/seed-0/student-baseline`).
    #[arg(long, hide = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
    /// A second run this one changes one thing of (e.g. 8-view KD against single-view KD).
    #[arg(long, hide = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// The kinds of experiment a run can belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Study {
    /// Seeds × variants, each KD run held against its control (`just compare`).
    Seeds,
    /// A grid of KD settings from one knowledge file (`just sweep`).
    Sweep,
}

impl crate::Manifest {
    /// The metrics as a training stage's record; an error names the manifest.
    pub fn training(&self) -> Result<TrainRecord, TrainError> {
        self.metrics_as("a training stage's")
    }

    /// The settings as `T` (a stage's settings record).
    pub fn settings_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, TrainError> {
        serde_json::from_value(self.settings.clone()).map_err(|e| {
            TrainError::Other(format!(
                "the manifest of {} ({}) holds other settings: {e}",
                self.stage, self.pipeline
            ))
        })
    }

    /// The metrics as the export stage's record.
    pub fn export(&self) -> Result<ExportRecord, TrainError> {
        self.metrics_as("the export stage's")
    }

    /// The metrics as the precompute stage's record.
    pub fn knowledge(&self) -> Result<KnowledgeRecord, TrainError> {
        self.metrics_as("the precompute stage's")
    }

    fn metrics_as<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<T, TrainError> {
        serde_json::from_value(self.metrics.clone()).map_err(|e| {
            TrainError::Other(format!(
                "the manifest of {} ({}) does not hold {what} metrics: {e}",
                self.stage, self.pipeline
            ))
        })
    }
}
