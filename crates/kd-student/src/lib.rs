//! Stage 3, student: trains the small network from the labels and the teacher's cached soft
//! targets (Hinton KD with a temperature), never loading the teacher. `--baseline` trains the same
//! student with the same schedule and seed on the labels alone, as the control.

use candle_core::Tensor;
use kd_knowledge::targets::{SoftTargets, ViewChoice};
use kd_knowledge::DatasetRef;
use kd_train::config::{StudentConfig, ViewTargets};
use kd_train::loss::{cross_entropy, kd_loss, KdWeights};
use kd_train::stage::{stage_name, TrainArgs};
use kd_train::trainer::Rows;
use kd_train::{record, verify, LoadedData, Manifest, Pipeline, PipelineArgs, TrainingStage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let mut extra = args.train.sets("student");
    extra.extend(args.temperature.map(|t| format!("student.temperature={t}")));
    let pipeline = args.pipeline.open(&extra)?;
    let data = pipeline.load_data()?;
    if args.baseline {
        baseline(args, &pipeline, &data)
    } else {
        distil(args, &pipeline, &data)
    }
}

/// The control: the same student, schedule and seed on the labelled rows alone.
fn baseline(args: &Args, pipeline: &Pipeline, data: &LoadedData) -> anyhow::Result<Manifest> {
    let cfg = &pipeline.config.student;
    let train = cfg.train(&pipeline.config.data);
    // What decides the baseline: not the KD settings, so changing them does not retrain it.
    let settings = record::to_json(&record::BaselineSettings {
        data: pipeline.data_settings(),
        arch: cfg.arch.clone(),
        train: train.clone(),
    })?;
    let name = stage_name(STAGE_BASELINE, args.tag.as_deref());
    let stage = TrainingStage {
        pipeline,
        stage: &name,
        arch: &cfg.arch,
        train,
        settings,
        inputs: BTreeMap::new(),
        views: None,
        rows: Rows::Labelled,
        run: args.run.clone(),
        knowledge: None,
    };
    Ok(stage.run(data, |batch, heads| cross_entropy(&heads[0], &batch.labels))?)
}

/// The KD student: every training row, the soft targets from the knowledge file (verified
/// against its manifest and checked against this data), the hard loss on the labelled rows.
fn distil(args: &Args, pipeline: &Pipeline, data: &LoadedData) -> anyhow::Result<Manifest> {
    let cfg = &pipeline.config.student;
    let train = cfg.train(&pipeline.config.data);
    let path = args
        .knowledge
        .clone()
        .unwrap_or_else(|| pipeline.input(KNOWLEDGE, KNOWLEDGE_FILE, args.tag.as_deref()));
    let knowledge_sha = verify::verified(&path, &format!("just precompute {}", pipeline.name))?;
    let (head_names, weights) = KdWeights::of(cfg);
    let expected = DatasetRef::training(
        &data.dataset.name,
        data.spec.classes,
        &data.train_fingerprint,
        data.dataset.train.len(),
        data.label_mask.as_deref(),
    );
    let choice = match cfg.view_targets {
        ViewTargets::Mean => ViewChoice::Mean,
        ViewTargets::First => ViewChoice::AsStored,
    };
    let targets = SoftTargets::load(
        &path,
        &expected,
        &data.dataset.train.labels,
        &head_names,
        choice,
    )?;
    let replay = replay_plan(&targets, train.augment.is_some());
    describe(&path, &targets, &head_names, &weights, cfg);
    let name = stage_name(STAGE_KD, args.tag.as_deref());
    let stage = TrainingStage {
        pipeline,
        stage: &name,
        arch: &cfg.arch,
        train,
        settings: record::to_json(&record::KdSettings {
            data: pipeline.data_settings(),
            student: cfg.clone(),
        })?,
        inputs: BTreeMap::from([("knowledge".to_string(), knowledge_sha)]),
        views: replay.map(|augment| kd_data::StoredViews {
            count: targets.views,
            views: &targets.stored,
            augment,
        }),
        rows: Rows::All,
        run: kd_train::RunRecord {
            // Held against the baseline of its own tag unless told otherwise.
            control: args
                .run
                .control
                .clone()
                .or_else(|| Some(stage_name(STAGE_BASELINE, args.tag.as_deref()))),
            ..args.run.clone()
        },
        knowledge: Some(path.display().to_string()),
    };
    let loss = KdBatchLoss::new(&targets, weights, data)?;
    Ok(stage.run(data, |batch, heads| loss.of(batch, heads))?)
}

/// Whether the student replays the file's stored views: only when it augments and the file
/// has views (each augmented input then comes with the teacher's logits for exactly that view).
fn replay_plan(t: &SoftTargets, augments: bool) -> Option<kd_data::Augment> {
    let k = t.views;
    match (&t.views_meta, augments) {
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
    }
}

/// Logs what the student distils from and how.
fn describe(path: &Path, t: &SoftTargets, heads: &[String], w: &KdWeights, cfg: &StudentConfig) {
    if cfg.view_targets == ViewTargets::Mean {
        tracing::info!("student: learning from the mean of the teacher's logits over the stored views of each image (view_targets = mean)");
    }
    tracing::info!(
        "student: distilling from {} (teacher {}, heads {}), T = {}, hard/soft {}/{}{}",
        path.display(),
        t.teacher_architecture,
        heads
            .iter()
            .zip(&w.heads)
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
}

/// The KD loss of one batch: the teacher's logits for the view each row shows, and the label
/// mask when only some rows carry a label.
struct KdBatchLoss<'a> {
    targets: &'a SoftTargets,
    /// The teacher's logits per head, on the device the student trains on (uploaded once).
    heads: Vec<Tensor>,
    weights: KdWeights,
    /// 1 where a row of the training file carries a label (f32), when not all do.
    labelled: Option<Tensor>,
}

impl<'a> KdBatchLoss<'a> {
    fn new(
        targets: &'a SoftTargets,
        weights: KdWeights,
        data: &LoadedData,
    ) -> candle_core::Result<Self> {
        let labelled = data
            .label_mask
            .as_ref()
            .map(|m| Tensor::from_vec(m.iter().map(|&x| x as f32).collect(), m.len(), &data.device))
            .transpose()?;
        let heads = targets
            .heads
            .iter()
            .map(|h| h.to_device(&data.device))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            targets,
            heads,
            weights,
            labelled,
        })
    }

    fn of(&self, batch: &kd_data::Batch, heads: &[Tensor]) -> candle_core::Result<Tensor> {
        // The logits of the view each row shows: row * K + view (view 0 without replay).
        let mut at = (&batch.rows * self.targets.views as f64)?;
        if let Some(v) = &batch.views {
            at = (at + v)?;
        }
        let teacher: Vec<Tensor> = self
            .heads
            .iter()
            .map(|h| h.index_select(&at, 0))
            .collect::<Result<_, _>>()?;
        let mask = self
            .labelled
            .as_ref()
            .map(|m| m.index_select(&batch.rows, 0))
            .transpose()?;
        Ok(kd_loss(
            &heads[0],
            &teacher,
            &batch.labels,
            mask.as_ref(),
            &self.weights,
        )?
        .total)
    }
}
