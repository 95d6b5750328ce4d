//! `backstop dlq` against the real broker, run as a user would.

use backstop::connection::{ConnectionConfig, ConnectionSupervisor};
use backstop::consumer::{Consumer, ConsumerConfig};
use backstop::handler::{Delivery, Outcome, handler_fn};
use backstop::retry::{self, RetryPolicy};
use backstop::topology::{Binding, Exchange, Queue, Topology};
use backstop_testkit::{
    amqp_url, connect, delete_queue, publish, queue_counts, queue_is, unique, wait_until,
};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

fn backstop(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(args)
        .env("BACKSTOP_AMQP_URL", amqp_url())
        .env_remove("RUST_LOG")
        .output()
        .expect("run backstop");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn depth(queue: &str) -> u64 {
    queue_counts(queue).map_or_else(
        || panic!("{queue} does not exist: its depth is not 0"),
        |c| c.ready + c.unacked,
    )
}

/// Declares `queue` and parks `n` messages in `queue.dlq` through a real
/// consumer whose handler fails them permanently.
async fn park(queue: &str, n: u64) -> String {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    Topology::new()
        .queue(Queue::classic(queue))
        .apply(&channel)
        .await
        .expect("declare");
    publish(&connection, queue, n, "m", |i| {
        format!("{{\"n\":{i}}}").into_bytes()
    })
    .await;
    fail_all(queue, Topology::new().queue(Queue::classic(queue)), n).await
}

/// Consumes `queue` (declared by `topology`) with a handler that fails every
/// message permanently, until `n` are parked in `queue.dlq`; returns the DLQ.
async fn fail_all(queue: &str, topology: Topology, n: u64) -> String {
    let dlq = RetryPolicy::dead_letter_queue(queue);
    let supervisor =
        ConnectionSupervisor::start(ConnectionConfig::new(amqp_url())).expect("supervisor");
    let consumer = Consumer::new(
        supervisor.clone(),
        ConsumerConfig::new(queue)
            .topology(topology)
            .retry(RetryPolicy::new()),
        handler_fn(|_: Delivery| async { Outcome::reject("bad order") }),
    )
    .spawn()
    .expect("consumer");
    wait_until("all parked", Duration::from_secs(60), || {
        let parked = consumer.stats().dead_lettered;
        async move { parked == n }
    })
    .await;
    consumer.shutdown().await.expect("shutdown");
    supervisor.close().await;
    dlq
}

/// Every message id in `queue`, taken out for good.
async fn drain_ids(queue: &str) -> Vec<String> {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        ids.push(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_the_failure_headers_and_leaves_every_message() {
    let queue = unique("dlq-list");
    let dlq = park(&queue, 5).await;
    assert_eq!(depth(&dlq), 5);

    let (code, stdout, stderr) = backstop(&["dlq", "list", &dlq, "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 5);
    for m in listed {
        assert_eq!(m["error"], "bad order");
        assert_eq!(m["error_kind"], "permanent");
        assert_eq!(m["attempts"], 1);
        assert_eq!(m["original_routing_key"], queue.as_str());
        assert!(m["dead_lettered_at"].is_string());
    }
    assert!(stderr.contains("listed=5 kept=5"), "{stderr}");

    let (code, stdout, _) = backstop(&["dlq", "list", &dlq, "--limit", "2"]);
    assert_eq!(code, 0);
    // Copies are parked concurrently over several confirm channels, so the
    // DLQ's order is not the original one: any two of the five.
    let shown = (0..5)
        .filter(|i| stdout.contains(&format!("m-{i} ")))
        .count();
    assert_eq!(shown, 2, "{stdout}");
    assert!(stdout.contains("bad order"), "{stdout}");
    wait_until(
        "the listed messages to be back",
        Duration::from_secs(10),
        || {
            let dlq = dlq.clone();
            async move { queue_counts(&dlq).is_some_and(|c| c.ready == 5 && c.unacked == 0) }
        },
    )
    .await;
    let connection = connect().await;
    delete_queue(&connection, &queue).await;
    delete_queue(&connection, &dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_moves_everything_back_and_it_is_processed() {
    let queue = unique("dlq-replay");
    let dlq = park(&queue, 20).await;
    let (code, _, stderr) = backstop(&["dlq", "replay", &dlq]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("moved=20 kept=0"), "{stderr}");
    assert_eq!(depth(&dlq), 0);
    assert_eq!(depth(&queue), 20);

    // Replayed messages start over: a consumer that now succeeds takes them all.
    let supervisor =
        ConnectionSupervisor::start(ConnectionConfig::new(amqp_url())).expect("supervisor");
    let consumer = Consumer::new(
        supervisor.clone(),
        ConsumerConfig::new(&queue)
            .topology(Topology::new().queue(Queue::classic(&queue)))
            .retry(RetryPolicy::new()),
        handler_fn(|d: Delivery| async move {
            assert!(d.header(retry::ATTEMPT_HEADER).is_none());
            assert!(d.header(retry::ERROR_HEADER).is_none());
            Outcome::Ack
        }),
    )
    .spawn()
    .expect("consumer");
    wait_until(
        "all replayed messages processed",
        Duration::from_secs(30),
        || {
            let handled = consumer.stats().handled;
            async move { handled == 20 }
        },
    )
    .await;
    let report = consumer.shutdown().await.expect("shutdown");
    assert_eq!(report.dead_lettered, 0);
    supervisor.close().await;
    let connection = connect().await;
    delete_queue(&connection, &queue).await;
    delete_queue(&connection, &dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_another_destination_and_killed_halfway_loses_nothing() {
    let queue = unique("dlq-kill");
    let target = unique("dlq-kill-target");
    let n = 4000u64;
    let dlq = park(&queue, n).await;
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    backstop_testkit::declare_durable(&channel, &target)
        .await
        .expect("declare target");

    let mut child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        // Paced to 400/s: the 4,000 messages take 10 s, so the kill below
        // (once 200 have moved) lands half-way, not after the end.
        .args([
            "dlq",
            "replay",
            &dlq,
            "--to",
            &format!(":{target}"),
            "--rate",
            "400",
        ])
        .env("BACKSTOP_AMQP_URL", amqp_url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start replay");
    wait_until(
        "the replay to be under way",
        Duration::from_secs(60),
        || {
            let target = target.clone();
            async move { depth(&target) >= 200 }
        },
    )
    .await;
    child.kill().expect("kill -9 the replay");
    let _ = child.wait();
    let left = depth(&dlq);
    assert!(left > 0, "the replay must have been stopped half-way");

    let mut ids: Vec<String> = drain_ids(&target).await;
    let moved = ids.len();
    ids.extend(drain_ids(&dlq).await);
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len() as u64, n, "moved {moved}, left {left}");
    delete_queue(&connection, &queue).await;
    delete_queue(&connection, &dlq).await;
    delete_queue(&connection, &target).await;
}

/// Publishes one persistent message to `exchange` with a confirm.
async fn publish_to(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    properties: lapin::BasicProperties,
) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            b"{\"order\":7}",
            properties.with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker nacked the publish");
}

/// Takes the one message of `queue` for good; panics unless there is exactly one.
async fn take_only(channel: &lapin::Channel, queue: &str) -> lapin::message::BasicGetMessage {
    let get = || async {
        channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
    };
    let message = get().await.unwrap_or_else(|| panic!("{queue} is empty"));
    assert!(get().await.is_none(), "{queue} held more than one message");
    message
}

fn header<'a>(message: &'a lapin::message::BasicGetMessage, key: &str) -> Option<&'a AMQPValue> {
    message
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key))
}

/// Replays `dlq` with no `--to` and waits for its one message in `queue`.
async fn replay_one_into(dlq: &str, queue: &str) {
    let (code, _, stderr) = backstop(&["dlq", "replay", dlq]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("moved=1 kept=0"), "{stderr}");
    let queue = queue.to_owned();
    wait_until(
        "the copy is back in its queue",
        Duration::from_secs(10),
        || queue_is(&queue, |c| c.ready == 1),
    )
    .await;
}

/// A message that failed in one of several queues bound to a topic (or
/// fanout) exchange goes back to that queue alone: the other queues already
/// had it. Both for a message Backstop dead-lettered
/// (`x-backstop-original-queue`) and one the broker dead-lettered itself
/// (`x-death`); the copy carries no `x-death`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_goes_back_to_the_queue_it_failed_in_not_to_its_exchange() {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    // Backstop dead-lettered it: orders are published to a topic exchange
    // that feeds two queues, and A's consumer fails them.
    let topic = unique("dlq-topic");
    let (a, b) = (unique("dlq-topic-a"), unique("dlq-topic-b"));
    let topology = Topology::new()
        .exchange(Exchange::topic(&topic))
        .queue(Queue::classic(&a))
        .queue(Queue::classic(&b))
        .binding(Binding::queue(&a).to(&topic).routing_key("order.*"))
        .binding(Binding::queue(&b).to(&topic).routing_key("order.*"));
    topology.apply(&channel).await.expect("declare");
    publish_to(
        &channel,
        &topic,
        "order.created",
        lapin::BasicProperties::default().with_message_id("topic-1".into()),
    )
    .await;
    // B handled its copy.
    take_only(&channel, &b).await;
    let a_dlq = fail_all(&a, topology, 1).await;
    replay_one_into(&a_dlq, &a).await;
    assert_eq!(depth(&b), 0, "B already had the message and got it again");
    let back = take_only(&channel, &a).await;
    assert!(header(&back, retry::ERROR_HEADER).is_none());

    // The broker dead-lettered it: C rejects it without requeue and its
    // x-dead-letter-* arguments move it to C.dlq with an x-death entry.
    let fanout = unique("dlq-fanout");
    let (c, d) = (unique("dlq-fanout-c"), unique("dlq-fanout-d"));
    let c_dlq = RetryPolicy::dead_letter_queue(&c);
    Topology::new()
        .exchange(Exchange::fanout(&fanout))
        .queue(Queue::classic(&c).dead_letter_to_dlq())
        .queue(Queue::classic(&c_dlq))
        .queue(Queue::classic(&d))
        .binding(Binding::queue(&c).to(&fanout))
        .binding(Binding::queue(&d).to(&fanout))
        .apply(&channel)
        .await
        .expect("declare");
    publish_to(
        &channel,
        &fanout,
        "any",
        lapin::BasicProperties::default().with_message_id("fanout-1".into()),
    )
    .await;
    take_only(&channel, &d).await;
    let failing = channel
        .basic_get(c.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
        .expect("the message in C");
    channel
        .basic_reject(
            failing.delivery.delivery_tag,
            lapin::options::BasicRejectOptions { requeue: false },
        )
        .await
        .expect("reject");
    wait_until(
        "the broker dead-lettered it",
        Duration::from_secs(10),
        || queue_is(&c_dlq, |q| q.ready == 1),
    )
    .await;
    replay_one_into(&c_dlq, &c).await;
    assert_eq!(depth(&d), 0, "D already had the message and got it again");
    let back = take_only(&channel, &c).await;
    assert!(
        header(&back, "x-death").is_none(),
        "the copy kept the broker's x-death: {:?}",
        back.delivery.properties.headers()
    );
    assert_eq!(
        back.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some("fanout-1")
    );
    for queue in [&a, &b, &a_dlq, &c, &d, &c_dlq] {
        delete_queue(&connection, queue).await;
    }
    for exchange in [&topic, &fanout] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
}

/// A DLQ message that carries a per-message TTL (an older copy, or one
/// parked by hand) is replayed without `expiration`: the copy outlives the
/// TTL in its queue, and the original value is kept in a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_copy_does_not_expire() {
    // Long enough for the replay to take the message before it expires in
    // the DLQ itself, on a loaded machine.
    const TTL_MS: u64 = 3000;
    let queue = unique("dlq-ttl");
    let dlq = RetryPolicy::dead_letter_queue(&queue);
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    Topology::new()
        .queue(Queue::classic(&queue))
        .queue(Queue::classic(&dlq))
        .apply(&channel)
        .await
        .expect("declare");
    let mut headers = FieldTable::default();
    headers.insert(
        retry::ORIGINAL_QUEUE_HEADER.into(),
        AMQPValue::LongString(queue.as_str().into()),
    );
    headers.insert(
        retry::ORIGINAL_EXCHANGE_HEADER.into(),
        AMQPValue::LongString("".into()),
    );
    headers.insert(
        retry::ORIGINAL_ROUTING_KEY_HEADER.into(),
        AMQPValue::LongString(queue.as_str().into()),
    );
    headers.insert(
        retry::ERROR_HEADER.into(),
        AMQPValue::LongString("bad order".into()),
    );
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(4));
    publish_to(
        &channel,
        "",
        &dlq,
        lapin::BasicProperties::default()
            .with_message_id("ttl-1".into())
            .with_expiration(TTL_MS.to_string().into())
            .with_headers(headers),
    )
    .await;
    let (code, _, stderr) = backstop(&["dlq", "replay", &dlq]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("moved=1 kept=0"), "{stderr}");
    let replayed = std::time::Instant::now();
    // Only the passing of time can show that nothing expires: wait out the
    // TTL with a margin, then the copy must still be there.
    tokio::time::sleep(Duration::from_millis(TTL_MS + 1000)).await;
    assert!(replayed.elapsed() > Duration::from_millis(TTL_MS));
    assert_eq!(depth(&queue), 1, "the replayed copy expired out of {queue}");
    let back = take_only(&channel, &queue).await;
    assert_eq!(back.delivery.properties.expiration(), &None);
    assert_eq!(
        header(&back, retry::ORIGINAL_EXPIRATION_HEADER).and_then(retry::header_str),
        Some(TTL_MS.to_string())
    );
    assert!(header(&back, "x-delivery-count").is_none());
    assert!(header(&back, retry::ERROR_HEADER).is_none());
    delete_queue(&connection, &queue).await;
    delete_queue(&connection, &dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_only_the_old_ones() {
    let dlq = unique("dlq-purge");
    let queue = unique("dlq-purge-src");
    let aged = |id: &'static str, age_ms: u64| Parked {
        age_ms: Some(age_ms),
        ..parked(id, &queue, "x")
    };
    park_in_order(
        &dlq,
        &[
            aged("old-1", 7_200_000),
            aged("new-1", 0),
            aged("old-2", 3_700_000),
            aged("new-2", 60_000),
        ],
    )
    .await;
    let (code, _, stderr) = backstop(&["dlq", "purge", &dlq, "--older-than", "1h"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("purged=2 kept=2"), "{stderr}");
    let mut left = drain_ids(&dlq).await;
    left.sort();
    assert_eq!(left, ["new-1", "new-2"]);
    delete_queues(&[&dlq, &queue]).await;
}

#[test]
fn a_missing_queue_exits_2_for_every_command() {
    let missing = unique("no-such-dlq");
    for args in [
        vec!["dlq", "list", missing.as_str()],
        vec!["dlq", "replay", missing.as_str()],
        vec!["dlq", "purge", missing.as_str(), "--older-than", "1d"],
    ] {
        let (code, _, stderr) = backstop(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains("does not exist"), "{stderr}");
    }
    let (code, _, stderr) = backstop(&["dlq", "replay", &missing, "--to", "no-colon"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn the_broker_comes_from_the_config_file_first() {
    let dir = std::env::temp_dir().join(unique("backstop-config"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[broker]\nuri = \"amqp://127.0.0.1:5672/%2f\"\nport = 5\n",
    )
    .expect("write");
    let (code, _, stderr) =
        backstop(&["dlq", "list", "whatever", "-c", bad.to_str().unwrap_or("")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("line 3") && stderr.contains("port"),
        "{stderr}"
    );

    // The file's broker wins over --uri and the environment.
    let good = dir.join("good.toml");
    std::fs::write(&good, format!("[broker]\nuri = \"{}\"\n", amqp_url())).expect("write");
    let missing = unique("no-such-dlq");
    let (code, _, stderr) = backstop(&[
        "dlq",
        "list",
        &missing,
        "-c",
        good.to_str().unwrap_or(""),
        "--uri",
        "amqp://guest:guest@127.0.0.1:1/%2f",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("does not exist"),
        "reached the file's broker: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `[broker.tls]` reaches the CLI's connections: the server name override,
/// the insecure switch (warned about), and a clear exit 2 when TLS fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_tls_settings_from_the_config_file_are_used() {
    let queue = unique("dlq-tls");
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    backstop_testkit::declare_durable(&channel, &queue)
        .await
        .expect("declare");
    let pki = backstop_testkit::tls_dir();
    let dir = std::env::temp_dir().join(unique("backstop-tls-config"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let run = |name: &str, tls: String| {
        let path = dir.join(format!("{name}.toml"));
        let uri = format!("amqps://guest:guest@{}/%2f", backstop_testkit::TLS_ADDR);
        std::fs::write(
            &path,
            format!(
                "[broker]\nuri = {uri:?}\ntls.cert = {:?}\ntls.key = {:?}\n{tls}",
                pki.join("client.pem").display().to_string(),
                pki.join("client.key").display().to_string(),
            ),
        )
        .expect("write");
        backstop(&["dlq", "list", &queue, "-c", path.to_str().unwrap_or("")])
    };
    let ca = format!("tls.ca = {:?}\n", pki.join("ca.pem").display().to_string());
    let other_ca = format!(
        "tls.ca = {:?}\n",
        pki.join("other-ca.pem").display().to_string()
    );

    let (code, _, stderr) = run(
        "named",
        format!("{ca}tls.server_name = \"rabbit.backstop.test\"\n"),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("listed=0 kept=0"), "{stderr}");

    let (code, _, stderr) = run(
        "misnamed",
        format!("{ca}tls.server_name = \"other.backstop.test\"\n"),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("does not name the host"), "{stderr}");

    let (code, _, stderr) = run("untrusted", other_ca.clone());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not signed by a trusted CA"), "{stderr}");

    let (code, _, stderr) = run(
        "insecure",
        format!("{other_ca}tls.insecure_skip_verify = true\n"),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("TLS certificate verification is OFF"),
        "{stderr}"
    );
    assert!(!stderr.contains("guest:guest"), "{stderr}");
    delete_queue(&connection, &queue).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Deletes each of `queues`.
async fn delete_queues(queues: &[&str]) {
    let connection = connect().await;
    for queue in queues {
        delete_queue(&connection, queue).await;
    }
}

/// One message parked by hand in a DLQ, with the headers Backstop writes.
struct Parked {
    id: &'static str,
    /// The queue it failed in (`x-backstop-original-queue`).
    failed_in: String,
    error: &'static str,
    /// `x-tenant`, a header of the producer's.
    tenant: Option<&'static str>,
    /// How long ago it was dead-lettered; `None`: no time recorded.
    age_ms: Option<u64>,
    body: Vec<u8>,
}

fn parked(id: &'static str, failed_in: &str, error: &'static str) -> Parked {
    Parked {
        id,
        failed_in: failed_in.to_owned(),
        error,
        tenant: None,
        age_ms: Some(0),
        body: format!("{{\"id\":\"{id}\"}}").into_bytes(),
    }
}

/// Declares `dlq` and each failed-in queue, then publishes `messages` to
/// `dlq` one at a time with a confirm each, so the DLQ holds them in order.
async fn park_in_order(dlq: &str, messages: &[Parked]) {
    let connection = connect().await;
    let channel = &connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut topology = Topology::new().queue(Queue::classic(dlq));
    let mut queues: Vec<&str> = messages.iter().map(|m| m.failed_in.as_str()).collect();
    queues.dedup();
    for q in queues {
        topology = topology.queue(Queue::classic(q));
    }
    topology.apply(channel).await.expect("declare");
    let now = retry::now_ms();
    for m in messages {
        let mut headers = FieldTable::default();
        let mut text = |k: &str, v: &str| {
            headers.insert(k.into(), AMQPValue::LongString(v.into()));
        };
        text(retry::ORIGINAL_QUEUE_HEADER, &m.failed_in);
        text(retry::ORIGINAL_EXCHANGE_HEADER, "");
        text(retry::ORIGINAL_ROUTING_KEY_HEADER, &m.failed_in);
        text(retry::ERROR_HEADER, m.error);
        text(retry::ERROR_KIND_HEADER, "permanent");
        if let Some(tenant) = m.tenant {
            text("x-tenant", tenant);
        }
        if let Some(age) = m.age_ms {
            headers.insert(
                retry::LAST_FAILURE_HEADER.into(),
                AMQPValue::LongLongInt((now - age) as i64),
            );
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                dlq.into(),
                BasicPublishOptions::default(),
                &m.body,
                lapin::BasicProperties::default()
                    .with_message_id(m.id.into())
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker nacked {}", m.id);
    }
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The `message_id`s of a JSON array of messages, in order.
fn ids_of(messages: &serde_json::Value) -> Vec<String> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {messages}"))
        .iter()
        .map(|m| {
            m["message_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no message_id: {m}"))
                .to_owned()
        })
        .collect()
}

/// Waits until `queue` holds `n` ready messages and none unacked (a
/// command's channel closed and the broker requeued what it kept).
async fn settled(queue: &str, n: u64) {
    let q = queue.to_owned();
    wait_until(
        &format!("{queue} to hold {n} ready, none unacked"),
        Duration::from_secs(10),
        move || {
            let q = q.clone();
            async move { queue_is(&q, move |c| c.ready == n && c.unacked == 0).await }
        },
    )
    .await;
}

/// The ids in `dlq`, in queue order, peeked with `dlq list --json`.
async fn peek_ids(dlq: &str, n: u64) -> Vec<String> {
    settled(dlq, n).await;
    let (code, stdout, stderr) = backstop(&["dlq", "list", dlq, "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let ids = ids_of(&json(&stdout));
    settled(dlq, n).await;
    ids
}

/// `dlq list` peeks: the messages come in queue order with their
/// positions, a body that is not UTF-8 comes as base64, and afterwards the
/// queue has the same depth and the same order (only the redelivered flag
/// changed), also after peeking at its head alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_keeps_the_queue_depth_and_order() {
    let dlq = unique("dlq-peek");
    let queue = unique("dlq-peek-src");
    let ids = [
        "p-0", "p-1", "p-2", "p-3", "p-4", "p-5", "p-6", "p-7", "p-8", "p-9",
    ];
    let binary: Vec<u8> = vec![0xff, 0x00, 0xfe, b'<', 0x80];
    let messages: Vec<Parked> = ids
        .iter()
        .map(|id| {
            let mut m = parked(id, &queue, "bad order");
            if *id == "p-3" {
                m.body = binary.clone();
            }
            m
        })
        .collect();
    park_in_order(&dlq, &messages).await;

    let (code, stdout, stderr) = backstop(&["dlq", "list", &dlq, "--json"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("listed=10 kept=10"), "{stderr}");
    assert!(stderr.contains("requeued in queue order"), "{stderr}");
    let listed = json(&stdout);
    assert_eq!(ids_of(&listed), ids);
    for (i, m) in listed.as_array().into_iter().flatten().enumerate() {
        assert_eq!(m["position"], i as u64 + 1, "{m}");
        assert_eq!(m["redelivered"], false, "{m}");
        let encoding = if i == 3 { "base64" } else { "utf8" };
        assert_eq!(m["payload_encoding"], encoding, "{m}");
    }
    use base64::Engine;
    let body = listed[3]["body"].as_str().expect("a body");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("base64"),
        binary
    );
    assert_eq!(listed[0]["body"], "{\"id\":\"p-0\"}");
    assert_eq!(listed[0]["headers"][retry::ERROR_HEADER], "bad order");
    assert_eq!(
        listed[0]["headers"][retry::ORIGINAL_QUEUE_HEADER],
        queue.as_str()
    );
    assert_eq!(listed[0]["properties"]["message_id"], "p-0");
    assert!(listed[0]["dead_lettered_ms"].is_u64(), "{}", listed[0]);

    // Same depth, same order; now flagged redelivered.
    settled(&dlq, 10).await;
    let (code, stdout, stderr) = backstop(&["dlq", "list", &dlq, "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let again = json(&stdout);
    assert_eq!(ids_of(&again), ids);
    assert!(
        again
            .as_array()
            .into_iter()
            .flatten()
            .all(|m| m["redelivered"] == true),
        "{again}"
    );

    // Peeking at the head alone puts it back at the head.
    settled(&dlq, 10).await;
    let (code, stdout, stderr) = backstop(&["dlq", "list", &dlq, "--json", "--limit", "3"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(ids_of(&json(&stdout)), ids[..3]);
    settled(&dlq, 10).await;
    assert_eq!(drain_ids(&dlq).await, ids);
    delete_queues(&[&dlq, &queue]).await;
}

/// Runs `dlq replay DLQ ARGS --dry-run --json`, checks that nothing moved
/// (the DLQ's ids and order as `before`, the failed-in queues empty), then
/// the same without `--dry-run`, and returns the ids the dry run said
/// would move after checking that exactly those moved, each to the queue it
/// failed in, and the rest stayed in order.
async fn dry_run_then_replay(
    dlq: &str,
    args: &[&str],
    before: &[String],
    failed_in: &[(&str, &str)],
) -> Vec<String> {
    let mut dry = vec!["dlq", "replay", dlq, "--dry-run", "--json"];
    dry.extend_from_slice(args);
    let (code, stdout, stderr) = backstop(&dry);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    let report = json(&stdout);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["moved"], 0, "{report}");
    let would = ids_of(&report["would_move"]);
    assert_eq!(report["would_move_count"], would.len() as u64);
    assert_eq!(peek_ids(dlq, before.len() as u64).await, before, "{args:?}");
    for (_, queue) in failed_in {
        assert_eq!(depth(queue), 0, "a dry run published to {queue}");
    }

    let mut real = vec!["dlq", "replay", dlq, "--json"];
    real.extend_from_slice(args);
    let (code, stdout, stderr) = backstop(&real);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    let report = json(&stdout);
    assert_eq!(report["moved"], would.len() as u64, "{report}");
    // Each moved message is in the queue it failed in, in DLQ order.
    let mut moved = Vec::new();
    for (prefix, queue) in failed_in {
        let ids = drain_ids(queue).await;
        assert!(
            ids.iter().all(|id| id.starts_with(prefix)),
            "{queue} got {ids:?}"
        );
        moved.extend(ids);
    }
    moved.sort_by_key(|id| before.iter().position(|b| b == id));
    assert_eq!(moved, would, "{args:?}: the dry run said otherwise");
    let left: Vec<String> = before
        .iter()
        .filter(|id| !would.contains(id))
        .cloned()
        .collect();
    assert_eq!(peek_ids(dlq, left.len() as u64).await, left, "{args:?}");
    would
}

/// Replay by error text, by header value and by dead-lettered time range
/// moves exactly the matching messages, each to the queue it failed in, and
/// keeps the others in order; each dry run before moves nothing and lists
/// exactly what the real run then moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_replay_moves_exactly_what_its_dry_run_showed() {
    const HOUR: u64 = 3_600_000;
    let dlq = unique("dlq-filter");
    let (a, b) = (unique("dlq-filter-a"), unique("dlq-filter-b"));
    let m =
        |id: &'static str, error: &'static str, tenant: Option<&'static str>, age: Option<u64>| {
            // The id says where it failed: a-* in A, b-* in B.
            let queue = if id.starts_with('a') { &a } else { &b };
            Parked {
                tenant,
                age_ms: age,
                ..parked(id, queue, error)
            }
        };
    let messages = [
        m("a-1", "timeout after 30s", Some("acme"), Some(0)),
        m("b-1", "bad order 17", Some("acme"), Some(2 * HOUR)),
        m("a-2", "bad order 18", Some("zeta"), Some(5 * HOUR)),
        m("b-2", "timeout after 31s", None, Some(2 * HOUR)),
        m("a-3", "bad order 19", Some("acme"), None),
        m("b-3", "bad order 20", Some("zeta"), Some(HOUR / 2)),
        m("a-4", "timeout after 32s", Some("zeta"), Some(2 * HOUR)),
        m("b-4", "bad order 21", Some("acme"), Some(10 * HOUR)),
        m(
            "a-5",
            "upstream said: timeout",
            Some("acme"),
            Some(3 * HOUR),
        ),
        m("b-5", "bad order 22", None, Some(0)),
    ];
    park_in_order(&dlq, &messages).await;
    let mut left: Vec<String> = messages.iter().map(|m| m.id.to_owned()).collect();
    let queues = [("a-", a.as_str()), ("b-", b.as_str())];

    let moved = dry_run_then_replay(&dlq, &["--error-contains", "timeout"], &left, &queues).await;
    assert_eq!(moved, ["a-1", "b-2", "a-4", "a-5"]);
    left.retain(|id| !moved.contains(id));

    let moved = dry_run_then_replay(&dlq, &["--header", "x-tenant=zeta"], &left, &queues).await;
    assert_eq!(moved, ["a-2", "b-3"]);
    left.retain(|id| !moved.contains(id));

    // Dead-lettered between 3h and 1h ago (RFC 3339 for the end): b-1 only
    // of what is left; a-3 has no time and never matches a time filter.
    let until = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() - Duration::from_millis(HOUR),
    )
    .to_string();
    let moved =
        dry_run_then_replay(&dlq, &["--since", "4h", "--until", &until], &left, &queues).await;
    assert_eq!(moved, ["b-1"]);
    left.retain(|id| !moved.contains(id));
    assert_eq!(left, ["a-3", "b-4", "b-5"]);

    // --limit counts selected messages.
    let moved = dry_run_then_replay(
        &dlq,
        &["--error-contains", "bad order", "--limit", "2"],
        &left,
        &queues,
    )
    .await;
    assert_eq!(moved, ["a-3", "b-4"]);
    delete_queues(&[&dlq, &a, &b]).await;
}

/// `--rate N` bounds the publish rate: n messages take at least
/// (n - burst) / N seconds (burst = N/10, at least 1), and all of them move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rate_bounds_the_publishes() {
    const N: u64 = 30;
    const RATE: u64 = 20;
    let burst = (RATE / 10).max(1);
    let queue = unique("dlq-rate");
    let dlq = park(&queue, N).await;
    let started = std::time::Instant::now();
    let (code, _, stderr) = backstop(&["dlq", "replay", &dlq, "--rate", &RATE.to_string()]);
    let elapsed = started.elapsed();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&format!("moved={N} kept=0")), "{stderr}");
    let floor = Duration::from_secs_f64((N - burst) as f64 / RATE as f64);
    assert!(
        elapsed >= floor,
        "{N} messages at --rate {RATE} took {elapsed:?}, under {floor:?}"
    );
    settled(&queue, N).await;
    let (code, _, stderr) = backstop(&["dlq", "replay", &dlq, "--rate", "0"]);
    assert_eq!(code, 2, "--rate 0 must be refused: {stderr}");
    delete_queues(&[&dlq, &queue]).await;
}

/// `dlq purge --dry-run` counts what would go and removes nothing; the
/// real purge then removes exactly that many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_dry_run_removes_nothing() {
    let dlq = unique("dlq-purge-dry");
    let queue = unique("dlq-purge-dry-src");
    let messages = [
        Parked {
            age_ms: Some(7_200_000),
            ..parked("old-1", &queue, "x")
        },
        Parked {
            age_ms: None,
            ..parked("undated-1", &queue, "x")
        },
        parked("new-1", &queue, "x"),
        Parked {
            age_ms: Some(3_700_000),
            ..parked("old-2", &queue, "x")
        },
    ];
    park_in_order(&dlq, &messages).await;
    let all: Vec<String> = messages.iter().map(|m| m.id.to_owned()).collect();
    let (code, _, stderr) = backstop(&["dlq", "purge", &dlq, "--older-than", "1h", "--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("would_purge=2 kept=4 undated=1"),
        "{stderr}"
    );
    assert_eq!(peek_ids(&dlq, 4).await, all);
    let (code, _, stderr) = backstop(&["dlq", "purge", &dlq, "--older-than", "1h"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("purged=2 kept=2 undated=1"), "{stderr}");
    assert_eq!(peek_ids(&dlq, 2).await, ["undated-1", "new-1"]);
    delete_queues(&[&dlq, &queue]).await;
}

/// `dlq queues -c FILE`: the DLQ of each configured consumer, with its depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_lists_the_configured_dlqs() {
    let queue = unique("dlq-conf");
    let missing = unique("dlq-conf-missing");
    let dlq = format!("{queue}.dlq");
    park_in_order(&dlq, &[parked("c-1", &queue, "x")]).await;
    let dir = std::env::temp_dir().join(unique("backstop-dlq-queues"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("backstop.toml");
    let consumer = |q: &str| {
        format!("[[consumer]]\nqueue = {q:?}\nhandler.http.url = \"http://127.0.0.1:1/\"\n")
    };
    std::fs::write(
        &path,
        format!(
            "[broker]\nuri = {:?}\n{}{}",
            amqp_url(),
            consumer(&queue),
            consumer(&missing)
        ),
    )
    .expect("write");
    let (code, stdout, stderr) =
        backstop(&["dlq", "queues", "--json", "-c", path.to_str().unwrap_or("")]);
    assert_eq!(code, 0, "{stderr}");
    let listed = json(&stdout);
    assert_eq!(
        listed,
        serde_json::json!([
            {"queue": dlq, "depth": 1},
            {"queue": format!("{missing}.dlq"), "depth": null},
        ])
    );
    delete_queues(&[&dlq, &queue]).await;
    let _ = std::fs::remove_dir_all(dir);
}
