//! Datasets for the distillation pipeline.
//!
//! Images are kept as raw bytes (`u8`, NCHW) in one buffer per split, verified on load, and turned
//! into one normalised `f32` tensor from which batches are taken with `index_select`. Everything
//! random (the validation split, shuffling, augmentation) comes from seeded ChaCha streams, so a
//! run is reproducible; candle's own CPU RNG cannot be seeded.

pub mod batch;
pub mod cifar;
pub mod dataset;
pub mod fashion_mnist;
pub mod files;
pub mod idx;
pub mod image_folder;
pub mod image_set;
pub mod labels;
pub mod photos;
pub mod rng;

pub use batch::{choose_view, Augment, Batch, Batches, StoredViews, View};
pub use dataset::{DataFormat, DataSource, Dataset, ImageSet, LoadOptions, Normalization, Split};
pub use files::{sha256_file, write_atomic, write_atomic_bytes};
pub use image_folder::{FolderOptions, SourceImage};

use std::path::PathBuf;

/// Everything that can go wrong while finding, reading or checking a dataset.
/// Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: checksum mismatch: {message}")]
    Checksum { path: PathBuf, message: String },
    #[error("dataset folder {dir}: {message}")]
    Missing { dir: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
