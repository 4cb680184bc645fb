//! One run of the whole smoke pipeline, shared by the tests that only read its outputs.

use clap::Parser;
use kd_train::Manifest;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn smoke_pipeline() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/smoke.toml")
}

/// The smoke pipeline's flags with outputs under `root`, as a stage parses them.
pub fn pipeline_args(root: &Path) -> kd_train::PipelineArgs {
    kd_train::PipelineArgs {
        pipeline: smoke_pipeline(),
        artifacts: root.to_path_buf(),
        overrides: vec![],
        data_dir: None,
        force: false,
        resume: false,
        skip_bad_images: false,
        device: None,
    }
}

/// Stage flags for the smoke pipeline writing under `root`, plus `extra`.
pub fn flags(bin: &str, root: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        bin.to_string(),
        "--pipeline".into(),
        smoke_pipeline().display().to_string(),
        "--artifacts".into(),
        root.display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub fn teacher(root: &Path, extra: &[&str]) -> anyhow::Result<Manifest> {
    kd_teacher::run(&kd_teacher::Args::try_parse_from(flags(
        "kd-teacher",
        root,
        extra,
    ))?)
}

pub fn precompute(root: &Path, extra: &[&str]) -> anyhow::Result<Manifest> {
    kd_precompute::run(&kd_precompute::Args::try_parse_from(flags(
        "kd-precompute",
        root,
        extra,
    ))?)?
    .into_manifest()
}

pub fn student(root: &Path, extra: &[&str]) -> anyhow::Result<Manifest> {
    kd_student::run(&kd_student::Args::try_parse_from(flags(
        "kd-student",
        root,
        extra,
    ))?)
}

/// The Python with onnx and onnxruntime that `just python-env` installs.
pub fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        p.is_file(),
        "{}: missing (run `just python-env`)",
        p.display()
    );
    p
}

/// `kd-export` with the ONNX Runtime check required.
pub fn export(root: &Path, extra: &[&str]) -> anyhow::Result<Manifest> {
    let mut argv = flags("kd-export", root, extra);
    argv.extend(["--check".into(), "always".into(), "--python".into()]);
    argv.push(python().display().to_string());
    kd_export::run(&kd_export::Args::try_parse_from(argv)?)
}

pub fn report(root: &Path, extra: &[&str]) -> anyhow::Result<Manifest> {
    kd_report::run(&kd_report::Args::try_parse_from(flags(
        "kd-report",
        root,
        extra,
    ))?)
}

/// The outputs of one full smoke run: `<root>/smoke/<stage>/...`.
pub struct Run {
    pub root: tempfile::TempDir,
    pub teacher: Manifest,
    pub knowledge: Manifest,
    pub student_kd: Manifest,
    pub baseline: Manifest,
    pub report: Manifest,
}

impl Run {
    pub fn dir(&self, stage: &str) -> PathBuf {
        self.root.path().join("smoke").join(stage)
    }
}

pub fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let root = tempfile::tempdir().expect("temp dir");
        let r = root.path();
        let teacher = teacher(r, &[]).expect("teacher");
        let knowledge = precompute(r, &[]).expect("precompute");
        let student_kd = student(r, &[]).expect("student");
        let baseline = student(r, &["--baseline"]).expect("baseline");
        let report = report(r, &[]).expect("report");
        Run {
            root,
            teacher,
            knowledge,
            student_kd,
            baseline,
            report,
        }
    })
}

/// A copy of the fixture's teacher and knowledge stages in a fresh root, for tests that write.
pub fn copy_upstream(run: &Run) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    for stage in ["teacher", "knowledge"] {
        let to = root.path().join("smoke").join(stage);
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in std::fs::read_dir(run.dir(stage)).expect("read_dir") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    root
}
