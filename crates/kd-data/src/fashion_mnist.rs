//! Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): where it lives and how to tell it is the real one.

use crate::idx::{encode_idx, IdxArray};
use crate::{DataError, Result};
use md5::{Digest, Md5};
use std::path::Path;

/// Where Debian's package `dataset-fashion-mnist` installs the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Normalisation constants of the training images (x/255, then (x - mean) / std).
pub const MEAN: f32 = 0.2860;
pub const STD: f32 = 0.3530;

/// One official file and its checksums.
pub struct KnownFile {
    /// File name without `.gz`.
    pub stem: &'static str,
    /// MD5 of the `.gz` published by Zalando Research (github.com/zalandoresearch/fashion-mnist).
    pub published_gz_md5: &'static str,
    /// MD5 of the decompressed content: Debian recompresses the files, so its `.gz` differ from the
    /// published ones while the content is the same (measured with `zcat FILE | md5sum`).
    pub content_md5: &'static str,
}

pub const FILES: [KnownFile; 4] = [
    KnownFile {
        stem: "train-images-idx3-ubyte",
        published_gz_md5: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        content_md5: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    },
    KnownFile {
        stem: "train-labels-idx1-ubyte",
        published_gz_md5: "25c81989df183df01b3e8a0aad5dffbe",
        content_md5: "9018921c3c673c538a1fc5bad174d6f9",
    },
    KnownFile {
        stem: "t10k-images-idx3-ubyte",
        published_gz_md5: "bef4ecab320f06d8554ea6380940ec79",
        content_md5: "8181f5470baa50b63fa0f6fddb340f0a",
    },
    KnownFile {
        stem: "t10k-labels-idx1-ubyte",
        published_gz_md5: "bb300cfdad3c16e7a12a480ee83cd310",
        content_md5: "15d484375f8d13e6eb1aabb0c3f46965",
    },
];

fn md5_hex(bytes: &[u8]) -> String {
    crate::files::hex(&Md5::digest(bytes))
}

/// Checks a Fashion-MNIST file against the published checksums: the `.gz` as published, or its
/// content as published (a recompressed copy such as Debian's).
pub fn verify(path: &Path, stem: &str, array: &IdxArray) -> Result<()> {
    let known = FILES.iter().find(|f| f.stem == stem).ok_or_else(|| {
        DataError::invalid(path, format!("{stem} is not a Fashion-MNIST file name"))
    })?;
    if path.extension().is_some_and(|e| e == "gz") {
        let gz = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        if md5_hex(&gz) == known.published_gz_md5 {
            return Ok(());
        }
    }
    let mut hasher = Md5::new();
    hasher.update(encode_idx(&array.dims, &[]));
    hasher.update(&array.data);
    let got = crate::files::hex(&hasher.finalize());
    if got == known.content_md5 {
        return Ok(());
    }
    Err(DataError::Checksum {
        path: path.to_path_buf(),
        message: format!(
            "content MD5 {got} is not Fashion-MNIST's {} (for other data in MNIST format set \
             `data.name` to another name, or `data.verify_checksums = false`)",
            known.content_md5
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_content_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t10k-labels-idx1-ubyte");
        std::fs::write(&p, b"not it").unwrap();
        let array = IdxArray {
            dims: vec![2],
            data: vec![1, 2],
        };
        let e = verify(&p, "t10k-labels-idx1-ubyte", &array)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t10k-labels-idx1-ubyte") && e.contains("checksum"),
            "{e}"
        );
    }

    #[test]
    fn content_checksum_of_known_bytes() {
        // MD5("") is well known; guards the hex encoding used for every comparison.
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
