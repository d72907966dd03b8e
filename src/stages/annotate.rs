//! `annotate`: one score per response, as SimPO's `all_outputs_rm.json`:
//! scored with a reward model in-process, by a judge through an inference
//! server or a hosted API, or imported (published or precomputed scores).

use super::generate::preview;
use super::{At, ByShard, Counts, External, Keyed, Models, NodeSpec, ShardOut, StageOutput, Work};
use crate::formats::simpo::{self, FilteredRow, ScoredRow};
use crate::infer::chat::Chat;
use crate::infer::reward::{self, Judge, Overflow, RewardModel};
use crate::infer::server::{self, Ask, Server};
use crate::recipe::{self, Endpoint, Recipe};
use anyhow::{Result, anyhow, bail};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Bumped when tokenization, the heads or batching change what a score is.
pub const VERSION: u32 = 3;
pub const FILE: &str = "all_outputs_rm.json";

/// The path of split `split`'s scores from an import pattern.
pub fn import_path(pattern: &str, split: &str) -> String {
    pattern.replace("{split}", split)
}

/// What an annotate node keys: the imported file, or the scoring
/// parameters, the reward model, its template and the judge's rubric.
pub fn keyed(at: &At) -> Keyed {
    let a = &at.recipe.annotate;
    let mut externals = BTreeMap::new();
    let params = match &a.import {
        Some(pattern) => {
            externals.insert(recipe::annotate::import.into(), External::File(import_path(pattern, at.split).into()));
            BTreeMap::new()
        }
        None => {
            let model = match (a.hosted_name(), at.reward) {
                // The name the API is asked for is what answers.
                (Some(name), _) => External::Name(a.served_model.clone().unwrap_or_else(|| name.to_string())),
                (None, Some(path)) => External::Model(path.to_path_buf()),
                (None, None) => unreachable!("the planner resolves annotate.model when it is set"),
            };
            externals.insert(recipe::annotate::model.into(), model);
            for (key, path) in
                [(recipe::annotate::chat_template, &a.chat_template), (recipe::annotate::judge_rubric, &a.judge_rubric)]
            {
                if let Some(path) = path {
                    externals.insert(key.into(), External::File(path.into()));
                }
            }
            let mut params = a.keyed();
            if a.through_server() {
                // Which endpoint, not which host: another host keeps the cache.
                params.insert(recipe::annotate::server.into(), json!(endpoint_keyed(a.endpoint)));
                params.insert(recipe::annotate::top_logprobs.into(), json!(a.top_logprobs));
            }
            params
        }
    };
    Keyed { params, externals }
}

/// `annotate.server` in a key: what a server was asked, whichever and
/// wherever it runs.
fn endpoint_keyed(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "an OpenAI-compatible server's /completions, with prefgen's prompt ids",
        Endpoint::Chat => "an OpenAI-compatible server's /chat/completions, with the rubric as a user message",
    }
}

/// An annotate node's work: its scores imported, or its rows scored shard
/// by shard.
pub fn work<'a>(
    spec: &'a NodeSpec,
    recipe: &'a Recipe,
    prompt_set: Arc<Vec<String>>,
    rows: Arc<Vec<FilteredRow>>,
    models: &'a dyn Models,
) -> Result<Work<'a>> {
    if let Some(path) = spec.external(recipe::annotate::import) {
        return Ok(Work::whole(move || import(&prompt_set, &rows, path)));
    }
    let a = &recipe.annotate;
    let model = spec.external(recipe::annotate::model);
    let template = spec.external(recipe::annotate::chat_template);
    let rubric = spec.external(recipe::annotate::judge_rubric);
    let shards = ByShard::new(
        rows,
        a.shard_size,
        ("responses", |r: &FilteredRow| r.all_generated_responses.len()),
        move |chunk, progress| {
            let (out, engine) = match a.through_server() {
                false => {
                    let model = model.expect("an in-process scoring node keys its model's files");
                    let rm = models.reward(model, a.kind, template, rubric)?;
                    let max_length = if a.max_length == 0 { rm.context() } else { a.max_length };
                    let out = score(chunk, &rm, max_length, a, progress)
                        .map_err(|e| anyhow!("annotate.model {}: {e:#}", model.display()))?;
                    (out, rm.engine())
                }
                true => {
                    // A hosted model with no local files has no tokenizer here.
                    let chat = model.map(|m| models.chat(recipe::Annotate::SECTION, m, template)).transpose()?;
                    let judge = Judge::new(chat.as_deref(), models.rubric(rubric)?)?;
                    let launch = a.launch.as_deref().map(|command| server::Launch {
                        key: recipe::annotate::launch,
                        command,
                        model: model.expect("a launched judge has local files"),
                        timeout: Duration::from_secs(a.launch_timeout_secs),
                    });
                    let endpoint = server::Endpoint { key: recipe::annotate::server, url: a.server.as_deref(), launch };
                    let server = models.server(&endpoint, &server_options(a, model, chat.as_deref())?)?;
                    let out = score_through(chunk, &judge, chat.as_deref(), &server, a, progress)?;
                    let how = match a.endpoint {
                        Endpoint::Completions => "/completions",
                        Endpoint::Chat => "/chat/completions",
                    };
                    (out, format!("{}, judge through {how}", server.engine))
                }
            };
            let counts = Counts { skipped_too_long: Some(out.skipped as u64), ..Counts::default() };
            Ok(ShardOut { rows: out.rows, counts, tokens: out.tokens, engine })
        },
        move |rows, counts| {
            let skipped = counts.skipped_too_long.unwrap_or(0);
            if rows.is_empty() && skipped > 0 {
                let limit = match a.max_length {
                    0 => "the reward model's context".to_string(),
                    n => format!("{} = {n} tokens", recipe::annotate::max_length),
                };
                // Advise only what is not set already: with truncation on,
                // even an empty response did not fit.
                let advice = match a.overflow {
                    Overflow::Skip => format!(
                        "raise {} (0 is the model's context) or set {} = \"truncate\"",
                        recipe::annotate::max_length,
                        recipe::annotate::overflow
                    ),
                    Overflow::Truncate => format!(
                        "the prompts alone do not fit, even with {} = \"truncate\" cutting the responses: raise {} \
                         (0 is the model's context)",
                        recipe::annotate::overflow,
                        recipe::annotate::max_length
                    ),
                };
                bail!(
                    "every one of the {skipped} rows has a conversation longer than {limit}, so none was scored; {advice}"
                );
            }
            let counts = Counts { rows: Some(rows.len() as u64), skipped_too_long: Some(skipped), ..Counts::default() };
            StageOutput::rows(FILE, rows, counts)
        },
    );
    Ok(Work::Sharded(Box::new(shards)))
}

/// What a shard of rows scored to.
pub struct Scored {
    pub rows: Vec<ScoredRow>,
    /// Rows left out because a conversation did not fit.
    pub skipped: usize,
    /// Tokens run through the model.
    pub tokens: usize,
}

impl Scored {
    /// The rows whose conversations fit, with their scores; the others counted.
    fn keeping(rows: &[FilteredRow], scores: Vec<Vec<f64>>, fits: &[bool], tokens: usize) -> Scored {
        let kept = rows
            .iter()
            .zip(scores)
            .zip(fits)
            .filter(|(_, fits)| **fits)
            .map(|((row, all_rm_scores), _)| ScoredRow {
                prompt: row.prompt.clone(),
                all_generated_responses: row.all_generated_responses.clone(),
                all_rm_scores,
            })
            .collect();
        Scored { rows: kept, skipped: fits.iter().filter(|f| !**f).count(), tokens }
    }
}

/// Scores every response of `rows`, longest conversations first, `batch_size`
/// at a time; `progress(tokens)` is called per sequence scored. A row with a
/// conversation longer than `max_length` tokens that cannot be cut
/// (`skip`, or a prompt too long to truncate around) is left out and counted.
pub fn score(
    rows: &[FilteredRow],
    model: &RewardModel,
    max_length: usize,
    a: &recipe::Annotate,
    mut progress: impl FnMut(usize),
) -> Result<Scored> {
    let mut seqs: Vec<(usize, usize, Vec<u32>)> = Vec::new();
    let mut fits = vec![true; rows.len()];
    for (r, row) in rows.iter().enumerate() {
        for (k, response) in row.all_generated_responses.iter().enumerate() {
            match model.encode(&row.prompt, response, max_length, a.overflow, &a.template_kwargs)? {
                Some(ids) => seqs.push((r, k, ids)),
                None => fits[r] = false,
            }
        }
    }
    seqs.retain(|(r, _, _)| fits[*r]);
    // Longest first: similar lengths share a batch, and the largest batch
    // (the memory peak) comes first rather than after hours.
    seqs.sort_by(|a, b| b.2.len().cmp(&a.2.len()).then((a.0, a.1).cmp(&(b.0, b.1))));
    let mut scores: Vec<Vec<f64>> = rows.iter().map(|r| vec![f64::NAN; r.all_generated_responses.len()]).collect();
    let mut tokens = 0;
    for batch in seqs.chunks(a.batch_size.max(1)) {
        let ids: Vec<&[u32]> = batch.iter().map(|(_, _, ids)| ids.as_slice()).collect();
        for ((r, k, ids), s) in batch.iter().zip(model.score(&ids)?) {
            if !s.is_finite() {
                bail!(
                    "a non-finite score ({s}) for response {} of {:?}: the weights or the activations overflowed",
                    k + 1,
                    preview(&rows[*r].prompt)
                );
            }
            scores[*r][*k] = s;
            tokens += ids.len();
            progress(ids.len());
        }
    }
    Ok(Scored::keeping(rows, scores, &fits, tokens))
}

/// Scores every response of `rows` through a server, as [`score`] does
/// in-process: the same prompt ids (`completions`, with `chat`, the judge's
/// tokenizer) or the rubric as a message (`chat`), and the expected rating
/// over the rating tokens among the next token's top log-probabilities. A
/// conversation that does not fit (or that the server rejects as too long)
/// leaves its row out, counted.
pub fn score_through(
    rows: &[FilteredRow],
    judge: &Judge,
    chat: Option<&Chat>,
    server: &Server,
    a: &recipe::Annotate,
    mut progress: impl FnMut(usize),
) -> Result<Scored> {
    let mut asks: Vec<(usize, usize, Ask)> = Vec::new();
    let mut fits = vec![true; rows.len()];
    for (r, row) in rows.iter().enumerate() {
        for (k, response) in row.all_generated_responses.iter().enumerate() {
            let ask = match (a.endpoint, chat) {
                (Endpoint::Completions, Some(chat)) => {
                    let max_length = if a.max_length == 0 { chat.context } else { a.max_length };
                    reward::fit(chat, response, max_length, a.overflow, |resp| {
                        judge.render(chat, &row.prompt, resp, &a.template_kwargs)
                    })?
                    .map(Ask::Ids)
                }
                (Endpoint::Completions, None) => unreachable!("a judge asked for ids has local files"),
                (Endpoint::Chat, _) => Some(Ask::Chat(judge.ask(&row.prompt, response))),
            };
            match ask {
                Some(ask) => asks.push((r, k, ask)),
                None => fits[r] = false,
            }
        }
    }
    asks.retain(|(r, _, _)| fits[*r]);
    let size = |ask: &Ask| match ask {
        Ask::Ids(ids) => ids.len(),
        Ask::Chat(_) => 0,
    };
    let ask = |(_, _, ask): &(usize, usize, Ask)| {
        server.next_token(ask, a.top_logprobs, &a.template_kwargs).map(|got| (size(ask), got))
    };
    let answers = server::each(&asks, a.concurrency, ask, |(tokens, _)| progress(*tokens)).map_err(|(i, e)| {
        let (r, k, _) = &asks[i];
        anyhow!("annotate.server: response {} of {:?}: {e:#}", k + 1, preview(&rows[*r].prompt))
    })?;
    let mut scores: Vec<Vec<f64>> = rows.iter().map(|r| vec![f64::NAN; r.all_generated_responses.len()]).collect();
    let mut tokens = 0;
    for ((r, k, _), (size, answer)) in asks.iter().zip(answers) {
        let Some(candidates) = answer else {
            fits[*r] = false;
            continue;
        };
        let n = candidates.len();
        let probs = candidates.into_iter().map(|(token, lp)| (token, lp.exp()));
        let Some(s) = judge.expected(probs) else {
            bail!(
                "annotate.server: response {} of {:?}: none of the {n} most likely next tokens the server returned \
                 is a rating (a digit 1-9): raise {} (vLLM: and its --max-logprobs), or ask for a digit in the rubric",
                k + 1,
                preview(&rows[*r].prompt),
                recipe::annotate::top_logprobs
            );
        };
        scores[*r][*k] = s;
        tokens += size;
    }
    Ok(Scored::keeping(rows, scores, &fits, tokens))
}

/// How to reach `annotate.server` for the judge: by its files' names and
/// tokenizer (`chat`), or, for a hosted model, by its name alone.
fn server_options(a: &recipe::Annotate, model: Option<&Path>, chat: Option<&Chat>) -> Result<server::Options> {
    let mut names: Vec<String> = a.model.iter().cloned().collect();
    names.extend(model.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()));
    Ok(server::Options {
        section: recipe::Annotate::SECTION,
        served_model: a.served_model.clone(),
        names,
        timeout: Duration::from_secs(a.request_timeout_secs),
        retries: a.request_retries,
        requests_per_minute: a.requests_per_minute,
        api_key_env: a.api_key_env.clone(),
        identity: chat.map(server::Identity::of).transpose()?,
    })
}

/// Takes the scores for `rows` from a scored file, matched by prompt. The
/// imported responses must be the ones being scored, with one score each;
/// every imported prompt must be in the prompt set (rows the filter dropped
/// may be present: files scored before filtering are common).
pub fn import(prompt_set: &[String], rows: &[FilteredRow], path: &Path) -> Result<StageOutput> {
    let shown = path.display();
    let imported: Vec<ScoredRow> = simpo::read_rows(path)?;
    let mut by_prompt: HashMap<&str, (usize, &ScoredRow)> = HashMap::with_capacity(imported.len());
    // Rows are numbered from 1 in messages, as lines are.
    for (n, row) in (1..).zip(&imported) {
        if row.all_rm_scores.len() != row.all_generated_responses.len() {
            bail!(
                "{shown}: row {n}: {} responses but {} scores",
                row.all_generated_responses.len(),
                row.all_rm_scores.len()
            );
        }
        if prompt_set.binary_search(&row.prompt).is_err() {
            bail!("{shown}: row {n}: prompt {:?} is not in the recipe's prompt set", preview(&row.prompt));
        }
        if by_prompt.insert(row.prompt.as_str(), (n, row)).is_some() {
            bail!("{shown}: row {n}: prompt {:?} appears twice", preview(&row.prompt));
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Some((n, scored)) = by_prompt.remove(row.prompt.as_str()) else {
            bail!("{shown}: no scores for prompt {:?}", preview(&row.prompt));
        };
        if scored.all_generated_responses != row.all_generated_responses {
            bail!(
                "{shown}: row {n}: its responses differ from the generated ones for prompt {:?}",
                preview(&row.prompt)
            );
        }
        out.push(ScoredRow {
            prompt: row.prompt.clone(),
            all_generated_responses: row.all_generated_responses.clone(),
            all_rm_scores: scored.all_rm_scores.clone(),
        });
    }
    let counts =
        Counts { rows: Some(out.len() as u64), import_rows_unused: Some(by_prompt.len() as u64), ..Counts::default() };
    StageOutput::rows(FILE, out, counts)
}
