//! The consumer and the scanner with a real compensation store and broker.

use crate::common;
use backstop::consumer::ConsumerConfig;
use backstop::handler::Outcome;
use backstop::retry::{Exhausted, RetryPolicy};
use backstop::store::{
    CompensationStore, FailedRow, ListFilter, Redrive, Scanner, ScannerConfig, SqlStore, Status,
    StoreError,
};
use backstop::topology::{Binding, Exchange, Queue, Topology};
use backstop_testkit::{
    FaultProxy, amqp_url, broker_addr, connect, delete_queue, postgres_url, publish, unique,
    url_via, wait_until,
};
use common::*;
use futures_util::future::BoxFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

async fn sqlite_store() -> Arc<SqlStore> {
    Arc::new(common::sqlite_store().await)
}

async fn rows_of(store: &SqlStore, queue: &str) -> Vec<backstop::store::FailedRow> {
    store
        .list(&ListFilter {
            queue: Some(queue.to_owned()),
            ..ListFilter::default()
        })
        .await
        .expect("list")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_message_becomes_a_complete_row_and_leaves_the_queue() {
    init_tracing();
    let queue = unique("to-store");
    let exchange = unique("payments-ex");
    let store = sqlite_store().await;
    let policy = RetryPolicy::new()
        .delays([Duration::from_millis(200)])
        .exhausted(Exhausted::Store);
    let topology = Topology::new()
        .exchange(Exchange::direct(&exchange).auto_delete())
        .queue(Queue::classic(&queue))
        .binding(Binding::queue(&queue).to(&exchange).routing_key("pay"));
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .retry(policy.clone())
            .compensation_store(store.clone(), Duration::from_secs(60)),
        &recorder,
        |_, _| async { Outcome::retry("provider down") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let publisher = connect().await;
    let channel = confirmed_channel(&publisher).await;
    publish_confirmed(
        &channel,
        &exchange,
        "pay",
        &[0xde, 0xad, 0x00, 0xbe, 0xef],
        lapin::BasicProperties::default()
            .with_message_id("pay-1".into())
            .with_content_type("application/octet-stream".into())
            .with_delivery_mode(2),
    )
    .await;
    wait_stats(&consumer, "the row to be stored", |s| s.stored == 1).await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(recorder.calls_of("pay-1"), 2);

    let rows = rows_of(&store, &queue).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.exchange, exchange);
    assert_eq!(row.routing_key, "pay");
    assert_eq!(row.message_id.as_deref(), Some("pay-1"));
    assert_eq!(row.payload, [0xde, 0xad, 0x00, 0xbe, 0xef]);
    assert_eq!(row.error, "provider down");
    assert_eq!(row.error_kind, "transient");
    assert_eq!(row.attempts, 2);
    assert_eq!(row.status, Status::Pending);
    assert!(row.properties.contains("application/octet-stream"));
    assert!(queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await);
    supervisor.close().await;
    for q in policy.tier_queues(&queue) {
        delete_queue(&publisher, &q).await;
    }
    delete_queue(&publisher, &queue).await;
}

/// Every arrival of one failing message (published twice under one
/// message-id, as an ack lost in a cut redelivers it) is one row to review,
/// with its occurrences counted. Before fingerprints, each was a row of its
/// own and an operator reviewed the same payment twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_arrival_of_one_failing_message_is_one_row() {
    init_tracing();
    let queue = unique("store-once");
    let store = sqlite_store().await;
    let policy = RetryPolicy::new().exhausted(Exhausted::Store);
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy)
            .compensation_store(store.clone(), Duration::from_secs(60)),
        &recorder,
        |_, _| async { Outcome::reject("card declined") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let publisher = connect().await;
    let channel = confirmed_channel(&publisher).await;
    // The last pay-1 has another body: a producer that reused the id. It is
    // a message of its own, and must not be acked as an occurrence of the
    // first (its body would be stored nowhere).
    let arrivals = [
        ("pay-1", "a"),
        ("pay-1", "a"),
        ("pay-2", "b"),
        ("pay-1", "a"),
        ("pay-1", "c"),
    ];
    for (id, body) in arrivals {
        publish_confirmed(
            &channel,
            "",
            &queue,
            body.as_bytes(),
            lapin::BasicProperties::default()
                .with_message_id(id.into())
                .with_delivery_mode(2),
        )
        .await;
    }
    wait_stats(&consumer, "five arrivals stored", |s| s.stored == 5).await;
    consumer.shutdown().await.expect("clean shutdown");
    let mut rows: Vec<(String, String, i64)> = rows_of(&store, &queue)
        .await
        .into_iter()
        .map(|r| {
            (
                r.message_id.unwrap_or_default(),
                String::from_utf8_lossy(&r.payload).into_owned(),
                r.occurrences,
            )
        })
        .collect();
    rows.sort();
    let row = |id: &str, body: &str, n| (id.to_owned(), body.to_owned(), n);
    assert_eq!(
        rows,
        [
            row("pay-1", "a", 3),
            row("pay-1", "c", 1),
            row("pay-2", "b", 1)
        ]
    );
    assert!(queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_nothing_is_acked_and_nothing_is_lost() {
    init_tracing();
    let queue = unique("store-down");
    // PostgreSQL behind the test kit's proxy: dropping the proxy makes the
    // database unreachable, exactly as a stopped server is to the client.
    let pg: SocketAddr = "127.0.0.1:5432".parse().expect("address");
    let proxy = FaultProxy::start(pg).await.expect("proxy");
    let port = proxy.addr();
    let url = postgres_url().replace("127.0.0.1:5432", &port.to_string());
    let store = Arc::new(SqlStore::connect(&url).await.expect("store via proxy"));
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(RetryPolicy::new().exhausted(Exhausted::Store))
            .compensation_store(store.clone(), Duration::from_secs(60)),
        &recorder,
        |_, _| async { Outcome::reject("needs a person") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    drop(proxy);
    let publisher = connect().await;
    publish(&publisher, &queue, 5, "m", |_| b"{}".to_vec()).await;
    wait_stats(&consumer, "failed store writes", |s| s.store_failures >= 5).await;
    assert_eq!(consumer.stats().stored, 0);
    // Not acked: all five are still held by the broker.
    assert!(queue_is(&queue, |c| c.ready + c.unacked == 5).await);

    let _proxy = FaultProxy::start_on(port, pg)
        .await
        .expect("the database is back");
    wait_until("all five stored", Duration::from_secs(60), || {
        let stored = consumer.stats().stored;
        async move { stored == 5 }
    })
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(report.stored, 5);
    assert_eq!(report.dead_lettered, 0);
    let rows = rows_of(&store, &queue).await;
    let mut ids: Vec<String> = rows.iter().filter_map(|r| r.message_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["m-0", "m-1", "m-2", "m-3", "m-4"]);
    assert!(queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scanner_redrives_rows_until_they_succeed_or_need_review() {
    init_tracing();
    let queue = unique("scanned");
    let store = sqlite_store().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let healthy = Arc::new(AtomicBool::new(false));
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(RetryPolicy::new().exhausted(Exhausted::Store))
            .compensation_store(store.clone(), Duration::ZERO),
        &recorder,
        {
            let healthy = healthy.clone();
            move |d, _| {
                let healthy = healthy.clone();
                async move {
                    // m-0 recovers once the provider is back; m-1 never does.
                    if healthy.load(Ordering::SeqCst) && d.message_id() == Some("m-0") {
                        Outcome::Ack
                    } else {
                        Outcome::retry("provider down")
                    }
                }
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 2, "m", |_| b"{}".to_vec()).await;
    wait_stats(&consumer, "both stored", |s| s.stored == 2).await;
    healthy.store(true, Ordering::SeqCst);

    let scanner = Scanner::new(
        store.clone(),
        Redrive::Republish(supervisor.clone()),
        ScannerConfig {
            max_attempts: 3,
            backoff: Duration::ZERO,
            ..ScannerConfig::default()
        },
    );
    // Each poll runs one scan, then looks at the rows: a re-driven message
    // goes back through the consumer, which fails m-1 again and updates its
    // row, until the scanner hands it to a person.
    let expected = |rows: &[backstop::store::FailedRow]| {
        let status = |id: &str| {
            rows.iter()
                .find(|r| r.message_id.as_deref() == Some(id))
                .map(|r| r.status)
        };
        status("m-0") == Some(Status::Replayed) && status("m-1") == Some(Status::NeedsReview)
    };
    wait_until(
        "m-0 replayed and m-1 in review",
        Duration::from_secs(60),
        || {
            let scanner = scanner.clone();
            let store = store.clone();
            let queue = queue.clone();
            let handled = recorder.distinct_handled();
            async move {
                scanner.run_once().await.expect("scan");
                handled == 1 && expected(&rows_of(&store, &queue).await)
            }
        },
    )
    .await;
    let rows = rows_of(&store, &queue).await;
    let status_of = |id: &str| {
        rows.iter()
            .find(|r| r.message_id.as_deref() == Some(id))
            .map(|r| (r.status, r.redrives))
    };
    assert_eq!(status_of("m-0").map(|s| s.0), Some(Status::Replayed));
    assert_eq!(status_of("m-1"), Some((Status::NeedsReview, 4)));
    assert_eq!(
        recorder.calls_of("m-1"),
        4,
        "the original call and three re-drives"
    );
    consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

/// The real store, with one fault trigger: the broker stops answering (the
/// proxy in front of it is blackholed) right after the scanner claims its
/// rows, so the claimed rows' re-drives get no confirm.
#[derive(Debug)]
struct SilentAfterClaim {
    inner: Arc<SqlStore>,
    proxy: Arc<FaultProxy>,
}

impl CompensationStore for SilentAfterClaim {
    fn store<'a>(
        &'a self,
        message: &'a backstop::store::NewFailedMessage,
    ) -> BoxFuture<'a, Result<i64, StoreError>> {
        self.inner.store(message)
    }
    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        now: i64,
        lease_until: i64,
        limit: i64,
        queue: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<FailedRow>, StoreError>> {
        Box::pin(async move {
            let rows = self
                .inner
                .claim_due(owner, now, lease_until, limit, queue)
                .await;
            self.proxy.blackhole();
            rows
        })
    }
    fn renew_lease<'a>(
        &'a self,
        owner: &'a str,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.renew_lease(owner, id, now, lease_until)
    }
    fn finish_redrives<'a>(
        &'a self,
        owner: &'a str,
        outcomes: &'a [(i64, backstop::store::RedriveOutcome)],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.inner.finish_redrives(owner, outcomes)
    }
    fn list<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<FailedRow>, StoreError>> {
        self.inner.list(filter)
    }
    fn get(&self, id: i64) -> BoxFuture<'_, Result<FailedRow, StoreError>> {
        self.inner.get(id)
    }
    fn act<'a>(
        &'a self,
        id: i64,
        action: backstop::store::ManualAction,
        actor: &'a str,
        note: Option<&'a str>,
    ) -> BoxFuture<'a, Result<FailedRow, StoreError>> {
        self.inner.act(id, action, actor, note)
    }
    fn audit(
        &self,
        id: i64,
    ) -> BoxFuture<'_, Result<Vec<backstop::store::AuditEntry>, StoreError>> {
        self.inner.audit(id)
    }
    fn purge_finished<'a>(
        &'a self,
        before: i64,
        queue: Option<&'a str>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.inner.purge_finished(before, queue)
    }
    fn count_by_status(&self) -> BoxFuture<'_, Result<Vec<(Status, i64)>, StoreError>> {
        self.inner.count_by_status()
    }
}

/// A re-drive that gets no confirm (the broker stops answering after the
/// claim) has an unknown outcome: the row keeps its lease and no failure is
/// recorded (a failure would re-drive it again after the back-off, while the
/// copy may still land). The scan ends there, so the other claimed row is
/// left untouched instead of failing on the given-up channel and burning a
/// re-drive attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_without_a_confirm_is_unknown_and_ends_the_scan() {
    init_tracing();
    let queue = unique("redrive-silent");
    let publisher = connect().await;
    durable_queue(&publisher, &queue).await;
    let inner = sqlite_store().await;
    let due = backstop::retry::now_ms() as i64 - 1_000;
    for n in 0..2 {
        inner
            .store(&backstop::store::NewFailedMessage {
                queue: queue.clone(),
                exchange: String::new(),
                routing_key: queue.clone(),
                message_id: Some(format!("m-{n}")),
                dedup_key: None,
                payload: b"{}".to_vec(),
                headers: "{}".to_owned(),
                properties: "{}".to_owned(),
                error: "provider down".to_owned(),
                error_kind: "transient".to_owned(),
                attempts: 1,
                next_attempt_at: due + n,
                store_id: None,
                fingerprint: format!("id:m-{n}"),
            })
            .await
            .expect("row");
    }
    let proxy = Arc::new(FaultProxy::start(broker_addr()).await.expect("proxy"));
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(60));
    let store = Arc::new(SilentAfterClaim {
        inner: inner.clone(),
        proxy: proxy.clone(),
    });
    let scanner = Scanner::new(
        store,
        Redrive::Republish(supervisor.clone()),
        ScannerConfig {
            // A side effect may take half the lease, 32 s: the publisher's
            // own 30 s confirm bound ends the publish first.
            lease: Duration::from_secs(64),
            max_attempts: 5,
            queue: Some(queue.clone()),
            ..ScannerConfig::default()
        },
    );
    let report = tokio::time::timeout(Duration::from_secs(90), scanner.run_once())
        .await
        .expect("the scan ends")
        .expect("scan");
    proxy.restore();
    assert_eq!(report.claimed, 2, "{report:?}");
    assert_eq!(
        (
            report.unknown,
            report.failed,
            report.needs_review,
            report.redriven
        ),
        (1, 0, 0, 0),
        "one unknown outcome, no failure recorded: {report:?}"
    );
    for row in rows_of(&inner, &queue).await {
        assert_eq!(
            row.error, "provider down",
            "no failure was recorded: {row:?}"
        );
    }
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

/// An operator edits a stored message and re-drives it; the edited copy
/// fails again in the consumer. Its body (and so its fingerprint) is the
/// edit's, not the row's, yet it is the row's own re-drive: the same row
/// records it (`failed_again`, with the copy's fingerprint), and no new row
/// is cut off from the edit. It used to become a second, unrelated row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_copy_that_fails_again_stays_on_its_row() {
    init_tracing();
    let queue = unique("edited-again");
    let store = sqlite_store().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(RetryPolicy::new().exhausted(Exhausted::Store))
            .compensation_store(store.clone(), Duration::ZERO),
        &recorder,
        |_, _| async { Outcome::retry("amount rejected") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 1, "m", |_| b"{\"amount\": -1}".to_vec()).await;
    wait_stats(&consumer, "stored", |s| s.stored == 1).await;
    let rows = rows_of(&store, &queue).await;
    assert_eq!(rows.len(), 1);
    let id = rows[0].id;
    let original_fingerprint = rows[0].fingerprint.clone();
    let edited = b"{\"amount\": 5}".to_vec();
    store
        .edit(id, edited.clone(), None, "ana", "amount fixed", true)
        .await
        .expect("edit and retry");

    let scanner = Scanner::new(
        store.clone(),
        Redrive::Republish(supervisor.clone()),
        ScannerConfig {
            queue: Some(queue.clone()),
            backoff: Duration::from_secs(3600),
            ..ScannerConfig::default()
        },
    );
    wait_until("the edited copy re-driven", Duration::from_secs(30), || {
        let scanner = scanner.clone();
        let store = store.clone();
        async move {
            scanner.run_once().await.expect("scan");
            store.get(id).await.expect("get").redrives >= 1
        }
    })
    .await;
    wait_stats(&consumer, "the edited copy stored again", |s| s.stored == 2).await;
    let rows = rows_of(&store, &queue).await;
    assert_eq!(
        rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        [id],
        "no new row: {rows:?}"
    );
    let audit: Vec<String> = store
        .audit(id)
        .await
        .expect("audit")
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert!(audit.contains(&"failed_again".to_owned()), "{audit:?}");
    let row = store.get(id).await.expect("get");
    assert_eq!((row.payload, row.version), (edited, 1));
    assert_eq!(row.status, Status::Retrying);
    assert_ne!(
        row.fingerprint, original_fingerprint,
        "the copy's fingerprint"
    );
    assert_eq!(
        recorder.calls_of("m-0"),
        2,
        "the original and the edited copy"
    );
    consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}
