//! Stage 2, precompute: runs the frozen teacher once, in eval mode and without augmentation,
//! over every training image and writes the logits of all its heads, in dataset order, to the
//! knowledge file (`soft-targets.safetensors`; format in `kd-knowledge`).

use anyhow::Context;
use candle_core::Device;
use kd_knowledge::{DatasetRef, KnowledgeFile, Metadata, TeacherRef, Transform, FORMAT_VERSION};
use kd_train::manifest::stage_key;
use kd_train::stage::threads;
use kd_train::table::Table;
use kd_train::{predict, Manifest, PipelineArgs, CHECKPOINT};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use kd_train::stage::layout::TEACHER;
pub use kd_train::stage::layout::{KNOWLEDGE as STAGE, KNOWLEDGE_FILE};

/// Compute the teacher's soft targets for the whole training set.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kd-precompute", version)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Teacher checkpoint [default: <artifacts>/<pipeline>/teacher/model.safetensors].
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Inference batch size (overrides knowledge.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
}

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let started = Instant::now();
    let extra: Vec<String> = args
        .batch_size
        .iter()
        .map(|b| format!("knowledge.batch_size={b}"))
        .collect();
    let pipeline = args.pipeline.open(&extra)?;
    let arch = pipeline.config.teacher.arch.clone();
    let checkpoint = args
        .teacher
        .clone()
        .unwrap_or_else(|| pipeline.dir(TEACHER).join(CHECKPOINT));
    if !checkpoint.is_file() {
        anyhow::bail!(
            "no teacher checkpoint at {} (run `just teacher` first, or pass --teacher)",
            checkpoint.display()
        );
    }
    let teacher_sha = kd_data::sha256_file(&checkpoint)?;
    let data = pipeline.load_data()?;
    let batch_size = pipeline.config.knowledge.batch_size;
    let dir = pipeline.dir(STAGE);
    let path = dir.join(KNOWLEDGE_FILE);

    let transform = Transform {
        input: [data.spec.channels, data.spec.height, data.spec.width],
        normalization: data.dataset.normalization.clone(),
        augmentation: "none".into(),
    };
    let settings = serde_json::json!({ "data": pipeline.data_settings(), "teacher_arch": arch, "transform": transform });
    let inputs = BTreeMap::from([
        ("dataset.train".to_string(), data.train_fingerprint.clone()),
        ("teacher".to_string(), teacher_sha.clone()),
    ]);
    let key = stage_key(STAGE, &settings, &inputs);
    if let Some(m) = pipeline.up_to_date(STAGE, &dir, &key, &settings, &inputs) {
        return Ok(m);
    }

    let teacher = kd_models::load_frozen(&arch, &data.spec, &checkpoint, &Device::Cpu)?;
    let rows = data.all_rows.len();
    tracing::info!(
        "precompute: {arch} from {}, {rows} images, batch {batch_size}, {} threads",
        checkpoint.display(),
        threads()
    );
    let t0 = Instant::now();
    let logits = predict(teacher.as_ref(), data.all_train(), batch_size, "precompute")?;
    let seconds = t0.elapsed().as_secs_f64();
    let images_per_sec = rows as f64 / seconds;

    let heads: Vec<String> = teacher.heads().iter().map(|h| h.to_string()).collect();
    let dataset = DatasetRef {
        name: data.dataset.name.clone(),
        split: "train".into(),
        rows,
        classes: data.spec.classes,
        fingerprint: data.train_fingerprint.clone(),
    };
    let meta = Metadata {
        format_version: FORMAT_VERSION,
        dataset: dataset.clone(),
        teacher: TeacherRef {
            architecture: arch.clone(),
            checkpoint_sha256: teacher_sha,
        },
        heads: heads.clone(),
        transform,
    };
    kd_knowledge::write(&path, &meta, &logits, &data.dataset.train.labels)?;
    // Read it back as a student will: a file that does not validate is never reported as done.
    KnowledgeFile::open(&path)?
        .check_dataset(&dataset, &data.dataset.train.labels)
        .with_context(|| {
            format!(
                "the knowledge file just written, {}, does not read back",
                path.display()
            )
        })?;

    // How often each head agrees with the labels on the training set: a sanity check of the teacher.
    let c = data.spec.classes;
    let agreement: BTreeMap<String, f64> = heads
        .iter()
        .zip(&logits)
        .map(|(h, l)| {
            let hits = l
                .chunks(c)
                .zip(&data.dataset.train.labels)
                .filter(|(row, &y)| argmax(row) == y as usize)
                .count();
            (h.clone(), hits as f64 / rows as f64)
        })
        .collect();
    let bytes = std::fs::metadata(&path)?.len();
    let manifest = Manifest {
        settings,
        inputs,
        wall_seconds: started.elapsed().as_secs_f64(),
        metrics: serde_json::json!({
            "rows": rows,
            "classes": c,
            "heads": heads,
            "batch_size": batch_size,
            "inference_seconds": seconds,
            "images_per_sec": images_per_sec,
            "bytes": bytes,
            "train_accuracy_per_head": agreement,
        }),
        ..Manifest::start(STAGE, &pipeline.name, key)
    }
    .write(&dir, &[KNOWLEDGE_FILE])?;

    let mut t = Table::new(&[
        "rows",
        "heads",
        "train acc (main)",
        "img/s",
        "inference",
        "file size",
    ]);
    t.row(&[
        rows.to_string(),
        heads.join(", "),
        format!(
            "{:.2}%",
            100.0 * agreement.get("main").copied().unwrap_or(0.0)
        ),
        format!("{images_per_sec:.0}"),
        format!("{seconds:.1}s"),
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64),
    ]);
    println!("\n{}\nwrote {}", t.to_markdown(), path.display());
    Ok(manifest)
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
}
