use prefgen::infer::Policy;
use prefgen::infer::engine::{self, Job};
use prefgen::infer::sampler::{Sampling, Stream};
use std::time::Instant;
fn main() {
    unsafe { prefgen::infer::settle_process() };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args[1].parse().unwrap();
    let file = args.get(2).map(|s| s.as_str()).unwrap_or("gemma-3-270m-q4_k_m.gguf");
    let questions = std::fs::read_to_string(root.join("benches/data/mt_bench_questions.jsonl")).unwrap();
    let prompts: Vec<String> = questions
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|q| q["turns"][0].as_str().map(str::to_string))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.jinja");
    std::fs::write(&raw, "{{ messages[0]['content'] }}").unwrap();
    let load = prefgen::infer::Load { chat_template: Some(raw.as_path()), ..Default::default() };
    let t = Instant::now();
    let policy = Policy::load(&root.join("models").join(file), &load).unwrap();
    eprintln!("load {:?}", t.elapsed());
    let encoded: Vec<Vec<u32>> =
        prompts.iter().map(|p| policy.chat.encode(&policy.chat.format_prompt(p).unwrap(), false).unwrap()).collect();
    let n = batch.max(8).min(encoded.len());
    if args.get(3).is_some_and(|a| a == "prefill") {
        let t = Instant::now();
        let mut toks = 0;
        for _ in 0..3 {
            for group in encoded.iter().take(n).collect::<Vec<_>>().chunks(batch) {
                let mut caches: Vec<_> = group.iter().map(|_| policy.model.new_cache()).collect();
                let inputs: Vec<&[u32]> = group.iter().map(|ids| ids.as_slice()).collect();
                policy.model.forward(&inputs, &mut caches.iter_mut().collect::<Vec<_>>()).unwrap();
                toks += inputs.iter().map(|i| i.len()).sum::<usize>();
            }
        }
        eprintln!("prefill {} tokens {:.1}/s", toks, toks as f64 / t.elapsed().as_secs_f64());
        return;
    }
    let work: Vec<Job> = prompts
        .iter()
        .zip(&encoded)
        .take(n)
        .map(|(p, ids)| Job { prompt: ids.clone(), stream: Stream::new(13, p) })
        .collect();
    let mut generated = 0;
    let t = Instant::now();
    engine::generate(&policy, work, Sampling { temperature: 0.8, top_p: 0.95 }, 32, batch, |k| generated += k).unwrap();
    eprintln!("gen {} tokens {:.1}/s", generated, generated as f64 / t.elapsed().as_secs_f64());
}
