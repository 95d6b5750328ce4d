//! Shared fixtures of the integration tests: a recording handler and a
//! consumer wired through the fault proxy.
#![allow(dead_code, unreachable_pub, missing_docs)]

use backstop::connection::{Backoff, ConnectionConfig, ConnectionSupervisor};
use backstop::consumer::{Consumer, ConsumerConfig, ConsumerHandle};
use backstop::handler::{Delivery, Handler, Outcome};
use backstop::topology::{Queue, Topology};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Logs to the test's captured output, or, when `BACKSTOP_TEST_LOG` names a
/// file (scripts/test sets it), appends every test's logs there at debug
/// level so the run's logs can be searched for leaked passwords.
pub fn init_tracing() {
    if let Ok(path) = std::env::var("BACKSTOP_TEST_LOG")
        && let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
    {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("backstop=debug,lapin=info")
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "backstop=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Records every call by message id, tracks concurrency, and runs `behave`
/// to decide the outcome.
#[derive(Clone, Default)]
pub struct Recorder {
    pub calls: Arc<Mutex<HashMap<String, u32>>>,
    pub handled: Arc<Mutex<HashMap<String, u32>>>,
    pub running: Arc<AtomicU64>,
    pub max_running: Arc<AtomicU64>,
}

impl Recorder {
    pub fn distinct_handled(&self) -> usize {
        self.handled.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Waits until `n` distinct message ids were handled successfully.
    pub async fn wait_handled(&self, n: usize, what: &str, timeout: Duration) -> Duration {
        backstop_testkit::wait_until(what, timeout, || {
            let handled = self.distinct_handled();
            async move { handled == n }
        })
        .await
    }

    pub fn calls_of(&self, id: &str) -> u32 {
        self.calls
            .lock()
            .map(|c| c.get(id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn duplicates(&self) -> u32 {
        self.handled
            .lock()
            .map(|h| h.values().map(|n| n - 1).sum())
            .unwrap_or(0)
    }
}

pub struct RecordingHandler<F> {
    pub recorder: Recorder,
    pub behave: F,
}

impl<F, Fut> Handler for RecordingHandler<F>
where
    F: Fn(Delivery, u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    async fn handle(&self, delivery: Delivery) -> Outcome {
        let id = delivery.message_id().unwrap_or("<none>").to_owned();
        let call = {
            let mut calls = self.recorder.calls.lock().expect("calls lock");
            let n = calls.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let now = self.recorder.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.recorder.max_running.fetch_max(now, Ordering::SeqCst);
        let outcome = (self.behave)(delivery, call).await;
        self.recorder.running.fetch_sub(1, Ordering::SeqCst);
        if outcome == Outcome::Ack {
            *self
                .recorder
                .handled
                .lock()
                .expect("handled lock")
                .entry(id)
                .or_insert(0) += 1;
        }
        outcome
    }
}

pub fn fast_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(1000),
        max_attempts: None,
    }
}

pub fn supervisor(url: &str, heartbeat: Duration) -> ConnectionSupervisor {
    ConnectionSupervisor::start(
        ConnectionConfig::new(url)
            .heartbeat(heartbeat)
            .connection_name("backstop-test")
            .backoff(fast_backoff())
            .connect_timeout(Duration::from_secs(2)),
    )
    .expect("valid supervisor config")
}

pub fn classic(queue: &str) -> Topology {
    Topology::new().queue(Queue::classic(queue))
}

pub fn spawn<F, Fut>(
    supervisor: &ConnectionSupervisor,
    config: ConsumerConfig,
    recorder: &Recorder,
    behave: F,
) -> ConsumerHandle
where
    F: Fn(Delivery, u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    Consumer::new(
        supervisor.clone(),
        config,
        RecordingHandler {
            recorder: recorder.clone(),
            behave,
        },
    )
    .spawn()
    .expect("valid consumer config")
}

pub async fn ack(_: Delivery, _: u32) -> Outcome {
    Outcome::Ack
}

/// Stops the consumer cleanly, closes the supervisor and deletes the queue.
pub async fn finish(
    consumer: ConsumerHandle,
    supervisor: &ConnectionSupervisor,
    publisher: &lapin::Connection,
    queue: &str,
) -> backstop::consumer::ConsumerReport {
    let report = consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    backstop_testkit::delete_queue(publisher, queue).await;
    report
}

/// Kept under its old name for the test files that glob-import this module.
#[allow(unused_imports)]
pub use backstop_testkit::queue_is;

/// Waits (up to 30 s) until the consumer's counters satisfy `check`.
pub async fn wait_stats(
    consumer: &ConsumerHandle,
    what: &str,
    check: impl Fn(&backstop::consumer::ConsumerReport) -> bool,
) {
    backstop_testkit::wait_until(what, Duration::from_secs(30), || {
        let ok = check(&consumer.stats());
        async move { ok }
    })
    .await;
}

/// Declares `topology` on a short-lived connection of its own.
pub async fn declare(topology: &Topology) {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    topology.apply(&channel).await.expect("declare");
    let _ = connection.close(200, "declared".into()).await;
}

/// Kills the child process when the test ends, passed or failed half-way.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test harness's name for the test `test` of the module `module` (pass
/// `module_path!()`), as `--exact` needs it when a test runs another test of
/// its own binary as a child process: the module path without the crate's
/// name, so `publisher::spool_child` in the `suite` binary, `spool_child` in
/// a binary of its own.
pub fn test_name(module: &str, test: &str) -> String {
    match module.split_once("::") {
        Some((_krate, path)) => format!("{path}::{test}"),
        None => test.to_owned(),
    }
}

/// Everything a thread-local subscriber writes, kept in memory. Use it on a
/// current_thread runtime so the supervisor's and consumers' tasks log
/// through it too.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// Captures this thread's logs at `filter` until the guard is dropped.
    pub fn start(filter: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// A channel of `connection` in confirm mode.
pub async fn confirmed_channel(connection: &lapin::Connection) -> lapin::Channel {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    channel
}

/// Publishes one message on a [`confirmed_channel`] and waits until the
/// broker confirms it (a nack, a return or no confirm at all panics).
pub async fn publish_confirmed(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        matches!(confirmation, lapin::Confirmation::Ack(None)),
        "the broker did not confirm the publish to {exchange}:{routing_key}: {confirmation:?}"
    );
}

// The publisher tests' helpers.

/// A durable classic queue, declared on a plain connection.
pub async fn durable_queue(connection: &lapin::Connection, name: &str) {
    let channel = connection.create_channel().await.expect("channel");
    backstop_testkit::declare_durable(&channel, name)
        .await
        .expect("declare");
}

/// Every message of `queue`, by `basic.get` until the broker says empty:
/// (message-id, body), in queue order.
pub async fn take_all(connection: &lapin::Connection, queue: &str) -> Vec<(String, Vec<u8>)> {
    let channel = connection.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(message) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let id = message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .expect("every published message has a message-id");
        out.push((id, message.delivery.data.clone()));
    }
    out
}

/// A fresh directory under the system's temp dir.
pub fn tempdir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(backstop_testkit::unique(what));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

// The compensation store tests' helpers.

/// The compensation store's PostgreSQL tests share one database and claim due
/// rows across it: they take turns (one turn for the whole test binary, so
/// for store.rs and store_groups.rs together in `suite`).
pub static POSTGRES_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The URL of a new SQLite store (a file of its own).
pub async fn sqlite_url() -> String {
    let path =
        std::env::temp_dir().join(format!("{}.db", backstop_testkit::unique("backstop-store")));
    format!("sqlite://{}", path.display())
}

/// The URL of the shared PostgreSQL store (take [`POSTGRES_TURN`] first).
pub async fn postgres_url() -> String {
    backstop_testkit::postgres_url()
}

/// A new SQLite store.
pub async fn sqlite_store() -> backstop::store::SqlStore {
    backstop::store::SqlStore::connect(&sqlite_url().await)
        .await
        .expect("sqlite store")
}

/// The shared PostgreSQL store (take [`POSTGRES_TURN`] first).
pub async fn postgres_store() -> backstop::store::SqlStore {
    backstop::store::SqlStore::connect(&postgres_url().await)
        .await
        .expect("postgres store")
}

/// Every test named, once per backend, as `sqlite::<test>` and
/// `postgres::<test>` (the PostgreSQL ones take turns): each is an `async
/// fn(SqlStore)`. With `url:` first, each takes the store's URL instead,
/// as `sqlite_url::<test>` and `postgres_url::<test>`.
#[allow(unused_macros)] // not every test binary has store tests
macro_rules! both_backends {
    (url: $($test:ident),* $(,)?) => {
        $crate::common::both_backends!(@ sqlite_url, postgres_url: $($test),*);
    };
    (@ $sqlite:ident, $postgres:ident: $($test:ident),*) => {
        mod $sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    $crate::common::init_tracing();
                    super::$test($crate::common::$sqlite().await).await;
                }
            )*
        }
        mod $postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    $crate::common::init_tracing();
                    let _turn = $crate::common::POSTGRES_TURN.lock().await;
                    super::$test($crate::common::$postgres().await).await;
                }
            )*
        }
    };
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    $crate::common::init_tracing();
                    super::$test($crate::common::sqlite_store().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    $crate::common::init_tracing();
                    let _turn = $crate::common::POSTGRES_TURN.lock().await;
                    super::$test($crate::common::postgres_store().await).await;
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use both_backends;
