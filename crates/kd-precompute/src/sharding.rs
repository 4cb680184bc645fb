//! Which shard this process computes: `--shard I/N`, or an array job's index from the job
//! engine's environment.
//!
//! | engine | index | number of shards |
//! |---|---|---|
//! | SLURM job array | `SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN` (÷ `SLURM_ARRAY_TASK_STEP`) | `SLURM_ARRAY_TASK_COUNT` |
//! | Kubernetes Indexed Job | `JOB_COMPLETION_INDEX` | `--shards N` (the Job's `completions`) |
//! | AWS Batch array job | `AWS_BATCH_JOB_ARRAY_INDEX` | `--shards N` (the array size) |
//!
//! With `--shards N` every engine's index is taken as it is, SLURM's too, so one task can be
//! resubmitted alone (`sbatch --array=1 ...` with `--shards 3` computes shard 1 of 3). Sources
//! that disagree are refused; `--no-shard` ignores the environment and computes the whole file.

use kd_knowledge::shard::ShardSpec;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ShardArgs {
    /// Compute only shard I of N (0-based), e.g. --shard 2/7, into
    /// <artifacts>/<pipeline>/knowledge/shards/. Without it, an array job's index is read from
    /// the environment (SLURM, Kubernetes Indexed Jobs, AWS Batch).
    #[arg(long, value_name = "I/N", conflicts_with = "no_shard")]
    pub shard: Option<ShardSpec>,
    /// The number of shards, for engines whose environment gives only the index
    /// (JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX); the environment's index is then used
    /// as it is (also SLURM_ARRAY_TASK_ID, so one array task can be resubmitted alone).
    #[arg(long, value_name = "N", conflicts_with = "no_shard")]
    pub shards: Option<usize>,
    /// Compute the whole knowledge file, even inside an array job.
    #[arg(long)]
    pub no_shard: bool,
}

/// The whole file, or one shard and what chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardChoice {
    Whole,
    Shard { spec: ShardSpec, source: String },
}

#[derive(Debug, thiserror::Error)]
#[error("choosing the shard: {0}")]
pub struct ShardError(pub String);

/// Decides from the flags and the environment (`env` reads a variable: `std::env::var` in the
/// binary, a table in tests).
pub fn choose(
    args: &ShardArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ShardChoice, ShardError> {
    if args.no_shard {
        return Ok(ShardChoice::Whole);
    }
    let sources = sources(args, env)?;
    if sources.is_empty() {
        return match args.shards {
            Some(n) => Err(ShardError(format!(
                "--shards {n} but no shard index: pass --shard I/{n}, or run as an array task (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX)"
            ))),
            None => Ok(ShardChoice::Whole),
        };
    }
    let mut resolved: Vec<(String, usize, usize)> = Vec::new();
    for (said, index, count) in sources {
        let count = match (count, args.shards) {
            (Some(c), Some(n)) if c != n => {
                return Err(ShardError(format!(
                    "{said} says {c} shards but --shards says {n}"
                )))
            }
            (Some(c), _) | (None, Some(c)) => c,
            (None, None) => {
                return Err(ShardError(format!(
                    "{said} gives the shard index but not the number of shards: pass --shards N"
                )))
            }
        };
        resolved.push((said, index, count));
    }
    let (first_said, index, count) = resolved[0].clone();
    if resolved.iter().any(|(_, i, c)| (*i, *c) != (index, count)) {
        let all: Vec<String> = resolved
            .iter()
            .map(|(s, i, c)| format!("{s} (shard {i}/{c})"))
            .collect();
        return Err(ShardError(format!(
            "conflicting shard sources: {}; keep one (--no-shard computes the whole file)",
            all.join(" vs ")
        )));
    }
    let spec =
        ShardSpec::new(index, count).map_err(|e| ShardError(format!("{first_said}: {e}")))?;
    let source = resolved
        .iter()
        .map(|(s, _, _)| s.as_str())
        .collect::<Vec<_>>()
        .join(" and ");
    Ok(ShardChoice::Shard { spec, source })
}

/// Everything that names a shard: `--shard`, and the job engines' environment variables, as
/// (what it said, the index, the number of shards if it says).
fn sources(
    args: &ShardArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, usize, Option<usize>)>, ShardError> {
    let number = |name: &str| -> Result<Option<usize>, ShardError> {
        match env(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| ShardError(format!("{name}={v:?} is not a whole number"))),
        }
    };
    let mut sources = Vec::new();
    if let Some(s) = args.shard {
        sources.push((format!("--shard {s}"), s.index, Some(s.count)));
    }
    if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
        if args.shards.is_some() {
            sources.push((format!("SLURM_ARRAY_TASK_ID={id}"), id, None));
        } else {
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let count = number("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                ShardError(format!(
                    "SLURM_ARRAY_TASK_ID={id} is set but SLURM_ARRAY_TASK_COUNT is not: pass --shards N"
                ))
            })?;
            let said = format!(
                "SLURM_ARRAY_TASK_ID={id}, SLURM_ARRAY_TASK_MIN={min}, SLURM_ARRAY_TASK_COUNT={count}"
            );
            if id < min || (id - min) % step != 0 {
                return Err(ShardError(format!(
                    "{said}: not a task of a contiguous array; submit with --array=0-(N-1), or pass --shards N to use the task id as the index"
                )));
            }
            sources.push((said, (id - min) / step, Some(count)));
        }
    }
    for name in ["JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"] {
        if let Some(i) = number(name)? {
            sources.push((format!("{name}={i}"), i, None));
        }
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn pick(args: ShardArgs, vars: &[(&str, &str)]) -> Result<ShardChoice, String> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        choose(&args, &|k| env.get(k).cloned()).map_err(|e| e.to_string())
    }

    fn spec(choice: Result<ShardChoice, String>) -> (usize, usize) {
        match choice {
            Ok(ShardChoice::Shard { spec, .. }) => (spec.index, spec.count),
            other => panic!("not a shard: {other:?}"),
        }
    }

    fn flag(s: &str) -> ShardArgs {
        ShardArgs {
            shard: Some(s.parse().unwrap()),
            ..Default::default()
        }
    }

    fn count(n: usize) -> ShardArgs {
        ShardArgs {
            shards: Some(n),
            ..Default::default()
        }
    }

    const SLURM: [(&str, &str); 4] = [
        ("SLURM_ARRAY_TASK_ID", "12"),
        ("SLURM_ARRAY_TASK_MIN", "10"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
        ("SLURM_ARRAY_JOB_ID", "77"),
    ];

    #[test]
    fn nothing_set_is_the_whole_file() {
        assert_eq!(pick(ShardArgs::default(), &[]), Ok(ShardChoice::Whole));
        let no = ShardArgs {
            no_shard: true,
            ..Default::default()
        };
        assert_eq!(pick(no, &SLURM), Ok(ShardChoice::Whole));
    }

    #[test]
    fn each_engine_gives_the_index() {
        assert_eq!(spec(pick(flag("1/4"), &[])), (1, 4));
        assert_eq!(spec(pick(ShardArgs::default(), &SLURM)), (2, 3));
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(spec(pick(ShardArgs::default(), &stepped)), (2, 3));
        // --shards: the task id as it is, so `sbatch --array=1` retries shard 1 of 3.
        let retry = [
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        assert_eq!(spec(pick(count(3), &retry)), (1, 3));
        assert_eq!(
            spec(pick(count(5), &[("JOB_COMPLETION_INDEX", "4")])),
            (4, 5)
        );
        assert_eq!(
            spec(pick(count(5), &[("AWS_BATCH_JOB_ARRAY_INDEX", "0")])),
            (0, 5)
        );
        // Sources that agree are fine.
        assert_eq!(spec(pick(flag("2/3"), &SLURM)), (2, 3));
    }

    #[test]
    fn unclear_or_conflicting_sources_are_refused() {
        type Vars = Vec<(&'static str, &'static str)>;
        let cases: Vec<(ShardArgs, Vars, &str)> = vec![
            (flag("0/3"), SLURM.to_vec(), "conflicting shard sources: --shard 0/3 (shard 0/3) vs SLURM_ARRAY_TASK_ID=12"),
            (
                count(4),
                vec![("JOB_COMPLETION_INDEX", "1"), ("AWS_BATCH_JOB_ARRAY_INDEX", "2")],
                "conflicting shard sources",
            ),
            (
                ShardArgs::default(),
                vec![("JOB_COMPLETION_INDEX", "1")],
                "JOB_COMPLETION_INDEX=1 gives the shard index but not the number of shards: pass --shards N",
            ),
            (count(3), vec![], "--shards 3 but no shard index"),
            (count(3), vec![("JOB_COMPLETION_INDEX", "3")], "shard index 3 is not below the number of shards 3"),
            (flag("1/3"), vec![("JOB_COMPLETION_INDEX", "1")], "JOB_COMPLETION_INDEX=1 gives the shard index but not"),
            (ShardArgs::default(), vec![("SLURM_ARRAY_TASK_ID", "1")], "SLURM_ARRAY_TASK_COUNT is not"),
            (ShardArgs::default(), vec![("AWS_BATCH_JOB_ARRAY_INDEX", "x")], "AWS_BATCH_JOB_ARRAY_INDEX=\"x\" is not a whole number"),
            (
                ShardArgs::default(),
                vec![("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_STEP", "2"), ("SLURM_ARRAY_TASK_COUNT", "2")],
                "not a task of a contiguous array",
            ),
        ];
        for (args, vars, says) in cases {
            let e = pick(args.clone(), &vars).unwrap_err();
            assert!(e.contains(says), "{args:?} {vars:?}: {e}");
        }
    }
}
