//! `make bench`: post-processing and export at the published datasets' size.
//!
//! Synthesises a SimPO import of 60,000 prompts x 5 seeds with ~1 KB responses,
//! then times the release binary: the full build (import, filter, annotate
//! import, binarize, export), a no-op rerun, and `plan`; peak RSS is the
//! largest of the runs. Prints a table against the targets.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

fn peak_rss_mib() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

fn main() {
    let prompts: usize = std::env::var("BENCH_PROMPTS").ok().and_then(|v| v.parse().ok()).unwrap_or(60_000);
    let p = common::Project::new();
    eprintln!("synthesising {prompts} prompts x 5 seeds ...");
    let recipe = common::synthetic(&p, prompts, &[13, 21, 42, 79, 100], 1000);
    let r = recipe.to_str().unwrap();
    // Flush the synthesised inputs first: a user's inputs are already on disk.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let time = |args: &[&str]| {
        let t = Instant::now();
        let run = p.ok(args);
        (t.elapsed().as_secs_f64(), run)
    };
    let (full, run) = time(&["run", r]);
    eprintln!("where the full build's time went:");
    for line in run.stderr().lines().filter(|l| l.starts_with("built ")) {
        eprintln!("  {line}");
    }
    let (noop, _) = time(&["run", r]);
    let (plan, _) = time(&["plan", r]);
    let rss = peak_rss_mib();
    let input_mb: u64 =
        std::fs::read_dir(p.path("syn/gens")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum::<u64>()
            / 1_000_000;
    println!("\npost-processing and export, {prompts} prompts x 5 seeds ({input_mb} MB of decode files), 2-core CPU\n");
    println!("| measure                          | result   | target   |      |");
    println!("|----------------------------------|----------|----------|------|");
    let row = |name: &str, v: f64, unit: &str, target: f64| {
        let ok = if v <= target { "ok" } else { "MISS" };
        println!("| {name:<32} | {v:>6.2} {unit:<1} | <= {target:>4} {unit} | {ok:<4} |");
    };
    row("full post-processing and export", full, "s", 10.0);
    row("no-op rerun", noop, "s", 0.5);
    row("plan", plan, "s", 0.5);
    println!(
        "| {:<32} | {:>5.0} MiB | <= 2048 MiB | {:<4} |",
        "peak RSS (largest run)",
        rss,
        if rss <= 2048.0 { "ok" } else { "MISS" }
    );
}
