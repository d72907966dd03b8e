//! `make bench`: `prefgen run RECIPE generate` end to end, with the built-in
//! engine and through llama.cpp's `llama-server` (built by
//! `scripts/llama-cpp.sh` from the llama-cpp-python sdist's source): the same
//! SmolLM2 GGUF, the machine's threads, MT-Bench's first-turn questions, 64
//! new tokens at temperature 0.8 and top-p 0.95, each run into a fresh cache.
//! Prompts/s and generated tokens/s (the responses' tokens, counted by
//! re-encoding them, the same way for every row) include loading the model;
//! the server's own start is not counted. Each server setting runs twice, so
//! the table also says whether it gave the same bytes twice.

#[path = "../tests/common/llama_server.rs"]
mod llama_server;

use llama_server::{LlamaServer, Shape};
use prefgen::infer::chat::Chat;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const PROMPTS: usize = 32;
const MAX_TOKENS: usize = 64;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let chat = Chat::load(&model, None).expect("run `make models` first");
    let questions = std::fs::read_to_string(root.join("benches/data/mt_bench_questions.jsonl")).expect("benches/data");
    let prompts: Vec<String> = questions
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|q| q["turns"][0].as_str().map(|t| serde_json::json!({ "prompt": t }).to_string()))
        .take(PROMPTS)
        .collect();
    let built = Command::new(root.join("scripts/llama-cpp.sh")).arg("llama-server").current_dir(root).status();
    assert!(built.is_ok_and(|s| s.success()), "llama-server could not be built (scripts/llama-cpp.sh llama-server)");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\n`prefgen run` generate, SmolLM2-135M-Instruct Q4_1, {threads} threads, {PROMPTS} prompts x 1 seed\n");
    println!("| engine | setting | seconds | prompts/s | generated tokens/s | same bytes twice |");
    println!("|---|---|---|---|---|---|");
    for batch in [8usize, 32] {
        let (secs, tokens, _) = run(&model, &chat, &prompts, &format!("batch_size = {batch}"));
        row("prefgen built-in", &format!("batch_size {batch}"), secs, tokens, "yes (tested)");
    }
    for slots in [1usize, 8] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = LlamaServer::start(&model, port, Shape { slots, threads, context: 2048 });
        let extra = format!("server = \"http://127.0.0.1:{}/v1\"\nconcurrency = {slots}", server.port);
        let (secs, tokens, first) = run(&model, &chat, &prompts, &extra);
        let (_, _, second) = run(&model, &chat, &prompts, &extra);
        let same = if first == second { "yes" } else { "no" };
        row("llama-server", &format!("{slots} slot(s), {slots} in flight"), secs, tokens, same);
        server.kill();
    }
}

fn row(engine: &str, setting: &str, secs: f64, tokens: usize, same: &str) {
    println!(
        "| {engine} | {setting} | {secs:.1} | {:.2} | {:.1} | {same} |",
        PROMPTS as f64 / secs,
        tokens as f64 / secs
    );
}

/// One `prefgen run RECIPE generate` into a fresh cache: seconds, generated
/// tokens, and the decode file's bytes.
fn run(model: &Path, chat: &Chat, prompts: &[String], extra: &str) -> (f64, usize, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prompts.jsonl"), prompts.join("\n")).unwrap();
    let recipe = format!(
        "name = \"bench\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"{m}\"\nseeds = [13]\n\
         temperature = 0.8\ntop_p = 0.95\nmax_tokens = {MAX_TOKENS}\nshard_size = {PROMPTS}\n{extra}\n\
         [annotate]\nmodel = \"{m}\"\nkind = \"judge\"\n[export]\ndir = \"out\"\n",
        m = model.display()
    );
    std::fs::write(dir.path().join("bench.toml"), recipe).unwrap();
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_prefgen"))
        .args(["run", "bench.toml", "generate"])
        .current_dir(dir.path())
        .env("PREFGEN_CACHE", dir.path().join("cache"))
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(dir.path().join("out/output_13.json")).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
    let tokens = rows.iter().map(|r| chat.encode(r["generated_text"].as_str().unwrap(), false).unwrap().len()).sum();
    (secs, tokens, bytes)
}
