//! Every measurement runs on the smoke pipeline and yields sane numbers (no timing is asserted).

#![allow(clippy::unwrap_used)]

use clap::Parser;

/// `kd-bench --pipeline pipelines/smoke.toml FOLDER_FLAG TEMP_DIR FLAGS...`, and the folder.
fn smoke_args(folder_flag: &str, flags: &[&str]) -> (kd_bench::Args, tempfile::TempDir) {
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines/smoke.toml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let head = ["kd-bench", "--pipeline", smoke, folder_flag, path];
    let args = kd_bench::Args::try_parse_from(head.iter().chain(flags)).unwrap();
    (args, dir)
}

#[test]
fn every_measurement_runs_and_reports() {
    let (args, _artifacts) = smoke_args("--artifacts", &["--reps", "2", "--batches", "1"]);
    for (name, _) in kd_bench::MEASUREMENTS {
        let m = kd_bench::measure(&args, name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(m.name, name);
        assert_eq!(m.seconds.len(), 2, "{name}");
        assert!(
            m.seconds.iter().all(|s| *s > 0.0) && m.images_per_rep > 0,
            "{name}: {m:?}"
        );
        assert!(m.peak_rss_kib > 0, "{name}");
        if name.ends_with("-step") {
            let parts: Vec<&str> = m.split.iter().map(|(n, _)| n.as_str()).collect();
            assert!(
                parts.ends_with(&["forward", "backward", "optimiser"]),
                "{name}: {parts:?}"
            );
            assert!(m.forward_macs_per_image > 0, "{name}");
        }
        if name == "teacher-step" {
            // The convolutions by shape split the convolution kinds' time exactly.
            for pass in ["forward", "backward"] {
                let kind: f64 = m
                    .ops
                    .iter()
                    .filter(|(k, _)| k.starts_with(&format!("convolution {pass}")))
                    .map(|(_, s)| s)
                    .sum();
                let shapes: Vec<_> = m
                    .conv_shapes
                    .iter()
                    .filter(|(k, ..)| k.starts_with(pass))
                    .collect();
                let sum: f64 = shapes.iter().map(|(_, s, _)| s).sum();
                assert!(
                    kind > 0.0 && (sum - kind).abs() < 1e-9 * (1.0 + kind),
                    "{pass}: {m:?}"
                );
                assert!(
                    shapes.iter().any(|(k, ..)| k.contains("3×3 at")),
                    "{shapes:?}"
                );
                assert!(
                    shapes.iter().all(|(_, _, g)| g.is_finite() && *g > 0.0),
                    "{shapes:?}"
                );
            }
        }
    }
    assert_eq!(kd_bench::median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(kd_bench::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
}

/// `--whole-pipeline`'s side of ours: every stage of `kd-experiment pipeline` timed, the three
/// models' test accuracies read back, the scratch folder gone; PyTorch's side refuses a pipeline
/// its script does not mirror before starting Python.
#[test]
fn the_whole_pipeline_runs_every_stage_and_refuses_what_pytorch_cannot_mirror() {
    let (args, out) = smoke_args("--out", &[]);
    let run = kd_bench::whole::ours(&args).unwrap_or_else(|e| panic!("{e:#}"));
    let stages: Vec<&str> = run.stages.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        stages,
        [
            "teacher",
            "precompute",
            "student",
            "baseline",
            "export",
            "report"
        ]
    );
    let sum: f64 = run.stages.iter().map(|(_, s)| s).sum();
    assert!(
        run.stages.iter().all(|(_, s)| *s > 0.0) && run.seconds >= sum,
        "{run:?}"
    );
    let names: Vec<&str> = run.accuracy.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["teacher", "student", "baseline"]);
    assert!(
        run.accuracy
            .iter()
            .all(|(_, a)| (0.0..=1.0).contains(a) && *a > 0.0),
        "{run:?}"
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "scratch left behind"
    );

    // The smoke student learns from the auxiliary heads too, which the script does not do.
    let p = args.pipeline.open(&[]).unwrap();
    let err = kd_bench::whole::theirs(&args, &p, std::path::Path::new("/no/python"))
        .expect_err("the smoke pipeline is not mirrored");
    assert!(
        format!("{err:#}").contains("student-cnn from the main head"),
        "{err:#}"
    );
}

/// `--whole-pipeline --side ours` on the default pipeline cut small: our run is recorded as it
/// ends, PyTorch's side (no Python here) is shown as missing, and the same command again reads
/// the recorded run back instead of running it.
#[test]
fn a_whole_pipeline_run_is_recorded_and_the_same_command_reads_it_back() {
    let default = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../pipelines/fashion-mnist.toml"
    );
    let out = tempfile::tempdir().unwrap();
    let flags = [
        "kd-bench",
        "--pipeline",
        default,
        "--out",
        out.path().to_str().unwrap(),
        "--pytorch",
        "/no/python",
        "--whole-pipeline",
        "--side",
        "ours",
        "--rounds",
        "1",
        "--reps",
        "1",
        "--batches",
        "1",
    ];
    let sets = [
        "data.train_limit=400",
        "data.val_size=100",
        "data.test_limit=200",
        "teacher.epochs=1",
        "student.epochs=1",
    ];
    let sets = sets.iter().flat_map(|s| ["--set", s]);
    let args = kd_bench::Args::try_parse_from(flags.into_iter().chain(sets)).unwrap();
    let python = args.pytorch.clone().unwrap();
    let record = out.path().join(kd_bench::runlog::FILE);
    let report = out.path().join("pipeline.md");

    kd_bench::write_whole_pipeline(&args, &python).unwrap_or_else(|e| panic!("{e:#}"));
    let first = std::fs::read_to_string(&record).unwrap();
    let runs: Vec<kd_bench::whole::Recorded> = serde_json::from_str(&first).unwrap();
    assert_eq!(runs.len(), 1, "{first}");
    assert_eq!(runs[0].conditions.side, "ours");
    assert_eq!(runs[0].conditions.settings["teacher"]["epochs"], 1);
    assert_eq!(runs[0].run.stages.len(), 6, "{first}");
    let rates = &runs[0].run.machine_gflops;
    assert!(
        rates.len() == 2 && rates.iter().all(|g| *g > 0.1),
        "{rates:?}"
    );
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(
        md.contains("- ours: 1 of 1 rounds recorded; ended 20"),
        "{md}"
    );
    assert!(md.contains("GFLOP/s before / after)"), "{md}");
    assert!(
        md.contains("- PyTorch's: 0 of 1 rounds recorded; run the same command again"),
        "{md}"
    );

    // Again: read back, not run (the record is the same bytes, the report the same table).
    std::fs::remove_file(&report).unwrap();
    kd_bench::write_whole_pipeline(&args, &python).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(std::fs::read_to_string(&record).unwrap(), first);
    assert_eq!(std::fs::read_to_string(&report).unwrap(), md);
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert_eq!(left.len(), 2, "scratch left behind: {left:?}");
}
