//! The review console's own audit: every DLQ action (replay, purge) and
//! every group job started or cancelled, with the logged-in actor. Row
//! actions are audited on their rows (`backstop_failed_audit`); these act on
//! the broker or on many rows at once, so they get a table of their own.

use super::sql::{Backend, unavailable};
use super::{SqlStore, StoreError};
use crate::retry::now_ms;
use serde::Serialize;
use sqlx::Row;

/// Migration 5 on SQLite.
pub(super) const SQLITE_CONSOLE_AUDIT: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS backstop_console_audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT)",
    "CREATE INDEX IF NOT EXISTS backstop_console_audit_at ON backstop_console_audit (at)",
];

/// Migration 5 on PostgreSQL.
pub(super) const POSTGRES_CONSOLE_AUDIT: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS backstop_console_audit (
        id BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT)",
    "CREATE INDEX IF NOT EXISTS backstop_console_audit_at ON backstop_console_audit (at)",
];

/// The statements of migration 5 for `backend`.
pub(super) fn console_audit_schema(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Sqlite => SQLITE_CONSOLE_AUDIT,
        Backend::Postgres => POSTGRES_CONSOLE_AUDIT,
    }
}

/// One action taken in the review console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConsoleAction {
    /// Its id, increasing.
    pub id: i64,
    /// When, in ms since the epoch.
    pub at: i64,
    /// Who: `console:<name>`.
    pub actor: String,
    /// What: `dlq_replay`, `dlq_purge`, `group_job_start`, ...
    pub action: String,
    /// On what: a queue, a group id, a job.
    pub target: String,
    /// The filters, counts, note or outcome.
    pub detail: Option<String>,
}

impl SqlStore {
    /// Records an action of the review console (its own transaction).
    pub async fn record_console_action(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: Option<&str>,
    ) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO backstop_console_audit (at, actor, action, target, detail)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(now_ms() as i64)
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(detail)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        row.try_get("id").map_err(unavailable)
    }

    /// The latest `limit` actions of the review console, newest first.
    pub async fn console_actions(&self, limit: i64) -> Result<Vec<ConsoleAction>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, detail FROM backstop_console_audit
             ORDER BY id DESC LIMIT $1",
        )
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(ConsoleAction {
                    id: r.try_get("id").map_err(unavailable)?,
                    at: r.try_get("at").map_err(unavailable)?,
                    actor: r.try_get("actor").map_err(unavailable)?,
                    action: r.try_get("action").map_err(unavailable)?,
                    target: r.try_get("target").map_err(unavailable)?,
                    detail: r.try_get("detail").map_err(unavailable)?,
                })
            })
            .collect()
    }
}
