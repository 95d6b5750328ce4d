//! Publishing through the sidecar (`[publish]` of `backstop run`) and with
//! `backstop publish`, against the real broker. The broker stays up here;
//! an outage is a proxy of the test kit in front of it (the restart test is
//! in `publish_restart.rs`).

mod sidecar;

use backstop_testkit::{unique, wait_until};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
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

async fn declare(queue: &str) {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the queue");
    let _ = connection.close(200, "declared".into()).await;
}

/// Every message in `queue`, taken out for good.
async fn take_all(queue: &str) -> Vec<Taken> {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let properties = &message.delivery.properties;
        out.push(Taken {
            body: message.delivery.data.clone(),
            message_id: properties.message_id().as_ref().map(|s| s.to_string()),
            content_type: properties.content_type().as_ref().map(|s| s.to_string()),
            delivery_mode: *properties.delivery_mode(),
            headers: properties.headers().clone().unwrap_or_default(),
        });
    }
    let _ = connection.close(200, "taken".into()).await;
    out
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
    declare(&queue).await;
    let (metrics_port, publish_port) = (free_port(), free_port());
    let config = publish_config(
        metrics_port,
        &format!(
            "listen = \"127.0.0.1:{publish_port}\"\ntoken = \"t0ken-secret\"\nmax_message_size = 1024\n"
        ),
    );
    let mut run = start_run(&config);
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
    ];
    let mut codes = Vec::new();
    for request in refused {
        let (status, json) = answer_of(request.send().await.expect("POST")).await;
        assert!(json["error"].is_string(), "{status}: {json}");
        codes.push((status, json["error"].as_str().unwrap_or_default().to_owned()));
    }
    let want = [
        (401, "unauthorized"),
        (401, "unauthorized"),
        (413, "too_large"),
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

    let taken = take_all(&queue).await;
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
    declare(&routed).await;
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
    let taken = take_all(&routed).await;
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
    delete(&queue).await;
    delete(&routed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backstop_publish_sends_every_line_of_a_file() {
    let queue = unique("publish-cli");
    declare(&queue).await;
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
    let taken = take_all(&queue).await;
    let bodies: HashSet<Vec<u8>> = taken.iter().map(|t| t.body.clone()).collect();
    let want: HashSet<Vec<u8>> = (0..1000).map(|i| format!("line-{i}").into_bytes()).collect();
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
