//! The definition on AVX512-VNNI: a 16-row tile's block against one
//! activation block is eight `vpdpbusd` giving 16 outputs.
#![cfg(target_arch = "x86_64")]

use super::{Activations, BLOCK, HEADER, TILE, Tile};
use std::arch::x86_64::*;

/// Rows `span` of the outputs of one tile, four rows at a time.
///
/// SAFETY: the CPU has AVX512F, BW and VNNI; `tile.out` holds `span.end *
/// tile.n` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile(tile: &Tile, a: &Activations, span: std::ops::Range<usize>) {
    let mask: __mmask16 = if tile.cols == TILE { !0 } else { (1u16 << tile.cols) - 1 };
    let mut r = span.start;
    while r < span.end {
        // Tails run the same per-row code with fewer rows.
        unsafe {
            match (span.end - r).min(4) {
                4 => rows::<4>(tile, a, r, mask),
                3 => rows::<3>(tile, a, r, mask),
                2 => rows::<2>(tile, a, r, mask),
                _ => rows::<1>(tile, a, r, mask),
            }
        }
        r += 4;
    }
}

/// Rows `r0..r0 + R` against one tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn rows<const R: usize>(tile: &Tile, a: &Activations, r0: usize, mask: __mmask16) {
    let kb = a.k / BLOCK;
    let tile_bytes = tile.w.len() / kb;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let block = &tile.w[b * tile_bytes..(b + 1) * tile_bytes];
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
        if tile.width.nibbles() {
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
            let at = (r0 + i) * kb + b;
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
        unsafe { _mm512_mask_storeu_ps(tile.out.add((r0 + i) * tile.n + tile.col), mask, *acc) };
    }
}
