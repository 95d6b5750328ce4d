//! The confirmed publisher against the real broker: every publish gets its
//! own answer (a `basic.return` is never pinned on another publish's
//! confirm), and no confirm is awaited forever.

use crate::common;
use backstop::publish::{ConfirmedPublisher, PublishError};
use backstop::topology::{Queue, Topology};
use backstop_testkit::{FaultProxy, amqp_url, broker_addr, connect, delete_queue, unique, url_via};
use common::*;
use futures_util::future::join_all;
use lapin::BasicProperties;
use std::time::{Duration, Instant};

/// Publishes `n` messages at once on `publisher`: the even ones to `nowhere`
/// (no queue by that name, so the broker returns them), the odd ones to
/// `queue`. Transient messages, so the queue confirms them at once and their
/// confirms meet the returns in the broker's coalesced multiple-acks.
/// Returns, for each, where it went and what `publish` said.
async fn mixed_publishes(
    publisher: &ConfirmedPublisher,
    queue: &str,
    nowhere: &str,
    n: usize,
) -> Vec<(usize, bool, Result<(), PublishError>)> {
    let publishes = (0..n).map(|i| {
        let routable = i % 2 == 1;
        let key = if routable { queue } else { nowhere };
        async move {
            let properties = BasicProperties::default()
                .with_delivery_mode(1)
                .with_message_id(format!("m-{i}").into());
            let result = publisher
                .publish("", key, format!("body {i}").as_bytes(), properties)
                .await;
            (i, routable, result)
        }
    });
    join_all(publishes).await
}

/// Every result must match its own destination: routable ones confirmed,
/// unroutable ones reported as such.
fn assert_each_result_is_its_own(results: &[(usize, bool, Result<(), PublishError>)]) {
    let wrong: Vec<String> = results
        .iter()
        .filter(|(_, routable, result)| match result {
            Ok(()) => !routable,
            Err(PublishError::Unroutable { .. }) => *routable,
            Err(_) => true,
        })
        .map(|(i, routable, result)| format!("m-{i} (routable: {routable}): {result:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} publishes got another publish's answer, e.g. {:?}",
        wrong.len(),
        results.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// lapin pairs a `basic.return` with whichever confirm completes next. The
/// broker returns an unroutable message at once but confirms a persistent one
/// only after writing it, so with several publishes in flight on one channel
/// a return lands on a routable publish and an unroutable one looks
/// confirmed. One publisher must keep every answer exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_on_one_publisher_each_get_their_own_answer() {
    init_tracing();
    let queue = unique("publish-exact");
    let nowhere = unique("publish-nowhere");
    declare(&Topology::new().queue(Queue::classic(&queue))).await;
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let publisher = ConfirmedPublisher::new(channel)
        .await
        .expect("confirm mode");
    let n = 2000;
    let results = mixed_publishes(&publisher, &queue, &nowhere, n).await;
    assert_each_result_is_its_own(&results);
    wait_until_ready(&queue, n as u64 / 2).await;
    delete_queue(&connection, &queue).await;
}

async fn wait_until_ready(queue: &str, n: u64) {
    backstop_testkit::wait_until(
        "every confirmed copy in its queue",
        Duration::from_secs(30),
        || queue_is(queue, move |c| c.ready == n),
    )
    .await;
}

/// The same through a pool of channels on the publishing connection: each
/// channel carries one publish at a time, so every answer stays exact, and
/// the returns mark the publisher broken (its topology needs declaring).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_keeps_every_answer_exact_across_its_channels() {
    init_tracing();
    let queue = unique("publish-pool");
    let nowhere = unique("publish-nowhere");
    declare(&Topology::new().queue(Queue::classic(&queue))).await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let publisher = ConfirmedPublisher::pooled(supervisor.publishing(), 4, Duration::from_secs(30));
    assert_eq!(publisher.broken(), None);
    let n = 2000;
    let results = mixed_publishes(&publisher, &queue, &nowhere, n).await;
    assert_each_result_is_its_own(&results);
    let broken = publisher.broken().unwrap_or_default();
    assert!(broken.contains(&nowhere), "{broken:?}");
    wait_until_ready(&queue, n as u64 / 2).await;
    publisher.close().await;
    let after_close = publisher
        .publish("", &queue, b"late", BasicProperties::default())
        .await;
    assert!(
        matches!(after_close, Err(PublishError::Channel { .. })),
        "{after_close:?}"
    );
    supervisor.close().await;
    let connection = connect().await;
    delete_queue(&connection, &queue).await;
}

/// A confirm that never comes (the connection went silent) is a failure
/// within the bound, not a wait forever; the channel it was on is given up
/// and the next publish, once the broker answers again, opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_never_comes_is_a_timeout() {
    init_tracing();
    let queue = unique("publish-timeout");
    declare(&Topology::new().queue(Queue::classic(&queue))).await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    // Heartbeats far apart: only the confirm timeout can notice the silence.
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(60));
    let publishing = supervisor.publishing();
    publishing
        .connection()
        .await
        .expect("publishing connection");
    let bound = Duration::from_secs(1);
    let publisher = ConfirmedPublisher::pooled(publishing, 1, bound);
    let persistent = || BasicProperties::default().with_delivery_mode(2);
    publisher
        .publish("", &queue, b"before", persistent())
        .await
        .expect("confirmed while the broker answers");

    proxy.blackhole();
    let started = Instant::now();
    let silent = tokio::time::timeout(
        Duration::from_secs(10),
        publisher.publish("", &queue, b"during", persistent()),
    )
    .await
    .expect("the publish gives up by itself");
    assert!(
        matches!(silent, Err(PublishError::Timeout { after, .. }) if after == bound),
        "{silent:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        publisher.broken(),
        None,
        "a silence says nothing about the topology"
    );

    proxy.restore();
    publisher
        .publish("", &queue, b"after", persistent())
        .await
        .expect("confirmed on a fresh channel once the broker answers");
    // The timed-out copy may land after all (a duplicate, never a loss).
    backstop_testkit::wait_until("the copies in the queue", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 2 || c.ready == 3)
    })
    .await;
    publisher.close().await;
    supervisor.close().await;
    let connection = connect().await;
    delete_queue(&connection, &queue).await;
}
