//! `backstop bench publish`: publish rates with confirms, measured in the
//! same run, round by round, each to a fresh durable classic queue with
//! persistent messages (so a confirm means the broker fsynced it):
//!
//! - the ceiling: a bare lapin loop on one confirm channel that keeps a
//!   window of confirms in flight and awaits them in order;
//! - the [`Publisher`], driven as the README recommends (`publish_batch`
//!   in chunks, a few chunks in flight), and as many concurrent `publish`
//!   tasks;
//! - the naive pattern: one publish, its confirm, the next publish;
//! - the spool: filled while the broker is unreachable, then drained;
//! - the sidecar's HTTP publish endpoint (`backstop run` with `[publish]`,
//!   this executable as a child process), over keep-alive connections.

use super::{cpu_time, median};
use crate::sidecar::{Sidecar, free_port, write_private};
use crate::{UsageError, ui};
use anyhow::Context;
use backstop::config::Config;
use backstop::connection::{Backoff, ConnectionConfig, ConnectionState, LiveConnection};
use backstop::publish::{Message, Published, Publisher};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, PublisherConfirm};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Options of `backstop bench publish`.
#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// Messages per measurement (the naive loop publishes a tenth of them).
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Rounds; each measures everything once, in a rotating order, and the
    /// ratio is the median of the rounds' ratios.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Publishes in flight: the ceiling's window of confirms, the number of
    /// concurrent `publish` tasks, and (divided by --batch) the number of
    /// `publish_batch` calls in flight.
    #[arg(long, default_value_t = 1000)]
    in_flight: usize,
    /// Messages per `publish_batch` call.
    #[arg(long, default_value_t = 250)]
    batch: usize,
    /// Channels of the Publisher's pool.
    #[arg(long, default_value_t = backstop::publish::DEFAULT_CHANNELS)]
    channels: usize,
    /// Concurrent requests to the sidecar's publish endpoint.
    #[arg(long, default_value_t = 64)]
    http_concurrency: usize,
    /// Skip the sidecar's publish endpoint (`backstop run` with `[publish]`).
    #[arg(long)]
    no_sidecar: bool,
    #[command(flatten)]
    broker: ui::BrokerArgs,
}

/// One measurement: `count` messages confirmed (or spooled) at `rate`.
#[derive(Clone, Copy, Debug)]
struct Measured {
    rate: f64,
    cpu_us: f64,
}

/// What a round measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ceiling,
    Batches,
    Tasks,
    Naive,
    Spool,
    Sidecar,
}

pub(crate) async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    if args.messages == 0
        || args.rounds == 0
        || args.in_flight == 0
        || args.batch == 0
        || args.channels == 0
        || args.http_concurrency == 0
    {
        return Err(UsageError(
            "--messages, --rounds, --in-flight, --batch, --channels and --http-concurrency \
             must be at least 1"
                .into(),
        )
        .into());
    }
    let config = args.broker.config()?;
    let supervisor = ui::direct_supervisor(&config, "backstop-bench")?;
    let live = supervisor.connection().await?;
    let admin = live.create_channel().await?;
    let publisher = Publisher::builder(config.connection_config("backstop-bench (publisher)")?)
        .channels(args.channels)
        .start()
        .await?;
    let mut sidecar = if args.no_sidecar {
        None
    } else {
        Some(SidecarEndpoint::start(&config, args.channels).await?)
    };
    let run = Run {
        live: &live,
        admin: &admin,
        publisher: &publisher,
        connection: config.connection_config("backstop-bench (spool)")?,
        body: vec![b'x'; args.size],
        args: &args,
    };
    let batches_in_flight = (args.in_flight / args.batch).max(1);
    println!(
        "publishing {} persistent messages of {} bytes per measurement to a fresh durable \
         classic queue; naive: {}; sidecar: {}",
        args.messages,
        args.size,
        run.naive_messages(),
        run.sidecar_messages()
    );
    println!(
        "publisher ({} channels): (batch) publish_batch of {} messages, {} calls in flight, \
         the pattern the README recommends; (tasks) {} concurrent publish tasks; sidecar: \
         {} concurrent POSTs over {HTTP_CLIENTS} keep-alive clients",
        args.channels, args.batch, batches_in_flight, args.in_flight, args.http_concurrency
    );

    let mut kinds = vec![
        Kind::Ceiling,
        Kind::Batches,
        Kind::Tasks,
        Kind::Naive,
        Kind::Spool,
    ];
    if sidecar.is_some() {
        kinds.push(Kind::Sidecar);
    }
    let mut all: Vec<Vec<(Kind, Measured)>> = Vec::new();
    let mut fills = Vec::new();
    for round in 1..=args.rounds {
        let mut order = kinds.clone();
        order.rotate_left((round as usize - 1) % kinds.len());
        let mut measured = Vec::new();
        for kind in order {
            let queue = run.fresh_queue(round, kind).await?;
            let m = match kind {
                Kind::Ceiling => run.bare(&queue, args.messages, args.in_flight).await,
                Kind::Naive => run.bare(&queue, run.naive_messages(), 1).await,
                Kind::Batches => run
                    .batches(&publisher, &queue, args.messages, "publisher batch")
                    .await
                    .map(|(m, _)| m),
                Kind::Tasks => run.tasks(&queue).await,
                Kind::Spool => run.spool(&queue, round).await.map(|(fill, drain)| {
                    fills.push(fill.rate);
                    drain
                }),
                Kind::Sidecar => match &sidecar {
                    Some(endpoint) => run.sidecar(endpoint, &queue).await,
                    None => continue,
                },
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    let _ = run.delete_queue(&queue).await;
                    if let Some(endpoint) = &mut sidecar {
                        endpoint.stop().await;
                    }
                    return Err(e);
                }
            };
            run.delete_queue(&queue).await?;
            measured.push((kind, m));
        }
        let get = |k: Kind| {
            measured
                .iter()
                .find(|(kind, _)| *kind == k)
                .map(|(_, m)| *m)
                .unwrap_or(Measured {
                    rate: f64::NAN,
                    cpu_us: f64::NAN,
                })
        };
        let (c, b, t) = (get(Kind::Ceiling), get(Kind::Batches), get(Kind::Tasks));
        println!(
            "round {round}: ceiling {:.0} msg/s ({:.1} us cpu/msg); publisher batch {:.0} msg/s \
             ({:.1} us cpu/msg, ratio {:.2}); publisher tasks {:.0} msg/s ({:.1} us cpu/msg, \
             ratio {:.2}); naive {:.0} msg/s; spool fill {:.0} msg/s, drain {:.0} msg/s; \
             sidecar {:.0} msg/s (order: {})",
            c.rate,
            c.cpu_us,
            b.rate,
            b.cpu_us,
            b.rate / c.rate,
            t.rate,
            t.cpu_us,
            t.rate / c.rate,
            get(Kind::Naive).rate,
            fills.last().copied().unwrap_or(f64::NAN),
            get(Kind::Spool).rate,
            get(Kind::Sidecar).rate,
            measured
                .iter()
                .map(|(k, _)| format!("{k:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(",")
        );
        all.push(measured);
    }
    if let Some(endpoint) = &mut sidecar {
        endpoint.stop().await;
    }
    publisher.close().await;
    let _ = admin.close(200, "bench done".into()).await;
    supervisor.close().await;

    let rates = |k: Kind| {
        all.iter()
            .filter_map(move |round| round.iter().find(|(kind, _)| *kind == k))
            .map(|(_, m)| m.rate)
    };
    let paired = |k: Kind| {
        median(
            rates(k)
                .zip(rates(Kind::Ceiling))
                .map(|(rate, ceiling)| rate / ceiling),
        )
    };
    let ceiling = median(rates(Kind::Ceiling));
    let batches = median(rates(Kind::Batches));
    let naive = median(rates(Kind::Naive));
    let ratio = paired(Kind::Batches);
    println!(
        "publisher tasks: {:.0} msg/s ratio={:.2} ({} concurrent publish tasks)",
        median(rates(Kind::Tasks)),
        paired(Kind::Tasks),
        args.in_flight
    );
    println!(
        "spool (SQLite, synchronous=FULL): fill={:.0} msg/s spool_drain={:.0} msg/s \
         (ratio to the ceiling {:.2})",
        median(fills.into_iter()),
        median(rates(Kind::Spool)),
        paired(Kind::Spool)
    );
    let sidecar = if sidecar.is_some() {
        format!("{:.0}", median(rates(Kind::Sidecar)))
    } else {
        "n/a".to_owned()
    };
    println!(
        "bench: ceiling={ceiling:.0} msg/s publisher={batches:.0} msg/s ratio={ratio:.2} \
         naive={naive:.0} msg/s sidecar={sidecar} msg/s"
    );
    Ok(ExitCode::SUCCESS)
}

/// HTTP clients the sidecar measurement spreads its requests over.
const HTTP_CLIENTS: usize = 4;

/// `backstop run` (this executable) with only a `[publish]` section.
struct SidecarEndpoint {
    sidecar: Sidecar,
    /// `http://127.0.0.1:PORT/publish`.
    base: String,
    dir: PathBuf,
}

impl SidecarEndpoint {
    async fn start(config: &Config, channels: usize) -> anyhow::Result<Self> {
        // reqwest is built without a crypto provider (as in the sidecar).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let uri = config
            .broker
            .uri
            .clone()
            .unwrap_or_else(|| ui::DEFAULT_URI.to_owned());
        let dir =
            std::env::temp_dir().join(format!("backstop-bench-sidecar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (metrics_port, publish_port) = (free_port()?, free_port()?);
        let path = dir.join("backstop.toml");
        write_private(
            &path,
            &format!(
                "[broker]\nuri = {uri:?}\nconnection_name = \"backstop-bench-sidecar\"\n\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
                 [publish]\nlisten = \"127.0.0.1:{publish_port}\"\nchannels = {channels}\n"
            ),
        )?;
        let mut sidecar = Sidecar::new(path, dir.join("backstop.log"), metrics_port);
        sidecar.start().await?;
        // Ready: its broker connection is up; the publish listener too once
        // it accepts a connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", publish_port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the sidecar's publish endpoint did not listen within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(SidecarEndpoint {
            sidecar,
            base: format!("http://127.0.0.1:{publish_port}/publish"),
            dir,
        })
    }

    async fn stop(&mut self) {
        if let Some(problem) = self.sidecar.stop().await {
            eprintln!("{problem}");
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What every measurement shares.
struct Run<'a> {
    live: &'a LiveConnection,
    /// Declares and deletes the queues.
    admin: &'a lapin::Channel,
    publisher: &'a Publisher,
    /// The broker, for the spool's second publisher.
    connection: ConnectionConfig,
    body: Vec<u8>,
    args: &'a PublishArgs,
}

impl Run<'_> {
    fn naive_messages(&self) -> u64 {
        (self.args.messages / 10).max(1)
    }

    async fn fresh_queue(&self, round: u32, kind: Kind) -> anyhow::Result<String> {
        let queue = format!(
            "backstop.bench.publish.{}.{round}.{}",
            std::process::id(),
            format!("{kind:?}").to_lowercase()
        );
        self.admin
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .context("deleting an old bench queue")?;
        self.admin
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the bench queue")?;
        Ok(queue)
    }

    /// Checks that the queue holds at least the `confirmed` messages (a
    /// confirmed message that is not there is a loss).
    async fn check_holds(&self, queue: &str, confirmed: u64) -> anyhow::Result<()> {
        let held = backstop_testkit::ready_count(self.admin, queue)
            .await
            .context("reading the bench queue's depth")?;
        anyhow::ensure!(
            u64::from(held) >= confirmed,
            "{queue} holds {held} messages, but {confirmed} were confirmed"
        );
        Ok(())
    }

    async fn delete_queue(&self, queue: &str) -> anyhow::Result<()> {
        self.admin
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .context("deleting the bench queue")?;
        Ok(())
    }

    fn measured(&self, count: u64, started: Instant, cpu_before: Option<Duration>) -> Measured {
        let elapsed = started.elapsed();
        let cpu_us = match (cpu_before, cpu_time()) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() * 1e6 / count.max(1) as f64,
            _ => f64::NAN,
        };
        Measured {
            rate: count as f64 / elapsed.as_secs_f64(),
            cpu_us,
        }
    }

    /// A persistent message with a 36-character message-id, like the
    /// Publisher's generated ones, so that every contender sends the same
    /// frames.
    fn message(&self, queue: &str, i: u64) -> Message {
        Message::new("", queue, self.body.clone()).with_message_id(format!("{i:036}"))
    }

    /// The ceiling (`window` > 1) or the naive loop (`window` = 1): bare
    /// lapin on one confirm channel, `window` confirms in flight, awaited in
    /// order. Only confirmed messages count.
    async fn bare(&self, queue: &str, messages: u64, window: usize) -> anyhow::Result<Measured> {
        let label = if window > 1 { "ceiling" } else { "naive" };
        let channel = self.live.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let bar = ui::progress(messages, label);
        let cpu_before = cpu_time();
        let started = Instant::now();
        let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(window);
        let mut confirmed = 0u64;
        let mut settle = |confirmation: lapin::Confirmation| {
            if confirmation.is_ack() {
                confirmed += 1;
            }
        };
        for i in 0..messages {
            if pending.len() == window
                && let Some(confirm) = pending.pop_front()
            {
                settle(confirm.await.context("awaiting a confirm")?);
            }
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("{i:036}").into());
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &self.body,
                    properties,
                )
                .await
                .context("publishing")?;
            pending.push_back(confirm);
            if i % 1000 == 0 {
                bar.set_position(i);
            }
        }
        for confirm in pending {
            settle(confirm.await.context("awaiting a confirm")?);
        }
        let measured = self.measured(confirmed, started, cpu_before);
        bar.finish_and_clear();
        let _ = channel.close(200, "measured".into()).await;
        self.check_holds(queue, confirmed).await?;
        anyhow::ensure!(
            confirmed == messages,
            "{label}: only {confirmed} of {messages} publishes were confirmed"
        );
        Ok(measured)
    }

    /// `publisher.publish_batch` over chunks of --batch messages, with
    /// --in-flight / --batch calls in flight (spawned tasks). The rate counts
    /// what the publisher answered: confirmed, or spooled.
    async fn batches(
        &self,
        publisher: &Publisher,
        queue: &str,
        messages: u64,
        label: &str,
    ) -> anyhow::Result<(Measured, Answered)> {
        let batch = self.args.batch as u64;
        let in_flight = (self.args.in_flight / self.args.batch).max(1);
        let bar = ui::progress(messages, label);
        let cpu_before = cpu_time();
        let started = Instant::now();
        let mut calls = JoinSet::new();
        let mut answered = Answered::default();
        let mut next = 0u64;
        while next < messages || !calls.is_empty() {
            while next < messages && calls.len() < in_flight {
                let end = (next + batch).min(messages);
                let chunk: Vec<Message> = (next..end).map(|i| self.message(queue, i)).collect();
                let publisher = publisher.clone();
                calls.spawn(async move { publisher.publish_batch(chunk).await });
                next = end;
            }
            if let Some(results) = calls.join_next().await {
                for result in results.context("a publish_batch task failed")? {
                    answered.count(result);
                }
                bar.set_position(answered.total());
            }
        }
        let measured = self.measured(answered.total(), started, cpu_before);
        bar.finish_and_clear();
        answered.ensure(label, messages)?;
        self.check_holds(queue, answered.confirmed).await?;
        Ok((measured, answered))
    }

    /// --in-flight tasks, each publishing one message at a time with
    /// `publisher.publish` until all are sent.
    async fn tasks(&self, queue: &str) -> anyhow::Result<Measured> {
        let (publisher, queue_name, body) =
            (self.publisher.clone(), queue.to_owned(), self.body.clone());
        self.workers(
            queue,
            "publisher tasks",
            self.args.messages,
            self.args.in_flight,
            move |i| {
                let message = Message::new("", queue_name.as_str(), body.clone())
                    .with_message_id(format!("{i:036}"));
                let publisher = publisher.clone();
                async move {
                    match publisher.publish(message).await {
                        Ok(published) => Ok(published.is_spooled()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await
    }

    /// `concurrency` tasks that each run `one(i)` for the next message
    /// number `i` until `messages` ran; `one` answers whether the message
    /// was spooled (else confirmed), or why it failed. Counts what was
    /// answered and checks the queue holds what was confirmed.
    async fn workers<F, Fut>(
        &self,
        queue: &str,
        label: &str,
        messages: u64,
        concurrency: usize,
        one: F,
    ) -> anyhow::Result<Measured>
    where
        F: Fn(u64) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<bool, String>> + Send,
    {
        let bar = ui::progress(messages, label);
        let cpu_before = cpu_time();
        let started = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let mut workers = JoinSet::new();
        for _ in 0..concurrency.min(messages as usize) {
            let (next, bar, one) = (next.clone(), bar.clone(), one.clone());
            workers.spawn(async move {
                let mut answered = Answered::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= messages {
                        return answered;
                    }
                    answered.record(one(i).await);
                    if i % 1000 == 0 {
                        bar.set_position(i);
                    }
                }
            });
        }
        let mut answered = Answered::default();
        while let Some(part) = workers.join_next().await {
            answered.add(&part.with_context(|| format!("a {label} task failed"))?);
        }
        let measured = self.measured(answered.total(), started, cpu_before);
        bar.finish_and_clear();
        answered.ensure(label, messages)?;
        self.check_holds(queue, answered.confirmed).await?;
        Ok(measured)
    }

    /// Fills a spool with --messages while the broker is unreachable, then
    /// starts a publisher on the broker with that spool and times its drain.
    /// Returns the fill and the drain rate.
    async fn spool(&self, queue: &str, round: u32) -> anyhow::Result<(Measured, Measured)> {
        let messages = self.args.messages;
        let path = std::env::temp_dir().join(format!(
            "backstop-bench-spool-{}-{round}.db",
            std::process::id()
        ));
        remove_sqlite(&path);
        let limits = (
            messages.max(backstop::publish::DEFAULT_SPOOL_MAX_MESSAGES),
            (messages * (self.args.size as u64 + 1024))
                .max(backstop::publish::DEFAULT_SPOOL_MAX_BYTES),
        );
        // A slow backoff: few warnings in the output.
        let offline = Publisher::builder(
            ConnectionConfig::new(unreachable_broker()?)
                .connection_name("backstop-bench (offline)")
                .backoff(Backoff {
                    initial: Duration::from_secs(1),
                    max: Duration::from_secs(1),
                    max_attempts: None,
                }),
        )
        .spool(&path)
        .spool_limits(limits.0, limits.1)
        .start()
        .await?;
        // Publishes wait for the first connection attempt; once it failed,
        // the broker is known to be away and they go straight to the spool.
        let mut state = offline.supervisor().state();
        // (The `Ref` wait_for returns holds the state's lock: not kept.)
        let known_away = tokio::time::timeout(
            Duration::from_secs(30),
            state.wait_for(|s| !matches!(s, ConnectionState::Connecting { attempt: 0 })),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        anyhow::ensure!(
            known_away,
            "the offline publisher's first connection attempt did not end within 30 s"
        );
        let filled = self.batches(&offline, queue, messages, "spool fill").await;
        offline.close().await;
        let (fill, answered) = match filled {
            Ok(filled) => filled,
            Err(e) => {
                remove_sqlite(&path);
                return Err(e);
            }
        };
        anyhow::ensure!(
            answered.spooled == messages,
            "spool fill: {} of {messages} were spooled",
            answered.spooled
        );
        let bar = ui::progress(messages, "spool drain");
        let cpu_before = cpu_time();
        let started = Instant::now();
        let online = Publisher::builder(self.connection.clone())
            .spool(&path)
            .spool_limits(limits.0, limits.1)
            .start()
            .await?;
        let drained = online.drained(Duration::from_secs(600)).await;
        let measured = self.measured(messages, started, cpu_before);
        bar.finish_and_clear();
        // After close, which waits for the drain task: its counters are final.
        online.close().await;
        let stats = online.stats();
        remove_sqlite(&path);
        anyhow::ensure!(
            drained && stats.drained == messages && stats.spool_parked == 0,
            "the spool did not drain: {stats:?}"
        );
        self.check_holds(queue, messages).await?;
        Ok((fill, measured))
    }

    fn sidecar_messages(&self) -> u64 {
        (self.args.messages / 5).max(1)
    }

    /// POSTs to the sidecar's publish endpoint: --http-concurrency requests
    /// at a time over a few keep-alive clients; each 202 (confirmed or
    /// spooled) counts.
    async fn sidecar(&self, endpoint: &SidecarEndpoint, queue: &str) -> anyhow::Result<Measured> {
        let clients = (0..HTTP_CLIENTS)
            .map(|_| {
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .context("building the HTTP clients")?;
        let url = format!("{}/amq.default/{queue}", endpoint.base);
        let body = self.body.clone();
        // The client side's CPU only: the sidecar is another process.
        self.workers(
            queue,
            "sidecar",
            self.sidecar_messages(),
            self.args.http_concurrency,
            move |i| {
                let client = clients[i as usize % clients.len()].clone();
                let request = client
                    .post(&url)
                    .header("Idempotency-Key", format!("{i:036}"))
                    .body(body.clone());
                async move {
                    let response = request.send().await.map_err(|e| e.to_string())?;
                    let status = response.status().as_u16();
                    // Read to the end, so that the connection is kept alive.
                    let text = response.text().await.map_err(|e| e.to_string())?;
                    match status {
                        202 => Ok(text.contains("\"spooled\"")),
                        _ => Err(format!("{status} {text}")),
                    }
                }
            },
        )
        .await
    }
}

/// What a publisher answered, by kind.
#[derive(Debug, Default)]
struct Answered {
    confirmed: u64,
    spooled: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Answered {
    fn count(&mut self, result: Result<Published, backstop::publish::PublishError>) {
        self.record(result.map(|p| p.is_spooled()).map_err(|e| e.to_string()));
    }

    /// Spooled (`Ok(true)`), confirmed (`Ok(false)`) or failed.
    fn record(&mut self, result: Result<bool, String>) {
        match result {
            Ok(true) => self.spooled += 1,
            Ok(false) => self.confirmed += 1,
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn add(&mut self, other: &Answered) {
        self.confirmed += other.confirmed;
        self.spooled += other.spooled;
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    fn total(&self) -> u64 {
        self.confirmed + self.spooled
    }

    fn ensure(&self, label: &str, messages: u64) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.total() == messages,
            "{label}: {} confirmed, {} spooled, {} failed of {messages} (first error: {})",
            self.confirmed,
            self.spooled,
            self.failed,
            self.first_error.as_deref().unwrap_or("none")
        );
        Ok(())
    }
}

/// An AMQP URI on a loopback port nothing listens on.
fn unreachable_broker() -> anyhow::Result<String> {
    let port = free_port()?;
    Ok(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
}

fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = PathBuf::from(path);
        p.as_mut_os_string().push(suffix);
        let _ = std::fs::remove_file(p);
    }
}
