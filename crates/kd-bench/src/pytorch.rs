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

/// Our measurements with a PyTorch counterpart, and the layouts PyTorch is run in.
pub const COMPARED: [(&str, &[&str]); 4] = [
    ("teacher-step", &["nchw", "channels-last"]),
    ("precompute", &["nchw", "channels-last"]),
    ("student-kd-step", &["nchw"]),
    (crate::MATMUL, &["nchw"]),
];

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
