//! Whole-array paths for the pools the networks use: the 3×3 / stride 1 / padding 1 max-pool of
//! every Inception block, the 3×3 / stride 2 max-pool between the teacher's stages, its auxiliary
//! heads' 3×3 / stride 2 average pool and the students' 2×2 / stride 2 max-pool. Each takes all
//! planes as one array (no per-plane window tables) and gives the general path's bits, ties,
//! signed zeros and NaNs included (tested against it). Every task's loops run in AVX2 where the
//! CPU has it ([`wide!`]: the same code and bits, eight lanes instead of four), and a task whose
//! input holds no NaN — every task of a healthy network — takes the kernels' NaN-free instance
//! (`NAN = false`, [`by_nan`]), where each comparison of a window is one instruction instead of
//! four.

use super::max_nan;
use crate::cpu::{fill_pair, par_build, par_build_pair, wide, Filled, Slots};
use candle_core::{Result, WithDType};
use rayon::prelude::*;
use std::hint::select_unpredictable;

/// Elements per parallel task: enough work per task, few enough tasks to spread over threads.
const TASK_ELEMENTS: usize = 16_384;

/// The 3×3 / stride 1 / padding 1 max-pool of `[planes, h, w]` (h, w ≥ 2), as whole-array passes
/// rather than plane by plane (a 7×7 plane is 49 numbers): along x, every element combines with
/// its left and right neighbours in one contiguous pass, then the ends of each row are redone
/// with their two inputs; along y the same with the rows above and below, then each plane's first
/// and last row. Each window is combined in the generic path's order (left to right, then top to
/// bottom, from its first input), so the result is the same to the bit.
pub(super) fn same_3x3_max<T: WithDType>(x: &[T], h: usize, w: usize) -> Vec<T> {
    let plane = h * w;
    // Whole planes per task: enough work per task, and a pass never crosses a task.
    let per_task = plane * (TASK_ELEMENTS / plane).max(1);
    // Every element of both passes' outputs is written: the buffers start as zeros, not copies.
    let mut tmp = vec![T::from_f64(0.0); x.len()];
    tmp.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task))
        .for_each(|(t, x)| wide!(|| by_nan!(x, max_along_x(x, t, w))));
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(per_task)
        .zip(tmp.par_chunks(per_task))
        .for_each(|(o, t)| wide!(|| by_nan!(t, max_along_y(t, o, plane, w))));
    out
}

/// [`same_3x3_max`]'s first pass: each row's 3-wide maximum.
#[inline(always)]
fn max_along_x<const NAN: bool, T: WithDType>(x: &[T], t: &mut [T], w: usize) {
    let n = x.len();
    for i in 1..n - 1 {
        t[i] = max_of::<NAN, T>(max_of::<NAN, T>(x[i - 1], x[i]), x[i + 1]);
    }
    for s in (0..n).step_by(w) {
        t[s] = max_of::<NAN, T>(x[s], x[s + 1]);
        t[s + w - 1] = max_of::<NAN, T>(x[s + w - 2], x[s + w - 1]);
    }
}

/// [`same_3x3_max`]'s second pass: the maximum of three row maxima.
#[inline(always)]
fn max_along_y<const NAN: bool, T: WithDType>(t: &[T], o: &mut [T], plane: usize, w: usize) {
    let n = t.len();
    for i in w..n - w {
        o[i] = max_of::<NAN, T>(max_of::<NAN, T>(t[i - w], t[i]), t[i + w]);
    }
    for p in (0..n).step_by(plane) {
        for i in p..p + w {
            o[i] = max_of::<NAN, T>(t[i], t[i + w]);
        }
        for i in p + plane - w..p + plane {
            o[i] = max_of::<NAN, T>(t[i - w], t[i]);
        }
    }
}

/// `$call` with `NAN = true` if `$x` holds a NaN, else with `NAN = false` (`$call` names a
/// function generic over `const NAN: bool` first, then the element type).
macro_rules! by_nan {
    ($x:expr, $f:ident($($arg:expr),* $(,)?)) => {
        if has_nan($x) {
            $f::<true, _>($($arg),*)
        } else {
            $f::<false, _>($($arg),*)
        }
    };
}
use by_nan;

/// Whether `x` holds a NaN: one pass with no early exit, so that it vectorises (a task's input,
/// in cache for the pass that follows).
#[inline(always)]
fn has_nan<T: WithDType>(x: &[T]) -> bool {
    #[allow(clippy::eq_op)]
    x.iter().fold(false, |any, &v| any | (v != v))
}

/// [`max_nan`], or (`NAN = false`) the same for inputs known to hold no NaN: the greater, the
/// earlier on a tie — one comparison.
#[inline(always)]
fn max_of<const NAN: bool, T: WithDType>(m: T, v: T) -> T {
    if NAN {
        max_nan(m, v)
    } else {
        select_unpredictable(v > m, v, m)
    }
}

/// The 2×2 / stride 2 max-pool of `[rows, w]` (all planes' rows in a row; `rows` and `w` even, so
/// a pair of rows never spans two planes): each output is its window's maximum taken in the
/// general path's order — along x in each row, then the two rows.
pub(super) fn max_2x2<T: WithDType>(x: &[T], w: usize) -> Vec<T> {
    let ow = w / 2;
    let pairs_per_task = (TASK_ELEMENTS / (2 * w)).max(1);
    let mut out = vec![T::from_f64(0.0); x.len() / 4];
    out.par_chunks_mut(pairs_per_task * ow)
        .zip(x.par_chunks(pairs_per_task * 2 * w))
        .for_each(|(out, x)| wide!(|| by_nan!(x, max_2x2_rows(x, out, w))));
    out
}

/// [`max_2x2`] of whole pairs of rows `x` into their output rows `out`.
#[inline(always)]
fn max_2x2_rows<const NAN: bool, T: WithDType>(x: &[T], out: &mut [T], w: usize) {
    let max = max_of::<NAN, T>;
    for (o, rows) in out.chunks_exact_mut(w / 2).zip(x.chunks_exact(2 * w)) {
        let (a, b) = rows.split_at(w);
        let (a, b) = (a.as_chunks::<2>().0, b.as_chunks::<2>().0);
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = max(max(a[0], a[1]), max(b[0], b[1]));
        }
    }
}

/// The input gradient of [`max_2x2`]: each output's gradient goes to the first input of its
/// window (row-major) equal to the output — the first NaN if the output is NaN — and every other
/// input gets zero. Branch-free, one output's window at a time; `0 + g` keeps the general path's
/// sum from zero (a gradient of −0 lands as +0).
pub(super) fn max_2x2_backward<T: WithDType>(x: &[T], res: &[T], grad: &[T], w: usize) -> Vec<T> {
    let ow = w / 2;
    let pairs_per_task = (TASK_ELEMENTS / (2 * w)).max(1);
    let zero = T::from_f64(0.0);
    let mut gx = vec![zero; x.len()];
    gx.par_chunks_mut(pairs_per_task * 2 * w)
        .zip(x.par_chunks(pairs_per_task * 2 * w))
        .zip(res.par_chunks(pairs_per_task * ow))
        .zip(grad.par_chunks(pairs_per_task * ow))
        .for_each(|(((gx, x), res), grad)| {
            wide!(|| {
                let rows = gx.chunks_exact_mut(2 * w).zip(x.chunks_exact(2 * w));
                for ((gx, x), (res, grad)) in
                    rows.zip(res.chunks_exact(ow).zip(grad.chunks_exact(ow)))
                {
                    let (xa, xb) = x.split_at(w);
                    let (ga, gb) = gx.split_at_mut(w);
                    let windows = xa.as_chunks::<2>().0.iter().zip(xb.as_chunks::<2>().0);
                    let grads = ga
                        .as_chunks_mut::<2>()
                        .0
                        .iter_mut()
                        .zip(gb.as_chunks_mut::<2>().0);
                    for (((a, b), (ga, gb)), (&m, &g)) in
                        windows.zip(grads).zip(res.iter().zip(grad))
                    {
                        #[allow(clippy::eq_op)]
                        let m_nan = m != m;
                        #[allow(clippy::eq_op)]
                        let hit = |v: T| v == m || (v != v && m_nan);
                        let h0 = hit(a[0]);
                        let h1 = !h0 && hit(a[1]);
                        let h2 = !(h0 || h1) && hit(b[0]);
                        let h3 = !(h0 || h1 || h2) && hit(b[1]);
                        let g = zero + g;
                        ga[0] = select_unpredictable(h0, g, zero);
                        ga[1] = select_unpredictable(h1, g, zero);
                        gb[0] = select_unpredictable(h2, g, zero);
                        gb[1] = select_unpredictable(h3, g, zero);
                    }
                }
            })
        });
    gx
}

/// Does `v` displace `m` as a window's arg-max so far? A greater value, or the first NaN: ties
/// keep the earlier input, as the general path's backward search does. Without `NAN`, for inputs
/// known to hold none: a greater value.
#[inline(always)]
fn displaces<const NAN: bool, T: WithDType>(m: T, v: T) -> bool {
    #[allow(clippy::eq_op)]
    let (m_nan, v_nan) = (m != m, v != v);
    v > m || (NAN && v_nan && !m_nan)
}

/// The maximum of three taps taken in order (the general path's `max_nan` chain) and the code of
/// its arg-max: `codes` are each tap's own, and the first of equal maxima keeps it.
#[inline(always)]
fn max3_with_code<const NAN: bool, T: WithDType>(
    a: T,
    b: T,
    c: T,
    (ka, kb, kc): (u8, u8, u8),
) -> (T, u8) {
    let ab = displaces::<NAN, T>(a, b);
    let m = select_unpredictable(ab, b, a);
    let k = select_unpredictable(ab, kb, ka);
    (
        max_of::<NAN, T>(max_of::<NAN, T>(a, b), c),
        select_unpredictable(displaces::<NAN, T>(m, c), kc, k),
    )
}

/// [`max3_with_code`] for a window clipped to two taps.
#[inline(always)]
fn max2_with_code<const NAN: bool, T: WithDType>(a: T, b: T, (ka, kb): (u8, u8)) -> (T, u8) {
    (
        max_of::<NAN, T>(a, b),
        select_unpredictable(displaces::<NAN, T>(a, b), kb, ka),
    )
}

/// [`same_3x3_max`] that also returns each output's arg-max as a tap code `ky·3 + kx` (row and
/// column in the 3×3 window, counted from its top-left corner, which lies in the padding at an
/// edge): the first input in row-major order equal to the output, the first NaN if the output
/// is NaN — the input the general path's backward search finds. The same two passes, task by
/// task (the x-pass into a [`Scratch`] that stays in cache for the y-pass): along x each element
/// keeps the column of its row's arg-max, along y the row whose arg-max wins.
pub(super) fn same_3x3_max_with_argmax<T: WithDType>(
    x: &[T],
    h: usize,
    w: usize,
) -> Result<(Vec<T>, Vec<u8>)> {
    let plane = h * w;
    let per_task = plane * (TASK_ELEMENTS / plane).max(1);
    let edges = edges(per_task.min(x.len()), h, w);
    // Outputs and codes are written whole, task by task: not zero-filled first.
    par_build_pair(x.len(), per_task, Scratch::default, |s, i, o, c| {
        let x = &x[i * per_task..][..o.len()];
        wide!(|| by_nan!(x, same_3x3_task(s, x, (o, c), w, &edges)))
    })
}

/// One task of [`same_3x3_max_with_argmax`]: whole planes `x` into their outputs and codes.
#[inline(always)]
fn same_3x3_task<const NAN: bool, T: WithDType>(
    s: &mut Scratch<T>,
    x: &[T],
    out: (Slots<'_, T>, Slots<'_, u8>),
    w: usize,
    edges: &[u8],
) -> (Filled, Filled) {
    let (t, tc) = s.along_x::<NAN>(x, w, edges);
    along_y_with_argmax::<NAN, T>(t, tc, out, w, edges)
}

/// Bits of an [`edges`] byte: the element opens or closes its row, or its plane.
const FIRST_COLUMN: u8 = 1;
const LAST_COLUMN: u8 = 2;
const FIRST_ROW: u8 = 4;
const LAST_ROW: u8 = 8;

/// Where each of `len` elements of whole `h × w` planes lies against its row's and its plane's
/// edges, a byte each: one pattern for every task of a call (tasks hold whole planes), read by the
/// passes in step with their data, so that their edge windows are computed in the same vector
/// loop as the rest (a row is as short as 3 elements; clipped windows taken row by row afterwards
/// were most of the work at 7×7). One plane's pattern, repeated: a division per element cost
/// 0.7% of a `googlenet-bn` step's CPU time (`kd-bench --profile teacher-step`).
fn edges(len: usize, h: usize, w: usize) -> Vec<u8> {
    let bit = |on: bool, b: u8| if on { b } else { 0 };
    let plane: Vec<u8> = (0..h)
        .flat_map(|row| (0..w).map(move |col| (row, col)))
        .map(|(row, col)| {
            bit(col == 0, FIRST_COLUMN)
                | bit(col + 1 == w, LAST_COLUMN)
                | bit(row == 0, FIRST_ROW)
                | bit(row + 1 == h, LAST_ROW)
        })
        .collect();
    let mut out = Vec::with_capacity(len);
    while out.len() < len && !plane.is_empty() {
        let more = plane.len().min(len - out.len());
        out.extend_from_slice(&plane[..more]);
    }
    out
}

/// A task's buffers for the x-pass of a pool with arg-max, reused from task to task: the pass's
/// maxima and codes stay in cache for the y-pass that reads them.
struct Scratch<T> {
    t: Vec<T>,
    tc: Vec<u8>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            t: Vec::new(),
            tc: Vec::new(),
        }
    }
}

impl<T: WithDType> Scratch<T> {
    /// [`along_x_with_argmax`] of `x` (whole rows of `w`, their [`edges`]) into these buffers.
    #[inline(always)]
    fn along_x<const NAN: bool>(&mut self, x: &[T], w: usize, edges: &[u8]) -> (&[T], &[u8]) {
        self.t.resize(x.len(), T::from_f64(0.0));
        self.tc.resize(x.len(), 0);
        along_x_with_argmax::<NAN, T>(x, &mut self.t, &mut self.tc, w, edges);
        (&self.t, &self.tc)
    }
}

/// The first of [`same_3x3_max_with_argmax`]'s passes: each row's 3-wide maximum and the
/// column (0..3) of its arg-max. At a row's end the tap beyond it is taken as the centre again,
/// with the centre's code: the window `(c, c, r)` gives the maximum and arg-max of the clipped
/// window `(c, r)`, bit for bit (the repeated tap never displaces, and its maximum is itself), so
/// edges need no pass of their own.
#[inline(always)]
fn along_x_with_argmax<const NAN: bool, T: WithDType>(
    x: &[T],
    t: &mut [T],
    tc: &mut [u8],
    w: usize,
    edges: &[u8],
) {
    let n = x.len();
    // The task's ends open and close a row (`w ≥ 2`).
    (t[0], tc[0]) = max2_with_code::<NAN, T>(x[0], x[1], (1, 2));
    (t[n - 1], tc[n - 1]) = max2_with_code::<NAN, T>(x[n - 2], x[n - 1], (0, 1));
    debug_assert!(w >= 2 && n.is_multiple_of(w) && edges.len() >= n);
    for i in 1..n - 1 {
        let (first, last) = (edges[i] & FIRST_COLUMN != 0, edges[i] & LAST_COLUMN != 0);
        let (l, kl) = (pick(first, x[i], x[i - 1]), pick(first, 1, 0));
        let (r, kr) = (pick(last, x[i], x[i + 1]), pick(last, 1, 2));
        (t[i], tc[i]) = max3_with_code::<NAN, T>(l, x[i], r, (kl, 1, kr));
    }
}

/// `if on { a } else { b }`, branch-free.
#[inline(always)]
fn pick<V>(on: bool, a: V, b: V) -> V {
    select_unpredictable(on, a, b)
}

/// The second pass: the maximum of three row maxima and the tap code of the winner's arg-max.
/// At a plane's top or bottom row the row beyond it is taken as the centre row again, as along x.
#[inline(always)]
fn along_y_with_argmax<const NAN: bool, T: WithDType>(
    t: &[T],
    tc: &[u8],
    (o, code): (Slots<'_, T>, Slots<'_, u8>),
    w: usize,
    edges: &[u8],
) -> (Filled, Filled) {
    let n = t.len();
    let middle = n - 2 * w;
    let ((o_top, o), (c_top, c)) = (o.split_at(w), code.split_at(w));
    let ((o_mid, o_bottom), (c_mid, c_bottom)) = (o.split_at(middle), c.split_at(middle));
    // The task's first and last rows open and close a plane (`h ≥ 2`).
    let top = (0..w).map(|i| {
        let codes = (3 + tc[i], 6 + tc[i + w]);
        max2_with_code::<NAN, T>(t[i], t[i + w], codes)
    });
    let bottom = (n - w..n).map(|i| {
        let codes = (tc[i - w], 3 + tc[i]);
        max2_with_code::<NAN, T>(t[i - w], t[i], codes)
    });
    // Between them, each row with the rows above and below it: the three as slices side by side.
    let rows = |from: usize| t[from..from + middle].iter().zip(&tc[from..from + middle]);
    let mid = rows(0)
        .zip(rows(w).zip(&edges[w..n - w]))
        .zip(rows(2 * w))
        .map(|(((&up, &k_up), ((&at, &k_at), &e)), (&down, &k_down))| {
            let (top, bottom) = (e & FIRST_ROW != 0, e & LAST_ROW != 0);
            let (a, ka) = (pick(top, at, up), pick(top, 3 + k_at, k_up));
            let (c, kc) = (pick(bottom, at, down), pick(bottom, 3 + k_at, 6 + k_down));
            max3_with_code::<NAN, T>(a, at, c, (ka, 3 + k_at, kc))
        });
    let (top, mid, bottom) = (
        fill_pair(o_top, c_top, top),
        fill_pair(o_mid, c_mid, mid),
        fill_pair(o_bottom, c_bottom, bottom),
    );
    (
        top.0.join(mid.0).join(bottom.0),
        top.1.join(mid.1).join(bottom.1),
    )
}

/// The input gradient of the 3×3 / stride 1 / padding 1 max-pool from the forward's arg-max
/// codes, as a gather: input `i` sums the gradients of the outputs `o = i + d` whose code is the
/// tap that points back at `i`, taking the outputs in row-major order (the order the general
/// path's scatter adds them, so the same bits). An output never points into the padding, so a
/// shift that wraps to another row or plane never matches and needs no edge case.
pub(super) fn same_3x3_max_backward<T: WithDType>(
    argmax: &[u8],
    grad: &[T],
    h: usize,
    w: usize,
) -> Result<Vec<T>> {
    let plane = h * w;
    let per_task = plane * (TASK_ELEMENTS / plane).max(1);
    // Every input's gradient is written once, task by task: not zero-filled first.
    let (gx, _) = par_build(grad.len(), per_task, |i, gx| {
        let at = i * per_task..i * per_task + gx.len();
        let (argmax, grad) = (&argmax[at.clone()], &grad[at]);
        (wide!(|| gather_3x3(argmax, grad, gx, w)), ())
    })?;
    Ok(gx)
}

/// One task of [`same_3x3_max_backward`], whole planes: each input's nine terms summed in a
/// register, in one pass (a pass per tap read and wrote every sum nine times). Tap `t` (`ky·3 +
/// kx`) points back at input `i` from output `i + w + 1 − (ky·w + kx)`: tap 8 (bottom right) from
/// the output up and left of it, the first in row-major order, so the taps go from 8 down.
#[inline(always)]
fn gather_3x3<T: WithDType>(argmax: &[u8], grad: &[T], gx: Slots<'_, T>, w: usize) -> Filled {
    let n = gx.len();
    // How far an output lies from the inputs it points at, either way.
    let reach = w + 1;
    // Where the output that points at input `i` through tap `8 − k` lies, from `i − reach`.
    let from = |k: usize| 2 * reach - ((8 - k) / 3 * w + (8 - k) % 3);
    let zero = T::zero();
    let term = |o: usize, k: usize| select_unpredictable(argmax[o] == (8 - k) as u8, grad[o], zero);
    // Inputs near the task's ends: only the outputs inside it.
    let at_edge = |i: usize| {
        (0..9)
            .filter_map(|k| {
                (i + from(k))
                    .checked_sub(reach)
                    .filter(|&o| o < n)
                    .map(|o| (o, k))
            })
            .fold(zero, |sum, (o, k)| sum + term(o, k))
    };
    if n <= 2 * reach {
        return gx.fill((0..n).map(at_edge));
    }
    let len = n - 2 * reach;
    let (head, rest) = gx.split_at(reach);
    let (middle, tail) = rest.split_at(len);
    let codes: [&[u8]; 9] = std::array::from_fn(|k| &argmax[from(k)..from(k) + len]);
    let grads: [&[T]; 9] = std::array::from_fn(|k| &grad[from(k)..from(k) + len]);
    let head = head.fill((0..reach).map(at_edge));
    let middle = middle.fill_each(
        #[inline(always)]
        |j| {
            let mut sum = zero;
            for k in 0..9 {
                sum += select_unpredictable(codes[k][j] == (8 - k) as u8, grads[k][j], zero);
            }
            sum
        },
    );
    head.join(middle)
        .join(tail.fill((n - reach..n).map(at_edge)))
}

/// The 3×3 / stride 2 / no-padding max-pool of `[planes, h, w]` (floor or ceil mode, `oh × ow`
/// outputs per plane; h, w ≥ 3), with each output's arg-max tap code `ky·3 + kx` from its
/// window's top-left corner `(2·oy, 2·ox)`. Two passes over each task's planes: along x at
/// stride 1 into a [`Scratch`] (the 3-wide maximum centred on every input,
/// [`along_x_with_argmax`]: contiguous, so it vectorises; a window `2·ox .. 2·ox + 2` is the one
/// centred on `2·ox + 1`, and the clipped last window of ceil mode the row end's), then along y
/// at stride 2, reading every second centre. Each window is combined in the general path's
/// order, so outputs and codes are its bits. Faster than the general path even when the codes
/// are not needed (inference).
pub(super) fn max_3x3_s2_with_argmax<T: WithDType>(
    x: &[T],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> (Vec<T>, Vec<u8>) {
    let (plane, out_plane, planes_per_task) = task_planes((h, w), (oh, ow));
    let out_len = x.len() / plane * out_plane;
    let (mut out, mut code) = (vec![T::from_f64(0.0); out_len], vec![0u8; out_len]);
    let out_per_task = planes_per_task * out_plane;
    let edges = edges((planes_per_task * plane).min(x.len()), h, w);
    out.par_chunks_mut(out_per_task)
        .zip(code.par_chunks_mut(out_per_task))
        .zip(x.par_chunks(planes_per_task * plane))
        .for_each_init(Scratch::default, |s, ((o, c), x)| {
            wide!(|| by_nan!(x, s2_task(s, x, (o, c), (h, w), (oh, ow), &edges)))
        });
    (out, code)
}

/// One task of [`max_3x3_s2_with_argmax`]: whole planes `x` into their outputs and codes.
#[inline(always)]
fn s2_task<const NAN: bool, T: WithDType>(
    s: &mut Scratch<T>,
    x: &[T],
    (o, c): (&mut [T], &mut [u8]),
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    edges: &[u8],
) {
    let plane = h * w;
    let (t, tc) = s.along_x::<NAN>(x, w, edges);
    let rows = o.chunks_exact_mut(ow).zip(c.chunks_exact_mut(ow));
    for (i, (o, c)) in rows.enumerate() {
        let (p, oy) = (i / oh, i % oh);
        let row = |r: usize| {
            let s = p * plane + (2 * oy + r) * w;
            (&t[s..s + 2 * ow], &tc[s..s + 2 * ow])
        };
        if 2 * oy + 2 < h {
            down_3_rows::<NAN, T>(row(0), row(1), row(2), o, c);
        } else {
            down_2_rows::<NAN, T>(row(0), row(1), o, c);
        }
    }
}

/// One output row of [`max_3x3_s2_with_argmax`] from its window's three rows of x-maxima: the
/// centres are the odd columns.
#[inline(always)]
fn down_3_rows<const NAN: bool, T: WithDType>(
    (a, ac): (&[T], &[u8]),
    (b, bc): (&[T], &[u8]),
    (c, cc): (&[T], &[u8]),
    o: &mut [T],
    code: &mut [u8],
) {
    let (a, b, c) = (
        a.as_chunks::<2>().0,
        b.as_chunks::<2>().0,
        c.as_chunks::<2>().0,
    );
    let (ac, bc, cc) = (
        ac.as_chunks::<2>().0,
        bc.as_chunks::<2>().0,
        cc.as_chunks::<2>().0,
    );
    for (ox, (o, code)) in o.iter_mut().zip(code.iter_mut()).enumerate() {
        let codes = (ac[ox][1], 3 + bc[ox][1], 6 + cc[ox][1]);
        (*o, *code) = max3_with_code::<NAN, T>(a[ox][1], b[ox][1], c[ox][1], codes);
    }
}

/// [`down_3_rows`] for ceil mode's last window, clipped to two rows.
#[inline(always)]
fn down_2_rows<const NAN: bool, T: WithDType>(
    (a, ac): (&[T], &[u8]),
    (b, bc): (&[T], &[u8]),
    o: &mut [T],
    code: &mut [u8],
) {
    let (a, b) = (a.as_chunks::<2>().0, b.as_chunks::<2>().0);
    let (ac, bc) = (ac.as_chunks::<2>().0, bc.as_chunks::<2>().0);
    for (ox, (o, code)) in o.iter_mut().zip(code.iter_mut()).enumerate() {
        (*o, *code) = max2_with_code::<NAN, T>(a[ox][1], b[ox][1], (ac[ox][1], 3 + bc[ox][1]));
    }
}

/// The input gradient of [`max_3x3_s2_with_argmax`] from its codes: each output's gradient added
/// to its arg-max input, the outputs of a plane in row-major order from zero (the general
/// path's order, so its bits).
pub(super) fn max_3x3_s2_backward<T: WithDType>(
    argmax: &[u8],
    grad: &[T],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<T>> {
    let (plane, out_plane, planes_per_task) = task_planes((h, w), (oh, ow));
    // Each task zeroes its planes of `gx` just before adding into them, while they are in cache.
    let len = grad.len() / out_plane * plane;
    let (gx, _) = par_build(len, planes_per_task * plane, |i, gx| {
        let (filled, gx) = gx.zeroed();
        let at = i * planes_per_task * out_plane..;
        let outputs = gx.len() / plane * out_plane;
        let (argmax, grad) = (&argmax[at.clone()][..outputs], &grad[at][..outputs]);
        wide!(|| {
            let planes = argmax
                .chunks_exact(out_plane)
                .zip(grad.chunks_exact(out_plane));
            for (gx, (argmax, grad)) in gx.chunks_exact_mut(plane).zip(planes) {
                let rows = argmax.chunks_exact(ow).zip(grad.chunks_exact(ow));
                for (oy, (argmax, grad)) in rows.enumerate() {
                    for (ox, (&c, &g)) in argmax.iter().zip(grad).enumerate() {
                        let (ky, kx) = ((c / 3) as usize, (c % 3) as usize);
                        gx[(2 * oy + ky) * w + 2 * ox + kx] += g;
                    }
                }
            }
        });
        (filled, ())
    })?;
    Ok(gx)
}

/// The 3×3 / stride 2 average pool without padding in floor mode (the auxiliary heads'), of
/// `[planes, h, w]` into `oh × ow` per plane (h, w ≥ 3; every window whole, so every divisor is 9):
/// along x each input's 3-wide sum with its neighbours in one contiguous pass (a window
/// `2·ox .. 2·ox + 2` is the one centred on `2·ox + 1`), then along y the three rows' sums at the
/// odd columns, divided by 9 — the general path's additions in its order, so its bits.
pub(super) fn avg_3x3_s2<T: WithDType>(
    x: &[T],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<T> {
    let (plane, out_plane, planes_per_task) = task_planes((h, w), (oh, ow));
    let mut out = vec![T::zero(); x.len() / plane * out_plane];
    let nine = T::from_f64(9.0);
    out.par_chunks_mut(planes_per_task * out_plane)
        .zip(x.par_chunks(planes_per_task * plane))
        .for_each_init(Vec::new, |t, (o, x)| {
            wide!(|| {
                let n = x.len();
                t.clear();
                t.push(T::zero());
                t.extend((1..n - 1).map(|i| x[i - 1] + x[i] + x[i + 1]));
                t.push(T::zero());
                for (i, o) in o.chunks_exact_mut(ow).enumerate() {
                    let (p, oy) = (i / oh, i % oh);
                    let row = |r: usize| &t[p * plane + (2 * oy + r) * w..][..2 * ow];
                    let (a, b, c) = (row(0), row(1), row(2));
                    for (ox, o) in o.iter_mut().enumerate() {
                        let col = 2 * ox + 1;
                        *o = (a[col] + b[col] + c[col]) / nine;
                    }
                }
            })
        });
    out
}

/// The input gradient of [`avg_3x3_s2`]: each output's gradient divided by 9 and added to the
/// nine inputs of its window, the outputs of a plane in row-major order from zero (the general
/// path's order, so its bits).
pub(super) fn avg_3x3_s2_backward<T: WithDType>(
    grad: &[T],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<T> {
    let (plane, out_plane, planes_per_task) = task_planes((h, w), (oh, ow));
    let mut gx = vec![T::zero(); grad.len() / out_plane * plane];
    let nine = T::from_f64(9.0);
    gx.par_chunks_mut(planes_per_task * plane)
        .zip(grad.par_chunks(planes_per_task * out_plane))
        .for_each(|(gx, grad)| {
            for (gx, grad) in gx.chunks_exact_mut(plane).zip(grad.chunks_exact(out_plane)) {
                for (oy, grad) in grad.chunks_exact(ow).enumerate() {
                    for (ox, &g) in grad.iter().enumerate() {
                        let share = g / nine;
                        for ky in 0..3 {
                            let at = (2 * oy + ky) * w + 2 * ox;
                            for v in &mut gx[at..at + 3] {
                                *v += share;
                            }
                        }
                    }
                }
            }
        });
    gx
}

/// A pool from `h × w` planes to `oh × ow`: the planes' sizes in and out, and whole planes per
/// parallel task.
fn task_planes((h, w): (usize, usize), (oh, ow): (usize, usize)) -> (usize, usize, usize) {
    let plane = h * w;
    (plane, oh * ow, (TASK_ELEMENTS / plane).max(1))
}
