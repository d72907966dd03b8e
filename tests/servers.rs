//! What servers and URLs may not do to prefgen's output (issue 25, items
//! 4-7 and 17): a password in a URL is never printed; a server's own text
//! never reaches the card or the lock as markup; a server that serves
//! another model under the policy's file name is refused by what its
//! tokenizer does; token ids a server returns outside the vocabulary are an
//! error. Real llama-server (built by `scripts/llama-cpp.sh`), with the
//! test-only proxy (`tests/openai_proxy.py`) as the misbehaving server.

mod common;

use common::llama_server::{LlamaServer, Shape};
use common::proxy::Proxy;
use common::*;
use std::path::{Path, PathBuf};

const PROMPTS: [&str; 3] = ["What is the capital of France?", "Name three primary colors.", "Say hello in Spanish."];

fn model(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(name);
    assert!(p.is_file(), "{} is missing: `make models` fetches it", p.display());
    p
}

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// One server at a time: two on two cores slow each other tenfold.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(model: &Path) -> LlamaServer {
    LlamaServer::start(model, free_port(), Shape { slots: 1, threads: 2, context: 2048 })
}

/// The SmolLM2 recipe sampling through `url`, judged by SmolLM2 in-process.
fn recipe(p: &Project, url: &str) -> String {
    let prompts: Vec<String> = PROMPTS.iter().map(|q| serde_json::json!({ "prompt": q }).to_string()).collect();
    p.write("prompts.jsonl", &prompts.join("\n"));
    let text = format!(
        "name = \"served\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"{m}\"\nseeds = [1, 2]\n\
         max_tokens = 8\nserver = \"{url}\"\nrequest_retries = 0\n[annotate]\nmodel = \"{m}\"\nkind = \"judge\"\n\
         [export]\ndir = \"out\"\n",
        m = model(SMOLLM2).display()
    );
    p.write("served.toml", &text).display().to_string()
}

/// Item 4: a password in `--remote`, in `AWS_ENDPOINT_URL`, or in a
/// `generate.server` URL (with a `${VAR}` that is not set, or a server that
/// is down) appears in no output; the URL is shown without it.
#[test]
fn passwords_in_urls_are_never_printed() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "").display().to_string();
    let secrets = ["hunter2pw", "s3cr3tEP", "sekritSRV"];
    let clean = |run: &Run| {
        let all = format!("{}{}", run.stdout(), run.stderr());
        for s in secrets {
            assert!(!all.contains(s), "{s} was printed:\n{all}");
        }
        all
    };
    let closed = free_port();
    let endpoint = format!("http://epuser:s3cr3tEP@127.0.0.1:{closed}");
    let with_env = |args: &[&str]| {
        let mut c = p.command(args);
        c.env("AWS_ENDPOINT_URL", &endpoint).env("AWS_ACCESS_KEY_ID", "k").env("AWS_SECRET_ACCESS_KEY", "s");
        Run(c.output().unwrap())
    };

    let run = with_env(&["plan", &r, "--remote", "s3://user:hunter2pw@team/prefgen"]);
    let all = clean(&run);
    assert!(all.contains("s3://team/prefgen"), "the remote is not named:\n{all}");

    let run = with_env(&["plan", &r, "--remote", "s3://team/prefgen"]);
    let all = clean(&run);
    assert!(all.contains(&format!("127.0.0.1:{closed}")), "the endpoint's failure is not told:\n{all}");

    let unset = p.prefgen(&[
        "run",
        &r,
        "generate",
        "--set",
        "generate.server=http://alice:sekritSRV-${PREFGEN_TEST_UNSET}@127.0.0.1:9/v1",
    ]);
    assert_eq!(unset.code(), Some(1));
    assert!(clean(&unset).contains("PREFGEN_TEST_UNSET"), "{}", unset.stderr());

    let down = p.prefgen(&[
        "run",
        &r,
        "generate",
        "--set",
        &format!("generate.server=http://alice:sekritSRV@127.0.0.1:{closed}/v1"),
        "--set",
        "generate.request_retries=0",
    ]);
    assert_eq!(down.code(), Some(1));
    assert!(clean(&down).contains(&format!("http://127.0.0.1:{closed}/v1")), "{}", down.stderr());
}

/// Item 5: a server whose `/models` `owned_by` carries newlines, table
/// pipes and markup: the card's table keeps its rows, and neither the card
/// nor the lock holds the markup.
#[test]
fn a_server_s_own_text_is_escaped_in_the_card_and_the_lock() {
    let _turn = one_at_a_time();
    let server = serve(&model(SMOLLM2));
    let evil = "evil\n| injected | row |\n<script>alert(1)</script>";
    let proxy = Proxy::start(server.port, &["--owned-by", evil]);
    let p = Project::new();
    let r = recipe(&p, &proxy.url());
    p.ok(&["run", &r]);
    let card = std::fs::read_to_string(p.path("out/README.md")).unwrap();
    let lock = std::fs::read_to_string(p.path("served.lock")).unwrap();
    for text in [&card, &lock] {
        assert!(!text.contains("<script>"), "{text}");
    }
    assert!(!card.lines().any(|l| l.starts_with("| injected")), "{card}");
    let by = card.lines().find(|l| l.starts_with("| built by |")).unwrap_or_default();
    assert!(by.contains("evil") && by.ends_with(" |"), "the engine is not in one row: {by:?}\n{card}");
}

/// Item 6: llama-server serving gemma-3 from a file named as the policy
/// (SmolLM2) passes a check by name, but not one by tokenization: the run is
/// refused before any completion, naming the server and what differed, and
/// nothing is cached or written. The genuine server passes.
#[test]
fn another_model_under_the_policy_s_file_name_is_refused() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let impostor = dir.path().join(SMOLLM2);
    std::os::unix::fs::symlink(model("gemma-3-270m-q4_k_m.gguf"), &impostor).unwrap();
    let p = Project::new();
    {
        let server = serve(&impostor);
        let proxy = Proxy::start(server.port, &[]);
        let r = recipe(&p, &proxy.url());
        let run = p.prefgen(&["run", &r, "generate"]);
        let err = run.stderr();
        assert_eq!(run.code(), Some(1), "{err}");
        assert!(err.contains(&proxy.url()) && err.contains("tokeni"), "{err}");
        assert!(proxy.completions().is_empty(), "a completion was asked of the wrong model");
        assert!(!p.path("out/output_1.json").exists());
        let plan = p.ok(&["plan", &r, "generate"]).stdout();
        let generate: Vec<&str> = plan.lines().filter(|l| l.contains("generate[")).collect();
        assert!(generate.len() == 2 && generate.iter().all(|l| l.starts_with("stale")), "{plan}");
    }
    let server = serve(&model(SMOLLM2));
    let proxy = Proxy::start(server.port, &[]);
    let r = recipe(&p, &proxy.url());
    p.ok(&["run", &r, "generate"]);
    let tokenized = proxy.requests().iter().filter(|q| q["path"].as_str().unwrap().ends_with("/tokenize")).count();
    assert!(tokenized > 0, "the genuine server was not asked to tokenize");
}

/// Item 7: token ids a server returns that are not the policy's (past 32
/// bits, or past its vocabulary of 49,152) are an error naming the server,
/// not a wrapped or dropped token.
#[test]
fn token_ids_outside_the_vocabulary_are_an_error_naming_the_server() {
    let _turn = one_at_a_time();
    let server = serve(&model(SMOLLM2));
    for id in [(1u64 << 32) + 28, 49_152 + 10] {
        let proxy = Proxy::start(server.port, &["--token-ids", &format!("[28, {id}]")]);
        let p = Project::new();
        let r = recipe(&p, &proxy.url());
        let run = p.prefgen(&["run", &r, "generate"]);
        let err = run.stderr();
        assert_eq!(run.code(), Some(1), "id {id} was accepted:\n{err}");
        assert!(err.contains(&proxy.url()) && err.contains(&id.to_string()), "{err}");
        assert!(!p.path("out/output_1.json").exists());
    }
}

/// Item 17: `infer generate --max-tokens 0` is refused before the model is
/// loaded, and writes nothing.
#[test]
fn infer_generate_refuses_zero_max_tokens() {
    let p = Project::new();
    p.write("prompts.jsonl", "{\"prompt\": \"Hi\"}\n");
    let smollm2 = model(SMOLLM2).display().to_string();
    let run = p.prefgen(&["infer", "generate", &smollm2, "prompts.jsonl", "-o", "out.jsonl", "--max-tokens", "0"]);
    assert_eq!(run.code(), Some(1), "{}{}", run.stdout(), run.stderr());
    assert!(run.stderr().contains("--max-tokens"), "{}", run.stderr());
    assert!(!p.path("out.jsonl").exists());
}
