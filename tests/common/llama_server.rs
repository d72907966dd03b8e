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

impl Shape {
    /// The server's command line on `model` at `port`, program first.
    fn command(&self, model: &str, port: &str) -> Vec<String> {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/llama.cpp/build/bin/llama-server");
        assert!(bin.is_file(), "{} is missing: `make servers` builds it", bin.display());
        let (threads, slots, context) =
            (self.threads.to_string(), self.slots.to_string(), (self.context * self.slots).to_string());
        let args = ["-m", model, "--host", "127.0.0.1", "--port", port, "-t", &threads, "-np", &slots, "-c", &context];
        std::iter::once(bin.display().to_string())
            .chain(args.iter().map(|a| a.to_string()))
            .chain(["--no-webui".into()])
            .collect()
    }

    /// The same server as a `launch` command: `{model}` and `{port}` left
    /// for prefgen to fill in.
    #[allow(dead_code)] // not every test binary launches a server
    pub fn launch_command(&self) -> String {
        self.command("{model}", "{port}").join(" ")
    }
}

impl LlamaServer {
    /// Starts the server on `model` at `port` and waits until it has loaded
    /// the model.
    pub fn start(model: &Path, port: u16, shape: Shape) -> LlamaServer {
        let command = shape.command(&model.display().to_string(), &port.to_string());
        let child = Command::new(&command[0])
            .args(&command[1..])
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
