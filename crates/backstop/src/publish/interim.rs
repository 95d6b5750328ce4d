//! A stand-in for the application `Publisher` being written on main, with
//! the signatures of its announced API, so that the outbox can be built and
//! tested before it lands. Removed when main is merged.
#![allow(missing_docs)]

use super::{ConfirmedPublisher, DEFAULT_CHANNELS, PublishError};
use crate::connection::{ConnectionConfig, ConnectionSupervisor};
use lapin::BasicProperties;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Message {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
    message_id: Option<String>,
}

impl Message {
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            properties: BasicProperties::default(),
            message_id: None,
        }
    }

    pub fn with_properties(mut self, properties: BasicProperties) -> Self {
        if self.message_id.is_none() {
            self.message_id = properties.message_id().as_ref().map(|id| id.to_string());
        }
        self.properties = properties;
        self
    }

    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    Confirmed { message_id: String },
    Spooled { message_id: String },
}

impl Published {
    pub fn message_id(&self) -> &str {
        match self {
            Published::Confirmed { message_id } | Published::Spooled { message_id } => message_id,
        }
    }

    pub fn is_spooled(&self) -> bool {
        matches!(self, Published::Spooled { .. })
    }
}

#[derive(Clone, Debug)]
pub struct Publisher {
    supervisor: ConnectionSupervisor,
    confirmed: ConfirmedPublisher,
}

#[derive(Debug)]
pub struct PublisherBuilder {
    connection: ConnectionConfig,
    channels: usize,
    confirm_timeout: Duration,
}

impl Publisher {
    pub fn builder(connection: ConnectionConfig) -> PublisherBuilder {
        PublisherBuilder {
            connection,
            channels: DEFAULT_CHANNELS,
            confirm_timeout: Duration::from_secs(5),
        }
    }

    pub async fn publish(&self, message: Message) -> Result<Published, PublishError> {
        let message_id = message
            .message_id
            .clone()
            .unwrap_or_else(|| format!("{:032x}", fastrand::u128(..)));
        let mut properties = message
            .properties
            .clone()
            .with_message_id(message_id.as_str().into());
        if properties.delivery_mode().is_none() {
            properties = properties.with_delivery_mode(2);
        }
        self.confirmed
            .publish(
                &message.exchange,
                &message.routing_key,
                &message.body,
                properties,
            )
            .await?;
        Ok(Published::Confirmed { message_id })
    }

    pub async fn publish_batch(
        &self,
        messages: Vec<Message>,
    ) -> Vec<Result<Published, PublishError>> {
        futures_util::future::join_all(messages.into_iter().map(|m| self.publish(m))).await
    }

    pub fn supervisor(&self) -> &ConnectionSupervisor {
        &self.supervisor
    }

    pub async fn close(&self) {
        self.confirmed.close().await;
        self.supervisor.close().await;
    }
}

impl PublisherBuilder {
    pub fn channels(mut self, n: usize) -> Self {
        self.channels = n;
        self
    }

    pub fn confirm_timeout(mut self, d: Duration) -> Self {
        self.confirm_timeout = d;
        self
    }

    pub async fn start(self) -> crate::Result<Publisher> {
        let supervisor = ConnectionSupervisor::start(self.connection)?;
        let confirmed =
            ConfirmedPublisher::pooled(supervisor.clone(), self.channels, self.confirm_timeout);
        Ok(Publisher {
            supervisor,
            confirmed,
        })
    }
}
