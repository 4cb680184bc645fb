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
        let data: Vec<f32> = self
            .images
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let c = (i / plane) % self.channels;
                b as f32 * scale[c] - shift[c]
            })
            .collect();
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
        for (i, &b) in set.images.iter().enumerate() {
            let x = b as f64 / 255.0;
            let c = (i / plane) % set.channels;
            sum[c] += x;
            sq[c] += x * x;
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
