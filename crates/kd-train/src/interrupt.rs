//! Ctrl-C and SIGTERM stop every stage at the next batch boundary (training after the last
//! complete epoch was saved; precompute, evaluation, prediction and the report leave no file half
//! written, as every file is written whole and renamed); a second signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// The exit code of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_CODE: u8 = 130;

/// Installs the handler (once per process; a second call is a no-op).
pub fn install_handler() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now (files are written whole and renamed: none is half-written; a training run resumes from its last complete epoch)");
            std::process::exit(EXIT_CODE as i32);
        }
        eprintln!("\ninterrupt: stopping at the end of this batch (again to exit at once)");
    });
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Stops the work in hand when a stop was requested: `Interrupted` (exit code 130) naming
/// `doing`. Long loops call it once per batch, so every stage stops within a batch.
pub fn check(doing: &str) -> Result<(), crate::TrainError> {
    if requested() {
        return Err(crate::TrainError::Interrupted(format!(
            "stopped by a signal while {doing}; nothing half-written was left (run the same command again)"
        )));
    }
    Ok(())
}
