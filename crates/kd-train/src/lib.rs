//! What every stage shares: the pipeline file, losses, the optimiser and schedule, the training
//! loop, evaluation, checkpoints, run manifests and the command-line plumbing.

pub mod awake;
pub mod cli;
pub mod config;
pub mod device;
pub mod experiment;
pub mod halves;
pub mod interrupt;
pub mod layout;
pub mod loss;
pub mod manifest;
pub mod metrics;
pub mod optim;
pub mod record;
pub mod resume;
pub mod stage;
pub mod table;
pub mod train;
pub mod trainer;
pub mod verify;

pub use config::{PipelineConfig, TrainSettings};
pub use manifest::Manifest;
pub use record::{KnowledgeRecord, RunRecord, TrainRecord};
pub use stage::{LoadedData, Pipeline, PipelineArgs};
pub use train::{
    evaluate, fit, predict, predict_batches, save_checkpoint, Eval, FitReport, FitSpec, Subset,
};
pub use trainer::{TrainingStage, CHECKPOINT};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Data(#[from] kd_data::DataError),
    #[error(transparent)]
    Model(#[from] kd_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("{0}")]
    Interrupted(String),
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
