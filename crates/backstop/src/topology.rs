//! Declarative topology: exchanges, queues and bindings, built with named
//! builders and applied on every connect before any consumer starts.
//!
//! Declarations are idempotent in AMQP, so re-applying after a reconnect, a
//! broker restart or a deleted queue brings the broker back to the declared
//! shape. A declaration that conflicts with what the broker already has fails
//! with `PRECONDITION_FAILED`, which is reported with the name of the entity.
//!
//! A quorum queue dead-letters to its parking lot `<queue>.dlq` by default
//! (see [`Queue::quorum`]), and applying the topology declares that queue
//! too. RabbitMQ compares every argument of a redeclared queue, so a quorum
//! queue first declared without a dead-letter exchange (by Backstop before
//! this default, or by hand) is refused with `PRECONDITION_FAILED
//! inequivalent arg 'x-dead-letter-exchange'`: declare it with
//! [`Queue::without_dead_letter_queue`] to keep its old shape, or drain and
//! delete it (or move to a new name) to take the new one.
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

    /// An exchange of the type named `kind`: `direct`, `topic`, `fanout`,
    /// `headers`, or a plugin's type (`x-...`, such as
    /// `x-delayed-message`). Any other name is refused, with the accepted ones.
    pub fn of_kind(name: impl Into<String>, kind: &str) -> std::result::Result<Self, String> {
        let kind = match kind {
            "direct" => lapin::ExchangeKind::Direct,
            "topic" => lapin::ExchangeKind::Topic,
            "fanout" => lapin::ExchangeKind::Fanout,
            "headers" => lapin::ExchangeKind::Headers,
            custom if custom.len() > 2 && custom.starts_with("x-") => {
                lapin::ExchangeKind::Custom(custom.to_owned())
            }
            other => {
                return Err(format!(
                    "{other:?} is not an exchange type: use \"direct\", \"topic\", \"fanout\", \
                     \"headers\" or a plugin's \"x-...\" type"
                ));
            }
        };
        Ok(Self::new(name, kind))
    }

    /// The exchange's type, as the broker names it (`topic`).
    pub fn kind_name(&self) -> &str {
        match &self.kind {
            lapin::ExchangeKind::Direct => "direct",
            lapin::ExchangeKind::Topic => "topic",
            lapin::ExchangeKind::Fanout => "fanout",
            lapin::ExchangeKind::Headers => "headers",
            lapin::ExchangeKind::Custom(custom) => custom,
        }
    }
}

/// The `x-delivery-limit` of a quorum parking lot (`<queue>.dlq`): the
/// largest the broker reads, so that listing its messages never uses it up.
pub const PARKING_LOT_DELIVERY_LIMIT: u32 = i32::MAX as u32;

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
    /// Dead-letter to `<name>.dlq` when no dead-letter exchange is set.
    default_dead_letter_queue: bool,
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
            default_dead_letter_queue: queue_type == QueueType::Quorum,
        }
    }

    /// A durable classic queue.
    pub fn classic(name: impl Into<String>) -> Self {
        Self::new(name, QueueType::Classic)
    }

    /// A quorum queue (durable and replicated).
    ///
    /// Unless told otherwise ([`without_dead_letter_queue`](Self::without_dead_letter_queue),
    /// or a dead-letter exchange of its own), it dead-letters to `<name>.dlq`
    /// through the default exchange, and [`Topology::apply`] declares that
    /// queue (a quorum queue of its own, with no dead-lettering). A quorum
    /// queue drops a message that comes back more often than its delivery
    /// limit (`x-delivery-limit`; RabbitMQ 4.0 and later set 20 when none is
    /// given, 3.10-3.13 have no default) unless it has somewhere to
    /// dead-letter it. A queue named `*.dlq` is itself a parking lot and gets
    /// none. Redeclaring an existing queue with other arguments fails: see
    /// the module documentation.
    pub fn quorum(name: impl Into<String>) -> Self {
        Self::new(name, QueueType::Quorum)
    }

    /// The parking lot `<queue>.dlq` of `queue`, a queue of `queue_type`:
    /// of the same type as the queue it serves, durable, and with no
    /// dead-lettering of its own.
    ///
    /// A quorum parking lot declares the largest delivery limit
    /// ([`PARKING_LOT_DELIVERY_LIMIT`]): `backstop dlq list` shows messages
    /// without acking them, and each listing is a return that a quorum
    /// queue counts. Under RabbitMQ 4.0's default limit of 20 the 21st
    /// listing would drop them, since a parking lot has nowhere to
    /// dead-letter to. (A negative limit means "none" only from 4.0 on;
    /// 3.10 would drop on the first return.)
    pub fn dead_letter_queue_for(queue: &str, queue_type: QueueType) -> Self {
        let dlq = Self::new(
            crate::retry::RetryPolicy::dead_letter_queue(queue),
            queue_type,
        )
        .without_dead_letter_queue();
        match queue_type {
            QueueType::Classic => dlq,
            QueueType::Quorum => dlq.delivery_limit(PARKING_LOT_DELIVERY_LIMIT),
        }
    }

    /// No default dead-lettering to `<name>.dlq` for this quorum queue: its
    /// arguments stay as given (for a queue that already exists without a
    /// dead-letter exchange).
    pub fn without_dead_letter_queue(mut self) -> Self {
        self.default_dead_letter_queue = false;
        self
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
    /// retry policy publishes to. [`Topology::apply`] declares it. This is a
    /// dead-letter exchange of the queue's own: without a retry policy, the
    /// consumer's rejections are then plain `basic.reject`s to it.
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

    /// True when the default dead-lettering to `<name>.dlq` applies (see
    /// [`Queue::quorum`]).
    fn uses_default_dead_lettering(&self) -> bool {
        self.default_dead_letter_queue
            && !self.has_dead_letter_exchange()
            && !self.name.ends_with(".dlq")
    }

    /// The parking lot `<name>.dlq` this queue dead-letters to, by default
    /// (see [`Queue::quorum`]) or through [`dead_letter_to_dlq`](Self::dead_letter_to_dlq):
    /// [`Topology::apply`] declares it unless the topology declares it itself.
    pub fn parking_lot(&self) -> Option<String> {
        let dlq = crate::retry::RetryPolicy::dead_letter_queue(&self.name);
        let text = |key: &str| {
            self.arguments
                .inner()
                .get(key)
                .and_then(crate::retry::header_str)
        };
        let explicit = text("x-dead-letter-exchange").as_deref() == Some("")
            && text("x-dead-letter-routing-key").as_deref() == Some(dlq.as_str());
        (explicit || self.uses_default_dead_lettering()).then_some(dlq)
    }

    /// True when the queue was given a dead-letter exchange of its own
    /// (`x-dead-letter-exchange`), not just the default parking lot.
    pub fn has_dead_letter_exchange(&self) -> bool {
        self.arguments
            .inner()
            .contains_key("x-dead-letter-exchange")
    }

    /// The `x-delivery-limit` argument, when it is set.
    pub fn delivery_limit_argument(&self) -> Option<u64> {
        self.arguments
            .inner()
            .get("x-delivery-limit")
            .and_then(crate::retry::header_u64)
    }

    /// The arguments sent with `queue.declare`: the given ones, plus the
    /// default dead-lettering to `<name>.dlq`.
    pub fn declared_arguments(&self) -> FieldTable {
        let mut arguments = self.arguments.clone();
        if self.uses_default_dead_lettering() {
            let dlq = crate::retry::RetryPolicy::dead_letter_queue(&self.name);
            arguments.insert("x-dead-letter-exchange".into(), long_string(""));
            arguments.insert("x-dead-letter-routing-key".into(), long_string(&dlq));
        }
        arguments
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

    /// The bound queue.
    pub fn queue_name(&self) -> &str {
        &self.queue
    }

    /// The exchange bound to.
    pub fn exchange_name(&self) -> &str {
        &self.exchange
    }

    /// The binding's routing key.
    pub fn routing_key_name(&self) -> &str {
        &self.routing_key
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

    /// The queues added to this topology (without the parking lots that
    /// [`apply`](Self::apply) adds; see [`all_queues`](Self::all_queues)).
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Every queue [`apply`](Self::apply) declares, in order: for each added
    /// queue its parking lot ([`Queue::parking_lot`]) unless the topology
    /// declares a queue of that name itself, then the queue. A name
    /// added twice is declared once, as first added: a consumer's own
    /// topology comes before what it derives (retry tiers, `<queue>.dlq`),
    /// so a queue the user declared keeps the user's shape.
    pub fn all_queues(&self) -> Vec<Queue> {
        let mut all: Vec<Queue> = Vec::with_capacity(self.queues.len());
        for queue in &self.queues {
            if all.iter().any(|q| q.name == queue.name) {
                continue;
            }
            if let Some(dlq) = queue.parking_lot()
                && !self.queues.iter().any(|q| q.name == dlq)
                && !all.iter().any(|q| q.name == dlq)
            {
                all.push(Queue::dead_letter_queue_for(&queue.name, queue.queue_type));
            }
            all.push(queue.clone());
        }
        all
    }

    /// The exchanges added to this topology.
    pub fn exchanges(&self) -> &[Exchange] {
        &self.exchanges
    }

    /// The bindings added to this topology.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Adds everything from `other`.
    pub fn merge(mut self, other: Topology) -> Self {
        self.exchanges.extend(other.exchanges);
        self.queues.extend(other.queues);
        self.bindings.extend(other.bindings);
        self
    }

    /// Declares everything on `channel`. A failure names the entity; the
    /// channel is closed by the broker after a failed declaration. An entity
    /// that exists with another shape (an exchange of another type, a queue
    /// with other arguments) is an [`Error::TopologyConflict`] naming the
    /// argument and both values.
    pub async fn apply(&self, channel: &lapin::Channel) -> Result<()> {
        self.apply_reporting(channel, |_| {}).await
    }

    /// [`apply`](Self::apply), calling `declared` with a line describing
    /// each entity once the broker has it (`exchange "orders" (topic,
    /// durable)`): what `backstop topology apply` prints.
    pub async fn apply_reporting(
        &self,
        channel: &lapin::Channel,
        mut declared: impl FnMut(String),
    ) -> Result<()> {
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
            declared(format!(
                "exchange {:?} ({}, {})",
                exchange.name,
                exchange.kind_name(),
                if exchange.durable {
                    "durable"
                } else {
                    "transient"
                }
            ));
        }
        for queue in &self.all_queues() {
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
                    queue.declared_arguments(),
                )
                .await
                .map_err(|source| declare_error("queue", &queue.name, source))?;
            declared(describe_queue(queue));
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
            declared(format!(
                "binding of queue {:?} to exchange {:?} with routing key {:?}",
                binding.queue, binding.exchange, binding.routing_key
            ));
        }
        Ok(())
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// One line for a declared queue: its name, type, durability and the
/// arguments it was declared with, sorted by name.
fn describe_queue(queue: &Queue) -> String {
    let kind = match queue.queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    let durable = if queue.durable {
        "durable"
    } else {
        "transient"
    };
    let arguments = queue.declared_arguments();
    let mut shown: Vec<String> = arguments
        .inner()
        .iter()
        .filter(|(key, _)| key.as_str() != "x-queue-type")
        .map(|(key, value)| format!("{}={}", key.as_str(), show_value(value)))
        .collect();
    shown.sort();
    if shown.is_empty() {
        format!("queue {:?} ({kind}, {durable})", queue.name)
    } else {
        format!(
            "queue {:?} ({kind}, {durable}) {}",
            queue.name,
            shown.join(" ")
        )
    }
}

/// An argument's value as a person writes it: strings quoted, numbers and
/// booleans bare.
fn show_value(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

fn declare_error(what: &'static str, name: &str, source: lapin::Error) -> Error {
    let broker = crate::connection::describe(&source);
    let conflict = match source.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind()
                == lapin::protocol::AMQPErrorKind::Soft(
                    lapin::protocol::AMQPSoftError::PRECONDITIONFAILED,
                ) =>
        {
            Inequivalent::parse(amqp.get_message().as_str())
        }
        _ => None,
    };
    match conflict {
        Some(conflict) => Error::TopologyConflict {
            what,
            name: name.to_owned(),
            reason: format!("{} (broker: {broker})", conflict.explain(what)),
        },
        None => Error::Declare {
            what,
            name: name.to_owned(),
            reason: broker,
        },
    }
}

/// The broker's `PRECONDITION_FAILED - inequivalent arg 'KEY' for queue
/// 'q' in vhost '/': received NEW but current is OLD` (RabbitMQ's
/// `rabbit_misc:equivalence_fail`, 3.x and 4.x), read: an entity that
/// exists with another shape than the one declared. A value is `none`
/// (not set), `'V'`, or `the value 'V' of type 'T'`.
#[derive(Debug, PartialEq, Eq)]
struct Inequivalent {
    /// The argument or field: `x-max-length`, `type`, `durable`.
    argument: String,
    /// What this declaration asked for; `None` when it does not set it.
    declared: Value,
    /// What the broker has; `None` when the existing entity does not set it.
    current: Value,
}

/// One side of an [`Inequivalent`].
#[derive(Debug, PartialEq, Eq)]
enum Value {
    /// Read from the reply: `None` when that side does not set it.
    Read(Option<String>),
    /// The reply's text could not be read (cut short, or a hostile name).
    Unread,
}

impl Inequivalent {
    /// `None` when `text` is not an "inequivalent arg" refusal. The
    /// conflict is decided by that prefix alone; the values are read best
    /// effort (`Unread` when they are not in a known shape: the broker cuts
    /// reply texts at 255 bytes, and a hostile entity name can contain the
    /// separators), so a long name never turns a conflict into a retry.
    fn parse(text: &str) -> Option<Self> {
        const PREFIX: &str = "inequivalent arg '";
        let rest = &text[text.find(PREFIX)? + PREFIX.len()..];
        let Some((argument, rest)) = rest.split_once('\'') else {
            return Some(Self::unread(rest));
        };
        let values = rest
            .rfind(": received ")
            .map(|at| &rest[at + ": received ".len()..])
            .and_then(|rest| rest.rsplit_once(" but current is "))
            .and_then(|(declared, current)| {
                Some((Self::value(declared)?, Self::value(current.trim_end())?))
            });
        Some(match values {
            Some((declared, current)) => Inequivalent {
                argument: argument.to_owned(),
                declared: Value::Read(declared),
                current: Value::Read(current),
            },
            None => Self::unread(argument),
        })
    }

    fn unread(argument: &str) -> Self {
        Inequivalent {
            argument: argument.to_owned(),
            declared: Value::Unread,
            current: Value::Unread,
        }
    }

    /// `none` is `Some(None)`; text in no known shape is `None`.
    fn value(text: &str) -> Option<Option<String>> {
        if text == "none" {
            return Some(None);
        }
        if let Some(typed) = text.strip_prefix("the value '") {
            let end = typed.rfind("' of type '")?;
            return Some(Some(typed[..end].to_owned()));
        }
        let quoted = text.strip_prefix('\'')?.strip_suffix('\'')?;
        Some(Some(quoted.to_owned()))
    }

    /// The conflict in words, with what to do about it.
    fn explain(&self, what: &str) -> String {
        let show = |value: &Value| match value {
            Value::Read(Some(value)) => format!("{} = {value}", self.argument),
            Value::Read(None) => format!("no {}", self.argument),
            Value::Unread => format!("another {} (see the broker's reply)", self.argument),
        };
        let name = |value: &Value| match value {
            Value::Read(Some(value)) => value.clone(),
            Value::Read(None) => "none".to_owned(),
            Value::Unread => "another (see the broker's reply)".to_owned(),
        };
        let cure = match (what, self.argument.as_str()) {
            ("exchange", "type") => {
                "an exchange's type cannot change: bind with the type it has, or delete the \
                 exchange (its bindings go with it) and let it be declared again"
            }
            ("exchange", _) => {
                "an exchange cannot be redeclared with other settings: match them, or delete \
                 the exchange and let it be declared again"
            }
            _ => {
                "RabbitMQ cannot change an existing queue's arguments: make the configuration \
                 match them (or set them with a policy), or move the messages off, delete the \
                 queue and let it be declared again"
            }
        };
        let (current, declared) = (show(&self.current), show(&self.declared));
        if self.argument == "type" && what == "exchange" {
            format!(
                "it exists with type {}, but this configuration declares type {}: {cure}",
                name(&self.current),
                name(&self.declared)
            )
        } else {
            format!("it exists with {current}, but this configuration declares {declared}: {cure}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(queue: &Queue, key: &str) -> Option<String> {
        match queue.declared_arguments().inner().get(key) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        }
    }

    fn names(topology: &Topology) -> Vec<String> {
        topology
            .all_queues()
            .iter()
            .map(|q| q.name().to_owned())
            .collect()
    }

    #[test]
    fn a_quorum_queue_dead_letters_to_its_dlq_unless_told_otherwise() {
        let orders = Queue::quorum("orders");
        assert_eq!(text(&orders, "x-dead-letter-exchange").as_deref(), Some(""));
        assert_eq!(
            text(&orders, "x-dead-letter-routing-key").as_deref(),
            Some("orders.dlq")
        );
        assert!(
            !orders.has_dead_letter_exchange(),
            "the default is not the user's own"
        );
        assert_eq!(
            names(&Topology::new().queue(orders)),
            ["orders.dlq", "orders"]
        );

        let old_shape = Queue::quorum("orders").without_dead_letter_queue();
        assert_eq!(text(&old_shape, "x-dead-letter-exchange"), None);
        assert_eq!(names(&Topology::new().queue(old_shape)), ["orders"]);

        let own = Queue::quorum("orders").dead_letter_exchange("failures");
        assert!(own.has_dead_letter_exchange());
        assert_eq!(
            text(&own, "x-dead-letter-exchange").as_deref(),
            Some("failures")
        );
        assert_eq!(text(&own, "x-dead-letter-routing-key"), None);
        assert_eq!(names(&Topology::new().queue(own)), ["orders"]);

        let parking_lot = Queue::quorum("orders.dlq");
        assert_eq!(text(&parking_lot, "x-dead-letter-exchange"), None);
        assert_eq!(parking_lot.parking_lot(), None);
        assert_eq!(Queue::classic("audit").parking_lot(), None);
        let classic = Queue::classic("audit").dead_letter_to_dlq();
        assert_eq!(classic.parking_lot().as_deref(), Some("audit.dlq"));
        assert_eq!(
            names(&Topology::new().queue(classic)),
            ["audit.dlq", "audit"]
        );
    }

    #[test]
    fn the_brokers_inequivalent_arg_replies_are_read() {
        let missing = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in \
                       vhost '/': received the value '10' of type 'signedint' but current is none";
        let parsed = Inequivalent::parse(missing).expect("parses");
        assert_eq!(
            parsed,
            Inequivalent {
                argument: "x-max-length".into(),
                declared: Value::Read(Some("10".into())),
                current: Value::Read(None),
            }
        );
        assert!(
            parsed.explain("queue").starts_with(
                "it exists with no x-max-length, but this configuration declares x-max-length = 10:"
            ),
            "{}",
            parsed.explain("queue")
        );
        let both = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in \
                    vhost '/': received '10' but current is '5'";
        let parsed = Inequivalent::parse(both).expect("parses");
        assert_eq!(parsed.current, Value::Read(Some("5".into())));
        assert_eq!(parsed.declared, Value::Read(Some("10".into())));
        let kind = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'orders' in \
                    vhost '/': received 'topic' but current is 'direct'";
        let explained = Inequivalent::parse(kind)
            .expect("parses")
            .explain("exchange");
        assert!(
            explained.starts_with(
                "it exists with type direct, but this configuration declares type topic:"
            ),
            "{explained}"
        );
        assert_eq!(
            Inequivalent::parse("PRECONDITION_FAILED - unknown delivery tag 7"),
            None
        );
        // A name holding the separators still reads its values.
        let hostile = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue \
                       'a: received \'1\' but current is \'2\'' in vhost '/': received '10' \
                       but current is '5'";
        let parsed = Inequivalent::parse(hostile).expect("parses");
        assert_eq!(parsed.declared, Value::Read(Some("10".into())));
        assert_eq!(parsed.current, Value::Read(Some("5".into())));
        // The broker cuts a reply at 255 bytes: still a conflict, its
        // values unread.
        let cut = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue \
                   'a-very-long-queue-name' in vhost '/': received the value '10' of ty...";
        let parsed = Inequivalent::parse(cut).expect("a conflict");
        assert_eq!(parsed.declared, Value::Unread);
        assert!(
            parsed
                .explain("queue")
                .starts_with("it exists with another x-max-length (see the broker's reply)"),
            "{}",
            parsed.explain("queue")
        );
        let cut_early = "PRECONDITION_FAILED - inequivalent arg 'x-max-le...";
        assert_eq!(
            Inequivalent::parse(cut_early).expect("a conflict").argument,
            "x-max-le..."
        );
    }

    #[test]
    fn exchange_types_are_named_or_refused() {
        assert_eq!(
            Exchange::of_kind("e", "topic").expect("valid").kind_name(),
            "topic"
        );
        assert_eq!(
            Exchange::of_kind("e", "x-delayed-message")
                .expect("a plugin's type")
                .kind_name(),
            "x-delayed-message"
        );
        let err = Exchange::of_kind("e", "topics").expect_err("not a type");
        assert!(err.contains("\"topics\" is not an exchange type"), "{err}");
    }

    #[test]
    fn a_queue_added_twice_is_declared_once_as_first_added() {
        let topology = Topology::new()
            .queue(Queue::classic("orders.dlq"))
            .queue(Queue::quorum("orders").delivery_limit(3))
            .queue(Queue::dead_letter_queue_for("orders", QueueType::Quorum));
        let all = topology.all_queues();
        assert_eq!(names(&topology), ["orders.dlq", "orders"]);
        assert_eq!(all[0].queue_type(), QueueType::Classic);
        assert_eq!(all[1].delivery_limit_argument(), Some(3));
        let implied = Topology::new().queue(Queue::quorum("orders")).all_queues();
        assert_eq!(
            implied[0].delivery_limit_argument(),
            Some(u64::from(PARKING_LOT_DELIVERY_LIMIT)),
            "a listed parking lot never reaches its delivery limit"
        );
    }
}
