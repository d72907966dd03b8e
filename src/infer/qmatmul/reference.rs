//! The numeric definition as plain scalar code: what every kernel computes,
//! bit for bit, and the kernel of CPUs with none of the others.

use super::{Activations, BLOCK, SUB, Scales, TILE, Tile};

/// Adding then subtracting 1.5 * 2^23 rounds an f32 of magnitude below 2^22
/// to an integer, half to even (the default rounding, as `vcvtps2dq` does),
/// in two plain float operations that vectorize on every CPU.
pub(super) const ROUND: f32 = 12_582_912.0;

/// Quantizes 32-blocks of `x` into `q`, with their steps `d`, `s = d *
/// sum(q)` and `sum(q)`. `q` is as long as `x`; the others hold a value per
/// block.
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
    let header = tile.scales.header_bytes();
    let mut acc = vec![[0f32; TILE]; span.len()];
    let mut u = [[0u8; BLOCK]; TILE];
    for b in 0..kb {
        let block = &tile.w[b * tile_bytes..(b + 1) * tile_bytes];
        for (c, u) in u.iter_mut().enumerate().take(tile.cols) {
            for (j, u) in u.iter_mut().enumerate() {
                *u = tile.width.get(&block[header..], c, j);
            }
        }
        for (r, acc) in span.clone().zip(acc.iter_mut()) {
            let at = r * kb + b;
            let q = &a.q[at * BLOCK..(at + 1) * BLOCK];
            for (c, (acc, u)) in acc.iter_mut().zip(&u).enumerate().take(tile.cols) {
                let dot = |from: usize, bias: i32| -> i32 {
                    (from..from + 16).map(|j| (u[j] as i32 - bias) * q[j] as i32).sum()
                };
                let dot = if tile.scales == Scales::Sixteens {
                    let sub = |i: usize| block[SUB + i * TILE + c] as i8 as i32;
                    sub(0) * dot(0, 32) + sub(1) * dot(16, 32)
                } else {
                    dot(0, 0) + dot(16, 0)
                };
                let (scale, offset) = tile.scales.read(block, c);
                *acc = (dot as f32).mul_add(scale * a.d[at], *acc);
                if tile.scales.has_offset() {
                    *acc = offset.mul_add(a.s[at], *acc);
                }
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
