//! Stages that check each other, with the real binaries where the case is about a process:
//! a killed retrain leaves the committed run as it was, damaged bytes are refused by the next
//! stage, two writers of one folder are not allowed, a teacher that outputs NaN changes nothing,
//! data shapes are checked before training, and every binary stops on a signal.

use crate::fixture::{
    copy_upstream, pipeline_args, precompute, report, run, smoke_pipeline, student,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A stage binary of this build (`target/release/`, beside the test binary's `deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let release = exe.parent().unwrap().parent().unwrap();
    let p = release.join(name);
    assert!(p.is_file(), "{}: missing (run `just build`)", p.display());
    p
}

/// `name` on the smoke pipeline with outputs under `root`, stderr piped.
fn command(name: &str, root: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(binary(name));
    c.arg("--pipeline")
        .arg(smoke_pipeline())
        .arg("--artifacts")
        .arg(root)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Waits until the child's stderr has shown `text` (and returns what it showed), or panics.
fn wait_for(child: &mut Child, text: &str) -> String {
    use std::io::Read;
    let stderr = child.stderr.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let n = stderr.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "exited before {text:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains(text) {
            return String::from_utf8_lossy(&seen).into_owned();
        }
    }
    panic!("no {text:?} within 300 s")
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// The process exits with 130, the status of a run stopped by a signal (stderr shown if not).
fn stopped_by_the_signal(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fixture's students copied beside its teacher and knowledge in `r`.
fn copy_students(r: &Path) {
    for stage in ["student-kd", "student-baseline"] {
        let to = r.join("smoke").join(stage);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(run().dir(stage)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Case 1: a retrain killed mid-epoch leaves the committed teacher and its manifest as they
/// were, so the precompute after it is still up to date; damaged bytes are refused by the next
/// stage, naming both files.
#[test]
fn a_killed_retrain_changes_nothing_and_damaged_bytes_are_refused() {
    let fixture = run();
    let root = copy_upstream(fixture);
    let r = root.path();
    let teacher = r.join("smoke/teacher");
    let (ckpt, manifest) = (
        bytes(&teacher.join("model.safetensors")),
        bytes(&teacher.join("manifest.json")),
    );
    let mut child = command("kd-teacher", r, &["--epochs", "3", "--force"])
        .spawn()
        .unwrap();
    wait_for(&mut child, "epoch 1/3: loss");
    signal(&child, "-KILL");
    child.wait().unwrap();
    assert!(
        bytes(&teacher.join("model.safetensors")) == ckpt
            && bytes(&teacher.join("manifest.json")) == manifest
    );
    let m = precompute(r, &[]).unwrap();
    assert_eq!(m.key, fixture.knowledge.key, "the same teacher: up to date");

    // One byte of the teacher flipped: the precompute refuses it.
    let mut flipped = ckpt.clone();
    let at = flipped.len() - 5;
    flipped[at] ^= 0x10;
    std::fs::write(teacher.join("model.safetensors"), &flipped).unwrap();
    let e = format!("{:#}", precompute(r, &["--force"]).unwrap_err());
    assert!(
        e.contains("teacher/model.safetensors")
            && e.contains("teacher/manifest.json")
            && e.contains("changed"),
        "{e}"
    );
    std::fs::write(teacher.join("model.safetensors"), &ckpt).unwrap();

    // One logit's exponent flipped in the knowledge file: the student refuses it.
    let k = r.join("smoke/knowledge/soft-targets.safetensors");
    let good = bytes(&k);
    let mut bad = good.clone();
    let header = u64::from_le_bytes(bad[..8].try_into().unwrap()) as usize;
    bad[8 + header + 3] ^= 0x40;
    std::fs::write(&k, &bad).unwrap();
    let e = format!("{:#}", student(r, &["--tag", "k"]).unwrap_err());
    assert!(
        e.contains("soft-targets.safetensors") && e.contains("knowledge/manifest.json"),
        "{e}"
    );
    assert!(!r.join("smoke/runs/k/student-kd/model.safetensors").exists());
    std::fs::write(&k, &good).unwrap();

    // A truncated file over the student's checkpoint: the report refuses, it is not "up to date".
    copy_students(r);
    report(r, &[]).unwrap();
    let s = r.join("smoke/student-kd/model.safetensors");
    let whole = bytes(&s);
    std::fs::write(&s, &whole[..whole.len() / 2]).unwrap();
    let e = format!("{:#}", report(r, &[]).unwrap_err());
    assert!(
        e.contains("student-kd/model.safetensors") && e.contains("does not match"),
        "{e}"
    );
}

/// Case 2: a second run of the same stage and tag is refused while the first writes, naming
/// its pid; the first finishes alone; a lock left by a killed run does not block.
#[test]
fn one_writer_per_run_folder() {
    let root = copy_upstream(run());
    let r = root.path();
    let slow = ["--tag", "race", "--epochs", "60", "--lr", "1e-9"];
    let mut first = command("kd-student", r, &slow).spawn().unwrap();
    wait_for(&mut first, "epoch 1/60");
    let out = command("kd-student", r, &["--tag", "race", "--epochs", "4"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already running") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    signal(&first, "-KILL");
    first.wait().unwrap();
    let dir = r.join("smoke/runs/race/student-kd");
    assert!(!dir.join("manifest.json").exists() && !dir.join("model.safetensors").exists());
    // The killed run's lock is gone with it: the next run takes the folder.
    let out = command("kd-student", r, &["--tag", "race", "--epochs", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = kd_train::Manifest::read(&dir).unwrap();
    assert_eq!(m.training().unwrap().fit.epochs.len(), 1);
}

/// Case 3: a teacher whose weights give NaN (vouched for by a manifest) is refused by the
/// precompute, naming the teacher, and the good knowledge file stays; kd-predict refuses too.
#[test]
fn a_nan_teacher_changes_nothing() {
    let root = copy_upstream(run());
    let r = root.path();
    let nan_dir = r.join("smoke/runs/nan/teacher");
    std::fs::create_dir_all(&nan_dir).unwrap();
    for f in ["manifest.json", "class_indices.json"] {
        std::fs::copy(r.join("smoke/teacher").join(f), nan_dir.join(f)).unwrap();
    }
    let mut w = candle_core::safetensors::load(
        r.join("smoke/teacher/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let fc = w["fc.bias"].to_vec1::<f32>().unwrap();
    let mut poisoned = fc.clone();
    poisoned[0] = f32::NAN;
    w.insert(
        "fc.bias".into(),
        candle_core::Tensor::new(poisoned.as_slice(), &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, nan_dir.join("model.safetensors")).unwrap();
    kd_train::Manifest::read(&nan_dir)
        .unwrap()
        .write(&nan_dir, &["model.safetensors", "class_indices.json"])
        .unwrap();
    let k = r.join("smoke/knowledge/soft-targets.safetensors");
    let before = (bytes(&k), bytes(&r.join("smoke/knowledge/manifest.json")));
    let nan_ckpt = nan_dir.join("model.safetensors");
    let e = format!(
        "{:#}",
        precompute(r, &["--force", "--teacher", nan_ckpt.to_str().unwrap()]).unwrap_err()
    );
    assert!(
        e.contains("runs/nan/teacher/model.safetensors") && e.contains("non-finite"),
        "{e}"
    );
    assert!(
        before == (bytes(&k), bytes(&r.join("smoke/knowledge/manifest.json"))),
        "nothing on disk changed"
    );
    let image = r.join("one.png");
    image::GrayImage::from_pixel(28, 28, image::Luma([90]))
        .save(&image)
        .unwrap();
    let out = command(
        "kd-predict",
        r,
        &[
            "--model",
            "teacher",
            "--tag",
            "nan",
            image.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("non-finite") && err.contains("runs/nan/teacher/model.safetensors"),
        "{err}"
    );
}

/// Case 4: test images of another size than the training images, or images too small for the
/// model, are refused at load, before any training, naming the files and the shapes.
#[test]
fn data_shapes_are_checked_before_training() {
    use kd_data::idx::{encode_idx, read_idx};
    let src = Path::new(kd_data::fashion_mnist::DEBIAN_DIR);
    let data = tempfile::tempdir().unwrap();
    let write = |name: &str, dims: &[usize], px: &[u8]| {
        std::fs::write(data.path().join(name), encode_idx(dims, px)).unwrap();
    };
    let labels = read_idx(&src.join("train-labels-idx1-ubyte.gz"), 1).unwrap();
    let images = read_idx(&src.join("train-images-idx3-ubyte.gz"), 3).unwrap();
    write(
        "train-images-idx3-ubyte",
        &[600, 28, 28],
        &images.data[..600 * 784],
    );
    write("train-labels-idx1-ubyte", &[600], &labels.data[..600]);
    write(
        "t10k-images-idx3-ubyte",
        &[200, 20, 20],
        &vec![7u8; 200 * 400],
    );
    write("t10k-labels-idx1-ubyte", &[200], &labels.data[..200]);
    let root = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap();
    let e = format!(
        "{:#}",
        student(
            root.path(),
            &["--baseline", "--data-dir", d, "--set", "data.name=\"mine\""]
        )
        .unwrap_err()
    );
    assert!(
        e.contains(d) && e.contains("1x28x28") && e.contains("1x20x20"),
        "{e}"
    );
    // 1×1 images everywhere: the teacher's pools do not fit; refused before training.
    write("train-images-idx3-ubyte", &[600, 1, 1], &vec![9u8; 600]);
    write("t10k-images-idx3-ubyte", &[200, 1, 1], &[9u8; 200]);
    let e = format!(
        "{:#}",
        crate::fixture::teacher(
            root.path(),
            &["--data-dir", d, "--set", "data.name=\"mine\""]
        )
        .unwrap_err()
    );
    assert!(e.contains("googlenet does not take 1x1x1 images"), "{e}");
    assert!(!root
        .path()
        .join("smoke/teacher/best.partial.safetensors")
        .exists());
}

/// Case 5: precompute, report and predict stop within seconds on SIGTERM with exit code 130 and
/// leave no file behind; a second signal exits at once; predict lists a folder reached through
/// symlink loops once.
#[test]
fn every_binary_stops_on_a_signal() {
    let root = copy_upstream(run());
    let r = root.path();
    // The smoke teacher over all 60,000 training images: long enough to be interrupted.
    let all = [
        "--set",
        "data.train_limit=60000",
        "--set",
        "data.test_limit=10000",
        "--tag",
        "big",
    ];
    let mut child = command("kd-precompute", r, &all).spawn().unwrap();
    wait_for(&mut child, "precompute: googlenet");
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    signal(&child, "-TERM");
    stopped_by_the_signal(child);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "stopped in {:?}",
        t0.elapsed()
    );
    let dir = r.join("smoke/runs/big/knowledge");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|f| f == ".lock"), "left behind: {left:?}");
    // A second signal exits at once.
    let mut child = command("kd-precompute", r, &all).spawn().unwrap();
    wait_for(&mut child, "precompute: googlenet");
    signal(&child, "-INT");
    signal(&child, "-INT");
    assert_eq!(child.wait().unwrap().code(), Some(130));

    // The report over 10,000 test images, stopped while it measures.
    copy_students(r);
    let mut child = command(
        "kd-report",
        r,
        &["--set", "data.test_limit=10000", "--force"],
    )
    .spawn()
    .unwrap();
    wait_for(&mut child, "data: fashion-mnist");
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, "-TERM");
    stopped_by_the_signal(child);
    assert!(!r.join("smoke/report/report.md").exists());

    // kd-predict on a folder that links back to itself twice: each image once, then a signal
    // during a long run stops it.
    let photos = r.join("loop");
    std::fs::create_dir_all(&photos).unwrap();
    for i in 0..3u8 {
        image::GrayImage::from_pixel(28, 28, image::Luma([40 * i]))
            .save(photos.join(format!("{i}.png")))
            .unwrap();
    }
    std::os::unix::fs::symlink(&photos, photos.join("again")).unwrap();
    std::os::unix::fs::symlink(&photos, photos.join("and-again")).unwrap();
    std::os::unix::fs::symlink(photos.join("0.png"), photos.join("zero.png")).unwrap();
    let predictions = kd_predict::run(
        &clap::Parser::try_parse_from([
            "kd-predict".into(),
            "--pipeline".into(),
            smoke_pipeline().display().to_string(),
            "--artifacts".into(),
            r.display().to_string(),
            "--model".into(),
            "teacher".into(),
            photos.display().to_string(),
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(predictions.len(), 3, "each image once");
}

/// Case 6, the smaller points: a teacher under a tag beside the pipeline's, a KD student from
/// another teacher's knowledge named as such in the report, and settings refused by key.
#[test]
fn smaller_points_are_named() {
    let fixture = run();
    let root = copy_upstream(fixture);
    let r = root.path();
    // kd-teacher --tag: the pipeline's teacher stays.
    let before = bytes(&r.join("smoke/teacher/model.safetensors"));
    crate::fixture::teacher(r, &["--tag", "seed1", "--seed", "1"]).unwrap();
    assert!(bytes(&r.join("smoke/teacher/model.safetensors")) == before);
    // A KD student from the seed-1 teacher's knowledge, without a tag: the report says whose.
    precompute(r, &["--tag", "seed1"]).unwrap();
    let other = r.join("smoke/runs/seed1/knowledge/soft-targets.safetensors");
    student(r, &["--knowledge", other.to_str().unwrap()]).unwrap();
    student(r, &["--baseline"]).unwrap();
    report(r, &[]).unwrap();
    let md = std::fs::read_to_string(r.join("smoke/report/report.md")).unwrap();
    assert!(
        md.contains("learned from the knowledge of `runs/seed1/teacher`"),
        "{md}"
    );
    // Settings a run cannot use, refused by key before anything runs.
    let open = |set: &str| {
        pipeline_args(r)
            .open(&[set.to_string()])
            .map(drop)
            .unwrap_err()
            .to_string()
    };
    let both = pipeline_args(r)
        .open(&[
            "student.hard_weight=0".into(),
            "student.soft_weight=0".into(),
        ])
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(
        both.contains("student.hard_weight and student.soft_weight are both 0"),
        "{both}"
    );
    assert!(
        open("teacher.arch=\"resnet\"").contains("teacher.arch: unknown architecture \"resnet\"")
    );
    assert!(open("teacher.epochs=99999999999999999999").contains("teacher.epochs"));
    assert!(open("student.epochs=2000000").contains("student.epochs 2000000 is more than"));
    // A damaged resume state blocks the stage with a way out.
    let dir = r.join("smoke/runs/resume/student-kd");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("resume.safetensors"), b"half a file").unwrap();
    let e = format!("{:#}", student(r, &["--tag", "resume"]).unwrap_err());
    assert!(
        e.contains("resume.safetensors") && e.contains("--force"),
        "{e}"
    );
    student(r, &["--tag", "resume", "--force"]).unwrap();
}
