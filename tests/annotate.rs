//! The annotate stage with a reward model: the SimPO fixture's 5 seeds x 49
//! prompts (unicode, control characters, empty responses) scored by the tiny
//! ArmoRM of `scripts/make_fixtures.py reward`.

mod common;

use common::*;
use prefgen::infer::Load;
use prefgen::infer::reward::{Overflow, RewardModel};
use prefgen::infer::template::Kwargs;

fn recipe(p: &Project) -> String {
    let fx = fixtures();
    let text = simpo_recipe().replace(
        &format!("import = \"{}/scores.json\"", fx.join("simpo").display()),
        &format!("model = \"{}\"\nbatch_size = 7\nshard_size = 10", fx.join("tiny-armorm").display()),
    );
    p.write("rm.toml", &text).display().to_string()
}

fn rows(p: &Project, path: &str) -> Vec<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(p.path(path)).unwrap()).unwrap()
}

#[test]
fn armorm_scores_every_response_and_binarize_follows_the_scores() {
    let p = Project::new();
    let r = recipe(&p);
    p.ok(&["run", &r]);
    let model = RewardModel::load(&fixtures().join("tiny-armorm"), None, None, &Load::default()).unwrap();
    let scored = rows(&p, "out/all_outputs_rm.json");
    let filtered = rows(&p, "out/all_outputs.json");
    assert_eq!(scored.len(), filtered.len(), "annotate keeps every filtered row");
    for row in &scored {
        let prompt = row["prompt"].as_str().unwrap();
        let scores: Vec<f64> = serde_json::from_value(row["all_rm_scores"].clone()).unwrap();
        for (response, got) in row["all_generated_responses"].as_array().unwrap().iter().zip(&scores) {
            let ids = model
                .encode(prompt, response.as_str().unwrap(), 512, Overflow::Truncate, &Kwargs::new())
                .unwrap()
                .unwrap();
            let alone = model.score(&[&ids]).unwrap()[0];
            assert_eq!(alone.to_bits(), got.to_bits(), "{prompt:?}: {got} in the pipeline, {alone} alone");
        }
    }
    assert_binarized_by_scores(&rows(&p, "out/all_outputs_bin.json"));
    // Nothing stale: nothing rebuilt. A scoring parameter: annotate and after.
    assert!(p.ok(&["run", &r]).built().is_empty());
    let plan = p.ok(&["plan", &r, "--set", "annotate.max_length=64"]).stdout();
    assert!(plan.contains("annotate.max_length changed (0 -> 64)"), "{plan}");
    assert!(plan.lines().any(|l| l.contains("filter[train]") && l.contains("fresh")), "{plan}");
}

/// The scored file is byte for byte the same at any batch size, so a run
/// resumed with another batch size, or a teammate's, matches.
#[test]
fn scores_do_not_depend_on_the_batch_size() {
    let p = Project::new();
    let r = recipe(&p);
    p.ok(&["run", &r, "annotate", "--set", "annotate.batch_size=2", "--set", "export.dir=b2"]);
    let other = p.path("other-cache");
    let set = ["--set", "annotate.batch_size=16", "--set", "export.dir=b16"];
    p.ok(&[&["run", &r, "annotate", "--cache", other.to_str().unwrap()][..], &set].concat());
    let (a, b) = (
        std::fs::read(p.path("b2/all_outputs_rm.json")).unwrap(),
        std::fs::read(p.path("b16/all_outputs_rm.json")).unwrap(),
    );
    assert!(a == b, "all_outputs_rm.json differs between batch sizes 2 and 16");
}

/// Skipped conversations: their rows are left out and counted; truncated
/// ones are scored.
#[test]
fn over_long_conversations_follow_the_overflow_policy() {
    let p = Project::new();
    let r = recipe(&p);
    p.ok(&["run", &r, "annotate", "--set", "annotate.max_length=80", "--set", "export.dir=cut"]);
    let all = rows(&p, "cut/all_outputs.json").len();
    let cut = rows(&p, "cut/all_outputs_rm.json").len();
    assert!(cut > all / 2, "{cut} of {all} rows scored after truncation");
    let skip = p.ok(&[
        "run",
        &r,
        "binarize",
        "--set",
        "annotate.max_length=80",
        "--set",
        "annotate.overflow=\"skip\"",
        "--set",
        "export.dir=skip",
    ]);
    let kept = rows(&p, "skip/all_outputs_rm.json").len();
    assert!(kept < cut, "{kept} of {all} rows kept with an 80-token limit");
    assert!(skip.stderr().contains(&format!("skipped_too_long={}", all - kept)), "{}", skip.stderr());
}

#[test]
fn a_gguf_file_can_only_be_a_judge() {
    let p = Project::new();
    let r = recipe(&p);
    let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = p.prefgen(&[
        "run",
        &r,
        "--set",
        &format!("annotate.model={}", gguf.display()),
        "--set",
        "annotate.kind=\"armorm\"",
    ]);
    assert_ne!(out.code(), Some(0));
    assert!(out.stderr().contains("can only be a judge"), "{}", out.stderr());
}
