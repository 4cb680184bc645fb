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
use crate::cpu::contiguous;
use crate::timing::time;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor, Var, WithDType};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

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
        let (c, n) = crate::conv::rows(z.shape())?;
        if !train {
            let (scale, shift) = self.scale_shift()?;
            return z
                .broadcast_mul(&crate::conv::per_channel(&scale, z.rank())?)?
                .apply_op2_no_bwd(&shift, &BiasRelu);
        }
        let op = BnReluOp::default();
        let stats = op.stats.clone();
        let y = z.contiguous()?.apply_op3(&self.weight, &self.bias, op)?;
        if self.running_mean.is_variable() {
            let stats = lock(&stats)?;
            let unbiased = n as f64 / (n.max(2) - 1) as f64;
            let mean: Vec<f32> = stats.iter().map(|s| s.mean as f32).collect();
            let var: Vec<f32> = stats.iter().map(|s| (s.var * unbiased) as f32).collect();
            let device = z.device();
            for (running, batch) in [(&self.running_mean, mean), (&self.running_var, var)] {
                let batch = Tensor::from_vec(batch, c, device)?;
                let next = ((running * (1.0 - MOMENTUM))? + (batch * MOMENTUM)?)?;
                Var::from_tensor(running)?.set(&next)?;
            }
        }
        Ok(y)
    }
}

impl BatchNormRelu {
    /// Evaluation mode as an affine map per channel: `γ/√(σ² + ε)` and `β − μ·γ/√(σ² + ε)`.
    pub fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let scale = (&self.weight / (&self.running_var + EPS)?.sqrt()?)?;
        let shift = (&self.bias - (&self.running_mean * &scale)?)?;
        Ok((scale, shift))
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
}

fn lock(m: &Mutex<Vec<RowStats>>) -> Result<std::sync::MutexGuard<'_, Vec<RowStats>>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("batch-norm statistics lock poisoned".into()))
}

/// Channels whose sums run side by side. Each channel's additions stay in their order (so the bits
/// are those of one `Iterator::sum` per channel), but `GROUP` independent chains keep the adder
/// busy where a single chain waits for each addition to finish.
const GROUP: usize = 4;

/// For each of the `k ≤ GROUP` rows of `rows` (`k × n`), `Σ f(row index, x)` over the row, in order
/// from −0.0 as `Iterator::sum` does.
#[inline(always)]
fn row_sums<T: WithDType>(rows: &[T], n: usize, f: impl Fn(usize, f64) -> f64) -> [f64; GROUP] {
    let mut acc = [-0.0f64; GROUP];
    if rows.len() == GROUP * n {
        let r: [&[T]; GROUP] = std::array::from_fn(|c| &rows[c * n..(c + 1) * n]);
        #[allow(clippy::needless_range_loop)] // one index into four rows: the point of the loop
        for i in 0..n {
            for c in 0..GROUP {
                acc[c] += f(c, r[c][i].to_f64());
            }
        }
    } else {
        for (c, row) in rows.chunks(n).enumerate() {
            for v in row {
                acc[c] += f(c, v.to_f64());
            }
        }
    }
    acc
}

/// For each row, `(Σ g, Σ g·ẑ)` with `g = dy·[y > 0]` and `ẑ = (z − μ)·inv_std`: terms with
/// `y ≤ 0` are skipped, not added as zeros, and each row's terms are added in order from 0.
#[inline(always)]
fn masked_row_sums<T: WithDType>(
    (z, y, dy): (&[T], &[T], &[T]),
    n: usize,
    stats: &[RowStats],
) -> [(f64, f64); GROUP] {
    let zero = T::from_f64(0.0);
    let mut acc = [(0.0f64, 0.0f64); GROUP];
    let k = z.len() / n;
    let mean: [f64; GROUP] = std::array::from_fn(|c| stats.get(c).map_or(0.0, |s| s.mean));
    let inv: [f64; GROUP] = std::array::from_fn(|c| stats.get(c).map_or(0.0, RowStats::inv_std));
    let term = |c: usize, i: usize, acc: &mut [(f64, f64); GROUP]| {
        let j = c * n + i;
        if y[j] > zero {
            let d = dy[j].to_f64();
            acc[c].0 += d;
            acc[c].1 += d * (z[j].to_f64() - mean[c]) * inv[c];
        }
    };
    if k == GROUP {
        for i in 0..n {
            for c in 0..GROUP {
                term(c, i, &mut acc);
            }
        }
    } else {
        for c in 0..k {
            for i in 0..n {
                term(c, i, &mut acc);
            }
        }
    }
    acc
}

fn forward_rows<T: WithDType>(z: &[T], g: &[T], b: &[T], n: usize) -> (Vec<T>, Vec<RowStats>) {
    time("BatchNorm + ReLU (forward)", || {
        let zero = T::from_f64(0.0);
        let mut out = vec![zero; z.len()];
        let stats: Vec<Vec<RowStats>> = out
            .par_chunks_mut(GROUP * n)
            .zip(z.par_chunks(GROUP * n))
            .zip(g.par_chunks(GROUP).zip(b.par_chunks(GROUP)))
            .map(|((o, zs), (gs, bs))| {
                let sums = row_sums(zs, n, |_, v| v);
                let mean: [f64; GROUP] = std::array::from_fn(|c| sums[c] / n as f64);
                let sq = row_sums(zs, n, |c, v| (v - mean[c]).powi(2));
                let mut stats = Vec::with_capacity(GROUP);
                for (c, ((o, zr), (&gc, &bc))) in o
                    .chunks_mut(n)
                    .zip(zs.chunks(n))
                    .zip(gs.iter().zip(bs))
                    .enumerate()
                {
                    let s = RowStats {
                        mean: mean[c],
                        var: sq[c] / n as f64,
                    };
                    let a = gc.to_f64() * s.inv_std();
                    let sh = bc.to_f64() - s.mean * a;
                    for (o, &v) in o.iter_mut().zip(zr) {
                        *o = T::from_f64((v.to_f64() * a + sh).max(0.0));
                    }
                    stats.push(s);
                }
                stats
            })
            .collect();
        (out, stats.concat())
    })
}

/// `(dz, dγ, dβ)` from the saved statistics, the input, the output and the output's gradient.
fn backward_rows<T: WithDType>(
    stats: &[RowStats],
    z: &[T],
    y: &[T],
    dy: &[T],
    gamma: &[T],
    n: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    time("BatchNorm + ReLU (backward)", || {
        let zero = T::from_f64(0.0);
        let mut dz = vec![zero; z.len()];
        let m = GROUP * n;
        let sums: Vec<Vec<(T, T)>> = dz
            .par_chunks_mut(m)
            .zip(z.par_chunks(m).zip(y.par_chunks(m)))
            .zip(
                dy.par_chunks(m)
                    .zip(gamma.par_chunks(GROUP).zip(stats.par_chunks(GROUP))),
            )
            .map(|((dzs, (zs, ys)), (dys, (gs, ss)))| {
                let sums = masked_row_sums((zs, ys, dys), n, ss);
                let mut out = Vec::with_capacity(GROUP);
                for (c, (((dzr, zr), (yr, dyr)), (&gc, s))) in dzs
                    .chunks_mut(n)
                    .zip(zs.chunks(n))
                    .zip(ys.chunks(n).zip(dys.chunks(n)))
                    .zip(gs.iter().zip(ss))
                    .enumerate()
                {
                    let (sum_g, sum_gx) = sums[c];
                    let inv_std = s.inv_std();
                    let k = gc.to_f64() * inv_std / n as f64;
                    for (((o, &zv), &yv), &dv) in dzr.iter_mut().zip(zr).zip(yr).zip(dyr) {
                        let g = if yv > zero { dv.to_f64() } else { 0.0 };
                        let xhat = (zv.to_f64() - s.mean) * inv_std;
                        *o = T::from_f64(k * (n as f64 * g - sum_g - xhat * sum_gx));
                    }
                    out.push((T::from_f64(sum_gx), T::from_f64(sum_g)));
                }
                out
            })
            .collect();
        let (dgamma, dbeta) = sums.concat().into_iter().unzip();
        (dz, dgamma, dbeta)
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
                let (o, s) = forward_rows(
                    contiguous::<$t>(s1, l1)?,
                    contiguous::<$t>(s2, l2)?,
                    contiguous::<$t>(s3, l3)?,
                    n,
                );
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
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (c, n) = crate::conv::rows(z.shape())?;
        let stats = lock(&self.stats)?.clone();
        let grad = grad.contiguous()?;
        let (zs, zl) = z.storage_and_layout();
        let (ys, yl) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (ws, wl) = gamma.storage_and_layout();
        fn cpu(s: &Storage) -> Result<&CpuStorage> {
            match s {
                Storage::Cpu(s) => Ok(s),
                _ => candle_core::bail!("batch-norm backward runs on the CPU"),
            }
        }
        let (zc, yc, gc, wc) = (cpu(&zs)?, cpu(&ys)?, cpu(&gs)?, cpu(&ws)?);
        macro_rules! run {
            ($t:ty) => {{
                let (dz, dg, db) = backward_rows(
                    &stats,
                    contiguous::<$t>(zc, zl)?,
                    contiguous::<$t>(yc, yl)?,
                    contiguous::<$t>(gc, gl)?,
                    contiguous::<$t>(wc, wl)?,
                    n,
                );
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

    /// One channel at a time, one running sum each: the kernels as they were before the channels'
    /// sums ran side by side, whose bits the grouped kernels must keep.
    fn one_channel_at_a_time(z: &[f32], g: &[f32], b: &[f32], dy: &[f32], n: usize) -> Vec<u64> {
        let mut bits = Vec::new();
        let mut stats = Vec::new();
        let mut y = Vec::new();
        for ((zr, &gc), &bc) in z.chunks(n).zip(g).zip(b) {
            let mean = zr.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
            let var = zr.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n as f64;
            let s = RowStats { mean, var };
            let a = gc.to_f64() * s.inv_std();
            let c = bc.to_f64() - mean * a;
            y.extend(
                zr.iter()
                    .map(|&v| T32::from_f64((v.to_f64() * a + c).max(0.0))),
            );
            stats.push(s);
        }
        for (((zr, yr), dyr), (&gc, s)) in z
            .chunks(n)
            .zip(y.chunks(n))
            .zip(dy.chunks(n))
            .zip(g.iter().zip(&stats))
        {
            let inv_std = s.inv_std();
            let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
            for ((&zv, &yv), &dv) in zr.iter().zip(yr).zip(dyr) {
                if yv > 0.0 {
                    let d = dv.to_f64();
                    sum_g += d;
                    sum_gx += d * (zv.to_f64() - s.mean) * inv_std;
                }
            }
            let k = gc.to_f64() * inv_std / n as f64;
            for ((&zv, &yv), &dv) in zr.iter().zip(yr).zip(dyr) {
                let g = if yv > 0.0 { dv.to_f64() } else { 0.0 };
                let xhat = (zv.to_f64() - s.mean) * inv_std;
                bits.push(((k * (n as f64 * g - sum_g - xhat * sum_gx)) as f32).to_bits() as u64);
            }
            bits.push((sum_gx as f32).to_bits() as u64);
            bits.push((sum_g as f32).to_bits() as u64);
        }
        bits.extend(y.iter().map(|v| v.to_bits() as u64));
        bits.extend(
            stats
                .iter()
                .flat_map(|s| [s.mean.to_bits(), s.var.to_bits()]),
        );
        bits
    }
    type T32 = f32;

    /// The grouped kernels give the bits of one running sum per channel (the f64 statistics too, not
    /// only the f32 outputs, which would hide a changed order), for channel counts that do and do
    /// not fill the last group.
    #[test]
    fn channels_summed_side_by_side_keep_the_bits() {
        for (c, n) in [(8, 1001), (7, 333), (1, 50), (13, 64)] {
            let f =
                |seed, len| -> Vec<f32> { rand(&[len], seed).iter().map(|&v| v as f32).collect() };
            let (z, g, b, dy) = (f(1, c * n), f(2, c), f(3, c), f(4, c * n));
            let want = one_channel_at_a_time(&z, &g, &b, &dy, n);
            let (y, stats) = forward_rows(&z, &g, &b, n);
            let (dz, dg, db) = backward_rows(&stats, &z, &y, &dy, &g, n);
            let mut got = Vec::new();
            for ch in 0..c {
                got.extend(dz[ch * n..(ch + 1) * n].iter().map(|v| v.to_bits() as u64));
                got.push(dg[ch].to_bits() as u64);
                got.push(db[ch].to_bits() as u64);
            }
            got.extend(y.iter().map(|v| v.to_bits() as u64));
            got.extend(
                stats
                    .iter()
                    .flat_map(|s| [s.mean.to_bits(), s.var.to_bits()]),
            );
            assert_eq!(got, want, "{c} channels of {n}");
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
