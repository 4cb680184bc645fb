//! Seeded batching from one tensor, and augmentation described by replayable view parameters.

use crate::Result;
use candle_core::{Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Independent random streams derived from one seed, one per purpose, so that changing how much
/// randomness one consumer draws never shifts another.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Validation = 1,
    Shuffle = 2,
    Augment = 3,
}

/// A ChaCha stream for `(seed, purpose, index)`.
pub fn rng(seed: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((stream as u64) << 56) ^ index);
    rng
}

/// Training augmentation: a random crop from the image padded by `crop_padding` pixels, and a
/// horizontal flip with probability 1/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    pub crop_padding: usize,
    pub horizontal_flip: bool,
}

/// One augmented view of an image, as parameters, so it can be stored and replayed exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Shift of the crop window, in pixels (`-pad..=pad`).
    pub dx: i32,
    pub dy: i32,
    pub flip: bool,
}

impl Augment {
    /// The view of dataset row `row` in `epoch`: depends on nothing else, not on the batch the
    /// row lands in.
    pub fn view(&self, seed: u64, epoch: usize, row: u32) -> View {
        let mut rng = rng(seed, Stream::Augment, ((epoch as u64) << 32) | row as u64);
        let span = 2 * self.crop_padding as u64 + 1;
        let r = rng.next_u64();
        let p = self.crop_padding as i32;
        View {
            dx: (r % span) as i32 - p,
            dy: ((r >> 20) % span) as i32 - p,
            flip: self.horizontal_flip && (r >> 63) == 1,
        }
    }
}

impl View {
    /// Writes the view of `src` (`[c, h, w]`) into `dst`; pixels shifted in from outside take
    /// `fill[c]`.
    pub fn apply(&self, src: &[f32], dst: &mut [f32], c: usize, h: usize, w: usize, fill: &[f32]) {
        for (ch, &pad) in fill.iter().enumerate().take(c) {
            let plane = ch * h * w;
            for y in 0..h {
                let sy = y as i32 + self.dy;
                for x in 0..w {
                    let xo = if self.flip { w - 1 - x } else { x };
                    let sx = xo as i32 + self.dx;
                    dst[plane + y * w + x] = if sy >= 0 && sy < h as i32 && sx >= 0 && sx < w as i32
                    {
                        src[plane + sy as usize * w + sx as usize]
                    } else {
                        pad
                    };
                }
            }
        }
    }
}

/// One mini-batch: images `[b, c, h, w]` f32, labels `[b]` u32, and the dataset rows they came
/// from `[b]` u32 (how a student finds the teacher's logits for them).
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub rows: Tensor,
    pub len: usize,
}

/// Mini-batches over a subset of rows of one image tensor, in order or shuffled per epoch.
pub struct Batches<'a> {
    images: &'a Tensor,
    labels: &'a Tensor,
    order: Vec<u32>,
    batch_size: usize,
    pos: usize,
    augment: Option<(Augment, u64, usize, Vec<f32>)>,
}

impl<'a> Batches<'a> {
    /// Batches over `rows` in the order given (evaluation).
    pub fn new(images: &'a Tensor, labels: &'a Tensor, rows: &[u32], batch_size: usize) -> Self {
        Self {
            images,
            labels,
            order: rows.to_vec(),
            batch_size: batch_size.max(1),
            pos: 0,
            augment: None,
        }
    }

    /// Shuffles the rows with the stream of `(seed, epoch)`.
    pub fn shuffled(mut self, seed: u64, epoch: usize) -> Self {
        crate::dataset::shuffle(
            &mut self.order,
            &mut rng(seed, Stream::Shuffle, epoch as u64),
        );
        self
    }

    /// Augments every image with its view for `(seed, epoch, row)`; `fill` is the normalised
    /// value of a black pixel per channel.
    pub fn augmented(mut self, augment: Augment, seed: u64, epoch: usize, fill: Vec<f32>) -> Self {
        self.augment = Some((augment, seed, epoch, fill));
        self
    }

    pub fn num_batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    fn make(&self, rows: &[u32]) -> Result<Batch> {
        let device = self.images.device();
        let idx = Tensor::from_slice(rows, rows.len(), device)?;
        let mut images = self.images.index_select(&idx, 0)?;
        if let Some((augment, seed, epoch, fill)) = &self.augment {
            let (b, c, h, w) = images.dims4()?;
            let src = images.flatten_all()?.to_vec1::<f32>()?;
            let mut dst = vec![0f32; src.len()];
            let n = c * h * w;
            for (i, &row) in rows.iter().enumerate() {
                augment.view(*seed, *epoch, row).apply(
                    &src[i * n..(i + 1) * n],
                    &mut dst[i * n..(i + 1) * n],
                    c,
                    h,
                    w,
                    fill,
                );
            }
            images = Tensor::from_vec(dst, (b, c, h, w), &Device::Cpu)?.to_device(device)?;
        }
        Ok(Batch {
            images,
            labels: self.labels.index_select(&idx, 0)?,
            rows: idx,
            len: rows.len(),
        })
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.order.len() {
            return None;
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let rows = self.order[self.pos..end].to_vec();
        self.pos = end;
        Some(self.make(&rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(n: usize) -> (Tensor, Tensor) {
        let images: Vec<f32> = (0..n * 4).map(|i| i as f32).collect();
        let labels: Vec<u32> = (0..n as u32).collect();
        (
            Tensor::from_vec(images, (n, 1, 2, 2), &Device::Cpu).unwrap(),
            Tensor::from_vec(labels, n, &Device::Cpu).unwrap(),
        )
    }

    fn labels_of(b: Batches) -> Vec<u32> {
        b.flat_map(|b| b.unwrap().labels.to_vec1::<u32>().unwrap())
            .collect()
    }

    #[test]
    fn batches_cover_the_rows_once_and_shuffle_per_seed_and_epoch() {
        let (x, y) = tensors(10);
        let rows: Vec<u32> = (0..10).collect();
        let plain = Batches::new(&x, &y, &rows, 4);
        assert_eq!(plain.num_batches(), 3);
        assert_eq!(labels_of(plain), rows);
        let a = labels_of(Batches::new(&x, &y, &rows, 4).shuffled(1, 0));
        let b = labels_of(Batches::new(&x, &y, &rows, 4).shuffled(1, 0));
        let c = labels_of(Batches::new(&x, &y, &rows, 4).shuffled(1, 1));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, rows);
    }

    #[test]
    fn a_view_shifts_and_flips_with_fill() {
        // 1 channel, 2x3: [[1,2,3],[4,5,6]]
        let src = [1., 2., 3., 4., 5., 6.];
        let mut dst = [0.; 6];
        View {
            dx: 1,
            dy: 0,
            flip: false,
        }
        .apply(&src, &mut dst, 1, 2, 3, &[-1.]);
        assert_eq!(dst, [2., 3., -1., 5., 6., -1.]);
        View {
            dx: 0,
            dy: -1,
            flip: true,
        }
        .apply(&src, &mut dst, 1, 2, 3, &[-1.]);
        assert_eq!(dst, [-1., -1., -1., 3., 2., 1.]);
    }

    #[test]
    fn views_are_seeded_bounded_and_varied() {
        let aug = Augment {
            crop_padding: 2,
            horizontal_flip: true,
        };
        let views: Vec<View> = (0..200).map(|r| aug.view(5, 0, r)).collect();
        assert_eq!(
            views,
            (0..200).map(|r| aug.view(5, 0, r)).collect::<Vec<_>>()
        );
        assert!(views.iter().all(|v| v.dx.abs() <= 2 && v.dy.abs() <= 2));
        let flips = views.iter().filter(|v| v.flip).count();
        assert!((60..140).contains(&flips), "{flips} flips of 200");
        assert!(views.iter().any(|v| v.dx == -2) && views.iter().any(|v| v.dy == 2));
        let epoch = |e| (0..20).map(|r| aug.view(5, e, r)).collect::<Vec<_>>();
        assert_ne!(epoch(1), epoch(2));
    }
}
