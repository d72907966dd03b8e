//! Tokenizer and chat-template parity with `transformers`, on references made
//! by `scripts/make_fixtures.py smollm2` (transformers' own GGUF tokenizer
//! converter and `apply_chat_template`).

use prefgen::infer::gguf::GgufFile;
use prefgen::infer::template::{ChatTemplate, Turn};
use serde_json::Value;
use std::path::Path;

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn gguf_tokenizer_matches_transformers() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `make models`", model.display());
    let tok = GgufFile::open(&model).unwrap().tokenizer().unwrap();
    let cases = reference()["tokenizer"].as_array().unwrap().clone();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "ids of {text:?}");
        assert_eq!(tok.decode(&got, true).unwrap(), case["decoded"].as_str().unwrap(), "decoding {text:?}");
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
