//! `backstop run` with a `[scanner]` section (issue 20 item 4), on SQLite:
//! the running scanner uses the configured interval and batch, and
//! `enabled = false` leaves the stored rows alone although a store is set.

use crate::rows;
use crate::sidecar;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use backstop::retry::now_ms;
use backstop::store::{CompensationStore, SqlStore, Status};
use backstop_testkit::{unique, wait_until};
use sidecar::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The endpoint: 200 for everything, the bodies recorded.
#[derive(Clone, Default)]
struct Endpoint {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Endpoint {
    fn saw(&self, id: &str) -> bool {
        self.seen.lock().expect("lock").iter().any(|s| s == id)
    }
}

/// Records the body: each message's body is its id (a stored row's message
/// id is a column, not one of the properties it is re-driven with).
async fn answer(State(endpoint): State<Endpoint>, body: Bytes) -> StatusCode {
    let id = String::from_utf8_lossy(&body).into_owned();
    endpoint.seen.lock().expect("lock").push(id);
    StatusCode::OK
}

/// A SQLite store in a new file, its URL, and an endpoint's URL.
async fn setup() -> (SqlStore, String, Endpoint, String) {
    let path = std::env::temp_dir().join(format!("{}.db", unique("run-scanner")));
    let store_url = format!("sqlite://{}", path.display());
    let store = SqlStore::connect(&store_url)
        .await
        .expect("open the SQLite store");
    let endpoint = Endpoint::default();
    let app = Router::new()
        .route("/orders", post(answer))
        .with_state(endpoint.clone());
    let url = backstop_testkit::serve_http(app).await + "/orders";
    (store, store_url, endpoint, url)
}

/// Stores a row of `queue` with message id `id`, due now.
async fn store_due(store: &SqlStore, queue: &str, id: &str) -> i64 {
    let mut row = rows::failed_message(queue, id, id.as_bytes());
    row.next_attempt_at = now_ms() as i64;
    store.store(&row).await.expect("store a due row")
}

/// Starts `backstop run` consuming `queue` (exhausted messages to the
/// store at `store_url`) with `scanner` as its `[scanner]` section, its
/// log in a file, and waits until it is ready: (the process, the log's path).
async fn start(
    queue: &str,
    url: &str,
    store_url: &str,
    scanner: &str,
) -> (Running, std::path::PathBuf) {
    let port = free_port();
    let config = format!(
        "[broker]\nuri = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [store]\nurl = \"{store_url}\"\n[scanner]\n{scanner}\n\
         [[consumer]]\nqueue = \"{queue}\"\nhandler.http.url = \"{url}\"\n\
         retry.exhausted = \"store\"\n",
        backstop_testkit::amqp_url()
    );
    let started = start_run_logged(
        &config,
        "warn,backstop=info,backstop_cli=info,lapin=off",
        queue,
    );
    wait_ready(port).await;
    started
}

/// The `claimed` count of every "scan done" line in `log`. Panics on one
/// it cannot read.
fn claimed_per_scan(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("scan done"))
        .map(|line| {
            line.split_once("claimed: ")
                .and_then(|(_, rest)| rest.split(',').next())
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no claimed count on {line:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_scanner_uses_the_configured_interval_and_batch() {
    let (store, store_url, endpoint, url) = setup().await;
    let queue = unique("run-scanner");
    let first = store_due(&store, &queue, "first").await;
    let (mut run, log_path) = start(
        &queue,
        &url,
        &store_url,
        "interval = \"500ms\"\nbatch = 2\nmax_attempts = 4\nlease = \"20s\"\nbackoff = \"2s\"",
    )
    .await;
    // The first scan, at start, re-drives the row stored before.
    wait_until(
        "the first scan to re-drive the row stored before the start",
        Duration::from_secs(30),
        || {
            let seen = endpoint.saw("first");
            async move { seen }
        },
    )
    .await;
    // Stored after the first scan: only a later scan takes them, after the
    // configured interval (the default is 30 s), two rows per scan.
    let later: Vec<String> = (0..5).map(|i| format!("later-{i}")).collect();
    let mut ids = Vec::new();
    for id in &later {
        ids.push(store_due(&store, &queue, id).await);
    }
    let stored_at = Instant::now();
    let took = wait_until(
        "the rows stored later to be re-driven within a few configured intervals",
        Duration::from_secs(8),
        || {
            let all = later.iter().all(|id| endpoint.saw(id));
            async move { all }
        },
    )
    .await;
    let (code, _) = terminate(&mut run, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "a clean shutdown");
    for id in ids.iter().chain([&first]) {
        let row = store.get(*id).await.expect("the row");
        assert_eq!(row.status, Status::Replayed, "row {id}");
    }
    let log = std::fs::read_to_string(&log_path).expect("read the log");
    assert!(
        log.contains("store scanner started")
            && log.contains("interval=500ms")
            && log.contains("batch=2")
            && log.contains("max_attempts=4")
            && log.contains("lease=20s")
            && log.contains("backoff=2s"),
        "the scanner logs its configuration:\n{log}"
    );
    let claimed = claimed_per_scan(&log);
    assert!(
        claimed.iter().all(|n| *n <= 2) && claimed.contains(&2),
        "every scan claims at most the batch of 2, some a full one: {claimed:?}\n{log}"
    );
    assert_eq!(claimed.iter().sum::<u64>(), 6, "{claimed:?}");
    eprintln!("re-driven {took:?} after being stored ({stored_at:?}); scans claimed {claimed:?}");
    let _ = std::fs::remove_file(&log_path);
    cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabled_false_leaves_the_stored_rows_alone() {
    let (store, store_url, endpoint, url) = setup().await;
    let queue = unique("run-scanner-off");
    let row = store_due(&store, &queue, "stored").await;
    let (mut run, log_path) = start(
        &queue,
        &url,
        &store_url,
        "enabled = false\ninterval = \"200ms\"",
    )
    .await;
    // The sidecar consumes: a message published now is handled.
    publish(&queue, &[("live", "live".to_owned())]).await;
    wait_until("the live message handled", Duration::from_secs(30), || {
        let seen = endpoint.saw("live");
        async move { seen }
    })
    .await;
    // Ten configured intervals: an enabled scanner would have re-driven
    // the row in the first.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(!endpoint.saw("stored"), "the row was re-driven");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = terminate(&mut run, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "a clean shutdown");
    let stored = store.get(row).await.expect("the row");
    assert_eq!(stored.status, Status::Pending, "left alone");
    assert_eq!(stored.redrives, 0);
    let log = std::fs::read_to_string(&log_path).expect("read the log");
    assert!(
        log.contains("enabled = false") && !log.contains("store scanner started"),
        "{log}"
    );
    let _ = std::fs::remove_file(&log_path);
    cleanup(&queue).await;
}
