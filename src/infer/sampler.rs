//! Sampling a token from logits: greedy at temperature 0, otherwise
//! temperature and nucleus (top-p) sampling from a per-sequence random stream.
//!
//! The stream of a response is derived from (seed, prompt) alone and draws
//! are numbered, so a response does not depend on batch order, shard layout
//! or worker count. The generator is SplitMix64 over a counter, written out
//! here because library generators (`rand`'s StdRng) may change between versions.

/// Temperature and top-p, as the recipe gives them.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
}

/// The random draws of one response.
#[derive(Debug, Clone)]
pub struct Stream {
    key: u64,
    counter: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Stream {
    /// The stream of the response to `prompt` under `seed`.
    pub fn new(seed: u64, prompt: &str) -> Stream {
        let mut h = blake3::Hasher::new();
        h.update(b"prefgen-sampling-v1");
        h.update(&seed.to_le_bytes());
        h.update(prompt.as_bytes());
        let key = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
        Stream { key, counter: 0 }
    }

    /// A seed for an inference server's own sampler, from the same
    /// derivation: 31 bits, so servers that read a signed 32-bit seed (or
    /// take all ones as "random", as llama.cpp does) read it as given.
    pub fn seed31(&self) -> u64 {
        self.key >> 33
    }

    /// The next uniform draw in [0, 1), with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        let x = splitmix64(self.key ^ splitmix64(self.counter));
        self.counter += 1;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The index of the first largest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws one token. Probabilities are computed in f64 from `logits / T`
/// (with [`super::math::exp::exp`], the same on every machine);
/// top-p keeps the most probable tokens (ties by lower id) until their mass
/// reaches `top_p`, the token that crosses it included. A NaN or infinite
/// logit is returned as the error: no token can be drawn honestly.
pub fn sample(logits: &[f32], s: Sampling, stream: &mut Stream) -> Result<u32, f32> {
    let max = finite_max(logits)?;
    if s.temperature == 0.0 {
        return Ok(argmax(logits));
    }
    let (probs, total) = super::math::exp::scaled(logits, max as f64, s.temperature);
    let kept = if s.top_p < 1.0 {
        nucleus(&probs, total, s.top_p)
    } else {
        probs.iter().enumerate().map(|(i, &p)| (i as u32, p)).collect()
    };
    let mass: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = stream.next_f64() * mass;
    for &(id, p) in &kept {
        if u < p {
            return Ok(id);
        }
        u -= p;
    }
    Ok(kept.last().expect("the vocabulary is not empty").0)
}

/// The largest logit, or the first NaN or infinite one as the error. One
/// pass in lanes (a row is a megabyte on large vocabularies, read from
/// memory): the lanes' maxima and their "exponent all ones" bits, taken
/// with operations the compiler turns into vector ones.
fn finite_max(logits: &[f32]) -> Result<f32, f32> {
    const EXPONENT: u32 = 0x7f80_0000;
    let (mut max, mut top) = ([f32::NEG_INFINITY; 8], [0u32; 8]);
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((m, t), &x) in max.iter_mut().zip(&mut top).zip(chunk) {
            *m = if x > *m { x } else { *m };
            // The exponent plus one ulp of it carries into the top bit
            // only when the exponent is all ones.
            *t |= (x.to_bits() & EXPONENT) + (1 << 23);
        }
    }
    if top.iter().any(|t| t & 1 << 31 != 0) || rest.iter().any(|x| !x.is_finite()) {
        return Err(*logits.iter().find(|x| !x.is_finite()).expect("a lane saw one"));
    }
    Ok(rest.iter().chain(&max).copied().fold(f32::NEG_INFINITY, f32::max))
}

/// The most probable tokens (ties by lower id: a total order, so the result
/// is exact) until their mass reaches `top_p`, the token that crosses it
/// included, most probable first.
///
/// The tokens at or above a probability floor are a prefix of that order,
/// and the nucleus is usually far smaller than the vocabulary: only they
/// are sorted, and the floor is lowered (to 0, every token) until their
/// mass reaches `top_p`. The mass is summed in the same order whatever the
/// floor, so the nucleus is the one a full sort gives.
fn nucleus(probs: &[f64], total: f64, top_p: f64) -> Vec<(u32, f64)> {
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut above = Vec::new();
    // The most probable token's probability is exp(0) = 1.
    for floor in [2f64.powi(-8), 2f64.powi(-24), 2f64.powi(-64), 0.0] {
        above.clear();
        for (c, chunk) in probs.chunks(8).enumerate() {
            // Most eights hold no token at the floor: one vector compare
            // passes them over.
            if chunk.iter().fold(false, |any, &p| any | (p >= floor)) {
                let at = |(i, &p): (usize, &f64)| ((8 * c + i) as u32, p);
                above.extend(chunk.iter().enumerate().filter(|p| *p.1 >= floor).map(at));
            }
        }
        above.sort_unstable_by(order);
        let mut mass = 0.0;
        if let Some(i) = above.iter().position(|p| {
            mass += p.1 / total;
            mass >= top_p
        }) {
            above.truncate(i + 1);
            break;
        }
    }
    above
}

/// [`sample`] for each row of `logits` (rows of `width`) with its own
/// stream, the rows spread over the threads (a row's draw does not depend
/// on the others).
pub fn sample_rows(logits: &[f32], width: usize, s: Sampling, streams: &mut [Stream]) -> Vec<Result<u32, f32>> {
    let rows: Vec<&[f32]> = logits.chunks_exact(width).collect();
    assert_eq!(rows.len(), streams.len(), "a stream for each row");
    /// A row's stream and its draw, once made.
    type Slot<'a> = std::sync::Mutex<(&'a mut Stream, Option<Result<u32, f32>>)>;
    let slots: Vec<Slot> = streams.iter_mut().map(|stream| std::sync::Mutex::new((stream, None))).collect();
    candle_core::utils::barrier_pool().execute_chunked(rows.len(), |span| {
        for r in span {
            let mut slot = slots[r].lock().expect("a draw does not panic");
            let (stream, out) = &mut *slot;
            *out = Some(sample(rows[r], s, stream));
        }
    });
    slots.into_iter().map(|m| m.into_inner().expect("a draw does not panic").1.expect("every row is drawn")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_on_seed_and_prompt_only() {
        let draws = |seed, p: &str| {
            let mut s = Stream::new(seed, p);
            (0..4).map(|_| s.next_f64()).collect::<Vec<_>>()
        };
        assert_eq!(draws(13, "a"), draws(13, "a"));
        assert_ne!(draws(13, "a"), draws(21, "a"));
        assert_ne!(draws(13, "a"), draws(13, "b"));
        assert!(draws(1, "x").iter().all(|u| (0.0..1.0).contains(u)));
    }

    /// The probabilities, their total and the nucleus by a full sort of the
    /// vocabulary, as the definition reads.
    fn reference(logits: &[f32], s: Sampling) -> (Vec<f64>, f64, Vec<(u32, f64)>) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let probs: Vec<f64> =
            logits.iter().map(|&x| crate::infer::math::exp::exp((x as f64 - max) / s.temperature)).collect();
        let total: f64 = probs.iter().sum();
        let mut p: Vec<(u32, f64)> = probs.iter().enumerate().map(|(i, &q)| (i as u32, q)).collect();
        p.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
        let mut mass = 0.0;
        let keep = p.iter().position(|q| {
            mass += q.1 / total;
            mass >= s.top_p
        });
        p.truncate(keep.map_or(p.len(), |k| k + 1));
        (probs, total, p)
    }

    #[test]
    fn the_nucleus_is_exact_however_wide() {
        let spread = |n: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * scale).collect()
        };
        let mut heavy = spread(30_000, 2.0);
        (heavy[5], heavy[9]) = (10.0, 10.0);
        let mut peaked = vec![0.0f32; 100_000];
        peaked[77] = 30.0;
        // (name, logits, top_p, the nucleus's least probability is below)
        let cases: [(&str, Vec<f32>, f64, f64); 5] = [
            // A flat tail: the nucleus is thousands of tokens, above the first floor.
            ("flat", (0..5000).map(|i| if i < 3 { 2.0 } else { 0.0 }).collect(), 0.9, 1.0),
            ("narrow", spread(30_000, 4.0), 0.95, 1.0),
            ("wide", spread(30_000, 40.0), 0.95, 1.0),
            // Two tokens e^10 times each of the rest, which hold more mass
            // together: past the first floor.
            ("heavy tail", heavy, 0.95, 2f64.powi(-8)),
            // One token e^30 times the rest: the tail lies below the second
            // floor, and a top_p this close to 1 reaches into it.
            ("peaked", peaked, 1.0 - 1e-9, 2f64.powi(-24)),
        ];
        for (name, logits, top_p, below) in cases {
            let s = Sampling { temperature: 1.0, top_p };
            let (probs, total, want) = reference(&logits, s);
            let got = nucleus(&probs, total, top_p);
            assert_eq!(got, want, "{name}");
            assert!(got.last().unwrap().1 < below, "{name}: the case must reach the floor it is meant to");
            // And the draws from it.
            let (mut a, mut b) = (Stream::new(7, name), Stream::new(7, name));
            let kept: f64 = want.iter().map(|q| q.1).sum();
            for _ in 0..50 {
                let mut u = b.next_f64() * kept;
                let expected = want.iter().find(|q| {
                    let hit = u < q.1;
                    u -= q.1;
                    hit
                });
                assert_eq!(sample(&logits, s, &mut a).unwrap(), expected.unwrap_or(want.last().unwrap()).0);
            }
        }
        // A mass that never reaches top_p keeps every token, most probable first.
        let s = Sampling { temperature: 1.0, top_p: 2.0 };
        let (probs, total, want) = reference(&spread(1000, 4.0), s);
        assert_eq!((nucleus(&probs, total, 2.0), want.len()), (want, 1000));
    }

    /// Rows drawn together, spread over the threads, draw what each would alone.
    #[test]
    fn rows_draw_as_they_would_alone() {
        let rows: Vec<Vec<f32>> =
            (0..9).map(|r| (0..3000).map(|i| ((i * 7 + r * 13) % 101) as f32 / 9.0).collect()).collect();
        let s = Sampling { temperature: 0.8, top_p: 0.95 };
        let mut together: Vec<Stream> = (0..9).map(|r| Stream::new(r, "p")).collect();
        let mut alone = together.clone();
        for _ in 0..5 {
            let got = sample_rows(&rows.concat(), 3000, s, &mut together);
            let want: Vec<_> = rows.iter().zip(&mut alone).map(|(row, st)| sample(row, s, st)).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn greedy_top_p_and_temperature() {
        let logits = [1.0, 5.0, 5.0, 0.0];
        let mut s = Stream::new(0, "");
        assert_eq!(sample(&logits, Sampling { temperature: 0.0, top_p: 1.0 }, &mut s), Ok(1));
        // A tiny nucleus keeps only the most probable token (the lower id of a tie).
        for _ in 0..20 {
            assert_eq!(sample(&logits, Sampling { temperature: 1.0, top_p: 0.01 }, &mut s), Ok(1));
        }
        // The full distribution at a high temperature reaches every token.
        let mut seen = [false; 4];
        for _ in 0..400 {
            seen[sample(&logits, Sampling { temperature: 50.0, top_p: 1.0 }, &mut s).unwrap() as usize] = true;
        }
        assert_eq!(seen, [true; 4]);
    }

    /// A NaN or infinite logit is never turned into a token, greedy or
    /// sampled, wherever it sits (in the lanes or the rest), and the first
    /// is the one reported.
    #[test]
    fn non_finite_logits_are_refused() {
        let mut s = Stream::new(0, "");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1, 9, 23, 24, 26] {
                for temperature in [0.0, 1.0] {
                    let mut logits: Vec<f32> = (0..27).map(|i| i as f32 / 3.0 - 4.0).collect();
                    logits[at] = bad;
                    // A later one of another kind is not the one reported.
                    logits[(at + 5) % 27] = if bad.is_nan() { f32::INFINITY } else { f32::NAN };
                    let got = sample(&logits, Sampling { temperature, top_p: 0.9 }, &mut s);
                    let first = if at + 5 < 27 { bad } else { logits[(at + 5) % 27] };
                    assert!(
                        got.is_err_and(|v| v.to_bits() == first.to_bits()),
                        "{bad} at {at}, T={temperature}: {got:?}"
                    );
                }
            }
        }
    }

    /// The lanes' maximum is the largest logit, in the lanes or the rest.
    #[test]
    fn the_maximum_is_the_largest_logit() {
        for n in [1, 7, 8, 9, 64, 1001] {
            for peak in [0, n / 2, n - 1] {
                let mut logits: Vec<f32> = (0..n).map(|i| -((i * 37 % 101) as f32)).collect();
                logits[peak] = 3.5;
                assert_eq!(finite_max(&logits), Ok(3.5), "{n} logits, the largest at {peak}");
            }
        }
    }
}
