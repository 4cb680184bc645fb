//! Wrong inputs are refused with a message that names the file and what differs.

use crate::fixture::{precompute, run, student};
use kd_data::idx::encode_idx;

fn knowledge_path() -> String {
    run()
        .dir("knowledge")
        .join("soft-targets.safetensors")
        .display()
        .to_string()
}

fn refused(result: anyhow::Result<kd_train::Manifest>) -> String {
    format!("{:#}", result.expect_err("the stage should have refused"))
}

#[test]
fn student_refuses_knowledge_for_other_rows_or_heads() {
    let k = knowledge_path();
    let root = tempfile::tempdir().unwrap();
    let e = refused(student(
        root.path(),
        &["--knowledge", &k, "--set", "data.train_limit=500"],
    ));
    assert!(
        e.contains("dataset.rows") && e.contains("soft-targets.safetensors"),
        "{e}"
    );
    let e = refused(student(
        root.path(),
        &["--knowledge", &k, "--set", "student.head_weights.aux3=0.5"],
    ));
    assert!(e.contains("aux3"), "{e}");
    let e = refused(student(
        root.path(),
        &["--knowledge", &k, "--set", "student.view_targets=\"mean\""],
    ));
    assert!(
        e.contains("view_targets") && e.contains("soft-targets.safetensors"),
        "{e}"
    );
    assert!(!root
        .path()
        .join("smoke/student-kd/model.safetensors")
        .exists());
}

/// The smoke pipeline's images, written as a folder in MNIST format with one pixel changed.
fn altered_copy(dir: &std::path::Path) {
    let src = std::path::Path::new(kd_data::fashion_mnist::DEBIAN_DIR);
    for prefix in ["train", "t10k"] {
        let images =
            kd_data::idx::read_idx(&src.join(format!("{prefix}-images-idx3-ubyte.gz")), 3).unwrap();
        let labels =
            kd_data::idx::read_idx(&src.join(format!("{prefix}-labels-idx1-ubyte.gz")), 1).unwrap();
        let n = if prefix == "train" { 600 } else { 200 };
        let mut pixels = images.data[..n * 784].to_vec();
        if prefix == "train" {
            pixels[123] ^= 0x40;
        }
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            encode_idx(&[n, 28, 28], &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            encode_idx(&[n], &labels.data[..n]),
        )
        .unwrap();
    }
}

#[test]
fn changed_images_fail_the_checksum_and_the_knowledge_fingerprint() {
    let data = tempfile::tempdir().unwrap();
    altered_copy(data.path());
    let dir = data.path().display().to_string();
    let root = tempfile::tempdir().unwrap();
    let e = refused(student(root.path(), &["--baseline", "--data-dir", &dir]));
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("checksum"),
        "{e}"
    );
    let k = knowledge_path();
    let e = refused(student(
        root.path(),
        &[
            "--knowledge",
            &k,
            "--data-dir",
            &dir,
            "--set",
            "data.verify_checksums=false",
        ],
    ));
    assert!(e.contains("dataset.fingerprint"), "{e}");
}

#[test]
fn precompute_without_a_teacher_says_what_to_run() {
    let root = tempfile::tempdir().unwrap();
    let e = refused(precompute(root.path(), &[]));
    assert!(
        e.contains("teacher/model.safetensors") && e.contains("just teacher"),
        "{e}"
    );
}
