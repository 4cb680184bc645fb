//! Shards: the knowledge of one contiguous range of rows, written by one task of an array job
//! (`kd-precompute --shard I/N`), and merged into the one knowledge file the student reads
//! (`kd-precompute merge`).
//!
//! A shard file holds the same tensors as a knowledge file, for its rows only, and a metadata key
//! `kd_knowledge_shard` ([`ShardMeta`]): the metadata of the whole file it is part of, its index,
//! the number of shards, its row range, the batch size and a SHA-256 of its tensors' bytes.
//!
//! Row ranges fall on batch edges, so every batch the teacher sees is the batch a single process
//! sees, and the merged file is byte-identical to the single-process one.

use crate::{
    check_buffers, check_tensors, f32_bytes, f32s, head_tensors, invalid, logits_name, serialize,
    u32_bytes, u32s, KnowledgeError, LogitStorage, Metadata, Result, LABELS,
};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const SHARD_METADATA_KEY: &str = "kd_knowledge_shard";
pub const SHARD_FORMAT_VERSION: u32 = 1;

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl ShardSpec {
    pub fn new(index: usize, count: usize) -> std::result::Result<Self, String> {
        if count == 0 {
            return Err("the number of shards must be at least 1".into());
        }
        if index >= count {
            return Err(format!(
                "shard index {index} is not below the number of shards {count} (indices are 0-based)"
            ));
        }
        Ok(Self { index, count })
    }

    /// The rows of this shard among `rows` rows cut into batches of `batch_size`: the batches are
    /// dealt out in contiguous runs whose lengths differ by at most one. With more shards than
    /// batches some shards are empty.
    pub fn rows(&self, rows: usize, batch_size: usize) -> Range<usize> {
        let batches = rows.div_ceil(batch_size.max(1));
        let first = self.index * batches / self.count;
        let end = (self.index + 1) * batches / self.count;
        (first * batch_size).min(rows)..(end * batch_size).min(rows)
    }

    /// `shard-00002-of-00007.safetensors`: names sort in index order.
    pub fn file_name(&self) -> String {
        format!("shard-{:05}-of-{:05}.safetensors", self.index, self.count)
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for ShardSpec {
    type Err = String;
    /// `I/N`, e.g. `2/7`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not I/N (e.g. 2/7: the third of seven shards)"))?;
        let parse = |x: &str, what: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: {what} {x:?} is not a whole number"))
        };
        Self::new(parse(i, "index")?, parse(n, "count")?)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardMeta {
    pub format_version: u32,
    /// The metadata of the whole knowledge file this shard is part of.
    pub knowledge: Metadata,
    pub shard: ShardSpec,
    /// First row and one past the last row of the training set held here.
    pub start: usize,
    pub end: usize,
    /// The inference batch size the row range was cut with.
    pub batch_size: usize,
    /// SHA-256 of the tensors' bytes: each head's logits in order, then the labels.
    pub sha256: String,
}

impl ShardMeta {
    /// Everything that must match between a shard on disk and the one about to be computed:
    /// all but the checksum. (No timing is stored: a shard's bytes depend only on its inputs.)
    pub fn identity(&self) -> (&Metadata, ShardSpec, usize, usize, usize) {
        (
            &self.knowledge,
            self.shard,
            self.start,
            self.end,
            self.batch_size,
        )
    }
}

fn checksum(logits: &[Vec<f32>], labels: &[u32]) -> String {
    let mut h = Sha256::new();
    for l in logits {
        h.update(f32_bytes(l));
    }
    h.update(u32_bytes(labels));
    kd_data::files::hex(&h.finalize())
}

/// Writes a shard atomically; `meta.sha256` is filled in here.
pub fn write_shard(
    path: &Path,
    meta: &ShardMeta,
    logits: &[Vec<f32>],
    labels: &[u32],
) -> Result<()> {
    let n = meta.end.saturating_sub(meta.start);
    let k = &meta.knowledge;
    check_buffers(path, &k.heads, n, k.dataset.classes, logits, labels)?;
    let meta = ShardMeta {
        sha256: checksum(logits, labels),
        ..meta.clone()
    };
    let json = serde_json::to_value(&meta).map_err(|e| invalid(path, e.to_string()))?;
    // Shards always hold full f32 rows; the merge writes the file's own storage.
    let tensors = head_tensors(
        &LogitStorage::default(),
        &k.heads,
        &[n],
        k.dataset.classes,
        logits,
    );
    serialize(path, SHARD_METADATA_KEY, &json, tensors, labels, |bytes| {
        Shard::from_bytes(path, &bytes)?;
        Ok(bytes)
    })
}

/// A shard read into memory and checked: metadata of a known version, tensors of the declared
/// shape, finite logits, labels below C, and the checksum of the bytes.
#[derive(Debug, Clone)]
pub struct Shard {
    pub path: PathBuf,
    pub meta: ShardMeta,
    /// One `[end - start, C]` buffer per head, in the order of `meta.knowledge.heads`.
    pub logits: Vec<Vec<f32>>,
    pub labels: Vec<u32>,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| invalid(path, format!("cannot read: {e}")))?;
        Self::from_bytes(path, &bytes)
    }

    /// A shard held in memory; `path` only names it in errors. Validated as [`Shard::open`].
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| invalid(path, format!("not a valid safetensors file: {e}")))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| invalid(path, e.to_string()))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(SHARD_METADATA_KEY))
            .ok_or_else(|| {
                invalid(
                    path,
                    format!("no `{SHARD_METADATA_KEY}` metadata: not a shard written by kd-precompute --shard"),
                )
            })?;
        let version = serde_json::from_str::<serde_json::Value>(json)
            .map_err(|e| invalid(path, format!("shard metadata is not JSON: {e}")))?
            .get("format_version")
            .and_then(|v| v.as_u64());
        if version != Some(SHARD_FORMAT_VERSION as u64) {
            return Err(invalid(
                path,
                format!(
                    "shard format version {} is not supported (this build reads version {SHARD_FORMAT_VERSION})",
                    version.map_or("missing".to_string(), |v| v.to_string())
                ),
            ));
        }
        let meta: ShardMeta = serde_json::from_str(json)
            .map_err(|e| invalid(path, format!("bad shard metadata: {e}")))?;
        let rows = meta.knowledge.dataset.rows;
        if meta.start > meta.end || meta.end > rows {
            return Err(invalid(
                path,
                format!(
                    "row range {}..{} is not within the {rows} rows of the dataset",
                    meta.start, meta.end
                ),
            ));
        }
        let (n, c) = (meta.end - meta.start, meta.knowledge.dataset.classes);
        check_tensors(
            path,
            &st,
            &meta.knowledge.heads,
            &LogitStorage::default(),
            &[n],
            c,
        )?;
        let tensor = |name: &str| {
            st.tensor(name)
                .map_err(|e| invalid(path, format!("{name}: {e}")))
        };
        let logits = meta
            .knowledge
            .heads
            .iter()
            .map(|h| Ok(f32s(tensor(&logits_name(h))?.data()).collect()))
            .collect::<Result<Vec<Vec<f32>>>>()?;
        let labels: Vec<u32> = u32s(tensor(LABELS)?.data()).collect();
        let sum = checksum(&logits, &labels);
        if sum != meta.sha256 {
            return Err(invalid(
                path,
                format!(
                    "checksum mismatch: the tensors hash to {sum}, the metadata says {} (a damaged or altered shard; rerun it)",
                    meta.sha256
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            meta,
            logits,
            labels,
        })
    }
}

/// Why shards cannot be merged, each naming the shard files concerned.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("no shards to merge in {0}")]
    Empty(PathBuf),
    #[error("shard {} does not match {what}: {field} is {found} in the shard but {expected} there", path.display())]
    Mismatch {
        path: PathBuf,
        what: String,
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error("missing shard{} {} of {count}: expected {}", if missing.len() > 1 { "s" } else { "" }, list(missing), files(dir, missing, *count))]
    Missing {
        dir: PathBuf,
        missing: Vec<usize>,
        count: usize,
    },
    #[error("{} and {} are both shard {index} of {count}", a.display(), b.display())]
    Duplicate {
        a: PathBuf,
        b: PathBuf,
        index: usize,
        count: usize,
    },
    #[error(transparent)]
    Knowledge(#[from] KnowledgeError),
}

fn list(xs: &[usize]) -> String {
    xs.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn files(dir: &Path, missing: &[usize], count: usize) -> String {
    missing
        .iter()
        .map(|&index| {
            dir.join(ShardSpec { index, count }.file_name())
                .display()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that `shards` (all from `dir`) are the `count` shards of the knowledge described by
/// `expected`, cut with `batch_size` (so together they cover every row exactly once); returns the concatenated
/// logits (one buffer per head) and labels, in row order.
pub fn merge(
    dir: &Path,
    shards: &[Shard],
    expected: &Metadata,
    batch_size: usize,
    count: usize,
) -> std::result::Result<(Vec<Vec<f32>>, Vec<u32>), MergeError> {
    if shards.is_empty() {
        return Err(MergeError::Empty(dir.to_path_buf()));
    }
    for s in shards {
        check_shard(s, expected, batch_size, count)?;
    }
    let sorted = by_index(dir, shards, count)?;
    // Every shard holds exactly the rows its index and count give (checked above), each index
    // is there once, and the ranges of indices 0..count tile 0..rows: every row exactly once.
    let (rows, c) = (expected.dataset.rows, expected.dataset.classes);
    let mut logits = vec![Vec::with_capacity(rows * c); expected.heads.len()];
    let mut labels = Vec::with_capacity(rows);
    for s in &sorted {
        for (out, l) in logits.iter_mut().zip(&s.logits) {
            out.extend_from_slice(l);
        }
        labels.extend_from_slice(&s.labels);
    }
    Ok((logits, labels))
}

/// A shard is for this pipeline's data and teacher, cut with this batch size into `count`
/// shards, and holds exactly the rows its index gives; else the first field that differs.
fn check_shard(
    s: &Shard,
    e: &Metadata,
    batch_size: usize,
    count: usize,
) -> std::result::Result<(), MergeError> {
    let (m, k) = (&s.meta, &s.meta.knowledge);
    let mismatch = |field: &'static str, found: String, want: String| MergeError::Mismatch {
        path: s.path.clone(),
        what: "this pipeline's data and teacher".into(),
        field,
        found,
        expected: want,
    };
    if let Some((field, found, want)) = k.dataset.first_difference(&e.dataset) {
        return Err(mismatch(field, found, want));
    }
    let want = m.shard.rows(e.dataset.rows, batch_size);
    let fields: [(&'static str, String, String); 8] = [
        (
            "teacher.architecture",
            k.teacher.architecture.clone(),
            e.teacher.architecture.clone(),
        ),
        (
            "teacher.checkpoint_sha256",
            k.teacher.checkpoint_sha256.clone(),
            e.teacher.checkpoint_sha256.clone(),
        ),
        ("heads", k.heads.join(", "), e.heads.join(", ")),
        (
            "batch_size",
            m.batch_size.to_string(),
            batch_size.to_string(),
        ),
        (
            "transform",
            format!("{:?}", k.transform),
            format!("{:?}", e.transform),
        ),
        (
            "format_version",
            k.format_version.to_string(),
            e.format_version.to_string(),
        ),
        ("shard count", m.shard.count.to_string(), count.to_string()),
        (
            "row range",
            format!("{}..{}", m.start, m.end),
            format!(
                "{}..{} (shard {} cut with batch {batch_size})",
                want.start, want.end, m.shard
            ),
        ),
    ];
    match fields.into_iter().find(|(_, found, want)| found != want) {
        // A row range that matches is printed without the explanation.
        Some(("row range", _, _)) if (m.start..m.end) == want => Ok(()),
        Some((field, found, want)) => Err(mismatch(field, found, want)),
        None => Ok(()),
    }
}

/// The shards in index order: each of 0..count exactly once.
fn by_index<'a>(
    dir: &Path,
    shards: &'a [Shard],
    count: usize,
) -> std::result::Result<Vec<&'a Shard>, MergeError> {
    let mut slots: Vec<Option<&Shard>> = vec![None; count];
    for s in shards {
        let slot = &mut slots[s.meta.shard.index];
        if let Some(other) = slot {
            return Err(MergeError::Duplicate {
                a: other.path.clone(),
                b: s.path.clone(),
                index: s.meta.shard.index,
                count,
            });
        }
        *slot = Some(s);
    }
    let missing: Vec<usize> = (0..count).filter(|&i| slots[i].is_none()).collect();
    if !missing.is_empty() {
        return Err(MergeError::Missing {
            dir: dir.to_path_buf(),
            missing,
            count,
        });
    }
    Ok(slots.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests;
