//! Declarative topology: exchanges, queues and bindings, built with named
//! builders and applied on every connect before any consumer starts.
//!
//! Declarations are idempotent in AMQP, so re-applying after a reconnect, a
//! broker restart or a deleted queue brings the broker back to the declared
//! shape. A declaration that conflicts with what the broker already has fails
//! with `PRECONDITION_FAILED`, which is reported with the name of the entity.
//!
//! ```
//! use backstop::topology::{Binding, Exchange, Queue, Topology};
//! use std::time::Duration;
//!
//! let topology = Topology::new()
//!     .exchange(Exchange::topic("orders"))
//!     .queue(Queue::quorum("orders.created").delivery_limit(5))
//!     .queue(Queue::classic("orders.audit").message_ttl(Duration::from_secs(3600)))
//!     .binding(Binding::queue("orders.created").to("orders").routing_key("order.created"));
//! assert_eq!(topology.queues().len(), 2);
//! ```

use crate::error::{Error, Result};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::time::Duration;

/// An exchange to declare. Durable unless told otherwise.
#[derive(Clone, Debug)]
pub struct Exchange {
    name: String,
    kind: lapin::ExchangeKind,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: FieldTable,
}

impl Exchange {
    fn new(name: impl Into<String>, kind: lapin::ExchangeKind) -> Self {
        Exchange {
            name: name.into(),
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        }
    }

    /// A direct exchange.
    pub fn direct(name: impl Into<String>) -> Self {
        Self::new(name, lapin::ExchangeKind::Direct)
    }

    /// A topic exchange.
    pub fn topic(name: impl Into<String>) -> Self {
        Self::new(name, lapin::ExchangeKind::Topic)
    }

    /// A fanout exchange.
    pub fn fanout(name: impl Into<String>) -> Self {
        Self::new(name, lapin::ExchangeKind::Fanout)
    }

    /// A headers exchange.
    pub fn headers(name: impl Into<String>) -> Self {
        Self::new(name, lapin::ExchangeKind::Headers)
    }

    /// Makes the exchange transient: it does not survive a broker restart.
    pub fn transient(mut self) -> Self {
        self.durable = false;
        self
    }

    /// Deletes the exchange when its last binding goes.
    pub fn auto_delete(mut self) -> Self {
        self.auto_delete = true;
        self
    }

    /// Publishers cannot publish to it directly, only other exchanges.
    pub fn internal(mut self) -> Self {
        self.internal = true;
        self
    }

    /// Adds an `x-` argument.
    pub fn argument(mut self, key: &str, value: AMQPValue) -> Self {
        self.arguments.insert(key.into(), value);
        self
    }

    /// The exchange's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The queue type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    /// A classic queue.
    Classic,
    /// A replicated quorum queue. Always durable.
    Quorum,
}

/// A queue to declare. Durable unless told otherwise.
#[derive(Clone, Debug)]
pub struct Queue {
    name: String,
    queue_type: QueueType,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    arguments: FieldTable,
}

impl Queue {
    fn new(name: impl Into<String>, queue_type: QueueType) -> Self {
        let mut arguments = FieldTable::default();
        if queue_type == QueueType::Quorum {
            arguments.insert("x-queue-type".into(), long_string("quorum"));
        }
        Queue {
            name: name.into(),
            queue_type,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments,
        }
    }

    /// A durable classic queue.
    pub fn classic(name: impl Into<String>) -> Self {
        Self::new(name, QueueType::Classic)
    }

    /// A quorum queue (durable and replicated).
    pub fn quorum(name: impl Into<String>) -> Self {
        Self::new(name, QueueType::Quorum)
    }

    /// Makes a classic queue transient. Ignored for quorum queues, which are
    /// always durable.
    pub fn transient(mut self) -> Self {
        if self.queue_type == QueueType::Classic {
            self.durable = false;
        }
        self
    }

    /// Makes a classic queue exclusive to its connection.
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// Deletes the queue when its last consumer goes.
    pub fn auto_delete(mut self) -> Self {
        self.auto_delete = true;
        self
    }

    /// `x-message-ttl`: messages older than this expire (and are dead-lettered
    /// when a dead-letter exchange is set).
    pub fn message_ttl(self, ttl: Duration) -> Self {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.argument("x-message-ttl", AMQPValue::LongLongInt(ms))
    }

    /// `x-dead-letter-exchange`: where rejected and expired messages go.
    /// The empty string is the default exchange.
    pub fn dead_letter_exchange(self, exchange: &str) -> Self {
        self.argument("x-dead-letter-exchange", long_string(exchange))
    }

    /// `x-dead-letter-routing-key`: the routing key dead-lettered messages get.
    pub fn dead_letter_routing_key(self, routing_key: &str) -> Self {
        self.argument("x-dead-letter-routing-key", long_string(routing_key))
    }

    /// `x-delivery-limit` (quorum queues): after this many redeliveries a
    /// message is dropped or dead-lettered, the last defence against poison
    /// messages.
    pub fn delivery_limit(self, limit: u32) -> Self {
        self.argument("x-delivery-limit", AMQPValue::LongLongInt(i64::from(limit)))
    }

    /// Dead-letters (expired, rejected, over the delivery limit) into
    /// `<name>.dlq` through the default exchange: the same parking lot the
    /// retry policy publishes to.
    pub fn dead_letter_to_dlq(self) -> Self {
        let dlq = crate::retry::RetryPolicy::dead_letter_queue(&self.name);
        self.dead_letter_exchange("").dead_letter_routing_key(&dlq)
    }

    /// Quorum queues: `x-dead-letter-strategy=at-least-once`, so the broker
    /// keeps a dead-lettered message until the dead-letter queue has confirmed
    /// it. RabbitMQ requires `x-overflow=reject-publish` with it, which is set too.
    pub fn at_least_once_dead_lettering(self) -> Self {
        self.argument("x-dead-letter-strategy", long_string("at-least-once"))
            .argument("x-overflow", long_string("reject-publish"))
    }

    /// `x-max-length`: the most messages the queue holds.
    pub fn max_length(self, max: u64) -> Self {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.argument("x-max-length", AMQPValue::LongLongInt(max))
    }

    /// Adds any other `x-` argument.
    pub fn argument(mut self, key: &str, value: AMQPValue) -> Self {
        self.arguments.insert(key.into(), value);
        self
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's type.
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }
}

/// A binding of a queue to an exchange.
#[derive(Clone, Debug)]
pub struct Binding {
    queue: String,
    exchange: String,
    routing_key: String,
    arguments: FieldTable,
}

impl Binding {
    /// Starts a binding for `queue`; name the exchange with [`to`](Self::to).
    pub fn queue(queue: impl Into<String>) -> Self {
        Binding {
            queue: queue.into(),
            exchange: String::new(),
            routing_key: String::new(),
            arguments: FieldTable::default(),
        }
    }

    /// The exchange to bind to.
    pub fn to(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// The routing key (binding key) to bind with.
    pub fn routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.routing_key = routing_key.into();
        self
    }

    /// Adds a binding argument (for headers exchanges).
    pub fn argument(mut self, key: &str, value: AMQPValue) -> Self {
        self.arguments.insert(key.into(), value);
        self
    }
}

/// A set of declarations applied together, in order: exchanges, then queues,
/// then bindings.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    exchanges: Vec<Exchange>,
    queues: Vec<Queue>,
    bindings: Vec<Binding>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an exchange.
    pub fn exchange(mut self, exchange: Exchange) -> Self {
        self.exchanges.push(exchange);
        self
    }

    /// Adds a queue.
    pub fn queue(mut self, queue: Queue) -> Self {
        self.queues.push(queue);
        self
    }

    /// Adds a binding.
    pub fn binding(mut self, binding: Binding) -> Self {
        self.bindings.push(binding);
        self
    }

    /// The declared queues.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Adds everything from `other`.
    pub fn merge(mut self, other: Topology) -> Self {
        self.exchanges.extend(other.exchanges);
        self.queues.extend(other.queues);
        self.bindings.extend(other.bindings);
        self
    }

    /// Declares everything on `channel`. A failure names the entity; the
    /// channel is closed by the broker after a failed declaration.
    pub async fn apply(&self, channel: &lapin::Channel) -> Result<()> {
        for exchange in &self.exchanges {
            let options = ExchangeDeclareOptions {
                durable: exchange.durable,
                auto_delete: exchange.auto_delete,
                internal: exchange.internal,
                ..ExchangeDeclareOptions::default()
            };
            channel
                .exchange_declare(
                    ShortString::from(exchange.name.as_str()),
                    exchange.kind.clone(),
                    options,
                    exchange.arguments.clone(),
                )
                .await
                .map_err(|source| declare_error("exchange", &exchange.name, source))?;
        }
        for queue in &self.queues {
            let options = QueueDeclareOptions {
                durable: queue.durable,
                exclusive: queue.exclusive,
                auto_delete: queue.auto_delete,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(
                    ShortString::from(queue.name.as_str()),
                    options,
                    queue.arguments.clone(),
                )
                .await
                .map_err(|source| declare_error("queue", &queue.name, source))?;
        }
        for binding in &self.bindings {
            channel
                .queue_bind(
                    ShortString::from(binding.queue.as_str()),
                    ShortString::from(binding.exchange.as_str()),
                    ShortString::from(binding.routing_key.as_str()),
                    QueueBindOptions::default(),
                    binding.arguments.clone(),
                )
                .await
                .map_err(|source| declare_error("binding of queue", &binding.queue, source))?;
        }
        Ok(())
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

fn declare_error(what: &'static str, name: &str, source: lapin::Error) -> Error {
    Error::Declare {
        what,
        name: name.to_owned(),
        reason: crate::connection::describe(&source),
    }
}
