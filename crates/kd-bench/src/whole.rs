//! `kd-bench --pytorch PYTHON --whole-pipeline`: the pipeline run whole, side by side — our
//! `kd-experiment pipeline` (every stage binary in turn, each timed as a process, into a scratch
//! artifacts folder) against PyTorch's script doing the same work (`pytorch/bench.py --only
//! pipeline`, channels-last, with the pipeline file's values), alternating `--rounds` times.
//! The default pipeline takes about two hours a side on a 2-core machine; `--set
//! teacher.epochs=N` shortens both sides alike. Each side's run is recorded the moment it ends
//! (`runlog.rs`), so the same command run again finishes a comparison that was interrupted.

use crate::pytorch::{run_script, Theirs};
use crate::runlog::{self, Conditions, RunLog};
use crate::{median, Args};
use anyhow::Context;
use kd_train::stage::Pipeline;
use kd_train::table::Table;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// The stages in the table's order; PyTorch's script has no ONNX export.
const STAGES: [&str; 6] = [
    "teacher",
    "precompute",
    "student",
    "baseline",
    "export",
    "report",
];

/// A run as the record keeps it.
pub type Recorded = runlog::Recorded<Run>;

/// One whole run: every stage's seconds, the whole run's (start to exit) and the test
/// accuracies of the three models.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Run {
    pub stages: Vec<(String, f64)>,
    pub seconds: f64,
    pub accuracy: Vec<(String, f64)>,
    /// The machine's matrix-product rate (GFLOP/s, [`crate::MATMUL`]) just before and just
    /// after the run: whether the machine held its speed while it ran.
    #[serde(default)]
    pub machine_gflops: Vec<f64>,
}

impl Run {
    fn stage(&self, name: &str) -> Option<f64> {
        self.stages.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
    }
}

/// The two sides of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    Ours,
    Pytorch,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Pytorch => "pytorch",
        }
    }
}

/// `--whole-pipeline`: each round's two sides (only `--side` if given), each read back from the
/// record when it holds that round under the same conditions, else run and recorded at once.
/// Returns the recorded rounds of ours and of PyTorch's (at most `--rounds` each). Without
/// `--side pytorch` PyTorch's side may be left out: when `python` cannot say its torch version,
/// with a warning.
pub fn rounds(
    args: &Args,
    p: &Pipeline,
    python: &Path,
) -> anyhow::Result<(Vec<Recorded>, Vec<Recorded>)> {
    let mut log = RunLog::<Run>::open(&args.out.join(runlog::FILE), args.pipeline.force)?;
    let ours_c = our_conditions(args, p)?;
    let theirs_c = match (args.side, their_conditions(p, python)) {
        (Some(Side::Ours), Err(e)) => {
            tracing::warn!("bench: PyTorch's side left out: {e:#}");
            None
        }
        (_, c) => Some(c?),
    };
    let sides: Vec<(Side, &Conditions)> = [
        (Side::Ours, Some(&ours_c)),
        (Side::Pytorch, theirs_c.as_ref()),
    ]
    .into_iter()
    .filter_map(|(s, c)| Some((s, c?)))
    .collect();
    for round in 1..=args.rounds {
        for &(side, c) in &sides {
            let at = format!(
                "bench: round {round}/{}: {} pipeline",
                args.rounds,
                side.name()
            );
            if let Some(r) = log.get(c, round) {
                tracing::info!("{at}: recorded at {}, read back", r.finished);
                continue;
            }
            if args.side.is_some_and(|s| s != side) {
                continue;
            }
            tracing::info!("{at}");
            let before = machine_gflops(args)?;
            let mut run = match side {
                Side::Ours => ours(args)?,
                Side::Pytorch => theirs(args, p, python)?,
            };
            run.machine_gflops = vec![before, machine_gflops(args)?];
            log.add(c.clone(), run)?;
        }
    }
    let recorded = |c: Option<&Conditions>| -> Vec<Recorded> {
        c.map(|c| log.under(c).take(args.rounds).cloned().collect())
            .unwrap_or_default()
    };
    Ok((recorded(Some(&ours_c)), recorded(theirs_c.as_ref())))
}

/// The machine's matrix-product rate now, GFLOP/s (median of `--reps`; a child process, as
/// every measurement). Some machines change speed by half from one hour to the next (a shared
/// host): the rate before and after each run shows whether two runs saw the same machine.
fn machine_gflops(args: &Args) -> anyhow::Result<f64> {
    let m = crate::ours(args, crate::MATMUL)?;
    Ok(crate::matmul_gflops(median(&m.images_per_sec())))
}

/// The machine, the threads and the pipeline's resolved settings, for `side`.
fn conditions(side: Side, p: &Pipeline, code: String) -> anyhow::Result<Conditions> {
    Ok(Conditions {
        side: side.name().to_string(),
        machine: runlog::machine(),
        threads: kd_train::stage::threads(),
        settings: serde_json::to_value(&p.config)?,
        code,
    })
}

/// Our side's conditions: the code is every stage binary the plan runs (hashed by content).
pub fn our_conditions(args: &Args, p: &Pipeline) -> anyhow::Result<Conditions> {
    let (exp, pipeline) = experiment(args, &args.out)?;
    let mut names: Vec<&str> = kd_experiment::plan::plan(&exp, &pipeline)?
        .iter()
        .map(|s| s.binary)
        .collect();
    names.sort_unstable();
    names.dedup();
    let bin = kd_experiment::binaries()?;
    let mut parts = Vec::new();
    for name in names {
        let sha = kd_data::sha256_file(&bin.join(name))?;
        parts.push(format!("{name} {sha}"));
    }
    conditions(
        Side::Ours,
        p,
        runlog::digest(parts.iter().map(|s| s.as_bytes())),
    )
}

/// PyTorch's side's conditions: the code is the script, the Python and its torch version.
pub fn their_conditions(p: &Pipeline, python: &Path) -> anyhow::Result<Conditions> {
    let out = std::process::Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .with_context(|| format!("starting {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} has no torch (`just bench-pytorch` makes a Python that has)",
        python.display()
    );
    let python = python.to_string_lossy();
    let parts = [
        crate::pytorch::SCRIPT.as_bytes(),
        python.as_bytes(),
        &out.stdout,
    ];
    conditions(Side::Pytorch, p, runlog::digest(parts))
}

/// `kd-experiment pipeline` with its artifacts under `dir`, and its pipeline.
fn experiment(args: &Args, dir: &Path) -> anyhow::Result<(kd_experiment::Args, Pipeline)> {
    let exp = kd_experiment::Args {
        command: kd_experiment::Command::Pipeline,
        words: Vec::new(),
        pipeline: kd_train::PipelineArgs {
            artifacts: dir.to_path_buf(),
            ..args.pipeline.clone()
        },
        dry_run: false,
        student_flags: Vec::new(),
    };
    let pipeline = exp.pipeline.open(&[])?;
    Ok((exp, pipeline))
}

/// Our side: the plan of `kd-experiment pipeline` into a scratch folder, each step timed.
pub fn ours(args: &Args) -> anyhow::Result<Run> {
    let dir = crate::scratch(args, "pipeline", "ours")?;
    let result = ours_in(args, &dir);
    std::fs::remove_dir_all(&dir).ok();
    result
}

fn ours_in(args: &Args, dir: &Path) -> anyhow::Result<Run> {
    let (exp, pipeline) = experiment(args, dir)?;
    let steps = kd_experiment::plan::plan(&exp, &pipeline)?;
    let bin = kd_experiment::binaries()?;
    let start = Instant::now();
    let mut stages = Vec::new();
    for step in &steps {
        let t = Instant::now();
        kd_experiment::run_step(&bin, step)?;
        stages.push((step.stage().to_string(), t.elapsed().as_secs_f64()));
    }
    let seconds = start.elapsed().as_secs_f64();
    let accuracy = MODELS
        .iter()
        .map(|(name, stage)| Ok((name.to_string(), test_accuracy(&pipeline.dir(stage))?)))
        .collect::<anyhow::Result<_>>()?;
    Ok(Run {
        stages,
        seconds,
        accuracy,
        machine_gflops: Vec::new(),
    })
}

/// The three models by the names PyTorch's script gives them, and our stage folders.
const MODELS: [(&str, &str); 3] = [
    ("teacher", kd_train::stage::layout::TEACHER),
    ("student", kd_train::stage::layout::STUDENT_KD),
    ("baseline", kd_train::stage::layout::STUDENT_BASELINE),
];

/// A training stage's test accuracy, from its manifest.
fn test_accuracy(dir: &Path) -> anyhow::Result<f64> {
    let m = kd_train::Manifest::read(dir)?;
    m.metrics["test_accuracy"]
        .as_f64()
        .with_context(|| format!("no test accuracy in {}", dir.display()))
}

/// What the script mirrors of a pipeline file; anything else would compare different work.
pub fn check_mirrored(p: &Pipeline) -> anyhow::Result<()> {
    let (d, t, s, k) = (
        &p.config.data,
        &p.config.teacher,
        &p.config.student,
        &p.config.knowledge,
    );
    let cosine = kd_train::config::Schedule::Cosine;
    let main_head = s
        .head_weights
        .iter()
        .all(|(h, w)| (h == "main") == (*w != 0.0));
    let plain = [
        (
            d.name == "fashion-mnist" && d.labels.is_none(),
            "all of Fashion-MNIST's labels",
        ),
        (
            t.schedule == cosine && s.schedule == cosine,
            "cosine schedules",
        ),
        (
            t.weight_decay == 0.0 && s.weight_decay == 0.0,
            "no weight decay",
        ),
        (t.crop_padding == 2 && s.crop_padding == 2, "crop padding 2"),
        (
            t.epoch_steps.is_none() && s.epoch_steps.is_none(),
            "whole epochs",
        ),
        (
            s.arch == "student-cnn" && main_head,
            "student-cnn from the main head",
        ),
        (
            k.views <= 1 && s.dkd_beta.is_none() && !s.standardize_logits,
            "plain Hinton KD",
        ),
    ];
    for (ok, what) in plain {
        anyhow::ensure!(
            ok,
            "--whole-pipeline: PyTorch's script mirrors pipelines with {what} only (pipeline {})",
            p.name
        );
    }
    Ok(())
}

/// PyTorch's side: the script's `pipeline`, timed start to exit.
pub fn theirs(args: &Args, p: &Pipeline, python: &Path) -> anyhow::Result<Run> {
    check_mirrored(p)?;
    let dir = crate::scratch(args, "pipeline", "pytorch")?;
    let (d, t, s) = (&p.config.data, &p.config.teacher, &p.config.student);
    let flag = |b: bool| u8::from(b).to_string();
    let flags: Vec<(&str, String)> = [
        ("--only", "pipeline".to_string()),
        ("--layout", "channels-last".to_string()),
        ("--teacher", t.arch.clone()),
        ("--out", dir.to_string_lossy().into_owned()),
        ("--val-size", d.val_size.to_string()),
        ("--batch-size", t.batch_size.to_string()),
        ("--teacher-epochs", t.epochs.to_string()),
        ("--teacher-lr", t.lr.to_string()),
        ("--teacher-augment", flag(t.augment)),
        ("--aux-weight", t.aux_weight.to_string()),
        (
            "--knowledge-batch",
            p.config.knowledge.batch_size.to_string(),
        ),
        ("--student-epochs", s.epochs.to_string()),
        ("--student-batch", s.batch_size.to_string()),
        ("--student-lr", s.lr.to_string()),
        ("--student-augment", flag(s.augment)),
        ("--temperature", s.temperature.to_string()),
        ("--hard-weight", s.hard_weight.to_string()),
        ("--soft-weight", s.soft_weight.to_string()),
    ]
    .into_iter()
    .chain(d.train_limit.map(|n| ("--train-limit", n.to_string())))
    .chain(d.test_limit.map(|n| ("--test-limit", n.to_string())))
    .collect();
    let flags: Vec<&str> = flags.iter().flat_map(|(f, v)| [*f, v.as_str()]).collect();
    let start = Instant::now();
    let run = run_script(args, python, &d.dir, &flags);
    let seconds = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir).ok();
    let Theirs {
        stages, accuracy, ..
    } = run?;
    Ok(Run {
        stages,
        seconds,
        accuracy: accuracy.into_iter().collect(),
        machine_gflops: Vec::new(),
    })
}

/// Median and range of `xs` in seconds (or "—"): whole seconds for the real pipeline, tenths
/// for short trial runs.
fn cell(xs: &[f64]) -> String {
    crate::median_range(xs, if median(xs) < 100.0 { 1 } else { 0 })
}

/// The table: every stage's seconds, the whole runs, and PyTorch's time over ours (above 1: ours
/// is faster); then the test accuracies, which show both sides did the work.
pub fn table(ours: &[Run], theirs: &[Run]) -> String {
    let mut t = Table::new(&["stage", "ours s", "PyTorch s", "PyTorch / ours"]);
    let row = |t: &mut Table, label: &str, mine: Vec<f64>, them: Vec<f64>| {
        let ratio = median(&them) / median(&mine);
        let ratio = if ratio.is_finite() {
            format!("{ratio:.2}×")
        } else {
            "—".to_string()
        };
        t.row(&[label.to_string(), cell(&mine), cell(&them), ratio]);
    };
    for stage in STAGES {
        let of = |runs: &[Run]| runs.iter().filter_map(|r| r.stage(stage)).collect();
        row(&mut t, stage, of(ours), of(theirs));
    }
    let whole = |runs: &[Run]| runs.iter().map(|r| r.seconds).collect::<Vec<_>>();
    let less_export = ours
        .iter()
        .map(|r| r.seconds - r.stage("export").unwrap_or(0.0))
        .collect();
    row(
        &mut t,
        "whole run, start to exit",
        whole(ours),
        whole(theirs),
    );
    row(
        &mut t,
        "whole run less our export",
        less_export,
        whole(theirs),
    );
    let mut acc = Table::new(&["test accuracy", "ours", "PyTorch"]);
    for (name, _) in MODELS {
        let of = |runs: &[Run]| -> Vec<f64> {
            runs.iter()
                .flat_map(|r| r.accuracy.iter().filter(|(n, _)| n == name))
                .map(|(_, a)| 100.0 * a)
                .collect()
        };
        let show = |xs: Vec<f64>| {
            xs.iter()
                .map(|a| format!("{a:.2}%"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        acc.row(&[name.to_string(), show(of(ours)), show(of(theirs))]);
    }
    format!("{}\n{}", t.to_markdown(), acc.to_markdown())
}

/// How far apart two matrix-product rates may be for runs to count as seen on the same machine.
pub const SAME_SPEED: f64 = 1.10;

/// When each side's rounds ended (a comparison finished over several sittings shows it), the
/// machine's matrix-product rate around each run, what is still missing, and a warning when the
/// machine's speed moved by more than [`SAME_SPEED`] across the runs compared.
pub fn when(rounds: usize, ours: &[Recorded], theirs: &[Recorded]) -> String {
    let mut lines = Vec::new();
    for (side, runs) in [("ours", ours), ("PyTorch's", theirs)] {
        let mut line = format!("- {side}: {} of {rounds} rounds recorded", runs.len());
        for r in runs {
            let rate: Vec<String> = r
                .run
                .machine_gflops
                .iter()
                .map(|g| format!("{g:.0}"))
                .collect();
            line += &format!("; ended {}", r.finished);
            if !rate.is_empty() {
                line += &format!(
                    " (matrix products {} GFLOP/s before / after)",
                    rate.join(" / ")
                );
            }
        }
        if runs.len() < rounds {
            line += "; run the same command again to measure the rest";
        }
        lines.push(line);
    }
    let rates: Vec<f64> = ours
        .iter()
        .chain(theirs)
        .flat_map(|r| r.run.machine_gflops.iter().copied())
        .collect();
    let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rates.iter().copied().fold(0.0, f64::max);
    if rates.len() >= 2 && hi > SAME_SPEED * lo {
        lines.push(format!(
            "\n**The machine's speed moved while these runs were measured** (matrix products {lo:.0}–{hi:.0} GFLOP/s): the ratios above do not compare the two sides on the same machine. Measure again (`--force`) while it holds still."
        ));
    }
    format!("Runs (from `{}`):\n\n{}\n", runlog::FILE, lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(teacher: f64, export: Option<f64>, seconds: f64, acc: f64) -> Run {
        let mut stages = vec![("teacher".to_string(), teacher)];
        stages.extend(export.map(|s| ("export".to_string(), s)));
        Run {
            stages,
            seconds,
            accuracy: vec![("teacher".to_string(), acc)],
            machine_gflops: vec![],
        }
    }

    fn recorded(side: &str, gflops: &[f64]) -> Recorded {
        Recorded {
            conditions: runlog::Conditions {
                side: side.to_string(),
                machine: "m".to_string(),
                threads: 2,
                settings: serde_json::Value::Null,
                code: String::new(),
            },
            finished: "2026-12-02T09:01:40Z".to_string(),
            superseded: false,
            run: Run {
                machine_gflops: gflops.to_vec(),
                ..run(1.0, None, 1.0, 0.9)
            },
        }
    }

    #[test]
    fn the_runs_say_when_they_ended_and_warn_when_the_machine_changed_speed() {
        let steady = when(
            2,
            &[recorded("ours", &[95.0, 97.0])],
            &[recorded("pytorch", &[93.0, 100.0])],
        );
        assert!(
            steady.contains("- ours: 1 of 2 rounds recorded; ended 2026-12-02T09:01:40Z (matrix products 95 / 97 GFLOP/s before / after); run the same command again"),
            "{steady}"
        );
        assert!(!steady.contains("speed moved"), "{steady}");
        // A shared host that turned fast during PyTorch's run (this machine, 2026-12-02).
        let moved = when(
            1,
            &[recorded("ours", &[95.0, 97.0])],
            &[recorded("pytorch", &[93.0, 175.0])],
        );
        assert!(
            moved.contains("speed moved") && moved.contains("93–175 GFLOP/s"),
            "{moved}"
        );
        // Records without the rate (none to compare) warn of nothing.
        assert!(!when(1, &[recorded("ours", &[])], &[]).contains("speed moved"));
    }

    #[test]
    fn the_table_puts_pytorch_over_ours_and_leaves_our_export_out_of_the_fair_total() {
        let ours = [
            run(100.0, Some(10.0), 130.0, 0.9),
            run(120.0, Some(10.0), 150.0, 0.91),
        ];
        let theirs = [run(165.0, None, 180.0, 0.92)];
        let md = table(&ours, &theirs);
        // The cells of the last row named `label` (the accuracy table's rows come last).
        let row = |label: &str| -> Vec<String> {
            let line = md
                .lines()
                .rev()
                .find(|l| l.split('|').nth(1).map(str::trim) == Some(label));
            let line = line.unwrap_or_else(|| panic!("no row {label} in\n{md}"));
            line.split('|')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        };
        // Medians: ours 110 s against 165 s.
        assert_eq!(row("precompute"), ["precompute", "—", "—", "—"]);
        assert_eq!(row("export"), ["export", "10.0 (10.0–10.0)", "—", "—"]);
        assert_eq!(row("whole run, start to exit")[3], "1.29×", "{md}");
        assert_eq!(row("whole run less our export")[3], "1.38×", "{md}");
        assert_eq!(row("teacher"), ["teacher", "90.00%, 91.00%", "92.00%"]);
        let stage_table = md.split("\n\n").next().unwrap_or_default();
        assert!(
            stage_table.contains("110 (100–120)") && stage_table.contains("1.50×"),
            "{md}"
        );
    }
}
