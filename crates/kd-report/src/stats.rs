//! The statistics of the report: mean and sample standard deviation, Student's t intervals of
//! paired differences, and how to read them.

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom: the table for
/// 1–30, then the Cornish–Fisher expansion `z + (z³ + z)/(4·df)` (within 0.003 of the exact value
/// from 31 on). NaN for `df = 0`.
pub fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    const Z: f64 = 1.959_964;
    match df {
        0 => f64::NAN,
        1..=30 => TABLE[df - 1],
        _ => Z + (Z.powi(3) + Z) / (4.0 * df as f64),
    }
}

/// The 95% confidence interval of the mean of paired differences (Student's t, `n − 1` degrees
/// of freedom); `None` for fewer than two pairs, where there is no spread to go by.
pub fn paired_interval(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.len() < 2 {
        return None;
    }
    let (m, s) = mean_std(xs);
    let half = t95(xs.len() - 1) * s / (xs.len() as f64).sqrt();
    Some((m - half, m + half))
}

/// How to read an interval of differences: does it hold 0?
pub fn verdict(interval: Option<(f64, f64)>) -> &'static str {
    match interval {
        None => "one seed: no test",
        Some((lo, _)) if lo > 0.0 => "better",
        Some((_, hi)) if hi < 0.0 => "worse",
        Some(_) => "not distinguishable",
    }
}

/// A fraction as a percentage with two decimals.
pub fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// Mean ± std of fractions, in percentage points.
pub fn pm((mean, std): (f64, f64)) -> String {
    format!("{:.2} ± {:.2}", 100.0 * mean, 100.0 * std)
}

/// A paired difference over seeds, summarised.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Difference {
    pub mean: f64,
    pub std: f64,
    pub per_seed: Vec<f64>,
    pub ci95: Option<[f64; 2]>,
    pub reading: &'static str,
}

impl Difference {
    pub fn of(per_seed: Vec<f64>) -> Self {
        let (mean, std) = mean_std(&per_seed);
        let interval = paired_interval(&per_seed);
        Self {
            mean,
            std,
            ci95: interval.map(|(lo, hi)| [lo, hi]),
            reading: verdict(interval),
            per_seed,
        }
    }

    /// `+0.26 ± 0.22` (points), or `+0.26` for one seed.
    pub fn points(&self) -> String {
        if self.per_seed.len() < 2 {
            format!("{:+.2}", 100.0 * self.mean)
        } else {
            format!("{:+.2} ± {:.2}", 100.0 * self.mean, 100.0 * self.std)
        }
    }

    /// `-0.28 to +0.80`, or `-` without an interval.
    pub fn interval(&self) -> String {
        self.ci95.map_or("-".into(), |[lo, hi]| {
            format!("{:+.2} to {:+.2}", 100.0 * lo, 100.0 * hi)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[0.90, 0.91, 0.92]);
        assert!((m - 0.91).abs() < 1e-12);
        assert!((s - 0.01).abs() < 1e-12);
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn paired_intervals_use_students_t() {
        // Differences 0.33, 0.52, -0.15 (points): mean 0.2333, sd 0.3453, t(2) = 4.303,
        // half-width 4.303 * 0.3453 / sqrt(3) = 0.8578 (scipy.stats.t.interval agrees).
        let (lo, hi) = paired_interval(&[0.0033, 0.0052, -0.0015]).unwrap();
        assert!((lo - (0.002_333 - 0.008_578)).abs() < 2e-6, "{lo}");
        assert!((hi - (0.002_333 + 0.008_578)).abs() < 2e-6, "{hi}");
        assert_eq!(verdict(Some((lo, hi))), "not distinguishable");
        // Every seed +0.5 to +0.7: clearly positive.
        assert_eq!(verdict(paired_interval(&[0.005, 0.006, 0.007])), "better");
        assert_eq!(verdict(paired_interval(&[-0.005, -0.006, -0.007])), "worse");
        assert_eq!(paired_interval(&[0.01]), None);
        assert_eq!(verdict(None), "one seed: no test");
        // The expansion past the table: t(40) = 2.021, t(120) = 1.980.
        assert!((t95(40) - 2.021).abs() < 3e-3 && (t95(120) - 1.980).abs() < 3e-3);
        assert!((t95(30) - 2.042).abs() < 1e-9 && t95(0).is_nan());
        let d = Difference::of(vec![0.005, 0.006, 0.007]);
        assert_eq!((d.points().as_str(), d.reading), ("+0.60 ± 0.10", "better"));
    }
}
