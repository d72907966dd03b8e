//! `generate.launch`: prefgen starts llama.cpp's `llama-server` itself
//! (SmolLM2 GGUF, 2 threads, one slot, on 127.0.0.1), samples through it,
//! restarts it when it dies, and stops it, every process of it, however
//! prefgen ends. Each prefgen started here carries a marker in its
//! environment, which the server it launches inherits: a process holding
//! the marker after prefgen is gone is an orphan.

mod common;

use common::llama_server::{LlamaServer, Shape};
use common::*;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const PROMPTS: [&str; 3] = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?"];

/// The environment variable that marks processes started by a test's prefgen.
const MARK: &str = "PREFGEN_TEST_LAUNCH_MARK";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: `make models` fetches it", p.display());
    p
}

/// The server `serve` below starts by hand.
const SHAPE: Shape = Shape { slots: 1, threads: 2, context: 2048 };

/// That server as a launch command.
fn launch_command() -> String {
    SHAPE.launch_command()
}

/// One server runs at a time: two on two cores slow each other tenfold.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The SmolLM2 recipe sampling through `server` (a `server = ...` or
/// `launch = ...` line), one prompt per shard; only `generate` is built.
fn recipe(p: &Project, server: &str) -> String {
    let prompts: Vec<String> = PROMPTS.iter().map(|q| serde_json::json!({ "prompt": q }).to_string()).collect();
    p.write("prompts.jsonl", &prompts.join("\n"));
    let text = format!(
        "name = \"launched\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"{m}\"\nseeds = [7]\n\
         max_tokens = 8\nshard_size = 1\nrequest_retries = 1\n{server}\n[annotate]\nmodel = \"{m}\"\nkind = \"judge\"\n\
         [export]\ndir = \"out\"\n",
        m = smollm2().display()
    );
    p.write("launched.toml", &text).display().to_string()
}

fn launched(p: &Project) -> String {
    recipe(p, &format!("launch = {:?}", launch_command()))
}

/// A prefgen command marked with `mark`.
fn marked(p: &Project, args: &[&str], mark: &str) -> Command {
    let mut c = p.command(args);
    c.env(MARK, mark);
    c
}

/// The live processes whose environment holds `mark`.
fn holding(mark: &str) -> Vec<String> {
    let needle = format!("{MARK}={mark}");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(environ) = std::fs::read(e.path().join("environ")) else { continue };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie && environ.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            found.push(format!("{} {}", e.file_name().to_string_lossy(), comm.trim()));
        }
    }
    found
}

/// Waits up to `secs` seconds until no process holds `mark`.
fn none_left(mark: &str, secs: u64) {
    let started = Instant::now();
    while !holding(mark).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(secs), "left running: {:?}", holding(mark));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A unique mark for one prefgen run.
fn mark(name: &str) -> String {
    format!("{name}-{}-{:?}", std::process::id(), Instant::now())
}

fn outputs(p: &Project) -> Vec<u8> {
    std::fs::read(p.path("out/output_7.json")).unwrap()
}

/// The files of an uninterrupted run through a launched server, made once;
/// call it holding `one_at_a_time`.
fn uninterrupted() -> &'static [u8] {
    static OUTPUTS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    OUTPUTS.get_or_init(|| {
        let p = Project::new();
        let r = launched(&p);
        ok(marked(&p, &["run", &r, "generate"], &mark("whole")));
        outputs(&p)
    })
}

/// Starts `c` and reads its stderr until a line contains `marker`: the
/// child, the lines so far, and the lines to come.
fn until(mut c: Command, marker: &str) -> (Child, Vec<String>, Receiver<String>) {
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("prefgen starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let started = Instant::now();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(120).saturating_sub(started.elapsed())) {
        let reached = line.contains(marker);
        log.push(line);
        if reached {
            return (child, log, rx);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("no line with {marker:?}:\n{}", log.join("\n"));
}

/// A recipe with `generate.launch` builds on a `--worker`; the launched
/// server is gone once prefgen exits; the assembling run launches none; the
/// files equal those sampled through the same server started by hand, and
/// `plan` finds the hand-served run's cache fresh for the launched recipe
/// (neither the command nor the URL is in the key).
#[test]
fn a_launched_server_gives_the_hand_started_server_s_files_and_is_stopped() {
    let _turn = one_at_a_time();
    let by_hand = Project::new();
    {
        let server = LlamaServer::start(&smollm2(), free_port(), SHAPE);
        let r = recipe(&by_hand, &format!("server = \"http://127.0.0.1:{}/v1\"", server.port));
        by_hand.ok(&["run", &r, "generate"]);
    }
    // A worker (as `prefgen slurm` runs them) launches its own server and
    // stops it; the run that assembles afterwards launches none.
    let p = Project::new();
    let r = launched(&p);
    let m = mark("builds");
    let run = ok(marked(&p, &["run", &r, "generate", "--worker"], &m));
    none_left(&m, 1);
    let err = run.stderr();
    assert!(err.contains("launched `") && err.contains("stopping `"), "{err}");
    let assembled = ok(marked(&p, &["run", &r, "generate"], &m));
    assert!(!assembled.stderr().contains("launched `"), "{}", assembled.stderr());
    assert_eq!(outputs(&p), outputs(&by_hand), "the launched server's responses differ from the hand-started one's");
    let logs = std::fs::read_dir(p.path("cache/logs")).unwrap().count();
    assert_eq!(logs, 1, "one log for the one launched server");
    // The hand-served run's cache, asked about the launched recipe.
    let r = launched(&by_hand);
    let plan = by_hand.ok(&["plan", &r, "generate"]).stdout();
    let generate: Vec<&str> = plan.lines().filter(|l| l.contains("generate[")).collect();
    assert!(generate.len() == 1 && generate.iter().all(|l| l.starts_with("fresh")), "{plan}");
    // And a run with nothing stale launches nothing.
    let run = ok(marked(&by_hand, &["run", &r, "generate"], &m));
    assert!(!run.stderr().contains("launched `"), "{}", run.stderr());
}

/// prefgen SIGKILLed while it samples through its server leaves no process
/// behind (the reaper stops the server's group within seconds), and a
/// rerun completes with the bytes of an uninterrupted run.
#[test]
fn a_sigkilled_prefgen_leaves_no_server_and_a_rerun_completes() {
    let _turn = one_at_a_time();
    let whole = uninterrupted();
    let p = Project::new();
    let r = launched(&p);
    let m = mark("killed");
    let (mut child, log, _rest) = until(marked(&p, &["run", &r, "generate"], &m), "shard 1/3:");
    assert!(!holding(&m).iter().all(|h| h.contains("prefgen")), "no server was running: {:?}", holding(&m));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    none_left(&m, 15);
    assert!(!p.path("out/output_7.json").exists(), "{}", log.join("\n"));
    let m = mark("rerun");
    ok(marked(&p, &["run", &r, "generate"], &m));
    none_left(&m, 1);
    assert_eq!(outputs(&p), whole);
}

/// A launch command that cannot start fails within seconds, naming the
/// command and the log that holds its output; nothing is left running.
#[test]
fn a_launch_command_that_cannot_start_fails_naming_it_and_its_log() {
    let p = Project::new();
    let r = recipe(&p, "launch = \"no-such-server-9z --port {port} -m {model}\"");
    let m = mark("cannot");
    let started = Instant::now();
    let run = Run(marked(&p, &["run", &r, "generate"], &m).output().unwrap());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(run.code(), Some(1), "{}", run.stderr());
    let err = run.stderr();
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    let log = p.path("cache/logs");
    let log = std::fs::read_dir(&log).unwrap().next().unwrap().unwrap().path();
    assert!(line.contains("no-such-server-9z --port {port}") && line.contains(&log.display().to_string()), "{err}");
    assert!(std::fs::read_to_string(&log).unwrap().contains("not found"), "the log lacks the shell's message");
    assert!(!p.path("out/output_7.json").exists());
    none_left(&m, 1);
    // A command without {port} is refused before anything runs.
    fails(&p, &["plan", &r, "--set", "generate.launch=llama-server -m {model}"], &["generate.launch", "{port}"]);
}

/// The launched server killed mid-run is restarted, the shard in flight is
/// built again, and the run completes with the bytes of an uninterrupted run.
#[test]
fn a_launched_server_killed_mid_run_is_restarted() {
    let _turn = one_at_a_time();
    let whole = uninterrupted();
    let p = Project::new();
    let r = launched(&p);
    let m = mark("restart");
    let (mut child, mut log, rest) = until(marked(&p, &["run", &r, "generate"], &m), "shard 1/3:");
    let servers: Vec<String> = holding(&m).into_iter().filter(|h| h.ends_with("llama-server")).collect();
    assert_eq!(servers.len(), 1, "{:?}", holding(&m));
    let pid: i32 = servers[0].split(' ').next().unwrap().parse().unwrap();
    // SAFETY: kill(2) on the server our prefgen launched.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = child.wait().unwrap();
    log.extend(rest.iter());
    let log = log.join("\n");
    assert!(status.success(), "{log}");
    assert!(log.contains("restarting `"), "{log}");
    none_left(&m, 1);
    assert_eq!(outputs(&p), whole);
}
