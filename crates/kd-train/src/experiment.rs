//! The `[experiment]` section of a pipeline file: what `just compare` and `just sweep` run —
//! seeds, label counts, augmented and compact-storage variants, the sweep's grid. Every value
//! can be overridden like any other (`--set experiment.seeds=5`); `kd-experiment` reads it and
//! runs the stages.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Every student is trained once per seed 0..seeds-1.
    #[serde(default = "three")]
    pub seeds: usize,
    /// Label counts to compare: numbers of labelled training images, or "all" (every label).
    #[serde(default = "every_label")]
    pub labels: Vec<LabelCount>,
    /// Epochs of a teacher trained on fewer labels (an epoch is as many steps as one pass over
    /// the whole training split): one number for every count, or a table by count
    /// (`{ 1000 = 4, 5000 = 12 }`) [default: teacher.epochs].
    #[serde(default)]
    pub labels_teacher_epochs: Option<TeacherEpochs>,
    /// K > 1 adds augmented students: the augmented baseline, single-view KD and K-view KD.
    #[serde(default = "one")]
    pub views: usize,
    /// Compact knowledge files to distil from beside the f32 one.
    #[serde(default)]
    pub storage: Vec<Storage>,
    /// A name for students trained with extra flags (`kd-experiment compare -- --epochs 30`), so
    /// they sit beside the plain ones.
    #[serde(default)]
    pub variant: String,
    #[serde(default)]
    pub sweep: SweepConfig,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        Self {
            seeds: 3,
            labels: every_label(),
            labels_teacher_epochs: None,
            views: 1,
            storage: vec![],
            variant: String::new(),
            sweep: SweepConfig::default(),
        }
    }
}

/// The teacher's epochs on fewer labels: the same for every count, or by count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TeacherEpochs {
    Every(usize),
    PerCount(std::collections::BTreeMap<String, usize>),
}

impl TeacherEpochs {
    /// The epochs for a teacher on `labels` labelled images, if set for that count.
    pub fn of(&self, labels: usize) -> Option<usize> {
        match self {
            TeacherEpochs::Every(e) => Some(*e),
            TeacherEpochs::PerCount(m) => m.get(&labels.to_string()).copied(),
        }
    }
}

/// The grid of `just sweep`: KD students from the one knowledge file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    #[serde(default = "temperatures")]
    pub temperatures: Vec<f64>,
    /// `hard:soft` loss weights, e.g. "0.55:0.45".
    #[serde(default = "weights")]
    pub weights: Vec<Weights>,
    #[serde(default = "head_sets")]
    pub heads: Vec<HeadSet>,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            temperatures: temperatures(),
            weights: weights(),
            heads: head_sets(),
        }
    }
}

/// A number of labelled training images, or every label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "NumberOrWord", into = "NumberOrWord")]
pub enum LabelCount {
    Count(usize),
    All,
}

/// A compact knowledge file: f16 logits and/or the top k per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Storage {
    pub f16: bool,
    pub top_k: Option<usize>,
}

/// `hard:soft` weights of the KD loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Weights {
    pub hard: f64,
    pub soft: f64,
}

/// Which teacher heads a sweep point learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadSet {
    /// The main head alone.
    Main,
    /// The main head and both auxiliary heads at 0.3, as the seed.
    All,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum NumberOrWord {
    Number(usize),
    Word(String),
}

impl TryFrom<NumberOrWord> for LabelCount {
    type Error = String;
    fn try_from(v: NumberOrWord) -> Result<Self, String> {
        match v {
            NumberOrWord::Number(0) => Err("a label count must be at least 1".into()),
            NumberOrWord::Number(n) => Ok(LabelCount::Count(n)),
            NumberOrWord::Word(w) if w == "all" => Ok(LabelCount::All),
            NumberOrWord::Word(w) => w
                .parse::<usize>()
                .map_err(|_| format!("label count {w:?}: a number of images or \"all\""))
                .and_then(|n| LabelCount::try_from(NumberOrWord::Number(n))),
        }
    }
}

impl From<LabelCount> for NumberOrWord {
    fn from(c: LabelCount) -> Self {
        match c {
            LabelCount::Count(n) => NumberOrWord::Number(n),
            LabelCount::All => NumberOrWord::Word("all".into()),
        }
    }
}

impl TryFrom<String> for Storage {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("storage {s:?}: f16, top<K> or top<K>-f16");
        let (top, f16) = match s.strip_suffix("-f16") {
            Some(top) => (Some(top), true),
            None if s == "f16" => (None, true),
            None => (Some(s.as_str()), false),
        };
        let top_k = match top {
            None => None,
            Some(t) => Some(
                t.strip_prefix("top")
                    .and_then(|k| k.parse::<usize>().ok())
                    .filter(|k| *k > 0)
                    .ok_or_else(bad)?,
            ),
        };
        Ok(Storage { f16, top_k })
    }
}

impl From<Storage> for String {
    fn from(s: Storage) -> String {
        match (s.top_k, s.f16) {
            (None, _) => "f16".into(),
            (Some(k), false) => format!("top{k}"),
            (Some(k), true) => format!("top{k}-f16"),
        }
    }
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from(*self))
    }
}

impl TryFrom<String> for Weights {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let parse = |x: &str| {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|w| *w >= 0.0 && w.is_finite())
        };
        match s.split_once(':').map(|(h, w)| (parse(h), parse(w))) {
            Some((Some(hard), Some(soft))) => Ok(Weights { hard, soft }),
            _ => Err(format!("weights {s:?}: hard:soft, e.g. \"0.55:0.45\"")),
        }
    }
}

impl From<Weights> for String {
    fn from(w: Weights) -> String {
        format!("{}:{}", w.hard, w.soft)
    }
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn every_label() -> Vec<LabelCount> {
    vec![LabelCount::All]
}
fn temperatures() -> Vec<f64> {
    vec![1.0, 2.0, 4.0, 8.0]
}
fn weights() -> Vec<Weights> {
    vec![
        Weights {
            hard: 0.55,
            soft: 0.45,
        },
        Weights {
            hard: 0.1,
            soft: 0.9,
        },
    ]
}
fn head_sets() -> Vec<HeadSet> {
    vec![HeadSet::Main, HeadSet::All]
}

impl ExperimentConfig {
    /// Refuses values no experiment can run, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.seeds == 0 {
            return Err("experiment.seeds must be at least 1".into());
        }
        if self.labels.is_empty() {
            return Err("experiment.labels must name at least one label count (or \"all\")".into());
        }
        let teacher_epochs = match &self.labels_teacher_epochs {
            Some(TeacherEpochs::Every(e)) => vec![*e],
            Some(TeacherEpochs::PerCount(m)) => m.values().copied().collect(),
            None => vec![],
        };
        if let Some(TeacherEpochs::PerCount(m)) = &self.labels_teacher_epochs {
            if let Some(k) = m.keys().find(|k| k.parse::<usize>().is_err()) {
                return Err(format!(
                    "experiment.labels_teacher_epochs: \"{k}\" is not a label count (a table by count: {{ 1000 = 4, 5000 = 12 }})"
                ));
            }
        }
        if self.views == 0 || teacher_epochs.contains(&0) {
            return Err(
                "experiment.views and experiment.labels_teacher_epochs must be at least 1".into(),
            );
        }
        if let Some(t) = self
            .sweep
            .temperatures
            .iter()
            .find(|t| !(**t > 0.0 && t.is_finite()))
        {
            return Err(format!(
                "experiment.sweep.temperatures: {t} is not a positive number"
            ));
        }
        if !self.variant.is_empty() {
            crate::layout::check_tag(&self.variant)
                .map_err(|e| format!("experiment.variant: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        experiment: ExperimentConfig,
    }

    fn parse(text: &str) -> Result<ExperimentConfig, String> {
        toml::from_str::<Doc>(text)
            .map(|d| d.experiment)
            .map_err(|e| e.message().to_string())
    }

    /// The teacher's epochs on fewer labels: one number for every count, or a table by count;
    /// a count the table leaves out gets the teacher's own epochs, a key that is not a count or
    /// a zero is refused by name.
    #[test]
    fn teacher_epochs_by_label_count() {
        let every = parse("[experiment]\nlabels_teacher_epochs = 12\n").unwrap();
        assert_eq!(every.labels_teacher_epochs.unwrap().of(1000), Some(12));
        let table =
            parse("[experiment]\nlabels_teacher_epochs = { 1000 = 4, 5000 = 12 }\n").unwrap();
        table.validate().unwrap();
        let t = table.labels_teacher_epochs.unwrap();
        assert_eq!(
            (t.of(1000), t.of(5000), t.of(2000)),
            (Some(4), Some(12), None)
        );
        let bad = parse("[experiment]\nlabels_teacher_epochs = { many = 4 }\n").unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("\"many\" is not a label count"));
        let zero = parse("[experiment]\nlabels_teacher_epochs = { 1000 = 0 }\n").unwrap();
        assert!(zero
            .validate()
            .unwrap_err()
            .contains("labels_teacher_epochs"));
    }

    #[test]
    fn typed_values_parse_and_print_back() {
        let e = parse(
            "[experiment]\nseeds = 2\nlabels = [1000, \"5000\", \"all\"]\nstorage = [\"f16\", \"top3\", \"top3-f16\"]\n\
             [experiment.sweep]\nweights = [\"0.1:0.9\"]\nheads = [\"main\"]\n",
        )
        .unwrap();
        assert_eq!(e.seeds, 2);
        assert_eq!(
            e.labels,
            [
                LabelCount::Count(1000),
                LabelCount::Count(5000),
                LabelCount::All
            ]
        );
        let names: Vec<String> = e.storage.iter().map(|s| s.to_string()).collect();
        assert_eq!(names, ["f16", "top3", "top3-f16"]);
        assert_eq!(
            e.storage[2],
            Storage {
                f16: true,
                top_k: Some(3)
            }
        );
        assert_eq!(
            e.sweep.weights,
            [Weights {
                hard: 0.1,
                soft: 0.9
            }]
        );
        assert_eq!(e.sweep.temperatures, [1.0, 2.0, 4.0, 8.0]);
        assert_eq!(
            parse("[experiment]\n").unwrap(),
            ExperimentConfig::default()
        );
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (text, want) in [
            ("labels = [\"most\"]", "label count \"most\""),
            ("labels = [0]", "at least 1"),
            ("storage = [\"top\"]", "storage \"top\""),
            ("storage = [\"f8\"]", "storage \"f8\""),
            ("sweep.weights = [\"0.5\"]", "weights \"0.5\""),
            ("sweep.heads = [\"aux\"]", "aux"),
            ("seed = 3", "seed"),
        ] {
            let e = parse(&format!("[experiment]\n{text}\n")).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = ExperimentConfig {
            seeds: 0,
            ..Default::default()
        };
        assert!(e.validate().unwrap_err().contains("experiment.seeds"));
    }
}
