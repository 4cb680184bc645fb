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

/// `just RECIPE ARGS...` from the repository root with `bin` set to `bin_dir` and no dependencies
/// run; stdout on success.
fn just(bin_dir: &Path, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("just")
        .current_dir(&root)
        .args(["--no-deps", "--set", "bin"])
        .arg(bin_dir)
        .args(args)
        .output()
        .expect("`just` runs (CI installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "just {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The README's commands go through the justfile: `just pipeline`, `just compare` and `just sweep`
/// must hand `kd-experiment` exactly the arguments typed, none when none were typed. A recipe
/// declared `*args=''` once passed one empty argument, so `just pipeline` looked for
/// `pipelines/.toml`. A stand-in `kd-experiment` that prints its arguments records what the real
/// `just` passes; then the real binary plans the default pipeline through the same recipes.
#[test]
fn the_front_door_recipes_pass_their_arguments_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = dir.path().join("kd-experiment");
    std::fs::write(
        &recorder,
        "#!/bin/sh\necho \"$#\"; for a in \"$@\"; do echo \"[$a]\"; done\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &recorder,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for recipe in ["pipeline", "compare", "sweep"] {
        assert_eq!(
            just(dir.path(), &[recipe]),
            "1\n[RECIPE]\n".replace("RECIPE", recipe)
        );
    }
    assert_eq!(
        just(dir.path(), &["compare", "smoke", "labels=100 all"]),
        "3\n[compare]\n[smoke]\n[labels=100 all]\n"
    );
    let real = crate::between::binary("kd-experiment");
    for recipe in ["pipeline", "compare", "sweep"] {
        let plan = just(real.parent().unwrap(), &[recipe, "--dry-run"]);
        assert!(
            plan.contains("--pipeline pipelines/fashion-mnist.toml"),
            "`just {recipe} --dry-run` planned:\n{plan}"
        );
    }
}
