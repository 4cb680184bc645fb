//! Seeded batching from one tensor, and augmentation described by replayable view parameters.

use crate::rng::{rng, unit, Stream};
use crate::{Normalization, Result, SourceImage};
use candle_core::{Device, Tensor};
use rand::RngCore;
use rayon::prelude::*;

/// Training augmentation; every kind flips horizontally with probability 1/2.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Augment {
    /// A random crop of the image padded by `crop_padding` pixels (small images: Fashion-MNIST,
    /// CIFAR).
    CropFlip { crop_padding: usize },
    /// torchvision's `RandomResizedCrop(size, scale, ratio)`, cut from the decoded photo (the
    /// seed's training transform).
    ResizedCropFlip {
        size: usize,
        scale: (f64, f64),
        ratio: (f64, f64),
    },
}

/// One augmented view of an image, as parameters, so it can be stored and replayed exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Shift of the crop window, in pixels (`-pad..=pad`), and flip.
    Shift { dx: i32, dy: i32, flip: bool },
    /// A box of the source photo, in its pixels, resized to the input size; and flip.
    Crop {
        x: u32,
        y: u32,
        w: u32,
        h: u32,
        flip: bool,
    },
}

impl Augment {
    /// The seed's photo transform: `RandomResizedCrop(size)` with torchvision's defaults.
    pub fn resized_crop(size: usize) -> Self {
        Self::ResizedCropFlip {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// The view of dataset row `row` in `epoch` — depends on nothing else, not on the batch the
    /// row lands in. `source` is the photo's `(width, height)` (resized crops only).
    pub fn view(&self, seed: u64, epoch: usize, row: u32, source: (u32, u32)) -> View {
        let mut rng = rng(seed, Stream::Augment, ((epoch as u64) << 32) | row as u64);
        let flip = rng.next_u64() >> 63 == 1;
        match *self {
            Augment::CropFlip { crop_padding } => {
                let span = 2 * crop_padding as u64 + 1;
                let r = rng.next_u64();
                let p = crop_padding as i32;
                View::Shift {
                    dx: (r % span) as i32 - p,
                    dy: ((r >> 20) % span) as i32 - p,
                    flip,
                }
            }
            Augment::ResizedCropFlip { scale, ratio, .. } => {
                let (w0, h0) = (source.0 as f64, source.1 as f64);
                let area = w0 * h0;
                let (lo, hi) = (ratio.0.ln(), ratio.1.ln());
                for _ in 0..10 {
                    let target = area * (scale.0 + (scale.1 - scale.0) * unit(&mut rng));
                    let aspect = (lo + (hi - lo) * unit(&mut rng)).exp();
                    let w = (target * aspect).sqrt().round();
                    let h = (target / aspect).sqrt().round();
                    if w > 0.0 && w <= w0 && h > 0.0 && h <= h0 {
                        let x = rng.next_u64() % (source.0 - w as u32 + 1) as u64;
                        let y = rng.next_u64() % (source.1 - h as u32 + 1) as u64;
                        return View::Crop {
                            x: x as u32,
                            y: y as u32,
                            w: w as u32,
                            h: h as u32,
                            flip,
                        };
                    }
                }
                // torchvision's fallback: the central crop with the ratio clamped.
                let in_ratio = w0 / h0;
                let (w, h) = if in_ratio < ratio.0 {
                    (w0, (w0 / ratio.0).round())
                } else if in_ratio > ratio.1 {
                    ((h0 * ratio.1).round(), h0)
                } else {
                    (w0, h0)
                };
                let (w, h) = (w.max(1.0) as u32, h.max(1.0) as u32);
                View::Crop {
                    x: (source.0 - w) / 2,
                    y: (source.1 - h) / 2,
                    w,
                    h,
                    flip,
                }
            }
        }
    }
}

/// The views a multi-view knowledge file stores: `count` per row, row-major (`views[row * count
/// + j]`). View 0 of every row is the image as it is (the stored entry is not used).
#[derive(Debug, Clone, Copy)]
pub struct StoredViews<'a> {
    pub count: usize,
    pub views: &'a [View],
    /// The augmentation that drew them (for a crop's output size).
    pub augment: Augment,
}

/// The stored view row `row` replays in `epoch`: uniform over `0..count`, from `(seed, epoch, row)`.
pub fn choose_view(seed: u64, epoch: usize, row: u32, count: usize) -> u32 {
    let mut r = rng(
        seed,
        Stream::ViewChoice,
        ((epoch as u64) << 32) | row as u64,
    );
    (r.next_u64() % count.max(1) as u64) as u32
}

impl View {
    /// The parameters as five integers, for storage: `(dx, dy, 0, 0, flip)` for a shift,
    /// `(x, y, w, h, flip)` for a crop.
    pub fn to_ints(&self) -> [i32; 5] {
        match *self {
            View::Shift { dx, dy, flip } => [dx, dy, 0, 0, flip as i32],
            View::Crop { x, y, w, h, flip } => {
                [x as i32, y as i32, w as i32, h as i32, flip as i32]
            }
        }
    }

    /// The inverse of [`to_ints`] for views drawn by `augment`; `None` for values no view of
    /// that kind can have.
    pub fn from_ints(v: [i32; 5], augment: &Augment) -> Option<Self> {
        let flip = match v[4] {
            0 => false,
            1 => true,
            _ => return None,
        };
        match *augment {
            Augment::CropFlip { crop_padding } => {
                let p = crop_padding as i32;
                (v[0].abs() <= p && v[1].abs() <= p && v[2] == 0 && v[3] == 0).then_some(
                    View::Shift {
                        dx: v[0],
                        dy: v[1],
                        flip,
                    },
                )
            }
            Augment::ResizedCropFlip { .. } => (v[0] >= 0 && v[1] >= 0 && v[2] > 0 && v[3] > 0)
                .then(|| View::Crop {
                    x: v[0] as u32,
                    y: v[1] as u32,
                    w: v[2] as u32,
                    h: v[3] as u32,
                    flip,
                }),
        }
    }

    /// Writes a shift view of `src` (`[c, h, w]`) into `dst`; pixels shifted in from outside take
    /// `fill[c]`.
    pub fn apply(&self, src: &[f32], dst: &mut [f32], c: usize, h: usize, w: usize, fill: &[f32]) {
        let (dx, dy, flip) = match *self {
            View::Shift { dx, dy, flip } => (dx, dy, flip),
            View::Crop { .. } => (0, 0, false),
        };
        for (ch, &pad) in fill.iter().enumerate().take(c) {
            let plane = ch * h * w;
            for y in 0..h {
                let sy = y as i32 + dy;
                for x in 0..w {
                    let xo = if flip { w - 1 - x } else { x };
                    let sx = xo as i32 + dx;
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

    /// Cuts a crop view out of a photo, resizes it to `size × size` and writes it normalised,
    /// planar, into `dst`.
    pub fn render(&self, src: &SourceImage, size: usize, norm: &Normalization, dst: &mut [f32]) {
        let (x, y, w, h, flip) = match *self {
            View::Crop { x, y, w, h, flip } => (x, y, w, h, flip),
            View::Shift { flip, .. } => (0, 0, src.width, src.height, flip),
        };
        let Some(img) = src.image() else { return };
        let crop = image::imageops::crop_imm(&img, x, y, w, h).to_image();
        let mut out = image::imageops::resize(
            &crop,
            size as u32,
            size as u32,
            image::imageops::FilterType::Triangle,
        );
        if flip {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        let plane = size * size;
        for (i, px) in out.pixels().enumerate() {
            for c in 0..3 {
                dst[c * plane + i] = (px[c] as f32 / 255.0 - norm.mean[c]) / norm.std[c];
            }
        }
    }
}

/// One mini-batch: images `[b, c, h, w]` f32, labels `[b]` u32, and the dataset rows they came
/// from `[b]` u32 (how a student finds the teacher's logits for them); when the batch replays a
/// knowledge file's stored views, which view of each row it shows `[b]` u32.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub rows: Tensor,
    pub views: Option<Tensor>,
    pub len: usize,
}

impl Batch {
    /// Rows `start..start + len` of this batch, as a batch of their own (views of the same
    /// tensors).
    pub fn rows(&self, start: usize, len: usize) -> candle_core::Result<Batch> {
        Ok(Batch {
            images: self.images.narrow(0, start, len)?,
            labels: self.labels.narrow(0, start, len)?,
            rows: self.rows.narrow(0, start, len)?,
            views: self
                .views
                .as_ref()
                .map(|v| v.narrow(0, start, len))
                .transpose()?,
            len,
        })
    }

    /// The batch on `device` (itself when it is there already).
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Batch> {
        if self.images.device().same_device(device) {
            return Ok(self.clone());
        }
        Ok(Batch {
            images: self.images.to_device(device)?,
            labels: self.labels.to_device(device)?,
            rows: self.rows.to_device(device)?,
            views: self
                .views
                .as_ref()
                .map(|v| v.to_device(device))
                .transpose()?,
            len: self.len,
        })
    }
}

/// Mini-batches over a subset of rows of one image tensor, in order or shuffled per epoch.
pub struct Batches<'a> {
    images: &'a Tensor,
    labels: &'a Tensor,
    order: Vec<u32>,
    batch_size: usize,
    pos: usize,
    augment: Option<Augmentation<'a>>,
}

/// An augmentation with what it needs: seed and epoch, normalisation, and the decoded photos for
/// resized crops.
struct Augmentation<'a> {
    augment: Augment,
    seed: u64,
    epoch: usize,
    normalization: &'a Normalization,
    sources: Option<&'a [SourceImage]>,
    /// Replay these instead of drawing fresh views.
    stored: Option<StoredViews<'a>>,
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
        crate::rng::shuffle(
            &mut self.order,
            &mut rng(seed, Stream::Shuffle, epoch as u64),
        );
        self
    }

    /// Augments every image with its view for `(seed, epoch, row)`. Resized crops are cut from
    /// `sources` (one decoded photo per dataset row); without them the crop is refused at batch time.
    pub fn augmented(
        mut self,
        augment: Augment,
        seed: u64,
        epoch: usize,
        normalization: &'a Normalization,
        sources: Option<&'a [SourceImage]>,
    ) -> Self {
        self.augment = Some(Augmentation {
            augment,
            seed,
            epoch,
            normalization,
            sources,
            stored: None,
        });
        self
    }

    /// Shows every row one of its stored views, chosen per `(seed, epoch, row)` by
    /// [`choose_view`], exactly as the teacher saw it when the knowledge was computed; each
    /// batch says which view (`Batch::views`), so the student can pick the matching logits.
    pub fn replaying(
        mut self,
        stored: StoredViews<'a>,
        seed: u64,
        epoch: usize,
        normalization: &'a Normalization,
        sources: Option<&'a [SourceImage]>,
    ) -> Self {
        self = self.augmented(stored.augment, seed, epoch, normalization, sources);
        if let Some(a) = self.augment.as_mut() {
            a.stored = Some(stored);
        }
        self
    }

    /// Starts after the first `n` batches (resuming a pass part-way).
    pub fn skip_batches(mut self, n: usize) -> Self {
        self.pos = (n * self.batch_size).min(self.order.len());
        self
    }

    pub fn num_batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    fn make(&self, rows: &[u32]) -> Result<Batch> {
        let device = self.images.device();
        let idx = Tensor::from_slice(rows, rows.len(), device)?;
        let (images, views) = match &self.augment {
            None => (self.images.index_select(&idx, 0)?, None),
            Some(a) => {
                let (images, views) = a.batch(self.images, rows)?;
                let views = match views {
                    Some(v) => Some(Tensor::from_vec(v, rows.len(), device)?),
                    None => None,
                };
                (images.to_device(device)?, views)
            }
        };
        Ok(Batch {
            images,
            labels: self.labels.index_select(&idx, 0)?,
            rows: idx,
            views,
            len: rows.len(),
        })
    }
}

impl Augmentation<'_> {
    /// The view of `row` in this epoch: `None` for the image as it is (stored view 0), with the
    /// stored view's index when replaying. `source` is the photo's size (crops only).
    fn view_of(&self, row: u32, source: (u32, u32)) -> (Option<View>, Option<u32>) {
        match &self.stored {
            None => (
                Some(self.augment.view(self.seed, self.epoch, row, source)),
                None,
            ),
            Some(s) => {
                let j = choose_view(self.seed, self.epoch, row, s.count);
                let view = (j > 0).then(|| s.views[row as usize * s.count + j as usize]);
                (view, Some(j))
            }
        }
    }

    /// The batch's images and, when replaying stored views, the view index of each row.
    fn batch(&self, images: &Tensor, rows: &[u32]) -> Result<(Tensor, Option<Vec<u32>>)> {
        let idx = Tensor::from_slice(rows, rows.len(), images.device())?;
        let replaying = self.stored.is_some();
        match self.augment {
            Augment::CropFlip { .. } => {
                let selected = images.index_select(&idx, 0)?;
                let (b, c, h, w) = selected.dims4()?;
                let src = selected.flatten_all()?.to_vec1::<f32>()?;
                let fill = self.normalization.zero_values();
                let n = c * h * w;
                let mut dst = src.clone();
                let mut chosen = Vec::with_capacity(rows.len());
                for (i, &row) in rows.iter().enumerate() {
                    let (view, j) = self.view_of(row, (w as u32, h as u32));
                    chosen.extend(j);
                    if let Some(view) = view {
                        view.apply(
                            &src[i * n..(i + 1) * n],
                            &mut dst[i * n..(i + 1) * n],
                            c,
                            h,
                            w,
                            &fill,
                        );
                    }
                }
                let t = Tensor::from_vec(dst, (b, c, h, w), &Device::Cpu)?;
                Ok((t, replaying.then_some(chosen)))
            }
            Augment::ResizedCropFlip { size, .. } => {
                let sources = self.sources.ok_or_else(|| {
                    crate::DataError::Config("resized-crop augmentation needs the decoded photos (an ImageFolder dataset)".into())
                })?;
                let n = 3 * size * size;
                let plan: Vec<(Option<View>, Option<u32>)> = rows
                    .iter()
                    .map(|&row| {
                        let src = &sources[row as usize];
                        self.view_of(row, (src.width, src.height))
                    })
                    .collect();
                // Rows shown as they are (stored view 0) take the evaluation image itself.
                let mut dst = if plan.iter().any(|(v, _)| v.is_none()) {
                    images
                        .index_select(&idx, 0)?
                        .flatten_all()?
                        .to_vec1::<f32>()?
                } else {
                    vec![0f32; rows.len() * n]
                };
                dst.par_chunks_mut(n)
                    .zip(rows.par_iter().zip(plan.par_iter()))
                    .for_each(|(d, (&row, (view, _)))| {
                        if let Some(view) = view {
                            view.render(&sources[row as usize], size, self.normalization, d);
                        }
                    });
                let t = Tensor::from_vec(dst, (rows.len(), 3, size, size), &Device::Cpu)?;
                let chosen = plan.iter().filter_map(|(_, j)| *j).collect();
                Ok((t, replaying.then_some(chosen)))
            }
        }
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
        View::Shift {
            dx: 1,
            dy: 0,
            flip: false,
        }
        .apply(&src, &mut dst, 1, 2, 3, &[-1.]);
        assert_eq!(dst, [2., 3., -1., 5., 6., -1.]);
        View::Shift {
            dx: 0,
            dy: -1,
            flip: true,
        }
        .apply(&src, &mut dst, 1, 2, 3, &[-1.]);
        assert_eq!(dst, [-1., -1., -1., 3., 2., 1.]);
    }

    #[test]
    fn views_are_seeded_bounded_and_varied() {
        let aug = Augment::CropFlip { crop_padding: 2 };
        let shift = |v: View| match v {
            View::Shift { dx, dy, flip } => (dx, dy, flip),
            View::Crop { .. } => panic!("a crop view from CropFlip"),
        };
        let views: Vec<(i32, i32, bool)> = (0..200)
            .map(|r| shift(aug.view(5, 0, r, (28, 28))))
            .collect();
        assert_eq!(
            views,
            (0..200)
                .map(|r| shift(aug.view(5, 0, r, (28, 28))))
                .collect::<Vec<_>>()
        );
        assert!(views.iter().all(|v| v.0.abs() <= 2 && v.1.abs() <= 2));
        let flips = views.iter().filter(|v| v.2).count();
        assert!((60..140).contains(&flips), "{flips} flips of 200");
        assert!(views.iter().any(|v| v.0 == -2) && views.iter().any(|v| v.1 == 2));
        let epoch = |e| {
            (0..20)
                .map(|r| aug.view(5, e, r, (28, 28)))
                .collect::<Vec<_>>()
        };
        assert_ne!(epoch(1), epoch(2));
    }

    #[test]
    fn resized_crops_follow_torchvision_bounds() {
        let aug = Augment::resized_crop(224);
        let (w0, h0) = (500u32, 375u32);
        let mut areas = Vec::new();
        for r in 0..500 {
            let View::Crop { x, y, w, h, .. } = aug.view(1, 0, r, (w0, h0)) else {
                panic!("not a crop")
            };
            assert!(
                w >= 1 && h >= 1 && x + w <= w0 && y + h <= h0,
                "{x} {y} {w} {h}"
            );
            let area = (w * h) as f64 / (w0 * h0) as f64;
            let ratio = w as f64 / h as f64;
            assert!((0.07..=1.0).contains(&area), "area {area}");
            assert!(
                (0.74..=1.34).contains(&ratio) || area > 0.9,
                "ratio {ratio}"
            );
            areas.push(area);
        }
        let mean = areas.iter().sum::<f64>() / areas.len() as f64;
        assert!(mean > 0.3 && mean < 0.7, "mean crop area {mean}");
        // A very wide photo cannot fit the ratio range: the fallback is a central crop.
        let View::Crop { x, w, h, .. } = aug.view(1, 0, 0, (1000, 10)) else {
            panic!()
        };
        assert!(w <= 14 && h == 10 && x >= 490, "{x} {w} {h}");
    }

    #[test]
    fn a_crop_view_renders_the_box_normalised() {
        // Left half black, right half white; the crop of the right half renders white everywhere.
        let (w, h) = (8u32, 4u32);
        let rgb: Vec<u8> = (0..h)
            .flat_map(|_| (0..w).flat_map(|x| [if x < 4 { 0 } else { 255 }; 3]))
            .collect();
        let src = SourceImage {
            width: w,
            height: h,
            rgb,
        };
        let norm = Normalization {
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
        };
        let mut dst = vec![0f32; 3 * 4 * 4];
        View::Crop {
            x: 4,
            y: 0,
            w: 4,
            h: 4,
            flip: false,
        }
        .render(&src, 4, &norm, &mut dst);
        assert!(dst.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{dst:?}");
        View::Crop {
            x: 0,
            y: 0,
            w: 4,
            h: 4,
            flip: true,
        }
        .render(&src, 4, &norm, &mut dst);
        assert!(dst.iter().all(|&v| (v + 1.0).abs() < 1e-6));
    }
}
