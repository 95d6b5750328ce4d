//! `backstop run` and `backstop config check`, as a user runs them: the real
//! binary against the real broker and a test HTTP endpoint.

use crate::sidecar;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use backstop_testkit::{queue_is, unique, wait_until};
use sidecar::*;
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn check(text: &str) -> (i32, String) {
    let path = write_config(text);
    let (code, _, stderr) = backstop(&["config", "check", "-c", &path.display().to_string()]);
    (
        code,
        stderr.replace(&path.display().to_string(), "backstop.toml"),
    )
}

#[test]
fn every_bad_config_names_file_line_column_and_key_and_exits_2() {
    let cases = [
        (
            "[broker]\nuri = \"amqp://127.0.0.1\"\nurl = \"x\"\n",
            "error: backstop.toml: line 3, column 1, key broker.url: unknown field `url`, expected one of `uri`, `addresses`, `heartbeat`, `connection_name`, `tls`, `password_file`\n",
        ),
        (
            "[broker]\nheartbeat = \"soon\"\n",
            "error: backstop.toml: line 2, column 13, key broker.heartbeat: \"soon\" is not a duration like \"10s\": expected number at 0\n",
        ),
        (
            "[[consumer]]\nqueue = \"q\"\nhandler.http.timeout = \"5s\"\n",
            "error: backstop.toml: line 3, column 9, key consumer[0].handler.http.url: missing field `url`\n",
        ),
        (
            "[[consumer]]\nqueue = \"q\"\nhandler.http.url = \"http://127.0.0.1:8080/\"\nretry.exhausted = \"store\"\n",
            "error: backstop.toml: line 4, column 7, key consumer[0].retry.exhausted: \"store\" needs a compensation store: add [store] with a url\n",
        ),
        (
            "[[consumer]]\nqueue = \"a\"\nhandler.http.url = \"http://x/\"\n\n[[consumer]]\nqueue = \"b\"\nhandler.http.url = \"http://x/\"\nretry.delays = [\"1s\", \"often\"]\n",
            "error: backstop.toml: line 8, column 16, key consumer[1].retry.delays: \"often\" is not a duration like \"10s\": expected number at 0\n",
        ),
        (
            "[[consumer]]\nqueue = \"q\"\nhandler.http.url = \"ftp://x/\"\n",
            "error: backstop.toml: line 3, column 14, key consumer[0].handler.http.url: \"ftp://x/\" is not an http:// or https:// URL with a host\n",
        ),
    ];
    for (text, expected) in cases {
        let (code, stderr) = check(text);
        assert_eq!(stderr, expected, "for:\n{text}");
        assert_eq!(code, 2, "for:\n{text}");
    }
}

#[test]
fn config_check_prints_the_example_normalized_without_the_password() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/backstop.toml");
    let text = std::fs::read_to_string(example)
        .expect("examples/backstop.toml")
        .replace("guest:guest@", "guest:s3cret-pw@");
    let path = write_config(&text);
    let (code, stdout, stderr) = backstop(&["config", "check", "-c", &path.display().to_string()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("s3cret-pw") && !stderr.contains("s3cret-pw"));
    assert!(
        stdout.contains("uri = \"amqp://guest:***@127.0.0.1:5672/%2f\""),
        "{stdout}"
    );
    // `config check` prints TOML: read it back and check the example's values.
    let shown: toml::Table = toml::from_str(&stdout)
        .unwrap_or_else(|e| panic!("config check printed no TOML ({e}):\n{stdout}"));
    let consumer = shown["consumer"].as_array().expect("[[consumer]]")[0].clone();
    let at = |path: &[&str]| -> toml::Value {
        let mut v = consumer.clone();
        for key in path {
            v = v
                .get(*key)
                .unwrap_or_else(|| panic!("missing consumer[0].{} in:\n{stdout}", path.join(".")))
                .clone();
        }
        v
    };
    assert_eq!(at(&["queue"]).as_str(), Some("order_queue"));
    assert_eq!(at(&["prefetch"]).as_integer(), Some(100));
    assert_eq!(
        at(&["handler", "http", "url"]).as_str(),
        Some("http://127.0.0.1:8080/orders")
    );
    assert_eq!(at(&["handler", "http", "timeout"]).as_str(), Some("5s"));
    let delays: Vec<_> = at(&["retry", "delays"])
        .as_array()
        .expect("retry.delays is an array")
        .iter()
        .map(|d| d.as_str().expect("a delay is a string").to_owned())
        .collect();
    assert_eq!(delays, ["1s", "10s", "1m"]);
    assert_eq!(at(&["retry", "exhausted"]).as_str(), Some("store"));
    assert_eq!(at(&["dedup", "key"]).as_str(), Some("json:/order_id"));
}

// ---------------------------------------------------------------------------
// A test endpoint: answers by the `want` field of the JSON body, the first
// time; 200 after that. Records every request.

/// When a request came, its headers and body.
type Request = (Instant, HeaderMap, Vec<u8>);

#[derive(Clone, Default)]
struct Endpoint {
    requests: Arc<Mutex<Vec<Request>>>,
    calls: Arc<Mutex<HashMap<String, u32>>>,
    /// `{"want":"hold"}` answers 200 once this is opened.
    gate: Gate,
}

/// Holds requests until opened.
#[derive(Clone)]
struct Gate(Arc<tokio::sync::Semaphore>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(tokio::sync::Semaphore::new(0)))
    }
}

impl Gate {
    async fn wait(&self) {
        // A closed semaphore fails every acquire at once: that is the opening.
        let _ = self.0.acquire().await;
    }

    fn open(&self) {
        self.0.close();
    }
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

    fn requests_of(&self, id: &str) -> Vec<(Instant, HeaderMap)> {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, h, _)| {
                h.get("backstop-message-id")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v == id)
            })
            .map(|(t, h, _)| (*t, h.clone()))
            .collect()
    }
}

async fn answer(State(endpoint): State<Endpoint>, headers: HeaderMap, body: Bytes) -> Response {
    let id = headers
        .get("backstop-message-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let call = {
        let mut calls = endpoint.calls.lock().expect("lock");
        let n = calls.entry(id).or_insert(0);
        *n += 1;
        *n
    };
    endpoint
        .requests
        .lock()
        .expect("lock")
        .push((Instant::now(), headers, body.to_vec()));
    let want: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let want = want.get("want").and_then(|w| w.as_str()).unwrap_or("200");
    if call > 1 {
        return StatusCode::OK.into_response();
    }
    match want {
        "hold" => {
            endpoint.gate.wait().await;
            StatusCode::OK.into_response()
        }
        "sleep" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK.into_response()
        }
        "slow" => {
            tokio::time::sleep(Duration::from_millis(700)).await;
            StatusCode::OK.into_response()
        }
        "503-retry-after-2" => {
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "2")]).into_response()
        }
        code => StatusCode::from_u16(code.parse().unwrap_or(200))
            .unwrap_or(StatusCode::OK)
            .into_response(),
    }
}

async fn start_endpoint() -> (Endpoint, String) {
    let endpoint = Endpoint::default();
    let app = Router::new()
        .route("/orders", post(answer))
        .with_state(endpoint.clone());
    let base = serve_any(app).await;
    (endpoint, format!("{base}/orders"))
}

/// Serves `app` on a free loopback port; returns its base URL.
async fn serve_any(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the endpoint");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_response_status_maps_to_its_outcome_and_metrics_count_them() {
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-status");
    let port = free_port();
    let _run = start_ready(&config_for(&queue, &url, port, ""), port).await;
    let cases: Vec<(&str, &str)> = vec![
        ("ok-200", "200"),
        ("ok-204", "204"),
        ("perm-400", "400"),
        ("perm-404", "404"),
        ("perm-422", "422"),
        ("tr-408", "408"),
        ("tr-429", "429"),
        ("tr-500", "500"),
        ("tr-503", "503"),
        ("tr-timeout", "sleep"),
        ("tr-retry-after", "503-retry-after-2"),
    ];
    let messages: Vec<(&str, String)> = cases
        .iter()
        .map(|(id, want)| (*id, format!(r#"{{"want":"{want}"}}"#)))
        .collect();
    publish(&queue, &messages).await;
    // Transient ones are called twice (the retry succeeds); the others once.
    wait_until(
        "every message reached its final call",
        Duration::from_secs(30),
        || {
            let done = cases.iter().all(|(id, _)| {
                let want = if id.starts_with("tr-") { 2 } else { 1 };
                endpoint.calls_of(id) >= want
            });
            async move { done }
        },
    )
    .await;
    let dlq = format!("{queue}.dlq");
    wait_until(
        "the permanent failures are in the DLQ",
        Duration::from_secs(20),
        || queue_is(&dlq, |c| c.ready == 3),
    )
    .await;
    for (id, _) in &cases {
        let expected = if id.starts_with("tr-") { 2 } else { 1 };
        assert_eq!(endpoint.calls_of(id), expected, "calls of {id}");
    }
    // The request carries the message's metadata.
    let first = endpoint.requests_of("tr-500");
    let header = |h: &HeaderMap, name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(header(&first[0].1, "content-type"), "application/json");
    assert_eq!(header(&first[0].1, "backstop-queue"), queue);
    assert_eq!(header(&first[0].1, "backstop-routing-key"), queue);
    assert_eq!(header(&first[0].1, "backstop-redelivered"), "false");
    assert_eq!(header(&first[0].1, "backstop-header-x-tenant"), "acme");
    assert_eq!(header(&first[0].1, "backstop-attempt"), "1");
    assert_eq!(header(&first[1].1, "backstop-attempt"), "2");
    // Without Retry-After the first tier (300 ms) is used; with
    // `Retry-After: 2` the nearest tier at or above it (3 s).
    let gap = |id: &str| {
        let r = endpoint.requests_of(id);
        r[1].0.duration_since(r[0].0)
    };
    assert!(
        gap("tr-500") < Duration::from_secs(2),
        "{:?}",
        gap("tr-500")
    );
    assert!(
        gap("tr-retry-after") >= Duration::from_millis(2900),
        "{:?}",
        gap("tr-retry-after")
    );

    // The counters match the workload: 2 + 6 transient successes acked, 3
    // dead-lettered, 6 retried, 17 handler calls.
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let q = format!("queue=\"{queue}\"");
    wait_until(
        "the metrics show the workload",
        Duration::from_secs(10),
        || {
            let metrics_url = metrics_url.clone();
            let q = q.clone();
            async move {
                let (_, text) = get(&metrics_url).await;
                metric(
                    &text,
                    &format!("backstop_deliveries_total{{{q},outcome=\"acked\"}}"),
                ) == Some(8.0)
            }
        },
    )
    .await;
    let (status, text) = get(&metrics_url).await;
    assert_eq!(status, 200);
    let count = |outcome: &str| {
        metric(
            &text,
            &format!("backstop_deliveries_total{{{q},outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("acked"), Some(8.0), "{text}");
    assert_eq!(count("retried"), Some(6.0), "{text}");
    assert_eq!(count("dead_lettered"), Some(3.0), "{text}");
    assert_eq!(count("duplicate"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "backstop_connection_up"), Some(1.0), "{text}");
    // The copies above went on the second connection, which is up.
    assert_eq!(
        metric(&text, "backstop_publishing_connection_up"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("backstop_consumer_ready{{{q}}}")),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "backstop_handler_duration_seconds_count{{{q}}} 17"
        )),
        "{text}"
    );
    let (status, body) = get(&format!("http://127.0.0.1:{port}/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Nothing on the server changes state, so nothing needs an admin token:
    // every method but GET is refused on every path.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["metrics", "healthz", "readyz", "admin", ""] {
            let url = format!("http://127.0.0.1:{port}/{path}");
            let status = http_request(method, &url).await.map(|r| r.0);
            assert!(
                matches!(status, Some(404 | 405)),
                "{method} /{path}: {status:?}"
            );
        }
    }
    drop(_run);
    cleanup(&queue).await;
}

/// Every outcome is a counter of its own, so `acked` never steps back
/// (it once was derived by subtraction and dipped while a retry copy was
/// confirmed before its original's ack was written); `backstop_unacked`
/// counts deliveries held by a slow endpoint apart from handlers, and
/// `backstop_oldest_unacked_seconds` grows while they are held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_counters_never_step_back_and_the_unacked_backlog_is_shown() {
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-unacked");
    let port = free_port();
    let config = format!(
        "[broker]\nuri = \"{}\"\nheartbeat = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[consumer]]\nqueue = \"{queue}\"\nprefetch = 20\nconcurrency = 8\n\
         handler.http.url = \"{url}\"\nhandler.http.timeout = \"60s\"\n\
         retry.delays = [\"300ms\", \"3s\"]\nretry.exhausted = \"dead-letter\"\n",
        backstop_testkit::amqp_url()
    );
    let _run = start_ready(&config, port).await;
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let q = format!("queue=\"{queue}\"");
    let scrape = {
        let metrics_url = metrics_url.clone();
        move || {
            let metrics_url = metrics_url.clone();
            async move {
                let (status, text) = get(&metrics_url).await;
                assert_eq!(status, 200, "GET /metrics: {text}");
                text
            }
        }
    };
    let value = |text: &str, name: &str| -> f64 {
        metric(text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let acked = format!("backstop_deliveries_total{{{q},outcome=\"acked\"}}");
    let unacked = format!("backstop_unacked{{{q}}}");
    let oldest = format!("backstop_oldest_unacked_seconds{{{q}}}");
    let running = format!("backstop_handlers_running{{{q}}}");

    let ok: Vec<(String, String)> = (0..5)
        .map(|i| (format!("ok-{i}"), r#"{"want":"200"}"#.to_owned()))
        .collect();
    let ok: Vec<(&str, String)> = ok.iter().map(|(i, b)| (i.as_str(), b.clone())).collect();
    publish(&queue, &ok).await;
    wait_until("5 acked", Duration::from_secs(20), || {
        let (scrape, acked) = (scrape.clone(), acked.clone());
        async move { metric(&scrape().await, &acked) == Some(5.0) }
    })
    .await;

    // From here on, every scrape's `acked` is recorded.
    let series = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = tokio::spawn({
        let (series, stop, scrape, acked) =
            (series.clone(), stop.clone(), scrape.clone(), acked.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = scrape().await;
                let n = metric(&text, &acked).unwrap_or_else(|| panic!("no {acked} in:\n{text}"));
                series.lock().expect("lock").push(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let assert_never_stepped_back = || {
        let series = series.lock().expect("lock").clone();
        assert!(!series.is_empty(), "no scrape recorded");
        for pair in series.windows(2) {
            assert!(
                pair[1] >= pair[0],
                "acked went from {} to {}: {series:?}",
                pair[0],
                pair[1]
            );
        }
    };

    // Two requests held at the endpoint, then a transient failure behind
    // them: its retry copy is confirmed while its ack waits behind theirs.
    publish(
        &queue,
        &[
            ("hold-1", r#"{"want":"hold"}"#.to_owned()),
            ("hold-2", r#"{"want":"hold"}"#.to_owned()),
        ],
    )
    .await;
    wait_until("both held", Duration::from_secs(20), || {
        let held = endpoint.calls_of("hold-1") == 1 && endpoint.calls_of("hold-2") == 1;
        async move { held }
    })
    .await;
    publish(&queue, &[("tr-500", r#"{"want":"500"}"#.to_owned())]).await;
    wait_until("the retry succeeded", Duration::from_secs(20), || {
        let (scrape, acked) = (scrape.clone(), acked.clone());
        async move { metric(&scrape().await, &acked) == Some(6.0) }
    })
    .await;
    assert_eq!(endpoint.calls_of("tr-500"), 2);
    assert_never_stepped_back();

    // Held: two unacked, two handlers, and the oldest one ages.
    wait_until(
        "the two held ones are all that is unacked",
        Duration::from_secs(10),
        || {
            let (scrape, unacked) = (scrape.clone(), unacked.clone());
            async move { metric(&scrape().await, &unacked) == Some(2.0) }
        },
    )
    .await;
    let text = scrape().await;
    assert_eq!(value(&text, &running), 2.0, "{text}");
    let first_age = value(&text, &oldest);
    assert!(first_age > 0.0, "{text}");
    wait_until("the oldest unacked ages", Duration::from_secs(10), || {
        let (scrape, oldest) = (scrape.clone(), oldest.clone());
        async move { metric(&scrape().await, &oldest).is_some_and(|age| age > first_age + 0.1) }
    })
    .await;

    endpoint.gate.open();
    wait_until(
        "all 8 acked and nothing held",
        Duration::from_secs(20),
        || {
            let (scrape, acked, unacked) = (scrape.clone(), acked.clone(), unacked.clone());
            async move {
                let text = scrape().await;
                metric(&text, &acked) == Some(8.0) && metric(&text, &unacked) == Some(0.0)
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    scraper.await.expect("the scraper");
    assert_never_stepped_back();
    let text = scrape().await;
    let count = |outcome: &str| {
        value(
            &text,
            &format!("backstop_deliveries_total{{{q},outcome=\"{outcome}\"}}"),
        )
    };
    for (outcome, expected) in [
        ("acked", 8.0),
        ("retried", 1.0),
        ("dead_lettered", 0.0),
        ("stored", 0.0),
        ("duplicate", 0.0),
        ("rejected", 0.0),
        ("requeued", 0.0),
    ] {
        assert_eq!(count(outcome), expected, "{outcome}: {text}");
    }
    assert_eq!(value(&text, &unacked), 0.0, "{text}");
    assert_eq!(value(&text, &oldest), 0.0, "{text}");
    assert_eq!(value(&text, &running), 0.0, "{text}");
    drop(_run);
    cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_transient_and_ends_in_the_dlq() {
    let queue = unique("run-refused");
    let port = free_port();
    let closed = format!("http://127.0.0.1:{}/orders", free_port());
    let _run = start_ready(&config_for(&queue, &closed, port, ""), port).await;
    publish(&queue, &[("refused-1", "{}".to_owned())]).await;
    // Two tiers used, then exhausted: the message lands in the DLQ.
    wait_dead_lettered(&queue, 1).await;
    let (_, text) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    let q = format!("queue=\"{queue}\"");
    assert_eq!(
        metric(
            &text,
            &format!("backstop_deliveries_total{{{q},outcome=\"retried\"}}")
        ),
        Some(2.0),
        "{text}"
    );
    drop(_run);
    cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_requests_in_flight_loses_nothing() {
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-sigterm");
    let port = free_port();
    let mut run = start_ready(&config_for(&queue, &url, port, ""), port).await;
    let messages: Vec<(String, String)> = (0..30)
        .map(|i| (format!("slow-{i}"), r#"{"want":"slow"}"#.to_owned()))
        .collect();
    let refs: Vec<(&str, String)> = messages
        .iter()
        .map(|(i, b)| (i.as_str(), b.clone()))
        .collect();
    publish(&queue, &refs).await;
    wait_until("eight requests in flight", Duration::from_secs(30), || {
        let n = endpoint.requests.lock().map(|r| r.len()).unwrap_or(0);
        async move { n >= 8 }
    })
    .await;
    let pid = run.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = run.0.wait().expect("wait for backstop run");
    assert_eq!(status.code(), Some(0), "backstop run did not drain cleanly");
    let answered = endpoint.requests.lock().map(|r| r.len()).expect("lock");
    // Every request that reached the endpoint finished and was acked; the
    // rest are back in the queue: nothing lost, nothing acked unanswered.
    // (The broker's counters lag a moment behind the closed connection.)
    let q = queue.clone();
    wait_until(
        "the unanswered messages are back in the queue",
        Duration::from_secs(15),
        || {
            queue_is(&q, move |c| {
                c.unacked == 0 && c.ready as usize + answered == 30
            })
        },
    )
    .await;
    cleanup(&queue).await;
}

/// The README's quick start: `backstop run -c examples/backstop.toml` as
/// written (its store file lands in the working directory), ready on the
/// example's metrics address, and drained by SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_runs_as_written() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/backstop.toml");
    let dir = std::env::temp_dir().join(unique("quick-start"));
    std::fs::create_dir_all(&dir).expect("work dir");
    let child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["run", "-c", example])
        .current_dir(&dir)
        .env_remove("BACKSTOP_BROKER_URI")
        .env_remove("BACKSTOP_STORE_URL")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start backstop run");
    let mut run = Running(child);
    wait_until(
        "the example is ready on 127.0.0.1:9464",
        Duration::from_secs(30),
        || async { get("http://127.0.0.1:9464/readyz").await.0 == 200 },
    )
    .await;
    assert!(
        dir.join("backstop.db").exists(),
        "the example's store was not created"
    );
    let pid = run.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    assert_eq!(run.0.wait().expect("wait").code(), Some(0));
    let connection = backstop_testkit::connect().await;
    for name in [
        "order_queue",
        "order_queue.dlq",
        "order_queue.retry.1s",
        "order_queue.retry.10s",
        "order_queue.retry.1m",
    ] {
        backstop_testkit::delete_queue(&connection, name).await;
    }
}

#[test]
fn the_broker_uri_can_come_from_the_environment() {
    let path = write_config("[broker]\nuri = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n");
    let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["config", "check", "-c", &path.display().to_string()])
        .env(
            "BACKSTOP_BROKER_URI",
            "amqp://svc:from-env-pw@127.0.0.1:5672/prod",
        )
        .output()
        .expect("run backstop");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        stdout.contains("uri = \"amqp://svc:***@127.0.0.1:5672/prod\""),
        "{stdout}"
    );
    assert!(!stdout.contains("from-env-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_consumes_several_queues() {
    let (endpoint, url) = start_endpoint().await;
    let first = unique("run-multi-a");
    let second = unique("run-multi-b");
    let port = free_port();
    let extra = format!("\n[[consumer]]\nqueue = \"{second}\"\nhandler.http.url = \"{url}\"\n");
    let _run = start_ready(&config_for(&first, &url, port, &extra), port).await;
    publish(&first, &[("multi-a", "{}".to_owned())]).await;
    publish(&second, &[("multi-b", "{}".to_owned())]).await;
    wait_until("both queues delivered", Duration::from_secs(20), || {
        let done = endpoint.calls_of("multi-a") == 1 && endpoint.calls_of("multi-b") == 1;
        async move { done }
    })
    .await;
    let queue_of = |id: &str| {
        endpoint.requests_of(id)[0]
            .1
            .get("backstop-queue")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(queue_of("multi-a"), first);
    assert_eq!(queue_of("multi-b"), second);
    drop(_run);
    cleanup(&first).await;
    cleanup(&second).await;
}

/// A body over `max_message_size` never reaches the endpoint and is
/// dead-lettered with its reason; a non-UTF-8 body reaches it byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_dead_lettered_and_binary_bodies_pass_verbatim() {
    use lapin::options::BasicGetOptions;
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-sizes");
    let port = free_port();
    let _run = start_ready(
        &config_for(&queue, &url, port, "max_message_size = 1024\n"),
        port,
    )
    .await;
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let binary: Vec<u8> = (0..=255u8).rev().chain([0, 0xff, 0xc3]).collect();
    for (id, body) in [("big", vec![b'x'; 2048]), ("binary", binary.clone())] {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default().with_message_id(id.into()),
            )
            .await
            .expect("publish");
    }
    let dlq = format!("{queue}.dlq");
    wait_until(
        "the oversized message is dead-lettered",
        Duration::from_secs(20),
        || queue_is(&dlq, |c| c.ready == 1),
    )
    .await;
    wait_until(
        "the binary message is delivered",
        Duration::from_secs(20),
        || {
            let done = endpoint.calls_of("binary") == 1;
            async move { done }
        },
    )
    .await;
    assert_eq!(
        endpoint.calls_of("big"),
        0,
        "the oversized message reached the endpoint"
    );
    let received = endpoint
        .requests
        .lock()
        .expect("lock")
        .iter()
        .find(|(_, h, _)| h.get("backstop-message-id").is_some_and(|v| v == "binary"))
        .map(|(_, _, body)| body.clone());
    assert_eq!(received, Some(binary));
    let dead = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
        .expect("a dead letter");
    let reason = dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-backstop-error").cloned());
    let reason = reason
        .and_then(|v| backstop::retry::header_str(&v))
        .unwrap_or_default();
    assert_eq!(
        reason,
        "the message is 2048 bytes, over the limit of 1024 bytes"
    );
    assert_eq!(dead.delivery.data.len(), 2048);
    let _ = connection.close(200, "done".into()).await;
    drop(_run);
    cleanup(&queue).await;
}

// ---------------------------------------------------------------------------
// Redirects, TLS, shutdown bounds and secrets.

/// A 3xx is never followed: 301/302/303 would turn the POST into a GET
/// whose 2xx acks an undelivered message, 307/308 would re-POST the body
/// elsewhere. Each is a transient failure naming the Location (redacted):
/// the retry tiers, then the DLQ; the redirect target never hears a thing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_never_followed_and_end_in_the_dlq_naming_the_location() {
    use axum::http::Method;
    // The redirect target answers 200 to anything, and counts.
    let target_hits: Arc<Mutex<Vec<(Method, String)>>> = Arc::default();
    let hits = target_hits.clone();
    let target = serve_any(
        Router::new().fallback(move |method: Method, uri: axum::http::Uri| {
            let hits = hits.clone();
            async move {
                hits.lock().expect("lock").push((method, uri.to_string()));
                StatusCode::OK
            }
        }),
    )
    .await;
    let port = target.rsplit(':').next().expect("port").to_owned();
    let location = format!("http://user:s3cret-pw@127.0.0.1:{port}/landing?token=s3cret-pw");
    // The endpoint redirects with the status the body names, every time.
    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let counted = calls.clone();
    let redirector = serve_any(Router::new().route(
        "/orders",
        post(move |headers: HeaderMap, body: Bytes| {
            let counted = counted.clone();
            let location = location.clone();
            async move {
                let id = headers
                    .get("backstop-message-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                *counted.lock().expect("lock").entry(id).or_insert(0) += 1;
                let code: u16 = std::str::from_utf8(&body)
                    .ok()
                    .and_then(|b| b.trim().parse().ok())
                    .expect("the body is a status code");
                let status = StatusCode::from_u16(code).expect("a status");
                (status, [("location", location)]).into_response()
            }
        }),
    ))
    .await;
    let queue = unique("run-redirect");
    let metrics_port = free_port();
    let _run = start_ready(
        &config_for(&queue, &format!("{redirector}/orders"), metrics_port, ""),
        metrics_port,
    )
    .await;
    let codes = [301, 302, 303, 307, 308];
    let messages: Vec<(String, String)> = codes
        .iter()
        .map(|c| (format!("redirect-{c}"), c.to_string()))
        .collect();
    publish_owned(&queue, &messages).await;
    let dlq = format!("{queue}.dlq");
    wait_dead_lettered(&queue, codes.len() as u64).await;
    // Three attempts each (the first and two tiers), none followed.
    for (id, _) in &messages {
        let n = calls.lock().expect("lock").get(id).copied().unwrap_or(0);
        assert_eq!(n, 3, "attempts of {id}");
    }
    assert_eq!(
        *target_hits.lock().expect("lock"),
        Vec::new(),
        "the redirect target was called"
    );
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let (_, text) = get(&metrics_url).await;
    let q = format!("queue=\"{queue}\"");
    let count = |outcome: &str| {
        metric_value(
            &text,
            &format!("backstop_deliveries_total{{{q},outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("acked"), 0.0, "{text}");
    assert_eq!(count("dead_lettered"), 5.0, "{text}");
    assert_eq!(count("retried"), 10.0, "{text}");
    let mut dead = drain_errors(&dlq).await;
    dead.sort();
    assert_eq!(dead.len(), codes.len());
    for ((id, error), code) in dead.iter().zip(codes) {
        assert_eq!(id, &format!("redirect-{code}"));
        assert_eq!(
            error,
            &format!(
                "the endpoint answered HTTP {code} with Location \
                 http://user:***@127.0.0.1:{port}/landing?token=***; redirects are not \
                 followed, so the message was not delivered"
            )
        );
    }
    drop(_run);
    cleanup(&queue).await;
}

/// An endpoint URL with a password and a query token: reqwest's errors
/// carry the whole URL, which must reach neither the DLQ copy's
/// `x-backstop-error` nor the process's logs, even at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_credentials_reach_neither_the_dlq_nor_the_logs() {
    let queue = unique("run-secret");
    let metrics_port = free_port();
    let closed = free_port();
    let url = format!("http://user:s3cret-pw@127.0.0.1:{closed}/x?token=s3cret-pw");
    let log_path = std::env::temp_dir().join(format!("{}.log", unique("run-secret-stderr")));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut run = start_run_logging(
        &config_for(&queue, &url, metrics_port, ""),
        "debug,lapin=off",
        log,
    );
    wait_ready(metrics_port).await;
    publish(&queue, &[("secret-1", "{}".to_owned())]).await;
    wait_dead_lettered(&queue, 1).await;
    let dead = drain_errors(&format!("{queue}.dlq")).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (id, error) = &dead[0];
    assert_eq!(id, "secret-1");
    assert!(
        error.starts_with(&format!(
            "cannot connect to the endpoint http://user:***@127.0.0.1:{closed}/x?token=***: "
        )),
        "{error}"
    );
    assert!(!error.contains("s3cret-pw"), "{error}");
    let (code, _) = terminate(&mut run, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
    let logs = std::fs::read_to_string(&log_path).expect("read the logs");
    assert!(
        logs.contains("user:***@127.0.0.1"),
        "the failure was not logged:\n{logs}"
    );
    let leaks: Vec<&str> = logs.lines().filter(|l| l.contains("s3cret-pw")).collect();
    assert!(
        leaks.is_empty(),
        "secrets in the logs:\n{}",
        leaks.join("\n")
    );
    let _ = std::fs::remove_file(&log_path);
    cleanup(&queue).await;
}

/// The `[broker]` section of a sidecar that reaches the TLS listener
/// (scripts/tls.sh) through `proxy`: the private CA and the client
/// certificate, `uri` naming the proxy's port.
fn tls_broker(uri: &str, name: &str) -> String {
    let pki = backstop_testkit::tls_dir();
    let file = |f: &str| pki.join(f).display().to_string();
    format!(
        "uri = {uri:?}\nconnection_name = {name:?}\ntls.ca = {:?}\ntls.cert = {:?}\n\
         tls.key = {:?}\n\n[reconnect]\ninitial = \"50ms\"\nmax = \"500ms\"\n",
        file("ca.pem"),
        file("client.pem"),
        file("client.key"),
    )
}

/// `backstop run` over mutual TLS through a proxy that cuts every
/// connection three times: each batch is published after a cut, so each
/// is consumed on a new TLS connection, and every message reaches the
/// endpoint. Returns the broker user the sidecar's connection logged in as.
async fn consume_over_tls_through_cuts(uri_for: impl Fn(u16) -> String) -> String {
    let proxy = backstop_testkit::FaultProxy::start(
        backstop_testkit::TLS_ADDR.parse().expect("the TLS address"),
    )
    .await
    .expect("proxy");
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-tls");
    let name = unique("backstop-run-tls");
    let metrics_port = free_port();
    let broker = tls_broker(&uri_for(proxy.addr().port()), &name);
    let _run = start_ready(
        &config_with_broker(&broker, &queue, &url, metrics_port, ""),
        metrics_port,
    )
    .await;
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let mut ids = Vec::new();
    for batch in 0..4u32 {
        let messages: Vec<(String, String)> = (0..50)
            .map(|i| (format!("tls-{batch}-{i}"), "{}".to_owned()))
            .collect();
        publish_owned(&queue, &messages).await;
        ids.extend(messages.into_iter().map(|(id, _)| id));
        wait_until(
            "the batch reached the endpoint",
            Duration::from_secs(30),
            || {
                let done = ids.iter().all(|id| endpoint.calls_of(id) >= 1);
                async move { done }
            },
        )
        .await;
        // Acked before the cut, so no delivery is repeated by it.
        wait_until("the batch is acked", Duration::from_secs(15), || {
            queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
        })
        .await;
        if batch < 3 {
            proxy.cut();
            wait_until(
                "the sidecar reconnected over TLS",
                Duration::from_secs(30),
                || {
                    let metrics_url = metrics_url.clone();
                    async move {
                        let (_, text) = get(&metrics_url).await;
                        metric_value(&text, "backstop_connection_reconnects_total")
                            >= f64::from(batch + 1)
                            && metric_value(&text, "backstop_connection_up") == 1.0
                    }
                },
            )
            .await;
        }
    }
    for id in &ids {
        assert_eq!(endpoint.calls_of(id), 1, "calls of {id}");
    }
    let connections = backstop_testkit::rabbitmqctl(&[
        "-q",
        "list_connections",
        "user",
        "ssl",
        "client_properties",
    ])
    .expect("rabbitmqctl list_connections");
    let ours = connections
        .lines()
        .find(|line| line.contains(&name))
        .unwrap_or_else(|| panic!("connection {name} not listed: {connections}"))
        .to_owned();
    let mut fields = ours.split('\t');
    let user = fields.next().unwrap_or_default().to_owned();
    assert_eq!(fields.next(), Some("true"), "not over TLS: {ours}");
    drop(_run);
    cleanup(&queue).await;
    user
}

/// `[broker] tls.*` reaches `backstop run`: the private CA and the client
/// certificate, on every reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_consumes_over_mutual_tls_through_forced_closes() {
    let user =
        consume_over_tls_through_cuts(|port| format!("amqps://guest:guest@127.0.0.1:{port}/%2f"))
            .await;
    assert_eq!(user, "guest");
}

/// The same with `auth_mechanism=external`: no password anywhere, the
/// broker takes the user from the certificate's CN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_logs_in_with_its_certificate_through_forced_closes() {
    let user = consume_over_tls_through_cuts(|port| {
        format!("amqps://127.0.0.1:{port}/%2f?auth_mechanism=external")
    })
    .await;
    assert_eq!(user, "backstop-client");
}

/// SIGTERM while the broker is unreachable (a blackholed proxy: the pulled
/// cable), with a due store row that the scanner waits to republish: the
/// process exits cleanly within its shutdown bound, claims nothing it cannot
/// re-drive, and acks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_broker_outage_exits_within_the_bound_and_acks_nothing() {
    use backstop::store::{CompensationStore, ListFilter, ManualAction, SqlStore, Status};
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-outage");
    let db = std::env::temp_dir().join(format!("{}.db", unique("run-outage-store")));
    let store_url = format!("sqlite://{}", db.display());
    let metrics_port = free_port();
    let config = |uri: &str| {
        format!(
            "[broker]\nuri = {uri:?}\nheartbeat = \"2s\"\n\n\
             [reconnect]\ninitial = \"50ms\"\nmax = \"500ms\"\n\n\
             [store]\nurl = {store_url:?}\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [[consumer]]\nqueue = \"{queue}\"\nshutdown_timeout = \"2s\"\n\
             handler.http.url = \"{url}\"\nhandler.http.timeout = \"1s\"\n\
             retry.exhausted = \"store\"\n"
        )
    };
    // A first run stores a permanently failing message.
    let mut run = start_ready(&config(&backstop_testkit::amqp_url()), metrics_port).await;
    publish(&queue, &[("stored-1", r#"{"want":"400"}"#.to_owned())]).await;
    let store = SqlStore::connect(&store_url).await.expect("the store");
    wait_until("the message is stored", Duration::from_secs(20), || {
        let store = &store;
        async move {
            let listed = store.list(&ListFilter::default()).await.expect("list");
            listed.len() == 1
        }
    })
    .await;
    let id = store.list(&ListFilter::default()).await.expect("list")[0].id;
    let (code, _) = terminate(&mut run, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
    // Due now, and five more messages wait in the queue.
    store
        .act(id, ManualAction::Retry, "test", None)
        .await
        .expect("retry");
    let waiting: Vec<(String, String)> = (0..5)
        .map(|i| (format!("waiting-{i}"), "{}".to_owned()))
        .collect();
    publish_owned(&queue, &waiting).await;

    // The second run finds its broker gone.
    let proxy = backstop_testkit::FaultProxy::start(backstop_testkit::broker_addr())
        .await
        .expect("proxy");
    proxy.blackhole();
    let uri = backstop_testkit::url_via(&backstop_testkit::amqp_url(), proxy.addr());
    let log_path = std::env::temp_dir().join(format!("{}.log", unique("run-outage-stderr")));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut run = start_run_logging(&config(&uri), "warn,lapin=off", log);
    // Up (its metrics answer; the scanners start before them), and trying
    // to reach the broker through the blackhole.
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    wait_until(
        "the run is up and waiting for its broker",
        Duration::from_secs(30),
        || {
            let (metrics, proxy) = (metrics.clone(), &proxy);
            async move { proxy.accepted() >= 1 && http_get(&metrics).await.is_some() }
        },
    )
    .await;
    // The process's own bound is the longest shutdown_timeout (2 s), the
    // drain margin (30 s) and the connection close (5 s). No session is up,
    // so no drain runs and nothing waits for the broker: 22 s is ample, with
    // a margin for a busy machine.
    let (code, took) = terminate(&mut run, Duration::from_secs(22)).await;
    let logs = std::fs::read_to_string(&log_path).expect("read the logs");
    // The scanner watches the stop signal while it waits for the broker, so
    // nothing has to be abandoned.
    assert_eq!(code, Some(0), "exit code after {took:?}:\n{logs}");
    // It takes no row before it has a publisher: the due row was never
    // claimed, so no other scanner had to wait out a lease.
    let row = store.get(id).await.expect("the row");
    assert_eq!((row.status, row.redrives), (Status::Pending, 0), "{row:?}");
    // Nothing was acked: every waiting message is back in the queue, and
    // the stored row is still there to be re-driven.
    drop(proxy);
    wait_until(
        "the waiting messages are in the queue",
        Duration::from_secs(15),
        || queue_is(&queue, |c| c.ready == 5 && c.unacked == 0),
    )
    .await;
    for (id, _) in &waiting {
        assert_eq!(endpoint.calls_of(id), 0, "{id} reached the endpoint");
    }
    let row = store.get(id).await.expect("the row");
    assert!(!row.status.is_finished(), "{row:?}");
    let _ = std::fs::remove_file(&log_path);
    let _ = std::fs::remove_file(&db);
    cleanup(&queue).await;
}
