//! The inner loops of the BatchNorm's statistics and gradient sums, [`LANES`] partial sums at a
//! time.
//!
//! Written as plain loops over `[T; LANES]` (below, for every type), LLVM did not lay the eight
//! lanes side by side: it paired each lane's two sums in one SSE register and converted f32 to
//! f64 one element at a time, about six instructions per element (`objdump` of the training
//! step, `docs/speed.md`, eighteenth round). For f32 on a CPU with AVX2 the same operations run
//! in the same order with the eight lanes in one 256-bit register (two for f64 sums), so the
//! bits are the plain loops'.

use super::{Affine, BLOCK, LANES};
use candle_core::WithDType;

/// The state of [`super::gradient_sums`] after whole chunks of [`LANES`]: the row's sums so far
/// in f64, and each lane's sums since the last flush in `T`'s arithmetic.
pub(super) struct GradientLanes<T> {
    pub sg: f64,
    pub sgz: f64,
    pub s: [T; LANES],
    pub q: [T; LANES],
}

impl<T: WithDType> GradientLanes<T> {
    fn new() -> Self {
        let zero = T::from_f64(0.0);
        Self {
            sg: 0.0,
            sgz: 0.0,
            s: [zero; LANES],
            q: [zero; LANES],
        }
    }

    /// Adds the lanes' sums to the row's, in lane order and in f64, and empties the lanes.
    #[inline(always)]
    pub fn flush(&mut self) {
        self.sg += self.s.iter().map(|v| v.to_f64()).sum::<f64>();
        self.sgz += self.q.iter().map(|v| v.to_f64()).sum::<f64>();
        let zero = T::from_f64(0.0);
        (self.s, self.q) = ([zero; LANES], [zero; LANES]);
    }
}

/// Whole chunks of `z` and `dy`, [`LANES`] elements each.
pub(super) type Chunks<'a, T> = (&'a [[T; LANES]], &'a [[T; LANES]]);

/// An element type's lane loops; the provided ones are the plain loops.
pub(super) trait Lanes: WithDType {
    /// `(Σ(x − k), Σ(x − k)²)` of each lane over `chunks`, in f64.
    fn moment_lanes(chunks: &[[Self; LANES]], k: f64) -> ([f64; LANES], [f64; LANES]) {
        plain_moments(chunks, k)
    }

    /// `Σg` and `Σg·(z − μ)`, `g = dy·[x > 0]` with `(x, z − μ)` from `f`, of each lane over
    /// the chunks in `T`'s arithmetic, flushed into the row's f64 sums every [`BLOCK`] elements.
    fn gradient_lanes(chunks: Chunks<'_, Self>, f: Affine<Self>) -> GradientLanes<Self> {
        plain_gradients(chunks, f)
    }
}

impl Lanes for f64 {}

impl Lanes for f32 {
    fn moment_lanes(chunks: &[[f32; LANES]], k: f64) -> ([f64; LANES], [f64; LANES]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the function only needs AVX2, which this CPU has (just checked).
            #[allow(unsafe_code)]
            return unsafe { avx2::moments(chunks, k) };
        }
        plain_moments(chunks, k)
    }

    fn gradient_lanes(chunks: Chunks<'_, f32>, f: Affine<f32>) -> GradientLanes<f32> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the function only needs AVX2, which this CPU has (just checked).
            #[allow(unsafe_code)]
            return unsafe { avx2::gradients(chunks, f) };
        }
        plain_gradients(chunks, f)
    }
}

#[inline(always)]
fn plain_moments<T: WithDType>(chunks: &[[T; LANES]], k: f64) -> ([f64; LANES], [f64; LANES]) {
    let (mut s, mut q) = ([0f64; LANES], [0f64; LANES]);
    for c in chunks {
        for l in 0..LANES {
            let d = c[l].to_f64() - k;
            s[l] += d;
            q[l] += d * d;
        }
    }
    (s, q)
}

#[inline(always)]
fn plain_gradients<T: WithDType>((z, dy): Chunks<'_, T>, f: Affine<T>) -> GradientLanes<T> {
    let zero = T::from_f64(0.0);
    let mut acc = GradientLanes::new();
    for (i, (z, d)) in z.iter().zip(dy).enumerate() {
        for l in 0..LANES {
            let (x, centred) = f.apply(z[l]);
            let g = std::hint::select_unpredictable(x > zero, d[l], zero);
            acc.s[l] += g;
            acc.q[l] += g * centred;
        }
        if (i + 1) % (BLOCK / LANES) == 0 {
            acc.flush();
        }
    }
    acc
}

/// The lane loops with the lanes side by side: `_mm256_*` operations, one per operation of the
/// plain loops, in their order (no fused multiply-add: the plain loops round the product).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Affine, Chunks, GradientLanes, BLOCK, LANES};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    fn load(c: &[f32; LANES]) -> __m256 {
        // SAFETY: `c` is 8 readable f32 (32 bytes), and `loadu` needs no alignment.
        #[allow(unsafe_code)]
        unsafe {
            _mm256_loadu_ps(c.as_ptr())
        }
    }

    #[target_feature(enable = "avx2")]
    fn store_ps(v: __m256) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        // SAFETY: `out` is 8 writable f32 (32 bytes), and `storeu` needs no alignment.
        #[allow(unsafe_code)]
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), v)
        };
        out
    }

    #[target_feature(enable = "avx2")]
    fn store_pd(lo: __m256d, hi: __m256d) -> [f64; LANES] {
        let mut out = [0f64; LANES];
        // SAFETY: `out` is 8 writable f64, the two stores 4 each, and `storeu` needs no
        // alignment.
        #[allow(unsafe_code)]
        unsafe {
            _mm256_storeu_pd(out.as_mut_ptr(), lo);
            _mm256_storeu_pd(out.as_mut_ptr().add(4), hi);
        };
        out
    }

    /// [`super::plain_moments`] for f32: lanes 0–3 and 4–7 in two registers of f64.
    #[target_feature(enable = "avx2")]
    pub(super) fn moments(chunks: &[[f32; LANES]], k: f64) -> ([f64; LANES], [f64; LANES]) {
        let kk = _mm256_set1_pd(k);
        let (mut s0, mut s1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let (mut q0, mut q1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        for c in chunks {
            let v = load(c);
            let d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), kk);
            let d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)), kk);
            s0 = _mm256_add_pd(s0, d0);
            s1 = _mm256_add_pd(s1, d1);
            q0 = _mm256_add_pd(q0, _mm256_mul_pd(d0, d0));
            q1 = _mm256_add_pd(q1, _mm256_mul_pd(d1, d1));
        }
        (store_pd(s0, s1), store_pd(q0, q1))
    }

    /// [`super::plain_gradients`] for f32: `g` is `dy` where `x > 0` (ordered: NaN is not) and
    /// +0 elsewhere, as the plain loop's select.
    #[target_feature(enable = "avx2")]
    pub(super) fn gradients((z, dy): Chunks<'_, f32>, f: Affine<f32>) -> GradientLanes<f32> {
        let zero = _mm256_setzero_ps();
        let (m, a, b) = (
            _mm256_set1_ps(f.mean),
            _mm256_set1_ps(f.a),
            _mm256_set1_ps(f.b),
        );
        let (mut s, mut q) = (zero, zero);
        let mut acc = GradientLanes::new();
        for (i, (z, d)) in z.iter().zip(dy).enumerate() {
            let centred = _mm256_sub_ps(load(z), m);
            let x = _mm256_add_ps(_mm256_mul_ps(centred, a), b);
            let g = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, zero), load(d));
            s = _mm256_add_ps(s, g);
            q = _mm256_add_ps(q, _mm256_mul_ps(g, centred));
            if (i + 1) % (BLOCK / LANES) == 0 {
                (acc.s, acc.q) = (store_ps(s), store_ps(q));
                acc.flush();
                (s, q) = (zero, zero);
            }
        }
        (acc.s, acc.q) = (store_ps(s), store_ps(q));
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::rand;
    use crate::norm::RowStats;

    /// f32 rows of `n` values around `offset`, with the values a ReLU mask and the sums meet at
    /// their edges: exact zeros of both signs, a NaN and an infinity.
    fn row(n: usize, seed: u64, offset: f32) -> Vec<f32> {
        let mut v: Vec<f32> = rand(&[n], seed)
            .iter()
            .map(|x| *x as f32 + offset)
            .collect();
        for (i, special) in [0.0, -0.0, f32::NAN, f32::INFINITY].into_iter().enumerate() {
            if let Some(x) = v.get_mut(7 * i + 3) {
                *x = special;
            }
        }
        v
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn lane_bits(a: &GradientLanes<f32>) -> (u64, u64, Vec<u32>, Vec<u32>) {
        let b = |v: &[f32; LANES]| v.iter().map(|x| x.to_bits()).collect();
        (a.sg.to_bits(), a.sgz.to_bits(), b(&a.s), b(&a.q))
    }

    /// The f32 lanes (AVX2 where the CPU has it) give the plain loops' bits, NaNs included, for
    /// rows that end inside a block and on its edge.
    #[test]
    fn f32_lanes_have_the_plain_loops_bits() {
        for (n, seed) in [(8usize, 1u64), (64, 2), (72, 3), (1000, 4), (50176, 5)] {
            let z = row(n, seed, 0.1);
            let dy = row(n, seed + 100, 0.0);
            let (zc, dc) = (z.as_chunks::<LANES>().0, dy.as_chunks::<LANES>().0);
            let (s, q) = f32::moment_lanes(zc, 0.25);
            let (ps, pq) = plain_moments(zc, 0.25);
            assert_eq!((bits(&s), bits(&q)), (bits(&ps), bits(&pq)), "{n}: moments");
            let stats = RowStats {
                mean: 0.05,
                var: 0.3,
            };
            let f = Affine::new(stats, 1.3f32, -0.2);
            let fast = f32::gradient_lanes((zc, dc), f);
            let plain = plain_gradients((zc, dc), f);
            assert_eq!(lane_bits(&fast), lane_bits(&plain), "{n}: gradient sums");
        }
    }
}
