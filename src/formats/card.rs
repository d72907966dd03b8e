//! The dataset card (`README.md` in `export.dir`): the hub's YAML front matter,
//! then the counts, plots (`plots/*.png`), the recipe, the lock's digests
//! and the cache keys.

use crate::formats::plot::{self, BLUE, ORANGE, Series};
use crate::formats::simpo::BinarizedRow;
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

/// One split as the card reports it.
pub struct CardSplit<'a> {
    pub name: &'a str,
    pub rows: &'a [BinarizedRow],
    pub counts: SplitCounts,
}

/// A split's counts from the stages (None: the stage did not count it).
#[derive(Debug, Clone, Default)]
pub struct SplitCounts {
    pub prompts: Option<u64>,
    pub skipped_generate: Option<u64>,
    pub skipped_annotate: Option<u64>,
    pub dropped_identical: Option<u64>,
    pub rows_in: Option<u64>,
    pub ties: Option<u64>,
    pub dropped_ties: Option<u64>,
}

/// Something the data was made from: a model, a template, an import.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// The recipe key that names it.
    pub key: String,
    /// `org/name@commit` for the hub, else the path.
    pub source: String,
    /// Its identity digest in the action keys.
    pub digest: String,
}

/// Everything the card shows.
pub struct CardInput<'a> {
    pub name: &'a str,
    pub splits: Vec<CardSplit<'a>>,
    /// Recipe key -> value, for every key that shaped the data.
    pub params: BTreeMap<String, Value>,
    /// The seeds, in the order of each row's responses.
    pub seeds: Vec<u64>,
    /// The models and files the data came from.
    pub sources: Vec<Source>,
    /// (stage, engine) for every engine that sampled or scored.
    pub engines: Vec<(String, String)>,
    /// Node label -> action key.
    pub keys: Vec<(String, String)>,
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

/// Per row of a split: the chosen and rejected responses' scores and lengths
/// (characters), which the card's table and plots both show.
struct Pairs {
    chosen_scores: Vec<f64>,
    rejected_scores: Vec<f64>,
    chosen_lengths: Vec<f64>,
    rejected_lengths: Vec<f64>,
}

impl Pairs {
    fn of(rows: &[BinarizedRow]) -> Pairs {
        let side = |pick: fn(&BinarizedRow) -> &[crate::formats::simpo::Message]| -> (Vec<f64>, Vec<f64>) {
            rows.iter()
                .map(|r| {
                    let text = pick(r).get(1).map_or("", |m| m.content.as_str());
                    (score_of(r, text), text.chars().count() as f64)
                })
                .unzip()
        };
        let (chosen_scores, chosen_lengths) = side(|r| &r.chosen);
        let (rejected_scores, rejected_lengths) = side(|r| &r.rejected);
        Pairs { chosen_scores, rejected_scores, chosen_lengths, rejected_lengths }
    }
}

fn score_of(row: &BinarizedRow, text: &str) -> f64 {
    row.all_generated_responses.iter().position(|r| r == text).map_or(f64::NAN, |i| row.all_rm_scores[i])
}

fn count(n: Option<u64>) -> String {
    n.map_or("-".into(), |v| v.to_string())
}

/// The card and its plots, as (path under `export.dir`, bytes).
pub fn render(input: &CardInput) -> Result<Vec<(String, Vec<u8>)>> {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
    let mut y = String::from("---\n");
    let _ = writeln!(y, "pretty_name: {}", q(input.name));
    y.push_str("tags:\n- prefgen\n- preference\nconfigs:\n- config_name: default\n  data_files:\n");
    for s in &input.splits {
        let _ = writeln!(y, "  - split: {}\n    path: data/{}-*", s.name, s.name);
    }
    y.push_str("dataset_info:\n  features:\n");
    y.push_str("  - name: prompt_id\n    dtype: string\n  - name: prompt\n    dtype: string\n");
    y.push_str("  - name: all_generated_responses\n    sequence: string\n");
    y.push_str("  - name: all_rm_scores\n    sequence: float64\n");
    for col in ["chosen", "rejected"] {
        let _ = writeln!(
            y,
            "  - name: {col}\n    list:\n    - name: content\n      dtype: string\n    - name: role\n      dtype: string"
        );
    }
    y.push_str("  splits:\n");
    for s in &input.splits {
        let _ = writeln!(y, "  - name: {}\n    num_examples: {}", s.name, s.rows.len());
    }
    y.push_str("---\n\n");

    let mut b = y;
    let _ = writeln!(b, "# {}\n", input.name);
    b.push_str("An on-policy preference dataset built by prefgen: every response was sampled from the policy, scored by the reward model, and the best and worst scored responses kept as `chosen` and `rejected`.\n\n");
    b.push_str("```python\nfrom datasets import load_dataset, load_from_disk\nds = load_dataset(\"parquet\", data_dir=\"data\")   # or: load_from_disk(\"hf\")\n```\n\n");
    b.push_str("## Made from\n\n| recipe key | source | digest |\n|---|---|---|\n");
    for s in &input.sources {
        let _ = writeln!(b, "| `{}` | `{}` | `{}` |", s.key, s.source, &s.digest[..12.min(s.digest.len())]);
    }
    if !input.engines.is_empty() {
        b.push_str("\nComputed by:\n\n");
        for (stage, engine) in &input.engines {
            let _ = writeln!(b, "- {stage}: {engine}");
        }
    }
    b.push('\n');
    b.push_str("## Counts\n\n| split | prompts | skipped as too long (generate / annotate) | dropped as identical | rows scored | ties (all scores equal) | dropped as ties | rows |\n|---|---|---|---|---|---|---|---|\n");
    for s in &input.splits {
        let c = &s.counts;
        let _ = writeln!(
            b,
            "| {} | {} | {} / {} | {} | {} | {} | {} | {} |",
            s.name,
            count(c.prompts),
            count(c.skipped_generate),
            count(c.skipped_annotate),
            count(c.dropped_identical),
            count(c.rows_in),
            count(c.ties),
            count(c.dropped_ties),
            s.rows.len()
        );
    }
    b.push_str("\n## Scores and lengths\n\n| split | chosen score (mean) | rejected score (mean) | margin (mean) | chosen length (chars, mean) | rejected length (chars, mean) |\n|---|---|---|---|---|---|\n");
    let pairs: Vec<Pairs> = input.splits.iter().map(|s| Pairs::of(s.rows)).collect();
    for (s, p) in input.splits.iter().zip(&pairs) {
        let cs = mean(p.chosen_scores.iter().copied());
        let rs = mean(p.rejected_scores.iter().copied());
        let margin = cs.zip(rs).map(|(c, r)| c - r);
        let cl = mean(p.chosen_lengths.iter().copied());
        let rl = mean(p.rejected_lengths.iter().copied());
        let _ = writeln!(
            b,
            "| {} | {} | {} | {} | {} | {} |",
            s.name,
            fmt_opt(cs),
            fmt_opt(rs),
            fmt_opt(margin),
            fmt_opt(cl),
            fmt_opt(rl)
        );
    }
    let mut files = Vec::new();
    b.push_str("\n## Plots\n\nLengths are in characters. Blue: chosen, orange: rejected.\n");
    for (s, p) in input.splits.iter().zip(&pairs) {
        let (cs, rs, cl, rl) = (&p.chosen_scores, &p.rejected_scores, &p.chosen_lengths, &p.rejected_lengths);
        let margins: Vec<f64> = cs.iter().zip(rs).map(|(c, r)| c - r).collect();
        let _ = writeln!(b, "\n### {}\n", s.name);
        let pair = |a: &[f64], b: &[f64]| {
            plot::histogram(&[Series { values: a, color: BLUE }, Series { values: b, color: ORANGE }])
        };
        let charts = [
            ("scores", "chosen and rejected scores", pair(cs, rs)?),
            (
                "margin",
                "score margin (chosen - rejected)",
                plot::histogram(&[Series { values: &margins, color: BLUE }])?,
            ),
            ("length", "chosen and rejected response lengths", pair(cl, rl)?),
        ];
        for (file, title, (png, (lo, hi))) in charts {
            let path = format!("plots/{}-{file}.png", s.name);
            let _ = writeln!(b, "![{title}]({path})\n\n{title}: 30 bins from {lo:.3} to {hi:.3}.\n");
            files.push((path, png));
        }
        // Per seed: the mean length of the responses in that seed's position.
        let n = s.rows.first().map_or(0, |r| r.all_generated_responses.len());
        let per_seed: Vec<f64> = (0..n)
            .map(|k| {
                mean(s.rows.iter().filter_map(|r| r.all_generated_responses.get(k)).map(|t| t.chars().count() as f64))
                    .unwrap_or(0.0)
            })
            .collect();
        let path = format!("plots/{}-seed-length.png", s.name);
        let seeds: Vec<String> = match &input.seeds {
            seeds if seeds.len() == n => seeds.iter().map(u64::to_string).collect(),
            _ => (1..=n).map(|k| format!("#{k}")).collect(),
        };
        let means: Vec<String> = seeds.iter().zip(&per_seed).map(|(seed, m)| format!("{seed}: {m:.1}")).collect();
        let _ = writeln!(
            b,
            "![mean response length per seed]({path})\n\nmean response length per seed ({}).\n",
            means.join(", ")
        );
        files.push((path, plot::bars(&per_seed, BLUE)?));
    }
    b.push_str("\n## Recipe\n\nEvery parameter that shaped the data (parameters that cannot change it, such as batch sizes, are left out):\n\n```toml\n");
    for (k, v) in &input.params {
        let _ = writeln!(b, "{k} = {v}");
    }
    b.push_str("```\n\n## Cache keys\n\nThe BLAKE3 action key of every node; a teammate whose cache holds them rebuilds nothing.\n\n| node | key |\n|---|---|\n");
    for (label, key) in &input.keys {
        let _ = writeln!(b, "| `{label}` | `{key}` |");
    }
    files.insert(0, ("README.md".to_string(), b.into_bytes()));
    Ok(files)
}
