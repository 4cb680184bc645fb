//! Images of one split in memory: raw bytes, labels, a fingerprint, and the normalisation that
//! turns them into the model's input.

use crate::Result;
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

/// Images of one split as raw bytes, `[n, channels, height, width]`, with their labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    pub images: Vec<u8>,
    pub labels: Vec<u32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub(crate) fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.labels.truncate(n);
            self.images.truncate(n * self.image_len());
        }
    }

    /// SHA-256 over the shape, the image bytes and the labels: what a knowledge file is checked
    /// against, so a student can tell it reads the data the teacher saw, row for row.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"kd-imageset/1");
        for d in [self.len(), self.channels, self.height, self.width] {
            h.update((d as u64).to_le_bytes());
        }
        h.update(&self.images);
        for l in &self.labels {
            h.update(l.to_le_bytes());
        }
        crate::files::hex(&h.finalize())
    }

    /// All images as one normalised `f32` tensor `[n, c, h, w]`.
    pub fn to_tensor(&self, norm: &Normalization, device: &Device) -> Result<Tensor> {
        let plane = self.height * self.width;
        let scale: Vec<f32> = norm.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
        let shift: Vec<f32> = norm
            .mean
            .iter()
            .zip(&norm.std)
            .map(|(m, s)| m / s)
            .collect();
        // Plane by plane, one channel's scale and shift each: a division per pixel to find its
        // channel kept the loop scalar, 0.7 s of CPU per stage start for Fashion-MNIST's 70,000
        // images (`perf` of `kd-bench --only teacher-step`).
        let mut data = Vec::with_capacity(self.images.len());
        for (i, pixels) in self.images.chunks(plane.max(1)).enumerate() {
            let c = i % self.channels.max(1);
            let (scale, shift) = (scale[c], shift[c]);
            data.extend(pixels.iter().map(|&b| b as f32 * scale - shift));
        }
        Ok(Tensor::from_vec(
            data,
            (self.len(), self.channels, self.height, self.width),
            device,
        )?)
    }

    pub fn labels_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.labels, self.len(), device)?)
    }
}

/// Per-channel normalisation: `(x / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// The normalised value of a black pixel, per channel: what padding fills in.
    pub fn zero_values(&self) -> Vec<f32> {
        self.mean
            .iter()
            .zip(&self.std)
            .map(|(m, s)| -m / s)
            .collect()
    }

    /// Mean and standard deviation of a set's pixels, per channel.
    pub fn measure(set: &ImageSet) -> Self {
        let plane = set.height * set.width;
        let mut sum = vec![0f64; set.channels];
        let mut sq = vec![0f64; set.channels];
        // Plane by plane (no division per pixel), each channel's sums in the pixels' order.
        for (i, pixels) in set.images.chunks(plane.max(1)).enumerate() {
            let c = i % set.channels.max(1);
            let (s, q) = (&mut sum[c], &mut sq[c]);
            for &b in pixels {
                let x = b as f64 / 255.0;
                *s += x;
                *q += x * x;
            }
        }
        let n = (set.len() * plane).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| ((q / n - m * m).max(1e-12)).sqrt() as f32)
            .collect();
        Self {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three RGB images of 5×3, their bytes spread over 0–255 (each channel's differ).
    fn rgb() -> ImageSet {
        let images: Vec<u8> = (0..3 * 3 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
        ImageSet {
            images,
            labels: vec![0, 1, 2],
            channels: 3,
            height: 5,
            width: 3,
        }
    }

    /// Plane by plane, each pixel gets its own channel's statistics and scale: the values (to
    /// the bit) of a pixel-by-pixel loop that finds each pixel's channel by division.
    #[test]
    fn each_pixel_is_measured_and_normalised_with_its_channel() {
        let set = rgb();
        let plane = set.height * set.width;
        let channel = |i: usize| (i / plane) % set.channels;
        let norm = Normalization::measure(&set);
        for c in 0..set.channels {
            let xs = set
                .images
                .iter()
                .enumerate()
                .filter(|(i, _)| channel(*i) == c);
            let (mut s, mut q, mut n) = (0f64, 0f64, 0f64);
            for (_, &b) in xs {
                let x = b as f64 / 255.0;
                (s, q, n) = (s + x, q + x * x, n + 1.0);
            }
            let mean = s / n;
            let std = ((q / n - mean * mean).max(1e-12)).sqrt() as f32;
            assert_eq!(norm.mean[c].to_bits(), (mean as f32).to_bits(), "mean {c}");
            assert_eq!(norm.std[c].to_bits(), std.to_bits(), "std {c}");
        }
        let t = set.to_tensor(&norm, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 3, 5, 3]);
        let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (&b, v)) in set.images.iter().zip(got).enumerate() {
            let (m, s) = (norm.mean[channel(i)], norm.std[channel(i)]);
            let want = b as f32 * (1.0 / (255.0 * s)) - m / s;
            assert_eq!(v.to_bits(), want.to_bits(), "pixel {i}");
        }
    }
}
