//! `make bench`: reward-scoring throughput on the CPU, batched (sorted by
//! length, packed, 16 at a time) against one sequence at a time (SimPO's
//! `reward_model_annotate.py` loop), for the tiny ArmoRM of the test fixtures
//! and the SmolLM2-135M-Instruct judge (Q4_1 GGUF, `make models`).
//!
//! Conversations: MT-Bench first-turn questions as prompts; as responses,
//! stand-in texts of realistic length (a question's second turn followed by
//! the next question's first).

use prefgen::infer::Load;
use prefgen::infer::reward::{Overflow, RewardModel};
use prefgen::infer::template::Kwargs;
use std::path::Path;
use std::time::Instant;

fn main() {
    // SAFETY: nothing has started a thread yet.
    unsafe { prefgen::infer::settle_process() };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let questions = std::fs::read_to_string(root.join("benches/data/mt_bench_questions.jsonl")).expect("benches/data");
    let turns: Vec<(String, String)> = questions
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|q| Some((q["turns"][0].as_str()?.to_string(), q["turns"][1].as_str()?.to_string())))
        .collect();
    let conversations: Vec<(String, String)> = (0..turns.len())
        .map(|i| (turns[i].0.clone(), format!("{}\n\n{}", turns[i].1, turns[(i + 1) % turns.len()].0)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\nreward scoring, {threads} threads, CPU, batches of 16 vs one at a time\n");
    println!("| model | sequences | tokens | one at a time: seq/s | tokens/s | batched: seq/s | tokens/s | speed-up |");
    println!("|---|---|---|---|---|---|---|---|");
    let models = [
        ("tiny ArmoRM (f32)", root.join("tests/fixtures/tiny-armorm"), conversations.len()),
        ("SmolLM2-135M judge (Q4_1)", root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"), 24),
    ];
    for (name, path, n) in models {
        let model = RewardModel::load(&path, None, None, &Load::default()).expect("run `make models` first");
        // Conversations longer than the model's context are cut, as annotate
        // cuts them; one whose prompt alone is too long is left out.
        let seqs: Vec<Vec<u32>> = conversations
            .iter()
            .filter_map(|(p, r)| model.encode(p, r, model.context(), Overflow::Truncate, &Kwargs::new()).unwrap())
            .take(n)
            .collect();
        let n = seqs.len();
        let tokens: usize = seqs.iter().map(Vec::len).sum();
        let t = Instant::now();
        for s in &seqs {
            model.score(&[s]).unwrap();
        }
        let alone = t.elapsed().as_secs_f64();
        let mut sorted: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let t = Instant::now();
        for batch in sorted.chunks(16) {
            model.score(batch).unwrap();
        }
        let batched = t.elapsed().as_secs_f64();
        println!(
            "| {name} | {n} | {tokens} | {:.1} | {:.0} | {:.1} | {:.0} | {:.2}x |",
            n as f64 / alone,
            tokens as f64 / alone,
            n as f64 / batched,
            tokens as f64 / batched,
            alone / batched
        );
    }
}
