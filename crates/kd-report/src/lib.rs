//! Stage 4, report: teacher, distilled student and baseline student side by side — accuracy,
//! parameters, size on disk, inference speed, training time — and their validation curves.
//! Writes `report.md` and `curves.svg`.

pub mod labels;
pub mod runs;
pub mod seeds;
pub mod stats;
pub mod svg;
pub mod sweep;

use anyhow::Context;
use kd_train::manifest::stage_key;
use kd_train::stage::layout::{
    CHECKPOINT, EXPORT, KNOWLEDGE, REPORT, STUDENT_BASELINE, STUDENT_KD, TEACHER,
};
use kd_train::stage::threads;
use kd_train::table::Table;
use kd_train::{evaluate, LoadedData, Manifest, Pipeline, PipelineArgs};
use runs::Runs;
use std::collections::BTreeMap;
use std::time::Instant;

pub const STAGE: &str = REPORT;
pub const REPORT_FILE: &str = "report.md";
pub const CURVES_FILE: &str = "curves.svg";

/// Compare the teacher and both students.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kd-report", version)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Batch size of the inference-speed measurement.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
}

/// One model of the comparison, as measured here.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelResult {
    pub name: String,
    pub stage: String,
    pub architecture: String,
    pub parameters: usize,
    pub checkpoint_bytes: u64,
    pub test_accuracy: f64,
    pub inference_images_per_sec: f64,
    pub training_seconds: f64,
    pub training_images_per_sec: f64,
    pub val_accuracy_per_epoch: Vec<f64>,
}

/// The three models of the comparison: stage folder and name in the report.
const MODELS: [(&str, &str); 3] = [
    (TEACHER, "teacher"),
    (STUDENT_KD, "student, distilled (KD)"),
    (STUDENT_BASELINE, "student, labels only"),
];

/// The report's sections beyond the three models: seeds, labels, sweep (markdown, charts).
struct Sections {
    seeds: Option<(String, seeds::Seeds)>,
    labels: Option<(String, String, Vec<labels::LabelPoint>)>,
    sweep: Option<(String, String, sweep::Sweep)>,
}

impl Sections {
    fn of(runs: &Runs, data: &LoadedData) -> Self {
        Self {
            seeds: seeds::seeds_section(runs),
            labels: labels::labels_section(runs, data.train_rows.len()),
            sweep: sweep::sweep_section(runs),
        }
    }

    fn markdown(&self) -> String {
        [
            self.labels.as_ref().map(|s| s.0.as_str()),
            self.seeds.as_ref().map(|s| s.0.as_str()),
            self.sweep.as_ref().map(|s| s.0.as_str()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The charts to write beside the report (file, SVG); a chart without its section is
    /// removed.
    fn charts(&self) -> [(&'static str, Option<&str>); 2] {
        [
            (
                labels::LABELS_FILE,
                self.labels.as_ref().map(|s| s.1.as_str()),
            ),
            (sweep::SWEEP_FILE, self.sweep.as_ref().map(|s| s.1.as_str())),
        ]
    }
}

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let started = Instant::now();
    let pipeline = args.pipeline.open(&[])?;
    let data = pipeline.load_data()?;
    let runs = Runs::find(&pipeline.root);
    let inputs = inputs(&pipeline, &data, &runs)?;
    let settings = serde_json::json!({ "batch_size": args.batch_size });
    let key = stage_key(STAGE, &settings, &inputs);
    let dir = pipeline.dir(STAGE);
    let _lock = kd_train::verify::RunLock::acquire(&dir)?;
    if let Some(m) = pipeline.up_to_date(STAGE, &dir, &key, &settings, &inputs) {
        return Ok(m);
    }
    let results = measure(&pipeline, &data, &runs, args.batch_size)?;
    let sections = Sections::of(&runs, &data);
    let headline = sections.seeds.as_ref().and_then(|s| s.1.headline());
    let mut markdown = render(
        &pipeline,
        &data,
        &results,
        &runs,
        args.batch_size,
        headline.as_deref(),
    )?;
    let at = markdown
        .find("## Validation accuracy")
        .unwrap_or(markdown.len());
    markdown.insert_str(at, &deploy_section(&pipeline, &results[1]));
    // The experiments go before the settings, which close the report.
    let at = markdown.find("## Settings").unwrap_or(markdown.len());
    markdown.insert_str(at, &sections.markdown());
    let mut outputs = vec![REPORT_FILE, CURVES_FILE];
    kd_data::write_atomic_bytes(
        &dir.join(CURVES_FILE),
        curves(&pipeline, &results).as_bytes(),
    )?;
    for (file, chart) in sections.charts() {
        match chart {
            Some(svg) => {
                kd_data::write_atomic_bytes(&dir.join(file), svg.as_bytes())?;
                outputs.push(file);
            }
            None => {
                let _ = std::fs::remove_file(dir.join(file));
            }
        }
    }
    kd_data::write_atomic_bytes(&dir.join(REPORT_FILE), markdown.as_bytes())?;
    let kd_gain = results[1].test_accuracy - results[2].test_accuracy;
    let manifest = Manifest {
        settings,
        inputs,
        wall_seconds: started.elapsed().as_secs_f64(),
        metrics: serde_json::json!({
            "models": results,
            "kd_minus_baseline": kd_gain,
            "seeds": sections.seeds.map(|s| s.1),
            "labels": sections.labels.map(|s| s.2),
            "sweep": sections.sweep.map(|s| s.2),
        }),
        ..Manifest::start(STAGE, &pipeline.name, key)
    }
    .write(&dir, &outputs)?;
    println!(
        "\n{}\nKD - baseline: {:+.2} points of test accuracy\nwrote {}",
        models_table(&results, args.batch_size).to_markdown(),
        100.0 * kd_gain,
        dir.join(REPORT_FILE).display()
    );
    Ok(manifest)
}

/// What the report depends on: the test set, and the key and outputs of every run it reads
/// (the pipeline's stages must have run).
fn inputs(
    pipeline: &Pipeline,
    data: &LoadedData,
    runs: &Runs,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut inputs = BTreeMap::from([("dataset.test".to_string(), data.test_fingerprint.clone())]);
    for stage in [TEACHER, KNOWLEDGE, STUDENT_KD, STUDENT_BASELINE] {
        let m = runs.at(stage).map(|r| &r.manifest).with_context(|| {
            format!(
                "the {stage} stage has not run yet, or its manifest in {} does not read (run `just {} {}`)",
                pipeline.dir(stage).display(),
                just_recipe(stage),
                pipeline.name
            )
        })?;
        // Every file it stands on must still be the bytes its manifest recorded.
        for (file, sha) in &m.outputs {
            let rerun = format!("just {} {}", just_recipe(stage), pipeline.name);
            kd_train::verify::verified(&pipeline.dir(stage).join(file), &rerun)?;
            inputs.insert(format!("{stage}/{file}"), sha.clone());
        }
    }
    for r in &runs.all {
        inputs.insert(format!("{}.key", r.dir), r.manifest.key.clone());
    }
    if let Ok(m) = Manifest::read_at(&deploy_manifest(pipeline)) {
        inputs.insert(format!("{EXPORT}/{STUDENT_KD}.key"), m.key);
    }
    Ok(inputs)
}

/// The export of the distilled student, if `kd-export` has run.
fn deploy_manifest(pipeline: &Pipeline) -> std::path::PathBuf {
    Manifest::named(&pipeline.dir(EXPORT), STUDENT_KD)
}

/// The distilled student as ONNX: file, size, ONNX Runtime's accuracy and speed next to ours.
fn deploy_section(pipeline: &Pipeline, kd: &ModelResult) -> String {
    let Ok(r) = Manifest::read_at(&deploy_manifest(pipeline)).and_then(|m| m.export()) else {
        return format!(
            "## Deploy\n\nNot exported yet: `just export {}` writes the distilled student as ONNX.\n\n",
            pipeline.name
        );
    };
    let file = format!("{EXPORT}/{}", r.file);
    let mut md = format!(
        "## Deploy\n\n`{file}` ({:.1} KiB, ONNX opset {}): input `pixels` float32 [batch, {}, {}, {}], values \
         0–255 (the normalisation is in the graph), output `main`, the logits of the {} classes \
         named in its metadata. ",
        r.bytes as f64 / 1024.0,
        r.opset,
        r.input[0],
        r.input[1],
        r.input[2],
        r.classes.len()
    );
    match &r.runtime {
        None => md += "It was not run by ONNX Runtime (no Python with onnxruntime when it was exported: `just python-env`).\n\n",
        Some(rt) => {
            let worst = rt.heads.values().map(|h| h.max_abs_diff).fold(0f32, f32::max);
            md += &format!(
                "ONNX Runtime {} ({} threads) on the {} test images: **{:.2}% test accuracy** \
                 (this report: {:.2}%; largest logit difference from ours {worst:.1e}).\n\n",
                rt.onnxruntime,
                rt.threads,
                group(rt.test_images),
                100.0 * rt.test_accuracy,
                100.0 * kd.test_accuracy,
            );
            let mut t = Table::new(&["runtime", "latency, batch 1 (ms/image)", "throughput, batch 256 (img/s)"]);
            t.row(&[format!("ONNX Runtime {}", rt.onnxruntime), format!("{:.3}", rt.latency_ms_batch1), format!("{:.0}", rt.throughput_batch256)]);
            t.row(&["candle (ours)".into(), format!("{:.3}", rt.candle_latency_ms_batch1), format!("{:.0}", rt.candle_throughput_batch256)]);
            md += &t.to_markdown();
            md += "\n";
        }
    }
    md
}

/// The three models: test accuracy and inference speed measured here, training numbers from
/// their manifests.
fn measure(
    pipeline: &Pipeline,
    data: &LoadedData,
    runs: &Runs,
    batch: usize,
) -> anyhow::Result<Vec<ModelResult>> {
    let mut results = Vec::new();
    for (stage, name) in MODELS {
        let run = runs.at(stage).context("checked by inputs")?;
        let record = run.train.as_ref().context("a training stage")?;
        let arch = &record.architecture;
        let checkpoint = pipeline.dir(stage).join(CHECKPOINT);
        let model = kd_models::load_frozen(arch, &data.spec, &checkpoint, &data.device)?;
        // One warm-up batch, then the whole test set at the measured batch size.
        let warm = &data.test_rows[..data.test_rows.len().min(batch)];
        evaluate(
            model.as_ref(),
            kd_train::Subset {
                rows: warm,
                ..data.test()
            },
            batch,
        )?;
        let eval = evaluate(model.as_ref(), data.test(), batch)?;
        results.push(ModelResult {
            name: name.to_string(),
            stage: stage.to_string(),
            architecture: arch.clone(),
            parameters: kd_models::num_parameters(arch, &data.spec)?,
            checkpoint_bytes: std::fs::metadata(&checkpoint)?.len(),
            test_accuracy: eval.accuracy,
            inference_images_per_sec: eval.images_per_sec,
            training_seconds: run.manifest.wall_seconds,
            training_images_per_sec: record.fit.train_images_per_sec,
            val_accuracy_per_epoch: record.fit.epochs.iter().map(|e| e.val_accuracy).collect(),
        });
        tracing::info!(
            "report: {name}: test accuracy {:.2}%, {:.0} img/s",
            100.0 * eval.accuracy,
            eval.images_per_sec
        );
    }
    Ok(results)
}

/// Validation accuracy per epoch of the three models, as SVG.
fn curves(pipeline: &Pipeline, results: &[ModelResult]) -> String {
    let series: Vec<svg::Series> = results
        .iter()
        .zip(svg::COLOURS)
        .map(|(r, colour)| svg::Series {
            name: r.name.clone(),
            colour,
            points: r
                .val_accuracy_per_epoch
                .iter()
                .enumerate()
                .map(|(i, a)| ((i + 1) as f64, *a))
                .collect(),
            errors: vec![],
        })
        .collect();
    svg::line_chart(
        &format!("Validation accuracy — {}", pipeline.name),
        "epoch",
        "validation accuracy",
        &series,
    )
}

fn just_recipe(stage: &str) -> &str {
    match stage {
        KNOWLEDGE => "precompute",
        STUDENT_KD => "student",
        STUDENT_BASELINE => "baseline",
        other => other,
    }
}

fn models_table(results: &[ModelResult], batch: usize) -> Table {
    let mut t = Table::new(&[
        "model".to_string(),
        "architecture".into(),
        "parameters".into(),
        "size (f32)".into(),
        "test accuracy".into(),
        format!("inference img/s (batch {batch})"),
        "training time".into(),
        "training img/s".into(),
    ]);
    for r in results {
        t.row(&[
            r.name.clone(),
            r.architecture.clone(),
            group(r.parameters),
            format!("{:.1} KiB", r.checkpoint_bytes as f64 / 1024.0),
            format!("{:.2}%", 100.0 * r.test_accuracy),
            format!("{:.0}", r.inference_images_per_sec),
            duration(r.training_seconds),
            format!("{:.0}", r.training_images_per_sec),
        ]);
    }
    t
}

fn render(
    pipeline: &kd_train::Pipeline,
    data: &kd_train::LoadedData,
    results: &[ModelResult],
    runs: &Runs,
    batch: usize,
    over_seeds: Option<&str>,
) -> anyhow::Result<String> {
    let (teacher, kd, base) = (&results[0], &results[1], &results[2]);
    let kd_run = runs.at(STUDENT_KD).context("checked by inputs")?;
    let s = kd_run
        .manifest
        .settings_as::<kd_train::record::KdSettings>()?
        .student;
    let mut md = format!(
        "# Distillation report: `{}`\n\n\
         Dataset **{}**: {} training images ({} for training, {} held out for validation), {} test images, {} classes. \
         Accuracies are on the test set, measured once per final model; each checkpoint was chosen on the validation split. \
         Speeds were measured in one process, one model after the other, on {} threads.\n\n",
        pipeline.name,
        data.dataset.name,
        group(data.dataset.train.len()),
        group(data.train_rows.len()),
        group(data.val_rows.len()),
        group(data.dataset.test.len()),
        data.spec.classes,
        threads()
    );
    md += "## Models\n\n";
    md += &models_table(results, batch).to_markdown();
    md += &whose_knowledge(runs, kd_run);
    md += &format!(
        "\n**Distillation − baseline: {:+.2} points** of test accuracy ({:.2}% vs {:.2}%; same student, schedule and seed; \
         KD with T = {}, hard/soft = {}/{}, head weights {}).{}\n\n\
         The distilled student has {:.1}× fewer parameters than the teacher and runs {:.1}× faster; its test accuracy is {:+.2} points from the teacher's.\n\n",
        100.0 * (kd.test_accuracy - base.test_accuracy),
        100.0 * kd.test_accuracy,
        100.0 * base.test_accuracy,
        s.temperature,
        s.hard_weight,
        s.soft_weight,
        s.head_weights.iter().map(|(h, w)| format!("{h} {w}")).collect::<Vec<_>>().join(", "),
        over_seeds.map_or(String::new(), |line| format!(" {line}")),
        teacher.parameters as f64 / kd.parameters.max(1) as f64,
        kd.inference_images_per_sec / teacher.inference_images_per_sec.max(1e-9),
        100.0 * (kd.test_accuracy - teacher.test_accuracy),
    );
    md += &format!(
        "## Validation accuracy per epoch\n\n![validation accuracy per epoch]({CURVES_FILE})\n\n"
    );
    md += &curve_table(results).to_markdown();
    md += "\n## Stage wall times\n\n";
    md += &wall_times(runs).to_markdown();
    md += &knowledge_section(runs)?;
    md += &format!(
        "## Settings\n\nThe resolved pipeline (`pipelines/{}.toml` with any overrides):\n\n```toml\n{}```\n",
        pipeline.name,
        toml::to_string(&pipeline.config).context("rendering the settings")?
    );
    Ok(md)
}

/// Validation accuracy per epoch of the three models.
fn curve_table(results: &[ModelResult]) -> Table {
    let epochs = results
        .iter()
        .map(|r| r.val_accuracy_per_epoch.len())
        .max()
        .unwrap_or(0);
    let mut header = vec!["epoch".to_string()];
    header.extend(results.iter().map(|r| r.name.clone()));
    let mut curve = Table::new(&header);
    for e in 0..epochs {
        let mut row = vec![(e + 1).to_string()];
        row.extend(results.iter().map(|r| {
            r.val_accuracy_per_epoch
                .get(e)
                .map_or(String::new(), |a| format!("{:.2}%", 100.0 * a))
        }));
        curve.row(&row);
    }
    curve
}

/// The pipeline's knowledge file, and every knowledge file's size.
fn knowledge_section(runs: &Runs) -> anyhow::Result<String> {
    let k = runs
        .at(KNOWLEDGE)
        .context("checked by inputs")?
        .manifest
        .knowledge()?;
    let mut md = format!(
        "\n## Knowledge file\n\n`{}/{}`: the teacher's logits for {} training images, heads {}, {:.1} MiB \
         (the teacher's main head agrees with {:.2}% of the {}training labels).\n\n",
        KNOWLEDGE,
        kd_train::stage::layout::KNOWLEDGE_FILE,
        group(k.rows),
        k.heads.join(", "),
        k.bytes as f64 / (1 << 20) as f64,
        100.0 * k.train_accuracy_per_head.get("main").copied().unwrap_or(0.0),
        k.labelled_rows.map_or(String::new(), |n| format!("{} labelled ", group(n))),
    );
    md += &runs.knowledge_table().to_markdown();
    md += "\n";
    Ok(md)
}

/// A warning when the distilled student did not learn from this pipeline's teacher (a knowledge
/// file passed with `--knowledge`): the teacher it did learn from, found through the hashes.
fn whose_knowledge(runs: &Runs, kd: &runs::Run) -> String {
    match runs.teacher_of(kd) {
        Some(t) if t.dir == TEACHER => String::new(),
        Some(t) => format!(
            "\n**Note:** the distilled student learned from the knowledge of `{}` ({:.2}% test \
             accuracy), not from this pipeline's teacher above.\n",
            t.dir,
            100.0 * t.test_accuracy()
        ),
        None => "\n**Note:** the distilled student learned from a knowledge file that is not \
                 this pipeline's (`student-kd/manifest.json` names it): its teacher is not among \
                 this pipeline's runs.\n"
            .to_string(),
    }
}

/// Each of the pipeline's stages: its wall time and throughput.
fn wall_times(runs: &Runs) -> Table {
    let mut times = Table::new(&["stage", "wall time", "throughput"]);
    let mut total = 0.0;
    for run in [TEACHER, KNOWLEDGE, STUDENT_KD, STUDENT_BASELINE]
        .iter()
        .filter_map(|s| runs.at(s))
    {
        let m = &run.manifest;
        total += m.wall_seconds;
        let throughput = match (&run.train, m.knowledge()) {
            (Some(t), _) => format!("{:.0} img/s", t.fit.train_images_per_sec),
            (None, Ok(k)) => match (k.images_per_sec, k.shards) {
                (Some(ips), _) => format!("{ips:.0} img/s"),
                // Merged from an array job's shards: the time is the merge's, the speed the engine's.
                (None, Some(n)) => format!("merged from {n} shards"),
                (None, None) => "-".into(),
            },
            (None, Err(_)) => "-".into(),
        };
        times.row(&[run.dir.clone(), duration(m.wall_seconds), throughput]);
    }
    times.row(&["total".to_string(), duration(total), String::new()]);
    times
}

fn duration(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else if seconds < 3600.0 {
        format!(
            "{:.0} min {:02.0} s",
            (seconds / 60.0).floor(),
            seconds % 60.0
        )
    } else {
        format!(
            "{:.0} h {:02.0} min",
            (seconds / 3600.0).floor(),
            (seconds % 3600.0) / 60.0
        )
    }
}

pub(crate) fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(group(538330), "538,330");
        assert_eq!(group(20490), "20,490");
        assert_eq!(group(999), "999");
        assert_eq!(duration(5.25), "5.2 s");
        assert_eq!(duration(125.0), "2 min 05 s");
        assert_eq!(duration(3720.0), "1 h 02 min");
    }
}
