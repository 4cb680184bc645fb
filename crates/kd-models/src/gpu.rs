//! The CUDA side of our ops (`--features cuda`): launches the kernels of `cuda/kernels.cu`
//! (compiled to PTX by `build.rs`) on candle's CUDA storage, for the custom ops whose CPU side
//! lives beside them (im2col and col2im in [`crate::im2col`], the pools in [`crate::pool`],
//! bias + ReLU in [`crate::conv`], BatchNorm + ReLU in [`crate::portable`], Adam in
//! [`crate::adam`]).
//!
//! The rest of a network on the GPU is candle's own CUDA ops ([`crate::portable`]): the
//! products (cuBLAS), BatchNorm's statistics, ReLU, concatenation, the heads.
//!
//! Every kernel writes each output element exactly once and sums in a fixed order, so a run is
//! repeatable to the bit on the same GPU.

use crate::im2col::Frame;
use crate::pool::{Pool2d, PoolKind};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Storage, Tensor};

/// The PTX of `cuda/kernels.cu`, loaded once per device under [`MODULE`].
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kd_kernels.ptx"));
const MODULE: &str = "kd-models";

/// A convolution's geometry as the kernels read it (`struct Conv` in kernels.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ConvArgs {
    c: i32,
    b: i32,
    h: i32,
    w: i32,
    k: i32,
    stride: i32,
    pad: i32,
    oh: i32,
    ow: i32,
}

// SAFETY: plain `#[repr(C)]` integers, the layout of `struct Conv` in kernels.cu.
unsafe impl DeviceRepr for ConvArgs {}

/// A pool's geometry as the kernels read it (`struct Pool` in kernels.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PoolArgs {
    planes: i32,
    h: i32,
    w: i32,
    oh: i32,
    ow: i32,
    k: i32,
    stride: i32,
    pad: i32,
    is_max: i32,
}

// SAFETY: plain `#[repr(C)]` integers, the layout of `struct Pool` in kernels.cu.
unsafe impl DeviceRepr for PoolArgs {}

/// `usize` → the kernels' `int`, refusing what does not fit.
fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        candle_core::Error::Msg(format!("{what} {v} is too large for the GPU kernels"))
    })
}

fn conv_args(f: &Frame) -> Result<ConvArgs> {
    let (oh, ow) = f.out_size();
    Ok(ConvArgs {
        c: int(f.c, "channels")?,
        b: int(f.b, "batch")?,
        h: int(f.h, "height")?,
        w: int(f.w, "width")?,
        k: int(f.op.kernel, "kernel")?,
        stride: int(f.op.stride, "stride")?,
        pad: int(f.op.padding, "padding")?,
        oh: int(oh, "output height")?,
        ow: int(ow, "output width")?,
    })
}

/// `cols [c·k·k, b·oh·ow]` of `x [c, b, h, w]`.
pub(crate) fn im2col(f: &Frame, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let len = f.depth() * f.b * f.pixels();
    launch("kd_im2col", &[(s, l)], len, conv_args(f)?)
}

/// `dx [c, b, h, w]` of the columns' gradient `[c·k·k, b·oh·ow]`.
pub(crate) fn col2im(f: &Frame, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let len = f.c * f.b * f.h * f.w;
    launch("kd_col2im", &[(s, l)], len, conv_args(f)?)
}

/// A pool's geometry on `planes` planes of `h × w` → `oh × ow`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planes {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
}

fn pool_args(p: &Pool2d, g: Planes) -> Result<PoolArgs> {
    Ok(PoolArgs {
        planes: int(g.planes, "planes")?,
        h: int(g.h, "height")?,
        w: int(g.w, "width")?,
        oh: int(g.oh, "output height")?,
        ow: int(g.ow, "output width")?,
        k: int(p.kernel, "kernel")?,
        stride: int(p.stride, "stride")?,
        pad: int(p.padding, "padding")?,
        is_max: i32::from(p.kind == PoolKind::Max),
    })
}

/// The pooled planes `[planes, oh, ow]`.
pub(crate) fn pool_forward(
    p: &Pool2d,
    g: Planes,
    s: &CudaStorage,
    l: &Layout,
) -> Result<CudaStorage> {
    let len = g.planes * g.oh * g.ow;
    launch("kd_pool_forward", &[(s, l)], len, pool_args(p, g)?)
}

/// The input gradient `[planes, h, w]` from the input, the output and the output's gradient.
pub(crate) fn pool_backward(
    p: &Pool2d,
    g: Planes,
    inputs: [(&CudaStorage, &Layout); 3],
) -> Result<CudaStorage> {
    let len = g.planes * g.h * g.w;
    launch("kd_pool_backward", &inputs, len, pool_args(p, g)?)
}

/// Runs `kernel(inputs…, out, args)` over `len` f32 outputs, one thread per output (a grid-stride
/// loop past the grid's size).
fn launch<A: DeviceRepr>(
    kernel: &str,
    inputs: &[(&CudaStorage, &Layout)],
    len: usize,
    args: A,
) -> Result<CudaStorage> {
    let Some((first, _)) = inputs.first() else {
        candle_core::bail!("{kernel}: no input");
    };
    let dev = first.device().clone();
    let views = inputs
        .iter()
        .map(|&input| view(input, kernel))
        .collect::<Result<Vec<_>>>()?;
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    // SAFETY: the kernel writes every one of the `len` elements before anything reads them.
    let out = unsafe { dev.alloc::<f32>(len.max(1))? };
    let mut builder = func.builder();
    for v in &views {
        builder.arg(v);
    }
    builder.arg(&out);
    builder.arg(&args);
    // SAFETY: the arguments match the kernel's signature in kernels.cu (f32 pointers, the
    // output, the geometry struct by value); every index the kernel reads is inside its input.
    unsafe { builder.launch(grid(len)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// A channels-first tensor's rows (`struct Rows` in kernels.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RowsArgs {
    c: i32,
    n: i32,
}

// SAFETY: plain `#[repr(C)]` integers, the layout of `struct Rows` in kernels.cu.
unsafe impl DeviceRepr for RowsArgs {}

/// An element-wise kernel over `[c, n]` from two inputs: `kd_bias_relu` (`z`, the bias `[c]`:
/// `max(0, z + b)` per channel) or `kd_relu_pass` (`y`, `dy`: `dy` where `y > 0`, else 0).
pub(crate) fn rows(
    kernel: &str,
    (c, n): (usize, usize),
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let args = RowsArgs {
        c: int(c, "channels")?,
        n: int(n, "elements per channel")?,
    };
    launch(kernel, &[a, b], c * n, args)
}

// SAFETY: `#[repr(C)]` f32s in the order of `struct Adam` in kernels.cu.
unsafe impl DeviceRepr for crate::adam::AdamStep {}

/// One variable for [`adam_all`]: its weights, gradient and moments `[m; v]`, each f32 and
/// contiguous, on one CUDA device.
pub(crate) struct AdamSlot<'a> {
    pub weights: &'a Tensor,
    pub grad: &'a Tensor,
    pub moments: &'a Tensor,
}

/// The device address of `t`'s first element.
fn address(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        candle_core::bail!("a tensor for an in-place kernel is not on a CUDA device");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("a tensor for an in-place kernel is not contiguous");
    }
    let (base, _record) = storage.as_cuda_slice::<f32>()?.device_ptr(stream);
    Ok(base + 4 * layout.start_offset() as u64)
}

/// Adam's update of every slot in one launch of `kd_adam_all`, in place: the moments, then the
/// weights. The table of addresses travels to the device first (one small copy).
pub(crate) fn adam_all(
    dev: &CudaDevice,
    slots: &[AdamSlot],
    args: crate::adam::AdamStep,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let mut table = Vec::with_capacity(5 * slots.len());
    let mut total = 0u64;
    for s in slots {
        let n = s.weights.elem_count() as u64;
        table.extend([
            address(s.weights, &stream)?,
            address(s.moments, &stream)?,
            address(s.grad, &stream)?,
            total,
            n,
        ]);
        total += n;
    }
    if total == 0 {
        return Ok(());
    }
    let table = dev.clone_htod(&table)?;
    let count = int(slots.len(), "variables")?;
    let total_i64 = total as i64;
    let func = dev.get_or_load_custom_func("kd_adam_all", MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(&table);
    builder.arg(&count);
    builder.arg(&total_i64);
    builder.arg(&args);
    // SAFETY: the arguments match `kd_adam_all`'s signature; every address in the table is
    // the start of a live contiguous f32 buffer of the recorded length (the moments twice it),
    // checked by the caller, and the tensors outlive the call. The launch is ordered on the
    // device's one stream, after every launch that wrote the gradients and before any later
    // use of the weights (event tracking is off: `kd_models::device::open_cuda`).
    unsafe { builder.launch(grid(total as usize)) }.w()?;
    Ok(())
}

/// One thread per element, 256 a block, a grid-stride loop past 2^20 blocks.
fn grid(len: usize) -> LaunchConfig {
    let threads = 256u32;
    LaunchConfig {
        grid_dim: (
            len.div_ceil(threads as usize).clamp(1, 1 << 20) as u32,
            1,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// BatchNorm's sizes and ε (`struct Norm` in kernels.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct NormArgs {
    c: i32,
    n: i32,
    eps: f32,
}

// SAFETY: plain `#[repr(C)]` numbers, the layout of `struct Norm` in kernels.cu.
unsafe impl DeviceRepr for NormArgs {}

/// One block of `BN_THREADS` per channel, for the reductions.
fn per_channel(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A contiguous f32 input as a view.
fn view<'a>(
    (s, l): (&'a CudaStorage, &Layout),
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<f32>()?.slice(a..b)),
        None => candle_core::bail!("{what}: not contiguous"),
    }
}

fn norm_args((c, n, eps): (usize, usize, f32)) -> Result<NormArgs> {
    Ok(NormArgs {
        c: int(c, "channels")?,
        n: int(n, "values per channel")?,
        eps,
    })
}

/// BatchNorm + ReLU forward: `[y (c·n); mean (c); variance (c)]` from `z [c, n]` and `[γ; β]`.
pub(crate) fn bn_forward(
    z: (&CudaStorage, &Layout),
    gb: (&CudaStorage, &Layout),
    dims: (usize, usize, f32),
) -> Result<CudaStorage> {
    let (c, n, _) = dims;
    let args = norm_args(dims)?;
    let dev = z.0.device().clone();
    let (z, gb) = (view(z, "batch-norm z")?, view(gb, "batch-norm γ, β")?);
    // SAFETY: the two kernels write all c·n + 2c values before anything reads them.
    let out = unsafe { dev.alloc::<f32>(c * n + 2 * c)? };
    let (y, stats) = (out.slice(0..c * n), out.slice(c * n..));
    let stats_fn = dev.get_or_load_custom_func("kd_bn_stats", MODULE, PTX)?;
    let mut b = stats_fn.builder();
    b.arg(&z);
    b.arg(&stats);
    b.arg(&args);
    // SAFETY: (z, stats, Norm) as kd_bn_stats takes them; one block per channel.
    unsafe { b.launch(per_channel(c)) }.w()?;
    let fwd = dev.get_or_load_custom_func("kd_bn_relu_forward", MODULE, PTX)?;
    let mut b = fwd.builder();
    b.arg(&z);
    b.arg(&gb);
    b.arg(&stats);
    b.arg(&y);
    b.arg(&args);
    // SAFETY: (z, γβ, stats, y, Norm) as kd_bn_relu_forward takes them.
    unsafe { b.launch(grid(c * n)) }.w()?;
    drop((y, stats));
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// BatchNorm + ReLU backward: `[dz (c·n); dγ (c); dβ (c)]` from `z`, `dy` and `[γ; β; mean;
/// variance]`.
pub(crate) fn bn_backward(
    [z, dy, params]: [(&CudaStorage, &Layout); 3],
    dims: (usize, usize, f32),
) -> Result<CudaStorage> {
    let (c, n, _) = dims;
    let args = norm_args(dims)?;
    let dev = z.0.device().clone();
    let (z, dy) = (view(z, "batch-norm z")?, view(dy, "batch-norm dy")?);
    let params = view(params, "batch-norm parameters")?;
    let (gb, stats) = (params.slice(0..2 * c), params.slice(2 * c..4 * c));
    // SAFETY: the two kernels write all c·n + 2c values before anything reads them.
    let out = unsafe { dev.alloc::<f32>(c * n + 2 * c)? };
    let (dz, sums) = (out.slice(0..c * n), out.slice(c * n..));
    let sums_fn = dev.get_or_load_custom_func("kd_bn_relu_sums", MODULE, PTX)?;
    let mut b = sums_fn.builder();
    b.arg(&z);
    b.arg(&dy);
    b.arg(&gb);
    b.arg(&stats);
    b.arg(&sums);
    b.arg(&args);
    // SAFETY: (z, dy, γβ, stats, sums, Norm) as kd_bn_relu_sums takes them; a block per channel.
    unsafe { b.launch(per_channel(c)) }.w()?;
    let dz_fn = dev.get_or_load_custom_func("kd_bn_relu_dz", MODULE, PTX)?;
    let mut b = dz_fn.builder();
    b.arg(&z);
    b.arg(&dy);
    b.arg(&gb);
    b.arg(&stats);
    b.arg(&sums);
    b.arg(&dz);
    b.arg(&args);
    // SAFETY: (z, dy, γβ, stats, sums, dz, Norm) as kd_bn_relu_dz takes them.
    unsafe { b.launch(grid(c * n)) }.w()?;
    drop((dz, sums));
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `struct Running` in kernels.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunningArgs {
    pub c: i32,
    pub keep: f32,
    pub momentum: f32,
    pub unbiased: f32,
}

// SAFETY: plain `#[repr(C)]` numbers, the layout of `struct Running` in kernels.cu.
unsafe impl DeviceRepr for RunningArgs {}

/// BatchNorm's running mean and variance moved in place towards the batch's `(mean, biased
/// variance)`, one launch (`kd_bn_running`); every tensor `[c]` f32 on `dev`.
pub(crate) fn bn_running(
    dev: &CudaDevice,
    (running_mean, running_var): (&Tensor, &Tensor),
    (mean, var): (&Tensor, &Tensor),
    args: RunningArgs,
) -> Result<()> {
    let c = usize::try_from(args.c).unwrap_or(0);
    for t in [running_mean, running_var, mean, var] {
        if t.elem_count() != c {
            candle_core::bail!(
                "batch-norm: {} running values for {c} channels",
                t.elem_count()
            );
        }
    }
    let stream = dev.cuda_stream();
    let (mean, var) = (mean.contiguous()?, var.contiguous()?);
    let addresses = [
        address(running_mean, &stream)?,
        address(running_var, &stream)?,
        address(&mean, &stream)?,
        address(&var, &stream)?,
    ];
    let func = dev.get_or_load_custom_func("kd_bn_running", MODULE, PTX)?;
    let mut builder = func.builder();
    for a in &addresses {
        builder.arg(a);
    }
    builder.arg(&args);
    // SAFETY: the arguments match `kd_bn_running`'s signature (four f32 addresses, passed as
    // 64-bit values, then the constants); each is a live contiguous buffer of `c` values
    // (checked above) that outlives the call, ordered on the device's one stream.
    unsafe { builder.launch(grid(c)) }.w()?;
    Ok(())
}
