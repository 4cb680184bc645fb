//! The forward and the input gradient of a k×k convolution (stride 1, the padding that keeps
//! the size: GoogLeNet's 3×3 and 5×5) without im2col or col2im, for f32 on x86-64 CPUs with AVX2
//! and FMA.
//!
//! Through im2col, a task gathers its chunk's columns (`[c·k·k, images·h·w]`, up to 2 MiB) and
//! `gemm` reads them back from beyond L2 to multiply them by the weights; the backward's `dcols`
//! goes out to memory for col2im to add up. Here a task builds the columns of 16 output pixels
//! at a time, a panel of at most 256 × 16 values that stays in L1, straight from the input with
//! masked loads (a tap that falls in the padding reads a zero), and multiplies it by each tile of
//! 6 output channels of the weights, packed once per call. Each output is summed in the order the
//! columns' path sums it ([`Order`]), so the bits are the same (test
//! `implicit_convolution_has_the_bits_of_the_columns`) wherever `gemm` sums a reduction in one
//! chain: up to its block of the reduction (at least 512 steps; all of the 28-px teachers' depths,
//! at most 432, but not `googlenet-224`'s deepest 3×3s and 5×5s, where the bits differ and are
//! still the same from run to run and thread count to thread count).
//!
//! The weight gradient still multiplies gathered columns with `gemm` (an outer product per panel
//! did not pay: `docs/speed.md`, twentieth round), but [`gather_columns`] gathers them with the
//! same masks, a row over all of a chunk's images at a time: `Frame::gather`'s values (test
//! `gathered_columns_are_im2cols`) without its calls per image and plane edge.
//!
//! Where the CPU has AVX-512, `gemm` runs 16-lane kernels, and through them im2col's path is as
//! fast as this one on the 28×28 and 14×14 planes; this one is used there only on planes of at
//! most 7×7 pixels ([`SMALL_PLANE`]). `KD_IMPLICIT=on` uses it on every plane there too, and
//! `KD_IMPLICIT=off` nowhere ([`ImplicitUse`]).

use crate::gemm::{Block, Runs};
use crate::im2col::{Columns, Frame};
use candle_core::{Result, WithDType};
use std::ops::Range;

/// Output channels per tile of the kernel (6 × 2 accumulators of 8 lanes).
const MR: usize = 6;
/// Output pixels per tile: two 8-lane registers.
const NR: usize = 16;
/// The most taps a pixel's word of masks holds (a 5×5 kernel has 25).
const MAX_TAPS: usize = 32;

/// Element types whose k×k convolutions can skip im2col.
pub(crate) trait Implicit: WithDType {
    /// `f`'s forward without im2col with these weights (`cout × c·k·k`), if this type and this
    /// CPU have a kernel for `f`'s geometry ([`Direct::forward`]).
    fn implicit(_f: &Frame, _weight: &[Self], _cout: usize) -> Option<Direct> {
        None
    }

    /// The input gradient of `f`'s convolution without `dcols` and col2im, if this type and
    /// this CPU have a kernel for its geometry ([`Direct::input_gradient`]).
    fn implicit_gradient(_f: &Frame, _weight: &[Self], _cout: usize) -> Option<Direct> {
        None
    }

    /// im2col's columns of `images` images of `x` for `f`'s convolution, if this type and this
    /// CPU have a kernel for its geometry ([`gather_columns`]); else [`Frame::gather`]'s.
    fn columns(f: &Frame, x: &[Self], images: Range<usize>) -> Result<Columns<Self>> {
        Ok(f.gather(x, images))
    }

    /// `d`'s convolution of `images` images of `x` into `y` ([`Direct::run`]).
    fn implicit_chunk(
        _d: &Direct,
        _x: Planes<'_, Self>,
        _images: usize,
        _y: &mut Block<'_, Self>,
    ) -> Result<()> {
        candle_core::bail!("no implicit convolution for {:?}", Self::DTYPE)
    }
}

impl Implicit for f64 {}

impl Implicit for f32 {
    fn implicit(f: &Frame, weight: &[f32], cout: usize) -> Option<Direct> {
        Direct::forward(f, weight, cout)
    }

    fn implicit_gradient(f: &Frame, weight: &[f32], cout: usize) -> Option<Direct> {
        Direct::input_gradient(f, weight, cout)
    }

    fn columns(f: &Frame, x: &[f32], images: Range<usize>) -> Result<Columns<f32>> {
        gather_columns(f, x, images.clone()).unwrap_or_else(|| Ok(f.gather(x, images)))
    }

    fn implicit_chunk(
        d: &Direct,
        x: Planes<'_, f32>,
        images: usize,
        y: &mut Block<'_, f32>,
    ) -> Result<()> {
        d.run(x, images, y)
    }
}

/// A chunk of images of an input laid out `[c, images, h, w]` inside `data`: channel `ci`'s
/// planes start at `ci · channel` (the chunk's first pixel), each image's plane after the last.
#[derive(Clone, Copy)]
pub(crate) struct Planes<'a, T> {
    pub data: &'a [T],
    pub channel: usize,
}

/// How a convolution's steps `p` (its panel's rows, its packed weights' steps) are ordered and
/// summed: `(ci, t)` as one chain of fused multiply-adds (the forward, as `gemm` sums the
/// gathered columns), or, per tap, `(t, ci)` with each tap's `c` steps one chain and the taps'
/// chains added in order from zero (the input gradient, as `dcols` and col2im sum them).
#[derive(Clone, Copy, PartialEq)]
enum Order {
    OneChain,
    ChainPerTap,
}

/// The fewest steps (`c·k·k`) worth a panel: the stem's first 3×3 (one input channel, 9
/// steps) built a panel and masks for every 16 pixels to run 9 steps on them, and its forward
/// took 1.9 ms per batch against 1.2 through im2col and `gemm` (medians of 6 alternating runs).
const MIN_DEPTH: usize = 16;

/// The most steps of a panel built at once (16 KiB of f32): with the 6 × `steps` weights of
/// a tile it stays in a 32 KiB L1. A whole panel of the input gradient of a 3×3 at 7×7 with 80
/// output channels (720 rows, 46 KB) did not: that convolution's backward took 15.7 ms per
/// batch against 12.6 through `dcols` and col2im, and 11.8 with panels of whole taps up to 256
/// steps (one `kd-bench --by-layer` run each).
const PANEL_STEPS: usize = 256;

/// A convolution without im2col: its geometry (the input's channels in `frame.c`) and its
/// weights packed in tiles.
pub(crate) struct Direct {
    frame: Frame,
    cout: usize,
    order: Order,
    /// `⌈cout / MR⌉` tiles, each `depth × MR` values, tap by tap (the rows past `cout` zero).
    packed: Vec<f32>,
    /// Where tap `t` reads, relative to the output pixel, in the flattened plane.
    offsets: Vec<isize>,
    /// For each pixel of a plane, bit `t` set where tap `t` reads inside the plane.
    words: Vec<i32>,
}

impl Direct {
    /// `f`'s forward with `weight` (`cout × c·k·k`), if its geometry is one the kernel
    /// computes and this CPU runs it: tap `t` of output pixel `q` reads input pixel `q + δ_t`,
    /// and each output is one chain of fused multiply-adds over `(ci, t)` in order, as `gemm`
    /// runs it over the gathered columns.
    pub fn forward(f: &Frame, weight: &[f32], cout: usize) -> Option<Self> {
        let depth = f.depth();
        if weight.len() != cout * depth {
            return None;
        }
        Self::with_weights(*f, cout, Order::OneChain, |offset| offset, weight)
    }

    /// The input gradient of `f`'s convolution: `dx[ci, q] = Σ_t Σ_co W[co, ci, t] · dy[co, q −
    /// δ_t]` (stride 1, "same" padding), a convolution of `dy` (`cout` channels) whose tap `t`
    /// reads `q − δ_t`. Through columns it is `dcols = Wᵀ·dy` (for each `(ci, t)`, one chain
    /// over `co`) and col2im (the taps added in order into a zero `dx`); here each tap's chain
    /// over `co` is summed alone and the taps added in order from zero, so the bits are those.
    pub fn input_gradient(f: &Frame, weight: &[f32], cout: usize) -> Option<Self> {
        let (k2, depth) = (f.op.kernel * f.op.kernel, f.depth());
        // The checks `with_weights` makes, before the weights are reordered for it: every
        // backward asks, the 1×1s and the stem's first 3×3 included.
        if weight.len() != cout * depth || cout == 0 || !has_kernel(f) || cout * k2 < MIN_DEPTH {
            return None;
        }
        let dy = f.op.on((cout, f.b, f.h, f.w)).ok()?;
        let mirrored = |(dy, dx): (isize, isize)| (-dy, -dx);
        // Row `ci`, step `(t, co)`: loops rather than a division per weight, which cost 0.6% of
        // a `googlenet-bn` step (`kd-bench --profile teacher-step`, with the forward's packing).
        let row = cout * k2;
        let mut steps = vec![0.0; f.c * row];
        for (co, filters) in weight.chunks_exact(depth).enumerate() {
            for (ci, taps) in filters.chunks_exact(k2).enumerate() {
                for (t, &v) in taps.iter().enumerate() {
                    steps[ci * row + t * cout + co] = v;
                }
            }
        }
        Self::with_weights(dy, f.c, Order::ChainPerTap, mirrored, &steps)
    }

    /// A convolution of `f`'s input (`f.c` channels) into `cout` channels whose tap `t` reads
    /// `shift(t's offset)`, with weights `w` (`cout × c·k·k`, row-major, each row's steps in
    /// `order`).
    fn with_weights(
        f: Frame,
        cout: usize,
        order: Order,
        shift: impl Fn((isize, isize)) -> (isize, isize),
        w: &[f32],
    ) -> Option<Self> {
        let depth = f.depth();
        if !has_kernel(&f) || depth < MIN_DEPTH {
            return None;
        }
        let mut packed = vec![0.0; cout.div_ceil(MR) * depth * MR];
        for (co, row) in w.chunks_exact(depth).take(cout).enumerate() {
            let tile = &mut packed[co / MR * depth * MR..];
            for (p, &v) in row.iter().enumerate() {
                tile[p * MR + co % MR] = v;
            }
        }
        let (offsets, words) = taps(&f, shift);
        Some(Self {
            frame: f,
            cout,
            order,
            packed,
            offsets,
            words,
        })
    }

    /// The output of `images` images of `x` (`[cout, images·h·w]`, every element) into `y`.
    pub fn run(&self, x: Planes<'_, f32>, images: usize, y: &mut Block<'_, f32>) -> Result<()> {
        let f = &self.frame;
        let n = images * f.h * f.w;
        let fits = f.c == 0 || n == 0 || (f.c - 1) * x.channel + n <= x.data.len();
        if !fits || (f.c > 1 && x.channel < n) {
            candle_core::bail!(
                "implicit convolution: {images} images of {}x{}x{} planes in {} values, channels {} apart",
                f.c,
                f.h,
                f.w,
                x.data.len(),
                x.channel
            );
        }
        // The masks of each pixel of the chunk, and none past its end (a last, partial tile).
        let words = chunk_words(&self.words, images, n.next_multiple_of(NR));
        let chunk = Chunk {
            x,
            n,
            words: &words,
        };
        y.fill_runs(|runs| self.tiles(chunk, runs))
    }

    /// Steps per panel: at most [`PANEL_STEPS`], whole taps' chains with [`Order::ChainPerTap`].
    fn block_steps(&self) -> usize {
        let (c, depth) = (self.frame.c.max(1), self.frame.depth().max(1));
        match self.order {
            Order::OneChain => PANEL_STEPS.min(depth),
            Order::ChainPerTap => (PANEL_STEPS / c).max(1) * c,
        }
    }

    /// Every tile of 16 pixels of `c`: its panel of columns a block of steps at a time, each
    /// block through each tile of output channels, their sums kept between blocks.
    #[cfg(target_arch = "x86_64")]
    fn tiles(&self, c: Chunk<'_>, runs: &mut Runs<'_, f32>) -> Result<()> {
        let f = &self.frame;
        let (depth, block) = (f.depth(), self.block_steps());
        if !c.words.len().is_multiple_of(NR) || c.n > c.words.len() {
            candle_core::bail!("implicit convolution: masks of the wrong size");
        }
        let chain = match self.order {
            Order::OneChain => None,
            Order::ChainPerTap => Some(f.c),
        };
        let mut panel = vec![0.0f32; block * NR];
        let mut sums = vec![[0.0f32; MR * NR]; self.cout.div_ceil(MR)];
        for (i, words) in c.words.chunks_exact(NR).enumerate() {
            let q0 = i * NR;
            sums.iter_mut().for_each(|s| s.fill(0.0));
            for first in (0..depth).step_by(block) {
                let steps = first..(first + block).min(depth);
                // SAFETY: `with_weights` checked that this CPU has AVX2 and FMA. `panel` holds
                // `block ≥ steps.len()` rows of 16. A lane reads only where its word has
                // the tap's bit: a pixel of the chunk (the words past its end are zero) whose
                // tap reads inside the same image's plane (`Direct::words`), so at `ci·channel +
                // q0 + lane + offset`, inside channel `ci`'s planes of the chunk, inside `x`
                // (checked in `run`).
                #[allow(unsafe_code)]
                unsafe {
                    x86::gather_panel(
                        c.x.data,
                        (q0, c.x.channel, f.c),
                        (&self.offsets, self.order == Order::ChainPerTap),
                        steps.clone(),
                        words,
                        &mut panel,
                    )
                };
                for (tile, s) in sums.iter_mut().enumerate() {
                    let weights = &self.packed[(tile * depth + steps.start) * MR..];
                    // SAFETY: AVX2 and FMA, as above; `weights` holds the block's steps of 6
                    // values and `panel` their rows of 16; a block is whole chains.
                    #[allow(unsafe_code)]
                    unsafe {
                        x86::tile(steps.len(), chain, weights.as_ptr(), panel.as_ptr(), s)
                    };
                }
            }
            let len = NR.min(c.n - q0);
            for (tile, s) in sums.iter().enumerate() {
                for (r, lanes) in s.chunks_exact(NR).enumerate().take(self.cout - tile * MR) {
                    let Some(dst) = runs.run(tile * MR + r, q0, len) else {
                        candle_core::bail!("implicit convolution: a tile outside its block");
                    };
                    // SAFETY: `run` lent `len` (at most 16) elements at `dst`.
                    #[allow(unsafe_code)]
                    unsafe {
                        std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, len)
                    };
                }
            }
        }
        Ok(())
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn tiles(&self, _: Chunk<'_>, _: &mut Runs<'_, f32>) -> Result<()> {
        candle_core::bail!("implicit convolution: no kernel for this CPU")
    }
}

/// Whether the kernels run `f`: a geometry they compute, on a plane this CPU runs them on.
fn has_kernel(f: &Frame) -> bool {
    same_geometry(f) && cpu_runs_kernels() && plane_taken(f.h * f.w)
}

/// Whether [`gather_columns`] gathers `f`'s columns: a geometry of the kernels', on a CPU that
/// runs them (the masked gather has no 16-lane rival: on AVX-512 too it gathers every plane).
fn has_gather(f: &Frame) -> bool {
    same_geometry(f) && cpu_runs_kernels()
}

/// A "same" k×k convolution (stride 1, odd `k` from 3 to 5).
fn same_geometry(f: &Frame) -> bool {
    let k = f.op.kernel;
    let same = k % 2 == 1 && k > 1 && f.op.stride == 1 && f.op.padding == k / 2;
    same && k * k <= MAX_TAPS
}

/// The largest plane (in pixels) on which the kernels run by default on a CPU with AVX-512. There
/// `gemm`'s 16-lane kernels make im2col's path as fast as this 8-lane one on 28×28 and 14×14
/// planes, and slower on 7×7 and 3×3 ones (through `Frame::gather`'s columns, short rows): the
/// k×k layers at 7×7 and 3×3 took 63.5 ms of CPU per batch this way against 67.2 through
/// columns, those at 28×28 and 14×14 115.5 against 107.3 (`googlenet-bn`, medians of 10
/// alternating rounds, `docs/speed.md`, twenty-third round).
const SMALL_PLANE: usize = 7 * 7;

/// Where each tap of `f`'s kernel reads relative to the output pixel in the flattened plane
/// (shifted by `shift`), and for each pixel of a plane, bit `t` set where tap `t` reads inside
/// the plane.
fn taps(f: &Frame, shift: impl Fn((isize, isize)) -> (isize, isize)) -> (Vec<isize>, Vec<i32>) {
    let k = f.op.kernel;
    let pad = (k / 2) as isize;
    let taps: Vec<(isize, isize)> = (0..k * k)
        .map(|t| shift(((t / k) as isize - pad, (t % k) as isize - pad)))
        .collect();
    let offsets = taps
        .iter()
        .map(|&(dy, dx)| dy * f.w as isize + dx)
        .collect();
    // A tap reads inside the plane where its row and its column both lie inside: the pixel's
    // word is its row's bits and its column's (built per chunk: a fold over the taps for every
    // pixel cost 0.6% of a `googlenet-bn` step).
    let bits = |len: usize, along: fn(&(isize, isize)) -> isize| -> Vec<i32> {
        let inside = |v: isize| (0..len as isize).contains(&v);
        (0..len as isize)
            .map(|at| {
                let tap_bits = taps.iter().enumerate();
                tap_bits.fold(0i32, |word, (t, tap)| {
                    word | (i32::from(inside(at + along(tap))) << t)
                })
            })
            .collect()
    };
    let (rows, cols) = (bits(f.h, |t| t.0), bits(f.w, |t| t.1));
    let words = rows
        .iter()
        .flat_map(|&r| cols.iter().map(move |&c| r & c))
        .collect();
    (offsets, words)
}

/// A plane's words repeated for `images` images, then zeros up to `len`.
fn chunk_words(plane: &[i32], images: usize, len: usize) -> Vec<i32> {
    let mut words = Vec::with_capacity(len.max(plane.len() * images));
    for _ in 0..images {
        words.extend_from_slice(plane);
    }
    words.resize(len, 0);
    words
}

/// im2col's columns of `images` images of `x` (`[c, b, h, w]`) for `f`'s convolution, the same
/// values as [`Frame::gather`], if this CPU has the kernels and `f` is a geometry they compute:
/// each row `(ci, t)` in one pass of masked loads over all the images (a zero where the tap reads
/// the padding), where `Frame::gather` copies each image's shifted plane and then zeroes its
/// edges: at 7×7 and 3×3, calls for 2 to 49 values.
pub(crate) fn gather_columns(
    f: &Frame,
    x: &[f32],
    images: Range<usize>,
) -> Option<Result<Columns<f32>>> {
    if !has_gather(f) {
        return None;
    }
    let (plane, k2) = (f.h * f.w, f.op.kernel * f.op.kernel);
    let (channel, n) = (f.b * plane, images.len() * plane);
    if images.end > f.b || x.len() < f.c * channel {
        return Some(Err(candle_core::Error::Msg(format!(
            "im2col: images {images:?} of {}x{}x{}x{} in {} values",
            f.c,
            f.b,
            f.h,
            f.w,
            x.len()
        ))));
    }
    let (offsets, plane_words) = taps(f, |offset| offset);
    let words = chunk_words(&plane_words, images.len(), n);
    let mut cols = Columns::take(f.depth() * n);
    for (row, dst) in cols.chunks_mut(n.max(1)).enumerate() {
        let (ci, t) = (row / k2, row % k2);
        let from = ci * channel + images.start * plane;
        // SAFETY: `has_kernel` checked that this CPU has AVX2. `dst` and `words` hold `n`
        // values. A lane reads only where its word has tap `t`'s bit: pixel `i` of the chunk
        // whose tap reads inside the same image's plane (`taps`), so at `from + i + offsets[t]`,
        // inside channel `ci`'s planes of the batch, inside `x` (checked above).
        #[allow(unsafe_code)]
        unsafe {
            x86::gather_row(x, (from, offsets[t]), t, &words, dst)
        };
    }
    Some(Ok(cols))
}

/// One task's share of the input: its planes, its `n` pixels in each, and the masks of each
/// pixel (zero past `n`, to whole tiles).
#[derive(Clone, Copy)]
struct Chunk<'a> {
    x: Planes<'a, f32>,
    n: usize,
    words: &'a [i32],
}

/// Where the kernels run, set by the environment's `KD_IMPLICIT` for measuring them: the kernels
/// give the bits of the columns' path, so each setting trains the same bytes where `gemm` sums
/// in one chain (the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImplicitUse {
    /// Where the CPU has AVX2 and FMA; with AVX-512 too, only on planes of at most
    /// [`SMALL_PLANE`] pixels (unset, or `auto`).
    Auto,
    /// On every plane wherever the CPU has AVX2 and FMA, AVX-512 or not (`on`).
    On,
    /// Nowhere: every convolution through columns and `gemm` (`off`), to compare one binary's
    /// two paths.
    Off,
}

impl ImplicitUse {
    /// The setting in `KD_IMPLICIT`; an error names the variable and its value.
    pub fn from_env() -> crate::Result<Self> {
        match std::env::var_os("KD_IMPLICIT") {
            None => Ok(Self::Auto),
            Some(v) => Self::parse(&v.to_string_lossy()),
        }
    }

    fn parse(value: &str) -> crate::Result<Self> {
        match value {
            "" | "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(crate::ModelError::Environment {
                name: "KD_IMPLICIT",
                value: other.to_string(),
                expected: "auto, on or off (where the implicit convolutions run)",
            }),
        }
    }

    /// The process's setting, read once (a value [`Self::from_env`] refuses reads as `Auto`;
    /// the binaries refuse it at start, `kd_train::cli::main_with`).
    fn current() -> Self {
        static SETTING: std::sync::OnceLock<ImplicitUse> = std::sync::OnceLock::new();
        *SETTING.get_or_init(|| Self::from_env().unwrap_or(Self::Auto))
    }
}

/// Whether this CPU runs the kernels at all: it has AVX2 and FMA, and `KD_IMPLICIT` is not `off`.
fn cpu_runs_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        ImplicitUse::current() != ImplicitUse::Off
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the kernels take a plane of `pixels` on a CPU that runs them: every plane, unless
/// `gemm` has something wider (AVX-512) and `KD_IMPLICIT` is not `on`; then small ones only.
fn plane_taken(pixels: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let wider = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let wider = false;
    pixels <= SMALL_PLANE || !wider || ImplicitUse::current() == ImplicitUse::On
}

/// The kernel's three parts, with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{MAX_TAPS, MR, NR};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// A tile's sums: 6 output channels × 16 pixels.
    pub type Sums = [[__m256; 2]; MR];

    /// Rows `steps` of the panel of the 16 pixels from `at` on in each plane: step `(ci, t)`
    /// (or `(t, ci)`, tap-major) holds channel `ci`'s values at those pixels shifted by tap `t`'s
    /// offset, and zero in the lanes whose word lacks bit `t` (those lanes read nothing: a masked
    /// load does not touch them).
    ///
    /// # Safety
    /// The CPU has AVX2; `words` holds 16 words and `panel` `steps.len() · 16` values;
    /// `offsets.len() <= 32`; `steps` lies in `0..c · offsets.len()`; for each lane `l` with
    /// bit `t` set, `ci · channel + at + l + offsets[t]` lies inside `x` for every `ci < c`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gather_panel(
        x: &[f32],
        (at, channel, c): (usize, usize, usize),
        (offsets, tap_major): (&[isize], bool),
        steps: Range<usize>,
        words: &[i32],
        panel: &mut [f32],
    ) {
        let taps = offsets.len();
        // The step's (channel, tap) and how the next one follows: the inner index counts up
        // to its length, then the outer one steps.
        let (inner_len, mut outer, mut inner) = if tap_major {
            (c, steps.start / c, steps.start % c)
        } else {
            (taps, steps.start / taps, steps.start % taps)
        };
        // SAFETY: the caller's contract, item by item.
        unsafe {
            let w = [
                _mm256_loadu_si256(words.as_ptr().cast()),
                _mm256_loadu_si256(words.as_ptr().add(8).cast()),
            ];
            let mut masks = [[_mm256_setzero_si256(); 2]; MAX_TAPS];
            for (t, m) in masks.iter_mut().enumerate().take(taps) {
                let bit = _mm256_set1_epi32(1 << t);
                *m = w.map(|w| _mm256_cmpeq_epi32(_mm256_and_si256(w, bit), bit));
            }
            let mut dst = panel.as_mut_ptr();
            for _ in steps {
                let (ci, t) = if tap_major {
                    (inner, outer)
                } else {
                    (outer, inner)
                };
                let src = x
                    .as_ptr()
                    .wrapping_add(ci * channel + at)
                    .wrapping_offset(offsets[t]);
                let m = &masks[t];
                _mm256_storeu_ps(dst, _mm256_maskload_ps(src, m[0]));
                _mm256_storeu_ps(dst.add(8), _mm256_maskload_ps(src.wrapping_add(8), m[1]));
                dst = dst.add(NR);
                inner += 1;
                if inner == inner_len {
                    (inner, outer) = (0, outer + 1);
                }
            }
        }
    }

    /// Row `dst` of the columns: `dst[i] = x[from + i + offset]` where `words[i]` has bit
    /// `t`, else zero (those lanes read nothing).
    ///
    /// # Safety
    /// The CPU has AVX2; `words` holds `dst.len()` words; `t < 32`; for each `i` whose word
    /// has bit `t`, `from + i + offset` lies inside `x`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gather_row(
        x: &[f32],
        (from, offset): (usize, isize),
        t: usize,
        words: &[i32],
        dst: &mut [f32],
    ) {
        let src = x.as_ptr().wrapping_add(from).wrapping_offset(offset);
        let whole = dst.len() / 8 * 8;
        // SAFETY: the caller's contract, lane by lane.
        unsafe {
            let bit = _mm256_set1_epi32(1 << t);
            for i in (0..whole).step_by(8) {
                let w = _mm256_loadu_si256(words.as_ptr().add(i).cast());
                let mask = _mm256_cmpeq_epi32(_mm256_and_si256(w, bit), bit);
                let v = _mm256_maskload_ps(src.wrapping_add(i), mask);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
            }
            for i in whole..dst.len() {
                dst[i] = if words[i] & (1 << t) != 0 {
                    *src.wrapping_add(i)
                } else {
                    0.0
                };
            }
        }
    }

    /// Adds `steps` steps of `a ⊗ b` to a tile's sums `s` (6 rows of 16): with `chain` `None`
    /// one chain of fused multiply-adds per output that goes on from `s`, in order; with
    /// `Some(len)`, each run of `len` steps one chain from zero, added to `s` in order. `a`
    /// holds `steps` steps of 6 weights, `b` `steps` rows of 16 pixels.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a` points to `steps · 6` values and `b` to `steps · 16`;
    /// `len` divides `steps`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(
        steps: usize,
        chain: Option<usize>,
        a: *const f32,
        b: *const f32,
        s: &mut [f32; MR * NR],
    ) {
        let sp = s.as_mut_ptr();
        // SAFETY: `s` holds 6 rows of 16; the rest is the caller's contract.
        unsafe {
            let mut total = [[_mm256_setzero_ps(); 2]; MR];
            for (r, t) in total.iter_mut().enumerate() {
                *t = [
                    _mm256_loadu_ps(sp.add(r * NR)),
                    _mm256_loadu_ps(sp.add(r * NR + 8)),
                ];
            }
            match chain {
                None => total = fma_chain(steps, a, b, total),
                Some(len) => {
                    for first in (0..steps).step_by(len.max(1)) {
                        let zero = [[_mm256_setzero_ps(); 2]; MR];
                        let sums = fma_chain(len, a.add(first * MR), b.add(first * NR), zero);
                        for (t, s) in total.iter_mut().zip(&sums) {
                            t[0] = _mm256_add_ps(t[0], s[0]);
                            t[1] = _mm256_add_ps(t[1], s[1]);
                        }
                    }
                }
            }
            for (r, t) in total.iter().enumerate() {
                _mm256_storeu_ps(sp.add(r * NR), t[0]);
                _mm256_storeu_ps(sp.add(r * NR + 8), t[1]);
            }
        }
    }

    /// `steps` fused multiply-adds per output, in order, going on from `acc`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a` points to `steps · 6` values and `b` to `steps · 16`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fma_chain(steps: usize, a: *const f32, b: *const f32, mut acc: Sums) -> Sums {
        for p in 0..steps {
            // SAFETY: step `p` of each, inside them (the caller's contract).
            unsafe {
                let b0 = _mm256_loadu_ps(b.add(p * NR));
                let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
                for (r, sums) in acc.iter_mut().enumerate() {
                    let w = _mm256_broadcast_ss(&*a.add(p * MR + r));
                    sums[0] = _mm256_fmadd_ps(w, b0, sums[0]);
                    sums[1] = _mm256_fmadd_ps(w, b1, sums[1]);
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::rand;
    use crate::gemm::{fresh_product, product, Filling, View};
    use crate::im2col::Im2Col;

    /// `KD_IMPLICIT` takes auto (or nothing), on and off, and names itself and the value it
    /// refuses.
    #[test]
    fn the_setting_reads_auto_on_and_off_and_refuses_the_rest() {
        for (v, want) in [
            ("", ImplicitUse::Auto),
            ("auto", ImplicitUse::Auto),
            ("on", ImplicitUse::On),
            ("off", ImplicitUse::Off),
        ] {
            assert_eq!(ImplicitUse::parse(v).ok(), Some(want), "{v:?}");
        }
        for v in ["ON", "1", "yes", " off"] {
            let e = ImplicitUse::parse(v).unwrap_err().to_string();
            assert!(e.contains("KD_IMPLICIT") && e.contains(v), "{e}");
        }
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        rand(&[len], seed).into_iter().map(|v| v as f32).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A k×k convolution that keeps the size: stride 1, padding `k / 2`.
    fn same(kernel: usize) -> Im2Col {
        Im2Col {
            kernel,
            stride: 1,
            padding: kernel / 2,
        }
    }

    /// `d`'s convolution of `images` images of `planes` into a fresh `rows × n` matrix.
    fn run(d: &Direct, planes: Planes<'_, f32>, images: usize, rows: usize) -> Vec<f32> {
        let n = images * d.frame.h * d.frame.w;
        let mut out = Filling::new(rows, n, std::iter::once(0..n).collect(), 0).unwrap();
        let mut blocks = out.blocks().unwrap();
        let mut block = blocks.pop().unwrap();
        d.run(planes, images, &mut block).unwrap();
        let proof = block.written().unwrap();
        out.finish(vec![proof]).unwrap()
    }

    /// The geometries: kernel, input and output channels, plane size, images. With tiles of
    /// output channels cut short (7, 12, 100 outputs), a last partial tile of pixels (6 · 49 =
    /// 18 · 16 + 6), panels in several blocks (depth 360; 100 outputs' taps 200 at a time),
    /// planes smaller than the kernel, and one pixel.
    const GEOMETRIES: [(usize, usize, usize, usize, usize); 7] = [
        (3, 8, 32, 7, 6),
        (5, 4, 12, 7, 3),
        (3, 40, 80, 7, 2),
        (3, 16, 48, 28, 1),
        (5, 12, 32, 3, 5),
        (3, 3, 7, 1, 4),
        (3, 30, 100, 5, 2),
    ];

    /// The forward has the bits of im2col's columns multiplied by `gemm`, and the input
    /// gradient those of `dcols = Wᵀ·dy` by `gemm` and col2im, for every geometry, whole
    /// batches and a chunk of images from the middle of one.
    #[test]
    fn implicit_convolution_has_the_bits_of_the_columns() {
        for (seed, (k, c, cout, hw, b)) in GEOMETRIES.into_iter().enumerate() {
            let f = same(k).on((c, b, hw, hw)).unwrap();
            let (depth, n) = (f.depth(), b * hw * hw);
            let (x, w) = (
                values(c * n, seed as u64),
                values(cout * depth, 100 + seed as u64),
            );
            let dy = values(cout * n, 200 + seed as u64);
            let Some(forward) = Direct::forward(&f, &w, cout) else {
                eprintln!("no implicit kernel on this CPU for {k}x{k} at {hw}px (has_kernel)");
                continue;
            };
            let cols = f.gather(&x, 0..b);
            let mut expected = vec![0.0f32; cout * n];
            let (wv, cv) = (
                View::rows(&w, cout, depth, depth),
                View::rows(&cols, depth, n, n),
            );
            product(&mut expected, n, wv, cv).unwrap();
            let check = |d: &Direct, data: &[f32], rows: usize, expected: &[f32], what: &str| {
                let got = run(d, Planes { data, channel: n }, b, rows);
                let shape = format!("{k}x{k}, {c} → {cout} at {hw}px");
                assert_eq!(bits(&got), bits(expected), "{what}, {shape}");
            };
            check(&forward, &x, cout, &expected, "forward");

            let gradient = Direct::input_gradient(&f, &w, cout).unwrap();
            let mut dcols = fresh_product(wv.t(), View::rows(&dy, cout, n, n)).unwrap();
            let mut expected = vec![0.0f32; c * n];
            for (ci, dst) in expected.chunks_exact_mut(n).enumerate() {
                f.scatter_own_channel(&mut dcols, ci, b, dst);
            }
            check(&gradient, &dy, c, &expected, "dx");

            // A chunk of the batch: its planes inside the whole input's.
            if b > 2 {
                let plane = hw * hw;
                let at = plane..;
                let chunk = run(
                    &forward,
                    Planes {
                        data: &x[at],
                        channel: n,
                    },
                    b - 2,
                    cout,
                );
                let whole = run(
                    &forward,
                    Planes {
                        data: &x,
                        channel: n,
                    },
                    b,
                    cout,
                );
                for (co, row) in chunk.chunks_exact((b - 2) * plane).enumerate() {
                    let from = co * n + plane;
                    assert_eq!(bits(row), bits(&whole[from..from + row.len()]));
                }
            }
        }
    }

    /// The columns gathered with masked loads are `Frame::gather`'s, bit for bit, for every
    /// geometry (one input channel and planes smaller than the kernel among them), for the
    /// whole batch and a chunk from its middle, with NaN in the other images' planes (a lane
    /// that read them would carry it).
    #[test]
    fn gathered_columns_are_im2cols() {
        // And the stem's first 3×3: one input channel at 28×28.
        let geometries = GEOMETRIES.into_iter().chain([(3, 1, 16, 28, 2)]);
        for (seed, (k, c, _, hw, b)) in geometries.enumerate() {
            let f = same(k).on((c, b + 2, hw, hw)).unwrap();
            let plane = hw * hw;
            let mut x = values(c * (b + 2) * plane, 300 + seed as u64);
            for ci in 0..c {
                let planes = &mut x[ci * (b + 2) * plane..][..(b + 2) * plane];
                planes[..plane].fill(f32::NAN);
                planes[(b + 1) * plane..].fill(f32::NAN);
            }
            if gather_columns(&f, &x, 0..1).is_none() {
                eprintln!("no implicit kernel on this CPU for {k}x{k} at {hw}px");
                continue;
            }
            for images in [1..b + 1, 1..2, 0..b + 2] {
                let got = gather_columns(&f, &x, images.clone()).expect("a kernel, as above");
                let want = f.gather(&x, images.clone());
                let shape = format!("{k}x{k}, {c} channels at {hw}px, images {images:?}");
                assert_eq!(bits(&got.unwrap()), bits(&want), "{shape}");
            }
            assert!(gather_columns(&f, &x, 0..b + 3).unwrap().is_err());
            assert!(gather_columns(&f, &x[1..], 0..1).unwrap().is_err());
        }
        let pointwise = Im2Col {
            kernel: 1,
            stride: 1,
            padding: 0,
        };
        let f = pointwise.on((2, 1, 4, 4)).unwrap();
        assert!(gather_columns(&f, &[0.0; 32], 0..1).is_none());
    }

    /// Only the geometries it computes: "same" padding, stride 1, odd kernels up to 5×5, at
    /// least [`MIN_DEPTH`] steps.
    #[test]
    fn implicit_convolution_takes_only_its_geometries() {
        let w = vec![0.0f32; 4 * 2 * 49];
        for (kernel, stride, padding) in [(3, 1, 0), (3, 2, 1), (1, 1, 0), (7, 1, 3), (2, 1, 1)] {
            let op = Im2Col {
                kernel,
                stride,
                padding,
            };
            let f = op.on((2, 1, 9, 9)).unwrap();
            let w = &w[..4 * f.depth()];
            assert!(
                Direct::forward(&f, w, 4).is_none(),
                "{kernel}x{kernel}/{stride} pad {padding}"
            );
            assert!(Direct::input_gradient(&f, w, 4).is_none());
        }
        // Weights of the wrong size.
        let f = same(3).on((2, 1, 9, 9)).unwrap();
        assert!(Direct::forward(&f, &w[..10], 4).is_none());
        // Too few steps for a panel: one input channel (9 steps), its gradient from one output.
        let f = same(3).on((1, 1, 9, 9)).unwrap();
        assert!(Direct::forward(&f, &w[..36], 4).is_none());
        assert!(Direct::input_gradient(&f, &w[..9], 1).is_none());
    }

    /// By default the kernels take every plane where the CPU has AVX2 and FMA but no AVX-512,
    /// and where it has AVX-512 only planes of at most 7×7 pixels.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn by_default_avx512_cpus_take_only_small_planes() {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if ImplicitUse::current() != ImplicitUse::Auto || !avx2 {
            eprintln!("KD_IMPLICIT is set, or this CPU has no implicit kernel");
            return;
        }
        let large = !is_x86_feature_detected!("avx512f");
        let w = values(4 * 16 * 9, 7);
        for (hw, taken) in [(3, true), (7, true), (8, large), (14, large), (28, large)] {
            let f = same(3).on((16, 2, hw, hw)).unwrap();
            let forward = Direct::forward(&f, &w, 4).is_some();
            let gradient = Direct::input_gradient(&f, &w, 4).is_some();
            assert_eq!((forward, gradient), (taken, taken), "{hw}x{hw}");
        }
    }

    /// Planes that do not hold the images asked for are refused, not read past.
    #[test]
    fn implicit_convolution_refuses_short_planes() {
        let f = same(3).on((2, 3, 4, 4)).unwrap();
        let w = values(5 * f.depth(), 1);
        let Some(d) = Direct::forward(&f, &w, 5) else {
            return;
        };
        let x = values(2 * 3 * 16, 2);
        let mut out = Filling::new(5, 48, std::iter::once(0..48).collect(), 0).unwrap();
        let mut block = out.blocks().unwrap().pop().unwrap();
        let short = Planes {
            data: &x[..95],
            channel: 48,
        };
        assert!(d.run(short, 3, &mut block).is_err());
        let overlapping = Planes {
            data: &x,
            channel: 16,
        };
        assert!(d.run(overlapping, 3, &mut block).is_err());
    }
}
