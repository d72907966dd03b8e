//! `make bench`: generation throughput on the CPU demo model, SmolLM2-135M-Instruct
//! (Q4_1 GGUF, `make models`), and on Gemma-3 270M (Q4_K_M: its matmuls are
//! Q4_K, Q6_K, Q5_0 and Q8_0; a base model, so the questions go in without
//! a chat template), on MT-Bench's first-turn questions.
//!
//! Neither file shows the K-quants alone: most of Gemma-3's weights are its
//! Q8_0 head and Q5_0 matrices (640 columns is no multiple of 256). So the
//! same random-weight Llama, every matrix 256-aligned, is benched twice
//! (`make bench-models`): quantized by llama.cpp to Q4_1 and to Q4_K_M (Q4_K
//! and Q6_K), the leads over llama.cpp side by side on the same weights.
//!
//! Prompt tokens/s is the prefill of the prompts, `batch` of them packed in
//! one forward as the engine admits them; generated tokens/s is the whole
//! batched run (prefill included) at each batch size, 32 new tokens per
//! response, temperature 0.8, top-p 0.95.
//!
//! Beside it, llama.cpp on the same file and thread count: its
//! `llama-batched-bench` (built by `scripts/llama-cpp.sh` from the source
//! the llama-cpp-python sdist vendors), with prompts of the same mean length
//! and 32 new tokens each; its generated tokens/s also counts the prefill.
//! With `PREFGEN_INT8_KERNEL=avx2` or `avx-vnni`, llama.cpp is built for
//! that instruction set alone (`LLAMA_ISA`), as it would run on a CPU that
//! has no more; otherwise for this CPU.

use prefgen::infer::Policy;
use prefgen::infer::engine::{self, Job};
use prefgen::infer::sampler::{Sampling, Stream};
use std::time::Instant;

fn main() {
    // SAFETY: nothing has started a thread yet.
    unsafe { prefgen::infer::settle_process() };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let questions = std::fs::read_to_string(root.join("benches/data/mt_bench_questions.jsonl")).expect("benches/data");
    let prompts: Vec<String> = questions
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|q| q["turns"][0].as_str().map(str::to_string))
        .collect();
    let llama = llama_cpp_bench();
    for (name, file, chat) in [
        ("SmolLM2-135M-Instruct Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf", true),
        ("Gemma-3 270M Q4_K_M", "gemma-3-270m-q4_k_m.gguf", false),
        ("Llama 768 wide, random weights, Q4_1", "bench-llama-768.Q4_1.gguf", true),
        ("Llama 768 wide, random weights, Q4_K_M", "bench-llama-768.Q4_K_M.gguf", true),
    ] {
        bench(name, &root.join("models").join(file), chat, &prompts, llama.as_deref());
    }
}

/// The table for one model: prefgen at batch 1, 8 and 32 beside llama.cpp.
fn bench(name: &str, model: &std::path::Path, chat: bool, prompts: &[String], llama: Option<&std::path::Path>) {
    // A base model's prompts are the raw text.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.jinja");
    std::fs::write(&raw, "{{ messages[0]['content'] }}").unwrap();
    let load = prefgen::infer::Load { chat_template: (!chat).then_some(raw.as_path()), ..Default::default() };
    let policy = Policy::load(model, &load).expect("run `make models bench-models` first");
    let encoded: Vec<Vec<u32>> =
        prompts.iter().map(|p| policy.chat.encode(&policy.chat.format_prompt(p).unwrap(), false).unwrap()).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\ngeneration, {name}, {threads} threads, CPU ({})\n", policy.engine());
    println!(
        "| batch | prompts | prompt tokens/s | generated tokens | generated tokens/s | llama.cpp prompt / generated tokens/s | ratio prompt / generated |"
    );
    println!("|---|---|---|---|---|---|---|");
    for batch in [1usize, 8, 32] {
        let n = batch.max(8).min(encoded.len());
        let jobs: Vec<&Vec<u32>> = encoded.iter().take(n).collect();
        let t = Instant::now();
        let mut prompt_tokens = 0;
        for group in jobs.chunks(batch) {
            let mut caches: Vec<_> = group.iter().map(|_| policy.model.new_cache()).collect();
            let inputs: Vec<&[u32]> = group.iter().map(|ids| ids.as_slice()).collect();
            policy.model.forward(&inputs, &mut caches.iter_mut().collect::<Vec<_>>()).unwrap();
            prompt_tokens += inputs.iter().map(|i| i.len()).sum::<usize>();
        }
        let prefill = prompt_tokens as f64 / t.elapsed().as_secs_f64();
        let work: Vec<Job> = prompts
            .iter()
            .zip(&encoded)
            .take(n)
            .map(|(p, ids)| Job { prompt: ids.clone(), stream: Stream::new(13, p) })
            .collect();
        let mut generated = 0;
        let t = Instant::now();
        engine::generate(&policy, work, Sampling { temperature: 0.8, top_p: 0.95 }, 32, batch, |k| generated += k)
            .unwrap();
        let rate = generated as f64 / t.elapsed().as_secs_f64();
        let mean_prompt = prompt_tokens / n;
        let (theirs, ratio) = match llama.map(|bin| llama_cpp(bin, model, mean_prompt, batch, threads)) {
            Some((pp, tg)) => (format!("{pp:.0} / {tg:.1}"), format!("{:.2} / {:.2}", prefill / pp, rate / tg)),
            None => ("-".into(), "-".into()),
        };
        println!("| {batch} | {n} | {prefill:.0} | {generated} | {rate:.1} | {theirs} | {ratio} |");
    }
}

/// llama.cpp's `llama-batched-bench` for the instruction set prefgen's
/// kernel uses, built on first use; None (with a note) when it cannot be
/// built.
fn llama_cpp_bench() -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let isa = match std::env::var(prefgen::infer::qmatmul::KERNEL_VAR).as_deref() {
        Ok(kernel @ ("avx2" | "avx-vnni")) => kernel.to_string(),
        _ => "native".to_string(),
    };
    println!("llama.cpp built for: {isa}");
    let built = std::process::Command::new(root.join("scripts/llama-cpp.sh"))
        .arg("llama-batched-bench")
        .env("LLAMA_ISA", &isa)
        .current_dir(root)
        .output();
    let bin = match built {
        Ok(o) if o.status.success() => root.join(String::from_utf8_lossy(&o.stdout).trim()),
        _ => {
            eprintln!("llama.cpp's bench tool could not be built (scripts/llama-cpp.sh); its columns stay empty");
            return None;
        }
    };
    Some(bin)
}

/// llama.cpp's prompt tokens/s and generated tokens/s (prefill included) for
/// `batch` prompts of `prompt` tokens, 32 new tokens each.
fn llama_cpp(
    bin: &std::path::Path,
    model: &std::path::Path,
    prompt: usize,
    batch: usize,
    threads: usize,
) -> (f64, f64) {
    let (t, ctx) = (threads.to_string(), (batch * (prompt + 40)).to_string());
    let (pp, npl) = (prompt.to_string(), batch.to_string());
    let out = std::process::Command::new(bin)
        .args([
            "-m",
            &model.to_string_lossy(),
            "-t",
            &t,
            "-tb",
            &t,
            "-c",
            &ctx,
            "-npp",
            &pp,
            "-ntg",
            "32",
            "-npl",
            &npl,
        ])
        .output()
        .expect("llama-batched-bench runs");
    // Rows: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let f: Vec<f64> = line.split('|').filter_map(|c| c.trim().parse().ok()).collect();
            (f.len() == 10).then(|| (f[5], f[2] * f[1] / (f[4] + f[6])))
        })
        .next()
        .expect("llama-batched-bench prints its table")
}
