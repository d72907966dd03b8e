//! Parity with `transformers` (CPU, f32) on tiny random-weight models of the
//! real architectures, made by `scripts/make_fixtures.py llama3|gemma2`: real
//! config fields scaled down (Llama-3.1 rope scaling; Gemma-2 soft-capping,
//! sliding window shorter than the longer prompts, query_pre_attn_scalar),
//! a trained BPE tokenizer with the family's special tokens and chat template.

use prefgen::infer::engine::{self, Job, Outcome};
use prefgen::infer::sampler::{Sampling, Stream};
use prefgen::infer::{Load, Policy};
use serde_json::Value;
use std::path::Path;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Template text, token ids, last-position logits (within 1e-4) and 32
/// greedy tokens of every prompt, all prompts decoded in one batch.
fn matches_transformers(name: &str) {
    let policy = Policy::load(&fixtures().join(format!("tiny-{name}")), &Load::default()).unwrap();
    let path = fixtures().join(format!("tiny-{name}-reference.json"));
    let r: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let mut jobs = Vec::new();
    let mut worst = 0f32;
    for case in cases {
        let text = policy.format_prompt(case["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "chat template");
        let ids = policy.encode(&text, false).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(ids, want, "tokens of {text:?}");
        let vllm: Vec<u32> = serde_json::from_value(case["vllm_input_ids"].clone()).unwrap();
        assert_eq!(policy.encode(&text, true).unwrap(), vllm, "vLLM-compatible tokens of {text:?}");
        assert_eq!(vllm[0], vllm[1], "a second BOS");
        let mut cache = policy.model.new_cache();
        let logits = policy.model.forward(&[&ids], &mut [&mut cache]).unwrap().to_vec2::<f32>().unwrap().remove(0);
        let want: Vec<f32> = serde_json::from_value(case["logits"].clone()).unwrap();
        assert_eq!(logits.len(), want.len());
        for (a, b) in logits.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
        jobs.push(Job { prompt: ids, stream: Stream::new(0, "") });
    }
    eprintln!("{name}: largest last-position logit difference: {worst:e}");
    assert!(worst <= 1e-4, "last-position logits differ by up to {worst:e}");
    // Every prompt decoded together, prompts of different lengths in one batch.
    let greedy = Sampling { temperature: 0.0, top_p: 1.0 };
    let out =
        engine::generate(&policy, jobs, greedy, r["max_new_tokens"].as_u64().unwrap() as usize, 8, |_| {}).unwrap();
    for (case, got) in cases.iter().zip(out) {
        let mut want: Vec<u32> = serde_json::from_value(case["generated"].clone()).unwrap();
        // transformers keeps the stop token in the sequence; prefgen does not.
        if want.last().is_some_and(|t| policy.stop.contains(t)) {
            want.pop();
        }
        assert_eq!(got, Outcome::Done(want), "greedy tokens for {:?}", case["prompt"]);
    }
}

#[test]
fn tiny_llama3_matches_transformers() {
    matches_transformers("llama3");
}

#[test]
fn tiny_gemma2_matches_transformers() {
    matches_transformers("gemma2");
}

/// Sampled responses of a dense (f32) model at batch sizes 1, 3 and 8: the
/// linear layers' matmuls see a different number of rows, which could change
/// float sums and so tokens; they do not here, on this CPU's kernels.
#[test]
fn dense_sampled_responses_do_not_depend_on_batch_size() {
    for name in ["llama3", "gemma2"] {
        let policy = Policy::load(&fixtures().join(format!("tiny-{name}")), &Load::default()).unwrap();
        let path = fixtures().join(format!("tiny-{name}-reference.json"));
        let r: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let run = |batch: usize| {
            let jobs = r["cases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let prompt = c["prompt"].as_str().unwrap();
                    let ids = policy.encode(&policy.format_prompt(prompt).unwrap(), false).unwrap();
                    Job { prompt: ids, stream: Stream::new(42, prompt) }
                })
                .collect();
            engine::generate(&policy, jobs, Sampling { temperature: 1.0, top_p: 0.95 }, 48, batch, |_| {}).unwrap()
        };
        let one = run(1);
        assert_eq!(one, run(3), "{name}: batch 1 vs 3");
        assert_eq!(one, run(8), "{name}: batch 1 vs 8");
    }
}
