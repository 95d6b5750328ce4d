//! AMQPS against the broker's TLS listener (127.0.0.1:5671, verify_peer and
//! fail_if_no_peer_cert; set up by scripts/tls.sh): consuming with mutual
//! TLS through forced closes, and a distinct error for each way TLS fails.

mod common;

use backstop::Error;
use backstop::connection::{ConnectionConfig, ConnectionSupervisor, TlsConfig};
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
    // The server certificate names 127.0.0.1 only.
    let url = "amqps://guest:guest@localhost:5671/%2f";
    let e = failure(url, tls("ca.pem", true)).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(text.contains("does not name the host"), "{text}");
    assert!(!text.contains("not signed by a trusted CA"), "{text}");
}
