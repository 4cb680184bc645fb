//! Wall time per kind of op, for `kd-bench`: our ops time themselves (forward and backward
//! separately) while [`enable`] is on, so a benchmark can say where a training step's time goes
//! without sampling. An op's time includes its parallel loop, all threads; what is not ours
//! (candle's gradient sums and zero fills, its matrix products outside our ops, the losses) is
//! the step's time minus these.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static BY_LAYER: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());
/// Finer kinds within a kind (a convolution's pass, kernel and input size): seconds and
/// multiply-adds.
static DETAILS: Mutex<BTreeMap<String, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Starts (or stops) timing; the totals so far are kept until [`take`].
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether the finer kinds name each convolution by its channels (`16 → 48 channels`), one row
/// per layer, instead of summing the layers of one kernel and input size.
pub fn by_layer(on: bool) {
    BY_LAYER.store(on, Ordering::Relaxed);
}

pub(crate) fn is_by_layer() -> bool {
    BY_LAYER.load(Ordering::Relaxed)
}

/// The totals since the last call, `(kind, seconds, calls)` by kind, and a fresh start.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let out = t.iter().map(|(k, &(s, n))| (*k, s, n)).collect();
    t.clear();
    out
}

/// The finer kinds' totals since the last call, `(detail, seconds, multiply-adds)`, and a fresh
/// start.
pub fn take_details() -> Vec<(String, f64, u64)> {
    let mut t = DETAILS.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *t)
        .into_iter()
        .map(|(k, (s, m))| (k, s, m))
        .collect()
}

/// Runs `f`, adding its wall time to `kind` when timing is on.
pub(crate) fn time<R>(kind: &'static str, f: impl FnOnce() -> R) -> R {
    time_in_detail(kind, || None, f)
}

/// [`time`], and the same wall time and multiply-adds added to the finer kind that `detail()`
/// names (e.g. `forward, 3×3 at 14×14`), if it names one; called only while timing is on.
pub(crate) fn time_in_detail<R>(
    kind: &'static str,
    detail: impl FnOnce() -> Option<(String, u64)>,
    f: impl FnOnce() -> R,
) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let secs = start.elapsed().as_secs_f64();
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = t.entry(kind).or_insert((0.0, 0));
    e.0 += secs;
    e.1 += 1;
    drop(t);
    if let Some((name, macs)) = detail() {
        let mut d = DETAILS.lock().unwrap_or_else(|e| e.into_inner());
        let e = d.entry(name).or_insert((0.0, 0));
        e.0 += secs;
        e.1 += macs;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_only_while_on_and_take_starts_afresh() {
        time("test-kind-off", || ());
        enable(true);
        time("test-kind", || {
            std::thread::sleep(std::time::Duration::from_millis(2))
        });
        time("test-kind", || ());
        enable(false);
        let t = take();
        let k = t.iter().find(|(k, ..)| *k == "test-kind").copied();
        assert!(matches!(k, Some((_, s, 2)) if s >= 0.002), "{t:?}");
        assert!(!t.iter().any(|(k, ..)| *k == "test-kind-off"));
        assert!(!take().iter().any(|(k, ..)| *k == "test-kind"));
        enable(true);
        let detail = || Some(("test-detail".to_string(), 7));
        time_in_detail("test-kind-detailed", detail, || ());
        time_in_detail("test-kind-detailed", detail, || ());
        enable(false);
        let d = take_details();
        assert!(
            d.iter().any(|(k, _, m)| k == "test-detail" && *m == 14),
            "{d:?}"
        );
        assert!(take()
            .iter()
            .any(|(k, _, n)| *k == "test-kind-detailed" && *n == 2));
        assert!(!take_details().iter().any(|(k, ..)| k == "test-detail"));
    }
}
