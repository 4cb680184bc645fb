//! Stage 1, teacher: trains the teacher (GoogLeNet with two auxiliary heads) on the labels,
//! keeps the best checkpoint on the validation split and reports its test accuracy.
//!
//! Loss, as the seed trains GoogLeNet: CE(main) + aux_weight · (CE(aux1) + CE(aux2)). With
//! `data.labels`, it learns from the labelled training images only.

use kd_train::loss::teacher_loss;
use kd_train::stage::TrainArgs;
use kd_train::trainer::Rows;
use kd_train::{Manifest, PipelineArgs, TrainingStage};
use std::collections::BTreeMap;

pub use kd_train::stage::layout::TEACHER as STAGE;

/// Train the teacher.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kd-teacher", version)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub train: TrainArgs,
}

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let pipeline = args.pipeline.open(&args.train.sets(STAGE))?;
    let cfg = &pipeline.config.teacher;
    let data = pipeline.load_data()?;
    let stage = TrainingStage {
        views: None,
        pipeline: &pipeline,
        stage: STAGE,
        arch: &cfg.arch,
        train: cfg.train(&pipeline.config.data),
        settings: serde_json::json!({ "data": pipeline.data_settings(), "teacher": cfg }),
        inputs: BTreeMap::new(),
        rows: Rows::Labelled,
    };
    let aux_weight = cfg.aux_weight;
    Ok(stage.run(&data, |batch, heads| {
        teacher_loss(heads, &batch.labels, aux_weight)
    })?)
}
