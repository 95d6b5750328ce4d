//! The scanner: a periodic job that claims due rows under a lease and
//! re-drives them, by publishing them back to their queue with a confirm
//! (the default) or by calling a handler of the library user's directly.
//!
//! Several scanners may share one database: a claim takes each row for one
//! scanner only, for `lease` at most, so a scanner that dies mid-batch only
//! delays its rows. A failed re-drive backs off exponentially on
//! `next_attempt_at`; after `max_attempts` re-drives the row goes to
//! `needs_review` for a person.

use super::{CompensationStore, FailedRow, RedriveOutcome, StoreError};
use crate::connection::ConnectionSupervisor;
use crate::publish::ConfirmedPublisher;
use crate::retry::now_ms;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// A user-supplied re-drive: `Ok` resolves the row, `Err` is a failed attempt.
pub type RedriveFn = Arc<dyn Fn(FailedRow) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// How rows are re-driven.
#[derive(Clone)]
pub enum Redrive {
    /// Publish the message back to the queue it failed in, with a confirm.
    Republish(ConnectionSupervisor),
    /// Call this function with the row.
    Handler(RedriveFn),
}

impl std::fmt::Debug for Redrive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Redrive::Republish(_) => f.write_str("Redrive::Republish"),
            Redrive::Handler(_) => f.write_str("Redrive::Handler"),
        }
    }
}

/// When and how much the scanner works.
#[derive(Clone, Debug, PartialEq)]
pub struct ScannerConfig {
    /// Pause between scans.
    pub interval: Duration,
    /// Rows claimed per scan.
    pub batch: i64,
    /// Re-drives before a row needs review.
    pub max_attempts: i64,
    /// How long a claim holds a row.
    pub lease: Duration,
    /// The first back-off after a failed re-drive; doubles each time.
    pub backoff: Duration,
    /// The longest back-off.
    pub max_backoff: Duration,
    /// This scanner's name in leases and logs.
    pub owner: String,
    /// Only rows of this queue; all queues when `None`.
    pub queue: Option<String>,
}

impl Default for ScannerConfig {
    fn default() -> Self {
        ScannerConfig {
            interval: Duration::from_secs(30),
            batch: 100,
            max_attempts: 5,
            lease: Duration::from_secs(60),
            backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(3600),
            owner: format!("scanner-{}", std::process::id()),
            queue: None,
        }
    }
}

/// What one scan did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScannerReport {
    /// Rows claimed.
    pub claimed: u64,
    /// Published back (or resolved by the handler).
    pub redriven: u64,
    /// Failed and scheduled again.
    pub failed: u64,
    /// Moved to `needs_review`.
    pub needs_review: u64,
}

/// Re-drives due rows of a store.
#[derive(Clone)]
pub struct Scanner {
    store: Arc<dyn CompensationStore>,
    redrive: Redrive,
    config: ScannerConfig,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("redrive", &self.redrive)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A running scanner; stops when [`stop`](ScannerHandle::stop) is called.
#[derive(Debug)]
pub struct ScannerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ScannerHandle {
    /// Stops after the current scan.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

impl Scanner {
    /// A scanner of `store`.
    pub fn new(store: Arc<dyn CompensationStore>, redrive: Redrive, config: ScannerConfig) -> Self {
        Scanner {
            store,
            redrive,
            config,
        }
    }

    fn backoff(&self, redrives: i64) -> Duration {
        let factor = 2u32.saturating_pow(redrives.clamp(0, 31) as u32);
        self.config
            .backoff
            .saturating_mul(factor)
            .min(self.config.max_backoff)
    }

    /// One scan: claims due rows and re-drives each.
    pub async fn run_once(&self) -> Result<ScannerReport, StoreError> {
        let now = now_ms() as i64;
        let lease_until = now + self.config.lease.as_millis() as i64;
        let rows = self
            .store
            .claim_due(
                &self.config.owner,
                now,
                lease_until,
                self.config.batch,
                self.config.queue.as_deref(),
            )
            .await?;
        let mut report = ScannerReport {
            claimed: rows.len() as u64,
            ..ScannerReport::default()
        };
        let publisher = match (&self.redrive, rows.is_empty()) {
            (Redrive::Republish(supervisor), false) => Some(
                async {
                    let live = supervisor.connection().await?;
                    ConfirmedPublisher::new(live.create_channel().await?).await
                }
                .await,
            ),
            _ => None,
        };
        let mut outcomes = Vec::with_capacity(rows.len());
        for row in rows {
            let id = row.id;
            let redrives = row.redrives;
            // The claim counted this re-drive: `redrives` is its number.
            let outcome = if redrives > self.config.max_attempts {
                RedriveOutcome::Failed {
                    error: format!("{}; re-driven {} times", row.error, redrives - 1),
                    next_attempt_at: now,
                    give_up: true,
                }
            } else {
                let attempt = match (&self.redrive, &publisher) {
                    (Redrive::Handler(f), _) => {
                        f(row.clone()).await.map(|()| RedriveOutcome::Resolved)
                    }
                    (Redrive::Republish(_), Some(Ok(publisher))) => publisher
                        .publish("", &row.queue, &row.payload, row.republish_properties())
                        .await
                        .map(|()| RedriveOutcome::Replayed)
                        .map_err(|e| e.to_string()),
                    (Redrive::Republish(_), Some(Err(e))) => Err(format!("no broker: {e}")),
                    (Redrive::Republish(_), None) => Err("no publisher".to_owned()),
                };
                attempt.unwrap_or_else(|error| {
                    let next = now_ms() as i64 + self.backoff(redrives).as_millis() as i64;
                    RedriveOutcome::Failed {
                        error,
                        next_attempt_at: next,
                        give_up: redrives >= self.config.max_attempts,
                    }
                })
            };
            match &outcome {
                RedriveOutcome::Replayed | RedriveOutcome::Resolved => report.redriven += 1,
                RedriveOutcome::Failed { give_up: true, .. } => report.needs_review += 1,
                RedriveOutcome::Failed { .. } => report.failed += 1,
            }
            if let RedriveOutcome::Failed { error, give_up, .. } = &outcome {
                warn!(id, %error, needs_review = give_up, "re-drive failed");
            }
            outcomes.push((id, outcome));
        }
        // One commit for the batch: if this scanner dies before it, the rows
        // keep their lease and are re-driven again once it expires.
        if !outcomes.is_empty() {
            self.store
                .finish_redrives(&self.config.owner, &outcomes)
                .await?;
        }
        if let Some(Ok(publisher)) = publisher {
            let _ = publisher.channel().close(200, "scan done".into()).await;
        }
        Ok(report)
    }

    /// Scans every `interval` in the background.
    pub fn spawn(self) -> ScannerHandle {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                match self.run_once().await {
                    Ok(report) if report.claimed > 0 => {
                        info!(owner = %self.config.owner, ?report, "scan done")
                    }
                    Ok(_) => {}
                    Err(e) => warn!(owner = %self.config.owner, error = %e, "scan failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.config.interval) => {}
                    _ = crate::wait_true(&mut stopped) => break,
                }
            }
        });
        ScannerHandle { stop, task }
    }
}
