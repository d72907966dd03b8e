//! The definition on AVX512-VNNI: a 16-row tile's block against one
//! activation block is eight `vpdpbusd` giving 16 outputs. Q6_K sums its
//! unsigned `u` each 16 values apart, for their scale, and takes `32 *
//! sum(q)` of those 16 back out: the dot product of `u - 32`.
#![cfg(target_arch = "x86_64")]

use super::{Activations, BLOCK, PLANE, SUB, Scales, TILE, Tile, Width};
use std::arch::x86_64::*;

/// Activation rows taken together against a tile's block: its eight
/// registers of values, eight accumulators and their scales fit in 32.
pub(super) const TOGETHER: usize = 8;

/// `$body` for each `$i` in `0..$r` (at most [`TOGETHER`]), written out:
/// each row's accumulator then stays in a register (a loop over the rows
/// kept them on the stack, a load and a store a block; Gemma-3 270M's
/// matmuls at 128 rows: 1.2-1.25x faster). On AVX2's 16 registers it
/// spilled: mixed there, slower on AVX-VNNI.
macro_rules! each_row {
    ($r:expr, $i:ident => $body:block) => {
        each_row!(@ $r, $i, $body, 0 1 2 3 4 5 6 7)
    };
    (@ $r:expr, $i:ident, $body:block, $($n:literal)*) => {
        $( if $n < $r { let $i: usize = $n; $body } )*
    };
}

/// Rows `span` of the outputs of one tile, [`TOGETHER`] rows at a time.
///
/// SAFETY: the CPU has AVX512F, BW and VNNI; `span` lies within `a`'s
/// rows; `tile.out` holds `span.end * tile.n` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile(tile: &Tile, a: &Activations, span: std::ops::Range<usize>) {
    unsafe {
        match tile.width {
            Width::Four => rows_of::<4>(tile, a, span),
            Width::Five => rows_of::<5>(tile, a, span),
            Width::Six => rows_of::<6>(tile, a, span),
            Width::Eight => rows_of::<8>(tile, a, span),
        }
    }
}

/// [`tile`] for values `W` bits wide.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn rows_of<const W: usize>(tile: &Tile, a: &Activations, span: std::ops::Range<usize>) {
    let mask: __mmask16 = if tile.cols == TILE { !0 } else { (1u16 << tile.cols) - 1 };
    let mut r = span.start;
    while r < span.end {
        // Tails run the same per-row code with fewer rows.
        let pass = if r == span.start { *tile } else { tile.without_ahead() };
        let tile = &pass;
        unsafe {
            match (span.end - r).min(TOGETHER) {
                8 => rows::<8, W>(tile, a, r, mask),
                7 => rows::<7, W>(tile, a, r, mask),
                6 => rows::<6, W>(tile, a, r, mask),
                5 => rows::<5, W>(tile, a, r, mask),
                4 => rows::<4, W>(tile, a, r, mask),
                3 => rows::<3, W>(tile, a, r, mask),
                2 => rows::<2, W>(tile, a, r, mask),
                _ => rows::<1, W>(tile, a, r, mask),
            }
        }
        r += TOGETHER;
    }
}

/// Rows `r0..r0 + R` against one tile of `W`-bit values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn rows<const R: usize, const W: usize>(tile: &Tile, a: &Activations, r0: usize, mask: __mmask16) {
    let kb = a.k / BLOCK;
    let tile_bytes = tile.w.len() / kb;
    let low = _mm512_set1_epi8(0x0F);
    let (scales, header) = (tile.scales, tile.scales.header_bytes());
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        tile.ask_ahead(b, kb);
        let block = tile.w[b * tile_bytes..(b + 1) * tile_bytes].as_ptr();
        // SAFETY (loads): `block` holds the header (a scale and, where
        // stored, an offset per row, and Q6_K's 16-value scales) and the
        // values (`Width::value_bytes`); each activation block holds 32
        // bytes.
        let (scale, offset) = unsafe {
            let load = |at: usize| match scales {
                Scales::Single => _mm512_loadu_ps(block.add(at) as *const f32),
                _ => _mm512_cvtph_ps(_mm256_loadu_si256(block.add(at) as *const __m256i)),
            };
            let scale = load(0);
            let offset = match scales {
                Scales::Centered(center) => _mm512_mul_ps(scale, _mm512_set1_ps(-(center as f32))),
                Scales::Sixteens => _mm512_setzero_ps(),
                Scales::Half | Scales::Single => load(scales.offsets()),
            };
            (scale, offset)
        };
        let sub = |i: usize| {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(unsafe {
                _mm_loadu_si128(block.add(SUB + i * TILE) as *const __m128i)
            }))
        };
        let values = unsafe { block.add(header) };
        let mut u = [_mm512_setzero_si512(); 8];
        if W <= 5 {
            for g in 0..4 {
                let v = unsafe { _mm512_loadu_si512(values.add(64 * g) as *const __m512i) };
                u[g] = _mm512_and_si512(v, low);
                u[g + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            if W == 5 {
                // Group g's fifth bits are bit g of the plane's bytes; shifted
                // to bit 4, `u | (plane & 16)` in one ternary logic op.
                let plane = unsafe { _mm512_loadu_si512(values.add(PLANE) as *const __m512i) };
                let bit = _mm512_set1_epi8(16);
                for (g, u) in u.iter_mut().enumerate() {
                    let p = match g {
                        0 => _mm512_slli_epi16(plane, 4),
                        1 => _mm512_slli_epi16(plane, 3),
                        2 => _mm512_slli_epi16(plane, 2),
                        3 => _mm512_slli_epi16(plane, 1),
                        4 => plane,
                        5 => _mm512_srli_epi16(plane, 1),
                        6 => _mm512_srli_epi16(plane, 2),
                        _ => _mm512_srli_epi16(plane, 3),
                    };
                    *u = _mm512_ternarylogic_epi32(*u, p, bit, 0xF8);
                }
            }
        } else {
            for (g, u) in u.iter_mut().enumerate() {
                *u = unsafe { _mm512_loadu_si512(values.add(64 * g) as *const __m512i) };
            }
        }
        let subs = if W == 6 { [sub(0), sub(1)] } else { [_mm512_setzero_ps(); 2] };
        each_row!(R, i => {
            let at = (r0 + i) * kb + b;
            // SAFETY: row `r0 + i` is within `span`, so `a`'s (`tile`'s
            // promise), and `b` below its blocks.
            let q = unsafe { a.q_at(at) };
            let qs = |g: usize| _mm512_set1_epi32(unsafe { (q.add(4 * g) as *const i32).read_unaligned() });
            let dot = if W == 6 {
                let part = |from: usize, start: i32| {
                    (from..from + 4).fold(_mm512_set1_epi32(start), |d, g| _mm512_dpbusd_epi32(d, u[g], qs(g)))
                };
                let [first, second] = unsafe { a.sixteens(at) };
                // As `avx2::sixteens`: exact in f32, cheaper than `vpmulld`.
                let first = _mm512_mul_ps(_mm512_cvtepi32_ps(part(0, first)), subs[0]);
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(part(4, second)), subs[1], first)
            } else {
                // Two chains rather than one eight long: a lone row waits on
                // the instruction's latency otherwise, and integer sums are
                // the same in any order.
                let chain = |from: usize| {
                    (from..8).step_by(2).fold(_mm512_setzero_si512(), |d, g| _mm512_dpbusd_epi32(d, u[g], qs(g)))
                };
                _mm512_cvtepi32_ps(_mm512_add_epi32(chain(0), chain(1)))
            };
            let s = _mm512_mul_ps(scale, _mm512_set1_ps(unsafe { a.d_at(at) }));
            acc[i] = _mm512_fmadd_ps(dot, s, acc[i]);
            // Q6_K too, though it has no offset (`Scales::has_offset`):
            // adding `0 * s` changes no bit, and without it this loop's
            // Q6_K build measured 20-30% slower (its registers allocated
            // differently; 64 rows, Xeon, rustc 1.95).
            acc[i] = _mm512_fmadd_ps(offset, _mm512_set1_ps(unsafe { a.s_at(at) }), acc[i]);
        });
    }
    each_row!(R, i => {
        unsafe { _mm512_mask_storeu_ps(tile.out.add((r0 + i) * tile.n + tile.col), mask, acc[i]) };
    });
}
