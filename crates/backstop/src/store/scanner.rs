//! The scanner: a periodic job that claims due rows under a lease and
//! re-drives them, by publishing them back to their queue with a confirm
//! (the default) or by calling a handler of the library user's directly.
//!
//! Several scanners may share one database: a claim takes each row for one
//! scanner only, for `lease` at most, so a scanner that dies mid-batch only
//! delays its rows. The lease is renewed and checked right before each
//! row's side effect, and each row is finished as soon as it is done. A failed re-drive backs off exponentially on
//! `next_attempt_at`; after `max_attempts` re-drives the row goes to
//! `needs_review` for a person.

use super::{CompensationStore, FailedRow, RedriveOutcome, StoreError};
use crate::connection::{CHANNEL_TIMEOUT, ConnectionSupervisor};
use crate::publish::{ConfirmedPublisher, PublishError};
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
    /// Pause between scans; none after a scan that claimed a full batch
    /// and re-drove it without an unknown outcome or a lost lease.
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
    /// [`Redrive::Republish`]: publishes of a batch in flight at once, each
    /// on a confirm channel of its own (the first row of a scan goes alone).
    pub publish_channels: usize,
}

impl Default for ScannerConfig {
    fn default() -> Self {
        ScannerConfig {
            interval: Duration::from_secs(30),
            batch: 500,
            max_attempts: 5,
            lease: Duration::from_secs(60),
            backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(3600),
            owner: default_owner(),
            queue: None,
            publish_channels: 32,
        }
    }
}

/// A lease owner unique across hosts and restarts: host, pid and a random
/// part. A pid alone is 1 in every container.
fn default_owner() -> String {
    unique_owner("scanner")
}

/// A name for a lease holder in `role`, unique across hosts and restarts:
/// `<role>-<host>-<pid>-<random>`.
pub(crate) fn unique_owner(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!(
        "{role}-{host}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
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
    /// Claimed and never tried (the scan stopped or ended early): given
    /// back without counting a re-drive.
    pub released: u64,
    /// Skipped because the lease was gone before the side effect (another
    /// scanner or a person took the row).
    pub lost_leases: u64,
    /// Re-drives whose outcome is unknown (no confirm in time, stopped
    /// while the confirm was pending, a resource alarm, or a channel or
    /// connection that failed during the publish): left leased, re-driven after the
    /// lease, so possibly duplicated. The scan ends after one (the broker
    /// or the handler is not answering, and the next row would wait as
    /// long): the rows not started yet are given back (`released`).
    pub unknown: u64,
}

/// Rows of a batch finished together at most: confirmed rows are finished
/// in chunks as their confirms arrive, not at the end of the batch.
const FINISH_CHUNK: usize = 100;

/// The longest a re-driven row waits to be finished, once its outcome is known.
const FINISH_EVERY: Duration = Duration::from_secs(1);

/// Left at the end of half the lease for the confirms of the last publishes
/// and the last finish: no publish of a batch starts later than half the
/// lease minus this (a quarter of the lease, at most 5 s).
fn finish_margin(lease: Duration) -> Duration {
    (lease / 4).min(Duration::from_secs(5))
}

/// Counts `outcomes` (about to be finished) into `report`.
fn count_outcomes(outcomes: &[(i64, RedriveOutcome)], report: &mut ScannerReport) {
    for (id, outcome) in outcomes {
        match outcome {
            RedriveOutcome::Replayed | RedriveOutcome::Resolved => report.redriven += 1,
            RedriveOutcome::Failed { give_up: true, .. } => report.needs_review += 1,
            RedriveOutcome::Failed { error, .. } => {
                report.failed += 1;
                warn!(id, %error, "re-drive failed");
            }
        }
    }
}

/// A confirm channel on the publishing connection of `supervisor`. Copies
/// never go on a consumer's connection: a resource alarm blocks the
/// connection that publishes.
async fn open_publisher(supervisor: &ConnectionSupervisor) -> crate::Result<ConfirmedPublisher> {
    let live = supervisor.publishing().connection().await?;
    ConfirmedPublisher::new(live.create_channel().await?).await
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
    /// Stops: the current scan ends before its next row, or at once while
    /// it waits for the broker.
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
        let (_never, mut stop) = watch::channel(false);
        self.run_once_until(&mut stop).await
    }

    /// One scan that ends early once `stop` turns true: before the next
    /// row, while waiting for the broker, and during a publish (that row's
    /// outcome is then unknown: it keeps its lease and is re-driven after it).
    ///
    /// Each row's lease is renewed right before its side effect and the row
    /// is skipped if the lease is gone, and each row is finished as soon as
    /// it is done: a slow re-drive or a broker outage cannot let a second
    /// scanner, or an operator's `discard`, take a row that this scanner
    /// then publishes anyway.
    pub async fn run_once_until(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<ScannerReport, StoreError> {
        // The publisher comes first: rows are claimed only once they can be
        // re-driven, so a broker outage leaves them free for others.
        let mut publisher = match &self.redrive {
            Redrive::Republish(supervisor) => {
                let opened = tokio::select! {
                    opened = open_publisher(supervisor) => opened,
                    _ = crate::wait_true(stop) => return Ok(ScannerReport::default()),
                };
                match opened {
                    Ok(publisher) => Some(publisher),
                    Err(e) => {
                        return Err(StoreError::Unavailable(format!(
                            "no broker to re-drive to: {e}"
                        )));
                    }
                }
            }
            Redrive::Handler(_) => None,
        };
        let report = self.redrive_due(&mut publisher, stop).await;
        if let Some(publisher) = publisher {
            let _ = tokio::time::timeout(Duration::from_secs(5), publisher.close()).await;
        }
        report
    }

    async fn redrive_due(
        &self,
        publisher: &mut Option<ConfirmedPublisher>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<ScannerReport, StoreError> {
        let now = now_ms() as i64;
        let lease = self.config.lease.as_millis() as i64;
        let rows = self
            .store
            .claim_due(
                &self.config.owner,
                now,
                now + lease,
                self.config.batch,
                self.config.queue.as_deref(),
            )
            .await?;
        // Oldest due first (RETURNING keeps no order).
        let mut rows = rows;
        rows.sort_by_key(|row| (row.next_attempt_at, row.id));
        let mut report = ScannerReport {
            claimed: rows.len() as u64,
            ..ScannerReport::default()
        };
        // A side effect must finish well inside the renewed lease.
        let effect_limit = self.config.lease / 2;
        let mut rows = rows.into_iter();
        loop {
            if *stop.borrow() {
                // Unstarted rows are given back after the loop.
                break;
            }
            let Some(row) = rows.next() else {
                break;
            };
            let id = row.id;
            let redrives = row.redrives;
            // The publisher's channel is given up after a publish that
            // failed on it (a channel error): a new one is opened before
            // the next row.
            let mut channel_lost = false;
            // The claim counted this re-drive: `redrives` is its number.
            let outcome = if redrives > self.config.max_attempts {
                RedriveOutcome::Failed {
                    error: format!("{}; re-driven {} times", row.error, redrives - 1),
                    next_attempt_at: now,
                    give_up: true,
                }
            } else {
                let at = now_ms() as i64;
                if !self
                    .store
                    .renew_lease(&self.config.owner, id, at, at + lease)
                    .await?
                {
                    report.lost_leases += 1;
                    warn!(id, owner = %self.config.owner, "the lease on the row is gone; not re-driving it");
                    continue;
                }
                let effect = async {
                    match (&self.redrive, publisher.as_ref()) {
                        (Redrive::Handler(f), _) => {
                            Ok(f(row.clone()).await.map(|()| RedriveOutcome::Resolved))
                        }
                        (Redrive::Republish(_), Some(publisher)) => match publisher
                            .publish("", &row.queue, &row.payload, row.republish_properties())
                            .await
                        {
                            Ok(()) => Ok(Ok(RedriveOutcome::Replayed)),
                            // No confirm in time: the broker may still store
                            // the copy.
                            Err(e @ PublishError::Timeout { .. }) => Err(e.to_string()),
                            // A resource alarm: nothing was sent, and every
                            // row would fail the same way until it clears.
                            // End the scan without counting it against the
                            // row (as an unknown outcome, its lease kept).
                            Err(e @ PublishError::Blocked { .. }) => Err(e.to_string()),
                            // The channel or connection failed: the copy may
                            // have been stored. Unknown, like a timeout.
                            Err(e @ PublishError::Channel { .. }) => Err(e.to_string()),
                            // The broker refused this copy: a failed attempt.
                            Err(e) => {
                                channel_lost = matches!(e, PublishError::Refused { .. });
                                Ok(Err(e.to_string()))
                            }
                        },
                        (Redrive::Republish(_), None) => Ok(Err("no publisher".to_owned())),
                    }
                };
                let unknown = tokio::select! {
                    done = tokio::time::timeout(effect_limit, effect) => match done {
                        Ok(done) => done,
                        Err(_) => Err(format!("the re-drive took longer than {effect_limit:?}")),
                    },
                    _ = crate::wait_true(stop) => Err("the scanner stopped during the re-drive".to_owned()),
                };
                let attempt = match unknown {
                    Ok(attempt) => attempt,
                    Err(why) => {
                        // The copy may still land (a confirm that is only
                        // late): recording a failure would schedule a second
                        // re-drive at once. The row keeps its lease and is
                        // re-driven when the lease ends, a possible duplicate.
                        report.unknown += 1;
                        warn!(id, reason = %why, "re-drive outcome unknown; the row stays leased and is re-driven after its lease (possibly a duplicate)");
                        // The broker (or the handler) did not answer: every
                        // later row would wait as long, and the channel is
                        // given up. They are given back after the loop, as on
                        // a stop, and no attempt of theirs is counted.
                        break;
                    }
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
            let confirmed = outcome == RedriveOutcome::Replayed;
            match &outcome {
                RedriveOutcome::Replayed | RedriveOutcome::Resolved => report.redriven += 1,
                RedriveOutcome::Failed { give_up: true, .. } => report.needs_review += 1,
                RedriveOutcome::Failed { .. } => report.failed += 1,
            }
            if let RedriveOutcome::Failed { error, give_up, .. } = &outcome {
                warn!(id, %error, needs_review = give_up, "re-drive failed");
            }
            // Finished at once: a crash after this row cannot re-drive it again.
            self.finish(&[(id, outcome)]).await?;
            // The broker confirms: the rest of the batch goes out together.
            if confirmed && let Redrive::Republish(supervisor) = &self.redrive {
                let rest: Vec<FailedRow> = rows.by_ref().collect();
                if !rest.is_empty() {
                    self.republish_together(rest, supervisor, stop, &mut report)
                        .await?;
                }
                break;
            }
            if channel_lost && let Redrive::Republish(supervisor) = &self.redrive {
                // The next row gets a channel of its own. If none can be
                // opened, the scan ends: the rows not started are given
                // back, with no attempt counted against them.
                let reopened = tokio::select! {
                    reopened = tokio::time::timeout(CHANNEL_TIMEOUT, open_publisher(supervisor)) => reopened,
                    _ = crate::wait_true(stop) => break,
                };
                match reopened {
                    Err(_) => {
                        warn!(after = ?CHANNEL_TIMEOUT, "no new channel to re-drive on in time; ending the scan, the rows not started are given back");
                        break;
                    }
                    Ok(Ok(fresh)) => {
                        if let Some(old) = publisher.replace(fresh) {
                            let _ = tokio::time::timeout(Duration::from_secs(5), old.close()).await;
                        }
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "no new channel to re-drive on; ending the scan, the rows not started are given back");
                        break;
                    }
                }
            }
        }
        // Rows the scan claimed and never started (a stop, an unknown
        // outcome, no channel): given back without counting an attempt.
        let untried: Vec<i64> = rows.map(|row| row.id).collect();
        self.release_untried(&untried, &mut report).await;
        Ok(report)
    }

    /// Gives back the claims on rows this scan never tried. A release that
    /// fails leaves them leased until the lease ends, as before.
    async fn release_untried(&self, ids: &[i64], report: &mut ScannerReport) {
        if ids.is_empty() {
            return;
        }
        match self
            .store
            .release_untried(&self.config.owner, ids, now_ms() as i64)
            .await
        {
            Ok(released) => report.released += released,
            Err(e) => {
                warn!(rows = ids.len(), error = %e, "could not give back the rows this scan did not try; they stay leased until their lease ends");
            }
        }
    }

    /// Finishes `outcomes` (re-drives this scanner did) in one transaction,
    /// trying a second time if the first fails: a finish that fails leaves
    /// confirmed rows to be re-driven again after their lease.
    async fn finish(&self, outcomes: &[(i64, RedriveOutcome)]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let owner = &self.config.owner;
        match self.store.finish_redrives(owner, outcomes).await {
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(error = %e, rows = outcomes.len(), "finishing re-driven rows failed; trying once more");
                self.store
                    .finish_redrives(owner, outcomes)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Counts `outcomes` into `report`, finishes them ([`Self::finish`])
    /// and empties the list.
    async fn finish_chunk(
        &self,
        outcomes: &mut Vec<(i64, RedriveOutcome)>,
        report: &mut ScannerReport,
    ) -> Result<(), StoreError> {
        count_outcomes(outcomes, report);
        self.finish(outcomes).await?;
        outcomes.clear();
        Ok(())
    }

    /// Re-drives `rows` (claimed by this scanner, after a first row of the
    /// scan was confirmed) with their publishes in flight together:
    /// 1. every lease is renewed and checked in one statement right before
    ///    the publishes (a row whose lease is gone is skipped, `lost_leases`);
    /// 2. the copies go out on up to `publish_channels` confirm channels,
    ///    each carrying one publish at a time until its confirm; no publish
    ///    starts later than half the lease minus [`finish_margin`], and no
    ///    confirm is awaited past half the lease;
    /// 3. the rows are finished as their answers arrive, in chunks (every
    ///    [`FINISH_CHUNK`] rows or [`FINISH_EVERY`], whichever comes first;
    ///    a failed finish is tried once more): `replayed` for each confirmed
    ///    copy, a failure for each copy the broker refused (nack, return,
    ///    refusal). A copy whose outcome is unknown (no confirm in time, a
    ///    stop, a resource alarm, or a channel or connection error: the copy
    ///    may have been stored) keeps its lease, no failure is recorded, and
    ///    it is re-driven after the lease (a possible duplicate, `unknown`).
    async fn republish_together(
        &self,
        rows: Vec<FailedRow>,
        supervisor: &ConnectionSupervisor,
        stop: &mut watch::Receiver<bool>,
        report: &mut ScannerReport,
    ) -> Result<(), StoreError> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        if *stop.borrow() {
            let untried: Vec<i64> = rows.iter().map(|row| row.id).collect();
            self.release_untried(&untried, report).await;
            return Ok(());
        }
        let owner = &self.config.owner;
        let lease = self.config.lease.as_millis() as i64;
        // Outcomes not finished yet, and when the oldest of them came.
        let mut unfinished: Vec<(i64, RedriveOutcome)> = Vec::new();
        let mut to_send = Vec::with_capacity(rows.len());
        for row in rows {
            if row.redrives > self.config.max_attempts {
                unfinished.push((
                    row.id,
                    RedriveOutcome::Failed {
                        error: format!("{}; re-driven {} times", row.error, row.redrives - 1),
                        next_attempt_at: now_ms() as i64,
                        give_up: true,
                    },
                ));
            } else {
                to_send.push(row);
            }
        }
        self.finish_chunk(&mut unfinished, report).await?;
        let ids: Vec<i64> = to_send.iter().map(|r| r.id).collect();
        let at = now_ms() as i64;
        let renewed = tokio::time::Instant::now();
        let held: std::collections::HashSet<i64> = self
            .store
            .renew_leases(owner, &ids, at, at + lease)
            .await?
            .into_iter()
            .collect();
        let publisher = ConfirmedPublisher::pooled(
            supervisor.publishing(),
            self.config.publish_channels.max(1),
            crate::publish::DEFAULT_CONFIRM_TIMEOUT,
        );
        // Confirms are awaited until half the lease; publishes start until
        // a margin before it, left for their confirms and the last finish.
        let deadline = renewed + self.config.lease / 2;
        let last_start = deadline - finish_margin(self.config.lease);
        let (to_send, lost): (Vec<FailedRow>, Vec<FailedRow>) =
            to_send.into_iter().partition(|row| held.contains(&row.id));
        for row in lost {
            report.lost_leases += 1;
            warn!(id = row.id, owner = %owner, "the lease on the row is gone; not re-driving it");
        }
        let mut queued = to_send.into_iter();
        // Rows published and not answered yet.
        let mut sent = std::collections::HashSet::new();
        let mut in_flight = FuturesUnordered::new();
        let publish = |row: FailedRow| {
            let publisher = publisher.clone();
            async move {
                let result = publisher
                    .publish("", &row.queue, &row.payload, row.republish_properties())
                    .await;
                (row.id, row.redrives, result)
            }
        };
        for row in queued.by_ref().take(self.config.publish_channels.max(1)) {
            sent.insert(row.id);
            in_flight.push(publish(row));
        }
        let mut unknown = false;
        let mut oldest_unfinished: Option<tokio::time::Instant> = None;
        let mut finished = Ok(());
        loop {
            let due = oldest_unfinished.map(|oldest| oldest + FINISH_EVERY);
            let finish_due = async move {
                match due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                next = in_flight.next() => next,
                _ = finish_due => {
                    oldest_unfinished = None;
                    if let Err(e) = self.finish_chunk(&mut unfinished, report).await {
                        finished = Err(e);
                        break;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(after = ?self.config.lease / 2, "re-drives without a confirm within half the lease: their outcome is unknown");
                    break;
                }
                _ = crate::wait_true(stop) => break,
            };
            let Some((id, redrives, result)) = next else {
                break;
            };
            sent.remove(&id);
            let outcome = match result {
                Ok(()) => Some(RedriveOutcome::Replayed),
                // The broker refused this copy: a failed attempt.
                Err(
                    e @ (PublishError::Nacked { .. }
                    | PublishError::Unroutable { .. }
                    | PublishError::Refused { .. }),
                ) => Some(RedriveOutcome::Failed {
                    error: e.to_string(),
                    next_attempt_at: now_ms() as i64 + self.backoff(redrives).as_millis() as i64,
                    give_up: redrives >= self.config.max_attempts,
                }),
                // No confirm in time, a resource alarm, a channel or
                // connection that failed (the copy may have been stored):
                // kept leased and re-driven after the lease.
                Err(e) => {
                    report.unknown += 1;
                    unknown = true;
                    warn!(id, reason = %e, "re-drive outcome unknown; the row stays leased and is re-driven after its lease (possibly a duplicate)");
                    None
                }
            };
            if let Some(outcome) = outcome {
                unfinished.push((id, outcome));
                oldest_unfinished.get_or_insert_with(tokio::time::Instant::now);
                if unfinished.len() >= FINISH_CHUNK {
                    oldest_unfinished = None;
                    if let Err(e) = self.finish_chunk(&mut unfinished, report).await {
                        finished = Err(e);
                        break;
                    }
                }
            }
            // No new publish once one outcome is unknown (the broker is not
            // answering) or past the last start: the rows not sent are
            // given back below, with no attempt counted.
            if !unknown
                && !*stop.borrow()
                && tokio::time::Instant::now() < last_start
                && let Some(row) = queued.next()
            {
                sent.insert(row.id);
                in_flight.push(publish(row));
            }
        }
        drop(in_flight);
        // In flight at a stop or the deadline: unknown, like above.
        report.unknown += sent.len() as u64;
        // Never sent: given back without counting an attempt, after the
        // confirmed rows are recorded (those come first under a stop bound).
        let untried: Vec<i64> = queued.map(|row| row.id).collect();
        if let Err(e) = finished {
            self.release_untried(&untried, report).await;
            return Err(e);
        }
        // Finished before the channels are closed: the close may wait.
        let finished = self.finish_chunk(&mut unfinished, report).await;
        self.release_untried(&untried, report).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher.close()).await;
        finished
    }

    /// Scans every `interval` in the background.
    pub fn spawn(self) -> ScannerHandle {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let full = match self.run_once_until(&mut stopped).await {
                    Ok(report) if report.claimed > 0 => {
                        info!(owner = %self.config.owner, ?report, "scan done");
                        // A full batch that went well: more rows are likely
                        // due (a retried group), so the next scan starts now.
                        report.claimed >= self.config.batch.max(1) as u64
                            && report.unknown == 0
                            && report.released == 0
                            && report.lost_leases == 0
                    }
                    Ok(_) => false,
                    Err(e) => {
                        warn!(owner = %self.config.owner, error = %e, "scan failed");
                        false
                    }
                };
                if *stopped.borrow() {
                    break;
                }
                if full {
                    continue;
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

#[cfg(test)]
mod tests {
    #[test]
    fn owners_differ_between_scanners_of_one_process() {
        let (a, b) = (super::default_owner(), super::default_owner());
        assert_ne!(a, b);
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }
}
