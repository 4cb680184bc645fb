//! What the CPU kernels of our custom ops share.

use candle_core::{CpuStorage, Layout, Result, WithDType};

/// The elements of a contiguous CPU tensor, in order; our kernels take no other layout.
pub(crate) fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("a custom op expects a contiguous input"),
    }
}
