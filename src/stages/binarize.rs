//! `binarize`: chosen = the first best-scored response, rejected = the first
//! worst (numpy's `argmax`/`argmin`, NaN winning both as in numpy).

use super::{At, Counts, Keyed, StageOutput};
use crate::formats::simpo::{BinarizedRow, Message, ScoredRow};
use crate::recipe;
use anyhow::Result;

pub const VERSION: u32 = 1;
pub const FILE: &str = "all_outputs_bin.json";

/// numpy's argmax (`better = >`) or argmin (`better = <`): the first index
/// of the extreme, or of the first NaN.
fn arg_extreme(xs: &[f64], better: fn(f64, f64) -> bool) -> usize {
    if let Some(i) = xs.iter().position(|x| x.is_nan()) {
        return i;
    }
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if better(x, xs[best]) {
            best = i;
        }
    }
    best
}

fn pair(prompt: &str, response: &str) -> Vec<Message> {
    vec![
        Message { role: "user".into(), content: prompt.into() },
        Message { role: "assistant".into(), content: response.into() },
    ]
}

/// `[binarize]`'s keyed values.
pub fn keyed(at: &At) -> Keyed {
    Keyed { params: at.recipe.binarize.keyed(), externals: Default::default() }
}

pub fn build(rows: &[ScoredRow], section: &recipe::Binarize) -> Result<StageOutput> {
    let keep_ties = section.keep_ties;
    let rows_in = rows.len();
    let mut ties = 0usize;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let s = &row.all_rm_scores;
        if s.is_empty() {
            continue;
        }
        if s.iter().all(|x| *x == s[0]) {
            ties += 1;
            if !keep_ties {
                continue;
            }
        }
        let chosen = pair(&row.prompt, &row.all_generated_responses[arg_extreme(s, |a, b| a > b)]);
        let rejected = pair(&row.prompt, &row.all_generated_responses[arg_extreme(s, |a, b| a < b)]);
        out.push(BinarizedRow {
            prompt: row.prompt.clone(),
            all_generated_responses: row.all_generated_responses.clone(),
            all_rm_scores: row.all_rm_scores.clone(),
            chosen,
            rejected,
        });
    }
    let counts = Counts {
        rows_in: Some(rows_in as u64),
        ties: Some(ties as u64),
        dropped_ties: Some(if keep_ties { 0 } else { ties as u64 }),
        rows: Some(out.len() as u64),
        ..Counts::default()
    };
    StageOutput::rows(FILE, out, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_tie_rules() {
        let gt = |a: f64, b: f64| a > b;
        let lt = |a: f64, b: f64| a < b;
        assert_eq!(arg_extreme(&[1.0, 3.0, 3.0, 0.0, 0.0], gt), 1);
        assert_eq!(arg_extreme(&[1.0, 3.0, 3.0, 0.0, 0.0], lt), 3);
        assert_eq!(arg_extreme(&[1.0, f64::NAN, 0.0], lt), 1);
    }

    #[test]
    fn all_equal_rows_are_counted_and_dropped_unless_kept() {
        let row = |scores: Vec<f64>| ScoredRow {
            prompt: "p".into(),
            all_generated_responses: vec!["a".into(), "b".into()],
            all_rm_scores: scores,
        };
        let rows = vec![row(vec![1.0, 1.0]), row(vec![0.5, 2.0])];
        let parse =
            |out: &StageOutput| crate::formats::simpo::parse_rows::<BinarizedRow>(&out.files[0].1, "binarize").unwrap();
        let dropped = build(&rows, &recipe::Binarize { keep_ties: false }).unwrap();
        let kept = parse(&dropped);
        assert_eq!((kept.len(), dropped.counts.ties), (1, Some(1)));
        assert_eq!(kept[0].chosen[1].content, "b");
        assert_eq!(kept[0].rejected[1].content, "a");
        assert_eq!(parse(&build(&rows, &recipe::Binarize { keep_ties: true }).unwrap()).len(), 2);
    }
}
