//! What a remote stores, and where: a push sets modes only on the folders
//! it creates, a pull lands objects before the entries naming them, a
//! shared folder that vanished is never recreated, and objects stream to
//! and from remotes (moto S3 on 127.0.0.1, and a shared folder) in memory
//! bounded by the transfers in flight, not by an object's size.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const REMOTE: &str = "s3://team/prefgen";

fn mode(path: &Path) -> u32 {
    path.metadata().unwrap().permissions().mode() & 0o7777
}

/// Every folder under `dir`, `dir` aside.
fn folders_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                out.push(path.clone());
                stack.push(path);
            }
        }
    }
    out
}

#[test]
fn a_push_sets_modes_only_on_the_folders_it_creates() {
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A remote prefgen creates (`~/prefgen-remote`), and one in a folder the user made.
    let created = home.path().join("prefgen-remote");
    let made = home.path().join("made");
    std::fs::create_dir(&made).unwrap();
    std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o750)).unwrap();
    let p = Project::new();
    let r = p.write("r.toml", &simpo_recipe()).display().to_string();
    p.ok(&["run", &r]);
    for remote in [&created, &made] {
        p.ok(&["cache", "push", &r, "--remote", &remote.display().to_string()]);
    }
    assert_eq!(mode(home.path()), 0o755, "a push changed the mode of the remote's parent");
    assert_eq!(mode(&made), 0o750, "a push changed the mode of a folder the user made");
    assert_eq!(mode(&created), 0o2775, "the remote prefgen created is shared");
    for remote in [&created, &made] {
        let inside = folders_under(remote);
        assert!(inside.len() > 3, "{inside:?}");
        for d in inside {
            assert_eq!(mode(&d), 0o2775, "{}", d.display());
        }
    }
}

#[test]
fn an_interrupted_pull_leaves_no_entry_without_its_objects() {
    let s3 = S3Server::start("team");
    let a = Project::new();
    let ra = synthetic(&a, 300, &[13, 21, 42], 300).display().to_string();
    a.ok(&["run", &ra]);
    ok(on(&a, &s3, &["cache", "push", &ra, "--remote", REMOTE]));
    // The filter node's object damaged on the bucket: a pull stops there.
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(a.path("syn.lock")).unwrap()).unwrap();
    let filtered = lock["nodes"]["filter[train]"]["outputs"]["all_outputs.json"].as_str().unwrap().to_string();
    let key = format!("prefgen/objects-v1/{}/{filtered}", &filtered[..2]);
    s3.python(&format!(
        "b = bytearray(s3.get_object(Bucket='team', Key='{key}')['Body'].read())\nb[len(b) // 2] ^= 0x20\ns3.put_object(Bucket='team', Key='{key}', Body=bytes(b))"
    ));
    let c = Project::new();
    let rc = synthetic(&c, 300, &[13, 21, 42], 300).display().to_string();
    let pulled = Run(on(&c, &s3, &["cache", "pull", &rc, "--remote", REMOTE]).output().unwrap());
    assert_eq!(pulled.code(), Some(1), "{}", pulled.stderr());
    assert!(pulled.stderr().contains(&format!("object {} is damaged", &filtered[..12])), "{}", pulled.stderr());
    // Every entry that landed names objects that landed.
    let verify = c.ok(&["cache", "verify"]);
    assert!(verify.stdout().contains("No damage found"), "{}", verify.stdout());
    // Repaired on the bucket, the next pull completes it.
    s3.python(&format!("s3.delete_object(Bucket='team', Key='{key}')"));
    ok(on(&a, &s3, &["cache", "push", &ra, "--remote", REMOTE]));
    ok(on(&c, &s3, &["cache", "pull", &rc, "--remote", REMOTE]));
    let offline = c.ok(&["run", &rc, "--no-remote"]);
    assert!(offline.built().is_empty(), "{}", offline.stderr());
    assert!(c.tree("syn-out") == a.tree("syn-out"));
}

#[test]
fn a_shared_folder_remote_that_vanished_is_not_recreated() {
    let shared = tempfile::tempdir().unwrap();
    let url = shared.path().join("prefgen");
    let url_s = url.display().to_string();
    let extra = "[annotate]\nshard_size = 1";
    let a = Project::new();
    let ra = tiny_recipe(&a, 6, extra).display().to_string();
    a.ok(&["run", &ra, "generate"]);
    a.ok(&["cache", "push", &ra, "generate", "--remote", &url_s]);
    // B reads the responses from the folder and pushes what it builds; the
    // folder goes while B scores, leaving its mount point behind.
    let b = Project::new();
    let rb = tiny_recipe(&b, 6, extra).display().to_string();
    let moved = shared.path().join("unmounted");
    let log = run_interrupted(b.command(&["run", &rb, "--push", "--remote", &url_s]), "building annotate", || {
        std::fs::rename(&url, &moved).unwrap();
        std::fs::create_dir(&url).unwrap();
    });
    assert!(!log.lines().any(|l| l.starts_with("built generate")), "the responses came from the folder:\n{log}");
    assert_eq!(log.matches(&format!("warning: remote {url_s} failed")).count(), 1, "{log}");
    assert!(log.contains("has no layout marker"), "{log}");
    let left: Vec<_> = std::fs::read_dir(&url).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "the vanished remote was recreated: {left:?}");

    // A folder that holds files but no marker is no remote prefgen wrote:
    // a push leaves it alone, and a plan says so, naming it.
    let moved_s = moved.display().to_string();
    std::fs::remove_file(moved.join("prefgen-layout.json")).unwrap();
    let push = a.prefgen(&["cache", "push", &ra, "generate", "--remote", &moved_s]);
    assert_eq!(push.code(), Some(1), "{}", push.stderr());
    let said = format!("remote {moved_s}: it holds files but no layout marker");
    assert!(push.stderr().contains(&said), "{}", push.stderr());
    assert!(!moved.join("prefgen-layout.json").exists(), "the marker was recreated");
    let plan = a.ok(&["plan", &ra, "--remote", &moved_s]);
    assert!(plan.stderr().contains(&said), "{}", plan.stderr());
}

#[test]
fn push_and_pull_stream_objects_in_memory_bounded_by_the_transfers_not_their_size() {
    let s3 = S3Server::start("team");
    let shared = tempfile::tempdir().unwrap();
    let folder = shared.path().join("prefgen").display().to_string();
    // One seed of 20,000 responses of 10 kB: a generate object of about 200 MB.
    let (n, len) = (20_000, 10_000);
    let a = Project::new();
    let ra = synthetic(&a, n, &[13], len).display().to_string();
    a.ok(&["run", &ra, "generate"]);
    let largest = files_under(&a.path("cache/objects-v1")).iter().map(|f| f.metadata().unwrap().len()).max().unwrap();
    assert!(largest > 150_000_000, "{largest}");
    let c = Project::new();
    let rc = synthetic(&c, n, &[13], len).display().to_string();
    for remote in [REMOTE, &folder] {
        let (pushed, push_peak) = peak_rss(on(&a, &s3, &["cache", "push", &ra, "generate", "--remote", remote]));
        assert!(pushed.0.status.success(), "{}", pushed.stderr());
        let _ = std::fs::remove_dir_all(c.path("cache"));
        let (pulled, pull_peak) = peak_rss(on(&c, &s3, &["cache", "pull", &rc, "generate", "--remote", remote]));
        assert!(pulled.0.status.success(), "{}", pulled.stderr());
        for (what, peak) in [("push", push_peak), ("pull", pull_peak)] {
            eprintln!("{what} of a {largest}-byte object through {remote}: peak RSS {peak} bytes");
            assert!(peak < largest / 2, "{what} to {remote} peaked at {peak} bytes for an object of {largest}");
        }
        let offline = c.ok(&["run", &rc, "generate", "--no-remote"]);
        assert!(offline.built().is_empty(), "{}", offline.stderr());
        assert!(c.tree("cache/objects-v1") == a.tree("cache/objects-v1"));
    }
}

#[test]
fn a_large_incompressible_object_goes_up_in_parts_and_a_damaged_one_not_at_all() {
    let s3 = S3Server::start("team");
    // 6,000 responses of 10 kB of random letters: a 60 MB generate object
    // that zstd cannot shrink below three 16 MiB parts.
    let (n, len) = (6_000, 10_000);
    let write = |p: &Project| {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut letter = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (b'A' + (state % 52) as u8 + if state % 52 >= 26 { 6 } else { 0 }) as char
        };
        let prompts: Vec<String> = (0..n).map(|i| format!("prompt {i:05}")).collect();
        let rows: Vec<serde_json::Value> = prompts
            .iter()
            .map(|pr| {
                let text: String = (0..len).map(|_| letter()).collect();
                serde_json::json!({"prompt": pr, "format_prompt": pr, "generated_text": text})
            })
            .collect();
        let lines: Vec<String> = prompts.iter().map(|pr| serde_json::json!({ "prompt": pr }).to_string()).collect();
        p.write("prompts.jsonl", &lines.join("\n"));
        p.write("gens/output_1.json", &serde_json::to_string(&rows).unwrap());
        p.write("scores.json", "[]");
        p.write(
            "r.toml",
            "name = \"random\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nseeds = [1]\nimport = \"gens/output_{seed}.json\"\n[annotate]\nimport = \"scores.json\"\n[export]\ndir = \"out\"\n",
        )
        .display()
        .to_string()
    };
    let a = Project::new();
    let ra = write(&a);
    a.ok(&["run", &ra, "generate"]);
    let pushed = ok(on(&a, &s3, &["cache", "push", &ra, "generate", "--remote", REMOTE]));
    let sent: f64 =
        pushed.stdout().split(" objects (").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(sent > 34.0, "{sent} MB sent: not over two parts\n{}", pushed.stdout());
    let c = Project::new();
    let rc = write(&c);
    ok(on(&c, &s3, &["cache", "pull", &rc, "generate", "--remote", REMOTE]));
    let offline = c.ok(&["run", &rc, "generate", "--no-remote"]);
    assert!(offline.built().is_empty(), "{}", offline.stderr());
    assert!(c.tree("cache/objects-v1") == a.tree("cache/objects-v1"));

    // A local object damaged after it was stored never reaches the bucket:
    // the push fails naming it, and the upload is abandoned.
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(a.path("r.lock")).unwrap()).unwrap();
    let digest = lock["nodes"]["generate[train/seed=1]"]["outputs"]["output_1.json"].as_str().unwrap().to_string();
    let object = a.path(&format!("cache/objects-v1/{}/{digest}", &digest[..2]));
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, bytes).unwrap();
    let other = "s3://team/other";
    let push = Run(on(&a, &s3, &["cache", "push", &ra, "generate", "--remote", other]).output().unwrap());
    assert_eq!(push.code(), Some(1), "{}", push.stderr());
    let said = format!("object {} of the local cache does not hash to its name", &digest[..12]);
    assert!(push.stderr().contains(&said), "{}", push.stderr());
    let stored = s3.python(&format!(
        "print(len(s3.list_objects_v2(Bucket='team', Prefix='other/objects-v1/{}/{digest}').get('Contents', [])))",
        &digest[..2]
    ));
    assert_eq!(stored.trim(), "0", "a damaged object reached the bucket");
}
