//! The cache under stress: `gc` beside a running build and after its grace,
//! and a damaged object that a rebuild reproduces.

mod common;

use common::*;
use std::io::BufRead;

fn count(p: &Project, bucket: &str) -> usize {
    files_under(&p.path(&format!("cache/{bucket}"))).len()
}

/// Unreached entries survive until `--older-than`, objects until the grace
/// period; then they go, and what the last builds reach stays usable.
#[test]
fn gc_removes_what_no_last_build_reaches_once_old_enough() {
    let p = Project::new();
    let recipe = p.write("r.toml", &simpo_recipe());
    let r = recipe.to_str().unwrap();
    p.ok(&["run", r]);
    p.ok(&["run", r, "--set", "binarize.keep_ties=true"]);
    p.ok(&["run", r]); // the last builds are the original recipe's again
    let stray = prefgen::cache::Cache::open(&p.path("cache")).unwrap().put_object(b"nobody references this").unwrap();
    let stray = p.path(&format!("cache/objects-v1/{}/{}", &stray.to_hex()[..2], stray.to_hex()));
    let (entries, objects) = (count(&p, "actions-v3"), count(&p, "objects-v1"));

    // Everything is young: only lock files nobody holds go.
    let young = p.ok(&["cache", "gc"]).stdout();
    assert!(young.contains(": 0 action entries (0 bytes), 0 objects (0 bytes),"), "{young}");
    assert_eq!((count(&p, "actions-v3"), count(&p, "objects-v1")), (entries, objects));
    assert!(files_under(&p.path("cache/locks")).is_empty(), "free locks are removed: {young}");

    for f in files_under(&p.path("cache/actions-v3")).into_iter().chain(files_under(&p.path("cache/objects-v1"))) {
        age(&f, 2 * 86_400);
    }
    // The variant's binarize and export entries are reached by no last build.
    let dry = p.ok(&["cache", "gc", "--older-than", "1d", "--dry-run"]).stdout();
    assert!(dry.starts_with("Would remove") && dry.contains(": 2 action entries ("), "{dry}");
    assert_eq!((count(&p, "actions-v3"), count(&p, "objects-v1")), (entries, objects), "a dry run removes nothing");
    let gc = p.ok(&["cache", "gc", "--older-than", "1d"]).stdout();
    assert!(gc.starts_with("Removed") && gc.contains(": 2 action entries ("), "{gc}");
    assert!(!stray.exists(), "{gc}");
    assert!(count(&p, "objects-v1") < objects - 1, "the variant's own outputs go too: {gc}");
    let kept = p.ok(&["run", r]);
    assert!(kept.built().is_empty(), "what the last builds reach is kept:\n{}", kept.stderr());
    let mut again = p.ok(&["run", r, "--set", "binarize.keep_ties=true"]).built();
    again.sort();
    assert_eq!(again, ["binarize[train]", "export"]);
    assert!(p.ok(&["cache", "verify"]).stdout().contains("No damage found"));
}

/// `gc` run over and over while a build stores shards: it removes the old
/// garbage, the build loses nothing, and its files equal a clean build's.
#[test]
fn gc_beside_a_running_build_removes_garbage_and_nothing_the_build_needs() {
    let p = Project::new();
    let recipe = tiny_recipe(&p, 40, "[generate]\nshard_size = 1\nmax_tokens = 24\n[annotate]\nshard_size = 1");
    let r = recipe.to_str().unwrap();
    let clean = p.path("clean-cache");
    p.ok(&["run", r, "--cache", clean.to_str().unwrap(), "--set", "export.dir=clean"]);
    let cache = prefgen::cache::Cache::open(&p.path("cache")).unwrap();
    let garbage: Vec<_> = (0..3)
        .map(|i| {
            let d = cache.put_object(format!("old garbage {i}").as_bytes()).unwrap().to_hex();
            let path = p.path(&format!("cache/objects-v1/{}/{d}", &d[..2]));
            age(&path, 7200);
            path
        })
        .collect();
    let mut child = p
        .command(&["run", r])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("shard 1/")), "no shard was stored");
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let mut during = 0;
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        p.ok(&["cache", "gc"]);
        // It finished while the build was still running.
        if child.try_wait().unwrap().is_none() {
            during += 1;
        }
    }
    let status = child.wait().unwrap();
    let log = drain.join().unwrap().join("\n");
    assert!(status.success(), "{log}");
    assert!(during > 0, "no gc ran while the build was running");
    eprintln!("{during} gc runs overlapped the build");
    assert!(garbage.iter().all(|g| !g.exists()), "gc removed the old garbage");
    assert!(p.tree("out") == p.tree("clean"), "the build's files differ from a clean build's");
    assert!(p.ok(&["cache", "verify"]).stdout().contains("No damage found"));
    assert!(p.ok(&["run", r]).built().is_empty(), "the build's entries and objects survived");
}

/// The cache object behind a node's output, from the lock.
fn locked_output(p: &Project, node: &str, file: &str) -> (String, std::path::PathBuf) {
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(p.path("r.lock")).unwrap()).unwrap();
    let key = lock["nodes"][node]["key"].as_str().unwrap().to_string();
    let d = lock["nodes"][node]["outputs"][file].as_str().unwrap().to_string();
    (key, p.path(&format!("cache/objects-v1/{}/{d}", &d[..2])))
}

/// An object damaged in the cache, whose entry is gone: the rebuild makes
/// the same bytes, and they, not the damaged ones, reach the export.
#[test]
fn a_damaged_object_a_rebuild_reproduces_never_reaches_the_export() {
    let p = Project::new();
    let recipe = p.write("r.toml", &simpo_recipe());
    let r = recipe.to_str().unwrap();
    let ties = ["--set", "binarize.keep_ties=true"];
    p.ok(&[&["run", r, "--cache", p.path("clean").to_str().unwrap(), "--set", "export.dir=good"][..], &ties].concat());
    let good = std::fs::read(p.path("good/all_outputs_bin.json")).unwrap();
    p.ok(&[&["run", r][..], &ties].concat());
    let (key, object) = locked_output(&p, "binarize[train]", "all_outputs_bin.json");
    p.ok(&["run", r]);
    std::fs::remove_file(p.path(&format!("cache/actions-v3/{}/{key}", &key[..2]))).unwrap();
    let mut bytes = std::fs::read(&object).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x20;
    std::fs::write(&object, &bytes).unwrap();
    let run = p.ok(&[&["run", r][..], &ties].concat());
    assert!(run.built().contains(&"binarize[train]".to_string()), "{}", run.stderr());
    assert!(run.stderr().contains("is damaged; replacing it"), "{}", run.stderr());
    assert!(std::fs::read(p.path("out/all_outputs_bin.json")).unwrap() == good, "the export holds damaged bytes");
    assert!(p.ok(&["cache", "verify"]).stdout().contains("No damage found"));
}

/// Two runs started together on one cache split a node's shards between
/// them (neither waits idle for the other), build each shard once, and end
/// with the same files.
#[test]
fn two_runs_on_one_cache_split_the_shards() {
    let p = Project::new();
    let recipe = tiny_recipe(&p, 30, "[generate]\nshard_size = 1\nmax_tokens = 32\n[annotate]\nshard_size = 1");
    let r = recipe.to_str().unwrap();
    let (a, b) = p.run_two_at_once(r, ["out-a", "out-b"]);
    let shards = |run: &Run, stage: &str| {
        let mut built: Vec<String> = run
            .stderr()
            .lines()
            .filter(|l| l.starts_with(stage) && l.contains("tokens/s)"))
            .map(|l| l.split(':').next().unwrap().to_string())
            .collect();
        built.sort();
        built
    };
    for (stage, total) in [("generate", 60), ("annotate", 30)] {
        let (mine, theirs) = (shards(&a, stage), shards(&b, stage));
        assert!(
            !mine.is_empty() && !theirs.is_empty(),
            "{stage}: one run built every shard ({} / {})",
            mine.len(),
            theirs.len()
        );
        let mut all = [mine, theirs].concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), total, "{stage}: every shard built exactly once");
        assert_eq!(shards(&a, stage).len() + shards(&b, stage).len(), total, "{stage}: a shard was built twice");
    }
    let mut nodes: Vec<String> = a.built().into_iter().chain(b.built()).collect();
    let n = nodes.len();
    nodes.sort();
    nodes.dedup();
    assert_eq!(n, nodes.len(), "a node was built twice");
    assert!(p.tree("out-a") == p.tree("out-b"));
}

#[test]
fn gc_removes_the_leases_of_workers_that_stopped_renewing() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "").display().to_string();
    p.ok(&["run", &r]);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let lease = |name: &str, expires_ms: u64| {
        let hex = format!("{name:0>64}");
        let record =
            serde_json::json!({"owner": name, "host": "gpu-1", "pid": 7, "what": "a shard", "expires_ms": expires_ms});
        p.write(&format!("cache/leases-v1/{}/{hex}/{:020}", &hex[..2], 0), &record.to_string());
        p.path(&format!("cache/leases-v1/{}/{hex}", &hex[..2]))
    };
    let dead = lease("dead", now_ms - 7_200_000);
    let live = lease("beef", now_ms + 60_000);
    let gc = p.ok(&["cache", "gc"]).stdout();
    assert!(gc.contains("1 expired leases"), "{gc}");
    assert!(!dead.exists() && live.exists());
}
