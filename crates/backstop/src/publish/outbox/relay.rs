//! The relay: leases unsent outbox rows, publishes them with confirms and
//! marks them sent; purges sent rows after the retention.
//!
//! One batch: lease up to [`RelayConfig::batch`] rows (a prefix of each
//! partition's unsent rows, in id order), then publish them in waves: the
//! first wave holds every row without a partition and the oldest row of each
//! partition, the second wave each partition's next row, and so on, so a
//! partition's row goes out only once the one before it was confirmed, while
//! partitions and unpartitioned rows go out together. Before each wave the
//! lease of the rows still to publish is renewed, and the wave's rows are
//! marked *in doubt* (a publish may reach the broker). A failed publish
//! stops its partition for this batch: the row backs off, the partition's
//! later rows are released untouched. After each wave its confirmed rows
//! are marked sent in one statement.

use super::{LeasedRow, Outbox, OutboxError};
use crate::connection::Backoff;
use crate::publish::{PublishError, Publisher};
use crate::retry::now_ms;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The largest [`RelayConfig::batch`]: PostgreSQL and SQLite bind at most
/// 32,767 parameters in one statement.
const MAX_BATCH: u32 = 1000;

/// How a relay works.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The most rows leased and published in one batch (default 100, at
    /// most 1,000: the statements bind one parameter per row).
    pub batch: u32,
    /// How long a lease holds rows for this relay (default 30 s, at least
    /// 1 s). It must comfortably exceed one wave's publish (bounded by the
    /// publisher's confirm timeout): a relay still publishing when its
    /// lease runs out can see another relay publish the same rows (a
    /// counted duplicate).
    pub lease: Duration,
    /// How long the relay waits before looking again when there was
    /// nothing to publish (default 200 ms, at least 10 ms): the longest a
    /// committed row waits for its publish while the relay is idle.
    pub poll_interval: Duration,
    /// The ceiling of the first pause before a failed row is tried again,
    /// doubling with each failure (full jitter; default 1 s).
    pub backoff: Duration,
    /// The ceiling no pause exceeds (default 60 s).
    pub max_backoff: Duration,
    /// Sent rows are deleted once they were sent this long ago (default 7
    /// days).
    pub retention: Duration,
    /// How often the relay deletes expired sent rows (default 10 min).
    pub purge_interval: Duration,
    /// The most rows one purge statement deletes (default 1,000); a purge
    /// repeats it until fewer are left.
    pub purge_batch: u32,
    /// This relay's name in leases and logs: unique across hosts and
    /// restarts (default: host, pid and a random part).
    pub owner: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            retention: Duration::from_secs(7 * 24 * 3600),
            purge_interval: Duration::from_secs(600),
            purge_batch: 1000,
            owner: crate::store::unique_owner("relay"),
        }
    }
}

/// What a relay did so far, and the backlog it last saw: for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Unsent rows in the table, as last counted (about once a second).
    pub pending: u64,
    /// How long the oldest unsent row had waited, as last seen.
    pub oldest_pending: Option<Duration>,
    /// Rows this relay published with a confirm and marked sent.
    pub sent: u64,
    /// Rows this relay published although an earlier publish of the row
    /// may have reached the broker (a relay died or timed out between the
    /// publish and the mark): each is a possible duplicate, logged.
    pub republished: u64,
    /// Publishes that failed (the row backs off and is tried again).
    pub failed: u64,
    /// Rows skipped because their lease was gone before the publish.
    pub lost_leases: u64,
    /// Sent rows deleted after the retention.
    pub purged: u64,
    /// Database operations that failed (the relay pauses and goes on).
    pub database_errors: u64,
}

/// Publishes the rows of an outbox.
#[derive(Debug)]
pub struct Relay;

/// A running relay. Dropping it stops the relay as [`close`](Self::close)
/// does, without waiting.
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    /// The bound on `close`.
    lease: Duration,
    /// Taken by `close`.
    task: Option<JoinHandle<()>>,
    stats: Arc<Mutex<RelayStats>>,
}

impl Relay {
    /// Starts relaying `outbox`'s rows through `publisher`. The relay never
    /// uses the publisher's spool (the outbox is the durable store): a row
    /// is marked sent on the broker's confirm only. The relay does not
    /// close the publisher.
    pub fn start(outbox: Outbox, publisher: Publisher, mut config: RelayConfig) -> RelayHandle {
        config.batch = config.batch.clamp(1, MAX_BATCH);
        config.lease = config.lease.max(Duration::from_secs(1));
        config.poll_interval = config.poll_interval.max(Duration::from_millis(10));
        let lease = config.lease;
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let worker = Worker {
            outbox,
            publisher,
            backoff: Backoff {
                initial: config.backoff,
                max: config.max_backoff,
                max_attempts: None,
            },
            config,
            stats: stats.clone(),
            unmarked: Vec::new(),
            rng: fastrand::Rng::new(),
        };
        let task = tokio::spawn(worker.run(stopped));
        RelayHandle {
            stop,
            lease,
            task: Some(task),
            stats,
        }
    }
}

impl RelayHandle {
    /// A snapshot of the relay's counters.
    pub fn stats(&self) -> RelayStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the relay after the wave it is publishing (bounded by the
    /// publisher's confirm timeout), marking what was confirmed and
    /// releasing the rest of its batch; waits for it, at most the lease
    /// (then it is aborted: its leased rows wait for their lease to run out,
    /// and confirmed ones not yet marked are published again, counted), and
    /// returns its final counters.
    pub async fn close(mut self) -> RelayStats {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(self.lease, &mut task).await.is_err()
        {
            warn!(
                lease = ?self.lease,
                "the outbox relay did not stop within its lease (the database does not answer?); aborting it"
            );
            task.abort();
            let _ = task.await;
        }
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// True when the relay must stop: told to, or its handle is gone.
fn stopping(stopped: &watch::Receiver<bool>) -> bool {
    *stopped.borrow() || stopped.has_changed().is_err()
}

struct Worker {
    outbox: Outbox,
    publisher: Publisher,
    config: RelayConfig,
    backoff: Backoff,
    stats: Arc<Mutex<RelayStats>>,
    /// Rows confirmed whose mark failed: marked first thing next round.
    unmarked: Vec<i64>,
    rng: fastrand::Rng,
}

/// The rows of a batch that were dealt with, and the partitions stopped.
#[derive(Default)]
struct Batch {
    fates: HashMap<i64, Fate>,
    /// Partitions with a row that failed or was skipped: their later rows
    /// wait for the next batch.
    stopped: HashSet<String>,
}

impl Batch {
    /// True unless the row's partition was stopped.
    fn open(&self, row: &LeasedRow) -> bool {
        row.partition_key
            .as_ref()
            .is_none_or(|p| !self.stopped.contains(p))
    }

    fn settle(&mut self, row: &LeasedRow, fate: Fate) {
        if !matches!(fate, Fate::Confirmed)
            && let Some(partition) = &row.partition_key
        {
            self.stopped.insert(partition.clone());
        }
        self.fates.insert(row.id, fate);
    }
}

/// What became of a row of a batch.
enum Fate {
    Confirmed,
    Failed,
    /// Not published in this batch (its partition stopped, its lease was
    /// lost, or the relay is stopping).
    Skipped,
}

impl Worker {
    fn count(&self, update: impl FnOnce(&mut RelayStats)) {
        update(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn database_error(&self, what: &str, error: &OutboxError) {
        self.count(|s| s.database_errors += 1);
        warn!(table = %self.outbox.table(), %error, "outbox relay: {what} failed");
    }

    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        info!(table = %self.outbox.table(), owner = %self.config.owner, "outbox relay started");
        let mut last_purge: Option<Instant> = None;
        let mut last_backlog: Option<Instant> = None;
        let mut database_failures = 0u32;
        while !stopping(&stopped) {
            if last_backlog.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                last_backlog = Some(Instant::now());
                match self.outbox.backlog().await {
                    Ok(backlog) => self.count(|s| {
                        s.pending = backlog.pending;
                        s.oldest_pending = backlog.oldest_pending;
                    }),
                    Err(e) => self.database_error("counting the backlog", &e),
                }
            }
            if last_purge.is_none_or(|at| at.elapsed() >= self.config.purge_interval) {
                last_purge = Some(Instant::now());
                self.purge(&stopped).await;
            }
            let pause = match self.round(&stopped).await {
                Ok(leased) => {
                    database_failures = 0;
                    if leased == self.config.batch as usize {
                        continue;
                    }
                    self.config.poll_interval
                }
                Err(e) => {
                    self.database_error("a batch", &e);
                    database_failures = database_failures.saturating_add(1);
                    self.backoff.delay(database_failures, &mut self.rng)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = crate::wait_true(&mut stopped) => {}
            }
        }
        if !self.unmarked.is_empty() {
            let _ = self.mark_unmarked().await;
        }
        info!(table = %self.outbox.table(), owner = %self.config.owner, "outbox relay stopped");
    }

    /// Marks the confirmed rows sent; kept for the next round if it fails.
    async fn mark_unmarked(&mut self) -> Result<(), OutboxError> {
        let marked = self
            .outbox
            .mark_sent(&self.unmarked, now_ms() as i64)
            .await?;
        debug!(
            rows = self.unmarked.len(),
            marked, "confirmed outbox rows marked sent"
        );
        let confirmed = self.unmarked.len() as u64;
        self.count(|s| s.sent += confirmed);
        self.unmarked.clear();
        Ok(())
    }

    /// Deletes sent rows older than the retention, a bounded batch at a time.
    async fn purge(&self, stopped: &watch::Receiver<bool>) {
        let before = now_ms().saturating_sub(self.config.retention.as_millis() as u64);
        let limit = u64::from(self.config.purge_batch.max(1));
        loop {
            match self.outbox.purge_sent_before(before, limit).await {
                Ok(purged) => {
                    self.count(|s| s.purged += purged);
                    if purged > 0 {
                        debug!(table = %self.outbox.table(), purged, "purged sent outbox rows");
                    }
                    if purged < limit || stopping(stopped) {
                        return;
                    }
                }
                Err(e) => {
                    self.database_error("the retention purge", &e);
                    return;
                }
            }
        }
    }

    /// One batch; returns how many rows were leased.
    async fn round(&mut self, stopped: &watch::Receiver<bool>) -> Result<usize, OutboxError> {
        if !self.unmarked.is_empty() {
            self.mark_unmarked().await?;
        }
        let now = now_ms() as i64;
        let rows = self
            .outbox
            .lease(
                &self.config.owner,
                now,
                now + self.config.lease.as_millis() as i64,
                i64::from(self.config.batch.max(1)),
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut batch = Batch::default();
        // A database failure ends the publishing, never the release of what
        // was not published. Confirmed rows whose mark failed stay leased
        // and in doubt in `unmarked`: marked on the next round, or
        // published again by whoever leases them after the lease (counted
        // then).
        let published = self.publish(&rows, &mut batch, stopped).await;
        let untouched: Vec<i64> = rows
            .iter()
            .filter(|row| matches!(batch.fates.get(&row.id), None | Some(Fate::Skipped)))
            .map(|row| row.id)
            .collect();
        if !untouched.is_empty() {
            self.outbox.release(&self.config.owner, &untouched).await?;
        }
        published.map(|()| rows.len())
    }

    /// Publishes a leased batch wave by wave, recording each row's fate.
    async fn publish(
        &mut self,
        rows: &[LeasedRow],
        batch: &mut Batch,
        stopped: &watch::Receiver<bool>,
    ) -> Result<(), OutboxError> {
        let owner = self.config.owner.clone();
        let lease = self.config.lease.as_millis() as i64;
        for wave in waves(rows) {
            if stopping(stopped) {
                return Ok(());
            }
            let wave: Vec<&LeasedRow> = wave.into_iter().filter(|row| batch.open(row)).collect();
            if wave.is_empty() {
                continue;
            }
            // Renew the lease of every row still to publish, and mark this
            // wave in doubt, right before the publish.
            let remaining: Vec<i64> = rows
                .iter()
                .filter(|row| !batch.fates.contains_key(&row.id) && batch.open(row))
                .map(|row| row.id)
                .collect();
            let wave_ids: Vec<i64> = wave.iter().map(|row| row.id).collect();
            let now = now_ms() as i64;
            let held: HashSet<i64> = self
                .outbox
                .renew(&owner, now, now + lease, &wave_ids, &remaining)
                .await?
                .into_iter()
                .collect();
            let mut messages = Vec::with_capacity(wave.len());
            let mut sending = Vec::with_capacity(wave.len());
            for row in wave {
                if !held.contains(&row.id) {
                    self.count(|s| s.lost_leases += 1);
                    warn!(id = row.id, owner = %owner, "the lease on the outbox row is gone; not publishing it");
                    batch.settle(row, Fate::Skipped);
                    continue;
                }
                match row.message() {
                    Ok(message) => {
                        messages.push(message);
                        sending.push(row);
                    }
                    Err(reason) => {
                        batch.settle(row, Fate::Failed);
                        self.failed(row, &reason, row.in_doubt).await?;
                    }
                }
            }
            if messages.is_empty() {
                continue;
            }
            // Never spooled: a row is marked sent on the broker's confirm
            // only, whatever spool the publisher has.
            let results = self.publisher.publish_batch_confirmed(messages).await;
            let mut confirmed = Vec::new();
            for (row, result) in sending.into_iter().zip(results) {
                match result {
                    Ok(()) => {
                        if row.in_doubt {
                            self.count(|s| s.republished += 1);
                            warn!(
                                id = row.id,
                                message_id = %row.message_id,
                                "outbox row published again: an earlier publish may have reached the broker (possible duplicate)"
                            );
                        }
                        batch.settle(row, Fate::Confirmed);
                        confirmed.push(row.id);
                    }
                    Err(failure) => {
                        batch.settle(row, Fate::Failed);
                        // An ambiguous return (two publishes with one
                        // message-id, one returned) is uncertain although
                        // unroutable: the other may be stored.
                        let in_doubt = row.in_doubt
                            || failure.uncertain
                            || may_have_reached_the_broker(&failure.error);
                        self.failed(row, &failure.error.to_string(), in_doubt)
                            .await?;
                    }
                }
            }
            // Marked right after their wave, while their lease holds: a
            // long batch's later waves do not leave them to run out.
            if !confirmed.is_empty() {
                self.unmarked.extend(confirmed);
                self.mark_unmarked().await?;
            }
        }
        Ok(())
    }

    /// Records a failed publish: the row backs off and is tried again.
    async fn failed(
        &mut self,
        row: &LeasedRow,
        reason: &str,
        in_doubt: bool,
    ) -> Result<(), OutboxError> {
        self.count(|s| s.failed += 1);
        let attempt = u32::try_from(row.attempts.max(0)).unwrap_or(u32::MAX);
        let pause = self.backoff.delay(attempt, &mut self.rng);
        warn!(
            id = row.id,
            message_id = %row.message_id,
            partition = row.partition_key.as_deref().unwrap_or(""),
            attempts = row.attempts + 1,
            retry_in = ?pause,
            %reason,
            "publishing an outbox row failed; it is tried again"
        );
        let next = now_ms() as i64 + pause.as_millis() as i64;
        self.outbox
            .fail(&self.config.owner, row.id, next, reason, in_doubt)
            .await
    }
}

/// The batch in publishing order: wave `n` holds each partition's `n`-th
/// row; the first also holds every row without a partition.
fn waves(rows: &[LeasedRow]) -> Vec<Vec<&LeasedRow>> {
    let mut waves: Vec<Vec<&LeasedRow>> = vec![Vec::new()];
    let mut depth: HashMap<&str, usize> = HashMap::new();
    for row in rows {
        let n = match &row.partition_key {
            None => 0,
            Some(partition) => {
                let next = depth.entry(partition.as_str()).or_insert(0);
                *next += 1;
                *next - 1
            }
        };
        if waves.len() <= n {
            waves.resize_with(n + 1, Vec::new);
        }
        waves[n].push(row);
    }
    waves
}

/// False only for failures that tell the message was not taken by any
/// queue: a later publish of it cannot be a duplicate.
fn may_have_reached_the_broker(error: &PublishError) -> bool {
    !matches!(
        error,
        PublishError::Unroutable { .. }
            | PublishError::Blocked { .. }
            | PublishError::Refused { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, partition: Option<&str>) -> LeasedRow {
        LeasedRow {
            id,
            exchange: String::new(),
            routing_key: String::new(),
            body: Vec::new(),
            properties: "{}".into(),
            message_id: format!("m-{id}"),
            partition_key: partition.map(str::to_owned),
            attempts: 0,
            in_doubt: false,
        }
    }

    /// Dropping the handle ends the relay's task (it spun before: the
    /// stop channel closed, every pause was skipped).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_handle_stops_the_relay() {
        let path = std::env::temp_dir().join(format!(
            "{}.db",
            backstop_testkit::unique("backstop-relay-drop")
        ));
        let pool = super::super::open_pool(&format!("sqlite://{}", path.display()))
            .await
            .expect("pool");
        let outbox = Outbox::new(pool).await.expect("outbox");
        let publisher = Publisher::builder(crate::connection::ConnectionConfig::new(
            "amqp://127.0.0.1:1/%2f",
        ))
        .start()
        .await
        .expect("publisher");
        let handle = Relay::start(outbox, publisher.clone(), RelayConfig::default());
        let task = handle.task.as_ref().expect("running").abort_handle();
        drop(handle);
        backstop_testkit::wait_until("the relay's task ended", Duration::from_secs(5), || {
            let done = task.is_finished();
            async move { done }
        })
        .await;
        publisher.close().await;
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_partition_s_rows_go_out_one_wave_after_the_other() {
        let rows = vec![
            row(1, Some("a")),
            row(2, None),
            row(3, Some("b")),
            row(4, Some("a")),
            row(5, None),
            row(6, Some("a")),
            row(7, Some("b")),
        ];
        let ids: Vec<Vec<i64>> = waves(&rows)
            .iter()
            .map(|wave| wave.iter().map(|r| r.id).collect())
            .collect();
        assert_eq!(ids, vec![vec![1, 2, 3, 5], vec![4, 7], vec![6]]);
    }

    #[test]
    fn only_a_refused_unroutable_or_blocked_publish_is_known_not_stored() {
        let destination = || "x:y".to_owned();
        assert!(!may_have_reached_the_broker(&PublishError::Unroutable {
            destination: destination()
        }));
        assert!(!may_have_reached_the_broker(&PublishError::Blocked {
            destination: destination()
        }));
        assert!(may_have_reached_the_broker(&PublishError::Timeout {
            destination: destination(),
            after: Duration::from_secs(1)
        }));
        assert!(may_have_reached_the_broker(&PublishError::Channel {
            destination: destination(),
            reason: "cut".into()
        }));
        assert!(may_have_reached_the_broker(&PublishError::Nacked {
            destination: destination()
        }));
    }
}
