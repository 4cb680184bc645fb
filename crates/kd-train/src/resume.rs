//! The resume state a training stage writes at the end of every epoch (`resume.safetensors`):
//! weights, Adam's moments and step, the dropout stream's position, the epoch and the metrics so
//! far — everything an interrupted run needs to finish bit-identical to one never interrupted.
//! (Shuffles and augmentation are drawn per (seed, epoch), so they need no state.)

use crate::metrics::FitReport;
use crate::optim::AdamState;
use crate::TrainError;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const RESUME_FILE: &str = "resume.safetensors";
const METADATA_KEY: &str = "kd_resume";

/// Where a run stands after a complete epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The stage's freshness key: a state made under other settings or inputs is not resumed.
    pub key: String,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimiser steps taken (the learning-rate schedule's position).
    pub step: usize,
    /// The dropout stream's word position, as a decimal string (a u128).
    pub dropout_word_pos: String,
    pub train_seconds: f64,
    pub report: FitReport,
}

/// A saved state: progress, weights by variable name, Adam's state.
pub struct ResumeState {
    pub progress: Progress,
    pub weights: HashMap<String, Tensor>,
    pub adam: AdamState,
}

/// Writes the state atomically.
pub fn save(
    path: &Path,
    progress: &Progress,
    weights: &HashMap<String, Tensor>,
    adam: &AdamState,
) -> Result<(), TrainError> {
    let mut tensors: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(k, v)| (format!("weights/{k}"), v.clone()))
        .collect();
    for (name, m, v) in &adam.moments {
        tensors.push((
            format!("adam.m/{name}"),
            Tensor::new(m.as_slice(), &Device::Cpu)?,
        ));
        tensors.push((
            format!("adam.v/{name}"),
            Tensor::new(v.as_slice(), &Device::Cpu)?,
        ));
    }
    let mut meta = serde_json::to_value(progress).map_err(|e| TrainError::Other(e.to_string()))?;
    meta["adam_step"] = serde_json::json!(adam.step);
    let info = HashMap::from([(
        METADATA_KEY.to_string(),
        kd_data::files::canonical_json(&meta),
    )]);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(info))
        .map_err(|e| TrainError::file(path, e.to_string()))?;
    kd_data::write_atomic_bytes(path, &bytes)?;
    Ok(())
}

/// Reads a state written by [`save`].
pub fn load(path: &Path) -> Result<ResumeState, TrainError> {
    let bad = |m: String| {
        TrainError::file(
            path,
            format!("not a usable resume state: {m} (delete it, or pass --force to start over)"),
        )
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| bad("no metadata".into()))?;
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let adam_step = value["adam_step"]
        .as_u64()
        .ok_or_else(|| bad("no adam_step".into()))?;
    let progress: Progress = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    drop(st);
    let mut weights = HashMap::new();
    let mut m = HashMap::new();
    let mut v = HashMap::new();
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix("weights/") {
            weights.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("adam.m/") {
            m.insert(
                n.to_string(),
                t.to_vec1::<f32>().map_err(|e| bad(e.to_string()))?,
            );
        } else if let Some(n) = name.strip_prefix("adam.v/") {
            v.insert(
                n.to_string(),
                t.to_vec1::<f32>().map_err(|e| bad(e.to_string()))?,
            );
        }
    }
    let mut names: Vec<String> = m.keys().cloned().collect();
    names.sort();
    let moments = names
        .into_iter()
        .map(|n| {
            let vm = v
                .remove(&n)
                .ok_or_else(|| bad(format!("no second moment for {n}")))?;
            let mm = m.remove(&n).unwrap_or_default();
            Ok((n, mm, vm))
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    Ok(ResumeState {
        progress,
        weights,
        adam: AdamState {
            step: adam_step,
            moments,
        },
    })
}
