//! Same inputs and seed, same numbers; unchanged inputs, no work.

use crate::fixture::{copy_upstream, run, student, teacher};

fn bytes(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_stage_run_again_from_scratch_gives_identical_weights_and_numbers() {
    let r = run();
    let again = tempfile::tempdir().unwrap();
    let t = teacher(again.path(), &[]).unwrap();
    let ckpt = |root: &std::path::Path, stage: &str| {
        root.join("smoke").join(stage).join("model.safetensors")
    };
    assert!(
        bytes(&ckpt(again.path(), "teacher")) == bytes(&ckpt(r.root.path(), "teacher")),
        "teacher checkpoints differ"
    );
    assert_eq!(
        without_timings(&t.metrics),
        without_timings(&r.teacher.metrics)
    );
    assert_eq!(t.key, r.teacher.key);

    let up = copy_upstream(r);
    let s = student(up.path(), &[]).unwrap();
    assert!(
        bytes(&ckpt(up.path(), "student-kd")) == bytes(&ckpt(r.root.path(), "student-kd")),
        "student checkpoints differ"
    );
    assert_eq!(
        s.metrics["test_accuracy"],
        r.student_kd.metrics["test_accuracy"]
    );
    assert_eq!(s.key, r.student_kd.key);
}

#[test]
fn an_unchanged_stage_is_skipped_and_a_changed_one_reruns() {
    let r = run();
    let up = copy_upstream(r);
    let first = student(up.path(), &["--baseline"]).unwrap();
    let path = up.path().join("smoke/student-baseline/model.safetensors");
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let second = student(up.path(), &["--baseline"]).unwrap();
    assert_eq!(
        first, second,
        "an up-to-date stage returns its recorded manifest"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        modified,
        "and does not rewrite its outputs"
    );
    // The baseline does not depend on the KD settings...
    let third = student(up.path(), &["--baseline", "--temperature", "3"]).unwrap();
    assert_eq!(third.key, first.key);
    // ...but does on its own schedule.
    let fourth = student(up.path(), &["--baseline", "--epochs", "1"]).unwrap();
    assert_ne!(fourth.key, first.key);
    assert_eq!(fourth.metrics["fit"]["epochs"].as_array().unwrap().len(), 1);
}

/// Manifests record wall times and speeds, which differ between runs; nothing else may.
fn without_timings(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(k, _)| !(k.contains("seconds") || k.contains("per_sec")))
            .map(|(k, v)| (k.clone(), without_timings(v)))
            .collect(),
        serde_json::Value::Array(xs) => xs.iter().map(without_timings).collect(),
        other => other.clone(),
    }
}
