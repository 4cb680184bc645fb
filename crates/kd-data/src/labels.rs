//! Which training images keep their label when only some do (`data.labels`): a seeded choice,
//! stratified by class, so a small labelled set has every class in its share.

use crate::rng::{rng, shuffle, Stream};
use crate::{DataError, Result};
use sha2::{Digest, Sha256};

/// SHA-256 of a label mask (one byte per training row, 1 = labelled): part of what a stage's
/// inputs and a knowledge file's dataset are checked against.
pub fn mask_fingerprint(mask: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"kd-labelled/1");
    h.update((mask.len() as u64).to_le_bytes());
    h.update(mask);
    crate::files::hex(&h.finalize())
}

/// The rows of `rows` that keep their label: `count` of them, each class keeping its share of
/// `rows` (at least one image; largest remainders decide the rounding), drawn per class with
/// `seed`. Sorted. `labels[r]` is row `r`'s class.
pub fn stratified(
    labels: &[u32],
    rows: &[u32],
    count: usize,
    classes: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    let mut by_class: Vec<Vec<u32>> = vec![Vec::new(); classes];
    for &r in rows {
        let c = labels[r as usize] as usize;
        by_class
            .get_mut(c)
            .ok_or_else(|| {
                DataError::Config(format!("row {r} has label {c}, not below {classes}"))
            })?
            .push(r);
    }
    let present = by_class.iter().filter(|v| !v.is_empty()).count();
    if count > rows.len() || count < present {
        return Err(DataError::Config(format!(
            "data.labels: {count} labelled images asked for, but the training split has {} images \
             in {present} classes (at least one label per class, at most every image)",
            rows.len()
        )));
    }
    let quota = quotas(&by_class.iter().map(Vec::len).collect::<Vec<_>>(), count);
    let mut kept = Vec::with_capacity(count);
    for (c, (mut members, q)) in by_class.into_iter().zip(quota).enumerate() {
        shuffle(&mut members, &mut rng(seed, Stream::Labels, c as u64));
        kept.extend_from_slice(&members[..q]);
    }
    kept.sort_unstable();
    Ok(kept)
}

/// How many of each class's `sizes[c]` images keep a label so that they sum to `count`: one for
/// every class that has images, the rest in proportion to what is left, by largest remainder
/// (ties to the lower class).
fn quotas(sizes: &[usize], count: usize) -> Vec<usize> {
    let base: Vec<usize> = sizes.iter().map(|&n| n.min(1)).collect();
    let left = count - base.iter().sum::<usize>();
    let spare: Vec<usize> = sizes.iter().zip(&base).map(|(n, b)| n - b).collect();
    let total: usize = spare.iter().sum();
    if total == 0 {
        return base;
    }
    let mut q: Vec<usize> = base
        .iter()
        .zip(&spare)
        .map(|(b, s)| b + s * left / total)
        .collect();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    // Largest remainder first; the remainder of class c is (s_c · left) mod total.
    order.sort_by_key(|&c| (std::cmp::Reverse(spare[c] * left % total), c));
    let mut missing = count - q.iter().sum::<usize>();
    for c in order {
        if missing == 0 {
            break;
        }
        if q[c] < sizes[c] {
            q[c] += 1;
            missing -= 1;
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_each_class_share_and_is_seeded() {
        // 3 classes of 50, 30 and 20 rows; 10 labels → 5, 3, 2.
        let labels: Vec<u32> = (0..100)
            .map(|i| {
                if i < 50 {
                    0
                } else if i < 80 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let rows: Vec<u32> = (0..100).collect();
        let kept = stratified(&labels, &rows, 10, 3, 7).unwrap();
        let per = |c: u32| kept.iter().filter(|&&r| labels[r as usize] == c).count();
        assert_eq!((per(0), per(1), per(2)), (5, 3, 2));
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(kept, stratified(&labels, &rows, 10, 3, 7).unwrap());
        assert_ne!(kept, stratified(&labels, &rows, 10, 3, 8).unwrap());
        // Only rows of `rows` are chosen.
        let odd: Vec<u32> = (0..100).filter(|r| r % 2 == 1).collect();
        let kept = stratified(&labels, &odd, 6, 3, 0).unwrap();
        assert!(kept.iter().all(|r| r % 2 == 1) && kept.len() == 6);
    }

    #[test]
    fn every_class_keeps_one_and_counts_sum_up() {
        assert_eq!(quotas(&[98, 1, 1], 3), vec![1, 1, 1]);
        assert_eq!(quotas(&[98, 1, 1], 50), vec![48, 1, 1]);
        assert_eq!(quotas(&[10, 10, 10], 30), vec![10, 10, 10]);
        assert_eq!(quotas(&[5, 5, 0], 4), vec![2, 2, 0]);
        for count in 3..=60 {
            let q = quotas(&[25, 20, 15], count);
            assert_eq!(q.iter().sum::<usize>(), count, "{count}");
            assert!(q.iter().zip([25, 20, 15]).all(|(a, b)| *a >= 1 && *a <= b));
        }
    }

    #[test]
    fn impossible_budgets_are_refused() {
        let labels = vec![0u32, 0, 1, 1, 2];
        let rows: Vec<u32> = (0..5).collect();
        let e = stratified(&labels, &rows, 2, 3, 0).unwrap_err().to_string();
        assert!(e.contains("data.labels") && e.contains("3 classes"), "{e}");
        assert!(stratified(&labels, &rows, 6, 3, 0).is_err());
        assert_eq!(stratified(&labels, &rows, 5, 3, 0).unwrap(), rows);
    }
}
