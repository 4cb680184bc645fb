//! Adam (PyTorch's update rule, optional decoupled weight decay) and learning-rate schedules.
//!
//! Ours rather than candle's `AdamW`: candle's decays every weight by 0.01 by default and its
//! moments cannot be read or saved; here the state is plain vectors, updated in one pass per
//! variable instead of about ten tensor ops.

use crate::config::Schedule;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use kd_models::adam::AdamStep;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled (AdamW-style) weight decay; 0 is plain Adam.
    pub weight_decay: f64,
}

impl AdamParams {
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

pub struct Adam {
    vars: Vec<(String, Var)>,
    moments: Vec<Moments>,
    step: u64,
    pub params: AdamParams,
}

/// One variable's moments where its values are: plain vectors for a variable on the CPU, one
/// tensor `[m; v]` on its GPU for a variable there (updated in place, no host round trip).
enum Moments {
    Host(Vec<f32>, Vec<f32>),
    Device(Tensor),
}

impl Moments {
    /// Zero moments beside `var`.
    fn zeros(var: &Var) -> Result<Self> {
        let n = var.elem_count();
        Ok(match var.device() {
            candle_core::Device::Cpu => Self::Host(vec![0.0; n], vec![0.0; n]),
            device => Self::Device(Tensor::zeros(2 * n, candle_core::DType::F32, device)?),
        })
    }

    /// Saved moments beside `var`.
    fn from_saved(var: &Var, m: &[f32], v: &[f32]) -> Result<Self> {
        Ok(match var.device() {
            candle_core::Device::Cpu => Self::Host(m.to_vec(), v.to_vec()),
            device => Self::Device(Tensor::new([m, v].concat().as_slice(), device)?),
        })
    }

    /// `(m, v)` on the host.
    fn read(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Self::Host(m, v) => Ok((m.clone(), v.clone())),
            Self::Device(mv) => {
                let mut m = mv.to_vec1::<f32>()?;
                let v = m.split_off(m.len() / 2);
                Ok((m, v))
            }
        }
    }
}

/// Everything Adam carries from one step to the next, by variable name: what a resumed run
/// needs to continue bit for bit.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    pub step: u64,
    /// `(name, first moment, second moment)`, in name order.
    pub moments: Vec<(String, Vec<f32>, Vec<f32>)>,
}

impl Adam {
    /// `vars` by name; they are updated in name order, so the result does not depend on the
    /// order a hash map hands them out.
    pub fn new(mut vars: Vec<(String, Var)>, params: AdamParams) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let moments = vars
            .iter()
            .map(|(_, v)| Moments::zeros(v))
            .collect::<Result<_>>()?;
        Ok(Self {
            vars,
            moments,
            step: 0,
            params,
        })
    }

    pub fn state(&self) -> Result<AdamState> {
        let moments = self
            .vars
            .iter()
            .zip(&self.moments)
            .map(|((n, _), mv)| {
                let (m, v) = mv.read()?;
                Ok((n.clone(), m, v))
            })
            .collect::<Result<_>>()?;
        Ok(AdamState {
            step: self.step,
            moments,
        })
    }

    /// Restores a saved state; it must be for the same variables.
    pub fn load_state(&mut self, state: AdamState) -> std::result::Result<(), String> {
        if state.moments.len() != self.vars.len() {
            return Err(format!(
                "{} variables saved, {} here",
                state.moments.len(),
                self.vars.len()
            ));
        }
        for ((name, var), (saved, m, v)) in self.vars.iter().zip(&state.moments) {
            if name != saved || m.len() != var.elem_count() || v.len() != var.elem_count() {
                return Err(format!(
                    "saved moments of {saved} do not fit variable {name}"
                ));
            }
        }
        self.moments = self
            .vars
            .iter()
            .zip(&state.moments)
            .map(|((_, var), (_, m, v))| Moments::from_saved(var, m, v))
            .collect::<Result<_>>()
            .map_err(|e| e.to_string())?;
        self.step = state.step;
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One update from the gradients of `loss.backward()`, the variables in parallel (each
    /// element's update is its own, so the bits do not depend on the thread count). Variables
    /// without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let update = AdamStep {
            step_size: (p.lr / bc1) as f32,
            bc2_sqrt: (1.0 - p.beta2.powi(self.step as i32)).sqrt() as f32,
            b1: p.beta1 as f32,
            b2: p.beta2 as f32,
            eps: p.eps as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
        };
        self.vars
            .par_iter()
            .zip(self.moments.par_iter_mut())
            .try_for_each(|((_, var), mv)| match (grads.get(var.as_tensor()), mv) {
                (Some(g), Moments::Host(m, v)) => on_host(&update, var, g, (m, v)),
                _ => Ok(()),
            })?;
        let on_device: Vec<(&Tensor, &Tensor, &Tensor)> = self
            .vars
            .iter()
            .zip(&self.moments)
            .filter_map(|((_, var), mv)| match (grads.get(var.as_tensor()), mv) {
                (Some(g), Moments::Device(mv)) => Some((var.as_tensor(), g, mv)),
                _ => None,
            })
            .collect();
        if on_device.is_empty() {
            return Ok(());
        }
        update.apply_all(&on_device)
    }
}

/// The update of one variable on the host from its gradient, its moments moved in place:
/// [`AdamStep`]'s two passes on each element.
fn on_host(step: &AdamStep, var: &Var, g: &Tensor, (m, v): (&mut [f32], &mut [f32])) -> Result<()> {
    let g = g.flatten_all()?.to_vec1::<f32>()?;
    let mut w = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    for i in 0..w.len() {
        step.moments(&mut m[i], &mut v[i], g[i]);
        w[i] = step.weight(w[i], m[i], v[i]);
    }
    var.set(&Tensor::from_vec(w, var.shape(), var.device())?)
}

/// The learning rate at `step` of `total` steps.
pub fn learning_rate(schedule: Schedule, base: f64, step: usize, total: usize) -> f64 {
    match schedule {
        Schedule::Constant => base,
        Schedule::Cosine => {
            let t = step as f64 / total.max(1) as f64;
            base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place update the GPU runs ([`AdamStep::apply_all`], here on the CPU) gives the
    /// host loop's bits, weight decay included.
    #[test]
    fn the_in_place_update_has_the_host_loops_bits() {
        let n = 1000;
        let values = |seed: f32| {
            (0..n)
                .map(|i| ((i as f32) * 0.731 + seed).sin() * 3.0)
                .collect::<Vec<f32>>()
        };
        let host = Var::from_vec(values(0.0), n, &Device::Cpu).unwrap();
        let inplace = Var::from_vec(values(0.0), n, &Device::Cpu).unwrap();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mv = Tensor::zeros(2 * n, candle_core::DType::F32, &Device::Cpu).unwrap();
        for t in 1..=4 {
            let update = AdamStep {
                step_size: 0.01 / (1.0 - 0.9f32.powi(t)),
                bc2_sqrt: (1.0 - 0.999f32.powi(t)).sqrt(),
                b1: 0.9,
                b2: 0.999,
                eps: 1e-8,
                decay: 1.0 - 0.01 * 0.05,
            };
            let g = Tensor::new(values(t as f32).as_slice(), &Device::Cpu).unwrap();
            on_host(&update, &host, &g, (&mut m, &mut v)).unwrap();
            update.apply_all(&[(inplace.as_tensor(), &g, &mv)]).unwrap();
        }
        let bits = |t: &Tensor| {
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(host.as_tensor()), bits(inplace.as_tensor()));
        assert_eq!(
            bits(&mv),
            bits(&Tensor::new([m, v].concat().as_slice(), &Device::Cpu).unwrap())
        );
    }

    #[test]
    fn adam_matches_pytorch_on_a_quadratic() {
        // The update of torch.optim.Adam's documentation, written out in Python (float64):
        //   for t in 1..=3: g = 2w; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
        //                   w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
        //   w = [1, -2], lr = 0.1 -> [0.7015862729460302, -1.700623392046465]
        let w = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![("w".into(), w.clone())], AdamParams::new(0.1, 0.0)).unwrap();
        for _ in 0..3 {
            let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.701_586_3).abs() < 1e-5 && (got[1] + 1.700_623_4).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn cosine_goes_from_base_to_zero() {
        assert_eq!(learning_rate(Schedule::Cosine, 1e-3, 0, 100), 1e-3);
        assert!((learning_rate(Schedule::Cosine, 1e-3, 50, 100) - 5e-4).abs() < 1e-12);
        assert!(learning_rate(Schedule::Cosine, 1e-3, 100, 100).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 1e-3, 70, 100), 1e-3);
    }
}
