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
    /// Write to <artifacts>/<pipeline>/runs/<TAG>/teacher/ instead of teacher/ (a second teacher
    /// beside the pipeline's, e.g. one trained on fewer labels; a precompute with the same tag
    /// reads it). Letters, digits and . _ - = only.
    #[arg(long, value_parser = kd_train::stage::parse_tag)]
    pub tag: Option<String>,
    #[command(flatten)]
    pub run: kd_train::RunRecord,
}

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let pipeline = args.pipeline.open(&args.train.sets(STAGE))?;
    let cfg = &pipeline.config.teacher;
    let data = pipeline.load_data()?;
    let name = kd_train::stage::stage_name(STAGE, args.tag.as_deref());
    let stage = TrainingStage {
        views: None,
        pipeline: &pipeline,
        stage: &name,
        arch: &cfg.arch,
        train: cfg.train(&pipeline.config.data),
        settings: kd_train::record::to_json(&kd_train::record::TeacherSettings {
            data: pipeline.data_settings(),
            teacher: cfg.clone(),
        })?,
        inputs: BTreeMap::new(),
        rows: Rows::Labelled,
        run: args.run.clone(),
        knowledge: None,
    };
    let aux_weight = cfg.aux_weight;
    Ok(stage.run(&data, |batch, heads| {
        teacher_loss(heads, &batch.labels, aux_weight)
    })?)
}
