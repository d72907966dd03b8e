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
    loop {
        // Sequences with the logits of their next token: the running ones after
        // one decode step, then prompts joining as slots free up (prefilled one
        // at a time, so no padding).
        let mut ready: Vec<(Active, Vec<f32>)> = Vec::with_capacity(batch);
        if !active.is_empty() {
            let last: Vec<[u32; 1]> =
                active.iter().map(|a| [*a.out.last().expect("running sequences have a token")]).collect();
            let inputs: Vec<&[u32]> = last.iter().map(|t| &t[..]).collect();
            let mut caches: Vec<&mut _> = active.iter_mut().map(|a| &mut a.cache).collect();
            let rows = model.forward(&inputs, &mut caches)?.to_vec2::<f32>()?;
            ready.extend(active.drain(..).zip(rows));
        }
        while ready.len() < batch.max(1) {
            let Some(j) = waiting.pop() else { break };
            if jobs[j].prompt.is_empty() || jobs[j].prompt.len() >= context {
                results[j] = Some(Outcome::TooLong);
                progress(0);
                continue;
            }
            let mut a = Active { job: j, cache: model.new_cache(), out: Vec::new() };
            let logits = model.forward(&[&jobs[j].prompt], &mut [&mut a.cache])?;
            ready.push((a, logits.i(0)?.to_vec1::<f32>()?));
        }
        if ready.is_empty() {
            break;
        }
        for (mut a, row) in ready {
            let tok = sampler::sample(&row, sampling, &mut jobs[a.job].stream);
            let stop = policy.stop.contains(&tok);
            if !stop {
                a.out.push(tok);
            }
            // Done at a stop token, at max_tokens, or when the context is full.
            if stop || a.out.len() >= max_tokens || a.cache.len >= context {
                progress(a.out.len());
                results[a.job] = Some(Outcome::Done(a.out));
            } else {
                active.push(a);
            }
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every job ends")).collect())
}
