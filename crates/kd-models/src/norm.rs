//! Batch normalisation fused with the ReLU after it, on `[c, n]` activations (one row per
//! channel, the layout of [`crate::conv`]), as torchvision's `BasicConv2d` does it: conv (no
//! bias) → BatchNorm (ε = 0.001, momentum 0.1) → ReLU.
//!
//! In this layout a channel's statistics are one contiguous row, so training mode is a single
//! op, parallel over channels, forward and backward: `y = relu(γ·(z − μ)/√(σ² + ε) + β)` with the
//! batch's μ and (biased) σ², and in backward, with `g = dy·[y > 0]` and `ẑ = (z − μ)/√(σ² + ε)`,
//! `dβ = Σg`, `dγ = Σg·ẑ`, `dz = γ/(n√(σ² + ε))·(n·g − dβ − ẑ·dγ)`. Evaluation mode uses the
//! running statistics and folds them into a per-channel scale and shift.

use crate::conv::BiasRelu;
use crate::cpu::{contiguous, par_build, wide};
use crate::meeting::{attending, Meeting};
use crate::timing::time;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor, Var, WithDType};
use candle_nn::{Init, VarBuilder};
use lanes::Lanes;
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

mod lanes;

/// torchvision's GoogLeNet `BasicConv2d` uses ε = 0.001.
const EPS: f64 = 1e-3;
/// PyTorch's default: `running = (1 − m)·running + m·batch`.
const MOMENTUM: f64 = 0.1;

/// BatchNorm over the channel rows of `[c, n]`, followed by ReLU. Tensor names follow PyTorch:
/// `weight` (γ), `bias` (β), `running_mean`, `running_var`.
#[derive(Debug, Clone)]
pub struct BatchNormRelu {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

/// Names of the tensors a checkpoint stores that are statistics, not trained parameters.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

impl BatchNormRelu {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.0))?,
        })
    }

    /// `z [c, n]` → `relu(bn(z))`. In training mode it normalises with the batch's statistics
    /// and moves the running statistics towards them (when they are variables, i.e. the model is
    /// being trained, not loaded frozen).
    pub fn forward_t(&self, z: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            let (scale, shift) = self.scale_shift()?;
            let scaled = z.broadcast_mul(&crate::conv::per_channel(&scale, z.rank())?)?;
            return scaled.contiguous()?.apply_op2_no_bwd(&shift, &BiasRelu);
        }
        Self::forward_stacked(&[self], z)
    }

    /// Training mode for BatchNorms whose channels are stacked in `z` (one after another, each
    /// `[c_i, n]`), as one op: each channel normalised by its own statistics, as each alone
    /// would, and each BatchNorm's running statistics moved by its own channels'.
    pub fn forward_stacked(norms: &[&Self], z: &Tensor) -> Result<Tensor> {
        let (_, n) = crate::conv::rows(z.shape())?;
        let cat = |pick: fn(&Self) -> &Tensor| -> Result<Tensor> {
            match norms {
                [one] => Ok(pick(one).clone()),
                _ => Tensor::cat(&norms.iter().map(|b| pick(b)).collect::<Vec<_>>(), 0),
            }
        };
        if crate::portable::active(z) {
            let (y, mean, var) =
                crate::portable::batch_norm_relu(z, &cat(|b| &b.weight)?, &cat(|b| &b.bias)?, EPS)?;
            let mut at = 0;
            for norm in norms {
                let c = norm.running_mean.elem_count();
                norm.move_running_to(&mean.narrow(0, at, c)?, &var.narrow(0, at, c)?, n)?;
                at += c;
            }
            return Ok(y);
        }
        // Trained in two halves at once (`kd_train::halves`): the whole batch's statistics, and
        // one half (the first) moves the running statistics.
        let meeting = attending();
        let first_or_whole = meeting.as_ref().is_none_or(|(_, half)| *half == 0);
        let op = BnReluOp {
            meeting,
            ..BnReluOp::default()
        };
        let (stats, count) = (op.stats.clone(), op.count.clone());
        let y = z
            .contiguous()?
            .apply_op3(&cat(|b| &b.weight)?, &cat(|b| &b.bias)?, op)?;
        if !first_or_whole {
            return Ok(y);
        }
        let n = count.load(Ordering::Acquire).max(n);
        let stats = lock(&stats)?;
        let mut at = 0;
        for norm in norms {
            let c = norm.running_mean.elem_count();
            let Some(own) = stats.get(at..at + c) else {
                candle_core::bail!(
                    "batch-norm: {} statistics for {} channels",
                    stats.len(),
                    at + c
                );
            };
            norm.move_running(own, n, z.device())?;
            at += c;
        }
        Ok(y)
    }

    /// Moves the running statistics (when they are variables, i.e. the model is being trained,
    /// not loaded frozen) towards a batch's, `n` values per channel.
    fn move_running(
        &self,
        stats: &[RowStats],
        n: usize,
        device: &candle_core::Device,
    ) -> Result<()> {
        if !self.running_mean.is_variable() {
            return Ok(());
        }
        let unbiased = n as f64 / (n.max(2) - 1) as f64;
        let mean: Vec<f32> = stats.iter().map(|s| s.mean as f32).collect();
        let var: Vec<f32> = stats.iter().map(|s| (s.var * unbiased) as f32).collect();
        for (running, batch) in [(&self.running_mean, mean), (&self.running_var, var)] {
            let batch = Tensor::from_vec(batch, stats.len(), device)?;
            Self::move_towards(running, &batch)?;
        }
        Ok(())
    }

    /// [`Self::move_running`] from statistics on the device (the GPU's path): the batch's mean
    /// and biased variance `[c]`, `n` values per channel. On a GPU one kernel moves both in
    /// place; elsewhere candle's ops, the same arithmetic.
    fn move_running_to(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        if !self.running_mean.is_variable() {
            return Ok(());
        }
        let unbiased = n as f64 / (n.max(2) - 1) as f64;
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = mean.device() {
            let args = crate::gpu::RunningArgs {
                c: i32::try_from(mean.elem_count())
                    .map_err(|_| candle_core::Error::Msg("batch-norm: too many channels".into()))?,
                keep: (1.0 - MOMENTUM) as f32,
                momentum: MOMENTUM as f32,
                unbiased: unbiased as f32,
            };
            let running = (&self.running_mean, &self.running_var);
            return crate::gpu::bn_running(dev, running, (mean, var), args);
        }
        Self::move_towards(&self.running_mean, mean)?;
        Self::move_towards(&self.running_var, &(var * unbiased)?)
    }

    /// `running ← (1 − momentum)·running + momentum·batch`.
    fn move_towards(running: &Tensor, batch: &Tensor) -> Result<()> {
        let next = ((running * (1.0 - MOMENTUM))? + (batch * MOMENTUM)?)?;
        Var::from_tensor(running)?.set(&next)
    }
}

impl BatchNormRelu {
    /// Evaluation mode as an affine map per channel: `γ/√(σ² + ε)` and `β − μ·γ/√(σ² + ε)`.
    pub fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let scale = (&self.weight / (&self.running_var + EPS)?.sqrt()?)?;
        let shift = (&self.bias - (&self.running_mean * &scale)?)?;
        Ok((scale, shift))
    }

    /// The running mean and variance, one after the other.
    #[cfg(test)]
    fn running_stats_for_test(&self) -> Vec<f32> {
        let v = |t: &Tensor| t.to_vec1::<f32>().unwrap_or_default();
        [v(&self.running_mean), v(&self.running_var)].concat()
    }

    /// Built from plain tensors (a loaded checkpoint), not variables being trained.
    pub fn is_frozen(&self) -> bool {
        !self.running_mean.is_variable()
    }
}

/// One channel's batch statistics (biased variance).
#[derive(Debug, Clone, Copy)]
struct RowStats {
    mean: f64,
    var: f64,
}

impl RowStats {
    fn inv_std(&self) -> f64 {
        1.0 / (self.var + EPS).sqrt()
    }
}

/// The training-mode op; its forward leaves the batch statistics for the running update and
/// for its own backward.
#[derive(Debug, Default)]
struct BnReluOp {
    stats: Arc<Mutex<Vec<RowStats>>>,
    /// How many values per channel the statistics cover (both halves' with a meeting).
    count: Arc<AtomicUsize>,
    /// The other half of the batch's BatchNorms, and which half this is (`kd_train::halves`).
    meeting: Option<(Arc<Meeting>, usize)>,
}

fn lock(m: &Mutex<Vec<RowStats>>) -> Result<std::sync::MutexGuard<'_, Vec<RowStats>>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("batch-norm statistics lock poisoned".into()))
}

/// Partial sums per row: element `i` goes to partial sum `i % LANES` (independent sums, side by
/// side in vector registers: [`lanes`]).
const LANES: usize = 8;
/// [`gradient_sums`] adds in `T`'s arithmetic over blocks of this many elements, and the blocks'
/// sums in f64, in order. A fixed order: the bytes do not depend on the thread count.
const BLOCK: usize = 64;

/// A row's mean and biased variance in one pass, in f64: `Σ (x − k)` and `Σ (x − k)²` over
/// [`LANES`] partial sums, with `k` the row's first value (a shift that keeps
/// `E[(x−k)²] − E[x−k]²` from cancelling when the mean is large against the spread).
#[inline(always)]
fn shifted_moments<T: Lanes>(row: &[T]) -> RowStats {
    let k = row.first().map_or(0.0, |v| v.to_f64());
    let (chunks, rest) = row.as_chunks::<LANES>();
    let (s, q) = T::moment_lanes(chunks, k);
    let (mut s1, mut s2) = (s.iter().sum::<f64>(), q.iter().sum::<f64>());
    for v in rest {
        let d = v.to_f64() - k;
        s1 += d;
        s2 += d * d;
    }
    let n = row.len().max(1) as f64;
    let m = s1 / n;
    RowStats {
        mean: k + m,
        var: (s2 / n - m * m).max(0.0),
    }
}

/// `(Σ g, Σ g·(z − μ))` over a row, `g = dy·[x > 0]` with `x` the forward's value before the
/// ReLU ([`Affine`]).
#[inline(always)]
fn gradient_sums<T: Lanes>(z: &[T], dy: &[T], f: Affine<T>) -> (f64, f64) {
    let zero = T::from_f64(0.0);
    let ((zb, zr), (db, dr)) = (z.as_chunks::<LANES>(), dy.as_chunks::<LANES>());
    let mut acc = T::gradient_lanes((zb, db), f);
    for (l, (&z, &d)) in zr.iter().zip(dr).enumerate() {
        let (x, centred) = f.apply(z);
        let g = std::hint::select_unpredictable(x > zero, d, zero);
        acc.s[l] += g;
        acc.q[l] += g * centred;
    }
    acc.flush();
    (acc.sg, acc.sgz)
}

/// `y = relu(γ·ẑ + β)` and each channel's statistics; one task per channel (its row is
/// contiguous), statistics in one pass, the output in `T`'s arithmetic.
fn forward_rows<T: Lanes>(z: &[T], g: &[T], b: &[T], n: usize) -> Result<(Vec<T>, Vec<RowStats>)> {
    time("BatchNorm + ReLU (forward)", || {
        par_build(z.len(), n, |c, out| {
            let zr = &z[c * n..(c + 1) * n];
            let s = shifted_moments(zr);
            (
                wide!(|| out.fill(normalized(zr, Affine::new(s, g[c], b[c])))),
                s,
            )
        })
    })
}

/// A channel's map before the ReLU, `x = (z − μ)·a + β` with `a = γ/√(σ² + ε)`, in `T`'s
/// arithmetic. The forward's output is `relu(x)`; the backward recomputes `x > 0` from `z` with
/// the same operations (so bit for bit the forward's test) instead of reading the output back:
/// one stream of memory less in each of its two passes.
#[derive(Debug, Clone, Copy)]
struct Affine<T> {
    mean: T,
    a: T,
    b: T,
}

impl<T: WithDType> Affine<T> {
    fn new(s: RowStats, gamma: T, beta: T) -> Self {
        Self {
            mean: T::from_f64(s.mean),
            a: T::from_f64(gamma.to_f64() * s.inv_std()),
            b: beta,
        }
    }

    /// `(x, z − μ)`.
    #[inline(always)]
    fn apply(&self, z: T) -> (T, T) {
        let centred = z - self.mean;
        (centred * self.a + self.b, centred)
    }
}

/// `relu(γ·(z − μ)/√(σ² + ε) + β)` along a row, in `T`'s arithmetic.
#[inline(always)]
fn normalized<T: WithDType>(zr: &[T], f: Affine<T>) -> impl Iterator<Item = T> + '_ {
    let zero = T::from_f64(0.0);
    zr.iter().map(move |&v| {
        let (x, _) = f.apply(v);
        if x > zero {
            x
        } else {
            zero
        }
    })
}

/// [`forward_rows`] for one half of a batch: each channel's count, mean and `Σ(x − mean)²`
/// exchanged with the other half's, combined in the halves' order (Chan et al.'s pairwise
/// update), and the rows normalised by the whole batch's statistics. Also the whole count.
fn met_forward_rows<T: Lanes>(
    (z, g, b): (&[T], &[T], &[T]),
    n: usize,
    (meeting, half): (&Meeting, usize),
) -> Result<(Vec<T>, Vec<RowStats>, usize)> {
    time("BatchNorm + ReLU (forward)", || {
        let own: Vec<RowStats> = (0..g.len())
            .into_par_iter()
            .map(|c| shifted_moments(&z[c * n..(c + 1) * n]))
            .collect();
        let mut part = vec![n as f64];
        part.extend(own.iter().flat_map(|s| [s.mean, s.var * n as f64]));
        let [p0, p1] = meeting.exchange(half, part)?;
        check_part(&p0, &p1, g.len())?;
        let (n0, n1) = (p0[0], p1[0]);
        let total = n0 + n1;
        let stats: Vec<RowStats> = (0..g.len())
            .map(|c| {
                let (m0, q0, m1, q1) = (p0[1 + 2 * c], p0[2 + 2 * c], p1[1 + 2 * c], p1[2 + 2 * c]);
                let d = m1 - m0;
                RowStats {
                    mean: m0 + d * n1 / total,
                    var: ((q0 + q1 + d * d * n0 * n1 / total) / total).max(0.0),
                }
            })
            .collect();
        let (y, _) = par_build(z.len(), n, |c, out| {
            let zr = &z[c * n..(c + 1) * n];
            (
                wide!(|| out.fill(normalized(zr, Affine::new(stats[c], g[c], b[c])))),
                (),
            )
        })?;
        Ok((y, stats, total as usize))
    })
}

/// Both halves' exchanged parts hold a count and two sums for each of `c` channels.
fn check_part(p0: &[f64], p1: &[f64], c: usize) -> Result<()> {
    if p0.len() != 1 + 2 * c || p1.len() != 1 + 2 * c {
        candle_core::bail!(
            "batch-norm: the halves brought {} and {} sums for {c} channels",
            p0.len(),
            p1.len()
        );
    }
    Ok(())
}

/// What the backward reads: the input `z`, the output's gradient `dy`, γ and β (the ReLU's
/// mask is recomputed from `z`, [`Affine`]).
type BackwardRows<'a, T> = (&'a [T], &'a [T], &'a [T], &'a [T]);

/// `(dz, dγ, dβ)` from the saved statistics, the input and the output's gradient: per channel
/// the sums, then `dz = γ/(n·σ)·(n·g − Σg − ẑ·Σgẑ)` as `g·A + (z − μ)·B + C` in `T`'s
/// arithmetic.
fn backward_rows<T: Lanes>(
    stats: &[RowStats],
    (z, dy, gamma, beta): BackwardRows<'_, T>,
    n: usize,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    time("BatchNorm + ReLU (backward)", || {
        let (dz, sums) = par_build(z.len(), n, |c, out| {
            let row = c * n..(c + 1) * n;
            let (zr, dyr) = (&z[row.clone()], &dy[row]);
            let (s, f) = (stats[c], Affine::new(stats[c], gamma[c], beta[c]));
            let sums = gradient_sums(zr, dyr, f);
            let dzr = dz_row((zr, dyr), (s, f), gamma[c], n as f64, sums);
            let sum_gx = sums.1 * s.inv_std();
            (
                wide!(|| out.fill(dzr)),
                (T::from_f64(sum_gx), T::from_f64(sums.0)),
            )
        })?;
        let (dgamma, dbeta) = sums.into_iter().unzip();
        Ok((dz, dgamma, dbeta))
    })
}

/// A row's `dz = γ/(n·σ)·(n·g − Σg − ẑ·Σgẑ)` as `g·A + (z − μ)·B + C` in `T`'s arithmetic,
/// from the statistics and the forward's map, γ, the count `n` and `(Σg, Σg·(z − μ))` over the
/// batch.
#[inline(always)]
fn dz_row<'a, T: WithDType>(
    (zr, dyr): (&'a [T], &'a [T]),
    (s, f): (RowStats, Affine<T>),
    gamma: T,
    n: f64,
    (sum_g, sum_gz): (f64, f64),
) -> impl Iterator<Item = T> + 'a {
    let zero = T::from_f64(0.0);
    let inv_std = s.inv_std();
    let sum_gx = sum_gz * inv_std;
    let k = gamma.to_f64() * inv_std / n;
    let a = T::from_f64(k * n);
    let b = T::from_f64(-k * inv_std * sum_gx);
    let cc = T::from_f64(-k * sum_g);
    zr.iter().zip(dyr).map(move |(&zv, &dv)| {
        let (x, centred) = f.apply(zv);
        let g = std::hint::select_unpredictable(x > zero, dv, zero);
        g * a + centred * b + cc
    })
}

/// [`backward_rows`] for one half of a batch: each channel's `Σg` and `Σg·(z − μ)` exchanged
/// with the other half's and added in the halves' order, `dz` from the whole batch's sums and
/// count; `dγ` and `dβ` are this half's own sums (the halves' gradients are added afterwards).
fn met_backward_rows<T: Lanes>(
    stats: &[RowStats],
    (z, dy, gamma, beta): BackwardRows<'_, T>,
    n: usize,
    (meeting, half): (&Meeting, usize),
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    time("BatchNorm + ReLU (backward)", || {
        let c = gamma.len();
        let maps: Vec<Affine<T>> = (0..c)
            .map(|ch| Affine::new(stats[ch], gamma[ch], beta[ch]))
            .collect();
        let own: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let row = ch * n..(ch + 1) * n;
                gradient_sums(&z[row.clone()], &dy[row], maps[ch])
            })
            .collect();
        let mut part = vec![n as f64];
        part.extend(own.iter().flat_map(|&(g, gz)| [g, gz]));
        let [p0, p1] = meeting.exchange(half, part)?;
        check_part(&p0, &p1, c)?;
        let total = p0[0] + p1[0];
        let (dz, _) = par_build(z.len(), n, |ch, out| {
            let row = ch * n..(ch + 1) * n;
            let sums = (
                p0[1 + 2 * ch] + p1[1 + 2 * ch],
                p0[2 + 2 * ch] + p1[2 + 2 * ch],
            );
            let rows = (&z[row.clone()], &dy[row]);
            let dzr = dz_row(rows, (stats[ch], maps[ch]), gamma[ch], total, sums);
            (wide!(|| out.fill(dzr)), ())
        })?;
        let dgamma = (0..c)
            .map(|ch| T::from_f64(own[ch].1 * stats[ch].inv_std()))
            .collect();
        let dbeta = own.iter().map(|&(g, _)| T::from_f64(g)).collect();
        Ok((dz, dgamma, dbeta))
    })
}

impl CustomOp3 for BnReluOp {
    fn name(&self) -> &'static str {
        "kd-batch-norm-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, n) = crate::conv::rows(l1.shape())?;
        if l2.shape().dims() != [c] || l3.shape().dims() != [c] {
            candle_core::bail!(
                "batch-norm: weight {:?} and bias {:?} for {c} channels",
                l2.shape(),
                l3.shape()
            );
        }
        if n == 0 {
            candle_core::bail!("batch-norm: an empty batch has no statistics");
        }
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let (z, g, b) = (
                    contiguous::<$t>(s1, l1)?,
                    contiguous::<$t>(s2, l2)?,
                    contiguous::<$t>(s3, l3)?,
                );
                let (o, s, count) = match &self.meeting {
                    None => {
                        let (o, s) = forward_rows(z, g, b, n)?;
                        (o, s, n)
                    }
                    Some((m, half)) => met_forward_rows((z, g, b), n, (m, *half))?,
                };
                self.count.store(count, Ordering::Release);
                (CpuStorage::$variant(o), s)
            }};
        }
        let (out, stats) = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32, F32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64, F64),
            _ => candle_core::bail!("batch-norm supports f32 and f64"),
        };
        *lock(&self.stats)? = stats;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (c, n) = crate::conv::rows(z.shape())?;
        let stats = lock(&self.stats)?.clone();
        let grad = grad.contiguous()?;
        let (zs, zl) = z.storage_and_layout();
        let (bs, bl) = beta.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (ws, wl) = gamma.storage_and_layout();
        fn cpu(s: &Storage) -> Result<&CpuStorage> {
            match s {
                Storage::Cpu(s) => Ok(s),
                _ => candle_core::bail!("batch-norm backward runs on the CPU"),
            }
        }
        let (zc, gc, wc, bc) = (cpu(&zs)?, cpu(&gs)?, cpu(&ws)?, cpu(&bs)?);
        macro_rules! run {
            ($t:ty) => {{
                let rows = (
                    contiguous::<$t>(zc, zl)?,
                    contiguous::<$t>(gc, gl)?,
                    contiguous::<$t>(wc, wl)?,
                    contiguous::<$t>(bc, bl)?,
                );
                let (dz, dg, db) = match &self.meeting {
                    None => backward_rows(&stats, rows, n)?,
                    Some((m, half)) => met_backward_rows(&stats, rows, n, (m, *half))?,
                };
                let d = z.device();
                (
                    Tensor::from_vec(dz, z.shape(), d)?,
                    Tensor::from_vec(dg, c, d)?,
                    Tensor::from_vec(db, c, d)?,
                )
            }};
        }
        let (dz, dg, db) = match zc {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            _ => candle_core::bail!("batch-norm supports f32 and f64"),
        };
        Ok((Some(dz), Some(dg), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::{max_rel_diff, rand};
    use crate::SeededVarMap;
    use candle_core::{DType, Device, D};

    /// The one-pass statistics against two passes in f64, for a row whose mean is large against
    /// its spread (where `E[x²] − E[x]²` unshifted would lose most of its digits), and the
    /// output and gradients against candle's ops in f32 as well as f64.
    #[test]
    fn one_pass_statistics_hold_their_digits() {
        for (n, offset) in [(1001usize, 1000.0f64), (7, -3.0), (64, 0.0), (1, 5.0)] {
            let row: Vec<f32> = rand(&[n], n as u64)
                .iter()
                .map(|v| (v * 0.01 + offset) as f32)
                .collect();
            let s = shifted_moments(&row);
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            assert!(
                (s.mean - mean).abs() <= 1e-12 * mean.abs().max(1.0),
                "{n}: mean"
            );
            assert!(
                (s.var - var).abs() <= 1e-9 * var.max(1e-12),
                "{n}: {} vs {var}",
                s.var
            );
        }
    }

    /// relu(batch_norm(z)) from candle's own ops, for reference.
    fn reference(z: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
        let mean = z.mean_keepdim(D::Minus1).unwrap();
        let centred = z.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xhat = centred
            .broadcast_div(&(var + EPS).unwrap().sqrt().unwrap())
            .unwrap();
        let c = gamma.dim(0).unwrap();
        xhat.broadcast_mul(&gamma.reshape((c, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((c, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap()
    }

    #[test]
    fn training_mode_matches_candle_ops_forward_and_backward() {
        let dev = Device::Cpu;
        for (c, n, seed) in [(3, 17, 1), (5, 200, 2), (1, 2, 3)] {
            let var = |shape: &[usize], seed: u64, offset: f64| {
                let v: Vec<f64> = rand(shape, seed).iter().map(|x| x * 2.0 + offset).collect();
                Var::from_vec(v, shape, &dev).unwrap()
            };
            let z = var(&[c, n], seed, 0.7);
            let gamma = var(&[c], seed + 10, 1.0);
            let beta = var(&[c], seed + 20, 0.2);
            let upstream = Tensor::from_vec(rand(&[c, n], seed + 30), (c, n), &dev).unwrap();
            let run = |y: Tensor| {
                let grads = (&y * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                (y, g(&z), g(&gamma), g(&beta))
            };
            let op = BnReluOp::default();
            let ours = run(z.apply_op3(&gamma, &beta, op).unwrap());
            let theirs = run(reference(&z, &gamma, &beta));
            for (what, a, b) in [
                ("y", &ours.0, &theirs.0),
                ("dz", &ours.1, &theirs.1),
                ("dgamma", &ours.2, &theirs.2),
                ("dbeta", &ours.3, &theirs.3),
            ] {
                let d = max_rel_diff(a, b);
                assert!(d < 1e-9, "c={c} n={n} {what}: relative difference {d}");
            }
        }
    }

    /// In f32 the output and gradients (computed in f32 from f64 sums) stay within f32 precision
    /// of the f64 reference.
    #[test]
    fn training_mode_in_f32_matches_within_f32_precision() {
        let dev = Device::Cpu;
        let (c, n) = (6, 3001);
        let f64s = |shape: &[usize], seed: u64, offset: f64| -> Vec<f64> {
            rand(shape, seed).iter().map(|x| x * 2.0 + offset).collect()
        };
        let (z, g, b, up) = (
            f64s(&[c, n], 1, 0.7),
            f64s(&[c], 2, 1.0),
            f64s(&[c], 3, 0.2),
            f64s(&[c, n], 4, 0.0),
        );
        let grads = |dtype: DType| {
            let v = |x: &[f64], shape: &[usize]| {
                let t = Tensor::from_vec(x.to_vec(), shape, &dev).unwrap();
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
            };
            let (zv, gv, bv) = (v(&z, &[c, n]), v(&g, &[c]), v(&b, &[c]));
            let y = zv.apply_op3(&gv, &bv, BnReluOp::default()).unwrap();
            let upstream = Tensor::from_vec(up.clone(), (c, n), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gr = (&y * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let d = |var: &Var| f(grads_get(&gr, var));
            [f(&y), d(&zv), d(&gv), d(&bv)]
        };
        fn grads_get<'a>(g: &'a candle_core::backprop::GradStore, v: &Var) -> &'a Tensor {
            g.get(v.as_tensor()).unwrap()
        }
        let (ours, exact) = (grads(DType::F32), grads(DType::F64));
        for (what, a, b) in ["y", "dz", "dgamma", "dbeta"]
            .iter()
            .zip(&ours)
            .zip(&exact)
            .map(|((w, a), b)| (w, a, b))
        {
            let d = max_rel_diff(a, b);
            assert!(d < 1e-5, "{what}: relative difference {d}");
        }
    }

    #[test]
    fn running_statistics_follow_the_batches_and_drive_eval_mode() {
        let dev = Device::Cpu;
        let vars = SeededVarMap::new(0);
        let bn = BatchNormRelu::new(2, vars.var_builder(&dev).pp("bn")).unwrap();
        let rows = [vec![1.0f32, 2.0, 3.0, 6.0], vec![-4.0, 0.0, 4.0, 0.0]];
        let z = Tensor::from_vec(rows.concat(), (2, 4), &dev).unwrap();
        let y = bn.forward_t(&z, true).unwrap();
        // Row 0: mean 3, biased var 3.5; the smallest value normalises below zero → ReLU.
        let y0 = y.to_vec2::<f32>().unwrap();
        assert_eq!(y0[0][0], 0.0);
        assert!(
            (y0[0][3] - 3.0 / (3.5f32 + 1e-3).sqrt()).abs() < 1e-5,
            "{y0:?}"
        );
        // Momentum 0.1 from (0, 1), unbiased variance (n − 1 = 3): 14/3 and 32/3.
        let rm = bn.running_mean.to_vec1::<f32>().unwrap();
        let rv = bn.running_var.to_vec1::<f32>().unwrap();
        assert!((rm[0] - 0.3).abs() < 1e-6 && rm[1].abs() < 1e-6, "{rm:?}");
        assert!((rv[0] - (0.9 + 0.1 * 14.0 / 3.0)).abs() < 1e-5, "{rv:?}");
        assert!((rv[1] - (0.9 + 0.1 * 32.0 / 3.0)).abs() < 1e-5, "{rv:?}");
        // The checkpoint holds the updated statistics.
        let saved = vars.varmap.data().lock().unwrap()["bn.running_mean"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(saved, rm);
        // Eval mode: relu((z − running_mean)/√(running_var + ε)), no update.
        let e = bn.forward_t(&z, false).unwrap().to_vec2::<f32>().unwrap();
        for (r, row) in rows.iter().enumerate() {
            for (i, &v) in row.iter().enumerate() {
                let want = ((v - rm[r]) / (rv[r] + 1e-3).sqrt()).max(0.0);
                assert!((e[r][i] - want).abs() < 1e-5, "eval [{r}][{i}]");
            }
        }
        assert_eq!(bn.running_mean.to_vec1::<f32>().unwrap(), rm);
        // A frozen layer (plain tensors) normalises with batch statistics but updates nothing.
        let frozen: std::collections::HashMap<String, Tensor> = vars
            .varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        let vb = VarBuilder::from_tensors(frozen, DType::F32, &dev);
        let bn2 = BatchNormRelu::new(2, vb.pp("bn")).unwrap();
        let y2 = bn2.forward_t(&z, true).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y2, y0);
        assert_eq!(bn2.running_mean.to_vec1::<f32>().unwrap(), rm);
    }
}

#[cfg(test)]
mod portable_tests {
    use crate::conv::portable_tests::with_grads;
    use candle_core::{DType, Device};

    /// BatchNorm + ReLU in training mode as the GPU runs it (candle's reductions and autograd)
    /// against the fused CPU op: output and input gradient within f32 rounding (the fused op
    /// sums in f64), for channel lengths from a 1×1 plane of 6 images to 7×7 planes.
    #[test]
    fn the_portable_batch_norm_matches_the_fused_op() {
        for (c, n, phase) in [
            (32, 294, 0.1f32),
            (8, 294, 0.7),
            (32, 6, 0.2),
            (16, 96, 0.9),
        ] {
            let run = |portable: bool| {
                let vm = candle_nn::VarMap::new();
                let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
                let bn = crate::norm::BatchNormRelu::new(c, vb).unwrap();
                let z: Vec<f32> = (0..c * n)
                    .map(|i| ((i as f32) * 0.913 + phase).sin() * 2.0 + 0.3)
                    .collect();
                let f = |t: &[candle_core::Tensor]| bn.forward_t(&t[0], true).unwrap();
                let out = if portable {
                    crate::portable::forced(|| with_grads(f, &[(z.clone(), vec![c, n])]))
                } else {
                    with_grads(f, &[(z.clone(), vec![c, n])])
                };
                let running = bn.running_stats_for_test();
                (out, running)
            };
            let ((fused, rf), (port, rp)) = (run(false), run(true));
            let d = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
            };
            assert!(d(&fused[0], &port[0]) < 2e-6, "c{c} n{n}: output");
            assert!(d(&fused[1], &port[1]) < 2e-6, "c{c} n{n}: dz");
            assert!(d(&rf, &rp) < 2e-6, "c{c} n{n}: running statistics");
        }
    }
}
