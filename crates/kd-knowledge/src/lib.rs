//! The knowledge file: the teacher's logits for every training image, one tensor per head, in
//! one safetensors file — the only thing the student needs from the teacher.
//!
//! Layout (format version 1):
//! - `logits.<head>`: `[N, C]` f32, rows in dataset order, one per teacher head (`main`, `aux1`, ...);
//! - `labels`: `[N]` u32, the dataset's labels, so a reader can check the rows line up;
//! - metadata key `kd_knowledge`: canonical JSON ([`Metadata`]) naming the dataset (name, split,
//!   N, C, fingerprint of the raw bytes), the teacher (architecture, checkpoint SHA-256), the
//!   heads and the transform the logits were computed under.
//!
//! Logits, not probabilities, are stored, so the temperature is chosen at student time.

use candle_core::{Device, Tensor};
use kd_data::Normalization;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
pub const METADATA_KEY: &str = "kd_knowledge";
pub const LABELS: &str = "labels";

pub fn logits_name(head: &str) -> String {
    format!("logits.{head}")
}

#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    #[error("knowledge file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("knowledge file {path} does not match {what}: {field} is {found} in the file but {expected} here")]
    Mismatch {
        path: PathBuf,
        what: &'static str,
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error(transparent)]
    Data(#[from] kd_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, KnowledgeError>;

/// Which data the logits are for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRef {
    pub name: String,
    pub split: String,
    pub rows: usize,
    pub classes: usize,
    /// `kd_data::ImageSet::fingerprint` of exactly these rows.
    pub fingerprint: String,
}

/// Which teacher produced them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherRef {
    pub architecture: String,
    pub checkpoint_sha256: String,
}

/// How the images were presented to the teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transform {
    /// `[channels, height, width]`.
    pub input: [usize; 3],
    pub normalization: Normalization,
    /// `none`: each image as it is (eval mode, no augmentation).
    pub augmentation: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub format_version: u32,
    pub dataset: DatasetRef,
    pub teacher: TeacherRef,
    pub heads: Vec<String>,
    pub transform: Transform,
}

pub use kd_data::files::canonical_json;

/// Writes a knowledge file atomically. `logits` holds one `[rows, classes]` row-major buffer per
/// head, in the order of `meta.heads`.
pub fn write(path: &Path, meta: &Metadata, logits: &[Vec<f32>], labels: &[u32]) -> Result<()> {
    let (n, c) = (meta.dataset.rows, meta.dataset.classes);
    check_buffers(path, &meta.heads, n, c, logits, labels)?;
    let json = serde_json::to_value(meta).map_err(|e| invalid(path, e.to_string()))?;
    serialize(path, METADATA_KEY, &json, &meta.heads, n, c, logits, labels)
}

fn invalid(path: &Path, message: String) -> KnowledgeError {
    KnowledgeError::Invalid {
        path: path.to_path_buf(),
        message,
    }
}

/// `heads.len()` buffers of `n x c` logits and `n` labels, or an error saying what came instead.
fn check_buffers(
    path: &Path,
    heads: &[String],
    n: usize,
    c: usize,
    logits: &[Vec<f32>],
    labels: &[u32],
) -> Result<()> {
    if logits.len() != heads.len() || labels.len() != n || logits.iter().any(|l| l.len() != n * c) {
        return Err(invalid(
            path,
            format!(
                "{} heads of {n}x{c} logits and {n} labels expected, got {} heads and {} labels",
                heads.len(),
                logits.len(),
                labels.len()
            ),
        ));
    }
    Ok(())
}

/// The tensors of a knowledge file or shard (`logits.<head>` `[n, c]` f32, `labels` `[n]` u32) and
/// one metadata entry, serialised and written atomically. The same inputs always give the same bytes.
#[allow(clippy::too_many_arguments)]
fn serialize(
    path: &Path,
    key: &str,
    json: &serde_json::Value,
    heads: &[String],
    n: usize,
    c: usize,
    logits: &[Vec<f32>],
    labels: &[u32],
) -> Result<()> {
    let mut buffers: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = heads
        .iter()
        .zip(logits)
        .map(|(h, l)| (logits_name(h), vec![n, c], Dtype::F32, f32_bytes(l)))
        .collect();
    buffers.push((LABELS.into(), vec![n], Dtype::U32, u32_bytes(labels)));
    let views = buffers
        .iter()
        .map(|(name, shape, dtype, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| invalid(path, e.to_string()))?;
    let info = HashMap::from([(key.to_string(), canonical_json(json))]);
    let bytes =
        safetensors::serialize(views, Some(info)).map_err(|e| invalid(path, e.to_string()))?;
    kd_data::write_atomic_bytes(path, &bytes)?;
    Ok(())
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(xs: &[u32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Checks every head's logits (`[n, c]` f32, finite) and the labels (`[n]` u32, below `c`).
fn check_tensors(
    path: &Path,
    st: &SafeTensors<'_>,
    heads: &[String],
    n: usize,
    c: usize,
) -> Result<()> {
    for head in heads {
        let name = logits_name(head);
        let t = st
            .tensor(&name)
            .map_err(|_| invalid(path, format!("head {head:?} has no tensor {name}")))?;
        if t.dtype() != Dtype::F32 || t.shape() != [n, c] {
            return Err(invalid(
                path,
                format!(
                    "{name} is {:?} {:?}, expected F32 [{n}, {c}]",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        if let Some(i) = f32s(t.data()).position(|x| !x.is_finite()) {
            return Err(invalid(
                path,
                format!(
                    "{name} has a non-finite logit at row {}, class {}",
                    i / c,
                    i % c
                ),
            ));
        }
    }
    let labels = st
        .tensor(LABELS)
        .map_err(|_| invalid(path, format!("no `{LABELS}` tensor")))?;
    if labels.dtype() != Dtype::U32 || labels.shape() != [n] {
        return Err(invalid(
            path,
            format!(
                "{LABELS} is {:?} {:?}, expected U32 [{n}]",
                labels.dtype(),
                labels.shape()
            ),
        ));
    }
    if let Some(i) = u32s(labels.data()).position(|l| l as usize >= c) {
        return Err(invalid(
            path,
            format!("label at row {i} is not below {c} classes"),
        ));
    }
    Ok(())
}

/// A knowledge file, memory-mapped and checked: metadata present and of a known version, every
/// head's logits `[N, C]` f32 and finite, labels `[N]` below C.
pub struct KnowledgeFile {
    pub path: PathBuf,
    pub meta: Metadata,
    bytes: Bytes,
}

/// The file's bytes: memory-mapped from disk, or owned (tests, fuzzing).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for KnowledgeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeFile")
            .field("path", &self.path)
            .field("meta", &self.meta)
            .finish()
    }
}

impl KnowledgeFile {
    pub fn open(path: &Path) -> Result<Self> {
        let invalid = |message: String| KnowledgeError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(|e| invalid(format!("cannot open: {e}")))?;
        // SAFETY: the map is read-only; the pipeline replaces files by rename, never in place, so
        // the mapped file does not change under us.
        #[allow(unsafe_code)]
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| invalid(format!("cannot map: {e}")))?;
        Self::validate(path, Bytes::Mapped(mmap))
    }

    /// A knowledge file held in memory; `path` only names it in errors. Validated as [`open`].
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::validate(path, Bytes::Owned(bytes))
    }

    fn validate(path: &Path, mmap: Bytes) -> Result<Self> {
        let invalid = |message: String| KnowledgeError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| invalid(format!("not a valid safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(&mmap).map_err(|e| invalid(e.to_string()))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| match header.metadata().as_ref().and_then(|m| m.get(shard::SHARD_METADATA_KEY)) {
                Some(_) => invalid(
                    "is one shard of a knowledge file, not the whole file: merge the shards with `kd-precompute merge`".into(),
                ),
                None => invalid(format!(
                    "no `{METADATA_KEY}` metadata (not written by kd-precompute?)"
                )),
            })?;
        let version = serde_json::from_str::<serde_json::Value>(json)
            .map_err(|e| invalid(format!("metadata is not JSON: {e}")))?
            .get("format_version")
            .and_then(|v| v.as_u64());
        if version != Some(FORMAT_VERSION as u64) {
            return Err(invalid(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
                version.map_or("missing".to_string(), |v| v.to_string())
            )));
        }
        let meta: Metadata =
            serde_json::from_str(json).map_err(|e| invalid(format!("bad metadata: {e}")))?;
        check_tensors(
            path,
            &st,
            &meta.heads,
            meta.dataset.rows,
            meta.dataset.classes,
        )?;
        drop(st);
        Ok(Self {
            path: path.to_path_buf(),
            meta,
            bytes: mmap,
        })
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| KnowledgeError::Invalid {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        st.tensor(name).map_err(|e| KnowledgeError::Invalid {
            path: self.path.clone(),
            message: format!("{name}: {e}"),
        })
    }

    /// The logits of one head, `[N, C]` f32.
    pub fn logits(&self, head: &str, device: &Device) -> Result<Tensor> {
        if !self.meta.heads.iter().any(|h| h == head) {
            return Err(KnowledgeError::Invalid {
                path: self.path.clone(),
                message: format!(
                    "has no head {head:?} (it has {})",
                    self.meta.heads.join(", ")
                ),
            });
        }
        let v = self.view(&logits_name(head))?;
        let data: Vec<f32> = f32s(v.data()).collect();
        Ok(Tensor::from_vec(
            data,
            (self.meta.dataset.rows, self.meta.dataset.classes),
            device,
        )?)
    }

    pub fn labels(&self) -> Result<Vec<u32>> {
        Ok(u32s(self.view(LABELS)?.data()).collect())
    }

    /// Refuses a file made for other data, naming the first field that differs.
    pub fn check_dataset(&self, expected: &DatasetRef, labels: &[u32]) -> Result<()> {
        let m = &self.meta.dataset;
        let fields: [(&'static str, String, String); 5] = [
            ("dataset.name", m.name.clone(), expected.name.clone()),
            ("dataset.split", m.split.clone(), expected.split.clone()),
            (
                "dataset.rows",
                m.rows.to_string(),
                expected.rows.to_string(),
            ),
            (
                "dataset.classes",
                m.classes.to_string(),
                expected.classes.to_string(),
            ),
            (
                "dataset.fingerprint",
                m.fingerprint.clone(),
                expected.fingerprint.clone(),
            ),
        ];
        for (field, found, want) in fields {
            if found != want {
                return Err(self.mismatch("the dataset", field, found, want));
            }
        }
        let stored = self.labels()?;
        if let Some(i) = stored.iter().zip(labels).position(|(a, b)| a != b) {
            return Err(self.mismatch(
                "the dataset",
                "labels",
                format!("{} at row {i}", stored[i]),
                labels[i].to_string(),
            ));
        }
        Ok(())
    }

    /// Refuses a file that lacks a head the student wants to learn from.
    pub fn check_heads(&self, wanted: &[String]) -> Result<()> {
        match wanted.iter().find(|h| !self.meta.heads.contains(h)) {
            Some(h) => Err(self.mismatch(
                "the student's settings",
                "heads",
                self.meta.heads.join(", "),
                format!("a head {h:?}"),
            )),
            None => Ok(()),
        }
    }

    fn mismatch(
        &self,
        what: &'static str,
        field: &'static str,
        found: String,
        expected: String,
    ) -> KnowledgeError {
        KnowledgeError::Mismatch {
            path: self.path.clone(),
            what,
            field,
            found,
            expected,
        }
    }
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u32s(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub mod shard;

#[cfg(test)]
mod tests;
