//! The prefgen side of the GPU check (`scripts/gpucheck`, `make gpu-check`)
//! as it runs there, so it cannot rot between GPU sessions: `prefgen infer
//! generate | score | bench` on the tiny fixtures, in f32 and in bf16 (the
//! GPU's tensor ops, here with the CPU's kernels), against the committed
//! transformers references; and the folder that is copied to the GPU machine.

mod common;

use common::{Project, fixtures};
use serde_json::{Value, json};

fn read(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The summary a command prints: one JSON object on stdout.
fn summary(run: &common::Run) -> Value {
    serde_json::from_str(run.stdout().trim()).unwrap_or_else(|e| panic!("{e}: {}", run.stdout()))
}

fn worst(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |w, (x, y)| w.max((x - y).abs()))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Token ids, last-position logits and 32 greedy tokens of the parity
/// prompts: in f32 as transformers' (logits within 1e-4, every token); in
/// bf16 the same prompts' ids, and logits within bf16's reach of them
/// (transformers' own bf16 lands 0.14 and 0.19 away on these models).
#[test]
fn infer_generate_matches_the_transformers_references() {
    let p = Project::new();
    for name in ["llama3", "gemma2"] {
        let reference = read(&fixtures().join(format!("tiny-{name}-reference.json")));
        let cases = reference["cases"].as_array().unwrap();
        let prompts: String = cases.iter().map(|c| format!("{}\n", json!({"prompt": c["prompt"]}))).collect();
        let prompts = p.write("prompts.jsonl", &prompts);
        let model = fixtures().join(format!("tiny-{name}"));
        let stop = read(&model.join("generation_config.json"))["eos_token_id"].clone();
        for dtype in ["f32", "bf16"] {
            let out = p.path(&format!("{name}-{dtype}.jsonl"));
            let run = p.ok(&[
                "infer",
                "generate",
                model.to_str().unwrap(),
                prompts.to_str().unwrap(),
                "--dtype",
                dtype,
                "--logits",
                "--max-tokens",
                "32",
                "--batch-size",
                "8",
                "--out",
                out.to_str().unwrap(),
            ]);
            let s = summary(&run);
            assert!(s["engine"].as_str().unwrap().contains(&format!("cpu {dtype}")), "{s}");
            let rows = lines(&out);
            assert_eq!(rows.len(), cases.len());
            let mut largest = 0f64;
            for (case, row) in cases.iter().zip(&rows) {
                assert_eq!(row["prompt"], case["prompt"]);
                assert_eq!(row["input_ids"], case["input_ids"], "{name} {dtype}: token ids");
                largest = largest.max(worst(&floats(&case["logits"]), &floats(&row["logits"])));
                if dtype == "f32" {
                    let mut want = case["generated"].as_array().unwrap().clone();
                    if want.last().is_some_and(|t| stop.as_array().unwrap().contains(t)) {
                        want.pop();
                    }
                    assert_eq!(row["output_ids"], Value::Array(want), "{name}: greedy tokens of {}", case["prompt"]);
                }
            }
            eprintln!("{name} {dtype}: largest logit difference from transformers' f32: {largest:e}");
            let bound = if dtype == "f32" { 1e-4 } else { 0.4 };
            assert!(largest <= bound, "{name} {dtype}: logits differ by {largest:e}");
        }
    }
}

/// ArmoRM's scores of the fixture's conversations: f32 within 1e-4 of
/// transformers', bf16 within 0.1.
#[test]
fn infer_score_matches_the_transformers_reference() {
    let p = Project::new();
    let reference = read(&fixtures().join("tiny-armorm-reference.json"));
    let cases = reference["cases"].as_array().unwrap();
    let rows: Vec<Value> =
        cases.iter().map(|c| json!({"prompt": c["prompt"], "all_generated_responses": [c["response"]]})).collect();
    let input = p.write("all_outputs.json", &serde_json::to_string(&rows).unwrap());
    let want: Vec<f64> = cases.iter().map(|c| c["score"].as_f64().unwrap()).collect();
    for (dtype, bound) in [("f32", 1e-4), ("bf16", 0.1)] {
        let out = p.path(&format!("rm-{dtype}.json"));
        let model = fixtures().join("tiny-armorm");
        let args = [model.to_str().unwrap(), input.to_str().unwrap(), "--dtype", dtype, "--batch-size", "5"];
        let run = p.ok(&[&["infer", "score"][..], &args, &["--out", out.to_str().unwrap()]].concat());
        let s = summary(&run);
        assert_eq!(s["sequences"], cases.len());
        let got: Vec<f64> = read(&out)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["all_generated_responses"].as_array().unwrap().len(), 1);
                r["all_rm_scores"][0].as_f64().unwrap()
            })
            .collect();
        let w = worst(&want, &got);
        eprintln!("armorm {dtype}: largest score difference from transformers' f32: {w:e}");
        assert!(w <= bound, "armorm {dtype}: scores differ by {w:e}");
    }
}

/// Every random prompt runs to --output-len new tokens at each batch size,
/// end of turn or not, in both dtypes.
#[test]
fn infer_bench_runs_every_row_to_length() {
    let p = Project::new();
    let model = fixtures().join("tiny-llama3");
    for dtype in ["f32", "bf16"] {
        let run = p.ok(&[
            "infer",
            "bench",
            model.to_str().unwrap(),
            "--dtype",
            dtype,
            "--batch-size",
            "3",
            "--batch-size",
            "5",
            "--input-len",
            "20",
            "--output-len",
            "120",
        ]);
        let runs = summary(&run)["runs"].as_array().unwrap().clone();
        assert_eq!(runs.len(), 2);
        for (r, batch) in runs.iter().zip([3, 5]) {
            assert_eq!(r["batch_size"], batch);
            assert_eq!(r["generated_tokens"], batch * 120, "{dtype}: {r}");
            assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        }
    }
    let too_long = p.prefgen(&["infer", "bench", model.to_str().unwrap(), "--input-len", "500", "--output-len", "20"]);
    assert_eq!(too_long.code(), Some(1));
    assert!(too_long.stderr().contains("exceed") && too_long.stderr().contains("512"), "{}", too_long.stderr());
}

/// The folder copied to the GPU machine holds the gzipped binary, the
/// scripts, the fixtures and the prompt sets, under the 64 MiB a device
/// run carries; its run.sh unpacks the binary and reaches check.py.
#[test]
fn the_gpu_check_folder_holds_what_the_gpu_machine_runs() {
    let p = Project::new();
    let gz = p.path("prefgen.gz");
    let sh = |cmd: &str| {
        let out = std::process::Command::new("bash").args(["-c", cmd]).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    sh(&format!("strip -o {0}.bin {1} && gzip -1 -c {0}.bin > {0}", gz.display(), env!("CARGO_BIN_EXE_prefgen")));
    let root = env!("CARGO_MANIFEST_DIR");
    let folder = p.path("gpu-check");
    let said = sh(&format!("{root}/scripts/gpucheck/pack.sh {} {}", gz.display(), folder.display()));
    assert!(said.contains("bash gpu-check/run.sh OUT_DIR"), "{said}");
    for f in [
        "prefgen.gz",
        "run.sh",
        "gpucheck/check.py",
        "gpucheck/reference.py",
        "gpucheck/armorm.py",
        "fixtures/tiny-llama3/model.safetensors",
        "fixtures/tiny-gemma2/tokenizer.json",
        "fixtures/tiny-armorm/config.json",
        "fixtures/tiny-llama3-reference.json",
        "fixtures/tiny-armorm-reference.json",
        "data/mt_bench_questions.jsonl",
    ] {
        assert!(folder.join(f).is_file(), "the folder lacks {f}");
    }
    let size: u64 = sh(&format!("du -sbL {}", folder.display())).split_whitespace().next().unwrap().parse().unwrap();
    assert!(size < 64 << 20, "{size} bytes");
    // run.sh unpacks prefgen and hands its options to check.py.
    let help = sh(&format!("bash {}/run.sh {}/report --help", folder.display(), p.path("").display()));
    assert!(help.contains("--tiny") && help.contains("--budget-s"), "{help}");
    let version = sh(&format!("{}/prefgen --version", folder.display()));
    assert!(version.starts_with("prefgen "), "{version}");
}

/// A user's mistakes get one message naming the file and line, or the key.
#[test]
fn infer_names_what_is_wrong() {
    let p = Project::new();
    let model = fixtures().join("tiny-llama3");
    let bad = p.write("prompts.jsonl", "{\"prompt\": \"Hi\"}\n{\"text\": \"no prompt\"}\n");
    let run = p.prefgen(&[
        "infer",
        "generate",
        model.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--out",
        p.path("out.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(run.code(), Some(1));
    assert!(run.stderr().contains("prompts.jsonl:2: no \"prompt\" string"), "{}", run.stderr());
    assert!(!p.path("out.jsonl").exists(), "nothing written on an error");
    let gguf = p.write("model.gguf", "not a gguf");
    let run = p.prefgen(&[
        "infer",
        "generate",
        gguf.to_str().unwrap(),
        p.write("ok.jsonl", "{\"prompt\": \"Hi\"}\n").to_str().unwrap(),
        "--dtype",
        "bf16",
        "--out",
        p.path("out.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(run.code(), Some(1));
    assert!(run.stderr().contains("model.gguf"), "{}", run.stderr());
}
