//! The knowledge-file reader and validator on arbitrary bytes: refuse or accept, never panic;
//! what it accepts must be readable in full and checkable against a dataset.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(k) = kd_knowledge::KnowledgeFile::from_bytes(Path::new("fuzz.safetensors"), data.to_vec()) else { return };
    let labels = k.labels().expect("an accepted file has readable labels");
    assert_eq!(labels.len(), k.meta.dataset.rows);
    for head in k.meta.heads.clone() {
        let t = k.logits(&head, &candle_core::Device::Cpu).expect("an accepted head is readable");
        assert_eq!(t.dims(), [k.meta.dataset.rows, k.meta.dataset.classes]);
    }
    let _ = k.check_dataset(&k.meta.dataset.clone(), &labels);
    let _ = k.check_heads(&["main".to_string()]);
});
