//! Attention on the CPU in f32, fused: for a whole packed batch, each
//! sequence's q/k norms (Qwen3, Gemma-3), rotary embeddings, the append to its KV
//! cache, scores, soft-capping, the causal (and sliding) window, softmax and
//! the weighted sum of values run as plain loops over slices. As tensor ops
//! that was a dozen small operations per sequence and layer, and half of the
//! decoding time at batch 32. The decoder keeps the tensor ops for the GPU;
//! a test holds the two to the same results.

use super::decoder::Config;
use crate::infer::math::{expf, gelu};

/// Width of the register blocks of the score and output loops, and the
/// positions of a block of the KV cache.
const LANES: usize = 16;

/// `acc += x * row` over one block, kept in registers.
#[inline(always)]
fn axpy(acc: &mut [f32; LANES], x: f32, row: &[f32]) {
    let row: &[f32; LANES] = row.try_into().expect("a whole block");
    for i in 0..LANES {
        acc[i] += x * row[i];
    }
}

/// Blocks the score and output loops take together: as many independent
/// chains of additions, which the CPU overlaps (one chain waits out each
/// addition's latency: prefill's attention was bound by it).
const CHAINS: usize = 4;

/// Scores of `q` against the `N` key blocks at `at(0..N)` of `keys`, into
/// `out`'s first `N` blocks (fewer values at its end).
#[inline(always)]
fn dots<const N: usize>(q: &[f32], keys: &[f32], at: impl Fn(usize) -> usize, out: &mut [f32]) {
    let starts: [usize; N] = std::array::from_fn(at);
    let mut acc = [[0f32; LANES]; N];
    for (c, &qc) in q.iter().enumerate() {
        for t in 0..N {
            axpy(&mut acc[t], qc, &keys[starts[t] + c * LANES..][..LANES]);
        }
    }
    for (o, a) in out.chunks_mut(LANES).zip(&acc) {
        o.copy_from_slice(&a[..o.len()]);
    }
}

/// The values of `positions` weighed by `weights`, over the `N` blocks of
/// dimensions from `dims` (value block of position j at `at(j)`), into
/// `out`'s blocks from `dims` (fewer values at its end).
#[inline(always)]
fn weigh<const N: usize>(
    weights: &[f32],
    positions: std::ops::RangeInclusive<usize>,
    values: &[f32],
    at: impl Fn(usize) -> usize,
    dims: usize,
    out: &mut [f32],
) {
    let mut acc = [[0f32; LANES]; N];
    for (j, &w) in positions.zip(weights) {
        let row = at(j) + (j % LANES) * LANES;
        for t in 0..N {
            axpy(&mut acc[t], w, &values[row + (dims + t) * LANES * LANES..][..LANES]);
        }
    }
    for (o, a) in out[dims * LANES..].chunks_mut(LANES).zip(&acc) {
        o.copy_from_slice(&a[..o.len()]);
    }
}

/// Rotary tables `(context, head_dim / 2)` as the host path reads them.
pub(super) struct HostRope {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
    /// Gemma-3's sliding layers.
    pub(super) local: Option<(Vec<f32>, Vec<f32>)>,
}

/// One layer's keys and values of one sequence, in blocks of [`LANES`]
/// positions, a block for each key head, appended as positions come (earlier
/// blocks never move). A block holds the keys transposed, `(head_dim,
/// LANES)`, so a query's scores against it are vertical multiply-adds (no
/// horizontal sums), and the values as `(head_dim / LANES, LANES
/// positions, LANES)`, head_dim rounded up to whole blocks of dimensions.
/// Each loop of [`Layer::attend`] then reads contiguous floats front to
/// back, which the hardware prefetcher streams: with keys transposed over a
/// whole sequence and values as the projection lays them out, every load
/// was a new cache line and attention took a seventh of decoding at batch 32.
#[derive(Default)]
pub(super) struct HostKv {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The floats of one key head's block: `head_dim` rounded up to whole
/// blocks of [`LANES`] dimensions, times [`LANES`] positions.
fn block_len(d: usize) -> usize {
    d.next_multiple_of(LANES) * LANES
}

impl HostKv {
    /// Writes `l` rows of keys and values `(l, n_kv_head * head_dim)` at
    /// positions `len..len + l`.
    fn append(&mut self, len: usize, k: &[f32], v: &[f32], nkv: usize, d: usize) {
        for (r, (key, value)) in k.chunks_exact(nkv * d).zip(v.chunks_exact(nkv * d)).enumerate() {
            let (b, lane) = ((len + r) / LANES, (len + r) % LANES);
            let end = (b + 1) * nkv * block_len(d);
            if self.keys.len() < end {
                self.keys.resize(end, 0.0);
                self.values.resize(end, 0.0);
            }
            for g in 0..nkv {
                let head = (b * nkv + g) * block_len(d);
                for (c, (&x, &y)) in key[g * d..(g + 1) * d].iter().zip(&value[g * d..(g + 1) * d]).enumerate() {
                    self.keys[head + c * LANES + lane] = x;
                    self.values[head + (c / LANES * LANES + lane) * LANES + c % LANES] = y;
                }
            }
        }
    }
}

/// What a layer adds to the attention arithmetic.
pub(super) struct Layer<'a> {
    pub(super) cfg: &'a Config,
    pub(super) rope: &'a HostRope,
    pub(super) sliding: bool,
    pub(super) q_norm: Option<&'a [f32]>,
    pub(super) k_norm: Option<&'a [f32]>,
}

impl Layer<'_> {
    /// The attention output `(total, n_head * head_dim)` of packed queries,
    /// keys and values (`(total, heads * head_dim)` each, sequence after
    /// sequence, `lens[i]` rows of sequence i at positions from `starts[i]`).
    /// With `caches`, sequence i attends to `caches[i]` and its new rows are
    /// appended there; without, to its own rows only.
    pub(super) fn attend(
        &self,
        lens: &[usize],
        starts: &[usize],
        mut q: Vec<f32>,
        mut k: Vec<f32>,
        v: Vec<f32>,
        caches: Option<&mut [&mut HostKv]>,
    ) -> Vec<f32> {
        let cfg = self.cfg;
        let (d, nq, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let (cos, sin) = match &self.rope.local {
            Some((cos, sin)) if self.sliding => (cos, sin),
            _ => (&self.rope.cos, &self.rope.sin),
        };
        let mut own: Vec<HostKv> = match caches {
            Some(_) => Vec::new(),
            None => lens.iter().map(|_| HostKv::default()).collect(),
        };
        // Without a cache a sequence attends to its own rows only.
        let cached = caches.is_some();
        let kv: Vec<&mut HostKv> = match caches {
            Some(c) => c.iter_mut().map(|c| &mut **c).collect(),
            None => own.iter_mut().collect(),
        };
        // Each sequence's q/k norms and rotations, and the append of its
        // keys and values: a sequence a work item.
        let mut seqs = Vec::with_capacity(lens.len());
        let (mut q_rest, mut k_rest, mut v_rest) = (&mut q[..], &mut k[..], &v[..]);
        for ((&l, &pos), kv) in lens.iter().zip(starts).zip(kv) {
            let (qs, rest) = std::mem::take(&mut q_rest).split_at_mut(l * nq * d);
            q_rest = rest;
            let (ks, rest) = std::mem::take(&mut k_rest).split_at_mut(l * nkv * d);
            k_rest = rest;
            let (vs, rest) = v_rest.split_at(l * nkv * d);
            v_rest = rest;
            seqs.push(std::sync::Mutex::new((qs, ks, vs, pos, kv)));
        }
        candle_core::utils::barrier_pool().execute_chunked(seqs.len(), |span| {
            for i in span {
                let mut seq = seqs[i].lock().expect("a sequence's preparation does not panic");
                let (qs, ks, vs, pos, kv) = &mut *seq;
                for (r, (q, k)) in qs.chunks_exact_mut(nq * d).zip(ks.chunks_exact_mut(nkv * d)).enumerate() {
                    let p = *pos + r;
                    let (cos, sin) = (&cos[p * d / 2..(p + 1) * d / 2], &sin[p * d / 2..(p + 1) * d / 2]);
                    for head in q.chunks_exact_mut(d) {
                        self.position(head, self.q_norm, cos, sin);
                    }
                    for head in k.chunks_exact_mut(d) {
                        self.position(head, self.k_norm, cos, sin);
                    }
                }
                kv.append(if cached { *pos } else { 0 }, ks, vs, nkv, d);
            }
        });
        let kv: Vec<&HostKv> =
            seqs.into_iter().map(|m| &*m.into_inner().expect("a sequence's preparation does not panic").4).collect();
        let mut out = vec![0f32; q.len()];
        let out_at = out.as_mut_ptr() as usize;
        let offsets: Vec<usize> = lens.iter().scan(0, |acc, &l| Some(std::mem::replace(acc, *acc + l))).collect();
        // Work items: (sequence, query head).
        candle_core::utils::barrier_pool().execute_chunked(lens.len() * nq, |items| {
            let mut scores = Vec::new();
            for item in items {
                let (i, h) = (item / nq, item % nq);
                let (at, l, pos) = (offsets[i], lens[i], starts[i]);
                let g = h / (nq / nkv);
                for r in 0..l {
                    let row = (at + r) * nq * d + h * d;
                    // SAFETY: items write disjoint rows and heads of `out`,
                    // which outlives the pool call.
                    let o = unsafe { std::slice::from_raw_parts_mut((out_at as *mut f32).add(row), d) };
                    self.one_query(&q[row..row + d], kv[i], g, pos + r, &mut scores, o);
                }
            }
        });
        out
    }

    /// The q/k norm (Qwen3, Gemma-3) and the rotary embedding of one head at one position.
    fn position(&self, head: &mut [f32], norm: Option<&[f32]>, cos: &[f32], sin: &[f32]) {
        let cfg = self.cfg;
        if let Some(w) = norm {
            let mean = head.iter().map(|x| x * x).sum::<f32>() / head.len() as f32;
            let scale = 1.0 / (mean + cfg.rms_eps).sqrt();
            for (x, w) in head.iter_mut().zip(w) {
                *x = *x * scale * w;
            }
        }
        let half = head.len() / 2;
        for j in 0..half {
            // GGUF Llama rotates adjacent pairs; hub checkpoints the halves.
            let (a, b) = if cfg.interleaved_rope { (2 * j, 2 * j + 1) } else { (j, j + half) };
            let (x, y) = (head[a], head[b]);
            head[a] = x * cos[j] - y * sin[j];
            head[b] = x * sin[j] + y * cos[j];
        }
    }

    /// One query row at position `p` against the keys of key head `g` that
    /// its window leaves (`kv` holds positions from 0), into `out`.
    ///
    /// In the widest registers the CPU has: the same operations (a multiply
    /// then an add, never fused), so the same bits. Prefill is bound by its
    /// arithmetic, which the portable build's SSE2 runs four lanes at a time.
    fn one_query(&self, q: &[f32], kv: &HostKv, g: usize, p: usize, scores: &mut Vec<f32>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { self.one_query_avx512(q, kv, g, p, scores, out) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { self.one_query_avx2(q, kv, g, p, scores, out) };
            }
        }
        self.one_query_in::<CHAINS>(q, kv, g, p, scores, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn one_query_avx512(&self, q: &[f32], kv: &HostKv, g: usize, p: usize, s: &mut Vec<f32>, out: &mut [f32]) {
        self.one_query_in::<16>(q, kv, g, p, s, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn one_query_avx2(&self, q: &[f32], kv: &HostKv, g: usize, p: usize, s: &mut Vec<f32>, out: &mut [f32]) {
        self.one_query_in::<CHAINS>(q, kv, g, p, s, out)
    }

    /// [`Layer::one_query`], the weighted values taken `WIDE` blocks of
    /// dimensions a pass: 16 (a 256-dimension head in one pass over the
    /// values) where 32 vector registers hold their sums, [`CHAINS`]
    /// otherwise.
    #[inline(always)]
    fn one_query_in<const WIDE: usize>(
        &self,
        q: &[f32],
        kv: &HostKv,
        g: usize,
        p: usize,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let cfg = self.cfg;
        let (d, nkv) = (cfg.head_dim, cfg.n_kv_head);
        let window = cfg.sliding_window.filter(|_| self.sliding);
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        // Whole blocks from the one holding `lo`: the scores below `lo`
        // are computed and set aside (a score depends on its key alone).
        let first = lo / LANES * LANES;
        let head = |b: usize| (b * nkv + g) * block_len(d);
        scores.clear();
        scores.resize(p + 1 - first, 0.0);
        let (blocks, mut b) = (scores.len().div_ceil(LANES), 0);
        while b < blocks {
            let (at, out) = (|t| head(first / LANES + b + t), &mut scores[b * LANES..]);
            let n = (blocks - b).min(CHAINS);
            match n {
                CHAINS => dots::<CHAINS>(q, &kv.keys, at, out),
                3 => dots::<3>(q, &kv.keys, at, out),
                2 => dots::<2>(q, &kv.keys, at, out),
                _ => dots::<1>(q, &kv.keys, at, out),
            }
            b += n;
        }
        let scores = &mut scores[lo - first..];
        let scale = cfg.attn_scale as f32;
        for s in scores.iter_mut() {
            *s *= scale;
            if let Some(cap) = cfg.attn_softcap {
                *s = (cap as f32) * gelu::tanhf(*s / cap as f32);
            }
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in scores.iter_mut() {
            *s -= max;
        }
        expf::exp_in_place(scores);
        let sum = scores.iter().fold(0f32, |sum, s| sum + s);
        for s in scores.iter_mut() {
            *s /= sum;
        }
        let (blocks, mut b) = (d.div_ceil(LANES), 0);
        while b < blocks {
            let at = |j: usize| head(j / LANES);
            let n = match (blocks - b).min(WIDE) {
                n @ 0..=4 => n,
                5..=7 => 4,
                8..=15 => 8,
                _ => 16,
            };
            match n {
                16 => weigh::<16>(scores, lo..=p, &kv.values, at, b, out),
                8 => weigh::<8>(scores, lo..=p, &kv.values, at, b, out),
                4 => weigh::<4>(scores, lo..=p, &kv.values, at, b, out),
                3 => weigh::<3>(scores, lo..=p, &kv.values, at, b, out),
                2 => weigh::<2>(scores, lo..=p, &kv.values, at, b, out),
                _ => weigh::<1>(scores, lo..=p, &kv.values, at, b, out),
            }
            b += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::math::expf::expf;
    use crate::infer::models::family::Activation;

    /// Attention as the definition reads, over keys and values held as
    /// they came: the same operations in the same order.
    fn reference(cfg: &Config, q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], p: usize) -> Vec<f32> {
        let (d, nq, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let lo = cfg.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
        let mut out = vec![0f32; nq * d];
        for h in 0..nq {
            let g = h / (nq / nkv);
            let (q, k) = (&q[h * d..(h + 1) * d], |j: usize| &keys[j][g * d..(g + 1) * d]);
            let scores: Vec<f32> = (lo..=p)
                .map(|j| q.iter().zip(k(j)).fold(0f32, |s, (a, b)| s + a * b) * cfg.attn_scale as f32)
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let e: Vec<f32> = scores.iter().map(|s| expf(s - max)).collect();
            let sum = e.iter().fold(0f32, |sum, s| sum + s);
            for c in 0..d {
                out[h * d + c] = (lo..=p).zip(&e).fold(0f32, |o, (j, s)| o + s / sum * values[j][g * d + c]);
            }
        }
        out
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|x| x.to_bits()).collect()
    }

    type OneQuery = fn(&Layer, &[f32], &HostKv, usize, usize, &mut Vec<f32>, &mut [f32]);

    /// [`Layer::one_query`]'s versions this CPU runs; those it cannot are
    /// named on the terminal (past the harness's capture).
    fn widths() -> Vec<(&'static str, OneQuery)> {
        let mut all: Vec<(&str, OneQuery)> =
            vec![("portable", |l, q, kv, g, p, s, o| l.one_query_in::<CHAINS>(q, kv, g, p, s, o))];
        #[cfg(target_arch = "x86_64")]
        {
            use std::io::Write;
            let skip = |name| {
                let _ = writeln!(std::io::stderr(), "SKIPPED fused attention on {name}: this CPU lacks it");
            };
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                all.push(("avx2", |l, q, kv, g, p, s, o| unsafe { l.one_query_avx2(q, kv, g, p, s, o) }));
            } else {
                skip("avx2");
            }
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                all.push(("avx512f", |l, q, kv, g, p, s, o| unsafe { l.one_query_avx512(q, kv, g, p, s, o) }));
            } else {
                skip("avx512f");
            }
        }
        all
    }

    /// The block layout gives the definition's bits: key heads side by
    /// side, 1 to 7 query heads a key head, head_dims of whole blocks (16
    /// of them: AVX-512's one pass over the values) and not, a window whose
    /// start falls inside a block, sequences packed together, prefill then
    /// steps.
    #[test]
    fn blocks_give_the_definitions_bits() {
        for (nq, nkv, d) in [(4, 2, 24), (3, 3, 24), (4, 1, 24), (7, 1, 24), (2, 1, 256), (2, 1, 200)] {
            heads_give_the_definitions_bits(nq, nkv, d);
        }
    }

    fn heads_give_the_definitions_bits(nq: usize, nkv: usize, d: usize) {
        let context = 64;
        let cfg = Config {
            n_layer: 1,
            n_head: nq,
            n_kv_head: nkv,
            head_dim: d,
            hidden: nq * d,
            rms_eps: 1e-6,
            rope_base: 1e4,
            rope_local_base: None,
            rope_factors: None,
            context,
            interleaved_rope: false,
            attn_scale: 0.3,
            embed_scale: None,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: Some(21),
            activation: Activation::Silu,
        };
        // No rotation (cos 1, sin 0 leave every value as it is).
        let rope = HostRope { cos: vec![1.0; context * d / 2], sin: vec![0.0; context * d / 2], local: None };
        let layer = Layer { cfg: &cfg, rope: &rope, sliding: true, q_norm: None, k_norm: None };
        let value = |seed: usize, n: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0).collect()
        };
        let mut caches = [HostKv::default(), HostKv::default()];
        // Each sequence's keys and values so far, a row a position.
        type Rows = Vec<Vec<f32>>;
        let mut seen: [(Rows, Rows); 2] = Default::default();
        let mut len = [0, 0];
        // Prefill of 17 and 3 rows, then steps of one row each.
        for (step, lens) in [[17, 3]].into_iter().chain(std::iter::repeat_n([1, 1], 30)).enumerate() {
            let rows: usize = lens.iter().sum();
            let (q, k, v) = (
                value(3 * step, rows * nq * d),
                value(3 * step + 1, rows * nkv * d),
                value(3 * step + 2, rows * nkv * d),
            );
            let mut refs: Vec<&mut HostKv> = caches.iter_mut().collect();
            let got = layer.attend(&lens, &len, q.clone(), k.clone(), v.clone(), Some(&mut refs));
            let mut at = 0;
            for (i, &l) in lens.iter().enumerate() {
                for r in 0..l {
                    let row = at + r;
                    seen[i].0.push(k[row * nkv * d..(row + 1) * nkv * d].to_vec());
                    seen[i].1.push(v[row * nkv * d..(row + 1) * nkv * d].to_vec());
                    let want =
                        reference(&cfg, &q[row * nq * d..(row + 1) * nq * d], &seen[i].0, &seen[i].1, len[i] + r);
                    let got = &got[row * nq * d..(row + 1) * nq * d];
                    let at = format!("{nq} heads on {nkv} of {d}: step {step}, sequence {i}, position {}", len[i] + r);
                    assert_eq!(bits(got), bits(&want), "{at}");
                    // And each register width on its own.
                    for (name, one_query) in widths() {
                        let mut out = vec![0f32; nq * d];
                        for (h, out) in out.chunks_exact_mut(d).enumerate() {
                            let q = &q[(row * nq + h) * d..][..d];
                            one_query(&layer, q, &caches[i], h / (nq / nkv), len[i] + r, &mut Vec::new(), out);
                        }
                        assert_eq!(bits(&out), bits(&want), "{name}: {at}");
                    }
                }
                len[i] += l;
                at += l;
            }
        }
    }
}
