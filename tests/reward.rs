//! Reward-model parity with `transformers` (CPU, f32) on tiny random-weight
//! models made by `scripts/make_fixtures.py reward`: an ArmoRM (Llama-3-shaped
//! backbone, regression layer, 3-layer gating network, transform matrix, pad
//! id outside the vocabulary) scored as the published modeling file scores,
//! a sequence classifier of each family (`LlamaForSequenceClassification`,
//! Qwen2, Qwen3, Gemma-2, Mistral), and the judge on each family's causal
//! fixture. 17 conversations of different lengths, multi-line, unicode and an
//! empty response among them.

use prefgen::infer::Load;
use prefgen::infer::reward::{DEFAULT_RUBRIC, JUDGE_PRIMER, Kind, Overflow, RewardModel};
use prefgen::infer::template::Kwargs;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference(file: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join(file)).unwrap()).unwrap()
}

fn fixture(name: &str) -> (RewardModel, Vec<Value>) {
    let model = RewardModel::load(&fixtures().join(format!("tiny-{name}")), None, None, &Load::default()).unwrap();
    (model, reference(&format!("tiny-{name}-reference.json"))["cases"].as_array().unwrap().clone())
}

/// The fixture `tiny-{name}`, of the kind its config.json says, scores as
/// its reference does (see [`scores_match`]).
fn matches_transformers(name: &str, kind: Kind) -> RewardModel {
    let (model, cases) = fixture(name);
    assert_eq!(model.kind, kind, "detected from config.json");
    scores_match(name, &model, &cases, &[1, 2, 3, 7]);
    model
}

/// Inputs equal transformers' `apply_chat_template` tokens; scores within
/// 1e-4 of the reference, all conversations in one batch, and bit for bit
/// the same in batches of each of `sizes`.
fn scores_match(name: &str, model: &RewardModel, cases: &[Value], sizes: &[usize]) {
    assert!(cases.len() >= 16);
    let seqs: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            let (p, r) = (c["prompt"].as_str().unwrap(), c["response"].as_str().unwrap());
            let ids = model.encode(p, r, model.context(), Overflow::Truncate, &Kwargs::new()).unwrap().unwrap();
            let want: Vec<u32> = serde_json::from_value(c["input_ids"].clone()).unwrap();
            assert_eq!(ids, want, "{name}: tokens of {p:?} / {r:?}");
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
    for &size in sizes {
        let chunked: Vec<f64> = all.chunks(size).flat_map(|c| model.score(c).unwrap()).collect();
        let same = chunked.iter().zip(&batch).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: batches of {size} score otherwise than one batch");
    }
    eprintln!("{name}: largest score difference {worst:e}");
    assert!(worst <= 1e-4, "{name}: scores differ by up to {worst:e}");
}

/// A classifier of another family scores as transformers does, and a
/// conversation followed by pad tokens (as a right-padded batch holds it)
/// scores as transformers pools it: at the last token that is not the pad
/// id.
fn classifier_matches_transformers(family: &str) {
    let name = format!("{family}-classifier");
    let model = matches_transformers(&name, Kind::Classifier);
    for case in reference(&format!("tiny-{name}-reference.json"))["padded"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let got = model.score(&[&ids]).unwrap()[0];
        let want = case["score"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-4, "{name}: a padded conversation scores {got}, transformers {want}");
    }
}

#[test]
fn armorm_matches_transformers() {
    matches_transformers("armorm", Kind::Armorm);
}

#[test]
fn llama_classifier_matches_transformers() {
    matches_transformers("classifier", Kind::Classifier);
}

/// Bias on q/k/v, pad id `<|endoftext|>`.
#[test]
fn qwen2_classifier_matches_transformers() {
    classifier_matches_transformers("qwen2");
}

/// No pad id (`pad_token_id: null`): the last token.
#[test]
fn qwen3_classifier_matches_transformers() {
    classifier_matches_transformers("qwen3");
}

/// config.json without `pad_token_id`: Gemma-2's default (0) pools. Scores
/// near 8-24, where the final soft-cap (30, the LM head's) would move them.
#[test]
fn gemma2_classifier_matches_transformers() {
    classifier_matches_transformers("gemma2");
}

/// The pad id is the eos that the template writes after every response:
/// the score is read at the token before it, in a batch of different lengths.
#[test]
fn mistral_classifier_reads_the_token_before_the_trailing_pad() {
    let r = reference("tiny-mistral-classifier-reference.json");
    let pad = r["pad_token_id"].as_u64().unwrap();
    let ends =
        r["cases"].as_array().unwrap().iter().filter(|c| c["input_ids"].as_array().unwrap().last().unwrap() == pad);
    assert_eq!(ends.count(), r["cases"].as_array().unwrap().len(), "every conversation ends in the pad id");
    classifier_matches_transformers("mistral");
}

/// The judge on each causal family's fixture: the rubric's tokens and the
/// expected rating as transformers' logits give them, in one batch and in
/// batches of 7 (the rubric makes every conversation long: batches of 1, 2
/// and 3 are left to the classifiers, whose backbone is the same).
#[test]
fn judge_matches_transformers_on_every_family() {
    let r = reference("judge-reference.json");
    assert_eq!(r["rubric"], DEFAULT_RUBRIC, "scripts/make_fixtures.py's rubric is prefgen's");
    assert_eq!(r["primer"], JUDGE_PRIMER);
    let families = r["families"].as_object().unwrap();
    assert_eq!(families.len(), 6);
    for (family, cases) in families {
        let model =
            RewardModel::load(&fixtures().join(format!("tiny-{family}")), None, None, &Load::default()).unwrap();
        assert_eq!(model.kind, Kind::Judge, "{family}: a causal LM is a judge");
        scores_match(&format!("{family} judge"), &model, cases.as_array().unwrap(), &[7]);
    }
}

/// A conversation over the length limit is cut from the right of the
/// response (and still scores), or skipped.
#[test]
fn long_conversations_are_truncated_or_skipped() {
    let (model, cases) = fixture("armorm");
    let (p, r) = (cases[9]["prompt"].as_str().unwrap(), cases[9]["response"].as_str().unwrap());
    let full = model.encode(p, r, usize::MAX, Overflow::Truncate, &Kwargs::new()).unwrap().unwrap();
    let limit = full.len() - 5;
    let cut = model.encode(p, r, limit, Overflow::Truncate, &Kwargs::new()).unwrap().unwrap();
    assert!(cut.len() <= limit && cut.len() > limit - 8, "{} tokens for a limit of {limit}", cut.len());
    assert_eq!(cut[..20], full[..20], "the prompt is kept");
    assert!(model.score(&[&cut]).unwrap()[0].is_finite());
    assert_eq!(model.encode(p, r, limit, Overflow::Skip, &Kwargs::new()).unwrap(), None);
    assert_eq!(model.encode(p, r, 10, Overflow::Truncate, &Kwargs::new()).unwrap(), None, "not even the prompt fits");
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
    let ids = model.encode("Hi", "Hello", 512, Overflow::Truncate, &Kwargs::new()).unwrap().unwrap();
    let err = model.score(&[&ids]).unwrap_err();
    assert!(format!("{err:#}").contains("end of the user turn"), "{err:#}");
}

/// A sequence classifier is not a judge, even where its tied embeddings
/// would pass for an LM head (Gemma-2, small Qwen2): an error naming the
/// key, not ratings from the embedding matrix.
#[test]
fn a_classifier_cannot_be_the_judge() {
    let dir = fixtures().join("tiny-gemma2-classifier");
    let err = RewardModel::load(&dir, Some(Kind::Judge), None, &Load::default()).err().expect("refused");
    assert!(
        format!("{err:#}").contains("annotate.kind") && format!("{err:#}").contains("sequence classifier"),
        "{err:#}"
    );
}

/// The judge's template variables reach its template: Qwen3's
/// `enable_thinking = false` writes the empty thinking block before the
/// primed rating, and the judge reads the rating after it.
#[test]
fn template_kwargs_reach_the_judge() {
    let model = RewardModel::load(&fixtures().join("tiny-qwen3"), None, None, &Load::default()).unwrap();
    let off = Kwargs::from([("enable_thinking".to_string(), false.into())]);
    let encode = |kwargs: &Kwargs| model.encode("Hi", "Hello", 512, Overflow::Truncate, kwargs).unwrap().unwrap();
    let (default, switched) = (encode(&Kwargs::new()), encode(&off));
    let block = model_chat_ids("<think>\n\n</think>\n\nRating:");
    assert!(switched.ends_with(&block), "no empty thinking block before the rating");
    assert!(!default.ends_with(&block));
    let scores = model.score(&[&default, &switched]).unwrap();
    assert_ne!(scores[0], scores[1], "the judge read the same prompt");
}

/// Ids of `text` under the tiny Qwen3's tokenizer.
fn model_chat_ids(text: &str) -> Vec<u32> {
    let chat = prefgen::infer::chat::Chat::load(&fixtures().join("tiny-qwen3"), None).unwrap();
    chat.encode(text, false).unwrap()
}
