//! The IDX reader on arbitrary bytes: it may refuse them, never panic, never allocate what a
//! header merely declares. The first byte picks the rank and whether the name claims `.gz`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let rank = [1, 3][(pick & 1) as usize];
    let name = if pick & 2 == 0 { "fuzz-idx3-ubyte" } else { "fuzz-idx3-ubyte.gz" };
    if let Ok(a) = kd_data::idx::parse_idx(bytes, Path::new(name), rank) {
        assert_eq!(a.dims.len(), rank);
        assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
    }
});
