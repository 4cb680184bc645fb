//! `kd-experiment compare smoke seeds=2 labels="100 all"`: the pipeline's name and the
//! `[experiment]` shorthands of the command line, as `--set` overrides.

use crate::Args;

/// The shorthand keys and the `[experiment]` keys they set; lists are space- or
/// comma-separated.
const KEYS: [(&str, &str, Kind); 9] = [
    ("seeds", "seeds", Kind::Scalar),
    ("views", "views", Kind::Scalar),
    ("variant", "variant", Kind::Text),
    (
        "labels_teacher_epochs",
        "labels_teacher_epochs",
        Kind::Scalar,
    ),
    ("labels", "labels", Kind::List),
    ("storage", "storage", Kind::List),
    ("temps", "sweep.temperatures", Kind::Floats),
    ("weights", "sweep.weights", Kind::List),
    ("heads", "sweep.heads", Kind::List),
];

#[derive(Clone, Copy)]
enum Kind {
    Scalar,
    Text,
    List,
    Floats,
}

/// Takes the pipeline name (the first word without `=`) into `args.pipeline` and returns the
/// other words as `experiment.*` overrides.
pub fn apply(args: &mut Args) -> anyhow::Result<Vec<String>> {
    let mut sets = Vec::new();
    for (i, word) in args.words.iter().enumerate() {
        let Some((key, value)) = word.split_once('=') else {
            anyhow::ensure!(
                i == 0,
                "{word:?}: only the first word may name the pipeline; the others are KEY=VALUE"
            );
            args.pipeline.pipeline = format!("pipelines/{word}.toml").into();
            continue;
        };
        let (_, target, kind) = KEYS.iter().find(|(k, _, _)| *k == key).ok_or_else(|| {
            let known: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
            anyhow::anyhow!("{key}: not one of {}", known.join(", "))
        })?;
        sets.push(format!("experiment.{target}={}", toml_value(value, *kind)));
    }
    Ok(sets)
}

/// The value as TOML: numbers stay numbers, other items become strings.
fn toml_value(value: &str, kind: Kind) -> String {
    let item = |x: &str, floats: bool| match (x.parse::<f64>(), floats) {
        (Ok(f), true) => format!("{f:?}"),
        (Ok(_), false) => x.to_string(),
        (Err(_), _) => format!("{x:?}"),
    };
    match kind {
        Kind::Scalar => value.to_string(),
        Kind::Text => format!("{value:?}"),
        Kind::List | Kind::Floats => {
            let items: Vec<String> = value
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|x| !x.is_empty())
                .map(|x| item(x, matches!(kind, Kind::Floats)))
                .collect();
            format!("[{}]", items.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn words_become_the_pipeline_and_overrides() {
        let mut args = Args::try_parse_from([
            "kd-experiment",
            "compare",
            "smoke",
            "seeds=2",
            "labels=1000 5000 all",
            "storage=f16,top3-f16",
            "temps=1 2.5",
            "variant=e30",
        ])
        .unwrap();
        let sets = apply(&mut args).unwrap();
        assert_eq!(
            args.pipeline.pipeline,
            std::path::Path::new("pipelines/smoke.toml")
        );
        assert_eq!(
            sets,
            [
                "experiment.seeds=2",
                "experiment.labels=[1000, 5000, \"all\"]",
                "experiment.storage=[\"f16\", \"top3-f16\"]",
                "experiment.sweep.temperatures=[1.0, 2.5]",
                "experiment.variant=\"e30\"",
            ]
        );
        let mut bad = Args::try_parse_from(["kd-experiment", "compare", "seed=2"]).unwrap();
        assert!(apply(&mut bad)
            .unwrap_err()
            .to_string()
            .contains("seed: not one of"));
        let mut two = Args::try_parse_from(["kd-experiment", "compare", "a", "b"]).unwrap();
        assert!(apply(&mut two).unwrap_err().to_string().contains("\"b\""));
    }
}
