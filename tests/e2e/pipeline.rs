//! Every stage ran and wrote what its contract says.

use crate::fixture::run;
use candle_core::{Device, Tensor};
use kd_data::{Batches, Dataset};
use kd_knowledge::KnowledgeFile;
use kd_train::Manifest;

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn check_training_manifest(m: &Manifest, stage: &str, arch: &str, epochs: usize) {
    assert_eq!(m.stage, stage);
    assert_eq!(m.pipeline, "smoke");
    assert_eq!(m.metrics["architecture"], arch);
    let fit = &m.metrics["fit"];
    assert_eq!(
        fit["epochs"].as_array().unwrap().len(),
        epochs,
        "{stage}: one metrics row per epoch"
    );
    for e in fit["epochs"].as_array().unwrap() {
        assert!((0.0..=1.0).contains(&f(&e["val_accuracy"])), "{stage}: {e}");
        assert!(
            f(&e["train_loss"]).is_finite() && f(&e["images_per_sec"]) > 0.0,
            "{stage}: {e}"
        );
    }
    let best = fit["best_epoch"].as_u64().unwrap() as usize;
    assert!((1..=epochs).contains(&best));
    let best_val = f(&fit["best_val_accuracy"]);
    assert!(fit["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| f(&e["val_accuracy"]) <= best_val));
    assert!((0.0..=1.0).contains(&f(&m.metrics["test_accuracy"])));
    assert_eq!(m.metrics["test_images"], 200);
    assert!(m.wall_seconds > 0.0 && f(&fit["train_images_per_sec"]) > 0.0);
    assert_eq!(m.seed, Some(0));
    assert!(m.inputs.contains_key("dataset.train") && m.inputs.contains_key("dataset.test"));
    assert!(m.outputs.contains_key("model.safetensors"));
}

#[test]
fn every_stage_writes_its_outputs_and_manifest() {
    let r = run();
    check_training_manifest(&r.teacher, "teacher", "googlenet", 1);
    check_training_manifest(&r.student_kd, "student-kd", "student-cnn", 2);
    check_training_manifest(&r.baseline, "student-baseline", "student-cnn", 2);
    assert_eq!(r.teacher.metrics["parameters"], 538_330);
    assert_eq!(r.student_kd.metrics["parameters"], 20_490);
    // The KD student read the knowledge file; the baseline did not.
    assert_eq!(
        r.student_kd.inputs["knowledge"],
        r.knowledge.outputs["soft-targets.safetensors"]
    );
    assert!(!r.baseline.inputs.contains_key("knowledge"));
    assert_eq!(
        r.knowledge.inputs["teacher"],
        r.teacher.outputs["model.safetensors"]
    );
    // Manifests on disk are the ones returned, and their output hashes are the files'.
    for (stage, m) in [
        ("teacher", &r.teacher),
        ("knowledge", &r.knowledge),
        ("student-kd", &r.student_kd),
        ("report", &r.report),
    ] {
        let dir = r.dir(stage);
        assert_eq!(&Manifest::read(&dir).unwrap(), m);
        for (file, sha) in &m.outputs {
            assert_eq!(
                &kd_data::sha256_file(&dir.join(file)).unwrap(),
                sha,
                "{stage}/{file}"
            );
        }
    }
}

#[test]
fn knowledge_file_holds_the_teachers_logits_in_dataset_order() {
    let r = run();
    let k = KnowledgeFile::open(&r.dir("knowledge").join("soft-targets.safetensors")).unwrap();
    assert_eq!(k.meta.heads, ["main", "aux1", "aux2"]);
    assert_eq!((k.meta.dataset.rows, k.meta.dataset.classes), (600, 10));
    assert_eq!(k.meta.dataset.split, "train");
    assert_eq!(k.meta.teacher.architecture, "googlenet");
    assert_eq!(
        k.meta.teacher.checkpoint_sha256,
        r.teacher.outputs["model.safetensors"]
    );

    // The same data the stages loaded: labels and fingerprint line up row for row.
    let args = crate::fixture::pipeline_args(r.root.path());
    let pipeline = args.open(&[]).unwrap();
    let ds = Dataset::load(&pipeline.config.data.load_options().unwrap()).unwrap();
    assert_eq!(k.labels().unwrap(), ds.train.labels);
    assert_eq!(k.meta.dataset.fingerprint, ds.train.fingerprint());

    // Recompute the teacher on a few rows, in another order: the stored rows match.
    let spec = kd_models::InputSpec {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    let teacher = kd_models::load_frozen(
        "googlenet",
        &spec,
        &r.dir("teacher").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let images = ds.train.to_tensor(&ds.normalization, &Device::Cpu).unwrap();
    let labels = ds.train.labels_tensor(&Device::Cpu).unwrap();
    let rows = [599u32, 0, 17, 300];
    let batch = Batches::new(&images, &labels, &rows, 4)
        .next()
        .unwrap()
        .unwrap();
    let heads = teacher.forward_t(&batch.images, false).unwrap();
    for (h, name) in heads.iter().zip(["main", "aux1", "aux2"]) {
        let stored = k
            .logits(name, &Device::Cpu)
            .unwrap()
            .index_select(&Tensor::new(&rows, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let diff = (h - stored)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-4,
            "head {name}: stored logits differ from the teacher's by {diff}"
        );
    }
}

#[test]
fn report_compares_the_three_models() {
    let r = run();
    let dir = r.dir("report");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for needle in [
        "teacher",
        "student, distilled (KD)",
        "student, labels only",
        "538,330",
        "20,490",
        "Distillation − baseline",
        "curves.svg",
        "[student]",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    let svg = std::fs::read_to_string(dir.join("curves.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 3);
    // The report measured each model's test accuracy itself: it agrees with the stage's own.
    let models = r.report.metrics["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    for (m, stage) in models.iter().zip([&r.teacher, &r.student_kd, &r.baseline]) {
        assert_eq!(
            f(&m["test_accuracy"]),
            f(&stage.metrics["test_accuracy"]),
            "{}",
            m["name"]
        );
        assert!(f(&m["inference_images_per_sec"]) > 0.0);
        assert_eq!(
            m["val_accuracy_per_epoch"].as_array().unwrap().len(),
            stage.metrics["fit"]["epochs"].as_array().unwrap().len()
        );
    }
    let gain = f(&r.report.metrics["kd_minus_baseline"]);
    assert!(
        (gain
            - (f(&r.student_kd.metrics["test_accuracy"])
                - f(&r.baseline.metrics["test_accuracy"])))
        .abs()
            < 1e-12
    );
}
