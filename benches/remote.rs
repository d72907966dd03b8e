//! `make bench`: the pipeline fixture (60,000 prompts x 5 seeds, ~1 KB
//! responses) shared through an S3-compatible server on 127.0.0.1 (moto,
//! from PyPI): `cache push` of a teammate's build, `plan` and `run` on an
//! empty local cache that finds everything on the bucket, and `cache pull`.
//! Each with its seconds, requests, MB/s and peak resident memory; and the
//! bytes the bucket holds against the decode files the build came from.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

/// `remote URL: N requests, X MB down, Y MB up` from a run's stderr.
fn traffic(run: &common::Run) -> (u64, f64, f64) {
    let line = run.stderr().lines().rev().find(|l| l.starts_with("remote ")).map(str::to_string).unwrap_or_default();
    let num = |after: &str| -> f64 {
        line.split(after).next().and_then(|s| s.rsplit([' ', ':']).next()).and_then(|n| n.parse().ok()).unwrap_or(0.0)
    };
    (num(" requests") as u64, num(" MB down"), num(" MB up"))
}

fn main() {
    let prompts: usize = std::env::var("BENCH_PROMPTS").ok().and_then(|v| v.parse().ok()).unwrap_or(60_000);
    let seeds = [13, 21, 42, 79, 100];
    let s3 = common::S3Server::start("bench");
    let remote = "s3://bench/prefgen";
    let timed = |p: &common::Project, args: &[&str]| {
        let mut c = p.command(args);
        for (k, v) in s3.env() {
            c.env(k, v);
        }
        let t = Instant::now();
        let (run, peak) = common::peak_rss(c);
        assert!(run.0.status.success(), "{args:?}: {}", run.stderr());
        (t.elapsed().as_secs_f64(), (run, peak))
    };
    eprintln!("building the {prompts} x 5 fixture ...");
    let a = common::Project::new();
    let r = common::synthetic(&a, prompts, &seeds, 1000).display().to_string();
    a.ok(&["run", &r]);
    let artifacts: u64 =
        common::files_under(&a.path("cache/objects-v1")).iter().map(|f| f.metadata().unwrap().len()).sum();
    let decode: u64 = common::files_under(&a.path("syn/gens")).iter().map(|f| f.metadata().unwrap().len()).sum();
    let (push, pushed) = timed(&a, &["cache", "push", &r, "--remote", remote]);
    let b = common::Project::new();
    let rb = common::synthetic(&b, prompts, &seeds, 1000).display().to_string();
    let (plan, planned) = timed(&b, &["plan", &rb, "--remote", remote]);
    assert!(!planned.0.stdout().contains("stale "), "{}", planned.0.stdout());
    let (run, ran) = timed(&b, &["run", &rb, "--remote", remote]);
    assert!(ran.0.built().is_empty(), "{}", ran.0.stderr());
    let c = common::Project::new();
    let rc = common::synthetic(&c, prompts, &seeds, 1000).display().to_string();
    let (pull, pulled) = timed(&c, &["cache", "pull", &rc, "--remote", remote]);
    let stored: u64 = s3
        .python("print(sum(o['Size'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket='bench') for o in p.get('Contents', [])))")
        .trim()
        .parse()
        .unwrap();
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "\nsharing the pipeline fixture, {prompts} prompts x 5 seeds: {:.0} MB of artifacts built from {:.0} MB of decode files; local S3 server (moto), 2-core CPU\n",
        mb(artifacts),
        mb(decode)
    );
    println!("| step | seconds | requests | MB moved | MB/s | peak RSS, MB |");
    println!("|---|---|---|---|---|---|");
    for (name, secs, run, up) in [
        ("cache push (teammate A)", push, &pushed, true),
        ("plan, empty local cache", plan, &planned, false),
        ("run, empty local cache (downloads)", run, &ran, false),
        ("cache pull, empty local cache", pull, &pulled, false),
    ] {
        let (requests, down, sent) = traffic(&run.0);
        let moved = if up { sent } else { down };
        println!("| {name} | {secs:.2} | {requests} | {moved:.1} | {:.1} | {:.0} |", moved / secs, mb(run.1));
    }
    println!(
        "\nThe bucket holds {:.0} MB (zstd) for {:.0} MB of decode files ({:.0} MB uncompressed artifacts); plan target <= 2 s: {}.",
        mb(stored),
        mb(decode),
        mb(artifacts),
        if plan <= 2.0 { "ok" } else { "MISS" }
    );
}
