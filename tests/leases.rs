//! Leases under contention: 20 claimers at once on one shared folder and on
//! an S3 server (moto, on 127.0.0.1) work through 40 shards; every shard is
//! built, and none twice while a lease on it was live.

mod common;

use common::*;
use prefgen::cache::Remote;
use prefgen::cache::lease::{Claim, Leases};
use prefgen::config::RemoteSpec;
use prefgen::digest::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CLAIMERS: usize = 20;
const SHARDS: usize = 40;

fn contend(remote: &Remote) {
    // As a push does: a remote is written to once it has its layout.
    remote.check_layout(true).unwrap();
    let keys: Vec<Digest> = (0..SHARDS).map(|i| Digest::of(format!("shard {i}").as_bytes())).collect();
    // Who is building each shard now, and every build that happened.
    let building: Mutex<BTreeMap<Digest, String>> = Mutex::default();
    let done: Mutex<BTreeSet<Digest>> = Mutex::default();
    let builds: Mutex<Vec<Digest>> = Mutex::default();
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..CLAIMERS {
            let (keys, building, done, builds) = (&keys, &building, &done, &builds);
            let leases = Leases::new(remote.shared_tier(), Duration::from_secs(30));
            s.spawn(move || {
                // Each claimer walks the shards from its own starting point.
                let order: Vec<&Digest> = keys.iter().cycle().skip(c * 7).take(SHARDS).collect();
                while done.lock().unwrap().len() < SHARDS {
                    assert!(started.elapsed() < Duration::from_secs(120), "claimers did not finish");
                    for key in &order {
                        if done.lock().unwrap().contains(*key) {
                            continue;
                        }
                        let Claim::Mine(lease) = leases.try_claim(key, "a shard").unwrap() else { continue };
                        // As the runner does: a shard stored meanwhile is not built again.
                        if done.lock().unwrap().contains(*key) {
                            continue;
                        }
                        let me = format!("claimer {c}");
                        if let Some(other) = building.lock().unwrap().insert(**key, me.clone()) {
                            panic!("{me} claimed {} while {other} held a live lease on it", key.short());
                        }
                        std::thread::sleep(Duration::from_millis(3));
                        builds.lock().unwrap().push(**key);
                        done.lock().unwrap().insert(**key);
                        building.lock().unwrap().remove(*key);
                        drop(lease);
                    }
                }
            });
        }
    });
    let builds = builds.into_inner().unwrap();
    assert_eq!(builds.len(), SHARDS, "each shard built exactly once");
    assert_eq!(builds.iter().collect::<BTreeSet<_>>().len(), SHARDS);
}

#[test]
fn twenty_claimers_on_a_shared_folder() {
    let dir = tempfile::tempdir().unwrap();
    contend(&Remote::open(&RemoteSpec::read_write(&dir.path().display().to_string())).unwrap());
}

#[test]
fn twenty_claimers_on_an_s3_server() {
    let s3 = S3Server::start("team");
    for (k, v) in s3.env() {
        // SAFETY: set before any thread of this test reads the environment;
        // this binary's other test does not read these variables.
        unsafe { std::env::set_var(k, v) };
    }
    contend(&Remote::open(&RemoteSpec::read_write("s3://team/leases")).unwrap());
}
