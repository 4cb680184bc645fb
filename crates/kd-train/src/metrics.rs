//! What training and evaluation measure: per-epoch metrics, a run's report, an evaluation.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    pub train_loss: f64,
    /// Accuracy of the main head on the (augmented) training batches, dropout on.
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub seconds: f64,
    /// Training images per second (forward, backward and update; validation not counted).
    pub images_per_sec: f64,
    /// Training images seen in the epoch.
    #[serde(default)]
    pub images: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    pub epochs: Vec<EpochMetrics>,
    /// The epoch whose weights were kept (best validation accuracy; the earliest on ties).
    pub best_epoch: usize,
    pub best_val_accuracy: f64,
    pub wall_seconds: f64,
    pub train_images_per_sec: f64,
    /// Optimiser steps per epoch.
    #[serde(default)]
    pub steps_per_epoch: usize,
}

/// Accuracy and mean loss of the main head, in eval mode.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    pub accuracy: f64,
    pub loss: f64,
    pub images: usize,
    pub seconds: f64,
    pub images_per_sec: f64,
}
