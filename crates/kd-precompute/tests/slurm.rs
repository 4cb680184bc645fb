#![allow(clippy::unwrap_used)]
//! A real job engine: a one-node SLURM cluster on this machine (Debian's slurm-wlm and munge,
//! started from `deploy/slurm/local/`), the precompute as a 3-task job array plus a dependent
//! merge job (`deploy/slurm/submit.sh`), compared byte for byte with one process's knowledge
//! file; then one array task killed with SIGKILL and resubmitted alone.
//!
//! Slow (about a minute) and it starts daemons, so it is ignored by `cargo test` and run by
//! `just test-slurm` (which `just test` calls), under a time limit.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DATA: [&str; 2] = ["--set", "data.train_limit=6000"];

/// The cluster, stopped when the test ends however it ends.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(workspace().join("deploy/slurm/local/cluster.sh"))
            .arg("start")
            .arg(dir.path())
            .env("KD_SLURM_PORT", "16917")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the local SLURM cluster did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", self.conf());
        c
    }

    /// `deploy/slurm/submit.sh ARGS N smoke.toml ROOT -- DATA`; its output.
    fn submit(&self, flags: &[&str], root: &Path) -> (bool, String) {
        let bin = Path::new(env!("CARGO_BIN_EXE_kd-precompute"))
            .parent()
            .unwrap();
        let out = self
            .command(workspace().join("deploy/slurm/submit.sh"))
            .args(flags)
            .arg("3")
            .arg(smoke())
            .arg(root)
            .arg("--")
            .args(DATA)
            .env("KD_BIN", bin)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn queued(&self, job: &str) -> bool {
        let out = self
            .command("squeue")
            .args(["-h", "-j", job])
            .output()
            .unwrap();
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(workspace().join("deploy/slurm/local/cluster.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

/// The job id after `prefix` in submit.sh's output.
fn job_id(text: &str, prefix: &str) -> String {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
    text[at + prefix.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The pid of array task `task` of job `array` once its log says inference has begun.
fn running_task(array: &str, task: usize, log: &Path, deadline: Instant) -> u32 {
    loop {
        assert!(
            Instant::now() < deadline,
            "task {array}_{task} never started inference"
        );
        let started = std::fs::read_to_string(log)
            .map(|s| s.contains("precompute: googlenet from"))
            .unwrap_or(false);
        if started {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
                let env = String::from_utf8_lossy(&env);
                let has = |kv: &str| env.split('\0').any(|e| e == kv);
                if comm.trim() == "kd-precompute"
                    && has(&format!("SLURM_ARRAY_JOB_ID={array}"))
                    && has(&format!("SLURM_ARRAY_TASK_ID={task}"))
                {
                    return pid;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "starts a SLURM cluster; run by `just test-slurm`"]
fn slurm_array_precompute_equals_one_process_and_survives_a_killed_task() {
    let teacher = teacher_root();
    let whole = whole_file(teacher.path(), &DATA);

    let cluster = Cluster::start();

    // 1. The array and its merge, waited for: the single-process file, byte for byte.
    let root = copy_teacher(teacher.path());
    let (done, text) = cluster.submit(&["--wait"], root.path());
    assert!(done, "{text}");
    assert!(
        std::fs::read(knowledge(root.path())).unwrap() == whole,
        "the SLURM-merged file differs from one process's\n{text}"
    );
    let log = std::fs::read_dir(root.path().join("smoke/knowledge/slurm-logs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("precompute-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        log.contains("SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_MIN=0, SLURM_ARRAY_TASK_COUNT=3"),
        "the tasks took their index from SLURM's environment:\n{log}"
    );

    // 2. kill -9 of task 1 while it runs: the merge never runs; task 1 resubmitted alone, then
    //    the merge: the same file.
    let root = copy_teacher(teacher.path());
    let r = root.path();
    let (submitted, text) = cluster.submit(&[], r);
    assert!(submitted, "{text}");
    let array = job_id(&text, "submitted precompute array job ");
    let merge = job_id(&text, "submitted merge job ");
    let deadline = Instant::now() + Duration::from_secs(180);
    let log = r.join(format!(
        "smoke/knowledge/slurm-logs/precompute-{array}_1.out"
    ));
    let pid = running_task(&array, 1, &log, deadline);
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    while cluster.queued(&array) || cluster.queued(&merge) {
        assert!(
            Instant::now() < deadline,
            "the jobs did not leave the queue"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(shard(r, 0, 3).is_file() && shard(r, 2, 3).is_file());
    assert!(!shard(r, 1, 3).exists(), "the killed task left a shard");
    assert!(
        !knowledge(r).exists(),
        "the merge ran although a task failed"
    );

    let (done, text) = cluster.submit(&["--wait", "--only", "1"], r);
    assert!(done, "{text}");
    assert!(
        std::fs::read(knowledge(r)).unwrap() == whole,
        "after the retry the merged file differs from one process's\n{text}"
    );
    ok(precompute(r, &[&["verify"], &DATA[..]].concat()));
}
