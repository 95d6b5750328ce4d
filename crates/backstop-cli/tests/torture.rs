//! `backstop torture` with the CI seeds: the real sidecar against the real
//! broker, store and dedup stores, under the seed's answers, message shapes
//! and faults (cuts, blackholes, kill -9; never a broker restart). Each
//! seed must end with exit 0 and a ledger line with `broken=0`.
//!
//! All seeds together stay within CI's budget of 3 minutes on two cores:
//! a round of 30 messages takes 10 to 25 seconds.

use std::collections::HashMap;
use std::process::Command;

/// Messages per CI round (3 of them deliberate duplicates).
const MESSAGES: &str = "30";

/// Runs one round and returns the final ledger line's counts, after
/// checking the exit code and that nothing broke.
fn torture(seed: u64, dedup: &str) -> HashMap<String, u64> {
    let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args([
            "torture",
            "--seed",
            &seed.to_string(),
            "--messages",
            MESSAGES,
            "--dedup",
            dedup,
        ])
        .env_remove("RUST_LOG")
        .output()
        .expect("run backstop torture");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "backstop torture --seed {seed} --dedup {dedup} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let prefix = format!("torture: seed={seed} rounds=1 ");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no ledger line starting {prefix:?} in:\n{stdout}"));
    line[prefix.len()..]
        .split_whitespace()
        .filter_map(|field| field.split_once('='))
        .filter(|(name, _)| *name != "elapsed")
        .map(|(name, value)| {
            let n = value
                .parse()
                .unwrap_or_else(|_| panic!("cannot read {name}={value} in {line:?}"));
            (name.to_owned(), n)
        })
        .collect()
}

fn assert_ledger(counts: &HashMap<String, u64>) {
    let get = |name: &str| {
        *counts
            .get(name)
            .unwrap_or_else(|| panic!("the ledger line has no {name}: {counts:?}"))
    };
    assert_eq!(get("broken"), 0, "{counts:?}");
    assert_eq!(get("published"), 30, "{counts:?}");
    assert!(get("handled") > 0, "nothing was handled: {counts:?}");
    assert!(
        get("dead_lettered") + get("stored") > 0,
        "nothing was parked: {counts:?}"
    );
}

#[test]
fn torture_seed_1_with_sqlite_dedup_holds_the_ledger() {
    assert_ledger(&torture(1, "sqlite"));
}

#[test]
fn torture_seed_2_with_redis_dedup_holds_the_ledger() {
    assert_ledger(&torture(2, "redis"));
}

#[test]
fn torture_seed_3_with_postgres_dedup_holds_the_ledger() {
    assert_ledger(&torture(3, "postgres"));
}
