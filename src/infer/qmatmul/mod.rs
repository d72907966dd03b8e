//! Quantized matmuls on the CPU with int8 dot products: the same bits on
//! every CPU.
//!
//! The weights of a Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 tensor are repacked once,
//! at load, into tiles of 16 output rows: each 32-weight block as unsigned
//! integers `u` with the file's f16 scale and an f16 offset (`w = scale*u +
//! offset`, the file's weights exactly; nothing is re-quantized). A tile is
//! read once for up to four activation rows.
//!
//! # The numeric definition
//!
//! [`reference`] writes it as plain scalar code; every kernel computes
//! exactly it.
//!
//! 1. Each 32-block of an activation row is quantized to int8 (llama.cpp's
//!    Q8_1): `amax = max |x|`, `d = amax / 127`, `q = x * (127 / amax)`
//!    rounded half to even (all 0 when `amax = 0`), and `s = d * sum(q)`.
//! 2. Each output starts at 0 and takes the blocks in order:
//!    `acc = fma(sum(u*q), scale * d, acc)`, then `acc = fma(offset, s, acc)`.
//!
//! `sum(u*q)` is an integer, the same whatever the SIMD width or the order
//! of its partial sums, and every float step is one IEEE operation in a
//! fixed order, so AVX512-VNNI (`vpdpbusd`), AVX2 (`vpmaddubsw`) and the
//! scalar code give the same bits; tested bit for bit on random blocks and
//! on real models' weights. Rows never share an accumulator, so a row's
//! outputs do not depend on the rows computed beside it.

mod avx2;
mod avx512;
mod reference;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;
use std::sync::OnceLock;

/// Output rows per tile.
const TILE: usize = 16;
/// Weights per block, in every type packed here.
const BLOCK: usize = 32;
/// Bytes of a tile's block before its values: 16 f16 scales, 16 f16 offsets.
const HEADER: usize = 4 * TILE;
/// Activation rows a work item takes (prefill): ~100 KB of int8, in L2.
const ROWS: usize = 64;
/// Chooses the kernel instead of the CPU's best (tests, benchmarks, and
/// checking that two CPUs agree).
pub const KERNEL_VAR: &str = "PREFGEN_INT8_KERNEL";

/// An implementation of the numeric definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Avx512Vnni,
    Avx2,
    Scalar,
}

impl Kernel {
    /// Fastest first.
    pub const ALL: [Kernel; 3] = [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::Avx2 => "avx2",
            Kernel::Scalar => "scalar",
        }
    }

    /// Whether this CPU has the kernel's instructions.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let has = |f: &[bool]| f.iter().all(|&x| x);
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => has(&[
                Kernel::Avx2.runs_here(),
                is_x86_feature_detected!("avx512f"),
                is_x86_feature_detected!("avx512bw"),
                is_x86_feature_detected!("avx512vnni"),
            ]),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => has(&[
                is_x86_feature_detected!("avx2"),
                is_x86_feature_detected!("fma"),
                is_x86_feature_detected!("f16c"),
            ]),
            Kernel::Scalar => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernel this process runs: [`KERNEL_VAR`]'s, else the fastest
    /// this CPU has. Decided once.
    pub fn chosen() -> Result<Kernel, String> {
        static CHOSEN: OnceLock<Result<Kernel, String>> = OnceLock::new();
        CHOSEN
            .get_or_init(|| match std::env::var(KERNEL_VAR) {
                Ok(name) => {
                    let names = Kernel::ALL.map(Kernel::name).join(", ");
                    match Kernel::ALL.into_iter().find(|k| k.name() == name) {
                        Some(k) if k.runs_here() => Ok(k),
                        Some(_) => Err(format!("{KERNEL_VAR}={name}: this CPU lacks its instructions")),
                        None => Err(format!("{KERNEL_VAR}={name}: not a kernel (one of {names})")),
                    }
                }
                Err(_) => Ok(Kernel::ALL.into_iter().find(|k| k.runs_here()).unwrap_or(Kernel::Scalar)),
            })
            .clone()
    }
}

/// How a block's values are stored: the widest value decides which integer
/// sums a kernel may take without overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    /// 0..16, two a byte (`u[j] | u[j + 16] << 4`): Q4_0, Q4_1.
    Four,
    /// 0..32, a byte each: Q5_0, Q5_1.
    Five,
    /// 0..256, a byte each: Q8_0 (its int8 values plus 128).
    Eight,
}

impl Width {
    fn nibbles(self) -> bool {
        self == Width::Four
    }

    /// The byte and the shift of value `j` of tile row `r`: values `4g..4g+4`
    /// of the 16 rows sit together (group `g`, row `r`, 4 bytes), as one
    /// 32-bit lane per row of a dot-product instruction reads them; a
    /// nibble's high half holds value `j + 16`.
    fn slot(self, r: usize, j: usize) -> (usize, u32) {
        if self.nibbles() {
            (((j % 16) / 4 * TILE + r) * 4 + j % 4, if j < 16 { 0 } else { 4 })
        } else {
            ((j / 4 * TILE + r) * 4 + j % 4, 0)
        }
    }

    fn value_bytes(self) -> usize {
        if self.nibbles() { TILE * BLOCK / 2 } else { TILE * BLOCK }
    }
}

/// A weight matrix `(n, k)` repacked for [`PackedMatrix::matmul`].
pub struct PackedMatrix {
    n: usize,
    k: usize,
    width: Width,
    kernel: Kernel,
    /// Tile after tile, each its `k / 32` blocks in order.
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Repacks `t`, a 2-D tensor of a type packed here, for `kernel`; None
    /// for other tensors (candle's kernels run them).
    pub fn new(t: &QTensor, kernel: Kernel) -> candle_core::Result<Option<PackedMatrix>> {
        let (n, k) = match t.shape().dims() {
            &[n, k] if k.is_multiple_of(BLOCK) => (n, k),
            _ => return Ok(None),
        };
        let Some((block_bytes, width)) = layout(t.dtype()) else {
            return Ok(None);
        };
        let raw = t.data()?;
        let kb = k / BLOCK;
        let mut p = PackedMatrix { n, k, width, kernel, data: Vec::new() };
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
                for (j, &u) in u.iter().enumerate() {
                    let (at, shift) = width.slot(r, j);
                    values[at] |= u << shift;
                }
            }
        }
        Ok(Some(p))
    }

    /// Whether tensors of `dtype` are packed here.
    pub fn packs(dtype: GgmlDType) -> bool {
        layout(dtype).is_some()
    }

    fn tile_bytes(&self) -> usize {
        HEADER + self.width.value_bytes()
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
        let m = x.len() / k;
        let acts = Activations::quantize(x, k, self.kernel);
        let out_ptr = out.as_mut_ptr() as usize;
        let kb = k / BLOCK;
        let tile_bytes = self.tile_bytes();
        let tiles = n.div_ceil(TILE);
        // Work items are (row block, tile), row block major: a worker's run of
        // items keeps one block of quantized rows in cache while it walks the
        // tiles, instead of streaming every row once per tile.
        candle_core::utils::barrier_pool().execute_chunked(m.div_ceil(ROWS) * tiles, |items| {
            for item in items {
                let rows = item / tiles * ROWS..((item / tiles + 1) * ROWS).min(m);
                let t = item % tiles;
                let tile = Tile {
                    width: self.width,
                    w: &self.data[t * kb * tile_bytes..(t + 1) * kb * tile_bytes],
                    out: out_ptr as *mut f32,
                    n,
                    col: t * TILE,
                    cols: (n - t * TILE).min(TILE),
                };
                // SAFETY: the kernel runs here (`Kernel::chosen` or the
                // caller checked); an item writes only its own rows and
                // columns of `out`, which outlives the call.
                unsafe {
                    match self.kernel {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512Vnni => avx512::tile(&tile, &acts, rows),
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => avx2::tile(&tile, &acts, rows),
                        Kernel::Scalar => reference::tile(&tile, &acts, rows),
                        #[cfg(not(target_arch = "x86_64"))]
                        other => unreachable!("{other:?} is x86-64 only"),
                    }
                }
            }
        });
    }
}

/// The bytes of a GGUF block of `dtype` and how its values are packed;
/// None for the types not packed here.
fn layout(dtype: GgmlDType) -> Option<(usize, Width)> {
    match dtype {
        GgmlDType::Q4_0 => Some((18, Width::Four)),
        GgmlDType::Q4_1 => Some((20, Width::Four)),
        GgmlDType::Q5_0 => Some((22, Width::Five)),
        GgmlDType::Q5_1 => Some((24, Width::Five)),
        GgmlDType::Q8_0 => Some((34, Width::Eight)),
        _ => None,
    }
}

/// One tile's blocks and where its outputs go: columns `col..col + cols`
/// of `out (m, n)`.
struct Tile<'a> {
    width: Width,
    w: &'a [u8],
    out: *mut f32,
    n: usize,
    col: usize,
    cols: usize,
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

/// Activation rows quantized per 32-block (step 1 of the definition).
struct Activations {
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    /// `d * sum(q)`.
    s: Vec<f32>,
    /// `sum(q)`, for kernels that sum signed weights.
    sum: Vec<i32>,
}

impl Activations {
    /// Quantizes `x`, rows of `k`; long batches (prefill) on every thread.
    fn quantize(x: &[f32], k: usize, kernel: Kernel) -> Activations {
        let blocks = x.len() / BLOCK;
        let mut a =
            Activations { k, q: vec![0; x.len()], d: vec![0.0; blocks], s: vec![0.0; blocks], sum: vec![0; blocks] };
        let ptrs = (
            a.q.as_mut_ptr() as usize,
            a.d.as_mut_ptr() as usize,
            a.s.as_mut_ptr() as usize,
            a.sum.as_mut_ptr() as usize,
        );
        let rows = |rows: std::ops::Range<usize>| {
            let (from, to) = (rows.start * k / BLOCK, rows.end * k / BLOCK);
            let len = to - from;
            // SAFETY: each range of rows writes only its own blocks of the
            // vectors above, which outlive the call.
            let (q, d, s, sum) = unsafe {
                (
                    std::slice::from_raw_parts_mut((ptrs.0 as *mut i8).add(from * BLOCK), len * BLOCK),
                    std::slice::from_raw_parts_mut((ptrs.1 as *mut f32).add(from), len),
                    std::slice::from_raw_parts_mut((ptrs.2 as *mut f32).add(from), len),
                    std::slice::from_raw_parts_mut((ptrs.3 as *mut i32).add(from), len),
                )
            };
            let x = &x[from * BLOCK..to * BLOCK];
            match kernel {
                // SAFETY: the kernel runs here, so AVX2 does: the same
                // scalar code, in wider registers.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Vnni | Kernel::Avx2 => unsafe { avx2::quantize(x, q, d, s, sum) },
                _ => reference::quantize(x, q, d, s, sum),
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

impl CustomOp1 for PackedMatrix {
    fn name(&self) -> &'static str {
        "packed-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        super::dense::forward_rows(self.name(), (self.k, self.n), storage, layout, |x, out| self.matmul(x, out))
    }
}

#[cfg(test)]
mod tests;
