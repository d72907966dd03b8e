//! Quantized matmuls on the CPU with int8 dot products: the same bits on
//! every CPU.
//!
//! The weights of a Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K tensor
//! are repacked once, at load, into tiles of 16 output rows: each 32-weight
//! block as unsigned integers `u` with a scale and an offset per row (`w =
//! scale*u + offset`, the file's weights exactly; nothing is re-quantized;
//! an offset that follows from the scale, as Q8_0's `-128 * d`, is computed
//! rather than stored: a token at batch 1 reads every packed byte).
//! A tile is read once for up to eight activation rows (four on AVX2 and
//! NEON, whose registers hold fewer).
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
//!    `acc = fma(dot, scale * d, acc)`, then, where the type has an offset,
//!    `acc = fma(offset, s, acc)`, where `dot = sum(u*q)`; for Q6_K, whose
//!    16 values share an int8 scale and which has no offset, `dot = sub0 *
//!    sum((u-32)*q over values 0..16) + sub1 * sum(... over 16..32)`.
//!
//! `dot` is an integer, the same whatever the SIMD width or the order of
//! its partial sums, and every float step is one IEEE operation in a fixed
//! order, so AVX512-VNNI and AVX-VNNI (`vpdpbusd`), AVX2 (`vpmaddubsw`),
//! NEON (`sdot`, or `smull` without the dot-product extension) and the
//! scalar code give the same bits; tested bit for bit on random blocks and
//! on real models' weights. Rows never share an accumulator, so a row's
//! outputs do not depend on the rows computed beside it.

mod avx2;
mod avx512;
mod neon;
mod reference;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;
use std::sync::OnceLock;

/// Output rows per tile.
const TILE: usize = 16;
/// Weights per block, in every type packed here.
const BLOCK: usize = 32;
/// Activation rows a work item takes (prefill): ~100 KB of int8, in L2.
const ROWS: usize = 64;
/// How many tiles ahead a tile's first pass asks the caches for (on
/// Gemma-3 270M's Q8_0 head at batches 1 and 8, 2 did as well as 1, 3, 4
/// and 8).
const AHEAD: usize = 2;

/// Chooses the kernel instead of the CPU's best (tests, benchmarks, and
/// checking that two CPUs agree).
pub const KERNEL_VAR: &str = "PREFGEN_INT8_KERNEL";

/// An implementation of the numeric definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Avx512Vnni,
    /// `vpdpbusd` on 256-bit registers: AVX-VNNI, or AVX512-VNNI with VL.
    AvxVnni,
    Avx2,
    /// NEON with the dot-product extension (`sdot`).
    NeonDotprod,
    Neon,
    Scalar,
}

impl Kernel {
    /// Fastest first.
    pub const ALL: [Kernel; 6] =
        [Kernel::Avx512Vnni, Kernel::AvxVnni, Kernel::Avx2, Kernel::NeonDotprod, Kernel::Neon, Kernel::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::AvxVnni => "avx-vnni",
            Kernel::Avx2 => "avx2",
            Kernel::NeonDotprod => "neon-dotprod",
            Kernel::Neon => "neon",
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
            Kernel::AvxVnni => {
                Kernel::Avx2.runs_here()
                    && (is_x86_feature_detected!("avxvnni")
                        || has(&[is_x86_feature_detected!("avx512vnni"), is_x86_feature_detected!("avx512vl")]))
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => has(&[
                is_x86_feature_detected!("avx2"),
                is_x86_feature_detected!("fma"),
                is_x86_feature_detected!("f16c"),
            ]),
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDotprod => std::arch::is_aarch64_feature_detected!("dotprod"),
            Kernel::Scalar => true,
            #[allow(unreachable_patterns)]
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
    /// 0..16, two a byte (`u[j] | u[j + 16] << 4`): Q4_0, Q4_1, Q4_K.
    Four,
    /// 0..32: the low four bits as [`Width::Four`]'s nibbles, then a plane
    /// of fifth bits (5.5 bits a weight with Q5_0's scale, the file's
    /// size): Q5_0, Q5_1, Q5_K.
    Five,
    /// 0..64, a byte each: Q6_K, whose weights are `u - 32`.
    Six,
    /// 0..256, a byte each: Q8_0 (its int8 values plus 128).
    Eight,
}

/// Where [`Width::Five`]'s plane starts among a block's values.
const PLANE: usize = TILE * BLOCK / 2;

impl Width {
    /// Whether the low four bits are nibbles (two values a byte).
    fn nibbles(self) -> bool {
        matches!(self, Width::Four | Width::Five)
    }

    /// The byte and the shift of value `j` of tile row `r` (its low four
    /// bits where [`Width::nibbles`]): values `4g..4g+4` of the 16 rows sit
    /// together (group `g`, row `r`, 4 bytes), as one 32-bit lane per row of
    /// a dot-product instruction reads them; a nibble's high half holds
    /// value `j + 16`.
    fn slot(self, r: usize, j: usize) -> (usize, u32) {
        if self.nibbles() {
            (((j % 16) / 4 * TILE + r) * 4 + j % 4, if j < 16 { 0 } else { 4 })
        } else {
            ((j / 4 * TILE + r) * 4 + j % 4, 0)
        }
    }

    /// [`Width::Five`]'s fifth bit of value `j` of row `r`: the byte, as
    /// value `j`'s byte in a group of the byte-a-value widths (`4r + j %
    /// 4`), and the bit, its group (`j / 4`). So the plane shifted left by
    /// `4 - g` (right by `g - 4`) has group `g`'s fifth bits where its values
    /// take them, bit 4 of each byte, in every register width.
    fn plane(r: usize, j: usize) -> (usize, u32) {
        (PLANE + 4 * r + j % 4, (j / 4) as u32)
    }

    /// Stores value `u` as value `j` of tile row `r` in a block's `values`.
    fn put(self, values: &mut [u8], r: usize, j: usize, u: u8) {
        let (at, shift) = self.slot(r, j);
        if self.nibbles() {
            values[at] |= (u & 0x0F) << shift;
        } else {
            values[at] = u;
        }
        if self == Width::Five {
            let (at, bit) = Width::plane(r, j);
            values[at] |= (u >> 4) << bit;
        }
    }

    /// Value `j` of tile row `r` of a block's `values`.
    fn get(self, values: &[u8], r: usize, j: usize) -> u8 {
        let (at, shift) = self.slot(r, j);
        if !self.nibbles() {
            return values[at];
        }
        let low = values[at] >> shift & 0x0F;
        if self == Width::Five {
            let (at, bit) = Width::plane(r, j);
            low | (values[at] >> bit & 1) << 4
        } else {
            low
        }
    }

    fn value_bytes(self) -> usize {
        match self {
            Width::Four => PLANE,
            Width::Five => PLANE + TILE * BLOCK / 8,
            Width::Six | Width::Eight => TILE * BLOCK,
        }
    }
}

/// How a tile's block holds its rows' scales and offsets, ahead of the
/// values: the 16 rows' scales, then their offsets where they are stored,
/// then (Q6_K) the 16-value scales. An offset that follows from the scale
/// is not stored: the kernels compute it, exactly, in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scales {
    /// f16 scales and offsets (Q4_1, Q5_1: the file's `d` and `m`).
    Half,
    /// f16 scales; the offset is `-center * scale` (Q4_0, Q5_0, Q8_0: the
    /// file's `d`, and the value their weights' zero sits at, 8, 16, 128).
    Centered(u8),
    /// f32 (Q4_K, Q5_K: `d * sc` and `dmin * m`, an f16 times a 6-bit
    /// integer, exact in f32 but not in f16).
    Single,
    /// Q6_K: the super-block's f16 `d` (offset 0), then an int8 scale for
    /// values 0..16 of each row and one for 16..32 (`SUB`, `SUB + TILE`).
    Sixteens,
}

/// Where Q6_K's 16-value scales start in a block's header.
const SUB: usize = 2 * TILE;

impl Scales {
    /// The bytes of one row's scale (and of its offset).
    fn size(self) -> usize {
        if self == Scales::Single { 4 } else { 2 }
    }

    /// Where the stored offsets start (`Half`, `Single`).
    fn offsets(self) -> usize {
        self.size() * TILE
    }

    fn header_bytes(self) -> usize {
        match self {
            Scales::Half => 4 * TILE,
            Scales::Centered(_) => 2 * TILE,
            Scales::Single => 8 * TILE,
            Scales::Sixteens => SUB + 2 * TILE,
        }
    }

    /// Whether the type's weights have an offset (all but Q6_K's): without
    /// one, the kernels skip the offset's `fma` (adding `0 * s` to an
    /// accumulator that is never -0 leaves it as it is).
    fn has_offset(self) -> bool {
        self != Scales::Sixteens
    }

    /// The offset of a row with `scale`, where it is not stored.
    fn derived(self, scale: f32) -> Option<f32> {
        match self {
            Scales::Centered(center) => Some(scale * -(center as f32)),
            Scales::Sixteens => Some(0.0),
            Scales::Half | Scales::Single => None,
        }
    }

    /// Row `r`'s scale and offset in `header`.
    fn read(self, header: &[u8], r: usize) -> (f32, f32) {
        let at = |i: usize| match self {
            Scales::Single => f32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]),
            _ => f16::from_le_bytes([header[i], header[i + 1]]).to_f32(),
        };
        let scale = at(self.size() * r);
        (scale, self.derived(scale).unwrap_or_else(|| at(self.offsets() + self.size() * r)))
    }

    fn write(self, header: &mut [u8], r: usize, b: &Block) {
        let (size, offsets) = (self.size(), self.offsets());
        let mut put = |at: usize, v: f32| match self {
            Scales::Single => header[at..at + 4].copy_from_slice(&v.to_le_bytes()),
            // Exact: every f16-header type's scale and offset are f16 values.
            _ => header[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
        };
        put(size * r, b.scale);
        match self.derived(b.scale) {
            Some(offset) => debug_assert_eq!(offset.to_bits(), b.offset.to_bits(), "{self:?}: an offset off its scale"),
            None => put(offsets + size * r, b.offset),
        }
        if self == Scales::Sixteens {
            header[SUB + r] = b.sub[0] as u8;
            header[SUB + TILE + r] = b.sub[1] as u8;
        }
    }
}

/// How tensors of `dtype` are packed; None for the types not packed here.
fn packing(dtype: GgmlDType) -> Option<(Width, Scales)> {
    Some(match dtype {
        GgmlDType::Q4_0 => (Width::Four, Scales::Centered(8)),
        GgmlDType::Q4_1 => (Width::Four, Scales::Half),
        GgmlDType::Q5_0 => (Width::Five, Scales::Centered(16)),
        GgmlDType::Q5_1 => (Width::Five, Scales::Half),
        GgmlDType::Q8_0 => (Width::Eight, Scales::Centered(128)),
        GgmlDType::Q4K => (Width::Four, Scales::Single),
        GgmlDType::Q5K => (Width::Five, Scales::Single),
        GgmlDType::Q6K => (Width::Six, Scales::Sixteens),
        _ => return None,
    })
}

/// A weight matrix `(n, k)` repacked for [`PackedMatrix::matmul`].
pub struct PackedMatrix {
    n: usize,
    k: usize,
    width: Width,
    scales: Scales,
    kernel: Kernel,
    /// Tile after tile, each its `k / 32` blocks in order.
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Repacks `t`, a 2-D tensor of a type packed here, for `kernel`; None
    /// for other tensors (candle's kernels run them).
    pub fn new(t: &QTensor, kernel: Kernel) -> candle_core::Result<Option<PackedMatrix>> {
        let Some((width, scales)) = packing(t.dtype()) else {
            return Ok(None);
        };
        // The file's blocks: 32 weights, or a K-quant's super-block of 256.
        let (bytes, weights) = (t.dtype().type_size(), t.dtype().block_size());
        let (n, k) = match t.shape().dims() {
            &[n, k] if k.is_multiple_of(weights) => (n, k),
            _ => return Ok(None),
        };
        let raw = t.data()?;
        let (kb, file_blocks) = (k / BLOCK, k / weights);
        let mut p = PackedMatrix { n, k, width, scales, kernel, data: Vec::new() };
        let (tile_bytes, header) = (p.tile_bytes(), p.scales.header_bytes());
        let mut data = vec![0; n.div_ceil(TILE) * kb * tile_bytes];
        for row in 0..n {
            let (tile, r) = (row / TILE, row % TILE);
            for f in 0..file_blocks {
                let src = &raw[(row * file_blocks + f) * bytes..][..bytes];
                unpack(t.dtype(), src, |i, block| {
                    let b = f * weights / BLOCK + i;
                    let dst = &mut data[(tile * kb + b) * tile_bytes..][..tile_bytes];
                    let (head, values) = dst.split_at_mut(header);
                    scales.write(head, r, &block);
                    for (j, &u) in block.u.iter().enumerate() {
                        width.put(values, r, j, u);
                    }
                });
            }
        }
        p.data = data;
        Ok(Some(p))
    }

    /// Whether tensors of `dtype` are packed here.
    pub fn packs(dtype: GgmlDType) -> bool {
        packing(dtype).is_some()
    }

    fn tile_bytes(&self) -> usize {
        self.scales.header_bytes() + self.width.value_bytes()
    }

    /// `out (m, n) = x (m, k) @ w^T`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_into(x, super::dense::written(out))
    }

    /// [`PackedMatrix::matmul`] into memory not yet written; writes every
    /// value.
    fn matmul_into(&self, x: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
        matmuls(&[self], x, out)
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Whether [`matmuls`] can run the two together: the same input width
    /// and kernel.
    pub fn fuses_with(&self, other: &PackedMatrix) -> bool {
        self.k == other.k && self.kernel == other.kernel
    }
}

/// `out (m, n_1 + n_2 + ...) = x (m, k) @ [w_1; w_2; ...]^T`: matrices
/// that take the same input (a layer's q, k and v projections; its gate and
/// up), their outputs side by side. The input is quantized once and every
/// matrix's tiles run in one pass over the threads. Writes every value of
/// `out`, which may be uninitialized.
pub fn matmuls(parts: &[&PackedMatrix], x: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    let first = parts.first().expect("at least one matrix");
    let (k, kernel) = (first.k, first.kernel);
    assert!(parts.iter().all(|p| p.fuses_with(first)), "fused matrices share k and the kernel");
    let n: usize = parts.iter().map(|p| p.n).sum();
    assert!(
        x.len().is_multiple_of(k) && out.len() == x.len() / k * n,
        "matmul shapes: {} x {k} -> {} x {n}",
        x.len(),
        out.len()
    );
    let m = x.len() / k;
    let widths: Vec<Width> = parts.iter().map(|p| p.width).collect();
    let acts = Activations::quantize(x, k, &widths, kernel);
    let out_ptr = out.as_mut_ptr() as usize;
    let kb = k / BLOCK;
    // Each part's first tile and first column among all of them.
    let (mut tiles, mut cols) = (vec![0], vec![0]);
    for p in parts {
        tiles.push(tiles.last().copied().unwrap_or(0) + p.n.div_ceil(TILE));
        cols.push(cols.last().copied().unwrap_or(0) + p.n);
    }
    let all = tiles[parts.len()];
    // Work items are (row block, tile), row block major: a worker's run of
    // items keeps one block of quantized rows in cache while it walks the
    // tiles, instead of streaming every row once per tile.
    candle_core::utils::barrier_pool().execute_chunked(m.div_ceil(ROWS) * all, |items| {
        for item in items {
            let rows = item / all * ROWS..((item / all + 1) * ROWS).min(m);
            let i = tiles.partition_point(|&t| t <= item % all) - 1;
            let (p, t) = (parts[i], item % all - tiles[i]);
            let tile_bytes = p.tile_bytes();
            // A tile's first pass is streamed from memory faster than the
            // hardware prefetcher fetches it: the kernel asks for the tile
            // two ahead a block at a time as it goes. Gemma-3 270M's Q8_0
            // head (168 million weights), AVX512-VNNI: at batch 1 7.1-7.5
            // ms asking for a whole tile at once, 5.6-6.2 block by block;
            // at batch 8 (AVX2 and AVX-VNNI, 2 passes, asking for none
            // before) 23-24 ms -> 18.3, 15-16 -> 12.5.
            let ahead = (t + AHEAD < p.n.div_ceil(TILE))
                .then(|| &p.data[(t + AHEAD) * kb * tile_bytes..(t + AHEAD + 1) * kb * tile_bytes]);
            let tile = Tile {
                ahead,
                width: p.width,
                scales: p.scales,
                w: &p.data[t * kb * tile_bytes..(t + 1) * kb * tile_bytes],
                out: out_ptr as *mut f32,
                n,
                col: cols[i] + t * TILE,
                cols: (p.n - t * TILE).min(TILE),
            };
            // SAFETY: the kernel runs here (`Kernel::chosen` or the
            // caller checked); `rows` are `acts`' own; an item writes only
            // its own rows and columns of `out`, which outlives the call.
            unsafe {
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512Vnni => avx512::tile(&tile, &acts, rows),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::AvxVnni if is_x86_feature_detected!("avxvnni") => {
                        avx2::tile::<{ avx2::VEX }>(&tile, &acts, rows)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Kernel::AvxVnni => avx2::tile::<{ avx2::EVEX }>(&tile, &acts, rows),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => avx2::tile::<{ avx2::MADD }>(&tile, &acts, rows),
                    #[cfg(target_arch = "aarch64")]
                    Kernel::NeonDotprod => neon::tile::<true>(&tile, &acts, rows),
                    #[cfg(target_arch = "aarch64")]
                    Kernel::Neon => neon::tile::<false>(&tile, &acts, rows),
                    Kernel::Scalar => reference::tile(&tile, &acts, rows),
                    #[allow(unreachable_patterns)]
                    other => unreachable!("{other:?} does not run on this architecture"),
                }
            }
        }
    });
}

/// One tile's blocks and where its outputs go: columns `col..col + cols`
/// of `out (m, n)` (other matrices' columns beside them where fused).
#[derive(Clone, Copy)]
struct Tile<'a> {
    /// The tile [`AHEAD`] of this one, for a kernel's first pass to ask the
    /// caches for block by block as it goes (the x86 kernels').
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    ahead: Option<&'a [u8]>,
    width: Width,
    scales: Scales,
    w: &'a [u8],
    out: *mut f32,
    n: usize,
    col: usize,
    cols: usize,
}

/// The x86 kernels' prefetch (aarch64's prefetch intrinsic is not yet
/// stable, and NEON's kernel is unmeasured with one).
#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// Asks the caches (L2) for block `b` of the `blocks` of the tile ahead,
    /// where this pass is given one; without waiting.
    fn ask_ahead(&self, b: usize, blocks: usize) {
        let Some(ahead) = self.ahead else { return };
        let step = ahead.len() / blocks;
        for line in ahead[b * step..(b + 1) * step].chunks(64) {
            use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
            // SAFETY: a hint; the address is in `ahead`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr() as *const i8) };
        }
    }

    /// The same tile for a pass that asks for nothing ahead (not its first).
    fn without_ahead(&self) -> Self {
        Tile { ahead: None, ..*self }
    }
}

/// A 32-block of weights: `w[j] = scale * u[j] + offset`; for Q6_K
/// (`Width::Six`), `w[j] = scale * sub[j / 16] * (u[j] - 32)`.
struct Block {
    scale: f32,
    offset: f32,
    sub: [i8; 2],
    u: [u8; BLOCK],
}

/// One GGUF block of `dtype` as its 32-blocks: `emit(i, block)` for the
/// `i`th. Every scale and offset is exact: an f16 of the file, an f16 times
/// a power of two (`-8d`, `-16d`, `-128d`), or an f16 times a 6-bit integer.
fn unpack(dtype: GgmlDType, b: &[u8], mut emit: impl FnMut(usize, Block)) {
    let half = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let block = |scale, offset, u| Block { scale, offset, sub: [0; 2], u };
    // Q4: low nibbles are values 0..16, high nibbles 16..32 (a K-quant's
    // pair of blocks: low nibbles the first, high the second).
    let nibbles = |qs: &[u8], high: bool| -> [u8; BLOCK] {
        let mut u = [0u8; BLOCK];
        for (u, &q) in u.iter_mut().zip(qs) {
            *u = if high { q >> 4 } else { q & 0x0F };
        }
        u
    };
    let legacy = |qs: &[u8]| -> [u8; BLOCK] {
        let (lo, hi) = (nibbles(&qs[..16], false), nibbles(&qs[..16], true));
        std::array::from_fn(|j| if j < 16 { lo[j] } else { hi[j - 16] })
    };
    // Q5_0 and Q5_1: a fifth bit for value j from bit j of `qh`.
    let fifth = |mut u: [u8; BLOCK], qh: &[u8]| -> [u8; BLOCK] {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for (j, v) in u.iter_mut().enumerate() {
            *v |= (((qh >> j) & 1) << 4) as u8;
        }
        u
    };
    // Q4_K and Q5_K: block j's 6-bit scale and minimum, packed in 12 bytes.
    let scale_min = |j: usize| -> (f32, f32) {
        let q = &b[4..16];
        let (sc, m) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            ((q[j + 4] & 0x0F) | (q[j - 4] >> 6) << 4, (q[j + 4] >> 4) | (q[j] >> 6) << 4)
        };
        (half(0) * sc as f32, -(half(2) * m as f32))
    };
    match dtype {
        GgmlDType::Q4_0 => emit(0, block(half(0), -8.0 * half(0), legacy(&b[2..18]))),
        GgmlDType::Q4_1 => emit(0, block(half(0), half(2), legacy(&b[4..20]))),
        GgmlDType::Q5_0 => emit(0, block(half(0), -16.0 * half(0), fifth(legacy(&b[6..22]), &b[2..6]))),
        GgmlDType::Q5_1 => emit(0, block(half(0), half(2), fifth(legacy(&b[8..24]), &b[4..8]))),
        GgmlDType::Q8_0 => {
            let u = std::array::from_fn(|j| (b[2 + j] as i8 as i16 + 128) as u8);
            emit(0, block(half(0), -128.0 * half(0), u))
        }
        GgmlDType::Q4K => {
            for j in 0..8 {
                let (scale, offset) = scale_min(j);
                emit(j, block(scale, offset, nibbles(&b[16 + 32 * (j / 2)..][..32], j % 2 == 1)));
            }
        }
        GgmlDType::Q5K => {
            let qh = &b[16..48];
            for j in 0..8 {
                let (scale, offset) = scale_min(j);
                let mut u = nibbles(&b[48 + 32 * (j / 2)..][..32], j % 2 == 1);
                for (u, &h) in u.iter_mut().zip(qh) {
                    *u |= (h >> j & 1) << 4;
                }
                emit(j, block(scale, offset, u));
            }
        }
        GgmlDType::Q6K => {
            // Halves of 128 weights, each four blocks: the low bits from
            // nibbles of `ql`, the high two from `qh`, two bits a block.
            let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
            for j in 0..8 {
                let (c, i) = (j / 4, j % 4);
                let mut u = nibbles(&ql[64 * c + 32 * (i % 2)..][..32], i >= 2);
                for (u, &h) in u.iter_mut().zip(&qh[32 * c..32 * c + 32]) {
                    *u |= (h >> (2 * i) & 3) << 4;
                }
                let sub = [sc[8 * c + 2 * i] as i8, sc[8 * c + 2 * i + 1] as i8];
                emit(j, Block { scale: half(208), offset: 0.0, sub, u });
            }
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
    /// For the x86 kernels' Q6_K, which sum the unsigned `u` and take `32 *
    /// sum(q)` of each block's two 16-value halves back out (the same
    /// integer as summing `u - 32`): per block, as the kernel reads it,
    /// ready to broadcast. The `vpdpbusd` kernels start their two chains
    /// from `[-32 * first, -32 * second]`; AVX2 takes `[first | second <<
    /// 16, 0]`, i16 pairs for one `vpmaddwd`. Empty for other matrices and
    /// kernels.
    sixteens: Vec<[i32; 2]>,
    /// Each block's `q` as `16 * hi + lo`, its 32 `lo` (0..16) then its 32
    /// `hi` (-8..8), for AVX2's Q8_0 (`avx2`). Empty for other matrices and
    /// kernels.
    split: Vec<i8>,
}

impl Activations {
    /// Quantizes `x`, rows of `k`, for matrices of `widths` run by
    /// `kernel`; long batches (prefill) on every thread.
    fn quantize(x: &[f32], k: usize, widths: &[Width], kernel: Kernel) -> Activations {
        let blocks = x.len() / BLOCK;
        let halved =
            widths.contains(&Width::Six) && matches!(kernel, Kernel::Avx512Vnni | Kernel::AvxVnni | Kernel::Avx2);
        let split = widths.contains(&Width::Eight) && kernel == Kernel::Avx2;
        let mut a = Activations {
            k,
            q: vec![0; x.len()],
            d: vec![0.0; blocks],
            s: vec![0.0; blocks],
            sum: vec![0; blocks],
            sixteens: vec![[0; 2]; if halved { blocks } else { 0 }],
            split: vec![0; if split { 2 * x.len() } else { 0 }],
        };
        let ptrs = (
            a.q.as_mut_ptr() as usize,
            a.d.as_mut_ptr() as usize,
            a.s.as_mut_ptr() as usize,
            a.sum.as_mut_ptr() as usize,
            a.sixteens.as_mut_ptr() as usize,
            a.split.as_mut_ptr() as usize,
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
                Kernel::Avx512Vnni | Kernel::AvxVnni | Kernel::Avx2 => unsafe { avx2::quantize(x, q, d, s, sum) },
                _ => reference::quantize(x, q, d, s, sum),
            }
            if halved {
                // SAFETY: as above; `sixteens` holds a pair per block.
                let sixteens = unsafe { std::slice::from_raw_parts_mut((ptrs.4 as *mut [i32; 2]).add(from), len) };
                for ((out, b), &total) in sixteens.iter_mut().zip(q.chunks_exact(BLOCK)).zip(&*sum) {
                    let first: i32 = b[..BLOCK / 2].iter().map(|&q| q as i32).sum();
                    let second = total - first;
                    *out = match kernel {
                        Kernel::Avx2 => [(first & 0xFFFF) | second << 16, 0],
                        _ => [-32 * first, -32 * second],
                    };
                }
            }
            if split {
                // SAFETY: as above; `split` holds two values per value.
                let split = unsafe {
                    std::slice::from_raw_parts_mut((ptrs.5 as *mut i8).add(2 * from * BLOCK), 2 * len * BLOCK)
                };
                for (parts, b) in split.chunks_exact_mut(2 * BLOCK).zip(q.chunks_exact(BLOCK)) {
                    let (lo, hi) = parts.split_at_mut(BLOCK);
                    for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(b) {
                        (*lo, *hi) = (q & 0x0F, q >> 4);
                    }
                }
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

    // Block `at`'s parts (`at` counts blocks over all rows), read without a
    // bounds check: the SIMD kernels read eight rows' blocks in their
    // innermost loop, where a compare and a branch for each read measured
    // slower. SAFETY (each): `at` is below the number of blocks, and
    // `sixteens` and `split` hold values for the matrices they are read for.

    /// Block `at`'s 32 values.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn q_at(&self, at: usize) -> *const i8 {
        debug_assert!(at < self.d.len());
        unsafe { self.q.as_ptr().add(at * BLOCK) }
    }

    /// Block `at`'s step `d`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn d_at(&self, at: usize) -> f32 {
        debug_assert!(at < self.d.len());
        unsafe { *self.d.get_unchecked(at) }
    }

    /// Block `at`'s `s = d * sum(q)`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn s_at(&self, at: usize) -> f32 {
        debug_assert!(at < self.s.len());
        unsafe { *self.s.get_unchecked(at) }
    }

    /// Block `at`'s Q6_K correction (`Activations::sixteens`).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sixteens(&self, at: usize) -> [i32; 2] {
        debug_assert!(at < self.sixteens.len());
        unsafe { *self.sixteens.get_unchecked(at) }
    }

    /// Block `at`'s 32 `lo` then its 32 `hi` (AVX2's Q8_0).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn split_at(&self, at: usize) -> *const i8 {
        debug_assert!(2 * (at + 1) * BLOCK <= self.split.len());
        unsafe { self.split.as_ptr().add(2 * at * BLOCK) }
    }
}

impl CustomOp1 for PackedMatrix {
    fn name(&self) -> &'static str {
        "packed-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Fused(&[self]).cpu_fwd(storage, layout)
    }
}

/// [`matmuls`] as a candle op: `(..., k)` to `(..., n_1 + n_2 + ...)`.
pub struct Fused<'a>(pub &'a [&'a PackedMatrix]);

impl CustomOp1 for Fused<'_> {
    fn name(&self) -> &'static str {
        "packed-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some(first) = self.0.first() else { candle_core::bail!("{}: no matrices", self.name()) };
        if !self.0.iter().all(|p| p.fuses_with(first)) {
            candle_core::bail!("{}: fused matrices must share their input width and kernel", self.name())
        }
        let n = self.0.iter().map(|p| p.n).sum();
        super::dense::forward_rows(self.name(), (first.k, n), storage, layout, |x, out| matmuls(self.0, x, out))
    }
}

#[cfg(test)]
mod tests;
