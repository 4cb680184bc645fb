//! Stage 3, student: trains the small network from the labels and the teacher's cached soft
//! targets (Hinton KD with a temperature), never loading the teacher. `--baseline` trains the same
//! student with the same schedule and seed on the labels alone, as the control.

use anyhow::Context;
use candle_core::{Device, Tensor};
use kd_knowledge::{DatasetRef, KnowledgeFile};
use kd_train::config::ViewTargets;
use kd_train::loss::{cross_entropy, kd_loss, KdWeights};
use kd_train::stage::TrainArgs;
use kd_train::trainer::Rows;
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
    /// Knowledge file [default: <artifacts>/<pipeline>/knowledge/soft-targets.safetensors, or the
    /// same tag's knowledge file when --tag names a run that has one].
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
    #[arg(long, value_parser = kd_train::stage::parse_tag)]
    pub tag: Option<String>,
    #[command(flatten)]
    pub run: kd_train::RunRecord,
}

/// The teacher's logits for every training row and stored view, one `[N * K, C]` tensor per head
/// used (view j of row r at row `r * K + j`; K = 1 for a single-view file), with weights.
struct SoftTargets {
    heads: Vec<Tensor>,
    views: u32,
    weights: KdWeights,
}

/// `[N * K, C]` logits (view j of row r at `r * K + j`) → `[N, C]`, the mean over each row's
/// K views.
fn mean_over_views(flat: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (nk, c) = flat.dims2()?;
    flat.reshape((nk / k, k, c))?.mean(1)
}

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let mut extra = args.train.sets("student");
    extra.extend(args.temperature.map(|t| format!("student.temperature={t}")));
    let pipeline = args.pipeline.open(&extra)?;
    let cfg = &pipeline.config.student;
    let data = pipeline.load_data()?;
    let train = cfg.train(&pipeline.config.data);
    let mut inputs = BTreeMap::new();
    let mut stored: Vec<kd_data::View> = Vec::new();
    let mut replay: Option<kd_data::Augment> = None;
    let mut knowledge_path = None;
    let (stage, settings, targets) = if args.baseline {
        // What decides the baseline: not the KD settings, so changing them does not retrain it.
        let settings = kd_train::record::to_json(&kd_train::record::BaselineSettings {
            data: pipeline.data_settings(),
            arch: cfg.arch.clone(),
            train: train.clone(),
        })?;
        (STAGE_BASELINE, settings, None)
    } else {
        let path = args
            .knowledge
            .clone()
            .unwrap_or_else(|| pipeline.input(KNOWLEDGE, KNOWLEDGE_FILE, args.tag.as_deref()));
        let rerun = format!("just precompute {}", pipeline.name);
        let knowledge_sha = kd_train::verify::verified(&path, &rerun)?;
        let knowledge = KnowledgeFile::open(&path)?;
        let expected = DatasetRef::training(
            &data.dataset.name,
            data.spec.classes,
            &data.train_fingerprint,
            data.dataset.train.len(),
            data.label_mask.as_deref(),
        );
        knowledge.check_dataset(&expected, &data.dataset.train.labels)?;
        let used: Vec<(String, f64)> = cfg
            .head_weights
            .iter()
            .filter(|(_, w)| **w > 0.0)
            .map(|(h, w)| (h.clone(), *w))
            .collect();
        knowledge.check_heads(&used.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>())?;
        let mut heads = used
            .iter()
            .map(|(h, _)| knowledge.logits_flat(h, &Device::Cpu))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {}", path.display()))?;
        let mut k = knowledge.meta.view_count();
        stored = knowledge.stored_views()?;
        if cfg.view_targets == ViewTargets::Mean {
            if k < 2 {
                anyhow::bail!(
                    "student.view_targets = \"mean\" needs a knowledge file with several views, \
                     and {} has one (precompute with --views K)",
                    path.display()
                );
            }
            tracing::info!("student: learning from the mean of the teacher's logits over the {k} stored views of each image (view_targets = mean)");
            heads = heads
                .iter()
                .map(|h| mean_over_views(h, k))
                .collect::<candle_core::Result<_>>()?;
            k = 1;
        }
        replay = match (&knowledge.meta.views, train.augment.is_some()) {
            (Some(v), true) => {
                tracing::info!(
                    "student: replaying the knowledge file's {k} stored views per image (seed {}, {:?}): every augmented input comes with the teacher's logits for exactly that view",
                    v.seed,
                    v.augment
                );
                Some(v.augment)
            }
            (Some(_), false) => {
                if k > 1 {
                    tracing::info!("student: no augmentation (student.augment = false): view 0 of the {k} stored views only");
                }
                None
            }
            (None, true) => {
                tracing::warn!("student: single-view knowledge with augmentation: the teacher's logits are for the un-augmented image, not the augmented one the student sees (precompute with --views K for consistent targets)");
                None
            }
            (None, false) => None,
        };
        inputs.insert("knowledge".to_string(), knowledge_sha);
        knowledge_path = Some(path.display().to_string());
        tracing::info!(
            "student: distilling from {} (teacher {}, heads {}), T = {}, hard/soft {}/{}{}",
            path.display(),
            knowledge.meta.teacher.architecture,
            used.iter()
                .map(|(h, w)| format!("{h}×{w}"))
                .collect::<Vec<_>>()
                .join(" + "),
            cfg.temperature,
            cfg.hard_weight,
            cfg.soft_weight,
            match (cfg.standardize_logits, cfg.dkd_beta) {
                (true, _) => " (logits standardised)".to_string(),
                (_, Some(b)) => format!(" (decoupled KD, beta {b})"),
                _ => String::new(),
            }
        );
        let weights = KdWeights {
            temperature: cfg.temperature,
            hard: cfg.hard_weight,
            soft: cfg.soft_weight,
            heads: used.iter().map(|(_, w)| *w).collect(),
            standardize: cfg.standardize_logits,
            dkd_beta: cfg.dkd_beta,
        };
        let settings = kd_train::record::to_json(&kd_train::record::KdSettings {
            data: pipeline.data_settings(),
            student: cfg.clone(),
        })?;
        let targets = SoftTargets {
            heads,
            views: k as u32,
            weights,
        };
        (STAGE_KD, settings, Some(targets))
    };
    let name = kd_train::stage::stage_name(stage, args.tag.as_deref());
    let stage = TrainingStage {
        pipeline: &pipeline,
        stage: &name,
        arch: &cfg.arch,
        train,
        settings,
        inputs,
        views: replay.map(|augment| kd_data::StoredViews {
            count: targets.as_ref().map_or(1, |t| t.views as usize),
            views: &stored,
            augment,
        }),
        // The baseline learns from the labelled rows; the KD student from every row, the soft
        // targets covering the unlabelled ones.
        rows: if targets.is_some() {
            Rows::All
        } else {
            Rows::Labelled
        },
        run: kd_train::RunRecord {
            // A KD student is held against the baseline of its own tag unless told otherwise.
            control: args.run.control.clone().or_else(|| {
                (!args.baseline)
                    .then(|| kd_train::stage::stage_name(STAGE_BASELINE, args.tag.as_deref()))
            }),
            ..args.run.clone()
        },
        knowledge: knowledge_path,
    };
    // Which rows of the training file carry a label (f32 1/0), when not all do.
    let labelled = data
        .label_mask
        .as_ref()
        .map(|m| Tensor::from_vec(m.iter().map(|&x| x as f32).collect(), m.len(), &Device::Cpu))
        .transpose()?;
    let manifest = match targets {
        None => stage.run(&data, |batch, heads| {
            cross_entropy(&heads[0], &batch.labels)
        })?,
        Some(t) => stage.run(&data, |batch, heads| {
            // The logits of the view each row shows: row * K + view (view 0 without replay).
            let mut at = (&batch.rows * t.views as f64)?;
            if let Some(v) = &batch.views {
                at = (at + v)?;
            }
            let teacher: Vec<Tensor> = t
                .heads
                .iter()
                .map(|h| h.index_select(&at, 0))
                .collect::<Result<_, _>>()?;
            let mask = labelled
                .as_ref()
                .map(|m| m.index_select(&batch.rows, 0))
                .transpose()?;
            Ok(kd_loss(
                &heads[0],
                &teacher,
                &batch.labels,
                mask.as_ref(),
                &t.weights,
            )?
            .total)
        })?,
    };
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_over_views_averages_each_rows_views() {
        // Two rows, three views, two classes: row r view j at r * 3 + j.
        let flat = Tensor::new(
            &[
                [1f32, 0.],
                [2., 3.],
                [3., -3.],
                [10., 1.],
                [20., 2.],
                [30., 3.],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let m = mean_over_views(&flat, 3).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, vec![vec![2., 0.], vec![20., 2.]]);
    }
}
