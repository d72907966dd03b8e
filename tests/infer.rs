//! Tokenizer and chat-template parity with `transformers`, on references made
//! by `scripts/make_fixtures.py smollm2|gemma3` (transformers' own GGUF
//! tokenizer converter and `apply_chat_template`).

use prefgen::infer::gguf::GgufFile;
use prefgen::infer::template::{ChatTemplate, Turn};
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
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(model);
    assert!(model.is_file(), "{} is missing: run `make models`", model.display());
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
    tokenizer_matches("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2_reference.json", 10);
}

/// Gemma's sentencepiece vocabulary: merges recovered from the vocabulary
/// order, byte fallback, whitespace-run tokens, BOS added.
#[test]
fn gemma3_tokenizer_matches_transformers() {
    tokenizer_matches("gemma-3-270m-q4_k_m.gguf", "gemma3_reference.json", 15);
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
        )
        .unwrap();
        let msgs: Vec<Turn> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Turn { role: m["role"].as_str().unwrap(), content: m["content"].as_str().unwrap() })
            .collect();
        let got = t.render(&msgs, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{name} on {:?}", case["messages"]);
    }
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
