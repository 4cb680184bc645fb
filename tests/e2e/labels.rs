//! Few labels, many images (`data.labels`): the teacher and the baseline learn from the labelled
//! rows, the knowledge file covers every row and marks the labelled ones, the KD student learns
//! from all of them; every stage gets as many optimiser steps per epoch.

use crate::fixture::{pipeline_args, precompute, run, student, teacher};
use kd_knowledge::KnowledgeFile;

const LABELS: &[&str] = &["--set", "data.labels=100"];

fn images_per_epoch(m: &kd_train::Manifest) -> Vec<u64> {
    m.metrics["fit"]["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["images"].as_u64().unwrap())
        .collect()
}

/// The labelled rows: stratified, seeded, hidden labels zeroed; validation rows keep theirs.
#[test]
fn the_labelled_rows_are_a_seeded_stratified_choice() {
    let root = tempfile::tempdir().unwrap();
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        pipeline_args(root.path())
            .open(&sets)
            .unwrap()
            .load_data()
            .unwrap()
    };
    let full = load(&[]);
    assert!(full.label_mask.is_none() && full.labelled_rows == full.train_rows);
    let d = load(&["data.labels=100"]);
    assert_eq!((d.labelled_rows.len(), d.train_rows.len()), (100, 500));
    let mask = d.label_mask.as_ref().unwrap();
    assert_eq!(
        mask.iter().filter(|&&m| m == 1).count(),
        200,
        "100 + 100 validation rows"
    );
    let labels = &d.dataset.train.labels;
    let hidden: Vec<u32> = d
        .train_rows
        .iter()
        .filter(|r| d.labelled_rows.binary_search(r).is_err())
        .map(|&r| labels[r as usize])
        .collect();
    assert!(hidden.len() == 400 && hidden.iter().all(|&l| l == 0));
    // Every class keeps its share: the 500 rows' classes, scaled to 100, within one.
    for c in 0..10u32 {
        let all = d
            .train_rows
            .iter()
            .filter(|&&r| full.dataset.train.labels[r as usize] == c)
            .count();
        let kept = d
            .labelled_rows
            .iter()
            .filter(|&&r| labels[r as usize] == c)
            .count();
        assert!(
            (kept as f64 - all as f64 / 5.0).abs() <= 1.0,
            "class {c}: {kept} of {all}"
        );
    }
    assert_eq!(load(&["data.labels=0.2"]).labelled_rows, d.labelled_rows);
    assert_ne!(
        load(&["data.labels=100", "data.label_seed=1"]).labelled_rows,
        d.labelled_rows
    );
    for (set, want) in [
        ("data.labels=5", "at least one label per class"),
        ("data.labels=0", "data.labels must be at least 1"),
        ("data.labels=1.5", "data.labels 1.5"),
    ] {
        let e = pipeline_args(root.path())
            .open(&[set.to_string()])
            .and_then(|p| p.load_data().map(drop));
        let e = format!("{:#}", e.expect_err(set));
        assert!(e.contains(want), "{set}: {e}");
    }
}

#[test]
fn every_stage_trains_on_its_rows_with_the_same_steps() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let t = teacher(r, LABELS).unwrap();
    assert!(t.inputs.contains_key("dataset.labelled"));
    let k = precompute(r, LABELS).unwrap();
    let kd = student(r, LABELS).unwrap();
    let base = student(r, &["--baseline", "--set", "data.labels=100"]).unwrap();
    // 500 training rows, batch 50: 10 steps per epoch for all three, though the teacher and the
    // baseline see only 100 of the rows (five passes per epoch).
    assert_eq!(images_per_epoch(&t), vec![500]);
    assert_eq!(images_per_epoch(&kd), vec![500, 500]);
    assert_eq!(images_per_epoch(&base), vec![500, 500]);
    assert_eq!(
        kd.inputs["dataset.labelled"],
        base.inputs["dataset.labelled"]
    );
    // The knowledge file covers every row and marks the labelled ones.
    let file = KnowledgeFile::open(&r.join("smoke/knowledge/soft-targets.safetensors")).unwrap();
    assert_eq!(
        file.meta.format_version,
        kd_knowledge::FORMAT_VERSION_LABELLED
    );
    assert_eq!(file.meta.dataset.rows, 600);
    let mask = file.label_mask().unwrap().unwrap();
    assert_eq!(mask.iter().filter(|&&m| m == 1).count(), 200);
    assert_eq!(
        k.inputs["dataset.train"],
        run().knowledge.inputs["dataset.train"]
    );
    // The full-label knowledge file is not this data's: the mask differs, and is named.
    let full = run().dir("knowledge").join("soft-targets.safetensors");
    let e = format!(
        "{:#}",
        student(
            r,
            &[
                "--set",
                "data.labels=100",
                "--knowledge",
                full.to_str().unwrap(),
                "--tag",
                "x"
            ]
        )
        .unwrap_err()
    );
    assert!(
        e.contains("dataset.labelled") && e.contains("every row"),
        "{e}"
    );
}

/// Photos without a class (`train/unlabelled/`) join the transfer set: the knowledge file covers
/// them and marks them unlabelled; the teacher and the baseline do not see them.
#[test]
fn unlabelled_photos_join_the_transfer_set() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    for (folder, n, shade) in [
        ("train/dark", 6, 30u8),
        ("train/light", 6, 220),
        ("val/dark", 2, 40),
        ("val/light", 2, 210),
        ("train/unlabelled", 4, 120),
    ] {
        for i in 0..n {
            let p = d.join(folder).join(format!("{i}.png"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            image::RgbImage::from_pixel(32, 32, image::Rgb([shade + i as u8, shade, shade]))
                .save(&p)
                .unwrap();
        }
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let dir = d.to_str().unwrap();
    let sets = [
        "--data-dir",
        dir,
        "--set",
        "data.format=\"image-folder\"",
        "--set",
        "data.name=\"shades\"",
        "--set",
        "data.classes=2",
        "--set",
        "data.image_size=28",
        "--set",
        "data.val_size=2",
        "--set",
        "data.train_limit=5",
    ];
    // A limit that would cut the labelled photos (and the unlabelled after them): refused.
    let e = format!("{:#}", teacher(r, &sets).unwrap_err());
    assert!(
        e.contains("data.train_limit 5 would cut the 12 labelled photos"),
        "{e}"
    );
    let sets = &sets[..sets.len() - 2];
    let t = teacher(r, sets).unwrap();
    assert_eq!(
        t.training().unwrap().labelled_images,
        Some(10),
        "12 labelled photos, 2 for validation"
    );
    // Batch 50: one step per epoch for every stage (a pass over the 14 training rows), which
    // for the teacher is its 10 labelled rows.
    assert_eq!(images_per_epoch(&t), vec![10]);
    assert_eq!(t.training().unwrap().fit.steps_per_epoch, 1);
    precompute(r, sets).unwrap();
    let file = KnowledgeFile::open(&r.join("smoke/knowledge/soft-targets.safetensors")).unwrap();
    assert_eq!(file.meta.dataset.rows, 16);
    let mask = file.label_mask().unwrap().unwrap();
    assert_eq!(
        mask,
        [vec![1u8; 12], vec![0u8; 4]].concat(),
        "the unlabelled photos come last"
    );
    let kd = student(r, sets).unwrap();
    assert_eq!(images_per_epoch(&kd), vec![14, 14]);
    assert_eq!(kd.training().unwrap().fit.steps_per_epoch, 1);
}
