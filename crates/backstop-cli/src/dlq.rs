//! `backstop dlq list | replay | purge`: operate a dead-letter queue without
//! losing anything.
//!
//! Every command takes messages with `basic.get` and manual acks. What it
//! keeps stays unacked on its channel until the command ends and the channel
//! closes, so the broker puts it back where it was; what it moves is
//! published with a confirm before it is acked. Killing a command at any
//! point therefore loses nothing: at worst a replayed message exists twice.

use crate::{UsageError, ui};
use anyhow::Context;
use backstop::publish::ConfirmedPublisher;
use backstop::retry::{self, header_str, header_u64};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use lapin::BasicProperties;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

/// `backstop dlq ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DlqCommand {
    /// Show messages with their failure headers; every message stays.
    List {
        /// The dead-letter queue, for example `orders.dlq`.
        queue: String,
        /// Show at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: ui::BrokerArgs,
    },
    /// Send messages back to the queue each failed in, through the default
    /// exchange (or to --to), each confirmed before it leaves the DLQ.
    Replay {
        /// The dead-letter queue.
        queue: String,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// `EXCHANGE:ROUTING_KEY` to send to instead of the queue each message
        /// failed in (a deliberate re-route); `:orders` is the default exchange.
        #[arg(long, value_name = "EXCHANGE:ROUTING_KEY")]
        to: Option<String>,
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
        #[command(flatten)]
        broker: ui::BrokerArgs,
    },
}

pub(crate) async fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List {
            queue,
            limit,
            json,
            broker,
        } => list(&broker, &queue, limit, json).await,
        DlqCommand::Replay {
            queue,
            limit,
            to,
            broker,
        } => {
            let to = to.map(|t| parse_destination(&t)).transpose()?;
            replay(&broker, &queue, limit, to).await
        }
        DlqCommand::Purge {
            queue,
            older_than,
            broker,
        } => purge(&broker, &queue, older_than).await,
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

/// An open channel on the DLQ, with its depth when opened.
struct Dlq {
    supervisor: backstop::connection::ConnectionSupervisor,
    channel: lapin::Channel,
    queue: String,
    depth: u64,
}

impl Dlq {
    async fn open(broker: &ui::BrokerArgs, queue: &str, name: &str) -> anyhow::Result<Self> {
        let uri = broker.resolve()?;
        let supervisor = broker.direct_supervisor(name)?;
        let live = supervisor.connection().await?;
        let channel = live.create_channel().await?;
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
                    backstop::RedactedUri::new(&uri)
                ))
                .into());
            }
            Err(e) => return Err(e).context(format!("checking queue {queue:?}")),
        };
        Ok(Dlq {
            supervisor,
            channel,
            queue: queue.to_owned(),
            depth,
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

    /// Closes the channel: the broker requeues everything left unacked.
    async fn close(self) {
        let _ = self.channel.close(200, "backstop dlq done".into()).await;
        self.supervisor.close().await;
    }
}

/// What `dlq list` shows of one message.
#[derive(Debug, Serialize)]
struct Listed {
    message_id: Option<String>,
    error: Option<String>,
    error_kind: Option<String>,
    attempts: Option<u64>,
    original_exchange: Option<String>,
    original_routing_key: Option<String>,
    original_queue: Option<String>,
    first_failure: Option<String>,
    dead_lettered_at: Option<String>,
    redelivered: bool,
    body_bytes: usize,
    body: String,
}

fn headers_of(properties: &BasicProperties) -> FieldTable {
    properties.headers().clone().unwrap_or_default()
}

fn text(headers: &FieldTable, key: &str) -> Option<String> {
    headers.inner().get(key).and_then(header_str)
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

fn describe(message: &BasicGetMessage) -> Listed {
    let headers = headers_of(&message.delivery.properties);
    let number = |k: &str| headers.inner().get(k).and_then(header_u64);
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
        body_bytes: message.delivery.data.len(),
        body: String::from_utf8_lossy(&message.delivery.data).into_owned(),
    }
}

async fn list(
    broker: &ui::BrokerArgs,
    queue: &str,
    limit: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dlq = Dlq::open(broker, queue, "backstop-dlq-list").await?;
    let wanted = limit.unwrap_or(dlq.depth).min(dlq.depth);
    let mut listed = Vec::new();
    while (listed.len() as u64) < wanted {
        let Some(message) = dlq.get().await? else {
            break;
        };
        listed.push(describe(&message));
    }
    let depth = dlq.depth;
    dlq.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
    } else {
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header([
                "message id",
                "kind",
                "attempts",
                "error",
                "from",
                "failed in",
                "dead-lettered",
                "bytes",
            ]);
        for m in &listed {
            let from = match (&m.original_exchange, &m.original_routing_key) {
                (Some(e), Some(k)) => format!("{e}:{k}"),
                _ => "-".to_owned(),
            };
            table.add_row([
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
    eprintln!("listed={} kept={depth}", listed.len());
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

async fn replay(
    broker: &ui::BrokerArgs,
    queue: &str,
    limit: Option<u64>,
    to: Option<(String, String)>,
) -> anyhow::Result<ExitCode> {
    let dlq = Dlq::open(broker, queue, "backstop-dlq-replay").await?;
    let publisher = ConfirmedPublisher::new(dlq.channel.clone()).await?;
    let wanted = limit.unwrap_or(dlq.depth).min(dlq.depth);
    let bar = ui::progress(wanted, "replayed");
    let (mut moved, mut failed, mut seen) = (0u64, 0u64, 0u64);
    while seen < wanted {
        let Some(message) = dlq.get().await? else {
            break;
        };
        seen += 1;
        // Straight to the queue it failed in, through the default exchange:
        // going back through the original exchange would hand a copy to
        // every other queue bound there, which already had the message.
        let destination = to.clone().or_else(|| {
            failed_in(&headers_of(&message.delivery.properties)).map(|q| (String::new(), q))
        });
        let Some((exchange, routing_key)) = destination else {
            bar.println(format!(
                "kept {:?}: no original queue recorded; use --to EXCHANGE:ROUTING_KEY",
                describe(&message).message_id
            ));
            failed += 1;
            continue;
        };
        let properties = replay_properties(&message.delivery.properties);
        match publisher
            .publish(&exchange, &routing_key, &message.delivery.data, properties)
            .await
        {
            Ok(()) => {
                dlq.channel
                    .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
                    .await
                    .context("acking a replayed message (it was already re-published)")?;
                moved += 1;
                bar.set_position(moved);
            }
            Err(e) => {
                bar.println(format!("kept a message: {e}"));
                failed += 1;
            }
        }
    }
    bar.finish_and_clear();
    let depth = dlq.depth;
    dlq.close().await;
    println!(
        "moved={moved} kept={} failed={failed}",
        depth.saturating_sub(moved)
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn purge(
    broker: &ui::BrokerArgs,
    queue: &str,
    older_than: Duration,
) -> anyhow::Result<ExitCode> {
    let dlq = Dlq::open(broker, queue, "backstop-dlq-purge").await?;
    let cutoff = retry::now_ms().saturating_sub(older_than.as_millis() as u64);
    let bar = ui::progress(dlq.depth, "checked");
    let (mut purged, mut kept, mut undated) = (0u64, 0u64, 0u64);
    for _ in 0..dlq.depth {
        let Some(message) = dlq.get().await? else {
            break;
        };
        let headers = headers_of(&message.delivery.properties);
        match dead_lettered_ms(&headers) {
            Some(at) if at < cutoff => {
                dlq.channel
                    .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
                    .await
                    .context("removing a message")?;
                purged += 1;
            }
            Some(_) => kept += 1,
            None => {
                undated += 1;
                kept += 1;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    dlq.close().await;
    println!("purged={purged} kept={kept} undated={undated}");
    Ok(ExitCode::SUCCESS)
}
