//! The dead-letter queues of the configured consumers: their depths, a
//! peek (basic.get without ack, requeued in order: nothing moves), a
//! filtered replay (a dry run first, then the real one with the same
//! filters, each message published with a confirm before it is acked) and
//! a purge by age with a confirm step. Only the configured DLQs are
//! reachable.

use super::auth::{self, Csrf, Operator};
use super::pages::{self, csrf_field};
use super::{Page, PageError, Shared, render};
use crate::dlq::{self, DlqFilter, DlqMessage, ReplayOptions, ReplayProgress, ReplayReport};
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Messages a peek shows.
const PEEKED: u64 = 100;
/// What the console keeps of the messages it lists (a peek, a dry run's
/// would-move list): the first 100, the first 64 KiB of each body. The
/// counts stay exact.
const KEEP: dlq::Keep = dlq::Keep {
    messages: 100,
    body_bytes: 64 * 1024,
};
/// Entries of the console's audit shown on `/dlq`.
const AUDIT_SHOWN: i64 = 50;
/// How long a dry run can be confirmed.
const DRY_RUN_KEPT_FOR: Duration = Duration::from_secs(15 * 60);
/// The most dry runs waiting for a confirm at once (the oldest is forgotten
/// first).
const DRY_RUNS_KEPT: usize = 100;

/// The replay dry runs waiting for their confirm, each under a random
/// one-time id: the confirm form carries only that id, and starting the
/// replay takes the dry run out, so a form sent twice (a double click, the
/// Back button) or edited starts one replay at most, with the dry run's
/// own options.
#[derive(Default)]
pub(crate) struct DryRuns(Mutex<HashMap<String, DryRun>>);

/// A dry run, kept for its confirm.
struct DryRun {
    queue: String,
    actor: String,
    csrf: Csrf,
    /// Its filters as typed ([`ReplayForm::fingerprint`]).
    filters: String,
    /// The replay's options: the dry run's resolved times, bound to the
    /// dry run's start, at most the count it selected.
    options: ReplayOptions,
    created: Instant,
}

impl DryRuns {
    /// Keeps `run` and answers its id.
    fn keep(&self, run: DryRun) -> Result<String, PageError> {
        let id = auth::random_token()
            .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        let mut runs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        runs.retain(|_, r| r.created.elapsed() < DRY_RUN_KEPT_FOR);
        while runs.len() >= DRY_RUNS_KEPT {
            let oldest = runs
                .iter()
                .min_by_key(|(_, r)| r.created)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(oldest) => runs.remove(&oldest),
                None => break,
            };
        }
        runs.insert(id.clone(), run);
        Ok(id)
    }

    /// Takes out dry run `id` of `op` on `queue` with `filters`: once.
    /// Other filters than the dry run's leave it where it is.
    fn take(
        &self,
        id: &str,
        queue: &str,
        op: &Operator,
        filters: &str,
    ) -> Result<DryRun, PageError> {
        let mut runs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let used = || {
            PageError::new(
                StatusCode::CONFLICT,
                "this dry run was already used (or has expired): run the dry run again",
            )
        };
        let run = runs.get(id).ok_or_else(used)?;
        if run.queue != queue || run.actor != op.actor() || run.csrf != op.csrf {
            return Err(used());
        }
        if run.filters != filters {
            return Err(PageError::bad_request(
                "a replay follows a dry run of the same filters: run the dry run again",
            ));
        }
        let run = runs.remove(id).ok_or_else(used)?;
        if run.created.elapsed() >= DRY_RUN_KEPT_FOR {
            return Err(used());
        }
        Ok(run)
    }
}

/// The bounds a replay resolved: audited when it starts, shown on its page.
fn bounds(options: &ReplayOptions) -> String {
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    format!(
        "since_ms={} until_ms={} parked_before_ms={} at_most={} rate={}",
        ms(options.filter.since_ms),
        ms(options.filter.until_ms),
        ms(options.filter.parked_before_ms),
        ms(options.limit),
        ms(options.rate_per_sec.map(u64::from))
    )
}

/// A DLQ replay running in a task of its own (not in the request), with a
/// progress page and a cancel button: a cancel stops it before its next
/// publish, and every message not moved is requeued when its channel closes.
pub(crate) struct ReplayJob {
    pub(super) id: u64,
    pub(super) queue: String,
    filters: String,
    /// The resolved bounds ([`bounds`]).
    bounds: String,
    actor: String,
    started_at: i64,
    pub(super) cancel: Arc<AtomicBool>,
    progress: Arc<Mutex<ReplayProgress>>,
    outcome: Mutex<Option<Result<ReplayReport, String>>>,
    /// When it ended (its outcome set): finished jobs are dropped after a while.
    pub(super) finished_at: std::sync::OnceLock<std::time::Instant>,
    /// Who cancelled it, named again in its closing audit entry.
    pub(super) cancelled_by: std::sync::OnceLock<String>,
}

impl ReplayJob {
    /// Starts replaying `queue` with `options` in a task; its end is audited.
    fn start(
        console: &Shared,
        queue: String,
        filters: String,
        actor: String,
        mut options: ReplayOptions,
    ) -> Arc<ReplayJob> {
        let cancel = Arc::new(AtomicBool::new(false));
        options.cancel = Some(cancel.clone());
        let job = Arc::new(ReplayJob {
            id: console.jobs.next_id(),
            queue,
            filters,
            bounds: bounds(&options),
            actor,
            started_at: backstop::retry::now_ms() as i64,
            cancel,
            progress: Arc::new(Mutex::new(ReplayProgress::default())),
            outcome: Mutex::new(None),
            finished_at: std::sync::OnceLock::new(),
            cancelled_by: std::sync::OnceLock::new(),
        });
        console.jobs.prune();
        console
            .jobs
            .replays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id, job.clone());
        let running = job.clone();
        let console = console.clone();
        tokio::spawn(async move {
            let progress = running.progress.clone();
            let report = dlq::replay(&console.broker, &running.queue, &options, &move |p| {
                *progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
            })
            .await;
            // A replay that fails partway has moved some messages for
            // good: its count is audited with the error.
            let by = super::groups::cancelled_by(&running.cancelled_by);
            let end = match &report {
                Ok(r) => format!(
                    "moved={} matched={} seen={} failed={} unknown={} cancelled={}{by}",
                    r.moved, r.matched, r.seen, r.failed, r.unknown, r.cancelled
                ),
                Err(p) => format!(
                    "failed after moved={} matched={} seen={} failed={} unknown={}{by}: {p}",
                    p.done.moved, p.done.matched, p.done.seen, p.done.failed, p.done.unknown
                ),
            };
            info!(job = running.id, queue = %running.queue, actor = %running.actor, result = %end, "console DLQ replay ended");
            if let Some(store) = &console.store
                && let Err(e) = store
                    .record_console_action(
                        &running.actor,
                        "dlq_replay_end",
                        &format!("job {} queue {}", running.id, running.queue),
                        Some(&end),
                    )
                    .await
            {
                warn!(job = running.id, error = %e, "the console audit of a DLQ replay's end failed");
            }
            *running.outcome.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(report.map_err(|_| end));
            let _ = running.finished_at.set(std::time::Instant::now());
        });
        job
    }
}

/// `/jobs/{id}` of a DLQ replay: progress, refreshed every second until it
/// ends, then its result.
pub(crate) fn job_page(job: &ReplayJob, op: &Operator) -> Markup {
    let progress = *job.progress.lock().unwrap_or_else(|e| e.into_inner());
    let outcome = job
        .outcome
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let cancelling = job.cancel.load(Ordering::Acquire);
    let (status, error) = match &outcome {
        None if cancelling => ("cancelling", None),
        None => ("running", None),
        Some(Ok(r)) if r.cancelled => ("cancelled", None),
        Some(Ok(_)) => ("finished", None),
        Some(Err(e)) => ("failed", Some(e.clone())),
    };
    let body = html! {
        h1 { "Job " (job.id) ": replay " a href={ "/dlq/" (job.queue) } { (job.queue) } }
        (pages::pairs("job-meta", &[
            ("queue".into(), render::inert(&job.queue)),
            ("filters".into(), render::inert(&job.filters)),
            ("bounds".into(), render::inert(&job.bounds)),
            ("actor".into(), render::inert(&job.actor)),
            ("started".into(), pages::time(job.started_at)),
        ]))
        p { "Status: " strong id="job-status" class=(status) { (status) } }
        p {
            progress id="job-progress" max=(progress.depth.max(1)) value=(progress.seen) {}
            " " span id="job-done" { (progress.moved) } " moved; "
            (progress.seen) " of " span id="job-total" { (progress.depth) } " read, "
            (progress.matched) " selected"
        }
        @if let Some(e) = error { p.error { (render::inert(&e)) } }
        @if let Some(Ok(report)) = &outcome { (replay_result(report)) }
        @if outcome.is_none() {
            form method="post" action={ "/jobs/" (job.id) "/cancel" } id="job-cancel" {
                (csrf_field(op))
                button.danger type="submit" id="job-cancel-submit" { "Cancel (stops before the next publish; the rest stays in the DLQ)" }
            }
        } @else {
            p { a href={ "/dlq/" (job.queue) } { "Back to the queue" } }
        }
    };
    let refresh = outcome.is_none().then_some(1);
    pages::layout_refreshing(&format!("Job {}", job.id), Some(op), refresh, body)
}

/// The console's audit (DLQ actions, group jobs), newest first.
fn audit_table(actions: &[backstop::store::ConsoleAction]) -> Markup {
    html! {
        table id="console-audit" {
            thead { tr { th { "at" } th { "actor" } th { "action" } th { "target" } th { "detail" } } }
            tbody {
                @for a in actions {
                    tr.console-action {
                        td { (pages::time(a.at)) }
                        td { (render::inert(&a.actor)) }
                        td { (render::inert(&a.action)) }
                        td.cell { (render::inert(&a.target)) }
                        td.cell { (render::inert(render::cut(a.detail.as_deref().unwrap_or(""), 500).0)) }
                    }
                }
                @if actions.is_empty() {
                    tr { td colspan="5" .note { "No console action yet." } }
                }
            }
        }
    }
}

impl super::Console {
    /// `queue` when it is one of the configured DLQs.
    fn dlq(&self, queue: &str) -> Result<(), PageError> {
        if self.dlqs.iter().any(|q| q == queue) {
            Ok(())
        } else {
            Err(PageError::new(
                StatusCode::NOT_FOUND,
                "not a dead-letter queue of a configured consumer",
            ))
        }
    }
}

/// Runs a DLQ operation in a task of its own and waits for it: a client
/// hanging up (or the request timeout) drops the handler's future, not the
/// operation, which still ends and closes its channel (requeuing what it
/// took) and its connection.
async fn detached<T: Send + 'static>(
    operation: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::spawn(operation)
        .await
        .map_err(|e| anyhow::anyhow!("the DLQ operation's task failed: {e}"))?
}

fn broker_error(e: anyhow::Error) -> PageError {
    PageError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the broker: {e:#}"),
    )
}

/// `/dlq`.
pub(crate) async fn list(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
) -> Page {
    let depths = {
        let console = console.clone();
        detached(async move { dlq::depths(&console.broker, &console.dlqs).await })
            .await
            .map_err(broker_error)?
    };
    let actions = match &console.store {
        Some(store) => Some(store.console_actions(AUDIT_SHOWN).await?),
        None => None,
    };
    let body = html! {
        h1 { "Dead-letter queues" }
        table id="dlqs" {
            thead { tr { th { "queue" } th.num { "messages" } } }
            tbody {
                @for d in &depths {
                    tr.dlq data-queue=(d.queue) {
                        td { a href={ "/dlq/" (d.queue) } { (d.queue) } }
                        td.num { @match d.depth { Some(n) => (n), None => span.note { "not declared yet" } } }
                    }
                }
                @if depths.is_empty() {
                    tr { td colspan="2" .note { "No [[consumer]] in the configuration: no dead-letter queue to show." } }
                }
            }
        }
        h2 { "Recent console actions" }
        @match &actions {
            Some(actions) => (audit_table(actions)),
            None => p.note id="console-audit" { "No [store] configured: console actions cannot be audited, so replays and purges are refused." },
        }
    };
    Ok(pages::layout("Dead-letter queues", Some(&op), body))
}

/// A table of DLQ messages, each with its body in a `<details>` (no
/// JavaScript needed).
fn messages(id: &str, messages: &[DlqMessage]) -> Markup {
    html! {
        table id=(id) {
            thead { tr {
                th.num { "#" } th { "message id" } th { "error" } th { "kind" } th.num { "attempts" }
                th { "failed in" } th { "dead-lettered" } th { "body" }
            } }
            tbody {
                @for m in messages {
                    tr.dlq-message data-position=(m.position) {
                        td.num { (m.position) }
                        td.cell { (render::inert(m.listed.message_id.as_deref().unwrap_or(""))) }
                        td.cell { (render::inert(render::cut(m.listed.error.as_deref().unwrap_or(""), 300).0)) }
                        td { (render::inert(m.listed.error_kind.as_deref().unwrap_or(""))) }
                        td.num { @if let Some(a) = m.listed.attempts { (a) } }
                        td.cell { (render::inert(m.listed.original_queue.as_deref().unwrap_or(""))) }
                        td { (m.listed.dead_lettered_at.as_deref().unwrap_or("")) }
                        td.cell {
                            details {
                                summary { (m.listed.body_bytes) " bytes"
                                    @if m.listed.body_truncated { " (the first " (m.body.len()) " kept)" } }
                                (pages::payload_view(&format!("dlq-payload-{}", m.position), &m.body))
                                (pages::pairs(&format!("dlq-headers-{}", m.position), &render::headers(&m.headers_json)))
                            }
                        }
                    }
                }
                @if messages.is_empty() {
                    tr { td colspan="8" .note { "No messages." } }
                }
            }
        }
    }
}

/// The replay filters as the form sends them.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct ReplayForm {
    #[serde(default)]
    error_contains: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    header: String,
    #[serde(default)]
    rate: String,
    /// `dry_run` or `replay`.
    #[serde(default)]
    mode: String,
    /// The id of the dry run this replay confirms ([`DryRuns`]).
    #[serde(default)]
    dry_run_id: String,
}

impl ReplayForm {
    /// The filters and rate, as one string: a real replay must carry the
    /// one of its dry run.
    fn fingerprint(&self) -> String {
        serde_json::json!([
            self.error_contains.trim(),
            self.since.trim(),
            self.until.trim(),
            self.header.trim(),
            self.rate.trim()
        ])
        .to_string()
    }

    /// The options of a dry run: the times resolved now, nothing dead-
    /// lettered at or after `started_ms` selected (its replay is bound the
    /// same way).
    fn dry_run_options(&self, started_ms: u64) -> Result<ReplayOptions, PageError> {
        let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let time = |s: &str| match some(s) {
            Some(t) => dlq::parse_time(&t)
                .map(Some)
                .map_err(PageError::bad_request),
            None => Ok(None),
        };
        let header = match some(&self.header) {
            Some(h) => Some(dlq::parse_header(&h).map_err(PageError::bad_request)?),
            None => None,
        };
        let rate = match some(&self.rate) {
            Some(r) => Some(r.parse::<u32>().ok().filter(|r| *r > 0).ok_or_else(|| {
                PageError::bad_request(
                    "the rate is a whole number of messages a second, at least 1",
                )
            })?),
            None => None,
        };
        Ok(ReplayOptions {
            filter: DlqFilter {
                error_contains: some(&self.error_contains),
                since_ms: time(&self.since)?,
                until_ms: time(&self.until)?,
                header,
                parked_before_ms: Some(started_ms),
            },
            limit: None,
            to: None,
            dry_run: true,
            rate_per_sec: rate,
            cancel: None,
            keep: KEEP,
        })
    }
}

/// The replay form; after a dry run (its id and report), it adds the
/// real replay button, bound to that dry run (kept on the server: its
/// filters, resolved times and the count it selected).
fn replay_form(
    queue: &str,
    form: &ReplayForm,
    op: &Operator,
    dry_run: Option<(&str, &ReplayReport)>,
) -> Markup {
    let after_dry_run = dry_run.is_some();
    html! {
        form.action method="post" action={ "/dlq/" (queue) "/replay" } id="replay-form" {
            (csrf_field(op))
            div.filters {
                div { label for="error_contains" { "Error contains" }
                      input type="text" id="error_contains" name="error_contains" value=(form.error_contains); }
                div { label for="since" { "Dead-lettered since (RFC 3339 or a duration ago: 2h)" }
                      input type="text" id="since" name="since" value=(form.since); }
                div { label for="until" { "Until" }
                      input type="text" id="until" name="until" value=(form.until); }
                div { label for="header" { "Header NAME=VALUE" }
                      input type="text" id="header" name="header" value=(form.header); }
                div { label for="rate" { "At most N a second (optional)" }
                      input type="number" id="rate" name="rate" min="1" value=(form.rate); }
            }
            @if let Some((id, _)) = dry_run {
                input type="hidden" name="dry_run_id" value=(id);
            }
            p {
                button.secondary type="submit" id="replay-dry-run" name="mode" value="dry_run" { "Dry run" }
                @if after_dry_run {
                    " "
                    button type="submit" id="replay-submit" name="mode" value="replay" { "Replay these" }
                    @if let Some((_, report)) = dry_run {
                        " " span.note { "Replays at most the " (report.matched) " selected here, once, with the times as this dry run resolved them; messages dead-lettered since stay." }
                    }
                } @else {
                    " " span.note { "A dry run comes first: it lists what would move, then offers the replay." }
                }
            }
        }
    }
}

fn purge_form(queue: &str, op: &Operator) -> Markup {
    html! {
        form.action method="post" action={ "/dlq/" (queue) "/purge" } id="purge-form" {
            (csrf_field(op))
            label for="older_than" { "Remove messages dead-lettered longer ago than (e.g. 30d, 12h)" }
            input type="text" id="older_than" name="older_than" required;
            p { button.danger type="submit" id="purge-submit" { "Purge…" } " " span.note { "You confirm on the next page, which shows the count." } }
        }
    }
}

/// `/dlq/{queue}`: a peek, the replay and purge forms.
pub(crate) async fn queue(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(queue): Path<String>,
) -> Page {
    console.dlq(&queue)?;
    let peek = {
        let (console, queue) = (console.clone(), queue.clone());
        detached(async move { dlq::peek(&console.broker, &queue, PEEKED, KEEP.body_bytes).await })
            .await
            .map_err(broker_error)?
    };
    let body = html! {
        h1 { "Dead letters: " (queue) }
        p id="dlq-depth" { (peek.depth) " message(s) in the queue." }
        p.note id="dlq-peek-note" {
            "Peeked with requeue, in queue order: the first " (peek.messages.len())
            " messages were read without ack and handed back where they were; nothing moved (the broker marks them redelivered)."
        }
        (messages("dlq-messages", &peek.messages))
        h2 { "Replay" }
        (replay_form(&queue, &ReplayForm::default(), &op, None))
        h2 { "Purge" }
        (purge_form(&queue, &op))
    };
    Ok(pages::layout(&format!("DLQ {queue}"), Some(&op), body))
}

fn replay_result(report: &ReplayReport) -> Markup {
    html! {
        div.box id="replay-result" data-dry-run=(report.dry_run) {
            @if report.dry_run {
                p { strong { "Dry run: " span id="replay-would-move" { (report.would_move_count) } " message(s) would move" }
                    " (read " (report.seen) ", selected " (report.matched) ", " (report.failed) " could not be moved). Nothing moved." }
                @if (report.would_move.len() as u64) < report.would_move_count {
                    p.note { "The first " (report.would_move.len()) " are listed." }
                }
                (messages("replay-would-move-list", &report.would_move))
            } @else {
                p { strong { "Replayed: " span id="replay-moved" { (report.moved) } " message(s) moved" }
                    " (read " (report.seen) ", selected " (report.matched) ", kept " (report.kept) ", failed " (report.failed)
                    ", unknown " span id="replay-unknown" { (report.unknown) } ")." }
                @if report.unknown > 0 {
                    p.error { (report.unknown) " message(s) may have been copied although they stay in the DLQ: possible duplicates, not losses." }
                }
            }
            @if !report.errors.is_empty() {
                ul.error { @for e in &report.errors { li { (render::inert(e)) } } }
            }
        }
    }
}

/// `POST /dlq/{queue}/replay`: a dry run (in the request: it moves
/// nothing), or the replay that follows one, started as a job (audited) and
/// answered with a redirect to its progress page.
pub(crate) async fn replay(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(queue): Path<String>,
    axum::Form(form): axum::Form<ReplayForm>,
) -> Result<Response, PageError> {
    console.dlq(&queue)?;
    if form.mode == "replay" {
        return start_replay(&console, &op, queue, &form).await;
    }
    let started_ms = backstop::retry::now_ms();
    let options = form.dry_run_options(started_ms)?;
    let report = {
        let (console, queue, options) = (console.clone(), queue.clone(), options.clone());
        // A dry run moves nothing: its error is the whole story.
        detached(async move {
            Ok(dlq::replay(&console.broker, &queue, &options, &|_| {})
                .await
                .map_err(|p| p.error))
        })
        .await
        .and_then(|r| r)
        .map_err(broker_error)?
    };
    info!(
        %queue,
        dry_run = true,
        matched = report.matched,
        actor = %op.actor(),
        filter = %form.fingerprint(),
        "console DLQ replay"
    );
    let id = console.dry_runs.keep(DryRun {
        queue: queue.clone(),
        actor: op.actor(),
        csrf: op.csrf.clone(),
        filters: form.fingerprint(),
        options: ReplayOptions {
            limit: Some(report.matched),
            dry_run: false,
            ..options
        },
        created: Instant::now(),
    })?;
    let body = html! {
        h1 { "Replay: " a href={ "/dlq/" (queue) } { (queue) } }
        (replay_result(&report))
        (replay_form(&queue, &form, &op, Some((&id, &report))))
    };
    Ok(pages::layout(&format!("Replay {queue}"), Some(&op), body).into_response())
}

/// The replay that confirms a dry run: takes the dry run out (once),
/// audits the bounds it resolved and starts the job; answers with a
/// redirect to its progress page. Refused while another replay of `queue`
/// runs.
async fn start_replay(
    console: &Shared,
    op: &Operator,
    queue: String,
    form: &ReplayForm,
) -> Result<Response, PageError> {
    if form.dry_run_id.trim().is_empty() {
        return Err(PageError::bad_request(
            "a replay follows a dry run of the same filters: run the dry run again",
        ));
    }
    let running = console
        .jobs
        .replays
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .any(|j| j.queue == queue && j.finished_at.get().is_none());
    if running {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            "a replay of this queue is running: wait for it to end (or cancel it), then run the dry run again",
        ));
    }
    let run = console
        .dry_runs
        .take(form.dry_run_id.trim(), &queue, op, &form.fingerprint())?;
    console
        .audit(
            op,
            "dlq_replay_start",
            &queue,
            &format!("filters={} {}", run.filters, bounds(&run.options)),
        )
        .await?;
    let job = ReplayJob::start(console, queue.clone(), run.filters, op.actor(), run.options);
    info!(%queue, job = job.id, actor = %op.actor(), bounds = %job.bounds, "console DLQ replay started");
    Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
}

/// Audits the end of a confirmed purge: its counts, or the error with the
/// count removed before it (those are gone for good).
async fn audit_purge_end(
    console: &Shared,
    actor: &str,
    queue: &str,
    report: &Result<dlq::PurgeReport, dlq::Partial<dlq::PurgeReport>>,
) {
    let end = match report {
        Ok(r) => format!("purged={} kept={} undated={}", r.purged, r.kept, r.undated),
        Err(p) => format!("failed after purged={}: {p}", p.done.purged),
    };
    info!(%queue, %actor, result = %end, "console DLQ purge ended");
    if let Some(store) = &console.store
        && let Err(e) = store
            .record_console_action(actor, "dlq_purge_end", queue, Some(&end))
            .await
    {
        warn!(%queue, error = %e, "the console audit of a DLQ purge's end failed");
    }
}

/// The purge form. The confirm step carries the dry run's absolute
/// cutoff and count: the real purge removes at most that many, dead-lettered
/// before that time, however long the operator took to confirm.
#[derive(Deserialize)]
pub(crate) struct PurgeForm {
    #[serde(default)]
    older_than: String,
    #[serde(default)]
    confirm: String,
    /// The dry run's cutoff, ms since the epoch.
    #[serde(default)]
    cutoff_ms: String,
    /// How many the dry run counted.
    #[serde(default)]
    expected: String,
}

/// `POST /dlq/{queue}/purge`: without `confirm=yes`, counts what would go
/// (a dry run) and asks; with it, purges at most the counted messages,
/// with the dry run's cutoff.
pub(crate) async fn purge(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(queue): Path<String>,
    axum::Form(form): axum::Form<PurgeForm>,
) -> Page {
    console.dlq(&queue)?;
    let older_than: Duration = humantime::parse_duration(form.older_than.trim()).map_err(|e| {
        PageError::bad_request(format!("the age is a duration such as 30d or 12h: {e}"))
    })?;
    let confirmed = form.confirm == "yes";
    let (cutoff, expected) = if confirmed {
        let number = |text: &str| text.trim().parse::<u64>().ok();
        match (number(&form.cutoff_ms), number(&form.expected)) {
            (Some(cutoff), Some(expected)) => (cutoff, Some(expected)),
            _ => {
                return Err(PageError::bad_request(
                    "a purge is confirmed from its count page (it carries the count's cutoff): count again",
                ));
            }
        }
    } else {
        (dlq::cutoff_of(older_than), None)
    };
    if let Some(expected) = expected {
        // Audited before anything is removed.
        console
            .audit(
                &op,
                "dlq_purge",
                &queue,
                &format!(
                    "older_than={} cutoff_ms={cutoff} at_most={expected}",
                    humantime::format_duration(older_than)
                ),
            )
            .await?;
    }
    let report = {
        let (console, queue, actor) = (console.clone(), queue.clone(), op.actor());
        // Its end is audited in the task too: a client that hangs up does
        // not stop the purge, nor its audit.
        detached(async move {
            let report = dlq::purge(&console.broker, &queue, cutoff, expected, !confirmed).await;
            if confirmed {
                audit_purge_end(&console, &actor, &queue, &report).await;
            }
            Ok(report)
        })
        .await
        .map_err(broker_error)?
        .map_err(|p| {
            let done = if confirmed {
                format!(
                    "{} message(s) had been removed before the error (audited)",
                    p.done.purged
                )
            } else {
                format!(
                    "the count stopped at the error ({} counted so far); nothing was removed",
                    p.done.purged
                )
            };
            PageError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the broker: {p}; {done}"),
            )
        })?
    };
    let age = humantime::format_duration(older_than).to_string();
    let cutoff_at = pages::time(i64::try_from(cutoff).unwrap_or(i64::MAX));
    let body = if confirmed {
        info!(%queue, older_than = %age, cutoff_ms = cutoff, expected = ?expected, purged = report.purged, actor = %op.actor(), "console DLQ purge");
        html! {
            h1 { "Purged: " a href={ "/dlq/" (queue) } { (queue) } }
            p.box id="purge-result" { (report.purged) " message(s) removed; " (report.kept) " kept (" (report.undated) " without a dead-lettered time)."
                " Removed: at most the " (expected.unwrap_or_default()) " counted, dead-lettered before " (cutoff_at) "." }
        }
    } else {
        html! {
            h1 { "Purge " (queue) "?" }
            p.box id="purge-count" {
                strong { (report.purged) " message(s)" } " were dead-lettered more than " (age)
                " ago (before " (cutoff_at) ") and would be removed for good; " (report.kept) " would stay (" (report.undated) " without a dead-lettered time are never purged by age)."
                " Confirming removes at most these " (report.purged) ", dead-lettered before that time."
            }
            form.action method="post" action={ "/dlq/" (queue) "/purge" } id="purge-confirm-form" {
                (csrf_field(&op))
                input type="hidden" name="older_than" value=(form.older_than.trim());
                input type="hidden" name="cutoff_ms" value=(cutoff);
                input type="hidden" name="expected" value=(report.purged);
                input type="hidden" name="confirm" value="yes";
                button.danger type="submit" id="purge-confirm" { "Remove them" }
                " " a href={ "/dlq/" (queue) } { "Cancel" }
            }
        }
    };
    Ok(pages::layout(&format!("Purge {queue}"), Some(&op), body))
}
