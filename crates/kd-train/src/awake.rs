//! The compute pool's other workers, kept awake through a run of parallel sections.
//!
//! A training step is hundreds of parallel sections (each convolution, BatchNorm and pool)
//! separated by serial work on the step's own thread (candle's graph: concatenations, gradient
//! sums, the loss). In a gap longer than about 100 µs rayon puts the idle workers to sleep, and
//! waking one took 150–300 µs on the 2-vCPU machine of `docs/speed.md`: every section that
//! follows such a gap started on one thread. Measured there with 16 tasks of 50 µs on 2 threads
//! (ideal 400 µs): 413 µs after no serial work, 457–489 µs after 100–3,000 µs of it, and 411–423
//! µs whatever the gap with the other worker kept awake.
//!
//! [`workers_awake`] keeps them polling for work instead: each other worker runs a loop that
//! takes pending work the moment it appears (`rayon::yield_now`), spins while there is none, and
//! after [`SPIN`] without work yields its core to the operating system between polls (so a
//! runnable process beside it is not starved). Only where the work is scheduled changes: every
//! op splits its work and adds its partial results in the same fixed order, so the bytes are
//! the same.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it starts yielding its core between polls.
const SPIN: Duration = Duration::from_micros(500);

/// Runs `run` with the other workers of the current rayon pool polling for work until it
/// returns (or unwinds). Outside a pool, or in a pool of one thread, it only runs `run`.
pub fn workers_awake<R>(run: impl FnOnce() -> R) -> R {
    awake_counting(|_| run())
}

/// [`workers_awake`], `run` given the count of workers that have taken up their loops.
fn awake_counting<R>(run: impl FnOnce(&AtomicUsize) -> R) -> R {
    let Some(me) = rayon::current_thread_index() else {
        return run(&AtomicUsize::new(0));
    };
    if rayon::current_num_threads() < 2 {
        return run(&AtomicUsize::new(0));
    }
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    let flag = Arc::clone(&stop.0);
    let polling = Arc::new(AtomicUsize::new(0));
    let started = Arc::clone(&polling);
    rayon::spawn_broadcast(move |worker| {
        if worker.index() != me {
            started.fetch_add(1, Ordering::AcqRel);
            poll_until(&flag);
        }
    });
    wait_until_polling(&polling, rayon::current_num_threads() - 1);
    run(&polling)
}

/// Waits (spinning, then yielding the core) until `others` workers are polling, before `run`
/// queues any work. A worker that was looking for work when the loops were handed out could
/// otherwise steal a piece of `run`'s first parallel op before it takes up its loop; rayon runs
/// the work that a waiting worker finds on top of the job it waits in, so the worker could then
/// start its loop inside that piece, and the loop (which only ends when `run` returns) would never
/// let the piece finish, nor `run` return. The same race hung the halves of a step
/// (`kd_models::meeting::Meeting::attend`, `docs/speed.md`, seventeenth round). The workers are
/// idle or polling when an epoch starts, so they take up their loops at once.
fn wait_until_polling(polling: &AtomicUsize, others: usize) {
    let all = || Ok(polling.load(Ordering::Acquire) >= others);
    // `all` never fails.
    let _ = kd_models::meeting::spin_until(SPIN, all);
}

/// Sets the flag when dropped, so that the workers stop polling even if `run` unwinds.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Takes the pool's pending work as it appears until `stop` is set.
fn poll_until(stop: &AtomicBool) {
    let mut idle_since: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        if idle_since.get_or_insert_with(Instant::now).elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// The other worker takes part in the sections inside (each of 16 tasks reports the
    /// thread it ran on), the result is `run`'s, and once it returns the worker is free again:
    /// a later `broadcast` reaches both threads (it would hang if the loop never stopped).
    #[test]
    fn the_other_worker_takes_work_and_stops_after() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a pool of two threads");
        pool.install(|| {
            let threads: Vec<Option<usize>> = workers_awake(|| {
                (0..4)
                    .flat_map(|_| {
                        std::thread::sleep(Duration::from_millis(2));
                        (0..16)
                            .into_par_iter()
                            .with_max_len(1)
                            .map(|_| {
                                std::thread::sleep(Duration::from_millis(1));
                                rayon::current_thread_index()
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            });
            assert_eq!(threads.len(), 64);
            assert!(threads.contains(&Some(0)) && threads.contains(&Some(1)));
            let reached = rayon::broadcast(|w| w.index());
            assert_eq!(reached, vec![0, 1]);
        });
    }

    #[test]
    fn outside_a_pool_it_only_runs() {
        assert_eq!(
            std::thread::spawn(|| workers_awake(|| 7)).join().ok(),
            Some(7)
        );
    }

    /// Every other worker has taken up its loop before `run` starts (500 times on two threads,
    /// three on three): none can steal a piece of `run` first and start its loop on top of it.
    #[test]
    fn run_starts_once_every_other_worker_polls() {
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            let seen: Vec<usize> = pool.install(|| {
                (0..500)
                    .map(|_| awake_counting(|polling| polling.load(Ordering::Acquire)))
                    .collect()
            });
            assert!(seen.iter().all(|&n| n == threads - 1), "{threads} threads");
        }
    }
}
