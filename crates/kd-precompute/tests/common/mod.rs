//! What the binary tests share: a trained smoke teacher, and the kd-precompute binary run on it.
#![allow(dead_code)]

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn smoke() -> PathBuf {
    workspace().join("pipelines/smoke.toml")
}

/// A fresh artifacts root holding a smoke teacher (trained in process, ~2 s).
pub fn teacher_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let args = kd_teacher::Args::try_parse_from([
        "kd-teacher".to_string(),
        "--pipeline".into(),
        smoke().display().to_string(),
        "--artifacts".into(),
        root.path().display().to_string(),
    ])
    .unwrap();
    kd_teacher::run(&args).unwrap();
    root
}

/// `teacher_root`'s teacher copied into another fresh root.
pub fn copy_teacher(from: &Path) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let to = root.path().join("smoke/teacher");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from.join("smoke/teacher")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    root
}

/// The kd-precompute binary on the smoke pipeline under `root`, outside any job engine's
/// environment.
pub fn precompute(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kd-precompute"));
    let (sub, rest) = match args.first() {
        Some(&s) if s == "merge" || s == "verify" => (Some(s), &args[1..]),
        _ => (None, args),
    };
    c.args(sub)
        .arg("--pipeline")
        .arg(smoke())
        .arg("--artifacts")
        .arg(root)
        .args(rest);
    for v in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_STEP",
        "JOB_COMPLETION_INDEX",
        "AWS_BATCH_JOB_ARRAY_INDEX",
    ] {
        c.env_remove(v);
    }
    c
}

/// Runs it to the end; panics with its output unless it succeeded.
pub fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?} failed:\n{text}");
    text
}

pub fn knowledge(root: &Path) -> PathBuf {
    root.join("smoke/knowledge/soft-targets.safetensors")
}

pub fn shard(root: &Path, i: usize, n: usize) -> PathBuf {
    root.join(format!(
        "smoke/knowledge/shards/shard-{i:05}-of-{n:05}.safetensors"
    ))
}

/// The single-process knowledge file's bytes for `teacher`'s checkpoint, with `data` flags.
pub fn whole_file(teacher: &Path, data: &[&str]) -> Vec<u8> {
    let root = copy_teacher(teacher);
    ok(precompute(root.path(), &[data, &["--no-shard"]].concat()));
    std::fs::read(knowledge(root.path())).unwrap()
}
