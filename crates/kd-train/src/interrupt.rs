//! Ctrl-C and SIGTERM stop training at the next batch boundary, after the last complete epoch
//! was saved; a second signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// The exit code of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_CODE: u8 = 130;

/// Installs the handler (once per process; a second call is a no-op).
pub fn install_handler() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now (the last complete epoch's resume state is on disk)");
            std::process::exit(EXIT_CODE as i32);
        }
        eprintln!("\ninterrupt: stopping at the end of this batch (again to exit at once)");
    });
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
