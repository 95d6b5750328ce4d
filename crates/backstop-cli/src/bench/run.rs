//! `backstop bench run`: the sidecar end to end. Each measurement fills a
//! queue, then starts this binary's own `backstop run` (config file, consumer,
//! HTTP client, metrics: the real code path, in a process of its own so that
//! its CPU and memory are its own) against an HTTP endpoint served by this
//! process that answers 200 at once, and times the deliveries the endpoint
//! receives. The bare manual-ack loop runs in the same rounds; every
//! configuration's ratio is the median of its paired ratios to it.

use super::{Run, cpu_time_of, median, peak_rss_kib_of};
use crate::{UsageError, ui};
use anyhow::Context;
use axum::Router;
use axum::routing::post;
use backstop::topology::{Queue, Topology};
use lapin::options::QueueDeleteOptions;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Options of `backstop bench run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunBenchArgs {
    /// Messages per measurement.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Prefetch of the sidecar's consumer (and of the bare loop).
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// Handler concurrencies to measure (repeatable; default 8, 32, 128).
    #[arg(long = "concurrency", value_name = "N")]
    concurrencies: Vec<usize>,
    /// Rounds; each measures the bare loop and every configuration in an
    /// order that rotates from round to round.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Only the configurations without dedup and without a store.
    #[arg(long)]
    plain_only: bool,
    /// Memory instead of speed: publish N messages of 1 KiB, let one
    /// sidecar (the first concurrency, no dedup, no store) consume them all,
    /// and report its peak resident set.
    #[arg(long, value_name = "N")]
    backlog: Option<u64>,
    #[command(flatten)]
    broker: ui::BrokerArgs,
}

/// One sidecar configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Setup {
    concurrency: usize,
    dedup: bool,
    store: bool,
}

impl Setup {
    fn label(&self) -> String {
        format!(
            "concurrency={} dedup={} store={}",
            self.concurrency,
            if self.dedup { "sqlite" } else { "none" },
            if self.store { "sqlite" } else { "none" }
        )
    }
}

/// What one sidecar run measured.
struct Sidecar {
    rate: f64,
    cpu_us: f64,
    p99_ms: f64,
    peak_rss_kib: u64,
}

/// The endpoint the sidecar posts to: counts requests and notes when the
/// first and the `target`-th arrived.
#[derive(Default)]
struct Endpoint {
    received: AtomicU64,
    target: AtomicU64,
    first: tokio::sync::Notify,
    last: tokio::sync::Notify,
}

async fn endpoint() -> anyhow::Result<(String, Arc<Endpoint>)> {
    let state = Arc::new(Endpoint::default());
    let app = Router::new().route(
        "/deliver",
        post({
            let state = state.clone();
            move || {
                let state = state.clone();
                async move {
                    let n = state.received.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == 1 {
                        state.first.notify_one();
                    }
                    if n == state.target.load(Ordering::Relaxed) {
                        state.last.notify_one();
                    }
                    ""
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the bench endpoint")?;
    let url = format!("http://{}/deliver", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, state))
}

/// `backstop bench run`.
pub(crate) async fn run_bench(args: RunBenchArgs) -> anyhow::Result<ExitCode> {
    let concurrencies = if args.concurrencies.is_empty() {
        vec![8, 32, 128]
    } else {
        args.concurrencies.clone()
    };
    if args.messages < 2
        || args.prefetch == 0
        || args.rounds == 0
        || concurrencies.contains(&0)
        || args.backlog.is_some_and(|b| b < 2)
    {
        return Err(UsageError(
            "--messages and --backlog must be at least 2, --prefetch, --concurrency and \
             --rounds at least 1"
                .into(),
        )
        .into());
    }
    let config = args.broker.config()?;
    let uri = config.broker.uri.clone().unwrap_or_default();
    let supervisor = ui::direct_supervisor(&config, "backstop-bench")?;
    let live = supervisor.connection().await?;
    let queue = format!("backstop.bench.run.{}", std::process::id());
    // Declared as `backstop run` declares a classic queue.
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
        concurrency: concurrencies[0],
        ack_batch: None,
    };
    let (url, endpoint) = endpoint().await?;
    let bench = Bench {
        run: &run,
        uri: &uri,
        url: &url,
        endpoint: &endpoint,
    };
    let outcome = match args.backlog {
        Some(backlog) => bench.backlog(backlog, concurrencies[0]).await,
        None => bench.speed(&args, &concurrencies).await,
    };
    let deleted = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting the bench queue");
    // The tiers and the DLQ the sidecar declared.
    for suffix in [".dlq"] {
        let _ = channel
            .queue_delete(
                format!("{queue}{suffix}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = channel.close(200, "bench done".into()).await;
    supervisor.close().await;
    let line = outcome?;
    deleted?;
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

struct Bench<'a> {
    run: &'a Run<'a>,
    uri: &'a str,
    url: &'a str,
    endpoint: &'a Arc<Endpoint>,
}

impl Bench<'_> {
    async fn backlog(&self, backlog: u64, concurrency: usize) -> anyhow::Result<String> {
        let setup = Setup {
            concurrency,
            dedup: false,
            store: false,
        };
        self.run.fill().await?;
        let measured = self.sidecar(setup).await?;
        let mib = measured.peak_rss_kib as f64 / 1024.0;
        println!(
            "backlog {backlog} x 1 KiB, prefetch {}, {}: {:.0} msg/s, {:.1} us cpu/msg, \
             sidecar peak RSS {mib:.1} MiB",
            self.run.prefetch,
            setup.label(),
            measured.rate,
            measured.cpu_us
        );
        Ok(format!(
            "bench: run backlog={backlog} body=1024 prefetch={} concurrency={concurrency} \
             sidecar={:.0} msg/s peak_rss_mib={mib:.1}",
            self.run.prefetch, measured.rate
        ))
    }

    async fn speed(&self, args: &RunBenchArgs, concurrencies: &[usize]) -> anyhow::Result<String> {
        let mut setups = Vec::new();
        for &concurrency in concurrencies {
            for (dedup, store) in [(false, false), (true, false), (false, true), (true, true)] {
                if args.plain_only && (dedup || store) {
                    continue;
                }
                setups.push(Setup {
                    concurrency,
                    dedup,
                    store,
                });
            }
        }
        // Index 0 is the bare loop, then the setups; the order rotates.
        let slots = setups.len() + 1;
        let mut bare = Vec::new();
        let mut results: Vec<Vec<Sidecar>> = setups.iter().map(|_| Vec::new()).collect();
        for round in 1..=args.rounds {
            let start = (round as usize - 1) % slots;
            for slot in (0..slots).map(|i| (start + i) % slots) {
                if slot == 0 {
                    let measured = self.run.bare(true).await?;
                    println!(
                        "round {round}: bare manual-ack loop {:.0} msg/s, {:.1} us cpu/msg",
                        measured.rate, measured.cpu_us
                    );
                    bare.push(measured);
                } else {
                    let setup = setups[slot - 1];
                    self.run.fill().await?;
                    let measured = self.sidecar(setup).await?;
                    println!(
                        "round {round}: sidecar {}: {:.0} msg/s, {:.1} us cpu/msg, p99 {:.1} ms, \
                         peak RSS {:.1} MiB",
                        setup.label(),
                        measured.rate,
                        measured.cpu_us,
                        measured.p99_ms,
                        measured.peak_rss_kib as f64 / 1024.0
                    );
                    results[slot - 1].push(measured);
                }
            }
        }
        let bare_rate = median(bare.iter().map(|m| m.rate));
        let bare_cpu = median(bare.iter().map(|m| m.cpu_us));
        println!(
            "run: bare_manual msg/s={bare_rate:.0} cpu_us_per_msg={bare_cpu:.1} (median of {} rounds)",
            bare.len()
        );
        let mut summary = format!("bench: run bare_manual={bare_rate:.0} msg/s");
        for (setup, measured) in setups.iter().zip(&results) {
            let rate = median(measured.iter().map(|m| m.rate));
            let cpu = median(measured.iter().map(|m| m.cpu_us));
            let p99 = median(measured.iter().map(|m| m.p99_ms));
            let rss = median(measured.iter().map(|m| m.peak_rss_kib as f64 / 1024.0));
            let ratio = median(measured.iter().zip(&bare).map(|(m, b)| m.rate / b.rate));
            println!(
                "run: {} msg/s={rate:.0} cpu_us_per_msg={cpu:.1} p99_ms={p99:.1} \
                 peak_rss_mib={rss:.1} ratio={ratio:.2}",
                setup.label()
            );
            if setup.concurrency == 32 && !setup.store {
                let key = if setup.dedup { "c32_dedup" } else { "c32" };
                summary.push_str(&format!(
                    " {key}={rate:.0} msg/s ratio_{key}={ratio:.2} cpu_us_{key}={cpu:.1} p99_ms_{key}={p99:.1}"
                ));
            }
        }
        Ok(summary)
    }

    /// Starts `backstop run` for `setup` on the filled queue, waits until
    /// the endpoint has received every message, and stops it with SIGTERM.
    async fn sidecar(&self, setup: Setup) -> anyhow::Result<Sidecar> {
        let messages = self.run.messages;
        let endpoint = self.endpoint;
        endpoint.received.store(0, Ordering::Relaxed);
        endpoint.target.store(messages, Ordering::Relaxed);
        // Take any stale permits away.
        let _ = tokio::time::timeout(Duration::ZERO, endpoint.first.notified()).await;
        let _ = tokio::time::timeout(Duration::ZERO, endpoint.last.notified()).await;
        let first = endpoint.first.notified();
        let last = endpoint.last.notified();
        tokio::pin!(first, last);
        first.as_mut().enable();
        last.as_mut().enable();

        let dir = std::env::temp_dir().join(backstop_testkit::unique("backstop-bench-run"));
        std::fs::create_dir_all(&dir).context("creating the bench's temporary directory")?;
        let metrics_port = free_port()?;
        let mut text = format!(
            "[broker]\nuri = {:?}\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n",
            self.uri
        );
        if setup.store {
            text.push_str(&format!(
                "[store]\nurl = {:?}\n\n",
                format!("sqlite://{}", dir.join("store.db").display())
            ));
        }
        text.push_str(&format!(
            "[[consumer]]\nqueue = {:?}\nprefetch = {}\nconcurrency = {}\n\
             handler.http.url = {:?}\nhandler.http.timeout = \"30s\"\n",
            self.run.queue, self.run.prefetch, setup.concurrency, self.url
        ));
        if setup.store {
            text.push_str("retry.exhausted = \"store\"\n");
        }
        if setup.dedup {
            text.push_str("dedup.key = \"message-id\"\ndedup.ttl = \"1h\"\n");
            if !setup.store {
                text.push_str(&format!(
                    "dedup.store = {:?}\n",
                    format!("sqlite://{}", dir.join("dedup.db").display())
                ));
            }
        }
        let config = dir.join("backstop.toml");
        std::fs::write(&config, text).context("writing the sidecar's config")?;
        let exe = std::env::current_exe().context("finding this binary")?;
        let child = Command::new(exe)
            .args(["run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "warn,lapin=off")
            .stdout(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .context("starting backstop run")?;
        let mut child = Killed(child);
        let pid = child.0.id().to_string();
        let bar = ui::progress(messages, "sidecar");

        let within = Duration::from_secs(60) + Duration::from_millis(messages / 10);
        let waited = async {
            first.await;
            let started = Instant::now();
            let cpu_before = cpu_time_of(&pid);
            last.await;
            (started.elapsed(), cpu_before, cpu_time_of(&pid))
        };
        let exited = async {
            loop {
                if let Ok(Some(status)) = child.0.try_wait() {
                    return status;
                }
                bar.set_position(endpoint.received.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        let (elapsed, cpu_before, cpu_after) = tokio::select! {
            measured = tokio::time::timeout(within, waited) => measured.map_err(|_| anyhow::anyhow!(
                "the sidecar delivered {} of {messages} messages in {within:?}",
                endpoint.received.load(Ordering::Relaxed)
            ))?,
            status = exited => anyhow::bail!("backstop run exited early: {status}"),
        };
        bar.finish_and_clear();
        let p99_ms = handler_p99_ms(metrics_port).await.unwrap_or(f64::NAN);
        let peak_rss_kib = peak_rss_kib_of(&pid).unwrap_or(0);
        let cpu_us = match (cpu_before, cpu_after) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() * 1e6 / (messages - 1) as f64,
            _ => f64::NAN,
        };
        terminate(&mut child.0).await?;
        let received = endpoint.received.load(Ordering::Relaxed);
        let _ = std::fs::remove_dir_all(&dir);
        // Every message once: a message delivered twice would show here (a
        // fresh dedup store and fresh ids, so none is expected).
        if received != messages {
            anyhow::bail!("the endpoint received {received} requests for {messages} messages");
        }
        Ok(Sidecar {
            rate: (messages - 1) as f64 / elapsed.as_secs_f64(),
            cpu_us,
            p99_ms,
            peak_rss_kib,
        })
    }
}

/// A child process killed when dropped (a bench that fails leaves none).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// SIGTERM, then waits up to a minute for the drain.
async fn terminate(child: &mut Child) -> anyhow::Result<()> {
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .context("running kill")?;
    if !status.success() {
        anyhow::bail!("kill -TERM {pid} failed");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                anyhow::bail!("backstop run exited with {status} on SIGTERM");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("backstop run did not exit within 60 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port())
}

/// The 99th percentile of the sidecar's handler duration (one POST), from
/// its `/metrics` histogram, interpolated within the bucket as Prometheus'
/// `histogram_quantile` does.
async fn handler_p99_ms(port: u16) -> Option<f64> {
    // reqwest is built without a crypto provider of its own (see run::http).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let buckets = histogram_buckets(&text, "backstop_handler_duration_seconds_bucket");
    quantile_of_buckets(&buckets, 0.99).map(|s| s * 1e3)
}

/// `(le, cumulative count)` of a histogram's buckets, +Inf as infinity.
fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = line.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

fn quantile_of_buckets(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_of_a_prometheus_histogram() {
        let text = "# TYPE x histogram\n\
            x_bucket{queue=\"q\",le=\"0.001\"} 0\n\
            x_bucket{queue=\"q\",le=\"0.002\"} 90\n\
            x_bucket{queue=\"q\",le=\"0.004\"} 100\n\
            x_bucket{queue=\"q\",le=\"+Inf\"} 100\n";
        let buckets = histogram_buckets(text, "x_bucket");
        assert_eq!(buckets.len(), 4);
        let p99 = quantile_of_buckets(&buckets, 0.99).expect("a p99");
        assert!((p99 - 0.0038).abs() < 1e-9, "{p99}");
        assert_eq!(quantile_of_buckets(&[(f64::INFINITY, 0.0)], 0.99), None);
    }
}
