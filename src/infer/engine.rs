//! Batched decoding with a KV cache per sequence: prompts join the batch as
//! slots free up and finished sequences leave it, so no compute is spent on
//! finished rows.

use super::Policy;
use super::sampler::{self, Sampling, Stream};
use anyhow::Result;
use candle_core::IndexOp;

/// One response to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub stream: Stream,
}

/// How a response ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The generated tokens (without the stop token).
    Done(Vec<u32>),
    /// The prompt leaves no room in the model's context.
    TooLong,
}

/// Generates every job, `batch` sequences at a time; `progress(tokens)` is
/// called as each job finishes.
pub fn generate(
    policy: &Policy,
    mut jobs: Vec<Job>,
    sampling: Sampling,
    max_tokens: usize,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Outcome>> {
    struct Active {
        job: usize,
        cache: crate::infer::models::decoder::KvCache,
        out: Vec<u32>,
    }
    let model = &policy.model;
    let context = policy.context();
    let mut results: Vec<Option<Outcome>> = vec![None; jobs.len()];
    let mut waiting: Vec<usize> = (0..jobs.len()).rev().collect();
    let mut active: Vec<Active> = Vec::new();
    // A sequence is done at a stop token, at max_tokens, or when the context is full.
    let finished =
        |a: &Active, tok: u32| policy.stop.contains(&tok) || a.out.len() >= max_tokens || a.cache.len >= context;
    loop {
        while active.len() < batch.max(1) {
            let Some(j) = waiting.pop() else { break };
            if jobs[j].prompt.is_empty() || jobs[j].prompt.len() >= context {
                results[j] = Some(Outcome::TooLong);
                progress(0);
                continue;
            }
            let mut a = Active { job: j, cache: model.new_cache(), out: Vec::new() };
            let logits = model.forward(&[&jobs[j].prompt], &mut [&mut a.cache])?;
            let tok = sampler::sample(&logits.i(0)?.to_vec1::<f32>()?, sampling, &mut jobs[j].stream);
            if !policy.stop.contains(&tok) {
                a.out.push(tok);
            }
            if finished(&a, tok) {
                progress(a.out.len());
                results[j] = Some(Outcome::Done(a.out));
            } else {
                active.push(a);
            }
        }
        if active.is_empty() {
            break;
        }
        let last: Vec<[u32; 1]> =
            active.iter().map(|a| [*a.out.last().expect("active sequences have a token")]).collect();
        let inputs: Vec<&[u32]> = last.iter().map(|t| &t[..]).collect();
        let mut caches: Vec<&mut _> = active.iter_mut().map(|a| &mut a.cache).collect();
        let rows = model.forward(&inputs, &mut caches)?.to_vec2::<f32>()?;
        let mut still = Vec::with_capacity(active.len());
        for (mut a, row) in active.into_iter().zip(rows) {
            let tok = sampler::sample(&row, sampling, &mut jobs[a.job].stream);
            if !policy.stop.contains(&tok) {
                a.out.push(tok);
            }
            if finished(&a, tok) {
                progress(a.out.len());
                results[a.job] = Some(Outcome::Done(a.out));
            } else {
                still.push(a);
            }
        }
        active = still;
    }
    Ok(results.into_iter().map(|r| r.expect("every job ends")).collect())
}
