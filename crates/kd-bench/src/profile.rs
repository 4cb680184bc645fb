//! Where a measurement's CPU time goes: `kd-bench --profile teacher-step` samples the child
//! process that runs it with `perf` (call stacks with inlined frames) and sorts every sample into
//! a kind of work (im2col, matrix products, BatchNorm, pools, candle's gradient bookkeeping, threads
//! waiting, ...) by the first frame from the leaf up that names one. Samples of loading the data
//! are left out. (No forward/backward split: a parallel loop's work stolen by another thread has
//! no frame of the phase that started it; `kd-bench` times the phases itself.)

use anyhow::Context;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Kinds of work, matched against a sample's frames from the leaf up; the first match wins. A
/// pattern matches a frame that contains each of its `+`-separated parts.
/// Page faults and waiting are matched on the leaf only (the work around them is someone else's).
const KINDS: [(&str, &[&str]); 14] = [
    (
        "im2col (gather the taps of k×k convolutions)",
        &["Frame::gather", "kd_models::im2col+gather"],
    ),
    (
        "panels (the implicit convolutions' masked gather)",
        &["implicit+gather_panel"],
    ),
    (
        "matrix products (the implicit convolutions' kernels)",
        &["kd_models::implicit"],
    ),
    (
        "col2im (scatter the input gradient back)",
        &["Frame::scatter", "kd_models::im2col+scatter"],
    ),
    ("pools (max and average)", &["kd_models::pool"]),
    ("BatchNorm + ReLU", &["kd_models::norm"]),
    (
        "bias + ReLU",
        &["BiasRelu", "relu_bias_gradients", "relu_masked_columns"],
    ),
    ("optimiser (Adam)", &["optim::", "Adam"]),
    ("matrix products (gemm, with packing)", &["gemm"]),
    (
        "zero-filled gradient buffers (candle backprop)",
        &["zeros_like", "or_insert"],
    ),
    (
        "element-wise ops (candle: gradient sums, bias adds)",
        &["binary_map", "unary_map"],
    ),
    (
        "concatenation and copies",
        &["Tensor::cat", "copy_strided", "copy2d", "contiguous"],
    ),
    ("losses (softmax, cross-entropy)", &["loss::", "softmax"]),
    ("other", &[""]),
];

/// Leaf frames that are no work: a thread spinning or sleeping until the next parallel section,
/// and the kernel filling new pages with zeros.
const LEAF_KINDS: [(&str, &[&str]); 2] = [
    (
        "threads waiting (spinning, yielding, sleeping)",
        &[
            "BarrierGuard",
            "wait_until",
            "rayon_core::sleep",
            "sched_yield",
            "futex",
            "crossbeam",
            "spin_loop",
            "finish_task_switch",
        ],
    ),
    (
        "page faults (the kernel zero-fills new memory)",
        &["clear_page", "page_fault", "do_anonymous_page"],
    ),
];

/// Frames of one half of a batch waiting for the other at a BatchNorm exchange
/// (`kd_models::meeting`): waiting wherever they lie in the stack, unless a kind of work lies
/// nearer the leaf (a waiting half runs the other half's pending pieces meanwhile). Their leaves
/// are the kernel's scheduler, a clock read or the loop itself, none a leaf kind: these samples
/// counted as BatchNorm.
const WAITING_FRAMES: [&str; 1] = ["spin_until"];

/// Samples outside the measured work: loading and preparing the data, starting up.
const LEFT_OUT: [&str; 3] = ["kd_data::", "load_data", "kd_train::stage::Pipeline::open"];

/// Samples counted per kind of work.
#[derive(Debug, Default)]
pub struct Profile {
    pub counts: BTreeMap<String, usize>,
    pub total: usize,
    pub left_out: usize,
}

fn matches(frame: &str, pattern: &str) -> bool {
    pattern.split('+').all(|part| frame.contains(part))
}

fn kind(frames: &[&str]) -> String {
    let leaf = frames.first().copied().unwrap_or("");
    for (name, pats) in LEAF_KINDS {
        if pats.iter().any(|p| leaf.contains(p)) {
            return name.to_string();
        }
    }
    for f in frames {
        if WAITING_FRAMES.iter().any(|p| f.contains(p)) {
            return LEAF_KINDS[0].0.to_string();
        }
        for (name, pats) in KINDS.iter().take(KINDS.len() - 1) {
            if pats.iter().any(|p| matches(f, p)) {
                return name.to_string();
            }
        }
    }
    KINDS[KINDS.len() - 1].0.to_string()
}

impl Profile {
    /// Sorts the samples of `perf script -F tid,ip,sym` output (blank-line separated stacks,
    /// one frame per line, leaf first).
    pub fn parse(text: &str) -> Self {
        let mut p = Profile::default();
        for sample in text.split("\n\n") {
            let frames: Vec<&str> = sample
                .lines()
                .skip(1)
                .filter_map(|l| l.trim().split_once(' ').map(|(_, sym)| sym))
                .collect();
            if frames.is_empty() {
                continue;
            }
            if frames
                .iter()
                .any(|f| LEFT_OUT.iter().any(|o| f.contains(o)))
            {
                p.left_out += 1;
                continue;
            }
            *p.counts.entry(kind(&frames)).or_default() += 1;
            p.total += 1;
        }
        p
    }

    /// Markdown: one row per kind and its share of the CPU time, largest first.
    pub fn to_markdown(&self) -> String {
        let mut rows: Vec<(&String, &usize)> = self.counts.iter().collect();
        rows.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
        let mut out = String::from("| kind of work | share of CPU time |\n|---|---|\n");
        for (k, n) in rows {
            out += &format!(
                "| {k} | {:.1}% |\n",
                100.0 * *n as f64 / self.total.max(1) as f64
            );
        }
        out
    }
}

/// Samples `kd-bench --only <measurement>` with perf (needs `perf`, package linux-perf) and
/// returns the sorted samples.
pub fn record(args: &crate::Args, measurement: &str, dir: &Path) -> anyhow::Result<Profile> {
    let data = dir.join("perf.data");
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new("perf");
    cmd.args([
        "record",
        "-F",
        "499",
        "-e",
        "cpu-clock",
        "--call-graph",
        "dwarf,32768",
        "-o",
    ])
    .arg(&data)
    .arg("--")
    .arg(exe)
    .args(["--only", measurement])
    .args([
        "--reps",
        &args.reps.to_string(),
        "--batches",
        &args.batches.to_string(),
    ])
    .arg("--pipeline")
    .arg(&args.pipeline.pipeline);
    for s in &args.pipeline.overrides {
        cmd.args(["--set", s]);
    }
    let status = cmd
        .stdout(std::process::Stdio::null())
        .status()
        .context("running `perf record` (install perf: apt-get install linux-perf)")?;
    anyhow::ensure!(status.success(), "perf record failed ({status})");
    let out = Command::new("perf")
        .args(["script", "-F", "tid,ip,sym", "-i"])
        .arg(&data)
        .output()
        .context("running `perf script`")?;
    anyhow::ensure!(out.status.success(), "perf script failed");
    Ok(Profile::parse(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = "13419 \n\t  87fe7a core::ops::function::impls::call_mut\n\t  87fe7a call_mut<((usize, &mut [f32])), kd_models::im2col::{impl#1}::gather_all::{closure_env#0}<f32>> (inlined)\n\t  8a11b6 rayon::iter::plumbing::bridge_producer_consumer::helper\n\n13419 \n\t  1 gemm_f32::microkernel::fma::f32::x2x6\n\t  2 candle_core::tensor::Tensor::matmul\n\t  3 candle_core::backprop::<impl candle_core::tensor::Tensor>::backward\n\n13420 \n\t  1 <candle_core::utils::BarrierGuard as core::ops::drop::Drop>::drop\n\t  2 candle_core::cpu_backend::utils::binary_map_vec_par\n\t  3 candle_core::backprop::x\n\n13420 \n\t  1 zlib_rs::inflate\n\t  2 kd_data::idx::parse\n";

    /// The kind whose name starts with `prefix`.
    fn kind(prefix: &str) -> &'static str {
        KINDS
            .iter()
            .map(|k| k.0)
            .find(|k| k.starts_with(prefix))
            .unwrap()
    }

    #[test]
    fn samples_are_sorted_by_the_first_frame_that_names_a_kind() {
        let p = Profile::parse(SAMPLES);
        assert_eq!(p.total, 3);
        assert_eq!(p.left_out, 1);
        let get = |k: &str| p.counts.get(k).copied();
        assert_eq!(get(kind("im2col")), Some(1));
        assert_eq!(get(kind("matrix products (gemm")), Some(1));
        assert_eq!(get(LEAF_KINDS[0].0), Some(1));
        let md = p.to_markdown();
        assert!(
            md.contains("| im2col (gather the taps of k×k convolutions) | 33.3% |"),
            "{md}"
        );
    }

    /// A half waiting at a BatchNorm exchange is waiting, though its stack runs through the
    /// BatchNorm's op; work it runs for the other half while it waits is that work.
    #[test]
    fn a_half_waiting_at_an_exchange_is_waiting_unless_it_helps() {
        let waiting = "1 \n\t  1 __schedule\n\t  2 __sched_yield\n\t  3 kd_models::meeting::spin_until\n\t  4 kd_models::meeting::Meeting::exchange\n\t  5 kd_models::norm::met_forward_rows\n";
        let helping = "1 \n\t  1 gemm_f32::microkernel::fma::f32::x2x6\n\t  2 rayon_core::thread_pool::yield_now\n\t  3 kd_models::meeting::spin_until\n\t  4 kd_models::norm::met_backward_rows\n";
        let p = Profile::parse(&format!("{waiting}\n{helping}"));
        assert_eq!(p.total, 2);
        assert_eq!(p.counts.get(LEAF_KINDS[0].0), Some(&1));
        assert_eq!(p.counts.get(kind("matrix products (gemm")), Some(&1));
        assert_eq!(p.counts.get(kind("BatchNorm")), None);
    }

    /// The implicit convolutions' panels and kernels are kinds of their own, not "other".
    #[test]
    fn implicit_panels_and_kernels_are_named() {
        let panel = "1 \n\t  1 kd_models::implicit::x86::gather_panel\n\t  2 kd_models::implicit::Direct::tiles\n\t  3 kd_models::conv::ConvOp::run\n";
        let tile = "1 \n\t  1 kd_models::implicit::x86::tile\n\t  2 kd_models::implicit::Direct::tiles\n\t  3 kd_models::conv::ConvOp::run\n";
        let p = Profile::parse(&format!("{panel}\n{tile}"));
        assert_eq!(p.total, 2);
        assert_eq!(p.counts.get(kind("panels")), Some(&1));
        assert_eq!(
            p.counts.get(kind("matrix products (the implicit")),
            Some(&1)
        );
    }
}
