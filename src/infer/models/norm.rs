//! The RMS norm on the CPU in f32, as candle-nn's `rms_norm` computes it: a
//! row's squares summed in order in f32, then `x / sqrt(mean + eps) * w`.
//! Candle runs up to 32 rows on one thread, each row's sum a chain of
//! dependent additions, and more on rayon's threads beside the barrier
//! pool's. Here the rows are spread over the barrier pool, and eight rows'
//! chains run side by side: the same operations on each value, so the
//! same bits.

use crate::infer::dense::{forward_rows, par_spans};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use std::mem::MaybeUninit;

/// Rows whose sums run side by side, and a work item's rows.
const TOGETHER: usize = 8;

/// `x` RMS-normalised along its last dimension and scaled by `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return x.apply_op2_no_bwd(w, &RmsNorm(eps));
    }
    candle_nn::ops::rms_norm(x, w, eps)
}

struct RmsNorm(f32);

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "parallel-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(w), Some((start, end))) = (w, w_layout.contiguous_offsets()) else {
            candle_core::bail!("{}: the weights are not contiguous f32", self.name())
        };
        let w = &w[start..end];
        forward_rows(self.name(), (w.len(), w.len()), x, x_layout, |x, out| rows(x, w, self.0, out))
    }
}

/// Each row of `x` (rows of `w.len()`), normalised, into `out`.
fn rows(x: &[f32], w: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let n = w.len();
    let count = x.len() / n;
    if count <= TOGETHER {
        return group(x, w, eps, out);
    }
    par_spans(out, TOGETHER * n, |span, out| group(&x[span], w, eps, out));
}

/// Up to [`TOGETHER`] rows, their sums side by side.
fn group(x: &[f32], w: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let n = w.len();
    let rows = x.len() / n;
    let mut sums = [0f32; TOGETHER];
    for j in 0..n {
        for (r, sum) in sums[..rows].iter_mut().enumerate() {
            let v = x[r * n + j];
            *sum += v * v;
        }
    }
    for ((x, out), sum) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).zip(sums) {
        let m = (sum / n as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
            o.write(v / m * w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::test_values as values;
    use candle_core::Device;

    /// candle-nn's bits, for one row to many (its one-thread and rayon
    /// paths; ours inline and on the pool, with a partial last group), on
    /// an odd width, with a zero row and rows of very large values.
    #[test]
    fn candles_bits_for_any_number_of_rows() {
        for (rows, n) in [(1, 640), (7, 640), (8, 5), (9, 640), (33, 640), (100, 37)] {
            let mut x = values(rows * n, 3);
            x[..n].fill(0.0);
            for v in &mut x[n * (rows - 1)..] {
                *v *= 1e19;
            }
            let w = values(n, 4);
            let x = Tensor::from_vec(x, (1, rows, n), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(w, n, &Device::Cpu).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = rms_norm(&x, &w, 1e-6).unwrap();
            assert_eq!(got.dims(), &[1, rows, n]);
            for (i, (g, w)) in got.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{rows} rows of {n}: value {i} is {g}, candle's {w}");
            }
        }
    }
}
