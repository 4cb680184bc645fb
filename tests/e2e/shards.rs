//! Sharded precompute, in process: any split, merged, is the single-process knowledge file byte
//! for byte; shards are idempotent; merge refuses what does not add up, naming the files.

use crate::fixture::{self, copy_upstream, smoke_pipeline};
use clap::Parser;
use kd_precompute::{Output, KNOWLEDGE_FILE};
use std::path::{Path, PathBuf};

fn args(sub: Option<&str>, root: &Path, extra: &[&str]) -> kd_precompute::Args {
    let mut v: Vec<String> = vec!["kd-precompute".into()];
    v.extend(sub.map(String::from));
    v.extend([
        "--pipeline".into(),
        smoke_pipeline().display().to_string(),
        "--artifacts".into(),
        root.display().to_string(),
    ]);
    v.extend(extra.iter().map(|s| s.to_string()));
    kd_precompute::Args::try_parse_from(v).unwrap()
}

/// Computes one shard; whether it was skipped as already there.
fn shard(root: &Path, spec: &str, extra: &[&str]) -> bool {
    let mut a = vec!["--shard", spec];
    a.extend_from_slice(extra);
    match kd_precompute::run(&args(None, root, &a)).unwrap() {
        Output::Shard { skipped, path } => {
            assert!(path.is_file());
            skipped
        }
        Output::Knowledge(_) => panic!("--shard {spec} wrote the knowledge file"),
    }
}

fn merge(root: &Path, extra: &[&str]) -> anyhow::Result<kd_train::Manifest> {
    kd_precompute::run(&args(Some("merge"), root, extra))?.into_manifest()
}

/// The fixture's teacher, without its knowledge.
fn teacher_only() -> tempfile::TempDir {
    let root = copy_upstream(fixture::run());
    std::fs::remove_dir_all(knowledge_dir(root.path())).unwrap();
    root
}

fn knowledge_dir(root: &Path) -> PathBuf {
    root.join("smoke").join("knowledge")
}

fn shard_path(root: &Path, i: usize, n: usize) -> PathBuf {
    knowledge_dir(root)
        .join("shards")
        .join(format!("shard-{i:05}-of-{n:05}.safetensors"))
}

/// 600 rows in batches of 128 are 5 batches, so 7 shards are more shards than batches (two of
/// them are empty).
#[test]
fn merged_shards_are_the_single_process_file_byte_for_byte() {
    let run = fixture::run();
    let whole = std::fs::read(run.dir("knowledge").join(KNOWLEDGE_FILE)).unwrap();
    for n in [1usize, 2, 3, 7] {
        let root = teacher_only();
        let r = root.path();
        for i in 0..n {
            assert!(!shard(r, &format!("{i}/{n}"), &[]));
        }
        let m = merge(r, &[]).unwrap();
        assert_eq!(m.metrics["shards"], n);
        assert_eq!(m.metrics["rows"], 600);
        let merged = std::fs::read(knowledge_dir(r).join(KNOWLEDGE_FILE)).unwrap();
        assert!(merged == whole, "{n} shards: the merged file differs");
        // What a later `just pipeline` sees: the knowledge stage is up to date, and verifies.
        kd_precompute::run(&args(Some("verify"), r, &[])).unwrap();
        assert_eq!(m.key, run.knowledge.key);
    }
}

/// Shards hold full f32 rows; the merge writes the file's compact storage with the same writer
/// as one process, so a sharded top-3 f16 file is the single-process one byte for byte.
#[test]
fn merged_shards_of_a_compact_file_are_the_single_process_file() {
    let compact = ["--top-k", "3", "--dtype", "f16"];
    let single = teacher_only();
    let mut whole_args = vec!["--no-shard"];
    whole_args.extend_from_slice(&compact);
    kd_precompute::run(&args(None, single.path(), &whole_args)).unwrap();
    let whole = std::fs::read(knowledge_dir(single.path()).join(KNOWLEDGE_FILE)).unwrap();
    let root = teacher_only();
    let r = root.path();
    for i in 0..2 {
        shard(r, &format!("{i}/2"), &compact);
    }
    let m = merge(r, &compact).unwrap();
    assert_eq!(m.metrics["storage"], "top-3 f16");
    let merged = std::fs::read(knowledge_dir(r).join(KNOWLEDGE_FILE)).unwrap();
    assert!(merged == whole, "the merged compact file differs");
    // And differs from the f32 file: the options were applied.
    let f32_file = std::fs::read(fixture::run().dir("knowledge").join(KNOWLEDGE_FILE)).unwrap();
    assert!(merged.len() < f32_file.len() / 2);
}

#[test]
fn shards_are_idempotent_and_merge_refuses_what_does_not_add_up() {
    let root = teacher_only();
    let r = root.path();
    let k = knowledge_dir(r).join(KNOWLEDGE_FILE);
    shard(r, "0/3", &[]);
    shard(r, "2/3", &[]);
    let e = format!("{:#}", merge(r, &[]).unwrap_err());
    assert!(
        e.contains("missing shard 1 of 3") && e.contains("shard-00001-of-00003.safetensors"),
        "{e}"
    );
    assert!(!k.exists(), "a refused merge writes nothing");

    // A rerun of a finished shard is skipped and leaves the file as it was.
    assert!(!shard(r, "1/3", &[]));
    let before = std::fs::read(shard_path(r, 1, 3)).unwrap();
    assert!(shard(r, "1/3", &[]));
    assert!(std::fs::read(shard_path(r, 1, 3)).unwrap() == before);

    // A damaged shard is named by merge, and recomputed by a rerun.
    let p2 = shard_path(r, 2, 3);
    let good = std::fs::read(&p2).unwrap();
    let mut bad = good.clone();
    let header = u64::from_le_bytes(bad[..8].try_into().unwrap()) as usize;
    bad[8 + header] ^= 1;
    std::fs::write(&p2, &bad).unwrap();
    let e = format!("{:#}", merge(r, &[]).unwrap_err());
    assert!(
        e.contains("shard-00002-of-00003") && e.contains("checksum mismatch"),
        "{e}"
    );
    assert!(!shard(r, "2/3", &[]));
    assert!(
        std::fs::read(&p2).unwrap() == good,
        "a shard's bytes depend only on its inputs"
    );

    // Shards of another split in the same folder: merge asks which one.
    shard(r, "0/2", &[]);
    let e = format!("{:#}", merge(r, &[]).unwrap_err());
    assert!(
        e.contains("2 different splits") && e.contains("--shards N"),
        "{e}"
    );

    // A shard made for other data, under the right name: refused, naming the shard and field.
    let other = teacher_only();
    shard(other.path(), "0/3", &["--set", "data.train_limit=500"]);
    let p0 = shard_path(r, 0, 3);
    let kept = std::fs::read(&p0).unwrap();
    std::fs::copy(shard_path(other.path(), 0, 3), &p0).unwrap();
    let e = format!("{:#}", merge(r, &["--shards", "3"]).unwrap_err());
    assert!(
        e.contains("shard-00000-of-00003")
            && e.contains("dataset.rows is 500 in the shard but 600"),
        "{e}"
    );
    std::fs::write(&p0, kept).unwrap();

    // A killed task's temporary file is ignored (and reported).
    std::fs::write(
        knowledge_dir(r).join("shards/.shard-00001-of-00003.safetensors.tmp-4242"),
        b"half a file",
    )
    .unwrap();
    merge(r, &["--shards", "3"]).unwrap();
    let whole = std::fs::read(fixture::run().dir("knowledge").join(KNOWLEDGE_FILE)).unwrap();
    assert!(std::fs::read(&k).unwrap() == whole);
}
