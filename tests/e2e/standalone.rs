//! The repository stands on its own: no file in it refers to a path outside it.

use std::path::{Path, PathBuf};

/// Folders that are outputs, caches or installs, not the repository's own files.
const SKIP: [&str; 7] = [
    ".git",
    "target",
    ".venv",
    "artifacts",
    "data",
    "corpus",
    "node_modules",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !SKIP.contains(&name.as_str()) {
                files(&p, out);
            }
        } else if p.is_file() {
            out.push(p);
        }
    }
}

#[test]
fn no_file_refers_to_a_path_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut all = Vec::new();
    files(&root, &mut all);
    assert!(all.len() > 50, "found {} files", all.len());
    // Spelled in two parts, so that this file does not match itself.
    let outside = [concat!("..", "/shared")];
    let offending: Vec<String> = all
        .iter()
        .filter(|p| {
            std::fs::read(p).is_ok_and(|b| {
                let text = String::from_utf8_lossy(&b);
                outside.iter().any(|o| text.contains(o))
            })
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        offending.is_empty(),
        "files that refer outside the repository: {offending:?}"
    );
}
