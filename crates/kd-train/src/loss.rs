//! Losses: cross-entropy and Hinton knowledge distillation, in the correct form.
//!
//! ```text
//! soft_h = T² · KL( softmax(z_teacher_h / T) ‖ softmax(z_student / T) )   batch mean, summed over classes
//! soft   = Σ_h w_h · soft_h
//! loss   = hard_weight · CE(z_student, y) + soft_weight · soft
//! ```
//! Built from `log_softmax` (candle has no `kl_div`, and `softmax_last_dim` has no backward).
//! The seed article passed probabilities to `KLDivLoss` and left out T²; this does neither.
//! Two variants replace `soft_h` (config `student.standardize_logits`, `student.dkd_beta`): the KL
//! of z-scored logits ([`standardized_soft_target_loss`]) and decoupled KD ([`dkd_loss`]).

use candle_core::{Result, Tensor, D};
use candle_nn::ops::log_softmax;

/// Mean cross-entropy of logits `[b, c]` against labels `[b]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, labels)
}

/// Cross-entropy of the rows that carry a label (`labelled` `[b]`, 1 or 0), summed and divided
/// by the whole batch: an unlabelled row adds nothing, and with every row labelled this is
/// [`cross_entropy`].
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor, labelled: &Tensor) -> Result<Tensor> {
    let b = logits.dim(0)?;
    let nll = log_softmax(logits, D::Minus1)?
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    (nll * labelled.to_dtype(logits.dtype())?)?.sum_all()? / b.max(1) as f64
}

/// The teacher's loss, as the seed trains GoogLeNet: CE of the main head plus `aux_weight` times
/// the CE of every other head.
pub fn teacher_loss(heads: &[Tensor], labels: &Tensor, aux_weight: f64) -> Result<Tensor> {
    let mut loss = cross_entropy(&heads[0], labels)?;
    for aux in &heads[1..] {
        loss = (loss + (cross_entropy(aux, labels)? * aux_weight)?)?;
    }
    Ok(loss)
}

/// The KD objective's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KdWeights {
    pub temperature: f64,
    pub hard: f64,
    pub soft: f64,
    /// One weight per teacher head passed to [`kd_loss`], in the same order.
    pub heads: Vec<f64>,
    /// Z-score each row of logits (student's and teacher's) before the temperature: the student
    /// matches the shape of the teacher's answer, not its scale (Sun et al., "Logit
    /// Standardization in Knowledge Distillation", CVPR 2024).
    pub standardize: bool,
    /// Decoupled KD (Zhao et al., CVPR 2022): `Some(β)` replaces each head's KL by
    /// `TCKD + β · NCKD` (see [`dkd_loss`]); `None` is Hinton's KL.
    pub dkd_beta: Option<f64>,
}

impl KdWeights {
    /// A student's KD settings: the teacher heads it learns from (those with a positive weight,
    /// by name) and the weights of its loss.
    pub fn of(s: &crate::config::StudentConfig) -> (Vec<String>, Self) {
        let used: Vec<(&String, f64)> = s
            .head_weights
            .iter()
            .filter(|(_, w)| **w > 0.0)
            .map(|(h, w)| (h, *w))
            .collect();
        let weights = Self {
            temperature: s.temperature,
            hard: s.hard_weight,
            soft: s.soft_weight,
            heads: used.iter().map(|(_, w)| *w).collect(),
            standardize: s.standardize_logits,
            dkd_beta: s.dkd_beta,
        };
        (used.into_iter().map(|(h, _)| h.clone()).collect(), weights)
    }
}

/// The KD loss and its parts (scalars), for logging.
#[derive(Debug, Clone)]
pub struct KdLoss {
    pub total: Tensor,
    pub hard: Tensor,
    pub soft_per_head: Vec<Tensor>,
}

/// `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, summed over classes, mean over the batch.
/// The teacher's logits are constants (no gradient flows to them).
pub fn soft_target_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    soft_loss(student, &teacher.detach(), temperature)
}

/// [`soft_target_loss`] of the z-scored logits (each row minus its mean, over its sample
/// standard deviation): the gradient flows through the student's standardisation.
pub fn standardized_soft_target_loss(
    student: &Tensor,
    teacher: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    soft_loss(
        &z_score(student)?,
        &z_score(&teacher.detach())?,
        temperature,
    )
}

/// Each row of `[b, c]` logits minus its mean, over its sample standard deviation (+1e-7).
pub fn z_score(logits: &Tensor) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)?;
    let centred = logits.broadcast_sub(&logits.mean_keepdim(D::Minus1)?)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / (c.max(2) - 1) as f64)?;
    centred.broadcast_div(&(var.sqrt()? + 1e-7)?)
}

/// `log Σ exp` over the last dimension, keeping it; the max is a constant for the gradient.
fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&m)
}

/// Decoupled knowledge distillation of student logits `[b, c]` from one teacher head, with the
/// labels `[b]`: Hinton's KL splits into `TCKD` (KL of the binary target / not-target
/// probabilities) plus `(1 − p_target) · NCKD` (KL of the distributions over the non-target
/// classes). With a confident teacher that factor makes the non-target knowledge vanish; DKD
/// weights it by `beta` instead: `T² · (TCKD + beta · NCKD)`, batch mean.
pub fn dkd_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    temperature: f64,
    beta: f64,
) -> Result<Tensor> {
    let c = student.dim(D::Minus1)?;
    let target = Tensor::arange(0u32, c as u32, student.device())?
        .unsqueeze(0)?
        .broadcast_eq(&labels.unsqueeze(1)?)?
        .to_dtype(student.dtype())?;
    // Per row: log p(target), log p(not target), log p(class | not target).
    let parts = |z: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
        let z = (z / temperature)?;
        let all = log_sum_exp(&z)?;
        let z_target = (&z * &target)?.sum_keepdim(D::Minus1)?;
        let z_rest = (&z - (&target * 1e4)?)?;
        let rest = log_sum_exp(&z_rest)?;
        Ok((
            (z_target - &all)?,
            (&rest - &all)?,
            z_rest.broadcast_sub(&rest)?,
        ))
    };
    let (s_t, s_r, s_nc) = parts(student)?;
    let (t_t, t_r, t_nc) = parts(&teacher.detach())?;
    let kl = |log_p: &Tensor, log_q: &Tensor| -> Result<Tensor> {
        (log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)
    };
    let tckd = (kl(&t_t, &s_t)? + kl(&t_r, &s_r)?)?;
    let nckd = kl(&t_nc, &s_nc)?;
    (tckd + (nckd * beta)?)?.mean_all()? * (temperature * temperature)
}

fn soft_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let inv_t = 1.0 / temperature;
    let log_q = log_softmax(&(student * inv_t)?, D::Minus1)?;
    let log_p = log_softmax(&(teacher * inv_t)?, D::Minus1)?;
    let p = log_p.exp()?;
    let kl = (p * (log_p - log_q)?)?.sum(D::Minus1)?;
    kl.mean_all()? * (temperature * temperature)
}

/// The KD loss of student logits `[b, c]` against one `[b, c]` logit tensor per teacher head.
/// With `labelled` (`[b]`, 1 or 0), the hard loss counts only the rows that carry a label
/// ([`masked_cross_entropy`]); the soft loss counts every row.
pub fn kd_loss(
    student: &Tensor,
    teacher_heads: &[Tensor],
    labels: &Tensor,
    labelled: Option<&Tensor>,
    w: &KdWeights,
) -> Result<KdLoss> {
    if teacher_heads.len() != w.heads.len() {
        candle_core::bail!(
            "{} teacher heads but {} head weights",
            teacher_heads.len(),
            w.heads.len()
        );
    }
    let hard = match labelled {
        None => cross_entropy(student, labels)?,
        Some(mask) => masked_cross_entropy(student, labels, mask)?,
    };
    let soft_per_head = teacher_heads
        .iter()
        .map(|t| {
            if let Some(beta) = w.dkd_beta {
                dkd_loss(student, t, labels, w.temperature, beta)
            } else if w.standardize {
                standardized_soft_target_loss(student, t, w.temperature)
            } else {
                soft_target_loss(student, t, w.temperature)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mut soft = hard.zeros_like()?;
    for (s, &hw) in soft_per_head.iter().zip(&w.heads) {
        if hw != 0.0 {
            soft = (soft + (s * hw)?)?;
        }
    }
    let total = ((&hard * w.hard)? + (soft * w.soft)?)?;
    Ok(KdLoss {
        total,
        hard,
        soft_per_head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use serde_json::Value;

    fn matrix(v: &Value) -> (Vec<f64>, usize, usize) {
        let rows = v.as_array().unwrap();
        let cols = rows[0].as_array().unwrap().len();
        let data = rows
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        (data, rows.len(), cols)
    }

    fn close(got: f64, want: f64, what: &str) {
        let tol = 1e-5 * want.abs().max(1e-3);
        assert!((got - want).abs() <= tol, "{what}: got {got}, want {want}");
    }

    /// The hard loss of a batch with unlabelled rows: the labelled rows' cross-entropy summed over
    /// the whole batch size; every row labelled is plain cross-entropy; gradients reach only the
    /// labelled rows.
    #[test]
    fn masked_cross_entropy_counts_only_labelled_rows() {
        let dev = Device::Cpu;
        let logits = Var::new(
            &[[1f64, 2., 0.5], [0.3, -1., 2.], [2., 2., 2.], [-1., 0., 1.]],
            &dev,
        )
        .unwrap();
        let labels = Tensor::new(&[1u32, 2, 0, 0], &dev).unwrap();
        let scalar = |t: &Tensor| t.to_scalar::<f64>().unwrap();
        let all = Tensor::new(&[1f64, 1., 1., 1.], &dev).unwrap();
        let full = scalar(&masked_cross_entropy(&logits, &labels, &all).unwrap());
        assert!((full - scalar(&cross_entropy(&logits, &labels).unwrap())).abs() < 1e-12);
        let mask = Tensor::new(&[1f64, 0., 1., 0.], &dev).unwrap();
        let loss = masked_cross_entropy(&logits, &labels, &mask).unwrap();
        let rows = Tensor::new(&[0u32, 2], &dev).unwrap();
        let kept = cross_entropy(
            &logits.index_select(&rows, 0).unwrap(),
            &labels.index_select(&rows, 0).unwrap(),
        )
        .unwrap();
        assert!((scalar(&loss) - scalar(&kept) * 2.0 / 4.0).abs() < 1e-12);
        let grad = loss.backward().unwrap();
        let g = grad.get(&logits).unwrap().to_vec2::<f64>().unwrap();
        assert!(g[1].iter().chain(&g[3]).all(|&x| x == 0.0), "{g:?}");
        assert!(g[0].iter().any(|&x| x != 0.0));
    }

    /// Reference values: tests/reference/kd_loss_cases.json,
    /// computed in float64 with PyTorch for the formula in this module's docs:
    ///   soft_h = T**2 * F.kl_div(F.log_softmax(s/T, 1), F.softmax(t_h/T, 1), reduction="batchmean")
    ///   loss   = hard_weight * F.cross_entropy(s, y) + soft_weight * sum(w_h * soft_h)
    /// with the gradient from loss.backward() on the student logits.
    #[test]
    fn matches_pytorch_reference_cases() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/reference/kd_loss_cases.json"
        );
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let dev = Device::Cpu;
        let cases = doc["cases"].as_array().unwrap();
        assert!(cases.len() >= 9);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let (s, b, c) = matrix(&case["student_logits"]);
            let student = Var::from_vec(s, (b, c), &dev).unwrap();
            let teachers: Vec<Tensor> = case["teacher_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    let (t, _, _) = matrix(h);
                    Tensor::from_vec(t, (b, c), &dev).unwrap()
                })
                .collect();
            let labels: Vec<u32> = case["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_u64().unwrap() as u32)
                .collect();
            let labels = Tensor::from_vec(labels, b, &dev).unwrap();
            let f = |k: &str| case[k].as_f64().unwrap();
            let weights = KdWeights {
                temperature: f("temperature"),
                hard: f("hard_weight"),
                soft: f("soft_weight"),
                heads: case["head_weights"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect(),
                standardize: false,
                dkd_beta: None,
            };
            let loss = kd_loss(student.as_tensor(), &teachers, &labels, None, &weights).unwrap();
            let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            close(scalar(&loss.total), f("loss"), &format!("{name} loss"));
            close(scalar(&loss.hard), f("hard"), &format!("{name} hard"));
            for (i, (got, want)) in loss
                .soft_per_head
                .iter()
                .zip(case["soft_per_head"].as_array().unwrap())
                .enumerate()
            {
                close(
                    scalar(got),
                    want.as_f64().unwrap(),
                    &format!("{name} soft head {i}"),
                );
            }
            let grads = loss.total.backward().unwrap();
            let g = grads
                .get(student.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let (want, _, _) = matrix(&case["grad_student_logits"]);
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (i, (gv, wv)) in g.iter().zip(&want).enumerate() {
                assert!(
                    (gv - wv).abs() <= 1e-5 * scale,
                    "{name} grad[{i}]: got {gv}, want {wv}"
                );
            }
        }
    }

    #[test]
    fn standardized_soft_loss_ignores_the_scale_and_shift_of_each_row() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[[1.0f64, -2.0, 0.5, 4.0], [3.0, 0.0, -1.0, 0.2]], &dev).unwrap();
        let z = z_score(&t).unwrap();
        for row in z.to_vec2::<f64>().unwrap() {
            let mean = row.iter().sum::<f64>() / 4.0;
            let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0;
            assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-6, "{row:?}");
        }
        let scaled = ((&t * 3.0).unwrap() + 5.0).unwrap();
        let loss = |s: &Tensor, t: &Tensor| {
            standardized_soft_target_loss(s, t, 2.0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        // A student with the teacher's shape at another scale has nothing left to learn...
        assert!(loss(&scaled, &t) < 1e-9);
        // ... which the plain loss does not say.
        assert!(
            soft_target_loss(&scaled, &t, 2.0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                > 0.1
        );
        let other = Tensor::new(&[[0.0f64, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], &dev).unwrap();
        let l = loss(&other, &t);
        assert!(l > 0.01);
        assert!((loss(&other, &scaled) - l).abs() < 1e-6 * l);
        // The gradient reaches the student through its standardisation.
        let s = Var::from_tensor(&other).unwrap();
        let g = standardized_soft_target_loss(s.as_tensor(), &t, 2.0)
            .unwrap()
            .backward()
            .unwrap();
        let g = g
            .get(s.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(g.to_scalar::<f64>().unwrap() > 0.0);
    }

    #[test]
    fn dkd_with_beta_one_minus_the_teachers_target_probability_is_the_kl() {
        // The identity DKD rests on: KL = TCKD + (1 − p_target) · NCKD, row by row.
        let dev = Device::Cpu;
        let rows = [
            ([1.0f64, -2.0, 0.5, 4.0], [0.3f64, 2.0, -1.0, 0.0], 3u32),
            ([3.0, 0.0, -1.0, 0.2], [0.0, 0.5, 0.5, 0.1], 1),
        ];
        for (t, s, y) in rows {
            let teacher = Tensor::new(&[t], &dev).unwrap();
            let student = Tensor::new(&[s], &dev).unwrap();
            let labels = Tensor::new(&[y], &dev).unwrap();
            for temp in [1.0, 4.0] {
                let p = candle_nn::ops::softmax_last_dim(&(&teacher / temp).unwrap())
                    .unwrap()
                    .to_vec2::<f64>()
                    .unwrap()[0][y as usize];
                let scalar = |t: Tensor| t.to_scalar::<f64>().unwrap();
                let kl = scalar(soft_target_loss(&student, &teacher, temp).unwrap());
                let dkd = scalar(dkd_loss(&student, &teacher, &labels, temp, 1.0 - p).unwrap());
                assert!(
                    (kl - dkd).abs() < 1e-9 * kl.max(1.0),
                    "T {temp}: {kl} vs {dkd}"
                );
                // A larger beta weighs the non-target classes more.
                let more = scalar(dkd_loss(&student, &teacher, &labels, temp, 8.0).unwrap());
                assert!(more > dkd);
                assert!(
                    scalar(dkd_loss(&teacher, &teacher, &labels, temp, 8.0).unwrap()).abs() < 1e-12
                );
            }
        }
    }

    #[test]
    fn soft_loss_is_zero_when_the_student_matches_the_teacher() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[[1.0f32, -2.0, 0.5], [3.0, 0.0, -1.0]], &dev).unwrap();
        let l = soft_target_loss(&t, &t, 5.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(l.abs() < 1e-6, "{l}");
        let other = Tensor::new(&[[0.0f32, 0.0, 0.0], [0.0, 0.0, 0.0]], &dev).unwrap();
        assert!(
            soft_target_loss(&other, &t, 5.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
