//! `backstop demo`: publish N messages, consume them through the supervised
//! runtime over the test kit's fault proxy while it cuts the connection every
//! second and blackholes it once, then print the ledger.

use crate::ui;
use anyhow::Context;
use backstop::connection::{Backoff, ConnectionConfig, ConnectionSupervisor};
use backstop::consumer::{Consumer, ConsumerConfig};
use backstop::handler::{Delivery, handler_fn};
use backstop::topology::{Queue, Topology};
use backstop_testkit::{FaultProxy, try_publish, url_via};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::collections::HashMap;
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
    /// Simulated work per message, in milliseconds.
    #[arg(long, default_value_t = 4)]
    work_ms: u64,
    /// Give up (and report what is missing as lost) after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let uri = args.broker.resolve()?;
    let broker = ui::loopback_addr(&uri)?;

    // Direct connection for arranging the queue and publishing.
    let direct = ui::direct_supervisor(&uri, "backstop-demo-publisher")?;
    let live = direct.connection().await?;
    let channel = live.create_channel().await?;
    channel
        .queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting the old demo queue")?;
    let topology = Topology::new().queue(Queue::classic(&args.queue));
    topology.apply(&channel).await?;
    let bar = ui::progress(args.messages, "published");
    try_publish(
        &channel,
        &args.queue,
        args.messages,
        "demo",
        |i| format!("{{\"order\":{i}}}").into_bytes(),
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
    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(url_via(&uri, proxy.addr()))
            .connection_name("backstop-demo-consumer")
            .heartbeat(heartbeat)
            .connect_timeout(Duration::from_secs(2))
            .backoff(Backoff {
                max: Duration::from_secs(1),
                ..Backoff::default()
            }),
    )?;
    let ledger: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let work = Duration::from_millis(args.work_ms);
    let handler = {
        let ledger = ledger.clone();
        handler_fn(move |delivery: Delivery| {
            let ledger = ledger.clone();
            async move {
                tokio::time::sleep(work).await;
                let id = delivery.message_id().unwrap_or("<no id>").to_owned();
                if let Ok(mut ledger) = ledger.lock() {
                    *ledger.entry(id).or_insert(0) += 1;
                }
            }
        })
    };
    let consumer = Consumer::new(
        supervisor.clone(),
        ConsumerConfig::new(&args.queue)
            .topology(topology)
            .prefetch(200)
            .concurrency(16),
        handler,
    )
    .spawn()?;

    let distinct = || ledger.lock().map(|l| l.len() as u64).unwrap_or(0);
    let bar = ui::progress(args.messages, "handled");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut next_fault = started + Duration::from_secs(1);
    let mut faults = 0u32;
    let mut blackholed_until: Option<Instant> = None;
    while distinct() < args.messages && Instant::now() < deadline {
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
        let idle = consumer.stats().in_flight == 0
            && ready(channel.clone(), args.queue.clone())
                .await
                .context("reading the demo queue's depth")?
                == 0;
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
    direct.close().await;

    let (handled, calls) = ledger
        .lock()
        .map(|l| {
            (
                l.len() as u64,
                l.values().map(|n| u64::from(*n)).sum::<u64>(),
            )
        })
        .unwrap_or((0, 0));
    let duplicates = calls - handled;
    let lost = args.messages.saturating_sub(handled);
    eprintln!(
        "faults injected={faults} stale_tags_dropped={} sessions={} left_in_queue={left} elapsed={:.1}s",
        report.stale_tags_dropped,
        report.sessions,
        started.elapsed().as_secs_f64()
    );
    println!(
        "ledger: published={} handled={handled} duplicates={duplicates} lost={lost} reconnects={reconnects}",
        args.messages
    );
    Ok(if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
