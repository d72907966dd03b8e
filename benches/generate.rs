//! `make bench`: generation throughput on the CPU demo model, SmolLM2-135M-Instruct
//! (Q4_1 GGUF, `make models`), on MT-Bench's first-turn questions.
//!
//! Prompt tokens/s is the prefill of each prompt (one at a time, as the engine
//! prefills); generated tokens/s is the whole batched run (prefill included)
//! at each batch size, 32 new tokens per response, temperature 0.8, top-p 0.95.

use prefgen::infer::Policy;
use prefgen::infer::engine::{self, Job};
use prefgen::infer::sampler::{Sampling, Stream};
use std::time::Instant;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let policy = Policy::load(&model, &prefgen::infer::Load::default()).expect("run `make models` first");
    let questions =
        std::fs::read_to_string(root.join("../shared/data/mt_bench_questions.jsonl")).expect("../shared/data");
    let prompts: Vec<String> = questions
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|q| q["turns"][0].as_str().map(str::to_string))
        .collect();
    let encoded: Vec<Vec<u32>> =
        prompts.iter().map(|p| policy.encode(&policy.format_prompt(p).unwrap(), false).unwrap()).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\ngeneration, SmolLM2-135M-Instruct Q4_1 (re-quantized to Q8_0), {threads} threads, CPU\n");
    println!("| batch | prompts | prompt tokens/s | generated tokens | generated tokens/s |");
    println!("|---|---|---|---|---|");
    for batch in [1usize, 8, 32] {
        let n = batch.max(8).min(encoded.len());
        let jobs: Vec<&Vec<u32>> = encoded.iter().take(n).collect();
        let t = Instant::now();
        let mut prompt_tokens = 0;
        for ids in &jobs {
            let mut cache = policy.model.new_cache();
            policy.model.forward(&[ids.as_slice()], &mut [&mut cache]).unwrap();
            prompt_tokens += ids.len();
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
        println!("| {batch} | {n} | {prefill:.0} | {generated} | {rate:.1} |");
    }
    println!("\nllama.cpp on the same file is not measured yet (its bench tool is not built here).");
}
