//! Deduplication: one behaviour suite for the four seen stores (memory,
//! SQLite, PostgreSQL, Redis), then the consumer with duplicates against the
//! real broker, and the transactional inbox surviving a kill between its
//! commit and the ack.

use crate::common;
use backstop::connection::ConnectionSupervisor;
use backstop::consumer::{Consumer, ConsumerConfig, ConsumerHandle};
use backstop::dedup::inbox::{Inbox, InboxHandler};
use backstop::dedup::{
    Claim, DedupConfig, DedupKey, MemorySeenStore, MissingKey, RedisSeenStore, SeenStore,
    SqlSeenStore,
};
use backstop::handler::{Delivery, Handler, Outcome};
use backstop::retry::{Exhausted, RetryPolicy, now_ms};
use backstop::topology::{Queue, Topology};
use backstop_testkit::{postgres_url, redis_url, unique, wait_until};
use common::{init_tracing, queue_is};
use futures_util::future::BoxFuture;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn memory() -> Arc<dyn SeenStore> {
    Arc::new(MemorySeenStore::new(100_000))
}

fn sqlite_url() -> String {
    let path = std::env::temp_dir().join(format!("{}.db", unique("backstop-seen")));
    format!("sqlite://{}", path.display())
}

async fn sqlite() -> Arc<dyn SeenStore> {
    Arc::new(
        SqlSeenStore::connect(&sqlite_url())
            .await
            .expect("sqlite seen store"),
    )
}

async fn postgres() -> Arc<dyn SeenStore> {
    Arc::new(
        SqlSeenStore::connect(&postgres_url())
            .await
            .expect("postgres seen store"),
    )
}

async fn redis() -> Arc<dyn SeenStore> {
    Arc::new(
        RedisSeenStore::connect(&redis_url())
            .await
            .expect("redis seen store"),
    )
}

fn in_ms(ms: u64) -> u64 {
    now_ms() + ms
}

// ---------------------------------------------------------------------------
// The behaviour suite. Every test uses a scope of its own, so the backends
// shared between tests (PostgreSQL, Redis) need no turns.

async fn a_completed_key_is_a_duplicate_and_a_held_one_is_in_progress(store: Arc<dyn SeenStore>) {
    let scope = unique("seen-basic");
    let lease = in_ms(60_000);
    assert_eq!(
        store.claim(&scope, "k", "t1", lease).await,
        Ok(Claim::Claimed)
    );
    assert_eq!(
        store.claim(&scope, "k", "t2", lease).await,
        Ok(Claim::InProgress)
    );
    // Another scope is another namespace.
    let other = unique("seen-other");
    assert_eq!(
        store.claim(&other, "k", "t3", lease).await,
        Ok(Claim::Claimed)
    );
    store
        .complete(&scope, "k", "t1", in_ms(60_000))
        .await
        .expect("complete");
    assert_eq!(store.claim(&scope, "k", "t4", lease).await, Ok(Claim::Done));
    // Only the holder's release counts, and a done key cannot be released.
    store.release(&scope, "k", "t4").await.expect("release");
    assert_eq!(store.claim(&scope, "k", "t5", lease).await, Ok(Claim::Done));
}

async fn a_released_key_can_be_claimed_again(store: Arc<dyn SeenStore>) {
    let scope = unique("seen-release");
    let lease = in_ms(60_000);
    assert_eq!(
        store.claim(&scope, "k", "t1", lease).await,
        Ok(Claim::Claimed)
    );
    store
        .release(&scope, "k", "not-the-holder")
        .await
        .expect("release");
    assert_eq!(
        store.claim(&scope, "k", "t2", lease).await,
        Ok(Claim::InProgress)
    );
    store.release(&scope, "k", "t1").await.expect("release");
    assert_eq!(
        store.claim(&scope, "k", "t2", lease).await,
        Ok(Claim::Claimed)
    );
}

async fn an_expired_lease_is_taken_over(store: Arc<dyn SeenStore>) {
    let scope = unique("seen-lease");
    assert_eq!(
        store.claim(&scope, "k", "t1", in_ms(300)).await,
        Ok(Claim::Claimed)
    );
    assert_eq!(
        store.claim(&scope, "k", "t2", in_ms(60_000)).await,
        Ok(Claim::InProgress)
    );
    wait_until(
        "the lease runs out and the key is claimable",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            let scope = scope.clone();
            async move { store.claim(&scope, "k", "t3", in_ms(60_000)).await == Ok(Claim::Claimed) }
        },
    )
    .await;
    // The old holder can no longer complete or release it.
    store.release(&scope, "k", "t1").await.expect("release");
    assert_eq!(
        store.claim(&scope, "k", "t4", in_ms(60_000)).await,
        Ok(Claim::InProgress)
    );
}

async fn done_keys_expire_after_their_ttl_and_are_purged(store: Arc<dyn SeenStore>) {
    let scope = unique("seen-ttl");
    assert_eq!(
        store.claim(&scope, "k", "t1", in_ms(60_000)).await,
        Ok(Claim::Claimed)
    );
    store
        .complete(&scope, "k", "t1", in_ms(300))
        .await
        .expect("complete");
    assert_eq!(
        store.claim(&scope, "k", "t2", in_ms(60_000)).await,
        Ok(Claim::Done)
    );
    let expiry = now_ms() + 300;
    wait_until(
        "the key's TTL runs out",
        Duration::from_secs(5),
        || async move { now_ms() > expiry + 50 },
    )
    .await;
    // Claims ignore expired keys whether or not the cleanup ran yet...
    assert_eq!(
        store.claim(&scope, "k", "t3", in_ms(200)).await,
        Ok(Claim::Claimed)
    );
    // ...and the cleanup removes them (Redis expires keys by itself).
    let lapsed = now_ms() + 250;
    wait_until(
        "the new lease runs out",
        Duration::from_secs(5),
        || async move { now_ms() > lapsed },
    )
    .await;
    let removed = store.purge_expired(now_ms()).await.expect("purge");
    if format!("{store:?}").starts_with("RedisSeenStore") {
        assert_eq!(removed, 0);
    } else {
        assert!(removed >= 1, "the expired key was not purged");
    }
    assert_eq!(
        store.claim(&scope, "k", "t4", in_ms(60_000)).await,
        Ok(Claim::Claimed)
    );
}

async fn concurrent_claims_of_one_key_have_one_winner(store: Arc<dyn SeenStore>) {
    let scope = unique("seen-race");
    let barrier = Arc::new(tokio::sync::Barrier::new(40));
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            let scope = scope.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .claim(&scope, "k", &format!("t{i}"), in_ms(60_000))
                    .await
                    .expect("claim")
            })
        })
        .collect();
    let mut answers = HashMap::new();
    for task in tasks {
        *answers.entry(task.await.expect("task")).or_insert(0) += 1;
    }
    assert_eq!(answers.get(&Claim::Claimed), Some(&1), "{answers:?}");
    assert_eq!(answers.get(&Claim::InProgress), Some(&39), "{answers:?}");
}

async fn many_keys_at_once_are_each_claimed_and_completed(store: Arc<dyn SeenStore>) {
    let scope = unique("seen-many");
    let claims: Vec<_> = (0..300)
        .map(|i| {
            let store = store.clone();
            let scope = scope.clone();
            tokio::spawn(async move {
                let key = format!("k{i}");
                let token = format!("t{i}");
                let claim = store.claim(&scope, &key, &token, in_ms(60_000)).await;
                store
                    .complete(&scope, &key, &token, in_ms(60_000))
                    .await
                    .expect("complete");
                claim
            })
        })
        .collect();
    for claim in claims {
        assert_eq!(claim.await.expect("task"), Ok(Claim::Claimed));
    }
    for i in 0..300 {
        let claim = store
            .claim(&scope, &format!("k{i}"), "again", in_ms(60_000))
            .await;
        assert_eq!(claim, Ok(Claim::Done), "key k{i}");
    }
}

macro_rules! suite {
    ($backend:ident) => {
        mod $backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_completed_key_is_a_duplicate_and_a_held_one_is_in_progress() {
                super::a_completed_key_is_a_duplicate_and_a_held_one_is_in_progress(
                    super::$backend().await,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_released_key_can_be_claimed_again() {
                super::a_released_key_can_be_claimed_again(super::$backend().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_expired_lease_is_taken_over() {
                super::an_expired_lease_is_taken_over(super::$backend().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn done_keys_expire_after_their_ttl_and_are_purged() {
                super::done_keys_expire_after_their_ttl_and_are_purged(super::$backend().await)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_claims_of_one_key_have_one_winner() {
                super::concurrent_claims_of_one_key_have_one_winner(super::$backend().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_keys_at_once_are_each_claimed_and_completed() {
                super::many_keys_at_once_are_each_claimed_and_completed(super::$backend().await)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn each_order_is_handled_once_among_interleaved_duplicates() {
                super::each_order_is_handled_once_among_interleaved_duplicates(
                    super::$backend().await,
                )
                .await;
            }
        }
    };
}

suite!(memory);
suite!(sqlite);
suite!(postgres);
suite!(redis);

// ---------------------------------------------------------------------------
// The consumer with duplicates.

/// Counts handler calls and successes by order id (the dedup key).
#[derive(Clone, Default)]
struct Orders {
    calls: Arc<Mutex<HashMap<String, u32>>>,
    succeeded: Arc<Mutex<HashMap<String, u32>>>,
    /// How many first calls of each order fail transiently.
    fail_first: u32,
    /// How long each call takes.
    work: Duration,
    running: Arc<AtomicU64>,
    max_running: Arc<AtomicU64>,
}

fn order_of(delivery: &Delivery) -> String {
    serde_json::from_slice::<serde_json::Value>(delivery.body())
        .ok()
        .and_then(|v| {
            v.get("order_id")
                .and_then(|o| o.as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| "<none>".to_owned())
}

impl Orders {
    fn calls(&self) -> HashMap<String, u32> {
        self.calls.lock().expect("lock").clone()
    }

    fn succeeded(&self) -> HashMap<String, u32> {
        self.succeeded.lock().expect("lock").clone()
    }
}

impl Handler for Orders {
    async fn handle(&self, delivery: Delivery) -> Outcome {
        let order = order_of(&delivery);
        let call = {
            let mut calls = self.calls.lock().expect("lock");
            let n = calls.entry(order.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        if call <= self.fail_first {
            return Outcome::retry("the payment provider timed out");
        }
        *self
            .succeeded
            .lock()
            .expect("lock")
            .entry(order)
            .or_insert(0) += 1;
        Outcome::Ack
    }
}

fn order_body(order: u64) -> Vec<u8> {
    format!(r#"{{"order_id":"order-{order}","amount":100}}"#).into_bytes()
}

fn dedup(store: Arc<dyn SeenStore>) -> DedupConfig {
    let key: DedupKey = "json:/order_id".parse().expect("valid key");
    DedupConfig::new(key, store)
        .in_progress_wait(Duration::from_millis(20), Duration::from_secs(30))
}

fn start(
    queue: &str,
    dedup: DedupConfig,
    handler: Orders,
    tune: impl FnOnce(ConsumerConfig) -> ConsumerConfig,
) -> (ConnectionSupervisor, ConsumerHandle) {
    let supervisor = common::supervisor(&backstop_testkit::amqp_url(), Duration::from_secs(5));
    let config = tune(
        ConsumerConfig::new(queue)
            .topology(common::classic(queue))
            .prefetch(50)
            .concurrency(8)
            .dedup(dedup),
    );
    let consumer = Consumer::new(supervisor.clone(), config, handler)
        .spawn()
        .expect("valid consumer config");
    (supervisor, consumer)
}

async fn each_order_is_handled_once_among_interleaved_duplicates(store: Arc<dyn SeenStore>) {
    init_tracing();
    let queue = unique("dedup-interleaved");
    common::declare(&common::classic(&queue)).await;
    let publisher = backstop_testkit::connect().await;
    // 3,000 messages: each of 1,000 orders three times, the copies of an
    // order 1,000 messages apart (7919 is prime to 1000, so i * 7919 mod 1000
    // visits every order once per 1,000 messages).
    backstop_testkit::publish(&publisher, &queue, 3000, "copy", |i| {
        order_body(i * 7919 % 1000)
    })
    .await;
    let orders = Orders::default();
    let (supervisor, consumer) = start(&queue, dedup(store), orders.clone(), |c| c);
    common::wait_stats(&consumer, "3,000 deliveries settled", |r| {
        r.handled + r.duplicates >= 3000
    })
    .await;
    wait_until("the queue is empty", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let report = common::finish(consumer, &supervisor, &publisher, &queue).await;
    let calls = orders.calls();
    assert_eq!(calls.len(), 1000, "every order reached the handler");
    assert!(calls.values().all(|n| *n == 1), "an order ran twice");
    assert_eq!(calls.values().sum::<u32>(), 1000);
    assert_eq!(report.duplicates, 2000);
    assert_eq!(report.dedup_failures, 0);
}

/// Two instances, each with its own connection, share one store and receive
/// the three copies of each order side by side.
async fn two_instances_handle_each_order_once(store: Arc<dyn SeenStore>) {
    init_tracing();
    let queue = unique("dedup-two");
    common::declare(&common::classic(&queue)).await;
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 1500, "copy", |i| order_body(i / 3)).await;
    let orders = Orders {
        work: Duration::from_millis(2),
        ..Orders::default()
    };
    let (sup_a, a) = start(&queue, dedup(store.clone()), orders.clone(), |c| {
        c.prefetch(10)
    });
    let (sup_b, b) = start(&queue, dedup(store), orders.clone(), |c| c.prefetch(10));
    wait_until("1,500 deliveries settled", Duration::from_secs(60), || {
        let (ra, rb) = (a.stats(), b.stats());
        async move { ra.handled + ra.duplicates + rb.handled + rb.duplicates >= 1500 }
    })
    .await;
    wait_until("the queue is empty", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let ra = a.shutdown().await.expect("shutdown a");
    sup_a.close().await;
    let rb = common::finish(b, &sup_b, &publisher, &queue).await;
    let calls = orders.calls();
    assert_eq!(calls.len(), 500);
    assert!(calls.values().all(|n| *n == 1), "an order ran twice");
    assert_eq!(ra.duplicates + rb.duplicates, 1000);
    assert!(
        ra.duplicates > 0 && rb.duplicates > 0,
        "both instances consumed: {} and {} duplicates",
        ra.duplicates,
        rb.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_postgres_handle_each_order_once() {
    two_instances_handle_each_order_once(postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_handle_each_order_once() {
    two_instances_handle_each_order_once(redis().await).await;
}

/// With deduplication every prefetched delivery claims its key at once, but
/// the handlers themselves stay within the concurrency limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplicated_handlers_never_exceed_the_concurrency_limit() {
    init_tracing();
    let queue = unique("dedup-limit");
    common::declare(&common::classic(&queue)).await;
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 300, "order", order_body).await;
    let orders = Orders {
        work: Duration::from_millis(5),
        ..Orders::default()
    };
    let (supervisor, consumer) = start(&queue, dedup(sqlite().await), orders.clone(), |c| {
        c.prefetch(100).concurrency(3)
    });
    common::wait_stats(&consumer, "300 handled", |r| r.handled >= 300).await;
    common::finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(orders.calls().len(), 300);
    assert_eq!(orders.max_running.load(Ordering::SeqCst), 3);
}

/// A connection cut ends the session while deliveries still wait for a
/// handler slot. Their tags are dead (the broker redelivers them), so their
/// handlers never start and their claims are released at once: the
/// redelivered copies run without waiting. Before, the stale deliveries ran
/// their handlers one by one, holding the keys, and every redelivered copy
/// waited for them and was acked as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_an_ended_session_never_start_their_handler() {
    init_tracing();
    let queue = unique("dedup-stale");
    common::declare(&common::classic(&queue)).await;
    let proxy = backstop_testkit::FaultProxy::start(backstop_testkit::broker_addr())
        .await
        .expect("proxy");
    let supervisor = common::supervisor(
        &backstop_testkit::url_via(&backstop_testkit::amqp_url(), proxy.addr()),
        Duration::from_secs(5),
    );
    let orders = Orders {
        work: Duration::from_millis(800),
        ..Orders::default()
    };
    let config = ConsumerConfig::new(&queue)
        .topology(common::classic(&queue))
        .prefetch(10)
        .concurrency(1)
        .dedup(dedup(redis().await));
    let consumer = Consumer::new(supervisor.clone(), config, orders.clone())
        .spawn()
        .expect("valid consumer config");
    common::wait_stats(&consumer, "subscribed", |r| r.sessions >= 1).await;
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 5, "order", order_body).await;
    wait_until("the first handler runs", Duration::from_secs(10), || {
        let running = orders.running.load(Ordering::SeqCst);
        async move { running == 1 }
    })
    .await;
    proxy.cut();
    common::wait_stats(&consumer, "every order settled again", |r| {
        r.sessions >= 2 && r.handled + r.duplicates >= 5
    })
    .await;
    wait_until("the queue is empty", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let report = common::finish(consumer, &supervisor, &publisher, &queue).await;
    let calls = orders.calls();
    assert_eq!(calls.len(), 5, "every order ran: {calls:?}");
    assert!(
        calls.values().all(|n| *n == 1),
        "an order ran twice: {calls:?}"
    );
    // Only the order whose handler was running at the cut ran in the old
    // session; its redelivery is the one duplicate.
    assert_eq!(report.duplicates, 1, "{report:?}");
}

/// Deliveries waiting for a key their own process holds leave as soon as
/// their session ends. Before, they kept waiting (up to `max_wait`) among the
/// handlers of ended sessions, which bound how many deliveries the next
/// session may start: after a cut, a consumer behind such waiters crawled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_for_a_busy_key_leave_when_their_session_ends() {
    init_tracing();
    let queue = unique("dedup-stale-wait");
    common::declare(&common::classic(&queue)).await;
    let proxy = backstop_testkit::FaultProxy::start(backstop_testkit::broker_addr())
        .await
        .expect("proxy");
    let supervisor = common::supervisor(
        &backstop_testkit::url_via(&backstop_testkit::amqp_url(), proxy.addr()),
        Duration::from_secs(5),
    );
    // The holder runs 20 s; the waiters would wait up to 60 s.
    let orders = Orders {
        work: Duration::from_secs(20),
        ..Orders::default()
    };
    let config = ConsumerConfig::new(&queue)
        .topology(common::classic(&queue))
        .prefetch(10)
        .concurrency(1)
        .dedup(
            dedup(memory().await)
                .in_progress_wait(Duration::from_millis(20), Duration::from_secs(60)),
        );
    let consumer = Consumer::new(supervisor.clone(), config, orders.clone())
        .spawn()
        .expect("valid consumer config");
    common::wait_stats(&consumer, "subscribed", |r| r.sessions >= 1).await;
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 10, "order", |_| order_body(7)).await;
    wait_until("the holder runs", Duration::from_secs(10), || {
        let running = orders.running.load(Ordering::SeqCst);
        async move { running == 1 }
    })
    .await;
    common::wait_stats(&consumer, "the nine others wait for the key", |r| {
        r.in_flight >= 10
    })
    .await;
    let cut_at = std::time::Instant::now();
    proxy.cut();
    // Well before the holder's 20 s end: the nine waiters are gone.
    wait_until(
        "the waiters of the ended session leave",
        Duration::from_secs(8),
        || {
            let stale = consumer.stats().stale_tags_dropped;
            async move { stale >= 9 }
        },
    )
    .await;
    assert_eq!(
        orders.running.load(Ordering::SeqCst),
        1,
        "the holder still runs ({:?} after the cut)",
        cut_at.elapsed()
    );
    // Then every copy settles: one call, the redeliveries duplicates.
    backstop_testkit::wait_until("every copy settled", Duration::from_secs(60), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let report = common::finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(orders.calls().get("order-7"), Some(&1), "{report:?}");
}

/// A handler still running when the shutdown timeout cancels it may have
/// done its effect: its key must stay claimed until the lease ends, not be
/// released for the redelivery to run the effect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_running_handler_keeps_its_key_claimed() {
    init_tracing();
    let queue = unique("dedup-cancelled");
    common::declare(&common::classic(&queue)).await;
    let store = redis().await;
    let started = Arc::new(AtomicU64::new(0));
    let handler = {
        let started = started.clone();
        backstop::handler::handler_fn(move |_: Delivery| {
            let started = started.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                // The effect is under way and never reports back.
                std::future::pending::<()>().await;
            }
        })
    };
    let supervisor = common::supervisor(&backstop_testkit::amqp_url(), Duration::from_secs(5));
    let config = ConsumerConfig::new(&queue)
        .topology(common::classic(&queue))
        .shutdown_timeout(Duration::from_millis(300))
        .dedup(dedup(store.clone()));
    let consumer = Consumer::new(supervisor.clone(), config, handler)
        .spawn()
        .expect("valid consumer config");
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 1, "order", order_body).await;
    wait_until("the handler started", Duration::from_secs(10), || {
        let n = started.load(Ordering::SeqCst);
        async move { n == 1 }
    })
    .await;
    consumer.shutdown().await.expect("shutdown");
    supervisor.close().await;
    // A release would be spawned at the cancellation; give it every chance
    // to land (this wait is the test: the key must stay held through it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        let claim = store
            .claim(&queue, "order-0", "another-instance", in_ms(60_000))
            .await
            .expect("redis answers");
        assert_eq!(
            claim,
            Claim::InProgress,
            "the key was freed for a second run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    backstop_testkit::delete_queue(&publisher, &queue).await;
}

/// A handler of an ended session (the connection was cut under it) still
/// runs its effect when the consumer shuts down. The shutdown gives it the
/// shutdown timeout like the current session's handlers, so it finishes and
/// marks its key done. Before, the drain waited only for the current
/// session's handlers and dropped the stale one mid-effect: its key stayed
/// claimed until the lease ended, was never marked done, and after the lease
/// the redelivery ran the effect a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_lets_a_stale_handler_finish_and_mark_its_key_done() {
    use futures_util::StreamExt;
    init_tracing();
    let queue = unique("dedup-stale-drain");
    common::declare(&common::classic(&queue)).await;
    let store = redis().await;
    let proxy = backstop_testkit::FaultProxy::start(backstop_testkit::broker_addr())
        .await
        .expect("proxy");
    let supervisor = common::supervisor(
        &backstop_testkit::url_via(&backstop_testkit::amqp_url(), proxy.addr()),
        Duration::from_secs(5),
    );
    let orders = Orders {
        work: Duration::from_secs(3),
        ..Orders::default()
    };
    let config = ConsumerConfig::new(&queue)
        .topology(common::classic(&queue))
        .shutdown_timeout(Duration::from_secs(15))
        .dedup(dedup(store.clone()));
    let consumer = Consumer::new(supervisor.clone(), config, orders.clone())
        .spawn()
        .expect("valid consumer config");
    common::wait_stats(&consumer, "subscribed", |r| r.sessions >= 1).await;
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 1, "order", order_body).await;
    wait_until("the handler runs", Duration::from_secs(10), || {
        let running = orders.running.load(Ordering::SeqCst);
        async move { running == 1 }
    })
    .await;
    // A consumer of higher priority takes the redelivery and holds it, so the
    // consumer's next session has nothing running of its own when it stops.
    let holder = publisher.create_channel().await.expect("holder channel");
    holder
        .basic_qos(1, lapin::options::BasicQosOptions::default())
        .await
        .expect("basic.qos");
    let mut priority = lapin::types::FieldTable::default();
    priority.insert("x-priority".into(), lapin::types::AMQPValue::LongInt(10));
    let mut held = holder
        .basic_consume(
            queue.as_str().into(),
            "holder".into(),
            lapin::options::BasicConsumeOptions::default(),
            priority,
        )
        .await
        .expect("basic.consume");
    proxy.cut();
    let redelivered = tokio::time::timeout(Duration::from_secs(10), held.next())
        .await
        .expect("the redelivery reaches the holder")
        .expect("the holder's subscription stands")
        .expect("a delivery");
    assert!(redelivered.redelivered, "{redelivered:?}");
    common::wait_stats(&consumer, "a second session", |r| r.sessions >= 2).await;
    assert_eq!(
        orders.running.load(Ordering::SeqCst),
        1,
        "the first session's handler still runs"
    );
    let report = consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    assert_eq!(
        orders.succeeded().get("order-0").copied(),
        Some(1),
        "the stale handler was dropped mid-effect: {report:?}"
    );
    assert_eq!(report.stale_tags_dropped, 1, "{report:?}");
    let claim = store
        .claim(&queue, "order-0", "another-instance", in_ms(60_000))
        .await
        .expect("redis answers");
    assert_eq!(claim, Claim::Done, "the key was not marked done");
    let _ = holder.close(200, "done".into()).await;
    backstop_testkit::delete_queue(&publisher, &queue).await;
}

/// Business ids that are binary, carry a NUL, or are longer than an index
/// row each stay their own key. Before keys were encoded, the two binary ids
/// below decoded lossily to one key (the second was acked as a duplicate
/// without running), and the NUL or 5,000-byte keys failed PostgreSQL's
/// claim batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_nul_and_long_business_ids_are_each_their_own_key() {
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable};
    init_tracing();
    let queue = unique("dedup-odd-ids");
    common::declare(&common::classic(&queue)).await;
    let ids: Vec<Vec<u8>> = vec![
        b"A\xff".to_vec(),
        b"A\xfe".to_vec(),
        b"nul\0inside".to_vec(),
        vec![b'x'; 5000],
        vec![b'y'; 5000],
        b"hex:41ff".to_vec(),
    ];
    let calls = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let handler = {
        let calls = calls.clone();
        backstop::handler::handler_fn(move |delivery: Delivery| {
            let calls = calls.clone();
            async move {
                let id = match delivery.header("x-order-id") {
                    Some(AMQPValue::LongString(s)) => s.as_bytes().to_vec(),
                    other => panic!("unexpected header {other:?}"),
                };
                calls.lock().expect("lock").push(id);
            }
        })
    };
    let supervisor = common::supervisor(&backstop_testkit::amqp_url(), Duration::from_secs(5));
    let key: DedupKey = "header:x-order-id".parse().expect("valid key");
    let config = ConsumerConfig::new(&queue)
        .topology(common::classic(&queue))
        .dedup(DedupConfig::new(key, postgres().await));
    let consumer = Consumer::new(supervisor.clone(), config, handler)
        .spawn()
        .expect("valid consumer config");
    let publisher = backstop_testkit::connect().await;
    let channel = common::confirmed_channel(&publisher).await;
    // Each id twice: the second copy of each is a duplicate.
    for id in ids.iter().chain(ids.iter()) {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-order-id".into(),
            AMQPValue::LongString(id.clone().into()),
        );
        common::publish_confirmed(
            &channel,
            "",
            &queue,
            b"{}",
            BasicProperties::default().with_headers(headers),
        )
        .await;
    }
    common::wait_stats(&consumer, "every copy settled", |r| {
        r.handled + r.duplicates >= 12
    })
    .await;
    let report = common::finish(consumer, &supervisor, &publisher, &queue).await;
    // Short labels, so a failure prints readably: length and leading bytes.
    let label = |id: &Vec<u8>| {
        format!(
            "{}B:{:?}",
            id.len(),
            String::from_utf8_lossy(&id[..id.len().min(12)])
        )
    };
    let mut seen: Vec<String> = calls.lock().expect("lock").iter().map(label).collect();
    seen.sort();
    let mut expected: Vec<String> = ids.iter().map(label).collect();
    expected.sort();
    assert_eq!(seen, expected, "each id ran exactly once");
    assert_eq!(report.duplicates, 6);
    assert_eq!(report.dedup_failures, 0);
}

/// Redis keys are `backstop:seen:<scope>:<key>`: with a `:` in a queue name,
/// scope `a:b` with key `c` and scope `a` with key `b:c` were one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_scopes_with_colons_do_not_collide() {
    let store = redis().await;
    let base = unique("scope");
    let (scope_a, key_a) = (format!("{base}:b"), "c".to_owned());
    let (scope_b, key_b) = (base.clone(), "b:c".to_owned());
    assert_eq!(
        store
            .claim(&scope_a, &key_a, "t1", in_ms(60_000))
            .await
            .expect("redis answers"),
        Claim::Claimed
    );
    store
        .complete(&scope_a, &key_a, "t1", in_ms(60_000))
        .await
        .expect("redis answers");
    assert_eq!(
        store
            .claim(&scope_b, &key_b, "t2", in_ms(60_000))
            .await
            .expect("redis answers"),
        Claim::Claimed,
        "another scope's key must be fresh"
    );
}

/// Claims are taken for the whole prefetch window at once, but handlers run
/// `concurrency` at a time. A claim that waited past its lease for a slot
/// must not run its handler once another instance took the key over: before
/// the claim was extended at the slot, both ran the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_waited_past_its_lease_for_a_slot_never_runs_twice() {
    init_tracing();
    let queue = unique("dedup-lease-wait");
    common::declare(&common::classic(&queue)).await;
    let store = redis().await;
    let orders = Orders {
        work: Duration::from_millis(400),
        ..Orders::default()
    };
    let lease = Duration::from_secs(1);
    let (supervisor, consumer) = start(
        &queue,
        dedup(store.clone()).lease(lease),
        orders.clone(),
        |c| c.prefetch(10).concurrency(1),
    );
    common::wait_stats(&consumer, "subscribed", |r| r.sessions >= 1).await;
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 6, "order", order_body).await;
    // A second instance sharing the store: it takes over every key whose
    // lease ran out, runs that order's effect, and marks the key done.
    let keys: Vec<String> = (0..6).map(|i| format!("order-{i}")).collect();
    let taken_over = Arc::new(Mutex::new(Vec::<String>::new()));
    let other = {
        let (store, queue, keys, taken_over) = (
            store.clone(),
            queue.clone(),
            keys.clone(),
            taken_over.clone(),
        );
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
            while tokio::time::Instant::now() < deadline {
                for key in &keys {
                    if taken_over.lock().expect("lock").contains(key) {
                        continue;
                    }
                    let claim = store
                        .claim(&queue, key, "instance-b", in_ms(60_000))
                        .await
                        .expect("redis answers");
                    if claim == Claim::Claimed {
                        taken_over.lock().expect("lock").push(key.clone());
                        store
                            .complete(&queue, key, "instance-b", in_ms(600_000))
                            .await
                            .expect("redis answers");
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    common::wait_stats(&consumer, "all six settled", |r| {
        r.handled + r.duplicates >= 6
    })
    .await;
    wait_until("the queue is empty", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    other.abort();
    common::finish(consumer, &supervisor, &publisher, &queue).await;
    let calls = orders.calls();
    let taken_over = taken_over.lock().expect("lock").clone();
    assert!(
        !taken_over.is_empty(),
        "the other instance never took a key over: the test proves nothing"
    );
    for key in &keys {
        let here = calls.get(key).copied().unwrap_or(0);
        let there = u32::from(taken_over.contains(key));
        assert_eq!(
            here + there,
            1,
            "{key}: ran {here} time(s) here and {there} in the other instance"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_releases_the_claim_and_the_retry_succeeds_once() {
    init_tracing();
    let queue = unique("dedup-release");
    let publisher = backstop_testkit::connect().await;
    let policy = RetryPolicy::new()
        .immediate(0, Duration::ZERO)
        .delays([Duration::from_millis(200)])
        .exhausted(Exhausted::DeadLetter);
    let orders = Orders {
        fail_first: 1,
        ..Orders::default()
    };
    let (supervisor, consumer) = start(&queue, dedup(sqlite().await), orders.clone(), |c| {
        c.retry(policy)
    });
    common::wait_stats(&consumer, "subscribed", |r| r.sessions >= 1).await;
    backstop_testkit::publish(&publisher, &queue, 1, "order", |_| order_body(1)).await;
    common::wait_stats(&consumer, "the retry handled", |r| r.handled >= 2).await;
    // A late duplicate is recognised.
    backstop_testkit::publish(&publisher, &queue, 1, "late", |_| order_body(1)).await;
    common::wait_stats(&consumer, "the duplicate acked", |r| r.duplicates >= 1).await;
    wait_until("the queues are empty", Duration::from_secs(10), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let report = common::finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(
        orders.calls().get("order-1"),
        Some(&2),
        "one failure, one retry"
    );
    assert_eq!(orders.succeeded().get("order-1"), Some(&1));
    assert_eq!(report.retried, 1);
    assert_eq!(report.duplicates, 1);
    assert_eq!(report.dead_lettered, 0);
    assert!(queue_is(&format!("{queue}.dlq"), |c| c.ready == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_a_key_are_handled_or_dead_lettered_as_configured() {
    init_tracing();
    let publisher = backstop_testkit::connect().await;
    for missing in [MissingKey::Process, MissingKey::Reject] {
        let queue = unique("dedup-missing");
        let policy = RetryPolicy::new().delays([Duration::from_millis(200)]);
        let orders = Orders::default();
        let config = dedup(memory().await).missing_key(missing);
        let (supervisor, consumer) = start(&queue, config, orders.clone(), |c| c.retry(policy));
        common::wait_stats(&consumer, "subscribed", |r| r.sessions >= 1).await;
        // Not JSON at all, and JSON without the field.
        let bodies = [b"\xff\xfe not json".to_vec(), br#"{"amount":1}"#.to_vec()];
        backstop_testkit::publish(&publisher, &queue, 2, "nokey", |i| {
            bodies[i as usize].clone()
        })
        .await;
        common::wait_stats(&consumer, "both settled", |r| {
            r.handled + r.dead_lettered >= 2
        })
        .await;
        let report = consumer.shutdown().await.expect("shutdown");
        assert_eq!(report.missing_keys, 2);
        match missing {
            MissingKey::Process => {
                assert_eq!(orders.calls().get("<none>"), Some(&2));
                assert_eq!(report.dead_lettered, 0);
            }
            MissingKey::Reject => {
                assert!(orders.calls().is_empty(), "the handler ran");
                assert_eq!(report.dead_lettered, 2);
                let dlq = format!("{queue}.dlq");
                wait_until("both in the DLQ", Duration::from_secs(10), || {
                    queue_is(&dlq, |c| c.ready == 2)
                })
                .await;
                backstop_testkit::delete_queue(&publisher, &dlq).await;
            }
        }
        supervisor.close().await;
        backstop_testkit::delete_queue(&publisher, &queue).await;
    }
}

// ---------------------------------------------------------------------------
// The transactional inbox.

/// Records each order in `effects` inside the inbox's transaction; the table
/// has no unique key, so an effect applied twice would show as two rows.
#[derive(Clone, Default)]
struct RecordEffect {
    calls: Arc<AtomicU64>,
}

impl InboxHandler for RecordEffect {
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
        tx: &'a mut sqlx::AnyConnection,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let result = sqlx::query("INSERT INTO effects (order_id) VALUES ($1)")
                .bind(order_of(delivery))
                .execute(&mut *tx)
                .await;
            match result {
                Ok(_) => Outcome::Ack,
                Err(e) => Outcome::retry(e.to_string()),
            }
        })
    }
}

async fn inbox_consumer(
    queue: &str,
    db: &str,
    handler: RecordEffect,
    tune: impl FnOnce(ConsumerConfig) -> ConsumerConfig,
) -> (ConnectionSupervisor, ConsumerHandle, Arc<AtomicU64>) {
    let pool = backstop::dedup::inbox::open_pool(db).await.expect("pool");
    sqlx::query("CREATE TABLE IF NOT EXISTS effects (order_id TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("effects table");
    let key: DedupKey = "json:/order_id".parse().expect("key");
    let inbox = Inbox::new(pool, queue, key, handler).await.expect("inbox");
    let duplicates = inbox.duplicates();
    let supervisor = common::supervisor(&backstop_testkit::amqp_url(), Duration::from_secs(5));
    let config = tune(
        ConsumerConfig::new(queue)
            .topology(Topology::new().queue(Queue::classic(queue)))
            .prefetch(200)
            .concurrency(4),
    );
    let consumer = Consumer::new(supervisor.clone(), config, inbox)
        .spawn()
        .expect("consumer");
    (supervisor, consumer, duplicates)
}

async fn effects(db: &str) -> Vec<(String, i64)> {
    effects_once_created(db)
        .await
        .unwrap_or_else(|| panic!("reading the effects table: no such table in {db}"))
}

/// The effects table's rows, or `None` while it does not exist yet (a child
/// process creates it); any other SQL error panics.
async fn effects_once_created(db: &str) -> Option<Vec<(String, i64)>> {
    let pool = backstop::dedup::inbox::open_pool(db).await.expect("pool");
    let rows = match sqlx::query(
        "SELECT order_id, COUNT(*) AS n FROM effects GROUP BY order_id ORDER BY order_id",
    )
    .fetch_all(&pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) if e.to_string().contains("no such table: effects") => return None,
        Err(e) => panic!("reading the effects table: {e}"),
    };
    Some(
        rows.iter()
            .map(|r| (r.get::<String, _>("order_id"), r.get::<i64, _>("n")))
            .collect(),
    )
}

/// Run by `the_inbox_applies_each_effect_once_across_a_kill_after_commit` in
/// a child process: consumes with the inbox and never sends an ack (the
/// prefetch window holds every message, handlers complete in order, the
/// ack batch never fills and the flush timer is an hour), until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the inbox kill test; not a test by itself"]
async fn inbox_child_process() {
    let (Ok(queue), Ok(db)) = (
        std::env::var("BACKSTOP_INBOX_QUEUE"),
        std::env::var("BACKSTOP_INBOX_DB"),
    ) else {
        panic!("run by the inbox kill test only");
    };
    let (_supervisor, _consumer, _) = inbox_consumer(&queue, &db, RecordEffect::default(), |c| {
        // One handler at a time: completions arrive in order, so no gap
        // forms (a gap left open for long is acked tag by tag).
        c.prefetch(1000)
            .concurrency(1)
            .ack_batch(1_000_000)
            .ack_flush(Duration::from_secs(3600))
    })
    .await;
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_applies_each_effect_once_across_a_kill_after_commit() {
    init_tracing();
    let queue = unique("inbox-kill");
    let db = sqlite_url();
    common::declare(&common::classic(&queue)).await;
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 300, "order", order_body).await;

    let mut child = common::KillOnDrop(
        std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--ignored",
                "--exact",
                &common::test_name(module_path!(), "inbox_child_process"),
            ])
            .env("BACKSTOP_INBOX_QUEUE", &queue)
            .env("BACKSTOP_INBOX_DB", &db)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("child process"),
    );
    wait_until(
        "the child committed all 300 effects",
        Duration::from_secs(60),
        || {
            let db = db.clone();
            async move {
                effects_once_created(&db)
                    .await
                    .is_some_and(|e| e.len() == 300)
            }
        },
    )
    .await;
    // Every effect is committed and nothing was acked: the broker holds all
    // 300 as unacked (its counters lag a little behind).
    wait_until(
        "the broker shows 300 unacked",
        Duration::from_secs(20),
        || queue_is(&queue, |c| c.unacked == 300),
    )
    .await;
    child.0.kill().expect("SIGKILL the child");
    let _ = child.0.wait();
    assert_eq!(effects(&db).await.len(), 300);

    let handler = RecordEffect::default();
    let (supervisor, consumer, duplicates) =
        inbox_consumer(&queue, &db, handler.clone(), |c| c).await;
    common::wait_stats(&consumer, "all 300 redelivered and acked", |r| {
        r.handled >= 300
    })
    .await;
    wait_until("the queue is empty", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    common::finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        0,
        "a redelivery reached the handler"
    );
    assert_eq!(duplicates.load(Ordering::SeqCst), 300);
    let applied = effects(&db).await;
    assert_eq!(applied.len(), 300);
    assert!(
        applied.iter().all(|(_, n)| *n == 1),
        "an effect was applied twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_handler_failure_rolls_its_writes_back() {
    init_tracing();
    let db = sqlite_url();
    let pool = backstop::dedup::inbox::open_pool(&db).await.expect("pool");
    sqlx::query("CREATE TABLE effects (order_id TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("table");

    /// Writes its effect, then fails the first call.
    struct WriteThenFail(AtomicU64);
    impl InboxHandler for WriteThenFail {
        fn handle<'a>(
            &'a self,
            delivery: &'a Delivery,
            tx: &'a mut sqlx::AnyConnection,
        ) -> BoxFuture<'a, Outcome> {
            Box::pin(async move {
                let call = self.0.fetch_add(1, Ordering::SeqCst);
                sqlx::query("INSERT INTO effects (order_id) VALUES ($1)")
                    .bind(order_of(delivery))
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                if call == 0 {
                    Outcome::retry("downstream failed after the write")
                } else {
                    Outcome::Ack
                }
            })
        }
    }

    let key: DedupKey = "json:/order_id".parse().expect("key");
    let inbox = Inbox::new(pool, "orders", key, WriteThenFail(AtomicU64::new(0)))
        .await
        .expect("inbox");
    let message = Delivery::for_test(order_body(9), Default::default());
    assert!(matches!(
        inbox.handle(message.clone()).await,
        Outcome::Retry { .. }
    ));
    assert_eq!(effects(&db).await, vec![]);
    assert_eq!(inbox.handle(message.clone()).await, Outcome::Ack);
    assert_eq!(inbox.handle(message).await, Outcome::Ack);
    assert_eq!(effects(&db).await, vec![("order-9".to_owned(), 1)]);
    assert_eq!(inbox.duplicates().load(Ordering::SeqCst), 1);
}

/// A Redis server of the test's own, and a seen store on it.
async fn private_redis() -> (backstop_testkit::servers::PrivateRedis, Arc<dyn SeenStore>) {
    let redis = backstop_testkit::servers::PrivateRedis::start();
    let store: Arc<dyn SeenStore> = Arc::new(
        RedisSeenStore::connect(&redis.url())
            .await
            .expect("private redis seen store"),
    );
    (redis, store)
}

/// A claim that fails for longer than `max_wait` (the dedup store is down)
/// is held and tried again until the store is back, then handled: the
/// delivery's own entry is not mistaken for a key busy elsewhere, so it is
/// never requeued as a busy duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_error_longer_than_max_wait_is_held_then_handled() {
    init_tracing();
    let (mut redis, store) = private_redis().await;
    let queue = unique("dedup-claim-outage");
    let publisher = backstop_testkit::connect().await;
    let key: DedupKey = "json:/order_id".parse().expect("valid key");
    let dedup = DedupConfig::new(key, store)
        .in_progress_wait(Duration::from_millis(20), Duration::from_secs(2));
    let orders = Orders::default();
    let (supervisor, consumer) = start(&queue, dedup, orders.clone(), |c| c);
    common::wait_stats(&consumer, "subscribed", |r| r.sessions >= 1).await;
    redis.stop();
    backstop_testkit::publish(&publisher, &queue, 1, "order", |_| order_body(1)).await;
    common::wait_stats(&consumer, "the claim fails", |r| r.dedup_failures >= 1).await;
    // The outage lasts well past max_wait (2 s): the length of the outage
    // is the scenario, not a condition to await.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = consumer.stats();
    assert_eq!(
        during.dedup_busy, 0,
        "requeued as a busy duplicate: {during:?}"
    );
    assert_eq!(during.requeued, 0, "requeued during the outage: {during:?}");
    assert!(orders.calls().is_empty(), "handled without a claim");
    redis.resume();
    common::wait_stats(&consumer, "handled once the store is back", |r| {
        r.handled >= 1
    })
    .await;
    wait_until("the queue is empty", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let report = common::finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(orders.calls().get("order-1"), Some(&1), "handled once");
    assert_eq!(report.dedup_busy, 0);
    assert_eq!(report.duplicates, 0);
    assert!(report.dedup_failures >= 1);
}

/// A shutdown while the dedup store is down does not wait out the shutdown
/// timeout for a delivery whose handler never started: it is requeued at
/// once, and the release its claim left pending is in the final report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_dedup_outage_does_not_wait_for_the_claim() {
    init_tracing();
    let (mut redis, store) = private_redis().await;
    let queue = unique("dedup-outage-stop");
    let publisher = backstop_testkit::connect().await;
    let orders = Orders::default();
    let (supervisor, consumer) = start(&queue, dedup(store), orders.clone(), |c| {
        c.shutdown_timeout(Duration::from_secs(30))
    });
    common::wait_stats(&consumer, "subscribed", |r| r.sessions >= 1).await;
    redis.stop();
    backstop_testkit::publish(&publisher, &queue, 1, "order", |_| order_body(1)).await;
    common::wait_stats(&consumer, "the claim fails", |r| r.dedup_failures >= 1).await;
    let stopping = std::time::Instant::now();
    let report = consumer.shutdown().await.expect("clean shutdown");
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the shutdown waited {took:?} for a claim against a store that is down"
    );
    assert!(orders.calls().is_empty(), "handled without a claim");
    assert_eq!(report.requeued, 1, "{report:?}");
    assert_eq!(report.dedup_pending_release, 1, "{report:?}");
    assert_eq!(report.dedup_pending_done, 0, "{report:?}");
    supervisor.close().await;
    wait_until(
        "the order is back in the queue",
        Duration::from_secs(10),
        || queue_is(&queue, |c| c.ready == 1 && c.unacked == 0),
    )
    .await;
    backstop_testkit::delete_queue(&publisher, &queue).await;
}
