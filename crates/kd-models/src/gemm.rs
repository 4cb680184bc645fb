//! Matrix products through the `gemm` crate (the one candle's CPU matmul calls), behind a safe
//! interface: strided views checked against their slices before any pointer is handed over.

use candle_core::{Result, WithDType};
use std::marker::PhantomData;
use std::ops::Range;

/// A matrix in a slice: element `(i, j)` at `data[i * row + j * col]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row: usize,
    pub col: usize,
}

impl<'a, T> View<'a, T> {
    /// A row-major `rows × cols` matrix whose rows lie `stride` apart (a block of columns of a
    /// wider matrix when `stride > cols`).
    pub fn rows(data: &'a [T], rows: usize, cols: usize, stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row: stride,
            col: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row: self.col,
            col: self.row,
            ..self
        }
    }

    /// Whether every element lies inside `len` elements.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row + (self.cols - 1) * self.col < len
    }
}

/// `dst = a · b`, `dst` row-major `a.rows × b.cols` with rows `dst_stride` apart; what `dst`
/// held is overwritten. On the calling thread: the convolutions call it once per chunk of
/// images, each chunk a task of their own parallel loop.
pub(crate) fn product<T: WithDType>(
    dst: &mut [T],
    dst_stride: usize,
    a: View<'_, T>,
    b: View<'_, T>,
) -> Result<()> {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let out = View::rows(&dst[..], m, n, dst_stride);
    if b.rows != k || !a.fits(a.data.len()) || !b.fits(b.data.len()) || !out.fits(dst.len()) {
        candle_core::bail!(
            "matrix product: {}x{} · {}x{} into {} elements with rows {dst_stride} apart",
            a.rows,
            a.cols,
            b.rows,
            b.cols,
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: every element of `a`, `b` and `dst` that gemm addresses (`i·row + j·col` for `i`
    // below rows and `j` below cols) lies inside its slice, as `fits` checked; `dst` is borrowed
    // mutably, so it overlaps neither input.
    #[allow(unsafe_code)]
    unsafe {
        gemm_into(dst.as_mut_ptr(), dst_stride, (m, n, k), a, b);
    }
    Ok(())
}

/// A block of columns of a row-major matrix (`rows × cols`, rows `stride` apart) that one task
/// owns while other tasks own the other blocks: what lets each chunk of images write its share
/// of a convolution's output (`[c, batch·pixels]`) in place, from its own thread, instead of
/// into a buffer of its own that one thread then copies over.
pub(crate) struct Block<'a, T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    stride: usize,
    _owns: PhantomData<&'a mut [T]>,
}

// SAFETY: a block is a unique borrow of its elements (no two blocks share one, see `blocks`), so
// it moves between threads as a `&mut [T]` does.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for Block<'_, T> {}

/// Splits `dst`, a row-major `rows × n` matrix, into blocks of the columns `ranges` (ascending,
/// disjoint, inside `0..n`): one block per range, each covering every row.
pub(crate) fn blocks<'a, T>(
    dst: &'a mut [T],
    rows: usize,
    n: usize,
    ranges: &[Range<usize>],
) -> Result<Vec<Block<'a, T>>> {
    let ascending = ranges.windows(2).all(|r| r[0].end <= r[1].start);
    let inside = ranges.iter().all(|r| r.start <= r.end && r.end <= n);
    if dst.len() != rows * n || !ascending || !inside {
        candle_core::bail!(
            "column blocks {ranges:?} of a {rows}x{n} matrix in {} elements",
            dst.len()
        );
    }
    let base = dst.as_mut_ptr();
    Ok(ranges
        .iter()
        .map(|r| Block {
            // `r.start <= n`, so the offset stays inside the allocation (or one past its end).
            ptr: base.wrapping_add(r.start),
            rows,
            cols: r.len(),
            stride: n,
            _owns: PhantomData,
        })
        .collect())
}

impl<T: WithDType> Block<'_, T> {
    /// Row `i` of the block.
    pub fn row(&mut self, i: usize) -> &mut [T] {
        assert!(i < self.rows, "row {i} of a block of {} rows", self.rows);
        // SAFETY: row `i`'s `cols` elements start `i·stride` past the block's first, inside the
        // matrix `blocks` checked; no other block holds them (disjoint columns), and `&mut self`
        // keeps this block from lending them twice.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(i * self.stride), self.cols)
        }
    }

    /// `block = a · b` (`a.rows == rows`, `b.cols == cols`); what it held is overwritten.
    pub fn product(&mut self, a: View<'_, T>, b: View<'_, T>) -> Result<()> {
        let (m, n, k) = (a.rows, b.cols, a.cols);
        if m != self.rows
            || n != self.cols
            || b.rows != k
            || !a.fits(a.data.len())
            || !b.fits(b.data.len())
        {
            candle_core::bail!(
                "matrix product: {}x{} · {}x{} into a {}x{} block",
                a.rows,
                a.cols,
                b.rows,
                b.cols,
                self.rows,
                self.cols
            );
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        // SAFETY: as in `product` for `a` and `b`; gemm writes element `(i, j)` of the block at
        // `i·stride + j` for `i < rows`, `j < cols`: this block's own elements (see `row`).
        #[allow(unsafe_code)]
        unsafe {
            gemm_into(self.ptr, self.stride, (m, n, k), a, b);
        }
        Ok(())
    }
}

/// `dst = a · b` through gemm, on this thread, for `(m, n, k)` = (`a.rows`, `b.cols`, `a.cols`).
/// With `read_dst` false (and `k == 0`) gemm writes `dst` without reading it.
///
/// # Safety
/// Every element gemm addresses — `a` and `b` by their strides, `dst` at `i·dst_stride + j` for
/// `i < m`, `j < n` — must be valid, `dst`'s writable and overlapping neither input nor anything
/// another thread uses.
#[allow(unsafe_code)]
unsafe fn gemm_into<T: WithDType>(
    dst: *mut T,
    dst_stride: usize,
    (m, n, k): (usize, usize, usize),
    a: View<'_, T>,
    b: View<'_, T>,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            false,
            a.data.as_ptr(),
            a.col as isize,
            a.row as isize,
            b.data.as_ptr(),
            b.col as isize,
            b.row as isize,
            T::from_f64(0.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
