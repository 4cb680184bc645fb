//! `just compare` and `just sweep` (`kd-experiment`) on the smoke pipeline: the runs it plans
//! are filed in their manifests (study, variant, control), reproducible per seed, and the report
//! groups and pairs them from those fields.

use crate::fixture;
use clap::Parser;
use std::path::Path;

/// A copy of the whole fixture run (every stage) in a fresh root.
fn copy_run() -> tempfile::TempDir {
    let run = fixture::run();
    let root = tempfile::tempdir().unwrap();
    for stage in ["teacher", "knowledge", "student-kd", "student-baseline"] {
        let to = root.path().join("smoke").join(stage);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(run.dir(stage)).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    root
}

/// `kd-experiment <words>` on the smoke pipeline under `root` (the stage binaries run as
/// processes, from the build's release folder).
pub fn experiment(root: &Path, words: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["kd-experiment".to_string()];
    argv.extend(words.iter().map(|w| w.to_string()));
    argv.extend([
        "--pipeline".into(),
        fixture::smoke_pipeline().display().to_string(),
        "--artifacts".into(),
        root.display().to_string(),
    ]);
    kd_experiment::run(&kd_experiment::Args::try_parse_from(argv)?)
}

fn checkpoint(root: &Path, tag: &str, stage: &str) -> Vec<u8> {
    std::fs::read(root.join(format!("smoke/runs/{tag}/{stage}/model.safetensors"))).unwrap()
}

fn manifest(root: &Path, dir: &str) -> kd_train::Manifest {
    kd_train::Manifest::read(&root.join("smoke").join(dir)).unwrap()
}

fn report(root: &Path) -> serde_json::Value {
    manifest(root, "report").metrics
}

#[test]
fn compare_files_its_runs_and_the_report_pairs_them() {
    let a = copy_run();
    let words = ["compare", "seeds=2", "labels=100 all", "views=2"];
    experiment(a.path(), &words).unwrap();
    // What each run is, in its manifest.
    let views = manifest(a.path(), "runs/seed-1-views2/student-kd");
    let run = views.run.as_ref().unwrap();
    assert_eq!(run.variant, "views2");
    assert_eq!(
        run.control.as_deref(),
        Some("runs/seed-1-aug/student-baseline")
    );
    assert_eq!(run.reference.as_deref(), Some("runs/seed-1-aug/student-kd"));
    assert_eq!(views.seed, Some(1));
    let record = views.training().unwrap();
    assert!(record
        .knowledge
        .unwrap()
        .ends_with("runs/views-2/knowledge/soft-targets.safetensors"));
    let labelled = manifest(a.path(), "runs/seed-0-labels-100/student-kd");
    assert_eq!(labelled.training().unwrap().labelled_images, Some(100));

    let seeds = &report(a.path())["seeds"];
    assert_eq!(seeds["seeds"], serde_json::json!([0, 1]));
    let per_seed: Vec<f64> = seeds["columns"]["KD"]["per_seed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let mean = (per_seed[0] + per_seed[1]) / 2.0;
    assert!((seeds["columns"]["KD"]["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
    let std = (per_seed[0] - per_seed[1]).abs() / 2f64.sqrt();
    assert!((seeds["columns"]["KD"]["std"].as_f64().unwrap() - std).abs() < 1e-12);
    let d = &seeds["differences"];
    for name in [
        "KD − baseline",
        "KD (aug) − baseline (aug)",
        "KD (views2) − baseline (aug)",
        "KD (views2) − KD (aug)",
        "KD (labels-100) − baseline (labels-100)",
    ] {
        assert_eq!(
            d[name]["per_seed"].as_array().map(Vec::len),
            Some(2),
            "{name}: {d}"
        );
    }
    // Two seeds: the 95% interval is mean ± t(1)·std/√2, t(1) = 12.706.
    let diff = &d["KD − baseline"];
    let (m, s) = (
        diff["mean"].as_f64().unwrap(),
        diff["std"].as_f64().unwrap(),
    );
    let ci: Vec<f64> = diff["ci95"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let half = 12.706 * s / 2f64.sqrt();
    assert!((ci[0] - (m - half)).abs() < 1e-12 && (ci[1] - (m + half)).abs() < 1e-12);
    // The teacher of each KD column is found through the hashes: the labels-100 column's lead is
    // over the labels-100 teacher, not the pipeline's.
    let t100 = manifest(a.path(), "runs/labels-100/teacher")
        .training()
        .unwrap()
        .test_accuracy;
    let b100 = &seeds["columns"]["baseline (labels-100)"]["mean"];
    let lead = d["KD (labels-100) − baseline (labels-100)"]["teacher_lead"]
        .as_f64()
        .unwrap();
    assert!((lead - (t100 - b100.as_f64().unwrap())).abs() < 1e-12);
    // The curve over label counts: 100 and all 500.
    let labels = report(a.path())["labels"].as_array().unwrap().clone();
    let counts: Vec<u64> = labels
        .iter()
        .map(|p| p["labels"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [100, 500]);
    assert!((labels[0]["teacher"].as_f64().unwrap() - t100).abs() < 1e-12);
    let md = std::fs::read_to_string(a.path().join("smoke/report/report.md")).unwrap();
    assert!(
        md.contains("## Seeds")
            && md.contains("## Labels")
            && md.contains("mean ± std (2 seeds)")
            && md.contains("Over 2 seeds (`just compare`, below)"),
        "{md}"
    );
    let svg = std::fs::read_to_string(a.path().join("smoke/report/labels.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 3, "teacher, baseline, KD");

    // Same seed, same bytes; another seed, other weights.
    let b = copy_run();
    experiment(b.path(), &["compare", "seeds=2"]).unwrap();
    for stage in ["student-kd", "student-baseline"] {
        assert!(checkpoint(a.path(), "seed-1", stage) == checkpoint(b.path(), "seed-1", stage));
        assert!(checkpoint(a.path(), "seed-1", stage) != checkpoint(a.path(), "seed-0", stage));
    }
    // A rerun of the same plan trains nothing: every stage is up to date.
    let before = manifest(a.path(), "runs/seed-0/student-kd");
    experiment(a.path(), &words).unwrap();
    assert_eq!(manifest(a.path(), "runs/seed-0/student-kd"), before);
}

#[test]
fn a_sweep_is_tabled_charted_and_its_best_point_chosen_on_validation() {
    let root = copy_run();
    let r = root.path();
    experiment(
        r,
        &["sweep", "temps=1 4", "weights=0.1:0.9", "heads=main all"],
    )
    .unwrap();
    let sweep = &report(r)["sweep"];
    assert_eq!(sweep["points"], 4);
    let best_val = sweep["best_val_accuracy"].as_f64().unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(r.join("smoke/runs")).unwrap() {
        let m = kd_train::Manifest::read(&e.unwrap().path().join("student-kd")).unwrap();
        assert!(m.training().unwrap().fit.best_val_accuracy <= best_val);
        n += 1;
    }
    assert_eq!(n, 4);
    let svg = std::fs::read_to_string(r.join("smoke/report/sweep.svg")).unwrap();
    assert_eq!(
        svg.matches("<polyline").count(),
        2,
        "one line per weight setting"
    );
    let md = std::fs::read_to_string(r.join("smoke/report/report.md")).unwrap();
    assert!(md.contains("## Sweep") && md.contains("![sweep](sweep.svg)"));
    assert!(!md.contains("## Seeds"), "no seed runs, no seeds section");
}
