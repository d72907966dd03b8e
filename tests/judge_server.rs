//! The judge through a real inference server (`annotate.server`):
//! llama.cpp's `llama-server` serving the SmolLM2 GGUF on 127.0.0.1, with
//! the test-only proxy (`tests/openai_proxy.py`) in front that records what
//! the server received and plays a rate-limited hosted API (429 with
//! `Retry-After`, dropped connections) or a server without log-probabilities.

mod common;

use common::llama_server::{LlamaServer, Shape};
use common::proxy::Proxy;
use common::*;
use prefgen::infer::reward::{Kind, Overflow, RewardModel};
use prefgen::infer::template::Kwargs;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Prompts and two responses each, of plainly different quality, so the
/// judge's scores spread.
const ROWS: [(&str, &str, &str); 4] = [
    ("What is the capital of France?", "The capital of France is Paris.", "France is a country."),
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 is 5, as everyone knows."),
    ("Name three primary colors.", "Red, blue and yellow.", "Green."),
    ("Say hello in Spanish.", "Hola.", "Bonjour! That is how you greet someone."),
];

/// The API key the hosted-API test sends: it must never be printed or stored.
const KEY: &str = "sk-test-Zq81pV3mWx0";

fn smollm2() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: `make models` fetches it", p.display());
    p
}

/// One server runs at a time: two on two cores slow each other tenfold.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server the tests start by hand, and launch.
const SHAPE: Shape = Shape { slots: 1, threads: 2, context: 2048 };

fn serve() -> LlamaServer {
    LlamaServer::start(&smollm2(), free_port(), SHAPE)
}

/// A recipe importing the responses and judging them with SmolLM2
/// in-process; `extra` lines go into `[annotate]`.
fn recipe(p: &Project, extra: &str) -> String {
    let prompts: Vec<String> = ROWS.iter().map(|(q, _, _)| json!({ "prompt": q }).to_string()).collect();
    p.write("prompts.jsonl", &prompts.join("\n"));
    for (seed, pick) in [(1, 1), (2, 2)] {
        let rows: Vec<Value> = ROWS
            .iter()
            .map(|r| {
                let text = if pick == 1 { r.1 } else { r.2 };
                json!({"prompt": r.0, "format_prompt": r.0, "generated_text": text})
            })
            .collect();
        p.write(&format!("gens/output_{seed}.json"), &serde_json::to_string(&rows).unwrap());
    }
    let text = format!(
        "name = \"judged\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nseeds = [1, 2]\n\
         import = \"gens/output_{{seed}}.json\"\n[annotate]\nmodel = \"{}\"\nkind = \"judge\"\nconcurrency = 2\ntop_logprobs = 1000\n{extra}\n\
         [export]\ndir = \"out\"\n",
        smollm2().display()
    );
    p.write("judged.toml", &text).display().to_string()
}

/// The scores a run left in `dir`, row by row.
fn scores(p: &Project, dir: &str) -> Vec<(String, Vec<String>, Vec<f64>)> {
    let rows: Vec<Value> =
        serde_json::from_slice(&std::fs::read(p.path(dir).join("all_outputs_rm.json")).unwrap()).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["prompt"].as_str().unwrap().to_string(),
                serde_json::from_value(r["all_generated_responses"].clone()).unwrap(),
                serde_json::from_value(r["all_rm_scores"].clone()).unwrap(),
            )
        })
        .collect()
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    sxy / (sxx * syy).sqrt()
}

/// The same GGUF judged in-process and through llama-server agrees within
/// numerics; the server received exactly the in-process judge's prompt ids;
/// the two are different keys, and the URL is in neither.
#[test]
fn the_judge_through_a_server_agrees_with_the_judge_in_process() {
    let _turn = one_at_a_time();
    let server = serve();
    let proxy = Proxy::start(server.port, &[]);
    let p = Project::new();
    let r = recipe(&p, "");
    p.ok(&["run", &r, "annotate", "--set", "export.dir=local"]);
    let served = ["--set", "export.dir=served"];
    let url = format!("annotate.server={}", proxy.url());
    let plan = p.ok(&[&["plan", &r, "annotate", "--set", &url][..], &served].concat()).stdout();
    let line = plan.lines().find(|l| l.contains("annotate[")).unwrap_or_default();
    assert!(line.contains("stale") && line.contains("annotate.server"), "{plan}");
    p.ok(&[&["run", &r, "annotate", "--set", &url][..], &served].concat());

    let (local, through) = (scores(&p, "local"), scores(&p, "served"));
    assert_eq!(local.len(), ROWS.len());
    let (mut x, mut y): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for (l, s) in local.iter().zip(&through) {
        assert_eq!((&l.0, &l.1), (&s.0, &s.1));
        x.extend(&l.2);
        y.extend(&s.2);
    }
    let largest = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    let r_xy = pearson(&x, &y);
    eprintln!(
        "judge in-process vs llama-server: {} scores, Pearson r {r_xy:.4}, largest difference {largest:.4}",
        x.len()
    );
    // The two engines' Q4_1 kernels differ (llama.cpp quantizes the
    // activations to 8 bits): their next-token log-probabilities on the same
    // ids differ by up to ~0.2 nats on this model, its ratings by as much.
    assert!(largest < 0.25, "in-process {x:?}, through the server {y:?}");
    assert!(r_xy > 0.95, "r = {r_xy}: in-process {x:?}, through the server {y:?}");

    // What the server received: the in-process judge's prompt ids, every one;
    // and each score is the expected rating over what it answered, exactly.
    let judge = RewardModel::load(&smollm2(), Some(Kind::Judge), None, &Default::default()).unwrap();
    let completions = proxy.completions();
    let received: Vec<Vec<u64>> = completions
        .iter()
        .map(|c| {
            assert_eq!(c["status"], 200, "{}", c["response"]);
            c["body"]["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
        })
        .collect();
    assert_eq!(received.len(), x.len(), "one request per response");
    for (prompt, responses, served) in &through {
        for (response, score) in responses.iter().zip(served) {
            let ids: Vec<u64> = judge
                .encode(prompt, response, usize::MAX, Overflow::Truncate, &Kwargs::new())
                .unwrap()
                .unwrap()
                .into_iter()
                .map(u64::from)
                .collect();
            let at = received.iter().position(|r| *r == ids);
            let at =
                at.unwrap_or_else(|| panic!("the server never received the in-process judge's ids for {prompt:?}"));
            let top =
                completions[at]["response"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap();
            let (mut mass, mut sum) = (0.0, 0.0);
            for t in top {
                let text = t["token"].as_str().unwrap();
                if let Ok(d @ 1..=9) = text.strip_prefix(' ').unwrap_or(text).parse::<u8>() {
                    let p = t["logprob"].as_f64().unwrap().exp();
                    (mass, sum) = (mass + p, sum + p * d as f64);
                }
            }
            assert!((sum / mass - score).abs() < 1e-9, "{score} is not the expected rating {}", sum / mass);
        }
    }

    // The URL is not in the key: another address of the same server is fresh.
    let direct = format!("annotate.server=http://127.0.0.1:{}/v1", server.port);
    let plan = p.ok(&[&["plan", &r, "annotate", "--set", &direct][..], &served].concat()).stdout();
    let line = plan.lines().find(|l| l.contains("annotate[")).unwrap_or_default();
    assert!(line.contains("fresh"), "{plan}");
}

/// Through a rate-limited, flaky API (429 with `Retry-After: 2` and dropped
/// connections), paced to 300 requests a minute, with the key from the
/// variable the recipe names: the run completes with the scores a clean
/// server gives, the retried request waited as told, requests were spaced,
/// and the key reached the server but no output, log or file.
#[test]
fn a_rate_limited_api_is_waited_out_and_its_key_never_shown() {
    let _turn = one_at_a_time();
    let server = serve();
    let faulty = Proxy::start(server.port, &["--too-many-every", "3", "--retry-after", "2", "--drop-every", "4"]);
    let p = Project::new();
    let extra = "api_key_env = \"JUDGE_API_KEY\"\nrequests_per_minute = 300\nrequest_retries = 4";
    let r = recipe(&p, extra);
    let url = format!("annotate.server={}", faulty.url());
    let mut c = p.command(&["run", &r, "--set", &url]);
    c.env("JUDGE_API_KEY", KEY).env("OPENAI_API_KEY", "sk-not-this-one");
    let run = ok(c);
    let (out, err) = (run.stdout(), run.stderr());
    assert!(err.contains("Retry-After"), "{err}");
    for (name, bytes) in [("stdout", out.as_bytes()), ("stderr", err.as_bytes())] {
        assert!(!String::from_utf8_lossy(bytes).contains(KEY), "the key is in {name}");
    }
    for file in files_under(p.dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(!bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()), "the key is in {}", file.display());
    }

    let completions = faulty.completions();
    assert!(completions.iter().all(|c| c["auth"] == format!("Bearer {KEY}")), "the stage's key was not sent");
    let statuses: Vec<i64> = completions.iter().map(|c| c["status"].as_i64().unwrap()).collect();
    assert!(statuses.contains(&429) && statuses.contains(&0), "{statuses:?}");
    let time = |c: &Value| c["time"].as_f64().unwrap();
    for (i, limited) in completions.iter().enumerate().filter(|(_, c)| c["status"] == 429) {
        let retry = completions[i + 1..].iter().find(|c| c["body"] == limited["body"]).expect("the request is retried");
        let waited = time(retry) - time(limited);
        assert!(waited >= 1.9, "retried after {waited:.2}s, not the 2s Retry-After asked");
    }
    let mut starts: Vec<f64> = completions.iter().map(time).collect();
    starts.sort_by(f64::total_cmp);
    let closest = starts.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min);
    assert!(closest >= 0.15, "two requests {closest:.3}s apart at 300 a minute");

    // The same scores as through a clean server (another cache).
    let clean = Project::new();
    let r = recipe(&clean, "");
    clean.ok(&["run", &r, "annotate", "--set", &format!("annotate.server=http://127.0.0.1:{}/v1", server.port)]);
    assert_eq!(scores(&p, "out"), scores(&clean, "out"));
}

/// A server that answers without log-probabilities fails the run with an
/// error naming it; nothing is exported as if scored.
#[test]
fn a_server_without_logprobs_fails_naming_it() {
    let _turn = one_at_a_time();
    let server = serve();
    let proxy = Proxy::start(server.port, &["--no-logprobs"]);
    let p = Project::new();
    let r = recipe(&p, "request_retries = 0");
    let err = fails(&p, &["run", &r, "--set", &format!("annotate.server={}", proxy.url())], &["log-probabilities"]);
    assert!(err.contains(&proxy.url()) && err.contains("annotate.server"), "{err}");
    assert!(!p.path("out/all_outputs_rm.json").exists());
}

/// A hosted model known only by its name, through `/chat/completions`: the
/// server renders the template; the scores are ratings; the card says the
/// judge is only a name.
#[test]
fn a_hosted_judge_by_name_through_chat() {
    let _turn = one_at_a_time();
    let server = serve();
    let p = Project::new();
    let name = smollm2().display().to_string();
    let r = recipe(&p, "endpoint = \"chat\"");
    // llama-server serves the model under its path: what the API is asked
    // for, and so what identifies the judge.
    let sets = [
        "--set".to_string(),
        "annotate.model=hosted-judge".to_string(),
        "--set".to_string(),
        format!("annotate.served_model={name}"),
        "--set".to_string(),
        format!("annotate.server=http://127.0.0.1:{}/v1", server.port),
    ];
    let args: Vec<&str> = ["run", r.as_str()].into_iter().chain(sets.iter().map(String::as_str)).collect();
    p.ok(&args);
    for (_, _, s) in scores(&p, "out") {
        assert!(s.iter().all(|v| (1.0..=9.0).contains(v)), "{s:?}");
    }
    let card = std::fs::read_to_string(p.path("out/README.md")).unwrap();
    assert!(card.contains(&format!("{name}, a hosted model known only by this name")), "{card}");
    let lock = std::fs::read_to_string(p.path("judged.lock")).unwrap();
    assert!(lock.contains("judge through /chat/completions"), "{lock}");
}

/// The environment variable that marks the processes a test's prefgen
/// starts: a launched server inherits it, so one holding it after prefgen
/// is gone is an orphan.
const MARK: &str = "PREFGEN_TEST_JUDGE_MARK";

/// The live processes whose environment holds `MARK=mark`.
fn holding(mark: &str) -> Vec<String> {
    let needle = format!("{MARK}={mark}");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(env) = std::fs::read(e.path().join("environ")) else { continue };
        if env.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

/// `annotate.launch`: prefgen starts llama-server for the judge itself; the
/// scores equal those through the same server started by hand, `plan` is
/// fresh across the two, and no process of the server is left.
#[test]
fn a_launched_judge_scores_as_a_hand_started_one() {
    let _turn = one_at_a_time();
    let by_hand = Project::new();
    let r = recipe(&by_hand, "");
    {
        let server = serve();
        let url = format!("annotate.server=http://127.0.0.1:{}/v1", server.port);
        by_hand.ok(&["run", &r, "annotate", "--set", &url]);
    }
    let command = format!("annotate.launch={}", SHAPE.launch_command());
    let p = Project::new();
    let r = recipe(&p, "");
    let mark = format!("{}", std::process::id());
    let mut c = p.command(&["run", &r, "annotate", "--set", &command]);
    c.env(MARK, &mark);
    let run = ok(c);
    assert!(run.stderr().contains("judging through llama.cpp"), "{}", run.stderr());
    assert!(holding(&mark).is_empty(), "the launched server outlived the run: {:?}", holding(&mark));
    assert_eq!(scores(&p, "out"), scores(&by_hand, "out"));
    let plan = p.ok(&["plan", &r, "annotate", "--set", "annotate.server=http://127.0.0.1:1/v1"]).stdout();
    let line = plan.lines().find(|l| l.contains("annotate[")).unwrap_or_default();
    assert!(line.contains("fresh"), "{plan}");
}
