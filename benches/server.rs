//! `make bench`: `prefgen run RECIPE` end to end with the built-in engine
//! and through llama.cpp's `llama-server` (built by `scripts/llama-cpp.sh`
//! from the llama-cpp-python sdist's source), started by hand and launched
//! by prefgen itself (`generate.launch`, `annotate.launch`): the same
//! SmolLM2 GGUF, the machine's threads, MT-Bench's first-turn questions, each
//! run into a fresh cache.
//!
//! Generation: 64 new tokens at temperature 0.8 and top-p 0.95; prompts/s and
//! generated tokens/s (the responses' tokens, counted by re-encoding them,
//! the same way for every row) include loading the model, and for a launched
//! server its start-up, which is also shown alone (prefgen's "answers after").
//! A hand-started server's start is not counted. Each server setting runs
//! twice, so the table also says whether it gave the same bytes twice.
//!
//! The judge: SmolLM2 rating the responses of two seeds, in-process and
//! through a launched llama-server; responses/s and judged tokens/s (the
//! judge prompt's ids, as the in-process judge encodes them).

#[path = "../tests/common/llama_server.rs"]
mod llama_server;

use llama_server::{LlamaServer, Shape};
use prefgen::infer::chat::Chat;
use prefgen::infer::reward::{Kind, Overflow, RewardModel};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const PROMPTS: usize = 32;
const MAX_TOKENS: usize = 64;
/// The in-process judge's batch.
const JUDGE_BATCH: usize = 8;

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
    let shape = |slots| Shape { slots, threads, context: 2048 };

    println!("\n`prefgen run` generate, SmolLM2-135M-Instruct Q4_1, {threads} threads, {PROMPTS} prompts x 1 seed\n");
    println!("| engine | setting | seconds | of which start-up | prompts/s | generated tokens/s | same bytes twice |");
    println!("|---|---|---|---|---|---|---|");
    for batch in [8usize, 32] {
        let mut run = Run::new(&model, &prompts, &[13], &format!("batch_size = {batch}"));
        let secs = run.time(&["generate"]);
        row("prefgen built-in", &format!("batch_size {batch}"), secs, "-", run.generated(&chat), "yes (tested)");
    }
    for slots in [1usize, 8] {
        let mut server = LlamaServer::start(&model, free_port(), shape(slots));
        let extra = format!("server = \"http://127.0.0.1:{}/v1\"\nconcurrency = {slots}", server.port);
        let (mut first, mut second) =
            (Run::new(&model, &prompts, &[13], &extra), Run::new(&model, &prompts, &[13], &extra));
        let secs = first.time(&["generate"]);
        second.time(&["generate"]);
        let setting = format!("hand-started, {slots} slot(s), {slots} in flight");
        row("llama-server", &setting, secs, "-", first.generated(&chat), first.same_decode(&second));
        server.kill();
    }
    let slots = 8;
    let extra = format!("launch = \"{}\"\nconcurrency = {slots}", shape(slots).launch_command());
    let (mut first, mut second) =
        (Run::new(&model, &prompts, &[13], &extra), Run::new(&model, &prompts, &[13], &extra));
    let secs = first.time(&["generate"]);
    second.time(&["generate"]);
    let setting = format!("launched by prefgen, {slots} slots, {slots} in flight");
    let start = format!("{:.1}", first.start_up());
    row("llama-server", &setting, secs, &start, first.generated(&chat), first.same_decode(&second));

    println!("\n`prefgen run` annotate, the SmolLM2 judge on {PROMPTS} prompts x 2 seeds, {threads} threads\n");
    println!("| judge | setting | seconds | of which start-up | responses/s | judged tokens/s |");
    println!("|---|---|---|---|---|---|");
    let judge = RewardModel::load(&model, Some(Kind::Judge), None, &Default::default()).expect("the judge loads");
    let mut run = Run::new(&model, &prompts, &[13, 21], "batch_size = 32");
    run.time(&["generate"]);
    let secs = run.time(&["annotate"]);
    let (responses, tokens) = run.judged(&judge);
    judge_row("in-process", &format!("batch_size {JUDGE_BATCH}"), secs, "-", responses, tokens);
    let launch = format!("annotate.launch={}", shape(slots).launch_command());
    // All the digits' log-probabilities, as the in-process judge reads them
    // (llama-server answers up to any count; hosted APIs stop at 20).
    let served =
        ["--set", &launch, "--set", &format!("annotate.concurrency={slots}"), "--set", "annotate.top_logprobs=1000"];
    let secs = run.time(&[&["annotate"][..], &served].concat());
    let start = format!("{:.1}", run.start_up());
    judge_row("llama-server", &format!("launched by prefgen, {slots} slots"), secs, &start, responses, tokens);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn row(engine: &str, setting: &str, secs: f64, start: &str, tokens: usize, same: &str) {
    println!(
        "| {engine} | {setting} | {secs:.1} | {start} | {:.2} | {:.1} | {same} |",
        PROMPTS as f64 / secs,
        tokens as f64 / secs
    );
}

fn judge_row(judge: &str, setting: &str, secs: f64, start: &str, responses: usize, tokens: usize) {
    println!(
        "| {judge} | {setting} | {secs:.1} | {start} | {:.2} | {:.0} |",
        responses as f64 / secs,
        tokens as f64 / secs
    );
}

/// A recipe in a scratch folder with its own cache: the prompts, the
/// SmolLM2 policy (`extra` lines in `[generate]`) and the SmolLM2 judge.
struct Run {
    dir: tempfile::TempDir,
    /// The last run's standard error.
    stderr: String,
}

impl Run {
    fn new(model: &Path, prompts: &[String], seeds: &[u64], extra: &str) -> Run {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("prompts.jsonl"), prompts.join("\n")).unwrap();
        let recipe = format!(
            "name = \"bench\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"{m}\"\nseeds = {seeds:?}\n\
             temperature = 0.8\ntop_p = 0.95\nmax_tokens = {MAX_TOKENS}\nshard_size = {PROMPTS}\n{extra}\n\
             [annotate]\nmodel = \"{m}\"\nkind = \"judge\"\nbatch_size = {JUDGE_BATCH}\nshard_size = {n}\n[export]\ndir = \"out\"\n",
            m = model.display(),
            n = PROMPTS * seeds.len(),
        );
        std::fs::write(dir.path().join("bench.toml"), recipe).unwrap();
        Run { dir, stderr: String::new() }
    }

    /// Seconds one `prefgen run bench.toml ARGS` takes.
    fn time(&mut self, args: &[&str]) -> f64 {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_prefgen"))
            .args(["run", "bench.toml"])
            .args(args)
            .current_dir(self.dir.path())
            .env("PREFGEN_CACHE", self.dir.path().join("cache"))
            .output()
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        self.stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{}", self.stderr);
        secs
    }

    /// The seconds the last run's launched server took to answer.
    fn start_up(&self) -> f64 {
        let line =
            self.stderr.lines().find_map(|l| l.split(" answers after ").nth(1)).expect("a launched server answered");
        line.trim_end_matches('s').parse().expect("prefgen prints the seconds")
    }

    fn decode(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("out/output_13.json")).unwrap()
    }

    fn same_decode(&self, other: &Run) -> &'static str {
        if self.decode() == other.decode() { "yes" } else { "no" }
    }

    /// The generated tokens of seed 13, re-encoded.
    fn generated(&self, chat: &Chat) -> usize {
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&self.decode()).unwrap();
        rows.iter().map(|r| chat.encode(r["generated_text"].as_str().unwrap(), false).unwrap().len()).sum()
    }

    /// How many responses the judge rated, and their prompt ids in all.
    fn judged(&self, judge: &RewardModel) -> (usize, usize) {
        let bytes = std::fs::read(self.dir.path().join("out/all_outputs_rm.json")).unwrap();
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
        let none = Default::default();
        let encoded: Vec<usize> = rows
            .iter()
            .flat_map(|r| {
                let prompt = r["prompt"].as_str().unwrap().to_string();
                let responses = r["all_generated_responses"].as_array().unwrap().clone();
                responses.into_iter().map(move |t| (prompt.clone(), t.as_str().unwrap().to_string()))
            })
            .map(|(p, t)| {
                judge.encode(&p, &t, usize::MAX, Overflow::Truncate, &none).unwrap().map_or(0, |ids| ids.len())
            })
            .collect();
        (encoded.len(), encoded.iter().sum())
    }
}
