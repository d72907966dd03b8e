//! Batched decoding with a KV cache per sequence: prompts join the batch as
//! slots free up and finished sequences leave it, so no compute is spent on
//! finished rows.

use super::Policy;
use super::sampler::{self, Sampling, Stream};
use candle_core::{CpuStorage, Storage, Tensor};

/// Tokens one forward takes at most (a single longer prompt aside): a
/// batch of 64 prompts of 4,096 tokens prefilled at once would hold
/// gigabytes of activations.
const STEP_TOKENS: usize = 8192;

/// One response to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub stream: Stream,
}

/// Why generation stopped short.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model gave a NaN or infinite logit for job `job` at token `position`.
    #[error("a non-finite logit ({value}) at token {position} of response {job}")]
    NonFinite { job: usize, position: usize, value: f32 },
    #[error(transparent)]
    Model(#[from] anyhow::Error),
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
) -> Result<Vec<Outcome>, EngineError> {
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
        // Prompts join as slots free up, as many as the step's token budget
        // takes (at least one).
        let mut tokens = active.len();
        let mut joined = false;
        while active.len() < batch.max(1) {
            let Some(j) = waiting.pop() else { break };
            let len = jobs[j].prompt.len();
            if len == 0 || len >= context {
                results[j] = Some(Outcome::TooLong);
                progress(0);
                continue;
            }
            if joined && tokens + len > STEP_TOKENS {
                waiting.push(j);
                break;
            }
            (tokens, joined) = (tokens + len, true);
            active.push(Active { job: j, cache: model.new_cache(), out: Vec::new() });
        }
        if active.is_empty() {
            break;
        }
        // One forward: the running sequences' last tokens and the joining
        // prompts, packed (no padding), each over its own cache.
        let feed: Vec<(usize, Option<[u32; 1]>)> = active.iter().map(|a| (a.job, a.out.last().map(|t| [*t]))).collect();
        let inputs: Vec<&[u32]> = feed
            .iter()
            .map(|(j, last)| match last {
                Some(t) => &t[..],
                None => &jobs[*j].prompt[..],
            })
            .collect();
        let mut caches: Vec<&mut _> = active.iter_mut().map(|a| &mut a.cache).collect();
        let logits = model.forward(&inputs, &mut caches)?;
        let mut streams: Vec<Stream> = active.iter().map(|a| jobs[a.job].stream.clone()).collect();
        let width = logits.dim(1).map_err(anyhow::Error::from)?;
        let drawn = with_values(&logits, |rows| sampler::sample_rows(rows, width, sampling, &mut streams))
            .map_err(anyhow::Error::from)?;
        for ((mut a, tok), stream) in active.drain(..).zip(drawn).zip(streams).collect::<Vec<_>>() {
            jobs[a.job].stream = stream;
            let tok = tok.map_err(|value| EngineError::NonFinite { job: a.job, position: a.out.len(), value })?;
            let stop = policy.chat.stop.contains(&tok);
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

/// `f` of a 2-D f32 tensor's values, row after row: borrowed where they lie
/// in memory on the CPU (a step's logits are tens of megabytes), copied
/// from a GPU.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&data[start..end]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}
