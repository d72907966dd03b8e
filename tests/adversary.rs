//! What a careful user and an adversary tried: files of their own in
//! `export.dir`, exports changed in place, kills while exports are placed,
//! `export.dir` inside the cache, symlink loops, temporaries left behind,
//! ambiguous and bad input, and the messages each gets.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;

fn simpo(p: &Project) -> String {
    p.write("r.toml", &simpo_recipe()).display().to_string()
}

#[test]
fn a_file_prefgen_did_not_write_is_never_replaced_without_a_flag() {
    let p = Project::new();
    let r = simpo(&p);
    p.write("out/README.md", "# my own notes\n");
    fails(&p, &["run", &r], &["out/README.md: exists and prefgen did not write it", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(p.path("out/README.md")).unwrap(), "# my own notes\n");
    assert!(!p.path("out/all_outputs.json").exists(), "nothing is written when a file is refused");
    p.ok(&["run", &r, "--overwrite"]);
    assert!(std::fs::read_to_string(p.path("out/README.md")).unwrap().starts_with("---\n"), "the card replaced it");
    // Without its manifest, prefgen's own files hold the right bytes: adopted.
    std::fs::remove_file(p.path("out/.prefgen/manifest.json")).unwrap();
    let again = p.ok(&["run", &r]);
    assert!(again.stdout().contains("Everything is fresh"), "{}", again.stdout());
}

#[test]
fn an_export_changed_in_place_is_detected_on_a_no_op_run() {
    let p = Project::new();
    let r = simpo(&p);
    p.ok(&["run", &r]);
    let good = p.tree("out");
    let path = p.path("out/all_outputs_bin.json");
    let before = std::fs::metadata(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    // The modification time put back, as a careful editor (or rsync) would.
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(before.mtime() as u64, before.mtime_nsec() as u32);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), before.len());
    let run = p.ok(&["run", &r]);
    assert!(run.stderr().contains("was changed in place; rebuilding it"), "{}", run.stderr());
    assert!(p.tree("out") == good, "the export holds changed bytes after a run");
    assert!(p.ok(&["cache", "verify"]).stdout().contains("No damage found"));
}

/// A run killed while its files are being replaced leaves the marker, so a
/// reader can tell the folder is a mix; the next run completes it.
#[test]
fn a_kill_while_exports_are_placed_leaves_the_marker() {
    let p = Project::new();
    let recipe = synthetic(&p, 3000, &[13, 21, 42, 79, 100], 1000);
    let r = recipe.to_str().unwrap();
    // On another file system the exports are copied, which takes long enough to land in.
    let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm, a tmpfs, for an export that is copied");
    let dir = shm.path().join("out");
    let set = format!("export.dir={}", dir.display());
    let clean = p.path("clean");
    p.ok(&["run", r, "--cache", clean.to_str().unwrap(), "--set", &set, "--set", "binarize.keep_ties=true"]);
    let want = p.tree(&dir.display().to_string());
    std::fs::remove_dir_all(&dir).unwrap();
    p.ok(&["run", r, "--set", &set]);
    let marker = dir.join(prefgen::run::INCOMPLETE);
    let mut landed = false;
    for _ in 0..20 {
        let mut child = p
            .command(&["run", r, "--set", &set, "--set", "binarize.keep_ties=true"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !marker.exists() && child.try_wait().unwrap().is_none() && started.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if marker.exists() {
            landed = true;
            break;
        }
        p.ok(&["run", r, "--set", &set]); // back to the other build, and again
    }
    assert!(landed, "no kill landed while the exports were placed");
    assert!(std::fs::read_to_string(&marker).unwrap().contains("may mix two builds"));
    p.ok(&["run", r, "--set", &set, "--set", "binarize.keep_ties=true"]);
    assert!(!marker.exists(), "a finished run removes the marker");
    assert!(p.tree(&dir.display().to_string()) == want, "the completed export differs from a clean one");
}

#[test]
fn export_dir_inside_the_cache_is_refused() {
    let p = Project::new();
    let r = simpo(&p);
    p.ok(&["run", &r, "prompts"]);
    for dir in ["cache", "cache/objects-v1/ab", "cache/tmp/out", "./cache/../cache/x"] {
        fails(&p, &["run", &r, "--set", &format!("export.dir={dir}")], &["export.dir", "inside the cache"]);
    }
    assert!(p.ok(&["cache", "verify"]).stdout().contains("No damage found"));
}

#[test]
fn symlink_loops_in_a_prompt_folder_are_refused_quickly() {
    let p = Project::new();
    let r = simpo(&p);
    std::fs::create_dir_all(p.path("prompts")).unwrap();
    std::fs::copy(fixtures().join("simpo/prompts.jsonl"), p.path("prompts/p.jsonl")).unwrap();
    std::os::unix::fs::symlink(".", p.path("prompts/self")).unwrap();
    let started = std::time::Instant::now();
    fails(&p, &["run", &r, "prompts", "--set", "prompts.dataset=prompts"], &["prompts/self", "symbolic link loop"]);
    std::os::unix::fs::symlink("..", p.path("prompts/up")).unwrap();
    fails(&p, &["run", &r, "prompts", "--set", "prompts.dataset=prompts"], &["symbolic link loop"]);
    assert!(started.elapsed().as_secs() < 20, "took {:?}", started.elapsed());
    // A link to a folder beside it is read once.
    std::fs::remove_file(p.path("prompts/self")).unwrap();
    std::fs::remove_file(p.path("prompts/up")).unwrap();
    std::fs::create_dir_all(p.path("more")).unwrap();
    std::fs::copy(fixtures().join("simpo/prompts.jsonl"), p.path("more/q.jsonl")).unwrap();
    std::os::unix::fs::symlink("../more", p.path("prompts/a")).unwrap();
    std::os::unix::fs::symlink("../more", p.path("prompts/b")).unwrap();
    let run = p.ok(&["run", &r, "prompts", "--set", "prompts.dataset=prompts"]);
    assert!(run.stderr().contains("source_rows=100"), "each real file once: {}", run.stderr());
}

/// Temporaries never pile up under `export.dir/.prefgen/tmp`, however the
/// runs went.
#[test]
fn no_temporary_links_are_left_behind() {
    let p = Project::new();
    let r = simpo(&p);
    p.ok(&["run", &r]);
    std::fs::remove_file(p.path("out/.prefgen/manifest.json")).unwrap();
    std::fs::remove_file(p.path("out/all_outputs.json")).unwrap();
    p.ok(&["run", &r]);
    let spawn = || p.command(&["run", &r, "--set", "binarize.keep_ties=true"]).output().unwrap();
    let (a, b, c) = std::thread::scope(|s| {
        let (a, b) = (s.spawn(spawn), s.spawn(spawn));
        (a.join().unwrap(), b.join().unwrap(), spawn())
    });
    assert!(a.status.success() && b.status.success() && c.status.success());
    assert_eq!(files_under(&p.path("out/.prefgen/tmp")), Vec::<std::path::PathBuf>::new());
}

#[test]
fn ambiguous_input_is_an_error() {
    let p = Project::new();
    let r = simpo(&p);
    let model = format!("generate.model={}", fixtures().join("tiny-llama3").display());
    fails(&p, &["run", &r, "--set", &model], &["generate.import", "generate.model", "both set"]);
    let rm = format!("annotate.model={}", fixtures().join("tiny-armorm").display());
    fails(&p, &["run", &r, "--set", &rm], &["annotate.import", "annotate.model", "both set"]);
    // A cache that is not there is not created, and not called healthy.
    fails(&p, &["cache", "verify", "--cache", "typo"], &["no prefgen cache at typo"]);
    fails(&p, &["cache", "gc", "--cache", "typo"], &["no prefgen cache at typo"]);
    assert!(!p.path("typo").exists());
    for bad in ["nan", "-1", "inf"] {
        let out = p.prefgen(&["verify", &r, "--against", "x", &format!("--tolerance={bad}")]);
        assert_eq!(out.code(), Some(2), "--tolerance {bad}: {}", out.stderr());
        assert!(out.stderr().contains("expected a finite number >= 0"), "{}", out.stderr());
    }
}

#[test]
fn a_limit_that_skips_every_row_is_an_error_not_an_empty_dataset() {
    let p = Project::new();
    let r = tiny_recipe(&p, 3, "");
    let r = r.to_str().unwrap();
    fails(
        &p,
        &["run", r, "--set", "annotate.max_length=5", "--set", "annotate.overflow=\"skip\""],
        &["annotate[train]", "every one of the 3 rows", "annotate.max_length = 5 tokens"],
    );
    assert!(!p.path("out/all_outputs_rm.json").exists());
}

/// A copy of tiny-llama3 with `config.json` edited.
fn edited_model(p: &Project, name: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let dir = p.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-llama3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    dir.display().to_string()
}

#[test]
fn a_model_folder_that_contradicts_itself_is_named() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "");
    let r = r.to_str().unwrap();
    let run = |model: &str, expect: &[&str]| {
        fails(&p, &["run", r, "generate", "--set", &format!("generate.model={model}")], expect);
    };
    let m = edited_model(&p, "zero", |c| c["hidden_size"] = 0.into());
    run(&m, &["generate.model", "zero/config.json", "hidden_size is 0"]);
    let m = edited_model(&p, "vocab", |c| c["vocab_size"] = 999.into());
    run(&m, &["vocab/config.json", "vocab_size is 999", "rows"]);
    let m = edited_model(&p, "heads", |c| c["num_attention_heads"] = 2.into());
    run(&m, &["heads/config.json", "q_proj.weight"]);
    let m = edited_model(&p, "phi3", |c| c["architectures"] = serde_json::json!(["Phi3ForCausalLM"]));
    run(&m, &["architecture Phi3ForCausalLM is not supported"]);
    p.write("broken.jinja", "{% for m in messages %}{{ m.content }");
    fails(
        &p,
        &["run", r, "generate", "--set", "generate.chat_template=broken.jinja"],
        &["generate.chat_template broken.jinja", "does not compile"],
    );
}

#[test]
fn cache_faults_are_named_and_repaired() {
    let p = Project::new();
    let r = simpo(&p);
    p.ok(&["run", &r]);
    let good = p.tree("out");
    // A folder where an object should be: rebuilt around, not "Is a directory".
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("out/.prefgen/manifest.json")).unwrap()).unwrap();
    let d = manifest["files"]["all_outputs.json"]["digest"].as_str().unwrap().to_string();
    let object = p.path(&format!("cache/objects-v1/{}/{d}", &d[..2]));
    std::fs::remove_file(&object).unwrap();
    std::fs::create_dir_all(object.join("inside")).unwrap();
    std::fs::remove_dir_all(p.path("out")).unwrap();
    p.ok(&["run", &r]);
    assert!(p.tree("out") == good);
    assert!(object.is_file());
    // A poisoned entry: its key matches its material, its output is another
    // object's bytes. `cache verify` finds it; a run rebuilds around it.
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(p.path("r.lock")).unwrap()).unwrap();
    let key = lock["nodes"]["filter[train]"]["key"].as_str().unwrap().to_string();
    let entry_path = p.path(&format!("cache/actions-v3/{}/{key}", &key[..2]));
    let card = manifest["files"]["README.md"].clone();
    let entry = forge_entry(&std::fs::read(&entry_path).unwrap(), &key, |e| {
        e.outputs[0].digest = card["digest"].as_str().unwrap().parse().unwrap();
        e.outputs[0].size = card["stat"]["size"].as_u64().unwrap();
    });
    std::fs::write(&entry_path, &entry).unwrap();
    let verify = p.prefgen(&["cache", "verify"]);
    assert_eq!(verify.code(), Some(1));
    assert!(
        verify
            .stdout()
            .contains(&format!("damaged action entry {key}: its output all_outputs.json is not filter rows")),
        "{}",
        verify.stdout()
    );
    p.ok(&["run", &r]);
    std::fs::write(&entry_path, &entry).unwrap();
    std::fs::remove_dir_all(p.path("out")).unwrap();
    let run = p.ok(&["run", &r]);
    assert!(run.stderr().contains("unusable"), "{}", run.stderr());
    assert!(p.tree("out") == good);
    // A cache that cannot be written: the message names it.
    std::fs::remove_dir_all(p.path("cache/tmp")).unwrap();
    std::fs::write(p.path("cache/tmp"), "not a folder").unwrap();
    fails(&p, &["run", &r, "--set", "binarize.keep_ties=true"], &["cannot write to the cache at", "cache"]);
}

#[test]
fn usage_errors_exit_2_and_other_errors_1() {
    let p = Project::new();
    for args in [&["run"][..], &["run", "r.toml", "--no-such-flag"], &["frobnicate"]] {
        let out = p.prefgen(args);
        assert_eq!(out.code(), Some(2), "{args:?}: {}", out.stderr());
        assert!(out.stderr().contains("Usage:"), "{}", out.stderr());
    }
    fails(&p, &["run", "missing.toml"], &["cannot read recipe missing.toml"]);
}
