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

/// Keeps freed memory in the process instead of returning it to the system after every op.
///
/// candle allocates a fresh buffer for every op's output; glibc serves buffers above its mmap
/// threshold (128 KiB, rising only slowly) with mmap and returns them with munmap, so every
/// training step page-faults its whole working set in again and the kernel spends its time in TLB
/// shootdowns. With mmap off (even buffers above glibc's 32 MiB threshold cap come from the heap)
/// and trimming off, buffers are recycled from the heap (one heap, for every thread): `just bench` measured the student's step
/// 2.3×, the teacher's 1.3× and precompute 1.3× faster, at the same peak memory.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes glibc's allocation parameters; it is called before any thread
    // of ours starts, and an unsupported value is refused by glibc (return value 0), not UB.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // One arena: the compute pool's threads allocate too, and a thread's own arena lives in
        // mmap'd heaps that glibc shrinks (and the kernel zero-fills again) as buffers are freed.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// candle's element-wise ops run on a pool of their own (`CANDLE_NUM_THREADS`, by default as many
/// threads as rayon's) whose threads spin while they wait: beside the compute pool, one more
/// spinning thread than cores. A training step's element-wise work is mostly candle adding each
/// node's gradient into a zeroed buffer, memory-bound, where a second thread buys little: with one,
/// the teacher step measured 309–313 img/s against 292–304 with two (`docs/speed.md`), and on a
/// busy machine the spinning took a quarter of the CPU (`perf`). One thread, unless the user set
/// `CANDLE_NUM_THREADS`. Called before any thread starts.
pub fn single_threaded_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs `run` on a worker of one rayon pool of [`crate::stage::threads`] threads (candle's count,
/// which the manifests record), so that every parallel loop inside it (our ops', the matrix
/// products') runs on that pool with the calling thread taking part.
///
/// Called from the main thread, each of the hundreds of parallel sections in a training step
/// handed its work to the pool's threads and put the main thread to sleep until they finished:
/// one more runnable thread than cores, and thousands of thread switches a second. On a worker
/// of the pool, the thread that reaches a parallel loop works on it itself. The pool's threads get
/// large stacks (reserved, not committed) for candle's recursive walk of the autograd graph.
pub fn on_compute_pool<R: Send>(
    run: impl FnOnce() -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(crate::stage::threads())
        .stack_size(256 << 20)
        .thread_name(|i| format!("kd-compute-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(run),
        Err(e) => {
            tracing::warn!("no compute pool ({e}); running on the main thread");
            run()
        }
    }
}

/// Runs a stage: exit code 0 on success; on failure the error and its causes are printed once
/// (`error: outer: inner: ...`) and the exit code is 1 — 130 when a signal stopped training.
pub fn main_with(run: impl FnOnce() -> anyhow::Result<()> + Send) -> ExitCode {
    tune_allocator();
    single_threaded_elementwise();
    init_logging();
    if let Err(e) = kd_models::ImplicitUse::from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    crate::interrupt::install_handler();
    match on_compute_pool(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<crate::TrainError>() {
                Some(crate::TrainError::Interrupted(_)) => {
                    ExitCode::from(crate::interrupt::EXIT_CODE)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}
