//! Convolution as matrix products, on activations laid out channels-first: `[c, batch, h, w]`.
//!
//! candle 0.11's CPU convolution backward is a direct loop for the input gradient
//! (`conv_transpose2d`, one `vec_dot` per pixel) and a GEMV-shaped convolution for the weight
//! gradient. Here a convolution is `W · im2col(x)`: with the batch folded into the columns,
//! the forward and both gradients are each one multithreaded GEMM —
//! `y = W·cols`, `dW = dy·colsᵀ`, `dcols = Wᵀ·dy` — and the input gradient is `col2im(dcols)`.
//! In this layout a 1×1 convolution needs no im2col at all (`cols` is `x` itself) and the output
//! comes out in the layout the next layer reads, so no transposes sit between layers.

use crate::cpu::contiguous;
use crate::timing::time;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::init::{inits, InitScheme};

/// A square 2-D convolution with bias, applied to `[c_in, batch, h, w]` activations.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    /// None when a BatchNorm follows (its shift makes a bias redundant).
    bias: Option<Tensor>,
    geometry: Im2Col,
    cout: usize,
}

impl Conv {
    /// Weights as PyTorch stores them: `weight [c_out, c_in, k, k]`, `bias [c_out]`.
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        scheme: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut conv = Self::without_bias(cin, cout, kernel, stride, padding, scheme, vb.clone())?;
        let (_, bi) = inits(scheme, cin * kernel * kernel, true);
        conv.bias = Some(vb.get_with_hints(cout, "bias", bi)?);
        Ok(conv)
    }

    /// The same convolution with no bias: `weight [c_out, c_in, k, k]` only.
    pub fn without_bias(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        scheme: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (wi, _) = inits(scheme, cin * kernel * kernel, true);
        Ok(Self {
            weight: vb.get_with_hints((cout, cin, kernel, kernel), "weight", wi)?,
            bias: None,
            geometry: Im2Col {
                kernel,
                stride,
                padding,
            },
            cout,
        })
    }

    /// This convolution followed by a per-channel affine map, as one convolution: weights scaled
    /// by `scale [c_out]`, bias `shift` (the convolution has none: BatchNorm folding).
    pub fn folded(&self, scale: &Tensor, shift: Tensor) -> Result<Conv> {
        if self.bias.is_some() {
            candle_core::bail!("folding an affine map into a convolution with a bias");
        }
        Ok(Conv {
            weight: self
                .weight
                .broadcast_mul(&scale.reshape((self.cout, 1, 1, 1))?)?,
            bias: Some(shift),
            ..self.clone()
        })
    }

    /// This convolution and its ReLU in an inference graph, weights named `<name>.weight` and
    /// `<name>.bias` (a zero bias when it has none).
    pub fn export_relu(
        &self,
        g: &mut crate::graph::GraphBuilder,
        x: &str,
        name: &str,
    ) -> Result<String> {
        let w = g.weight(&format!("{name}.weight"), &self.weight)?;
        let bias = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(self.cout, self.weight.dtype(), self.weight.device())?,
        };
        let b = g.weight(&format!("{name}.bias"), &bias)?;
        let g_ = &self.geometry;
        let z = g.conv(x, &w, &b, (g_.kernel, g_.stride, g_.padding));
        Ok(g.relu(&z))
    }

    /// `[c_in, batch, h, w]` → `[c_out, batch, oh, ow]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let z = self.matmul(xs)?;
        match &self.bias {
            Some(b) => z.broadcast_add(&b.reshape((self.cout, 1, 1, 1))?),
            None => Ok(z),
        }
    }

    /// `relu(conv(x) + bias)` with the bias and ReLU fused into one pass (and one in backward).
    pub fn forward_relu(&self, xs: &Tensor) -> Result<Tensor> {
        let z = self.matmul(xs)?;
        match &self.bias {
            Some(b) => z.apply_op2(b, BiasRelu),
            None => z.relu(),
        }
    }

    /// `W · im2col(x)` as `[c_out, batch, oh, ow]`: one node of the autograd graph ([`ConvOp`]).
    pub(crate) fn matmul(&self, xs: &Tensor) -> Result<Tensor> {
        let (cin, b, h, w) = xs.dims4()?;
        let g = self.geometry;
        let (oh, ow) = (g.out_len(h)?, g.out_len(w)?);
        crate::macs::add(self.cout * cin * g.kernel * g.kernel * b * oh * ow);
        xs.contiguous()?.apply_op2(&self.weight, ConvOp(g))
    }
}

/// A convolution as one op: `(x [c_in, b, h, w], weight [c_out, c_in, k, k]) → [c_out, b, oh,
/// ow]`, `y = W · cols` with `cols = im2col(x)` (`x` itself for a 1×1 convolution). Backward:
/// `dW = dy · colsᵀ` (the columns gathered again rather than kept), `dcols = Wᵀ · dy`,
/// `dx = col2im(dcols)`.
///
/// As separate candle ops (im2col, reshapes, matmul) every intermediate was a node whose gradient
/// candle's backward pass zero-fills and adds into: for a 3×3 convolution a buffer nine times the
/// input's size, twice over. As one node only `dx` and `dW` are accumulated.
#[derive(Debug, Clone, Copy)]
struct ConvOp(Im2Col);

impl ConvOp {
    /// Whether the columns are the input itself.
    fn is_pointwise(&self) -> bool {
        let g = self.0;
        g.kernel == 1 && g.stride == 1 && g.padding == 0
    }

    fn dims(&self, l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
        let (cin, b, h, w) = l1.shape().dims4()?;
        let (cout, wcin, k1, k2) = l2.shape().dims4()?;
        let k = self.0.kernel;
        if wcin != cin || k1 != k || k2 != k {
            candle_core::bail!(
                "convolution: weight {:?} for a {k}x{k} kernel on {cin} channels",
                l2.shape()
            );
        }
        Ok((cin, b, h, w, cout))
    }

    fn run<T: WithDType>(
        &self,
        x: &[T],
        weight: &[T],
        (cin, b, h, w, cout): (usize, usize, usize, usize, usize),
    ) -> Result<Vec<T>> {
        let g = self.0;
        let n = b * g.out_len(h)? * g.out_len(w)?;
        let depth = cin * g.kernel * g.kernel;
        let gathered;
        let cols: &[T] = if self.is_pointwise() {
            x
        } else {
            gathered = time("im2col (forward)", || g.fill(x, (cin, b, h, w)))?;
            &gathered
        };
        let mut out: Vec<T> = Vec::with_capacity(cout * n);
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        time("convolution matrix products (forward)", || {
            // SAFETY: `out` has room for `cout × n` elements, all written (read_dst is false);
            // `weight` is `cout × depth` and `cols` `depth × n`, row-major, as the strides say.
            #[allow(unsafe_code)]
            unsafe {
                gemm::gemm(
                    cout,
                    n,
                    depth,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    weight.as_ptr(),
                    1,
                    depth as isize,
                    cols.as_ptr(),
                    1,
                    n as isize,
                    T::from_f64(0.0),
                    T::from_f64(1.0),
                    false,
                    false,
                    false,
                    parallelism,
                );
                out.set_len(cout * n);
            }
        });
        Ok(out)
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "kd-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1, l2)?;
        let (_, b, h, w, cout) = dims;
        let shape = Shape::from((cout, b, self.0.out_len(h)?, self.0.out_len(w)?));
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.run(
                contiguous::<f32>(s1, l1)?,
                contiguous::<f32>(s2, l2)?,
                dims,
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.run(
                contiguous::<f64>(s1, l1)?,
                contiguous::<f64>(s2, l2)?,
                dims,
            )?),
            _ => candle_core::bail!("convolution supports f32 and f64"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, weight) = (x.detach(), weight.detach());
        let (cin, b, h, w) = x.dims4()?;
        let cout = weight.dim(0)?;
        let k = self.0.kernel;
        let dy = grad.reshape((cout, grad.elem_count() / cout))?;
        let cols = if self.is_pointwise() {
            x.reshape((cin, b * h * w))?
        } else {
            time("im2col (backward, gathered again)", || {
                x.apply_op1_no_bwd(&self.0)
            })?
        };
        let dw = time(
            "convolution weight gradient dW = dy·colsᵀ (backward)",
            || dy.matmul(&cols.t()?)?.reshape(weight.shape()),
        )?;
        let dcols = time(
            "convolution input gradient dcols = Wᵀ·dy (backward)",
            || weight.reshape((cout, cin * k * k))?.t()?.matmul(&dy),
        )?;
        let dx = if self.is_pointwise() {
            dcols.reshape((cin, b, h, w))?
        } else {
            let fold = Col2Im {
                op: self.0,
                c: cin,
                b,
                h,
                w,
            };
            time("col2im (backward)", || dcols.apply_op1_no_bwd(&fold))?
        };
        Ok((Some(dx), Some(dw)))
    }
}

/// `[c, b, h, w]` → `[c·k·k, b·oh·ow]`: row `(ci, ky, kx)` holds, for every output pixel of every
/// image, the input pixel that kernel tap sees (zero in the padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Im2Col {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// The input shape an [`Im2Col`] was applied to, for its adjoint.
#[derive(Debug, Clone, Copy)]
struct Col2Im {
    op: Im2Col,
    c: usize,
    b: usize,
    h: usize,
    w: usize,
}

impl Im2Col {
    pub fn out_len(&self, len: usize) -> Result<usize> {
        if len + 2 * self.padding < self.kernel {
            candle_core::bail!(
                "a {}x{} convolution does not fit an input of {len} pixels",
                self.kernel,
                self.kernel
            );
        }
        Ok((len + 2 * self.padding - self.kernel) / self.stride + 1)
    }

    /// For output coordinate `o` and tap `t`, the input coordinate, if inside the image.
    #[inline]
    fn source(&self, o: usize, t: usize, len: usize) -> Option<usize> {
        let i = (o * self.stride + t) as isize - self.padding as isize;
        (i >= 0 && (i as usize) < len).then_some(i as usize)
    }

    /// The range of outputs `o` whose source `o·s + t - p` lies in `0..len`.
    #[inline]
    fn valid(&self, t: usize, len: usize, out: usize) -> std::ops::Range<usize> {
        crate::cpu::tap_range(t, self.stride, self.padding, len, out)
    }

    fn fill<T: WithDType>(
        &self,
        x: &[T],
        (c, b, h, w): (usize, usize, usize, usize),
    ) -> Result<Vec<T>> {
        let (k, oh, ow) = (self.kernel, self.out_len(h)?, self.out_len(w)?);
        let n = b * oh * ow;
        let zero = T::from_f64(0.0);
        let mut cols = vec![zero; c * k * k * n];
        cols.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
            let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let xs = self.valid(kx, w, ow);
            if xs.is_empty() {
                return;
            }
            for bi in 0..b {
                let plane = &x[(ci * b + bi) * h * w..(ci * b + bi + 1) * h * w];
                for oy in 0..oh {
                    let Some(iy) = self.source(oy, ky, h) else {
                        continue;
                    };
                    let out = &mut dst[(bi * oh + oy) * ow..(bi * oh + oy + 1) * ow];
                    let src = &plane[iy * w..(iy + 1) * w];
                    if self.stride == 1 {
                        let off = xs.start + kx - self.padding;
                        out[xs.clone()].copy_from_slice(&src[off..off + xs.len()]);
                    } else {
                        for ox in xs.clone() {
                            out[ox] = src[ox * self.stride + kx - self.padding];
                        }
                    }
                }
            }
        });
        Ok(cols)
    }
}

impl Col2Im {
    fn fold<T: WithDType>(&self, cols: &[T]) -> Result<Vec<T>> {
        let Self { op, c, b, h, w } = *self;
        let (k, oh, ow) = (op.kernel, op.out_len(h)?, op.out_len(w)?);
        let n = b * oh * ow;
        let mut dx = vec![T::from_f64(0.0); c * b * h * w];
        // Channel `ci` only receives from its own k·k rows: channels are independent tasks.
        dx.par_chunks_mut(b * h * w)
            .enumerate()
            .for_each(|(ci, dst)| {
                for ky in 0..k {
                    for kx in 0..k {
                        let row =
                            &cols[((ci * k + ky) * k + kx) * n..((ci * k + ky) * k + kx + 1) * n];
                        let xs = op.valid(kx, w, ow);
                        if xs.is_empty() {
                            continue;
                        }
                        for bi in 0..b {
                            for oy in 0..oh {
                                let Some(iy) = op.source(oy, ky, h) else {
                                    continue;
                                };
                                let src = &row[(bi * oh + oy) * ow..(bi * oh + oy + 1) * ow];
                                let out = &mut dst[(bi * h + iy) * w..(bi * h + iy + 1) * w];
                                if op.stride == 1 {
                                    let off = xs.start + kx - op.padding;
                                    let out = &mut out[off..off + xs.len()];
                                    for (o, &v) in out.iter_mut().zip(&src[xs.clone()]) {
                                        *o += v;
                                    }
                                } else {
                                    for ox in xs.clone() {
                                        out[ox * op.stride + kx - op.padding] += src[ox];
                                    }
                                }
                            }
                        }
                    }
                }
            });
        Ok(dx)
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "kd-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let (c, b, h, w) = dims;
        let shape = Shape::from((
            c * self.kernel * self.kernel,
            b * self.out_len(h)? * self.out_len(w)?,
        ));
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.fill(contiguous::<f32>(s, l)?, dims)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.fill(contiguous::<f64>(s, l)?, dims)?),
            _ => candle_core::bail!("im2col supports f32 and f64"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (c, b, h, w) = arg.dims4()?;
        let fold = Col2Im {
            op: *self,
            c,
            b,
            h,
            w,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&fold)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "kd-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.c, self.b, self.h, self.w));
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.fold(contiguous::<f32>(s, l)?)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.fold(contiguous::<f64>(s, l)?)?),
            _ => candle_core::bail!("col2im supports f32 and f64"),
        };
        Ok((out, shape))
    }
}

/// `(z [c, n], bias [c]) → max(0, z + bias)`, one pass, parallel over channels. Its gradient
/// passes where the output is positive (PyTorch's ReLU rule) and sums over `n` for the bias.
#[derive(Debug, Clone, Copy)]
pub struct BiasRelu;

/// `(output, grad_output) → grad_output · [output > 0]`.
#[derive(Debug, Clone, Copy)]
struct ReluMask;

/// `(channels, elements per channel)` of a channels-first tensor of any rank ≥ 1.
pub(crate) fn rows(shape: &Shape) -> Result<(usize, usize)> {
    match shape.dims().first() {
        Some(&c) if c > 0 => Ok((c, shape.elem_count() / c)),
        _ => candle_core::bail!("expected channels first, got shape {shape:?}"),
    }
}

/// `[c]` as `[c, 1, …]` to broadcast over a channels-first tensor of `rank` dimensions.
pub(crate) fn per_channel(v: &Tensor, rank: usize) -> Result<Tensor> {
    let mut dims = vec![1; rank.max(1)];
    dims[0] = v.elem_count();
    v.reshape(dims)
}

impl CustomOp2 for BiasRelu {
    fn name(&self) -> &'static str {
        "kd-bias-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, n) = rows(l1.shape())?;
        if l2.shape().dims() != [c] {
            candle_core::bail!("bias-relu: bias {:?} for {c} channels", l2.shape());
        }
        fn run<T: WithDType>(z: &[T], b: &[T], n: usize) -> Vec<T> {
            time("bias + ReLU (forward)", || {
                let zero = T::from_f64(0.0);
                let mut out = vec![zero; z.len()];
                out.par_chunks_mut(n)
                    .zip(z.par_chunks(n))
                    .zip(b.par_iter())
                    .for_each(|((o, zr), &bc)| {
                        for (o, &v) in o.iter_mut().zip(zr) {
                            let y = v + bc;
                            *o = if y > zero { y } else { zero };
                        }
                    });
                out
            })
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(run(
                contiguous::<f32>(s1, l1)?,
                contiguous::<f32>(s2, l2)?,
                n,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(run(
                contiguous::<f64>(s1, l1)?,
                contiguous::<f64>(s2, l2)?,
                n,
            )),
            _ => candle_core::bail!("bias-relu supports f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _z: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dz, db) = time("bias + ReLU (backward)", || {
            let dz = res.apply_op2_no_bwd(&grad.contiguous()?, &ReluMask)?;
            let db = dz.flatten_from(1)?.sum(1)?;
            Ok::<_, candle_core::Error>((dz, db))
        })?;
        Ok((Some(dz), Some(db)))
    }
}

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "kd-relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(y: &[T], g: &[T]) -> Vec<T> {
            let zero = T::from_f64(0.0);
            let mut out = vec![zero; y.len()];
            const CHUNK: usize = 1 << 14;
            out.par_chunks_mut(CHUNK)
                .zip(y.par_chunks(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|((o, y), g)| {
                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                        *o = if y > zero { g } else { zero };
                    }
                });
            out
        }
        if l1.shape() != l2.shape() {
            candle_core::bail!("relu-mask: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(run(contiguous::<f32>(s1, l1)?, contiguous::<f32>(s2, l2)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(run(contiguous::<f64>(s1, l1)?, contiguous::<f64>(s2, l2)?))
            }
            _ => candle_core::bail!("relu-mask supports f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// NCHW → CNHW (and back: the same swap).
pub fn swap_batch_and_channels(xs: &Tensor) -> Result<Tensor> {
    xs.transpose(0, 1)?.contiguous()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Deterministic values in [-1, 1).
    pub(crate) fn rand(shape: &[usize], seed: u64) -> Vec<f64> {
        let n: usize = shape.iter().product();
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// Largest absolute difference relative to the largest magnitude of `b`.
    pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
        a.iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// Our convolution against candle's `conv2d` (the op it replaces), values and gradients.
    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let dev = Device::Cpu;
        // (c_in, c_out, k, stride, padding, h, w)
        let cases = [
            (3, 4, 3, 1, 1, 7, 6),
            (2, 5, 1, 1, 0, 5, 5),
            (4, 3, 5, 1, 2, 6, 7),
            (3, 8, 7, 2, 3, 11, 13),
            (5, 6, 3, 2, 1, 9, 9),
            (1, 2, 3, 1, 0, 4, 4),
            (3, 2, 1, 2, 0, 5, 7),
        ];
        for (i, &(cin, cout, k, s, p, h, w)) in cases.iter().enumerate() {
            let b = 3;
            let x = Var::from_vec(rand(&[b, cin, h, w], i as u64), (b, cin, h, w), &dev).unwrap();
            let wt = Var::from_vec(
                rand(&[cout, cin, k, k], 100 + i as u64),
                (cout, cin, k, k),
                &dev,
            )
            .unwrap();
            let bias = Var::from_vec(rand(&[cout], 200 + i as u64), cout, &dev).unwrap();
            let conv = Conv {
                weight: wt.as_tensor().clone(),
                bias: Some(bias.as_tensor().clone()),
                geometry: Im2Col {
                    kernel: k,
                    stride: s,
                    padding: p,
                },
                cout,
            };

            let ours = swap_batch_and_channels(
                &conv
                    .forward(&swap_batch_and_channels(x.as_tensor()).unwrap())
                    .unwrap(),
            )
            .unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(wt.as_tensor(), p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            assert!(
                max_rel_diff(&ours, &theirs) < 1e-12,
                "case {i}: forward differs"
            );

            let probe = Tensor::from_vec(rand(theirs.dims(), 300 + i as u64), theirs.shape(), &dev)
                .unwrap();
            let g_ours = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_theirs = (theirs * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("input", &x), ("weight", &wt), ("bias", &bias)] {
                let d = max_rel_diff(
                    g_ours.get(v.as_tensor()).unwrap(),
                    g_theirs.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-12, "case {i}: {name} gradient differs by {d}");
            }
        }
        // f32 agrees to f32 precision.
        let x = Tensor::from_vec(rand(&[2, 3, 8, 8], 9), (2, 3, 8, 8), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let wt = Tensor::from_vec(rand(&[4, 3, 3, 3], 10), (4, 3, 3, 3), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let conv = Conv {
            weight: wt.clone(),
            bias: Some(Tensor::zeros(4, DType::F32, &dev).unwrap()),
            geometry: Im2Col {
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            cout: 4,
        };
        let ours =
            swap_batch_and_channels(&conv.forward(&swap_batch_and_channels(&x).unwrap()).unwrap())
                .unwrap();
        let theirs = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
        let d = max_rel_diff(
            &ours.to_dtype(DType::F64).unwrap(),
            &theirs.to_dtype(DType::F64).unwrap(),
        );
        assert!(d < 1e-5, "f32 differs by {d}");
    }

    /// col2im is the adjoint of im2col, `<im2col(x), y> = <x, col2im(y)>`, for any geometry —
    /// including the ones where candle's own conv2d backward returns a wrongly sized gradient
    /// (stride 2 on an even-sized input: its `conv_transpose2d` has no output padding).
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        let dev = Device::Cpu;
        for (i, &(k, s, p, h, w)) in [
            (3, 1, 1, 5, 6),
            (7, 2, 3, 12, 12),
            (3, 2, 1, 8, 9),
            (5, 1, 2, 4, 4),
            (1, 2, 0, 6, 5),
            (3, 1, 0, 3, 5),
        ]
        .iter()
        .enumerate()
        {
            let (c, b) = (2, 3);
            let op = Im2Col {
                kernel: k,
                stride: s,
                padding: p,
            };
            let x = Var::from_vec(rand(&[c, b, h, w], 7 + i as u64), (c, b, h, w), &dev).unwrap();
            let cols = x.as_tensor().apply_op1(op).unwrap();
            let y = Tensor::from_vec(rand(cols.dims(), 70 + i as u64), cols.shape(), &dev).unwrap();
            let lhs = (&cols * &y).unwrap().sum_all().unwrap();
            let grads = lhs.backward().unwrap();
            let dx = grads.get(x.as_tensor()).unwrap();
            assert_eq!(dx.dims(), x.dims());
            let rhs = (x.as_tensor() * dx)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let lhs = lhs.to_scalar::<f64>().unwrap();
            assert!(
                (lhs - rhs).abs() < 1e-10 * lhs.abs().max(1.0),
                "case {i}: {lhs} vs {rhs}"
            );
        }
    }

    /// The fused bias + ReLU against candle's `broadcast_add` + `relu`, values and gradients.
    #[test]
    fn bias_relu_matches_add_then_relu() {
        let dev = Device::Cpu;
        let (c, n) = (5, 70_001);
        let z = Var::from_vec(rand(&[c, n], 1), (c, n), &dev).unwrap();
        let b = Var::from_vec(rand(&[c], 2), c, &dev).unwrap();
        let ours = z.as_tensor().apply_op2(b.as_tensor(), BiasRelu).unwrap();
        let theirs = z
            .as_tensor()
            .broadcast_add(&b.as_tensor().reshape((c, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap();
        assert!(max_rel_diff(&ours, &theirs) < 1e-15);
        let probe = Tensor::from_vec(rand(&[c, n], 3), (c, n), &dev).unwrap();
        let g1 = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("z", &z), ("bias", &b)] {
            let d = max_rel_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-12, "{name} gradient differs by {d}");
        }
    }
}
