//! `generate`: one response per prompt for one seed, as SimPO's
//! `output_{seed}.json`: sampled from the policy, or imported from decode
//! files users bring.

use super::StageOutput;
use crate::formats::simpo::{self, DecodeRow};
use crate::infer::Policy;
use crate::infer::engine::{self, Job, Outcome};
use crate::infer::sampler::{Sampling, Stream};
use anyhow::{Result, bail};
use std::collections::HashMap;
use std::path::Path;

pub const VERSION: u32 = 1;
/// Version of a sampled shard's contents (the engine, sampler and decoding).
pub const SAMPLER_VERSION: u32 = 2;

/// The file name a seed's responses are written under.
pub fn file_name(seed: u64) -> String {
    format!("output_{seed}.json")
}

/// The path of seed `seed`'s decode file from an import pattern.
pub fn import_path(pattern: &str, seed: u64, split: &str) -> String {
    pattern.replace("{seed}", &seed.to_string()).replace("{split}", split)
}

/// Takes one seed's responses from a SimPO decode file, in prompt order.
/// Every prompt needs exactly one response, and every imported prompt must be
/// in the prompt set: a mismatch means the file belongs to another run.
pub fn import(prompts: &[String], path: &Path, seed: u64) -> Result<StageOutput> {
    let shown = path.display();
    let rows: Vec<DecodeRow> = simpo::read_rows(path)?;
    let wanted: HashMap<&str, usize> = prompts.iter().enumerate().map(|(i, p)| (p.as_str(), i)).collect();
    let mut by_prompt: Vec<Option<DecodeRow>> = vec![None; prompts.len()];
    for (n, row) in rows.into_iter().enumerate() {
        let Some(&i) = wanted.get(row.prompt.as_str()) else {
            bail!("{shown}: row {n}: prompt {:?} is not in the recipe's prompt set", preview(&row.prompt));
        };
        match &by_prompt[i] {
            Some(prev) if prev.generated_text != row.generated_text => {
                bail!("{shown}: row {n}: prompt {:?} appears twice with different responses", preview(&row.prompt))
            }
            Some(_) => {}
            None => by_prompt[i] = Some(row),
        }
    }
    let missing = by_prompt.iter().filter(|r| r.is_none()).count();
    if let Some(i) = by_prompt.iter().position(|r| r.is_none()) {
        bail!("{shown}: no response for {missing} of {} prompts (first: {:?})", prompts.len(), preview(&prompts[i]));
    }
    let rows: Vec<DecodeRow> = by_prompt.into_iter().flatten().collect();
    let n = rows.len();
    Ok(StageOutput::rows(&file_name(seed), rows)?.stat("responses", n))
}

/// Sampling parameters of the recipe's `[generate]`.
pub struct Params {
    pub sampling: Sampling,
    pub max_tokens: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub vllm_compat: bool,
}

/// Samples one response per prompt. Prompts that leave no room in the model's
/// context are skipped (no row) and counted: every seed skips the same ones.
pub fn sample(
    prompts: &[String],
    policy: &Policy,
    p: &Params,
    progress: impl FnMut(usize),
) -> Result<(Vec<DecodeRow>, usize)> {
    let mut formatted = Vec::with_capacity(prompts.len());
    let mut jobs = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let text = policy.format_prompt(prompt)?;
        jobs.push(Job { prompt: policy.encode(&text, p.vllm_compat)?, stream: Stream::new(p.seed, prompt) });
        formatted.push(text);
    }
    let outcomes = engine::generate(policy, jobs, p.sampling, p.max_tokens, p.batch_size, progress)?;
    let mut rows = Vec::with_capacity(prompts.len());
    let mut skipped = 0;
    for ((prompt, format_prompt), outcome) in prompts.iter().zip(formatted).zip(outcomes) {
        match outcome {
            Outcome::Done(ids) => {
                rows.push(DecodeRow { prompt: prompt.clone(), format_prompt, generated_text: policy.decode(&ids)? })
            }
            Outcome::TooLong => skipped += 1,
        }
    }
    Ok((rows, skipped))
}

/// The first characters of a text, for messages.
pub fn preview(s: &str) -> String {
    let mut p: String = s.chars().take(60).collect();
    if p.len() < s.len() {
        p.push('…');
    }
    p
}
