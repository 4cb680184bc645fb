//! What the CPU kernels of our custom ops share.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The elements of a contiguous CPU tensor, in order; our kernels take no other layout.
pub(crate) fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("a custom op expects a contiguous input"),
    }
}

/// Runs `f` compiled for AVX2 when the CPU has it (checked at run time; std caches the answer),
/// else as built (x86-64's baseline: 4-lane SSE2 vectors). For the element-wise loops of our
/// kernels that compare, select and copy (the pools): the same code in 8-lane vectors, about
/// twice as fast where its data is in cache, and the same bits: no arithmetic is reordered or
/// fused (Rust contracts no `a·b + c` into an FMA), so every lane computes what the scalar code
/// would. The loops must be inlined into `f` (`#[inline(always)]`) to be compiled for AVX2: a
/// function called out of line keeps the baseline build. So must `f` itself, which is why callers
/// write `wide!(|| ...)`: the macro marks the closure `#[inline(always)]`. A plain closure is
/// called from two places here (the AVX2 frame and the fallback), and LLVM compiled the larger
/// ones out of line, leaving the AVX2 frame a bare jump into SSE2 code — four of the pools' eight
/// tasks, found in the disassembly.
macro_rules! wide {
    ($f:expr) => {
        $crate::cpu::run_wide(
            #[inline(always)]
            $f,
        )
    };
}
pub(crate) use wide;

/// The function behind [`wide!`]; call it through the macro.
#[inline(always)]
pub(crate) fn run_wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `avx2` only enables AVX2 instructions, and this CPU has them (just checked).
        #[allow(unsafe_code)]
        return unsafe { avx2(f) };
    }
    f()
}

/// `f`, with AVX2 enabled for everything inlined into it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
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

/// One chunk of a vector being built by [`par_build`], to be filled once.
pub(crate) struct Slots<'a, T> {
    slots: &'a mut [MaybeUninit<T>],
}

/// A chunk's proof that every one of its elements was written (its address, which [`par_build`]
/// checks against the chunk it lent).
pub(crate) struct Filled {
    at: usize,
}

impl<T: WithDType> Slots<'_, T> {
    /// Writes `values` in order into the chunk; elements they do not reach are zero.
    #[inline(always)]
    pub fn fill(self, values: impl Iterator<Item = T>) -> Filled {
        let at = self.slots.as_ptr() as usize;
        let mut written = 0;
        for (slot, v) in self.slots.iter_mut().zip(values) {
            slot.write(v);
            written += 1;
        }
        for slot in &mut self.slots[written..] {
            slot.write(T::from_f64(0.0));
        }
        Filled { at }
    }

    /// [`Slots::fill`], then `read` on the chunk just written, while it is in cache.
    #[inline(always)]
    pub fn fill_and_read<R>(
        self,
        values: impl Iterator<Item = T>,
        read: impl FnOnce(&[T]) -> R,
    ) -> (Filled, R) {
        let Slots { slots } = self;
        let filled = Slots { slots: &mut *slots }.fill(values);
        // SAFETY: `fill` wrote every element of `slots` (the values, then zeros for any it did not
        // reach), and `MaybeUninit<T>` has `T`'s layout.
        #[allow(unsafe_code)]
        let written = unsafe { &*(&*slots as *const [MaybeUninit<T>] as *const [T]) };
        (filled, read(written))
    }
}

/// A fresh vector of `len` elements built in parallel, `chunk` elements per task (the last one
/// shorter): `f(i, slots)` fills chunk `i` and returns a result of its own, collected in chunk
/// order. The vector is not zero-filled first — each element is written once, where a
/// `vec![0; len]` followed by the writes is two passes over memory — and it is handed out only
/// once every chunk has proved it was filled.
pub(crate) fn par_build<T: WithDType, R: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, Slots<'_, T>) -> (Filled, R) + Sync,
) -> Result<(Vec<T>, Vec<R>)> {
    let mut buf: Vec<T> = Vec::with_capacity(len);
    let done: Vec<(bool, R)> = buf.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, slots)| {
            let at = slots.as_ptr() as usize;
            let (filled, r) = f(i, Slots { slots });
            (filled.at == at, r)
        })
        .collect();
    if done.iter().any(|(ok, _)| !ok) {
        candle_core::bail!("a kernel returned without filling its share of its output");
    }
    // SAFETY: the chunks tile `0..len` of the capacity, and each one was filled (its `Filled`,
    // which only `Slots::fill` of that very chunk makes, matched its address), so the first
    // `len` elements are initialised.
    #[allow(unsafe_code)]
    unsafe {
        buf.set_len(len)
    };
    Ok((buf, done.into_iter().map(|(_, r)| r).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_build_fills_every_chunk_in_order() {
        let (v, sums) = par_build::<f32, usize>(10, 4, |i, s| {
            let n = if i == 2 { 2 } else { 4 };
            (s.fill((0..n).map(|k| (i * 4 + k) as f32)), i)
        })
        .unwrap();
        assert_eq!(v, (0..10).map(|k| k as f32).collect::<Vec<_>>());
        assert_eq!(sums, vec![0, 1, 2]);
        // Values that fall short leave zeros, never uninitialised memory.
        let (v, _) =
            par_build::<f64, ()>(5, 5, |_, s| (s.fill([1.0, 2.0].into_iter()), ())).unwrap();
        assert_eq!(v, vec![1.0, 2.0, 0.0, 0.0, 0.0]);
        // A proof from another chunk is refused.
        let other = Filled { at: 1 };
        let stolen = std::sync::Mutex::new(Some(other));
        let r = par_build::<f32, ()>(4, 2, |i, s| {
            if i == 0 {
                (stolen.lock().unwrap().take().unwrap(), ())
            } else {
                (s.fill(std::iter::repeat(1.0)), ())
            }
        });
        assert!(r.is_err());
    }

    #[test]
    fn fill_and_read_reads_what_was_written_zeros_included() {
        let (v, seen) = par_build::<f32, Vec<f32>>(7, 4, |i, s| {
            let n = if i == 0 { 3 } else { 2 };
            s.fill_and_read((0..n).map(|k| (10 * i + k + 1) as f32), <[f32]>::to_vec)
        })
        .unwrap();
        assert_eq!(v, vec![1.0, 2.0, 3.0, 0.0, 11.0, 12.0, 0.0]);
        assert_eq!(seen, vec![vec![1.0, 2.0, 3.0, 0.0], vec![11.0, 12.0, 0.0]]);
    }
}
