//! `filter`: combine the seeds' responses in recipe seed order (SimPO used
//! directory-listing order) and drop prompts whose responses are all identical.

use super::{At, Counts, Keyed, StageOutput};
use crate::formats::simpo::{DecodeRow, FilteredRow};
use crate::recipe;
use anyhow::{Result, bail};
use serde_json::json;

pub const VERSION: u32 = 1;
pub const FILE: &str = "all_outputs.json";

/// `[filter]`'s keyed values, and the seed order its rows follow.
pub fn keyed(at: &At) -> Keyed {
    let mut params = at.recipe.filter.keyed();
    params.insert(recipe::generate::seeds.into(), json!(at.recipe.generate.seeds));
    Keyed { params, externals: Default::default() }
}

/// `per_seed` holds each seed's rows in recipe seed order, all over one prompt list.
pub fn build(per_seed: &[&[DecodeRow]], section: &recipe::Filter) -> Result<StageOutput> {
    let drop_identical = section.drop_identical;
    let Some(first) = per_seed.first() else { bail!("filter needs at least one seed") };
    let mut rows = Vec::with_capacity(first.len());
    let mut identical = 0usize;
    for (i, row) in first.iter().enumerate() {
        let mut responses = Vec::with_capacity(per_seed.len());
        for seed_rows in per_seed {
            match seed_rows.get(i) {
                Some(r) if r.prompt == row.prompt => responses.push(r.generated_text.clone()),
                _ => bail!("the seeds' responses are not over the same prompts (row {})", i + 1),
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
    let counts = Counts {
        prompts: Some(first.len() as u64),
        identical: Some(identical as u64),
        dropped_identical: Some(if drop_identical { identical as u64 } else { 0 }),
        rows: Some(rows.len() as u64),
        ..Counts::default()
    };
    StageOutput::rows(FILE, rows, counts)
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
        let section = |drop_identical| recipe::Filter { drop_identical };
        let out = build(&[&seed(&["a", "x"]), &seed(&["b", "x"]), &seed(&["a", "x"])], &section(true)).unwrap();
        let rows = parse(&out);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].all_generated_responses, ["a", "b", "a"]);
        assert_eq!(out.counts.dropped_identical, Some(1));
        let kept = build(&[&seed(&["a", "x"]), &seed(&["b", "x"])], &section(false)).unwrap();
        assert_eq!(parse(&kept).len(), 2);
    }
}
