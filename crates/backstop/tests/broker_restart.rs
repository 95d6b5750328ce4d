//! Tests that change the whole broker: a restart under a running consumer
//! (`rabbitmqctl stop_app`, 8 s down, `start_app`: the case lapin's own
//! auto-recover never comes back from) and a memory alarm. They have their own
//! test binary, since cargo runs test binaries one after another, and take a
//! lock so they do not overlap each other either.

mod common;

use backstop::connection::ConnectionState;
use backstop::consumer::ConsumerConfig;
use backstop_testkit::{amqp_url, connect, publish, rabbitmqctl, unique};
use common::*;
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
