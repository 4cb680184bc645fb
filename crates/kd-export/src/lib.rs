//! Stage 5, export: a trained model as ONNX, the format the deployment world reads —
//! `artifacts/<pipeline>/export/<model>.onnx`, written from the checkpoint its manifest vouches
//! for: the eval-mode graph (dropout gone, BatchNorm folded, the teacher's heads as named
//! outputs), raw pixels in (the normalisation is in the graph), the class names and the
//! preprocessing in the metadata. ONNX Runtime then runs it on the test set and its logits are
//! held against ours (`runtime`); the numbers go to `export/<model>.manifest.json`.

pub mod convert;
pub mod runtime;

#[allow(clippy::all, missing_docs, missing_debug_implementations)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use anyhow::Context;
use candle_core::Device;
use kd_train::manifest::stage_key;
use kd_train::record::ExportRecord;
use kd_train::stage::layout::{CHECKPOINT, CLASS_INDICES, EXPORT};
use kd_train::stage::{stage_name, TrainedModel};
use kd_train::table::Table;
use kd_train::{LoadedData, Manifest, Pipeline, PipelineArgs, TrainRecord};
use prost::Message;
use runtime::Check;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Export a trained model as ONNX and check it with ONNX Runtime.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kd-export", version)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Which model.
    #[arg(long, value_enum, default_value_t = TrainedModel::StudentKd)]
    pub model: TrainedModel,
    /// A tagged run of that model (`runs/<TAG>/<model>/`); writes to `runs/<TAG>/export/`.
    #[arg(long, value_parser = kd_train::stage::parse_tag)]
    pub tag: Option<String>,
    /// Run the exported model with ONNX Runtime on the test set and compare it with ours.
    #[arg(long, value_enum, default_value_t = Check::Auto)]
    pub check: Check,
    /// A Python with onnx, onnxruntime and safetensors [default: $KD_PYTHON, else .venv/bin/python].
    #[arg(long)]
    pub python: Option<PathBuf>,
}

/// The export settings that decide the file.
#[derive(serde::Serialize)]
struct Settings {
    model: TrainedModel,
    architecture: String,
    opset: i64,
    check: bool,
}

/// The model to export: its folder, record and the checkpoint its manifest vouches for.
struct Source {
    dir: PathBuf,
    record: TrainRecord,
    checkpoint_sha256: String,
}

/// The trained model's folder, its manifest's record, and the checkpoint, checked against the
/// hash the manifest recorded.
fn source(pipeline: &Pipeline, args: &Args) -> anyhow::Result<Source> {
    let dir = pipeline.dir(&stage_name(args.model.stage(), args.tag.as_deref()));
    let manifest = Manifest::read(&dir).with_context(|| {
        format!(
            "no trained {} in {} (run the pipeline first: `just pipeline {}`)",
            args.model,
            dir.display(),
            pipeline.name
        )
    })?;
    let record = manifest.training()?;
    let rerun = format!("just {} {}", args.model.recipe(), pipeline.name);
    let sha = kd_train::verify::verified(&dir.join(CHECKPOINT), &rerun)?;
    Ok(Source {
        dir,
        record,
        checkpoint_sha256: sha,
    })
}

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let started = std::time::Instant::now();
    let pipeline = args.pipeline.open(&[])?;
    let src = source(&pipeline, args)?;
    let python = match args.check {
        Check::Never => None,
        _ => runtime::python(args.python.as_deref()),
    };
    if python.is_none() && args.check == Check::Always {
        anyhow::bail!(
            "--check always: no Python with onnx and onnxruntime (run `just python-env`, or pass --python)"
        );
    }
    let data = pipeline.load_data()?;
    let out_dir = pipeline.dir(&stage_name(EXPORT, args.tag.as_deref()));
    let file = format!("{}.onnx", args.model);
    let manifest_path = Manifest::named(&out_dir, args.model.stage());
    let settings = serde_json::to_value(Settings {
        model: args.model,
        architecture: src.record.architecture.clone(),
        opset: convert::OPSET,
        check: python.is_some(),
    })?;
    let mut inputs = BTreeMap::from([("checkpoint".to_string(), src.checkpoint_sha256.clone())]);
    inputs.extend(data.inputs());
    let key = stage_key(EXPORT, &settings, &inputs);
    let label = format!("export {}", args.model);
    let _lock =
        kd_train::verify::RunLock::acquire_named(&out_dir, &format!(".{}.lock", args.model))?;
    if let Some(m) = pipeline.up_to_date_at(&label, &manifest_path, &key, &settings, &inputs) {
        return Ok(m);
    }
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join(&file);
    let arch = &src.record.architecture;
    let model = kd_models::load_frozen(arch, &data.spec, &src.dir.join(CHECKPOINT), &Device::Cpu)?;
    let classes = kd_train::stage::class_names(&src.dir.join(CLASS_INDICES))?;
    let onnx = build(&pipeline, &data, model.as_ref(), &src, &classes, args.model)?;
    kd_data::write_atomic_bytes(&path, &onnx.encode_to_vec())?;
    let runtime = match &python {
        None => {
            tracing::warn!("export: {} written, not checked by ONNX Runtime (no Python with onnxruntime: `just python-env`)", path.display());
            None
        }
        Some(py) => Some(runtime::check(py, &path, model.as_ref(), &data)?),
    };
    let record = ExportRecord {
        file: file.clone(),
        bytes: std::fs::metadata(&path)?.len(),
        architecture: arch.clone(),
        opset: convert::OPSET,
        heads: model.heads().iter().map(|h| h.to_string()).collect(),
        input: [data.spec.channels, data.spec.height, data.spec.width],
        classes,
        runtime,
    };
    print_summary(&path, &record);
    let manifest = Manifest {
        settings,
        inputs,
        wall_seconds: started.elapsed().as_secs_f64(),
        metrics: serde_json::to_value(&record)?,
        ..Manifest::start(EXPORT, &pipeline.name, key)
    };
    Ok(manifest.write_at(&manifest_path, &[&file])?)
}

/// The ONNX model of a loaded model, with its metadata; decoded back to check it is whole.
fn build(
    pipeline: &Pipeline,
    data: &LoadedData,
    model: &dyn kd_models::Classifier,
    src: &Source,
    classes: &[String],
    which: TrainedModel,
) -> anyhow::Result<onnx::ModelProto> {
    let graph = model.inference_graph("normalized")?;
    let spec = &data.spec;
    let info = convert::ModelInfo {
        input: [spec.channels, spec.height, spec.width],
        classes: spec.classes,
        normalization: data.dataset.normalization.clone(),
        properties: properties(pipeline, data, src, classes, which)?,
    };
    let name = format!("{}-{which}", pipeline.name);
    let proto = convert::model(&graph, &info, &name)?;
    let back = onnx::ModelProto::decode(proto.encode_to_vec().as_slice())
        .context("the ONNX model does not decode")?;
    anyhow::ensure!(back == proto, "the ONNX model does not round-trip");
    Ok(proto)
}

/// The metadata properties: what a user of the file needs without this project.
fn properties(
    pipeline: &Pipeline,
    data: &LoadedData,
    src: &Source,
    classes: &[String],
    which: TrainedModel,
) -> anyhow::Result<Vec<(String, String)>> {
    let spec = &data.spec;
    let photos = pipeline.config.data.format == kd_train::config::Format::ImageFolder;
    let resize = if photos {
        format!("decode the image (alpha composited on white, grey to RGB), resize the whole image to {}x{} (bilinear)", spec.width, spec.height)
    } else {
        format!(
            "grey levels, {}x{} (resize the whole image if it is another size)",
            spec.width, spec.height
        )
    };
    let preprocessing = serde_json::json!({
        "input": convert::INPUT,
        "layout": "NCHW",
        "channels": spec.channels,
        "height": spec.height,
        "width": spec.width,
        "values": "0-255 as float32",
        "resize": resize,
        "normalization": {
            "mean": data.dataset.normalization.mean,
            "std": data.dataset.normalization.std,
            "where": "inside the graph: (pixels / 255 - mean) / std",
        },
    });
    Ok(vec![
        ("classes".into(), serde_json::to_string(classes)?),
        ("preprocessing".into(), preprocessing.to_string()),
        (
            "heads".into(),
            "logits per head; main is the model's answer".into(),
        ),
        ("architecture".into(), src.record.architecture.clone()),
        ("model".into(), which.to_string()),
        ("pipeline".into(), pipeline.name.clone()),
        ("checkpoint_sha256".into(), src.checkpoint_sha256.clone()),
        (
            "test_accuracy".into(),
            format!("{:.4}", src.record.test_accuracy),
        ),
    ])
}

fn print_summary(path: &Path, r: &ExportRecord) {
    let mut t = Table::new(&[
        "file",
        "size",
        "opset",
        "ONNX Runtime test acc",
        "max |Δ logit|",
        "ORT ms/img (batch 1)",
        "ORT img/s (batch 256)",
        "candle ms/img",
        "candle img/s",
    ]);
    let rt = r.runtime.as_ref();
    let fmt = |x: Option<f64>, p: usize| x.map_or("-".into(), |v| format!("{v:.p$}"));
    t.row(&[
        path.display().to_string(),
        format!("{:.1} KiB", r.bytes as f64 / 1024.0),
        r.opset.to_string(),
        fmt(rt.map(|c| 100.0 * c.test_accuracy), 2),
        rt.map_or("-".into(), |c| {
            let m = c
                .heads
                .values()
                .map(|h| h.max_abs_diff)
                .fold(0f32, f32::max);
            format!("{m:.1e}")
        }),
        fmt(rt.map(|c| c.latency_ms_batch1), 3),
        fmt(rt.map(|c| c.throughput_batch256), 0),
        fmt(rt.map(|c| c.candle_latency_ms_batch1), 3),
        fmt(rt.map(|c| c.candle_throughput_batch256), 0),
    ]);
    println!("\n{}", t.to_markdown());
}
