//! Backstop: RabbitMQ consumers that never lose a message.
//!
//! A message is acknowledged only once its outcome is durable: the handler
//! succeeded (and, in later layers, a retry or dead-letter copy was confirmed,
//! or a compensation row committed). Anything else stays unacknowledged and
//! the broker redelivers it. Duplicates are possible; loss is a bug.
//!
//! The layers, in the order data flows:
//! - [`connection`]: the supervisor that keeps a connection up through every
//!   way it can die, with backoff, heartbeats and an observable state;
//! - [`topology`]: declarative exchanges, queues and bindings, applied on
//!   every connect;
//! - [`consumer`]: the runtime that subscribes, bounds concurrency and the
//!   prefetch, coalesces acks and recovers its subscription;
//! - [`handler`]: the trait user code implements and the [`handler::Outcome`]
//!   it returns;
//! - [`retry`]: the policy for failures: in-process retries, broker-side
//!   delay tiers, then the dead-letter queue;
//! - [`breaker`]: the circuit breaker that pauses consumption while the
//!   downstream keeps failing;
//! - [`publish`]: the confirmed publisher behind every copy the consumer makes;
//! - [`store`]: the compensation store for what retries cannot settle;
//! - [`dedup`]: deduplication by business key, and the transactional inbox.

pub mod breaker;
pub mod config;
pub mod connection;
pub mod consumer;
pub mod dedup;
mod error;
pub mod handler;
pub mod publish;
pub mod retry;
pub mod store;
mod tls;
pub mod topology;

pub use error::{Error, RedactedUri, Result};

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Waits until a shutdown flag turns true (or its sender is gone), without
/// holding the watch guard across later awaits.
pub(crate) async fn wait_true(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
