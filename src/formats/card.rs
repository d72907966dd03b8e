//! The dataset card (`README.md` in `export.dir`): the hub's YAML front matter
//! (license, task and size categories, the configs `load_dataset` reads),
//! then what the data was made from, the counts, the plots
//! (`plots/*.svg`), the recipe and the cache keys.

use crate::formats::plot::{self, CHOSEN, Labels, REJECTED, Series};
use crate::formats::simpo::BinarizedRow;
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

const FILE: &str = "README.md";
/// Each split's plots, by the name that follows the split's in the file name.
const PLOTS: [&str; 4] = ["scores", "margin", "length", "seed-length"];

fn plot_path(split: &str, plot: &str) -> String {
    format!("plots/{split}-{plot}.svg")
}

/// Whether `path` is a file [`render`] names for a card over `splits`.
pub fn writes(splits: &[&str], path: &str) -> bool {
    path == FILE || splits.iter().any(|split| PLOTS.iter().any(|plot| plot_path(split, plot) == path))
}

/// One split as the card reports it.
pub struct CardSplit<'a> {
    pub name: &'a str,
    pub rows: &'a [BinarizedRow],
    /// The size of its Arrow data (`datasets`' `num_bytes`).
    pub num_bytes: u64,
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
    /// The hub's license id (`export.license`).
    pub license: &'a str,
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

/// The hub's size category for `n` rows.
fn size_category(n: usize) -> &'static str {
    match n {
        0..1_000 => "n<1K",
        1_000..10_000 => "1K<n<10K",
        10_000..100_000 => "10K<n<100K",
        100_000..1_000_000 => "100K<n<1M",
        _ => "1M<n<10M",
    }
}

/// Pearson's correlation of the pairs' two values (None: fewer than two, or
/// one of them constant).
fn pearson(xy: &[(f64, f64)]) -> Option<f64> {
    let finite: Vec<(f64, f64)> = xy.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let (mx, my) = (mean(finite.iter().map(|p| p.0))?, mean(finite.iter().map(|p| p.1))?);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in &finite {
        (sxy, sxx, syy) = (sxy + (x - mx) * (y - my), sxx + (x - mx) * (x - mx), syy + (y - my) * (y - my));
    }
    (finite.len() > 1 && sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// A digest or key as the card shows it: its first 12 characters.
fn short(digest: &str) -> &str {
    &digest[..12.min(digest.len())]
}

/// What a reader asks first: which models, prompts, seeds and sampling made
/// the data, with which prefgen, and how to rebuild it.
fn provenance(b: &mut String, input: &CardInput) {
    let shown = |s: &Source| format!("`{}` (digest `{}`)", s.source, short(&s.digest));
    let of = |prefix: &str| -> Vec<String> {
        input.sources.iter().filter(|s| s.key.starts_with(prefix)).map(shown).collect()
    };
    let param = |k: &str| input.params.get(k).map(|v| v.to_string());
    let mut rows: Vec<(&str, String)> = Vec::new();
    let policy = of("generate.model");
    rows.push((
        "policy",
        if policy.is_empty() { "imported responses (`generate.import`)".into() } else { policy.join(", ") },
    ));
    let reward = of("annotate.model");
    rows.push((
        "reward model",
        if reward.is_empty() { "imported scores (`annotate.import`)".into() } else { reward.join(", ") },
    ));
    let prompts: Vec<String> = input
        .sources
        .iter()
        .filter(|s| s.key.starts_with("prompts."))
        .map(|s| format!("{}: {}", s.key, shown(s)))
        .collect();
    rows.push(("prompts", prompts.join("; ")));
    let seeds: Vec<String> = input.seeds.iter().map(u64::to_string).collect();
    rows.push(("seeds", seeds.join(", ")));
    let sampling: Vec<String> = ["generate.temperature", "generate.top_p", "generate.max_tokens"]
        .iter()
        .filter_map(|k| param(k).map(|v| format!("{} = {v}", &k["generate.".len()..])))
        .collect();
    if !sampling.is_empty() {
        rows.push(("sampling", sampling.join(", ")));
    }
    let engines: Vec<String> = input.engines.iter().map(|(stage, e)| format!("{stage}: {e}")).collect();
    rows.push((
        "built by",
        format!(
            "prefgen {}{}",
            env!("CARGO_PKG_VERSION"),
            if engines.is_empty() { String::new() } else { format!("; {}", engines.join("; ")) }
        ),
    ));
    let binarized: Vec<String> = input
        .keys
        .iter()
        .filter(|(label, _)| label.starts_with("binarize"))
        .map(|(label, key)| format!("`{label}` `{}`", short(key)))
        .collect();
    rows.push((
        "rebuild",
        format!("`prefgen run RECIPE --locked`; the lock's binarize keys: {}", binarized.join(", ")),
    ));
    b.push_str("| made from | source |\n|---|---|\n");
    for (what, text) in rows {
        // One line per row, whatever a cell holds (an engine's name comes from a server).
        let cell = text.replace('|', "\\|").replace(['\n', '\r'], " ").replace('<', "&lt;");
        let _ = writeln!(b, "| {what} | {cell} |");
    }
    b.push('\n');
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
    let _ = writeln!(y, "license: {}", q(input.license));
    let total: usize = input.splits.iter().map(|s| s.rows.len()).sum();
    let _ = writeln!(y, "task_categories:\n- text-generation\nsize_categories:\n- {}", size_category(total));
    y.push_str("tags:\n- prefgen\n- preference\n- dpo\n- simpo\nconfigs:\n- config_name: default\n");
    // Only splits with rows have parquet files (`hub_parquet::write_split`).
    let loadable: Vec<&CardSplit> = input.splits.iter().filter(|s| !s.rows.is_empty()).collect();
    y.push_str(if loadable.is_empty() { "  data_files: []\n" } else { "  data_files:\n" });
    for s in &loadable {
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
    y.push_str(if loadable.is_empty() { "  splits: []\n" } else { "  splits:\n" });
    for s in &loadable {
        let _ = writeln!(y, "  - name: {}\n    num_bytes: {}\n    num_examples: {}", s.name, s.num_bytes, s.rows.len());
    }
    y.push_str("---\n\n");

    let mut b = y;
    let _ = writeln!(b, "# {}\n", input.name);
    b.push_str("An on-policy preference dataset built by prefgen: every response was sampled from the policy, scored by the reward model, and the best and worst scored responses kept as `chosen` and `rejected`.\n\n");
    provenance(&mut b, input);
    b.push_str("```python\nfrom datasets import load_dataset, load_from_disk\nds = load_dataset(\"path/to/this/folder\")   # or: load_from_disk(\"hf\")\n```\n\n");
    b.push_str("## Every input, by digest\n\n| recipe key | source | digest |\n|---|---|---|\n");
    for s in &input.sources {
        let _ = writeln!(b, "| `{}` | `{}` | `{}` |", s.key, s.source, short(&s.digest));
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
    let empty: Vec<&str> = input.splits.iter().filter(|s| s.rows.is_empty()).map(|s| s.name).collect();
    if !empty.is_empty() {
        let _ = writeln!(
            b,
            "\nNo rows are left in {}: `load_dataset` cannot read an empty split, so `data/` and the `configs` above leave it out; `load_from_disk(\"hf\")` holds it, empty.",
            empty.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
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
        let split = s.name;
        let both = |a, b| {
            [
                Series { label: "chosen", values: a, color: CHOSEN },
                Series { label: "rejected", values: b, color: REJECTED },
            ]
        };
        let title = format!("Reward scores of chosen and rejected ({split})");
        let scores = plot::histogram(&Labels { title: &title, x: "reward score", y: "responses" }, &both(cs, rs));
        let title = format!("Score margin, chosen minus rejected ({split})");
        let margin = plot::histogram(
            &Labels { title: &title, x: "score margin", y: "rows" },
            &[Series { label: "margin", values: &margins, color: CHOSEN }],
        );
        let title = format!("Response lengths of chosen and rejected ({split})");
        let length = plot::histogram(
            &Labels { title: &title, x: "response length (characters)", y: "responses" },
            &both(cl, rl),
        );
        let (lo, hi) = scores.range;
        let scores_text = format!(
            "Reward scores, {BINS} bins from {lo:.3} to {hi:.3}: chosen mean {}, rejected mean {}.",
            fmt_opt(mean(cs.iter().copied())),
            fmt_opt(mean(rs.iter().copied())),
            BINS = plot::BINS
        );
        // The score plot's range is the range of both sides' scores.
        let small = margins.iter().filter(|m| **m < 0.1 * (hi - lo)).count();
        let margin_text = format!(
            "Chosen minus rejected score per row, from {:.3} to {:.3}, mean {}; {small} of {} rows have a margin under a tenth of the score range.",
            margin.range.0,
            margin.range.1,
            fmt_opt(mean(margins.iter().copied())),
            margins.len()
        );
        let all: Vec<(f64, f64)> = s
            .rows
            .iter()
            .flat_map(|r| {
                r.all_generated_responses.iter().zip(&r.all_rm_scores).map(|(t, sc)| (*sc, t.chars().count() as f64))
            })
            .collect();
        let gap = mean(cl.iter().zip(rl).map(|(c, r)| c - r));
        let gap = gap.map_or("-".into(), |g| {
            format!("{:.1} characters {}", g.abs(), if g < 0.0 { "shorter" } else { "longer" })
        });
        let length_text = format!(
            "Response lengths in characters. Chosen responses are on average {gap} than rejected ones; the \
             correlation of score with length over all {} scored responses is {} (SimPO's length-bias question: a \
             large positive value means the reward model prefers longer answers).",
            all.len(),
            fmt_opt(pearson(&all))
        );
        for (file, chart, text) in
            [(PLOTS[0], scores, scores_text), (PLOTS[1], margin, margin_text), (PLOTS[2], length, length_text)]
        {
            let path = plot_path(split, file);
            let _ = writeln!(b, "![{text}]({path})\n\n{text}\n");
            files.push((path, chart.svg));
        }
        // Per seed: the mean length of the responses in that seed's position.
        let n = s.rows.first().map_or(0, |r| r.all_generated_responses.len());
        let per_seed: Vec<f64> = (0..n)
            .map(|k| {
                mean(s.rows.iter().filter_map(|r| r.all_generated_responses.get(k)).map(|t| t.chars().count() as f64))
                    .unwrap_or(0.0)
            })
            .collect();
        let seeds: Vec<String> = match &input.seeds {
            seeds if seeds.len() == n => seeds.iter().map(u64::to_string).collect(),
            _ => (1..=n).map(|k| format!("#{k}")).collect(),
        };
        let path = plot_path(split, PLOTS[3]);
        let title = format!("Mean response length per seed ({split})");
        let labels = Labels { title: &title, x: "seed", y: "mean length (characters)" };
        let means: Vec<String> = seeds.iter().zip(&per_seed).map(|(seed, m)| format!("{seed}: {m:.1}")).collect();
        let text = format!("Mean response length per seed, in characters ({}).", means.join(", "));
        let _ = writeln!(b, "![{text}]({path})\n\n{text}\n");
        files.push((path, plot::bars(&labels, &seeds, &per_seed, CHOSEN)));
    }
    b.push_str("\n## Recipe\n\nEvery parameter that shaped the data (parameters that cannot change it, such as batch sizes, are left out):\n\n```toml\n");
    for (k, v) in &input.params {
        let _ = writeln!(b, "{k} = {v}");
    }
    b.push_str("```\n\n## Cache keys\n\nThe BLAKE3 action key of every node; a teammate whose cache holds them rebuilds nothing.\n\n| node | key |\n|---|---|\n");
    for (label, key) in &input.keys {
        let _ = writeln!(b, "| `{label}` | `{key}` |");
    }
    files.insert(0, (FILE.to_string(), b.into_bytes()));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::simpo::Message;

    fn row(prompt: &str, responses: [&str; 2], scores: [f64; 2]) -> BinarizedRow {
        let turn = |text: &str| {
            vec![
                Message { role: "user".into(), content: prompt.into() },
                Message { role: "assistant".into(), content: text.into() },
            ]
        };
        let (best, worst) = if scores[0] >= scores[1] { (0, 1) } else { (1, 0) };
        BinarizedRow {
            prompt: prompt.into(),
            all_generated_responses: responses.iter().map(|r| r.to_string()).collect(),
            all_rm_scores: scores.to_vec(),
            chosen: turn(responses[best]),
            rejected: turn(responses[worst]),
        }
    }

    /// The front matter the hub reads, provenance before the counts, four
    /// SVG plots per split, and the length-bias numbers: chosen responses
    /// here are 4 characters longer on average, and score grows with length.
    #[test]
    fn the_card_leads_with_provenance_and_reads_its_numbers_out() {
        let rows = vec![row("a", ["xxxxxx", "xx"], [2.0, 1.0]), row("b", ["yyy", "yyyyyyy"], [0.5, 1.5])];
        let source = |key: &str, path: &str| Source { key: key.into(), source: path.into(), digest: "ab".repeat(32) };
        let input = CardInput {
            name: "t",
            license: "mit",
            splits: vec![CardSplit { name: "train", rows: &rows, num_bytes: 0, counts: SplitCounts::default() }],
            params: BTreeMap::from([("generate.temperature".to_string(), serde_json::json!(0.8))]),
            seeds: vec![13, 21],
            sources: vec![source("generate.model", "m.gguf"), source("prompts.dataset", "p.jsonl")],
            engines: vec![],
            keys: vec![("binarize[train]".into(), "cd".repeat(32))],
        };
        let files = render(&input).unwrap();
        assert_eq!(files, render(&input).unwrap(), "the same bytes every time");
        let card = String::from_utf8(files[0].1.clone()).unwrap();
        for line in ["license: \"mit\"", "task_categories:\n- text-generation", "size_categories:\n- n<1K"] {
            assert!(card.contains(line), "{line}:\n{card}");
        }
        let at = |s: &str| card.find(s).unwrap_or_else(|| panic!("no {s:?} in\n{card}"));
        assert!(at("| policy | `m.gguf`") < at("## Counts"), "provenance first");
        assert!(at("| sampling | temperature = 0.8") < at("## Counts"));
        assert!(card.contains("`binarize[train]` `cdcdcdcdcdcd`"));
        assert!(card.contains("on average 4.0 characters longer than rejected ones"), "{card}");
        assert!(card.contains("over all 4 scored responses is 0.759"), "{card}");
        let plots: Vec<&str> = files[1..].iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            plots,
            [
                "plots/train-scores.svg",
                "plots/train-margin.svg",
                "plots/train-length.svg",
                "plots/train-seed-length.svg"
            ]
        );
        for p in plots {
            assert!(card.contains(&format!("]({p})")), "the card shows {p}");
        }
    }
}
