//! `backstop chaos --schedule short` on the three-node cluster of
//! scripts/cluster.sh: three real sidecars sharing a PostgreSQL store and
//! PostgreSQL dedup, 5,000 orders published with confirms, the queue
//! leader's node stopped and started, a sidecar `kill -9`'d and restarted.
//! It must exit 0 with `lost=0` and every order accounted for, within CI's
//! 4 minutes.
//!
//! It stops a cluster node: nothing else may use the cluster meanwhile (it
//! leaves the single broker on 5672 alone, and restarts no PostgreSQL).

mod sidecar;

use sidecar::backstop;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The `ledger:` line's fields. Panics on a line it cannot read.
fn ledger(stdout: &str) -> HashMap<String, u64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ledger: "))
        .unwrap_or_else(|| panic!("no ledger line in:\n{stdout}"));
    line["ledger: ".len()..]
        .split_whitespace()
        .map(|field| {
            let (name, value) = field
                .split_once('=')
                .unwrap_or_else(|| panic!("cannot read {field:?} in {line:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("cannot read {field:?} in {line:?}"));
            (name.to_owned(), value)
        })
        .collect()
}

#[test]
fn the_short_chaos_schedule_loses_nothing_on_postgres_dedup() {
    let dir = std::env::temp_dir().join(format!("backstop-chaos-test-{}", std::process::id()));
    let json = dir.join("report.json");
    let plot = dir.join("throughput.svg");
    let started = Instant::now();
    let (code, stdout, stderr) = backstop(&[
        "chaos",
        "--schedule",
        "short",
        "--dedup",
        "postgres",
        "--json",
        &json.display().to_string(),
        "--plot",
        &plot.display().to_string(),
    ]);
    let took = started.elapsed();
    assert_eq!(
        code, 0,
        "backstop chaos failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let counts = ledger(&stdout);
    assert_eq!(counts["published"], 5_000, "{stdout}");
    assert_eq!(counts["lost"], 0, "{stdout}");
    // Every order is an effect or, refused for good (1%), a store row.
    assert!(counts["effects"] + counts["stored"] >= 5_000, "{stdout}");
    assert!(
        counts["stored"] > 0,
        "no order took the store path: {stdout}"
    );
    assert!(took < Duration::from_secs(240), "took {took:?}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON report was written"))
            .expect("the JSON report parses");
    assert_eq!(report["passed"], true, "{report:#}");
    let faults = report["faults"].as_array().expect("faults is a list");
    let kinds: Vec<&str> = faults.iter().filter_map(|f| f["kind"].as_str()).collect();
    assert_eq!(kinds, ["node-stop-start", "sidecar-kill-9"], "{report:#}");
    assert!(
        faults.iter().all(|f| f["error"].is_null()),
        "a fault failed: {report:#}"
    );
    assert!(
        faults[0]["label"]
            .as_str()
            .is_some_and(|l| l.contains("(leader)")),
        "the stopped node was not the queue leader: {report:#}"
    );
    assert_eq!(
        report["members"].as_array().map(Vec::len),
        Some(3),
        "{report:#}"
    );
    let svg = std::fs::read_to_string(&plot).expect("the picture was written");
    assert!(
        svg.starts_with("<svg") && svg.contains("sidecar-kill-9"),
        "{svg:.300}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_chaos_arguments_exit_2() {
    let (code, _, stderr) = backstop(&["chaos", "--rate", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--rate 0"), "{stderr}");
    let (code, _, stderr) = backstop(&["chaos", "--schedule", "longest"]);
    assert_eq!(code, 2, "{stderr}");
}
