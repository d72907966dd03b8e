//! `annotate`: one score per response, as SimPO's `all_outputs_rm.json`:
//! scored with a reward model, or imported (published or precomputed scores).

use super::generate::preview;
use super::{At, ByShard, Counts, External, Keyed, Models, NodeSpec, ShardOut, StageOutput, Work};
use crate::formats::simpo::{self, FilteredRow, ScoredRow};
use crate::infer::reward::{Overflow, RewardModel};
use crate::recipe::{self, Recipe};
use anyhow::{Result, anyhow, bail};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

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
            let model = at.reward.expect("the planner resolves annotate.model when it is set");
            externals.insert(recipe::annotate::model.into(), External::Model(model.to_path_buf()));
            for (key, path) in
                [(recipe::annotate::chat_template, &a.chat_template), (recipe::annotate::judge_rubric, &a.judge_rubric)]
            {
                if let Some(path) = path {
                    externals.insert(key.into(), External::File(path.into()));
                }
            }
            a.keyed()
        }
    };
    Keyed { params, externals }
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
    let model = spec.external(recipe::annotate::model).expect("a scoring node keys its model");
    let template = spec.external(recipe::annotate::chat_template);
    let rubric = spec.external(recipe::annotate::judge_rubric);
    let shards = ByShard::new(
        rows,
        a.shard_size,
        ("responses", |r: &FilteredRow| r.all_generated_responses.len()),
        move |chunk, progress| {
            let rm = models.reward(model, a.kind, template, rubric)?;
            let max_length = if a.max_length == 0 { rm.context() } else { a.max_length };
            let out = score(chunk, &rm, max_length, a, progress)
                .map_err(|e| anyhow!("annotate.model {}: {e:#}", model.display()))?;
            let counts = Counts { skipped_too_long: Some(out.skipped as u64), ..Counts::default() };
            Ok(ShardOut { rows: out.rows, counts, tokens: out.tokens, engine: rm.engine() })
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
            match model.encode(&row.prompt, response, max_length, a.overflow)? {
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
    let out = rows
        .iter()
        .zip(scores)
        .zip(&fits)
        .filter(|(_, fits)| **fits)
        .map(|((row, all_rm_scores), _)| ScoredRow {
            prompt: row.prompt.clone(),
            all_generated_responses: row.all_generated_responses.clone(),
            all_rm_scores,
        })
        .collect();
    Ok(Scored { rows: out, skipped: fits.iter().filter(|f| !**f).count(), tokens })
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
