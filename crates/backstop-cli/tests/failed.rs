//! `backstop failed` against real stores, run as a user would.

use crate::rows;
use backstop::retry::now_ms;
use backstop::store::{CompensationStore, RedriveOutcome, SqlStore};
use backstop_testkit::unique;
use std::process::Command;

fn backstop(args: &[&str]) -> (i32, String, String) {
    backstop_in(&std::env::temp_dir(), args)
}

/// `backstop ARGS` run in `dir`.
fn backstop_in(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(args)
        .current_dir(dir)
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

/// The row's status and its last audit entry, through `failed show --json`.
fn last_audit(url: &str, id: i64) -> (serde_json::Value, serde_json::Value) {
    let (code, stdout, stderr) =
        backstop(&["failed", "show", &id.to_string(), "--json", "--store", url]);
    assert_eq!(code, 0, "{stderr}");
    let shown = json(&stdout);
    let last = shown["audit"]
        .as_array()
        .and_then(|a| a.last().cloned())
        .expect("audit rows");
    (shown["row"]["status"].clone(), last)
}

use rows::failed_message as row;

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
            "occurrences",
            "fingerprint",
            "error",
            "created_at",
            "payload",
        ] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
        assert_eq!(r["occurrences"], 1, "{r}");
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

    let audit_of = |id: i64| last_audit(&url, id);
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

/// Run in the wrong folder, or pointed at a file that is not there, every
/// `failed` command exits 2 naming the path, and creates nothing: never an
/// empty `./backstop.db` that reports `rows=0`.
#[test]
fn a_missing_store_is_named_and_never_created() {
    let dir = std::env::temp_dir().join(unique("backstop-failed-nowhere"));
    std::fs::create_dir_all(&dir).expect("dir");
    let missing = dir.join("elsewhere.db");
    let missing_url = format!("sqlite://{}", missing.display());
    for args in [
        vec!["failed", "list"],
        vec!["failed", "show", "1"],
        vec!["failed", "retry", "1"],
        vec!["failed", "resolve", "1", "--note", "n"],
        vec!["failed", "discard", "1", "--reason", "r"],
        vec!["failed", "purge", "--older-than", "1d"],
    ] {
        let (code, stdout, stderr) = backstop_in(&dir, &args);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(&dir.join("backstop.db").display().to_string())
                && stderr.contains("does not exist")
                && stderr.contains("--store"),
            "{args:?}: {stderr}"
        );
        assert!(!stdout.contains("rows="), "{args:?}: {stdout}");
        let mut explicit = args.clone();
        explicit.extend(["--store", &missing_url]);
        let (code, _, stderr) = backstop_in(&dir, &explicit);
        assert_eq!(code, 2, "{explicit:?}: {stderr}");
        assert!(
            stderr.contains(&missing.display().to_string()),
            "{explicit:?}: {stderr}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "files created: {left:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A file that exists but holds no store (a wrong path to some other
/// database) is refused the same way; its tables are left alone.
#[test]
fn a_file_without_a_store_is_refused() {
    let dir = std::env::temp_dir().join(unique("backstop-failed-other"));
    std::fs::create_dir_all(&dir).expect("dir");
    let other = dir.join("other.db");
    std::fs::write(&other, b"").expect("an empty file");
    let url = format!("sqlite://{}", other.display());
    let (code, _, stderr) = backstop(&["failed", "list", "--store", &url]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("no backstop_failed_messages table"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::metadata(&other).map(|m| m.len()).ok(),
        Some(0),
        "the file was written to"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `-c` and `--store` together are refused, naming both; a `-c` file with
/// no `[store] url` is refused naming the file (no silent fallback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_store_together_are_refused() {
    let (configured, given) = (sqlite_url(), sqlite_url());
    let queue = unique("two-stores");
    for url in [&configured, &given] {
        let store = SqlStore::connect(url).await.expect("store");
        store
            .store(&row(&queue, "in-both", b"{}"))
            .await
            .expect("store");
    }
    let dir = std::env::temp_dir().join(unique("backstop-failed-both"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("backstop.toml");
    std::fs::write(&file, format!("[store]\nurl = \"{configured}\"\n")).expect("write");
    let file = file.to_str().unwrap_or("").to_owned();
    let (code, stdout, stderr) = backstop(&[
        "failed", "list", "-c", &file, "--store", &given, "--queue", &queue,
    ]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("--config") && stderr.contains("--store"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");

    let empty = dir.join("empty.toml");
    std::fs::write(&empty, "[store]\nretention = \"30d\"\n").expect("write");
    let empty = empty.to_str().unwrap_or("").to_owned();
    let (code, _, stderr) = backstop(&["failed", "list", "-c", &empty]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&empty) && stderr.contains("no [store] url"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Retrying a finished row (resolved, discarded, replayed) is refused
/// without `--force`, and leaves it as it was; with `--force` it goes back
/// to `pending` and the audit says `force_retry` with the actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_finished_row_needs_force_and_is_audited() {
    let url = sqlite_url();
    let queue = unique("force");
    let store = SqlStore::connect(&url).await.expect("store");
    let resolved = store
        .store(&row(&queue, "done-1", b"{}"))
        .await
        .expect("store");
    let open = store
        .store(&row(&queue, "open-1", b"{}"))
        .await
        .expect("store");
    let (code, _, stderr) = backstop(&[
        "failed",
        "resolve",
        &resolved.to_string(),
        "--note",
        "refunded",
        "--store",
        &url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let last_audit = |id: i64| last_audit(&url, id);

    let (code, stdout, stderr) =
        backstop(&["failed", "retry", &resolved.to_string(), "--store", &url]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("resolved") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(stdout.contains("retried=0 failed=1"), "{stdout}");
    let (status, last) = last_audit(resolved);
    assert_eq!(status, "resolved");
    assert_eq!(last["action"], "resolve");

    // A row that is not finished needs no force, and is audited as a retry.
    let (code, stdout, stderr) = backstop(&[
        "failed",
        "retry",
        &resolved.to_string(),
        &open.to_string(),
        "--force",
        "--actor",
        "bob",
        "--store",
        &url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("retried=2 failed=0"), "{stdout}");
    let (status, last) = last_audit(resolved);
    assert_eq!(status, "pending");
    assert_eq!(
        (last["actor"].as_str(), last["action"].as_str()),
        (Some("bob"), Some("force_retry"))
    );
    let (status, last) = last_audit(open);
    assert_eq!(status, "pending");
    assert_eq!(
        (last["actor"].as_str(), last["action"].as_str()),
        (Some("bob"), Some("retry"))
    );
}

/// A PostgreSQL database (here: a search path) without the store's tables
/// is refused, not silently given empty ones.
#[test]
fn a_postgres_database_without_a_store_is_refused() {
    let url = backstop_testkit::postgres_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let schema = unique("no_store").replace(['-', '.'], "_");
    let url = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    let (code, stdout, stderr) = backstop(&["failed", "list", "--store", &url]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("no backstop_failed_messages table"),
        "{stderr}"
    );
}

/// `failed groups --json` lists one group per cause with masked numbers,
/// and `failed discard --group ID --note` closes exactly that group's rows,
/// each with its audit entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_listed_as_json_and_a_group_is_discarded() {
    let url = sqlite_url();
    let queue = unique("payments");
    let store = SqlStore::connect(&url).await.expect("store");
    let mut declined = Vec::new();
    for n in 0..3 {
        let mut m = row(&queue, &format!("pay-{n}"), b"{}");
        m.error = format!("card {} declined for order {n}", 4000 + n);
        declined.push(store.store(&m).await.expect("store"));
    }
    let mut other = row(&queue, "pay-9", b"{}");
    other.error = "provider timed out".to_owned();
    let other = store.store(&other).await.expect("store");

    let (code, stdout, stderr) = backstop(&["failed", "groups", "--json", "--store", &url]);
    assert_eq!(code, 0, "{stderr}");
    let groups = json(&stdout);
    let groups = groups.as_array().expect("an array");
    assert_eq!(groups.len(), 2, "{stdout}");
    let first = &groups[0];
    assert_eq!(first["key"]["queue"], queue.as_str());
    assert_eq!(first["key"]["error_kind"], "permanent");
    assert_eq!(first["key"]["cause"], "card # declined for order #");
    assert_eq!(first["count"], 3);
    assert_eq!(first["sample_id"], declined[0]);
    assert_eq!(first["sample_error"], "card 4000 declined for order 0");
    assert_eq!(first["by_status"], serde_json::json!([["pending", 3]]));
    assert_eq!(groups[1]["key"]["cause"], "provider timed out");
    let id = first["id"].as_str().expect("a group id");
    assert_eq!(id.len(), 16);

    let (code, stdout, stderr) = backstop(&[
        "failed",
        "discard",
        "--group",
        id,
        "--note",
        "cards expired",
        "--store",
        &url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("acted=3 skipped=0"), "{stdout}");
    for id in &declined {
        let (status, last) = last_audit(&url, *id);
        assert_eq!(status, "discarded");
        assert_eq!(last["action"], "discard");
        assert_eq!(last["actor"], "tester");
        assert_eq!(last["note"], "cards expired");
    }
    let (status, _) = last_audit(&url, other);
    assert_eq!(status, "pending");
    let (code, _, stderr) = backstop(&["failed", "retry", "--group", id, "--store", &url]);
    assert_eq!(code, 2, "a group retry needs a note: {stderr}");
    assert!(stderr.contains("--note"), "{stderr}");
    let (code, _, stderr) = backstop(&[
        "failed", "retry", "--group", id, "--note", "again", "--store", &url,
    ]);
    assert_eq!(code, 2, "the group has no unfinished rows left: {stderr}");
}
