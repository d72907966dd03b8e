//! Sharing a cache: teammates on an S3-compatible server (moto, started on
//! 127.0.0.1) and on a shared folder: read-through, push and pull, signed
//! entries, damaged and forged remote blobs, a server that goes away, an
//! interrupted push, and two pushes at once.

mod common;

use common::*;
use std::process::Command;

fn fails(mut c: Command) -> Run {
    let run = Run(c.output().unwrap());
    assert_eq!(run.code(), Some(1), "{}", run.stderr());
    assert!(!run.stderr().contains("testing-secret"), "a secret was printed");
    run
}

/// Teammate A's project with the tiny recipe built.
fn built(extra: &str) -> (Project, String) {
    let p = Project::new();
    let r = tiny_recipe(&p, 6, extra).display().to_string();
    p.ok(&["run", &r]);
    (p, r)
}

/// The same recipe in an empty project (teammate B).
fn teammate(extra: &str) -> (Project, String) {
    let p = Project::new();
    let r = tiny_recipe(&p, 6, extra).display().to_string();
    (p, r)
}

/// `plan`'s nodes and whether each is fresh, and where.
fn plan_lines(run: &Run) -> Vec<String> {
    run.stdout().lines().filter(|l| l.starts_with("fresh") || l.starts_with("stale")).map(str::to_string).collect()
}

const REMOTE: &str = "s3://team/prefgen";

#[test]
fn a_teammate_downloads_what_was_pushed_instead_of_building_it() {
    let s3 = S3Server::start("team");
    let (a, ra) = built("[generate]\nshard_size = 2\n[annotate]\nshard_size = 2");
    let pushed = ok(on(&a, &s3, &["cache", "push", &ra, "--remote", REMOTE]));
    assert!(pushed.stdout().starts_with("Pushed to s3://team/prefgen: "), "{}", pushed.stdout());
    let again = ok(on(&a, &s3, &["cache", "push", &ra, "--remote", REMOTE]));
    assert!(
        again.stdout().contains(": 0 objects (") && again.stdout().contains("and 0 entries;"),
        "{}",
        again.stdout()
    );

    let (b, rb) = teammate("[generate]\nshard_size = 2\n[annotate]\nshard_size = 2");
    let plan = ok(on(&b, &s3, &["plan", &rb, "--remote", REMOTE]));
    let lines = plan_lines(&plan);
    assert_eq!(lines.len(), 7);
    assert!(lines.iter().all(|l| l.starts_with("fresh") && l.ends_with("(remote s3://team/prefgen)")), "{lines:?}");
    assert!(plan.stdout().contains("note: remote s3://team/prefgen has no trusted_keys"), "{}", plan.stdout());
    // Lookups by key only, bounded by the nodes asked about: the layout
    // marker, each node's entry and a HEAD per output (no listing, no
    // repeat for the lock's drift).
    let requests: usize = plan
        .stderr()
        .lines()
        .find_map(|l| l.strip_prefix("remote s3://team/prefgen: ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no traffic line: {}", plan.stderr()));
    assert!(!b.path("cache/actions-v3").exists(), "plan only looks: it copies nothing");
    let run = ok(on(&b, &s3, &["run", &rb, "--remote", REMOTE]));
    assert!(run.built().is_empty(), "{}", run.stderr());
    let outputs: usize = b
        .tree("cache/actions-v3")
        .iter()
        .map(|(k, e)| prefgen::cache::Stored::open(e, &k.rsplit('/').next().unwrap().parse().unwrap()))
        .map(|e| e.unwrap().entry.outputs.len())
        .sum();
    assert!(requests <= 1 + lines.len() + outputs, "{requests} requests for {} nodes, {outputs} outputs", lines.len());
    assert!(b.tree("out") == a.tree("out"), "the downloaded exports differ");

    // `pull`, then no remote at all: everything is local.
    let (c, rc) = teammate("[generate]\nshard_size = 2\n[annotate]\nshard_size = 2");
    let pulled = ok(on(&c, &s3, &["cache", "pull", &rc, "--remote", REMOTE]));
    assert!(pulled.stdout().starts_with("Pulled "), "{}", pulled.stdout());
    let offline = c.ok(&["run", &rc, "--no-remote"]);
    assert!(offline.built().is_empty(), "{}", offline.stderr());
    assert!(c.tree("out") == a.tree("out"));
}

#[test]
fn run_push_shares_each_shard_as_it_is_stored() {
    let s3 = S3Server::start("team");
    let extra = "[generate]\nshard_size = 1";
    let (a, ra) = teammate(extra);
    ok(on(&a, &s3, &["run", &ra, "--push", "--remote", REMOTE]));
    let (b, rb) = teammate(extra);
    let run = ok(on(&b, &s3, &["run", &rb, "--remote", REMOTE]));
    assert!(run.built().is_empty(), "{}", run.stderr());
    assert!(b.tree("out") == a.tree("out"));
    let verify = ok(on(&a, &s3, &["cache", "verify", "--remote", REMOTE]));
    assert!(verify.stdout().contains("No damage found"), "{}", verify.stdout());
}

/// A `prefgen.toml` whose remote trusts `keys` and signs with `signing`.
fn config(p: &Project, url: &str, keys: &[String], signing: Option<&str>) {
    let keys: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    let sign = signing.map(|s| format!("signing_key = {s:?}\n")).unwrap_or_default();
    p.write(
        "prefgen.toml",
        &format!(
            "[[remotes]]\nurl = {url:?}\nwrite = true\ntrusted_keys = [{}]\n{sign}timeout_secs = 2\nretries = 1\n",
            keys.join(", ")
        ),
    );
}

#[test]
fn forged_entries_and_damaged_objects_on_a_remote_are_never_served() {
    let s3 = S3Server::start("team");
    let (a, ra) = teammate("");
    let key = ok(on(&a, &s3, &["cache", "keygen", "alice"])).stdout().trim().to_string();
    assert!(key.starts_with("alice:"), "{key}");
    assert!(a.path("alice.key").is_file());
    config(&a, REMOTE, std::slice::from_ref(&key), Some("alice.key"));
    ok(on(&a, &s3, &["run", &ra]));
    ok(on(&a, &s3, &["cache", "push", &ra]));
    let good = a.tree("out");
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(a.path("tiny.lock")).unwrap()).unwrap();
    let node = |label: &str| lock["nodes"][label].clone();
    // A forged filter entry: valid JSON and key, its output pointed at the
    // prompts' object; a writer without alice's key can do that.
    let filter_key = node("filter[train]")["key"].as_str().unwrap().to_string();
    let prompts_out = node("prompts[train]")["outputs"]["prompts.json"].as_str().unwrap().to_string();
    let k = format!("prefgen/actions-v3/{}/{filter_key}", &filter_key[..2]);
    let stored = s3.python(&format!("print(s3.get_object(Bucket='team', Key='{k}')['Body'].read().hex())"));
    let stored: Vec<u8> =
        (0..stored.trim().len()).step_by(2).map(|i| u8::from_str_radix(&stored[i..i + 2], 16).unwrap()).collect();
    let forged = forge_entry(&stored, &filter_key, |e| e.outputs[0].digest = prompts_out.parse().unwrap());
    let forged: String = forged.iter().map(|b| format!("{b:02x}")).collect();
    s3.python(&format!("s3.put_object(Bucket='team', Key='{k}', Body=bytes.fromhex('{forged}'))"));
    // A flipped byte in the binarized rows' object.
    let bin = node("binarize[train]")["outputs"]["all_outputs_bin.json"].as_str().unwrap().to_string();
    s3.python(&format!(
        "k = 'prefgen/objects-v1/{}/{bin}'\nb = bytearray(s3.get_object(Bucket='team', Key=k)['Body'].read())\nb[len(b) // 2] ^= 0x20\ns3.put_object(Bucket='team', Key=k, Body=bytes(b))",
        &bin[..2]
    ));
    let (b, rb) = teammate("");
    config(&b, REMOTE, &[key], None);
    let run = ok(on(&b, &s3, &["run", &rb]));
    let err = run.stderr();
    assert!(err.contains(&format!("remote s3://team/prefgen: entry {} is not trusted", &filter_key[..12])), "{err}");
    assert!(err.contains(&format!("remote s3://team/prefgen: object {} is damaged; not used", &bin[..12])), "{err}");
    let built = run.built();
    assert!(built.contains(&"filter[train]".to_string()) && built.contains(&"binarize[train]".to_string()), "{err}");
    assert!(!built.iter().any(|n| n.starts_with("generate")), "the trusted, sound nodes came from the remote: {err}");
    assert!(b.tree("out") == good, "a forged or damaged blob reached the export");
    // `cache verify --remote` reports both, and changes nothing.
    let verify = fails(on(&b, &s3, &["cache", "verify", "--remote", REMOTE]));
    assert!(verify.stdout().contains(&format!("damaged object {bin} (left in place)")), "{}", verify.stdout());
    assert!(verify.stdout().contains(&format!("damaged action entry {filter_key}")), "{}", verify.stdout());
}

#[test]
fn a_server_that_goes_away_is_set_aside_with_one_warning() {
    let mut s3 = S3Server::start("team");
    let extra = "[annotate]\nshard_size = 1";
    let (a, ra) = teammate(extra);
    ok(on(&a, &s3, &["run", &ra, "generate"]));
    ok(on(&a, &s3, &["cache", "push", &ra, "generate", "--remote", REMOTE]));
    let (b, rb) = teammate(extra);
    config(&b, REMOTE, &[], None);
    // B reads the sampled responses from the server, which stops while B scores.
    let log = run_interrupted(on(&b, &s3, &["run", &rb]), "building annotate", || s3.stop());
    assert!(!log.lines().any(|l| l.starts_with("built generate")), "the responses came from the server:\n{log}");
    assert_eq!(log.matches("warning: remote s3://team/prefgen failed").count(), 1, "{log}");
    let (c, _) = built(extra);
    assert!(b.tree("out") == c.tree("out"));
    // push and pull exit non-zero, naming the remote.
    let push = fails(on(&a, &s3, &["cache", "push", &ra, "--remote", REMOTE]));
    assert!(push.stderr().contains("error: cache push to s3://team/prefgen:"), "{}", push.stderr());
}

#[test]
fn an_interrupted_push_leaves_no_entry_without_its_objects_and_pushes_agree() {
    let s3 = S3Server::start("team");
    let p = Project::new();
    let recipe = synthetic(&p, 3000, &[13, 21, 42, 79, 100], 1000);
    let r = recipe.display().to_string();
    p.ok(&["run", &r]);
    // Killed mid-push, more than once.
    for wait in [150, 400] {
        let mut child = on(&p, &s3, &["cache", "push", &r, "--remote", REMOTE])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(wait));
        child.kill().unwrap();
        child.wait().unwrap();
        // Every entry on the bucket names objects the bucket has.
        let report = ok(on(&p, &s3, &["cache", "verify", "--remote", REMOTE]));
        assert!(report.stdout().contains("No damage found"), "{}", report.stdout());
    }
    // Two pushes at once complete it, and agree.
    let push = |_: ()| on(&p, &s3, &["cache", "push", &r, "--remote", REMOTE]).output().unwrap();
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| push(()));
        (x.join().unwrap(), push(()))
    });
    assert!(
        x.status.success() && y.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&x.stderr),
        String::from_utf8_lossy(&y.stderr)
    );
    let b = Project::new();
    let recipe_b = synthetic(&b, 3000, &[13, 21, 42, 79, 100], 1000);
    let run = ok(on(&b, &s3, &["run", recipe_b.to_str().unwrap(), "--remote", REMOTE]));
    assert!(run.built().is_empty(), "{}", run.stderr());
    assert!(b.tree("syn-out") == p.tree("syn-out"));
    // The bucket holds less than the decode files it was built from.
    let stored: u64 = s3
        .python("print(sum(o['Size'] for o in s3.list_objects_v2(Bucket='team', MaxKeys=100000).get('Contents', [])))")
        .trim()
        .parse()
        .unwrap();
    let decode: u64 = files_under(&p.path("syn/gens")).iter().map(|f| f.metadata().unwrap().len()).sum();
    assert!(stored < decode, "the bucket holds {stored} bytes for {decode} of decode files");
}

#[test]
fn teammates_share_a_folder_tier() {
    let shared = tempfile::tempdir().unwrap();
    let url = shared.path().join("prefgen").display().to_string();
    let (a, ra) = teammate("");
    let key = a.ok(&["cache", "keygen", "alice"]).stdout().trim().to_string();
    config(&a, &url, std::slice::from_ref(&key), Some("alice.key"));
    a.ok(&["run", &ra, "--push"]);
    let (b, rb) = teammate("");
    config(&b, &format!("file://{url}"), std::slice::from_ref(&key), None);
    let plan = b.ok(&["plan", &rb]);
    assert!(
        plan_lines(&plan).iter().all(|l| l.starts_with("fresh") && l.contains("(remote file://")),
        "{}",
        plan.stdout()
    );
    let run = b.ok(&["run", &rb]);
    assert!(run.built().is_empty(), "{}", run.stderr());
    assert!(b.tree("out") == a.tree("out"));
    // Group-writable folders, read-only blobs, whatever the writer's umask.
    use std::os::unix::fs::PermissionsExt;
    for f in files_under(shared.path()) {
        let mode = f.metadata().unwrap().permissions().mode() & 0o777;
        if f.to_string_lossy().contains("/objects-v1/") || f.to_string_lossy().contains("/actions-v3/") {
            assert_eq!(mode, 0o444, "{}", f.display());
            let dir = f.parent().unwrap().metadata().unwrap().permissions().mode() & 0o7777;
            assert_eq!(dir, 0o2775, "{}", f.parent().unwrap().display());
        }
    }
    // An entry forged in the folder (unsigned) is ignored; the node is rebuilt.
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(a.path("tiny.lock")).unwrap()).unwrap();
    let k = lock["nodes"]["binarize[train]"]["key"].as_str().unwrap().to_string();
    let entry = shared.path().join(format!("prefgen/actions-v3/{}/{k}", &k[..2]));
    let forged = forge_entry(&std::fs::read(&entry).unwrap(), &k, |_| {});
    std::fs::remove_file(&entry).unwrap();
    std::fs::write(&entry, forged).unwrap();
    let (c, rc) = teammate("");
    config(&c, &url, &[key], None);
    let run = c.ok(&["run", &rc]);
    assert!(run.stderr().contains("is not trusted (it is unsigned)"), "{}", run.stderr());
    assert!(run.built().contains(&"binarize[train]".to_string()), "{}", run.stderr());
    assert!(c.tree("out") == a.tree("out"));
}

#[test]
fn a_remote_of_a_newer_layout_is_left_alone() {
    let s3 = S3Server::start("team");
    s3.python("s3.put_object(Bucket='team', Key='prefgen/prefgen-layout.json', Body=b'{\"layout\": 99}')");
    let (a, ra) = built("");
    let plan = ok(on(&a, &s3, &["plan", &ra, "--remote", REMOTE]));
    assert!(plan.stderr().contains("its layout is 99, which this prefgen does not know"), "{}", plan.stderr());
    let push = fails(on(&a, &s3, &["cache", "push", &ra, "--remote", REMOTE]));
    assert!(push.stderr().contains("left alone"), "{}", push.stderr());
    let keys = s3.python("print(len(s3.list_objects_v2(Bucket='team').get('Contents', [])))");
    assert_eq!(keys.trim(), "1", "nothing was written beside the marker");
}
