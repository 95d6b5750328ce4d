//! The retry policy: decides what happens to a failed delivery; the consumer
//! carries it out (the tower `Policy` split between deciding and doing).
//!
//! A transient failure is first retried in process (`immediate` times, with a
//! short backoff), then through broker-side delay tiers: one durable queue per
//! configured delay, `<queue>.retry.<delay>`, whose `x-message-ttl` holds the
//! copy for that long before it dead-letters back to `<queue>`. When the tiers
//! are used up (or the failure is permanent) the message is *exhausted*: it
//! goes to the parking lot `<queue>.dlq` with failure metadata headers, or to
//! the compensation store.
//!
//! Every copy is published with a confirm before the original is acked. The
//! attempt number travels in the `x-backstop-attempt` header (the broker's own
//! `x-death` cannot be set by clients).
//!
//! # The hop back from a tier
//!
//! When a tier's TTL runs out, the *broker* dead-letters the copy back to
//! `<queue>`, without a confirm to anyone. The tiers (and `<queue>.dlq`)
//! follow the type of the main queue ([`RetryPolicy::topology`]):
//!
//! - **Quorum main queue**: the tiers are quorum queues with
//!   `x-dead-letter-strategy=at-least-once` (and the `x-overflow=reject-publish`
//!   it requires, RabbitMQ 3.10 or later). The broker keeps an expired copy
//!   until `<queue>` has confirmed it, retrying a refusal (queue missing,
//!   without a majority, at a `reject-publish` length limit) every
//!   `dead_letter_worker_publisher_confirm_timeout` (3 minutes by default).
//! - **Classic main queue**: the tiers are classic queues, whose
//!   dead-lettering is *at most once*: if `<queue>` does not exist at that
//!   moment, refuses the copy (`x-max-length` with `x-overflow=reject-publish`)
//!   or its node fails, the copy is gone, after the original was acked on the
//!   strength of the tier's confirm. What closes it is the main queue's type:
//!   declare it as a quorum queue (`Queue::quorum`, `queue_type = "quorum"` in
//!   `backstop run`), and its tiers become quorum queues too. Short of that,
//!   give a classic main queue no `reject-publish` length limit.
//!
//! The tiers keep their names whatever their type. RabbitMQ refuses to
//! redeclare an existing queue with other arguments (`PRECONDITION_FAILED
//! inequivalent arg 'x-queue-type'`): after switching a main queue to quorum
//! (or upgrading from a version with classic tiers), wait until the old tier
//! queues are empty and delete them (`rabbitmqctl delete_queue
//! <queue>.retry.<delay>`), or consume under a new queue name. The same holds
//! for `<queue>.dlq`: an old classic one that still parks messages is kept as
//! it is by declaring it first in the consumer's own topology
//! (`Queue::classic("orders.dlq")` before `Queue::quorum("orders")`: the
//! first declaration of a name wins), or is emptied with `backstop dlq
//! replay` and deleted.
//!
//! ```
//! use backstop::retry::RetryPolicy;
//! use std::time::Duration;
//!
//! let policy = RetryPolicy::new()
//!     .immediate(1, Duration::from_millis(50))
//!     .delays([Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)]);
//! assert_eq!(
//!     policy.tier_queues("orders"),
//!     ["orders.retry.1s", "orders.retry.10s", "orders.retry.1m"]
//! );
//! ```

use crate::handler::{Delivery, FailureKind};
use crate::topology::{Queue, QueueType, Topology};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The delivery attempt, 1 for the original delivery.
pub const ATTEMPT_HEADER: &str = "x-backstop-attempt";
/// The error text of the last failure, truncated to [`MAX_ERROR_LEN`] bytes.
pub const ERROR_HEADER: &str = "x-backstop-error";
/// `transient` or `permanent`.
pub const ERROR_KIND_HEADER: &str = "x-backstop-error-kind";
/// How many deliveries were attempted in all.
pub const ATTEMPTS_HEADER: &str = "x-backstop-attempts";
/// The exchange the message was first published to.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-backstop-original-exchange";
/// The routing key it was first published with.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-backstop-original-routing-key";
/// The queue it failed in.
pub const ORIGINAL_QUEUE_HEADER: &str = "x-backstop-original-queue";
/// When it first failed, in milliseconds since the Unix epoch.
pub const FIRST_FAILURE_HEADER: &str = "x-backstop-first-failure-ms";
/// When it last failed (and was dead-lettered), in milliseconds since the Unix epoch.
pub const LAST_FAILURE_HEADER: &str = "x-backstop-last-failure-ms";
/// The per-message TTL (`expiration` property) the original carried. Copies
/// never carry `expiration` itself: a retry, dead-letter or replay copy that
/// expired out of its queue after the original was acked would be lost.
/// RabbitMQ's own dead-lettering strips it for the same reason.
pub const ORIGINAL_EXPIRATION_HEADER: &str = "x-backstop-original-expiration";

/// Headers the broker maintains about a message's past, dropped from every
/// copy: a copy is a new message.
const BROKER_HISTORY_HEADERS: &[&str] = &[
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// The longest error text carried in a header.
pub const MAX_ERROR_LEN: usize = 1024;

/// Where an exhausted message goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Exhausted {
    /// To `<queue>.dlq`, published with a confirm.
    #[default]
    DeadLetter,
    /// To the compensation store (the local message table), committed before
    /// the ack. Needs a store configured on the consumer.
    Store,
}

/// How failures are retried. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RetryPolicy {
    immediate: u32,
    immediate_backoff: Duration,
    delays: Vec<Duration>,
    exhausted: Exhausted,
}

/// What the policy decided for a failed delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Publish a copy to this tier queue, then ack.
    RetryIn {
        /// The tier's delay.
        delay: Duration,
        /// The tier queue's name.
        queue: String,
    },
    /// Publish a copy to `<queue>.dlq`, then ack.
    DeadLetter,
    /// Hand the message to the compensation store, then ack.
    Store,
}

impl RetryPolicy {
    /// No retries: every failure is exhausted at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Retry a transient failure `attempts` more times in process, waiting
    /// `backoff` before each, before any delayed retry.
    pub fn immediate(mut self, attempts: u32, backoff: Duration) -> Self {
        self.immediate = attempts;
        self.immediate_backoff = backoff;
        self
    }

    /// The delayed retry tiers, in the order they are used. Each becomes a
    /// durable queue `<queue>.retry.<delay>`. Duplicates are removed.
    pub fn delays(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        let mut delays: Vec<Duration> = delays.into_iter().collect();
        let mut seen = Vec::new();
        delays.retain(|d| {
            let new = !seen.contains(d);
            seen.push(*d);
            new
        });
        self.delays = delays;
        self
    }

    /// Where exhausted messages go.
    pub fn exhausted(mut self, exhausted: Exhausted) -> Self {
        self.exhausted = exhausted;
        self
    }

    /// In-process retries and their backoff.
    pub fn immediate_attempts(&self) -> (u32, Duration) {
        (self.immediate, self.immediate_backoff)
    }

    /// The configured tiers.
    pub fn tier_delays(&self) -> &[Duration] {
        &self.delays
    }

    /// Where exhausted messages go.
    pub fn exhausted_to(&self) -> Exhausted {
        self.exhausted
    }

    /// The dead-letter queue (parking lot) of `queue`.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dlq")
    }

    /// The tier queue of `queue` for `delay`.
    pub fn tier_queue(queue: &str, delay: Duration) -> String {
        format!("{queue}.retry.{}", format_delay(delay))
    }

    /// The tier queue names, in order.
    pub fn tier_queues(&self, queue: &str) -> Vec<String> {
        self.delays
            .iter()
            .map(|d| Self::tier_queue(queue, *d))
            .collect()
    }

    /// The queues this policy needs next to `queue`, a queue of
    /// `queue_type`: one tier per delay (TTL, dead-lettering back to
    /// `queue`) and the dead-letter queue, all of the main queue's type.
    /// Quorum tiers dead-letter at least once; see the module documentation.
    pub fn topology(&self, queue: &str, queue_type: QueueType) -> Topology {
        let mut topology = Topology::new();
        for delay in &self.delays {
            let name = Self::tier_queue(queue, *delay);
            let tier = match queue_type {
                QueueType::Classic => Queue::classic(name),
                QueueType::Quorum => Queue::quorum(name).at_least_once_dead_lettering(),
            };
            topology = topology.queue(
                tier.message_ttl(*delay)
                    .dead_letter_exchange("")
                    .dead_letter_routing_key(queue),
            );
        }
        if self.exhausted == Exhausted::DeadLetter {
            topology = topology.queue(Queue::dead_letter_queue_for(queue, queue_type));
        }
        topology
    }

    /// Decides the fate of delivery attempt `attempt` (1-based) after its
    /// in-process retries failed with `kind`. `requested` is the delay the
    /// handler asked for, if any: the nearest tier at or above it is used
    /// (the longest tier if none is that long).
    pub fn decide(
        &self,
        queue: &str,
        attempt: u32,
        kind: FailureKind,
        requested: Option<Duration>,
    ) -> Decision {
        let used = attempt.saturating_sub(1) as usize;
        if kind == FailureKind::Permanent || used >= self.delays.len() {
            return match self.exhausted {
                Exhausted::DeadLetter => Decision::DeadLetter,
                Exhausted::Store => Decision::Store,
            };
        }
        let delay = match requested {
            Some(wanted) => self
                .delays
                .iter()
                .copied()
                .filter(|d| *d >= wanted)
                .min()
                .or_else(|| self.delays.iter().copied().max())
                .unwrap_or(self.delays[used]),
            None => self.delays[used],
        };
        Decision::RetryIn {
            delay,
            queue: Self::tier_queue(queue, delay),
        }
    }
}

/// `1s`, `10s`, `1m`, `1h30m`, `250ms`: compact and safe in a queue name.
pub fn format_delay(delay: Duration) -> String {
    humantime::format_duration(delay)
        .to_string()
        .replace(' ', "")
}

/// The attempt number carried by `delivery`, 1 when it has none.
pub fn attempt_of(delivery: &Delivery) -> u32 {
    match delivery.header(ATTEMPT_HEADER) {
        Some(value) => header_u64(value).map_or(1, |n| n.clamp(1, u64::from(u32::MAX)) as u32),
        None => 1,
    }
}

/// The broker's `x-delivery-count` on `delivery`: how many times a quorum
/// queue has taken it back (requeued, or returned when a channel closed)
/// before this delivery; 0 when the header is absent (a first delivery, or
/// a classic queue, which never sets it). RabbitMQ drops or dead-letters the
/// message on a return that takes this count past `x-delivery-limit`.
pub fn delivery_count(delivery: &Delivery) -> u64 {
    delivery
        .header("x-delivery-count")
        .and_then(header_u64)
        .unwrap_or(0)
}

/// An integer header of any AMQP integer type.
pub fn header_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// A string header (long or short string, or UTF-8 bytes).
pub fn header_str(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        _ => None,
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A failed delivery with what is known about its failure: the input of a
/// retry copy, a dead-letter copy or a compensation-store row.
#[derive(Clone, Debug)]
pub struct FailedMessage {
    /// The queue it failed in.
    pub queue: String,
    /// The delivery attempt that failed (1-based).
    pub attempt: u32,
    /// Transient or permanent.
    pub kind: FailureKind,
    /// The error text, untruncated.
    pub error: String,
    /// Where it was first published: exchange.
    pub original_exchange: String,
    /// Where it was first published: routing key.
    pub original_routing_key: String,
    /// First failure, ms since the epoch.
    pub first_failure_ms: u64,
    /// This failure, ms since the epoch.
    pub last_failure_ms: u64,
}

impl FailedMessage {
    /// Gathers the failure of `delivery` in `queue`, carrying over what
    /// earlier attempts recorded in its headers.
    pub fn new(queue: &str, delivery: &Delivery, kind: FailureKind, error: &str) -> Self {
        let now = now_ms();
        let text = |name| delivery.header(name).and_then(header_str);
        FailedMessage {
            queue: queue.to_owned(),
            attempt: attempt_of(delivery),
            kind,
            error: error.to_owned(),
            original_exchange: text(ORIGINAL_EXCHANGE_HEADER)
                .unwrap_or_else(|| delivery.exchange().to_owned()),
            original_routing_key: text(ORIGINAL_ROUTING_KEY_HEADER)
                .unwrap_or_else(|| delivery.routing_key().to_owned()),
            first_failure_ms: delivery
                .header(FIRST_FAILURE_HEADER)
                .and_then(header_u64)
                .unwrap_or(now),
            last_failure_ms: now,
        }
    }

    fn base_headers(&self, delivery: &Delivery) -> FieldTable {
        let mut headers = delivery.properties().headers().clone().unwrap_or_default();
        let mut put = |k: &str, v: AMQPValue| {
            headers.insert(k.into(), v);
        };
        put(
            ORIGINAL_EXCHANGE_HEADER,
            long_string(&self.original_exchange),
        );
        put(
            ORIGINAL_ROUTING_KEY_HEADER,
            long_string(&self.original_routing_key),
        );
        put(ORIGINAL_QUEUE_HEADER, long_string(&self.queue));
        put(
            FIRST_FAILURE_HEADER,
            AMQPValue::LongLongInt(self.first_failure_ms as i64),
        );
        put(
            ERROR_HEADER,
            long_string(truncate(&self.error, MAX_ERROR_LEN)),
        );
        put(ERROR_KIND_HEADER, long_string(kind_name(self.kind)));
        headers
    }

    /// Properties of the copy sent to a retry tier: the next attempt number.
    pub fn retry_properties(&self, delivery: &Delivery) -> BasicProperties {
        let mut headers = self.base_headers(delivery);
        headers.insert(
            ATTEMPT_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(self.attempt) + 1),
        );
        copy_of(delivery, headers)
    }

    /// Properties of the copy sent to the dead-letter queue: the full
    /// failure metadata.
    pub fn dead_letter_properties(&self, delivery: &Delivery) -> BasicProperties {
        let mut headers = self.base_headers(delivery);
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(self.attempt)),
        );
        headers.insert(
            LAST_FAILURE_HEADER.into(),
            AMQPValue::LongLongInt(self.last_failure_ms as i64),
        );
        copy_of(delivery, headers)
    }
}

/// `headers` without Backstop's own `x-backstop-*` failure entries: what a
/// message is sent with when it starts over (a DLQ replay, a store re-drive).
/// [`ORIGINAL_EXPIRATION_HEADER`] stays: it describes the original message,
/// not a failure.
pub fn without_backstop_headers(headers: &FieldTable) -> FieldTable {
    let mut kept = FieldTable::default();
    for (key, value) in headers.inner() {
        let key_str = key.as_str();
        if !key_str.starts_with("x-backstop-") || key_str == ORIGINAL_EXPIRATION_HEADER {
            kept.insert(key.clone(), value.clone());
        }
    }
    kept
}

/// `transient` or `permanent`.
pub fn kind_name(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Transient => "transient",
        FailureKind::Permanent => "permanent",
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// True for the headers the broker writes about a message's past
/// (`x-death`, `x-delivery-count`, ...), which no copy carries.
pub fn is_broker_history_header(name: &str) -> bool {
    BROKER_HISTORY_HEADERS.contains(&name)
}

/// The delivery's properties with `headers`, as a copy: see [`copy_properties`].
fn copy_of(delivery: &Delivery, headers: FieldTable) -> BasicProperties {
    copy_properties(delivery.properties(), headers)
}

/// The properties of a copy of a message (retry, dead-letter, store
/// re-drive, replay) that carried `properties`, sent with `headers`:
/// - always persistent;
/// - no `expiration`: the original's value moves to
///   [`ORIGINAL_EXPIRATION_HEADER`] (an earlier copy's header is kept);
/// - none of the broker's history headers (`x-death`, `x-delivery-count`,
///   `x-first-death-*`, `x-last-death-*`).
pub fn copy_properties(properties: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut kept = FieldTable::default();
    for (key, value) in headers.inner() {
        if !BROKER_HISTORY_HEADERS.contains(&key.as_str()) {
            kept.insert(key.clone(), value.clone());
        }
    }
    if let Some(expiration) = properties.expiration() {
        kept.insert(
            ORIGINAL_EXPIRATION_HEADER.into(),
            long_string(expiration.as_str()),
        );
    }
    let mut copy = BasicProperties::default()
        .with_headers(kept)
        .with_delivery_mode(2);
    if let Some(v) = properties.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = properties.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = properties.priority() {
        copy = copy.with_priority(*v);
    }
    if let Some(v) = properties.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = properties.reply_to() {
        copy = copy.with_reply_to(v.clone());
    }
    if let Some(v) = properties.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = properties.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = properties.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = properties.user_id() {
        copy = copy.with_user_id(v.clone());
    }
    if let Some(v) = properties.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    if let Some(v) = properties.cluster_id() {
        copy = copy.with_cluster_id(v.clone());
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::new().delays([secs(1), secs(10), secs(60)])
    }

    #[test]
    fn tiers_are_used_in_order_then_the_message_is_exhausted() {
        let p = policy();
        let d = |attempt| p.decide("q", attempt, FailureKind::Transient, None);
        assert_eq!(
            d(1),
            Decision::RetryIn {
                delay: secs(1),
                queue: "q.retry.1s".into()
            }
        );
        assert_eq!(
            d(3),
            Decision::RetryIn {
                delay: secs(60),
                queue: "q.retry.1m".into()
            }
        );
        assert_eq!(d(4), Decision::DeadLetter);
        let store = policy().exhausted(Exhausted::Store);
        assert_eq!(
            store.decide("q", 4, FailureKind::Transient, None),
            Decision::Store
        );
    }

    #[test]
    fn permanent_failures_skip_the_tiers() {
        assert_eq!(
            policy().decide("q", 1, FailureKind::Permanent, None),
            Decision::DeadLetter
        );
    }

    #[test]
    fn a_requested_delay_picks_the_nearest_tier_at_or_above_it() {
        let p = policy();
        let tier = |wanted| match p.decide("q", 1, FailureKind::Transient, Some(wanted)) {
            Decision::RetryIn { delay, .. } => delay,
            other => panic!("{other:?}"),
        };
        assert_eq!(tier(Duration::from_millis(10)), secs(1));
        assert_eq!(tier(secs(1)), secs(1));
        assert_eq!(tier(secs(2)), secs(10));
        assert_eq!(tier(secs(3600)), secs(60));
    }

    #[test]
    fn tier_names_are_compact() {
        assert_eq!(format_delay(Duration::from_millis(250)), "250ms");
        assert_eq!(format_delay(secs(90)), "1m30s");
        assert_eq!(format_delay(secs(3600)), "1h");
    }

    #[test]
    fn the_derived_topology_has_one_tier_per_delay_and_the_dlq() {
        let names: Vec<String> = policy()
            .topology("orders", QueueType::Classic)
            .queues()
            .iter()
            .map(|q| q.name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "orders.retry.1s",
                "orders.retry.10s",
                "orders.retry.1m",
                "orders.dlq"
            ]
        );
    }

    #[test]
    fn a_quorum_main_queue_gets_quorum_tiers_that_dead_letter_at_least_once() {
        let text = |q: &Queue, key: &str| match q.declared_arguments().inner().get(key) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        };
        let topology = policy().topology("orders", QueueType::Quorum);
        let queues = topology.all_queues();
        assert_eq!(
            queues.len(),
            4,
            "no parking lot for a parking lot: {queues:?}"
        );
        for tier in &queues[..3] {
            assert_eq!(tier.queue_type(), QueueType::Quorum);
            assert_eq!(
                text(tier, "x-dead-letter-strategy").as_deref(),
                Some("at-least-once")
            );
            assert_eq!(text(tier, "x-overflow").as_deref(), Some("reject-publish"));
            assert_eq!(text(tier, "x-dead-letter-exchange").as_deref(), Some(""));
            assert_eq!(
                text(tier, "x-dead-letter-routing-key").as_deref(),
                Some("orders")
            );
        }
        let dlq = &queues[3];
        assert_eq!(dlq.name(), "orders.dlq");
        assert_eq!(dlq.queue_type(), QueueType::Quorum);
        assert!(
            dlq.declared_arguments()
                .inner()
                .get("x-dead-letter-exchange")
                .is_none()
        );
        let classic = policy().topology("orders", QueueType::Classic);
        assert!(classic.all_queues().iter().all(|q| {
            q.queue_type() == QueueType::Classic
                && q.declared_arguments()
                    .inner()
                    .get("x-dead-letter-strategy")
                    .is_none()
        }));
    }

    #[test]
    fn the_delivery_count_is_read_from_any_integer_header() {
        let with = |value: Option<AMQPValue>| {
            let mut headers = FieldTable::default();
            if let Some(value) = value {
                headers.insert("x-delivery-count".into(), value);
            }
            delivery_count(&Delivery::for_test(
                "x",
                BasicProperties::default().with_headers(headers),
            ))
        };
        assert_eq!(with(None), 0);
        assert_eq!(with(Some(AMQPValue::LongInt(4))), 4);
        assert_eq!(with(Some(AMQPValue::LongLongInt(19))), 19);
    }

    #[test]
    fn failure_headers_carry_over_and_are_truncated() {
        let first = Delivery::for_test("x", BasicProperties::default());
        let failed = FailedMessage::new("q", &first, FailureKind::Transient, &"é".repeat(2000));
        let props = failed.retry_properties(&first);
        let again = Delivery::for_test("x", props);
        assert_eq!(attempt_of(&again), 2);
        let later = FailedMessage::new("q", &again, FailureKind::Permanent, "bad");
        assert_eq!(later.first_failure_ms, failed.first_failure_ms);
        let dead = Delivery::for_test("x", later.dead_letter_properties(&again));
        assert_eq!(dead.header(ATTEMPTS_HEADER).and_then(header_u64), Some(2));
        assert_eq!(
            dead.header(ERROR_KIND_HEADER)
                .and_then(header_str)
                .as_deref(),
            Some("permanent")
        );
        let long = Delivery::for_test("x", failed.dead_letter_properties(&first));
        let error = long
            .header(ERROR_HEADER)
            .and_then(header_str)
            .unwrap_or_default();
        assert!(error.len() <= MAX_ERROR_LEN && error.len() > MAX_ERROR_LEN - 4);
    }
}
