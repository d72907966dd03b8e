//! What an adversary who can write a cache entry or the export manifest, and a
//! careful user who copies exports or names splits, can do to `export.dir`:
//! output paths come from the stages, removals only of prefgen's own files
//! inside it, no stale files beside new ones, inputs never inside it, and
//! exports the Hugging Face tools read.

mod common;

use common::*;
use prefgen::cache::Cache;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The SimPO fixture recipe, exporting to `dir`.
fn simpo(p: &Project, dir: &str) -> String {
    p.write("r.toml", &simpo_recipe().replace("dir = \"out\"", &format!("dir = \"{dir}\""))).display().to_string()
}

/// Every file and symbolic link under `root`, outside the folders in `skip`
/// (relative path -> bytes, or the link's target).
fn snapshot(root: &Path, skip: &[PathBuf]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if skip.contains(&path) {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, std::fs::read_link(&path).unwrap().display().to_string().into_bytes());
            } else if meta.is_dir() {
                out.insert(format!("{rel}/"), vec![]);
                stack.push(path);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Rewrites the last build of `node` with its outputs renamed by `rename`,
/// and stores it through `Cache::put_action`, as prefgen stores an entry:
/// whatever integrity fields an entry carries are computed for the forged
/// one, so only the path check can catch it.
fn forge_entry(p: &Project, node: &str, rename: impl Fn(usize, &str) -> String) {
    let cache = Cache::open(&p.path("cache")).unwrap();
    let mut entry = cache.last_build(node).unwrap().unwrap_or_else(|| panic!("{node} was built"));
    for (i, out) in entry.outputs.iter_mut().enumerate() {
        out.path = rename(i, &out.path);
    }
    cache.put_action(&entry).unwrap();
    assert_eq!(cache.get_action(&entry.key()).unwrap().unwrap().outputs, entry.outputs, "the forged entry is served");
}

/// A manifest record that says prefgen wrote the file at `path`: its stat
/// and digest as they are now.
fn claim(path: &Path) -> serde_json::Value {
    let m = std::fs::metadata(path).unwrap();
    let ns = |s: i64, n: i64| s * 1_000_000_000 + n;
    let digest = prefgen::digest::Digest::of(&std::fs::read(path).unwrap());
    serde_json::json!({
        "digest": digest,
        "stat": {"size": m.len(), "ino": m.ino(), "mtime_ns": ns(m.mtime(), m.mtime_nsec()), "ctime_ns": ns(m.ctime(), m.ctime_nsec())},
        "linked": false,
    })
}

/// Adds `records` (path as the manifest names it -> record) to the manifest of `dir`.
fn forge_manifest(dir: &Path, records: &[(String, serde_json::Value)]) {
    let path = dir.join(".prefgen/manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (rel, record) in records {
        manifest["files"][rel] = record.clone();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// Runs Python code (`datasets` installed), returning (success, stdout, stderr).
fn py(code: &str, dir: &Path) -> (bool, String, String) {
    let out = Command::new("python3")
        .args(["-c", code])
        .current_dir(dir)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_CACHE", dir.join("hf-cache"))
        .output()
        .expect("python3 with `datasets` (make setup)");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Loads `export` with `load_dataset` (the folder) and `load_from_disk`
/// (`hf/`), printing each split's row count as `name rows` per line.
const LOAD_BOTH: &str = r#"
import sys
from datasets import load_dataset, load_from_disk
export = sys.argv[1] if len(sys.argv) > 1 else "EXPORT"
hub = load_dataset(export)
disk = load_from_disk(export + "/hf")
for name in sorted(hub):
    print("hub", name, hub[name].num_rows)
for name in sorted(disk):
    print("disk", name, disk[name].num_rows)
"#;

fn load_both(p: &Project, export: &str) -> (bool, String, String) {
    py(&LOAD_BOTH.replace("\"EXPORT\"", &format!("{:?}", p.path(export).display().to_string())), p.dir.path())
}

/// Item 1: an entry whose output path is `../../X` or absolute is damaged:
/// ignored, the node rebuilt, nothing written outside `export.dir`.
#[test]
fn a_forged_entry_never_writes_outside_export_dir() {
    let p = Project::new();
    let r = simpo(&p, "deep/er/out");
    p.ok(&["run", &r]);
    let good = p.tree("deep/er/out");
    let escaped = p.path("deep/escaped.json");
    let absolute = p.path("absolute.json");
    forge_entry(&p, "simpo-fixture/binarize[train]", |_, _| "../../escaped.json".into());
    forge_entry(&p, "simpo-fixture/generate[train/seed=13]", |_, _| absolute.display().to_string());
    // Every file is placed again from the entries.
    std::fs::remove_dir_all(p.path("deep/er/out")).unwrap();
    let run = p.ok(&["run", &r]);
    assert!(!escaped.exists(), "a forged entry wrote {}", escaped.display());
    assert!(!absolute.exists(), "a forged entry wrote {}", absolute.display());
    let why = "a file that its stage does not write";
    let err = run.stderr();
    assert!(
        err.contains(&format!("building binarize[train]: its cached entry names \"../../escaped.json\", {why}")),
        "{err}"
    );
    assert!(err.contains(&format!("names {:?}, {why}", absolute.display().to_string())), "{err}");
    assert_eq!(run.built(), ["generate[train/seed=13]", "binarize[train]"], "{err}");
    assert!(p.tree("deep/er/out") == good, "the export differs from the one built before");
    let again = p.ok(&["run", &r]);
    assert!(again.stdout().contains("Everything is fresh"), "{}", again.stdout());
    // `plan` says why, too.
    forge_entry(&p, "simpo-fixture/generate[train/seed=13]", |_, _| absolute.display().to_string());
    let plan = p.ok(&["plan", &r]).stdout();
    assert!(
        plan.contains(&format!(
            "stale  generate[train/seed=13]  its cached entry names {:?}, {why}",
            absolute.display().to_string()
        )),
        "{plan}"
    );
}

/// Item 2: manifest records naming `../`, absolute paths or a path through a
/// symbolic link never make prefgen remove a file outside `export.dir`.
#[test]
fn a_forged_manifest_never_deletes_outside_export_dir() {
    let p = Project::new();
    let r = simpo(&p, "deep/out");
    p.ok(&["run", &r]);
    let victims = [p.write("deep/victim.txt", "mine\n"), p.write("elsewhere/absolute.txt", "mine too\n")];
    std::os::unix::fs::symlink("../../elsewhere", p.path("deep/out/link")).unwrap();
    let linked = p.write("elsewhere/linked.txt", "and this\n");
    forge_manifest(
        &p.path("deep/out"),
        &[
            ("../victim.txt".into(), claim(&victims[0])),
            ("data/../../victim.txt".into(), claim(&victims[0])),
            (victims[1].display().to_string(), claim(&victims[1])),
            ("link/linked.txt".into(), claim(&linked)),
        ],
    );
    // A changed export: files of the old build are removed.
    let run = p.ok(&["run", &r, "--set", "binarize.keep_ties=true"]);
    for v in victims.iter().chain([&linked]) {
        assert!(v.exists(), "{} was removed:\n{}", v.display(), run.stderr());
    }
    assert!(run.stderr().contains("which is not a file inside"), "{}", run.stderr());
}

/// Item 10: after `cp -a` (or rsync, chmod) of the exports, a run with
/// another `export.rows_per_file` leaves no file of the old layout, and
/// `load_dataset` reads the export with each row once.
#[test]
fn no_stale_files_after_a_copy_and_a_new_layout() {
    let p = Project::new();
    let r = simpo(&p, "out");
    p.ok(&["run", &r, "--set", "export.rows_per_file=10"]);
    let parquet = p.tree("out").keys().filter(|k| k.starts_with("data/")).count();
    assert!(parquet > 1, "several parquet files");
    // What `cp -a out copy && rm -r out && mv copy out` does: new inodes, same bytes and times.
    for (rel, bytes) in p.tree("out") {
        let path = p.path("out").join(&rel);
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    }
    p.ok(&["run", &r, "--set", "export.rows_per_file=7"]);
    let clean = Project::new();
    let rc = simpo(&clean, "out");
    clean.ok(&["run", &rc, "--set", "export.rows_per_file=7"]);
    let (got, want) = (p.tree("out"), clean.tree("out"));
    let names = |t: &BTreeMap<String, Vec<u8>>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want), "files of the old layout are left");
    let (ok, out, err) = load_both(&p, "out");
    assert!(ok, "{err}");
    let n = serde_json::from_slice::<Vec<serde_json::Value>>(&got["all_outputs_bin.json"]).unwrap().len();
    assert!(out.contains(&format!("hub train {n}\n")) && out.contains(&format!("disk train {n}\n")), "{out}");
}

/// Item 11: `export.dir` where an import lives is refused, naming both keys,
/// and the user's input is left as it was.
#[test]
fn export_dir_holding_an_input_is_refused() {
    let p = Project::new();
    let r = simpo(&p, "out");
    let gens = fixtures().join("simpo/gens");
    for seed in [13, 21, 42, 79, 100] {
        let name = format!("output_{seed}.json");
        std::fs::create_dir_all(p.path("gens")).unwrap();
        std::fs::copy(gens.join(&name), p.path("gens").join(&name)).unwrap();
    }
    let before = p.tree("gens");
    let import = ["--set", "generate.import=gens/output_{seed}.json"];
    for dir in ["gens", "./gens/", "."] {
        let set = format!("export.dir={dir}");
        fails(&p, &[&["run", &r, "--set", &set][..], &import].concat(), &["export.dir", "generate.import"]);
    }
    // Dropping a seed once adopted removed its file: never adopted now.
    let fewer = ["--set", "generate.seeds=[13, 21]", "--set", "export.dir=gens"];
    fails(&p, &[&["run", &r][..], &import, &fewer].concat(), &["export.dir", "generate.import"]);
    // Nor may export.dir be inside a prompt folder that is read whole.
    std::fs::create_dir_all(p.path("prompts")).unwrap();
    std::fs::copy(fixtures().join("simpo/prompts.jsonl"), p.path("prompts/p.jsonl")).unwrap();
    let set = ["--set", "prompts.dataset=prompts", "--set", "export.dir=prompts/out"];
    fails(&p, &[&["plan", &r][..], &set].concat(), &["export.dir", "prompts.dataset"]);
    assert!(p.tree("gens") == before, "the imported files changed");
    p.ok(&[&["run", &r][..], &import].concat());
}

/// Item 15: split names are checked as `datasets` checks them (its own
/// rule, asked of the installed package).
#[test]
fn split_names_are_those_datasets_accepts() {
    let p = Project::new();
    let r = simpo(&p, "out");
    let names = ["my-test", "train", "test.v2", "a..b", ".x", "x.", "x y", "_", "x/y", "..", "t\u{e9}st"];
    let rule = py(
        &format!(
            "import re, json\nfrom datasets.naming import _split_re\nprint(json.dumps([bool(re.match(_split_re, n)) for n in {}]))",
            serde_json::to_string(&names).unwrap()
        ),
        p.dir.path(),
    );
    assert!(rule.0, "{}", rule.2);
    let accepted: Vec<bool> = serde_json::from_str(rule.1.trim()).unwrap();
    assert!(!accepted[0], "datasets refuses my-test");
    let prompts = fixtures().join("simpo/prompts.jsonl");
    for (name, ok) in names.iter().zip(accepted) {
        let set = format!("prompts.splits={{ {} = {:?} }}", serde_json::to_string(name).unwrap(), prompts.display());
        let run = p.prefgen(&["plan", &r, "--set", &set, "--set", "generate.import=g/{split}/output_{seed}.json"]);
        let err = run.stderr();
        let refused = err.contains("prompts.splits") && err.contains("Hugging Face");
        assert_eq!(!refused, ok, "split name {name:?}: datasets accepts it: {ok}; prefgen said:\n{err}");
    }
}

/// Item 15, second half: a split that binarize empties leaves an export that
/// `load_dataset` reads (the other splits) and `load_from_disk` reads (all),
/// and the card says why the empty one is not in `data/`.
#[test]
fn an_emptied_split_leaves_an_export_the_hugging_face_tools_read() {
    let p = Project::new();
    // Two splits; in `test` every score is equal, so binarize drops every row as a tie.
    let fx = fixtures().join("simpo");
    let scores: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fx.join("scores.json")).unwrap()).unwrap();
    let ties: Vec<serde_json::Value> = scores
        .iter()
        .cloned()
        .map(|mut row| {
            let n = row["all_rm_scores"].as_array().unwrap().len();
            row["all_rm_scores"] = serde_json::json!(vec![1.0; n]);
            row
        })
        .collect();
    p.write("s/train.json", &serde_json::to_string(&scores).unwrap());
    p.write("s/test.json", &serde_json::to_string(&ties).unwrap());
    for split in ["train", "test"] {
        for seed in [13, 21, 42, 79, 100] {
            let name = format!("output_{seed}.json");
            p.write(&format!("g/{split}/{name}"), &std::fs::read_to_string(fx.join("gens").join(&name)).unwrap());
        }
    }
    let two = p.write(
        "two.toml",
        &format!(
            "name = \"two\"\n[prompts]\nsplits = {{ train = {0:?}, test = {0:?} }}\n[generate]\nseeds = [13, 21, 42, 79, 100]\nimport = \"g/{{split}}/output_{{seed}}.json\"\n[annotate]\nimport = \"s/{{split}}.json\"\n[export]\ndir = \"out\"\n",
            fx.join("prompts.jsonl").display().to_string()
        ),
    );
    let run = p.ok(&["run", two.to_str().unwrap()]);
    assert!(run.stderr().contains("binarize[test] kept no rows"), "{}", run.stderr());
    let (ok, out, err) = load_both(&p, "out");
    assert!(ok, "an export with an emptied split cannot be loaded:\n{err}");
    assert!(out.contains("disk test 0\n") && out.contains("disk train "), "{out}");
    assert!(out.contains("hub train ") && !out.contains("hub test"), "{out}");
    let card = std::fs::read_to_string(p.path("out/README.md")).unwrap();
    assert!(card.contains("No rows are left in `test`"), "{card}");
}

/// Item 20: the card's `splits` carry `num_bytes`, so `datasets` reads
/// them without calling the field malformed.
#[test]
fn the_card_splits_are_well_formed_for_datasets() {
    let p = Project::new();
    let r = simpo(&p, "out");
    p.ok(&["run", &r]);
    let card = std::fs::read_to_string(p.path("out/README.md")).unwrap();
    assert!(card.contains("num_bytes: "), "{card}");
    let (ok, out, err) = load_both(&p, "out");
    assert!(ok, "{err}");
    assert!(out.contains("hub train "), "{out}");
    assert!(!err.contains("malformed"), "datasets warns:\n{err}");
    // num_bytes is datasets' own: the Arrow size of the split's data as pyarrow counts it.
    let (ok, nbytes, err) =
        py("from datasets import load_from_disk\nprint(load_from_disk('out/hf')['train'].data.nbytes)", p.dir.path());
    assert!(ok, "{err}");
    assert!(card.contains(&format!("num_bytes: {}\n", nbytes.trim())), "pyarrow counts {nbytes}:\n{card}");
}

/// A small seeded generator (splitmix64), so a failing case reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// Property: whatever paths cache entries and the manifest name, prefgen
/// writes and removes nothing outside `export.dir` and the cache.
#[test]
fn random_entries_and_manifests_stay_inside_export_dir() {
    let p = Project::new();
    let r = simpo(&p, "a/b/out");
    p.ok(&["run", &r]);
    let out = p.path("a/b/out");
    // Files outside that a forged path could name, and a link out of export.dir.
    let victims: Vec<PathBuf> =
        ["a/victim.txt", "a/b/victim.txt", "victim.txt", "elsewhere/victim.txt", "elsewhere/data/victim.txt"]
            .iter()
            .map(|v| p.write(v, v))
            .collect();
    std::os::unix::fs::symlink(p.path("elsewhere"), out.join("link")).unwrap();
    // The recipe's lock beside it is prefgen's own record of the run, not an export.
    let skip = [out.clone(), p.path("cache"), p.path("r.lock")];
    let nodes = [
        "simpo-fixture/generate[train/seed=13]",
        "simpo-fixture/generate[train/seed=100]",
        "simpo-fixture/filter[train]",
        "simpo-fixture/annotate[train]",
        "simpo-fixture/binarize[train]",
        "simpo-fixture/export",
    ];
    let abs = p.path("elsewhere").display().to_string();
    let parts = [
        "..",
        ".",
        "",
        "data",
        "hf",
        "train",
        "link",
        ".prefgen",
        "victim.txt",
        "README.md",
        "PREFGEN_INCOMPLETE",
        "all_outputs.json",
        "output_13.json",
        "manifest.json",
        "a",
        "b",
        "elsewhere",
        &abs,
        "/",
        "//",
        "\\..",
    ];
    let mut rng = Rng(0x5eed_2025);
    let mut layouts = [10usize, 7, 100_000].iter().cycle();
    // How many runs caught a forged entry, and a forged manifest record: the loop must exercise both.
    let (mut entries_caught, mut records_caught) = (0, 0);
    for case in 0..30 {
        let before = snapshot(p.dir.path(), &skip);
        let path = |rng: &mut Rng| {
            let n = 1 + rng.next() % 5;
            let mut s: String = (0..n).map(|_| *rng.pick(&parts)).collect::<Vec<_>>().join("/");
            if rng.next().is_multiple_of(3) {
                s = format!("{abs}/{s}");
            }
            s
        };
        // Some entries renamed, then the manifest given random records that claim outside files.
        for node in &nodes {
            if rng.next().is_multiple_of(3) {
                let name = path(&mut rng);
                forge_entry(&p, node, |i, old| if i == 0 { name.clone() } else { old.to_string() });
            }
        }
        let mut records = Vec::new();
        for _ in 0..(1 + rng.next() % 6) {
            let v = rng.pick(&victims);
            let rel = match rng.next() % 3 {
                0 => path(&mut rng),
                1 => v.display().to_string(),
                _ => pathdiff(v, &out),
            };
            records.push((rel, claim(v)));
        }
        if out.join(".prefgen/manifest.json").exists() {
            forge_manifest(&out, &records);
        }
        let rows = format!("export.rows_per_file={}", layouts.next().unwrap());
        let run = p.prefgen(&["run", &r, "--set", &rows]);
        let after = snapshot(p.dir.path(), &skip);
        assert!(
            before == after,
            "case {case}: outside export.dir and the cache, {:?} changed\n{}",
            before.keys().chain(after.keys()).filter(|k| before.get(*k) != after.get(*k)).collect::<Vec<_>>(),
            run.stderr()
        );
        assert!(run.0.status.success(), "case {case}: forged entries and records are ignored:\n{}", run.stderr());
        entries_caught += run.stderr().contains("not write") as usize;
        records_caught += run.stderr().contains("which is not a file inside") as usize;
    }
    assert!(entries_caught > 2 && records_caught > 2, "entries caught {entries_caught}, records {records_caught}");
}

/// `to` as a relative path from `from` (`../../victim.txt`).
fn pathdiff(to: &Path, from: &Path) -> String {
    let (to, from): (Vec<_>, Vec<_>) = (to.components().collect(), from.components().collect());
    let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".into(); from.len() - common];
    parts.extend(to[common..].iter().map(|c| c.as_os_str().to_string_lossy().into_owned()));
    parts.join("/")
}
