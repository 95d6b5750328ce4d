//! The connection supervisor: one task that owns the AMQP connection, brings it
//! back after every way it can die, and tells everyone what state it is in.
//!
//! lapin's own auto-recover is deliberately not used: after an 8-second broker
//! restart it never reconnects. The supervisor instead runs an explicit state
//! machine ([`ConnectionState`]) and reconnects with exponential backoff and
//! full jitter ([`Backoff`]), trying each configured address in turn.
//!
//! Each successful connect gets a new *generation* number. Consumers ask for
//! the current [`LiveConnection`], open their channels on it, and tag their
//! deliveries with its generation, so a late ack from an older connection is
//! never sent on a newer one.
//!
//! Copies (retry, dead letter, store re-drive) are published on a second
//! connection, [`ConnectionSupervisor::publishing`]: a broker in a resource
//! alarm stops reading from a connection that publishes, and lapin then
//! writes nothing more on it, acks and closes included. The consumers'
//! connection never publishes, so an alarm cannot freeze their acks.
//!
//! ```no_run
//! # async fn example() -> backstop::Result<()> {
//! use backstop::connection::{ConnectionConfig, ConnectionSupervisor};
//! use std::time::Duration;
//!
//! let config = ConnectionConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .heartbeat(Duration::from_secs(10))
//!     .connection_name("orders-consumer");
//! let supervisor = ConnectionSupervisor::start(config)?;
//! let live = supervisor.connection().await?;
//! let channel = live.create_channel().await?;
//! # drop(channel);
//! # Ok(()) }
//! ```

use crate::error::{Error, RedactedUri, Result};
pub use crate::tls::TlsConfig;
use crate::wait_true;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::uri::AMQPUri;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tracing::{debug, error, info, warn};

/// The broker a command uses when nothing names one: the local default.
pub const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The bound on one channel-level round trip the runtime waits for
/// (`channel.open`, `basic.cancel`, `channel.close`) and on closing a
/// connection. A connection the broker stopped reading (a resource alarm)
/// or a silent peer would otherwise keep the caller waiting until the
/// heartbeats run out, or forever.
pub const CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Exponential backoff with *full* jitter: the delay before attempt `n` is
/// uniform in `[0, min(max, initial * 2^n)]`.
///
/// Full jitter (rather than the additive jitter of the `backon` crate already
/// in the tree) is what spreads a fleet of consumers that all lost the broker at
/// the same instant, so they do not reconnect in lockstep.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub initial: Duration,
    /// The ceiling no delay exceeds.
    pub max: Duration,
    /// Give up after this many failed attempts in a row. `None` retries forever.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The ceiling of the delay before attempt `attempt` (counted from 0).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        self.ceiling(attempt).mul_f64(rng.f64())
    }
}

/// How the supervisor connects.
#[derive(Clone)]
pub struct ConnectionConfig {
    addresses: Vec<String>,
    heartbeat: Duration,
    connection_name: String,
    backoff: Backoff,
    connect_timeout: Duration,
    tls: TlsConfig,
}

impl fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addresses: Vec<RedactedUri> =
            self.addresses.iter().map(|a| RedactedUri::new(a)).collect();
        f.debug_struct("ConnectionConfig")
            .field("addresses", &addresses)
            .field("heartbeat", &self.heartbeat)
            .field("connection_name", &self.connection_name)
            .field("backoff", &self.backoff)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ConnectionConfig {
    /// A configuration for one broker address, with the defaults: heartbeat
    /// 10 s, backoff 100 ms to 30 s with unlimited attempts, connect timeout 10 s.
    pub fn new(uri: impl Into<String>) -> Self {
        ConnectionConfig {
            addresses: vec![uri.into()],
            heartbeat: Duration::from_secs(10),
            connection_name: "backstop".to_owned(),
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            tls: TlsConfig::default(),
        }
    }

    /// TLS settings for the `amqps://` addresses.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// Adds another broker address; addresses are tried in turn.
    pub fn address(mut self, uri: impl Into<String>) -> Self {
        self.addresses.push(uri.into());
        self
    }

    /// The heartbeat to ask the broker for. A dead peer is detected after two
    /// missed heartbeats. Overrides a `heartbeat` in the URI's query. At
    /// least 1 s, in whole seconds (a fraction is cut off); heartbeats
    /// cannot be turned off.
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// The connection name shown by the broker (`rabbitmqctl list_connections
    /// client_properties`, the management UI).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// The reconnect backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long one connection attempt (TCP, TLS and the AMQP handshake) may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The configured addresses, redacted.
    pub fn redacted_addresses(&self) -> Vec<RedactedUri> {
        self.addresses.iter().map(|a| RedactedUri::new(a)).collect()
    }

    /// Parses and checks every address and setting, naming the first problem.
    pub fn validate(&self) -> Result<Vec<AMQPUri>> {
        if self.addresses.is_empty() {
            return Err(Error::Config {
                key: "addresses",
                reason: "at least one broker address is needed".into(),
            });
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return Err(Error::Config {
                key: "backoff",
                reason: "initial must be above zero and not above max".into(),
            });
        }
        if self.heartbeat < Duration::from_secs(1) {
            return Err(Error::Config {
                key: "heartbeat",
                reason: format!("{:?} is below 1 s. {HEARTBEAT_RULE}", self.heartbeat),
            });
        }
        let heartbeat = u16::try_from(self.heartbeat.as_secs()).map_err(|_| Error::Config {
            key: "heartbeat",
            reason: format!("{:?} is above the AMQP limit of 65535 s", self.heartbeat),
        })?;
        self.addresses
            .iter()
            .map(|address| {
                let mut uri = parse_uri(address)?;
                uri.query.heartbeat = Some(heartbeat);
                let external =
                    uri.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External);
                if external
                    && (uri.scheme != lapin::uri::AMQPScheme::AMQPS || !self.tls.has_client_cert())
                {
                    return Err(Error::InvalidUri {
                        uri: RedactedUri::new(address).to_string(),
                        reason: "auth_mechanism=external logs in with the client certificate: \
                                 it needs amqps:// and broker.tls.cert and broker.tls.key"
                            .into(),
                    });
                }
                Ok(uri)
            })
            .collect()
    }
}

/// Why a heartbeat must be at least one second, for the error that refuses
/// a shorter one.
pub(crate) const HEARTBEAT_RULE: &str = "AMQP heartbeats are whole seconds, and 0 would \
    turn them off: a dead peer (a pulled cable) would then go unnoticed. Use at least 1s.";

/// Parses an AMQP URI, turning the parser's message into an error that names
/// the (redacted) address.
pub fn parse_uri(address: &str) -> Result<AMQPUri> {
    let invalid = |reason: String| Error::InvalidUri {
        uri: RedactedUri::new(address).to_string(),
        reason,
    };
    if !(address.starts_with("amqp://") || address.starts_with("amqps://")) {
        return Err(invalid("the scheme must be amqp:// or amqps://".into()));
    }
    let uri: AMQPUri = address.parse().map_err(invalid)?;
    if uri.authority.host.is_empty() {
        return Err(invalid("the host is empty".into()));
    }
    Ok(uri)
}

/// Where the supervisor is. Every transition is logged with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// The first connection is being made.
    Connecting {
        /// Failed attempts so far.
        attempt: u32,
    },
    /// A connection is open and usable.
    Connected {
        /// The connection's generation, counted from 1.
        generation: u64,
    },
    /// The broker blocked the connection (a resource alarm): it stopped
    /// reading from it after a publish, and lapin writes nothing more on it
    /// (no publish, ack, heartbeat or close) until the broker unblocks it.
    /// Backstop publishes copies on a connection of their own
    /// ([`ConnectionSupervisor::publishing`]), so only that one is blocked
    /// and the consumers' acks go on.
    Blocked {
        /// The connection's generation.
        generation: u64,
        /// The broker's reason, for example `low on memory`.
        reason: String,
    },
    /// The connection was lost and a new one is being made.
    Reconnecting {
        /// Failed attempts since the loss.
        attempt: u32,
        /// Why the previous connection or attempt failed.
        reason: String,
    },
    /// The supervisor stopped, on request or because it gave up.
    Closed {
        /// Why it stopped.
        reason: String,
    },
}

impl ConnectionState {
    /// True when a connection is open (connected or blocked).
    pub fn is_up(&self) -> bool {
        matches!(
            self,
            ConnectionState::Connected { .. } | ConnectionState::Blocked { .. }
        )
    }
}

/// An open connection of one generation.
#[derive(Clone)]
pub struct LiveConnection {
    generation: u64,
    connection: Arc<lapin::Connection>,
}

impl fmt::Debug for LiveConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveConnection")
            .field("generation", &self.generation)
            .finish()
    }
}

impl LiveConnection {
    /// The generation of this connection, counted from 1.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True while lapin considers the connection open.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// True while the broker holds the connection blocked (a resource
    /// alarm): nothing written on it reaches the broker.
    pub fn is_blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    /// Opens a channel on this connection, within [`CHANNEL_TIMEOUT`].
    pub async fn create_channel(&self) -> Result<lapin::Channel> {
        match tokio::time::timeout(CHANNEL_TIMEOUT, self.connection.create_channel()).await {
            Ok(opened) => opened.map_err(Error::amqp("channel.open")),
            Err(_) => Err(Error::Timeout {
                context: "channel.open",
                after: CHANNEL_TIMEOUT,
            }),
        }
    }
}

/// Counters kept by the supervisor.
#[derive(Debug, Default)]
struct Counters {
    reconnects: AtomicU64,
    failed_attempts: AtomicU64,
}

/// Why the supervisor stopped for good, kept to answer later callers.
#[derive(Clone, Debug)]
enum Fatal {
    AccessRefused { uri: String, reason: String },
    Tls { uri: String, reason: String },
    GaveUp { attempts: u32, last_error: String },
}

struct Shared {
    state: watch::Sender<ConnectionState>,
    current: watch::Sender<Option<LiveConnection>>,
    fatal: std::sync::Mutex<Option<Fatal>>,
    counters: Counters,
    /// To the running task; replaced when a stopped publishing connection
    /// is started again.
    lost_tx: std::sync::Mutex<mpsc::UnboundedSender<(u64, String)>>,
    shutdown: watch::Sender<bool>,
    connected_since: std::sync::Mutex<Option<Instant>>,
    /// The last generation given out: a relaunched task goes on counting.
    generation: AtomicU64,
    /// How to start the publishing connection; `None` on that one itself.
    sibling: Option<SiblingSeed>,
    /// The publishing connection's supervisor, once asked for. It is kept
    /// for good (publishers and health checks hold it); when its task gives
    /// up, a new task is started on it (see [`Relaunch`]).
    publishing: std::sync::OnceLock<ConnectionSupervisor>,
    /// On the publishing connection only: how to start it again after it
    /// gave up, while the consumers' connection is still wanted.
    relaunch: Option<Relaunch>,
}

/// What a publishing connection that stopped on its own (maximum attempts
/// reached, refused credentials, a TLS failure) is started again from.
/// Without it, the consumers would stay up while every copy they need waits
/// out its publish timeout and fails.
struct Relaunch {
    /// The consumers' connection: while it is not closed, its publishing
    /// connection is wanted.
    parent: Weak<Shared>,
    seed: SiblingSeed,
    /// When the task stopped; `None` while one runs.
    stopped_at: std::sync::Mutex<Option<Instant>>,
}

/// The least time between a publishing connection stopping on its own and
/// its next start. Refused credentials or a broken TLS setup are fixed on
/// an operator's time, so this keeps a relaunch from hammering the broker.
const RELAUNCH_PAUSE: Duration = Duration::from_secs(5);

/// What the publishing connection is started from: the same addresses,
/// TLS and settings, another name.
struct SiblingSeed {
    config: ConnectionConfig,
    uris: Vec<AMQPUri>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Owns the connection and keeps it up. Cheap to clone; all clones share one
/// supervisor task, which stops when [`close`](Self::close) is called.
#[derive(Clone)]
pub struct ConnectionSupervisor {
    shared: Arc<Shared>,
}

impl fmt::Debug for ConnectionSupervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSupervisor")
            .field("state", &*self.shared.state.borrow())
            .finish()
    }
}

impl ConnectionSupervisor {
    /// Validates the configuration and starts the supervisor task on the
    /// current tokio runtime. Fails at once, naming the problem, on a bad
    /// address or setting; never fails because the broker is down.
    pub fn start(config: ConnectionConfig) -> Result<Self> {
        let uris = config.validate()?;
        let tls = if uris
            .iter()
            .any(|u| u.scheme == lapin::uri::AMQPScheme::AMQPS)
        {
            Some(config.tls.client_config()?)
        } else {
            None
        };
        Ok(Self::launch(config, uris, tls, None))
    }

    /// Starts a supervisor task for already validated settings: the
    /// consumers' connection when `parent` is `None`, else the publishing
    /// connection of `parent`.
    fn launch(
        config: ConnectionConfig,
        uris: Vec<AMQPUri>,
        tls: Option<Arc<rustls::ClientConfig>>,
        parent: Option<&Arc<Shared>>,
    ) -> Self {
        let seed = SiblingSeed {
            config: config
                .clone()
                .connection_name(format!("{} (publish)", config.connection_name)),
            uris: uris.clone(),
            tls: tls.clone(),
        };
        let (sibling, relaunch) = match parent {
            None => (Some(seed), None),
            Some(parent) => (
                None,
                Some(Relaunch {
                    parent: Arc::downgrade(parent),
                    seed: SiblingSeed {
                        config: config.clone(),
                        uris: uris.clone(),
                        tls: tls.clone(),
                    },
                    stopped_at: std::sync::Mutex::new(None),
                }),
            ),
        };
        let (state, _) = watch::channel(ConnectionState::Connecting { attempt: 0 });
        let (current, _) = watch::channel(None);
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state,
            current,
            fatal: std::sync::Mutex::new(None),
            counters: Counters::default(),
            lost_tx: std::sync::Mutex::new(lost_tx),
            shutdown,
            connected_since: std::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            sibling,
            publishing: std::sync::OnceLock::new(),
            relaunch,
        });
        let task = SupervisorTask {
            shared: shared.clone(),
            config,
            uris,
            tls,
            lost_rx,
            rng: fastrand::Rng::new(),
        };
        tokio::spawn(task.run());
        ConnectionSupervisor { shared }
    }

    /// The supervisor of the connection copies are published on: a second
    /// connection to the same brokers with the same settings, named
    /// `"<connection_name> (publish)"`, opened the first time this is asked
    /// for (on the current tokio runtime) and kept up like this one.
    /// [`close`](Self::close) closes it too. Asked of the publishing
    /// supervisor itself, it answers itself.
    ///
    /// It is the same supervisor every time. If it stops on its own (its
    /// [`Backoff::max_attempts`] ran out, the broker refused the
    /// credentials, TLS failed) while this supervisor is not closed, it is
    /// started again, on the same handle, at least 5 s after it stopped:
    /// by itself, and on the next call to this or to its
    /// [`connection`](Self::connection). Meanwhile its state is
    /// [`ConnectionState::Closed`] and copies fail.
    ///
    /// A broker in a resource alarm stops reading from a connection that
    /// publishes (and lapin then writes nothing more on it, acks included):
    /// publishing only on this connection keeps consumers' acks flowing.
    pub fn publishing(&self) -> ConnectionSupervisor {
        let Some(seed) = &self.shared.sibling else {
            return self.clone();
        };
        let sibling = self
            .shared
            .publishing
            .get_or_init(|| {
                debug!(name = %seed.config.connection_name, "starting the publishing connection");
                Self::launch(
                    seed.config.clone(),
                    seed.uris.clone(),
                    seed.tls.clone(),
                    Some(&self.shared),
                )
            })
            .clone();
        // Started after close() looked for it: it stops at once.
        if *self.shared.shutdown.borrow() {
            sibling.shared.shutdown.send_replace(true);
        }
        sibling.relaunch();
        sibling
    }

    /// Starts the task of a publishing connection again, if it stopped on
    /// its own at least [`RELAUNCH_PAUSE`] ago and neither it nor the
    /// consumers' connection was closed. True when it did.
    fn relaunch(&self) -> bool {
        let Some(relaunch) = &self.shared.relaunch else {
            return false;
        };
        let mut stopped_at = relaunch
            .stopped_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(at) = *stopped_at else {
            return false;
        };
        if at.elapsed() < RELAUNCH_PAUSE || *self.shared.shutdown.borrow() {
            return false;
        }
        let Some(parent) = relaunch.parent.upgrade() else {
            return false;
        };
        if *parent.shutdown.borrow()
            || matches!(*parent.state.borrow(), ConnectionState::Closed { .. })
        {
            return false;
        }
        *stopped_at = None;
        *self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        *self
            .shared
            .lost_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = lost_tx;
        let previous = self
            .shared
            .state
            .send_replace(ConnectionState::Connecting { attempt: 0 });
        let name = &relaunch.seed.config.connection_name;
        warn!(%name, from = ?previous,
            "starting the publishing connection again: it had stopped while the consumers' connection is still wanted");
        let task = SupervisorTask {
            shared: self.shared.clone(),
            config: relaunch.seed.config.clone(),
            uris: relaunch.seed.uris.clone(),
            tls: relaunch.seed.tls.clone(),
            lost_rx,
            rng: fastrand::Rng::new(),
        };
        tokio::spawn(task.run());
        true
    }

    /// A receiver of the supervisor's state.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// Waits for an open connection. Fails only when the supervisor is closed
    /// or gave up (refused credentials, maximum attempts reached).
    pub async fn connection(&self) -> Result<LiveConnection> {
        let mut current = self.shared.current.subscribe();
        let mut state = self.shared.state.subscribe();
        loop {
            if let Some(live) = current.borrow_and_update().clone()
                && live.is_connected()
            {
                return Ok(live);
            }
            if let ConnectionState::Closed { .. } = &*state.borrow_and_update() {
                // A publishing connection that gave up is started again.
                if self.relaunch() {
                    continue;
                }
                return Err(self.closed_error());
            }
            tokio::select! {
                changed = current.changed() => if changed.is_err() { return Err(Error::Closed) },
                changed = state.changed() => if changed.is_err() { return Err(Error::Closed) },
            }
        }
    }

    fn closed_error(&self) -> Error {
        let fatal = self
            .shared
            .fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match fatal {
            Some(Fatal::AccessRefused { uri, reason }) => Error::AccessRefused { uri, reason },
            Some(Fatal::Tls { uri, reason }) => Error::Tls { uri, reason },
            Some(Fatal::GaveUp {
                attempts,
                last_error,
            }) => Error::GaveUp {
                attempts,
                last_error,
            },
            None => Error::Closed,
        }
    }

    /// Tells the supervisor that a user of generation `generation` saw the
    /// connection fail. Reports for older generations are ignored.
    pub fn report_lost(&self, generation: u64, reason: impl Into<String>) {
        let _ = self
            .shared
            .lost_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((generation, reason.into()));
    }

    /// How many times a lost connection was replaced by a new one.
    pub fn reconnects(&self) -> u64 {
        self.shared.counters.reconnects.load(Ordering::Relaxed)
    }

    /// How long the current connection has been up, if one is.
    pub fn uptime(&self) -> Option<Duration> {
        let since = *self
            .shared
            .connected_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        since.map(|s| s.elapsed())
    }

    /// Closes the connection (and the [publishing](Self::publishing) one)
    /// and stops the supervisor. Consumers should be shut down first so their
    /// acks are flushed.
    ///
    /// Bounded: a broker that does not answer `connection.close` (a silent
    /// peer, a connection blocked by a resource alarm) is given
    /// [`CHANNEL_TIMEOUT`]; the supervisor then stops without its answer.
    pub async fn close(&self) {
        self.shared.shutdown.send_replace(true);
        let own = async {
            let mut state = self.state();
            let closed = tokio::time::timeout(
                CHANNEL_TIMEOUT + Duration::from_secs(1),
                state.wait_for(|s| matches!(s, ConnectionState::Closed { .. })),
            )
            .await;
            if closed.is_err() {
                warn!("the supervisor did not stop within its bound; leaving it");
            }
        };
        match self.shared.publishing.get().cloned() {
            Some(sibling) => {
                tokio::join!(own, Box::pin(sibling.close()));
            }
            None => own.await,
        }
    }
}

struct SupervisorTask {
    shared: Arc<Shared>,
    config: ConnectionConfig,
    uris: Vec<AMQPUri>,
    /// The rustls configuration, when an address is `amqps://`.
    tls: Option<Arc<rustls::ClientConfig>>,
    lost_rx: mpsc::UnboundedReceiver<(u64, String)>,
    rng: fastrand::Rng,
}

enum AttemptError {
    Fatal(String),
    /// A TLS failure that retrying cannot fix (wrong CA, wrong name, expired
    /// certificate, no client certificate).
    Tls(String),
    /// `NOT_ALLOWED` (530) with the broker's text. RabbitMQ answers it for
    /// node, virtual host and user connection limits, a limit query that
    /// timed out, a virtual host that does not exist, and a user without
    /// permission on it: all of them can change without a restart of ours,
    /// so it is retried, at least [`NOT_ALLOWED_PAUSE`] apart.
    NotAllowed(String),
    Retry(String),
}

/// The least wait before trying again once every address answered
/// `NOT_ALLOWED`; the usual jittered backoff comes on top.
const NOT_ALLOWED_PAUSE: Duration = Duration::from_secs(5);

/// How long a connection must stay up for the reconnect backoff to start
/// again from its first step.
const STABLE_AFTER: Duration = Duration::from_secs(5);

impl SupervisorTask {
    fn transition(&self, next: ConnectionState, reason: &str) {
        let previous = self.shared.state.send_replace(next.clone());
        if previous != next {
            match &next {
                ConnectionState::Reconnecting { .. } | ConnectionState::Blocked { .. } => {
                    warn!(name = %self.config.connection_name, from = ?previous, to = ?next, reason, "connection state")
                }
                ConnectionState::Closed { .. } => {
                    info!(name = %self.config.connection_name, from = ?previous, to = ?next, reason, "connection state")
                }
                _ => {
                    info!(name = %self.config.connection_name, from = ?previous, to = ?next, reason, "connection state")
                }
            }
        }
    }

    async fn run(mut self) {
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut generation = self.shared.generation.load(Ordering::Relaxed);
        let mut attempt = 0u32;
        let mut next_address = 0usize;
        // Connections in a row that died before `STABLE_AFTER`: each one is
        // a step up the backoff, so a broker that accepts and then drops
        // every connection is not hammered every 100 ms forever.
        let mut flaps = 0u32;
        // NOT_ALLOWED answers in a row.
        let mut refused = 0u32;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let index = next_address % self.uris.len();
            next_address += 1;
            let shown = RedactedUri::new(&self.config.addresses[index]);
            debug!(address = %shown, attempt, "connecting");
            let outcome = tokio::select! {
                outcome = self.connect_once(index) => outcome,
                _ = wait_true(&mut shutdown) => break,
            };
            match outcome {
                Ok(connection) => {
                    generation += 1;
                    self.shared.generation.store(generation, Ordering::Relaxed);
                    if generation > 1 {
                        self.shared
                            .counters
                            .reconnects
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    attempt = 0;
                    refused = 0;
                    let up_since = Instant::now();
                    let closed = self
                        .hold(connection, generation, &shown, &mut shutdown)
                        .await;
                    match closed {
                        Held::Shutdown => break,
                        Held::Lost(reason) => {
                            self.transition(
                                ConnectionState::Reconnecting {
                                    attempt: 0,
                                    reason: reason.clone(),
                                },
                                &reason,
                            );
                            // Lost after being up for a while: the first retry
                            // is immediate plus jitter over the initial delay.
                            // Lost soon after connecting: the backoff goes on
                            // growing as if the connect had failed.
                            let lasted = up_since.elapsed();
                            if lasted >= STABLE_AFTER {
                                flaps = 0;
                            } else {
                                flaps = flaps.saturating_add(1);
                                warn!(address = %shown, ?lasted, flaps,
                                    "the connection died soon after it was made; backing off further");
                            }
                        }
                    }
                }
                Err(AttemptError::Fatal(reason)) => {
                    if self.shared.relaunch.is_some() {
                        error!(name = %self.config.connection_name, address = %shown, %reason,
                            "the PUBLISHING connection was refused: retry, dead-letter and re-drive \
                             copies fail until it is started again (in 5 s at the earliest)");
                    } else {
                        error!(name = %self.config.connection_name, address = %shown, %reason,
                            "connection refused; not retrying");
                    }
                    *self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Fatal::AccessRefused {
                            uri: shown.to_string(),
                            reason: reason.clone(),
                        });
                    self.finish(&reason);
                    return;
                }
                Err(AttemptError::Tls(reason)) => {
                    if self.shared.relaunch.is_some() {
                        error!(name = %self.config.connection_name, address = %shown, %reason,
                            "TLS failed on the PUBLISHING connection: retry, dead-letter and \
                             re-drive copies fail until it is started again (in 5 s at the earliest)");
                    } else {
                        error!(name = %self.config.connection_name, address = %shown, %reason,
                            "TLS failed; not retrying");
                    }
                    *self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Fatal::Tls {
                            uri: shown.to_string(),
                            reason: reason.clone(),
                        });
                    self.finish(&reason);
                    return;
                }
                Err(failure @ (AttemptError::Retry(_) | AttemptError::NotAllowed(_))) => {
                    attempt += 1;
                    self.shared
                        .counters
                        .failed_attempts
                        .fetch_add(1, Ordering::Relaxed);
                    let reason = match failure {
                        AttemptError::NotAllowed(reason) => {
                            refused = refused.saturating_add(1);
                            warn!(address = %shown, attempt, %reason,
                                "the broker refused the connection (NOT_ALLOWED: a connection limit, \
                                 or a virtual host that is missing or not permitted); retrying slowly");
                            reason
                        }
                        AttemptError::Retry(reason)
                        | AttemptError::Fatal(reason)
                        | AttemptError::Tls(reason) => {
                            refused = 0;
                            warn!(address = %shown, attempt, %reason, "connection attempt failed");
                            reason
                        }
                    };
                    let last_error = reason.clone();
                    if let Some(max) = self.config.backoff.max_attempts
                        && attempt >= max
                    {
                        let reason = format!("gave up after {attempt} attempts: {last_error}");
                        if self.shared.relaunch.is_some() {
                            error!(name = %self.config.connection_name, %reason,
                                "the PUBLISHING connection gave up: copies fail until it is \
                                 started again (in 5 s at the earliest)");
                        }
                        *self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Fatal::GaveUp {
                                attempts: attempt,
                                last_error: last_error.clone(),
                            });
                        self.finish(&reason);
                        return;
                    }
                    let state = if generation == 0 {
                        ConnectionState::Connecting { attempt }
                    } else {
                        ConnectionState::Reconnecting {
                            attempt,
                            reason: reason.clone(),
                        }
                    };
                    self.transition(state, &reason);
                }
            }
            // Back off before the next round; a full pass over the address
            // list counts as one step of the exponential schedule, and so
            // does each connection in a row that died right after it was made.
            let step = (attempt.saturating_sub(1) / self.uris.len() as u32).saturating_add(flaps);
            let mut delay = self.config.backoff.delay(step, &mut self.rng);
            // Every address refused: a limit or a missing virtual host lifts
            // on an operator's time, not in milliseconds.
            if refused >= self.uris.len() as u32 {
                delay += NOT_ALLOWED_PAUSE;
            }
            let next = RedactedUri::new(&self.config.addresses[next_address % self.uris.len()]);
            info!(address = %next, attempt, backoff = ?delay, "next connection attempt after the backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wait_true(&mut shutdown) => break,
            }
        }
        self.finish("closed on request");
    }

    fn finish(&self, reason: &str) {
        if let Some(live) = self.shared.current.send_replace(None) {
            let connection = live.connection.clone();
            tokio::spawn(async move {
                let close = connection.close(200, "backstop shutting down".into());
                let _ = tokio::time::timeout(CHANNEL_TIMEOUT, close).await;
            });
        }
        *self
            .shared
            .connected_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(relaunch) = &self.shared.relaunch {
            *relaunch
                .stopped_at
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            // Stopped on its own: started again after the pause, unless
            // closed meanwhile (relaunch() checks both connections).
            if !*self.shared.shutdown.borrow() {
                let me = Arc::downgrade(&self.shared);
                let mut shutdown = self.shared.shutdown.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(RELAUNCH_PAUSE + Duration::from_millis(50)) => {}
                        _ = wait_true(&mut shutdown) => return,
                    }
                    if let Some(shared) = me.upgrade() {
                        ConnectionSupervisor { shared }.relaunch();
                    }
                });
            }
        }
        self.transition(
            ConnectionState::Closed {
                reason: reason.to_owned(),
            },
            reason,
        );
    }

    async fn connect_once(&self, index: usize) -> Result<lapin::Connection, AttemptError> {
        let props = lapin::ConnectionProperties::default()
            .with_connection_name(self.config.connection_name.clone().into())
            .with_client_property("product".into(), "backstop".into())
            .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
        let uri = self.uris[index].clone();
        let tls = match (&self.tls, &uri.scheme) {
            (Some(tls), lapin::uri::AMQPScheme::AMQPS) => Some(tls.clone()),
            _ => None,
        };
        let connect = async {
            match tls {
                Some(tls) => {
                    let name = self.config.tls.name_for(&uri.authority.host).to_owned();
                    if self.config.tls.is_insecure() {
                        warn!(
                            address = %RedactedUri::new(&self.config.addresses[index]),
                            "TLS certificate verification is OFF (broker.tls.insecure_skip_verify): \
                             the broker is not authenticated and anyone on the path can pose as it"
                        );
                    }
                    let connector = lapin::tcp::RustlsConnector::from(tls);
                    let runtime = lapin::runtime::default_runtime()?;
                    lapin::Connection::connector(
                        uri,
                        runtime,
                        async move |uri, runtime| {
                            let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((
                                uri.authority.host.as_str(),
                                uri.authority.port,
                            ))
                            .await?
                            .collect();
                            let stream =
                                lapin::tcp::AsyncTcpStream::connect(&runtime, addresses).await?;
                            Ok(stream.into_rustls(&connector, &name).await?)
                        },
                        props,
                    )
                    .await
                }
                None => lapin::Connection::connect_uri(uri, props).await,
            }
        };
        match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Err(_) => Err(AttemptError::Retry(format!(
                "timed out after {:?}",
                self.config.connect_timeout
            ))),
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(err)) => Err(classify_connect_error(&err)),
        }
    }

    /// Publishes the connection and waits until it is lost or shutdown is asked.
    async fn hold(
        &mut self,
        connection: lapin::Connection,
        generation: u64,
        shown: &RedactedUri,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Held {
        let mut events = connection.events_listener();
        let connection = Arc::new(connection);
        let live = LiveConnection {
            generation,
            connection: connection.clone(),
        };
        *self
            .shared
            .connected_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.shared.current.send_replace(Some(live));
        self.transition(
            ConnectionState::Connected { generation },
            &format!("connected to {shown}"),
        );
        // Belt and braces: lapin reports most losses as an event, but the
        // status is polled too so that a missed event cannot leave us holding
        // a dead connection.
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        let reason = loop {
            tokio::select! {
                _ = wait_true(shutdown) => {
                    self.shared.current.send_replace(None);
                    // Bounded: a silent connection never answers, and lapin
                    // writes nothing on a blocked one until the broker
                    // unblocks it, so that close is left to run on its own.
                    if connection.status().blocked() {
                        info!(name = %self.config.connection_name,
                            "the broker blocks the connection: closing it in the background");
                        let closing = connection.clone();
                        tokio::spawn(async move {
                            let close = closing.close(200, "backstop shutting down".into());
                            let _ = tokio::time::timeout(CHANNEL_TIMEOUT, close).await;
                        });
                    } else if tokio::time::timeout(
                        CHANNEL_TIMEOUT,
                        connection.close(200, "backstop shutting down".into()),
                    )
                    .await
                    .is_err()
                    {
                        warn!(name = %self.config.connection_name,
                            "the broker did not answer connection.close; stopping without it");
                    }
                    return Held::Shutdown;
                }
                event = events.next() => match event {
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        self.transition(
                            ConnectionState::Blocked { generation, reason: reason.clone() },
                            &reason,
                        );
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        self.transition(ConnectionState::Connected { generation }, "unblocked by the broker");
                    }
                    // lapin reports channel-level errors here too; only a
                    // connection that is no longer up is lost.
                    Some(lapin::Event::Error(err)) if !connection.status().connected() => {
                        break describe(&err)
                    }
                    Some(lapin::Event::Error(err)) => {
                        debug!(error = %describe(&err), "channel-level error; the connection stays up");
                    }
                    Some(_) => {}
                    None => break "the connection's event stream ended".to_owned(),
                },
                lost = self.lost_rx.recv() => {
                    if let Some((lost_generation, reason)) = lost
                        && lost_generation == generation
                        && !connection.status().connected()
                    {
                        break reason;
                    }
                }
                _ = poll.tick() => {
                    if !connection.status().connected() {
                        break "lapin reports the connection as no longer connected".to_owned();
                    }
                }
            }
        };
        self.shared.current.send_replace(None);
        *self
            .shared
            .connected_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        // Make sure the socket is gone; errors here only repeat the loss.
        let closing = connection.clone();
        tokio::spawn(async move {
            let _ = closing.close(320, "backstop: connection lost".into()).await;
        });
        Held::Lost(reason)
    }
}

enum Held {
    Shutdown,
    Lost(String),
}

/// A readable, credential-free description of a lapin error.
pub(crate) fn describe(err: &lapin::Error) -> String {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            format!("{:?}: {}", amqp.kind(), amqp.get_message())
        }
        lapin::ErrorKind::MissingHeartbeatError => {
            "missed heartbeats: nothing received from the broker for two heartbeat intervals"
                .to_owned()
        }
        _ => err.to_string(),
    }
}

/// True for an error the broker sent with `NOT_FOUND` (404): a queue or
/// exchange that does not exist. The broker closed the channel with it.
pub fn is_not_found(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
    )
}

fn classify_connect_error(err: &lapin::Error) -> AttemptError {
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind() {
        let message = amqp.get_message().to_string();
        match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return AttemptError::Fatal(format!("ACCESS_REFUSED: {message}"));
            }
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                return AttemptError::NotAllowed(format!("NOT_ALLOWED: {message}"));
            }
            _ => {}
        }
        if message.starts_with("ACCESS_REFUSED") {
            return AttemptError::Fatal(message);
        }
    }
    let text = err.to_string();
    if let Some(reason) = crate::tls::failure(&text) {
        return AttemptError::Tls(reason);
    }
    AttemptError::Retry(describe(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceiling_doubles_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(5), Duration::from_millis(3200));
        assert_eq!(b.ceiling(9), Duration::from_secs(30));
        assert_eq!(b.ceiling(400), Duration::from_secs(30));
    }

    #[test]
    fn full_jitter_stays_within_the_ceiling_and_spreads() {
        let b = Backoff::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let delays: Vec<Duration> = (0..1000).map(|_| b.delay(6, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= b.ceiling(6)));
        let min = delays.iter().min().copied().unwrap_or_default();
        let max = delays.iter().max().copied().unwrap_or_default();
        // Full jitter covers the whole range, not just its upper half.
        assert!(min < b.ceiling(6) / 10, "min {min:?}");
        assert!(max > b.ceiling(6) * 9 / 10, "max {max:?}");
    }

    #[test]
    fn invalid_uris_are_named() {
        let err = ConnectionConfig::new("amqp://guest:pw@127.0.0.1:notaport/%2f")
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("invalid AMQP URI"), "{err}");
        assert!(err.contains("127.0.0.1:notaport"), "{err}");
        assert!(!err.contains("pw@"), "{err}");

        let err = ConnectionConfig::new("http://127.0.0.1/")
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("scheme"), "{err}");
    }

    #[test]
    fn heartbeat_is_written_into_every_uri() {
        let uris = ConnectionConfig::new("amqp://127.0.0.1:5672/%2f?heartbeat=60")
            .address("amqp://127.0.0.1:5673/%2f")
            .heartbeat(Duration::from_secs(2))
            .validate()
            .unwrap_or_default();
        assert_eq!(uris.len(), 2);
        assert!(uris.iter().all(|u| u.query.heartbeat == Some(2)));
    }

    #[test]
    fn a_heartbeat_below_one_second_is_refused_with_its_key_and_value() {
        for heartbeat in [Duration::ZERO, Duration::from_millis(999)] {
            let err = ConnectionConfig::new("amqp://127.0.0.1:5672/%2f")
                .heartbeat(heartbeat)
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("heartbeat"), "{err}");
            assert!(err.contains(&format!("{heartbeat:?}")), "{err}");
            assert!(err.contains("below 1 s"), "{err}");
        }
        assert!(
            ConnectionConfig::new("amqp://127.0.0.1:5672/%2f")
                .heartbeat(Duration::from_secs(1))
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn not_allowed_is_retried_and_access_refused_is_not() {
        use lapin::protocol::AMQPError;
        let error = |kind, text: &str| {
            lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
                kind,
                text.into(),
            )))
        };
        let limit = "NOT_ALLOWED - access to vhost 'v' refused for user 'guest': \
                     connection limit (0) is reached";
        match classify_connect_error(&error(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            limit,
        )) {
            AttemptError::NotAllowed(reason) => {
                assert!(reason.contains("connection limit (0)"), "{reason}")
            }
            _ => panic!("NOT_ALLOWED must be retried"),
        }
        assert!(matches!(
            classify_connect_error(&error(
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - Login was refused"
            )),
            AttemptError::Fatal(_)
        ));
    }
}
