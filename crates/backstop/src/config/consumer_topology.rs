//! What a `[[consumer]]` declares besides its queue: `bindings` (exchanges
//! and the queue's bindings to them), `dead_letter_strategy` and
//! `queue_arguments`, each checked at load with its key.

use super::ConsumerSettings;
use crate::error::{Error, Result};
use crate::topology::{Binding, Exchange, Queue, Topology};
use lapin::types::{AMQPValue, LongString};
use serde::Deserialize;
use std::collections::BTreeMap;

/// One entry of `consumer.bindings`: an exchange, declared durable with its
/// type on every connect, and the consumed queue bound to it.
///
/// ```
/// let config = backstop::config::Config::parse(
///     "[[consumer]]\nqueue = \"orders.created\"\nhandler.http.url = \"http://127.0.0.1:8080/\"\n\
///      bindings = [{ exchange = \"orders\", type = \"topic\", routing_key = \"order.*\" }]\n",
///     "backstop.toml",
/// ).expect("valid");
/// assert_eq!(config.consumers[0].bindings[0].exchange, "orders");
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BindingSettings {
    /// The exchange's name (not the default exchange `""`; `amq.topic` and
    /// the other `amq.*` exchanges exist already and are fine).
    pub exchange: String,
    /// `direct`, `topic` (default), `fanout`, `headers`, or a plugin's
    /// `x-...` type. An exchange that exists with another type is an error
    /// naming both.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The binding key (default `""`, what a fanout exchange ignores).
    pub routing_key: Option<String>,
    /// Whether Backstop declares the exchange (default `true`). `false`
    /// for an exchange its producer owns with settings of its own (an
    /// `alternate-exchange`, a plugin type's arguments) or that this user
    /// may not configure: only the binding is declared, and a missing
    /// exchange is retried until it exists.
    pub declare: Option<bool>,
}

/// The default exchange type of a binding.
pub const DEFAULT_BINDING_TYPE: &str = "topic";

impl BindingSettings {
    /// The exchange type in effect.
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or(DEFAULT_BINDING_TYPE)
    }

    /// The routing key in effect.
    pub fn routing_key(&self) -> &str {
        self.routing_key.as_deref().unwrap_or("")
    }

    /// Whether the exchange is declared.
    pub fn declares(&self) -> bool {
        self.declare.unwrap_or(true)
    }
}

/// `at-most-once`: the default dead-letter strategy.
pub const AT_MOST_ONCE: &str = "at-most-once";
/// `at-least-once`: quorum queues keep a dead-lettered message until the
/// dead-letter target confirmed it.
pub const AT_LEAST_ONCE: &str = "at-least-once";

impl ConsumerSettings {
    /// The dead-letter strategy in effect.
    pub fn dead_letter_strategy(&self) -> &str {
        self.dead_letter_strategy.as_deref().unwrap_or(AT_MOST_ONCE)
    }

    fn is_quorum(&self) -> bool {
        self.queue_type.as_deref() == Some("quorum")
    }

    /// What this consumer declares on every connect: the queue (of its
    /// type, with its delivery limit, dead-letter strategy and
    /// `queue_arguments`), each exchange of `bindings` (durable, of its
    /// type) and the queue's bindings. The consumer adds what it derives
    /// (retry tiers, `<queue>.dlq`).
    pub fn topology(&self) -> Result<Topology> {
        let invalid = |(key, reason): (String, String)| Error::Config {
            key: "consumer",
            reason: format!("{key}: {reason}"),
        };
        let mut queue = if self.is_quorum() {
            let queue = Queue::quorum(&self.queue);
            match self.delivery_limit {
                Some(limit) => queue.delivery_limit(limit),
                None => queue,
            }
        } else {
            Queue::classic(&self.queue)
        };
        if self.dead_letter_strategy() == AT_LEAST_ONCE {
            queue = queue.at_least_once_dead_lettering();
        }
        for (key, value) in &self.queue_arguments {
            queue = queue.argument(key, self.queue_argument(key, value).map_err(invalid)?);
        }
        let mut topology = Topology::new().queue(queue);
        let mut declared: Vec<&str> = Vec::new();
        for (i, binding) in self.bindings.iter().enumerate() {
            if binding.declares() && !declared.contains(&binding.exchange.as_str()) {
                let exchange = Exchange::of_kind(&binding.exchange, binding.kind())
                    .map_err(|e| invalid((format!("bindings[{i}].type"), e)))?;
                topology = topology.exchange(exchange);
                declared.push(&binding.exchange);
            }
            topology = topology.binding(
                Binding::queue(&self.queue)
                    .to(&binding.exchange)
                    .routing_key(binding.routing_key()),
            );
        }
        Ok(topology)
    }

    /// The key (below the consumer) and the reason of the first bad value
    /// of `bindings`, `dead_letter_strategy` or `queue_arguments`.
    pub(super) fn check_topology(&self) -> std::result::Result<(), (String, String)> {
        let mut types: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, binding) in self.bindings.iter().enumerate() {
            let key = |k: &str| format!("bindings[{i}].{k}");
            if binding.exchange.is_empty() {
                return Err((
                    key("exchange"),
                    "the default exchange (\"\") routes by queue name already and takes no \
                     bindings: name an exchange"
                        .into(),
                ));
            }
            Exchange::of_kind(&binding.exchange, binding.kind()).map_err(|e| (key("type"), e))?;
            if let Some(other) = types.insert(&binding.exchange, binding.kind())
                && other != binding.kind()
            {
                return Err((
                    key("type"),
                    format!(
                        "exchange {:?} is bound with type {other:?} above and {:?} here: \
                         an exchange has one type",
                        binding.exchange,
                        binding.kind()
                    ),
                ));
            }
        }
        match self.dead_letter_strategy.as_deref() {
            None | Some(AT_MOST_ONCE) => {}
            Some(AT_LEAST_ONCE) if self.is_quorum() => {}
            Some(AT_LEAST_ONCE) => {
                return Err((
                    "dead_letter_strategy".into(),
                    "at-least-once dead-lettering is for quorum queues: set \
                     queue_type = \"quorum\""
                        .into(),
                ));
            }
            Some(other) => {
                return Err((
                    "dead_letter_strategy".into(),
                    format!("{other:?} is not \"at-most-once\" or \"at-least-once\""),
                ));
            }
        }
        for (key, value) in &self.queue_arguments {
            self.queue_argument(key, value)?;
        }
        self.check_no_broker_drops()
    }

    /// Refuses the queue arguments with which the broker itself would drop
    /// or delete messages of the consumed queue: a length limit that drops
    /// the head (a requeued delivery goes back to the head and is the one
    /// dropped, `rabbit_amqqueue_process:maybe_drop_head`), a limit that
    /// refuses the tiers' copies dead-lettered back at most once (classic),
    /// a message TTL without at-least-once dead-lettering to `<queue>.dlq`,
    /// a queue expiry, and a dead-letter target other than `<queue>.dlq`
    /// on a quorum queue.
    fn check_no_broker_drops(&self) -> std::result::Result<(), (String, String)> {
        let has = |key: &str| self.queue_arguments.contains_key(key);
        let arg = |key: &str| format!("queue_arguments.{key}");
        let at_least_once = self.is_quorum() && self.dead_letter_strategy() == AT_LEAST_ONCE;
        if has("x-expires") {
            return Err((
                arg("x-expires"),
                "x-expires deletes the queue, with its messages, once it has had no consumer \
                 for that long (a sidecar down over a weekend): Backstop never lets the broker \
                 drop a message"
                    .into(),
            ));
        }
        if has("x-message-ttl") && !at_least_once {
            return Err((
                arg("x-message-ttl"),
                "an expired message is dropped (or dead-lettered at most once): set \
                 queue_type = \"quorum\" and dead_letter_strategy = \"at-least-once\", so that \
                 expired messages are parked in <queue>.dlq"
                    .into(),
            ));
        }
        let written = self
            .queue_arguments
            .get("x-overflow")
            .and_then(|v| v.as_str());
        if written == Some("drop-head") {
            return Err((
                arg("x-overflow"),
                "drop-head drops messages from a full queue, requeued deliveries first: use \
                 \"reject-publish\""
                    .into(),
            ));
        }
        let overflow = written.or(at_least_once.then_some("reject-publish"));
        for limit in ["x-max-length", "x-max-length-bytes"] {
            if !has(limit) {
                continue;
            }
            if !matches!(overflow, Some("reject-publish" | "reject-publish-dlx")) {
                return Err((
                    arg(limit),
                    format!(
                        "{limit} drops the head of a full queue by default, and a requeued \
                         delivery goes back to the head: set x-overflow = \"reject-publish\" \
                         (publishers get a nack instead)"
                    ),
                ));
            }
            if !self.is_quorum() && !self.retry.delays.is_empty() {
                return Err((
                    arg(limit),
                    format!(
                        "a classic queue takes its retry tiers' copies back by dead-lettering \
                         at most once, and a full queue drops them: use {limit} with \
                         queue_type = \"quorum\" (its tiers dead-letter at least once), or \
                         without retry.delays"
                    ),
                ));
            }
        }
        if self.is_quorum() {
            for key in ["x-dead-letter-exchange", "x-dead-letter-routing-key"] {
                if has(key) {
                    return Err((
                        arg(key),
                        "Backstop dead-letters a quorum queue to <queue>.dlq (what its delivery \
                         limit and the DLQ tools rely on): remove this"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `queue_arguments.KEY = value` as the AMQP value declared, its type
    /// and range checked for the arguments RabbitMQ knows; any other `x-`
    /// argument is passed on as written.
    fn queue_argument(
        &self,
        key: &str,
        value: &toml::Value,
    ) -> std::result::Result<AMQPValue, (String, String)> {
        let fail = |reason: String| (format!("queue_arguments.{key}"), reason);
        let quorum = self.is_quorum();
        let kind = if quorum { "quorum" } else { "classic" };
        let only = |which: &str| {
            fail(format!(
                "{key} is only for {which} queues, and this one is {kind} (queue_type)"
            ))
        };
        let integer = |min: i64, max: i64| -> std::result::Result<AMQPValue, (String, String)> {
            match value {
                toml::Value::Integer(n) if (min..=max).contains(n) => {
                    Ok(AMQPValue::LongLongInt(*n))
                }
                toml::Value::Integer(n) => {
                    Err(fail(format!("{n} is out of range ({min} to {max})")))
                }
                other => Err(fail(format!(
                    "{key} takes an integer, not {}",
                    other.type_str()
                ))),
            }
        };
        // Milliseconds, or a duration such as "10m".
        let millis = |min: i64| -> std::result::Result<AMQPValue, (String, String)> {
            match value {
                toml::Value::String(text) => {
                    let ms = humantime::parse_duration(text)
                        .map_err(|e| {
                            fail(format!(
                                "{text:?} is not a duration like \"10m\" (or an integer of \
                             milliseconds): {e}"
                            ))
                        })?
                        .as_millis();
                    let ms =
                        i64::try_from(ms).map_err(|_| fail(format!("{text:?} is too long")))?;
                    if ms < min {
                        return Err(fail(format!("must be at least {min} ms")));
                    }
                    Ok(AMQPValue::LongLongInt(ms))
                }
                toml::Value::Integer(n) if *n >= min => Ok(AMQPValue::LongLongInt(*n)),
                toml::Value::Integer(_) => Err(fail(format!("must be at least {min} ms"))),
                other => Err(fail(format!(
                    "{key} takes milliseconds (an integer) or a duration like \"10m\", not {}",
                    other.type_str()
                ))),
            }
        };
        let one_of = |allowed: &[&str]| -> std::result::Result<AMQPValue, (String, String)> {
            match value {
                toml::Value::String(text) if allowed.contains(&text.as_str()) => {
                    Ok(AMQPValue::LongString(LongString::from(text.as_str())))
                }
                toml::Value::String(text) => Err(fail(format!(
                    "{text:?} is not one of {}",
                    allowed
                        .iter()
                        .map(|a| format!("{a:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
                other => Err(fail(format!(
                    "{key} takes a string, not {}",
                    other.type_str()
                ))),
            }
        };
        let text = || -> std::result::Result<AMQPValue, (String, String)> {
            match value {
                toml::Value::String(text) => {
                    Ok(AMQPValue::LongString(LongString::from(text.as_str())))
                }
                other => Err(fail(format!(
                    "{key} takes a string, not {}",
                    other.type_str()
                ))),
            }
        };
        match key {
            "x-queue-type" => Err(fail("set the queue's type with queue_type".into())),
            "x-delivery-limit" => Err(fail("set it with delivery_limit".into())),
            "x-dead-letter-strategy" => Err(fail("set it with dead_letter_strategy".into())),
            "x-max-length" | "x-max-length-bytes" => integer(0, i64::MAX),
            "x-max-in-memory-length" | "x-max-in-memory-bytes" if !quorum => Err(only("quorum")),
            "x-max-in-memory-length" | "x-max-in-memory-bytes" => integer(0, i64::MAX),
            "x-quorum-initial-group-size" if !quorum => Err(only("quorum")),
            "x-quorum-initial-group-size" => integer(1, i64::from(i32::MAX)),
            "x-max-priority" if quorum => Err(only("classic")),
            "x-max-priority" => integer(1, 255),
            "x-queue-mode" if quorum => Err(only("classic")),
            "x-queue-mode" => one_of(&["default", "lazy"]),
            "x-queue-version" if quorum => Err(only("classic")),
            "x-queue-version" => integer(1, 2),
            "x-single-active-consumer" => match value {
                toml::Value::Boolean(b) => Ok(AMQPValue::Boolean(*b)),
                other => Err(fail(format!(
                    "x-single-active-consumer takes true or false, not {}",
                    other.type_str()
                ))),
            },
            "x-message-ttl" => millis(0),
            "x-expires" | "x-consumer-timeout" => millis(1),
            "x-overflow" if self.dead_letter_strategy() == AT_LEAST_ONCE => match value.as_str() {
                Some("reject-publish") => one_of(&["reject-publish"]),
                _ => Err(fail(
                    "dead_letter_strategy = \"at-least-once\" needs x-overflow = \
                         \"reject-publish\" (and sets it): remove this or set that"
                        .into(),
                )),
            },
            "x-overflow" if quorum => one_of(&["drop-head", "reject-publish"]),
            "x-overflow" => one_of(&["drop-head", "reject-publish", "reject-publish-dlx"]),
            "x-dead-letter-exchange"
            | "x-dead-letter-routing-key"
            | "x-queue-leader-locator"
            | "x-queue-master-locator" => text(),
            other if !other.starts_with("x-") => Err(fail(format!(
                "{other:?} is not a queue argument: they start with \"x-\""
            ))),
            _ => match value {
                toml::Value::String(s) => Ok(AMQPValue::LongString(LongString::from(s.as_str()))),
                toml::Value::Integer(n) => Ok(AMQPValue::LongLongInt(*n)),
                toml::Value::Boolean(b) => Ok(AMQPValue::Boolean(*b)),
                toml::Value::Float(f) => Ok(AMQPValue::Double(*f)),
                other => Err(fail(format!(
                    "a queue argument is a string, a number or a boolean, not {}",
                    other.type_str()
                ))),
            },
        }
    }

    /// The keys of this file for `config check`: every binding with its
    /// type and routing key, the dead-letter strategy, the queue arguments
    /// as written.
    pub(super) fn normalized_topology(&self, consumer: &mut toml::Table) {
        use toml::Value;
        let bindings = self
            .bindings
            .iter()
            .map(|b| {
                let mut table = toml::Table::new();
                table.insert("exchange".into(), Value::String(b.exchange.clone()));
                table.insert("type".into(), Value::String(b.kind().to_owned()));
                table.insert(
                    "routing_key".into(),
                    Value::String(b.routing_key().to_owned()),
                );
                table.insert("declare".into(), Value::Boolean(b.declares()));
                Value::Table(table)
            })
            .collect();
        consumer.insert("bindings".into(), Value::Array(bindings));
        consumer.insert(
            "dead_letter_strategy".into(),
            Value::String(self.dead_letter_strategy().to_owned()),
        );
        consumer.insert(
            "queue_arguments".into(),
            Value::Table(
                self.queue_arguments
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
        );
    }
}
