//! `kd-export`: every architecture as ONNX, checked by the real consumer — `onnx.checker`
//! (full check) and ONNX Runtime on the test images, whose logits must match our evaluation's
//! (max |Δ| ≤ 1e-4, the same top-1 class on every image). The 224-px architectures are checked
//! in `photos.rs`.

use crate::fixture::{copy_upstream, export, report, run, teacher};
use kd_train::record::ExportRecord;

/// The export's record, with ONNX Runtime agreeing with candle on every head.
pub fn checked(m: &kd_train::Manifest, heads: &[&str]) -> ExportRecord {
    let r = m.export().unwrap();
    let rt = r.runtime.as_ref().expect("ONNX Runtime ran");
    assert_eq!(rt.heads.keys().collect::<Vec<_>>().len(), heads.len());
    for h in heads {
        let a = &rt.heads[*h];
        assert!(a.max_abs_diff <= 1e-4, "{h}: max |Δ| {}", a.max_abs_diff);
        assert_eq!(a.top1_disagreements, 0, "{h}");
    }
    assert_eq!(rt.test_accuracy, rt.candle_test_accuracy);
    r
}

#[test]
fn students_and_teachers_run_in_onnx_runtime_as_in_candle() {
    let fixture = run();
    let root = copy_upstream(fixture);
    let r = root.path();
    for stage in ["student-kd", "student-baseline"] {
        let to = r.join("smoke").join(stage);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(fixture.dir(stage)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let kd = checked(&export(r, &[]).unwrap(), &["main"]);
    assert_eq!(kd.architecture, "student-cnn");
    // ONNX Runtime's test accuracy is the pipeline's, to the image.
    let rt = kd.runtime.as_ref().unwrap();
    assert_eq!(
        rt.test_accuracy,
        fixture.student_kd.training().unwrap().test_accuracy
    );
    assert_eq!(kd.classes.len(), 10);
    checked(
        &export(r, &["--model", "student-baseline"]).unwrap(),
        &["main"],
    );
    let t = checked(
        &export(r, &["--model", "teacher"]).unwrap(),
        &["main", "aux1", "aux2"],
    );
    assert_eq!(t.architecture, "googlenet");
    // The BatchNorm teacher: its BatchNorm folded into the convolutions.
    teacher(
        r,
        &["--tag", "bn", "--set", "teacher.arch=\"googlenet-bn\""],
    )
    .unwrap();
    let bn = export(r, &["--model", "teacher", "--tag", "bn"]).unwrap();
    assert_eq!(
        checked(&bn, &["main", "aux1", "aux2"]).architecture,
        "googlenet-bn"
    );
    assert!(r.join("smoke/runs/bn/export/teacher.onnx").is_file());
    // Up to date the second time; the report shows the student's deploy line.
    let again = export(r, &[]).unwrap();
    assert_eq!(again.key, export(r, &[]).unwrap().key);
    report(r, &[]).unwrap();
    let md = std::fs::read_to_string(r.join("smoke/report/report.md")).unwrap();
    let line = format!("**{:.2}% test accuracy**", 100.0 * rt.test_accuracy);
    assert!(
        md.contains("## Deploy") && md.contains("export/student-kd.onnx") && md.contains(&line),
        "{md}"
    );
}

#[test]
fn bad_exports_are_named() {
    let fixture = run();
    let root = copy_upstream(fixture);
    let r = root.path();
    // No such model; no trained student here.
    let e = format!("{:#}", export(r, &["--model", "professor"]).unwrap_err());
    assert!(e.contains("professor") && e.contains("student-kd"), "{e}");
    let e = format!("{:#}", export(r, &[]).unwrap_err());
    assert!(
        e.contains("no trained student-kd") && e.contains("just pipeline"),
        "{e}"
    );
    // A checkpoint changed after its run: refused, naming the file and its manifest.
    let ckpt = r.join("smoke/teacher/model.safetensors");
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&ckpt, &bytes).unwrap();
    let e = format!("{:#}", export(r, &["--model", "teacher"]).unwrap_err());
    assert!(
        e.contains("teacher/model.safetensors")
            && e.contains("does not match")
            && e.contains("teacher/manifest.json"),
        "{e}"
    );
    assert!(!r.join("smoke/export/teacher.onnx").exists());
}
