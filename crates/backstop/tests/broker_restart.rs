//! Tests that change the whole broker: a restart under a running consumer
//! (`rabbitmqctl stop_app`, 8 s down, `start_app`: the case lapin's own
//! auto-recover never comes back from), a memory alarm and a short
//! `consumer_timeout`. They have their own test binary, since cargo runs test
//! binaries one after another, and take a lock so they do not overlap each
//! other either. Run them under `flock /tmp/broker.lock`.

mod common;

use backstop::connection::ConnectionState;
use backstop::consumer::ConsumerConfig;
use backstop::handler::Outcome;
use backstop::retry::RetryPolicy;
use backstop_testkit::{amqp_url, connect, delete_queue, publish, rabbitmqctl, unique, wait_until};
use common::*;
use lapin::options::BasicGetOptions;
use std::collections::HashSet;
use std::time::Duration;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the app again even if the test fails half-way.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
        let _ = rabbitmqctl(&["await_startup", "--timeout", "60"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_resumes_after_an_eight_second_broker_restart() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let queue = unique("restart");
    let topology = classic(&queue);
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        ack,
    );
    wait_stats(&consumer, "the first subscription", |s| s.sessions == 1).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 100, "before", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(100, "the first batch", Duration::from_secs(30))
        .await;
    drop(publisher);

    let guard = RestartGuard;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .expect("task")
        .expect("stop_app");
    let mut state = supervisor.state();
    tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| !s.is_up()))
        .await
        .expect("the supervisor notices the broker going away")
        .expect("state channel");
    // The outage itself: the broker stays down for 8 seconds.
    tokio::time::sleep(Duration::from_secs(8)).await;
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup", "--timeout", "60"])
    })
    .await
    .expect("task")
    .expect("start_app");
    drop(guard);

    let publisher = connect().await;
    publish(&publisher, &queue, 100, "after", |_| b"y".to_vec()).await;
    recorder
        .wait_handled(
            200,
            "consumption to resume without intervention",
            Duration::from_secs(90),
        )
        .await;
    assert!(supervisor.reconnects() >= 1);
    assert!(!consumer.is_finished());
    finish(consumer, &supervisor, &publisher, &queue).await;
}

/// Resets the memory alarm even if the test fails half-way.
struct WatermarkGuard;

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_is_reported_as_blocked_then_unblocked() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let live = supervisor.connection().await.expect("connected");
    let generation = live.generation();
    let channel = live.create_channel().await.expect("channel");
    let guard = WatermarkGuard;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["set_vm_memory_high_watermark", "0"]))
        .await
        .expect("task")
        .expect("set watermark");
    // The broker blocks a connection when it next publishes.
    let queue = unique("blocked");
    let _ = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"x",
            lapin::BasicProperties::default(),
        )
        .await;
    let mut state = supervisor.state();
    let blocked = tokio::time::timeout(
        Duration::from_secs(30),
        state.wait_for(
            |s| matches!(s, ConnectionState::Blocked { generation: g, .. } if *g == generation),
        ),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(blocked, "connection.blocked must be reported");
    drop(guard);
    let unblocked = tokio::time::timeout(
        Duration::from_secs(30),
        state.wait_for(|s| *s == ConnectionState::Connected { generation }),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(unblocked, "connection.unblocked must be reported");
    supervisor.close().await;
}

/// Puts the broker's `consumer_timeout` and channel tick back as they were,
/// even if the test fails half-way.
struct BrokerEnvGuard(Vec<(&'static str, String)>);

impl BrokerEnvGuard {
    /// Sets each `rabbit` application variable, remembering its value.
    fn set(vars: &[(&'static str, u64)]) -> Self {
        let mut saved = Vec::new();
        for (name, value) in vars {
            let old = rabbitmqctl(&[
                "eval",
                &format!("{{ok, V}} = application:get_env(rabbit, {name}), V."),
            ])
            .unwrap_or_else(|e| panic!("{e}"));
            let old = old.trim().to_owned();
            assert!(
                !old.is_empty() && old.bytes().all(|b| b.is_ascii_digit()),
                "cannot read rabbit.{name}: {old:?}"
            );
            saved.push((*name, old));
            rabbitmqctl(&[
                "eval",
                &format!("application:set_env(rabbit, {name}, {value})."),
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        }
        BrokerEnvGuard(saved)
    }
}

impl Drop for BrokerEnvGuard {
    fn drop(&mut self) {
        for (name, value) in &self.0 {
            let _ = rabbitmqctl(&[
                "eval",
                &format!("application:set_env(rabbit, {name}, {value})."),
            ]);
        }
    }
}

// One thread, so the thread-local subscriber sees the consumer's logs.
#[tokio::test(flavor = "current_thread")]
async fn the_broker_s_consumer_timeout_is_named_and_the_consumer_recovers() {
    let _serial = SERIAL.lock().await;
    let (captured, _logs) = CapturedLogs::start("backstop=info");
    // Channels read both when they open: a 2 s consumer_timeout, checked
    // every 500 ms instead of every minute.
    let guard = tokio::task::spawn_blocking(|| {
        BrokerEnvGuard::set(&[("consumer_timeout", 2000), ("channel_tick_interval", 500)])
    })
    .await
    .expect("task");
    let queue = unique("consumer-timeout");
    let topology = classic(&queue);
    declare(&topology).await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .consumer_timeout(Duration::from_secs(2))
            // Longer than the broker's timeout, so that the broker acts.
            .handler_timeout(Duration::from_secs(3600))
            .shutdown_timeout(Duration::from_millis(500)),
        &recorder,
        |_, call| async move {
            if call == 1 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            backstop::handler::Outcome::Ack
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 1, "slow", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(
            1,
            "the redelivery after the broker's timeout",
            Duration::from_secs(60),
        )
        .await;
    drop(guard);
    let report = finish(consumer, &supervisor, &publisher, &queue).await;
    assert!(report.session_errors >= 1, "{report:?}");
    let logs = captured.text();
    assert!(
        logs.contains("80% of the broker's consumer_timeout") && logs.contains(&queue),
        "the 80% warning, naming the queue: {logs}"
    );
    assert!(
        logs.contains(
            "the broker's consumer_timeout (2000 ms) expired for a delivery: handler too slow"
        ),
        "{logs}"
    );
}

/// True while the broker has a memory alarm set. Panics when `rabbitmqctl`
/// fails or answers something that is not a list of alarms.
async fn memory_alarm() -> bool {
    let out =
        tokio::task::spawn_blocking(|| rabbitmqctl(&["-q", "eval", "rabbit_alarm:get_alarms()."]))
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("{e}"));
    let out = out.trim();
    assert!(
        out.starts_with('[') && out.ends_with(']'),
        "not a list of alarms: {out:?}"
    );
    out.contains("resource_limit,memory")
}

/// The message ids in `queue`, taken out with `basic.get`.
async fn take_ids(connection: &lapin::Connection, queue: &str) -> Vec<String> {
    let channel = connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let id = message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        ids.push(id.unwrap_or_else(|| panic!("a message without an id in {queue}")));
    }
    let _ = channel.close(200, "counted".into()).await;
    ids
}

/// Issue 13, item 5. The broker stops reading from a connection that
/// publishes during a resource alarm, and lapin then writes nothing on it:
/// with retry copies published on the consumer's own connection, one failing
/// message froze every ack. Copies go on a connection of their own, so the
/// consumer keeps acking, shuts down within its bounds, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_never_stalls_acks_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let queue = unique("alarm");
    let delay = Duration::from_secs(600);
    let policy = RetryPolicy::new().delays([delay]);
    let tier = RetryPolicy::tier_queue(&queue, delay);
    let topology = classic(&queue);
    declare(&topology).await;
    // Published before the alarm: during it, a publisher is blocked.
    let publisher = connect().await;
    let (bad, good) = (5u64, 200u64);
    publish(&publisher, &queue, bad, "bad", |_| b"x".to_vec()).await;
    publish(&publisher, &queue, good, "ok", |_| b"x".to_vec()).await;

    let (alarm_on, gate) = tokio::sync::watch::channel(false);
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let concurrency = 8;
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .retry(policy.clone())
            .prefetch(50)
            .concurrency(concurrency)
            .publish_timeout(Duration::from_secs(3))
            .shutdown_timeout(Duration::from_secs(2)),
        &recorder,
        move |delivery, _| {
            let mut gate = gate.clone();
            async move {
                // Nothing is handled before the alarm is on.
                let _ = gate.wait_for(|on| *on).await;
                if delivery
                    .message_id()
                    .is_some_and(|id| id.starts_with("bad-"))
                {
                    Outcome::retry("the downstream is down")
                } else {
                    Outcome::Ack
                }
            }
        },
    );
    wait_stats(&consumer, "handlers waiting for the alarm", |s| {
        s.in_flight == concurrency as u64
    })
    .await;
    // The consumer's own connection must never be blocked: it never publishes.
    let consumer_blocked = {
        let mut state = supervisor.state();
        tokio::spawn(async move {
            let _ = state
                .wait_for(|s| matches!(s, ConnectionState::Blocked { .. }))
                .await;
        })
    };
    let mut publishing = supervisor.publishing().state();

    let guard = WatermarkGuard;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]))
        .await
        .expect("task")
        .expect("set watermark");
    wait_until("the memory alarm", Duration::from_secs(30), memory_alarm).await;
    alarm_on.send_replace(true);

    // Acks go on: every good message leaves the queue; only the failing
    // ones, whose copies cannot be confirmed now, stay.
    wait_until(
        "every good message acked during the alarm",
        Duration::from_secs(60),
        || {
            let handled = recorder.distinct_handled() as u64;
            let acked = consumer.stats().handled;
            let queue = queue.clone();
            async move {
                handled == good
                    && acked >= good
                    && queue_is(&queue, move |c| c.ready + c.unacked <= bad).await
            }
        },
    )
    .await;
    assert!(
        memory_alarm().await,
        "the acks must have flowed during the alarm"
    );
    let copies_blocked = tokio::time::timeout(
        Duration::from_secs(30),
        publishing.wait_for(|s| matches!(s, ConnectionState::Blocked { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(
        copies_blocked,
        "the copies were published on the publishing connection"
    );
    assert!(
        !consumer_blocked.is_finished(),
        "the consumer's connection was blocked"
    );
    consumer_blocked.abort();
    // Copies that could not be confirmed failed (timed out or refused while
    // blocked) and their originals stayed.
    wait_stats(&consumer, "failed copies during the alarm", |s| {
        s.publish_failures >= 1
    })
    .await;

    // The shutdown timeout (2 s) plus a margin: nothing waits for the
    // blocked publishing connection.
    let report = tokio::time::timeout(Duration::from_secs(8), consumer.shutdown())
        .await
        .expect("shutdown finishes within its bound during the alarm")
        .expect("clean shutdown");
    tokio::time::timeout(Duration::from_secs(5), supervisor.close())
        .await
        .expect("closing the connections does not wait for the blocked one");

    drop(guard);
    wait_until("the alarm cleared", Duration::from_secs(30), || async {
        !memory_alarm().await
    })
    .await;
    // Nothing lost: every failing message is back in its queue or in the tier.
    let mut found: HashSet<String> = take_ids(&publisher, &queue).await.into_iter().collect();
    found.extend(take_ids(&publisher, &tier).await);
    let missing: Vec<String> = (0..bad)
        .map(|i| format!("bad-{i}"))
        .filter(|id| !found.contains(id))
        .collect();
    assert!(missing.is_empty(), "lost {missing:?}; {report:?}");
    assert!(
        found.iter().all(|id| id.starts_with("bad-")),
        "a good message was left behind: {found:?}"
    );
    for name in policy.tier_queues(&queue) {
        delete_queue(&publisher, &name).await;
    }
    delete_queue(&publisher, &RetryPolicy::dead_letter_queue(&queue)).await;
    delete_queue(&publisher, &queue).await;
}

/// Takes `count` messages of `queue` and requeues them: one return each,
/// which a quorum queue counts. The `x-delivery-count` each showed (0 when
/// absent); panics on one it cannot read.
async fn return_all(connection: &lapin::Connection, queue: &str, count: u64) -> Vec<u64> {
    let channel = connection.create_channel().await.expect("channel");
    let mut seen = Vec::new();
    let mut held = Vec::new();
    // All taken before any goes back: a returned message comes first again.
    for _ in 0..count {
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
            .unwrap_or_else(|| panic!("{queue} is short of {count} messages"));
        seen.push(
            message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delivery-count"))
                .map(|v| {
                    backstop::retry::header_u64(v)
                        .unwrap_or_else(|| panic!("x-delivery-count is not an integer: {v:?}"))
                })
                .unwrap_or(0),
        );
        held.push(message);
    }
    for message in held {
        message
            .delivery
            .acker
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
    }
    let _ = channel.close(200, "returned".into()).await;
    seen
}

/// Review of issue 13: a quorum queue with a delivery limit and no
/// dead-letter exchange, a memory alarm that blocks the publishing
/// connection. Every failed copy used to requeue its original after 1 s, and
/// each requeue is a return: within seconds the messages crossed the limit
/// and the broker dropped them. Now a delivery whose copy fails for a
/// transient reason is held and the copy tried again with backoff; one a
/// return from its limit is never requeued by choice. After the alarm every
/// message is in `<queue>.dlq`, and nothing was requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_near_the_delivery_limit_drops_nothing() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let queue = unique("alarm-limit");
    let dlq = RetryPolicy::dead_letter_queue(&queue);
    let topology = backstop::topology::Topology::new().queue(
        backstop::topology::Queue::quorum(&queue)
            .delivery_limit(3)
            .without_dead_letter_queue(),
    );
    declare(&topology).await;
    // Published (and returned twice: one return from the limit) before the
    // alarm, on a connection of their own: during it, a publisher is blocked.
    let publisher = connect().await;
    let (limit, bad) = (3u64, 3u64);
    publish(&publisher, &queue, limit, "limit", |_| b"x".to_vec()).await;
    let first = return_all(&publisher, &queue, limit).await;
    let second = return_all(&publisher, &queue, limit).await;
    assert!(
        first.iter().zip(&second).all(|(a, b)| *b == a + 1),
        "each get saw one more return: {first:?} then {second:?}"
    );
    publish(&publisher, &queue, bad, "bad", |_| b"x".to_vec()).await;
    let total = limit + bad;

    let guard = WatermarkGuard;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]))
        .await
        .expect("task")
        .expect("set watermark");
    wait_until("the memory alarm", Duration::from_secs(30), memory_alarm).await;

    // The broker blocks a connection when it next publishes: block the
    // publishing connection first, or the first copies slip through.
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let publishing = supervisor.publishing();
    let live = publishing
        .connection()
        .await
        .expect("publishing connection");
    let channel = live.create_channel().await.expect("channel");
    let _ = channel
        .basic_publish(
            "".into(),
            unique("nowhere").as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"x",
            lapin::BasicProperties::default(),
        )
        .await;
    let blocked = tokio::time::timeout(
        Duration::from_secs(30),
        publishing
            .state()
            .wait_for(|s| matches!(s, ConnectionState::Blocked { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(blocked, "the publishing connection is blocked");
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .concurrency(8)
            .publish_timeout(Duration::from_secs(3)),
        &recorder,
        |delivery, _| async move {
            if delivery
                .message_id()
                .is_some_and(|id| id.starts_with("limit-"))
            {
                // Near the limit a requeue takes the exhausted path.
                Outcome::Requeue
            } else {
                Outcome::reject("malformed")
            }
        },
    );
    // Long enough for the old code to spin every message past its limit
    // (each failed copy was a return): at most four failed copies a message.
    // (The broker's counts of a quorum queue lag by seconds: the consumer's
    // own counter is the condition.)
    wait_until(
        "failed copies during the alarm",
        Duration::from_secs(60),
        || {
            let failures = consumer.stats().publish_failures;
            async move { failures >= 4 * total }
        },
    )
    .await;
    assert!(memory_alarm().await, "the alarm lasted");
    drop(guard);
    wait_until("the alarm cleared", Duration::from_secs(30), || async {
        !memory_alarm().await
    })
    .await;
    wait_until(
        "every message settled after the alarm",
        Duration::from_secs(60),
        || queue_is(&queue, |c| c.ready + c.unacked == 0),
    )
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    let parked: HashSet<String> = take_ids(&publisher, &dlq).await.into_iter().collect();
    let missing: Vec<String> = (0..limit)
        .map(|i| format!("limit-{i}"))
        .chain((0..bad).map(|i| format!("bad-{i}")))
        .filter(|id| !parked.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {missing:?} (dropped by the broker at the delivery limit); {report:?}"
    );
    assert_eq!(report.dead_lettered, total, "{report:?}");
    assert_eq!(report.requeued, 0, "held, never requeued: {report:?}");
    delete_queue(&publisher, &dlq).await;
    delete_queue(&publisher, &queue).await;
}
