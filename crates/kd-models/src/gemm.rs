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

/// `a · b` as a fresh row-major matrix, written once by the product (never zero-filled first).
pub(crate) fn fresh_product<T: WithDType>(a: View<'_, T>, b: View<'_, T>) -> Result<Vec<T>> {
    let (m, n) = (a.rows, b.cols);
    let mut out = Filling::new(m, n, std::iter::once(0..n).collect(), 0)?;
    let mut blocks = out.blocks()?;
    let Some(mut block) = blocks.pop() else {
        candle_core::bail!("a {m}x{n} matrix without its block");
    };
    block.product(a, b)?;
    let written = block.written()?;
    out.finish(vec![written])
}

/// A row-major `rows × n` matrix that parallel tasks build in place, each its own block of
/// columns: what lets each chunk of images write its share of a convolution's output
/// (`[c, batch·pixels]`) from its own thread, instead of into a buffer of its own that one thread
/// then copies over. The matrix is not zero-filled first (the products overwrite it anyway): it is
/// handed out only once every block has proved it wrote every one of its elements.
pub(crate) struct Filling<T> {
    /// Capacity for the matrix (and `spare` more); length 0 until [`Filling::finish`].
    buf: Vec<T>,
    rows: usize,
    n: usize,
    tiles: Vec<Range<usize>>,
    handed_out: bool,
}

/// A block of columns of a [`Filling`] (`rows × cols`, rows `stride` apart), owned by one task.
pub(crate) struct Block<'a, T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    stride: usize,
    /// Whether every element has been written (by a product or zeros).
    written: bool,
    /// The filling it belongs to (its buffer's address), for its [`Written`] proof.
    of: usize,
    _owns: PhantomData<&'a mut [T]>,
}

// SAFETY: a block is the only handle to its elements (blocks tile the matrix without overlap, and
// a filling hands its blocks out once), so it moves between threads as a `&mut [T]` does.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for Block<'_, T> {}

/// Runs of a [`Block`]'s rows lent one by one to code that writes them through raw pointers
/// (the k×k convolutions' kernels, [`crate::implicit`]), each checked to lie inside the block.
pub(crate) struct Runs<'b, T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    stride: usize,
    lent: usize,
    /// Borrowed from its block (mutably) for as long as it lives.
    _block: PhantomData<&'b mut T>,
}

impl<T> Runs<'_, T> {
    /// Where `len` elements of row `row` from column `col` on start, if they lie inside the
    /// block: the caller must write each of them before the block is read (and writes nothing
    /// outside them).
    pub fn run(&mut self, row: usize, col: usize, len: usize) -> Option<*mut T> {
        if row >= self.rows || col + len > self.cols {
            return None;
        }
        self.lent += len;
        // `row·stride + col` lies inside the matrix (see `Filling::blocks`).
        Some(self.ptr.wrapping_add(row * self.stride + col))
    }
}

/// A block's proof that it wrote all of its elements ([`Block::written`]).
pub(crate) struct Written {
    of: usize,
}

impl<T: WithDType> Filling<T> {
    /// A `rows × n` matrix whose columns `tiles` (in order, from 0 to `n` without gap) will be
    /// written block by block, with room for `spare` more elements after it.
    pub fn new(rows: usize, n: usize, tiles: Vec<Range<usize>>, spare: usize) -> Result<Self> {
        let starts = std::iter::once(0).chain(tiles.iter().map(|r| r.end));
        let tiled = starts
            .zip(&tiles)
            .all(|(s, r)| r.start == s && r.start <= r.end)
            && tiles.last().map_or(0, |r| r.end) == n;
        if !tiled {
            candle_core::bail!("column blocks {tiles:?} do not tile the {n} columns of a matrix");
        }
        Ok(Self {
            buf: Vec::with_capacity(rows * n + spare),
            rows,
            n,
            tiles,
            handed_out: false,
        })
    }

    /// The blocks, one per tile; only once.
    pub fn blocks(&mut self) -> Result<Vec<Block<'_, T>>> {
        if std::mem::replace(&mut self.handed_out, true) {
            candle_core::bail!("a matrix's blocks were handed out twice");
        }
        let base = self.buf.as_mut_ptr();
        let of = base as usize;
        Ok(self
            .tiles
            .iter()
            .map(|r| Block {
                // `r.start <= n`: inside the buffer's capacity (or one past its end).
                ptr: base.wrapping_add(r.start),
                rows: self.rows,
                cols: r.len(),
                stride: self.n,
                written: self.rows == 0 || r.is_empty(),
                of,
                _owns: PhantomData,
            })
            .collect())
    }

    /// The matrix, once every block has proved it wrote its elements.
    pub fn finish(mut self, proofs: Vec<Written>) -> Result<Vec<T>> {
        let of = self.buf.as_ptr() as usize;
        if !self.handed_out || proofs.len() != self.tiles.len() || proofs.iter().any(|p| p.of != of)
        {
            candle_core::bail!("a matrix finished before all of its blocks were written");
        }
        // SAFETY: the blocks tile every column (checked in `new`), each covers every row, each was
        // handed out once, and each proved (its `Written`) that it wrote all its elements: the
        // first `rows · n` elements are initialised, within the capacity reserved in `new`.
        #[allow(unsafe_code)]
        unsafe {
            self.buf.set_len(self.rows * self.n);
        }
        Ok(self.buf)
    }
}

impl<T: WithDType> Block<'_, T> {
    /// Sets every element to zero (before adding into it).
    pub fn zero(&mut self) {
        for i in 0..self.rows {
            // SAFETY: row `i`'s `cols` elements lie inside the matrix (see `Filling::blocks`) and
            // belong to this block alone; all-zero bytes are the zero of every candle dtype.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::write_bytes(self.ptr.add(i * self.stride), 0, self.cols);
            }
        }
        self.written = true;
    }

    /// Row `i` of the block, once written.
    pub fn row(&mut self, i: usize) -> &mut [T] {
        assert!(self.written, "a block read before it was written");
        assert!(i < self.rows, "row {i} of a block of {} rows", self.rows);
        // SAFETY: row `i`'s `cols` elements start `i·stride` past the block's first, inside the
        // matrix, initialised (`written`), and no other block holds them; `&mut self` keeps this
        // block from lending them twice.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(i * self.stride), self.cols)
        }
    }

    /// `block = a · b` (`a.rows == rows`, `b.cols == cols`), every element written.
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
        if k == 0 {
            self.zero();
            return Ok(());
        }
        if m > 0 && n > 0 {
            // SAFETY: as in `product` for `a` and `b`; gemm writes (without reading) element
            // `(i, j)` of the block at `i·stride + j` for `i < rows`, `j < cols`: this block's own
            // elements (see `row`).
            #[allow(unsafe_code)]
            unsafe {
                gemm_into(self.ptr, self.stride, (m, n, k), a, b);
            }
        }
        self.written = true;
        Ok(())
    }

    /// Lets `fill` write the block run by run through a [`Runs`], and counts it written if
    /// the runs lent cover as many elements as the block holds (each run is checked to lie
    /// inside the block; `fill` writes a run once, every element of it).
    pub fn fill_runs(&mut self, fill: impl FnOnce(&mut Runs<'_, T>) -> Result<()>) -> Result<()> {
        let mut runs = Runs {
            ptr: self.ptr,
            rows: self.rows,
            cols: self.cols,
            stride: self.stride,
            lent: 0,
            _block: PhantomData,
        };
        fill(&mut runs)?;
        let lent = runs.lent;
        if lent != self.rows * self.cols {
            candle_core::bail!(
                "{lent} elements written into a {}x{} block",
                self.rows,
                self.cols
            );
        }
        self.written = true;
        Ok(())
    }

    /// Its proof of having written every element, or an error if it has not.
    pub fn written(self) -> Result<Written> {
        if !self.written {
            candle_core::bail!("a block of a matrix was left unwritten");
        }
        Ok(Written { of: self.of })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37) % 101) as f32 * scale - 1.3)
            .collect()
    }

    /// A product reads the same bits from a block of columns of wider rows as from a copy of
    /// that block (what the convolution's backward relies on when it copies the columns of rows
    /// that would thrash the cache).
    #[test]
    fn strided_and_copied_operands_give_the_same_bits() {
        let (m, k, n, wide) = (24, 600, 40, 4096);
        let (a, b) = (ramp(m * wide, 0.011), ramp(n * wide, 0.013));
        let at = 1000;
        let copied: Vec<f32> = (0..n)
            .flat_map(|r| b[r * wide + at..r * wide + at + k].to_vec())
            .collect();
        let (mut strided_out, mut copied_out) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        let a = View::rows(&a[at..], m, k, wide);
        product(&mut strided_out, n, a, View::rows(&b[at..], n, k, wide).t()).unwrap();
        product(&mut copied_out, n, a, View::rows(&copied, n, k, k).t()).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&strided_out), bits(&copied_out));
        assert!(strided_out.iter().any(|&x| x != 0.0));
    }

    /// `(b · a)ᵀ` computed as `aᵀ · bᵀ` has the same bits as `b · a` (what lets the convolution's
    /// backward compute its weight gradient transposed where that is faster), for a long inner
    /// dimension as in `dW = dy · colsᵀ`.
    #[test]
    fn a_transposed_product_has_the_same_bits() {
        for (m, k, n) in [(48, 392, 144), (16, 72, 9), (7, 1000, 33)] {
            let (dy, cols) = (ramp(m * k, 0.011), ramp(n * k, 0.013));
            let (mut dw, mut dw_t) = (vec![0.0f32; m * n], vec![0.0f32; n * m]);
            let (dy, cols) = (View::rows(&dy, m, k, k), View::rows(&cols, n, k, k));
            product(&mut dw, n, dy, cols.t()).unwrap();
            product(&mut dw_t, m, cols, dy.t()).unwrap();
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(dw[i * n + j].to_bits(), dw_t[j * m + i].to_bits());
                }
            }
            assert!(dw.iter().any(|&x| x != 0.0));
        }
    }

    /// Products written block by block equal one product of the whole matrix, to the bit.
    #[test]
    fn blocks_of_columns_build_the_whole_product() {
        let (m, k, n) = (5, 7, 23);
        let (a, b) = (ramp(m * k, 0.03), ramp(k * n, 0.07));
        let mut whole = vec![0.0f32; m * n];
        product(
            &mut whole,
            n,
            View::rows(&a, m, k, k),
            View::rows(&b, k, n, n),
        )
        .unwrap();
        let tiles = vec![0..4, 4..4, 4..16, 16..23];
        let mut filling = Filling::new(m, n, tiles.clone(), 3).unwrap();
        let proofs = filling
            .blocks()
            .unwrap()
            .into_iter()
            .zip(&tiles)
            .map(|(mut block, r)| {
                let cols = View::rows(&b[r.start..], k, r.len(), n);
                block.product(View::rows(&a, m, k, k), cols).unwrap();
                block.written().unwrap()
            })
            .collect();
        let built = filling.finish(proofs).unwrap();
        assert_eq!(built, whole);
        assert!(built.capacity() >= m * n + 3);
    }

    /// A block written run by run counts as written only when the runs cover it, and a run
    /// outside the block is not lent.
    #[test]
    fn runs_cover_a_block_or_fail() {
        let mut filling = Filling::<f32>::new(2, 5, vec![0..3, 3..5], 0).unwrap();
        let mut blocks = filling.blocks().unwrap();
        let (mut right, mut left) = (blocks.pop().unwrap(), blocks.pop().unwrap());
        let short = right.fill_runs(|runs| {
            assert!(
                runs.run(0, 1, 2).is_none(),
                "a run past the block's columns"
            );
            assert!(runs.run(2, 0, 1).is_none(), "a row past the block's rows");
            let at = runs.run(0, 0, 2).unwrap();
            // SAFETY: `run` lent two elements at `at`.
            #[allow(unsafe_code)]
            unsafe {
                at.copy_from_nonoverlapping([7.0, 8.0].as_ptr(), 2)
            };
            Ok(())
        });
        assert!(short.is_err(), "one row of two written");
        left.fill_runs(|runs| {
            for row in 0..2 {
                let at = runs.run(row, 0, 3).unwrap();
                // SAFETY: `run` lent three elements at `at`.
                #[allow(unsafe_code)]
                unsafe {
                    at.copy_from_nonoverlapping([1.0, 2.0, 3.0].as_ptr(), 3)
                };
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(left.row(1), &[1.0, 2.0, 3.0]);
        assert!(left.written().is_ok());
        assert!(right.written().is_err());
    }

    #[test]
    fn a_matrix_is_handed_out_only_when_every_block_is_written() {
        // Tiles must cover the columns in order, without gap or overlap.
        let (short, late) = (vec![0..3, 3..5], vec![1..3, 3..6]);
        for bad in [vec![0..3, 4..6], vec![0..4, 3..6], short, late] {
            assert!(Filling::<f32>::new(2, 6, bad, 0).is_err());
        }
        let mut filling = Filling::<f32>::new(2, 6, vec![0..3, 3..6], 0).unwrap();
        let mut blocks = filling.blocks().unwrap();
        let unwritten = blocks.pop().unwrap();
        let mut zeroed = blocks.pop().unwrap();
        zeroed.zero();
        assert_eq!(zeroed.row(1), &[0.0; 3]);
        assert!(unwritten.written().is_err());
        let proofs = vec![zeroed.written().unwrap()];
        assert!(filling.finish(proofs).is_err());
        // Blocks are handed out once.
        let mut again = Filling::<f32>::new(1, 2, vec![0..1, 1..2], 0).unwrap();
        drop(again.blocks().unwrap());
        assert!(again.blocks().is_err());
    }
}
