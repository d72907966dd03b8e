//! What enters a key, tested from the recipe's own declarations: every key
//! that can change an output makes exactly the nodes downstream of its stage
//! stale, naming it; every key that cannot leaves everything fresh. A model
//! is keyed by the files its loader reads, and what computed a result is
//! recorded beside it.

mod common;

use common::*;
use prefgen::recipe::{Recipe, section::Role};
use prefgen::stages::Stage;
use std::collections::BTreeMap;

/// A value each keyed or free recipe key is changed to. A key declared
/// after this table was written makes the test fail until it has one.
const PROBES: &[(&str, &str)] = &[
    ("name", "renamed"),
    ("prompts.column", "question"),
    ("prompts.limit", "3"),
    ("generate.temperature", "0.5"),
    ("generate.top_p", "0.5"),
    ("generate.max_tokens", "5"),
    ("generate.batch_size", "3"),
    ("generate.shard_size", "2"),
    ("generate.vllm_compat", "true"),
    ("generate.template_kwargs", "{enable_thinking=false}"),
    ("generate.served_model", "another-name"),
    ("generate.concurrency", "3"),
    ("generate.request_timeout_secs", "5"),
    ("generate.request_retries", "1"),
    ("generate.launch_timeout_secs", "5"),
    ("generate.requests_per_minute", "60"),
    ("generate.api_key_env", "OTHER_KEY"),
    ("filter.drop_identical", "false"),
    ("annotate.kind", "\"armorm\""),
    ("annotate.max_length", "64"),
    ("annotate.overflow", "\"skip\""),
    ("annotate.batch_size", "3"),
    ("annotate.shard_size", "2"),
    ("annotate.template_kwargs", "{enable_thinking=false}"),
    ("annotate.launch_timeout_secs", "5"),
    ("annotate.served_model", "another-name"),
    ("annotate.concurrency", "3"),
    ("annotate.request_timeout_secs", "5"),
    ("annotate.request_retries", "1"),
    ("annotate.requests_per_minute", "60"),
    ("annotate.api_key_env", "OTHER_KEY"),
    ("binarize.keep_ties", "true"),
    ("export.dir", "elsewhere"),
    ("export.rows_per_file", "2"),
    ("export.license", "apache-2.0"),
];

/// `plan`'s lines: node label -> (fresh, reason or key).
fn plan(p: &Project, args: &[&str]) -> BTreeMap<String, (bool, String)> {
    let out = p.ok(&[&["plan"][..], args].concat()).stdout();
    out.lines()
        .filter(|l| !l.starts_with("lock"))
        .map(|l| {
            let mut parts = l.splitn(3, "  ");
            let state = parts.next().unwrap();
            let label = parts.next().unwrap().to_string();
            (label, (state == "fresh", parts.next().unwrap_or_default().to_string()))
        })
        .collect()
}

fn setup(p: &Project) -> String {
    let recipe = tiny_recipe(p, 6, "");
    // Two columns with the same prompts, so `prompts.column` has somewhere to go.
    let lines: Vec<String> = (0..6)
        .map(|i| format!("{{\"prompt\": \"Question number {i}?\", \"question\": \"Question number {i}?\"}}"))
        .collect();
    p.write("prompts.jsonl", &lines.join("\n"));
    let r = recipe.display().to_string();
    p.ok(&["run", &r]);
    r
}

#[test]
fn every_key_that_changes_an_output_makes_exactly_its_downstream_stale() {
    let p = Project::new();
    let r = setup(&p);
    let graph = prefgen::plan::Graph::new(Recipe::load(std::path::Path::new(&r), &[]).unwrap()).unwrap();
    let labels: Vec<String> = graph.nodes.iter().map(|n| n.label()).collect();
    let base = plan(&p, &[&r]);
    assert!(base.values().all(|(fresh, _)| *fresh), "{base:?}");
    for field in Recipe::fields() {
        if matches!(field.role, Role::Source(_) | Role::Shape(_)) {
            continue; // tested below by what they name
        }
        let Some((_, value)) = PROBES.iter().find(|(k, _)| *k == field.key) else {
            panic!("{} has no probe value: add one to PROBES", field.key);
        };
        let now = plan(&p, &[&r, "--set", &format!("{}={value}", field.key)]);
        assert_eq!(now.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>());
        if let Role::Free(_) = field.role {
            assert!(now.values().all(|(fresh, _)| *fresh), "{} cannot change an output, yet: {now:?}", field.key);
            continue;
        }
        let section = field.key.split_once('.').map_or("", |(s, _)| s);
        let stage = Stage::from_name(section).unwrap_or(Stage::Export);
        // The nodes of its stage, and everything that reads or records them.
        let mut stale: Vec<bool> = graph.nodes.iter().map(|n| n.stage() == stage).collect();
        for (i, n) in graph.nodes.iter().enumerate() {
            if n.deps.iter().chain(&n.key_deps).any(|&d| stale[d]) {
                stale[i] = true;
            }
        }
        for (i, label) in labels.iter().enumerate() {
            let (fresh, why) = &now[label];
            match (stale[i], graph.nodes[i].stage() == stage) {
                (false, _) => assert!(fresh, "--set {}: {label} went stale ({why})", field.key),
                // A renamed recipe has no past builds to compare with.
                (true, true) if field.key == "name" => assert!(!fresh && why == "never built", "{label}: {why}"),
                (true, true) => {
                    // A table left empty is not in the key: set, it is new.
                    let named = [format!("{} changed", field.key), format!("{} is new", field.key)];
                    assert!(!fresh && named.iter().any(|n| why.contains(n)), "--set {}: {label}: {why}", field.key)
                }
                (true, false) => assert!(!fresh && why.starts_with("needs "), "--set {}: {label}: {why}", field.key),
            }
        }
    }
    // The seeds' order keys filter, not the seeds' own nodes.
    let swapped = plan(&p, &[&r, "--set", "generate.seeds=[2, 1]"]);
    assert!(swapped["generate[train/seed=1]"].0 && swapped["generate[train/seed=2]"].0, "{swapped:?}");
    assert!(swapped["filter[train]"].1.contains("generate.seeds changed"), "{swapped:?}");
    // A template names a file: its contents are keyed.
    let template = std::fs::read_to_string(fixtures().join("tiny-llama3/chat_template.jinja")).unwrap();
    p.write("same.jinja", &template);
    p.write("other.jinja", &format!("{template}\n"));
    let same = plan(&p, &[&r, "--set", "generate.chat_template=same.jinja"]);
    assert!(same["generate[train/seed=1]"].1.contains("input generate.chat_template is new"), "{same:?}");
    p.ok(&["run", &r, "--set", "generate.chat_template=same.jinja"]);
    let other = plan(&p, &[&r, "--set", "generate.chat_template=other.jinja"]);
    assert!(other["generate[train/seed=1]"].1.contains("input generate.chat_template changed"), "{other:?}");
}

/// Copies a model folder, then `change`s the copy.
fn copy_model(p: &Project, name: &str, change: impl Fn(&std::path::Path)) -> String {
    let dir = p.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-llama3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    change(&dir);
    dir.display().to_string()
}

#[test]
fn a_model_is_keyed_by_the_files_its_loader_reads() {
    let p = Project::new();
    let r = setup(&p);
    let extra = copy_model(&p, "with-extras", |d| {
        std::fs::write(d.join("README.md"), "# a model card").unwrap();
        std::fs::create_dir_all(d.join("original")).unwrap();
        std::fs::write(d.join("original/consolidated.00.pth"), "other weights").unwrap();
        std::fs::write(d.join("pytorch_model.bin"), "the same weights, another format").unwrap();
    });
    let now = plan(&p, &[&r, "--set", &format!("generate.model={extra}")]);
    for (label, (fresh, why)) in &now {
        if label == "export" {
            // The card names the model by its path: only it is rebuilt.
            assert!(!fresh && why.starts_with("input provenance generate"), "{why}");
        } else {
            assert!(fresh, "files the loader does not read changed the key of {label}: {why}");
        }
    }
    let changed = copy_model(&p, "changed", |d| {
        let config = std::fs::read_to_string(d.join("config.json")).unwrap();
        std::fs::write(d.join("config.json"), config.replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 1e-06"))
            .unwrap();
    });
    let now = plan(&p, &[&r, "--set", &format!("generate.model={changed}")]);
    assert!(now["generate[train/seed=1]"].1.contains("input generate.model changed"), "{now:?}");
}

/// Each sampled and scored result records the engine that computed it: in
/// its entry, the lock and the card, which also names the models.
#[test]
fn engines_and_models_are_recorded() {
    let p = Project::new();
    let r = setup(&p);
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(p.path("tiny.lock")).unwrap()).unwrap();
    let engines = |node: &str| lock["nodes"][node]["engines"].as_array().cloned().unwrap_or_default();
    let generated = engines("generate[train/seed=1]");
    assert_eq!(generated.len(), 1, "{lock}");
    let engine = generated[0].as_str().unwrap();
    assert!(engine.starts_with(&format!("prefgen {} cpu f32", env!("CARGO_PKG_VERSION"))), "{engine}");
    assert!(engines("annotate[train]")[0].as_str().unwrap().ends_with("armorm head"), "{lock}");
    assert!(engines("filter[train]").is_empty(), "only sampled and scored nodes have engines");
    let card = std::fs::read_to_string(p.path("out/README.md")).unwrap();
    for (key, model) in [("generate.model", "tiny-llama3"), ("annotate.model", "tiny-armorm")] {
        let line = card.lines().find(|l| l.starts_with(&format!("| `{key}` |"))).unwrap_or_else(|| panic!("{card}"));
        assert!(line.contains(model), "{line}");
    }
    assert!(card.contains(&format!("generate: {engine}")), "{card}");
    // A lock whose results another engine computed: --locked says so.
    let mut edited = lock.clone();
    let node = &mut edited["nodes"]["generate[train/seed=1]"];
    node["engines"] = serde_json::json!(["prefgen 0.0.0 cuda bf16, matmuls: dense bf16"]);
    node["outputs"]["output_1.json"] = serde_json::json!("0".repeat(64));
    p.write("tiny.lock", &serde_json::to_string_pretty(&edited).unwrap());
    let refused = p.prefgen(&["run", &r, "--locked"]);
    assert_ne!(refused.code(), Some(0));
    let err = refused.stderr();
    assert!(err.contains("generate[train/seed=1]: same key, but its outputs differ"), "{err}");
    assert!(
        err.contains(&format!("another engine computed them ({engine}; the lock's: prefgen 0.0.0 cuda bf16")),
        "{err}"
    );
}
