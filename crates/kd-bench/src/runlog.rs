//! The whole-pipeline comparison's record, `<out>/pipeline-runs.json`: each side's run is written
//! there the moment it ends, with the conditions it ran under (machine, threads, the pipeline's
//! settings, a digest of the code). The default pipeline takes about two hours a side on 2 cores,
//! so a comparison can outlast one sitting: running the same command again reads back every
//! round's side already recorded under the same conditions and runs only what is missing.
//! Anything that changed (a rebuilt binary, another machine, another setting) is measured afresh;
//! `--force` measures every round afresh; the runs recorded before it stay in the file (a
//! two-hour run is never thrown away) but none of them stands in.

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The record's file name under `--out`.
pub const FILE: &str = "pipeline-runs.json";

/// What must match for a recorded run to stand in for a new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conditions {
    /// `ours` or `pytorch`.
    pub side: String,
    /// The CPU model and the logical CPUs.
    pub machine: String,
    pub threads: usize,
    /// The pipeline's settings, resolved (file and `--set`s).
    pub settings: serde_json::Value,
    /// SHA-256 of the code that runs: our stage binaries, or PyTorch's script with the Python
    /// and torch version that run it.
    pub code: String,
}

/// One side's run `R` (`whole::Run`) and when it ended (UTC).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded<R> {
    pub conditions: Conditions,
    pub finished: String,
    /// Recorded before a later `--force`: kept in the file, never read back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
    pub run: R,
}

/// The record on disk and in memory, in the order the runs ended.
#[derive(Debug)]
pub struct RunLog<R> {
    path: PathBuf,
    runs: Vec<Recorded<R>>,
}

impl<R: Serialize + DeserializeOwned> RunLog<R> {
    /// The record at `path` (empty when there is none yet). When `fresh` (`--force`) its runs
    /// are kept in the file but none is read back. A file that does not read as a record is an
    /// error naming it, never replaced.
    pub fn open(path: &Path, fresh: bool) -> anyhow::Result<Self> {
        let mut runs: Vec<Recorded<R>> = if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a record of whole-pipeline runs (move it away to start a new one)",
                    path.display()
                )
            })?
        } else {
            Vec::new()
        };
        if fresh {
            runs.iter_mut().for_each(|r| r.superseded = true);
        }
        Ok(Self {
            path: path.to_path_buf(),
            runs,
        })
    }

    /// The runs recorded under `c` since the last `--force`, in the order they ended.
    pub fn under<'a>(&'a self, c: &'a Conditions) -> impl Iterator<Item = &'a Recorded<R>> + 'a {
        self.runs
            .iter()
            .filter(move |r| !r.superseded && r.conditions == *c)
    }

    /// The `round`-th (from 1) run recorded under `c`.
    pub fn get<'a>(&'a self, c: &'a Conditions, round: usize) -> Option<&'a Recorded<R>> {
        self.under(c).nth(round.checked_sub(1)?)
    }

    /// Adds a run that just ended and writes the record (atomically: an interruption leaves the
    /// previous one whole).
    pub fn add(&mut self, conditions: Conditions, run: R) -> anyhow::Result<()> {
        let finished = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        self.runs.push(Recorded {
            conditions,
            finished: finished.to_string(),
            superseded: false,
            run,
        });
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(&self.runs)?;
        kd_data::write_atomic_bytes(&self.path, json.as_bytes())?;
        Ok(())
    }
}

/// This machine: its CPU model and logical CPU count.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cpus} logical CPUs")
}

/// Hex SHA-256 of `parts`, each with its length (so no two lists of parts share a digest).
pub fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    kd_data::files::hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(side: &str, code: &str) -> Conditions {
        Conditions {
            side: side.to_string(),
            machine: machine(),
            threads: 2,
            settings: serde_json::json!({"teacher": {"epochs": 30}}),
            code: code.to_string(),
        }
    }

    /// A run's seconds stand for the run.
    fn run(seconds: f64) -> f64 {
        seconds
    }

    #[test]
    fn a_run_is_read_back_only_under_the_same_conditions_and_round() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deeper").join(FILE);
        let (ours, theirs) = (conditions("ours", "a"), conditions("pytorch", "b"));
        let mut log = RunLog::<f64>::open(&path, false).unwrap();
        log.add(ours.clone(), run(10.0)).unwrap();
        log.add(theirs.clone(), run(20.0)).unwrap();
        log.add(ours.clone(), run(11.0)).unwrap();

        let log = RunLog::<f64>::open(&path, false).unwrap();
        let seconds = |c: &Conditions, round| log.get(c, round).map(|r| r.run);
        assert_eq!(seconds(&ours, 1), Some(10.0));
        assert_eq!(seconds(&ours, 2), Some(11.0));
        assert_eq!(seconds(&ours, 3), None);
        assert_eq!(seconds(&theirs, 1), Some(20.0));
        assert_eq!(seconds(&theirs, 0), None);
        // A rebuilt binary, another thread count: nothing recorded stands in.
        assert_eq!(seconds(&conditions("ours", "rebuilt"), 1), None);
        let more_threads = Conditions {
            threads: 4,
            ..ours.clone()
        };
        assert_eq!(seconds(&more_threads, 1), None);
        let finished = &log.get(&ours, 1).unwrap().finished;
        assert!(
            finished.starts_with("20") && finished.ends_with('Z'),
            "{finished}"
        );

        // --force: nothing recorded stands in, but every run stays in the file, the new one
        // after them (read back as a later round).
        let mut fresh = RunLog::<f64>::open(&path, true).unwrap();
        assert_eq!(fresh.under(&ours).count(), 0);
        assert_eq!(fresh.get(&theirs, 1).map(|r| r.run), None);
        fresh.add(theirs.clone(), run(30.0)).unwrap();
        assert_eq!(fresh.get(&theirs, 1).map(|r| r.run), Some(30.0));
        // Read again without --force: only the run since; the earlier ones still in the file.
        let log = RunLog::<f64>::open(&path, false).unwrap();
        assert_eq!(log.under(&ours).count(), 0);
        assert_eq!(seconds_of(&log, &theirs), [30.0]);
        assert_eq!(log.runs.len(), 4);
        let all: Vec<f64> = log.runs.iter().map(|r| r.run).collect();
        assert_eq!(all, [10.0, 20.0, 11.0, 30.0]);
    }

    fn seconds_of(log: &RunLog<f64>, c: &Conditions) -> Vec<f64> {
        log.under(c).map(|r| r.run).collect()
    }

    #[test]
    fn a_file_that_is_not_a_record_is_an_error_naming_it_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        std::fs::write(&path, "{ not json").unwrap();
        let err = RunLog::<f64>::open(&path, false).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("move it away"),
            "{msg}"
        );
        // Not even --force replaces it.
        assert!(RunLog::<f64>::open(&path, true).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ not json");
    }

    #[test]
    fn the_digest_tells_apart_how_the_parts_are_split() {
        let d = |parts: &[&[u8]]| digest(parts.iter().copied());
        assert_eq!(d(&[b"ab", b"c"]), d(&[b"ab", b"c"]));
        assert_ne!(d(&[b"ab", b"c"]), d(&[b"a", b"bc"]));
        assert_eq!(d(&[]).len(), 64);
    }
}
