//! The knowledge-file reader and validator on arbitrary bytes: refuse or accept, never panic;
//! what it accepts (version 1, 2 with views, 3 with a label mask; f32, f16 or top-k storage) must
//! be readable in full and checkable against a dataset.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(k) = kd_knowledge::KnowledgeFile::from_bytes(Path::new("fuzz.safetensors"), data.to_vec()) else { return };
    let (n, c, views) = (k.meta.dataset.rows, k.meta.dataset.classes, k.meta.view_count());
    let labels = k.labels().expect("an accepted file has readable labels");
    assert_eq!(labels.len(), n);
    for head in k.meta.heads.clone() {
        let t = k.logits_flat(&head, &candle_core::Device::Cpu).expect("an accepted head is readable");
        assert_eq!(t.dims(), [n * views, c]);
    }
    let stored = k.stored_views().expect("accepted views are readable");
    assert_eq!(stored.len(), if views > 1 { n * views } else { 0 });
    if let Some(mask) = k.label_mask().expect("an accepted mask is readable") {
        assert_eq!(mask.len(), n);
    }
    let _ = k.check_dataset(&k.meta.dataset.clone(), &labels);
    let _ = k.check_heads(&["main".to_string()]);
});
