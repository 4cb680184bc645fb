//! CIFAR-10's binary format: `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`, each
//! a run of 3,073-byte records — one label byte, then a 32×32 image as 1,024 red, 1,024 green
//! and 1,024 blue bytes (already planar).

use crate::image_set::ImageSet;
use crate::{DataError, Result};
use std::path::Path;

const SIDE: usize = 32;
const IMAGE: usize = 3 * SIDE * SIDE;
const RECORD: usize = 1 + IMAGE;
pub const CLASS_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Reads CIFAR-10 binary files into one set; every file is checked (size, labels).
pub fn read(paths: &[&Path], classes: usize) -> Result<ImageSet> {
    let mut set = ImageSet {
        images: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        height: SIDE,
        width: SIDE,
    };
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(*path, e))?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            return Err(DataError::invalid(
                *path,
                format!(
                    "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                    bytes.len()
                ),
            ));
        }
        for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
            if record[0] as usize >= classes {
                return Err(DataError::invalid(
                    *path,
                    format!(
                        "label {} in record {i} is not below the number of classes ({classes})",
                        record[0]
                    ),
                ));
            }
            set.labels.push(record[0] as u32);
            set.images.extend_from_slice(&record[1..]);
        }
    }
    Ok(set)
}

/// The training and test sets of a CIFAR-10 binary folder (`cifar-10-batches-bin/`).
pub fn load(dir: &Path, classes: usize) -> Result<(ImageSet, ImageSet, Vec<String>)> {
    let missing = |name: &str| {
        DataError::Missing {
        dir: dir.to_path_buf(),
        message: format!("{name} is not there (expected CIFAR-10's binary version: data_batch_1..5.bin, test_batch.bin)"),
    }
    };
    let train: Vec<std::path::PathBuf> = (1..=5)
        .map(|i| dir.join(format!("data_batch_{i}.bin")))
        .collect();
    for p in &train {
        if !p.is_file() {
            return Err(missing(
                &p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ));
        }
    }
    let test = dir.join("test_batch.bin");
    if !test.is_file() {
        return Err(missing("test_batch.bin"));
    }
    let names = match std::fs::read_to_string(dir.join("batches.meta.txt")) {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        Err(_) => CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
    };
    let train_refs: Vec<&Path> = train.iter().map(|p| p.as_path()).collect();
    Ok((read(&train_refs, classes)?, read(&[&test], classes)?, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, fill: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..IMAGE).map(|i| fill.wrapping_add((i / 1024) as u8)));
        r
    }

    #[test]
    fn reads_the_binary_format_and_refuses_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for i in 1..=5u8 {
            std::fs::write(
                d.join(format!("data_batch_{i}.bin")),
                [record(i, 10 * i), record(0, 1)].concat(),
            )
            .unwrap();
        }
        std::fs::write(d.join("test_batch.bin"), record(9, 200)).unwrap();
        let (train, test, names) = load(d, 10).unwrap();
        assert_eq!((train.len(), test.len()), (10, 1));
        assert_eq!(train.labels[..4], [1, 0, 2, 0]);
        // Planar: the first image's green plane starts at byte 1024.
        assert_eq!(
            (train.images[0], train.images[1024], train.images[2048]),
            (10, 11, 12)
        );
        assert_eq!(names[9], "truck");

        std::fs::write(d.join("test_batch.bin"), &record(9, 200)[..100]).unwrap();
        let e = load(d, 10).unwrap_err().to_string();
        assert!(
            e.contains("test_batch.bin") && e.contains("3073-byte"),
            "{e}"
        );
        std::fs::write(d.join("test_batch.bin"), record(10, 0)).unwrap();
        let e = load(d, 10).unwrap_err().to_string();
        assert!(e.contains("label 10"), "{e}");
        std::fs::remove_file(d.join("data_batch_3.bin")).unwrap();
        let e = load(d, 10).unwrap_err().to_string();
        assert!(e.contains("data_batch_3.bin"), "{e}");
    }
}
