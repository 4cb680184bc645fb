//! Compact knowledge files: f16 and top-k logits, written by the real precompute on the smoke
//! data and read back by the student.

use crate::fixture::{self, copy_upstream, precompute, student};
use candle_core::Device;
use kd_knowledge::{KnowledgeFile, LogitDtype, LogitStorage};

#[test]
fn top_k_f16_knowledge_keeps_the_teachers_top_classes_and_trains_a_student() {
    let root = copy_upstream(fixture::run());
    let r = root.path();
    let full_m = precompute(r, &[]).unwrap();
    let m = precompute(r, &["--top-k", "3", "--dtype", "f16", "--tag", "top3"]).unwrap();
    assert_eq!(m.metrics["storage"], "top-3 f16");
    assert_eq!(full_m.metrics["storage"], "f32");
    // 3 heads × (3 f16 values + 3 u16 classes + 1 f16 rest) = 42 bytes instead of 3 × 40.
    let per_image = |m: &kd_train::Manifest| m.metrics["bytes_per_image"].as_f64().unwrap();
    assert!(
        per_image(&m) < 0.5 * per_image(&full_m),
        "{} vs {}",
        per_image(&m),
        per_image(&full_m)
    );
    let full = KnowledgeFile::open(&r.join("smoke/knowledge/soft-targets.safetensors")).unwrap();
    let path = r.join("smoke/runs/top3/knowledge/soft-targets.safetensors");
    let top = KnowledgeFile::open(&path).unwrap();
    assert_eq!(
        top.meta.storage,
        Some(LogitStorage {
            dtype: LogitDtype::F16,
            top_k: Some(3)
        })
    );
    for head in &full.meta.heads {
        let a = full
            .logits(head, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = top
            .logits(head, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a.len(), 600);
        for (row, (a, b)) in a.iter().zip(&b).enumerate() {
            let mut order: Vec<usize> = (0..a.len()).collect();
            order.sort_by(|&i, &j| a[j].total_cmp(&a[i]));
            for &c in &order[..3] {
                assert!(
                    (a[c] - b[c]).abs() <= a[c].abs() * 1e-3 + 1e-3,
                    "{head} row {row} class {c}: {} vs {}",
                    a[c],
                    b[c]
                );
            }
            // Every other class holds the one rest logit, no larger than the third.
            let rest = b[order[3]];
            assert!(order[3..].iter().all(|&c| b[c] == rest) && rest <= b[order[2]]);
        }
    }
    // The student reads it like any knowledge file.
    let kd = student(
        r,
        &[
            "--knowledge",
            path.to_str().unwrap(),
            "--tag",
            "seed-0-top3",
        ],
    )
    .unwrap();
    assert!(kd.metrics["test_accuracy"].as_f64().unwrap() > 0.0);
    // A top-k as large as the class count is refused, naming the setting.
    let e = precompute(r, &["--top-k", "10", "--tag", "top10"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("knowledge.top_k 10"), "{e}");
}
