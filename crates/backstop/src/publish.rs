//! A confirmed publisher: every publish waits for the broker's confirm, and
//! an unroutable message counts as a failure.
//!
//! Publishes are `mandatory`, so a message that no queue would take comes
//! back as a `basic.return` before its confirm instead of vanishing; a
//! confirm that carries a returned message is therefore a failure too. This
//! is what lets the consumer ack an original only once its copy (retry,
//! dead letter, replay) is safely stored by the broker.

use crate::connection::describe;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use std::fmt;

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
}

/// A channel in confirm mode.
#[derive(Clone)]
pub struct ConfirmedPublisher {
    channel: lapin::Channel,
}

impl fmt::Debug for ConfirmedPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfirmedPublisher")
            .field("channel", &self.channel.id())
            .finish()
    }
}

impl ConfirmedPublisher {
    /// Puts `channel` in confirm mode.
    pub async fn new(channel: lapin::Channel) -> crate::Result<Self> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(crate::Error::amqp("confirm.select"))?;
        Ok(ConfirmedPublisher { channel })
    }

    /// The underlying channel.
    pub fn channel(&self) -> &lapin::Channel {
        &self.channel
    }

    /// Publishes and waits for the confirm. `Ok` means the broker took
    /// responsibility for the message (persisted it, for a persistent message
    /// to a durable queue).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let destination = || format!("{exchange}:{routing_key}");
        let channel_error = |e: lapin::Error| PublishError::Channel {
            destination: destination(),
            reason: describe(&e),
        };
        let confirm = self
            .channel
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
            .await
            .map_err(channel_error)?
            .await
            .map_err(channel_error)?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(PublishError::Unroutable {
                    destination: destination(),
                })
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
