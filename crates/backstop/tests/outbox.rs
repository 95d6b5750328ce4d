//! The transactional outbox against the real broker, on SQLite (a file in a
//! temp dir) and on the PostgreSQL that scripts/test starts: a business write
//! and its event commit together or not at all, relays share a table without
//! double-publishing, partitions keep their order, sent rows are purged after
//! the retention, and a `kill -9` between the commit and the publish (or
//! between the publish and the mark) publishes the message after a restart,
//! once or as a counted duplicate.

use crate::common;
use backstop::connection::ConnectionConfig;
use backstop::publish::outbox::{Outbox, Relay, RelayConfig, RelayStats};
use backstop::publish::{Message, Publisher};
use backstop::retry::now_ms;
use backstop_testkit::{
    FaultProxy, amqp_url, broker_addr, postgres_url, unique, url_via, wait_until,
};
use common::{KillOnDrop, init_tracing};
use lapin::BasicProperties;
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use sqlx::{AnyPool, Row};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// A database for one test: its URL and a table name no other test uses.
struct Db {
    url: String,
    table: String,
}

impl Db {
    fn sqlite() -> Self {
        let path = std::env::temp_dir().join(format!("{}.db", unique("backstop-outbox")));
        Db {
            url: format!("sqlite://{}", path.display()),
            table: "backstop_outbox".to_owned(),
        }
    }

    fn postgres() -> Self {
        Db {
            url: postgres_url(),
            table: unique("outbox").replace(['.', '-'], "_"),
        }
    }

    fn orders(&self) -> String {
        format!("{}_orders", self.table)
    }

    /// The outbox and the business table beside it.
    async fn open(&self) -> (AnyPool, Outbox) {
        let pool = backstop::publish::outbox::open_pool(&self.url)
            .await
            .expect("pool");
        let outbox = Outbox::with_table(pool.clone(), &self.table)
            .await
            .expect("outbox");
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (id TEXT PRIMARY KEY)",
            self.orders()
        ))
        .execute(&pool)
        .await
        .expect("orders table");
        (pool, outbox)
    }

    /// Drops this test's tables (the SQLite file stays in the temp dir).
    async fn drop_tables(&self, pool: &AnyPool) {
        if self.url.starts_with("postgres") {
            for table in [&self.table, &self.orders()] {
                let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                    .execute(pool)
                    .await;
            }
        }
    }
}

/// A publisher without a spool, on a connection of its own.
async fn publisher(name: &str) -> Publisher {
    publisher_at(&amqp_url(), name, Duration::from_secs(5)).await
}

/// [`publisher`] to the broker at `url`, waiting `confirm_timeout` for each
/// confirm.
async fn publisher_at(url: &str, name: &str, confirm_timeout: Duration) -> Publisher {
    Publisher::builder(
        ConnectionConfig::new(url)
            .connection_name(name)
            .backoff(common::fast_backoff()),
    )
    .confirm_timeout(confirm_timeout)
    .start()
    .await
    .expect("publisher")
}

fn relay_config(owner: &str) -> RelayConfig {
    RelayConfig {
        batch: 50,
        lease: Duration::from_secs(10),
        poll_interval: Duration::from_millis(50),
        backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        owner: owner.to_owned(),
        ..RelayConfig::default()
    }
}

/// An event for `queue` through the default exchange.
fn event(queue: &str, id: &str) -> Message {
    Message::new("", queue, format!("{{\"event\":\"{id}\"}}").into_bytes()).with_message_id(id)
}

/// Inserts order `order` and enqueues its event, in one transaction that
/// commits (or rolls back).
async fn order_and_event(
    pool: &AnyPool,
    outbox: &Outbox,
    orders: &str,
    order: &str,
    message: Message,
    partition: Option<&str>,
    commit: bool,
) -> String {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO {orders} (id) VALUES ($1)"))
        .bind(order)
        .execute(&mut *tx)
        .await
        .expect("business write");
    let id = match partition {
        Some(p) => outbox.enqueue_partitioned(&mut tx, message, p).await,
        None => outbox.enqueue(&mut tx, message).await,
    }
    .expect("enqueue");
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
    id
}

async fn count(pool: &AnyPool, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .and_then(|row| row.try_get::<i64, _>(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn wait_sent(outbox: &Outbox, what: &str) {
    wait_until(what, Duration::from_secs(60), || async {
        outbox.backlog().await.expect("backlog").pending == 0
    })
    .await;
}

/// A message taken off a queue.
#[derive(Debug)]
struct Got {
    message_id: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// Takes every message off `queue`, in queue order (the order the broker
/// received them in).
async fn drain(queue: &str) -> Vec<Got> {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut got = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let properties = message.delivery.properties.clone();
        got.push(Got {
            message_id: properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .expect("every outbox message has a message id"),
            body: message.delivery.data.clone(),
            properties,
        });
    }
    backstop_testkit::delete_queue(&connection, queue).await;
    let _ = connection.close(200, "drained".into()).await;
    got
}

/// The messages ready in `queue` now.
async fn ready(queue: &str) -> u32 {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let n = backstop_testkit::ready_count(&channel, queue)
        .await
        .expect("passive declare");
    let _ = connection.close(200, "counted".into()).await;
    n
}

// ---------------------------------------------------------------------------
// a. A business write and its event commit together, or neither does.

async fn a_business_write_and_its_event_commit_together(db: Db) {
    let (pool, outbox) = db.open().await;
    let queue = unique("outbox-tx");
    common::declare(&common::classic(&queue)).await;
    let orders = db.orders();

    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    order_and_event(
        &pool,
        &outbox,
        &orders,
        "o-1",
        event(&queue, "m-1").with_properties(properties.clone()),
        None,
        false,
    )
    .await;
    assert_eq!(
        count(&pool, &format!("SELECT COUNT(*) FROM {orders}")).await,
        0
    );
    assert_eq!(
        count(&pool, &format!("SELECT COUNT(*) FROM {}", db.table)).await,
        0
    );

    // No message id: one is generated and stored with the row.
    let message =
        Message::new("", &*queue, b"{\"event\":\"o-2\"}".to_vec()).with_properties(properties);
    let id = order_and_event(&pool, &outbox, &orders, "o-2", message, None, true).await;
    assert_eq!(
        id.split('-').count(),
        5,
        "a generated id, as the Publisher makes them: {id}"
    );
    assert_eq!(
        count(&pool, &format!("SELECT COUNT(*) FROM {orders}")).await,
        1
    );
    assert_eq!(outbox.backlog().await.expect("backlog").pending, 1);

    let publisher = publisher("outbox-tx").await;
    let relay = Relay::start(outbox.clone(), publisher.clone(), relay_config("relay-a"));
    wait_sent(&outbox, "the committed event is marked sent").await;
    let stats = relay.close().await;
    publisher.close().await;
    assert_eq!(ready(&queue).await, 1, "published exactly once");
    let got = drain(&queue).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id, id);
    assert_eq!(got[0].body, b"{\"event\":\"o-2\"}");
    assert_eq!(
        got[0]
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(
        got[0]
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("tenant").cloned()),
        Some(AMQPValue::LongString(LongString::from("acme")))
    );
    assert_eq!(got[0].properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!((stats.sent, stats.republished, stats.failed), (1, 0, 0));
    let sent = count(
        &pool,
        &format!(
            "SELECT COUNT(*) FROM {} WHERE sent_at IS NOT NULL",
            db.table
        ),
    )
    .await;
    assert_eq!(sent, 1);
    db.drop_tables(&pool).await;
}

// ---------------------------------------------------------------------------
// c. Per-partition order, with two relays and a partition held back by a
//    failing row.

async fn each_partition_arrives_in_enqueue_order(db: Db) {
    const ROWS: usize = 300;
    let (pool, outbox) = db.open().await;
    let queue = unique("outbox-order");
    // Row 50 (partition p2) goes to a queue that does not exist yet: it is
    // returned unroutable, and p2 must wait for it.
    let late_queue = unique("outbox-order-late");
    common::declare(&common::classic(&queue)).await;
    let (p1, p2) = (
        publisher("outbox-order-1").await,
        publisher("outbox-order-2").await,
    );
    let r1 = Relay::start(outbox.clone(), p1.clone(), relay_config("relay-c1"));
    let r2 = Relay::start(outbox.clone(), p2.clone(), relay_config("relay-c2"));
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..ROWS {
        let partition = format!("p{}", i % 3);
        let id = format!("e-{i:04}");
        let target = if i == 50 { &late_queue } else { &queue };
        let mut tx = pool.begin().await.expect("begin");
        outbox
            .enqueue_partitioned(&mut tx, event(target, &id), &partition)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        expected.entry(partition).or_default().push(id);
    }
    // p0 and p1 go through; p2 stops before row 50.
    let held_back = (ROWS - 50) as u64 / 3 + 1;
    wait_until(
        "p0, p1 and p2 up to row 50 published",
        Duration::from_secs(60),
        || async { outbox.backlog().await.expect("backlog").pending <= held_back },
    )
    .await;
    assert_eq!(
        outbox.backlog().await.expect("backlog").pending,
        held_back,
        "p2 waits for its row 50"
    );
    let held = r1.stats().failed + r2.stats().failed;
    assert!(held >= 1, "row 50 failed at least once");
    common::declare(&common::classic(&late_queue)).await;
    wait_sent(&outbox, "every row sent once the late queue exists").await;
    let (s1, s2) = (r1.close().await, r2.close().await);
    p1.close().await;
    p2.close().await;
    assert_eq!(s1.sent + s2.sent, ROWS as u64);
    assert_eq!(s1.republished + s2.republished, 0);

    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    for message in drain(&queue)
        .await
        .into_iter()
        .chain(drain(&late_queue).await)
    {
        let i: usize = message.message_id[2..].parse().expect("event number");
        got.entry(format!("p{}", i % 3))
            .or_default()
            .push(message.message_id);
    }
    // Row 50 sits alone in its queue: p2's order is checked without it,
    // and by the holdback above.
    let late = got.get_mut("p2").map(|ids| {
        let at = ids
            .iter()
            .position(|id| id == "e-0050")
            .expect("row 50 arrived");
        ids.remove(at)
    });
    assert_eq!(late.as_deref(), Some("e-0050"));
    if let Some(ids) = expected.get_mut("p2") {
        ids.retain(|id| id != "e-0050");
    }
    for (partition, enqueued) in &expected {
        let arrived = got.get(partition).cloned().unwrap_or_default();
        let first_difference = enqueued
            .iter()
            .zip(&arrived)
            .position(|(e, a)| e != a)
            .map(|at| (at, &enqueued[at], &arrived[at]));
        assert_eq!(
            (arrived.len(), first_difference),
            (enqueued.len(), None),
            "{partition}: arrival order is enqueue order (position, enqueued, arrived)"
        );
    }
    db.drop_tables(&pool).await;
}

// ---------------------------------------------------------------------------
// d. Retention: only sent rows older than the retention are deleted.

async fn retention_purges_only_old_sent_rows(db: Db) {
    let (pool, outbox) = db.open().await;
    let queue = unique("outbox-retention");
    common::declare(&common::classic(&queue)).await;
    let publisher = publisher("outbox-retention").await;
    let mut tx = pool.begin().await.expect("begin");
    for i in 0..7 {
        outbox
            .enqueue(&mut tx, event(&queue, &format!("r-{i}")))
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    let relay = Relay::start(outbox.clone(), publisher.clone(), relay_config("relay-d1"));
    wait_sent(&outbox, "seven rows sent").await;
    relay.close().await;
    // One more row, never published: the relay below purges before it
    // publishes anything.
    let mut tx = pool.begin().await.expect("begin");
    outbox
        .enqueue(&mut tx, event(&queue, "r-unsent"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let hour = 3_600_000_i64;
    let now = now_ms() as i64;
    let table = &db.table;
    // Five sent two hours ago, two sent a minute ago (kept), and the unsent
    // row enqueued thirty days ago (kept: never deleted unsent).
    for (ids, sent_at) in [
        ("'r-0', 'r-1', 'r-2', 'r-3', 'r-4'", now - 2 * hour),
        ("'r-5', 'r-6'", now - 60_000),
    ] {
        sqlx::query(&format!(
            "UPDATE {table} SET sent_at = $1 WHERE message_id IN ({ids})"
        ))
        .bind(sent_at)
        .execute(&pool)
        .await
        .expect("age the sent rows");
    }
    sqlx::query(&format!(
        "UPDATE {table} SET created_at = $1 WHERE message_id = 'r-unsent'"
    ))
    .bind(now - 30 * 24 * hour)
    .execute(&pool)
    .await
    .expect("age the unsent row");

    let relay = Relay::start(
        outbox.clone(),
        publisher.clone(),
        RelayConfig {
            retention: Duration::from_secs(3600),
            purge_batch: 2,
            ..relay_config("relay-d2")
        },
    );
    wait_until("five old sent rows purged", Duration::from_secs(30), || {
        let purged = relay.stats().purged;
        async move { purged == 5 }
    })
    .await;
    wait_sent(&outbox, "the unsent row published").await;
    let stats = relay.close().await;
    publisher.close().await;
    assert_eq!(stats.purged, 5);
    let left: HashSet<String> = sqlx::query(&format!("SELECT message_id FROM {table}"))
        .fetch_all(&pool)
        .await
        .expect("rows")
        .iter()
        .map(|row| row.get::<String, _>("message_id"))
        .collect();
    let expected: HashSet<String> = ["r-5", "r-6", "r-unsent"].map(String::from).into();
    assert_eq!(left, expected);
    assert_eq!(drain(&queue).await.len(), 8);
    db.drop_tables(&pool).await;
}

// ---------------------------------------------------------------------------
// e. `kill -9` between the commit and the publish, and between the publish
//    and the mark.

const ROLE: &str = "BACKSTOP_OUTBOX_CHILD";

/// Run by the kill tests in a child process. `enqueue`: commits an order and
/// its event, then waits to be killed. `relay`: runs a relay (whose marks
/// the parent made fail), until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the outbox kill tests; not a test by itself"]
async fn outbox_child_process() {
    let (Ok(role), Ok(url), Ok(table), Ok(queue)) = (
        std::env::var(ROLE),
        std::env::var("BACKSTOP_OUTBOX_DB"),
        std::env::var("BACKSTOP_OUTBOX_TABLE"),
        std::env::var("BACKSTOP_OUTBOX_QUEUE"),
    ) else {
        panic!("run by the outbox kill tests only");
    };
    init_tracing();
    let db = Db { url, table };
    let (pool, outbox) = db.open().await;
    let _relay = match role.as_str() {
        "enqueue" => {
            order_to_be_killed(&db, &pool, &outbox, &queue).await;
            None
        }
        "relay" => Some(Relay::start(
            outbox,
            publisher("outbox-kill-child").await,
            RelayConfig {
                lease: Duration::from_secs(3),
                ..relay_config("relay-child")
            },
        )),
        other => panic!("unknown role {other}"),
    };
    std::future::pending::<()>().await;
}

/// The order and event `kill-1` of the kill tests, committed.
async fn order_to_be_killed(db: &Db, pool: &AnyPool, outbox: &Outbox, queue: &str) {
    let event = event(queue, "kill-1");
    order_and_event(pool, outbox, &db.orders(), "o-kill", event, None, true).await;
}

fn child(role: &str, db: &Db, queue: &str) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--ignored",
                "--exact",
                &common::test_name(module_path!(), "outbox_child_process"),
                "--nocapture",
            ])
            .env(ROLE, role)
            .env("BACKSTOP_OUTBOX_DB", &db.url)
            .env("BACKSTOP_OUTBOX_TABLE", &db.table)
            .env("BACKSTOP_OUTBOX_QUEUE", queue)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("child process"),
    )
}

/// Starts a relay in this process after the kill, waits until the table is
/// sent, and returns what reached the queue and the relay's counters.
async fn relay_after_the_kill(outbox: &Outbox, queue: &str) -> (Vec<Got>, RelayStats) {
    let publisher = publisher("outbox-kill-parent").await;
    let relay = Relay::start(
        outbox.clone(),
        publisher.clone(),
        relay_config("relay-parent"),
    );
    wait_sent(outbox, "the event is sent after the restart").await;
    let stats = relay.close().await;
    publisher.close().await;
    (drain(queue).await, stats)
}

async fn a_kill_between_commit_and_publish_publishes_once(db: Db) {
    let (pool, outbox) = db.open().await;
    let queue = unique("outbox-kill-commit");
    common::declare(&common::classic(&queue)).await;
    let mut child = child("enqueue", &db, &queue);
    wait_until("the child committed", Duration::from_secs(60), || async {
        outbox.backlog().await.expect("backlog").pending == 1
    })
    .await;
    child.0.kill().expect("SIGKILL the child");
    let _ = child.0.wait();
    assert_eq!(
        count(&pool, &format!("SELECT COUNT(*) FROM {}", db.orders())).await,
        1
    );
    assert_eq!(
        ready(&queue).await,
        0,
        "nothing published before the restart"
    );

    let (got, stats) = relay_after_the_kill(&outbox, &queue).await;
    let ids: Vec<&str> = got.iter().map(|g| g.message_id.as_str()).collect();
    assert_eq!(ids, ["kill-1"], "published exactly once");
    assert_eq!((stats.sent, stats.republished), (1, 0));
    db.drop_tables(&pool).await;
}

async fn a_kill_between_publish_and_mark_is_a_counted_duplicate(db: Db) {
    let (pool, outbox) = db.open().await;
    let queue = unique("outbox-kill-mark");
    common::declare(&common::classic(&queue)).await;
    order_to_be_killed(&db, &pool, &outbox, &queue).await;
    // The child's relay publishes, and its mark fails: killed there, it
    // dies between the publish and the mark.
    let table = &db.table;
    let (block, unblock): (Vec<String>, Vec<String>) = if db.url.starts_with("sqlite") {
        (
            vec![format!(
                "CREATE TRIGGER {table}_no_mark BEFORE UPDATE OF sent_at ON {table}
                 WHEN NEW.sent_at IS NOT NULL
                 BEGIN SELECT RAISE(ABORT, 'test: marking sent is blocked'); END"
            )],
            vec![format!("DROP TRIGGER {table}_no_mark")],
        )
    } else {
        (
            vec![
                format!(
                    "CREATE FUNCTION {table}_no_mark() RETURNS trigger LANGUAGE plpgsql AS
                     $$ BEGIN RAISE EXCEPTION 'test: marking sent is blocked'; END $$"
                ),
                format!(
                    "CREATE TRIGGER {table}_no_mark BEFORE UPDATE ON {table} FOR EACH ROW
                     WHEN (NEW.sent_at IS NOT NULL) EXECUTE FUNCTION {table}_no_mark()"
                ),
            ],
            vec![
                format!("DROP TRIGGER {table}_no_mark ON {table}"),
                format!("DROP FUNCTION {table}_no_mark()"),
            ],
        )
    };
    for statement in &block {
        sqlx::raw_sql(statement)
            .execute(&pool)
            .await
            .expect("block the mark");
    }
    let mut child = child("relay", &db, &queue);
    wait_until(
        "the child's relay published",
        Duration::from_secs(60),
        || async { ready(&queue).await == 1 },
    )
    .await;
    child.0.kill().expect("SIGKILL the child");
    let _ = child.0.wait();
    for statement in &unblock {
        sqlx::raw_sql(statement)
            .execute(&pool)
            .await
            .expect("unblock the mark");
    }
    assert_eq!(
        outbox.backlog().await.expect("backlog").pending,
        1,
        "not marked sent"
    );

    let (got, stats) = relay_after_the_kill(&outbox, &queue).await;
    let ids: Vec<&str> = got.iter().map(|g| g.message_id.as_str()).collect();
    assert_eq!(ids, ["kill-1", "kill-1"], "published again after the kill");
    assert_eq!(stats.republished, 1, "the duplicate is counted");
    assert_eq!(stats.sent, 1);
    db.drop_tables(&pool).await;
}

// ---------------------------------------------------------------------------
// f. A publisher with a spool: the relay never takes the spool's word for
//    the broker's confirm.

async fn a_relay_with_a_spooling_publisher_marks_nothing_unconfirmed(db: Db) {
    let (pool, outbox) = db.open().await;
    let queue = unique("outbox-spool");
    order_and_event(
        &pool,
        &outbox,
        &db.orders(),
        "o-spool",
        event(&queue, "spool-1"),
        None,
        true,
    )
    .await;
    // No broker listens on port 1: every publish would be spooled.
    let spool = std::env::temp_dir().join(format!("{}.db", unique("outbox-spool")));
    let publisher = Publisher::builder(
        ConnectionConfig::new("amqp://127.0.0.1:1/%2f")
            .connection_name("outbox-spool")
            .backoff(common::fast_backoff()),
    )
    .confirm_timeout(Duration::from_millis(500))
    .spool(&spool)
    .start()
    .await
    .expect("publisher");
    let relay = Relay::start(outbox.clone(), publisher.clone(), relay_config("relay-f"));
    wait_until(
        "the relay tried to publish the row",
        Duration::from_secs(30),
        || {
            let stats = relay.stats();
            async move { stats.failed >= 2 || stats.sent >= 1 }
        },
    )
    .await;
    let stats = relay.close().await;
    let spooled = publisher.stats().spooled;
    publisher.close().await;
    assert_eq!(
        (stats.sent, spooled),
        (0, 0),
        "nothing marked sent, nothing spooled: {stats:?}"
    );
    assert_eq!(
        outbox.backlog().await.expect("backlog").pending,
        1,
        "the row waits for a broker that confirms it"
    );
    db.drop_tables(&pool).await;
}

// ---------------------------------------------------------------------------
// g. A relay stalled while holding the lease lock does not stop the others.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_lease_does_not_stop_another_relay() {
    init_tracing();
    let db = Db::postgres();
    let (pool, outbox) = db.open().await;
    let queue = unique("outbox-stalled");
    common::declare(&common::classic(&queue)).await;
    let orders = db.orders();
    order_and_event(
        &pool,
        &outbox,
        &orders,
        "o-1",
        event(&queue, "st-1"),
        None,
        true,
    )
    .await;
    // A stalled relay: its lease transaction open, the table's lease lock
    // held (the key the outbox derives from the table name).
    let mut stalled = pool.begin().await.expect("begin");
    sqlx::query(
        "SELECT pg_advisory_xact_lock(
             ('x' || substr(encode(sha256(convert_to($1, 'UTF8')), 'hex'), 1, 16))::bit(64)::bigint)",
    )
    .bind(format!("backstop outbox lease {}", db.table))
    .execute(&mut *stalled)
    .await
    .expect("hold the lease lock");
    let publisher = publisher("outbox-stalled").await;
    let relay = Relay::start(outbox.clone(), publisher.clone(), relay_config("relay-g"));
    wait_until(
        "the relay counted its backlog",
        Duration::from_secs(10),
        || {
            let pending = relay.stats().pending;
            async move { pending == 1 }
        },
    )
    .await;
    // The relay goes on (it counts its backlog again, about once a
    // second) instead of waiting for the lock.
    order_and_event(
        &pool,
        &outbox,
        &orders,
        "o-2",
        event(&queue, "st-2"),
        None,
        true,
    )
    .await;
    wait_until(
        "the relay sees the second row while the lock is held",
        Duration::from_secs(10),
        || {
            let pending = relay.stats().pending;
            async move { pending == 2 }
        },
    )
    .await;
    assert_eq!(ready(&queue).await, 0, "nothing leased without the lock");
    stalled.rollback().await.expect("the stalled relay goes");
    wait_sent(&outbox, "both rows sent once the lock is free").await;
    let stats = relay.close().await;
    publisher.close().await;
    assert_eq!((stats.sent, stats.republished), (2, 0));
    assert_eq!(ready(&queue).await, 2);
    db.drop_tables(&pool).await;
}

// ---------------------------------------------------------------------------
// i. `close` is bounded when the database stops answering.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_bounded_when_the_database_does_not_answer() {
    init_tracing();
    let db = Db::postgres();
    let (pool, outbox) = db.open().await;
    // Every statement of the relay on the table waits behind this lock.
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", db.table))
        .execute(&mut *lock)
        .await
        .expect("lock the table");
    let publisher = publisher("outbox-close-bound").await;
    let relay = Relay::start(
        outbox.clone(),
        publisher.clone(),
        RelayConfig {
            lease: Duration::from_secs(1),
            ..relay_config("relay-i")
        },
    );
    let waiting = format!(
        "SELECT COUNT(*) FROM pg_locks WHERE relation = '{}'::regclass AND NOT granted",
        db.table
    );
    wait_until(
        "the relay waits for the table",
        Duration::from_secs(10),
        || async { count(&pool, &waiting).await >= 1 },
    )
    .await;
    let closed = tokio::time::timeout(Duration::from_secs(5), relay.close()).await;
    lock.rollback().await.expect("unlock");
    publisher.close().await;
    assert!(closed.is_ok(), "close returned within 5 s (lease 1 s)");
    db.drop_tables(&pool).await;
}

// ---------------------------------------------------------------------------
// h. An ambiguous return keeps the row in doubt.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_return_keeps_the_rows_in_doubt() {
    init_tracing();
    let db = Db::sqlite();
    let (pool, outbox) = db.open().await;
    // No such queue: both are returned; two rows with one message-id in one
    // wave make each return match both publishes.
    let queue = unique("outbox-ambiguous");
    let mut tx = pool.begin().await.expect("begin");
    for _ in 0..2 {
        outbox
            .enqueue(&mut tx, event(&queue, "twin"))
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    // Both publishes must be in flight before either return arrives (a
    // return that comes back before the twin is sent matches only its own
    // publish, which is not ambiguous): the broker's replies reach the
    // publisher through a link that holds each for a second.
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let publisher = publisher_at(
        &url_via(&amqp_url(), proxy.addr()),
        "outbox-ambiguous",
        Duration::from_secs(10),
    )
    .await;
    proxy.delay_replies(Duration::from_secs(1));
    let relay = Relay::start(
        outbox.clone(),
        publisher.clone(),
        RelayConfig {
            backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
            ..relay_config("relay-h")
        },
    );
    wait_until("both rows failed", Duration::from_secs(30), || {
        let failed = relay.stats().failed;
        async move { failed >= 2 }
    })
    .await;
    let stats = relay.close().await;
    let uncertain = publisher.stats().uncertain;
    publisher.close().await;
    assert_eq!((stats.failed, stats.sent), (2, 0));
    assert_eq!(uncertain, 2, "the publisher found the returns ambiguous");
    assert_eq!(
        count(
            &pool,
            &format!("SELECT COUNT(*) FROM {} WHERE in_doubt = 1", db.table)
        )
        .await,
        2,
        "an uncertain failure keeps the row in doubt"
    );
}

// ---------------------------------------------------------------------------
// b. Two relays sharing a PostgreSQL table.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_sharing_postgres_publish_each_row_once() {
    const ROWS: usize = 2000;
    init_tracing();
    let db = Db::postgres();
    let (pool, outbox) = db.open().await;
    let queue = unique("outbox-shared");
    common::declare(&common::classic(&queue)).await;
    let (p1, p2) = (
        publisher("outbox-shared-1").await,
        publisher("outbox-shared-2").await,
    );
    let r1 = Relay::start(outbox.clone(), p1.clone(), relay_config("relay-b1"));
    let r2 = Relay::start(outbox.clone(), p2.clone(), relay_config("relay-b2"));
    // Enqueued while the relays run, 20 rows a transaction.
    for chunk in 0..ROWS / 20 {
        let mut tx = pool.begin().await.expect("begin");
        for i in chunk * 20..(chunk + 1) * 20 {
            outbox
                .enqueue(&mut tx, event(&queue, &format!("s-{i}")))
                .await
                .expect("enqueue");
        }
        tx.commit().await.expect("commit");
    }
    wait_sent(&outbox, "all 2,000 rows sent").await;
    let (s1, s2) = (r1.close().await, r2.close().await);
    p1.close().await;
    p2.close().await;
    assert_eq!(s1.sent + s2.sent, ROWS as u64, "{s1:?} {s2:?}");
    assert!(
        s1.sent > 0 && s2.sent > 0,
        "both relays published: {s1:?} {s2:?}"
    );
    assert_eq!((s1.republished, s2.republished), (0, 0));
    assert_eq!(
        count(
            &pool,
            &format!(
                "SELECT COUNT(*) FROM {} WHERE sent_at IS NOT NULL",
                db.table
            )
        )
        .await,
        ROWS as i64
    );
    assert_eq!(ready(&queue).await, ROWS as u32, "no duplicate");
    let got = drain(&queue).await;
    let mut per_id: HashMap<&str, u32> = HashMap::new();
    for message in &got {
        *per_id.entry(message.message_id.as_str()).or_default() += 1;
    }
    assert_eq!(per_id.len(), ROWS, "every message arrived");
    assert!(per_id.values().all(|n| *n == 1), "no duplicate");
    db.drop_tables(&pool).await;
}

#[tokio::test]
async fn a_table_name_that_is_not_an_identifier_is_refused() {
    let pool = backstop::publish::outbox::open_pool(&Db::sqlite().url)
        .await
        .expect("pool");
    let err = Outbox::with_table(pool, "orders; DROP TABLE x")
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("orders; DROP TABLE x"), "{err}");
}

/// Every behaviour test, once per backend.
macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::init_tracing();
                    super::$test(super::Db::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::init_tracing();
                    super::$test(super::Db::postgres()).await;
                }
            )*
        }
    };
}

both_backends!(
    a_business_write_and_its_event_commit_together,
    each_partition_arrives_in_enqueue_order,
    retention_purges_only_old_sent_rows,
    a_kill_between_commit_and_publish_publishes_once,
    a_kill_between_publish_and_mark_is_a_counted_duplicate,
    a_relay_with_a_spooling_publisher_marks_nothing_unconfirmed,
);
