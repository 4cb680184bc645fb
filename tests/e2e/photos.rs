//! The seed's RGB path end to end on a few real photographs (Debian's tuxpaint-stamps-default,
//! installed by `just data-photos`): ImageFolder in the seed's train/val layout, the seed's
//! 224-px GoogLeNet and student, RandomResizedCrop augmentation, every stage.

use clap::Parser;
use std::path::{Path, PathBuf};

const STAMPS: &str = "/usr/share/tuxpaint/stamps";

/// 3 classes × 5 photos: 4 for train/, 1 for val/.
fn photo_folder(root: &Path) {
    for (class, dir) in [
        ("birds", "animals/birds"),
        ("flowers", "plants/flowers"),
        ("fruit", "food/fruit"),
    ] {
        let src = Path::new(STAMPS).join(dir);
        let mut photos: Vec<PathBuf> = std::fs::read_dir(&src)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (install the photos with `just data-photos`)",
                    src.display()
                )
            })
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        photos.sort();
        for (i, p) in photos.iter().take(5).enumerate() {
            let split = if i == 4 { "val" } else { "train" };
            let dst = root.join(split).join(class);
            std::fs::create_dir_all(&dst).unwrap();
            std::fs::copy(p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// pipelines/photos.toml under another name (the name picks the artifacts folder).
fn pipeline_file(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/photos.toml"),
    )
    .unwrap();
    let p = dir.join("few-photos.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn every_stage_runs_on_real_photos_at_224_px() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("photos");
    photo_folder(&data);
    let pipeline = pipeline_file(work.path());
    let root = work.path().join("artifacts");
    let args = |bin: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            bin,
            "--pipeline",
            pipeline.to_str().unwrap(),
            "--artifacts",
            root.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(["--data-dir".to_string(), data.display().to_string()]);
        for s in [
            "data.classes=3",
            "data.val_size=3",
            "teacher.epochs=1",
            "teacher.batch_size=4",
            "student.epochs=1",
            "student.batch_size=4",
        ] {
            v.extend(["--set".to_string(), s.to_string()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let teacher =
        kd_teacher::run(&kd_teacher::Args::try_parse_from(args("kd-teacher", &[])).unwrap())
            .unwrap();
    assert_eq!(teacher.metrics["architecture"], "googlenet-224");
    assert_eq!(teacher.metrics["parameters"], teacher_params_for(3));
    let knowledge = kd_precompute::run(
        &kd_precompute::Args::try_parse_from(args("kd-precompute", &[])).unwrap(),
    )
    .unwrap()
    .into_manifest()
    .unwrap();
    assert_eq!(knowledge.metrics["rows"], 12);
    let kd = kd_student::run(&kd_student::Args::try_parse_from(args("kd-student", &[])).unwrap())
        .unwrap();
    let base = kd_student::run(
        &kd_student::Args::try_parse_from(args("kd-student", &["--baseline"])).unwrap(),
    )
    .unwrap();
    for m in [&kd, &base] {
        assert_eq!(m.metrics["architecture"], "student-seed");
        assert_eq!(m.metrics["test_images"], 3);
    }
    // Both students trained on the seed's RandomResizedCrop views.
    assert_eq!(kd.settings["student"]["augment"], true);
    assert_eq!(
        base.settings["train"]["augment"]["kind"],
        "resized-crop-flip"
    );
    let report =
        kd_report::run(&kd_report::Args::try_parse_from(args("kd-report", &[])).unwrap()).unwrap();
    assert_eq!(report.metrics["models"].as_array().unwrap().len(), 3);
    // kd-predict on the test photos (val/) sees what the report saw: its top-1 classes, scored
    // against the folder names, give the report's test accuracy for each model.
    for (i, model) in ["teacher", "student-kd", "student-baseline"]
        .iter()
        .enumerate()
    {
        let val = data.join("val");
        let predictions = kd_predict::run(
            &kd_predict::Args::try_parse_from(args(
                "kd-predict",
                &["--model", model, "--batch-size", "2", val.to_str().unwrap()],
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(predictions.len(), 3);
        let right = predictions
            .iter()
            .filter(|p| p.file.parent().unwrap().file_name().unwrap() == p.top[0].class.as_str())
            .count();
        let reported = report.metrics["models"][i]["test_accuracy"]
            .as_f64()
            .unwrap();
        assert!(
            (right as f64 / 3.0 - reported).abs() < 1e-9,
            "{model}: {right}/3 vs the report's {reported}"
        );
    }

    // The class index map sits next to every checkpoint, as the seed writes it.
    let classes: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("few-photos/teacher/class_indices.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        classes,
        serde_json::json!({"0": "birds", "1": "flowers", "2": "fruit"})
    );
    // The knowledge file holds 3-class logits for the 12 training photos, in folder order.
    let k = kd_knowledge::KnowledgeFile::open(
        &root.join("few-photos/knowledge/soft-targets.safetensors"),
    )
    .unwrap();
    assert_eq!((k.meta.dataset.rows, k.meta.dataset.classes), (12, 3));
    assert_eq!(
        k.labels().unwrap(),
        vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    );
    assert_eq!(k.meta.transform.input, [3, 224, 224]);
    // Both 224-px architectures as ONNX, run by ONNX Runtime on the test photos as by candle.
    let python = crate::fixture::python().display().to_string();
    for (model, heads, arch) in [
        ("teacher", &["main", "aux1", "aux2"][..], "googlenet-224"),
        ("student-kd", &["main"][..], "student-seed"),
    ] {
        let argv = args(
            "kd-export",
            &["--model", model, "--check", "always", "--python", &python],
        );
        let m = kd_export::run(&kd_export::Args::try_parse_from(argv).unwrap()).unwrap();
        assert_eq!(crate::export::checked(&m, heads).architecture, arch);
    }
}

fn teacher_params_for(classes: usize) -> usize {
    kd_models::num_parameters(
        "googlenet-224",
        &kd_models::InputSpec {
            channels: 3,
            height: 224,
            width: 224,
            classes,
        },
    )
    .unwrap()
}
