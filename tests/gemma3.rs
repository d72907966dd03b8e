//! The Gemma-3 GGUF model path (q/k norms, local and global rotary bases,
//! five-in-six sliding layers; its tokenizer is tested in `infer.rs`) on
//! the real Gemma-3 270M Q4_K_M file, against `transformers`' own GGUF
//! loaders (`scripts/make_fixtures.py gemma3`, weights dequantized to f32).

use prefgen::infer::engine::{self, Job, Outcome};
use prefgen::infer::sampler::{Sampling, Stream};
use prefgen::infer::{Load, Policy};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn model() -> PathBuf {
    let model = root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(model.is_file(), "{} is missing: run `make models`", model.display());
    model
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(root().join("tests/fixtures/gemma3_reference.json")).unwrap()).unwrap()
}

/// Prompt tokens, the top-20 last-position logits and 16 greedy tokens of
/// every prompt, all prompts decoded in one batch. With the weights run in
/// f32 (dequantized) prefgen computes what transformers computes: logits
/// within 1e-4, greedy tokens identical. As quantized matmuls (the default,
/// which quantize activations to Q8 as llama.cpp does) the top token after
/// every prompt still agrees and the logits stay within 1.0.
fn matches_transformers(dequantize: bool) {
    let dir = tempfile::tempdir().unwrap();
    // The base model has no chat template; a plain one makes prompts raw text.
    let template = dir.path().join("raw.jinja");
    std::fs::write(&template, "{{ messages[0]['content'] }}").unwrap();
    let policy =
        Policy::load(&model(), &Load { chat_template: Some(&template), dequantize, ..Load::default() }).unwrap();
    let r = reference();
    let cases = r["generation"].as_array().unwrap();
    let (mut worst, mut jobs) = (0f32, Vec::new());
    for case in cases {
        let text = policy.chat.format_prompt(case["prompt"].as_str().unwrap()).unwrap();
        let ids = policy.chat.encode(&text, true).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(ids, want, "tokens of {text:?}");
        let mut cache = policy.model.new_cache();
        let logits = policy.model.forward(&[&ids], &mut [&mut cache]).unwrap().to_vec2::<f32>().unwrap().remove(0);
        let top: Vec<usize> = serde_json::from_value(case["top_ids"].clone()).unwrap();
        let values: Vec<f32> = serde_json::from_value(case["top_logits"].clone()).unwrap();
        let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        assert_eq!(best, top[0], "top token after {text:?}");
        for (&id, &v) in top.iter().zip(&values) {
            worst = worst.max((logits[id] - v).abs());
        }
        jobs.push(Job { prompt: ids, stream: Stream::new(0, "") });
    }
    eprintln!("gemma3 (dequantize: {dequantize}): largest top-20 logit difference {worst:e}");
    assert!(worst <= if dequantize { 1e-4 } else { 1.0 }, "logits differ by up to {worst:e}");
    if dequantize {
        let greedy = Sampling { temperature: 0.0, top_p: 1.0 };
        let out = engine::generate(&policy, jobs, greedy, 16, 4, |_| {}).unwrap();
        for (case, got) in cases.iter().zip(out) {
            let want: Vec<u32> = serde_json::from_value(case["generated"].clone()).unwrap();
            assert_eq!(got, Outcome::Done(want), "greedy tokens after {:?}", case["prompt"]);
        }
    }
}

#[test]
fn gemma3_gguf_dequantized_matches_transformers() {
    matches_transformers(true);
}

#[test]
fn gemma3_gguf_quantized_stays_close() {
    matches_transformers(false);
}

#[test]
fn base_model_without_template_needs_one() {
    let err = Policy::load(&model(), &Load::default()).err().expect("a base model without a template is refused");
    assert!(format!("{err:#}").contains("set generate.chat_template"), "{err:#}");
}
