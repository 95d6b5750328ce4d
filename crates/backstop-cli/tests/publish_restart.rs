//! The sidecar's publish endpoint through a broker restart (`rabbitmqctl
//! stop_app` / `start_app`): every request is answered 202 (confirmed or
//! spooled), and once the broker is back every message arrives, duplicates
//! bounded by the publisher's `uncertain` count. A test binary of its own:
//! it stops the broker, which no other test may see. Run it under
//! `flock /tmp/broker.lock`.

mod sidecar;

use backstop_testkit::{rabbitmqctl, unique, wait_until};
use sidecar::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

const MESSAGES: u64 = 2_000;
const CLIENTS: u64 = 4;

/// Starts the app again even if the test fails half-way.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
        let _ = rabbitmqctl(&["await_startup", "--timeout", "60"]);
    }
}

async fn rabbitmqctl_off_runtime(args: &'static [&'static str]) {
    tokio::task::spawn_blocking(move || rabbitmqctl(args))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?}: {e}"));
}

async fn metrics_text(port: u16) -> String {
    get(&format!("http://127.0.0.1:{port}/metrics")).await.1
}

/// The answers so far, shared by the clients.
#[derive(Default)]
struct Answered {
    count: AtomicU64,
    /// The first answer other than 202.
    first_refusal: std::sync::Mutex<Option<String>>,
}

/// Client `c` posts its share of the messages, one after another, each
/// once `allowed` is above its number; returns each answer (message id,
/// status, `status` field or `error`).
async fn client(
    c: u64,
    url: String,
    mut allowed: watch::Receiver<u64>,
    answered: Arc<Answered>,
) -> Vec<(String, u16, String)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client");
    let mut answers = Vec::new();
    for i in (c..MESSAGES).step_by(CLIENTS as usize) {
        allowed
            .wait_for(|allowed| *allowed > i)
            .await
            .expect("the test holds the gate");
        let id = format!("m-{i}");
        let response = http
            .post(&url)
            .header("Idempotency-Key", &id)
            .header("Content-Type", "text/plain")
            .body(format!("message {i}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {id}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.expect("the answer's body");
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the answer to {id} is not JSON ({e}): {text:?}"));
        let what = json["status"]
            .as_str()
            .or_else(|| json["error"].as_str())
            .unwrap_or_else(|| panic!("the answer to {id} names no status: {text}"))
            .to_owned();
        if status != 202 {
            let mut first = answered.first_refusal.lock().expect("lock");
            first.get_or_insert_with(|| format!("{id} answered {status}: {text}"));
        }
        answers.push((id, status, what));
        answered.count.fetch_add(1, Ordering::Relaxed);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_is_accepted_and_arrives_through_a_broker_restart() {
    let queue = unique("publish-restart");
    declare_queue(&queue).await;

    let spool = std::env::temp_dir().join(format!("{}.db", unique("publish-restart")));
    let (metrics_port, publish_port) = (free_port(), free_port());
    let config = format!(
        "[broker]\nuri = \"{}\"\nheartbeat = \"5s\"\n\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [publish]\nlisten = \"127.0.0.1:{publish_port}\"\nspool = \"{}\"\nconfirm_timeout = \"2s\"\n",
        backstop_testkit::amqp_url(),
        spool.display()
    );
    let mut run = start_run(&config);
    wait_ready(metrics_port).await;
    let url = format!("http://127.0.0.1:{publish_port}/publish/amq.default/{queue}");
    let answered = Arc::new(Answered::default());
    let (gate, allowed) = watch::channel(500);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(c, url.clone(), allowed.clone(), answered.clone())))
        .collect();
    let answered_at_least = |n: u64| {
        let answered = answered.clone();
        move || {
            let refusal = answered.first_refusal.lock().expect("lock").clone();
            if let Some(refusal) = refusal {
                panic!("every publish must be answered 202; {refusal}");
            }
            let done = answered.count.load(Ordering::Relaxed) >= n;
            async move { done }
        }
    };

    // The clients are held at a gate between the phases, so that the
    // stream cannot outrun the restart: 500 messages before it, 500 while
    // the broker stops (requests in flight when it goes), 500 while it is
    // down, 500 while it comes back (the spool drains meanwhile).
    wait_until(
        "500 answers",
        Duration::from_secs(60),
        answered_at_least(500),
    )
    .await;
    let guard = RestartGuard;
    let mut stopping = tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]));
    // While it stops, the messages go out paced, so that some are in flight
    // when the broker closes the connection.
    let stopped = loop {
        tokio::select! {
            stopped = &mut stopping => break stopped,
            _ = tokio::time::sleep(Duration::from_millis(4)) => {
                gate.send_modify(|allowed| *allowed = (*allowed + 1).min(1_000));
            }
        }
    };
    stopped.expect("task").expect("stop_app");
    gate.send_replace(1_000);
    wait_until(
        "the publisher sees the broker gone",
        Duration::from_secs(30),
        || async {
            let text = metrics_text(metrics_port).await;
            metric(&text, "backstop_publisher_connection_up") == Some(0.0)
        },
    )
    .await;
    wait_until(
        "1,000 answers",
        Duration::from_secs(60),
        answered_at_least(1_000),
    )
    .await;
    gate.send_replace(1_500);
    wait_until(
        "500 answers while the broker is down",
        Duration::from_secs(60),
        answered_at_least(1_500),
    )
    .await;
    rabbitmqctl_off_runtime(&["start_app"]).await;
    gate.send_replace(MESSAGES);
    rabbitmqctl_off_runtime(&["await_startup", "--timeout", "60"]).await;
    drop(guard);

    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.expect("a client"));
    }
    assert_eq!(answers.len() as u64, MESSAGES);
    let not_accepted: Vec<_> = answers.iter().filter(|(_, s, _)| *s != 202).collect();
    assert!(
        not_accepted.is_empty(),
        "answers other than 202: {:?}",
        &not_accepted[..not_accepted.len().min(10)]
    );
    let spooled = answers.iter().filter(|(_, _, w)| w == "spooled").count();
    let confirmed = answers.iter().filter(|(_, _, w)| w == "confirmed").count();
    assert_eq!(spooled + confirmed, MESSAGES as usize);
    assert!(spooled >= 500, "the outage was seen: spooled={spooled}");

    wait_until(
        "the spool drains once the broker is back",
        Duration::from_secs(120),
        || async {
            metric(&metrics_text(metrics_port).await, "backstop_spool_messages") == Some(0.0)
        },
    )
    .await;
    let text = metrics_text(metrics_port).await;
    let uncertain = metric_value(&text, "backstop_publish_uncertain_total") as u64;
    let drained = metric_value(&text, "backstop_spool_drained_total") as u64;
    assert_eq!(drained, spooled as u64, "{text}");

    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut total = 0u64;
    for (body, properties) in take_all(&queue).await {
        let id = properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .expect("a message id");
        let i: u64 = id
            .strip_prefix("m-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("an unexpected message id {id:?}"));
        assert_eq!(body, format!("message {i}").into_bytes());
        *seen.entry(id).or_insert(0) += 1;
        total += 1;
    }
    let connection = backstop_testkit::connect().await;
    backstop_testkit::delete_queue(&connection, &queue).await;
    let _ = connection.close(200, "checked".into()).await;
    let missing: Vec<String> = (0..MESSAGES)
        .map(|i| format!("m-{i}"))
        .filter(|id| !seen.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let duplicates = total - seen.len() as u64;
    assert!(
        duplicates <= uncertain,
        "{duplicates} duplicates but only {uncertain} uncertain publishes"
    );
    println!(
        "publish restart: {MESSAGES} answered 202 ({confirmed} confirmed, {spooled} spooled), \
         {} arrived, {duplicates} duplicates, uncertain={uncertain}",
        seen.len()
    );

    let (code, _) = terminate(&mut run, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
    let _ = std::fs::remove_file(&spool);
}
