//! Photos in one folder per class (torchvision's `ImageFolder`): the seed's
//! `flower_data/{train,val}/<class>/*.jpg` layout, or a single root split with a seed.
//!
//! Every photo is decoded once, in parallel: alpha is composited on white, grey becomes RGB, and
//! a copy whose shorter side is at most twice the model's input size is kept for training-time
//! crops (so random crops are cut from the photo, not from a 224-px thumbnail). The evaluation
//! view — the whole photo resized to `size × size`, as the seed's `Resize((224, 224))` — is what
//! the `ImageSet` holds, fingerprints and feeds to evaluation and precompute.

use crate::image_set::ImageSet;
use crate::rng::shuffle;
use crate::{DataError, Result};
use image::imageops::FilterType;
use image::{RgbImage, RgbaImage};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// A decoded photo, RGB interleaved (`[h, w, 3]`), the source of training-time crops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl SourceImage {
    pub fn image(&self) -> Option<RgbImage> {
        RgbImage::from_raw(self.width, self.height, self.rgb.clone())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FolderOptions {
    /// Side of the model's square input.
    pub size: usize,
    /// With a single root (no `train/`): the share of each class held out as the test split.
    pub test_fraction: f64,
    pub split_seed: u64,
    /// Skip (and count) files that do not decode, instead of failing.
    pub skip_bad_images: bool,
    /// Photos without a class for the transfer set [default: an `unlabelled/` folder beside the
    /// training class folders, if there is one].
    pub unlabelled: Option<PathBuf>,
}

/// The folder of photos without a class, beside the class folders.
pub const UNLABELLED: &str = "unlabelled";

/// An ImageFolder, decoded.
#[derive(Debug, Clone)]
pub struct FolderData {
    pub class_names: Vec<String>,
    pub train: ImageSet,
    pub test: ImageSet,
    pub train_sources: Vec<SourceImage>,
    /// Files that did not decode, with why (only with `skip_bad_images`).
    pub skipped: Vec<(PathBuf, String)>,
    /// The last `unlabelled` training rows are photos without a class (label 0 as a placeholder).
    pub unlabelled: usize,
}

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
        .collect::<Result<_>>()?;
    v.retain(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    });
    v.sort();
    Ok(v)
}

/// The image files of a folder, sorted by name.
fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_file() && is_image(p))
        .collect())
}

/// Class folders of `root` (sorted by name; not `unlabelled/`) and their image files.
fn classes(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut out = Vec::new();
    for dir in sorted_entries(root)?
        .into_iter()
        .filter(|p| p.is_dir() && !p.ends_with(UNLABELLED))
    {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let files = images_in(&dir)?;
        if files.is_empty() {
            return Err(DataError::Invalid {
                path: dir,
                message: "class folder has no images (JPEG or PNG)".into(),
            });
        }
        out.push((name, files));
    }
    if out.is_empty() {
        return Err(DataError::Missing {
            dir: root.to_path_buf(),
            message: "no class folders (expected <root>/<class>/*.jpg, or <root>/train/<class>/ and <root>/val/<class>/)"
                .into(),
        });
    }
    Ok(out)
}

/// Decodes one photo: alpha composited on white, RGB, shorter side at most `2 × size`.
pub fn decode(path: &Path, size: usize) -> std::result::Result<SourceImage, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let img =
        image::load_from_memory(&bytes).map_err(|e| format!("not a readable JPEG or PNG: {e}"))?;
    let rgba: RgbaImage = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut rgb = RgbImage::new(w, h);
    for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = src[3] as u32;
        for c in 0..3 {
            dst[c] = ((src[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    let cap = 2 * size as u32;
    let rgb = if w.min(h) > cap {
        let scale = cap as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        );
        image::imageops::resize(&rgb, nw, nh, FilterType::Triangle)
    } else {
        rgb
    };
    Ok(SourceImage {
        width: rgb.width(),
        height: rgb.height(),
        rgb: rgb.into_raw(),
    })
}

/// The evaluation view of a photo: resized to `size × size`, planar `[3, size, size]`.
pub fn eval_view(src: &SourceImage, size: usize) -> Vec<u8> {
    let img = match src.image() {
        Some(i) => i,
        None => return vec![0; 3 * size * size],
    };
    let resized = image::imageops::resize(&img, size as u32, size as u32, FilterType::Triangle);
    planar(&resized)
}

/// `[h, w, 3]` interleaved → `[3, h, w]` planar.
pub fn planar(img: &RgbImage) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px[c];
        }
    }
    out
}

/// Files with their labels, decoded in parallel; failures are errors or, if allowed, skipped.
fn decode_all(
    files: &[(PathBuf, u32)],
    opts: &FolderOptions,
    skipped: &mut Vec<(PathBuf, String)>,
) -> Result<(Vec<SourceImage>, Vec<u32>)> {
    let decoded: Vec<std::result::Result<SourceImage, String>> = files
        .par_iter()
        .map(|(p, _)| decode(p, opts.size))
        .collect();
    let mut sources = Vec::with_capacity(files.len());
    let mut labels = Vec::with_capacity(files.len());
    for ((path, label), d) in files.iter().zip(decoded) {
        match d {
            Ok(s) => {
                sources.push(s);
                labels.push(*label);
            }
            Err(message) if opts.skip_bad_images => skipped.push((path.clone(), message)),
            Err(message) => {
                return Err(DataError::Invalid {
                    path: path.clone(),
                    message: format!("{message} (use --skip-bad-images to skip such files)"),
                })
            }
        }
    }
    Ok((sources, labels))
}

fn image_set(sources: &[SourceImage], labels: Vec<u32>, size: usize) -> ImageSet {
    let images: Vec<Vec<u8>> = sources.par_iter().map(|s| eval_view(s, size)).collect();
    ImageSet {
        images: images.concat(),
        labels,
        channels: 3,
        height: size,
        width: size,
    }
}

/// Class names, training files and test files with their labels.
type Split = (Vec<String>, Vec<(PathBuf, u32)>, Vec<(PathBuf, u32)>);

/// The seed's layout: `<root>/train/<class>/` and `<root>/val/<class>/` (or `test/`); the test
/// classes must be among the training classes.
fn seed_layout(root: &Path) -> Result<Split> {
    let train_dir = root.join("train");
    let train = classes(&train_dir)?;
    let names: Vec<String> = train.iter().map(|(n, _)| n.clone()).collect();
    let test_dir = ["val", "test"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .ok_or_else(|| DataError::Missing {
            dir: root.to_path_buf(),
            message: "has train/ but neither val/ nor test/".into(),
        })?;
    let mut test_files = Vec::new();
    for (name, files) in classes(&test_dir)? {
        let label = names
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| DataError::Invalid {
                path: test_dir.join(&name),
                message: format!(
                    "class {name:?} is not among the training classes ({})",
                    names.join(", ")
                ),
            })?;
        test_files.extend(files.into_iter().map(|f| (f, label as u32)));
    }
    let train_files = train
        .into_iter()
        .enumerate()
        .flat_map(|(label, (_, files))| files.into_iter().map(move |f| (f, label as u32)))
        .collect();
    Ok((names, train_files, test_files))
}

/// One root of class folders: `data.test_fraction` of each class held out for the test split,
/// chosen with the split seed.
fn single_root(root: &Path, opts: &FolderOptions) -> Result<Split> {
    if !(0.0..1.0).contains(&opts.test_fraction) {
        return Err(DataError::Config(format!(
            "data.test_fraction {} must be in [0, 1)",
            opts.test_fraction
        )));
    }
    let all = classes(root)?;
    let names = all.iter().map(|(n, _)| n.clone()).collect();
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (label, (_, files)) in all.into_iter().enumerate() {
        let mut order: Vec<u32> = (0..files.len() as u32).collect();
        shuffle(
            &mut order,
            &mut crate::rng::rng(opts.split_seed, crate::rng::Stream::TestSplit, label as u64),
        );
        let n_test = (files.len() as f64 * opts.test_fraction).round() as usize;
        let mut held: Vec<u32> = order[..n_test].to_vec();
        held.sort_unstable();
        for (i, f) in files.into_iter().enumerate() {
            let dst = if held.binary_search(&(i as u32)).is_ok() {
                &mut test
            } else {
                &mut train
            };
            dst.push((f, label as u32));
        }
    }
    Ok((names, train, test))
}

/// Loads an ImageFolder root.
pub fn load(root: &Path, opts: &FolderOptions) -> Result<FolderData> {
    let (class_names, train_files, test_files) = if root.join("train").is_dir() {
        seed_layout(root)?
    } else {
        single_root(root, opts)?
    };
    let unlabelled = unlabelled_files(root, opts)?;
    let mut train_files = train_files;
    train_files.extend(unlabelled.iter().map(|f| (f.clone(), 0)));
    let mut skipped = Vec::new();
    let (train_sources, train_labels) = decode_all(&train_files, opts, &mut skipped)?;
    // Skipped files are counted against the part they came from.
    let unlabelled = unlabelled.len()
        - skipped
            .iter()
            .filter(|(p, _)| unlabelled.contains(p))
            .count();
    let (test_sources, test_labels) = decode_all(&test_files, opts, &mut skipped)?;
    if train_sources.is_empty() {
        return Err(DataError::Invalid {
            path: root.to_path_buf(),
            message: "no training image could be read".into(),
        });
    }
    // Skipped files may take a class's last training image with them.
    if let Some((c, name)) = class_names.iter().enumerate().find(|(c, _)| {
        !train_labels
            .iter()
            .take(train_sources.len() - unlabelled)
            .any(|l| *l as usize == *c)
    }) {
        return Err(DataError::Invalid {
            path: root.to_path_buf(),
            message: format!(
                "class {name:?} (index {c}) has no readable training image left{}",
                if skipped.is_empty() {
                    ""
                } else {
                    " after skipping the files that do not decode"
                }
            ),
        });
    }
    Ok(FolderData {
        class_names,
        train: image_set(&train_sources, train_labels, opts.size),
        test: image_set(&test_sources, test_labels, opts.size),
        train_sources,
        skipped,
        unlabelled,
    })
}

/// The photos without a class: `opts.unlabelled`, else `<root>/train/unlabelled/` or
/// `<root>/unlabelled/` if there is one.
fn unlabelled_files(root: &Path, opts: &FolderOptions) -> Result<Vec<PathBuf>> {
    let dir = match &opts.unlabelled {
        Some(dir) if !dir.is_dir() => {
            return Err(DataError::Missing {
                dir: dir.clone(),
                message: "data.unlabelled_dir is not a folder".into(),
            })
        }
        Some(dir) => dir.clone(),
        None => match [root.join("train").join(UNLABELLED), root.join(UNLABELLED)]
            .into_iter()
            .find(|d| d.is_dir())
        {
            Some(d) => d,
            None => return Ok(Vec::new()),
        },
    };
    let files = images_in(&dir)?;
    if files.is_empty() {
        return Err(DataError::Invalid {
            path: dir,
            message: "the folder of unlabelled photos has no images (JPEG or PNG)".into(),
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Rgba};

    fn opts() -> FolderOptions {
        FolderOptions {
            size: 8,
            test_fraction: 0.25,
            split_seed: 0,
            skip_bad_images: false,
            unlabelled: None,
        }
    }

    fn write_png(path: &Path, rgba: [u8; 4], w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbaImage::from_pixel(w, h, Rgba(rgba)).save(path).unwrap();
    }

    #[test]
    fn alpha_is_composited_on_white_and_grey_becomes_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("half.png");
        write_png(&p, [0, 0, 0, 128], 4, 4);
        let s = decode(&p, 8).unwrap();
        assert_eq!(&s.rgb[..3], &[127, 127, 127]);
        let g = dir.path().join("grey.png");
        GrayImage::from_pixel(3, 2, image::Luma([77]))
            .save(&g)
            .unwrap();
        let s = decode(&g, 8).unwrap();
        assert_eq!((s.width, s.height), (3, 2));
        assert!(s.rgb.iter().all(|&v| v == 77));
        // Big photos are kept at twice the input size (shorter side), aspect preserved.
        let big = dir.path().join("big.png");
        write_png(&big, [10, 20, 30, 255], 100, 50);
        let s = decode(&big, 8).unwrap();
        assert_eq!((s.width, s.height), (32, 16));
    }

    #[test]
    fn unlabelled_photos_join_the_training_rows_last() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for (folder, n) in [
            ("train/cat", 2),
            ("train/dog", 1),
            ("val/cat", 1),
            ("val/dog", 1),
        ] {
            for i in 0..n {
                write_png(
                    &r.join(folder).join(format!("{i}.png")),
                    [1, 2, 3, 255],
                    4,
                    4,
                );
            }
        }
        for i in 0..3 {
            write_png(
                &r.join("train/unlabelled").join(format!("u{i}.png")),
                [9, 9, 9, 255],
                4,
                4,
            );
        }
        let d = load(r, &opts()).unwrap();
        assert_eq!(d.class_names, ["cat", "dog"], "unlabelled/ is not a class");
        assert_eq!(d.train.len(), 6);
        assert_eq!(d.unlabelled, 3);
        assert_eq!(d.train_sources.len(), 6);
        // Named explicitly; a missing or empty folder is refused by name.
        let other = tempfile::tempdir().unwrap();
        write_png(&other.path().join("x.png"), [0, 0, 0, 255], 4, 4);
        let named = FolderOptions {
            unlabelled: Some(other.path().to_path_buf()),
            ..opts()
        };
        assert_eq!(load(r, &named).unwrap().unlabelled, 1);
        let missing = FolderOptions {
            unlabelled: Some(r.join("nowhere")),
            ..opts()
        };
        let e = load(r, &missing).unwrap_err().to_string();
        assert!(e.contains("nowhere") && e.contains("not a folder"), "{e}");
        std::fs::create_dir(r.join("empty")).unwrap();
        let empty = FolderOptions {
            unlabelled: Some(r.join("empty")),
            ..opts()
        };
        let e = load(r, &empty).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("no images"), "{e}");
    }

    #[test]
    fn seed_layout_and_single_root_split() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for (split, class, n) in [
            ("train", "b_tulip", 3),
            ("train", "a_daisy", 2),
            ("val", "a_daisy", 1),
        ] {
            for i in 0..n {
                write_png(
                    &r.join(split).join(class).join(format!("{i}.png")),
                    [i as u8 * 50, 0, 0, 255],
                    5,
                    7,
                );
            }
        }
        std::fs::write(r.join("train/a_daisy/notes.txt"), "not an image, ignored").unwrap();
        let d = load(r, &opts()).unwrap();
        assert_eq!(d.class_names, ["a_daisy", "b_tulip"]);
        assert_eq!(d.train.labels, vec![0, 0, 1, 1, 1]);
        assert_eq!(d.test.labels, vec![0]);
        assert_eq!((d.train.channels, d.train.height, d.train.width), (3, 8, 8));
        assert_eq!(d.train.images.len(), 5 * 3 * 64);
        assert_eq!(d.train_sources.len(), 5);

        let single = tempfile::tempdir().unwrap();
        for class in ["x", "y"] {
            for i in 0..8 {
                write_png(
                    &single.path().join(class).join(format!("{i}.png")),
                    [i as u8, 9, 9, 255],
                    4,
                    4,
                );
            }
        }
        let a = load(single.path(), &opts()).unwrap();
        let b = load(single.path(), &opts()).unwrap();
        assert_eq!((a.train.len(), a.test.len()), (12, 4));
        assert_eq!(a.test.images, b.test.images, "the split is seeded");
        let c = load(
            single.path(),
            &FolderOptions {
                split_seed: 5,
                ..opts()
            },
        )
        .unwrap();
        assert_ne!(a.test.images, c.test.images);
    }

    #[test]
    fn broken_folders_are_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write_png(&r.join("cat/1.png"), [1, 2, 3, 255], 4, 4);
        std::fs::create_dir_all(r.join("dog")).unwrap();
        let e = load(r, &opts()).unwrap_err().to_string();
        assert!(e.contains("dog") && e.contains("no images"), "{e}");
        std::fs::write(r.join("dog/fake.jpg"), b"this is text, not a JPEG").unwrap();
        let mut jpeg = Vec::new();
        RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10]))
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        std::fs::write(r.join("dog/cut.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
        write_png(&r.join("dog/ok.png"), [9, 9, 9, 255], 4, 4);
        let e = load(r, &opts()).unwrap_err().to_string();
        assert!(
            e.contains("cut.jpg") && e.contains("--skip-bad-images"),
            "{e}"
        );
        let d = load(
            r,
            &FolderOptions {
                skip_bad_images: true,
                test_fraction: 0.0,
                ..opts()
            },
        )
        .unwrap();
        assert_eq!(d.skipped.len(), 2);
        assert_eq!(d.train.labels, vec![0, 1]);
        let e = load(&r.join("nowhere"), &opts()).unwrap_err().to_string();
        assert!(e.contains("nowhere"), "{e}");
    }
}
