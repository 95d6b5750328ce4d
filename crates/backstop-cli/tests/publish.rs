//! Publishing through the sidecar (`[publish]` of `backstop run`) and with
//! `backstop publish`, against the real broker. The broker stays up here;
//! an outage is a proxy of the test kit in front of it (the restart test is
//! in `publish_restart.rs`).

use crate::sidecar;
use backstop_testkit::{unique, wait_until};
use lapin::options::QueueBindOptions;
use lapin::types::{AMQPValue, FieldTable};
use sidecar::*;
use std::collections::HashSet;
use std::time::Duration;

/// A message taken from a queue.
#[derive(Debug)]
struct Taken {
    body: Vec<u8>,
    message_id: Option<String>,
    content_type: Option<String>,
    delivery_mode: Option<u8>,
    headers: FieldTable,
}

/// Every message in `queue`, taken out for good.
async fn take_messages(queue: &str) -> Vec<Taken> {
    take_all(queue)
        .await
        .into_iter()
        .map(|(body, properties)| Taken {
            body,
            message_id: properties.message_id().as_ref().map(|s| s.to_string()),
            content_type: properties.content_type().as_ref().map(|s| s.to_string()),
            delivery_mode: *properties.delivery_mode(),
            headers: properties.headers().clone().unwrap_or_default(),
        })
        .collect()
}

async fn delete(queue: &str) {
    let connection = backstop_testkit::connect().await;
    backstop_testkit::delete_queue(&connection, queue).await;
    let _ = connection.close(200, "deleted".into()).await;
}

fn client() -> reqwest::Client {
    // reqwest is built without a crypto provider (as in the sidecar).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// The status and the JSON body of an answer of the publish endpoint;
/// panics when the body is not JSON.
async fn answer_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("the answer's body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the answer {status} is not JSON ({e}): {text:?}"));
    (status, json)
}

fn publish_config(metrics_port: u16, publish: &str) -> String {
    format!(
        "[broker]\nuri = \"{}\"\nheartbeat = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [publish]\n{publish}\n",
        backstop_testkit::amqp_url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_publishes_confirmed_and_refuses_what_it_must() {
    let queue = unique("publish-endpoint");
    declare_queue(&queue).await;
    let (metrics_port, publish_port) = (free_port(), free_port());
    let config = publish_config(
        metrics_port,
        &format!(
            "listen = \"127.0.0.1:{publish_port}\"\ntoken = \"t0ken-secret\"\nmax_message_size = 1024\n"
        ),
    );
    // Debug logs to a file: neither the token nor a body may reach them.
    let log = std::env::temp_dir().join(format!("{}.log", unique("publish-endpoint")));
    let log_file = std::fs::File::create(&log).expect("the log file");
    let mut run = start_run_logging(&config, "debug,lapin=off", log_file);
    wait_ready(metrics_port).await;
    let http = client();
    let base = format!("http://127.0.0.1:{publish_port}/publish");
    let to_queue = format!("{base}/amq.default/{queue}");
    let body: &[u8] = b"{\"order\":7}\xff\x00 binary tail";

    // 202 confirmed, with the properties and headers mapped back.
    let response = http
        .post(&to_queue)
        .bearer_auth("t0ken-secret")
        .header("Content-Type", "application/json")
        .header("Backstop-Header-X-Tenant", "acme")
        .header("Idempotency-Key", "order-7")
        .body(body.to_vec())
        .send()
        .await
        .expect("POST");
    let (status, json) = answer_of(response).await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(
        json,
        serde_json::json!({"status": "confirmed", "message_id": "order-7"})
    );
    // Without an Idempotency-Key the publisher makes up an id.
    let response = http
        .post(&to_queue)
        .bearer_auth("t0ken-secret")
        .body("second")
        .send()
        .await
        .expect("POST");
    let (status, json) = answer_of(response).await;
    assert_eq!(status, 202, "{json}");
    let generated = json["message_id"].as_str().expect("an id").to_owned();
    assert!(!generated.is_empty());

    // Refused before anything is published.
    let refused = [
        // 401: no token, a wrong token.
        http.post(&to_queue).body("no token"),
        http.post(&to_queue).bearer_auth("t0ken-secreT").body("x"),
        // 413: above max_message_size.
        http.post(&to_queue)
            .bearer_auth("t0ken-secret")
            .body(vec![b'x'; 1025]),
        // 400: an Idempotency-Key over 255 bytes, an empty one; a control
        // character in the exchange; a path without a routing key.
        http.post(&to_queue)
            .bearer_auth("t0ken-secret")
            .header("Idempotency-Key", "k".repeat(256))
            .body("x"),
        http.post(&to_queue)
            .bearer_auth("t0ken-secret")
            .header("Idempotency-Key", "")
            .body("x"),
        http.post(format!("{base}/ex%0Achange/{queue}"))
            .bearer_auth("t0ken-secret")
            .body("x"),
        http.post(format!("{base}/amq.default"))
            .bearer_auth("t0ken-secret")
            .body("x"),
        // 400: a forged Backstop failure header.
        http.post(&to_queue)
            .bearer_auth("t0ken-secret")
            .header("Backstop-Header-x-backstop-original-queue", "elsewhere")
            .body("x"),
    ];
    let mut codes = Vec::new();
    for request in refused {
        let (status, json) = answer_of(request.send().await.expect("POST")).await;
        assert!(json["error"].is_string(), "{status}: {json}");
        codes.push((
            status,
            json["error"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    let want = [
        (401, "unauthorized"),
        (401, "unauthorized"),
        (413, "too_large"),
        (400, "bad_request"),
        (400, "bad_request"),
        (400, "bad_request"),
        (400, "bad_request"),
        (400, "bad_request"),
    ];
    let want: Vec<(u16, String)> = want.iter().map(|(s, e)| (*s, (*e).to_owned())).collect();
    assert_eq!(codes, want);

    // Unroutable: no queue takes it.
    let (status, json) = answer_of(
        http.post(format!("{base}/amq.default/{queue}.nobody"))
            .bearer_auth("t0ken-secret")
            .body("lost?")
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert_eq!((status, json["error"].as_str()), (422, Some("unroutable")));

    let taken = take_messages(&queue).await;
    assert_eq!(taken.len(), 2, "only the two accepted messages: {taken:?}");
    let first = &taken[0];
    assert_eq!(first.body, body);
    assert_eq!(first.message_id.as_deref(), Some("order-7"));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.delivery_mode, Some(2), "persistent");
    assert_eq!(
        first.headers.inner().get("x-tenant"),
        Some(&AMQPValue::LongString("acme".into())),
        "{:?}",
        first.headers
    );
    assert_eq!(taken[1].body, b"second");
    assert_eq!(taken[1].message_id.as_deref(), Some(generated.as_str()));

    // A routing key with '/' and '#', percent-encoded, to a named exchange.
    let routed = unique("publish-routed");
    declare_queue(&routed).await;
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_bind(
            routed.as_str().into(),
            "amq.direct".into(),
            "orders/eu#1".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let _ = connection.close(200, "bound".into()).await;
    let (status, json) = answer_of(
        http.post(format!("{base}/amq.direct/orders%2Feu%231"))
            .bearer_auth("t0ken-secret")
            .body("routed")
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert_eq!(status, 202, "{json}");
    let taken = take_messages(&routed).await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].body, b"routed");

    let (_, metrics) = get(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    assert_eq!(
        metric_value(&metrics, "backstop_publish_requests_total{code=\"202\"}"),
        3.0
    );
    assert_eq!(
        metric_value(&metrics, "backstop_publish_requests_total{code=\"401\"}"),
        2.0
    );
    assert_eq!(
        metric_value(&metrics, "backstop_published_total{outcome=\"confirmed\"}"),
        3.0
    );
    assert_eq!(
        metric_value(&metrics, "backstop_published_total{outcome=\"unroutable\"}"),
        1.0
    );
    assert!(!metrics.contains("t0ken"), "{metrics}");

    let (code, _) = terminate(&mut run, Duration::from_secs(20)).await;
    assert_eq!(code, Some(0));
    let logged = std::fs::read_to_string(&log).expect("the log");
    assert!(
        logged.contains("publish answered"),
        "debug logs are on: {logged}"
    );
    for secret in ["t0ken-secret", "\"order\":7", "binary tail"] {
        assert!(!logged.contains(secret), "{secret:?} reached the log");
    }
    let _ = std::fs::remove_file(&log);
    delete(&queue).await;
    delete(&routed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backstop_publish_sends_every_line_of_a_file() {
    let queue = unique("publish-cli");
    declare_queue(&queue).await;
    let file = std::env::temp_dir().join(format!("{}.txt", unique("publish-lines")));
    let text: String = (0..1000).map(|i| format!("line-{i}\n")).collect();
    std::fs::write(&file, text).expect("write the lines");
    let url = backstop_testkit::amqp_url();
    let file_arg = file.display().to_string();
    let (code, stdout, stderr) = tokio::task::spawn_blocking({
        let queue = queue.clone();
        move || {
            backstop(&[
                "publish",
                "--uri",
                &url,
                "--routing-key",
                &queue,
                "--file",
                &file_arg,
            ])
        }
    })
    .await
    .expect("task");
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(
        stdout.lines().last(),
        Some("publish: 1000 confirmed, 0 spooled, 0 failed"),
        "{stdout}"
    );
    let taken = take_messages(&queue).await;
    let bodies: HashSet<Vec<u8>> = taken.iter().map(|t| t.body.clone()).collect();
    let want: HashSet<Vec<u8>> = (0..1000)
        .map(|i| format!("line-{i}").into_bytes())
        .collect();
    assert_eq!(taken.len(), 1000);
    assert_eq!(bodies, want);
    let _ = std::fs::remove_file(&file);

    // An exchange that does not exist: a clear error, nothing published.
    let url = backstop_testkit::amqp_url();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        backstop(&[
            "publish",
            "--uri",
            &url,
            "--exchange",
            "backstop.no-such-exchange",
            "--routing-key",
            "x",
            "--body",
            "hello",
        ])
    })
    .await
    .expect("task");
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("exchange \"backstop.no-such-exchange\" does not exist"),
        "{stderr}"
    );
    delete(&queue).await;
}

/// Waits until `/metrics` on `port` shows `line_start` at `want`.
async fn wait_metric(port: u16, line_start: &str, want: f64) {
    let url = format!("http://127.0.0.1:{port}/metrics");
    wait_until(
        &format!("{line_start} = {want}"),
        Duration::from_secs(60),
        || {
            let url = url.clone();
            async move { metric(&get(&url).await.1, line_start) == Some(want) }
        },
    )
    .await;
}

/// POSTs `body` with `Idempotency-Key: key`; the status, the JSON answer
/// and its `Retry-After`.
async fn post_keyed(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &str,
) -> (u16, serde_json::Value, Option<String>) {
    let response = http
        .post(url)
        .header("Idempotency-Key", key)
        .body(body.to_owned())
        .send()
        .await
        .expect("POST");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, json) = answer_of(response).await;
    (status, json, retry_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_507_and_every_accepted_message_arrives() {
    let queue = unique("publish-spool-full");
    declare_queue(&queue).await;
    let proxy = backstop_testkit::FaultProxy::start(backstop_testkit::broker_addr())
        .await
        .expect("the proxy");
    let spool = std::env::temp_dir().join(format!("{}.db", unique("publish-spool")));
    let (metrics_port, publish_port) = (free_port(), free_port());
    let config = format!(
        "[broker]\nuri = \"{}\"\nheartbeat = \"5s\"\n\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [publish]\nlisten = \"127.0.0.1:{publish_port}\"\nspool = \"{}\"\nspool_max_messages = 20\n\
         confirm_timeout = \"2s\"\n",
        backstop_testkit::url_via(&backstop_testkit::amqp_url(), proxy.addr()),
        spool.display()
    );
    let mut run = start_run(&config);
    wait_ready(metrics_port).await;
    wait_metric(metrics_port, "backstop_publisher_connection_up", 1.0).await;
    let http = client();
    let url = format!("http://127.0.0.1:{publish_port}/publish/amq.default/{queue}");
    for i in 0..5 {
        let (status, json, _) = post_keyed(&http, &url, &format!("m-{i}"), "before").await;
        assert_eq!((status, json["status"].as_str()), (202, Some("confirmed")));
    }

    // The broker goes away: what it cannot take is spooled, up to the bound.
    proxy.blackhole();
    proxy.cut();
    wait_metric(metrics_port, "backstop_publisher_connection_up", 0.0).await;
    let mut refused = Vec::new();
    for i in 5..30 {
        let key = format!("m-{i}");
        let (status, json, retry_after) = post_keyed(&http, &url, &key, "during").await;
        if i < 25 {
            assert_eq!(
                (status, json["status"].as_str()),
                (202, Some("spooled")),
                "{json}"
            );
            assert_eq!(json["message_id"].as_str(), Some(key.as_str()));
        } else {
            assert_eq!(
                (status, json["error"].as_str()),
                (507, Some("spool_full")),
                "{json}"
            );
            assert_eq!(retry_after.as_deref(), Some("1"));
            refused.push(key);
        }
    }
    wait_metric(metrics_port, "backstop_spool_messages", 20.0).await;
    let (_, metrics) = get(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    assert_eq!(
        metric_value(&metrics, "backstop_published_total{outcome=\"spool_full\"}"),
        5.0
    );
    assert!(metric_value(&metrics, "backstop_spool_bytes") > 0.0);
    assert_eq!(
        metric_value(&metrics, "backstop_publish_requests_total{code=\"507\"}"),
        5.0
    );

    // Back: the spool drains, in order, and new publishes are confirmed.
    proxy.restore();
    wait_metric(metrics_port, "backstop_spool_messages", 0.0).await;
    let (status, json, _) = post_keyed(&http, &url, "m-after", "after").await;
    assert_eq!(
        (status, json["status"].as_str()),
        (202, Some("confirmed")),
        "{json}"
    );

    let taken = take_messages(&queue).await;
    let ids: Vec<String> = taken
        .iter()
        .map(|t| t.message_id.clone().expect("a message id"))
        .collect();
    let mut want: Vec<String> = (0..25).map(|i| format!("m-{i}")).collect();
    want.push("m-after".into());
    assert_eq!(ids, want, "every 202 arrived once, in order; no 507 did");
    for key in &refused {
        assert!(!ids.contains(key));
    }
    let (code, _) = terminate(&mut run, Duration::from_secs(20)).await;
    assert_eq!(code, Some(0));
    delete(&queue).await;
    let _ = std::fs::remove_file(&spool);
}

/// SIGTERM while a publish is in flight: the listener closes at once, the
/// request in flight is still answered (and its message published), then
/// the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_the_publish_in_flight_and_accepts_no_more() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let queue = unique("publish-sigterm");
    declare_queue(&queue).await;
    let (metrics_port, publish_port) = (free_port(), free_port());
    let config = publish_config(
        metrics_port,
        &format!("listen = \"127.0.0.1:{publish_port}\"\n"),
    );
    let mut run = start_run(&config);
    wait_ready(metrics_port).await;
    let address = format!("127.0.0.1:{publish_port}");

    // A request whose body is not all sent yet: its handler is waiting.
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let head = format!(
        "POST /publish/amq.default/{queue} HTTP/1.1\r\nHost: {address}\r\n\
         Idempotency-Key: in-flight\r\nContent-Length: 9\r\n\r\nin-"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    wait_metric(metrics_port, "backstop_publish_requests_in_flight", 1.0).await;

    let pid = run.0.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    wait_until(
        "the publish listener to stop accepting",
        Duration::from_secs(10),
        || {
            let address = address.clone();
            async move { tokio::net::TcpStream::connect(&address).await.is_err() }
        },
    )
    .await;

    stream.write_all(b"flight").await.expect("write the rest");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"));
    assert_eq!(
        json,
        serde_json::json!({"status": "confirmed", "message_id": "in-flight"})
    );
    let (code, _) = wait_exit(&mut run, Duration::from_secs(20)).await;
    assert_eq!(code, Some(0));
    let taken = take_messages(&queue).await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].body, b"in-flight");
    delete(&queue).await;
}
