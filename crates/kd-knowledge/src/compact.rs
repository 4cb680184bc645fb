//! How a head's logits are stored: full f32 rows (the default), half precision, or only the top k
//! per row.
//!
//! Top-k keeps, for each row (or view) of C logits, the k largest in descending order
//! (`logits.<head>`, ties broken by the lower class), their classes (`classes.<head>`, u16), and
//! one more logit, `rest.<head>`: the log-mean-exp of the other C − k logits. Reading fills every
//! class outside the top k with it. The rebuilt row has the same log-sum-exp as the original, so
//! at temperature 1 the top-k probabilities are exact and the remaining probability mass is exact,
//! spread evenly over the other classes; at other temperatures it is an approximation whose cost
//! the pipeline measures (README). `rest` never exceeds the k-th stored logit, and f16 rounding,
//! being monotone, keeps both that and the descending order.

use crate::{invalid, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Precision of stored logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogitDtype {
    #[default]
    F32,
    F16,
}

impl LogitDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            _ => None,
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
        }
    }

    fn bytes(self, xs: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => xs.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F16 => xs
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }

    fn values(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

/// Metadata `storage` of a compact file; absent means full f32 rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogitStorage {
    pub dtype: LogitDtype,
    /// Only the k largest logits per row, 1 ≤ k < C; `None`: all C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
}

impl LogitStorage {
    /// True for full f32 rows, which files record by leaving `storage` out.
    pub fn is_full_f32(&self) -> bool {
        *self == Self::default()
    }

    /// Values stored per row: k or C.
    fn width(&self, classes: usize) -> usize {
        self.top_k.unwrap_or(classes)
    }
}

/// For tables: `f32`, `f16`, `top-3 f16`.
impl std::fmt::Display for LogitStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = match self.dtype {
            LogitDtype::F32 => "f32",
            LogitDtype::F16 => "f16",
        };
        match self.top_k {
            Some(k) => write!(f, "top-{k} {dtype}"),
            None => f.write_str(dtype),
        }
    }
}

/// A tensor to write: name, shape, dtype, little-endian bytes.
pub(crate) type Buffer = (String, Vec<usize>, Dtype, Vec<u8>);

pub fn classes_name(head: &str) -> String {
    format!("classes.{head}")
}

pub fn rest_name(head: &str) -> String {
    format!("rest.{head}")
}

/// The tensors of one head: `logits` holds `rows × classes` values, `lead` is the shape before
/// the class axis (`[N]` or `[N, K]`).
pub(crate) fn encode(
    storage: &LogitStorage,
    head: &str,
    lead: &[usize],
    classes: usize,
    logits: &[f32],
) -> Vec<Buffer> {
    let shape = |last: Option<usize>| {
        let mut s = lead.to_vec();
        s.extend(last);
        s
    };
    let dtype = storage.dtype;
    let Some(k) = storage.top_k else {
        return vec![(
            crate::logits_name(head),
            shape(Some(classes)),
            dtype.dtype(),
            dtype.bytes(logits),
        )];
    };
    let rows = logits.len() / classes.max(1);
    let (mut values, mut picked, mut rest) = (
        Vec::with_capacity(rows * k),
        Vec::with_capacity(rows * k),
        Vec::with_capacity(rows),
    );
    for row in logits.chunks_exact(classes) {
        let mut order: Vec<usize> = (0..classes).collect();
        // Descending by value, the lower class first among equals: the same bytes every time.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        values.extend(order[..k].iter().map(|&i| row[i]));
        picked.extend(order[..k].iter().map(|&i| i as u16));
        rest.push(log_mean_exp(order[k..].iter().map(|&i| row[i])));
    }
    vec![
        (
            crate::logits_name(head),
            shape(Some(k)),
            dtype.dtype(),
            dtype.bytes(&values),
        ),
        (
            classes_name(head),
            shape(Some(k)),
            Dtype::U16,
            picked.iter().flat_map(|c| c.to_le_bytes()).collect(),
        ),
        (
            rest_name(head),
            shape(None),
            dtype.dtype(),
            dtype.bytes(&rest),
        ),
    ]
}

/// `log(mean(exp(x)))`, computed from the largest value so nothing overflows or underflows.
fn log_mean_exp(xs: impl Iterator<Item = f32> + Clone) -> f32 {
    let max = xs.clone().fold(f64::NEG_INFINITY, |m, x| m.max(x as f64));
    let (sum, n) = xs.fold((0.0f64, 0usize), |(s, n), x| {
        (s + (x as f64 - max).exp(), n + 1)
    });
    (max + (sum / n as f64).ln()) as f32
}

/// Checks one head's tensors: dtype and shape, finite values, and for top-k valid distinct
/// classes in descending order with `rest` no larger than the k-th value.
pub(crate) fn check(
    path: &Path,
    st: &SafeTensors<'_>,
    storage: &LogitStorage,
    head: &str,
    lead: &[usize],
    classes: usize,
) -> Result<()> {
    let width = storage.width(classes);
    let tensor = |name: &str, dtype: Dtype, shape: &[usize]| {
        let t = st
            .tensor(name)
            .map_err(|_| invalid(path, format!("head {head:?} has no tensor {name}")))?;
        if t.dtype() != dtype || t.shape() != shape {
            return Err(invalid(
                path,
                format!(
                    "{name} is {:?} {:?}, expected {dtype:?} {shape:?}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        Ok(t)
    };
    let mut shape = lead.to_vec();
    shape.push(width);
    let name = crate::logits_name(head);
    let values = storage
        .dtype
        .values(tensor(&name, storage.dtype.dtype(), &shape)?.data());
    let per_row: usize = lead[1..].iter().product::<usize>() * width;
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        let what = if storage.top_k.is_some() {
            "stored value"
        } else {
            "class"
        };
        return Err(invalid(
            path,
            format!(
                "{name} has a non-finite logit at row {}, {what} {}",
                i / per_row.max(1),
                i % width.max(1)
            ),
        ));
    }
    let Some(k) = storage.top_k else {
        return Ok(());
    };
    let picked: Vec<u16> = tensor(&classes_name(head), Dtype::U16, &shape)?
        .data()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let rest = storage
        .dtype
        .values(tensor(&rest_name(head), storage.dtype.dtype(), lead)?.data());
    let top = TopK {
        head,
        k,
        classes,
        rows_per_image: per_row / k,
    };
    top.check(&values, &picked, &rest)
        .map_err(|m| invalid(path, m))
}

/// A top-k head's stored rows, for their checks.
struct TopK<'a> {
    head: &'a str,
    k: usize,
    classes: usize,
    rows_per_image: usize,
}

impl TopK<'_> {
    /// Every stored row: classes below C and distinct, values descending, the rest logit finite
    /// and not above the smallest stored one; else what is wrong, and where.
    fn check(
        &self,
        values: &[f32],
        picked: &[u16],
        rest: &[f32],
    ) -> std::result::Result<(), String> {
        let (k, classes) = (self.k, self.classes);
        let (name, cname, rname) = (
            crate::logits_name(self.head),
            classes_name(self.head),
            rest_name(self.head),
        );
        for (r, ((v, c), &rest)) in values
            .chunks_exact(k)
            .zip(picked.chunks_exact(k))
            .zip(rest)
            .enumerate()
        {
            let at = format!("row {}", r / self.rows_per_image.max(1));
            if let Some(&bad) = c.iter().find(|&&c| c as usize >= classes) {
                return Err(format!(
                    "{cname} at {at} has class {bad}, not below {classes}"
                ));
            }
            if (1..k).any(|i| c[..i].contains(&c[i])) {
                return Err(format!("{cname} at {at} repeats a class"));
            }
            if v.windows(2).any(|w| w[0] < w[1]) {
                return Err(format!("{name} at {at} is not in descending order"));
            }
            if !rest.is_finite() || rest > v[k - 1] {
                return Err(format!(
                    "{rname} at {at} is {rest}, above the smallest stored logit {}",
                    v[k - 1]
                ));
            }
        }
        Ok(())
    }
}

/// One head's logits as full rows of `classes` f32 values (rebuilt for top-k).
pub(crate) fn decode(
    st: &SafeTensors<'_>,
    storage: &LogitStorage,
    head: &str,
    classes: usize,
) -> std::result::Result<Vec<f32>, safetensors::SafeTensorError> {
    let values = storage
        .dtype
        .values(st.tensor(&crate::logits_name(head))?.data());
    let Some(k) = storage.top_k else {
        return Ok(values);
    };
    let picked = st.tensor(&classes_name(head))?;
    let rest = storage.dtype.values(st.tensor(&rest_name(head))?.data());
    let mut out = Vec::with_capacity(rest.len() * classes);
    for ((v, c), &rest) in values
        .chunks_exact(k)
        .zip(picked.data().chunks_exact(2 * k))
        .zip(&rest)
    {
        let start = out.len();
        out.resize(start + classes, rest);
        for (&v, c) in v.iter().zip(c.chunks_exact(2)) {
            out[start + u16::from_le_bytes([c[0], c[1]]) as usize] = v;
        }
    }
    Ok(out)
}
