//! Matrix products through the `gemm` crate (the one candle's CPU matmul calls), behind a safe
//! interface: strided views checked against their slices before any pointer is handed over.

use candle_core::{Result, WithDType};

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
    // mutably, so it overlaps neither input. With `read_dst` false (and `k == 0`) gemm writes
    // `dst` without reading it.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
    Ok(())
}
