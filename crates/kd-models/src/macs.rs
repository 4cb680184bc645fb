//! Counting multiply-adds: convolutions and linear layers add theirs to a per-thread counter
//! while [`count`] runs, so a benchmark can turn seconds into GFLOP/s without a hand-written
//! table per architecture.

use std::cell::Cell;

thread_local! {
    static COUNTER: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Adds `n` multiply-adds to the running count, if one is running on this thread.
pub(crate) fn add(n: usize) {
    COUNTER.with(|c| {
        if let Some(v) = c.get() {
            c.set(Some(v + n as u64));
        }
    });
}

/// Runs `f` and returns its result with the multiply-adds of the convolutions and linear layers
/// it ran.
pub fn count<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let outer = COUNTER.with(|c| c.replace(Some(0)));
    let out = f();
    let n = COUNTER.with(|c| c.replace(outer)).unwrap_or(0);
    if let Some(o) = outer {
        COUNTER.with(|c| c.set(Some(o + n)));
    }
    (out, n)
}
