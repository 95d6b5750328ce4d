//! The SQLite engine of the SQL seen store: one writer thread with its own
//! connection, which takes every operation queued since its last batch and
//! writes them in one transaction with cached prepared statements.
//!
//! Why not sqlx here: sqlx runs each SQLite statement on a worker thread and
//! hands every statement and every row across a channel, so each one costs
//! two thread wake-ups. At tens of thousands of messages a second those
//! wake-ups, not SQLite, were the cost (perf: half of all CPU in futex
//! wake and context switches). One thread that owns the connection pays one
//! wake-up per batch.

use super::sql::Op;
use super::{Claim, DedupError};
use crate::error::RedactedUri;
use crate::retry::now_ms;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

/// The most operations written in one transaction.
const MAX_BATCH: usize = 1024;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS backstop_seen (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    holder TEXT,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (scope, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS backstop_seen_expiry ON backstop_seen (expires_at);";

/// A handle to the writer thread; the thread ends when every handle is gone.
#[derive(Clone, Debug)]
pub(super) struct SqliteWriter {
    ops: mpsc::UnboundedSender<Op>,
}

fn unavailable(e: rusqlite::Error) -> DedupError {
    DedupError::Unavailable(e.to_string())
}

/// The file path of `sqlite://path?options` (options are not used here).
fn path_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty()).then_some(path)
}

impl SqliteWriter {
    pub(super) async fn open(url: &str) -> Result<Self, DedupError> {
        let shown = RedactedUri::new(url).to_string();
        let path = path_of(url)
            .ok_or_else(|| DedupError::InvalidUrl {
                url: shown.clone(),
                reason: "the SQLite path is empty".into(),
            })?
            .to_owned();
        let (opened, ready) = oneshot::channel();
        let (ops, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("backstop-dedup-sqlite".into())
            .spawn(move || match open_connection(&path) {
                Ok(connection) => {
                    let _ = opened.send(Ok(()));
                    run(connection, rx);
                }
                Err(e) => {
                    let _ = opened.send(Err(e));
                }
            })
            .map_err(|e| DedupError::Unavailable(format!("starting the SQLite writer: {e}")))?;
        ready
            .await
            .map_err(|_| DedupError::Unavailable("the SQLite writer stopped".into()))?
            .map_err(|e| DedupError::Unavailable(format!("opening {shown}: {e}")))?;
        Ok(SqliteWriter { ops })
    }

    /// Queues `op`; false when the thread is gone.
    pub(super) fn submit(&self, op: Op) -> bool {
        self.ops.send(op).is_ok()
    }
}

fn open_connection(path: &str) -> Result<Connection, rusqlite::Error> {
    let connection = Connection::open(path)?;
    // WAL with synchronous = NORMAL: a commit survives a crash of this
    // process, not a power loss; keys are a guard, not the record of truth.
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    connection.execute_batch(SCHEMA)?;
    Ok(connection)
}

fn run(mut connection: Connection, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        drain(&mut rx, &mut batch);
        if batch.len() < LINGER_BELOW {
            // Few operations waiting: give the others a moment to arrive.
            // A commit and a thread wake-up cost more than this wait, and
            // the consumer has its whole prefetch in flight meanwhile.
            std::thread::sleep(LINGER);
            drain(&mut rx, &mut batch);
        }
        write(&mut connection, &mut batch);
    }
}

/// A batch smaller than this waits [`LINGER`] for company.
const LINGER_BELOW: usize = 32;
const LINGER: std::time::Duration = std::time::Duration::from_micros(500);

fn drain(rx: &mut mpsc::UnboundedReceiver<Op>, batch: &mut Vec<Op>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// What an operation came to, inside the transaction.
enum Done {
    Claim(Claim),
    Unit,
    Count(u64),
}

impl Op {
    /// Answers the caller: with `done` once the batch committed, or with
    /// the batch's error.
    fn answer(self, done: Result<Done, DedupError>) {
        let mismatch = || DedupError::Unavailable("internal: mismatched dedup answer".into());
        match self {
            Op::Claim { reply, .. } => {
                let _ = reply.send(done.and_then(|d| match d {
                    Done::Claim(claim) => Ok(claim),
                    _ => Err(mismatch()),
                }));
            }
            Op::Complete { reply, .. } | Op::Release { reply, .. } => {
                let _ = reply.send(done.map(|_| ()));
            }
            Op::Purge { reply, .. } => {
                let _ = reply.send(done.and_then(|d| match d {
                    Done::Count(n) => Ok(n),
                    _ => Err(mismatch()),
                }));
            }
        }
    }
}

fn write(connection: &mut Connection, batch: &mut Vec<Op>) {
    // Completes and releases first, so claims in the same batch see them.
    batch.sort_by_key(|op| matches!(op, Op::Claim { .. }));
    let now = now_ms() as i64;
    let result = (|| -> Result<Vec<Done>, rusqlite::Error> {
        let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut done = Vec::with_capacity(batch.len());
        for op in batch.iter() {
            done.push(apply(&tx, op, now)?);
        }
        tx.commit()?;
        Ok(done)
    })();
    match result {
        Ok(done) => {
            for (op, done) in batch.drain(..).zip(done) {
                op.answer(Ok(done));
            }
        }
        Err(e) => {
            // Rolled back: nothing in the batch was written.
            let e = unavailable(e);
            for op in batch.drain(..) {
                op.answer(Err(e.clone()));
            }
        }
    }
}

fn apply(tx: &rusqlite::Transaction<'_>, op: &Op, now: i64) -> Result<Done, rusqlite::Error> {
    match op {
        Op::Claim {
            scope,
            key,
            token,
            lease_until,
            ..
        } => {
            let won: Option<Option<String>> = tx
                .prepare_cached(
                    "INSERT INTO backstop_seen (scope, key, holder, expires_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (scope, key) DO UPDATE
                         SET holder = excluded.holder, expires_at = excluded.expires_at
                         WHERE backstop_seen.expires_at < ?5 OR backstop_seen.holder = ?3
                     RETURNING holder",
                )?
                .query_row(
                    params![scope, key, token, *lease_until as i64, now],
                    |row| row.get(0),
                )
                .optional()?;
            let claim = if won.is_some() {
                Claim::Claimed
            } else {
                let holder: Option<Option<String>> = tx
                    .prepare_cached(
                        "SELECT holder FROM backstop_seen WHERE scope = ?1 AND key = ?2",
                    )?
                    .query_row(params![scope, key], |row| row.get(0))
                    .optional()?;
                match holder {
                    Some(None) => Claim::Done,
                    _ => Claim::InProgress,
                }
            };
            Ok(Done::Claim(claim))
        }
        Op::Complete {
            scope,
            key,
            token,
            expires_at,
            ..
        } => {
            tx.prepare_cached(
                "UPDATE backstop_seen SET holder = NULL, expires_at = ?1
                 WHERE scope = ?2 AND key = ?3 AND holder = ?4",
            )?
            .execute(params![*expires_at as i64, scope, key, token])?;
            Ok(Done::Unit)
        }
        Op::Release {
            scope, key, token, ..
        } => {
            tx.prepare_cached(
                "DELETE FROM backstop_seen WHERE scope = ?1 AND key = ?2 AND holder = ?3",
            )?
            .execute(params![scope, key, token])?;
            Ok(Done::Unit)
        }
        Op::Purge { now, .. } => {
            let removed = tx
                .prepare_cached("DELETE FROM backstop_seen WHERE expires_at < ?1")?
                .execute(params![*now as i64])?;
            Ok(Done::Count(removed as u64))
        }
    }
}
