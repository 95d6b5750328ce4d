//! What user code implements: a [`Handler`] takes one [`Delivery`] and returns
//! an [`Outcome`], which the consumer carries out (ack, retry, reject, requeue).
//!
//! A handler can return anything that is [`IntoOutcome`]: an `Outcome`, `()`,
//! or a `Result<T, E>` whose error says whether it is transient (retry) or
//! permanent (reject), the way axum maps `Result` into a response.
//!
//! ```
//! use backstop::handler::{handler_fn, Delivery, FailureKind, HandlerError};
//!
//! let handler = handler_fn(|delivery: Delivery| async move {
//!     let text = std::str::from_utf8(delivery.body())
//!         .map_err(|e| HandlerError::permanent(format!("not UTF-8: {e}")))?;
//!     if text.is_empty() {
//!         return Err(HandlerError::transient("empty body, try later"));
//!     }
//!     Ok::<(), HandlerError>(())
//! });
//! # let _ = handler;
//! ```

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A message handed to a handler. The delivery tag stays with the consumer:
/// the handler decides the outcome, the consumer settles it.
///
/// Everything the broker sent lives in one shared allocation, so a
/// delivery is one pointer wide and cloning it is a reference count: the
/// consumer keeps a clone for a retry or dead-letter copy after the handler
/// consumed it, without copying the properties or the body.
#[derive(Clone, Debug)]
pub struct Delivery {
    inner: Arc<Received>,
}

/// What a [`Delivery`] shares between its clones.
#[derive(Debug)]
struct Received {
    body: Vec<u8>,
    properties: BasicProperties,
    exchange: ShortString,
    routing_key: ShortString,
    redelivered: bool,
}

impl Delivery {
    pub(crate) fn from_lapin(delivery: lapin::message::Delivery) -> (u64, Delivery) {
        (
            delivery.delivery_tag,
            Delivery {
                inner: Arc::new(Received {
                    body: delivery.data,
                    properties: delivery.properties,
                    exchange: delivery.exchange,
                    routing_key: delivery.routing_key,
                    redelivered: delivery.redelivered,
                }),
            },
        )
    }

    /// Builds a delivery by hand, for unit tests of handlers.
    pub fn for_test(body: impl Into<Vec<u8>>, properties: BasicProperties) -> Self {
        Delivery {
            inner: Arc::new(Received {
                body: body.into(),
                properties,
                exchange: ShortString::from(""),
                routing_key: ShortString::from(""),
                redelivered: false,
            }),
        }
    }

    /// The payload.
    pub fn body(&self) -> &[u8] {
        &self.inner.body
    }

    /// Takes the payload out, copying only if a clone still shares it.
    pub fn into_body(self) -> Vec<u8> {
        Arc::try_unwrap(self.inner).map_or_else(|shared| shared.body.clone(), |own| own.body)
    }

    /// The AMQP properties (message id, headers, content type, ...).
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// The `message_id` property, if set.
    pub fn message_id(&self) -> Option<&str> {
        self.inner
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// A header value, if present.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.inner
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
    }

    /// The exchange the message was published to (empty for the default exchange).
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        self.inner.routing_key.as_str()
    }

    /// True when the broker delivered this message before (to this or another
    /// consumer) without it being acknowledged.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }
}

/// What to do with a delivery once the handler is done with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: acknowledge it.
    Ack,
    /// A transient failure: try again, after `delay` if given.
    Retry {
        /// How long to wait before the next attempt.
        delay: Option<Duration>,
        /// Why it failed.
        reason: String,
    },
    /// A permanent failure: retrying will not help. It takes the exhausted
    /// path: a copy in `<queue>.dlq` with the reason (or the compensation
    /// store, per the retry policy), confirmed before the ack; without a
    /// policy, on a queue with a dead-letter exchange of its own, a plain
    /// `basic.reject` left to the broker's dead-lettering.
    Reject {
        /// Why it failed.
        reason: String,
    },
    /// Put it back on the queue as it is (`basic.nack` with requeue), for
    /// example because this instance is shutting down.
    Requeue,
}

impl Outcome {
    /// A transient failure to retry without a particular delay.
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry {
            delay: None,
            reason: reason.into(),
        }
    }

    /// A transient failure to retry after `delay`.
    pub fn retry_after(delay: Duration, reason: impl Into<String>) -> Self {
        Outcome::Retry {
            delay: Some(delay),
            reason: reason.into(),
        }
    }

    /// A permanent failure.
    pub fn reject(reason: impl Into<String>) -> Self {
        Outcome::Reject {
            reason: reason.into(),
        }
    }
}

/// Whether a failure may go away by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// It may succeed later (timeout, downstream unavailable): retry.
    Transient,
    /// It will never succeed (malformed payload, business rule): do not retry.
    Permanent,
}

/// An error that knows whether it is transient or permanent.
pub trait ClassifyFailure: fmt::Display {
    /// Transient or permanent.
    fn failure_kind(&self) -> FailureKind;

    /// How long to wait before retrying a transient failure, if it knows.
    fn retry_delay(&self) -> Option<Duration> {
        None
    }
}

/// A ready-made classified error for handlers that need nothing richer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    kind: FailureKind,
    message: String,
    delay: Option<Duration>,
}

impl HandlerError {
    /// A failure that may go away: the message is retried.
    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError {
            kind: FailureKind::Transient,
            message: message.into(),
            delay: None,
        }
    }

    /// A failure that will not go away: the message is rejected.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            kind: FailureKind::Permanent,
            message: message.into(),
            delay: None,
        }
    }

    /// Asks for the retry to wait at least `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

impl ClassifyFailure for HandlerError {
    fn failure_kind(&self) -> FailureKind {
        self.kind
    }

    fn retry_delay(&self) -> Option<Duration> {
        self.delay
    }
}

/// Converts a handler's return value into an [`Outcome`].
pub trait IntoOutcome {
    /// The outcome this value stands for.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Ack
    }
}

impl<T, E: ClassifyFailure> IntoOutcome for Result<T, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(_) => Outcome::Ack,
            Err(err) => match err.failure_kind() {
                FailureKind::Transient => Outcome::Retry {
                    delay: err.retry_delay(),
                    reason: err.to_string(),
                },
                FailureKind::Permanent => Outcome::Reject {
                    reason: err.to_string(),
                },
            },
        }
    }
}

/// Handles one delivery at a time; the consumer runs up to its configured
/// concurrency of these calls at once.
pub trait Handler: Send + Sync + 'static {
    /// Processes `delivery` and says what to do with it. A panic here is
    /// caught by the consumer and counted as a transient failure.
    fn handle(&self, delivery: Delivery) -> impl Future<Output = Outcome> + Send;
}

/// A handler made from an async closure; see [`handler_fn`].
#[derive(Clone)]
pub struct HandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}

/// Turns `async |delivery| -> impl IntoOutcome` into a [`Handler`].
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future + Send,
    Fut::Output: IntoOutcome,
{
    HandlerFn { f }
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future + Send,
    Fut::Output: IntoOutcome,
{
    async fn handle(&self, delivery: Delivery) -> Outcome {
        (self.f)(delivery).await.into_outcome()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_map_to_outcomes_by_their_kind() {
        assert_eq!(Ok::<u8, HandlerError>(1).into_outcome(), Outcome::Ack);
        assert_eq!(
            Err::<(), _>(HandlerError::transient("db down")).into_outcome(),
            Outcome::retry("db down")
        );
        assert_eq!(
            Err::<(), _>(HandlerError::transient("slow").with_delay(Duration::from_secs(3)))
                .into_outcome(),
            Outcome::retry_after(Duration::from_secs(3), "slow")
        );
        assert_eq!(
            Err::<(), _>(HandlerError::permanent("bad json")).into_outcome(),
            Outcome::reject("bad json")
        );
        assert_eq!(().into_outcome(), Outcome::Ack);
    }

    #[tokio::test]
    async fn handler_fn_carries_the_outcome() {
        let handler = handler_fn(|d: Delivery| async move {
            if d.body() == b"bad" {
                Err(HandlerError::permanent("bad"))
            } else {
                Ok(())
            }
        });
        let ok = handler
            .handle(Delivery::for_test("good", BasicProperties::default()))
            .await;
        let bad = handler
            .handle(Delivery::for_test("bad", BasicProperties::default()))
            .await;
        assert_eq!(ok, Outcome::Ack);
        assert_eq!(bad, Outcome::reject("bad"));
    }
}
