//! `backstop failed ...`: manual review of the compensation store.
//!
//! Every action goes through the store's state machine and writes an audit
//! entry (actor, time, action, note); nothing here deletes a row except the
//! explicit retention purge of finished rows.

use crate::UsageError;
use backstop::config::Config;
use backstop::store::{
    AuditEntry, CompensationStore, FailedRow, GroupJob, GroupProgress, ListFilter, ManualAction,
    SqlStore, Status, StoreError,
};
use base64::Engine;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

/// The embedded default store, used when neither `-c` nor `--store` is given.
const DEFAULT_STORE: &str = "sqlite://backstop.db";

/// Where the store is: exactly one of `-c FILE` (its `[store] url`) and
/// `--store URL`, or else `./backstop.db`. The store must already exist:
/// run in the wrong folder or pointed at the wrong database, a review
/// command fails naming what it looked for instead of creating an empty
/// store and reporting nothing to review.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StoreArgs {
    /// A configuration file; its [store] section names the store.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        conflicts_with = "store"
    )]
    config: Option<PathBuf>,
    /// The store: sqlite://PATH or postgres://USER:PASSWORD@HOST/DB.
    #[arg(long = "store", value_name = "URL")]
    store: Option<String>,
}

impl StoreArgs {
    /// Opens the existing store named by `-c FILE` or `--store` (clap
    /// refuses both at once), or `./backstop.db`, with the file's retention
    /// setting.
    async fn open(&self) -> anyhow::Result<(SqlStore, Option<Duration>)> {
        let (url, retention, origin) = match (&self.config, &self.store) {
            (Some(path), _) => {
                let config = Config::load(path)?;
                let Some(url) = config.store.url else {
                    return Err(UsageError(format!(
                        "{}: no [store] url; add one there, or give --store URL instead of -c",
                        path.display()
                    ))
                    .into());
                };
                (
                    url,
                    config.store.retention,
                    format!("from {}", path.display()),
                )
            }
            (None, Some(url)) => (url.clone(), None, "from --store".to_owned()),
            (None, None) => (
                DEFAULT_STORE.to_owned(),
                None,
                "the default; give --store URL or -c FILE to name another".to_owned(),
            ),
        };
        match SqlStore::open_existing(&url).await {
            Ok(store) => Ok((store, retention)),
            Err(e @ StoreError::InvalidUrl { .. }) => {
                Err(UsageError(format!("{e} (the store {origin})")).into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// `backstop failed ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum FailedCommand {
    /// List stored messages, newest first.
    List {
        /// Only this status.
        #[arg(long, value_parser = status_parser())]
        status: Option<Status>,
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// At most this many (1 or more).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show one message, its payload (pretty-printed when JSON) and its audit history.
    Show {
        /// The row id.
        id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The groups of unfinished rows by cause (queue, error kind, error text
    /// with numbers and ids masked), largest first.
    Groups {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Re-drive messages at the next scan. A finished row (resolved,
    /// discarded, replayed) needs --force.
    Retry {
        /// Row ids.
        #[arg(required_unless_present_any = ["all", "group"], conflicts_with_all = ["all", "group"])]
        ids: Vec<i64>,
        /// Every unfinished row of this failure group (`failed groups`), in
        /// batches, with a progress bar; Ctrl-C stops between two batches.
        #[arg(long, value_name = "ID", conflicts_with_all = ["all", "force"], requires = "note")]
        group: Option<String>,
        /// Why, in each row's audit entry (required with --group).
        #[arg(long)]
        note: Option<String>,
        /// Every row that needs review (of --queue, if given).
        #[arg(long)]
        all: bool,
        /// With --all: only this queue.
        #[arg(long, requires = "all")]
        queue: Option<String>,
        /// Also re-open finished rows (resolved, discarded, replayed); the
        /// audit records `force_retry`.
        #[arg(long, conflicts_with = "all")]
        force: bool,
        /// Who does it (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Mark a message as handled by hand.
    Resolve {
        /// The row id.
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        id: Option<i64>,
        /// Every unfinished row of this failure group, in batches.
        #[arg(long, value_name = "ID")]
        group: Option<String>,
        /// What was done.
        #[arg(long)]
        note: String,
        /// Who did it (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Give a message up.
    Discard {
        /// The row id.
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        id: Option<i64>,
        /// Every unfinished row of this failure group, in batches.
        #[arg(long, value_name = "ID")]
        group: Option<String>,
        /// Why.
        #[arg(long, alias = "note")]
        reason: String,
        /// Who did it (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete finished rows (resolved, discarded, replayed) older than a duration.
    Purge {
        /// For example `30d`; defaults to the file's [store] retention.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// Only rows of this queue.
        #[arg(long)]
        queue: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `--status`: one of the statuses, which clap lists in `--help` and in
/// its error for any other word.
fn status_parser() -> impl clap::builder::TypedValueParser<Value = Status> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new([
        "pending",
        "retrying",
        "needs_review",
        "resolved",
        "discarded",
        "replayed",
    ])
    .try_map(|text| text.parse::<Status>())
}

fn actor(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("USER").ok())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn rfc3339(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A row as the CLI prints it.
#[derive(Debug, Serialize)]
struct Shown {
    id: i64,
    queue: String,
    status: Status,
    attempts: i64,
    redrives: i64,
    occurrences: i64,
    fingerprint: String,
    error: String,
    error_kind: String,
    exchange: String,
    routing_key: String,
    message_id: Option<String>,
    dedup_key: Option<String>,
    created_at: String,
    updated_at: String,
    next_attempt_at: String,
    payload: String,
    payload_encoding: &'static str,
    headers: serde_json::Value,
    properties: serde_json::Value,
}

impl From<&FailedRow> for Shown {
    fn from(row: &FailedRow) -> Self {
        let (payload, payload_encoding) = match std::str::from_utf8(&row.payload) {
            Ok(text) => (text.to_owned(), "utf8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&row.payload),
                "base64",
            ),
        };
        Shown {
            id: row.id,
            queue: row.queue.clone(),
            status: row.status,
            attempts: row.attempts,
            redrives: row.redrives,
            occurrences: row.occurrences,
            fingerprint: row.fingerprint.clone(),
            error: row.error.clone(),
            error_kind: row.error_kind.clone(),
            exchange: row.exchange.clone(),
            routing_key: row.routing_key.clone(),
            message_id: row.message_id.clone(),
            dedup_key: row.dedup_key.clone(),
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
            next_attempt_at: rfc3339(row.next_attempt_at),
            payload,
            payload_encoding,
            headers: serde_json::from_str(&row.headers).unwrap_or(serde_json::Value::Null),
            properties: serde_json::from_str(&row.properties).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// An audit entry as the CLI prints it.
#[derive(Debug, Serialize)]
struct ShownAudit {
    at: String,
    actor: String,
    action: String,
    note: Option<String>,
}

impl From<&AuditEntry> for ShownAudit {
    fn from(a: &AuditEntry) -> Self {
        ShownAudit {
            at: rfc3339(a.at),
            actor: a.actor.clone(),
            action: a.action.clone(),
            note: a.note.clone(),
        }
    }
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    table
}

fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max).collect();
        format!("{cut}…")
    }
}

pub(crate) async fn run(command: FailedCommand) -> anyhow::Result<ExitCode> {
    match command {
        FailedCommand::List {
            status,
            queue,
            limit,
            json,
            store,
        } => {
            let (store, _) = store.open().await?;
            let rows = store
                .list(&ListFilter {
                    status,
                    queue,
                    limit: limit.map(i64::from),
                })
                .await?;
            if json {
                let shown: Vec<Shown> = rows.iter().map(Shown::from).collect();
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                let mut t = table(&[
                    "id",
                    "queue",
                    "status",
                    "attempts",
                    "seen",
                    "error",
                    "message id",
                    "created",
                ]);
                for r in &rows {
                    t.add_row([
                        r.id.to_string(),
                        r.queue.clone(),
                        r.status.to_string(),
                        r.attempts.to_string(),
                        r.occurrences.to_string(),
                        short(&r.error, 60),
                        r.message_id.clone().unwrap_or_else(|| "-".into()),
                        rfc3339(r.created_at),
                    ]);
                }
                println!("{t}");
                eprintln!("rows={}", rows.len());
            }
        }
        FailedCommand::Show { id, json, store } => {
            let (store, _) = store.open().await?;
            let row = store.get(id).await?;
            let audit = store.audit(id).await?;
            let shown = Shown::from(&row);
            let history: Vec<ShownAudit> = audit.iter().map(ShownAudit::from).collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "row": shown, "audit": history })
                    )?
                );
            } else {
                let mut t = table(&["field", "value"]);
                for (k, v) in [
                    ("id", shown.id.to_string()),
                    ("queue", shown.queue.clone()),
                    ("status", shown.status.to_string()),
                    ("attempts", shown.attempts.to_string()),
                    ("re-drives", shown.redrives.to_string()),
                    ("occurrences", shown.occurrences.to_string()),
                    ("fingerprint", shown.fingerprint.clone()),
                    ("error", shown.error.clone()),
                    ("error kind", shown.error_kind.clone()),
                    ("from", format!("{}:{}", shown.exchange, shown.routing_key)),
                    ("message id", shown.message_id.clone().unwrap_or_default()),
                    ("dedup key", shown.dedup_key.clone().unwrap_or_default()),
                    ("created", shown.created_at.clone()),
                    ("updated", shown.updated_at.clone()),
                    ("next attempt", shown.next_attempt_at.clone()),
                ] {
                    t.add_row([k.to_owned(), v]);
                }
                println!("{t}");
                let payload = match serde_json::from_slice::<serde_json::Value>(&row.payload) {
                    Ok(value) => serde_json::to_string_pretty(&value)?,
                    Err(_) if shown.payload_encoding == "utf8" => shown.payload.clone(),
                    Err(_) => format!("(base64) {}", shown.payload),
                };
                println!("payload:\n{payload}");
                let mut h = table(&["when", "actor", "action", "note"]);
                for a in &history {
                    h.add_row([
                        a.at.clone(),
                        a.actor.clone(),
                        a.action.clone(),
                        a.note.clone().unwrap_or_default(),
                    ]);
                }
                println!("history:\n{h}");
            }
        }
        FailedCommand::Groups { queue, json, store } => {
            let (store, _) = store.open().await?;
            let groups = store.groups(queue.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&groups)?);
            } else {
                let mut t = table(&[
                    "id",
                    "queue",
                    "kind",
                    "cause",
                    "count",
                    "first seen",
                    "last seen",
                    "sample id",
                ]);
                for g in &groups {
                    t.add_row([
                        g.id.clone(),
                        g.key.queue.clone(),
                        g.key.error_kind.clone(),
                        short(&g.key.cause, 60),
                        g.count.to_string(),
                        rfc3339(g.first_seen),
                        rfc3339(g.last_seen),
                        g.sample_id.to_string(),
                    ]);
                }
                println!("{t}");
                eprintln!("groups={}", groups.len());
            }
        }
        FailedCommand::Retry {
            group: Some(group),
            note,
            actor: who,
            store,
            ..
        } => {
            return act_on_group(&store, &group, ManualAction::Retry, who, note).await;
        }
        FailedCommand::Retry {
            ids,
            all,
            queue,
            force,
            note,
            actor: who,
            store,
            group: None,
        } => {
            let (store, _) = store.open().await?;
            let ids = if all {
                store
                    .list(&ListFilter {
                        status: Some(Status::NeedsReview),
                        queue,
                        limit: None,
                    })
                    .await?
                    .into_iter()
                    .map(|r| r.id)
                    .collect()
            } else {
                ids
            };
            let who = actor(who);
            let action = if force {
                ManualAction::ForceRetry
            } else {
                ManualAction::Retry
            };
            let (mut refused, mut failed) = (0, 0);
            for id in &ids {
                match store.act(*id, action, &who, note.as_deref()).await {
                    Ok(_) => {}
                    Err(e @ StoreError::InvalidTransition { status, .. })
                        if status.is_finished() && !force =>
                    {
                        eprintln!("row {id}: {e}; --force re-opens a finished row");
                        refused += 1;
                    }
                    Err(e) if !e.is_transient() => {
                        eprintln!("row {id}: {e}");
                        refused += 1;
                    }
                    Err(e) => {
                        eprintln!("row {id}: {e}");
                        failed += 1;
                    }
                }
            }
            println!(
                "retried={} failed={}",
                ids.len() - refused - failed,
                refused + failed
            );
            // A store that failed us is a runtime failure; rows the
            // request did not fit are a usage error.
            if failed > 0 {
                return Ok(ExitCode::from(1));
            }
            if refused > 0 {
                return Ok(ExitCode::from(2));
            }
        }
        FailedCommand::Resolve {
            id,
            group,
            note,
            actor: who,
            store,
        } => return close(&store, id, group, ManualAction::Resolve, who, note).await,
        FailedCommand::Discard {
            id,
            group,
            reason,
            actor: who,
            store,
        } => return close(&store, id, group, ManualAction::Discard, who, reason).await,
        FailedCommand::Purge {
            older_than,
            queue,
            store,
        } => {
            let (store, retention) = store.open().await?;
            let Some(age) = older_than.or(retention) else {
                return Err(UsageError(
                    "give --older-than DURATION or a [store] retention in the config file".into(),
                )
                .into());
            };
            let before = backstop::retry::now_ms() as i64 - age.as_millis() as i64;
            let removed = store.purge_finished(before, queue.as_deref()).await?;
            println!("removed={removed}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves or discards one row (or a whole group), with its audit entry.
async fn close(
    store: &StoreArgs,
    id: Option<i64>,
    group: Option<String>,
    action: ManualAction,
    who: Option<String>,
    note: String,
) -> anyhow::Result<ExitCode> {
    match (id, group) {
        (_, Some(group)) => act_on_group(store, &group, action, who, Some(note)).await,
        (Some(id), None) => {
            let (store, _) = store.open().await?;
            let row = store.act(id, action, &actor(who), Some(&note)).await?;
            println!("row {} is {}", row.id, row.status);
            Ok(ExitCode::SUCCESS)
        }
        // clap requires one of them.
        (None, None) => Err(UsageError("give a row id or --group ID".into()).into()),
    }
}

/// Runs `action` on every unfinished row of group `id` in batches, with a
/// progress bar; Ctrl-C stops it between two batches (each one whole).
async fn act_on_group(
    store: &StoreArgs,
    id: &str,
    action: ManualAction,
    who: Option<String>,
    note: Option<String>,
) -> anyhow::Result<ExitCode> {
    let (store, _) = store.open().await?;
    let Some(group) = store.group(id).await? else {
        return Err(UsageError(format!(
            "no failure group {id} with unfinished rows (see `backstop failed groups`)"
        ))
        .into());
    };
    let progress = GroupProgress::new();
    let job = GroupJob {
        key: group.key.clone(),
        action,
        actor: actor(who),
        note,
        batch: 1000,
    };
    let task = {
        let store = store.clone();
        let progress = progress.clone();
        tokio::spawn(async move { job.run(&store, progress).await })
    };
    let bar = crate::ui::progress(group.count.max(0) as u64, action.as_str());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    while !task.is_finished() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut interrupt, if !progress.is_cancelled() => {
                eprintln!("stopping after the current batch");
                progress.cancel();
            }
        }
        let (total, done, skipped) = progress.snapshot();
        bar.set_length(total.max(1));
        bar.set_position(done + skipped);
    }
    bar.finish_and_clear();
    let totals = task.await??;
    println!(
        "group={} action={} acted={} skipped={} cancelled={}",
        group.id,
        action.as_str(),
        totals.acted,
        totals.skipped,
        totals.cancelled
    );
    Ok(if totals.cancelled {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
