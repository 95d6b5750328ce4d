//! The effects endpoint of `backstop chaos` against the real PostgreSQL:
//! one effect row per business id with its repeats counted, a log row per
//! 2xx, the seeded refusals and single failures, and 503 when the database
//! cannot take the write.

use backstop_testkit::effects::{self, EffectsEndpoint, Fate, Fates};
use backstop_testkit::unique;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// POSTs `body` to `url` (http://host:port/path) and returns the status.
async fn post(url: &str, body: &str) -> u16 {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .expect("connect to the endpoint");
    let request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .expect("read the answer");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the answer {answer:?}"))
}

/// An order id of `run` with `fate`.
fn order_with(fates: &Fates, run: &str, fate: Fate) -> String {
    (0..10_000)
        .map(|i| format!("{run}-{i}"))
        .find(|order| fates.of(order) == fate)
        .expect("an order with that fate")
}

#[tokio::test]
async fn each_effect_is_one_row_and_repeats_are_counted() {
    let pool = effects::connect(&backstop_testkit::postgres_url())
        .await
        .expect("connect to PostgreSQL");
    let run = unique("effects-test");
    let fates = Fates {
        seed: 11,
        refuse_per_mille: 100,
        fail_once_per_mille: 100,
    };
    let endpoint = EffectsEndpoint::start(pool.clone(), &run, fates)
        .await
        .expect("start the endpoint");
    let accepted = order_with(&fates, &run, Fate::Accept);
    let refused = order_with(&fates, &run, Fate::Refuse);
    let failing = order_with(&fates, &run, Fate::FailOnce);
    let body = |order: &str| format!(r#"{{"order":"{order}","note":"test"}}"#);

    assert_eq!(post(&endpoint.url("i1"), &body(&accepted)).await, 200);
    assert_eq!(post(&endpoint.url("i2"), &body(&accepted)).await, 200);
    assert_eq!(post(&endpoint.url("i1"), &body(&refused)).await, 422);
    assert_eq!(post(&endpoint.url("i1"), &body(&refused)).await, 422);
    assert_eq!(post(&endpoint.url("i3"), &body(&failing)).await, 503);
    assert_eq!(post(&endpoint.url("i3"), &body(&failing)).await, 200);
    assert_eq!(post(&endpoint.url("i1"), "not json").await, 400);

    let mut found = effects::effects(&pool, &run).await.expect("read effects");
    found.sort_by(|a, b| a.business_id.cmp(&b.business_id));
    let mut expected = vec![
        (accepted.clone(), "i1".to_owned(), 1),
        (failing.clone(), "i3".to_owned(), 0),
    ];
    expected.sort();
    assert_eq!(
        found
            .iter()
            .map(|e| (e.business_id.clone(), e.instance.clone(), e.duplicates))
            .collect::<Vec<_>>(),
        expected
    );
    let log = effects::effect_log(&pool, &run)
        .await
        .expect("read the log");
    let accepted_log: Vec<&str> = log
        .iter()
        .filter(|e| e.business_id == accepted)
        .map(|e| e.instance.as_str())
        .collect();
    assert_eq!(accepted_log, ["i1", "i2"]);
    assert_eq!(log.len(), 3);
    assert!(log.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));

    // The database cannot take the write: 503, never a 2xx.
    pool.close().await;
    let other = order_with(&fates, &format!("{run}-late"), Fate::Accept);
    assert_eq!(post(&endpoint.url("i1"), &body(&other)).await, 503);

    let pool = effects::connect(&backstop_testkit::postgres_url())
        .await
        .expect("connect to PostgreSQL");
    assert_eq!(effects::effect_count(&pool, &run).await.expect("count"), 2);
    effects::forget_run(&pool, &run).await.expect("clean up");
    assert_eq!(effects::effect_count(&pool, &run).await.expect("count"), 0);
}
