//! A training stage from start to finish: skip if fresh, train, test the kept checkpoint, record.
//! The teacher and both students are this with a different loss.

use crate::config::TrainSettings;
use crate::manifest::{stage_key, Manifest};
use crate::stage::{threads, LoadedData, Pipeline};
use crate::table::Table;
use crate::train::{evaluate, fit, FitSpec};
use crate::TrainError;
use candle_core::Tensor;
use kd_data::Batch;
use kd_models::{load_frozen, Trainable};
use std::collections::BTreeMap;

pub use crate::resume::RESUME_FILE;

/// The best weights of a run in progress, committed as `model.safetensors` when it finishes.
pub const PARTIAL_CHECKPOINT: &str = "best.partial.safetensors";
pub use crate::stage::layout::{CHECKPOINT, CLASS_INDICES};

/// One training stage's identity and settings.
pub struct TrainingStage<'a> {
    pub pipeline: &'a Pipeline,
    /// Folder name under the pipeline's artifacts: `teacher`, `student-kd`, `student-baseline`.
    pub stage: &'a str,
    pub arch: &'a str,
    pub train: TrainSettings,
    /// Everything that decides the result, as recorded in the manifest and hashed into its key.
    pub settings: serde_json::Value,
    /// Content hashes of the inputs beyond the dataset (e.g. the knowledge file).
    pub inputs: BTreeMap<String, String>,
    /// Stored views to replay instead of fresh augmentation (multi-view knowledge).
    pub views: Option<kd_data::StoredViews<'a>>,
    /// Which training rows it learns from.
    pub rows: Rows,
    /// Where the run sits in an experiment.
    pub run: crate::RunRecord,
    /// The knowledge file a KD student learns from, as recorded.
    pub knowledge: Option<String>,
}

/// The training rows a stage learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// The rows that carry a label (the teacher, the baseline).
    Labelled,
    /// Every training row, labelled or not (the KD student: its soft targets cover them all).
    All,
}

impl TrainingStage<'_> {
    /// The run record to write: none for a run outside any experiment.
    fn run_record(&self) -> Option<crate::RunRecord> {
        (self.run != crate::RunRecord::default()).then(|| self.run.clone())
    }

    /// An up-to-date run's manifest, with this run's experiment record if that changed (the
    /// record is not part of the key: the same training, filed under another variant).
    fn relabel(&self, mut m: Manifest) -> Result<Manifest, TrainError> {
        if m.run == self.run_record() {
            return Ok(m);
        }
        m.run = self.run_record();
        let dir = self.pipeline.dir(self.stage);
        let outputs: Vec<String> = m.outputs.keys().cloned().collect();
        let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        m.write(&dir, &outputs)
    }

    /// The freshness key, and the manifest if the stage is up to date.
    pub fn check(&self, data: &LoadedData) -> (String, BTreeMap<String, String>, Option<Manifest>) {
        let mut inputs = data.inputs();
        inputs.extend(self.inputs.clone());
        let key = stage_key(self.stage, &self.settings, &inputs);
        let dir = self.pipeline.dir(self.stage);
        let fresh = self
            .pipeline
            .up_to_date(self.stage, &dir, &key, &self.settings, &inputs);
        (key, inputs, fresh)
    }

    /// Trains with `loss_fn(batch, heads)`, keeps the best-on-validation weights, measures them
    /// once on the test set, and commits the checkpoint and `manifest.json` together. One run at
    /// a time writes the stage's folder; until the commit, the previous run's checkpoint and
    /// manifest stay as they were (the best weights so far are kept in `best.partial.safetensors`).
    pub fn run(
        &self,
        data: &LoadedData,
        loss_fn: impl FnMut(&Batch, &[Tensor]) -> candle_core::Result<Tensor>,
    ) -> Result<Manifest, TrainError> {
        let started = std::time::Instant::now();
        let dir = self.pipeline.dir(self.stage);
        let _lock = crate::verify::RunLock::acquire(&dir)?;
        let (key, inputs, fresh) = self.check(data);
        if let Some(m) = fresh {
            return self.relabel(m);
        }
        let partial = dir.join(PARTIAL_CHECKPOINT);
        kd_models::check_input(self.arch, &data.spec)?;
        let model = Trainable::new(self.arch, &data.spec, self.train.seed, &data.device)?;
        let settings = self.settings_for(data, model.num_parameters());
        let spec = FitSpec {
            name: self.stage,
            settings: &settings,
            train: match self.rows {
                Rows::Labelled => data.labelled(),
                Rows::All => data.train(),
            },
            val: data.val(),
            normalization: &data.dataset.normalization,
            sources: data.dataset.train_sources.as_deref(),
            views: self.views,
            labelled: data.label_mask.as_deref(),
            checkpoint: &partial,
            resume: &dir.join(RESUME_FILE),
            key: &key,
            restart: self.pipeline.force,
            require_resume: self.pipeline.resume,
        };
        let fit = fit(&model, &spec, loss_fn)?;
        // The test set is read once, by the checkpoint that validation chose.
        let best = load_frozen(self.arch, &data.spec, &partial, &data.device)?;
        let test = evaluate(best.as_ref(), data.test(), 256)?;
        let record = crate::TrainRecord {
            architecture: self.arch.to_string(),
            parameters: model.num_parameters(),
            fit,
            test_accuracy: test.accuracy,
            test_loss: test.loss,
            test_images: test.images,
            labelled_images: data.label_mask.as_ref().map(|_| data.labelled_rows.len()),
            knowledge: self.knowledge.clone(),
        };
        let manifest = Manifest {
            settings: self.settings.clone(),
            inputs,
            seed: Some(self.train.seed),
            run: self.run_record(),
            wall_seconds: started.elapsed().as_secs_f64(),
            metrics: crate::record::to_json(&record)?,
            ..Manifest::start(self.stage, &self.pipeline.name, key)
        };
        let manifest = commit(&dir, data, manifest)?;
        self.print_summary(&record, &settings, &dir);
        Ok(manifest)
    }

    /// The loop's settings: an epoch of as many steps as a pass over every training row when
    /// only some carry a label. Logs what is about to train.
    fn settings_for(&self, data: &LoadedData, parameters: usize) -> crate::TrainSettings {
        let mut settings = self.train.clone();
        if settings.epoch_steps.is_none() && data.label_mask.is_some() {
            settings.epoch_steps = Some(data.steps_per_pass(settings.batch_size));
        }
        tracing::info!(
            "{}: {} ({parameters} parameters), {} epochs{}, batch {}, lr {:e}, {} threads",
            self.stage,
            self.arch,
            settings.epochs,
            settings
                .epoch_steps
                .map_or(String::new(), |s| format!(" of {s} steps")),
            settings.batch_size,
            settings.lr,
            threads()
        );
        settings
    }

    fn print_summary(
        &self,
        r: &crate::TrainRecord,
        settings: &crate::TrainSettings,
        dir: &std::path::Path,
    ) {
        let mut t = Table::new(&[
            "stage",
            "model",
            "parameters",
            "best epoch",
            "val acc",
            "test acc",
            "train img/s",
            "wall time",
        ]);
        t.row(&[
            self.stage.to_string(),
            self.arch.to_string(),
            r.parameters.to_string(),
            format!("{}/{}", r.fit.best_epoch, settings.epochs),
            format!("{:.2}%", 100.0 * r.fit.best_val_accuracy),
            format!("{:.2}%", 100.0 * r.test_accuracy),
            format!("{:.0}", r.fit.train_images_per_sec),
            format!("{:.1}s", r.fit.wall_seconds),
        ]);
        println!(
            "\n{}\nwrote {} and {}",
            t.to_markdown(),
            dir.join(CHECKPOINT).display(),
            Manifest::path(dir).display()
        );
    }
}

/// Commits a finished run: the previous manifest goes first (from here until the new one is
/// written, no manifest vouches for the folder, so no stage reads it), then the checkpoint and
/// the class index map take their places, then the manifest naming their hashes.
fn commit(
    dir: &std::path::Path,
    data: &LoadedData,
    manifest: Manifest,
) -> Result<Manifest, TrainError> {
    match std::fs::remove_file(Manifest::path(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(TrainError::file(
                &Manifest::path(dir),
                format!("cannot replace: {e}"),
            ))
        }
        _ => {}
    }
    let checkpoint = dir.join(CHECKPOINT);
    std::fs::rename(dir.join(PARTIAL_CHECKPOINT), &checkpoint)
        .map_err(|e| TrainError::file(&checkpoint, format!("cannot commit the checkpoint: {e}")))?;
    // The class index map, as the seed writes it: {"0": "daisy", ...}.
    let classes: serde_json::Map<String, serde_json::Value> = data
        .dataset
        .class_names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), serde_json::Value::String(n.clone())))
        .collect();
    let text =
        serde_json::to_string_pretty(&classes).map_err(|e| TrainError::Other(e.to_string()))?;
    kd_data::write_atomic_bytes(&dir.join(CLASS_INDICES), text.as_bytes())?;
    let manifest = manifest.write(dir, &[CHECKPOINT, CLASS_INDICES])?;
    // Done and recorded: the resume state has served its purpose.
    let _ = std::fs::remove_file(dir.join(RESUME_FILE));
    Ok(manifest)
}
