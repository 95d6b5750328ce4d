//! The `Publisher` under broker-wide faults: a restart and forced closes in
//! the middle of 50,000 publishes, and a memory alarm that blocks the
//! connection. They change the whole broker, so they have their own test
//! binary (cargo runs test binaries one after another), run one at a time,
//! and belong under `flock /tmp/broker.lock`.

mod common;

use backstop::connection::{ConnectionConfig, ConnectionState};
use backstop::publish::{Message, Published, Publisher};
use backstop_testkit::{amqp_url, connect, rabbitmqctl, unique, wait_until};
use common::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Resets the memory alarm even if the test fails half-way.
struct WatermarkGuard;

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

async fn ctl(args: &'static [&'static str]) {
    tokio::task::spawn_blocking(move || rabbitmqctl(args))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The message-ids of `queue`, in queue order, by `basic.get` until empty.
async fn take_ids(queue: &str) -> Vec<String> {
    take_all(&connect().await, queue)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// Checks that every `n` ids arrived, in order of first arrival, and
/// returns the number of duplicates.
fn check_arrivals(arrived: &[String], n: u64) -> u64 {
    let mut first: HashMap<u64, usize> = HashMap::new();
    let mut order = Vec::new();
    for id in arrived {
        let seq: u64 = id
            .strip_prefix("m-")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not one of ours: {id}"));
        if first.insert(seq, order.len()).is_none() {
            order.push(seq);
        }
    }
    let missing: Vec<u64> = (0..n).filter(|s| !first.contains_key(s)).take(10).collect();
    assert!(missing.is_empty(), "lost: {missing:?} (first ten)");
    let out_of_order = order.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(out_of_order, 0, "first arrivals out of publish order");
    arrived.len() as u64 - n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_publishes_survive_a_restart_and_two_forced_closes_in_order() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    const N: u64 = 50_000;
    const BATCH: u64 = 100;
    let queue = unique("pubf-restart");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    drop(connection);
    let dir = tempdir("pubf-restart");
    let publisher = Publisher::builder(
        ConnectionConfig::new(amqp_url())
            .connection_name(unique("pubf-restart"))
            .backoff(fast_backoff()),
    )
    .spool(dir.join("spool.db"))
    .confirm_timeout(Duration::from_secs(5))
    .start()
    .await
    .expect("start");

    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let publisher = publisher.clone();
        let queue = queue.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let (mut confirmed, mut spooled) = (0u64, 0u64);
            // Paced at 2,500 messages a second, so that the faults land in
            // the middle of the stream: unpaced, the whole run is over
            // before rabbitmqctl has started.
            let mut pace = tokio::time::interval(Duration::from_millis(40));
            for b in 0..N / BATCH {
                pace.tick().await;
                let batch = (b * BATCH..(b + 1) * BATCH)
                    .map(|i| {
                        let id = format!("m-{i}");
                        Message::new("", &queue, id.clone().into_bytes()).with_message_id(id)
                    })
                    .collect();
                for (k, result) in publisher.publish_batch(batch).await.into_iter().enumerate() {
                    match result {
                        Ok(Published::Confirmed { .. }) => confirmed += 1,
                        Ok(Published::Spooled { .. }) => spooled += 1,
                        Err(e) => panic!("m-{}: {e}", b * BATCH + k as u64),
                    }
                }
                sent.store((b + 1) * BATCH, Ordering::Release);
            }
            (confirmed, spooled)
        })
    };
    let reached = |n: u64| {
        let sent = sent.clone();
        move || {
            let sent = sent.clone();
            async move { sent.load(Ordering::Acquire) >= n }
        }
    };

    wait_until(
        "10,000 published",
        Duration::from_secs(120),
        reached(10_000),
    )
    .await;
    ctl(&["close_all_connections", "backstop test: forced close 1"]).await;
    wait_until(
        "20,000 published",
        Duration::from_secs(120),
        reached(20_000),
    )
    .await;
    ctl(&["close_all_connections", "backstop test: forced close 2"]).await;
    wait_until(
        "30,000 published",
        Duration::from_secs(120),
        reached(30_000),
    )
    .await;
    let guard = RestartGuard;
    ctl(&["stop_app"]).await;
    let mut state = publisher.supervisor().state();
    tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| !s.is_up()))
        .await
        .expect("the publisher notices the broker going away")
        .expect("state");
    // The broker stays down while the producer spools a few thousand.
    let spooled_before = publisher.stats().spooled;
    wait_until(
        "spooling while the broker is down",
        Duration::from_secs(60),
        || {
            let spooled = publisher.stats().spooled;
            assert!(
                !producer.is_finished(),
                "the producer ended before the broker came back"
            );
            async move { spooled >= spooled_before + 3_000 }
        },
    )
    .await;
    ctl(&["start_app"]).await;
    ctl(&["await_startup", "--timeout", "60"]).await;
    drop(guard);

    let (confirmed, spooled) = tokio::time::timeout(Duration::from_secs(300), producer)
        .await
        .expect("the producer finishes")
        .expect("producer");
    assert_eq!(confirmed + spooled, N);
    assert!(
        publisher.drained(Duration::from_secs(180)).await,
        "the spool drains after the restart"
    );
    let stats = publisher.stats();
    let arrived = take_ids(&queue).await;
    let duplicates = check_arrivals(&arrived, N);
    eprintln!(
        "publish under faults: {N} published ({confirmed} confirmed, {spooled} spooled), {} drained, {} arrived, {duplicates} duplicates, {} uncertain, {} reconnects",
        stats.drained,
        arrived.len(),
        stats.uncertain,
        publisher.supervisor().reconnects()
    );
    assert!(spooled > 0, "the faults sent messages to the spool");
    assert_eq!(stats.drained, spooled, "every spooled message drained once");
    assert!(
        duplicates <= stats.uncertain,
        "{duplicates} duplicates but only {} publishes whose confirm was lost",
        stats.uncertain
    );
    assert!(publisher.supervisor().reconnects() >= 3);
    publisher.close().await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_connection_spools_then_drains_after_the_alarm_clears() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    const N: u64 = 300;
    let queue = unique("pubf-alarm");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    drop(connection);
    let dir = tempdir("pubf-alarm");
    let publisher = Publisher::builder(
        ConnectionConfig::new(amqp_url())
            .connection_name(unique("pubf-alarm"))
            .backoff(fast_backoff()),
    )
    .spool(dir.join("spool.db"))
    .confirm_timeout(Duration::from_secs(2))
    .start()
    .await
    .expect("start");
    // Connected and publishing before the alarm.
    let first = publisher
        .publish(Message::new("", &queue, b"m-0".to_vec()).with_message_id("m-0"))
        .await
        .expect("published");
    assert!(matches!(first, Published::Confirmed { .. }), "{first:?}");

    let guard = WatermarkGuard;
    ctl(&["set_vm_memory_high_watermark", "0.0000001"]).await;
    wait_until("the memory alarm", Duration::from_secs(30), memory_alarm).await;
    for i in 1..N {
        let id = format!("m-{i}");
        let published = publisher
            .publish(Message::new("", &queue, id.clone().into_bytes()).with_message_id(&id))
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(
            published.is_spooled(),
            "{id} during the alarm: {published:?}"
        );
    }
    assert!(
        matches!(
            *publisher.supervisor().state().borrow(),
            ConnectionState::Blocked { .. }
        ),
        "the broker blocked the publisher's connection"
    );
    assert_eq!(publisher.stats().spool_messages, N - 1);
    ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    drop(guard);
    assert!(
        publisher.drained(Duration::from_secs(60)).await,
        "the spool drains once the alarm clears"
    );
    let stats = publisher.stats();
    let arrived = take_ids(&queue).await;
    let duplicates = check_arrivals(&arrived, N);
    eprintln!(
        "memory alarm: {} spooled, {} drained, {duplicates} duplicates, {} uncertain",
        stats.spooled, stats.drained, stats.uncertain
    );
    assert!(duplicates <= stats.uncertain);
    publisher.close().await;
}
