//! The pipeline-file parser on arbitrary text: refuse with a message or accept, never panic;
//! what it accepts validates, and reads back the same after a round trip through TOML.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.toml");
    let Ok(config) = kd_train::PipelineConfig::parse(text, &[], path) else { return };
    config.validate().expect("an accepted pipeline validates");
    let again = toml::to_string(&config).expect("an accepted pipeline prints as TOML");
    let back = kd_train::PipelineConfig::parse(&again, &[], path).expect("a printed pipeline reads back");
    assert_eq!(back, config);
});
