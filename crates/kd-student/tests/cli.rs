//! The binary's contract: an error is printed once, with its causes, and the exit code is 1.

use std::process::Command;

fn kd_student(args: &[&str]) -> std::process::Output {
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines/smoke.toml");
    let artifacts = std::env::temp_dir().join(format!("kd-student-cli-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_kd-student"))
        .args(["--pipeline", smoke, "--artifacts"])
        .arg(&artifacts)
        .args(args)
        .output()
        .expect("the kd-student binary runs");
    let _ = std::fs::remove_dir_all(&artifacts);
    out
}

#[test]
fn a_missing_knowledge_file_is_one_error_line_and_exit_code_1() {
    let out = kd_student(&["--knowledge", "/nonexistent/k.safetensors"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/k.safetensors"), "{stderr}");
}

#[test]
fn a_bad_setting_is_refused_by_name() {
    let out = kd_student(&["--set", "student.temperature=-1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("student.temperature") && stderr.contains("smoke.toml"),
        "{stderr}"
    );
}

#[test]
fn baseline_and_knowledge_conflict() {
    let out = kd_student(&["--baseline", "--knowledge", "k.safetensors"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
}
