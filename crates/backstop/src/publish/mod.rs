//! Publishing with confirms: the application's [`Publisher`] (a pipelined
//! channel pool with an offline spool) and the consumer's
//! [`ConfirmedPublisher`] for the copies it makes.
//!
//! # The consumer's confirmed publisher
//!
//! Every publish waits for the broker's confirm, and an unroutable message
//! counts as a failure.
//!
//! Publishes are `mandatory`, so a message that no queue would take comes
//! back as a `basic.return` before its confirm instead of vanishing; a
//! confirm that carries a returned message is therefore a failure too. This
//! is what lets the consumer ack an original only once its copy (retry,
//! dead letter, replay) is safely stored by the broker.
//!
//! **One publish in flight per channel.** lapin hands a `basic.return` to
//! whichever confirm of the channel completes next (and completes the tags
//! of a multiple-ack in no set order). The broker returns an unroutable
//! message at once but confirms a persistent one only once it is written,
//! and merges confirms into multiple-acks, so with several publishes in
//! flight on one channel a return lands on another publish: an unroutable
//! copy looks confirmed and its original would be acked. Each channel
//! therefore carries one publish at a time, from `basic.publish` until its
//! confirm, and a small pool of channels gives the throughput back. A
//! channel whose publish did not end with a confirm (timed out, cancelled,
//! failed) is closed, never reused: a late confirm or return on it could
//! otherwise land on the next publish.
//!
//! **Every confirm is bounded** ([`ConfirmedPublisher::confirm_timeout`]): a
//! connection blocked by a resource alarm, or a silent one, never answers.
//! A timed-out publish is a failure; the copy may still land (a duplicate),
//! but its original is never acked on it.

mod lane;
pub mod outbox;
mod publisher;
mod spool;

pub use publisher::{
    DEFAULT_PARK_UNROUTABLE_AFTER, DEFAULT_PUBLISH_TIMEOUT, Message, PendingConfirm, PooledChannel,
    Published, Publisher, PublisherBuilder, PublisherStats,
};
pub use spool::{
    DEFAULT_MAX_BYTES as DEFAULT_SPOOL_MAX_BYTES,
    DEFAULT_MAX_MESSAGES as DEFAULT_SPOOL_MAX_MESSAGES,
};

use crate::connection::{ConnectionSupervisor, LiveConnection, describe};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPErrorKind;
use lapin::{BasicProperties, Confirmation};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tracing::{debug, warn};

/// The default bound on one publish, from `basic.publish` to its confirm.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// The default number of confirm channels of a pool.
pub const DEFAULT_CHANNELS: usize = 4;

/// Why a publish is not known to be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The channel or connection failed before the confirm arrived.
    #[error("publish to {destination} failed: {reason}")]
    Channel {
        /// `exchange:routing_key`.
        destination: String,
        /// The client's error.
        reason: String,
    },
    /// The broker answered with `basic.nack`.
    #[error("the broker nacked the publish to {destination}")]
    Nacked {
        /// `exchange:routing_key`.
        destination: String,
    },
    /// No queue took the message (`basic.return`).
    #[error("no queue is bound for {destination}: the message was returned")]
    Unroutable {
        /// `exchange:routing_key`.
        destination: String,
    },
    /// The broker closed the publishing channel over this publish, while
    /// the connection stays up, for a reason that is not a missing exchange:
    /// `ACCESS_REFUSED` (no write permission), `PRECONDITION_FAILED` (a
    /// message over the broker's `max_message_size`) and the like. Trying
    /// the same publish again fails the same way.
    #[error("the broker refused the publish to {destination}: {reason}")]
    Refused {
        /// `exchange:routing_key`.
        destination: String,
        /// The broker's reason.
        reason: String,
    },
    /// No confirm within the bound. The broker may still store the message.
    #[error("no confirm for the publish to {destination} within {after:?}")]
    Timeout {
        /// `exchange:routing_key`.
        destination: String,
        /// The bound.
        after: Duration,
    },
    /// The broker blocked the publishing connection (a resource alarm):
    /// nothing was sent.
    #[error(
        "not publishing to {destination}: the broker blocked the connection (a resource alarm)"
    )]
    Blocked {
        /// `exchange:routing_key`.
        destination: String,
    },
    /// The [`Publisher`]'s spool is at its bound: nothing was written, the
    /// caller keeps the message (backpressure).
    #[error("the spool is full ({messages} messages, {bytes} bytes): not spooled")]
    SpoolFull {
        /// Messages in the spool.
        messages: u64,
        /// Bytes in the spool.
        bytes: u64,
    },
    /// The [`Publisher`]'s spool could not be written (a disk error): not
    /// spooled.
    #[error("{reason}")]
    Spool {
        /// What failed.
        reason: String,
    },
}

/// Confirm-mode channels that each carry one publish at a time. Cheap to
/// clone; clones share the channels.
#[derive(Clone)]
pub struct ConfirmedPublisher {
    pool: Arc<Pool>,
}

struct Pool {
    /// Where new channels come from.
    source: Source,
    /// One publish at a time per slot; `None` until a channel is opened (or
    /// after one was given up).
    slots: Vec<tokio::sync::Mutex<Option<Open>>>,
    /// As many permits as slots: a holder always finds a free slot.
    permits: tokio::sync::Semaphore,
    next: AtomicUsize,
    confirm_timeout: Duration,
    /// Why the publisher needs its topology declared again, once it does.
    broken: std::sync::Mutex<Option<String>>,
    closed: AtomicBool,
    /// Every channel the pool holds, to close them all.
    channels: std::sync::Mutex<Vec<lapin::Channel>>,
}

enum Source {
    /// The one channel given to [`ConfirmedPublisher::new`]; no other.
    Given,
    /// Channels opened on demand on the supervisor's connection.
    Supervisor(ConnectionSupervisor),
}

/// A confirm-mode channel and the connection it lives on.
struct Open {
    channel: lapin::Channel,
    live: Option<LiveConnection>,
}

impl fmt::Debug for ConfirmedPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfirmedPublisher")
            .field("channels", &self.pool.slots.len())
            .field("confirm_timeout", &self.pool.confirm_timeout)
            .field("broken", &self.broken())
            .finish()
    }
}

impl ConfirmedPublisher {
    /// Puts `channel` in confirm mode and publishes on it alone, one publish
    /// at a time. If a publish on it fails or times out, the channel is
    /// closed and every later publish fails.
    pub async fn new(channel: lapin::Channel) -> crate::Result<Self> {
        tokio::time::timeout(
            crate::connection::CHANNEL_TIMEOUT,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await
        .map_err(|_| crate::Error::Timeout {
            context: "confirm.select",
            after: crate::connection::CHANNEL_TIMEOUT,
        })?
        .map_err(crate::Error::amqp("confirm.select"))?;
        let first = Open {
            channel: channel.clone(),
            live: None,
        };
        let pool = Pool::new(Source::Given, vec![Some(first)], DEFAULT_CONFIRM_TIMEOUT);
        pool.registry().push(channel);
        Ok(ConfirmedPublisher {
            pool: Arc::new(pool),
        })
    }

    /// A pool of up to `channels` confirm channels (at least one) on
    /// `supervisor`'s connection: normally its
    /// [publishing](ConnectionSupervisor::publishing) connection. Each
    /// publish, from waiting for a free channel to its confirm, is bounded by
    /// `confirm_timeout`. Nothing is opened here: each channel is opened by
    /// the publish that first needs it, and opened again after it was given
    /// up or its connection was replaced.
    pub fn pooled(
        supervisor: ConnectionSupervisor,
        channels: usize,
        confirm_timeout: Duration,
    ) -> Self {
        let slots = (0..channels.max(1)).map(|_| None).collect();
        ConfirmedPublisher {
            pool: Arc::new(Pool::new(
                Source::Supervisor(supervisor),
                slots,
                confirm_timeout,
            )),
        }
    }

    /// Set once a publish showed that the topology the publisher relies on is
    /// gone: a copy came back unroutable (its queue was deleted), or the
    /// broker closed a channel with `NOT_FOUND` (its exchange was deleted)
    /// while the connection stayed up. Other channel errors (`ACCESS_REFUSED`,
    /// a message over the broker's size limit) fail the publish alone. Publishing
    /// again will not fix it; declaring the topology again will. The
    /// consumer ends its session on it and the next session declares the
    /// topology and gets a fresh publisher.
    pub fn broken(&self) -> Option<String> {
        self.pool
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes every channel of the pool, each within
    /// [`CHANNEL_TIMEOUT`](crate::connection::CHANNEL_TIMEOUT); later
    /// publishes fail. A publish in flight fails with its channel.
    pub async fn close(&self) {
        self.pool.closed.store(true, Ordering::Release);
        let channels = std::mem::take(&mut *self.pool.registry());
        let closes = channels.into_iter().map(|channel| async move {
            if channel.status().connected() {
                let close = channel.close(200, "backstop: publisher closed".into());
                let _ = tokio::time::timeout(crate::connection::CHANNEL_TIMEOUT, close).await;
            }
        });
        futures_util::future::join_all(closes).await;
    }

    /// Publishes and waits for the confirm, within the confirm timeout. `Ok`
    /// means the broker took responsibility for the message (persisted it,
    /// for a persistent message to a durable queue).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let destination = || format!("{exchange}:{routing_key}");
        let pool = &self.pool;
        let closed = || PublishError::Channel {
            destination: destination(),
            reason: "the publisher is closed".into(),
        };
        if pool.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let timeout = pool.confirm_timeout;
        let timed_out = || PublishError::Timeout {
            destination: destination(),
            after: timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let (_permit, mut slot) = tokio::time::timeout_at(deadline, async {
            let permit = pool.permits.acquire().await;
            (permit, pool.free_slot().await)
        })
        .await
        .map_err(|_| timed_out())?;
        let open = match slot.take() {
            Some(open) if open.is_usable() => open,
            stale => {
                if let Some(stale) = stale {
                    pool.give_up(stale);
                }
                let open = tokio::time::timeout_at(deadline, pool.open())
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|reason| PublishError::Channel {
                        destination: destination(),
                        reason,
                    })?;
                if pool.closed.load(Ordering::Acquire) {
                    pool.give_up(open);
                    return Err(closed());
                }
                open
            }
        };
        if open.live.as_ref().is_some_and(LiveConnection::is_blocked) {
            // Sending now would only wait for the alarm to end.
            *slot = Some(open);
            return Err(PublishError::Blocked {
                destination: destination(),
            });
        }
        // Held until the confirm: dropped any other way (a timeout, a
        // cancelled caller), it gives the channel up.
        let channel = open.channel.clone();
        let mut in_flight = InFlight {
            pool,
            open: Some(open),
        };
        let confirmed = tokio::time::timeout_at(deadline, async {
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        })
        .await;
        let confirmation = match confirmed {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => {
                let reason = describe(&e);
                // Only an exchange that is gone (404) is cured by declaring
                // the topology again. Other refusals (403 access refused, 406
                // a message too large) would come back the same on a new
                // session: ending it would only churn; this copy fails alone.
                let up = in_flight.connection_is_up() && !pool.closed.load(Ordering::Acquire);
                if needs_redeclare(&e) && up {
                    pool.mark_broken(format!(
                        "the broker closed the publishing channel: {reason}"
                    ));
                } else if up && is_refusal(&e) {
                    return Err(PublishError::Refused {
                        destination: destination(),
                        reason,
                    });
                }
                return Err(PublishError::Channel {
                    destination: destination(),
                    reason,
                });
            }
            Ok(Ok(confirmation)) => confirmation,
        };
        *slot = in_flight.keep();
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                let error = PublishError::Unroutable {
                    destination: destination(),
                };
                pool.mark_broken(error.to_string());
                Err(error)
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked {
                destination: destination(),
            }),
            Confirmation::NotRequested => Err(PublishError::Channel {
                destination: destination(),
                reason: "the channel is not in confirm mode".into(),
            }),
        }
    }
}

impl Pool {
    fn new(source: Source, slots: Vec<Option<Open>>, confirm_timeout: Duration) -> Self {
        Pool {
            source,
            permits: tokio::sync::Semaphore::new(slots.len()),
            slots: slots.into_iter().map(tokio::sync::Mutex::new).collect(),
            next: AtomicUsize::new(0),
            confirm_timeout,
            broken: std::sync::Mutex::new(None),
            closed: AtomicBool::new(false),
            channels: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Vec<lapin::Channel>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot no other publish holds. The caller holds a permit, so one is
    /// free; the round-robin start spreads publishes over the channels.
    async fn free_slot(&self) -> tokio::sync::MutexGuard<'_, Option<Open>> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(slot) = self.slots[(start + i) % n].try_lock() {
                return slot;
            }
        }
        self.slots[start % n].lock().await
    }

    /// Opens a confirm channel on the supervisor's current connection.
    async fn open(&self) -> Result<Open, String> {
        let Source::Supervisor(supervisor) = &self.source else {
            return Err("the publisher's channel was given up after a failed publish".into());
        };
        let live = supervisor.connection().await.map_err(|e| e.to_string())?;
        if live.is_blocked() {
            return Err("the broker blocked the publishing connection (a resource alarm)".into());
        }
        let channel = live.create_channel().await.map_err(|e| e.to_string())?;
        let selected = channel.confirm_select(ConfirmSelectOptions::default());
        if let Err(e) = selected.await {
            return Err(format!("confirm.select: {}", describe(&e)));
        }
        debug!(
            channel = channel.id(),
            connection = live.generation(),
            "publisher channel opened"
        );
        self.registry().push(channel.clone());
        Ok(Open {
            channel,
            live: Some(live),
        })
    }

    /// Closes a channel that must not carry another publish.
    fn give_up(&self, open: Open) {
        let channel = open.channel;
        self.registry().retain(|c| c.id() != channel.id());
        if !channel.status().connected() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let close = channel.close(200, "backstop: publish abandoned".into());
            let _ = tokio::time::timeout(crate::connection::CHANNEL_TIMEOUT, close).await;
        });
    }

    fn mark_broken(&self, reason: String) {
        let mut broken = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        if broken.is_none() {
            warn!(%reason, "the publisher needs its topology declared again");
            *broken = Some(reason);
        }
    }
}

/// True for a channel the broker closed with `NOT_FOUND` (404): an exchange
/// (or queue) the publish relies on is gone, which declaring the topology
/// again cures.
fn needs_redeclare(err: &lapin::Error) -> bool {
    crate::connection::is_not_found(err)
}

/// True when the broker closed the channel over a publish for a reason
/// other than a missing exchange (a protocol error it sent), so the same
/// publish would be refused again: not a transient failure.
fn is_refusal(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_))
    ) && !needs_redeclare(err)
}

impl Open {
    fn is_usable(&self) -> bool {
        self.channel.status().connected()
            && self.live.as_ref().is_none_or(LiveConnection::is_connected)
    }
}

/// A channel carrying a publish. Unless [`keep`](Self::keep) takes it back
/// after a confirm, dropping it gives the channel up.
struct InFlight<'a> {
    pool: &'a Pool,
    open: Option<Open>,
}

impl InFlight<'_> {
    fn connection_is_up(&self) -> bool {
        self.open
            .as_ref()
            .and_then(|open| open.live.as_ref())
            .is_none_or(LiveConnection::is_connected)
    }

    fn keep(&mut self) -> Option<Open> {
        self.open.take()
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            self.pool.give_up(open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;
    use lapin::protocol::{AMQPHardError, AMQPSoftError};

    fn closed_with(kind: AMQPErrorKind) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, "closed by the broker".into())).into()
    }

    #[test]
    fn only_a_missing_exchange_asks_for_the_topology_again() {
        assert!(needs_redeclare(&closed_with(AMQPErrorKind::Soft(
            AMQPSoftError::NOTFOUND
        ))));
        for refused in [AMQPSoftError::ACCESSREFUSED, AMQPSoftError::RESOURCELOCKED] {
            assert!(!needs_redeclare(&closed_with(AMQPErrorKind::Soft(refused))));
        }
        // 406 for a message over the broker's max_message_size.
        assert!(!needs_redeclare(&closed_with(AMQPErrorKind::Soft(
            AMQPSoftError::PRECONDITIONFAILED
        ))));
        let gone: lapin::Error =
            lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "channel closed")
                .into();
        assert!(!needs_redeclare(&gone));
    }

    /// A refusal is not worth a retry: the copy fails at once instead of
    /// being held and tried again with the same answer (a delivery near its
    /// quorum delivery limit was held for ever on a 403 or 406).
    #[test]
    fn a_refusal_by_the_broker_is_not_a_transient_failure() {
        for refused in [
            AMQPSoftError::ACCESSREFUSED,
            AMQPSoftError::PRECONDITIONFAILED,
            AMQPSoftError::RESOURCELOCKED,
        ] {
            assert!(is_refusal(&closed_with(AMQPErrorKind::Soft(refused))));
        }
        // A missing exchange asks for the topology again instead.
        assert!(!is_refusal(&closed_with(AMQPErrorKind::Soft(
            AMQPSoftError::NOTFOUND
        ))));
        // The connection going away is transient.
        assert!(!is_refusal(&closed_with(AMQPErrorKind::Hard(
            AMQPHardError::CONNECTIONFORCED
        ))));
        let gone: lapin::Error =
            lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "channel closed")
                .into();
        assert!(!is_refusal(&gone));
    }
}
