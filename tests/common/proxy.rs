//! The test-only proxy (`tests/openai_proxy.py`) that the server tests put
//! in front of llama-server.

use std::process::{Child, Command};

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
        super::wait_for(std::time::Duration::from_secs(120), ready, "the proxy");
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
