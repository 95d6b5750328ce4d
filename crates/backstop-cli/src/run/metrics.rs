//! `/metrics` (Prometheus, OpenMetrics text), `/healthz` and `/readyz` of
//! `backstop run`.
//!
//! Counters come straight from the consumers' and the supervisor's live
//! state at each scrape (a collector), so they cannot drift from what the
//! runtime did. Queue depths and store row counts are polled in the
//! background, since reading them costs a broker or database round trip.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use backstop::breaker::BreakerState;
use backstop::connection::{ConnectionState, ConnectionSupervisor};
use backstop::consumer::ConsumerStats;
use backstop::store::CompensationStore;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

type Labels = Vec<(String, String)>;

/// (consumer queue, kind, queue name, depth), as last polled.
type Depths = Arc<Mutex<Vec<(String, &'static str, String, u64)>>>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The handler duration histogram, shared with the HTTP handlers.
pub(crate) fn durations() -> Family<Labels, Histogram> {
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)))
}

/// What a consumer shows.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerView {
    pub(crate) queue: String,
    pub(crate) stats: Arc<ConsumerStats>,
    pub(crate) breaker: watch::Receiver<BreakerState>,
    /// Its retry tier queues and DLQ, polled for depth.
    pub(crate) depth_queues: Vec<(String, &'static str)>,
}

/// Why a consumer is not ready, or `None` when it is: `/readyz` and the
/// gauge `backstop_consumer_ready` both read this, so they cannot disagree.
fn unready(queue: &str, report: &backstop::consumer::ConsumerReport) -> Option<String> {
    if !report.broker_counted {
        Some(format!("the broker does not count our consumer on {queue}"))
    } else if !report.subscribed {
        Some(format!("not subscribed to {queue}"))
    } else if let Some(down) = &report.dedup_store_down {
        Some(format!("{queue}: {down}"))
    } else {
        report
            .store_down
            .as_ref()
            .map(|down| format!("{queue}: {down}"))
    }
}

/// What the publish endpoint shows: its publisher's counters and spool,
/// and its answers by status code.
#[derive(Debug, Clone)]
pub(crate) struct PublishView {
    pub(crate) publisher: backstop::publish::Publisher,
    /// Answers by status code.
    pub(crate) answers: Family<Labels, Counter>,
    /// Requests being handled now.
    pub(crate) in_flight: Gauge,
}

impl PublishView {
    /// The view of `publisher`, with fresh request metrics.
    pub(crate) fn new(publisher: backstop::publish::Publisher) -> Self {
        PublishView {
            publisher,
            answers: Family::default(),
            in_flight: Gauge::default(),
        }
    }
}

/// Time spent blocked by the broker, measured from the supervisor's state.
#[derive(Debug, Default)]
struct BlockedClock {
    total: Duration,
    since: Option<Instant>,
}

/// Everything the collector reads at a scrape.
#[derive(Debug)]
pub(crate) struct Live {
    supervisor: ConnectionSupervisor,
    /// The connection copies are published on (a second connection).
    publishing: ConnectionSupervisor,
    consumers: Vec<ConsumerView>,
    blocked: Arc<Mutex<BlockedClock>>,
    /// (consumer queue, kind, queue name) -> depth.
    depths: Depths,
    store_rows: Arc<Mutex<Vec<(String, i64)>>>,
    publish: Option<PublishView>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn state_name(state: &ConnectionState) -> &'static str {
    match state {
        ConnectionState::Connecting { .. } => "connecting",
        ConnectionState::Connected { .. } => "connected",
        ConnectionState::Blocked { .. } => "blocked",
        ConnectionState::Reconnecting { .. } => "reconnecting",
        ConnectionState::Closed { .. } => "closed",
    }
}

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in &values {
        value.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = self.supervisor.state().borrow().clone();
        let current = state_name(&state);
        family(
            &mut encoder,
            "backstop_connection_up",
            "1 while a broker connection is open",
            MetricType::Gauge,
            vec![(vec![], ConstGauge::new(i64::from(state.is_up())))],
        )?;
        let publishing_up = self.publishing.state().borrow().is_up();
        family(
            &mut encoder,
            "backstop_publishing_connection_up",
            "1 while the connection that retry, dead-letter and re-drive copies are published on is open",
            MetricType::Gauge,
            vec![(vec![], ConstGauge::new(i64::from(publishing_up)))],
        )?;
        family(
            &mut encoder,
            "backstop_connection_state",
            "the connection supervisor's state (1 for the current one)",
            MetricType::Gauge,
            [
                "connecting",
                "connected",
                "blocked",
                "reconnecting",
                "closed",
            ]
            .iter()
            .map(|s| {
                (
                    labels(&[("state", s)]),
                    ConstGauge::new(i64::from(*s == current)),
                )
            })
            .collect(),
        )?;
        let uptime = self.supervisor.uptime().unwrap_or_default().as_secs_f64();
        family(
            &mut encoder,
            "backstop_connection_uptime_seconds",
            "how long the current connection has been open",
            MetricType::Gauge,
            vec![(vec![], ConstGauge::new(uptime))],
        )?;
        family(
            &mut encoder,
            "backstop_connection_reconnects",
            "connections made after a loss",
            MetricType::Counter,
            vec![(vec![], ConstCounter::new(self.supervisor.reconnects()))],
        )?;
        let blocked = {
            let clock = lock(&self.blocked);
            clock.total + clock.since.map(|t| t.elapsed()).unwrap_or_default()
        };
        family(
            &mut encoder,
            "backstop_connection_blocked_seconds",
            "time the broker kept the publishing connection blocked",
            MetricType::Counter,
            vec![(vec![], ConstCounter::new(blocked.as_secs_f64()))],
        )?;
        let reports: Vec<_> = self
            .consumers
            .iter()
            .map(|c| (c, c.stats.snapshot()))
            .collect();
        let mut deliveries = Vec::new();
        for (c, r) in &reports {
            // Each outcome is a counter of its own: a value derived by
            // subtraction could step back for a moment (a copy confirmed
            // before its original's ack is written), which Prometheus
            // reads as a counter reset.
            for (outcome, n) in [
                ("acked", r.succeeded),
                ("retried", r.retried),
                ("dead_lettered", r.dead_lettered),
                ("stored", r.stored),
                ("duplicate", r.duplicates),
                ("rejected", r.rejected),
                ("requeued", r.requeued),
            ] {
                deliveries.push((
                    labels(&[("queue", &c.queue), ("outcome", outcome)]),
                    ConstCounter::new(n),
                ));
            }
        }
        family(
            &mut encoder,
            "backstop_deliveries",
            "deliveries settled, by outcome",
            MetricType::Counter,
            deliveries,
        )?;
        let per_queue = |f: &dyn Fn(&backstop::consumer::ConsumerReport) -> u64| {
            reports
                .iter()
                .map(|(c, r)| (labels(&[("queue", &c.queue)]), f(r)))
                .collect::<Vec<_>>()
        };
        let per_queue_gauge = |f: &dyn Fn(&backstop::consumer::ConsumerReport) -> u64| {
            per_queue(f)
                .into_iter()
                .map(|(l, n)| (l, ConstGauge::new(n as i64)))
                .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "backstop_unacked",
            "deliveries held on the consumer's channel, not yet acked, rejected or nacked (the unacked backlog)",
            MetricType::Gauge,
            per_queue_gauge(&|r| r.unacked),
        )?;
        family(
            &mut encoder,
            "backstop_oldest_unacked_seconds",
            "how long the oldest delivery held has waited for its outcome (0 when none is held)",
            MetricType::Gauge,
            reports
                .iter()
                .map(|(c, r)| {
                    let age = r.oldest_unacked.unwrap_or_default().as_secs_f64();
                    (labels(&[("queue", &c.queue)]), ConstGauge::new(age))
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "backstop_handlers_running",
            "deliveries in process (handler, retry copy, store write), this session's or an older one's",
            MetricType::Gauge,
            per_queue_gauge(&|r| r.in_flight),
        )?;
        family(
            &mut encoder,
            "backstop_stale_acks_dropped",
            "completions from an older channel, dropped unacked",
            MetricType::Counter,
            per_queue(&|r| r.stale_tags_dropped)
                .into_iter()
                .map(|(l, n)| (l, ConstCounter::new(n)))
                .collect(),
        )?;
        family(
            &mut encoder,
            "backstop_consumer_ready",
            "1 while the consumer is subscribed, the broker counts it on its queue and its dedup and compensation stores answer (what /readyz asks of each consumer)",
            MetricType::Gauge,
            reports
                .iter()
                .map(|(c, r)| {
                    let ready = unready(&c.queue, r).is_none();
                    (
                        labels(&[("queue", &c.queue)]),
                        ConstGauge::new(i64::from(ready)),
                    )
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "backstop_dedup_pending",
            "dedup releases (op=release) and done-marks (op=done) the store did not take yet, kept and tried again",
            MetricType::Gauge,
            reports
                .iter()
                .flat_map(|(c, r)| {
                    [
                        ("release", r.dedup_pending_release),
                        ("done", r.dedup_pending_done),
                    ]
                    .map(|(op, n)| {
                        (
                            labels(&[("queue", &c.queue), ("op", op)]),
                            ConstGauge::new(n as i64),
                        )
                    })
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "backstop_breaker_state",
            "circuit breaker: 0 closed, 1 half-open, 2 open",
            MetricType::Gauge,
            self.consumers
                .iter()
                .map(|c| {
                    let value = match *c.breaker.borrow() {
                        BreakerState::Closed => 0,
                        BreakerState::HalfOpen => 1,
                        BreakerState::Open => 2,
                    };
                    (labels(&[("queue", &c.queue)]), ConstGauge::new(value))
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "backstop_queue_depth",
            "messages ready in the retry queues and the dead-letter queue",
            MetricType::Gauge,
            lock(&self.depths)
                .iter()
                .map(|(queue, kind, name, n)| {
                    (
                        labels(&[("queue", queue), ("kind", kind), ("name", name)]),
                        ConstGauge::new(*n as i64),
                    )
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "backstop_store_rows",
            "compensation store rows by status",
            MetricType::Gauge,
            lock(&self.store_rows)
                .iter()
                .map(|(status, n)| (labels(&[("status", status)]), ConstGauge::new(*n)))
                .collect(),
        )?;
        if let Some(publish) = &self.publish {
            encode_publisher(&mut encoder, publish)?;
        }
        Ok(())
    }
}

/// The publisher of the publish endpoint: its outcomes, its spool and its
/// connection, from [`stats`](backstop::publish::Publisher::stats) at
/// each scrape.
fn encode_publisher(
    encoder: &mut DescriptorEncoder,
    publish: &PublishView,
) -> Result<(), std::fmt::Error> {
    let stats = publish.publisher.stats();
    let counter = |n: u64| vec![(vec![], ConstCounter::new(n))];
    let gauge = |n: u64| vec![(vec![], ConstGauge::new(n as i64))];
    family(
        encoder,
        "backstop_published",
        "messages the publish endpoint's publisher settled, by outcome: confirmed by the broker, \
         spooled, or refused (unroutable, nacked, refused, spool_full)",
        MetricType::Counter,
        [
            ("confirmed", stats.confirmed),
            ("spooled", stats.spooled),
            ("unroutable", stats.unroutable),
            ("nacked", stats.nacked),
            ("refused", stats.refused),
            ("spool_full", stats.spool_full),
        ]
        .into_iter()
        .map(|(outcome, n)| (labels(&[("outcome", outcome)]), ConstCounter::new(n)))
        .collect(),
    )?;
    family(
        encoder,
        "backstop_publish_uncertain",
        "messages spooled or failed after they may have reached the broker: possible duplicates",
        MetricType::Counter,
        counter(stats.uncertain),
    )?;
    family(
        encoder,
        "backstop_spool_drained",
        "spooled messages the broker has since confirmed",
        MetricType::Counter,
        counter(stats.drained),
    )?;
    family(
        encoder,
        "backstop_spool_messages",
        "messages in the spool, waiting for the broker",
        MetricType::Gauge,
        gauge(stats.spool_messages),
    )?;
    family(
        encoder,
        "backstop_spool_bytes",
        "payload bytes in the spool",
        MetricType::Gauge,
        gauge(stats.spool_bytes),
    )?;
    let oldest = stats.spool_oldest.unwrap_or_default().as_secs_f64();
    family(
        encoder,
        "backstop_spool_oldest_seconds",
        "how long the oldest spooled message has waited (0 when the spool is empty)",
        MetricType::Gauge,
        vec![(vec![], ConstGauge::new(oldest))],
    )?;
    family(
        encoder,
        "backstop_spool_parked",
        "spooled messages the drain set aside (the broker refused them): see the logs",
        MetricType::Gauge,
        gauge(stats.spool_parked),
    )?;
    let up = publish.publisher.supervisor().state().borrow().is_up();
    family(
        encoder,
        "backstop_publisher_connection_up",
        "1 while the publish endpoint's publisher has its broker connection open",
        MetricType::Gauge,
        vec![(vec![], ConstGauge::new(i64::from(up)))],
    )
}

/// The served state.
#[derive(Clone)]
struct Served {
    registry: Arc<Registry>,
    supervisor: ConnectionSupervisor,
    publishing: ConnectionSupervisor,
    consumers: Vec<ConsumerView>,
}

async fn metrics(State(served): State<Served>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &served.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding the metrics failed\n".to_owned(),
        ),
    }
}

async fn ready(State(served): State<Served>) -> impl IntoResponse {
    let up = served.supervisor.state().borrow().is_up();
    // Closed: it gave up (or was refused) and is not started again yet, so
    // every copy fails. Connecting or reconnecting is only a moment.
    let publishing = served.publishing.state().borrow().clone();
    let waiting: Vec<String> = served
        .consumers
        .iter()
        .filter_map(|c| unready(&c.queue, &c.stats.snapshot()))
        .collect();
    if !up {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no broker connection\n".to_owned(),
        )
    } else if let ConnectionState::Closed { reason } = publishing {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the publishing connection is closed ({reason})\n"),
        )
    } else if waiting.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", waiting.join("; ")),
        )
    }
}

/// Starts the pollers and the HTTP server on `listen`; returns the bound
/// address.
pub(crate) async fn serve(
    listen: std::net::SocketAddr,
    supervisor: ConnectionSupervisor,
    consumers: Vec<ConsumerView>,
    store: Option<Arc<dyn CompensationStore>>,
    durations: Family<Labels, Histogram>,
    publish: Option<PublishView>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<std::net::SocketAddr> {
    let blocked = Arc::new(Mutex::new(BlockedClock::default()));
    let depths = Arc::new(Mutex::new(Vec::new()));
    let store_rows = Arc::new(Mutex::new(Vec::new()));
    let publishing = supervisor.publishing();
    // Copies are published on the publishing connection; only it can be
    // blocked (the broker blocks a connection when it publishes).
    tokio::spawn(watch_blocked(publishing.state(), blocked.clone()));
    tokio::spawn(poll_depths(
        supervisor.clone(),
        consumers.clone(),
        depths.clone(),
        stop.clone(),
    ));
    if let Some(store) = store {
        tokio::spawn(poll_store(store, store_rows.clone(), stop.clone()));
    }
    let mut registry = Registry::default();
    registry.register(
        "backstop_handler_duration_seconds",
        "handler call duration",
        durations,
    );
    if let Some(publish) = &publish {
        registry.register(
            "backstop_publish_requests",
            "requests to the publish endpoint, by the status code answered",
            publish.answers.clone(),
        );
        registry.register(
            "backstop_publish_requests_in_flight",
            "requests to the publish endpoint being handled now",
            publish.in_flight.clone(),
        );
    }
    registry.register_collector(Box::new(Live {
        supervisor: supervisor.clone(),
        publishing: publishing.clone(),
        consumers: consumers.clone(),
        blocked,
        depths,
        store_rows,
        publish,
    }));
    let served = Served {
        registry: Arc::new(registry),
        supervisor,
        publishing,
        consumers,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(served);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| crate::UsageError(format!("metrics.listen {listen}: {e}")))?;
    let bound = listener.local_addr()?;
    info!(%bound, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            warn!(error = %e, "the metrics server stopped");
        }
    });
    Ok(bound)
}

async fn watch_blocked(
    mut state: watch::Receiver<ConnectionState>,
    clock: Arc<Mutex<BlockedClock>>,
) {
    loop {
        {
            let blocked = matches!(*state.borrow_and_update(), ConnectionState::Blocked { .. });
            let mut clock = lock(&clock);
            match (blocked, clock.since) {
                (true, None) => clock.since = Some(Instant::now()),
                (false, Some(since)) => {
                    clock.total += since.elapsed();
                    clock.since = None;
                }
                _ => {}
            }
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

const POLL_EVERY: Duration = Duration::from_secs(5);

/// Reads the depth of every retry tier and DLQ with a passive declare.
async fn poll_depths(
    supervisor: ConnectionSupervisor,
    consumers: Vec<ConsumerView>,
    depths: Depths,
    mut stop: watch::Receiver<bool>,
) {
    let names: Vec<(String, &'static str, String)> = consumers
        .iter()
        .flat_map(|c| {
            c.depth_queues
                .iter()
                .map(|(name, kind)| (c.queue.clone(), *kind, name.clone()))
        })
        .collect();
    if names.is_empty() {
        return;
    }
    loop {
        if let Ok(live) = supervisor.connection().await
            && let Ok(channel) = live.create_channel().await
        {
            let mut found = Vec::new();
            for (queue, kind, name) in &names {
                let declared = channel
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                match declared {
                    Ok(q) => found.push((
                        queue.clone(),
                        *kind,
                        name.clone(),
                        u64::from(q.message_count()),
                    )),
                    // A queue not declared yet closes the channel; read the rest next time.
                    Err(_) => break,
                }
            }
            let _ = channel.close(200, "depths read".into()).await;
            *lock(&depths) = found;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn poll_store(
    store: Arc<dyn CompensationStore>,
    rows: Arc<Mutex<Vec<(String, i64)>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match store.count_by_status().await {
            Ok(counts) => {
                *lock(&rows) = counts
                    .into_iter()
                    .map(|(status, n)| (status.as_str().to_owned(), n))
                    .collect();
            }
            Err(e) => warn!(error = %e, "counting the store's rows failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
