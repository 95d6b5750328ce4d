//! `backstop demo`: the full stack under faults. N order messages (with
//! deliberate duplicates) are published through the [`Publisher`] with its
//! spool and consumed by the supervised runtime, both over the test kit's
//! fault proxy, which cuts the connections every second and blackholes them
//! once, while the orders are still being published. The consumer delivers
//! them to an HTTP endpoint that fails some orders transiently and some
//! permanently. Dedup, delay tiers and the compensation store do the rest;
//! the ledger accounts for every order.
//!
//! `published` counts the messages the Publisher answered (confirmed by the
//! broker, or spooled and drained later), `handled` the orders the endpoint
//! accepted (2xx), `stored` the rows in the compensation store (one per
//! order that ended there: the demo fails when an order has two), and
//! `lost` the answered orders that are neither.

use crate::ui;
use anyhow::Context;
use backstop::connection::{Backoff, ConnectionSupervisor};
use backstop::consumer::{Consumer, ConsumerConfig};
use backstop::dedup::{DedupConfig, DedupKey};
use backstop::publish::{Message, PublishError, Published, Publisher};
use backstop::retry::{Exhausted, RetryPolicy};
use backstop::store::{CompensationStore, ListFilter, SqlStore};
use backstop::topology::{Queue, Topology};
use backstop_testkit::{FaultProxy, url_via};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Options of `backstop demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// How many messages to publish and consume.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    #[command(flatten)]
    broker: ui::BrokerArgs,
    /// The demo queue; it is deleted and declared afresh.
    #[arg(long, default_value = "backstop.demo")]
    queue: String,
    /// Simulated work per request at the endpoint, in milliseconds.
    #[arg(long, default_value_t = 4)]
    work_ms: u64,
    /// Give up (and report what is missing as lost) after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Orders published per second, so that publishing goes on across the
    /// first faults.
    #[arg(long, default_value_t = 2000)]
    publish_rate: u64,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let config = args.broker.config()?;
    let uri = config
        .broker
        .uri
        .clone()
        .unwrap_or_else(|| ui::DEFAULT_URI.to_owned());
    let broker = ui::loopback_addr(&uri)?;

    // Direct connection for arranging the queue and reading its depth.
    let direct = ui::direct_supervisor(&config, "backstop-demo")?;
    let live = direct.connection().await?;
    let channel = live.create_channel().await?;
    channel
        .queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting the old demo queue")?;
    let topology = Topology::new().queue(Queue::classic(&args.queue));
    topology.apply(&channel).await?;
    let orders = Arc::new(order_sequence(args.messages));
    let distinct_orders: HashSet<u64> = orders.iter().copied().collect();

    let proxy = FaultProxy::start(broker)
        .await
        .context("starting the fault proxy")?;
    let heartbeat = Duration::from_secs(2);
    // The consumer's and the publisher's connections: the same [broker]
    // settings, through the proxy, with a short heartbeat and backoff so the
    // faults show quickly.
    let mut proxied = config.clone();
    proxied.broker.uri = Some(url_via(&uri, proxy.addr()));
    proxied.broker.addresses.clear();
    let through_proxy = |name: &str| -> anyhow::Result<_> {
        Ok(proxied
            .connection_config(name)?
            .heartbeat(heartbeat)
            .connect_timeout(Duration::from_secs(2))
            .backoff(Backoff {
                max: Duration::from_secs(1),
                ..Backoff::default()
            }))
    };
    let supervisor = ConnectionSupervisor::start(through_proxy("backstop-demo-consumer")?)?;
    let spool = std::env::temp_dir().join(format!("backstop-demo-spool-{}.db", std::process::id()));
    remove_sqlite(&spool.display().to_string());
    let publisher = Publisher::builder(through_proxy("backstop-demo-publisher")?)
        .confirm_timeout(Duration::from_secs(2))
        .spool(&spool)
        .start()
        .await?;
    let endpoint = Endpoint {
        answers: Arc::default(),
        work: Duration::from_millis(args.work_ms),
    };
    let url = endpoint.start().await?;
    let db = std::env::temp_dir().join(format!("backstop-demo-{}.db", std::process::id()));
    let db_url = format!("sqlite://{}", db.display());
    let store = Arc::new(SqlStore::connect(&db_url).await?);
    let seen = backstop::dedup::connect(&db_url).await?;
    let handler = crate::run::http::HttpHandler::new(
        &args.queue,
        &url,
        Duration::from_secs(5),
        crate::run::metrics::durations(),
    )?;
    let policy = RetryPolicy::new()
        .delays([Duration::from_millis(200), Duration::from_secs(1)])
        .exhausted(Exhausted::Store);
    let consumer = Consumer::new(
        supervisor.clone(),
        ConsumerConfig::new(&args.queue)
            .topology(topology)
            .prefetch(200)
            .concurrency(16)
            .retry(policy.clone())
            .compensation_store(store.clone(), Duration::from_secs(3600))
            .dedup(DedupConfig::new(
                DedupKey::JsonPointer("/order_id".into()),
                seen,
            )),
        handler,
    )
    .spawn()?;
    let side = Arc::new(Mutex::new(PublishSide::default()));
    let publishing = tokio::spawn(publish_orders(
        publisher.clone(),
        args.queue.clone(),
        orders.clone(),
        args.publish_rate.max(1),
        side.clone(),
    ));

    // Done when every order was published (answered by the publisher), the
    // spool is empty, and every order was accepted or stored.
    let settled = || {
        let accepted = endpoint.accepted();
        let refused = endpoint.refused();
        let stored = consumer.stats().stored as usize;
        (accepted + refused.min(stored)) as u64
    };
    let answered = || side.lock().map(|s| s.orders.len() as u64).unwrap_or(0);
    let done = || {
        publishing.is_finished() && publisher.stats().spool_messages == 0 && settled() >= answered()
    };
    let bar = ui::progress(distinct_orders.len() as u64, "orders settled");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut next_fault = started + Duration::from_secs(1);
    let mut faults = 0u32;
    let mut blackholed_until: Option<Instant> = None;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bar.set_position(settled());
        let stats = publisher.stats();
        bar.set_message(format!(
            "published={} spooled={} in_spool={} reconnects={}+{}",
            side.lock().map(|s| s.messages).unwrap_or(0),
            stats.spooled,
            stats.spool_messages,
            supervisor.reconnects(),
            publisher.supervisor().reconnects(),
        ));
        let now = Instant::now();
        if let Some(until) = blackholed_until {
            if now >= until {
                proxy.restore();
                bar.println("fault: cable plugged back in (forwarding restored)");
                blackholed_until = None;
                next_fault = now + Duration::from_secs(1);
            }
        } else if now >= next_fault {
            faults += 1;
            if faults == 3 {
                // Long enough for two missed heartbeats to be noticed.
                proxy.blackhole();
                bar.println("fault: cable pulled (blackhole, no FIN, no RST)");
                blackholed_until = Some(now + heartbeat * 3);
            } else {
                proxy.cut();
                bar.println("fault: connection cut");
                next_fault = now + Duration::from_secs(1);
            }
        }
    }
    proxy.restore();
    bar.finish_and_clear();
    // Past the deadline, what was not answered yet is reported, not retried.
    publishing.abort();
    let _ = publishing.await;
    let drained = publisher
        .drained(deadline.saturating_duration_since(Instant::now()))
        .await;

    // Redeliveries of messages whose ack was cut off are still coming in;
    // let them be handled (as duplicates) before stopping.
    let ready = |channel: lapin::Channel, queue: String| async move {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
    };
    let mut quiet = 0;
    while quiet < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut idle = consumer.stats().in_flight == 0 && publisher.stats().spool_messages == 0;
        for name in std::iter::once(args.queue.clone()).chain(policy.tier_queues(&args.queue)) {
            idle = idle
                && ready(channel.clone(), name)
                    .await
                    .context("reading the demo queues' depth")?
                    == 0;
        }
        quiet = if idle { quiet + 1 } else { 0 };
    }

    // Closed first: it waits for the drain, so its counters are final.
    publisher.close().await;
    let published = publisher.stats();
    let publisher_reconnects = publisher.supervisor().reconnects();
    let report = consumer.shutdown().await?;
    let reconnects = supervisor.reconnects();
    supervisor.close().await;

    // What the broker still holds must be nothing once every id was handled.
    let left = ready(channel.clone(), args.queue.clone())
        .await
        .context("reading the demo queue's depth")?;
    let _ = channel.close(200, "demo done".into()).await;

    let rows = store
        .list(&ListFilter {
            queue: Some(args.queue.clone()),
            limit: Some(i64::MAX),
            ..ListFilter::default()
        })
        .await?;
    let stored: HashSet<u64> = rows.iter().filter_map(|r| order_of(&r.payload)).collect();
    let accepted = endpoint.accepted_orders();
    let side = side.lock().map(|s| s.clone()).unwrap_or_default();
    // Every order the publisher answered (confirmed or spooled) must be
    // handled or stored; orders it refused were never the system's.
    let lost = side
        .orders
        .iter()
        .filter(|o| !accepted.contains(o) && !stored.contains(o))
        .count();
    let unanswered = args.messages.saturating_sub(side.messages);
    let twice = endpoint.accepted_twice();
    // One failing order is one row to review, however often it arrived.
    let extra_rows = rows.len().saturating_sub(stored.len());
    remove_sqlite(&db.display().to_string());
    remove_sqlite(&spool.display().to_string());
    cleanup(&direct, &args.queue, &policy).await;
    eprintln!(
        "faults injected={faults} stale_tags_dropped={} sessions={} left_in_queue={left} elapsed={:.1}s",
        report.stale_tags_dropped,
        report.sessions,
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "publisher: confirmed={} spooled={} drained={} uncertain={} in_spool={} parked={} \
         errors={} reconnects={publisher_reconnects}{}",
        published.confirmed,
        published.spooled,
        published.drained,
        published.uncertain,
        published.spool_messages,
        published.spool_parked,
        side.errors,
        side.last_error
            .as_ref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    );
    if !drained || published.spool_messages > 0 || published.spool_parked > 0 {
        eprintln!(
            "the spool was not drained: {} messages left, {} parked",
            published.spool_messages, published.spool_parked
        );
    }
    if unanswered > 0 {
        eprintln!("{unanswered} messages were never answered by the publisher before the deadline");
    }
    if twice > 0 {
        eprintln!("{twice} orders reached the endpoint with 2xx more than once");
    }
    if extra_rows > 0 {
        eprintln!(
            "{} store rows for {} orders: an order has more than one row to review",
            rows.len(),
            stored.len()
        );
    }
    direct.close().await;
    println!(
        "ledger: published={} confirmed={} spooled={} drained={} uncertain={} handled={} \
         duplicates={} retried={} dead_lettered={} stored={} lost={lost} reconnects={reconnects}",
        side.messages,
        published.confirmed,
        published.spooled,
        published.drained,
        published.uncertain,
        accepted.len(),
        report.duplicates,
        report.retried,
        report.dead_lettered,
        rows.len(),
    );
    Ok(if lost == 0 && extra_rows == 0 && unanswered == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The publishing side of the ledger.
#[derive(Clone, Debug, Default)]
struct PublishSide {
    /// Orders the publisher answered (confirmed or spooled).
    orders: HashSet<u64>,
    /// Messages it answered.
    messages: u64,
    /// Publishes it failed (each tried again).
    errors: u64,
    last_error: Option<String>,
}

/// Publishes `orders[i]` as message `demo-i`, `rate` messages a second in
/// batches of 50 (each batch its own task, so a batch waiting out a fault
/// does not hold up the next), until the publisher answered every one; a
/// failed publish is tried again in a later batch.
async fn publish_orders(
    publisher: Publisher,
    queue: String,
    orders: Arc<Vec<u64>>,
    rate: u64,
    side: Arc<Mutex<PublishSide>>,
) {
    const BATCH: usize = 50;
    let mut todo: std::collections::VecDeque<usize> = (0..orders.len()).collect();
    let tick = Duration::from_secs_f64(BATCH as f64 / rate as f64);
    let mut next = tokio::time::Instant::now();
    let mut batches: JoinSet<Vec<(usize, Result<Published, PublishError>)>> = JoinSet::new();
    while !todo.is_empty() || !batches.is_empty() {
        tokio::select! {
            Some(done) = batches.join_next(), if !batches.is_empty() => {
                let Ok(done) = done else { continue };
                let Ok(mut side) = side.lock() else { return };
                for (i, result) in done {
                    match result {
                        Ok(_) => {
                            side.orders.insert(orders[i]);
                            side.messages += 1;
                        }
                        Err(e) => {
                            side.errors += 1;
                            side.last_error = Some(e.to_string());
                            todo.push_back(i);
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(next), if !todo.is_empty() => {
                let batch: Vec<usize> = todo.drain(..BATCH.min(todo.len())).collect();
                let messages = batch
                    .iter()
                    .map(|&i| {
                        let body = format!("{{\"order_id\":{}}}", orders[i]).into_bytes();
                        Message::new("", queue.as_str(), body).with_message_id(format!("demo-{i}"))
                    })
                    .collect();
                let publisher = publisher.clone();
                batches.spawn(async move {
                    let results = publisher.publish_batch(messages).await;
                    batch.into_iter().zip(results).collect()
                });
                next += tick;
            }
        }
    }
}

fn remove_sqlite(path: &str) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
}

/// `messages` orders: every 20th message repeats an earlier order.
fn order_sequence(messages: u64) -> Vec<u64> {
    let mut next = 0;
    (0..messages)
        .map(|i| {
            if i % 20 == 19 {
                (i * 7) % next.max(1)
            } else {
                next += 1;
                next - 1
            }
        })
        .collect()
}

fn order_of(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("order_id")?
        .as_u64()
}

/// Orders the endpoint refuses for good (HTTP 422).
fn permanent(order: u64) -> bool {
    order % 97 == 5
}

/// Orders the endpoint fails once (HTTP 503) before accepting.
fn flaky(order: u64) -> bool {
    order % 17 == 3
}

/// The demo's HTTP endpoint, in process on 127.0.0.1.
#[derive(Clone)]
struct Endpoint {
    /// order -> (calls, 2xx answers)
    answers: Arc<Mutex<HashMap<u64, (u32, u32)>>>,
    work: Duration,
}

impl Endpoint {
    async fn start(&self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the demo endpoint")?;
        let url = format!("http://{}/orders", listener.local_addr()?);
        let app = axum::Router::new()
            .route("/orders", axum::routing::post(answer))
            .with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(url)
    }

    fn answers(&self) -> HashMap<u64, (u32, u32)> {
        self.answers.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn accepted(&self) -> usize {
        self.answers().values().filter(|(_, ok)| *ok > 0).count()
    }

    fn accepted_orders(&self) -> HashSet<u64> {
        self.answers()
            .into_iter()
            .filter(|(_, (_, ok))| *ok > 0)
            .map(|(order, _)| order)
            .collect()
    }

    fn accepted_twice(&self) -> usize {
        self.answers().values().filter(|(_, ok)| *ok > 1).count()
    }

    fn refused(&self) -> usize {
        self.answers().keys().filter(|o| permanent(**o)).count()
    }
}

async fn answer(
    axum::extract::State(endpoint): axum::extract::State<Endpoint>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    tokio::time::sleep(endpoint.work).await;
    let Some(order) = order_of(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let Ok(mut answers) = endpoint.answers.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    let entry = answers.entry(order).or_insert((0, 0));
    entry.0 += 1;
    if permanent(order) {
        StatusCode::UNPROCESSABLE_ENTITY
    } else if flaky(order) && entry.0 == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        entry.1 += 1;
        StatusCode::OK
    }
}

/// Deletes the demo's retry and dead-letter queues.
async fn cleanup(direct: &ConnectionSupervisor, queue: &str, policy: &RetryPolicy) {
    let Ok(live) = direct.connection().await else {
        return;
    };
    let Ok(channel) = live.create_channel().await else {
        return;
    };
    for name in policy
        .tier_queues(queue)
        .into_iter()
        .chain([RetryPolicy::dead_letter_queue(queue)])
    {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel.close(200, "demo cleanup".into()).await;
}
