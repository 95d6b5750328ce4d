//! The consumer runtime: subscribes to a queue through the supervised
//! connection, runs at most N handlers at once, and settles every delivery
//! only after its handler is done.
//!
//! One *session* is one channel: open it, apply the topology, set the
//! prefetch, subscribe, dispatch. Anything that ends a session (the connection
//! drops, the broker cancels the consumer because the queue was deleted, a
//! channel error such as `PRECONDITION_FAILED`) leads to a new session, on the
//! same connection when it is still up and on the supervisor's next one when
//! not. The topology and the prefetch are therefore applied again every time.
//! When the broker cancels the subscription but the channel stays open, the
//! running handlers first get up to the shutdown timeout to settle on it.
//! The same happens when the broker loses the subscription without a word:
//! a passive `queue.declare` every 5 s, on a channel of its own, reads the
//! broker's consumer count and ends a session the broker no longer counts
//! (see [`ConsumerConfig::broker_check_every`]).
//!
//! The subscription is read all the time, even when every handler slot is
//! taken (deliveries then wait in the session, bounded by the prefetch), so a
//! channel error, a cancel or a lost connection ends the session at once,
//! hung handlers or not. Only the current session's handlers count against
//! the limit: those of ended sessions run out on their own, stale.
//!
//! Each session has its own *generation*. A handler that finishes after its
//! session ended carries the old generation, and its tag is dropped and
//! counted rather than acked on the new channel: the broker has already put
//! that message back and will deliver it again.
//!
//! Acks are coalesced (see `ack.rs`): one `basic.ack(multiple=true)` per
//! contiguous run of completed tags, sent when a batch is full or a few
//! milliseconds after the first unsent ack.
//!
//! ```no_run
//! use backstop::connection::{ConnectionConfig, ConnectionSupervisor};
//! use backstop::consumer::{Consumer, ConsumerConfig};
//! use backstop::handler::{handler_fn, Delivery};
//! use backstop::topology::{Queue, Topology};
//!
//! # async fn example() -> backstop::Result<()> {
//! let supervisor = ConnectionSupervisor::start(ConnectionConfig::new(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//! ))?;
//! let config = ConsumerConfig::new("orders")
//!     .topology(Topology::new().queue(Queue::quorum("orders")))
//!     .prefetch(100)
//!     .concurrency(8);
//! let handler = handler_fn(|delivery: Delivery| async move {
//!     println!("{} bytes", delivery.body().len());
//! });
//! let report = Consumer::new(supervisor.clone(), config, handler)
//!     .run_until(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! println!("handled {}", report.handled);
//! supervisor.close().await;
//! # Ok(()) }
//! ```

mod ack;
mod check;
mod held;
mod process;

pub use check::DEFAULT_BROKER_CHECK_EVERY;

use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use crate::connection::{Backoff, CHANNEL_TIMEOUT, ConnectionSupervisor, LiveConnection, describe};
use crate::dedup::DedupConfig;
use crate::error::{Error, Result};
use crate::handler::{Delivery, Handler};
use crate::publish::ConfirmedPublisher;
use crate::retry::{Exhausted, RetryPolicy};
use crate::store::CompensationStore;
use crate::topology::{Queue, QueueType, Topology};
use crate::wait_true;
use ack::AckCoalescer;
use check::{BrokerCheck, HELD, RECHECK_AFTER, Reading};
use futures_util::stream::FuturesUnordered;
use held::HeldDeliveries;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use process::{ProcessContext, Settlement, Verdict};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tracing::{debug, error, info, warn};

/// The default [`ConsumerConfig::max_message_size`]: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The broker's default `consumer_timeout`: 30 minutes (RabbitMQ 3.8.15 and
/// later). See [`ConsumerConfig::consumer_timeout`].
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The delivery limit a consumer of a quorum queue stays under when neither
/// [`ConsumerConfig::delivery_limit`] nor the queue's `x-delivery-limit` says
/// otherwise: RabbitMQ 4.0's default.
pub const DEFAULT_QUORUM_DELIVERY_LIMIT: u32 = 20;

/// How a consumer consumes.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    queue: String,
    topology: Topology,
    prefetch: u16,
    concurrency: usize,
    ack_batch: Option<usize>,
    ack_flush: Duration,
    ack_gap_timeout: Duration,
    shutdown_timeout: Duration,
    max_retry_delay: Duration,
    session_backoff: Backoff,
    retry: Option<RetryPolicy>,
    breaker: Option<BreakerConfig>,
    handler_timeout: Option<Duration>,
    consumer_timeout: Duration,
    max_message_size: usize,
    store: Option<Arc<dyn CompensationStore>>,
    store_delay: Duration,
    dedup: Option<DedupConfig>,
    delivery_limit: Option<u32>,
    queue_type: Option<QueueType>,
    publish_channels: usize,
    publish_timeout: Duration,
    broker_check_every: Duration,
    stop_on_conflict: bool,
}

impl ConsumerConfig {
    /// Consumes `queue` with the defaults: prefetch 100, concurrency 8, acks
    /// flushed after 5 ms or a quarter of the prefetch, shutdown timeout 30 s.
    pub fn new(queue: impl Into<String>) -> Self {
        ConsumerConfig {
            queue: queue.into(),
            topology: Topology::new(),
            prefetch: 100,
            concurrency: 8,
            ack_batch: None,
            ack_flush: Duration::from_millis(5),
            ack_gap_timeout: Duration::from_millis(250),
            shutdown_timeout: Duration::from_secs(30),
            max_retry_delay: Duration::from_secs(30),
            session_backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
                max_attempts: None,
            },
            retry: None,
            breaker: None,
            handler_timeout: None,
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            store: None,
            store_delay: Duration::from_secs(60),
            dedup: None,
            delivery_limit: None,
            queue_type: None,
            publish_channels: crate::publish::DEFAULT_CHANNELS,
            publish_timeout: crate::publish::DEFAULT_CONFIRM_TIMEOUT,
            broker_check_every: DEFAULT_BROKER_CHECK_EVERY,
            stop_on_conflict: false,
        }
    }

    /// Stops the consumer, with the error, when declaring the topology
    /// conflicts with what the broker has ([`Error::TopologyConflict`]: an
    /// exchange of another type, a queue with other arguments), at the
    /// first session or any later one (someone redeclared the queue while
    /// it was consumed). Default: off, a conflict is retried like any
    /// channel error, with a growing pause, until someone fixes it. The
    /// sidecar turns it on, so that a conflict is an exit with the message
    /// rather than a log line repeated forever.
    pub fn stop_on_conflict(mut self, stop: bool) -> Self {
        self.stop_on_conflict = stop;
        self
    }

    /// Everything a session declares: the configured topology, plus what
    /// the retry policy derives (its tiers and `<queue>.dlq`, of the
    /// consumed queue's type), or, without a policy, `<queue>.dlq` when the
    /// queue has no dead-letter exchange of its own. `backstop topology
    /// apply` declares the same.
    pub fn declared_topology(&self) -> Topology {
        let (queue_type, queue_dead_letters, _) = self.consumed_queue();
        let queue = &self.queue;
        let mut topology = self.topology.clone();
        match &self.retry {
            Some(policy) => topology = topology.merge(policy.topology(queue, queue_type)),
            // Rejections are parked in <queue>.dlq by Backstop itself.
            None if !queue_dead_letters => {
                topology = topology.queue(Queue::dead_letter_queue_for(queue, queue_type))
            }
            None => {}
        }
        topology
    }

    /// What the configured topology says about the consumed queue: its
    /// type, whether it dead-letters on its own, and its `x-delivery-limit`.
    fn consumed_queue(&self) -> (QueueType, bool, Option<u64>) {
        let declared = self
            .topology
            .queues()
            .iter()
            .find(|q| q.name() == self.queue.as_str());
        let queue_type = declared
            .map(Queue::queue_type)
            .or(self.queue_type)
            .unwrap_or(QueueType::Classic);
        (
            queue_type,
            declared.is_some_and(Queue::has_dead_letter_exchange),
            declared.and_then(Queue::delivery_limit_argument),
        )
    }

    /// The topology applied on every new channel, before subscribing.
    pub fn topology(mut self, topology: Topology) -> Self {
        self.topology = topology;
        self
    }

    /// The most unacknowledged deliveries the broker sends this consumer.
    /// Bounds the memory held by deliveries waiting for a handler.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// The most handlers running at once.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Send the coalesced ack as soon as this many tags are ready.
    /// Defaults to a quarter of the prefetch.
    pub fn ack_batch(mut self, batch: usize) -> Self {
        self.ack_batch = Some(batch);
        self
    }

    /// Send the coalesced ack at most this long after the first ready tag.
    pub fn ack_flush(mut self, after: Duration) -> Self {
        self.ack_flush = after;
        self
    }

    /// How long graceful shutdown waits for running handlers.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The longest in-process wait an [`Outcome::Retry`](crate::handler::Outcome::Retry) delay gets before the
    /// message is requeued.
    pub fn max_retry_delay(mut self, max: Duration) -> Self {
        self.max_retry_delay = max;
        self
    }

    /// Retries failures through delay tiers and parks exhausted messages
    /// (see [`crate::retry`]). The tier queues and `<queue>.dlq` are added to
    /// the topology, of the consumed queue's type. Without a policy, a retry
    /// requeues the message and a rejection is parked in `<queue>.dlq` (a
    /// copy with the reason, confirmed before the ack), or is a plain
    /// `basic.reject` when the topology gives the queue a dead-letter
    /// exchange of its own (`x-dead-letter-exchange`): the broker's
    /// dead-lettering then decides, at least once only for a quorum queue
    /// with `Queue::at_least_once_dead_lettering`.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// The compensation store for messages the retry policy sends to the
    /// store (`Exhausted::Store`). A row is committed before the original is
    /// acked; the scanner first re-drives it after `first_redrive`.
    pub fn compensation_store(
        mut self,
        store: Arc<dyn CompensationStore>,
        first_redrive: Duration,
    ) -> Self {
        self.store = Some(store);
        self.store_delay = first_redrive;
        self
    }

    /// The largest body handed to the handler (default 16 MiB). A larger
    /// message is not handled: it takes the exhausted path (dead-letter
    /// queue or store; without a retry policy, as a rejection: see
    /// [`retry`](Self::retry)) with the reason, and the consumer goes on.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Gives up on a handler call after `timeout`; the call counts as a
    /// transient failure, like a panic. Defaults to five sixths of the
    /// [`consumer_timeout`](Self::consumer_timeout) (25 minutes for the
    /// broker's default of 30), so a hung handler is given up on, and its
    /// message requeued by the consumer, before the broker closes the whole
    /// channel over it.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(timeout);
        self
    }

    /// The broker's `consumer_timeout` for this queue (default 30 minutes,
    /// [`DEFAULT_CONSUMER_TIMEOUT`]): how long a delivery may stay
    /// unacknowledged before the broker closes the channel with
    /// `PRECONDITION_FAILED` and requeues everything the channel held.
    ///
    /// The broker does not tell its clients this value, so say it here when
    /// it is not the default: `consumer_timeout` in `rabbitmq.conf` (in
    /// milliseconds, broker-wide), and on RabbitMQ 3.12 and later per queue
    /// with the `x-consumer-timeout` queue argument or a `consumer-timeout`
    /// policy (newer brokers also take `x-consumer-timeout` as a consumer
    /// argument).
    ///
    /// The consumer uses it twice: the handler timeout defaults to five
    /// sixths of it, and a warning naming the queue and the age is logged
    /// when a delivery has waited 80% of it for its outcome
    /// (`backstop_oldest_unacked_seconds` shows the same age). When the broker
    /// does close the channel for it, the log says so, and the consumer
    /// subscribes again.
    pub fn consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
        self
    }

    /// The handler timeout in force: the one set, or five sixths of the
    /// consumer timeout.
    fn effective_handler_timeout(&self) -> Duration {
        self.handler_timeout
            .unwrap_or(self.consumer_timeout / 6 * 5)
    }

    /// Deduplicates deliveries by business key (see [`crate::dedup`]).
    pub fn dedup(mut self, dedup: DedupConfig) -> Self {
        self.dedup = Some(dedup);
        self
    }

    /// The quorum delivery limit this consumer stays under. A quorum queue
    /// counts every return of a message (a requeue, a channel closed with
    /// the message unacked) in `x-delivery-count`, and at the limit drops it,
    /// or dead-letters it when the queue has a dead-letter exchange. A
    /// delivery whose next return would leave it at the limit is never
    /// requeued: an outcome that would requeue it (the handler asked, a
    /// retry without a policy, a failed copy or store write, a busy dedup
    /// key, the circuit breaker) takes the exhausted path instead, with the
    /// reason "delivery limit N nearly reached (x-delivery-count=M)".
    ///
    /// Default: the topology's `x-delivery-limit` for the queue, else
    /// [`DEFAULT_QUORUM_DELIVERY_LIMIT`] for a quorum queue (RabbitMQ 4.0
    /// and later apply 20 when none is set; 3.10-3.13 apply none), else none.
    /// Set it when a policy gives the queue another limit. Classic queues
    /// never set `x-delivery-count`.
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// The type of the consumed queue when the topology does not declare it
    /// (it is declared elsewhere). The retry tiers, `<queue>.dlq` and the
    /// default delivery limit follow the queue's type; a queue the topology
    /// declares has its declared type. Default: classic, so set it for a
    /// quorum queue declared elsewhere: its tiers then dead-letter at least
    /// once. A `<queue>.dlq` that exists with another shape is refused on
    /// redeclare; declare it in the topology as it is (the first
    /// declaration of a name wins).
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = Some(queue_type);
        self
    }

    /// How many confirm channels carry retry and dead-letter copies (default
    /// 4). Each carries one copy at a time, from `basic.publish` to its
    /// confirm, so that a `basic.return` is never taken for another copy's;
    /// more channels, more copies in flight.
    pub fn publish_channels(mut self, channels: usize) -> Self {
        self.publish_channels = channels;
        self
    }

    /// The bound on publishing one copy, from waiting for a channel to the
    /// broker's confirm (default 30 s). A copy not confirmed in time is a
    /// failed publish: the original is requeued, never acked.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How often the broker is asked whether it still counts this consumer
    /// on its queue (default 5 s, [`DEFAULT_BROKER_CHECK_EVERY`]).
    ///
    /// The broker can lose a consumer without telling the channel, and then
    /// nothing arrives while the consumer believes it is subscribed. So
    /// while a session consumes, every `every` a passive `queue.declare` of
    /// the queue, on a channel of its own, reads the broker's
    /// `consumer_count`: one round trip per period. A count below the
    /// subscriptions this consumer holds there (one), or a queue that no
    /// longer exists, is read again 1 s later before anything is done.
    /// Still short: the consumer is *not counted*
    /// ([`ConsumerReport::broker_counted`] is false, a warning is logged,
    /// [`ConsumerReport::broker_lost`] counts it), and its session ends as
    /// when the broker cancels it: the running handlers get the shutdown
    /// timeout to finish and settle on their own channel, the acks are
    /// flushed, the channel closes (the broker takes back what it holds),
    /// and a new session declares the topology and subscribes again. The
    /// lost subscription is not cancelled: on RabbitMQ 3.10 a
    /// `basic.cancel` of a consumer the queue has already dropped makes the
    /// queue count one consumer too few for as long as the channel holds
    /// its deliveries. The consumer is counted again once a reading counts
    /// it, the first of the new session coming 1 s after it subscribes.
    ///
    /// The limit: the broker counts every consumer of the queue, other
    /// instances' and other applications' too, and cannot say whose they
    /// are. A lost consumer is only seen when the count falls below the
    /// ones this consumer holds: while anyone else consumes the same queue,
    /// a loss of this consumer goes unseen (the count stays at or above
    /// one). A reading that fails (no answer within 10 s, a channel that
    /// would not open) says nothing and changes nothing.
    pub fn broker_check_every(mut self, every: Duration) -> Self {
        self.broker_check_every = every;
        self
    }

    /// Turns the circuit breaker on (see [`crate::breaker`]).
    pub fn circuit_breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = Some(config);
        self
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    fn validate(&self) -> Result<()> {
        if self.queue.is_empty() {
            return Err(Error::Config {
                key: "queue",
                reason: "the queue name is empty".into(),
            });
        }
        if self.prefetch == 0 {
            return Err(Error::Config {
                key: "prefetch",
                reason: "0 means unlimited to the broker; give a bound of at least 1".into(),
            });
        }
        if self.concurrency == 0 {
            return Err(Error::Config {
                key: "concurrency",
                reason: "at least one handler must be allowed to run".into(),
            });
        }
        if let Some(policy) = &self.retry
            && policy.exhausted_to() == Exhausted::Store
            && self.store.is_none()
        {
            return Err(Error::Config {
                key: "retry.exhausted",
                reason: "\"store\" needs a compensation store; set one with compensation_store()"
                    .into(),
            });
        }
        if self.consumer_timeout.is_zero() {
            return Err(Error::Config {
                key: "consumer_timeout",
                reason: "must be above zero: the broker's consumer_timeout, 30 min by default"
                    .into(),
            });
        }
        if self.handler_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::Config {
                key: "handler_timeout",
                reason: "must be above zero".into(),
            });
        }
        if let Some(breaker) = &self.breaker {
            breaker.validate()?;
        }
        if self.publish_channels == 0 {
            return Err(Error::Config {
                key: "publish_channels",
                reason: "copies need at least one channel".into(),
            });
        }
        if self.publish_timeout.is_zero() {
            return Err(Error::Config {
                key: "publish_timeout",
                reason: "a copy needs some time to be confirmed".into(),
            });
        }
        if self.broker_check_every.is_zero() {
            return Err(Error::Config {
                key: "broker_check_every",
                reason: "must be above zero (one passive queue.declare per period)".into(),
            });
        }
        Ok(())
    }
}

/// Live counters of a consumer, shared with its handle.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    delivered: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    requeued: AtomicU64,
    panics: AtomicU64,
    timeouts: AtomicU64,
    stale_tags_dropped: AtomicU64,
    ack_frames: AtomicU64,
    sessions: AtomicU64,
    session_errors: AtomicU64,
    in_flight: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    publish_failures: AtomicU64,
    stored: AtomicU64,
    store_failures: AtomicU64,
    duplicates: AtomicU64,
    subscribed: AtomicU64,
    /// 1 while the broker's checks do not count the subscription.
    uncounted: AtomicU64,
    broker_lost: AtomicU64,
    dedup_busy: AtomicU64,
    dedup_failures: AtomicU64,
    missing_keys: AtomicU64,
    oversized: AtomicU64,
    succeeded: AtomicU64,
    unacked: AtomicU64,
    /// When the oldest delivery held undecided was received, ms since the
    /// epoch; 0 when none is held.
    oldest_unacked_ms: AtomicU64,
    /// The deduplication's local table: pending operations, store health.
    dedup_local: std::sync::OnceLock<Arc<crate::dedup::local::LocalClaims>>,
    /// Since when and why the compensation store's writes fail, while they do.
    store_down: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// The compensation store's probe task runs.
    store_probing: std::sync::atomic::AtomicBool,
}

/// A snapshot of [`ConsumerStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// Deliveries received from the broker (redeliveries included).
    pub delivered: u64,
    /// Deliveries whose handler succeeded and whose ack was sent.
    pub handled: u64,
    /// Deliveries rejected as permanent failures.
    pub rejected: u64,
    /// Deliveries put back on the queue (retry, requeue, panic).
    pub requeued: u64,
    /// Handler panics caught.
    pub panics: u64,
    /// Handler calls that exceeded the handler timeout.
    pub timeouts: u64,
    /// Completions from an older channel generation, dropped unacked.
    pub stale_tags_dropped: u64,
    /// `basic.ack` frames sent (each may cover many deliveries).
    pub ack_frames: u64,
    /// Sessions (channels with a subscription) started.
    pub sessions: u64,
    /// Sessions that ended because of an error or a broker cancel.
    pub session_errors: u64,
    /// Handlers running now.
    pub in_flight: u64,
    /// Retry copies published to a delay tier (confirmed).
    pub retried: u64,
    /// Copies published to the dead-letter queue (confirmed).
    pub dead_lettered: u64,
    /// Retry or dead-letter copies the broker did not confirm; their
    /// originals were requeued, not acked.
    pub publish_failures: u64,
    /// Exhausted messages committed to the compensation store.
    pub stored: u64,
    /// Store writes that failed; their originals were requeued, not acked.
    pub store_failures: u64,
    /// Duplicates of handled messages, acked without calling the handler.
    pub duplicates: u64,
    /// True while a subscription is up (a session is consuming).
    pub subscribed: bool,
    /// False while the broker does not count this consumer's subscription:
    /// from the second reading in a row that found the broker's
    /// `consumer_count` for the queue below it (or the queue gone), through
    /// the new session that follows, until a reading counts it (see
    /// [`ConsumerConfig::broker_check_every`]). True otherwise.
    pub broker_counted: bool,
    /// Times the broker was found not counting this consumer's
    /// subscription, each ending its session for a new one.
    pub broker_lost: u64,
    /// Duplicates requeued because their key stayed claimed elsewhere for
    /// longer than the wait.
    pub dedup_busy: u64,
    /// Dedup store operations that failed.
    pub dedup_failures: u64,
    /// Deliveries without a dedup key.
    pub missing_keys: u64,
    /// Deliveries over the size limit, sent down the exhausted path unhandled.
    pub oversized: u64,
    /// Deliveries whose handler succeeded, counted as their ack is queued on
    /// their own channel. Unlike [`handled`](Self::handled) this excludes
    /// the acks of copies (retried, dead-lettered, stored) and duplicates,
    /// so every outcome is a counter of its own and none is derived.
    pub succeeded: u64,
    /// Deliveries received on the current channel and not yet settled on
    /// the wire (acked, rejected or nacked): the unacked backlog, handlers
    /// running or not.
    pub unacked: u64,
    /// How long the oldest delivery held on the current channel has waited
    /// for its outcome; `None` when none is held.
    pub oldest_unacked: Option<Duration>,
    /// Dedup releases the store did not take yet, kept and tried again
    /// until it does or the claim's lease ends.
    pub dedup_pending_release: u64,
    /// Dedup done-marks the store did not take yet, kept and tried again
    /// until it does or the claim's lease ends (then logged as a duplicate
    /// window).
    pub dedup_pending_done: u64,
    /// Why the dedup store is down, while its last answer was a failure.
    pub dedup_store_down: Option<String>,
    /// Why the compensation store is down, while its last write failed.
    pub store_down: Option<String>,
}

impl ConsumerStats {
    /// The current values.
    pub fn snapshot(&self) -> ConsumerReport {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsumerReport {
            delivered: get(&self.delivered),
            handled: get(&self.acked),
            rejected: get(&self.rejected),
            requeued: get(&self.requeued),
            panics: get(&self.panics),
            timeouts: get(&self.timeouts),
            stale_tags_dropped: get(&self.stale_tags_dropped),
            ack_frames: get(&self.ack_frames),
            sessions: get(&self.sessions),
            session_errors: get(&self.session_errors),
            in_flight: get(&self.in_flight),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            publish_failures: get(&self.publish_failures),
            stored: get(&self.stored),
            store_failures: get(&self.store_failures),
            duplicates: get(&self.duplicates),
            subscribed: get(&self.subscribed) == 1,
            broker_counted: get(&self.uncounted) == 0,
            broker_lost: get(&self.broker_lost),
            dedup_busy: get(&self.dedup_busy),
            dedup_failures: get(&self.dedup_failures),
            missing_keys: get(&self.missing_keys),
            oversized: get(&self.oversized),
            succeeded: get(&self.succeeded),
            unacked: get(&self.unacked),
            oldest_unacked: match get(&self.oldest_unacked_ms) {
                0 => None,
                since => Some(Duration::from_millis(
                    crate::retry::now_ms().saturating_sub(since),
                )),
            },
            dedup_pending_release: self.dedup_local.get().map_or(0, |l| l.pending().0),
            dedup_pending_done: self.dedup_local.get().map_or(0, |l| l.pending().1),
            dedup_store_down: self.dedup_local.get().and_then(|l| l.down()),
            store_down: self
                .store_down
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|(since, error)| {
                    format!(
                        "the compensation store is down for {}s ({error})",
                        since.elapsed().as_secs()
                    )
                }),
        }
    }

    /// Records how the compensation store's last write went.
    pub(crate) fn store_answered(&self, result: Result<(), &str>) {
        let mut down = self.store_down.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => *down = None,
            Err(error) => {
                let since = down.as_ref().map_or_else(std::time::Instant::now, |d| d.0);
                *down = Some((since, error.to_owned()));
            }
        }
    }

    /// Starts probing `store` while it is marked down (unless a probe runs
    /// already), so that an idle consumer's readiness comes back with the
    /// store and not only with its next failure to store.
    pub(crate) fn probe_store(self: &Arc<Self>, store: Arc<dyn crate::store::CompensationStore>) {
        if self.store_probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.store_probing.store(false, Ordering::Release);
            return;
        };
        let stats = self.clone();
        runtime.spawn(async move {
            /// A store implementation that panics in the probe ends this
            /// task: the flag is cleared so that the next failure starts a
            /// new probe (the normal exit clears it under the `down` lock).
            struct ClearOnPanic(Arc<ConsumerStats>);
            impl Drop for ClearOnPanic {
                fn drop(&mut self) {
                    if std::thread::panicking() {
                        self.0.store_probing.store(false, Ordering::Release);
                    }
                }
            }
            let _clear = ClearOnPanic(stats.clone());
            loop {
                tokio::time::sleep(crate::dedup::local::PROBE_EVERY).await;
                {
                    let down = stats.store_down.lock().unwrap_or_else(|e| e.into_inner());
                    if down.is_none() {
                        stats.store_probing.store(false, Ordering::Release);
                        return;
                    }
                }
                // A read by an id no row has: one round trip that changes
                // nothing. Any answer but "unavailable" means it is up.
                match store.get(0).await {
                    Err(e) if e.is_transient() => stats.store_answered(Err(&e.to_string())),
                    _ => {
                        info!("the compensation store answers again");
                        stats.store_answered(Ok(()));
                    }
                }
            }
        });
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A consumer of one queue, not yet running.
pub struct Consumer<H> {
    supervisor: ConnectionSupervisor,
    config: ConsumerConfig,
    handler: Arc<H>,
}

impl<H> std::fmt::Debug for Consumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A running consumer.
#[derive(Debug)]
pub struct ConsumerHandle {
    queue: String,
    stats: Arc<ConsumerStats>,
    breaker: watch::Receiver<BreakerState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

impl ConsumerHandle {
    /// The consumer's live counters.
    pub fn stats(&self) -> ConsumerReport {
        self.stats.snapshot()
    }

    /// The shared counters, for metrics exporters.
    pub fn stats_ref(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// The circuit breaker's state (always closed when no breaker is configured).
    pub fn breaker(&self) -> watch::Receiver<BreakerState> {
        self.breaker.clone()
    }

    /// True once the consumer stopped by itself (a fatal error).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops gracefully: cancels the subscription, lets running handlers
    /// finish within the shutdown timeout, flushes acks and closes the
    /// channel. What did not finish stays unacked and the broker redelivers it.
    pub async fn shutdown(self) -> Result<ConsumerReport> {
        self.stop.send_replace(true);
        let result = self
            .task
            .await
            .map_err(|e| Error::TaskFailed(format!("consumer of {}: {e}", self.queue)))?;
        result.map(|()| self.stats.snapshot())
    }
}

impl<H: Handler> Consumer<H> {
    /// A consumer of `config.queue()` on `supervisor`'s connections.
    pub fn new(supervisor: ConnectionSupervisor, config: ConsumerConfig, handler: H) -> Self {
        Consumer {
            supervisor,
            config,
            handler: Arc::new(handler),
        }
    }

    /// Starts consuming in the background.
    pub fn spawn(self) -> Result<ConsumerHandle> {
        self.config.validate()?;
        let handler_timeout = self.config.effective_handler_timeout();
        if handler_timeout >= self.config.consumer_timeout {
            warn!(queue = %self.config.queue, ?handler_timeout, consumer_timeout = ?self.config.consumer_timeout,
                "the handler timeout is not below the broker's consumer_timeout: a hung handler makes \
                 the broker close the channel and redeliver everything it held");
        }
        let stats = Arc::new(ConsumerStats::default());
        if let Some(dedup) = &self.config.dedup {
            let _ = stats.dedup_local.set(dedup.local.clone());
        }
        let (stop, stop_rx) = watch::channel(false);
        let (breaker_tx, breaker) = watch::channel(BreakerState::Closed);
        let runtime_queue = self.config.queue.clone();
        // What the configured topology says about the consumed queue decides
        // the type of its tiers and DLQ, its delivery limit and whether a
        // plain reject is left to its own dead-lettering.
        let (queue_type, queue_dead_letters, declared_limit) = self.config.consumed_queue();
        let delivery_limit = self
            .config
            .delivery_limit
            .map(u64::from)
            .or(declared_limit)
            .or((queue_type == QueueType::Quorum)
                .then_some(u64::from(DEFAULT_QUORUM_DELIVERY_LIMIT)));
        let topology = self.config.declared_topology();
        let context = Arc::new(ProcessContext {
            queue: self.config.queue.clone(),
            policy: self.config.retry.clone(),
            max_retry_delay: self.config.max_retry_delay,
            handler_timeout: Some(self.config.effective_handler_timeout()),
            max_message_size: self.config.max_message_size,
            store: self.config.store.clone(),
            store_delay: self.config.store_delay,
            dedup: self.config.dedup.clone(),
            handler_permits: std::sync::Mutex::new(Arc::new(tokio::sync::Semaphore::new(
                self.config.concurrency,
            ))),
            breaker_tripped: false.into(),
            generation: AtomicU64::new(0),
            delivery_limit,
            queue_dead_letters,
            stats: stats.clone(),
            stop: stop_rx.clone(),
        });
        if let Some(dedup) = &self.config.dedup
            && let Some(every) = dedup.cleanup_every
        {
            tokio::spawn(dedup_cleanup(
                dedup.store.clone(),
                every,
                self.config.queue.clone(),
                stop_rx.clone(),
            ));
        }
        let runtime = Runtime {
            supervisor: self.supervisor,
            breaker: self.config.breaker.clone().map(CircuitBreaker::new),
            breaker_tx,
            config: self.config,
            topology,
            handler: self.handler,
            context,
            stats: stats.clone(),
            stop: stop_rx,
            handlers: FuturesUnordered::new(),
            running: 0,
            generation: 0,
            rng: fastrand::Rng::new(),
            held: HeldDeliveries::default(),
        };
        let task = tokio::spawn(runtime.run());
        Ok(ConsumerHandle {
            queue: runtime_queue,
            stats,
            breaker,
            stop,
            task,
        })
    }

    /// Consumes until `stop` completes, then shuts down gracefully.
    /// Returns early with the error if the consumer fails for good (for
    /// example, the broker refused the credentials).
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<ConsumerReport> {
        let mut handle = self.spawn()?;
        tokio::select! {
            () = stop => {}
            result = &mut handle.task => {
                return match result {
                    Ok(Ok(())) => Ok(handle.stats.snapshot()),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(Error::TaskFailed(format!("consumer of {}: {e}", handle.queue))),
                };
            }
        }
        handle.shutdown().await
    }
}

/// Removes expired dedup keys every `every` until the consumer stops.
async fn dedup_cleanup(
    store: Arc<dyn crate::dedup::SeenStore>,
    every: Duration,
    queue: String,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wait_true(&mut stop) => return,
        }
        // A panic in the store's code fails this round, not the cleanup.
        let purge = std::panic::AssertUnwindSafe(async {
            store.purge_expired(crate::retry::now_ms()).await
        });
        match futures_util::FutureExt::catch_unwind(purge).await {
            Ok(Ok(removed)) => debug!(%queue, removed, "expired dedup keys removed"),
            Ok(Err(e)) => {
                warn!(%queue, error = %e, "removing expired dedup keys failed; trying again later")
            }
            Err(_) => {
                warn!(%queue, "the dedup store panicked removing expired keys; trying again later")
            }
        }
    }
}

/// Why a session ended.
enum SessionEnd {
    Stop,
    Broken(String),
    BreakerOpen,
}

/// A running handler with the bookkeeping around it.
type HandlerTask = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// A handler's result, tagged with where its delivery came from.
struct Completion {
    generation: u64,
    tag: u64,
    settlement: Settlement,
    verdict: Verdict,
}

struct Runtime<H> {
    supervisor: ConnectionSupervisor,
    config: ConsumerConfig,
    /// The configured topology plus what the retry policy derives.
    topology: Topology,
    handler: Arc<H>,
    context: Arc<ProcessContext>,
    breaker: Option<CircuitBreaker>,
    breaker_tx: watch::Sender<BreakerState>,
    stats: Arc<ConsumerStats>,
    stop: watch::Receiver<bool>,
    /// Running handlers, polled by the consumer's own task. No task is
    /// spawned per delivery: at tens of thousands of deliveries a second the
    /// wake-ups of a spawn cost more than the work of a typical handler.
    handlers: FuturesUnordered<HandlerTask>,
    /// How many of `handlers` belong to the current session: only those
    /// count against the limit. Handlers of ended sessions may hang on (a
    /// consumer_timeout, a cut); their tags are dead and they must not hold
    /// the new session's slots. They are bounded all the same: see
    /// [`Self::has_room`].
    running: usize,
    generation: u64,
    rng: fastrand::Rng,
    /// The deliveries the current session holds, for the unacked gauges.
    held: HeldDeliveries,
}

/// One channel with its subscription.
struct Session {
    live: LiveConnection,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    /// Confirm-mode channels on the publishing connection for retry and
    /// dead-letter copies, opened on the first copy; with a retry policy.
    publisher: Option<ConfirmedPublisher>,
    generation: u64,
    acks: AckCoalescer,
    /// Ack frames handed to lapin and not yet written, with the number of
    /// deliveries each settles. The pump goes on while lapin's I/O loop
    /// writes them.
    sending: FuturesUnordered<AckSend>,
    /// Deliveries received while every handler slot was taken. The
    /// subscription is read all the time, so a channel error or a cancel is
    /// seen at once even when every handler hangs; the prefetch bounds this.
    waiting: VecDeque<(u64, Delivery)>,
    /// The oldest held delivery already warned about for its age (its
    /// receive time, ms since the epoch).
    warned_for: u64,
    /// Whether the broker still counts the subscription.
    check: BrokerCheck,
}

/// One ack frame being written: how many deliveries it settles, and lapin's
/// result.
type AckSend = Pin<Box<dyn Future<Output = (u64, lapin::Result<()>)> + Send + Sync>>;

/// Hands `basic.ack` to lapin at once and returns the write as a future.
/// The frame is queued on the channel during the first poll, here, so frames
/// keep the order of the calls; a closed channel fails right away.
fn send_ack(channel: &lapin::Channel, tag: u64, multiple: bool, settles: u64) -> AckSend {
    let channel = channel.clone();
    let mut send: AckSend = Box::pin(async move {
        let result = channel.basic_ack(tag, BasicAckOptions { multiple }).await;
        (settles, result)
    });
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match send.as_mut().poll(&mut cx) {
        std::task::Poll::Pending => send,
        std::task::Poll::Ready(done) => Box::pin(std::future::ready(done)),
    }
}

impl<H: Handler> Runtime<H> {
    async fn run(mut self) -> Result<()> {
        let queue = self.config.queue.clone();
        let mut failures = 0u32;
        // Sessions in a row that broke soon after they started.
        let mut broken_streak = 0u32;
        let mut stop = self.stop.clone();
        // A topology conflict that stops the consumer (`stop_on_conflict`).
        let mut fatal = None;
        loop {
            if *self.stop.borrow() {
                break;
            }
            if self.breaker_state() == BreakerState::Open {
                let cooldown = self
                    .breaker
                    .as_ref()
                    .map(CircuitBreaker::cooldown)
                    .unwrap_or_default();
                let stopped = self
                    .idle_until(async {
                        tokio::select! {
                            _ = tokio::time::sleep(cooldown) => false,
                            _ = wait_true(&mut stop) => true,
                        }
                    })
                    .await;
                if stopped {
                    break;
                }
                if let Some(state) = self
                    .breaker
                    .as_mut()
                    .and_then(|b| b.poll_cooldown(Instant::now()))
                {
                    self.breaker_changed(state);
                }
            }
            let supervisor = self.supervisor.clone();
            let live = self
                .idle_until(async {
                    tokio::select! {
                        live = supervisor.connection() => Some(live),
                        _ = wait_true(&mut stop) => None,
                    }
                })
                .await;
            let live = match live {
                None => break,
                Some(Ok(live)) => live,
                Some(Err(e)) => {
                    error!(%queue, error = %e, "consumer stopping: no connection will come");
                    self.handlers.clear();
                    self.update_in_flight();
                    return Err(e);
                }
            };
            self.generation += 1;
            // Whatever still runs belongs to ended sessions: it holds no slot
            // of the new one, nor (with dedup) one of its handler permits.
            self.running = 0;
            self.context.renew_permits(self.config.concurrency);
            self.context
                .generation
                .store(self.generation, Ordering::Release);
            // A stop while the session opens (a silent connection holds
            // channel.open or a declare) ends it there.
            let opened = tokio::select! {
                opened = self.open(live.clone()) => Some(opened),
                _ = wait_true(&mut stop) => None,
            };
            let session = match opened {
                None => break,
                Some(Ok(session)) => session,
                Some(Err(e)) if self.config.stop_on_conflict && e.is_topology_conflict() => {
                    bump(&self.stats.session_errors, 1);
                    error!(%queue, error = %e,
                        "consumer stopping: its topology conflicts with the broker's");
                    fatal = Some(e);
                    break;
                }
                Some(Err(e)) => {
                    failures += 1;
                    bump(&self.stats.session_errors, 1);
                    warn!(%queue, error = %e, attempt = failures, "could not start consuming");
                    if !live.is_connected() {
                        self.supervisor
                            .report_lost(live.generation(), e.to_string());
                    }
                    self.pause(failures).await;
                    continue;
                }
            };
            failures = 0;
            bump(&self.stats.sessions, 1);
            info!(%queue, generation = session.generation, connection = live.generation(),
                prefetch = self.prefetch(), "consuming");
            self.stats.subscribed.store(1, Ordering::Relaxed);
            let started = Instant::now();
            let end = self.pump(session).await;
            // No session consumes until the next one opens: deliveries of
            // this one that have not started their handler never will.
            self.context.generation.store(0, Ordering::Release);
            self.stats.subscribed.store(0, Ordering::Relaxed);
            match end {
                SessionEnd::Stop => break,
                SessionEnd::Broken(reason) => {
                    bump(&self.stats.session_errors, 1);
                    warn!(%queue, %reason, "consumer session ended; subscribing again");
                    if !live.is_connected() {
                        // The connection is gone, not this session: the
                        // next one waits for the supervisor's new connection,
                        // whose own backoff already grows while connections
                        // keep dying soon after they are made. A pause of
                        // the consumer's on top only delays consuming again
                        // (up to its 5 s ceiling after a few forced closes
                        // less than 30 s apart), so none is taken, and the
                        // streak of broken sessions starts over.
                        self.supervisor.report_lost(live.generation(), reason);
                        broken_streak = 0;
                        continue;
                    }
                    // A pause that grows while sessions keep breaking soon
                    // after they start (a copy refused every time, a queue
                    // that keeps failing), so they do not spin; a session
                    // that lived a while starts the count again.
                    broken_streak = if started.elapsed() >= BROKEN_STREAK_RESET {
                        1
                    } else {
                        broken_streak.saturating_add(1)
                    };
                    self.pause(broken_streak).await;
                }
                SessionEnd::BreakerOpen => {}
            }
        }
        // Stopped while no session was up: whatever is still running belongs
        // to a closed channel and cannot be acked any more, but it gets the
        // shutdown timeout to finish its work (with dedup, to mark its key
        // done) before it is dropped.
        self.finish_stale(tokio::time::Instant::now() + self.config.shutdown_timeout)
            .await;
        self.handlers.clear();
        self.update_in_flight();
        self.flush_dedup().await;
        fatal.map_or(Ok(()), Err)
    }

    /// Gives the dedup releases and done-marks still pending a bounded
    /// last chance ([`SHUTDOWN_FLUSH`]); a done-mark still pending after it
    /// is logged, key by key, as the duplicate window it is. The counts stay
    /// in the final report.
    async fn flush_dedup(&mut self) {
        let Some(dedup) = &self.config.dedup else {
            return;
        };
        let queue = &self.config.queue;
        if dedup.local.flush(SHUTDOWN_FLUSH).await {
            return;
        }
        let (release, done) = dedup.local.pending();
        warn!(%queue, release, done, within = ?SHUTDOWN_FLUSH,
            "shutting down with dedup releases and done-marks the store did not take");
        for (scope, key) in dedup.local.pending_done_marks(queue) {
            error!(%queue, %scope, %key,
                "duplicate window: shutting down before the key could be marked done; \
                 a duplicate of this handled message may run its handler again once its lease ends");
        }
    }

    fn breaker_state(&self) -> BreakerState {
        self.breaker
            .as_ref()
            .map_or(BreakerState::Closed, CircuitBreaker::state)
    }

    /// Publishes and logs a breaker transition.
    fn breaker_changed(&mut self, state: BreakerState) {
        let queue = &self.config.queue;
        match state {
            BreakerState::Open => warn!(%queue, "circuit breaker open: pausing consumption"),
            BreakerState::HalfOpen => {
                info!(%queue, "circuit breaker half-open: probing one delivery at a time")
            }
            BreakerState::Closed => info!(%queue, "circuit breaker closed: consuming normally"),
        }
        self.context
            .breaker_tripped
            .store(state != BreakerState::Closed, Ordering::Relaxed);
        self.breaker_tx.send_replace(state);
    }

    /// The prefetch for a new session: one while probing.
    fn prefetch(&self) -> u16 {
        if self.breaker_state() == BreakerState::HalfOpen {
            1
        } else {
            self.config.prefetch
        }
    }

    fn concurrency(&self) -> usize {
        if self.breaker_state() == BreakerState::HalfOpen {
            1
        } else {
            self.config.concurrency
        }
    }

    /// How many deliveries may be in process at once. With deduplication
    /// every prefetched delivery starts (its claim needs no handler slot)
    /// and the handler permits keep the handlers to `concurrency`.
    fn in_process_limit(&self) -> usize {
        if self.config.dedup.is_some() && self.breaker_state() != BreakerState::HalfOpen {
            usize::from(self.config.prefetch).max(self.config.concurrency)
        } else {
            self.concurrency()
        }
    }

    async fn pause(&mut self, failures: u32) {
        let delay = self
            .config
            .session_backoff
            .delay(failures.saturating_sub(1), &mut self.rng);
        let mut stop = self.stop.clone();
        self.idle_until(async {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wait_true(&mut stop) => {}
            }
        })
        .await;
    }

    /// Waits for `until` while still driving the handlers of ended sessions,
    /// so they finish their work; their results are stale and dropped, since
    /// the broker redelivers those messages.
    async fn idle_until<T>(&mut self, until: impl Future<Output = T>) -> T {
        tokio::pin!(until);
        loop {
            tokio::select! {
                out = &mut until => return out,
                Some(_) = self.handlers.next(), if !self.handlers.is_empty() => {
                    bump(&self.stats.stale_tags_dropped, 1);
                    self.update_in_flight();
                }
            }
        }
    }

    /// True when one more delivery of the current session may start: the
    /// session has a slot free, and the handlers of all sessions together
    /// stay under the current limit plus one session's worth of handlers of
    /// ended sessions. Without the second bound every session ended under
    /// hung handlers (a cut, a consumer_timeout) would leave up to
    /// `concurrency` more of them running, without end.
    fn has_room(&self) -> bool {
        self.running < self.in_process_limit()
            && self.handlers.len() < self.in_process_limit() + self.config.concurrency
    }

    fn update_in_flight(&self) {
        self.stats
            .in_flight
            .store(self.handlers.len() as u64, Ordering::Relaxed);
    }

    async fn open(&mut self, live: LiveConnection) -> Result<Session> {
        let channel = live.create_channel().await?;
        let prefetch = self.prefetch();
        let result = async {
            self.topology.apply(&channel).await?;
            channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .map_err(Error::amqp("basic.qos"))?;
            channel
                .basic_consume(
                    self.config.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|source| Error::Declare {
                    what: "consumer on queue",
                    name: self.config.queue.clone(),
                    reason: describe(&source),
                })
        }
        .await;
        // Copies go on the publishing connection, never on this one: a
        // resource alarm blocks the connection that publishes, acks and
        // all. Its channels open on the first copy, so a publishing
        // connection that is down or blocked never holds a session up.
        let publisher = self.context.needs_publisher().then(|| {
            ConfirmedPublisher::pooled(
                self.supervisor.publishing(),
                self.config.publish_channels,
                self.config.publish_timeout,
            )
        });
        match result {
            Ok(consumer) => {
                let batch = self
                    .config
                    .ack_batch
                    .unwrap_or(usize::from(self.config.prefetch) / 4);
                Ok(Session {
                    // After a loss, the new subscription is counted once
                    // the broker says so: soon.
                    check: BrokerCheck::new(
                        live.clone(),
                        self.config.queue.clone(),
                        self.config.broker_check_every,
                        if self.stats.uncounted.load(Ordering::Relaxed) == 1 {
                            RECHECK_AFTER
                        } else {
                            self.config.broker_check_every
                        },
                    ),
                    live,
                    channel,
                    consumer,
                    publisher,
                    generation: self.generation,
                    acks: AckCoalescer::new(
                        batch,
                        self.config.ack_flush,
                        self.config.ack_gap_timeout,
                    ),
                    sending: FuturesUnordered::new(),
                    waiting: VecDeque::new(),
                    warned_for: 0,
                })
            }
            Err(e) => {
                let close = channel.close(200, "backstop: setup failed".into());
                let _ = tokio::time::timeout(CHANNEL_TIMEOUT, close).await;
                Err(e)
            }
        }
    }

    /// Dispatches deliveries and settles completions until the session ends.
    async fn pump(&mut self, mut session: Session) -> SessionEnd {
        // The stop future and the flush timer live across iterations: making
        // a fresh timer per delivery would register and cancel one in the
        // timer wheel every time, a real cost at tens of thousands a second.
        let mut stop = self.stop.clone();
        let stopped = wait_true(&mut stop);
        tokio::pin!(stopped);
        let flush_timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(flush_timer);
        let mut armed: Option<Instant> = None;
        // How often the age of the oldest held delivery is compared with
        // the consumer timeout: a twentieth of it, at most every 5 s.
        let mut age_check = tokio::time::interval(
            (self.config.consumer_timeout / 20)
                .clamp(Duration::from_millis(10), Duration::from_secs(5)),
        );
        age_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while !session.waiting.is_empty() && self.has_room() {
                if let Some((tag, delivery)) = session.waiting.pop_front() {
                    self.dispatch(&session, tag, delivery);
                }
            }
            let deadline = session.acks.deadline();
            if deadline != armed
                && let Some(at) = deadline
            {
                flush_timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(at));
            }
            armed = deadline;
            tokio::select! {
                biased;
                _ = &mut stopped => {
                    self.drain(session, "shutting down", Drain::Shutdown).await;
                    info!(queue = %self.config.queue, "consumer stopped");
                    return SessionEnd::Stop;
                }
                Some(completion) = self.handlers.next(), if !self.handlers.is_empty() => {
                    self.update_in_flight();
                    {
                        let current = completion.generation == session.generation;
                        let verdict = completion.verdict;
                        if let Err(reason) = self.settle(&mut session, completion).await {
                            return self.end(session, reason).await;
                        }
                        // A completion of an ended session says nothing
                        // about the probes of this one.
                        if current && let Err(reason) = self.judge(&mut session, verdict).await {
                            return self.end(session, reason).await;
                        }
                        if self.breaker_state() == BreakerState::Open {
                            self.drain(session, "circuit breaker open", Drain::Resubscribe)
                                .await;
                            return SessionEnd::BreakerOpen;
                        }
                        // A copy came back unroutable (a tier queue or the
                        // DLQ was deleted) or the broker closed a publishing
                        // channel: only declaring the topology again helps,
                        // which the next session does.
                        let broken = session.publisher.as_ref().and_then(ConfirmedPublisher::broken);
                        if let Some(reason) = broken {
                            self.drain(session, "the copies' topology is broken", Drain::Resubscribe)
                                .await;
                            return SessionEnd::Broken(reason);
                        }
                    }
                }
                _ = &mut flush_timer, if armed.is_some() => self.flush(&mut session),
                Some(done) = session.sending.next(), if !session.sending.is_empty() => {
                    if let Err(reason) = self.sent(done) {
                        return self.end(session, reason).await;
                    }
                }
                _ = age_check.tick() => self.check_age(&mut session),
                Some((channel, reading)) = futures_util::future::OptionFuture::from(session.check.pending.as_mut()) => {
                    session.check.returned(channel);
                    if let Some(reason) = self.counted(&mut session, reading) {
                        self.drain(session, &reason, Drain::BrokerLost).await;
                        return SessionEnd::Broken(reason);
                    }
                }
                next = session.consumer.next() => {
                    match next {
                        Some(Ok(delivery)) => {
                            session.check.received += 1;
                            self.receive(&mut session, delivery);
                        }
                        Some(Err(e)) => {
                            let reason = channel_error(&e);
                            return self.end(session, reason).await;
                        }
                        None if session.live.is_connected() && session.channel.status().connected() => {
                            // The broker cancelled the subscription (queue
                            // deleted, node down, failover) but the channel
                            // stands: the results of running handlers can
                            // still be settled on it before it closes.
                            let reason = "the broker cancelled the consumer (queue deleted or node down)".to_owned();
                            self.drain(session, &reason, Drain::BrokerCancelled).await;
                            return SessionEnd::Broken(reason);
                        }
                        None => {
                            let reason = "the connection closed".to_owned();
                            return self.end(session, reason).await;
                        }
                    }
                }
            }
        }
    }

    /// A delivery arrived: it is held from now on, and starts at once when a
    /// handler slot is free.
    fn receive(&mut self, session: &mut Session, delivery: lapin::message::Delivery) {
        bump(&self.stats.delivered, 1);
        let (tag, delivery) = Delivery::from_lapin(delivery);
        self.held.received(tag, &self.stats);
        if session.waiting.is_empty() && self.has_room() {
            self.dispatch(session, tag, delivery);
        } else {
            session.waiting.push_back((tag, delivery));
        }
    }

    fn dispatch(&mut self, session: &Session, tag: u64, delivery: Delivery) {
        let generation = session.generation;
        self.running += 1;
        self.handlers.push(process::process(
            self.handler.clone(),
            self.context.clone(),
            session.publisher.clone(),
            delivery,
            generation,
            move |(settlement, verdict)| Completion {
                generation,
                tag,
                settlement,
                verdict,
            },
        ));
        self.update_in_flight();
    }

    /// Warns once per delivery when the oldest one held has waited 80% of
    /// the broker's consumer timeout for its outcome.
    fn check_age(&mut self, session: &mut Session) {
        let since = self.stats.oldest_unacked_ms.load(Ordering::Relaxed);
        if since == 0 || since == session.warned_for {
            return;
        }
        let timeout = self.config.consumer_timeout;
        let age = Duration::from_millis(crate::retry::now_ms().saturating_sub(since));
        if age >= timeout / 5 * 4 {
            session.warned_for = since;
            warn!(queue = %self.config.queue, ?age, consumer_timeout = ?timeout,
                "a delivery has waited {age:?} for its outcome, 80% of the broker's consumer_timeout \
                 ({timeout:?}): when that expires the broker closes the channel and redelivers \
                 everything it holds");
        }
    }

    /// Carries out one outcome. `Err` means the channel is unusable.
    async fn settle(
        &mut self,
        session: &mut Session,
        completion: Completion,
    ) -> std::result::Result<(), String> {
        let Completion {
            generation,
            tag,
            settlement,
            verdict,
        } = completion;
        if generation != session.generation {
            bump(&self.stats.stale_tags_dropped, 1);
            debug!(
                tag,
                generation,
                current = session.generation,
                "dropping a tag from an older channel"
            );
            return Ok(());
        }
        self.running = self.running.saturating_sub(1);
        self.held.decided(tag, &self.stats);
        let now = Instant::now();
        match settlement {
            Settlement::Ack => {
                if verdict == Verdict::Success {
                    bump(&self.stats.succeeded, 1);
                }
                if session.acks.complete(tag, true, now) && session.acks.batch_full() {
                    self.flush(session);
                }
            }
            Settlement::Reject => {
                if session.acks.complete(tag, false, now) {
                    debug!(tag, "rejecting");
                    session
                        .channel
                        .basic_reject(tag, BasicRejectOptions { requeue: false })
                        .await
                        .map_err(|e| channel_error(&e))?;
                    bump(&self.stats.rejected, 1);
                    HeldDeliveries::settled(&self.stats, 1);
                }
            }
            Settlement::Requeue => {
                if session.acks.complete(tag, false, now) {
                    session
                        .channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            },
                        )
                        .await
                        .map_err(|e| channel_error(&e))?;
                    bump(&self.stats.requeued, 1);
                    HeldDeliveries::settled(&self.stats, 1);
                }
            }
        }
        Ok(())
    }

    /// Feeds the circuit breaker with a completion of the current session;
    /// when probing succeeded enough to close it, subscribes again with the
    /// full prefetch.
    async fn judge(
        &mut self,
        session: &mut Session,
        verdict: Verdict,
    ) -> std::result::Result<(), String> {
        let Some(breaker) = self.breaker.as_mut() else {
            return Ok(());
        };
        let success = match verdict {
            Verdict::Success => true,
            Verdict::Transient => false,
            Verdict::Neutral => return Ok(()),
        };
        let Some(state) = breaker.record(success, Instant::now()) else {
            return Ok(());
        };
        self.breaker_changed(state);
        if state == BreakerState::Closed {
            let prefetch = self.config.prefetch;
            tokio::time::timeout(RESUBSCRIBE_TIMEOUT, self.resubscribe(session))
                .await
                .map_err(|_| {
                    format!("subscribing again took longer than {RESUBSCRIBE_TIMEOUT:?}")
                })??;
            info!(queue = %self.config.queue, prefetch, "subscribed again with the full prefetch");
        }
        Ok(())
    }

    /// Replaces the subscription on the same channel with one of the full
    /// prefetch. `basic.qos` only applies to consumers created after it, so
    /// the probing subscription (prefetch 1) has to go: cancel it, start what
    /// it still yields (its tags stay valid on this channel, and their
    /// results are settled here), and subscribe anew.
    async fn resubscribe(&mut self, session: &mut Session) -> std::result::Result<(), String> {
        session
            .channel
            .basic_qos(self.config.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| channel_error(&e))?;
        session
            .channel
            .basic_cancel(session.consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|e| channel_error(&e))?;
        while let Some(next) = session.consumer.next().await {
            let delivery = next.map_err(|e| channel_error(&e))?;
            self.receive(session, delivery);
        }
        session.consumer = session
            .channel
            .basic_consume(
                self.config.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| channel_error(&e))?;
        Ok(())
    }

    /// Acts on a reading of the broker's consumer count (see
    /// [`ConsumerConfig::broker_check_every`]) and schedules the next.
    /// `Some(reason)` when the broker lost the subscription: the session
    /// must end.
    fn counted(&mut self, session: &mut Session, reading: Reading) -> Option<String> {
        /// Unanswered readings in a row that are worth a warning.
        const UNANSWERED_WARN: u32 = 3;
        let queue = &self.config.queue;
        if !matches!(reading, Reading::Unknown(_)) {
            session.check.unanswered = 0;
        }
        let delivered = session.check.delivered_since();
        let short = match reading {
            Reading::Consumers { consumers, .. } if consumers >= HELD => None,
            // What a quorum queue answers when its leader does not reply
            // within 250 ms (`rabbit_quorum_queue:stat/1` returns
            // `{ok, 0, 0}`): no consumer and no message. It proves nothing;
            // a consumer really lost shows once a message waits for it.
            Reading::Consumers {
                consumers: 0,
                ready: 0,
            } => {
                debug!(%queue, "the broker counts no consumer and no message: not a reading");
                session.check.schedule(session.check.every());
                return None;
            }
            // Deliveries still arrive: the broker delivers to us.
            Reading::Consumers { .. } if delivered => None,
            Reading::Consumers { consumers, ready } => Some(format!(
                "the broker counts {consumers} consumer(s) on the queue with {ready} message(s) \
                 ready, we hold {HELD}"
            )),
            Reading::Missing => Some("the queue does not exist".to_owned()),
            Reading::Unknown(why) => {
                session.check.unanswered += 1;
                if session.check.unanswered == UNANSWERED_WARN {
                    warn!(%queue, %why, readings = UNANSWERED_WARN,
                        "the broker has not answered the consumer check for a while; \
                         readiness cannot see a lost consumer meanwhile");
                } else {
                    debug!(%queue, %why, "could not read the broker's consumer count");
                }
                session.check.schedule(session.check.every());
                return None;
            }
        };
        let Some(why) = short else {
            if self.stats.uncounted.swap(0, Ordering::Relaxed) == 1 {
                info!(%queue, "the broker counts our consumer again");
            }
            session.check.short = 0;
            session.check.schedule(session.check.every());
            return None;
        };
        session.check.short += 1;
        if session.check.short == 1 {
            // Read again before acting: one reading may catch the broker
            // between a cancel and a consume of someone else's.
            debug!(%queue, %why, "the broker does not count our consumer; reading again");
            session.check.schedule(RECHECK_AFTER);
            return None;
        }
        if self.stats.uncounted.swap(1, Ordering::Relaxed) == 0 {
            warn!(%queue, %why, "the broker does not count our consumer although we are \
                subscribed: nothing would arrive; ending the session to subscribe again");
        }
        bump(&self.stats.broker_lost, 1);
        Some(format!("the broker lost our consumer ({why})"))
    }

    /// Hands the coalesced acks to lapin without waiting for the writes;
    /// [`Self::sent`] counts them when they are written.
    fn flush(&mut self, session: &mut Session) {
        let unsent = session.acks.unsent() as u64;
        let flush = session.acks.flush(Instant::now());
        if flush.is_empty() {
            return;
        }
        let singles = flush.singles.len() as u64;
        let multiple = (unsent - session.acks.unsent() as u64).saturating_sub(singles);
        let sends = flush
            .singles
            .iter()
            .map(|tag| (*tag, false, 1))
            .chain(flush.multiple_up_to.map(|tag| (tag, true, multiple)));
        for (tag, multiple, settles) in sends {
            session
                .sending
                .push(send_ack(&session.channel, tag, multiple, settles));
        }
        bump(&self.stats.ack_frames, flush.tags() as u64);
    }

    /// An ack frame was written (or failed: the channel is unusable).
    fn sent(&self, (settles, result): (u64, lapin::Result<()>)) -> std::result::Result<(), String> {
        result.map_err(|e| channel_error(&e))?;
        bump(&self.stats.acked, settles);
        HeldDeliveries::settled(&self.stats, settles);
        Ok(())
    }

    /// Waits, up to `timeout`, for the ack frames handed to lapin to be
    /// written.
    async fn sent_all(
        &mut self,
        session: &mut Session,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !session.sending.is_empty() {
            match tokio::time::timeout_at(deadline, session.sending.next()).await {
                Ok(Some(done)) => self.sent(done)?,
                Ok(None) => break,
                Err(_) => return Err(format!("acks not written within {timeout:?}")),
            }
        }
        Ok(())
    }

    /// Ends a broken session: closes its channel if it still stands so the
    /// broker requeues what it holds, and lets in-flight handlers go stale.
    async fn end(&mut self, mut session: Session, reason: String) -> SessionEnd {
        close_session(&mut session, "backstop: resubscribing").await;
        self.held.released(&self.stats);
        SessionEnd::Broken(reason)
    }

    /// Ends a live session gracefully: cancel the subscription (unless the
    /// broker already did), let this session's running handlers finish
    /// within the shutdown timeout, flush acks, close.
    ///
    /// On a shutdown the handlers of ended sessions get the same deadline:
    /// their results are stale, but their work finishes. A handler with a
    /// dedup claim marks its key done instead of being dropped mid-effect,
    /// which would leave the key claimed until its lease ends and then let
    /// the redelivery run the effect again. What is left at the deadline is
    /// dropped. Otherwise (breaker open, broken copies, the broker's cancel)
    /// the runtime goes on: handlers that did not finish in time run out,
    /// stale, as after any ended session.
    async fn drain(&mut self, mut session: Session, why: &str, how: Drain) {
        let queue = self.config.queue.clone();
        let tag = session.consumer.tag();
        // The subscription is gone (the broker cancelled it) or about to
        // be: not ready while the running handlers settle.
        self.stats.subscribed.store(0, Ordering::Relaxed);
        info!(%queue, in_flight = self.running, stale = self.handlers.len().saturating_sub(self.running),
            why, "draining: settling what runs, then closing");
        if matches!(how, Drain::Shutdown | Drain::Resubscribe) {
            let cancelling = session
                .channel
                .basic_cancel(tag, BasicCancelOptions::default());
            match tokio::time::timeout(CHANNEL_TIMEOUT, cancelling).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(%queue, error = %describe(&e), "basic.cancel failed"),
                Err(_) => warn!(%queue, "basic.cancel not answered within {CHANNEL_TIMEOUT:?}"),
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout;
        while self.running > 0 {
            let completion = tokio::select! {
                completion = self.handlers.next() => completion,
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(%queue, left = self.running, "shutdown timeout: unfinished handlers stay unacked");
                    break;
                }
            };
            let Some(completion) = completion else { break };
            self.update_in_flight();
            if let Err(reason) = self.settle(&mut session, completion).await {
                warn!(%queue, %reason, "settling during shutdown failed; the broker redelivers");
                break;
            }
        }
        self.flush(&mut session);
        if let Err(reason) = self.sent_all(&mut session, Duration::from_secs(5)).await {
            warn!(%queue, %reason, "final ack flush failed; the broker redelivers");
        }
        if how == Drain::Shutdown {
            self.finish_stale(deadline).await;
            // Dropping what did not finish cancels it; its messages stay unacked.
            self.handlers.clear();
            self.update_in_flight();
        }
        self.running = 0;
        close_session(&mut session, "backstop: drained").await;
        self.held.released(&self.stats);
    }

    /// Drives the handlers still running, up to `deadline`, so they finish
    /// their work; their results are dropped and counted as stale (their
    /// channels are gone or no longer settle them).
    async fn finish_stale(&mut self, deadline: tokio::time::Instant) {
        let queue = &self.config.queue;
        if !self.handlers.is_empty() {
            info!(%queue, left = self.handlers.len(), "waiting for the handlers of ended sessions to finish their work");
        }
        while !self.handlers.is_empty() {
            match tokio::time::timeout_at(deadline, self.handlers.next()).await {
                Ok(Some(_)) => {
                    bump(&self.stats.stale_tags_dropped, 1);
                    self.update_in_flight();
                }
                Ok(None) => break,
                Err(_) => {
                    warn!(%queue, left = self.handlers.len(),
                        "shutdown timeout: handlers of ended sessions dropped unfinished");
                    break;
                }
            }
        }
    }
}

/// How long a shutdown waits for pending dedup releases and done-marks.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// A session that lived this long before it broke starts the count of
/// broken sessions in a row (and so the pause before the next) again.
const BROKEN_STREAK_RESET: Duration = Duration::from_secs(30);

/// Why a live session is drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    /// The consumer stops: cancel the subscription, and give every handler
    /// (of ended sessions too) the shutdown timeout; what is left then is
    /// dropped.
    Shutdown,
    /// The session ends and another follows (circuit breaker open, the
    /// copies' topology broken): cancel the subscription, give this
    /// session's handlers the shutdown timeout, leave the rest running.
    Resubscribe,
    /// The broker cancelled the subscription: as `Resubscribe`, without a
    /// `basic.cancel` of our own.
    BrokerCancelled,
    /// The broker no longer counts the subscription (see
    /// [`ConsumerConfig::broker_check_every`]): as `BrokerCancelled`. A
    /// `basic.cancel` of a consumer the queue has dropped would make
    /// RabbitMQ 3.10 count one consumer too few on the queue while the
    /// channel holds deliveries (`rabbit_queue_consumers:remove/3` takes
    /// one off the channel's count without looking for the tag), other
    /// instances' consumers included. Should the broker still deliver to
    /// it after all, what arrives is not started and goes back with the
    /// channel.
    BrokerLost,
}

/// The longest the switch from the probing subscription to the full one may
/// take (`basic.qos`, `basic.cancel`, `basic.consume` on a live channel).
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a channel failed, in words. The broker's `consumer_timeout` closing
/// the channel is a known event with a known cure, and is named as such;
/// `PRECONDITION_FAILED` alone has many causes, so only the broker's text
/// tells this one apart.
fn channel_error(err: &lapin::Error) -> String {
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind()
        && *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
        && let Some(ms) = consumer_timeout_of(amqp.get_message().as_str())
    {
        return format!(
            "the broker's consumer_timeout ({ms} ms) expired for a delivery: handler too slow; \
             the broker closed the channel and requeued what it held (raise consumer_timeout on \
             the broker, or x-consumer-timeout on the queue with RabbitMQ 3.12+, or lower the \
             handler timeout)"
        );
    }
    describe(err)
}

/// The timeout in the broker's text for an expired delivery acknowledgement
/// (RabbitMQ 3.8.15 to 4.x: "PRECONDITION_FAILED - delivery acknowledgement
/// on channel 1 timed out. Timeout value used: 1800000 ms. ..."), or
/// `None` for any other text.
fn consumer_timeout_of(message: &str) -> Option<String> {
    if !(message.contains("delivery acknowledgement on channel") && message.contains("timed out")) {
        return None;
    }
    let value = message
        .split("Timeout value used:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .filter(|ms| ms.bytes().all(|b| b.is_ascii_digit()) && !ms.is_empty());
    Some(value.unwrap_or("?").to_owned())
}

/// Closes a session's channels that still stand, within
/// [`CHANNEL_TIMEOUT`]; the broker requeues what the consumer's channel holds
/// unacked. The publisher's channels and the check channel hold no
/// delivery: they close in the background, so a blocked publishing
/// connection never holds this up.
async fn close_session(session: &mut Session, why: &str) {
    if let Some(publisher) = session.publisher.clone() {
        tokio::spawn(async move { publisher.close().await });
    }
    if let Some(check) = session.check.take_channel() {
        tokio::spawn(async move {
            let close = check.close(200, "backstop: session ended".into());
            let _ = tokio::time::timeout(CHANNEL_TIMEOUT, close).await;
        });
    }
    if session.channel.status().connected() {
        let close = session.channel.close(200, why.into());
        let _ = tokio::time::timeout(CHANNEL_TIMEOUT, close).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handler_timeout_defaults_below_the_consumer_timeout() {
        let config = ConsumerConfig::new("q");
        assert_eq!(
            config.effective_handler_timeout(),
            Duration::from_secs(25 * 60)
        );
        let config = ConsumerConfig::new("q").consumer_timeout(Duration::from_secs(60));
        assert_eq!(config.effective_handler_timeout(), Duration::from_secs(50));
        let config = config.handler_timeout(Duration::from_secs(5));
        assert_eq!(config.effective_handler_timeout(), Duration::from_secs(5));
        assert!(
            ConsumerConfig::new("q")
                .consumer_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn the_broker_s_consumer_timeout_text_is_recognised() {
        // RabbitMQ 3.10.8 and 4.1 (rabbit_channel.erl) word it alike.
        let text = "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. \
                    Timeout value used: 1800000 ms. This timeout value can be configured, \
                    see consumers doc guide to learn more";
        assert_eq!(consumer_timeout_of(text).as_deref(), Some("1800000"));
        assert_eq!(
            consumer_timeout_of(
                "PRECONDITION_FAILED - delivery acknowledgement on channel 3 timed out"
            )
            .as_deref(),
            Some("?")
        );
        assert_eq!(
            consumer_timeout_of("PRECONDITION_FAILED - unknown delivery tag 7"),
            None
        );
        assert_eq!(
            consumer_timeout_of(
                "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q'"
            ),
            None
        );
    }
}
