//! `kd-bench --pytorch PYTHON`: PyTorch's side of the comparison, measured in the same invocation
//! and on the same data as ours (`pytorch/bench.py`, the same models and batches), the two run
//! alternately so that both see the same machine; the ratio comes with both spreads.

use crate::{matmul_gflops, median, Args, Measurement, MATMUL};
use anyhow::Context;
use kd_train::table::Table;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The script, built into this binary (written to a temporary file for each run).
pub(crate) const SCRIPT: &str = include_str!("../pytorch/bench.py");

/// Our measurements with a PyTorch counterpart, in the order a round runs them, and the layouts
/// PyTorch is run in. The matrix product comes right after the teacher step, so that the step's
/// share of the limit is read against the limit of the same minutes ([`limit_shares`]).
pub const COMPARED: [(&str, &[&str]); 4] = [
    (TEACHER_STEP, &["nchw", "channels-last"]),
    (crate::MATMUL, &["nchw"]),
    ("precompute", &["nchw", "channels-last"]),
    ("student-kd-step", &["nchw"]),
];

/// The measurement whose arithmetic rate is read against the matrix-product limit.
const TEACHER_STEP: &str = "teacher-step";

/// The whole-process teacher epoch's name in the tables (`--epoch`, see `epoch.rs`).
pub const EPOCH: &str = "teacher-epoch";
/// Its row label.
pub const EPOCH_LABEL: &str = "teacher epoch, crop + flip, whole process (training img/s)";

/// One PyTorch measurement, as the script prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Theirs {
    pub name: String,
    pub layout: String,
    pub images_per_rep: usize,
    pub seconds: Vec<f64>,
    /// `pipeline` only: the seconds of every stage, in order.
    #[serde(default)]
    pub stages: Vec<(String, f64)>,
    /// `pipeline` only: the three models' test accuracies.
    #[serde(default)]
    pub accuracy: std::collections::BTreeMap<String, f64>,
}

impl Theirs {
    fn images_per_sec(&self) -> Vec<f64> {
        self.seconds
            .iter()
            .map(|s| self.images_per_rep as f64 / s)
            .collect()
    }
}

/// Runs `bench.py` for one measurement and layout.
pub fn theirs(
    args: &Args,
    python: &Path,
    data: &Path,
    teacher: &str,
    name: &str,
    layout: &str,
) -> anyhow::Result<Theirs> {
    run_script(
        args,
        python,
        data,
        &["--only", name, "--layout", layout, "--teacher", teacher],
    )
}

/// `bench.py`'s `--device`: `cuda` when ours runs on a GPU (`--device cuda[:N]`), else `cpu`.
fn device_flag(args: &Args) -> String {
    match args.pipeline.device {
        Some(kd_train::device::DeviceChoice::Cuda(n)) => format!("cuda:{n}"),
        _ => "cpu".into(),
    }
}

/// Runs `bench.py` with `flags` (and the data, threads, repetitions) and reads the JSON line it
/// prints last.
pub fn run_script(
    args: &Args,
    python: &Path,
    data: &Path,
    flags: &[&str],
) -> anyhow::Result<Theirs> {
    let script = std::env::temp_dir().join(format!("kd-bench-{}.py", std::process::id()));
    std::fs::write(&script, SCRIPT)?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg("--data")
        .arg(data)
        .args(flags)
        .args(["--threads", &kd_train::stage::threads().to_string()])
        .args(["--device", &device_flag(args)])
        .args([
            "--reps",
            &args.reps.to_string(),
            "--batches",
            &args.batches.to_string(),
        ])
        .output()
        .with_context(|| format!("starting {}", python.display()))?;
    let _ = std::fs::remove_file(&script);
    if !out.status.success() {
        anyhow::bail!(
            "PyTorch's {} failed: {}",
            flags.join(" "),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("reading {text}"))
}

/// The side-by-side table: ours and PyTorch's images per second (median and range), and ours
/// over the best PyTorch layout.
pub fn table(ours: &[Measurement], theirs: &[Theirs]) -> Table {
    let mut t = Table::new(&[
        "measurement",
        "ours img/s",
        "PyTorch NCHW",
        "PyTorch channels-last",
        "ours / best PyTorch",
    ]);
    let epoch = ours.iter().any(|m| m.name == EPOCH);
    let names = COMPARED.map(|(n, _)| n);
    for name in names.into_iter().chain(epoch.then_some(EPOCH)) {
        // The matrix product's row is in GFLOP/s, not products per second.
        let unit = |v: f64| if name == MATMUL { matmul_gflops(v) } else { v };
        let mine: Vec<f64> = ours
            .iter()
            .filter(|m| m.name == name)
            .flat_map(|m| m.images_per_sec())
            .map(unit)
            .collect();
        let of = |layout: &str| -> Vec<f64> {
            theirs
                .iter()
                .filter(|t| t.name == name && t.layout == layout)
                .flat_map(Theirs::images_per_sec)
                .map(unit)
                .collect()
        };
        let (nchw, cl) = (of("nchw"), of("channels-last"));
        let best = [median(&nchw), median(&cl)]
            .into_iter()
            .filter(|x| x.is_finite())
            .fold(f64::NAN, f64::max);
        let cell = |xs: &[f64]| crate::median_range(xs, 0);
        let label = match name {
            MATMUL => "matrix product 2048² f32 (GFLOP/s)".to_string(),
            EPOCH => EPOCH_LABEL.to_string(),
            _ => name.to_string(),
        };
        t.row(&[
            label,
            cell(&mine),
            cell(&nchw),
            cell(&cl),
            format!("{:.2}×", median(&mine) / best),
        ]);
    }
    t
}

/// The teacher step's share of the matrix-product limit, round by round, ours and PyTorch's
/// (channels-last): each round measures the step and then the 2048² product, one after the other,
/// so each share is read against the limit the machine had in the same minutes. On a shared host
/// whose speed drifts by tens of percent within the hour, the medians of the two over all rounds
/// can come from different minutes; the per-round shares cannot. `None` without a teacher step
/// and a product to pair.
pub fn limit_shares(ours: &[Measurement], theirs: &[Theirs]) -> Option<String> {
    let step = ours.iter().find(|m| m.name == TEACHER_STEP)?;
    // A training step does the forward's multiply-adds three times (forward, dx, dW), 2 FLOP each.
    let flop = 6.0 * step.forward_macs_per_image as f64;
    let shares = |steps: Vec<Vec<f64>>, products: Vec<Vec<f64>>| -> Vec<f64> {
        steps
            .iter()
            .zip(&products)
            .map(|(s, p)| 100.0 * flop * median(s) / 1e9 / matmul_gflops(median(p)))
            .collect()
    };
    let of_ours = |name: &str| -> Vec<Vec<f64>> {
        ours.iter()
            .filter(|m| m.name == name)
            .map(Measurement::images_per_sec)
            .collect()
    };
    let of_theirs = |name: &str, layout: &str| -> Vec<Vec<f64>> {
        theirs
            .iter()
            .filter(|t| t.name == name && t.layout == layout)
            .map(Theirs::images_per_sec)
            .collect()
    };
    let mine = shares(of_ours(TEACHER_STEP), of_ours(MATMUL));
    if mine.is_empty() {
        return None;
    }
    let cl = shares(
        of_theirs(TEACHER_STEP, "channels-last"),
        of_theirs(MATMUL, "nchw"),
    );
    Some(format!(
        "\nThe teacher step's share of the matrix-product limit, round by round (each round's step, {:.0} MFLOP per training image, over the same round's 2048² product, measured right after it), median (range) over {} rounds: ours {}, PyTorch channels-last {}. Each round: ours {}; PyTorch channels-last {}. Ours at or above half of the limit in {} of {} rounds.\n",
        flop / 1e6,
        mine.len(),
        crate::median_range_in(&mine, 0, "%"),
        crate::median_range_in(&cl, 0, "%"),
        each_round(&mine),
        each_round(&cl),
        mine.iter().filter(|&&s| s >= 50.0).count(),
        mine.len(),
    ))
}

/// Shares in round order, one decimal each (`51.3%, 49.8%`), or `—` without any.
fn each_round(shares: &[f64]) -> String {
    if shares.is_empty() {
        return "—".to_string();
    }
    let each: Vec<String> = shares.iter().map(|s| format!("{s:.1}%")).collect();
    each.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(name: &str, per_sec: &[f64]) -> Measurement {
        Measurement {
            name: name.to_string(),
            images_per_rep: 1,
            seconds: per_sec.iter().map(|r| 1.0 / r).collect(),
            split: Vec::new(),
            forward_macs_per_image: 1_000_000,
            peak_rss_kib: 0,
            ops: Vec::new(),
            conv_shapes: Vec::new(),
            parts: 1,
        }
    }

    fn theirs(name: &str, layout: &str, per_sec: &[f64]) -> Theirs {
        Theirs {
            name: name.to_string(),
            layout: layout.to_string(),
            images_per_rep: 1,
            seconds: per_sec.iter().map(|r| 1.0 / r).collect(),
            stages: Vec::new(),
            accuracy: Default::default(),
        }
    }

    /// The products a second at which a 2048² product runs `gflops` GFLOP/s.
    fn products_at(gflops: f64) -> f64 {
        gflops / matmul_gflops(1.0)
    }

    /// Each round's step is read against its own round's product: a machine twice as fast in
    /// round 2 gives the same share twice, where the medians over all rounds would pair round
    /// 1's step with a product between the two.
    #[test]
    fn each_rounds_step_is_read_against_its_own_rounds_product() {
        // 6 MFLOP per training image: 10,000 img/s is 60 GFLOP/s.
        let mine = [
            ours(TEACHER_STEP, &[10_000.0, 9_000.0, 11_000.0]),
            ours(MATMUL, &[products_at(120.0)]),
            ours(TEACHER_STEP, &[20_000.0]),
            ours(MATMUL, &[products_at(240.0)]),
        ];
        let pt = [
            theirs(TEACHER_STEP, "nchw", &[1.0]),
            theirs(TEACHER_STEP, "channels-last", &[5_000.0]),
            theirs(MATMUL, "nchw", &[products_at(100.0)]),
            theirs(TEACHER_STEP, "channels-last", &[8_000.0]),
            theirs(MATMUL, "nchw", &[products_at(120.0)]),
        ];
        let line = limit_shares(&mine, &pt).unwrap();
        assert!(line.contains("6 MFLOP per training image"), "{line}");
        assert!(line.contains("over 2 rounds"), "{line}");
        assert!(line.contains("ours 50% (50–50%)"), "{line}");
        assert!(line.contains("Each round: ours 50.0%, 50.0%;"), "{line}");
        assert!(
            line.contains("at or above half of the limit in 2 of 2"),
            "{line}"
        );
        assert!(
            line.contains("PyTorch channels-last 35% (30–40%)"),
            "{line}"
        );
    }

    #[test]
    fn without_a_step_or_a_product_there_is_no_share() {
        assert!(limit_shares(&[ours(MATMUL, &[1.0])], &[]).is_none());
        assert!(limit_shares(&[ours(TEACHER_STEP, &[1.0])], &[]).is_none());
        let mine = [
            ours(TEACHER_STEP, &[10_000.0]),
            ours(MATMUL, &[products_at(120.0)]),
        ];
        let line = limit_shares(&mine, &[]).unwrap();
        assert!(line.contains("PyTorch channels-last —."), "{line}");
        assert!(line.contains("PyTorch channels-last —. Ours"), "{line}");
        assert!(line.contains("in 1 of 1 rounds"), "{line}");
    }
}
