//! `backstop run` with `consumer.breaker` set, through a 10 s outage of its
//! endpoint (issue 20 item 3): the breaker opens, the endpoint receives only
//! the probes the configuration allows while it is not closed, the consumer
//! is back at its full prefetch (as the broker reports it) once it closes,
//! and every message is handled exactly once, none dead-lettered.

use crate::sidecar;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use backstop_testkit::{consumer_prefetches, queue_is, unique, wait_until};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use sidecar::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const PREFETCH: u64 = 20;
const CONCURRENCY: usize = 8;
const SUCCESSES_TO_CLOSE: usize = 3;
const OUTAGE: Duration = Duration::from_secs(10);
/// Messages published during the outage, one every `OUTAGE / FLOWING`.
const FLOWING: u64 = 100;
/// Messages published before and after it.
const AROUND: u64 = 20;

/// The endpoint: 503 while `down`, 200 otherwise; every request recorded
/// with the wall-clock time it came (comparable with the sidecar's log
/// timestamps: one clock, one machine) and the status it got.
#[derive(Clone, Default)]
struct Endpoint {
    down: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<(SystemTime, String, bool)>>>,
}

impl Endpoint {
    fn ok_ids(&self) -> HashMap<String, usize> {
        let mut ok = HashMap::new();
        for (_, id, success) in self.requests.lock().expect("lock").iter() {
            if *success {
                *ok.entry(id.clone()).or_default() += 1;
            }
        }
        ok
    }
}

async fn answer(State(endpoint): State<Endpoint>, headers: HeaderMap) -> StatusCode {
    let id = message_id(&headers);
    let down = endpoint.down.load(Ordering::SeqCst);
    endpoint
        .requests
        .lock()
        .expect("lock")
        .push((SystemTime::now(), id, !down));
    if down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// A breaker transition the sidecar logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Breaker {
    Open,
    HalfOpen,
    Closed,
}

/// The breaker transitions of `queue` in the sidecar's log, in order, with
/// their timestamps. Panics on a transition line it cannot read.
fn transitions(log: &str, queue: &str) -> Vec<(SystemTime, Breaker)> {
    let queue_field = format!("queue={queue}");
    log.lines()
        .filter(|l| {
            l.contains(" backstop::consumer: circuit breaker ")
                && l.split_whitespace().any(|w| w == queue_field)
        })
        .map(|line| {
            let state = if line.contains("circuit breaker open:") {
                Breaker::Open
            } else if line.contains("circuit breaker half-open:") {
                Breaker::HalfOpen
            } else if line.contains("circuit breaker closed:") {
                Breaker::Closed
            } else {
                panic!("a breaker line that is no transition: {line:?}");
            };
            let stamp = line
                .split_whitespace()
                .next()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .unwrap_or_else(|| panic!("no RFC 3339 timestamp on {line:?}"));
            (stamp, state)
        })
        .collect()
}

/// Publishes `ids` to `queue` on one confirmed channel, one every `every`
/// (none when zero).
async fn publish_paced(queue: &str, ids: Vec<String>, every: Duration) {
    let (connection, channel) = confirmed_channel().await;
    let mut tick = tokio::time::interval(every.max(Duration::from_micros(1)));
    for id in ids {
        if !every.is_zero() {
            tick.tick().await;
        }
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                br#"{"order":1}"#,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.as_str().into()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let _ = connection.close(200, "published".into()).await;
}

fn ids(prefix: &str, n: u64) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn breaker_metric(metrics: &str, queue: &str) -> f64 {
    let (status, text) = get(metrics).await;
    assert_eq!(status, 200, "/metrics answered {status}: {text}");
    metric_value(
        &text,
        &format!("backstop_breaker_state{{queue=\"{queue}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_probes_and_closes_back_at_the_full_prefetch() {
    let endpoint = Endpoint::default();
    let app = Router::new()
        .route("/orders", post(answer))
        .with_state(endpoint.clone());
    let url = backstop_testkit::serve_http(app).await + "/orders";
    let queue = unique("run-breaker");
    let port = free_port();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let config = config_for(
        &queue,
        &url,
        port,
        &format!(
            "breaker = {{ window = 10, min_calls = 5, failure_ratio = 0.5, cooldown = \"1s\", \
             successes_to_close = {SUCCESSES_TO_CLOSE} }}\n"
        ),
    );
    assert!(config.contains(&format!(
        "prefetch = {PREFETCH}\nconcurrency = {CONCURRENCY}\n"
    )));
    let (mut run, log_path) = start_run_logged(&config, "warn,backstop=info,lapin=off", &queue);
    wait_ready(port).await;
    wait_until(
        "the broker to report the configured prefetch",
        Duration::from_secs(30),
        || {
            let queue = queue.clone();
            async move { consumer_prefetches(&queue).await == [PREFETCH] }
        },
    )
    .await;

    // Healthy: handled as they come.
    publish_paced(&queue, ids("before", AROUND), Duration::ZERO).await;
    wait_until(
        "the first messages handled",
        Duration::from_secs(30),
        || {
            let done = endpoint.ok_ids().len() as u64 == AROUND;
            async move { done }
        },
    )
    .await;
    assert_eq!(
        breaker_metric(&metrics, &queue).await,
        0.0,
        "closed while healthy"
    );

    // Down for OUTAGE while messages keep coming.
    endpoint.down.store(true, Ordering::SeqCst);
    let down_at = tokio::time::Instant::now();
    let flowing = tokio::spawn({
        let queue = queue.clone();
        async move { publish_paced(&queue, ids("during", FLOWING), OUTAGE / FLOWING as u32).await }
    });
    wait_until("the breaker to open", OUTAGE, || {
        let (metrics, queue) = (metrics.clone(), queue.clone());
        async move { breaker_metric(&metrics, &queue).await == 2.0 }
    })
    .await;
    // The outage lasts its full length whatever the breaker does.
    tokio::time::sleep_until(down_at + OUTAGE).await;
    endpoint.down.store(false, Ordering::SeqCst);
    let up_at = SystemTime::now();
    flowing.await.expect("the publisher during the outage");

    wait_until("the breaker to close", Duration::from_secs(30), || {
        let (metrics, queue) = (metrics.clone(), queue.clone());
        async move { breaker_metric(&metrics, &queue).await == 0.0 }
    })
    .await;
    // Probing subscribed with prefetch 1: the full one is back.
    wait_until(
        "the broker to report the full prefetch after the breaker closed",
        Duration::from_secs(10),
        || {
            let queue = queue.clone();
            async move { consumer_prefetches(&queue).await == [PREFETCH] }
        },
    )
    .await;
    publish_paced(&queue, ids("after", AROUND), Duration::ZERO).await;
    let total = AROUND * 2 + FLOWING;
    wait_until(
        "every message handled after recovery",
        Duration::from_secs(60),
        || {
            let done = endpoint.ok_ids().len() as u64 == total;
            async move { done }
        },
    )
    .await;
    let (code, _) = terminate(&mut run, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "a clean shutdown");

    // Nothing lost, nothing twice, nothing parked.
    let ok = endpoint.ok_ids();
    let mut expected: Vec<String> = ids("before", AROUND);
    expected.extend(ids("during", FLOWING));
    expected.extend(ids("after", AROUND));
    for id in &expected {
        assert_eq!(ok.get(id), Some(&1), "{id} handled exactly once");
    }
    assert_eq!(ok.len(), expected.len(), "no other id handled: {ok:?}");
    for q in [
        queue.clone(),
        format!("{queue}.dlq"),
        format!("{queue}.retry.300ms"),
        format!("{queue}.retry.3s"),
    ] {
        assert!(
            queue_is(&q, |c| c.ready == 0 && c.unacked == 0).await,
            "{q} is empty"
        );
    }

    // The breaker's story, from the log.
    let log = std::fs::read_to_string(&log_path).expect("read the log");
    let story = transitions(&log, &queue);
    let states: Vec<Breaker> = story.iter().map(|(_, s)| *s).collect();
    assert_eq!(states.first(), Some(&Breaker::Open), "{states:?}\n{log}");
    assert_eq!(states.last(), Some(&Breaker::Closed), "{states:?}");
    assert_eq!(
        states.iter().filter(|s| **s == Breaker::Closed).count(),
        1,
        "closed once, after the outage: {states:?}"
    );
    for pair in states.windows(2) {
        let allowed = matches!(
            pair,
            [Breaker::Open, Breaker::HalfOpen]
                | [Breaker::HalfOpen, Breaker::Open]
                | [Breaker::HalfOpen, Breaker::Closed]
        );
        assert!(allowed, "a transition {pair:?} in {states:?}");
    }
    let (closed_at, _) = story[story.len() - 1];
    assert!(closed_at > up_at, "closed only once the endpoint was back");
    let half_opens = states.iter().filter(|s| **s == Breaker::HalfOpen).count();
    assert!(
        half_opens >= 3,
        "a 10 s outage with a 1 s cooldown probes several times: {states:?}"
    );

    // Requests while not closed: per phase, what the configuration allows.
    let requests = endpoint.requests.lock().expect("lock").clone();
    let mut while_tripped = 0;
    for (i, window) in story.windows(2).enumerate() {
        let [(from, state), (to, next)] = window else {
            unreachable!("windows of 2");
        };
        let seen = requests
            .iter()
            .filter(|(at, _, _)| at > from && at < to)
            .count();
        while_tripped += seen;
        let allowed = match (state, next) {
            // Handler calls already running when it opened (their
            // in-process retries are skipped) finish; nothing new starts.
            (Breaker::Open, _) if i == 0 => CONCURRENCY - 1,
            (Breaker::Open, _) => 0,
            // One probe at a time: a failed one opens it again.
            (Breaker::HalfOpen, Breaker::Open) => 1,
            (Breaker::HalfOpen, _) => SUCCESSES_TO_CLOSE,
            (Breaker::Closed, _) => unreachable!("closed only at the end"),
        };
        assert!(
            seen <= allowed,
            "{seen} request(s) while {state:?} (phase {i}, before {next:?}), at most {allowed} \
             allowed: {states:?}"
        );
    }
    let failed_after_open = requests
        .iter()
        .filter(|(at, _, ok)| !ok && *at > story[0].0)
        .count();
    assert!(
        failed_after_open < half_opens + CONCURRENCY,
        "{failed_after_open} failed requests after the breaker opened, {half_opens} probes"
    );
    eprintln!(
        "breaker: {} transitions, {half_opens} half-open phases, {while_tripped} requests while \
         not closed, {} requests in all",
        story.len(),
        requests.len()
    );
    cleanup(&queue).await;
    let _ = std::fs::remove_file(&log_path);
}
