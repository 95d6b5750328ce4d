//! `backstop demo`: the full stack under faults. N order messages (with
//! deliberate duplicates) go through the supervised runtime over the test
//! kit's fault proxy, which cuts the connection every second and blackholes
//! it once, to an HTTP endpoint that fails some orders transiently and some
//! permanently. Dedup, delay tiers and the compensation store do the rest;
//! the ledger accounts for every order.
//!
//! `handled` counts orders the endpoint accepted (2xx), `stored` the rows in
//! the compensation store (one per order that ended there: the demo fails
//! when an order has two), and `lost` the orders that are neither.

use crate::ui;
use anyhow::Context;
use backstop::connection::{Backoff, ConnectionSupervisor};
use backstop::consumer::{Consumer, ConsumerConfig};
use backstop::dedup::{DedupConfig, DedupKey};
use backstop::retry::{Exhausted, RetryPolicy};
use backstop::store::{CompensationStore, ListFilter, SqlStore};
use backstop::topology::{Queue, Topology};
use backstop_testkit::{FaultProxy, try_publish, url_via};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let config = args.broker.config()?;
    let uri = config
        .broker
        .uri
        .clone()
        .unwrap_or_else(|| ui::DEFAULT_URI.to_owned());
    let broker = ui::loopback_addr(&uri)?;

    // Direct connection for arranging the queue and publishing.
    let direct = ui::direct_supervisor(&config, "backstop-demo-publisher")?;
    let live = direct.connection().await?;
    let channel = live.create_channel().await?;
    channel
        .queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting the old demo queue")?;
    let topology = Topology::new().queue(Queue::classic(&args.queue));
    topology.apply(&channel).await?;
    let orders = order_sequence(args.messages);
    let distinct_orders: HashSet<u64> = orders.iter().copied().collect();
    let bar = ui::progress(args.messages, "published");
    try_publish(
        &channel,
        &args.queue,
        args.messages,
        "demo",
        |i| format!("{{\"order_id\":{}}}", orders[i as usize]).into_bytes(),
        |n| bar.set_position(n),
    )
    .await
    .context("publishing the demo messages")?;
    bar.finish_and_clear();
    eprintln!("published {} messages to {}", args.messages, args.queue);

    let proxy = FaultProxy::start(broker)
        .await
        .context("starting the fault proxy")?;
    let heartbeat = Duration::from_secs(2);
    // The consumer's connection: the same [broker] settings, through the
    // proxy, with a short heartbeat and backoff so the faults show quickly.
    let mut proxied = config.clone();
    proxied.broker.uri = Some(url_via(&uri, proxy.addr()));
    proxied.broker.addresses.clear();
    let supervisor = ConnectionSupervisor::start(
        proxied
            .connection_config("backstop-demo-consumer")?
            .heartbeat(heartbeat)
            .connect_timeout(Duration::from_secs(2))
            .backoff(Backoff {
                max: Duration::from_secs(1),
                ..Backoff::default()
            }),
    )?;
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

    // Done when every order was accepted or stored.
    let settled = || {
        let accepted = endpoint.accepted();
        let refused = endpoint.refused();
        let stored = consumer.stats().stored as usize;
        (accepted + refused.min(stored)) as u64
    };
    let distinct = settled;
    let total = distinct_orders.len() as u64;
    let bar = ui::progress(total, "orders settled");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut next_fault = started + Duration::from_secs(1);
    let mut faults = 0u32;
    let mut blackholed_until: Option<Instant> = None;
    while distinct() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bar.set_position(distinct());
        bar.set_message(format!("reconnects={}", supervisor.reconnects()));
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
        let mut idle = consumer.stats().in_flight == 0;
        for name in std::iter::once(args.queue.clone()).chain(policy.tier_queues(&args.queue)) {
            idle = idle
                && ready(channel.clone(), name)
                    .await
                    .context("reading the demo queues' depth")?
                    == 0;
        }
        quiet = if idle { quiet + 1 } else { 0 };
    }

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
    let lost = distinct_orders
        .iter()
        .filter(|o| !accepted.contains(o) && !stored.contains(o))
        .count();
    let twice = endpoint.accepted_twice();
    // One failing order is one row to review, however often it arrived.
    let extra_rows = rows.len().saturating_sub(stored.len());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    cleanup(&direct, &args.queue, &policy).await;
    eprintln!(
        "faults injected={faults} stale_tags_dropped={} sessions={} left_in_queue={left} elapsed={:.1}s",
        report.stale_tags_dropped,
        report.sessions,
        started.elapsed().as_secs_f64()
    );
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
        "ledger: published={} handled={} duplicates={} retried={} dead_lettered={} stored={} lost={lost} reconnects={reconnects}",
        args.messages,
        accepted.len(),
        report.duplicates,
        report.retried,
        report.dead_lettered,
        rows.len(),
    );
    Ok(if lost == 0 && extra_rows == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
