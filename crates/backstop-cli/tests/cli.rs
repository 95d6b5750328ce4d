//! The real `backstop` binary, run as a user would.

use backstop_testkit::unique;
#[cfg(feature = "fault-tools")]
use backstop_testkit::{broker_addr, url_via};
use std::process::Command;

fn backstop(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(args)
        .env_remove("BACKSTOP_AMQP_URL")
        .env_remove("RUST_LOG")
        .output()
        .expect("run backstop");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

// `demo` and `bench` are in a build with the fault tools only.
#[cfg(feature = "fault-tools")]
#[test]
fn the_demo_loses_nothing_under_faults() {
    let queue = unique("cli-demo");
    let uri = url_via(&backstop_testkit::amqp_url(), broker_addr());
    let (code, stdout, stderr) = backstop(&["demo", "--queue", &queue, "--uri", &uri]);
    let ledger = stdout
        .lines()
        .find(|l| l.starts_with("ledger: "))
        .unwrap_or_else(|| panic!("no ledger line; stdout: {stdout}\nstderr: {stderr}"));
    let field = |name: &str| -> u64 {
        ledger
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {ledger}"))
    };
    assert_eq!(field("published"), 10_000, "{ledger}");
    assert_eq!(field("lost"), 0, "{ledger}");
    // Published through the Publisher across the faults: each message was
    // confirmed or spooled, some were spooled, and the spool drained.
    assert_eq!(field("confirmed") + field("spooled"), 10_000, "{ledger}");
    assert!(
        field("spooled") > 0,
        "no fault reached the publishing: {ledger}"
    );
    assert_eq!(field("drained"), field("spooled"), "{ledger}");
    // 10,000 messages carry 9,500 orders (every 20th repeats one): each is
    // accepted by the endpoint or stored, and the failures took their paths.
    assert_eq!(field("handled") + field("stored"), 9_500, "{ledger}");
    assert!(field("stored") > 0 && field("retried") > 0, "{ledger}");
    assert!(field("duplicates") >= 500, "{ledger}");
    assert!(
        !stderr.contains("more than once"),
        "an order was accepted twice: {stderr}"
    );
    let reconnects = field("reconnects");
    assert!(reconnects >= 2, "faults must have been injected: {ledger}");
    assert_eq!(code, 0, "{stderr}");
}

#[cfg(feature = "fault-tools")]
#[test]
fn an_invalid_uri_exits_2_and_names_the_problem() {
    let (code, _, stderr) = backstop(&["demo", "--uri", "amqp://guest:secret@127.0.0.1:99999/"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid AMQP URI"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:99999"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}

#[cfg(feature = "fault-tools")]
#[test]
fn wrong_credentials_exit_2_with_access_refused() {
    let uri = url_via("amqp://guest:not-the-password@x/%2f", broker_addr());
    let (code, _, stderr) = backstop(&["demo", "--uri", &uri]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("ACCESS_REFUSED"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "{stderr}");
}

#[cfg(feature = "fault-tools")]
#[test]
fn bad_bench_arguments_exit_2() {
    let (code, _, stderr) = backstop(&["bench", "consume", "--prefetch", "0"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, _) = backstop(&["bench", "consume", "--messages", "many"]);
    assert_eq!(code, 2);
    let (code, _, stderr) = backstop(&["bench", "publish", "--messages", "0"]);
    assert_eq!(code, 2, "{stderr}");
}

/// Issue 18: a build without the `fault-tools` feature (`cargo install`)
/// has none of the demo, benchmark and fault tools.
#[cfg(not(feature = "fault-tools"))]
#[test]
fn a_build_without_fault_tools_has_no_demo_bench_torture_or_chaos() {
    for command in ["demo", "bench", "torture", "chaos"] {
        let (code, _, stderr) = backstop(&[command, "--help"]);
        assert_eq!(code, 2, "{command}: {stderr}");
        assert!(
            stderr.contains(&format!("unrecognized subcommand '{command}'")),
            "{command}: {stderr}"
        );
    }
}

/// Issue 18: off a terminal (stderr is a pipe here) the logs carry no ANSI
/// escape codes; the log lines are there, so the check is not vacuous.
#[test]
fn logs_off_a_terminal_have_no_colour_codes() {
    let (code, _, stderr) = backstop(&[
        "--log",
        "debug",
        "dlq",
        "list",
        "some.dlq",
        "--uri",
        "amqp://guest:guest@127.0.0.1:1/%2f",
    ]);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("connection attempt failed"),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "escape codes in {stderr:?}");
}

/// Issue 18: `--help` names the sidecar and the environment; `--limit`
/// and `--status` are checked by clap, which lists the allowed values.
#[test]
fn help_tells_the_truth_and_clap_checks_ranges_and_enums() {
    let (code, help, _) = backstop(&["--help"]);
    assert_eq!(code, 0);
    let first = help.lines().next().unwrap_or_default();
    assert!(first.contains("backstop run"), "{first}");
    assert!(
        !help.contains("demo, benchmark and operator tools"),
        "{help}"
    );
    for var in ["BACKSTOP_BROKER_URI", "BACKSTOP_STORE_URL", "NO_COLOR"] {
        assert!(help.contains(var), "{var} not in {help}");
    }
    let (_, help, _) = backstop(&["dlq", "list", "--help"]);
    assert!(help.contains("[env: BACKSTOP_AMQP_URL]"), "{help}");
    let (_, help, _) = backstop(&["failed", "list", "--help"]);
    assert!(
        help.contains("[possible values: pending, retrying, needs_review"),
        "{help}"
    );
    for args in [
        &["failed", "list", "--limit=-1"][..],
        &["failed", "list", "--limit", "0"],
        &["failed", "list", "--status", "stuck"],
        &["dlq", "list", "q.dlq", "--limit", "0"],
        &["dlq", "replay", "q.dlq", "--limit=-5"],
    ] {
        let (code, stdout, stderr) = backstop(args);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains("invalid value"), "{args:?}: {stderr}");
    }
}

/// Issue 18: the configuration errors of the real binary name the key
/// from the parser's spans, and `config check` prints TOML.
#[test]
fn config_check_names_keys_and_prints_toml() {
    let dir = std::env::temp_dir().join(unique("backstop-cli-config"));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let file = dir.join("backstop.toml");
    let check = |text: &str| {
        std::fs::write(&file, text).expect("write the config");
        backstop(&["config", "check", "-c", file.to_str().expect("UTF-8 path")])
    };
    let (code, _, stderr) =
        check("[[consumer]] # billing\nqueue = \"a\"\nhandler.http.url = \"http://a b/\"\n");
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("line 3, column 14, key consumer[0].handler.http.url:"),
        "{stderr}"
    );
    let (code, stdout, stderr) = check(
        "[broker]\nconnection_name = \"esc\\u001b\"\n[[consumer]]\nqueue = \"a\"\n\
         handler.http.url = \"http://127.0.0.1:1/\"\ndedup.key = \"message-id\"\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("\\u{1b}"), "{stdout}");
    std::fs::write(&file, &stdout).expect("write the output back");
    let (code, again, stderr) = backstop(&["config", "check", "-c", file.to_str().unwrap_or("")]);
    assert_eq!(code, 0, "config check's output is a valid config: {stderr}");
    assert_eq!(again, stdout);
    assert!(stdout.contains("lease = \"5m\""), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
