//! The transactional outbox: a message and the business write it announces
//! commit together, in the application's own SQL transaction (SQLite or
//! PostgreSQL), or neither does; a [`Relay`] then publishes it with confirms.
//!
//! [`Outbox::enqueue`] inserts the message into the outbox table through the
//! application's transaction. Once that transaction commits, the message is
//! durable in the database (as durable as the database: [`open_pool`] gives
//! SQLite WAL with `synchronous = FULL`), and it will be published even if
//! the process dies right after the commit. If the transaction rolls back,
//! the message is gone with the business write.
//!
//! The [`Relay`] leases unsent rows, publishes them through a
//! [`Publisher`](super::Publisher) and marks a row sent (`sent_at`) only once
//! the broker confirmed it. A relay that dies between the confirm and the
//! mark leaves the row unsent: after its lease runs out, a relay publishes it
//! again, a possible **duplicate**, counted in
//! [`RelayStats::republished`] and logged. Consumers deduplicate by the
//! message id, which every row keeps (the caller's, or one generated at
//! enqueue). Nothing is published before its transaction committed, and
//! nothing committed is left unpublished while a relay runs.
//!
//! Several relays can share one table (several instances of a service): on
//! PostgreSQL each lease is a short transaction that locks its rows with
//! `FOR UPDATE SKIP LOCKED`, and leases are taken one relay at a time (a
//! transaction-scoped advisory lock per table, tried: a relay that finds it
//! taken leases nothing this round and looks again after its poll
//! interval) so that the per-partition
//! order below holds across relays; publishing, the slow part, runs in
//! parallel. On SQLite the lease is a single `UPDATE`, and SQLite runs one
//! writer at a time.
//!
//! **Order.** Rows enqueued with a partition key
//! ([`enqueue_partitioned`](Outbox::enqueue_partitioned), e.g. an order id)
//! are published in the order of their ids, which is the order their inserts
//! ran: a row is never published while an older row of its partition is
//! unsent, and each is published only after the previous one was confirmed.
//! Two transactions enqueueing into one partition at the same time have no
//! order between them until they commit; serialize them (as the business
//! write usually does, by locking the aggregate's row) when their order
//! matters. A row that keeps failing holds its partition back. Rows without
//! a partition key have no order promise. Order holds while each relay
//! finishes a batch within its lease; a relay stalled past its lease can see
//! its rows published again by another (counted duplicates, as above).
//!
//! Sent rows are deleted after [`RelayConfig::retention`] (7 days by
//! default), in bounded batches.
//!
//! ```no_run
//! use backstop::connection::ConnectionConfig;
//! use backstop::publish::outbox::{Outbox, Relay, RelayConfig};
//! use backstop::publish::{Message, Publisher};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = backstop::publish::outbox::open_pool("sqlite://orders.db").await?;
//! let outbox = Outbox::new(pool.clone()).await?;
//!
//! // The business write and its event, in one transaction.
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
//!     .bind("order-42")
//!     .bind(1999_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! let event = Message::new("orders", "order.created", br#"{"id":"order-42"}"#.to_vec());
//! outbox.enqueue_partitioned(&mut tx, event, "order-42").await?;
//! tx.commit().await?;
//!
//! // Publishes committed rows with confirms (a publisher without a spool:
//! // the outbox is the durable store).
//! let publisher = Publisher::builder(ConnectionConfig::new("amqp://127.0.0.1:5672/%2f"))
//!     .start()
//!     .await?;
//! let relay = Relay::start(outbox, publisher, RelayConfig::default());
//! // ... on shutdown:
//! relay.close().await;
//! # Ok(()) }
//! ```

mod relay;

pub use relay::{Relay, RelayConfig, RelayHandle, RelayStats};

use super::Message;
use crate::retry::now_ms;
use crate::store::{Backend, StoreError};
use lapin::BasicProperties;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use std::sync::Arc;
use std::time::Duration;

/// The table [`Outbox::new`] uses.
pub const DEFAULT_TABLE: &str = "backstop_outbox";

/// The longest table name [`Outbox::with_table`] takes: PostgreSQL names
/// stop at 63 bytes, and the indexes add a suffix to it.
pub const MAX_TABLE_NAME: usize = 40;

/// Why the outbox could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The database URL is not one the outbox can open. Shown redacted.
    #[error("invalid outbox database URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, its password hidden.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The table name is not a plain SQL identifier.
    #[error("invalid outbox table name {name:?}: {reason}")]
    InvalidTable {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The message cannot be stored so that it reads back the same (its
    /// properties hold a value JSON cannot carry, such as a NaN float).
    #[error("the message cannot be stored in the outbox: {0}")]
    InvalidMessage(String),
    /// The database failed or is unreachable.
    #[error("the outbox database is unavailable: {0}")]
    Unavailable(String),
}

impl OutboxError {
    /// True when trying again later may succeed (the database was
    /// unavailable); false for a bad URL, table name or message.
    pub fn is_transient(&self) -> bool {
        matches!(self, OutboxError::Unavailable(_))
    }
}

fn unavailable(e: sqlx::Error) -> OutboxError {
    OutboxError::Unavailable(e.to_string())
}

/// Opens a pool for the outbox (`sqlite://path` in WAL mode with full fsync,
/// or `postgres://`). The application's own pool works as well, as long as
/// the outbox's table lives in the database of the business writes.
pub async fn open_pool(url: &str) -> Result<AnyPool, OutboxError> {
    let (pool, _) = crate::store::open_pool(url, true)
        .await
        .map_err(|e| match e {
            StoreError::InvalidUrl { url, reason } => OutboxError::InvalidUrl { url, reason },
            other => OutboxError::Unavailable(other.to_string()),
        })?;
    Ok(pool)
}

/// How many unsent rows there are, and for how long the oldest has waited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxBacklog {
    /// Rows not marked sent yet.
    pub pending: u64,
    /// How long ago the oldest of them was enqueued.
    pub oldest_pending: Option<Duration>,
}

/// The outbox table of one database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: AnyPool,
    backend: Backend,
    sql: Arc<Statements>,
}

/// The statements for one table name, written once.
#[derive(Debug)]
struct Statements {
    table: String,
    insert: String,
    lease: String,
    fail: String,
    backlog: String,
    purge: String,
}

/// The columns a relay reads from a leased row.
const LEASED_COLUMNS: &str =
    "id, exchange, routing_key, body, properties, message_id, partition_key, attempts, in_doubt";

impl Statements {
    fn new(table: &str, backend: Backend) -> Self {
        let lock = match backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        Statements {
            table: table.to_owned(),
            insert: format!(
                "INSERT INTO {table}
                 (exchange, routing_key, body, properties, message_id, partition_key, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            // A row is leasable when it is unsent, not leased (or its lease
            // ran out), not backing off, and no older unsent row of its
            // partition is leased or backing off. In id order with a limit,
            // a batch therefore holds a prefix of each partition's unsent
            // rows, which the relay publishes in order.
            lease: format!(
                "UPDATE {table} SET leased_by = $1, lease_until = $2
                 WHERE id IN (
                     SELECT r.id FROM {table} r
                     WHERE r.sent_at IS NULL
                       AND (r.lease_until IS NULL OR r.lease_until < $3)
                       AND r.next_attempt_at <= $3
                       AND (r.partition_key IS NULL OR NOT EXISTS (
                           SELECT 1 FROM {table} o
                           WHERE o.partition_key = r.partition_key
                             AND o.sent_at IS NULL AND o.id < r.id
                             AND ((o.lease_until IS NOT NULL AND o.lease_until >= $3)
                                  OR o.next_attempt_at > $3)))
                     ORDER BY r.id
                     LIMIT $4
                     {lock})
                   AND sent_at IS NULL
                 RETURNING {LEASED_COLUMNS}"
            ),
            fail: format!(
                "UPDATE {table}
                 SET leased_by = NULL, lease_until = NULL, attempts = attempts + 1,
                     next_attempt_at = $1, last_error = $2, in_doubt = $3
                 WHERE leased_by = $4 AND sent_at IS NULL AND id = $5"
            ),
            backlog: format!(
                "SELECT COUNT(*) AS pending, MIN(created_at) AS oldest
                 FROM {table} WHERE sent_at IS NULL"
            ),
            purge: format!(
                "DELETE FROM {table} WHERE id IN (
                     SELECT id FROM {table}
                     WHERE sent_at IS NOT NULL AND sent_at < $1
                     ORDER BY sent_at LIMIT $2)"
            ),
        }
    }

    fn schema(&self, backend: Backend) -> Vec<String> {
        let table = &self.table;
        let (id, bytes) = match backend {
            Backend::Sqlite => ("id INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"),
            Backend::Postgres => ("id BIGSERIAL PRIMARY KEY", "BYTEA"),
        };
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                    {id},
                    exchange TEXT NOT NULL,
                    routing_key TEXT NOT NULL,
                    body {bytes} NOT NULL,
                    properties TEXT NOT NULL,
                    message_id TEXT NOT NULL,
                    partition_key TEXT,
                    created_at BIGINT NOT NULL,
                    attempts BIGINT NOT NULL DEFAULT 0,
                    next_attempt_at BIGINT NOT NULL DEFAULT 0,
                    leased_by TEXT,
                    lease_until BIGINT,
                    in_doubt BIGINT NOT NULL DEFAULT 0,
                    last_error TEXT,
                    sent_at BIGINT)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {table}_unsent ON {table} (id) WHERE sent_at IS NULL"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {table}_partition
                 ON {table} (partition_key, id) WHERE sent_at IS NULL"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {table}_sent
                 ON {table} (sent_at) WHERE sent_at IS NOT NULL"
            ),
        ]
    }
}

/// `$first, $first+1, ...`, one per id.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_table(name: &str) -> Result<(), OutboxError> {
    let invalid = |reason: &str| OutboxError::InvalidTable {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(invalid("it is empty")),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err(invalid("it must start with a letter or `_`"));
        }
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid("only ASCII letters, digits and `_` are allowed"));
    }
    if name.len() > MAX_TABLE_NAME {
        return Err(invalid(&format!("at most {MAX_TABLE_NAME} characters")));
    }
    Ok(())
}

/// A leased row, as the relay publishes it.
#[derive(Clone, Debug)]
struct LeasedRow {
    id: i64,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: String,
    message_id: String,
    partition_key: Option<String>,
    attempts: i64,
    /// An earlier publish of this row may have reached the broker.
    in_doubt: bool,
}

impl LeasedRow {
    fn read(row: &AnyRow) -> Result<Self, OutboxError> {
        let get = |e: sqlx::Error| OutboxError::Unavailable(format!("reading a row: {e}"));
        Ok(LeasedRow {
            id: row.try_get("id").map_err(get)?,
            exchange: row.try_get("exchange").map_err(get)?,
            routing_key: row.try_get("routing_key").map_err(get)?,
            body: row.try_get("body").map_err(get)?,
            properties: row.try_get("properties").map_err(get)?,
            message_id: row.try_get("message_id").map_err(get)?,
            partition_key: row.try_get("partition_key").map_err(get)?,
            attempts: row.try_get("attempts").map_err(get)?,
            in_doubt: row.try_get::<i64, _>("in_doubt").map_err(get)? != 0,
        })
    }

    /// The message to publish, with its stored message id.
    fn message(&self) -> Result<Message, String> {
        let properties: BasicProperties = serde_json::from_str(&self.properties)
            .map_err(|e| format!("the stored properties do not parse: {e}"))?;
        Ok(
            Message::new(&*self.exchange, &*self.routing_key, self.body.clone())
                .with_properties(properties)
                .with_message_id(self.message_id.as_str()),
        )
    }
}

impl Outbox {
    /// The outbox in table [`DEFAULT_TABLE`] of `pool`'s database, created
    /// when missing.
    pub async fn new(pool: AnyPool) -> Result<Self, OutboxError> {
        Self::with_table(pool, DEFAULT_TABLE).await
    }

    /// The outbox in table `table` (letters, digits and `_`, at most
    /// [`MAX_TABLE_NAME`] characters) of `pool`'s database, created when
    /// missing. Separate tables are separate outboxes: a relay publishes the
    /// rows of its own table only.
    pub async fn with_table(pool: AnyPool, table: &str) -> Result<Self, OutboxError> {
        check_table(table)?;
        let backend = if pool.connect_options().database_url.scheme() == "sqlite" {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let outbox = Outbox {
            sql: Arc::new(Statements::new(table, backend)),
            pool,
            backend,
        };
        let mut tx = outbox.pool.begin().await.map_err(unavailable)?;
        if backend == Backend::Postgres {
            // Two instances starting together must not race on the DDL.
            sqlx::query("SELECT pg_advisory_xact_lock(7234000004)")
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        for statement in outbox.sql.schema(backend) {
            sqlx::query(&statement)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(outbox)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// The pool the outbox reads and the relay writes through.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Inserts `message` through `tx`, the application's open transaction
    /// (a `&mut sqlx::Transaction<'_, sqlx::Any>` derefs to it), and returns its
    /// message id: the message's own, or a generated one. The row commits or
    /// rolls back with the transaction; nothing is published before it
    /// commits. No order is promised for rows without a partition key.
    ///
    /// An error leaves the transaction to the caller, who should roll it
    /// back: the business write would otherwise commit without its event.
    pub async fn enqueue(
        &self,
        tx: &mut sqlx::AnyConnection,
        message: Message,
    ) -> Result<String, OutboxError> {
        self.insert(tx, message, None).await
    }

    /// Like [`enqueue`](Self::enqueue), in `partition` (an aggregate's id,
    /// say): the relay publishes a partition's rows one after the other, in
    /// the order they were inserted, each only after the one before it was
    /// confirmed.
    pub async fn enqueue_partitioned(
        &self,
        tx: &mut sqlx::AnyConnection,
        message: Message,
        partition: &str,
    ) -> Result<String, OutboxError> {
        self.insert(tx, message, Some(partition)).await
    }

    async fn insert(
        &self,
        tx: &mut sqlx::AnyConnection,
        message: Message,
        partition: Option<&str>,
    ) -> Result<String, OutboxError> {
        // The Publisher's rule: the caller's id, else a generated one.
        let message_id = message
            .message_id()
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(super::publisher::new_message_id);
        let message = message.with_message_id(message_id.as_str());
        let properties = serde_json::to_string(message.properties())
            .map_err(|e| OutboxError::InvalidMessage(e.to_string()))?;
        // The relay must be able to read back whatever was committed.
        serde_json::from_str::<BasicProperties>(&properties).map_err(|e| {
            OutboxError::InvalidMessage(format!("its properties do not read back: {e}"))
        })?;
        sqlx::query(&self.sql.insert)
            .bind(message.exchange())
            .bind(message.routing_key())
            .bind(message.body())
            .bind(properties)
            .bind(message_id.as_str())
            .bind(partition)
            .bind(now_ms() as i64)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        Ok(message_id)
    }

    /// The unsent rows: how many, and the age of the oldest.
    pub async fn backlog(&self) -> Result<OutboxBacklog, OutboxError> {
        let row = sqlx::query(&self.sql.backlog)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        let pending: i64 = row.try_get("pending").map_err(unavailable)?;
        let oldest: Option<i64> = row.try_get("oldest").map_err(unavailable)?;
        let now = now_ms() as i64;
        Ok(OutboxBacklog {
            pending: pending.max(0) as u64,
            oldest_pending: oldest
                .map(|at| Duration::from_millis(now.saturating_sub(at).max(0) as u64)),
        })
    }

    /// Deletes at most `limit` rows marked sent before `before` (milliseconds
    /// since the Unix epoch), oldest first; returns how many. Unsent rows
    /// are never deleted, however old.
    pub async fn purge_sent_before(&self, before: u64, limit: u64) -> Result<u64, OutboxError> {
        let done = sqlx::query(&self.sql.purge)
            .bind(before as i64)
            .bind(limit.min(i64::MAX as u64) as i64)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    /// Leases up to `limit` rows for `owner` until `lease_until`, in id
    /// order.
    async fn lease(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> Result<Vec<LeasedRow>, OutboxError> {
        let query = sqlx::query(&self.sql.lease)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(limit);
        let rows = match self.backend {
            Backend::Sqlite => query.fetch_all(&self.pool).await.map_err(unavailable)?,
            Backend::Postgres => {
                // Relays lease one at a time: with `SKIP LOCKED` alone, a
                // relay would not see the rows another is leasing right now,
                // and could lease a younger row of their partition.
                // Tried, never waited for: a relay stalled while holding it
                // (its connection alive, its transaction open) must not stop
                // every other relay. Not taken: nothing leased this round.
                let mut tx = self.pool.begin().await.map_err(unavailable)?;
                let locked: bool = sqlx::query("SELECT pg_try_advisory_xact_lock($1) AS locked")
                    .bind(self.lease_lock_key())
                    .fetch_one(&mut *tx)
                    .await
                    .and_then(|row| row.try_get("locked"))
                    .map_err(unavailable)?;
                if !locked {
                    tx.rollback().await.map_err(unavailable)?;
                    return Ok(Vec::new());
                }
                let rows = query.fetch_all(&mut *tx).await.map_err(unavailable)?;
                tx.commit().await.map_err(unavailable)?;
                rows
            }
        };
        let mut leased = rows
            .iter()
            .map(LeasedRow::read)
            .collect::<Result<Vec<_>, _>>()?;
        leased.sort_by_key(|row| row.id);
        Ok(leased)
    }

    /// The advisory lock the leases of this table take turns on.
    fn lease_lock_key(&self) -> i64 {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("backstop outbox lease {}", self.sql.table));
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(bytes)
    }

    /// Extends `owner`'s lease on `ids` to `lease_until` and marks `wave` (a
    /// subset about to be published) in doubt; returns the ids whose lease
    /// was still held.
    async fn renew(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        wave: &[i64],
        ids: &[i64],
    ) -> Result<Vec<i64>, OutboxError> {
        let sql = format!(
            "UPDATE {table} SET lease_until = $1,
                 in_doubt = CASE WHEN id IN ({wave}) THEN 1 ELSE in_doubt END
             WHERE id IN ({ids}) AND leased_by = ${owner} AND lease_until > ${now}
               AND sent_at IS NULL
             RETURNING id",
            table = self.sql.table,
            wave = placeholders(2, wave.len()),
            ids = placeholders(2 + wave.len(), ids.len()),
            owner = 2 + wave.len() + ids.len(),
            now = 3 + wave.len() + ids.len(),
        );
        let mut query = sqlx::query(&sql).bind(lease_until);
        for id in wave.iter().chain(ids) {
            query = query.bind(*id);
        }
        let rows = query
            .bind(owner)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| row.try_get::<i64, _>("id").map_err(unavailable))
            .collect()
    }

    /// Marks `ids` sent at `now`, in one statement; returns how many were
    /// still unsent.
    async fn mark_sent(&self, ids: &[i64], now: i64) -> Result<u64, OutboxError> {
        let sql = format!(
            "UPDATE {table} SET sent_at = $1, leased_by = NULL, lease_until = NULL
             WHERE sent_at IS NULL AND id IN ({ids})",
            table = self.sql.table,
            ids = placeholders(2, ids.len()),
        );
        let mut query = sqlx::query(&sql).bind(now);
        for id in ids {
            query = query.bind(*id);
        }
        let done = query.execute(&self.pool).await.map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    /// Gives `owner`'s lease on `ids` up, untouched otherwise: rows that were
    /// not published in this batch.
    async fn release(&self, owner: &str, ids: &[i64]) -> Result<(), OutboxError> {
        let sql = format!(
            "UPDATE {table} SET leased_by = NULL, lease_until = NULL
             WHERE leased_by = $1 AND sent_at IS NULL AND id IN ({ids})",
            table = self.sql.table,
            ids = placeholders(2, ids.len()),
        );
        let mut query = sqlx::query(&sql).bind(owner);
        for id in ids {
            query = query.bind(*id);
        }
        query.execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    /// Records a failed publish of `id` and gives the lease up; the row is
    /// leased again from `next_attempt_at`.
    async fn fail(
        &self,
        owner: &str,
        id: i64,
        next_attempt_at: i64,
        error: &str,
        in_doubt: bool,
    ) -> Result<(), OutboxError> {
        sqlx::query(&self.sql.fail)
            .bind(next_attempt_at)
            .bind(error)
            .bind(i64::from(in_doubt))
            .bind(owner)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in [
            "backstop_outbox",
            "_x",
            "Orders2",
            &"a".repeat(MAX_TABLE_NAME),
        ] {
            assert_eq!(check_table(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a.b",
            "a b",
            "x; DROP TABLE y",
            "t\"",
            "é",
            &"a".repeat(MAX_TABLE_NAME + 1),
        ] {
            assert!(
                matches!(check_table(bad), Err(OutboxError::InvalidTable { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn placeholders_count_from_the_first() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
        assert_eq!(placeholders(5, 1), "$5");
    }

    /// What the relay publishes is what was enqueued: the properties,
    /// headers of every kind included, read back equal.
    #[test]
    fn stored_properties_read_back_equal() {
        let mut headers = FieldTable::default();
        headers.insert(
            "tenant".into(),
            AMQPValue::LongString(LongString::from("acme")),
        );
        headers.insert("n".into(), AMQPValue::LongLongInt(-7));
        headers.insert("flag".into(), AMQPValue::Boolean(true));
        headers.insert(
            "raw".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255, 10])),
        );
        headers.insert(
            "list".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::ShortInt(3)])),
        );
        let properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_correlation_id("c-1".into())
            .with_priority(3)
            .with_timestamp(1_700_000_000)
            .with_expiration("60000".into())
            .with_headers(headers);
        let row = LeasedRow {
            id: 1,
            exchange: "orders".into(),
            routing_key: "order.created".into(),
            body: vec![0, 1, 2],
            properties: serde_json::to_string(&properties).expect("serialize"),
            message_id: "m-1".into(),
            partition_key: None,
            attempts: 0,
            in_doubt: false,
        };
        let message = row.message().expect("reads back");
        assert_eq!(message.message_id(), Some("m-1"));
        assert_eq!(message.exchange(), "orders");
        assert_eq!(message.routing_key(), "order.created");
        assert_eq!(message.body(), &[0, 1, 2]);
        assert_eq!(message.properties().headers(), properties.headers());
        assert_eq!(
            message.properties().content_type(),
            properties.content_type()
        );
        assert_eq!(message.properties().priority(), properties.priority());
        assert_eq!(message.properties().expiration(), properties.expiration());
    }
}
