//! `kd-bench --pytorch PYTHON --epoch`: one real teacher epoch, side by side — our
//! `kd-teacher --epochs 1` (the binary beside this one: crop + flip, the validation pass, the test
//! accuracy, the checkpoint) against PyTorch's script doing the same
//! (`pytorch/bench.py --only teacher-epoch`, channels-last, its best layout). Whole processes,
//! start to exit, so loading the data and starting up count on both sides.

use crate::pytorch::{run_script, Theirs};
use crate::{Args, Measurement};
use anyhow::Context;
use kd_train::stage::Pipeline;
use std::path::Path;
use std::time::Instant;

pub use crate::pytorch::{EPOCH as NAME, EPOCH_LABEL as LABEL};

/// Our side: `kd-teacher --epochs 1 --force` into a scratch folder, timed start to exit.
pub fn ours(args: &Args, p: &Pipeline) -> anyhow::Result<Measurement> {
    let images = p.load_data()?.labelled_rows.len();
    let exe = std::env::current_exe()?;
    let teacher = exe.with_file_name("kd-teacher");
    anyhow::ensure!(
        teacher.exists(),
        "{} not found: build the stages (`just build`)",
        teacher.display()
    );
    let dir = crate::scratch(args, "epoch", "ours")?;
    let mut cmd = std::process::Command::new(&teacher);
    cmd.arg("--pipeline")
        .arg(&args.pipeline.pipeline)
        .arg("--artifacts")
        .arg(&dir)
        .args(["--epochs", "1", "--force"]);
    for s in &args.pipeline.overrides {
        cmd.args(["--set", s]);
    }
    let start = Instant::now();
    let status = cmd
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("starting {}", teacher.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir).ok();
    anyhow::ensure!(status.success(), "kd-teacher --epochs 1 failed ({status})");
    Ok(Measurement {
        name: NAME.to_string(),
        images_per_rep: images,
        seconds: vec![seconds],
        split: Vec::new(),
        forward_macs_per_image: 0,
        peak_rss_kib: 0,
        ops: Vec::new(),
        conv_shapes: Vec::new(),
        parts: 1,
    })
}

/// PyTorch's side: the script's `teacher-epoch`, timed start to exit (the seconds it prints
/// itself leave out starting Python and loading the data).
pub fn theirs(args: &Args, p: &Pipeline, python: &Path) -> anyhow::Result<Theirs> {
    let dir = crate::scratch(args, "epoch", "pytorch")?;
    let (d, t) = (&p.config.data, &p.config.teacher);
    let out = dir.to_string_lossy().into_owned();
    let flags: Vec<String> = [
        ("--only", NAME.to_string()),
        ("--layout", "channels-last".to_string()),
        ("--teacher", t.arch.clone()),
        ("--out", out),
        ("--val-size", d.val_size.to_string()),
        ("--batch-size", t.batch_size.to_string()),
    ]
    .into_iter()
    .chain(d.train_limit.map(|n| ("--train-limit", n.to_string())))
    .chain(d.test_limit.map(|n| ("--test-limit", n.to_string())))
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let start = Instant::now();
    let run = run_script(args, python, &p.config.data.dir, &flags);
    let seconds = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir).ok();
    Ok(Theirs {
        seconds: vec![seconds],
        ..run?
    })
}
