//! The pipeline end to end on imported generations and scores: SimPO parity,
//! Hugging Face interop, caching, crash safety and bad input.

mod common;

use common::*;
use std::collections::BTreeSet;

const SEEDS: [u64; 5] = [13, 21, 42, 79, 100];

fn rows(bytes: &[u8]) -> Vec<serde_json::Value> {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn simpo_parity_with_ties_kept() {
    let p = Project::new();
    let recipe = p.write("r.toml", &simpo_recipe());
    p.ok(&["run", recipe.to_str().unwrap(), "--set", "binarize.keep_ties=true"]);
    let fx = fixtures().join("simpo");
    let reference = p.path("reference");
    python(&[
        &script("simpo_reference.py"),
        fx.join("gens").to_str().unwrap(),
        "13,21,42,79,100",
        fx.join("scores.json").to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    let out = p.tree("out");
    for name in ["all_outputs.json", "all_outputs_rm.json", "all_outputs_bin.json"] {
        let want = std::fs::read(reference.join(name)).unwrap();
        assert!(out[name] == want, "{name} differs from SimPO's");
    }
    // The decode files pass through byte for byte.
    for s in SEEDS {
        let name = format!("output_{s}.json");
        assert!(out[&name] == std::fs::read(fx.join("gens").join(&name)).unwrap(), "{name} differs");
    }
    // The fixture has what the parity claim is about.
    let filtered = rows(&out["all_outputs.json"]);
    let bin = rows(&out["all_outputs_bin.json"]);
    let prompts = rows(&out["output_13.json"]).len();
    assert!(filtered.len() < prompts, "some rows are identical across seeds");
    let ties = bin.iter().filter(|r| {
        let s = r["all_rm_scores"].as_array().unwrap();
        s.iter().all(|x| x == &s[0])
    });
    assert!(ties.count() > 0, "some rows have all scores equal");
    assert!(filtered.iter().any(|r| r["all_generated_responses"].as_array().unwrap().iter().any(|t| t == "")));
}

#[test]
fn ties_are_dropped_by_default_and_counted_in_the_card() {
    let p = Project::new();
    let recipe = p.write("r.toml", &simpo_recipe());
    p.ok(&["run", recipe.to_str().unwrap()]);
    let out = p.tree("out");
    let scored = rows(&out["all_outputs_rm.json"]);
    let ties = scored
        .iter()
        .filter(|r| {
            let s = r["all_rm_scores"].as_array().unwrap();
            s.iter().all(|x| x == &s[0])
        })
        .count();
    let bin = rows(&out["all_outputs_bin.json"]);
    assert!(ties > 0);
    assert_eq!(bin.len(), scored.len() - ties);
    let card = String::from_utf8(out["README.md"].clone()).unwrap();
    let prompts = rows(&out["output_13.json"]).len();
    let identical = prompts - scored.len();
    // Imports skip nothing as too long: "-" for both stages.
    let line =
        format!("| train | {prompts} | - / - | {identical} | {} | {ties} | {ties} | {} |", scored.len(), bin.len());
    assert!(card.contains(&line), "card lacks {line:?}:\n{card}");
    assert!(card.contains("binarize.keep_ties = false"));
    assert!(card.starts_with("---\n") && card.contains("num_examples: "));
}

#[test]
fn hugging_face_tools_load_the_exports() {
    let p = Project::new();
    let recipe = p.write("r.toml", &simpo_recipe());
    p.ok(&["run", recipe.to_str().unwrap(), "--set", "export.rows_per_file=7"]);
    let out = p.tree("out");
    assert!(out.contains_key("data/train-00000-of-00006.parquet"), "{:?}", out.keys());
    assert!(out.contains_key("hf/train/data-00005-of-00006.arrow"));
    python(&[&script("hf_interop.py"), p.path("out").to_str().unwrap(), "train"]);
}

#[test]
fn several_splits_go_through_the_whole_dag() {
    let p = Project::new();
    let fx = fixtures().join("simpo");
    for split in ["train", "test"] {
        std::os::unix::fs::symlink(fx.join("gens"), p.path(split)).unwrap();
    }
    let recipe = simpo_recipe()
        .replace(
            &format!("dataset = \"{}/prompts.jsonl\"", fx.display()),
            &format!("dataset = \"{}\"\nsplits = {{ train = \"train\", test = \"test\" }}", fx.display()),
        )
        .replace(&format!("{}/gens/output_{{seed}}", fx.display()), "{split}/output_{seed}");
    // Both splits read the fixture folder's prompts.jsonl (a folder source with
    // no split-named files): point each split at the file itself instead.
    let recipe = recipe
        .replace(&format!("dataset = \"{}\"\n", fx.display()), "")
        .replace(
            "train = \"train\", test = \"test\"",
            &format!("train = \"{0}/prompts.jsonl\", test = \"{0}/prompts.jsonl\"", fx.display()),
        )
        .replace(&format!("{}/scores.json", fx.display()), &format!("{}/scores{{split}}.json", p.path("").display()));
    std::os::unix::fs::symlink(fx.join("scores.json"), p.path("scorestrain.json")).unwrap();
    std::os::unix::fs::symlink(fx.join("scores_v2.json"), p.path("scorestest.json")).unwrap();
    let path = p.write("r.toml", &recipe);
    p.ok(&["run", path.to_str().unwrap()]);
    let out = p.tree("out");
    for f in [
        "train/all_outputs_bin.json",
        "test/all_outputs_bin.json",
        "test/output_42.json",
        "data/test-00000-of-00001.parquet",
        "hf/dataset_dict.json",
    ] {
        assert!(out.contains_key(f), "missing {f}: {:?}", out.keys());
    }
    assert_ne!(
        out["train/all_outputs_bin.json"], out["test/all_outputs_bin.json"],
        "the splits were scored differently"
    );
    python(&[&script("hf_interop.py"), p.path("out").to_str().unwrap(), "train", "test"]);
}

/// Every file under the cache with its modification time.
fn cache_state(p: &Project) -> BTreeSet<(String, std::time::SystemTime)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![p.path("cache")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if !path.to_string_lossy().contains("/locks/") {
                out.insert((path.display().to_string(), path.metadata().unwrap().modified().unwrap()));
            }
        }
    }
    out
}

#[test]
fn a_second_run_builds_nothing_and_writes_nothing() {
    let p = Project::new();
    let recipe = p.write("r.toml", &simpo_recipe());
    let r = recipe.to_str().unwrap();
    let first = p.ok(&["run", r]);
    // prompts, 5 x generate, filter, annotate, binarize, export
    assert_eq!(first.built().len(), 10, "{}", first.stderr());
    let before = cache_state(&p);
    let second = p.ok(&["run", r]);
    assert!(second.built().is_empty());
    assert!(second.stdout().contains("Everything is fresh"), "{}", second.stdout());
    assert_eq!(before, cache_state(&p), "a no-op run wrote to the cache");
    let plan = p.ok(&["plan", r]).stdout();
    let (nodes, rest): (Vec<&str>, Vec<&str>) = plan.lines().partition(|l| !l.starts_with("lock"));
    assert_eq!(nodes.len(), 10);
    assert!(nodes.iter().all(|l| l.starts_with("fresh ")), "{plan}");
    assert_eq!(rest, [format!("lock: matches {}", p.path("r.lock").display())], "the first run wrote the lock");
}

#[test]
fn a_changed_parameter_rebuilds_exactly_what_is_downstream() {
    let p = Project::new();
    let recipe = p.write("r.toml", &simpo_recipe());
    let r = recipe.to_str().unwrap();
    p.ok(&["run", r]);
    let original = p.tree("out");
    let set = |sets: &[&str]| -> Vec<String> {
        let mut args = vec!["run", r];
        for s in sets {
            args.extend(["--set", s]);
        }
        let mut built = p.ok(&args).built();
        built.sort();
        built
    };
    let plan = p.ok(&["plan", r, "--set", "binarize.keep_ties=true"]).stdout();
    assert!(plan.contains("stale  binarize[train]  binarize.keep_ties changed (false -> true)"), "{plan}");
    assert!(plan.contains("stale  export  needs binarize[train], which is stale"), "{plan}");
    assert!(plan.contains("fresh  annotate[train]"), "{plan}");
    assert_eq!(set(&["binarize.keep_ties=true"]), ["binarize[train]", "export"]);

    assert_eq!(set(&["export.rows_per_file=5"]), ["export"]);
    let out = p.tree("out");
    assert!(
        out.contains_key("data/train-00000-of-00008.parquet") && !out.contains_key("data/train-00000-of-00001.parquet")
    );

    let plan = p.ok(&["plan", r, "--set", "filter.drop_identical=false"]).stdout();
    assert!(plan.contains("stale  filter[train]  filter.drop_identical changed (true -> false)"), "{plan}");
    assert_eq!(
        set(&["filter.drop_identical=false"]),
        ["annotate[train]", "binarize[train]", "export", "filter[train]"]
    );

    let v2 = fixtures().join("simpo/scores_v2.json");
    let v2 = format!("annotate.import={}", v2.display());
    let plan = p.ok(&["plan", r, "--set", &v2]).stdout();
    // Reasons are relative to the last build (made with drop_identical=false).
    let line = plan.lines().find(|l| l.starts_with("stale  annotate[train]")).unwrap_or_default();
    assert!(line.contains("input annotate.import changed"), "{plan}");
    assert_eq!(set(&[&v2]), ["annotate[train]", "binarize[train]", "export"]);

    // Back to the original recipe: everything is in the cache already.
    let back = p.ok(&["run", r]);
    assert!(back.built().is_empty(), "{}", back.stderr());
    assert!(p.tree("out") == original, "files of the other builds were left behind or differ");
}

#[test]
fn a_run_killed_mid_way_resumes_to_identical_bytes() {
    let p = Project::new();
    let recipe = synthetic(&p, 3000, &SEEDS, 1000);
    let r = recipe.to_str().unwrap();
    let clean = Project::new();
    std::fs::create_dir_all(clean.path("")).unwrap();
    // The uninterrupted reference, in another cache and export dir.
    let started = std::time::Instant::now();
    let status = p
        .command(&[
            "run",
            r,
            "--cache",
            clean.path("cache").to_str().unwrap(),
            "--set",
            &format!("export.dir={}", clean.path("out").display()),
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let full = started.elapsed();
    // One kill at a known point: the fifth seed built, so the first four are stored.
    let mut child = p
        .command(&["run", r])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let reached = std::io::BufRead::lines(stderr).any(|l| l.unwrap().starts_with("building filter[train]"));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(reached, "the run ended before filter");
    let stored = files_under(&p.path("cache/actions-v3")).len();
    assert!((5..10).contains(&stored), "the kill landed mid-run: {stored} of 10 entries stored");
    // And a few at arbitrary points.
    for fraction in [0.2, 0.45, 0.7] {
        let mut child = p
            .command(&["run", r])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(fraction));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    p.ok(&["run", r]);
    assert!(p.tree("syn-out") == clean.tree("out"), "resumed output differs from an uninterrupted run");
    let verify = p.ok(&["cache", "verify"]);
    assert!(verify.stdout().contains("No damage found"), "{}", verify.stdout());
}

/// The cache object behind a file of the export, found through the manifest.
fn object_of(p: &Project, export_rel: &str) -> std::path::PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("out/.prefgen/manifest.json")).unwrap()).unwrap();
    let digest = manifest["files"][export_rel]["digest"].as_str().unwrap().to_string();
    p.path("cache/objects-v1").join(&digest[..2]).join(&digest)
}

fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_byte_is_detected_and_rebuilt_never_served() {
    let p = Project::new();
    let recipe = p.write("r.toml", &simpo_recipe());
    let r = recipe.to_str().unwrap();
    p.ok(&["run", r]);
    let good = p.tree("out");

    // `cache verify` finds it.
    flip_byte(&object_of(&p, "all_outputs_rm.json"));
    let verify = p.prefgen(&["cache", "verify"]);
    assert_eq!(verify.code(), Some(1));
    assert!(verify.stdout().contains("damaged object"), "{}", verify.stdout());
    assert!(p.ok(&["cache", "verify"]).stdout().contains("No damage found"));
    p.ok(&["run", r]);

    // Read as an input of a stale node: detected, rebuilt, then used.
    flip_byte(&object_of(&p, "all_outputs_rm.json"));
    let run = p.ok(&["run", r, "--set", "binarize.keep_ties=true"]);
    assert!(run.stderr().contains("is damaged"), "{}", run.stderr());
    assert!(run.built().contains(&"annotate[train]".to_string()), "{}", run.stderr());

    // Read to restore a deleted export: detected, rebuilt, then copied.
    p.ok(&["run", r]);
    flip_byte(&object_of(&p, "all_outputs_bin.json"));
    std::fs::remove_dir_all(p.path("out")).unwrap();
    let run = p.ok(&["run", r]);
    assert!(run.stderr().contains("is damaged"), "{}", run.stderr());
    assert!(p.tree("out") == good, "the restored export differs");
}

#[test]
fn two_processes_share_a_cache_without_building_anything_twice() {
    let p = Project::new();
    let recipe = synthetic(&p, 2000, &SEEDS, 800);
    let r = recipe.to_str().unwrap();
    let (a, b) = p.run_two_at_once(r, ["out-a", "out-b"]);
    let mut built: Vec<String> = a.built().into_iter().chain(b.built()).collect();
    let total = built.len();
    built.sort();
    built.dedup();
    assert_eq!(total, built.len(), "a node was built twice:\n{}\n{}", a.stderr(), b.stderr());
    // They ran at the same time: one waited for a node the other was building.
    let waited = |r: &Run| r.stderr().contains("waiting for another prefgen process that is building");
    assert!(waited(&a) || waited(&b), "the two runs did not overlap:\n{}\n{}", a.stderr(), b.stderr());
    assert_eq!(total, 10);
    assert!(p.tree("out-a") == p.tree("out-b"));
    assert!(p.ok(&["cache", "verify"]).stdout().contains("No damage found"));
}

/// Runs a failing command: one clear line on stderr, non-zero exit, cache intact.
fn fails(p: &Project, args: &[&str], expect: &[&str]) {
    common::fails(p, args, expect);
    assert!(p.ok(&["cache", "verify"]).stdout().contains("No damage found"));
}

#[test]
fn bad_input_fails_with_one_clear_message() {
    let p = Project::new();
    let good = simpo_recipe();
    let r = p.write("r.toml", &good);
    let r = r.to_str().unwrap();
    p.ok(&["run", r, "prompts"]);

    p.write("bad.toml", "name = \"unterminated\n");
    fails(&p, &["run", "bad.toml"], &["bad.toml:1:"]);
    p.write("bad.toml", &good.replace("[annotate]", "[annotate]\nbatchsize = 4"));
    fails(&p, &["run", "bad.toml"], &["bad.toml:11:", "batchsize"]);
    fails(&p, &["run", r, "--set", "prompts.column=question"], &["prompts.jsonl", "no column \"question\""]);
    p.write("empty.jsonl", "");
    fails(&p, &["run", r, "--set", "prompts.dataset=empty.jsonl"], &["prompt set is empty"]);
    fails(
        &p,
        &["run", r, "--set", "generate.import=nope/output_{seed}.json"],
        &["generate.import", "nope/output_13.json does not exist"],
    );
    fails(&p, &["run", r, "--set", "annotate.import=nope.json"], &["annotate.import", "nope.json does not exist"]);
    p.write("file", "");
    fails(&p, &["run", r, "--set", "export.dir=file/out"], &["export.dir file/out", "cannot write"]);
    fails(&p, &["run", r, "--set", "generate.top_p=0"], &["--set generate.top_p", "(0, 1]"]);
    fails(&p, &["run", r, "filtr"], &["unknown target \"filtr\""]);
    fails(&p, &["run", "missing.toml"], &["cannot read recipe missing.toml"]);

    // Imports that do not belong to the prompt set.
    let gens = fixtures().join("simpo/gens/output_13.json");
    let mut rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&gens).unwrap()).unwrap();
    rows[3]["prompt"] = "a prompt from another run".into();
    p.write("g/output_13.json", &serde_json::to_string(&rows).unwrap());
    for s in [21, 42, 79, 100] {
        std::fs::copy(fixtures().join(format!("simpo/gens/output_{s}.json")), p.path(&format!("g/output_{s}.json")))
            .unwrap();
    }
    fails(
        &p,
        &["run", r, "--set", "generate.import=g/output_{seed}.json"],
        &["g/output_13.json: row 4", "not in the recipe's prompt set"],
    );
    let mut scored: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixtures().join("simpo/scores.json")).unwrap()).unwrap();
    scored[5]["all_rm_scores"].as_array_mut().unwrap().pop();
    p.write("s.json", &serde_json::to_string(&scored).unwrap());
    fails(&p, &["run", r, "--set", "annotate.import=s.json"], &["s.json: row 6", "5 responses but 4 scores"]);
    assert!(!p.path("out/all_outputs_bin.json").exists(), "nothing downstream of a failure is written");
}

/// `--shard I/N`: workers of a job array each build their slice of the stale
/// shards (every shard once, between them) and write no files; a plain run
/// then builds what is left and writes files identical to an unsharded run.
#[test]
fn job_array_workers_split_the_shards() {
    let p = Project::new();
    let prompts: Vec<String> = (0..6).map(|i| format!("{{\"prompt\": \"Question number {i}?\"}}")).collect();
    p.write("prompts.jsonl", &prompts.join("\n"));
    let r = p.write(
        "r.toml",
        &format!(
            "name = \"array\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"{}\"\nseeds = [1, 2]\nmax_tokens = 6\nshard_size = 1\n[annotate]\nmodel = \"{}\"\nshard_size = 1\n[export]\ndir = \"out\"\n",
            fixtures().join("tiny-llama3").display(),
            fixtures().join("tiny-armorm").display()
        ),
    );
    let r = r.to_str().unwrap();
    let clean = p.path("clean-cache");
    p.ok(&["run", r, "--cache", clean.to_str().unwrap(), "--set", "export.dir=clean"]);
    let shards = |run: &Run, stage: &str| {
        run.stderr()
            .lines()
            .filter(|l| l.starts_with(stage) && l.contains("] shard ") && l.contains("tokens/s"))
            .count()
    };
    let first = p.ok(&["run", r, "--shard", "1/2"]);
    assert!(first.stdout().starts_with("Shard 1/2: "), "{}", first.stdout());
    assert!(!p.path("out").exists(), "a worker writes no files");
    let second = p.ok(&["run", r, "--shard", "2/2"]);
    let (g1, g2) = (shards(&first, "generate"), shards(&second, "generate"));
    assert_eq!(g1 + g2, 12, "6 prompts x 2 seeds, each built once:\n{}\n{}", first.stderr(), second.stderr());
    assert!(g1 > 0 && g2 > 0, "both workers got shards ({g1}, {g2})");
    let last = p.ok(&["run", r]);
    assert_eq!(shards(&last, "generate"), 0, "{}", last.stderr());
    assert_eq!(shards(&second, "annotate") + shards(&last, "annotate"), 6, "every row scored once");
    assert!(p.tree("out") == p.tree("clean"), "files differ from an unsharded run");
    for bad in ["0/2", "3/2", "1", "a/b"] {
        let out = p.prefgen(&["run", r, "--shard", bad]);
        assert_ne!(out.code(), Some(0));
        assert!(out.stderr().contains("expected I/N"), "{}", out.stderr());
    }
}
