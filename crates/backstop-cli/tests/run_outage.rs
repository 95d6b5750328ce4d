//! `backstop run` through a 15 s outage of its dedup and compensation
//! store servers and a forced close of its AMQP connection (issue 19).
//!
//! The servers are private ones of the test kit (a PostgreSQL cluster and a
//! Redis of their own on free ports), stopped and started here; the shared
//! ones other tests use are never touched. The forced close goes through a
//! fault proxy in front of the broker, so it closes this process's
//! connection only.

mod sidecar;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use backstop::store::{CompensationStore, ListFilter, SqlStore};
use backstop_testkit::servers::{PrivatePostgres, PrivateRedis};
use backstop_testkit::{FaultProxy, queue_is, unique, wait_until};
use sidecar::*;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const UNIQUE_ORDERS: u64 = 4_500;
const MESSAGES: u64 = 5_000;
const OUTAGE: Duration = Duration::from_secs(15);

/// Orders the endpoint always refuses (422): the permanent failures.
fn permanent(order: u64) -> bool {
    order % 50 == 1
}

/// Orders that fail once with 503 and then succeed.
fn flaky(order: u64) -> bool {
    order % 7 == 3
}

/// 4,500 orders, each once, and 500 duplicates (10%, permanent failures
/// among them) interleaved: every tenth message repeats an earlier order.
fn order_sequence() -> Vec<u64> {
    let mut mixed = Vec::with_capacity(MESSAGES as usize);
    let mut dup = 0u64;
    for order in 0..UNIQUE_ORDERS {
        mixed.push(order);
        if order % 9 == 8 {
            mixed.push(dup * 9 % (order + 1));
            dup += 1;
        }
    }
    assert_eq!(mixed.len() as u64, MESSAGES);
    mixed
}

#[derive(Clone, Default)]
struct Orders {
    /// order -> (calls, 2xx answers)
    seen: Arc<Mutex<HashMap<u64, (u32, u32)>>>,
}

impl Orders {
    fn ok_count(&self) -> usize {
        self.seen
            .lock()
            .map(|s| s.values().filter(|(_, ok)| *ok > 0).count())
            .unwrap_or(0)
    }
}

async fn answer(State(orders): State<Orders>, body: Bytes) -> StatusCode {
    let order = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("order_id").and_then(|o| o.as_u64()))
        .unwrap_or(u64::MAX);
    // A little work per call, so that handlers are running when the
    // servers stop.
    tokio::time::sleep(Duration::from_millis(3)).await;
    let mut seen = orders.seen.lock().expect("lock");
    let entry = seen.entry(order).or_insert((0, 0));
    entry.0 += 1;
    let status = if permanent(order) {
        StatusCode::UNPROCESSABLE_ENTITY
    } else if flaky(order) && entry.0 == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    if status.is_success() {
        entry.1 += 1;
    }
    status
}

/// Which dedup store the run uses; the compensation store is always the
/// private PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dedup {
    Postgres,
    Redis,
    /// A SQLite file made immutable (`chattr +i`, the database and its WAL)
    /// for the outage: even root's writes through descriptors already open
    /// fail with `EPERM`, which SQLite reports as a disk I/O error. The WAL
    /// index (`-shm`) is left alone: it is memory-mapped, and a write to an
    /// immutable mapped page is a `SIGBUS` that kills the process (a crash,
    /// not an outage). The compensation store (PostgreSQL) stays up.
    Sqlite,
}

/// Files made immutable (`chattr +i`) until dropped.
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    /// Makes `files` immutable.
    fn files(files: Vec<std::path::PathBuf>) -> Self {
        for file in &files {
            let done = std::process::Command::new("chattr")
                .arg("+i")
                .arg(file)
                .status()
                .expect("run chattr");
            assert!(done.success(), "chattr +i {}", file.display());
        }
        Immutable(files)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for file in &self.0 {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(file)
                .status();
        }
    }
}

async fn through_an_outage(dedup: Dedup) {
    let orders = Orders::default();
    let app = Router::new()
        .route("/orders", post(answer))
        .with_state(orders.clone());
    let url = backstop_testkit::serve_http(app).await + "/orders";

    let mut pg = PrivatePostgres::start();
    let mut redis = (dedup == Dedup::Redis).then(PrivateRedis::start);
    let sqlite_dir = std::env::temp_dir().join(unique("run-outage-sqlite"));
    std::fs::create_dir_all(&sqlite_dir).expect("create the SQLite directory");
    let dedup_url = match (&redis, dedup) {
        (Some(redis), _) => redis.url(),
        (None, Dedup::Sqlite) => format!("sqlite://{}", sqlite_dir.join("dedup.db").display()),
        (None, _) => pg.url(),
    };
    let proxy = FaultProxy::start(backstop_testkit::broker_addr())
        .await
        .expect("proxy");
    let broker = backstop_testkit::url_via(&backstop_testkit::amqp_url(), proxy.addr());

    let queue = unique("run-outage");
    let port = free_port();
    let config = format!(
        "[broker]\nuri = \"{broker}\"\nheartbeat = \"5s\"\n\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n\n\
         [store]\nurl = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[consumer]]\nqueue = \"{queue}\"\nprefetch = 100\nconcurrency = 8\n\
         handler.http.url = \"{url}\"\nhandler.http.timeout = \"5s\"\n\
         retry.delays = [\"200ms\", \"1s\"]\nretry.exhausted = \"store\"\n\
         dedup.key = \"json:/order_id\"\ndedup.store = \"{dedup_url}\"\n",
        pg.url()
    );
    let log = std::env::temp_dir().join(format!("{queue}.log"));
    let mut run = start_run_logging(
        &config,
        "warn,lapin=off",
        std::fs::File::create(&log).expect("log file"),
    );
    wait_ready(port).await;

    let all = order_sequence();
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    backstop_testkit::try_publish(
        &channel,
        &queue,
        MESSAGES,
        "order",
        |i| format!(r#"{{"order_id":{}}}"#, all[i as usize]).into_bytes(),
        |_| {},
    )
    .await
    .expect("publish 5,000");
    let _ = connection.close(200, "published".into()).await;

    let expected_ok = (0..UNIQUE_ORDERS).filter(|o| !permanent(*o)).count();
    let progress = |n: usize| {
        let orders = orders.clone();
        move || {
            let done = orders.ok_count() >= n;
            async move { done }
        }
    };
    wait_until(
        "progress before the outage",
        Duration::from_secs(60),
        progress(1_000),
    )
    .await;

    // The outage: the dedup server (and the store's) stops for 15 s; or
    // the SQLite dedup file cannot be written.
    let mut immutable = None;
    if dedup == Dedup::Sqlite {
        immutable = Some(Immutable::files(vec![
            sqlite_dir.join("dedup.db"),
            sqlite_dir.join("dedup.db-wal"),
        ]));
    } else {
        pg.stop();
    }
    if let Some(redis) = &mut redis {
        redis.stop();
    }
    let down = Instant::now();
    let ready_url = format!("http://127.0.0.1:{port}/readyz");
    reports_the_store_down(&ready_url, Duration::from_secs(10)).await;
    // One forced close of the AMQP connection, mid-outage: everything held
    // unacked comes back as redeliveries while the stores are down.
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.cut();
    tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
    match immutable.take() {
        Some(files) => drop(files),
        None => pg.resume(),
    }
    if let Some(redis) = &mut redis {
        redis.resume();
    }
    let back = Instant::now();

    wait_until(
        "every good order answered 2xx",
        Duration::from_secs(60),
        progress(expected_ok),
    )
    .await;
    let names = [
        queue.clone(),
        format!("{queue}.retry.200ms"),
        format!("{queue}.retry.1s"),
    ];
    wait_until(
        "the queue and the retry queues are empty",
        Duration::from_secs(60).saturating_sub(back.elapsed()),
        || {
            let names = names.clone();
            async move {
                for name in &names {
                    if !queue_is(name, |c| c.ready == 0 && c.unacked == 0).await {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    wait_until(
        "no pending release or done-mark, and /readyz is ready",
        Duration::from_secs(60).saturating_sub(back.elapsed()),
        || {
            let (queue, ready_url) = (queue.clone(), ready_url.clone());
            async move {
                let pending =
                    pending(port, &queue, "release").await + pending(port, &queue, "done").await;
                pending == 0.0 && get(&ready_url).await.0 == 200
            }
        },
    )
    .await;
    let recovered = back.elapsed();
    assert!(
        run.0.try_wait().expect("status").is_none(),
        "backstop run exited"
    );

    let seen = orders.seen.lock().expect("lock").clone();
    let not_once: Vec<_> = seen
        .iter()
        .filter(|(o, (_, ok))| !permanent(**o) && *ok != 1)
        .collect();
    assert!(
        not_once.is_empty(),
        "orders not answered 2xx exactly once: {not_once:?} (log: {})",
        log.display()
    );
    assert_eq!(seen.keys().filter(|o| !permanent(**o)).count(), expected_ok);

    // Each permanent failure is one row: duplicates and redeliveries of it
    // are occurrences of that row.
    let store = SqlStore::connect(&pg.url()).await.expect("store");
    let rows = store
        .list(&ListFilter {
            queue: Some(queue.clone()),
            limit: Some(10_000),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    let mut stored: Vec<u64> = rows
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.payload)
                .ok()
                .and_then(|v| v.get("order_id").and_then(|o| o.as_u64()))
                .expect("a stored order")
        })
        .collect();
    stored.sort_unstable();
    let want: Vec<u64> = (0..UNIQUE_ORDERS).filter(|o| permanent(*o)).collect();
    assert_eq!(
        stored, want,
        "the store holds exactly one row per permanent failure"
    );
    let distinct: HashSet<_> = stored.iter().collect();
    assert_eq!(distinct.len(), stored.len());
    eprintln!("{dedup:?}: recovered {recovered:?} after the servers came back");

    let (code, _) = terminate(&mut run, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
    let connection = backstop_testkit::connect().await;
    for name in names.iter().chain([&format!("{queue}.dlq")]) {
        backstop_testkit::delete_queue(&connection, name).await;
    }
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(&sqlite_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dedup_made_unwritable_and_a_forced_close() {
    through_an_outage(Dedup::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dedup_and_store_through_an_outage_and_a_forced_close() {
    through_an_outage(Dedup::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dedup_and_postgres_store_through_an_outage_and_a_forced_close() {
    through_an_outage(Dedup::Redis).await;
}

/// An endpoint that stops the private PostgreSQL during the first call of
/// its order (the handler is running when the dedup store goes), then
/// answers `first` to that call and 200 to every later one.
#[derive(Clone)]
struct StopsTheStore {
    pg: Arc<Mutex<PrivatePostgres>>,
    first: StatusCode,
    /// (calls, 2xx answers)
    seen: Arc<Mutex<(u32, u32)>>,
}

async fn stop_on_first_call(State(s): State<StopsTheStore>) -> StatusCode {
    let first = {
        let mut seen = s.seen.lock().expect("lock");
        seen.0 += 1;
        seen.0 == 1
    };
    let status = if first {
        let pg = s.pg.clone();
        tokio::task::spawn_blocking(move || pg.lock().expect("lock").stop())
            .await
            .expect("stop the private PostgreSQL");
        s.first
    } else {
        StatusCode::OK
    };
    if status.is_success() {
        s.seen.lock().expect("lock").1 += 1;
    }
    status
}

/// Waits up to `within` for `/readyz` (at `ready_url`) to answer 503
/// saying a store is down.
async fn reports_the_store_down(ready_url: &str, within: Duration) {
    wait_until("/readyz reports the store down", within, || async move {
        let (status, body) = get(ready_url).await;
        status == 503 && body.contains("store is down")
    })
    .await;
}

/// Runs `backstop run` on one queue with PostgreSQL dedup on a private
/// server whose first handler call stops it (answering `first`), and
/// `extra` in the consumer block; returns the endpoint's state, the run,
/// the queue and the metrics port.
async fn one_order_stopping_the_store(
    first: StatusCode,
    extra: &str,
) -> (StopsTheStore, Running, String, u16) {
    let pg = PrivatePostgres::start();
    let dedup_url = pg.url();
    let state = StopsTheStore {
        pg: Arc::new(Mutex::new(pg)),
        first,
        seen: Arc::default(),
    };
    let app = Router::new()
        .route("/orders", post(stop_on_first_call))
        .with_state(state.clone());
    let url = backstop_testkit::serve_http(app).await + "/orders";
    let queue = unique("run-outage-one");
    let port = free_port();
    let config = format!(
        "[broker]\nuri = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[consumer]]\nqueue = \"{queue}\"\n\
         handler.http.url = \"{url}\"\nhandler.http.timeout = \"5s\"\n\
         dedup.key = \"json:/order_id\"\ndedup.store = \"{dedup_url}\"\n{extra}",
        backstop_testkit::amqp_url()
    );
    let run = start_ready(&config, port).await;
    publish(&queue, &[("order", r#"{"order_id":7}"#.to_owned())]).await;
    wait_until(
        "the first call stopped the store",
        Duration::from_secs(30),
        || {
            let calls = state.seen.lock().expect("lock").0;
            async move { calls >= 1 }
        },
    )
    .await;
    (state, run, queue, port)
}

fn resume(state: &StopsTheStore) {
    state.pg.lock().expect("lock").resume();
}

async fn pending(port: u16, queue: &str, op: &str) -> f64 {
    let (_, text) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    metric_value(
        &text,
        &format!("backstop_dedup_pending{{queue=\"{queue}\",op=\"{op}\"}}"),
    )
}

/// The issue's first finding: a handler fails transiently while the dedup
/// store is down, so its key cannot be released. Its retry is this
/// instance's own claim: it takes the key over as soon as the store
/// answers, instead of waiting out the 5-minute lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_release_failed_is_taken_over_by_its_retry_at_once() {
    let (state, mut run, queue, port) = one_order_stopping_the_store(
        StatusCode::SERVICE_UNAVAILABLE,
        "retry.delays = [\"200ms\"]\nretry.exhausted = \"dead-letter\"\n",
    )
    .await;
    wait_until(
        "the failed release is pending",
        Duration::from_secs(20),
        || {
            let queue = queue.clone();
            async move { pending(port, &queue, "release").await == 1.0 }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    resume(&state);
    wait_until(
        "the retry handled the order within 20 s of the store's return (the lease is 5 minutes)",
        Duration::from_secs(20),
        || {
            let ok = state.seen.lock().expect("lock").1;
            async move { ok == 1 }
        },
    )
    .await;
    wait_until("the queues are empty", Duration::from_secs(20), || {
        let queue = queue.clone();
        async move {
            queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await
                && queue_is(&format!("{queue}.retry.200ms"), |c| {
                    c.ready == 0 && c.unacked == 0
                })
                .await
        }
    })
    .await;
    assert_eq!(pending(port, &queue, "release").await, 0.0);
    assert_eq!(*state.seen.lock().expect("lock"), (2, 1));
    terminate(&mut run, Duration::from_secs(30)).await;
    let connection = backstop_testkit::connect().await;
    for name in [
        queue.clone(),
        format!("{queue}.retry.200ms"),
        format!("{queue}.dlq"),
    ] {
        backstop_testkit::delete_queue(&connection, &name).await;
    }
}

/// The issue's second finding: a handler succeeds while the dedup store is
/// down, so its key cannot be marked done; the delivery is acked (the
/// effect happened). The done-mark stays pending and is sent when the store
/// returns, so a duplicate published after the claim's lease ran out is
/// still recognised and its handler never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_done_mark_is_sent_when_the_store_returns_so_a_later_duplicate_is_not_run() {
    const LEASE: Duration = Duration::from_secs(20);
    let (state, mut run, queue, port) =
        one_order_stopping_the_store(StatusCode::OK, "dedup.lease = \"20s\"\n").await;
    let handled = Instant::now();
    wait_until(
        "the failed done-mark is pending",
        Duration::from_secs(20),
        || {
            let queue = queue.clone();
            async move { pending(port, &queue, "done").await == 1.0 }
        },
    )
    .await;
    wait_until("the original is acked", Duration::from_secs(20), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    resume(&state);
    wait_until(
        "the pending done-mark is sent",
        Duration::from_secs(20),
        || {
            let queue = queue.clone();
            async move { pending(port, &queue, "done").await == 0.0 }
        },
    )
    .await;
    // Past the claim's lease: a claim nobody completed would be free now.
    tokio::time::sleep((LEASE + Duration::from_secs(1)).saturating_sub(handled.elapsed())).await;
    publish(&queue, &[("order", r#"{"order_id":7}"#.to_owned())]).await;
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    wait_until(
        "the duplicate is settled: acked as one, or handled",
        Duration::from_secs(20),
        || {
            let (metrics, queue) = (metrics.clone(), queue.clone());
            let calls = state.seen.lock().expect("lock").0;
            async move {
                let (_, text) = get(&metrics).await;
                let line =
                    format!("backstop_deliveries_total{{queue=\"{queue}\",outcome=\"duplicate\"}}");
                (metric_value(&text, &line) >= 1.0 || calls >= 2)
                    && queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await
            }
        },
    )
    .await;
    assert_eq!(
        *state.seen.lock().expect("lock"),
        (1, 1),
        "the duplicate must not reach the endpoint"
    );
    terminate(&mut run, Duration::from_secs(30)).await;
    cleanup(&queue).await;
}

/// The store is marked down by a done-mark that failed, and nothing uses
/// it afterwards: the done-mark's lease ends during the outage (it is
/// dropped, logged as a duplicate window) and no message follows. Readiness
/// still comes back with the store, from the consumer's own probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_comes_back_with_the_store_while_the_consumer_is_idle() {
    let (state, mut run, queue, port) =
        one_order_stopping_the_store(StatusCode::OK, "dedup.lease = \"6s\"\n").await;
    let ready_url = format!("http://127.0.0.1:{port}/readyz");
    reports_the_store_down(&ready_url, Duration::from_secs(20)).await;
    // The pending done-mark ends with its lease while the store is down:
    // from here nothing of the consumer's traffic touches the store.
    wait_until(
        "the done-mark is given up with its lease",
        Duration::from_secs(20),
        || {
            let queue = queue.clone();
            async move { pending(port, &queue, "done").await == 0.0 }
        },
    )
    .await;
    wait_until("the original is acked", Duration::from_secs(20), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let (status, _) = get(&ready_url).await;
    assert_eq!(status, 503, "the store is still down");
    resume(&state);
    wait_until(
        "/readyz is ready again with no traffic after the store's return",
        Duration::from_secs(15),
        || {
            let ready_url = ready_url.clone();
            async move { get(&ready_url).await.0 == 200 }
        },
    )
    .await;
    assert_eq!(*state.seen.lock().expect("lock"), (1, 1));
    terminate(&mut run, Duration::from_secs(30)).await;
    cleanup(&queue).await;
}
