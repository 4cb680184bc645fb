//! Broken inputs fed to the real stages: each is refused with a message naming the file and
//! what is wrong, and no artifact of the existing run changes.

use crate::fixture::{precompute, run, student, teacher};
use kd_data::idx::encode_idx;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every file under `root` with its SHA-256.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), kd_data::sha256_file(&p).unwrap());
            }
        }
    }
    out
}

/// A copy of the whole smoke run, to be attacked.
fn copy_run() -> tempfile::TempDir {
    let r = run();
    let root = tempfile::tempdir().unwrap();
    for stage in [
        "teacher",
        "knowledge",
        "student-kd",
        "student-baseline",
        "report",
    ] {
        let to = root.path().join("smoke").join(stage);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(r.dir(stage)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    root
}

/// How a test spoils a file's bytes.
type Spoil = fn(Vec<u8>) -> Vec<u8>;

/// The smoke data as raw IDX files in `dir`, with `spoil` applied to the named file's bytes.
fn idx_folder(dir: &Path, name: &str, spoil: impl Fn(Vec<u8>) -> Vec<u8>) {
    let src = Path::new(kd_data::fashion_mnist::DEBIAN_DIR);
    for (file, rank, n) in [
        ("train-images-idx3-ubyte", 3, 600),
        ("train-labels-idx1-ubyte", 1, 600),
        ("t10k-images-idx3-ubyte", 3, 200),
        ("t10k-labels-idx1-ubyte", 1, 200),
    ] {
        let a = kd_data::idx::read_idx(&src.join(format!("{file}.gz")), rank).unwrap();
        let per = a.data.len() / a.dims[0];
        let mut dims = a.dims.clone();
        dims[0] = n;
        let mut bytes = encode_idx(&dims, &a.data[..n * per]);
        if file == name {
            bytes = spoil(bytes);
        }
        std::fs::write(dir.join(file), bytes).unwrap();
    }
}

#[test]
fn broken_inputs_are_refused_and_nothing_on_disk_changes() {
    let root = copy_run();
    let r = root.path();
    let before = snapshot(r);
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let mut cases: Vec<(&str, String, &str, anyhow::Result<kd_train::Manifest>)> = Vec::new();

    // IDX files: each spoiled in turn, fed to the teacher with --force.
    let idx_cases: [(&str, &str, Spoil, &str); 5] = [
        (
            "truncated",
            "train-images-idx3-ubyte",
            |b| b[..b.len() - 1000].to_vec(),
            "truncated data",
        ),
        (
            "magic",
            "t10k-labels-idx1-ubyte",
            |mut b| {
                b[2] = 9;
                b
            },
            "IDX element type",
        ),
        (
            "label",
            "train-labels-idx1-ubyte",
            |mut b| {
                b[20] = 10;
                b
            },
            "label 10",
        ),
        (
            "count",
            "t10k-labels-idx1-ubyte",
            |b| [encode_idx(&[199], &[]), b[8..207].to_vec()].concat(),
            "199 labels",
        ),
        ("empty", "t10k-images-idx3-ubyte", |_| vec![], "empty file"),
    ];
    for (tag, file, spoil, want) in idx_cases {
        let dir = s.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        idx_folder(&dir, file, spoil);
        let d = dir.display().to_string();
        let result = teacher(
            r,
            &[
                "--force",
                "--data-dir",
                &d,
                "--set",
                "data.verify_checksums=false",
            ],
        );
        let named = if tag == "count" {
            "t10k-labels-idx1-ubyte".to_string()
        } else {
            file.to_string()
        };
        cases.push((tag, named, want, result));
    }

    // Knowledge files.
    let good = std::fs::read(r.join("smoke/knowledge/soft-targets.safetensors")).unwrap();
    let spoiled: [(&str, Vec<u8>, &str); 3] = [
        (
            "k-text.safetensors",
            b"not safetensors".to_vec(),
            "not a valid safetensors",
        ),
        (
            "k-cut.safetensors",
            good[..good.len() / 2].to_vec(),
            "not a valid safetensors",
        ),
        (
            "k-header.safetensors",
            [(1u64 << 40).to_le_bytes().to_vec(), good[8..].to_vec()].concat(),
            "not a valid safetensors",
        ),
    ];
    for (name, bytes, want) in spoiled {
        // A producer that vouched for broken bytes: the hash checks out, the reader refuses.
        let dir = s.join(name.trim_end_matches(".safetensors"));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        kd_train::Manifest::start("knowledge", "smoke", "k".into())
            .write(&dir, &[name])
            .unwrap();
        let ps = p.display().to_string();
        cases.push((
            name,
            name.to_string(),
            want,
            student(r, &["--force", "--knowledge", &ps]),
        ));
    }

    // A truncated checkpoint, and one of the wrong architecture.
    let ckpt = std::fs::read(r.join("smoke/teacher/model.safetensors")).unwrap();
    let cut_dir = s.join("cut");
    std::fs::create_dir_all(&cut_dir).unwrap();
    let cut = cut_dir.join("cut-teacher.safetensors");
    std::fs::write(&cut, &ckpt[..ckpt.len() - 4096]).unwrap();
    // Vouched for by a manifest, so the checkpoint reader is what refuses it.
    kd_train::Manifest::start("teacher", "smoke", "k".into())
        .write(&cut_dir, &["cut-teacher.safetensors"])
        .unwrap();
    cases.push((
        "ckpt-cut",
        "cut-teacher.safetensors".into(),
        "cannot read",
        precompute(r, &["--force", "--teacher", cut.to_str().unwrap()]),
    ));
    let wrong = r.join("smoke/student-kd/model.safetensors");
    cases.push((
        "ckpt-arch",
        "student-kd/model.safetensors".into(),
        "missing",
        precompute(r, &["--force", "--teacher", wrong.to_str().unwrap()]),
    ));

    // Pipeline settings.
    cases.push((
        "key",
        "smoke.toml".into(),
        "teacher.epoch: unknown field `epoch`",
        teacher(r, &["--force", "--set", "teacher.epoch=2"]),
    ));
    cases.push((
        "epochs",
        "smoke.toml".into(),
        "student.epochs",
        student(r, &["--force", "--set", "student.epochs=0"]),
    ));
    cases.push((
        "temperature",
        "smoke.toml".into(),
        "student.temperature",
        student(r, &["--force", "--set", "student.temperature=0"]),
    ));
    cases.push((
        "type",
        "smoke.toml".into(),
        "invalid type",
        student(r, &["--force", "--set", "student.lr=\"fast\""]),
    ));

    // Photos: an empty class folder, a file that is not an image.
    let photos = s.join("photos");
    std::fs::create_dir_all(photos.join("a")).unwrap();
    std::fs::create_dir_all(photos.join("b")).unwrap();
    image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
        .save(photos.join("a/x.png"))
        .unwrap();
    let folder = [
        "--set",
        "data.format=\"image-folder\"",
        "--set",
        "data.classes=2",
        "--set",
        "data.image_size=28",
    ];
    let p = photos.display().to_string();
    let with = |extra: &[&str]| -> Vec<String> {
        [
            &["--force", "--data-dir", p.as_str()],
            folder.as_slice(),
            extra,
        ]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = with(&[]);
    cases.push((
        "empty-class",
        "photos/b".into(),
        "no images",
        teacher(r, &args.iter().map(String::as_str).collect::<Vec<_>>()),
    ));
    std::fs::write(photos.join("b/fake.jpg"), b"text, not a JPEG").unwrap();
    cases.push((
        "not-image",
        "b/fake.jpg".into(),
        "not a readable JPEG or PNG",
        teacher(r, &args.iter().map(String::as_str).collect::<Vec<_>>()),
    ));

    for (tag, file, want, result) in cases {
        let err = match result {
            Ok(_) => panic!("{tag}: the stage accepted a broken input"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&file) && err.contains(want),
            "{tag}: the error should name {file} and say {want:?}: {err}"
        );
    }
    assert_eq!(snapshot(r), before, "a refused run changed files on disk");
}
