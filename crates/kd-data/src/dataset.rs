//! Datasets in memory: raw bytes per split, verified on load, fingerprinted, normalised on demand.

use crate::idx::{read_idx, IdxArray};
use crate::image_folder::{FolderOptions, SourceImage};
pub use crate::image_set::{ImageSet, Normalization};
use crate::{fashion_mnist, DataError, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// Where the images come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// A folder in MNIST format: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
    Dir(PathBuf),
    /// The Hugging Face hub, through candle-datasets (needs the internet; not used by CI).
    Hub,
}

/// How the files are laid out.
#[derive(Debug, Clone, PartialEq)]
pub enum DataFormat {
    /// MNIST's IDX files (Fashion-MNIST, MNIST, ...).
    Idx,
    /// Photos in one folder per class.
    ImageFolder(FolderOptions),
    /// CIFAR-10's binary batches.
    Cifar10,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `fashion-mnist` verifies the files against the published checksums; other names do not.
    pub name: String,
    pub format: DataFormat,
    pub source: DataSource,
    pub verify_checksums: bool,
    /// Number of classes; labels must be below it.
    pub classes: usize,
    /// Keep only the first N training / test images (in file order): small, real pipelines.
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Per-channel normalisation; by default Fashion-MNIST's constants, (0.5, 0.5) for photos
    /// (as the seed), else measured on the training images.
    pub normalization: Option<Normalization>,
}

impl LoadOptions {
    pub fn fashion_mnist(dir: impl Into<PathBuf>) -> Self {
        Self {
            name: "fashion-mnist".into(),
            format: DataFormat::Idx,
            normalization: None,
            source: DataSource::Dir(dir.into()),
            verify_checksums: true,
            classes: 10,
            train_limit: None,
            test_limit: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// A labelled dataset: training and test splits.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub classes: usize,
    pub class_names: Vec<String>,
    pub train: ImageSet,
    pub test: ImageSet,
    pub normalization: Normalization,
    /// Photos as decoded, one per training row: what random resized crops are cut from.
    pub train_sources: Option<Vec<SourceImage>>,
    /// Files skipped because they did not decode (`skip_bad_images`), with why.
    pub skipped: Vec<(PathBuf, String)>,
    /// The last `unlabelled` training rows have no class (photos of an `unlabelled/` folder):
    /// never validation rows, never labelled.
    pub unlabelled: usize,
}

impl Dataset {
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let dir = match &opts.source {
            DataSource::Dir(dir) => Some(dir.as_path()),
            DataSource::Hub => None,
        };
        let mut raw = Raw::read(opts, dir)?;
        check_shapes(&raw.train, &raw.test, dir)?;
        raw.limit(opts)?;
        let normalization = normalization_for(opts, &raw.train)?;
        let fashion = opts.name == "fashion-mnist" && opts.format == DataFormat::Idx;
        if fashion && opts.classes == fashion_mnist::CLASS_NAMES.len() {
            raw.class_names = Some(
                fashion_mnist::CLASS_NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            );
        }
        Ok(Self {
            name: opts.name.clone(),
            classes: opts.classes,
            class_names: raw
                .class_names
                .unwrap_or_else(|| (0..opts.classes).map(|c| c.to_string()).collect()),
            train: raw.train,
            test: raw.test,
            normalization,
            train_sources: raw.sources,
            skipped: raw.skipped,
            unlabelled: raw.unlabelled,
        })
    }

    pub fn split(&self, split: Split) -> &ImageSet {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }

    /// Holds `val_size` labelled training images out for checkpoint selection: a seeded
    /// permutation, with both parts returned in dataset order (the unlabelled rows are in neither).
    pub fn validation_split(&self, val_size: usize, seed: u64) -> Result<(Vec<u32>, Vec<u32>)> {
        let n = self.train.len() - self.unlabelled;
        if val_size >= n {
            return Err(DataError::Config(format!(
                "the validation split ({val_size} images) must be smaller than the training set ({n} images)"
            )));
        }
        let mut order: Vec<u32> = (0..n as u32).collect();
        crate::rng::shuffle(
            &mut order,
            &mut crate::rng::rng(seed, crate::rng::Stream::Validation, 0),
        );
        let mut val = order[..val_size].to_vec();
        let mut train = order[val_size..].to_vec();
        val.sort_unstable();
        train.sort_unstable();
        Ok((train, val))
    }
}

/// The splits as read, before limits and normalisation.
struct Raw {
    train: ImageSet,
    test: ImageSet,
    class_names: Option<Vec<String>>,
    sources: Option<Vec<SourceImage>>,
    skipped: Vec<(PathBuf, String)>,
    unlabelled: usize,
}

impl Raw {
    fn plain(train: ImageSet, test: ImageSet, class_names: Option<Vec<String>>) -> Self {
        Self {
            train,
            test,
            class_names,
            sources: None,
            skipped: vec![],
            unlabelled: 0,
        }
    }

    /// Reads the splits in `opts.format` from `dir` (or the hub).
    fn read(opts: &LoadOptions, dir: Option<&Path>) -> Result<Self> {
        Ok(match (&opts.format, dir) {
            (DataFormat::Idx, Some(dir)) => Self::plain(
                load_idx_split(dir, "train", opts)?,
                load_idx_split(dir, "t10k", opts)?,
                None,
            ),
            (DataFormat::Idx, None) => {
                let (train, test) = load_hub(&opts.name)?;
                Self::plain(train, test, None)
            }
            (DataFormat::ImageFolder(f), Some(dir)) => {
                let d = crate::image_folder::load(dir, f)?;
                if d.class_names.len() != opts.classes {
                    return Err(DataError::Config(format!(
                        "{} has {} class folders ({}) but data.classes is {}",
                        dir.display(),
                        d.class_names.len(),
                        d.class_names.join(", "),
                        opts.classes
                    )));
                }
                Self {
                    train: d.train,
                    test: d.test,
                    class_names: Some(d.class_names),
                    sources: Some(d.train_sources),
                    skipped: d.skipped,
                    unlabelled: d.unlabelled,
                }
            }
            (DataFormat::Cifar10, Some(dir)) => {
                let (train, test, names) = crate::cifar::load(dir, opts.classes)?;
                Self::plain(train, test, Some(names))
            }
            (_, None) => {
                return Err(DataError::Config(
                    "only IDX datasets have a hub source".into(),
                ))
            }
        })
    }

    /// Keeps the first `train_limit` / `test_limit` images.
    fn limit(&mut self, opts: &LoadOptions) -> Result<()> {
        let labelled = self.train.len() - self.unlabelled;
        if let (Some(n), true) = (opts.train_limit, self.unlabelled > 0) {
            if n < labelled {
                return Err(DataError::Config(format!(
                    "data.train_limit {n} would cut the {labelled} labelled photos, and the \
                     unlabelled photos that follow them: it does not combine with an unlabelled folder"
                )));
            }
            return Ok(());
        }
        if let Some(n) = opts.train_limit {
            self.train.truncate(n);
            if let Some(s) = self.sources.as_mut() {
                s.truncate(n);
            }
        }
        if let Some(n) = opts.test_limit {
            self.test.truncate(n);
        }
        Ok(())
    }
}

/// The normalisation: the one given, Fashion-MNIST's constants, the seed's (0.5, 0.5) for
/// photos, else measured on the training images; one mean and std per channel.
fn normalization_for(opts: &LoadOptions, train: &ImageSet) -> Result<Normalization> {
    let fashion = opts.name == "fashion-mnist";
    let n = match (&opts.normalization, &opts.format) {
        (Some(n), _) => n.clone(),
        (None, DataFormat::Idx) if fashion => Normalization {
            mean: vec![fashion_mnist::MEAN],
            std: vec![fashion_mnist::STD],
        },
        (None, DataFormat::ImageFolder(_)) => Normalization {
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
        },
        (None, _) => Normalization::measure(train),
    };
    if n.mean.len() != train.channels || n.std.len() != train.channels {
        return Err(DataError::Config(format!(
            "the normalisation has {} means and {} stds for {} channels",
            n.mean.len(),
            n.std.len(),
            train.channels
        )));
    }
    Ok(n)
}

/// The training and test images must have one shape, or no model fits both.
fn check_shapes(train: &ImageSet, test: &ImageSet, dir: Option<&Path>) -> Result<()> {
    let shape = |s: &ImageSet| (s.channels, s.height, s.width);
    if shape(train) == shape(test) || test.is_empty() {
        return Ok(());
    }
    let show = |s: &ImageSet| {
        format!(
            "{}x{}x{} (channels x height x width)",
            s.channels, s.height, s.width
        )
    };
    Err(DataError::Config(format!(
        "{}: the training images are {} but the test images are {}; both splits must have one shape",
        dir.map_or("the dataset".into(), |d| d.display().to_string()),
        show(train),
        show(test)
    )))
}

fn find_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let hint = if dir == Path::new(fashion_mnist::DEBIAN_DIR) {
        " (run `just data`, which installs Debian's package dataset-fashion-mnist)"
    } else {
        ""
    };
    Err(DataError::Missing {
        dir: dir.to_path_buf(),
        message: format!("neither {stem}.gz nor {stem} is there{hint}"),
    })
}

fn read_checked(
    dir: &Path,
    stem: &str,
    rank: usize,
    opts: &LoadOptions,
) -> Result<(PathBuf, IdxArray)> {
    let path = find_file(dir, stem)?;
    let array = read_idx(&path, rank)?;
    if opts.verify_checksums && opts.name == "fashion-mnist" {
        fashion_mnist::verify(&path, stem, &array)?;
    }
    Ok((path, array))
}

fn load_idx_split(dir: &Path, prefix: &str, opts: &LoadOptions) -> Result<ImageSet> {
    let (image_path, images) = read_checked(dir, &format!("{prefix}-images-idx3-ubyte"), 3, opts)?;
    let (label_path, labels) = read_checked(dir, &format!("{prefix}-labels-idx1-ubyte"), 1, opts)?;
    if images.dims[0] != labels.dims[0] {
        return Err(DataError::invalid(
            &label_path,
            format!(
                "has {} labels but {} has {} images",
                labels.dims[0],
                image_path.display(),
                images.dims[0]
            ),
        ));
    }
    if let Some((i, &l)) = labels
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= opts.classes)
    {
        return Err(DataError::invalid(
            &label_path,
            format!(
                "label {l} at row {i} is not below the number of classes ({})",
                opts.classes
            ),
        ));
    }
    Ok(ImageSet {
        images: images.data,
        labels: labels.data.into_iter().map(u32::from).collect(),
        channels: 1,
        height: images.dims[1],
        width: images.dims[2],
    })
}

fn load_hub(name: &str) -> Result<(ImageSet, ImageSet)> {
    let ds = match name {
        "fashion-mnist" => candle_datasets::vision::fashion_mnist::load()?,
        "mnist" => candle_datasets::vision::mnist::load()?,
        other => {
            return Err(DataError::Config(format!(
                "no hub source for dataset {other:?}"
            )))
        }
    };
    let set = |images: &Tensor, labels: &Tensor| -> Result<ImageSet> {
        // candle-datasets hands out x/255 as f32; back to the bytes they came from.
        let images = (images.affine(255.0, 0.5)?.floor()?).to_dtype(candle_core::DType::U8)?;
        Ok(ImageSet {
            images: images.flatten_all()?.to_vec1::<u8>()?,
            labels: labels.to_dtype(candle_core::DType::U32)?.to_vec1::<u32>()?,
            channels: 1,
            height: 28,
            width: 28,
        })
    };
    Ok((
        set(&ds.train_images, &ds.train_labels)?,
        set(&ds.test_images, &ds.test_labels)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idx::encode_idx;
    use candle_core::Device;

    fn write_set(dir: &Path, prefix: &str, n: usize, labels: &[u8]) {
        let images: Vec<u8> = (0..n * 4 * 4).map(|i| (i * 7 % 256) as u8).collect();
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            encode_idx(&[n, 4, 4], &images),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            encode_idx(&[labels.len()], labels),
        )
        .unwrap();
    }

    fn opts(dir: &Path) -> LoadOptions {
        LoadOptions {
            name: "tiny".into(),
            format: DataFormat::Idx,
            normalization: None,
            source: DataSource::Dir(dir.to_path_buf()),
            verify_checksums: true,
            classes: 3,
            train_limit: None,
            test_limit: None,
        }
    }

    #[test]
    fn loads_a_folder_in_mnist_format() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), "train", 6, &[0, 1, 2, 0, 1, 2]);
        write_set(dir.path(), "t10k", 2, &[2, 1]);
        let ds = Dataset::load(&opts(dir.path())).unwrap();
        assert_eq!((ds.train.len(), ds.test.len(), ds.train.height), (6, 2, 4));
        assert_eq!(ds.test.labels, vec![2, 1]);
        let t = ds.train.to_tensor(&ds.normalization, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[6, 1, 4, 4]);
        // Measured normalisation makes the training pixels zero-mean, unit-variance.
        let mean = t.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean.abs() < 1e-4, "{mean}");
    }

    #[test]
    fn refuses_mismatched_counts_and_bad_labels() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), "train", 6, &[0, 1, 2, 0, 1]);
        write_set(dir.path(), "t10k", 2, &[2, 1]);
        let e = Dataset::load(&opts(dir.path())).unwrap_err().to_string();
        assert!(
            e.contains("train-labels-idx1-ubyte") && e.contains("5 labels"),
            "{e}"
        );
        write_set(dir.path(), "train", 6, &[0, 1, 2, 0, 1, 3]);
        let e = Dataset::load(&opts(dir.path())).unwrap_err().to_string();
        assert!(e.contains("label 3 at row 5"), "{e}");
        write_set(dir.path(), "train", 6, &[0, 1, 2, 0, 1, 2]);
        std::fs::remove_file(dir.path().join("t10k-images-idx3-ubyte")).unwrap();
        let e = Dataset::load(&opts(dir.path())).unwrap_err().to_string();
        assert!(e.contains("t10k-images-idx3-ubyte"), "{e}");
    }

    #[test]
    fn validation_split_is_seeded_disjoint_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), "train", 20, &[0; 20]);
        write_set(dir.path(), "t10k", 2, &[0, 0]);
        let ds = Dataset::load(&opts(dir.path())).unwrap();
        let (t1, v1) = ds.validation_split(5, 7).unwrap();
        let (t2, v2) = ds.validation_split(5, 7).unwrap();
        let (_, v3) = ds.validation_split(5, 8).unwrap();
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_ne!(v1, v3);
        let mut all = [t1, v1].concat();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<u32>>());
        assert!(ds.validation_split(20, 0).is_err());
    }

    #[test]
    fn fingerprint_sees_one_changed_label() {
        let set = ImageSet {
            images: vec![1, 2, 3, 4],
            labels: vec![0, 1],
            channels: 1,
            height: 1,
            width: 2,
        };
        let mut other = set.clone();
        other.labels[1] = 0;
        assert_ne!(set.fingerprint(), other.fingerprint());
        assert_eq!(set.fingerprint(), set.clone().fingerprint());
    }
}
