//! The transactional inbox: exactly-once effects for handlers that write to a
//! SQL database (SQLite or PostgreSQL).
//!
//! For each delivery the inbox opens a transaction, inserts the message's key
//! into `backstop_inbox`, and hands the transaction to the handler. The
//! handler's writes and the key commit together, and only then is the
//! message acked. If the process dies after the commit and before the ack,
//! the broker redelivers the message, the insert finds the key, and the
//! handler is not called: the effect happened once.
//!
//! Compared with the plain dedup mode ([`super::DedupConfig`]), which marks a
//! key done in a separate write after the handler and is therefore at least
//! once in that narrow window, the inbox is exactly once for effects inside
//! the same database. Effects outside it (an HTTP call, an email) are still
//! at least once.
//!
//! Two instances receiving the same key at once: on PostgreSQL the second
//! insert waits for the first transaction and then sees the key (or takes
//! over if the first rolled back); on SQLite writers take turns.
//!
//! ```no_run
//! use backstop::dedup::DedupKey;
//! use backstop::dedup::inbox::{Inbox, InboxHandler};
//! use backstop::handler::{Delivery, Outcome};
//! use futures_util::future::BoxFuture;
//!
//! struct CreateOrder;
//!
//! impl InboxHandler for CreateOrder {
//!     fn handle<'a>(
//!         &'a self,
//!         delivery: &'a Delivery,
//!         tx: &'a mut sqlx::AnyConnection,
//!     ) -> BoxFuture<'a, Outcome> {
//!         Box::pin(async move {
//!             let inserted = sqlx::query("INSERT INTO orders (body) VALUES ($1)")
//!                 .bind(delivery.body())
//!                 .execute(&mut *tx)
//!                 .await;
//!             match inserted {
//!                 Ok(_) => Outcome::Ack,
//!                 Err(e) => Outcome::retry(e.to_string()),
//!             }
//!         })
//!     }
//! }
//!
//! # async fn example() -> Result<(), backstop::dedup::DedupError> {
//! let pool = backstop::dedup::inbox::open_pool("sqlite://orders.db").await?;
//! let key: DedupKey = "json:/order_id".parse().expect("valid");
//! let handler = Inbox::new(pool, "orders", key, CreateOrder).await?;
//! // Consumer::new(supervisor, ConsumerConfig::new("orders"), handler) ...
//! # let _ = handler;
//! # Ok(()) }
//! ```

use super::{DedupError, DedupKey, MissingKey};
use crate::handler::{Delivery, Handler, Outcome};
use crate::retry::now_ms;
use crate::store::{Backend, StoreError};
use futures_util::future::BoxFuture;
use sqlx::AnyPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::{debug, warn};

/// A handler that runs inside the inbox's transaction.
pub trait InboxHandler: Send + Sync + 'static {
    /// Handles `delivery`, writing through `tx`. Returning [`Outcome::Ack`]
    /// commits; anything else rolls the transaction (and the key) back.
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
        tx: &'a mut sqlx::AnyConnection,
    ) -> BoxFuture<'a, Outcome>;
}

/// Opens a pool for the inbox (`sqlite://path` in WAL mode with full fsync,
/// or `postgres://`).
pub async fn open_pool(url: &str) -> Result<AnyPool, DedupError> {
    let (pool, _) = crate::store::open_pool(url, true)
        .await
        .map_err(|e| match e {
            StoreError::InvalidUrl { url, reason } => DedupError::InvalidUrl { url, reason },
            other => DedupError::Unavailable(other.to_string()),
        })?;
    Ok(pool)
}

/// Wraps an [`InboxHandler`] into a [`Handler`] for the consumer.
#[derive(Debug)]
pub struct Inbox<H> {
    pool: AnyPool,
    scope: String,
    key: DedupKey,
    missing: MissingKey,
    handler: H,
    duplicates: Arc<AtomicU64>,
}

impl<H: InboxHandler> Inbox<H> {
    /// An inbox for keys in `scope` (usually the queue's name), creating
    /// `backstop_inbox` in `pool`'s database when missing.
    pub async fn new(
        pool: AnyPool,
        scope: impl Into<String>,
        key: DedupKey,
        handler: H,
    ) -> Result<Self, DedupError> {
        let unavailable = |e: sqlx::Error| DedupError::Unavailable(e.to_string());
        let backend = if pool.connect_options().database_url.scheme() == "sqlite" {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let mut tx = pool.begin().await.map_err(unavailable)?;
        if backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(7234000003)")
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        for statement in [
            "CREATE TABLE IF NOT EXISTS backstop_inbox (
                scope TEXT NOT NULL,
                key TEXT NOT NULL,
                processed_at BIGINT NOT NULL,
                PRIMARY KEY (scope, key))",
            "CREATE INDEX IF NOT EXISTS backstop_inbox_age ON backstop_inbox (processed_at)",
        ] {
            sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Inbox {
            pool,
            scope: scope.into(),
            key,
            missing: MissingKey::Process,
            handler,
            duplicates: Arc::new(AtomicU64::new(0)),
        })
    }

    /// What to do with a message without a key (default: handle it, in a
    /// transaction but without a key).
    pub fn missing_key(mut self, missing: MissingKey) -> Self {
        self.missing = missing;
        self
    }

    /// Counts the duplicates acked without calling the handler.
    pub fn duplicates(&self) -> Arc<AtomicU64> {
        self.duplicates.clone()
    }

    /// Removes keys processed before `before` (milliseconds since the Unix
    /// epoch); returns how many. A duplicate arriving after its key was
    /// removed is handled again, so keep keys longer than redeliveries and
    /// replays can take.
    pub async fn purge_older_than(&self, before: u64) -> Result<u64, DedupError> {
        let done = sqlx::query("DELETE FROM backstop_inbox WHERE processed_at < $1")
            .bind(before as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| DedupError::Unavailable(e.to_string()))?;
        Ok(done.rows_affected())
    }

    async fn run(&self, delivery: Delivery) -> Outcome {
        let key = match self.key.extract(&delivery) {
            Ok(key) => Some(key),
            Err(reason) => match self.missing {
                MissingKey::Reject => {
                    warn!(scope = %self.scope, %reason, "no dedup key: rejecting");
                    return Outcome::reject(format!("no dedup key: {reason}"));
                }
                MissingKey::Process => {
                    warn!(scope = %self.scope, %reason, "no dedup key: handling without deduplication");
                    None
                }
            },
        };
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return Outcome::retry(format!("the inbox database is unavailable: {e}")),
        };
        if let Some(key) = &key {
            let inserted = sqlx::query(
                "INSERT INTO backstop_inbox (scope, key, processed_at) VALUES ($1, $2, $3)
                 ON CONFLICT (scope, key) DO NOTHING",
            )
            .bind(self.scope.as_str())
            .bind(key.as_str())
            .bind(now_ms() as i64)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(done) if done.rows_affected() == 0 => {
                    let _ = tx.rollback().await;
                    self.duplicates.fetch_add(1, Ordering::Relaxed);
                    debug!(scope = %self.scope, %key, "duplicate: already in the inbox");
                    return Outcome::Ack;
                }
                Ok(_) => {}
                Err(e) => {
                    return Outcome::retry(format!("recording the key in the inbox failed: {e}"));
                }
            }
        }
        let outcome = self.handler.handle(&delivery, &mut tx).await;
        if outcome != Outcome::Ack {
            let _ = tx.rollback().await;
            return outcome;
        }
        match tx.commit().await {
            Ok(()) => Outcome::Ack,
            Err(e) => Outcome::retry(format!("committing the inbox transaction failed: {e}")),
        }
    }
}

impl<H: InboxHandler> Handler for Inbox<H> {
    fn handle(&self, delivery: Delivery) -> impl Future<Output = Outcome> + Send {
        self.run(delivery)
    }
}
