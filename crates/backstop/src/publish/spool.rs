//! The offline spool: a durable, ordered, bounded append log in SQLite, for
//! messages the broker could not confirm in time.
//!
//! One thread owns the SQLite connection (as the SQLite dedup writer does):
//! it takes every append queued since its last write and commits them in one
//! transaction, so concurrent publishers share one fsync. The file is opened
//! in WAL mode with `synchronous = FULL`: an append is acknowledged to its
//! caller only after its transaction reached the disk, so it survives a
//! `kill -9` and a power loss. `locking_mode = EXCLUSIVE` keeps a second
//! process off the file: two drains of one spool would publish everything
//! twice.
//!
//! Entries are read back in `id` order (the order of appends) and deleted
//! only once the broker confirmed them. An entry that can never be
//! published (its exchange is gone and it keeps coming back unroutable, the
//! broker refuses it, its stored properties cannot be read) moves to the
//! `parked` table with the reason: kept, counted, never dropped.

use crate::retry::now_ms;
use lapin::BasicProperties;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// The most operations written in one transaction.
const MAX_BATCH: usize = 1024;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS parked (
    id INTEGER PRIMARY KEY,
    spool_id INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    parked_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB NOT NULL);";

/// The default bound on the number of spooled messages.
pub const DEFAULT_MAX_MESSAGES: u64 = 1_000_000;
/// The default bound on the spooled bytes (bodies, properties and names).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// A message to append.
pub(crate) struct NewEntry {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Vec<u8>,
}

impl NewEntry {
    fn size(&self, properties: &str) -> u64 {
        (self.exchange.len() + self.routing_key.len() + properties.len() + self.body.len()) as u64
    }
}

/// A spooled message, read back in order.
pub(crate) struct Entry {
    pub(crate) id: i64,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Vec<u8>,
}

/// Why the spool did not take or give a message.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SpoolError {
    /// At its bound: nothing was written.
    #[error("the spool is full ({messages} messages, {bytes} bytes)")]
    Full {
        /// Messages in the spool.
        messages: u64,
        /// Bytes in the spool.
        bytes: u64,
    },
    /// SQLite failed (disk full, I/O error) or the writer is gone.
    #[error("the spool at {path} failed: {reason}")]
    Io {
        /// The spool file.
        path: String,
        /// SQLite's error.
        reason: String,
    },
}

enum Op {
    Append {
        entries: Vec<(NewEntry, String, u64)>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Peek {
        after: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Entry>, String>>,
    },
    Delete {
        ids: Vec<i64>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Park {
        id: i64,
        reason: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Ends the writer thread, which closes the file (and its lock) before
    /// it answers.
    Close { reply: oneshot::Sender<()> },
}

/// Counters of the spool, shared with the writer thread.
#[derive(Debug, Default)]
struct Gauges {
    /// Messages and bytes stored (committed).
    messages: AtomicU64,
    bytes: AtomicU64,
    /// Messages and bytes of appends in progress, counted against the
    /// bounds until they end.
    reserved_messages: AtomicU64,
    reserved_bytes: AtomicU64,
    /// `created_ms` of the oldest stored message; 0 when empty.
    oldest_ms: AtomicI64,
    parked: AtomicU64,
}

/// Messages and bytes counted against the bounds for an append in
/// progress; given back when it ends, however it ends.
struct Reservation<'a> {
    gauges: &'a Gauges,
    count: u64,
    size: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let g = self.gauges;
        g.reserved_messages.fetch_sub(self.count, Ordering::AcqRel);
        g.reserved_bytes.fetch_sub(self.size, Ordering::AcqRel);
    }
}

/// A handle to the spool; clones share the writer thread, which ends when
/// every handle is gone.
#[derive(Clone)]
pub(crate) struct Spool {
    ops: mpsc::UnboundedSender<Op>,
    gauges: Arc<Gauges>,
    path: Arc<PathBuf>,
    max_messages: u64,
    max_bytes: u64,
    /// One reservation at a time, so two appends cannot both pass the bound.
    reserve: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.path)
            .field("messages", &self.messages())
            .finish()
    }
}

impl Spool {
    /// Opens (creating) the spool at `path`, within its bounds.
    pub(crate) async fn open(
        path: &Path,
        max_messages: u64,
        max_bytes: u64,
    ) -> Result<Spool, SpoolError> {
        let shown = path.display().to_string();
        let io = |reason: String| SpoolError::Io {
            path: shown.clone(),
            reason,
        };
        let (opened, ready) = oneshot::channel();
        let (ops, rx) = mpsc::unbounded_channel();
        let gauges = Arc::new(Gauges::default());
        let thread_gauges = gauges.clone();
        let owned = path.to_path_buf();
        std::thread::Builder::new()
            .name("backstop-spool".into())
            .spawn(move || match open_connection(&owned, &thread_gauges) {
                Ok(connection) => {
                    let _ = opened.send(Ok(()));
                    run(connection, rx, &thread_gauges);
                }
                Err(e) => {
                    let _ = opened.send(Err(e));
                }
            })
            .map_err(|e| io(format!("starting the spool writer: {e}")))?;
        ready
            .await
            .map_err(|_| io("the spool writer stopped".into()))?
            .map_err(io)?;
        Ok(Spool {
            ops,
            gauges,
            path: Arc::new(path.to_path_buf()),
            max_messages: max_messages.max(1),
            max_bytes: max_bytes.max(1),
            reserve: Arc::new(std::sync::Mutex::new(())),
        })
    }

    fn io(&self, reason: String) -> SpoolError {
        SpoolError::Io {
            path: self.path.display().to_string(),
            reason,
        }
    }

    /// Messages in the spool.
    pub(crate) fn messages(&self) -> u64 {
        self.gauges.messages.load(Ordering::Acquire)
    }

    /// Bytes in the spool.
    pub(crate) fn bytes(&self) -> u64 {
        self.gauges.bytes.load(Ordering::Acquire)
    }

    /// The age of the oldest spooled message.
    pub(crate) fn oldest(&self) -> Option<std::time::Duration> {
        let at = self.gauges.oldest_ms.load(Ordering::Acquire);
        (at > 0 && self.messages() > 0).then(|| {
            std::time::Duration::from_millis((now_ms() as i64).saturating_sub(at).max(0) as u64)
        })
    }

    /// Messages parked (kept aside, never published).
    pub(crate) fn parked(&self) -> u64 {
        self.gauges.parked.load(Ordering::Acquire)
    }

    /// Appends `entries` in order and returns once they are on disk, or
    /// fails with nothing written: [`SpoolError::Full`] when they would pass
    /// a bound.
    pub(crate) async fn append(&self, entries: Vec<NewEntry>) -> Result<(), SpoolError> {
        let mut rows = Vec::with_capacity(entries.len());
        for entry in entries {
            let properties = serde_json::to_string(&entry.properties)
                .map_err(|e| self.io(format!("encoding the properties: {e}")))?;
            // What cannot be read back (a NaN or an infinite float in a
            // header becomes null) would be parked unpublished: refuse it now.
            if let Err(e) = serde_json::from_str::<BasicProperties>(&properties) {
                return Err(self.io(format!(
                    "the message's properties cannot be stored and read back ({e}): not spooled"
                )));
            }
            let size = entry.size(&properties);
            rows.push((entry, properties, size));
        }
        let count = rows.len() as u64;
        let size: u64 = rows.iter().map(|(_, _, s)| s).sum();
        {
            let _one = self.reserve.lock().unwrap_or_else(|e| e.into_inner());
            let g = &self.gauges;
            let messages = self.messages() + g.reserved_messages.load(Ordering::Acquire);
            let bytes = self.bytes() + g.reserved_bytes.load(Ordering::Acquire);
            if messages + count > self.max_messages || bytes + size > self.max_bytes {
                return Err(SpoolError::Full { messages, bytes });
            }
            g.reserved_messages.fetch_add(count, Ordering::AcqRel);
            g.reserved_bytes.fetch_add(size, Ordering::AcqRel);
        }
        // Released when the append ends, even if the caller is cancelled
        // while it waits; the writer counts what it committed.
        let _reservation = Reservation {
            gauges: &self.gauges,
            count,
            size,
        };
        let (reply, answer) = oneshot::channel();
        if self
            .ops
            .send(Op::Append {
                entries: rows,
                reply,
            })
            .is_err()
        {
            return Err(self.io("the spool writer stopped".into()));
        }
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(self.io(reason)),
            Err(_) => Err(self.io("the spool writer stopped".into())),
        }
    }

    /// Up to `limit` entries after id `after`, oldest first. Entries whose
    /// stored properties cannot be read are parked on the way.
    pub(crate) async fn peek(&self, after: i64, limit: usize) -> Result<Vec<Entry>, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Peek {
                after,
                limit,
                reply,
            })
            .map_err(|_| self.io("the spool writer stopped".into()))?;
        answer
            .await
            .map_err(|_| self.io("the spool writer stopped".into()))?
            .map_err(|e| self.io(e))
    }

    /// Deletes confirmed entries.
    pub(crate) async fn delete(&self, ids: Vec<i64>) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Delete { ids, reply })
            .map_err(|_| self.io("the spool writer stopped".into()))?;
        answer
            .await
            .map_err(|_| self.io("the spool writer stopped".into()))?
            .map_err(|e| self.io(e))
    }

    /// Closes the file once the operations queued before are done; later
    /// operations fail. Another `open` of the same file may follow.
    pub(crate) async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.ops.send(Op::Close { reply }).is_ok() {
            let _ = answer.await;
        }
    }

    /// Moves an entry to the `parked` table with `reason`.
    pub(crate) async fn park(&self, id: i64, reason: String) -> Result<(), SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Park { id, reason, reply })
            .map_err(|_| self.io("the spool writer stopped".into()))?;
        answer
            .await
            .map_err(|_| self.io("the spool writer stopped".into()))?
            .map_err(|e| self.io(e))
    }
}

fn open_connection(path: &Path, gauges: &Gauges) -> Result<Connection, String> {
    let connection = Connection::open(path).map_err(|e| e.to_string())?;
    let setup = || -> Result<(i64, i64, i64, i64), rusqlite::Error> {
        // Exclusive before WAL: the lock is then held from the first read.
        connection.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        // The spool is the record of truth while the broker is away: an
        // append is on disk before its caller hears `Spooled`.
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.busy_timeout(std::time::Duration::from_millis(100))?;
        connection.execute_batch(SCHEMA)?;
        let (messages, bytes, oldest) = connection.query_row(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(min(created_ms), 0) FROM spool",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?;
        let parked = connection.query_row("SELECT count(*) FROM parked", [], |row| row.get(0))?;
        Ok((messages, bytes, oldest, parked))
    };
    let (messages, bytes, oldest, parked) = setup().map_err(|e| match e {
        rusqlite::Error::SqliteFailure(code, _)
            if code.code == rusqlite::ErrorCode::DatabaseBusy =>
        {
            "another process has this spool open (one process per spool file)".to_string()
        }
        e => e.to_string(),
    })?;
    gauges.messages.store(messages as u64, Ordering::Release);
    gauges.bytes.store(bytes as u64, Ordering::Release);
    gauges.oldest_ms.store(oldest, Ordering::Release);
    gauges.parked.store(parked as u64, Ordering::Release);
    Ok(connection)
}

fn run(mut connection: Connection, mut rx: mpsc::UnboundedReceiver<Op>, gauges: &Gauges) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closing = None;
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        for op in std::mem::take(&mut batch) {
            match op {
                Op::Peek {
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(peek(&mut connection, after, limit, gauges));
                }
                Op::Close { reply } => closing = Some(reply),
                other => batch.push(other),
            }
        }
        if !batch.is_empty() {
            write(&mut connection, &mut batch, gauges);
        }
        if closing.is_some() {
            break;
        }
    }
    rx.close();
    drop(connection);
    if let Some(reply) = closing {
        let _ = reply.send(());
    }
}

/// Writes appends, deletes and parks in one transaction; answers each.
fn write(connection: &mut Connection, batch: &mut Vec<Op>, gauges: &Gauges) {
    let now = now_ms() as i64;
    // What the transaction takes out of the spool, applied once it commits.
    let mut removed = (0u64, 0u64);
    let mut added = (0u64, 0u64);
    let mut parked = 0u64;
    let result = (|| -> Result<(), rusqlite::Error> {
        let tx = connection.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO spool (created_ms, exchange, routing_key, properties, body, size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut size_of = tx.prepare_cached("SELECT size FROM spool WHERE id = ?1")?;
            let mut delete = tx.prepare_cached("DELETE FROM spool WHERE id = ?1")?;
            let mut park = tx.prepare_cached(
                "INSERT INTO parked (spool_id, created_ms, parked_ms, reason, exchange, routing_key, properties, body)
                 SELECT id, created_ms, ?2, ?3, exchange, routing_key, properties, body FROM spool WHERE id = ?1",
            )?;
            let mut remove = |id: i64| -> Result<bool, rusqlite::Error> {
                let size: Option<i64> = size_of
                    .query_row(params![id], |row| row.get(0))
                    .optional()?;
                let Some(size) = size else {
                    return Ok(false);
                };
                delete.execute(params![id])?;
                removed.0 += 1;
                removed.1 += size as u64;
                Ok(true)
            };
            for op in batch.iter() {
                match op {
                    Op::Append { entries, .. } => {
                        for (entry, properties, size) in entries {
                            insert.execute(params![
                                now,
                                entry.exchange,
                                entry.routing_key,
                                properties,
                                entry.body,
                                *size as i64
                            ])?;
                            added.0 += 1;
                            added.1 += *size;
                        }
                    }
                    Op::Delete { ids, .. } => {
                        for id in ids {
                            remove(*id)?;
                        }
                    }
                    Op::Park { id, reason, .. } => {
                        if park.execute(params![id, now, reason])? == 1 && remove(*id)? {
                            parked += 1;
                        }
                    }
                    Op::Peek { .. } | Op::Close { .. } => {}
                }
            }
        }
        tx.commit()
    })();
    let error = match result {
        Ok(()) => {
            gauges.messages.fetch_add(added.0, Ordering::AcqRel);
            gauges.bytes.fetch_add(added.1, Ordering::AcqRel);
            gauges.messages.fetch_sub(removed.0, Ordering::AcqRel);
            gauges.bytes.fetch_sub(removed.1, Ordering::AcqRel);
            gauges.parked.fetch_add(parked, Ordering::AcqRel);
            let oldest = connection
                .query_row(
                    "SELECT created_ms FROM spool ORDER BY id LIMIT 1",
                    [],
                    |row| row.get::<_, i64>(0),
                )
                .optional()
                .ok()
                .flatten()
                .unwrap_or(0);
            gauges.oldest_ms.store(oldest, Ordering::Release);
            None
        }
        Err(e) => {
            warn!(error = %e, "the spool could not be written");
            Some(e.to_string())
        }
    };
    for op in batch.drain(..) {
        let answer = match &error {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        };
        match op {
            Op::Append { reply, .. } | Op::Delete { reply, .. } | Op::Park { reply, .. } => {
                let _ = reply.send(answer);
            }
            Op::Peek { .. } | Op::Close { .. } => {}
        }
    }
}

/// A spool row as stored: id, exchange, routing key, properties, body.
type RawRow = (i64, String, String, String, Vec<u8>);

fn peek(
    connection: &mut Connection,
    after: i64,
    limit: usize,
    gauges: &Gauges,
) -> Result<Vec<Entry>, String> {
    let rows = (|| -> Result<Vec<RawRow>, rusqlite::Error> {
        let mut select = connection.prepare_cached(
            "SELECT id, exchange, routing_key, properties, body FROM spool
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = select
            .query_map(params![after, limit as i64], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    })()
    .map_err(|e| e.to_string())?;
    let mut entries = Vec::with_capacity(rows.len());
    for (id, exchange, routing_key, properties, body) in rows {
        match serde_json::from_str::<BasicProperties>(&properties) {
            Ok(properties) => entries.push(Entry {
                id,
                exchange,
                routing_key,
                properties,
                body,
            }),
            Err(e) => {
                let reason = format!("its stored properties cannot be read: {e}");
                warn!(id, %reason, "parking a spooled message");
                let mut batch = vec![Op::Park {
                    id,
                    reason,
                    reply: oneshot::channel().0,
                }];
                write(connection, &mut batch, gauges);
            }
        }
    }
    Ok(entries)
}
