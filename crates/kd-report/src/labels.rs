//! Test accuracy against the number of labelled training images (`just compare labels=...`):
//! the teacher, the baseline and the KD student at each label count, the share of the
//! teacher–baseline gap the KD student closes, and how many labels distillation saves.

use crate::runs::{Kind, Run, Runs};
use crate::seeds::ColumnStats;
use crate::stats::{mean_std, pct, pm, Difference};
use crate::svg;
use kd_train::record::Study;
use kd_train::table::Table;
use std::collections::BTreeMap;

pub const LABELS_FILE: &str = "labels.svg";

/// One label count on the curve.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LabelPoint {
    pub labels: usize,
    pub teacher: Option<f64>,
    pub baseline: ColumnStats,
    pub kd: ColumnStats,
    /// KD − baseline, paired by seed.
    pub difference: Difference,
    /// (KD − baseline) / (teacher − baseline), means over seeds.
    pub gap_closed: Option<f64>,
    /// The number of labels the baseline would need for the KD student's accuracy, by
    /// log-linear interpolation between the measured baselines (`None` beyond them).
    pub baseline_equivalent: Option<f64>,
}

/// A run's settings with what the curve varies taken out: the label count, its seed and the
/// run's seed. Runs on the curve share this with the pipeline's own run of their kind.
fn signature(run: &Run) -> serde_json::Value {
    let mut s = run.manifest.settings.clone();
    if let Some(d) = s.get_mut("data").and_then(|d| d.as_object_mut()) {
        d.remove("labels");
        d.remove("label_seed");
    }
    for section in ["student", "train"] {
        if let Some(x) = s.get_mut(section).and_then(|d| d.as_object_mut()) {
            x.remove("seed");
        }
    }
    s
}

fn stats(xs: &[f64]) -> ColumnStats {
    let (mean, std) = mean_std(xs);
    ColumnStats {
        mean,
        std,
        per_seed: xs.to_vec(),
    }
}

/// The seeds-study students with the pipeline's settings but for the label count, by label
/// count (`all` = every training image) and seed.
fn curve_runs(runs: &Runs, all: usize) -> BTreeMap<usize, Vec<&Run>> {
    let own = |kind: Kind| {
        runs.all
            .iter()
            .find(|r| r.kind == kind && !r.dir.contains('/'))
    };
    let reference: Vec<(Kind, serde_json::Value)> = [Kind::StudentKd, Kind::StudentBaseline]
        .into_iter()
        .filter_map(|k| Some((k, signature(own(k)?))))
        .collect();
    let mut by_labels: BTreeMap<usize, Vec<&Run>> = BTreeMap::new();
    for r in runs.of(Study::Seeds) {
        if reference
            .iter()
            .any(|(k, s)| *k == r.kind && *s == signature(r))
        {
            by_labels
                .entry(r.labels().unwrap_or(all))
                .or_default()
                .push(r);
        }
    }
    by_labels
}

/// One label count's point: KD and baseline paired by seed, and the teacher of its KD runs.
fn point(runs: &Runs, labels: usize, members: &[&Run]) -> Option<LabelPoint> {
    let by_seed = |kind: Kind| -> BTreeMap<u64, f64> {
        members
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| (r.seed(), r.test_accuracy()))
            .collect()
    };
    let (kd, base) = (by_seed(Kind::StudentKd), by_seed(Kind::StudentBaseline));
    let seeds: Vec<u64> = kd
        .keys()
        .filter(|s| base.contains_key(s))
        .copied()
        .collect();
    if seeds.is_empty() {
        return None;
    }
    let kd_acc: Vec<f64> = seeds.iter().map(|s| kd[s]).collect();
    let base_acc: Vec<f64> = seeds.iter().map(|s| base[s]).collect();
    let teacher = members
        .iter()
        .find(|r| r.kind == Kind::StudentKd)
        .and_then(|r| runs.teacher_of(r))
        .map(Run::test_accuracy);
    let difference = Difference::of(kd_acc.iter().zip(&base_acc).map(|(k, b)| k - b).collect());
    let (kd, baseline) = (stats(&kd_acc), stats(&base_acc));
    let gap_closed = teacher
        .map(|t| t - baseline.mean)
        .filter(|lead| *lead > 0.0)
        .map(|lead| difference.mean / lead);
    Some(LabelPoint {
        labels,
        teacher,
        baseline,
        kd,
        difference,
        gap_closed,
        baseline_equivalent: None,
    })
}

/// The label count at which the baseline reaches `accuracy`, interpolating linearly in
/// log(labels) between measured baselines; `None` outside them.
pub fn baseline_equivalent(points: &[(usize, f64)], accuracy: f64) -> Option<f64> {
    points.windows(2).find_map(|w| {
        let ((n0, a0), (n1, a1)) = (w[0], w[1]);
        let (lo, hi) = (a0.min(a1), a0.max(a1));
        if !(lo..=hi).contains(&accuracy) || a1 == a0 {
            return None;
        }
        let f = (accuracy - a0) / (a1 - a0);
        let (l0, l1) = ((n0 as f64).ln(), (n1 as f64).ln());
        Some((l0 + f * (l1 - l0)).exp())
    })
}

fn chart(points: &[LabelPoint]) -> String {
    let series = |name: &str, colour, get: &dyn Fn(&LabelPoint) -> Option<(f64, f64)>| {
        let (points, errors): (Vec<(f64, f64)>, Vec<f64>) = points
            .iter()
            .filter_map(|p| get(p).map(|(m, s)| ((p.labels as f64, m), s)))
            .unzip();
        svg::Series {
            name: name.to_string(),
            colour,
            points,
            errors,
        }
    };
    svg::log_x_chart(
        "Test accuracy against labelled training images (mean ± std over seeds)",
        "labelled training images (log scale)",
        "test accuracy",
        &[
            series("teacher", svg::COLOURS[0], &|p| p.teacher.map(|t| (t, 0.0))),
            series("baseline", svg::COLOURS[2], &|p| {
                Some((p.baseline.mean, p.baseline.std))
            }),
            series("KD student", svg::COLOURS[1], &|p| {
                Some((p.kd.mean, p.kd.std))
            }),
        ],
    )
}

fn table(points: &[LabelPoint]) -> Table {
    let mut t = Table::new(&[
        "labelled images",
        "teacher",
        "baseline",
        "KD",
        "KD − baseline (points)",
        "95% interval",
        "reading",
        "gap closed",
        "baseline needs",
    ]);
    for p in points {
        t.row(&[
            crate::group(p.labels),
            p.teacher.map_or("-".into(), pct),
            pm((p.baseline.mean, p.baseline.std)),
            pm((p.kd.mean, p.kd.std)),
            p.difference.points(),
            p.difference.interval(),
            p.difference.reading.into(),
            p.gap_closed
                .map_or("-".into(), |g| format!("{:.0}%", 100.0 * g)),
            p.baseline_equivalent.map_or("-".into(), |n| {
                format!("≈ {} labels", crate::group(n.round() as usize))
            }),
        ]);
    }
    t
}

/// The section (markdown), its chart and its points; `None` unless at least two label counts
/// have KD and baseline runs.
pub fn labels_section(runs: &Runs, all: usize) -> Option<(String, String, Vec<LabelPoint>)> {
    let mut points: Vec<LabelPoint> = curve_runs(runs, all)
        .iter()
        .filter_map(|(labels, members)| point(runs, *labels, members))
        .collect();
    if points.len() < 2 {
        return None;
    }
    let baselines: Vec<(usize, f64)> = points.iter().map(|p| (p.labels, p.baseline.mean)).collect();
    for p in &mut points {
        p.baseline_equivalent = baseline_equivalent(&baselines, p.kd.mean);
    }
    let md = format!(
        "## Labels (`just compare labels=...`)\n\n\
         Only N training images keep their label (chosen per class, seeded); the rest are the \
         unlabelled transfer set. The teacher and the baseline learn from the N labelled images, \
         for as many optimiser steps as the KD student, which learns from every training image \
         (soft targets on all, the hard loss on the labelled ones). The validation and test \
         splits keep their labels. *Baseline needs*: the label count at which the baseline would \
         match the KD student (log-linear between the measured baselines).\n\n\
         ![labels]({LABELS_FILE})\n\n{}\n",
        table(&points).to_markdown()
    );
    Some((md, chart(&points), points))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_equivalents_interpolate_in_log_labels() {
        let base = [(1000, 0.80), (10_000, 0.90), (100_000, 0.92)];
        // Halfway in accuracy between 1,000 and 10,000 labels: √(1000 · 10000).
        let n = baseline_equivalent(&base, 0.85).unwrap();
        assert!((n - 3162.28).abs() < 0.01, "{n}");
        assert!((baseline_equivalent(&base, 0.91).unwrap() - 31_622.78).abs() < 0.01);
        assert_eq!(baseline_equivalent(&base, 0.95), None);
        assert_eq!(baseline_equivalent(&base, 0.70), None);
    }
}
