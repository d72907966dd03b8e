//! Prompts from a hub dataset, resolved through a local snapshot laid out as
//! the Hugging Face cache lays it out (blobs, symlinked snapshots, refs).

mod common;

use common::*;

fn hub_recipe(column: &str, revision: &str) -> String {
    format!(
        r#"name = "hub"
[prompts]
dataset = "prefgen-test/tiny_prefs"
revision = "{revision}"
column = "{column}"
splits = {{ train = "train_prefs", test = "test_prefs" }}
[generate]
seeds = [1, 2]
import = "g/{{split}}/output_{{seed}}.json"
[annotate]
import = "{{split}}.json"
[export]
dir = "out"
"#
    )
}

fn run_prompts(p: &Project, recipe: &str) -> Run {
    let path = p.write("r.toml", recipe);
    let mut c = p.command(&["run", path.to_str().unwrap(), "prompts"]);
    c.env("HF_HOME", fixtures().join("hf_home")).env_remove("HF_HUB_CACHE");
    Run(c.output().unwrap())
}

#[test]
fn hub_prompts_come_from_the_cache_offline() {
    let p = Project::new();
    for (column, revision) in [("prompt", "main"), ("messages", "0123456789abcdef0123456789abcdef01234567")] {
        let run = run_prompts(&p, &hub_recipe(column, revision));
        assert!(run.0.status.success(), "{}", run.stderr());
        let err = run.stderr();
        assert!(err.contains("from prefgen-test/tiny_prefs@0123456789abcdef0123456789abcdef01234567"), "{err}");
        // 12 train rows over 10 distinct prompts; 5 test rows over 3.
        assert!(err.contains("built prompts[train] in") && err.contains("prompts=10, source_rows=12"), "{err}");
        assert!(err.contains("prompts=3, source_rows=5"), "{err}");
    }
}

#[test]
fn a_snapshot_missing_offline_is_a_clear_error() {
    let p = Project::new();
    let run = run_prompts(&p, &hub_recipe("prompt", "v2.0"));
    assert_ne!(run.code(), Some(0));
    let err = run.stderr();
    assert!(err.contains("dataset prefgen-test/tiny_prefs at revision v2.0 is not in the Hugging Face cache"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn hub_prompts_are_read_sorted_and_unique() {
    let snap = fixtures()
        .join("hf_home/hub/datasets--prefgen-test--tiny_prefs/snapshots/0123456789abcdef0123456789abcdef01234567");
    let files = [snap.join("data/test_prefs-00000-of-00001.parquet")];
    let section = prefgen::recipe::Prompts { column: "messages".into(), ..Default::default() };
    let out = prefgen::stages::prompts::build(&files, &section).unwrap();
    let prompts: Vec<String> = prefgen::formats::simpo::parse_rows(&out.files[0].1, "prompts").unwrap();
    assert_eq!(prompts, ["test_prefs prompt 0", "test_prefs prompt 1", "test_prefs prompt 2"]);
}

/// A model snapshot as the HF cache stores one: blobs named by sha256,
/// snapshot entries linking to them, refs/main naming the commit.
fn model_cache(root: &std::path::Path, src: &std::path::Path) {
    use sha2::{Digest, Sha256};
    let repo = root.join("hub/models--prefgen-test--tiny-llama3");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let blob: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(repo.join("blobs").join(&blob), &bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_hub_model_id_resolves_through_the_cache_offline() {
    let p = Project::new();
    model_cache(&p.path("hf"), &fixtures().join("tiny-llama3"));
    p.write("prompts.jsonl", "{\"prompt\": \"Hi\"}\n{\"prompt\": \"List three prime numbers.\"}\n");
    let recipe = p.write(
        "r.toml",
        "name = \"hubmodel\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"prefgen-test/tiny-llama3\"\nrevision = \"main\"\nseeds = [1]\ntemperature = 0.0\nmax_tokens = 8\n[annotate]\nimport = \"x.json\"\n[export]\ndir = \"out\"\n",
    );
    let run = |args: &[&str]| {
        let mut c = p.command(args);
        c.env("HF_HOME", p.path("hf")).env_remove("HF_HUB_CACHE");
        Run(c.output().unwrap())
    };
    let first = run(&["run", recipe.to_str().unwrap(), "generate"]);
    assert!(first.0.status.success(), "{}", first.stderr());
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(p.path("out/output_1.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows[0]["format_prompt"].as_str().unwrap().starts_with("<|begin_of_text|><|start_header_id|>user"));
    // The model's identity is stable: nothing to rebuild.
    let second = run(&["run", recipe.to_str().unwrap(), "generate"]);
    assert!(second.built().is_empty(), "{}", second.stderr());
    // A local copy of the snapshot is the same model: its key is the same.
    let local = format!("generate.model={}", fixtures().join("tiny-llama3").display());
    let plan = run(&["plan", recipe.to_str().unwrap(), "generate", "--set", &local]).stdout();
    assert!(plan.lines().any(|l| l.starts_with("fresh  generate[train/seed=1]")), "{plan}");
    // A revision the cache lacks is a clear offline error.
    let missing = run(&["run", recipe.to_str().unwrap(), "generate", "--set", "generate.revision=v9"]);
    assert!(
        missing
            .stderr()
            .contains("generate.model: model prefgen-test/tiny-llama3 at revision v9 is not in the Hugging Face cache"),
        "{}",
        missing.stderr()
    );
}

/// The lock records the commit a hub id resolved to; when `main` moves,
/// `plan` shows the drift, `run --locked` refuses, and a plain run updates it.
#[test]
fn the_lock_pins_a_hub_revision() {
    let p = Project::new();
    model_cache(&p.path("hf"), &fixtures().join("tiny-llama3"));
    p.write("prompts.jsonl", "{\"prompt\": \"Hi\"}\n");
    let recipe = p.write(
        "r.toml",
        "name = \"locked\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"prefgen-test/tiny-llama3\"\nseeds = [1]\ntemperature = 0.0\nmax_tokens = 4\n[annotate]\nimport = \"x.json\"\n[export]\ndir = \"out\"\n",
    );
    let r = recipe.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut c = p.command(args);
        c.env("HF_HOME", p.path("hf")).env_remove("HF_HUB_CACHE");
        Run(c.output().unwrap())
    };
    assert!(run(&["run", r, "generate"]).0.status.success());
    let lock = std::fs::read_to_string(p.path("r.lock")).expect("run writes the lock beside the recipe");
    let old = "prefgen-test/tiny-llama3@89abcdef0123456789abcdef0123456789abcdef";
    assert!(lock.contains(old), "{lock}");
    assert!(lock.contains("generate[train/seed=1]"), "{lock}");
    assert!(run(&["run", r, "generate", "--locked"]).0.status.success(), "an unchanged recipe runs locked");
    assert!(run(&["plan", r, "generate"]).stdout().contains("lock: matches"));
    // `main` moves to a new commit (same files).
    let repo = p.path("hf/hub/models--prefgen-test--tiny-llama3");
    let new = "fedcba9876543210fedcba9876543210fedcba98";
    std::fs::create_dir_all(repo.join("snapshots").join(new)).unwrap();
    for e in std::fs::read_dir(repo.join("snapshots/89abcdef0123456789abcdef0123456789abcdef")).unwrap() {
        let e = e.unwrap();
        let target = std::fs::read_link(e.path()).unwrap();
        std::os::unix::fs::symlink(target, repo.join("snapshots").join(new).join(e.file_name())).unwrap();
    }
    std::fs::write(repo.join("refs/main"), new).unwrap();
    let plan = run(&["plan", r, "generate"]).stdout();
    assert!(plan.contains(&format!("lock drift: generate.model: the lock has {old}")), "{plan}");
    let refused = run(&["run", r, "generate", "--locked"]);
    assert_ne!(refused.code(), Some(0));
    assert!(refused.stderr().contains("--locked: the recipe no longer resolves as"), "{}", refused.stderr());
    assert!(refused.stderr().contains(&format!("prefgen-test/tiny-llama3@{new}")), "{}", refused.stderr());
    assert_eq!(std::fs::read_to_string(p.path("r.lock")).unwrap(), lock, "a refused run leaves the lock alone");
    assert!(run(&["run", r, "generate"]).0.status.success());
    assert!(std::fs::read_to_string(p.path("r.lock")).unwrap().contains(new), "a plain run updates the lock");
}
