//! Seeded randomness: one ChaCha stream per purpose, so that changing how much randomness one
//! consumer draws never shifts another, and a shuffle that depends on the seed alone.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Independent random streams derived from one seed, one per purpose.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Validation = 1,
    Shuffle = 2,
    Augment = 3,
    TestSplit = 4,
    /// Which stored view of the knowledge file a row replays in an epoch.
    ViewChoice = 5,
    /// Which training images keep their label (`data.labels`).
    Labels = 6,
}

/// A ChaCha stream for `(seed, purpose, index)`.
pub fn rng(seed: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((stream as u64) << 56) ^ index);
    rng
}

/// Uniform in [0, 1) from 53 random bits.
pub fn unit(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Fisher-Yates with our own draw, so the order depends on the seed alone, not on a library's
/// sampling algorithm.
pub fn shuffle(xs: &mut [u32], rng: &mut impl RngCore) {
    for i in (1..xs.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        xs.swap(i, j);
    }
}
