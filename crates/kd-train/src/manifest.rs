//! Run manifests (`manifest.json` next to a stage's outputs): what was run, on what, with which
//! result. A manifest whose key matches and whose outputs are intact makes a stage skippable.

use crate::TrainError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub pipeline: String,
    /// SHA-256 over the stage, its resolved settings and its inputs' hashes.
    pub key: String,
    pub settings: serde_json::Value,
    /// Input name → content hash (dataset fingerprints, checkpoint and knowledge SHA-256).
    pub inputs: BTreeMap<String, String>,
    /// Output file (relative to the manifest) → SHA-256.
    pub outputs: BTreeMap<String, String>,
    pub seed: Option<u64>,
    /// Where the run sits in an experiment (variant, control); not part of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<crate::RunRecord>,
    pub threads: usize,
    /// Where it computed: `cpu`, or the GPU by model and driver ([`crate::device`]).
    #[serde(default = "crate::device::cpu")]
    pub device: String,
    pub version: String,
    pub wall_seconds: f64,
    /// Stage-specific numbers: per-epoch metrics, accuracies, throughput.
    pub metrics: serde_json::Value,
}

/// The freshness key of a stage run.
pub fn stage_key(
    stage: &str,
    settings: &serde_json::Value,
    inputs: &BTreeMap<String, String>,
) -> String {
    let doc = serde_json::json!({ "stage": stage, "settings": settings, "inputs": inputs });
    let mut h = Sha256::new();
    h.update(kd_data::files::canonical_json(&doc).as_bytes());
    kd_data::files::hex(&h.finalize())
}

impl Manifest {
    /// A manifest of `stage` run by this build on this machine; the caller fills in the rest
    /// (`Manifest { settings, metrics, ..Manifest::start(...) }`) and `write` hashes the outputs.
    pub fn start(stage: &str, pipeline: &str, key: String) -> Self {
        Self {
            stage: stage.to_string(),
            pipeline: pipeline.to_string(),
            key,
            settings: serde_json::Value::Null,
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            seed: None,
            run: None,
            threads: candle_core::utils::get_num_threads(),
            device: crate::device::opened(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            wall_seconds: 0.0,
            metrics: serde_json::Value::Null,
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST)
    }

    /// The manifest of one of several runs sharing a folder: `<dir>/<name>.manifest.json`.
    pub fn named(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.{MANIFEST}"))
    }

    pub fn read(dir: &Path) -> Result<Self, TrainError> {
        Self::read_at(&Self::path(dir))
    }

    /// Reads the manifest file `path` (its outputs are relative to its folder).
    pub fn read_at(path: &Path) -> Result<Self, TrainError> {
        let path = path.to_path_buf();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| TrainError::file(&path, format!("cannot read: {e}")))?;
        serde_json::from_str(&text)
            .map_err(|e| TrainError::file(&path, format!("not a manifest: {e}")))
    }

    /// Writes `manifest.json` atomically, after hashing the listed outputs.
    pub fn write(self, dir: &Path, outputs: &[&str]) -> Result<Self, TrainError> {
        self.write_at(&Self::path(dir), outputs)
    }

    /// Writes the manifest file `path` atomically, after hashing the listed outputs (relative
    /// to its folder).
    pub fn write_at(mut self, path: &Path, outputs: &[&str]) -> Result<Self, TrainError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        self.outputs = outputs
            .iter()
            .map(|f| Ok((f.to_string(), kd_data::sha256_file(&dir.join(f))?)))
            .collect::<Result<_, TrainError>>()?;
        let text =
            serde_json::to_string_pretty(&self).map_err(|e| TrainError::Other(e.to_string()))?;
        kd_data::write_atomic_bytes(path, (text + "\n").as_bytes())?;
        Ok(self)
    }

    /// Why the stage in `dir` must run for `key` (`None`: it is up to date): no previous run,
    /// outputs changed since, or which inputs and settings differ.
    pub fn staleness(
        dir: &Path,
        key: &str,
        settings: &serde_json::Value,
        inputs: &BTreeMap<String, String>,
    ) -> Option<String> {
        Self::staleness_at(&Self::path(dir), key, settings, inputs)
    }

    /// [`Manifest::staleness`] of the manifest file `path`.
    pub fn staleness_at(
        path: &Path,
        key: &str,
        settings: &serde_json::Value,
        inputs: &BTreeMap<String, String>,
    ) -> Option<String> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let Ok(m) = Self::read_at(path) else {
            return Some("no previous run".into());
        };
        if m.key == key {
            return match m.outputs.iter().find(|(f, h)| {
                kd_data::sha256_file(&dir.join(f)).ok().as_deref() != Some(h.as_str())
            }) {
                Some((f, _)) => Some(format!(
                    "its output {f} was changed or removed since it was written"
                )),
                None if m.outputs.is_empty() => Some("the previous run recorded no outputs".into()),
                None => None,
            };
        }
        let mut why = Vec::new();
        for (name, hash) in inputs {
            match m.inputs.get(name) {
                Some(old) if old == hash => {}
                Some(old) => why.push(format!(
                    "input {name} changed ({} → {})",
                    short(old),
                    short(hash)
                )),
                None => why.push(format!("new input {name}")),
            }
        }
        why.extend(
            m.inputs
                .keys()
                .filter(|k| !inputs.contains_key(*k))
                .map(|k| format!("input {k} is gone")),
        );
        let mut paths = Vec::new();
        json_diff("", &m.settings, settings, &mut paths);
        why.extend(
            paths
                .into_iter()
                .take(8)
                .map(|p| format!("setting {p} changed")),
        );
        if why.is_empty() {
            why.push("the stage's definition changed".into());
        }
        if why.len() > 4 {
            let more = why.len() - 4;
            why.truncate(4);
            why.push(format!("and {more} more"));
        }
        Some(why.join("; "))
    }

    /// The manifest in `dir` if it was made with `key` and its outputs are still as written.
    pub fn fresh(dir: &Path, key: &str) -> Option<Self> {
        let m = Self::read(dir).ok()?;
        let intact = m
            .outputs
            .iter()
            .all(|(f, h)| kd_data::sha256_file(&dir.join(f)).ok().as_deref() == Some(h));
        (m.key == key && intact && !m.outputs.is_empty()).then_some(m)
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Paths (`a.b.c`) where two JSON values differ.
fn json_diff(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                json_diff(
                    &p,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(format!("{path} ({a} → {b})")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_only_with_same_key_and_intact_outputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.bin"), b"weights").unwrap();
        let settings = serde_json::json!({"epochs": 1});
        let inputs = BTreeMap::from([("data".to_string(), "abc".to_string())]);
        let key = stage_key("teacher", &settings, &inputs);
        let m = Manifest {
            settings,
            inputs,
            ..Manifest::start("teacher", "p", key.clone())
        };
        m.write(dir.path(), &["model.bin"]).unwrap();
        assert!(Manifest::fresh(dir.path(), &key).is_some());
        assert!(Manifest::fresh(dir.path(), "other").is_none());
        std::fs::write(dir.path().join("model.bin"), b"changed").unwrap();
        assert!(Manifest::fresh(dir.path(), &key).is_none());
        let other = stage_key(
            "teacher",
            &serde_json::json!({"epochs": 2}),
            &BTreeMap::new(),
        );
        assert_ne!(key, other);
        // Why a stage runs, in words.
        std::fs::write(dir.path().join("model.bin"), b"weights").unwrap();
        let m = Manifest::read(dir.path()).unwrap();
        assert_eq!(
            Manifest::staleness(dir.path(), &m.key, &m.settings, &m.inputs),
            None
        );
        let new_inputs = BTreeMap::from([("data".to_string(), "abd".to_string())]);
        let why = Manifest::staleness(
            dir.path(),
            "k2",
            &serde_json::json!({"epochs": 3}),
            &new_inputs,
        )
        .unwrap();
        assert!(
            why.contains("input data changed") && why.contains("setting epochs (1 → 3)"),
            "{why}"
        );
        std::fs::remove_file(dir.path().join("model.bin")).unwrap();
        let why = Manifest::staleness(dir.path(), &m.key, &m.settings, &m.inputs).unwrap();
        assert!(why.contains("model.bin was changed or removed"), "{why}");
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            Manifest::staleness(empty.path(), "k", &m.settings, &m.inputs).as_deref(),
            Some("no previous run")
        );
    }
}
