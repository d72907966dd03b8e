//! Parity with `transformers` (CPU, f32) on tiny random-weight models of the
//! real architectures, made by `scripts/make_fixtures.py
//! llama3|gemma2|qwen2|qwen3|mistral`: real config fields scaled down
//! (Llama-3.1 rope scaling; Gemma-2 soft-capping, sliding window shorter than
//! the longer prompts, query_pre_attn_scalar; Qwen2's q/k/v biases and tied
//! embeddings; Qwen3's q/k norms and head_dim; Mistral's sliding window), a
//! trained BPE tokenizer with the family's special tokens and chat template.
//! Each new family's feature is shown to matter: switched off in a copy of
//! the fixture, some greedy text changes. The Qwen2, Qwen3 and Mistral
//! fixtures are also converted to GGUF by llama.cpp's own converter, and
//! those files pass the same test.

use prefgen::infer::engine::{self, Job, Outcome};
use prefgen::infer::sampler::{Sampling, Stream};
use prefgen::infer::{Load, Policy};
use serde_json::Value;
use std::path::Path;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Template text, token ids, last-position logits (within 1e-4) and 32
/// greedy tokens of every prompt, decoded one at a time and all in one batch.
fn matches_transformers(name: &str) {
    model_matches_transformers(&format!("tiny-{name}"), name);
}

/// The same for the fixture `model` (a folder, or a `.gguf` file run
/// dequantized) against `tiny-{reference}-reference.json`.
fn model_matches_transformers(model: &str, reference: &str) {
    let load = Load { dequantize: true, ..Load::default() };
    let policy = Policy::load(&fixtures().join(model), &load).unwrap();
    let path = fixtures().join(format!("tiny-{reference}-reference.json"));
    let r: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let mut prompts = Vec::new();
    let mut worst = 0f32;
    for case in cases {
        let text = policy.chat.format_prompt(case["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "chat template");
        let ids = policy.chat.encode(&text, false).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(ids, want, "tokens of {text:?}");
        let vllm: Vec<u32> = serde_json::from_value(case["vllm_input_ids"].clone()).unwrap();
        assert_eq!(policy.chat.encode(&text, true).unwrap(), vllm, "vLLM-compatible tokens of {text:?}");
        if vllm.len() > ids.len() {
            assert_eq!(vllm[0], vllm[1], "a second BOS");
        }
        let mut cache = policy.model.new_cache();
        let logits = policy.model.forward(&[&ids], &mut [&mut cache]).unwrap().to_vec2::<f32>().unwrap().remove(0);
        let want: Vec<f32> = serde_json::from_value(case["logits"].clone()).unwrap();
        assert_eq!(logits.len(), want.len());
        for (a, b) in logits.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
        prompts.push(ids);
    }
    eprintln!("{model}: largest last-position logit difference: {worst:e}");
    assert!(worst <= 1e-4, "last-position logits differ by up to {worst:e}");
    // One at a time, then every prompt together, prompts of different
    // lengths in one batch.
    for batch in [1, 8] {
        let jobs = prompts.iter().map(|p| Job { prompt: p.clone(), stream: Stream::new(0, "") }).collect();
        for (case, got) in cases.iter().zip(greedy(&policy, &r, jobs, batch)) {
            assert_eq!(
                got,
                Outcome::Done(expected(&policy, case)),
                "batch {batch}: greedy tokens for {:?}",
                case["prompt"]
            );
        }
    }
}

/// The reference's greedy tokens of a case, as prefgen returns them:
/// transformers keeps the stop token in the sequence; prefgen does not.
fn expected(policy: &Policy, case: &Value) -> Vec<u32> {
    let mut want: Vec<u32> = serde_json::from_value(case["generated"].clone()).unwrap();
    if want.last().is_some_and(|t| policy.chat.stop.contains(t)) {
        want.pop();
    }
    want
}

fn greedy(policy: &Policy, r: &Value, jobs: Vec<Job>, batch: usize) -> Vec<Outcome> {
    let greedy = Sampling { temperature: 0.0, top_p: 1.0 };
    engine::generate(policy, jobs, greedy, r["max_new_tokens"].as_u64().unwrap() as usize, batch, |_| {}).unwrap()
}

/// The fixture `tiny-{name}` copied, changed by `switch_off` (its feature
/// switched off in the copy's config or weights), greedy-decodes some
/// prompt differently from transformers' reference: the fixture exercises
/// the feature, so a loader that ignored it would fail the parity test.
fn feature_changes_greedy_text(name: &str, switch_off: impl Fn(&Path)) {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(format!("tiny-{name}"))).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    switch_off(tmp.path());
    let policy = Policy::load(tmp.path(), &Load::default()).unwrap();
    let path = fixtures().join(format!("tiny-{name}-reference.json"));
    let r: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    let jobs = cases
        .iter()
        .map(|c| Job { prompt: serde_json::from_value(c["input_ids"].clone()).unwrap(), stream: Stream::new(0, "") })
        .collect();
    let changed = cases
        .iter()
        .zip(greedy(&policy, &r, jobs, 8))
        .filter(|(case, got)| *got != Outcome::Done(expected(&policy, case)))
        .count();
    eprintln!("{name}: {changed} of {} greedy texts change with the feature off", cases.len());
    assert!(changed > 0, "{name}: the feature switched off changes no greedy text");
}

/// Edits a copy's config.json.
fn edit_config(dir: &Path, edit: impl Fn(&mut Value)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

#[test]
fn tiny_qwen2_matches_transformers() {
    matches_transformers("qwen2");
}

#[test]
fn tiny_qwen3_matches_transformers() {
    matches_transformers("qwen3");
}

#[test]
fn tiny_mistral_matches_transformers() {
    matches_transformers("mistral");
}

/// The tiny Qwen2 as llama.cpp's converter writes it (`qwen2`: q/k/v
/// biases as `attn_{q,k,v}.bias`, the tied head left out, rotated halves),
/// with its tokenizer (Qwen2's split rules) and chat template from the file.
#[test]
fn tiny_qwen2_gguf_matches_transformers() {
    model_matches_transformers("tiny-qwen2.gguf", "qwen2");
}

/// The tiny Qwen2 converted to Q8_0 and run as users run GGUF files:
/// quantized, in prefgen's int8 kernels (activations quantized too, as
/// llama.cpp does). The last-position logits move by up to ~0.2 (of ~4)
/// from transformers' f32 ones (0.19 of it is the weights' rounding:
/// transformers on the file's dequantized weights moves as much), enough to
/// change some of the 32 greedy tokens of a tiny random model (its top-1
/// margins are ~1e-3), but the next token is transformers' on at least 6 of
/// 8 prompts (7 measured), and batch 8 gives batch 1's tokens.
#[test]
fn tiny_qwen2_q8_0_gguf_runs_quantized() {
    let policy = Policy::load(&fixtures().join("tiny-qwen2.q8_0.gguf"), &Load::default()).unwrap();
    let r: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tiny-qwen2-reference.json")).unwrap()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    let ids: Vec<Vec<u32>> = cases.iter().map(|c| serde_json::from_value(c["input_ids"].clone()).unwrap()).collect();
    let argmax = |v: &[f32]| (0..v.len()).fold(0, |m, i| if v[i] > v[m] { i } else { m });
    let (mut worst, mut same_top) = (0f32, 0);
    for (case, ids) in cases.iter().zip(&ids) {
        let mut cache = policy.model.new_cache();
        let got = policy.model.forward(&[ids], &mut [&mut cache]).unwrap().to_vec2::<f32>().unwrap().remove(0);
        let want: Vec<f32> = serde_json::from_value(case["logits"].clone()).unwrap();
        worst = got.iter().zip(&want).fold(worst, |w, (a, b)| w.max((a - b).abs()));
        same_top += usize::from(argmax(&got) == argmax(&want));
    }
    eprintln!("qwen2 Q8_0: largest logit difference {worst:e}; next token as transformers' on {same_top} of 8");
    assert!(worst < 0.5, "logits differ by up to {worst:e}");
    assert!(same_top >= 6, "the next token is transformers' on only {same_top} prompts");
    let jobs = || ids.iter().map(|p| Job { prompt: p.clone(), stream: Stream::new(0, "") }).collect();
    assert_eq!(greedy(&policy, &r, jobs(), 1), greedy(&policy, &r, jobs(), 8), "batch 8 against batch 1");
}

/// `qwen3`: q/k norms as `attn_{q,k}_norm`, head_dim as `key_length`.
#[test]
fn tiny_qwen3_gguf_matches_transformers() {
    model_matches_transformers("tiny-qwen3.gguf", "qwen3");
}

/// Mistral converted by llama.cpp is a `llama` file without the sliding
/// window (the converter leaves `sliding_window` out): it matches
/// transformers' Mistral with `sliding_window` null, as v0.3 has it.
#[test]
fn tiny_mistral_gguf_matches_transformers_without_its_window() {
    model_matches_transformers("tiny-mistral.gguf", "mistral-gguf");
}

/// Qwen2's q/k/v biases, zeroed in the copy's weights.
#[test]
fn qwen2_biases_change_greedy_text() {
    feature_changes_greedy_text("qwen2", |dir| {
        let path = dir.join("model.safetensors");
        let mut weights = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        for (name, w) in weights.iter_mut().filter(|(name, _)| name.ends_with("_proj.bias")) {
            assert!(name.contains("self_attn"));
            *w = w.zeros_like().unwrap();
        }
        candle_core::safetensors::save(&weights, &path).unwrap();
    });
}

/// Qwen3's q/k norms: the copy read as Llama (same shapes, same head_dim,
/// no q/k norms).
#[test]
fn qwen3_qk_norms_change_greedy_text() {
    feature_changes_greedy_text("qwen3", |dir| {
        edit_config(dir, |c| c["architectures"] = serde_json::json!(["LlamaForCausalLM"]))
    });
}

/// Mistral's sliding window, set to null in the copy's config.
#[test]
fn mistral_sliding_window_changes_greedy_text() {
    feature_changes_greedy_text("mistral", |dir| edit_config(dir, |c| c["sliding_window"] = Value::Null));
}

#[test]
fn tiny_gemma3_matches_transformers() {
    matches_transformers("gemma3");
}

/// Llama-3.2 as its 1B and 3B ship: embeddings tied, and no lm_head.weight
/// in the safetensors.
#[test]
fn tiny_llama32_matches_transformers() {
    let weights = fixtures().join("tiny-llama32/model.safetensors");
    let names = candle_core::safetensors::load(weights, &candle_core::Device::Cpu).unwrap();
    assert!(!names.contains_key("lm_head.weight"), "the head is the embedding, as in the real checkpoints");
    matches_transformers("llama32");
}

/// The tiny Gemma-3 as llama.cpp's converter writes it (`gemma3`: norms
/// with Gemma's 1 folded in, q/k norms as `attn_{q,k}_norm`, the sliding
/// layers' base as `rope.freq_base_swa`, the tied head left out), with its
/// tokenizer (byte-level BPE) and chat template from the file. The file
/// records neither `layer_types` nor `query_pre_attn_scalar`; it matches
/// transformers' model as llama.cpp reads such a file: every 6th layer full
/// (none of 3) and scores scaled by head_dim.
#[test]
fn tiny_gemma3_gguf_matches_transformers() {
    model_matches_transformers("tiny-gemma3.gguf", "gemma3-gguf");
}

/// A Gemma GGUF file's `{arch}.attention.sliding_window_pattern`, read as
/// llama.cpp reads it: a flag per layer, or n (every n-th layer full; 0:
/// none). The tiny Gemma-3 file (3 layers, window 8) has no such key, and
/// every layer slides: flags all set, n = 0 and n = 6 keep its reference's
/// logits; the third layer full, as flags or as n = 3, moves them, the two
/// alike; flags for too few layers are refused, naming the key.
#[test]
fn gemma3_gguf_sliding_window_pattern_is_read_as_llama_cpp_reads_it() {
    use candle_core::Device;
    use candle_core::quantized::{QTensor, gguf_file};
    use gguf_file::Value as V;
    use prefgen::infer::gguf::GgufFile;
    use prefgen::infer::models::decoder::Decoder;

    let mut file = std::fs::File::open(fixtures().join("tiny-gemma3.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| (name.clone(), content.tensor(&mut file, name, &Device::Cpu).unwrap()))
        .collect();
    let r: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tiny-gemma3-gguf-reference.json")).unwrap()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny-gemma3-pattern.gguf");
    let logits_with = |pattern: V| -> anyhow::Result<Vec<Vec<f32>>> {
        let key = ("gemma3.attention.sliding_window_pattern", &pattern);
        let meta: Vec<(&str, &V)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).chain([key]).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut std::fs::File::create(&path)?, &meta, &refs)?;
        let model = Decoder::from_gguf(&GgufFile::open(&path)?, &Device::Cpu, true)?;
        let mut all = Vec::new();
        for case in cases {
            let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone())?;
            all.push(model.forward(&[&ids], &mut [&mut model.new_cache()])?.to_vec2::<f32>()?.remove(0));
        }
        Ok(all)
    };
    let worst = |got: &[Vec<f32>], want: &dyn Fn(usize) -> Vec<f32>| -> f32 {
        got.iter().enumerate().fold(0f32, |w, (i, g)| g.iter().zip(want(i)).fold(w, |w, (a, b)| w.max((a - b).abs())))
    };
    let reference = |i: usize| -> Vec<f32> { serde_json::from_value(cases[i]["logits"].clone()).unwrap() };
    let flags = |f: &[bool]| V::Array(f.iter().map(|&b| V::Bool(b)).collect());
    for (what, pattern) in [("flags all set", flags(&[true; 3])), ("n = 0", V::U32(0)), ("n = 6", V::U32(6))] {
        let diff = worst(&logits_with(pattern).unwrap(), &reference);
        assert!(diff <= 1e-4, "{what}: every layer slides, as without the key, but the logits moved by {diff:e}");
    }
    let (by_flags, by_n) = (logits_with(flags(&[true, true, false])).unwrap(), logits_with(V::U32(3)).unwrap());
    assert_eq!(by_flags, by_n, "the third layer full, as flags and as n = 3");
    let moved = worst(&by_flags, &reference);
    assert!(moved > 1e-3, "a full third layer should move the logits, moved {moved:e}");
    let err = logits_with(flags(&[true, true])).unwrap_err().to_string();
    assert!(err.contains("gemma3.attention.sliding_window_pattern has 2 flags for 3 layers"), "{err}");
}

/// The tiny Llama-3.2 as llama.cpp's converter writes it (`llama`: q and k
/// permuted, the rope factor 32 as `rope_freqs.weight`, no `output.weight`).
#[test]
fn tiny_llama32_gguf_matches_transformers() {
    model_matches_transformers("tiny-llama32.gguf", "llama32");
}

/// gemma-3-4b, 12b and 27b ship as `Gemma3ForConditionalGeneration`: the
/// text model's config under `text_config` and its weights beside the
/// vision tower's, under `model.language_model.` (as transformers 5 writes
/// them) or `language_model.model.` (as the hub's files were first
/// written). The tiny Gemma-3 laid out either way gives transformers'
/// logits and greedy tokens.
#[test]
fn gemma3_text_model_of_a_multimodal_folder_matches_transformers() {
    use candle_core::{Device, Tensor};
    let src = fixtures().join("tiny-gemma3");
    for prefix in ["model.language_model.", "language_model.model."] {
        let tmp = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        }
        edit_config(tmp.path(), |c| {
            let mut text = c.clone();
            text.as_object_mut().unwrap().remove("architectures");
            text["model_type"] = serde_json::json!("gemma3_text");
            *c = serde_json::json!({
                "architectures": ["Gemma3ForConditionalGeneration"],
                "model_type": "gemma3",
                "text_config": text,
                "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
            });
        });
        let path = tmp.path().join("model.safetensors");
        let weights = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let mut moved: std::collections::HashMap<String, Tensor> = weights
            .into_iter()
            .map(|(name, w)| (format!("{prefix}{}", name.strip_prefix("model.").unwrap()), w))
            .collect();
        let vision = if prefix.starts_with("model.") { "model.vision_tower" } else { "vision_tower" };
        moved.insert(
            format!("{vision}.vision_model.post_layernorm.weight"),
            Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&moved, &path).unwrap();
        model_matches_transformers(tmp.path().to_str().unwrap(), "gemma3");
    }
}

/// Gemma-3's sliding layers' own rope base (10000), set to the full
/// layers' (1e6) in the copy's config.
#[test]
fn gemma3_local_rope_base_changes_greedy_text() {
    feature_changes_greedy_text("gemma3", |dir| {
        edit_config(dir, |c| c["rope_parameters"]["sliding_attention"]["rope_theta"] = serde_json::json!(1e6))
    });
}

/// Gemma-3's sliding/full layer pattern: every layer full in the copy.
#[test]
fn gemma3_sliding_layers_change_greedy_text() {
    feature_changes_greedy_text("gemma3", |dir| {
        edit_config(dir, |c| c["layer_types"] = serde_json::json!(vec!["full_attention"; 3]))
    });
}

/// Linear rope scaling on Gemma-3's full layer (the 4B and up), removed in
/// the copy.
#[test]
fn gemma3_linear_rope_scaling_changes_greedy_text() {
    feature_changes_greedy_text("gemma3", |dir| {
        edit_config(dir, |c| c["rope_parameters"]["full_attention"] = serde_json::json!({"rope_theta": 1e6}))
    });
}

/// Llama-3.2's rope scaling factor 32, made Llama-3.1's 8 in the copy.
#[test]
fn llama32_rope_factor_changes_greedy_text() {
    feature_changes_greedy_text("llama32", |dir| {
        edit_config(dir, |c| c["rope_parameters"]["factor"] = serde_json::json!(8.0))
    });
}

#[test]
fn tiny_llama3_matches_transformers() {
    matches_transformers("llama3");
}

#[test]
fn tiny_gemma2_matches_transformers() {
    matches_transformers("gemma2");
}

/// Sampled responses of a dense (f32) model at batch sizes 1, 3, 8 and 32:
/// the linear layers see a different number of rows at each, and a BLAS
/// kernel would sum in another order and so, some hundreds of tokens in,
/// pick another token. prefgen's row-exact kernel does not: the SimPO
/// fixture's 49 prompts, 4 seeds, 300 tokens at temperature 1, identical.
#[test]
fn dense_sampled_responses_do_not_depend_on_batch_size() {
    for name in ["llama3", "gemma2"] {
        sampled_responses_do_not_depend_on_batch_size(name, 49, &[13, 21, 42, 79], &[3, 8, 32]);
    }
}

/// The same for the other families, on fewer prompts: their q/k/v biases,
/// q/k norms and sliding windows run per sequence too.
#[test]
fn every_family_samples_the_same_at_any_batch_size() {
    for name in ["qwen2", "qwen3", "mistral"] {
        sampled_responses_do_not_depend_on_batch_size(name, 12, &[13, 42], &[5, 24]);
    }
}

/// `n` of the SimPO fixture's prompts under each seed, 300 tokens at
/// temperature 1, decoded one at a time and at each of `batches`.
fn sampled_responses_do_not_depend_on_batch_size(name: &str, n: usize, seeds: &[u64], batches: &[usize]) {
    let set = prefgen::stages::prompts::build(&[fixtures().join("simpo/prompts.jsonl")], &Default::default()).unwrap();
    let mut prompts: Vec<String> = prefgen::formats::simpo::parse_rows(&set.files[0].1, "prompts").unwrap();
    assert!(prompts.len() >= n);
    prompts.truncate(n);
    let policy = Policy::load(&fixtures().join(format!("tiny-{name}")), &Load::default()).unwrap();
    let run = |batch: usize| {
        let jobs = seeds
            .iter()
            .flat_map(|&seed| prompts.iter().map(move |p| (seed, p)))
            .map(|(seed, prompt)| {
                let ids = policy.chat.encode(&policy.chat.format_prompt(prompt).unwrap(), false).unwrap();
                Job { prompt: ids, stream: Stream::new(seed, prompt) }
            })
            .collect();
        engine::generate(&policy, jobs, Sampling { temperature: 1.0, top_p: 1.0 }, 300, batch, |_| {}).unwrap()
    };
    let one = run(1);
    let tokens: usize = one
        .iter()
        .map(|o| match o {
            engine::Outcome::Done(ids) => ids.len(),
            engine::Outcome::TooLong => 0,
        })
        .sum();
    let least = n * seeds.len() * 100;
    assert!(tokens > least, "{name}: responses long enough to show a difference ({tokens} tokens)");
    for &batch in batches {
        assert!(one == run(batch), "{name}: batch 1 vs {batch}");
    }
}

/// The tiny Llama-3.1 as llama.cpp's converter writes it to GGUF: q and k
/// permuted for interleaved rotary pairs, the `rope_scaling` stored as
/// per-frequency divisors in `rope_freqs.weight` (computed here as the
/// converter computes them), weights in f32. Loaded from that file, the
/// last-position logits match transformers' on the safetensors model; the
/// same file without `rope_freqs.weight` does not.
#[test]
fn llama31_gguf_rope_freqs_match_transformers() {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use candle_core::{Device, Tensor};
    use prefgen::infer::gguf::GgufFile;
    use prefgen::infer::models::decoder::Decoder;

    let dir = fixtures().join("tiny-llama3");
    let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let r: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tiny-llama3-reference.json")).unwrap()).unwrap();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let n = |k: &str| config[k].as_u64().unwrap() as usize;
    let (n_head, n_kv, head_dim, layers) =
        (n("num_attention_heads"), n("num_key_value_heads"), n("head_dim"), n("num_hidden_layers"));
    let rope = &config["rope_parameters"];
    let f = |k: &str| rope[k].as_f64().unwrap() as f32;
    let (base, factor, low, high, old) = (
        f("rope_theta"),
        f("factor"),
        f("low_freq_factor"),
        f("high_freq_factor"),
        f("original_max_position_embeddings"),
    );
    let rope_freqs: Vec<f32> = (0..head_dim / 2)
        .map(|i| {
            let wavelen = 2.0 * std::f32::consts::PI / (1.0 / base.powf((2 * i) as f32 / head_dim as f32));
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    // The converter's permute: rows of each head as (2, head_dim / 2), swapped.
    let permute = |w: &Tensor, heads: usize| {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((heads, 2, rows / heads / 2, cols)).unwrap().transpose(1, 2).unwrap().reshape((rows, cols)).unwrap()
    };
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), weights["model.embed_tokens.weight"].clone()),
        ("output_norm.weight".into(), weights["model.norm.weight"].clone()),
        ("output.weight".into(), weights["lm_head.weight"].clone()),
    ];
    for i in 0..layers {
        let w = |name: &str| weights[&format!("model.layers.{i}.{name}.weight")].clone();
        tensors.extend([
            (format!("blk.{i}.attn_norm.weight"), w("input_layernorm")),
            (format!("blk.{i}.ffn_norm.weight"), w("post_attention_layernorm")),
            (format!("blk.{i}.attn_q.weight"), permute(&w("self_attn.q_proj"), n_head)),
            (format!("blk.{i}.attn_k.weight"), permute(&w("self_attn.k_proj"), n_kv)),
            (format!("blk.{i}.attn_v.weight"), w("self_attn.v_proj")),
            (format!("blk.{i}.attn_output.weight"), w("self_attn.o_proj")),
            (format!("blk.{i}.ffn_gate.weight"), w("mlp.gate_proj")),
            (format!("blk.{i}.ffn_up.weight"), w("mlp.up_proj")),
            (format!("blk.{i}.ffn_down.weight"), w("mlp.down_proj")),
        ]);
    }
    use gguf_file::Value as V;
    let metadata = [
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(layers as u32)),
        ("llama.context_length", V::U32(n("max_position_embeddings") as u32)),
        ("llama.embedding_length", V::U32(n("hidden_size") as u32)),
        ("llama.attention.head_count", V::U32(n_head as u32)),
        ("llama.attention.head_count_kv", V::U32(n_kv as u32)),
        ("llama.rope.dimension_count", V::U32(head_dim as u32)),
        ("llama.rope.freq_base", V::F32(base)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(config["rms_norm_eps"].as_f64().unwrap() as f32)),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let worst_with = |rope_freqs: Option<&[f32]>| -> f32 {
        let mut all = tensors.clone();
        if let Some(freqs) = rope_freqs {
            all.push(("rope_freqs.weight".into(), Tensor::new(freqs, &Device::Cpu).unwrap()));
        }
        let quantized: Vec<(String, QTensor)> =
            all.iter().map(|(name, t)| (name.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap())).collect();
        let path = tmp.path().join("tiny-llama31.gguf");
        let mut out = std::fs::File::create(&path).unwrap();
        let meta: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let refs: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut out, &meta, &refs).unwrap();
        drop(out);
        let model = Decoder::from_gguf(&GgufFile::open(&path).unwrap(), &Device::Cpu, true).unwrap();
        let mut worst = 0f32;
        for case in r["cases"].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
            let want: Vec<f32> = serde_json::from_value(case["logits"].clone()).unwrap();
            let got =
                model.forward(&[&ids], &mut [&mut model.new_cache()]).unwrap().to_vec2::<f32>().unwrap().remove(0);
            worst = got.iter().zip(&want).fold(worst, |w, (a, b)| w.max((a - b).abs()));
        }
        worst
    };
    let worst = worst_with(Some(&rope_freqs));
    eprintln!("GGUF with rope_freqs: largest last-position logit difference {worst:e}");
    assert!(worst <= 1e-4, "logits differ by up to {worst:e}");
    let unscaled = worst_with(None);
    assert!(unscaled > 1e-3, "without rope_freqs the logits should move, moved {unscaled:e}");
}

/// Forty 300-token prompts at batch 40 exceed one step's token budget, so
/// some wait a step to join: every response is still there and the same as
/// at batch 1.
#[test]
fn prompts_over_a_steps_token_budget_join_later_unchanged() {
    let policy = Policy::load(&fixtures().join("tiny-llama3"), &Load::default()).unwrap();
    let jobs = || -> Vec<Job> {
        (0..40u32)
            .map(|i| Job {
                prompt: (0..300u32).map(|j| (i * 7 + j * 13) % 600).collect(),
                stream: Stream::new(7, &i.to_string()),
            })
            .collect()
    };
    let sampling = Sampling { temperature: 1.0, top_p: 0.95 };
    let all = engine::generate(&policy, jobs(), sampling, 4, 40, |_| {}).unwrap();
    assert!(all.iter().all(|o| matches!(o, Outcome::Done(t) if !t.is_empty())));
    assert_eq!(all, engine::generate(&policy, jobs(), sampling, 4, 1, |_| {}).unwrap());
}
