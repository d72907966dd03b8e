//! Servers prefgen starts itself (`generate.launch`): a shell command
//! with `{port}` (a free port on 127.0.0.1) and `{model}` (a local path)
//! substituted, waited for until it answers, restarted when it dies, and
//! stopped, its whole process group and every descendant, SIGTERM then
//! SIGKILL, when it is dropped.
//!
//! A server must not outlive prefgen even when prefgen is SIGKILLed (it
//! would hold a GPU), and a parent-death signal reaches only a direct
//! child, not vLLM's workers. So the command runs under a reaper: prefgen
//! itself, re-executed with the hidden argument [`REAPER`], the leader of
//! the server's process group and a child subreaper. It reads a pipe from
//! prefgen; the pipe ends when prefgen ends, however it ends, and then the
//! reaper stops the group. It knows nothing of models or stages.

use anyhow::{Context, Result, bail};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The hidden first argument that makes prefgen a reaper.
pub const REAPER: &str = "__reap-launched-server";

/// Restarts of one server in a run, after which its failure is the run's.
pub const RESTARTS: u32 = 3;

/// How long a stopped server has between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

/// A server started by prefgen, stopped when dropped.
pub struct Launched {
    /// The command as the user wrote it, for messages.
    command: String,
    /// With `{port}` and `{model}` substituted: what the shell runs.
    expanded: String,
    port: u16,
    log: PathBuf,
    timeout: Duration,
    reaper: Child,
    /// Closing it tells the reaper to stop the server.
    lifeline: Option<ChildStdin>,
    restarts: u32,
}

impl Launched {
    /// Starts `command` (which must contain `{port}`; `{model}` becomes
    /// `model`, quoted for the shell) with its output appended to `log`,
    /// and waits up to `timeout` until `GET /v1/models` answers.
    pub fn start(command: &str, model: &Path, timeout: Duration, log: &Path) -> Result<Launched> {
        if !command.contains("{port}") {
            bail!("{command:?} does not contain {{port}}: prefgen picks the port the server listens on");
        }
        let port = free_port()?;
        let expanded = command
            .replace("{port}", &port.to_string())
            .replace("{model}", &crate::slurm::quote(&model.display().to_string()));
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let (reaper, lifeline) = spawn(&expanded, log)?;
        let mut launched = Launched {
            command: command.to_string(),
            expanded,
            port,
            log: log.to_path_buf(),
            timeout,
            reaper,
            lifeline: Some(lifeline),
            restarts: 0,
        };
        launched.wait_until_answering()?;
        Ok(launched)
    }

    /// The server's OpenAI-compatible base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The file its output goes to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `` `COMMAND` (its output: LOG) ``, for messages.
    pub fn describe(&self) -> String {
        format!("`{}` (its output: {})", self.command, self.log.display())
    }

    /// Whether it is running and answers `GET /v1/models` within seconds.
    pub fn healthy(&mut self) -> bool {
        matches!(self.reaper.try_wait(), Ok(None)) && answers(&self.url(), Duration::from_secs(5))
    }

    /// Stops it and starts it again on the same port (so its URL holds),
    /// at most [`RESTARTS`] times.
    pub fn restart(&mut self) -> Result<()> {
        if self.restarts >= RESTARTS {
            bail!("{} failed again after {RESTARTS} restarts", self.describe());
        }
        self.restarts += 1;
        self.stop();
        eprintln!("restarting {} ({} of {RESTARTS})", self.describe(), self.restarts);
        let (reaper, lifeline) = spawn(&self.expanded, &self.log)?;
        (self.reaper, self.lifeline) = (reaper, Some(lifeline));
        self.wait_until_answering()
    }

    fn wait_until_answering(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut said = Duration::ZERO;
        eprintln!("launched {} on port {}; waiting for it to answer", self.describe(), self.port);
        loop {
            if let Some(status) = self.reaper.try_wait().context("cannot wait for the launched server")? {
                self.lifeline = None;
                bail!("{} exited ({}) before it answered{}", self.describe(), exit_text(status), tail(&self.log));
            }
            if answers(&self.url(), Duration::from_secs(2)) {
                eprintln!("{} answers after {:.1}s", self.url(), started.elapsed().as_secs_f64());
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= self.timeout {
                self.stop();
                bail!(
                    "{} did not answer on {} within {}s, its launch timeout{}",
                    self.describe(),
                    self.url(),
                    self.timeout.as_secs(),
                    tail(&self.log)
                );
            }
            if waited >= said + Duration::from_secs(15) {
                said = waited;
                eprintln!("waiting for {}: {}s of {}s", self.describe(), waited.as_secs(), self.timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops the server and waits for its reaper: the pipe closed, the
    /// reaper stops the group; should the reaper not end, the group is
    /// killed from here.
    fn stop(&mut self) {
        self.lifeline = None;
        // Past the reaper's own SIGTERM, grace and SIGKILL pass, so this
        // fallback never cuts that pass short (it alone reaches workers
        // that left the group).
        let deadline = Instant::now() + 2 * GRACE;
        while Instant::now() < deadline {
            if !matches!(self.reaper.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: kill(2) with a negative pid signals the reaper's group.
        unsafe { libc::kill(-(self.reaper.id() as i32), libc::SIGKILL) };
        let _ = self.reaper.wait();
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        eprintln!("stopping {}", self.describe());
        self.stop();
    }
}

/// A port on 127.0.0.1 that nothing listens on now.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Starts the reaper, which starts `command`; output appended to `log`.
fn spawn(command: &str, log: &Path) -> Result<(Child, ChildStdin)> {
    use std::os::unix::process::CommandExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    writeln!(file, "--- prefgen launches: {command}")?;
    let exe = std::env::current_exe().context("cannot find prefgen's own executable to run the reaper")?;
    let mut reaper = Command::new(exe)
        .arg(REAPER)
        .arg(GRACE.as_secs().to_string())
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(file.try_clone()?)
        .stderr(file)
        // The group the server joins; not the terminal's, so Ctrl-C reaches
        // prefgen alone, and prefgen's end then stops the server.
        .process_group(0)
        .spawn()
        .context("cannot start the reaper for a launched server")?;
    let lifeline = reaper.stdin.take().expect("stdin is piped");
    Ok((reaper, lifeline))
}

/// Whether `GET {url}/models` answers within `timeout`: anything but 5xx
/// (llama.cpp answers 503 while it loads; a server started with an API key
/// answers 401 to this keyless request once it is up).
fn answers(url: &str, timeout: Duration) -> bool {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    match agent.get(&format!("{url}/models")).call() {
        Ok(_) => true,
        Err(ureq::Error::Status(code, _)) => code < 500,
        Err(ureq::Error::Transport(_)) => false,
    }
}

fn exit_text(status: std::process::ExitStatus) -> String {
    match status.code() {
        Some(3) => "the server exited".to_string(),
        _ => status.to_string(),
    }
}

/// The last lines of the log, for an error.
fn tail(log: &Path) -> String {
    let text = std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = &lines[lines.len().saturating_sub(5)..];
    if last.is_empty() { String::new() } else { format!("; its last lines: {}", last.join(" | ")) }
}

/// The reaper's exit status when the server exited by itself.
const SERVER_EXITED: u8 = 3;

/// The reaper: `prefgen REAPER GRACE_SECS COMMAND`. Runs `sh -c COMMAND`
/// in its own process group (which prefgen made it the leader of), and
/// stops it when its stdin ends (prefgen is done, or dead); when the
/// server exits by itself, stops what it left and exits with 3.
pub fn reaper(args: &[OsString]) -> ExitCode {
    let [grace, command] = args else {
        eprintln!("prefgen {REAPER}: expected GRACE_SECS COMMAND");
        return ExitCode::FAILURE;
    };
    let grace = Duration::from_secs(grace.to_str().and_then(|g| g.parse().ok()).unwrap_or(10));
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installing a handler that does nothing. A handler (unlike
    // SIG_IGN) is reset by exec, so the server still gets these signals;
    // the reaper outlives them to stop what they leave.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(sig, ignore as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
        // Orphaned descendants (a worker whose parent died) become ours.
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let server = match Command::new("sh").arg("-c").arg(command).stdin(Stdio::null()).spawn() {
        Ok(c) => c.id() as i32,
        Err(e) => {
            eprintln!("prefgen: cannot run sh: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        // Ends at EOF, or at an error: either way prefgen is gone.
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(());
    });
    loop {
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            stop_descendants(grace);
            return ExitCode::SUCCESS;
        }
        if let Some(status) = reap_children(server) {
            eprintln!("prefgen: the launched server exited ({status})");
            stop_descendants(grace);
            return ExitCode::from(SERVER_EXITED);
        }
    }
}

/// Reaps exited children (orphans included); `Some` with its status once
/// `server` (the direct child) is among them.
fn reap_children(server: i32) -> Option<String> {
    let mut found = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on our own children.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return found;
        }
        if pid == server {
            found = Some(if libc::WIFEXITED(status) {
                format!("exit status {}", libc::WEXITSTATUS(status))
            } else {
                format!("signal {}", libc::WTERMSIG(status))
            });
        }
    }
}

/// SIGTERM to every process of the group and every descendant, then,
/// after `grace`, SIGKILL to what is left.
fn stop_descendants(grace: Duration) {
    let deadline = Instant::now() + grace;
    let mut signal = libc::SIGTERM;
    let mut last = Instant::now() + Duration::from_secs(5);
    loop {
        reap_children(0);
        let left = descendants();
        if left.is_empty() {
            return;
        }
        for pid in &left {
            // SAFETY: kill(2) on a process of our group or below us.
            unsafe { libc::kill(*pid, signal) };
        }
        if signal == libc::SIGTERM {
            eprintln!("prefgen: stopping the launched server (SIGTERM to {} processes)", left.len());
            signal = 0; // sent once; then only watched
        }
        if signal == 0 && Instant::now() >= deadline {
            eprintln!("prefgen: {} processes still running after {}s: SIGKILL", left.len(), grace.as_secs());
            signal = libc::SIGKILL;
            last = Instant::now() + Duration::from_secs(5);
        }
        if signal == libc::SIGKILL && Instant::now() >= last {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The live processes in this process's group or below it, itself aside.
fn descendants() -> Vec<i32> {
    let me = std::process::id() as i32;
    // pid -> (parent, group), from /proc/PID/stat; zombies left out.
    let mut procs = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // After the command name's closing parenthesis: state, ppid, pgrp.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(ppid), Some(pgrp)) = (fields.first(), fields.get(1), fields.get(2)) else { continue };
        if *state == "Z" {
            continue;
        }
        if let (Ok(ppid), Ok(pgrp)) = (ppid.parse::<i32>(), pgrp.parse::<i32>()) {
            procs.insert(pid, (ppid, pgrp));
        }
    }
    let below = |mut pid: i32| {
        for _ in 0..64 {
            match procs.get(&pid) {
                Some(&(ppid, _)) if ppid == me => return true,
                Some(&(ppid, _)) if ppid > 1 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    procs.iter().filter(|&(&pid, &(_, pgrp))| pid != me && (pgrp == me || below(pid))).map(|(&pid, _)| pid).collect()
}
