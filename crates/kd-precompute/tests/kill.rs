#![allow(clippy::unwrap_used)]
//! A shard task killed with SIGKILL mid-inference leaves no shard behind; rerunning that index
//! and merging gives the single-process knowledge file, byte for byte.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

/// 6,000 training images: each of 3 shards is ~2,000 images, a second or more of inference, so
/// the kill lands while the teacher runs.
const DATA: [&str; 2] = ["--set", "data.train_limit=6000"];

#[test]
fn a_killed_shard_task_rerun_gives_the_same_merged_file() {
    let teacher = teacher_root();
    let whole = whole_file(teacher.path(), &DATA);

    let root = copy_teacher(teacher.path());
    let r = root.path();
    ok(precompute(r, &[&DATA[..], &["--shard", "0/3"]].concat()));
    ok(precompute(r, &[&DATA[..], &["--shard", "2/3"]].concat()));

    // Task 1: killed once the teacher is loaded and inference has begun.
    let mut child = precompute(r, &[&DATA[..], &["--shard", "1/3"]].concat())
        .env("RAYON_NUM_THREADS", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let started = line.contains("precompute: googlenet from");
        seen.push(line);
        if started {
            break;
        }
    }
    // kill -9: Child::kill sends SIGKILL on Unix.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the task was killed, not finished: {status:?}\n{}",
        seen.join("\n")
    );
    assert!(!shard(r, 1, 3).exists(), "a killed task leaves no shard");

    let out = precompute(r, &[&["merge"], &DATA[..]].concat())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("missing shard 1 of 3") && err.contains("shard-00001-of-00003"),
        "{err}"
    );

    // The retry of index 1, and a rerun of the whole array (finished shards are skipped).
    ok(precompute(r, &[&DATA[..], &["--shard", "1/3"]].concat()));
    let again = ok(precompute(r, &[&DATA[..], &["--shard", "0/3"]].concat()));
    assert!(again.contains("skipped"), "{again}");
    ok(precompute(r, &[&["merge"], &DATA[..]].concat()));
    assert!(
        std::fs::read(knowledge(r)).unwrap() == whole,
        "merged file differs from one process's"
    );
    ok(precompute(r, &[&["verify"], &DATA[..]].concat()));
}
