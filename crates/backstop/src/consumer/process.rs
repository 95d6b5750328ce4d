//! One delivery's life inside its handler task: call the handler (catching a
//! panic), retry in process, then carry out the retry policy's decision:
//! publish the retry or dead-letter copy with a confirm. Only the resulting
//! [`Settlement`] goes back to the consumer, which sends the ack, reject or
//! nack on the delivery's own channel.
//!
//! Publishing here, in the task, keeps confirm round trips off the dispatch
//! loop, so a slow confirm never holds back other deliveries.

use super::{ConsumerStats, bump};
use crate::connection::Backoff;
use crate::dedup::local::{Enter, PendingOp};
use crate::dedup::{Claim, DedupConfig, MissingKey};
use crate::handler::{Delivery, FailureKind, Handler, Outcome};
use crate::publish::{ConfirmedPublisher, PublishError};
use crate::retry::{
    Decision, Exhausted, FailedMessage, RetryPolicy, attempt_of, delivery_count, now_ms,
};
use crate::store::{CompensationStore, NewFailedMessage};
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tracing::{debug, error, info, warn};

/// What the consumer sends for a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// `basic.ack`: done, or a copy is safely stored elsewhere.
    Ack,
    /// `basic.reject` without requeue: a permanent failure without a policy
    /// on a queue with a dead-letter exchange of its own, left to it.
    Reject,
    /// `basic.nack` with requeue: try again later, nothing was stored.
    Requeue,
}

/// How the handler did, for the circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Success,
    Transient,
    /// Permanent failures and requeues say nothing about the downstream.
    Neutral,
}

/// Shared by every handler task of one consumer.
#[derive(Debug)]
pub(crate) struct ProcessContext {
    pub(crate) queue: String,
    pub(crate) policy: Option<RetryPolicy>,
    pub(crate) max_retry_delay: Duration,
    pub(crate) handler_timeout: Option<Duration>,
    /// Larger bodies are not handled but sent down the exhausted path.
    pub(crate) max_message_size: usize,
    pub(crate) store: Option<Arc<dyn CompensationStore>>,
    /// When the scanner first re-drives a stored row.
    pub(crate) store_delay: Duration,
    /// Deduplication by business key, when configured.
    pub(crate) dedup: Option<DedupConfig>,
    /// With deduplication, deliveries claim their keys outside the handler
    /// limit and these permits bound the handlers themselves. Each session
    /// has its own: a handler of an ended session that hangs on keeps its
    /// permit, and must not take one of the new session's.
    pub(crate) handler_permits: std::sync::Mutex<Arc<tokio::sync::Semaphore>>,
    /// True while the circuit breaker is open or half-open.
    pub(crate) breaker_tripped: AtomicBool,
    /// The generation of the session consuming now: a delivery of an older
    /// one that has not started its handler never will.
    pub(crate) generation: AtomicU64,
    /// The quorum delivery limit to stay under: a delivery whose
    /// `x-delivery-count` is this close to it is never requeued.
    pub(crate) delivery_limit: Option<u64>,
    /// The consumed queue has a dead-letter exchange of its own: without a
    /// policy, a permanent failure is a plain `basic.reject` to it.
    pub(crate) queue_dead_letters: bool,
    pub(crate) stats: Arc<ConsumerStats>,
    /// True once the consumer is shutting down: a delivery waiting for its
    /// dedup claim gives up at once (its handler never started).
    pub(crate) stop: tokio::sync::watch::Receiver<bool>,
}

impl ProcessContext {
    /// True when `generation`'s session is no longer the one consuming.
    fn is_stale(&self, generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) != generation
    }

    /// True once the consumer is shutting down.
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Runs `work` unless the consumer stops first: `None` on a stop.
    async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        let mut stop = self.stop.clone();
        tokio::select! {
            out = work => Some(out),
            _ = stop.wait_for(|stopping| *stopping) => None,
        }
    }

    /// True when a failure may end in a copy: a retry policy, or a queue
    /// that does not dead-letter by itself (permanent failures go to
    /// `<queue>.dlq`). Such deliveries keep a copy for the failure path and
    /// the session needs a publisher.
    pub(crate) fn needs_publisher(&self) -> bool {
        self.policy.is_some() || !self.queue_dead_letters
    }

    /// The limit, when the next return of a delivery with `count` returns
    /// behind it would leave it at the limit, where any further return (a
    /// crash, a closed channel) makes the broker drop or dead-letter it.
    fn near_limit(&self, count: u64) -> Option<u64> {
        self.delivery_limit
            .filter(|limit| count.saturating_add(1) >= *limit)
    }

    /// The handler permits of the session starting now. The old session's
    /// are closed: its deliveries still waiting for one stop waiting, find
    /// their session ended and release their keys without running.
    pub(crate) fn renew_permits(&self, concurrency: usize) {
        if self.dedup.is_some() {
            let fresh = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let old = std::mem::replace(
                &mut *self
                    .handler_permits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
                fresh,
            );
            old.close();
        }
    }

    fn permits(&self) -> Arc<tokio::sync::Semaphore> {
        self.handler_permits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Runs a call into a user-supplied store (a [`CompensationStore`] or a
/// dedup `SeenStore`), turning a panic in it, when called or when polled,
/// into an error with the panic's text: that delivery fails the way a store
/// that is down fails it (requeued after a pause, counted), and the
/// consumer goes on.
async fn guarded<T, E, F: Future<Output = Result<T, E>>>(
    call: impl FnOnce() -> F,
    failed: impl FnOnce(String) -> E,
) -> Result<T, E> {
    let panicked = |payload: Box<dyn std::any::Any + Send>| {
        failed(format!(
            "the store implementation panicked: {}",
            panic_text(&*payload)
        ))
    };
    match std::panic::catch_unwind(AssertUnwindSafe(call)) {
        Ok(future) => match AssertUnwindSafe(future).catch_unwind().await {
            Ok(result) => result,
            Err(payload) => Err(panicked(payload)),
        },
        Err(payload) => Err(panicked(payload)),
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Pause before requeueing a message whose copy could not be stored, so a
/// broken publish path slows the consumer down instead of spinning.
const PUBLISH_FAILURE_PAUSE: Duration = Duration::from_secs(1);

/// The pauses between attempts at a copy or store write that failed for a
/// transient reason: 1 s, doubling after each further failure, up to 30 s,
/// each between half its ceiling and all of it (see [`jittered`]), so the
/// held deliveries of one outage do not retry in lockstep.
const HOLD_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(30),
    max_attempts: None,
};

/// How long a delivery whose copy or store write keeps failing for a
/// transient reason (a resource alarm, a publishing connection or database
/// that is down) is held and tried again in process before it is requeued.
/// Requeueing at once would spin it through the queue, re-running its
/// handler, and on a quorum queue each requeue is a return that counts
/// towards the delivery limit.
const TRANSIENT_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// How long a failed copy or store write is tried again in process.
#[derive(Clone, Copy, Debug)]
struct Hold {
    /// The session the delivery came from: once it ended, its tag is dead
    /// and trying again is pointless.
    generation: u64,
    /// `None`: until it succeeds (a delivery one return from its limit).
    window: Option<Duration>,
}

impl Hold {
    /// For up to [`TRANSIENT_RETRY_WINDOW`], then the delivery is requeued.
    fn bounded(generation: u64) -> Self {
        Hold {
            generation,
            window: Some(TRANSIENT_RETRY_WINDOW),
        }
    }

    /// Until it succeeds or the delivery's session ends.
    fn until_done(generation: u64) -> Self {
        Hold {
            generation,
            window: None,
        }
    }
}

/// Why one attempt at a copy or a store row failed.
#[derive(Debug)]
struct Failed {
    error: String,
    /// Trying again may succeed: blocked, timed out, nacked, a channel or
    /// connection that failed while the publisher is not broken, a store
    /// that is unavailable. Not: a copy that came back unroutable or a
    /// publisher the broker broke (the session ends and the next declares
    /// the topology again), nothing to publish or store with.
    transient: bool,
}

/// Runs `attempt` until it succeeds, with exponential backoff
/// ([`HOLD_BACKOFF`]'s ceilings) while it fails for a
/// transient reason, within `hold`. True once it succeeded; false when the
/// caller should requeue the original: a failure that is not transient
/// (after [`PUBLISH_FAILURE_PAUSE`]), the window used up, or the session
/// ended (the runtime drops the dead tag). Each failed attempt is logged,
/// the first as an error.
async fn persist<Fut: Future<Output = Result<(), Failed>>>(
    ctx: &ProcessContext,
    hold: Hold,
    what: &str,
    mut attempt: impl FnMut() -> Fut,
) -> bool {
    let queue = &ctx.queue;
    let started = tokio::time::Instant::now();
    let mut attempts = 0u32;
    loop {
        let Err(failed) = attempt().await else {
            if attempts > 0 {
                info!(%queue, what, attempts = attempts + 1, "stored after failed attempts");
            }
            return true;
        };
        attempts += 1;
        let pause = jittered(HOLD_BACKOFF.ceiling(attempts - 1));
        let error = &failed.error;
        if ctx.is_stale(hold.generation) {
            debug!(%queue, what, %error, "failed, and the delivery's session ended: the broker has it back");
            return false;
        }
        let window_left = hold
            .window
            .is_none_or(|window| started.elapsed() + pause <= window);
        if !failed.transient || !window_left {
            let why = if failed.transient {
                "still failing after the retry window"
            } else {
                "not worth trying again"
            };
            error!(%queue, what, attempt = attempts, %error, why, "failed; the original stays and is requeued");
            if !failed.transient {
                tokio::time::sleep(PUBLISH_FAILURE_PAUSE).await;
            }
            return false;
        }
        if attempts == 1 {
            error!(%queue, what, attempt = attempts, %error, retry_in = ?pause,
                "failed; the original is held unacked and tried again");
        } else {
            warn!(%queue, what, attempt = attempts, %error, retry_in = ?pause,
                "failed again; the original is held unacked and tried again");
        }
        tokio::time::sleep(pause).await;
        if ctx.is_stale(hold.generation) {
            debug!(%queue, what, "the delivery's session ended while it was held: the broker has it back");
            return false;
        }
    }
}

/// One handler call. A panic or a timeout is a transient failure.
///
/// Every delivery carries this future, so it is built from combinators (no
/// async block that would hold a second copy of the handler's future), and
/// the timer of a handler timeout is boxed only when one is configured.
fn call<'a, H: Handler>(
    handler: &'a H,
    delivery: Delivery,
    ctx: &'a ProcessContext,
) -> impl Future<Output = Outcome> + Send + 'a {
    use futures_util::future::Either;
    let guarded = AssertUnwindSafe(handler.handle(delivery)).catch_unwind();
    match ctx.handler_timeout {
        None => Either::Left(guarded.map(move |result| outcome_of(result, ctx))),
        Some(limit) => Either::Right(Box::pin(tokio::time::timeout(limit, guarded)).map(
            move |timed| match timed {
                Ok(result) => outcome_of(result, ctx),
                Err(_) => {
                    bump(&ctx.stats.timeouts, 1);
                    warn!(queue = %ctx.queue, ?limit, "handler timed out; counting it as a transient failure");
                    Outcome::retry(format!("handler timed out after {limit:?}"))
                }
            },
        )),
    }
}

/// The handler's outcome, or a transient failure for a panic.
fn outcome_of(result: std::thread::Result<Outcome>, ctx: &ProcessContext) -> Outcome {
    match result {
        Ok(outcome) => outcome,
        Err(payload) => {
            bump(&ctx.stats.panics, 1);
            let reason = panic_text(&*payload);
            warn!(queue = %ctx.queue, %reason, "handler panicked; counting it as a transient failure");
            Outcome::retry(format!("handler panicked: {reason}"))
        }
    }
}

/// One delivery's future, boxed once, ending in `done`. The plain path
/// stays small; the rare ones (oversized, deduplicated, failed with a
/// policy) box their own state.
pub(crate) fn process<H: Handler, T>(
    handler: Arc<H>,
    ctx: Arc<ProcessContext>,
    publisher: Option<ConfirmedPublisher>,
    delivery: Delivery,
    generation: u64,
    done: impl FnOnce((Settlement, Verdict)) -> T + Send + 'static,
) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>> {
    if ctx.delivery_limit.is_some() {
        let count = delivery_count(&delivery);
        if let Some(limit) = ctx.near_limit(count) {
            // The dedup permits are the dispatching session's, taken now.
            let permits = ctx.permits();
            return Box::pin(
                Box::pin(near_the_limit(
                    handler,
                    ctx,
                    publisher,
                    delivery,
                    generation,
                    permits,
                    (limit, count),
                ))
                .map(done),
            );
        }
    }
    if delivery.body().len() > ctx.max_message_size {
        return Box::pin(
            Box::pin(oversized(handler, ctx, publisher, delivery, generation)).map(done),
        );
    }
    if ctx.dedup.is_some() {
        let permits = ctx.permits();
        return Box::pin(
            Box::pin(deduplicated(
                handler, ctx, publisher, delivery, generation, permits,
            ))
            .map(done),
        );
    }
    Box::pin(handle(handler, ctx, publisher, delivery, generation).map(done))
}

/// A delivery one return away from the queue's delivery limit: processed as
/// usual, but an outcome that would requeue it (the handler asked, a retry
/// without a policy, a failed copy or store write, a busy or failing dedup
/// store, the circuit breaker) takes the exhausted path instead, with the
/// reason. It is never requeued by choice: when the exhausted path fails
/// too (a resource alarm, the publishing connection or the store down), the
/// delivery is held unacked and the exhausted path tried again with
/// backoff until it succeeds, because on a queue without a dead-letter
/// exchange the broker drops a message past its limit. Only a delivery
/// whose session ended (its tag is dead, the broker has it back already) or
/// a copy that cannot succeed on this session's publisher (unroutable, a
/// channel the broker closed: the session ends and the next declares the
/// topology) goes back.
async fn near_the_limit<H: Handler>(
    handler: Arc<H>,
    ctx: Arc<ProcessContext>,
    publisher: Option<ConfirmedPublisher>,
    delivery: Delivery,
    generation: u64,
    permits: Arc<tokio::sync::Semaphore>,
    (limit, count): (u64, u64),
) -> (Settlement, Verdict) {
    let kept = delivery.clone();
    let (settlement, verdict) = if delivery.body().len() > ctx.max_message_size {
        oversized(
            handler,
            ctx.clone(),
            publisher.clone(),
            delivery,
            generation,
        )
        .await
    } else if ctx.dedup.is_some() {
        deduplicated(
            handler,
            ctx.clone(),
            publisher.clone(),
            delivery,
            generation,
            permits,
        )
        .await
    } else {
        handle(
            handler,
            ctx.clone(),
            publisher.clone(),
            delivery,
            generation,
        )
        .await
    };
    // A delivery of an ended session went back with its channel already.
    if settlement != Settlement::Requeue || ctx.is_stale(generation) {
        return (settlement, verdict);
    }
    let reason = format!("delivery limit {limit} nearly reached (x-delivery-count={count})");
    warn!(queue = %ctx.queue, %reason, "not requeueing: taking the exhausted path");
    let failed = FailedMessage::new(&ctx.queue, &kept, FailureKind::Transient, &reason);
    let hold = Hold::until_done(generation);
    let (settlement, _) = exhausted(&ctx, publisher, &kept, &failed, verdict, hold).await;
    if settlement == Settlement::Requeue && !ctx.is_stale(generation) {
        error!(queue = %ctx.queue, %reason,
            "the exhausted path cannot succeed on this session's publisher: requeueing at the \
             delivery limit; the next session declares the topology again");
    }
    (settlement, verdict)
}

fn handle<H: Handler>(
    handler: Arc<H>,
    ctx: Arc<ProcessContext>,
    publisher: Option<ConfirmedPublisher>,
    delivery: Delivery,
    generation: u64,
) -> impl Future<Output = (Settlement, Verdict)> + Send {
    // The copy kept for the failure path is a reference count (a delivery
    // is one pointer), taken only when a failure may end in a copy; the
    // failure handling (headers, publish futures) is boxed and only
    // allocated when a delivery actually fails.
    let kept = ctx.needs_publisher().then(|| delivery.clone());
    async move {
        let outcome = call(&*handler, delivery, &ctx).await;
        match (outcome, kept) {
            (Outcome::Ack, _) => (Settlement::Ack, Verdict::Success),
            (outcome, Some(kept)) if ctx.policy.is_some() => {
                Box::pin(after_failure(
                    handler, ctx, publisher, kept, outcome, generation,
                ))
                .await
            }
            (outcome, kept) => {
                Box::pin(without_policy(outcome, &ctx, publisher, kept, generation)).await
            }
        }
    }
}

/// A body over the size limit never reaches the handler: it is a
/// permanent failure with the sizes in the reason. The body is not copied;
/// a dead-letter or store copy reads the one buffer lapin received.
async fn oversized<H: Handler>(
    handler: Arc<H>,
    ctx: Arc<ProcessContext>,
    publisher: Option<ConfirmedPublisher>,
    delivery: Delivery,
    generation: u64,
) -> (Settlement, Verdict) {
    bump(&ctx.stats.oversized, 1);
    let reason = format!(
        "the message is {} bytes, over the limit of {} bytes",
        delivery.body().len(),
        ctx.max_message_size
    );
    warn!(queue = %ctx.queue, %reason, "not handling an oversized message");
    let outcome = Outcome::reject(reason);
    if ctx.policy.is_some() {
        after_failure(handler, ctx, publisher, delivery, outcome, generation).await
    } else {
        without_policy(outcome, &ctx, publisher, Some(delivery), generation).await
    }
}

/// Claims the delivery's key, runs the handler only for a fresh claim, then
/// marks the key done (success) or releases it (any failure, so the retry
/// can claim it).
///
/// Claims are bookkeeping and run for every prefetched delivery at once, so
/// the store can write them in large batches; only the handler waits for one
/// of the `concurrency` permits. A claim that waited long for its permit is
/// extended with the same token just before the handler runs, so its lease
/// always covers the handler: without that, the last of a prefetch window
/// could wait past its lease and a second instance would claim the same key
/// and run the same effect. A delivery of a session that ended while it
/// waited never runs: the broker redelivers it.
async fn deduplicated<H: Handler>(
    handler: Arc<H>,
    ctx: Arc<ProcessContext>,
    publisher: Option<ConfirmedPublisher>,
    delivery: Delivery,
    generation: u64,
    permits: Arc<tokio::sync::Semaphore>,
) -> (Settlement, Verdict) {
    let shared = ctx.clone();
    let Some(dedup) = &shared.dedup else {
        return handle(handler, ctx, publisher, delivery, generation).await;
    };
    let queue = &ctx.queue;
    let key = match dedup.key.extract(&delivery) {
        Ok(key) => key,
        Err(reason) => {
            bump(&ctx.stats.missing_keys, 1);
            return match dedup.missing {
                MissingKey::Process => {
                    warn!(%queue, key = %dedup.key, %reason, "no dedup key: handling without deduplication");
                    let _permit = permits.acquire().await;
                    if ctx.is_stale(generation) {
                        return (Settlement::Requeue, Verdict::Neutral);
                    }
                    handle(handler, ctx.clone(), publisher, delivery, generation).await
                }
                MissingKey::Reject => {
                    warn!(%queue, key = %dedup.key, %reason, "no dedup key: rejecting");
                    let outcome =
                        Outcome::reject(format!("no dedup key ({}): {reason}", dedup.key));
                    if ctx.policy.is_some() {
                        after_failure(handler, ctx, publisher, delivery, outcome, generation).await
                    } else {
                        without_policy(outcome, &ctx, publisher, Some(delivery), generation).await
                    }
                }
            };
        }
    };
    let scope = dedup.scope.as_deref().unwrap_or(queue);
    let mut claim = HeldClaim::new(dedup, queue, scope, &key);
    let started = tokio::time::Instant::now();
    let mut store_failures = 0u32;
    loop {
        // After a store error this delivery still owns the key here: it
        // claims again (same token) rather than meeting its own entry as a
        // busy key, which would drop the entry and count the wait against
        // `max_wait`.
        if ctx.stopping() {
            // Shutting down before the handler started: the broker
            // redelivers it. Dropping the claim leaves its release pending.
            debug!(%queue, %key, "shutting down while waiting for the dedup claim; requeueing");
            return (Settlement::Requeue, Verdict::Neutral);
        }
        if ctx.is_stale(generation) {
            // The session ended (a cut, a restart) while this delivery waited
            // for its key: its tag is dead and the broker delivers it again.
            // Waiting on (up to `max_wait` for a busy key) would keep it
            // among the handlers of ended sessions, which bound how many
            // deliveries the next session may start.
            debug!(%queue, %key, "the session ended while waiting for the dedup claim; the broker has it back");
            return (Settlement::Requeue, Verdict::Neutral);
        }
        // A claim once sent is never cancelled by the stop: the SQL writers
        // run a batch's releases before its claims, so a release sent by a
        // dropped claim could land before the claim it frees and strand the
        // key for a whole lease. The claim returns (or fails) on the store's
        // own timeouts, and the check above requeues on the next pass.
        let answer = if claim.entered {
            claim.claim().await
        } else {
            match dedup.local.enter(scope, &key) {
                Enter::Done => {
                    // Handled here; its done-mark is pending while the store is
                    // down. The effect happened: this is a duplicate.
                    bump(&ctx.stats.duplicates, 1);
                    debug!(%queue, %key, "duplicate of a message handled here (its done-mark is pending): acking without the handler");
                    return (Settlement::Ack, Verdict::Neutral);
                }
                Enter::Busy => Ok(Claim::InProgress),
                Enter::Entered => {
                    claim.entered = true;
                    claim.claim().await
                }
            }
        };
        match answer {
            Ok(Claim::Claimed) if ctx.stopping() => {
                // The claim completed, so the release its drop leaves
                // pending comes after it in the store.
                debug!(%queue, %key, "shutting down before the handler started; requeueing");
                return (Settlement::Requeue, Verdict::Neutral);
            }
            Ok(Claim::Claimed) => break,
            Ok(Claim::Done) => {
                claim.forget();
                bump(&ctx.stats.duplicates, 1);
                debug!(%queue, %key, "duplicate of a handled message: acking without the handler");
                return (Settlement::Ack, Verdict::Neutral);
            }
            Ok(Claim::InProgress) => {
                claim.forget();
                if started.elapsed() >= dedup.max_wait {
                    bump(&ctx.stats.dedup_busy, 1);
                    info!(%queue, %key, waited = ?dedup.max_wait,
                        "the key is still being handled elsewhere; requeueing this duplicate");
                    return (Settlement::Requeue, Verdict::Neutral);
                }
                ctx.unless_stopped(tokio::time::sleep(dedup.recheck)).await;
            }
            Err(e) => {
                // The claim may have been written before the error: the
                // next attempt extends it (same token), and giving up leaves
                // its release pending.
                bump(&ctx.stats.dedup_failures, 1);
                let pause = jittered(CLAIM_BACKOFF.ceiling(store_failures));
                store_failures += 1;
                if ctx.is_stale(generation) || started.elapsed() + pause > TRANSIENT_RETRY_WINDOW {
                    error!(%queue, error = %e, "cannot claim the dedup key; the message is requeued unhandled");
                    drop(claim);
                    return (Settlement::Requeue, Verdict::Neutral);
                }
                if store_failures == 1 {
                    error!(%queue, %key, error = %e, retry_in = ?pause,
                        "cannot claim the dedup key; the message is held unacked and tried again");
                } else {
                    warn!(%queue, %key, error = %e, retry_in = ?pause,
                        "cannot claim the dedup key yet; the message is held unacked and tried again");
                }
                ctx.unless_stopped(tokio::time::sleep(pause)).await;
            }
        }
    }
    let Some(_permit) = ctx.unless_stopped(permits.acquire()).await else {
        debug!(%queue, %key, "shutting down before a handler slot was free; requeueing");
        return (Settlement::Requeue, Verdict::Neutral);
    };
    if ctx.is_stale(generation) {
        // The session ended while this delivery waited: its tag is dead and
        // the broker redelivers it. Dropping the claim releases the key.
        debug!(%queue, %key, "the session ended before the handler started; releasing the key");
        return (Settlement::Requeue, Verdict::Neutral);
    }
    if claim.claimed_at.elapsed() >= dedup.lease / 10 {
        match claim.claim().await {
            Ok(Claim::Claimed) => {}
            Ok(other) => {
                // The lease ran out while waiting and the key moved on. When
                // a store merged this extension with a rival's claim in one
                // batch, this token may still hold the key: let it go.
                if other == Claim::InProgress {
                    claim.release().await;
                } else {
                    claim.forget();
                }
                bump(&ctx.stats.dedup_busy, 1);
                warn!(%queue, %key, now = ?other,
                    "the claim's lease ran out before a handler slot was free; not handling");
                return match other {
                    Claim::Done => {
                        bump(&ctx.stats.duplicates, 1);
                        (Settlement::Ack, Verdict::Neutral)
                    }
                    _ => (Settlement::Requeue, Verdict::Neutral),
                };
            }
            Err(e) => {
                bump(&ctx.stats.dedup_failures, 1);
                error!(%queue, error = %e, "cannot extend the dedup claim; the message is requeued unhandled");
                return (Settlement::Requeue, Verdict::Neutral);
            }
        }
    }
    // From here the effect may happen: a cancelled handler (shutdown
    // timeout) leaves the key to its lease rather than freeing it for a
    // redelivery that would run the effect a second time.
    claim.started = true;
    let (settlement, verdict) = handle(handler, ctx.clone(), publisher, delivery, generation).await;
    if verdict == Verdict::Success {
        let expires_at = now_ms() + dedup.ttl.as_millis() as u64;
        // The handler's work is done: acking is right even when the
        // done-mark has to wait for the store (see `complete`).
        claim.complete(expires_at).await;
    } else {
        claim.release().await;
    }
    (settlement, verdict)
}

/// The pauses between claims of a delivery while the dedup store fails:
/// 250 ms doubling up to 5 s, jittered. The delivery is held unacked
/// meanwhile (up to [`TRANSIENT_RETRY_WINDOW`]) rather than spun through the
/// queue.
const CLAIM_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(5),
    max_attempts: None,
};

/// Between half of `ceiling` and all of it: a backoff that still grows, with
/// jitter so held deliveries do not retry in lockstep.
fn jittered(ceiling: Duration) -> Duration {
    ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// A dedup claim this delivery may hold, under the configuration's holder
/// token. Dropped while it may still hold the key and before its handler
/// started (the future was cancelled, or gave up), it leaves the key's
/// release pending, so a redelivery does not wait out the lease. Once the
/// handler started, a drop keeps the key until its lease ends: the effect
/// may have happened.
struct HeldClaim<'a> {
    dedup: &'a DedupConfig,
    queue: &'a str,
    scope: &'a str,
    key: &'a str,
    claimed_at: tokio::time::Instant,
    /// True while this delivery owns the key in the local table.
    entered: bool,
    /// True while this token may hold the key.
    may_hold: bool,
    /// True once the handler started: a drop no longer releases the key.
    started: bool,
}

impl<'a> HeldClaim<'a> {
    fn new(dedup: &'a DedupConfig, queue: &'a str, scope: &'a str, key: &'a str) -> Self {
        HeldClaim {
            dedup,
            queue,
            scope,
            key,
            claimed_at: tokio::time::Instant::now(),
            entered: false,
            may_hold: false,
            started: false,
        }
    }

    /// When this claim's lease ends in the store.
    fn lease_end(&self) -> tokio::time::Instant {
        self.claimed_at + self.dedup.lease
    }

    /// Claims the key, or extends this token's claim, for a full lease.
    async fn claim(&mut self) -> Result<Claim, crate::dedup::DedupError> {
        self.may_hold = true;
        self.claimed_at = tokio::time::Instant::now();
        let lease_until = now_ms() + self.dedup.lease.as_millis() as u64;
        let local = &self.dedup.local;
        let result = guarded(
            || {
                self.dedup
                    .store
                    .claim(self.scope, self.key, local.token(), lease_until)
            },
            crate::dedup::DedupError::Unavailable,
        )
        .await;
        local.answered(result.as_ref().map(|_| ()));
        result
    }

    /// This token does not hold the key, and this delivery is done with it.
    fn forget(&mut self) {
        self.may_hold = false;
        if std::mem::take(&mut self.entered) {
            self.dedup.local.leave(self.scope, self.key);
        }
    }

    /// Sends `op`; when the store fails, keeps it pending (see
    /// [`LocalClaims`](crate::dedup::local::LocalClaims)).
    async fn finish(&mut self, op: PendingOp) {
        let (dedup, scope, key, queue) = (self.dedup, self.scope, self.key, self.queue);
        let local = &dedup.local;
        let token = local.token();
        let result = guarded(
            || match op {
                PendingOp::Release => dedup.store.release(scope, key, token),
                PendingOp::Done { expires_at } => {
                    dedup.store.complete(scope, key, token, expires_at)
                }
            },
            crate::dedup::DedupError::Unavailable,
        )
        .await;
        local.answered(result.as_ref().map(|_| ()));
        self.may_hold = false;
        self.entered = false;
        let Err(e) = result else {
            local.leave(scope, key);
            return;
        };
        let kept = local.pend(scope, key, queue, op, self.lease_end());
        match (op, kept) {
            (PendingOp::Done { .. }, true) => {
                warn!(%queue, %key, error = %e,
                    "could not mark the key done yet; acking (the effect happened), the done-mark is \
                     pending and tried again until the claim's lease ends")
            }
            (PendingOp::Done { .. }, false) => {
                error!(%queue, %key, error = %e,
                    "duplicate window: could not mark the key done and the pending list is full; \
                     acking anyway, a duplicate after the claim's lease may run the handler again")
            }
            (PendingOp::Release, true) => {
                warn!(%queue, %key, error = %e, "could not release the key yet; the release is pending")
            }
            (PendingOp::Release, false) => {
                warn!(%queue, %key, error = %e,
                    "could not release the key and the pending list is full; it frees when its lease runs out")
            }
        }
    }

    /// Marks the key done: the handler's effect happened. Releasing instead
    /// when the write fails would open the key to a duplicate of it.
    async fn complete(&mut self, expires_at: u64) {
        self.finish(PendingOp::Done { expires_at }).await;
    }

    async fn release(&mut self) {
        self.finish(PendingOp::Release).await;
    }
}

impl Drop for HeldClaim<'_> {
    fn drop(&mut self) {
        if !self.entered {
            return;
        }
        let local = &self.dedup.local;
        if self.started {
            local.abandon(self.scope, self.key, self.lease_end());
        } else if self.may_hold {
            // Released by the background task, which owns the key here
            // until the store took the release: a redelivery of it waits
            // for that instead of being freed under its feet.
            let _ = local.pend(
                self.scope,
                self.key,
                self.queue,
                PendingOp::Release,
                self.lease_end(),
            );
        } else {
            local.leave(self.scope, self.key);
        }
    }
}

async fn after_failure<H: Handler>(
    handler: Arc<H>,
    ctx: Arc<ProcessContext>,
    publisher: Option<ConfirmedPublisher>,
    kept: Delivery,
    mut outcome: Outcome,
    generation: u64,
) -> (Settlement, Verdict) {
    let Some(policy) = &ctx.policy else {
        return without_policy(outcome, &ctx, publisher, Some(kept), generation).await;
    };
    let (immediate, backoff) = policy.immediate_attempts();
    let mut extra_calls = 0;
    while matches!(outcome, Outcome::Retry { delay: None, .. })
        && extra_calls < immediate
        && !ctx.breaker_tripped.load(Ordering::Relaxed)
    {
        tokio::time::sleep(backoff).await;
        extra_calls += 1;
        outcome = call(&*handler, kept.clone(), &ctx).await;
    }
    let (kind, requested, reason) = match outcome {
        Outcome::Ack => return (Settlement::Ack, Verdict::Success),
        Outcome::Requeue => return (Settlement::Requeue, Verdict::Neutral),
        Outcome::Retry { delay, reason } => {
            if ctx.breaker_tripped.load(Ordering::Relaxed) {
                // The downstream is down, not this message: keep its retries.
                return (Settlement::Requeue, Verdict::Transient);
            }
            (FailureKind::Transient, delay, reason)
        }
        Outcome::Reject { reason } => (FailureKind::Permanent, None, reason),
    };
    let verdict = match kind {
        FailureKind::Transient => Verdict::Transient,
        FailureKind::Permanent => Verdict::Neutral,
    };
    let attempt = attempt_of(&kept);
    let failed = FailedMessage::new(&ctx.queue, &kept, kind, &reason);
    match policy.decide(&ctx.queue, attempt, kind, requested) {
        Decision::RetryIn { queue, delay } => {
            debug!(queue = %ctx.queue, attempt, ?delay, %reason, "retrying through a delay tier");
            let properties = failed.retry_properties(&kept);
            let hold = Hold::bounded(generation);
            if publish_copy(&ctx, publisher, &queue, &kept, properties, hold).await {
                bump(&ctx.stats.retried, 1);
                (Settlement::Ack, verdict)
            } else {
                (Settlement::Requeue, verdict)
            }
        }
        Decision::DeadLetter => {
            let hold = Hold::bounded(generation);
            dead_letter(&ctx, publisher, &kept, &failed, verdict, hold).await
        }
        Decision::Store => store(&ctx, &failed, &kept, verdict, Hold::bounded(generation)).await,
    }
}

/// The exhausted path of `kept`: the policy's (`<queue>.dlq` or the
/// store); without a policy `<queue>.dlq`, or a plain `basic.reject` when
/// the queue dead-letters by itself.
async fn exhausted(
    ctx: &ProcessContext,
    publisher: Option<ConfirmedPublisher>,
    kept: &Delivery,
    failed: &FailedMessage,
    verdict: Verdict,
    hold: Hold,
) -> (Settlement, Verdict) {
    match ctx.policy.as_ref().map(RetryPolicy::exhausted_to) {
        Some(Exhausted::Store) => store(ctx, failed, kept, verdict, hold).await,
        None if ctx.queue_dead_letters => (Settlement::Reject, verdict),
        Some(Exhausted::DeadLetter) | None => {
            dead_letter(ctx, publisher, kept, failed, verdict, hold).await
        }
    }
}

/// Publish, confirm, then ack: a copy of `kept` with the failure headers in
/// `<queue>.dlq`. Without the confirm (tried again within `hold`) the
/// original is requeued.
async fn dead_letter(
    ctx: &ProcessContext,
    publisher: Option<ConfirmedPublisher>,
    kept: &Delivery,
    failed: &FailedMessage,
    verdict: Verdict,
    hold: Hold,
) -> (Settlement, Verdict) {
    warn!(queue = %ctx.queue, attempt = failed.attempt, kind = ?failed.kind,
        reason = %failed.error, "dead-lettering");
    let dlq = RetryPolicy::dead_letter_queue(&ctx.queue);
    let properties = failed.dead_letter_properties(kept);
    if publish_copy(ctx, publisher, &dlq, kept, properties, hold).await {
        bump(&ctx.stats.dead_lettered, 1);
        (Settlement::Ack, verdict)
    } else {
        (Settlement::Requeue, verdict)
    }
}

/// Publishes a copy of `kept` to the queue `routing_key` through the default
/// exchange and waits for the broker's confirm, trying again within `hold`
/// while it fails for a transient reason (see [`persist`]). False when it is
/// not confirmed: the caller requeues the original. Every failed publish is
/// counted in `publish_failures`.
async fn publish_copy(
    ctx: &ProcessContext,
    publisher: Option<ConfirmedPublisher>,
    routing_key: &str,
    kept: &Delivery,
    properties: lapin::BasicProperties,
    hold: Hold,
) -> bool {
    let what = format!("the copy to {routing_key}");
    persist(ctx, hold, &what, || {
        let (publisher, properties) = (publisher.as_ref(), properties.clone());
        async move {
            let Some(publisher) = publisher else {
                return Err(Failed {
                    error: "no publisher channel for the copy".into(),
                    transient: false,
                });
            };
            match publisher
                .publish("", routing_key, kept.body(), properties)
                .await
            {
                Ok(()) => Ok(()),
                Err(e) => {
                    bump(&ctx.stats.publish_failures, 1);
                    // A broken publisher fails the same way until the next
                    // session declares the topology again.
                    // A refusal (no write permission, a message over the
                    // broker's size limit) comes back the same every time.
                    let transient = !matches!(
                        e,
                        PublishError::Unroutable { .. } | PublishError::Refused { .. }
                    ) && publisher.broken().is_none();
                    Err(Failed {
                        error: e.to_string(),
                        transient,
                    })
                }
            }
        }
    })
    .await
}

/// Store, commit, then ack: the row must be durable before the original
/// leaves the broker. A write that fails while the store is unavailable is
/// tried again within `hold`, then the original is requeued, so a store
/// that is down slows the consumer down instead of losing messages.
async fn store(
    ctx: &ProcessContext,
    failed: &FailedMessage,
    kept: &Delivery,
    verdict: Verdict,
    hold: Hold,
) -> (Settlement, Verdict) {
    let Some(store) = &ctx.store else {
        error!(queue = %ctx.queue, "no compensation store configured; requeueing");
        tokio::time::sleep(PUBLISH_FAILURE_PAUSE).await;
        return (Settlement::Requeue, verdict);
    };
    let due = now_ms() as i64 + ctx.store_delay.as_millis() as i64;
    // The dedup key, when there is one, is what makes a redelivery or a
    // deliberate duplicate the same row to review.
    let dedup_key = ctx.dedup.as_ref().and_then(|d| d.key.extract(kept).ok());
    let row = NewFailedMessage::from_failure(failed, kept, due, dedup_key);
    let stored = persist(ctx, hold, "the compensation store write", || async {
        match guarded(|| store.store(&row), crate::store::StoreError::Unavailable).await {
            Ok(id) => {
                ctx.stats.store_answered(Ok(()));
                warn!(queue = %ctx.queue, id, attempt = failed.attempt, error = %failed.error, "stored in the compensation store");
                Ok(())
            }
            Err(e) => {
                bump(&ctx.stats.store_failures, 1);
                if e.is_transient() {
                    ctx.stats.store_answered(Err(&e.to_string()));
                    ctx.stats.probe_store(store.clone());
                }
                Err(Failed {
                    transient: e.is_transient(),
                    error: e.to_string(),
                })
            }
        }
    })
    .await;
    if stored {
        bump(&ctx.stats.stored, 1);
        (Settlement::Ack, verdict)
    } else {
        (Settlement::Requeue, verdict)
    }
}

/// Without a retry policy: retry means requeue (after the requested delay,
/// waited out in process); reject means a copy in `<queue>.dlq` with the
/// reason, confirmed before the ack, or a plain `basic.reject` when the
/// queue has a dead-letter exchange of its own. `kept` is the delivery,
/// kept whenever [`ProcessContext::needs_publisher`].
async fn without_policy(
    outcome: Outcome,
    ctx: &ProcessContext,
    publisher: Option<ConfirmedPublisher>,
    kept: Option<Delivery>,
    generation: u64,
) -> (Settlement, Verdict) {
    match outcome {
        Outcome::Ack => (Settlement::Ack, Verdict::Success),
        Outcome::Requeue => (Settlement::Requeue, Verdict::Neutral),
        Outcome::Reject { .. } if ctx.queue_dead_letters => (Settlement::Reject, Verdict::Neutral),
        Outcome::Reject { reason } => {
            let Some(kept) = kept else {
                // Not reachable: a queue without dead-lettering keeps a copy.
                error!(queue = %ctx.queue, "no copy kept for the dead-letter queue; requeueing");
                return (Settlement::Requeue, Verdict::Neutral);
            };
            let failed = FailedMessage::new(&ctx.queue, &kept, FailureKind::Permanent, &reason);
            let hold = Hold::bounded(generation);
            dead_letter(ctx, publisher, &kept, &failed, Verdict::Neutral, hold).await
        }
        Outcome::Retry { delay, .. } => {
            if let Some(delay) = delay {
                Box::pin(tokio::time::sleep(delay.min(ctx.max_retry_delay))).await;
            }
            (Settlement::Requeue, Verdict::Transient)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::handler::{Delivery, HandlerFn};

    fn future_size<A, B, C, D, E, F: Future>(_: impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every delivery allocates this future. Below about 1 KiB the allocator
    /// serves it from its per-thread cache; at 3.5 KiB (before the plain
    /// path was built from combinators) it took the slow path and a 3.5 KiB
    /// copy per message.
    #[test]
    fn the_plain_path_future_stays_small() {
        type Noop = HandlerFn<fn(Delivery) -> std::future::Ready<()>>;
        let size = future_size(super::handle::<Noop>);
        assert!(size <= 1024, "the plain path's future is {size} bytes");
    }
}
