//! Stage 3, student: trains the small network from the labels and the teacher's cached soft
//! targets (Hinton KD with a temperature), never loading the teacher. `--baseline` trains the same
//! student with the same schedule and seed on the labels alone, as the control.

use anyhow::Context;
use candle_core::{Device, Tensor};
use kd_knowledge::{DatasetRef, KnowledgeFile};
use kd_train::loss::{cross_entropy, kd_loss, KdWeights};
use kd_train::stage::TrainArgs;
use kd_train::{Manifest, PipelineArgs, TrainingStage};
use std::collections::BTreeMap;
use std::path::PathBuf;

use kd_train::stage::layout::{KNOWLEDGE, KNOWLEDGE_FILE};
pub use kd_train::stage::layout::{STUDENT_BASELINE as STAGE_BASELINE, STUDENT_KD as STAGE_KD};

/// Train the student by distillation from a knowledge file, or on labels alone (--baseline).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kd-student", version)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Knowledge file [default: <artifacts>/<pipeline>/knowledge/soft-targets.safetensors].
    #[arg(long, conflicts_with = "baseline")]
    pub knowledge: Option<PathBuf>,
    /// Train on the labels alone (the control).
    #[arg(long)]
    pub baseline: bool,
    /// Temperature (overrides student.temperature).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Write to <artifacts>/<pipeline>/runs/<TAG>/<stage>/ instead of <stage>/: one of several
    /// runs of the same stage (`just compare` tags its runs seed-0, seed-1, ...; `just sweep`
    /// tags its grid points). Letters, digits and . _ - = only.
    #[arg(long, value_parser = parse_tag)]
    pub tag: Option<String>,
}

/// Where tagged runs go, under the pipeline's artifacts.
pub const RUNS: &str = "runs";

fn parse_tag(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-=".contains(c))
        && !s.starts_with('.');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: a tag is letters, digits and . _ - = (not starting with a dot), e.g. seed-1"
        ))
    }
}

/// The teacher's logits for every training row, one `[N, C]` tensor per head used, with weights.
struct SoftTargets {
    heads: Vec<Tensor>,
    weights: KdWeights,
}

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let mut extra = args.train.sets("student");
    extra.extend(args.temperature.map(|t| format!("student.temperature={t}")));
    let pipeline = args.pipeline.open(&extra)?;
    let cfg = &pipeline.config.student;
    let data = pipeline.load_data()?;
    let train = cfg.train(&pipeline.config.data);
    let mut inputs = BTreeMap::new();
    let (stage, settings, targets) = if args.baseline {
        // What decides the baseline: not the KD settings, so changing them does not retrain it.
        let settings = serde_json::json!({ "data": pipeline.data_settings(), "arch": cfg.arch, "train": train });
        (STAGE_BASELINE, settings, None)
    } else {
        let path = args
            .knowledge
            .clone()
            .unwrap_or_else(|| pipeline.dir(KNOWLEDGE).join(KNOWLEDGE_FILE));
        if !path.is_file() {
            anyhow::bail!(
                "no knowledge file at {} (run `just precompute` first, or pass --knowledge)",
                path.display()
            );
        }
        let knowledge = KnowledgeFile::open(&path)?;
        let expected = DatasetRef {
            name: data.dataset.name.clone(),
            split: "train".into(),
            rows: data.dataset.train.len(),
            classes: data.spec.classes,
            fingerprint: data.train_fingerprint.clone(),
        };
        knowledge.check_dataset(&expected, &data.dataset.train.labels)?;
        let used: Vec<(String, f64)> = cfg
            .head_weights
            .iter()
            .filter(|(_, w)| **w > 0.0)
            .map(|(h, w)| (h.clone(), *w))
            .collect();
        knowledge.check_heads(&used.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>())?;
        let heads = used
            .iter()
            .map(|(h, _)| knowledge.logits(h, &Device::Cpu))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {}", path.display()))?;
        inputs.insert("knowledge".to_string(), kd_data::sha256_file(&path)?);
        tracing::info!(
            "student: distilling from {} (teacher {}, heads {}), T = {}, hard/soft {}/{}",
            path.display(),
            knowledge.meta.teacher.architecture,
            used.iter()
                .map(|(h, w)| format!("{h}×{w}"))
                .collect::<Vec<_>>()
                .join(" + "),
            cfg.temperature,
            cfg.hard_weight,
            cfg.soft_weight
        );
        let weights = KdWeights {
            temperature: cfg.temperature,
            hard: cfg.hard_weight,
            soft: cfg.soft_weight,
            heads: used.iter().map(|(_, w)| *w).collect(),
        };
        let settings = serde_json::json!({ "data": pipeline.data_settings(), "student": cfg });
        (STAGE_KD, settings, Some(SoftTargets { heads, weights }))
    };
    let tagged = args.tag.as_ref().map(|t| format!("{RUNS}/{t}/{stage}"));
    let stage = TrainingStage {
        pipeline: &pipeline,
        stage: tagged.as_deref().unwrap_or(stage),
        arch: &cfg.arch,
        train,
        settings,
        inputs,
    };
    let manifest = match targets {
        None => stage.run(&data, |batch, heads| {
            cross_entropy(&heads[0], &batch.labels)
        })?,
        Some(t) => stage.run(&data, |batch, heads| {
            let teacher: Vec<Tensor> = t
                .heads
                .iter()
                .map(|h| h.index_select(&batch.rows, 0))
                .collect::<Result<_, _>>()?;
            Ok(kd_loss(&heads[0], &teacher, &batch.labels, &t.weights)?.total)
        })?,
    };
    Ok(manifest)
}
