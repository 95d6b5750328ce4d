//! The console's HTML, as maud templates: checked at compile time, and
//! every value interpolated with `(...)` is escaped. No inline script or
//! style (the Content-Security-Policy forbids both); the page works with
//! JavaScript off.

use super::auth::{Csrf, Operator};
use super::render::{self, PayloadView};
use backstop::store::{AuditEntry, FailedRow, PayloadVersion, Status};
use maud::{DOCTYPE, Markup, html};
use std::time::{Duration, UNIX_EPOCH};

/// The statuses in their life order, for filters and counts.
pub(crate) const STATUSES: [Status; 6] = [
    Status::Pending,
    Status::Retrying,
    Status::NeedsReview,
    Status::Resolved,
    Status::Discarded,
    Status::Replayed,
];

/// `2026-01-02T03:04:05Z` for ms since the epoch.
pub(crate) fn time(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The hidden CSRF field of a form posted by `operator`.
pub(crate) fn csrf_field(operator: &Operator) -> Markup {
    let token = match &operator.csrf {
        Csrf::Session(token) => token.as_str(),
        Csrf::Bearer | Csrf::ReadOnly => "",
    };
    html! { input type="hidden" name="csrf" value=(token); }
}

/// The page around `body`: header with navigation and logout.
pub(crate) fn layout(title: &str, operator: Option<&Operator>, body: Markup) -> Markup {
    layout_refreshing(title, operator, None, body)
}

/// [`layout`], reloaded every `refresh` seconds when given (a meta refresh).
pub(crate) fn layout_refreshing(
    title: &str,
    operator: Option<&Operator>,
    refresh: Option<u32>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                title { (title) " · Backstop console" }
                link rel="stylesheet" href="/static/console.css";
            }
            body {
                header.top {
                    a.brand href="/" { "Backstop" }
                    @if let Some(op) = operator {
                        nav {
                            a href="/" { "Groups" }
                            a href="/rows" { "Rows" }
                            a href="/dlq" { "Dead letters" }
                        }
                        span.who { "signed in as " (op.name) }
                        form method="post" action="/logout" {
                            (csrf_field(op))
                            button.secondary type="submit" id="logout" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// An error page body.
pub(crate) fn error(message: &str) -> Markup {
    html! {
        h1 { "Something went wrong" }
        p.error id="error" { (message) }
        p { a href="/" { "Back to the console" } }
    }
}

/// The login page.
pub(crate) fn login(login_csrf: &str, needs_secret: bool, problem: Option<&str>) -> Markup {
    let form = html! {
        div.login {
            h1 { "Backstop console" }
            @if let Some(problem) = problem {
                p.error id="login-error" { (problem) }
            }
            form method="post" action="/login" id="login-form" {
                input type="hidden" name="login_csrf" value=(login_csrf);
                label for="login-name" { "Your name (recorded in the audit)" }
                input type="text" id="login-name" name="name" required
                    autocomplete="username";
                label for="login-secret" {
                    @if needs_secret { "Token, or the user's password" }
                    @else { "Secret (none configured: loopback only)" }
                }
                input type="password" id="login-secret" name="secret"
                    autocomplete="current-password" required[needs_secret];
                p { button type="submit" id="login-submit" { "Log in" } }
            }
        }
    };
    layout("Log in", None, form)
}

fn status_badge(status: Status) -> Markup {
    html! { span class={ "badge " (status.as_str()) } { (status.as_str()) } }
}

/// The rows counts by status, as cards linking to the lists.
pub(crate) fn status_cards(counts: &[(Status, i64)]) -> Markup {
    html! {
        div.cards id="status-counts" {
            @for status in STATUSES {
                @let n = counts.iter().find(|(s, _)| *s == status).map_or(0, |(_, n)| *n);
                a.card href={ "/rows?status=" (status.as_str()) } data-status=(status.as_str()) {
                    div.n { (n) }
                    div { (status.as_str()) }
                }
            }
        }
    }
}

/// `/rows`: a plain list with its filters.
pub(crate) fn rows(
    rows: &[FailedRow],
    status: Option<Status>,
    queue: Option<&str>,
    limit: i64,
) -> Markup {
    html! {
        h1 { "Stored messages" }
        form.filters method="get" action="/rows" {
            div {
                label for="status" { "Status" }
                select id="status" name="status" {
                    option value="" { "any" }
                    @for s in STATUSES {
                        option value=(s.as_str()) selected[status == Some(s)] { (s.as_str()) }
                    }
                }
            }
            div {
                label for="queue" { "Queue" }
                input type="text" id="queue" name="queue" value=(queue.unwrap_or(""));
            }
            div {
                label for="limit" { "At most" }
                input type="number" id="limit" name="limit" min="1" max="1000" value=(limit);
            }
            div { button type="submit" { "Show" } }
        }
        (row_table(rows, "rows"))
        @if rows.len() as i64 >= limit {
            p.note { "Showing the newest " (limit) "; narrow the filters to see others." }
        }
    }
}

/// A table of rows, newest first.
pub(crate) fn row_table(rows: &[FailedRow], id: &str) -> Markup {
    html! {
        table id=(id) {
            thead { tr {
                th.num { "id" } th { "queue" } th { "status" } th.num { "attempts" }
                th.num { "occurrences" } th { "error" } th { "updated" }
            } }
            tbody {
                @for row in rows {
                    tr.row data-row-id=(row.id) {
                        td.num { a href={ "/rows/" (row.id) } { (row.id) } }
                        td.cell { (render::inert(&row.queue)) }
                        td { (status_badge(row.status)) }
                        td.num { (row.attempts) }
                        td.num { (row.occurrences) }
                        td.cell { (render::inert(render::cut(&row.error, 300).0)) }
                        td { (time(row.updated_at)) }
                    }
                }
                @if rows.is_empty() {
                    tr { td colspan="7" .note { "No rows." } }
                }
            }
        }
    }
}

/// The payload, as [`render::payload_view`] chooses, in `#row-payload`.
pub(crate) fn payload(payload: &[u8]) -> Markup {
    payload_view("row-payload", payload)
}

/// The payload, as [`render::payload_view`] chooses, in an element `id`.
pub(crate) fn payload_view(id: &str, payload: &[u8]) -> Markup {
    let size = payload.len();
    html! {
        div.payload-view id=(id) {
            @match render::payload_view(payload) {
                PayloadView::Json { pretty, truncated } => {
                    p.note { "JSON, " (size) " bytes, pretty-printed"
                        @if truncated { "; only the first " (render::SHOWN_TEXT) " bytes are shown" } }
                    pre.payload.json { (pretty) }
                }
                PayloadView::Text { text, truncated } => {
                    p.note { "Text, " (size) " bytes"
                        @if truncated { "; only the first " (render::SHOWN_TEXT) " bytes are shown" } }
                    pre.payload.text { (text) }
                }
                PayloadView::Binary { hex, text, hex_truncated, text_truncated } => {
                    p.note { "Binary, " (size) " bytes. Hex dump"
                        @if hex_truncated { " of the first " (render::SHOWN_HEX) " bytes" }
                        ":" }
                    pre.payload.hex { (hex) }
                    p.note { "As text (invalid UTF-8 shown as \u{fffd}, control characters as symbols such as \u{2400})"
                        @if text_truncated { ", first " (render::SHOWN_TEXT) " bytes" }
                        ":" }
                    pre.payload.text { (text) }
                }
            }
        }
    }
}

/// A two-column table of (name, value) pairs.
pub(crate) fn pairs(id: &str, pairs: &[(String, String)]) -> Markup {
    html! {
        table.meta id=(id) {
            @for (k, v) in pairs {
                tr { th { (k) } td.cell { (v) } }
            }
            @if pairs.is_empty() {
                tr { td.note { "None." } }
            }
        }
    }
}

/// The audit history, oldest first.
pub(crate) fn audit(entries: &[AuditEntry]) -> Markup {
    html! {
        table id="row-audit" {
            thead { tr { th { "when" } th { "actor" } th { "action" } th { "note" } } }
            tbody {
                @for e in entries {
                    tr.audit {
                        td { (time(e.at)) }
                        td.cell.actor { (render::inert(&e.actor)) }
                        td.action { (e.action) }
                        td.cell.note-text { pre { (render::inert(e.note.as_deref().unwrap_or(""))) } }
                    }
                }
            }
        }
    }
}

/// The action form of a row.
pub(crate) fn row_action(row: &FailedRow, operator: &Operator) -> Markup {
    html! {
        form.action method="post" action={ "/rows/" (row.id) "/action" } id="row-action" {
            (csrf_field(operator))
            label for="row-action-select" { "Action" }
            select id="row-action-select" name="action" {
                @if row.status.is_finished() {
                    option value="force_retry" { "retry again (re-open this finished row)" }
                } @else {
                    option value="retry" { "retry (re-drive at the next scan)" }
                    option value="discard" { "discard (give it up)" }
                    option value="resolve" { "resolve (handled by hand)" }
                }
            }
            label for="row-action-note" { "Note (required to discard or resolve)" }
            textarea id="row-action-note" name="note" {}
            p { button type="submit" id="row-action-submit" { "Apply" } }
        }
    }
}

/// The versions of a row's payload, newest first, each in a `<details>`.
pub(crate) fn versions(row: &FailedRow, versions: &[PayloadVersion]) -> Markup {
    html! {
        @if versions.len() > 1 {
            h2 { "Versions" }
            p.note { "The payload above is version " (row.version) ", the one a re-drive sends. The original stays stored as version 0." }
            table id="row-versions" {
                thead { tr { th.num { "version" } th { "when" } th { "by" } th { "note" } th { "payload" } } }
                tbody {
                    @for v in versions.iter().rev() {
                        tr.version data-version=(v.version) {
                            td.num { (v.version) }
                            td { (time(v.at)) }
                            td.cell { (render::inert(&v.actor)) }
                            td.cell { (render::inert(v.note.as_deref().unwrap_or(""))) }
                            td.cell { details {
                                summary { (v.payload.len()) " bytes" }
                                (payload_view(&format!("version-payload-{}", v.version), &v.payload))
                            } }
                        }
                    }
                }
            }
        }
    }
}

/// `/rows/{id}`: everything about one row. `extra` goes after the payload
/// (its versions).
pub(crate) fn row(
    row: &FailedRow,
    entries: &[AuditEntry],
    operator: &Operator,
    extra: Markup,
) -> Markup {
    let optional = |v: &Option<String>| v.as_deref().map(render::inert).unwrap_or_default();
    let meta: Vec<(String, String)> = vec![
        ("queue".into(), render::inert(&row.queue)),
        ("status".into(), row.status.as_str().into()),
        ("payload version".into(), row.version.to_string()),
        ("error kind".into(), render::inert(&row.error_kind)),
        (
            "error".into(),
            render::inert(render::cut(&row.error, 4096).0),
        ),
        ("attempts".into(), row.attempts.to_string()),
        ("re-drives".into(), row.redrives.to_string()),
        ("occurrences".into(), row.occurrences.to_string()),
        ("exchange".into(), render::inert(&row.exchange)),
        ("routing key".into(), render::inert(&row.routing_key)),
        ("message id".into(), optional(&row.message_id)),
        ("dedup key".into(), optional(&row.dedup_key)),
        ("fingerprint".into(), render::inert(&row.fingerprint)),
        ("created".into(), time(row.created_at)),
        ("updated".into(), time(row.updated_at)),
        ("next attempt".into(), time(row.next_attempt_at)),
    ];
    html! {
        h1 { "Row " (row.id) " " (status_badge(row.status)) }
        (pairs("row-meta", &meta))
        h2 { "Payload" @if row.version > 0 { " (edited: version " (row.version) ")" } }
        (payload(&row.payload))
        p { a href={ "/rows/" (row.id) "/edit" } id="edit-link" { "Edit the payload and retry" } }
        (extra)
        h2 { "Headers" }
        (pairs("row-headers", &render::headers(&row.headers)))
        h2 { "Properties" }
        (pairs("row-properties", &render::properties(&row.properties)))
        h2 { "Act on it" }
        (row_action(row, operator))
        h2 { "Audit" }
        (audit(entries))
    }
}
