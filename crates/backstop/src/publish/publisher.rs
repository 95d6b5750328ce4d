//! The application's publisher: a pool of confirm channels, pipelined and
//! exactly correlated, with an optional offline spool.

use super::PublishError;
use super::lane::{Lane, Settled};
use super::spool::{self, NewEntry, Spool, SpoolError};
use crate::connection::{ConnectionConfig, ConnectionState, ConnectionSupervisor, LiveConnection};
use lapin::BasicProperties;
use lapin::protocol::AMQPErrorKind;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The default bound on one publish, from taking a channel to its confirm.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How many spooled messages the drain sends before it waits for their
/// confirms.
const DRAIN_BATCH: usize = 512;

/// How long a spooled message may keep coming back unroutable before it is
/// parked: long enough for a broker's definitions to load, or for
/// consumers to declare their queues, after a restart.
pub const DEFAULT_PARK_UNROUTABLE_AFTER: Duration = Duration::from_secs(300);

/// A message to publish.
#[derive(Clone, Debug)]
pub struct Message {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Message {
    /// A persistent message for `exchange` (`""` is the default exchange)
    /// with `routing_key`.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            properties: BasicProperties::default(),
        }
    }

    /// Sets the properties. The message stays persistent (delivery mode 2)
    /// unless they set a delivery mode.
    pub fn with_properties(mut self, properties: BasicProperties) -> Self {
        self.properties = properties;
        self
    }

    /// Sets the message-id (a client's idempotency key, for example).
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.properties = self.properties.with_message_id(id.into().into());
        self
    }

    /// The exchange.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The properties.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// The message-id, if set.
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|id| id.as_str())
    }

    /// Persistent unless a delivery mode was set, and with a message-id.
    fn normalized(mut self) -> Self {
        if self.properties.delivery_mode().is_none() {
            self.properties = self.properties.with_delivery_mode(2);
        }
        if self.message_id().is_none_or(str::is_empty) {
            self.properties = self.properties.with_message_id(new_message_id().into());
        }
        self
    }

    fn destination(&self) -> String {
        format!("{}:{}", self.exchange, self.routing_key)
    }
}

/// A random 128-bit id in the UUID v4 layout.
pub(crate) fn new_message_id() -> String {
    let mut b = [0u8; 16];
    fastrand::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What became of a publish that did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    /// The broker confirmed it.
    Confirmed {
        /// The message-id it was published with.
        message_id: String,
    },
    /// It is in the spool, on disk; the drain publishes it once the broker
    /// is back.
    Spooled {
        /// The message-id it will be published with.
        message_id: String,
    },
}

impl Published {
    /// The message-id.
    pub fn message_id(&self) -> &str {
        match self {
            Published::Confirmed { message_id } | Published::Spooled { message_id } => message_id,
        }
    }

    /// True when the message went to the spool.
    pub fn is_spooled(&self) -> bool {
        matches!(self, Published::Spooled { .. })
    }
}

/// A snapshot of a publisher's counters and spool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublisherStats {
    /// Publishes the broker confirmed directly.
    pub confirmed: u64,
    /// Publishes written to the spool.
    pub spooled: u64,
    /// Spooled messages the drain published and the broker confirmed.
    pub drained: u64,
    /// Messages spooled (or sent again by the drain) after an attempt that
    /// may have reached the broker (a confirm that timed out, a connection
    /// lost while waiting): each may arrive twice. Duplicates are bounded by
    /// this count.
    pub uncertain: u64,
    /// Publishes returned as unroutable.
    pub unroutable: u64,
    /// Publishes the broker nacked.
    pub nacked: u64,
    /// Publishes the broker refused (a channel error over the publish).
    pub refused: u64,
    /// Publishes refused because the spool was full.
    pub spool_full: u64,
    /// Messages in the spool.
    pub spool_messages: u64,
    /// Bytes in the spool.
    pub spool_bytes: u64,
    /// The age of the oldest spooled message.
    pub spool_oldest: Option<Duration>,
    /// Spooled messages set aside (never published, kept in the spool
    /// file's `parked` table).
    pub spool_parked: u64,
    /// Confirm channels open now.
    pub channels: usize,
}

#[derive(Debug, Default)]
struct Counters {
    confirmed: AtomicU64,
    spooled: AtomicU64,
    drained: AtomicU64,
    uncertain: AtomicU64,
    unroutable: AtomicU64,
    nacked: AtomicU64,
    refused: AtomicU64,
    spool_full: AtomicU64,
}

/// Builds a [`Publisher`].
#[derive(Debug)]
pub struct PublisherBuilder {
    connection: ConnectionConfig,
    channels: usize,
    timeout: Duration,
    spool: Option<PathBuf>,
    max_messages: u64,
    max_bytes: u64,
    park_after: Duration,
}

impl PublisherBuilder {
    /// How long a spooled message may keep coming back unroutable (no queue
    /// bound for it) before the drain parks it in the spool file's `parked`
    /// table (default 5 minutes). Until then it is sent again with every
    /// batch, and the messages behind it drain past it.
    pub fn park_unroutable_after(mut self, after: Duration) -> Self {
        self.park_after = after;
        self
    }

    /// The size of the channel pool (at least 1; default 4).
    pub fn channels(mut self, channels: usize) -> Self {
        self.channels = channels.max(1);
        self
    }

    /// The bound on one publish, from taking a channel to the broker's
    /// confirm (default 5 s). Past it, a publish is spooled (with a spool)
    /// or fails with [`PublishError::Timeout`].
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Spools to the SQLite file at `path` what the broker cannot confirm in
    /// time, and drains it in order once the broker is back.
    pub fn spool(mut self, path: impl Into<PathBuf>) -> Self {
        self.spool = Some(path.into());
        self
    }

    /// The spool's bounds (default 1,000,000 messages and 1 GiB). Past
    /// either, publishes that would spool fail with
    /// [`PublishError::SpoolFull`].
    pub fn spool_limits(mut self, max_messages: u64, max_bytes: u64) -> Self {
        self.max_messages = max_messages;
        self.max_bytes = max_bytes;
        self
    }

    /// Opens the spool (when set) and starts the connection. Never waits for
    /// the broker. Fails on a bad connection setting, or a spool that cannot
    /// be opened (another process holds it, the file is not a spool).
    pub async fn start(self) -> crate::Result<Publisher> {
        let spool = match &self.spool {
            Some(path) => Some(
                Spool::open(path, self.max_messages, self.max_bytes)
                    .await
                    .map_err(|e| crate::Error::Spool(e.to_string()))?,
            ),
            None => None,
        };
        let supervisor = ConnectionSupervisor::start(self.connection)?;
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            supervisor,
            pool: Pool::new(self.channels),
            drain_pool: Pool::new(1),
            timeout: self.timeout,
            park_after: self.park_after,
            spool,
            counters: Counters::default(),
            open_lanes: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            wake_drain: Notify::new(),
            shutdown,
            drain: std::sync::Mutex::new(None),
        });
        if let Some(spool) = &inner.spool {
            if spool.messages() > 0 {
                info!(
                    messages = spool.messages(),
                    "the spool holds messages from an earlier run; draining them once the broker is up"
                );
            }
            let task = tokio::spawn(drain(Arc::downgrade(&inner), spool.clone()));
            *inner.drain.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        Ok(Publisher { inner })
    }
}

/// A bounded set of channels: as many permits as slots, so a permit holder
/// always finds a free slot.
struct Pool {
    slots: std::sync::Mutex<Vec<Slot>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    fn new(channels: usize) -> Self {
        Pool {
            slots: std::sync::Mutex::new((0..channels).map(|_| Slot::default()).collect()),
            permits: Arc::new(Semaphore::new(channels)),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which pool a guard came from.
#[derive(Clone, Copy, Debug)]
enum Which {
    Main,
    Drain,
}

#[derive(Default)]
struct Slot {
    lane: Option<Lane>,
    busy: bool,
}

struct Inner {
    supervisor: ConnectionSupervisor,
    /// The channels publishes take.
    pool: Pool,
    /// The drain's own channel: nothing else is ever in flight on it, so a
    /// channel the broker closes while the drain sends one message alone
    /// was closed over that message.
    drain_pool: Pool,
    timeout: Duration,
    park_after: Duration,
    spool: Option<Spool>,
    counters: Counters,
    open_lanes: AtomicUsize,
    closed: AtomicBool,
    wake_drain: Notify,
    shutdown: watch::Sender<bool>,
    drain: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Inner {
    fn pool(&self, which: Which) -> &Pool {
        match which {
            Which::Main => &self.pool,
            Which::Drain => &self.drain_pool,
        }
    }

    /// True when a connection is open and not blocked.
    fn can_send(&self) -> bool {
        matches!(
            *self.supervisor.state().borrow(),
            ConnectionState::Connected { .. }
        )
    }

    /// True when the broker is known to be away or blocking: the connection
    /// was lost, blocked, closed, or its first attempts failed. Not while the
    /// first attempt is under way (a publish then waits for it).
    fn known_unavailable(&self) -> bool {
        match *self.supervisor.state().borrow() {
            ConnectionState::Connected { .. } => false,
            ConnectionState::Connecting { attempt } => attempt > 0,
            _ => true,
        }
    }

    fn give_up(&self, lane: Lane) {
        self.open_lanes.fetch_sub(1, Ordering::AcqRel);
        lane.close();
    }
}

/// A publisher for applications: its own supervised connection, a bounded
/// pool of confirm channels, and an optional offline spool. Cheap to clone.
///
/// - **Confirmed.** [`publish`](Self::publish) resolves once the broker
///   confirmed the message (or, with a spool, once it is on disk in the
///   spool). Messages are `mandatory`: an unroutable one is an error, not a
///   silent drop.
/// - **Pipelined.** Many publishes are in flight on each channel; each
///   confirm, nack and return is matched to its own message by delivery tag
///   and message-id (see the `lane` module), not by lapin's pairing.
/// - **Bounded.** At most `channels` channels are open; a channel is taken
///   through a [`PooledChannel`] guard only while a publish is written, and
///   given back when the guard drops.
/// - **Persistent** by default, with a message-id generated when missing.
///
/// ```no_run
/// use backstop::connection::ConnectionConfig;
/// use backstop::publish::{Message, Publisher};
///
/// # async fn example() -> backstop::Result<()> {
/// let publisher = Publisher::builder(ConnectionConfig::new("amqp://127.0.0.1:5672"))
///     .spool("/var/lib/orders/spool.db")
///     .start()
///     .await?;
/// match publisher.publish(Message::new("orders", "order.created", b"{}".to_vec())).await {
///     Ok(published) => println!("{} ({})", published.message_id(),
///         if published.is_spooled() { "spooled" } else { "confirmed" }),
///     Err(e) => eprintln!("not published: {e}"),
/// }
/// publisher.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field(
                "free_channels",
                &self.inner.pool.permits.available_permits(),
            )
            .field("timeout", &self.inner.timeout)
            .field("spool", &self.inner.spool)
            .finish()
    }
}

impl Publisher {
    /// A builder for a publisher on `connection` (a connection of its own:
    /// give it a [`connection_name`](ConnectionConfig::connection_name) that
    /// tells it apart from the consumers').
    pub fn builder(connection: ConnectionConfig) -> PublisherBuilder {
        PublisherBuilder {
            connection,
            channels: super::DEFAULT_CHANNELS,
            timeout: DEFAULT_PUBLISH_TIMEOUT,
            spool: None,
            max_messages: spool::DEFAULT_MAX_MESSAGES,
            max_bytes: spool::DEFAULT_MAX_BYTES,
            park_after: DEFAULT_PARK_UNROUTABLE_AFTER,
        }
    }

    /// The publisher's connection supervisor.
    pub fn supervisor(&self) -> &ConnectionSupervisor {
        &self.inner.supervisor
    }

    /// A snapshot of the counters and the spool.
    pub fn stats(&self) -> PublisherStats {
        let c = &self.inner.counters;
        let spool = self.inner.spool.as_ref();
        PublisherStats {
            confirmed: c.confirmed.load(Ordering::Relaxed),
            spooled: c.spooled.load(Ordering::Relaxed),
            drained: c.drained.load(Ordering::Relaxed),
            uncertain: c.uncertain.load(Ordering::Relaxed),
            unroutable: c.unroutable.load(Ordering::Relaxed),
            nacked: c.nacked.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            spool_full: c.spool_full.load(Ordering::Relaxed),
            spool_messages: spool.map_or(0, Spool::messages),
            spool_bytes: spool.map_or(0, Spool::bytes),
            spool_oldest: spool.and_then(Spool::oldest),
            spool_parked: spool.map_or(0, Spool::parked),
            channels: self.inner.open_lanes.load(Ordering::Relaxed),
        }
    }

    /// Takes a channel of the pool, waiting for one to be free (within the
    /// publish timeout) and opening it when needed. Dropping the guard gives
    /// it back; a channel that failed is replaced by the next taker.
    pub async fn acquire(&self) -> Result<PooledChannel, PublishError> {
        let deadline = Instant::now() + self.inner.timeout;
        acquire(&self.inner, Which::Main, deadline).await
    }

    /// Publishes `message` and resolves once the broker confirmed it, or,
    /// with a spool, once it is durably spooled: when the broker is down or
    /// blocks the connection, when the confirm does not come within the
    /// timeout, or while earlier messages wait in the spool (order).
    pub async fn publish(&self, message: Message) -> Result<Published, PublishError> {
        let mut results = self.publish_batch(vec![message]).await;
        results.pop().unwrap_or_else(|| {
            Err(PublishError::Channel {
                destination: String::new(),
                reason: "internal: no result for the publish".into(),
            })
        })
    }

    /// Publishes `messages` in order on one channel, pipelined, and gives one
    /// result per message, in order. With a spool, a message that cannot be
    /// confirmed is spooled, and so is every later one of the batch that was
    /// not confirmed, in order.
    pub async fn publish_batch(
        &self,
        messages: Vec<Message>,
    ) -> Vec<Result<Published, PublishError>> {
        let inner = &self.inner;
        let messages: Vec<Message> = messages.into_iter().map(Message::normalized).collect();
        if messages.is_empty() {
            return Vec::new();
        }
        if inner.closed.load(Ordering::Acquire) {
            return messages
                .iter()
                .map(|m| {
                    Err(PublishError::Channel {
                        destination: m.destination(),
                        reason: "the publisher is closed".into(),
                    })
                })
                .collect();
        }
        if inner.spool.as_ref().is_some_and(|s| s.messages() > 0)
            || (inner.spool.is_some() && inner.known_unavailable())
        {
            let flags = vec![false; messages.len()];
            return to_spool(inner, messages, flags).await;
        }
        let outcomes = send_all(inner, Which::Main, &messages).await;
        let mut results: Vec<Option<Result<Published, PublishError>>> =
            Vec::with_capacity(messages.len());
        let mut spool_these = Vec::new();
        for (i, (message, outcome)) in messages.iter().zip(outcomes).enumerate() {
            let id = message.message_id().unwrap_or_default().to_owned();
            match outcome {
                Ok(()) => {
                    inner.counters.confirmed.fetch_add(1, Ordering::Relaxed);
                    results.push(Some(Ok(Published::Confirmed { message_id: id })));
                }
                Err(failure) => {
                    count_failure(inner, &failure.error);
                    if inner.spool.is_some() && failure.spoolable() {
                        spool_these.push((i, failure.uncertain));
                        results.push(None);
                    } else {
                        // Back to the caller, who may publish it again.
                        if failure.uncertain {
                            inner.counters.uncertain.fetch_add(1, Ordering::Relaxed);
                        }
                        results.push(Some(Err(failure.error)));
                    }
                }
            }
        }
        if !spool_these.is_empty() {
            let mut owned: Vec<Option<Message>> = messages.into_iter().map(Some).collect();
            let batch: Vec<Message> = spool_these
                .iter()
                .filter_map(|(i, _)| owned[*i].take())
                .collect();
            let flags = spool_these.iter().map(|(_, u)| *u).collect();
            let spooled = to_spool(inner, batch, flags).await;
            for ((i, _), result) in spool_these.into_iter().zip(spooled) {
                results[i] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(PublishError::Spool {
                        reason: "internal: no result for the message".into(),
                    })
                })
            })
            .collect()
    }

    /// Publishes `messages` in order on one channel and waits for their
    /// confirms, never spooling (the outbox relay's path: a row is marked
    /// sent only on the broker's confirm). Each failure comes with whether
    /// the publish may have reached the broker.
    pub(crate) async fn publish_batch_confirmed(
        &self,
        messages: Vec<Message>,
    ) -> Vec<Result<(), Unconfirmed>> {
        let inner = &self.inner;
        let messages: Vec<Message> = messages.into_iter().map(Message::normalized).collect();
        let outcomes = send_all(inner, Which::Main, &messages).await;
        outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Ok(()) => {
                    inner.counters.confirmed.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(failure) => {
                    count_failure(inner, &failure.error);
                    if failure.uncertain {
                        inner.counters.uncertain.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Unconfirmed {
                        error: failure.error,
                        uncertain: failure.uncertain,
                    })
                }
            })
            .collect()
    }

    /// Waits until the spool is empty, at most `within`; true when it is
    /// (and true at once without a spool).
    pub async fn drained(&self, within: Duration) -> bool {
        let Some(spool) = &self.inner.spool else {
            return true;
        };
        let deadline = Instant::now() + within;
        loop {
            if spool.messages() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.inner.wake_drain.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the drain, closes the channels and the connection. The spool
    /// stays on disk for the next start. Publishes after this fail.
    pub async fn close(&self) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        inner.shutdown.send_replace(true);
        let task = inner.drain.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(inner.timeout + Duration::from_secs(1), task).await;
        }
        let mut lanes: Vec<Lane> = Vec::new();
        for pool in [&inner.pool, &inner.drain_pool] {
            lanes.extend(pool.slots().iter_mut().filter_map(|s| s.lane.take()));
        }
        inner.open_lanes.fetch_sub(lanes.len(), Ordering::AcqRel);
        futures_util::future::join_all(lanes.into_iter().map(Lane::close_now)).await;
        inner.supervisor.close().await;
        if let Some(spool) = &inner.spool {
            spool.close().await;
        }
    }
}

/// A publish of [`Publisher::publish_batch_confirmed`] that was not
/// confirmed.
#[derive(Debug)]
pub(crate) struct Unconfirmed {
    /// Why.
    pub(crate) error: PublishError,
    /// It was sent and not known to be refused: it may be stored.
    pub(crate) uncertain: bool,
}

/// A failed publish and whether it may have reached the broker.
struct Failure {
    error: PublishError,
    /// Sent, and not known to be refused: may be stored.
    uncertain: bool,
    /// The broker closed the channel with a soft error (the connection up),
    /// for a reason that did not name this publish: this one or a
    /// neighbour on the channel was refused.
    soft_close: bool,
}

impl Failure {
    /// Failures the spool takes: the broker was away, blocked or silent.
    /// Not a channel the broker closed over a publish (its reason named no
    /// publish we recognise): it may be this one, refused for good, and a
    /// spooled message must be one the drain can publish.
    fn spoolable(&self) -> bool {
        !self.soft_close
            && matches!(
                self.error,
                PublishError::Channel { .. }
                    | PublishError::Timeout { .. }
                    | PublishError::Blocked { .. }
            )
    }
}

fn count_failure(inner: &Inner, error: &PublishError) {
    let counter = match error {
        PublishError::Unroutable { .. } => &inner.counters.unroutable,
        PublishError::Nacked { .. } => &inner.counters.nacked,
        PublishError::Refused { .. } => &inner.counters.refused,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Sends `messages` in order on one channel and waits for their confirms,
/// all within one publish timeout.
async fn send_all(
    inner: &Arc<Inner>,
    which: Which,
    messages: &[Message],
) -> Vec<Result<(), Failure>> {
    let deadline = Instant::now() + inner.timeout;
    let mut guard = match acquire(inner, which, deadline).await {
        Ok(guard) => guard,
        Err(error) => {
            return messages
                .iter()
                .map(|m| {
                    Err(Failure {
                        error: retarget(&error, m),
                        uncertain: false,
                        soft_close: false,
                    })
                })
                .collect();
        }
    };
    let mut pending = Vec::with_capacity(messages.len());
    let mut stopped: Option<Failure> = None;
    for message in messages {
        if let Some(failure) = &stopped {
            pending.push(Err(Failure {
                error: retarget(&failure.error, message),
                uncertain: false,
                soft_close: false,
            }));
            continue;
        }
        match guard.send_by_ref(message, deadline).await {
            Ok(confirm) => pending.push(Ok(confirm)),
            Err(failure) => {
                stopped = Some(Failure {
                    error: failure.error.clone(),
                    uncertain: false,
                    soft_close: false,
                });
                pending.push(Err(failure));
            }
        }
    }
    drop(guard);
    let mut outcomes = Vec::with_capacity(pending.len());
    for p in pending {
        outcomes.push(match p {
            Ok(confirm) => confirm.settle().await,
            Err(failure) => Err(failure),
        });
    }
    outcomes
}

/// The same error, for another message's destination.
fn retarget(error: &PublishError, message: &Message) -> PublishError {
    let destination = message.destination();
    match error {
        PublishError::Channel { reason, .. } => PublishError::Channel {
            destination,
            reason: reason.clone(),
        },
        PublishError::Timeout { after, .. } => PublishError::Timeout {
            destination,
            after: *after,
        },
        PublishError::Blocked { .. } => PublishError::Blocked { destination },
        other => other.clone(),
    }
}

/// Takes a free slot (a permit guarantees one) and makes sure it holds a
/// usable channel, within `deadline`.
async fn acquire(
    inner: &Arc<Inner>,
    which: Which,
    deadline: Instant,
) -> Result<PooledChannel, PublishError> {
    let timed_out = |what: &str| PublishError::Channel {
        destination: String::new(),
        reason: format!("{what} within {:?}", inner.timeout),
    };
    if inner.closed.load(Ordering::Acquire) {
        return Err(PublishError::Channel {
            destination: String::new(),
            reason: "the publisher is closed".into(),
        });
    }
    let pool = inner.pool(which);
    let permit = tokio::time::timeout_at(deadline, pool.permits.clone().acquire_owned())
        .await
        .map_err(|_| timed_out("no free channel"))?
        .map_err(|_| timed_out("the pool is closed"))?;
    let (index, lane) = {
        let mut slots = pool.slots();
        let pick = slots
            .iter()
            .position(|s| !s.busy && s.lane.as_ref().is_some_and(Lane::is_usable))
            .or_else(|| slots.iter().position(|s| !s.busy));
        let Some(index) = pick else {
            return Err(PublishError::Channel {
                destination: String::new(),
                reason: "internal: a permit without a free slot".into(),
            });
        };
        slots[index].busy = true;
        (index, slots[index].lane.take())
    };
    let mut guard = PooledChannel {
        inner: inner.clone(),
        which,
        index,
        lane: None,
        _permit: permit,
    };
    match lane {
        Some(lane) if lane.is_usable() => guard.lane = Some(lane),
        stale => {
            if let Some(stale) = stale {
                inner.give_up(stale);
            }
            let live = tokio::time::timeout_at(deadline, inner.supervisor.connection())
                .await
                .map_err(|_| timed_out("no connection to the broker"))?
                .map_err(|e| PublishError::Channel {
                    destination: String::new(),
                    reason: e.to_string(),
                })?;
            let lane = tokio::time::timeout_at(deadline, Lane::open(live))
                .await
                .map_err(|_| timed_out("no channel opened"))?
                .map_err(|reason| PublishError::Channel {
                    destination: String::new(),
                    reason,
                })?;
            inner.open_lanes.fetch_add(1, Ordering::AcqRel);
            guard.lane = Some(lane);
        }
    }
    Ok(guard)
}

/// A channel of the pool, held while publishes are written to it. Dropping
/// it gives the channel back (or, if it failed, closes it so the next taker
/// opens a fresh one). Confirms are awaited on [`PendingConfirm`], after the
/// guard is gone.
pub struct PooledChannel {
    inner: Arc<Inner>,
    which: Which,
    index: usize,
    lane: Option<Lane>,
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for PooledChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledChannel")
            .field("slot", &self.index)
            .finish()
    }
}

impl Drop for PooledChannel {
    fn drop(&mut self) {
        let lane = self.lane.take();
        let mut slots = self.inner.pool(self.which).slots();
        let Some(slot) = slots.get_mut(self.index) else {
            return;
        };
        slot.busy = false;
        match lane {
            Some(lane) if lane.is_usable() && !self.inner.closed.load(Ordering::Acquire) => {
                slot.lane = Some(lane)
            }
            Some(lane) => {
                drop(slots);
                self.inner.give_up(lane);
            }
            None => {}
        }
    }
}

impl PooledChannel {
    /// Publishes `message` (made persistent, with a message-id, when not
    /// set) on this channel. Resolves once it is written, with the future
    /// of its confirm, which resolves within the publish timeout.
    pub async fn send(&mut self, message: Message) -> Result<PendingConfirm, PublishError> {
        let message = message.normalized();
        let deadline = Instant::now() + self.inner.timeout;
        let confirm = self
            .send_by_ref(&message, deadline)
            .await
            .map_err(|f| f.error)?;
        Ok(PendingConfirm {
            inner: Box::pin(async move { confirm.settle().await.map_err(|f| f.error) }),
        })
    }

    async fn send_by_ref(
        &mut self,
        message: &Message,
        deadline: Instant,
    ) -> Result<Confirm, Failure> {
        let destination = message.destination();
        let Some(lane) = &self.lane else {
            return Err(Failure {
                error: PublishError::Channel {
                    destination,
                    reason: "the channel was given up".into(),
                },
                uncertain: false,
                soft_close: false,
            });
        };
        if lane.is_blocked() {
            return Err(Failure {
                error: PublishError::Blocked { destination },
                uncertain: false,
                soft_close: false,
            });
        }
        if !lane.is_usable() {
            // Failed, or tainted by a cancelled send: a confirm or return of
            // that send could land on this one.
            return Err(Failure {
                error: PublishError::Channel {
                    destination,
                    reason: "the channel failed or a publish on it was cancelled".into(),
                },
                uncertain: false,
                soft_close: false,
            });
        }
        let sent = tokio::time::timeout_at(
            deadline,
            lane.send(
                &message.exchange,
                &message.routing_key,
                &message.body,
                message.properties.clone(),
            ),
        )
        .await;
        match sent {
            Ok(Ok(settled)) => Ok(Confirm {
                settled,
                deadline,
                destination,
                exchange: message.exchange.clone(),
                size: message.body.len(),
                live: lane.live().clone(),
                timeout: self.inner.timeout,
            }),
            Ok(Err(e)) => Err(Failure {
                error: PublishError::Channel {
                    destination,
                    reason: crate::connection::describe(&e),
                },
                uncertain: false,
                soft_close: false,
            }),
            // Written or not: the lane is tainted, the outcome unknown.
            Err(_) => Err(Failure {
                error: PublishError::Timeout {
                    destination,
                    after: self.inner.timeout,
                },
                uncertain: true,
                soft_close: false,
            }),
        }
    }
}

/// A written publish waiting for its settlement.
struct Confirm {
    settled: oneshot::Receiver<Settled>,
    deadline: Instant,
    destination: String,
    /// The message's exchange and body size, to tell the publish the
    /// broker refused from its neighbours on the channel.
    exchange: String,
    size: usize,
    live: LiveConnection,
    timeout: Duration,
}

impl Confirm {
    async fn settle(self) -> Result<(), Failure> {
        let destination = self.destination;
        let settled = match tokio::time::timeout_at(self.deadline, self.settled).await {
            Err(_) => {
                return Err(Failure {
                    error: PublishError::Timeout {
                        destination,
                        after: self.timeout,
                    },
                    uncertain: true,
                    soft_close: false,
                });
            }
            Ok(Err(_)) => {
                return Err(Failure {
                    error: PublishError::Channel {
                        destination,
                        reason: "the channel's collector stopped".into(),
                    },
                    uncertain: true,
                    soft_close: false,
                });
            }
            Ok(Ok(settled)) => settled,
        };
        match settled {
            Settled::Ack => Ok(()),
            // Ambiguous: a publish with the same message-id was returned
            // and this one may be stored.
            Settled::Returned { ambiguous } => Err(Failure {
                error: PublishError::Unroutable { destination },
                uncertain: ambiguous,
                soft_close: false,
            }),
            Settled::Nack => Err(Failure {
                error: PublishError::Nacked { destination },
                uncertain: false,
                soft_close: false,
            }),
            Settled::Failed(e) => {
                let reason = crate::connection::describe(&e);
                // A channel closed by the broker over a publish, the
                // connection still up: the broker refused one publish (404
                // no such exchange, 403, 406 too large), and every other
                // publish in flight on the channel failed with it. Only the
                // ones the broker's reason names are refused; the others
                // lost their confirm (uncertain: sent before the offender,
                // they may be stored).
                let soft = matches!(
                    e.kind(),
                    lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_))
                ) && self.live.is_connected();
                let refused = soft
                    && match e.kind() {
                        lapin::ErrorKind::ProtocolError(amqp) => {
                            refusal_names(amqp.get_message().as_str(), &self.exchange, self.size)
                        }
                        _ => false,
                    };
                if refused {
                    Err(Failure {
                        error: PublishError::Refused {
                            destination,
                            reason,
                        },
                        uncertain: false,
                        soft_close: false,
                    })
                } else {
                    Err(Failure {
                        error: PublishError::Channel {
                            destination,
                            reason,
                        },
                        uncertain: true,
                        soft_close: soft,
                    })
                }
            }
        }
    }
}

/// True when the broker's reason for closing a channel names this publish:
/// its exchange is missing (404) or not writable (403), or its body is over
/// the broker's `max_message_size` (406). RabbitMQ's texts
/// (`rabbit_channel.erl`, 3.10): `NOT_FOUND - no exchange 'x' in vhost '/'`,
/// `ACCESS_REFUSED - access to exchange 'x' in vhost '/' refused for user
/// 'u'`, `PRECONDITION_FAILED - message size 12 is larger than configured
/// max size 10`.
fn refusal_names(reason: &str, exchange: &str, size: usize) -> bool {
    if reason.contains(&format!("no exchange '{exchange}' in vhost"))
        || reason.contains(&format!("access to exchange '{exchange}' in vhost"))
        || reason.contains(&format!("cannot publish to internal exchange '{exchange}'"))
        || reason.contains(&format!("in exchange '{exchange}' in vhost"))
    {
        return true;
    }
    if let Some(rest) = reason.split("larger than configured max size ").nth(1) {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(max) = digits.parse::<usize>() {
            return size > max;
        }
    }
    false
}

/// The confirm of a publish sent through a [`PooledChannel`]: resolves to
/// `Ok(())` once the broker confirmed it, or to the reason it did not
/// (returned, nacked, refused, the channel failed, the timeout passed).
pub struct PendingConfirm {
    inner: Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>,
}

impl fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingConfirm").finish()
    }
}

impl Future for PendingConfirm {
    type Output = Result<(), PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Writes `messages` to the spool in order (`uncertain[i]`: it may already
/// be at the broker) and wakes the drain.
async fn to_spool(
    inner: &Inner,
    messages: Vec<Message>,
    uncertain: Vec<bool>,
) -> Vec<Result<Published, PublishError>> {
    let Some(spool) = &inner.spool else {
        return Vec::new();
    };
    let ids: Vec<String> = messages
        .iter()
        .map(|m| m.message_id().unwrap_or_default().to_owned())
        .collect();
    let entries = messages
        .into_iter()
        .map(|m| NewEntry {
            exchange: m.exchange,
            routing_key: m.routing_key,
            properties: m.properties,
            body: m.body,
        })
        .collect();
    match spool.append(entries).await {
        Ok(()) => {
            let n = ids.len() as u64;
            inner.counters.spooled.fetch_add(n, Ordering::Relaxed);
            let doubtful = uncertain.iter().filter(|u| **u).count() as u64;
            inner
                .counters
                .uncertain
                .fetch_add(doubtful, Ordering::Relaxed);
            inner.wake_drain.notify_one();
            ids.into_iter()
                .map(|message_id| Ok(Published::Spooled { message_id }))
                .collect()
        }
        Err(SpoolError::Full { messages, bytes }) => {
            inner
                .counters
                .spool_full
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            ids.iter()
                .map(|_| Err(PublishError::SpoolFull { messages, bytes }))
                .collect()
        }
        Err(e) => {
            let reason = e.to_string();
            ids.iter()
                .map(|_| {
                    Err(PublishError::Spool {
                        reason: reason.clone(),
                    })
                })
                .collect()
        }
    }
}

/// The confirmed entries of a drained batch, deleted from the spool while
/// the next batch is out.
struct Confirmed {
    ids: Vec<i64>,
    /// The batch's failures that may have reached the broker.
    doubtful: u64,
}

/// Deletes a batch's confirmed entries and counts them; false when the
/// delete failed (they stay spooled and are sent again: duplicates).
async fn delete_confirmed(inner: &Inner, spool: &Spool, done: Option<Confirmed>) -> bool {
    let Some(Confirmed { ids, doubtful }) = done else {
        return true;
    };
    let n = ids.len() as u64;
    if let Err(e) = spool.delete(ids).await {
        // Confirmed but still spooled: sent again later, a duplicate.
        warn!(error = %e, "deleting confirmed messages from the spool failed");
        inner
            .counters
            .uncertain
            .fetch_add(n + doubtful, Ordering::Relaxed);
        return false;
    }
    inner.counters.drained.fetch_add(n, Ordering::Relaxed);
    inner
        .counters
        .uncertain
        .fetch_add(doubtful, Ordering::Relaxed);
    if n > 0 {
        debug!(
            messages = n,
            left = spool.messages(),
            "drained from the spool"
        );
    }
    true
}

/// Publishes the spool in order, with confirms, while the broker is up;
/// deletes each entry only once it is confirmed.
///
/// One batch is out at a time, so first copies reach the broker in spool
/// order. While it is out, the batch after it is read, and the confirmed
/// entries of the batch before are deleted (a delete waits for its fsync):
/// the broker's confirms set the pace, not the spool. The read-ahead starts
/// after the last id of the batch out, which is still in the spool then, so
/// every entry appended since has a larger id. After any failure, or when
/// the read-ahead is empty, the next batch is read from the start again.
async fn drain(inner: std::sync::Weak<Inner>, spool: Spool) {
    let mut shutdown = match inner.upgrade() {
        Some(inner) => inner.shutdown.subscribe(),
        None => return,
    };
    let mut backoff = Duration::ZERO;
    let mut unroutable_since: HashMap<i64, std::time::Instant> = HashMap::new();
    let mut isolate = false;
    // The entries after the batch out, read while it was out.
    let mut read_ahead: Option<Vec<spool::Entry>> = None;
    // The confirmed entries of the batch before, not deleted yet.
    let mut pending: Option<Confirmed> = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if *shutdown.borrow() {
            delete_confirmed(&strong, &spool, pending.take()).await;
            return;
        }
        if !backoff.is_zero() {
            delete_confirmed(&strong, &spool, pending.take()).await;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
        }
        if spool.messages() == 0 || !strong.can_send() {
            if pending.is_some() {
                if !delete_confirmed(&strong, &spool, pending.take()).await {
                    backoff = next_backoff(backoff);
                }
                read_ahead = None;
                continue;
            }
            // Woken by a spooling publish, or checked again shortly (the
            // connection coming back is seen here).
            tokio::select! {
                _ = strong.wake_drain.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        let entries = match read_ahead.take() {
            Some(entries) if !entries.is_empty() => entries,
            _ => {
                // From the start: nothing confirmed may still be there.
                if !delete_confirmed(&strong, &spool, pending.take()).await {
                    backoff = next_backoff(backoff);
                    continue;
                }
                // After a channel closed over a publish the broker did not
                // name, one message at a time, to find the one it refuses.
                let limit = if isolate { 1 } else { DRAIN_BATCH };
                match spool.peek(0, limit).await {
                    Ok(entries) => entries,
                    Err(e) => {
                        warn!(error = %e, "reading the spool failed");
                        backoff = next_backoff(backoff);
                        continue;
                    }
                }
            }
        };
        let Some(last) = entries.last().map(|e| e.id) else {
            tokio::select! {
                _ = strong.wake_drain.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => return,
            }
            continue;
        };
        let messages: Vec<Message> = entries
            .iter()
            .map(|e| Message {
                exchange: e.exchange.clone(),
                routing_key: e.routing_key.clone(),
                body: e.body.clone(),
                properties: e.properties.clone(),
            })
            .collect();
        let alone = entries.len() == 1;
        let (outcomes, next, deleted) = tokio::join!(
            send_all(&strong, Which::Drain, &messages),
            async {
                if isolate {
                    None
                } else {
                    spool.peek(last, DRAIN_BATCH).await.ok()
                }
            },
            delete_confirmed(&strong, &spool, pending.take()),
        );
        let mut confirmed = Vec::new();
        let mut failed = false;
        let mut soft_close = false;
        let mut doubtful = 0u64;
        for (entry, outcome) in entries.iter().zip(outcomes) {
            match outcome {
                Ok(()) => {
                    unroutable_since.remove(&entry.id);
                    confirmed.push(entry.id);
                }
                Err(failure) => {
                    failed = true;
                    soft_close |= failure.soft_close;
                    if failure.uncertain {
                        doubtful += 1;
                    }
                    let park = match &failure.error {
                        PublishError::Refused { .. } => Some(failure.error.to_string()),
                        // Sent alone, and the broker closed the channel over it.
                        PublishError::Channel { reason, .. } if failure.soft_close && alone => {
                            Some(format!("the broker refused it: {reason}"))
                        }
                        PublishError::Unroutable { .. } => {
                            let since = *unroutable_since
                                .entry(entry.id)
                                .or_insert_with(std::time::Instant::now);
                            (since.elapsed() >= strong.park_after)
                                .then(|| format!("{} for {:?}", failure.error, since.elapsed()))
                        }
                        _ => None,
                    };
                    if let Some(reason) = park {
                        unroutable_since.remove(&entry.id);
                        warn!(id = entry.id, %reason, "parking a spooled message: it cannot be published");
                        match spool.park(entry.id, reason).await {
                            // Its failure was settled: no duplicate of it.
                            Ok(()) => {
                                doubtful = doubtful.saturating_sub(u64::from(failure.uncertain))
                            }
                            Err(e) => warn!(error = %e, "parking a spooled message failed"),
                        }
                    }
                }
            }
        }
        isolate = soft_close && !alone;
        let n = confirmed.len() as u64;
        pending = Some(Confirmed {
            ids: confirmed,
            doubtful,
        });
        // The read-ahead follows only a batch that went through whole, and
        // a delete that did.
        read_ahead = if failed || !deleted { None } else { next };
        // Back off only when nothing moved: an unroutable message at the
        // head must not slow the ones behind it.
        backoff = if (failed && n == 0 && !isolate) || !deleted {
            next_backoff(backoff)
        } else {
            Duration::ZERO
        };
    }
}

fn next_backoff(current: Duration) -> Duration {
    let next = (current * 2).max(Duration::from_millis(100));
    next.min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_publish_the_broker_names_is_refused() {
        let missing = "NOT_FOUND - no exchange 'orders' in vhost '/'";
        assert!(refusal_names(missing, "orders", 10));
        assert!(!refusal_names(missing, "billing", 10));
        assert!(!refusal_names(missing, "", 10));
        let denied =
            "ACCESS_REFUSED - access to exchange 'orders' in vhost '/' refused for user 'u'";
        assert!(refusal_names(denied, "orders", 10));
        assert!(!refusal_names(denied, "other", 10));
        let large = "PRECONDITION_FAILED - message size 200 is larger than configured max size 100";
        assert!(refusal_names(large, "x", 200));
        assert!(!refusal_names(large, "x", 100));
        assert!(!refusal_names(
            "PRECONDITION_FAILED - something else",
            "x",
            1 << 20
        ));
    }

    #[test]
    fn a_message_is_persistent_with_an_id_unless_told_otherwise() {
        let m = Message::new("x", "k", b"b".to_vec()).normalized();
        assert_eq!(*m.properties().delivery_mode(), Some(2));
        let id = m.message_id().expect("an id").to_owned();
        assert_eq!(id.len(), 36);
        let other = Message::new("x", "k", b"b".to_vec()).normalized();
        assert_ne!(other.message_id(), Some(id.as_str()));

        let kept = Message::new("x", "k", b"b".to_vec())
            .with_properties(BasicProperties::default().with_delivery_mode(1))
            .with_message_id("order-7")
            .normalized();
        assert_eq!(*kept.properties().delivery_mode(), Some(1));
        assert_eq!(kept.message_id(), Some("order-7"));
    }
}
