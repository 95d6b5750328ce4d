//! Issue 20 items 1 and 5: exchanges and bindings per consumer, queue
//! arguments, at-least-once dead-lettering, `backstop topology apply`, and
//! conflicts with what the broker has explained (the argument and both
//! values), against the real broker. Run under `flock -s /tmp/broker.lock`:
//! nothing here closes connections broker-wide (reconnects go through the
//! testkit's fault proxy).

use crate::sidecar;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use backstop_testkit::{FaultProxy, rabbitmqctl, unique, wait_until};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use sidecar::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `backstop topology apply -c` on `config`: exit code, stdout, stderr.
fn apply(config: &str) -> (i32, String, String) {
    let path = write_config(config);
    backstop(&["topology", "apply", "-c", &path.display().to_string()])
}

fn broker_section() -> String {
    format!("[broker]\nuri = \"{}\"\n", backstop_testkit::amqp_url())
}

/// Publishes `body` to `exchange` with `routing_key`, confirmed; true when
/// the broker routed it to a queue (it is published `mandatory`, so an
/// unroutable message comes back as a `basic.return`, not an ack alone).
async fn publish_to(exchange: &str, routing_key: &str, body: &str) -> bool {
    let (connection, channel) = confirmed_channel().await;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let routed = confirm.is_ack() && confirm.take_message().is_none();
    let _ = connection.close(200, "published".into()).await;
    routed
}

/// `rabbitmqctl list_queues name arguments`: the line of `queue`.
fn queue_arguments(queue: &str) -> String {
    let listed = rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "arguments",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    listed
        .lines()
        .find(|l| l.split('\t').next() == Some(queue))
        .unwrap_or_else(|| panic!("{queue} is not listed:\n{listed}"))
        .to_owned()
}

/// `rabbitmqctl list_bindings`: true when `exchange` routes `key` to `queue`.
fn bound(exchange: &str, queue: &str, key: &str) -> bool {
    let listed = rabbitmqctl(&[
        "list_bindings",
        "-q",
        "--no-table-headers",
        "source_name",
        "destination_name",
        "routing_key",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    listed
        .lines()
        .any(|l| l.split('\t').collect::<Vec<_>>() == [exchange, queue, key])
}

async fn delete_exchange(name: &str) {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await
        .expect("exchange.delete");
    let _ = connection.close(200, "deleted".into()).await;
}

async fn declare_exchange(name: &str, kind: lapin::ExchangeKind) {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange.declare");
    let _ = connection.close(200, "declared".into()).await;
}

/// Declares the durable classic queue `queue` with `x-max-length`, when given.
async fn declare_queue_with(queue: &str, max_length: Option<i64>) {
    let mut arguments = FieldTable::default();
    if let Some(max) = max_length {
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
    }
    declare_queue_with_arguments(queue, arguments).await;
}

async fn cleanup_all(queues: &[&str], exchanges: &[&str]) {
    for queue in queues {
        cleanup(queue).await;
    }
    let connection = backstop_testkit::connect().await;
    for exchange in exchanges {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .exchange_delete((*exchange).into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = connection.close(200, "cleaned".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_apply_declares_exchanges_queues_arguments_and_bindings() {
    let (classic, quorum) = (unique("topo-classic"), unique("topo-quorum"));
    let (orders, audit) = (unique("topo-orders"), unique("topo-audit"));
    let config = format!(
        "{}\n[[consumer]]\nqueue = \"{classic}\"\nhandler.http.url = \"http://127.0.0.1:1/\"\n\
         queue_arguments = {{ x-max-length = 1000, x-single-active-consumer = true, \
         x-overflow = \"reject-publish\" }}\n\
         bindings = [{{ exchange = \"{orders}\", type = \"topic\", routing_key = \"order.*\" }}, \
         {{ exchange = \"{audit}\", type = \"fanout\" }}]\n\n\
         [[consumer]]\nqueue = \"{quorum}\"\nqueue_type = \"quorum\"\ndelivery_limit = 3\n\
         dead_letter_strategy = \"at-least-once\"\nqueue_arguments.x-message-ttl = \"1h\"\n\
         handler.http.url = \"http://127.0.0.1:1/\"\n\
         retry.delays = [\"300ms\", \"3s\"]\n\
         bindings = [{{ exchange = \"{orders}\", type = \"topic\", routing_key = \"refund.#\" }}]\n",
        broker_section()
    );
    let (code, stdout, stderr) = apply(&config);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for line in [
        format!("declared exchange \"{orders}\" (topic, durable)"),
        format!("declared exchange \"{audit}\" (fanout, durable)"),
        format!(
            "declared queue \"{classic}\" (classic, durable) x-max-length=1000 \
             x-overflow=\"reject-publish\" x-single-active-consumer=true"
        ),
        format!(
            "declared binding of queue \"{classic}\" to exchange \"{orders}\" with routing key \"order.*\""
        ),
        format!(
            "declared binding of queue \"{classic}\" to exchange \"{audit}\" with routing key \"\""
        ),
        format!(
            "declared queue \"{quorum}\" (quorum, durable) x-dead-letter-exchange=\"\" \
             x-dead-letter-routing-key=\"{quorum}.dlq\" x-dead-letter-strategy=\"at-least-once\" \
             x-delivery-limit=3 x-message-ttl=3600000 x-overflow=\"reject-publish\""
        ),
        format!("declared queue \"{quorum}.dlq\" (quorum, durable)"),
        format!("declared queue \"{quorum}.retry.300ms\" (quorum, durable)"),
        "backstop topology apply: declared the topology of 2 consumer(s)".to_owned(),
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&line)),
            "{line:?} not printed:\n{stdout}"
        );
    }
    // The broker has the arguments ...
    let classic_args = queue_arguments(&classic);
    for part in [
        "{\"x-max-length\",1000}",
        "{\"x-single-active-consumer\",true}",
        "{\"x-overflow\",\"reject-publish\"}",
    ] {
        assert!(classic_args.contains(part), "{part} not in {classic_args}");
    }
    let quorum_args = queue_arguments(&quorum);
    for part in [
        "{\"x-dead-letter-strategy\",\"at-least-once\"}",
        "{\"x-overflow\",\"reject-publish\"}",
        "{\"x-delivery-limit\",3}",
        "{\"x-message-ttl\",3600000}",
    ] {
        assert!(quorum_args.contains(part), "{part} not in {quorum_args}");
    }
    // ... and the exchanges route to the queues.
    assert!(publish_to(&orders, "order.created", "o1").await);
    assert!(publish_to(&orders, "refund.created.eu", "r1").await);
    assert!(publish_to(&audit, "anything", "a1").await);
    assert!(
        !publish_to(&orders, "invoice.created", "i1").await,
        "a key bound by neither queue is not routed"
    );
    wait_until(
        "both messages in the classic queue",
        Duration::from_secs(10),
        || backstop_testkit::queue_is(&classic, |c| c.ready == 2),
    )
    .await;
    wait_until(
        "the refund in the quorum queue",
        Duration::from_secs(10),
        || backstop_testkit::queue_is(&quorum, |c| c.ready == 1),
    )
    .await;
    // Applying again changes nothing and succeeds.
    let (code, _, stderr) = apply(&config);
    assert_eq!(code, 0, "{stderr}");
    // `config check` shows the new keys.
    let path = write_config(&config);
    let (code, shown, stderr) = backstop(&["config", "check", "-c", &path.display().to_string()]);
    assert_eq!(code, 0, "{stderr}");
    for part in [
        "dead_letter_strategy = \"at-least-once\"",
        "dead_letter_strategy = \"at-most-once\"",
        "x-message-ttl = \"1h\"",
        "routing_key = \"refund.#\"",
        "type = \"fanout\"",
    ] {
        assert!(shown.contains(part), "{part:?} not in:\n{shown}");
    }
    cleanup_all(&[&classic, &quorum], &[&orders, &audit]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_name_the_argument_and_both_values_and_exit_1() {
    let (queue, exchange) = (unique("topo-conflict"), unique("topo-direct"));
    declare_exchange(&exchange, lapin::ExchangeKind::Direct).await;
    let config = |extra: &str| {
        format!(
            "{}\n[[consumer]]\nqueue = \"{queue}\"\nhandler.http.url = \"http://127.0.0.1:1/\"\n{extra}\n",
            broker_section()
        )
    };
    // An exchange of another type.
    let (code, stdout, stderr) = apply(&config(&format!(
        "bindings = [{{ exchange = \"{exchange}\", type = \"topic\", routing_key = \"a\" }}]"
    )));
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "declaring exchange \"{exchange}\" failed: it exists with type direct, but this \
             configuration declares type topic"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("consumer \"{queue}\"")),
        "{stderr}"
    );
    // A queue that exists without the argument ...
    declare_queue_with(&queue, None).await;
    let (code, _, stderr) = apply(&config(
        "queue_arguments = { x-max-length = 10, x-overflow = \"reject-publish\" }",
    ));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "declaring queue \"{queue}\" failed: it exists with no x-max-length, but this \
             configuration declares x-max-length = 10"
        )),
        "{stderr}"
    );
    // ... and with another value of it.
    cleanup(&queue).await;
    declare_queue_with(&queue, Some(5)).await;
    let conflicting =
        config("queue_arguments = { x-max-length = 10, x-overflow = \"reject-publish\" }");
    let (code, _, stderr) = apply(&conflicting);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "it exists with x-max-length = 5, but this configuration declares x-max-length = 10"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("inequivalent arg 'x-max-length'"),
        "the broker's text too: {stderr}"
    );
    // `backstop run` stops with the same message and a non-zero exit.
    let port = free_port();
    let log = std::env::temp_dir().join(format!("{}.log", unique("topo-run")));
    let file = std::fs::File::create(&log).expect("log file");
    let run_config = format!("{conflicting}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut run = start_run_logging(&run_config, "warn,lapin=off", file);
    let (code, _) = wait_exit(&mut run, Duration::from_secs(30)).await;
    let logged = std::fs::read_to_string(&log).expect("read the log");
    assert_eq!(code, Some(1), "{logged}");
    assert!(
        logged.contains("error: declaring queue")
            && logged.contains(
                "it exists with x-max-length = 5, but this configuration declares x-max-length = 10"
            ),
        "{logged}"
    );
    // A bad configuration is exit 2, before any connection.
    let (code, _, stderr) = apply(&config("queue_arguments.x-max-length = \"ten\""));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("line 7")
            && stderr.contains("key consumer[0].queue_arguments.x-max-length"),
        "{stderr}"
    );
    cleanup_all(&[&queue], &[&exchange]).await;
}

/// An endpoint that records the bodies it is sent and answers 200.
async fn recording_endpoint() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = Router::new()
        .route(
            "/",
            post(
                |State(seen): State<Arc<Mutex<Vec<String>>>>, body: Bytes| async move {
                    seen.lock()
                        .expect("lock")
                        .push(String::from_utf8_lossy(&body).into_owned());
                    "ok"
                },
            ),
        )
        .with_state(seen.clone());
    (
        format!("{}/", backstop_testkit::serve_http(app).await),
        seen,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_declares_its_bindings_again_on_every_connect() {
    let proxy = FaultProxy::start(backstop_testkit::broker_addr())
        .await
        .expect("proxy");
    let broker = backstop_testkit::url_via(&backstop_testkit::amqp_url(), proxy.addr());
    let (queue, exchange) = (unique("topo-run"), unique("topo-events"));
    let (url, seen) = recording_endpoint().await;
    let port = free_port();
    let config = format!(
        "[broker]\nuri = \"{broker}\"\nheartbeat = \"5s\"\n\n[reconnect]\ninitial = \"100ms\"\n\
         max = \"1s\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[consumer]]\nqueue = \"{queue}\"\nhandler.http.url = \"{url}\"\n\
         bindings = [{{ exchange = \"{exchange}\", type = \"topic\", routing_key = \"order.*\" }}]\n"
    );
    let log = std::env::temp_dir().join(format!("{}.log", unique("topo-run")));
    let file = std::fs::File::create(&log).expect("log file");
    let mut run = start_run_logging(&config, "warn,lapin=off", file);
    wait_ready(port).await;
    assert!(bound(&exchange, &queue, "order.*"));
    assert!(publish_to(&exchange, "order.created", "before").await);
    let seen_ref = seen.clone();
    wait_until("the first message handled", Duration::from_secs(10), || {
        let n = seen_ref.lock().expect("lock").len();
        async move { n == 1 }
    })
    .await;
    // Someone deletes the exchange (its bindings go with it), then the
    // connection drops: the next connect declares both again.
    delete_exchange(&exchange).await;
    assert!(!bound(&exchange, &queue, "order.*"));
    let accepted = proxy.accepted();
    proxy.cut();
    wait_until(
        "the sidecar reconnected and bound again",
        Duration::from_secs(30),
        || {
            let again = proxy.accepted() > accepted && bound(&exchange, &queue, "order.*");
            async move { again }
        },
    )
    .await;
    assert!(publish_to(&exchange, "order.shipped", "after").await);
    let seen_ref = seen.clone();
    wait_until(
        "the message published after the reconnect handled",
        Duration::from_secs(15),
        || {
            let done = seen_ref.lock().expect("lock").iter().any(|b| b == "after");
            async move { done }
        },
    )
    .await;

    // Someone redeclares the queue with other arguments while it is
    // consumed: on the next connect the sidecar stops, non-zero, saying so.
    // The sidecar's link is held silent meanwhile, so that the broker's
    // cancel of its subscription cannot make it declare the queue first.
    proxy.blackhole();
    let connection = backstop_testkit::connect().await;
    backstop_testkit::delete_queue(&connection, &queue).await;
    let _ = connection.close(200, "deleted".into()).await;
    declare_queue_with(&queue, Some(7)).await;
    proxy.cut();
    proxy.restore();
    let (code, _) = wait_exit(&mut run, Duration::from_secs(60)).await;
    let logged = std::fs::read_to_string(&log).expect("read the log");
    assert_eq!(code, Some(1), "{logged}");
    assert!(
        logged.contains(
            "it exists with x-max-length = 7, but this configuration declares no x-max-length"
        ),
        "{logged}"
    );
    cleanup_all(&[&queue], &[&exchange]).await;
}

/// `bindings[].declare = false` binds to an exchange its producer owns with
/// settings Backstop does not declare (here an `alternate-exchange`): the
/// declaring form is refused by the broker as a conflict, the binding-only
/// form binds and routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_owned_exchange_is_bound_without_being_declared() {
    let (queue, exchange) = (unique("topo-owned-q"), unique("topo-owned"));
    {
        let connection = backstop_testkit::connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString("amq.fanout".into()),
        );
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("exchange.declare");
        let _ = connection.close(200, "declared".into()).await;
    }
    let config = |declare: bool| {
        format!(
            "{}\n[[consumer]]\nqueue = \"{queue}\"\nhandler.http.url = \"http://127.0.0.1:1/\"\n\
             bindings = [{{ exchange = \"{exchange}\", routing_key = \"order.*\", \
             declare = {declare} }}]\n",
            broker_section()
        )
    };
    let (code, _, stderr) = apply(&config(true));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("inequivalent arg 'alternate-exchange'"),
        "{stderr}"
    );
    let (code, stdout, stderr) = apply(&config(false));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        !stdout.contains(&format!("declared exchange \"{exchange}\"")),
        "{stdout}"
    );
    assert!(bound(&exchange, &queue, "order.*"), "{stdout}");
    assert!(publish_to(&exchange, "order.created", "o1").await);
    wait_until("the message in the queue", Duration::from_secs(10), || {
        backstop_testkit::queue_is(&queue, |c| c.ready == 1)
    })
    .await;
    cleanup_all(&[&queue], &[&exchange]).await;
}
