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
    let snap = fixtures().join("hf_home/hub/datasets--prefgen-test--tiny_prefs/snapshots/0123456789abcdef0123456789abcdef01234567");
    let files = [snap.join("data/test_prefs-00000-of-00001.parquet")];
    let out = prefgen::stages::prompts::build(&files, "messages", 0).unwrap();
    let prompts: Vec<String> = prefgen::formats::simpo::parse_rows(&out.files[0].1, "prompts").unwrap();
    assert_eq!(prompts, ["test_prefs prompt 0", "test_prefs prompt 1", "test_prefs prompt 2"]);
}
