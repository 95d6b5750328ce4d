//! The TOML file the `backstop` command reads (`-c backstop.toml`).
//!
//! Every section denies unknown keys, so a typo is an error naming the key
//! and its line rather than a setting silently ignored.
//!
//! ```
//! let config = backstop::config::Config::parse(
//!     "[broker]\nuri = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nheartbeat = \"5s\"\n",
//!     "backstop.toml",
//! ).expect("valid");
//! assert_eq!(config.broker.heartbeat, Some(std::time::Duration::from_secs(5)));
//! ```

mod consumer_topology;

pub use consumer_topology::{AT_LEAST_ONCE, AT_MOST_ONCE, BindingSettings, DEFAULT_BINDING_TYPE};

use crate::dedup::{DedupConfig, DedupError, DedupKey, MissingKey};
use crate::error::{Error, Result};
use crate::retry::{Exhausted, RetryPolicy};
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// `[broker]`: where and how to connect.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// `[store]`: the compensation store.
    #[serde(default)]
    pub store: StoreConfig,
    /// `[reconnect]`: the connection supervisor's backoff.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// `[metrics]`: the Prometheus and health endpoints of `backstop run`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[[consumer]]`: one block per queue consumed by `backstop run`.
    #[serde(default, rename = "consumer")]
    pub consumers: Vec<ConsumerSettings>,
    /// `[publish]`: the publish endpoint of `backstop run`; present (even
    /// empty) turns it on.
    pub publish: Option<PublishSettings>,
    /// `[console]`: the review console (`backstop console`, and `backstop
    /// run` when the section is present).
    pub console: Option<ConsoleSettings>,
    /// `[scanner]`: the store scanners of `backstop run`.
    #[serde(default)]
    pub scanner: ScannerSettings,
}

/// `[reconnect]`: exponential backoff with full jitter between attempts.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ReconnectConfig {
    /// The first delay's ceiling (default `100ms`).
    #[serde(default, with = "humantime_serde_opt")]
    pub initial: Option<Duration>,
    /// The largest delay (default `30s`).
    #[serde(default, with = "humantime_serde_opt")]
    pub max: Option<Duration>,
    /// Give up after this many failed attempts in a row (default: never).
    pub max_attempts: Option<u32>,
}

/// `[metrics]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` listen (default
    /// `127.0.0.1:9464`: loopback unless set otherwise).
    pub listen: Option<String>,
}

/// The default address of the metrics and health endpoints.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

impl MetricsConfig {
    /// The address to listen on.
    pub fn listen_addr(&self) -> std::result::Result<std::net::SocketAddr, String> {
        let text = self.listen.as_deref().unwrap_or(DEFAULT_METRICS_LISTEN);
        text.parse()
            .map_err(|e| format!("{text:?} is not an address like \"127.0.0.1:9464\": {e}"))
    }
}

/// `[publish]`: the sidecar's publish endpoint, `POST
/// /publish/{exchange}/{routing_key}`, and the publisher behind it. Every
/// key is optional; the section's presence turns the endpoint on.
///
/// ```
/// let config = backstop::config::Config::parse(
///     "[publish]\nspool = \"/var/lib/backstop/spool.db\"\nspool_max_messages = 100000\n",
///     "backstop.toml",
/// ).expect("valid");
/// let publish = config.publish.expect("the section is there");
/// assert_eq!(publish.listen_addr().expect("valid").to_string(), "127.0.0.1:9466");
/// assert_eq!(publish.spool_max_messages, Some(100_000));
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PublishSettings {
    /// Where the endpoint listens (default `127.0.0.1:9466`: loopback).
    pub listen: Option<String>,
    /// The bearer token every request must carry (`Authorization: Bearer
    /// TOKEN`). Required when `listen` is not a loopback address.
    /// `BACKSTOP_PUBLISH_TOKEN` replaces it, to keep it out of the file.
    pub token: Option<Secret>,
    /// The publisher's spool (a SQLite file): a message the broker cannot
    /// take now is written there, answered `202 spooled`, and published
    /// once it can. Default: no spool.
    pub spool: Option<std::path::PathBuf>,
    /// The most messages the spool holds; beyond it a publish is answered
    /// `507` (default 1,000,000).
    pub spool_max_messages: Option<u64>,
    /// The most bytes the spool holds (default 1 GiB).
    pub spool_max_bytes: Option<u64>,
    /// Confirm channels of the publisher (default 4).
    pub channels: Option<usize>,
    /// How long a publish waits for the broker's confirm (default `5s`).
    #[serde(default, with = "humantime_serde_opt")]
    pub confirm_timeout: Option<Duration>,
    /// The largest body accepted, in bytes (default 16 MiB, as for
    /// consumers); a larger one is answered `413`.
    pub max_message_size: Option<usize>,
}

/// The default address of the publish endpoint.
pub const DEFAULT_PUBLISH_LISTEN: &str = "127.0.0.1:9466";

impl PublishSettings {
    /// The address to listen on.
    pub fn listen_addr(&self) -> std::result::Result<std::net::SocketAddr, String> {
        let text = self.listen.as_deref().unwrap_or(DEFAULT_PUBLISH_LISTEN);
        text.parse()
            .map_err(|e| format!("{text:?} is not an address like \"127.0.0.1:9466\": {e}"))
    }

    /// The confirm channels of the publisher.
    pub fn channels(&self) -> usize {
        self.channels.unwrap_or(crate::publish::DEFAULT_CHANNELS)
    }

    /// The bound on one publish, to its confirm.
    pub fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
            .unwrap_or(crate::publish::DEFAULT_PUBLISH_TIMEOUT)
    }

    /// The spool's bounds: (messages, bytes).
    pub fn spool_limits(&self) -> (u64, u64) {
        (
            self.spool_max_messages
                .unwrap_or(crate::publish::DEFAULT_SPOOL_MAX_MESSAGES),
            self.spool_max_bytes
                .unwrap_or(crate::publish::DEFAULT_SPOOL_MAX_BYTES),
        )
    }

    /// The largest body accepted.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
            .unwrap_or(crate::consumer::DEFAULT_MAX_MESSAGE_SIZE)
    }

    /// The key and the reason of the first inconsistent setting.
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let listen = self.listen_addr().map_err(|e| ("listen", e))?;
        match &self.token {
            None if !listen.ip().is_loopback() => {
                return Err((
                    "listen",
                    format!(
                        "{listen} is not a loopback address: set publish.token (or \
                         BACKSTOP_PUBLISH_TOKEN) so that only holders of the token can publish"
                    ),
                ));
            }
            Some(token) if token.expose().is_empty() => {
                return Err((
                    "token",
                    "the token (from the file or BACKSTOP_PUBLISH_TOKEN) is empty".into(),
                ));
            }
            Some(token) if !token.expose().bytes().all(|b| b.is_ascii_graphic()) => {
                return Err((
                    "token",
                    "the token must be printable ASCII without spaces, \
                     to travel in an Authorization header"
                        .into(),
                ));
            }
            _ => {}
        }
        if self.channels == Some(0) {
            return Err(("channels", "must be at least 1".into()));
        }
        if self.confirm_timeout.is_some_and(|t| t.is_zero()) {
            return Err(("confirm_timeout", "must be above zero".into()));
        }
        if self.max_message_size == Some(0) {
            return Err(("max_message_size", "must be at least 1".into()));
        }
        for (key, limit) in [
            ("spool_max_messages", self.spool_max_messages),
            ("spool_max_bytes", self.spool_max_bytes),
        ] {
            match limit {
                Some(0) => return Err((key, "must be at least 1".into())),
                Some(_) if self.spool.is_none() => {
                    return Err((key, "bounds the spool: set publish.spool too".into()));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `[console]`: the review console, a web UI over the compensation store
/// and the dead-letter queues. Every key is optional; in `backstop run` the
/// section's presence turns the console on.
///
/// ```
/// let config = backstop::config::Config::parse(
///     "[console]\nlisten = \"0.0.0.0:9465\"\nuser = \"ops\"\npassword = \"pw-0123456789abcdef\"\n",
///     "backstop.toml",
/// ).expect("valid");
/// let console = config.console.as_ref().expect("the section is there");
/// assert_eq!(console.listen_addr().expect("valid").port(), 9465);
/// assert!(!config.normalized().contains("0123456789abcdef"));
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsoleSettings {
    /// Where the console listens (default `127.0.0.1:9465`: loopback).
    pub listen: Option<String>,
    /// A shared secret: whoever logs in with it gives a name, which is the
    /// actor of their audit entries; API clients send it as `Authorization:
    /// Bearer TOKEN`. `BACKSTOP_CONSOLE_TOKEN` replaces it.
    pub token: Option<Secret>,
    /// The one user who may log in with `password` (basic auth for API
    /// clients).
    pub user: Option<String>,
    /// The password of `user`. `BACKSTOP_CONSOLE_PASSWORD` replaces it.
    pub password: Option<Secret>,
    /// How long a login lasts (default `8h`, at most 30 days).
    #[serde(default, with = "humantime_serde_opt")]
    pub session_ttl: Option<Duration>,
    /// Host names (`name` or `name:port`) the console answers to besides
    /// its own address, `localhost:<port>` and `[::1]:<port>`: the name a
    /// TLS proxy in front of it forwards. A request for any other `Host` is
    /// refused (defense against DNS rebinding).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// The default address of the review console.
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:9465";
/// The longest `[console] session_ttl`.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The shortest console token or password accepted off loopback.
pub const MIN_SECRET_OFF_LOOPBACK: usize = 16;

impl ConsoleSettings {
    /// The address to listen on.
    pub fn listen_addr(&self) -> std::result::Result<std::net::SocketAddr, String> {
        let text = self.listen.as_deref().unwrap_or(DEFAULT_CONSOLE_LISTEN);
        text.parse()
            .map_err(|e| format!("{text:?} is not an address like \"127.0.0.1:9465\": {e}"))
    }

    /// How long a login lasts.
    pub fn session_ttl(&self) -> Duration {
        self.session_ttl.unwrap_or(Duration::from_secs(8 * 3600))
    }

    /// True when a token or a user and password are set.
    pub fn has_auth(&self) -> bool {
        self.token.is_some() || self.password.is_some()
    }

    /// Replaces the token and the password with `BACKSTOP_CONSOLE_TOKEN`
    /// and `BACKSTOP_CONSOLE_PASSWORD` when they are set.
    pub fn apply_env(&mut self) {
        if let Ok(token) = std::env::var("BACKSTOP_CONSOLE_TOKEN") {
            self.token = Some(Secret(token));
        }
        if let Ok(password) = std::env::var("BACKSTOP_CONSOLE_PASSWORD") {
            self.password = Some(Secret(password));
        }
    }

    /// The key and the reason of the first inconsistent setting. `listen`
    /// is the address in effect (the file's, or a command line's).
    pub fn check_for(
        &self,
        listen: std::net::SocketAddr,
    ) -> std::result::Result<(), (&'static str, String)> {
        if !listen.ip().is_loopback() && !self.has_auth() {
            return Err((
                "listen",
                format!(
                    "{listen} is not a loopback address: set console.token (or \
                     BACKSTOP_CONSOLE_TOKEN), or console.user and console.password \
                     (or BACKSTOP_CONSOLE_PASSWORD), so that only operators can log in"
                ),
            ));
        }
        for (key, secret) in [("token", &self.token), ("password", &self.password)] {
            match secret {
                Some(s) if s.expose().is_empty() => {
                    return Err((key, format!("the {key} is empty")));
                }
                Some(s) if !s.expose().bytes().all(|b| b.is_ascii_graphic()) => {
                    return Err((
                        key,
                        format!(
                            "the {key} must be printable ASCII without spaces, \
                             to travel in an Authorization header"
                        ),
                    ));
                }
                _ => {}
            }
        }
        match (&self.user, &self.password) {
            (Some(user), Some(_)) if user.is_empty() || user.contains(':') => {
                return Err(("user", "the user is empty or contains ':'".into()));
            }
            (Some(_), None) => {
                return Err((
                    "user",
                    "a user needs console.password (or BACKSTOP_CONSOLE_PASSWORD)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(("password", "a password needs console.user".into()));
            }
            _ => {}
        }
        if self.session_ttl.is_some_and(|t| t.is_zero()) {
            return Err(("session_ttl", "must be above zero".into()));
        }
        if self.session_ttl.is_some_and(|t| t > MAX_SESSION_TTL) {
            return Err(("session_ttl", "must be at most 30 days".into()));
        }
        if !listen.ip().is_loopback() {
            for (key, secret) in [("token", &self.token), ("password", &self.password)] {
                if secret
                    .as_ref()
                    .is_some_and(|s| s.expose().chars().count() < MIN_SECRET_OFF_LOOPBACK)
                {
                    return Err((
                        key,
                        format!(
                            "off loopback ({listen}) the {key} needs at least \
                             {MIN_SECRET_OFF_LOOPBACK} characters"
                        ),
                    ));
                }
            }
        }
        for host in &self.allowed_hosts {
            if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
                return Err((
                    "allowed_hosts",
                    format!("{host:?} is not a host name like \"console.example.com\""),
                ));
            }
        }
        Ok(())
    }

    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let listen = self.listen_addr().map_err(|e| ("listen", e))?;
        self.check_for(listen)
    }
}

/// A secret from the configuration (a token): its `Debug` shows `***`, so
/// that logging a configuration never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `secret`.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for the one place that compares or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(\"***\")")
    }
}

/// `[[consumer]]`: one queue, its handler and its failure handling.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// The queue consumed (declared durable when missing).
    pub queue: String,
    /// `classic` (default) or `quorum`, used when the queue is declared.
    /// The retry tiers and `<queue>.dlq` follow it; a quorum queue also
    /// dead-letters to `<queue>.dlq` (see [`Queue::quorum`](crate::topology::Queue::quorum)).
    pub queue_type: Option<String>,
    /// Quorum queues: the `x-delivery-limit` declared on the queue. Backstop
    /// parks a message one return before it (default for quorum queues:
    /// [`DEFAULT_QUORUM_DELIVERY_LIMIT`](crate::consumer::DEFAULT_QUORUM_DELIVERY_LIMIT),
    /// not declared).
    pub delivery_limit: Option<u32>,
    /// Quorum queues: `at-most-once` (default) or `at-least-once`
    /// (`x-dead-letter-strategy`, declared with the `x-overflow =
    /// reject-publish` RabbitMQ requires for it): the broker keeps a
    /// dead-lettered message until its dead-letter queue confirmed it.
    pub dead_letter_strategy: Option<String>,
    /// More arguments of the declared queue (`x-single-active-consumer =
    /// true`, `x-max-length = 10000` with `x-overflow = "reject-publish"`
    /// ...): the ones RabbitMQ knows are checked for type, range and queue
    /// type; those with which the broker would drop messages are refused
    /// (see the README); any other `x-` argument is declared as written. A
    /// queue that exists with other arguments is an error naming the
    /// argument and both values.
    #[serde(default)]
    pub queue_arguments: std::collections::BTreeMap<String, toml::Value>,
    /// `bindings`: exchanges declared (durable, of their type) on every
    /// connect, and the queue bound to each with its routing key.
    #[serde(default)]
    pub bindings: Vec<BindingSettings>,
    /// The most unacknowledged deliveries (default 100).
    pub prefetch: Option<u16>,
    /// The most handler calls at once (default 8).
    pub concurrency: Option<usize>,
    /// How long shutdown waits for running handlers (default `30s`).
    #[serde(default, with = "humantime_serde_opt")]
    pub shutdown_timeout: Option<Duration>,
    /// The largest message body handled, in bytes (default 16 MiB); larger
    /// ones take the exhausted path with the reason.
    pub max_message_size: Option<usize>,
    /// The broker's `consumer_timeout` for this queue (default `30m`, the
    /// broker's own default): a delivery unacked for longer makes the broker
    /// close the channel. Set it when the broker's differs (`consumer_timeout`
    /// in rabbitmq.conf, or `x-consumer-timeout` / a `consumer-timeout`
    /// policy on RabbitMQ 3.12+): the age warning comes at 80% of it, and
    /// handler calls are given up at five sixths of it.
    #[serde(default, with = "humantime_serde_opt")]
    pub consumer_timeout: Option<Duration>,
    /// `handler.http.*`: where each message is delivered.
    pub handler: HandlerSettings,
    /// `retry.*`: the retry tiers and where exhausted messages go.
    #[serde(default)]
    pub retry: RetrySettings,
    /// `dedup.*`: deduplication by business key.
    pub dedup: Option<DedupSettings>,
    /// `breaker.*`: the circuit breaker; present (even empty) turns it on.
    pub breaker: Option<BreakerSettings>,
}

/// `breaker.*` of a consumer: the circuit breaker (see
/// [`crate::breaker`]). Every key is optional; the table's presence turns
/// the breaker on, with [`BreakerConfig::default`](crate::breaker::BreakerConfig)'s
/// values for the keys it does not set.
///
/// ```
/// # #[derive(serde::Deserialize)] struct C { breaker: backstop::config::BreakerSettings }
/// let c: C = toml::from_str(r#"breaker = { window = 10, cooldown = "2s" }"#).expect("valid");
/// let config = c.breaker.config();
/// assert_eq!((config.window, config.min_calls), (10, 10));
/// assert_eq!(config.cooldown, std::time::Duration::from_secs(2));
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerSettings {
    /// How many recent results are considered (default 20).
    pub window: Option<usize>,
    /// No decision before this many results (default 10, at most `window`).
    pub min_calls: Option<usize>,
    /// Opens at or above this share of transient failures, above 0 and at
    /// most 1 (default 0.5).
    pub failure_ratio: Option<f64>,
    /// How long it stays open before probing (default `5s`).
    #[serde(default, with = "humantime_serde_opt")]
    pub cooldown: Option<Duration>,
    /// Successful probes that close it again (default 3).
    pub successes_to_close: Option<u32>,
}

impl BreakerSettings {
    /// The breaker these settings describe, defaults filled in. A
    /// `min_calls` left unset is at most `window`.
    pub fn config(&self) -> crate::breaker::BreakerConfig {
        let defaults = crate::breaker::BreakerConfig::default();
        let window = self.window.unwrap_or(defaults.window);
        crate::breaker::BreakerConfig {
            window,
            min_calls: self.min_calls.unwrap_or(defaults.min_calls.min(window)),
            failure_ratio: self.failure_ratio.unwrap_or(defaults.failure_ratio),
            cooldown: self.cooldown.unwrap_or(defaults.cooldown),
            successes_to_close: self
                .successes_to_close
                .unwrap_or(defaults.successes_to_close),
        }
    }

    /// The key (under `breaker.`) and the reason of the first bad value.
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let config = self.config();
        if config.window == 0 {
            return Err(("breaker.window", "must be at least 1".into()));
        }
        // The breaker keeps one result per call of the window.
        if config.window > MAX_BREAKER_WINDOW {
            return Err((
                "breaker.window",
                format!("{} is above {MAX_BREAKER_WINDOW} calls", config.window),
            ));
        }
        if config.min_calls == 0 {
            return Err(("breaker.min_calls", "must be at least 1".into()));
        }
        if config.min_calls > config.window {
            return Err((
                "breaker.min_calls",
                format!(
                    "{} is above breaker.window ({}): the breaker could never decide",
                    config.min_calls, config.window
                ),
            ));
        }
        if !(config.failure_ratio > 0.0 && config.failure_ratio <= 1.0) {
            return Err((
                "breaker.failure_ratio",
                format!("{} is not above 0 and at most 1", config.failure_ratio),
            ));
        }
        if config.cooldown.is_zero() {
            return Err(("breaker.cooldown", "must be above zero".into()));
        }
        if config.successes_to_close == 0 {
            return Err(("breaker.successes_to_close", "must be at least 1".into()));
        }
        // Half-open consumes one delivery at a time: a breaker that needs
        // thousands of successes to close stays there for ever.
        if config.successes_to_close > MAX_SUCCESSES_TO_CLOSE {
            return Err((
                "breaker.successes_to_close",
                format!(
                    "{} is above {MAX_SUCCESSES_TO_CLOSE}: the consumer would stay half-open \
                     (one delivery at a time) for that many calls",
                    config.successes_to_close
                ),
            ));
        }
        Ok(())
    }
}

/// `handler.*` of a consumer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HandlerSettings {
    /// `handler.http.*`: POST each message to an HTTP endpoint.
    pub http: HttpSettings,
}

/// `handler.http.*`.
///
/// ```
/// // In a real file: Authorization = "Bearer ${ORDERS_TOKEN}".
/// let config = backstop::config::Config::parse(
///     "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"https://orders.internal/events\"\n\
///      handler.http.headers = { Authorization = \"Bearer t0ken\" }\n\
///      handler.http.response = \"dapr\"\n",
///     "backstop.toml",
/// ).expect("valid");
/// let http = &config.consumers[0].handler.http;
/// assert_eq!(http.headers["Authorization"].expose(), "Bearer t0ken");
/// assert_eq!(http.response(), backstop::config::ResponseContract::Dapr);
/// assert!(!format!("{http:?}").contains("t0ken"));
/// assert!(!config.normalized().contains("t0ken"));
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpSettings {
    /// The endpoint, `http://` or `https://`.
    pub url: String,
    /// The whole request's timeout (default `30s`).
    #[serde(default, with = "humantime_serde_opt")]
    pub timeout: Option<Duration>,
    /// Headers sent with every request (an `Authorization`, an API key).
    /// `${NAME}` in a value is replaced by the environment variable `NAME`
    /// when the file is loaded; the values are secrets: `Debug` and `config
    /// check` show `***`, and no log or error quotes them.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, Secret>,
    /// `handler.http.tls.*`: the endpoint's CA and a client certificate.
    pub tls: Option<EndpointTlsSettings>,
    /// How an answer is read (default `status`: by its status code alone).
    pub response: Option<ResponseContract>,
}

/// The default of [`HttpSettings::timeout`].
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

impl HttpSettings {
    /// The whole request's timeout in effect.
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_HANDLER_TIMEOUT)
    }

    /// The response contract in effect.
    pub fn response(&self) -> ResponseContract {
        self.response.unwrap_or_default()
    }

    /// The rustls client configuration of `tls.*` (the system's roots plus
    /// `tls.ca`, and the client certificate), or `None` without a `tls`
    /// table. Errors name the key and the file.
    pub fn tls_client_config(&self) -> Result<Option<rustls::ClientConfig>> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let config = tls.load()?.client_config()?;
        Ok(Some(config.as_ref().clone()))
    }
}

/// `handler.http.tls.*`: TLS to an `https://` endpoint. Its certificate is
/// verified against the system's roots plus `ca`; `cert` and `key` present
/// a client certificate (mutual TLS).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct EndpointTlsSettings {
    /// A PEM file of CA certificates to trust besides the system's.
    pub ca: Option<std::path::PathBuf>,
    /// The client certificate (PEM) for mutual TLS.
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<std::path::PathBuf>,
}

impl EndpointTlsSettings {
    /// Reads the files, naming the key and file of the first problem.
    fn load(&self) -> Result<crate::connection::TlsConfig> {
        let keys = crate::tls::Keys::ENDPOINT;
        let mut tls = crate::connection::TlsConfig::new().keys(keys);
        if let Some(ca) = &self.ca {
            tls = tls.ca_file(ca)?;
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => tls = tls.client_cert_files(cert, key)?,
            (None, None) => {}
            // The error names the key that is set, so that it has a line.
            (Some(_), None) => {
                return Err(Error::Config {
                    key: keys.cert,
                    reason: format!("a client certificate needs its key: set {} too", keys.key),
                });
            }
            (None, Some(_)) => {
                return Err(Error::Config {
                    key: keys.key,
                    reason: format!("a key needs its certificate: set {} too", keys.cert),
                });
            }
        }
        Ok(tls)
    }
}

/// `handler.http.response`: what decides the outcome of an answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ResponseContract {
    /// The status code alone; the body is only quoted in failure reasons.
    #[default]
    Status,
    /// Dapr's subscriber contract: a 2xx answer's JSON body `{"status":
    /// "RETRY"}` is a transient failure, `{"status": "DROP"}` takes the
    /// exhausted path ("dropped by the endpoint"), `SUCCESS`, no status, an
    /// empty or non-JSON body acks, and any other status is retried. Other
    /// status codes keep their usual meaning.
    Dapr,
}

impl ResponseContract {
    /// The name the file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseContract::Status => "status",
            ResponseContract::Dapr => "dapr",
        }
    }
}

/// Header names the sidecar sets itself (`backstop-*`) or that frame the
/// request: `handler.http.headers` may not name them.
fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("backstop-")
        || matches!(
            lower.as_str(),
            "host" | "content-length" | "transfer-encoding" | "connection" | "te" | "upgrade"
        )
}

/// `value` with each `${NAME}` replaced by the variable `NAME` as `lookup`
/// (the environment) gives it. The error gives the byte offset of the
/// `${` and names a (well-formed) variable, never any other text of the
/// value: a literal secret may hold a `${`.
fn interpolate(
    value: &str,
    lookup: impl Fn(&str) -> std::result::Result<String, std::env::VarError>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let at = value.len() - rest.len() + start;
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            format!("the \"${{\" at byte {at} of the value is not closed by \"}}\"")
        })?;
        let name = &after[..end];
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "the \"${{...}}\" at byte {at} of the value does not name an environment \
                 variable (letters, digits and _)"
            ));
        }
        match lookup(name) {
            Ok(v) => out.push_str(&v),
            Err(std::env::VarError::NotPresent) => {
                return Err(format!("the environment variable {name} is not set"));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("the environment variable {name} is not UTF-8"));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Why `name` is not an HTTP header name (RFC 9110 token), if it is not.
fn header_name_problem(name: &str) -> Option<String> {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Some(format!("{name:?} is not an HTTP header name"));
    }
    if reserved_header(name) {
        return Some(format!(
            "{name:?} is set by backstop itself (backstop-*, or a header that frames the request)"
        ));
    }
    if name.eq_ignore_ascii_case("accept-encoding") {
        // A compressed answer could not be quoted in a reason nor read for
        // its Dapr status.
        return Some(format!(
            "{name:?} cannot be set: backstop reads the endpoint's answer and does not \
             decompress it"
        ));
    }
    None
}

/// `retry.*` of a consumer.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetrySettings {
    /// The delay tiers, in order (`["1s", "10s", "1m"]`; default none).
    #[serde(default, deserialize_with = "durations")]
    pub delays: Vec<Duration>,
    /// Retries in process before the first tier (default 0).
    pub immediate: Option<u32>,
    /// `dead-letter` (default) or `store`.
    #[serde(default, deserialize_with = "exhausted_opt")]
    pub exhausted: Option<Exhausted>,
}

impl RetrySettings {
    /// The policy these settings describe.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy::new()
            .immediate(self.immediate.unwrap_or(0), Duration::from_millis(100))
            .delays(self.delays.iter().copied())
            .exhausted(self.exhausted.unwrap_or_default())
    }
}

fn durations<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Vec<Duration>, D::Error> {
    let texts: Vec<String> = Vec::deserialize(deserializer)?;
    texts
        .iter()
        .map(|t| {
            humantime::parse_duration(t).map_err(|e| {
                serde::de::Error::custom(format!("{t:?} is not a duration like \"10s\": {e}"))
            })
        })
        .collect()
}

fn exhausted_opt<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Exhausted>, D::Error> {
    match String::deserialize(deserializer)?.as_str() {
        "dead-letter" => Ok(Some(Exhausted::DeadLetter)),
        "store" => Ok(Some(Exhausted::Store)),
        other => Err(serde::de::Error::custom(format!(
            "{other:?} is not \"dead-letter\" or \"store\""
        ))),
    }
}

/// `[store]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StoreConfig {
    /// `sqlite://backstop.db` or `postgres://user:password@host/db`.
    pub url: Option<String>,
    /// Finished rows (resolved, discarded, replayed) older than this are
    /// purged by `backstop failed purge` when it is given no `--older-than`.
    #[serde(default, with = "humantime_serde_opt")]
    pub retention: Option<Duration>,
    /// How often `backstop run`'s scanners look for due rows (default 30 s):
    /// how soon a row retried by hand (the console, `backstop failed retry`)
    /// is re-driven.
    #[serde(default, with = "humantime_serde_opt")]
    pub scan_interval: Option<Duration>,
    /// How long after it is stored a row is first due (default 60 s).
    #[serde(default, with = "humantime_serde_opt")]
    pub first_redrive: Option<Duration>,
}

impl StoreConfig {
    /// The default of [`scan_interval`](Self::scan_interval).
    pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(30);
    /// The default of [`first_redrive`](Self::first_redrive).
    pub const DEFAULT_FIRST_REDRIVE: Duration = Duration::from_secs(60);
}

/// `[scanner]`: the scanners `backstop run` starts, one per queue whose
/// exhausted messages go to the store (see [`crate::store::Scanner`]).
/// Every key is optional; the defaults are [`ScannerConfig::default`](crate::store::ScannerConfig)'s.
///
/// ```
/// let config = backstop::config::Config::parse(
///     "[store]\nurl = \"sqlite://b.db\"\n[scanner]\ninterval = \"5s\"\nbatch = 50\n",
///     "backstop.toml",
/// ).expect("valid");
/// let scanner = config.scanner_config("orders").expect("on: a store is set");
/// assert_eq!((scanner.interval.as_secs(), scanner.batch), (5, 50));
/// assert_eq!(scanner.queue.as_deref(), Some("orders"));
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ScannerSettings {
    /// Whether the scanners run (default: on when `[store] url` is set).
    pub enabled: Option<bool>,
    /// The pause between scans (default `30s`). `[store] scan_interval` is
    /// its older spelling.
    #[serde(default, with = "humantime_serde_opt")]
    pub interval: Option<Duration>,
    /// Rows claimed per scan (default 500).
    pub batch: Option<u32>,
    /// Re-drives of a row before it needs review (default 5).
    pub max_attempts: Option<u32>,
    /// How long a claim holds a row (default `60s`, at least `1s`).
    #[serde(default, with = "humantime_serde_opt")]
    pub lease: Option<Duration>,
    /// The first back-off after a failed re-drive, doubled each time up to
    /// an hour (default `60s`).
    #[serde(default, with = "humantime_serde_opt")]
    pub backoff: Option<Duration>,
}

/// The shortest `[scanner] lease`: a claim must outlast a re-drive, whose
/// publish is confirmed within half the lease, and the leases of scanners on
/// several hosts are compared across their clocks.
pub const MIN_SCANNER_LEASE: Duration = Duration::from_secs(10);

/// The shortest `[scanner] interval`: each scan opens a channel.
pub const MIN_SCANNER_INTERVAL: Duration = Duration::from_millis(100);

/// The largest `breaker.window`.
pub const MAX_BREAKER_WINDOW: usize = 100_000;

/// The largest `breaker.successes_to_close`.
pub const MAX_SUCCESSES_TO_CLOSE: u32 = 1_000;

impl Config {
    /// Whether `backstop run` starts its scanners: a store is set and
    /// `[scanner] enabled` is not `false`.
    pub fn scanner_enabled(&self) -> bool {
        self.store.url.is_some() && self.scanner.enabled.unwrap_or(true)
    }

    /// The scanner interval in effect: `[scanner] interval`, else its older
    /// spelling `[store] scan_interval`, else 30 s.
    pub fn scan_interval(&self) -> Duration {
        self.scanner
            .interval
            .or(self.store.scan_interval)
            .unwrap_or(StoreConfig::DEFAULT_SCAN_INTERVAL)
    }

    /// The one conversion of `[scanner]` into the configuration of the
    /// scanner that re-drives `queue`'s rows; `None` when the scanners are
    /// off ([`scanner_enabled`](Self::scanner_enabled)).
    pub fn scanner_config(&self, queue: &str) -> Option<crate::store::ScannerConfig> {
        if !self.scanner_enabled() {
            return None;
        }
        let s = &self.scanner;
        let defaults = crate::store::ScannerConfig::default();
        Some(crate::store::ScannerConfig {
            queue: Some(queue.to_owned()),
            interval: self.scan_interval(),
            batch: s.batch.map_or(defaults.batch, i64::from),
            max_attempts: s.max_attempts.map_or(defaults.max_attempts, i64::from),
            lease: s.lease.unwrap_or(defaults.lease),
            backoff: s.backoff.unwrap_or(defaults.backoff),
            ..defaults
        })
    }

    /// The key (in `[scanner]`, or `[store]` for the older spelling) and the
    /// reason of the first bad scanner setting.
    fn check_scanner(&self) -> std::result::Result<(), (&'static str, &'static str, String)> {
        let s = &self.scanner;
        if s.interval.is_some() && self.store.scan_interval.is_some() {
            return Err((
                "scanner",
                "interval",
                "store.scan_interval is the older spelling of scanner.interval: set one".into(),
            ));
        }
        let too_short = format!(
            "must be at least {} (each scan opens a channel)",
            humantime::format_duration(MIN_SCANNER_INTERVAL)
        );
        if s.interval.is_some_and(|d| d < MIN_SCANNER_INTERVAL) {
            return Err(("scanner", "interval", too_short));
        }
        if self
            .store
            .scan_interval
            .is_some_and(|d| d < MIN_SCANNER_INTERVAL)
        {
            return Err(("store", "scan_interval", too_short));
        }
        if s.batch == Some(0) {
            return Err(("scanner", "batch", "must be at least 1".into()));
        }
        if s.max_attempts == Some(0) {
            return Err(("scanner", "max_attempts", "must be at least 1".into()));
        }
        if s.lease.is_some_and(|d| d < MIN_SCANNER_LEASE) {
            return Err((
                "scanner",
                "lease",
                format!(
                    "must be at least {}: a claim must outlast a re-drive, whose publish is \
                     confirmed within half the lease",
                    humantime::format_duration(MIN_SCANNER_LEASE)
                ),
            ));
        }
        if s.backoff.is_some_and(|d| d.is_zero()) {
            return Err(("scanner", "backoff", "must be above zero".into()));
        }
        if s.enabled == Some(true) && self.store.url.is_none() {
            return Err((
                "scanner",
                "enabled",
                "the scanners re-drive the compensation store's rows: add [store] with a url"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// `dedup.*` of a consumer: deduplication by business key.
///
/// ```
/// # #[derive(serde::Deserialize)] struct C { dedup: backstop::config::DedupSettings }
/// let c: C = toml::from_str(r#"
///     dedup.key = "json:/order_id"
///     dedup.ttl = "7d"
/// "#).expect("valid");
/// assert_eq!(c.dedup.key.to_string(), "json:/order_id");
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DedupSettings {
    /// `message-id`, `header:NAME` or `json:/pointer`.
    #[serde(deserialize_with = "from_str")]
    pub key: DedupKey,
    /// How long a handled key is remembered (default 7 days).
    #[serde(default, with = "humantime_serde_opt")]
    pub ttl: Option<Duration>,
    /// How long a claim holds a key while its handler runs (default 5 minutes).
    #[serde(default, with = "humantime_serde_opt")]
    pub lease: Option<Duration>,
    /// Where keys are kept: `memory`, `sqlite://...`, `postgres://...` or
    /// `redis://...`. Defaults to the compensation store's URL, or memory
    /// when there is none.
    pub store: Option<String>,
    /// `process` (default) or `reject`: what to do with a message that has
    /// no key.
    #[serde(default, deserialize_with = "from_str_opt")]
    pub missing_key: Option<MissingKey>,
}

impl DedupSettings {
    /// The store URL these settings use, given the compensation store's.
    pub fn store_url<'a>(&'a self, compensation_store: Option<&'a str>) -> &'a str {
        self.store
            .as_deref()
            .or(compensation_store)
            .unwrap_or("memory")
    }

    /// Connects to the store and builds the consumer's dedup configuration.
    pub async fn build(
        &self,
        compensation_store: Option<&str>,
    ) -> std::result::Result<DedupConfig, DedupError> {
        let store = crate::dedup::connect(self.store_url(compensation_store)).await?;
        let mut config = DedupConfig::new(self.key.clone(), store)
            .missing_key(self.missing_key.unwrap_or_default());
        if let Some(ttl) = self.ttl {
            config = config.ttl(ttl);
        }
        if let Some(lease) = self.lease {
            config = config.lease(lease);
        }
        Ok(config)
    }
}

fn from_str<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn from_str_opt<'de, D, T>(deserializer: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    from_str(deserializer).map(Some)
}

/// `[broker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// The broker's AMQP URI.
    pub uri: Option<String>,
    /// More addresses for failover, tried after `uri` in turn.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The heartbeat, for example `"10s"`.
    #[serde(default, with = "humantime_serde_opt")]
    pub heartbeat: Option<Duration>,
    /// The connection name shown by the broker.
    pub connection_name: Option<String>,
    /// `broker.tls.*`: certificates for `amqps://` addresses.
    #[serde(default)]
    pub tls: TlsSettings,
    /// A file holding the password for `uri` (its first line), so that the
    /// secret stays out of the configuration file.
    pub password_file: Option<std::path::PathBuf>,
}

/// `uri` with its password replaced by `password`, percent-encoded.
fn with_password(uri: &str, password: &str) -> std::result::Result<String, String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| "the URI has no scheme".to_owned())?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (userinfo, host) = authority
        .rsplit_once('@')
        .ok_or_else(|| "the URI names no user to go with password_file".to_owned())?;
    let user = userinfo.split(':').next().unwrap_or(userinfo);
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    Ok(format!("{scheme}://{user}:{encoded}@{host}{path}"))
}

/// `broker.tls.*`. The broker's certificate is verified unless
/// `insecure_skip_verify` says otherwise.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsSettings {
    /// A PEM file of CA certificates to trust besides the system's.
    pub ca: Option<std::path::PathBuf>,
    /// The client certificate (PEM) for mutual TLS.
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<std::path::PathBuf>,
    /// The name the broker's certificate must list, when it differs from the
    /// URI's host (a tunnel, a load balancer's address).
    pub server_name: Option<String>,
    /// Accepts any certificate from the broker. Insecure: for test set-ups
    /// only; logged as a warning at every connect.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

impl TlsSettings {
    /// Reads the files into a [`crate::connection::TlsConfig`], naming the
    /// key and file of the first problem.
    pub fn load(&self) -> Result<crate::connection::TlsConfig> {
        let mut tls = crate::connection::TlsConfig::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_file(ca)?;
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => tls = tls.client_cert_files(cert, key)?,
            (None, None) => {}
            _ => {
                return Err(Error::Config {
                    key: "broker.tls",
                    reason: "cert and key go together: set both or neither".into(),
                });
            }
        }
        if let Some(name) = &self.server_name {
            tls = tls.server_name(name.clone());
        }
        Ok(tls.insecure_skip_verify(self.insecure_skip_verify))
    }
}

/// The heartbeat `[broker]` asks for when it sets none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

impl Config {
    /// The one conversion of `[broker]` and `[reconnect]` into a
    /// [`ConnectionConfig`](crate::connection::ConnectionConfig): the URI
    /// (default [`DEFAULT_URI`](crate::connection::DEFAULT_URI), its password
    /// from `password_file` already applied by [`Config::parse`]), the
    /// failover `addresses`, the `heartbeat` (default 10 s), the connection
    /// name (`default_name` unless `connection_name` is set), every
    /// `tls.*` file and switch, and the reconnect backoff. An
    /// `auth_mechanism=external` URI logs in with `tls.cert`; the supervisor
    /// checks that both are there when it starts.
    ///
    /// Every command that connects builds its connection here, so a setting
    /// cannot be honoured by one command and forgotten by another.
    ///
    /// ```
    /// let config = backstop::config::Config::parse(
    ///     "[broker]\nuri = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nconnection_name = \"orders\"\n",
    ///     "backstop.toml",
    /// ).expect("valid");
    /// let connection = config.connection_config("backstop-run").expect("TLS files readable");
    /// assert!(format!("{connection:?}").contains("\"orders\""));
    /// ```
    pub fn connection_config(
        &self,
        default_name: &str,
    ) -> Result<crate::connection::ConnectionConfig> {
        let broker = &self.broker;
        let uri = broker
            .uri
            .clone()
            .unwrap_or_else(|| crate::connection::DEFAULT_URI.to_owned());
        let defaults = crate::connection::Backoff::default();
        let mut connection = crate::connection::ConnectionConfig::new(uri)
            .heartbeat(broker.heartbeat.unwrap_or(DEFAULT_HEARTBEAT))
            .connection_name(
                broker
                    .connection_name
                    .clone()
                    .unwrap_or_else(|| default_name.to_owned()),
            )
            .tls(broker.tls.load()?)
            .backoff(crate::connection::Backoff {
                initial: self.reconnect.initial.unwrap_or(defaults.initial),
                max: self.reconnect.max.unwrap_or(defaults.max),
                max_attempts: self.reconnect.max_attempts,
            });
        for address in &broker.addresses {
            connection = connection.address(address);
        }
        Ok(connection)
    }

    /// The one conversion of `[publish]` into the sidecar's
    /// [`Publisher`](crate::publish::Publisher): a connection of its own
    /// from `[broker]` and `[reconnect]` ([`connection_config`](Self::connection_config),
    /// so the same addresses, TLS and credentials as the consumers), named
    /// `"<connection_name> (publisher)"` to tell it apart on the broker, the
    /// channels, the confirm timeout, and the spool with its bounds. `None`
    /// without a `[publish]` section.
    pub fn publisher(
        &self,
        default_name: &str,
    ) -> Result<Option<crate::publish::PublisherBuilder>> {
        let Some(settings) = &self.publish else {
            return Ok(None);
        };
        let name = self
            .broker
            .connection_name
            .as_deref()
            .unwrap_or(default_name);
        let connection = self
            .connection_config(default_name)?
            .connection_name(format!("{name} (publisher)"));
        let mut builder = crate::publish::Publisher::builder(connection)
            .channels(settings.channels())
            .confirm_timeout(settings.confirm_timeout());
        if let Some(spool) = &settings.spool {
            let (messages, bytes) = settings.spool_limits();
            builder = builder.spool(spool).spool_limits(messages, bytes);
        }
        Ok(Some(builder))
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses `text`; `origin` names it in errors. Secrets may come from
    /// the environment instead of the file: `BACKSTOP_BROKER_URI` replaces
    /// `[broker] uri`, `BACKSTOP_STORE_URL` replaces `[store] url` and
    /// `BACKSTOP_PUBLISH_TOKEN` replaces `[publish] token` (when there is a
    /// `[publish]` section).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut config: Config = toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: origin.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        if let Ok(uri) = std::env::var("BACKSTOP_BROKER_URI") {
            config.broker.uri = Some(uri);
        }
        if let Ok(url) = std::env::var("BACKSTOP_STORE_URL") {
            config.store.url = Some(url);
        }
        if let (Some(publish), Ok(token)) = (
            config.publish.as_mut(),
            std::env::var("BACKSTOP_PUBLISH_TOKEN"),
        ) {
            publish.token = Some(Secret(token));
        }
        if let Some(console) = config.console.as_mut() {
            console.apply_env();
        }
        if let Some(file) = config.broker.password_file.clone() {
            let fail = |message: String| Error::ConfigFile {
                path: origin.to_owned(),
                message: at_path(
                    text,
                    &key_path(Some(("broker", 0)), "password_file"),
                    &message,
                ),
            };
            let secret = std::fs::read_to_string(&file)
                .map_err(|e| fail(format!("cannot read {}: {e}", file.display())))?;
            let password = secret.lines().next().unwrap_or("");
            let uri = config
                .broker
                .uri
                .clone()
                .unwrap_or_else(|| crate::connection::DEFAULT_URI.to_owned());
            config.broker.uri = Some(with_password(&uri, password).map_err(fail)?);
            // Every address of a cluster logs in the same way: failing over
            // to an address without the password would be ACCESS_REFUSED.
            for address in &mut config.broker.addresses {
                *address = with_password(address, password).map_err(fail)?;
            }
        }
        let fail = |table: Option<(&str, usize)>, key: &str, message: String| Error::ConfigFile {
            path: origin.to_owned(),
            message: at_path(text, &key_path(table, key), &message),
        };
        if let Some(uri) = &config.broker.uri {
            crate::connection::parse_uri(uri)
                .map_err(|e| fail(Some(("broker", 0)), "uri", e.to_string()))?;
        }
        for uri in &config.broker.addresses {
            crate::connection::parse_uri(uri)
                .map_err(|e| fail(Some(("broker", 0)), "addresses", e.to_string()))?;
        }
        if let Some(heartbeat) = config.broker.heartbeat {
            let shown = humantime::format_duration(heartbeat);
            if heartbeat < Duration::from_secs(1) {
                return Err(fail(
                    Some(("broker", 0)),
                    "heartbeat",
                    format!(
                        "\"{shown}\" is below 1s. {}",
                        crate::connection::HEARTBEAT_RULE
                    ),
                ));
            }
            if heartbeat.as_secs() > u64::from(u16::MAX) {
                return Err(fail(
                    Some(("broker", 0)),
                    "heartbeat",
                    format!("\"{shown}\" is above the AMQP limit of 65535s"),
                ));
            }
        }
        config
            .metrics
            .listen_addr()
            .map_err(|e| fail(Some(("metrics", 0)), "listen", e))?;
        if let Some(publish) = &config.publish {
            publish
                .check()
                .map_err(|(key, e)| fail(Some(("publish", 0)), key, e))?;
        }
        if let Some(console) = &config.console {
            console
                .check()
                .map_err(|(key, e)| fail(Some(("console", 0)), key, e))?;
        }
        for (i, consumer) in config.consumers.iter_mut().enumerate() {
            for (name, value) in consumer.handler.http.headers.iter_mut() {
                let fail = |message: String| {
                    let mut path = key_path(Some(("consumer", i)), "handler.http.headers");
                    path.push(Step::Key(name.clone()));
                    Error::ConfigFile {
                        path: origin.to_owned(),
                        message: at_path(text, &path, &message),
                    }
                };
                if let Some(problem) = header_name_problem(name) {
                    return Err(fail(problem));
                }
                let resolved = interpolate(value.expose(), |n| std::env::var(n)).map_err(&fail)?;
                // Field values: visible ASCII, spaces and tabs, or bytes
                // above 0x7f (RFC 9110 5.5); no line breaks.
                if resolved
                    .bytes()
                    .any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
                {
                    return Err(fail(
                        "the value holds a control character (a line break?), which a header \
                         cannot carry"
                            .into(),
                    ));
                }
                *value = Secret(resolved);
            }
        }
        config
            .check_scanner()
            .map_err(|(table, key, e)| fail(Some((table, 0)), key, e))?;
        let mut queues = std::collections::HashSet::new();
        for (i, consumer) in config.consumers.iter().enumerate() {
            let table = Some(("consumer", i));
            if consumer.queue.is_empty() {
                return Err(fail(table, "queue", "the queue name is empty".into()));
            }
            if !queues.insert(consumer.queue.as_str()) {
                return Err(fail(
                    table,
                    "queue",
                    format!(
                        "{:?} is consumed by two [[consumer]] blocks",
                        consumer.queue
                    ),
                ));
            }
            if let Some(kind) = &consumer.queue_type
                && kind != "classic"
                && kind != "quorum"
            {
                return Err(fail(
                    table,
                    "queue_type",
                    format!("{kind:?} is not \"classic\" or \"quorum\""),
                ));
            }
            if consumer.delivery_limit.is_some() && consumer.queue_type.as_deref() != Some("quorum")
            {
                return Err(fail(
                    table,
                    "delivery_limit",
                    "only quorum queues have a delivery limit: set queue_type = \"quorum\"".into(),
                ));
            }
            consumer
                .check_topology()
                .map_err(|(key, e)| fail(table, &key, e))?;
            if consumer.prefetch == Some(0) {
                return Err(fail(table, "prefetch", "must be at least 1".into()));
            }
            if consumer.concurrency == Some(0) {
                return Err(fail(table, "concurrency", "must be at least 1".into()));
            }
            if consumer.consumer_timeout.is_some_and(|t| t.is_zero()) {
                return Err(fail(table, "consumer_timeout", "must be above zero".into()));
            }
            if consumer.max_message_size == Some(0) {
                return Err(fail(table, "max_message_size", "must be at least 1".into()));
            }
            let url = &consumer.handler.http.url;
            match url::Url::parse(url) {
                Ok(parsed)
                    if matches!(parsed.scheme(), "http" | "https")
                        && parsed.host_str().is_some_and(|h| !h.is_empty()) => {}
                Ok(_) => {
                    return Err(fail(
                        table,
                        "handler.http.url",
                        format!("{url:?} is not an http:// or https:// URL with a host"),
                    ));
                }
                Err(e) => {
                    return Err(fail(
                        table,
                        "handler.http.url",
                        format!("{url:?} is not a valid http:// or https:// URL: {e}"),
                    ));
                }
            }
            if let Some(tls) = &consumer.handler.http.tls {
                if !url::Url::parse(url).is_ok_and(|u| u.scheme() == "https") {
                    return Err(fail(
                        table,
                        "handler.http.tls",
                        format!("TLS settings need an https:// url; {url:?} is plain HTTP"),
                    ));
                }
                tls.load()
                    .and_then(|tls| tls.client_config().map(drop))
                    .map_err(|e| match e {
                        Error::Config { key, reason } => fail(table, key, reason),
                        other => fail(table, "handler.http.tls", other.to_string()),
                    })?;
            }
            let timeout = consumer.handler.http.timeout();
            if timeout.is_zero() {
                return Err(fail(
                    table,
                    "handler.http.timeout",
                    "must be above zero".into(),
                ));
            }
            if let Some(dedup) = &consumer.dedup {
                let lease = dedup.lease.unwrap_or(crate::dedup::DEFAULT_LEASE);
                if lease < timeout {
                    return Err(fail(
                        table,
                        if dedup.lease.is_some() {
                            "dedup.lease"
                        } else {
                            "dedup"
                        },
                        format!(
                            "the lease ({}) is shorter than handler.http.timeout ({}): a key \
                             could be claimed again while its first handler call still runs",
                            humantime::format_duration(lease),
                            humantime::format_duration(timeout)
                        ),
                    ));
                }
            }
            if let Some(breaker) = &consumer.breaker {
                breaker.check().map_err(|(key, e)| fail(table, key, e))?;
            }
            if consumer.retry.exhausted == Some(Exhausted::Store) && config.store.url.is_none() {
                return Err(fail(
                    table,
                    "retry.exhausted",
                    "\"store\" needs a compensation store: add [store] with a url".into(),
                ));
            }
        }
        Ok(config)
    }

    /// The configuration as TOML, with every password redacted: what
    /// `backstop config check` prints. Every key the file accepts is shown,
    /// with its default when the file does not set it (optional keys without
    /// a default only when set). Written by the `toml` serializer, so the
    /// text parses back (strings are TOML strings, not Rust's escapes).
    pub fn normalized(&self) -> String {
        use toml::{Table, Value};
        fn put(table: &mut Table, key: &str, value: Value) {
            table.insert(key.to_owned(), value);
        }
        fn text(s: &str) -> Value {
            Value::String(s.to_owned())
        }
        fn redact(uri: &str) -> Value {
            Value::String(crate::RedactedUri::new(uri).to_string())
        }
        fn duration(d: Duration) -> Value {
            Value::String(humantime::format_duration(d).to_string())
        }
        fn int(n: impl TryInto<i64>) -> Value {
            Value::Integer(n.try_into().unwrap_or(i64::MAX))
        }
        fn path(p: &Path) -> Value {
            Value::String(p.display().to_string())
        }
        fn list(items: impl IntoIterator<Item = Value>) -> Value {
            Value::Array(items.into_iter().collect())
        }
        let mut root = Table::new();

        let b = &self.broker;
        let mut broker = Table::new();
        put(
            &mut broker,
            "uri",
            redact(b.uri.as_deref().unwrap_or(crate::connection::DEFAULT_URI)),
        );
        put(
            &mut broker,
            "addresses",
            list(b.addresses.iter().map(|a| redact(a))),
        );
        put(
            &mut broker,
            "heartbeat",
            duration(b.heartbeat.unwrap_or(DEFAULT_HEARTBEAT)),
        );
        if let Some(name) = &b.connection_name {
            put(&mut broker, "connection_name", text(name));
        }
        if let Some(file) = &b.password_file {
            put(&mut broker, "password_file", path(file));
        }
        let mut tls = Table::new();
        for (key, file) in [
            ("ca", &b.tls.ca),
            ("cert", &b.tls.cert),
            ("key", &b.tls.key),
        ] {
            if let Some(file) = file {
                put(&mut tls, key, path(file));
            }
        }
        if let Some(name) = &b.tls.server_name {
            put(&mut tls, "server_name", text(name));
        }
        put(
            &mut tls,
            "insecure_skip_verify",
            Value::Boolean(b.tls.insecure_skip_verify),
        );
        put(&mut broker, "tls", Value::Table(tls));
        put(&mut root, "broker", Value::Table(broker));

        let defaults = crate::connection::Backoff::default();
        let mut reconnect = Table::new();
        put(
            &mut reconnect,
            "initial",
            duration(self.reconnect.initial.unwrap_or(defaults.initial)),
        );
        put(
            &mut reconnect,
            "max",
            duration(self.reconnect.max.unwrap_or(defaults.max)),
        );
        if let Some(n) = self.reconnect.max_attempts {
            put(&mut reconnect, "max_attempts", int(n));
        }
        put(&mut root, "reconnect", Value::Table(reconnect));

        let st = &self.store;
        let mut store = Table::new();
        if let Some(url) = &st.url {
            put(&mut store, "url", redact(url));
        }
        if let Some(retention) = st.retention {
            put(&mut store, "retention", duration(retention));
        }
        put(
            &mut store,
            "first_redrive",
            duration(
                st.first_redrive
                    .unwrap_or(StoreConfig::DEFAULT_FIRST_REDRIVE),
            ),
        );
        put(&mut root, "store", Value::Table(store));

        // The scanner's interval is shown here whichever spelling set it.
        let scanner_defaults = crate::store::ScannerConfig::default();
        let sc = &self.scanner;
        let mut scanner = Table::new();
        put(
            &mut scanner,
            "enabled",
            Value::Boolean(self.scanner_enabled()),
        );
        put(&mut scanner, "interval", duration(self.scan_interval()));
        put(
            &mut scanner,
            "batch",
            int(sc.batch.map_or(scanner_defaults.batch, i64::from)),
        );
        put(
            &mut scanner,
            "max_attempts",
            int(sc
                .max_attempts
                .map_or(scanner_defaults.max_attempts, i64::from)),
        );
        put(
            &mut scanner,
            "lease",
            duration(sc.lease.unwrap_or(scanner_defaults.lease)),
        );
        put(
            &mut scanner,
            "backoff",
            duration(sc.backoff.unwrap_or(scanner_defaults.backoff)),
        );
        put(&mut root, "scanner", Value::Table(scanner));

        let mut metrics = Table::new();
        put(
            &mut metrics,
            "listen",
            text(
                self.metrics
                    .listen
                    .as_deref()
                    .unwrap_or(DEFAULT_METRICS_LISTEN),
            ),
        );
        put(&mut root, "metrics", Value::Table(metrics));

        if let Some(p) = &self.publish {
            let mut publish = Table::new();
            put(
                &mut publish,
                "listen",
                text(p.listen.as_deref().unwrap_or(DEFAULT_PUBLISH_LISTEN)),
            );
            if p.token.is_some() {
                put(&mut publish, "token", text("***"));
            }
            if let Some(spool) = &p.spool {
                put(&mut publish, "spool", path(spool));
                let (messages, bytes) = p.spool_limits();
                put(&mut publish, "spool_max_messages", int(messages));
                put(&mut publish, "spool_max_bytes", int(bytes));
            }
            put(&mut publish, "channels", int(p.channels()));
            put(
                &mut publish,
                "confirm_timeout",
                duration(p.confirm_timeout()),
            );
            put(&mut publish, "max_message_size", int(p.max_message_size()));
            put(&mut root, "publish", Value::Table(publish));
        }

        if let Some(c) = &self.console {
            let mut console = Table::new();
            put(
                &mut console,
                "listen",
                text(c.listen.as_deref().unwrap_or(DEFAULT_CONSOLE_LISTEN)),
            );
            if c.token.is_some() {
                put(&mut console, "token", text("***"));
            }
            if let Some(user) = &c.user {
                put(&mut console, "user", text(user));
            }
            if c.password.is_some() {
                put(&mut console, "password", text("***"));
            }
            put(&mut console, "session_ttl", duration(c.session_ttl()));
            put(
                &mut console,
                "allowed_hosts",
                list(c.allowed_hosts.iter().map(|h| text(h))),
            );
            put(&mut root, "console", Value::Table(console));
        }

        let mut consumers = Vec::new();
        for c in &self.consumers {
            let mut consumer = Table::new();
            put(&mut consumer, "queue", text(&c.queue));
            put(
                &mut consumer,
                "queue_type",
                text(c.queue_type.as_deref().unwrap_or("classic")),
            );
            if let Some(limit) = c.delivery_limit {
                put(&mut consumer, "delivery_limit", int(limit));
            }
            c.normalized_topology(&mut consumer);
            put(&mut consumer, "prefetch", int(c.prefetch.unwrap_or(100)));
            put(
                &mut consumer,
                "concurrency",
                int(c.concurrency.unwrap_or(8)),
            );
            put(
                &mut consumer,
                "shutdown_timeout",
                duration(c.shutdown_timeout.unwrap_or(Duration::from_secs(30))),
            );
            put(
                &mut consumer,
                "max_message_size",
                int(c
                    .max_message_size
                    .unwrap_or(crate::consumer::DEFAULT_MAX_MESSAGE_SIZE)),
            );
            put(
                &mut consumer,
                "consumer_timeout",
                duration(
                    c.consumer_timeout
                        .unwrap_or(crate::consumer::DEFAULT_CONSUMER_TIMEOUT),
                ),
            );
            let mut http = Table::new();
            put(&mut http, "url", redact(&c.handler.http.url));
            put(&mut http, "timeout", duration(c.handler.http.timeout()));
            let mut headers = Table::new();
            for name in c.handler.http.headers.keys() {
                put(&mut headers, name, text("***"));
            }
            put(&mut http, "headers", Value::Table(headers));
            if let Some(t) = &c.handler.http.tls {
                let mut tls = Table::new();
                for (key, file) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
                    if let Some(file) = file {
                        put(&mut tls, key, path(file));
                    }
                }
                put(&mut http, "tls", Value::Table(tls));
            }
            put(
                &mut http,
                "response",
                text(c.handler.http.response().as_str()),
            );
            let mut handler = Table::new();
            put(&mut handler, "http", Value::Table(http));
            put(&mut consumer, "handler", Value::Table(handler));
            let mut retry = Table::new();
            put(
                &mut retry,
                "delays",
                list(c.retry.delays.iter().map(|d| duration(*d))),
            );
            put(&mut retry, "immediate", int(c.retry.immediate.unwrap_or(0)));
            let exhausted = match c.retry.exhausted.unwrap_or_default() {
                Exhausted::DeadLetter => "dead-letter",
                Exhausted::Store => "store",
            };
            put(&mut retry, "exhausted", text(exhausted));
            put(&mut consumer, "retry", Value::Table(retry));
            if let Some(d) = &c.dedup {
                let mut dedup = Table::new();
                put(&mut dedup, "key", text(&d.key.to_string()));
                put(
                    &mut dedup,
                    "ttl",
                    duration(d.ttl.unwrap_or(crate::dedup::DEFAULT_TTL)),
                );
                put(
                    &mut dedup,
                    "lease",
                    duration(d.lease.unwrap_or(crate::dedup::DEFAULT_LEASE)),
                );
                put(
                    &mut dedup,
                    "store",
                    redact(d.store_url(self.store.url.as_deref())),
                );
                let missing = match d.missing_key.unwrap_or_default() {
                    MissingKey::Process => "process",
                    MissingKey::Reject => "reject",
                };
                put(&mut dedup, "missing_key", text(missing));
                put(&mut consumer, "dedup", Value::Table(dedup));
            }
            if let Some(b) = &c.breaker {
                let b = b.config();
                let mut breaker = Table::new();
                put(&mut breaker, "window", int(b.window));
                put(&mut breaker, "min_calls", int(b.min_calls));
                put(&mut breaker, "failure_ratio", Value::Float(b.failure_ratio));
                put(&mut breaker, "cooldown", duration(b.cooldown));
                put(
                    &mut breaker,
                    "successes_to_close",
                    int(b.successes_to_close),
                );
                put(&mut consumer, "breaker", Value::Table(breaker));
            }
            consumers.push(Value::Table(consumer));
        }
        if !consumers.is_empty() {
            put(&mut root, "consumer", Value::Array(consumers));
        }
        // Serializing a table of strings, numbers and booleans cannot fail;
        // should it ever, the message says so rather than printing nothing.
        let shown = toml::to_string(&root)
            .unwrap_or_else(|e| format!("# cannot show the configuration: {e}\n"));
        if b.tls.insecure_skip_verify {
            format!("# INSECURE: broker.tls.insecure_skip_verify accepts any certificate\n{shown}")
        } else {
            shown
        }
    }
}

/// One step of a key path: a key of a table, or an index into an array of
/// tables (`consumer[0]`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The path of `key` (dotted) in the `index`th `[table]` (or `[[table]]`).
fn key_path(table: Option<(&str, usize)>, key: &str) -> Vec<Step> {
    let mut path = Vec::new();
    match table {
        Some(("consumer", i)) => path.extend([Step::Key("consumer".into()), Step::Index(i)]),
        Some((t, _)) => path.push(Step::Key(t.into())),
        None => {}
    }
    for part in key.split('.') {
        // `bindings[1]`: a key, then an index into its array.
        let indexed = part
            .strip_suffix(']')
            .and_then(|p| p.split_once('['))
            .and_then(|(k, i)| Some((k, i.parse::<usize>().ok()?)));
        match indexed {
            Some((k, i)) => path.extend([Step::Key(k.into()), Step::Index(i)]),
            None => path.push(Step::Key(part.into())),
        }
    }
    path
}

/// A key path as TOML writes it: `consumer[0].handler.http.url`, with the
/// keys that are not bare quoted (`broker."odd key"`).
fn show_path(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Index(i) => out.push_str(&format!("[{i}]")),
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&toml::Value::String(key.clone()).to_string());
                }
            }
        }
    }
    out
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[..offset].matches('\n').count() + 1;
    (line, text[line_start..offset].chars().count() + 1)
}

/// Where `path` is written in the parsed document: the span of its last key
/// (or array element), or of the nearest ancestor that is written.
fn span_of(doc: &toml::de::DeTable<'_>, path: &[Step]) -> Option<std::ops::Range<usize>> {
    let mut span = None;
    let mut table = Some(doc);
    let mut array: Option<&toml::de::DeArray<'_>> = None;
    for step in path {
        let value = match step {
            Step::Key(key) => {
                let (k, v) = table?.iter().find(|(k, _)| k.get_ref() == key)?;
                span = Some(k.span());
                v
            }
            Step::Index(i) => {
                let v = array?.get(*i)?;
                span = Some(v.span());
                v
            }
        };
        table = value.get_ref().as_table();
        array = value.get_ref().as_array();
        if table.is_none() && array.is_none() {
            break;
        }
    }
    span
}

/// The path of the key or value written at byte `offset`, searched depth
/// first through the parsed document; true when found.
fn path_at(table: &toml::de::DeTable<'_>, offset: usize, path: &mut Vec<Step>) -> bool {
    let covers = |span: std::ops::Range<usize>| span.contains(&offset) || span.start == offset;
    for (key, value) in table.iter() {
        path.push(Step::Key(key.get_ref().to_string()));
        if covers(key.span()) || value_at(value, offset, path) || covers(value.span()) {
            return true;
        }
        path.pop();
    }
    false
}

/// [`path_at`] inside one value (a table, or an array of them).
fn value_at(
    value: &toml::Spanned<toml::de::DeValue<'_>>,
    offset: usize,
    path: &mut Vec<Step>,
) -> bool {
    if let Some(table) = value.get_ref().as_table() {
        return path_at(table, offset, path);
    }
    let Some(array) = value.get_ref().as_array() else {
        return false;
    };
    for (i, item) in array.iter().enumerate() {
        path.push(Step::Index(i));
        let span = item.span();
        if value_at(item, offset, path) || span.contains(&offset) || span.start == offset {
            return true;
        }
        path.pop();
    }
    false
}

/// `line L, column C, key K: message` for the key at `path`, located by the
/// TOML parser's spans; `key K: message` when the key is not in `text`
/// (a default, or a value from the environment).
fn at_path(text: &str, path: &[Step], message: &str) -> String {
    let name = show_path(path);
    let span = toml::de::DeTable::parse(text)
        .ok()
        .and_then(|doc| span_of(doc.get_ref(), path));
    match span {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("line {line}, column {column}, key {name}: {message}")
        }
        None => format!("key {name}: {message}"),
    }
}

/// `line L, column C, key K: message`, from the error's byte span: the key
/// is the path of the key or value the parser's span points at, found in
/// the parser's own spanned document (plus the missing or unknown field).
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().to_owned();
    let Some(span) = err.span() else {
        return message;
    };
    let (line, column) = line_column(text, span.start);
    let mut path = Vec::new();
    if let Ok(doc) = toml::de::DeTable::parse(text) {
        path_at(doc.get_ref(), span.start, &mut path);
    }
    for prefix in ["missing field `", "unknown field `"] {
        if let Some(field) = message
            .strip_prefix(prefix)
            .and_then(|m| m.split('`').next())
            && path.last() != Some(&Step::Key(field.to_owned()))
        {
            path.push(Step::Key(field.to_owned()));
        }
    }
    if path.is_empty() {
        format!("line {line}, column {column}: {message}")
    } else {
        format!(
            "line {line}, column {column}, key {}: {message}",
            show_path(&path)
        )
    }
}

/// Durations written as `"10s"`, `"1m30s"`, `"250ms"`.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer, de::Error};
    use std::time::Duration;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|t| {
            humantime::parse_duration(&t)
                .map_err(|e| D::Error::custom(format!("{t:?} is not a duration like \"10s\": {e}")))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::parse(text, "test.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let err = error_of("[broker]\nuri = \"amqp://127.0.0.1\"\nurl = \"x\"\n");
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("url"), "{err}");
    }

    #[test]
    fn a_bad_uri_or_duration_is_named() {
        let err = error_of("[broker]\nuri = \"http://x\"\n");
        assert!(err.contains("broker.uri"), "{err}");
        let err = error_of("[broker]\nheartbeat = \"soon\"\n");
        assert!(err.contains("line 2") && err.contains("soon"), "{err}");
    }

    #[test]
    fn a_heartbeat_below_one_second_is_refused_with_its_key_and_value() {
        for (value, shown) in [("0s", "\"0s\""), ("500ms", "\"500ms\"")] {
            let err = error_of(&format!("[broker]\nheartbeat = \"{value}\"\n"));
            assert!(err.contains("broker.heartbeat"), "{err}");
            assert!(err.contains(shown), "{err}");
            assert!(err.contains("line 2"), "{err}");
            assert!(err.contains("below 1s"), "{err}");
        }
        let err = error_of("[broker]\nheartbeat = \"20h\"\n");
        assert!(
            err.contains("broker.heartbeat") && err.contains("65535"),
            "{err}"
        );
        let config = Config::parse("[broker]\nheartbeat = \"1s\"\n", "test.toml").expect("valid");
        assert_eq!(config.broker.heartbeat, Some(Duration::from_secs(1)));
    }

    #[derive(Debug, serde::Deserialize)]
    struct WithDedup {
        dedup: DedupSettings,
    }

    #[test]
    fn dedup_settings_parse_and_default_to_the_compensation_store() {
        let c: WithDedup = toml::from_str(
            "dedup.key = \"header:order-id\"\ndedup.ttl = \"1d\"\ndedup.missing_key = \"reject\"\n",
        )
        .expect("valid");
        assert_eq!(c.dedup.key, DedupKey::Header("order-id".into()));
        assert_eq!(c.dedup.ttl, Some(Duration::from_secs(86_400)));
        assert_eq!(c.dedup.missing_key, Some(MissingKey::Reject));
        assert_eq!(c.dedup.store_url(Some("sqlite://b.db")), "sqlite://b.db");
        assert_eq!(c.dedup.store_url(None), "memory");
    }

    #[test]
    fn a_bad_dedup_key_is_named_with_its_line() {
        let text = "\ndedup.key = \"json:order_id\"\n";
        let err = toml::from_str::<WithDedup>(text).expect_err("invalid");
        let message = describe_toml_error(text, &err);
        assert!(message.starts_with("line 2"), "{message}");
        assert!(message.contains("JSON pointer"), "{message}");
    }

    #[test]
    fn the_password_can_come_from_a_file() {
        let path = std::env::temp_dir().join(format!("backstop-pw-{}", std::process::id()));
        std::fs::write(&path, "p@ss:w/rd\n").expect("write");
        let text = format!(
            "[broker]\nuri = \"amqp://orders@127.0.0.1:5672/%2f\"\npassword_file = {:?}\n",
            path.display().to_string()
        );
        let config = Config::parse(&text, "test.toml").expect("valid");
        let uri = config.broker.uri.clone().expect("uri");
        assert_eq!(uri, "amqp://orders:p%40ss%3Aw%2Frd@127.0.0.1:5672/%2f");
        let parsed = crate::connection::parse_uri(&uri).expect("parses");
        assert_eq!(parsed.authority.userinfo.password, "p@ss:w/rd");
        assert!(!config.normalized().contains("p%40ss"));
        let _ = std::fs::remove_file(&path);
        let missing = "[broker]\npassword_file = \"/nonexistent/pw\"\n";
        let err = error_of(missing);
        assert!(
            err.contains("line 2") && err.contains("broker.password_file"),
            "{err}"
        );
    }

    #[test]
    fn the_insecure_switch_and_the_server_name_are_shown_by_config_check() {
        let text = "[broker]\ntls.server_name = \"rabbit.internal\"\n\
                    tls.insecure_skip_verify = true\n";
        let config = Config::parse(text, "test.toml").expect("valid");
        let tls = config.broker.tls.load().expect("loads");
        assert!(tls.is_insecure());
        let shown = config.normalized();
        let table: toml::Table = toml::from_str(&shown).expect("config check prints TOML");
        assert_eq!(
            table["broker"]["tls"]["server_name"].as_str(),
            Some("rabbit.internal"),
            "{shown}"
        );
        assert_eq!(
            table["broker"]["tls"]["insecure_skip_verify"].as_bool(),
            Some(true),
            "{shown}"
        );
        assert!(shown.starts_with("# INSECURE"), "{shown}");
        let secure = Config::parse("", "empty.toml").expect("valid");
        assert!(!secure.broker.tls.load().expect("loads").is_insecure());
        assert!(!secure.normalized().contains("INSECURE"));
    }

    /// Every `[broker]` and `[reconnect]` setting reaches the connection.
    #[test]
    fn password_file_reaches_every_address() {
        let file = std::env::temp_dir().join(format!("backstop-pw-{}", std::process::id()));
        std::fs::write(&file, "from-file-pw\n").expect("write the password file");
        let text = format!(
            "[broker]\nuri = \"amqp://svc@rabbit-a:5672/%2f\"\n\
             addresses = [\"amqp://svc@rabbit-b:5672/%2f\"]\npassword_file = {:?}\n",
            file.display().to_string()
        );
        let config = Config::parse(&text, "test.toml").expect("valid");
        let _ = std::fs::remove_file(&file);
        assert_eq!(
            config.broker.uri.as_deref(),
            Some("amqp://svc:from-file-pw@rabbit-a:5672/%2f")
        );
        assert_eq!(
            config.broker.addresses,
            ["amqp://svc:from-file-pw@rabbit-b:5672/%2f"],
            "failing over to an address without the password is ACCESS_REFUSED"
        );
    }

    #[test]
    fn the_connection_config_carries_every_broker_setting() {
        let text = "[broker]\nuri = \"amqps://svc:pw@rabbit-a:5671/%2f\"\n\
                    addresses = [\"amqps://svc:pw@rabbit-b:5671/%2f\"]\n\
                    heartbeat = \"3s\"\nconnection_name = \"orders-sidecar\"\n\
                    tls.server_name = \"rabbit.internal\"\ntls.insecure_skip_verify = true\n\
                    [reconnect]\ninitial = \"50ms\"\nmax = \"2s\"\nmax_attempts = 7\n";
        let shows = |text: &str, name: &str, parts: &[&str]| {
            let config = Config::parse(text, "test.toml").expect("valid");
            let shown = format!("{:?}", config.connection_config(name).expect("builds"));
            for part in parts {
                assert!(shown.contains(part), "{part:?} not in {shown}");
            }
            assert!(!shown.contains("pw@"), "{shown}");
        };
        shows(
            text,
            "fallback",
            &[
                "amqps://svc:***@rabbit-a:5671/%2f, amqps://svc:***@rabbit-b:5671/%2f",
                "heartbeat: 3s",
                "connection_name: \"orders-sidecar\"",
                "initial: 50ms, max: 2s, max_attempts: Some(7)",
                "server_name: Some(\"rabbit.internal\"), insecure_skip_verify: true",
            ],
        );
        shows(
            "",
            "backstop-dlq",
            &[
                "amqp://guest:***@127.0.0.1:5672/%2f",
                "connection_name: \"backstop-dlq\"",
                "heartbeat: 10s",
                "max_attempts: None",
            ],
        );
        let unreadable = Config::parse("[broker]\ntls.ca = \"/nonexistent/ca.pem\"\n", "t.toml")
            .expect("parses");
        let err = unreadable
            .connection_config("x")
            .expect_err("the CA file is missing");
        assert!(
            err.is_config() && err.to_string().contains("/nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_delivery_limit_needs_a_quorum_queue() {
        let consumer = |extra: &str| {
            format!(
                "[[consumer]]\nqueue = \"orders\"\n{extra}\nhandler.http.url = \"http://127.0.0.1:1\"\n"
            )
        };
        let err = error_of(&consumer("delivery_limit = 5"));
        assert!(
            err.contains("line 3") && err.contains("consumer[0].delivery_limit"),
            "{err}"
        );
        let config = Config::parse(
            &consumer("queue_type = \"quorum\"\ndelivery_limit = 5"),
            "test.toml",
        )
        .expect("valid");
        assert_eq!(config.consumers[0].delivery_limit, Some(5));
        assert!(config.normalized().contains("delivery_limit = 5"));
    }

    #[test]
    fn the_publish_section_defaults_and_is_redacted() {
        let config = Config::parse("[publish]\n", "test.toml").expect("valid");
        let publish = config.publish.clone().expect("present");
        assert_eq!(
            publish.listen_addr().expect("valid").to_string(),
            DEFAULT_PUBLISH_LISTEN
        );
        assert_eq!(
            publish.max_message_size(),
            crate::consumer::DEFAULT_MAX_MESSAGE_SIZE
        );
        assert!(
            Config::parse("", "test.toml")
                .expect("valid")
                .publish
                .is_none()
        );
        let text = "[publish]\nlisten = \"0.0.0.0:9466\"\ntoken = \"s3cret-token\"\n\
                    spool = \"/tmp/spool.db\"\nspool_max_messages = 10\n";
        let config = Config::parse(text, "test.toml").expect("valid");
        let shown = config.normalized();
        assert!(shown.contains("token = \"***\""), "{shown}");
        assert!(shown.contains("spool_max_messages = 10"), "{shown}");
        assert!(shown.contains("confirm_timeout = \"5s\""), "{shown}");
        for text in [shown, format!("{config:?}")] {
            assert!(!text.contains("s3cret"), "{text}");
        }
        let token = config.publish.and_then(|p| p.token).expect("token");
        assert_eq!(token.expose(), "s3cret-token");
    }

    /// Every `[publish]` and `[broker]` setting reaches the publisher.
    #[test]
    fn the_publisher_carries_every_publish_setting() {
        let text = "[broker]\nuri = \"amqp://svc:pw@rabbit-a:5672/%2f\"\n\
                    addresses = [\"amqp://svc:pw@rabbit-b:5672/%2f\"]\n\
                    connection_name = \"orders-sidecar\"\n\
                    [publish]\nspool = \"/var/lib/spool.db\"\nspool_max_messages = 10\n\
                    channels = 2\nconfirm_timeout = \"3s\"\n";
        let config = Config::parse(text, "test.toml").expect("valid");
        let builder = config.publisher("backstop-run").expect("builds");
        let shown = format!("{:?}", builder.expect("a [publish] section"));
        for part in [
            "amqp://svc:***@rabbit-a:5672/%2f, amqp://svc:***@rabbit-b:5672/%2f",
            "connection_name: \"orders-sidecar (publisher)\"",
            "channels: 2",
            "timeout: 3s",
            "spool: Some(\"/var/lib/spool.db\")",
            "max_messages: 10",
            "max_bytes: 1073741824",
        ] {
            assert!(shown.contains(part), "{part:?} not in {shown}");
        }
        assert!(!shown.contains("pw@"), "{shown}");
        let none = Config::parse("", "test.toml").expect("valid");
        assert!(none.publisher("x").expect("builds").is_none());
    }

    #[test]
    fn a_publish_endpoint_off_loopback_needs_a_token() {
        let err = error_of("[publish]\nlisten = \"0.0.0.0:9466\"\n");
        assert!(
            err.contains("line 2")
                && err.contains("key publish.listen")
                && err.contains("publish.token"),
            "{err}"
        );
        for (line, key) in [
            ("listen = \"[::1]:9466\"", ""),
            ("token = \"\"", "publish.token"),
            ("token = \"two words\"", "publish.token"),
            ("channels = 0", "publish.channels"),
            ("confirm_timeout = \"0s\"", "publish.confirm_timeout"),
            ("max_message_size = 0", "publish.max_message_size"),
            ("spool_max_messages = 5", "publish.spool_max_messages"),
            (
                "spool = \"s.db\"\nspool_max_bytes = 0",
                "publish.spool_max_bytes",
            ),
            ("listen = \"localhost\"", "publish.listen"),
            ("lisen = \"x\"", "lisen"),
        ] {
            let err = error_of(&format!("[publish]\n{line}\n"));
            if key.is_empty() {
                assert!(err.is_empty(), "{line}: {err}");
            } else {
                assert!(err.contains(key) && err.contains("line "), "{line}: {err}");
            }
        }
    }

    #[test]
    fn the_console_section_is_redacted_and_checked() {
        let text = "[console]\nlisten = \"0.0.0.0:9465\"\ntoken = \"t0k3n-long-enough-secret\"\n\
                    user = \"ops\"\npassword = \"pa55-long-enough-secret\"\n";
        let config = Config::parse(text, "test.toml").expect("valid");
        let shown = config.normalized();
        assert!(
            shown.contains("[console]\nlisten = \"0.0.0.0:9465\""),
            "{shown}"
        );
        assert!(shown.contains("user = \"ops\""), "{shown}");
        assert!(shown.contains("session_ttl = \"8h\""), "{shown}");
        for text in [shown, format!("{config:?}")] {
            assert!(!text.contains("-secret"), "{text}");
        }
        let console = config.console.expect("present");
        assert_eq!(
            console.password.as_ref().map(Secret::expose),
            Some("pa55-long-enough-secret")
        );
        assert!(
            Config::parse("", "t.toml")
                .expect("valid")
                .console
                .is_none()
        );
        let default = Config::parse("[console]\n", "t.toml").expect("valid");
        assert_eq!(
            default
                .console
                .expect("present")
                .listen_addr()
                .expect("valid")
                .to_string(),
            DEFAULT_CONSOLE_LISTEN
        );
        let err = error_of("[console]\nlisten = \"0.0.0.0:9465\"\n");
        assert!(
            err.contains("line 2")
                && err.contains("key console.listen")
                && err.contains("console.token"),
            "{err}"
        );
        for (line, key) in [
            ("listen = \"[::1]:9465\"", ""),
            ("token = \"\"", "console.token"),
            ("user = \"ops\"", "console.user"),
            ("password = \"pw\"", "console.password"),
            ("user = \"a:b\"\npassword = \"pw\"", "console.user"),
            ("session_ttl = \"0s\"", "console.session_ttl"),
            ("session_ttl = \"31days\"", "console.session_ttl"),
            ("session_ttl = \"30days\"", ""),
            ("session_ttl = \"100000000years\"", "console.session_ttl"),
            ("listen = \"localhost\"", "console.listen"),
            ("allowed_hosts = [\"a/b\"]", "console.allowed_hosts"),
            ("allowed_hosts = [\"console.example.com\"]", ""),
            (
                "listen = \"0.0.0.0:1\"\ntoken = \"short-token\"",
                "console.token",
            ),
            (
                "listen = \"0.0.0.0:1\"\nuser = \"u\"\npassword = \"short\"",
                "console.password",
            ),
            ("listen = \"0.0.0.0:1\"\ntoken = \"0123456789abcdef\"", ""),
            ("token = \"short\"", ""),
        ] {
            let err = error_of(&format!("[console]\n{line}\n"));
            if key.is_empty() {
                assert!(err.is_empty(), "{line}: {err}");
            } else {
                assert!(err.contains(key) && err.contains("line "), "{line}: {err}");
            }
        }
    }

    /// Issue 18: the key is named from the parser's spans, whatever the
    /// file's layout: comments after headers, quoted keys, inline tables,
    /// dotted keys, the second of an array of tables.
    #[test]
    fn config_errors_name_the_key_from_the_parsers_spans() {
        const URL: &str = "handler.http.url = \"http://127.0.0.1:1\"";
        let mut wrong = Vec::new();
        for (text, expected) in [
            (
                format!("[[consumer]] # billing\nqueue = \"a\"\n{URL}\nprefetch = 0\n"),
                "line 4, column 1, key consumer[0].prefetch: ",
            ),
            (
                format!("[[consumer]] # billing\nqueue = \"a\"\n{URL}\nbogus = 1\n"),
                "line 4, column 1, key consumer[0].bogus: ",
            ),
            (
                format!(
                    "[[consumer]]\nqueue = \"a\"\n{URL}\n\n[[ consumer ]] # two\n\
                     queue = \"b\"\n{URL}\n  concurrency = 0\n"
                ),
                "line 8, column 3, key consumer[1].concurrency: ",
            ),
            (
                "[broker] # main\n\"heartbeat\" = \"0s\"\n".to_owned(),
                "line 2, column 1, key broker.heartbeat: ",
            ),
            (
                "[broker]\n\"odd key\" = 1\n".to_owned(),
                "line 2, column 1, key broker.\"odd key\": ",
            ),
            (
                "[[consumer]]\nqueue = \"a\"\n\
                 handler = { http = { url = \"http://x\", timeout = \"soon\" } }\n"
                    .to_owned(),
                "line 3, key consumer[0].handler.http.timeout: ",
            ),
            (
                "broker.heartbeat = \"500ms\"\n".to_owned(),
                "line 1, column 8, key broker.heartbeat: ",
            ),
            (
                "consumer = [{ queue = \"a\", handler.http.url = \"http://a b/\" }]\n".to_owned(),
                "line 1, column 41, key consumer[0].handler.http.url: ",
            ),
            (
                "[[consumer]]\nqueue = \"a\"\nhandler.http.timeout = \"1s\"\n".to_owned(),
                "key consumer[0].handler.http.url: missing field `url`",
            ),
            (
                "[[consumer]]\nqueue = \"a\"\n".to_owned(),
                "key consumer[0].handler: missing field `handler`",
            ),
        ] {
            let err = error_of(&text);
            let found = expected.split(", key ").all(|part| err.contains(part));
            if !found {
                wrong.push(format!("expected {expected:?} in {err:?} for\n{text}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Issue 18: handler URLs go through a URL parser; nonsense values are
    /// refused at load with their key and line.
    #[test]
    fn bad_urls_and_nonsense_values_are_refused_at_load() {
        let consumer = |lines: &str| {
            format!(
                "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"http://h:1/\"\n{lines}\n"
            )
        };
        let mut wrong = Vec::new();
        for (text, key, line) in [
            (
                "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"http://a b/\"\n".to_owned(),
                "consumer[0].handler.http.url",
                "line 3",
            ),
            (
                "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"ftp://a/\"\n".to_owned(),
                "consumer[0].handler.http.url",
                "line 3",
            ),
            (
                "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"http://\"\n".to_owned(),
                "consumer[0].handler.http.url",
                "line 3",
            ),
            (
                consumer("handler.http.timeout = \"0s\""),
                "consumer[0].handler.http.timeout",
                "line 4",
            ),
            (
                consumer("max_message_size = 0"),
                "consumer[0].max_message_size",
                "line 4",
            ),
            (consumer("prefetch = 0"), "consumer[0].prefetch", "line 4"),
            (
                consumer(
                    "handler.http.timeout = \"2m\"\ndedup.key = \"message-id\"\ndedup.lease = \"1m\"",
                ),
                "consumer[0].dedup.lease",
                "line 6",
            ),
            (
                consumer("handler.http.timeout = \"10m\"\ndedup.key = \"message-id\""),
                "consumer[0].dedup",
                "line 5",
            ),
            (
                "[broker]\nheartbeat = \"999ms\"\n".to_owned(),
                "broker.heartbeat",
                "line 2",
            ),
        ] {
            let err = error_of(&text);
            if !(err.contains(&format!("key {key}:")) && err.contains(&format!("{line}, "))) {
                wrong.push(format!("expected {key} at {line} in {err:?} for\n{text}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        for fine in [
            consumer("handler.http.timeout = \"5m\"\ndedup.key = \"message-id\""),
            consumer("dedup.key = \"message-id\"\ndedup.lease = \"30s\""),
            "[[consumer]]\nqueue = \"q\"\nhandler.http.url = \"https://[::1]:8443/hook?a=b\"\n"
                .to_owned(),
        ] {
            assert_eq!(error_of(&fine), "", "{fine}");
        }
    }

    /// Issue 18: `config check` prints TOML that parses back to the same
    /// configuration, with every key the file accepts (dedup.lease too),
    /// and strings escaped the TOML way.
    #[test]
    fn config_check_prints_every_key_as_toml_that_parses_back() {
        let file = std::env::temp_dir().join(format!("backstop-check-pw-{}", std::process::id()));
        std::fs::write(&file, "from-file-pw\n").expect("write the password file");
        let text = format!(
            "[broker]\nuri = \"amqp://svc:pw@rabbit-a:5672/%2f\"\n\
             addresses = [\"amqp://svc:pw@rabbit-b:5672/%2f\"]\nheartbeat = \"3s\"\n\
             connection_name = \"esc\\u001b\\\"q\\\"\\\\\"\npassword_file = {file:?}\n\
             tls.ca = \"/ca.pem\"\ntls.cert = \"/c.pem\"\ntls.key = \"/k.pem\"\n\
             tls.server_name = \"rabbit.internal\"\ntls.insecure_skip_verify = false\n\
             [reconnect]\ninitial = \"50ms\"\nmax = \"2s\"\nmax_attempts = 7\n\
             [store]\nurl = \"postgres://u:pw@db/backstop\"\nretention = \"7days\"\n\
             first_redrive = \"10s\"\n\
             [scanner]\nenabled = true\ninterval = \"5s\"\nbatch = 7\nmax_attempts = 3\n\
             lease = \"2m\"\nbackoff = \"15s\"\n\
             [metrics]\nlisten = \"127.0.0.1:9000\"\n\
             [publish]\nlisten = \"127.0.0.1:9001\"\ntoken = \"tok\"\nspool = \"/s.db\"\n\
             spool_max_messages = 10\nspool_max_bytes = 1000\nchannels = 2\n\
             confirm_timeout = \"3s\"\nmax_message_size = 1024\n\
             [console]\nlisten = \"127.0.0.1:9002\"\ntoken = \"tok\"\nuser = \"ops\"\n\
             password = \"pw\"\nsession_ttl = \"1h\"\nallowed_hosts = [\"console.example.com\"]\n\
             [[consumer]]\nqueue = \"orders\"\nqueue_type = \"quorum\"\ndelivery_limit = 5\n\
             dead_letter_strategy = \"at-least-once\"\nqueue_arguments.x-max-length = 10\n\
             bindings = [{{ exchange = \"orders\", type = \"topic\", routing_key = \"o.*\" }}]\n\
             prefetch = 10\nconcurrency = 2\nshutdown_timeout = \"4s\"\nmax_message_size = 2048\n\
             consumer_timeout = \"10m\"\nhandler.http.url = \"http://h:1/orders\"\n\
             handler.http.timeout = \"5s\"\nretry.delays = [\"1s\", \"10s\"]\nretry.immediate = 1\n\
             retry.exhausted = \"store\"\ndedup.key = \"json:/id\"\ndedup.ttl = \"1day\"\n\
             dedup.lease = \"1m\"\ndedup.store = \"redis://127.0.0.1:6379\"\n\
             dedup.missing_key = \"reject\"\n\
             breaker = {{ window = 8, min_calls = 4, failure_ratio = 0.75, cooldown = \"3s\", \
             successes_to_close = 2 }}\n"
        );
        let config = Config::parse(&text, "test.toml").expect("valid");
        let shown = config.normalized();
        assert!(
            !shown.contains("\\u{1b}"),
            "Rust escapes are not TOML: {shown}"
        );
        for secret in [
            "svc:pw@",
            "from-file-pw",
            "u:pw@",
            "\"tok\"",
            "password = \"pw\"",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let again = Config::parse(&shown, "shown.toml").expect("config check's output parses");
        assert_eq!(
            again.broker.connection_name.as_deref(),
            Some("esc\u{1b}\"q\"\\")
        );
        assert_eq!(again.normalized(), shown, "the output is a fixed point");
        let _ = std::fs::remove_file(&file);
        // Every key of the input is in the output.
        fn leaves(value: &toml::Value, path: String, out: &mut Vec<String>) {
            match value {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let p = if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        };
                        leaves(v, p, out);
                    }
                }
                toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
                    for (i, v) in a.iter().enumerate() {
                        leaves(v, format!("{path}[{i}]"), out);
                    }
                }
                _ => out.push(path),
            }
        }
        let (mut given, mut printed) = (Vec::new(), Vec::new());
        let input: toml::Value = toml::from_str(&text).expect("toml");
        let output: toml::Value = toml::from_str(&shown).expect("toml");
        leaves(&input, String::new(), &mut given);
        leaves(&output, String::new(), &mut printed);
        for key in &given {
            assert!(
                printed.contains(key),
                "{key} is not shown by config check:\n{shown}"
            );
        }
    }

    /// Issue 20: bindings, the dead-letter strategy and queue arguments
    /// are checked at load, each bad value named with its file, line and key.
    #[test]
    fn bad_bindings_and_queue_arguments_name_file_line_and_key() {
        let consumer = |lines: &str| {
            format!(
                "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"http://h:1/\"\n{lines}\n"
            )
        };
        let mut wrong = Vec::new();
        for (lines, key, line, says) in [
            // Arguments with which the broker itself would drop messages.
            (
                "queue_arguments.x-expires = \"1d\"",
                "consumer[0].queue_arguments.x-expires",
                "line 4",
                "deletes the queue",
            ),
            (
                "queue_arguments.x-message-ttl = 1000",
                "consumer[0].queue_arguments.x-message-ttl",
                "line 4",
                "an expired message is dropped",
            ),
            (
                "queue_type = \"quorum\"\nqueue_arguments.x-message-ttl = 1000",
                "consumer[0].queue_arguments.x-message-ttl",
                "line 5",
                "dead_letter_strategy = \"at-least-once\"",
            ),
            (
                "queue_arguments.x-max-length = 10",
                "consumer[0].queue_arguments.x-max-length",
                "line 4",
                "drops the head of a full queue",
            ),
            (
                "queue_arguments.x-overflow = \"drop-head\"",
                "consumer[0].queue_arguments.x-overflow",
                "line 4",
                "drop-head drops messages",
            ),
            (
                "retry.delays = [\"1s\"]\n\
                 queue_arguments = { x-max-length-bytes = 10, x-overflow = \"reject-publish\" }",
                "consumer[0].queue_arguments.x-max-length-bytes",
                "line 5",
                "dead-lettering at most once",
            ),
            (
                "queue_type = \"quorum\"\nqueue_arguments.x-dead-letter-exchange = \"other\"",
                "consumer[0].queue_arguments.x-dead-letter-exchange",
                "line 5",
                "dead-letters a quorum queue to <queue>.dlq",
            ),
            (
                "queue_arguments.x-max-length = \"ten\"",
                "consumer[0].queue_arguments.x-max-length",
                "line 4",
                "takes an integer, not string",
            ),
            (
                "queue_arguments = { x-single-active-consumer = \"yes\" }",
                "consumer[0].queue_arguments.x-single-active-consumer",
                "line 4",
                "takes true or false",
            ),
            (
                "queue_arguments.x-max-length-bytes = -1",
                "consumer[0].queue_arguments.x-max-length-bytes",
                "line 4",
                "out of range",
            ),
            (
                "queue_arguments.x-message-ttl = \"soon\"",
                "consumer[0].queue_arguments.x-message-ttl",
                "line 4",
                "not a duration",
            ),
            (
                "queue_arguments.x-consumer-timeout = true",
                "consumer[0].queue_arguments.x-consumer-timeout",
                "line 4",
                "takes milliseconds",
            ),
            (
                "queue_arguments.x-overflow = \"drop-tail\"",
                "consumer[0].queue_arguments.x-overflow",
                "line 4",
                "is not one of",
            ),
            (
                "queue_arguments.x-delivery-limit = 5",
                "consumer[0].queue_arguments.x-delivery-limit",
                "line 4",
                "delivery_limit",
            ),
            (
                "queue_arguments.max-length = 5",
                "consumer[0].queue_arguments.max-length",
                "line 4",
                "start with \"x-\"",
            ),
            (
                "queue_arguments.x-quorum-initial-group-size = 3",
                "consumer[0].queue_arguments.x-quorum-initial-group-size",
                "line 4",
                "only for quorum queues",
            ),
            (
                "queue_type = \"quorum\"\nqueue_arguments.x-max-priority = 5",
                "consumer[0].queue_arguments.x-max-priority",
                "line 5",
                "only for classic queues",
            ),
            (
                "dead_letter_strategy = \"at-least-once\"",
                "consumer[0].dead_letter_strategy",
                "line 4",
                "for quorum queues",
            ),
            (
                "queue_type = \"quorum\"\ndead_letter_strategy = \"at-least-twice\"",
                "consumer[0].dead_letter_strategy",
                "line 5",
                "is not \"at-most-once\" or \"at-least-once\"",
            ),
            (
                "queue_type = \"quorum\"\ndead_letter_strategy = \"at-least-once\"\n\
                 queue_arguments.x-overflow = \"drop-head\"",
                "consumer[0].queue_arguments.x-overflow",
                "line 6",
                "needs x-overflow = \"reject-publish\"",
            ),
            (
                "bindings = [{ exchange = \"orders\", type = \"topics\" }]",
                "consumer[0].bindings[0].type",
                "line 4",
                "\"topics\" is not an exchange type",
            ),
            (
                "bindings = [{ exchange = \"\", routing_key = \"a\" }]",
                "consumer[0].bindings[0].exchange",
                "line 4",
                "default exchange",
            ),
            (
                "[[consumer.bindings]]\nexchange = \"orders\"\ntype = \"topic\"\n\
                 [[consumer.bindings]]\nexchange = \"orders\"\ntype = \"direct\"",
                "consumer[0].bindings[1].type",
                "line 9",
                "an exchange has one type",
            ),
            (
                "bindings = [{ exchange = \"orders\", key = \"a\" }]",
                "consumer[0].bindings[0].key",
                "line 4",
                "unknown field `key`",
            ),
        ] {
            let err = error_of(&consumer(lines));
            let found = err.starts_with("test.toml: ")
                && err.contains(&format!("key {key}: "))
                && err.contains(&format!("{line}, "))
                && err.contains(says);
            if !found {
                wrong.push(format!(
                    "expected {key} at {line} saying {says:?} in {err:?} for\n{lines}"
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Issue 20 item 3: `consumer.breaker` reaches the library's
    /// [`BreakerConfig`](crate::breaker::BreakerConfig), defaults filled in.
    #[test]
    fn the_breaker_settings_reach_the_breaker_config() {
        let base = "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"http://h:1/\"\n";
        let config = Config::parse(base, "test.toml").expect("valid");
        assert!(
            config.consumers[0].breaker.is_none(),
            "off unless configured"
        );
        let text = format!("{base}breaker = {{ window = 6, cooldown = \"2s\" }}\n");
        let config = Config::parse(&text, "test.toml").expect("valid");
        let breaker = config.consumers[0]
            .breaker
            .as_ref()
            .expect("present")
            .config();
        assert_eq!(
            breaker,
            crate::breaker::BreakerConfig {
                window: 6,
                min_calls: 6,
                failure_ratio: 0.5,
                cooldown: Duration::from_secs(2),
                successes_to_close: 3,
            }
        );
        assert!(breaker.validate().is_ok());
        let shown = config.normalized();
        assert!(shown.contains("[consumer.breaker]"), "{shown}");
        assert!(shown.contains("failure_ratio = 0.5"), "{shown}");
        let text = format!("{base}[consumer.breaker]\nfailure_ratio = 1\n");
        let config = Config::parse(&text, "test.toml").expect("an integer ratio is fine");
        assert_eq!(
            config.consumers[0]
                .breaker
                .as_ref()
                .map(|b| b.config().failure_ratio),
            Some(1.0)
        );
    }

    /// Issue 20 items 3 and 4: bad breaker and scanner values are errors
    /// naming the line and the key.
    #[test]
    fn bad_breaker_and_scanner_values_are_named_with_their_line() {
        let consumer = |lines: &str| {
            format!(
                "[store]\nurl = \"sqlite://b.db\"\n[[consumer]]\nqueue = \"orders\"\n\
                 handler.http.url = \"http://h:1/\"\n{lines}\n"
            )
        };
        let mut wrong = Vec::new();
        for (text, key, line) in [
            (
                consumer("breaker = { window = 0 }"),
                "consumer[0].breaker.window",
                "line 6",
            ),
            (
                consumer("breaker = { window = 100001 }"),
                "consumer[0].breaker.window",
                "line 6",
            ),
            (
                consumer("breaker = { successes_to_close = 1001 }"),
                "consumer[0].breaker.successes_to_close",
                "line 6",
            ),
            (
                consumer("[scanner]\ninterval = \"50ms\""),
                "scanner.interval",
                "line 7",
            ),
            (
                consumer("breaker = { min_calls = 0 }"),
                "consumer[0].breaker.min_calls",
                "line 6",
            ),
            (
                consumer("breaker.window = 5\nbreaker.min_calls = 6"),
                "consumer[0].breaker.min_calls",
                "line 7",
            ),
            (
                consumer("breaker = { failure_ratio = 0.0 }"),
                "consumer[0].breaker.failure_ratio",
                "line 6",
            ),
            (
                consumer("breaker = { failure_ratio = 1.5 }"),
                "consumer[0].breaker.failure_ratio",
                "line 6",
            ),
            (
                consumer("breaker = { failure_ratio = nan }"),
                "consumer[0].breaker.failure_ratio",
                "line 6",
            ),
            (
                consumer("[consumer.breaker]\ncooldown = \"0s\""),
                "consumer[0].breaker.cooldown",
                "line 7",
            ),
            (
                consumer("breaker = { successes_to_close = 0 }"),
                "consumer[0].breaker.successes_to_close",
                "line 6",
            ),
            (
                consumer("breaker = { windw = 3 }"),
                "consumer[0].breaker.windw",
                "line 6",
            ),
            (
                consumer("breaker = { cooldown = \"soon\" }"),
                "consumer[0].breaker.cooldown",
                "line 6",
            ),
            (
                consumer("[scanner]\ninterval = \"0s\""),
                "scanner.interval",
                "line 7",
            ),
            (consumer("[scanner]\nbatch = 0"), "scanner.batch", "line 7"),
            (consumer("[scanner]\nbatch = -1"), "scanner.batch", "line 7"),
            (
                consumer("[scanner]\nmax_attempts = 0"),
                "scanner.max_attempts",
                "line 7",
            ),
            (
                consumer("[scanner]\nlease = \"9s\""),
                "scanner.lease",
                "line 7",
            ),
            (
                consumer("[scanner]\nbackoff = \"0s\""),
                "scanner.backoff",
                "line 7",
            ),
            (
                consumer("[scanner]\nenabled = \"yes\""),
                "scanner.enabled",
                "line 7",
            ),
            (
                "[scanner]\nenabled = true\n".to_owned(),
                "scanner.enabled",
                "line 2",
            ),
            (
                "[store]\nscan_interval = \"1s\"\n[scanner]\ninterval = \"2s\"\n".to_owned(),
                "scanner.interval",
                "line 4",
            ),
            (
                "[store]\nscan_interval = \"0s\"\n".to_owned(),
                "store.scan_interval",
                "line 2",
            ),
        ] {
            let err = error_of(&text);
            if !(err.contains(&format!("key {key}:")) && err.contains(&format!("{line}, "))) {
                wrong.push(format!("expected {key} at {line} in {err:?} for\n{text}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn bindings_and_queue_arguments_make_the_declared_topology() {
        let text = "[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"http://h:1/\"\n\
                    queue_type = \"quorum\"\ndelivery_limit = 5\n\
                    dead_letter_strategy = \"at-least-once\"\n\
                    queue_arguments = { x-max-length = 1000, x-single-active-consumer = true, \
                    x-message-ttl = \"1h\", x-consumer-timeout = 60000, x-custom = \"as-is\" }\n\
                    bindings = [{ exchange = \"orders\", type = \"topic\", routing_key = \"order.*\" }, \
                    { exchange = \"orders\", type = \"topic\", routing_key = \"refund.*\" }, \
                    { exchange = \"audit\", type = \"fanout\" }]\n";
        let config = Config::parse(text, "test.toml").expect("valid");
        let topology = config.consumers[0].topology().expect("builds");
        let exchanges: Vec<(&str, &str)> = topology
            .exchanges()
            .iter()
            .map(|e| (e.name(), e.kind_name()))
            .collect();
        assert_eq!(exchanges, [("orders", "topic"), ("audit", "fanout")]);
        let bindings: Vec<(&str, &str)> = topology
            .bindings()
            .iter()
            .map(|b| (b.exchange_name(), b.routing_key_name()))
            .collect();
        assert_eq!(
            bindings,
            [("orders", "order.*"), ("orders", "refund.*"), ("audit", "")]
        );
        let queue = &topology.queues()[0];
        let arguments = queue.declared_arguments();
        let arg = |key: &str| arguments.inner().get(key).cloned();
        use lapin::types::AMQPValue;
        let text = |s: &str| Some(AMQPValue::LongString(s.into()));
        assert_eq!(arg("x-delivery-limit"), Some(AMQPValue::LongLongInt(5)));
        assert_eq!(arg("x-dead-letter-strategy"), text("at-least-once"));
        assert_eq!(arg("x-overflow"), text("reject-publish"));
        assert_eq!(arg("x-max-length"), Some(AMQPValue::LongLongInt(1000)));
        assert_eq!(
            arg("x-single-active-consumer"),
            Some(AMQPValue::Boolean(true))
        );
        assert_eq!(
            arg("x-message-ttl"),
            Some(AMQPValue::LongLongInt(3_600_000))
        );
        assert_eq!(
            arg("x-consumer-timeout"),
            Some(AMQPValue::LongLongInt(60_000))
        );
        assert_eq!(arg("x-custom"), text("as-is"));
        let shown = config.normalized();
        for part in [
            "dead_letter_strategy = \"at-least-once\"",
            "x-message-ttl = \"1h\"",
            "routing_key = \"refund.*\"",
            "type = \"fanout\"",
        ] {
            assert!(shown.contains(part), "{part:?} not in {shown}");
        }
        let again = Config::parse(&shown, "shown.toml").expect("parses back");
        assert_eq!(again.normalized(), shown, "a fixed point");
        // The defaults are shown too.
        let plain = Config::parse(
            "[[consumer]]\nqueue = \"q\"\nhandler.http.url = \"http://h:1/\"\n",
            "t.toml",
        )
        .expect("valid")
        .normalized();
        for part in [
            "bindings = []",
            "dead_letter_strategy = \"at-most-once\"",
            "[consumer.queue_arguments]",
        ] {
            assert!(plain.contains(part), "{part:?} not in {plain}");
        }
        let plain_queue = Config::parse(
            "[[consumer]]\nqueue = \"q\"\nhandler.http.url = \"http://h:1/\"\n",
            "t.toml",
        )
        .expect("valid")
        .consumers[0]
            .topology()
            .expect("builds");
        assert!(
            plain_queue.queues()[0]
                .declared_arguments()
                .inner()
                .is_empty(),
            "a classic queue without arguments is declared as before"
        );
    }

    /// A consumer block posting to `url`, with `extra` lines in it.
    fn endpoint_consumer(url: &str, extra: &str) -> String {
        format!("[[consumer]]\nqueue = \"orders\"\nhandler.http.url = \"{url}\"\n{extra}\n")
    }

    #[test]
    fn header_values_are_interpolated_and_never_shown() {
        let vars = |name: &str| match name {
            "TOKEN" => Ok("s3cret-t0ken".to_owned()),
            "_K2" => Ok("two".to_owned()),
            _ => Err(std::env::VarError::NotPresent),
        };
        assert_eq!(
            interpolate("Bearer ${TOKEN}", vars).as_deref(),
            Ok("Bearer s3cret-t0ken")
        );
        assert_eq!(
            interpolate("${TOKEN}:${_K2}$x", vars).as_deref(),
            Ok("s3cret-t0ken:two$x")
        );
        assert_eq!(interpolate("no vars", vars).as_deref(), Ok("no vars"));
        let missing = interpolate("Bearer ${ORDERS_TOKEN}", vars).expect_err("missing");
        assert_eq!(missing, "the environment variable ORDERS_TOKEN is not set");
        assert!(interpolate("${}", vars).is_err());
        // A literal secret holding "${" is never quoted: only where it is.
        assert_eq!(
            interpolate("ab${1s3cret-hidden}", vars).expect_err("bad name"),
            "the \"${...}\" at byte 2 of the value does not name an environment variable \
             (letters, digits and _)"
        );
        assert_eq!(
            interpolate("${TOKEN}x${s3cret-hidden", vars).expect_err("not closed"),
            "the \"${\" at byte 9 of the value is not closed by \"}\""
        );
        let text = endpoint_consumer(
            "http://h:1/",
            "handler.http.headers = { X-Key = \"p4ss${w0rd-hidden}\" }",
        );
        let err = Config::parse(&text, "test.toml")
            .expect_err("bad name")
            .to_string();
        assert!(
            err.contains("consumer[0].handler.http.headers.X-Key") && err.contains("byte 4"),
            "{err}"
        );
        for part in ["p4ss", "w0rd", "hidden"] {
            assert!(!err.contains(part), "{part} in {err}");
        }

        // Through the loader: a variable that is surely unset is an error
        // naming the key and the variable (the file, line and key path).
        let text = endpoint_consumer(
            "http://h:1/",
            "handler.http.headers = { Authorization = \"Bearer ${BACKSTOP_TEST_SURELY_UNSET_VAR}\" }",
        );
        let err = Config::parse(&text, "test.toml")
            .expect_err("unset")
            .to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(
            err.contains("line 4")
                && err.contains("consumer[0].handler.http.headers.Authorization"),
            "{err}"
        );
        assert!(
            err.contains("BACKSTOP_TEST_SURELY_UNSET_VAR is not set"),
            "{err}"
        );

        let text = endpoint_consumer(
            "http://h:1/",
            "handler.http.headers = { Authorization = \"Bearer s3cret-t0ken\", \"X-Api-Key\" = \"k3y-value\" }",
        );
        let config = Config::parse(&text, "test.toml").expect("valid");
        let http = &config.consumers[0].handler.http;
        assert_eq!(
            http.headers["Authorization"].expose(),
            "Bearer s3cret-t0ken"
        );
        let shown = config.normalized();
        let debug = format!("{config:?}");
        for secret in ["s3cret-t0ken", "k3y-value"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(shown.contains("Authorization = \"***\""), "{shown}");
        assert!(shown.contains("X-Api-Key = \"***\""), "{shown}");
        assert!(shown.contains("response = \"status\""), "{shown}");
        let again = Config::parse(&shown, "shown.toml").expect("config check's output parses");
        assert_eq!(again.normalized(), shown, "the output is a fixed point");
    }

    #[test]
    fn bad_headers_tls_and_response_values_are_refused_with_their_key() {
        let pki = std::env::temp_dir();
        let cases = [
            (
                endpoint_consumer(
                    "http://h:1/",
                    "handler.http.headers = { \"bad name\" = \"v\" }",
                ),
                "consumer[0].handler.http.headers.\"bad name\"",
                "not an HTTP header name",
            ),
            (
                endpoint_consumer(
                    "http://h:1/",
                    "handler.http.headers = { backstop-queue = \"v\" }",
                ),
                "consumer[0].handler.http.headers.backstop-queue",
                "set by backstop itself",
            ),
            (
                endpoint_consumer(
                    "http://h:1/",
                    "handler.http.headers = { Accept-Encoding = \"gzip-hidden\" }",
                ),
                "consumer[0].handler.http.headers.Accept-Encoding",
                "does not decompress",
            ),
            (
                endpoint_consumer(
                    "http://h:1/",
                    "handler.http.headers = { X-Key = \"a\\nb-hidden\" }",
                ),
                "consumer[0].handler.http.headers.X-Key",
                "control character",
            ),
            (
                endpoint_consumer("http://h:1/", "handler.http.response = \"grpc\""),
                "consumer[0].handler.http.response",
                "unknown variant",
            ),
            (
                endpoint_consumer(
                    "http://h:1/",
                    "handler.http.tls.ca = \"/nonexistent/ca.pem\"",
                ),
                "consumer[0].handler.http.tls",
                "need an https:// url",
            ),
            (
                endpoint_consumer(
                    "https://h:1/",
                    "handler.http.tls.ca = \"/nonexistent/ca.pem\"",
                ),
                "consumer[0].handler.http.tls.ca",
                "cannot read /nonexistent/ca.pem",
            ),
            (
                endpoint_consumer(
                    "https://h:1/",
                    &format!("handler.http.tls.ca = {:?}", pki.display().to_string()),
                ),
                "consumer[0].handler.http.tls.ca",
                "cannot read",
            ),
            (
                endpoint_consumer(
                    "https://h:1/",
                    "handler.http.tls.cert = \"/nonexistent/c.pem\"",
                ),
                "consumer[0].handler.http.tls.cert",
                "needs its key",
            ),
            (
                endpoint_consumer(
                    "https://h:1/",
                    "handler.http.tls.cert = \"/nonexistent/c.pem\"\nhandler.http.tls.key = \"/k.pem\"",
                ),
                "consumer[0].handler.http.tls.cert",
                "cannot read /nonexistent/c.pem",
            ),
            (
                endpoint_consumer("https://h:1/", "handler.http.tls.server_name = \"x\""),
                "server_name",
                "unknown field",
            ),
        ];
        for (text, key, reason) in cases {
            let err = Config::parse(&text, "test.toml")
                .expect_err(&text)
                .to_string();
            assert!(err.contains("test.toml") && err.contains("line "), "{err}");
            assert!(err.contains(key), "{key} not in {err}");
            assert!(err.contains(reason), "{reason} not in {err}");
            assert!(!err.contains("hidden"), "a header value in {err}");
        }
    }

    /// Issue 20 item 4: `[scanner]` reaches the scanners' configuration;
    /// they are on by default with a store, off with `enabled = false`, and
    /// `[store] scan_interval` still sets the interval.
    #[test]
    fn the_scanner_settings_reach_the_scanner_config() {
        let none = Config::parse("", "test.toml").expect("valid");
        assert!(!none.scanner_enabled(), "no store, no scanner");
        assert!(none.scanner_config("q").is_none());
        assert!(none.normalized().contains("enabled = false"));
        let store = "[store]\nurl = \"sqlite://b.db\"\n";
        let config = Config::parse(store, "test.toml").expect("valid");
        let defaults = crate::store::ScannerConfig::default();
        let scanner = config.scanner_config("q").expect("on with a store");
        assert_eq!(
            (scanner.interval, scanner.batch, scanner.max_attempts),
            (
                Duration::from_secs(30),
                defaults.batch,
                defaults.max_attempts
            )
        );
        assert_eq!(
            (scanner.lease, scanner.backoff),
            (defaults.lease, defaults.backoff)
        );
        let text = format!(
            "{store}[scanner]\ninterval = \"250ms\"\nbatch = 2\nmax_attempts = 9\n\
             lease = \"10s\"\nbackoff = \"1s\"\n"
        );
        let config = Config::parse(&text, "test.toml").expect("valid");
        let scanner = config.scanner_config("q").expect("on");
        assert_eq!(scanner.queue.as_deref(), Some("q"));
        assert_eq!(
            (scanner.interval, scanner.batch, scanner.max_attempts),
            (Duration::from_millis(250), 2, 9)
        );
        assert_eq!(
            (scanner.lease, scanner.backoff),
            (Duration::from_secs(10), Duration::from_secs(1))
        );
        let off = format!("{store}[scanner]\nenabled = false\n");
        let config = Config::parse(&off, "test.toml").expect("valid");
        assert!(config.scanner_config("q").is_none(), "enabled = false wins");
        assert!(config.normalized().contains("enabled = false"));
        let old = format!("{store}scan_interval = \"4s\"\n");
        let config = Config::parse(&old, "test.toml").expect("the older spelling");
        assert_eq!(config.scan_interval(), Duration::from_secs(4));
        let shown = config.normalized();
        assert!(shown.contains("interval = \"4s\""), "{shown}");
        let again = Config::parse(&shown, "shown.toml").expect("parses back");
        assert_eq!(again.scan_interval(), Duration::from_secs(4));
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = Config::parse("", "empty.toml").expect("valid");
        assert!(config.broker.uri.is_none());
    }
}
