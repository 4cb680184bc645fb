//! The grid of `just sweep`: a table of every point and a chart of validation accuracy against
//! the temperature, one line per (hard/soft weights, heads); the best point chosen on
//! validation accuracy.

use crate::runs::{Kind, Run, Runs};
use crate::stats::pct;
use crate::svg;
use kd_train::config::StudentConfig;
use kd_train::record::{KdSettings, Study};
use kd_train::table::Table;
use std::collections::BTreeMap;

pub const SWEEP_FILE: &str = "sweep.svg";

/// A sweep point: its run and its KD settings.
struct Point<'a> {
    run: &'a Run,
    student: StudentConfig,
}

impl Point<'_> {
    fn heads(&self, long: bool) -> String {
        let used: Vec<String> = self
            .student
            .head_weights
            .iter()
            .filter(|(_, w)| **w > 0.0)
            .map(|(h, w)| if long { format!("{h} {w}") } else { h.clone() })
            .collect();
        match long {
            true => used.join(" + "),
            false if used.iter().any(|h| h != "main") => "main+aux".into(),
            false => "main".into(),
        }
    }
    /// The table's setting column.
    fn label(&self) -> String {
        let s = &self.student;
        format!(
            "hard/soft {}/{}, heads {}",
            s.hard_weight,
            s.soft_weight,
            self.heads(true)
        )
    }
    /// The chart's legend: short enough for its margin.
    fn short(&self) -> String {
        let s = &self.student;
        format!("{}/{}, {}", s.hard_weight, s.soft_weight, self.heads(false))
    }
    /// The point as `--set` flags.
    fn flags(&self) -> String {
        let s = &self.student;
        let heads: String = s
            .head_weights
            .iter()
            .map(|(h, w)| format!(" --set student.head_weights.{h}={w}"))
            .collect();
        format!(
            "--set student.temperature={} --set student.hard_weight={} --set student.soft_weight={}{heads}",
            s.temperature, s.hard_weight, s.soft_weight
        )
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Sweep {
    pub points: usize,
    pub best: String,
    pub best_flags: String,
    pub best_val_accuracy: f64,
    pub best_test_accuracy: f64,
}

/// The section, its chart and its summary; `None` without sweep runs.
pub fn sweep_section(runs: &Runs) -> Option<(String, String, Sweep)> {
    let mut points: Vec<Point> = runs
        .of(Study::Sweep)
        .filter(|r| r.kind == Kind::StudentKd)
        .filter_map(|run| {
            let s: KdSettings = run.manifest.settings_as().ok()?;
            Some(Point {
                run,
                student: s.student,
            })
        })
        .collect();
    points.sort_by(|a, b| {
        (a.label(), a.student.temperature)
            .partial_cmp(&(b.label(), b.student.temperature))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let best = points
        .iter()
        .max_by(|a, b| a.run.val_accuracy().total_cmp(&b.run.val_accuracy()))?;
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut t = Table::new(&["T", "setting", "val accuracy", "test accuracy", "run"]);
    for p in &points {
        let r = p.run;
        lines
            .entry(p.short())
            .or_default()
            .push((p.student.temperature, r.val_accuracy()));
        t.row(&[
            p.student.temperature.to_string(),
            p.label(),
            pct(r.val_accuracy()),
            pct(r.test_accuracy()),
            format!("`{}`", r.dir),
        ]);
    }
    let series: Vec<svg::Series> = lines
        .into_iter()
        .zip(svg::COLOURS.iter().cycle())
        .map(|((name, points), colour)| svg::Series {
            name,
            colour,
            points,
            errors: vec![],
        })
        .collect();
    let chart = svg::line_chart(
        "KD sweep: validation accuracy against T (legend: hard/soft, heads)",
        "temperature T",
        "validation accuracy",
        &series,
    );
    let summary = Sweep {
        points: points.len(),
        best: format!("T = {}, {}", best.student.temperature, best.label()),
        best_flags: best.flags(),
        best_val_accuracy: best.run.val_accuracy(),
        best_test_accuracy: best.run.test_accuracy(),
    };
    let md = format!(
        "## Sweep (`just sweep`)\n\n\
         KD students trained from the one knowledge file, without the teacher, over a grid of temperature, \
         hard/soft weights and teacher heads. Chosen on validation accuracy: **{}** \
         (validation {}, test {}); as flags: `{}`.\n\n![sweep]({SWEEP_FILE})\n\n{}\n",
        summary.best,
        pct(summary.best_val_accuracy),
        pct(summary.best_test_accuracy),
        summary.best_flags,
        t.to_markdown()
    );
    Some((md, chart, summary))
}
