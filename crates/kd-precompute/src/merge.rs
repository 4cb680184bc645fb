//! `kd-precompute merge`: the shards of an array job → the one knowledge file the student reads.
//!
//! Every shard is read back and checked (metadata, shapes, finite logits, checksum), must be for
//! this pipeline's data and teacher and cut with its batch size, and the shards must cover every
//! row exactly once; the file is then written by the same code as a single-process precompute,
//! so it is byte-identical to it.

use crate::{shard_file_name, Job, STAGE};
use kd_knowledge::shard::{merge, Shard};
use kd_train::Manifest;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

pub fn run(job: &Job, count: Option<usize>, started: Instant) -> anyhow::Result<Manifest> {
    let p = &job.pipeline;
    if let Some(m) = p.up_to_date(STAGE, &job.dir, &job.key, &job.settings, &job.inputs) {
        return Ok(m);
    }
    let dir = job.shards_dir();
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        anyhow::anyhow!(
            "no shards to merge: cannot read {} ({e}); run `kd-precompute --shard I/N` for each I first",
            dir.display()
        )
    })?;
    let mut named: BTreeMap<usize, Vec<PathBuf>> = BTreeMap::new();
    let mut leftovers = Vec::new();
    for entry in entries {
        let path = entry?.path();
        match shard_file_name(&path) {
            Some(spec) => named.entry(spec.count).or_default().push(path),
            None => {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                if name.is_some_and(|n| n.starts_with(".shard-") && n.contains(".tmp-")) {
                    leftovers.push(path);
                }
            }
        }
    }
    if !leftovers.is_empty() {
        tracing::warn!(
            "merge: {} temporary file(s) left by killed tasks (safe to delete): {}",
            leftovers.len(),
            leftovers
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let count = match count {
        Some(n) => n,
        None => match named.keys().copied().collect::<Vec<_>>()[..] {
            [] => anyhow::bail!("no shard files (shard-IIIII-of-NNNNN.safetensors) in {}", dir.display()),
            [n] => n,
            ref several => anyhow::bail!(
                "{} holds the shards of {} different splits ({}); pass --shards N to merge one of them",
                dir.display(),
                several.len(),
                several
                    .iter()
                    .map(|n| format!("{n}-way: {} file(s)", named[n].len()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let paths = named.remove(&count).unwrap_or_default();
    for (n, others) in &named {
        tracing::info!(
            "merge: ignoring {} shard file(s) of a {n}-way split",
            others.len()
        );
    }
    let shards = paths
        .iter()
        .map(|p| Shard::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!(
        "merge: {} shard file(s) of a {count}-way split in {}",
        shards.len(),
        dir.display()
    );
    let (logits, labels) = merge(&dir, &shards, &job.meta, job.batch_size, count)?;
    anyhow::ensure!(
        labels == job.data.dataset.train.labels,
        "the shards' labels are not this pipeline's training labels"
    );
    job.commit(&logits, None, None, Some(count), started)
}
