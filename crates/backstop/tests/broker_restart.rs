//! The broker restarts under a running consumer: `rabbitmqctl stop_app`, 8 s
//! down, `start_app`. This is the case lapin's own auto-recover never comes
//! back from. It has its own test binary because it stops the shared broker:
//! cargo runs test binaries one after another, so nothing else runs meanwhile.

mod common;

use backstop::consumer::ConsumerConfig;
use backstop_testkit::{amqp_url, connect, delete_queue, publish, rabbitmqctl, unique, wait_until};
use common::*;
use std::time::Duration;

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
    wait_until("the first subscription", Duration::from_secs(30), || {
        let sessions = consumer.stats().sessions;
        async move { sessions == 1 }
    })
    .await;
    let publisher = connect().await;
    publish(&publisher, &queue, 100, "before", |_| b"x".to_vec()).await;
    wait_until("the first batch", Duration::from_secs(30), || {
        let n = recorder.distinct_handled();
        async move { n == 100 }
    })
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
    wait_until(
        "consumption to resume without intervention",
        Duration::from_secs(90),
        || {
            let n = recorder.distinct_handled();
            async move { n == 200 }
        },
    )
    .await;
    assert!(supervisor.reconnects() >= 1);
    assert!(!consumer.is_finished());
    consumer.shutdown().await.expect("clean shutdown");
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}
