//! The training loop every trainer shares, evaluation, and checkpoints.

use crate::config::TrainSettings;
pub use crate::metrics::{EpochMetrics, Eval, FitReport};
use crate::optim::{learning_rate, Adam, AdamParams};
use crate::resume::{Progress, ResumeState};
use crate::TrainError;
use candle_core::{DType, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use kd_data::{Batch, Batches, Normalization, SourceImage};
use kd_models::{Classifier, Trainable};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Rows of one image tensor: a training, validation or test subset.
#[derive(Clone, Copy)]
pub struct Subset<'a> {
    pub images: &'a Tensor,
    pub labels: &'a Tensor,
    pub rows: &'a [u32],
}

fn progress(len: usize, prefix: String) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// Number of correct main-head predictions in a batch.
fn correct(logits: &Tensor, labels: &Tensor) -> candle_core::Result<f64> {
    logits
        .argmax(D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()
}

/// Correct main-head predictions among the batch's rows that carry a label, and how many do.
fn correct_labelled(
    logits: &Tensor,
    batch: &kd_data::Batch,
    labelled: &[u8],
) -> candle_core::Result<(f64, usize)> {
    let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let labels = batch.labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let rows = batch.rows.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let (mut hits, mut seen) = (0.0, 0);
    for ((p, l), r) in predicted.iter().zip(&labels).zip(&rows) {
        if labelled.get(*r as usize) == Some(&1) {
            seen += 1;
            hits += f64::from(u8::from(p == l));
        }
    }
    Ok((hits, seen))
}

/// What to train on and where the best weights go.
#[derive(Clone, Copy)]
pub struct FitSpec<'a> {
    /// Shown in logs and progress bars.
    pub name: &'a str,
    pub settings: &'a TrainSettings,
    pub train: Subset<'a>,
    pub val: Subset<'a>,
    /// The data's normalisation (augmented images are normalised as the rest).
    pub normalization: &'a Normalization,
    /// Decoded photos per training row, for resized-crop augmentation.
    pub sources: Option<&'a [SourceImage]>,
    /// A multi-view knowledge file's stored views, replayed instead of fresh augmentation.
    pub views: Option<kd_data::StoredViews<'a>>,
    /// One byte per row of the training file, 1 where it carries a label, when not all do: the
    /// training accuracy counts only those rows.
    pub labelled: Option<&'a [u8]>,
    pub checkpoint: &'a Path,
    /// Where the resume state goes after every epoch, and the key it must carry to be resumed.
    pub resume: &'a Path,
    pub key: &'a str,
    /// Start over even if a matching resume state exists (`--force`).
    pub restart: bool,
    /// Refuse to start over: a matching resume state must exist (`--resume`).
    pub require_resume: bool,
}

/// Trains `model` with `loss_fn(batch, heads) -> scalar loss`, evaluates on `val` after every
/// epoch and writes the best weights to `checkpoint` (atomically) whenever they improve, and the
/// resume state after every epoch. A non-finite loss stops the run; the last good checkpoint
/// stays. The loop schedules; [`Trainer`] does the steps, the epoch's end and the saving.
pub fn fit(
    model: &Trainable,
    spec: &FitSpec,
    mut loss_fn: impl FnMut(&Batch, &[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<FitReport, TrainError> {
    let start = Instant::now();
    let mut t = Trainer::new(model, spec)?;
    let first_epoch = t.resume()?;
    for epoch in first_epoch..=spec.settings.epochs {
        let t0 = Instant::now();
        let sums = t.train_epoch(epoch, &mut loss_fn)?;
        let train_secs = t0.elapsed().as_secs_f64();
        t.end_epoch(epoch, sums, train_secs, t0)?;
        t.save_resume(epoch)?;
    }
    let mut report = t.report;
    report.wall_seconds = start.elapsed().as_secs_f64();
    let images: usize = report.epochs.iter().map(|e| e.images).sum();
    report.train_images_per_sec = images as f64 / t.train_seconds.max(1e-9);
    Ok(report)
}

/// An epoch's running sums: loss × images, correct predictions, images, labelled images.
#[derive(Default)]
struct Sums {
    loss: f64,
    hits: f64,
    seen: usize,
    labelled: usize,
}

/// A run in progress: the model, its optimiser, where it stands in the schedule, and its report.
struct Trainer<'a> {
    model: &'a Trainable,
    spec: &'a FitSpec<'a>,
    opt: Adam,
    steps_per_epoch: usize,
    total_steps: usize,
    step: usize,
    train_seconds: f64,
    report: FitReport,
}

impl<'a> Trainer<'a> {
    fn new(model: &'a Trainable, spec: &'a FitSpec<'a>) -> Result<Self, TrainError> {
        let settings = spec.settings;
        let vars: Vec<_> = model
            .vars
            .varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Other("poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let steps_per_epoch = epoch_steps(spec);
        Ok(Self {
            model,
            spec,
            opt: Adam::new(vars, AdamParams::new(settings.lr, settings.weight_decay))?,
            steps_per_epoch,
            total_steps: steps_per_epoch * settings.epochs,
            step: 0,
            train_seconds: 0.0,
            report: FitReport {
                epochs: vec![],
                best_epoch: 0,
                best_val_accuracy: -1.0,
                wall_seconds: 0.0,
                train_images_per_sec: 0.0,
                steps_per_epoch,
            },
        })
    }

    /// Loads a matching resume state, if there is one; the first epoch to train.
    fn resume(&mut self) -> Result<usize, TrainError> {
        let Some(state) = resume_state(self.spec)? else {
            return Ok(1);
        };
        let path = self.spec.resume;
        let p = state.progress;
        for (name, t) in &state.weights {
            let var = opt_var(self.model, name)?;
            var.set(&t.to_device(var.device())?)?;
        }
        self.opt
            .load_state(state.adam)
            .map_err(|e| TrainError::file(path, e))?;
        let pos = p
            .dropout_word_pos
            .parse()
            .map_err(|_| TrainError::file(path, "bad dropout position"))?;
        self.model.dropout.set_word_pos(pos);
        tracing::info!(
            "{}: resuming after epoch {}/{} from {}",
            self.spec.name,
            p.epoch,
            self.spec.settings.epochs,
            path.display()
        );
        (self.step, self.train_seconds, self.report) = (p.step, p.train_seconds, p.report);
        Ok(p.epoch + 1)
    }

    /// One epoch of steps, with a progress bar (or, without a terminal, a line every tenth of
    /// an epoch); stops on a signal.
    fn train_epoch(
        &mut self,
        epoch: usize,
        loss_fn: &mut impl FnMut(&Batch, &[Tensor]) -> candle_core::Result<Tensor>,
    ) -> Result<Sums, TrainError> {
        let (name, epochs) = (self.spec.name, self.spec.settings.epochs);
        let t0 = Instant::now();
        let bar = progress(
            self.steps_per_epoch,
            format!("{name} epoch {epoch}/{epochs}"),
        );
        let sums = crate::awake::workers_awake(|| self.epoch_steps(epoch, loss_fn, t0, &bar))?;
        bar.finish_and_clear();
        Ok(sums)
    }

    /// The steps of [`Self::train_epoch`], the progress bar moved after each.
    fn epoch_steps(
        &mut self,
        epoch: usize,
        loss_fn: &mut impl FnMut(&Batch, &[Tensor]) -> candle_core::Result<Tensor>,
        t0: Instant,
        bar: &ProgressBar,
    ) -> Result<Sums, TrainError> {
        let (name, epochs) = (self.spec.name, self.spec.settings.epochs);
        let mut sums = Sums::default();
        for batch in epoch_batches(self.spec, epoch, self.steps_per_epoch) {
            if crate::interrupt::requested() {
                bar.abandon();
                return Err(self.interrupted(epoch));
            }
            let batch = batch?;
            if let Err(e) = self.step(&batch, loss_fn, &mut sums, epoch) {
                bar.abandon();
                return Err(e);
            }
            bar.inc(1);
            let status = format!(
                "loss {:.4} {:.0} img/s",
                sums.loss / sums.seen as f64,
                sums.seen as f64 / t0.elapsed().as_secs_f64()
            );
            let done = bar.position() as usize;
            let every = self.steps_per_epoch.div_ceil(10).max(1);
            if bar.is_hidden() && done.is_multiple_of(every) && done < self.steps_per_epoch {
                tracing::info!(
                    "{name} epoch {epoch}/{epochs}: {done}/{} batches, {status}",
                    self.steps_per_epoch
                );
            }
            bar.set_message(status);
        }
        Ok(sums)
    }

    /// One optimiser step on `batch`; a non-finite loss stops the run.
    fn step(
        &mut self,
        batch: &Batch,
        loss_fn: &mut impl FnMut(&Batch, &[Tensor]) -> candle_core::Result<Tensor>,
        sums: &mut Sums,
        epoch: usize,
    ) -> Result<(), TrainError> {
        let s = self.spec.settings;
        let lr = learning_rate(s.schedule, s.lr, self.step, self.total_steps);
        self.opt.set_lr(lr);
        let batch = &batch.to_device(self.model.model.device())?;
        let forward = crate::halves::Forward::run(self.model, batch, loss_fn)?;
        let value = forward.loss()?;
        if !value.is_finite() {
            let kept = if self.report.best_epoch > 0 {
                format!(
                    "the checkpoint of epoch {} is kept at {}",
                    self.report.best_epoch,
                    self.spec.checkpoint.display()
                )
            } else {
                "no checkpoint was written yet".to_string()
            };
            return Err(TrainError::Diverged(format!(
                "{}: the loss became {value} at epoch {epoch}, step {} (lr {lr:.3e}); {kept}; try a lower learning rate",
                self.spec.name, self.step
            )));
        }
        let main = forward.logits(0)?;
        self.opt.step(&forward.backward(self.model)?)?;
        sums.loss += value * batch.len as f64;
        let (hits, labelled) = match self.spec.labelled {
            Some(mask) => correct_labelled(&main, batch, mask)?,
            None => (correct(&main, &batch.labels)?, batch.len),
        };
        sums.hits += hits;
        sums.labelled += labelled;
        sums.seen += batch.len;
        self.step += 1;
        Ok(())
    }

    fn interrupted(&self, epoch: usize) -> TrainError {
        let done = epoch - 1;
        let how = if done > 0 {
            format!(
                "epoch {done} is saved in {}; run the same command again (or add --resume) to continue from it",
                self.spec.resume.display()
            )
        } else {
            "no epoch was complete, so nothing is saved to resume from".to_string()
        };
        TrainError::Interrupted(format!(
            "{}: interrupted during epoch {epoch}; {how}",
            self.spec.name
        ))
    }

    /// Validation, the epoch's metrics and log line, and the checkpoint when it improved.
    fn end_epoch(
        &mut self,
        epoch: usize,
        sums: Sums,
        train_secs: f64,
        t0: Instant,
    ) -> Result<(), TrainError> {
        let s = self.spec.settings;
        self.train_seconds += train_secs;
        let v = evaluate(
            self.model.model.as_ref(),
            self.spec.val,
            s.batch_size.max(256),
        )?;
        let m = EpochMetrics {
            epoch,
            lr: learning_rate(s.schedule, s.lr, self.step, self.total_steps),
            train_loss: sums.loss / sums.seen.max(1) as f64,
            train_accuracy: sums.hits / sums.labelled.max(1) as f64,
            val_loss: v.loss,
            val_accuracy: v.accuracy,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_sec: sums.seen as f64 / train_secs,
            images: sums.seen,
        };
        let improved = m.val_accuracy > self.report.best_val_accuracy;
        tracing::info!(
            "{} epoch {epoch}/{}: loss {:.4}, train acc {:.2}%, val acc {:.2}%, val loss {:.4}, {:.0} img/s{}",
            self.spec.name,
            s.epochs,
            m.train_loss,
            100.0 * m.train_accuracy,
            100.0 * m.val_accuracy,
            m.val_loss,
            m.images_per_sec,
            if improved { " (best so far, saved)" } else { "" }
        );
        if improved {
            self.report.best_epoch = epoch;
            self.report.best_val_accuracy = m.val_accuracy;
            save_checkpoint(self.spec.checkpoint, &self.model.named_tensors())?;
        }
        self.report.epochs.push(m);
        Ok(())
    }

    /// Everything a resumed run needs to continue bit for bit, after a complete epoch.
    fn save_resume(&self, epoch: usize) -> Result<(), TrainError> {
        let progress = Progress {
            key: self.spec.key.to_string(),
            epoch,
            step: self.step,
            dropout_word_pos: self.model.dropout.word_pos().to_string(),
            train_seconds: self.train_seconds,
            report: self.report.clone(),
        };
        let weights = self.model.named_tensors();
        crate::resume::save(self.spec.resume, &progress, &weights, &self.opt.state()?)
    }
}

/// Optimiser steps per epoch: `settings.epoch_steps`, else one pass over the training rows.
fn epoch_steps(spec: &FitSpec) -> usize {
    let pass = spec
        .train
        .rows
        .len()
        .div_ceil(spec.settings.batch_size.max(1));
    spec.settings.epoch_steps.unwrap_or(pass).max(1)
}

/// Pass `pass` (from 1) over the training rows: shuffled, and augmented or replaying stored
/// views, with `pass` as the index of its random streams.
fn pass_batches<'a>(spec: &FitSpec<'a>, pass: usize) -> Batches<'a> {
    let (s, t) = (spec.settings, spec.train);
    let batches = Batches::new(t.images, t.labels, t.rows, s.batch_size).shuffled(s.seed, pass);
    match (spec.views, s.augment) {
        (Some(stored), _) => {
            batches.replaying(stored, s.seed, pass, spec.normalization, spec.sources)
        }
        (None, Some(aug)) => batches.augmented(aug, s.seed, pass, spec.normalization, spec.sources),
        (None, None) => batches,
    }
}

/// The `steps` batches of `epoch` (from 1): the run's steps are consecutive passes over the
/// training rows, cut into epochs of `steps` steps. With one pass per epoch, epoch e is pass e.
fn epoch_batches<'a>(
    spec: &FitSpec<'a>,
    epoch: usize,
    steps: usize,
) -> impl Iterator<Item = kd_data::Result<Batch>> + 'a {
    let spec = *spec;
    let per_pass = spec
        .train
        .rows
        .len()
        .div_ceil(spec.settings.batch_size.max(1))
        .max(1);
    let first = (epoch - 1) * steps;
    let (first_pass, skip) = (first / per_pass + 1, first % per_pass);
    (first_pass..)
        .flat_map(move |pass| {
            let offset = if pass == first_pass { skip } else { 0 };
            pass_batches(&spec, pass).skip_batches(offset)
        })
        .take(steps)
}

/// The resume state to continue from, if there is a matching one (and `--force` was not given).
fn resume_state(spec: &FitSpec) -> Result<Option<ResumeState>, TrainError> {
    let path = spec.resume;
    if spec.restart || !path.is_file() {
        if spec.require_resume {
            return Err(TrainError::file(
                path,
                "--resume: there is no resume state (was a run of this stage interrupted?)",
            ));
        }
        return Ok(None);
    }
    let state = crate::resume::load(path)?;
    if state.progress.key != spec.key {
        if spec.require_resume {
            return Err(TrainError::file(
                path,
                "--resume: the resume state was made with other settings or inputs",
            ));
        }
        tracing::warn!(
            "{}: {} was made with other settings or inputs; starting over",
            spec.name,
            path.display()
        );
        return Ok(None);
    }
    Ok(Some(state))
}

fn opt_var(model: &Trainable, name: &str) -> Result<candle_core::Var, TrainError> {
    let data = model
        .vars
        .varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Other("poisoned".into()))?;
    data.get(name).cloned().ok_or_else(|| {
        TrainError::Other(format!(
            "the resume state has weights for {name}, which this model lacks"
        ))
    })
}

/// Accuracy and loss of the main head on `set`, in eval mode, with its throughput.
pub fn evaluate(
    model: &dyn Classifier,
    set: Subset,
    batch_size: usize,
) -> Result<Eval, TrainError> {
    let t0 = Instant::now();
    let (mut hits, mut loss, mut n) = (0.0, 0.0, 0usize);
    for batch in Batches::new(set.images, set.labels, set.rows, batch_size) {
        crate::interrupt::check("evaluating")?;
        let batch = batch?.to_device(model.device())?;
        let heads = model.forward_t(&batch.images, false)?;
        hits += correct(&heads[0], &batch.labels)?;
        loss += crate::loss::cross_entropy(&heads[0], &batch.labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * batch.len as f64;
        n += batch.len;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let n_f = n.max(1) as f64;
    Ok(Eval {
        accuracy: hits / n_f,
        loss: loss / n_f,
        images: n,
        seconds,
        images_per_sec: n as f64 / seconds.max(1e-9),
    })
}

/// Logits of every head for `rows`, in that order: one `[rows, classes]` row-major buffer per head.
pub fn predict(
    model: &dyn Classifier,
    set: Subset,
    batch_size: usize,
    label: &str,
) -> Result<Vec<Vec<f32>>, TrainError> {
    predict_batches(
        model,
        Batches::new(set.images, set.labels, set.rows, batch_size),
        label,
    )
}

/// [`predict`] over any batches (e.g. augmented views), in their order.
pub fn predict_batches(
    model: &dyn Classifier,
    batches: Batches,
    label: &str,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let bar = progress(batches.num_batches(), label.to_string());
    let out = crate::awake::workers_awake(|| predict_each(model, batches, label, &bar))?;
    bar.finish_and_clear();
    Ok(out)
}

/// The batches of [`predict_batches`], one forward each, the progress bar moved after each.
fn predict_each(
    model: &dyn Classifier,
    batches: Batches,
    label: &str,
    bar: &ProgressBar,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let mut out: Vec<Vec<f32>> = Vec::new();
    for batch in batches {
        crate::interrupt::check(if label.is_empty() {
            "predicting"
        } else {
            label
        })?;
        let heads = model.forward_t(&batch?.images.to_device(model.device())?, false)?;
        if out.is_empty() {
            out = vec![Vec::new(); heads.len()];
        }
        for (buf, h) in out.iter_mut().zip(&heads) {
            buf.extend(h.flatten_all()?.to_vec1::<f32>()?);
        }
        bar.inc(1);
    }
    Ok(out)
}

/// Writes weights as safetensors, atomically. The same weights always give the same bytes.
pub fn save_checkpoint(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| TrainError::file(path, e.to_string()))?;
    kd_data::write_atomic_bytes(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Schedule;
    use candle_core::Device;

    /// The training accuracy of a batch counts only the rows that carry a label: a hidden label
    /// (stored as class 0) neither scores nor dilutes.
    #[test]
    fn training_accuracy_counts_only_labelled_rows() {
        let dev = Device::Cpu;
        // Rows 7, 3, 5, 1 of the training file; the model predicts classes 0, 1, 2, 0.
        let logits = Tensor::new(
            &[[5f32, 0., 0.], [0., 5., 0.], [0., 0., 5.], [5., 0., 0.]],
            &dev,
        )
        .unwrap();
        let batch = kd_data::Batch {
            images: Tensor::zeros((4, 1, 1, 1), DType::F32, &dev).unwrap(),
            labels: Tensor::new(&[0u32, 1, 1, 0], &dev).unwrap(),
            rows: Tensor::new(&[7u32, 3, 5, 1], &dev).unwrap(),
            views: None,
            len: 4,
        };
        // Rows 3 and 5 are labelled (one right, one wrong); rows 7 and 1 hide their label.
        let mut mask = vec![0u8; 8];
        mask[3] = 1;
        mask[5] = 1;
        let (hits, seen) = correct_labelled(&logits, &batch, &mask).unwrap();
        assert_eq!((hits, seen), (1.0, 2));
        assert_eq!(correct(&logits, &batch.labels).unwrap(), 3.0);
    }

    /// A loss that turns NaN in epoch 2 stops the run with a message, and the checkpoint of
    /// epoch 1 stays as it was written.
    #[test]
    fn a_nan_loss_stops_and_keeps_the_last_good_checkpoint() {
        let dev = Device::Cpu;
        let n = 64;
        let images = Tensor::randn(0f32, 1.0, (n, 1, 28, 28), &dev).unwrap();
        let labels =
            Tensor::from_vec((0..n as u32).map(|i| i % 10).collect::<Vec<_>>(), n, &dev).unwrap();
        let rows: Vec<u32> = (0..48).collect();
        let val_rows: Vec<u32> = (48..64).collect();
        let spec_in = kd_models::InputSpec {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        };
        let model = Trainable::new("student-cnn", &spec_in, 0, &dev).unwrap();
        let settings = TrainSettings {
            epochs: 3,
            batch_size: 16,
            lr: 1e-3,
            schedule: Schedule::Constant,
            weight_decay: 0.0,
            seed: 0,
            augment: None,
            epoch_steps: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let (checkpoint, resume) = (
            dir.path().join("model.safetensors"),
            dir.path().join("resume.safetensors"),
        );
        let norm = Normalization {
            mean: vec![0.0],
            std: vec![1.0],
        };
        let spec = FitSpec {
            name: "nan-test",
            settings: &settings,
            train: Subset {
                images: &images,
                labels: &labels,
                rows: &rows,
            },
            val: Subset {
                images: &images,
                labels: &labels,
                rows: &val_rows,
            },
            normalization: &norm,
            sources: None,
            views: None,
            labelled: None,
            checkpoint: &checkpoint,
            resume: &resume,
            key: "k",
            restart: false,
            require_resume: false,
        };
        let mut calls = 0;
        let err = fit(&model, &spec, |b, heads| {
            calls += 1;
            let loss = crate::loss::cross_entropy(&heads[0], &b.labels)?;
            if calls > 3 {
                loss * f64::NAN
            } else {
                Ok(loss)
            }
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("epoch 2") && err.contains("NaN") && err.contains("epoch 1 is kept"),
            "{err}"
        );
        // The checkpoint holds exactly the weights of epoch 1 (as the epoch-1 resume state has them).
        let saved = candle_core::safetensors::load(&checkpoint, &dev).unwrap();
        let state = crate::resume::load(&resume).unwrap();
        assert_eq!(state.progress.epoch, 1);
        for (name, t) in &state.weights {
            let diff = (t - &saved[name])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
    }
}
