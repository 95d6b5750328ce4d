//! The compensation store ("local message table"): where a message goes when
//! the broker's retries cannot settle it, so that a scanner can re-drive it
//! later and an operator can review what keeps failing.
//!
//! The consumer writes the row, waits for the commit, and only then acks the
//! original. If the write fails, the original is requeued after a pause:
//! nothing leaves the broker without a durable row.
//!
//! Rows move through `pending → retrying → needs_review → resolved |
//! discarded | replayed`; every manual action writes an audit entry, and no
//! row is deleted except by the explicit retention purge of finished rows.
//!
//! Two backends share one SQL implementation through sqlx's `Any` driver:
//! SQLite (the embedded default, in WAL mode) and PostgreSQL (for several
//! consumer instances, with `FOR UPDATE SKIP LOCKED` claims).

mod console_audit;
mod groups;
mod scanner;
mod sql;

pub use groups::{
    FailureGroup, GroupBatch, GroupBatchTotals, GroupJob, GroupKey, GroupProgress, PayloadVersion,
    normalize_error, run_group_action,
};

pub use console_audit::ConsoleAction;
pub(crate) use scanner::unique_owner;
pub use scanner::{Redrive, RedriveFn, Scanner, ScannerConfig, ScannerReport};
pub use sql::SqlStore;
pub(crate) use sql::{Backend, open_pool};

use crate::handler::Delivery;
use crate::retry::{FailedMessage, kind_name};
use futures_util::future::BoxFuture;
use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The header that ties a re-driven message to its row, so that a second
/// failure updates the row instead of adding another.
pub const STORE_ID_HEADER: &str = "x-backstop-store-id";

/// Where a row is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Stored, waiting for its first re-drive.
    Pending,
    /// Re-driven at least once, or claimed by a scanner now.
    Retrying,
    /// Re-drives exhausted: a person must look at it.
    NeedsReview,
    /// Handled by hand (or by a handler re-drive), closed.
    Resolved,
    /// Given up on purpose, closed.
    Discarded,
    /// Published back to its queue with a confirm, closed unless it fails again.
    Replayed,
}

impl Status {
    /// The name stored in the database and shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Retrying => "retrying",
            Status::NeedsReview => "needs_review",
            Status::Resolved => "resolved",
            Status::Discarded => "discarded",
            Status::Replayed => "replayed",
        }
    }

    /// True for the statuses the retention purge may remove.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Status::Resolved | Status::Discarded | Status::Replayed
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => Status::Pending,
            "retrying" => Status::Retrying,
            "needs_review" => Status::NeedsReview,
            "resolved" => Status::Resolved,
            "discarded" => Status::Discarded,
            "replayed" => Status::Replayed,
            other => {
                return Err(format!(
                    "unknown status {other:?}; one of pending, retrying, needs_review, resolved, discarded, replayed"
                ));
            }
        })
    }
}

/// A failed message about to be stored.
#[derive(Clone, Debug, PartialEq)]
pub struct NewFailedMessage {
    /// The queue it failed in.
    pub queue: String,
    /// Where it was first published: exchange.
    pub exchange: String,
    /// Where it was first published: routing key.
    pub routing_key: String,
    /// The `message_id` property.
    pub message_id: Option<String>,
    /// The deduplication key, when one was extracted.
    pub dedup_key: Option<String>,
    /// The body, byte for byte.
    pub payload: Vec<u8>,
    /// The AMQP headers, as JSON (round-trips exactly).
    pub headers: String,
    /// The other AMQP properties, as JSON.
    pub properties: String,
    /// The last error.
    pub error: String,
    /// `transient` or `permanent`.
    pub error_kind: String,
    /// Delivery attempts before it reached the store.
    pub attempts: i64,
    /// When the scanner should first re-drive it, ms since the epoch.
    pub next_attempt_at: i64,
    /// The row this message came from, for a message that failed again after
    /// a re-drive. Trusted only when that row has this message's queue and
    /// fingerprint: a handler that copies incoming headers onto a new message
    /// must not make it update an old row.
    pub store_id: Option<i64>,
    /// What makes two failures the same message (see [`fingerprint`]). At
    /// most one unfinished row holds a fingerprint in a queue; a repeat
    /// updates that row and counts an occurrence.
    pub fingerprint: String,
}

impl NewFailedMessage {
    /// Builds the row of an exhausted `delivery`; `dedup_key` is its
    /// deduplication key, when the consumer deduplicates.
    pub fn from_failure(
        failed: &FailedMessage,
        delivery: &Delivery,
        next_attempt_at: i64,
        dedup_key: Option<String>,
    ) -> Self {
        let headers = delivery.properties().headers().clone().unwrap_or_default();
        let store_id = headers
            .inner()
            .get(STORE_ID_HEADER)
            .and_then(crate::retry::header_u64)
            .and_then(|id| i64::try_from(id).ok());
        NewFailedMessage {
            queue: failed.queue.clone(),
            exchange: failed.original_exchange.clone(),
            routing_key: failed.original_routing_key.clone(),
            message_id: delivery.message_id().map(str::to_owned),
            fingerprint: fingerprint(&failed.queue, delivery, dedup_key.as_deref()),
            dedup_key,
            payload: delivery.body().to_vec(),
            headers: serde_json::to_string(&headers).unwrap_or_else(|_| "{}".into()),
            properties: properties_json(delivery.properties()),
            error: failed.error.clone(),
            error_kind: kind_name(failed.kind).to_owned(),
            attempts: i64::from(failed.attempt),
            next_attempt_at,
            store_id,
        }
    }
}

/// What identifies a failed message across its redeliveries and re-drives:
/// - `key:<dedup key>#<body hash>` when the consumer deduplicates;
/// - else `id:<message-id>#<body hash>` when the message has one;
/// - else `sha256:<hex>` of the queue, the body, the headers other than
///   Backstop's `x-backstop-*` and the broker's history (`x-death`,
///   `x-delivery-count`, ...), which change from one delivery to the next,
///   and the properties every copy keeps (content type and encoding,
///   correlation id, reply-to, type, app id, priority, timestamp).
///
/// The body is always part of it: a producer that reuses a message-id, or a
/// corrected order under the same business id, is a message of its own,
/// never an occurrence of another row (which would ack it with its body
/// stored nowhere).
pub fn fingerprint(queue: &str, delivery: &Delivery, dedup_key: Option<&str>) -> String {
    use sha2::Digest;
    let body_hash = || {
        let digest = sha2::Sha256::digest(delivery.body());
        hex::encode(&digest[..16])
    };
    if let Some(key) = dedup_key {
        return format!("key:{key}#{}", body_hash());
    }
    if let Some(id) = delivery.message_id() {
        return format!(
            "id:{}#{}",
            crate::dedup::canonical_key(id.as_bytes()),
            body_hash()
        );
    }
    let mut headers = FieldTable::default();
    if let Some(table) = delivery.properties().headers() {
        for (name, value) in table.inner() {
            let name_str = name.as_str();
            if !name_str.starts_with("x-backstop-")
                && !crate::retry::is_broker_history_header(name_str)
            {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    let headers = serde_json::to_vec(&headers).unwrap_or_default();
    let p = delivery.properties();
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.to_string());
    let kept = serde_json::json!([
        s(p.content_type()),
        s(p.content_encoding()),
        s(p.correlation_id()),
        s(p.reply_to()),
        s(p.kind()),
        s(p.app_id()),
        p.priority(),
        p.timestamp(),
    ])
    .to_string();
    let mut hash = sha2::Sha256::new();
    for part in [queue.as_bytes(), delivery.body(), &headers, kept.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    format!("sha256:{}", hex::encode(hash.finalize()))
}

/// The properties worth keeping, as a JSON object (as stored in a row's
/// `properties`).
pub fn properties_json(p: &BasicProperties) -> String {
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.to_string());
    serde_json::json!({
        "content_type": s(p.content_type()),
        "content_encoding": s(p.content_encoding()),
        "delivery_mode": p.delivery_mode(),
        "priority": p.priority(),
        "correlation_id": s(p.correlation_id()),
        "reply_to": s(p.reply_to()),
        "expiration": s(p.expiration()),
        "message_id": s(p.message_id()),
        "timestamp": p.timestamp(),
        "type": s(p.kind()),
        "user_id": s(p.user_id()),
        "app_id": s(p.app_id()),
    })
    .to_string()
}

/// A stored row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailedRow {
    /// The row's id.
    pub id: i64,
    /// The queue it failed in.
    pub queue: String,
    /// Original exchange.
    pub exchange: String,
    /// Original routing key.
    pub routing_key: String,
    /// The `message_id` property.
    pub message_id: Option<String>,
    /// The deduplication key.
    pub dedup_key: Option<String>,
    /// The body to re-drive: the latest edited version's, or the original
    /// when the row was never edited (see [`version`](Self::version); the
    /// original stays readable through `SqlStore::versions`).
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Headers as JSON, of the same version as `payload`.
    pub headers: String,
    /// Which version `payload` and `headers` are: 0 for the original, 1, 2,
    /// ... for an operator's edits.
    pub version: i64,
    /// Other properties as JSON.
    pub properties: String,
    /// The last error.
    pub error: String,
    /// `transient` or `permanent`.
    pub error_kind: String,
    /// Delivery attempts before the store, plus failed re-drives since.
    pub attempts: i64,
    /// What identifies the message (see [`fingerprint`]).
    pub fingerprint: String,
    /// How many times the message arrived at the store while this row was
    /// unfinished (redeliveries, duplicates): 1 for the first.
    pub occurrences: i64,
    /// Re-drives claimed by scanners (counted when claimed).
    pub redrives: i64,
    /// Where the row is.
    pub status: Status,
    /// When the scanner may next re-drive it, ms since the epoch.
    pub next_attempt_at: i64,
    /// When the row was written, ms since the epoch.
    pub created_at: i64,
    /// When the row last changed, ms since the epoch.
    pub updated_at: i64,
}

impl FailedRow {
    /// The properties to publish the message with again: the stored
    /// properties and headers, minus Backstop's failure headers, plus the
    /// row's id so a new failure updates this row. Like every copy, it has
    /// no `expiration` (the original's is kept in
    /// [`ORIGINAL_EXPIRATION_HEADER`](crate::retry::ORIGINAL_EXPIRATION_HEADER))
    /// and none of the broker's history headers.
    pub fn republish_properties(&self) -> BasicProperties {
        let stored: FieldTable = serde_json::from_str(&self.headers).unwrap_or_default();
        let mut headers = crate::retry::without_backstop_headers(&stored);
        headers.insert(
            STORE_ID_HEADER.into(),
            lapin::types::AMQPValue::LongLongInt(self.id),
        );
        let p: serde_json::Value = serde_json::from_str(&self.properties).unwrap_or_default();
        let text = |k: &str| p.get(k).and_then(|v| v.as_str()).map(ShortString::from);
        let mut original = BasicProperties::default();
        if let Some(v) = text("expiration") {
            original = original.with_expiration(v);
        }
        let mut props = crate::retry::copy_properties(&original, headers);
        if let Some(v) = text("content_type") {
            props = props.with_content_type(v);
        }
        if let Some(v) = text("content_encoding") {
            props = props.with_content_encoding(v);
        }
        if let Some(v) = text("correlation_id") {
            props = props.with_correlation_id(v);
        }
        if let Some(v) = text("reply_to") {
            props = props.with_reply_to(v);
        }
        if let Some(v) = text("message_id") {
            props = props.with_message_id(v);
        }
        if let Some(v) = text("type") {
            props = props.with_type(v);
        }
        if let Some(v) = text("app_id") {
            props = props.with_app_id(v);
        }
        if let Some(v) = p.get("timestamp").and_then(|v| v.as_u64()) {
            props = props.with_timestamp(v);
        }
        if let Some(v) = p.get("priority").and_then(|v| v.as_u64()) {
            props = props.with_priority(v.min(255) as u8);
        }
        props
    }
}

/// One audit entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// When, ms since the epoch.
    pub at: i64,
    /// Who: `--actor`, `$USER`, or `scanner`/`consumer`.
    pub actor: String,
    /// What: `stored`, `stored_again`, `failed_again`, `replayed`, `retry`,
    /// `force_retry`, `resolve`, `discard`, `needs_review`.
    pub action: String,
    /// The note or reason given.
    pub note: Option<String>,
}

/// What `list` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<Status>,
    /// Only this queue.
    pub queue: Option<String>,
    /// At most this many (newest first).
    pub limit: Option<i64>,
}

/// A person's decision about a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManualAction {
    /// Re-drive it at the next scan (back to `pending`, due now). Refused
    /// for a finished row (resolved, discarded, replayed).
    Retry,
    /// Re-drive even a finished row (resolved, discarded, replayed),
    /// audited as `force_retry`. On a row that is not finished it is a
    /// plain [`Retry`](Self::Retry), audited as `retry`.
    ForceRetry,
    /// It was handled by hand: `resolved`.
    Resolve,
    /// Give it up: `discarded`.
    Discard,
}

impl ManualAction {
    /// The audit action name.
    pub fn as_str(self) -> &'static str {
        match self {
            ManualAction::Retry => "retry",
            ManualAction::ForceRetry => "force_retry",
            ManualAction::Resolve => "resolve",
            ManualAction::Discard => "discard",
        }
    }
}

/// How a claimed row's re-drive went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedriveOutcome {
    /// Published back to its queue with a confirm.
    Replayed,
    /// A handler re-drive succeeded.
    Resolved,
    /// It failed; try again at `next_attempt_at`, or hand it to a person.
    Failed {
        /// Why.
        error: String,
        /// When to try again, ms since the epoch.
        next_attempt_at: i64,
        /// True when the maximum was reached: the row goes to `needs_review`.
        give_up: bool,
    },
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store URL is not usable.
    #[error("invalid store URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, redacted.
        url: String,
        /// Why.
        reason: String,
    },
    /// The database cannot be reached or refused the write (down, disk
    /// full, read-only). Nothing was stored.
    #[error("the compensation store is unavailable: {0}")]
    Unavailable(String),
    /// No row has this id.
    #[error("no failed message with id {0}")]
    NotFound(i64),
    /// The row cannot be re-opened: another row of the same message is
    /// still unfinished, and that one is the row to act on.
    #[error("cannot re-open row {id}: row {open} holds the same message and is not finished")]
    StillOpen {
        /// The row asked for.
        id: i64,
        /// The unfinished row of the same message.
        open: i64,
    },
    /// An edit that cannot be stored: no note, headers that are not a JSON
    /// header table, or a row a scanner is re-driving right now.
    #[error("cannot edit: {0}")]
    InvalidEdit(String),
    /// A group action without a note: every bulk action says why, in each
    /// row's audit entry.
    #[error("a group {0} needs a note saying why")]
    NoteRequired(&'static str),
    /// The action does not apply to the row's status.
    #[error("cannot {action} row {id}: it is {status}")]
    InvalidTransition {
        /// The row.
        id: i64,
        /// Its status.
        status: Status,
        /// What was asked.
        action: &'static str,
    },
}

impl StoreError {
    /// True for errors that say nothing about the row, only about the store
    /// being reachable: the caller should wait and try again.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The store, as narrow as the consumer, the scanner and the CLI need.
pub trait CompensationStore: Send + Sync + fmt::Debug + 'static {
    /// Writes the row of a failed message and commits. Returns the row's id.
    /// - A message carrying the id of a row of its own queue and fingerprint
    ///   (a re-driven message that failed again) updates that row
    ///   (`failed_again`).
    /// - Else a message whose fingerprint has an unfinished row in its queue
    ///   (a redelivery, a duplicate) counts one more occurrence there
    ///   (`stored_again`).
    /// - Else it is a new row (`stored`).
    fn store<'a>(&'a self, message: &'a NewFailedMessage)
    -> BoxFuture<'a, Result<i64, StoreError>>;

    /// Claims up to `limit` due rows (of `queue` only, when given) for
    /// `owner` until `lease_until`; rows claimed by someone else with a live
    /// lease are skipped.
    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        now: i64,
        lease_until: i64,
        limit: i64,
        queue: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<FailedRow>, StoreError>>;

    /// Extends `owner`'s lease on row `id` to `lease_until`, if `owner`
    /// still holds a live lease on it at `now`. Returns false when the lease
    /// is gone (expired and taken, or the row was changed meanwhile): the
    /// caller must not re-drive the row then. The scanner calls this right
    /// before each row's side effect.
    fn renew_lease<'a>(
        &'a self,
        owner: &'a str,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// [`renew_lease`](Self::renew_lease) for several rows at once: extends
    /// `owner`'s live leases on `ids` and returns the ids whose lease it
    /// still held (the others must not be re-driven). The default renews
    /// them one by one; the SQL store does it in one statement.
    fn renew_leases<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [i64],
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'a, Result<Vec<i64>, StoreError>> {
        Box::pin(async move {
            let mut held = Vec::with_capacity(ids.len());
            for id in ids {
                if self.renew_lease(owner, *id, now, lease_until).await? {
                    held.push(*id);
                }
            }
            Ok(held)
        })
    }

    /// Gives back `owner`'s live claims on `ids`, rows a scan claimed and
    /// then never tried (it stopped, or ended at an unknown outcome): their
    /// lease ends now and the re-drive their claim counted is taken back, so
    /// that an early end never brings a row nearer to `needs_review`.
    /// Returns how many rows were released. The default releases nothing:
    /// the rows then keep their lease until it runs out.
    fn release_untried<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [i64],
        now: i64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let _ = (owner, ids, now);
        Box::pin(async { Ok(0) })
    }

    /// Records how the re-drives of claimed rows went and releases their
    /// leases, in one transaction. A row that `owner` no longer holds is left
    /// alone: its re-driven message already failed again and updated it.
    /// Returns how many rows were updated.
    fn finish_redrives<'a>(
        &'a self,
        owner: &'a str,
        outcomes: &'a [(i64, RedriveOutcome)],
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Rows matching `filter`, newest first.
    fn list<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<FailedRow>, StoreError>>;

    /// One row.
    fn get(&self, id: i64) -> BoxFuture<'_, Result<FailedRow, StoreError>>;

    /// Applies a person's decision and writes its audit entry, together.
    fn act<'a>(
        &'a self,
        id: i64,
        action: ManualAction,
        actor: &'a str,
        note: Option<&'a str>,
    ) -> BoxFuture<'a, Result<FailedRow, StoreError>>;

    /// The row's audit history, oldest first.
    fn audit(&self, id: i64) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>>;

    /// Deletes finished rows (resolved, discarded, replayed) last changed
    /// before `before`, of `queue` only when given; returns how many.
    fn purge_finished<'a>(
        &'a self,
        before: i64,
        queue: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// How many rows are in each status (statuses without rows are left out).
    fn count_by_status(&self) -> BoxFuture<'_, Result<Vec<(Status, i64)>, StoreError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A re-driven row is a copy like any other: it must not expire in its
    /// queue after the row was marked replayed.
    #[test]
    fn a_redrive_drops_expiration_and_keeps_it_in_a_header() {
        let row = FailedRow {
            id: 7,
            queue: "orders".into(),
            exchange: "".into(),
            routing_key: "orders".into(),
            message_id: Some("m-1".into()),
            dedup_key: None,
            payload: b"{}".to_vec(),
            version: 0,
            headers: r#"{"x-death":{"FieldArray":[]},"x-tenant":{"LongString":[97]}}"#.into(),
            properties: r#"{"expiration":"1500","message_id":"m-1"}"#.into(),
            error: "declined".into(),
            error_kind: "permanent".into(),
            attempts: 1,
            fingerprint: "id:m-1".into(),
            occurrences: 1,
            redrives: 0,
            status: Status::Retrying,
            next_attempt_at: 0,
            created_at: 0,
            updated_at: 0,
        };
        let props = row.republish_properties();
        assert_eq!(props.expiration(), &None);
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        let headers = props.headers().clone().unwrap_or_default();
        let text = |k: &str| headers.inner().get(k).and_then(crate::retry::header_str);
        assert_eq!(
            text(crate::retry::ORIGINAL_EXPIRATION_HEADER).as_deref(),
            Some("1500")
        );
        assert_eq!(text("x-tenant").as_deref(), Some("a"));
        assert!(!headers.inner().contains_key("x-death"));
        assert_eq!(
            headers
                .inner()
                .get(STORE_ID_HEADER)
                .and_then(crate::retry::header_u64),
            Some(7)
        );
    }
}
