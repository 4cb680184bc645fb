//! The repository stands on its own: no file in it refers to a path outside it.

use std::path::Path;
use std::process::Command;

/// The repository's own files: tracked, or new and not ignored (outputs, caches and virtual
/// environments are ignored).
fn files(root: &Path) -> Vec<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "-z",
        ])
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git ls-files failed");
    String::from_utf8_lossy(&out.stdout)
        .split('\0')
        .filter(|f| !f.is_empty() && !f.starts_with("fuzz/corpus/"))
        .map(str::to_string)
        .collect()
}

#[test]
fn no_file_refers_to_a_path_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let all = files(&root);
    assert!(all.len() > 50, "found {} files", all.len());
    // Spelled in two parts, so that this file does not match itself.
    let outside = [concat!("..", "/shared")];
    let offending: Vec<&String> = all
        .iter()
        .filter(|f| {
            std::fs::read(root.join(f)).is_ok_and(|b| {
                let text = String::from_utf8_lossy(&b);
                outside.iter().any(|o| text.contains(o))
            })
        })
        .collect();
    assert!(
        offending.is_empty(),
        "files that refer outside the repository: {offending:?}"
    );
}
