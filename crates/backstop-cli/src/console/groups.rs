//! Failure groups and their bulk actions: the landing page's groups, a
//! group's page with its rows and action form, and the job that acts on
//! the whole group in batches (a tokio task running
//! [`run_group_action`]), with a progress page that refreshes itself
//! (no JavaScript) and a cancel button. Cancelling stops between two
//! batches; every batch is committed whole.

use super::auth::Operator;
use super::pages::{self, csrf_field, time};
use super::{Page, PageError, Shared, note_of, parse_action, render};
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use backstop::store::{
    FailureGroup, GroupBatchTotals, GroupKey, GroupProgress, ManualAction, SqlStore,
    run_group_action,
};
use maud::{Markup, html};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Rows per transaction of a group action.
const BATCH: i64 = 500;
/// Rows of a group shown on its page.
const GROUP_ROWS_SHOWN: i64 = 200;

/// A group action under way or done.
pub(crate) struct Job {
    id: u64,
    group: FailureGroup,
    action: ManualAction,
    actor: String,
    note: Option<String>,
    started_at: i64,
    progress: Arc<GroupProgress>,
    outcome: Mutex<Option<Result<GroupBatchTotals, String>>>,
    /// When it ended (its outcome set).
    finished_at: OnceLock<Instant>,
    /// Who cancelled it, named again in its closing audit entry.
    cancelled_by: OnceLock<String>,
}

/// A finished job's page stays this long after it ends.
const FINISHED_KEPT_FOR: Duration = Duration::from_secs(3600);
/// At most this many finished jobs are kept (the latest to finish).
const FINISHED_KEPT: usize = 200;

/// The finished jobs to forget, of `finished` (id, when it ended): those
/// that ended more than `kept_for` before `now`, then the earliest to end
/// past the latest `kept`. Running jobs are never in `finished`, so never
/// forgotten.
fn to_forget(
    mut finished: Vec<(u64, Instant)>,
    now: Instant,
    kept_for: Duration,
    kept: usize,
) -> Vec<u64> {
    // Latest to end first.
    finished.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    finished
        .into_iter()
        .enumerate()
        .filter(|(rank, (_, ended))| {
            *rank >= kept || now.saturating_duration_since(*ended) > kept_for
        })
        .map(|(_, (id, _))| id)
        .collect()
}

/// The jobs of this process: group actions and DLQ replays, numbered
/// together. Running jobs are kept until they end; finished ones for
/// [`FINISHED_KEPT_FOR`], at most [`FINISHED_KEPT`] of them (forgotten
/// when a new job starts); their ends stay in the console's audit.
#[derive(Default)]
pub(crate) struct Jobs {
    next: AtomicU64,
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
    pub(super) replays: Mutex<HashMap<u64, Arc<super::dlq::ReplayJob>>>,
}

impl Jobs {
    /// Forgets the finished jobs past [`FINISHED_KEPT_FOR`] or
    /// [`FINISHED_KEPT`].
    pub(super) fn prune(&self) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut replays = self.replays.lock().unwrap_or_else(|e| e.into_inner());
        let finished = jobs
            .values()
            .filter_map(|j| j.finished_at.get().map(|at| (j.id, *at)))
            .chain(
                replays
                    .values()
                    .filter_map(|j| j.finished_at.get().map(|at| (j.id, *at))),
            )
            .collect();
        for id in to_forget(finished, Instant::now(), FINISHED_KEPT_FOR, FINISHED_KEPT) {
            jobs.remove(&id);
            replays.remove(&id);
        }
    }

    /// A new job id.
    pub(super) fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The DLQ replay job `id`, if it is one.
    fn replay(&self, id: u64) -> Option<Arc<super::dlq::ReplayJob>> {
        self.replays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    fn get(&self, id: u64) -> Result<Arc<Job>, PageError> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| PageError::new(StatusCode::NOT_FOUND, "no such job"))
    }

    /// Starts acting on `group` in a task of its own.
    fn start(
        &self,
        store: SqlStore,
        group: FailureGroup,
        action: ManualAction,
        actor: String,
        note: Option<String>,
    ) -> Arc<Job> {
        let id = self.next_id();
        let job = Arc::new(Job {
            id,
            group,
            action,
            actor,
            note,
            started_at: backstop::retry::now_ms() as i64,
            progress: GroupProgress::new(),
            outcome: Mutex::new(None),
            finished_at: OnceLock::new(),
            cancelled_by: OnceLock::new(),
        });
        self.prune();
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, job.clone());
        let running = job.clone();
        tokio::spawn(async move {
            let key: GroupKey = running.group.key.clone();
            let result = run_group_action(
                &store,
                key,
                running.action,
                running.actor.clone(),
                running.note.clone(),
                BATCH,
                running.progress.clone(),
            )
            .await;
            let end = match &result {
                Ok(totals) => format!(
                    "acted={} skipped={} cancelled={}{}",
                    totals.acted,
                    totals.skipped,
                    totals.cancelled,
                    cancelled_by(&running.cancelled_by)
                ),
                Err(e) => format!("failed: {e}{}", cancelled_by(&running.cancelled_by)),
            };
            if let Err(e) = store
                .record_console_action(
                    &running.actor,
                    "group_job_end",
                    &format!("job {} group {}", running.id, running.group.id),
                    Some(&end),
                )
                .await
            {
                warn!(job = running.id, error = %e, "the console audit of a group job's end failed");
            }
            match &result {
                Ok(totals) => info!(
                    job = running.id,
                    group = %running.group.id,
                    action = running.action.as_str(),
                    actor = %running.actor,
                    acted = totals.acted,
                    skipped = totals.skipped,
                    cancelled = totals.cancelled,
                    "console group action ended"
                ),
                Err(e) => warn!(job = running.id, error = %e, "console group action failed"),
            }
            *running.outcome.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(result.map_err(|e| e.to_string()));
            let _ = running.finished_at.set(Instant::now());
        });
        job
    }
}

/// The groups table of the landing page.
pub(crate) fn groups_table(groups: &[FailureGroup]) -> Markup {
    html! {
        table id="groups" {
            thead { tr {
                th { "queue" } th { "kind" } th { "cause" } th.num { "rows" }
                th { "by status" } th { "first seen" } th { "last seen" } th { "sample" }
            } }
            tbody {
                @for g in groups {
                    tr.group data-group-id=(g.id) {
                        td.cell { (render::inert(&g.key.queue)) }
                        td { (render::inert(&g.key.error_kind)) }
                        td.cell { a href={ "/groups/" (g.id) } { (render::inert(&g.key.cause)) } }
                        td.num.count { (g.count) }
                        td { @for (s, n) in &g.by_status { span.badge { (s.as_str()) " " (n) } " " } }
                        td { (time(g.first_seen)) }
                        td { (time(g.last_seen)) }
                        td.cell {
                            a href={ "/rows/" (g.sample_id) } { "#" (g.sample_id) }
                            " " span.note { (render::inert(render::cut(&g.sample_error, 200).0)) }
                        }
                    }
                }
                @if groups.is_empty() {
                    tr { td colspan="8" .note { "No unfinished rows: nothing to review." } }
                }
            }
        }
    }
}

/// `/groups/{id}`.
pub(crate) async fn group(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Page {
    let store = console.store()?;
    let group = store.group(&id).await?.ok_or_else(|| {
        PageError::new(
            StatusCode::NOT_FOUND,
            "no group with unfinished rows has this id",
        )
    })?;
    let rows = store.group_rows(&group.key, 0, GROUP_ROWS_SHOWN).await?;
    let body = html! {
        h1 { "Group " (group.id) }
        (pages::pairs("group-meta", &[
            ("queue".into(), render::inert(&group.key.queue)),
            ("error kind".into(), render::inert(&group.key.error_kind)),
            ("cause".into(), render::inert(&group.key.cause)),
            ("unfinished rows".into(), group.count.to_string()),
            ("first seen".into(), time(group.first_seen)),
            ("last seen".into(), time(group.last_seen)),
            ("sample error".into(), render::inert(render::cut(&group.sample_error, 4096).0)),
        ]))
        h2 { "Act on all " (group.count) " rows" }
        form.action method="post" action={ "/groups/" (group.id) "/action" } id="group-action" {
            (csrf_field(&op))
            label for="group-action-select" { "Action" }
            select id="group-action-select" name="action" {
                option value="retry" { "retry (re-drive every row at the next scan)" }
                option value="discard" { "discard (give them up)" }
                option value="resolve" { "resolve (handled by hand)" }
            }
            label for="group-action-note" { "Note (required for every action, retry included; recorded on every row)" }
            textarea id="group-action-note" name="note" required {}
            p.note { "Runs in batches of " (BATCH) " rows, each committed whole; rows that arrive after the start are left alone; it can be cancelled between batches." }
            p { button type="submit" id="group-action-submit" { "Apply to the group" } }
        }
        h2 { "Rows" @if group.count > GROUP_ROWS_SHOWN { " (the first " (GROUP_ROWS_SHOWN) ")" } }
        (pages::row_table(&rows, "group-rows"))
    };
    Ok(pages::layout(
        &format!("Group {}", group.id),
        Some(&op),
        body,
    ))
}

/// The form of a group action.
#[derive(Deserialize)]
pub(crate) struct GroupActionForm {
    action: String,
    #[serde(default)]
    note: String,
}

/// `POST /groups/{id}/action`: starts the job, then shows its page.
pub(crate) async fn group_action(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    axum::Form(form): axum::Form<GroupActionForm>,
) -> Result<Response, PageError> {
    let store = console.store()?.clone();
    let (action, _) = parse_action(&form.action)?;
    if action == ManualAction::ForceRetry {
        return Err(PageError::bad_request(
            "a group holds unfinished rows only: use retry",
        ));
    }
    // Every group action, retry included, says why.
    let note = note_of(&form.note, true)?.map(str::to_owned);
    let group = store.group(&id).await?.ok_or_else(|| {
        PageError::new(
            StatusCode::NOT_FOUND,
            "no group with unfinished rows has this id",
        )
    })?;
    console
        .audit(
            &op,
            "group_job_start",
            &format!("group {}", group.id),
            &format!(
                "action={} rows={} queue={} kind={} cause={} note={}",
                action.as_str(),
                group.count,
                group.key.queue,
                group.key.error_kind,
                group.key.cause,
                note.as_deref().unwrap_or("")
            ),
        )
        .await?;
    info!(group = %group.id, action = action.as_str(), actor = %op.actor(), "console group action started");
    let job = console.jobs.start(store, group, action, op.actor(), note);
    Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
}

/// `/jobs/{id}`: progress, refreshed every second until it ends.
pub(crate) async fn job(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<u64>,
) -> Result<Response, PageError> {
    if let Some(replay) = console.jobs.replay(id) {
        return Ok(super::dlq::job_page(&replay, &op).into_response());
    }
    let job = console.jobs.get(id)?;
    let (total, done, skipped) = job.progress.snapshot();
    let outcome = job
        .outcome
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (status, error) = match &outcome {
        None if job.progress.is_cancelled() => ("cancelling", None),
        None => ("running", None),
        Some(Ok(t)) if t.cancelled => ("cancelled", None),
        Some(Ok(_)) => ("finished", None),
        Some(Err(e)) => ("failed", Some(e.clone())),
    };
    let body = html! {
        h1 { "Job " (job.id) ": " (job.action.as_str()) " group " a href={ "/groups/" (job.group.id) } { (job.group.id) } }
        (pages::pairs("job-meta", &[
            ("queue".into(), render::inert(&job.group.key.queue)),
            ("cause".into(), render::inert(&job.group.key.cause)),
            ("actor".into(), render::inert(&job.actor)),
            ("note".into(), render::inert(job.note.as_deref().unwrap_or(""))),
            ("started".into(), time(job.started_at)),
        ]))
        p { "Status: " strong id="job-status" class=(status) { (status) } }
        p {
            progress id="job-progress" max=(total.max(1)) value=(done + skipped) {}
            " " span id="job-done" { (done) } " of " span id="job-total" { (total) } " rows done"
            @if skipped > 0 { ", " span id="job-skipped" { (skipped) } " skipped (a scanner held them)" }
        }
        @if let Some(e) = error { p.error { (e) } }
        @if outcome.is_none() {
            form method="post" action={ "/jobs/" (job.id) "/cancel" } id="job-cancel" {
                (csrf_field(&op))
                button.danger type="submit" id="job-cancel-submit" { "Cancel (stops after the current batch)" }
            }
        } @else {
            p { a href="/" { "Back to the groups" } }
        }
    };
    // Refreshed without JavaScript while it runs (the CSP allows no
    // inline script).
    let refresh = outcome.is_none().then_some(1);
    Ok(
        pages::layout_refreshing(&format!("Job {}", job.id), Some(&op), refresh, body)
            .into_response(),
    )
}

/// `POST /jobs/{id}/cancel`.
pub(crate) async fn cancel_job(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<u64>,
) -> Result<Response, PageError> {
    // A cancel takes effect before its audit entry is written, unlike
    // every other action here: it only stops a job, and the job's own
    // closing entry records that it was cancelled, and by whom. Written
    // first, the entry waited on SQLite for the write lock that the job's
    // batches hold back to back, and the cancel landed after the job had
    // ended (or, past the busy timeout, not at all).
    let (action, target) = if let Some(replay) = console.jobs.replay(id) {
        let _ = replay.cancelled_by.set(op.actor());
        replay.cancel.store(true, Ordering::Release);
        info!(job = id, actor = %op.actor(), "console DLQ replay cancelled");
        (
            "dlq_replay_cancel",
            format!("job {id} queue {}", replay.queue),
        )
    } else {
        let job = console.jobs.get(id)?;
        let _ = job.cancelled_by.set(op.actor());
        job.progress.cancel();
        info!(job = id, actor = %op.actor(), "console group action cancelled");
        (
            "group_job_cancel",
            format!("job {id} group {}", job.group.id),
        )
    };
    console.audit(&op, action, &target, "").await.map_err(|e| {
        warn!(job = id, error = %e.message, "the console audit of a cancel failed");
        PageError::new(
            e.status,
            format!(
                "the cancel is applied (a running job stops before its next batch or \
                 publish), but its audit entry was not written: {}",
                e.message
            ),
        )
    })?;
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

/// ` cancelled_by=<actor>` once a job was cancelled, for its closing entry.
pub(super) fn cancelled_by(by: &OnceLock<String>) -> String {
    by.get()
        .map(|actor| format!(" cancelled_by={actor}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(mut forgotten: Vec<u64>) -> Vec<u64> {
        forgotten.sort_unstable();
        forgotten
    }

    #[test]
    fn finished_jobs_are_forgotten_after_their_time_or_past_the_cap() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let hour = Duration::from_secs(3600);
        let ago = |s: u64| now - Duration::from_secs(s);
        // Within the hour and under the cap: all kept.
        let finished = vec![(1, ago(10)), (2, ago(3599)), (3, ago(0))];
        assert!(to_forget(finished, now, hour, 200).is_empty());
        // Ended more than an hour ago: forgotten.
        let finished = vec![(1, ago(3601)), (2, ago(5)), (3, ago(7200))];
        assert_eq!(ids(to_forget(finished, now, hour, 200)), [1, 3]);
        // Past the cap: the earliest to end go, whatever their id.
        let finished = vec![(1, ago(1)), (2, ago(50)), (3, ago(30)), (4, ago(40))];
        assert_eq!(ids(to_forget(finished, now, hour, 2)), [2, 4]);
        // 250 finished within the hour: the 50 that ended first go.
        let finished: Vec<(u64, Instant)> = (0..250).map(|i| (i, ago(1000 - i))).collect();
        assert_eq!(
            ids(to_forget(finished, now, hour, 200)),
            (0..50).collect::<Vec<_>>()
        );
        // None finished: nothing to forget (running jobs are never listed).
        assert!(to_forget(Vec::new(), now, hour, 0).is_empty());
    }
}
