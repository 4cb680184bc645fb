//! A training step's forward and backward, over the whole batch or over its two halves at once.
//!
//! A step is a few hundred parallel loops (our convolutions, pools, BatchNorms) joined by candle's
//! graph work, which runs on one thread: the concatenations, the gradients that meet, the loss. On
//! two threads that serial work left the second thread idle for a tenth of the step, and two
//! one-thread processes together trained 15–20% faster than one two-thread process
//! (`docs/speed.md`, sixteenth round). So where the model allows it
//! ([`kd_models::Classifier::trains_in_halves`]: the GoogLeNets), the batch is trained as two
//! halves, each half's forward and backward on a worker of its own, and one half's serial work
//! runs while the other half computes:
//! - each half's loss is the batch-mean loss of its rows, weighted by its share of the batch, so
//!   the two losses add up to the batch's and so do the two gradients (every loss of `loss.rs` is
//!   a mean over the batch's rows);
//! - each half draws its dropout masks from a stream of its own ([`kd_models::DropoutRng::split`]);
//! - each BatchNorm's halves meet ([`kd_models::meeting`]) to normalise with the whole batch's
//!   statistics and to take the whole batch's sums in the backward, as one BatchNorm over the
//!   batch would;
//! - the gradients add in the halves' order, variable by variable.
//!
//! The split is always in two, whatever the thread count (on one thread the halves take turns on
//! two threads), so the bytes do not depend on the thread count. They differ from a whole-batch
//! step's (the weight gradients add in another order, the masks come from other streams).

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use kd_data::Batch;
use kd_models::meeting::Meeting;
use kd_models::Trainable;
use rayon::prelude::*;
use std::sync::Arc;

/// A step's forward: its parts' heads and losses (one part, the whole batch, or two halves),
/// and the halves' meeting place, which their backward uses again.
pub struct Forward {
    parts: Vec<Part>,
    meeting: Option<Arc<Meeting>>,
}

/// A part of the batch: its heads and its loss (weighted by its share of the batch).
struct Part {
    heads: Vec<Tensor>,
    loss: Tensor,
}

impl Forward {
    /// The forward in training mode and `loss_fn` on each part: the halves of `batch` where the
    /// model trains in halves and the batch has two rows or more, else the whole batch.
    pub fn run(
        model: &Trainable,
        batch: &Batch,
        loss_fn: &mut impl FnMut(&Batch, &[Tensor]) -> Result<Tensor>,
    ) -> Result<Self> {
        // On a GPU one batch is what fills it: no halves.
        let gpu = !model.model.device().is_cpu();
        if !model.model.trains_in_halves() || batch.len < 2 || gpu {
            let heads = model.model.forward_t(&batch.images, true)?;
            let loss = loss_fn(batch, &heads)?;
            return Ok(Self {
                parts: vec![Part { heads, loss }],
                meeting: None,
            });
        }
        let first = batch.len.div_ceil(2);
        let halves = [batch.rows(0, first)?, batch.rows(first, batch.len - first)?];
        let meeting = if rayon::current_num_threads() < 2 {
            Meeting::taking_turns()
        } else {
            Meeting::new()
        };
        let streams = model.dropout.split(2);
        let [h0, h1] = at_once(&meeting, |i| {
            streams[i].draw_in(|| model.model.forward_t(&halves[i].images, true))
        })?;
        model.dropout.advance_past(&streams);
        let mut parts = Vec::with_capacity(2);
        for (half, heads) in halves.iter().zip([h0, h1]) {
            let share = half.len as f64 / batch.len as f64;
            let loss = (loss_fn(half, &heads)? * share)?;
            parts.push(Part { heads, loss });
        }
        Ok(Self {
            parts,
            meeting: Some(meeting),
        })
    }

    /// The batch's loss: the parts' weighted losses added, in f64.
    pub fn loss(&self) -> Result<f64> {
        let mut total = 0.0;
        for part in &self.parts {
            total += part.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        Ok(total)
    }

    /// Head `head`'s logits for the whole batch, the parts' rows in order.
    pub fn logits(&self, head: usize) -> Result<Tensor> {
        let heads: Vec<&Tensor> = self.parts.iter().map(|p| &p.heads[head]).collect();
        match heads.as_slice() {
            [one] => Ok((*one).clone()),
            many => Tensor::cat(many, 0),
        }
    }

    /// The gradients of the batch's loss: each part's backward (the halves at once, meeting
    /// again at every BatchNorm), the halves' gradients added variable by variable in the
    /// halves' order.
    pub fn backward(self, model: &Trainable) -> Result<GradStore> {
        let mut parts = self.parts.into_iter();
        let Some(first) = parts.next() else {
            candle_core::bail!("a step's forward had no part");
        };
        let (Some(second), Some(meeting)) = (parts.next(), self.meeting) else {
            return first.loss.backward();
        };
        let losses = [&first.loss, &second.loss];
        let [g0, g1] = at_once(&meeting, |i| losses[i].backward())?;
        add_gradients(g0, g1, model)
    }
}

/// `f(0)` and `f(1)` as the meeting's two halves, at once: on two different workers of the
/// current rayon pool where it has two (each call from start to end on its worker, so what it
/// sets for its thread is its own; the other workers, if any, help both by stealing), else on
/// this thread and a thread of a one-thread pool of its own, taking turns. The first error wins
/// over the other half's "the other half failed".
fn at_once<T: Send>(
    meeting: &Arc<Meeting>,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<[T; 2]> {
    meeting.begin_pass();
    let half = |i: usize| meeting.attend(i, || f(i));
    let (first, second) = if rayon::current_num_threads() < 2 {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .stack_size(256 << 20)
            .thread_name(|_| "kd-half-1".into())
            .build()
            .map_err(|e| candle_core::Error::Msg(format!("a thread for the second half: {e}")))?;
        std::thread::scope(|s| {
            let second = s.spawn(|| pool.install(|| half(1)));
            let first = half(0);
            let second = second.join().unwrap_or_else(|_| {
                Err(candle_core::Error::Msg("the second half panicked".into()))
            });
            (first, second)
        })
    } else {
        // One result per worker, and a pool of two or more has workers 0 and 1. (Running a
        // missing half here, after the other, would hang: each half waits for the other to
        // arrive.)
        let mut out = rayon::broadcast(|worker| (worker.index() < 2).then(|| half(worker.index())));
        let mut take = |i: usize| {
            out.get_mut(i).and_then(Option::take).unwrap_or_else(|| {
                Err(candle_core::Error::Msg(format!("half {i} found no worker")))
            })
        };
        (take(0), take(1))
    };
    match (first, second) {
        (Ok(a), Ok(b)) => Ok([a, b]),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(if meeting.failed_first() == Some(1) {
            b
        } else {
            a
        }),
    }
}

/// `g0 + g1` for every variable of `model` (in parallel over the variables; each sum is `g0`'s
/// gradient plus `g1`'s).
fn add_gradients(mut g0: GradStore, g1: GradStore, model: &Trainable) -> Result<GradStore> {
    let vars = model.vars.varmap.all_vars();
    let sums: Vec<Option<Tensor>> = vars
        .par_iter()
        .map(|v| match (g0.get(v), g1.get(v)) {
            (Some(a), Some(b)) => a.add(b).map(Some),
            (None, Some(b)) => Ok(Some(b.clone())),
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    for (v, sum) in vars.iter().zip(sums) {
        if let Some(sum) = sum {
            g0.insert(v, sum);
        }
    }
    Ok(g0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{cross_entropy, teacher_loss};
    use candle_core::Device;
    use candle_nn::Init;
    use kd_models::graph::InferenceGraph;
    use kd_models::{Classifier, DropoutRng, InputSpec, SeededVarMap};

    /// `rows` images of `side`×`side` (one channel) and their labels below `classes`, from a
    /// fixed sequence.
    fn batch(rows: usize, side: usize, classes: u32) -> Batch {
        let pixels: Vec<f32> = (0..rows * side * side)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let labels: Vec<u32> = (0..rows as u32).map(|i| (i * 7 + 3) % classes).collect();
        let rows_idx: Vec<u32> = (0..rows as u32).collect();
        Batch {
            images: Tensor::from_vec(pixels, (rows, 1, side, side), &Device::Cpu).unwrap(),
            labels: Tensor::from_vec(labels, rows, &Device::Cpu).unwrap(),
            rows: Tensor::from_vec(rows_idx, rows, &Device::Cpu).unwrap(),
            views: None,
            len: rows,
        }
    }

    /// A linear classifier whose rows are independent and that has no dropout: its halves must
    /// give the whole batch's loss, logits and gradient.
    struct Affine(Tensor);

    impl Classifier for Affine {
        fn device(&self) -> &Device {
            static CPU: Device = Device::Cpu;
            &CPU
        }

        fn heads(&self) -> &'static [&'static str] {
            &["main"]
        }
        fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Vec<Tensor>> {
            Ok(vec![xs.flatten_from(1)?.matmul(&self.0)?])
        }
        fn trains_in_halves(&self) -> bool {
            true
        }
        fn inference_graph(&self, _input: &str) -> Result<InferenceGraph> {
            candle_core::bail!("a test model")
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// Seven rows (halves of 4 and 3, so the weights by share matter): the halves' loss,
    /// main logits and weight gradient agree with the whole batch's to f32 rounding.
    #[test]
    fn the_halves_add_up_to_the_whole_batch() {
        let vars = SeededVarMap::new(5);
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.5,
        };
        let w = vars
            .var_builder(&Device::Cpu)
            .get_with_hints((16, 3), "w", init)
            .unwrap();
        let model = Trainable {
            model: Box::new(Affine(w.clone())),
            vars,
            dropout: DropoutRng::new(5),
        };
        let b = batch(7, 4, 3);
        let mut ce = |b: &Batch, heads: &[Tensor]| cross_entropy(&heads[0], &b.labels);
        let forward = Forward::run(&model, &b, &mut ce).unwrap();
        assert_eq!(forward.parts.len(), 2);
        let (loss, logits) = (forward.loss().unwrap(), forward.logits(0).unwrap());
        let grad = forward.backward(&model).unwrap().get(&w).unwrap().clone();

        let heads = model.model.forward_t(&b.images, true).unwrap();
        let whole = ce(&b, &heads).unwrap();
        let whole_grad = whole.backward().unwrap().get(&w).unwrap().clone();
        let whole_loss = whole.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (loss - whole_loss).abs() < 1e-6,
            "{loss} against {whole_loss}"
        );
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gap = |a: &Tensor, b: &Tensor| {
            let (a, b) = (values(a), values(b));
            a.iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        };
        assert!(gap(&logits, &heads[0]) < 1e-6);
        assert!(
            gap(&grad, &whole_grad) < 1e-6,
            "{}",
            gap(&grad, &whole_grad)
        );
        assert!(gap(&whole_grad, &whole_grad.zeros_like().unwrap()) > 1e-3);
    }

    /// One `googlenet` teacher step's loss, main logits, every gradient and the dropout stream's
    /// position after it, as bits, on a pool of `threads` threads.
    fn googlenet_step(arch: &str, threads: usize) -> (u64, Vec<u32>, Vec<Vec<u32>>, u128, usize) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let spec = InputSpec {
                channels: 1,
                height: 28,
                width: 28,
                classes: 10,
            };
            let model = Trainable::new(arch, &spec, 3, &Device::Cpu).unwrap();
            let b = batch(5, 28, 10);
            let mut loss_fn = |b: &Batch, heads: &[Tensor]| teacher_loss(heads, &b.labels, 0.3);
            let forward = Forward::run(&model, &b, &mut loss_fn).unwrap();
            let parts = forward.parts.len();
            let (loss, logits) = (forward.loss().unwrap(), forward.logits(0).unwrap());
            let grads = forward.backward(&model).unwrap();
            let vars = model.vars.varmap.data().lock().unwrap().clone();
            let mut names: Vec<&String> = vars.keys().collect();
            names.sort();
            let grads = names
                .iter()
                .filter_map(|n| grads.get(&vars[*n]).map(bits))
                .collect();
            (
                loss.to_bits(),
                bits(&logits),
                grads,
                model.dropout.word_pos(),
                parts,
            )
        })
    }

    /// The halves of a `googlenet` and a `googlenet-bn` step (5 rows: 3 and 2) give the same
    /// bytes on one, two and three threads (one thread: the halves take turns), and the dropout
    /// stream moves on by the masks of both halves.
    #[test]
    fn halves_give_the_same_bytes_on_one_two_and_three_threads() {
        for arch in ["googlenet", "googlenet-bn"] {
            let one = googlenet_step(arch, 1);
            assert_eq!(one.4, 2);
            assert!(one.2.len() > 100, "{} gradients", one.2.len());
            assert!(one.3 > 0);
            for threads in [2, 3] {
                assert!(
                    googlenet_step(arch, threads) == one,
                    "{arch}, {threads} threads"
                );
            }
        }
    }

    /// A linear layer, BatchNorm + ReLU over its 6 outputs, a linear layer to 3 classes: the
    /// rows meet only in the BatchNorm.
    struct Normed {
        w: Tensor,
        norm: kd_models::norm::BatchNormRelu,
        v: Tensor,
    }

    impl Classifier for Normed {
        fn device(&self) -> &Device {
            static CPU: Device = Device::Cpu;
            &CPU
        }

        fn heads(&self) -> &'static [&'static str] {
            &["main"]
        }
        fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
            let z = xs.flatten_from(1)?.matmul(&self.w)?.t()?.contiguous()?;
            let y = self.norm.forward_t(&z, train)?.t()?;
            Ok(vec![y.matmul(&self.v)?])
        }
        fn trains_in_halves(&self) -> bool {
            true
        }
        fn inference_graph(&self, _input: &str) -> Result<InferenceGraph> {
            candle_core::bail!("a test model")
        }
    }

    /// A [`Normed`] model for images of 4×4 pixels, its weights drawn from seed 11.
    fn normed() -> Trainable {
        let vars = SeededVarMap::new(11);
        let vb = vars.var_builder(&Device::Cpu);
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.5,
        };
        let w = vb.get_with_hints((16, 6), "w", init).unwrap();
        let norm = kd_models::norm::BatchNormRelu::new(6, vb.pp("bn")).unwrap();
        let v = vb.get_with_hints((6, 3), "v", init).unwrap();
        Trainable {
            model: Box::new(Normed { w, norm, v }),
            vars,
            dropout: DropoutRng::new(11),
        }
    }

    /// With the halves meeting at the BatchNorm (on two threads, and taking turns on one), the
    /// loss, every gradient and the running statistics are the whole batch's, to f32 rounding.
    #[test]
    fn batch_norm_halves_meet_to_the_whole_batch() {
        let b = batch(9, 4, 3);
        let mut ce = |b: &Batch, heads: &[Tensor]| cross_entropy(&heads[0], &b.labels);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let state = |m: &Trainable, g: &GradStore| {
            let vars = m.vars.varmap.data().lock().unwrap().clone();
            let mut names: Vec<&String> = vars.keys().collect();
            names.sort();
            names
                .iter()
                .map(|n| {
                    let var = &vars[*n];
                    g.get(var).map_or_else(|| values(var.as_tensor()), values)
                })
                .collect::<Vec<_>>()
        };
        let whole = normed();
        let heads = whole.model.forward_t(&b.images, true).unwrap();
        let loss = ce(&b, &heads).unwrap();
        let expected = state(&whole, &loss.backward().unwrap());
        let expected_loss = loss.to_scalar::<f32>().unwrap() as f64;
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let model = normed();
            let (value, got) = pool.install(|| {
                let forward = Forward::run(&model, &b, &mut ce).unwrap();
                assert_eq!(forward.parts.len(), 2);
                let value = forward.loss().unwrap();
                (value, state(&model, &forward.backward(&model).unwrap()))
            });
            assert!(
                (value - expected_loss).abs() < 1e-6,
                "{value} against {expected_loss}"
            );
            // Gradients of w, v, γ, β; the running mean and variance (no gradient: their values).
            assert_eq!(got.len(), 6);
            for (g, e) in got.iter().zip(&expected) {
                let gap = g
                    .iter()
                    .zip(e)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(gap < 1e-5, "{threads} threads: {gap}");
            }
        }
    }

    /// On two threads, each half of every pass starts its work only once the other half has
    /// arrived ([`Meeting::attend`]), the other worker polling for work as in training. The hang
    /// this prevents (a half started on top of a stolen piece of the other's work) needs a
    /// worker preempted at one instruction, so it is checked by this order rather than by
    /// waiting for a hang: 20,000 steps of [`normed`] with a third thread spinning beside them
    /// did not hang without the wait.
    #[test]
    fn each_half_starts_once_the_other_has_arrived() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let meeting = Meeting::new();
        let seen: Vec<[bool; 2]> = pool.install(|| {
            crate::awake::workers_awake(|| {
                (0..500)
                    .map(|_| at_once(&meeting, |i| Ok(meeting.has_arrived(1 - i))).unwrap())
                    .collect()
            })
        });
        assert!(seen.iter().all(|s| *s == [true, true]));
    }
}
