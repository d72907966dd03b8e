//! Reproducing a published dataset: `tests/published_like.py` makes one with
//! the princeton-nlp columns (train and test, hub-layout parquet, ties kept)
//! and the SimPO files its responses and scores import from; the recipe
//! reproduces chosen/rejected exactly and `prefgen verify` says so, or names
//! the row that differs.

mod common;

use common::*;

/// The published-like set, with one row changed by `edit` (`--flip`,
/// `--user-turn` or `--nan`, a split and a row index) when given.
fn setup(p: &Project, edit: Option<(&str, &str, usize)>) -> String {
    let dir = p.path("pl");
    let mut args = vec![script("published_like.py"), dir.display().to_string()];
    if let Some((option, split, row)) = edit {
        args.extend([option.into(), split.into(), row.to_string()]);
    }
    python(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let recipe = p.write(
        "repro.toml",
        r#"name = "published-like"

[prompts]
splits = { train = "pl/published/data/train-00000-of-00001.parquet", test = "pl/published/data/test-00000-of-00001.parquet" }

[generate]
seeds = [13, 21, 42, 79, 100]
import = "pl/import/{split}/output_{seed}.json"

[annotate]
import = "pl/import/{split}/all_outputs_rm.json"

[binarize]
keep_ties = true

[export]
dir = "out"
"#,
    );
    recipe.display().to_string()
}

#[test]
fn verify_agrees_with_the_dataset_the_recipe_reproduces() {
    let p = Project::new();
    let r = setup(&p, None);
    let out = p.ok(&["verify", &r, "--against", "pl/published"]);
    let table = out.stdout();
    assert!(table.contains("| train | 300 / 300 / 300 | 300 / 300 |"), "{table}");
    assert!(table.contains("| test | 40 / 40 / 40 | 40 / 40 |"), "{table}");
    assert!(table.contains("Every split agrees"), "{table}");
    // The export itself is what the published files hold, row for row, read
    // in one layout though it holds two.
    assert!(p.path("out/data/train-00000-of-00001.parquet").is_file() && p.path("out/hf/train").is_dir());
    let own = p.ok(&["verify", &r, "--against", "out"]).stdout();
    assert!(own.contains("Reading out as hub-layout parquet") && own.contains("| train | 300 / 300 / 300 |"), "{own}");
    assert!(own.contains("Every split agrees"), "{own}");
}

#[test]
fn verify_names_the_row_that_differs() {
    let p = Project::new();
    let r = setup(&p, Some(("--flip", "train", 17)));
    let out = p.prefgen(&["verify", &r, "--against", "pl/published"]);
    assert_eq!(out.code(), Some(1), "{}", out.stdout());
    let text = out.stdout();
    assert!(
        text.contains("| train | 300 / 300 / 300 | 300 / 300 | 300 / 300 (0.000e0) | 299 / 300 | 299 / 300 |"),
        "{text}"
    );
    assert!(text.contains("differs: train row 18 (prompt"), "{text}");
    assert!(text.contains("chosen differs"), "{text}");
    assert!(out.stderr().contains("1 of 2 splits disagree"), "{}", out.stderr());
}

/// A chosen pair that differs only in its user turn, late in the text: the
/// line shows the turn and the texts where they part, not two equal strings.
#[test]
fn verify_shows_where_a_differing_user_turn_parts() {
    let p = Project::new();
    let r = setup(&p, Some(("--user-turn", "train", 17)));
    let out = p.prefgen(&["verify", &r, "--against", "pl/published"]);
    assert_eq!(out.code(), Some(1), "{}", out.stdout());
    let text = out.stdout();
    let line = text.lines().find(|l| l.contains("chosen differs")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("turn 1: ours user") && line.contains("published user"), "{line}");
    assert!(line.contains("(edited)"), "the line shows where the texts part: {line}");
}

/// A NaN among the published scores is named as such, with its row and
/// column, not taken for a missing column.
#[test]
fn verify_names_a_nan_score() {
    let p = Project::new();
    let r = setup(&p, Some(("--nan", "test", 3)));
    let out = p.prefgen(&["verify", &r, "--against", "pl/published"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr());
    let err = out.stderr();
    assert!(err.contains("test-00000-of-00001.parquet: row 4: column \"all_rm_scores\": holds NaN"), "{err}");
    assert!(!err.contains("lacks"), "{err}");
}

/// The lock file round trip on imported files: written beside the recipe,
/// untouched by a fresh rerun, drift shown by `plan` and refused by `--locked`.
#[test]
fn the_lock_records_inputs_and_results() {
    let p = Project::new();
    let r = setup(&p, None);
    p.ok(&["run", &r]);
    let lock = std::fs::read_to_string(p.path("repro.lock")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&lock).unwrap();
    assert!(parsed["inputs"]["prompts.dataset[test]"]["digest"].is_string(), "{lock}");
    assert!(parsed["nodes"]["binarize[train]"]["outputs"]["all_outputs_bin.json"].is_string(), "{lock}");
    assert!(p.ok(&["run", &r]).built().is_empty());
    assert_eq!(std::fs::read_to_string(p.path("repro.lock")).unwrap(), lock, "a fresh rerun rewrites nothing");
    p.ok(&["run", &r, "--locked"]);
    // One imported score changes.
    let path = p.path("pl/import/train/all_outputs_rm.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    rows[0]["all_rm_scores"][0] = serde_json::json!(123.0);
    std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    let plan = p.ok(&["plan", &r]).stdout();
    assert!(plan.contains("lock drift: annotate.import pl/import/train/all_outputs_rm.json: the lock has"), "{plan}");
    let refused = p.prefgen(&["run", &r, "--locked"]);
    assert_ne!(refused.code(), Some(0));
    assert!(refused.stderr().contains("annotate.import pl/import/train/all_outputs_rm.json"), "{}", refused.stderr());
}
