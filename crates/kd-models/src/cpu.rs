//! What the CPU kernels of our custom ops share.

use candle_core::{CpuStorage, Layout, Result, WithDType};

/// The elements of a contiguous CPU tensor, in order; our kernels take no other layout.
pub(crate) fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("a custom op expects a contiguous input"),
    }
}

/// For a kernel sliding with stride `s` over `len` inputs padded by `p` on each side, into `out`
/// outputs: the outputs `o` whose tap `t`, at input `o·s + t − p`, lies inside `0..len`.
#[inline]
pub(crate) fn tap_range(
    t: usize,
    s: usize,
    p: usize,
    len: usize,
    out: usize,
) -> std::ops::Range<usize> {
    let lo = if t >= p { 0 } else { (p - t).div_ceil(s) };
    let hi = if len + p > t {
        ((len + p - t - 1) / s + 1).min(out)
    } else {
        0
    };
    lo.min(hi)..hi
}
