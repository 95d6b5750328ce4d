//! The ways a consumer used to stall or throw away settled work, against the
//! real broker: hung handlers of an ended session holding the new one's
//! slots, the probing prefetch outliving the circuit breaker, a broker
//! cancel discarding ready results, `NOT_ALLOWED` ending the supervisor, a
//! connect-then-die loop retried at full speed, stale completions counted as
//! probes, and a panicking store taking the whole consumer down.

use crate::common;
use backstop::breaker::{BreakerConfig, BreakerState};
use backstop::connection::{Backoff, ConnectionConfig, ConnectionState, ConnectionSupervisor};
use backstop::consumer::ConsumerConfig;
use backstop::dedup::{Claim, DedupConfig, DedupError, DedupKey, MemorySeenStore, SeenStore};
use backstop::handler::Outcome;
use backstop::retry::{Exhausted, RetryPolicy};
use backstop::store::{
    AuditEntry, CompensationStore, FailedRow, ListFilter, ManualAction, NewFailedMessage,
    RedriveOutcome, SqlStore, Status, StoreError,
};
use backstop_testkit::{
    FaultProxy, amqp_url, broker_addr, connect, consumer_prefetches, delete_queue, publish,
    rabbitmqctl, unique, url_via, wait_until,
};
use common::*;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn breaker_reaches(
    breaker: &mut tokio::sync::watch::Receiver<BreakerState>,
    state: BreakerState,
    what: &str,
) {
    let reached = tokio::time::timeout(Duration::from_secs(30), breaker.wait_for(|s| *s == state))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(reached, "timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_prefetch_is_back_once_the_breaker_closes() {
    init_tracing();
    let queue = unique("breaker-prefetch");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let down = Arc::new(AtomicBool::new(true));
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(20)
            .concurrency(4)
            .circuit_breaker(BreakerConfig {
                window: 4,
                min_calls: 2,
                failure_ratio: 0.5,
                cooldown: ms(300),
                successes_to_close: 2,
            }),
        &recorder,
        {
            let down = down.clone();
            move |_, _| {
                let down = down.load(Ordering::SeqCst);
                async move {
                    if down {
                        Outcome::retry("downstream unavailable")
                    } else {
                        Outcome::Ack
                    }
                }
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    wait_until(
        "the broker to report prefetch 20",
        Duration::from_secs(30),
        || {
            let queue = queue.clone();
            async move { consumer_prefetches(&queue).await == [20] }
        },
    )
    .await;
    publish(&publisher, &queue, 40, "m", |_| b"x".to_vec()).await;
    let mut breaker = consumer.breaker();
    breaker_reaches(&mut breaker, BreakerState::Open, "the breaker to open").await;
    down.store(false, Ordering::SeqCst);
    breaker_reaches(&mut breaker, BreakerState::Closed, "the breaker to close").await;
    // The probing session subscribed with prefetch 1; basic.qos alone does
    // not change an existing consumer's prefetch.
    wait_until(
        "the broker to report prefetch 20 after the breaker closed",
        Duration::from_secs(10),
        || {
            let queue = queue.clone();
            async move { consumer_prefetches(&queue).await == [20] }
        },
    )
    .await;
    recorder
        .wait_handled(40, "all handled", Duration::from_secs(30))
        .await;
    let report = finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(report.stale_tags_dropped, 0, "{report:?}");
}

/// The first call of each `hang-*` message never returns.
async fn hang_first_calls(delivery: backstop::handler::Delivery, call: u32) -> Outcome {
    if call == 1
        && delivery
            .message_id()
            .is_some_and(|id| id.starts_with("hang-"))
    {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    Outcome::Ack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_handlers_of_an_ended_session_hold_no_slot_of_the_next() {
    init_tracing();
    let queue = unique("hung-slots");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(10)
            .concurrency(2)
            .shutdown_timeout(ms(500)),
        &recorder,
        hang_first_calls,
    );
    publish(&publisher, &queue, 2, "hang", |_| b"x".to_vec()).await;
    wait_until(
        "both slots taken by hung handlers",
        Duration::from_secs(30),
        || {
            let running = recorder.running.load(Ordering::SeqCst);
            async move { running == 2 }
        },
    )
    .await;
    proxy.cut();
    wait_stats(&consumer, "a second session", |s| s.sessions >= 2).await;
    publish(&publisher, &queue, 5, "new", |_| b"y".to_vec()).await;
    // The redelivered hang-* (second call) and the new ones, while the two
    // first calls still hang in the old session.
    recorder
        .wait_handled(
            7,
            "the new session to handle everything",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(recorder.running.load(Ordering::SeqCst), 2);
    assert!(!consumer.is_finished());
    let report = finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(report.handled, 7, "{report:?}");
}

/// Every session ended under hung handlers leaves them running stale. They
/// hold no slot of the next session, but are capped all the same: at most
/// one session's worth beyond the current limit (here 2 + 2). Before, each
/// cut added `concurrency` more hung handlers, without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_handlers_of_many_ended_sessions_stay_capped() {
    init_tracing();
    let queue = unique("hung-cap");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(10)
            .concurrency(2)
            .shutdown_timeout(ms(500)),
        &recorder,
        |_, _| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Outcome::Ack
        },
    );
    publish(&publisher, &queue, 10, "hang", |_| b"x".to_vec()).await;
    for session in 1..=4u64 {
        if session > 1 {
            proxy.cut();
        }
        // Each session gets all ten (the broker requeued them with the
        // channel) and starts what it may before the next cut.
        wait_stats(&consumer, "the session's deliveries", |s| {
            s.sessions >= session && s.delivered >= 10 * session
        })
        .await;
        wait_until(
            "every dispatched handler to be running",
            Duration::from_secs(30),
            || {
                let running = recorder.running.load(Ordering::SeqCst);
                let in_flight = consumer.stats().in_flight;
                async move { running == in_flight && running >= 2 }
            },
        )
        .await;
        let report = consumer.stats();
        assert!(
            report.in_flight <= 4,
            "session {session}: {} handlers held, over the cap of 4: {report:?}",
            report.in_flight
        );
    }
    assert_eq!(recorder.max_running.load(Ordering::SeqCst), 4);
    assert!(!consumer.is_finished());
    let report = finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(report.handled, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dedup_hung_handlers_of_an_ended_session_hold_no_permit_of_the_next() {
    init_tracing();
    let queue = unique("hung-permits");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(10));
    let recorder = Recorder::default();
    let dedup = DedupConfig::new(DedupKey::MessageId, Arc::new(MemorySeenStore::new(1000)))
        .in_progress_wait(ms(20), ms(500));
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(10)
            .concurrency(2)
            .shutdown_timeout(ms(500))
            .dedup(dedup),
        &recorder,
        hang_first_calls,
    );
    publish(&publisher, &queue, 2, "hang", |_| b"x".to_vec()).await;
    wait_until(
        "both permits taken by hung handlers",
        Duration::from_secs(30),
        || {
            let running = recorder.running.load(Ordering::SeqCst);
            async move { running == 2 }
        },
    )
    .await;
    // This one claims its key and waits for a permit that never comes.
    publish(&publisher, &queue, 1, "queued", |_| b"z".to_vec()).await;
    wait_stats(&consumer, "the third delivery", |s| s.delivered == 3).await;
    proxy.cut();
    wait_stats(&consumer, "a second session", |s| s.sessions >= 2).await;
    publish(&publisher, &queue, 5, "new", |_| b"y".to_vec()).await;
    // The hung ones keep their keys claimed (their handlers started), so
    // only the new ones and the one that never started can be handled; that
    // one released its key when its session ended.
    wait_until(
        "the new session to handle the new and the queued messages",
        Duration::from_secs(30),
        || {
            let handled = (0..5).all(|i| recorder.calls_of(&format!("new-{i}")) == 1)
                && recorder.calls_of("queued-0") == 1;
            let done = recorder.distinct_handled() == 6;
            async move { handled && done }
        },
    )
    .await;
    assert_eq!(recorder.running.load(Ordering::SeqCst), 2);
    consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cancel_settles_the_running_handlers_before_the_channel_closes() {
    init_tracing();
    let queue = unique("cancel-drain");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(3)
            .concurrency(3)
            .shutdown_timeout(Duration::from_secs(10)),
        &recorder,
        |_, _| async {
            tokio::time::sleep(ms(1500)).await;
            Outcome::Ack
        },
    );
    publish(&publisher, &queue, 3, "m", |_| b"x".to_vec()).await;
    wait_until("three handlers running", Duration::from_secs(30), || {
        let running = recorder.running.load(Ordering::SeqCst);
        async move { running == 3 }
    })
    .await;
    // The broker cancels the subscription; the channel stays open.
    delete_queue(&publisher, &queue).await;
    wait_stats(&consumer, "a new subscription", |s| s.sessions >= 2).await;
    let report = consumer.stats();
    // Settled on the wire before the old channel closed: acked, not
    // dropped as stale (which would mean three redeliveries, had the queue
    // survived).
    assert_eq!(report.handled, 3, "{report:?}");
    assert_eq!(report.stale_tags_dropped, 0, "{report:?}");
    assert_eq!(report.session_errors, 1, "{report:?}");
    finish(consumer, &supervisor, &publisher, &queue).await;
}

/// Deletes the virtual host even if the test fails half-way.
struct VhostGuard(String);

impl Drop for VhostGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

async fn ctl(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rabbitmqctl(&args)
    })
    .await
    .expect("rabbitmqctl task")
    .unwrap_or_else(|e| panic!("{e}"));
}

// One thread, so the thread-local subscriber sees the supervisor's logs too.
#[tokio::test(flavor = "current_thread")]
async fn not_allowed_is_retried_slowly_until_the_limit_lifts() {
    let (captured, _guard) = CapturedLogs::start("backstop=info");
    let vhost = unique("limited");
    ctl(&["add_vhost", &vhost]).await;
    let _vhost = VhostGuard(vhost.clone());
    ctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]).await;
    ctl(&[
        "set_vhost_limits",
        "-p",
        &vhost,
        r#"{"max-connections": 0}"#,
    ])
    .await;
    let base = amqp_url();
    let root = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(root, _)| root);
    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(format!("{root}/{vhost}"))
            .backoff(fast_backoff())
            .connect_timeout(Duration::from_secs(2)),
    )
    .expect("valid");
    let mut state = supervisor.state();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let reached = tokio::time::timeout(
            Duration::from_secs(30),
            state.wait_for(|s| {
                matches!(s, ConnectionState::Closed { .. })
                    || matches!(s, ConnectionState::Connecting { attempt } if *attempt as usize > seen.len())
            }),
        )
        .await
        .expect("the supervisor keeps trying")
        .expect("state channel")
        .clone();
        assert!(
            !matches!(reached, ConnectionState::Closed { .. }),
            "NOT_ALLOWED stopped the supervisor: {reached:?}"
        );
        seen.push(Instant::now());
    }
    let apart = seen[1] - seen[0];
    assert!(apart >= Duration::from_secs(4), "attempts {apart:?} apart");
    let logs = captured.text();
    assert!(logs.contains("NOT_ALLOWED"), "{logs}");
    assert!(
        logs.contains("connection limit"),
        "the broker's text: {logs}"
    );

    ctl(&["clear_vhost_limits", "-p", &vhost]).await;
    let live = tokio::time::timeout(Duration::from_secs(30), supervisor.connection())
        .await
        .expect("connected once the limit is lifted")
        .expect("connected");
    assert_eq!(live.generation(), 1);
    supervisor.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_dies_at_once_is_retried_with_a_growing_backoff() {
    init_tracing();
    let proxy = Arc::new(FaultProxy::start(broker_addr()).await.expect("proxy"));
    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(url_via(&amqp_url(), proxy.addr()))
            .backoff(Backoff {
                initial: ms(100),
                max: Duration::from_secs(2),
                max_attempts: None,
            })
            .connect_timeout(Duration::from_secs(2)),
    )
    .expect("valid");
    // Cuts every connection as soon as it is up.
    let cutter = {
        let proxy = proxy.clone();
        let mut state = supervisor.state();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                let up = state
                    .wait_for(
                        |s| matches!(s, ConnectionState::Connected { generation } if *generation > last),
                    )
                    .await
                    .map(|s| s.clone());
                let Ok(ConnectionState::Connected { generation }) = up else {
                    return;
                };
                last = generation;
                proxy.cut();
            }
        })
    };
    supervisor.connection().await.expect("a first connection");
    // The measurement is the window itself: how many connections it holds.
    let before = proxy.accepted();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let accepted = proxy.accepted() - before;
    cutter.abort();
    supervisor.close().await;
    // Reset after every connect, the backoff stays at its first step
    // (0-100 ms): some 60 or more connections in 6 s. Growing, its
    // ceilings add up past 6 s within ten.
    assert!(accepted <= 20, "{accepted} connections in 6 s");
    assert!(accepted >= 2, "{accepted} connections in 6 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_of_an_ended_session_is_not_a_probe() {
    init_tracing();
    let queue = unique("stale-probe");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(10));
    let recorder = Recorder::default();
    // 0: everything fails at once. 1: the first call succeeds after 2 s,
    // every later one fails after 4 s.
    let phase = Arc::new(AtomicU8::new(0));
    let phase_calls = Arc::new(AtomicU64::new(0));
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(10)
            .concurrency(2)
            .circuit_breaker(BreakerConfig {
                window: 4,
                min_calls: 2,
                failure_ratio: 0.5,
                cooldown: ms(300),
                successes_to_close: 1,
            }),
        &recorder,
        {
            let (phase, phase_calls) = (phase.clone(), phase_calls.clone());
            move |_, _| {
                let (phase, phase_calls) = (phase.clone(), phase_calls.clone());
                async move {
                    if phase.load(Ordering::SeqCst) == 0 {
                        return Outcome::retry("downstream unavailable");
                    }
                    if phase_calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        Outcome::Ack
                    } else {
                        tokio::time::sleep(Duration::from_secs(4)).await;
                        Outcome::retry("still unavailable")
                    }
                }
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    publish(&publisher, &queue, 10, "m", |_| b"x".to_vec()).await;
    let mut breaker = consumer.breaker();
    breaker_reaches(&mut breaker, BreakerState::Open, "the breaker to open").await;
    phase.store(1, Ordering::SeqCst);
    breaker_reaches(
        &mut breaker,
        BreakerState::HalfOpen,
        "the breaker to half-open",
    )
    .await;
    wait_until("the first probe to start", Duration::from_secs(30), || {
        let started = phase_calls.load(Ordering::SeqCst);
        async move { started == 1 }
    })
    .await;
    let sessions = consumer.stats().sessions;
    // The probe's session ends; it finishes, successfully, in the next one.
    proxy.cut();
    wait_stats(&consumer, "the probe's success to arrive stale", |s| {
        s.sessions > sessions && s.stale_tags_dropped >= 1
    })
    .await;
    assert_ne!(
        *breaker.borrow(),
        BreakerState::Closed,
        "a completion of an ended session closed the breaker"
    );
    // The real probe of the new session fails: the breaker opens again.
    breaker.borrow_and_update();
    let next = tokio::time::timeout(Duration::from_secs(30), breaker.changed())
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(next, "the breaker must move on");
    assert_eq!(*breaker.borrow(), BreakerState::Open);
    consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

/// A dedup store whose first claim of `boom` panics in the call itself.
#[derive(Debug)]
struct PanickingSeenStore {
    inner: MemorySeenStore,
    armed: AtomicBool,
}

impl SeenStore for PanickingSeenStore {
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        lease_until: u64,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        if key.contains("boom") && self.armed.swap(false, Ordering::SeqCst) {
            panic!("a bug in the seen store");
        }
        self.inner.claim(scope, key, token, lease_until)
    }

    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        expires_at: u64,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        self.inner.complete(scope, key, token, expires_at)
    }

    fn release<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        self.inner.release(scope, key, token)
    }

    fn purge_expired(&self, now: u64) -> BoxFuture<'_, Result<u64, DedupError>> {
        self.inner.purge_expired(now)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_seen_store_fails_the_delivery_not_the_consumer() {
    init_tracing();
    let queue = unique("seen-panic");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let store = Arc::new(PanickingSeenStore {
        inner: MemorySeenStore::new(1000),
        armed: AtomicBool::new(true),
    });
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .dedup(DedupConfig::new(DedupKey::MessageId, store)),
        &recorder,
        ack,
    );
    publish(&publisher, &queue, 3, "boom", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(3, "all three handled", Duration::from_secs(30))
        .await;
    assert!(!consumer.is_finished());
    let report = finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(report.dedup_failures, 1, "{report:?}");
    // The failed claim is tried again in process, the delivery held
    // unacked, as for a store that is down (GUARANTEES row 15).
    assert_eq!(report.requeued, 0, "{report:?}");
}

/// A compensation store whose first write panics while it is polled.
#[derive(Debug)]
struct PanickingStore {
    inner: Arc<SqlStore>,
    armed: AtomicBool,
}

impl CompensationStore for PanickingStore {
    fn store<'a>(
        &'a self,
        message: &'a NewFailedMessage,
    ) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            if self.armed.swap(false, Ordering::SeqCst) {
                panic!("a bug in the compensation store");
            }
            self.inner.store(message).await
        })
    }

    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        now: i64,
        lease_until: i64,
        limit: i64,
        queue: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<FailedRow>, StoreError>> {
        self.inner.claim_due(owner, now, lease_until, limit, queue)
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
        outcomes: &'a [(i64, RedriveOutcome)],
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
        action: ManualAction,
        actor: &'a str,
        note: Option<&'a str>,
    ) -> BoxFuture<'a, Result<FailedRow, StoreError>> {
        self.inner.act(id, action, actor, note)
    }

    fn audit(&self, id: i64) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_compensation_store_fails_the_delivery_not_the_consumer() {
    init_tracing();
    let queue = unique("store-panic");
    let path = std::env::temp_dir().join(format!("{}.db", unique("backstop-panic-store")));
    let inner = Arc::new(
        SqlStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("sqlite store"),
    );
    let store = Arc::new(PanickingStore {
        inner: inner.clone(),
        armed: AtomicBool::new(true),
    });
    let policy = RetryPolicy::new()
        .delays([ms(200)])
        .exhausted(Exhausted::Store);
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy.clone())
            .compensation_store(store, Duration::from_secs(60)),
        &recorder,
        |_, _| async { Outcome::reject("malformed") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    publish(&publisher, &queue, 1, "m", |_| b"x".to_vec()).await;
    wait_stats(&consumer, "the row to be stored after the panic", |s| {
        s.stored == 1
    })
    .await;
    assert!(!consumer.is_finished());
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(report.store_failures, 1, "{report:?}");
    // The failed write was tried again in process, not requeued.
    assert_eq!(report.requeued, 0, "{report:?}");
    let rows = inner
        .list(&ListFilter {
            queue: Some(queue.clone()),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(rows.len(), 1);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
    for name in policy.tier_queues(&queue) {
        delete_queue(&publisher, &name).await;
    }
    delete_queue(&publisher, &RetryPolicy::dead_letter_queue(&queue)).await;
}

/// Issue 14, item 4. The broker forgets the consumer without a
/// `basic.cancel` (the queue process drops it: `forget_consumers`), so the
/// consumer believes it is subscribed while nothing reaches it. The
/// periodic passive declare finds the broker counting no consumer, the
/// report says so, and the session ends as after a broker cancel: the
/// delivery whose handler runs is settled on its own channel first (acked
/// once, not stale, its handler called once), then a new session
/// subscribes, is counted by the broker, and consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_broker_forgot_subscribes_again_and_settles_what_it_held() {
    init_tracing();
    let queue = unique("forgotten");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let release = Arc::new(AtomicBool::new(false));
    let released = release.clone();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .shutdown_timeout(Duration::from_secs(30))
            .broker_check_every(Duration::from_secs(1)),
        &recorder,
        move |delivery, _| {
            let hold = delivery.message_id() == Some("held-0");
            let released = released.clone();
            async move {
                while hold && !released.load(Ordering::SeqCst) {
                    tokio::time::sleep(ms(20)).await;
                }
                Outcome::Ack
            }
        },
    );
    wait_stats(&consumer, "the subscription", |s| s.subscribed).await;
    publish(&publisher, &queue, 1, "held", |_| b"x".to_vec()).await;
    wait_until("held-0 in its handler", Duration::from_secs(30), || {
        let running = recorder.running.load(Ordering::SeqCst);
        async move { running == 1 }
    })
    .await;

    let name = queue.clone();
    let forgotten = tokio::task::spawn_blocking(move || backstop_testkit::forget_consumers(&name))
        .await
        .expect("rabbitmqctl task")
        .unwrap_or_else(|e| panic!("{e}"));
    let fault = Instant::now();
    assert_eq!(forgotten, 1);
    // A message waits for the consumer the broker no longer counts: the
    // check believes a reading of no consumer only with a message ready
    // (a quorum queue whose leader is slow answers 0 consumers, 0 messages).
    publish(&publisher, &queue, 1, "waiting", |_| b"w".to_vec()).await;
    wait_stats(&consumer, "the broker's loss to be seen", |s| {
        !s.broker_counted && s.broker_lost == 1
    })
    .await;
    println!("seen after {:?}", fault.elapsed());
    // The session drains: held-0 still runs, on the old channel.
    assert_eq!(consumer.stats().sessions, 1);
    release.store(true, Ordering::SeqCst);
    wait_stats(&consumer, "counted again in a new session", |s| {
        s.broker_counted && s.subscribed && s.sessions == 2
    })
    .await;
    println!("counted again after {:?}", fault.elapsed());
    wait_until(
        "the broker to count one consumer",
        Duration::from_secs(30),
        || queue_is(&queue, |c| c.consumers == 1),
    )
    .await;

    publish(&publisher, &queue, 3, "after", |_| b"y".to_vec()).await;
    recorder
        .wait_handled(
            5,
            "held-0, waiting-0 and the later ones",
            Duration::from_secs(30),
        )
        .await;
    wait_until("the queue drained", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    let report = finish(consumer, &supervisor, &publisher, &queue).await;
    delete_queue(&publisher, &format!("{queue}.dlq")).await;
    assert_eq!(recorder.calls_of("held-0"), 1);
    assert_eq!(recorder.calls_of("waiting-0"), 1);
    assert_eq!(report.handled, 5, "{report:?}");
    assert_eq!(report.stale_tags_dropped, 0, "{report:?}");
    assert_eq!(report.sessions, 2, "{report:?}");
    assert_eq!(report.broker_lost, 1, "{report:?}");
}
