use super::*;
use crate::{write, DatasetRef, KnowledgeFile, TeacherRef};

const C: usize = 3;

fn meta(rows: usize) -> Metadata {
    crate::tests::meta_for(rows)
}

/// Distinct logits for every (head, row, class) and labels for every row.
fn whole(rows: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let logits = (0..2)
        .map(|h| (0..rows * C).map(|i| i as f32 * 0.25 - h as f32).collect())
        .collect();
    let labels = (0..rows).map(|r| (r * 7 % C) as u32).collect();
    (logits, labels)
}

/// Writes the shards `which` of `count` (rows cut with `batch`) into `dir`, as kd-precompute does.
fn write_shards(dir: &Path, rows: usize, batch: usize, count: usize, which: &[usize]) {
    let (logits, labels) = whole(rows);
    for &index in which {
        let spec = ShardSpec::new(index, count).unwrap();
        let r = spec.rows(rows, batch);
        let meta = ShardMeta {
            format_version: SHARD_FORMAT_VERSION,
            knowledge: meta(rows),
            shard: spec,
            start: r.start,
            end: r.end,
            batch_size: batch,
            sha256: String::new(),
        };
        let part: Vec<Vec<f32>> = logits
            .iter()
            .map(|l| l[r.start * C..r.end * C].to_vec())
            .collect();
        write_shard(
            &dir.join(spec.file_name()),
            &meta,
            &part,
            &labels[r.clone()],
        )
        .unwrap();
    }
}

fn open_all(dir: &Path) -> Vec<Shard> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths.iter().map(|p| Shard::open(p).unwrap()).collect()
}

#[test]
fn shard_ranges_cover_every_row_once_on_batch_edges() {
    for rows in [0usize, 1, 5, 127, 128, 129, 600, 1000] {
        for batch in [1, 7, 128] {
            let batches = rows.div_ceil(batch);
            for count in [1, 2, 3, 7, 8, 50] {
                let ranges: Vec<Range<usize>> = (0..count)
                    .map(|i| ShardSpec::new(i, count).unwrap().rows(rows, batch))
                    .collect();
                let mut next = 0;
                for r in &ranges {
                    assert_eq!(r.start, next, "{rows} rows, batch {batch}, {count} shards");
                    assert!(r.end >= r.start);
                    assert!(
                        r.start % batch == 0 || r.start == rows,
                        "starts on a batch edge"
                    );
                    next = r.end;
                }
                assert_eq!(next, rows);
                // Balanced: the shards' batch counts differ by at most one.
                let sizes: Vec<usize> = ranges
                    .iter()
                    .map(|r| r.end.div_ceil(batch) - r.start.div_ceil(batch))
                    .collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "{sizes:?}");
                assert_eq!(sizes.iter().sum::<usize>(), batches);
            }
        }
    }
}

#[test]
fn shard_specs_parse_and_refuse() {
    assert_eq!(
        "2/7".parse::<ShardSpec>().unwrap(),
        ShardSpec { index: 2, count: 7 }
    );
    assert_eq!(ShardSpec { index: 2, count: 7 }.to_string(), "2/7");
    assert_eq!(
        ShardSpec { index: 2, count: 7 }.file_name(),
        "shard-00002-of-00007.safetensors"
    );
    for (bad, says) in [
        ("3", "is not I/N"),
        ("3/3", "not below the number of shards 3"),
        ("0/0", "at least 1"),
        ("a/3", "index \"a\""),
        ("1/-2", "count \"-2\""),
    ] {
        let e = bad.parse::<ShardSpec>().unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
}

/// Merging the shards of any split gives exactly the bytes of the whole file written at once.
#[test]
fn merged_shards_are_the_whole_file_byte_for_byte() {
    let (rows, batch) = (23, 4); // 6 batches, the last one short
    let tmp = tempfile::tempdir().unwrap();
    let whole_path = tmp.path().join("whole.safetensors");
    let (logits, labels) = whole(rows);
    write(&whole_path, &meta(rows), &logits, &labels).unwrap();
    let expected = std::fs::read(&whole_path).unwrap();
    for count in [1, 2, 3, 6, 7, 10] {
        let dir = tmp.path().join(format!("n{count}"));
        std::fs::create_dir(&dir).unwrap();
        write_shards(&dir, rows, batch, count, &(0..count).collect::<Vec<_>>());
        let shards = open_all(&dir);
        assert_eq!(shards.len(), count);
        let (l, y) = merge(&dir, &shards, &meta(rows), batch, count).unwrap();
        let out = tmp.path().join(format!("merged{count}.safetensors"));
        write(&out, &meta(rows), &l, &y).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), expected, "{count} shards");
    }
}

#[test]
fn merge_refuses_missing_duplicate_and_mismatched_shards_naming_them() {
    let (rows, batch) = (23, 4);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_shards(dir, rows, batch, 3, &[0, 2]);
    let e = merge(dir, &open_all(dir), &meta(rows), batch, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing shard 1 of 3") && e.contains("shard-00001-of-00003"),
        "{e}"
    );

    write_shards(dir, rows, batch, 3, &[1]);
    let mut shards = open_all(dir);
    let mut copy = shards[1].clone();
    copy.path = dir.join("copy.safetensors");
    shards.push(copy);
    let e = merge(dir, &shards, &meta(rows), batch, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("are both shard 1 of 3") && e.contains("copy.safetensors"),
        "{e}"
    );

    let shards = open_all(dir);
    let other_teacher = Metadata {
        teacher: TeacherRef {
            architecture: "googlenet".into(),
            checkpoint_sha256: "999".into(),
        },
        ..meta(rows)
    };
    let e = merge(dir, &shards, &other_teacher, batch, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shard-00000-of-00003") && e.contains("teacher.checkpoint_sha256 is def"),
        "{e}"
    );
    let other_data = Metadata {
        dataset: DatasetRef {
            fingerprint: "zzz".into(),
            ..meta(rows).dataset
        },
        ..meta(rows)
    };
    let e = merge(dir, &shards, &other_data, batch, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dataset.fingerprint is abc"), "{e}");
    let e = merge(dir, &shards, &meta(rows), 8, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch_size is 4"), "{e}");

    // A shard of a 2-way split among 3-way shards.
    let two = tempfile::tempdir().unwrap();
    write_shards(two.path(), rows, batch, 2, &[0]);
    let mut mixed = open_all(dir);
    mixed[0] = open_all(two.path()).remove(0);
    let e = merge(dir, &mixed, &meta(rows), batch, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shard-00000-of-00002") && e.contains("shard count is 2"),
        "{e}"
    );
    assert!(matches!(
        merge(dir, &[], &meta(rows), batch, 3),
        Err(MergeError::Empty(_))
    ));
}

#[test]
fn damaged_shards_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_shards(dir, 23, 4, 2, &[0, 1]);
    let path = dir.join("shard-00001-of-00002.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // The lowest mantissa bit of the first logit: still finite, still a valid file.
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let e = Shard::open(&path).unwrap_err().to_string();
    assert!(
        e.contains("shard-00001-of-00002") && e.contains("checksum mismatch"),
        "{e}"
    );

    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = Shard::open(&path).unwrap_err().to_string();
    assert!(e.contains("not a valid safetensors file"), "{e}");

    // A whole knowledge file is not a shard, and a shard is not a knowledge file.
    let k = dir.join("k.safetensors");
    let (logits, labels) = whole(23);
    write(&k, &meta(23), &logits, &labels).unwrap();
    assert!(Shard::open(&k)
        .unwrap_err()
        .to_string()
        .contains("not a shard"));
    let s = dir.join("shard-00000-of-00002.safetensors");
    let e = KnowledgeFile::open(&s).unwrap_err().to_string();
    assert!(
        e.contains("is one shard") && e.contains("kd-precompute merge"),
        "{e}"
    );
}
