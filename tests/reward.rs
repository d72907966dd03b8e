//! Reward-model parity with `transformers` (CPU, f32) on tiny random-weight
//! models made by `scripts/make_fixtures.py reward`: an ArmoRM (Llama-3-shaped
//! backbone, regression layer, 3-layer gating network, transform matrix, pad
//! id outside the vocabulary) scored as the published modeling file scores,
//! and a `LlamaForSequenceClassification`. 17 conversations of different
//! lengths, multi-line, unicode and an empty response among them.

use prefgen::infer::Load;
use prefgen::infer::reward::{Kind, Overflow, RewardModel};
use serde_json::Value;
use std::path::Path;

fn fixture(name: &str) -> (RewardModel, Vec<Value>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let model = RewardModel::load(&dir.join(format!("tiny-{name}")), None, None, &Load::default()).unwrap();
    let r: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("tiny-{name}-reference.json"))).unwrap()).unwrap();
    (model, r["cases"].as_array().unwrap().clone())
}

/// Inputs equal transformers' `apply_chat_template` tokens; scores within
/// 1e-4 of the reference, all conversations in one batch; the batch's scores
/// equal one-at-a-time scores within 1e-5.
fn matches_transformers(name: &str, kind: Kind) {
    let (model, cases) = fixture(name);
    assert_eq!(model.kind, kind, "detected from config.json");
    assert!(cases.len() >= 16);
    let seqs: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            let (p, r) = (c["prompt"].as_str().unwrap(), c["response"].as_str().unwrap());
            let ids = model.encode(p, r, model.context(), Overflow::Truncate).unwrap().unwrap();
            let want: Vec<u32> = serde_json::from_value(c["input_ids"].clone()).unwrap();
            assert_eq!(ids, want, "tokens of {p:?} / {r:?}");
            ids
        })
        .collect();
    let all: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let batch = model.score(&all).unwrap();
    let mut worst = 0f64;
    for (case, got) in cases.iter().zip(&batch) {
        worst = worst.max((got - case["score"].as_f64().unwrap()).abs());
    }
    // Bit for bit the same in batches of any size.
    for size in [1, 2, 3, 7] {
        let chunked: Vec<f64> = all.chunks(size).flat_map(|c| model.score(c).unwrap()).collect();
        let same = chunked.iter().zip(&batch).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: batches of {size} score otherwise than one batch");
    }
    eprintln!("{name}: largest score difference {worst:e}");
    assert!(worst <= 1e-4, "scores differ by up to {worst:e}");
}

#[test]
fn armorm_matches_transformers() {
    matches_transformers("armorm", Kind::Armorm);
}

#[test]
fn classifier_matches_transformers() {
    matches_transformers("classifier", Kind::Classifier);
}

/// A conversation over the length limit is cut from the right of the
/// response (and still scores), or skipped.
#[test]
fn long_conversations_are_truncated_or_skipped() {
    let (model, cases) = fixture("armorm");
    let (p, r) = (cases[9]["prompt"].as_str().unwrap(), cases[9]["response"].as_str().unwrap());
    let full = model.encode(p, r, usize::MAX, Overflow::Truncate).unwrap().unwrap();
    let limit = full.len() - 5;
    let cut = model.encode(p, r, limit, Overflow::Truncate).unwrap().unwrap();
    assert!(cut.len() <= limit && cut.len() > limit - 8, "{} tokens for a limit of {limit}", cut.len());
    assert_eq!(cut[..20], full[..20], "the prompt is kept");
    assert!(model.score(&[&cut]).unwrap()[0].is_finite());
    assert_eq!(model.encode(p, r, limit, Overflow::Skip).unwrap(), None);
    assert_eq!(model.encode(p, r, 10, Overflow::Truncate).unwrap(), None, "not even the prompt fits");
}

/// A template that never closes the user turn the way ArmoRM expects is an
/// error naming the cause, not a score read at a wrong position.
#[test]
fn armorm_needs_the_end_of_user_turn() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-armorm");
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    let template = dir.path().join("other.jinja");
    std::fs::write(&template, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}").unwrap();
    let model =
        RewardModel::load(dir.path(), None, None, &Load { chat_template: Some(&template), ..Load::default() }).unwrap();
    let ids = model.encode("Hi", "Hello", 512, Overflow::Truncate).unwrap().unwrap();
    let err = model.score(&[&ids]).unwrap_err();
    assert!(format!("{err:#}").contains("end of the user turn"), "{err:#}");
}
