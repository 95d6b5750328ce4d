//! The broker's view of the subscription: whether the broker still counts
//! the consumer on its queue.
//!
//! A session believes it is subscribed from `basic.consume-ok` until the
//! broker cancels it or the channel fails. The broker can lose a consumer
//! without telling the channel, and then nothing arrives while every local
//! sign says "consuming". So while a session consumes, a passive
//! `queue.declare` of its queue reads the broker's `consumer_count`, on a
//! channel of its own: a queue that does not exist closes the channel it was
//! declared on (AMQP's rule), which must never be the consuming one.
//!
//! One reading is one round trip every [`DEFAULT_BROKER_CHECK_EVERY`] (or
//! [`ConsumerConfig::broker_check_every`](super::ConsumerConfig::broker_check_every)),
//! run beside the session's other work, never in its way.

use crate::connection::{CHANNEL_TIMEOUT, LiveConnection, describe, is_not_found};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// The default [`ConsumerConfig::broker_check_every`](super::ConsumerConfig::broker_check_every): 5 s.
pub const DEFAULT_BROKER_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How soon a reading that did not count the consumer is taken again, to
/// confirm it before acting; and how soon the session that follows a loss
/// takes its first reading, to see the broker count the new subscription.
pub(super) const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// The subscriptions a session holds on its queue: one.
pub(super) const HELD: u32 = 1;

/// What one passive declare said.
#[derive(Debug)]
pub(super) enum Reading {
    /// The broker counts `consumers` on the queue (ours and any other
    /// instance's), with `ready` messages waiting.
    Consumers {
        /// `consumer_count`.
        consumers: u32,
        /// `message_count`: ready messages.
        ready: u32,
    },
    /// The queue does not exist (`NOT_FOUND`).
    Missing,
    /// No answer: the channel would not open, the declare failed otherwise
    /// or timed out. Says nothing about the subscription.
    Unknown(String),
}

/// A reading under way, with the check channel it hands back (`None` when
/// the channel is closed or unusable: the next reading opens another).
type Pending = Pin<Box<dyn Future<Output = (Option<lapin::Channel>, Reading)> + Send>>;

/// The check of one session.
pub(super) struct BrokerCheck {
    live: LiveConnection,
    queue: String,
    every: Duration,
    /// The check channel between readings.
    channel: Option<lapin::Channel>,
    /// The next reading: a wait, then the declare. Polled by the session's
    /// pump, so it lives across its iterations.
    pub(super) pending: Option<Pending>,
    /// Readings in a row that did not count the consumer.
    pub(super) short: u32,
    /// Deliveries the session received; a short reading taken while
    /// deliveries still arrive is not believed.
    pub(super) received: u64,
    /// `received` when the previous reading came back.
    received_before: u64,
    /// Readings in a row that got no answer.
    pub(super) unanswered: u32,
}

impl BrokerCheck {
    /// The check of a session consuming `queue` on `live`, reading every
    /// `every`; the first reading comes after `first`.
    pub(super) fn new(
        live: LiveConnection,
        queue: String,
        every: Duration,
        first: Duration,
    ) -> Self {
        let mut check = BrokerCheck {
            live,
            queue,
            every,
            channel: None,
            pending: None,
            short: 0,
            received: 0,
            received_before: 0,
            unanswered: 0,
        };
        check.schedule(first);
        check
    }

    /// The regular interval between readings.
    pub(super) fn every(&self) -> Duration {
        self.every
    }

    /// A reading came back with the check channel (if it is still usable).
    pub(super) fn returned(&mut self, channel: Option<lapin::Channel>) {
        self.pending = None;
        self.channel = channel;
    }

    /// Whether a delivery arrived since the previous reading came back:
    /// the broker still delivers to this subscription. Marks the reading
    /// that just came back as the previous one.
    pub(super) fn delivered_since(&mut self) -> bool {
        let delivered = self.received != self.received_before;
        self.received_before = self.received;
        delivered
    }

    /// Takes the next reading `after` from now.
    pub(super) fn schedule(&mut self, after: Duration) {
        let channel = self.channel.take();
        self.pending = Some(Box::pin(read(
            self.live.clone(),
            channel,
            self.queue.clone(),
            after,
        )));
    }

    /// The check channel, to close with the session. A reading under way
    /// holds it: it is dropped with the reading, and lapin closes a channel
    /// when its last handle goes.
    pub(super) fn take_channel(&mut self) -> Option<lapin::Channel> {
        self.pending = None;
        self.channel.take()
    }
}

/// Waits `after`, then reads the broker's consumer count for `queue`.
async fn read(
    live: LiveConnection,
    channel: Option<lapin::Channel>,
    queue: String,
    after: Duration,
) -> (Option<lapin::Channel>, Reading) {
    tokio::time::sleep(after).await;
    let channel = match channel.filter(|c| c.status().connected()) {
        Some(channel) => channel,
        None => match live.create_channel().await {
            Ok(channel) => channel,
            Err(e) => return (None, Reading::Unknown(format!("check channel: {e}"))),
        },
    };
    let declare = channel.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    );
    match tokio::time::timeout(CHANNEL_TIMEOUT, declare).await {
        Ok(Ok(declared)) => (
            Some(channel),
            Reading::Consumers {
                consumers: declared.consumer_count(),
                ready: declared.message_count(),
            },
        ),
        Ok(Err(e)) if is_not_found(&e) => (None, Reading::Missing),
        Ok(Err(e)) => (None, Reading::Unknown(describe(&e))),
        // The channel still owes the answer: it is dropped, and closed.
        Err(_) => (
            None,
            Reading::Unknown(format!(
                "no answer to a passive queue.declare within {CHANNEL_TIMEOUT:?}"
            )),
        ),
    }
}
