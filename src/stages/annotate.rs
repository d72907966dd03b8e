//! `annotate`: one score per response, as SimPO's `all_outputs_rm.json`. This
//! file holds the import path (bring published or precomputed scores); reward
//! models plug in beside it.

use super::StageOutput;
use super::generate::preview;
use crate::formats::simpo::{self, FilteredRow, ScoredRow};
use anyhow::{Result, bail};
use std::collections::HashMap;
use std::path::Path;

pub const VERSION: u32 = 1;
pub const FILE: &str = "all_outputs_rm.json";

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
