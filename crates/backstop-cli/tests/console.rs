//! The review console end to end, in a real browser (headless Chromium over
//! WebDriver), on the real broker, once with a SQLite store and once with
//! the PostgreSQL store.
//!
//! Each flow starts a real `backstop run` with a `[console]` section: a
//! consumer that stores what fails and one that dead-letters, both posting
//! to an in-test endpoint that answers 422 `card declined for order N` or
//! 400 `currency XTS is not supported for order N` (two causes) until the
//! test heals a cause, and 200 after. The browser logs in and acts; the
//! assertions read what the feature promises from the outside: the bodies
//! the endpoint received (a count per body), the rows' statuses and audit
//! in the store (through the library's `SqlStore`), and queue depths from
//! the broker. Every flow saves screenshots under
//! `target/console-screenshots/<flow>_<store>/`.

mod sidecar;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use backstop::store::{
    CompensationStore, FailedRow, ListFilter, NewFailedMessage, SqlStore, Status,
};
use backstop_testkit::browser::Browser;
use backstop_testkit::{RowLock, queue_is, unique, wait_until};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use sidecar::{Running, free_port, start_run_logging};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The console's token in these tests (any name logs in with it).
const TOKEN: &str = "console-e2e-token";
/// The operator who logs in: the actor is `console:alice`.
const OPERATOR: &str = "alice";
/// How long a flow waits for anything.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The endpoint: fails by the body's `cause` until that cause is healed.

#[derive(Clone, Default)]
struct Endpoint {
    /// How many times each body was received.
    received: Arc<Mutex<HashMap<Vec<u8>, u32>>>,
    /// Causes that succeed now.
    healed: Arc<Mutex<HashSet<String>>>,
}

impl Endpoint {
    fn count(&self, body: &[u8]) -> u32 {
        self.received
            .lock()
            .expect("lock")
            .get(body)
            .copied()
            .unwrap_or(0)
    }

    fn heal(&self, cause: &str) {
        self.healed.lock().expect("lock").insert(cause.to_owned());
    }

    /// Waits until `body` was received `n` times.
    async fn wait_count(&self, body: &[u8], n: u32) {
        let shown = String::from_utf8_lossy(body).into_owned();
        wait_until(&format!("{shown} received {n} time(s)"), WAIT, || {
            let got = self.count(body);
            async move { got >= n }
        })
        .await;
    }
}

async fn answer(State(endpoint): State<Endpoint>, body: Bytes) -> Response {
    *endpoint
        .received
        .lock()
        .expect("lock")
        .entry(body.to_vec())
        .or_insert(0) += 1;
    let order: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let cause = order["cause"].as_str().unwrap_or("malformed");
    let n = order["order"].as_u64().unwrap_or(0);
    if endpoint.healed.lock().expect("lock").contains(cause) {
        return StatusCode::OK.into_response();
    }
    match cause {
        "ok" => StatusCode::OK.into_response(),
        "declined" => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("card declined for order {n}"),
        )
            .into_response(),
        "currency" => (
            StatusCode::BAD_REQUEST,
            format!("currency XTS is not supported for order {n}"),
        )
            .into_response(),
        _ => (StatusCode::BAD_REQUEST, "malformed order").into_response(),
    }
}

async fn start_endpoint() -> (Endpoint, String) {
    let endpoint = Endpoint::default();
    let app = Router::new()
        .route("/orders", post(answer))
        .with_state(endpoint.clone());
    let url = format!("{}/orders", backstop_testkit::serve_http(app).await);
    (endpoint, url)
}

fn order(n: u64, cause: &str) -> Vec<u8> {
    format!(r#"{{"order":{n},"cause":"{cause}"}}"#).into_bytes()
}

// ---------------------------------------------------------------------------
// One flow's world: a store, `backstop run` with the console, two queues.

#[derive(Clone, Copy, Debug)]
enum Store {
    Sqlite,
    Postgres,
}

struct World {
    endpoint: Endpoint,
    /// The queue whose failures go to the store.
    stored: String,
    /// The queue whose failures are dead-lettered (to `<dead>.dlq`).
    dead: String,
    store: SqlStore,
    console: String,
    _run: Running,
    db_file: Option<std::path::PathBuf>,
}

impl World {
    async fn start(kind: Store, name: &str) -> World {
        let (endpoint, url) = start_endpoint().await;
        let stored = unique(&format!("console-{name}"));
        let dead = format!("{stored}-dl");
        let (store_url, db_file) = match kind {
            Store::Sqlite => {
                let path = std::env::temp_dir().join(format!("{}.db", unique("console-e2e")));
                (format!("sqlite://{}", path.display()), Some(path))
            }
            Store::Postgres => (backstop_testkit::postgres_url(), None),
        };
        let metrics_port = free_port();
        let console_port = free_port();
        let config = format!(
            "[broker]\nuri = {uri:?}\n\n\
             [store]\nurl = {store_url:?}\nscan_interval = \"200ms\"\nfirst_redrive = \"1h\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [console]\nlisten = \"127.0.0.1:{console_port}\"\ntoken = {TOKEN:?}\n\n\
             [[consumer]]\nqueue = \"{stored}\"\nhandler.http.url = \"{url}\"\n\
             retry.exhausted = \"store\"\n\n\
             [[consumer]]\nqueue = \"{dead}\"\nhandler.http.url = \"{url}\"\n",
            uri = backstop_testkit::amqp_url(),
        );
        // Its warnings (each failure it stores or dead-letters) would bury
        // the test output; errors still show.
        let run = start_run_logging(&config, "error,lapin=off", std::process::Stdio::inherit());
        sidecar::wait_ready(metrics_port).await;
        let store = SqlStore::connect(&store_url).await.expect("the store");
        World {
            endpoint,
            stored,
            dead,
            store,
            console: format!("http://127.0.0.1:{console_port}"),
            _run: run,
            db_file,
        }
    }

    /// Publishes `bodies` to `queue` (persistent, confirmed), each with a
    /// message id and `headers`.
    async fn publish(&self, queue: &str, bodies: &[Vec<u8>], headers: &[(&str, &str)]) {
        let connection = backstop_testkit::connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        for body in bodies {
            let mut table = FieldTable::default();
            for (name, value) in headers {
                table.insert((*name).into(), AMQPValue::LongString((*value).into()));
            }
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(unique("msg").into())
                .with_headers(table);
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
        }
        let _ = connection.close(200, "published".into()).await;
    }

    /// This world's rows in the store.
    async fn rows(&self) -> Vec<FailedRow> {
        self.store
            .list(&ListFilter {
                queue: Some(self.stored.clone()),
                ..ListFilter::default()
            })
            .await
            .expect("list the rows")
    }

    /// Waits until the store holds `n` rows of this world.
    async fn wait_rows(&self, n: usize) -> Vec<FailedRow> {
        wait_until(&format!("{n} row(s) stored"), WAIT, || async {
            self.rows().await.len() >= n
        })
        .await;
        let rows = self.rows().await;
        assert_eq!(rows.len(), n, "{rows:?}");
        rows
    }

    /// The row whose stored payload is `body`.
    async fn row_of(&self, body: &[u8]) -> FailedRow {
        self.rows()
            .await
            .into_iter()
            .find(|r| r.payload == body)
            .unwrap_or_else(|| panic!("no row holds {}", String::from_utf8_lossy(body)))
    }

    async fn wait_status(&self, id: i64, status: Status) {
        wait_until(&format!("row {id} is {status}"), WAIT, || async {
            self.store.get(id).await.expect("the row").status == status
        })
        .await;
    }

    /// Opens a browser session for the flow and logs in as alice.
    async fn login(&self, flow: &str) -> Browser {
        let browser = Browser::start(flow).await;
        browser.open(&format!("{}/", self.console)).await;
        // Not logged in: the console sends the browser to its login page.
        browser.wait_for("#login-form").await;
        browser.fill("#login-name", OPERATOR).await;
        browser.fill("#login-secret", TOKEN).await;
        browser.click("#login-submit").await;
        browser.wait_for("#logout").await;
        browser
    }

    async fn open(&self, browser: &Browser, path: &str) {
        browser.open(&format!("{}{path}", self.console)).await;
    }

    async fn cleanup(self) {
        // The run first, so that it does not see its queues go.
        drop(self._run);
        let connection = backstop_testkit::connect().await;
        for queue in [
            self.stored.clone(),
            format!("{}.dlq", self.stored),
            self.dead.clone(),
            format!("{}.dlq", self.dead),
        ] {
            backstop_testkit::delete_queue(&connection, &queue).await;
        }
        let _ = connection.close(200, "cleaned up".into()).await;
        if let Some(file) = &self.db_file {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Selects `value` in the `<select>` matching `css`.
async fn select(browser: &Browser, css: &str, value: &str) {
    browser
        .wait_for(css)
        .await
        .select_by_value(value)
        .await
        .unwrap_or_else(|e| panic!("select {value} in {css}: {e}"));
}

/// The audit of row `id` in the store, as (actor, action, note).
async fn audit(world: &World, id: i64) -> Vec<(String, String, Option<String>)> {
    world
        .store
        .audit(id)
        .await
        .expect("the audit")
        .into_iter()
        .map(|a| (a.actor, a.action, a.note))
        .collect()
}

/// Seeds the stored queue with three declined and two currency failures;
/// returns their bodies.
async fn seed_two_causes(world: &World) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let declined: Vec<Vec<u8>> = (1..=3).map(|n| order(n, "declined")).collect();
    let currency: Vec<Vec<u8>> = (4..=5).map(|n| order(n, "currency")).collect();
    let all: Vec<Vec<u8>> = declined.iter().chain(&currency).cloned().collect();
    world.publish(&world.stored, &all, &[]).await;
    world.wait_rows(5).await;
    for body in &all {
        assert_eq!(world.endpoint.count(body), 1);
    }
    (declined, currency)
}

// ---------------------------------------------------------------------------
// The flows.

/// Log in (a wrong secret is refused), and see the two groups a real
/// failing consumer produced, with their counts.
async fn login_and_groups(kind: Store, flow: &str) {
    let world = World::start(kind, "groups").await;
    seed_two_causes(&world).await;
    let groups = world
        .store
        .groups(Some(&world.stored))
        .await
        .expect("groups");
    let mut causes: Vec<(String, i64)> = groups
        .iter()
        .map(|g| (g.key.cause.clone(), g.count))
        .collect();
    causes.sort();
    assert_eq!(
        causes,
        [
            (
                "the endpoint answered HTTP #: card declined for order #".to_owned(),
                3
            ),
            (
                "the endpoint answered HTTP #: currency XTS is not supported for order #"
                    .to_owned(),
                2
            ),
        ]
    );

    // A wrong secret does not log in.
    let browser = Browser::start(flow).await;
    world.open(&browser, "/login").await;
    browser.fill("#login-name", OPERATOR).await;
    browser.fill("#login-secret", "not-the-token").await;
    browser.click("#login-submit").await;
    let problem = browser.text("#login-error").await;
    assert!(problem.contains("wrong"), "{problem}");
    browser.screenshot("login-refused").await;
    // The right one does, on the page that refused the wrong one.
    browser.fill("#login-name", OPERATOR).await;
    browser.fill("#login-secret", TOKEN).await;
    browser.click("#login-submit").await;
    browser.wait_for("#logout").await;
    world.open(&browser, "/").await;
    browser.wait_for("#groups").await;
    for group in &groups {
        let css = format!("#groups tr.group[data-group-id=\"{}\"]", group.id);
        let text = browser.text(&css).await;
        assert!(
            text.contains(&world.stored) && text.contains(&group.count.to_string()),
            "{css}: {text}"
        );
        assert!(
            text.contains("card declined") || text.contains("currency XTS"),
            "{text}"
        );
    }
    browser.screenshot_full("groups").await;
    browser.close().await;
    world.cleanup().await;
}

/// Retry the declined group (healed first): the endpoint receives those
/// messages once more, each exactly once, the rows end `replayed` with
/// alice's audit entry, and the other group is untouched.
async fn retry_group(kind: Store, flow: &str) {
    let world = World::start(kind, "retry").await;
    let (declined, currency) = seed_two_causes(&world).await;
    let group = world
        .store
        .groups(Some(&world.stored))
        .await
        .expect("groups")
        .into_iter()
        .find(|g| g.key.cause.contains("card declined"))
        .expect("the declined group");
    world.endpoint.heal("declined");

    let browser = world.login(flow).await;
    world.open(&browser, "/").await;
    browser
        .click(&format!("tr.group[data-group-id=\"{}\"] a", group.id))
        .await;
    browser.wait_for("#group-action").await;
    select(&browser, "#group-action select[name=action]", "retry").await;
    browser
        .fill(
            "#group-action textarea[name=note]",
            "the card processor is back",
        )
        .await;
    browser.screenshot_full("group").await;
    browser.click("#group-action-submit").await;
    wait_until("the job finishes", WAIT, || async {
        browser.try_text("#job-status").await.as_deref() == Some("finished")
    })
    .await;
    assert_eq!(browser.text("#job-done").await.trim(), "3");
    browser.screenshot("job").await;

    for body in &declined {
        world.endpoint.wait_count(body, 2).await;
        let row = world.row_of(body).await;
        world.wait_status(row.id, Status::Replayed).await;
        let entries = audit(&world, row.id).await;
        assert!(
            entries.contains(&(
                "console:alice".to_owned(),
                "retry".to_owned(),
                Some("the card processor is back".to_owned())
            )),
            "{entries:?}"
        );
    }
    // Every re-driven copy was handled: nothing left in the queue.
    let queue = world.stored.clone();
    wait_until("the queue is drained", WAIT, || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    for body in &declined {
        assert_eq!(
            world.endpoint.count(body),
            2,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    for body in &currency {
        assert_eq!(world.endpoint.count(body), 1);
        let row = world.row_of(body).await;
        assert_eq!(row.status, Status::Pending, "{row:?}");
    }
    browser.close().await;
    world.cleanup().await;
}

/// Discard one row with a note: the row page's audit shows it with the
/// actor, and so does the store.
async fn discard_row(kind: Store, flow: &str) {
    let world = World::start(kind, "discard").await;
    let (declined, _) = seed_two_causes(&world).await;
    let row = world.row_of(&declined[0]).await;
    let browser = world.login(flow).await;
    world.open(&browser, &format!("/rows/{}", row.id)).await;
    assert!(browser.text("#row-payload").await.contains("\"declined\""));
    select(&browser, "#row-action select[name=action]", "discard").await;
    browser
        .fill(
            "#row-action textarea[name=note]",
            "duplicate of order 7, refunded by hand",
        )
        .await;
    browser.click("#row-action-submit").await;
    wait_until("the audit shows the discard", WAIT, || async {
        let text = browser.text("#row-audit").await;
        text.contains("discard") && text.contains("console:alice")
    })
    .await;
    let shown = browser.text("#row-audit").await;
    assert!(
        shown.contains("duplicate of order 7, refunded by hand"),
        "{shown}"
    );
    browser.screenshot_full("row").await;
    assert_eq!(
        world.store.get(row.id).await.expect("the row").status,
        Status::Discarded
    );
    let entries = audit(&world, row.id).await;
    assert_eq!(
        entries.last(),
        Some(&(
            "console:alice".to_owned(),
            "discard".to_owned(),
            Some("duplicate of order 7, refunded by hand".to_owned())
        )),
        "{entries:?}"
    );
    // Nothing else moved.
    assert_eq!(world.endpoint.count(&declined[0]), 1);
    browser.close().await;
    world.cleanup().await;
}

/// Edit a row's payload and retry: the endpoint receives the edited body
/// exactly once and the original never again; the original stays readable
/// as version 0.
async fn edit_and_retry(kind: Store, flow: &str) {
    let world = World::start(kind, "edit").await;
    let (_, currency) = seed_two_causes(&world).await;
    let original = currency[0].clone();
    let row = world.row_of(&original).await;
    let edited = br#"{"order":4,"cause":"ok","currency":"EUR"}"#.to_vec();

    let browser = world.login(flow).await;
    world.open(&browser, &format!("/rows/{}", row.id)).await;
    browser.click("#edit-link").await;
    let edit_page = browser.current_url().await.expect("the edit page's url");
    browser.wait_for("#edit-payload").await;
    browser
        .fill("#edit-payload", &String::from_utf8_lossy(&edited))
        .await;
    // Without a note the browser does not send the form (the note is
    // `required`); a form sent without it anyway (an old page) is refused.
    browser.click("#edit-submit").await;
    assert_eq!(
        browser.current_url().await.expect("url"),
        edit_page,
        "the form was sent without a note"
    );
    browser
        .execute(
            "document.getElementById('edit-note').removeAttribute('required');",
            vec![],
        )
        .await
        .expect("drop the required attribute");
    browser.click("#edit-submit").await;
    let refused = browser.text("#error").await;
    assert!(refused.contains("needs a note"), "{refused}");
    browser.screenshot("edit-refused").await;
    let versions = world.store.versions(row.id).await.expect("versions");
    assert!(
        versions.iter().all(|v| v.payload == original),
        "an edit without a note was stored: {versions:?}"
    );
    assert_eq!(world.endpoint.count(&edited), 0);
    browser.open(edit_page.as_str()).await;
    browser.wait_for("#edit-payload").await;
    browser
        .fill("#edit-payload", &String::from_utf8_lossy(&edited))
        .await;
    browser
        .fill("#edit-note", "EUR instead of XTS, agreed with the merchant")
        .await;
    browser.screenshot_full("edit").await;
    browser.click("#edit-submit").await;

    world.endpoint.wait_count(&edited, 1).await;
    world.wait_status(row.id, Status::Replayed).await;
    let queue = world.stored.clone();
    wait_until("the queue is drained", WAIT, || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    assert_eq!(world.endpoint.count(&edited), 1);
    // The original came once, when it first failed, and never again.
    assert_eq!(world.endpoint.count(&original), 1);

    let versions = world.store.versions(row.id).await.expect("versions");
    let payloads: Vec<(i64, Vec<u8>)> = versions
        .iter()
        .map(|v| (v.version, v.payload.clone()))
        .collect();
    assert_eq!(payloads, [(0, original.clone()), (1, edited.clone())]);
    let entries = audit(&world, row.id).await;
    let edit = entries
        .iter()
        .find(|(_, action, _)| action == "edit")
        .unwrap_or_else(|| panic!("no edit entry: {entries:?}"));
    assert_eq!(edit.0, "console:alice");
    let note = edit.2.clone().unwrap_or_default();
    assert!(
        note.contains("EUR instead of XTS")
            && note.contains("-{\"order\":4,\"cause\":\"currency\"}"),
        "{note}"
    );
    world.open(&browser, &format!("/rows/{}", row.id)).await;
    browser.wait_for("#row-versions").await;
    browser.screenshot_full("row-edited").await;
    browser.close().await;
    world.cleanup().await;
}

/// Browse a DLQ (peeked with requeue: depth and order kept), dry-run a
/// replay filtered by error text (nothing moves), then replay it: exactly
/// the selected messages go back to their queue and are handled; the rest
/// stay in the DLQ.
async fn dlq_replay(kind: Store, flow: &str) {
    let world = World::start(kind, "dlq").await;
    let declined: Vec<Vec<u8>> = (11..=12).map(|n| order(n, "declined")).collect();
    let currency: Vec<Vec<u8>> = (13..=15).map(|n| order(n, "currency")).collect();
    let all: Vec<Vec<u8>> = declined.iter().chain(&currency).cloned().collect();
    world
        .publish(&world.dead, &declined, &[("x-tenant", "acme")])
        .await;
    world
        .publish(&world.dead, &currency, &[("x-tenant", "globex")])
        .await;
    let dlq = format!("{}.dlq", world.dead);
    let q = dlq.clone();
    wait_until("5 messages dead-lettered", WAIT, || {
        queue_is(&q, |c| c.ready == 5)
    })
    .await;
    let dead_lettered = std::time::Instant::now();

    let browser = world.login(flow).await;
    world.open(&browser, "/dlq").await;
    let listed = browser.text("#dlqs").await;
    assert!(listed.contains(&dlq), "{listed}");
    world.open(&browser, &format!("/dlq/{dlq}")).await;
    browser.wait_for("#dlq-messages").await;
    assert_eq!(browser.all("#dlq-messages tr.dlq-message").await.len(), 5);
    let note = browser.text("#dlq-peek-note").await;
    assert!(
        note.to_lowercase()
            .contains("peeked with requeue, in queue order"),
        "{note}"
    );
    // Peeking moved nothing.
    let q = dlq.clone();
    wait_until("the DLQ still holds 5, none unacked", WAIT, || {
        queue_is(&q, |c| c.ready == 5 && c.unacked == 0)
    })
    .await;
    world.endpoint.heal("declined");

    // Every filter at once: error text, header value, time range.
    browser
        .fill("#replay-form input[name=error_contains]", "card declined")
        .await;
    browser
        .fill("#replay-form input[name=header]", "x-tenant=acme")
        .await;
    browser.fill("#replay-form input[name=since]", "1h").await;
    browser.click("#replay-dry-run").await;
    assert_eq!(browser.text("#replay-would-move").await.trim(), "2");
    let result = browser.text("#replay-result").await;
    assert!(
        result.contains("order 11") && result.contains("order 12"),
        "{result}"
    );
    browser.screenshot_full("dlq-dry-run").await;
    // The dry run moved nothing.
    let q = dlq.clone();
    wait_until("the DLQ still holds 5 after the dry run", WAIT, || {
        queue_is(&q, |c| c.ready == 5 && c.unacked == 0)
    })
    .await;
    for body in &all {
        assert_eq!(world.endpoint.count(body), 1);
    }

    browser.click("#replay-submit").await;
    // The replay runs as a job: its page refreshes until the job ends.
    wait_until("the replay job finishes", WAIT, || async {
        browser.try_text("#job-status").await.as_deref() == Some("finished")
    })
    .await;
    assert_eq!(browser.text("#replay-moved").await.trim(), "2");
    browser.screenshot_full("dlq-replayed").await;
    for body in &declined {
        world.endpoint.wait_count(body, 2).await;
    }
    let q = dlq.clone();
    wait_until("the DLQ holds the 3 others", WAIT, || {
        queue_is(&q, |c| c.ready == 3 && c.unacked == 0)
    })
    .await;
    let queue = world.dead.clone();
    wait_until("the replayed copies are handled", WAIT, || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    for body in &declined {
        assert_eq!(world.endpoint.count(body), 2);
    }
    for body in &currency {
        assert_eq!(world.endpoint.count(body), 1);
    }

    // Purge the 3 left by age: a count to confirm first, nothing removed
    // until the confirm.
    wait_until("the 3 left to be over 1 s old", WAIT, || async {
        dead_lettered.elapsed() > Duration::from_millis(1500)
    })
    .await;
    world.open(&browser, &format!("/dlq/{dlq}")).await;
    browser
        .fill("#purge-form input[name=older_than]", "1s")
        .await;
    browser.click("#purge-submit").await;
    let count = browser.text("#purge-count").await;
    assert!(count.contains("3 message(s)"), "{count}");
    browser.screenshot_full("dlq-purge-confirm").await;
    let q = dlq.clone();
    wait_until("the DLQ still holds 3 before the confirm", WAIT, || {
        queue_is(&q, |c| c.ready == 3 && c.unacked == 0)
    })
    .await;
    browser.click("#purge-confirm").await;
    let purged = browser.text("#purge-result").await;
    assert!(purged.contains("3 message(s) removed"), "{purged}");
    let q = dlq.clone();
    wait_until("the DLQ is empty after the purge", WAIT, || {
        queue_is(&q, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let audit = world
        .store
        .console_actions(20)
        .await
        .expect("console audit");
    for action in ["dlq_purge", "dlq_purge_end"] {
        assert!(
            audit
                .iter()
                .any(|a| a.action == action && a.target == dlq && a.actor == "console:alice"),
            "no {action} of {dlq}: {audit:?}"
        );
    }
    for body in &currency {
        assert_eq!(
            world.endpoint.count(body),
            1,
            "a purged message was handled"
        );
    }
    browser.close().await;
    world.cleanup().await;
}

/// Clicks `css` on a page that refreshes itself, trying again when the
/// page was replaced under the click.
async fn click_refreshing(browser: &Browser, css: &str) {
    wait_until(&format!("a click on {css}"), WAIT, || {
        browser.try_click(css)
    })
    .await;
}

/// A large group retry, cancelled from its job page mid-way: it stops
/// after a whole batch; the rows it acted on are the first ones (by id),
/// each audited, and every row after the cancel is exactly as it was.
///
/// On PostgreSQL the test holds the first row of the second batch, so the
/// job is mid-way for certain when the cancel lands: exactly two batches
/// are done. SQLite has no row lock; there the job's 80 batches (about a
/// second here) must outlast the click. Each cancel used to wait, on
/// SQLite, for the write lock the job's batches hold back to back before
/// taking effect, and landed after the job had ended.
async fn cancel_group_job(kind: Store, flow: &str) {
    const BATCH: usize = 500;
    let rows_seeded: u64 = match kind {
        Store::Sqlite => 40_000,
        Store::Postgres => 5_000,
    };
    let world = World::start(kind, "cancel").await;
    // A queue no consumer reads: the rows' re-drives go nowhere a test
    // counts.
    let queue = unique("console-cancel-rows");
    let due = backstop::retry::now_ms() as i64 + 3_600_000;
    let messages: Vec<NewFailedMessage> = (0..rows_seeded)
        .map(|n| NewFailedMessage {
            queue: queue.clone(),
            exchange: String::new(),
            routing_key: queue.clone(),
            message_id: Some(format!("m-{n}")),
            dedup_key: None,
            payload: format!("{{\"order\":{n}}}").into_bytes(),
            headers: "{}".to_owned(),
            properties: "{}".to_owned(),
            error: format!("card declined for order {n}"),
            error_kind: "permanent".to_owned(),
            attempts: 3,
            next_attempt_at: due,
            store_id: None,
            fingerprint: format!("id:m-{n}"),
        })
        .collect();
    world.store.store_batch(&messages).await.expect("seed");
    let rows_of = || async {
        let mut rows = world
            .store
            .list(&ListFilter {
                queue: Some(queue.clone()),
                ..ListFilter::default()
            })
            .await
            .expect("list");
        rows.sort_by_key(|r| r.id);
        rows
    };
    let before = rows_of().await;
    assert_eq!(before.len() as u64, rows_seeded);
    let group = world
        .store
        .groups(Some(&queue))
        .await
        .expect("groups")
        .pop()
        .expect("the group");

    let hold = match kind {
        Store::Postgres => Some(
            RowLock::take(
                &backstop_testkit::postgres_url(),
                "backstop_failed_messages",
                before[BATCH].id,
            )
            .await,
        ),
        Store::Sqlite => None,
    };
    let browser = world.login(flow).await;
    world.open(&browser, &format!("/groups/{}", group.id)).await;
    select(&browser, "#group-action select[name=action]", "retry").await;
    browser
        .fill("#group-action textarea[name=note]", "try them again")
        .await;
    browser.click("#group-action-submit").await;
    let page = &browser;
    let status = move || async move { page.try_text("#job-status").await };
    if hold.is_some() {
        wait_until("the first batch done, the second held", WAIT, || async {
            status().await.as_deref() == Some("running")
                && browser.try_text("#job-done").await.as_deref() == Some("500")
        })
        .await;
    }
    click_refreshing(&browser, "#job-cancel-submit").await;
    if let Some(hold) = hold {
        wait_until("the job is cancelling", WAIT, || async {
            status().await.as_deref() == Some("cancelling")
        })
        .await;
        hold.release().await;
    }
    wait_until("the job is cancelled", WAIT, || async {
        status().await.as_deref() == Some("cancelled")
    })
    .await;
    browser.screenshot("job-cancelled").await;
    let done: u64 = browser
        .text("#job-done")
        .await
        .trim()
        .parse()
        .expect("a count");
    assert!(
        done < rows_seeded,
        "cancelled mid-way: {done} of {rows_seeded}"
    );
    assert_eq!(done % BATCH as u64, 0, "whole batches of {BATCH}: {done}");
    if matches!(kind, Store::Postgres) {
        assert_eq!(done, 2 * BATCH as u64, "the held batch, then none");
    }
    // The job's closing entry (written before its page says "cancelled")
    // names who cancelled it, whatever became of the cancel's own entry.
    let actions = world.store.console_actions(1000).await.expect("actions");
    let group_target = format!("group {}", group.id);
    let ends: Vec<_> = actions
        .iter()
        .filter(|a| a.action == "group_job_end" && a.target.ends_with(&group_target))
        .map(|a| a.detail.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        ends,
        [format!(
            "acted={done} skipped=0 cancelled=true cancelled_by=console:alice"
        )],
        "{actions:?}"
    );
    let after = rows_of().await;
    let changed: Vec<i64> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| {
            assert_eq!(b.id, a.id);
            b != a
        })
        .map(|(b, _)| b.id)
        .collect();
    assert_eq!(
        changed.len() as u64,
        done,
        "the rows acted on are the job's"
    );
    assert_eq!(
        changed,
        before[..done as usize]
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        "the first rows by id, then none"
    );
    for id in changed.iter().take(3).chain(changed.last()) {
        let entries = audit(&world, *id).await;
        assert!(
            entries.contains(&(
                "console:alice".to_owned(),
                "retry".to_owned(),
                Some("try them again".to_owned())
            )),
            "row {id}: {entries:?}"
        );
    }
    browser.close().await;
    world.cleanup().await;
}

/// Hostile payloads and headers are shown inert: no script ran (the global
/// the payload would set is undefined, the title is the console's), and
/// the text is there to read.
async fn hostile_payloads(kind: Store, flow: &str) {
    let world = World::start(kind, "hostile").await;
    let script = b"<script>window.__pwned = 1; document.title = 'pwned';</script>".to_vec();
    let img = b"<img src=x onerror=\"window.__pwned = 2; document.title = 'pwned'\">".to_vec();
    let long = format!("<b>{}</b>", "A".repeat(200_000)).into_bytes();
    let nul = b"before\0after<script>window.__pwned = 3</script>".to_vec();
    let invalid = vec![0xff, 0xfe, b'<', b's', b'>', 0xc3, 0x28, 0x00, 0x80];
    let bodies = [
        script.clone(),
        img.clone(),
        long.clone(),
        nul.clone(),
        invalid.clone(),
    ];
    world
        .publish(
            &world.stored,
            &bodies,
            &[("x-evil", "<script>window.__pwned = 4</script>")],
        )
        .await;
    world.wait_rows(5).await;

    let browser = world.login(flow).await;
    for (i, body) in bodies.iter().enumerate() {
        let row = world.row_of(body).await;
        world.open(&browser, &format!("/rows/{}", row.id)).await;
        let shown = browser.text("#row-payload").await;
        let pwned = browser
            .execute("return typeof window.__pwned;", vec![])
            .await
            .expect("run the check");
        assert_eq!(pwned, "undefined", "a script ran on row {}", row.id);
        let title = browser.title().await.expect("title");
        assert_eq!(title, format!("Row {} · Backstop console", row.id));
        let page = browser.text("body").await;
        assert!(
            page.contains("<script>window.__pwned = 4</script>"),
            "the hostile header is not shown as text"
        );
        match i {
            0 => assert!(shown.contains("<script>window.__pwned = 1;"), "{shown}"),
            1 => assert!(shown.contains("<img src=x onerror="), "{shown}"),
            2 => assert!(
                shown.contains("<b>AAAA"),
                "{}",
                &shown[..200.min(shown.len())]
            ),
            3 => assert!(
                shown.contains("before") && shown.contains("after<script>"),
                "{shown}"
            ),
            _ => assert!(shown.contains("ff fe"), "{shown}"),
        }
        if i == 0 {
            browser.screenshot_full("hostile").await;
        }
        if i == 4 {
            browser.screenshot_full("hostile-binary").await;
        }
    }
    // The groups page shows the samples of these rows, inert too.
    world.open(&browser, "/").await;
    browser.wait_for("#groups").await;
    let pwned = browser
        .execute("return typeof window.__pwned;", vec![])
        .await
        .expect("run the check");
    assert_eq!(pwned, "undefined");
    browser.close().await;
    world.cleanup().await;
}

macro_rules! on_both_stores {
    ($($flow:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $flow() {
                    super::$flow(super::Store::Sqlite, concat!(stringify!($flow), "_sqlite")).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $flow() {
                    super::$flow(super::Store::Postgres, concat!(stringify!($flow), "_postgres")).await;
                }
            )*
        }
    };
}

on_both_stores!(
    cancel_group_job,
    login_and_groups,
    retry_group,
    discard_row,
    edit_and_retry,
    dlq_replay,
    hostile_payloads,
);
