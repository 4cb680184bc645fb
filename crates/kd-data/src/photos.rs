//! `just data-photos`: a real photo dataset on any Debian machine, from the photographs of
//! Debian's `tuxpaint-stamps-default` — five classes, one photo in five held out for the test
//! split by a hash of (seed, class, file name), so the split is seeded and stable.

use crate::{DataError, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Class → folder under the stamps root.
pub const CLASSES: [(&str, &str); 5] = [
    ("birds", "animals/birds"),
    ("flowers", "plants/flowers"),
    ("fruit", "food/fruit"),
    ("mammals", "animals/mammals"),
    ("vegetables", "food/vegetables"),
];

/// Whether `file` of `class` goes to the test split (`val/`): the first 32 bits of
/// SHA-256("seed/class/file"), as a number, are a multiple of 5.
pub fn held_out(seed: u64, class: &str, file: &str) -> bool {
    let h = Sha256::digest(format!("{seed}/{class}/{file}").as_bytes());
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 5 == 0
}

/// Builds `out/{train,val}/<class>/` from `stamps` (once per seed: a marker file says it is
/// built), writing into a temporary folder and renaming it into place. Returns the numbers of
/// training and test photos.
pub fn build(stamps: &Path, out: &Path, seed: u64) -> Result<(usize, usize)> {
    let marker = format!(".built-from-seed-{seed}");
    if out.join(&marker).is_file() {
        return Ok((count(&out.join("train"))?, count(&out.join("val"))?));
    }
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    let tmp = parent.join(format!(".photos.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (mut train, mut val) = (0, 0);
    for (class, dir) in CLASSES {
        let src = stamps.join(dir);
        let mut files: Vec<_> = std::fs::read_dir(&src)
            .map_err(|e| DataError::io(&src, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        files.sort();
        for f in files {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let split = if held_out(seed, class, &name) {
                "val"
            } else {
                "train"
            };
            *if split == "val" { &mut val } else { &mut train } += 1;
            let to = tmp.join(split).join(class);
            std::fs::create_dir_all(&to).map_err(|e| DataError::io(&to, e))?;
            std::fs::copy(&f, to.join(&name)).map_err(|e| DataError::io(&f, e))?;
        }
    }
    std::fs::write(tmp.join(&marker), b"").map_err(|e| DataError::io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(out);
    std::fs::rename(&tmp, out).map_err(|e| DataError::io(out, e))?;
    Ok((train, val))
}

fn count(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for class in std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .flatten()
    {
        n += std::fs::read_dir(class.path())
            .map_err(|e| DataError::io(class.path(), e))?
            .count();
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_the_hash_rule() {
        // printf '0/birds/bird.png' | sha256sum | cut -c1-8 -> a hex number; multiple of 5 or not.
        let h = Sha256::digest(b"0/birds/bird.png");
        let n = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        assert_eq!(held_out(0, "birds", "bird.png"), n % 5 == 0);
        let held = (0..200)
            .filter(|i| held_out(0, "fruit", &format!("{i}.png")))
            .count();
        assert!((20..60).contains(&held), "about one in five: {held}");
        assert_ne!(
            (0..50)
                .map(|i| held_out(0, "x", &i.to_string()))
                .collect::<Vec<_>>(),
            (0..50)
                .map(|i| held_out(1, "x", &i.to_string()))
                .collect::<Vec<_>>()
        );
    }
}
