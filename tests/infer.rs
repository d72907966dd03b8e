//! Tokenizer and chat-template parity with `transformers`, on references made
//! by `scripts/make_fixtures.py smollm2|gemma3|templates` (transformers' own
//! GGUF tokenizer converter and `apply_chat_template`, with its keyword
//! arguments) and `qwen2|qwen3|mistral` (the hub tokenizers of GGUF files
//! llama.cpp's converter wrote), and the int8 kernels' parity with their
//! scalar reference on the real models' weights.

use prefgen::infer::gguf::GgufFile;
use prefgen::infer::template::{ChatTemplate, Kwargs, Turn};
use serde_json::Value;
use std::path::Path;

fn reference() -> Value {
    fixture("smollm2_reference.json")
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The tokenizer rebuilt from a GGUF file's metadata encodes and decodes
/// every reference string as transformers' GGUF loader does (and, where the
/// reference has them, adds the same special tokens).
fn tokenizer_matches(model: &str, reference: &str, min_cases: usize) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join(model);
    assert!(model.is_file(), "{} is missing (models/: run `make models`)", model.display());
    let tok = GgufFile::open(&model).unwrap().tokenizer().unwrap();
    let cases = fixture(reference)["tokenizer"].as_array().unwrap().clone();
    assert!(cases.len() >= min_cases);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "ids of {text:?}");
        assert_eq!(tok.decode(&got, true).unwrap(), case["decoded"].as_str().unwrap(), "decoding {text:?}");
        if let Some(with) = case.get("with_specials") {
            let with: Vec<u32> = serde_json::from_value(with.clone()).unwrap();
            assert_eq!(tok.encode(text, true).unwrap().get_ids(), with, "ids of {text:?} with special tokens");
        }
    }
}

#[test]
fn gguf_tokenizer_matches_transformers() {
    tokenizer_matches("models/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2_reference.json", 10);
}

/// Gemma's sentencepiece vocabulary: merges recovered from the vocabulary
/// order, byte fallback, whitespace-run tokens, BOS added.
#[test]
fn gemma3_tokenizer_matches_transformers() {
    tokenizer_matches("models/gemma-3-270m-q4_k_m.gguf", "gemma3_reference.json", 15);
}

/// The tiny Qwen2, Qwen3 and Mistral as llama.cpp's converter writes them
/// (`scripts/make_fixtures.py qwen2|qwen3|mistral`), against their hub
/// tokenizers: Qwen's single-digit split and NFC (`tokenizer.ggml.pre =
/// qwen2`), GPT-2's split and BOS added for Mistral, special tokens inside
/// text, composed and decomposed unicode.
#[test]
fn converted_tokenizers_match_transformers() {
    for name in ["qwen2", "qwen3", "mistral"] {
        tokenizer_matches(&format!("tests/fixtures/tiny-{name}.gguf"), &format!("tiny-{name}-reference.json"), 25);
    }
}

#[test]
fn chat_templates_render_as_transformers() {
    let r = reference();
    let renders = r["renders"].as_array().unwrap();
    for family in ["smollm2", "llama3", "gemma2"] {
        assert!(renders.iter().any(|x| x["template"] == family), "no {family} cases");
    }
    for case in renders {
        let name = case["template"].as_str().unwrap();
        let specials = &r["specials"][name];
        let t = ChatTemplate::new(
            r["templates"][name].as_str().unwrap(),
            specials[0].as_str().unwrap(),
            specials[1].as_str().unwrap(),
            format!("the {name} template"),
        )
        .unwrap();
        let msgs = turns(&case["messages"]);
        let got = t.render(&msgs, case["add_generation_prompt"].as_bool().unwrap(), &Kwargs::new()).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{name} on {:?}", case["messages"]);
    }
}

/// A reference's `[{"role", "content"}]` list.
fn turns(messages: &Value) -> Vec<Turn<'_>> {
    let turns = messages.as_array().unwrap().iter();
    turns.map(|m| Turn { role: m["role"].as_str().unwrap(), content: m["content"].as_str().unwrap() }).collect()
}

/// Template switches (`enable_thinking`) render and tokenize as transformers'
/// `apply_chat_template(..., enable_thinking=...)` does, on a Qwen3-style
/// template (a namespace, a reversed walk, string methods, `break`, the
/// reasoning split of assistant turns): unset leaves the template's default,
/// and `false` changes the generation prompt's ids.
#[test]
fn template_kwargs_render_as_transformers() {
    let r = fixture("template-kwargs-reference.json");
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("qwen3-style.jinja");
    std::fs::write(&template, r["template"].as_str().unwrap()).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(r["tokenizer"].as_str().unwrap());
    let chat = prefgen::infer::chat::Chat::load(&model, Some(&template)).unwrap();
    let mut switched = 0;
    let mut default_ids = None;
    for case in r["cases"].as_array().unwrap() {
        let msgs = turns(&case["messages"]);
        let kwargs: Kwargs = serde_json::from_value(case["kwargs"].clone()).unwrap();
        let generation = case["add_generation_prompt"].as_bool().unwrap();
        let text = chat.render(&msgs, generation, &kwargs).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{kwargs:?} on {:?}", case["messages"]);
        let ids = chat.encode(&text, false).unwrap();
        assert_eq!(ids, serde_json::from_value::<Vec<u32>>(case["ids"].clone()).unwrap(), "ids of {text:?}");
        if kwargs.is_empty() {
            default_ids = Some(ids);
        } else if generation && kwargs["enable_thinking"] == false {
            switched += usize::from(default_ids.as_ref() != Some(&ids));
        }
    }
    assert!(switched >= 4, "enable_thinking = false changed the prompt ids of only {switched} conversations");
}

/// Response text is decoded as transformers decodes it, under each
/// `clean_up_tokenization_spaces` setting of `tokenizer_config.json` (it
/// cleans a BPE tokenizer's text only when forced), and a response cut
/// inside a UTF-8 sequence ends in U+FFFD (`make_fixtures.py decode`).
#[test]
fn decoding_follows_transformers() {
    let reference = fixture("decode-reference.json");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama3");
    let cases = reference["cases"].as_array().unwrap();
    let mut cleaned = 0;
    let mut cut = 0;
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        let path = dir.path().join("tokenizer_config.json");
        let mut config: serde_json::Map<String, Value> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config.extend(case["config"].as_object().unwrap().clone());
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        let policy = prefgen::infer::Policy::load(dir.path(), &Default::default()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let want = case["text"].as_str().unwrap();
        assert_eq!(policy.chat.decode(&ids).unwrap(), want, "under {}", case["config"]);
        cleaned += usize::from(want.contains("world."));
        cut += usize::from(want.ends_with('\u{fffd}'));
    }
    assert!(cleaned > 0 && cut > 0, "the reference has cleaned-up and cut cases");
}

/// Every int8 kernel this CPU runs gives the scalar reference's bits on
/// the real SmolLM2 and Gemma-3 files: the smallest tensor of each packed
/// type they hold, against activations with the spread of a hidden state.
/// A kernel this CPU cannot run is named on the terminal.
#[test]
fn int8_kernels_compute_the_reference_bits_on_real_weights() {
    use prefgen::infer::qmatmul::{Kernel, PackedMatrix};
    use std::io::Write;
    let kernels: Vec<Kernel> = Kernel::ALL.into_iter().filter(|k| k.runs_here()).collect();
    for k in Kernel::ALL.iter().filter(|k| !kernels.contains(k)) {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the real-weights kernel test on {}: this CPU lacks its instructions",
            k.name()
        );
    }
    let mut checked = Vec::new();
    for model in ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(model);
        assert!(path.is_file(), "{} is missing: run `make models`", path.display());
        let file = GgufFile::open(&path).unwrap();
        let mut smallest = std::collections::BTreeMap::new();
        for (name, info) in &file.content.tensor_infos {
            let dims = info.shape.dims();
            if dims.len() == 2 && PackedMatrix::packs(info.ggml_dtype) {
                let size = dims[0] * dims[1];
                let entry = smallest.entry(format!("{:?}", info.ggml_dtype)).or_insert((size, name.clone()));
                // Ties by name: the same tensor on every run.
                if (size, name) < (entry.0, &entry.1) {
                    *entry = (size, name.clone());
                }
            }
        }
        assert!(!smallest.is_empty(), "{model}: no tensor of a packed type");
        let mut reader = std::fs::File::open(&path).unwrap();
        for (dtype, (_, name)) in smallest {
            let t = file.content.tensor(&mut reader, &name, &candle_core::Device::Cpu).unwrap();
            let (n, k) = t.shape().dims2().unwrap();
            let m = 5;
            // Hidden-state-like rows: mostly small, a few large outliers.
            let x: Vec<f32> = (0..m * k)
                .map(|i| {
                    let v = ((i as f32 * 0.618).fract() - 0.5) * 2.0;
                    if i % 97 == 0 { v * 40.0 } else { v }
                })
                .collect();
            let run = |kernel| {
                let p = PackedMatrix::new(&t, kernel).unwrap().expect("a packed type");
                let mut out = vec![0.0; m * n];
                p.matmul(&x, &mut out);
                out
            };
            let want = run(Kernel::Scalar);
            for &kernel in &kernels {
                let got = run(kernel);
                let differ = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
                assert_eq!(
                    differ,
                    0,
                    "{model} {name} ({dtype}): {} differs from the reference in {differ} outputs",
                    kernel.name()
                );
            }
            checked.push(format!("{model} {name} ({dtype}, {n}x{k})"));
        }
    }
    // The two files hold these types; a packing that stopped taking one
    // would otherwise pass unnoticed.
    for dtype in ["Q4_1", "Q8_0", "Q5_0", "Q4K", "Q6K"] {
        let tag = format!("({dtype}, ");
        assert!(checked.iter().any(|c| c.contains(&tag)), "no {dtype} tensor was checked: {checked:?}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "int8 kernels {:?} checked on: {}",
        kernels.iter().map(|k| k.name()).collect::<Vec<_>>(),
        checked.join("; ")
    );
}
