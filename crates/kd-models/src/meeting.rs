//! Where the two halves of a batch trained at once (`kd_train::halves`) exchange a BatchNorm's
//! per-channel sums, so that each half normalises with the whole batch's statistics and its
//! backward uses the whole batch's sums (PyTorch's `SyncBatchNorm`, between two threads).
//!
//! Both halves run the same graph, so they reach the same BatchNorms in the same order: the
//! k-th exchange of one half meets the k-th of the other. Each half leaves its partial sums in a
//! slot of the exchange's parity and moves its round counter on; it reads both slots once the
//! other's counter has reached the same round. A half cannot refill a slot the other still reads:
//! to start round r + 2 it must have passed round r + 1, which the other only enters once it has
//! read round r.
//!
//! A half waits spinning (a sleeping thread woke 150–300 µs late on the 2-vCPU machine of
//! `docs/speed.md`; a step has about 115 exchanges), then yielding its core. With one thread
//! ([`Meeting::taking_turns`]) the two halves run on two threads of which only one computes at a
//! time: a half that reaches an exchange before the other hands it the turn. A half that fails
//! closes the meeting: the other's exchanges then return an error instead of waiting for ever.

use candle_core::Result;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a waiting half spins before it yields its core between looks.
const SPIN: Duration = Duration::from_micros(200);

/// The two halves' meeting place for one training step.
#[derive(Debug, Default)]
pub struct Meeting {
    /// Exchanges each half has entered.
    rounds: [AtomicU64; 2],
    /// Partial sums by the round's parity, then by half.
    slots: [[Mutex<Vec<f64>>; 2]; 2],
    closed: AtomicBool,
    /// Halves that have arrived in this pass ([`Meeting::attend`]).
    arrived: [AtomicBool; 2],
    /// Halves that have left the meeting (after their last exchange of the pass).
    left: [AtomicBool; 2],
    /// The half that failed first, if one did.
    failed: Mutex<Option<usize>>,
    /// With one thread: whose turn it is to compute (`None`: both compute at once).
    turn: Option<(Mutex<usize>, Condvar)>,
}

impl Meeting {
    /// Two halves computing at once, on two threads.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Two halves on two threads of which one computes at a time, half 0 first: what one thread
    /// allows.
    pub fn taking_turns() -> Arc<Self> {
        Arc::new(Self {
            turn: Some((Mutex::new(0), Condvar::new())),
            ..Self::default()
        })
    }

    /// Runs `f` as half `half`: the BatchNorms it builds on this thread meet the other half
    /// here. At once, it starts once the other half has arrived ([`Self::arrive`]); with turns,
    /// on its turn, and it hands the turn over when it returns.
    pub fn attend<R>(self: &Arc<Self>, half: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let previous = ATTENDING.with(|a| a.replace(Some((Arc::clone(self), half))));
        let _leave = Leave {
            meeting: self,
            half,
            previous,
        };
        self.arrive(half)?;
        self.wait_turn(half)?;
        let out = f();
        if out.is_err() {
            self.fail(half);
        }
        out
    }

    /// Before the halves of a pass (a forward, a backward) attend: neither has arrived or left
    /// yet.
    pub fn begin_pass(&self) {
        for flag in self.arrived.iter().chain(&self.left) {
            flag.store(false, Ordering::Release);
        }
    }

    /// Whether half `half` has arrived in this pass.
    pub fn has_arrived(&self, half: usize) -> bool {
        self.arrived
            .get(half)
            .is_some_and(|a| a.load(Ordering::Acquire))
    }

    /// Half `half` arrives; at once, it waits for the other to arrive before it computes
    /// (spinning, then yielding its core, taking no other work meanwhile).
    ///
    /// Without this wait, the other half's worker — in the pool, looking for work when the
    /// halves were handed out — could steal a piece of this half's first parallel op before
    /// taking up its own half. rayon runs the work that a waiting worker finds on top of the job
    /// it waits in, so the worker could then start its half inside that piece, and its half's
    /// first exchange would wait for this half, which waits for the piece: for ever. This hung a
    /// 2-thread `googlenet-bn` step once in a few thousand (`docs/speed.md`, seventeenth round).
    /// Once both have arrived, neither half's work can be beneath the other's half: its worker
    /// took up its half first.
    fn arrive(&self, half: usize) -> Result<()> {
        self.arrived[half].store(true, Ordering::Release);
        if self.turn.is_some() {
            return Ok(());
        }
        spin_until(SPIN, || {
            if self.arrived[1 - half].load(Ordering::Acquire) {
                return Ok(true);
            }
            if self.closed.load(Ordering::Acquire) {
                candle_core::bail!("batch-norm: the other half of the batch failed");
            }
            Ok(false)
        })
    }

    /// The half that failed first (and closed the meeting), if one did.
    pub fn failed_first(&self) -> Option<usize> {
        *lock(&self.failed)
    }

    /// Half `half` failed: no more exchanges, the other half's fail instead of waiting for it.
    fn fail(&self, half: usize) {
        lock(&self.failed).get_or_insert(half);
        self.closed.store(true, Ordering::Release);
        if let Some((turn, ready)) = &self.turn {
            drop(lock(turn));
            ready.notify_all();
        }
    }

    /// Half `half` brings its partial sums and gets both halves' (in half order) once the
    /// other has brought its own for the same round.
    pub(crate) fn exchange(&self, half: usize, part: Vec<f64>) -> Result<[Vec<f64>; 2]> {
        let other = 1 - half;
        let round = self.rounds[half].load(Ordering::Relaxed) + 1;
        let parity = (round % 2) as usize;
        *lock(&self.slots[parity][half]) = part;
        self.rounds[half].store(round, Ordering::Release);
        if self.rounds[other].load(Ordering::Acquire) < round {
            if self.turn.is_some() {
                self.hand_turn(other);
                self.wait_turn(half)?;
            }
            self.wait_for(other, round)?;
        }
        Ok([
            lock(&self.slots[parity][0]).clone(),
            lock(&self.slots[parity][1]).clone(),
        ])
    }

    /// Waits until half `other` has entered `round`, spinning, then yielding.
    fn wait_for(&self, other: usize, round: u64) -> Result<()> {
        spin_until(SPIN, || loop {
            if self.rounds[other].load(Ordering::Acquire) >= round {
                return Ok(true);
            }
            self.check_open(other, round)?;
            // Help the other half meanwhile (its pending chunks, on the pool both run on),
            // looking again after each.
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                return Ok(false);
            }
        })
    }

    fn hand_turn(&self, to: usize) {
        if let Some((turn, ready)) = &self.turn {
            *lock(turn) = to;
            ready.notify_all();
        }
    }

    fn wait_turn(&self, half: usize) -> Result<()> {
        let Some((turn, ready)) = &self.turn else {
            return Ok(());
        };
        let mut t = lock(turn);
        while *t != half {
            // The other half leaves under this lock, handing the turn over as it does: if it
            // has left and the turn is not ours, it never comes back.
            self.check_open(1 - half, u64::MAX)?;
            t = ready.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// An error if half `other` failed, or left before entering `round` (the halves' graphs
    /// differ: it would never come). It enters its rounds before it leaves, so its round is read
    /// again after its leaving is seen.
    fn check_open(&self, other: usize, round: u64) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            candle_core::bail!("batch-norm: the other half of the batch failed");
        }
        if self.left[other].load(Ordering::Acquire)
            && self.rounds[other].load(Ordering::Acquire) < round
        {
            candle_core::bail!(
                "batch-norm: the other half of the batch met fewer BatchNorms (it left after {} exchanges; this half waits for exchange {round})",
                self.rounds[other].load(Ordering::Acquire)
            );
        }
        Ok(())
    }

    /// Half `half` leaves the pass: with turns, under the turn's lock and handing the turn over.
    fn leave(&self, half: usize) {
        match &self.turn {
            Some((turn, ready)) => {
                let mut t = lock(turn);
                self.left[half].store(true, Ordering::Release);
                *t = 1 - half;
                drop(t);
                ready.notify_all();
            }
            None => self.left[half].store(true, Ordering::Release),
        }
    }
}

/// Waits until `ready` says so, looking again at once for `spin`, then yielding the core between
/// looks; an error from `ready` ends the wait with it.
pub fn spin_until(spin: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !ready()? {
        if start.elapsed() < spin {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// The meeting and half that [`Meeting::attend`] set for this thread.
    static ATTENDING: RefCell<Option<(Arc<Meeting>, usize)>> = const { RefCell::new(None) };
}

/// The meeting this thread's BatchNorms attend, and as which half.
pub(crate) fn attending() -> Option<(Arc<Meeting>, usize)> {
    ATTENDING.with(|a| a.borrow().clone())
}

/// Leaving [`Meeting::attend`]: the thread's previous meeting back, the turn handed to the other
/// half, and the meeting closed if the half is unwinding.
struct Leave<'a> {
    meeting: &'a Meeting,
    half: usize,
    previous: Option<(Arc<Meeting>, usize)>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let previous = self.previous.take();
        ATTENDING.with(|a| *a.borrow_mut() = previous);
        if std::thread::panicking() {
            self.meeting.fail(self.half);
        }
        self.meeting.leave(self.half);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// 200 exchanges between two threads: each gets both halves' parts of the same round, in
    /// half order.
    fn exchanges(meeting: &Arc<Meeting>, half: usize, busy: &AtomicUsize) -> Result<()> {
        meeting.attend(half, || {
            for round in 0..200u32 {
                assert_eq!(busy.fetch_add(1, Ordering::SeqCst), 0, "one half at a time");
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(20) {
                    std::hint::spin_loop();
                }
                busy.fetch_sub(1, Ordering::SeqCst);
                let part = vec![f64::from(round), half as f64];
                let (m, h) = attending().expect("attending");
                assert!(Arc::ptr_eq(&m, meeting) && h == half);
                let [p0, p1] = m.exchange(half, part)?;
                assert_eq!(
                    (p0, p1),
                    (vec![f64::from(round), 0.0], vec![f64::from(round), 1.0])
                );
            }
            Ok(())
        })
    }

    #[test]
    fn halves_meet_round_by_round_at_once_and_taking_turns() {
        for meeting in [Meeting::new(), Meeting::taking_turns()] {
            let turns = meeting.turn.is_some();
            // Taking turns, never two halves computing at once; at once, no such check.
            let (a, b) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let (busy0, busy1) = if turns { (&a, &a) } else { (&a, &b) };
            meeting.begin_pass();
            std::thread::scope(|s| {
                let other = s.spawn(|| exchanges(&meeting, 1, busy1));
                exchanges(&meeting, 0, busy0).expect("half 0");
                other.join().expect("no panic").expect("half 1");
            });
            assert!(attending().is_none());
        }
    }

    /// Half 1 waits at its first exchange while half 0 runs `first` (at once, then taking
    /// turns): the error that releases half 1 and the half that failed first, for each kind of
    /// meeting.
    fn release_messages(
        first: impl Fn(&Arc<Meeting>) -> Result<()> + Sync,
    ) -> Vec<(String, Option<usize>)> {
        [Meeting::new(), Meeting::taking_turns()]
            .iter()
            .map(|meeting| {
                meeting.begin_pass();
                let waiting = std::thread::scope(|s| {
                    let other = s.spawn(|| meeting.attend(1, || meeting.exchange(1, vec![1.0])));
                    let _ = meeting.attend(0, || first(meeting));
                    other.join().expect("no panic")
                });
                let e = waiting.expect_err("released with an error").to_string();
                (e, meeting.failed_first())
            })
            .collect()
    }

    /// A half that fails releases the other, waiting at its next exchange, with an error that
    /// says so; the meeting remembers which half failed first.
    #[test]
    fn a_failing_half_releases_the_other() {
        let failed = |m: &Arc<Meeting>| {
            assert_eq!(m.failed_first(), None);
            candle_core::bail!("out of memory")
        };
        for (e, first) in release_messages(failed) {
            assert!(e.contains("other half of the batch failed"), "{e}");
            assert_eq!(first, Some(0));
        }
    }

    /// A half that leaves after fewer exchanges than the other (graphs that differ) releases
    /// the other with an error instead of leaving it waiting, at once and taking turns.
    #[test]
    fn a_half_that_leaves_early_releases_the_other() {
        for (e, first) in release_messages(|_| Ok(())) {
            assert!(
                e.contains("met fewer BatchNorms (it left after 0 exchanges"),
                "{e}"
            );
            assert_eq!(
                first,
                Some(1),
                "the waiting half fails, not the one that left"
            );
        }
    }
}
