//! Deduplication: each business message is handled once, however many times
//! RabbitMQ delivers it (after a reconnect, a publisher retry, a replay).
//!
//! A [`DedupKey`] says where a message's business id is: the `message_id`
//! property, a header, or a JSON pointer into the body. Before the handler
//! runs, the consumer *claims* the key in a [`SeenStore`] with a lease:
//! - [`Claim::Claimed`]: the handler runs. On success the key is marked
//!   *done* (kept for the TTL, 7 days by default) before the ack; on any
//!   failure the claim is *released* so the retry can run.
//! - [`Claim::Done`]: a duplicate of a handled message. It is acked without
//!   calling the handler, and counted.
//! - [`Claim::InProgress`]: another handler (here or in another instance
//!   sharing the store) holds the key right now. The delivery waits and
//!   checks again; it is neither run twice nor dropped. If the holder is still
//!   busy after the wait, the delivery goes back to the queue.
//!
//! Expired keys are ignored by claims and removed by a cleanup job.
//!
//! # At least once, narrowly
//! The plain mode marks the key done *after* the handler's effect, in a
//! separate write. A crash between the two leaves the key claimed; when its
//! lease runs out, the redelivered message runs again. For effects in a SQL
//! database, the [`inbox`] commits the handler's writes and the key in one
//! transaction and closes that window.
//!
//! Backends: [`MemorySeenStore`] (one process, bounded), [`SqlSeenStore`]
//! (SQLite or PostgreSQL, with batched writes) and `RedisSeenStore` (with the
//! `redis` feature).
//!
//! ```
//! use backstop::dedup::{DedupConfig, DedupKey, MemorySeenStore};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! let key: DedupKey = "json:/order_id".parse().expect("a valid key");
//! let dedup = DedupConfig::new(key, Arc::new(MemorySeenStore::new(100_000)))
//!     .ttl(Duration::from_secs(24 * 3600));
//! # let _ = dedup;
//! ```

pub mod inbox;
pub(crate) mod local;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use memory::MemorySeenStore;
#[cfg(feature = "redis")]
pub use redis::RedisSeenStore;
pub use sql::SqlSeenStore;

use crate::error::RedactedUri;
use crate::handler::Delivery;
use futures_util::future::BoxFuture;
use lapin::types::AMQPValue;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where a message's business id is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DedupKey {
    /// The AMQP `message_id` property (`message-id`).
    MessageId,
    /// A header (`header:NAME`); strings and integers are used as they are.
    Header(String),
    /// A JSON pointer into the body (`json:/order_id`); strings and numbers
    /// are used as they are. A body that is not JSON has no key.
    JsonPointer(String),
}

impl FromStr for DedupKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "message-id" {
            Ok(DedupKey::MessageId)
        } else if let Some(name) = s.strip_prefix("header:") {
            if name.is_empty() {
                Err("\"header:\" needs a header name, for example \"header:order-id\"".into())
            } else {
                Ok(DedupKey::Header(name.to_owned()))
            }
        } else if let Some(pointer) = s.strip_prefix("json:") {
            if !pointer.starts_with('/') {
                Err(format!(
                    "{pointer:?} is not a JSON pointer: it must start with '/', for example \"json:/order_id\""
                ))
            } else {
                Ok(DedupKey::JsonPointer(pointer.to_owned()))
            }
        } else {
            Err(format!(
                "unknown dedup key {s:?}: use \"message-id\", \"header:NAME\" or \"json:/pointer\""
            ))
        }
    }
}

impl fmt::Display for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DedupKey::MessageId => f.write_str("message-id"),
            DedupKey::Header(name) => write!(f, "header:{name}"),
            DedupKey::JsonPointer(pointer) => write!(f, "json:{pointer}"),
        }
    }
}

impl DedupKey {
    /// The key of `delivery`, or why it has none.
    ///
    /// The key is written as the business id's bytes would collide least:
    /// see [`canonical_key`]. Two different ids never give the same key
    /// (short of a SHA-256 collision).
    pub fn extract(&self, delivery: &Delivery) -> Result<String, String> {
        let bytes: Vec<u8> = match self {
            DedupKey::MessageId => delivery
                .message_id()
                .map(|id| id.as_bytes().to_vec())
                .ok_or_else(|| "the message has no message_id property".to_owned())?,
            DedupKey::Header(name) => {
                let value = delivery
                    .header(name)
                    .ok_or_else(|| format!("the message has no {name:?} header"))?;
                header_key(value)
                    .ok_or_else(|| format!("the {name:?} header is not a string or an integer"))?
            }
            DedupKey::JsonPointer(pointer) => {
                let body: serde_json::Value = serde_json::from_slice(delivery.body())
                    .map_err(|e| format!("the body is not JSON ({e})"))?;
                match body.pointer(pointer) {
                    Some(serde_json::Value::String(s)) => s.as_bytes().to_vec(),
                    Some(serde_json::Value::Number(n)) => n.to_string().into_bytes(),
                    Some(_) => {
                        return Err(format!("{pointer} is not a string or a number"));
                    }
                    None => return Err(format!("the body has nothing at {pointer}")),
                }
            }
        };
        if bytes.is_empty() {
            return Err(format!("the {self} key is empty"));
        }
        Ok(canonical_key(&bytes))
    }
}

/// The longest key kept as it is. Longer keys are kept as their SHA-256, so
/// that every backend can index them (PostgreSQL's B-tree rows stop at about
/// 2.7 kB, Redis keys are best kept short).
pub const MAX_KEY_LEN: usize = 200;

/// The stored form of a business id's bytes. Injective, so that two
/// different ids never collapse into one key:
/// - valid UTF-8 without NUL, not starting with `hex:` or `sha256:`: as it is;
/// - anything else (invalid UTF-8, a NUL, or a text that looks like one of
///   these forms): `hex:` and the bytes in lower-case hex;
/// - a result longer than [`MAX_KEY_LEN`] bytes: `sha256:` and the hex
///   SHA-256 of that result.
pub fn canonical_key(bytes: &[u8]) -> String {
    let literal = std::str::from_utf8(bytes)
        .ok()
        .filter(|s| !s.contains('\0') && !s.starts_with("hex:") && !s.starts_with("sha256:"));
    let key = match literal {
        Some(text) => text.to_owned(),
        None => format!("hex:{}", hex::encode(bytes)),
    };
    if key.len() <= MAX_KEY_LEN {
        return key;
    }
    use sha2::Digest;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

/// A header value's bytes: strings byte for byte (no lossy decoding),
/// integers in decimal.
fn header_key(value: &AMQPValue) -> Option<Vec<u8>> {
    let number = |n: i128| Some(n.to_string().into_bytes());
    match value {
        AMQPValue::ShortShortInt(n) => number(i128::from(*n)),
        AMQPValue::ShortShortUInt(n) => number(i128::from(*n)),
        AMQPValue::ShortInt(n) => number(i128::from(*n)),
        AMQPValue::ShortUInt(n) => number(i128::from(*n)),
        AMQPValue::LongInt(n) => number(i128::from(*n)),
        AMQPValue::LongUInt(n) => number(i128::from(*n)),
        AMQPValue::LongLongInt(n) => number(i128::from(*n)),
        AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
        AMQPValue::ByteArray(b) => Some(b.as_slice().to_vec()),
        _ => None,
    }
}

/// What to do with a message that has no key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingKey {
    /// Handle it without deduplication (the default), with a warning.
    #[default]
    Process,
    /// Treat it as a permanent failure: the dead-letter queue (or the
    /// exhausted path of the retry policy), with the reason.
    Reject,
}

impl FromStr for MissingKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(MissingKey::Process),
            "reject" | "dead-letter" => Ok(MissingKey::Reject),
            other => Err(format!(
                "unknown missing-key policy {other:?}: use \"process\" or \"reject\""
            )),
        }
    }
}

/// The answer to a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Claim {
    /// The key is now held by this claim: run the handler.
    Claimed,
    /// The key was handled before and has not expired: a duplicate.
    Done,
    /// Another claim holds the key and its lease has not run out.
    InProgress,
}

/// A dedup store that cannot answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DedupError {
    /// The store URL is not usable.
    #[error("invalid dedup store URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, redacted.
        url: String,
        /// Why.
        reason: String,
    },
    /// The store is down or refused the operation. Nothing was recorded.
    #[error("the dedup store is unavailable: {0}")]
    Unavailable(String),
}

/// Where keys are claimed and remembered.
///
/// A claim is identified by a `token` unique to it, so that only its holder
/// can complete or release it. Times are milliseconds since the Unix epoch.
pub trait SeenStore: Send + Sync + fmt::Debug {
    /// Claims `key` in `scope` until `lease_until` unless it is done or held
    /// by another unexpired claim. A claim with the token that holds the key
    /// now extends its lease to `lease_until` and answers [`Claim::Claimed`].
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        lease_until: u64,
    ) -> BoxFuture<'a, Result<Claim, DedupError>>;

    /// Marks a claimed key done until `expires_at`.
    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        expires_at: u64,
    ) -> BoxFuture<'a, Result<(), DedupError>>;

    /// Gives a claimed key up, so that the next delivery can claim it.
    fn release<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupError>>;

    /// Removes keys that expired before `now`; returns how many.
    fn purge_expired(&self, now: u64) -> BoxFuture<'_, Result<u64, DedupError>>;
}

/// Opens the store named by `url`: `memory` (or `memory://?capacity=N`),
/// `sqlite://path`, `postgres://...` or `redis://host:port`.
pub async fn connect(url: &str) -> Result<Arc<dyn SeenStore>, DedupError> {
    let shown = RedactedUri::new(url).to_string();
    if url == "memory" || url.starts_with("memory:") {
        let capacity = match url.split_once("capacity=") {
            None => memory::DEFAULT_CAPACITY,
            Some((_, n)) => n.parse().map_err(|_| DedupError::InvalidUrl {
                url: shown.clone(),
                reason: format!("capacity {n:?} is not a number"),
            })?,
        };
        return Ok(Arc::new(MemorySeenStore::new(capacity)));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        return Ok(Arc::new(RedisSeenStore::connect(url).await?));
        #[cfg(not(feature = "redis"))]
        return Err(DedupError::InvalidUrl {
            url: shown,
            reason: "this build has no Redis support (the `redis` feature)".into(),
        });
    }
    Ok(Arc::new(SqlSeenStore::connect(url).await?))
}

/// The default time a handled key is remembered.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a claim holds a key while its handler runs, unless set.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);

/// Deduplication for one consumer.
#[derive(Clone, Debug)]
pub struct DedupConfig {
    pub(crate) key: DedupKey,
    pub(crate) store: Arc<dyn SeenStore>,
    pub(crate) scope: Option<String>,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) missing: MissingKey,
    pub(crate) recheck: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) cleanup_every: Option<Duration>,
    /// This configuration's holder token, the keys its deliveries work on
    /// and its pending releases and done-marks (shared by its clones).
    pub(crate) local: Arc<local::LocalClaims>,
}

impl DedupConfig {
    /// Deduplicates on `key` in `store`. Defaults: keys kept 7 days, claims
    /// leased for 5 minutes, a busy key rechecked every 250 ms for up to 30 s,
    /// messages without a key handled anyway, expired keys removed hourly.
    pub fn new(key: DedupKey, store: Arc<dyn SeenStore>) -> Self {
        DedupConfig {
            key,
            local: Arc::new(local::LocalClaims::new(store.clone())),
            store,
            scope: None,
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            missing: MissingKey::Process,
            recheck: Duration::from_millis(250),
            max_wait: Duration::from_secs(30),
            cleanup_every: Some(Duration::from_secs(3600)),
        }
    }

    /// How long a handled key is remembered.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a claim holds a key. A handler that runs longer may see its
    /// key claimed by a redelivery elsewhere; keep it above the handler timeout.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The namespace of the keys; defaults to the queue's name, so that two
    /// queues (two services) seeing one order id each handle it once.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// What to do with a message without a key.
    pub fn missing_key(mut self, missing: MissingKey) -> Self {
        self.missing = missing;
        self
    }

    /// How often a key held by another claim is checked again, and how long
    /// in total before the delivery goes back to the queue.
    pub fn in_progress_wait(mut self, recheck: Duration, max_wait: Duration) -> Self {
        self.recheck = recheck;
        self.max_wait = max_wait;
        self
    }

    /// How often expired keys are removed (`None`: never, by this consumer).
    pub fn cleanup_every(mut self, every: Option<Duration>) -> Self {
        self.cleanup_every = every;
        self
    }

    /// The key extraction.
    pub fn key(&self) -> &DedupKey {
        &self.key
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SeenStore> {
        &self.store
    }
}

/// A holder token unique to one [`DedupConfig`] (and its clones): this
/// process's random id and a counter. Every claim of that configuration
/// carries it, so a key it still holds in the store (a redelivery after a
/// forced close) is taken over at once; [`local::LocalClaims`] keeps two of
/// its own deliveries of one key apart.
pub(crate) fn new_token() -> String {
    static INSTANCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let instance = INSTANCE.get_or_init(|| fastrand::u64(..));
    format!("{instance:016x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::{FieldTable, ShortString};

    #[test]
    fn keys_parse_and_print_back() {
        for text in ["message-id", "header:order-id", "json:/order/id"] {
            let key: DedupKey = text.parse().expect("valid");
            assert_eq!(key.to_string(), text);
        }
        assert!("header:".parse::<DedupKey>().is_err());
        assert!("json:order_id".parse::<DedupKey>().is_err());
        assert!("body".parse::<DedupKey>().is_err());
    }

    #[test]
    fn keys_are_extracted_from_each_place() {
        let mut headers = FieldTable::default();
        headers.insert("order-id".into(), AMQPValue::LongLongInt(42));
        let props = BasicProperties::default()
            .with_message_id(ShortString::from("m-1"))
            .with_headers(headers);
        let d = Delivery::for_test(br#"{"order":{"id":"A-7"},"n":3}"#.to_vec(), props);
        assert_eq!(DedupKey::MessageId.extract(&d), Ok("m-1".into()));
        assert_eq!(
            DedupKey::Header("order-id".into()).extract(&d),
            Ok("42".into())
        );
        assert_eq!(
            DedupKey::JsonPointer("/order/id".into()).extract(&d),
            Ok("A-7".into())
        );
        assert_eq!(
            DedupKey::JsonPointer("/n".into()).extract(&d),
            Ok("3".into())
        );
    }

    #[test]
    fn a_body_that_is_not_json_has_no_key() {
        let d = Delivery::for_test(vec![0xff, 0xfe], BasicProperties::default());
        let err = DedupKey::JsonPointer("/id".into())
            .extract(&d)
            .expect_err("no key");
        assert!(err.contains("not JSON"), "{err}");
        assert!(DedupKey::MessageId.extract(&d).is_err());
        assert!(DedupKey::Header("x".into()).extract(&d).is_err());
    }

    #[test]
    fn ids_that_differ_only_in_invalid_bytes_get_different_keys() {
        let key = DedupKey::Header("order-id".into());
        let with = |bytes: &[u8]| {
            let mut headers = FieldTable::default();
            headers.insert(
                "order-id".into(),
                AMQPValue::LongString(bytes.to_vec().into()),
            );
            let d = Delivery::for_test(
                b"{}".to_vec(),
                BasicProperties::default().with_headers(headers),
            );
            key.extract(&d).expect("a key")
        };
        // Both decode lossily to "A\u{fffd}": the old keys were equal.
        let a = with(b"A\xff");
        let b = with(b"A\xfe");
        assert_ne!(a, b);
        assert_eq!(a, "hex:41ff");
        // A text that looks like the hex form is escaped too.
        assert_eq!(
            with(b"hex:41ff"),
            format!("hex:{}", hex::encode("hex:41ff"))
        );
        assert_ne!(with(b"hex:41ff"), a);
        // NUL never reaches a store, and long ids are hashed.
        assert_eq!(with(b"a\0b"), "hex:610062");
        let long = with(&[b'x'; 5000]);
        assert!(
            long.starts_with("sha256:") && long.len() == 7 + 64,
            "{long}"
        );
        assert_ne!(long, with(&[b'y'; 5000]));
        assert_eq!(with(b"plain-id"), "plain-id");
    }

    #[test]
    fn tokens_are_unique() {
        assert_ne!(new_token(), new_token());
    }
}
