//! The SQL backends of the compensation store: SQLite and PostgreSQL through
//! sqlx's `Any` driver, with one set of queries and per-backend DDL.
//!
//! Every value is a bound parameter. Parameters are numbered (`$1`) and first
//! appear in ascending order, which both drivers bind the same way.

use super::{
    AuditEntry, CompensationStore, FailedRow, ListFilter, ManualAction, NewFailedMessage,
    RedriveOutcome, Status, StoreError,
};
use crate::error::RedactedUri;
use crate::retry::now_ms;
use futures_util::future::BoxFuture;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A compensation store in SQLite (`sqlite://backstop.db`) or PostgreSQL
/// (`postgres://user:password@host/db`).
#[derive(Clone, Debug)]
pub struct SqlStore {
    pub(super) pool: AnyPool,
    pub(super) backend: Backend,
}

/// A row's columns. `payload` and `headers` are the current ones: an
/// operator's latest edit, else the original (schema version 4).
pub(super) const COLUMNS: &str = "id, queue, exchange, routing_key, message_id, dedup_key, \
     payload, headers, version, properties, error, error_kind, attempts, redrives, status, \
     next_attempt_at, created_at, updated_at, fingerprint, occurrences";

/// The statuses of a row still waiting for someone: a re-drive or a person.
/// At most one such row per `(queue, fingerprint)`.
pub(super) const UNFINISHED: &str = "('pending', 'retrying', 'needs_review')";

/// Version 2, the same on both backends: one unfinished row per message.
/// Rows from before get a fingerprint of their own (`row:<id>`), so old
/// duplicates stay as they are and new arrivals start grouping.
const FINGERPRINT_SCHEMA: &[&str] = &[
    "ALTER TABLE backstop_failed_messages ADD COLUMN fingerprint TEXT",
    "ALTER TABLE backstop_failed_messages ADD COLUMN occurrences BIGINT NOT NULL DEFAULT 1",
    "UPDATE backstop_failed_messages SET fingerprint = 'row:' || id WHERE fingerprint IS NULL",
    "CREATE UNIQUE INDEX IF NOT EXISTS backstop_failed_unfinished
        ON backstop_failed_messages (queue, fingerprint)
        WHERE status IN ('pending', 'retrying', 'needs_review')",
];

/// Version 3: failure groups (the normalized error in `cause`) and edited
/// payload versions; `version` names the latest edit (0: none). DDL only:
/// causes are filled by [`SqlStore::backfill_causes`] after the migration
/// commits, in short transactions.
const GROUPS_SCHEMA: &[&str] = &[
    "ALTER TABLE backstop_failed_messages ADD COLUMN cause TEXT",
    "ALTER TABLE backstop_failed_messages ADD COLUMN version BIGINT NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS backstop_failed_group
        ON backstop_failed_messages (queue, error_kind, cause, id)",
];

/// Version 4, the same on both backends:
/// - an index of the rows without a cause (written before version 3, or by
///   an older binary during a rolling upgrade), so that finding them is
///   cheap and [`SqlStore::backfill_causes`] walks them by id;
/// - an edited row holds its current (latest) payload and headers itself,
///   and the original is version 0 in `backstop_failed_versions`: a claim's
///   `RETURNING` then carries the edit from the very row version it locked,
///   and a binary that only reads `payload` sends the edit too. Rows edited
///   under version 3 get their version 0 and their latest version moved in.
const EDITS_IN_ROW_SCHEMA: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS backstop_failed_no_cause
        ON backstop_failed_messages (id) WHERE cause IS NULL",
    "INSERT INTO backstop_failed_versions (row_id, version, payload, headers, at, actor, note)
        SELECT m.id, 0, m.payload, m.headers, m.created_at, 'consumer', NULL
        FROM backstop_failed_messages m
        WHERE m.version > 0 AND NOT EXISTS (
            SELECT 1 FROM backstop_failed_versions v WHERE v.row_id = m.id AND v.version = 0)",
    "UPDATE backstop_failed_messages
        SET payload = (SELECT v.payload FROM backstop_failed_versions v
                WHERE v.row_id = backstop_failed_messages.id
                  AND v.version = backstop_failed_messages.version),
            headers = (SELECT v.headers FROM backstop_failed_versions v
                WHERE v.row_id = backstop_failed_messages.id
                  AND v.version = backstop_failed_messages.version)
        WHERE version > 0 AND EXISTS (
            SELECT 1 FROM backstop_failed_versions v
            WHERE v.row_id = backstop_failed_messages.id
              AND v.version = backstop_failed_messages.version)",
];

const SQLITE_VERSIONS: &str = "CREATE TABLE IF NOT EXISTS backstop_failed_versions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        row_id BIGINT NOT NULL REFERENCES backstop_failed_messages (id) ON DELETE CASCADE,
        version BIGINT NOT NULL,
        payload BLOB NOT NULL,
        headers TEXT NOT NULL,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        note TEXT,
        UNIQUE (row_id, version))";

const POSTGRES_VERSIONS: &str = "CREATE TABLE IF NOT EXISTS backstop_failed_versions (
        id BIGSERIAL PRIMARY KEY,
        row_id BIGINT NOT NULL REFERENCES backstop_failed_messages (id) ON DELETE CASCADE,
        version BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        headers TEXT NOT NULL,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        note TEXT,
        UNIQUE (row_id, version))";

const SQLITE_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS backstop_failed_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        exchange TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        message_id TEXT,
        dedup_key TEXT,
        payload BLOB NOT NULL,
        headers TEXT NOT NULL,
        properties TEXT NOT NULL,
        error TEXT NOT NULL,
        error_kind TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        redrives BIGINT NOT NULL DEFAULT 0,
        status TEXT NOT NULL,
        next_attempt_at BIGINT NOT NULL,
        lease_owner TEXT,
        lease_until BIGINT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS backstop_failed_due
        ON backstop_failed_messages (status, next_attempt_at)",
    "CREATE TABLE IF NOT EXISTS backstop_failed_audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        row_id BIGINT NOT NULL REFERENCES backstop_failed_messages (id) ON DELETE CASCADE,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        note TEXT)",
    "CREATE INDEX IF NOT EXISTS backstop_failed_audit_row ON backstop_failed_audit (row_id)",
];

const POSTGRES_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS backstop_failed_messages (
        id BIGSERIAL PRIMARY KEY,
        queue TEXT NOT NULL,
        exchange TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        message_id TEXT,
        dedup_key TEXT,
        payload BYTEA NOT NULL,
        headers TEXT NOT NULL,
        properties TEXT NOT NULL,
        error TEXT NOT NULL,
        error_kind TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        redrives BIGINT NOT NULL DEFAULT 0,
        status TEXT NOT NULL,
        next_attempt_at BIGINT NOT NULL,
        lease_owner TEXT,
        lease_until BIGINT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS backstop_failed_due
        ON backstop_failed_messages (status, next_attempt_at)",
    "CREATE TABLE IF NOT EXISTS backstop_failed_audit (
        id BIGSERIAL PRIMARY KEY,
        row_id BIGINT NOT NULL REFERENCES backstop_failed_messages (id) ON DELETE CASCADE,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        note TEXT)",
    "CREATE INDEX IF NOT EXISTS backstop_failed_audit_row ON backstop_failed_audit (row_id)",
];

/// The schema versions, applied in order and recorded in
/// `backstop_schema_migrations`. A new version is appended, never edited.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, "failed messages and their audit trail"),
    (
        2,
        "fingerprints and occurrences: one unfinished row per message",
    ),
    (3, "failure groups (cause) and edited payload versions"),
    (
        4,
        "rows without a cause indexed; edited payload kept in the row",
    ),
    (
        5,
        "the review console's audit of DLQ actions and group jobs",
    ),
];

/// A deadlock victim (40P01) or a serialization failure (40001): the
/// transaction was rolled back whole and may be tried again.
fn retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

pub(super) fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Rows per transaction of [`SqlStore::backfill_causes`].
pub(super) const BACKFILL_CHUNK: i64 = 1000;

/// Ids bound per `IN (...)` list: well under both drivers' parameter limits.
pub(super) const IN_LIST_CHUNK: usize = 500;

/// `$first, $first+1, ...`: `n` numbered parameters for an `IN (...)` list.
pub(super) fn in_list(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn row_of(row: &AnyRow) -> Result<FailedRow, StoreError> {
    let get_err = |e: sqlx::Error| StoreError::Unavailable(format!("reading a row: {e}"));
    let status: String = row.try_get("status").map_err(get_err)?;
    let id: i64 = row.try_get("id").map_err(get_err)?;
    let fingerprint: Option<String> = row.try_get("fingerprint").map_err(get_err)?;
    Ok(FailedRow {
        id,
        fingerprint: fingerprint.unwrap_or_else(|| format!("row:{id}")),
        occurrences: row.try_get("occurrences").map_err(get_err)?,
        queue: row.try_get("queue").map_err(get_err)?,
        exchange: row.try_get("exchange").map_err(get_err)?,
        routing_key: row.try_get("routing_key").map_err(get_err)?,
        message_id: row.try_get("message_id").map_err(get_err)?,
        dedup_key: row.try_get("dedup_key").map_err(get_err)?,
        payload: row.try_get("payload").map_err(get_err)?,
        headers: row.try_get("headers").map_err(get_err)?,
        version: row.try_get("version").map_err(get_err)?,
        properties: row.try_get("properties").map_err(get_err)?,
        error: row.try_get("error").map_err(get_err)?,
        error_kind: row.try_get("error_kind").map_err(get_err)?,
        attempts: row.try_get("attempts").map_err(get_err)?,
        redrives: row.try_get("redrives").map_err(get_err)?,
        status: status.parse().map_err(StoreError::Unavailable)?,
        next_attempt_at: row.try_get("next_attempt_at").map_err(get_err)?,
        created_at: row.try_get("created_at").map_err(get_err)?,
        updated_at: row.try_get("updated_at").map_err(get_err)?,
    })
}

/// Opens a pool on `sqlite://path` (created when missing, WAL mode; with
/// `fsync_every_commit` false, `synchronous = NORMAL`: a commit survives a
/// process crash but not a power loss) or `postgres://` (the database must
/// exist).
/// Shared by the compensation store and the dedup store.
pub(crate) async fn open_pool(
    url: &str,
    fsync_every_commit: bool,
) -> Result<(AnyPool, Backend), StoreError> {
    let shown = RedactedUri::new(url).to_string();
    let invalid = |reason: &str| StoreError::InvalidUrl {
        url: shown.clone(),
        reason: reason.to_owned(),
    };
    let (backend, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
        if rest.trim_start_matches('/').is_empty() {
            return Err(invalid("the SQLite path is empty"));
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = if url.contains("mode=") {
            url.to_owned()
        } else {
            format!("{url}{sep}mode=rwc")
        };
        (Backend::Sqlite, url)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        (Backend::Postgres, url.to_owned())
    } else {
        return Err(invalid(
            "the scheme must be sqlite:// or postgres:// (postgresql://)",
        ));
    };
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => 8,
        })
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 5000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    let synchronous = if fsync_every_commit {
                        "PRAGMA synchronous = FULL"
                    } else {
                        "PRAGMA synchronous = NORMAL"
                    };
                    sqlx::query(synchronous).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .map_err(|e| match e {
            sqlx::Error::Configuration(reason) => invalid(&reason.to_string()),
            other => StoreError::Unavailable(format!("connecting to {shown}: {other}")),
        })?;
    Ok((pool, backend))
}

/// Why no store will be found without creating it.
const NO_STORE_TABLE: &str = "it holds no compensation store (no backstop_failed_messages table)";

/// Checks that the `sqlite:` URL names an existing file that holds the
/// store's tables, through a read-only connection (none of the pool's
/// pragmas run, so a wrong file is left exactly as it was). The URL is read
/// by sqlx's own parser.
#[cfg(feature = "sqlite")]
async fn sqlite_store_exists(url: &str) -> Result<(), String> {
    use sqlx::Connection;
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(|e| e.to_string())?;
    let file = options.get_filename().to_path_buf();
    if file.as_os_str().is_empty() || file.to_string_lossy().starts_with("file:sqlx-in-memory") {
        return Err("an in-memory or empty SQLite path is never an existing store".to_owned());
    }
    if !file.is_file() {
        let absolute = std::path::absolute(&file).unwrap_or(file);
        return Err(format!(
            "no store at {}: the file does not exist (review commands never create one)",
            absolute.display()
        ));
    }
    let mut connection = sqlx::sqlite::SqliteConnection::connect_with(
        &options.read_only(true).create_if_missing(false),
    )
    .await
    .map_err(|e| format!("opening {}: {e}", file.display()))?;
    let tables: Result<i64, _> = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master
         WHERE type = 'table' AND name = 'backstop_failed_messages'",
    )
    .fetch_one(&mut connection)
    .await;
    let _ = connection.close().await;
    match tables {
        Ok(0) => Err(NO_STORE_TABLE.to_owned()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("reading {}: {e}", file.display())),
    }
}

#[cfg(not(feature = "sqlite"))]
async fn sqlite_store_exists(_url: &str) -> Result<(), String> {
    Err("this build has no SQLite support (the `sqlite` feature)".to_owned())
}

impl SqlStore {
    /// Opens the store at `url` and brings its schema up to date.
    ///
    /// `sqlite://path` creates the file when missing and uses WAL mode;
    /// `postgres://` expects the database to exist.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // Every row here is a message that left the broker: full fsync.
        let (pool, backend) = open_pool(url, true).await?;
        let store = SqlStore { pool, backend };
        store.migrate().await?;
        store.backfill_causes().await?;
        Ok(store)
    }

    /// Opens a store that already exists, for review tools that must never
    /// point at a fresh, empty one by mistake: a `sqlite://` file must exist
    /// (it is opened without the create flag), and the database must hold
    /// Backstop's tables. Either failure is [`StoreError::InvalidUrl`]
    /// naming the file or database. The schema is then brought up to date
    /// like [`connect`](Self::connect) does.
    pub async fn open_existing(url: &str) -> Result<Self, StoreError> {
        let shown = RedactedUri::new(url).to_string();
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: shown.clone(),
            reason,
        };
        if url.starts_with("sqlite:") {
            sqlite_store_exists(url).await.map_err(invalid)?;
        }
        // `connect` would create a missing SQLite file (mode=rwc); an
        // explicit mode in the URL is the user's choice.
        let url = if url.starts_with("sqlite:") && !url.contains("mode=") {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rw")
        } else {
            url.to_owned()
        };
        let (pool, backend) = open_pool(&url, true).await?;
        let store = SqlStore { pool, backend };
        if backend == Backend::Postgres {
            let tables: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM information_schema.tables
                 WHERE table_schema = current_schema() AND table_name = 'backstop_failed_messages'",
            )
            .fetch_one(&store.pool)
            .await
            .and_then(|row| row.try_get("n"))
            .map_err(unavailable)?;
            if tables == 0 {
                store.pool.close().await;
                return Err(invalid(NO_STORE_TABLE.to_owned()));
            }
        }
        store.migrate().await?;
        store.backfill_causes().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        if self.backend == Backend::Postgres {
            // Two instances starting together must not race on the DDL.
            sqlx::query("SELECT pg_advisory_xact_lock(7234000001)")
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS backstop_schema_migrations (
                version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let applied: Vec<i64> = sqlx::query("SELECT version FROM backstop_schema_migrations")
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?
            .iter()
            .filter_map(|r| r.try_get::<i64, _>("version").ok())
            .collect();
        for (version, description) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            let statements = match (self.backend, version) {
                (Backend::Sqlite, 1) => SQLITE_SCHEMA,
                (Backend::Postgres, 1) => POSTGRES_SCHEMA,
                (_, 2) => FINGERPRINT_SCHEMA,
                (_, 3) => GROUPS_SCHEMA,
                (_, 4) => EDITS_IN_ROW_SCHEMA,
                (backend, 5) => super::console_audit::console_audit_schema(backend),
                _ => &[],
            };
            for statement in statements {
                sqlx::query(statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
            if *version == 3 {
                let versions = match self.backend {
                    Backend::Sqlite => SQLITE_VERSIONS,
                    Backend::Postgres => POSTGRES_VERSIONS,
                };
                sqlx::query(versions)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
            sqlx::query(
                "INSERT INTO backstop_schema_migrations (version, description, applied_at)
                 VALUES ($1, $2, $3)",
            )
            .bind(*version)
            .bind(*description)
            .bind(now_ms() as i64)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    /// Sets `cause` on every row without one (rows from before schema
    /// version 3, or written by an older binary during a rolling upgrade)
    /// and returns how many it set. It walks those rows by id through the
    /// partial index of version 4, [`BACKFILL_CHUNK`] rows per short
    /// transaction, so it never holds many locks for long; each row is
    /// fenced by its error text, so a concurrent change of the error wins.
    /// Called after every migration and at the start of the group reads
    /// and actions; cheap when there is nothing to do.
    pub async fn backfill_causes(&self) -> Result<u64, StoreError> {
        let mut after = 0_i64;
        let mut filled = 0;
        loop {
            let chunk = sqlx::query(
                "SELECT id, error FROM backstop_failed_messages
                 WHERE cause IS NULL AND id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after)
            .bind(BACKFILL_CHUNK)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            let Some(last) = chunk.last() else {
                return Ok(filled);
            };
            after = last.try_get("id").map_err(unavailable)?;
            // Rows of one error text: one update.
            let mut by_error: std::collections::BTreeMap<String, Vec<i64>> =
                std::collections::BTreeMap::new();
            for row in &chunk {
                let id: i64 = row.try_get("id").map_err(unavailable)?;
                let error: String = row.try_get("error").map_err(unavailable)?;
                by_error.entry(error).or_default().push(id);
            }
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            for (error, ids) in &by_error {
                let sql = format!(
                    "UPDATE backstop_failed_messages SET cause = $1
                     WHERE error = $2 AND cause IS NULL AND id IN ({})",
                    in_list(3, ids.len())
                );
                let mut query = sqlx::query(&sql)
                    .bind(super::normalize_error(error))
                    .bind(error);
                for id in ids {
                    query = query.bind(*id);
                }
                filled += query
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?
                    .rows_affected();
            }
            tx.commit().await.map_err(unavailable)?;
        }
    }

    pub(super) async fn audit_in<'c>(
        tx: &mut sqlx::Transaction<'c, sqlx::Any>,
        row_id: i64,
        actor: &str,
        action: &str,
        note: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO backstop_failed_audit (row_id, at, actor, action, note)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(row_id)
        .bind(now_ms() as i64)
        .bind(actor)
        .bind(action)
        .bind(note)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// Inserts a new row; `None` when an unfinished row of the same queue
    /// and fingerprint exists (written concurrently).
    async fn insert_in<'c>(
        tx: &mut sqlx::Transaction<'c, sqlx::Any>,
        m: &NewFailedMessage,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "INSERT INTO backstop_failed_messages (queue, exchange, routing_key, message_id,
                 dedup_key, payload, headers, properties, error, error_kind, attempts, redrives,
                 status, next_attempt_at, created_at, updated_at, fingerprint, occurrences, cause)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, 'pending', $12, $13, $13,
                 $14, 1, $15)
             ON CONFLICT DO NOTHING
             RETURNING id",
        )
        .bind(&m.queue)
        .bind(&m.exchange)
        .bind(&m.routing_key)
        .bind(m.message_id.as_deref())
        .bind(m.dedup_key.as_deref())
        .bind(m.payload.as_slice())
        .bind(&m.headers)
        .bind(&m.properties)
        .bind(&m.error)
        .bind(&m.error_kind)
        .bind(m.attempts)
        .bind(m.next_attempt_at)
        .bind(now)
        .bind(&m.fingerprint)
        .bind(super::normalize_error(&m.error))
        .fetch_optional(&mut **tx)
        .await
        .map_err(unavailable)?;
        row.map(|row| row.try_get("id").map_err(unavailable))
            .transpose()
    }

    /// PostgreSQL's TEXT cannot hold NUL: on PostgreSQL a NUL in a text field
    /// (a queue name, an error text) is stored as U+2400 (␀) rather than
    /// failing the write, which would keep the message requeued forever. The
    /// payload is BYTEA and keeps every byte on both backends.
    fn storable<'m>(&self, m: &'m NewFailedMessage) -> std::borrow::Cow<'m, NewFailedMessage> {
        let has_nul = |t: &str| t.contains('\0');
        let fields = [
            &m.queue,
            &m.exchange,
            &m.routing_key,
            &m.headers,
            &m.properties,
            &m.error,
            &m.error_kind,
            &m.fingerprint,
        ];
        let optional = [&m.message_id, &m.dedup_key];
        if self.backend != Backend::Postgres
            || (!fields.iter().any(|t| has_nul(t))
                && !optional.iter().any(|t| t.as_deref().is_some_and(has_nul)))
        {
            return std::borrow::Cow::Borrowed(m);
        }
        let clean = |t: &str| t.replace('\0', "\u{2400}");
        let mut owned = m.clone();
        for field in [
            &mut owned.queue,
            &mut owned.exchange,
            &mut owned.routing_key,
            &mut owned.headers,
            &mut owned.properties,
            &mut owned.error,
            &mut owned.error_kind,
            &mut owned.fingerprint,
        ] {
            *field = clean(field);
        }
        for t in [&mut owned.message_id, &mut owned.dedup_key]
            .into_iter()
            .flatten()
        {
            *t = clean(t);
        }
        std::borrow::Cow::Owned(owned)
    }

    async fn store_impl(&self, m: &NewFailedMessage) -> Result<i64, StoreError> {
        let m = &*self.storable(m);
        // Twice at most: the insert only loses to a concurrent insert of the
        // same fingerprint, which the second pass then finds.
        for _ in 0..2 {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            if let Some(id) = self.store_in(&mut tx, m).await? {
                tx.commit().await.map_err(unavailable)?;
                return Ok(id);
            }
        }
        Err(StoreError::Unavailable(
            "an unfinished row of this message kept appearing and vanishing; try again".into(),
        ))
    }

    /// One pass of [`Self::store_impl`] in `tx`; `None` when the insert lost
    /// a race and the transaction must be tried again.
    ///
    /// Every step is a write, the first one included: SQLite then takes its
    /// write lock at the start (waiting its busy timeout) instead of failing
    /// to upgrade a read, and PostgreSQL locks the row it updates.
    async fn store_in<'c>(
        &self,
        tx: &mut sqlx::Transaction<'c, sqlx::Any>,
        m: &NewFailedMessage,
    ) -> Result<Option<i64>, StoreError> {
        let now = now_ms() as i64;
        // A re-driven message that failed again: its own row, fenced by
        // queue and fingerprint, so a header copied onto another message
        // cannot touch it; and not when another unfinished row of the same
        // message exists (that one counts the repeat, below).
        if let Some(id) = m.store_id {
            // The row's own fingerprint, and no other unfinished row of it.
            let own = format!(
                "fingerprint = $8 AND NOT EXISTS (
                     SELECT 1 FROM backstop_failed_messages other
                     WHERE other.queue = $7 AND other.fingerprint = $8
                       AND other.status IN {UNFINISHED} AND other.id <> $6)"
            );
            // Or an edited copy: its body (and so its fingerprint) is the
            // edit's, not the row's. It is the row's own re-drive when the
            // row was edited and holds exactly this body; the row then takes
            // the copy's fingerprint, unless another unfinished row holds it
            // (that one stays the message's row, and this one keeps its own).
            let edited = format!(
                "version > 0 AND payload = $10 AND NOT EXISTS (
                     SELECT 1 FROM backstop_failed_messages other
                     WHERE other.queue = $7
                       AND other.fingerprint = backstop_failed_messages.fingerprint
                       AND other.status IN {UNFINISHED} AND other.id <> $6)"
            );
            let adopt = format!(
                "CASE WHEN EXISTS (
                     SELECT 1 FROM backstop_failed_messages other
                     WHERE other.queue = $7 AND other.fingerprint = $8
                       AND other.status IN {UNFINISHED} AND other.id <> $6)
                 THEN fingerprint ELSE $8 END"
            );
            for (fence, fingerprint, payload) in [
                (own, "fingerprint".to_owned(), None),
                (edited, adopt, Some(m.payload.as_slice())),
            ] {
                let sql = format!(
                    "UPDATE backstop_failed_messages
                     SET error = $1, error_kind = $2, attempts = attempts + $3,
                         status = 'retrying', next_attempt_at = $4, lease_owner = NULL,
                         lease_until = NULL, updated_at = $5, fingerprint = {fingerprint},
                         cause = $9
                     WHERE id = $6 AND queue = $7
                       AND status IN ('pending', 'retrying', 'replayed') AND {fence}"
                );
                let mut query = sqlx::query(&sql)
                    .bind(&m.error)
                    .bind(&m.error_kind)
                    .bind(m.attempts)
                    .bind(m.next_attempt_at)
                    .bind(now)
                    .bind(id)
                    .bind(&m.queue)
                    .bind(&m.fingerprint)
                    .bind(super::normalize_error(&m.error));
                if let Some(payload) = payload {
                    query = query.bind(payload);
                }
                let updated = query.execute(&mut **tx).await.map_err(unavailable)?;
                if updated.rows_affected() == 1 {
                    Self::audit_in(tx, id, "consumer", "failed_again", Some(&m.error)).await?;
                    return Ok(Some(id));
                }
            }
        }
        // The same message again (an ack lost in a cut, a duplicate
        // publish): one row to review, one more occurrence.
        let repeated = sqlx::query(&format!(
            "UPDATE backstop_failed_messages
             SET occurrences = occurrences + 1, error = $1, error_kind = $2, updated_at = $3,
                 cause = $6
             WHERE queue = $4 AND fingerprint = $5 AND status IN {UNFINISHED}
             RETURNING id"
        ))
        .bind(&m.error)
        .bind(&m.error_kind)
        .bind(now)
        .bind(&m.queue)
        .bind(&m.fingerprint)
        .bind(super::normalize_error(&m.error))
        .fetch_optional(&mut **tx)
        .await
        .map_err(unavailable)?;
        if let Some(row) = repeated {
            let id: i64 = row.try_get("id").map_err(unavailable)?;
            Self::audit_in(tx, id, "consumer", "stored_again", Some(&m.error)).await?;
            return Ok(Some(id));
        }
        let Some(id) = Self::insert_in(tx, m, now).await? else {
            return Ok(None);
        };
        Self::audit_in(tx, id, "consumer", "stored", Some(&m.error)).await?;
        Ok(Some(id))
    }

    async fn claim_impl(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
        queue: Option<&str>,
    ) -> Result<Vec<FailedRow>, StoreError> {
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        // SQLite runs one writer at a time, so the UPDATE is the claim; on
        // PostgreSQL the row locks are skipped by concurrent scanners, and
        // the lease condition is checked again on the locked row.
        let sql = format!(
            "UPDATE backstop_failed_messages
             SET status = 'retrying', lease_owner = $1, lease_until = $2, updated_at = $3,
                 redrives = redrives + 1
             WHERE id IN (
                 SELECT id FROM backstop_failed_messages
                 WHERE status IN ('pending', 'retrying') AND next_attempt_at <= $3
                   AND (lease_until IS NULL OR lease_until < $3)
                   AND ($4 IS NULL OR queue = $4)
                 ORDER BY next_attempt_at, id
                 LIMIT $5
                 {lock})
               AND (lease_until IS NULL OR lease_until < $3)
             RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(queue)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(row_of).collect()
    }

    /// Records a scanner's outcomes in one transaction, tried once more
    /// when PostgreSQL aborts it as a deadlock victim (40P01) or on a
    /// serialization failure (40001): nothing of it was written then.
    async fn finish_impl(
        &self,
        owner: &str,
        outcomes: &[(i64, RedriveOutcome)],
    ) -> Result<u64, StoreError> {
        match self.finish_once(owner, outcomes).await {
            Err(e) if retryable(&e) => {
                tracing::warn!(error = %e, "recording re-drive outcomes: trying once more");
                self.finish_once(owner, outcomes).await.map_err(unavailable)
            }
            other => other.map_err(unavailable),
        }
    }

    async fn finish_once(
        &self,
        owner: &str,
        outcomes: &[(i64, RedriveOutcome)],
    ) -> Result<u64, sqlx::Error> {
        let now = now_ms() as i64;
        let mut tx = self.pool.begin().await?;
        let mut applied = 0;
        // Confirmed re-drives, the bulk of a batch: a statement per chunk.
        let replayed: Vec<i64> = outcomes
            .iter()
            .filter(|(_, outcome)| *outcome == RedriveOutcome::Replayed)
            .map(|(id, _)| *id)
            .collect();
        for chunk in replayed.chunks(IN_LIST_CHUNK) {
            let sql = format!(
                "UPDATE backstop_failed_messages
                 SET status = 'replayed', lease_owner = NULL, lease_until = NULL, updated_at = $1
                 WHERE lease_owner = $2 AND id IN ({})
                 RETURNING id",
                in_list(3, chunk.len())
            );
            let mut query = sqlx::query(&sql).bind(now).bind(owner);
            for id in chunk {
                query = query.bind(*id);
            }
            let updated: Vec<i64> = query
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("id"))
                .collect::<Result<_, _>>()?;
            // Rows this owner no longer holds were updated by a new failure.
            if updated.is_empty() {
                continue;
            }
            applied += updated.len() as u64;
            let sql = format!(
                "INSERT INTO backstop_failed_audit (row_id, at, actor, action, note)
                 SELECT id, $1, $2, 'replayed', NULL FROM backstop_failed_messages
                 WHERE id IN ({})",
                in_list(3, updated.len())
            );
            let mut query = sqlx::query(&sql).bind(now).bind(owner);
            for id in &updated {
                query = query.bind(*id);
            }
            query.execute(&mut *tx).await?;
        }
        for (id, outcome) in outcomes {
            if *outcome == RedriveOutcome::Replayed {
                continue;
            }
            let (status, next, error, action) = match outcome {
                RedriveOutcome::Replayed => (Status::Replayed, None, None, "replayed"),
                RedriveOutcome::Resolved => (Status::Resolved, None, None, "resolved"),
                RedriveOutcome::Failed {
                    error,
                    next_attempt_at,
                    give_up,
                } => (
                    if *give_up {
                        Status::NeedsReview
                    } else {
                        Status::Retrying
                    },
                    Some(*next_attempt_at),
                    Some(error.as_str()),
                    if *give_up {
                        "needs_review"
                    } else {
                        "redrive_failed"
                    },
                ),
            };
            let updated = sqlx::query(
                "UPDATE backstop_failed_messages
                 SET status = $1,
                     next_attempt_at = COALESCE($2, next_attempt_at),
                     error = COALESCE($3, error),
                     lease_owner = NULL, lease_until = NULL, updated_at = $4,
                     cause = COALESCE($7, cause)
                 WHERE id = $5 AND lease_owner = $6",
            )
            .bind(status.as_str())
            .bind(next)
            .bind(error)
            .bind(now)
            .bind(*id)
            .bind(owner)
            .bind(error.map(super::normalize_error))
            .execute(&mut *tx)
            .await?;
            // Zero rows: the re-driven message failed again before this was
            // recorded, and the consumer's update stands.
            if updated.rows_affected() == 1 {
                applied += 1;
                sqlx::query(
                    "INSERT INTO backstop_failed_audit (row_id, at, actor, action, note)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(*id)
                .bind(now_ms() as i64)
                .bind(owner)
                .bind(action)
                .bind(error)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// Stores many rows in one transaction (bulk loads and benchmarks; the
    /// consumer stores one row per message).
    pub async fn store_batch(&self, messages: &[NewFailedMessage]) -> Result<(), StoreError> {
        let now = now_ms() as i64;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for m in messages {
            let m = &*self.storable(m);
            // A message already unfinished in the store is left as it is.
            if let Some(id) = Self::insert_in(&mut tx, m, now).await? {
                Self::audit_in(&mut tx, id, "consumer", "stored", Some(&m.error)).await?;
            }
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn list_impl(&self, filter: &ListFilter) -> Result<Vec<FailedRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM backstop_failed_messages
             WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR queue = $2)
             ORDER BY id DESC LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.status.map(Status::as_str))
            .bind(filter.queue.as_deref())
            .bind(filter.limit.unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(row_of).collect()
    }

    async fn get_impl(&self, id: i64) -> Result<FailedRow, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM backstop_failed_messages WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .ok_or(StoreError::NotFound(id))?;
        row_of(&row)
    }

    async fn act_impl(
        &self,
        id: i64,
        action: ManualAction,
        actor: &str,
        note: Option<&str>,
    ) -> Result<FailedRow, StoreError> {
        let current = self.get_impl(id).await?;
        // A forced retry of a row that is not finished is a plain retry, and
        // is audited as one.
        let action = match action {
            ManualAction::ForceRetry if !current.status.is_finished() => ManualAction::Retry,
            other => other,
        };
        let allowed = match action {
            // Re-opening a closed row (a replay that needs another go, a
            // resolve that was a mistake) is a deliberate, separately
            // audited act.
            ManualAction::ForceRetry => true,
            ManualAction::Retry | ManualAction::Resolve | ManualAction::Discard => {
                !current.status.is_finished()
            }
        };
        if !allowed {
            return Err(StoreError::InvalidTransition {
                id,
                status: current.status,
                action: action.as_str(),
            });
        }
        let (status, next) = match action {
            ManualAction::Retry | ManualAction::ForceRetry => {
                (Status::Pending, Some(now_ms() as i64))
            }
            ManualAction::Resolve => (Status::Resolved, None),
            ManualAction::Discard => (Status::Discarded, None),
        };
        if status == Status::Pending && current.status.is_finished() {
            // One unfinished row per message: a newer row of the same message
            // is the one to retry.
            let open = sqlx::query(&format!(
                "SELECT id FROM backstop_failed_messages
                 WHERE queue = $1 AND fingerprint = $2 AND status IN {UNFINISHED} AND id <> $3"
            ))
            .bind(&current.queue)
            .bind(&current.fingerprint)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
            if let Some(row) = open {
                return Err(StoreError::StillOpen {
                    id,
                    open: row.try_get("id").map_err(unavailable)?,
                });
            }
        }
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let updated = sqlx::query(
            "UPDATE backstop_failed_messages
             SET status = $1, next_attempt_at = COALESCE($2, next_attempt_at),
                 lease_owner = NULL, lease_until = NULL, updated_at = $3,
                 redrives = CASE WHEN $1 = 'pending' THEN 0 ELSE redrives END
             WHERE id = $4 AND status = $5 AND (lease_until IS NULL OR lease_until < $3)",
        )
        .bind(status.as_str())
        .bind(next)
        .bind(now_ms() as i64)
        .bind(id)
        .bind(current.status.as_str())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if updated.rows_affected() != 1 {
            // Changed under us, or a scanner holds it right now: report
            // what it is, and let the person try again.
            let now = self.get_impl(id).await?;
            return Err(StoreError::InvalidTransition {
                id,
                status: now.status,
                action: action.as_str(),
            });
        }
        Self::audit_in(&mut tx, id, actor, action.as_str(), note).await?;
        tx.commit().await.map_err(unavailable)?;
        self.get_impl(id).await
    }

    async fn audit_impl(&self, id: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, actor, action, note FROM backstop_failed_audit
             WHERE row_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: r.try_get("at").map_err(unavailable)?,
                    actor: r.try_get("actor").map_err(unavailable)?,
                    action: r.try_get("action").map_err(unavailable)?,
                    note: r.try_get("note").map_err(unavailable)?,
                })
            })
            .collect()
    }

    async fn purge_impl(&self, before: i64, queue: Option<&str>) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let finished = "('resolved', 'discarded', 'replayed')";
        sqlx::query(&format!(
            "DELETE FROM backstop_failed_audit WHERE row_id IN (
                 SELECT id FROM backstop_failed_messages
                 WHERE status IN {finished} AND updated_at < $1 AND ($2 IS NULL OR queue = $2))"
        ))
        .bind(before)
        .bind(queue)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let done = sqlx::query(&format!(
            "DELETE FROM backstop_failed_messages
             WHERE status IN {finished} AND updated_at < $1 AND ($2 IS NULL OR queue = $2)"
        ))
        .bind(before)
        .bind(queue)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(done.rows_affected())
    }
}

impl CompensationStore for SqlStore {
    fn store<'a>(
        &'a self,
        message: &'a NewFailedMessage,
    ) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(self.store_impl(message))
    }

    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        now: i64,
        lease_until: i64,
        limit: i64,
        queue: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<FailedRow>, StoreError>> {
        Box::pin(self.claim_impl(owner, now, lease_until, limit, queue))
    }

    fn renew_lease<'a>(
        &'a self,
        owner: &'a str,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let renewed = sqlx::query(
                "UPDATE backstop_failed_messages SET lease_until = $1
                 WHERE id = $2 AND lease_owner = $3 AND lease_until >= $4
                   AND status = 'retrying'",
            )
            .bind(lease_until)
            .bind(id)
            .bind(owner)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(renewed.rows_affected() == 1)
        })
    }

    fn renew_leases<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [i64],
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'a, Result<Vec<i64>, StoreError>> {
        Box::pin(async move {
            let mut held = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(IN_LIST_CHUNK) {
                let sql = format!(
                    "UPDATE backstop_failed_messages SET lease_until = $1
                     WHERE lease_owner = $2 AND lease_until >= $3 AND status = 'retrying'
                       AND id IN ({})
                     RETURNING id",
                    in_list(4, chunk.len())
                );
                let mut query = sqlx::query(&sql).bind(lease_until).bind(owner).bind(now);
                for id in chunk {
                    query = query.bind(*id);
                }
                for row in query.fetch_all(&self.pool).await.map_err(unavailable)? {
                    held.push(row.try_get::<i64, _>("id").map_err(unavailable)?);
                }
            }
            Ok(held)
        })
    }

    fn finish_redrives<'a>(
        &'a self,
        owner: &'a str,
        outcomes: &'a [(i64, RedriveOutcome)],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.finish_impl(owner, outcomes))
    }

    fn release_untried<'a>(
        &'a self,
        owner: &'a str,
        ids: &'a [i64],
        now: i64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut released = 0;
            for chunk in ids.chunks(IN_LIST_CHUNK) {
                // Only a claim this owner still holds, on a row nobody
                // changed since (a finish or an operator's action ends the
                // lease or the 'retrying' status).
                let sql = format!(
                    "UPDATE backstop_failed_messages
                     SET lease_owner = NULL, lease_until = NULL, updated_at = $1,
                         redrives = CASE WHEN redrives > 0 THEN redrives - 1 ELSE 0 END
                     WHERE lease_owner = $2 AND lease_until >= $1 AND status = 'retrying'
                       AND id IN ({})",
                    in_list(3, chunk.len())
                );
                let mut query = sqlx::query(&sql).bind(now).bind(owner);
                for id in chunk {
                    query = query.bind(*id);
                }
                released += query
                    .execute(&self.pool)
                    .await
                    .map_err(unavailable)?
                    .rows_affected();
            }
            Ok(released)
        })
    }

    fn list<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<FailedRow>, StoreError>> {
        Box::pin(self.list_impl(filter))
    }

    fn get(&self, id: i64) -> BoxFuture<'_, Result<FailedRow, StoreError>> {
        Box::pin(self.get_impl(id))
    }

    fn act<'a>(
        &'a self,
        id: i64,
        action: ManualAction,
        actor: &'a str,
        note: Option<&'a str>,
    ) -> BoxFuture<'a, Result<FailedRow, StoreError>> {
        Box::pin(self.act_impl(id, action, actor, note))
    }

    fn audit(&self, id: i64) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>> {
        Box::pin(self.audit_impl(id))
    }

    fn purge_finished<'a>(
        &'a self,
        before: i64,
        queue: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.purge_impl(before, queue))
    }

    fn count_by_status(&self) -> BoxFuture<'_, Result<Vec<(Status, i64)>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT status, COUNT(*) AS n FROM backstop_failed_messages GROUP BY status",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            rows.iter()
                .map(|row| {
                    let status: String = row.try_get("status").map_err(unavailable)?;
                    let n: i64 = row.try_get("n").map_err(unavailable)?;
                    Ok((status.parse().map_err(StoreError::Unavailable)?, n))
                })
                .collect()
        })
    }
}
