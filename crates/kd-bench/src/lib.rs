//! `just bench`: the throughput of every stage's hot path on the real data and the pipeline's
//! own models, measured in one run, each measurement in its own child process (so its peak
//! resident memory is its own), with the median and spread of several repetitions.
//!
//! Writes `artifacts/bench/bench.md` and `bench.json`. No timing is asserted anywhere: these are
//! numbers to read. Comparisons with another library are measured side by side in one run, never
//! taken from remembered figures.

pub mod epoch;
pub mod parity;
pub mod profile;
pub mod pytorch;
pub mod runlog;
pub mod whole;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Parser;
use kd_data::Batches;
use kd_models::{Classifier, Trainable};
use kd_train::halves::Forward;
use kd_train::loss::{cross_entropy, kd_loss, KdWeights};
use kd_train::optim::{Adam, AdamParams};
use kd_train::stage::layout::{CHECKPOINT, KNOWLEDGE, KNOWLEDGE_FILE, TEACHER};
use kd_train::stage::threads;
use kd_train::table::Table;
use kd_train::{LoadedData, Pipeline, PipelineArgs};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// Measure the pipeline's hot paths.
#[derive(Parser, Debug, Clone)]
#[command(name = "kd-bench", version)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Timed repetitions of each measurement (after one warm-up).
    #[arg(long, default_value_t = 9)]
    pub reps: usize,
    /// Batches per repetition.
    #[arg(long, default_value_t = 5)]
    pub batches: usize,
    /// Where bench.md and bench.json go.
    #[arg(long, default_value = "artifacts/bench")]
    pub out: PathBuf,
    /// Run one measurement in this process and print it as JSON (used by the parent run).
    #[arg(long, hide = true)]
    pub only: Option<String>,
    /// Measure PyTorch's side too, with this Python (it must have torch: `just bench-pytorch`),
    /// alternating with ours, `--rounds` times.
    #[arg(long, value_name = "PYTHON")]
    pub pytorch: Option<PathBuf>,
    /// Alternating rounds of ours and PyTorch's measurements (with --pytorch).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// With --pytorch: also one real teacher epoch per round, ours (`kd-teacher --epochs 1`)
    /// against PyTorch's script, whole processes (about 4 minutes a round).
    #[arg(long, requires = "pytorch")]
    pub epoch: bool,
    /// With --pytorch: instead of the measurements, the whole pipeline per round, ours
    /// (`kd-experiment pipeline`, each stage timed) against PyTorch's script doing the same; writes
    /// `<out>/pipeline.md`. The default pipeline takes about 2 hours a side on 2 cores: `--set
    /// teacher.epochs=N` shortens both alike.
    #[arg(long, requires = "pytorch", conflicts_with = "epoch")]
    pub whole_pipeline: bool,
    /// With --whole-pipeline: run only this side's rounds now (the other side's recorded rounds
    /// are still read back and shown). Every side's run is recorded in
    /// `<out>/pipeline-runs.json` as it ends; the same command run again reads back what is
    /// recorded under the same conditions and runs what is missing (`--force` runs every round
    /// again; the earlier runs stay in the file).
    #[arg(long, value_enum, requires = "whole_pipeline")]
    pub side: Option<whole::Side>,
    /// Instead of timing, sample this measurement with `perf` and write where its CPU time goes
    /// (by kind of work) to `<out>/profile-<measurement>.md` (e.g. `teacher-step`).
    #[arg(long, value_name = "MEASUREMENT")]
    pub profile: Option<String>,
    /// The convolutions' table in bench.md one row per layer, named by its channels (`16 → 48
    /// channels`), instead of one row per kernel and input size.
    #[arg(long)]
    pub by_layer: bool,
    /// Instead of timing: every op and network on the CPU and on the GPU (`--device cuda`),
    /// forward and gradients compared; writes `<out>/parity.md` and `parity.json`, fails if a
    /// check does.
    #[arg(long)]
    pub parity: bool,
}

/// The matrix-product limit: a square f32 product of this size, ours and (with `--pytorch`)
/// PyTorch's, against which the teacher step's arithmetic rate is read.
pub const MATMUL: &str = "matmul-2048";
const MATMUL_N: usize = 2048;

/// GFLOP/s of a `MATMUL` measurement (its "images" are products).
pub fn matmul_gflops(products_per_sec: f64) -> f64 {
    2.0 * (MATMUL_N as f64).powi(3) * products_per_sec / 1e9
}

/// What each measurement is: its name and what it times.
pub const MEASUREMENTS: [(&str, &str); 8] = [
    (
        "data-load",
        "data loading: read, verify, decode, fingerprint, normalise (every image)",
    ),
    (
        "data",
        "data pipeline: shuffle, augment, batch (teacher batch)",
    ),
    ("teacher-step", "teacher training step (all heads)"),
    (
        "precompute",
        "precompute: teacher inference, all heads (knowledge batch)",
    ),
    (
        "student-kd-step",
        "student training step from the knowledge file (KD)",
    ),
    (
        "student-baseline-step",
        "student training step, labels only",
    ),
    (
        "online-kd-step",
        "online distillation: teacher forward + student KD step",
    ),
    (
        "teacher-eval",
        "teacher evaluation forward (knowledge batch, from variables)",
    ),
];

/// One measurement's samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub name: String,
    pub images_per_rep: usize,
    /// Seconds per repetition.
    pub seconds: Vec<f64>,
    /// Seconds per repetition spent in forward / backward / optimiser, where split.
    pub split: Split,
    /// Multiply-adds of one image's forward pass through the trained model.
    pub forward_macs_per_image: u64,
    pub peak_rss_kib: u64,
    /// Wall seconds per batch in each kind of our ops (`kd_models::timing`): the training steps and
    /// inference (empty for the other measurements).
    #[serde(default)]
    pub ops: Vec<(String, f64)>,
    /// Wall seconds per batch and GFLOP/s of the convolutions by pass, kernel and input size.
    #[serde(default)]
    pub conv_shapes: Vec<(String, f64, f64)>,
    /// How many parts of each batch ran at once, each timing its ops on its own thread (2 for a
    /// teacher trained in halves, `kd_train::halves`; 0 or 1 for one).
    #[serde(default)]
    pub parts: usize,
}

impl Measurement {
    pub fn images_per_sec(&self) -> Vec<f64> {
        self.seconds
            .iter()
            .map(|s| self.images_per_rep as f64 / s)
            .collect()
    }
}

/// `median (lo–hi)` of `xs` with `decimals` places, or "—" when there are none.
pub(crate) fn median_range(xs: &[f64], decimals: usize) -> String {
    median_range_in(xs, decimals, "")
}

/// [`median_range`] with a unit after the median and after the range's end: `46% (42–47%)`.
pub(crate) fn median_range_in(xs: &[f64], decimals: usize, unit: &str) -> String {
    if xs.is_empty() {
        return "—".to_string();
    }
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(0.0, f64::max);
    let p = decimals;
    format!("{:.p$}{unit} ({lo:.p$}–{hi:.p$}{unit})", median(xs))
}

/// A fresh scratch folder `<out>/.<what>-<who>-<pid>` (a leftover of the same name cleared), for
/// a whole-process measurement's outputs; the caller removes it.
pub(crate) fn scratch(args: &Args, what: &str, who: &str) -> anyhow::Result<PathBuf> {
    let dir = args
        .out
        .join(format!(".{what}-{who}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// This program, to run a measurement in a child process: itself, or (from a test binary) the
/// `kd-bench` built beside the stage binaries.
fn bench_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this binary")?;
    if exe.file_stem().is_some_and(|s| s == "kd-bench") {
        return Ok(exe);
    }
    Ok(kd_experiment::binaries()?.join("kd-bench"))
}

/// One of our measurements in a child process of its own (its peak memory is its own).
fn ours(args: &Args, name: &str) -> anyhow::Result<Measurement> {
    let mut cmd = std::process::Command::new(bench_exe()?);
    cmd.args([
        "--only",
        name,
        "--reps",
        &args.reps.to_string(),
        "--batches",
        &args.batches.to_string(),
    ])
    .arg("--pipeline")
    .arg(&args.pipeline.pipeline)
    .arg("--artifacts")
    .arg(&args.pipeline.artifacts);
    for s in &args.pipeline.overrides {
        cmd.args(["--set", s]);
    }
    if let Some(d) = args.pipeline.device {
        cmd.args(["--device", &d.to_string()]);
    }
    if let Some(d) = &args.pipeline.data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    if args.by_layer {
        cmd.arg("--by-layer");
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    if !out.status.success() {
        anyhow::bail!("measurement {name} failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("measurement {name}: {line}"))
}

/// Ours and PyTorch's, alternating, `--rounds` times; the table and the matrix-product limit.
fn side_by_side(args: &Args, p: &Pipeline, python: &std::path::Path) -> anyhow::Result<String> {
    let data = &p.config.data.dir;
    let teacher = &p.config.teacher.arch;
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        for (name, layouts) in pytorch::COMPARED {
            tracing::info!(
                "bench: round {round}/{}: {name}, ours then PyTorch",
                args.rounds
            );
            mine.push(ours(args, name)?);
            for layout in layouts.iter() {
                theirs.push(pytorch::theirs(args, python, data, teacher, name, layout)?);
            }
        }
        if args.epoch {
            tracing::info!(
                "bench: round {round}/{}: one teacher epoch, ours then PyTorch",
                args.rounds
            );
            mine.push(epoch::ours(args, p)?);
            theirs.push(epoch::theirs(args, p, python)?);
        }
    }
    let epoch_note = if args.epoch {
        " The teacher epoch times whole processes, once per round each: our `kd-teacher --epochs 1` and the script's `teacher-epoch` (channels-last), from start to exit."
    } else {
        ""
    };
    Ok(format!(
        "\n## Side by side with PyTorch\n\nThe same models, batches and data, {} alternating rounds (ours, then PyTorch NCHW and channels-last), {} threads each; img/s as median (range) over every repetition of every round.{epoch_note}\n\n{}\n{}",
        args.rounds,
        threads(),
        pytorch::table(&mine, &theirs).to_markdown(),
        pytorch::limit_shares(&mine, &theirs).unwrap_or_default()
    ))
}

/// Wall seconds per step in each kind of our ops, and in each convolution by pass, kernel and
/// input size (with its GFLOP/s).
#[derive(Default)]
struct OpTimes {
    kinds: Vec<(String, f64)>,
    shapes: Vec<(String, f64, f64)>,
    /// How many parts of the batch ran at once, each on its own thread (`kd_train::halves`), so
    /// that the ops' times add up to about that many times the wall time; 0 or 1 for one.
    parts: usize,
}

/// [`time_reps`] with our ops timing themselves (`kd_models::timing`) during the timed steps:
/// also the wall seconds per step of each kind of op.
fn time_ops(
    args: &Args,
    mut step: impl FnMut(usize) -> anyhow::Result<Vec<(&'static str, f64)>>,
) -> anyhow::Result<((Vec<f64>, Split), OpTimes)> {
    // As training and the precompute run their batches: the other workers kept awake.
    let t = kd_train::awake::workers_awake(|| {
        time_reps(args, |i| {
            if i == 1 {
                // The warm-up step is over: count from the first timed one.
                kd_models::timing::take();
                kd_models::timing::take_details();
                kd_models::timing::enable(true);
            }
            step(i)
        })
    });
    kd_models::timing::enable(false);
    let steps = (args.reps * args.batches).max(1) as f64;
    let kinds = kd_models::timing::take()
        .into_iter()
        .map(|(kind, secs, _)| (kind.to_string(), secs / steps))
        .collect();
    let shapes = kd_models::timing::take_details()
        .into_iter()
        .map(|(shape, secs, macs)| (shape, secs / steps, 2.0 * macs as f64 / secs / 1e9))
        .collect();
    Ok((
        t?,
        OpTimes {
            kinds,
            shapes,
            parts: 1,
        },
    ))
}

/// Seconds per repetition of each named part of a step.
type Split = Vec<(String, Vec<f64>)>;

/// Times `reps` repetitions of `batches` calls of `step`, after one warm-up call. `step` returns
/// the seconds of each part it splits its work into.
fn time_reps(
    args: &Args,
    mut step: impl FnMut(usize) -> anyhow::Result<Vec<(&'static str, f64)>>,
) -> anyhow::Result<(Vec<f64>, Split)> {
    step(0)?;
    let mut seconds = Vec::new();
    let mut split: Split = Vec::new();
    for rep in 0..args.reps {
        let t0 = Instant::now();
        let mut parts: Vec<(&'static str, f64)> = Vec::new();
        for b in 0..args.batches {
            for (i, (name, s)) in step(1 + rep * args.batches + b)?.into_iter().enumerate() {
                match parts.get_mut(i) {
                    Some(p) => p.1 += s,
                    None => parts.push((name, s)),
                }
            }
        }
        seconds.push(t0.elapsed().as_secs_f64());
        for (i, (name, s)) in parts.into_iter().enumerate() {
            match split.get_mut(i) {
                Some(p) => p.1.push(s),
                None => split.push((name.to_string(), vec![s])),
            }
        }
    }
    Ok((seconds, split))
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let t0 = Instant::now();
    let out = f()?;
    // A GPU works asynchronously: the part ends when its work has.
    if let Some(device) = COMPUTE.get() {
        device.synchronize()?;
    }
    Ok((out, t0.elapsed().as_secs_f64()))
}

/// The device the measurements compute on (`device` in the pipeline, `--device`).
static COMPUTE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Rows `[start, start + n)` of the training rows, wrapping around.
fn rows(data: &LoadedData, start: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| data.train_rows[(start + i) % data.train_rows.len()])
        .collect()
}

fn batch(
    data: &LoadedData,
    rows: &[u32],
    augment: bool,
    seed: u64,
) -> anyhow::Result<kd_data::Batch> {
    let mut b = Batches::new(&data.train_images, &data.train_labels, rows, rows.len());
    if augment {
        let aug = match &data.dataset.train_sources {
            Some(_) => kd_data::Augment::resized_crop(data.spec.height),
            None => kd_data::Augment::CropFlip { crop_padding: 2 },
        };
        b = b.augmented(
            aug,
            seed,
            0,
            &data.dataset.normalization,
            data.dataset.train_sources.as_deref(),
        );
    }
    b.next().context("no batch")?.map_err(Into::into)
}

fn optimiser(model: &Trainable, lr: f64) -> anyhow::Result<Adam> {
    let vars = model
        .vars
        .varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Adam::new(vars, AdamParams::new(lr, 0.0))?)
}

/// The teacher the other measurements distil from: the pipeline's checkpoint if it exists,
/// else a freshly initialised one (the speed is the same).
fn frozen_teacher(p: &Pipeline, data: &LoadedData) -> anyhow::Result<Box<dyn Classifier>> {
    let arch = &p.config.teacher.arch;
    let ckpt = p.dir(TEACHER).join(CHECKPOINT);
    Ok(if ckpt.is_file() {
        kd_models::load_frozen(arch, &data.spec, &ckpt, &data.device)?
    } else {
        let t = Trainable::new(arch, &data.spec, 0, &data.device)?;
        kd_models::frozen(arch, &data.spec, t.named_tensors(), &data.device)?
    })
}

/// The teacher's logits per head for every training row: the knowledge file if it matches, else
/// random logits of the same shape (reading them costs the same).
fn knowledge(p: &Pipeline, data: &LoadedData, heads: &[String]) -> anyhow::Result<Vec<Tensor>> {
    let path = p.dir(KNOWLEDGE).join(KNOWLEDGE_FILE);
    if let Ok(k) = kd_knowledge::KnowledgeFile::open(&path) {
        if k.meta.dataset.rows == data.dataset.train.len() {
            return heads
                .iter()
                .map(|h| k.logits(h, &data.device).map_err(Into::into))
                .collect();
        }
    }
    let n = data.dataset.train.len();
    heads
        .iter()
        .map(|_| Tensor::randn(0f32, 3.0, (n, data.spec.classes), &data.device).map_err(Into::into))
        .collect()
}

fn forward_macs(model: &dyn Classifier, data: &LoadedData) -> anyhow::Result<u64> {
    let x = data.train_images.narrow(0, 0, 1)?.to_device(&data.device)?;
    let (out, macs) = kd_models::macs::count(|| model.forward_t(&x, false));
    out?;
    Ok(macs)
}

/// Runs one measurement in this process.
pub fn measure(args: &Args, name: &str) -> anyhow::Result<Measurement> {
    let p = args.pipeline.open(&[])?;
    let data = p.load_data()?;
    let _ = COMPUTE.set(data.device.clone());
    let b = Bench {
        args,
        p: &p,
        data: &data,
    };
    let timing = match name {
        "data-load" => b.data_load()?,
        "data" => b.data_pipeline()?,
        "teacher-step" => b.teacher_step()?,
        MATMUL => b.matmul_limit()?,
        "precompute" | "teacher-eval" => b.inference(name == "precompute")?,
        "student-kd-step" | "student-baseline-step" | "online-kd-step" => b.student_step(name)?,
        other => anyhow::bail!("unknown measurement {other:?}"),
    };
    Ok(Measurement {
        name: name.to_string(),
        images_per_rep: timing.images,
        seconds: timing.seconds,
        split: timing.split,
        forward_macs_per_image: timing.macs,
        peak_rss_kib: peak_rss_kib(),
        ops: timing.ops.kinds,
        conv_shapes: timing.ops.shapes,
        parts: timing.ops.parts,
    })
}

/// One measurement's timings: images per repetition, seconds per repetition and their split,
/// and the model's multiply-adds per image (0 when no model).
struct Timing {
    images: usize,
    seconds: Vec<f64>,
    split: Split,
    macs: u64,
    ops: OpTimes,
}

/// What every measurement needs: the flags, the pipeline and its data.
struct Bench<'a> {
    args: &'a Args,
    p: &'a Pipeline,
    data: &'a LoadedData,
}

impl Bench<'_> {
    fn timing(images: usize, (seconds, split): (Vec<f64>, Split), macs: u64) -> Timing {
        Timing {
            images,
            seconds,
            split,
            macs,
            ops: OpTimes::default(),
        }
    }

    fn data_load(&self) -> anyhow::Result<Timing> {
        let d = &self.data.dataset;
        let one_batch = Args {
            batches: 1,
            ..self.args.clone()
        };
        let t = time_reps(&one_batch, |_| {
            let (_, s) = timed(|| Ok(self.p.load_data()?))?;
            Ok(vec![("load", s)])
        })?;
        Ok(Self::timing(d.train.len() + d.test.len(), t, 0))
    }

    fn data_pipeline(&self) -> anyhow::Result<Timing> {
        let tb = self.p.config.teacher.batch_size;
        let t = time_reps(self.args, |i| {
            let r = rows(self.data, i * tb, tb);
            let (_, s) = timed(|| batch(self.data, &r, true, i as u64))?;
            Ok(vec![("batch", s)])
        })?;
        Ok(Self::timing(tb * self.args.batches, t, 0))
    }

    /// The machine's matrix-product limit as candle reaches it: `--batches` products of two
    /// 2048×2048 f32 matrices per repetition (the "images" of this measurement).
    fn matmul_limit(&self) -> anyhow::Result<Timing> {
        let dev = &self.data.device;
        let a = Tensor::randn(0f32, 1.0, (MATMUL_N, MATMUL_N), dev)?;
        let b = Tensor::randn(0f32, 1.0, (MATMUL_N, MATMUL_N), dev)?;
        let t = time_reps(self.args, |_| {
            let (_, s) = timed(|| Ok(a.matmul(&b)?))?;
            Ok(vec![("matmul", s)])
        })?;
        Ok(Self::timing(self.args.batches, t, (MATMUL_N as u64).pow(3)))
    }

    fn teacher_step(&self) -> anyhow::Result<Timing> {
        let (t, data) = (&self.p.config.teacher, self.data);
        let tb = t.batch_size;
        let model = Trainable::new(&t.arch, &data.spec, t.seed, &data.device)?;
        let macs = forward_macs(model.model.as_ref(), data)?;
        let mut opt = optimiser(&model, t.lr)?;
        let timings = time_ops(self.args, |i| {
            let b = batch(data, &rows(data, i * tb, tb), t.augment, i as u64)?;
            let b = b.to_device(&data.device)?;
            // As `kd-teacher` trains: two halves where the model allows it (`kd_train::halves`).
            let (forward, f) = timed(|| {
                let forward = Forward::run(&model, &b, &mut |b, heads| {
                    kd_train::loss::teacher_loss(heads, &b.labels, t.aux_weight)
                })?;
                forward.loss()?;
                Ok(forward)
            })?;
            let (grads, bw) = timed(|| Ok(forward.backward(&model)?))?;
            let ((), o) = timed(|| Ok(opt.step(&grads)?))?;
            Ok(vec![("forward", f), ("backward", bw), ("optimiser", o)])
        })?;
        let (timings, ops) = timings;
        let parts = if model.model.trains_in_halves() { 2 } else { 1 };
        Ok(Timing {
            ops: OpTimes { parts, ..ops },
            ..Self::timing(tb * self.args.batches, timings, macs)
        })
    }

    /// The teacher's forward at the knowledge batch: loaded from its checkpoint (`frozen`, as
    /// the precompute runs it) or built from variables (as evaluation during training).
    fn inference(&self, frozen: bool) -> anyhow::Result<Timing> {
        let (p, data) = (self.p, self.data);
        let kb = p.config.knowledge.batch_size;
        let model: Box<dyn Classifier> = if frozen {
            frozen_teacher(p, data)?
        } else {
            Trainable::new(&p.config.teacher.arch, &data.spec, 0, &data.device)?.model
        };
        let macs = forward_macs(model.as_ref(), data)?;
        let (timings, ops) = time_ops(self.args, |i| {
            kd_train::interrupt::check("measuring")?;
            let r = rows(data, i * kb, kb);
            let subset = kd_train::Subset {
                rows: &r,
                ..data.train()
            };
            let (_, s) = timed(|| Ok(kd_train::predict(model.as_ref(), subset, kb, "")?))?;
            Ok(vec![("forward", s)])
        })?;
        Ok(Timing {
            ops,
            ..Self::timing(kb * self.args.batches, timings, macs)
        })
    }

    /// A student step: from the knowledge file, on labels alone, or online (the teacher's
    /// forward on every batch).
    fn student_step(&self, name: &str) -> anyhow::Result<Timing> {
        let (p, data, s) = (self.p, self.data, &self.p.config.student);
        let sb = s.batch_size;
        let model = Trainable::new(&s.arch, &data.spec, s.seed, &data.device)?;
        let macs = forward_macs(model.model.as_ref(), data)?;
        let mut opt = optimiser(&model, s.lr)?;
        let targets = Targets::new(p, data, name)?;
        let baseline = name == "student-baseline-step";
        let (timings, ops) = time_ops(self.args, |i| {
            kd_train::interrupt::check("measuring")?;
            let b = batch(data, &rows(data, i * sb, sb), s.augment, i as u64)?;
            let b = b.to_device(&data.device)?;
            let mut parts = Vec::new();
            let teacher = targets.of(&b, &mut parts)?;
            let (loss, f) = timed(|| {
                let out = model.model.forward_t(&b.images, true)?;
                let loss = if baseline {
                    cross_entropy(&out[0], &b.labels)?
                } else {
                    kd_loss(&out[0], &teacher, &b.labels, None, &targets.weights)?.total
                };
                loss.to_scalar::<f32>()?;
                Ok(loss)
            })?;
            let (grads, bw) = timed(|| Ok(loss.backward()?))?;
            let ((), o) = timed(|| Ok(opt.step(&grads)?))?;
            parts.extend([("forward", f), ("backward", bw), ("optimiser", o)]);
            Ok(parts)
        })?;
        Ok(Timing {
            ops,
            ..Self::timing(sb * self.args.batches, timings, macs)
        })
    }
}

/// Where a student step's soft targets come from: the knowledge file (cached), the teacher run on
/// the batch (online), or nowhere (the baseline).
struct Targets {
    heads: Vec<String>,
    weights: KdWeights,
    cached: Vec<Tensor>,
    teacher: Option<Box<dyn Classifier>>,
}

impl Targets {
    fn new(p: &Pipeline, data: &LoadedData, name: &str) -> anyhow::Result<Self> {
        let (heads, weights) = KdWeights::of(&p.config.student);
        Ok(Self {
            cached: match name {
                "student-kd-step" => knowledge(p, data, &heads)?,
                _ => vec![],
            },
            teacher: match name {
                "online-kd-step" => Some(frozen_teacher(p, data)?),
                _ => None,
            },
            weights,
            heads,
        })
    }

    /// The batch's soft targets (timing the teacher's forward into `parts` when online).
    fn of(
        &self,
        b: &kd_data::Batch,
        parts: &mut Vec<(&'static str, f64)>,
    ) -> anyhow::Result<Vec<Tensor>> {
        let Some(t) = &self.teacher else {
            return Ok(self
                .cached
                .iter()
                .map(|c| c.index_select(&b.rows, 0))
                .collect::<Result<_, _>>()?);
        };
        let (out, tf) = timed(|| Ok(t.forward_t(&b.images, false)?))?;
        parts.push(("teacher", tf));
        let all = t.heads();
        self.heads
            .iter()
            .map(|h| all.iter().position(|x| x == h).map(|i| out[i].clone()))
            .collect::<Option<Vec<_>>>()
            .context("the teacher lacks a head the student's settings use")
    }
}

/// [`parity`]'s checks on the pipeline's device, written to `<out>/parity.{md,json}`.
fn write_parity(args: &Args) -> anyhow::Result<()> {
    let p = args.pipeline.open(&[])?;
    let gpu = p.config.device.open()?;
    if gpu.is_cpu() {
        tracing::warn!("parity: no GPU (device = {}); comparing the GPU's path run on the CPU, without the CUDA kernels", p.config.device);
    }
    let checks = parity::checks(&gpu)?;
    let md = parity::render(&kd_models::device::describe(&gpu), &checks);
    std::fs::create_dir_all(&args.out)?;
    kd_data::write_atomic_bytes(&args.out.join("parity.md"), md.as_bytes())?;
    let json = serde_json::to_string_pretty(&checks)?;
    kd_data::write_atomic_bytes(&args.out.join("parity.json"), json.as_bytes())?;
    println!("{md}");
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.what.as_str())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("parity failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Runs every measurement in a child process and writes the tables.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(name) = &args.only {
        kd_models::timing::by_layer(args.by_layer);
        println!("{}", serde_json::to_string(&measure(args, name)?)?);
        return Ok(());
    }
    if let Some(name) = &args.profile {
        return write_profile(args, name);
    }
    if args.parity {
        return write_parity(args);
    }
    if let (true, Some(python)) = (args.whole_pipeline, &args.pytorch) {
        return write_whole_pipeline(args, python);
    }
    let mut results = Vec::new();
    for (name, what) in MEASUREMENTS {
        tracing::info!("bench: {what}");
        results.push(ours(args, name)?);
    }
    tracing::info!("bench: the matrix-product limit ({MATMUL})");
    results.push(ours(args, MATMUL)?);
    let pipeline = args.pipeline.open(&[])?;
    let mut md = render(args, &pipeline, &results);
    if let Some(python) = &args.pytorch {
        md += &side_by_side(args, &pipeline, python)?;
    }

    std::fs::create_dir_all(&args.out)?;
    kd_data::write_atomic_bytes(&args.out.join("bench.md"), md.as_bytes())?;
    kd_data::write_atomic_bytes(
        &args.out.join("bench.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    println!("{md}\nwrote {}", args.out.join("bench.md").display());
    Ok(())
}

/// `--whole-pipeline`: ours and PyTorch's whole pipeline, alternating, `--rounds` times, each
/// side's runs recorded as they end and read back when recorded already (`runlog.rs`); writes
/// `<out>/pipeline.md`.
pub fn write_whole_pipeline(args: &Args, python: &std::path::Path) -> anyhow::Result<()> {
    let p = args.pipeline.open(&[])?;
    // Refused before our side spends a whole run on it.
    whole::check_mirrored(&p)?;
    let (mine, theirs) = whole::rounds(args, &p, python)?;
    let sets: String = args
        .pipeline
        .overrides
        .iter()
        .map(|s| format!(" --set {s}"))
        .collect();
    let runs = |r: &[whole::Recorded]| r.iter().map(|r| r.run.clone()).collect::<Vec<_>>();
    let md = format!(
        "# The whole pipeline, side by side\n\n`kd-bench --pytorch PYTHON --whole-pipeline --rounds {}{sets}` on {} ({} teacher epochs, {} student epochs), {} threads each, on {}: our `kd-experiment pipeline` (each stage binary timed as a process) against PyTorch's script doing the same work (channels-last), alternating; seconds as median (range) over the rounds.\n\n{}\n{}",
        args.rounds,
        args.pipeline.pipeline.display(),
        p.config.teacher.epochs,
        p.config.student.epochs,
        threads(),
        runlog::machine(),
        whole::table(&runs(&mine), &runs(&theirs)),
        whole::when(args.rounds, &mine, &theirs),
    );
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("pipeline.md");
    kd_data::write_atomic_bytes(&path, md.as_bytes())?;
    println!("{md}\nwrote {}", path.display());
    Ok(())
}

/// `--profile NAME`: perf samples of one measurement, sorted by kind of work.
fn write_profile(args: &Args, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        MEASUREMENTS.iter().any(|(n, _)| *n == name),
        "unknown measurement {name:?} (one of: {})",
        MEASUREMENTS.map(|(n, _)| n).join(", ")
    );
    std::fs::create_dir_all(&args.out)?;
    let dir = args.out.join(format!(".profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    tracing::info!(
        "bench: sampling {name} with perf ({} × {} batches)",
        args.reps,
        args.batches
    );
    let result = profile::record(args, name, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let p = result?;
    let md = format!(
        "# Where the time goes: {name}\n\n`kd-bench --profile {name} --reps {} --batches {}`, {} threads: {} perf samples of CPU time (499 Hz per thread, call stacks with inlined frames), each counted under the first frame from the leaf up that names a kind of work; {} samples of loading the data left out. Shares of all CPU time, so waiting threads count.\n\n{}",
        args.reps,
        args.batches,
        threads(),
        p.total,
        p.left_out,
        p.to_markdown()
    );
    let path = args.out.join(format!("profile-{name}.md"));
    kd_data::write_atomic_bytes(&path, md.as_bytes())?;
    println!("{md}\nwrote {}", path.display());
    Ok(())
}

fn render(args: &Args, p: &Pipeline, results: &[Measurement]) -> String {
    let mut t = Table::new(&[
        "measurement",
        "img/s (median)",
        "spread (min–max)",
        "split, ms per batch (median)",
        "peak RSS",
    ]);
    let mut gflops = Vec::new();
    for m in results.iter().filter(|m| m.name != MATMUL) {
        let what = MEASUREMENTS
            .iter()
            .find(|(n, _)| *n == m.name)
            .map_or(m.name.as_str(), |(_, w)| *w);
        let ips = m.images_per_sec();
        let med = median(&ips);
        let lo = ips.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = ips.iter().cloned().fold(0.0, f64::max);
        let split: Vec<String> = m
            .split
            .iter()
            .filter(|_| m.split.len() > 1)
            .map(|(n, s)| format!("{n} {:.1}", 1e3 * median(s) / args.batches as f64))
            .collect();
        t.row(&[
            what.to_string(),
            format!("{med:.0}"),
            format!("{lo:.0}–{hi:.0}"),
            split.join(", "),
            format!("{:.0} MiB", m.peak_rss_kib as f64 / 1024.0),
        ]);
        if m.name.ends_with("-step")
            && !m.name.starts_with("online")
            && m.forward_macs_per_image > 0
        {
            // Training does the forward's work three times: forward, input gradients, weight gradients.
            let flops = 2.0 * 3.0 * m.forward_macs_per_image as f64 * med;
            gflops.push(format!(
                "{}: {:.1} GFLOP/s ({:.1} MFLOP per image forward)",
                m.name,
                flops / 1e9,
                2.0 * m.forward_macs_per_image as f64 / 1e6
            ));
        }
    }
    let med = |name: &str| {
        results
            .iter()
            .find(|m| m.name == name)
            .map(|m| median(&m.images_per_sec()))
    };
    let mut ratios = Vec::new();
    if let (Some(kd), Some(base)) = (med("student-kd-step"), med("student-baseline-step")) {
        ratios.push(format!(
            "- distilling from the knowledge file runs at {:.2}× the speed of training on labels alone (KD step / baseline step)",
            kd / base
        ));
    }
    if let (Some(kd), Some(online)) = (med("student-kd-step"), med("online-kd-step")) {
        ratios.push(format!("- the cache buys {:.1}×: KD from the knowledge file / online distillation (teacher forward on every batch)", kd / online));
    }
    format!(
        "# Benchmarks: `{}`\n\n`just bench` on {} threads: medians of {} repetitions of {} batches, after a warm-up; each measurement runs in its own process (its peak RSS is its own). \
         Real images of `{}`; teacher `{}` (batch {}), student `{}` (batch {}), precompute batch {}.\n\n{}\n{}\n\nAchieved arithmetic (multiply-adds counted as 2; training = 3 × forward): {}.\n",
        p.name,
        threads(),
        args.reps,
        args.batches,
        p.config.data.name,
        p.config.teacher.arch,
        p.config.teacher.batch_size,
        p.config.student.arch,
        p.config.student.batch_size,
        p.config.knowledge.batch_size,
        t.to_markdown(),
        ratios.join("\n"),
        gflops.join("; ")
    ) + &limit_line(results)
        + &ops_table(args, results)
        + &conv_shapes_table(args, results)
}

/// The teacher step's convolutions by pass, kernel and input size (and channels, layer by layer,
/// with `--by-layer`): wall time per batch and the arithmetic rate of their matrix products
/// (im2col and col2im included).
fn conv_shapes_table(args: &Args, results: &[Measurement]) -> String {
    let Some(m) = results
        .iter()
        .find(|m| m.name == "teacher-step" && !m.conv_shapes.is_empty())
    else {
        return String::new();
    };
    let mut rows = m.conv_shapes.clone();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (what, summed) = if args.by_layer {
        (
            "pass, kernel at input size, channels",
            "Every layer (layers alike in all of these summed)",
        )
    } else {
        (
            "pass, kernel at input size",
            "Every convolution of a kind summed",
        )
    };
    let mut t = Table::new(&[
        format!("convolutions: {what}"),
        "ms per batch".into(),
        "GFLOP/s".into(),
    ]);
    for (shape, secs, gflops) in rows {
        t.row(&[shape, format!("{:.1}", secs * 1e3), format!("{gflops:.0}")]);
    }
    format!(
        "\n## The teacher step's convolutions by shape\n\n{summed} (each timed around its work, all threads{}; a backward computes dW and, except for the first layer's, dx: twice the forward's multiply-adds).\n\n{}",
        if m.parts > 1 { ", the batch's parts at once each on its own thread: per-thread rates" } else { "" },
        t.to_markdown()
    )
}

/// Where the teacher's training step spends its wall time: our ops, timed by themselves, and
/// what is left of the forward and backward (candle's own ops), per batch.
fn ops_table(args: &Args, results: &[Measurement]) -> String {
    let Some(m) = results
        .iter()
        .find(|m| m.name == "teacher-step" && !m.ops.is_empty())
    else {
        return String::new();
    };
    let steps = (m.seconds.len() * args.batches).max(1) as f64;
    let part = |name: &str| -> f64 {
        m.split
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, v)| v.iter().sum::<f64>())
            / steps
    };
    // With the batch's parts on their own threads at once, each op is timed on its part's
    // thread: the ops add up to that many threads' time, the base of the shares.
    let threads_at_once = m.parts.max(1) as f64;
    let total = m.seconds.iter().sum::<f64>() / steps * threads_at_once;
    let mut rows: Vec<(String, f64)> = m.ops.clone();
    for (phase, what) in [
        ("forward", "reshapes, concatenations, the losses"),
        (
            "backward",
            "zero-filled gradient buffers and their sums, the concatenations' and losses' gradients",
        ),
    ] {
        let ours: f64 = m
            .ops
            .iter()
            .filter(|(k, _)| k.contains(phase))
            .map(|(_, s)| s)
            .sum();
        rows.push((
            format!("the rest of the {phase}: candle's own ops ({what})"),
            (part(phase) * threads_at_once - ours).max(0.0),
        ));
    }
    rows.push(("optimiser (Adam)".to_string(), part("optimiser")));
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut t = Table::new(&["kind of work", "ms per batch", "share of the step"]);
    for (k, s) in rows {
        t.row(&[
            k,
            format!("{:.1}", s * 1e3),
            format!("{:.0}%", 100.0 * s / total),
        ]);
    }
    let base = if m.parts > 1 {
        format!(
            "The batch ran as {} parts at once (`kd_train::halves`), each on a thread of its own: each of our ops is timed around its work on its part's thread, and the shares are of the {} threads' time ({:.0} ms per batch, {} × the wall time); the rest is candle's.",
            m.parts,
            m.parts,
            total * 1e3,
            m.parts
        )
    } else {
        format!(
            "Wall time per batch ({:.0} ms in all): each of our ops timed around its work (all threads), the rest is candle's.",
            total * 1e3
        )
    };
    format!(
        "\n## Where the teacher step's time goes\n\n{base}\n\n{}",
        t.to_markdown()
    )
}

/// The matrix-product limit and the teacher step's share of it, when both were measured.
fn limit_line(results: &[Measurement]) -> String {
    let find = |name: &str| results.iter().find(|m| m.name == name);
    let Some(mm) = find(MATMUL) else {
        return String::new();
    };
    let limit = matmul_gflops(median(&mm.images_per_sec()));
    let mut line = format!(
        "\nMatrix-product limit: a 2048×2048 f32 product (candle's gemm) runs at {limit:.0} GFLOP/s on {} threads",
        threads()
    );
    if let Some(t) = find("teacher-step") {
        let rate = 6.0 * t.forward_macs_per_image as f64 * median(&t.images_per_sec()) / 1e9;
        line += &format!(
            "; the teacher step reaches {rate:.1} GFLOP/s, {:.0}% of it",
            100.0 * rate / limit
        );
    }
    line + ".\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A teacher step whose batch ran as two halves at once: each op was timed on its half's
    /// thread, so the shares are of two threads' time (400 ms per batch for a 200 ms step), and
    /// the rest of each phase is that phase's time on two threads less our ops'.
    #[test]
    fn two_parts_at_once_count_two_threads_time() {
        let args = Args::parse_from(["kd-bench", "--batches", "1"]);
        let phase = |name: &str, s: f64| (name.to_string(), vec![s]);
        let m = Measurement {
            name: "teacher-step".into(),
            images_per_rep: 128,
            seconds: vec![0.2],
            split: vec![
                phase("forward", 0.08),
                phase("backward", 0.12),
                phase("optimiser", 0.0),
            ],
            forward_macs_per_image: 1,
            peak_rss_kib: 0,
            ops: vec![
                ("convolution forward (per chunk of images)".into(), 0.14),
                ("convolution backward (per chunk of images)".into(), 0.2),
            ],
            conv_shapes: Vec::new(),
            parts: 2,
        };
        let table = ops_table(&args, std::slice::from_ref(&m));
        assert!(table.contains("2 parts at once") && table.contains("400 ms per batch"));
        let row = |what: &str| {
            table
                .lines()
                .find(|l| l.contains(what))
                .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(row("convolution backward")[2..4], ["200.0", "50%"]);
        assert_eq!(row("the rest of the forward")[2..4], ["20.0", "5%"]);
        assert_eq!(row("the rest of the backward")[2..4], ["40.0", "10%"]);
        let whole = ops_table(&args, &[Measurement { parts: 1, ..m }]);
        assert!(
            whole.contains("Wall time per batch (200 ms in all)"),
            "{whole}"
        );
    }
}
