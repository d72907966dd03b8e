//! `generate`: one response per prompt for one seed, as SimPO's
//! `output_{seed}.json`: sampled from the policy by the built-in engine or
//! through an inference server, or imported from decode files users bring.

use super::{At, ByShard, Counts, External, Keyed, Models, NodeSpec, ShardOut, StageOutput, Work};
use crate::formats::simpo::{self, DecodeRow};
use crate::infer::Policy;
use crate::infer::chat::Chat;
use crate::infer::engine::{self, EngineError, Job, Outcome};
use crate::infer::sampler::{Sampling, Stream};
use crate::infer::server::{self, Reply, Server};
use crate::recipe::{self, Recipe};
use anyhow::{Result, anyhow, bail};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Bumped when the engine, the sampler or decoding change what a response is.
pub const VERSION: u32 = 3;
/// The node's seed in its key (one node per seed of `generate.seeds`).
pub const SEED: &str = "generate.seed";
/// `generate.server` in a key: a server sampled, whichever and wherever.
const SERVER: &str = "an OpenAI-compatible server";

/// What a generate node keys: its seed, and the imported file, or the
/// sampling parameters, the policy and its template.
pub fn keyed(at: &At, seed: u64) -> Keyed {
    let g = &at.recipe.generate;
    let mut params = BTreeMap::from([(SEED.to_string(), json!(seed))]);
    let mut externals = BTreeMap::new();
    match &g.import {
        Some(pattern) => {
            externals
                .insert(recipe::generate::import.into(), External::File(import_path(pattern, seed, at.split).into()));
        }
        None => {
            params.extend(g.keyed());
            if g.server.is_some() || g.launch.is_some() {
                // Which engine samples, not where it runs: another host keeps the cache.
                params.insert(recipe::generate::server.into(), json!(SERVER));
            }
            let policy = at.policy.expect("the planner resolves generate.model when it is set");
            externals.insert(recipe::generate::model.into(), External::Model(policy.to_path_buf()));
            if let Some(t) = &g.chat_template {
                externals.insert(recipe::generate::chat_template.into(), External::File(t.into()));
            }
        }
    }
    Keyed { params, externals }
}

/// A generate node's work: its decode file imported, or its prompts sampled
/// shard by shard.
pub fn work<'a>(
    spec: &'a NodeSpec,
    recipe: &'a Recipe,
    prompts: Arc<Vec<String>>,
    models: &'a dyn Models,
) -> Result<Work<'a>> {
    let seed = spec.seed.expect("generate nodes have a seed");
    if let Some(path) = spec.external(recipe::generate::import) {
        return Ok(Work::whole(move || import(&prompts, path, seed)));
    }
    let g = &recipe.generate;
    let model = spec.external(recipe::generate::model).expect("a sampling node keys its model");
    let template = spec.external(recipe::generate::chat_template);
    let shards = ByShard::new(
        prompts,
        g.shard_size,
        ("prompts", |_| 1),
        move |chunk, progress| {
            let mut tokens = 0;
            let count = |n| {
                tokens += n;
                progress(n);
            };
            let launch = g.launch.as_deref().map(|command| server::Launch {
                key: recipe::generate::launch,
                command,
                model,
                timeout: Duration::from_secs(g.launch_timeout_secs),
            });
            let endpoint = server::Endpoint { key: recipe::generate::server, url: g.server.as_deref(), launch };
            let (rows, skipped, engine) = match (&g.server, &g.launch) {
                (None, None) => {
                    let policy = models.policy(model, template)?;
                    let (rows, skipped) = sample(chunk, &policy, g, seed, count)
                        .map_err(|e| anyhow!("generate.model {}: {e:#}", model.display()))?;
                    (rows, skipped, policy.engine())
                }
                _ => {
                    let chat = models.chat(recipe::Generate::SECTION, model, template)?;
                    let server = models.server(&endpoint, &server_options(g, model, &chat)?)?;
                    let (rows, skipped) = sample_through(chunk, &chat, &server, g, seed, count)?;
                    (rows, skipped, server.engine.clone())
                }
            };
            let counts = Counts { skipped_too_long: Some(skipped as u64), ..Counts::default() };
            Ok(ShardOut { rows, counts, tokens, engine })
        },
        move |rows, counts| {
            let skipped = counts.skipped_too_long.unwrap_or(0);
            if rows.is_empty() && skipped > 0 {
                bail!("every one of the {skipped} prompts is too long for the policy's context, so none was answered");
            }
            let counts =
                Counts { responses: Some(rows.len() as u64), skipped_too_long: Some(skipped), ..Counts::default() };
            StageOutput::rows(&file_name(seed), rows, counts)
        },
    );
    Ok(Work::Sharded(Box::new(shards)))
}

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
    // Rows are numbered from 1 in messages, as lines are.
    for (n, row) in (1..).zip(rows) {
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
    let counts = Counts { responses: Some(rows.len() as u64), ..Counts::default() };
    StageOutput::rows(&file_name(seed), rows, counts)
}

/// Samples one response per prompt. Prompts that leave no room in the model's
/// context are skipped (no row) and counted: every seed skips the same ones.
pub fn sample(
    prompts: &[String],
    policy: &Policy,
    g: &recipe::Generate,
    seed: u64,
    progress: impl FnMut(usize),
) -> Result<(Vec<DecodeRow>, usize)> {
    let (formatted, ids) = render(prompts, &policy.chat, g)?;
    let jobs = ids.into_iter().zip(prompts).map(|(prompt, p)| Job { prompt, stream: Stream::new(seed, p) }).collect();
    let sampling = Sampling { temperature: g.temperature, top_p: g.top_p };
    let outcomes = engine::generate(policy, jobs, sampling, g.max_tokens as usize, g.batch_size, progress).map_err(
        |e| match e {
            EngineError::NonFinite { job, position, value } => anyhow!(
                "a non-finite logit ({value}) at token {position} of the response to {:?}: the weights or the \
                 activations overflowed",
                preview(&prompts[job])
            ),
            EngineError::Model(e) => e,
        },
    )?;
    let texts = outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::Done(ids) => policy.chat.decode(&ids).map(Some),
            Outcome::TooLong => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(rows(prompts, formatted, texts))
}

/// Samples one response per prompt through an inference server, as
/// [`sample`] does with the built-in engine: the same prompt ids, the same
/// stop tokens, the same length limit (`max_tokens`, and the model's
/// context), and the text decoded by prefgen from the returned ids.
pub fn sample_through(
    prompts: &[String],
    chat: &Chat,
    server: &Server,
    g: &recipe::Generate,
    seed: u64,
    progress: impl FnMut(usize),
) -> Result<(Vec<DecodeRow>, usize)> {
    let (formatted, ids) = render(prompts, chat, g)?;
    // A prompt that leaves no room is skipped unsent, as the built-in engine
    // skips it; the rest stop at max_tokens or where the context is full.
    let sent: Vec<usize> = (0..ids.len()).filter(|&i| !ids[i].is_empty() && ids[i].len() < chat.context).collect();
    let requests: Vec<server::Request> = sent
        .iter()
        .map(|&i| server::Request {
            max_tokens: (g.max_tokens as usize).min(chat.context - ids[i].len()),
            seed: request_seed(g, seed, &prompts[i]),
            prompt: ids[i].clone(),
        })
        .collect();
    let sampling = server::Sampling { temperature: g.temperature, top_p: g.top_p, stop: chat.stop.clone() };
    let replies = server
        .complete_all(&requests, &sampling, g.concurrency, progress)
        .map_err(|(i, e)| anyhow!("generate.server: the response to prompt {:?}: {e}", preview(&prompts[sent[i]])))?;
    let mut texts: Vec<Option<String>> = vec![None; prompts.len()];
    for (&i, reply) in sent.iter().zip(replies) {
        texts[i] = match reply {
            Reply::Ids(ids) => Some(chat.decode(&ids)?),
            Reply::Text(text) => Some(text),
            Reply::TooLong => None,
        };
    }
    Ok(rows(prompts, formatted, texts))
}

/// The seed a server request carries: the recipe's seed itself with
/// `generate.vllm_compat` (as SimPO's decode.py passed `SamplingParams(seed=...)`
/// to vLLM), otherwise one derived from the seed and the prompt, so two
/// prompts do not share their random draws.
fn request_seed(g: &recipe::Generate, seed: u64, prompt: &str) -> u64 {
    if g.vllm_compat { seed } else { Stream::new(seed, prompt).seed31() }
}

/// Each prompt rendered with the chat template, and its token ids.
fn render(prompts: &[String], chat: &Chat, g: &recipe::Generate) -> Result<(Vec<String>, Vec<Vec<u32>>)> {
    let mut formatted = Vec::with_capacity(prompts.len());
    let mut ids = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let text = chat.prompt_with(prompt, &g.template_kwargs)?;
        ids.push(chat.encode(&text, g.vllm_compat)?);
        formatted.push(text);
    }
    Ok((formatted, ids))
}

/// The rows of the prompts that were answered (`None`: skipped as too
/// long), and how many were skipped.
fn rows(prompts: &[String], formatted: Vec<String>, texts: Vec<Option<String>>) -> (Vec<DecodeRow>, usize) {
    let mut rows = Vec::with_capacity(prompts.len());
    let mut skipped = 0;
    for ((prompt, format_prompt), text) in prompts.iter().zip(formatted).zip(texts) {
        match text {
            Some(generated_text) => rows.push(DecodeRow { prompt: prompt.clone(), format_prompt, generated_text }),
            None => skipped += 1,
        }
    }
    (rows, skipped)
}

/// How to reach `generate.server` for the policy at `model`, and what its
/// tokenizer (`chat`) does, which the server's must do too.
fn server_options(g: &recipe::Generate, model: &Path, chat: &Chat) -> Result<server::Options> {
    let mut names: Vec<String> = g.model.iter().cloned().collect();
    names.extend(model.file_name().map(|n| n.to_string_lossy().into_owned()));
    Ok(server::Options {
        section: recipe::Generate::SECTION,
        served_model: g.served_model.clone(),
        names,
        timeout: Duration::from_secs(g.request_timeout_secs),
        retries: g.request_retries,
        requests_per_minute: g.requests_per_minute,
        api_key_env: g.api_key_env.clone(),
        identity: Some(server::Identity::of(chat)?),
    })
}

/// The first characters of a text, for messages.
pub fn preview(s: &str) -> String {
    let mut p: String = s.chars().take(60).collect();
    if p.len() < s.len() {
        p.push('…');
    }
    p
}
