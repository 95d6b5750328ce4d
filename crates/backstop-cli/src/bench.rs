//! `backstop bench consume`: the broker's auto-ack ceiling and the Backstop
//! runtime (no-op handler, manual coalesced acks), measured in the same run
//! on the same pre-filled durable queue.

use crate::{UsageError, ui};
use anyhow::Context;
use backstop::consumer::{Consumer, ConsumerConfig};
use backstop::handler::{Delivery, handler_fn};
use backstop::topology::{Queue, Topology};
use backstop_testkit::try_publish;
use lapin::options::{BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// Options of `backstop bench consume`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConsumeArgs {
    /// Messages per measurement.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Prefetch of the Backstop consumer.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// Concurrent handlers of the Backstop consumer.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// The broker (default: BACKSTOP_AMQP_URL, then the local broker).
    #[arg(long)]
    uri: Option<String>,
}

/// CPU time of this process (all threads) and its peak resident set, read
/// from /proc so no unsafe FFI is needed.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start at ")".
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // The kernel reports in USER_HZ, 100 on every Linux target Rust supports.
    Some(Duration::from_millis(ticks * 10))
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(crate) async fn consume(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    if args.messages == 0 || args.prefetch == 0 || args.concurrency == 0 {
        return Err(UsageError(
            "--messages, --prefetch and --concurrency must be at least 1".into(),
        )
        .into());
    }
    let uri = ui::broker_uri(args.uri)?;
    let supervisor = ui::direct_supervisor(&uri, "backstop-bench")?;
    let live = supervisor.connection().await?;
    let queue = format!("backstop.bench.{}", std::process::id());
    let topology = Topology::new().queue(Queue::classic(&queue));
    let channel = live.create_channel().await?;
    topology.apply(&channel).await?;
    let body = vec![b'x'; 256];

    // (a) The ceiling: the broker pushing as fast as it can with auto-ack.
    fill(&channel, &queue, args.messages, &body).await?;
    let ceiling_channel = live.create_channel().await?;
    let mut stream = ceiling_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("subscribing with auto-ack")?;
    let bar = ui::progress(args.messages, "ceiling");
    let started = Instant::now();
    let mut received = 0u64;
    while received < args.messages {
        match stream.next().await {
            Some(Ok(_)) => {
                received += 1;
                if received.is_multiple_of(1000) {
                    bar.set_position(received);
                }
            }
            Some(Err(e)) => return Err(e).context("auto-ack consume"),
            None => anyhow::bail!("the auto-ack consumer was cancelled"),
        }
    }
    let ceiling_time = started.elapsed();
    bar.finish_and_clear();
    let _ = ceiling_channel.close(200, "ceiling measured".into()).await;
    let ceiling = args.messages as f64 / ceiling_time.as_secs_f64();
    println!(
        "ceiling (auto-ack): {} messages in {:.2}s = {ceiling:.0} msg/s",
        args.messages,
        ceiling_time.as_secs_f64()
    );

    // (b) Backstop: manual acks after a no-op handler.
    fill(&channel, &queue, args.messages, &body).await?;
    let seen = Arc::new(AtomicU64::new(0));
    let handler = {
        let seen = seen.clone();
        handler_fn(move |_: Delivery| {
            seen.fetch_add(1, Ordering::Relaxed);
            async {}
        })
    };
    let bar = ui::progress(args.messages, "backstop");
    let cpu_before = cpu_time();
    let started = Instant::now();
    let consumer = Consumer::new(
        supervisor.clone(),
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(args.prefetch)
            .concurrency(args.concurrency),
        handler,
    )
    .spawn()?;
    // Done when the last ack is sent, not merely when the handler ran.
    loop {
        let stats = consumer.stats();
        if stats.handled >= args.messages {
            break;
        }
        if consumer.is_finished() {
            anyhow::bail!("the consumer stopped early: {stats:?}");
        }
        bar.set_position(stats.handled);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let backstop_time = started.elapsed();
    let cpu_after = cpu_time();
    bar.finish_and_clear();
    let report = consumer.shutdown().await?;
    let backstop = args.messages as f64 / backstop_time.as_secs_f64();
    println!(
        "backstop (prefetch {}, concurrency {}): {} messages in {:.2}s = {backstop:.0} msg/s, {} ack frames",
        args.prefetch,
        args.concurrency,
        args.messages,
        backstop_time.as_secs_f64(),
        report.ack_frames
    );
    let cpu_us = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e6 / args.messages as f64,
        _ => f64::NAN,
    };
    if let Some(kib) = peak_rss_kib() {
        println!("peak RSS: {:.1} MiB", kib as f64 / 1024.0);
    }

    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting the bench queue")?;
    let _ = channel.close(200, "bench done".into()).await;
    supervisor.close().await;
    println!(
        "bench: ceiling={ceiling:.0} msg/s backstop={backstop:.0} msg/s ratio={:.2} cpu_us_per_msg={cpu_us:.1}",
        backstop / ceiling
    );
    Ok(ExitCode::SUCCESS)
}

async fn fill(
    channel: &lapin::Channel,
    queue: &str,
    messages: u64,
    body: &[u8],
) -> anyhow::Result<()> {
    let bar = ui::progress(messages, "filling");
    try_publish(
        channel,
        queue,
        messages,
        "bench",
        |_| body.to_vec(),
        |n| bar.set_position(n),
    )
    .await
    .context("pre-filling the bench queue")?;
    bar.finish_and_clear();
    Ok(())
}
