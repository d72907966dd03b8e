//! Slurm: the job scripts of a run (an array of workers and an assembling
//! job that depends on it), their submission with `sbatch`, and waiting for
//! the assembling job with `scontrol`. What the workers run is decided by
//! the caller; this module knows Slurm, not recipes.

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// One job script.
pub struct Script {
    /// `worker.sbatch`, `assemble.sbatch`.
    pub file: &'static str,
    pub text: String,
}

/// What a job runs and how it is named.
pub struct Job<'a> {
    pub name: String,
    /// `--array=1-N`, for the workers.
    pub array: Option<u64>,
    /// Where its log goes (`%a`: the array index).
    pub log: PathBuf,
    /// The user's `--sbatch` options, as `#SBATCH` lines.
    pub options: &'a [String],
    pub cwd: &'a Path,
    /// The command, one argument per item.
    pub command: Vec<String>,
}

/// `arg` quoted for a POSIX shell.
pub fn quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

impl Job<'_> {
    /// The batch script. Options are `#SBATCH` lines, so the script says
    /// how it was submitted; the environment (credentials among it) is
    /// passed by sbatch, never written here.
    pub fn script(&self, file: &'static str) -> Script {
        let mut lines = vec!["#!/bin/bash".to_string(), format!("#SBATCH --job-name={}", quote(&self.name))];
        if let Some(n) = self.array {
            lines.push(format!("#SBATCH --array=1-{n}"));
        }
        lines.push(format!("#SBATCH --output={}", quote(&self.log.display().to_string())));
        lines.extend(self.options.iter().map(|o| format!("#SBATCH {o}")));
        lines.push("set -eu".into());
        lines.push(format!("cd {}", quote(&self.cwd.display().to_string())));
        lines.push(
            r#"echo "$(date -u +%FT%TZ) ${SLURM_JOB_NAME} task ${SLURM_ARRAY_TASK_ID:-0} on $(hostname), GPUs: ${CUDA_VISIBLE_DEVICES:-none}""#
                .into(),
        );
        let command: Vec<String> = self.command.iter().map(|a| quote(a)).collect();
        lines.push(format!("exec {}", command.join(" ")));
        Script { file, text: lines.join("\n") + "\n" }
    }
}

fn run_tool(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what} (is Slurm installed and on PATH?)"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Submits `script` (with more sbatch options before it) and returns the job id.
pub fn submit(script: &Path, extra: &[String]) -> Result<String> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable").args(extra).arg(script);
    let out = run_tool(cmd, &format!("sbatch {}", script.display()))?;
    // `ID` or `ID;CLUSTER`.
    let id = out.split(';').next().unwrap_or_default().trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch {}: unexpected reply {out:?}", script.display());
    }
    Ok(id.to_string())
}

/// How a job ended: its state and exit code.
pub struct Ended {
    pub state: String,
    pub exit_code: i32,
}

/// `JobState=` and `ExitCode=` of one job, from `scontrol show job -o`.
fn job_state(id: &str) -> Result<(String, i32)> {
    let mut cmd = Command::new("scontrol");
    cmd.args(["show", "job", "-o", id]);
    let line = run_tool(cmd, &format!("scontrol show job {id}"))?;
    let field =
        |name: &str| line.split_whitespace().find_map(|f| f.strip_prefix(name)).map(str::to_string).unwrap_or_default();
    let code = field("ExitCode=").split(':').next().and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((field("JobState="), code))
}

/// Waits until job `id` has ended, saying when its state changes.
pub fn wait(id: &str, poll: Duration) -> Result<Ended> {
    let mut said = String::new();
    loop {
        let (state, exit_code) = job_state(id)?;
        if state.is_empty() {
            return Err(anyhow!("scontrol show job {id}: no JobState (was the job purged?)"));
        }
        if state != said {
            eprintln!("job {id}: {state}");
            said = state.clone();
        }
        // Slurm's states that are not final.
        if !matches!(state.as_str(), "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING" | "SUSPENDED" | "REQUEUED") {
            return Ok(Ended { state, exit_code });
        }
        std::thread::sleep(poll);
    }
}

/// The partition the options name (`--partition=P`, `--partition P`, `-p P`).
pub fn partition(options: &[String]) -> Option<String> {
    let mut it = options.iter().flat_map(|o| o.split_whitespace());
    while let Some(o) = it.next() {
        if let Some(p) = o.strip_prefix("--partition=") {
            return Some(p.to_string());
        }
        if o == "--partition" || o == "-p" {
            return it.next().map(str::to_string);
        }
        if let Some(p) = o.strip_prefix("-p").filter(|p| !p.is_empty()) {
            return Some(p.to_string());
        }
    }
    None
}

/// How many nodes the partition (or the default one) has, as `sinfo` says.
pub fn partition_nodes(partition: Option<&str>) -> Result<u64> {
    let mut cmd = Command::new("sinfo");
    cmd.args(["-h", "-o", "%P %D"]);
    let out = run_tool(cmd, "sinfo")?;
    let mut total = 0;
    for line in out.lines() {
        let Some((name, nodes)) = line.split_once(' ') else { continue };
        let is_default = name.ends_with('*');
        let name = name.trim_end_matches('*');
        if partition.map_or(is_default, |p| p == name) {
            total += nodes.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(total)
}

/// The file system type of the mount holding `path`, from /proc/self/mountinfo.
pub fn fs_type(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let (left, right) = line.split_once(" - ")?;
        let mount = left.split_whitespace().nth(4)?;
        let fs = right.split_whitespace().next()?;
        if path.starts_with(mount) && best.as_ref().is_none_or(|(len, _)| mount.len() >= *len) {
            best = Some((mount.len(), fs.to_string()));
        }
    }
    best.map(|(_, fs)| fs)
}

/// Whether a file system type is one machine's own (workers on other nodes
/// cannot see it). Unknown types count as shared.
pub fn is_local_fs(fs: &str) -> bool {
    matches!(fs, "ext2" | "ext3" | "ext4" | "xfs" | "btrfs" | "tmpfs" | "overlay" | "zfs" | "f2fs" | "vfat" | "ramfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_partitions() {
        assert_eq!(quote("plain/path-1.toml"), "plain/path-1.toml");
        assert_eq!(quote("it's a b"), r"'it'\''s a b'");
        assert_eq!(quote(""), "''");
        let opts = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(partition(&opts(&["--gres=gpu:1", "--partition=gpu"])).as_deref(), Some("gpu"));
        assert_eq!(partition(&opts(&["-p cpu"])).as_deref(), Some("cpu"));
        assert_eq!(partition(&opts(&["-pbig"])).as_deref(), Some("big"));
        assert_eq!(partition(&opts(&["--time=1:00:00"])), None);
        assert!(is_local_fs("ext4") && !is_local_fs("nfs4") && !is_local_fs("lustre"));
    }

    #[test]
    fn a_worker_script_names_its_array_log_and_options() {
        let opts = vec!["--gres=gpu:1".to_string()];
        let job = Job {
            name: "prefgen-demo-worker".into(),
            array: Some(3),
            log: "/runs/demo-1/worker-%a.log".into(),
            options: &opts,
            cwd: Path::new("/home/me/project dir"),
            command: vec!["/bin/prefgen".into(), "run".into(), "recipes/demo.toml".into(), "--worker".into()],
        };
        let s = job.script("worker.sbatch").text;
        assert!(s.starts_with("#!/bin/bash\n#SBATCH --job-name=prefgen-demo-worker\n#SBATCH --array=1-3\n"), "{s}");
        assert!(s.contains("#SBATCH --output=/runs/demo-1/worker-%a.log\n#SBATCH --gres=gpu:1\n"), "{s}");
        assert!(s.contains("cd '/home/me/project dir'\n"), "{s}");
        assert!(s.ends_with("exec /bin/prefgen run recipes/demo.toml --worker\n"), "{s}");
    }
}
