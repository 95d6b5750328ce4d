//! Failure groups, group actions and edited payloads, on SQLite and on
//! PostgreSQL; the last test re-drives an edited row through the real
//! scanner and broker.

use crate::common;
use backstop::retry::now_ms;
use backstop::store::ListFilter;
use backstop::store::{
    CompensationStore, ConsoleAction, GroupKey, GroupProgress, ManualAction, NewFailedMessage,
    Redrive, Scanner, ScannerConfig, SqlStore, Status, StoreError, run_group_action,
};
use backstop_testkit::{
    FaultProxy, amqp_url, broker_addr, postgres_url, unique, url_via, wait_until,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

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

/// The store at `url`, and a plain pool on the same database for what only
/// an older binary (or a test) would write.
async fn with_raw(url: &str) -> (SqlStore, sqlx::AnyPool) {
    let store = SqlStore::connect(url).await.expect("store");
    sqlx::any::install_default_drivers();
    let raw = sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("raw pool");
    (store, raw)
}

/// Rows without a cause (written before schema version 3, or by an older
/// binary during a rolling upgrade) still join their group, in the group
/// list and in a group action; and 20,000 of them with distinct error texts
/// are filled in seconds (migration 3 used to do it in one update per
/// distinct error, without an index, inside the migration's lock: 92 s).
async fn rows_without_a_cause_join_their_group(url: String) {
    let (store, raw) = with_raw(&url).await;
    let queue = unique("group-nocause");
    let ids = seed(&store, &queue, 0, 3).await;
    let unset = |queue: String| {
        let raw = raw.clone();
        async move {
            sqlx::query("UPDATE backstop_failed_messages SET cause = NULL WHERE queue = $1")
                .bind(queue)
                .execute(&raw)
                .await
                .expect("unset causes")
                .rows_affected()
        }
    };
    assert_eq!(unset(queue.clone()).await, 3);
    let groups = store.groups(Some(&queue)).await.expect("groups");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0].key, key(&queue, "permanent", DECLINED));
    assert_eq!((groups[0].count, groups[0].sample_id), (3, ids[0]));

    assert_eq!(unset(queue.clone()).await, 3);
    let totals = run_group_action(
        &store,
        key(&queue, "permanent", DECLINED),
        ManualAction::Resolve,
        "ana".to_owned(),
        Some("fixed upstream".to_owned()),
        2,
        GroupProgress::new(),
    )
    .await
    .expect("group action");
    assert_eq!((totals.acted, totals.skipped), (3, 0));

    // Scale: 20,000 distinct error texts, one cause.
    let big = unique("group-nocause-big");
    let messages: Vec<NewFailedMessage> = (0..20_000)
        .map(|i| {
            failure(
                &big,
                i,
                "permanent",
                &format!("order {i} declined by bank {i}"),
            )
        })
        .collect();
    for chunk in messages.chunks(5_000) {
        store.store_batch(chunk).await.expect("store");
    }
    assert_eq!(unset(big.clone()).await, 20_000);
    let started = std::time::Instant::now();
    let filled = store.backfill_causes().await.expect("backfill");
    let took = started.elapsed();
    eprintln!("backfill: {filled} rows with 20000 distinct errors in {took:?}");
    assert!(filled >= 20_000, "filled {filled}");
    assert!(took < Duration::from_secs(30), "backfill took {took:?}");
    let groups = store.groups(Some(&big)).await.expect("groups");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0].count, 20_000);
    sqlx::query("DELETE FROM backstop_failed_messages WHERE queue = $1")
        .bind(&big)
        .execute(&raw)
        .await
        .expect("clean up");
}

/// An edit is the row's own payload: a reader of the row's columns alone
/// (an older binary in a rolling upgrade, a claim's `RETURNING` evaluated
/// on the row it locked) sends the edit, and the original stays version 0.
/// Rows edited under schema version 3 (edit in the versions table, original
/// in the row) are moved over by migration 4.
async fn an_edit_is_the_rows_own_payload(url: String) {
    let (store, raw) = with_raw(&url).await;
    let queue = unique("edit-row");
    let id = store
        .store(&failure(&queue, 1, "permanent", "bad amount"))
        .await
        .expect("store");
    let original = store.get(id).await.expect("get");
    let in_row = |id: i64| {
        let raw = raw.clone();
        async move {
            let row = sqlx::query(
                "SELECT payload, headers, version FROM backstop_failed_messages WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&raw)
            .await
            .expect("row");
            use sqlx::Row;
            (
                row.get::<Vec<u8>, _>("payload"),
                row.get::<String, _>("headers"),
                row.get::<i64, _>("version"),
            )
        }
    };
    let v1 = b"{\"order\": 1, \"amount\": 5}".to_vec();
    store
        .edit(id, v1.clone(), None, "ana", "amount fixed", false)
        .await
        .expect("edit");
    assert_eq!(in_row(id).await, (v1.clone(), "{}".to_owned(), 1));
    let v2 = b"{\"order\": 1, \"amount\": 6}".to_vec();
    let headers = r#"{"x-fixed":{"LongString":[121]}}"#.to_owned();
    store
        .edit(id, v2.clone(), Some(headers.clone()), "bo", "again", true)
        .await
        .expect("edit");
    assert_eq!(in_row(id).await, (v2.clone(), headers.clone(), 2));
    let versions = store.versions(id).await.expect("versions");
    let summary: Vec<(i64, Vec<u8>, String, String)> = versions
        .iter()
        .map(|v| {
            (
                v.version,
                v.payload.clone(),
                v.headers.clone(),
                v.actor.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                0,
                original.payload.clone(),
                "{}".to_owned(),
                "consumer".to_owned()
            ),
            (1, v1.clone(), "{}".to_owned(), "ana".to_owned()),
            (2, v2.clone(), headers.clone(), "bo".to_owned()),
        ]
    );
    assert_eq!(versions[0].at, original.created_at);
    let claimed = store
        .claim_due(
            "scanner-e",
            now_ms() as i64,
            now_ms() as i64 + 60_000,
            10,
            Some(&queue),
        )
        .await
        .expect("claim");
    assert_eq!(
        claimed
            .iter()
            .map(|r| (r.id, r.payload.clone(), r.version))
            .collect::<Vec<_>>(),
        [(id, v2.clone(), 2)]
    );

    // A row edited under schema version 3: the edit in the versions table
    // only, the original in the row.
    let old = store
        .store(&failure(&queue, 2, "permanent", "bad amount"))
        .await
        .expect("store");
    let old_original = store.get(old).await.expect("get").payload;
    let old_edit = b"{\"order\": 2, \"amount\": 7}".to_vec();
    sqlx::query(
        "INSERT INTO backstop_failed_versions (row_id, version, payload, headers, at, actor, note)
         VALUES ($1, 1, $2, '{}', 1, 'ana', 'v3 edit')",
    )
    .bind(old)
    .bind(old_edit.clone())
    .execute(&raw)
    .await
    .expect("v3 edit");
    sqlx::query("UPDATE backstop_failed_messages SET version = 1 WHERE id = $1")
        .bind(old)
        .execute(&raw)
        .await
        .expect("v3 version");
    sqlx::query("DELETE FROM backstop_schema_migrations WHERE version = 4")
        .execute(&raw)
        .await
        .expect("forget migration 4");
    let store = SqlStore::connect(&url).await.expect("migrated again");
    assert_eq!(in_row(old).await, (old_edit.clone(), "{}".to_owned(), 1));
    let versions: Vec<(i64, Vec<u8>)> = store
        .versions(old)
        .await
        .expect("versions")
        .into_iter()
        .map(|v| (v.version, v.payload))
        .collect();
    assert_eq!(versions, [(0, old_original), (1, old_edit)]);
    // Rows edited since are untouched by running it again.
    assert_eq!(in_row(id).await, (v2, headers, 2));
    assert_eq!(store.versions(id).await.expect("versions").len(), 3);
}

/// A group action never waits for a row a scanner holds: on PostgreSQL it
/// used to lock its whole window `FOR UPDATE`, leased rows included, and so
/// waited for (and could deadlock with) the scanner's bulk finish holding
/// that row. Here another transaction holds the leased row's lock.
async fn a_group_action_passes_leased_rows_without_waiting_for_them(url: String) {
    let (store, raw) = with_raw(&url).await;
    let queue = unique("group-lock");
    let ids = seed(&store, &queue, 0, 5).await;
    let leased = ids[2];
    store
        .act(leased, ManualAction::Retry, "setup", None)
        .await
        .expect("due now");
    let now = now_ms() as i64;
    let claimed = store
        .claim_due("scanner-l", now, now + 60_000, 10, Some(&queue))
        .await
        .expect("claim");
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [leased]);
    // The scanner's finish, in flight: the leased row locked.
    let mut finishing = raw.begin().await.expect("begin");
    sqlx::query("UPDATE backstop_failed_messages SET updated_at = updated_at WHERE id = $1")
        .bind(leased)
        .execute(&mut *finishing)
        .await
        .expect("lock the leased row");
    let action = run_group_action(
        &store,
        key(&queue, "permanent", DECLINED),
        ManualAction::Discard,
        "ana".to_owned(),
        Some("duplicates".to_owned()),
        2,
        GroupProgress::new(),
    );
    let totals = tokio::time::timeout(Duration::from_secs(10), action)
        .await
        .expect("the group action waited for the leased row's lock")
        .expect("group action");
    finishing.rollback().await.expect("rollback");
    assert_eq!((totals.acted, totals.skipped), (4, 1));
    assert_eq!(
        store.get(leased).await.expect("get").status,
        Status::Retrying
    );
}

/// Every group action says why: without a note (or with a blank one) it is
/// refused before touching a row.
async fn a_group_action_needs_a_note(store: SqlStore) {
    let queue = unique("group-note");
    let ids = seed(&store, &queue, 0, 2).await;
    let group = key(&queue, "permanent", DECLINED);
    for action in [
        ManualAction::Retry,
        ManualAction::Resolve,
        ManualAction::Discard,
    ] {
        let refused = run_group_action(
            &store,
            group.clone(),
            action,
            "ana".to_owned(),
            None,
            10,
            GroupProgress::new(),
        )
        .await;
        assert_eq!(refused, Err(StoreError::NoteRequired(action.as_str())));
        let refused = store
            .act_group_batch(&group, action, "ana", Some("  "), 0, i64::MAX, 10)
            .await;
        assert_eq!(refused, Err(StoreError::NoteRequired(action.as_str())));
    }
    for id in ids {
        assert_eq!(store.get(id).await.expect("get").status, Status::Pending);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_group_action_passes_leased_rows_without_waiting_for_them() {
    common::init_tracing();
    let _turn = common::POSTGRES_TURN.lock().await;
    a_group_action_passes_leased_rows_without_waiting_for_them(postgres_url()).await;
}

common::both_backends!(
    url: an_edit_is_the_rows_own_payload,
    rows_without_a_cause_join_their_group,
);

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
    let run = spawn_action(
        &store,
        &queue,
        ManualAction::Retry,
        Some("provider is back"),
        1,
        &progress,
    );
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

/// The `replayed` entries of row `id`'s audit.
async fn replayed_entries(store: &SqlStore, id: i64) -> usize {
    store
        .audit(id)
        .await
        .expect("audit")
        .iter()
        .filter(|a| a.action == "replayed")
        .count()
}

/// A durable queue named after `prefix` and `n` rows of one group of it,
/// retried (due now): the connection, the queue and the row ids.
async fn retried_group(
    store: &SqlStore,
    prefix: &str,
    n: u64,
) -> (lapin::Connection, String, Vec<i64>) {
    let queue = unique(prefix);
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("connect");
    common::durable_queue(&connection, &queue).await;
    let ids = seed(store, &queue, 0, n).await;
    run_group_action(
        store,
        key(&queue, "permanent", DECLINED),
        ManualAction::Retry,
        "ana".to_owned(),
        Some("bank is back".to_owned()),
        1000,
        GroupProgress::new(),
    )
    .await
    .expect("retry the group");
    (connection, queue, ids)
}

/// 200 due rows in one scan: the first goes alone, the rest together on
/// several confirm channels; every row ends `replayed` with exactly one copy
/// in the queue.
async fn a_scan_sends_its_batch_together_one_copy_per_row(store: SqlStore) {
    let (connection, queue, ids) = retried_group(&store, "redrive-batch", 200).await;
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
        assert_eq!(replayed_entries(&store, *id).await, 1, "row {id}");
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
    let (connection, queue, ids) = retried_group(&store, "redrive-crash", 300).await;
    assert_eq!(ids.len(), 300);
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
        assert_eq!(replayed_entries(&store, *id).await, 1, "row {id}");
    }
    supervisor.close().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete");
}

/// A copy of the batched path whose publish fails on its channel (the
/// connection to the broker is cut mid-batch: the copy may have been
/// stored) has an unknown outcome: no failure is recorded against its row
/// nor against the rows not sent yet. The copies in flight at the cut keep
/// this scanner's lease (another scanner claims none of them until it runs
/// out); the rows never sent are given back at once, their claim not
/// counted. The scan sends nothing more after it.
async fn a_batched_redrive_cut_off_is_unknown_and_keeps_its_lease(store: SqlStore) {
    let (connection, queue, ids) = retried_group(&store, "redrive-cut", 300).await;
    let mut redrives_before = std::collections::HashMap::new();
    for id in &ids {
        redrives_before.insert(*id, store.get(*id).await.expect("get").redrives);
    }
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    // Each confirm takes at least 10 ms: a publish is nearly always in
    // flight when the connection is cut.
    proxy.delay_replies(Duration::from_millis(10));
    let slow = common::supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(30));
    let scanner = Scanner::new(
        Arc::new(store.clone()),
        Redrive::Republish(slow.clone()),
        ScannerConfig {
            queue: Some(queue.clone()),
            batch: 500,
            publish_channels: 1,
            lease: Duration::from_secs(120),
            ..ScannerConfig::default()
        },
    );
    let scan = tokio::spawn(async move { scanner.run_once().await });
    wait_until(
        "20 rows replayed by the batched path",
        Duration::from_secs(60),
        || {
            let store = store.clone();
            let queue = queue.clone();
            async move { replayed_ids(&store, &queue).await.len() >= 20 }
        },
    )
    .await;
    proxy.cut();
    let report = tokio::time::timeout(Duration::from_secs(60), scan)
        .await
        .expect("the scan ends")
        .expect("join")
        .expect("scan");
    slow.close().await;
    drop(proxy);
    assert_eq!(report.claimed, 300, "{report:?}");
    assert!(
        report.unknown >= 1,
        "the cut-off copy is unknown: {report:?}"
    );
    assert_eq!(
        (report.failed, report.needs_review),
        (0, 0),
        "no failure recorded: {report:?}"
    );
    let replayed = replayed_ids(&store, &queue).await;
    assert_eq!(replayed.len() as u64, report.redriven, "{report:?}");
    assert!(
        replayed.len() < 300,
        "the scan ended at the cut: {report:?}"
    );
    for id in &ids {
        let row = store.get(*id).await.expect("get");
        if replayed.contains(id) {
            continue;
        }
        // Claimed (`retrying`), with the error it was stored with: a failed
        // attempt would have recorded the publish's error.
        assert_eq!(row.status, Status::Retrying, "{row:?}");
        assert!(
            row.error.contains("declined by bank"),
            "no failure recorded: {row:?}"
        );
        assert_eq!(row.attempts, 3, "{row:?}");
    }
    // The copies in flight at the cut are still leased by the first
    // scanner; the rows never sent were given back, their claim not counted.
    let now = now_ms() as i64;
    let taken = store
        .claim_due("another-scanner", now, now + 60_000, 1000, Some(&queue))
        .await
        .expect("claim");
    assert_eq!(
        taken.len() as u64,
        300 - report.redriven - report.unknown,
        "only the rows never sent are free: {report:?}"
    );
    assert_eq!(taken.len() as u64, report.released, "{report:?}");
    for row in &taken {
        assert_eq!(
            row.redrives,
            redrives_before[&row.id] + 1,
            "the first scan's claim was given back: {row:?}"
        );
    }
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete");
}

/// The console's audit: each action kept whole (actor, action, target, a
/// detail or none, the time), listed newest first, at most `limit` (none
/// for a limit of 0 or less). Other processes may write to the same
/// PostgreSQL audit meanwhile: this test's rows are told by their target.
async fn console_actions_are_recorded_and_listed_newest_first(store: SqlStore) {
    let target = unique("console-audit");
    let detail = "filters=[\"timeout\",\"\",\"2h\"] note='it's <b>é</b>' \u{1F4A5}";
    let before = now_ms() as i64;
    let first = store
        .record_console_action("console:alice", "dlq_replay_start", &target, Some(detail))
        .await
        .expect("record");
    let second = store
        .record_console_action("console:bob", "dlq_purge_end", &target, None)
        .await
        .expect("record");
    let after = now_ms() as i64;
    assert!(second > first, "ids increase: {first} then {second}");
    let latest = store.console_actions(10_000).await.expect("list");
    assert!(
        latest.windows(2).all(|w| w[0].id > w[1].id),
        "newest first: {latest:?}"
    );
    let ours: Vec<&ConsoleAction> = latest.iter().filter(|a| a.target == target).collect();
    assert_eq!(ours.len(), 2, "{latest:?}");
    assert_eq!(
        (
            ours[0].id,
            ours[0].actor.as_str(),
            ours[0].action.as_str(),
            ours[0].detail.as_deref()
        ),
        (second, "console:bob", "dlq_purge_end", None)
    );
    assert_eq!(
        (
            ours[1].id,
            ours[1].actor.as_str(),
            ours[1].action.as_str(),
            ours[1].detail.as_deref()
        ),
        (first, "console:alice", "dlq_replay_start", Some(detail))
    );
    for a in &ours {
        assert!(
            (before..=after).contains(&a.at),
            "{a:?} at {before}..={after}"
        );
    }
    let one = store.console_actions(1).await.expect("list");
    assert_eq!(one.len(), 1);
    assert!(one[0].id >= second, "{one:?}");
    assert!(store.console_actions(0).await.expect("list").is_empty());
    assert!(store.console_actions(-5).await.expect("list").is_empty());
}

common::both_backends!(
    grouping_masks_numbers_and_uuids_by_queue_kind_and_cause,
    a_group_action_acts_in_batches_on_exactly_the_groups_free_rows,
    a_group_action_skips_rows_that_arrive_after_its_start,
    a_cancelled_group_action_stops_between_whole_batches,
    an_edit_keeps_the_original_and_is_what_a_claim_returns,
    a_redriven_edited_row_publishes_only_the_edited_body,
    a_scan_sends_its_batch_together_one_copy_per_row,
    a_group_action_needs_a_note,
    a_scan_stopped_mid_batch_leaves_its_confirmed_rows_replayed,
    a_batched_redrive_cut_off_is_unknown_and_keeps_its_lease,
    console_actions_are_recorded_and_listed_newest_first,
);
