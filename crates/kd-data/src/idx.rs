//! The IDX format of MNIST and Fashion-MNIST, gzipped or raw, read defensively.
//!
//! candle-datasets' `mnist::load_dir` reads raw IDX files, but it allocates whatever count a header
//! declares, does not check for trailing bytes and its errors do not name the file; the pipeline
//! reads its inputs here instead, and checks every field.

use crate::{DataError, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Element type code of unsigned bytes, the only one image datasets use.
const UBYTE: u8 = 0x08;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes with `rank` dimensions. Gzip is detected from the content;
/// a file named `.gz` that is not gzip is refused. The declared size is never allocated up front,
/// so a corrupt header cannot exhaust memory.
pub fn read_idx(path: &Path, rank: usize) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    parse(BufReader::new(file), file_len, path, rank)
}

/// [`read_idx`] on bytes in memory; `path` names them in errors and says whether they claim to
/// be gzip (`.gz`). What the fuzz target drives.
pub fn parse_idx(bytes: &[u8], path: &Path, rank: usize) -> Result<IdxArray> {
    parse(bytes, bytes.len() as u64, path, rank)
}

fn parse<'a, R: BufRead + 'a>(
    mut buffered: R,
    file_len: u64,
    path: &Path,
    rank: usize,
) -> Result<IdxArray> {
    if file_len == 0 {
        return Err(DataError::invalid(path, "empty file"));
    }
    let head = buffered.fill_buf().map_err(|e| DataError::io(path, e))?;
    let gzipped = head.len() >= 2 && head[..2] == GZIP_MAGIC;
    let named_gz = path.extension().is_some_and(|e| e == "gz");
    if named_gz && !gzipped {
        return Err(DataError::invalid(
            path,
            "named .gz but is not gzip-compressed",
        ));
    }
    let mut reader: Box<dyn Read + 'a> = if gzipped {
        Box::new(flate2::read::MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };

    let dims = read_dims(&mut reader, path, rank)?;
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::invalid(path, format!("declared size {dims:?} overflows")))?;
    let header_len = 4 + 4 * rank as u64;
    if !gzipped && file_len - header_len < expected as u64 {
        return Err(truncated(
            path,
            &dims,
            expected,
            (file_len - header_len) as usize,
        ));
    }
    // Grows with what is actually read: a huge declared count on a short file costs nothing.
    let mut data = Vec::with_capacity(expected.min(file_len.saturating_mul(8) as usize));
    reader
        .take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| DataError::invalid(path, format!("corrupt or truncated gzip data: {e}")))?;
    if data.len() < expected {
        return Err(truncated(path, &dims, expected, data.len()));
    }
    if data.len() > expected {
        return Err(DataError::invalid(
            path,
            format!("has bytes after the {expected} that its header {dims:?} declares"),
        ));
    }
    Ok(IdxArray { dims, data })
}

/// The magic number (unsigned bytes, `rank` dimensions) and the dimensions, none zero.
fn read_dims(reader: &mut dyn Read, path: &Path, rank: usize) -> Result<Vec<usize>> {
    let mut magic = [0u8; 4];
    read_header(reader, &mut magic, path, "magic number")?;
    let expected_magic = [0, 0, UBYTE, rank as u8];
    if magic[..2] != [0, 0] || magic[3] == 0 {
        return Err(DataError::invalid(
            path,
            format!(
                "wrong magic number 0x{} (expected 0x{}: IDX, unsigned bytes, {rank} dimension(s))",
                crate::files::hex(&magic),
                crate::files::hex(&expected_magic)
            ),
        ));
    }
    if magic[2] != UBYTE {
        return Err(DataError::invalid(
            path,
            format!(
                "IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
                magic[2]
            ),
        ));
    }
    if magic[3] as usize != rank {
        return Err(DataError::invalid(
            path,
            format!("has {} dimension(s), expected {rank}", magic[3]),
        ));
    }
    let mut dims = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut b = [0u8; 4];
        read_header(reader, &mut b, path, &format!("dimension {i}"))?;
        let d = u32::from_be_bytes(b) as usize;
        if d == 0 {
            return Err(DataError::invalid(path, format!("dimension {i} is zero")));
        }
        dims.push(d);
    }
    Ok(dims)
}

fn read_header(reader: &mut dyn Read, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => DataError::invalid(
            path,
            format!("truncated header: the file ends before its {what}"),
        ),
        _ => DataError::invalid(path, format!("cannot read the header ({what}): {e}")),
    })
}

fn truncated(path: &Path, dims: &[usize], expected: usize, got: usize) -> DataError {
    DataError::invalid(
        path,
        format!("truncated data: the header declares {dims:?} ({expected} bytes) but only {got} bytes follow"),
    )
}

/// Encodes an IDX array of unsigned bytes (used by tests and by tools that write subsets).
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, UBYTE, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn err(path: &Path, rank: usize) -> String {
        read_idx(path, rank).unwrap_err().to_string()
    }

    #[test]
    fn reads_raw_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let raw = encode_idx(&[2, 3, 4], &data);
        for p in [
            write(dir.path(), "a-idx3-ubyte", &raw),
            write(dir.path(), "a-idx3-ubyte.gz", &gz(&raw)),
        ] {
            let a = read_idx(&p, 3).unwrap();
            assert_eq!(a.dims, vec![2, 3, 4]);
            assert_eq!(a.data, data);
        }
    }

    #[test]
    fn refuses_broken_files_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let good = encode_idx(&[3], &[1, 2, 3]);
        let cases: Vec<(&str, Vec<u8>, usize, &str)> = vec![
            ("empty", vec![], 1, "empty file"),
            ("short-header", vec![0, 0, 8], 1, "truncated header"),
            ("no-dims", vec![0, 0, 8, 1, 0, 0], 1, "truncated header"),
            ("short-data", encode_idx(&[5], &[1, 2]), 1, "truncated data"),
            (
                "trailing",
                [good.clone(), vec![9]].concat(),
                1,
                "bytes after",
            ),
            (
                "magic",
                [vec![1, 2, 8, 1], good[4..].to_vec()].concat(),
                1,
                "wrong magic number",
            ),
            (
                "dtype",
                [vec![0, 0, 0x0d, 1], good[4..].to_vec()].concat(),
                1,
                "not supported",
            ),
            ("rank", good.clone(), 3, "expected 3"),
            ("zero", encode_idx(&[0], &[]), 1, "is zero"),
        ];
        for (name, bytes, rank, want) in cases {
            let p = write(dir.path(), name, &bytes);
            let e = err(&p, rank);
            assert!(e.contains(want), "{name}: {e}");
            assert!(e.contains(name), "error does not name the file: {e}");
        }
    }

    #[test]
    fn gz_name_without_gzip_and_truncated_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let raw = encode_idx(&[4], &[1, 2, 3, 4]);
        let p = write(dir.path(), "labels.gz", &raw);
        assert!(err(&p, 1).contains("not gzip"));
        let packed = gz(&encode_idx(&[1000], &[7; 1000]));
        let p = write(dir.path(), "cut.gz", &packed[..packed.len() / 2]);
        let e = err(&p, 1);
        assert!(
            e.contains("cut.gz") && (e.contains("truncated") || e.contains("corrupt")),
            "{e}"
        );
    }

    #[test]
    fn huge_declared_count_is_not_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0, 0, 8, 3];
        for d in [u32::MAX, u32::MAX, 1] {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(&[0; 64]);
        let p = write(dir.path(), "huge", &bytes);
        assert!(err(&p, 3).contains("truncated data"));
        let p = write(dir.path(), "huge.gz", &gz(&bytes));
        assert!(err(&p, 3).contains("truncated data"));
    }
}
