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
            labelled: None,
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
        storage: None,
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
        (
            DatasetRef::training("fashion-mnist", C, "abc", N, Some(&[1, 0, 1, 1])),
            "dataset.labelled",
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
    // The writer refuses non-finite logits before anything is written...
    let mut nan = logits(0.0);
    nan[4] = f32::NAN;
    let e = write(
        &d.join("nan"),
        &meta(),
        &[nan.clone(), logits(1.0)],
        &LABELS_OK,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("non-finite logit at row 1, class 1"), "{e}");
    assert!(!d.join("nan").exists());
    // ... and the reader refuses such a file made elsewhere.
    let f32_tensor = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    raw(
        &d.join("nan"),
        vec![
            ("logits.main", Dtype::F32, vec![N, C], f32_tensor(&nan)),
            (
                "logits.aux1",
                Dtype::F32,
                vec![N, C],
                f32_tensor(&logits(1.0)),
            ),
            (
                "labels",
                Dtype::U32,
                vec![N],
                LABELS_OK.iter().flat_map(|l| l.to_le_bytes()).collect(),
            ),
        ],
        Some(meta_json(&meta())),
    );
    cases.push(("nan", "non-finite logit at row 1, class 1"));
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

/// The corpus also holds a two-view file and a version 3 file with a label mask (written by
/// [`write_fuzz_seeds`]), so the fuzzer starts from every layout the reader accepts.
#[test]
fn the_fuzz_seeds_cover_views_and_label_masks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/knowledge");
    let views = KnowledgeFile::open(&dir.join("valid-views.safetensors")).unwrap();
    assert_eq!((views.meta.format_version, views.meta.view_count()), (2, 2));
    let masked = KnowledgeFile::open(&dir.join("valid-labelled.safetensors")).unwrap();
    assert_eq!(masked.meta.format_version, 3);
    assert!(masked.label_mask().unwrap().is_some());
}

/// Writes the view and label-mask fuzz seeds (`cargo test --release --workspace --lib write_fuzz_seeds -- --ignored`).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/knowledge");
    let two: Vec<f32> = (0..N * 2 * C).map(|i| i as f32 * 0.25).collect();
    let views = [shift(0, 0, false), shift(1, -1, true)].repeat(N);
    write_views(
        &dir.join("valid-views.safetensors"),
        &views_meta(2),
        &[two.clone(), two],
        &LABELS_OK,
        &views,
    )
    .unwrap();
    let (m, mask) = labelled_meta();
    let rows = RowData {
        labels: &[0, 0, 1, 0],
        labelled: Some(&mask),
        views: None,
    };
    write_rows(
        &dir.join("valid-labelled.safetensors"),
        &m,
        &[logits(0.0), logits(1.0)],
        rows,
    )
    .unwrap();
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

/// Ten-class metadata (top-k needs room below C) with the given storage.
fn compact_meta(storage: Option<LogitStorage>) -> Metadata {
    let mut m = meta();
    m.dataset.classes = 10;
    m.storage = storage;
    m
}

/// Four rows of ten logits with a tie in row 2 and a large spread in row 3.
fn ten_class_logits(scale: f32) -> Vec<f32> {
    (0..N * 10)
        .map(|i| {
            let (r, c) = (i / 10, i % 10);
            match r {
                2 if c < 4 => 5.0 * scale,
                3 => (c as f32 - 5.0) * 9.0 * scale,
                _ => ((c * 7 + r * 3) % 10) as f32 * 0.37 * scale - 1.0,
            }
        })
        .collect()
}

fn softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

#[test]
fn compact_storage_round_trips_and_keeps_the_top_k_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let full = [ten_class_logits(1.0), ten_class_logits(0.5)];
    let read = |storage: Option<LogitStorage>, name: &str| {
        let p = dir.path().join(name);
        write(&p, &compact_meta(storage), &full, &LABELS_OK).unwrap();
        let f = KnowledgeFile::open(&p).unwrap();
        assert_eq!(f.meta.storage, storage);
        let l = f.logits("main", &Device::Cpu).unwrap();
        assert_eq!(l.dims(), &[N, 10], "{name}");
        // Bytes of tensor data (the header is the same few hundred bytes for every file).
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let data: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
        (l.flatten_all().unwrap().to_vec1::<f32>().unwrap(), data)
    };
    let (f32_rows, f32_size) = read(None, "f32.safetensors");
    assert_eq!(f32_rows, full[0]);
    // f16: every logit within half precision's rounding.
    let f16 = LogitStorage {
        dtype: LogitDtype::F16,
        top_k: None,
    };
    let (f16_rows, f16_size) = read(Some(f16), "f16.safetensors");
    for (a, b) in f16_rows.iter().zip(&full[0]) {
        assert!((a - b).abs() <= b.abs() * 1e-3 + 1e-3, "{a} vs {b}");
    }
    // Top-3 in f32: the three largest exact, the others one shared logit; at T = 1 the top-3
    // probabilities and the rest's total are the original's.
    let top3 = LogitStorage {
        dtype: LogitDtype::F32,
        top_k: Some(3),
    };
    let (t_rows, t_size) = read(Some(top3), "top3.safetensors");
    for (r, (got, want)) in t_rows.chunks(10).zip(full[0].chunks(10)).enumerate() {
        let mut order: Vec<usize> = (0..10).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
        for &c in &order[..3] {
            assert_eq!(got[c], want[c], "row {r} class {c}");
        }
        let rest = got[order[3]];
        assert!(order[3..].iter().all(|&c| got[c] == rest), "row {r}");
        let (p, q) = (softmax(got), softmax(want));
        for &c in &order[..3] {
            assert!(
                (p[c] - q[c]).abs() < 1e-6,
                "row {r} class {c}: {} vs {}",
                p[c],
                q[c]
            );
        }
        let mass = |p: &[f64]| order[3..].iter().map(|&c| p[c]).sum::<f64>();
        assert!((mass(&p) - mass(&q)).abs() < 1e-6, "row {r}");
    }
    // Row 2 has a four-way tie at the top: the lower classes are kept.
    assert_eq!(&t_rows[20..23], &[5.0, 5.0, 5.0]);
    assert_eq!(t_rows[23], t_rows[24]);
    // Tensor bytes for 2 heads × 4 rows + 16 bytes of labels: f32 40 per row and head, f16 20,
    // top-3 f32 3·4 + 3·2 (u16 classes) + 4 (rest) = 22, top-3 f16 3·2 + 3·2 + 2 = 14.
    let (_, t16_size) = read(
        Some(LogitStorage {
            dtype: LogitDtype::F16,
            top_k: Some(3),
        }),
        "top3-f16.safetensors",
    );
    assert_eq!([f32_size, f16_size, t_size, t16_size], [336, 176, 192, 128]);
    // The same inputs, the same bytes.
    let again = dir.path().join("again.safetensors");
    write(&again, &compact_meta(Some(top3)), &full, &LABELS_OK).unwrap();
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(dir.path().join("top3.safetensors")).unwrap()
    );
    // Multi-view files store top-k per view.
    let k = 2;
    let mut m = views_meta(k);
    m.dataset.classes = 10;
    m.storage = Some(top3);
    let per_view: Vec<f32> = full[0]
        .chunks(10)
        .flat_map(|r| r.iter().chain(r).copied())
        .collect();
    let views: Vec<kd_data::View> = (0..N * k).map(|_| shift(0, 0, false)).collect();
    let p = dir.path().join("views-top3.safetensors");
    write_views(&p, &m, &[per_view.clone(), per_view], &LABELS_OK, &views).unwrap();
    let f = KnowledgeFile::open(&p).unwrap();
    let l = f
        .logits_flat("main", &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(l.len(), N * k);
    assert_eq!(l[4], l[5]);
    assert_eq!(l[6].as_slice(), &t_rows[30..40]);
}

#[test]
fn broken_compact_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let top2 = LogitStorage {
        dtype: LogitDtype::F16,
        top_k: Some(2),
    };
    let labels: Vec<u8> = LABELS_OK.iter().flat_map(|l| l.to_le_bytes()).collect();
    let f16s = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    };
    let u16s = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let good_values = [3.0f32, 2.0].repeat(N);
    let good_classes = [4u16, 7].repeat(N);
    let good_rest = [1.0f32; N];
    type Case<'a> = (&'a str, Vec<f32>, Vec<u16>, Vec<f32>, Dtype, &'a str);
    let mut bad_order = good_values.clone();
    bad_order.swap(2, 3);
    let mut bad_class = good_classes.clone();
    bad_class[5] = 10;
    let mut repeated = good_classes.clone();
    repeated[7] = 4;
    let mut high_rest = good_rest.to_vec();
    high_rest[1] = 2.5;
    let mut nan = good_values.clone();
    nan[6] = f32::NAN;
    let cases: Vec<Case> = vec![
        (
            "ascending",
            bad_order,
            good_classes.clone(),
            good_rest.to_vec(),
            Dtype::F16,
            "row 1 is not in descending order",
        ),
        (
            "class 10",
            good_values.clone(),
            bad_class,
            good_rest.to_vec(),
            Dtype::F16,
            "row 2 has class 10, not below 10",
        ),
        (
            "repeat",
            good_values.clone(),
            repeated,
            good_rest.to_vec(),
            Dtype::F16,
            "row 3 repeats a class",
        ),
        (
            "rest too high",
            good_values.clone(),
            good_classes.clone(),
            high_rest,
            Dtype::F16,
            "above the smallest stored logit",
        ),
        (
            "nan",
            nan,
            good_classes.clone(),
            good_rest.to_vec(),
            Dtype::F16,
            "non-finite logit at row 3, stored value 0",
        ),
        (
            "f32 values",
            good_values.clone(),
            good_classes.clone(),
            good_rest.to_vec(),
            Dtype::F32,
            "expected F16 [4, 2]",
        ),
    ];
    let names = ["main", "aux1"].map(|h| {
        [
            logits_name(h),
            compact::classes_name(h),
            compact::rest_name(h),
        ]
    });
    for (what, values, classes, rest, dtype, says) in cases {
        let p = dir.path().join("bad.safetensors");
        let vbytes = match dtype {
            Dtype::F32 => f32_bytes(&values),
            _ => f16s(&values),
        };
        let mut tensors = vec![("labels", Dtype::U32, vec![N], labels.clone())];
        for [l, c, r] in &names {
            tensors.push((l, dtype, vec![N, 2], vbytes.clone()));
            tensors.push((c, Dtype::U16, vec![N, 2], u16s(&classes)));
            tensors.push((r, Dtype::F16, vec![N], f16s(&rest)));
        }
        raw(&p, tensors, Some(meta_json(&compact_meta(Some(top2)))));
        let e = open_err(&p);
        assert!(e.contains(says), "{what}: {e}");
    }
    // Storage the metadata cannot mean.
    for (storage, says) in [
        (
            LogitStorage {
                dtype: LogitDtype::F32,
                top_k: Some(10),
            },
            "top_k 10 is not between 1 and 9",
        ),
        (
            LogitStorage {
                dtype: LogitDtype::F32,
                top_k: Some(0),
            },
            "top_k 0",
        ),
        (LogitStorage::default(), "leaving `storage` out"),
    ] {
        let p = dir.path().join("meta.safetensors");
        let e = write(
            &p,
            &compact_meta(Some(storage)),
            &[ten_class_logits(1.0), ten_class_logits(1.0)],
            &LABELS_OK,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(says), "{e}");
        assert!(!p.exists());
    }
}

/// Metadata of a version 3 file: rows 1 and 3 carry no label.
fn labelled_meta() -> (Metadata, [u8; N]) {
    let mask = [1u8, 0, 1, 0];
    let mut m = meta();
    m.format_version = FORMAT_VERSION_LABELLED;
    m.dataset = DatasetRef::training("fashion-mnist", C, "abc", N, Some(&mask));
    (m, mask)
}

#[test]
fn a_label_mask_round_trips_in_version_3() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.safetensors");
    let (m, mask) = labelled_meta();
    let labels = [0u32, 0, 1, 0];
    let rows = RowData {
        labels: &labels,
        labelled: Some(&mask),
        views: None,
    };
    write_rows(&p, &m, &[logits(0.0), logits(1.0)], rows).unwrap();
    let k = KnowledgeFile::open(&p).unwrap();
    assert_eq!(k.meta.format_version, 3);
    assert_eq!(k.meta.dataset.labelled.as_ref().unwrap().rows, 2);
    assert_eq!(k.label_mask().unwrap(), Some(mask.to_vec()));
    k.check_dataset(&m.dataset, &labels).unwrap();
    // A file whose every row is labelled has no mask, and says so.
    let full = KnowledgeFile::open(&write_ok(dir.path())).unwrap();
    assert_eq!(full.label_mask().unwrap(), None);
    // The same rows with a multi-view layout.
    let mut mv = m.clone();
    mv.views = Some(ViewsMeta {
        count: 2,
        augment: kd_data::Augment::CropFlip { crop_padding: 2 },
        seed: 0,
    });
    let shift = kd_data::View::Shift {
        dx: 0,
        dy: 0,
        flip: false,
    };
    let views = vec![shift; N * 2];
    let two: Vec<f32> = (0..N * 2 * C).map(|i| i as f32).collect();
    let p2 = dir.path().join("v.safetensors");
    let rows = RowData {
        views: Some(&views),
        ..rows
    };
    write_rows(&p2, &mv, &[two.clone(), two], rows).unwrap();
    let k = KnowledgeFile::open(&p2).unwrap();
    assert_eq!(
        (k.meta.view_count(), k.label_mask().unwrap()),
        (2, Some(mask.to_vec()))
    );
}

#[test]
fn label_masks_that_disagree_with_the_metadata_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (m, mask) = labelled_meta();
    let labels = [0u32; N];
    let try_write = |meta: &Metadata, mask: Option<&[u8]>| {
        let p = dir.path().join("x.safetensors");
        let rows = RowData {
            labels: &labels,
            labelled: mask,
            views: None,
        };
        write_rows(&p, meta, &[logits(0.0), logits(1.0)], rows)
            .unwrap_err()
            .to_string()
    };
    assert!(try_write(&m, None).contains("no `labelled` tensor"));
    assert!(try_write(&m, Some(&[1, 1, 1, 0])).contains("marks 3 labelled rows"));
    assert!(try_write(&m, Some(&[1, 0, 2, 0])).contains("other than 0 and 1"));
    assert!(try_write(&m, Some(&[0, 1, 0, 1])).contains("fingerprint"));
    let v1 = Metadata {
        format_version: FORMAT_VERSION,
        ..m.clone()
    };
    assert!(try_write(&v1, Some(&mask)).contains("format version 1 does not go with"));
    let no_mask = Metadata {
        format_version: FORMAT_VERSION_LABELLED,
        ..meta()
    };
    assert!(try_write(&no_mask, None).contains("format version 3 does not go with"));
    // The reader checks the same: a version 3 file whose mask was changed on disk.
    let p = dir.path().join("k.safetensors");
    let rows = RowData {
        labels: &labels,
        labelled: Some(&mask),
        views: None,
    };
    write_rows(&p, &m, &[logits(0.0), logits(1.0)], rows).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
    let start = json[LABELLED]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[8 + header + start + 1] = 1;
    std::fs::write(&p, &bytes).unwrap();
    let e = open_err(&p);
    assert!(e.contains("labelled") && e.contains("k.safetensors"), "{e}");
}
