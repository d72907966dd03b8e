//! llama.cpp's `llama-server` (built by `scripts/llama-cpp.sh` from the
//! llama-cpp-python sdist's source) started on 127.0.0.1 for the server
//! tests and the server benchmark; killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LlamaServer {
    pub port: u16,
    child: Child,
}

/// How the server runs: its slots (requests decoded together), threads and
/// context per slot.
pub struct Shape {
    pub slots: usize,
    pub threads: usize,
    pub context: usize,
}

impl LlamaServer {
    /// Starts the server on `model` at `port` and waits until it has loaded
    /// the model.
    pub fn start(model: &Path, port: u16, shape: Shape) -> LlamaServer {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/llama.cpp/build/bin/llama-server");
        assert!(bin.is_file(), "{} is missing: `make servers` builds it", bin.display());
        let child = Command::new(bin)
            .args(["-m", &model.display().to_string(), "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", &shape.threads.to_string(), "-np", &shape.slots.to_string()])
            .args(["-c", &(shape.context * shape.slots).to_string(), "--no-webui"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llama-server starts");
        let server = LlamaServer { port, child };
        let (health, started) = (format!("http://127.0.0.1:{port}/health"), Instant::now());
        while ureq::get(&health).call().is_err() {
            assert!(started.elapsed() < Duration::from_secs(120), "llama-server did not load {}", model.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test-only proxy (`tests/openai_proxy.py`) in front of a server: it
/// records every request and answer, and with `args` answers 503 to some
/// completions or rewrites what the server answers; killed on drop.
pub struct Proxy {
    pub port: u16,
    log: tempfile::NamedTempFile,
    child: Child,
}

impl Proxy {
    pub fn start(upstream: u16, args: &[&str]) -> Proxy {
        let port = super::free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("python3")
            .arg(super::script("openai_proxy.py"))
            .args(["--upstream", &format!("http://127.0.0.1:{upstream}"), "--port", &port.to_string()])
            .args(["--log", &log.path().display().to_string()])
            .args(args)
            .spawn()
            .expect("python3 runs the proxy");
        let ready = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        super::wait_for(Duration::from_secs(120), ready, "the proxy");
        Proxy { port, log, child }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// Every request recorded so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.log.path()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The completion requests.
    pub fn completions(&self) -> Vec<serde_json::Value> {
        self.requests().into_iter().filter(|r| r["path"].as_str().unwrap().ends_with("/completions")).collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
