use super::*;

const N: usize = 4;
const C: usize = 3;

fn meta() -> Metadata {
    meta_for(N)
}

/// Metadata for `rows` rows of 3 classes, heads main and aux1 (shared with the shard tests).
pub(crate) fn meta_for(rows: usize) -> Metadata {
    Metadata {
        format_version: FORMAT_VERSION,
        dataset: DatasetRef {
            name: "fashion-mnist".into(),
            split: "train".into(),
            rows,
            classes: C,
            fingerprint: "abc".into(),
        },
        teacher: TeacherRef {
            architecture: "googlenet".into(),
            checkpoint_sha256: "def".into(),
        },
        heads: vec!["main".into(), "aux1".into()],
        transform: Transform {
            input: [1, 28, 28],
            normalization: Normalization {
                mean: vec![0.286],
                std: vec![0.353],
            },
            augmentation: "none".into(),
        },
        views: None,
    }
}

fn logits(offset: f32) -> Vec<f32> {
    (0..N * C).map(|i| i as f32 * 0.5 - offset).collect()
}

const LABELS_OK: [u32; N] = [0, 2, 1, 2];

fn write_ok(dir: &Path) -> PathBuf {
    let p = dir.join("k.safetensors");
    write(&p, &meta(), &[logits(0.0), logits(1.0)], &LABELS_OK).unwrap();
    p
}

fn open_err(path: &Path) -> String {
    KnowledgeFile::open(path).unwrap_err().to_string()
}

/// A safetensors file with the given tensors (name, dtype, shape, bytes) and metadata.
fn raw(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>, metadata: Option<String>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let info = metadata.map(|m| HashMap::from([(METADATA_KEY.to_string(), m)]));
    std::fs::write(path, safetensors::serialize(views, info).unwrap()).unwrap();
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn meta_json(m: &Metadata) -> String {
    canonical_json(&serde_json::to_value(m).unwrap())
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_ok(dir.path());
    let k = KnowledgeFile::open(&p).unwrap();
    assert_eq!(k.meta, meta());
    assert_eq!(k.labels().unwrap(), LABELS_OK);
    let aux = k.logits("aux1", &Device::Cpu).unwrap();
    assert_eq!(aux.dims(), &[N, C]);
    assert_eq!(
        aux.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        logits(1.0)
    );
    k.check_dataset(&meta().dataset, &LABELS_OK).unwrap();
    k.check_heads(&["main".into()]).unwrap();
    assert!(k
        .logits("aux2", &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("aux2"));
}

#[test]
fn writing_twice_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let a = std::fs::read(write_ok(dir.path())).unwrap();
    let b = std::fs::read(write_ok(dir.path())).unwrap();
    assert_eq!(a, b);
}

#[test]
fn mismatches_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let k = KnowledgeFile::open(&write_ok(dir.path())).unwrap();
    let base = meta().dataset;
    let cases: Vec<(DatasetRef, &str)> = vec![
        (
            DatasetRef {
                name: "mnist".into(),
                ..base.clone()
            },
            "dataset.name",
        ),
        (
            DatasetRef {
                split: "test".into(),
                ..base.clone()
            },
            "dataset.split",
        ),
        (
            DatasetRef {
                rows: 5,
                ..base.clone()
            },
            "dataset.rows",
        ),
        (
            DatasetRef {
                classes: 10,
                ..base.clone()
            },
            "dataset.classes",
        ),
        (
            DatasetRef {
                fingerprint: "xyz".into(),
                ..base.clone()
            },
            "dataset.fingerprint",
        ),
    ];
    for (expected, field) in cases {
        let e = k
            .check_dataset(&expected, &LABELS_OK)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(field) && e.contains("k.safetensors"),
            "{field}: {e}"
        );
    }
    let e = k
        .check_dataset(&base, &[0, 2, 2, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels") && e.contains("row 2"), "{e}");
    let e = k
        .check_heads(&["main".into(), "aux2".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("aux2"), "{e}");
}

#[test]
fn broken_files_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = std::fs::read(write_ok(d)).unwrap();
    let labels = LABELS_OK
        .iter()
        .flat_map(|l| l.to_le_bytes())
        .collect::<Vec<u8>>();
    let main = (
        "logits.main",
        Dtype::F32,
        vec![N, C],
        f32_bytes(&logits(0.0)),
    );
    let aux = (
        "logits.aux1",
        Dtype::F32,
        vec![N, C],
        f32_bytes(&logits(1.0)),
    );
    let lab = ("labels", Dtype::U32, vec![N], labels.clone());

    let mut cases: Vec<(&str, &str)> = vec![];
    std::fs::write(d.join("text"), b"not a tensor file at all").unwrap();
    cases.push(("text", "not a valid safetensors"));
    std::fs::write(d.join("empty"), b"").unwrap();
    cases.push(("empty", "not a valid safetensors"));
    std::fs::write(d.join("truncated"), &good[..good.len() - 7]).unwrap();
    cases.push(("truncated", "not a valid safetensors"));
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(d.join("header-len"), &huge).unwrap();
    cases.push(("header-len", "not a valid safetensors"));
    raw(
        &d.join("no-meta"),
        vec![main.clone(), aux.clone(), lab.clone()],
        None,
    );
    cases.push(("no-meta", "no `kd_knowledge` metadata"));
    raw(
        &d.join("bad-json"),
        vec![main.clone(), aux.clone(), lab.clone()],
        Some("{nope".into()),
    );
    cases.push(("bad-json", "not JSON"));
    raw(
        &d.join("version"),
        vec![main.clone(), aux.clone(), lab.clone()],
        Some(meta_json(&Metadata {
            format_version: 99,
            ..meta()
        })),
    );
    cases.push(("version", "format version 99"));
    raw(
        &d.join("no-head"),
        vec![main.clone(), lab.clone()],
        Some(meta_json(&meta())),
    );
    cases.push(("no-head", "logits.aux1"));
    raw(
        &d.join("dtype"),
        vec![
            main.clone(),
            (
                "logits.aux1",
                Dtype::I32,
                vec![N, C],
                f32_bytes(&logits(1.0)),
            ),
            lab.clone(),
        ],
        Some(meta_json(&meta())),
    );
    cases.push(("dtype", "expected F32"));
    raw(
        &d.join("rows"),
        vec![
            (
                "logits.main",
                Dtype::F32,
                vec![N - 1, C],
                f32_bytes(&logits(0.0)[..(N - 1) * C]),
            ),
            aux.clone(),
            lab.clone(),
        ],
        Some(meta_json(&meta())),
    );
    cases.push(("rows", "expected F32 [4, 3]"));
    raw(
        &d.join("labels-dtype"),
        vec![
            main.clone(),
            aux.clone(),
            ("labels", Dtype::F32, vec![N], labels.clone()),
        ],
        Some(meta_json(&meta())),
    );
    cases.push(("labels-dtype", "labels is F32"));
    raw(
        &d.join("label-range"),
        vec![
            main.clone(),
            aux.clone(),
            (
                "labels",
                Dtype::U32,
                vec![N],
                [0u32, 1, 7, 0]
                    .iter()
                    .flat_map(|l| l.to_le_bytes())
                    .collect(),
            ),
        ],
        Some(meta_json(&meta())),
    );
    cases.push(("label-range", "row 2"));
    let mut nan = logits(0.0);
    nan[4] = f32::NAN;
    write(&d.join("nan"), &meta(), &[nan, logits(1.0)], &LABELS_OK).unwrap();
    cases.push(("nan", "non-finite logit at row 1, class 1"));
    let mut inf = logits(1.0);
    inf[0] = f32::INFINITY;
    write(&d.join("inf"), &meta(), &[logits(0.0), inf], &LABELS_OK).unwrap();
    cases.push(("inf", "non-finite"));
    for (name, want) in cases {
        let e = open_err(&d.join(name));
        assert!(e.contains(want), "{name}: {e}");
        assert!(
            e.contains(&d.join(name).display().to_string()),
            "{name}: the error does not name the file: {e}"
        );
    }
    assert!(open_err(&d.join("missing")).contains("cannot open"));
}

#[test]
fn write_refuses_inconsistent_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.safetensors");
    assert!(write(&p, &meta(), &[logits(0.0)], &LABELS_OK).is_err());
    assert!(write(&p, &meta(), &[logits(0.0), logits(0.0)], &[0, 1]).is_err());
    assert!(!p.exists(), "nothing may be written for a refused call");
}

/// The fuzzing corpus starts from a valid file (written by hand, not by `write`): the reader
/// accepts it, so the fuzzer explores past validation.
#[test]
fn the_fuzz_seed_is_a_valid_knowledge_file() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/knowledge/valid.safetensors");
    let k = KnowledgeFile::from_bytes(&path, std::fs::read(&path).unwrap()).unwrap();
    assert_eq!((k.meta.dataset.rows, k.meta.dataset.classes), (3, 2));
    assert_eq!(k.labels().unwrap(), vec![0, 1, 1]);
    assert_eq!(k.logits("main", &Device::Cpu).unwrap().dims(), &[3, 2]);
}

fn views_meta(k: usize) -> Metadata {
    Metadata {
        format_version: FORMAT_VERSION_VIEWS,
        views: Some(ViewsMeta {
            count: k,
            augment: kd_data::Augment::CropFlip { crop_padding: 2 },
            seed: 3,
        }),
        ..meta()
    }
}

fn shift(dx: i32, dy: i32, flip: bool) -> kd_data::View {
    kd_data::View::Shift { dx, dy, flip }
}

#[test]
fn multi_view_files_round_trip_and_version_1_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.safetensors");
    let k = 2;
    let logits_k: Vec<f32> = (0..N * k * C).map(|i| i as f32 * 0.1).collect();
    let views: Vec<kd_data::View> = (0..N)
        .flat_map(|r| [shift(0, 0, false), shift(r as i32 % 3 - 1, 2, r % 2 == 0)])
        .collect();
    write_views(
        &p,
        &views_meta(k),
        &[logits_k.clone(), logits_k.clone()],
        &LABELS_OK,
        &views,
    )
    .unwrap();
    let f = KnowledgeFile::open(&p).unwrap();
    assert_eq!(f.meta.view_count(), 2);
    assert_eq!(f.stored_views().unwrap(), views);
    assert_eq!(f.logits("main", &Device::Cpu).unwrap().dims(), &[N, k, C]);
    let flat = f.logits_flat("main", &Device::Cpu).unwrap();
    assert_eq!(flat.dims(), &[N * k, C]);
    assert_eq!(
        flat.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        logits_k
    );
    // Version 1 files read as one view.
    let v1 = KnowledgeFile::open(&write_ok(dir.path())).unwrap();
    assert_eq!(v1.meta.view_count(), 1);
    assert!(v1.stored_views().unwrap().is_empty());
    assert_eq!(
        v1.logits_flat("main", &Device::Cpu).unwrap().dims(),
        &[N, C]
    );
    // The writers refuse what does not fit.
    assert!(write(&p, &views_meta(2), &[logits(0.0), logits(1.0)], &LABELS_OK).is_err());
    assert!(write_views(
        &p,
        &views_meta(2),
        &[logits(0.0), logits(1.0)],
        &LABELS_OK,
        &views
    )
    .is_err());
}

#[test]
fn broken_multi_view_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = 2;
    let labels: Vec<u8> = LABELS_OK.iter().flat_map(|l| l.to_le_bytes()).collect();
    let ints = |v: Vec<i32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let good_views: Vec<i32> = (0..N * k).flat_map(|_| [1, -1, 0, 0, 1]).collect();
    type Case = (
        &'static str,
        Metadata,
        Vec<usize>,
        Vec<i32>,
        Vec<usize>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "shift beyond padding",
            views_meta(k),
            vec![N, k, C],
            (0..N * k).flat_map(|_| [3, 0, 0, 0, 0]).collect(),
            vec![N, k, 5],
            "is not a view of",
        ),
        (
            "flip not 0/1",
            views_meta(k),
            vec![N, k, C],
            (0..N * k).flat_map(|_| [0, 0, 0, 0, 2]).collect(),
            vec![N, k, 5],
            "is not a view of",
        ),
        (
            "views misshapen",
            views_meta(k),
            vec![N, k, C],
            good_views.clone(),
            vec![N * k, 5],
            "expected I32",
        ),
        (
            "logits of one view",
            views_meta(k),
            vec![N, C],
            good_views.clone(),
            vec![N, k, 5],
            "expected F32 [4, 2, 3]",
        ),
        (
            "version 1 with views",
            Metadata {
                format_version: FORMAT_VERSION,
                ..views_meta(k)
            },
            vec![N, k, C],
            good_views.clone(),
            vec![N, k, 5],
            "does not go with 2 view(s)",
        ),
        (
            "one view in version 2",
            views_meta(1),
            vec![N, 1, C],
            good_views[..N * 5].to_vec(),
            vec![N, 1, 5],
            "does not go with 1 view(s)",
        ),
    ];
    for (what, m, lshape, views, vshape, says) in cases {
        let p = dir.path().join("bad.safetensors");
        let lbytes = f32_bytes(&vec![0.5; lshape.iter().product::<usize>()]);
        raw(
            &p,
            vec![
                ("logits.main", Dtype::F32, lshape.clone(), lbytes.clone()),
                ("logits.aux1", Dtype::F32, lshape, lbytes),
                ("labels", Dtype::U32, vec![N], labels.clone()),
                ("views", Dtype::I32, vshape, ints(views)),
            ],
            Some(meta_json(&m)),
        );
        let e = open_err(&p);
        assert!(e.contains(says), "{what}: {e}");
    }
}
