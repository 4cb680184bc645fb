//! The frame of every stage binary: logging, one printed error chain, an exit code.

use std::process::ExitCode;

/// Logs to stderr at `info` (or as `RUST_LOG` says).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a stage: exit code 0 on success; on failure the error and its causes are printed once
/// (`error: outer: inner: ...`) and the exit code is 1.
pub fn main_with(run: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
