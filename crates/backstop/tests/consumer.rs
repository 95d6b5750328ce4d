//! The consumer runtime against the real broker, with faults from the test
//! kit's proxy. Every test uses its own queue, so they run in parallel.

use crate::common;
use backstop::connection::{Backoff, ConnectionConfig, ConnectionState, ConnectionSupervisor};
use backstop::consumer::ConsumerConfig;
use backstop::handler::Outcome;
use backstop::topology::{Queue, Topology};
use backstop_testkit::{
    FaultProxy, amqp_url, broker_addr, connect, delete_queue, publish, queue_counts, unique,
    url_via, wait_until,
};
use common::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

async fn queue_drained(queue: &str) -> bool {
    queue_is(queue, |c| c.ready == 0 && c.unacked == 0).await
}

async fn counts(queue: &str) -> backstop_testkit::QueueCounts {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || queue_counts(&queue).expect("queue exists"))
        .await
        .expect("rabbitmqctl task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_close_every_500ms_loses_nothing() {
    init_tracing();
    let queue = unique("forced-close");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 10_000, "m", |i| {
        format!("{i}").into_bytes()
    })
    .await;

    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(200)
            .concurrency(8),
        &recorder,
        |_, _| async {
            // A little work per message so the run spans many cuts.
            tokio::time::sleep(Duration::from_micros(500)).await;
            Outcome::Ack
        },
    );

    let cutter = {
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let mut cuts = 0u32;
            while recorder.distinct_handled() < 10_000 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                proxy.cut();
                cuts += 1;
            }
            (proxy, cuts)
        })
    };
    recorder
        .wait_handled(
            10_000,
            "all 10,000 messages handled",
            Duration::from_secs(240),
        )
        .await;
    let (proxy, cuts) = cutter.await.expect("cutter");
    assert!(!consumer.is_finished(), "the runtime must never stop");
    wait_until("the queue to be empty", Duration::from_secs(60), || {
        queue_drained(&queue)
    })
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert!(cuts >= 3, "the run must span several cuts, saw {cuts}");
    assert!(
        supervisor.reconnects() >= 2,
        "reconnects: {}",
        supervisor.reconnects()
    );
    assert!(proxy.accepted() >= 3);
    assert!(report.handled >= 10_000, "{report:?}");
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_is_detected_and_consumption_resumes_within_three_heartbeats() {
    init_tracing();
    let queue = unique("blackhole");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let heartbeat = Duration::from_secs(2);
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), heartbeat);
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology).prefetch(50),
        &recorder,
        ack,
    );
    publish(&publisher, &queue, 100, "before", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(100, "the first batch", Duration::from_secs(30))
        .await;

    proxy.blackhole();
    let mut state = supervisor.state();
    // Only a bool is kept: holding the watch guard would block the supervisor.
    let detected = tokio::time::timeout(Duration::from_secs(15), state.wait_for(|s| !s.is_up()))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(detected, "the loss must be detected by heartbeats");
    // The cable stays out a little longer; work arrives meanwhile.
    publish(&publisher, &queue, 100, "after", |_| b"y".to_vec()).await;
    // The cable stays out until a reconnect attempt has failed through it.
    let retried = tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(
            |s| matches!(s, ConnectionState::Reconnecting { attempt, .. } if *attempt >= 1),
        ),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(retried, "the supervisor retries while the cable is out");
    proxy.restore();
    let took = recorder
        .wait_handled(200, "the second batch", Duration::from_secs(30))
        .await;
    assert!(
        took <= heartbeat * 3,
        "consumption resumed {took:?} after forwarding was restored"
    );
    finish(consumer, &supervisor, &publisher, &queue).await;
}

/// A forced close is a lost connection, not a broken session: the consumer
/// subscribes again as soon as the supervisor has a new connection, and
/// closes in a row do not pile up pauses of its own (the supervisor's
/// backoff, kept tiny here, is what slows a flapping connection down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_resumes_promptly_after_each_of_ten_forced_closes() {
    init_tracing();
    let queue = unique("resume");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(url_via(&amqp_url(), proxy.addr()))
            .heartbeat(Duration::from_secs(10))
            .connection_name("backstop-test")
            .backoff(Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(20),
                max_attempts: None,
            })
            .connect_timeout(Duration::from_secs(2)),
    )
    .expect("valid supervisor config");
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology).prefetch(50),
        &recorder,
        ack,
    );
    publish(&publisher, &queue, 1, "first", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(1, "the first message", Duration::from_secs(30))
        .await;
    let mut total = Duration::ZERO;
    let mut each = Vec::new();
    for i in 0..10usize {
        let before = consumer.stats().sessions;
        let cut = std::time::Instant::now();
        proxy.cut();
        wait_until(
            "the consumer to subscribe again",
            Duration::from_secs(30),
            || {
                let stats = consumer.stats();
                async move { stats.sessions > before && stats.subscribed }
            },
        )
        .await;
        publish(&publisher, &queue, 1, &format!("after-{i}"), |_| {
            b"y".to_vec()
        })
        .await;
        recorder
            .wait_handled(
                i + 2,
                "the message after the close",
                Duration::from_secs(30),
            )
            .await;
        each.push(cut.elapsed());
        total += cut.elapsed();
    }
    // Before, each close counted as a broken session: the consumer paused
    // up to 100 ms, 200 ms, 400 ms ... 5 s after the n-th, some 13 s in all
    // on average for ten.
    assert!(
        total < Duration::from_secs(5),
        "ten closes took {total:?} to recover from: {each:?}"
    );
    assert!(!consumer.is_finished());
    finish(consumer, &supervisor, &publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_is_retried_until_it_appears() {
    init_tracing();
    let queue = unique("down-at-start");
    let topology = classic(&queue);
    // A loopback port with nothing behind it yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let supervisor = supervisor(&url_via(&amqp_url(), port), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        ack,
    );
    let mut state = supervisor.state();
    tokio::time::timeout(
        Duration::from_secs(20),
        state.wait_for(|s| matches!(s, ConnectionState::Connecting { attempt } if *attempt >= 3)),
    )
    .await
    .expect("the supervisor keeps retrying")
    .expect("state channel");
    assert!(!consumer.is_finished());

    let proxy = FaultProxy::start_on(port, broker_addr())
        .await
        .expect("the broker appears");
    let publisher = connect().await;
    wait_stats(&consumer, "the consumer to subscribe", |s| s.sessions >= 1).await;
    publish(&publisher, &queue, 20, "m", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(
            20,
            "messages after the broker appeared",
            Duration::from_secs(30),
        )
        .await;
    consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    drop(proxy);
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing_and_acks_each_tag_once() {
    init_tracing();
    let queue = unique("shutdown");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 50, "m", |_| b"x".to_vec()).await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology.clone())
            .prefetch(20)
            .concurrency(5)
            .shutdown_timeout(Duration::from_secs(10)),
        &recorder,
        |_, _| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Outcome::Ack
        },
    );
    wait_until("five handlers in flight", Duration::from_secs(30), || {
        let running = recorder.running.load(Ordering::SeqCst);
        async move { running == 5 }
    })
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    // Every handler that was running finished and was acked.
    assert_eq!(recorder.running.load(Ordering::SeqCst), 0);
    assert_eq!(report.handled as usize, recorder.distinct_handled());
    assert!(report.handled >= 5, "{report:?}");
    // A tag acked twice would have closed the channel with PRECONDITION_FAILED.
    assert_eq!(report.session_errors, 0, "{report:?}");
    assert_eq!(report.sessions, 1, "{report:?}");
    let remaining = 50 - report.handled;
    wait_until(
        "the unfinished messages to be back",
        Duration::from_secs(30),
        || queue_is(&queue, move |c| c.unacked == 0 && c.ready == remaining),
    )
    .await;

    // A second consumer gets exactly the rest: nothing was lost.
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        ack,
    );
    recorder
        .wait_handled(50, "all 50 handled", Duration::from_secs(30))
        .await;
    consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(recorder.duplicates(), 0);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_handlers_never_exceed_the_limit() {
    init_tracing();
    let queue = unique("concurrency");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 200, "m", |_| b"x".to_vec()).await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(50)
            .concurrency(4),
        &recorder,
        |_, _| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Outcome::Ack
        },
    );
    recorder
        .wait_handled(200, "all handled", Duration::from_secs(60))
        .await;
    consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(recorder.max_running.load(Ordering::SeqCst), 4);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_never_exceeds_the_prefetch_even_after_a_reconnect() {
    init_tracing();
    let queue = unique("prefetch");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 2_000, "m", |_| b"x".to_vec()).await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(10));
    let recorder = Recorder::default();
    let prefetch = 10u16;
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .prefetch(prefetch)
            .concurrency(2),
        &recorder,
        |_, _| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Outcome::Ack
        },
    );
    let mut seen_full = false;
    for round in 0..2 {
        for _ in 0..4 {
            let c = counts(&queue).await;
            assert!(
                c.unacked <= u64::from(prefetch),
                "round {round}: broker holds {} unacked with prefetch {prefetch}",
                c.unacked
            );
            seen_full |= c.unacked == u64::from(prefetch);
        }
        if round == 0 {
            proxy.cut();
            wait_stats(&consumer, "a second session", |s| s.sessions >= 2).await;
        }
    }
    assert!(
        seen_full,
        "the prefetch window should fill with slow handlers"
    );
    finish(consumer, &supervisor, &publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_transient_failure() {
    init_tracing();
    let queue = unique("panic");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 20, "m", |_| b"x".to_vec()).await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        |delivery, call| async move {
            if delivery.message_id() == Some("m-7") && call == 1 {
                panic!("boom on the first try");
            }
            Outcome::Ack
        },
    );
    recorder
        .wait_handled(20, "all handled", Duration::from_secs(30))
        .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(report.panics, 1);
    assert_eq!(recorder.calls_of("m-7"), 2);
    assert_eq!(report.session_errors, 0);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_from_an_old_channel_is_dropped_and_the_message_redelivered() {
    init_tracing();
    let queue = unique("stale");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        |_, call| async move {
            if call == 1 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            Outcome::Ack
        },
    );
    publish(&publisher, &queue, 1, "slow", |_| b"x".to_vec()).await;
    wait_until("the slow handler to start", Duration::from_secs(30), || {
        let calls = recorder.calls_of("slow-0");
        async move { calls == 1 }
    })
    .await;
    proxy.cut();
    recorder
        .wait_handled(1, "the redelivery to be handled", Duration::from_secs(30))
        .await;
    wait_stats(&consumer, "the stale completion to be dropped", |s| {
        s.stale_tags_dropped == 1
    })
    .await;
    wait_until("the queue to be empty", Duration::from_secs(30), || {
        queue_drained(&queue)
    })
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(recorder.calls_of("slow-0"), 2);
    assert!(report.sessions >= 2);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_is_declared_again_and_consumed() {
    init_tracing();
    let queue = unique("cancelled");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        ack,
    );
    wait_stats(&consumer, "the first subscription", |s| s.sessions == 1).await;
    delete_queue(&publisher, &queue).await;
    wait_stats(&consumer, "a new subscription", |s| s.sessions >= 2).await;
    publish(&publisher, &queue, 10, "m", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(
            10,
            "messages on the re-declared queue",
            Duration::from_secs(30),
        )
        .await;
    finish(consumer, &supervisor, &publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_and_requeue_are_settled_per_tag() {
    init_tracing();
    let queue = unique("outcomes");
    let dead = format!("{queue}.dead");
    let topology = Topology::new().queue(Queue::classic(&dead)).queue(
        Queue::classic(&queue)
            .dead_letter_exchange("")
            .dead_letter_routing_key(&dead),
    );
    declare(&topology).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 30, "m", |i| format!("{i}").into_bytes()).await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        |delivery, call| async move {
            let n: u32 = std::str::from_utf8(delivery.body())
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            match (n % 3, call) {
                (0, _) => Outcome::reject("divisible by three"),
                (1, 1) => Outcome::Requeue,
                _ => Outcome::Ack,
            }
        },
    );
    wait_until(
        "20 acked and 10 dead-lettered",
        Duration::from_secs(30),
        || {
            let n = recorder.distinct_handled();
            let dead = dead.clone();
            async move { n == 20 && queue_is(&dead, |c| c.ready == 10).await }
        },
    )
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(report.rejected, 10);
    assert_eq!(report.requeued, 10);
    assert_eq!(report.session_errors, 0, "{report:?}");
    assert_eq!(recorder.calls_of("m-1"), 2);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
    delete_queue(&publisher, &dead).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_times_out_is_a_transient_failure() {
    init_tracing();
    let queue = unique("timeout");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 3, "m", |_| b"x".to_vec()).await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .handler_timeout(Duration::from_millis(200)),
        &recorder,
        |delivery, call| async move {
            if delivery.message_id() == Some("m-1") && call == 1 {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Outcome::Ack
        },
    );
    recorder
        .wait_handled(3, "all handled", Duration::from_secs(30))
        .await;
    let report = finish(consumer, &supervisor, &publisher, &queue).await;
    assert_eq!(report.timeouts, 1);
    assert_eq!(report.requeued, 1);
    assert_eq!(recorder.calls_of("m-1"), 2);
}
