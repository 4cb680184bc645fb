//! Convolution as matrix products, on activations laid out channels-first: `[c, batch, h, w]`.
//!
//! candle 0.11's CPU convolution backward is a direct loop for the input gradient
//! (`conv_transpose2d`, one `vec_dot` per pixel) and a GEMV-shaped convolution for the weight
//! gradient. Here a convolution is `W · im2col(x)`, worked through chunk by chunk of images
//! (each chunk one task on one thread, its columns small enough to stay in cache):
//! `y = W·cols` forward; `dW = Σ dy·colsᵀ` over the chunks, `dcols = Wᵀ·dy` and
//! `dx = col2im(dcols)` backward. In this layout a 1×1 convolution needs no im2col at all
//! (`cols` is `x` itself) and the output comes out in the layout the next layer reads, so no
//! transposes sit between layers. For f32 on CPUs with AVX2 and FMA, the k×k convolutions'
//! forward and `dx` skip the columns (`crate::implicit`), with the same bits.

use crate::cpu::{contiguous, float_storage, par_build};
use crate::gemm::{fresh_product, product, Block, Filling, View, Written};
use crate::im2col::Frame;
pub use crate::im2col::Im2Col;
use crate::implicit::{Direct, Implicit, Planes};
use crate::timing::{time, time_in_detail};
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use std::ops::Range;

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

    /// Convolutions of one geometry that read the same input, as one convolution: their weights
    /// and biases stacked on the output channels, in order (a missing bias stacks as zeros; none
    /// at all, none). Its output's channels are theirs, one after another (a narrow on the first
    /// axis takes each one's back, without a copy); the input is read once and the product has
    /// all their rows, where small convolutions each pay for reading it. The weights are copied:
    /// a loaded model stacks once, a model being trained at every step, where the concatenation
    /// is a node of the graph that hands each convolution its own gradient.
    pub fn stacked(convs: &[&Conv]) -> Result<Conv> {
        let Some(first) = convs.first() else {
            candle_core::bail!("stacking no convolutions");
        };
        let same = convs.iter().all(|c| {
            c.geometry == first.geometry && c.weight.dims()[1..] == first.weight.dims()[1..]
        });
        if !same {
            candle_core::bail!("stacking convolutions of different geometries or inputs");
        }
        let weights: Vec<&Tensor> = convs.iter().map(|c| &c.weight).collect();
        let bias = if convs.iter().all(|c| c.bias.is_none()) {
            None
        } else {
            let biases = convs
                .iter()
                .map(|c| match &c.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(c.cout, c.weight.dtype(), c.weight.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        };
        Ok(Conv {
            weight: Tensor::cat(&weights, 0)?,
            bias,
            geometry: first.geometry,
            cout: convs.iter().map(|c| c.cout).sum(),
        })
    }

    /// Whether the weights are fixed tensors (a loaded model), not variables being trained.
    pub fn is_frozen(&self) -> bool {
        !self.weight.is_variable() && !self.bias.as_ref().is_some_and(Tensor::is_variable)
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.cout
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

    /// `relu(conv(x) + bias)`: the bias and ReLU are the convolution's epilogue
    /// ([`ConvBiasRelu`]), applied to each chunk of images while it is in cache; the sum before
    /// the ReLU is never a tensor of the graph.
    pub fn forward_relu(&self, xs: &Tensor) -> Result<Tensor> {
        if crate::portable::active(xs) {
            return match &self.bias {
                Some(b) => crate::portable::bias_relu(&self.matmul(xs)?, b),
                None => crate::portable::relu(&self.matmul(xs)?),
            };
        }
        match &self.bias {
            Some(b) => {
                self.count_macs(xs)?;
                xs.contiguous()?
                    .apply_op3(&self.weight, b, ConvBiasRelu(self.geometry))
            }
            None => self.matmul(xs)?.relu(),
        }
    }

    /// `W · im2col(x)` as `[c_out, batch, oh, ow]`: one node of the autograd graph ([`ConvOp`]).
    pub(crate) fn matmul(&self, xs: &Tensor) -> Result<Tensor> {
        self.count_macs(xs)?;
        if crate::portable::active(xs) {
            return crate::portable::conv(xs, &self.weight, self.geometry);
        }
        xs.contiguous()?
            .apply_op2(&self.weight, ConvOp(self.geometry))
    }

    /// Adds this convolution's multiply-adds on `xs` to [`crate::macs`].
    fn count_macs(&self, xs: &Tensor) -> Result<()> {
        let (cin, b, h, w) = xs.dims4()?;
        let g = self.geometry;
        let (oh, ow) = (g.out_len(h)?, g.out_len(w)?);
        crate::macs::add(self.cout * cin * g.kernel * g.kernel * b * oh * ow);
        Ok(())
    }
}

/// A convolution as one op: `(x [c_in, b, h, w], weight [c_out, c_in, k, k]) → [c_out, b, oh,
/// ow]`, `y = W · cols` with `cols = im2col(x)` (`x` itself for a 1×1 convolution); its backward
/// is [`ConvBackward`].
///
/// As separate candle ops (im2col, reshapes, matmul) every intermediate was a node whose gradient
/// candle's backward pass zero-fills and adds into: for a 3×3 convolution a buffer nine times the
/// input's size, twice over. As one node only `dx` and `dW` are accumulated.
#[derive(Debug, Clone, Copy)]
struct ConvOp(Im2Col);

/// `[c_in, b, h, w]` and `[c_out, c_in, k, k]` checked against each other: the input's frame and
/// `c_out`.
fn conv_dims(op: Im2Col, x: &Shape, weight: &Shape) -> Result<(Frame, usize)> {
    let (cin, b, h, w) = x.dims4()?;
    let (cout, wcin, k1, k2) = weight.dims4()?;
    let k = op.kernel;
    if wcin != cin || k1 != k || k2 != k {
        candle_core::bail!("convolution: weight {weight:?} for a {k}x{k} kernel on {cin} channels");
    }
    Ok((op.on((cin, b, h, w))?, cout))
}

impl ConvOp {
    /// Chunk by chunk of images, each one task: its columns (cache-sized, where the whole
    /// batch's are tens of megabytes) and `W · cols` on one thread, written straight into the
    /// chunk's columns of the output (a [`Block`]), the bias and ReLU applied there while it is
    /// in cache.
    fn run<T: Implicit>(
        &self,
        (x, weight, bias): (&[T], &[T], Option<&[T]>),
        f: Frame,
        cout: usize,
    ) -> Result<Vec<T>> {
        let (n, depth, px) = (f.b * f.pixels(), f.depth(), f.pixels());
        let chunks = forward_chunks(&f);
        let direct = T::implicit(&f, weight, cout);
        let mut out = Filling::new(cout, n, columns(&chunks, px), 0)?;
        let blocks = out.blocks()?;
        let detail = || Some((self.0.detail("forward", f, cout), (cout * depth * n) as u64));
        let kind = "convolution forward (per chunk of images)";
        let written = time_in_detail(kind, detail, || {
            chunks
                .par_iter()
                .zip(blocks)
                .map(|(images, mut y)| {
                    let cn = images.len() * px;
                    if let Some(direct) = &direct {
                        let planes = Planes {
                            data: &x[images.start * px..],
                            channel: n,
                        };
                        T::implicit_chunk(direct, planes, images.len(), &mut y)?;
                    } else {
                        let gathered;
                        let cols = if self.0.is_pointwise() {
                            View::rows(&x[images.start * px..], depth, cn, n)
                        } else {
                            gathered = T::columns(&f, x, images.clone())?;
                            View::rows(&gathered, depth, cn, cn)
                        };
                        y.product(View::rows(weight, cout, depth, depth), cols)?;
                    }
                    if let Some(bias) = bias {
                        for (co, &b) in bias.iter().enumerate() {
                            bias_relu_row(y.row(co), b);
                        }
                    }
                    y.written()
                })
                .collect::<Result<Vec<_>>>()
        })?;
        out.finish(written)
    }
}

/// The batch `0..b` in chunks of [`IMAGES_PER_CHUNK`] images, the last one shorter.
fn image_chunks(b: usize) -> Vec<Range<usize>> {
    chunks_of(b, IMAGES_PER_CHUNK)
}

/// The batch `0..b` in chunks of `per` images, the last one shorter.
fn chunks_of(b: usize, per: usize) -> Vec<Range<usize>> {
    (0..b)
        .step_by(per.max(1))
        .map(|s| s..(s + per.max(1)).min(b))
        .collect()
}

/// The fewest columns (images × output pixels) a task of the forward multiplies where the
/// planes are small: chunks of [`IMAGES_PER_CHUNK`] images were 72 columns at 3×3 and 392 at 7×7,
/// products so short that packing the weights for each cost about as much as the product.
const FORWARD_COLUMNS: usize = 1568;

/// The most values a forward task's columns hold (2 MiB of f32) where the planes are large: 8
/// images of the stem's 3×3 at 28×28 (16 input channels) were 903,168 (3.6 MB), written by
/// im2col and read back by the product from beyond L2; 4 images fit.
const FORWARD_COLUMN_VALUES: usize = 1 << 19;

/// The forward's chunks of images: [`IMAGES_PER_CHUNK`], fewer where their columns would exceed
/// [`FORWARD_COLUMN_VALUES`], more where they would be under [`FORWARD_COLUMNS`]; at least one
/// chunk per thread of the pool where the batch allows. The forward's bits do not depend on the
/// chunks (each output column is its own sum; the smoke pipeline's bytes are the same).
/// Measured against chunks of 8, alternating (`docs/speed.md`, seventeenth round).
fn forward_chunks(f: &Frame) -> Vec<Range<usize>> {
    let (b, depth, px) = (f.b, f.depth().max(1), f.pixels().max(1));
    let per = if depth * px * IMAGES_PER_CHUNK > FORWARD_COLUMN_VALUES {
        FORWARD_COLUMN_VALUES / (depth * px)
    } else {
        IMAGES_PER_CHUNK.max(FORWARD_COLUMNS / px)
    };
    let most = b.div_ceil(rayon::current_num_threads().max(1)).max(1);
    chunks_of(b, per.clamp(1, most))
}

/// The columns of each chunk of images in a `[c, batch·plane]` matrix.
fn columns(chunks: &[Range<usize>], plane: usize) -> Vec<Range<usize>> {
    chunks
        .iter()
        .map(|r| r.start * plane..r.end * plane)
        .collect()
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
        let (f, cout) = conv_dims(self.0, l1.shape(), l2.shape())?;
        let (oh, ow) = f.out_size();
        let shape = Shape::from((cout, f.b, oh, ow));
        let out = float_storage!(s1, "convolution", T => {
            let (x, w) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            self.run((x, w, None), f, cout)?
        });
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(self.0, x, weight, grad, None)?;
        Ok((dx, Some(dw)))
    }
}

/// `(dx, dW, dbias)` of a convolution (with its bias and ReLU when `relu_output` is `y =
/// relu(conv(x) + bias)`, then `grad` is `y`'s) through [`ConvBackward`]. No `dx` for an input
/// that needs no gradient (the images, the first convolution's input).
fn backward(
    geometry: Im2Col,
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    relu_output: Option<&Tensor>,
) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    let op = ConvBackward {
        geometry,
        input_gradient: x.track_op(),
        relu_output: relu_output.cloned(),
    };
    let detail = || {
        let (f, cout) = conv_dims(geometry, x.shape(), weight.shape()).ok()?;
        let passes = 1 + usize::from(op.input_gradient);
        let macs = passes * cout * f.depth() * f.b * f.pixels();
        Some((geometry.detail("backward", f, cout), macs as u64))
    };
    let kind = "convolution backward (per chunk of images)";
    let all = time_in_detail(kind, detail, || {
        x.apply_op3_no_bwd(weight, &grad.contiguous()?, &op)
    })?;
    let nx = if op.input_gradient { x.elem_count() } else { 0 };
    let nw = weight.elem_count();
    let dx = if op.input_gradient {
        Some(all.narrow(0, 0, nx)?.reshape(x.shape())?)
    } else {
        None
    };
    let dw = all.narrow(0, nx, nw)?.reshape(weight.shape())?;
    let db = relu_output
        .map(|_| all.narrow(0, nx + nw, all.elem_count() - nx - nw))
        .transpose()?;
    Ok((dx, dw, db))
}

/// `relu(conv(x) + bias)` as one op, `(x, weight, bias)`: the bias and ReLU applied to each
/// chunk's output in cache, with the bits of [`ConvOp`] followed by [`BiasRelu`]. Its backward
/// masks `dy` chunk by chunk inside the convolution's backward ([`ConvBackward`]), so the
/// gradient before the ReLU is never a whole tensor: `dx` and `dW` keep the separate ops' bits,
/// and `dbias` is summed per chunk of images, the chunks' sums added in order.
#[derive(Debug, Clone, Copy)]
struct ConvBiasRelu(Im2Col);

impl CustomOp3 for ConvBiasRelu {
    fn name(&self) -> &'static str {
        "kd-conv2d-bias-relu"
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
        let (f, cout) = conv_dims(self.0, l1.shape(), l2.shape())?;
        if l3.shape().dims() != [cout] {
            candle_core::bail!("convolution: bias {:?} for {cout} channels", l3.shape());
        }
        let (oh, ow) = f.out_size();
        let op = ConvOp(self.0);
        let out = float_storage!(s1, "convolution", T => {
            let (x, w) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            op.run((x, w, Some(contiguous::<T>(s3, l3)?)), f, cout)?
        });
        Ok((out, Shape::from((cout, f.b, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(self.0, x, weight, grad, Some(res))?;
        Ok((dx, Some(dw), db))
    }
}

/// Images per task of the convolution's backward, and the forward's where its columns are
/// neither too many nor too few ([`forward_chunks`]). Fixed in the backward, so that the weight
/// gradient's sum — one partial product per chunk, added in chunk order — does not depend on the
/// thread count.
const IMAGES_PER_CHUNK: usize = 8;

/// The convolution's backward, `(x, weight, dy [c_out, b, oh, ow]) → [dx, dW]` flattened into
/// one vector (`[dW]` alone without `input_gradient`). Each chunk of [`IMAGES_PER_CHUNK`] images
/// is one task on one thread: its columns (gathered again rather than kept from the forward),
/// `dW_chunk = dy_chunk · colsᵀ` (mostly computed transposed, see [`DwLayout`]),
/// `dcols = Wᵀ · dy_chunk` and `dx_chunk = col2im(dcols)`, all in buffers the size of a chunk
/// (`dx` without `dcols` and col2im where [`Implicit::implicit_gradient`] has a kernel).
///
/// With `relu_output` (`y = relu(conv(x) + bias)`, [`ConvBiasRelu`]) `dy` is `y`'s gradient:
/// each chunk first masks its columns, `dz = dy·[y > 0]` (PyTorch's ReLU rule), into a buffer of
/// its own and sums its rows for the bias, and the result ends with `dbias`. A separate pass wrote
/// the whole `dz` to memory and the products read it back.
///
/// `dW` reduces over every pixel of the batch (100,352 terms for 128 images of 28×28) into a small
/// matrix, which `gemm` splits between threads by rows and columns only: as one product it ran on
/// one thread. Chunks give every thread its share of the reduction.
#[derive(Debug, Clone)]
struct ConvBackward {
    geometry: Im2Col,
    /// Whether `dx` is computed (not for a network's input, the images).
    input_gradient: bool,
    /// The output of a convolution with its bias and ReLU, whose gradient `dy` is.
    relu_output: Option<Tensor>,
}

/// The backward's inputs: the convolution's input and weight, its output's gradient and, with a
/// ReLU, its output.
#[derive(Clone, Copy)]
struct BackwardInputs<'a, T> {
    x: &'a [T],
    weight: &'a [T],
    dy: &'a [T],
    y: Option<&'a [T]>,
}

/// The weight gradient's shape, `c_out × depth`, and whether the chunks compute it transposed:
/// `dWᵀ = cols · dyᵀ` (`depth × c_out`, row-major) rather than `dW = dy · colsᵀ`, which they do
/// when `depth > c_out`, as in most of GoogLeNet's convolutions. The bits are the same (`gemm`
/// adds over the columns in the same order either way), but `gemm`'s speed follows the
/// destination's layout, and it ran these products faster into `depth × c_out`. One thread,
/// `dW`'s product alone (temporary timers), 2 alternating rounds, ms per batch: 3×3 at 28×28
/// (16 → 48 channels) 21.3 / 19.0 → 17.0 / 14.8; 3×3 at 14×14 (32 → 48) 9.8 / 9.3 → 7.4 / 6.9;
/// 5×5 at 7×7 (6 → 16) 1.4 → 0.7. Where `c_out ≥ depth` (the 1×1s at 14×14 with 44 and 72
/// outputs from 48 and 64 inputs) it was slower (1.5 / 2.9 → 1.7 / 3.4). `docs/speed.md`,
/// fourteenth round.
#[derive(Clone, Copy)]
struct DwLayout {
    cout: usize,
    transposed: bool,
}

/// What one chunk of the backward returns: its share of `dW`, of `dbias` (with a ReLU) and the
/// proof that its `dx` block is written (with `input_gradient`).
type ChunkParts<T> = (Vec<T>, Vec<T>, Option<Written>);

impl ConvBackward {
    /// Chunk by chunk of images, each one task: its share of `dW` and `dbias` (added in chunk
    /// order afterwards) and, with `input_gradient`, its images' `dx` written straight into their
    /// columns of the result (a [`Block`]). The result is `[dx; dW; dbias]`, flat.
    fn run<T: Implicit>(
        &self,
        inputs: BackwardInputs<'_, T>,
        f: Frame,
        cout: usize,
    ) -> Result<Vec<T>> {
        let chunks = image_chunks(f.b);
        let direct = if self.input_gradient {
            T::implicit_gradient(&f, inputs.weight, cout)
        } else {
            None
        };
        let plane = f.h * f.w;
        let dw_len = cout * f.depth();
        let dw_layout = DwLayout {
            cout,
            transposed: f.depth() > cout,
        };
        let db_len = if inputs.y.is_some() { cout } else { 0 };
        // `dx` (when needed) is built in place, with room for `dW` and `dbias` after it.
        let mut dx = if self.input_gradient {
            Some(Filling::new(
                f.c,
                f.b * plane,
                columns(&chunks, plane),
                dw_len + db_len,
            )?)
        } else {
            None
        };
        let dx_blocks: Vec<Option<Block<T>>> = match &mut dx {
            Some(dx) => dx.blocks()?.into_iter().map(Some).collect(),
            None => (0..chunks.len()).map(|_| None).collect(),
        };
        let parts = chunks
            .par_iter()
            .zip(dx_blocks)
            .map(|(images, dx)| {
                let dx = dx.map(|block| (block, direct.as_ref()));
                self.chunk(inputs, f, dw_layout, images.clone(), dx)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut dw = vec![T::zero(); dw_len];
        let mut db = vec![T::zero(); db_len];
        let mut written = Vec::with_capacity(parts.len());
        for (dw_part, db_part, w) in parts {
            add_into(&mut dw, &dw_part);
            add_into(&mut db, &db_part);
            written.extend(w);
        }
        let mut out = match dx {
            Some(dx) => dx.finish(written)?,
            None => Vec::with_capacity(dw_len + db_len),
        };
        if dw_layout.transposed {
            // `dW` row by row from its `depth × cout` transpose: a column of it each (two
            // divisions per element cost 0.8% of a `googlenet-bn` step's CPU time).
            out.reserve(dw_len);
            for co in 0..cout {
                out.extend(dw.iter().skip(co).step_by(cout));
            }
        } else {
            out.extend_from_slice(&dw);
        }
        out.extend_from_slice(&db);
        Ok(out)
    }

    /// One chunk: its `dW` share (in `dw`'s layout) and `dbias` share, and its `dx` written into
    /// `dx` (with the block's proof).
    fn chunk<T: Implicit>(
        &self,
        BackwardInputs { x, weight, dy, y }: BackwardInputs<'_, T>,
        f: Frame,
        DwLayout { cout, transposed }: DwLayout,
        images: Range<usize>,
        dx: Option<(Block<'_, T>, Option<&Direct>)>,
    ) -> Result<ChunkParts<T>> {
        let (n, depth, px) = (f.b * f.pixels(), f.depth(), f.pixels());
        let cn = images.len() * px;
        let at = images.start * px..images.end * px;
        let masked;
        let copied;
        let (dy, db) = match y {
            // `dyᵀ` as the product's right operand is packed a few values from each of its rows
            // at a time: rows 100 KB apart (14×14 and 28×28 planes, 128 images) thrash L1 (see
            // `sets_alias`). Read from a copy of its columns, `dW`'s product at 28×28 took 15–17
            // ms per batch instead of 27–29.
            None if transposed && sets_alias::<T>(n, cout) => {
                copied = columns_of(dy, n, at.clone());
                (View::rows(&copied, cout, cn, cn), Vec::new())
            }
            None => (View::rows(&dy[at.start..], cout, cn, n), Vec::new()),
            Some(y) => {
                let db;
                (masked, db) = relu_masked_columns((y, dy), n, at.clone());
                (View::rows(&masked, cout, cn, cn), db)
            }
        };
        let pointwise = self.geometry.is_pointwise();
        let (copied_x, gathered);
        let cols = if pointwise && !sets_alias::<T>(n, depth) {
            View::rows(&x[images.start * px..], depth, cn, n)
        } else if pointwise {
            // A 1×1 input whose rows would thrash the cache: a copy of its columns, one `memcpy`
            // per row (im2col's zero fill and per-image copies took 2.5 ms more per batch for
            // the 1×1s at 14×14, 1 thread: 15.1–18.3 → 13.6–15.5 ms in 4 alternating rounds).
            copied_x = columns_of(x, n, at);
            View::rows(&copied_x, depth, cn, cn)
        } else {
            // k×k taps.
            gathered = T::columns(&f, x, images.clone())?;
            View::rows(&gathered, depth, cn, cn)
        };
        let mut dw = vec![T::zero(); cout * depth];
        if transposed {
            product(&mut dw, cout, cols, dy.t())?;
        } else {
            product(&mut dw, depth, dy, cols.t())?;
        }
        let Some((mut dx, direct)) = dx else {
            return Ok((dw, db, None));
        };
        let w = View::rows(weight, cout, depth, depth);
        if pointwise {
            dx.product(w.t(), dy)?;
        } else if let Some(direct) = direct {
            let planes = Planes {
                data: dy.data,
                channel: dy.row,
            };
            T::implicit_chunk(direct, planes, images.len(), &mut dx)?;
        } else {
            let mut dcols = fresh_product(w.t(), dy)?;
            dx.zero();
            for ci in 0..f.c {
                f.scatter_own_channel(&mut dcols, ci, images.len(), dx.row(ci));
            }
        }
        Ok((dw, db, Some(dx.written()?)))
    }
}

/// Whether `rows` rows `n` elements apart thrash the L1 cache when read side by side: a stride
/// that is a multiple of 2 KiB maps every row to the same one or two of its 64 sets (4 KiB
/// apart), which hold 16 lines between them (8 ways each). `dW = dy · xᵀ` of a 1×1 convolution
/// reads a chunk's columns of all of `x`'s rows at once; at 14×14 (128 images: rows 100,352
/// bytes apart) with 64 input channels it ran at 40 GFLOP/s on one thread, and at 87 from a copy
/// of the chunk's columns, copy included. With 16 channels (the stem's 1×1 at 28×28) the copy
/// costs more than it saves. `gemm`'s bits do not depend on its operands' strides.
fn sets_alias<T>(n: usize, rows: usize) -> bool {
    rows > 16 && (n * std::mem::size_of::<T>()).is_multiple_of(2048)
}

/// Columns `at` of every row of the row-major matrix `m` (rows `n` apart), as a contiguous
/// matrix.
fn columns_of<T: WithDType>(m: &[T], n: usize, at: Range<usize>) -> Vec<T> {
    let mut out = Vec::with_capacity(m.len() / n.max(1) * at.len());
    for row in m.chunks_exact(n) {
        out.extend_from_slice(&row[at.clone()]);
    }
    out
}

/// `acc += part`, element by element.
fn add_into<T: WithDType>(acc: &mut [T], part: &[T]) {
    for (a, &v) in acc.iter_mut().zip(part) {
        *a += v;
    }
}

/// ReLU's gradient rule (PyTorch's): `dy` where the output `y` is positive, else zero (a NaN
/// gradient where the output is 0 is dropped).
#[inline(always)]
fn relu_pass<T: WithDType>(y: T, dy: T) -> T {
    let zero = T::zero();
    if y > zero {
        dy
    } else {
        zero
    }
}

/// A row's sum with candle's own row sum (`VecOps::vec_reduce_sum`, what `sum(1)` runs on each
/// contiguous row).
fn row_sum<T: WithDType>(row: &[T]) -> T {
    let mut sum = T::zero();
    // SAFETY: reads the `row.len()` elements of `row` and writes `sum`.
    #[allow(unsafe_code)]
    unsafe {
        T::vec_reduce_sum(row.as_ptr(), &mut sum, row.len())
    };
    sum
}

/// Columns `at` of the channel rows (`n` long) of `y` and `dy`, masked: `dz = dy·[y > 0]` as a
/// row-major `[c, at.len()]` matrix, and each of its rows' sum.
fn relu_masked_columns<T: WithDType>(
    (y, dy): (&[T], &[T]),
    n: usize,
    at: Range<usize>,
) -> (Vec<T>, Vec<T>) {
    let c = y.len() / n.max(1);
    let mut dz = Vec::with_capacity(c * at.len());
    let mut sums = Vec::with_capacity(c);
    for ci in 0..c {
        let row = ci * n + at.start..ci * n + at.end;
        let start = dz.len();
        let masked = y[row.clone()].iter().zip(&dy[row]);
        dz.extend(masked.map(|(&y, &g)| relu_pass(y, g)));
        sums.push(row_sum(&dz[start..]));
    }
    (dz, sums)
}

impl CustomOp3 for ConvBackward {
    fn name(&self) -> &'static str {
        "kd-conv2d-backward"
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
        let (f, cout) = conv_dims(self.geometry, l1.shape(), l2.shape())?;
        let nx = if self.input_gradient {
            l1.shape().elem_count()
        } else {
            0
        };
        let nb = if self.relu_output.is_some() { cout } else { 0 };
        let len = nx + l2.shape().elem_count() + nb;
        if l3.shape().elem_count() != cout * f.b * f.pixels() {
            candle_core::bail!("convolution backward: output gradient {:?}", l3.shape());
        }
        let relu_output = self.relu_output.as_ref().map(Tensor::storage_and_layout);
        let y_storage = match &relu_output {
            Some((_, l)) if l.shape() != l3.shape() => candle_core::bail!(
                "convolution backward: output {:?} for a gradient {:?}",
                l.shape(),
                l3.shape()
            ),
            Some((s, l)) => match &**s {
                Storage::Cpu(s) => Some((s, *l)),
                _ => candle_core::bail!("convolution backward: its output is not on the CPU"),
            },
            None => None,
        };
        let out = float_storage!(s1, "convolution backward", T => {
            let (x, w) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            let y = y_storage.map(|(s, l)| contiguous::<T>(s, l)).transpose()?;
            let dy = contiguous::<T>(s3, l3)?;
            self.run(BackwardInputs { x, weight: w, dy, y }, f, cout)?
        });
        Ok((out, Shape::from(len)))
    }
}

/// `(z [c, n], bias [c]) → max(0, z + bias)`, one pass, parallel over channels. Its gradient
/// passes where the output is positive (PyTorch's ReLU rule) and sums over `n` for the bias.
#[derive(Debug, Clone, Copy)]
pub struct BiasRelu;

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

/// `max(0, z + b)`, in `T`'s arithmetic. The zero is `T::zero()` (inlined) and not candle's
/// `T::from_f64(0.0)`, which is not inlined across crates: one call per element kept this loop
/// scalar, and the convolutions' bias + ReLU epilogue cost a fifth of their forward.
#[inline(always)]
fn bias_relu<T: WithDType>(z: T, b: T) -> T {
    let zero = T::zero();
    let y = z + b;
    if y > zero {
        y
    } else {
        zero
    }
}

/// [`bias_relu`] in place over one channel's row.
fn bias_relu_row<T: WithDType>(row: &mut [T], b: T) {
    for v in row {
        *v = bias_relu(*v, b);
    }
}

/// The gradients of `y = relu(z + bias)` from `y` and `dy`: `dz = dy·[y > 0]` (PyTorch's ReLU
/// rule) and `dbias = Σ dz` per channel. One task per channel writes its row of `dz` and sums the
/// row while it is in cache, with candle's own row sum (`VecOps::vec_reduce_sum`, what
/// `dz.sum(1)` runs on each contiguous row), so `dbias` has `sum(1)`'s bits on every CPU, where
/// `sum(1)` read all of `dz` again on one thread.
fn relu_bias_gradients(y: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    time("bias + ReLU (backward)", || {
        let (c, n) = rows(y.shape())?;
        if y.shape() != dy.shape() {
            candle_core::bail!(
                "bias-relu backward: shapes {:?} and {:?}",
                y.shape(),
                dy.shape()
            );
        }
        let dev = y.device();
        if n == 0 {
            return Ok((y.zeros_like()?, Tensor::zeros(c, y.dtype(), dev)?));
        }
        let dy = dy.contiguous()?;
        let (ys, yl) = y.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (Storage::Cpu(ys), Storage::Cpu(gs)) = (&*ys, &*gs) else {
            candle_core::bail!("bias-relu backward runs on the CPU");
        };
        fn run<T: WithDType>(y: &[T], g: &[T], n: usize) -> Result<(Vec<T>, Vec<T>)> {
            par_build(y.len(), n, |c, out| {
                let row = c * n..(c + 1) * n;
                let (y, g) = (&y[row.clone()], &g[row]);
                let masked = y.iter().zip(g).map(|(&y, &g)| relu_pass(y, g));
                out.fill_and_read(masked, row_sum)
            })
        }
        macro_rules! gradients {
            ($t:ty) => {{
                let (dz, db) = run(contiguous::<$t>(ys, yl)?, contiguous::<$t>(gs, gl)?, n)?;
                Ok((
                    Tensor::from_vec(dz, y.shape(), dev)?,
                    Tensor::from_vec(db, c, dev)?,
                ))
            }};
        }
        match (ys, gs) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => gradients!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => gradients!(f64),
            _ => candle_core::bail!("bias-relu backward supports f32 and f64, of one dtype"),
        }
    })
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
        fn run<T: WithDType>(z: &[T], b: &[T], n: usize) -> Result<Vec<T>> {
            time("bias + ReLU (forward)", || {
                let (out, _) = par_build(z.len(), n, |c, out| {
                    let (zr, bc) = (&z[c * n..(c + 1) * n], b[c]);
                    (out.fill(zr.iter().map(|&v| bias_relu(v, bc))), ())
                })?;
                Ok(out)
            })
        }
        let out = float_storage!(s1, "bias-relu", T => {
            run(contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?, n)?
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (c, n) = rows(l1.shape())?;
        if l2.shape().elem_count() != c {
            candle_core::bail!("bias-relu: bias {:?} for {c} channels", l2.shape());
        }
        let out = crate::gpu::rows("kd_bias_relu", (c, n), (s1, l1), (s2, l2))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _z: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dz, db) = if res.device().is_cpu() {
            relu_bias_gradients(res, grad)?
        } else {
            let dz = res.apply_op2_no_bwd(&grad.contiguous()?, &ReluPass)?;
            let (c, n) = rows(res.shape())?;
            let db = dz.reshape((c, n))?.sum(1)?;
            (dz, db)
        };
        Ok((Some(dz), Some(db)))
    }
}

/// `(y, dy) → dy·[y > 0]`: ReLU's gradient from its output, on a device other than the CPU
/// (whose [`relu_bias_gradients`] also sums the bias's gradient in the same pass).
#[derive(Debug, Clone, Copy)]
struct ReluPass;

impl CustomOp2 for ReluPass {
    fn name(&self) -> &'static str {
        "kd-relu-pass"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(y: &[T], dy: &[T]) -> Vec<T> {
            y.iter().zip(dy).map(|(&y, &g)| relu_pass(y, g)).collect()
        }
        let out = float_storage!(s1, "relu-pass", T => {
            run(contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?)
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::gpu::rows("kd_relu_pass", rows(l1.shape())?, (s1, l1), (s2, l2))?;
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
            // 1×1 on more than 16 channels whose rows lie a multiple of 2 KiB apart (16×16 planes
            // of f64): the backward copies each chunk's columns out (`sets_alias`).
            (24, 5, 1, 1, 0, 16, 16),
            (20, 6, 1, 1, 0, 16, 16),
            // `dW` transposed (`depth` 36 > 20 outputs) from a copy of `dy`'s chunk: 20 rows of
            // 16×16 planes of f64, a multiple of 2 KiB apart (`DwLayout`).
            (4, 20, 3, 1, 1, 16, 16),
        ];
        for (i, &(cin, cout, k, s, p, h, w)) in cases.iter().enumerate() {
            // Odd cases span several chunks of the backward, the last one short.
            let b = if i % 2 == 0 {
                3
            } else {
                2 * IMAGES_PER_CHUNK + 3
            };
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
            // An input that needs no gradient (the images) gets none, and the weight's is the same.
            let plain = swap_batch_and_channels(&x.as_tensor().detach()).unwrap();
            let g_plain = (swap_batch_and_channels(&conv.forward(&plain).unwrap()).unwrap()
                * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(g_plain.get(&plain).is_none(), "case {i}");
            let w_bits = |g: &candle_core::backprop::GradStore| {
                let t = g.get(wt.as_tensor()).unwrap().flatten_all().unwrap();
                t.to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                w_bits(&g_plain),
                w_bits(&g_ours),
                "case {i}: weight gradient"
            );
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

    /// The fused convolution + bias + ReLU gives the bits of the convolution followed by the
    /// separate bias + ReLU op, over several chunks of images: its output without gradients
    /// (inference), and with them its output and the input's and weight's gradients. The bias's
    /// is summed chunk by chunk (its documented order, to the bit) and agrees with the separate
    /// op's to f32 precision.
    #[test]
    fn fused_epilogue_keeps_the_bits() {
        let dev = Device::Cpu;
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        for (i, &(cin, cout, k, s, p)) in [(3, 5, 3, 1, 1), (4, 6, 1, 1, 0), (2, 3, 5, 2, 2)]
            .iter()
            .enumerate()
        {
            let (b, h, w) = (2 * IMAGES_PER_CHUNK + 5, 9, 8);
            let var = |shape: &[usize], seed| {
                let v: Vec<f32> = rand(shape, seed).iter().map(|&x| x as f32).collect();
                Var::from_vec(v, shape, &dev).unwrap()
            };
            let (wt, bias) = (
                var(&[cout, cin, k, k], 40 + i as u64),
                var(&[cout], 50 + i as u64),
            );
            let x = var(&[cin, b, h, w], 60 + i as u64);
            let conv = |tracked: bool| Conv {
                weight: if tracked {
                    wt.as_tensor().clone()
                } else {
                    wt.as_tensor().detach()
                },
                bias: Some(if tracked {
                    bias.as_tensor().clone()
                } else {
                    bias.as_tensor().detach()
                }),
                geometry: Im2Col {
                    kernel: k,
                    stride: s,
                    padding: p,
                },
                cout,
            };
            let separate = |c: &Conv, x: &Tensor| {
                c.matmul(x)
                    .unwrap()
                    .apply_op2(c.bias.as_ref().unwrap(), BiasRelu)
                    .unwrap()
            };
            // Inference: nothing tracked.
            let plain = x.as_tensor().detach();
            let (fused, apart) = (
                conv(false).forward_relu(&plain).unwrap(),
                separate(&conv(false), &plain),
            );
            assert_eq!(fused.dims(), apart.dims(), "case {i}");
            assert_eq!(bits(&fused), bits(&apart), "case {i}");
            assert!(bits(&fused).contains(&0), "case {i}: ReLU never cut");
            // Training: output and gradients.
            let probe = var(fused.dims(), 70 + i as u64);
            let grads = |y: &Tensor| {
                (y * probe.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (yf, ys) = (
                conv(true).forward_relu(x.as_tensor()).unwrap(),
                separate(&conv(true), x.as_tensor()),
            );
            assert_eq!(bits(&yf), bits(&ys), "case {i}: output");
            let (gf, gs) = (grads(&yf), grads(&ys));
            for (name, v) in [("input", &x), ("weight", &wt)] {
                let (a, b) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gs.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(bits(a), bits(b), "case {i}: {name} gradient");
            }
            let db = gf.get(bias.as_tensor()).unwrap();
            assert_eq!(
                bits(db),
                bits(&chunked_bias_gradient(&yf, probe.as_tensor())),
                "case {i}"
            );
            let apart = gs.get(bias.as_tensor()).unwrap();
            let d = max_rel_diff(
                &db.to_dtype(DType::F64).unwrap(),
                &apart.to_dtype(DType::F64).unwrap(),
            );
            assert!(d < 1e-5, "case {i}: bias gradient differs by {d}");
            // An input that needs no gradient (the images): the same weight and bias gradients.
            let gp = grads(&conv(true).forward_relu(&plain).unwrap());
            assert!(gp.get(&plain).is_none(), "case {i}");
            for v in [&wt, &bias] {
                let (a, b) = (
                    gp.get(v.as_tensor()).unwrap(),
                    gf.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(bits(a), bits(b), "case {i}: without the input's gradient");
            }
        }
    }

    /// `Σ dy·[y > 0]` per channel of `[c, b, h, w]` the way the fused backward adds it: each chunk
    /// of images' rows summed by candle's `sum(1)`, the chunks' sums added in order from zero.
    fn chunked_bias_gradient(y: &Tensor, dy: &Tensor) -> Tensor {
        let zeros = dy.zeros_like().unwrap();
        let dz = y
            .gt(&y.zeros_like().unwrap())
            .unwrap()
            .where_cond(dy, &zeros)
            .unwrap();
        let (c, b) = (dz.dim(0).unwrap(), dz.dim(1).unwrap());
        let mut sum = Tensor::zeros(c, dz.dtype(), dz.device()).unwrap();
        for start in (0..b).step_by(IMAGES_PER_CHUNK) {
            let len = IMAGES_PER_CHUNK.min(b - start);
            let chunk = dz.narrow(1, start, len).unwrap().contiguous().unwrap();
            sum = (sum + chunk.flatten_from(1).unwrap().sum(1).unwrap()).unwrap();
        }
        sum
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

    /// The GPU's backward of bias + ReLU (the mask op [`ReluPass`], then candle's row sum),
    /// here with the mask's CPU body, gives the fused CPU backward's bits.
    #[test]
    fn the_mask_then_a_row_sum_is_the_fused_backward() {
        let dev = Device::Cpu;
        let (c, n) = (7, 1001);
        let y = Tensor::from_vec(rand(&[c, n], 4), (c, n), &dev)
            .unwrap()
            .relu()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let dy = Tensor::from_vec(rand(&[c, n], 5), (c, n), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let (dz, db) = relu_bias_gradients(&y, &dy).unwrap();
        let dz2 = y.apply_op2_no_bwd(&dy, &ReluPass).unwrap();
        let db2 = dz2.sum(1).unwrap();
        let bits = |t: &Tensor| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&dz), bits(&dz2));
        assert_eq!(bits(&db), bits(&db2));
    }

    /// The fused mask and row sum give candle's bits: `dz` as a select (a NaN gradient where
    /// the output is 0 is dropped, a signed zero kept, a NaN where it passes carried into the
    /// sum) and `dbias` as `dz.sum(1)` adds, on rows whose length leaves a tail after candle's
    /// 32-lane blocks and whose sums depend on the order of addition.
    #[test]
    fn relu_bias_gradients_have_the_bits_of_a_mask_and_sum() {
        let dev = Device::Cpu;
        let shape = (6, 5, 7, 9);
        let len = 6 * 5 * 7 * 9;
        let y: Vec<f32> = rand(&[len], 4)
            .iter()
            .enumerate()
            .map(|(i, &v)| if i % 3 == 0 { 0.0 } else { v.abs() as f32 })
            .collect();
        let dy: Vec<f32> = rand(&[len], 5)
            .iter()
            .enumerate()
            .map(|(i, &v)| match i % 11 {
                // NaNs in the first channel's row only: the other rows' sums stay numbers.
                0 if i < 5 * 7 * 9 => f32::NAN,
                1 => -0.0,
                2 => v as f32 * 1e7,
                _ => v as f32 * 1e-3,
            })
            .collect();
        let y = Tensor::from_vec(y, shape, &dev).unwrap();
        let dy = Tensor::from_vec(dy, shape, &dev).unwrap();
        let (dz, db) = relu_bias_gradients(&y, &dy).unwrap();
        let zeros = dy.zeros_like().unwrap();
        let mask = y.gt(&y.zeros_like().unwrap()).unwrap();
        let dz_ref = mask.where_cond(&dy, &zeros).unwrap();
        let db_ref = dz_ref.flatten_from(1).unwrap().sum(1).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&dz), bits(&dz_ref));
        assert_eq!(bits(&db), bits(&db_ref));
        let db = db.to_vec1::<f32>().unwrap();
        assert!(db[0].is_nan() && db[1..].iter().all(|v| v.is_finite() && *v != 0.0));
    }

    /// The forward's chunks cover the batch once, in order: the stem's 3×3 at 28×28 (16
    /// channels) in chunks whose columns fit [`FORWARD_COLUMN_VALUES`]; 3×3 planes in chunks of
    /// at least [`FORWARD_COLUMNS`] columns; 14×14 in [`IMAGES_PER_CHUNK`]; never fewer chunks
    /// than threads where the batch allows.
    #[test]
    fn forward_chunks_fit_the_budget_and_cover_the_batch() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let same = Im2Col {
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        pool.install(|| {
            for (c, b, side, per) in [
                (16, 64, 28, 4),
                (48, 64, 3, 32),
                (32, 64, 14, 8),
                (16, 3, 28, 2),
            ] {
                let f = same.on((c, b, side, side)).unwrap();
                let chunks = forward_chunks(&f);
                let covered: Vec<usize> = chunks.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(covered, (0..b).collect::<Vec<_>>(), "{c}×{side}²");
                assert_eq!(chunks[0].len(), per, "{c}×{side}²");
                assert!(chunks.len() >= 2, "{c}×{side}²: one chunk for two threads");
                if side == 28 {
                    assert!(per * f.depth() * f.pixels() <= FORWARD_COLUMN_VALUES);
                }
                if side == 3 {
                    assert!(per * f.pixels() >= FORWARD_COLUMNS.min(b / 2 * f.pixels()));
                }
            }
        });
    }

    /// The forward's bits do not depend on its chunks: 9 images of the stem's shape (chunks of
    /// 4, 4, 1) give the bits of each image convolved alone (one chunk of 1).
    #[test]
    fn forward_bits_do_not_depend_on_the_chunks() {
        let dev = Device::Cpu;
        let (cin, cout, b) = (16, 8, 9);
        let values = |shape: &[usize], seed| -> Tensor {
            let v: Vec<f32> = rand(shape, seed).iter().map(|&x| x as f32).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let conv = Conv {
            weight: values(&[cout, cin, 3, 3], 81),
            bias: None,
            geometry: Im2Col {
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            cout,
        };
        let x = values(&[cin, b, 28, 28], 82);
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        let whole = conv.forward(&x).unwrap();
        let alone: Vec<Tensor> = (0..b)
            .map(|i| conv.forward(&x.narrow(1, i, 1).unwrap()).unwrap())
            .collect();
        let alone = Tensor::cat(&alone, 1).unwrap();
        assert_eq!(whole.dims(), alone.dims());
        assert_eq!(bits(&whole), bits(&alone));
    }
}

#[cfg(test)]
pub(crate) mod portable_tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// `(output, gradient of each input)` of `f` on Vars made of `inputs`, under the loss
    /// `Σ y · sin(0.37 k + 0.1)`.
    pub(crate) fn with_grads(
        f: impl Fn(&[Tensor]) -> Tensor,
        inputs: &[(Vec<f32>, Vec<usize>)],
    ) -> Vec<Vec<f32>> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|(v, s)| Var::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let n = y.elem_count() as u32;
        let k = Tensor::arange(0u32, n, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let lw = k
            .affine(0.37, 0.1)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(y.shape())
            .unwrap();
        let g = (&y * lw).unwrap().sum_all().unwrap().backward().unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![v(&y)];
        out.extend(ts.iter().map(|t| v(g.get(t).unwrap())));
        out
    }

    /// The GPU's convolution (our im2col, candle's product and its backward, our col2im) gives
    /// the fused CPU op's output and gradients to the bit, for the geometries the networks use.
    #[test]
    fn the_portable_convolution_has_the_fused_ops_bits() {
        for (k, s, p, h) in [
            (1, 1, 0, 7),
            (3, 1, 1, 7),
            (5, 1, 2, 7),
            (3, 1, 1, 14),
            (5, 1, 2, 4),
            (7, 2, 3, 16),
            (3, 2, 1, 9),
        ] {
            let (c, b, co) = (8, 6, 32);
            let x: Vec<f32> = (0..c * b * h * h)
                .map(|i| ((i as f32) * 0.913).sin())
                .collect();
            let w: Vec<f32> = (0..co * c * k * k)
                .map(|i| ((i as f32) * 0.531).cos())
                .collect();
            let geo = Im2Col {
                kernel: k,
                stride: s,
                padding: p,
            };
            let inputs = [(x, vec![c, b, h, h]), (w, vec![co, c, k, k])];
            let fused = with_grads(|t| t[0].apply_op2(&t[1], ConvOp(geo)).unwrap(), &inputs);
            let port = with_grads(
                |t| crate::portable::conv(&t[0], &t[1], geo).unwrap(),
                &inputs,
            );
            for (what, (a, b)) in ["output", "dx", "dW"].iter().zip(fused.iter().zip(&port)) {
                assert!(a == b, "{k}x{k}/s{s} pad {p} at {h}px: {what} differs");
            }
        }
    }
}
