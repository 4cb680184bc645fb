//! The check by the real consumer: ONNX Runtime (through Python, `python/ort_check.py`) validates
//! the exported model with `onnx.checker` and runs it on the test set; its logits are held against
//! our own evaluation's, head by head, and both are timed on the same images.

use anyhow::Context;
use candle_core::Device;
use kd_models::Classifier;
use kd_train::record::{HeadAgreement, RuntimeCheck};
use kd_train::LoadedData;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

const SCRIPT: &str = include_str!("../python/ort_check.py");

/// Whether to run the ONNX Runtime check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Check {
    /// When a Python with onnx and onnxruntime is found (`--python`, `$KD_PYTHON`, `.venv/`).
    Auto,
    Always,
    Never,
}

/// The Python to run the check with: `explicit`, else `$KD_PYTHON`, else `.venv/bin/python`.
pub fn python(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KD_PYTHON").map(PathBuf::from))
        .or_else(|| Some(PathBuf::from(".venv/bin/python")).filter(|p| p.is_file()))
}

/// What `ort_check.py` prints.
#[derive(serde::Deserialize)]
struct Printed {
    onnx: String,
    onnxruntime: String,
    images: usize,
    batch256_seconds: f64,
    batch1_median_ms: f64,
}

/// Runs the exported `onnx_path` with ONNX Runtime on the test set and compares it with `model`.
pub fn check(
    python: &Path,
    onnx_path: &Path,
    model: &dyn Classifier,
    data: &LoadedData,
) -> anyhow::Result<RuntimeCheck> {
    let tmp = tempfile::tempdir().context("a temporary folder for the check")?;
    let (images, out, script) = (
        tmp.path().join("images.safetensors"),
        tmp.path().join("ort.safetensors"),
        tmp.path().join("ort_check.py"),
    );
    write_pixels(&images, data)?;
    std::fs::write(&script, SCRIPT)?;
    let threads = kd_train::stage::threads();
    let output = std::process::Command::new(python)
        .arg(&script)
        .args([onnx_path, &images, &out])
        .arg(threads.to_string())
        .output()
        .with_context(|| format!("starting {}", python.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        anyhow::bail!(
            "ONNX Runtime's check of {} failed ({}): {}",
            onnx_path.display(),
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let printed: Printed = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .with_context(|| format!("reading what {} printed: {stdout}", script.display()))?;
    compare(model, data, &out, printed, threads)
}

/// The test images as raw pixels (float32, 0–255), what the exported graph takes.
fn write_pixels(path: &Path, data: &LoadedData) -> anyhow::Result<()> {
    let set = &data.dataset.test;
    let bytes: Vec<u8> = set
        .images
        .iter()
        .flat_map(|&b| (b as f32).to_le_bytes())
        .collect();
    let shape = vec![set.len(), set.channels, set.height, set.width];
    let view = TensorView::new(Dtype::F32, shape, &bytes)?;
    safetensors::serialize_to_file([("pixels", view)], None, path)?;
    Ok(())
}

/// ONNX Runtime's logits (in `out`) against candle's, head by head, and both timed.
fn compare(
    model: &dyn Classifier,
    data: &LoadedData,
    out: &Path,
    printed: Printed,
    threads: usize,
) -> anyhow::Result<RuntimeCheck> {
    let bytes = std::fs::read(out)?;
    let ort = safetensors::SafeTensors::deserialize(&bytes)?;
    let ours = kd_train::predict(model, data.test(), 256, "candle")?;
    let c = data.spec.classes;
    let labels = &data.dataset.test.labels;
    let mut heads = BTreeMap::new();
    let mut accuracies = HashMap::new();
    for (head, candle) in model.heads().iter().zip(&ours) {
        let t = ort
            .tensor(&format!("logits.{head}"))
            .with_context(|| format!("ONNX Runtime returned no output {head}"))?;
        let theirs: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        anyhow::ensure!(
            theirs.len() == candle.len(),
            "ONNX Runtime's {head} has {} values, ours {}",
            theirs.len(),
            candle.len()
        );
        let max_abs_diff = theirs
            .iter()
            .zip(candle)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let top = |x: &[f32]| -> Vec<usize> { x.chunks_exact(c).map(argmax).collect() };
        let (a, b) = (top(&theirs), top(candle));
        let top1_disagreements = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        let hits = |t: &[usize]| {
            t.iter()
                .zip(labels)
                .filter(|(p, l)| **p == **l as usize)
                .count()
        };
        let n = labels.len().max(1) as f64;
        accuracies.insert(*head, (hits(&a) as f64 / n, hits(&b) as f64 / n));
        heads.insert(
            head.to_string(),
            HeadAgreement {
                max_abs_diff,
                top1_disagreements,
            },
        );
    }
    let (test_accuracy, candle_test_accuracy) = accuracies.get("main").copied().unwrap_or_default();
    let (candle_latency_ms_batch1, candle_throughput_batch256) = time_candle(model, data)?;
    Ok(RuntimeCheck {
        onnx: printed.onnx,
        onnxruntime: printed.onnxruntime,
        threads,
        test_images: printed.images,
        test_accuracy,
        candle_test_accuracy,
        heads,
        latency_ms_batch1: printed.batch1_median_ms,
        throughput_batch256: printed.images as f64 / printed.batch256_seconds.max(1e-9),
        candle_latency_ms_batch1,
        candle_throughput_batch256,
    })
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
}

/// candle on the same images: median latency of one image at batch 1 (200 runs over the test
/// images after 10 warm-ups, as the Python side), images per second over the test set at batch
/// 256.
fn time_candle(model: &dyn Classifier, data: &LoadedData) -> anyhow::Result<(f64, f64)> {
    let test = data.test();
    let warm = &data.test_rows[..data.test_rows.len().min(256)];
    kd_train::evaluate(model, kd_train::Subset { rows: warm, ..test }, 256)?;
    let throughput = kd_train::evaluate(model, test, 256)?.images_per_sec;
    let mut single = Vec::new();
    let rows = &data.test_rows;
    anyhow::ensure!(!rows.is_empty(), "no test images to time");
    for i in 0..210 {
        let row = rows[i % rows.len()] as usize;
        let x = data
            .test_images
            .narrow(0, row, 1)?
            .to_device(&Device::Cpu)?;
        let t0 = Instant::now();
        model.forward_t(&x, false)?[0].to_vec2::<f32>()?;
        if i >= 10 {
            single.push(t0.elapsed().as_secs_f64());
        }
    }
    single.sort_by(f64::total_cmp);
    Ok((1000.0 * single[single.len() / 2], throughput))
}
