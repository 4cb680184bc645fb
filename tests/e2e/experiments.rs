//! `just compare` and `just sweep` on the smoke pipeline: tagged student runs, reproducible per
//! seed, summarised in the report.

use crate::fixture::{self, report, student};
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

fn checkpoint(root: &Path, tag: &str, stage: &str) -> Vec<u8> {
    std::fs::read(root.join(format!("smoke/runs/{tag}/{stage}/model.safetensors"))).unwrap()
}

#[test]
fn seeds_are_reproducible_and_the_report_shows_mean_and_std() {
    let a = copy_run();
    let b = copy_run();
    for root in [a.path(), b.path()] {
        for seed in ["1", "2"] {
            let tag = format!("seed-{seed}");
            student(root, &["--seed", seed, "--tag", &tag]).unwrap();
            student(root, &["--baseline", "--seed", seed, "--tag", &tag]).unwrap();
        }
    }
    // Same seed, same bytes; another seed, other weights.
    for stage in ["student-kd", "student-baseline"] {
        assert!(checkpoint(a.path(), "seed-1", stage) == checkpoint(b.path(), "seed-1", stage));
        assert!(checkpoint(a.path(), "seed-1", stage) != checkpoint(a.path(), "seed-2", stage));
    }
    // A variant: the KD student with augmentation, seed 1 only.
    student(
        a.path(),
        &[
            "--seed",
            "1",
            "--tag",
            "seed-1-aug",
            "--set",
            "student.augment=true",
        ],
    )
    .unwrap();
    let m = report(a.path(), &[]).unwrap();
    let seeds = &m.metrics["seeds"];
    assert_eq!(
        seeds["differences"]["KD (aug) − KD"]["per_seed"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{seeds}"
    );
    assert_eq!(seeds["seeds"], serde_json::json!([1, 2]));
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
    let diff = &seeds["differences"]["KD − baseline"];
    assert_eq!(diff["per_seed"].as_array().unwrap().len(), 2);
    // Two seeds: the 95% interval is mean ± t(1)·std/√2, t(1) = 12.706; one seed has none.
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
    let one = &seeds["differences"]["KD (aug) − KD"];
    assert!(one["ci95"].is_null() && one["reading"] == "one seed: no test");
    let md = std::fs::read_to_string(a.path().join("smoke/report/report.md")).unwrap();
    assert!(
        md.contains("## Seeds")
            && md.contains("mean ± std (2 seeds)")
            && md.contains("Over 2 seeds (`just compare`, below)"),
        "{md}"
    );
}

#[test]
fn a_sweep_is_tabled_charted_and_its_best_point_chosen_on_validation() {
    let root = copy_run();
    let r = root.path();
    for t in ["1", "4"] {
        for (heads, aux) in [("main", "0"), ("all", "0.3")] {
            let tag = format!("sweep-T{t}-w0.1-0.9-{heads}");
            student(
                r,
                &[
                    "--tag",
                    &tag,
                    "--temperature",
                    t,
                    "--set",
                    "student.hard_weight=0.1",
                    "--set",
                    "student.soft_weight=0.9",
                    "--set",
                    &format!("student.head_weights.aux1={aux}"),
                    "--set",
                    &format!("student.head_weights.aux2={aux}"),
                ],
            )
            .unwrap();
        }
    }
    let m = report(r, &[]).unwrap();
    let sweep = &m.metrics["sweep"];
    assert_eq!(sweep["points"], 4);
    let best_val = sweep["best"]["val_accuracy"].as_f64().unwrap();
    for e in std::fs::read_dir(r.join("smoke/runs")).unwrap() {
        let man = kd_train::Manifest::read(&e.unwrap().path().join("student-kd")).unwrap();
        assert!(man.metrics["fit"]["best_val_accuracy"].as_f64().unwrap() <= best_val);
    }
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
