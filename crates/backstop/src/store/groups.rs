//! Failure groups and edited payloads: what the review console and
//! `backstop failed groups` work on.
//!
//! A group is a cause: the queue, the error kind and the error text
//! normalized by [`normalize_error`] (numbers, ids, UUIDs and e-mail
//! addresses masked), over the unfinished rows (pending, retrying,
//! needs_review). A whole group is acted on in batches
//! ([`run_group_action`]), each batch one transaction with one audit entry
//! per row, so an interrupted action leaves every batch whole.
//!
//! An edit stores a new version of a row's payload (and headers) and makes it
//! the row's own payload: every read (a re-drive's claim included) returns
//! the latest version, and the original is kept as version 0.

use super::sql::{COLUMNS, UNFINISHED, in_list, row_of, unavailable};
use super::{FailedRow, ManualAction, SqlStore, Status, StoreError};
use crate::retry::now_ms;
use serde::Serialize;
use sqlx::Row;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The longest normalized error text, in characters.
const CAUSE_MAX_CHARS: usize = 200;

/// The error text with what varies from one message to the next masked, so
/// that failures of one cause share one text: UUIDs become `<uuid>`, hex
/// and long mixed ids (4+ hex characters with a digit and a letter, `0x...`,
/// 16+ characters of letters and digits) `<id>`, e-mail addresses `<email>`,
/// other numbers `#` (`1.5` and `1,000` too). Whitespace runs become one
/// space, and the result is cut at 200 characters.
pub fn normalize_error(error: &str) -> String {
    let chars: Vec<char> = error.chars().collect();
    let mut out = String::with_capacity(error.len().min(256));
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            if !out.is_empty() {
                out.push(' ');
            }
            continue;
        }
        if is_uuid_at(&chars, i) {
            out.push_str("<uuid>");
            i += 36;
            continue;
        }
        if let Some(len) = email_at(&chars, i) {
            out.push_str("<email>");
            i += len;
            continue;
        }
        if c.is_ascii_alphanumeric() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_alphanumeric() {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            out.push_str(&mask_word(&word));
            continue;
        }
        out.push(c);
        i += 1;
    }
    // `#.#`, `#,#`: one number.
    let mut merged = out.trim_end().to_owned();
    for sep in ["#.#", "#,#"] {
        while merged.contains(sep) {
            merged = merged.replace(sep, "#");
        }
    }
    if merged.chars().count() > CAUSE_MAX_CHARS {
        merged = merged.chars().take(CAUSE_MAX_CHARS).collect();
    }
    merged
}

/// One run of ASCII letters and digits, masked.
fn mask_word(word: &str) -> String {
    let digits = word.bytes().filter(u8::is_ascii_digit).count();
    if digits == 0 {
        return word.to_owned();
    }
    if digits == word.len() {
        return "#".to_owned();
    }
    let lower = word.to_ascii_lowercase();
    let hex = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit());
    if (lower.starts_with("0x") && hex(&lower[2..]))
        || (word.len() >= 4 && hex(&lower))
        || word.len() >= 16
    {
        return "<id>".to_owned();
    }
    // Letters with numbers in them (`order42`, `v2`): mask the numbers.
    let mut masked = String::with_capacity(word.len());
    let mut in_number = false;
    for c in word.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                masked.push('#');
            }
            in_number = true;
        } else {
            masked.push(c);
            in_number = false;
        }
    }
    masked
}

/// True when a UUID (`8-4-4-4-12` hex digits) starts at `i`, not glued to
/// more letters or digits.
fn is_uuid_at(chars: &[char], i: usize) -> bool {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    if i > 0 && chars[i - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut at = i;
    for (n, len) in GROUPS.iter().enumerate() {
        if n > 0 {
            if chars.get(at) != Some(&'-') {
                return false;
            }
            at += 1;
        }
        for _ in 0..*len {
            if !chars.get(at).is_some_and(char::is_ascii_hexdigit) {
                return false;
            }
            at += 1;
        }
    }
    !chars.get(at).is_some_and(char::is_ascii_alphanumeric)
}

/// The length of an e-mail address starting at `i`, if one does.
fn email_at(chars: &[char], i: usize) -> Option<usize> {
    let part = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-');
    if i > 0 && part(chars[i - 1]) {
        return None;
    }
    let mut at = i;
    while at < chars.len() && part(chars[at]) {
        at += 1;
    }
    if at == i || chars.get(at) != Some(&'@') {
        return None;
    }
    let domain_start = at + 1;
    let mut end = domain_start;
    while end < chars.len()
        && (chars[end].is_ascii_alphanumeric() || matches!(chars[end], '.' | '-'))
    {
        end += 1;
    }
    // A trailing dot ends the sentence, not the domain.
    while end > domain_start && chars[end - 1] == '.' {
        end -= 1;
    }
    let domain: String = chars[domain_start..end].iter().collect();
    let dotted = domain.contains('.') && !domain.starts_with('.');
    dotted.then_some(end - i)
}

/// What a failure group is: one cause in one queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct GroupKey {
    /// The queue the rows failed in.
    pub queue: String,
    /// `transient` or `permanent`.
    pub error_kind: String,
    /// The normalized error text ([`normalize_error`]).
    pub cause: String,
}

impl GroupKey {
    /// The group's stable, URL-safe id: the first 16 hex characters of a
    /// SHA-256 over the three parts (each prefixed by its length).
    pub fn id(&self) -> String {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for part in [&self.queue, &self.error_kind, &self.cause] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        hex::encode(&hash.finalize()[..8])
    }
}

/// A group of unfinished rows with one cause.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailureGroup {
    /// What the rows share.
    pub key: GroupKey,
    /// [`GroupKey::id`].
    pub id: String,
    /// Unfinished rows in the group.
    pub count: i64,
    /// The oldest row's creation, ms since the epoch.
    pub first_seen: i64,
    /// The latest change of a row, ms since the epoch.
    pub last_seen: i64,
    /// The oldest row's id, as a sample.
    pub sample_id: i64,
    /// The sample row's error text, unmasked.
    pub sample_error: String,
    /// How many rows are pending, retrying and needing review (statuses
    /// without rows are left out).
    pub by_status: Vec<(Status, i64)>,
}

/// What one [`SqlStore::act_group_batch`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GroupBatch {
    /// Rows acted on, each with its audit entry.
    pub acted: u64,
    /// Rows of the batch left alone: a scanner holds them right now.
    pub skipped: u64,
    /// The batch's last row acted on: where the next batch starts. `None`
    /// when no free row was left (leased rows up to the end are counted in
    /// `skipped`).
    pub last_id: Option<i64>,
}

/// What a whole [`run_group_action`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GroupBatchTotals {
    /// Rows acted on.
    pub acted: u64,
    /// Rows skipped (leased by a scanner at their batch).
    pub skipped: u64,
    /// Batches committed.
    pub batches: u64,
    /// True when it stopped early on [`GroupProgress::cancel`].
    pub cancelled: bool,
}

/// The progress of a group action, shared with whoever shows it; also the
/// way to interrupt it between two batches.
#[derive(Debug, Default)]
pub struct GroupProgress {
    /// Rows of the group when the action started.
    pub total: AtomicU64,
    /// Rows acted on so far.
    pub done: AtomicU64,
    /// Rows skipped so far (leased by a scanner).
    pub skipped: AtomicU64,
    cancelled: AtomicBool,
    finished: AtomicBool,
}

impl GroupProgress {
    /// Fresh progress, nothing counted.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Asks the action to stop before its next batch.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// True once [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// True once the action ended (done, cancelled or failed).
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// `(total, done, skipped)` right now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.total.load(Ordering::SeqCst),
            self.done.load(Ordering::SeqCst),
            self.skipped.load(Ordering::SeqCst),
        )
    }
}

/// A group action to run: what [`run_group_action`] takes, as one value
/// (for a console's job list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupJob {
    /// The group.
    pub key: GroupKey,
    /// What to do to each row.
    pub action: ManualAction,
    /// Who, in every audit entry.
    pub actor: String,
    /// Why, in every audit entry.
    pub note: Option<String>,
    /// Rows per transaction.
    pub batch: i64,
}

impl GroupJob {
    /// Runs it; see [`run_group_action`].
    pub async fn run(
        self,
        store: &SqlStore,
        progress: Arc<GroupProgress>,
    ) -> Result<GroupBatchTotals, StoreError> {
        run_group_action(
            store,
            self.key,
            self.action,
            self.actor,
            self.note,
            self.batch,
            progress,
        )
        .await
    }
}

/// Acts on every unfinished row of a group, `batch` rows per transaction,
/// each row with its audit entry (`actor`, `note`), like
/// [`act`](super::CompensationStore::act) on each. The rows are those of the
/// group when it starts (counted in `progress.total`): rows that arrive
/// later are left alone. It stops between two batches once
/// `progress.cancel()` is called; every batch committed is whole. Every
/// action needs a note ([`StoreError::NoteRequired`] without one).
pub async fn run_group_action(
    store: &SqlStore,
    key: GroupKey,
    action: ManualAction,
    actor: String,
    note: Option<String>,
    batch: i64,
    progress: Arc<GroupProgress>,
) -> Result<GroupBatchTotals, StoreError> {
    let result = async {
        if note.as_deref().is_none_or(|n| n.trim().is_empty()) {
            return Err(StoreError::NoteRequired(action.as_str()));
        }
        let (up_to, total) = store.group_extent(&key).await?;
        progress.total.store(total, Ordering::SeqCst);
        let mut totals = GroupBatchTotals::default();
        let mut after = 0;
        loop {
            if progress.is_cancelled() {
                totals.cancelled = true;
                break;
            }
            let done = store
                .act_group_batch(
                    &key,
                    action,
                    &actor,
                    note.as_deref(),
                    after,
                    up_to,
                    batch.max(1),
                )
                .await?;
            let Some(last) = done.last_id else { break };
            totals.batches += 1;
            totals.acted += done.acted;
            totals.skipped += done.skipped;
            progress.done.fetch_add(done.acted, Ordering::SeqCst);
            progress.skipped.fetch_add(done.skipped, Ordering::SeqCst);
            after = last;
        }
        Ok(totals)
    };
    let result = result.await;
    progress.finished.store(true, Ordering::SeqCst);
    result
}

/// One version of a row's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PayloadVersion {
    /// 0 for the original, then 1, 2, ...
    pub version: i64,
    /// The body.
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// The headers, as JSON.
    pub headers: String,
    /// When, ms since the epoch (the row's creation for the original).
    pub at: i64,
    /// Who wrote it (`consumer` for the original).
    pub actor: String,
    /// The operator's note.
    pub note: Option<String>,
}

/// The group's rows: `key` binds as `$1`..`$3`. A plain equality on each
/// column, so the group index `(queue, error_kind, cause, id)` serves it and
/// batches walk it by id.
const GROUP_WHERE: &str = "queue = $1 AND error_kind = $2 AND cause = $3";

/// The longest diff kept in an edit's audit note, in bytes.
const DIFF_MAX_BYTES: usize = 64 * 1024;

impl SqlStore {
    /// The groups of unfinished rows (of `queue` only, when given), largest
    /// first: one `GROUP BY` over the group index.
    pub async fn groups(&self, queue: Option<&str>) -> Result<Vec<FailureGroup>, StoreError> {
        // Rows an older binary wrote have no cause yet.
        self.backfill_causes().await?;
        let sql = format!(
            "SELECT g.queue, g.error_kind, g.cause, g.n, g.first_seen, g.last_seen, g.sample_id,
                    g.pending, g.retrying, g.needs_review, m.error AS sample_error
             FROM (
                 SELECT queue, error_kind, cause, COUNT(*) AS n,
                        MIN(created_at) AS first_seen, MAX(updated_at) AS last_seen,
                        MIN(id) AS sample_id,
                        CAST(SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END) AS BIGINT)
                            AS pending,
                        CAST(SUM(CASE WHEN status = 'retrying' THEN 1 ELSE 0 END) AS BIGINT)
                            AS retrying,
                        CAST(SUM(CASE WHEN status = 'needs_review' THEN 1 ELSE 0 END) AS BIGINT)
                            AS needs_review
                 FROM backstop_failed_messages
                 WHERE status IN {UNFINISHED} AND ($1 IS NULL OR queue = $1)
                   AND cause IS NOT NULL
                 GROUP BY queue, error_kind, cause) g
             JOIN backstop_failed_messages m ON m.id = g.sample_id
             ORDER BY g.n DESC, g.first_seen, g.sample_id"
        );
        let rows = sqlx::query(&sql)
            .bind(queue)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                let key = GroupKey {
                    queue: r.try_get("queue").map_err(unavailable)?,
                    error_kind: r.try_get("error_kind").map_err(unavailable)?,
                    cause: r.try_get("cause").map_err(unavailable)?,
                };
                let mut by_status = Vec::new();
                for (status, column) in [
                    (Status::Pending, "pending"),
                    (Status::Retrying, "retrying"),
                    (Status::NeedsReview, "needs_review"),
                ] {
                    let n: i64 = r.try_get(column).map_err(unavailable)?;
                    if n > 0 {
                        by_status.push((status, n));
                    }
                }
                Ok(FailureGroup {
                    id: key.id(),
                    key,
                    count: r.try_get("n").map_err(unavailable)?,
                    first_seen: r.try_get("first_seen").map_err(unavailable)?,
                    last_seen: r.try_get("last_seen").map_err(unavailable)?,
                    sample_id: r.try_get("sample_id").map_err(unavailable)?,
                    sample_error: r.try_get("sample_error").map_err(unavailable)?,
                    by_status,
                })
            })
            .collect()
    }

    /// The group with this [`GroupKey::id`], if it has unfinished rows.
    pub async fn group(&self, id: &str) -> Result<Option<FailureGroup>, StoreError> {
        Ok(self.groups(None).await?.into_iter().find(|g| g.id == id))
    }

    /// Unfinished rows of the group with `id > after_id`, id ascending, at
    /// most `limit`.
    pub async fn group_rows(
        &self,
        key: &GroupKey,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<FailedRow>, StoreError> {
        self.backfill_causes().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM backstop_failed_messages
             WHERE {GROUP_WHERE} AND status IN {UNFINISHED} AND id > $4
             ORDER BY id LIMIT $5"
        );
        let rows = sqlx::query(&sql)
            .bind(&key.queue)
            .bind(&key.error_kind)
            .bind(&key.cause)
            .bind(after_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(row_of).collect()
    }

    /// The largest row id now, and how many unfinished rows of the group
    /// are at or below it.
    async fn group_extent(&self, key: &GroupKey) -> Result<(i64, u64), StoreError> {
        self.backfill_causes().await?;
        let up_to: i64 =
            sqlx::query("SELECT COALESCE(MAX(id), 0) AS m FROM backstop_failed_messages")
                .fetch_one(&self.pool)
                .await
                .and_then(|r| r.try_get("m"))
                .map_err(unavailable)?;
        let total: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) AS n FROM backstop_failed_messages
             WHERE {GROUP_WHERE} AND status IN {UNFINISHED} AND id <= $4"
        ))
        .bind(&key.queue)
        .bind(&key.error_kind)
        .bind(&key.cause)
        .bind(up_to)
        .fetch_one(&self.pool)
        .await
        .and_then(|r| r.try_get("n"))
        .map_err(unavailable)?;
        Ok((up_to, u64::try_from(total).unwrap_or(0)))
    }

    /// Acts on the next `limit` unfinished rows of the group with
    /// `after_id < id <= up_to_id`, in one transaction, each with its audit
    /// entry, as [`act`](super::CompensationStore::act) would: `Retry`
    /// (and `ForceRetry`, which is a plain retry on an unfinished row) makes
    /// a row pending and due now, `Resolve` and `Discard` close it. A row a
    /// scanner holds under a live lease is skipped (never locked nor waited
    /// for) and counted, like `act` refuses it. `note` is required, for
    /// every action ([`StoreError::NoteRequired`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn act_group_batch(
        &self,
        key: &GroupKey,
        action: ManualAction,
        actor: &str,
        note: Option<&str>,
        after_id: i64,
        up_to_id: i64,
        limit: i64,
    ) -> Result<GroupBatch, StoreError> {
        let action = match action {
            ManualAction::ForceRetry => ManualAction::Retry,
            other => other,
        };
        let (status, due) = match action {
            ManualAction::Retry | ManualAction::ForceRetry => (Status::Pending, true),
            ManualAction::Resolve => (Status::Resolved, false),
            ManualAction::Discard => (Status::Discarded, false),
        };
        let note = match note.map(str::trim) {
            Some(n) if !n.is_empty() => self.text(n),
            _ => return Err(StoreError::NoteRequired(action.as_str())),
        };
        self.backfill_causes().await?;
        let now = now_ms() as i64;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // A write first: SQLite takes its write lock now (waiting its busy
        // timeout) instead of failing to upgrade the read below.
        sqlx::query("UPDATE backstop_failed_messages SET id = id WHERE id = -1")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        // Only rows no scanner holds right now are locked (in id order): a
        // leased row is being re-driven, and its scanner's bulk finish locks
        // it; waiting for it here, while holding others, could deadlock.
        let lock = match self.backend {
            super::sql::Backend::Postgres => "FOR UPDATE",
            super::sql::Backend::Sqlite => "",
        };
        let window = sqlx::query(&format!(
            "SELECT id FROM backstop_failed_messages
             WHERE {GROUP_WHERE} AND status IN {UNFINISHED} AND id > $4 AND id <= $5
               AND (lease_until IS NULL OR lease_until < $6)
             ORDER BY id LIMIT $7 {lock}"
        ))
        .bind(&key.queue)
        .bind(&key.error_kind)
        .bind(&key.cause)
        .bind(after_id)
        .bind(up_to_id)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        let free: Vec<i64> = window
            .iter()
            .map(|row| row.try_get("id"))
            .collect::<Result<_, _>>()
            .map_err(unavailable)?;
        let last_id = free.last().copied();
        // The leased rows this batch passes over, counted without a lock:
        // up to its last row, or to the end when no free row is left.
        let skipped: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) AS n FROM backstop_failed_messages
             WHERE {GROUP_WHERE} AND status IN {UNFINISHED} AND id > $4 AND id <= $5
               AND lease_until >= $6"
        ))
        .bind(&key.queue)
        .bind(&key.error_kind)
        .bind(&key.cause)
        .bind(after_id)
        .bind(last_id.unwrap_or(up_to_id))
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .and_then(|r| r.try_get("n"))
        .map_err(unavailable)?;
        let skipped = u64::try_from(skipped).unwrap_or(0);
        for chunk in free.chunks(super::sql::IN_LIST_CHUNK) {
            let sql = format!(
                "UPDATE backstop_failed_messages
                 SET status = $1,
                     next_attempt_at = CASE WHEN $2 = 1 THEN $3 ELSE next_attempt_at END,
                     lease_owner = NULL, lease_until = NULL, updated_at = $3,
                     redrives = CASE WHEN $2 = 1 THEN 0 ELSE redrives END
                 WHERE id IN ({})",
                in_list(4, chunk.len())
            );
            let mut query = sqlx::query(&sql)
                .bind(status.as_str())
                .bind(i64::from(due))
                .bind(now);
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(&mut *tx).await.map_err(unavailable)?;
            let sql = format!(
                "INSERT INTO backstop_failed_audit (row_id, at, actor, action, note)
                 SELECT id, $1, $2, $3, $4 FROM backstop_failed_messages WHERE id IN ({})",
                in_list(5, chunk.len())
            );
            let mut query = sqlx::query(&sql)
                .bind(now)
                .bind(actor)
                .bind(action.as_str())
                .bind(note.as_str());
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(&mut *tx).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(GroupBatch {
            acted: free.len() as u64,
            skipped,
            last_id,
        })
    }

    /// Text as this backend can hold it: PostgreSQL's TEXT cannot hold NUL,
    /// so NUL is written as U+2400 there (as the consumer's rows are).
    fn text(&self, t: &str) -> String {
        if self.backend == super::sql::Backend::Postgres {
            t.replace('\0', "\u{2400}")
        } else {
            t.to_owned()
        }
    }

    /// Stores an operator's edit of row `id` as its next version and
    /// returns that version's number (1, 2, ...). The new version becomes
    /// the row's own payload and headers, so every read of the row (and so
    /// every re-drive, by this binary or an older one) carries it; the first
    /// edit keeps the original as version 0 ([`versions`](Self::versions)). `headers` (a JSON
    /// header table, as stored) replaces the previous version's when given.
    /// The audit entry `edit` carries `note` and a unified diff against the
    /// previous version (a size and hash line for binary payloads). With
    /// `retry`, the row is also made due now, as a retry (a forced one for a
    /// finished row), in the same transaction.
    ///
    /// Refused without a note, with headers that are not a header table,
    /// and while a scanner holds the row (its re-drive may be publishing the
    /// previous version right now): [`StoreError::InvalidEdit`].
    pub async fn edit(
        &self,
        id: i64,
        payload: Vec<u8>,
        headers: Option<String>,
        actor: &str,
        note: &str,
        retry: bool,
    ) -> Result<i64, StoreError> {
        if note.trim().is_empty() {
            return Err(StoreError::InvalidEdit(
                "an edit needs a note saying why".to_owned(),
            ));
        }
        if let Some(h) = &headers
            && let Err(e) = serde_json::from_str::<lapin::types::FieldTable>(h)
        {
            return Err(StoreError::InvalidEdit(format!(
                "the headers are not a header table as stored: {e}"
            )));
        }
        let now = now_ms() as i64;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // The write comes first (SQLite's write lock, PostgreSQL's row
        // lock), and it is the lease check.
        let bumped = sqlx::query(
            "UPDATE backstop_failed_messages SET version = version + 1, updated_at = $1
             WHERE id = $2 AND (lease_until IS NULL OR lease_until < $1)
             RETURNING version, status, queue, fingerprint, payload, headers, created_at",
        )
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(bumped) = bumped else {
            drop(tx);
            // Missing, or leased right now.
            self.get_plain(id).await?;
            return Err(StoreError::InvalidEdit(format!(
                "row {id} is being re-driven by a scanner right now; try again once its lease ends"
            )));
        };
        let version: i64 = bumped.try_get("version").map_err(unavailable)?;
        let status: String = bumped.try_get("status").map_err(unavailable)?;
        let status: Status = status.parse().map_err(StoreError::Unavailable)?;
        let queue: String = bumped.try_get("queue").map_err(unavailable)?;
        let fingerprint: String = bumped.try_get("fingerprint").map_err(unavailable)?;
        // The row holds the current version: the previous one, for the diff.
        let previous: (Vec<u8>, String) = (
            bumped.try_get("payload").map_err(unavailable)?,
            bumped.try_get("headers").map_err(unavailable)?,
        );
        if version == 1 {
            // The first edit keeps the original as version 0.
            let created_at: i64 = bumped.try_get("created_at").map_err(unavailable)?;
            sqlx::query(
                "INSERT INTO backstop_failed_versions (row_id, version, payload, headers, at,
                     actor, note)
                 VALUES ($1, 0, $2, $3, $4, 'consumer', NULL)",
            )
            .bind(id)
            .bind(previous.0.as_slice())
            .bind(&previous.1)
            .bind(created_at)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        let headers = headers.map_or_else(|| previous.1.clone(), |h| self.text(&h));
        let mut audit = note.trim().to_owned();
        audit.push_str("\n\n");
        audit.push_str(&diff(
            &format!("payload v{}", version - 1),
            &format!("payload v{version}"),
            &previous.0,
            &payload,
        ));
        if headers != previous.1 {
            audit.push('\n');
            audit.push_str(&diff(
                &format!("headers v{}", version - 1),
                &format!("headers v{version}"),
                previous.1.as_bytes(),
                headers.as_bytes(),
            ));
        }
        sqlx::query(
            "INSERT INTO backstop_failed_versions (row_id, version, payload, headers, at, actor,
                 note)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(version)
        .bind(payload.as_slice())
        .bind(&headers)
        .bind(now)
        .bind(actor)
        .bind(self.text(note.trim()))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        // The row carries the new version: what a claim returns, and what a
        // binary that only knows `payload` re-drives.
        sqlx::query("UPDATE backstop_failed_messages SET payload = $1, headers = $2 WHERE id = $3")
            .bind(payload.as_slice())
            .bind(&headers)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        Self::audit_in(&mut tx, id, actor, "edit", Some(&self.text(&audit))).await?;
        if retry {
            let action = if status.is_finished() {
                // One unfinished row per message: a newer row of the same
                // message is the one to retry.
                let open = sqlx::query(&format!(
                    "SELECT id FROM backstop_failed_messages
                     WHERE queue = $1 AND fingerprint = $2 AND status IN {UNFINISHED}
                       AND id <> $3"
                ))
                .bind(&queue)
                .bind(&fingerprint)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
                if let Some(row) = open {
                    return Err(StoreError::StillOpen {
                        id,
                        open: row.try_get("id").map_err(unavailable)?,
                    });
                }
                ManualAction::ForceRetry
            } else {
                ManualAction::Retry
            };
            sqlx::query(
                "UPDATE backstop_failed_messages
                 SET status = 'pending', next_attempt_at = $1, lease_owner = NULL,
                     lease_until = NULL, updated_at = $1, redrives = 0
                 WHERE id = $2",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            Self::audit_in(
                &mut tx,
                id,
                actor,
                action.as_str(),
                Some(&self.text(note.trim())),
            )
            .await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(version)
    }

    /// Fails with `NotFound` when row `id` does not exist.
    async fn get_plain(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("SELECT id FROM backstop_failed_messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
            .map(|_| ())
            .ok_or(StoreError::NotFound(id))
    }

    /// Every version of row `id`'s payload, oldest first: version 0 is the
    /// original, as the consumer stored it (kept in the versions table once
    /// the row is edited; the row itself until then).
    pub async fn versions(&self, id: i64) -> Result<Vec<PayloadVersion>, StoreError> {
        let row = sqlx::query(
            "SELECT payload, headers, created_at FROM backstop_failed_messages WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?
        .ok_or(StoreError::NotFound(id))?;
        let edits = sqlx::query(
            "SELECT version, payload, headers, at, actor, note FROM backstop_failed_versions
             WHERE row_id = $1 ORDER BY version",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let mut versions = Vec::with_capacity(edits.len() + 1);
        for r in &edits {
            versions.push(PayloadVersion {
                version: r.try_get("version").map_err(unavailable)?,
                payload: r.try_get("payload").map_err(unavailable)?,
                headers: r.try_get("headers").map_err(unavailable)?,
                at: r.try_get("at").map_err(unavailable)?,
                actor: r.try_get("actor").map_err(unavailable)?,
                note: r.try_get("note").map_err(unavailable)?,
            });
        }
        if versions.first().is_none_or(|v| v.version != 0) {
            // Never edited: the row holds the original.
            versions.insert(
                0,
                PayloadVersion {
                    version: 0,
                    payload: row.try_get("payload").map_err(unavailable)?,
                    headers: row.try_get("headers").map_err(unavailable)?,
                    at: row.try_get("created_at").map_err(unavailable)?,
                    actor: "consumer".to_owned(),
                    note: None,
                },
            );
        }
        Ok(versions)
    }
}

/// A unified diff of two texts, or a size-and-hash line when either is not
/// UTF-8; capped at 64 KiB.
fn diff(old_name: &str, new_name: &str, old: &[u8], new: &[u8]) -> String {
    let mut text = match (std::str::from_utf8(old), std::str::from_utf8(new)) {
        (Ok(old), Ok(new)) => similar::TextDiff::from_lines(old, new)
            .unified_diff()
            .context_radius(3)
            .header(old_name, new_name)
            .to_string(),
        _ => {
            use sha2::Digest;
            let hash = |b: &[u8]| hex::encode(&sha2::Sha256::digest(b)[..8]);
            format!(
                "binary: {old_name} {} bytes sha256:{} -> {new_name} {} bytes sha256:{}\n",
                old.len(),
                hash(old),
                new.len(),
                hash(new)
            )
        }
    };
    if text.is_empty() {
        text = format!("{new_name}: no change from {old_name}\n");
    }
    if text.len() > DIFF_MAX_BYTES {
        let mut cut = DIFF_MAX_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n… (diff cut at 64 KiB)\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_ids_uuids_and_emails_are_masked() {
        assert_eq!(
            normalize_error("order 12345 declined: amount 10.50 over limit 1,000"),
            "order # declined: amount # over limit #"
        );
        assert_eq!(
            normalize_error("no customer 3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b in   tenant\n\tacme"),
            "no customer <uuid> in tenant acme"
        );
        assert_eq!(
            normalize_error("object 0x7ffd1a2b and deadbeef42 and 5f3a9c2e1b7d4f60 missing"),
            "object <id> and <id> and <id> missing"
        );
        assert_eq!(
            normalize_error("token 01HZX3K9QYB2M7RT4VW8 expired for ana.b+x@mail.example.com."),
            "token <id> expired for <email>."
        );
        assert_eq!(
            normalize_error("http 503 from v2 api"),
            "http # from v# api"
        );
        // Words without digits stay, including short hex-looking ones.
        assert_eq!(normalize_error("bad face cafe"), "bad face cafe");
        assert_eq!(normalize_error("  "), "");
    }

    #[test]
    fn two_failures_of_one_cause_normalize_the_same() {
        let a = normalize_error("payment 981 for user 5d0e... failed: card 4242 declined");
        let b = normalize_error("payment 1000234 for user 7a1b... failed: card 1111 declined");
        assert_eq!(a, b);
    }

    #[test]
    fn the_cause_is_capped_at_200_chars() {
        let long = "é".repeat(500);
        assert_eq!(normalize_error(&long).chars().count(), 200);
    }

    #[test]
    fn group_ids_are_stable_hex_and_tell_parts_apart() {
        let key = |q: &str, k: &str, c: &str| GroupKey {
            queue: q.into(),
            error_kind: k.into(),
            cause: c.into(),
        };
        let id = key("orders", "permanent", "declined").id();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, key("orders", "permanent", "declined").id());
        assert_ne!(id, key("orders", "transient", "declined").id());
        assert_ne!(key("ab", "c", "d").id(), key("a", "bc", "d").id());
    }

    #[test]
    fn a_diff_is_unified_for_text_and_a_hash_line_for_binary() {
        let d = diff("v0", "v1", b"{\n\"a\": 1\n}\n", b"{\n\"a\": 2\n}\n");
        assert!(d.contains("--- v0") && d.contains("+++ v1"), "{d}");
        assert!(d.contains("-\"a\": 1") && d.contains("+\"a\": 2"), "{d}");
        let b = diff("v0", "v1", &[0xff, 0], b"x");
        assert!(b.starts_with("binary: v0 2 bytes sha256:"), "{b}");
    }
}
