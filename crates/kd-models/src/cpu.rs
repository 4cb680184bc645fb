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

/// A proof that every element of a range of slots was written: the range's addresses, which
/// [`par_build`] checks against the chunk it lent.
pub(crate) struct Filled {
    at: usize,
    end: usize,
}

impl Filled {
    /// The proof of `self`'s range and of `next`'s, which must follow it without a gap; a
    /// proof that no chunk accepts if it does not.
    #[inline(always)]
    pub fn join(self, next: Filled) -> Filled {
        let at = if self.end == next.at {
            self.at
        } else {
            usize::MAX
        };
        Filled { at, end: next.end }
    }

    /// Whether this proof names exactly the range `lent` names.
    fn covers(&self, lent: &Filled) -> bool {
        self.at == lent.at && self.end == lent.end
    }
}

impl<'a, T: WithDType> Slots<'a, T> {
    /// The proof for `slots`, once all of them are written.
    fn proof(slots: &[MaybeUninit<T>]) -> Filled {
        let range = slots.as_ptr_range();
        Filled {
            at: range.start as usize,
            end: range.end as usize,
        }
    }

    /// How many elements the slots hold.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The first `k` slots and the rest, each filled on its own (their proofs then
    /// [`Filled::join`]ed).
    pub fn split_at(self, k: usize) -> (Self, Self) {
        let (a, b) = self.slots.split_at_mut(k);
        (Slots { slots: a }, Slots { slots: b })
    }

    /// Writes `values` in order into the chunk; elements they do not reach are zero.
    #[inline(always)]
    pub fn fill(self, values: impl Iterator<Item = T>) -> Filled {
        let mut written = 0;
        for (slot, v) in self.slots.iter_mut().zip(values) {
            slot.write(v);
            written += 1;
        }
        self.fill_rest(written)
    }

    /// Writes `f(i)` into element `i`, for every element in order. For kernels that index
    /// their inputs by `i`: a loop over the slots themselves, whose length bounds `i` where the
    /// compiler can see it (a `(0..len).map(f)` given to [`Slots::fill`] kept a bounds check per
    /// read, and the 3×3 pool's gather stopped vectorising: its backward ran 6× slower).
    #[inline(always)]
    pub fn fill_each(self, mut f: impl FnMut(usize) -> T) -> Filled {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.write(f(i));
        }
        Self::proof(self.slots)
    }

    /// Every element zero, then lent out to add into (a scatter's output, zeroed chunk by
    /// chunk while it is in cache rather than all at once before).
    #[inline(always)]
    pub fn zeroed(self) -> (Filled, &'a mut [T]) {
        self.fill_and_lend(std::iter::empty())
    }

    /// [`Slots::fill`], then the chunk just written lent out as values.
    #[inline(always)]
    fn fill_and_lend(self, values: impl Iterator<Item = T>) -> (Filled, &'a mut [T]) {
        let Slots { slots } = self;
        let filled = Slots { slots: &mut *slots }.fill(values);
        // SAFETY: `fill` wrote every element of `slots` (the values, then zeros for any it did
        // not reach), and `MaybeUninit<T>` has `T`'s layout.
        #[allow(unsafe_code)]
        let written = unsafe { &mut *(slots as *mut [MaybeUninit<T>] as *mut [T]) };
        (filled, written)
    }

    /// Zeros from element `from` on (the ones before it written already), and the proof.
    #[inline(always)]
    fn fill_rest(self, from: usize) -> Filled {
        for slot in self.slots.iter_mut().skip(from) {
            slot.write(T::zero());
        }
        Self::proof(self.slots)
    }

    /// [`Slots::fill`], then `read` on the chunk just written, while it is in cache.
    #[inline(always)]
    pub fn fill_and_read<R>(
        self,
        values: impl Iterator<Item = T>,
        read: impl FnOnce(&[T]) -> R,
    ) -> (Filled, R) {
        let (filled, written) = self.fill_and_lend(values);
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
            let lent = Slots::proof(slots);
            let (filled, r) = f(i, Slots { slots });
            (filled.covers(&lent), r)
        })
        .collect();
    let results = all_filled(done)?;
    // SAFETY: the chunks tile `0..len` of the capacity, and each one was filled (its `Filled`,
    // which only `Slots`' filling methods make, once they have written the range it names,
    // matched the chunk's range), so the first `len` elements are initialised.
    #[allow(unsafe_code)]
    unsafe {
        buf.set_len(len)
    };
    Ok((buf, results))
}

/// [`par_build`] of two vectors of `len` elements at once, chunk by chunk alike (a pool's
/// outputs and its arg-max codes): `f(state, i, a, b)` fills chunk `i` of both, with a `state`
/// that `init` makes for each of rayon's tasks and that its chunks share (a scratch buffer).
pub(crate) fn par_build_pair<T: WithDType, U: WithDType, S>(
    len: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, Slots<'_, T>, Slots<'_, U>) -> (Filled, Filled) + Sync,
) -> Result<(Vec<T>, Vec<U>)> {
    let (mut a, mut b): (Vec<T>, Vec<U>) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let chunk = chunk.max(1);
    let done: Vec<(bool, ())> = a.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .zip(b.spare_capacity_mut()[..len].par_chunks_mut(chunk))
        .enumerate()
        .map_init(init, |state, (i, (sa, sb))| {
            let lent = (Slots::proof(sa), Slots::proof(sb));
            let filled = f(state, i, Slots { slots: sa }, Slots { slots: sb });
            (filled.0.covers(&lent.0) && filled.1.covers(&lent.1), ())
        })
        .collect();
    all_filled(done)?;
    // SAFETY: as in `par_build`, for each of the two vectors: their chunks tile `0..len` of
    // their capacities, and every chunk's proof matched its range.
    #[allow(unsafe_code)]
    unsafe {
        a.set_len(len);
        b.set_len(len);
    }
    Ok((a, b))
}

/// The chunks' results, if every chunk was filled.
fn all_filled<R>(done: Vec<(bool, R)>) -> Result<Vec<R>> {
    if done.iter().any(|(ok, _)| !ok) {
        candle_core::bail!("a kernel returned without filling its share of its output");
    }
    Ok(done.into_iter().map(|(_, r)| r).collect())
}

/// Writes `values` in order into `a` and `b` side by side (equal lengths); elements they do
/// not reach are zero. The proofs of both.
#[inline(always)]
pub(crate) fn fill_pair<T: WithDType, U: WithDType>(
    a: Slots<'_, T>,
    b: Slots<'_, U>,
    values: impl Iterator<Item = (T, U)>,
) -> (Filled, Filled) {
    let mut written = 0;
    for ((sa, sb), (va, vb)) in a.slots.iter_mut().zip(b.slots.iter_mut()).zip(values) {
        sa.write(va);
        sb.write(vb);
        written += 1;
    }
    (a.fill_rest(written), b.fill_rest(written))
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
        let other = Filled { at: 1, end: 9 };
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

    /// Pieces filled on their own and joined in order make a chunk's proof; a piece left out,
    /// or pieces joined out of order, make none that `par_build` accepts.
    #[test]
    fn split_pieces_prove_a_chunk_only_whole_and_in_order() {
        let (v, _) = par_build::<f32, ()>(10, 5, |i, s| {
            let (a, rest) = s.split_at(2);
            let (b, c) = rest.split_at(1);
            let base = (10 * i) as f32;
            let a = a.fill_each(|j| base + j as f32);
            let (b, zeros) = b.zeroed();
            zeros[0] += 7.0;
            let c = c.fill([base + 3.0].into_iter());
            (a.join(b).join(c), ())
        })
        .unwrap();
        assert_eq!(v, [0., 1., 7., 3., 0., 10., 11., 7., 13., 0.]);
        let left_out = par_build::<f32, ()>(4, 4, |_, s| {
            let (a, _b) = s.split_at(2);
            (a.fill_each(|_| 1.0), ())
        });
        assert!(left_out.is_err());
        let swapped = par_build::<f32, ()>(4, 4, |_, s| {
            let (a, b) = s.split_at(2);
            let (a, b) = (a.fill_each(|_| 1.0), b.fill_each(|_| 2.0));
            (b.join(a), ())
        });
        assert!(swapped.is_err());
    }

    /// Two vectors built side by side, chunk by chunk, with a state per rayon task; a chunk
    /// that leaves either one unfilled fails the whole.
    #[test]
    fn par_build_pair_fills_both_or_fails() {
        let (a, b) = par_build_pair::<f32, u8, Vec<u8>>(7, 3, Vec::new, |seen, i, a, b| {
            seen.push(i as u8);
            let n = a.len();
            fill_pair(
                a,
                b,
                (0..n).map(|j| ((3 * i + j) as f32, (i * 10 + j) as u8)),
            )
        })
        .unwrap();
        assert_eq!(a, [0., 1., 2., 3., 4., 5., 6.]);
        assert_eq!(b, [0, 1, 2, 10, 11, 12, 20]);
        let half = par_build_pair::<f32, u8, ()>(
            6,
            3,
            || (),
            |_, _, a, b| {
                let (b, _rest) = b.split_at(1);
                (a.fill_each(|_| 1.0), b.fill_each(|_| 1))
            },
        );
        assert!(half.is_err());
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
