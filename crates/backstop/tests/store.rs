//! One behaviour suite for the compensation store, run against SQLite and
//! against the PostgreSQL that scripts/test starts.

use crate::common;
use backstop::retry::now_ms;
use backstop::store::{
    CompensationStore, ListFilter, ManualAction, NewFailedMessage, Redrive, RedriveFn,
    RedriveOutcome, Scanner, ScannerConfig, SqlStore, Status, StoreError,
};
use backstop_testkit::{unique, wait_until};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn message(queue: &str, n: i64, due: i64) -> NewFailedMessage {
    NewFailedMessage {
        queue: queue.to_owned(),
        exchange: "orders-ex".to_owned(),
        routing_key: "order.created".to_owned(),
        message_id: Some(format!("m-{n}")),
        dedup_key: Some(format!("order-{n}")),
        // Not UTF-8, with a NUL: stored byte for byte.
        payload: vec![0xff, 0x00, b'{', b'}', n as u8],
        headers: r#"{"x-tenant":{"LongString":[97,99,109,101]}}"#.to_owned(),
        properties: r#"{"content_type":"application/json"}"#.to_owned(),
        error: "payment provider timed out".to_owned(),
        error_kind: "transient".to_owned(),
        attempts: 4,
        next_attempt_at: due,
        store_id: None,
        fingerprint: format!("key:order-{n}"),
    }
}

async fn a_row_keeps_every_field(store: SqlStore) {
    let queue = unique("store-fields");
    let due = now_ms() as i64 + 60_000;
    let m = message(&queue, 7, due);
    let id = store.store(&m).await.expect("store");
    let row = store.get(id).await.expect("get");
    assert_eq!(row.queue, m.queue);
    assert_eq!(row.exchange, m.exchange);
    assert_eq!(row.routing_key, m.routing_key);
    assert_eq!(row.message_id, m.message_id);
    assert_eq!(row.dedup_key, m.dedup_key);
    assert_eq!(row.payload, m.payload);
    assert_eq!(row.headers, m.headers);
    assert_eq!(row.properties, m.properties);
    assert_eq!(row.error, m.error);
    assert_eq!(row.error_kind, "transient");
    assert_eq!(row.attempts, 4);
    assert_eq!(row.redrives, 0);
    assert_eq!(row.status, Status::Pending);
    assert_eq!(row.next_attempt_at, due);
    assert!(row.created_at > 0 && row.updated_at == row.created_at);
    let audit = store.audit(id).await.expect("audit");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "stored");
    assert!(matches!(store.get(-1).await, Err(StoreError::NotFound(-1))));
}

async fn only_due_rows_are_claimed_and_a_lease_holds_them(store: SqlStore) {
    let queue = unique("store-claim");
    let now = now_ms() as i64;
    let due = store
        .store(&message(&queue, 1, now - 1))
        .await
        .expect("store");
    let later = store
        .store(&message(&queue, 2, now + 3_600_000))
        .await
        .expect("store");
    let elsewhere = store
        .claim_due("a", now, now + 60_000, 10_000, Some("some-other-queue"))
        .await
        .expect("claim");
    assert!(elsewhere.iter().all(|r| r.queue == "some-other-queue"));
    let claimed: Vec<i64> = store
        .claim_due("a", now, now + 60_000, 10_000, Some(&queue))
        .await
        .expect("claim")
        .into_iter()
        .filter(|r| r.queue == queue)
        .map(|r| r.id)
        .collect();
    assert_eq!(claimed, [due]);
    let again = store
        .claim_due("b", now, now + 60_000, 10_000, Some(&queue))
        .await
        .expect("claim");
    assert!(
        again.iter().all(|r| r.id != due),
        "a leased row is not claimed twice"
    );
    assert_eq!(store.get(due).await.expect("get").status, Status::Retrying);

    let failed = RedriveOutcome::Failed {
        error: "still down".into(),
        next_attempt_at: now - 1,
        give_up: false,
    };
    store
        .finish_redrives("a", &[(due, failed)])
        .await
        .expect("finish");
    let row = store.get(due).await.expect("get");
    assert_eq!(
        (row.status, row.redrives, row.error.as_str()),
        (Status::Retrying, 1, "still down")
    );
    // The lease is released: it is due again.
    let claimed = store
        .claim_due("b", now, now + 60_000, 10_000, Some(&queue))
        .await
        .expect("claim");
    assert!(claimed.iter().any(|r| r.id == due));
    let give_up = RedriveOutcome::Failed {
        error: "gave up".into(),
        next_attempt_at: now,
        give_up: true,
    };
    store
        .finish_redrives("b", &[(due, give_up)])
        .await
        .expect("finish");
    assert_eq!(
        store.get(due).await.expect("get").status,
        Status::NeedsReview
    );
    assert_eq!(store.get(later).await.expect("get").status, Status::Pending);
    let actions: Vec<String> = store
        .audit(due)
        .await
        .expect("audit")
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(actions, ["stored", "redrive_failed", "needs_review"]);
}

async fn manual_actions_follow_the_state_machine_and_are_audited(store: SqlStore) {
    let queue = unique("store-manual");
    let now = now_ms() as i64;
    let a = store.store(&message(&queue, 1, now)).await.expect("store");
    let b = store.store(&message(&queue, 2, now)).await.expect("store");
    let row = store
        .act(a, ManualAction::Resolve, "alice", Some("refunded by hand"))
        .await
        .expect("resolve");
    assert_eq!(row.status, Status::Resolved);
    let err = store
        .act(a, ManualAction::Discard, "alice", Some("oops"))
        .await;
    assert!(
        matches!(err, Err(StoreError::InvalidTransition { .. })),
        "{err:?}"
    );
    store
        .act(b, ManualAction::Discard, "bob", Some("duplicate order"))
        .await
        .expect("discard");
    // Re-opening a finished row takes a forced retry, audited as such.
    let err = store.act(b, ManualAction::Retry, "bob", None).await;
    assert!(
        matches!(
            err,
            Err(StoreError::InvalidTransition {
                status: Status::Discarded,
                ..
            })
        ),
        "{err:?}"
    );
    let row = store
        .act(b, ManualAction::ForceRetry, "bob", None)
        .await
        .expect("forced retry");
    assert_eq!(row.status, Status::Pending);
    let last = store
        .audit(b)
        .await
        .expect("audit")
        .pop()
        .expect("an entry");
    assert_eq!(
        (last.actor.as_str(), last.action.as_str()),
        ("bob", "force_retry")
    );
    // A row a scanner holds right now is not taken from it.
    let c = store
        .store(&message(&queue, 3, now - 1))
        .await
        .expect("store");
    store
        .claim_due("holder", now, now + 60_000, 10_000, Some(&queue))
        .await
        .expect("claim");
    let held = store.act(c, ManualAction::Resolve, "carol", None).await;
    assert!(
        matches!(held, Err(StoreError::InvalidTransition { .. })),
        "{held:?}"
    );
    let audit = store.audit(a).await.expect("audit");
    let last = audit.last().expect("an entry");
    assert_eq!(
        (last.actor.as_str(), last.action.as_str()),
        ("alice", "resolve")
    );
    assert_eq!(last.note.as_deref(), Some("refunded by hand"));
    let listed = store
        .list(&ListFilter {
            status: Some(Status::Resolved),
            queue: Some(queue.clone()),
            limit: None,
        })
        .await
        .expect("list");
    assert_eq!(listed.iter().map(|r| r.id).collect::<Vec<_>>(), [a]);
}

async fn a_failed_redrive_updates_its_own_row(store: SqlStore) {
    let queue = unique("store-again");
    let now = now_ms() as i64;
    let id = store.store(&message(&queue, 1, now)).await.expect("store");
    store
        .claim_due("s", now, now + 60_000, 10_000, Some(&queue))
        .await
        .expect("claim");
    store
        .finish_redrives("s", &[(id, RedriveOutcome::Replayed)])
        .await
        .expect("replayed");
    let mut again = message(&queue, 1, now + 5);
    again.store_id = Some(id);
    again.error = "declined again".into();
    again.attempts = 1;
    assert_eq!(store.store(&again).await.expect("store"), id);
    let row = store.get(id).await.expect("get");
    assert_eq!(
        (row.status, row.attempts, row.error.as_str()),
        (Status::Retrying, 5, "declined again")
    );
    let rows = store
        .list(&ListFilter {
            queue: Some(queue),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(rows.len(), 1, "no second row for the same message");
}

/// A handler whose middleware copied `x-backstop-store-id` onto a new
/// message B: B's failure must not update the old row (that acked B with its
/// body stored nowhere). The id is trusted only with the row's own queue and
/// fingerprint.
async fn a_copied_store_id_header_cannot_take_over_another_row(store: SqlStore) {
    let queue = unique("store-fence");
    let now = now_ms() as i64;
    let a = store
        .store(&message(&queue, 1, now))
        .await
        .expect("store a");
    let mut b = message(&queue, 2, now);
    b.store_id = Some(a);
    b.payload = b"the body of B".to_vec();
    let b_id = store.store(&b).await.expect("store b");
    assert_ne!(b_id, a, "B updated A's row");
    assert_eq!(store.get(b_id).await.expect("get b").payload, b.payload);
    let row_a = store.get(a).await.expect("get a");
    assert_eq!(
        (row_a.payload, row_a.attempts),
        (message(&queue, 1, now).payload, 4)
    );
    // Another queue's message with A's id and even A's fingerprint: no.
    let other_queue = unique("store-fence-other");
    let mut c = message(&other_queue, 1, now);
    c.store_id = Some(a);
    let c_id = store.store(&c).await.expect("store c");
    assert_ne!(c_id, a);
    assert_eq!(store.get(c_id).await.expect("get c").queue, other_queue);
}

/// The same failing message arriving again (an ack lost in a cut, a
/// duplicate publish) is one row with its occurrences counted and audited,
/// while it is unfinished; once finished, a new arrival is a new row.
async fn a_repeat_of_an_unfinished_message_is_one_row_with_occurrences(store: SqlStore) {
    let queue = unique("store-repeat");
    let now = now_ms() as i64;
    let first = store
        .store(&message(&queue, 1, now + 60_000))
        .await
        .expect("store");
    let mut again = message(&queue, 1, now + 60_000);
    again.error = "declined, again".into();
    assert_eq!(store.store(&again).await.expect("store again"), first);
    assert_eq!(store.store(&again).await.expect("store third"), first);
    let other = store
        .store(&message(&queue, 2, now))
        .await
        .expect("store other");
    assert_ne!(other, first, "a different message is a row of its own");
    let row = store.get(first).await.expect("get");
    assert_eq!(row.occurrences, 3);
    assert_eq!(row.error, "declined, again");
    assert_eq!(row.fingerprint, "key:order-1");
    let actions: Vec<String> = store
        .audit(first)
        .await
        .expect("audit")
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["stored", "stored_again", "stored_again"]);
    // Needs review is still unfinished: a repeat joins it.
    store
        .act(first, ManualAction::Resolve, "op", None)
        .await
        .expect("resolve");
    let fresh = store
        .store(&message(&queue, 1, now))
        .await
        .expect("store after resolve");
    assert_ne!(
        fresh, first,
        "a finished row is not reopened by a new arrival"
    );
    // Re-opening the old row by hand would make two unfinished rows of one
    // message: refused, naming the row to act on.
    let err = store
        .act(first, ManualAction::ForceRetry, "op", None)
        .await
        .expect_err("a second unfinished row");
    assert_eq!(
        err,
        StoreError::StillOpen {
            id: first,
            open: fresh
        }
    );
    let rows = store
        .list(&ListFilter {
            queue: Some(queue),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(rows.len(), 3);
}

/// Many instances storing the same message at once still make one row.
async fn concurrent_stores_of_one_message_make_one_row(store: SqlStore) {
    let queue = unique("store-race");
    let now = now_ms() as i64;
    let store = Arc::new(store);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, queue) = (store.clone(), queue.clone());
            tokio::spawn(async move { store.store(&message(&queue, 9, now)).await })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("task").expect("stored"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one row: {ids:?}");
    assert_eq!(store.get(ids[0]).await.expect("get").occurrences, 16);
}

async fn retention_removes_only_old_finished_rows(store: SqlStore) {
    let queue = unique("store-retention");
    let now = now_ms() as i64;
    let done = store.store(&message(&queue, 1, now)).await.expect("store");
    let open = store.store(&message(&queue, 2, now)).await.expect("store");
    store
        .act(done, ManualAction::Discard, "ops", Some("old"))
        .await
        .expect("discard");
    assert_eq!(
        store
            .purge_finished(now - 60_000, Some(&queue))
            .await
            .expect("purge"),
        0,
        "too recent"
    );
    assert_eq!(
        store.get(done).await.expect("too recent to purge").status,
        Status::Discarded
    );
    let removed = store
        .purge_finished(now_ms() as i64 + 1, Some(&queue))
        .await
        .expect("purge");
    assert_eq!(removed, 1, "only the finished row");
    assert!(matches!(
        store.get(done).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.get(open).await.expect("open rows stay").status,
        Status::Pending
    );
}

/// Re-drives recorded by scanner name, row id and time.
type Redrives = Arc<Mutex<Vec<(&'static str, i64, std::time::Instant)>>>;

/// A re-drive that records itself and takes `work`.
fn slow_redrive(name: &'static str, log: &Redrives, work: Duration) -> RedriveFn {
    let log = log.clone();
    Arc::new(move |row| {
        let log = log.clone();
        Box::pin(async move {
            log.lock()
                .expect("log")
                .push((name, row.id, std::time::Instant::now()));
            tokio::time::sleep(work).await;
            Ok(())
        })
    })
}

fn scanner_of(
    store: &Arc<dyn CompensationStore>,
    queue: &str,
    owner: &str,
    lease: Duration,
    redrive: RedriveFn,
) -> Scanner {
    Scanner::new(
        store.clone(),
        Redrive::Handler(redrive),
        ScannerConfig {
            owner: owner.to_owned(),
            lease,
            queue: Some(queue.to_owned()),
            ..ScannerConfig::default()
        },
    )
}

/// Scanner A claims four rows under a 1 s lease and re-drives them 400 ms
/// each, so its batch outlives the lease. Scanner B keeps scanning meanwhile.
/// Before leases were renewed per row and rows finished one by one, B took
/// the rows whose lease had run out and both re-drove them.
async fn a_batch_that_outlives_its_lease_is_never_redriven_twice(store: SqlStore) {
    let queue = unique("store-lease");
    let now = now_ms() as i64;
    for n in 0..4 {
        store
            .store(&message(&queue, n, now - 1))
            .await
            .expect("store");
    }
    let store: Arc<dyn CompensationStore> = Arc::new(store);
    let log: Redrives = Arc::default();
    let a = scanner_of(
        &store,
        &queue,
        "scanner-a",
        Duration::from_secs(1),
        slow_redrive("a", &log, Duration::from_millis(400)),
    );
    let b = scanner_of(
        &store,
        &queue,
        "scanner-b",
        Duration::from_secs(60),
        slow_redrive("b", &log, Duration::ZERO),
    );
    let a_scan = tokio::spawn(async move { a.run_once().await });
    wait_until("A's first re-drive", Duration::from_secs(10), || {
        let started = !log.lock().expect("log").is_empty();
        async move { started }
    })
    .await;
    // B scans until A's batch is over, then once more.
    while !a_scan.is_finished() {
        b.run_once().await.expect("b scans");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_report = a_scan.await.expect("a").expect("a scans");
    b.run_once().await.expect("b scans");
    assert_eq!(a_report.claimed, 4);
    let log = log.lock().expect("log").clone();
    let mut per_row: HashMap<i64, Vec<&str>> = HashMap::new();
    for (name, id, _) in &log {
        per_row.entry(*id).or_default().push(name);
    }
    assert_eq!(per_row.len(), 4, "every row re-driven: {per_row:?}");
    assert!(
        per_row.values().all(|by| by.len() == 1),
        "a row re-driven twice: {per_row:?}"
    );
}

/// Once a row's lease ran out, an operator may discard it; the scanner that
/// claimed it must then leave it alone. Before, it re-drove the discarded
/// row anyway, later in its batch.
async fn a_row_discarded_after_the_lease_ran_out_is_not_redriven(store: SqlStore) {
    let queue = unique("store-discard");
    let now = now_ms() as i64;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(
            store
                .store(&message(&queue, n, now - 1))
                .await
                .expect("store"),
        );
    }
    let last = *ids.last().expect("four rows");
    let store: Arc<dyn CompensationStore> = Arc::new(store);
    let log: Redrives = Arc::default();
    let lease = Duration::from_secs(1);
    let a = scanner_of(
        &store,
        &queue,
        "scanner-a",
        lease,
        slow_redrive("a", &log, Duration::from_millis(400)),
    );
    let a_scan = tokio::spawn(async move { a.run_once().await });
    // The claim came before the first re-drive: once a lease has passed since
    // then, the last row's claim has run out and a person may act on it.
    wait_until("the first re-drive", Duration::from_secs(10), || {
        let started = !log.lock().expect("log").is_empty();
        async move { started }
    })
    .await;
    let first = log.lock().expect("log")[0].2;
    let mut discarded_at = None;
    while discarded_at.is_none() && !a_scan.is_finished() {
        if first.elapsed() > lease {
            match store
                .act(
                    last,
                    ManualAction::Discard,
                    "op",
                    Some("refund done by hand"),
                )
                .await
            {
                Ok(_) => discarded_at = Some(std::time::Instant::now()),
                Err(StoreError::InvalidTransition { .. }) => {}
                Err(e) => panic!("discard: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a_scan.await.expect("a").expect("a scans");
    let discarded_at =
        discarded_at.expect("the operator's discard went through before A reached the row");
    let log = log.lock().expect("log").clone();
    assert!(
        !log.iter()
            .any(|(_, id, at)| *id == last && *at > discarded_at),
        "the discarded row was re-driven after the discard: {log:?}"
    );
    assert_eq!(
        store.get(last).await.expect("get").status,
        Status::Discarded
    );
}

async fn two_scanners_never_claim_the_same_row(store: SqlStore) {
    let queue = unique("store-scanners");
    let now = now_ms() as i64;
    let mut ids = Vec::new();
    for n in 0..200 {
        ids.push(
            store
                .store(&message(&queue, n, now - 1))
                .await
                .expect("store"),
        );
    }
    let store: Arc<dyn CompensationStore> = Arc::new(store);
    let seen: Arc<Mutex<HashMap<i64, u32>>> = Arc::default();
    // The first two re-drives meet at a barrier. A scanner handles its rows
    // one after another, so the second to arrive is necessarily the other
    // scanner, holding a claim of its own at the same moment: the claims
    // overlap for certain, with no sleep involved.
    let gate = Arc::new(tokio::sync::Barrier::new(2));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let redrive: RedriveFn = {
        let seen = seen.clone();
        let queue = queue.clone();
        Arc::new(move |row| {
            let seen = seen.clone();
            let gate = gate.clone();
            let calls = calls.clone();
            let ours = row.queue == queue;
            Box::pin(async move {
                if ours {
                    *seen.lock().expect("seen").entry(row.id).or_insert(0) += 1;
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                        gate.wait().await;
                    }
                }
                tokio::task::yield_now().await;
                Ok(())
            })
        })
    };
    let scanner = |owner: &str| {
        Scanner::new(
            store.clone(),
            Redrive::Handler(redrive.clone()),
            ScannerConfig {
                batch: 7,
                owner: owner.to_owned(),
                // This test's rows only: another binary's rows in the
                // shared database are not ours to resolve.
                queue: Some(queue.clone()),
                ..ScannerConfig::default()
            },
        )
    };
    let (a, b) = (scanner("scanner-a"), scanner("scanner-b"));
    let run = |s: Scanner| {
        tokio::spawn(async move {
            let mut claimed = 0;
            loop {
                let report = s.run_once().await.expect("scan");
                if report.claimed == 0 {
                    return claimed;
                }
                claimed += report.claimed;
            }
        })
    };
    let (ca, cb) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(run(a), run(b))
    })
    .await
    .expect("both scanners reach the barrier: their claims overlap");
    let (ca, cb) = (ca.expect("a"), cb.expect("b"));
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 200, "every row re-driven");
    assert!(seen.values().all(|n| *n == 1), "a row was claimed twice");
    assert!(ca > 0 && cb > 0, "both scanners worked: {ca} and {cb}");
    for id in ids {
        assert_eq!(store.get(id).await.expect("get").status, Status::Resolved);
    }
}

async fn a_bad_url_is_named(make_url: fn() -> String) {
    let err = SqlStore::connect(&make_url()).await.expect_err("must fail");
    assert!(
        matches!(
            err,
            StoreError::InvalidUrl { .. } | StoreError::Unavailable(_)
        ),
        "{err}"
    );
}

/// A scan stopped during its first row gives the rows it never started back
/// at once, their claim not counted: an early end (a stop, an unknown
/// outcome) never brings a row nearer to `needs_review`. Before, they kept
/// the lease until it ran out, and each such scan counted a re-drive against
/// every one of them.
async fn rows_a_stopped_scan_never_tried_are_given_back_uncounted(store: SqlStore) {
    let queue = unique("store-untried");
    let now = now_ms() as i64;
    for n in 0..4 {
        store
            .store(&message(&queue, n, now - 1))
            .await
            .expect("store");
    }
    let store: Arc<dyn CompensationStore> = Arc::new(store);
    let log: Redrives = Arc::default();
    let scanner = scanner_of(
        &store,
        &queue,
        "scanner-a",
        Duration::from_secs(600),
        slow_redrive("a", &log, Duration::from_secs(30)),
    );
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let scan = tokio::spawn(async move { scanner.run_once_until(&mut stopped).await });
    wait_until("the first re-drive starts", Duration::from_secs(10), || {
        let started = !log.lock().expect("log").is_empty();
        async move { started }
    })
    .await;
    stop.send(true).expect("the scan listens");
    let report = tokio::time::timeout(Duration::from_secs(10), scan)
        .await
        .expect("the scan ends at the stop")
        .expect("join")
        .expect("scan");
    assert_eq!(
        (report.claimed, report.unknown, report.released),
        (4, 1, 3),
        "{report:?}"
    );
    // Another scanner takes the three at once, each counted once; the row
    // whose re-drive the stop cut keeps its lease (its outcome is unknown).
    let now = now_ms() as i64;
    let taken = store
        .claim_due("scanner-b", now, now + 60_000, 10, Some(&queue))
        .await
        .expect("claim");
    let started = log.lock().expect("log")[0].1;
    assert_eq!(taken.len(), 3, "{taken:?}");
    assert!(
        taken
            .iter()
            .all(|row| row.redrives == 1 && row.id != started),
        "{taken:?}"
    );
}

// Every behaviour test, once per backend; PostgreSQL tests take turns.
common::both_backends!(
    a_row_keeps_every_field,
    only_due_rows_are_claimed_and_a_lease_holds_them,
    manual_actions_follow_the_state_machine_and_are_audited,
    a_failed_redrive_updates_its_own_row,
    a_copied_store_id_header_cannot_take_over_another_row,
    a_repeat_of_an_unfinished_message_is_one_row_with_occurrences,
    concurrent_stores_of_one_message_make_one_row,
    retention_removes_only_old_finished_rows,
    a_batch_that_outlives_its_lease_is_never_redriven_twice,
    a_row_discarded_after_the_lease_ran_out_is_not_redriven,
    two_scanners_never_claim_the_same_row,
    rows_a_stopped_scan_never_tried_are_given_back_uncounted,
);

#[tokio::test]
async fn bad_store_urls_are_named() {
    a_bad_url_is_named(|| "mysql://x/y".to_owned()).await;
    a_bad_url_is_named(|| "sqlite://".to_owned()).await;
    let err = SqlStore::connect("postgres://backstop:secret@127.0.0.1:1/none")
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_transient(), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
}
