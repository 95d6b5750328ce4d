//! The real sidecar as a child process, for the fault tests (`backstop
//! torture`, `backstop chaos`): `backstop run` started from this very
//! executable with a generated configuration, awaited until `/readyz`
//! answers 200, stopped with SIGTERM or killed with `kill -9`, and asked
//! through `/metrics` how many deliveries it holds.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Writes a file only this user can read: it holds passwords.
pub(crate) fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the sidecar's metrics")?
        .port())
}

/// The sidecar child process. Killed when dropped.
pub(crate) struct Sidecar {
    child: Option<Child>,
    /// Its configuration file.
    pub(crate) config: PathBuf,
    /// Where its stdout and stderr go (appended across restarts).
    pub(crate) log: PathBuf,
    /// Its metrics port (`[metrics] listen`).
    pub(crate) port: u16,
    /// Its `RUST_LOG`.
    pub(crate) log_filter: String,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Sidecar {
    /// A sidecar that is not started yet; it logs warnings and errors.
    pub(crate) fn new(config: PathBuf, log: PathBuf, port: u16) -> Self {
        Sidecar {
            child: None,
            config,
            log,
            port,
            log_filter: "warn,lapin=off".to_owned(),
        }
    }

    /// The process id while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts `backstop run` and waits until `/readyz` answers 200.
    pub(crate) async fn start(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the backstop executable")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(exe)
            .args(["run", "-c"])
            .arg(&self.config)
            .env_remove("BACKSTOP_BROKER_URI")
            .env_remove("BACKSTOP_STORE_URL")
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting backstop run")?;
        self.child = Some(child);
        let ready = format!("http://127.0.0.1:{}/readyz", self.port);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = client.get(&ready).send().await
                && response.status().as_u16() == 200
            {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                anyhow::bail!(
                    "backstop run exited with {status} before it was ready; see {}",
                    self.log.display()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "backstop run was not ready within 30 s; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then `kill -9` if it has not exited within 15 s. Says what
    /// went wrong unless it exited 0 in time (or was not running).
    pub(crate) async fn stop(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return (!status.success())
                        .then(|| format!("backstop run exited with {status} after SIGTERM"));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    self.child = None;
                    return Some(format!("cannot wait for backstop run: {e}"));
                }
            }
        }
        self.kill9();
        Some("backstop run did not exit within 15 s of SIGTERM (killed)".to_owned())
    }

    /// Deliveries the sidecar holds unsettled, over its `consumers`
    /// consumers; `None` while it is not answering (restarting).
    pub(crate) async fn in_flight(&self, consumers: usize) -> anyhow::Result<Option<u64>> {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        let Ok(response) = reqwest::get(&url).await else {
            return Ok(None);
        };
        let text = response.text().await.context("reading /metrics")?;
        let mut total = 0;
        let mut found = 0;
        for line in text.lines().filter(|l| l.starts_with("backstop_unacked{")) {
            let value = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("cannot read the metric line {line:?}"))?;
            total += value;
            found += 1;
        }
        anyhow::ensure!(
            found == consumers,
            "/metrics shows backstop_unacked for {found} queues, not {consumers}"
        );
        Ok(Some(total))
    }
}
