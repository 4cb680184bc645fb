//! Trainable 2-D max and average pooling with padding and ceil mode, as in PyTorch.
//!
//! candle 0.11 back-propagates a pool only when kernel == stride and has no ceil mode; GoogLeNet
//! needs 3×3/s2 (ceil) and 3×3/s1 (pad 1) max-pools and 3×3/s2 average pools. These are custom
//! ops: the forward pools each (sample, channel) plane in parallel, and the backward is a second
//! op that routes each output gradient to its window's arg-max (first maximum, as PyTorch) or
//! spreads it evenly over the window.

use crate::cpu::{contiguous, float_storage, tap_range};
use crate::timing::time;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::OnceLock;
use whole::{
    avg_3x3_s2, avg_3x3_s2_backward, max_2x2, max_2x2_backward, max_3x3_s2_backward,
    max_3x3_s2_with_argmax, same_3x3_max, same_3x3_max_backward, same_3x3_max_with_argmax,
};

mod whole;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    /// Average over the window, padding included in the divisor (PyTorch's default).
    Avg,
}

/// A 2-D pooling layer over `[b, c, h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    pub kind: PoolKind,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub ceil_mode: bool,
}

impl Pool2d {
    pub fn max(kernel: usize, stride: usize) -> Self {
        Self {
            kind: PoolKind::Max,
            kernel,
            stride,
            padding: 0,
            ceil_mode: false,
        }
    }
    pub fn avg(kernel: usize, stride: usize) -> Self {
        Self {
            kind: PoolKind::Avg,
            ..Self::max(kernel, stride)
        }
    }
    pub fn padding(self, padding: usize) -> Self {
        Self { padding, ..self }
    }
    pub fn ceil(self) -> Self {
        Self {
            ceil_mode: true,
            ..self
        }
    }

    /// Output length along one axis (PyTorch's rule: in ceil mode the last window must start
    /// inside the input or its left padding).
    pub fn out_len(&self, len: usize) -> Result<usize> {
        let padded = len + 2 * self.padding;
        if padded < self.kernel || self.padding * 2 > self.kernel {
            candle_core::bail!(
                "pool {}x{}/s{} pad {} does not fit an axis of {len}",
                self.kernel,
                self.kernel,
                self.stride,
                self.padding
            );
        }
        let span = padded - self.kernel;
        let mut out = if self.ceil_mode {
            span.div_ceil(self.stride)
        } else {
            span / self.stride
        } + 1;
        if self.ceil_mode && (out - 1) * self.stride >= len + self.padding {
            out -= 1;
        }
        Ok(out)
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        if xs.track_op() && !crate::portable::active(&xs) {
            let (_, _, h, w) = xs.dims4()?;
            if let Some(op) = MaxTraining::of(*self, (h, w)) {
                return xs.apply_op1(op);
            }
        }
        xs.apply_op1(*self)
    }

    /// Window bounds along one axis, clipped to the input, and its length with padding counted.
    fn window(&self, o: usize, len: usize) -> (usize, usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let end = (start + self.kernel as isize).min((len + self.padding) as isize);
        let with_pad = (end - start) as usize;
        (
            start.max(0) as usize,
            (end.min(len as isize)) as usize,
            with_pad,
        )
    }

    /// The window of every output along one axis.
    fn windows(&self, len: usize, out: usize) -> Vec<(usize, usize, usize)> {
        (0..out).map(|o| self.window(o, len)).collect()
    }

    /// Pools one plane with `combine` (max or sum; an average divides afterwards). Max and sum
    /// are separable: pool each row along x into `tmp` (`[h, ow]`), then combine rows along y, a
    /// whole output row at a time. Along x, each tap of the kernel is one pass over the outputs it
    /// reaches (a contiguous slice when the stride is 1), so the inner loops are plain element-wise
    /// maxima or sums the compiler vectorises.
    fn fwd_plane<T: WithDType>(
        &self,
        x: &[T],
        out: &mut [T],
        g: Geometry,
        win: &Windows,
        tmp: &mut Vec<T>,
        combine: impl Fn(T, T) -> T + Copy,
    ) {
        let (w, ow) = (g.w, g.ow);
        tmp.clear();
        tmp.resize(g.h * ow, T::from_f64(0.0));
        for (row, t) in x.chunks(w).zip(tmp.chunks_mut(ow)) {
            self.pool_row(row, t, win, combine);
        }
        for (o, &(y0, y1, _)) in out.chunks_mut(ow).zip(&win.y) {
            o.copy_from_slice(&tmp[y0 * ow..(y0 + 1) * ow]);
            for y in y0 + 1..y1 {
                for (m, &v) in o.iter_mut().zip(&tmp[y * ow..(y + 1) * ow]) {
                    *m = combine(*m, v);
                }
            }
        }
    }

    /// One row along x: every output starts from its window's first input, then each tap `t`
    /// combines in the inputs `o·s + t − p` of the outputs whose window holds it.
    fn pool_row<T: WithDType>(
        &self,
        row: &[T],
        out: &mut [T],
        win: &Windows,
        combine: impl Fn(T, T) -> T + Copy,
    ) {
        let (s, p) = (self.stride, self.padding);
        for (o, &(x0, _, _)) in out.iter_mut().zip(&win.x) {
            *o = row[x0];
        }
        // Tap 0 is the first input of every window it reaches; tap t > 0 is the first input only
        // of a left-edge window whose padding ends right there (`o·s + t = p`).
        for t in 1..self.kernel {
            let mut valid = tap_range(t, s, p, row.len(), out.len());
            if t <= p && (p - t) % s == 0 && valid.start == (p - t) / s {
                valid.start += 1;
            }
            if valid.is_empty() {
                continue;
            }
            let first = valid.start * s + t - p;
            if s == 1 {
                let src = &row[first..first + valid.len()];
                for (o, &v) in out[valid].iter_mut().zip(src) {
                    *o = combine(*o, v);
                }
            } else {
                for (o, &v) in out[valid].iter_mut().zip(row[first..].iter().step_by(s)) {
                    *o = combine(*o, v);
                }
            }
        }
    }

    /// The input gradient of one plane. A max-pool output's gradient goes to the first input
    /// (row-major) in its window equal to the output, i.e. PyTorch's arg-max; an average's is
    /// spread over its window.
    fn bwd_plane<T: WithDType>(
        &self,
        x: &[T],
        res: &[T],
        grad: &[T],
        gx: &mut [T],
        g: Geometry,
        win: &Windows,
    ) {
        let (w, ow) = (g.w, g.ow);
        for (oy, &(y0, y1, ph)) in win.y.iter().enumerate() {
            for (ox, &(x0, x1, pw)) in win.x.iter().enumerate() {
                let go = grad[oy * ow + ox];
                match self.kind {
                    PoolKind::Max => {
                        let m = res[oy * ow + ox];
                        let nan = m.to_f64().is_nan();
                        let hit = (y0..y1).find_map(|y| {
                            let row = &x[y * w + x0..y * w + x1];
                            let i = if nan {
                                row.iter().position(|v| v.to_f64().is_nan())
                            } else {
                                row.iter().position(|&v| v == m)
                            };
                            i.map(|i| y * w + x0 + i)
                        });
                        if let Some(i) = hit {
                            gx[i] += go;
                        }
                    }
                    PoolKind::Avg => {
                        let share = go / T::from_f64((ph * pw) as f64);
                        for y in y0..y1 {
                            for v in &mut gx[y * w + x0..y * w + x1] {
                                *v += share;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Output shape and plane geometry for an input layout `[b, c, h, w]`.
    fn geometry(&self, layout: &Layout) -> Result<(Shape, Geometry)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let g = Geometry {
            h,
            w,
            oh: self.out_len(h)?,
            ow: self.out_len(w)?,
        };
        Ok((Shape::from((b, c, g.oh, g.ow)), g))
    }

    /// Pools every `h×w` plane of `x`, in parallel.
    fn forward_planes<T: WithDType>(&self, x: &[T], g: Geometry) -> Vec<T> {
        time("pools (forward)", || {
            if self.is_same_3x3_max() && g.h >= 2 && g.w >= 2 {
                return same_3x3_max(x, g.h, g.w);
            }
            if self.is_even_2x2_max(g) {
                return max_2x2(x, g.w);
            }
            if self.is_3x3_s2_max() {
                return max_3x3_s2_with_argmax(x, (g.h, g.w), (g.oh, g.ow)).0;
            }
            if self.is_3x3_s2_avg_floor() {
                return avg_3x3_s2(x, (g.h, g.w), (g.oh, g.ow));
            }
            self.forward_planes_general(x, g)
        })
    }

    /// [`Self::forward_planes`] for any pool, plane by plane.
    fn forward_planes_general<T: WithDType>(&self, x: &[T], g: Geometry) -> Vec<T> {
        let win = Windows {
            x: self.windows(g.w, g.ow),
            y: self.windows(g.h, g.oh),
        };
        let mut out = vec![T::from_f64(0.0); x.len() / (g.h * g.w) * g.oh * g.ow];
        out.par_chunks_mut(g.oh * g.ow)
            .zip(x.par_chunks(g.h * g.w))
            .for_each_init(Vec::new, |tmp, (o, xp)| match self.kind {
                PoolKind::Max => self.fwd_plane(xp, o, g, &win, tmp, max_nan),
                PoolKind::Avg => {
                    self.fwd_plane(xp, o, g, &win, tmp, |m, v| m + v);
                    for (o, &(_, _, ph)) in o.chunks_mut(g.ow).zip(&win.y) {
                        for (v, &(_, _, pw)) in o.iter_mut().zip(&win.x) {
                            *v /= T::from_f64((ph * pw) as f64);
                        }
                    }
                }
            });
        out
    }

    /// The 3×3, stride 1, padding 1 max-pool of every Inception block's pool branch.
    fn is_same_3x3_max(&self) -> bool {
        self.kind == PoolKind::Max && self.kernel == 3 && self.stride == 1 && self.padding == 1
    }

    /// The 3×3 / stride 2 max-pool without padding between the teacher's stages (floor or ceil
    /// mode).
    fn is_3x3_s2_max(&self) -> bool {
        self.kind == PoolKind::Max && self.kernel == 3 && self.stride == 2 && self.padding == 0
    }

    /// The auxiliary heads' 3×3 / stride 2 average pool without padding, floor mode (every window
    /// whole).
    fn is_3x3_s2_avg_floor(&self) -> bool {
        self.kind == PoolKind::Avg
            && (self.kernel, self.stride, self.padding) == (3, 2, 0)
            && !self.ceil_mode
    }

    /// The students' 2×2 / stride 2 max-pool, on planes of even height and width (every input in
    /// exactly one window).
    fn is_even_2x2_max(&self, g: Geometry) -> bool {
        self.kind == PoolKind::Max
            && (self.kernel, self.stride, self.padding) == (2, 2, 0)
            && g.h.is_multiple_of(2)
            && g.w.is_multiple_of(2)
    }

    /// The input gradient of every plane, in parallel.
    fn backward_planes<T: WithDType>(&self, x: &[T], res: &[T], grad: &[T], g: Geometry) -> Vec<T> {
        time("pools (backward)", || {
            if self.is_even_2x2_max(g) {
                return max_2x2_backward(x, res, grad, g.w);
            }
            if self.is_3x3_s2_avg_floor() {
                return avg_3x3_s2_backward(grad, (g.h, g.w), (g.oh, g.ow));
            }
            self.backward_planes_general(x, res, grad, g)
        })
    }

    /// [`Self::backward_planes`] for any pool, plane by plane.
    fn backward_planes_general<T: WithDType>(
        &self,
        x: &[T],
        res: &[T],
        grad: &[T],
        g: Geometry,
    ) -> Vec<T> {
        let win = Windows {
            x: self.windows(g.w, g.ow),
            y: self.windows(g.h, g.oh),
        };
        let (plane, out_plane) = (g.h * g.w, g.oh * g.ow);
        let mut gx = vec![T::from_f64(0.0); x.len()];
        gx.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .zip(res.par_chunks(out_plane).zip(grad.par_chunks(out_plane)))
            .for_each(|((gxp, xp), (rp, gp))| self.bwd_plane(xp, rp, gp, gxp, g, &win));
        gx
    }
}

/// PyTorch's max: take `v` if greater or NaN; a NaN, once taken, stays.
#[inline(always)]
fn max_nan<T: WithDType>(m: T, v: T) -> T {
    #[allow(clippy::eq_op)]
    let nan = v != v;
    if v > m || nan {
        v
    } else {
        m
    }
}

/// Window bounds `(start, end, length with padding)` of every output column and row.
struct Windows {
    x: Vec<(usize, usize, usize)>,
    y: Vec<(usize, usize, usize)>,
}

/// Input and output plane sizes.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

#[cfg(feature = "cuda")]
impl Geometry {
    /// The kernels' view: every plane of an input `[b, c, h, w]`.
    fn planes(&self, input: &Layout) -> Result<crate::gpu::Planes> {
        let (b, c, _, _) = input.shape().dims4()?;
        Ok(crate::gpu::Planes {
            planes: b * c,
            h: self.h,
            w: self.w,
            oh: self.oh,
            ow: self.ow,
        })
    }
}

impl CustomOp1 for Pool2d {
    fn name(&self) -> &'static str {
        "kd-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (shape, g) = self.geometry(layout)?;
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward_planes(contiguous::<f32>(storage, layout)?, g))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward_planes(contiguous::<f64>(storage, layout)?, g))
            }
            _ => candle_core::bail!("pool2d supports f32 and f64, not {:?}", storage.dtype()),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (shape, g) = self.geometry(layout)?;
        let out = crate::gpu::pool_forward(self, g.planes(layout)?, storage, layout)?;
        Ok((out, shape))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.apply_op3_no_bwd(res, &grad_res.contiguous()?, &PoolBackward(*self))?;
        Ok(Some(grad))
    }
}

/// A max-pool whose gradient will be needed, for the two that dominate the teacher's step (the
/// Inception blocks' 3×3 / stride 1 / padding 1 and the 3×3 / stride 2 between stages): the
/// forward also keeps each output's arg-max tap (a byte), so that the backward routes the
/// gradient by those codes instead of searching the input — per element it reads a byte and a
/// gradient where the search read the input, the output and the gradient. The op lives in the
/// graph node of one forward, so the codes are that forward's.
struct MaxTraining {
    pool: Pool2d,
    argmax: OnceLock<Vec<u8>>,
}

impl MaxTraining {
    /// The training op for `pool` on planes of `h × w`, if it has one.
    fn of(pool: Pool2d, (h, w): (usize, usize)) -> Option<Self> {
        let kept = (pool.is_same_3x3_max() && h >= 2 && w >= 2) || pool.is_3x3_s2_max();
        kept.then(|| Self {
            pool,
            argmax: OnceLock::new(),
        })
    }
}

impl CustomOp1 for MaxTraining {
    fn name(&self) -> &'static str {
        "kd-max-pool-kept-argmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (shape, g) = self.pool.geometry(layout)?;
        let out = float_storage!(storage, "max-pool", T => {
            let x = contiguous::<T>(storage, layout)?;
            let (out, argmax) = time("pools (forward)", || {
                if self.pool.is_same_3x3_max() {
                    same_3x3_max_with_argmax(x, g.h, g.w)
                } else {
                    Ok(max_3x3_s2_with_argmax(x, (g.h, g.w), (g.oh, g.ow)))
                }
            })?;
            // A fresh op per forward: the codes are set once.
            let _ = self.argmax.set(argmax);
            out
        });
        Ok((out, shape))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        match self.argmax.get() {
            Some(argmax) => {
                let op = MaxBackward {
                    pool: self.pool,
                    argmax,
                    input: arg.shape().clone(),
                };
                Ok(Some(grad.apply_op1_no_bwd(&op)?))
            }
            None => self.pool.bwd(arg, res, &grad),
        }
    }
}

/// [`MaxTraining`]'s backward: `grad_output -> grad_input` by the forward's arg-max codes.
struct MaxBackward<'a> {
    pool: Pool2d,
    argmax: &'a [u8],
    input: Shape,
}

impl CustomOp1 for MaxBackward<'_> {
    fn name(&self) -> &'static str {
        "kd-max-pool-kept-argmax-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let pool = self.pool;
        let (out_shape, g) = pool.geometry(&Layout::contiguous(self.input.clone()))?;
        if layout.shape() != &out_shape || out_shape.elem_count() != self.argmax.len() {
            candle_core::bail!(
                "max-pool backward: gradient {:?} for {} outputs of shape {out_shape:?}",
                layout.shape(),
                self.argmax.len()
            );
        }
        let out = float_storage!(storage, "max-pool backward", T => {
            let grad = contiguous::<T>(storage, layout)?;
            time("pools (backward)", || {
                if pool.is_same_3x3_max() {
                    same_3x3_max_backward(self.argmax, grad, g.h, g.w)
                } else {
                    max_3x3_s2_backward(self.argmax, grad, (g.h, g.w), (g.oh, g.ow))
                }
            })?
        });
        Ok((out, self.input.clone()))
    }
}

/// The gradient of a [`Pool2d`] with respect to its input:
/// `(input, output, grad_output) -> grad_input`.
struct PoolBackward(Pool2d);

impl CustomOp3 for PoolBackward {
    fn name(&self) -> &'static str {
        "kd-pool2d-backward"
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
        let p = &self.0;
        let (out_shape, g) = p.geometry(l1)?;
        if l2.shape() != &out_shape || l3.shape() != &out_shape {
            candle_core::bail!(
                "pool2d backward: output {:?} and gradient {:?}, expected {:?}",
                l2.shape(),
                l3.shape(),
                out_shape
            );
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(p.backward_planes(
                    contiguous::<f32>(s1, l1)?,
                    contiguous::<f32>(s2, l2)?,
                    contiguous::<f32>(s3, l3)?,
                    g,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(p.backward_planes(
                    contiguous::<f64>(s1, l1)?,
                    contiguous::<f64>(s2, l2)?,
                    contiguous::<f64>(s3, l3)?,
                    g,
                ))
            }
            _ => candle_core::bail!("pool2d backward supports f32 and f64, not {:?}", s1.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out_shape, g) = self.0.geometry(l1)?;
        if l2.shape() != &out_shape || l3.shape() != &out_shape {
            candle_core::bail!(
                "pool2d backward: output {:?}, expected {out_shape:?}",
                l2.shape()
            );
        }
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let dx = crate::gpu::pool_backward(&self.0, g.planes(l1)?, inputs)?;
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Direct pooling of one plane, straight from the definition (padding as -inf for max, as
    /// zeros counted in the divisor for avg; windows clipped at `len + padding`).
    fn reference(p: &Pool2d, x: &[f64], h: usize, w: usize) -> Vec<f64> {
        let (oh, ow) = (p.out_len(h).unwrap(), p.out_len(w).unwrap());
        let mut out = vec![];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut vals = vec![];
                let mut count = 0;
                for ky in 0..p.kernel {
                    for kx in 0..p.kernel {
                        let y = (oy * p.stride + ky) as isize - p.padding as isize;
                        let xx = (ox * p.stride + kx) as isize - p.padding as isize;
                        if y < (h + p.padding) as isize && xx < (w + p.padding) as isize {
                            count += 1;
                        }
                        if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                            vals.push(x[y as usize * w + xx as usize]);
                        }
                    }
                }
                out.push(match p.kind {
                    PoolKind::Max => vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                    PoolKind::Avg => vals.iter().sum::<f64>() / count as f64,
                });
            }
        }
        out
    }

    fn cases() -> Vec<(Pool2d, usize, usize)> {
        vec![
            (Pool2d::max(3, 2).ceil(), 14, 14),
            (Pool2d::max(3, 2).ceil(), 7, 7),
            (Pool2d::max(3, 1).padding(1), 5, 6),
            (Pool2d::max(2, 2), 6, 6),
            (Pool2d::max(2, 2), 7, 5),
            (Pool2d::max(3, 2).ceil(), 112, 112),
            (Pool2d::avg(3, 2), 7, 7),
            (Pool2d::avg(5, 3), 14, 14),
            (Pool2d::avg(3, 2).ceil().padding(1), 6, 5),
        ]
    }

    fn distinct_input(n: usize, seed: u64) -> Vec<f64> {
        // Distinct values (a shuffled ramp), so the arg-max is unique and finite differences
        // never cross a tie.
        let mut v: Vec<f64> = (0..n).map(|i| i as f64 * 0.37 - n as f64 * 0.1).collect();
        let mut s = seed;
        for i in (1..n).rev() {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.swap(i, (s >> 33) as usize % (i + 1));
        }
        v
    }

    /// `n` values drawn from a few with ties, both signed zeros and NaN: what a fast path must
    /// treat exactly as the general one.
    fn tricky_input(n: usize, seed: u64) -> Vec<f32> {
        let values = [-1.0f32, -0.0, 0.0, 1.0, f32::NAN, 2.0, 0.5];
        distinct_input(n, seed)
            .iter()
            .map(|v| values[(v.abs() * 1e6) as usize % values.len()])
            .collect()
    }

    /// [`tricky_input`] three ways, named: NaNs everywhere (every task of the whole-array paths
    /// takes their NaN-aware instance), none (every task the NaN-free one), and a single NaN two
    /// thirds in (tasks of both kinds in one call).
    fn tricky_inputs(n: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
        let with = tricky_input(n, seed);
        let without: Vec<f32> = with
            .iter()
            .map(|&v| if v.is_nan() { -0.0 } else { v })
            .collect();
        let mut one = without.clone();
        one[n * 2 / 3] = f32::NAN;
        vec![("NaNs", with), ("no NaN", without), ("one NaN", one)]
    }

    /// `x` with its ones made large and distinct and the rest scaled by 0.1: sums of these have
    /// bits that depend on the order of the additions.
    fn order_sensitive(x: &[f32], seed: u64) -> Vec<f32> {
        x.iter()
            .zip(distinct_input(x.len(), seed))
            .map(|(&v, r)| if v == 1.0 { (r * 1e5) as f32 } else { v * 0.1 })
            .collect()
    }

    /// The bit patterns, so that comparisons see signed zeros and NaNs.
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn output_sizes_follow_pytorch() {
        assert_eq!(Pool2d::max(3, 2).ceil().out_len(14).unwrap(), 7);
        assert_eq!(Pool2d::max(3, 2).ceil().out_len(7).unwrap(), 3);
        assert_eq!(Pool2d::max(3, 2).ceil().out_len(112).unwrap(), 56);
        assert_eq!(Pool2d::max(3, 2).ceil().out_len(56).unwrap(), 28);
        assert_eq!(Pool2d::max(3, 2).out_len(14).unwrap(), 6);
        assert_eq!(Pool2d::max(3, 1).padding(1).out_len(7).unwrap(), 7);
        assert_eq!(Pool2d::avg(5, 3).out_len(14).unwrap(), 4);
        // The last ceil-mode window may not start in the right padding.
        assert_eq!(Pool2d::max(2, 2).padding(1).ceil().out_len(5).unwrap(), 3);
        assert!(Pool2d::max(3, 1).out_len(2).is_err());
    }

    #[test]
    fn forward_matches_the_definition() {
        for (p, h, w) in cases() {
            let (b, c) = (2, 3);
            let x = distinct_input(b * c * h * w, 1);
            let t = Tensor::from_vec(x.clone(), (b, c, h, w), &Device::Cpu).unwrap();
            let got = p
                .forward(&t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let want: Vec<f64> = x
                .chunks(h * w)
                .flat_map(|pl| reference(&p, pl, h, w))
                .collect();
            assert_eq!(got.len(), want.len(), "{p:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "{p:?}: {g} vs {w}");
            }
            // f32 gives the same result.
            let got32 = p
                .forward(&t.to_dtype(DType::F32).unwrap())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let diff = (got32.flatten_all().unwrap()
                - Tensor::new(want.as_slice(), &Device::Cpu).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
            assert!(diff < 1e-3, "{p:?}: f32 differs by {diff}");
        }
    }

    /// The 3×3 / stride 1 / padding 1 max-pool's whole-array path gives the general path's bits,
    /// ties, signed zeros and NaNs included, over more planes than one task holds.
    #[test]
    fn same_3x3_max_equals_the_general_path_to_the_bit() {
        let p = Pool2d::max(3, 1).padding(1);
        for (h, w) in [(2, 2), (7, 7), (14, 14), (3, 5), (28, 28)] {
            for (kind, x) in tricky_inputs(700 * h * w, 3) {
                let g = Geometry { h, w, oh: h, ow: w };
                let fast = same_3x3_max(&x, h, w);
                let general = p.forward_planes_general(&x, g);
                assert_eq!(bits(&fast), bits(&general), "{h}x{w}, {kind}");
            }
        }
    }

    /// The 3×3 / stride 1 max-pool in training: the forward with arg-max codes gives the plain
    /// forward's bits, and the gather by those codes gives the general backward's bits — ties,
    /// signed zeros (inputs and gradients) and NaNs included, over more planes than a task holds.
    #[test]
    fn same_3x3_max_argmax_and_gather_equal_the_general_path_to_the_bit() {
        let p = Pool2d::max(3, 1).padding(1);
        for (h, w) in [(2, 2), (7, 7), (14, 14), (3, 5), (28, 28), (2, 9)] {
            let n = 300 * h * w;
            for (kind, x) in tricky_inputs(n, 7) {
                let (out, argmax) = same_3x3_max_with_argmax(&x, h, w).unwrap();
                assert_eq!(bits(&out), bits(&same_3x3_max(&x, h, w)), "{h}x{w}, {kind}");
                // Gradients whose sums depend on the order of the additions.
                let grad: Vec<f32> = order_sensitive(&tricky_input(n, 8), 10);
                let g = Geometry { h, w, oh: h, ow: w };
                let general = p.backward_planes_general(&x, &out, &grad, g);
                let gathered = same_3x3_max_backward(&argmax, &grad, h, w).unwrap();
                assert_eq!(bits(&gathered), bits(&general), "{h}x{w} backward, {kind}");
            }
        }
    }

    /// The 3×3 / stride 2 max-pool in training, floor and ceil mode: the forward with arg-max
    /// codes gives the general forward's bits, and the scatter by those codes the general
    /// backward's — ties, signed zeros and NaNs included, over more planes than a task holds.
    #[test]
    fn max_3x3_s2_argmax_and_scatter_equal_the_general_path_to_the_bit() {
        for p in [Pool2d::max(3, 2).ceil(), Pool2d::max(3, 2)] {
            for (h, w) in [
                (28, 28),
                (14, 14),
                (7, 7),
                (3, 3),
                (4, 4),
                (9, 6),
                (6, 9),
                (5, 3),
            ] {
                let g = Geometry {
                    h,
                    w,
                    oh: p.out_len(h).unwrap(),
                    ow: p.out_len(w).unwrap(),
                };
                let planes = 300;
                for (kind, x) in tricky_inputs(planes * h * w, 11) {
                    let (out, argmax) = max_3x3_s2_with_argmax(&x, (h, w), (g.oh, g.ow));
                    let general = p.forward_planes_general(&x, g);
                    assert_eq!(bits(&out), bits(&general), "{p:?} {h}x{w}, {kind}");
                    let n = planes * g.oh * g.ow;
                    let grad: Vec<f32> = order_sensitive(&tricky_input(n, 12), 13);
                    let want = p.backward_planes_general(&x, &out, &grad, g);
                    let got = max_3x3_s2_backward(&argmax, &grad, (h, w), (g.oh, g.ow)).unwrap();
                    assert_eq!(bits(&got), bits(&want), "{p:?} {h}x{w} backward, {kind}");
                }
            }
        }
    }

    /// The auxiliary heads' 3×3 / stride 2 average pool, forward and backward, gives the general
    /// path's bits (signed zeros and NaNs included), over more planes than one task holds.
    #[test]
    fn avg_3x3_s2_equals_the_general_path_to_the_bit() {
        let p = Pool2d::avg(3, 2);
        for (h, w) in [(7, 7), (14, 14), (3, 3), (4, 4), (9, 6), (6, 9), (5, 3)] {
            let g = Geometry {
                h,
                w,
                oh: p.out_len(h).unwrap(),
                ow: p.out_len(w).unwrap(),
            };
            assert!(p.is_3x3_s2_avg_floor());
            let n = 400 * h * w;
            for (kind, x) in tricky_inputs(n, 21) {
                // Sums whose bits depend on the order of the additions.
                let x = order_sensitive(&x, 23);
                let fast = p.forward_planes(&x, g);
                let general = p.forward_planes_general(&x, g);
                assert_eq!(bits(&fast), bits(&general), "{h}x{w}, {kind}");
                let m = 400 * g.oh * g.ow;
                let grad: Vec<f32> = order_sensitive(&tricky_input(m, 22), 24);
                let fast_gx = p.backward_planes(&x, &fast, &grad, g);
                let general_gx = p.backward_planes_general(&x, &fast, &grad, g);
                assert_eq!(
                    bits(&fast_gx),
                    bits(&general_gx),
                    "{h}x{w} backward, {kind}"
                );
            }
        }
        assert!(!Pool2d::avg(3, 2).ceil().is_3x3_s2_avg_floor());
    }

    /// A tracked input takes the training op (codes kept) for both kept-arg-max pools; its
    /// gradient is the general path's.
    #[test]
    fn tracked_max_pools_backpropagate_through_their_codes() {
        for (p, h, w) in [
            (Pool2d::max(3, 1).padding(1), 7, 7),
            (Pool2d::max(3, 2).ceil(), 14, 14),
            (Pool2d::max(3, 2).ceil(), 7, 7),
        ] {
            let (b, c) = (2, 3);
            let x = distinct_input(b * c * h * w, 9);
            let var = Var::from_vec(x.clone(), (b, c, h, w), &Device::Cpu).unwrap();
            let y = p.forward(var.as_tensor()).unwrap();
            let (oh, ow) = (p.out_len(h).unwrap(), p.out_len(w).unwrap());
            let wts: Vec<f64> = (0..b * c * oh * ow)
                .map(|i| (i % 11) as f64 - 5.0)
                .collect();
            let wt = Tensor::from_vec(wts.clone(), (b, c, oh, ow), &Device::Cpu).unwrap();
            let grads = (y * &wt).unwrap().sum_all().unwrap().backward().unwrap();
            let got = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let g = Geometry { h, w, oh, ow };
            let out = p.forward_planes_general(&x, g);
            let want = p.backward_planes_general(&x, &out, &wts, g);
            assert_eq!(got.to_vec1::<f64>().unwrap(), want, "{p:?} {h}x{w}");
        }
    }

    /// The 2×2 / stride 2 max-pool's whole-array forward and backward give the general path's
    /// bits: ties, signed zeros (in the inputs and in the gradients) and NaNs, over more rows than
    /// one task holds.
    #[test]
    fn max_2x2_equals_the_general_path_to_the_bit() {
        let p = Pool2d::max(2, 2);
        for (h, w) in [(2, 2), (28, 28), (14, 14), (4, 6)] {
            let n = 300 * h * w;
            for (kind, x) in tricky_inputs(n, 5) {
                let g = Geometry {
                    h,
                    w,
                    oh: h / 2,
                    ow: w / 2,
                };
                assert!(p.is_even_2x2_max(g));
                let fast = max_2x2(&x, w);
                assert_eq!(
                    bits(&fast),
                    bits(&p.forward_planes_general(&x, g)),
                    "{h}x{w}, {kind}"
                );
                let grad = tricky_input(n / 4, 6);
                let fast_gx = max_2x2_backward(&x, &fast, &grad, w);
                let general_gx = p.backward_planes_general(&x, &fast, &grad, g);
                assert_eq!(
                    bits(&fast_gx),
                    bits(&general_gx),
                    "{h}x{w} backward, {kind}"
                );
            }
        }
        // Odd sizes take the general path.
        assert!(!p.is_even_2x2_max(Geometry {
            h: 7,
            w: 7,
            oh: 3,
            ow: 3
        }));
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for (p, h, w) in cases().into_iter().filter(|(_, h, _)| *h < 20) {
            let (b, c) = (2, 2);
            let n = b * c * h * w;
            let x = distinct_input(n, 2);
            let (oh, ow) = (p.out_len(h).unwrap(), p.out_len(w).unwrap());
            // A weighted sum makes every output's gradient different.
            let weights: Vec<f64> = (0..b * c * oh * ow)
                .map(|i| ((i * 7919) % 13) as f64 / 13.0 - 0.4)
                .collect();
            let wt = Tensor::from_vec(weights.clone(), (b, c, oh, ow), &Device::Cpu).unwrap();
            let loss = |xs: &[f64]| -> f64 {
                let mut s = 0.0;
                for (i, plane) in xs.chunks(h * w).enumerate() {
                    for (j, v) in reference(&p, plane, h, w).iter().enumerate() {
                        s += v * weights[i * oh * ow + j];
                    }
                }
                s
            };
            let var = Var::from_vec(x.clone(), (b, c, h, w), &Device::Cpu).unwrap();
            let out = p.forward(var.as_tensor()).unwrap();
            let l = (out * &wt).unwrap().sum_all().unwrap();
            let grads = l.backward().unwrap();
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let eps = 1e-4;
            for i in 0..n {
                let mut xp = x.clone();
                xp[i] += eps;
                let mut xm = x.clone();
                xm[i] -= eps;
                let fd = (loss(&xp) - loss(&xm)) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() < 1e-6,
                    "{p:?} input {i}: analytic {} vs finite difference {fd}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn ties_and_nan_follow_pytorch() {
        let dev = Device::Cpu;
        let grad_of = |vals: Vec<f32>, p: Pool2d| {
            let x = Var::from_vec(vals, (1, 1, 2, 2), &dev).unwrap();
            let y = p.forward(x.as_tensor()).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            let out = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                out,
                g.get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        };
        // Ties: the first maximum in row-major order takes the gradient.
        assert_eq!(
            grad_of(vec![1., 1., 1., 1.], Pool2d::max(2, 2)).1,
            vec![1., 0., 0., 0.]
        );
        assert_eq!(
            grad_of(vec![0., 2., 2., 1.], Pool2d::max(2, 2)).1,
            vec![0., 1., 0., 0.]
        );
        // NaN wins and stays, wherever it sits in the window.
        for pos in 0..4 {
            let mut v = vec![1., 2., 3., 4.];
            v[pos] = f32::NAN;
            let (out, g) = grad_of(v, Pool2d::max(2, 2));
            assert!(out[0].is_nan(), "NaN at {pos} lost");
            assert_eq!(g.iter().position(|&x| x == 1.0), Some(pos));
        }
    }
}
