//! The SQL seen store (SQLite or PostgreSQL) with batched writes.
//!
//! SQLite is written by a thread of its own (see `sqlite.rs`). For
//! PostgreSQL, every operation goes through one writer task. While a batch is being
//! written, the next one gathers; a batch is written as at most four
//! statements (complete, release, claim, and a lookup for keys that could not
//! be claimed), each covering all of its rows. At tens of thousands of
//! messages a second the cost is per statement, not per row, so this keeps
//! deduplication close to the speed of the consumer itself.
//!
//! The statements run outside an explicit transaction: each is atomic on
//! its own, and keeping claims apart from completes means two instances never
//! wait on each other's rows in opposite orders (no deadlock on PostgreSQL).
//! Rows within a statement are sorted by key for the same reason.

#[cfg(feature = "sqlite")]
use super::sqlite::SqliteWriter;
use super::{Claim, DedupError, SeenStore};
use crate::retry::now_ms;
use crate::store::{Backend, StoreError, open_pool};
use futures_util::future::BoxFuture;
use sqlx::{AnyPool, Row};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

/// The most operations written in one batch.
const MAX_BATCH: usize = 256;

/// The PostgreSQL table; SQLite's is in `sqlite.rs`.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS backstop_seen (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    holder TEXT,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (scope, key))";

const EXPIRY_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS backstop_seen_expiry ON backstop_seen (expires_at)";

/// Where an operation's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, DedupError>>;

/// One operation for a writer (this module's for PostgreSQL, or the SQLite
/// thread).
pub(super) enum Op {
    Claim {
        scope: String,
        key: String,
        token: String,
        lease_until: u64,
        reply: Reply<Claim>,
    },
    Complete {
        scope: String,
        key: String,
        token: String,
        expires_at: u64,
        reply: Reply<()>,
    },
    Release {
        scope: String,
        key: String,
        token: String,
        reply: Reply<()>,
    },
    Purge {
        now: u64,
        reply: Reply<u64>,
    },
}

/// Keys in a SQL table (`backstop_seen`), in SQLite (`sqlite://path`, WAL
/// mode, `synchronous = NORMAL`) or PostgreSQL. Several instances can share a
/// PostgreSQL store; a SQLite file serves the processes of one machine.
#[derive(Clone, Debug)]
pub struct SqlSeenStore {
    engine: Engine,
}

#[derive(Clone, Debug)]
enum Engine {
    #[cfg(feature = "sqlite")]
    Sqlite(SqliteWriter),
    Any(mpsc::UnboundedSender<Op>),
}

fn from_store(e: StoreError) -> DedupError {
    match e {
        StoreError::InvalidUrl { url, reason } => DedupError::InvalidUrl { url, reason },
        other => DedupError::Unavailable(other.to_string()),
    }
}

fn unavailable(e: sqlx::Error) -> DedupError {
    DedupError::Unavailable(e.to_string())
}

impl SqlSeenStore {
    /// Opens the store at `url` and creates its table when missing.
    pub async fn connect(url: &str) -> Result<Self, DedupError> {
        #[cfg(feature = "sqlite")]
        if url.starts_with("sqlite:") {
            let writer = SqliteWriter::open(url).await?;
            return Ok(SqlSeenStore {
                engine: Engine::Sqlite(writer),
            });
        }
        let (pool, backend) = open_pool(url, false).await.map_err(from_store)?;
        if backend != Backend::Postgres {
            // SQLite goes to its own writer above; without the `sqlite`
            // feature there is no SQLite driver to get here with.
            return Err(DedupError::InvalidUrl {
                url: crate::error::RedactedUri::new(url).to_string(),
                reason: "SQLite needs the `sqlite` feature".into(),
            });
        }
        let mut tx = pool.begin().await.map_err(unavailable)?;
        // Two instances starting together must not race on the DDL.
        sqlx::query("SELECT pg_advisory_xact_lock(7234000002)")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        for statement in [SCHEMA, EXPIRY_INDEX] {
            sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        let (ops, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool.clone(), rx));
        Ok(SqlSeenStore {
            engine: Engine::Any(ops),
        })
    }

    /// Hands `op` to the writer and waits for its answer.
    async fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, DedupError> {
        let (reply, answer) = oneshot::channel();
        let sent = match &self.engine {
            #[cfg(feature = "sqlite")]
            Engine::Sqlite(writer) => writer.submit(op(reply)),
            Engine::Any(ops) => ops.send(op(reply)).is_ok(),
        };
        let stopped = || DedupError::Unavailable("the dedup writer stopped".into());
        if !sent {
            return Err(stopped());
        }
        answer.await.map_err(|_| stopped())?
    }
}

impl SeenStore for SqlSeenStore {
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        lease_until: u64,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        Box::pin(self.ask(move |reply| Op::Claim {
            scope: scope.to_owned(),
            key: key.to_owned(),
            token: token.to_owned(),
            lease_until,
            reply,
        }))
    }

    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        expires_at: u64,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        Box::pin(self.ask(move |reply| Op::Complete {
            scope: scope.to_owned(),
            key: key.to_owned(),
            token: token.to_owned(),
            expires_at,
            reply,
        }))
    }

    fn release<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        Box::pin(self.ask(move |reply| Op::Release {
            scope: scope.to_owned(),
            key: key.to_owned(),
            token: token.to_owned(),
            reply,
        }))
    }

    fn purge_expired(&self, now: u64) -> BoxFuture<'_, Result<u64, DedupError>> {
        Box::pin(self.ask(move |reply| Op::Purge { now, reply }))
    }
}

/// Gathers operations while the previous batch is written, then writes them.
/// Stops when every handle to the store is gone.
async fn writer(pool: AnyPool, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write_batch(&pool, std::mem::take(&mut batch)).await;
    }
}

struct Claims {
    /// (scope, key, token, lease_until), sorted and unique by (scope, key).
    rows: Vec<(String, String, String, u64)>,
    /// Every waiter, with the row it depends on.
    waiters: Vec<(usize, String, Reply<Claim>)>,
}

async fn write_batch(pool: &AnyPool, ops: Vec<Op>) {
    let mut completes = Vec::new();
    let mut releases = Vec::new();
    let mut claims = Vec::new();
    for op in ops {
        match op {
            Op::Complete {
                scope,
                key,
                token,
                expires_at,
                reply,
            } => completes.push(((scope, key, token, expires_at), reply)),
            Op::Release {
                scope,
                key,
                token,
                reply,
            } => releases.push(((scope, key, token, 0), reply)),
            Op::Claim {
                scope,
                key,
                token,
                lease_until,
                reply,
            } => claims.push(((scope, key, token, lease_until), reply)),
            Op::Purge { now, reply } => {
                let done = sqlx::query("DELETE FROM backstop_seen WHERE expires_at < $1")
                    .bind(now as i64)
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected())
                    .map_err(unavailable);
                let _ = reply.send(done);
            }
        }
    }
    // Completes and releases first: a claim in the same batch then sees them.
    if !completes.is_empty() {
        let result = complete_rows(pool, &mut completes).await;
        answer_all(completes, &result);
    }
    if !releases.is_empty() {
        let result = release_rows(pool, &mut releases).await;
        answer_all(releases, &result);
    }
    if !claims.is_empty() {
        claim_rows(pool, claims).await;
    }
}

type Row4 = (String, String, String, u64);

fn answer_all(ops: Vec<(Row4, Reply<()>)>, result: &Result<(), DedupError>) {
    for (_, reply) in ops {
        let _ = reply.send(result.clone());
    }
}

/// `(scope = $a AND key = $b AND holder = $c) OR ...`, numbering from `first`.
fn held_by(rows: usize, first: usize) -> String {
    (0..rows)
        .map(|i| {
            let n = first + 3 * i;
            format!(
                "(scope = ${} AND key = ${} AND holder = ${})",
                n,
                n + 1,
                n + 2
            )
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

async fn complete_rows(pool: &AnyPool, ops: &mut [(Row4, Reply<()>)]) -> Result<(), DedupError> {
    ops.sort_by(|a, b| (&a.0.0, &a.0.1).cmp(&(&b.0.0, &b.0.1)));
    // One expiry for the batch: the latest asked for (they differ by the
    // few milliseconds the batch took to gather).
    let expires_at = ops.iter().map(|(r, _)| r.3).max().unwrap_or(0);
    let sql = format!(
        "UPDATE backstop_seen SET holder = NULL, expires_at = $1 WHERE {}",
        held_by(ops.len(), 2)
    );
    let mut query = sqlx::query(&sql).bind(expires_at as i64);
    for ((scope, key, token, _), _) in ops.iter() {
        query = query
            .bind(scope.as_str())
            .bind(key.as_str())
            .bind(token.as_str());
    }
    query.execute(pool).await.map_err(unavailable)?;
    Ok(())
}

async fn release_rows(pool: &AnyPool, ops: &mut [(Row4, Reply<()>)]) -> Result<(), DedupError> {
    ops.sort_by(|a, b| (&a.0.0, &a.0.1).cmp(&(&b.0.0, &b.0.1)));
    let sql = format!("DELETE FROM backstop_seen WHERE {}", held_by(ops.len(), 1));
    let mut query = sqlx::query(&sql);
    for ((scope, key, token, _), _) in ops.iter() {
        query = query
            .bind(scope.as_str())
            .bind(key.as_str())
            .bind(token.as_str());
    }
    query.execute(pool).await.map_err(unavailable)?;
    Ok(())
}

async fn claim_rows(pool: &AnyPool, ops: Vec<(Row4, Reply<Claim>)>) {
    // A key asked for twice in one batch is written once; the later askers
    // learn that it is in progress (or done, if it was).
    let mut claims = Claims {
        rows: Vec::new(),
        waiters: Vec::new(),
    };
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut ops = ops;
    ops.sort_by(|a, b| (&a.0.0, &a.0.1).cmp(&(&b.0.0, &b.0.1)));
    for ((scope, key, token, lease_until), reply) in ops {
        let id = (scope.clone(), key.clone());
        let row = *index.entry(id).or_insert_with(|| {
            claims.rows.push((scope, key, token.clone(), lease_until));
            claims.rows.len() - 1
        });
        claims.waiters.push((row, token, reply));
    }
    match claim_statement(pool, &claims.rows).await {
        Ok(answers) => {
            for (row, token, reply) in claims.waiters {
                let answer = match answers[row] {
                    Claim::Claimed if claims.rows[row].2 != token => Claim::InProgress,
                    other => other,
                };
                let _ = reply.send(Ok(answer));
            }
        }
        Err(e) => {
            for (_, _, reply) in claims.waiters {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Claims `rows` in one upsert; looks up why the others could not be claimed.
async fn claim_statement(pool: &AnyPool, rows: &[Row4]) -> Result<Vec<Claim>, DedupError> {
    let values = (0..rows.len())
        .map(|i| {
            let n = 1 + 4 * i;
            format!("(${}, ${}, ${}, ${})", n, n + 1, n + 2, n + 3)
        })
        .collect::<Vec<_>>()
        .join(", ");
    let now_param = 1 + 4 * rows.len();
    // The upsert takes a row over only when it expired (a done key past its
    // TTL, or a claim whose holder's lease ran out), or when the claim is the
    // holder's own (which extends its lease).
    let sql = format!(
        "INSERT INTO backstop_seen (scope, key, holder, expires_at) VALUES {values}
         ON CONFLICT (scope, key) DO UPDATE
             SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE backstop_seen.expires_at < ${now_param}
                OR backstop_seen.holder = excluded.holder
         RETURNING scope, key, holder"
    );
    let mut query = sqlx::query(&sql);
    for (scope, key, token, lease_until) in rows {
        query = query
            .bind(scope.as_str())
            .bind(key.as_str())
            .bind(token.as_str())
            .bind(*lease_until as i64);
    }
    let won = query
        .bind(now_ms() as i64)
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
    let mut claimed: HashMap<(String, String), String> = HashMap::new();
    for row in &won {
        let scope: String = row.try_get("scope").map_err(unavailable)?;
        let key: String = row.try_get("key").map_err(unavailable)?;
        let holder: Option<String> = row.try_get("holder").map_err(unavailable)?;
        if let Some(holder) = holder {
            claimed.insert((scope, key), holder);
        }
    }
    let mut answers: Vec<Option<Claim>> = rows
        .iter()
        .map(|(scope, key, token, _)| {
            claimed
                .get(&(scope.clone(), key.clone()))
                .filter(|holder| *holder == token)
                .map(|_| Claim::Claimed)
        })
        .collect();
    let lost: Vec<usize> = (0..rows.len()).filter(|i| answers[*i].is_none()).collect();
    if !lost.is_empty() {
        let sql = format!(
            "SELECT scope, key, holder FROM backstop_seen WHERE {}",
            (0..lost.len())
                .map(|i| format!("(scope = ${} AND key = ${})", 1 + 2 * i, 2 + 2 * i))
                .collect::<Vec<_>>()
                .join(" OR ")
        );
        let mut query = sqlx::query(&sql);
        for i in &lost {
            query = query.bind(rows[*i].0.as_str()).bind(rows[*i].1.as_str());
        }
        let found = query.fetch_all(pool).await.map_err(unavailable)?;
        let mut state: HashMap<(String, String), bool> = HashMap::new();
        for row in &found {
            let scope: String = row.try_get("scope").map_err(unavailable)?;
            let key: String = row.try_get("key").map_err(unavailable)?;
            let holder: Option<String> = row.try_get("holder").map_err(unavailable)?;
            state.insert((scope, key), holder.is_none());
        }
        for i in lost {
            let (scope, key, _, _) = &rows[i];
            // Gone since the upsert (released meanwhile): in progress, so
            // the caller checks again shortly.
            answers[i] = Some(match state.get(&(scope.clone(), key.clone())) {
                Some(true) => Claim::Done,
                _ => Claim::InProgress,
            });
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or(Claim::InProgress))
        .collect())
}
