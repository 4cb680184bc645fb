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
//!
//! Format version 2 (written by `kd-precompute --views K`, K ≥ 2) stores K views per row: view 0
//! is the image as it is, views 1.. are augmented views the student can replay exactly:
//! - `logits.<head>`: `[N, K, C]` f32, the teacher's logits for every view;
//! - `views`: `[N, K, 5]` i32, each view's parameters (`kd_data::View::to_ints`: shift `dx, dy, 0,
//!   0, flip` or crop `x, y, w, h, flip`; row 0 of each image is the identity);
//! - metadata `views`: `{count, augment, seed}` — K, the augmentation that drew them, its seed.
//!
//! Version 1 files (one view) are read as before.
//!
//! Format version 3 (written when only some training rows carry a label, `data.labels`) is
//! version 1 or 2 plus a label mask: `labelled` `[N]` u8, 1 where the row carries a label, and
//! metadata `dataset.labelled` `{rows, fingerprint}` (how many, and `kd_data::labels::
//! mask_fingerprint` of the mask). The labels of the other rows are stored as 0 and mean nothing:
//! those rows are the unlabelled transfer set, known to the student through the logits alone.
//!
//! Compact storage (either version, metadata `storage`, see [`compact`]): logits in f16
//! (`{"dtype": "f16"}`), and/or only the top k per row (`{"dtype": …, "top_k": k}`: `logits.<head>`
//! holds the k largest, `classes.<head>` `[…, k]` u16 their classes, `rest.<head>` one logit for
//! every other class). Readers get full `[…, C]` f32 rows back either way.

pub mod compact;

use candle_core::{Device, Tensor};
pub use compact::{LogitDtype, LogitStorage};
use kd_data::Normalization;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
/// The version of files with several views per row.
pub const FORMAT_VERSION_VIEWS: u32 = 2;
/// The version of files whose rows do not all carry a label (one view or several).
pub const FORMAT_VERSION_LABELLED: u32 = 3;
pub const VIEWS: &str = "views";
/// The label mask of a version 3 file.
pub const LABELLED: &str = "labelled";
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
    /// Which rows carry a label, when not all do (format version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled: Option<LabelledRef>,
}

/// The label mask of a knowledge file whose rows do not all carry a label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelledRef {
    /// How many rows carry a label.
    pub rows: usize,
    /// `kd_data::labels::mask_fingerprint` of the mask.
    pub fingerprint: String,
}

impl DatasetRef {
    /// The training split of a dataset, with its label mask when not every row carries a label.
    pub fn training(
        name: &str,
        classes: usize,
        fingerprint: &str,
        rows: usize,
        mask: Option<&[u8]>,
    ) -> Self {
        Self {
            name: name.to_string(),
            split: "train".into(),
            rows,
            classes,
            fingerprint: fingerprint.to_string(),
            labelled: mask.map(|m| LabelledRef {
                rows: m.iter().filter(|&&x| x == 1).count(),
                fingerprint: kd_data::labels::mask_fingerprint(m),
            }),
        }
    }

    /// The first field in which `self` differs from `expected`: its name, `self`'s value and
    /// `expected`'s.
    pub fn first_difference(
        &self,
        expected: &DatasetRef,
    ) -> Option<(&'static str, String, String)> {
        let (m, e) = (self, expected);
        [
            ("dataset.name", m.name.clone(), e.name.clone()),
            ("dataset.split", m.split.clone(), e.split.clone()),
            ("dataset.rows", m.rows.to_string(), e.rows.to_string()),
            (
                "dataset.classes",
                m.classes.to_string(),
                e.classes.to_string(),
            ),
            (
                "dataset.fingerprint",
                m.fingerprint.clone(),
                e.fingerprint.clone(),
            ),
            (
                "dataset.labelled",
                labelled_text(&m.labelled),
                labelled_text(&e.labelled),
            ),
        ]
        .into_iter()
        .find(|(_, found, want)| found != want)
    }
}

fn labelled_text(l: &Option<LabelledRef>) -> String {
    match l {
        None => "every row".into(),
        Some(l) => format!(
            "{} rows (mask {})",
            l.rows,
            &l.fingerprint[..l.fingerprint.len().min(12)]
        ),
    }
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
    /// Several views per row (format version 2); absent in version 1 files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<ViewsMeta>,
    /// Compact logits (f16, top-k); absent: full f32 rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<LogitStorage>,
}

/// The stored views of a version 2 file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewsMeta {
    /// Views per row, K ≥ 2 (view 0 is the image as it is).
    pub count: usize,
    /// The augmentation views 1.. were drawn with.
    pub augment: kd_data::Augment,
    /// Its seed: view j of row r is `augment.view(seed, j, r, ...)`.
    pub seed: u64,
}

impl Metadata {
    /// Views per row: 1 for a version 1 file.
    pub fn view_count(&self) -> usize {
        self.views.as_ref().map_or(1, |v| v.count)
    }

    /// How the logits are stored (full f32 rows when the file does not say).
    pub fn storage(&self) -> LogitStorage {
        self.storage.unwrap_or_default()
    }

    /// A top-k needs 1 ≤ k < C (and C small enough for u16 classes); full f32 is written by
    /// leaving `storage` out.
    fn check_storage(&self) -> std::result::Result<(), String> {
        let c = self.dataset.classes;
        match self.storage {
            Some(s) if s.is_full_f32() => {
                Err("full f32 storage is written by leaving `storage` out".into())
            }
            Some(LogitStorage {
                top_k: Some(k), ..
            }) if k == 0 || k >= c || c > 1 << 16 => Err(format!(
                "top_k {k} is not between 1 and {} (classes - 1) or there are more than 65,536 classes",
                c.saturating_sub(1)
            )),
            _ => Ok(()),
        }
    }
}

pub use kd_data::files::canonical_json;

/// What a knowledge file holds per row besides the logits.
#[derive(Debug, Clone, Copy)]
pub struct RowData<'a> {
    /// The dataset's labels (0 for rows without one).
    pub labels: &'a [u32],
    /// 1 where the row carries a label, when not all do (format version 3).
    pub labelled: Option<&'a [u8]>,
    /// `rows × K` view parameters, row-major, for a multi-view file.
    pub views: Option<&'a [kd_data::View]>,
}

/// Writes a knowledge file atomically. `logits` holds one `[rows, classes]` row-major buffer per
/// head, in the order of `meta.heads`.
pub fn write(path: &Path, meta: &Metadata, logits: &[Vec<f32>], labels: &[u32]) -> Result<()> {
    write_rows(
        path,
        meta,
        logits,
        RowData {
            labels,
            labelled: None,
            views: None,
        },
    )
}

/// Writes a multi-view knowledge file (format version 2) atomically: `logits` holds one
/// `[rows, K, classes]` buffer per head, `views` the `rows × K` view parameters, row-major.
pub fn write_views(
    path: &Path,
    meta: &Metadata,
    logits: &[Vec<f32>],
    labels: &[u32],
    views: &[kd_data::View],
) -> Result<()> {
    write_rows(
        path,
        meta,
        logits,
        RowData {
            labels,
            labelled: None,
            views: Some(views),
        },
    )
}

/// Writes any knowledge file atomically: `logits` holds one `[rows, K, classes]` buffer per
/// head (K = 1 without views), `rows` the labels, the label mask and the views the metadata
/// says the file has.
pub fn write_rows(path: &Path, meta: &Metadata, logits: &[Vec<f32>], rows: RowData) -> Result<()> {
    let (n, k, c) = (meta.dataset.rows, meta.view_count(), meta.dataset.classes);
    if let Some(why) = layout_error(meta) {
        return Err(invalid(path, why));
    }
    if rows.views.map(<[_]>::len) != meta.views.as_ref().map(|_| n * k) {
        return Err(invalid(
            path,
            format!(
                "{n}x{k} views expected, got {}",
                rows.views.map_or(0, <[_]>::len)
            ),
        ));
    }
    check_buffers(path, &meta.heads, n, k * c, logits, rows.labels)?;
    check_mask(path, meta, rows.labelled)?;
    meta.check_storage().map_err(|m| invalid(path, m))?;
    let lead: Vec<usize> = if meta.views.is_some() {
        vec![n, k]
    } else {
        vec![n]
    };
    let mut tensors = head_tensors(&meta.storage(), &meta.heads, &lead, c, logits);
    if let Some(views) = rows.views {
        let ints: Vec<i32> = views.iter().flat_map(|v| v.to_ints()).collect();
        tensors.push((
            VIEWS.to_string(),
            vec![n, k, 5],
            Dtype::I32,
            ints.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    if let Some(mask) = rows.labelled {
        tensors.push((LABELLED.to_string(), vec![n], Dtype::U8, mask.to_vec()));
    }
    let json = serde_json::to_value(meta).map_err(|e| invalid(path, e.to_string()))?;
    serialize(path, METADATA_KEY, &json, tensors, rows.labels, |bytes| {
        Ok(KnowledgeFile::from_bytes(path, bytes)?.into_bytes())
    })
}

/// Why the metadata's version, views and label mask do not go together (`None`: they do).
/// Version 1: one view, every row labelled; 2: K ≥ 2 views, every row labelled; 3: either,
/// with a label mask.
fn layout_error(meta: &Metadata) -> Option<String> {
    let labelled = meta.dataset.labelled.is_some();
    let views = meta.views.as_ref().map(|v| v.count);
    let ok = match (meta.format_version, views) {
        (_, Some(k)) if k < 2 => false,
        (FORMAT_VERSION, None) | (FORMAT_VERSION_VIEWS, Some(_)) => !labelled,
        (FORMAT_VERSION_LABELLED, _) => labelled,
        _ => false,
    };
    (!ok).then(|| {
        format!(
            "format version {} does not go with {} view(s) and {} (version {FORMAT_VERSION}: one view; \
             {FORMAT_VERSION_VIEWS}: two or more; {FORMAT_VERSION_LABELLED}: either, with a label mask)",
            meta.format_version,
            meta.view_count(),
            if labelled { "a label mask" } else { "no label mask" }
        )
    })
}

/// A label mask agrees with the metadata: present exactly when it says so, one 0/1 byte per
/// row, as many ones as it says, with its fingerprint.
fn check_mask(path: &Path, meta: &Metadata, mask: Option<&[u8]>) -> Result<()> {
    let n = meta.dataset.rows;
    let why = match (&meta.dataset.labelled, mask) {
        (None, None) => return Ok(()),
        (None, Some(_)) => "a label mask without dataset.labelled in the metadata".to_string(),
        (Some(_), None) => format!("dataset.labelled is set but there is no `{LABELLED}` tensor"),
        (Some(_), Some(m)) if m.len() != n => format!("{LABELLED} has {} rows, not {n}", m.len()),
        (Some(_), Some(m)) if m.iter().any(|&x| x > 1) => {
            format!("{LABELLED} holds values other than 0 and 1")
        }
        (Some(r), Some(m)) if m.iter().filter(|&&x| x == 1).count() != r.rows => format!(
            "{LABELLED} marks {} labelled rows, the metadata says {}",
            m.iter().filter(|&&x| x == 1).count(),
            r.rows
        ),
        (Some(r), Some(m)) if kd_data::labels::mask_fingerprint(m) != r.fingerprint => {
            format!("{LABELLED} does not match its fingerprint in the metadata")
        }
        _ => return Ok(()),
    };
    Err(invalid(path, why))
}

/// Every head's tensors as `storage` stores them; `lead` is the shape before the class axis.
fn head_tensors(
    storage: &LogitStorage,
    heads: &[String],
    lead: &[usize],
    classes: usize,
    logits: &[Vec<f32>],
) -> Vec<compact::Buffer> {
    heads
        .iter()
        .zip(logits)
        .flat_map(|(h, l)| compact::encode(storage, h, lead, classes, l))
        .collect()
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

/// A knowledge file's or shard's tensors plus `labels` (`[n]` u32) and one metadata entry,
/// serialised, validated by `check` as its reader will, and only then written atomically: an
/// invalid file never replaces a good one. The same inputs always give the same bytes.
fn serialize(
    path: &Path,
    key: &str,
    json: &serde_json::Value,
    mut tensors: Vec<compact::Buffer>,
    labels: &[u32],
    check: impl FnOnce(Vec<u8>) -> Result<Vec<u8>>,
) -> Result<()> {
    tensors.push((
        LABELS.into(),
        vec![labels.len()],
        Dtype::U32,
        u32_bytes(labels),
    ));
    let views = tensors
        .iter()
        .map(|(name, shape, dtype, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| invalid(path, e.to_string()))?;
    let info = HashMap::from([(key.to_string(), canonical_json(json))]);
    let bytes =
        safetensors::serialize(views, Some(info)).map_err(|e| invalid(path, e.to_string()))?;
    let bytes = check(bytes)?;
    kd_data::write_atomic_bytes(path, &bytes)?;
    Ok(())
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(xs: &[u32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Checks every head's logits (`lead` + `[C]` f32 and finite, or as `storage` stores them) and
/// the labels (`[n]` u32, below `c`).
fn check_tensors(
    path: &Path,
    st: &SafeTensors<'_>,
    heads: &[String],
    storage: &LogitStorage,
    lead: &[usize],
    c: usize,
) -> Result<()> {
    let n = lead.first().copied().unwrap_or(0);
    for head in heads {
        compact::check(path, st, storage, head, lead, c)?;
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

/// The `views` tensor of a multi-view file: `[N, K, 5]` i32, every entry a view of the file's
/// augmentation.
fn check_views(path: &Path, st: &SafeTensors<'_>, n: usize, v: &ViewsMeta) -> Result<()> {
    let t = st
        .tensor(VIEWS)
        .map_err(|_| invalid(path, format!("no `{VIEWS}` tensor")))?;
    if t.dtype() != Dtype::I32 || t.shape() != [n, v.count, 5] {
        return Err(invalid(
            path,
            format!(
                "{VIEWS} is {:?} {:?}, expected I32 [{n}, {}, 5]",
                t.dtype(),
                t.shape(),
                v.count
            ),
        ));
    }
    let ints: Vec<i32> = i32s(t.data()).collect();
    if let Some(i) = ints.chunks_exact(5).position(|x| {
        kd_data::View::from_ints([x[0], x[1], x[2], x[3], x[4]], &v.augment).is_none()
    }) {
        return Err(invalid(
            path,
            format!(
                "view {} of row {} is not a view of {:?}",
                i % v.count,
                i / v.count,
                v.augment
            ),
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
        if !matches!(version, Some(v) if (1..=FORMAT_VERSION_LABELLED as u64).contains(&v)) {
            return Err(invalid(format!(
                "format version {} is not supported (this build reads versions 1 to {FORMAT_VERSION_LABELLED})",
                version.map_or("missing".to_string(), |v| v.to_string())
            )));
        }
        let meta: Metadata =
            serde_json::from_str(json).map_err(|e| invalid(format!("bad metadata: {e}")))?;
        let (n, c) = (meta.dataset.rows, meta.dataset.classes);
        meta.check_storage()
            .map_err(|m| invalid(format!("storage: {m}")))?;
        if let Some(why) = layout_error(&meta) {
            return Err(invalid(why));
        }
        let storage = meta.storage();
        match &meta.views {
            None => check_tensors(path, &st, &meta.heads, &storage, &[n], c)?,
            Some(v) => {
                check_tensors(path, &st, &meta.heads, &storage, &[n, v.count], c)?;
                check_views(path, &st, n, v)?;
            }
        }
        let mask = match st.tensor(LABELLED) {
            Ok(t) if t.dtype() != Dtype::U8 => {
                return Err(invalid(format!(
                    "{LABELLED} is {:?}, expected U8",
                    t.dtype()
                )))
            }
            Ok(t) => Some(t.data().to_vec()),
            Err(_) => None,
        };
        check_mask(path, &meta, mask.as_deref())?;
        drop(st);
        Ok(Self {
            path: path.to_path_buf(),
            meta,
            bytes: mmap,
        })
    }

    /// One byte per row, 1 where the row carries a label; `None` when every row does.
    pub fn label_mask(&self) -> Result<Option<Vec<u8>>> {
        if self.meta.dataset.labelled.is_none() {
            return Ok(None);
        }
        Ok(Some(self.view(LABELLED)?.data().to_vec()))
    }

    /// The file's bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        match self.bytes {
            Bytes::Owned(b) => b,
            Bytes::Mapped(m) => m.to_vec(),
        }
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
        let (n, c) = (self.meta.dataset.rows, self.meta.dataset.classes);
        let data = SafeTensors::deserialize(&self.bytes)
            .and_then(|st| compact::decode(&st, &self.meta.storage(), head, c))
            .map_err(|e| KnowledgeError::Invalid {
                path: self.path.clone(),
                message: format!("{}: {e}", logits_name(head)),
            })?;
        Ok(match self.meta.views {
            None => Tensor::from_vec(data, (n, c), device)?,
            Some(ref v) => Tensor::from_vec(data, (n, v.count, c), device)?,
        })
    }

    /// The logits of one head as `[N * K, C]`: view j of row r is row `r * K + j`.
    pub fn logits_flat(&self, head: &str, device: &Device) -> Result<Tensor> {
        let (n, c) = (self.meta.dataset.rows, self.meta.dataset.classes);
        Ok(self
            .logits(head, device)?
            .reshape((n * self.meta.view_count(), c))?)
    }

    /// The stored views, `N * K` of them row-major (empty for a version 1 file).
    pub fn stored_views(&self) -> Result<Vec<kd_data::View>> {
        let Some(v) = &self.meta.views else {
            return Ok(Vec::new());
        };
        let t = self.view(VIEWS)?;
        let ints: Vec<i32> = i32s(t.data()).collect();
        ints.chunks_exact(5)
            .map(|x| {
                kd_data::View::from_ints([x[0], x[1], x[2], x[3], x[4]], &v.augment).ok_or_else(
                    || KnowledgeError::Invalid {
                        path: self.path.clone(),
                        message: "a stored view does not fit its augmentation".into(),
                    },
                )
            })
            .collect()
    }

    pub fn labels(&self) -> Result<Vec<u32>> {
        Ok(u32s(self.view(LABELS)?.data()).collect())
    }

    /// Refuses a file made for other data, naming the first field that differs.
    pub fn check_dataset(&self, expected: &DatasetRef, labels: &[u32]) -> Result<()> {
        if let Some((field, found, want)) = self.meta.dataset.first_difference(expected) {
            return Err(self.mismatch("the dataset", field, found, want));
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

fn i32s(bytes: &[u8]) -> impl Iterator<Item = i32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u32s(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub mod shard;

#[cfg(test)]
mod tests;

pub mod targets;
