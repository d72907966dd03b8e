//! Generation through a real inference server: llama.cpp's `llama-server`
//! (built by `scripts/llama-cpp.sh` from the source the llama-cpp-python
//! sdist vendors) serving the SmolLM2 GGUF on 127.0.0.1 with 2 threads, with
//! a test-only proxy in front (`tests/openai_proxy.py`) that records what
//! the server received and answers 503 to some requests.

mod common;

use common::llama_server::{LlamaServer, Shape};
use common::proxy::Proxy;
use common::*;
use prefgen::infer::chat::Chat;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const PROMPTS: [&str; 6] = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Give me a word that rhymes with cat.",
    "Say hello in Spanish.",
];
const MAX_TOKENS: usize = 24;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: `make models` fetches it", p.display());
    p
}

/// Servers and runs get two minutes.
fn wait_for(ready: impl FnMut() -> bool, what: &str) {
    common::wait_for(Duration::from_secs(120), ready, what)
}

/// One server runs at a time: its threads spin while they wait, and two
/// servers on two cores slow each other tenfold.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// `model` served with 2 threads and `slots` slots of 2,048 tokens.
fn serve(model: &Path, slots: usize, port: u16) -> LlamaServer {
    LlamaServer::start(model, port, Shape { slots, threads: 2, context: 2048 })
}

/// The SmolLM2 recipe through `url`; only `generate` is built (the outputs
/// are the seeds' decode files).
fn recipe(p: &Project, url: &str, shard_size: usize, extra: &str) -> String {
    let prompts: Vec<String> = PROMPTS.iter().map(|q| serde_json::json!({ "prompt": q }).to_string()).collect();
    p.write("prompts.jsonl", &prompts.join("\n"));
    let text = format!(
        "name = \"served\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"{m}\"\nseeds = [1, 2]\n\
         max_tokens = {MAX_TOKENS}\nshard_size = {shard_size}\nserver = \"{url}\"\n{extra}\n[annotate]\nmodel = \"{m}\"\nkind = \"judge\"\n\
         [export]\ndir = \"out\"\n",
        m = smollm2().display()
    );
    p.write("served.toml", &text).display().to_string()
}

/// The decode files a run left.
fn outputs(p: &Project) -> Vec<(String, Vec<u8>)> {
    ["output_1.json", "output_2.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(p.path("out").join(f)).unwrap()))
        .collect()
}

fn texts(p: &Project, file: &str) -> Vec<String> {
    let rows: Vec<Value> = serde_json::from_slice(&std::fs::read(p.path("out").join(file)).unwrap()).unwrap();
    rows.iter().map(|r| r["generated_text"].as_str().unwrap().to_string()).collect()
}

/// What the server received and answered for each prompt: prefgen's own
/// prompt ids (with and without `vllm_compat`), stopping at the end of turn
/// or at max_tokens, different responses across seeds, and the engine named
/// in the lock.
#[test]
fn generates_through_the_server_with_prefgen_s_prompt_ids() {
    let _turn = one_at_a_time();
    let server = serve(&smollm2(), 1, free_port());
    let chat = Chat::load(&smollm2(), None).unwrap();
    for vllm_compat in [false, true] {
        let proxy = Proxy::start(server.port, &[]);
        let p = Project::new();
        let r = recipe(&p, &proxy.url(), 2, &format!("vllm_compat = {vllm_compat}"));
        // Once the whole recipe, judged by SmolLM2 in-process, for the card.
        let targets: &[&str] = if vllm_compat { &["generate"] } else { &[] };
        p.ok(&[&["run", r.as_str()][..], targets].concat());
        let completions = proxy.completions();
        assert_eq!(completions.len(), PROMPTS.len() * 2, "one request per prompt and seed");
        for c in &completions {
            let (body, answer) = (&c["body"], &c["response"]);
            assert_eq!(c["status"], 200, "{answer}");
            let ids: Vec<u32> = body["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
            let wanted = PROMPTS
                .iter()
                .map(|q| chat.encode(&chat.format_prompt(q).unwrap(), vllm_compat).unwrap())
                .find(|w| *w == ids);
            assert!(wanted.is_some(), "the server received ids that are no prompt's encoding: {ids:?}");
            // The server counted exactly those tokens: it added no BOS.
            assert_eq!(answer["usage"]["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
            let generated = answer["usage"]["completion_tokens"].as_u64().unwrap() as usize;
            match answer["choices"][0]["finish_reason"].as_str().unwrap() {
                "length" => assert_eq!(generated, MAX_TOKENS),
                "stop" => {
                    let last = answer["__verbose"]["tokens"].as_array().unwrap().last().unwrap().as_u64().unwrap();
                    assert!(chat.stop.contains(&(last as u32)), "stopped at token {last}, not an end of turn");
                }
                other => panic!("finish_reason {other}"),
            }
            let seed = body["seed"].as_u64().unwrap();
            if vllm_compat {
                assert!(seed == 1 || seed == 2, "with vllm_compat the recipe's seed is sent, as SimPO sent it");
            }
        }
        let (one, two) = (texts(&p, "output_1.json"), texts(&p, "output_2.json"));
        assert!(one.iter().chain(&two).all(|t| !t.trim().is_empty()), "{one:?} {two:?}");
        assert_ne!(one, two, "two seeds gave the same responses");
        let lock = std::fs::read_to_string(p.path("served.lock")).unwrap();
        assert!(lock.contains("llama.cpp") && lock.contains("1 slot: deterministic"), "{lock}");
        if !vllm_compat {
            let card = std::fs::read_to_string(p.path("out/README.md")).unwrap();
            let by = card.lines().find(|l| l.starts_with("| built by |")).unwrap_or_default();
            assert!(by.contains("llama.cpp") && by.contains("OpenAI-compatible server"), "{card}");
        }
    }
}

/// A prompt the server rejects as longer than its context (llama-server
/// with 256 tokens) is skipped and counted, as the built-in engine counts
/// the prompts it cannot take; the others are answered.
#[test]
fn a_prompt_too_long_for_the_server_is_skipped_and_counted() {
    let _turn = one_at_a_time();
    let mut server = LlamaServer::start(&smollm2(), free_port(), Shape { slots: 1, threads: 2, context: 256 });
    let p = Project::new();
    let r = recipe(&p, &format!("http://127.0.0.1:{}/v1", server.port), 2, "");
    let long = "Summarise this. ".repeat(100);
    let mut prompts: Vec<String> = PROMPTS.iter().map(|q| serde_json::json!({ "prompt": q }).to_string()).collect();
    prompts.push(serde_json::json!({ "prompt": long }).to_string());
    p.write("prompts.jsonl", &prompts.join("\n"));
    let run = p.prefgen(&["run", &r, "generate"]);
    server.kill();
    assert!(run.0.status.success(), "{}", run.stderr());
    assert!(run.stderr().contains("skipped_too_long=1"), "{}", run.stderr());
    assert_eq!(texts(&p, "output_1.json").len(), PROMPTS.len());
}

/// One slot: two runs into fresh caches give the same files, though the
/// second goes through a proxy that answers 503 to every third request.
/// The key does not hold the URL: another URL plans every node fresh, and
/// the built-in engine is another key.
#[test]
fn the_same_files_twice_retried_through_503s_and_the_url_is_not_keyed() {
    let _turn = one_at_a_time();
    let server = serve(&smollm2(), 1, free_port());
    let (plain, busy) = (Proxy::start(server.port, &[]), Proxy::start(server.port, &["--fail-every", "3"]));
    let (a, b) = (Project::new(), Project::new());
    let ra = recipe(&a, &plain.url(), 2, "");
    a.ok(&["run", &ra, "generate"]);
    let rb = recipe(&b, &busy.url(), 2, "");
    let run = b.ok(&["run", &rb, "generate"]);
    assert!(busy.completions().iter().any(|c| c["status"] == 503), "the proxy answered no 503");
    assert!(run.stderr().contains("HTTP 503") && run.stderr().contains("retrying"), "{}", run.stderr());
    assert_eq!(outputs(&a), outputs(&b), "one slot, the same recipe: the same bytes");

    let plan = b.ok(&["plan", &rb, "generate", "--set", "generate.server=http://127.0.0.1:9/v1"]).stdout();
    assert!(!plan.contains("stale"), "a new URL made nodes stale:\n{plan}");
    let built_in = std::fs::read_to_string(&rb).unwrap().replace(&format!("server = \"{}\"\n", busy.url()), "");
    b.write("built-in.toml", &built_in);
    let plan = b.ok(&["plan", "built-in.toml", "generate"]).stdout();
    assert!(
        plan.lines().any(|l| l.contains("generate") && l.contains("stale") && l.contains("generate.server")),
        "{plan}"
    );
}

/// What a completion request asked for: a prompt's ids under a seed.
fn asked(c: &Value) -> Value {
    serde_json::json!([c["body"]["prompt"], c["body"]["seed"]])
}

/// The server killed mid-run: the run stops naming the server, the shards
/// answered before stay cached, and after a restart the run sends only the
/// rest and ends with the files of an uninterrupted run.
#[test]
fn a_restarted_server_loses_no_shard() {
    let _turn = one_at_a_time();
    let port = free_port();
    let mut server = serve(&smollm2(), 1, port);
    let proxy = Proxy::start(port, &[]);
    let reference = Project::new();
    let r = recipe(&reference, &proxy.url(), 1, "");
    reference.ok(&["run", &r, "generate"]);
    let before = proxy.completions().len();

    let p = Project::new();
    let r = recipe(&p, &proxy.url(), 1, "request_retries = 0");
    let run = p.command(&["run", &r, "generate"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(|| proxy.completions().len() >= before + 3, "three shards answered");
    server.kill();
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run went on without its server");
    assert!(stderr.contains(&format!("127.0.0.1:{}", proxy.port)), "the error names the server:\n{stderr}");
    let answered: Vec<Value> = proxy.completions()[before..].iter().filter(|c| c["status"] == 200).map(asked).collect();
    assert!(answered.len() >= 3);

    let _server = serve(&smollm2(), 1, port);
    let resumed_from = proxy.completions().len();
    p.ok(&["run", &r, "generate"]);
    let resent: Vec<Value> = proxy.completions()[resumed_from..].iter().map(asked).collect();
    assert_eq!(resent.len() + answered.len(), PROMPTS.len() * 2, "every prompt answered once");
    assert!(resent.iter().all(|ids| !answered.contains(ids)), "an answered shard was asked again");
    assert_eq!(outputs(&p), outputs(&reference), "the resumed run's files differ from an uninterrupted run's");
}

/// A server that serves another model is refused before any completion is
/// asked for, with a message naming both.
#[test]
fn a_wrong_model_is_refused_before_any_request() {
    let _turn = one_at_a_time();
    let gemma = root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(gemma.is_file(), "{} is missing: `make models` fetches it", gemma.display());
    let server = serve(&gemma, 1, free_port());
    let proxy = Proxy::start(server.port, &[]);
    let p = Project::new();
    let r = recipe(&p, &proxy.url(), 2, "");
    let run = p.prefgen(&["run", &r, "generate"]);
    assert_eq!(run.code(), Some(1), "{}", run.stderr());
    let err = run.stderr();
    assert!(err.contains("gemma-3-270m-q4_k_m.gguf") && err.contains("SmolLM2-135M-Instruct.Q4_1.gguf"), "{err}");
    assert!(err.contains("generate.served_model"), "{err}");
    assert!(proxy.completions().is_empty(), "a completion was requested from the wrong model");
    assert!(!p.path("out/output_1.json").exists());
}

/// Two workers over one cache, each driving its own server through
/// `${VAR}` in `generate.server`: every shard is asked for once, of one
/// server or the other, both servers work, and the run that assembles (no
/// server at all: nothing is left to sample) writes the files one server
/// alone gives.
#[test]
fn workers_each_drive_their_own_server() {
    let _turn = one_at_a_time();
    // One thread each: two servers on two cores.
    let servers =
        [0, 1].map(|_| LlamaServer::start(&smollm2(), free_port(), Shape { slots: 1, threads: 1, context: 2048 }));
    let proxies = [0, 1].map(|i| Proxy::start(servers[i].port, &[]));
    let reference = Project::new();
    let r = recipe(&reference, &proxies[0].url(), 1, "");
    reference.ok(&["run", &r, "generate"]);
    let before = proxies[0].completions().len();

    let p = Project::new();
    let r = recipe(&p, "${PREFGEN_TEST_SERVER}", 1, "");
    let workers: Vec<_> = proxies
        .iter()
        .map(|proxy| {
            let mut c = p.command(&["run", &r, "generate", "--worker"]);
            c.env("PREFGEN_TEST_SERVER", proxy.url()).stdout(Stdio::null()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let asked: Vec<Vec<Value>> = [before, 0]
        .iter()
        .zip(&proxies)
        .map(|(&from, proxy)| proxy.completions()[from..].iter().map(asked).collect())
        .collect();
    assert!(
        asked.iter().all(|a| !a.is_empty()),
        "a server got no request: {:?}",
        asked.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let mut all: Vec<String> = asked.concat().iter().map(Value::to_string).collect();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!((n, all.len()), (PROMPTS.len() * 2, PROMPTS.len() * 2), "each prompt and seed asked for once");

    let assembled = p.ok(&["run", &r, "generate"]);
    assert!(!assembled.stderr().contains("sampling through"), "{}", assembled.stderr());
    assert_eq!(outputs(&p), outputs(&reference));
}
