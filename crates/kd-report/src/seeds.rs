//! The seeds of `just compare`: per seed the test accuracy of every variant's KD student and
//! baseline, mean ± std per column, and the paired differences each run's manifest asks for
//! (a KD run against its control, and against its reference), with the share of the
//! teacher–baseline gap a KD run closes.

use crate::runs::{Kind, Run, Runs};
use crate::stats::{mean_std, pct, pm, Difference};
use kd_train::record::Study;
use kd_train::table::Table;
use std::collections::BTreeMap;

/// One column of the seeds table: a variant (`""` for the pipeline's own settings) and a
/// kind of student.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Column {
    pub variant: String,
    pub kd: bool,
}

impl Column {
    fn of(run: &Run) -> Self {
        Self {
            variant: run.variant().to_string(),
            kd: run.kind == Kind::StudentKd,
        }
    }

    pub fn label(&self) -> String {
        let who = if self.kd { "KD" } else { "baseline" };
        if self.variant.is_empty() {
            who.to_string()
        } else {
            format!("{who} ({})", self.variant)
        }
    }
}

/// Test accuracy per seed and column.
type Cells = BTreeMap<u64, BTreeMap<Column, f64>>;

/// A paired comparison between two columns over the seeds that have both.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pair {
    #[serde(flatten)]
    pub difference: Difference,
    /// Against a control: the teacher's lead over it (mean over seeds) and the share of that
    /// lead the KD column closes, `(KD − control) / (teacher − control)`.
    pub teacher_lead: Option<f64>,
    pub gap_closed: Option<f64>,
}

/// A column's accuracies over the seeds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ColumnStats {
    pub mean: f64,
    pub std: f64,
    pub per_seed: Vec<f64>,
}

/// What the seeds section found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Seeds {
    pub seeds: Vec<u64>,
    pub columns: BTreeMap<String, ColumnStats>,
    /// By name, `KD (views8) − baseline (aug)`.
    pub differences: BTreeMap<String, Pair>,
}

impl Seeds {
    /// The pipeline's own comparison, KD − baseline, when at least two seeds have it.
    pub fn headline(&self) -> Option<String> {
        let d = self.differences.get("KD − baseline")?;
        let [lo, hi] = d.difference.ci95?;
        Some(format!(
            "Over {} seeds (`just compare`, below): **{} points**, 95% interval {:+.2} to {:+.2}: {}.",
            d.difference.per_seed.len(),
            d.difference.points(),
            100.0 * lo,
            100.0 * hi,
            d.difference.reading
        ))
    }
}

/// Test accuracy per seed and column of every student in the seeds study.
fn cells(students: &[&Run]) -> Cells {
    let mut cells = Cells::new();
    for r in students {
        cells
            .entry(r.seed())
            .or_default()
            .insert(Column::of(r), r.test_accuracy());
    }
    cells
}

/// The main table (columns every seed has) and the probes' (variants on fewer seeds: one row
/// per variant and seed), as markdown.
fn tables(cells: &Cells, columns: &[Column]) -> (String, String) {
    let column =
        |c: &Column| -> Vec<f64> { cells.values().filter_map(|m| m.get(c).copied()).collect() };
    let (full, probes): (Vec<&Column>, Vec<&Column>) =
        columns.iter().partition(|c| column(c).len() == cells.len());
    let mut header = vec!["seed".to_string()];
    header.extend(full.iter().map(|c| c.label()));
    let mut t = Table::new(&header);
    for (seed, row) in cells {
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
    if probes.is_empty() {
        return (t.to_markdown(), String::new());
    }
    let mut variants: Vec<&str> = probes.iter().map(|c| c.variant.as_str()).collect();
    variants.dedup();
    let mut pt = Table::new(&["variant", "seed", "baseline", "KD"]);
    for v in variants {
        for (seed, row) in cells {
            let get = |kd| {
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
    let probes = format!(
        "Probes, on fewer seeds than the table above (one row per variant and seed):\n\n{}\n",
        pt.to_markdown()
    );
    (t.to_markdown(), probes)
}

/// Per-seed differences of a KD run against another run, keyed by the two columns.
#[derive(Default)]
struct Paired {
    diffs: Vec<f64>,
    /// Teacher − control per seed (controls only).
    leads: Vec<f64>,
}

/// The comparisons the runs' manifests ask for: each KD run against its control, then against
/// its reference; in column order.
fn pairs(runs: &Runs, students: &[&Run]) -> Vec<(String, Pair)> {
    let mut by_columns: BTreeMap<(bool, Column, Column), Paired> = BTreeMap::new();
    for kd in students.iter().filter(|r| r.kind == Kind::StudentKd) {
        let teacher = runs.teacher_of(kd).map(Run::test_accuracy);
        for (is_reference, other) in [(false, runs.control_of(kd)), (true, runs.reference_of(kd))] {
            let Some(other) = other else { continue };
            let p = by_columns
                .entry((is_reference, Column::of(kd), Column::of(other)))
                .or_default();
            p.diffs.push(kd.test_accuracy() - other.test_accuracy());
            if let (false, Some(t)) = (is_reference, teacher) {
                p.leads.push(t - other.test_accuracy());
            }
        }
    }
    by_columns
        .into_iter()
        .map(|((_, a, b), p)| {
            let difference = Difference::of(p.diffs);
            let lead = (p.leads.len() == difference.per_seed.len() && !p.leads.is_empty())
                .then(|| mean_std(&p.leads).0);
            let pair = Pair {
                gap_closed: lead.filter(|l| *l > 0.0).map(|l| difference.mean / l),
                teacher_lead: lead,
                difference,
            };
            (format!("{} − {}", a.label(), b.label()), pair)
        })
        .collect()
}

fn pairs_table(pairs: &[(String, Pair)]) -> Table {
    let mut d = Table::new(&[
        "difference",
        "mean ± std (points)",
        "seeds",
        "95% interval (paired t)",
        "reading",
        "teacher − control",
        "gap closed",
    ]);
    for (name, p) in pairs {
        d.row(&[
            name.clone(),
            p.difference.points(),
            p.difference.per_seed.len().to_string(),
            p.difference.interval(),
            p.difference.reading.into(),
            p.teacher_lead
                .map_or("-".into(), |l| format!("{:+.2}", 100.0 * l)),
            match (p.gap_closed, p.teacher_lead) {
                (Some(g), _) => format!("{:.0}%", 100.0 * g),
                (None, Some(_)) => "teacher not ahead".into(),
                (None, None) => "-".into(),
            },
        ]);
    }
    d
}

const ABOUT: &str = "Every column trained once per seed; the seed sets initialisation, dropout \
    masks, shuffling and augmentation. Test accuracy of each final model (chosen on validation); \
    standard deviations are sample standard deviations over seeds. A difference is paired by \
    seed; its 95% interval is the mean ± t·std/√n (Student's t, n − 1 degrees of freedom), and it \
    reads \"better\" or \"worse\" only when the interval leaves out 0. Each KD run is held \
    against the control its manifest names (its own variant's baseline; for `views<K>`, the \
    augmented baseline; for a compact knowledge file, the plain one), and against the KD run it \
    changes one thing of. *Gap closed* is (KD − control) / (teacher − control), the teacher being \
    the one whose knowledge file the KD student read. Variants: `aug` — the student trains with \
    augmentation (KD: the single-view knowledge file); `views<K>` — KD from the K-view knowledge \
    file, each augmented input replayed with the teacher's logits for exactly that view; `f16`, \
    `top<K>`, `top<K>-f16` — KD from a compact knowledge file; `labels-<N>` — only N training \
    images keep their label (teacher and baseline train on those, the KD student on every \
    image); any other name — the students with the flags that variant was run with.";

/// The section (markdown) and its numbers; `None` without seed runs.
pub fn seeds_section(runs: &Runs) -> Option<(String, Seeds)> {
    let students: Vec<&Run> = runs
        .of(Study::Seeds)
        .filter(|r| matches!(r.kind, Kind::StudentKd | Kind::StudentBaseline))
        .collect();
    if students.is_empty() {
        return None;
    }
    let cells = cells(&students);
    let mut columns: Vec<Column> = cells.values().flat_map(|m| m.keys().cloned()).collect();
    columns.sort();
    columns.dedup();
    let (main, probes) = tables(&cells, &columns);
    let pairs = pairs(runs, &students);
    let md = format!(
        "## Seeds (`just compare`)\n\n{ABOUT}\n\n{main}\n{probes}{}\n",
        pairs_table(&pairs).to_markdown()
    );
    let seeds = Seeds {
        seeds: cells.keys().copied().collect(),
        columns: columns
            .iter()
            .map(|c| {
                let per_seed: Vec<f64> = cells.values().filter_map(|m| m.get(c).copied()).collect();
                let (mean, std) = mean_std(&per_seed);
                (
                    c.label(),
                    ColumnStats {
                        mean,
                        std,
                        per_seed,
                    },
                )
            })
            .collect(),
        differences: pairs.into_iter().collect(),
    };
    Some((md, seeds))
}
