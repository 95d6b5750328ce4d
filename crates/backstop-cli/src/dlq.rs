//! `backstop dlq list | replay | purge`, and the same operations as
//! functions the review console calls: operate a dead-letter queue without
//! losing anything.
//!
//! Every operation takes messages with `basic.get` and manual acks. What it
//! keeps stays unacked on its channel until the operation ends and the
//! channel closes, so the broker puts it back where it was, in queue order;
//! what it moves is published with a confirm before it is acked. Killing an
//! operation at any point therefore loses nothing: at worst a replayed
//! message exists twice. A dry run acks nothing and publishes nothing.

use crate::{UsageError, ui};
use anyhow::Context;
use backstop::config::Config;
use backstop::publish::ConfirmedPublisher;
use backstop::retry::{self, header_str, header_u64};
use base64::Engine;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use lapin::BasicProperties;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// At most this many messages are kept in a dry run's
/// [`ReplayReport::would_move`]; the counts are always exact.
pub(crate) const WOULD_MOVE_SHOWN: usize = 1000;

/// An operation that failed partway: what it had done before the error
/// (`done`: the messages moved or removed so far are gone from the DLQ for
/// good, so they are reported, not just the error), and the error.
#[derive(Debug)]
pub(crate) struct Partial<R> {
    /// The report up to the error.
    pub done: R,
    /// Why it stopped.
    pub error: anyhow::Error,
}

impl<R> std::fmt::Display for Partial<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl<R: Default> Partial<R> {
    /// A failure before anything was done.
    fn before_start(error: anyhow::Error) -> Self {
        Partial {
            done: R::default(),
            error,
        }
    }
}

/// `backstop dlq ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DlqCommand {
    /// The dead-letter queues of the configured consumers (`-c FILE`), with
    /// their depths.
    Queues {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: ui::BrokerArgs,
    },
    /// Peek at messages with their failure headers, in queue order; every
    /// message is requeued where it was (its redelivered flag is then set).
    List {
        /// The dead-letter queue, for example `orders.dlq`.
        queue: String,
        /// Show at most this many.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Print JSON instead of a table (a body that is not UTF-8 is
        /// base64, with `"payload_encoding": "base64"`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: ui::BrokerArgs,
    },
    /// Send messages back to the queue each failed in, through the default
    /// exchange (or to --to), each confirmed before it leaves the DLQ. The
    /// filters select which; the others stay, in order.
    Replay {
        /// The dead-letter queue.
        queue: String,
        /// Replay at most this many (of those the filters select).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// `EXCHANGE:ROUTING_KEY` to send to instead of the queue each message
        /// failed in (a deliberate re-route); `:orders` is the default exchange.
        #[arg(long, value_name = "EXCHANGE:ROUTING_KEY")]
        to: Option<String>,
        /// Only messages whose error text contains this (case-sensitive).
        #[arg(long, value_name = "TEXT")]
        error_contains: Option<String>,
        /// Only messages dead-lettered at or after this time: RFC 3339
        /// (`2024-05-01T10:00:00Z`) or a duration ago (`2h`).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<u64>,
        /// Only messages dead-lettered before this time (same forms as --since).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        until: Option<u64>,
        /// Only messages with this header value, `NAME=VALUE`.
        #[arg(long, value_name = "NAME=VALUE", value_parser = parse_header)]
        header: Option<(String, String)>,
        /// Show what would move; publish nothing, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Publish at most N messages a second (a token bucket with a burst
        /// of N/10, at least 1).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        rate: Option<u32>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: ui::BrokerArgs,
    },
    /// Remove messages dead-lettered longer ago than --older-than; keep the rest.
    Purge {
        /// The dead-letter queue.
        queue: String,
        /// For example `7d`, `12h`, `30m`.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Count what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        broker: ui::BrokerArgs,
    },
}

pub(crate) async fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::Queues { json, broker } => queues(&broker, json).await,
        DlqCommand::List {
            queue,
            limit,
            json,
            broker,
        } => list(&DlqBroker::from_args(&broker)?, &queue, limit, json).await,
        DlqCommand::Replay {
            queue,
            limit,
            to,
            error_contains,
            since,
            until,
            header,
            dry_run,
            rate,
            json,
            broker,
        } => {
            let opts = ReplayOptions {
                filter: DlqFilter {
                    error_contains,
                    since_ms: since,
                    until_ms: until,
                    header,
                    parked_before_ms: None,
                },
                limit,
                to: to.map(|t| parse_destination(&t)).transpose()?,
                dry_run,
                rate_per_sec: rate,
                cancel: None,
                keep: Keep::ALL,
            };
            replay_command(&DlqBroker::from_args(&broker)?, &queue, &opts, json).await
        }
        DlqCommand::Purge {
            queue,
            older_than,
            dry_run,
            broker,
        } => {
            let report = match purge(
                &DlqBroker::from_args(&broker)?,
                &queue,
                cutoff_of(older_than),
                None,
                dry_run,
            )
            .await
            {
                Ok(report) => report,
                Err(Partial { done, error }) => {
                    if dry_run {
                        eprintln!(
                            "purge dry run interrupted, nothing removed: would_purge={} kept={} counted before the error",
                            done.purged, done.kept
                        );
                    } else {
                        eprintln!(
                            "purge interrupted: purged={} kept={} before the error",
                            done.purged, done.kept
                        );
                    }
                    return Err(error);
                }
            };
            let PurgeReport {
                purged,
                kept,
                undated,
            } = report;
            if dry_run {
                eprintln!(
                    "dry run, nothing removed: would_purge={purged} kept={} undated={undated}",
                    kept + purged
                );
            } else {
                eprintln!("purged={purged} kept={kept} undated={undated}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `EXCHANGE:ROUTING_KEY`, split at the first colon.
fn parse_destination(text: &str) -> anyhow::Result<(String, String)> {
    let (exchange, routing_key) = text.split_once(':').ok_or_else(|| {
        UsageError(format!(
            "--to {text:?}: expected EXCHANGE:ROUTING_KEY (\":orders\" for the default exchange)"
        ))
    })?;
    Ok((exchange.to_owned(), routing_key.to_owned()))
}

/// A time for `--since`/`--until`: RFC 3339, or a duration ago; in ms since
/// the epoch.
pub(crate) fn parse_time(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|_| format!("{text:?} is before 1970"));
    }
    match humantime::parse_duration(text) {
        Ok(ago) => Ok(retry::now_ms().saturating_sub(ago.as_millis() as u64)),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2024-05-01T10:00:00Z) nor a duration ago (2h)"
        )),
    }
}

/// `NAME=VALUE`, split at the first `=`.
pub(crate) fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?}: expected NAME=VALUE")),
    }
}

/// How to reach the broker whose DLQs are operated on.
#[derive(Clone, Debug)]
pub(crate) struct DlqBroker {
    config: Config,
}

impl DlqBroker {
    /// The CLI's broker: `-c FILE`, `--uri`, `BACKSTOP_AMQP_URL` or the
    /// default, as every command resolves it.
    pub(crate) fn from_args(args: &ui::BrokerArgs) -> anyhow::Result<Self> {
        Ok(DlqBroker::from_config(&args.config()?))
    }

    /// The broker of a loaded configuration (the console's): its `[broker]`
    /// section, or `BACKSTOP_AMQP_URL` or the default when it names no URI.
    pub(crate) fn from_config(config: &Config) -> Self {
        let mut config = config.clone();
        if config.broker.uri.is_none() {
            config.broker.uri = Some(
                std::env::var("BACKSTOP_AMQP_URL").unwrap_or_else(|_| ui::DEFAULT_URI.to_owned()),
            );
        }
        DlqBroker { config }
    }

    fn uri(&self) -> String {
        self.config
            .broker
            .uri
            .clone()
            .unwrap_or_else(|| ui::DEFAULT_URI.to_owned())
    }
}

/// The dead-letter queues of the configured consumers: `<queue>.dlq` of
/// each `[[consumer]]`, where the consumer parks what it gives up on (and
/// where a quorum queue dead-letters by default), in config order, each once.
pub(crate) fn dlq_queues(config: &Config) -> Vec<String> {
    let mut queues: Vec<String> = Vec::new();
    for consumer in &config.consumers {
        let dlq = retry::RetryPolicy::dead_letter_queue(&consumer.queue);
        if !queues.contains(&dlq) {
            queues.push(dlq);
        }
    }
    queues
}

/// One configured DLQ and its depth (`None` when it does not exist yet).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct DlqDepth {
    /// The queue.
    pub queue: String,
    /// Its depth, or `None` when the broker has no such queue.
    pub depth: Option<u64>,
}

/// The depth of each of `queues` (a passive declare each; nothing is read).
pub(crate) async fn depths(broker: &DlqBroker, queues: &[String]) -> anyhow::Result<Vec<DlqDepth>> {
    let mut all = Vec::with_capacity(queues.len());
    for queue in queues {
        let depth = match Dlq::open(broker, queue, "backstop-dlq-depth").await {
            Ok(dlq) => {
                let depth = dlq.depth;
                dlq.close().await;
                Some(depth)
            }
            Err(e) if e.downcast_ref::<UsageError>().is_some() => None,
            Err(e) => return Err(e),
        };
        all.push(DlqDepth {
            queue: queue.clone(),
            depth,
        });
    }
    Ok(all)
}

async fn queues(args: &ui::BrokerArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    let broker = DlqBroker::from_config(&config);
    let all = depths(&broker, &dlq_queues(&config)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for q in &all {
            match q.depth {
                Some(depth) => println!("{} {depth}", q.queue),
                None => println!("{} (missing)", q.queue),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An open channel on the DLQ, with its depth when opened. Dropped without
/// [`close`](Self::close) (its operation's future was dropped), it still
/// closes its channel and connection, from a task of its own: otherwise the
/// messages it took would stay unacked on a live channel, and the
/// connection open, until the process exits.
struct Dlq {
    supervisor: backstop::connection::ConnectionSupervisor,
    channel: lapin::Channel,
    queue: String,
    depth: u64,
    closed: bool,
}

impl Drop for Dlq {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let channel = self.channel.clone();
        let supervisor = self.supervisor.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = channel.close(200, "backstop dlq dropped".into()).await;
                    supervisor.close().await;
                });
            }
            Err(_) => tracing::warn!(
                queue = %self.queue,
                "a DLQ channel was dropped outside a runtime: it closes with the process"
            ),
        }
    }
}

impl Dlq {
    async fn open(broker: &DlqBroker, queue: &str, name: &str) -> anyhow::Result<Self> {
        let supervisor = ui::direct_supervisor(&broker.config, name)?;
        // The supervisor is closed on every failure below: it would
        // otherwise keep reconnecting for the rest of the process.
        let channel = match supervisor.connection().await {
            Ok(live) => live.create_channel().await.map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::Error::from(e)),
        };
        let channel = match channel {
            Ok(channel) => channel,
            Err(e) => {
                supervisor.close().await;
                return Err(e.context(format!("opening a channel for {queue:?}")));
            }
        };
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let depth = match declared {
            Ok(q) => u64::from(q.message_count()),
            Err(e) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("404") => {
                supervisor.close().await;
                return Err(UsageError(format!(
                    "queue {queue:?} does not exist on {}",
                    backstop::RedactedUri::new(&broker.uri())
                ))
                .into());
            }
            Err(e) => {
                supervisor.close().await;
                return Err(e).context(format!("checking queue {queue:?}"));
            }
        };
        Ok(Dlq {
            supervisor,
            channel,
            queue: queue.to_owned(),
            depth,
            closed: false,
        })
    }

    async fn get(&self) -> anyhow::Result<Option<BasicGetMessage>> {
        self.channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .with_context(|| format!("basic.get from {}", self.queue))
    }

    async fn ack(&self, message: &BasicGetMessage, what: &str) -> anyhow::Result<()> {
        self.channel
            .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .with_context(|| what.to_owned())
    }

    /// Closes the channel: the broker requeues everything left unacked.
    async fn close(mut self) {
        let _ = self.channel.close(200, "backstop dlq done".into()).await;
        self.supervisor.close().await;
        self.closed = true;
    }
}

/// What `dlq list` shows of one message.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Listed {
    /// The `message-id` property.
    pub message_id: Option<String>,
    /// Backstop's error text (`x-backstop-error`).
    pub error: Option<String>,
    /// `transient`, `permanent`, ... (`x-backstop-error-kind`).
    pub error_kind: Option<String>,
    /// Attempts made before it was parked.
    pub attempts: Option<u64>,
    /// The exchange it was first published to.
    pub original_exchange: Option<String>,
    /// Its routing key then.
    pub original_routing_key: Option<String>,
    /// The queue it failed in (see [`failed_in`]).
    pub original_queue: Option<String>,
    /// Its first failure, RFC 3339.
    pub first_failure: Option<String>,
    /// When it was dead-lettered, RFC 3339 (see [`dead_lettered_ms`]).
    pub dead_lettered_at: Option<String>,
    /// The broker's redelivered flag on this delivery.
    pub redelivered: bool,
    /// The body's size.
    pub body_bytes: usize,
    /// True when only the first bytes of the body were kept (the console
    /// keeps at most 64 KiB of each).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub body_truncated: bool,
    /// The body: UTF-8 text, or base64 when it is not UTF-8.
    pub body: String,
    /// `utf8` or `base64`: how [`body`](Self::body) is written.
    pub payload_encoding: &'static str,
}

/// One message as peeked or selected: what `dlq list` shows, plus the raw
/// body, headers and properties.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct DlqMessage {
    /// Its place in the queue when it was read: 1 is the head.
    pub position: u64,
    /// The failure headers and the body as text.
    #[serde(flatten)]
    pub listed: Listed,
    /// The body, as is.
    #[serde(skip)]
    #[allow(dead_code)] // the console shows it (hex and text)
    pub body: Vec<u8>,
    /// Every header, as JSON (the compensation store's form, each value
    /// tagged with its AMQP type).
    #[serde(skip)]
    #[allow(dead_code)] // the console keeps it as the store does
    pub headers_json: String,
    /// Every header as plain JSON, for reading: strings as text (lossy UTF-8),
    /// numbers, booleans, tables as objects, arrays (`x-death`) as arrays.
    pub headers: serde_json::Value,
    /// The properties, as a JSON object.
    #[serde(rename = "properties", serialize_with = "raw_json")]
    pub properties_json: String,
    /// When it was dead-lettered, ms since the epoch.
    pub dead_lettered_ms: Option<u64>,
}

impl DlqMessage {
    /// The message at `position`, keeping at most `body_bytes` of its body
    /// (in [`body`](Self::body) and the listed text).
    fn new(position: u64, message: &BasicGetMessage, body_bytes: usize) -> Self {
        let headers = headers_of(&message.delivery.properties);
        let data = &message.delivery.data;
        DlqMessage {
            position,
            listed: describe(message, body_bytes),
            body: kept_body(data, body_bytes).to_vec(),
            headers_json: serde_json::to_string(&headers).unwrap_or_else(|_| "{}".into()),
            headers: readable_table(&headers),
            properties_json: backstop::store::properties_json(&message.delivery.properties),
            dead_lettered_ms: dead_lettered_ms(&headers),
        }
    }
}

/// A header table as plain JSON (see [`DlqMessage::headers`]).
pub(crate) fn readable_table(table: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), readable_value(v)))
            .collect(),
    )
}

fn readable_value(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(n) => Value::from(*n),
        AMQPValue::Double(n) => Value::from(*n),
        AMQPValue::DecimalValue(d) => {
            Value::from(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(readable_value).collect())
        }
        AMQPValue::FieldTable(table) => readable_table(table),
        AMQPValue::Void => Value::Null,
        other => header_str(other).map_or(Value::Null, Value::from),
    }
}

/// Writes JSON text as the JSON value it is (null if it is not JSON).
fn raw_json<S: serde::Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serde_json::from_str::<serde_json::Value>(text)
        .unwrap_or(serde_json::Value::Null)
        .serialize(serializer)
}

fn headers_of(properties: &BasicProperties) -> FieldTable {
    properties.headers().clone().unwrap_or_default()
}

fn text(headers: &FieldTable, key: &str) -> Option<String> {
    headers.inner().get(key).and_then(header_str)
}

/// A header's value as text, for `--header NAME=VALUE`: strings as they
/// are, numbers and booleans written out.
fn header_text(value: &AMQPValue) -> Option<String> {
    if let Some(text) = header_str(value) {
        return Some(text);
    }
    match value {
        AMQPValue::Boolean(b) => Some(b.to_string()),
        AMQPValue::ShortShortInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::Float(n) => Some(n.to_string()),
        AMQPValue::Double(n) => Some(n.to_string()),
        other => header_u64(other).map(|n| n.to_string()),
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// When the message was dead-lettered, in ms since the epoch: Backstop's
/// header, or else the broker's `x-death` time (for messages the broker
/// dead-lettered itself).
fn dead_lettered_ms(headers: &FieldTable) -> Option<u64> {
    if let Some(ms) = headers
        .inner()
        .get(retry::LAST_FAILURE_HEADER)
        .and_then(header_u64)
    {
        return Some(ms);
    }
    x_death_first(headers)
        .and_then(|death| death.inner().get("time").and_then(header_u64))
        .map(|seconds| seconds * 1000)
}

fn x_death_first(headers: &FieldTable) -> Option<&FieldTable> {
    match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(death)) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

/// The first `max` bytes of `body`; when they end inside a UTF-8
/// character of a text body, that character is left out too.
fn kept_body(body: &[u8], max: usize) -> &[u8] {
    if body.len() <= max {
        return body;
    }
    let cut = &body[..max];
    match std::str::from_utf8(cut) {
        Err(e) if e.error_len().is_none() => &cut[..e.valid_up_to()],
        _ => cut,
    }
}

fn describe(message: &BasicGetMessage, body_bytes: usize) -> Listed {
    let headers = headers_of(&message.delivery.properties);
    let number = |k: &str| headers.inner().get(k).and_then(header_u64);
    let whole = &message.delivery.data;
    let data = kept_body(whole, body_bytes);
    let (body, payload_encoding) = match std::str::from_utf8(data) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(data),
            "base64",
        ),
    };
    Listed {
        message_id: message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        error: text(&headers, retry::ERROR_HEADER),
        error_kind: text(&headers, retry::ERROR_KIND_HEADER),
        attempts: number(retry::ATTEMPTS_HEADER),
        original_exchange: text(&headers, retry::ORIGINAL_EXCHANGE_HEADER),
        original_routing_key: text(&headers, retry::ORIGINAL_ROUTING_KEY_HEADER),
        original_queue: failed_in(&headers),
        first_failure: number(retry::FIRST_FAILURE_HEADER).map(rfc3339),
        dead_lettered_at: dead_lettered_ms(&headers).map(rfc3339),
        redelivered: message.delivery.redelivered,
        body_bytes: whole.len(),
        body_truncated: data.len() < whole.len(),
        body,
        payload_encoding,
    }
}

/// Which messages a replay selects. Every set condition must hold; an
/// empty filter selects everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct DlqFilter {
    /// The error text (Backstop's `x-backstop-error`, or else the broker's
    /// `x-death` reason) contains this, case-sensitive.
    pub error_contains: Option<String>,
    /// Dead-lettered at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Dead-lettered before this time (ms since the epoch).
    pub until_ms: Option<u64>,
    /// This header has this value (strings as they are, numbers written out).
    pub header: Option<(String, String)>,
    /// Not dead-lettered at or after this time (ms since the epoch): the
    /// console binds a replay to the start of its dry run with it, so that
    /// nothing parked since (a re-parked copy of a replayed message
    /// included) is selected. Unlike `until_ms`, an undated message still
    /// matches.
    pub parked_before_ms: Option<u64>,
}

impl DlqFilter {
    /// Whether `message` is selected. A message without a dead-lettered time
    /// matches no time condition; one without an error text matches no
    /// error condition.
    pub(crate) fn matches(&self, message: &BasicGetMessage) -> bool {
        let headers = headers_of(&message.delivery.properties);
        if let Some(wanted) = &self.error_contains {
            let error = text(&headers, retry::ERROR_HEADER)
                .or_else(|| x_death_first(&headers).and_then(|d| text(d, "reason")));
            if !error.is_some_and(|e| e.contains(wanted.as_str())) {
                return false;
            }
        }
        if self.since_ms.is_some() || self.until_ms.is_some() {
            let Some(at) = dead_lettered_ms(&headers) else {
                return false;
            };
            if self.since_ms.is_some_and(|since| at < since)
                || self.until_ms.is_some_and(|until| at >= until)
            {
                return false;
            }
        }
        if let Some(bound) = self.parked_before_ms
            && dead_lettered_ms(&headers).is_some_and(|at| at >= bound)
        {
            return false;
        }
        if let Some((name, value)) = &self.header {
            let found = headers.inner().get(name.as_str()).and_then(header_text);
            if found.as_deref() != Some(value.as_str()) {
                return false;
            }
        }
        true
    }
}

/// What a peek saw.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Peek {
    /// The queue's depth when it was opened.
    pub depth: u64,
    /// The first messages, in queue order.
    pub messages: Vec<DlqMessage>,
}

/// Reads up to `limit` messages from the head of `queue` without taking
/// them: `basic.get` without ack, then the channel is closed and the broker
/// requeues every one where it was, in queue order (with its redelivered
/// flag set). Nothing moves.
pub(crate) async fn peek(
    broker: &DlqBroker,
    queue: &str,
    limit: u64,
    body_bytes: usize,
) -> anyhow::Result<Peek> {
    let dlq = Dlq::open(broker, queue, "backstop-dlq-peek").await?;
    let result = peek_open(&dlq, limit, body_bytes).await;
    let depth = dlq.depth;
    dlq.close().await;
    Ok(Peek {
        depth,
        messages: result?,
    })
}

async fn peek_open(dlq: &Dlq, limit: u64, body_bytes: usize) -> anyhow::Result<Vec<DlqMessage>> {
    let wanted = limit.min(dlq.depth);
    let mut messages = Vec::new();
    while (messages.len() as u64) < wanted {
        let Some(message) = dlq.get().await? else {
            break;
        };
        messages.push(DlqMessage::new(
            messages.len() as u64 + 1,
            &message,
            body_bytes,
        ));
    }
    Ok(messages)
}

async fn list(
    broker: &DlqBroker,
    queue: &str,
    limit: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let peeked = peek(broker, queue, limit.unwrap_or(u64::MAX), usize::MAX).await?;
    let listed = &peeked.messages;
    if json {
        println!("{}", serde_json::to_string_pretty(listed)?);
    } else {
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header([
                "#",
                "message id",
                "kind",
                "attempts",
                "error",
                "from",
                "failed in",
                "dead-lettered",
                "bytes",
            ]);
        for m in listed {
            let position = m.position;
            let m = &m.listed;
            let from = match (&m.original_exchange, &m.original_routing_key) {
                (Some(e), Some(k)) => format!("{e}:{k}"),
                _ => "-".to_owned(),
            };
            table.add_row([
                position.to_string(),
                m.message_id.clone().unwrap_or_else(|| "-".into()),
                m.error_kind.clone().unwrap_or_else(|| "-".into()),
                m.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
                m.error.clone().unwrap_or_else(|| "-".into()),
                from,
                m.original_queue.clone().unwrap_or_else(|| "-".into()),
                m.dead_lettered_at.clone().unwrap_or_else(|| "-".into()),
                m.body_bytes.to_string(),
            ]);
        }
        println!("{table}");
    }
    eprintln!("listed={} kept={}", listed.len(), peeked.depth);
    eprintln!(
        "peeked: every message listed was requeued in queue order (its redelivered flag is now set)"
    );
    Ok(ExitCode::SUCCESS)
}

/// The message as it should be sent back: a copy (see
/// [`retry::copy_properties`]) without the failure headers, so it starts
/// over with a full retry budget, and without `expiration`, `x-death` or
/// `x-delivery-count`, so it can neither expire out of its queue nor inherit
/// a quorum queue's delivery count.
fn replay_properties(properties: &BasicProperties) -> BasicProperties {
    retry::copy_properties(
        properties,
        retry::without_backstop_headers(&headers_of(properties)),
    )
}

/// The queue a dead-lettered message failed in: Backstop's
/// `x-backstop-original-queue`, or else the queue the broker dead-lettered
/// it from (`x-death[0].queue`).
fn failed_in(headers: &FieldTable) -> Option<String> {
    text(headers, retry::ORIGINAL_QUEUE_HEADER)
        .or_else(|| x_death_first(headers).and_then(|death| text(death, "queue")))
        .filter(|queue| !queue.is_empty())
}

/// How to replay.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplayOptions {
    /// Which messages.
    pub filter: DlqFilter,
    /// Replay at most this many of the selected ones.
    pub limit: Option<u64>,
    /// `(exchange, routing key)` to send to instead of the queue each
    /// message failed in.
    pub to: Option<(String, String)>,
    /// Publish nothing, ack nothing: report what would move.
    pub dry_run: bool,
    /// At most this many publishes a second (a token bucket, burst
    /// [`rate_burst`]).
    pub rate_per_sec: Option<u32>,
    /// Set to stop the replay: checked before each message is read and
    /// right before each publish, so nothing is published after it is set
    /// (a publish already under way ends with its confirm and ack). Every
    /// message not moved is requeued when the channel closes.
    pub cancel: Option<Arc<AtomicBool>>,
    /// How much of the would-move list a dry run keeps in memory.
    pub keep: Keep,
}

/// How much of the messages an operation reads it keeps in memory (to
/// show them): the counts stay exact.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keep {
    /// At most this many messages in a list.
    pub messages: usize,
    /// At most this many bytes of each body.
    pub body_bytes: usize,
}

impl Keep {
    /// The command line's: up to [`WOULD_MOVE_SHOWN`] messages, whole bodies.
    pub(crate) const ALL: Keep = Keep {
        messages: WOULD_MOVE_SHOWN,
        body_bytes: usize::MAX,
    };
}

impl Default for Keep {
    fn default() -> Self {
        Keep::ALL
    }
}

impl ReplayOptions {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// A replay's progress, reported after each message read.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct ReplayProgress {
    /// The queue's depth when the replay started.
    pub depth: u64,
    /// Messages read so far.
    pub seen: u64,
    /// Of those, selected by the filter.
    pub matched: u64,
    /// Published, confirmed and acked (0 in a dry run).
    pub moved: u64,
}

/// What a replay did.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ReplayReport {
    /// The queue's depth when the replay started.
    pub depth: u64,
    /// Messages read.
    pub seen: u64,
    /// Messages the filter selected (up to the limit).
    pub matched: u64,
    /// Selected messages published with a confirm and then acked (removed
    /// from the DLQ). Always 0 in a dry run.
    pub moved: u64,
    /// Messages left in the DLQ (everything not moved).
    pub kept: u64,
    /// Selected messages that could not be moved (no queue recorded to send
    /// them to, or the broker refused the publish): they stay in the DLQ.
    pub failed: u64,
    /// Selected messages whose copy may be in its queue although the DLQ
    /// message stays: a publish with an unknown outcome (no confirm in time,
    /// or the channel or connection failed after it was sent), or a
    /// confirmed copy whose ack in the DLQ failed. Possible duplicates, not
    /// losses: the original is back in the DLQ when the channel closes.
    pub unknown: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Dry run: the selected messages a real run would move (`matched -
    /// failed` of them), in queue order, at most [`WOULD_MOVE_SHOWN`].
    pub would_move: Vec<DlqMessage>,
    /// Dry run: how many a real run would move (the whole count, even past
    /// what `would_move` shows).
    pub would_move_count: u64,
    /// Why messages failed, one line each (at most [`WOULD_MOVE_SHOWN`]).
    pub errors: Vec<String>,
    /// Stopped by [`ReplayOptions::cancel`] before the end.
    pub cancelled: bool,
}

/// The burst of the `--rate` token bucket: a tenth of a second's worth of
/// publishes, at least one.
pub(crate) fn rate_burst(rate_per_sec: u32) -> u32 {
    (rate_per_sec / 10).max(1)
}

/// A token bucket: `burst` tokens at first, refilled at `rate` a second;
/// each publish takes one, waiting for it when the bucket is empty. So `n`
/// publishes take at least `(n - burst) / rate` seconds, and publish time
/// counts against the budget instead of adding to a fixed sleep.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate_per_sec: u32) -> Self {
        let burst = f64::from(rate_burst(rate_per_sec));
        TokenBucket {
            rate: f64::from(rate_per_sec),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    async fn take(&mut self) {
        self.refill();
        while self.tokens < 1.0 {
            let wait = (1.0 - self.tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            self.refill();
        }
        self.tokens -= 1.0;
    }
}

/// Replays the messages of `queue` that `opts.filter` selects (at most
/// `opts.limit`) to the queue each failed in (or `opts.to`), each published
/// with a confirm before it is acked. Every message not moved stays unacked
/// until the end, when the channel closes and the broker requeues it where
/// it was, in order. A dry run publishes and acks nothing and reports what
/// would move. `progress` is called after each message read. Failing
/// partway, it reports what it moved before the error ([`Partial`]).
pub(crate) async fn replay(
    broker: &DlqBroker,
    queue: &str,
    opts: &ReplayOptions,
    progress: &(dyn Fn(ReplayProgress) + Send + Sync),
) -> Result<ReplayReport, Partial<ReplayReport>> {
    let dlq = Dlq::open(broker, queue, "backstop-dlq-replay")
        .await
        .map_err(Partial::before_start)?;
    let mut report = ReplayReport {
        depth: dlq.depth,
        dry_run: opts.dry_run,
        ..ReplayReport::default()
    };
    let result = replay_open(&dlq, opts, progress, &mut report).await;
    dlq.close().await;
    report.kept = report.depth.saturating_sub(report.moved);
    match result {
        Ok(()) => Ok(report),
        Err(error) => Err(Partial {
            done: report,
            error,
        }),
    }
}

async fn replay_open(
    dlq: &Dlq,
    opts: &ReplayOptions,
    progress: &(dyn Fn(ReplayProgress) + Send + Sync),
    report: &mut ReplayReport,
) -> anyhow::Result<()> {
    let publisher = if opts.dry_run {
        None
    } else {
        Some(ConfirmedPublisher::new(dlq.channel.clone()).await?)
    };
    let mut bucket = opts.rate_per_sec.map(TokenBucket::new);
    let limit = opts.limit.unwrap_or(u64::MAX);
    let note_error = |report: &mut ReplayReport, error: String| {
        report.failed += 1;
        if report.errors.len() < WOULD_MOVE_SHOWN {
            report.errors.push(error);
        }
    };
    let note_unknown = |report: &mut ReplayReport, error: String| {
        report.unknown += 1;
        if report.errors.len() < WOULD_MOVE_SHOWN {
            report.errors.push(error);
        }
    };
    while report.seen < report.depth && report.matched < limit {
        if opts.cancelled() {
            report.cancelled = true;
            break;
        }
        let Some(message) = dlq.get().await? else {
            break;
        };
        report.seen += 1;
        let position = report.seen;
        if opts.filter.matches(&message) {
            report.matched += 1;
            // Straight to the queue it failed in, through the default
            // exchange: going back through the original exchange would hand
            // a copy to every other queue bound there, which already had it.
            let destination = opts.to.clone().or_else(|| {
                failed_in(&headers_of(&message.delivery.properties)).map(|q| (String::new(), q))
            });
            match (destination, &publisher) {
                (None, _) => note_error(
                    report,
                    format!(
                        "kept #{position} {:?}: no original queue recorded; use --to EXCHANGE:ROUTING_KEY",
                        describe(&message, 0).message_id
                    ),
                ),
                (Some(_), None) => {
                    report.would_move_count += 1;
                    if report.would_move.len() < opts.keep.messages {
                        report.would_move.push(DlqMessage::new(
                            position,
                            &message,
                            opts.keep.body_bytes,
                        ));
                    }
                }
                (Some((exchange, routing_key)), Some(publisher)) => {
                    if let Some(bucket) = bucket.as_mut() {
                        bucket.take().await;
                    }
                    // Not published: it stays unacked and is requeued at
                    // the close, with the rest.
                    if opts.cancelled() {
                        report.cancelled = true;
                        break;
                    }
                    let properties = replay_properties(&message.delivery.properties);
                    match publisher
                        .publish(&exchange, &routing_key, &message.delivery.data, properties)
                        .await
                    {
                        Ok(()) => {
                            if let Err(e) = dlq
                                .ack(
                                    &message,
                                    "acking a replayed message (it was already re-published)",
                                )
                                .await
                            {
                                // The copy is confirmed; the original goes
                                // back to the DLQ when the channel closes.
                                note_unknown(
                                    report,
                                    format!(
                                        "kept #{position}, its copy confirmed (a possible duplicate): {e:#}"
                                    ),
                                );
                                return Err(e);
                            }
                            report.moved += 1;
                        }
                        Err(
                            e @ (backstop::publish::PublishError::Timeout { .. }
                            | backstop::publish::PublishError::Channel { .. }),
                        ) => note_unknown(
                            report,
                            format!(
                                "kept #{position}, its copy's outcome unknown (a possible duplicate): {e}"
                            ),
                        ),
                        Err(e) => note_error(report, format!("kept #{position}: {e}")),
                    }
                }
            }
        }
        progress(ReplayProgress {
            depth: report.depth,
            seen: report.seen,
            matched: report.matched,
            moved: report.moved,
        });
    }
    Ok(())
}

/// `dlq replay`: [`replay`] with a progress bar and a summary.
async fn replay_command(
    broker: &DlqBroker,
    queue: &str,
    opts: &ReplayOptions,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let bar = ui::progress(0, if opts.dry_run { "checked" } else { "replayed" });
    let report = replay(broker, queue, opts, &|p: ReplayProgress| {
        bar.set_length(p.depth);
        bar.set_position(p.seen);
        bar.set_message(format!("matched={} moved={}", p.matched, p.moved));
    })
    .await;
    bar.finish_and_clear();
    let report = match report {
        Ok(report) => report,
        Err(Partial { done, error }) => {
            eprintln!(
                "replay interrupted: moved={} matched={} seen={} failed={} unknown={} before the error",
                done.moved, done.matched, done.seen, done.failed, done.unknown
            );
            return Err(error);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for error in &report.errors {
            eprintln!("{error}");
        }
        if opts.dry_run {
            for m in &report.would_move {
                let destination = match &opts.to {
                    Some((e, k)) => format!("{e}:{k}"),
                    None => format!(":{}", m.listed.original_queue.as_deref().unwrap_or("-")),
                };
                println!(
                    "would move #{} {} -> {destination} ({})",
                    m.position,
                    m.listed.message_id.as_deref().unwrap_or("-"),
                    m.listed.error.as_deref().unwrap_or("-"),
                );
            }
            eprintln!(
                "dry run, nothing moved: would_move={} kept={} failed={} matched={} seen={}",
                report.would_move_count, report.depth, report.failed, report.matched, report.seen
            );
        } else {
            eprintln!(
                "moved={} kept={} failed={} unknown={} matched={} seen={}",
                report.moved,
                report.kept,
                report.failed,
                report.unknown,
                report.matched,
                report.seen
            );
            if report.unknown > 0 {
                eprintln!(
                    "{} message(s) may have been copied although they stay in the DLQ: possible duplicates, not losses",
                    report.unknown
                );
            }
        }
    }
    Ok(if report.failed == 0 && report.unknown == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What a purge did (or, in a dry run, would do).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct PurgeReport {
    /// Removed (dry run: would be removed): dead-lettered before the cutoff.
    pub purged: u64,
    /// Kept: newer, or undated.
    pub kept: u64,
    /// Of the kept, those with no dead-lettered time (never purged by age).
    pub undated: u64,
}

/// The dead-lettered time before which a message is older than
/// `older_than`, now (ms since the epoch).
pub(crate) fn cutoff_of(older_than: Duration) -> u64 {
    retry::now_ms().saturating_sub(u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX))
}

/// Removes the messages of `queue` dead-lettered before `cutoff_ms` (ms
/// since the epoch; acks them), at most `max` of them (the first in queue
/// order); everything else stays unacked until the channel closes and is
/// requeued in order. Undated messages are kept. A dry run acks nothing and
/// reports what would go. The console confirms a purge with the cutoff and
/// the count of its dry run, so that the real run removes no message the
/// operator was not shown a count of. Failing partway, it reports what it
/// removed before the error ([`Partial`]).
pub(crate) async fn purge(
    broker: &DlqBroker,
    queue: &str,
    cutoff_ms: u64,
    max: Option<u64>,
    dry_run: bool,
) -> Result<PurgeReport, Partial<PurgeReport>> {
    let dlq = Dlq::open(broker, queue, "backstop-dlq-purge")
        .await
        .map_err(Partial::before_start)?;
    let cutoff = cutoff_ms;
    let max = max.unwrap_or(u64::MAX);
    let bar = ui::progress(dlq.depth, "checked");
    let mut report = PurgeReport::default();
    let result = async {
        for _ in 0..dlq.depth {
            let Some(message) = dlq.get().await? else {
                break;
            };
            let headers = headers_of(&message.delivery.properties);
            match dead_lettered_ms(&headers) {
                Some(at) if at < cutoff && report.purged < max => {
                    if !dry_run {
                        dlq.ack(&message, "removing a message").await?;
                    }
                    report.purged += 1;
                }
                Some(_) => report.kept += 1,
                None => {
                    report.undated += 1;
                    report.kept += 1;
                }
            }
            bar.inc(1);
        }
        anyhow::Ok(())
    }
    .await;
    bar.finish_and_clear();
    dlq.close().await;
    match result {
        Ok(()) => Ok(report),
        Err(error) => Err(Partial {
            done: report,
            error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>(_: T) {}

    /// The console runs these on spawned tasks and in axum handlers (with a
    /// plain `&dyn Fn` progress callback, `replay`'s future is not `Send`).
    #[test]
    fn the_operations_are_send() {
        let broker = DlqBroker::from_config(&Config::default());
        let opts = ReplayOptions::default();
        is_send(peek(&broker, "q", 1, 1));
        is_send(replay(&broker, "q", &opts, &|_| {}));
        is_send(purge(&broker, "q", 0, None, true));
    }

    #[test]
    fn a_kept_body_is_cut_on_a_character_boundary() {
        assert_eq!(kept_body(b"abc", 10), b"abc");
        assert_eq!(kept_body(b"abcdef", 3), b"abc");
        assert_eq!(kept_body("aé".as_bytes(), 2), b"a");
        assert_eq!(kept_body(&[0xff, 0xfe, 0xfd], 2), &[0xff, 0xfe]);
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time("2024-05-01T10:00:00.5Z"), Ok(1_714_557_600_500));
        let before = retry::now_ms();
        let ago = parse_time("2h").expect("a duration");
        let after = retry::now_ms();
        assert!((before - 7_200_000..=after - 7_200_000).contains(&ago));
        assert!(parse_time("yesterday-ish").is_err());
    }

    #[test]
    fn header_filters_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_header("x-tenant=a=b"),
            Ok(("x-tenant".to_owned(), "a=b".to_owned()))
        );
        assert_eq!(
            parse_header("x-empty="),
            Ok(("x-empty".into(), String::new()))
        );
        assert!(parse_header("=v").is_err());
        assert!(parse_header("novalue").is_err());
    }

    #[test]
    fn header_values_compare_as_text() {
        assert_eq!(header_text(&AMQPValue::LongLongInt(-5)), Some("-5".into()));
        assert_eq!(header_text(&AMQPValue::Boolean(true)), Some("true".into()));
        assert_eq!(
            header_text(&AMQPValue::LongString("acme".into())),
            Some("acme".into())
        );
    }

    #[test]
    fn dlq_queues_are_each_consumer_s_dlq_in_config_order() {
        let config = Config::parse(
            "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"http://127.0.0.1:1/\"\n\
             [[consumer]]\nqueue = \"refunds\"\nhandler.http.url = \"http://127.0.0.1:1/\"\n",
            "test",
        )
        .expect("config");
        assert_eq!(dlq_queues(&config), ["orders.dlq", "refunds.dlq"]);
    }
}
