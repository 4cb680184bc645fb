//! `kd-bench --parity --device cuda`: every op of ours and every network, on the CPU (the fused
//! CPU ops) and on the GPU (the portable path and our CUDA kernels), forward and every
//! gradient, compared. Writes `<out>/parity.json` and `parity.md`; fails if a check does. With
//! `--device cpu` the second side is the GPU's path run on the CPU (the kernels aside).
//!
//! Both sides start from the same weights (initialised on the host from the seed) and the same
//! inputs (`sin` of the index, no random draws), and back-propagate the same loss
//! `Σ y · sin(0.37 k + 0.1)`.
//!
//! Tolerances, f32 (`‖gpu − cpu‖ / ‖cpu‖` per tensor), from what the H200 measured
//! (docs/gpu.md): each op alone 1e-4 (the 7×7/s2 convolution at 224 px sums 75,264 products
//! into each weight gradient, in another order than the CPU's: 7.2e-5; the rest ≤ 7e-6). A
//! whole network: heads within 1e-4 and every tensor within 1e-2. A network chains about a
//! hundred ops, and a pre-activation within rounding of 0 can fall on different sides of a ReLU
//! on the two devices, after which the gradients of the layers below differ by more than
//! rounding: `googlenet-224` (millions of activations) measured heads 3e-7 and gradients up to
//! 2.6e-3; the 28-px networks ≤ 3.1e-5. The table shows how many tensors were within 1e-4.

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use kd_models::adam::AdamStep;
use kd_models::conv::Conv;
use kd_models::layers::InitScheme;
use kd_models::norm::BatchNormRelu;
use kd_models::{InputSpec, Pool2d, SeededVarMap, Trainable};
use serde::Serialize;
use std::collections::BTreeMap;

/// The bound on each op's tensors (module docs).
const OP_BOUND: f64 = 1e-4;

/// One compared tensor.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    pub name: String,
    pub relative: f64,
    pub max_abs: f64,
}

/// One check: an op or a network, its tensors, the bound and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub tensors: Vec<Compared>,
    pub within_1e4: usize,
    pub worst: f64,
    pub rule: String,
    pub passed: bool,
}

/// Named tensors a side computed.
type Side = BTreeMap<String, Tensor>;

/// `sin(a·k + b)` for `k = 0..n`, shaped, computed on the CPU in f64 and then moved to
/// `device`, so both sides get the same bits (the GPU's `sin` of a large argument is not the
/// CPU's: the first run on the H200 compared the two `sin`s more than the ops).
fn wave(shape: &[usize], a: f64, b: f64, device: &Device) -> anyhow::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|k| (a * k as f64 + b).sin() as f32).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// `Σ y · sin(0.37 k + 0.1 + head)` over the outputs.
fn loss(outputs: &[Tensor]) -> anyhow::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (i, y) in outputs.iter().enumerate() {
        let w = wave(y.dims(), 0.37, 0.1 + i as f64, y.device())?;
        let term = (y * w)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    total.context("no output")
}

/// Outputs, then the gradients of `vars` (by name) under [`loss`], then `extra` tensors.
fn with_grads(outputs: Vec<Tensor>, vars: &[(String, Tensor)]) -> anyhow::Result<Side> {
    let grads = loss(&outputs)?.backward()?;
    let mut side = Side::new();
    for (i, y) in outputs.into_iter().enumerate() {
        side.insert(format!("output {i}"), y);
    }
    for (name, t) in vars {
        if let Some(g) = grads.get(t) {
            side.insert(format!("d {name}"), g.clone());
        }
    }
    Ok(side)
}

fn compare(cpu: &Side, gpu: &Side) -> anyhow::Result<Vec<Compared>> {
    let mut out = Vec::new();
    for (name, want) in cpu {
        let got = gpu
            .get(name)
            .with_context(|| format!("{name}: not computed on the GPU"))?;
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let want = want.to_dtype(DType::F64)?;
        let diff = (&got - &want)?;
        let norm = want.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        let err = diff.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        let max_abs = diff.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let relative = if norm > 0.0 { err / norm } else { err };
        out.push(Compared {
            name: name.clone(),
            relative: if relative.is_nan() {
                f64::INFINITY
            } else {
                relative
            },
            max_abs,
        });
    }
    Ok(out)
}

/// A check of one op: every tensor within `bound`.
fn op_check(what: String, tensors: Vec<Compared>, bound: f64) -> Check {
    let worst = tensors.iter().map(|c| c.relative).fold(0.0, f64::max);
    Check {
        within_1e4: tensors.iter().filter(|c| c.relative < 1e-4).count(),
        passed: worst < bound,
        rule: format!("every tensor within {bound:e}"),
        what,
        tensors,
        worst,
    }
}

/// `f` on the CPU and on `gpu`, compared. With `gpu` the CPU itself, the second side runs the
/// GPU's path there ([`kd_models::portable::forced`]): every check but the kernels, anywhere.
fn both(
    gpu: &Device,
    f: impl Fn(&Device) -> anyhow::Result<Side>,
) -> anyhow::Result<Vec<Compared>> {
    let cpu = f(&Device::Cpu)?;
    let on_gpu = match gpu {
        Device::Cpu => kd_models::portable::forced(|| f(gpu))?,
        _ => f(gpu)?,
    };
    compare(&cpu, &on_gpu)
}

fn vars_of(map: &SeededVarMap) -> anyhow::Result<Vec<(String, Tensor)>> {
    let data = map
        .varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect())
}

/// A convolution with bias + ReLU (`[c, b, h, w]`), then without a bias.
fn conv(
    gpu: &Device,
    (cin, cout, k, s, p, h): (usize, usize, usize, usize, usize, usize),
) -> anyhow::Result<Check> {
    let tensors = both(gpu, |dev| {
        let map = SeededVarMap::new(5);
        let vb = map.var_builder(dev);
        let with_bias = Conv::new(cin, cout, k, s, p, InitScheme::Seed, vb.pp("a"))?;
        let plain = Conv::without_bias(cin, cout, k, s, p, InitScheme::Seed, vb.pp("b"))?;
        let x = Var::from_tensor(&wave(&[cin, 6, h, h], 0.913, 0.5, dev)?)?;
        let outputs = vec![
            with_bias.forward_relu(x.as_tensor())?,
            plain.forward(x.as_tensor())?,
        ];
        let mut vars = vars_of(&map)?;
        vars.push(("x".into(), x.as_tensor().clone()));
        with_grads(outputs, &vars)
    })?;
    let what = format!("convolution {k}x{k}/s{s} pad {p}, {cin} → {cout} channels, 6 × {h}×{h}");
    Ok(op_check(what, tensors, OP_BOUND))
}

/// BatchNorm + ReLU in training mode (output, gradients, running statistics), then in eval
/// mode.
fn batch_norm(gpu: &Device, c: usize, n: usize) -> anyhow::Result<Check> {
    let tensors = both(gpu, |dev| {
        let map = SeededVarMap::new(5);
        let bn = BatchNormRelu::new(c, map.var_builder(dev))?;
        let z = Var::from_tensor(&wave(&[c, n], 0.913, 0.5, dev)?.affine(2.0, 0.3)?)?;
        let y = bn.forward_t(z.as_tensor(), true)?;
        let eval = bn.forward_t(z.as_tensor(), false)?.detach();
        let mut vars = vars_of(&map)?;
        vars.push(("z".into(), z.as_tensor().clone()));
        let mut side = with_grads(vec![y], &vars)?;
        side.insert("eval output".into(), eval);
        for (name, t) in vars_of(&map)? {
            side.insert(format!("after the step {name}"), t);
        }
        Ok(side)
    })?;
    Ok(op_check(
        format!("BatchNorm + ReLU, {c} channels × {n}"),
        tensors,
        OP_BOUND,
    ))
}

fn pool(gpu: &Device, pool: Pool2d, h: usize) -> anyhow::Result<Check> {
    let tensors = both(gpu, |dev| {
        let x = Var::from_tensor(&wave(&[4, 6, h, h], 0.913, 0.5, dev)?)?;
        let y = pool.forward(x.as_tensor())?;
        with_grads(vec![y], &[("x".into(), x.as_tensor().clone())])
    })?;
    let kind = format!("{:?}", pool.kind).to_lowercase();
    let ceil = if pool.ceil_mode { " ceil" } else { "" };
    let what = format!(
        "{kind}-pool {k}x{k}/s{s} pad {p}{ceil}, 4 × 6 × {h}×{h}",
        k = pool.kernel,
        s = pool.stride,
        p = pool.padding
    );
    Ok(op_check(what, tensors, OP_BOUND))
}

/// Three Adam steps with weight decay on five variables of 1 to 10,000 values at once (one
/// launch on the GPU, which finds each element's variable in a table).
fn adam(gpu: &Device) -> anyhow::Result<Check> {
    const SIZES: [usize; 5] = [10_000, 1, 3, 257, 4096];
    let tensors = both(gpu, |dev| {
        let mut vars = Vec::new();
        for (i, &n) in SIZES.iter().enumerate() {
            let w = wave(&[n], 0.731, i as f64, dev)?.affine(3.0, 0.0)?;
            vars.push((w, Tensor::zeros(2 * n, DType::F32, dev)?));
        }
        for t in 1..=3 {
            let step = AdamStep {
                b1: 0.9,
                b2: 0.999,
                step_size: 0.01 / (1.0 - 0.9f32.powi(t)),
                bc2_sqrt: (1.0 - 0.999f32.powi(t)).sqrt(),
                eps: 1e-8,
                decay: 1.0 - 0.01 * 0.05,
            };
            let grads = SIZES
                .iter()
                .enumerate()
                .map(|(i, &n)| wave(&[n], 0.531, (t as usize * 10 + i) as f64, dev))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let items: Vec<_> = vars
                .iter()
                .zip(&grads)
                .map(|((w, mv), g)| (w, g, mv))
                .collect();
            step.apply_all(&items)?;
        }
        let mut side = Side::new();
        for (i, (w, mv)) in vars.into_iter().enumerate() {
            side.insert(format!("weights {i}"), w);
            side.insert(format!("moments {i}"), mv);
        }
        Ok(side)
    })?;
    Ok(op_check(
        format!(
            "Adam, 3 steps with weight decay, {} variables at once",
            SIZES.len()
        ),
        tensors,
        // The kernels round as the CPU's loop: the H200 gave the same bits.
        1e-7,
    ))
}

/// A network's training-mode forward and backward (heads, every gradient, BatchNorm's running
/// statistics), batch 6.
fn network(gpu: &Device, arch: &str, spec: &InputSpec) -> anyhow::Result<Check> {
    let tensors = both(gpu, |dev| {
        let model = Trainable::new(arch, spec, 3, dev)?;
        let shape = [6, spec.channels, spec.height, spec.width];
        let heads = model
            .model
            .forward_t(&wave(&shape, 0.913, 0.5, dev)?, true)?;
        let vars: Vec<(String, Tensor)> = model.named_tensors().into_iter().collect();
        let mut side = with_grads(heads, &vars)?;
        for (name, t) in vars {
            if kd_models::norm::is_buffer(&name) {
                side.insert(format!("after the step {name}"), t);
            }
        }
        Ok(side)
    })?;
    let heads = tensors.iter().filter(|c| c.name.starts_with("output"));
    let heads_ok = heads.map(|c| c.relative).fold(0.0, f64::max) < 1e-4;
    let within = tensors.iter().filter(|c| c.relative < 1e-4).count();
    let worst = tensors.iter().map(|c| c.relative).fold(0.0, f64::max);
    Ok(Check {
        what: format!(
            "{arch}: training step, batch 6 of {}×{}",
            spec.height, spec.width
        ),
        passed: heads_ok && worst < 1e-2,
        rule: "heads within 1e-4, every tensor within 1e-2".into(),
        within_1e4: within,
        worst,
        tensors,
    })
}

/// Every check, in order.
pub fn checks(gpu: &Device) -> anyhow::Result<Vec<Check>> {
    let mut out = Vec::new();
    for geometry in [
        (1, 16, 1, 1, 0, 28),
        (16, 48, 3, 1, 1, 28),
        (8, 32, 5, 1, 2, 7),
        (3, 64, 7, 2, 3, 224),
        (16, 24, 3, 2, 1, 14),
        (96, 32, 1, 1, 0, 4),
    ] {
        out.push(conv(gpu, geometry)?);
    }
    for (c, n) in [(48, 6 * 28 * 28), (32, 6 * 7 * 7), (24, 6)] {
        out.push(batch_norm(gpu, c, n)?);
    }
    for (p, h) in [
        (Pool2d::max(3, 2).ceil(), 28),
        (Pool2d::max(3, 2).ceil(), 7),
        (Pool2d::max(3, 1).padding(1), 14),
        (Pool2d::avg(3, 2), 14),
        (Pool2d::avg(5, 3), 14),
        (Pool2d::max(2, 2), 28),
    ] {
        out.push(pool(gpu, p, h)?);
    }
    out.push(adam(gpu)?);
    let small = InputSpec {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    for arch in ["student-cnn", "googlenet", "googlenet-bn"] {
        out.push(network(gpu, arch, &small)?);
    }
    let photos = InputSpec {
        channels: 3,
        height: 224,
        width: 224,
        classes: 5,
    };
    for arch in ["student-seed", "googlenet-224"] {
        out.push(network(gpu, arch, &photos)?);
    }
    Ok(out)
}

/// The checks as a markdown table.
pub fn render(device: &str, checks: &[Check]) -> String {
    let mut md = format!(
        "# Parity: CPU against {device}\n\n`kd-bench --parity --device cuda`: each op and network on the CPU (fused CPU ops) and on the GPU (candle's CUDA ops and our kernels), same weights, same inputs, the gradients of `Σ y · sin(0.37k + 0.1)`. Error: `‖gpu − cpu‖ / ‖cpu‖` per tensor.\n\n| check | tensors | within 1e-4 | worst | rule | |\n|---|---|---|---|---|---|\n"
    );
    for c in checks {
        md += &format!(
            "| {} | {} | {} | {:.1e} | {} | {} |\n",
            c.what,
            c.tensors.len(),
            c.within_1e4,
            c.worst,
            c.rule,
            if c.passed { "pass" } else { "**FAIL**" }
        );
    }
    md
}
