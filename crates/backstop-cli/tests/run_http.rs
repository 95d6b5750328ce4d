//! `backstop run` and what it sends to, and reads from, its endpoint:
//! configured headers with `${ENV}` values (never logged or shown), TLS and
//! mutual TLS to an HTTPS endpoint, the Dapr response contract, and
//! `Retry-After` as an HTTP date. Real broker, real binary.

use crate::sidecar;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use backstop_testkit::{queue_is, tls_dir, unique, wait_until};
use sidecar::*;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// A test endpoint: answers by the `want` field of the JSON body on the
/// first call for a message id, by `then` (default 200, empty) after.
/// Records every request.
#[derive(Clone, Default)]
struct Endpoint {
    requests: Arc<Mutex<Vec<(Instant, HeaderMap)>>>,
    calls: Arc<Mutex<HashMap<String, u32>>>,
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

    /// When each request for `id` came, and its headers.
    fn requests_of(&self, id: &str) -> Vec<(Instant, HeaderMap)> {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, h)| {
                h.get("backstop-message-id")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v == id)
            })
            .cloned()
            .collect()
    }
}

/// A 200 answer with `body` as JSON.
fn json(body: &str) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_owned(),
    )
        .into_response()
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
        .push((Instant::now(), headers));
    let want: serde_json::Value =
        serde_json::from_slice(&body).expect("the test publishes JSON bodies");
    let field = |name: &str| want.get(name).and_then(|w| w.as_str()).map(str::to_owned);
    let now = if call == 1 {
        field("want")
    } else {
        field("then")
    };
    match now.as_deref().unwrap_or("200") {
        "500" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        "dapr-RETRY" => json(r#"{"status":"RETRY"}"#),
        "dapr-DROP" => json(r#"{"status":"DROP"}"#),
        "dapr-Status-DROP" => json(r#"{"Status":"DROP"} as Go reads it"#),
        "dapr-SUCCESS" => json(r#"{"status":"SUCCESS"}"#),
        "dapr-LATER" => json(r#"{"status":"LATER"}"#),
        "text" => (StatusCode::OK, "OK, done").into_response(),
        "503-date-in-4s" => {
            let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(4));
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", date)]).into_response()
        }
        "503-date-past" => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "Sat, 01 Jan 2000 00:00:00 GMT")],
        )
            .into_response(),
        _ => StatusCode::OK.into_response(),
    }
}

fn app() -> (Endpoint, Router) {
    let endpoint = Endpoint::default();
    let app = Router::new()
        .route("/orders", post(answer))
        .with_state(endpoint.clone());
    (endpoint, app)
}

/// An endpoint over plain HTTP; returns it and its URL.
async fn start_endpoint() -> (Endpoint, String) {
    let (endpoint, app) = app();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the endpoint");
    let url = format!("http://{}/orders", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (endpoint, url)
}

/// A TCP listener whose connections are TLS: a failed handshake is
/// counted and the next connection taken.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    failed_handshakes: Arc<Mutex<Vec<String>>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => self
                    .failed_handshakes
                    .lock()
                    .expect("lock")
                    .push(e.to_string()),
                Err(_) => self
                    .failed_handshakes
                    .lock()
                    .expect("lock")
                    .push("handshake timed out".into()),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An HTTPS endpoint with the test PKI's server certificate (scripts/tls.sh:
/// IP 127.0.0.1, signed by ca.pem) that requires a client certificate
/// signed by ca.pem. Returns it, its URL and its failed handshakes.
async fn start_mtls_endpoint() -> (Endpoint, String, Arc<Mutex<Vec<String>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pki = tls_dir();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.join("server.pem"))
        .expect("server.pem (scripts/tls.sh)")
        .collect::<Result<_, _>>()
        .expect("server.pem parses");
    let key = PrivateKeyDer::from_pem_file(pki.join("server.key")).expect("server.key");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.join("ca.pem")).expect("ca.pem") {
        roots.add(ca.expect("ca.pem parses")).expect("a CA");
    }
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .expect("server certificate");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the endpoint");
    let url = format!("https://{}/orders", tcp.local_addr().expect("addr"));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        failed_handshakes: failed.clone(),
    };
    let (endpoint, app) = app();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (endpoint, url, failed)
}

/// `backstop run -c <config>` with the log filter `filter`, its stderr in
/// `log`, and `env` set.
fn run_with_env(
    config: &str,
    filter: &str,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> Running {
    let path = write_config(config);
    let stderr = std::fs::File::create(log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["run", "-c", &path.display().to_string()])
        .env_remove("BACKSTOP_BROKER_URI")
        .env("RUST_LOG", filter)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start backstop run");
    Running(child)
}

fn log_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}.log", unique(name)))
}

/// The `backstop_deliveries_total` of `queue` for `outcome`.
async fn deliveries(metrics_port: u16, queue: &str, outcome: &str) -> f64 {
    let (_, text) = get(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    metric(
        &text,
        &format!("backstop_deliveries_total{{queue=\"{queue}\",outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(-1.0)
}

const TOKEN: &str = "tok-7f3a9c1e5b2d48e0";

/// `handler.http.headers` with a `${VAR}` value reaches the endpoint, on
/// every attempt; the value is in neither the debug log (which has the
/// failed attempt's reason in it) nor `config check`'s output, which shows
/// `***`. An unset variable is a config error naming the key and the
/// variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_headers_reach_the_endpoint_and_never_the_logs_or_config_check() {
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-headers");
    let port = free_port();
    let config = config_for(
        &queue,
        &url,
        port,
        "handler.http.headers = { Authorization = \"Bearer ${BACKSTOP_TEST_ORDERS_TOKEN}\", \
         X-Api-Key = \"key-${BACKSTOP_TEST_ORDERS_TOKEN}\" }\n",
    );
    let log = log_path("run-headers");
    let env = [("BACKSTOP_TEST_ORDERS_TOKEN", TOKEN)];
    let mut run = run_with_env(&config, "debug,lapin=off", &log, &env);
    wait_ready(port).await;
    publish(&queue, &[("h-1", r#"{"want":"500"}"#.to_owned())]).await;
    wait_until("the retry is acked", Duration::from_secs(20), || {
        let calls = endpoint.calls_of("h-1");
        let queue = queue.clone();
        async move { calls == 2 && queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await }
    })
    .await;
    let requests = endpoint.requests_of("h-1");
    assert_eq!(requests.len(), 2);
    for (_, headers) in requests {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(header("authorization"), Some(format!("Bearer {TOKEN}")));
        assert_eq!(header("x-api-key"), Some(format!("key-{TOKEN}")));
        assert_eq!(header("backstop-queue").as_deref(), Some(queue.as_str()));
    }
    let (code, _) = terminate(&mut run, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
    let logs = std::fs::read_to_string(&log).expect("read the log");
    assert!(
        logs.contains("HTTP 500"),
        "the failed attempt was not logged:\n{logs}"
    );
    assert!(!logs.contains(TOKEN), "the token is in the log:\n{logs}");

    let file = write_config(&config);
    let check = |env: &[(&str, &str)]| {
        let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
            .args(["config", "check", "-c", &file.display().to_string()])
            .env_remove("BACKSTOP_BROKER_URI")
            .env_remove("BACKSTOP_TEST_ORDERS_TOKEN")
            .envs(env.iter().copied())
            .output()
            .expect("config check");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (code, shown) = check(&env);
    assert_eq!(code, Some(0), "{shown}");
    assert!(!shown.contains(TOKEN), "the token is shown:\n{shown}");
    assert!(shown.contains("Authorization = \"***\""), "{shown}");
    assert!(shown.contains("X-Api-Key = \"***\""), "{shown}");
    let (code, error) = check(&[]);
    assert_eq!(code, Some(2), "{error}");
    assert!(
        error.contains("consumer[0].handler.http.headers.Authorization")
            && error.contains("BACKSTOP_TEST_ORDERS_TOKEN is not set"),
        "{error}"
    );
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&file);
    cleanup(&queue).await;
}

/// `handler.http.tls`: with the test CA and the client certificate the
/// sidecar delivers to an endpoint that requires client authentication;
/// with another CA the endpoint's certificate is untrusted, which is a
/// transient failure: the message goes through both retry tiers and ends
/// in the DLQ, its reason (and the log) saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_tls_trusts_the_ca_presents_the_client_certificate_and_retries_an_untrusted_one() {
    let (endpoint, url, failed) = start_mtls_endpoint().await;
    let pki = tls_dir();
    let file = |f: &str| pki.join(f).display().to_string();

    let queue = unique("run-mtls");
    let port = free_port();
    let tls = format!(
        "handler.http.tls.ca = {:?}\nhandler.http.tls.cert = {:?}\nhandler.http.tls.key = {:?}\n",
        file("ca.pem"),
        file("client.pem"),
        file("client.key")
    );
    let log = log_path("run-mtls");
    let run = run_with_env(
        &config_for(&queue, &url, port, &tls),
        "info,lapin=off",
        &log,
        &[],
    );
    wait_ready(port).await;
    publish(
        &queue,
        &[("m-1", "{}".to_owned()), ("m-2", "{}".to_owned())],
    )
    .await;
    wait_until(
        "both are acked over mutual TLS",
        Duration::from_secs(20),
        || {
            let queue = queue.clone();
            async move { queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await }
        },
    )
    .await;
    assert_eq!((endpoint.calls_of("m-1"), endpoint.calls_of("m-2")), (1, 1));
    assert_eq!(deliveries(port, &queue, "acked").await, 2.0);
    drop(run);
    cleanup(&queue).await;
    assert!(
        failed.lock().expect("lock").is_empty(),
        "{:?}",
        failed.lock().expect("lock")
    );

    // Another CA: the endpoint's certificate is not trusted.
    let queue = unique("run-untrusted");
    let port = free_port();
    let tls = format!("handler.http.tls.ca = {:?}\n", file("other-ca.pem"));
    let log = log_path("run-untrusted");
    let mut run = run_with_env(
        &config_for(&queue, &url, port, &tls),
        "debug,lapin=off",
        &log,
        &[],
    );
    wait_ready(port).await;
    publish(&queue, &[("u-1", "{}".to_owned())]).await;
    wait_dead_lettered(&queue, 1).await;
    assert_eq!(
        endpoint.calls_of("u-1"),
        0,
        "delivered over an untrusted connection"
    );
    assert_eq!(deliveries(port, &queue, "retried").await, 2.0, "both tiers");
    assert_eq!(deliveries(port, &queue, "dead_lettered").await, 1.0);
    assert_eq!(deliveries(port, &queue, "acked").await, 0.0);
    let dead = drain_errors(&format!("{queue}.dlq")).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (id, error) = &dead[0];
    assert_eq!(id, "u-1");
    assert!(
        error.starts_with(&format!("cannot connect to the endpoint {url}"))
            && error.contains("UnknownIssuer"),
        "{error}"
    );
    let (code, _) = terminate(&mut run, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
    let logs = std::fs::read_to_string(&log).expect("read the log");
    assert!(
        logs.contains("UnknownIssuer"),
        "the log does not say why:\n{logs}"
    );
    let _ = std::fs::remove_file(&log);
    cleanup(&queue).await;
}

/// `handler.http.response = "dapr"`: RETRY is retried (then acked on
/// SUCCESS), DROP (also as `{"Status":"DROP"}` with trailing text, as Go's
/// decoder reads it) ends in the DLQ as "dropped by the endpoint", SUCCESS,
/// an empty body and a text body ack, an unknown status is retried. A
/// consumer without the option ignores the body: its DROP is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dapr_contract_retries_drops_and_acks_as_the_body_says() {
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-dapr");
    let plain = unique("run-plain");
    let port = free_port();
    let config = config_for(
        &queue,
        &url,
        port,
        &format!(
            "handler.http.response = \"dapr\"\n\n[[consumer]]\nqueue = \"{plain}\"\n\
             handler.http.url = \"{url}\"\nretry.delays = [\"300ms\"]\n"
        ),
    );
    let run = start_ready(&config, port).await;
    let cases = [
        (
            "d-retry",
            r#"{"want":"dapr-RETRY","then":"dapr-SUCCESS"}"#,
            2,
        ),
        ("d-unknown", r#"{"want":"dapr-LATER"}"#, 2),
        ("d-drop", r#"{"want":"dapr-DROP"}"#, 1),
        ("d-drop-case", r#"{"want":"dapr-Status-DROP"}"#, 1),
        ("d-success", r#"{"want":"dapr-SUCCESS"}"#, 1),
        ("d-empty", r#"{"want":"200"}"#, 1),
        ("d-text", r#"{"want":"text"}"#, 1),
    ];
    let messages: Vec<(&str, String)> = cases
        .iter()
        .map(|(id, b, _)| (*id, (*b).to_owned()))
        .collect();
    publish(&queue, &messages).await;
    publish(&plain, &[("p-drop", r#"{"want":"dapr-DROP"}"#.to_owned())]).await;
    wait_dead_lettered(&queue, 2).await;
    wait_until("every message is settled", Duration::from_secs(20), || {
        let (queue, plain) = (queue.clone(), plain.clone());
        async move {
            queue_is(&queue, |c| c.ready == 0 && c.unacked == 0).await
                && queue_is(&plain, |c| c.ready == 0 && c.unacked == 0).await
        }
    })
    .await;
    wait_until("the acks are counted", Duration::from_secs(10), || {
        let queue = queue.clone();
        async move { deliveries(port, &queue, "acked").await == 5.0 }
    })
    .await;
    for (id, _, calls) in cases {
        assert_eq!(endpoint.calls_of(id), calls, "calls of {id}");
    }
    assert_eq!(deliveries(port, &queue, "retried").await, 2.0);
    assert_eq!(deliveries(port, &queue, "dead_lettered").await, 2.0);
    assert_eq!(endpoint.calls_of("p-drop"), 1);
    assert_eq!(deliveries(port, &plain, "acked").await, 1.0);
    assert_eq!(deliveries(port, &plain, "dead_lettered").await, 0.0);
    let mut dead = drain_errors(&format!("{queue}.dlq")).await;
    dead.sort();
    assert_eq!(
        dead,
        vec![
            ("d-drop".to_owned(), "dropped by the endpoint".to_owned()),
            (
                "d-drop-case".to_owned(),
                "dropped by the endpoint".to_owned()
            )
        ]
    );
    drop(run);
    cleanup(&queue).await;
    cleanup(&plain).await;
}

/// `Retry-After` as an HTTP date 4 s ahead holds the retry for the longest
/// tier (3 s) rather than the first (300 ms); a date in the past means now,
/// the first tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_date_in_the_future_delays_the_retry() {
    let (endpoint, url) = start_endpoint().await;
    let queue = unique("run-retry-date");
    let port = free_port();
    let run = start_ready(&config_for(&queue, &url, port, ""), port).await;
    publish(
        &queue,
        &[
            ("future", r#"{"want":"503-date-in-4s"}"#.to_owned()),
            ("past", r#"{"want":"503-date-past"}"#.to_owned()),
        ],
    )
    .await;
    wait_until("both retries came", Duration::from_secs(20), || {
        let done = endpoint.calls_of("future") == 2 && endpoint.calls_of("past") == 2;
        async move { done }
    })
    .await;
    let gap = |id: &str| {
        let r = endpoint.requests_of(id);
        r[1].0.duration_since(r[0].0)
    };
    assert!(
        gap("future") >= Duration::from_millis(2900),
        "{:?}",
        gap("future")
    );
    assert!(gap("past") < Duration::from_secs(2), "{:?}", gap("past"));
    drop(run);
    cleanup(&queue).await;
}
