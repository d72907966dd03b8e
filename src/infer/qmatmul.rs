//! Quantized matmuls on the CPU with int8 dot products (AVX512-VNNI).
//!
//! candle has only scalar code for Q4_1, Q5_0 and Q5_1 (prefgen used to
//! re-quantize those to Q8_0, reading 1.7 times the bytes), and its Q8_0
//! kernel walks the weights once per activation row. Here the weights of a
//! Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 tensor are repacked once, at load, into
//! tiles of 16 output rows: each 32-weight block as unsigned integers `u`
//! with the file's f16 scale `d` and an f16 offset `m` (`w = d*u + m`, the
//! file's weights exactly). Activations are quantized per 32-block to int8,
//! `x = da*q` (llama.cpp's Q8_1), so one block of one row against a tile is
//! eight `vpdpbusd` that give 16 outputs, `d*da*sum(u*q) + m*(da*sum(q))`,
//! and a tile is loaded once for up to four activation rows.
//!
//! Rows never share an accumulator and every output is the same sequence
//! of operations whatever the batch, so a sequence's logits do not depend
//! on the rows computed beside it.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;

/// Output rows per tile: one 512-bit register of i32 or f32.
const TILE: usize = 16;
/// Weights per block, in every type packed here.
const BLOCK: usize = 32;
/// Bytes of a tile's block before its values: 16 f16 scales, 16 f16 offsets.
const HEADER: usize = 4 * TILE;
/// Activation rows a work item takes (prefill): ~100 KB of int8, in L2.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 64;

/// A weight matrix `(n, k)` repacked for [`PackedMatrix::matmul`].
pub struct PackedMatrix {
    n: usize,
    k: usize,
    /// 4-bit values (two a byte: `u[j] | u[j + 16] << 4`) or 8-bit ones.
    nibbles: bool,
    /// Tile after tile, each its `k / 32` blocks in order.
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Repacks `t` when this CPU has the instructions and `t` is a 2-D
    /// tensor of a type packed here; None otherwise (candle's kernels run it).
    pub fn new(t: &QTensor) -> candle_core::Result<Option<PackedMatrix>> {
        let (n, k) = match t.shape().dims() {
            &[n, k] if k.is_multiple_of(BLOCK) => (n, k),
            _ => return Ok(None),
        };
        let (block_bytes, nibbles) = match t.dtype() {
            GgmlDType::Q4_0 => (18, true),
            GgmlDType::Q4_1 => (20, true),
            GgmlDType::Q5_0 => (22, false),
            GgmlDType::Q5_1 => (24, false),
            GgmlDType::Q8_0 => (34, false),
            _ => return Ok(None),
        };
        if !supported() {
            return Ok(None);
        }
        let raw = t.data()?;
        let kb = k / BLOCK;
        let mut p = PackedMatrix { n, k, nibbles, data: Vec::new() };
        let tile_bytes = p.tile_bytes();
        p.data = vec![0; n.div_ceil(TILE) * kb * tile_bytes];
        for row in 0..n {
            let (tile, r) = (row / TILE, row % TILE);
            for b in 0..kb {
                let src = &raw[(row * kb + b) * block_bytes..][..block_bytes];
                let (d, m, u) = unpack(t.dtype(), src);
                let dst = &mut p.data[(tile * kb + b) * tile_bytes..][..tile_bytes];
                dst[2 * r..2 * r + 2].copy_from_slice(&d.to_le_bytes());
                dst[2 * (TILE + r)..2 * (TILE + r) + 2].copy_from_slice(&m.to_le_bytes());
                let values = &mut dst[HEADER..];
                // Values g*4..g*4+4 of every row sit together, as vpdpbusd
                // reads them: group g, row r, 4 bytes.
                if nibbles {
                    for g in 0..4 {
                        for j in 0..4 {
                            values[(g * TILE + r) * 4 + j] = u[4 * g + j] | u[4 * g + j + 16] << 4;
                        }
                    }
                } else {
                    for g in 0..8 {
                        values[(g * TILE + r) * 4..][..4].copy_from_slice(&u[4 * g..4 * g + 4]);
                    }
                }
            }
        }
        Ok(Some(p))
    }

    fn tile_bytes(&self) -> usize {
        HEADER + if self.nibbles { TILE * BLOCK / 2 } else { TILE * BLOCK }
    }

    /// `out (m, n) = x (m, k) @ w^T`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len().is_multiple_of(k) && out.len() == x.len() / k * n,
            "matmul shapes: {} x {k} -> {} x {n}",
            x.len(),
            out.len()
        );
        #[cfg(target_arch = "x86_64")]
        self.matmul_x86(x, out);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("packed matrices are built on x86-64 only (see `supported`)");
    }

    #[cfg(target_arch = "x86_64")]
    fn matmul_x86(&self, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let m = x.len() / k;
        let acts = Activations::quantize(x, k);
        let out_ptr = out.as_mut_ptr() as usize;
        let kb = k / BLOCK;
        let tile_bytes = self.tile_bytes();
        let tiles = n.div_ceil(TILE);
        // Work items are (row block, tile), row block major: a worker's run of
        // items keeps one block of quantized rows in cache while it walks the
        // tiles, instead of streaming every row once per tile.
        candle_core::utils::barrier_pool().execute_chunked(m.div_ceil(ROWS) * tiles, |items| {
            for item in items {
                let (rows, t) = (item / tiles * ROWS..((item / tiles + 1) * ROWS).min(m), item % tiles);
                let w = &self.data[t * kb * tile_bytes..(t + 1) * kb * tile_bytes];
                let cols = (n - t * TILE).min(TILE);
                // SAFETY: `supported()` was true when this matrix was built;
                // an item writes only its own rows and columns of `out`,
                // which outlives the call.
                unsafe {
                    avx512::tile(self.nibbles, w, &acts, rows, out_ptr as *mut f32, n, t * TILE, cols);
                }
            }
        });
    }
}

/// Whether this CPU runs the packed kernels.
fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One GGUF block as `(d, m, u)` with `w[j] = d*u[j] + m`; `m` is exact in
/// f16 (`-8d`, `-16d` and `-128d` only scale `d` by a power of two).
fn unpack(dtype: GgmlDType, b: &[u8]) -> (u16, u16, [u8; BLOCK]) {
    let half = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
    let offset = |d: f16, zero: f32| f16::from_f32(-zero * d.to_f32()).to_bits();
    let mut u = [0u8; BLOCK];
    // Q4: low nibbles are values 0..16, high nibbles 16..32; Q5 adds a fifth
    // bit from `qh`.
    let nibbles = |u: &mut [u8; BLOCK], qs: &[u8]| {
        for j in 0..16 {
            u[j] = qs[j] & 0x0F;
            u[j + 16] = qs[j] >> 4;
        }
    };
    let fifth = |u: &mut [u8; BLOCK], qh: &[u8]| {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for (j, v) in u.iter_mut().enumerate() {
            *v |= (((qh >> j) & 1) << 4) as u8;
        }
    };
    let d = half(0);
    match dtype {
        GgmlDType::Q4_0 => {
            nibbles(&mut u, &b[2..18]);
            (d.to_bits(), offset(d, 8.0), u)
        }
        GgmlDType::Q4_1 => {
            nibbles(&mut u, &b[4..20]);
            (d.to_bits(), half(2).to_bits(), u)
        }
        GgmlDType::Q5_0 => {
            nibbles(&mut u, &b[6..22]);
            fifth(&mut u, &b[2..6]);
            (d.to_bits(), offset(d, 16.0), u)
        }
        GgmlDType::Q5_1 => {
            nibbles(&mut u, &b[8..24]);
            fifth(&mut u, &b[4..8]);
            (d.to_bits(), half(2).to_bits(), u)
        }
        GgmlDType::Q8_0 => {
            for (v, &q) in u.iter_mut().zip(&b[2..34]) {
                *v = (q as i8 as i16 + 128) as u8;
            }
            (d.to_bits(), offset(d, 128.0), u)
        }
        other => unreachable!("{other:?} is not packed"),
    }
}

/// Activation rows quantized per 32-block: `x = d*q`, and `s = d*sum(q)`
/// for the weights' offsets.
#[cfg(target_arch = "x86_64")]
struct Activations {
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl Activations {
    /// Quantizes `x`, rows of `k`; long batches (prefill) on every thread.
    fn quantize(x: &[f32], k: usize) -> Activations {
        let blocks = x.len() / BLOCK;
        let mut a = Activations { k, q: vec![0; x.len()], d: vec![0.0; blocks], s: vec![0.0; blocks] };
        let (q, d, s) = (a.q.as_mut_ptr() as usize, a.d.as_mut_ptr() as usize, a.s.as_mut_ptr() as usize);
        let rows = |rows: std::ops::Range<usize>| {
            let (from, to) = (rows.start * k / BLOCK, rows.end * k / BLOCK);
            // SAFETY: `supported()` holds wherever a packed matrix exists;
            // each range of rows writes only its own blocks.
            unsafe {
                let q = std::slice::from_raw_parts_mut((q as *mut i8).add(from * BLOCK), (to - from) * BLOCK);
                let d = std::slice::from_raw_parts_mut((d as *mut f32).add(from), to - from);
                let s = std::slice::from_raw_parts_mut((s as *mut f32).add(from), to - from);
                avx512::quantize(&x[from * BLOCK..to * BLOCK], q, d, s);
            }
        };
        let m = x.len() / k;
        if m >= 64 {
            candle_core::utils::barrier_pool().execute_chunked(m, rows);
        } else {
            rows(0..m);
        }
        a
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activations, BLOCK, HEADER};
    use std::arch::x86_64::*;

    /// Quantizes 32-blocks of `x` into `q` (rounded to nearest even), with
    /// their steps `d` and `s = d * sum(q)`.
    ///
    /// SAFETY: the CPU has AVX512F; `q` is as long as `x`, `d` and `s` have
    /// a value per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        for (b, (d, s)) in d.iter_mut().zip(s.iter_mut()).enumerate() {
            let (lo, hi) = unsafe {
                (_mm512_loadu_ps(x.as_ptr().add(b * BLOCK)), _mm512_loadu_ps(x.as_ptr().add(b * BLOCK + 16)))
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            *d = amax / 127.0;
            let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let (lo, hi) = (_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv)));
            *s = *d * _mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi)) as f32;
            unsafe {
                _mm_storeu_si128(q.as_mut_ptr().add(b * BLOCK) as *mut __m128i, _mm512_cvtepi32_epi8(lo));
                _mm_storeu_si128(q.as_mut_ptr().add(b * BLOCK + 16) as *mut __m128i, _mm512_cvtepi32_epi8(hi));
            }
        }
    }

    /// Rows `span` of `out (m, n)` at columns `col..col + cols` from one
    /// tile `w` (all its blocks), four rows at a time.
    ///
    /// SAFETY: the CPU has AVX512F, BW and VNNI; `out` holds `m * n` floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(
        nibbles: bool,
        w: &[u8],
        a: &Activations,
        span: std::ops::Range<usize>,
        out: *mut f32,
        n: usize,
        col: usize,
        cols: usize,
    ) {
        let mask: __mmask16 = if cols == super::TILE { !0 } else { (1u16 << cols) - 1 };
        let mut r = span.start;
        while r < span.end {
            let out = unsafe { out.add(r * n + col) };
            // Tails run the same per-row code with fewer rows.
            unsafe {
                match (span.end - r).min(4) {
                    4 => rows::<4>(nibbles, w, a, r, out, n, mask),
                    3 => rows::<3>(nibbles, w, a, r, out, n, mask),
                    2 => rows::<2>(nibbles, w, a, r, out, n, mask),
                    _ => rows::<1>(nibbles, w, a, r, out, n, mask),
                }
            }
            r += 4;
        }
    }

    /// Rows `r0..r0 + R` against one tile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn rows<const R: usize>(
        nibbles: bool,
        w: &[u8],
        a: &Activations,
        r0: usize,
        out: *mut f32,
        n: usize,
        mask: __mmask16,
    ) {
        let kb = a.k / BLOCK;
        let tile_bytes = w.len() / kb;
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..kb {
            let block = &w[b * tile_bytes..(b + 1) * tile_bytes];
            // SAFETY (loads): `block` holds the 64-byte header and 256 or 512
            // bytes of values; each activation block holds 32 bytes.
            let (scale, offset) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(block.as_ptr() as *const __m256i)),
                    _mm512_cvtph_ps(_mm256_loadu_si256(block.as_ptr().add(32) as *const __m256i)),
                )
            };
            let values = block[HEADER..].as_ptr();
            let mut u = [_mm512_setzero_si512(); 8];
            if nibbles {
                for g in 0..4 {
                    let v = unsafe { _mm512_loadu_si512(values.add(64 * g) as *const __m512i) };
                    u[g] = _mm512_and_si512(v, low);
                    u[g + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
            } else {
                for (g, u) in u.iter_mut().enumerate() {
                    *u = unsafe { _mm512_loadu_si512(values.add(64 * g) as *const __m512i) };
                }
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = (r0 + i) * (kb) + b;
                let q = a.q[at * BLOCK..(at + 1) * BLOCK].as_ptr();
                let mut dot = _mm512_setzero_si512();
                for (g, u) in u.iter().enumerate() {
                    let four = unsafe { (q.add(4 * g) as *const i32).read_unaligned() };
                    dot = _mm512_dpbusd_epi32(dot, *u, _mm512_set1_epi32(four));
                }
                let s = _mm512_mul_ps(scale, _mm512_set1_ps(a.d[at]));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, *acc);
                *acc = _mm512_fmadd_ps(offset, _mm512_set1_ps(a.s[at]), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            unsafe { _mm512_mask_storeu_ps(out.add(i * n), mask, *acc) };
        }
    }
}

impl CustomOp1 for PackedMatrix {
    fn name(&self) -> &'static str {
        "packed-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        super::dense::forward_rows(self.name(), (self.k, self.n), storage, layout, |x, out| self.matmul(x, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    /// The packed kernel against an f32 matmul of the file's (dequantized)
    /// weights: the only difference is the activations' int8 rounding.
    /// Whether the packed kernel runs on this CPU; if not, says so on the
    /// terminal (not through the test harness's capture, which hides it).
    fn runs_here(what: &str) -> bool {
        use std::io::Write;
        if !supported() {
            let _ = writeln!(std::io::stderr(), "SKIPPED {what}: this CPU has no AVX512-VNNI");
        }
        supported()
    }

    #[test]
    fn packed_matmul_matches_the_dequantized_weights() {
        if !runs_here("packed kernel tests") {
            return;
        }
        let dev = Device::Cpu;
        // 40 rows: a partial last tile; 7 activation rows: a group of 4 and a tail of 3.
        let (n, k, m) = (40, 96, 7);
        let w = Tensor::from_vec(values(n * k, 1), (n, k), &dev).unwrap();
        let x = values(m * k, 2);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let exact = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
            let packed = PackedMatrix::new(&q).unwrap().expect("packed");
            let mut out = vec![0.0; m * n];
            packed.matmul(&x, &mut out);
            for i in 0..m {
                let row = &x[i * k..(i + 1) * k];
                // int8 activations: each is off by at most half a step, 1/254 of its block's largest.
                let step: Vec<f32> = row
                    .chunks(BLOCK)
                    .flat_map(|b| {
                        let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                        std::iter::repeat_n(amax / 254.0, BLOCK)
                    })
                    .collect();
                for j in 0..n {
                    let want: f32 = (0..k).map(|c| row[c] * exact[j][c]).sum();
                    let bound: f32 = (0..k).map(|c| exact[j][c].abs() * step[c]).sum::<f32>() * 1.01 + 1e-5;
                    let got = out[i * n + j];
                    assert!((got - want).abs() <= bound, "{dtype:?} ({i}, {j}): {got} vs {want} (bound {bound})");
                }
            }
        }
    }

    /// A row's outputs are the same bits alone or among other rows.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        if !runs_here("packed kernel tests") {
            return;
        }
        let (n, k, m) = (48, 64, 9);
        let w = Tensor::from_vec(values(n * k, 3), (n, k), &Device::Cpu).unwrap();
        let packed = PackedMatrix::new(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap().unwrap();
        let x = values(m * k, 4);
        let mut all = vec![0.0; m * n];
        packed.matmul(&x, &mut all);
        for i in 0..m {
            let mut one = vec![0.0; n];
            packed.matmul(&x[i * k..(i + 1) * k], &mut one);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }
}
