//! `backstop bench reconnect`: how fast consuming resumes after the
//! connection is lost. A consumer reads a queue through the fault proxy
//! (the tests' management-free way to close a connection: the socket ends,
//! as it does when the broker force-closes it or a link resets) while a
//! publisher on a direct connection keeps a trickle of messages coming.
//! Each forced close is timed from the cut to the first delivery handled by
//! the consumer's next session (a new channel on a new connection). Then a
//! blackhole (nothing forwarded, nothing closed) is timed from its start
//! to the moment the supervisor declares the connection lost, against the
//! heartbeat.

use super::quantile;
use crate::{UsageError, ui};
use anyhow::Context;
use backstop::connection::{ConnectionState, ConnectionSupervisor};
use backstop::consumer::{Consumer, ConsumerConfig, ConsumerStats};
use backstop::handler::{Delivery, handler_fn};
use backstop::topology::{Queue, Topology};
use backstop_testkit::{FaultProxy, url_via};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Options of `backstop bench reconnect`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReconnectArgs {
    /// Forced closes.
    #[arg(long, default_value_t = 50)]
    closes: u32,
    /// Time between forced closes. Under 5 s the connection counts as
    /// flapping and the supervisor's backoff grows on purpose, so the
    /// default leaves each connection up a little longer than that.
    #[arg(long, default_value = "5500ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Blackholes.
    #[arg(long, default_value_t = 3)]
    blackholes: u32,
    /// The consumer connection's heartbeat.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Messages per second the publisher keeps coming.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    #[command(flatten)]
    broker: ui::BrokerArgs,
}

/// What the handler shares with the bench: the session of the latest
/// delivery handled, and when the first delivery of each new session was.
#[derive(Default)]
struct Seen {
    stats: OnceLock<Arc<ConsumerStats>>,
    session: AtomicU64,
    first_of_session: Mutex<Option<(u64, Instant)>>,
    changed: tokio::sync::Notify,
}

/// `backstop bench reconnect`.
pub(crate) async fn reconnect(args: ReconnectArgs) -> anyhow::Result<ExitCode> {
    if args.closes == 0 || args.rate == 0 || args.heartbeat < Duration::from_secs(1) {
        return Err(UsageError(
            "--closes and --rate must be at least 1, --heartbeat at least 1s".into(),
        )
        .into());
    }
    let config = args.broker.config()?;
    let uri = config.broker.uri.clone().unwrap_or_default();
    let broker = ui::loopback_addr(&uri)?;
    let direct = ui::direct_supervisor(&config, "backstop-bench")?;
    let live = direct.connection().await?;
    let queue = format!("backstop.bench.reconnect.{}", std::process::id());
    let topology = Topology::new().queue(Queue::classic(&queue));
    let channel = live.create_channel().await?;
    topology.apply(&channel).await?;

    let proxy = FaultProxy::start(broker)
        .await
        .context("starting the fault proxy")?;
    let mut proxied = config.clone();
    proxied.broker.uri = Some(url_via(&uri, proxy.addr()));
    proxied.broker.addresses.clear();
    // The [reconnect] settings as configured (default: 100 ms to 30 s):
    // what is measured is the library's own recovery.
    let supervisor = ConnectionSupervisor::start(
        proxied
            .connection_config("backstop-bench-reconnect")?
            .heartbeat(args.heartbeat),
    )?;

    let seen = Arc::new(Seen::default());
    let handler = {
        let seen = seen.clone();
        handler_fn(move |_: Delivery| {
            if let Some(stats) = seen.stats.get() {
                let session = stats.snapshot().sessions;
                if seen.session.swap(session, Ordering::Relaxed) != session {
                    *seen
                        .first_of_session
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some((session, Instant::now()));
                    seen.changed.notify_waiters();
                }
            }
            async {}
        })
    };
    let consumer = Consumer::new(
        supervisor.clone(),
        ConsumerConfig::new(&queue)
            .topology(topology.clone())
            .prefetch(100),
        handler,
    )
    .spawn()?;
    let _ = seen.stats.set(consumer.stats_ref());

    // The trickle, on the direct connection (never cut).
    let publishing = live.create_channel().await?;
    let trickle = {
        let queue = queue.clone();
        let period = Duration::from_secs(1) / args.rate;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let published = publishing
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"tick",
                        BasicProperties::default(),
                    )
                    .await;
                if published.is_err() {
                    return;
                }
            }
        })
    };

    let outcome = measure(&args, &proxy, &supervisor, &consumer, &seen).await;
    trickle.abort();
    let _ = tokio::time::timeout(Duration::from_secs(30), consumer.shutdown()).await;
    supervisor.close().await;
    drop(proxy);
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel.close(200, "bench done".into()).await;
    direct.close().await;
    let line = outcome?;
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// Waits until the handler has seen a session after `session`; returns when
/// its first delivery was handled.
async fn first_after(seen: &Seen, session: u64, within: Duration) -> anyhow::Result<Instant> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let changed = seen.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some((s, at)) = *seen
            .first_of_session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            && s > session
        {
            return Ok(at);
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            anyhow::bail!("no delivery was handled on a new session within {within:?}");
        }
    }
}

async fn measure(
    args: &ReconnectArgs,
    proxy: &FaultProxy,
    supervisor: &ConnectionSupervisor,
    consumer: &backstop::consumer::ConsumerHandle,
    seen: &Seen,
) -> anyhow::Result<String> {
    // The first session, consuming.
    first_after(seen, 0, Duration::from_secs(30)).await?;
    let bar = ui::progress(u64::from(args.closes), "forced closes");
    let mut closes = Vec::new();
    for n in 1..=args.closes {
        tokio::time::sleep(args.interval).await;
        let session = consumer.stats().sessions;
        let cut = Instant::now();
        proxy.cut();
        let resumed = first_after(seen, session, Duration::from_secs(60))
            .await
            .with_context(|| format!("after forced close {n}"))?;
        closes.push(resumed.saturating_duration_since(cut).as_secs_f64() * 1e3);
        bar.set_position(u64::from(n));
    }
    bar.finish_and_clear();
    let p50 = quantile(&closes, 0.5);
    let p99 = quantile(&closes, 0.99);
    let max = quantile(&closes, 1.0);
    println!(
        "forced close -> first delivery handled on the new channel, {} closes: \
         p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
        closes.len()
    );

    let mut detections = Vec::new();
    for n in 1..=args.blackholes {
        tokio::time::sleep(args.interval).await;
        let session = consumer.stats().sessions;
        let mut state = supervisor.state();
        let started = Instant::now();
        proxy.blackhole();
        // Only a bool is kept: holding the watch guard would block the
        // supervisor's next state change, and with it the reconnection.
        let lost = tokio::time::timeout(
            args.heartbeat * 10,
            state.wait_for(|s| !matches!(s, ConnectionState::Connected { .. })),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let detected = started.elapsed();
        // The dead connection's sockets are ended so that its next attempt
        // is a fresh one, then forwarding resumes.
        proxy.cut();
        proxy.restore();
        if !lost {
            anyhow::bail!(
                "blackhole {n}: the loss was not detected within {:?}",
                args.heartbeat * 10
            );
        }
        let resumed = first_after(seen, session, Duration::from_secs(60))
            .await
            .with_context(|| format!("after blackhole {n}"))?;
        println!(
            "blackhole {n}: detected after {:.0} ms (heartbeat {} ms), consuming again {:.0} ms after it",
            detected.as_secs_f64() * 1e3,
            args.heartbeat.as_millis(),
            resumed
                .saturating_duration_since(started + detected)
                .as_secs_f64()
                * 1e3
        );
        detections.push(detected.as_secs_f64() * 1e3);
    }
    let mut line = format!(
        "bench: reconnect closes={} p50_ms={p50:.0} p99_ms={p99:.0} max_ms={max:.0}",
        closes.len()
    );
    if !detections.is_empty() {
        let worst = quantile(&detections, 1.0);
        line.push_str(&format!(
            " heartbeat_ms={} blackhole_detect_max_ms={worst:.0} detect_vs_heartbeat={:.2}",
            args.heartbeat.as_millis(),
            worst / args.heartbeat.as_secs_f64() / 1e3
        ));
    }
    Ok(line)
}
