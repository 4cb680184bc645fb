//! im2col and its adjoint col2im, on activations laid out `[c, batch, h, w]`, for the whole
//! batch or for a range of its images (the convolution's backward works image chunk by chunk).

use crate::cpu::{contiguous, float_storage};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::any::Any;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut, Range};

/// `[c, b, h, w]` → `[c·k·k, b·oh·ow]`: row `(ci, ky, kx)` holds, for every output pixel of every
/// image, the input pixel that kernel tap sees (zero in the padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Im2Col {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// An [`Im2Col`] applied to an input of a given shape `[c, b, h, w]`; as an op, its adjoint
/// (col2im).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame {
    pub op: Im2Col,
    pub c: usize,
    pub b: usize,
    pub h: usize,
    pub w: usize,
    oh: usize,
    ow: usize,
}

/// A chunk's columns in a buffer this thread keeps from call to call ([`Frame::gather`]). The
/// convolutions gather a chunk's columns, multiply and drop them, chunk after chunk; a fresh
/// `vec![0; n]` each time zero-filled every buffer before im2col wrote it again: 18 ms of the
/// 530 ms of CPU time of a 2-thread `googlenet-bn` step (`docs/speed.md`, nineteenth round).
/// Dropped, the buffer goes back to its thread, which keeps its largest: at most one chunk's
/// columns per thread, held until the thread ends (2 MiB in the forward; in the backward's
/// chunks of 8 images, 3.6 MB for the 28-px teacher and 59 MB for `googlenet-224`'s 7×7 stem).
pub(crate) struct Columns<T: WithDType> {
    buf: Vec<T>,
    len: usize,
}

thread_local! {
    /// This thread's spare columns buffer, of whichever element type last used it.
    static SPARE_COLUMNS: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

impl<T: WithDType> Columns<T> {
    /// `len` elements of this thread's spare buffer (grown with zeros if it is shorter), holding
    /// whatever they last held; a fresh buffer if the spare one is in use or of another type.
    pub(crate) fn take(len: usize) -> Self {
        let spare = SPARE_COLUMNS.with(|s| s.borrow_mut().take());
        let mut buf = spare
            .and_then(|b| b.downcast::<Vec<T>>().ok())
            .map_or_else(Vec::new, |b| *b);
        if buf.len() < len {
            buf.resize(len, T::zero());
        }
        Self { buf, len }
    }
}

impl<T: WithDType> Drop for Columns<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // At a thread's exit the slot may be gone already; the buffer is then simply freed.
        let _ = SPARE_COLUMNS.try_with(|s| {
            let mut s = s.borrow_mut();
            let kept = s.as_ref().and_then(|b| b.downcast_ref::<Vec<T>>());
            if kept.is_none_or(|k| k.len() < buf.len()) {
                *s = Some(Box::new(buf));
            }
        });
    }
}

impl<T: WithDType> Deref for Columns<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}

impl<T: WithDType> DerefMut for Columns<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
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

    /// A convolution's `pass` on `f` with `cout` outputs for [`crate::timing`]: e.g.
    /// `backward, 3×3 at 14×14` (`/2` for a stride of 2), and `, 32 → 48 channels` after it
    /// when timing [`crate::timing::by_layer`].
    pub(crate) fn detail(&self, pass: &str, f: Frame, cout: usize) -> String {
        self.label(pass, f, crate::timing::is_by_layer().then_some(cout))
    }

    fn label(&self, pass: &str, f: Frame, cout: Option<usize>) -> String {
        let k = self.kernel;
        let stride = match self.stride {
            1 => String::new(),
            s => format!("/{s}"),
        };
        let channels = cout.map_or(String::new(), |o| format!(", {} → {o} channels", f.c));
        format!("{pass}, {k}×{k}{stride} at {}×{}{channels}", f.h, f.w)
    }

    /// Whether the columns are the input itself (a 1×1 convolution, stride 1, no padding).
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// This geometry on an input `[c, b, h, w]`.
    pub(crate) fn on(self, (c, b, h, w): (usize, usize, usize, usize)) -> Result<Frame> {
        Ok(Frame {
            op: self,
            c,
            b,
            h,
            w,
            oh: self.out_len(h)?,
            ow: self.out_len(w)?,
        })
    }

    /// The input row `o·s + t − p` that output row `o` reads through tap `t`, if inside.
    #[inline]
    fn source(&self, o: usize, t: usize, len: usize) -> Option<usize> {
        (o * self.stride + t)
            .checked_sub(self.padding)
            .filter(|&i| i < len)
    }

    /// The range of outputs `o` whose source `o·s + t - p` lies in `0..len`.
    #[inline]
    fn valid(&self, t: usize, len: usize, out: usize) -> Range<usize> {
        crate::cpu::tap_range(t, self.stride, self.padding, len, out)
    }
}

impl Frame {
    /// Rows of the columns, `c·k·k`.
    pub fn depth(&self) -> usize {
        self.c * self.op.kernel * self.op.kernel
    }

    /// The output's height and width.
    pub fn out_size(&self) -> (usize, usize) {
        (self.oh, self.ow)
    }

    /// Output pixels per image, `oh·ow`.
    pub fn pixels(&self) -> usize {
        self.oh * self.ow
    }

    /// The columns of the whole batch, `[c·k·k, b·oh·ow]`.
    pub fn gather_all<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let n = self.b * self.pixels();
        let mut cols = vec![T::from_f64(0.0); self.depth() * n];
        cols.par_chunks_mut(n)
            .enumerate()
            .for_each(|(row, dst)| self.gather_row(x, row, 0..self.b, dst));
        cols
    }

    /// The columns of `images`, `[c·k·k, images·oh·ow]`, on this thread, in its [`Columns`]
    /// buffer: every element is written, so the buffer needs no zero fill.
    pub(crate) fn gather<T: WithDType>(&self, x: &[T], images: Range<usize>) -> Columns<T> {
        let n = images.len() * self.pixels();
        let mut cols = Columns::take(self.depth() * n);
        for (row, dst) in cols.chunks_mut(n.max(1)).enumerate() {
            self.gather_row(x, row, images.clone(), dst);
        }
        cols
    }

    /// Row `(ci, ky, kx)` of the columns for `images` into `dst`, every element of it: zero
    /// where the tap falls in the padding.
    fn gather_row<T: WithDType>(&self, x: &[T], row: usize, images: Range<usize>, dst: &mut [T]) {
        let k = self.op.kernel;
        let tap = (row / (k * k), (row / k) % k, row % k);
        if self.op.stride == 1 && self.ow == self.w {
            self.gather_row_shifted(x, tap, images, dst);
        } else {
            self.gather_row_by_rows(x, tap, images, dst);
        }
    }

    /// Channel `ci`'s plane of image `bi` in `x` `[c, b, h, w]`.
    fn plane<'a, T>(&self, x: &'a [T], ci: usize, bi: usize) -> &'a [T] {
        let (size, at) = (self.h * self.w, ci * self.b + bi);
        &x[at * size..(at + 1) * size]
    }

    /// [`Self::gather_row`] for any geometry, output row by output row.
    fn gather_row_by_rows<T: WithDType>(
        &self,
        x: &[T],
        (ci, ky, kx): (usize, usize, usize),
        images: Range<usize>,
        dst: &mut [T],
    ) {
        let Self {
            op, h, w, oh, ow, ..
        } = *self;
        let xs = op.valid(kx, w, ow);
        if xs.is_empty() {
            dst.fill(T::zero());
            return;
        }
        for (i, bi) in images.enumerate() {
            let plane = self.plane(x, ci, bi);
            for oy in 0..oh {
                let out = &mut dst[(i * oh + oy) * ow..(i * oh + oy + 1) * ow];
                let Some(iy) = op.source(oy, ky, h) else {
                    out.fill(T::zero());
                    continue;
                };
                out[..xs.start].fill(T::zero());
                out[xs.end..].fill(T::zero());
                let src = &plane[iy * w..(iy + 1) * w];
                if op.stride == 1 {
                    let off = xs.start + kx - op.padding;
                    out[xs.clone()].copy_from_slice(&src[off..off + xs.len()]);
                } else {
                    for ox in xs.clone() {
                        out[ox] = src[ox * op.stride + kx - op.padding];
                    }
                }
            }
        }
    }

    /// [`Self::gather_row`] for a stride of 1 and rows as wide as the input's ("same" padding):
    /// the tap's valid outputs of an image are its plane shifted by `(ky − p)·w + kx − p`, so
    /// they are one contiguous copy (a copy per output row costs a call for 3 to 28 values); the
    /// values that the shift wraps into the ends of rows, where the tap falls in the padding, are
    /// set back to zero, and so are the rows above and below the valid ones.
    fn gather_row_shifted<T: WithDType>(
        &self,
        x: &[T],
        (ci, ky, kx): (usize, usize, usize),
        images: Range<usize>,
        dst: &mut [T],
    ) {
        let Self { op, h, w, oh, .. } = *self;
        let (xs, ys) = (op.valid(kx, w, w), op.valid(ky, h, oh));
        if xs.is_empty() || ys.is_empty() {
            dst.fill(T::zero());
            return;
        }
        let len = (ys.len() - 1) * w + xs.len();
        // The first valid output's source, (ys.start + ky − p, xs.start + kx − p).
        let from = (ys.start + ky - op.padding) * w + xs.start + kx - op.padding;
        let start = ys.start * w + xs.start;
        for (i, bi) in images.enumerate() {
            let plane = self.plane(x, ci, bi);
            let out = &mut dst[i * oh * w..(i + 1) * oh * w];
            out[..start].fill(T::zero());
            out[start..start + len].copy_from_slice(&plane[from..from + len]);
            out[start + len..].fill(T::zero());
            for oy in ys.start..ys.end - 1 {
                out[oy * w + xs.end..(oy + 1) * w + xs.start].fill(T::zero());
            }
        }
    }

    /// col2im of the whole batch: `cols [c·k·k, b·oh·ow]` → `[c, b, h, w]`.
    pub fn scatter_all<T: WithDType>(&self, cols: &[T]) -> Vec<T> {
        let plane = self.b * self.h * self.w;
        let mut dx = vec![T::from_f64(0.0); self.c * plane];
        // Channel `ci` only receives from its own k·k rows: channels are independent tasks.
        dx.par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(ci, dst)| self.scatter_channel(cols, ci, self.b, dst));
        dx
    }

    /// [`Self::scatter_channel`] from columns that are the caller's to change (the convolution's
    /// backward, whose `dcols` are its own): with a stride of 1 and rows as wide as the input's,
    /// each tap's row is one shifted run over all `count` images ([`Self::scatter_shifted`]),
    /// where the general scatter adds one output row at a time (3 to 28 values).
    pub(crate) fn scatter_own_channel<T: WithDType>(
        &self,
        cols: &mut [T],
        ci: usize,
        count: usize,
        dst: &mut [T],
    ) {
        if self.op.stride == 1 && self.ow == self.w && self.oh == self.h {
            crate::cpu::wide!(|| self.scatter_shifted(cols, ci, count, dst))
        } else {
            self.scatter_channel(cols, ci, count, dst)
        }
    }

    /// The shifted scatter: in each tap's row the outputs whose tap falls in the padding are set
    /// to zero first — they see no input, and shifted with the rest they would land on a
    /// neighbouring row's or image's pixels — then the row from its first valid output to its
    /// last is added into `dst` shifted by `(ky − p)·w + kx − p`. Every input still receives its
    /// taps in order, one term each; the cleared outputs add `+0` to sums that start from `+0`,
    /// which never changes one (a sum from `+0` is never `−0`), so the bits are the general
    /// scatter's.
    #[inline(always)]
    fn scatter_shifted<T: WithDType>(
        &self,
        cols: &mut [T],
        ci: usize,
        count: usize,
        dst: &mut [T],
    ) {
        let Self { op, h, w, .. } = *self;
        let (k, plane, zero) = (op.kernel, h * w, T::zero());
        let n = count * plane;
        for (tap, row) in cols[ci * k * k * n..(ci + 1) * k * k * n]
            .chunks_exact_mut(n.max(1))
            .enumerate()
        {
            let (ky, kx) = (tap / k, tap % k);
            let (xs, ys) = (op.valid(kx, w, w), op.valid(ky, h, h));
            if xs.is_empty() || ys.is_empty() || count == 0 {
                continue;
            }
            for image in row.chunks_exact_mut(plane) {
                image[..ys.start * w].fill(zero);
                image[ys.end * w..].fill(zero);
                for r in image[ys.start * w..ys.end * w].chunks_exact_mut(w) {
                    r[..xs.start].fill(zero);
                    r[xs.end..].fill(zero);
                }
            }
            let start = ys.start * w + xs.start;
            let end = (count - 1) * plane + (ys.end - 1) * w + xs.end;
            // Output `o` reads input `o + (ky − p)·w + kx − p`; the first valid one a pixel inside.
            let from = (ys.start + ky - op.padding) * w + xs.start + kx - op.padding;
            let src = &row[start..end];
            for (o, &v) in dst[from..from + src.len()].iter_mut().zip(src) {
                *o += v;
            }
        }
    }

    /// Adds channel `ci`'s `k·k` rows of `cols` (`count` images) into `dst` `[count, h, w]`,
    /// tap by tap in order.
    pub(crate) fn scatter_channel<T: WithDType>(
        &self,
        cols: &[T],
        ci: usize,
        count: usize,
        dst: &mut [T],
    ) {
        let Self {
            op, h, w, oh, ow, ..
        } = *self;
        let (k, n) = (op.kernel, count * oh * ow);
        for ky in 0..k {
            for kx in 0..k {
                let row = &cols[((ci * k + ky) * k + kx) * n..((ci * k + ky) * k + kx + 1) * n];
                let xs = op.valid(kx, w, ow);
                if xs.is_empty() {
                    continue;
                }
                for bi in 0..count {
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
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "kd-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let frame = self.on(l.shape().dims4()?)?;
        let shape = Shape::from((frame.depth(), frame.b * frame.pixels()));
        let out = float_storage!(s, "im2col", T => frame.gather_all(contiguous::<T>(s, l)?));
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let frame = self.on(l.shape().dims4()?)?;
        let shape = Shape::from((frame.depth(), frame.b * frame.pixels()));
        Ok((crate::gpu::im2col(&frame, s, l)?, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let frame = self.on(arg.dims4()?)?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&frame)?))
    }
}

impl CustomOp1 for Frame {
    fn name(&self) -> &'static str {
        "kd-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.c, self.b, self.h, self.w));
        let out = float_storage!(s, "col2im", T => self.scatter_all(contiguous::<T>(s, l)?));
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = Shape::from((self.c, self.b, self.h, self.w));
        Ok((crate::gpu::col2im(self, s, l)?, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::rand;
    use candle_core::{Device, Var};

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

    /// A stride-1 "same" convolution's columns, gathered as shifted planes, are the row-by-row
    /// path's, bit for bit — kernels as large as the plane or larger included (a 5×5 on 3×3).
    #[test]
    fn shifted_planes_gather_the_row_by_row_columns() {
        for (i, &(k, h, w)) in [
            (3, 5, 6),
            (5, 7, 7),
            (5, 3, 3),
            (3, 1, 4),
            (7, 2, 9),
            (1, 3, 3),
        ]
        .iter()
        .enumerate()
        {
            let op = Im2Col {
                kernel: k,
                stride: 1,
                padding: k / 2,
            };
            let f = op.on((2, 3, h, w)).unwrap();
            let x: Vec<f32> = rand(&[2, 3, h, w], 40 + i as u64)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let n = 2 * h * w;
            for row in 0..f.depth() {
                let tap = (row / (k * k), (row / k) % k, row % k);
                // Both must write every element (the columns' buffer is not zeroed first): a
                // NaN left behind would fail the comparison below or the zero check.
                let (mut shifted, mut by_rows) = (vec![f32::NAN; n], vec![-1f32; n]);
                f.gather_row_shifted(&x, tap, 1..3, &mut shifted);
                f.gather_row_by_rows(&x, tap, 1..3, &mut by_rows);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&shifted), bits(&by_rows), "case {i}, row {row}");
            }
        }
    }

    /// The shifted scatter gives the general scatter's bits, signed zeros and NaNs included, for
    /// every "same" geometry the teacher uses and the smallest planes.
    #[test]
    fn shifted_scatter_equals_the_general_one_to_the_bit() {
        let special = [-0.0f32, 0.0, f32::NAN, 1e30, -1e30];
        for (k, p, h, w) in [
            (3, 1, 7, 7),
            (3, 1, 14, 14),
            (5, 2, 7, 7),
            (5, 2, 3, 3),
            (3, 1, 1, 1),
            (3, 1, 2, 5),
        ] {
            let op = Im2Col {
                kernel: k,
                stride: 1,
                padding: p,
            };
            let (c, count) = (2, 3);
            let frame = op.on((c, count, h, w)).unwrap();
            let cols: Vec<f32> = rand(&[frame.depth(), count * h * w], 5)
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if i % 7 == 3 {
                        special[i / 7 % special.len()]
                    } else {
                        v as f32
                    }
                })
                .collect();
            for ci in 0..c {
                let mut general = vec![0.0f32; count * h * w];
                frame.scatter_channel(&cols, ci, count, &mut general);
                let mut shifted = vec![0.0f32; count * h * w];
                frame.scatter_own_channel(&mut cols.clone(), ci, count, &mut shifted);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&shifted),
                    bits(&general),
                    "{k}x{k} at {h}x{w}, channel {ci}"
                );
            }
        }
    }

    /// A convolution's timing label names its pass, kernel, stride and input size, and with
    /// `--by-layer` its channels.
    #[test]
    fn labels_name_the_shape_and_by_layer_the_channels() {
        let op = Im2Col {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let f = op.on((16, 4, 28, 28)).unwrap();
        assert_eq!(op.label("forward", f, None), "forward, 3×3/2 at 28×28");
        assert_eq!(
            op.label("backward", f, Some(48)),
            "backward, 3×3/2 at 28×28, 16 → 48 channels"
        );
    }

    /// A range of images gathers and scatters exactly the whole batch's columns for those
    /// images, bit for bit.
    #[test]
    fn image_ranges_match_the_whole_batch() {
        let op = Im2Col {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let (c, b, h, w) = (2, 5, 7, 6);
        let frame = op.on((c, b, h, w)).unwrap();
        let x = rand(&[c, b, h, w], 4);
        let all = frame.gather_all(&x);
        let (n, px) = (b * frame.pixels(), frame.pixels());
        // This thread's columns buffer, left full of other values: every element must be
        // written again, the padding's zeros included.
        drop(frame.gather(&vec![f64::NAN; x.len()], 0..b));
        let part = frame.gather(&x, 1..4);
        for row in 0..frame.depth() {
            assert_eq!(
                part[row * 3 * px..(row + 1) * 3 * px],
                all[row * n + px..row * n + 4 * px]
            );
        }
        let dx_all = frame.scatter_all(&all);
        let plane = h * w;
        let mut dx_part = vec![0.0; c * 3 * plane];
        for (ci, dst) in dx_part.chunks_mut(3 * plane).enumerate() {
            frame.scatter_channel(&part, ci, 3, dst);
        }
        for ci in 0..c {
            assert_eq!(
                dx_part[ci * 3 * plane..(ci + 1) * 3 * plane],
                dx_all[(ci * b + 1) * plane..(ci * b + 4) * plane]
            );
        }
    }
}
