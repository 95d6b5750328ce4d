//! `backstop run` through connection closes and a broker restart. A test
//! binary of its own: it stops the broker, which no other test may see.

mod sidecar;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use backstop::store::{CompensationStore, ListFilter, SqlStore};
use backstop_testkit::{BrokerStopped, queue_is, rabbitmqctl, unique, wait_until};
use sidecar::*;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const UNIQUE_ORDERS: u64 = 18_000;
const MESSAGES: u64 = 20_000;

/// Orders the endpoint always refuses (422): the permanent failures.
fn permanent(order: u64) -> bool {
    order % 100 == 1
}

/// Orders that fail once with 503 and then succeed.
fn flaky(order: u64) -> bool {
    order % 7 == 3
}

/// Message `i`'s order: the first 18,000 are each order once; the last
/// 2,000 repeat orders (never a permanent one), interleaved by the
/// publishing order below.
fn order_sequence() -> Vec<u64> {
    let mut orders: Vec<u64> = (0..UNIQUE_ORDERS).collect();
    let mut j = 0;
    while (orders.len() as u64) < MESSAGES {
        let order = j * 9 % UNIQUE_ORDERS;
        if !permanent(order) {
            orders.push(order);
        }
        j += 1;
    }
    // Interleave: every tenth message is a duplicate.
    let (unique_part, dups) = orders.split_at(UNIQUE_ORDERS as usize);
    let mut mixed = Vec::with_capacity(MESSAGES as usize);
    let mut dups = dups.iter();
    for (n, order) in unique_part.iter().enumerate() {
        mixed.push(*order);
        if n % 9 == 8
            && let Some(d) = dups.next()
        {
            mixed.push(*d);
        }
    }
    mixed.extend(dups);
    mixed
}

#[derive(Clone, Default)]
struct Orders {
    /// order -> (calls, 2xx answers)
    seen: Arc<Mutex<HashMap<u64, (u32, u32)>>>,
}

impl Orders {
    fn ok_count(&self) -> usize {
        self.seen
            .lock()
            .map(|s| s.values().filter(|(_, ok)| *ok > 0).count())
            .unwrap_or(0)
    }
}

async fn answer(State(orders): State<Orders>, body: Bytes) -> StatusCode {
    let order = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("order_id").and_then(|o| o.as_u64()))
        .unwrap_or(u64::MAX);
    let mut seen = orders.seen.lock().expect("lock");
    let entry = seen.entry(order).or_insert((0, 0));
    entry.0 += 1;
    let status = if permanent(order) {
        StatusCode::UNPROCESSABLE_ENTITY
    } else if flaky(order) && entry.0 == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    if status.is_success() {
        entry.1 += 1;
    }
    status
}

async fn ready_is(port: u16, want: u16) -> bool {
    get(&format!("http://127.0.0.1:{port}/readyz")).await.0 == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_orders_through_closes_and_a_restart_each_reach_the_endpoint_once() {
    let orders = Orders::default();
    let app = Router::new()
        .route("/orders", post(answer))
        .with_state(orders.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/orders", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let queue = unique("run-faults");
    let db = std::env::temp_dir().join(format!("{}.db", unique("run-faults")));
    let store_url = format!("sqlite://{}", db.display());
    let port = free_port();
    let config = format!(
        "[broker]\nuri = \"{}\"\nheartbeat = \"5s\"\n\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n\n\
         [store]\nurl = \"{store_url}\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[consumer]]\nqueue = \"{queue}\"\nprefetch = 100\nconcurrency = 8\n\
         handler.http.url = \"{url}\"\nhandler.http.timeout = \"5s\"\n\
         retry.delays = [\"200ms\", \"1s\"]\nretry.exhausted = \"store\"\n\
         dedup.key = \"json:/order_id\"\n",
        backstop_testkit::amqp_url()
    );
    let mut run = start_ready(&config, port).await;

    let all = order_sequence();
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    backstop_testkit::try_publish(
        &channel,
        &queue,
        MESSAGES,
        "order",
        |i| format!(r#"{{"order_id":{}}}"#, all[i as usize]).into_bytes(),
        |_| {},
    )
    .await
    .expect("publish 20,000");
    let _ = connection.close(200, "published".into()).await;

    let expected_ok = (0..UNIQUE_ORDERS).filter(|o| !permanent(*o)).count();
    let progress = |n: usize| {
        let orders = orders.clone();
        move || {
            let done = orders.ok_count() >= n;
            async move { done }
        }
    };
    for at in [2_000, 5_000, 8_000] {
        wait_until(
            "progress before a forced close",
            Duration::from_secs(120),
            progress(at),
        )
        .await;
        rabbitmqctl(&["close_all_connections", "backstop test: forced close"])
            .expect("close_all_connections");
    }
    wait_until(
        "progress before the restart",
        Duration::from_secs(120),
        progress(11_000),
    )
    .await;
    // Started again on the way out should anything below fail.
    let broker = BrokerStopped::stop().expect("stop_app");
    wait_until(
        "/readyz turns unready while the broker is down",
        Duration::from_secs(30),
        || ready_is(port, 503),
    )
    .await;
    broker.start().expect("start_app");
    wait_until("/readyz is ready again", Duration::from_secs(60), || {
        ready_is(port, 200)
    })
    .await;

    wait_until(
        "every good order answered 2xx",
        Duration::from_secs(180),
        progress(expected_ok),
    )
    .await;
    let names = [
        queue.clone(),
        format!("{queue}.retry.200ms"),
        format!("{queue}.retry.1s"),
    ];
    wait_until(
        "the queue and the retry queues are empty",
        Duration::from_secs(60),
        || {
            let names = names.clone();
            async move {
                for name in &names {
                    if !queue_is(name, |c| c.ready == 0 && c.unacked == 0).await {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    assert!(
        run.0.try_wait().expect("status").is_none(),
        "backstop run exited"
    );

    let seen = orders.seen.lock().expect("lock").clone();
    let twice: Vec<_> = seen
        .iter()
        .filter(|(o, (_, ok))| !permanent(**o) && *ok != 1)
        .collect();
    assert!(
        twice.is_empty(),
        "orders not answered 2xx exactly once: {twice:?}"
    );
    assert_eq!(seen.keys().filter(|o| !permanent(**o)).count(), expected_ok);

    // The permanent failures sit in the store, one row per order at least.
    let store = SqlStore::connect(&store_url).await.expect("store");
    let rows = store
        .list(&ListFilter {
            queue: Some(queue.clone()),
            limit: Some(10_000),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    let stored: HashSet<u64> = rows
        .iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
        .filter_map(|v| v.get("order_id").and_then(|o| o.as_u64()))
        .collect();
    let want: HashSet<u64> = (0..UNIQUE_ORDERS).filter(|o| permanent(*o)).collect();
    assert_eq!(
        stored, want,
        "the stored orders are exactly the permanent failures"
    );

    // Three forced closes and a restart: at least four reconnects.
    let (_, text) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    let reconnects = metric(&text, "backstop_connection_reconnects_total").unwrap_or(0.0);
    assert!(reconnects >= 4.0, "reconnects={reconnects}\n{text}");

    let pid = run.0.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let status = run.0.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    cleanup(&queue).await;
    let connection = backstop_testkit::connect().await;
    backstop_testkit::delete_queue(&connection, &format!("{queue}.retry.200ms")).await;
    backstop_testkit::delete_queue(&connection, &format!("{queue}.retry.1s")).await;
}
