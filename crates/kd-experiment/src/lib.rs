//! The experiment runner. `pipeline`, `compare` and `sweep` are plans: lists of stage runs, each
//! a stage binary with its flags and its place in the experiment (study, variant, control,
//! reference: written to the run's manifest, where the report reads them). The plan comes from
//! the pipeline file's `[experiment]` section; the runs go in order, and a stage whose inputs and
//! settings have not changed skips itself, so a plan can be rerun after any stop.

pub mod plan;
pub mod words;

use anyhow::Context;
use kd_train::PipelineArgs;
use plan::Step;
use std::path::PathBuf;

/// Run the pipeline, or an experiment over it.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kd-experiment", version)]
pub struct Args {
    /// What to run.
    #[arg(value_enum)]
    pub command: Command,
    /// `[NAME] [KEY=VALUE ...]`: the pipeline (`pipelines/NAME.toml`, instead of --pipeline) and
    /// shorthands for `--set experiment.KEY=VALUE`: seeds=3, labels="1000 5000 all", views=8,
    /// storage="f16 top3-f16", variant=e30, labels_teacher_epochs=12, temps="1 2 4",
    /// weights="0.55:0.45 0.1:0.9", heads="main all".
    #[arg(value_name = "NAME|KEY=VALUE")]
    pub words: Vec<String>,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Print the plan and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Flags for every student run (e.g. `-- --epochs 30`, with `--set experiment.variant=e30`).
    #[arg(last = true)]
    pub student_flags: Vec<String>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Every stage in order: teacher, precompute, KD student, baseline, export, report.
    Pipeline,
    /// The pipeline, then per label count and seed the KD student and the baseline (and the
    /// augmented and compact-storage variants `[experiment]` asks for), then the report.
    Compare,
    /// The pipeline, then a KD student per point of `[experiment.sweep]`, then the report.
    Sweep,
}

/// The plan, one command per line; a reader that stops early (`| head`) is not an error.
fn print_plan(steps: &[plan::Step]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for s in steps {
        match writeln!(out, "{}", s.command_line()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut args = args.clone();
    let sets = words::apply(&mut args)?;
    let args = &args;
    let pipeline = args.pipeline.open(&sets)?;
    let steps = plan::plan(args, &pipeline)?;
    if args.dry_run {
        return print_plan(&steps);
    }
    let bin = binaries()?;
    let started = std::time::Instant::now();
    for (i, step) in steps.iter().enumerate() {
        tracing::info!(
            "experiment: step {}/{}: {}",
            i + 1,
            steps.len(),
            step.command_line()
        );
        run_step(&bin, step)?;
    }
    println!(
        "{:?} on {}: {} stage runs in {:.0} s; read {}",
        args.command,
        pipeline.name,
        steps.len(),
        started.elapsed().as_secs_f64(),
        pipeline.dir("report").join("report.md").display()
    );
    Ok(())
}

/// The folder of the stage binaries: `KD_BIN`, else this binary's own folder (or the one above
/// it, for a test binary in `deps/`).
pub fn binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KD_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("finding this binary")?;
    let here = exe.parent().context("this binary's folder")?;
    let found = [Some(here), here.parent()]
        .into_iter()
        .flatten()
        .find(|d| d.join("kd-teacher").is_file());
    found.map(PathBuf::from).with_context(|| {
        format!(
            "no stage binaries (kd-teacher, ...) beside {}: build them (`just build`) or set KD_BIN",
            exe.display()
        )
    })
}

/// Runs one step of a plan; an interrupted stage is [`kd_train::TrainError::Interrupted`].
pub fn run_step(bin: &std::path::Path, step: &Step) -> anyhow::Result<()> {
    let status = std::process::Command::new(bin.join(step.binary))
        .args(&step.args)
        .status()
        .with_context(|| format!("starting {}", bin.join(step.binary).display()))?;
    if status.success() {
        return Ok(());
    }
    if status.code() == Some(kd_train::interrupt::EXIT_CODE as i32) {
        return Err(kd_train::TrainError::Interrupted(format!(
            "stopped during `{}`; run the same command again to continue",
            step.command_line()
        ))
        .into());
    }
    anyhow::bail!("`{}` failed ({status})", step.command_line())
}
