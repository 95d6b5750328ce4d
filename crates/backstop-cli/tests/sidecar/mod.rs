//! Helpers shared by the `backstop run` tests: the real binary in
//! the background, its endpoints, and publishing.
#![allow(dead_code, unreachable_pub, missing_docs)]

use backstop_testkit::{unique, wait_until};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn backstop(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(args)
        .env_remove("BACKSTOP_BROKER_URI")
        .env_remove("RUST_LOG")
        .output()
        .expect("run backstop");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn write_config(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("backstop-config")));
    std::fs::write(&path, text).expect("write config");
    path
}

/// `config check` on `text`: the exit code and stderr, with the temp file's
/// path replaced by `backstop.toml`.
/// `backstop run` in the background, killed when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn start_run(config: &str) -> Running {
    start_run_logging(config, "warn,lapin=off", Stdio::inherit())
}

/// Starts `backstop run` with the log filter `filter`, its stderr going to
/// `stderr` (a file, to read what it logged).
pub fn start_run_logging(config: &str, filter: &str, stderr: impl Into<Stdio>) -> Running {
    let path = write_config(config);
    let child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["run", "-c", &path.display().to_string()])
        .env_remove("BACKSTOP_BROKER_URI")
        .env("RUST_LOG", filter)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start backstop run");
    Running(child)
}

/// Starts `backstop run` with the log filter `filter`, its log going to a
/// new file named after `name` in the temp directory: (the process, the
/// file's path).
pub fn start_run_logged(config: &str, filter: &str, name: &str) -> (Running, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("{name}.log"));
    let file = std::fs::File::create(&path).expect("create the log file");
    (start_run_logging(config, filter, file), path)
}

/// The `Backstop-Message-Id` header of a request to a test endpoint ("" when
/// it has none).
pub fn message_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("backstop-message-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A new connection to the broker and a channel on it in confirm mode.
pub async fn confirmed_channel() -> (lapin::Connection, lapin::Channel) {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

/// Starts `backstop run` and waits until `/readyz` says every consumer is
/// subscribed (so the queues exist before anything is published).
pub async fn start_ready(config: &str, metrics_port: u16) -> Running {
    let run = start_run(config);
    wait_ready(metrics_port).await;
    run
}

/// Waits until `/readyz` on `metrics_port` says every consumer is subscribed.
pub async fn wait_ready(metrics_port: u16) {
    let ready = format!("http://127.0.0.1:{metrics_port}/readyz");
    wait_until("backstop run is ready", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { get(&ready).await.0 == 200 }
    })
    .await;
}

/// Sends SIGTERM to `run` and waits up to `within` for it to exit (it is
/// killed when it overruns); returns its exit code and how long it took.
pub async fn terminate(run: &mut Running, within: Duration) -> (Option<i32>, Duration) {
    let pid = run.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -TERM {pid}");
    wait_exit(run, within).await
}

/// Waits up to `within` for `run` to exit (panics after); returns its exit
/// code and how long it took.
pub async fn wait_exit(run: &mut Running, within: Duration) -> (Option<i32>, Duration) {
    let mut code = None;
    let took = wait_until(
        &format!("backstop run to exit within {within:?}"),
        within,
        || {
            let exited = run.0.try_wait().expect("the child's status");
            if let Some(status) = exited {
                code = status.code();
            }
            async move { exited.is_some() }
        },
    )
    .await;
    (code, took)
}

pub async fn publish(queue: &str, messages: &[(&str, String)]) {
    let (connection, channel) = confirmed_channel().await;
    for (id, body) in messages {
        let mut headers = FieldTable::default();
        headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id((*id).into())
            .with_content_type("application/json".into())
            .with_headers(headers);
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let _ = connection.close(200, "published".into()).await;
}

/// Waits until `queue`'s dead-letter queue holds `n` ready messages.
pub async fn wait_dead_lettered(queue: &str, n: u64) {
    let dlq = format!("{queue}.dlq");
    wait_until(
        &format!("{n} message(s) dead-lettered in {dlq}"),
        Duration::from_secs(40),
        || backstop_testkit::queue_is(&dlq, move |c| c.ready == n),
    )
    .await;
}

/// [`publish`] for owned ids.
pub async fn publish_owned(queue: &str, messages: &[(String, String)]) {
    let refs: Vec<(&str, String)> = messages
        .iter()
        .map(|(id, body)| (id.as_str(), body.clone()))
        .collect();
    publish(queue, &refs).await;
}

pub async fn get(url: &str) -> (u16, String) {
    http_get(url).await.unwrap_or_default()
}

/// A bare HTTP/1.0 GET, enough for the metrics endpoints.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    http_request("GET", url).await
}

/// A bare HTTP/1.0 request with an empty body.
pub async fn http_request(method: &str, url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    stream
        .write_all(
            format!("{method} /{path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

pub fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn config_for(queue: &str, url: &str, metrics_port: u16, extra: &str) -> String {
    let broker = format!("uri = \"{}\"\n", backstop_testkit::amqp_url());
    config_with_broker(&broker, queue, url, metrics_port, extra)
}

/// Like [`config_for`], with `broker` as the body of the `[broker]` section
/// (after a 5 s heartbeat); `extra` ends the consumer block, or starts more
/// sections.
pub fn config_with_broker(
    broker: &str,
    queue: &str,
    url: &str,
    metrics_port: u16,
    extra: &str,
) -> String {
    format!(
        "[broker]\nheartbeat = \"5s\"\n{broker}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [[consumer]]\nqueue = \"{queue}\"\nprefetch = 20\nconcurrency = 8\n\
         handler.http.url = \"{url}\"\nhandler.http.timeout = \"1s\"\n\
         retry.delays = [\"300ms\", \"3s\"]\nretry.exhausted = \"dead-letter\"\n{extra}"
    )
}

/// The number on the line of `/metrics` text that starts with
/// `line_start`; panics when the line is missing or its value is not a
/// number, so a broken exposition is never read as zero.
pub fn metric_value(text: &str, line_start: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start:?} line in:\n{text}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line:?} does not end with a number"))
}

/// Declares the durable classic queue `queue`.
pub async fn declare_queue(queue: &str) {
    declare_queue_with_arguments(queue, FieldTable::default()).await;
}

/// Declares the durable classic queue `queue` with `arguments`.
pub async fn declare_queue_with_arguments(queue: &str, arguments: FieldTable) {
    use lapin::options::QueueDeclareOptions;
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("declare the queue");
    let _ = connection.close(200, "declared".into()).await;
}

/// Every message in `queue`, taken out for good, in queue order: (body,
/// properties).
pub async fn take_all(queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
    use lapin::options::BasicGetOptions;
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        out.push((message.delivery.data, message.delivery.properties));
    }
    let _ = connection.close(200, "taken".into()).await;
    out
}

/// Every message in `queue`, taken out for good: (message id, the
/// `x-backstop-error` header).
pub async fn drain_errors(queue: &str) -> Vec<(String, String)> {
    take_all(queue)
        .await
        .into_iter()
        .map(|(_, properties)| {
            let id = properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let error = properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-backstop-error").cloned())
                .and_then(|v| backstop::retry::header_str(&v))
                .unwrap_or_default();
            (id, error)
        })
        .collect()
}

pub async fn cleanup(queue: &str) {
    let connection = backstop_testkit::connect().await;
    for name in [
        queue.to_owned(),
        format!("{queue}.dlq"),
        format!("{queue}.retry.300ms"),
        format!("{queue}.retry.3s"),
    ] {
        backstop_testkit::delete_queue(&connection, &name).await;
    }
}
