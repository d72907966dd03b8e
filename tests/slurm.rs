//! `prefgen slurm` on a real one-node Slurm cluster (Debian's slurm-wlm and
//! munge) that each test starts as root and stops: workers that claim
//! shards over a shared folder and over S3, a worker frozen mid-shard whose
//! shard the others take over, and a recipe with nothing stale.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// munged, slurmctld and slurmd in the foreground, on free ports, with
/// their state in a temporary folder; killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Cluster {
    fn start() -> Cluster {
        assert!(
            Command::new("slurmd").arg("-V").output().is_ok(),
            "slurmd is missing: `make test` installs Debian's slurm-wlm and munge"
        );
        assert_eq!(sh("id -u"), "0", "the Slurm tests start slurmd, which runs as root");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let munge = d.join("munge");
        std::fs::create_dir(&munge).unwrap();
        sh(&format!("chown munge:munge {}", munge.display()));
        let host = sh("hostname -s");
        // More CPUs than the machine has (config_overrides), so three
        // workers and the assembling job fit at once on two cores.
        let conf = format!(
            "ClusterName=prefgentest\nSlurmctldHost={host}\nSlurmctldPort={}\nSlurmdPort={}\n\
             AuthType=auth/munge\nAuthInfo=socket={m}/munge.socket\nCredType=cred/munge\n\
             ProctrackType=proctrack/pgid\nTaskPlugin=task/none\nSelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\nSlurmUser=root\nSlurmdUser=root\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
             AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n\
             JobCompType=jobcomp/none\nMpiDefault=none\nReturnToService=2\nSlurmdParameters=config_overrides\n\
             MinJobAge=600\nSchedulerParameters=sched_interval=1\n\
             NodeName={host} CPUs=8 RealMemory=8000 State=UNKNOWN\n\
             PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
            free_port(),
            free_port(),
            m = munge.display(),
            d = d.display(),
        );
        std::fs::write(d.join("slurm.conf"), conf).unwrap();
        let mut cluster = Cluster { dir, daemons: vec![] };
        let m = munge.display().to_string();
        // munged runs as the munge user; started directly (not through
        // runuser, whose child would outlive it), so killing it stops it.
        let id = |flag: &str| sh(&format!("id {flag} munge")).parse::<u32>().unwrap();
        cluster.spawn(Command::new("munged").uid(id("-u")).gid(id("-g")).args([
            "-F",
            &format!("--socket={m}/munge.socket"),
            &format!("--pid-file={m}/munged.pid"),
            &format!("--log-file={m}/munged.log"),
            &format!("--seed-file={m}/seed"),
        ]));
        wait_for(|| munge.join("munge.socket").exists(), "munged's socket");
        let conf = cluster.conf();
        cluster.spawn(Command::new("slurmctld").args(["-D", "-f", &conf]));
        cluster.spawn(Command::new("slurmd").args(["-D", "-f", &conf]));
        wait_for(
            || {
                let out = cluster.command("sinfo").args(["-h", "-o", "%T"]).output().unwrap();
                String::from_utf8_lossy(&out.stdout).trim() == "idle"
            },
            "the node to be idle",
        );
        cluster
    }

    fn conf(&self) -> String {
        self.dir.path().join("slurm.conf").display().to_string()
    }

    fn spawn(&mut self, cmd: &mut Command) {
        let log = std::fs::File::create(self.dir.path().join(format!("daemon-{}.out", self.daemons.len()))).unwrap();
        let child = cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("a Slurm daemon starts");
        self.daemons.push(child);
    }

    /// A Slurm client (or prefgen) talking to this cluster.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", self.conf());
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Jobs first, then the daemons (the newest first).
        let _ = self.command("scancel").args(["--user", "root"]).output();
        for child in self.daemons.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The cluster's daemons and jobs get a minute.
fn wait_for(ready: impl FnMut() -> bool, what: &str) {
    common::wait_for(Duration::from_secs(60), ready, what)
}

/// Several shards per node, each a few tokens' work.
const EXTRA: &str = "[generate]\nshard_size = 1\nmax_tokens = 24\n[annotate]\nshard_size = 2";
const PROMPTS: usize = 16;

/// The recipe built by one plain process: what the cluster must reproduce.
fn reference() -> Project {
    let p = Project::new();
    let r = tiny_recipe(&p, PROMPTS, EXTRA).display().to_string();
    p.ok(&["run", &r]);
    p
}

/// A cluster, the one-process reference, and a project with the same
/// recipe and an empty cache.
fn start() -> (Cluster, Project, Project) {
    let cluster = Cluster::start();
    let want = reference();
    let p = Project::new();
    tiny_recipe(&p, PROMPTS, EXTRA);
    (cluster, want, p)
}

fn slurm(cluster: &Cluster, p: &Project, args: &[&str]) -> Command {
    let mut c = cluster.command(env!("CARGO_BIN_EXE_prefgen"));
    c.args(["slurm", "tiny.toml"]).args(args).current_dir(p.dir.path());
    c.env("PREFGEN_CACHE", p.path("cache")).env("HF_HUB_OFFLINE", "1");
    c
}

fn logs(p: &Project, run: &str) -> Vec<(PathBuf, String)> {
    let dir = p.path("slurm").join(run);
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|e| e == "log"))
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f, text)
        })
        .collect();
    out.sort();
    out
}

fn all_logs(p: &Project, run: &str) -> String {
    logs(p, run).into_iter().map(|(f, t)| format!("== {}\n{t}", f.display())).collect()
}

/// Shard lines a worker's log has.
fn shards_built(log: &str) -> usize {
    log.lines().filter(|l| l.contains(" shard ") && l.contains(" tokens in ")).count()
}

#[test]
fn workers_share_the_shards_and_the_assembler_matches_one_process() {
    let (cluster, want, p) = start();
    let dry = ok(slurm(&cluster, &p, &["--workers", "3", "--dry-run", "--sbatch=--time=10:00"]));
    assert!(dry.stdout().contains("#SBATCH --array=1-3\n") && dry.stdout().contains("#SBATCH --time=10:00\n"));
    assert!(dry.stdout().contains(" --worker --lease 60\n"), "{}", dry.stdout());
    assert!(dry.stdout().contains("nothing submitted") && !p.path("slurm").exists(), "{}", dry.stdout());
    let run = ok(slurm(&cluster, &p, &["--workers", "3", "--wait", "--lease", "5"]));
    let logs_text = all_logs(&p, "tiny-1");
    assert!(run.stdout().starts_with("Submitted 3 workers (job "), "{}", run.stdout());
    assert!(run.stdout().contains("ended: COMPLETED (exit code 0)"), "{}\n{logs_text}", run.stdout());
    assert!(p.tree("out") == want.tree("out"), "the cluster's exports differ from one process's\n{logs_text}");
    let workers: Vec<(PathBuf, String)> =
        logs(&p, "tiny-1").into_iter().filter(|(f, _)| f.display().to_string().contains("worker-")).collect();
    assert_eq!(workers.len(), 3, "{logs_text}");
    for (f, log) in &workers {
        assert!(shards_built(log) > 0, "{} built no shards:\n{logs_text}", f.display());
        assert!(log.contains("ETA "), "{logs_text}");
        // Workers write nothing under export.dir: the assembling job does.
        assert!(log.contains("Worker: built ") && !log.contains("files written"), "{logs_text}");
    }
    assert!(logs_text.contains("files written under out"), "{logs_text}");

    let again = ok(slurm(&cluster, &p, &["--workers", "3"]));
    assert!(again.stdout().starts_with("Nothing is stale"), "{}", again.stdout());
    assert!(!p.path("slurm/tiny-2").exists(), "nothing was submitted");
}

/// The lease records on a folder tier: (pid, record file).
fn leases(cache: &Path) -> Vec<(i32, PathBuf)> {
    let mut out = Vec::new();
    let Ok(fans) = std::fs::read_dir(cache.join("leases-v1")) else { return out };
    for record in fans.flatten().flat_map(|f| std::fs::read_dir(f.path()).into_iter().flatten().flatten()) {
        for generation in std::fs::read_dir(record.path()).into_iter().flatten().flatten() {
            if let Ok(text) = std::fs::read_to_string(generation.path())
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                out.push((v["pid"].as_i64().unwrap_or(0) as i32, record.path()));
            }
        }
    }
    out
}

#[test]
fn a_worker_frozen_mid_shard_loses_it_to_the_others_after_its_lease() {
    let (cluster, want, p) = start();
    let job = slurm(&cluster, &p, &["--workers", "3", "--wait", "--lease", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Freeze the first worker caught holding a lease (its heartbeat stops
    // with it), wait until another worker takes its shard over, then kill it.
    let started = Instant::now();
    let frozen = loop {
        assert!(started.elapsed() < Duration::from_secs(90), "no worker was caught holding a lease");
        let caught = leases(&p.path("cache")).into_iter().find_map(|(pid, record)| {
            // SAFETY: kill(2) with a pid read from a lease of this test's workers.
            (pid > 0 && unsafe { libc::kill(pid, libc::SIGSTOP) } == 0).then_some((pid, record))
        });
        if let Some((pid, record)) = caught {
            std::thread::sleep(Duration::from_millis(200));
            if record.exists() {
                break pid; // frozen while building: its lease is still there
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // `plan` shows the frozen worker's claim while the job runs.
    let plan = p.ok(&["plan", "tiny.toml"]);
    let host = sh("cat /proc/sys/kernel/hostname");
    assert!(plan.stdout().contains(&format!(" claimed ({host}: ")), "{}", plan.stdout());
    assert!(plan.stdout().contains("; shards: "), "{}", plan.stdout());
    wait_for(|| all_logs(&p, "tiny-1").contains("taking over "), "another worker to take the frozen shard over");
    // SAFETY: as above.
    unsafe { libc::kill(frozen, libc::SIGKILL) };
    let out = job.wait_with_output().unwrap();
    let logs_text = all_logs(&p, "tiny-1");
    assert!(out.status.success(), "{}\n{logs_text}", String::from_utf8_lossy(&out.stdout));
    assert!(logs_text.contains(&format!("(pid {frozen}): its lease expired")), "{logs_text}");
    assert!(p.tree("out") == want.tree("out"), "the result differs after a takeover\n{logs_text}");
}

#[test]
fn workers_share_through_s3_alone() {
    let (cluster, want, p) = start();
    let s3 = S3Server::start("team");
    let mut c = slurm(&cluster, &p, &["--workers", "2", "--wait", "--lease", "5", "--remote", "s3://team/prefgen"]);
    for (k, v) in s3.env() {
        c.env(k, v);
    }
    let run = ok(c);
    let logs_text = all_logs(&p, "tiny-1");
    assert!(logs_text.contains("claiming shards with leases of 5s on s3://team/prefgen"), "{logs_text}");
    assert!(!logs_text.contains("testing-secret") && !run.stdout().contains("testing-secret"));
    let scripts = std::fs::read_to_string(p.path("slurm/tiny-1/worker.sbatch")).unwrap();
    assert!(!scripts.contains("testing-secret"), "credentials were written into a job script");
    assert!(p.tree("out") == want.tree("out"), "{logs_text}");
    // A teammate with an empty cache gets all of it from the bucket.
    let b = Project::new();
    let r = tiny_recipe(&b, PROMPTS, EXTRA).display().to_string();
    let mut c = b.command(&["run", &r, "--remote", "s3://team/prefgen"]);
    for (k, v) in s3.env() {
        c.env(k, v);
    }
    let teammate = ok(c);
    assert!(teammate.built().is_empty(), "{}", teammate.stderr());
    assert!(b.tree("out") == want.tree("out"));
}
