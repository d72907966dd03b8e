//! Action entries as something a cache, a remote or a teammate hands over:
//! what is read through stays local, a forged remote entry is refused
//! naming the remote, every field of an entry is covered by its digest and
//! its signature, `run --locked` reads its inputs again, and a signing key
//! others can read is refused (issue 25, items 8, 9, 12, 16, 17).

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The SimPO fixture recipe (imports only: no model runs) in `p`.
fn recipe(p: &Project) -> String {
    p.write("r.toml", &simpo_recipe()).display().to_string()
}

/// A `prefgen.toml` with one writable remote at `url`, trusting `keys`
/// (none: every writer) and signing with `signing`.
fn config(p: &Project, url: &str, keys: &[String], signing: Option<&str>) {
    let keys: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    let sign = signing.map(|s| format!("signing_key = {s:?}\n")).unwrap_or_default();
    p.write(
        "prefgen.toml",
        &format!("[[remotes]]\nurl = {url:?}\nwrite = true\ntrusted_keys = [{}]\n{sign}", keys.join(", ")),
    );
}

/// A node's key, or one of its outputs' digest, from the lock `r.lock`.
fn lock_of(p: &Project) -> Value {
    serde_json::from_slice(&std::fs::read(p.path("r.lock")).unwrap()).unwrap()
}

fn key_of(p: &Project, node: &str) -> String {
    lock_of(p)["nodes"][node]["key"].as_str().unwrap().to_string()
}

/// The file holding the entry under `key` below `root` (a cache or a remote).
fn entry_file(root: &Path, key: &str) -> PathBuf {
    files_under(root)
        .into_iter()
        .find(|f| f.file_name().unwrap() == key && f.to_string_lossy().contains("/actions-v"))
        .unwrap_or_else(|| panic!("no entry {key} under {}", root.display()))
}

/// Edits the JSON of the stored entry at `path` with `edit` (on its text),
/// as anyone who can write there could. A stored entry is a header line (its
/// digest and signature) and the JSON; with `redigest` the header's digest
/// is taken again over the new JSON, as a forger can (BLAKE3 is public),
/// without it the header is left as it was (the bytes were damaged).
fn edit_entry(path: &Path, redigest: bool, edit: impl FnOnce(&str) -> String) {
    let bytes = std::fs::read(path).unwrap();
    let header = bytes.iter().position(|&b| b == b'\n').and_then(|eol| {
        let h = serde_json::from_slice::<Value>(&bytes[..eol]).ok().filter(|h| h.get("blake3").is_some())?;
        Some((h, eol + 1))
    });
    let start = header.as_ref().map_or(0, |(_, s)| *s);
    let body = edit(std::str::from_utf8(&bytes[start..]).unwrap());
    assert_ne!(body.as_bytes(), &bytes[start..], "the edit changed nothing");
    let mut out = Vec::new();
    if let Some((mut h, _)) = header {
        if redigest {
            h["blake3"] = prefgen::digest::Digest::of(body.as_bytes()).to_hex().into();
        }
        out = serde_json::to_vec(&h).unwrap();
        out.push(b'\n');
    }
    out.extend_from_slice(body.as_bytes());
    // Stored entries are read-only files.
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, out).unwrap();
}

/// `text` with the number after the first `"field": ` replaced by `to(n)`.
fn set_count(text: &str, field: &str, to: impl FnOnce(u64) -> u64) -> String {
    let at = text.find(&format!("\"{field}\": ")).unwrap_or_else(|| panic!("no {field} in {text}")) + field.len() + 4;
    let end = at + text[at..].find(|c: char| !c.is_ascii_digit()).unwrap();
    let n: u64 = text[at..end].parse().unwrap();
    format!("{}{}{}", &text[..at], to(n), &text[end..])
}

/// Teammate A, who built the recipe and pushed it to the shared folder `url`.
fn pushed_by_a(url: &str) -> Project {
    let a = Project::new();
    let ra = recipe(&a);
    config(&a, url, &[], None);
    a.ok(&["run", &ra, "--push"]);
    a
}

/// `plan`'s lines for the nodes.
fn plan_lines(run: &Run) -> Vec<String> {
    run.stdout().lines().filter(|l| l.starts_with("fresh") || l.starts_with("stale")).map(str::to_string).collect()
}

/// Teammate A builds and pushes to a shared folder; B builds nothing, reads
/// everything through, and afterwards has it all locally.
#[test]
fn what_a_run_reads_through_is_local_afterwards() {
    let shared = tempfile::tempdir().unwrap();
    let url = shared.path().join("prefgen").display().to_string();
    let a = pushed_by_a(&url);

    let b = Project::new();
    let rb = recipe(&b);
    config(&b, &url, &[], None);
    let run = b.ok(&["run", &rb]);
    assert!(run.built().is_empty(), "{}", run.stderr());
    let plan = b.ok(&["plan", &rb, "--no-remote"]);
    let lines = plan_lines(&plan);
    assert!(!lines.is_empty() && lines.iter().all(|l| l.starts_with("fresh")), "{}", plan.stdout());
    let offline = b.ok(&["run", &rb, "--no-remote", "--set", "export.dir=again"]);
    assert!(offline.built().is_empty(), "{}", offline.stderr());
    assert!(b.tree("again") == a.tree("out"));
}

/// An entry on a remote without trusted keys, forged to name another
/// node's object (with that object's size, and its digest taken again):
/// the run reports it naming the remote, refuses it for the rest of the
/// run, and rebuilds the node, instead of failing blaming the local disk.
#[test]
fn a_forged_entry_on_an_untrusted_remote_is_refused_and_rebuilt() {
    let shared = tempfile::tempdir().unwrap();
    let url = shared.path().join("prefgen").display().to_string();
    let a = pushed_by_a(&url);
    let filter_key = key_of(&a, "filter[train]");
    let filter_out = lock_of(&a)["nodes"]["filter[train]"]["outputs"]["all_outputs.json"].as_str().unwrap().to_string();
    let prompts_out = lock_of(&a)["nodes"]["prompts[train]"]["outputs"]["prompts.json"].as_str().unwrap().to_string();
    let prompts_size =
        std::fs::metadata(a.path(&format!("cache/objects-v1/{}/{prompts_out}", &prompts_out[..2]))).unwrap().len();
    edit_entry(&entry_file(shared.path(), &filter_key), true, |text| {
        let text = text.replace(&filter_out, &prompts_out);
        let at = text.find(&prompts_out).unwrap();
        format!("{}{}", &text[..at], set_count(&text[at..], "size", |_| prompts_size))
    });

    let b = Project::new();
    let rb = recipe(&b);
    config(&b, &url, &[], None);
    let run = b.ok(&["run", &rb]);
    let err = run.stderr();
    assert!(
        err.contains(&format!("warning: remote {url}: entry {} is damaged (", &filter_key[..12]))
            && err.contains("; not used"),
        "{err}"
    );
    assert!(!err.contains("is the disk"), "{err}");
    assert!(run.built().contains(&"filter[train]".to_string()), "{err}");
    assert!(b.tree("out") == a.tree("out"), "the forged entry reached the export");
}

/// A flipped digit in a local entry's counts: `cache verify` reports the
/// entry, and a run rebuilds the node rather than carry the count.
#[test]
fn a_flipped_digit_in_a_local_entrys_counts_is_caught() {
    let p = Project::new();
    let r = recipe(&p);
    p.ok(&["run", &r]);
    let good = p.tree("out");
    let key = key_of(&p, "binarize[train]");
    let flip = |p: &Project| {
        edit_entry(&entry_file(&p.path("cache"), &key), false, |t| set_count(t, "rows", |n| n ^ 1));
    };
    flip(&p);
    let verify = p.prefgen(&["cache", "verify"]);
    assert_eq!(verify.code(), Some(1), "{}", verify.stdout());
    assert!(verify.stdout().contains(&format!("damaged action entry {key}: ")), "{}", verify.stdout());
    p.ok(&["run", &r]);
    flip(&p);
    let run = p.ok(&["run", &r, "--set", "export.dir=again"]);
    assert!(run.stderr().contains(&format!("action entry {} is damaged", &key[..12])), "{}", run.stderr());
    assert!(run.built().contains(&"binarize[train]".to_string()), "{}", run.stderr());
    assert!(p.tree("again") == good);
}

/// An entry signed by a trusted key, then edited (`ties = 999`, its digest
/// taken again): the signature covers every field, so it is refused.
#[test]
fn an_edited_signed_entry_is_not_trusted() {
    let shared = tempfile::tempdir().unwrap();
    let url = shared.path().join("prefgen").display().to_string();
    let a = Project::new();
    let ra = recipe(&a);
    let key = a.ok(&["cache", "keygen", "alice"]).stdout().trim().to_string();
    config(&a, &url, std::slice::from_ref(&key), Some("alice.key"));
    a.ok(&["run", &ra, "--push"]);
    let bin = key_of(&a, "binarize[train]");
    edit_entry(&entry_file(shared.path(), &bin), true, |t| set_count(t, "ties", |_| 999));

    let b = Project::new();
    let rb = recipe(&b);
    config(&b, &url, &[key], None);
    let run = b.ok(&["run", &rb]);
    assert!(
        run.stderr().contains(&format!("remote {url}: entry {} is not trusted (its signature", &bin[..12])),
        "{}",
        run.stderr()
    );
    assert!(run.built().contains(&"binarize[train]".to_string()), "{}", run.stderr());
    assert!(b.tree("out") == a.tree("out"));
}

/// An import edited in place with its size and modification time restored
/// passes the stat memo; `run --locked` reads it again and refuses.
#[test]
fn run_locked_catches_an_import_edited_with_its_stat_restored() {
    let p = Project::new();
    let fx = fixtures().join("simpo");
    for f in files_under(&fx) {
        let rel = f.strip_prefix(&fx).unwrap().display().to_string();
        let to = p.write(&format!("in/{rel}"), &std::fs::read_to_string(&f).unwrap());
        age(&to, 86_400); // old enough for its digest to be remembered
    }
    let r = p
        .write("r.toml", &simpo_recipe().replace(&fx.display().to_string(), &p.path("in").display().to_string()))
        .display()
        .to_string();
    p.ok(&["run", &r]);
    p.ok(&["run", &r, "--locked"]);

    let scores = p.path("in/scores.json");
    let mtime = std::fs::metadata(&scores).unwrap().modified().unwrap();
    let text = std::fs::read_to_string(&scores).unwrap();
    let at = text.find("\"all_rm_scores\"").unwrap();
    let digit = at + text[at..].find(|c: char| ('1'..='8').contains(&c)).unwrap();
    let bumped = ((text.as_bytes()[digit] + 1) as char).to_string();
    std::fs::write(&scores, format!("{}{bumped}{}", &text[..digit], &text[digit + 1..])).unwrap();
    std::fs::File::options().write(true).open(&scores).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&scores).unwrap().modified().unwrap(), mtime);

    let locked = p.prefgen(&["run", &r, "--locked"]);
    assert_eq!(locked.code(), Some(1), "{}", locked.stderr());
    assert!(locked.stderr().contains("annotate.import: the lock has"), "{}", locked.stderr());
}

/// A signing key that others can read is refused, as ssh refuses one,
/// naming the file and the chmod that fixes it.
#[test]
fn a_signing_key_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let shared = tempfile::tempdir().unwrap();
    let url = shared.path().join("prefgen").display().to_string();
    let p = Project::new();
    let r = recipe(&p);
    p.ok(&["cache", "keygen", "alice"]);
    let key = p.path("alice.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    config(&p, &url, &[], Some("alice.key"));
    let run = p.prefgen(&["run", &r, "--push"]);
    assert_eq!(run.code(), Some(1), "{}", run.stderr());
    let err = run.stderr();
    assert!(err.contains("alice.key") && err.contains("0644") && err.contains("chmod 600 alice.key"), "{err}");
    assert!(!shared.path().join("prefgen").exists(), "nothing was pushed with the key");
}
