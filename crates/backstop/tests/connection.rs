//! The connection supervisor against the real broker.

use crate::common;
use backstop::connection::{Backoff, ConnectionConfig, ConnectionState, ConnectionSupervisor};
use backstop::consumer::ConsumerConfig;
use backstop::topology::{Queue, Topology};
use backstop_testkit::{
    FaultProxy, amqp_url, broker_addr, connect, delete_queue, publish, unique, url_via, wait_until,
};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_are_tried_in_turn() {
    init_tracing();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(url_via(&amqp_url(), dead))
            .address(amqp_url())
            .backoff(fast_backoff()),
    )
    .expect("valid");
    let live = tokio::time::timeout(Duration::from_secs(20), supervisor.connection())
        .await
        .expect("the second address is reached")
        .expect("connected");
    assert_eq!(live.generation(), 1);
    supervisor.close().await;
    assert!(matches!(
        &*supervisor.state().borrow(),
        ConnectionState::Closed { .. }
    ));
}

// One thread, so the thread-local subscriber sees the supervisor's logs too.
#[tokio::test(flavor = "current_thread")]
async fn transitions_are_logged_with_reasons_and_without_credentials() {
    let (captured, _guard) = common::CapturedLogs::start("backstop=debug");

    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let url = url_via(&amqp_url(), proxy.addr());
    assert!(url.contains(":guest@"), "the test URL carries a password");
    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(&url)
            .backoff(fast_backoff())
            .connection_name("backstop-log-test"),
    )
    .expect("valid");
    supervisor.connection().await.expect("connected");
    proxy.cut();
    let mut state = supervisor.state();
    let reconnected = tokio::time::timeout(
        Duration::from_secs(20),
        state.wait_for(
            |s| matches!(s, ConnectionState::Connected { generation } if *generation == 2),
        ),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(reconnected);
    supervisor.close().await;

    let logs = captured.text();
    assert!(logs.contains("to=Reconnecting"), "{logs}");
    assert!(logs.contains("to=Connected { generation: 2 }"), "{logs}");
    assert!(logs.contains("reason="), "{logs}");
    assert!(logs.contains("guest:***@"), "{logs}");
    assert!(
        !logs.contains(":guest@"),
        "a password reached the logs:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_error_during_setup_is_retried_on_a_new_channel() {
    init_tracing();
    let queue = unique("conflict");
    // Someone else declared the queue with other arguments: our declaration
    // fails with PRECONDITION_FAILED, which closes the channel.
    let other = Topology::new().queue(Queue::classic(&queue).max_length(5));
    let publisher = connect().await;
    let channel = publisher.create_channel().await.expect("channel");
    other.apply(&channel).await.expect("declare");

    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(classic(&queue)),
        &recorder,
        ack,
    );
    wait_stats(&consumer, "repeated setup failures", |s| {
        s.session_errors >= 2
    })
    .await;
    assert!(
        !consumer.is_finished(),
        "a channel error must not stop the runtime"
    );
    assert_eq!(consumer.stats().sessions, 0);
    assert_eq!(
        supervisor.reconnects(),
        0,
        "a channel error must not cost the connection"
    );

    delete_queue(&publisher, &queue).await;
    wait_stats(&consumer, "a session once the conflict is gone", |s| {
        s.sessions == 1
    })
    .await;
    publish(&publisher, &queue, 5, "m", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(5, "messages handled", Duration::from_secs(30))
        .await;
    finish(consumer, &supervisor, &publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_that_outlive_the_shutdown_timeout_stay_unacked() {
    init_tracing();
    let queue = unique("slow-shutdown");
    let topology = classic(&queue);
    declare(&topology).await;
    let publisher = connect().await;
    publish(&publisher, &queue, 10, "m", |_| b"x".to_vec()).await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .concurrency(3)
            .shutdown_timeout(Duration::from_millis(300)),
        &recorder,
        |_, _| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            backstop::handler::Outcome::Ack
        },
    );
    wait_until("three handlers running", Duration::from_secs(30), || {
        let running = recorder.running.load(std::sync::atomic::Ordering::SeqCst);
        async move { running == 3 }
    })
    .await;
    let report = tokio::time::timeout(Duration::from_secs(10), consumer.shutdown())
        .await
        .expect("shutdown honours its timeout")
        .expect("clean shutdown");
    assert_eq!(report.handled, 0);
    wait_until("all ten back in the queue", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 10 && c.unacked == 0)
    })
    .await;
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

/// `close()` is bounded: with the connection blackholed the broker never
/// answers `connection.close`, and lapin alone would wait for it until its
/// heartbeats ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_supervisor_whose_connection_is_blackholed_finishes() {
    init_tracing();
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(60));
    supervisor.connection().await.expect("connected");
    proxy.blackhole();
    tokio::time::timeout(Duration::from_secs(15), supervisor.close())
        .await
        .expect("close() finishes while the broker does not answer");
    assert!(matches!(
        &*supervisor.state().borrow(),
        ConnectionState::Closed { .. }
    ));
}

/// A shutdown while a session is being opened on a connection that does not
/// answer (channel.open never completes) finishes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_a_session_opens_on_a_silent_connection_finishes() {
    init_tracing();
    let queue = unique("open-hang");
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(60));
    supervisor.connection().await.expect("connected");
    proxy.blackhole();
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(classic(&queue)),
        &recorder,
        ack,
    );
    // The runtime shows no sign of being inside channel.open, which cannot
    // complete here; half a second is ample to get there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(consumer.stats().sessions, 0);
    tokio::time::timeout(Duration::from_secs(5), consumer.shutdown())
        .await
        .expect("the shutdown does not wait for the hung open")
        .expect("clean shutdown");
    tokio::time::timeout(Duration::from_secs(15), supervisor.close())
        .await
        .expect("close() is bounded");
    proxy.restore();
    let publisher = connect().await;
    delete_queue(&publisher, &queue).await;
}

/// The publishing connection gives up on its own (its one attempt times out
/// while the broker does not answer) while the consumers' connection stays
/// up: it is started again, and `publishing()` hands out a working
/// connection once the broker answers. Before, it stayed `Closed` for good
/// and every retry or dead-letter copy failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishing_connection_that_gave_up_is_started_again() {
    init_tracing();
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(url_via(&amqp_url(), proxy.addr()))
            // Long enough that the short blackhole below cannot end the
            // consumers' connection.
            .heartbeat(Duration::from_secs(30))
            .connection_name(unique("backstop-relaunch"))
            .backoff(Backoff {
                max_attempts: Some(1),
                ..fast_backoff()
            })
            .connect_timeout(Duration::from_secs(1)),
    )
    .expect("valid");
    let consuming = supervisor.connection().await.expect("connected");
    // New connections get no answer (the open one is held for a moment).
    proxy.blackhole();
    let mut state = supervisor.publishing().state();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| matches!(s, ConnectionState::Closed { .. })),
    )
    .await
    .expect("the publishing connection gives up after its one attempt")
    .expect("the supervisor is alive");
    proxy.restore();
    let took = wait_until(
        "a working publishing connection",
        Duration::from_secs(30),
        || {
            let supervisor = supervisor.clone();
            async move {
                match supervisor.publishing().connection().await {
                    Ok(live) => live.create_channel().await.is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    tracing::info!(?took, "the publishing connection is back");
    assert!(
        state.borrow().is_up(),
        "the state receiver taken before the relaunch follows it: {:?}",
        *state.borrow()
    );
    let live = supervisor.connection().await.expect("still connected");
    assert_eq!(
        live.generation(),
        consuming.generation(),
        "the consumers' connection was never replaced"
    );
    supervisor.close().await;
    assert!(matches!(
        &*supervisor.publishing().state().borrow(),
        ConnectionState::Closed { .. }
    ));
}
