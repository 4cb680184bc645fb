//! Multi-view knowledge: the stored logits of every view are the teacher's answer for exactly the
//! image the student is shown when it replays that view.

use crate::fixture::{self, copy_upstream, precompute, student};
use candle_core::{Device, Tensor};
use kd_knowledge::KnowledgeFile;

/// The largest absolute difference between two tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn replayed_views_come_with_the_teachers_logits_for_exactly_that_view() {
    let root = copy_upstream(fixture::run());
    let r = root.path();
    let m = precompute(r, &["--views", "4"]).unwrap();
    assert_eq!(m.metrics["views"], 4);
    let path = r.join("smoke/knowledge/soft-targets.safetensors");
    let k = KnowledgeFile::open(&path).unwrap();
    assert_eq!(k.meta.format_version, kd_knowledge::FORMAT_VERSION_VIEWS);
    let v = k.meta.views.clone().unwrap();
    assert_eq!(v.count, 4);
    let stored = k.stored_views().unwrap();
    assert_eq!(stored.len(), 600 * 4);
    // Views 1.. are augmented: not all the identity.
    assert!(stored.chunks(4).any(|r| r[1..].iter().any(|x| *x != r[0])));

    // The student's first batch of epoch 3, replayed, through the frozen teacher.
    let args = fixture::pipeline_args(r);
    let pipeline = args.open(&[]).unwrap();
    let data = pipeline.load_data().unwrap();
    let sv = kd_data::StoredViews {
        count: 4,
        views: &stored,
        augment: v.augment,
    };
    let batch = kd_data::Batches::new(&data.train_images, &data.train_labels, &data.train_rows, 64)
        .shuffled(7, 3)
        .replaying(sv, 7, 3, &data.dataset.normalization, None)
        .next()
        .unwrap()
        .unwrap();
    let chosen = batch.views.clone().unwrap().to_vec1::<u32>().unwrap();
    assert!(chosen.iter().any(|&j| j > 0) && chosen.iter().all(|&j| j < 4));
    let teacher = kd_models::load_frozen(
        "googlenet",
        &data.spec,
        &r.join("smoke/teacher/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let fresh = teacher.forward_t(&batch.images, false).unwrap();
    let at = ((&batch.rows * 4.0).unwrap() + batch.views.as_ref().unwrap()).unwrap();
    for (h, head) in k.meta.heads.iter().enumerate() {
        let cached = k
            .logits_flat(head, &Device::Cpu)
            .unwrap()
            .index_select(&at, 0)
            .unwrap();
        let diff = max_diff(&cached, &fresh[h]);
        assert!(
            diff < 1e-4,
            "head {head}: cached and fresh logits differ by {diff}"
        );
    }
    // And against a wrong view, they differ: the test can fail.
    let wrong = ((&batch.rows * 4.0).unwrap()
        + Tensor::zeros(batch.len, candle_core::DType::U32, &Device::Cpu).unwrap())
    .unwrap();
    let cached = k
        .logits_flat("main", &Device::Cpu)
        .unwrap()
        .index_select(&wrong, 0)
        .unwrap();
    let diff = max_diff(&cached, &fresh[0]);
    assert!(diff > 1e-3, "view 0 and the replayed views should differ");

    // A student with augmentation replays them; without, it reads view 0; both train.
    let aug = student(r, &["--set", "student.augment=true", "--tag", "views"]).unwrap();
    assert!(aug.metrics["test_accuracy"].as_f64().unwrap() > 0.0);
    let first = student(r, &["--tag", "view0"]).unwrap();
    // Without augmentation, view_targets = mean learns from the teacher's average over the four
    // views: the same seed, other targets, so other weights than the view-0 student's.
    let mean = student(
        r,
        &[
            "--set",
            "student.view_targets=\"mean\"",
            "--tag",
            "viewmean",
        ],
    )
    .unwrap();
    assert_eq!(mean.settings["student"]["view_targets"], "mean");
    assert!(first.settings["student"].get("view_targets").is_none());
    let weights = |tag: &str| {
        std::fs::read(r.join(format!("smoke/runs/{tag}/student-kd/model.safetensors"))).unwrap()
    };
    assert_ne!(weights("view0"), weights("viewmean"));
}
