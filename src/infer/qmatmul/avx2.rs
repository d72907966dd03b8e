//! The definition on AVX2: a tile is taken as two halves of 8 rows, and a
//! half's block against one activation block is eight `vpmaddubsw` (u8 x
//! i8 pairs summed to i16) and `vpmaddwd` to i32, one lane per row.
//!
//! `vpmaddubsw` saturates, so each width sums only what fits in an i16:
//! 4-bit values all eight groups (at most 8 * 2 * 15 * 127 = 30480), 5-bit
//! ones four at a time (31496), Q6_K's 6-bit ones two at a time (32004,
//! one `vpmaddwd` against the 16 values' scale finishing each pair, and
//! `32 * sum(q)` of each 16 values taken back out with one more). Q8_0's
//! values `u = w + 128` would overflow against any int8: its activations
//! are split as `q = 16 * hi + lo` (`lo` 0..16, `hi` -8..8, once per
//! matmul), `u * lo` summed four groups at a time (30600) and `u * hi` all
//! eight (32640): the same integer, with neither the signs of the
//! activations nor the weights' magnitudes taken per block.
//!
//! The same code is the AVX-VNNI kernel: with `DOT` = [`VEX`] or [`EVEX`],
//! a group's dot product is one `vpdpbusd` (u8 x i8 quadruples summed into
//! i32, no saturation), so every width sums all eight groups, and Q6_K
//! takes `32 * sum(q)` of each 16 values back out and its 16-value scales
//! in f32 ([`sixteens`]).
#![cfg(target_arch = "x86_64")]

use super::reference::ROUND;
use super::{Activations, BLOCK, PLANE, SUB, Scales, TILE, Tile, Width};
use std::arch::asm;
use std::arch::x86_64::*;

/// How a half's integer dot products are taken: `vpmaddubsw` and `vpmaddwd`
/// (AVX2), or `vpdpbusd` on 256-bit registers encoded as AVX-VNNI (VEX) or
/// as AVX512-VNNI with AVX512VL (EVEX): the same instruction, and the one
/// AVX512-VNNI CPUs without AVX-VNNI run this kernel with.
pub(super) const MADD: u8 = 0;
pub(super) const VEX: u8 = 1;
pub(super) const EVEX: u8 = 2;

/// `acc` plus, in each i32 lane, the sum of four u8 x i8 products.
///
/// Inline assembly rather than the intrinsics: those need their instruction
/// set enabled on the whole function, and one function body serves all
/// three modes.
///
/// SAFETY: the CPU runs `DOT`'s encoding.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dpbusd<const DOT: u8>(mut acc: __m256i, u: __m256i, q: __m256i) -> __m256i {
    // SAFETY: the caller's promise; pure register arithmetic.
    unsafe {
        if DOT == VEX {
            asm!("{{vex}} vpdpbusd {a}, {u}, {q}", a = inout(ymm_reg) acc, u = in(ymm_reg) u, q = in(ymm_reg) q,
                options(pure, nomem, nostack));
        } else {
            asm!("{{evex}} vpdpbusd {a}, {u}, {q}", a = inout(ymm_reg) acc, u = in(ymm_reg) u, q = in(ymm_reg) q,
                options(pure, nomem, nostack));
        }
    }
    acc
}

/// [`super::reference::quantize`], a block at a time in four registers: the same
/// float operations on each value, in the same order (the compiler keeps the
/// scalar code scalar, for `f32::max`'s NaN rule).
///
/// SAFETY: the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], sum: &mut [i32]) {
    let (magnitude, round) = (_mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX)), _mm256_set1_ps(ROUND));
    for (b, ((d, s), sum)) in d.iter_mut().zip(s.iter_mut()).zip(sum.iter_mut()).enumerate() {
        let x = &x[b * BLOCK..(b + 1) * BLOCK];
        // SAFETY (loads and the store): `x` and `q`'s block hold 32 values.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
        // `vmaxps` returns its second operand when the first is NaN: a NaN
        // is passed over, as `f32::max` does.
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(_mm256_and_ps(v, magnitude), m));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        *d = amax / 127.0;
        let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        // Rounded as the scalar code rounds; a NaN (an infinite `x` times a
        // zero `inv`) becomes 0, as Rust's `as i32` makes it.
        let ints = v.map(|v| {
            let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v, inv), round), round);
            _mm256_and_si256(_mm256_cvtps_epi32(r), _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(r, r)))
        });
        let total = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
        let total = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        let total = _mm_add_epi32(total, _mm_shuffle_epi32(total, 0b01_00_11_10));
        let total = _mm_cvtsi128_si32(_mm_add_epi32(total, _mm_shuffle_epi32(total, 0b10_11_00_01)));
        // Packing interleaves the 128-bit lanes; the permutation undoes it.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        unsafe { _mm256_storeu_si256(q[b * BLOCK..(b + 1) * BLOCK].as_mut_ptr() as *mut __m256i, bytes) };
        *sum = total;
        *s = *d * total as f32;
    }
}

/// Activation rows taken together against a half.
pub(super) const TOGETHER: usize = 4;

std::thread_local! {
    /// A worker's last Q5 tile, unpacked ([`tile`]).
    static UNPACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows `span` of the outputs of one tile, a half at a time, [`TOGETHER`]
/// rows at a time, with the dot products `DOT` names.
///
/// SAFETY: the CPU has AVX2, FMA and F16C, and `DOT`'s encoding of
/// `vpdpbusd`; `span` lies within `a`'s rows; `tile.out` holds `span.end *
/// tile.n` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const DOT: u8>(tile: &Tile, a: &Activations, span: std::ops::Range<usize>) {
    // Q5's fifth bits cost three operations a group each time a pass of
    // rows decodes a block: a tile that takes several passes is unpacked to
    // a byte a value once (Gemma-3 270M's prefill of 8 prompts on AVX-VNNI:
    // 841 tokens/s decoding each pass, 961 unpacking, 891 before the plane).
    if tile.width == Width::Five && span.len() > TOGETHER {
        return UNPACKED.with_borrow_mut(|bytes| {
            // SAFETY: this function's promises.
            unsafe {
                unpack_five(tile, a.k / BLOCK, bytes);
                passes::<DOT, true>(&Tile { w: bytes, ..tile.without_ahead() }, a, span)
            }
        });
    }
    unsafe { passes::<DOT, false>(tile, a, span) }
}

/// [`tile`]'s passes; with `BYTES`, a Q5 tile's values are a byte each
/// ([`unpack_five`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn passes<const DOT: u8, const BYTES: bool>(tile: &Tile, a: &Activations, span: std::ops::Range<usize>) {
    for half in 0..2 {
        let cols = tile.cols.saturating_sub(8 * half).min(8);
        if cols == 0 {
            break;
        }
        let mut r = span.start;
        while r < span.end {
            // Tails run the same per-row code with fewer rows.
            let n = (span.end - r).min(TOGETHER);
            let pass = if half == 0 && r == span.start { *tile } else { tile.without_ahead() };
            let tile = &pass;
            unsafe {
                match tile.width {
                    Width::Four => rows_of::<4, DOT, false>(n, tile, a, r, half, cols),
                    Width::Five => rows_of::<5, DOT, BYTES>(n, tile, a, r, half, cols),
                    Width::Six => rows_of::<6, DOT, false>(n, tile, a, r, half, cols),
                    Width::Eight => rows_of::<8, DOT, false>(n, tile, a, r, half, cols),
                }
            }
            r += TOGETHER;
        }
    }
}

/// A Q5 tile's blocks with their values a byte each, as Q6_K's and Q8_0's
/// are laid out, into `bytes`.
///
/// SAFETY: the CPU has AVX2; `tile` holds `kb` Q5 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_five(tile: &Tile, kb: usize, bytes: &mut Vec<u8>) {
    let header = tile.scales.header_bytes();
    let (from, to) = (tile.w.len() / kb, header + TILE * BLOCK);
    bytes.resize(kb * to, 0);
    for (src, dst) in tile.w.chunks_exact(from).zip(bytes.chunks_exact_mut(to)) {
        dst[..header].copy_from_slice(&src[..header]);
        for half in 0..2 {
            // SAFETY: `src` holds the half's nibbles and plane, `dst` 8
            // groups of 64 bytes after the header.
            unsafe {
                let u = five(src[header + 32 * half..].as_ptr());
                for (g, u) in u.iter().enumerate() {
                    _mm256_storeu_si256(dst[header + 64 * g + 32 * half..].as_mut_ptr() as *mut __m256i, *u);
                }
            }
        }
    }
}

/// A half's eight groups of 4-bit values: nibbles at `values + 64g`, the
/// low halves groups 0..4, the high ones 4..8.
///
/// SAFETY: the CPU has AVX2; `values` holds the half's 4 groups.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles(values: *const u8) -> [__m256i; 8] {
    let low = _mm256_set1_epi8(0x0F);
    let mut u = [_mm256_setzero_si256(); 8];
    for g in 0..4 {
        let v = unsafe { _mm256_loadu_si256(values.add(64 * g) as *const __m256i) };
        u[g] = _mm256_and_si256(v, low);
        u[g + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    u
}

/// A half's eight groups of 5-bit values: [`nibbles`], with group g's
/// fifth bits from bit g of the plane's bytes at `values + PLANE`, shifted
/// to bit 4.
///
/// SAFETY: the CPU has AVX2; `values` holds the half's nibbles and plane.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn five(values: *const u8) -> [__m256i; 8] {
    let mut u = unsafe { nibbles(values) };
    let plane = unsafe { _mm256_loadu_si256(values.add(PLANE) as *const __m256i) };
    let bit = _mm256_set1_epi8(16);
    for (g, u) in u.iter_mut().enumerate() {
        let p = match g {
            0 => _mm256_slli_epi16(plane, 4),
            1 => _mm256_slli_epi16(plane, 3),
            2 => _mm256_slli_epi16(plane, 2),
            3 => _mm256_slli_epi16(plane, 1),
            4 => plane,
            5 => _mm256_srli_epi16(plane, 1),
            6 => _mm256_srli_epi16(plane, 2),
            _ => _mm256_srli_epi16(plane, 3),
        };
        *u = _mm256_or_si256(*u, _mm256_and_si256(p, bit));
    }
    u
}

/// The i16 sum of `each` group's products (the caller keeps it within an i16).
#[target_feature(enable = "avx2")]
#[inline]
fn sum16(groups: std::ops::Range<usize>, each: impl Fn(usize) -> __m256i) -> __m256i {
    groups.map(each).fold(_mm256_setzero_si256(), |p, q| _mm256_add_epi16(p, q))
}

/// Q6_K's dot product, `sub0 * part0 + sub1 * part1`, in f32 from the two
/// halves' integer sums and the rows' 16-value scales: exact, as the
/// integer is (each product is at most 16 * 32 * 127 * 128 < 2^23, the sum
/// below 2^24), and cheaper than `vpmulld`.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn sixteens(part0: __m256i, part1: __m256i, subs: [__m256; 2]) -> __m256 {
    let first = _mm256_mul_ps(_mm256_cvtepi32_ps(part0), subs[0]);
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(part1), subs[1], first)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_of<const W: usize, const DOT: u8, const BYTES: bool>(
    n: usize,
    tile: &Tile,
    a: &Activations,
    r0: usize,
    half: usize,
    cols: usize,
) {
    unsafe {
        match n {
            4 => rows::<4, W, DOT, BYTES>(tile, a, r0, half, cols),
            3 => rows::<3, W, DOT, BYTES>(tile, a, r0, half, cols),
            2 => rows::<2, W, DOT, BYTES>(tile, a, r0, half, cols),
            _ => rows::<1, W, DOT, BYTES>(tile, a, r0, half, cols),
        }
    }
}

/// Rows `r0..r0 + R` against one half of a tile whose values are `W` bits
/// wide (a byte each where `BYTES`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows<const R: usize, const W: usize, const DOT: u8, const BYTES: bool>(
    tile: &Tile,
    a: &Activations,
    r0: usize,
    half: usize,
    cols: usize,
) {
    let kb = a.k / BLOCK;
    let tile_bytes = tile.w.len() / kb;
    let ones = _mm256_set1_epi16(1);
    let sixteen = _mm256_set1_epi16(16);
    let low16 = _mm256_set1_epi32(0xFFFF);
    let (scales, header) = (tile.scales, tile.scales.header_bytes());
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..kb {
        tile.ask_ahead(b, kb);
        let block = tile.w[b * tile_bytes..(b + 1) * tile_bytes].as_ptr();
        // SAFETY (loads): `block` holds the header (a scale and, where
        // stored, an offset per row, and Q6_K's 16-value scales, 8 rows a
        // half) and the values, group g of the half's rows at 64g + 32 *
        // half, Q5's plane of the half's rows at `PLANE + 32 * half`; an
        // activation block holds 32 bytes.
        let (scale, offset) = unsafe {
            let load = |at: usize| match scales {
                Scales::Single => _mm256_loadu_ps(block.add(at) as *const f32),
                _ => _mm256_cvtph_ps(_mm_loadu_si128(block.add(at) as *const __m128i)),
            };
            let at = scales.size() * 8 * half;
            let scale = load(at);
            let offset = match scales {
                Scales::Centered(center) => _mm256_mul_ps(scale, _mm256_set1_ps(-(center as f32))),
                Scales::Sixteens => _mm256_setzero_ps(),
                Scales::Half | Scales::Single => load(scales.offsets() + at),
            };
            (scale, offset)
        };
        // Q6_K: each row's two 16-value scales, in i32 lanes.
        let sub = |i: usize| {
            _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(block.add(SUB + i * TILE + 8 * half) as *const __m128i) })
        };
        let subs = if W == 6 { [sub(0), sub(1)] } else { [_mm256_setzero_si256(); 2] };
        // The i16 pairs `vpmaddwd` takes: each scale twice (the two sums of
        // a lane), and the two scales side by side (the two halves' `sum(q)`).
        let pair = |a: __m256i, b: __m256i| _mm256_or_si256(_mm256_and_si256(a, low16), _mm256_slli_epi32(b, 16));
        let twice = subs.map(|s| pair(s, s));
        let both = pair(subs[0], subs[1]);
        let floats = subs.map(|s| _mm256_cvtepi32_ps(s));
        let values = unsafe { block.add(header + 32 * half) };
        let u = unsafe {
            match W {
                4 => nibbles(values),
                5 if !BYTES => five(values),
                _ => std::array::from_fn(|g| _mm256_loadu_si256(values.add(64 * g) as *const __m256i)),
            }
        };
        for (i, acc) in acc.iter_mut().enumerate() {
            let at = (r0 + i) * kb + b;
            // SAFETY: row `r0 + i` is within `span`, so `a`'s (`tile`'s
            // promise), and `b` below its blocks.
            let q = unsafe { a.q_at(at) };
            let qs = |g: usize| _mm256_set1_epi32(unsafe { (q.add(4 * g) as *const i32).read_unaligned() });
            let pairs = |g: usize| _mm256_maddubs_epi16(u[g], qs(g));
            let vnni = |groups: [usize; 4], from: i32| {
                groups.into_iter().fold(_mm256_set1_epi32(from), |d, g| {
                    // SAFETY: this function's promise.
                    unsafe { dpbusd::<DOT>(d, u[g], qs(g)) }
                })
            };
            let dot = match W {
                6 if DOT != MADD => {
                    let [first, second] = unsafe { a.sixteens(at) };
                    sixteens(vnni([0, 1, 2, 3], first), vnni([4, 5, 6, 7], second), floats)
                }
                // Two chains of `vpdpbusd` rather than one eight long: a
                // lone row waits on the instruction's latency otherwise, and
                // integer sums are the same in any order.
                _ if DOT != MADD => _mm256_cvtepi32_ps(_mm256_add_epi32(vnni([0, 2, 4, 6], 0), vnni([1, 3, 5, 7], 0))),
                4 => _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16(0..8, pairs), ones)),
                5 => _mm256_cvtepi32_ps(_mm256_add_epi32(
                    _mm256_madd_epi16(sum16(0..4, pairs), ones),
                    _mm256_madd_epi16(sum16(4..8, pairs), ones),
                )),
                6 => {
                    let halves = _mm256_set1_epi32(unsafe { a.sixteens(at) }[0]);
                    let scaled = |g: usize, i: usize| _mm256_madd_epi16(sum16(g..g + 2, pairs), twice[i]);
                    let dot = _mm256_add_epi32(
                        _mm256_add_epi32(scaled(0, 0), scaled(2, 0)),
                        _mm256_add_epi32(scaled(4, 1), scaled(6, 1)),
                    );
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(dot, _mm256_slli_epi32(_mm256_madd_epi16(both, halves), 5)))
                }
                _ => {
                    let split = unsafe { a.split_at(at) };
                    let part = |g: usize, from: usize| {
                        _mm256_maddubs_epi16(
                            u[g],
                            _mm256_set1_epi32(unsafe { (split.add(from + 4 * g) as *const i32).read_unaligned() }),
                        )
                    };
                    let lo = |g: usize| part(g, 0);
                    let hi = |g: usize| part(g, BLOCK);
                    _mm256_cvtepi32_ps(_mm256_add_epi32(
                        _mm256_add_epi32(
                            _mm256_madd_epi16(sum16(0..4, lo), ones),
                            _mm256_madd_epi16(sum16(4..8, lo), ones),
                        ),
                        _mm256_madd_epi16(sum16(0..8, hi), sixteen),
                    ))
                }
            };
            let s = _mm256_mul_ps(scale, _mm256_set1_ps(unsafe { a.d_at(at) }));
            *acc = _mm256_fmadd_ps(dot, s, *acc);
            if W != 6 {
                // Q6_K has no offset (`Scales::has_offset`).
                *acc = _mm256_fmadd_ps(offset, _mm256_set1_ps(unsafe { a.s_at(at) }), *acc);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: the caller's promise; the half's first `cols` columns lie
        // within `n`.
        let out = unsafe { tile.out.add((r0 + i) * tile.n + tile.col + 8 * half) };
        if cols == 8 {
            unsafe { _mm256_storeu_ps(out, *acc) };
        } else {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols as i32), lanes);
            unsafe { _mm256_maskstore_ps(out, mask, *acc) };
        }
    }
}
