//! Numeric guards: a model whose outputs are not finite is an error naming
//! the model and the row, never a silent token or a silent tie.

mod common;

use candle_core::{Device, Tensor};
use common::*;

/// A copy of a fixture model with one tensor set to NaN.
fn poisoned(p: &Project, fixture: &str, tensor: &str) -> String {
    let dir = p.path(&format!("nan-{fixture}"));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join(fixture)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let t = &tensors[tensor];
    let nan = Tensor::full(f32::NAN, t.shape(), &Device::Cpu).unwrap();
    tensors.insert(tensor.to_string(), nan);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    dir.display().to_string()
}

fn error_line(run: &Run) -> String {
    assert_ne!(run.code(), Some(0), "{}", run.stderr());
    let err = run.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_string()
}

#[test]
fn a_non_finite_logit_is_an_error_naming_the_model_and_the_prompt() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "");
    let model = poisoned(&p, "tiny-llama3", "model.norm.weight");
    let run = p.prefgen(&["run", r.to_str().unwrap(), "generate", "--set", &format!("generate.model={model}")]);
    let line = error_line(&run);
    assert!(line.contains(&format!("generate.model {model}")), "{line}");
    assert!(line.contains("non-finite logit (NaN) at token 0 of the response to \"Question number 0?\""), "{line}");
    assert!(!p.path("out/output_1.json").exists(), "nothing is written for a failed node");
}

#[test]
fn a_non_finite_score_is_an_error_naming_the_model_and_the_row() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "");
    let model = poisoned(&p, "tiny-armorm", "regression_layer.weight");
    let run = p.prefgen(&["run", r.to_str().unwrap(), "--set", &format!("annotate.model={model}")]);
    let line = error_line(&run);
    assert!(line.contains(&format!("annotate.model {model}")), "{line}");
    assert!(line.contains("non-finite score (NaN) for response 1 of \"Question number"), "{line}");
    assert!(!p.path("out/all_outputs_rm.json").exists(), "nothing is written for a failed node");
}
