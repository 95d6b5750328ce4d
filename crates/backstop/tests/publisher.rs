//! The application `Publisher` against the real broker: exact correlation
//! of confirms and returns under pipelining, the bounded channel pool, and
//! the offline spool (bounds, `kill -9`, restart). Broker-wide faults
//! (restart, forced closes, memory alarm) are in `publisher_faults.rs`.

use crate::common;
use backstop::connection::ConnectionConfig;
use backstop::publish::{Message, PublishError, Published, Publisher};
use backstop_testkit::{amqp_url, connect, rabbitmqctl, unique};
use common::*;
use lapin::options::BasicGetOptions;
use std::collections::HashSet;
use std::io::BufRead;
use std::time::Duration;

fn publisher_config(name: &str) -> ConnectionConfig {
    ConnectionConfig::new(amqp_url())
        .connection_name(name)
        .backoff(fast_backoff())
}

/// A broker address nothing listens on: every connection attempt fails.
fn dead_broker() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_publish_is_persistent_with_an_id_and_failures_are_distinct() {
    init_tracing();
    let queue = unique("pub-basic");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    let publisher = Publisher::builder(publisher_config(&unique("pub-basic")))
        .start()
        .await
        .expect("start");

    let published = publisher
        .publish(Message::new("", &queue, b"hello".to_vec()))
        .await
        .expect("confirmed");
    assert!(matches!(published, Published::Confirmed { .. }));
    let channel = connection.create_channel().await.expect("channel");
    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the message is in the queue");
    assert_eq!(got.delivery.data, b"hello");
    assert_eq!(*got.delivery.properties.delivery_mode(), Some(2));
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some(published.message_id())
    );

    // Unroutable: no queue by that name behind the default exchange.
    let nowhere = unique("pub-nowhere");
    let err = publisher
        .publish(Message::new("", &nowhere, b"x".to_vec()))
        .await
        .expect_err("unroutable");
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err:?}");
    // A missing exchange: the broker closes the channel with 404.
    let err = publisher
        .publish(Message::new(unique("pub-no-exchange"), "k", b"x".to_vec()))
        .await
        .expect_err("refused");
    assert!(matches!(err, PublishError::Refused { .. }), "{err:?}");
    // The pool replaced the channel: publishing goes on.
    publisher
        .publish(Message::new("", &queue, b"again".to_vec()).with_message_id("given-id"))
        .await
        .expect("confirmed after a refusal");
    let again = take_all(&connection, &queue).await;
    assert_eq!(again, vec![("given-id".to_owned(), b"again".to_vec())]);
    let stats = publisher.stats();
    assert_eq!(
        (stats.confirmed, stats.unroutable, stats.refused),
        (2, 1, 1)
    );
    publisher.close().await;
}

/// The point of the correlation: thousands of publishes in flight on one
/// channel, every third one unroutable. Each result must be its own
/// message's: lapin hands a return to whichever confirm resolves next, so
/// read as lapin pairs them, routable messages come back "unroutable" and
/// unroutable ones "confirmed" (a loss, for a caller that trusts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirm_and_return_is_matched_to_its_own_message_under_pipelining() {
    init_tracing();
    let queue = unique("pub-pipe");
    let nowhere = unique("pub-pipe-nowhere");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    let publisher = Publisher::builder(publisher_config(&unique("pub-pipe")))
        .channels(1)
        .confirm_timeout(Duration::from_secs(30))
        .start()
        .await
        .expect("start");
    let mut expected_routed = HashSet::new();
    let mut mismatches = 0;
    for round in 0..5 {
        let messages: Vec<Message> = (0..1000)
            .map(|i| {
                let id = format!("r{round}-{i}");
                let to = if i % 3 == 1 { &nowhere } else { &queue };
                Message::new("", to, id.clone().into_bytes()).with_message_id(id)
            })
            .collect();
        let results = publisher.publish_batch(messages).await;
        for (i, result) in results.into_iter().enumerate() {
            let id = format!("r{round}-{i}");
            match (i % 3 == 1, result) {
                (false, Ok(Published::Confirmed { message_id })) => {
                    assert_eq!(message_id, id);
                    expected_routed.insert(id);
                }
                (true, Err(PublishError::Unroutable { .. })) => {}
                (_, other) => {
                    mismatches += 1;
                    eprintln!("{id}: {other:?}");
                }
            }
        }
    }
    assert_eq!(mismatches, 0, "results matched to the wrong message");
    let arrived: HashSet<String> = take_all(&connection, &queue)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(arrived, expected_routed);
    publisher.close().await;
}

/// `rabbitmqctl list_connections`: the channel count of the connection
/// whose client properties carry the connection name `name`, if it is open. Panics on a line it cannot read.
fn channels_of(name: &str) -> Option<u32> {
    let out = rabbitmqctl(&[
        "-q",
        "list_connections",
        "--no-table-headers",
        "channels",
        "client_properties",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let wanted = format!("{{\"connection_name\",\"{name}\"}}");
    out.lines()
        .filter(|l| l.contains(&wanted))
        .map(|line| {
            let count = line.split('\t').next().unwrap_or_default();
            count
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("cannot read list_connections line {line:?}"))
        })
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_four_never_opens_a_fifth_channel_under_sixty_four_publishers() {
    init_tracing();
    let queue = unique("pub-pool");
    let name = unique("pub-pool-conn");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    let publisher = Publisher::builder(publisher_config(&name))
        .channels(4)
        .confirm_timeout(Duration::from_secs(30))
        .start()
        .await
        .expect("start");
    // Open the connection and see it listed before the load starts.
    publisher
        .publish(Message::new("", &queue, b"first".to_vec()))
        .await
        .expect("confirmed");
    backstop_testkit::wait_until(
        "rabbitmqctl to list the connection",
        Duration::from_secs(30),
        || {
            let name = name.clone();
            async move {
                tokio::task::spawn_blocking(move || channels_of(&name).is_some())
                    .await
                    .expect("task")
            }
        },
    )
    .await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let name = name.clone();
        tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                if let Some(n) = channels_of(&name) {
                    seen.push(n);
                }
            }
            seen
        })
    };
    let per_task = 1000;
    let mut tasks = Vec::new();
    for t in 0..64 {
        let publisher = publisher.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut max_channels = 0;
            for i in 0..per_task {
                publisher
                    .publish(Message::new("", &queue, format!("{t}-{i}").into_bytes()))
                    .await
                    .expect("confirmed");
                max_channels = max_channels.max(publisher.stats().channels);
            }
            max_channels
        }));
    }
    let mut max_channels = 0;
    for task in tasks {
        max_channels = max_channels.max(task.await.expect("task"));
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let seen = watcher.await.expect("watcher");
    assert!(!seen.is_empty(), "rabbitmqctl never listed the connection");
    let broker_max = seen.iter().copied().max().unwrap_or(0);
    eprintln!(
        "channels: broker saw at most {broker_max} over {} samples; the pool held at most {max_channels}",
        seen.len()
    );
    assert!(broker_max <= 4, "the broker saw {broker_max} channels");
    assert!((1..=4).contains(&max_channels));
    let stats = publisher.stats();
    assert_eq!(stats.confirmed, 64 * per_task + 1);
    assert_eq!(
        take_all(&connection, &queue).await.len() as u64,
        64 * per_task + 1
    );
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_dropped_without_use_returns_its_channel() {
    init_tracing();
    let queue = unique("pub-guard");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    let publisher = Publisher::builder(publisher_config(&unique("pub-guard")))
        .channels(1)
        .start()
        .await
        .expect("start");
    for _ in 0..3 {
        let guard = publisher.acquire().await.expect("a channel");
        drop(guard);
    }
    let mut guard = publisher.acquire().await.expect("the channel came back");
    let confirm = guard
        .send(Message::new("", &queue, b"via guard".to_vec()))
        .await
        .expect("sent");
    drop(guard);
    confirm.await.expect("confirmed");
    assert_eq!(publisher.stats().channels, 1);
    assert_eq!(take_all(&connection, &queue).await.len(), 1);
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_spool_full_and_loses_nothing() {
    init_tracing();
    let dir = tempdir("spool-full");
    let path = dir.join("spool.db");
    let queue = unique("pub-full");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    let offline = Publisher::builder(
        ConnectionConfig::new(dead_broker())
            .connection_name("pub-full-offline")
            .backoff(fast_backoff()),
    )
    .spool(&path)
    .spool_limits(50, 1 << 20)
    .start()
    .await
    .expect("start");
    let mut spooled = Vec::new();
    let mut refused = Vec::new();
    for i in 0..60 {
        let id = format!("full-{i}");
        match offline
            .publish(Message::new("", &queue, id.clone().into_bytes()).with_message_id(&id))
            .await
        {
            Ok(Published::Spooled { message_id }) => spooled.push(message_id),
            Err(PublishError::SpoolFull { messages, .. }) => {
                assert_eq!(messages, 50);
                refused.push(id);
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!((spooled.len(), refused.len()), (50, 10));
    let stats = offline.stats();
    assert_eq!((stats.spool_messages, stats.spool_full), (50, 10));
    assert!(stats.spool_bytes > 0 && stats.spool_oldest.is_some());
    offline.close().await;

    // The same spool, with the broker: it drains, and the caller's ten come
    // after.
    let online = Publisher::builder(publisher_config(&unique("pub-full-online")))
        .spool(&path)
        .start()
        .await
        .expect("restart");
    assert!(
        online.drained(Duration::from_secs(30)).await,
        "the spool drains"
    );
    for id in &refused {
        online
            .publish(Message::new("", &queue, id.clone().into_bytes()).with_message_id(id))
            .await
            .expect("published");
    }
    let arrived: Vec<String> = take_all(&connection, &queue)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let expected: Vec<String> = spooled.iter().chain(&refused).cloned().collect();
    assert_eq!(arrived, expected, "every message, in order");
    assert_eq!(online.stats().drained, 50);
    online.close().await;
}

/// The child of the `kill -9` test: spools to `BACKSTOP_SPOOL_CHILD`'s file
/// (its broker is unreachable), printing each message-id once `publish`
/// returned `Spooled`, until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the kill -9 test, run by it"]
async fn spool_child() {
    let path = std::env::var("BACKSTOP_SPOOL_CHILD").expect("run by the kill -9 test");
    let queue = std::env::var("BACKSTOP_SPOOL_QUEUE").expect("queue");
    let publisher = Publisher::builder(
        ConnectionConfig::new(dead_broker())
            .connection_name("spool-child")
            .backoff(fast_backoff()),
    )
    .spool(&path)
    .start()
    .await
    .expect("start");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let publisher = publisher.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("{t}-{i}");
                let message =
                    Message::new("", &queue, id.clone().into_bytes()).with_message_id(&id);
                match publisher.publish(message).await {
                    Ok(Published::Spooled { .. }) => println!("SPOOLED {id}"),
                    other => panic!("{id}: {other:?}"),
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// A process spooling from eight tasks is killed with SIGKILL mid-stream;
/// a new publisher on the same file delivers every message that was
/// reported spooled, each task's in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_survives_kill_nine_and_the_restart_drains_all_of_it() {
    init_tracing();
    let dir = tempdir("spool-kill");
    let path = dir.join("spool.db");
    let queue = unique("pub-kill");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            &common::test_name(module_path!(), "spool_child"),
            "--ignored",
            "--nocapture",
        ])
        .env("BACKSTOP_SPOOL_CHILD", &path)
        .env("BACKSTOP_SPOOL_QUEUE", &queue)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the child");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut ids = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix("SPOOLED ") {
                ids.push(id.to_owned());
                if ids.len() == 3000 {
                    return (ids, true);
                }
            }
        }
        (ids, false)
    });
    let (mut acknowledged, reached) = tokio::task::spawn_blocking(move || reader.join())
        .await
        .expect("task")
        .expect("reader");
    assert!(
        reached,
        "the child spooled fewer than 3000 messages before it ended"
    );
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    acknowledged.sort();

    let publisher = Publisher::builder(publisher_config(&unique("pub-kill")))
        .spool(&path)
        .start()
        .await
        .expect("the spool opens after a kill -9");
    let left = publisher.stats().spool_messages;
    assert!(
        left as usize >= acknowledged.len(),
        "{left} spooled, {} acknowledged",
        acknowledged.len()
    );
    assert!(
        publisher.drained(Duration::from_secs(60)).await,
        "the spool drains"
    );
    let arrived: Vec<String> = take_all(&connection, &queue)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let distinct: HashSet<&String> = arrived.iter().collect();
    assert_eq!(
        distinct.len(),
        arrived.len(),
        "no duplicates from a clean spool"
    );
    for id in &acknowledged {
        assert!(
            distinct.contains(id),
            "{id} was reported spooled and never arrived"
        );
    }
    // Each task's messages in the order it spooled them.
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    for id in &arrived {
        let (task, n) = id.split_once('-').expect("task-n");
        let n: u64 = n.parse().expect("n");
        if let Some(prev) = last.insert(task.to_owned(), n) {
            assert!(n > prev, "task {task}: {n} after {prev}");
        }
    }
    eprintln!(
        "kill -9: {} acknowledged as spooled, {} in the spool at restart, all arrived",
        acknowledged.len(),
        left
    );
    publisher.close().await;
}

/// Spooled messages that can never be published (their exchange is gone,
/// their queue never existed, the broker refuses their properties) are
/// parked in the spool file, not dropped and not retried for ever; the
/// messages around them drain. A second round of parking in a later
/// session works too (spool ids start again once the spool is empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_message_that_cannot_be_published_is_parked_and_the_rest_drain() {
    init_tracing();
    let dir = tempdir("spool-park");
    let path = dir.join("spool.db");
    let queue = unique("pub-park");
    let connection = connect().await;
    durable_queue(&connection, &queue).await;
    let offline = |name: &str| {
        Publisher::builder(
            ConnectionConfig::new(dead_broker())
                .connection_name(name)
                .backoff(fast_backoff()),
        )
        .spool(&path)
    };
    let online = |name: &str| {
        Publisher::builder(publisher_config(&unique(name)))
            .spool(&path)
            .park_unroutable_after(Duration::from_secs(1))
    };
    let spool = offline("pub-park-offline").start().await.expect("start");
    // An expiration that is not a number: RabbitMQ closes the channel with
    // a reason the publisher does not recognise, so the drain finds the
    // culprit by sending alone.
    let bad_expiration = lapin::BasicProperties::default().with_expiration("soon".into());
    let messages = vec![
        Message::new("", &queue, b"a".to_vec()).with_message_id("a"),
        Message::new(unique("pub-park-no-exchange"), "k", b"b".to_vec()).with_message_id("b"),
        Message::new("", &queue, b"c".to_vec()).with_message_id("c"),
        Message::new("", unique("pub-park-no-queue"), b"d".to_vec()).with_message_id("d"),
        Message::new("", &queue, b"e".to_vec()).with_message_id("e"),
        Message::new("", &queue, b"x".to_vec())
            .with_properties(bad_expiration)
            .with_message_id("x"),
        Message::new("", &queue, b"f".to_vec()).with_message_id("f"),
    ];
    for result in spool.publish_batch(messages).await {
        assert!(result.expect("spooled").is_spooled());
    }
    spool.close().await;

    let drain = online("pub-park-online").start().await.expect("restart");
    assert!(
        drain.drained(Duration::from_secs(60)).await,
        "the spool empties: what cannot be published is parked"
    );
    let stats = drain.stats();
    assert_eq!((stats.spool_parked, stats.drained), (3, 4), "{stats:?}");
    let arrived: Vec<String> = take_all(&connection, &queue)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // A refused publish closes its channel: a neighbour sent before it
    // loses its confirm and is sent again, a duplicate that is counted.
    let mut first = Vec::new();
    for id in &arrived {
        if !first.contains(id) {
            first.push(id.clone());
        }
    }
    assert_eq!(first, ["a", "c", "e", "f"], "{arrived:?}");
    let duplicates = (arrived.len() - first.len()) as u64;
    assert!(duplicates <= stats.uncertain, "{arrived:?} {stats:?}");
    drain.close().await;

    // A second session: the spool's ids start again at 1.
    let spool = offline("pub-park-offline-2").start().await.expect("start");
    let messages = vec![
        Message::new(unique("pub-park-no-exchange"), "k", b"g".to_vec()).with_message_id("g"),
        Message::new("", &queue, b"h".to_vec()).with_message_id("h"),
    ];
    for result in spool.publish_batch(messages).await {
        assert!(result.expect("spooled").is_spooled());
    }
    spool.close().await;
    let drain = online("pub-park-online-2").start().await.expect("restart");
    assert!(drain.drained(Duration::from_secs(60)).await);
    assert_eq!(drain.stats().spool_parked, 4, "counted from the file");
    let arrived: Vec<String> = take_all(&connection, &queue)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(arrived.last().map(String::as_str), Some("h"), "{arrived:?}");
    drain.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_file_has_one_owner() {
    init_tracing();
    let dir = tempdir("spool-owner");
    let path = dir.join("spool.db");
    let first = Publisher::builder(
        ConnectionConfig::new(dead_broker())
            .connection_name("pub-owner-1")
            .backoff(fast_backoff()),
    )
    .spool(&path)
    .start()
    .await
    .expect("start");
    let second = Publisher::builder(
        ConnectionConfig::new(dead_broker())
            .connection_name("pub-owner-2")
            .backoff(fast_backoff()),
    )
    .spool(&path)
    .start()
    .await;
    let err = second.expect_err("a second owner is refused");
    assert!(
        err.to_string()
            .contains("another process has this spool open"),
        "{err}"
    );
    first.close().await;
    let third = Publisher::builder(
        ConnectionConfig::new(dead_broker())
            .connection_name("pub-owner-3")
            .backoff(fast_backoff()),
    )
    .spool(&path)
    .start()
    .await
    .expect("free again once the first closed");
    third.close().await;
}
