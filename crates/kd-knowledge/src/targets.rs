//! What a student learns from: a knowledge file's logits for the heads it uses, checked against
//! the student's own data, as tensors it can index by dataset row (and stored view).

use crate::{DatasetRef, KnowledgeError, KnowledgeFile, Result, ViewsMeta};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The teacher's logits for every training row and stored view, one `[N * K, C]` tensor per head
/// used (view j of row r at row `r * K + j`; K = 1 for a single-view file or after averaging).
#[derive(Debug)]
pub struct SoftTargets {
    pub heads: Vec<Tensor>,
    /// K: stored views per row in `heads`.
    pub views: usize,
    /// The file's stored views (`N * K` of them, row-major; empty for one view).
    pub stored: Vec<kd_data::View>,
    /// The file's views metadata (how they were drawn).
    pub views_meta: Option<ViewsMeta>,
    pub teacher_architecture: String,
}

/// How a student takes a multi-view file's logits when it does not augment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewChoice {
    /// Each row's stored views, as they are (view 0 without augmentation).
    AsStored,
    /// The mean over each row's K views (the teacher's test-time-augmentation ensemble).
    Mean,
}

impl SoftTargets {
    /// Opens `path`, refuses it unless it is for `expected` (the student's data and labels) and
    /// has every head of `heads`, and reads those heads' logits.
    pub fn load(
        path: &Path,
        expected: &DatasetRef,
        labels: &[u32],
        heads: &[String],
        choice: ViewChoice,
    ) -> Result<Self> {
        let knowledge = KnowledgeFile::open(path)?;
        knowledge.check_dataset(expected, labels)?;
        knowledge.check_heads(heads)?;
        let mut logits = heads
            .iter()
            .map(|h| knowledge.logits_flat(h, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        let mut views = knowledge.meta.view_count();
        if choice == ViewChoice::Mean {
            if views < 2 {
                return Err(KnowledgeError::Invalid {
                    path: path.to_path_buf(),
                    message: "student.view_targets = \"mean\" needs a knowledge file with several \
                              views, and this one has one (precompute with --views K)"
                        .into(),
                });
            }
            logits = logits
                .iter()
                .map(|h| mean_over_views(h, views))
                .collect::<candle_core::Result<_>>()?;
            views = 1;
        }
        Ok(Self {
            heads: logits,
            views,
            stored: knowledge.stored_views()?,
            views_meta: knowledge.meta.views.clone(),
            teacher_architecture: knowledge.meta.teacher.architecture.clone(),
        })
    }
}

/// `[N * K, C]` logits (view j of row r at `r * K + j`) → `[N, C]`, the mean over each row's
/// K views.
pub fn mean_over_views(flat: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (nk, c) = flat.dims2()?;
    flat.reshape((nk / k, k, c))?.mean(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_over_views_averages_each_rows_views() {
        // Two rows, three views, two classes: row r view j at r * 3 + j.
        let flat = Tensor::new(
            &[
                [1f32, 0.],
                [2., 3.],
                [3., -3.],
                [10., 1.],
                [20., 2.],
                [30., 3.],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let m = mean_over_views(&flat, 3).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, vec![vec![2., 0.], vec![20., 2.]]);
    }
}
