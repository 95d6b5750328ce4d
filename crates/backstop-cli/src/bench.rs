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
    /// Alternating rounds of (a) and (b); the medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    #[command(flatten)]
    broker: ui::BrokerArgs,
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
    if args.messages == 0 || args.prefetch == 0 || args.concurrency == 0 || args.rounds == 0 {
        return Err(UsageError(
            "--messages, --prefetch, --concurrency and --rounds must be at least 1".into(),
        )
        .into());
    }
    let uri = args.broker.resolve()?;
    let supervisor = ui::direct_supervisor(&uri, "backstop-bench")?;
    let live = supervisor.connection().await?;
    let queue = format!("backstop.bench.{}", std::process::id());
    let topology = Topology::new().queue(Queue::classic(&queue));
    let channel = live.create_channel().await?;
    topology.apply(&channel).await?;
    let body = vec![b'x'; 256];
    let run = Run {
        supervisor: &supervisor,
        live: &live,
        channel: &channel,
        queue: &queue,
        topology: &topology,
        body: &body,
        args: &args,
    };

    // The broker's throughput drifts by tens of percent from one second to
    // the next on a small machine, so (a) and (b) alternate for several
    // rounds and the medians are compared.
    let mut ceilings = Vec::new();
    let mut backstops = Vec::new();
    for round in 1..=args.rounds {
        let ceiling = run.ceiling().await?;
        let backstop = run.backstop().await?;
        println!(
            "round {round}: ceiling (auto-ack) {:.0} msg/s, {:.1} us cpu/msg; \
             backstop (prefetch {}, concurrency {}) {:.0} msg/s, {:.1} us cpu/msg, {} ack frames",
            ceiling.rate,
            ceiling.cpu_us,
            args.prefetch,
            args.concurrency,
            backstop.rate,
            backstop.cpu_us,
            backstop.ack_frames
        );
        ceilings.push(ceiling);
        backstops.push(backstop);
    }
    if let Some(kib) = peak_rss_kib() {
        println!("peak RSS: {:.1} MiB", kib as f64 / 1024.0);
    }
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting the bench queue")?;
    let _ = channel.close(200, "bench done".into()).await;
    supervisor.close().await;
    let ceiling = median(ceilings.iter().map(|m| m.rate));
    let backstop = median(backstops.iter().map(|m| m.rate));
    let cpu_us = median(backstops.iter().map(|m| m.cpu_us));
    println!(
        "bench: ceiling={ceiling:.0} msg/s backstop={backstop:.0} msg/s ratio={:.2} cpu_us_per_msg={cpu_us:.1}",
        backstop / ceiling
    );
    Ok(ExitCode::SUCCESS)
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One measurement.
struct Measured {
    rate: f64,
    cpu_us: f64,
    ack_frames: u64,
}

/// What every measurement shares.
struct Run<'a> {
    supervisor: &'a backstop::connection::ConnectionSupervisor,
    live: &'a backstop::connection::LiveConnection,
    channel: &'a lapin::Channel,
    queue: &'a str,
    topology: &'a Topology,
    body: &'a [u8],
    args: &'a ConsumeArgs,
}

impl Run<'_> {
    fn measured(
        &self,
        started: Instant,
        cpu_before: Option<Duration>,
        ack_frames: u64,
    ) -> Measured {
        let elapsed = started.elapsed();
        let messages = self.args.messages as f64;
        let cpu_us = match (cpu_before, cpu_time()) {
            (Some(a), Some(b)) => (b.saturating_sub(a)).as_secs_f64() * 1e6 / messages,
            _ => f64::NAN,
        };
        Measured {
            rate: messages / elapsed.as_secs_f64(),
            cpu_us,
            ack_frames,
        }
    }

    /// (a) The ceiling: the broker pushing as fast as it can with auto-ack.
    async fn ceiling(&self) -> anyhow::Result<Measured> {
        fill(self.channel, self.queue, self.args.messages, self.body).await?;
        let channel = self.live.create_channel().await?;
        let mut stream = channel
            .basic_consume(
                self.queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("subscribing with auto-ack")?;
        let bar = ui::progress(self.args.messages, "ceiling");
        let cpu_before = cpu_time();
        let started = Instant::now();
        let mut received = 0u64;
        while received < self.args.messages {
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
        let measured = self.measured(started, cpu_before, 0);
        bar.finish_and_clear();
        let _ = channel.close(200, "ceiling measured".into()).await;
        Ok(measured)
    }

    /// (b) Backstop: manual, coalesced acks after a no-op handler.
    async fn backstop(&self) -> anyhow::Result<Measured> {
        fill(self.channel, self.queue, self.args.messages, self.body).await?;
        let handler = handler_fn(|_: Delivery| async {});
        let bar = ui::progress(self.args.messages, "backstop");
        let cpu_before = cpu_time();
        let started = Instant::now();
        let consumer = Consumer::new(
            self.supervisor.clone(),
            ConsumerConfig::new(self.queue)
                .topology(self.topology.clone())
                .prefetch(self.args.prefetch)
                .concurrency(self.args.concurrency),
            handler,
        )
        .spawn()?;
        // Done when the last ack is sent, not merely when the handler ran.
        loop {
            let stats = consumer.stats();
            if stats.handled >= self.args.messages {
                break;
            }
            if consumer.is_finished() {
                anyhow::bail!("the consumer stopped early: {stats:?}");
            }
            bar.set_position(stats.handled);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ack_frames = consumer.stats().ack_frames;
        let measured = self.measured(started, cpu_before, ack_frames);
        bar.finish_and_clear();
        consumer.shutdown().await?;
        Ok(measured)
    }
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
