//! What stages trust between them: a file is read only when the manifest of the run that wrote
//! it (in the same folder) lists it with the same SHA-256, and one run at a time writes a folder.

use crate::manifest::Manifest;
use crate::TrainError;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Checks `file` against the manifest beside it (the producer's: a manifest is written last, so
/// it exists only for a finished run) and returns its SHA-256. The error names both files and
/// the recipe that remakes them (`rerun`, e.g. `just teacher fashion-mnist`).
pub fn verified(file: &Path, rerun: &str) -> Result<String, TrainError> {
    verified_by(
        file,
        &Manifest::path(file.parent().unwrap_or(Path::new("."))),
        rerun,
    )
}

/// [`verified`] against the manifest file `manifest`.
pub fn verified_by(file: &Path, manifest: &Path, rerun: &str) -> Result<String, TrainError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !file.is_file() {
        return Err(TrainError::file(file, format!("missing (run `{rerun}`)")));
    }
    let m = Manifest::read_at(manifest).map_err(|_| {
        TrainError::file(
            file,
            format!(
                "no finished run vouches for it: {} is missing or unreadable (the run that writes \
                 it did not finish, or the file was not made by this pipeline); run `{rerun}`",
                manifest.display()
            ),
        )
    })?;
    let t0 = std::time::Instant::now();
    let sha = kd_data::sha256_file(file)?;
    match m.outputs.get(&name) {
        Some(recorded) if *recorded == sha => {
            let mib = std::fs::metadata(file).map_or(0.0, |m| m.len() as f64 / (1 << 20) as f64);
            tracing::info!(
                "verified {} against {} ({mib:.1} MiB hashed in {:.0} ms)",
                file.display(),
                manifest.display(),
                1e3 * t0.elapsed().as_secs_f64()
            );
            Ok(sha)
        }
        Some(recorded) => Err(TrainError::file(
            file,
            format!(
                "does not match {} (SHA-256 {}, recorded {}): it was changed after the run that \
                 wrote it; run `{rerun}` again",
                manifest.display(),
                short(&sha),
                short(recorded)
            ),
        )),
        None => Err(TrainError::file(
            file,
            format!(
                "is not among the outputs {} records; run `{rerun}`",
                manifest.display()
            ),
        )),
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// One writer per run folder: an advisory lock on `<dir>/<name>` held while the run writes.
/// The operating system releases it when the process ends, however it ends, so a lock left by
/// a killed run never blocks the next.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `dir` (`.lock`), or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, TrainError> {
        Self::acquire_named(dir, ".lock")
    }

    /// Takes the lock file `name` in `dir` (several runs sharing a folder lock their own).
    pub fn acquire_named(dir: &Path, name: &str) -> Result<Self, TrainError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| TrainError::file(dir, format!("cannot create: {e}")))?;
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| TrainError::file(&path, format!("cannot open the run lock: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(TrainError::Other(format!(
                    "{} is being written by another run, already running (pid {}); wait for it \
                     or stop it",
                    dir.display(),
                    pid.trim()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(TrainError::file(&path, format!("cannot lock: {e}")))
            }
        }
        // Ours now: say who holds it.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(Self { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("already running") && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        // Another lock file in the same folder is another run's.
        RunLock::acquire_named(dir.path(), ".other.lock").unwrap();
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn files_are_trusted_only_as_their_manifest_records_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("model.safetensors");
        std::fs::write(&f, b"weights").unwrap();
        let e = verified(&f, "just teacher").unwrap_err().to_string();
        assert!(
            e.contains("no finished run") && e.contains("just teacher"),
            "{e}"
        );
        let m = Manifest::start("teacher", "p", "k".into());
        m.write(dir.path(), &["model.safetensors"]).unwrap();
        assert_eq!(
            verified(&f, "x").unwrap(),
            kd_data::sha256_file(&f).unwrap()
        );
        std::fs::write(&f, b"weighty").unwrap();
        let e = verified(&f, "just teacher").unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("manifest.json") && e.contains("changed"),
            "{e}"
        );
        let other = dir.path().join("other.bin");
        std::fs::write(&other, b"x").unwrap();
        assert!(verified(&other, "x")
            .unwrap_err()
            .to_string()
            .contains("not among the outputs"));
    }
}
