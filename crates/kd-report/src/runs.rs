//! Every run of a pipeline — its own stages and the tagged runs under `runs/<tag>/` — read as
//! typed records, and how they link: a KD student to its control (its manifest says which) and
//! to its teacher (through the knowledge file's and the checkpoint's hashes).

use kd_train::record::{Study, TrainRecord};
use kd_train::stage::layout::{
    CHECKPOINT, KNOWLEDGE, KNOWLEDGE_FILE, RUNS, STUDENT_BASELINE, STUDENT_KD, TEACHER,
};
use kd_train::table::Table;
use kd_train::Manifest;
use std::path::Path;

/// What a run folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Teacher,
    Knowledge,
    StudentKd,
    StudentBaseline,
}

impl Kind {
    const ALL: [(Kind, &'static str); 4] = [
        (Kind::Teacher, TEACHER),
        (Kind::Knowledge, KNOWLEDGE),
        (Kind::StudentKd, STUDENT_KD),
        (Kind::StudentBaseline, STUDENT_BASELINE),
    ];
}

/// One finished run.
#[derive(Debug, Clone)]
pub struct Run {
    /// Its folder under the pipeline's artifacts: `student-kd`, `runs/seed-1/student-kd`.
    pub dir: String,
    pub kind: Kind,
    pub manifest: Manifest,
    /// A training stage's record (teacher and students).
    pub train: Option<TrainRecord>,
}

impl Run {
    pub fn test_accuracy(&self) -> f64 {
        self.train.as_ref().map_or(f64::NAN, |t| t.test_accuracy)
    }
    pub fn val_accuracy(&self) -> f64 {
        self.train
            .as_ref()
            .map_or(f64::NAN, |t| t.fit.best_val_accuracy)
    }
    pub fn seed(&self) -> u64 {
        self.manifest.seed.unwrap_or(0)
    }
    pub fn study(&self) -> Option<Study> {
        self.manifest.run.as_ref().and_then(|r| r.study)
    }
    pub fn variant(&self) -> &str {
        self.manifest
            .run
            .as_ref()
            .map_or("", |r| r.variant.as_str())
    }
    /// Labelled training images it learned from; `None`: every training image.
    pub fn labels(&self) -> Option<usize> {
        self.train.as_ref().and_then(|t| t.labelled_images)
    }
    /// The hash of one of its outputs.
    fn output(&self, file: &str) -> Option<&str> {
        self.manifest.outputs.get(file).map(String::as_str)
    }
}

/// Every run of a pipeline, sorted by folder.
#[derive(Debug, Default)]
pub struct Runs {
    pub all: Vec<Run>,
}

impl Runs {
    /// The pipeline's own stages and every tagged run with a readable manifest. A run folder
    /// without one (a run in progress or interrupted) is left out, as is a training stage whose
    /// metrics do not read as a training record.
    pub fn find(root: &Path) -> Self {
        let mut dirs: Vec<String> = Kind::ALL.iter().map(|(_, s)| s.to_string()).collect();
        if let Ok(tags) = std::fs::read_dir(root.join(RUNS)) {
            for tag in tags.flatten() {
                let tag = tag.file_name().to_string_lossy().into_owned();
                dirs.extend(Kind::ALL.iter().map(|(_, s)| format!("{RUNS}/{tag}/{s}")));
            }
        }
        let mut all: Vec<Run> = dirs
            .into_iter()
            .filter_map(|dir| {
                let manifest = Manifest::read(&root.join(&dir)).ok()?;
                let (kind, _) = Kind::ALL.iter().find(|(_, s)| dir.ends_with(s))?;
                let train = match kind {
                    Kind::Knowledge => None,
                    _ => Some(manifest.training().ok()?),
                };
                Some(Run {
                    dir,
                    kind: *kind,
                    manifest,
                    train,
                })
            })
            .collect();
        all.sort_by(|a, b| a.dir.cmp(&b.dir));
        Self { all }
    }

    pub fn at(&self, dir: &str) -> Option<&Run> {
        self.all.iter().find(|r| r.dir == dir)
    }

    /// The runs of one study.
    pub fn of(&self, study: Study) -> impl Iterator<Item = &Run> {
        self.all.iter().filter(move |r| r.study() == Some(study))
    }

    /// The run a student is held against (its manifest's control), if it is there.
    pub fn control_of(&self, run: &Run) -> Option<&Run> {
        self.at(run.manifest.run.as_ref()?.control.as_deref()?)
    }

    /// The second run a student is compared with (its manifest's reference), if it is there.
    pub fn reference_of(&self, run: &Run) -> Option<&Run> {
        self.at(run.manifest.run.as_ref()?.reference.as_deref()?)
    }

    /// The teacher a KD student learned from: the knowledge run that wrote the file it read
    /// (same SHA-256), and the teacher run that wrote that run's checkpoint.
    pub fn teacher_of(&self, kd: &Run) -> Option<&Run> {
        let file = kd.manifest.inputs.get("knowledge")?;
        let knowledge = self
            .all
            .iter()
            .find(|r| r.kind == Kind::Knowledge && r.output(KNOWLEDGE_FILE) == Some(file))?;
        let checkpoint = knowledge.manifest.inputs.get("teacher")?;
        self.all
            .iter()
            .find(|r| r.kind == Kind::Teacher && r.output(CHECKPOINT) == Some(checkpoint))
    }

    /// Every knowledge file of the pipeline: views, storage, size and bytes per training image.
    pub fn knowledge_table(&self) -> Table {
        let mut t = Table::new(&[
            "knowledge file",
            "views per image",
            "logits",
            "labelled rows",
            "size",
            "bytes per image",
        ]);
        for r in self.all.iter().filter(|r| r.kind == Kind::Knowledge) {
            let Ok(k) = r.manifest.knowledge() else {
                continue;
            };
            t.row(&[
                format!("`{}/{KNOWLEDGE_FILE}`", r.dir),
                k.views.to_string(),
                k.storage,
                k.labelled_rows.map_or("all".into(), |n| n.to_string()),
                format!("{:.1} MiB", k.bytes as f64 / (1 << 20) as f64),
                format!("{:.0}", k.bytes_per_image),
            ]);
        }
        t
    }
}
