//! `/readyz` and `backstop_consumer_ready` of `backstop run` when the
//! broker's view of the subscription and Backstop's differ (issue 14, item
//! 4). Each test touches only its own queue; the first makes the broker drop
//! a consumer with `rabbitmqctl eval`, so run these tests under
//! `flock -s /tmp/broker.lock`.

use crate::sidecar;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use backstop_testkit::{QueueCounts, queue_counts, unique, wait_until};
use sidecar::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The endpoint: counts calls by message id; a message whose id starts
/// with `hold` is answered only once the gate opens.
#[derive(Clone)]
struct Endpoint {
    calls: Arc<Mutex<HashMap<String, u32>>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Endpoint {
    fn calls_of(&self, id: &str) -> u32 {
        self.calls
            .lock()
            .expect("lock")
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// Answers the held requests (a closed semaphore fails every acquire
    /// at once).
    fn open(&self) {
        self.gate.close();
    }
}

async fn answer(State(endpoint): State<Endpoint>, headers: HeaderMap) -> StatusCode {
    let id = headers
        .get("backstop-message-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    *endpoint
        .calls
        .lock()
        .expect("lock")
        .entry(id.clone())
        .or_insert(0) += 1;
    if id.starts_with("hold") {
        let _ = endpoint.gate.acquire().await;
    }
    StatusCode::OK
}

async fn start_endpoint() -> (Endpoint, String) {
    let endpoint = Endpoint {
        calls: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let app = Router::new()
        .route("/orders", post(answer))
        .with_state(endpoint.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the endpoint");
    let url = format!("http://{}/orders", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (endpoint, url)
}

/// One consumer of `queue` whose endpoint may take its time (a held
/// request is not a timeout).
fn config(queue: &str, url: &str, port: u16) -> String {
    format!(
        "[broker]\nuri = \"{}\"\nheartbeat = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[consumer]]\nqueue = \"{queue}\"\nprefetch = 20\nconcurrency = 8\n\
         shutdown_timeout = \"30s\"\n\
         handler.http.url = \"{url}\"\nhandler.http.timeout = \"60s\"\n\
         retry.delays = [\"300ms\", \"3s\"]\nretry.exhausted = \"dead-letter\"\n",
        backstop_testkit::amqp_url()
    )
}

/// `/readyz`: the status and the body.
async fn readyz(port: u16) -> (u16, String) {
    get(&format!("http://127.0.0.1:{port}/readyz")).await
}

/// `backstop_consumer_ready` for `queue`; panics when the line is missing.
async fn ready_gauge(port: u16, queue: &str) -> f64 {
    let (status, text) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(status, 200, "/metrics: {text}");
    metric_value(
        &text,
        &format!("backstop_consumer_ready{{queue=\"{queue}\"}}"),
    )
}

/// The broker's counts for `queue`, read with `rabbitmqctl` off the runtime.
async fn counts(queue: &str) -> QueueCounts {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        queue_counts(&queue).unwrap_or_else(|| panic!("the queue {queue} does not exist"))
    })
    .await
    .expect("rabbitmqctl task")
}

/// Waits up to 30 s until `/readyz` answers 200 and the gauge is 1.
async fn wait_green(port: u16, queue: &str, what: &str) {
    wait_until(what, Duration::from_secs(30), || async move {
        readyz(port).await.0 == 200 && ready_gauge(port, queue).await == 1.0
    })
    .await;
}

/// Waits up to 15 s until `/readyz` answers 503 with `reason` in its body
/// and the gauge is 0, read in the same poll.
async fn wait_red(port: u16, queue: &str, reason: &str) {
    let what = format!("/readyz 503 saying {reason:?}, and the gauge 0");
    wait_until(&what, Duration::from_secs(15), || async move {
        let (status, body) = readyz(port).await;
        status == 503 && body.contains(reason) && ready_gauge(port, queue).await == 0.0
    })
    .await;
}

/// Waits up to 30 s until the endpoint was called once for each of `ids`.
async fn wait_called(endpoint: &Endpoint, ids: &[&str]) {
    let what = format!("{ids:?} at the endpoint");
    wait_until(&what, Duration::from_secs(30), || {
        let called = ids.iter().all(|id| endpoint.calls_of(id) == 1);
        async move { called }
    })
    .await;
}

/// Waits up to 30 s until `queue` holds nothing, ready or unacked.
async fn wait_drained(queue: &str) {
    wait_until("the queue drained", Duration::from_secs(30), || {
        backstop_testkit::queue_is(queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
}

/// The broker drops the sidecar's consumer without a `basic.cancel`: the
/// sidecar still believes it is subscribed, and nothing would arrive. The
/// periodic passive declare sees the broker count no consumer: `/readyz`
/// goes 503 naming the cause within 15 s, the gauge with it, the sidecar
/// subscribes again, and a message published after the fault is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_goes_red_when_the_broker_silently_drops_the_consumer_and_green_once_it_counts_it_again()
 {
    let queue = unique("forgotten");
    let (endpoint, url) = start_endpoint().await;
    let port = free_port();
    let _run = start_ready(&config(&queue, &url, port), port).await;
    publish(&queue, &[("before-1", "{}".to_owned())]).await;
    wait_called(&endpoint, &["before-1"]).await;
    assert_eq!(counts(&queue).await.consumers, 1);

    let fault = Instant::now();
    let name = queue.clone();
    let forgotten = tokio::task::spawn_blocking(move || backstop_testkit::forget_consumers(&name))
        .await
        .expect("rabbitmqctl task")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(forgotten, 1, "the sidecar's one consumer");
    // Backstop still believes it is subscribed; the broker counts nobody.
    // (The check needs two readings 1 s apart to call it: not yet.)
    assert_eq!(readyz(port).await.0, 200);
    assert_eq!(counts(&queue).await.consumers, 0);
    // A message waits for the consumer the broker no longer counts: the
    // check believes "no consumer" only with a message ready (a quorum
    // queue whose leader is slow answers 0 consumers and 0 messages).
    publish(&queue, &[("waiting-1", "{}".to_owned())]).await;

    wait_red(
        port,
        &queue,
        &format!("the broker does not count our consumer on {queue}"),
    )
    .await;
    let to_red = fault.elapsed();
    println!("time to red: {to_red:?} (from before the rabbitmqctl eval)");
    assert!(to_red <= Duration::from_secs(15), "{to_red:?}");

    wait_green(
        port,
        &queue,
        "/readyz 200 and the gauge 1 once the broker counts the new subscription",
    )
    .await;
    println!("time to green again: {:?}", fault.elapsed());
    assert_eq!(counts(&queue).await.consumers, 1);
    publish(&queue, &[("after-1", "{}".to_owned())]).await;
    wait_called(&endpoint, &["waiting-1", "after-1"]).await;
    wait_drained(&queue).await;
    assert_eq!(endpoint.calls_of("before-1"), 1);
    cleanup(&queue).await;
}

/// The example: someone else deletes the queue and declares it
/// again. The broker cancels the sidecar's consumer; while the sidecar
/// lets its running request finish (the drain before the channel closes)
/// it is not subscribed, and `/readyz` says so. Then it consumes from the
/// new queue: counted by the broker, ready, and its messages handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_and_declared_again_by_someone_else_is_consumed_again_and_readyz_says_so() {
    let queue = unique("redeclared");
    let (endpoint, url) = start_endpoint().await;
    let port = free_port();
    let _run = start_ready(&config(&queue, &url, port), port).await;
    publish(&queue, &[("hold-1", "{}".to_owned())]).await;
    wait_called(&endpoint, &["hold-1"]).await;
    assert_eq!(readyz(port).await.0, 200);

    // Someone else, on a connection of their own.
    let other = backstop_testkit::connect().await;
    let channel = other.create_channel().await.expect("channel");
    channel
        .queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("queue.delete");
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    let _ = other.close(200, "redeclared".into()).await;

    // The request for hold-1 still runs: the broker counts no consumer on
    // the new queue, and /readyz must not say ready.
    wait_red(port, &queue, &format!("not subscribed to {queue}")).await;
    assert_eq!(counts(&queue).await.consumers, 0);
    assert_eq!(endpoint.calls_of("hold-1"), 1);

    endpoint.open();
    wait_green(
        port,
        &queue,
        "/readyz 200 and the gauge 1 once subscribed to the new queue",
    )
    .await;
    assert_eq!(
        counts(&queue).await.consumers,
        1,
        "the broker counts the new subscription"
    );
    let after: Vec<(String, String)> = (1..=3)
        .map(|i| (format!("after-{i}"), "{}".to_owned()))
        .collect();
    publish_owned(&queue, &after).await;
    wait_called(&endpoint, &["after-1", "after-2", "after-3"]).await;
    wait_drained(&queue).await;
    cleanup(&queue).await;
}
