//! `backstop run -c backstop.toml`: the sidecar. Consumes every
//! `[[consumer]]` queue through one supervised connection, delivers each
//! message to its HTTP endpoint, and serves metrics and health. SIGTERM or
//! Ctrl-C drains: subscriptions are cancelled, in-flight requests finish
//! within the shutdown timeout, acks are flushed. Every wait of the shutdown
//! is bounded, so an outage cannot hold the process: what overruns its bound
//! is abandoned with a log line naming it, and the exit code is then 1.
//!
//! With a `[publish]` section it also serves the publish endpoint
//! ([`publish`]) on a listener of its own, through a publisher with its own
//! connection; SIGTERM stops it accepting, answers the publishes in flight
//! and closes the publisher (its spool stays on disk).
//!
//! `backstop config check -c FILE` validates a file and prints it normalized,
//! with passwords redacted.

pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod publish;

use crate::UsageError;
use anyhow::Context;
use backstop::config::{Config, ConsumerSettings, StoreConfig};
use backstop::connection::ConnectionSupervisor;
use backstop::consumer::{Consumer, ConsumerConfig, ConsumerHandle};
use backstop::retry::{Exhausted, RetryPolicy};
use backstop::store::{CompensationStore, Redrive, Scanner, SqlStore};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Options of `backstop run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The configuration file.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: PathBuf,
}

/// Options of `backstop config check`.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    /// The configuration file.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: PathBuf,
}

/// `backstop config check`.
pub(crate) fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    print!("{}", config.normalized());
    Ok(ExitCode::SUCCESS)
}

/// The consumer of `settings` as far as what it declares goes: its queue,
/// bindings and arguments ([`ConsumerSettings::topology`]) and its retry
/// policy, from which it derives the tiers and `<queue>.dlq` of the same
/// type (quorum tiers dead-letter at least once) and the delivery limit it
/// stays under. `backstop run` adds the rest; `backstop topology apply`
/// declares its [`declared_topology`](ConsumerConfig::declared_topology).
pub(crate) fn declaring(settings: &ConsumerSettings) -> backstop::Result<ConsumerConfig> {
    Ok(ConsumerConfig::new(&settings.queue)
        .topology(settings.topology()?)
        .retry(settings.retry.policy()))
}

/// `backstop run`.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    if config.consumers.is_empty() && config.publish.is_none() && config.console.is_none() {
        return Err(UsageError(format!(
            "{}: no [[consumer]] block, no [publish] and no [console] section: nothing to do",
            args.config.display()
        ))
        .into());
    }
    let supervisor = ConnectionSupervisor::start(config.connection_config("backstop-run")?)?;

    let sql_store = match &config.store.url {
        Some(url) => Some(
            SqlStore::connect(url)
                .await
                .context("opening the compensation store")?,
        ),
        None => None,
    };
    let store: Option<Arc<dyn CompensationStore>> = sql_store
        .clone()
        .map(|s| Arc::new(s) as Arc<dyn CompensationStore>);

    let durations = metrics::durations();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    // The publish endpoint stops after the consumers drained: a handler
    // that publishes through this sidecar keeps it while it finishes.
    let (publish_stop_tx, publish_stop) = tokio::sync::watch::channel(false);
    let mut handles: Vec<(String, ConsumerHandle, Duration)> = Vec::new();
    let mut views = Vec::new();
    for settings in &config.consumers {
        let queue = settings.queue.clone();
        let policy = settings.retry.policy();
        let shutdown_timeout = settings.shutdown_timeout.unwrap_or(Duration::from_secs(30));
        // A topology conflict (an exchange of another type, a queue with
        // other arguments) stops the consumer and this process, with the
        // broker's complaint explained, at start or on any reconnect.
        let mut consumer = declaring(settings)?
            .stop_on_conflict(true)
            .prefetch(settings.prefetch.unwrap_or(100))
            .concurrency(settings.concurrency.unwrap_or(8))
            .shutdown_timeout(shutdown_timeout)
            .max_message_size(
                settings
                    .max_message_size
                    .unwrap_or(backstop::consumer::DEFAULT_MAX_MESSAGE_SIZE),
            );
        if let Some(store) = &store {
            let first_redrive = config
                .store
                .first_redrive
                .unwrap_or(StoreConfig::DEFAULT_FIRST_REDRIVE);
            consumer = consumer.compensation_store(store.clone(), first_redrive);
        }
        if let Some(breaker) = &settings.breaker {
            consumer = consumer.circuit_breaker(breaker.config());
        }
        if let Some(timeout) = settings.consumer_timeout {
            consumer = consumer.consumer_timeout(timeout);
        }
        if let Some(dedup) = &settings.dedup {
            let dedup = dedup
                .build(config.store.url.as_deref())
                .await
                .with_context(|| format!("the dedup store of consumer {queue:?}"))?;
            consumer = consumer.dedup(dedup);
        }
        let handler =
            http::HttpHandler::from_settings(&queue, &settings.handler.http, durations.clone())
                .with_context(|| format!("the endpoint of consumer {queue:?}"))?;
        let handle = Consumer::new(supervisor.clone(), consumer, handler).spawn()?;
        let mut depth_queues: Vec<(String, &'static str)> = policy
            .tier_queues(&queue)
            .into_iter()
            .map(|name| (name, "retry"))
            .collect();
        depth_queues.push((RetryPolicy::dead_letter_queue(&queue), "dlq"));
        views.push(metrics::ConsumerView {
            queue: queue.clone(),
            stats: handle.stats_ref(),
            breaker: handle.breaker(),
            depth_queues,
        });
        info!(%queue, url = %backstop::RedactedUri::new(&settings.handler.http.url), "consumer started");
        handles.push((queue, handle, shutdown_timeout));
    }

    // Stored messages are re-driven by republishing them to their queue:
    // one scanner per queue that stores, re-driving that queue's rows only,
    // so services sharing one PostgreSQL store never re-drive each other's.
    // `[scanner] enabled = false` leaves them off, the rows waiting.
    let scanners: Vec<_> = match &store {
        Some(store) => config
            .consumers
            .iter()
            .filter(|c| c.retry.exhausted == Some(Exhausted::Store))
            .filter_map(|c| config.scanner_config(&c.queue))
            .map(|scanner| {
                info!(queue = ?scanner.queue, interval = ?scanner.interval, batch = scanner.batch,
                    max_attempts = scanner.max_attempts, lease = ?scanner.lease,
                    backoff = ?scanner.backoff, "store scanner started");
                Scanner::new(
                    store.clone(),
                    Redrive::Republish(supervisor.clone()),
                    scanner,
                )
                .spawn()
            })
            .collect(),
        None => Vec::new(),
    };
    if store.is_some() && !config.scanner_enabled() {
        warn!("[scanner] enabled = false: stored rows are not re-driven by this process");
    }

    let publishing = match &config.publish {
        Some(settings) => Some(publish::start(&config, settings, publish_stop).await?),
        None => None,
    };
    let console = match &config.console {
        Some(settings) => {
            let listen = settings
                .listen_addr()
                .map_err(|e| UsageError(format!("console.listen: {e}")))?;
            Some(crate::console::serve(&config, settings, listen, sql_store, stop.clone()).await?)
        }
        None => None,
    };
    let listen = config
        .metrics
        .listen_addr()
        .map_err(|e| UsageError(format!("metrics.listen: {e}")))?;
    let bound = metrics::serve(
        listen,
        supervisor.clone(),
        views,
        store.clone(),
        durations,
        publishing.as_ref().map(|p| p.view.clone()),
        stop.clone(),
    )
    .await?;
    println!(
        "backstop run: consuming {} queue(s); metrics on http://{bound}/metrics",
        handles.len()
    );
    if let Some(publishing) = &publishing {
        println!(
            "backstop run: publishing on http://{}/publish/{{exchange}}/{{routing_key}}",
            publishing.bound
        );
    }

    if let Some((bound, _)) = &console {
        println!("backstop run: review console on http://{bound}/");
    }

    let reason = wait_for_signal_or_failure(&handles).await;
    info!(%reason, "shutting down: draining in-flight messages");
    stop_tx.send_replace(true);
    let scanners_stop = (!scanners.is_empty()).then_some(async move {
        futures_util::future::join_all(scanners.into_iter().map(|s| s.stop())).await;
    });
    let outcome = shut_down(
        handles,
        scanners_stop,
        publishing,
        publish_stop_tx,
        &supervisor,
    )
    .await;
    match outcome {
        Shutdown::Clean => Ok(ExitCode::SUCCESS),
        Shutdown::ConsumerFailed(e) => Err(e.into()),
        Shutdown::Abandoned(what) => {
            eprintln!(
                "backstop run: shutdown abandoned {} after its time bound; \
                 whatever was unacked goes back to its queue",
                what.join(", ")
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// How long the scanner may take to finish its scan once asked to stop.
const SCANNER_STOP_BOUND: Duration = Duration::from_secs(10);
/// How long a consumer's drain may take beyond its `shutdown_timeout`. The
/// drain bounds each of its own steps: `basic.cancel` (10 s, the library's
/// `CHANNEL_TIMEOUT`), the final ack flush (5 s) and the channel close
/// (10 s again), 25 s in all. The margin covers them with room to spare, so
/// a slow broker is not taken for a hung consumer and abandoned mid-drain.
const DRAIN_MARGIN: Duration = Duration::from_secs(30);
/// How long closing the broker connection may take.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// How the shutdown went.
enum Shutdown {
    Clean,
    /// A consumer reported an error (it had stopped by itself).
    ConsumerFailed(backstop::Error),
    /// These parts did not finish within their bound and were left behind.
    Abandoned(Vec<String>),
}

/// Stops everything, each wait bounded: the consumers drain, the scanner
/// stops and the publish endpoint answers its last requests and closes its
/// publisher, all at the same time; then the connection closes. A part that overruns
/// its bound is abandoned with a log line naming it. Nothing is lost by
/// abandoning: an unacked delivery is requeued by the broker when the
/// process's connection goes, and a claimed store row is re-driven once its
/// lease expires.
///
/// A publish in flight is answered within its confirm timeout (plus
/// writing the spool); one that overruns is abandoned and its client sees
/// the connection end, which it retries like any 5xx. Spooled messages stay
/// in the spool file for the next start.
///
/// The publish endpoint stops accepting only once the consumers drained, so
/// a handler that publishes through this sidecar can finish.
///
/// The whole shutdown ends within the longest `shutdown_timeout` plus
/// `DRAIN_MARGIN`, plus the publish endpoint's bound, plus `CLOSE_BOUND`.
async fn shut_down(
    handles: Vec<(String, ConsumerHandle, Duration)>,
    scanner_stop: Option<impl Future<Output = ()>>,
    publishing: Option<publish::Publishing>,
    publish_stop: tokio::sync::watch::Sender<bool>,
    supervisor: &ConnectionSupervisor,
) -> Shutdown {
    let mut failed = None;
    let mut abandoned = Vec::new();
    let scanner = async {
        tokio::time::timeout(SCANNER_STOP_BOUND, scanner_stop?)
            .await
            .err()
            .map(|_| {
                warn!(
                    bound = ?SCANNER_STOP_BOUND,
                    "the store scanner did not stop in time (a scan waits for the broker?): \
                     abandoned; rows it claimed are re-driven once their lease expires"
                );
                "the store scanner".to_owned()
            })
    };
    let consumers = futures_util::future::join_all(handles.into_iter().map(
        |(queue, handle, shutdown_timeout)| async move {
            let bound = shutdown_timeout + DRAIN_MARGIN;
            let result = tokio::time::timeout(bound, handle.shutdown()).await;
            (queue, bound, result)
        },
    ));
    let (scanner_abandoned, results) = tokio::join!(scanner, consumers);
    // Only now: handlers that publish through this sidecar had it while
    // they drained.
    publish_stop.send_replace(true);
    let publish_abandoned = match publishing {
        Some(publishing) => publishing.stop(CLOSE_BOUND).await,
        None => Vec::new(),
    };
    for (queue, bound, result) in results {
        match result {
            Ok(Ok(report)) => println!(
                "consumer {queue}: handled={} duplicates={} retried={} dead_lettered={} stored={} \
                 dedup_pending_release={} dedup_pending_done={}",
                report.handled,
                report.duplicates,
                report.retried,
                report.dead_lettered,
                report.stored,
                report.dedup_pending_release,
                report.dedup_pending_done
            ),
            Ok(Err(e)) => {
                error!(%queue, error = %e, "the consumer failed");
                failed = Some(e);
            }
            Err(_) => {
                warn!(
                    %queue, ?bound,
                    "the consumer did not drain in time: abandoned; its unacked \
                     deliveries go back to the queue when the connection closes"
                );
                abandoned.push(format!("the consumer of {queue}"));
            }
        }
    }
    abandoned.extend(scanner_abandoned);
    abandoned.extend(publish_abandoned);
    if tokio::time::timeout(CLOSE_BOUND, supervisor.close())
        .await
        .is_err()
    {
        warn!(bound = ?CLOSE_BOUND, "the broker connection did not close in time: abandoned");
        abandoned.push("the broker connection".to_owned());
    }
    match (failed, abandoned.is_empty()) {
        (Some(e), _) => Shutdown::ConsumerFailed(e),
        (None, true) => Shutdown::Clean,
        (None, false) => Shutdown::Abandoned(abandoned),
    }
}

/// Waits for SIGTERM, Ctrl-C, or a consumer that stopped by itself (for
/// example, refused credentials).
pub(crate) async fn wait_for_signal_or_failure(
    handles: &[(String, ConsumerHandle, Duration)],
) -> String {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => Some(term),
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process");
            None
        }
    };
    let sigterm = async {
        match &mut term {
            Some(term) => {
                term.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let failure = async {
        loop {
            if let Some((queue, _, _)) = handles.iter().find(|(_, h, _)| h.is_finished()) {
                return format!("the consumer of {queue} stopped");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        () = sigterm => "SIGTERM".to_owned(),
        _ = tokio::signal::ctrl_c() => "Ctrl-C".to_owned(),
        reason = failure => reason,
    }
}
