//! `backstop publish`: an operator publishes one `--body`, or each line of
//! a file or of stdin, to an exchange and routing key, with confirms.
//!
//! Lines are split on `\n`, one trailing `\r` is stripped (CRLF files), and
//! empty lines are skipped; anything else is published as-is, bytes that
//! are not UTF-8 included. Lines are read as they come and published in
//! pipelined batches ([`Publisher::publish_batch`]) of what has arrived, so
//! a pipe is published while it flows. Every message is persistent,
//! `mandatory` and confirmed; a message no queue takes counts as failed.
//! With `--spool PATH`, a message the broker cannot take now goes to the
//! spool file instead and is sent once it can.
//!
//! The command ends with one summary line,
//! `publish: 1000 confirmed, 0 spooled, 0 failed`, and exits 1 when any
//! message failed, 2 on bad usage (an exchange that does not exist).

use crate::{UsageError, ui};
use anyhow::Context;
use backstop::publish::{DEFAULT_PUBLISH_TIMEOUT, Message, Published, Publisher};
use lapin::BasicProperties;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::mpsc;

/// Options of `backstop publish`.
#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// The exchange; the default exchange ("") when not given.
    #[arg(long, short = 'e', default_value = "")]
    exchange: String,
    /// The routing key (for the default exchange: the queue).
    #[arg(long, short = 'k')]
    routing_key: String,
    /// Publish this one message.
    #[arg(long, conflicts_with = "file")]
    body: Option<String>,
    /// Publish each line of this file (without --body or --file: each line
    /// of stdin).
    #[arg(long, short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// The content type of every message.
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,
    /// A header for every message, `NAME=VALUE` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// A spool file (SQLite): messages the broker cannot take now are
    /// written there and sent once it can.
    #[arg(long, value_name = "PATH")]
    spool: Option<PathBuf>,
    /// With --spool: how long to wait at the end for the spool to empty.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// How long each message may wait for its confirm.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    confirm_timeout: Option<Duration>,
    /// The most messages pipelined in one batch.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    batch: u16,
    #[command(flatten)]
    broker: ui::BrokerArgs,
}

/// How many failures are shown one by one.
const SHOWN_FAILURES: usize = 10;

/// Where the messages come from.
enum Input {
    Body(String),
    File(PathBuf),
    Stdin,
}

impl PublishArgs {
    fn input(&self) -> Input {
        match (&self.body, &self.file) {
            (Some(body), _) => Input::Body(body.clone()),
            (None, Some(file)) => Input::File(file.clone()),
            (None, None) => Input::Stdin,
        }
    }

    /// The properties every message gets: the content type and headers.
    fn properties(&self) -> anyhow::Result<BasicProperties> {
        let mut properties = BasicProperties::default();
        if let Some(content_type) = &self.content_type {
            short("--content-type", content_type)?;
            properties = properties.with_content_type(content_type.as_str().into());
        }
        let mut table = FieldTable::default();
        for header in &self.headers {
            let (name, value) = header
                .split_once('=')
                .ok_or_else(|| UsageError(format!("--header {header:?}: expected NAME=VALUE")))?;
            short("a --header name", name)?;
            table.insert(name.into(), AMQPValue::LongString(value.into()));
        }
        if !table.inner().is_empty() {
            properties = properties.with_headers(table);
        }
        Ok(properties)
    }
}

/// Checks that `value` fits an AMQP short string (255 bytes).
fn short(what: &str, value: &str) -> Result<(), UsageError> {
    if value.len() > 255 {
        return Err(UsageError(format!(
            "{what} is {} bytes long; AMQP allows 255",
            value.len()
        )));
    }
    Ok(())
}

/// The messages of `reader`: `(line number, content)` for each non-empty
/// line, split on `\n`, one trailing `\r` stripped.
fn lines(reader: impl BufRead) -> impl Iterator<Item = std::io::Result<(u64, Vec<u8>)>> {
    reader
        .split(b'\n')
        .enumerate()
        .filter_map(|(n, line)| match line {
            Err(e) => Some(Err(e)),
            Ok(mut line) => {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                (!line.is_empty()).then_some(Ok((n as u64 + 1, line)))
            }
        })
}

/// Reads `input` on a thread of its own, one message at a time, into a
/// bounded channel: a slow broker holds the reader back.
fn read(input: Input, capacity: usize) -> mpsc::Receiver<anyhow::Result<(u64, Vec<u8>)>> {
    let (tx, rx) = mpsc::channel(capacity);
    std::thread::spawn(move || {
        let send_all = |reader: &mut dyn BufRead, origin: &str| {
            for line in lines(reader) {
                let line = line.with_context(|| format!("reading {origin}"));
                let failed = line.is_err();
                if tx.blocking_send(line).is_err() || failed {
                    return;
                }
            }
        };
        match input {
            Input::Body(body) => {
                let _ = tx.blocking_send(Ok((1, body.into_bytes())));
            }
            Input::File(path) => match std::fs::File::open(&path) {
                Ok(file) => send_all(
                    &mut std::io::BufReader::new(file),
                    &path.display().to_string(),
                ),
                Err(e) => {
                    let _ = tx.blocking_send(Err(UsageError(format!(
                        "cannot open {}: {e}",
                        path.display()
                    ))
                    .into()));
                }
            },
            Input::Stdin => send_all(&mut std::io::stdin().lock(), "stdin"),
        }
    });
    rx
}

/// The messages to expect from `input`, for the progress bar: counted
/// ahead for a file, unknown (`None`) for stdin.
fn expected(input: &Input) -> Option<u64> {
    match input {
        Input::Body(_) => Some(1),
        Input::File(path) => {
            let file = std::fs::File::open(path).ok()?;
            Some(lines(std::io::BufReader::new(file)).count() as u64)
        }
        Input::Stdin => None,
    }
}

/// Checks that `exchange` exists, when the broker can be reached: a typo
/// would otherwise fail every message. Without a spool, a broker that
/// cannot be reached is an error; with one, the messages go to the spool.
async fn check_exchange(
    publisher: &Publisher,
    exchange: &str,
    shown_uri: &str,
    spooling: bool,
) -> anyhow::Result<()> {
    let live = match publisher.supervisor().connection().await {
        Ok(live) => live,
        Err(e) if spooling => {
            eprintln!("publish: the broker is not reachable ({e}); messages go to the spool");
            return Ok(());
        }
        Err(e) => return Err(e).context(format!("connecting to {shown_uri}")),
    };
    if exchange.is_empty() {
        return Ok(());
    }
    let channel = live.create_channel().await.context("opening a channel")?;
    let declared = channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "exchange checked".into()).await;
            Ok(())
        }
        Err(e) if backstop::connection::is_not_found(&e) => Err(UsageError(format!(
            "exchange {exchange:?} does not exist on {shown_uri}"
        ))
        .into()),
        Err(e) => Err(e).context(format!("checking exchange {exchange:?}")),
    }
}

/// What became of the messages.
#[derive(Debug, Default)]
struct Tally {
    confirmed: u64,
    spooled: u64,
    failed: u64,
    /// The first failures, `line N: reason`.
    shown: Vec<String>,
}

/// `backstop publish`.
pub(crate) async fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    short("--exchange", &args.exchange)?;
    short("--routing-key", &args.routing_key)?;
    let properties = args.properties()?;
    let config = args.broker.config()?;
    let shown_uri =
        backstop::RedactedUri::new(config.broker.uri.as_deref().unwrap_or_default()).to_string();
    let mut builder = Publisher::builder(ui::direct_connection(&config, "backstop-publish")?)
        .channels(1)
        .confirm_timeout(args.confirm_timeout.unwrap_or(DEFAULT_PUBLISH_TIMEOUT));
    if let Some(spool) = &args.spool {
        builder = builder.spool(spool);
    }
    let publisher = builder.start().await.context("starting the publisher")?;
    let checked =
        check_exchange(&publisher, &args.exchange, &shown_uri, args.spool.is_some()).await;
    if let Err(e) = checked {
        publisher.close().await;
        return Err(e);
    }

    let input = args.input();
    if matches!(input, Input::Stdin) && std::io::stdin().is_terminal() {
        eprintln!("publish: reading messages from stdin, one per line; end with Ctrl-D");
    }
    let known = expected(&input);
    let bar = ui::progress(known.unwrap_or(0), "published");
    let batch = usize::from(args.batch);
    let mut lines = read(input, batch * 2);
    let mut tally = Tally::default();
    let mut failure = None;
    'read: while let Some(first) = lines.recv().await {
        let mut chunk = vec![first];
        while chunk.len() < batch {
            match lines.try_recv() {
                Ok(line) => chunk.push(line),
                Err(_) => break,
            }
        }
        let mut numbers = Vec::with_capacity(chunk.len());
        let mut messages = Vec::with_capacity(chunk.len());
        for line in chunk {
            match line {
                Ok((number, body)) => {
                    numbers.push(number);
                    messages.push(
                        Message::new(args.exchange.as_str(), args.routing_key.as_str(), body)
                            .with_properties(properties.clone()),
                    );
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if known.is_none() {
            bar.inc_length(messages.len() as u64);
        }
        let results = publisher.publish_batch(messages).await;
        for (number, result) in numbers.into_iter().zip(results) {
            match result {
                Ok(Published::Confirmed { .. }) => tally.confirmed += 1,
                Ok(Published::Spooled { .. }) => tally.spooled += 1,
                Err(e) => {
                    tally.failed += 1;
                    if tally.shown.len() < SHOWN_FAILURES {
                        tally.shown.push(format!("line {number}: {e}"));
                    }
                }
            }
            bar.inc(1);
        }
        if failure.is_some() {
            break 'read;
        }
    }
    bar.finish_and_clear();
    let left = if tally.spooled > 0 && !publisher.drained(args.drain_timeout).await {
        Some(publisher.stats().spool_messages)
    } else {
        None
    };
    publisher.close().await;

    for line in &tally.shown {
        eprintln!("publish: failed: {line}");
    }
    if tally.failed > tally.shown.len() as u64 {
        eprintln!(
            "publish: ... and {} more failures",
            tally.failed - tally.shown.len() as u64
        );
    }
    if let (Some(left), Some(spool)) = (left, &args.spool) {
        eprintln!(
            "publish: {left} message(s) still in the spool {}: the next publisher on it \
             (backstop publish --spool {0}) sends them",
            spool.display()
        );
    }
    println!(
        "publish: {} confirmed, {} spooled, {} failed",
        tally.confirmed, tally.spooled, tally.failed
    );
    if let Some(e) = failure {
        return Err(e);
    }
    // Messages left in the spool are not published yet: not a success.
    Ok(if tally.failed == 0 && left.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_on_newlines_binary_safe() {
        let input: &[u8] = b"one\r\ntwo\n\n\xff\xfe bytes\nlast";
        let got: Vec<(u64, Vec<u8>)> = lines(input).map(|l| l.expect("read")).collect();
        assert_eq!(
            got,
            vec![
                (1, b"one".to_vec()),
                (2, b"two".to_vec()),
                (4, b"\xff\xfe bytes".to_vec()),
                (5, b"last".to_vec()),
            ]
        );
        assert_eq!(lines(&b"a\n"[..]).count(), 1);
        assert_eq!(lines(&b""[..]).count(), 0);
    }
}
