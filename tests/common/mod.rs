//! Helpers shared by the integration tests: a scratch project folder with its
//! own cache, the prefgen binary run in it, and the committed fixtures.
#![allow(dead_code)]

pub mod llama_server;
pub mod proxy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The SimPO fixture recipe: 5 seeds of imported generations and scores.
pub fn simpo_recipe() -> String {
    let fx = fixtures().join("simpo");
    format!(
        r#"name = "simpo-fixture"

[prompts]
dataset = "{fx}/prompts.jsonl"

[generate]
seeds = [13, 21, 42, 79, 100]
import = "{fx}/gens/output_{{seed}}.json"

[annotate]
import = "{fx}/scores.json"

[export]
dir = "out"
"#,
        fx = fx.display()
    )
}

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        Project { dir: tempfile::tempdir().expect("a temp dir") }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_prefgen"));
        c.args(args).current_dir(self.dir.path()).env("PREFGEN_CACHE", self.path("cache"));
        c.env("HF_HUB_OFFLINE", "1");
        c
    }

    /// Two `run`s of `recipe` started together on this project's cache, one
    /// into each export folder; both must succeed.
    pub fn run_two_at_once(&self, recipe: &str, dirs: [&str; 2]) -> (Run, Run) {
        let spawn = |dir: &str| {
            let mut c = self.command(&["run", recipe, "--set", &format!("export.dir={dir}")]);
            c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            c.spawn().expect("prefgen starts")
        };
        let (a, b) = (spawn(dirs[0]), spawn(dirs[1]));
        let (a, b) = (Run(a.wait_with_output().unwrap()), Run(b.wait_with_output().unwrap()));
        assert!(a.0.status.success() && b.0.status.success(), "{}\n{}", a.stderr(), b.stderr());
        (a, b)
    }

    pub fn prefgen(&self, args: &[&str]) -> Run {
        Run(self.command(args).output().expect("prefgen runs"))
    }

    /// Runs and insists on success.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.prefgen(args);
        assert!(r.0.status.success(), "prefgen {args:?} failed:\n{}", r.stderr());
        r
    }

    /// Every file under `rel` (relative path -> bytes), the manifest aside.
    pub fn tree(&self, rel: &str) -> BTreeMap<String, Vec<u8>> {
        let root = self.path(rel);
        let mut out = BTreeMap::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    if !p.ends_with(".prefgen") {
                        stack.push(p);
                    }
                } else {
                    out.insert(p.strip_prefix(&root).unwrap().display().to_string(), std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }
}

pub struct Run(pub Output);

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    pub fn code(&self) -> Option<i32> {
        self.0.status.code()
    }
    /// The nodes this run built, from its `built X in ...` lines.
    pub fn built(&self) -> Vec<String> {
        self.stderr()
            .lines()
            .filter_map(|l| l.strip_prefix("built ").and_then(|r| r.split(" in ").next()))
            .map(str::to_string)
            .collect()
    }
}

/// Runs a failing command: one `error:` line containing every `expect`.
pub fn fails(p: &Project, args: &[&str], expect: &[&str]) -> String {
    let run = p.prefgen(args);
    assert_eq!(run.code(), Some(1), "{args:?} should fail with 1:\n{}", run.stderr());
    let err = run.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: want one error line, got:\n{err}");
    for e in expect {
        assert!(lines[0].contains(e), "{args:?}: {:?} lacks {e:?}", lines[0]);
    }
    assert!(!err.contains("panicked") && !err.contains("Some(") && !err.contains("struct "), "{err}");
    lines[0].to_string()
}

/// Runs `c` to its end: its output, and its peak resident memory in bytes.
/// Python starts it and reads the peak of its children: a child of the
/// test itself would start from the test's own peak (exec keeps it).
pub fn peak_rss(c: Command) -> (Run, u64) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut p = Command::new("python3");
    p.args([
        "-c",
        "import resource, subprocess, sys\nr = subprocess.run(sys.argv[2:]).returncode\nopen(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\nsys.exit(r)",
    ]);
    p.arg(report.path()).arg(c.get_program()).args(c.get_args());
    if let Some(dir) = c.get_current_dir() {
        p.current_dir(dir);
    }
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => p.env(k, v),
            None => p.env_remove(k),
        };
    }
    let run = Run(p.output().expect("python3 runs"));
    let kb: u64 = std::fs::read_to_string(report.path()).unwrap().trim().parse().unwrap();
    // ru_maxrss is in kilobytes on Linux.
    (run, kb * 1024)
}

/// Runs `c`, calls `interrupt` once its stderr shows a line starting with
/// `marker` (the run is then mid-way), and returns its whole stderr once it
/// has ended, insisting on success.
pub fn run_interrupted(mut c: Command, marker: &str, interrupt: impl FnOnce()) -> String {
    use std::io::BufRead;
    let mut child =
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().expect("prefgen starts");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let mut log = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let reached = line.starts_with(marker);
        log.push(line);
        if reached {
            break;
        }
    }
    interrupt();
    log.extend(lines.map_while(Result::ok));
    assert!(child.wait().unwrap().success(), "{}", log.join("\n"));
    log.join("\n")
}

/// Runs a Python script of the test suite, insisting on success.
pub fn python(args: &[&str]) -> String {
    let out = Command::new("python3")
        .args(args)
        .output()
        .expect("python3 is needed for reference checks (`make setup` installs its packages)");
    assert!(
        out.status.success(),
        "python3 {args:?} failed (run `make setup` if a package is missing):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(name).display().to_string()
}

/// Rows as SimPO's scripts write them (`json.dump(rows, f, indent=4)`).
fn simpo_json(rows: &[serde_json::Value]) -> String {
    String::from_utf8(prefgen::formats::pyjson::to_vec(rows, 0).unwrap()).unwrap()
}

/// Writes a synthetic SimPO import of `n` prompts x `seeds` with responses of
/// about `len` bytes, and a recipe over it; returns the recipe path.
pub fn synthetic(p: &Project, n: usize, seeds: &[u64], len: usize) -> PathBuf {
    use serde_json::json;
    let mut prompts: Vec<String> = (0..n).map(|i| format!("synthetic prompt {i:07} about topic {}", i % 97)).collect();
    prompts.sort();
    let text = |i: usize, s: u64| {
        let mut t = format!("response to {i} with seed {s}: ");
        while t.len() < len {
            t.push_str(&format!("word{} ", (i * 31 + s as usize * 7 + t.len()) % 1000));
        }
        t
    };
    let mut jsonl = String::new();
    for p in &prompts {
        jsonl.push_str(&json!({ "prompt": p }).to_string());
        jsonl.push('\n');
    }
    p.write("syn/prompts.jsonl", &jsonl);
    for &s in seeds {
        let rows: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, pr)| json!({"prompt": pr, "format_prompt": pr, "generated_text": text(i, s)}))
            .collect();
        p.write(&format!("syn/gens/output_{s}.json"), &simpo_json(&rows));
    }
    let scored: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, pr)| {
            let responses: Vec<String> = seeds.iter().map(|&s| text(i, s)).collect();
            let scores: Vec<f64> =
                seeds.iter().map(|&s| ((i as u64 * 7919 + s * 104729) % 1000) as f64 / 37.0).collect();
            json!({"prompt": pr, "all_generated_responses": responses, "all_rm_scores": scores})
        })
        .collect();
    p.write("syn/scores.json", &simpo_json(&scored));
    let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
    p.write(
        "syn.toml",
        &format!(
            "name = \"synthetic\"\n[prompts]\ndataset = \"syn/prompts.jsonl\"\n[generate]\nseeds = [{}]\nimport = \"syn/gens/output_{{seed}}.json\"\n[annotate]\nimport = \"syn/scores.json\"\n[export]\ndir = \"syn-out\"\n",
            seeds.join(", ")
        ),
    )
}

/// Every binarized row's chosen is its first best-scored response and its
/// rejected the first worst-scored one (numpy's argmax and argmin).
pub fn assert_binarized_by_scores(rows: &[serde_json::Value]) {
    for row in rows {
        let scores: Vec<f64> = serde_json::from_value(row["all_rm_scores"].clone()).unwrap();
        let responses = row["all_generated_responses"].as_array().unwrap();
        let best = (0..scores.len()).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
        let worst = (0..scores.len()).fold(0, |w, i| if scores[i] < scores[w] { i } else { w });
        assert_eq!(row["chosen"][1]["content"], responses[best], "chosen of {:?}", row["prompt"]);
        assert_eq!(row["rejected"][1]["content"], responses[worst], "rejected of {:?}", row["prompt"]);
    }
}

/// A recipe over the tiny random-weight fixtures: `n` short prompts,
/// tiny-llama3 sampling two seeds, tiny-armorm scoring; `extra` lines are
/// appended to the sections they name (`[generate]\nshard_size = 1`).
pub fn tiny_recipe(p: &Project, n: usize, extra: &str) -> PathBuf {
    let prompts: Vec<String> = (0..n).map(|i| format!("{{\"prompt\": \"Question number {i}?\"}}")).collect();
    p.write("prompts.jsonl", &prompts.join("\n"));
    let mut text = format!(
        "name = \"tiny\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"{}\"\nseeds = [1, 2]\nmax_tokens = 6\n[annotate]\nmodel = \"{}\"\n[export]\ndir = \"out\"\n",
        fixtures().join("tiny-llama3").display(),
        fixtures().join("tiny-armorm").display()
    );
    for block in extra.split("\n[").filter(|b| !b.trim().is_empty()) {
        let block = block.trim_start_matches('[');
        let (section, lines) = block.split_once("]\n").expect("extra blocks are [section]\\nlines");
        for line in lines.lines().filter(|l| !l.trim().is_empty()) {
            let start =
                text.find(&format!("[{section}]\n")).expect("the tiny recipe has the section") + section.len() + 3;
            let end = text[start..].find("\n[").map_or(text.len(), |e| start + e + 1);
            let key = format!("{} =", line.split('=').next().unwrap().trim());
            match text[start..end].find(&key) {
                Some(at) => {
                    let at = start + at;
                    let eol = at + text[at..].find('\n').unwrap();
                    text.replace_range(at..eol, line);
                }
                None => text.insert_str(start, &format!("{line}\n")),
            }
        }
    }
    p.write("tiny.toml", &text)
}

/// Sets a file's modification time `secs` into the past (as if it had been
/// written then), without opening it for writing.
pub fn age(path: &Path, secs: u64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let then = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - secs;
    let t = libc::timespec { tv_sec: then as libc::time_t, tv_nsec: 0 };
    // SAFETY: a valid C path and two timespecs, as utimensat(2) takes.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

/// Every regular file under `dir` (recursively).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A TCP port free on 127.0.0.1 for a server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `ready` every 100 ms until it holds, failing the test after `limit`.
pub fn wait_for(limit: std::time::Duration, mut ready: impl FnMut() -> bool, what: &str) {
    let started = std::time::Instant::now();
    while !ready() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `prefgen ARGS` in `p` with the S3 server's AWS environment.
pub fn on(p: &Project, s3: &S3Server, args: &[&str]) -> Command {
    let mut c = p.command(args);
    c.envs(s3.env());
    c
}

/// Runs `c`, insisting on success and that the S3 server's secret key is
/// never printed.
pub fn ok(mut c: Command) -> Run {
    let run = Run(c.output().unwrap());
    assert!(run.0.status.success(), "{}\n{}", run.stdout(), run.stderr());
    assert!(
        !run.stderr().contains("testing-secret") && !run.stdout().contains("testing-secret"),
        "a secret was printed"
    );
    run
}

/// An S3-compatible server (moto's, from PyPI) on 127.0.0.1, stopped on drop.
pub struct S3Server {
    pub port: u16,
    child: std::process::Child,
}

impl S3Server {
    /// Starts the server and creates `bucket`.
    pub fn start(bucket: &str) -> S3Server {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (`make setup` installs moto[server])");
        let server = S3Server { port, child };
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed().as_secs() < 30, "the S3 server did not start on port {port}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server.python(&format!("s3.create_bucket(Bucket={bucket:?})"));
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The AWS environment a client of this server gets.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing-secret-never-printed".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
    }

    /// Runs Python with `s3`, a boto3 client of this server, defined.
    pub fn python(&self, code: &str) -> String {
        let setup = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='testing', aws_secret_access_key='x', region_name='us-east-1')\n",
            self.endpoint()
        );
        python(&["-c", &format!("{setup}{code}")])
    }

    /// Stops the server now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A stored action entry (`bytes`, under `key`) changed by `edit` and stored
/// again as a writer without a signing key would: unsigned, its digest
/// taken anew (anyone can: BLAKE3 is public).
pub fn forge_entry(bytes: &[u8], key: &str, edit: impl FnOnce(&mut prefgen::cache::ActionEntry)) -> Vec<u8> {
    let mut entry = prefgen::cache::Stored::open(bytes, &key.parse().unwrap()).expect("a sound entry").entry;
    edit(&mut entry);
    entry.seal(None)
}
