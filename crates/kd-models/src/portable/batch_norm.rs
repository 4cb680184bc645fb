//! BatchNorm + ReLU in training mode as two ops, for the GPU: the forward `(z [c, n], [γ; β])
//! → [y (c·n); mean (c); variance (c)]` and its backward `(z, dy, [γ; β; mean; variance]) →
//! [dz (c·n); dγ (c); dβ (c)]`, two CUDA kernels each (`cuda/kernels.cu`, `kd_bn_*`) where
//! candle's ops took about fifteen launches forward and thirty backward. The statistics ride in
//! the forward's output, so the backward reads them instead of reducing again, and the ReLU's
//! mask is recomputed from `z`. Sums run in f64 in a fixed order.
//!
//! Their CPU bodies are the same arithmetic as plain loops: the tests compare the ops with
//! candle's composite ([`super::batch_norm_relu_composite`]) on any machine.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `(y, mean, biased variance)`: `y` shaped as `z`, the statistics `[c]` and detached.
pub(crate) fn forward(
    z: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (c, n) = crate::conv::rows(z.shape())?;
    let gb = Tensor::cat(&[gamma.flatten_all()?, beta.flatten_all()?], 0)?;
    let out = z.contiguous()?.flatten_all()?.apply_op2(
        &gb,
        Forward {
            c,
            n,
            eps: eps as f32,
        },
    )?;
    let y = out.narrow(0, 0, c * n)?.reshape(z.shape())?;
    let mean = out.narrow(0, c * n, c)?.detach();
    let var = out.narrow(0, c * n + c, c)?.detach();
    Ok((y, mean, var))
}

#[derive(Debug, Clone, Copy)]
struct Forward {
    c: usize,
    n: usize,
    eps: f32,
}

/// The normalised value, as the kernels compute it: `(z − μ) · 1/√(σ² + ε)`.
fn normalised(z: f32, mean: f32, var: f32, eps: f32) -> f32 {
    (z - mean) * (1.0 / (var + eps).sqrt())
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("batch-norm: {what} must be contiguous f32"),
    }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "kd-batch-norm-relu-gpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, gb) = (f32s(s1, l1, "z")?, f32s(s2, l2, "γ, β")?);
        let (c, n) = (self.c, self.n);
        let mut out = vec![0f32; c * n + 2 * c];
        for ch in 0..c {
            let row = &z[ch * n..(ch + 1) * n];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let (mean, var) = (mean as f32, var as f32);
            out[c * n + ch] = mean;
            out[c * n + c + ch] = var;
            for (o, &v) in out[ch * n..(ch + 1) * n].iter_mut().zip(row) {
                *o = (normalised(v, mean, var, self.eps) * gb[ch] + gb[c + ch]).max(0.0);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(c * n + 2 * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::gpu::bn_forward((s1, l1), (s2, l2), (self.c, self.n, self.eps))?;
        Ok((out, Shape::from(self.c * self.n + 2 * self.c)))
    }

    fn bwd(
        &self,
        z: &Tensor,
        gb: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (c, n) = (self.c, self.n);
        let stats = res.narrow(0, c * n, 2 * c)?;
        let params = Tensor::cat(&[gb, &stats], 0)?;
        let dy = grad.narrow(0, 0, c * n)?.contiguous()?;
        let back = Backward {
            c,
            n,
            eps: self.eps,
        };
        let out = z.apply_op3_no_bwd(&dy, &params, &back)?;
        Ok((
            Some(out.narrow(0, 0, c * n)?),
            Some(out.narrow(0, c * n, 2 * c)?),
        ))
    }
}

#[derive(Debug, Clone, Copy)]
struct Backward {
    c: usize,
    n: usize,
    eps: f32,
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "kd-batch-norm-relu-gpu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, dy, p) = (
            f32s(s1, l1, "z")?,
            f32s(s2, l2, "dy")?,
            f32s(s3, l3, "parameters")?,
        );
        let (c, n, eps) = (self.c, self.n, self.eps);
        let mut out = vec![0f32; c * n + 2 * c];
        for ch in 0..c {
            let (gamma, beta, mean, var) = (p[ch], p[c + ch], p[2 * c + ch], p[3 * c + ch]);
            let rows = z[ch * n..(ch + 1) * n]
                .iter()
                .zip(&dy[ch * n..(ch + 1) * n]);
            let passed = |(&z, &g): (&f32, &f32)| {
                let x = normalised(z, mean, var, eps);
                (x, if x * gamma + beta > 0.0 { g } else { 0.0 })
            };
            let (mut sg, mut sgx) = (0f64, 0f64);
            for (x, g) in rows.clone().map(passed) {
                sg += g as f64;
                sgx += g as f64 * x as f64;
            }
            let (dgamma, dbeta) = (sgx as f32, sg as f32);
            out[c * n + ch] = dgamma;
            out[c * n + c + ch] = dbeta;
            let k = gamma * (1.0 / (var + eps).sqrt());
            for (o, (x, g)) in out[ch * n..(ch + 1) * n].iter_mut().zip(rows.map(passed)) {
                *o = k * (g - dbeta / n as f32 - x * dgamma / n as f32);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(c * n + 2 * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out =
            crate::gpu::bn_backward([(s1, l1), (s2, l2), (s3, l3)], (self.c, self.n, self.eps))?;
        Ok((out, Shape::from(self.c * self.n + 2 * self.c)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// The two ops (their CPU bodies: the kernels' arithmetic) against candle's composite with
    /// autograd: output, statistics and the gradients of z, γ and β, from one value per channel
    /// to 7×7 planes of 6 images.
    #[test]
    fn the_two_ops_compute_what_candles_composite_computes() {
        for (c, n) in [(3, 1), (24, 6), (32, 294), (16, 4704)] {
            let wave = |len: usize, a: f64, b: f64| {
                let k = Tensor::arange(0u32, len as u32, &Device::Cpu).unwrap();
                k.to_dtype(DType::F32)
                    .unwrap()
                    .affine(a, b)
                    .unwrap()
                    .sin()
                    .unwrap()
            };
            let run = |ours: bool| {
                let z = Var::from_tensor(
                    &wave(c * n, 0.913, 0.5)
                        .affine(2.0, 0.3)
                        .unwrap()
                        .reshape((c, n))
                        .unwrap(),
                )
                .unwrap();
                let gamma = Var::from_tensor(&wave(c, 0.7, 1.0).affine(0.5, 1.0).unwrap()).unwrap();
                let beta = Var::from_tensor(&wave(c, 0.3, 0.2).affine(0.2, 0.0).unwrap()).unwrap();
                let f = if ours {
                    super::forward
                } else {
                    super::super::batch_norm_relu_composite
                };
                let (y, mean, var) =
                    f(z.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5).unwrap();
                let w = wave(c * n, 0.37, 0.1).reshape((c, n)).unwrap();
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                [
                    v(&y),
                    v(&mean),
                    v(&var),
                    v(g.get(&z).unwrap()),
                    v(g.get(&gamma).unwrap()),
                    v(g.get(&beta).unwrap()),
                ]
            };
            let (ours, theirs) = (run(true), run(false));
            for (what, (a, b)) in ["y", "mean", "var", "dz", "dγ", "dβ"]
                .iter()
                .zip(ours.iter().zip(&theirs))
            {
                let scale = b.iter().map(|x| x.abs()).fold(1e-3f32, f32::max);
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 2e-5 * scale,
                    "c {c} n {n}: {what} differs by {worst:e} (scale {scale:e})"
                );
            }
        }
    }
}
