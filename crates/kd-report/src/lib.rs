//! Stage 4, report: teacher, distilled student and baseline student side by side — accuracy,
//! parameters, size on disk, inference speed, training time — and their validation curves.
//! Writes `report.md` and `curves.svg`.

pub mod runs;
pub mod svg;

use anyhow::Context;
use candle_core::Device;
use kd_train::manifest::stage_key;
use kd_train::stage::layout::{
    CHECKPOINT, KNOWLEDGE, REPORT, STUDENT_BASELINE, STUDENT_KD, TEACHER,
};
use kd_train::stage::threads;
use kd_train::table::Table;
use kd_train::{evaluate, FitReport, Manifest, PipelineArgs};
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

pub fn run(args: &Args) -> anyhow::Result<Manifest> {
    let started = Instant::now();
    let pipeline = args.pipeline.open(&[])?;
    let data = pipeline.load_data()?;
    let cfg = &pipeline.config;
    let models = [
        (TEACHER, "teacher", cfg.teacher.arch.as_str()),
        (
            STUDENT_KD,
            "student, distilled (KD)",
            cfg.student.arch.as_str(),
        ),
        (
            STUDENT_BASELINE,
            "student, labels only",
            cfg.student.arch.as_str(),
        ),
    ];
    let mut manifests = BTreeMap::new();
    let mut inputs = BTreeMap::from([("dataset.test".to_string(), data.test_fingerprint.clone())]);
    for (stage, _, _) in models.iter().chain([&(KNOWLEDGE, "", "")]) {
        let dir = pipeline.dir(stage);
        let m = Manifest::read(&dir).with_context(|| {
            format!(
                "the {stage} stage has not run yet (run `just {}`)",
                just_recipe(stage)
            )
        })?;
        inputs.insert(format!("{stage}.key"), m.key.clone());
        for (file, sha) in &m.outputs {
            inputs.insert(format!("{stage}/{file}"), sha.clone());
        }
        manifests.insert(stage.to_string(), m);
    }
    // The tagged runs of `just compare` and `just sweep`, summarised below.
    let tagged = runs::find(&pipeline.root);
    for r in &tagged {
        inputs.insert(
            format!("{}/{}/{}.key", runs::RUNS, r.tag, r.stage),
            r.manifest.key.clone(),
        );
    }
    let settings = serde_json::json!({ "batch_size": args.batch_size });
    let key = stage_key(STAGE, &settings, &inputs);
    let dir = pipeline.dir(STAGE);
    if let Some(m) = pipeline.up_to_date(STAGE, &dir, &key, &settings, &inputs) {
        return Ok(m);
    }

    let mut results = Vec::new();
    for (stage, name, arch) in models {
        let m = &manifests[stage];
        let checkpoint = pipeline.dir(stage).join(CHECKPOINT);
        let model = kd_models::load_frozen(arch, &data.spec, &checkpoint, &Device::Cpu)?;
        // One warm-up batch, then the whole test set at the measured batch size.
        evaluate(
            model.as_ref(),
            kd_train::Subset {
                rows: &data.test_rows[..data.test_rows.len().min(args.batch_size)],
                ..data.test()
            },
            args.batch_size,
        )?;
        let eval = evaluate(model.as_ref(), data.test(), args.batch_size)?;
        let fit: FitReport =
            serde_json::from_value(m.metrics["fit"].clone()).with_context(|| {
                format!(
                    "{}: no training metrics",
                    Manifest::path(&pipeline.dir(stage)).display()
                )
            })?;
        results.push(ModelResult {
            name: name.to_string(),
            stage: stage.to_string(),
            architecture: arch.to_string(),
            parameters: kd_models::num_parameters(arch, &data.spec)?,
            checkpoint_bytes: std::fs::metadata(&checkpoint)?.len(),
            test_accuracy: eval.accuracy,
            inference_images_per_sec: eval.images_per_sec,
            training_seconds: m.wall_seconds,
            training_images_per_sec: fit.train_images_per_sec,
            val_accuracy_per_epoch: fit.epochs.iter().map(|e| e.val_accuracy).collect(),
        });
        tracing::info!(
            "report: {name}: test accuracy {:.2}%, {:.0} img/s",
            100.0 * eval.accuracy,
            eval.images_per_sec
        );
    }

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
        })
        .collect();
    let chart = svg::line_chart(
        &format!("Validation accuracy — {}", pipeline.name),
        "epoch",
        "validation accuracy",
        &series,
    );
    let seeds = runs::seeds_section(&tagged);
    let sweep = runs::sweep_section(&tagged);
    let over_seeds = seeds.as_ref().and_then(|s| runs::seeds_headline(&s.1));
    let mut markdown = render(
        &pipeline,
        &data,
        &results,
        &manifests,
        args.batch_size,
        over_seeds.as_deref(),
    )?;
    // The tagged runs go before the settings, which close the report.
    let at = markdown.find("## Settings").unwrap_or(markdown.len());
    let extra: String = [
        seeds.as_ref().map(|s| s.0.clone()),
        sweep.as_ref().map(|s| s.0.clone()),
    ]
    .into_iter()
    .flatten()
    .collect();
    markdown.insert_str(at, &extra);
    kd_data::write_atomic_bytes(&dir.join(CURVES_FILE), chart.as_bytes())?;
    let mut outputs = vec![REPORT_FILE, CURVES_FILE];
    match &sweep {
        Some((_, chart, _)) => {
            kd_data::write_atomic_bytes(&dir.join(runs::SWEEP_FILE), chart.as_bytes())?;
            outputs.push(runs::SWEEP_FILE);
        }
        None => {
            let _ = std::fs::remove_file(dir.join(runs::SWEEP_FILE));
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
            "seeds": seeds.map(|s| s.1),
            "sweep": sweep.map(|s| s.2),
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
    manifests: &BTreeMap<String, Manifest>,
    batch: usize,
    over_seeds: Option<&str>,
) -> anyhow::Result<String> {
    let (teacher, kd, base) = (&results[0], &results[1], &results[2]);
    let s = &pipeline.config.student;
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
    md += &curve.to_markdown();
    md += "\n## Stage wall times\n\n";
    let mut times = Table::new(&["stage", "wall time", "throughput"]);
    let mut total = 0.0;
    for stage in [TEACHER, KNOWLEDGE, STUDENT_KD, STUDENT_BASELINE] {
        let m = &manifests[stage];
        total += m.wall_seconds;
        let ips = m.metrics["fit"]["train_images_per_sec"]
            .as_f64()
            .or(m.metrics["images_per_sec"].as_f64());
        let throughput = match (ips, m.metrics["shards"].as_u64()) {
            (Some(ips), _) => format!("{ips:.0} img/s"),
            // Merged from an array job's shards: the time is the merge's, the speed the engine's.
            (None, Some(n)) => format!("merged from {n} shards"),
            (None, None) => "-".into(),
        };
        times.row(&[stage.to_string(), duration(m.wall_seconds), throughput]);
    }
    times.row(&["total".to_string(), duration(total), String::new()]);
    md += &times.to_markdown();
    let k = &manifests[KNOWLEDGE].metrics;
    md += &format!(
        "\n## Knowledge file\n\n`{}/{}`: the teacher's logits for {} training images, heads {}, {:.1} MiB \
         (the teacher's main head agrees with {:.2}% of the training labels).\n\n",
        KNOWLEDGE,
        kd_train::stage::layout::KNOWLEDGE_FILE,
        group(k["rows"].as_u64().unwrap_or(0) as usize),
        k["heads"].as_array().map(|h| h.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
        k["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        100.0 * k["train_accuracy_per_head"]["main"].as_f64().unwrap_or(0.0),
    );
    md += &runs::knowledge_table(&pipeline.root).to_markdown();
    md += "\n";
    md += &format!(
        "## Settings\n\nThe resolved pipeline (`pipelines/{}.toml` with any overrides):\n\n```toml\n{}```\n",
        pipeline.name,
        toml::to_string(&pipeline.config).context("rendering the settings")?
    );
    Ok(md)
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

fn group(n: usize) -> String {
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
