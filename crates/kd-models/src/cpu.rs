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

/// The output storage of a float kernel: `$body` evaluated with `$t` the element type of
/// `$first` (f32 or f64; the other inputs must match, which [`contiguous`] checks), wrapped in the
/// matching `CpuStorage` variant. `$what` names the op in the error for other types.
macro_rules! float_storage {
    ($first:expr, $what:expr, $t:ident => $body:expr) => {
        match $first {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                candle_core::CpuStorage::F32($body)
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                candle_core::CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{} supports f32 and f64", $what),
        }
    };
}
pub(crate) use float_storage;
