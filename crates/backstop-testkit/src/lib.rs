//! Test support for Backstop: the broker fixture (address, `rabbitmqctl`
//! helpers, publishing, waiting with deadlines), [`FaultProxy`], a TCP proxy
//! that cuts or blackholes connections on demand (or, on one connection,
//! throws the broker's replies away), [`cluster`], the three-node cluster,
//! and [`browser`], a headless Chromium over WebDriver for the console's
//! end-to-end tests.
//!
//! Everything stays on loopback: the proxy listens on 127.0.0.1 and refuses an
//! upstream that is not a loopback address.

pub mod browser;
pub mod cluster;
pub mod effects;
mod proxy;
mod rowlock;
pub mod servers;

pub use proxy::FaultProxy;
pub use rowlock::RowLock;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The default broker address, used when `BACKSTOP_AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker the tests use: `BACKSTOP_AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("BACKSTOP_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// The default PostgreSQL, the one scripts/postgres.sh starts.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://backstop:backstop@127.0.0.1:5432/backstop";

/// The PostgreSQL the store suites use: `BACKSTOP_POSTGRES_URL`, or the local default.
pub fn postgres_url() -> String {
    std::env::var("BACKSTOP_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// The default Redis, the one scripts/redis.sh starts.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// The Redis the dedup suites use: `BACKSTOP_REDIS_URL`, or the local default.
pub fn redis_url() -> String {
    std::env::var("BACKSTOP_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// Where scripts/tls.sh put the test PKI (`BACKSTOP_TLS_DIR`, default
/// `/etc/rabbitmq/backstop-tls`): `ca.pem`, `client.pem`, `client.key`,
/// `other-ca.pem`.
pub fn tls_dir() -> std::path::PathBuf {
    std::env::var("BACKSTOP_TLS_DIR")
        .unwrap_or_else(|_| "/etc/rabbitmq/backstop-tls".to_owned())
        .into()
}

/// The broker's TLS listener (scripts/tls.sh): 127.0.0.1:5671.
pub const TLS_ADDR: &str = "127.0.0.1:5671";

/// The broker's `host:port`, as a socket address.
pub fn broker_addr() -> SocketAddr {
    let url = amqp_url();
    let uri: lapin::uri::AMQPUri = url
        .parse()
        .unwrap_or_else(|e| panic!("BACKSTOP_AMQP_URL is not a valid AMQP URI: {e}"));
    let host = if uri.authority.host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        uri.authority.host.clone()
    };
    format!("{host}:{}", uri.authority.port)
        .parse()
        .unwrap_or_else(|e| panic!("broker host must be an IP address on loopback: {e}"))
}

/// `url` with its host and port replaced by `addr` (a proxy's address).
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority
        .rfind('@')
        .map(|at| &authority[..=at])
        .unwrap_or("");
    format!("{scheme}://{userinfo}{addr}{}", &rest[authority_end..])
}

/// A name no other test (or earlier run) uses: `prefix.<pid>.<time>.<n>`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "{prefix}.{}.{}.{}",
        std::process::id(),
        millis % 100_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it returns true, panicking with `what` after `timeout`.
/// Returns how long it took.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `rabbitmqctl` with `args`; stdout on success, stderr on failure.
pub fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        ))
    }
}

/// The broker's app stopped (`rabbitmqctl stop_app`) by a test: started
/// again by [`start`](Self::start), or when dropped, so that a test that
/// fails while the broker is down (a panic, an assert) never leaves every
/// later test binary without a broker. Run such tests under the exclusive
/// broker lock: every other client sees the outage.
#[derive(Debug)]
#[must_use = "dropping it starts the broker again at once"]
pub struct BrokerStopped {
    started: bool,
}

impl BrokerStopped {
    /// Stops the broker's app.
    pub fn stop() -> Result<Self, String> {
        rabbitmqctl(&["stop_app"])?;
        Ok(BrokerStopped { started: false })
    }

    /// Starts the app again and waits until it has started.
    pub fn start(mut self) -> Result<(), String> {
        self.started = true;
        start_broker_app()
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if !self.started {
            let _ = start_broker_app();
        }
    }
}

fn start_broker_app() -> Result<(), String> {
    rabbitmqctl(&["start_app"])?;
    rabbitmqctl(&["await_startup", "--timeout", "60"]).map(|_| ())
}

/// Makes the broker forget every consumer of the classic queue `queue` (in
/// the virtual host `/`) without telling their clients: the queue process
/// drops them and sends no `basic.cancel`, so each client still believes it
/// is subscribed while nothing reaches it. The channels stay open and keep
/// the deliveries they hold (their acks still count). Returns how many
/// consumers were dropped.
///
/// How, on RabbitMQ 3.10.8 (`rabbit_amqqueue_process.erl`,
/// `rabbit_classic_queue.erl`): a channel cancels a consumer with the call
/// `{basic_cancel, ChPid, CTag, OkMsg, ActingUser}` to the queue process,
/// which sends `OkMsg` to the channel (`maybe_send_reply/2`: nothing for
/// `undefined`) and removes the consumer. Here that call is made with
/// `OkMsg = undefined`, for each consumer `rabbit_amqqueue:consumers_all/1`
/// lists on the queue. The channel still maps the tag: a later
/// `basic.cancel` from the client is answered with `cancel-ok` as usual.
pub fn forget_consumers(queue: &str) -> Result<usize, String> {
    if queue.contains(['"', '\\', '<', '>']) {
        return Err(format!(
            "{queue:?}: a queue name to put in an Erlang binary must not hold quotes, backslashes or angle brackets"
        ));
    }
    let expr = format!(
        r#"QName = rabbit_misc:r(<<"/">>, queue, <<"{queue}">>),
           {{ok, Q}} = rabbit_amqqueue:lookup(QName),
           [gen_server2:call(amqqueue:get_pid(Q),
                             {{basic_cancel, proplists:get_value(channel_pid, C),
                               proplists:get_value(consumer_tag, C), undefined,
                               <<"backstop-test">>}}, infinity)
            || C <- rabbit_amqqueue:consumers_all(<<"/">>),
               proplists:get_value(queue_name, C) =:= QName]."#
    );
    let out = rabbitmqctl(&["eval", &expr])?;
    // `[ok,ok]`: one `ok` per consumer dropped.
    let list = out
        .trim()
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .ok_or_else(|| format!("rabbitmqctl eval answered {out:?}, not a list"))?;
    let items: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .collect();
    if let Some(bad) = items.iter().find(|i| **i != "ok") {
        return Err(format!(
            "dropping a consumer of {queue} answered {bad:?}: {out:?}"
        ));
    }
    Ok(items.len())
}

/// What the broker says about a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u64,
    /// Consumers subscribed.
    pub consumers: u64,
}

/// The broker's counts for `queue`, read with `rabbitmqctl list_queues`;
/// `None` when the queue does not exist. Panics when `rabbitmqctl` fails or
/// says something it cannot parse.
pub fn queue_counts(queue: &str) -> Option<QueueCounts> {
    all_queue_counts()
        .unwrap_or_else(|e| panic!("{e}"))
        .remove(queue)
}

/// Every queue's counts, by name, read with one `rabbitmqctl list_queues`.
/// A line it cannot parse is an error, never a zero.
pub fn all_queue_counts() -> Result<std::collections::HashMap<String, QueueCounts>, String> {
    let out = rabbitmqctl(&QUEUE_COUNTS_ARGS)?;
    parse_queue_counts(&out)
}

/// `rabbitmqctl` arguments listing every queue's counts, as
/// [`parse_queue_counts`] reads them.
pub(crate) const QUEUE_COUNTS_ARGS: [&str; 7] = [
    "-q",
    "list_queues",
    "--no-table-headers",
    "name",
    "messages_ready",
    "messages_unacknowledged",
    "consumers",
];

/// Reads the lines of `rabbitmqctl list_queues name messages_ready
/// messages_unacknowledged consumers`. A line it cannot parse is an error.
pub(crate) fn parse_queue_counts(
    out: &str,
) -> Result<std::collections::HashMap<String, QueueCounts>, String> {
    let mut counts = std::collections::HashMap::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let parsed = match fields.as_slice() {
            [name, ready, unacked, consumers] => (|| {
                Some((
                    (*name).to_owned(),
                    QueueCounts {
                        ready: ready.parse().ok()?,
                        unacked: unacked.parse().ok()?,
                        consumers: consumers.parse().ok()?,
                    },
                ))
            })(),
            _ => None,
        };
        let (name, queue) =
            parsed.ok_or_else(|| format!("cannot read rabbitmqctl list_queues line {line:?}"))?;
        counts.insert(name, queue);
    }
    Ok(counts)
}

/// The prefetch of every consumer of `queue` (virtual host `/`), as the
/// broker reports it (`rabbitmqctl list_consumers queue_name
/// prefetch_count`). Panics when `rabbitmqctl` fails or prints a line it
/// cannot read: a line is never skipped, nor read as no consumer. A listing
/// that raced a queue's exit (another test deleting its queue) is taken
/// again, up to five times.
pub async fn consumer_prefetches(queue: &str) -> Vec<u64> {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut raced = Vec::new();
        while raced.len() < 5 {
            let out = rabbitmqctl(&[
                "-q",
                "list_consumers",
                "--no-table-headers",
                "queue_name",
                "prefetch_count",
            ])
            .unwrap_or_else(|e| panic!("{e}"));
            match parse_consumer_prefetches(&out, &queue).unwrap_or_else(|e| panic!("{e}")) {
                Listing::Read(prefetches) => return prefetches,
                Listing::QueueExited(line) => raced.push(line),
            }
        }
        panic!("rabbitmqctl list_consumers raced a queue's exit five times: {raced:?}")
    })
    .await
    .unwrap_or_else(|e| panic!("the rabbitmqctl task: {e}"))
}

/// What one `rabbitmqctl list_consumers` said.
#[derive(Debug, PartialEq)]
enum Listing {
    /// The prefetches of the queue's consumers.
    Read(Vec<u64>),
    /// A queue process exited while the listing asked it for its consumers
    /// (most often: another test deleted its queue). The broker ends the
    /// listing with that line, `{:badrpc, {:EXIT, ...}}`, which names no
    /// queue, so the listing says nothing certain of any queue. Any exit
    /// reason matches; one that persists (a node down) panics after five
    /// listings.
    QueueExited(String),
}

/// Reads the lines of `rabbitmqctl list_consumers queue_name
/// prefetch_count`: the prefetches of `queue`'s consumers.
fn parse_consumer_prefetches(out: &str, queue: &str) -> Result<Listing, String> {
    let mut prefetches = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("{:badrpc, {:EXIT, ") {
            return Ok(Listing::QueueExited(line.to_owned()));
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, prefetch] = fields.as_slice() else {
            return Err(format!(
                "cannot read rabbitmqctl list_consumers line {line:?}"
            ));
        };
        let prefetch: u64 = prefetch
            .parse()
            .map_err(|_| format!("cannot read rabbitmqctl list_consumers line {line:?}"))?;
        if *name == queue {
            prefetches.push(prefetch);
        }
    }
    Ok(Listing::Read(prefetches))
}

/// The number of messages ready in `queue`, by a passive declare on
/// `channel`. A queue that does not exist is an error, and closes the
/// channel (AMQP's rule).
pub async fn ready_count(channel: &lapin::Channel, queue: &str) -> Result<u32, lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

/// Declares `queue` on `channel`: a durable classic queue with no
/// arguments (already there with the same settings: nothing changes).
pub async fn declare_durable(channel: &lapin::Channel, queue: &str) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map(|_| ())
}

/// A plain lapin connection to the test broker, for arranging and inspecting.
pub async fn connect() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to the test broker at {}: {e}",
                broker_addr()
            )
        })
}

/// Publishes `count` persistent messages to `queue` through the default
/// exchange with publisher confirms. Message `i` has message id `prefix-i`
/// and body `body(i)`. Panics on failure; see [`try_publish`].
pub async fn publish(
    connection: &Connection,
    queue: &str,
    count: u64,
    id_prefix: &str,
    body: impl Fn(u64) -> Vec<u8>,
) {
    let channel = connection
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("channel: {e}"));
    try_publish(&channel, queue, count, id_prefix, body, |_| {})
        .await
        .unwrap_or_else(|e| panic!("publish to {queue}: {e}"));
    let _ = channel.close(200, "published".into()).await;
}

/// Publishes like [`publish`] on `channel`, confirming in windows of 1,000
/// and calling `progress` with the number confirmed so far. Fails if the
/// broker nacks a message or the channel fails.
pub async fn try_publish(
    channel: &lapin::Channel,
    queue: &str,
    count: u64,
    id_prefix: &str,
    body: impl Fn(u64) -> Vec<u8>,
    mut progress: impl FnMut(u64),
) -> Result<(), lapin::Error> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = Vec::with_capacity(1000);
    let mut confirmed = 0;
    for i in 0..count {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{id_prefix}-{i}").into());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body(i),
                props,
            )
            .await?;
        pending.push(confirm);
        if pending.len() == 1000 || i + 1 == count {
            for confirm in pending.drain(..) {
                if !confirm.await?.is_ack() {
                    return Err(lapin::Error::from(std::io::Error::other(
                        "the broker nacked a published message",
                    )));
                }
                confirmed += 1;
            }
            progress(confirmed);
        }
    }
    Ok(())
}

/// Whether the broker's counts for `queue` satisfy `check` (false when the
/// queue does not exist). `rabbitmqctl` blocks, so it runs off the runtime.
pub async fn queue_is(queue: &str, check: impl Fn(QueueCounts) -> bool + Send + 'static) -> bool {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || queue_counts(&queue).is_some_and(check))
        .await
        .unwrap_or(false)
}

/// Deletes `queue` if it exists.
pub async fn delete_queue(connection: &Connection, queue: &str) {
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
        let _ = channel.close(200, "deleted".into()).await;
    }
}

/// Serves `app` on a free loopback port in the background; returns its base
/// URL (`http://127.0.0.1:PORT`).
pub async fn serve_http(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind a loopback port: {e}"));
    let url = format!(
        "http://{}",
        listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the listener's address: {e}"))
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[cfg(test)]
mod tests {
    #[test]
    fn consumer_prefetches_are_read_and_nonsense_is_an_error() {
        use super::Listing;
        let out = "orders\t20\nother\t5\norders\t1\n\n";
        assert_eq!(
            super::parse_consumer_prefetches(out, "orders"),
            Ok(Listing::Read(vec![20, 1]))
        );
        assert_eq!(
            super::parse_consumer_prefetches("", "orders"),
            Ok(Listing::Read(vec![]))
        );
        // Printed by RabbitMQ 3.10.8 in CI when another test deleted its
        // queue during the listing: not a reading of any queue.
        let exited = "{:badrpc, {:EXIT, {:normal, {:gen_server2, :call, \
                      [#PID<12352.7407.2>, :consumers, :infinity]}}}}";
        assert_eq!(
            super::parse_consumer_prefetches(&format!("orders\t20\n{exited}\n"), "orders"),
            Ok(Listing::QueueExited(exited.to_owned()))
        );
        for bad in ["orders\tmany\n", "orders\n", "Listing consumers ...\n"] {
            assert!(
                super::parse_consumer_prefetches(bad, "orders").is_err(),
                "{bad:?}"
            );
        }
    }
}
