//! Dense f32 matmuls on the CPU whose every output is one fixed sequence of
//! operations, whatever the number of rows computed beside it: a response
//! or a score does not depend on its batch.
//!
//! BLAS-style kernels (candle's gemm) pick their blocking, and so the order
//! of the sums, from the matrix shapes, so a row's result changes with the
//! number of rows in the batch. Here `y[i][j] = x[i] . w[j]` is always the
//! same: 16 lanes, lane `l` summing the products `x[k] * w[k]` of every
//! `k = l (mod 16)` in order (a multiply, then an add: no fused
//! multiply-add, so every CPU rounds alike), then the lanes added in a fixed
//! tree. Blocks of rows share each load of `w[j]`, and the work is split
//! by rows and columns only, never along `k`.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::mem::MaybeUninit;
use std::ops::Range;

const LANES: usize = 16;
/// Activation rows that share a load of a weight row.
const ROWS: usize = 4;
/// Output columns a work item takes: 16 weight rows, reused over a row block.
const COLS: usize = 16;
/// Activation rows a work item takes.
const ROW_BLOCK: usize = 64;

/// A weight matrix `(n, k)` on the CPU in f32, for `x (m, k) @ w^T`.
pub struct DenseMatrix {
    n: usize,
    k: usize,
    /// Contiguous, f32, on the CPU (shared with the model, not copied).
    w: Tensor,
}

impl DenseMatrix {
    /// A 2-D tensor `(n, k)` (made contiguous f32 on the CPU if it is not).
    pub fn new(w: &Tensor) -> candle_core::Result<DenseMatrix> {
        let (n, k) = w.dims2()?;
        let w = w.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?.contiguous()?;
        Ok(DenseMatrix { n, k, w })
    }

    /// `out (m, n) = x (m, k) @ w^T`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_into(x, written(out))
    }

    /// [`DenseMatrix::matmul`] into memory not yet written; writes every value.
    fn matmul_into(&self, x: &[f32], out: &mut [MaybeUninit<f32>]) {
        let (storage, layout) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            unreachable!("DenseMatrix::new keeps f32 weights on the CPU")
        };
        let (start, end) = layout.contiguous_offsets().expect("DenseMatrix::new keeps the weights contiguous");
        self.matmul_with(&data[start..end], x, out);
    }

    fn matmul_with(&self, w: &[f32], x: &[f32], out: &mut [MaybeUninit<f32>]) {
        let (n, k) = (self.n, self.k);
        assert!(
            k > 0 && x.len().is_multiple_of(k) && out.len() == x.len() / k * n,
            "matmul shapes: {} x {k} -> {} x {n}",
            x.len(),
            out.len()
        );
        let m = x.len() / k;
        let tiles = n.div_ceil(COLS);
        let blocks = m.div_ceil(ROW_BLOCK);
        let job = Job { w, x, out: out.as_mut_ptr() as usize, k, n, m };
        let item = |i: usize| {
            let (rows, t) = (i / tiles * ROW_BLOCK..((i / tiles + 1) * ROW_BLOCK).min(m), i % tiles);
            job.block(rows, t * COLS..((t + 1) * COLS).min(n));
        };
        let items = blocks * tiles;
        if m * n * k < 1 << 16 {
            (0..items).for_each(item);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(items, |range| range.for_each(item));
        }
    }
}

/// One matmul: `out (m, n) = x (m, k) @ w (n, k)^T`, in blocks of rows and columns.
struct Job<'a> {
    w: &'a [f32],
    x: &'a [f32],
    /// The output's address: blocks write disjoint cells of it.
    out: usize,
    k: usize,
    n: usize,
    m: usize,
}

impl Job<'_> {
    /// The products of one row block and one column range.
    fn block(&self, rows: Range<usize>, cols: Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2; the code is the same, only wider.
            return unsafe { self.block_avx2(rows, cols) };
        }
        self.block_any(rows, cols)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn block_avx2(&self, rows: Range<usize>, cols: Range<usize>) {
        self.block_any(rows, cols)
    }

    #[inline(always)]
    fn block_any(&self, rows: Range<usize>, cols: Range<usize>) {
        let (w, x, k, n) = (self.w, self.x, self.k, self.n);
        // SAFETY: blocks write disjoint (row, column) cells of the output,
        // which outlives the matmul.
        let out = unsafe { std::slice::from_raw_parts_mut(self.out as *mut MaybeUninit<f32>, self.m * n) };
        let mut r = rows.start;
        while r < rows.end {
            let take = ROWS.min(rows.end - r);
            for j in cols.clone() {
                let wj = &w[j * k..(j + 1) * k];
                let mut acc = [[0f32; LANES]; ROWS];
                let whole = k / LANES * LANES;
                for c in (0..whole).step_by(LANES) {
                    let wc = &wj[c..c + LANES];
                    for (i, a) in acc.iter_mut().enumerate().take(take) {
                        let xc = &x[(r + i) * k + c..][..LANES];
                        for l in 0..LANES {
                            a[l] += xc[l] * wc[l];
                        }
                    }
                }
                for (i, a) in acc.iter_mut().enumerate().take(take) {
                    let xr = &x[(r + i) * k..(r + i + 1) * k];
                    for c in whole..k {
                        a[c - whole] += xr[c] * wj[c];
                    }
                    out[(r + i) * n + j].write(reduce(a));
                }
            }
            r += take;
        }
    }
}

/// The lanes added in a fixed tree: (l, l + 8), then (l, l + 4), ...
#[inline(always)]
fn reduce(a: &[f32; LANES]) -> f32 {
    let mut v = *a;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// `out` as memory to write into (a kernel's output view): it only ever
/// receives initialized values.
pub(crate) fn written(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; writing initialized f32s keeps `out` initialized.
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// `work(span, &mut out[span])` for each span of `chunk` values (the last
/// shorter) covering `out`, the spans spread over the barrier pool.
pub(crate) fn par_spans(
    out: &mut [MaybeUninit<f32>],
    chunk: usize,
    work: impl Fn(Range<usize>, &mut [MaybeUninit<f32>]) + Sync,
) {
    let (len, at) = (out.len(), out.as_mut_ptr() as usize);
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(chunk), |items| {
        for item in items {
            let span = item * chunk..((item + 1) * chunk).min(len);
            // SAFETY: each item writes only its own span of `out`, which
            // outlives the call.
            let out =
                unsafe { std::slice::from_raw_parts_mut((at as *mut MaybeUninit<f32>).add(span.start), span.len()) };
            work(span, out);
        }
    });
}

/// A view's rows as `(first value, row stride, width, rows)`, where its last
/// dimension is contiguous and its rows evenly spaced (a contiguous tensor,
/// or a narrow of its columns, as [`crate::infer::qmatmul::matmuls`]'
/// outputs are read); None for other layouts.
pub(crate) fn strided_rows(layout: &Layout) -> Option<(usize, usize, usize, usize)> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let rank = dims.len();
    let width = *dims.last()?;
    if width > 1 && stride[rank - 1] != 1 {
        return None;
    }
    let row_stride = if rank >= 2 { stride[rank - 2] } else { width };
    if (0..rank.saturating_sub(2)).any(|i| dims[i] > 1 && stride[i] != stride[i + 1] * dims[i + 1]) {
        return None;
    }
    Some((layout.start_offset(), row_stride, width, dims[..rank - 1].iter().product()))
}

/// A CPU matmul as a candle op: contiguous f32 activations `(..., k)` to
/// `(..., n)` through `matmul(x, out)`, which writes every value of `out`.
/// Both of prefgen's kernels and the parallel activation run so.
pub(crate) fn forward_rows(
    name: &str,
    (k, n): (usize, usize),
    storage: &CpuStorage,
    layout: &Layout,
    matmul: impl FnOnce(&[f32], &mut [MaybeUninit<f32>]),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{name} takes f32 activations") };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name} takes contiguous activations")
    };
    let mut dims = layout.dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!("{name}: activations {dims:?} do not end in {k}");
    }
    let x = &data[start..end];
    // Not zeroed first: a single-threaded memset was 3% of a prefill.
    let len = x.len() / k * n;
    let mut out = Vec::with_capacity(len);
    matmul(x, &mut out.spare_capacity_mut()[..len]);
    // SAFETY: `matmul` writes every value (its contract, below).
    unsafe { out.set_len(len) };
    *dims.last_mut().expect("checked above") = n;
    Ok((CpuStorage::F32(out), Shape::from(dims)))
}

impl CustomOp1 for DenseMatrix {
    fn name(&self) -> &'static str {
        "dense-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        forward_rows(self.name(), (self.k, self.n), storage, layout, |x, out| self.matmul_into(x, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::test_values as values;

    /// Every row is bit for bit the same alone as in any batch, whichever
    /// path (AVX2 or not) runs, and close to an f64 reference.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (n, k, m) = (37, 203, 70); // partial tiles, a k tail, more rows than a block
        let w = values(n * k, 1);
        let dense = DenseMatrix::new(&Tensor::from_vec(w.clone(), (n, k), &candle_core::Device::Cpu).unwrap()).unwrap();
        let x = values(m * k, 2);
        let mut all = vec![0.0; m * n];
        dense.matmul(&x, &mut all);
        let mut portable = vec![0f32; m * n];
        Job { w: &w, x: &x, out: portable.as_mut_ptr() as usize, k, n, m }.block_any(0..m, 0..n);
        assert!(all.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "the AVX2 path rounds otherwise");
        for i in 0..m {
            let mut one = vec![0.0; n];
            dense.matmul(&x[i * k..(i + 1) * k], &mut one);
            assert!(one.iter().zip(&all[i * n..]).all(|(a, b)| a.to_bits() == b.to_bits()), "row {i}");
            for j in 0..n {
                let want: f64 = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum();
                assert!((one[j] as f64 - want).abs() < 1e-4, "({i}, {j}): {} vs {want}", one[j]);
            }
        }
    }
}
