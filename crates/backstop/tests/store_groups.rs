//! Failure groups, group actions and edited payloads, on SQLite and on
//! PostgreSQL; the last test re-drives an edited row through the real
//! scanner and broker.

mod common;

use backstop::retry::now_ms;
use backstop::store::ListFilter;
use backstop::store::{
    CompensationStore, GroupKey, GroupProgress, ManualAction, NewFailedMessage, Redrive, Scanner,
    ScannerConfig, SqlStore, Status, StoreError, run_group_action,
};
use backstop_testkit::{
    FaultProxy, amqp_url, broker_addr, postgres_url, unique, url_via, wait_until,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// PostgreSQL tests share one database: they take turns.
static POSTGRES_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sqlite() -> SqlStore {
    let path = std::env::temp_dir().join(format!("{}.db", unique("backstop-groups")));
    SqlStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("sqlite store")
}

async fn postgres() -> SqlStore {
    SqlStore::connect(&postgres_url())
        .await
        .expect("postgres store")
}

/// A failed message of `queue`, number `n`, with `error`; due in an hour
/// (no scanner of another test takes it).
fn failure(queue: &str, n: u64, kind: &str, error: &str) -> NewFailedMessage {
    NewFailedMessage {
        queue: queue.to_owned(),
        exchange: String::new(),
        routing_key: queue.to_owned(),
        message_id: Some(format!("m-{n}")),
        dedup_key: None,
        payload: format!("{{\"order\": {n}}}\n").into_bytes(),
        headers: "{}".to_owned(),
        properties: format!(r#"{{"message_id":"m-{n}"}}"#),
        error: error.to_owned(),
        error_kind: kind.to_owned(),
        attempts: 3,
        next_attempt_at: now_ms() as i64 + 3_600_000,
        store_id: None,
        fingerprint: format!("id:m-{n}"),
    }
}

fn key(queue: &str, kind: &str, cause: &str) -> GroupKey {
    GroupKey {
        queue: queue.to_owned(),
        error_kind: kind.to_owned(),
        cause: cause.to_owned(),
    }
}

/// Stores `n` rows of one cause (numbers differ), numbered from `from`, in
/// one transaction; returns their ids, ascending.
async fn seed(store: &SqlStore, queue: &str, from: u64, n: u64) -> Vec<i64> {
    let messages: Vec<NewFailedMessage> = (from..from + n)
        .map(|i| {
            let error = format!("order {i} declined by bank {}", 1000 + i);
            failure(queue, i, "permanent", &error)
        })
        .collect();
    store.store_batch(&messages).await.expect("store");
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .group_rows(&key(queue, "permanent", DECLINED), after, 1000)
            .await
            .expect("rows");
        let Some(last) = page.last() else { break };
        after = last.id;
        ids.extend(
            page.iter()
                .filter(|r| {
                    let number: u64 = r.message_id.as_deref().unwrap_or("m-0")[2..]
                        .parse()
                        .expect("m-<n>");
                    (from..from + n).contains(&number)
                })
                .map(|r| r.id),
        );
    }
    ids
}

/// Waits, polling every millisecond (a 50 ms poll could miss a short
/// action entirely), until `progress` counts `n` rows done.
async fn wait_done(progress: &GroupProgress, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while progress.done.load(Ordering::SeqCst) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no {n} rows done in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `action` by `ana` on the declined group of `queue`, in a task of its own.
fn spawn_action(
    store: &SqlStore,
    queue: &str,
    action: ManualAction,
    note: Option<&str>,
    batch: i64,
    progress: &Arc<GroupProgress>,
) -> tokio::task::JoinHandle<Result<backstop::store::GroupBatchTotals, StoreError>> {
    let store = store.clone();
    let progress = progress.clone();
    let key = key(queue, "permanent", DECLINED);
    let note = note.map(str::to_owned);
    tokio::spawn(async move {
        run_group_action(&store, key, action, "ana".to_owned(), note, batch, progress).await
    })
}

const DECLINED: &str = "order # declined by bank #";

async fn grouping_masks_numbers_and_uuids_by_queue_kind_and_cause(store: SqlStore) {
    let queue = unique("groups");
    let other_queue = unique("groups-other");
    let declined = seed(&store, &queue, 0, 3).await;
    for (n, uuid) in [
        (10, "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"),
        (11, "00000000-1111-2222-3333-444444444444"),
    ] {
        let error = format!("customer {uuid} not found");
        store
            .store(&failure(&queue, n, "permanent", &error))
            .await
            .expect("store");
    }
    // The same text, another kind; the same text, another queue.
    store
        .store(&failure(
            &queue,
            20,
            "transient",
            "order 5 declined by bank 7",
        ))
        .await
        .expect("store");
    store
        .store(&failure(
            &other_queue,
            30,
            "permanent",
            "order 5 declined by bank 7",
        ))
        .await
        .expect("store");

    let groups = store.groups(Some(&queue)).await.expect("groups");
    let shape: Vec<(&str, &str, i64)> = groups
        .iter()
        .map(|g| (g.key.error_kind.as_str(), g.key.cause.as_str(), g.count))
        .collect();
    assert_eq!(
        shape,
        [
            ("permanent", DECLINED, 3),
            ("permanent", "customer <uuid> not found", 2),
            ("transient", DECLINED, 1),
        ]
    );
    let first = &groups[0];
    assert_eq!(first.id, first.key.id());
    assert_eq!(first.sample_id, declined[0]);
    assert_eq!(first.sample_error, "order 0 declined by bank 1000");
    assert_eq!(first.by_status, [(Status::Pending, 3)]);
    assert!(first.first_seen <= first.last_seen && first.first_seen > 0);
    assert!(groups.iter().all(|g| g.key.queue == queue));
    let everywhere = store.groups(None).await.expect("groups");
    assert!(
        everywhere
            .iter()
            .any(|g| g.key.queue == other_queue && g.key.cause == DECLINED),
        "{everywhere:?}"
    );
    assert_eq!(
        store.group(&first.id).await.expect("group").as_ref(),
        Some(first)
    );
    assert_eq!(store.group("0000000000000000").await.expect("group"), None);

    // Pages of the group's rows, and finished rows leave the group.
    let page = store.group_rows(&first.key, 0, 2).await.expect("rows");
    assert_eq!(page.iter().map(|r| r.id).collect::<Vec<_>>(), declined[..2]);
    let rest = store
        .group_rows(&first.key, declined[1], 10)
        .await
        .expect("rows");
    assert_eq!(rest.iter().map(|r| r.id).collect::<Vec<_>>(), declined[2..]);
    store
        .act(declined[0], ManualAction::Resolve, "ana", Some("refunded"))
        .await
        .expect("resolve");
    let after = store
        .group(&first.id)
        .await
        .expect("group")
        .expect("still there");
    assert_eq!(after.count, 2);
    assert_eq!(after.sample_id, declined[1]);
}

/// 25 rows of one cause, one of them leased by a scanner, three of another
/// cause: a discard of the group in batches of 10 acts on the 24 free rows,
/// each with one audit entry carrying the actor and the note.
async fn a_group_action_acts_in_batches_on_exactly_the_groups_free_rows(store: SqlStore) {
    let queue = unique("group-act");
    let ids = seed(&store, &queue, 0, 25).await;
    let others: Vec<i64> = {
        let mut v = Vec::new();
        for n in 100..103 {
            v.push(
                store
                    .store(&failure(&queue, n, "permanent", "insufficient funds"))
                    .await
                    .expect("store"),
            );
        }
        v
    };
    // A scanner holds one row right now.
    let leased = ids[7];
    let now = now_ms() as i64;
    store
        .act(leased, ManualAction::Retry, "setup", None)
        .await
        .expect("due now");
    let claimed = store
        .claim_due("scanner-x", now_ms() as i64, now + 60_000, 10, Some(&queue))
        .await
        .expect("claim");
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [leased]);

    let progress = GroupProgress::new();
    let totals = run_group_action(
        &store,
        key(&queue, "permanent", DECLINED),
        ManualAction::Discard,
        "console:ana".to_owned(),
        Some("bank rejected the whole batch".to_owned()),
        10,
        progress.clone(),
    )
    .await
    .expect("group action");
    assert_eq!((totals.acted, totals.skipped, totals.batches), (24, 1, 3));
    assert!(!totals.cancelled);
    assert_eq!(progress.snapshot(), (25, 24, 1));
    assert!(progress.finished());
    for id in &ids {
        let row = store.get(*id).await.expect("get");
        let discards: Vec<_> = store
            .audit(*id)
            .await
            .expect("audit")
            .into_iter()
            .filter(|a| a.action == "discard")
            .collect();
        if *id == leased {
            assert_eq!(row.status, Status::Retrying, "the leased row is left alone");
            assert!(discards.is_empty());
        } else {
            assert_eq!(row.status, Status::Discarded, "row {id}");
            assert_eq!(discards.len(), 1, "row {id}: {discards:?}");
            assert_eq!(discards[0].actor, "console:ana");
            assert_eq!(
                discards[0].note.as_deref(),
                Some("bank rejected the whole batch")
            );
        }
    }
    for id in &others {
        assert_eq!(store.get(*id).await.expect("get").status, Status::Pending);
    }
}

/// Rows that arrive while a group action runs are not acted on: the action
/// covers the rows of the group at its start.
async fn a_group_action_skips_rows_that_arrive_after_its_start(store: SqlStore) {
    let queue = unique("group-late");
    seed(&store, &queue, 0, 400).await;
    let progress = GroupProgress::new();
    let run = spawn_action(&store, &queue, ManualAction::Retry, None, 1, &progress);
    wait_done(&progress, 1).await;
    let late = seed(&store, &queue, 1000, 1).await[0];
    assert!(
        !progress.finished(),
        "the late row must arrive while the action runs"
    );
    let totals = run.await.expect("task").expect("group action");
    assert_eq!(totals.acted, 400);
    assert_eq!(progress.total.load(Ordering::SeqCst), 400);
    let actions: Vec<String> = store
        .audit(late)
        .await
        .expect("audit")
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(actions, ["stored"], "the late row is untouched");
}

/// Cancelled mid-way, the action stops between two batches: every batch it
/// committed is whole (rows and their audit entries), the rest untouched.
async fn a_cancelled_group_action_stops_between_whole_batches(store: SqlStore) {
    let queue = unique("group-cancel");
    let ids = seed(&store, &queue, 0, 400).await;
    let progress = GroupProgress::new();
    let run = spawn_action(
        &store,
        &queue,
        ManualAction::Resolve,
        Some("fixed by hand"),
        5,
        &progress,
    );
    wait_done(&progress, 5).await;
    progress.cancel();
    let totals = run.await.expect("task").expect("group action");
    assert!(totals.cancelled, "{totals:?}");
    assert!(totals.acted < 400, "stopped early: {totals:?}");
    assert_eq!(totals.acted % 5, 0, "whole batches only: {totals:?}");
    let mut resolved = 0;
    for (n, id) in ids.iter().enumerate() {
        let row = store.get(*id).await.expect("get");
        let audited = store
            .audit(*id)
            .await
            .expect("audit")
            .iter()
            .filter(|a| a.action == "resolve")
            .count();
        // Batches go by id: a prefix of the rows.
        if (n as u64) < totals.acted {
            assert_eq!((row.status, audited), (Status::Resolved, 1), "row {id}");
            resolved += 1;
        } else {
            assert_eq!((row.status, audited), (Status::Pending, 0), "row {id}");
        }
    }
    assert_eq!(resolved, totals.acted);
}

async fn an_edit_keeps_the_original_and_is_what_a_claim_returns(store: SqlStore) {
    let queue = unique("edit");
    let original = failure(&queue, 1, "permanent", "amount must be positive");
    let id = store.store(&original).await.expect("store");
    let edited = b"{\"order\": 1, \"amount\": 10}\n".to_vec();

    let refused = store
        .edit(id, edited.clone(), None, "ana", "  ", false)
        .await
        .expect_err("no note");
    assert!(matches!(refused, StoreError::InvalidEdit(_)), "{refused}");
    let refused = store
        .edit(
            id,
            edited.clone(),
            Some("not headers".into()),
            "ana",
            "n",
            false,
        )
        .await
        .expect_err("bad headers");
    assert!(matches!(refused, StoreError::InvalidEdit(_)), "{refused}");
    assert!(matches!(
        store
            .edit(-5, edited.clone(), None, "ana", "n", false)
            .await,
        Err(StoreError::NotFound(-5))
    ));

    let v = store
        .edit(id, edited.clone(), None, "ana", "amount was missing", false)
        .await
        .expect("edit");
    assert_eq!(v, 1);
    let row = store.get(id).await.expect("get");
    assert_eq!((row.payload.clone(), row.version), (edited.clone(), 1));
    assert_eq!(row.status, Status::Pending, "an edit alone does not retry");
    let versions = store.versions(id).await.expect("versions");
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0].version, 0);
    assert_eq!(versions[0].payload, original.payload);
    assert_eq!(versions[0].headers, original.headers);
    assert_eq!(
        (versions[1].version, versions[1].payload.clone()),
        (1, edited.clone())
    );
    assert_eq!(versions[1].actor, "ana");
    let audit = store.audit(id).await.expect("audit");
    let edit = audit.last().expect("an entry");
    assert_eq!((edit.action.as_str(), edit.actor.as_str()), ("edit", "ana"));
    let note = edit.note.as_deref().unwrap_or_default();
    assert!(note.starts_with("amount was missing"), "{note}");
    assert!(
        note.contains("-{\"order\": 1}") && note.contains("+{\"order\": 1, \"amount\": 10}"),
        "a unified diff: {note}"
    );

    // A second edit, with headers and a retry: version 2, due now.
    let headers = r#"{"x-fixed":{"LongString":[121]}}"#.to_owned();
    let final_body = b"{\"order\": 1, \"amount\": 12}\n".to_vec();
    let v = store
        .edit(
            id,
            final_body.clone(),
            Some(headers.clone()),
            "ana",
            "12, not 10",
            true,
        )
        .await
        .expect("edit and retry");
    assert_eq!(v, 2);
    let row = store.get(id).await.expect("get");
    assert_eq!((row.version, row.status), (2, Status::Pending));
    assert_eq!(
        (row.payload.clone(), row.headers.clone()),
        (final_body.clone(), headers)
    );
    assert!(row.next_attempt_at <= now_ms() as i64);
    let actions: Vec<String> = store
        .audit(id)
        .await
        .expect("audit")
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(actions, ["stored", "edit", "edit", "retry"]);

    // What a scanner claims is the latest version; the original stays.
    let now = now_ms() as i64;
    let claimed = store
        .claim_due("scanner-e", now, now + 60_000, 10, Some(&queue))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].payload.clone(), claimed[0].version),
        (final_body, 2)
    );
    assert_eq!(
        store.versions(id).await.expect("versions")[0].payload,
        original.payload
    );
    // While the scanner holds it, an edit is refused and changes nothing.
    let refused = store
        .edit(id, b"x".to_vec(), None, "ana", "too late", true)
        .await
        .expect_err("leased");
    assert!(matches!(refused, StoreError::InvalidEdit(_)), "{refused}");
    assert_eq!(store.versions(id).await.expect("versions").len(), 3);
    assert_eq!(store.get(id).await.expect("get").version, 2);
}

/// An edited row re-driven by the real scanner reaches its queue once, with
/// the edited body, and the original never.
async fn a_redriven_edited_row_publishes_only_the_edited_body(store: SqlStore) {
    let queue = unique("edit-redrive");
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("connect");
    common::durable_queue(&connection, &queue).await;
    let id = store
        .store(&failure(&queue, 1, "permanent", "bad amount"))
        .await
        .expect("store");
    let edited = b"{\"order\": 1, \"amount\": 5}".to_vec();
    store
        .edit(id, edited.clone(), None, "ana", "amount fixed", true)
        .await
        .expect("edit and retry");
    let supervisor = common::supervisor(&amqp_url(), Duration::from_secs(10));
    let scanner = Scanner::new(
        Arc::new(store.clone()),
        Redrive::Republish(supervisor.clone()),
        ScannerConfig {
            queue: Some(queue.clone()),
            ..ScannerConfig::default()
        },
    );
    wait_until("the row replayed", Duration::from_secs(30), || {
        let scanner = scanner.clone();
        let store = store.clone();
        async move {
            scanner.run_once().await.expect("scan");
            store.get(id).await.expect("get").status == Status::Replayed
        }
    })
    .await;
    let messages = common::take_all(&connection, &queue).await;
    assert_eq!(messages, [("m-1".to_owned(), edited)]);
    supervisor.close().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete");
}

/// 200 due rows in one scan: the first goes alone, the rest together on
/// several confirm channels; every row ends `replayed` with exactly one copy
/// in the queue.
async fn a_scan_sends_its_batch_together_one_copy_per_row(store: SqlStore) {
    let queue = unique("redrive-batch");
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("connect");
    common::durable_queue(&connection, &queue).await;
    let ids = seed(&store, &queue, 0, 200).await;
    run_group_action(
        &store,
        key(&queue, "permanent", DECLINED),
        ManualAction::Retry,
        "ana".to_owned(),
        None,
        1000,
        GroupProgress::new(),
    )
    .await
    .expect("retry the group");
    let supervisor = common::supervisor(&amqp_url(), Duration::from_secs(10));
    let scanner = Scanner::new(
        Arc::new(store.clone()),
        Redrive::Republish(supervisor.clone()),
        ScannerConfig {
            queue: Some(queue.clone()),
            batch: 500,
            publish_channels: 8,
            ..ScannerConfig::default()
        },
    );
    let report = scanner.run_once().await.expect("scan");
    assert_eq!(
        (
            report.claimed,
            report.redriven,
            report.unknown,
            report.failed
        ),
        (200, 200, 0, 0),
        "{report:?}"
    );
    for id in &ids {
        let row = store.get(*id).await.expect("get");
        assert_eq!(row.status, Status::Replayed, "row {id}");
        let replayed = store
            .audit(*id)
            .await
            .expect("audit")
            .iter()
            .filter(|a| a.action == "replayed")
            .count();
        assert_eq!(replayed, 1, "row {id}");
    }
    let mut messages: Vec<String> = common::take_all(&connection, &queue)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    messages.sort();
    let mut expected: Vec<String> = (0..200).map(|n| format!("m-{n}")).collect();
    expected.sort();
    assert_eq!(messages, expected, "one copy per row");
    supervisor.close().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete");
}

/// The `replayed` rows of `queue`.
async fn replayed_ids(store: &SqlStore, queue: &str) -> std::collections::BTreeSet<i64> {
    store
        .list(&ListFilter {
            status: Some(Status::Replayed),
            queue: Some(queue.to_owned()),
            limit: Some(10_000),
        })
        .await
        .expect("list")
        .iter()
        .map(|r| r.id)
        .collect()
}

/// 300 due rows re-driven through a slow link, one publish at a time: the
/// confirmed rows are finished as their confirms arrive, so a scanner
/// killed mid-batch (a crash) has already finished them, and a second
/// scanner, after the lease, re-drives only the others: each row finished
/// before the crash has exactly one copy in the queue.
async fn a_scan_stopped_mid_batch_leaves_its_confirmed_rows_replayed(store: SqlStore) {
    let queue = unique("redrive-crash");
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("connect");
    common::durable_queue(&connection, &queue).await;
    let ids = seed(&store, &queue, 0, 300).await;
    assert_eq!(ids.len(), 300);
    run_group_action(
        &store,
        key(&queue, "permanent", DECLINED),
        ManualAction::Retry,
        "ana".to_owned(),
        None,
        1000,
        GroupProgress::new(),
    )
    .await
    .expect("retry the group");
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    // Each confirm takes at least 10 ms: 300 rows take 3 s or more.
    proxy.delay_replies(Duration::from_millis(10));
    let lease = Duration::from_secs(12);
    let config = ScannerConfig {
        queue: Some(queue.clone()),
        batch: 500,
        publish_channels: 1,
        lease,
        ..ScannerConfig::default()
    };
    let slow = common::supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(30));
    let scanner = Scanner::new(
        Arc::new(store.clone()),
        Redrive::Republish(slow.clone()),
        config.clone(),
    );
    let scan = tokio::spawn(async move { scanner.run_once().await });
    wait_until(
        "100 rows replayed while the batch runs",
        Duration::from_secs(60),
        || {
            let store = store.clone();
            let queue = queue.clone();
            async move { replayed_ids(&store, &queue).await.len() >= 100 }
        },
    )
    .await;
    // The crash: the scan ends here, nothing more is finished.
    scan.abort();
    let _ = scan.await;
    slow.close().await;
    drop(proxy);
    let finished = replayed_ids(&store, &queue).await;
    assert!(
        finished.len() < 300,
        "the scan was stopped mid-batch with rows already finished: {} of 300 replayed at the crash",
        finished.len()
    );
    // After the lease, another scanner re-drives the rest.
    let supervisor = common::supervisor(&amqp_url(), Duration::from_secs(10));
    let rescanner = Scanner::new(
        Arc::new(store.clone()),
        Redrive::Republish(supervisor.clone()),
        ScannerConfig {
            owner: "second-scanner".to_owned(),
            ..config
        },
    );
    wait_until("every row replayed after the lease", lease * 4, || {
        let rescanner = rescanner.clone();
        let store = store.clone();
        let queue = queue.clone();
        async move {
            rescanner.run_once().await.expect("scan");
            replayed_ids(&store, &queue).await.len() == 300
        }
    })
    .await;
    let mut copies = std::collections::HashMap::<String, u32>::new();
    for (message_id, _) in common::take_all(&connection, &queue).await {
        *copies.entry(message_id).or_default() += 1;
    }
    assert_eq!(copies.len(), 300, "every row has a copy");
    for id in &finished {
        let row = store.get(*id).await.expect("get");
        let message_id = row.message_id.clone().expect("message id");
        assert_eq!(
            copies.get(&message_id),
            Some(&1),
            "row {id} ({message_id}) was finished before the crash: re-driven once"
        );
        let replayed = store
            .audit(*id)
            .await
            .expect("audit")
            .iter()
            .filter(|a| a.action == "replayed")
            .count();
        assert_eq!(replayed, 1, "row {id}");
    }
    supervisor.close().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete");
}

macro_rules! suite {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    common::init_tracing();
                    let _turn = match stringify!($backend) {
                        "postgres" => Some(super::POSTGRES_TURN.lock().await),
                        _ => None,
                    };
                    super::$test(super::$backend().await).await;
                }
            )*
            use super::common;
        }
    };
}

macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        suite!(sqlite: $($test),*);
        suite!(postgres: $($test),*);
    };
}

both_backends!(
    grouping_masks_numbers_and_uuids_by_queue_kind_and_cause,
    a_group_action_acts_in_batches_on_exactly_the_groups_free_rows,
    a_group_action_skips_rows_that_arrive_after_its_start,
    a_cancelled_group_action_stops_between_whole_batches,
    an_edit_keeps_the_original_and_is_what_a_claim_returns,
    a_redriven_edited_row_publishes_only_the_edited_body,
    a_scan_sends_its_batch_together_one_copy_per_row,
    a_scan_stopped_mid_batch_leaves_its_confirmed_rows_replayed,
);
