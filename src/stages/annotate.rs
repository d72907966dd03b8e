//! `annotate`: one score per response, as SimPO's `all_outputs_rm.json`:
//! scored with a reward model, or imported (published or precomputed scores).

use super::StageOutput;
use super::generate::preview;
use crate::formats::simpo::{self, FilteredRow, ScoredRow};
use crate::infer::reward::{Overflow, RewardModel};
use anyhow::{Result, bail};
use std::collections::HashMap;
use std::path::Path;

pub const VERSION: u32 = 1;
/// Version of a scored shard's contents (tokenization, heads, batching).
pub const SCORER_VERSION: u32 = 2;
pub const FILE: &str = "all_outputs_rm.json";

/// Scoring parameters of the recipe's `[annotate]`.
pub struct Params {
    /// Longest conversation in tokens (already resolved from 0 to the context).
    pub max_length: usize,
    pub overflow: Overflow,
    pub batch_size: usize,
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
/// conversation that does not fit (`skip`, or a prompt too long to truncate
/// around) is left out and counted.
pub fn score(rows: &[FilteredRow], model: &RewardModel, p: &Params, mut progress: impl FnMut(usize)) -> Result<Scored> {
    let mut seqs: Vec<(usize, usize, Vec<u32>)> = Vec::new();
    let mut fits = vec![true; rows.len()];
    for (r, row) in rows.iter().enumerate() {
        for (k, response) in row.all_generated_responses.iter().enumerate() {
            match model.encode(&row.prompt, response, p.max_length, p.overflow)? {
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
    for batch in seqs.chunks(p.batch_size.max(1)) {
        let ids: Vec<&[u32]> = batch.iter().map(|(_, _, ids)| ids.as_slice()).collect();
        for ((r, k, ids), s) in batch.iter().zip(model.score(&ids)?) {
            if !s.is_finite() {
                bail!(
                    "the reward model gave a non-finite score ({s}) for a response to {:?}",
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
    for (n, row) in imported.iter().enumerate() {
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
    let (n, unused) = (out.len(), by_prompt.len());
    Ok(StageOutput::rows(FILE, out)?.stat("rows", n).stat("import_rows_unused", unused))
}
