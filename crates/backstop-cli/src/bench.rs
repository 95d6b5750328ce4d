//! `backstop bench consume`: the broker's auto-ack ceiling and the Backstop
//! runtime (no-op handler, manual coalesced acks), measured in the same run
//! on the same pre-filled durable queue. `backstop bench publish` is in
//! [`publish`].

mod group_retry;
mod publish;

pub(crate) use group_retry::{GroupRetryArgs, group_retry};
pub(crate) use publish::{PublishArgs, publish};

use crate::{UsageError, ui};
use anyhow::Context;
use backstop::consumer::{Consumer, ConsumerConfig};
use backstop::handler::{Delivery, handler_fn};
use backstop::topology::{Queue, Topology};
use backstop_testkit::try_publish;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::process::ExitCode;
use std::sync::Arc;
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
    /// Ack after this many contiguous completions (default: a quarter of the prefetch).
    #[arg(long)]
    ack_batch: Option<usize>,
    /// Rounds of (a) and (b), back to back in alternating order; the ratio
    /// is the median of the rounds' ratios.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Also measure (c): the runtime with deduplication on the message id,
    /// in this store: memory, sqlite (a fresh file), postgres, redis (the
    /// local servers scripts/test starts, or BACKSTOP_POSTGRES_URL /
    /// BACKSTOP_REDIS_URL), or a store URL.
    #[arg(long, value_name = "STORE")]
    dedup: Option<String>,
    /// Also measure a bare lapin loop that acks manually (same prefetch, one
    /// multiple-ack per ack batch, nothing else): the best a manual-ack
    /// client can do against this broker.
    #[arg(long)]
    bare_manual: bool,
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
    let supervisor = args.broker.direct_supervisor("backstop-bench")?;
    let live = supervisor.connection().await?;
    let queue = format!("backstop.bench.{}", std::process::id());
    let topology = Topology::new().queue(Queue::classic(&queue));
    let channel = live.create_channel().await?;
    topology.apply(&channel).await?;
    let body = vec![b'x'; 256];
    let dedup = match &args.dedup {
        None => None,
        Some(name) => {
            let (label, url) = dedup_store_url(name);
            let store = backstop::dedup::connect(&url)
                .await
                .with_context(|| format!("opening the dedup store {label}"))?;
            Some((label, url, store))
        }
    };
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
    // the next on a small machine, so (a) and (b) run back to back in each
    // round, in alternating order (ab, ba, ab, ...) so that neither always
    // runs second, and the ratio is the median of the rounds' paired ratios.
    let mut ceilings = Vec::new();
    let mut backstops = Vec::new();
    let mut deduped = Vec::new();
    for round in 1..=args.rounds {
        let ceiling_first = round % 2 == 1;
        let ceiling = if ceiling_first {
            Some(run.bare(None).await?)
        } else {
            None
        };
        let backstop = run.backstop(None).await?;
        if let Some((label, _, store)) = &dedup {
            // A scope per round: every round's message ids are fresh keys.
            let key = backstop::dedup::DedupKey::MessageId;
            let config = backstop::dedup::DedupConfig::new(key, store.clone())
                .scope(format!("{queue}.{round}"))
                .ttl(Duration::from_secs(600))
                .cleanup_every(None);
            let measured = run.backstop(Some(config)).await?;
            println!(
                "round {round}: backstop with {label} dedup {:.0} msg/s, {:.1} us cpu/msg",
                measured.rate, measured.cpu_us
            );
            deduped.push(measured);
        }
        let ceiling = match ceiling {
            Some(ceiling) => ceiling,
            None => run.bare(None).await?,
        };
        if args.bare_manual {
            let bare = run
                .bare(Some(
                    args.ack_batch.unwrap_or(usize::from(args.prefetch) / 4),
                ))
                .await?;
            println!(
                "round {round}: bare lapin manual-ack loop {:.0} msg/s, {:.1} us cpu/msg, \
                 {} ack frames, ratio {:.2}",
                bare.rate,
                bare.cpu_us,
                bare.ack_frames,
                bare.rate / ceiling.rate
            );
        }
        println!(
            "round {round}: ceiling (auto-ack) {:.0} msg/s, {:.1} us cpu/msg; \
             backstop (prefetch {}, concurrency {}) {:.0} msg/s, {:.1} us cpu/msg, {} ack frames; \
             ratio {:.2} ({})",
            ceiling.rate,
            ceiling.cpu_us,
            args.prefetch,
            args.concurrency,
            backstop.rate,
            backstop.cpu_us,
            backstop.ack_frames,
            backstop.rate / ceiling.rate,
            if ceiling_first {
                "ceiling first"
            } else {
                "backstop first"
            }
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
    let paired =
        |of: &[Measured]| -> f64 { median(of.iter().zip(&ceilings).map(|(m, c)| m.rate / c.rate)) };
    let ratio = paired(&backstops);
    println!(
        "ratio: {ratio:.2}, the median of {} paired rounds (the ratio of the median rates is {:.2})",
        backstops.len(),
        backstop / ceiling
    );
    let mut line = format!(
        "bench: ceiling={ceiling:.0} msg/s backstop={backstop:.0} msg/s ratio={ratio:.2} cpu_us_per_msg={cpu_us:.1}"
    );
    if let Some((label, url, _)) = &dedup {
        let rate = median(deduped.iter().map(|m| m.rate));
        let dedup_ratio = paired(&deduped);
        let vs_plain = median(deduped.iter().zip(&backstops).map(|(d, b)| d.rate / b.rate));
        line.push_str(&format!(
            " dedup={label} backstop_dedup={rate:.0} msg/s ratio_dedup={dedup_ratio:.2} \
             dedup_vs_plain={vs_plain:.2}"
        ));
        if let Some(path) = url.strip_prefix("sqlite://")
            && label == "sqlite"
        {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{path}{suffix}"));
            }
        }
    }
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// The label and URL of `--dedup NAME`.
fn dedup_store_url(name: &str) -> (String, String) {
    match name {
        "memory" => ("memory".into(), "memory".into()),
        "sqlite" => {
            let path = std::env::temp_dir()
                .join(format!("backstop-bench-dedup-{}.db", std::process::id()));
            ("sqlite".into(), format!("sqlite://{}", path.display()))
        }
        "postgres" => ("postgres".into(), backstop_testkit::postgres_url()),
        "redis" => ("redis".into(), backstop_testkit::redis_url()),
        url => (backstop::RedactedUri::new(url).to_string(), url.to_owned()),
    }
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
    /// `timed` of the messages were handled between `started` and now; the
    /// CPU time covers them all.
    fn measured(
        &self,
        timed: u64,
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
            rate: timed as f64 / elapsed.as_secs_f64(),
            cpu_us,
            ack_frames,
        }
    }

    /// (a) The ceiling: the broker pushing as fast as it can with auto-ack.
    /// With `manual`, the floor of manual acking instead: a bare lapin loop
    /// with the same prefetch that sends one `basic.ack(multiple)` every
    /// `batch` deliveries and does nothing else.
    async fn bare(&self, manual: Option<usize>) -> anyhow::Result<Measured> {
        fill(self.channel, self.queue, self.args.messages, self.body).await?;
        let channel = self.live.create_channel().await?;
        if manual.is_some() {
            channel
                .basic_qos(self.args.prefetch, BasicQosOptions { global: false })
                .await?;
        }
        let mut stream = channel
            .basic_consume(
                self.queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: manual.is_none(),
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("subscribing the bare consumer")?;
        let label = if manual.is_some() {
            "bare manual"
        } else {
            "ceiling"
        };
        let bar = ui::progress(self.args.messages, label);
        let cpu_before = cpu_time();
        let started = Instant::now();
        let mut received = 0u64;
        let mut ack_frames = 0;
        while received < self.args.messages {
            match stream.next().await {
                Some(Ok(delivery)) => {
                    received += 1;
                    if let Some(batch) = manual
                        && (received.is_multiple_of(batch as u64) || received == self.args.messages)
                    {
                        channel
                            .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                            .await?;
                        ack_frames += 1;
                    }
                    if received.is_multiple_of(1000) {
                        bar.set_position(received);
                    }
                }
                Some(Err(e)) => return Err(e).context("bare consume"),
                None => anyhow::bail!("the bare consumer was cancelled"),
            }
        }
        let measured = self.measured(self.args.messages, started, cpu_before, ack_frames);
        bar.finish_and_clear();
        let _ = channel.close(200, "measured".into()).await;
        Ok(measured)
    }

    /// (b) Backstop: manual, coalesced acks after a no-op handler; (c) the
    /// same with deduplication.
    async fn backstop(
        &self,
        dedup: Option<backstop::dedup::DedupConfig>,
    ) -> anyhow::Result<Measured> {
        fill(self.channel, self.queue, self.args.messages, self.body).await?;
        // The handler counts its calls and says when the last one ran, so
        // that this task sleeps through the run instead of polling: on two
        // cores every extra wake-up competes with the broker.
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let last_call = Arc::new(tokio::sync::Notify::new());
        let handler = {
            let (calls, last_call, messages) =
                (calls.clone(), last_call.clone(), self.args.messages);
            handler_fn(move |_: Delivery| {
                if calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == messages {
                    last_call.notify_one();
                }
                async {}
            })
        };
        let bar = ui::progress(self.args.messages, "backstop");
        let cpu_before = cpu_time();
        let mut config = ConsumerConfig::new(self.queue)
            .topology(self.topology.clone())
            .prefetch(self.args.prefetch)
            .concurrency(self.args.concurrency);
        if let Some(batch) = self.args.ack_batch {
            config = config.ack_batch(batch);
        }
        let deduplicating = dedup.is_some();
        if let Some(dedup) = dedup {
            config = config.dedup(dedup);
        }
        let consumer = Consumer::new(self.supervisor.clone(), config, handler).spawn()?;
        // Timed like the ceiling, from the subscription (the ceiling's clock
        // starts when basic.consume returns), not from opening the channel.
        let mut started = Instant::now();
        let mut subscribed = false;
        let mut handled_before = 0;
        // Done when the last ack is sent, not merely when the handler ran.
        loop {
            let stats = consumer.stats();
            if !subscribed && stats.subscribed {
                subscribed = true;
                started = Instant::now();
                handled_before = stats.handled;
            }
            if stats.handled >= self.args.messages {
                break;
            }
            if consumer.is_finished() {
                anyhow::bail!("the consumer stopped early: {stats:?}");
            }
            bar.set_position(stats.handled);
            let handlers_done =
                calls.load(std::sync::atomic::Ordering::Relaxed) >= self.args.messages;
            if subscribed && !handlers_done {
                // Until the last handler call, wake only for the progress bar.
                let _ =
                    tokio::time::timeout(Duration::from_millis(250), last_call.notified()).await;
            } else {
                // Subscribing, or the last acks being written: a few ms.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let ack_frames = consumer.stats().ack_frames;
        let measured = self.measured(
            self.args.messages.saturating_sub(handled_before),
            started,
            cpu_before,
            ack_frames,
        );
        bar.finish_and_clear();
        let report = consumer.shutdown().await?;
        if deduplicating && (report.duplicates > 0 || report.dedup_failures > 0) {
            anyhow::bail!(
                "the dedup run saw {} duplicates and {} store failures among fresh keys",
                report.duplicates,
                report.dedup_failures
            );
        }
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

/// Options of `backstop bench store`.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// Pending rows to load and re-drive per store.
    #[arg(long, default_value_t = 100_000)]
    rows: i64,
    /// Rows claimed per scan.
    #[arg(long, default_value_t = 500)]
    batch: i64,
    /// Stores to measure (repeatable). Default: a fresh SQLite file, and the
    /// PostgreSQL of BACKSTOP_POSTGRES_URL or the local one scripts/test starts.
    #[arg(long = "store", value_name = "URL")]
    stores: Vec<String>,
}

/// Loads `rows` pending rows into each store, then re-drives them all with
/// a scanner whose re-drive is a no-op handler: what is measured is the
/// store's claim-and-record cycle, one commit per batch.
pub(crate) async fn store(args: StoreArgs) -> anyhow::Result<ExitCode> {
    use backstop::store::{NewFailedMessage, Redrive, RedriveFn, Scanner, ScannerConfig, SqlStore};
    if args.rows <= 0 || args.batch <= 0 {
        return Err(UsageError("--rows and --batch must be at least 1".into()).into());
    }
    let stores = if args.stores.is_empty() {
        let sqlite = std::env::temp_dir().join(format!("backstop-bench-{}.db", std::process::id()));
        vec![
            format!("sqlite://{}", sqlite.display()),
            backstop_testkit::postgres_url(),
        ]
    } else {
        args.stores.clone()
    };
    let mut summary = Vec::new();
    for url in &stores {
        let shown = backstop::RedactedUri::new(url).to_string();
        let backend = if url.starts_with("sqlite:") {
            "sqlite"
        } else {
            "postgres"
        };
        let store = match SqlStore::connect(url).await {
            Ok(store) => Arc::new(store),
            Err(e @ backstop::store::StoreError::InvalidUrl { .. }) => {
                return Err(UsageError(e.to_string()).into());
            }
            Err(e) => return Err(e.into()),
        };
        let queue = format!("backstop.bench.store.{}", std::process::id());
        let now = backstop::retry::now_ms() as i64;
        let bar = ui::progress(args.rows as u64, "loading");
        let started = Instant::now();
        let mut loaded = 0i64;
        while loaded < args.rows {
            let n = (args.rows - loaded).min(1000);
            let batch: Vec<NewFailedMessage> = (loaded..loaded + n)
                .map(|i| NewFailedMessage {
                    queue: queue.clone(),
                    exchange: String::new(),
                    routing_key: queue.clone(),
                    message_id: Some(format!("bench-{i}")),
                    dedup_key: None,
                    payload: vec![b'x'; 256],
                    headers: "{}".into(),
                    properties: "{}".into(),
                    error: "bench".into(),
                    error_kind: "transient".into(),
                    attempts: 1,
                    next_attempt_at: now,
                    store_id: None,
                    fingerprint: format!("id:bench-{i}"),
                })
                .collect();
            store.store_batch(&batch).await?;
            loaded += n;
            bar.set_position(loaded as u64);
        }
        let load_rate = args.rows as f64 / started.elapsed().as_secs_f64();
        bar.finish_and_clear();

        let noop: RedriveFn = Arc::new(|_| Box::pin(async { Ok(()) }));
        let scanner = Scanner::new(
            store.clone(),
            Redrive::Handler(noop),
            ScannerConfig {
                batch: args.batch,
                owner: format!("bench-{}", std::process::id()),
                // Only the bench's own rows, whatever else the store holds.
                queue: Some(queue.clone()),
                ..ScannerConfig::default()
            },
        );
        let bar = ui::progress(args.rows as u64, "re-driven");
        let started = Instant::now();
        let mut redriven = 0u64;
        loop {
            let report = scanner.run_once().await?;
            if report.claimed == 0 {
                break;
            }
            redriven += report.redriven;
            bar.set_position(redriven);
        }
        let elapsed = started.elapsed();
        bar.finish_and_clear();
        let rate = redriven as f64 / elapsed.as_secs_f64();
        println!(
            "store {backend} ({shown}): loaded {} rows at {load_rate:.0} rows/s; re-drove {redriven} in {:.2}s = {rate:.0} rows/s (batch {})",
            args.rows,
            elapsed.as_secs_f64(),
            args.batch
        );
        // Leave no bench rows behind: this run's queue only.
        let _ = backstop::store::CompensationStore::purge_finished(
            &*store,
            backstop::retry::now_ms() as i64 + 1,
            Some(&queue),
        )
        .await;
        if redriven < args.rows as u64 {
            anyhow::bail!(
                "only {redriven} of {} rows were re-driven on {backend}",
                args.rows
            );
        }
        summary.push(format!("{backend}={rate:.0} rows/s"));
        if backend == "sqlite"
            && let Some(path) = url.strip_prefix("sqlite://")
            && args.stores.is_empty()
        {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{path}{suffix}"));
            }
        }
    }
    println!("bench: {}", summary.join(" "));
    Ok(ExitCode::SUCCESS)
}
