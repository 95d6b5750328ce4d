//! AMQPS against the broker's TLS listener (127.0.0.1:5671, verify_peer and
//! fail_if_no_peer_cert; set up by scripts/tls.sh): consuming with mutual
//! TLS through forced closes, and a distinct error for each way TLS fails.

use crate::common;
use backstop::Error;
use backstop::connection::{ConnectionConfig, ConnectionState, ConnectionSupervisor, TlsConfig};
use backstop::consumer::ConsumerConfig;
use backstop_testkit::{FaultProxy, TLS_ADDR, tls_dir, unique, wait_until};
use common::{Recorder, ack, classic, init_tracing, queue_is};
use std::time::Duration;

fn tls(ca: &str, client: bool) -> TlsConfig {
    let dir = tls_dir();
    let tls = TlsConfig::new()
        .ca_file(&dir.join(ca))
        .expect("the test CA (scripts/tls.sh)");
    if client {
        tls.client_cert_files(&dir.join("client.pem"), &dir.join("client.key"))
            .expect("the test client certificate")
    } else {
        tls
    }
}

fn supervisor(url: &str, tls: TlsConfig) -> ConnectionSupervisor {
    ConnectionSupervisor::start(
        ConnectionConfig::new(url)
            .heartbeat(Duration::from_secs(5))
            .connection_name("backstop-tls-test")
            .backoff(common::fast_backoff())
            .connect_timeout(Duration::from_secs(5))
            .tls(tls),
    )
    .expect("valid config")
}

/// The error the supervisor ends with for `url` and `tls`.
async fn failure(url: &str, tls: TlsConfig) -> Error {
    init_tracing();
    let supervisor = supervisor(url, tls);
    let result = tokio::time::timeout(Duration::from_secs(20), supervisor.connection()).await;
    supervisor.close().await;
    match result {
        Ok(Err(e)) => e,
        Ok(Ok(_)) => panic!("connected to {url} although TLS should have failed"),
        Err(_) => panic!("still retrying {url} after 20 s: the TLS failure was not final"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_over_mutual_tls_survives_forced_closes() {
    init_tracing();
    let queue = unique("tls-consume");
    common::declare(&classic(&queue)).await;
    let publisher = backstop_testkit::connect().await;
    backstop_testkit::publish(&publisher, &queue, 2000, "tls", |i| {
        i.to_string().into_bytes()
    })
    .await;
    let proxy = FaultProxy::start(TLS_ADDR.parse().expect("addr"))
        .await
        .expect("proxy");
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", proxy.addr().port());
    let supervisor = supervisor(&url, tls("ca.pem", true));
    let recorder = Recorder::default();
    let consumer = common::spawn(
        &supervisor,
        ConsumerConfig::new(&queue)
            .topology(classic(&queue))
            .prefetch(50),
        &recorder,
        |d, n| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            ack(d, n).await
        },
    );
    for cut in 1..=3 {
        let target = 400 * cut;
        wait_until("progress over TLS", Duration::from_secs(60), || {
            let n = recorder.distinct_handled();
            async move { n >= target }
        })
        .await;
        proxy.cut();
    }
    recorder
        .wait_handled(2000, "all 2,000 handled over TLS", Duration::from_secs(60))
        .await;
    wait_until("the queue is empty", Duration::from_secs(30), || {
        queue_is(&queue, |c| c.ready == 0 && c.unacked == 0)
    })
    .await;
    assert!(
        supervisor.reconnects() >= 3,
        "reconnects: {}",
        supervisor.reconnects()
    );
    common::finish(consumer, &supervisor, &publisher, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused_and_told_why() {
    let url = format!("amqps://guest:guest@{TLS_ADDR}/%2f");
    let e = failure(&url, tls("ca.pem", false)).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(text.contains("requires a client certificate"), "{text}");
    assert!(!text.contains("guest:guest"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_a_distinct_error() {
    let url = format!("amqps://guest:guest@{TLS_ADDR}/%2f");
    let e = failure(&url, tls("other-ca.pem", true)).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(text.contains("not signed by a trusted CA"), "{text}");
    assert!(e.is_config());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_name_is_a_distinct_error() {
    // The server certificate names 127.0.0.1 and rabbit.backstop.test only;
    // the override makes the client check another name (without resolving
    // one: the address stays 127.0.0.1).
    let url = format!("amqps://guest:guest@{TLS_ADDR}/%2f");
    let e = failure(&url, tls("ca.pem", true).server_name("other.backstop.test")).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(text.contains("does not name the host"), "{text}");
    assert!(!text.contains("not signed by a trusted CA"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_name_override_is_the_name_verified() {
    init_tracing();
    let url = format!("amqps://guest:guest@{TLS_ADDR}/%2f");
    let supervisor = supervisor(
        &url,
        tls("ca.pem", true).server_name("rabbit.backstop.test"),
    );
    let live = tokio::time::timeout(Duration::from_secs(20), supervisor.connection())
        .await
        .expect("connected within 20 s")
        .expect("the certificate lists rabbit.backstop.test");
    let channel = live.create_channel().await.expect("a channel over TLS");
    drop(channel);
    supervisor.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_broker_certificate_is_a_distinct_error() {
    // The broker has one certificate for all its TLS listeners, so an
    // expired one is served by `openssl s_server` on another loopback port:
    // the client rejects it during the handshake, before any AMQP.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tls_dir();
    let _server = common::KillOnDrop(
        std::process::Command::new("openssl")
            .arg("s_server")
            .arg("-quiet")
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.join("expired.pem"))
            .arg("-key")
            .arg(dir.join("server.key"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    wait_until(
        "openssl s_server listens",
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f");
    let e = failure(&url, tls("ca.pem", true)).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(text.contains("broker's certificate has expired"), "{text}");
    assert!(!text.contains("not signed by a trusted CA"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused_and_told_why() {
    let dir = tls_dir();
    let expired = TlsConfig::new()
        .ca_file(&dir.join("ca.pem"))
        .and_then(|t| t.client_cert_files(&dir.join("expired-client.pem"), &dir.join("client.key")))
        .expect("the expired client certificate (scripts/tls.sh)");
    let url = format!("amqps://guest:guest@{TLS_ADDR}/%2f");
    let e = failure(&url, expired).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(
        text.contains("rejected the client certificate: it has expired"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_auth_logs_in_as_the_certificate_s_common_name() {
    init_tracing();
    // No user or password in the URI: the broker takes the user from the
    // client certificate's CN (backstop-client, created by scripts/broker.sh).
    let url = format!("amqps://{TLS_ADDR}/%2f?auth_mechanism=external");
    let name = unique("external");
    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(&url)
            .connection_name(name.clone())
            .backoff(common::fast_backoff())
            .tls(tls("ca.pem", true)),
    )
    .expect("valid config");
    let live = tokio::time::timeout(Duration::from_secs(20), supervisor.connection())
        .await
        .expect("connected within 20 s")
        .expect("EXTERNAL login with the client certificate");
    let users =
        backstop_testkit::rabbitmqctl(&["-q", "list_connections", "user", "client_properties"])
            .expect("rabbitmqctl list_connections");
    let ours = users
        .lines()
        .find(|line| line.contains(&name))
        .unwrap_or_else(|| panic!("connection {name} not listed: {users}"));
    assert!(ours.starts_with("backstop-client\t"), "{ours}");
    // The user may work on the vhost: a queue round trip.
    let queue = unique("external");
    let channel = live.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("declare as backstop-client");
    drop(channel);
    supervisor.close().await;
}

#[test]
fn external_auth_without_a_client_certificate_is_a_config_error() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    for (url, tls) in [
        (
            format!("amqps://{TLS_ADDR}/%2f?auth_mechanism=external"),
            TlsConfig::new(),
        ),
        (
            "amqp://127.0.0.1:5672/%2f?auth_mechanism=external".to_owned(),
            tls("ca.pem", true),
        ),
    ] {
        let e = ConnectionSupervisor::start(ConnectionConfig::new(&url).tls(tls))
            .err()
            .unwrap_or_else(|| panic!("{url} started"));
        let text = e.to_string();
        assert!(text.contains("auth_mechanism=external"), "{text}");
        assert!(text.contains("broker.tls.cert"), "{text}");
    }
}

// current_thread: the supervisor's tasks run on this thread, under the
// capturing subscriber set here.
#[tokio::test]
async fn insecure_skip_verify_trusts_any_broker_and_warns_at_every_connect() {
    let (logs, _guard) = common::CapturedLogs::start("backstop=info");
    const WARNING: &str = "TLS certificate verification is OFF";

    // Trusting only an unrelated CA fails verification...
    let proxy = FaultProxy::start(TLS_ADDR.parse().expect("addr"))
        .await
        .expect("proxy");
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", proxy.addr().port());
    // ...unless verification is off.
    let supervisor = supervisor(&url, tls("other-ca.pem", true).insecure_skip_verify(true));
    for cut in 0..3u64 {
        let live = tokio::time::timeout(Duration::from_secs(30), supervisor.connection())
            .await
            .expect("connected within 30 s")
            .expect("an insecure connection despite the unknown CA");
        assert_eq!(live.generation(), cut + 1);
        assert_eq!(supervisor.reconnects(), cut);
        proxy.cut();
        let mut state = supervisor.state();
        tokio::time::timeout(
            Duration::from_secs(30),
            state.wait_for(|s| {
                *s != ConnectionState::Connected {
                    generation: cut + 1,
                }
            }),
        )
        .await
        .expect("the cut is noticed within 30 s")
        .expect("the supervisor runs");
    }
    supervisor.close().await;
    let warnings = logs.text().matches(WARNING).count();
    let connects = proxy.accepted() as usize;
    assert!(connects >= 3, "connects: {connects}");
    assert_eq!(warnings, connects, "one warning per connect attempt");
    // Without the switch, the same set-up is refused.
    let e = failure(&url, tls("other-ca.pem", true)).await;
    assert!(e.to_string().contains("not signed by a trusted CA"), "{e}");
}
