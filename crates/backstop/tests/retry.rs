//! Retries, dead letters, quorum delivery limits and the circuit breaker
//! against the real broker.

use crate::common;
use backstop::breaker::{BreakerConfig, BreakerState};
use backstop::consumer::ConsumerConfig;
use backstop::handler::Outcome;
use backstop::retry::{self, RetryPolicy, header_str, header_u64};
use backstop::topology::{Binding, Exchange, Queue, Topology};
use backstop_testkit::{
    FaultProxy, amqp_url, broker_addr, connect, delete_queue, publish, unique, url_via, wait_until,
};
use common::*;
use lapin::options::BasicGetOptions;
use lapin::{BasicProperties, Channel};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn delete_all(connection: &lapin::Connection, queue: &str, policy: &RetryPolicy) {
    for name in policy.tier_queues(queue) {
        delete_queue(connection, &name).await;
    }
    delete_queue(connection, &RetryPolicy::dead_letter_queue(queue)).await;
}

async fn dlq_depth(queue: &str) -> u64 {
    let dlq = RetryPolicy::dead_letter_queue(queue);
    let counts = tokio::task::spawn_blocking(move || backstop_testkit::queue_counts(&dlq))
        .await
        .expect("rabbitmqctl task");
    counts.map_or_else(
        || panic!("{queue}'s DLQ does not exist: its depth is not 0"),
        |c| c.ready + c.unacked,
    )
}

async fn get_one(channel: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("a message in the queue")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_transient_failures_then_success_take_three_calls_through_the_tiers() {
    init_tracing();
    let queue = unique("retry-ok");
    let policy = RetryPolicy::new().delays([ms(500), ms(1000)]);
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy.clone()),
        &recorder,
        {
            let times = times.clone();
            move |_, call| {
                let times = times.clone();
                async move {
                    times.lock().expect("times").push(Instant::now());
                    if call <= 2 {
                        Outcome::retry(format!("downstream hiccup {call}"))
                    } else {
                        Outcome::Ack
                    }
                }
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    publish(&publisher, &queue, 1, "m", |_| b"x".to_vec()).await;
    recorder
        .wait_handled(1, "success on the third call", Duration::from_secs(30))
        .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(recorder.calls_of("m-0"), 3);
    assert_eq!(report.retried, 2);
    assert_eq!(report.dead_lettered, 0);
    let times = times.lock().expect("times").clone();
    let (first, second) = (times[1] - times[0], times[2] - times[1]);
    // Honoured within the tier's resolution: never early, not much late.
    assert!(
        first >= ms(500) && first < ms(3000),
        "first delay {first:?}"
    );
    assert!(
        second >= ms(1000) && second < ms(3500),
        "second delay {second:?}"
    );
    assert_eq!(dlq_depth(&queue).await, 0);
    assert!(queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await);
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

/// A message published with a per-message TTL fails for good at once. Its
/// DLQ copy must outlive that TTL: before copies dropped `expiration`, the
/// original was acked and the copy then expired out of the DLQ, lost. (A copy
/// that went through a tier first had lost it already: the broker's
/// dead-lettering from the tier strips `expiration`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_do_not_carry_the_original_s_expiration() {
    init_tracing();
    let queue = unique("retry-ttl");
    let policy = RetryPolicy::new().delays([ms(200)]);
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy.clone()),
        &recorder,
        |_, _| async move { Outcome::reject("bad order") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let channel = confirmed_channel(&publisher).await;
    publish_confirmed(
        &channel,
        "",
        &queue,
        b"order",
        BasicProperties::default()
            .with_message_id("ttl-1".into())
            .with_expiration("1500".into())
            .with_delivery_mode(2),
    )
    .await;
    wait_stats(&consumer, "the DLQ copy confirmed", |s| {
        s.dead_lettered == 1
    })
    .await;
    let parked_at = Instant::now();
    consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(recorder.calls_of("ttl-1"), 1);
    // The TTL itself is what is tested: wait it out (and a margin), then the
    // copy must still be there.
    tokio::time::sleep(ms(2500).saturating_sub(parked_at.elapsed())).await;
    let dlq = RetryPolicy::dead_letter_queue(&queue);
    let copy = get_one(&channel, &dlq).await;
    let properties = &copy.delivery.properties;
    assert_eq!(properties.expiration(), &None, "the copy has no TTL");
    let headers = properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers
            .inner()
            .get(retry::ORIGINAL_EXPIRATION_HEADER)
            .and_then(header_str)
            .as_deref(),
        Some("1500")
    );
    assert!(
        !headers.inner().contains_key("x-death"),
        "no broker history on a copy"
    );
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_after_one_call_with_its_metadata() {
    init_tracing();
    let queue = unique("retry-permanent");
    let exchange = unique("orders-ex");
    let policy = RetryPolicy::new().delays([ms(500)]);
    let topology = Topology::new()
        .exchange(Exchange::topic(&exchange).auto_delete())
        .queue(Queue::classic(&queue))
        .binding(Binding::queue(&queue).to(&exchange).routing_key("order.*"));
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .retry(policy.clone()),
        &recorder,
        |_, _| async { Outcome::reject("unparsable payload") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let channel = confirmed_channel(&publisher).await;
    let before = retry::now_ms();
    publish_confirmed(
        &channel,
        &exchange,
        "order.created",
        b"{not json",
        BasicProperties::default()
            .with_message_id("m-0".into())
            .with_delivery_mode(2),
    )
    .await;
    wait_stats(&consumer, "the dead-letter copy", |s| s.dead_lettered == 1).await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(recorder.calls_of("m-0"), 1);
    assert_eq!(report.retried, 0);

    let dead = get_one(&channel, &RetryPolicy::dead_letter_queue(&queue)).await;
    assert_eq!(dead.delivery.data, b"{not json");
    let headers = dead
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let text = |k: &str| headers.inner().get(k).and_then(header_str);
    let number = |k: &str| headers.inner().get(k).and_then(header_u64);
    assert_eq!(
        text(retry::ERROR_HEADER).as_deref(),
        Some("unparsable payload")
    );
    assert_eq!(text(retry::ERROR_KIND_HEADER).as_deref(), Some("permanent"));
    assert_eq!(number(retry::ATTEMPTS_HEADER), Some(1));
    assert_eq!(
        text(retry::ORIGINAL_EXCHANGE_HEADER),
        Some(exchange.clone())
    );
    assert_eq!(
        text(retry::ORIGINAL_ROUTING_KEY_HEADER).as_deref(),
        Some("order.created")
    );
    assert_eq!(text(retry::ORIGINAL_QUEUE_HEADER), Some(queue.clone()));
    let first = number(retry::FIRST_FAILURE_HEADER).expect("first failure time");
    let last = number(retry::LAST_FAILURE_HEADER).expect("last failure time");
    assert!(first >= before && last >= first && last <= retry::now_ms());
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m-0")
    );
    assert_eq!(dead.delivery.properties.delivery_mode(), &Some(2));
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_are_dead_lettered_after_the_expected_calls() {
    init_tracing();
    let queue = unique("retry-exhausted");
    let policy = RetryPolicy::new()
        .immediate(1, ms(10))
        .delays([ms(200), ms(400), ms(600)]);
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy.clone()),
        &recorder,
        |_, _| async { Outcome::retry("always down") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    publish(&publisher, &queue, 1, "m", |_| b"x".to_vec()).await;
    wait_stats(&consumer, "the dead-letter copy", |s| s.dead_lettered == 1).await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    // Four deliveries (the original and three tiers), each with one
    // in-process retry.
    assert_eq!(recorder.calls_of("m-0"), 8);
    assert_eq!(report.retried, 3);
    let channel = publisher.create_channel().await.expect("channel");
    let dead = get_one(&channel, &RetryPolicy::dead_letter_queue(&queue)).await;
    let headers = dead
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert_eq!(
        headers
            .inner()
            .get(retry::ATTEMPTS_HEADER)
            .and_then(header_u64),
        Some(4)
    );
    assert_eq!(
        headers
            .inner()
            .get(retry::ERROR_KIND_HEADER)
            .and_then(header_str)
            .as_deref(),
        Some("transient")
    );
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_connection_while_retry_copies_are_in_flight_loses_nothing() {
    init_tracing();
    let queue = unique("retry-cut");
    let policy = RetryPolicy::new().delays([ms(300)]);
    let publisher = connect().await;
    let proxy = FaultProxy::start(broker_addr()).await.expect("proxy");
    let supervisor = supervisor(&url_via(&amqp_url(), proxy.addr()), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy.clone())
            .prefetch(50),
        &recorder,
        |_, call| async move {
            tokio::time::sleep(ms(2)).await;
            if call == 1 {
                Outcome::retry("first try fails")
            } else {
                Outcome::Ack
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    publish(&publisher, &queue, 500, "m", |_| b"x".to_vec()).await;
    let cutter = {
        let recorder = recorder.clone();
        tokio::spawn(async move {
            while recorder.distinct_handled() < 500 {
                tokio::time::sleep(ms(300)).await;
                proxy.cut();
            }
            proxy
        })
    };
    recorder
        .wait_handled(500, "every message handled", Duration::from_secs(120))
        .await;
    let _proxy = cutter.await.expect("cutter");
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert!(report.sessions >= 2, "the run must span cuts: {report:?}");
    assert_eq!(dlq_depth(&queue).await, 0);
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_on_a_quorum_queue_stop_at_the_delivery_limit() {
    init_tracing();
    let queue = unique("poison");
    let dlq = RetryPolicy::dead_letter_queue(&queue);
    let topology = Topology::new().queue(Queue::quorum(&dlq)).queue(
        Queue::quorum(&queue)
            .delivery_limit(2)
            .dead_letter_to_dlq()
            .at_least_once_dead_lettering(),
    );
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    // A message that never settles: the handler requeues it every time, as
    // a crashing worker would leave it.
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        |_, _| async { Outcome::Requeue },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    publish(&publisher, &queue, 1, "poison", |_| b"x".to_vec()).await;
    wait_until(
        "the poison message in the DLQ",
        Duration::from_secs(30),
        || queue_is(&dlq, |c| c.ready == 1),
    )
    .await;
    let calls = recorder.calls_of("poison-0");
    let report = consumer.shutdown().await.expect("clean shutdown");
    // Delivered once and redelivered once: the second requeue would leave it
    // at the limit, so Backstop rejects it instead, and the queue's own
    // at-least-once dead-lettering parks it. Then no more calls.
    assert_eq!(calls, 2, "{report:?}");
    assert_eq!(report.rejected, 1, "{report:?}");
    assert_eq!(recorder.calls_of("poison-0"), calls);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
    delete_queue(&publisher, &dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_pauses_a_failing_consumer_and_nothing_is_dead_lettered() {
    init_tracing();
    let queue = unique("breaker");
    // One tier only: without the breaker, a second failure would dead-letter.
    let policy = RetryPolicy::new().delays([ms(500)]);
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let down = Arc::new(AtomicBool::new(true));
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy.clone())
            .prefetch(10)
            .concurrency(4)
            .circuit_breaker(BreakerConfig {
                window: 10,
                min_calls: 5,
                failure_ratio: 0.5,
                cooldown: ms(500),
                successes_to_close: 2,
            }),
        &recorder,
        {
            let down = down.clone();
            move |_, _| {
                let down = down.clone();
                async move {
                    if down.load(Ordering::SeqCst) {
                        Outcome::retry("downstream unavailable")
                    } else {
                        Outcome::Ack
                    }
                }
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    publish(&publisher, &queue, 100, "m", |_| b"x".to_vec()).await;

    // Watch the breaker open, probe and open again, several times over.
    let mut breaker = consumer.breaker();
    let mut opened = 0;
    while opened < 4 {
        tokio::time::timeout(Duration::from_secs(30), breaker.changed())
            .await
            .expect("the breaker keeps cycling")
            .expect("breaker channel");
        if *breaker.borrow_and_update() == BreakerState::Open {
            opened += 1;
        }
    }
    let calls_while_down: u32 = recorder.calls.lock().expect("calls").values().sum();
    assert!(
        calls_while_down < 60,
        "consumption must pause, not drain the queue: {calls_while_down} calls"
    );
    assert_eq!(consumer.stats().dead_lettered, 0);
    assert_eq!(dlq_depth(&queue).await, 0);

    down.store(false, Ordering::SeqCst);
    recorder
        .wait_handled(100, "everything after recovery", Duration::from_secs(60))
        .await;
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        breaker.wait_for(|s| *s == BreakerState::Closed),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(closed, "the breaker closes on success");
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(dlq_depth(&queue).await, 0);
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

/// The `x-backstop-error` header of a DLQ message taken with `basic.get`.
fn error_of(message: &lapin::message::BasicGetMessage) -> String {
    let headers = message
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    headers
        .inner()
        .get(retry::ERROR_HEADER)
        .and_then(header_str)
        .unwrap_or_else(|| panic!("no {} header on {headers:?}", retry::ERROR_HEADER))
}

/// A quorum queue counts every return toward its delivery limit and drops
/// the message (with no dead-letter exchange) at the limit. A handler that
/// keeps asking to requeue must not walk a message into that drop: one
/// delivery before the limit the requeue becomes a DLQ copy with the reason.
/// Before the fix the broker dropped the message on its fourth return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeues_near_the_delivery_limit_park_the_message_with_the_reason() {
    init_tracing();
    let queue = unique("limit-requeue");
    let dlq = RetryPolicy::dead_letter_queue(&queue);
    let topology = Topology::new().queue(Queue::quorum(&queue).delivery_limit(3));
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue).topology(topology),
        &recorder,
        |_, _| async { Outcome::Requeue },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    publish(&publisher, &queue, 1, "looping", |_| b"x".to_vec()).await;
    wait_until(
        "the looping message in the DLQ",
        Duration::from_secs(30),
        || queue_is(&dlq, |c| c.ready == 1),
    )
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    // Delivered with x-delivery-count absent, 1, 2: the third requeue would
    // leave it at the limit, where any return (even a crash) drops it.
    assert_eq!(recorder.calls_of("looping-0"), 3, "{report:?}");
    assert_eq!(report.requeued, 2, "{report:?}");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert!(queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await);
    let channel = publisher.create_channel().await.expect("channel");
    let parked = get_one(&channel, &dlq).await;
    assert_eq!(
        error_of(&parked),
        "delivery limit 3 nearly reached (x-delivery-count=2)"
    );
    assert_eq!(
        parked
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("looping-0")
    );
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
    delete_queue(&publisher, &dlq).await;
}

/// When the exhausted path itself fails near the limit (the store is down),
/// the message used to be requeued: one more return, and on a quorum queue
/// without a dead-letter exchange the broker dropped it at its limit. Now it
/// is held unacked and the store write tried again with backoff until the
/// store is back; it is never requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_delivery_limit_a_message_the_store_cannot_take_is_held_until_it_can() {
    init_tracing();
    let queue = unique("limit-store-down");
    let pg: std::net::SocketAddr = "127.0.0.1:5432".parse().expect("address");
    let proxy = FaultProxy::start(pg).await.expect("proxy");
    let port = proxy.addr();
    let url = backstop_testkit::postgres_url().replace("127.0.0.1:5432", &port.to_string());
    let store = Arc::new(
        backstop::store::SqlStore::connect(&url)
            .await
            .expect("store via proxy"),
    );
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(
                Topology::new().queue(
                    Queue::quorum(&queue)
                        .delivery_limit(2)
                        .without_dead_letter_queue(),
                ),
            )
            // Every delivery is one return from this limit.
            .delivery_limit(1)
            .retry(RetryPolicy::new().exhausted(retry::Exhausted::Store))
            .compensation_store(store.clone(), Duration::from_secs(60)),
        &recorder,
        |_, _| async { Outcome::reject("needs a person") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    drop(proxy);
    publish(&publisher, &queue, 1, "unstorable", |_| b"{}".to_vec()).await;
    wait_stats(&consumer, "failed store writes", |s| s.store_failures >= 3).await;
    let held = consumer.stats();
    assert_eq!(
        (held.delivered, held.requeued, held.stored),
        (1, 0, 0),
        "held, not requeued: {held:?}"
    );
    let _proxy = FaultProxy::start_on(port, pg)
        .await
        .expect("the database is back");
    wait_until("the row stored", Duration::from_secs(60), || {
        let stored = consumer.stats().stored;
        async move { stored == 1 }
    })
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!((report.delivered, report.requeued), (1, 0), "{report:?}");
    let rows = backstop::store::CompensationStore::list(
        &*store,
        &backstop::store::ListFilter {
            queue: Some(queue.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("list");
    assert_eq!(rows.len(), 1);
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
}

/// Without a retry policy a handler's reject and an oversized body were a
/// plain `basic.reject`; on a queue without a dead-letter exchange the
/// broker dropped them. Now they go to `<queue>.dlq` as confirmed copies
/// with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_rejected_and_oversized_messages_are_parked_with_the_reason() {
    init_tracing();
    let queue = unique("no-policy-reject");
    let dlq = RetryPolicy::dead_letter_queue(&queue);
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .max_message_size(64),
        &recorder,
        |delivery, _| async move {
            match delivery.message_id() {
                Some("bad") => Outcome::reject("unparsable payload"),
                _ => Outcome::Ack,
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    let channel = confirmed_channel(&publisher).await;
    for (id, body) in [
        ("bad", vec![b'x'; 8]),
        ("big", vec![b'x'; 100]),
        ("good", vec![b'x'; 8]),
    ] {
        publish_confirmed(
            &channel,
            "",
            &queue,
            &body,
            BasicProperties::default()
                .with_message_id(id.into())
                .with_delivery_mode(2),
        )
        .await;
    }
    wait_until("both failures in the DLQ", Duration::from_secs(30), || {
        queue_is(&dlq, |c| c.ready == 2)
    })
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert_eq!(report.dead_lettered, 2, "{report:?}");
    assert_eq!(report.rejected, 0, "{report:?}");
    assert_eq!(report.oversized, 1, "{report:?}");
    assert_eq!(
        recorder.calls_of("big"),
        0,
        "an oversized body is never handled"
    );
    assert!(queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await);
    let mut errors = Vec::new();
    for _ in 0..2 {
        let parked = get_one(&channel, &dlq).await;
        let id = parked
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        errors.push((id, error_of(&parked)));
    }
    errors.sort();
    assert_eq!(errors[0].0, "bad");
    assert_eq!(errors[0].1, "unparsable payload");
    assert_eq!(errors[1].0, "big");
    assert!(
        errors[1]
            .1
            .contains("100 bytes, over the limit of 64 bytes"),
        "{errors:?}"
    );
    supervisor.close().await;
    delete_queue(&publisher, &queue).await;
    delete_queue(&publisher, &dlq).await;
}

/// A retry copy waits in its tier; when the tier's TTL runs out the broker
/// dead-letters it back to the main queue. A classic tier does that at most
/// once: if the main queue cannot take the copy at that moment (deleted and
/// not yet declared again, as here; on a cluster, a quorum queue without a
/// majority) the copy is dropped, after its original was acked. Quorum
/// tiers with at-least-once dead-lettering keep it until the main queue
/// confirms it.
///
/// RabbitMQ's dead-letter worker re-sends a message it could not place
/// every `dead_letter_worker_publisher_confirm_timeout` (3 minutes by
/// default), read when a quorum queue's worker starts. The test lowers it to
/// 3 s for the workers started while it runs (a guard puts it back): only
/// the retry interval of at-least-once dead-lettering changes, not whether
/// it retries, and no other test depends on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_copies_that_expire_while_the_quorum_queue_is_gone_all_come_back() {
    init_tracing();
    let _resend = tokio::task::spawn_blocking(|| {
        RabbitEnv::set("dead_letter_worker_publisher_confirm_timeout", 3000)
    })
    .await
    .expect("rabbitmqctl task");
    let queue = unique("tier-gone");
    // Long enough to stop the consumer and delete the queue before it runs out.
    let tier_delay = Duration::from_secs(5);
    let tier = RetryPolicy::tier_queue(&queue, tier_delay);
    let policy = RetryPolicy::new().delays([tier_delay]);
    let topology = Topology::new().queue(Queue::quorum(&queue));
    let failing = 3u64;
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let first = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology.clone())
            .retry(policy.clone()),
        &first,
        |_, _| async { Outcome::retry("downstream down") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    // The copies enter the tier after this, so none expires before
    // `published + tier_delay`. (Time, not `list_queues`: a quorum queue
    // reports its counts only every few seconds.)
    let published = Instant::now();
    publish(&publisher, &queue, failing, "f", |_| b"x".to_vec()).await;
    wait_stats(&consumer, "every copy in the tier", |s| {
        s.retried == failing
    })
    .await;
    let in_tier = Instant::now();
    consumer.shutdown().await.expect("clean shutdown");
    delete_queue(&publisher, &queue).await;
    assert!(
        published.elapsed() < tier_delay,
        "the queue was deleted only after {:?}: the copies may have left the tier before, \
         and the test would prove nothing",
        published.elapsed()
    );
    // The TTL itself is the fault's timing: wait it out, then the tier is empty.
    tokio::time::sleep((tier_delay + ms(500)).saturating_sub(in_tier.elapsed())).await;
    wait_until("the tier expired", Duration::from_secs(30), || {
        queue_is(&tier, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;

    // The consumer declares the queue again: every copy must come back.
    let second = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(topology)
            .retry(policy.clone()),
        &second,
        ack,
    );
    second
        .wait_handled(
            failing as usize,
            "every failing message back and handled",
            Duration::from_secs(120),
        )
        .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    for i in 0..failing {
        assert_eq!(second.calls_of(&format!("f-{i}")), 1, "{report:?}");
    }
    assert_eq!(dlq_depth(&queue).await, 0);
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

/// The message ids in `queue`, taken out with `basic.get`; none when the
/// queue does not exist.
async fn take_ids(connection: &lapin::Connection, queue: &str) -> Vec<String> {
    let name = queue.to_owned();
    let exists = tokio::task::spawn_blocking(move || backstop_testkit::queue_counts(&name))
        .await
        .expect("rabbitmqctl task")
        .is_some();
    if !exists {
        return Vec::new();
    }
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
            .map(|id| id.as_str().to_owned())
            .unwrap_or_else(|| panic!("a message without an id in {queue}"));
        ids.push(id);
    }
    let _ = channel.close(200, "counted".into()).await;
    ids
}

/// The number at the end of a test message id (`m-17`).
fn number_of(delivery: &backstop::handler::Delivery) -> u64 {
    delivery
        .message_id()
        .and_then(|id| id.rsplit('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a numbered message id: {:?}", delivery.message_id()))
}

/// Issue 13, item 1. Copies to a tier queue that is gone come back as
/// `basic.return` while copies to a live tier are in flight on the same
/// publisher. A return pinned on another copy's confirm would ack an
/// original whose copy the broker dropped. Ledger: every message ends up in a
/// tier or back in its queue, never nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_copy_never_passes_for_a_confirmed_one() {
    init_tracing();
    let queue = unique("retry-returned");
    // Long tiers: the copies stay there for the whole test.
    let (gone_delay, live_delay) = (Duration::from_secs(600), Duration::from_secs(1200));
    let policy = RetryPolicy::new().delays([gone_delay, live_delay]);
    let gone = RetryPolicy::tier_queue(&queue, gone_delay);
    let live = RetryPolicy::tier_queue(&queue, live_delay);
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy.clone())
            .prefetch(200)
            .concurrency(64),
        &recorder,
        move |delivery, _| async move {
            if number_of(&delivery).is_multiple_of(2) {
                Outcome::retry_after(gone_delay, "to the tier that was deleted")
            } else {
                Outcome::retry_after(live_delay, "to the live tier")
            }
        },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    // Deleted before any copy is published, so no copy is confirmed into it
    // and then deleted: every copy sent to it comes back.
    delete_queue(&publisher, &gone).await;
    let n = 2000u64;
    publish(&publisher, &queue, n, "m", |_| b"x".to_vec()).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let all_copied = loop {
        let retried = consumer.stats().retried;
        if retried >= n && queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(ms(200)).await;
    };
    let report = consumer.shutdown().await.expect("clean shutdown");
    let mut found: std::collections::HashSet<String> = Default::default();
    for name in [&queue, &gone, &live] {
        found.extend(take_ids(&publisher, name).await);
    }
    let missing: Vec<String> = (0..n)
        .map(|i| format!("m-{i}"))
        .filter(|id| !found.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} messages are in no queue (acked while their copy was returned), e.g. {:?}; {report:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(all_copied, "not every message reached a tier: {report:?}");
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

/// Issue 13, item 7. A deleted tier queue makes every copy to it come back;
/// requeueing the original forever would loop. The consumer ends its
/// session, declares its topology again (the tier with it) and the copies
/// flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_tier_queue_is_declared_again_and_copies_flow_through_it() {
    init_tracing();
    let queue = unique("retry-redeclare");
    let delay = Duration::from_secs(600);
    let policy = RetryPolicy::new().delays([delay]);
    let tier = RetryPolicy::tier_queue(&queue, delay);
    let publisher = connect().await;
    let supervisor = supervisor(&amqp_url(), Duration::from_secs(10));
    let recorder = Recorder::default();
    let consumer = spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .retry(policy.clone())
            .concurrency(4),
        &recorder,
        |_, _| async { Outcome::retry("the downstream is down") },
    );
    wait_stats(&consumer, "a subscription", |s| s.sessions == 1).await;
    delete_queue(&publisher, &tier).await;
    let n = 20;
    publish(&publisher, &queue, n, "m", |_| b"x".to_vec()).await;
    wait_stats(&consumer, "every copy confirmed in the tier", |s| {
        s.retried == n
    })
    .await;
    wait_until(
        "the tier declared again, holding every copy",
        Duration::from_secs(30),
        || queue_is(&tier, move |c| c.ready == n),
    )
    .await;
    let report = consumer.shutdown().await.expect("clean shutdown");
    assert!(
        report.sessions >= 2,
        "a new session declared the tier: {report:?}"
    );
    assert!(report.publish_failures >= 1, "{report:?}");
    // Each original was requeued until its copy was confirmed: none was
    // acked on a returned copy and none is left.
    assert_eq!(report.retried, n, "{report:?}");
    assert!(queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await);
    supervisor.close().await;
    delete_all(&publisher, &queue, &policy).await;
    delete_queue(&publisher, &queue).await;
}

/// A `rabbit` application variable set for the length of a test and put
/// back when dropped, even if the test fails half-way.
struct RabbitEnv {
    name: &'static str,
    old: Option<String>,
}

impl RabbitEnv {
    /// Sets `rabbit.<name>` to `value`, remembering what it was (unset:
    /// `undefined`). Panics when `rabbitmqctl` fails or answers something
    /// that is neither a number nor `undefined`.
    fn set(name: &'static str, value: u64) -> Self {
        let out = backstop_testkit::rabbitmqctl(&[
            "-q",
            "eval",
            &format!("application:get_env(rabbit, {name})."),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let out = out.trim();
        let old = if out == "undefined" {
            None
        } else {
            let value = out
                .strip_prefix("{ok,")
                .and_then(|v| v.strip_suffix('}'))
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .unwrap_or_else(|| panic!("cannot read rabbit.{name}: {out:?}"));
            Some(value.to_owned())
        };
        backstop_testkit::rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, {name}, {value})."),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        RabbitEnv { name, old }
    }
}

impl Drop for RabbitEnv {
    fn drop(&mut self) {
        let restore = match &self.old {
            Some(value) => format!("application:set_env(rabbit, {}, {value}).", self.name),
            None => format!("application:unset_env(rabbit, {}).", self.name),
        };
        let _ = backstop_testkit::rabbitmqctl(&["eval", &restore]);
    }
}
