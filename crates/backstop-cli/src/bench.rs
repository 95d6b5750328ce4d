//! `backstop bench consume`: the broker's auto-ack ceiling, a bare lapin
//! loop that acks manually, and the Backstop runtime (no-op handler, manual
//! coalesced acks), measured in the same run on the same pre-filled durable
//! queue. `backstop bench publish` is in [`publish`], `bench run` (the
//! sidecar end to end) in [`run`], `bench reconnect` in [`reconnect`].

mod group_retry;
mod publish;
mod reconnect;
mod run;

pub(crate) use group_retry::{GroupRetryArgs, group_retry};
pub(crate) use publish::{PublishArgs, publish};
pub(crate) use reconnect::{ReconnectArgs, reconnect};
pub(crate) use run::{RunBenchArgs, run_bench};

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
    /// Prefetch of the Backstop consumer (and of the bare manual-ack loop).
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// Concurrent handlers of the Backstop consumer.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Ack after this many contiguous completions (default: a quarter of the prefetch).
    #[arg(long)]
    ack_batch: Option<usize>,
    /// Rounds; each measures the ceiling, the bare manual-ack loop and
    /// Backstop back to back, in an order that rotates from round to round.
    /// Every ratio is the median of the rounds' paired ratios.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Also measure the runtime with deduplication on the message id, in
    /// this store: memory, sqlite (a fresh file), postgres, redis (the
    /// local servers scripts/test starts, or BACKSTOP_POSTGRES_URL /
    /// BACKSTOP_REDIS_URL), or a store URL.
    #[arg(long, value_name = "STORE")]
    dedup: Option<String>,
    /// Kept for old command lines: the bare manual-ack loop is now always
    /// measured.
    #[arg(long, hide = true)]
    bare_manual: bool,
    /// Memory instead of speed: publish N messages of 1 KiB, consume them
    /// all once with Backstop, and report the peak resident set of the
    /// consuming (the filling is not counted).
    #[arg(long, value_name = "N")]
    backlog: Option<u64>,
    #[command(flatten)]
    broker: ui::BrokerArgs,
}

/// CPU time of a process (all threads), read from /proc so no unsafe FFI
/// is needed: `self` or a pid.
pub(crate) fn cpu_time_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at ")".
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // The kernel reports in USER_HZ, 100 on every Linux target Rust supports.
    Some(Duration::from_millis(ticks * 10))
}

fn cpu_time() -> Option<Duration> {
    cpu_time_of("self")
}

/// The peak resident set (VmHWM) of a process, `self` or a pid, in KiB.
pub(crate) fn peak_rss_kib_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn peak_rss_kib() -> Option<u64> {
    peak_rss_kib_of("self")
}

/// Starts the peak resident set of this process again from the current
/// one (Linux 4.0 and later), so that a peak measures what follows.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The three consume measurements of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ceiling,
    BareManual,
    Backstop,
}

/// The order of round `round` (from 1): the three kinds rotated so that
/// each runs first, second and third equally often.
fn rotation(round: u32) -> [Kind; 3] {
    let kinds = [Kind::Ceiling, Kind::BareManual, Kind::Backstop];
    let start = (round as usize + 2) % 3;
    [kinds[start], kinds[(start + 1) % 3], kinds[(start + 2) % 3]]
}

pub(crate) async fn consume(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    if args.messages == 0 || args.prefetch == 0 || args.concurrency == 0 || args.rounds == 0 {
        return Err(UsageError(
            "--messages, --prefetch, --concurrency and --rounds must be at least 1".into(),
        )
        .into());
    }
    if args.backlog == Some(0) {
        return Err(UsageError("--backlog must be at least 1".into()).into());
    }
    let supervisor = args.broker.direct_supervisor("backstop-bench")?;
    let live = supervisor.connection().await?;
    let queue = format!("backstop.bench.{}", std::process::id());
    let topology = Topology::new().queue(Queue::classic(&queue));
    let channel = live.create_channel().await?;
    topology.apply(&channel).await?;
    let body = vec![b'x'; if args.backlog.is_some() { 1024 } else { 256 }];
    let run = Run {
        supervisor: &supervisor,
        live: &live,
        channel: &channel,
        queue: &queue,
        topology: &topology,
        body: &body,
        messages: args.backlog.unwrap_or(args.messages),
        prefetch: args.prefetch,
        concurrency: args.concurrency,
        ack_batch: args.ack_batch,
    };
    let outcome = match args.backlog {
        Some(backlog) => backlog_rss(&run, backlog).await,
        None => speed(&run, &args).await,
    };
    let deleted = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting the bench queue");
    let _ = channel.close(200, "bench done".into()).await;
    supervisor.close().await;
    let line = outcome?;
    deleted?;
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// `--backlog N`: the peak resident set of consuming N messages of 1 KiB.
async fn backlog_rss(run: &Run<'_>, backlog: u64) -> anyhow::Result<String> {
    run.fill().await?;
    let reset = reset_peak_rss();
    if !reset {
        eprintln!("bench: cannot reset the peak RSS; it includes the filling");
    }
    let before = peak_rss_kib().unwrap_or(0);
    let measured = run.consume_with_backstop(None, false).await?;
    let peak = peak_rss_kib().context("reading VmHWM from /proc/self/status")?;
    println!(
        "backlog {backlog} x 1 KiB, prefetch {}: {:.0} msg/s; RSS {:.1} MiB before consuming, peak {:.1} MiB",
        run.prefetch,
        measured.rate,
        before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    Ok(format!(
        "bench: backlog={backlog} body=1024 prefetch={} backstop={:.0} msg/s peak_rss_mib={:.1}",
        run.prefetch,
        measured.rate,
        peak as f64 / 1024.0
    ))
}

/// The speed rounds: the ceiling, the bare manual loop and Backstop in a
/// rotating order, then the dedup run if asked; the summary line.
async fn speed(run: &Run<'_>, args: &ConsumeArgs) -> anyhow::Result<String> {
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
    // The broker's throughput drifts by tens of percent from one second to
    // the next on a small machine, so the three measurements run back to
    // back in each round, in an order that rotates (so that none always
    // runs first), and each ratio is the median of the rounds' paired ratios.
    let mut ceilings = Vec::new();
    let mut manuals = Vec::new();
    let mut backstops = Vec::new();
    let mut deduped = Vec::new();
    for round in 1..=args.rounds {
        let order = rotation(round);
        let (mut ceiling, mut manual, mut backstop) = (None, None, None);
        for kind in order {
            match kind {
                Kind::Ceiling => ceiling = Some(run.bare(false).await?),
                Kind::BareManual => manual = Some(run.bare(true).await?),
                Kind::Backstop => backstop = Some(run.backstop(None).await?),
            }
        }
        let (Some(ceiling), Some(manual), Some(backstop)) = (ceiling, manual, backstop) else {
            unreachable!("a rotation holds every kind");
        };
        if let Some((label, _, store)) = &dedup {
            // A scope per round: every round's message ids are fresh keys.
            let key = backstop::dedup::DedupKey::MessageId;
            let config = backstop::dedup::DedupConfig::new(key, store.clone())
                .scope(format!("{}.{round}", run.queue))
                .ttl(Duration::from_secs(600))
                .cleanup_every(None);
            let measured = run.backstop(Some(config)).await?;
            println!(
                "round {round}: backstop with {label} dedup {:.0} msg/s, {:.1} us cpu/msg",
                measured.rate, measured.cpu_us
            );
            deduped.push(measured);
        }
        println!(
            "round {round} ({order:?}): ceiling (auto-ack) {:.0} msg/s, {:.1} us cpu/msg; \
             bare manual-ack {:.0} msg/s, {:.1} us cpu/msg, {} ack frames; \
             backstop (prefetch {}, concurrency {}) {:.0} msg/s, {:.1} us cpu/msg, {} ack frames; \
             ratio {:.2}, ratio_manual {:.2}",
            ceiling.rate,
            ceiling.cpu_us,
            manual.rate,
            manual.cpu_us,
            manual.ack_frames,
            args.prefetch,
            args.concurrency,
            backstop.rate,
            backstop.cpu_us,
            backstop.ack_frames,
            backstop.rate / ceiling.rate,
            backstop.rate / manual.rate,
        );
        ceilings.push(ceiling);
        manuals.push(manual);
        backstops.push(backstop);
    }
    if let Some(kib) = peak_rss_kib() {
        println!("peak RSS: {:.1} MiB", kib as f64 / 1024.0);
    }
    let ceiling = median(ceilings.iter().map(|m| m.rate));
    let manual = median(manuals.iter().map(|m| m.rate));
    let backstop = median(backstops.iter().map(|m| m.rate));
    let cpu_us = median(backstops.iter().map(|m| m.cpu_us));
    let manual_cpu_us = median(manuals.iter().map(|m| m.cpu_us));
    let paired = |of: &[Measured], to: &[Measured]| -> f64 {
        median(of.iter().zip(to).map(|(m, c)| m.rate / c.rate))
    };
    let ratio = paired(&backstops, &ceilings);
    let ratio_manual = paired(&backstops, &manuals);
    println!(
        "ratio: {ratio:.2}, ratio_manual: {ratio_manual:.2}, the medians of {} paired rounds \
         (the ratios of the median rates are {:.2} and {:.2}); the bare manual loop used \
         {manual_cpu_us:.1} us cpu/msg",
        backstops.len(),
        backstop / ceiling,
        backstop / manual
    );
    let mut line = format!(
        "bench: ceiling={ceiling:.0} msg/s bare_manual={manual:.0} msg/s backstop={backstop:.0} msg/s \
         ratio={ratio:.2} ratio_manual={ratio_manual:.2} cpu_us_per_msg={cpu_us:.1}"
    );
    if let Some((label, url, _)) = &dedup {
        let rate = median(deduped.iter().map(|m| m.rate));
        let dedup_ratio = paired(&deduped, &ceilings);
        let vs_plain = paired(&deduped, &backstops);
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
    Ok(line)
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

/// The median (the upper one of an even count); NaN when empty.
pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `q` quantile (0..=1) of `values`, nearest rank; NaN when empty.
pub(crate) fn quantile(values: &[f64], q: f64) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// One measurement.
pub(crate) struct Measured {
    pub(crate) rate: f64,
    pub(crate) cpu_us: f64,
    ack_frames: u64,
}

/// What every measurement shares.
pub(crate) struct Run<'a> {
    pub(crate) supervisor: &'a backstop::connection::ConnectionSupervisor,
    pub(crate) live: &'a backstop::connection::LiveConnection,
    pub(crate) channel: &'a lapin::Channel,
    pub(crate) queue: &'a str,
    pub(crate) topology: &'a Topology,
    pub(crate) body: &'a [u8],
    pub(crate) messages: u64,
    pub(crate) prefetch: u16,
    pub(crate) concurrency: usize,
    pub(crate) ack_batch: Option<usize>,
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
        let messages = self.messages as f64;
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

    /// Fills the queue with this run's messages, each with a fresh message
    /// id (so that a dedup store never sees one twice).
    pub(crate) async fn fill(&self) -> anyhow::Result<()> {
        let bar = ui::progress(self.messages, "filling");
        let prefix = backstop_testkit::unique("bench");
        try_publish(
            self.channel,
            self.queue,
            self.messages,
            &prefix,
            |_| self.body.to_vec(),
            |n| bar.set_position(n),
        )
        .await
        .context("pre-filling the bench queue")?;
        bar.finish_and_clear();
        Ok(())
    }

    /// Without `manual`, the ceiling: the broker pushing as fast as it can
    /// with auto-ack. With `manual`, the floor of manual acking instead: a
    /// bare lapin loop with the same prefetch that sends one
    /// `basic.ack(multiple)` per ack batch and does nothing else.
    pub(crate) async fn bare(&self, manual: bool) -> anyhow::Result<Measured> {
        self.fill().await?;
        let batch = manual.then(|| {
            self.ack_batch
                .unwrap_or(usize::from(self.prefetch) / 4)
                .max(1) as u64
        });
        let channel = self.live.create_channel().await?;
        if manual {
            channel
                .basic_qos(self.prefetch, BasicQosOptions { global: false })
                .await?;
        }
        let mut stream = channel
            .basic_consume(
                self.queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: !manual,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("subscribing the bare consumer")?;
        let label = if manual { "bare manual" } else { "ceiling" };
        let bar = ui::progress(self.messages, label);
        let cpu_before = cpu_time();
        let started = Instant::now();
        let mut received = 0u64;
        let mut ack_frames = 0;
        while received < self.messages {
            match stream.next().await {
                Some(Ok(delivery)) => {
                    received += 1;
                    if let Some(batch) = batch
                        && (received.is_multiple_of(batch) || received == self.messages)
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
        let measured = self.measured(self.messages, started, cpu_before, ack_frames);
        bar.finish_and_clear();
        let _ = channel.close(200, "measured".into()).await;
        Ok(measured)
    }

    /// Backstop: manual, coalesced acks after a no-op handler; with `dedup`,
    /// the same with deduplication.
    async fn backstop(
        &self,
        dedup: Option<backstop::dedup::DedupConfig>,
    ) -> anyhow::Result<Measured> {
        self.fill().await?;
        self.consume_with_backstop(dedup, true).await
    }

    /// Consumes the filled queue with Backstop.
    async fn consume_with_backstop(
        &self,
        dedup: Option<backstop::dedup::DedupConfig>,
        progress: bool,
    ) -> anyhow::Result<Measured> {
        // The handler counts its calls and says when the last one ran, so
        // that this task sleeps through the run instead of polling: on two
        // cores every extra wake-up competes with the broker.
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let last_call = Arc::new(tokio::sync::Notify::new());
        let handler = {
            let (calls, last_call, messages) = (calls.clone(), last_call.clone(), self.messages);
            handler_fn(move |_: Delivery| {
                if calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == messages {
                    last_call.notify_one();
                }
                async {}
            })
        };
        let bar = if progress {
            ui::progress(self.messages, "backstop")
        } else {
            indicatif::ProgressBar::hidden()
        };
        let cpu_before = cpu_time();
        let mut config = ConsumerConfig::new(self.queue)
            .topology(self.topology.clone())
            .prefetch(self.prefetch)
            .concurrency(self.concurrency);
        if let Some(batch) = self.ack_batch {
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
            if stats.handled >= self.messages {
                break;
            }
            if consumer.is_finished() {
                anyhow::bail!("the consumer stopped early: {stats:?}");
            }
            bar.set_position(stats.handled);
            let handlers_done = calls.load(std::sync::atomic::Ordering::Relaxed) >= self.messages;
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
            self.messages.saturating_sub(handled_before),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_runs_in_every_position_once_per_three_rounds() {
        for position in 0..3 {
            let firsts: std::collections::HashSet<_> = (1..=3)
                .map(|r| format!("{:?}", rotation(r)[position]))
                .collect();
            assert_eq!(firsts.len(), 3, "position {position}");
        }
        assert_eq!(rotation(1)[0], Kind::Ceiling);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&values, 1.0), 100.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
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
