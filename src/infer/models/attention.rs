//! Attention on the CPU in f32, fused: for a whole packed batch, each
//! sequence's q/k norms (Qwen3, Gemma-3), rotary embeddings, the append to its KV
//! cache, scores, soft-capping, the causal (and sliding) window, softmax and
//! the weighted sum of values run as plain loops over slices. As tensor ops
//! that was a dozen small operations per sequence and layer, and half of the
//! decoding time at batch 32. The decoder keeps the tensor ops for the GPU;
//! a test holds the two to the same results.

use super::decoder::Config;
use crate::infer::math::{expf, gelu};

/// Width of the register blocks of the score and output loops.
const LANES: usize = 16;

/// `acc += x * row` over one block of up to [`LANES`] values; a full
/// block's fixed size lets the compiler keep `acc` in registers.
#[inline(always)]
fn axpy(acc: &mut [f32; LANES], x: f32, row: &[f32]) {
    match <&[f32; LANES]>::try_from(row) {
        Ok(row) => {
            for i in 0..LANES {
                acc[i] += x * row[i];
            }
        }
        Err(_) => {
            for (a, r) in acc.iter_mut().zip(row) {
                *a += x * r;
            }
        }
    }
}

/// Rotary tables `(context, head_dim / 2)` as the host path reads them.
pub(super) struct HostRope {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
    /// Gemma-3's sliding layers.
    pub(super) local: Option<(Vec<f32>, Vec<f32>)>,
}

/// One layer's keys and values of one sequence. Keys are stored transposed,
/// `(n_kv_head, head_dim, capacity)`, so a query's scores against every key
/// are vertical multiply-adds over positions (no horizontal sums); values
/// as the v projection lays them out, `(positions, n_kv_head, head_dim)`.
#[derive(Default)]
pub(super) struct HostKv {
    keys: Vec<f32>,
    capacity: usize,
    values: Vec<f32>,
}

impl HostKv {
    /// Appends `l` rows of keys and values `(l, n_kv_head * head_dim)` at
    /// positions `len..len + l`; the key buffer grows by doubling.
    fn append(&mut self, len: usize, k: &[f32], v: &[f32], nkv: usize, d: usize) {
        let l = k.len() / (nkv * d);
        if len + l > self.capacity {
            let capacity = (len + l).max(2 * self.capacity).max(64);
            let mut keys = vec![0f32; nkv * d * capacity];
            for (row, old) in keys.chunks_exact_mut(capacity).zip(self.keys.chunks_exact(self.capacity.max(1))) {
                row[..len].copy_from_slice(&old[..len]);
            }
            (self.keys, self.capacity) = (keys, capacity);
        }
        for (r, key) in k.chunks_exact(nkv * d).enumerate() {
            for (i, &x) in key.iter().enumerate() {
                self.keys[i * self.capacity + len + r] = x;
            }
        }
        self.values.extend_from_slice(v);
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
        mut caches: Option<&mut [&mut HostKv]>,
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
        let mut at = 0;
        for (i, (&l, &pos)) in lens.iter().zip(starts).enumerate() {
            for r in 0..l {
                let p = pos + r;
                let (cos, sin) = (&cos[p * d / 2..(p + 1) * d / 2], &sin[p * d / 2..(p + 1) * d / 2]);
                for head in q[(at + r) * nq * d..(at + r + 1) * nq * d].chunks_exact_mut(d) {
                    self.position(head, self.q_norm, cos, sin);
                }
                for head in k[(at + r) * nkv * d..(at + r + 1) * nkv * d].chunks_exact_mut(d) {
                    self.position(head, self.k_norm, cos, sin);
                }
            }
            let (ks, vs) = (&k[at * nkv * d..(at + l) * nkv * d], &v[at * nkv * d..(at + l) * nkv * d]);
            match caches.as_deref_mut() {
                Some(caches) => caches[i].append(pos, ks, vs, nkv, d),
                // Without a cache a sequence attends to its own rows only.
                None => own[i].append(0, ks, vs, nkv, d),
            }
            at += l;
        }
        let mut out = vec![0f32; q.len()];
        let out_at = out.as_mut_ptr() as usize;
        let offsets: Vec<usize> = lens.iter().scan(0, |acc, &l| Some(std::mem::replace(acc, *acc + l))).collect();
        let kv: Vec<&HostKv> = match caches {
            Some(c) => c.iter().map(|c| &**c).collect(),
            None => own.iter().collect(),
        };
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
    fn one_query(&self, q: &[f32], kv: &HostKv, g: usize, p: usize, scores: &mut Vec<f32>, out: &mut [f32]) {
        let cfg = self.cfg;
        let (d, nkv) = (cfg.head_dim, cfg.n_kv_head);
        let window = cfg.sliding_window.filter(|_| self.sliding);
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        scores.clear();
        scores.resize(p + 1 - lo, 0.0);
        // Scores sixteen keys at a time, and the output sixteen dimensions
        // at a time: the block's sums stay in registers across the loop.
        let keys = &kv.keys[g * d * kv.capacity..(g + 1) * d * kv.capacity];
        for (block, out) in scores.chunks_mut(LANES).enumerate() {
            let from = lo + LANES * block;
            let mut acc = [0f32; LANES];
            for (c, &qc) in q.iter().enumerate() {
                axpy(&mut acc, qc, &keys[c * kv.capacity + from..][..out.len()]);
            }
            out.copy_from_slice(&acc[..out.len()]);
        }
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
        for (block, out) in out.chunks_mut(LANES).enumerate() {
            let mut acc = [0f32; LANES];
            for (j, s) in (lo..=p).zip(scores.iter()) {
                let at = (j * nkv + g) * d + LANES * block;
                axpy(&mut acc, s / sum, &kv.values[at..at + out.len()]);
            }
            out.copy_from_slice(&acc[..out.len()]);
        }
    }
}
