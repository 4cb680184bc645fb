#![allow(clippy::unwrap_used)]
//! Kill the teacher anywhere — SIGKILL mid-epoch, or Ctrl-C — and the same command finishes the
//! run with weights bit-identical to a run never interrupted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const EPOCHS: &str = "teacher.epochs=3";

fn command(root: &Path, extra: &[&str]) -> Command {
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines/smoke.toml");
    let mut c = Command::new(env!("CARGO_BIN_EXE_kd-teacher"));
    c.args(["--pipeline", smoke, "--set", EPOCHS, "--artifacts"])
        .arg(root)
        .args(extra);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn stage_dir(root: &Path) -> PathBuf {
    root.join("smoke/teacher")
}

fn finish(mut c: Command) -> Output {
    let out = c.output().expect("kd-teacher runs");
    assert!(
        out.status.success(),
        "kd-teacher failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Manifest metrics without the wall times and speeds, which differ between runs.
fn metrics(root: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(stage_dir(root).join("manifest.json")).unwrap();
    strip(&serde_json::from_str::<serde_json::Value>(&text).unwrap()["metrics"])
}

fn strip(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(k, _)| !(k.contains("seconds") || k.contains("per_sec")))
            .map(|(k, v)| (k.clone(), strip(v)))
            .collect(),
        serde_json::Value::Array(xs) => xs.iter().map(strip).collect(),
        other => other.clone(),
    }
}

/// The uninterrupted run everything is compared with.
fn reference() -> &'static (tempfile::TempDir, Vec<u8>) {
    static R: OnceLock<(tempfile::TempDir, Vec<u8>)> = OnceLock::new();
    R.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        finish(command(root.path(), &[]));
        let bytes = std::fs::read(stage_dir(root.path()).join("model.safetensors")).unwrap();
        assert!(
            !stage_dir(root.path()).join("resume.safetensors").exists(),
            "a finished run leaves no resume state"
        );
        (root, bytes)
    })
}

/// Starts a run and returns once its first epoch's resume state is on disk (so it is now in
/// epoch 2).
fn start_and_wait_for_epoch_1(root: &Path) -> Child {
    let mut child = command(root, &[]).spawn().unwrap();
    let resume = stage_dir(root).join("resume.safetensors");
    let t0 = Instant::now();
    while !resume.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before writing its first resume state"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no resume state after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

#[test]
fn sigkill_mid_epoch_then_the_same_command_finishes_bit_identical() {
    let (ref_root, ref_bytes) = reference();
    let root = tempfile::tempdir().unwrap();
    let mut child = start_and_wait_for_epoch_1(root.path());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !stage_dir(root.path()).join("manifest.json").exists(),
        "killed before finishing"
    );
    let out = finish(command(root.path(), &[]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("resuming after epoch"), "{log}");
    assert!(
        std::fs::read(stage_dir(root.path()).join("model.safetensors")).unwrap() == *ref_bytes,
        "weights differ after resuming"
    );
    assert_eq!(metrics(root.path()), metrics(ref_root.path()));
    assert!(!stage_dir(root.path()).join("resume.safetensors").exists());
}

#[test]
fn ctrl_c_stops_at_a_batch_boundary_and_resume_continues() {
    let (ref_root, ref_bytes) = reference();
    let root = tempfile::tempdir().unwrap();
    let child = start_and_wait_for_epoch_1(root.path());
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted during epoch") && err.contains("--resume"),
        "{err}"
    );
    assert!(stage_dir(root.path()).join("resume.safetensors").exists());
    // The best weights so far stay, uncommitted: no checkpoint or manifest claims the run.
    let dir = stage_dir(root.path());
    assert!(
        dir.join("best.partial.safetensors").exists(),
        "the best epoch so far stays"
    );
    assert!(!dir.join("model.safetensors").exists() && !dir.join("manifest.json").exists());
    finish(command(root.path(), &["--resume"]));
    assert!(std::fs::read(stage_dir(root.path()).join("model.safetensors")).unwrap() == *ref_bytes);
    assert_eq!(metrics(root.path()), metrics(ref_root.path()));
}

#[test]
fn resume_with_nothing_to_resume_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let out = command(root.path(), &["--resume"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no resume state"), "{err}");
    let out = command(root.path(), &["--resume", "--force"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses the combination");
}
