//! Tagged student runs (`<artifacts>/<pipeline>/runs/<tag>/<stage>/`): the seeds of
//! `just compare` (tags `seed-<n>`) and the grid of `just sweep` (tags `sweep-...`), summarised
//! for the report.

use crate::svg;
use kd_train::stage::layout::{STUDENT_BASELINE, STUDENT_KD};
use kd_train::table::Table;
use kd_train::Manifest;
use std::collections::BTreeMap;
use std::path::Path;

pub const RUNS: &str = "runs";
pub const SWEEP_FILE: &str = "sweep.svg";

/// One finished tagged run.
#[derive(Debug, Clone)]
pub struct Run {
    pub tag: String,
    pub stage: String,
    pub manifest: Manifest,
}

impl Run {
    pub fn test_accuracy(&self) -> f64 {
        self.manifest.metrics["test_accuracy"]
            .as_f64()
            .unwrap_or(f64::NAN)
    }
    pub fn val_accuracy(&self) -> f64 {
        self.manifest.metrics["fit"]["best_val_accuracy"]
            .as_f64()
            .unwrap_or(f64::NAN)
    }
    fn student(&self, key: &str) -> &serde_json::Value {
        &self.manifest.settings["student"][key]
    }
}

/// Every tagged run with a readable manifest, sorted by tag and stage. A run folder without a
/// manifest (a run in progress or interrupted) is left out.
pub fn find(root: &Path) -> Vec<Run> {
    let mut runs = Vec::new();
    let Ok(tags) = std::fs::read_dir(root.join(RUNS)) else {
        return runs;
    };
    for tag in tags.flatten() {
        for stage in [STUDENT_KD, STUDENT_BASELINE] {
            if let Ok(manifest) = Manifest::read(&tag.path().join(stage)) {
                runs.push(Run {
                    tag: tag.file_name().to_string_lossy().into_owned(),
                    stage: stage.to_string(),
                    manifest,
                });
            }
        }
    }
    runs.sort_by(|a, b| (&a.tag, &a.stage).cmp(&(&b.tag, &b.stage)));
    runs
}

/// Every knowledge file of the pipeline (`knowledge/` and `runs/<tag>/knowledge/`): views, size
/// and bytes per training image.
pub fn knowledge_table(root: &Path) -> Table {
    let mut t = Table::new(&[
        "knowledge file",
        "views per image",
        "logits",
        "size",
        "bytes per image",
    ]);
    let mut dirs = vec![root.join(kd_train::stage::layout::KNOWLEDGE)];
    if let Ok(tags) = std::fs::read_dir(root.join(RUNS)) {
        let mut more: Vec<_> = tags
            .flatten()
            .map(|e| e.path().join(kd_train::stage::layout::KNOWLEDGE))
            .filter(|d| d.is_dir())
            .collect();
        more.sort();
        dirs.extend(more);
    }
    for dir in dirs {
        let Ok(m) = Manifest::read(&dir) else {
            continue;
        };
        let bytes = m.metrics["bytes"].as_f64().unwrap_or(0.0);
        let rows = m.metrics["rows"].as_f64().unwrap_or(1.0).max(1.0);
        let shown = dir
            .strip_prefix(root)
            .unwrap_or(&dir)
            .join(kd_train::stage::layout::KNOWLEDGE_FILE);
        t.row(&[
            format!("`{}`", shown.display()),
            m.metrics["views"].as_u64().unwrap_or(1).to_string(),
            m.metrics["storage"].as_str().unwrap_or("f32").to_string(),
            format!("{:.1} MiB", bytes / (1 << 20) as f64),
            format!("{:.0}", bytes / rows),
        ]);
    }
    t
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom: the table for
/// 1–30, then the Cornish–Fisher expansion `z + (z³ + z)/(4·df)` (within 0.003 of the exact value
/// from 31 on). NaN for `df = 0`.
fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    const Z: f64 = 1.959_964;
    match df {
        0 => f64::NAN,
        1..=30 => TABLE[df - 1],
        _ => Z + (Z.powi(3) + Z) / (4.0 * df as f64),
    }
}

/// The 95% confidence interval of the mean of paired differences (Student's t, `n − 1` degrees
/// of freedom); `None` for fewer than two pairs, where there is no spread to go by.
pub fn paired_interval(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.len() < 2 {
        return None;
    }
    let (m, s) = mean_std(xs);
    let half = t95(xs.len() - 1) * s / (xs.len() as f64).sqrt();
    Some((m - half, m + half))
}

/// The seeds' verdict on the pipeline's own comparison, for the report's headline: `KD −
/// baseline` over every seed that has both, when there are at least two.
pub fn seeds_headline(seeds: &serde_json::Value) -> Option<String> {
    let d = &seeds["differences"]["KD − baseline"];
    let n = d["per_seed"].as_array()?.len();
    let ci = d["ci95"].as_array()?;
    let (lo, hi) = (ci.first()?.as_f64()?, ci.get(1)?.as_f64()?);
    Some(format!(
        "Over {n} seeds (`just compare`, below): **{:+.2} ± {:.2} points**, 95% interval {:+.2} to \
         {:+.2}: {}.",
        100.0 * d["mean"].as_f64()?,
        100.0 * d["std"].as_f64()?,
        100.0 * lo,
        100.0 * hi,
        d["reading"].as_str()?
    ))
}

/// How to read an interval of differences: does it hold 0?
fn verdict(interval: Option<(f64, f64)>) -> &'static str {
    match interval {
        None => "one seed: no test",
        Some((lo, _)) if lo > 0.0 => "better",
        Some((_, hi)) if hi < 0.0 => "worse",
        Some(_) => "not distinguishable",
    }
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

fn pm((mean, std): (f64, f64)) -> String {
    format!("{:.2} ± {:.2}", 100.0 * mean, 100.0 * std)
}

/// One column of the seeds table: a variant (`""` for the plain runs, e.g. `aug`, `views8`) and
/// a stage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Column {
    variant: String,
    kd: bool,
}

impl Column {
    fn label(&self) -> String {
        let who = if self.kd { "KD" } else { "baseline" };
        if self.variant.is_empty() {
            who.to_string()
        } else {
            format!("{who} ({})", self.variant)
        }
    }
}

/// Tags `seed-<n>` and `seed-<n>-<variant>`: the seed and the variant.
fn seed_tag(tag: &str) -> Option<(u64, String)> {
    let rest = tag.strip_prefix("seed-")?;
    let (n, variant) = rest.split_once('-').unwrap_or((rest, ""));
    Some((n.parse().ok()?, variant.to_string()))
}

/// The fair control of a variant: the same variant with its `views<K>` part (a K-view knowledge
/// file, replayed under augmentation) read as `aug` (the same augmentation without stored views):
/// `views8` → `aug`, `e30views8` → `e30aug`; any other variant is its own control.
fn control_variant(variant: &str) -> String {
    let Some(at) = variant.find("views") else {
        return variant.to_string();
    };
    let digits = variant[at + 5..]
        .chars()
        .take_while(char::is_ascii_digit)
        .count();
    if digits == 0 {
        return variant.to_string();
    }
    format!("{}aug{}", &variant[..at], &variant[at + 5 + digits..])
}

/// The paired differences worth reading, `(a, b)` for `a − b`: every KD column against the
/// baseline of its fair control (its own variant's baseline; for `views<K>`, the `aug` one; for a
/// variant without any, such as a compact knowledge file, the plain baseline), and a KD column
/// against the KD student it changes one thing of: `views<K>` against single-view `aug` KD, a
/// variant without its own baseline against the plain KD student.
fn pairs(cols: &[Column]) -> Vec<(Column, Column)> {
    let col = |variant: &str, kd: bool| Column {
        variant: variant.to_string(),
        kd,
    };
    let mut vs_baseline = Vec::new();
    let mut vs_kd = Vec::new();
    for c in cols.iter().filter(|c| c.kd) {
        let control = control_variant(&c.variant);
        let own = col(&control, false);
        if cols.contains(&own) {
            vs_baseline.push((c.clone(), own));
        } else if control == c.variant && cols.contains(&col("", false)) {
            vs_baseline.push((c.clone(), col("", false)));
        }
        if control != c.variant {
            let kd = col(&control, true);
            if cols.contains(&kd) {
                vs_kd.push((c.clone(), kd));
            }
        } else if !c.variant.is_empty()
            && !cols.contains(&col(&c.variant, false))
            && cols.contains(&col("", true))
        {
            vs_kd.push((c.clone(), col("", true)));
        }
    }
    vs_baseline.extend(vs_kd);
    vs_baseline
}

/// The seeds of `just compare`: per seed the test accuracy of every variant's KD student and
/// baseline, then mean ± std of each column and of the paired differences that matter (KD −
/// baseline within a variant; between variants, KD against KD). `None` without seed runs.
pub fn seeds_section(runs: &[Run]) -> Option<(String, serde_json::Value)> {
    let mut cells: BTreeMap<u64, BTreeMap<Column, f64>> = BTreeMap::new();
    for r in runs {
        let Some((seed, variant)) = seed_tag(&r.tag) else {
            continue;
        };
        let col = Column {
            variant,
            kd: r.stage == STUDENT_KD,
        };
        cells
            .entry(seed)
            .or_default()
            .insert(col, r.test_accuracy());
    }
    if cells.is_empty() {
        return None;
    }
    let mut cols: Vec<Column> = cells.values().flat_map(|m| m.keys().cloned()).collect();
    cols.sort_by(|a, b| (&a.variant, a.kd).cmp(&(&b.variant, b.kd)));
    cols.dedup();
    let column =
        |c: &Column| -> Vec<f64> { cells.values().filter_map(|m| m.get(c).copied()).collect() };
    // Columns every seed has make the main table; the rest (probes: a longer schedule, say, on
    // one seed) get their own, so the main table's mean ± std is over the same seeds throughout.
    let (full, probes): (Vec<Column>, Vec<Column>) = cols
        .iter()
        .cloned()
        .partition(|c| column(c).len() == cells.len());
    let mut header = vec!["seed".to_string()];
    header.extend(full.iter().map(Column::label));
    let mut t = Table::new(&header);
    for (seed, row) in &cells {
        let mut line = vec![seed.to_string()];
        line.extend(
            full.iter()
                .map(|c| row.get(c).map_or("-".into(), |&a| pct(a))),
        );
        t.row(&line);
    }
    let mut line = vec![format!("mean ± std ({} seeds)", cells.len())];
    line.extend(full.iter().map(|c| pm(mean_std(&column(c)))));
    t.row(&line);
    let probe_md = if probes.is_empty() {
        String::new()
    } else {
        // One row per (variant, seed): probes are many variants on few seeds.
        let mut variants: Vec<&str> = probes.iter().map(|c| c.variant.as_str()).collect();
        variants.dedup();
        let mut pt = Table::new(&["variant", "seed", "baseline", "KD"]);
        for v in variants {
            for (seed, row) in &cells {
                let get = |kd: bool| {
                    row.get(&Column {
                        variant: v.to_string(),
                        kd,
                    })
                    .copied()
                };
                if get(false).is_none() && get(true).is_none() {
                    continue;
                }
                let show = |a: Option<f64>| a.map_or("-".into(), pct);
                pt.row(&[
                    v.to_string(),
                    seed.to_string(),
                    show(get(false)),
                    show(get(true)),
                ]);
            }
        }
        format!(
            "Probes, on fewer seeds than the table above (one row per variant and seed):\n\n{}\n",
            pt.to_markdown()
        )
    };
    // Paired differences, over the seeds that have both.
    let paired = |a: &Column, b: &Column| -> Vec<f64> {
        cells
            .values()
            .filter_map(|m| Some(m.get(a)? - m.get(b)?))
            .collect()
    };
    let pairs = pairs(&cols);
    let mut d = Table::new(&[
        "difference",
        "mean ± std (points)",
        "seeds",
        "95% interval (paired t)",
        "reading",
    ]);
    let mut diffs = serde_json::Map::new();
    for (a, b) in &pairs {
        let xs = paired(a, b);
        if xs.is_empty() {
            continue;
        }
        let (m, s) = mean_std(&xs);
        let interval = paired_interval(&xs);
        let name = format!("{} − {}", a.label(), b.label());
        d.row(&[
            name.clone(),
            if xs.len() < 2 {
                format!("{:+.2}", 100.0 * m)
            } else {
                format!("{:+.2} ± {:.2}", 100.0 * m, 100.0 * s)
            },
            xs.len().to_string(),
            interval.map_or("-".into(), |(lo, hi)| {
                format!("{:+.2} to {:+.2}", 100.0 * lo, 100.0 * hi)
            }),
            verdict(interval).into(),
        ]);
        diffs.insert(
            name,
            serde_json::json!({
                "mean": m, "std": s, "per_seed": xs,
                "ci95": interval.map(|(lo, hi)| [lo, hi]),
                "reading": verdict(interval),
            }),
        );
    }
    let md = format!(
        "## Seeds (`just compare`)\n\n\
         Every column trained once per seed, students from the same knowledge file; the seed sets \
         initialisation, dropout masks, shuffling and augmentation. Test accuracy of each final model (chosen on \
         validation); standard deviations are sample standard deviations over seeds. A difference is \
         paired by seed; its 95% interval is the mean ± t·std/√n (Student's t, n − 1 degrees of \
         freedom), and it reads \"better\" or \"worse\" only when the interval leaves out 0. Variants: `aug` — the \
         student trains with augmentation (KD: the single-view knowledge file, whose logits are for the \
         un-augmented image); `views<K>` — KD from the K-view knowledge file, each augmented input replayed \
         with the teacher's logits for exactly that view; `f16`, `top<K>`, `top<K>-f16` — KD from a compact \
         knowledge file (half-precision logits; only the K largest logits per image and one for the rest), \
         otherwise as the plain KD student, so `KD (f16) − KD` is what the compact file costs; \
         `viewmean` — KD without augmentation from the mean of the teacher's logits over a K-view file's \
         views; `e<N>` — students trained N epochs instead of the pipeline's.\n\n{}\n{}{}\n",
        t.to_markdown(),
        probe_md,
        d.to_markdown()
    );
    let json = serde_json::json!({
        "seeds": cells.keys().collect::<Vec<_>>(),
        "columns": cols.iter().map(|c| {
            let xs = column(c);
            let (m, s) = mean_std(&xs);
            (c.label(), serde_json::json!({ "mean": m, "std": s, "per_seed": xs }))
        }).collect::<serde_json::Map<_, _>>(),
        "differences": diffs,
    });
    Some((md, json))
}

/// The grid of `just sweep`: a table of every point and a chart of validation accuracy against
/// the temperature, one line per (hard/soft weights, heads). The best point is chosen on
/// validation accuracy. `None` when there are no sweep runs.
pub fn sweep_section(runs: &[Run]) -> Option<(String, String, serde_json::Value)> {
    let points: Vec<&Run> = runs
        .iter()
        .filter(|r| r.tag.starts_with("sweep-") && r.stage == STUDENT_KD)
        .collect();
    if points.is_empty() {
        return None;
    }
    let label = |r: &Run| {
        let heads = r.student("head_weights");
        let used: Vec<String> = heads
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(_, w)| w.as_f64().unwrap_or(0.0) > 0.0)
                    .map(|(h, w)| format!("{h} {w}"))
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "hard/soft {}/{}, heads {}",
            r.student("hard_weight"),
            r.student("soft_weight"),
            used.join(" + ")
        )
    };
    // The chart's legend: short enough for its margin.
    let short = |r: &Run| {
        let aux = r.student("head_weights").as_object().is_some_and(|o| {
            o.iter()
                .any(|(h, w)| h != "main" && w.as_f64().unwrap_or(0.0) > 0.0)
        });
        format!(
            "{}/{}, {}",
            r.student("hard_weight"),
            r.student("soft_weight"),
            if aux { "main+aux" } else { "main" }
        )
    };
    let temperature = |r: &Run| r.student("temperature").as_f64().unwrap_or(f64::NAN);
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut t = Table::new(&["T", "setting", "val accuracy", "test accuracy", "tag"]);
    let mut sorted = points.clone();
    sorted.sort_by(|a, b| {
        (label(a), temperature(a))
            .partial_cmp(&(label(b), temperature(b)))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for r in &sorted {
        lines
            .entry(short(r))
            .or_default()
            .push((temperature(r), r.val_accuracy()));
        t.row(&[
            temperature(r).to_string(),
            label(r),
            pct(r.val_accuracy()),
            pct(r.test_accuracy()),
            r.tag.clone(),
        ]);
    }
    let best = points
        .iter()
        .copied()
        .max_by(|a, b| a.val_accuracy().total_cmp(&b.val_accuracy()))?;
    let series: Vec<svg::Series> = lines
        .into_iter()
        .zip(svg::COLOURS.iter().cycle())
        .map(|((name, points), colour)| svg::Series {
            name,
            colour,
            points,
        })
        .collect();
    let chart = svg::line_chart(
        "KD sweep: validation accuracy against T (legend: hard/soft, heads)",
        "temperature T",
        "validation accuracy",
        &series,
    );
    let s = &best.manifest.settings["student"];
    let best_sets = format!(
        "--set student.temperature={} --set student.hard_weight={} --set student.soft_weight={}{}",
        s["temperature"],
        s["hard_weight"],
        s["soft_weight"],
        s["head_weights"]
            .as_object()
            .map(|o| o
                .iter()
                .map(|(h, w)| format!(" --set student.head_weights.{h}={w}"))
                .collect::<String>())
            .unwrap_or_default()
    );
    let md = format!(
        "## Sweep (`just sweep`)\n\n\
         KD students trained from the one knowledge file, without the teacher, over a grid of temperature, \
         hard/soft weights and teacher heads. Chosen on validation accuracy: **T = {}, {}** \
         (validation {}, test {}); as flags: `{best_sets}`.\n\n![sweep]({SWEEP_FILE})\n\n{}\n",
        temperature(best),
        label(best),
        pct(best.val_accuracy()),
        pct(best.test_accuracy()),
        t.to_markdown()
    );
    let json = serde_json::json!({
        "points": points.len(),
        "best": { "tag": best.tag, "student": s, "val_accuracy": best.val_accuracy(), "test_accuracy": best.test_accuracy() },
    });
    Some((md, chart, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[0.90, 0.91, 0.92]);
        assert!((m - 0.91).abs() < 1e-12);
        assert!((s - 0.01).abs() < 1e-12);
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn paired_intervals_use_students_t() {
        // Differences 0.33, 0.52, -0.15 (points): mean 0.2333, sd 0.3453, t(2) = 4.303,
        // half-width 4.303 * 0.3453 / sqrt(3) = 0.8578 (scipy.stats.t.interval agrees).
        let (lo, hi) = paired_interval(&[0.0033, 0.0052, -0.0015]).unwrap();
        assert!((lo - (0.002_333 - 0.008_578)).abs() < 2e-6, "{lo}");
        assert!((hi - (0.002_333 + 0.008_578)).abs() < 2e-6, "{hi}");
        assert_eq!(verdict(Some((lo, hi))), "not distinguishable");
        // Every seed +0.5 to +0.7: clearly positive.
        assert_eq!(verdict(paired_interval(&[0.005, 0.006, 0.007])), "better");
        assert_eq!(verdict(paired_interval(&[-0.005, -0.006, -0.007])), "worse");
        assert_eq!(paired_interval(&[0.01]), None);
        assert_eq!(verdict(None), "one seed: no test");
        // The expansion past the table: t(40) = 2.021, t(120) = 1.980.
        assert!((t95(40) - 2.021).abs() < 3e-3 && (t95(120) - 1.980).abs() < 3e-3);
        assert!((t95(30) - 2.042).abs() < 1e-9 && t95(0).is_nan());
    }

    #[test]
    fn views_variants_are_held_against_the_augmented_control() {
        assert_eq!(control_variant("views8"), "aug");
        assert_eq!(control_variant("e30views16"), "e30aug");
        assert_eq!(control_variant("viewmean"), "viewmean");
        assert_eq!(control_variant("f16"), "f16");
        let col = |v: &str, kd: bool| Column {
            variant: v.into(),
            kd,
        };
        let cols = [
            col("", false),
            col("", true),
            col("aug", false),
            col("aug", true),
            col("views8", true),
            col("f16", true),
            col("e30", false),
            col("e30", true),
            col("e30aug", false),
            col("e30views8", true),
            // No e60aug baseline: no pair at all, rather than one against another schedule.
            col("e60views8", true),
        ];
        let names: Vec<String> = pairs(&cols)
            .iter()
            .map(|(a, b)| format!("{} − {}", a.label(), b.label()))
            .collect();
        assert_eq!(
            names,
            [
                "KD − baseline",
                "KD (aug) − baseline (aug)",
                "KD (views8) − baseline (aug)",
                "KD (f16) − baseline",
                "KD (e30) − baseline (e30)",
                "KD (e30views8) − baseline (e30aug)",
                "KD (views8) − KD (aug)",
                "KD (f16) − KD",
            ]
        );
    }
}
