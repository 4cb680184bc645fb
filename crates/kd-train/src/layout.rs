//! Where each stage writes, under `<artifacts>/<pipeline>/`: the names every stage agrees on,
//! and run tags (`runs/<tag>/<stage>/`).

pub const TEACHER: &str = "teacher";
pub const KNOWLEDGE: &str = "knowledge";
pub const STUDENT_KD: &str = "student-kd";
pub const STUDENT_BASELINE: &str = "student-baseline";
pub const REPORT: &str = "report";
/// Exported models (`kd-export`).
pub const EXPORT: &str = "export";
/// Tagged runs of any stage: `runs/<tag>/<stage>/`.
pub const RUNS: &str = "runs";
/// The checkpoint file of every training stage.
pub const CHECKPOINT: &str = "model.safetensors";
pub const KNOWLEDGE_FILE: &str = "soft-targets.safetensors";
/// Class index → class name, next to every checkpoint (as the seed writes it).
pub const CLASS_INDICES: &str = "class_indices.json";

/// A run tag (`runs/<tag>/<stage>/`): letters, digits and `. _ - =`, not starting with a dot.
pub fn check_tag(s: &str) -> Result<&str, String> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-=".contains(c))
        && !s.starts_with('.');
    if ok {
        Ok(s)
    } else {
        Err(format!(
            "tag {s:?}: letters, digits and . _ - = only (not starting with a dot), e.g. seed-1"
        ))
    }
}

/// `check_tag` for clap.
pub fn parse_tag(s: &str) -> Result<String, String> {
    check_tag(s).map(String::from)
}

/// A stage's folder under the pipeline's artifacts: `<stage>`, or `runs/<tag>/<stage>` for a
/// tagged run.
pub fn stage_name(stage: &str, tag: Option<&str>) -> String {
    match tag {
        Some(t) => format!("{}/{t}/{stage}", RUNS),
        None => stage.to_string(),
    }
}
