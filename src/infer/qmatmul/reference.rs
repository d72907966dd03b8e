//! The numeric definition as plain scalar code: what every kernel computes,
//! bit for bit, and the kernel of CPUs with none of the others.

use super::{Activations, BLOCK, HEADER, TILE, Tile};
use half::f16;

/// Adding then subtracting 1.5 * 2^23 rounds an f32 of magnitude below 2^22
/// to an integer, half to even (the default rounding, as `vcvtps2dq` does),
/// in two plain float operations that vectorize on every CPU.
const ROUND: f32 = 12_582_912.0;

/// Quantizes 32-blocks of `x` into `q`, with their steps `d`, `s = d *
/// sum(q)` and `sum(q)`. `q` is as long as `x`; the others hold a value per
/// block.
#[inline(always)]
pub(super) fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], sum: &mut [i32]) {
    for (b, ((d, s), sum)) in d.iter_mut().zip(s.iter_mut()).zip(sum.iter_mut()).enumerate() {
        let x = &x[b * BLOCK..(b + 1) * BLOCK];
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        *d = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut total = 0i32;
        for (q, &x) in q[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(x) {
            let v = ((x * inv + ROUND) - ROUND) as i32;
            *q = v as i8;
            total += v;
        }
        *sum = total;
        *s = *d * total as f32;
    }
}

/// Rows `span` of the outputs of one tile.
///
/// SAFETY: `tile.out` holds `span.end * tile.n` floats.
pub(super) unsafe fn tile(tile: &Tile, a: &Activations, span: std::ops::Range<usize>) {
    let kb = a.k / BLOCK;
    let tile_bytes = tile.w.len() / kb;
    let half = |b: &[u8], i: usize| f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
    let mut acc = vec![[0f32; TILE]; span.len()];
    let mut u = [[0u8; BLOCK]; TILE];
    for b in 0..kb {
        let block = &tile.w[b * tile_bytes..(b + 1) * tile_bytes];
        for (c, u) in u.iter_mut().enumerate().take(tile.cols) {
            for (j, u) in u.iter_mut().enumerate() {
                let (byte, shift) = tile.width.slot(c, j);
                *u = if tile.width.nibbles() { block[HEADER + byte] >> shift & 0x0F } else { block[HEADER + byte] };
            }
        }
        for (r, acc) in span.clone().zip(acc.iter_mut()) {
            let at = r * kb + b;
            let q = &a.q[at * BLOCK..(at + 1) * BLOCK];
            for (c, (acc, u)) in acc.iter_mut().zip(&u).enumerate().take(tile.cols) {
                let dot: i32 = u.iter().zip(q).map(|(&u, &q)| u as i32 * q as i32).sum();
                *acc = (dot as f32).mul_add(half(block, c) * a.d[at], *acc);
                *acc = half(block, TILE + c).mul_add(a.s[at], *acc);
            }
        }
    }
    for (r, acc) in span.zip(&acc) {
        for (c, &v) in acc.iter().enumerate().take(tile.cols) {
            // SAFETY: the caller's promise; `col + cols <= n`.
            unsafe { *tile.out.add(r * tile.n + tile.col + c) = v };
        }
    }
}
