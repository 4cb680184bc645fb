//! Every stage in one binary, chosen by the name it is run as (`kd-teacher`, `kd-student`, …,
//! links to this file), or by its first argument (`kd-all kd-teacher --epochs 2`).
//!
//! The GPU machine gets this one binary built with `--features cuda` and makes the links
//! (`deploy/gpu/check.sh`): each CUDA binary carries candle's kernels (about 12 MB compressed),
//! and a call to that machine carries 64 MiB in all. The stage binaries find each other by name
//! in their folder (`kd_experiment::binaries`), so the links work as the binaries do.

use clap::Parser;
use std::process::ExitCode;

/// The stages this binary runs, by name.
const STAGES: [&str; 8] = [
    "kd-teacher",
    "kd-precompute",
    "kd-student",
    "kd-report",
    "kd-export",
    "kd-experiment",
    "kd-bench",
    "kd-predict",
];

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = if STAGES.contains(&called.as_str()) {
        called
    } else if args.len() > 1 {
        args.remove(0);
        args[0].to_string_lossy().into_owned()
    } else {
        String::new()
    };
    run(&name, args)
}

fn run(name: &str, args: Vec<std::ffi::OsString>) -> ExitCode {
    use kd_train::cli::main_with;
    match name {
        "kd-teacher" => {
            main_with(|| kd_teacher::run(&kd_teacher::Args::parse_from(args)).map(drop))
        }
        "kd-precompute" => {
            main_with(|| kd_precompute::run(&kd_precompute::Args::parse_from(args)).map(drop))
        }
        "kd-student" => {
            main_with(|| kd_student::run(&kd_student::Args::parse_from(args)).map(drop))
        }
        "kd-report" => main_with(|| kd_report::run(&kd_report::Args::parse_from(args)).map(drop)),
        "kd-export" => main_with(|| kd_export::run(&kd_export::Args::parse_from(args)).map(drop)),
        "kd-experiment" => main_with(|| kd_experiment::run(&kd_experiment::Args::parse_from(args))),
        "kd-bench" => main_with(|| kd_bench::run(&kd_bench::Args::parse_from(args))),
        "kd-predict" => main_with(|| {
            let args = kd_predict::Args::parse_from(args);
            let predictions = kd_predict::run(&args)?;
            kd_predict::print(&predictions, args.json)
        }),
        other => {
            eprintln!(
                "error: run as one of {} (a link named so, or the first argument), not {other:?}",
                STAGES.join(", ")
            );
            ExitCode::FAILURE
        }
    }
}
