//! `backstop failed` against real stores, run as a user would.

use backstop::retry::now_ms;
use backstop::store::{CompensationStore, NewFailedMessage, RedriveOutcome, SqlStore};
use backstop_testkit::unique;
use std::process::Command;

fn backstop(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("USER", "tester")
        .output()
        .expect("run backstop");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn row(queue: &str, id: &str, payload: &[u8]) -> NewFailedMessage {
    NewFailedMessage {
        queue: queue.to_owned(),
        exchange: "payments".to_owned(),
        routing_key: "charge".to_owned(),
        message_id: Some(id.to_owned()),
        dedup_key: None,
        payload: payload.to_vec(),
        headers: "{}".to_owned(),
        properties: "{}".to_owned(),
        error: "card declined".to_owned(),
        error_kind: "permanent".to_owned(),
        attempts: 3,
        next_attempt_at: now_ms() as i64 + 3_600_000,
        store_id: None,
        fingerprint: format!("id:{id}"),
    }
}

fn sqlite_url() -> String {
    let path = std::env::temp_dir().join(format!("{}.db", unique("backstop-cli-failed")));
    format!("sqlite://{}", path.display())
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_actions_are_audited_and_json_parses() {
    let url = sqlite_url();
    let queue = unique("payments");
    let store = SqlStore::connect(&url).await.expect("store");
    let text = store
        .store(&row(&queue, "pay-1", br#"{"amount":42,"currency":"EUR"}"#))
        .await
        .expect("store");
    let binary = store
        .store(&row(&queue, "pay-2", &[0xff, 0xfe, 0x00, 0x01]))
        .await
        .expect("store");
    // pay-3 is due and has been re-driven to the limit: it needs review.
    let now = now_ms() as i64;
    let mut due = row(&queue, "pay-3", b"x");
    due.next_attempt_at = now - 1;
    let review = store.store(&due).await.expect("store");
    let owner = "test-scanner";
    let claimed = store
        .claim_due(owner, now, now + 60_000, 100, None)
        .await
        .expect("claim");
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [review]);
    let give_up = RedriveOutcome::Failed {
        error: "still declined".into(),
        next_attempt_at: now,
        give_up: true,
    };
    store
        .finish_redrives(owner, &[(review, give_up)])
        .await
        .expect("finish");

    let (code, stdout, stderr) = backstop(&[
        "failed", "list", "--store", &url, "--queue", &queue, "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows = json(&stdout);
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 3);
    for r in rows {
        for key in [
            "id",
            "queue",
            "status",
            "attempts",
            "error",
            "created_at",
            "payload",
        ] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
    }
    let by_id = |id: i64| rows.iter().find(|r| r["id"] == id).expect("row listed");
    assert_eq!(by_id(text)["payload_encoding"], "utf8");
    assert_eq!(by_id(binary)["payload_encoding"], "base64");
    assert_eq!(by_id(binary)["payload"], "//4AAQ==");
    assert_eq!(by_id(review)["status"], "needs_review");

    let (code, stdout, _) = backstop(&[
        "failed",
        "list",
        "--store",
        &url,
        "--status",
        "needs_review",
    ]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("pay-3") && !stdout.contains("pay-1"),
        "{stdout}"
    );

    let (code, stdout, _) = backstop(&["failed", "show", &text.to_string(), "--store", &url]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("\"amount\": 42"),
        "pretty-printed JSON payload: {stdout}"
    );
    assert!(stdout.contains("stored"), "history: {stdout}");

    let (code, _, stderr) = backstop(&[
        "failed",
        "resolve",
        &text.to_string(),
        "--note",
        "refunded by hand",
        "--actor",
        "alice",
        "--store",
        &url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = backstop(&[
        "failed",
        "discard",
        &binary.to_string(),
        "--reason",
        "test card",
        "--store",
        &url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = backstop(&[
        "failed", "retry", "--all", "--queue", &queue, "--store", &url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("retried=1 failed=0"), "{stdout}");

    let audit_of = |id: i64| {
        let (code, stdout, stderr) =
            backstop(&["failed", "show", &id.to_string(), "--json", "--store", &url]);
        assert_eq!(code, 0, "{stderr}");
        let shown = json(&stdout);
        let last = shown["audit"]
            .as_array()
            .and_then(|a| a.last().cloned())
            .expect("audit rows");
        (shown["row"]["status"].clone(), last)
    };
    let (status, last) = audit_of(text);
    assert_eq!(status, "resolved");
    assert_eq!(
        (last["actor"].as_str(), last["action"].as_str()),
        (Some("alice"), Some("resolve"))
    );
    assert_eq!(last["note"], "refunded by hand");
    let (status, last) = audit_of(binary);
    assert_eq!(status, "discarded");
    assert_eq!(
        (last["actor"].as_str(), last["note"].as_str()),
        (Some("tester"), Some("test card"))
    );
    let (status, last) = audit_of(review);
    assert_eq!(status, "pending");
    assert_eq!(last["action"], "retry");

    // A closed row cannot be resolved again; a missing one is named.
    let (code, _, stderr) = backstop(&[
        "failed",
        "resolve",
        &text.to_string(),
        "--note",
        "again",
        "--store",
        &url,
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("resolved"), "{stderr}");
    let (code, _, stderr) = backstop(&["failed", "show", "999999", "--store", &url]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("999999"), "{stderr}");

    // Retention removes finished rows only, and says how many.
    let (code, stdout, _) = backstop(&[
        "failed",
        "purge",
        "--older-than",
        "0s",
        "--queue",
        &queue,
        "--store",
        &url,
    ]);
    assert_eq!(code, 0);
    assert!(stdout.contains("removed=2"), "{stdout}");
    let (_, stdout, _) = backstop(&[
        "failed", "list", "--store", &url, "--queue", &queue, "--json",
    ]);
    assert_eq!(json(&stdout).as_array().map(Vec::len), Some(1));
}

#[test]
fn a_bad_store_url_exits_2() {
    for url in ["mysql://localhost/db", "sqlite://", "not a url"] {
        let (code, _, stderr) = backstop(&["failed", "list", "--store", url]);
        assert_eq!(code, 2, "{url}: {stderr}");
        assert!(stderr.contains("invalid store URL"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_comes_from_the_config_file() {
    let url = sqlite_url();
    let queue = unique("configured");
    let store = SqlStore::connect(&url).await.expect("store");
    store
        .store(&row(&queue, "cfg-1", b"{}"))
        .await
        .expect("store");
    let dir = std::env::temp_dir().join(unique("backstop-failed-config"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("backstop.toml");
    std::fs::write(
        &file,
        format!("[store]\nurl = \"{url}\"\nretention = \"30d\"\n"),
    )
    .expect("write");
    let (code, stdout, stderr) = backstop(&[
        "failed",
        "list",
        "--json",
        "--queue",
        &queue,
        "-c",
        file.to_str().unwrap_or(""),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json(&stdout)[0]["message_id"], "cfg-1");
    let _ = std::fs::remove_dir_all(dir);
}

/// Hostile strings (quotes, `; DROP TABLE`, NUL bytes, 1 MiB values) go
/// through the store and every CLI filter as bound parameters: stored and
/// shown back verbatim, with the tables intact. NUL cannot be a command-line
/// argument and a 1 MiB value exceeds one, so those go through the store.
async fn hostile_input_is_stored_and_shown_verbatim(url: &str, nul_in_text: &str) {
    let store = SqlStore::connect(url).await.expect("store");
    let drop = "'; DROP TABLE backstop_failed_messages; --";
    let queue = format!("o'rders\"{drop}{}", unique(""));
    let big_error = format!("{drop}\0{}", "x".repeat(1 << 20));
    let mut payload = vec![0u8; 1 << 20];
    payload.extend_from_slice(drop.as_bytes());
    let mut m = row(&queue, &format!("id \"quoted\" {drop}"), &payload);
    m.error = big_error.clone();
    m.headers = format!("{{\"x-note\":{}}}", serde_json::json!(drop));
    let id = store.store(&m).await.expect("store the hostile row");
    let back = store.get(id).await.expect("get");
    assert_eq!(back.queue, queue);
    assert_eq!(back.message_id, m.message_id);
    assert_eq!(back.payload, payload, "the payload bytes changed");
    assert_eq!(back.headers, m.headers);
    assert_eq!(back.error, big_error.replace('\0', nul_in_text));

    let (code, stdout, stderr) = backstop(&[
        "failed", "list", "--store", url, "--queue", &queue, "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let listed = json(&stdout);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{stdout}");
    assert_eq!(listed[0]["queue"], serde_json::json!(queue));
    assert_eq!(listed[0]["message_id"], serde_json::json!(m.message_id));
    let (code, stdout, stderr) = backstop(&[
        "failed",
        "resolve",
        &id.to_string(),
        "--note",
        drop,
        "--store",
        url,
    ]);
    assert_eq!(code, 0, "{stderr}: {stdout}");
    let (_, stdout, _) = backstop(&["failed", "show", &id.to_string(), "--json", "--store", url]);
    let shown = json(&stdout);
    assert_eq!(shown["row"]["error"], serde_json::json!(back.error));
    assert_eq!(
        shown["audit"][1]["note"],
        serde_json::json!(drop),
        "{}",
        shown["audit"]
    );
    let (code, stdout, stderr) = backstop(&[
        "failed",
        "purge",
        "--store",
        url,
        "--queue",
        &queue,
        "--older-than",
        "0s",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("removed=1"), "{stdout}");
    // The tables are intact: other rows are still listed and stored.
    let other = unique("after-hostile");
    store
        .store(&row(&other, "ok", b"{}"))
        .await
        .expect("the table still takes rows");
    let (code, stdout, _) = backstop(&[
        "failed", "list", "--store", url, "--queue", &other, "--json",
    ]);
    assert_eq!(code, 0);
    assert_eq!(json(&stdout).as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_on_sqlite() {
    hostile_input_is_stored_and_shown_verbatim(&sqlite_url(), "\0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_on_postgres() {
    // PostgreSQL TEXT cannot hold NUL: the store writes U+2400 instead.
    hostile_input_is_stored_and_shown_verbatim(&backstop_testkit::postgres_url(), "\u{2400}").await;
}
