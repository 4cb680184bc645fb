//! Plans: which stage runs an experiment is made of, with their tags, flags and records.
//!
//! Tags: `seed-<S>` for the plain students of seed S, `seed-<S>-<variant>` for a variant's;
//! teachers and knowledge files of a label count under `labels-<N>`, multi-view files under
//! `[labels-<N>-]views-<K>`, compact ones under `[labels-<N>-]storage-<name>`. The tags only
//! keep runs apart: what a run is and what it is held against is in its manifest.

use crate::{Args, Command};
use kd_train::experiment::{ExperimentConfig, HeadSet, LabelCount, Storage};
use kd_train::record::Study;
use kd_train::stage::layout::{
    CHECKPOINT, KNOWLEDGE, KNOWLEDGE_FILE, STUDENT_BASELINE, STUDENT_KD, TEACHER,
};
use kd_train::stage::stage_name;
use kd_train::{Pipeline, PipelineArgs};
use std::path::PathBuf;

/// One stage run: a binary and its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub binary: &'static str,
    pub args: Vec<String>,
}

impl Step {
    /// The stage it runs: the binary's name without `kd-`, `baseline` for the label-only student.
    pub fn stage(&self) -> &str {
        if self.args.iter().any(|a| a == "--baseline") {
            return "baseline";
        }
        self.binary.strip_prefix("kd-").unwrap_or(self.binary)
    }

    pub fn command_line(&self) -> String {
        std::iter::once(self.binary.to_string())
            .chain(self.args.iter().map(|a| shell_word(a)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `a` as one shell word (quoted when it holds anything but plain characters).
fn shell_word(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// The plan of `args.command` on `pipeline`.
pub fn plan(args: &Args, pipeline: &Pipeline) -> anyhow::Result<Vec<Step>> {
    let mut p = Planner {
        common: common_flags(&args.pipeline),
        pipeline,
        cfg: &pipeline.config.experiment,
        student_flags: &args.student_flags,
        steps: vec![],
    };
    p.pipeline_stages();
    match args.command {
        Command::Pipeline => {}
        Command::Compare => {
            for &labels in &p.cfg.labels {
                p.label_count(labels);
            }
        }
        Command::Sweep => p.sweep(),
    }
    // The distilled student as ONNX, checked by ONNX Runtime when a Python has it; then the
    // report, which shows it.
    p.step("kd-export", vec![]);
    p.step("kd-report", vec![]);
    Ok(p.steps)
}

/// The flags every stage gets: the pipeline file, the artifacts and the user's overrides.
fn common_flags(a: &PipelineArgs) -> Vec<String> {
    let mut v = vec![
        "--pipeline".to_string(),
        a.pipeline.display().to_string(),
        "--artifacts".into(),
        a.artifacts.display().to_string(),
    ];
    for s in &a.overrides {
        v.extend(["--set".to_string(), s.clone()]);
    }
    if let Some(d) = &a.data_dir {
        v.extend(["--data-dir".to_string(), d.display().to_string()]);
    }
    if let Some(d) = a.device {
        v.extend(["--device".to_string(), d.to_string()]);
    }
    for (on, flag) in [
        (a.force, "--force"),
        (a.resume, "--resume"),
        (a.skip_bad_images, "--skip-bad-images"),
    ] {
        if on {
            v.push(flag.into());
        }
    }
    v
}

/// `a-b-c` of the non-empty parts.
fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("-")
}

/// What the runs of one label count share: the data flags, the teacher and the tag prefix.
struct Scope {
    /// `["--set", "data.labels=N"]`, or nothing for every label.
    sets: Vec<String>,
    /// `labels-N`, or "" for every label.
    name: String,
    teacher: PathBuf,
}

/// A student run's place in the experiment.
struct Record<'a> {
    variant: &'a str,
    control: Option<String>,
    reference: Option<String>,
}

struct Planner<'a> {
    common: Vec<String>,
    pipeline: &'a Pipeline,
    cfg: &'a ExperimentConfig,
    student_flags: &'a [String],
    steps: Vec<Step>,
}

impl Planner<'_> {
    fn step(&mut self, binary: &'static str, extra: Vec<String>) {
        let mut args = self.common.clone();
        args.extend(extra);
        self.steps.push(Step { binary, args });
    }

    fn pipeline_stages(&mut self) {
        self.step("kd-teacher", vec![]);
        self.step("kd-precompute", vec![]);
        self.step("kd-student", vec![]);
        self.step("kd-student", vec!["--baseline".into()]);
    }

    /// The knowledge file of a tagged (or the pipeline's own) precompute.
    fn knowledge(&self, tag: &str) -> PathBuf {
        let tag = (!tag.is_empty()).then_some(tag);
        self.pipeline
            .dir(&stage_name(KNOWLEDGE, tag))
            .join(KNOWLEDGE_FILE)
    }

    /// A precompute for `scope` under `tag` with `extra` flags; its knowledge file.
    fn precompute(&mut self, scope: &Scope, tag: &str, extra: &[String]) -> PathBuf {
        let mut args = scope.sets.clone();
        args.extend(["--teacher".into(), scope.teacher.display().to_string()]);
        args.extend(["--tag".into(), tag.to_string()]);
        args.extend_from_slice(extra);
        self.step("kd-precompute", args);
        self.knowledge(tag)
    }

    /// The teacher and knowledge of a label count (the pipeline's own for every label), then
    /// its students for every seed.
    fn label_count(&mut self, labels: LabelCount) {
        let scope = match labels {
            LabelCount::All => Scope {
                sets: vec![],
                name: String::new(),
                teacher: self.pipeline.dir(TEACHER).join(CHECKPOINT),
            },
            LabelCount::Count(n) => {
                let name = format!("labels-{n}");
                let sets = vec!["--set".to_string(), format!("data.labels={n}")];
                let mut args = sets.clone();
                args.extend(["--tag".into(), name.clone()]);
                if let Some(e) = self
                    .cfg
                    .labels_teacher_epochs
                    .as_ref()
                    .and_then(|t| t.of(n))
                {
                    args.extend(["--epochs".into(), e.to_string()]);
                }
                args.extend(record_flags(Study::Seeds, &name, None, None));
                self.step("kd-teacher", args);
                let teacher = self
                    .pipeline
                    .dir(&stage_name(TEACHER, Some(&name)))
                    .join(CHECKPOINT);
                let scope = Scope {
                    sets,
                    name,
                    teacher,
                };
                let tag = scope.name.clone();
                self.precompute(&scope, &tag, &[]);
                scope
            }
        };
        let knowledge = self.knowledge(&scope.name);
        let views = (self.cfg.views > 1).then(|| {
            let k = self.cfg.views;
            let tag = join(&[&scope.name, &format!("views-{k}")]);
            self.precompute(&scope, &tag, &["--views".into(), k.to_string()])
        });
        let storage: Vec<(Storage, PathBuf)> = self
            .cfg
            .storage
            .clone()
            .into_iter()
            .map(|st| {
                let tag = join(&[&scope.name, &format!("storage-{st}")]);
                (st, self.precompute(&scope, &tag, &storage_flags(st)))
            })
            .collect();
        for seed in 0..self.cfg.seeds as u64 {
            let variant = join(&[&self.cfg.variant, &scope.name]);
            self.seed_runs(&scope, seed, &variant, &knowledge, views.as_ref(), &storage);
        }
    }

    /// One seed's students of one label count: KD and baseline; the augmented ones and K-view
    /// KD; KD from each compact file.
    fn seed_runs(
        &mut self,
        scope: &Scope,
        seed: u64,
        variant: &str,
        knowledge: &std::path::Path,
        views: Option<&PathBuf>,
        storage: &[(Storage, PathBuf)],
    ) {
        let tag = join(&[&format!("seed-{seed}"), variant]);
        let run = |stage: &str, tag: &str| Some(stage_name(stage, Some(tag)));
        self.students(scope, seed, &tag, variant, knowledge, &[]);
        if let Some(views_file) = views {
            let aug = ["--set".to_string(), "student.augment=true".into()];
            let (aug_variant, aug_tag) = (join(&[variant, "aug"]), join(&[&tag, "aug"]));
            self.students(scope, seed, &aug_tag, &aug_variant, knowledge, &aug);
            let k = self.cfg.views;
            let record = Record {
                variant: &join(&[variant, &format!("views{k}")]),
                control: run(STUDENT_BASELINE, &aug_tag),
                reference: run(STUDENT_KD, &aug_tag),
            };
            let tag = join(&[&tag, &format!("views{k}")]);
            self.student(scope, seed, &tag, &record, Some(views_file), &aug);
        }
        for (st, file) in storage {
            let record = Record {
                variant: &join(&[variant, &st.to_string()]),
                control: run(STUDENT_BASELINE, &tag),
                reference: run(STUDENT_KD, &tag),
            };
            let st_tag = join(&[&tag, &st.to_string()]);
            self.student(scope, seed, &st_tag, &record, Some(file), &[]);
        }
    }

    /// A KD student held against the baseline of the same tag, and that baseline.
    fn students(
        &mut self,
        scope: &Scope,
        seed: u64,
        tag: &str,
        variant: &str,
        knowledge: &std::path::Path,
        extra: &[String],
    ) {
        let kd = Record {
            variant,
            control: Some(stage_name(STUDENT_BASELINE, Some(tag))),
            reference: None,
        };
        self.student(scope, seed, tag, &kd, Some(knowledge), extra);
        let baseline = Record {
            variant,
            control: None,
            reference: None,
        };
        self.student(scope, seed, tag, &baseline, None, extra);
    }

    /// One student run: KD from `knowledge`, or the baseline without it.
    fn student(
        &mut self,
        scope: &Scope,
        seed: u64,
        tag: &str,
        record: &Record,
        knowledge: Option<&std::path::Path>,
        extra: &[String],
    ) {
        let mut args = scope.sets.clone();
        match knowledge {
            Some(k) => args.extend(["--knowledge".into(), k.display().to_string()]),
            None => args.push("--baseline".into()),
        }
        args.extend([
            "--seed".into(),
            seed.to_string(),
            "--tag".into(),
            tag.into(),
        ]);
        args.extend_from_slice(extra);
        args.extend(record_flags(
            Study::Seeds,
            record.variant,
            record.control.as_deref(),
            record.reference.as_deref(),
        ));
        args.extend_from_slice(self.student_flags);
        self.step("kd-student", args);
    }

    /// A KD student per point of the grid: heads × weights × temperatures.
    fn sweep(&mut self) {
        let grid = self.cfg.sweep.clone();
        for heads in &grid.heads {
            let (name, aux) = match heads {
                HeadSet::Main => ("main", 0.0),
                HeadSet::All => ("all", 0.3),
            };
            for w in &grid.weights {
                for t in &grid.temperatures {
                    let mut args = vec![
                        "--tag".to_string(),
                        format!("sweep-T{t}-w{}-{}-{name}", w.hard, w.soft),
                        "--temperature".into(),
                        t.to_string(),
                    ];
                    for set in [
                        format!("student.hard_weight={}", w.hard),
                        format!("student.soft_weight={}", w.soft),
                        "student.head_weights.main=1".to_string(),
                        format!("student.head_weights.aux1={aux}"),
                        format!("student.head_weights.aux2={aux}"),
                    ] {
                        args.extend(["--set".to_string(), set]);
                    }
                    args.extend(record_flags(Study::Sweep, "", None, None));
                    args.extend_from_slice(self.student_flags);
                    self.step("kd-student", args);
                }
            }
        }
    }
}

/// The hidden flags that file a run in its manifest.
fn record_flags(
    study: Study,
    variant: &str,
    control: Option<&str>,
    reference: Option<&str>,
) -> Vec<String> {
    let study = match study {
        Study::Seeds => "seeds",
        Study::Sweep => "sweep",
    };
    let mut v = vec!["--study".to_string(), study.into()];
    if !variant.is_empty() {
        v.extend(["--variant".to_string(), variant.to_string()]);
    }
    for (flag, value) in [("--control", control), ("--reference", reference)] {
        if let Some(x) = value {
            v.extend([flag.to_string(), x.to_string()]);
        }
    }
    v
}

/// The precompute flags of a compact storage.
fn storage_flags(st: Storage) -> Vec<String> {
    let mut v = vec![];
    if st.f16 {
        v.extend(["--dtype".to_string(), "f16".into()]);
    }
    if let Some(k) = st.top_k {
        v.extend(["--top-k".to_string(), k.to_string()]);
    }
    v
}
