//! The definition on Arm's NEON: a tile is taken four rows at a time, one
//! 16-byte register holding a group of 4 values of each of the 4 rows.
//! Every value fits an int8 (`u` of 4 and 5 bits, Q6_K's `u - 32`, Q8_0's
//! signed weights with `128 * sum(q)` added back), so with the dot-product
//! extension (`DOT`) one `sdot` sums a group for the 4 rows; without it,
//! which every aarch64 CPU has, `smull` makes exact i16 products, `sadalp`
//! sums their pairs to i32 and one pairwise add ends each row's sum.
#![cfg(target_arch = "aarch64")]

use super::{Activations, BLOCK, PLANE, SUB, TILE, Tile, Width};
use std::arch::aarch64::*;
use std::arch::asm;

/// `acc` plus, in each i32 lane, the sum of four i8 x i8 products.
///
/// Inline assembly: the `sdot` intrinsic is not stable Rust yet.
///
/// SAFETY: the CPU has the dot-product extension.
#[inline(always)]
unsafe fn sdot(mut acc: int32x4_t, w: int8x16_t, q: int8x16_t) -> int32x4_t {
    unsafe {
        asm!(".arch_extension dotprod", "sdot {a:v}.4s, {w:v}.16b, {q:v}.16b", a = inout(vreg) acc, w = in(vreg) w,
            q = in(vreg) q, options(pure, nomem, nostack));
    }
    acc
}

/// Activation rows taken together against a tile.
pub(super) const TOGETHER: usize = 4;

/// Rows `span` of the outputs of one tile, [`TOGETHER`] rows at a time,
/// with `sdot` where `DOT`.
///
/// SAFETY: `tile.out` holds `span.end * tile.n` floats; with `DOT`, the CPU
/// has the dot-product extension.
pub(super) unsafe fn tile<const DOT: bool>(tile: &Tile, a: &Activations, span: std::ops::Range<usize>) {
    let mut r = span.start;
    while r < span.end {
        // Tails run the same per-row code with fewer rows.
        unsafe {
            match (span.end - r).min(TOGETHER) {
                4 => rows::<4, DOT>(tile, a, r),
                3 => rows::<3, DOT>(tile, a, r),
                2 => rows::<2, DOT>(tile, a, r),
                _ => rows::<1, DOT>(tile, a, r),
            }
        }
        r += TOGETHER;
    }
}

/// Activation rows `r0..r0 + R` against one tile.
#[inline]
unsafe fn rows<const R: usize, const DOT: bool>(tile: &Tile, a: &Activations, r0: usize) {
    let kb = a.k / BLOCK;
    let tile_bytes = tile.w.len() / kb;
    let (width, scales, header) = (tile.width, tile.scales, tile.scales.header_bytes());
    // Four columns of the tile a register.
    let mut acc = [[unsafe { vdupq_n_f32(0.0) }; TILE / 4]; R];
    for b in 0..kb {
        let block = &tile.w[b * tile_bytes..(b + 1) * tile_bytes];
        // SAFETY (loads): group g of tile rows 4c..4c + 4 is the 16 bytes
        // at 64g + 16c of the block's values, Q5's plane of those rows at
        // `PLANE + 16c`; an activation block holds 32 bytes.
        let values = block[header..].as_ptr();
        for c in 0..TILE / 4 {
            let pairs = [0, 1, 2, 3].map(|r| scales.read(block, 4 * c + r));
            let (scale, offset) =
                unsafe { (vld1q_f32(pairs.map(|h| h.0).as_ptr()), vld1q_f32(pairs.map(|h| h.1).as_ptr())) };
            let load = |g: usize| unsafe { vld1q_u8(values.add(64 * g + 16 * c)) };
            let mut w = [unsafe { vdupq_n_s8(0) }; 8];
            unsafe {
                if width.nibbles() {
                    for g in 0..4 {
                        let v = load(g);
                        w[g] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
                        w[g + 4] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                    }
                }
                if width == Width::Five {
                    // Group g's fifth bits are bit g of the plane's bytes,
                    // shifted to bit 4 (`vshlq_u8` shifts right by a negative
                    // count).
                    let plane = vld1q_u8(values.add(PLANE + 16 * c));
                    for (g, w) in w.iter_mut().enumerate() {
                        let fifth = vandq_u8(vshlq_u8(plane, vdupq_n_s8(4 - g as i8)), vdupq_n_u8(16));
                        *w = vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(*w), fifth));
                    }
                } else if !width.nibbles() {
                    for (g, w) in w.iter_mut().enumerate() {
                        let v = vreinterpretq_s8_u8(load(g));
                        *w = match width {
                            Width::Six => vsubq_s8(v, vdupq_n_s8(32)),
                            _ => veorq_s8(v, vdupq_n_s8(-128)),
                        };
                    }
                }
            }
            // Q6_K: the rows' 16-value scales.
            let sub = |i: usize| {
                let at = SUB + i * TILE + 4 * c;
                let sc = [0, 1, 2, 3].map(|r| block[at + r] as i8 as i32);
                unsafe { vld1q_s32(sc.as_ptr()) }
            };
            let subs = if width == Width::Six { [sub(0), sub(1)] } else { [unsafe { vdupq_n_s32(0) }; 2] };
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = (r0 + i) * kb + b;
                let q = a.q[at * BLOCK..(at + 1) * BLOCK].as_ptr();
                // SAFETY: NEON is part of aarch64; the loads are in bounds.
                unsafe {
                    let qs =
                        |g: usize| vreinterpretq_s8_s32(vdupq_n_s32((q.add(4 * g) as *const i32).read_unaligned()));
                    let part = |groups: std::ops::Range<usize>| {
                        if DOT {
                            return groups.fold(vdupq_n_s32(0), |d, g| sdot(d, w[g], qs(g)));
                        }
                        let (mut lo, mut hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
                        for g in groups {
                            let x = qs(g);
                            lo = vpadalq_s16(lo, vmull_s8(vget_low_s8(w[g]), vget_low_s8(x)));
                            hi = vpadalq_s16(hi, vmull_high_s8(w[g], x));
                        }
                        vpaddq_s32(lo, hi)
                    };
                    let dot = match width {
                        Width::Six => vaddq_s32(vmulq_s32(part(0..4), subs[0]), vmulq_s32(part(4..8), subs[1])),
                        Width::Eight => vaddq_s32(part(0..8), vdupq_n_s32(128 * a.sum[at])),
                        _ => part(0..8),
                    };
                    let s = vmulq_f32(scale, vdupq_n_f32(a.d[at]));
                    acc[c] = vfmaq_f32(acc[c], vcvtq_f32_s32(dot), s);
                    if scales.has_offset() {
                        acc[c] = vfmaq_f32(acc[c], offset, vdupq_n_f32(a.s[at]));
                    }
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (c, v) in acc.iter().enumerate() {
            let mut lanes = [0f32; 4];
            unsafe { vst1q_f32(lanes.as_mut_ptr(), *v) };
            for (l, &x) in lanes.iter().enumerate().take(tile.cols.saturating_sub(4 * c)) {
                // SAFETY: the caller's promise; the first `cols` columns lie
                // within `n`.
                unsafe { *tile.out.add((r0 + i) * tile.n + tile.col + 4 * c + l) = x };
            }
        }
    }
}
