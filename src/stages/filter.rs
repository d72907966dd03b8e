//! `filter`: combine the seeds' responses in recipe seed order (SimPO used
//! directory-listing order) and drop prompts whose responses are all identical.

use super::StageOutput;
use crate::formats::simpo::{DecodeRow, FilteredRow};
use anyhow::{Result, bail};

pub const VERSION: u32 = 1;
pub const FILE: &str = "all_outputs.json";

/// `per_seed` holds each seed's rows in recipe seed order, all over one prompt list.
pub fn build(per_seed: &[&[DecodeRow]], drop_identical: bool) -> Result<StageOutput> {
    let Some(first) = per_seed.first() else { bail!("filter needs at least one seed") };
    let mut rows = Vec::with_capacity(first.len());
    let mut identical = 0usize;
    for (i, row) in first.iter().enumerate() {
        let mut responses = Vec::with_capacity(per_seed.len());
        for seed_rows in per_seed {
            match seed_rows.get(i) {
                Some(r) if r.prompt == row.prompt => responses.push(r.generated_text.clone()),
                _ => bail!("the seeds' responses are not over the same prompts (row {i})"),
            }
        }
        if responses.iter().all(|r| *r == responses[0]) {
            identical += 1;
            if drop_identical {
                continue;
            }
        }
        rows.push(FilteredRow { prompt: row.prompt.clone(), all_generated_responses: responses });
    }
    let kept = rows.len();
    Ok(StageOutput::rows(FILE, rows)?
        .stat("prompts", first.len())
        .stat("identical", identical)
        .stat("dropped_identical", if drop_identical { identical } else { 0 })
        .stat("rows", kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(texts: &[&str]) -> Vec<DecodeRow> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| DecodeRow {
                prompt: format!("p{i}"),
                format_prompt: String::new(),
                generated_text: t.to_string(),
            })
            .collect()
    }

    #[test]
    fn drops_rows_identical_across_seeds_and_keeps_seed_order() {
        let parse =
            |out: &StageOutput| crate::formats::simpo::parse_rows::<FilteredRow>(&out.files[0].1, "filter").unwrap();
        let out = build(&[&seed(&["a", "x"]), &seed(&["b", "x"]), &seed(&["a", "x"])], true).unwrap();
        let rows = parse(&out);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].all_generated_responses, ["a", "b", "a"]);
        assert_eq!(out.stats["dropped_identical"], 1);
        let kept = build(&[&seed(&["a", "x"]), &seed(&["b", "x"])], false).unwrap();
        assert_eq!(parse(&kept).len(), 2);
    }
}
