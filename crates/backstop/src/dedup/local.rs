//! What one consumer's deduplication knows locally about its own claims.
//!
//! Every claim of one [`DedupConfig`](super::DedupConfig) carries the same
//! holder token, and this table records which keys a delivery of this
//! instance is working on:
//! - a key no delivery here runs is claimed with that token; a key still
//!   claimed by this token in the store (a redelivery after a forced close,
//!   a retry copy after a release that failed) is taken over at once, since a
//!   claim with its holder's token extends it. No lease is waited out that no
//!   other instance holds;
//! - a key a delivery here runs makes a second delivery of it wait here, as
//!   a claim held elsewhere would;
//! - a release or a done-mark the store did not take is kept *pending* and
//!   tried again with backoff by a background task until the store answers
//!   or the claim's lease has passed. A delivery of a key whose done-mark is
//!   pending is a duplicate of a handled message (acked without its
//!   handler); one whose release is pending takes the key over.
//!
//! The table is bounded by [`MAX_PENDING`] pending operations.

use super::{DedupError, SeenStore};
use crate::connection::Backoff;
use futures_util::FutureExt;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// The most releases and done-marks kept pending at once; past it a failed
/// one is only logged (a release frees with its lease, a done-mark's key
/// is open to a duplicate once its lease ends).
pub(crate) const MAX_PENDING: usize = 100_000;

/// The pauses between rounds of pending operations while the store fails:
/// 250 ms doubling up to 5 s, jittered. Short, so that the store's return is
/// noticed within seconds; each round is one batch for the store.
const PENDING_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(5),
    max_attempts: None,
};

/// The most pending operations sent in one round.
const ROUND: usize = 512;

/// What is pending for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PendingOp {
    /// Give the key up (the handler failed, or never ran).
    Release,
    /// Mark the key done until `expires_at` (ms since the epoch): the
    /// handler's effect happened.
    Done {
        /// When the done key expires.
        expires_at: u64,
    },
}

#[derive(Debug)]
struct Pending {
    op: PendingOp,
    queue: String,
    /// When the claim's lease ends in the store.
    lease_end: Instant,
    /// The background task is sending it now.
    busy: bool,
}

#[derive(Debug)]
enum KeyState {
    /// A delivery of this instance holds or is claiming the key.
    Running,
    /// A handler that started was cancelled: the effect may have happened.
    /// The key stays out of reach here until its lease ends, as it does in
    /// the store.
    Abandoned {
        until: Instant,
    },
    Pending(Pending),
}

/// What a delivery finds for its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Enter {
    /// The key is this delivery's to claim (or to take over) in the store.
    Entered,
    /// A delivery of this instance works on it, or its pending release is
    /// being sent: wait and look again.
    Busy,
    /// Its handler succeeded here and the done-mark is pending: a duplicate.
    Done,
}

#[derive(Debug, Default)]
struct Table {
    keys: HashMap<(String, String), KeyState>,
    pending: usize,
    /// The background task runs.
    worker: bool,
}

/// Why the store is known down.
#[derive(Debug, Default)]
struct Down {
    since: Option<Instant>,
    error: String,
    /// The probe task runs.
    probing: bool,
}

/// How often a store marked down is probed, so that an idle consumer's
/// readiness comes back with the store and not only with its next message.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(2);

/// The scope of the probe: a release of a key no claim ever holds, one
/// round trip through the store's own API that changes nothing.
const PROBE_SCOPE: &str = "backstop.probe";

/// The holder token, the keys in work here and the pending operations of
/// one [`DedupConfig`](super::DedupConfig).
#[derive(Debug)]
pub(crate) struct LocalClaims {
    token: String,
    store: Arc<dyn SeenStore>,
    table: Mutex<Table>,
    pending_release: AtomicU64,
    pending_done: AtomicU64,
    down: Mutex<Down>,
}

impl LocalClaims {
    pub(crate) fn new(store: Arc<dyn SeenStore>) -> Self {
        LocalClaims {
            token: super::new_token(),
            store,
            table: Mutex::new(Table::default()),
            pending_release: AtomicU64::new(0),
            pending_done: AtomicU64::new(0),
            down: Mutex::new(Down::default()),
        }
    }

    /// The holder token of every claim of this instance.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// Pending releases and done-marks.
    pub(crate) fn pending(&self) -> (u64, u64) {
        (
            self.pending_release.load(Ordering::Relaxed),
            self.pending_done.load(Ordering::Relaxed),
        )
    }

    /// Waits up to `within` for the background task to send what is
    /// pending (a shutdown gives it that long); true when nothing is left.
    pub(crate) async fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.table().pending == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The scopes and keys of `queue` whose done-mark is still pending.
    pub(crate) fn pending_done_marks(&self, queue: &str) -> Vec<(String, String)> {
        self.table()
            .keys
            .iter()
            .filter_map(|(id, state)| match state {
                KeyState::Pending(p)
                    if p.queue == queue && matches!(p.op, PendingOp::Done { .. }) =>
                {
                    Some(id.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Why the store is down, when its last answer was a failure.
    pub(crate) fn down(&self) -> Option<String> {
        let down = lock(&self.down);
        down.since.map(|since| {
            format!(
                "the dedup store is down for {}s ({})",
                since.elapsed().as_secs(),
                down.error
            )
        })
    }

    /// Records how the store's last operation went. A failure starts the
    /// probe task, which clears the mark once the store answers even when
    /// nothing else uses it.
    pub(crate) fn answered(self: &Arc<Self>, result: Result<(), &DedupError>) {
        let mut down = lock(&self.down);
        match result {
            Ok(()) => down.since = None,
            Err(e) => {
                down.since.get_or_insert_with(Instant::now);
                down.error = e.to_string();
                if !down.probing
                    && let Ok(runtime) = tokio::runtime::Handle::try_current()
                {
                    down.probing = true;
                    runtime.spawn(probe(self.clone()));
                }
            }
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// A delivery of `key` starts: see [`Enter`].
    pub(crate) fn enter(&self, scope: &str, key: &str) -> Enter {
        let mut table = self.table();
        let id = (scope.to_owned(), key.to_owned());
        match table.keys.get(&id) {
            None => {}
            Some(KeyState::Running) => return Enter::Busy,
            Some(KeyState::Abandoned { until }) if *until > Instant::now() => return Enter::Busy,
            Some(KeyState::Abandoned { .. }) => {}
            Some(KeyState::Pending(p)) if p.busy => return Enter::Busy,
            Some(KeyState::Pending(p)) => match p.op {
                PendingOp::Done { .. } => return Enter::Done,
                PendingOp::Release => {
                    // Taken over: this delivery's claim extends the one the
                    // release was for.
                    table.pending -= 1;
                    self.pending_release.fetch_sub(1, Ordering::Relaxed);
                }
            },
        }
        table.keys.insert(id, KeyState::Running);
        Enter::Entered
    }

    /// The delivery that entered `key` is done with it.
    pub(crate) fn leave(&self, scope: &str, key: &str) {
        let mut table = self.table();
        let id = (scope.to_owned(), key.to_owned());
        if matches!(table.keys.get(&id), Some(KeyState::Running)) {
            table.keys.remove(&id);
        }
    }

    /// The delivery that entered `key` was cancelled after its handler
    /// started: the key stays out of reach here until `until`.
    pub(crate) fn abandon(&self, scope: &str, key: &str, until: Instant) {
        let mut table = self.table();
        let id = (scope.to_owned(), key.to_owned());
        if matches!(table.keys.get(&id), Some(KeyState::Running)) {
            table.keys.insert(id, KeyState::Abandoned { until });
        }
    }

    /// Keeps `op` for the key the calling delivery entered, to be tried again
    /// until the store takes it or `lease_end` passes. False when the table
    /// is full: the key is left to its lease.
    pub(crate) fn pend(
        self: &Arc<Self>,
        scope: &str,
        key: &str,
        queue: &str,
        op: PendingOp,
        lease_end: Instant,
    ) -> bool {
        let mut table = self.table();
        let id = (scope.to_owned(), key.to_owned());
        if table.pending >= MAX_PENDING {
            if matches!(table.keys.get(&id), Some(KeyState::Running)) {
                table.keys.remove(&id);
            }
            return false;
        }
        table.pending += 1;
        match op {
            PendingOp::Release => self.pending_release.fetch_add(1, Ordering::Relaxed),
            PendingOp::Done { .. } => self.pending_done.fetch_add(1, Ordering::Relaxed),
        };
        table.keys.insert(
            id,
            KeyState::Pending(Pending {
                op,
                queue: queue.to_owned(),
                lease_end,
                busy: false,
            }),
        );
        if !table.worker {
            table.worker = true;
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(work(self.clone()));
            } else {
                table.worker = false;
            }
        }
        true
    }

    /// Forgets a pending entry (sent, or past its lease).
    fn settle(&self, table: &mut Table, id: &(String, String)) {
        if let Some(KeyState::Pending(p)) = table.keys.remove(id) {
            table.pending -= 1;
            match p.op {
                PendingOp::Release => self.pending_release.fetch_sub(1, Ordering::Relaxed),
                PendingOp::Done { .. } => self.pending_done.fetch_sub(1, Ordering::Relaxed),
            };
        }
    }

    async fn send(&self, scope: &str, key: &str, op: PendingOp) -> Result<(), DedupError> {
        let store = &self.store;
        let call = std::panic::catch_unwind(AssertUnwindSafe(|| match op {
            PendingOp::Release => store.release(scope, key, &self.token),
            PendingOp::Done { expires_at } => store.complete(scope, key, &self.token, expires_at),
        }));
        let panicked = |_| DedupError::Unavailable("the store implementation panicked".into());
        match call {
            Ok(future) => AssertUnwindSafe(future)
                .catch_unwind()
                .await
                .unwrap_or_else(|p| Err(panicked(p))),
            Err(p) => Err(panicked(p)),
        }
    }
}

/// Probes the store every [`PROBE_EVERY`] while it is marked down; ends once
/// an answer (the probe's or any other operation's) cleared the mark.
async fn probe(local: Arc<LocalClaims>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        {
            let mut down = lock(&local.down);
            if down.since.is_none() {
                down.probing = false;
                return;
            }
        }
        let result = local
            .send(PROBE_SCOPE, &local.token, PendingOp::Release)
            .await;
        if result.is_ok() {
            info!("the dedup store answers again");
        }
        local.answered(result.as_ref().map(|_| ()));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends the pending operations in rounds until none is left: at once while
/// the store answers, after a backoff while it fails. A done-mark whose
/// lease passed before the store took it is logged as the duplicate window
/// it is.
async fn work(local: Arc<LocalClaims>) {
    let mut rng = fastrand::Rng::new();
    let mut failures = 0u32;
    loop {
        let now = Instant::now();
        let mut next_lease_end: Option<Instant> = None;
        let round: Vec<((String, String), PendingOp)> = {
            let mut table = local.table();
            let expired: Vec<(String, String)> = table
                .keys
                .iter()
                .filter_map(|(id, state)| match state {
                    KeyState::Pending(p) if !p.busy && p.lease_end <= now => Some(id.clone()),
                    KeyState::Abandoned { until } if *until <= now => Some(id.clone()),
                    _ => None,
                })
                .collect();
            for id in &expired {
                match table.keys.get(id) {
                    Some(KeyState::Pending(p)) => {
                        match p.op {
                            PendingOp::Done { .. } => {
                                error!(queue = %p.queue, scope = %id.0, key = %id.1,
                                "duplicate window: the key could not be marked done before its lease ran out; \
                                 a duplicate of this handled message may run its handler again")
                            }
                            PendingOp::Release => {
                                info!(queue = %p.queue, scope = %id.0, key = %id.1,
                                "a pending release ended with its lease; the key is free")
                            }
                        }
                        local.settle(&mut table, id);
                    }
                    _ => {
                        table.keys.remove(id);
                    }
                }
            }
            if table.pending == 0 {
                table.worker = false;
                return;
            }
            let mut round = Vec::new();
            for (id, state) in table.keys.iter_mut() {
                if let KeyState::Pending(p) = state {
                    if matches!(p.op, PendingOp::Done { .. }) {
                        next_lease_end =
                            Some(next_lease_end.map_or(p.lease_end, |t| t.min(p.lease_end)));
                    }
                    if !p.busy && round.len() < ROUND {
                        p.busy = true;
                        round.push((id.clone(), p.op));
                    }
                }
            }
            round
        };
        let results = futures_util::future::join_all(
            round
                .iter()
                .map(|((scope, key), op)| local.send(scope, key, *op)),
        )
        .await;
        let mut failed = None;
        {
            let mut table = local.table();
            for ((id, _), result) in round.iter().zip(results) {
                match result {
                    Ok(()) => local.settle(&mut table, id),
                    Err(e) => {
                        if let Some(KeyState::Pending(p)) = table.keys.get_mut(id) {
                            p.busy = false;
                        }
                        failed = Some(e);
                    }
                }
            }
        }
        match failed {
            None => {
                if failures > 0 {
                    info!(
                        sent = round.len(),
                        "the dedup store answers again; pending releases and done-marks sent"
                    );
                }
                local.answered(Ok(()));
                failures = 0;
                if round.is_empty() {
                    // Only busy or abandoned entries: look again shortly.
                    tokio::time::sleep(PENDING_BACKOFF.initial).await;
                }
            }
            Some(e) => {
                local.answered(Err(&e));
                let (release, done) = local.pending();
                let mut pause = PENDING_BACKOFF
                    .ceiling(failures)
                    .mul_f64(0.5 + rng.f64() / 2.0);
                failures = failures.saturating_add(1);
                // A done-mark is tried once more before its lease ends.
                if let Some(end) = next_lease_end {
                    let before = end
                        .saturating_duration_since(Instant::now())
                        .saturating_sub(Duration::from_secs(1));
                    pause = pause.min(before.max(Duration::from_millis(50)));
                }
                warn!(error = %e, release, done, retry_in = ?pause,
                    "the dedup store did not take pending releases and done-marks; trying again");
                tokio::time::sleep(pause).await;
            }
        }
    }
}
