//! Using what the pipeline trained: classify image files (PNG or JPEG, or folders of them) with
//! the distilled student, the baseline or the teacher, and print each file's most likely classes.
//!
//! Every image goes through the transform the model was evaluated with: photos (3-channel
//! pipelines) are decoded and resized whole to the model's input, exactly as the report's test
//! images; 1-channel pipelines (Fashion-MNIST) read the image as grey levels, resized whole to the
//! model's input when its size differs. Then the pipeline's normalisation. The architecture comes
//! from the model's own manifest, the class names from its `class_indices.json`.

use anyhow::Context;
use candle_core::{Device, Tensor, D};
use kd_data::{DataFormat, Dataset, ImageSet, Normalization};
use kd_models::InputSpec;
use kd_train::stage::layout::{CHECKPOINT, CLASS_INDICES};
use kd_train::stage::TrainedModel;
use kd_train::{Manifest, PipelineArgs, Subset};
use std::path::{Path, PathBuf};

/// Classify image files with a trained model of a pipeline.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kd-predict", version)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Image files (PNG, JPEG) or folders of them (searched recursively, in name order).
    #[arg(required = true, value_name = "IMAGE_OR_FOLDER")]
    pub inputs: Vec<PathBuf>,
    /// Which model: the distilled student, the baseline or the teacher.
    #[arg(long, value_enum, default_value_t = TrainedModel::StudentKd)]
    pub model: TrainedModel,
    /// A tagged run of that model (`runs/<TAG>/<model>/`, e.g. seed-1).
    #[arg(long)]
    pub tag: Option<String>,
    /// Classes shown per image, most likely first.
    #[arg(long, default_value_t = 3)]
    pub top: usize,
    /// One JSON object per image (file, classes, probabilities) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scored {
    pub index: usize,
    pub class: String,
    pub probability: f32,
}

/// What the model says about one file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    pub file: PathBuf,
    /// The `top` most likely classes, most likely first.
    pub top: Vec<Scored>,
    /// The model's raw output (main head), one logit per class.
    pub logits: Vec<f32>,
}

/// File names read as images when a folder is given.
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

pub fn run(args: &Args) -> anyhow::Result<Vec<Prediction>> {
    if args.top == 0 || args.batch_size == 0 {
        anyhow::bail!("--top and --batch-size must be at least 1");
    }
    let pipeline = args.pipeline.open(&[])?;
    if let Some(tag) = &args.tag {
        kd_train::stage::check_tag(tag).map_err(anyhow::Error::msg)?;
    }
    let dir = pipeline.dir(&kd_train::stage::stage_name(
        args.model.stage(),
        args.tag.as_deref(),
    ));
    let (arch, classes) = trained(&pipeline, args, &dir)?;
    let (spec, norm) = input_contract(&pipeline, classes.len())?;
    let files = image_files(&args.inputs)?;
    let checkpoint = dir.join(CHECKPOINT);
    let model = kd_models::load_frozen(&arch, &spec, &checkpoint, &Device::Cpu)?;
    tracing::info!(
        "{}: {arch} from {}, {} image(s), input {}x{}x{}",
        args.model,
        dir.display(),
        files.len(),
        spec.channels,
        spec.height,
        spec.width
    );

    let mut out = Vec::with_capacity(files.len());
    for chunk in files.chunks(args.batch_size) {
        kd_train::interrupt::check("classifying")?;
        let set = read_images(chunk, &spec)?;
        let images = set.to_tensor(&norm, &Device::Cpu)?;
        let labels = set.labels_tensor(&Device::Cpu)?;
        let rows: Vec<u32> = (0..chunk.len() as u32).collect();
        let heads = kd_train::predict(
            model.as_ref(),
            Subset {
                images: &images,
                labels: &labels,
                rows: &rows,
            },
            chunk.len(),
            "",
        )?;
        let main = heads
            .into_iter()
            .next()
            .context("the model returned no output")?;
        if main.iter().any(|x| !x.is_finite()) {
            anyhow::bail!(
                "{}: the model gives non-finite outputs (its weights are not usable; retrain it)",
                checkpoint.display()
            );
        }
        let logits = Tensor::from_vec(main, (chunk.len(), spec.classes), &Device::Cpu)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        for ((file, p), l) in chunk.iter().zip(probs).zip(logits.to_vec2::<f32>()?) {
            out.push(Prediction {
                file: file.clone(),
                top: top_k(&p, args.top, &classes),
                logits: l,
            });
        }
    }
    Ok(out)
}

/// The model's architecture and class names, from the manifest of the run that trained it,
/// whose checkpoint hash the file on disk must match.
fn trained(
    pipeline: &kd_train::Pipeline,
    args: &Args,
    dir: &Path,
) -> anyhow::Result<(String, Vec<String>)> {
    let manifest = Manifest::read(dir).with_context(|| match &args.tag {
        Some(tag) => format!(
            "no {} of a run tagged {tag} in {}",
            args.model,
            dir.display()
        ),
        None => format!(
            "no trained {} in {} (run the pipeline first: `just pipeline {}`)",
            args.model,
            dir.display(),
            pipeline.name
        ),
    })?;
    let arch = manifest
        .training()
        .with_context(|| format!("{}: not a trained model's manifest", dir.display()))?
        .architecture;
    let rerun = format!("just {} {}", args.model.recipe(), pipeline.name);
    kd_train::verify::verified(&dir.join(CHECKPOINT), &rerun)?;
    let classes = kd_train::stage::class_names(&dir.join(CLASS_INDICES))?;
    Ok((arch, classes))
}

/// Prints the predictions: `file  class 97.1%  other 2.0% …`, or JSON lines.
pub fn print(predictions: &[Prediction], json: bool) -> anyhow::Result<()> {
    for p in predictions {
        if json {
            let top: Vec<_> = p
                .top
                .iter()
                .map(|s| serde_json::json!({ "index": s.index, "class": s.class, "probability": s.probability }))
                .collect();
            println!(
                "{}",
                serde_json::json!({ "file": p.file.display().to_string(), "top": top })
            );
        } else {
            let top: Vec<String> = p
                .top
                .iter()
                .map(|s| format!("{} {:.1}%", s.class, 100.0 * s.probability))
                .collect();
            println!("{}\t{}", p.file.display(), top.join("  "));
        }
    }
    Ok(())
}

/// The `k` most likely classes, most likely first (ties: the lower index first).
fn top_k(probs: &[f32], k: usize, classes: &[String]) -> Vec<Scored> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| Scored {
            index: i,
            class: classes[i].clone(),
            probability: probs[i],
        })
        .collect()
}

/// Class names in index order from a model's `class_indices.json` (`{"0": "T-shirt/top", …}`).
/// The model's input shape and the normalisation it was trained with. Photos in class folders
/// have both in the pipeline file; other formats need the dataset (its image size, and the
/// normalisation measured on its training set unless the pipeline file gives one).
fn input_contract(
    pipeline: &kd_train::Pipeline,
    classes: usize,
) -> anyhow::Result<(InputSpec, Normalization)> {
    let opts = pipeline
        .config
        .data
        .load_options()
        .map_err(anyhow::Error::msg)?;
    let (channels, height, width, norm) = match (&opts.format, &opts.normalization) {
        (DataFormat::ImageFolder(f), given) => (
            3,
            f.size,
            f.size,
            given.clone().unwrap_or(Normalization {
                mean: vec![0.5; 3],
                std: vec![0.5; 3],
            }),
        ),
        _ => {
            let d = Dataset::load(&opts)?;
            (
                d.train.channels,
                d.train.height,
                d.train.width,
                d.normalization,
            )
        }
    };
    let spec = InputSpec {
        channels,
        height,
        width,
        classes,
    };
    Ok((spec, norm))
}

/// The files to classify: each file as given, each folder's image files recursively, in name
/// order.
/// The image files named or found under the named folders (recursively, in name order). A
/// folder reached twice (a symlink loop, or two links to one folder) is listed once, and each
/// file is classified once however many paths lead to it.
fn image_files(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut seen = std::collections::HashSet::new();
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let before = files.len();
            walk(input, &mut seen, &mut files)?;
            if files.len() == before {
                anyhow::bail!("{}: no PNG or JPEG files in this folder", input.display());
            }
        } else if input.exists() {
            if seen.insert(canonical(input)?) {
                files.push(input.clone());
            }
        } else {
            anyhow::bail!("{}: no such file or folder", input.display());
        }
    }
    Ok(files)
}

fn canonical(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{}: cannot resolve", p.display()))
}

/// Adds the image files under `dir` to `out`, entering each real folder and listing each real
/// file once (`seen` holds their canonical paths); stops on a signal.
fn walk(
    dir: &Path,
    seen: &mut std::collections::HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    if !seen.insert(canonical(dir)?) {
        return Ok(());
    }
    kd_train::interrupt::check("listing the input folders")?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, seen, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            && seen.insert(canonical(&p)?)
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads and transforms images to the model's input (labels 0: unknown).
fn read_images(files: &[PathBuf], spec: &InputSpec) -> anyhow::Result<ImageSet> {
    let (c, h, w) = (spec.channels, spec.height, spec.width);
    let mut images = Vec::with_capacity(files.len() * c * h * w);
    for file in files {
        let size = h.max(w);
        let src = kd_data::image_folder::decode(file, size)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let bytes = match c {
            3 if h == w => kd_data::image_folder::eval_view(&src, h),
            1 => grey(&src, h, w)?,
            _ => anyhow::bail!("a {c}-channel {h}x{w} model input is not supported for files"),
        };
        images.extend(bytes);
    }
    Ok(ImageSet {
        images,
        labels: vec![0; files.len()],
        channels: c,
        height: h,
        width: w,
    })
}

/// Grey levels of a decoded image, resized whole to `h × w` when its size differs.
fn grey(src: &kd_data::SourceImage, h: usize, w: usize) -> anyhow::Result<Vec<u8>> {
    let rgb = src
        .image()
        .context("decoded image has an inconsistent size")?;
    let luma = image::DynamicImage::ImageRgb8(rgb).into_luma8();
    let luma = if luma.dimensions() == (w as u32, h as u32) {
        luma
    } else {
        image::imageops::resize(
            &luma,
            w as u32,
            h as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    Ok(luma.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_probability_then_index() {
        let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let top = top_k(&[0.1, 0.4, 0.4, 0.1], 3, &names);
        let got: Vec<(usize, &str)> = top.iter().map(|s| (s.index, s.class.as_str())).collect();
        assert_eq!(got, [(1, "b"), (2, "c"), (0, "a")]);
        assert_eq!(top_k(&[1.0], 5, &names[..1]).len(), 1);
    }
}
