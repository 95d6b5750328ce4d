//! Helpers shared by the `backstop run` test binaries: the real binary in
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
    let path = write_config(config);
    let child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["run", "-c", &path.display().to_string()])
        .env_remove("BACKSTOP_BROKER_URI")
        .env("RUST_LOG", "warn,lapin=off")
        .stdout(Stdio::null())
        .spawn()
        .expect("start backstop run");
    Running(child)
}

/// Starts `backstop run` and waits until `/readyz` says every consumer is
/// subscribed (so the queues exist before anything is published).
pub async fn start_ready(config: &str, metrics_port: u16) -> Running {
    let run = start_run(config);
    let ready = format!("http://127.0.0.1:{metrics_port}/readyz");
    wait_until("backstop run is ready", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { get(&ready).await.0 == 200 }
    })
    .await;
    run
}

pub async fn publish(queue: &str, messages: &[(&str, String)]) {
    let connection = backstop_testkit::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
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
    format!(
        "[broker]\nuri = \"{}\"\nheartbeat = \"5s\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [[consumer]]\nqueue = \"{queue}\"\nprefetch = 20\nconcurrency = 8\n\
         handler.http.url = \"{url}\"\nhandler.http.timeout = \"1s\"\n\
         retry.delays = [\"300ms\", \"3s\"]\nretry.exhausted = \"dead-letter\"\n{extra}",
        backstop_testkit::amqp_url()
    )
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
