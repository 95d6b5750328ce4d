//! The load of `backstop chaos`: orders published at a fixed rate for the
//! whole run, each with a publisher confirm, on a lapin connection of its
//! own straight to the cluster's nodes (never through the fault proxies).
//!
//! On a failure (a publish refused by a closed channel, a confirm that errs
//! or does not come within [`CONFIRM_TIMEOUT`]) the publisher moves to the
//! next node and publishes again everything not confirmed yet: a message may
//! then be in the queue twice, which dedup absorbs. A share of orders is
//! also published twice on purpose ([`DUPLICATE_PER_MILLE`]), the same body
//! under another message id. An order is published once a copy is
//! confirmed.

use backstop_testkit::cluster;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Orders published a second time on purpose, per mille.
pub(crate) const DUPLICATE_PER_MILLE: u32 = 70;
/// How long a confirm may take before the copy is published again.
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes awaiting their confirm, at most.
const MAX_IN_FLIGHT: usize = 2_000;
/// How long one connection attempt to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One message of the load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Message {
    /// The business id: the JSON body's `order`.
    pub(crate) order: String,
    /// Its own message id (`<order>#<copy>`).
    pub(crate) message_id: String,
    /// When it is due, from the start of the load.
    pub(crate) at: Duration,
}

/// The run's messages in the order they are due: order `i` at `i / rate`,
/// and a deliberate duplicate of a seeded share of them 0.2 to 3 s later.
pub(crate) fn plan(run: &str, orders: u64, rate: u32, seed: u64) -> Vec<Message> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let per_order = Duration::from_secs(1) / rate.max(1);
    let mut messages = Vec::with_capacity((orders + orders / 10) as usize);
    for i in 0..orders {
        let order = order_id(run, i);
        let at = per_order * (i as u32);
        messages.push(Message {
            message_id: format!("{order}#0"),
            order: order.clone(),
            at,
        });
        if rng.u32(0..1000) < DUPLICATE_PER_MILLE {
            messages.push(Message {
                message_id: format!("{order}#1"),
                order,
                at: at + Duration::from_millis(rng.u64(200..3_000)),
            });
        }
    }
    messages.sort_by_key(|m| m.at);
    messages
}

/// Order `i` of `run`.
pub(crate) fn order_id(run: &str, i: u64) -> String {
    format!("{run}-{i:06}")
}

/// The body of an order's every copy (the same bytes, so a copy stored in
/// the compensation store is an occurrence of the first one's row).
pub(crate) fn body(order: &str) -> Vec<u8> {
    serde_json::json!({ "order": order, "note": "backstop chaos" })
        .to_string()
        .into_bytes()
}

/// What the publisher did.
#[derive(Debug, Default)]
pub(crate) struct Published {
    /// Each confirmed order and when its first copy was confirmed (ms
    /// since the epoch).
    pub(crate) confirmed: HashMap<String, i64>,
    /// Each order's first `basic.publish` (ms since the epoch).
    pub(crate) first_sent: HashMap<String, i64>,
    /// Messages in the plan.
    pub(crate) planned_messages: usize,
    /// `basic.publish` calls, first copies and again-publishes together.
    pub(crate) publishes: u64,
    /// Copies published again after a failure or a timeout.
    pub(crate) republished: u64,
    /// Connections opened (the first one included).
    pub(crate) connections: u64,
    /// Nacks and returns (the queue did not take the copy).
    pub(crate) nacks: u64,
    /// Confirms that failed (the channel closed under them).
    pub(crate) confirm_errors: u64,
    /// Confirms that did not come within [`CONFIRM_TIMEOUT`].
    pub(crate) confirm_timeouts: u64,
    /// `basic.publish` calls that failed.
    pub(crate) publish_errors: u64,
    /// The first failures, in words.
    pub(crate) failures: Vec<String>,
    /// The last failures, in words.
    pub(crate) last_failures: VecDeque<String>,
    /// True when every message was confirmed before the deadline.
    pub(crate) complete: bool,
}

impl Published {
    fn failed(&mut self, why: String) {
        if self.failures.len() < 10 {
            self.failures.push(why);
        } else {
            if self.last_failures.len() == 10 {
                self.last_failures.pop_front();
            }
            self.last_failures.push_back(why);
        }
    }
}

type ConfirmOutcome = (usize, Result<Result<Confirmation, lapin::Error>, ()>);

/// Publishes `messages` to `queue` from `start`, each at its time (late ones
/// at once), until all are confirmed or `deadline`.
pub(crate) async fn publish(
    messages: Vec<Message>,
    queue: String,
    start: Instant,
    deadline: Instant,
) -> Published {
    let mut done = Published {
        planned_messages: messages.len(),
        ..Published::default()
    };
    let mut link: Option<(Connection, Channel)> = None;
    let mut node = 0usize;
    let mut again: VecDeque<(usize, Instant)> = VecDeque::new();
    let mut next = 0usize;
    let mut confirmed_messages = vec![false; messages.len()];
    let mut in_flight: FuturesUnordered<BoxFuture<'static, ConfirmOutcome>> =
        FuturesUnordered::new();
    loop {
        if next == messages.len() && again.is_empty() && in_flight.is_empty() {
            done.complete = true;
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        if link.is_none() && (next < messages.len() || !again.is_empty()) {
            let n = cluster::NODES[node % cluster::NODES.len()];
            match open(n).await {
                Ok(opened) => {
                    done.connections += 1;
                    link = Some(opened);
                }
                Err(e) => {
                    done.failed(format!("connecting to node {n}: {e}"));
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let due = match again.front() {
            Some((_, at)) => Some(*at),
            None => messages.get(next).map(|m| start + m.at),
        };
        let can_publish = due.is_some() && link.is_some() && in_flight.len() < MAX_IN_FLIGHT;
        let due = due.unwrap_or(deadline);
        tokio::select! {
            Some((index, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                match outcome {
                    Ok(Ok(Confirmation::Ack(None))) => {
                        confirmed_messages[index] = true;
                        done.confirmed
                            .entry(messages[index].order.clone())
                            .or_insert_with(|| backstop::retry::now_ms() as i64);
                    }
                    Ok(Ok(other)) => {
                        // Nacked or returned: the queue did not take it.
                        done.nacks += 1;
                        done.failed(format!("{}: {other:?}", messages[index].message_id));
                        again.push_back((index, Instant::now() + Duration::from_millis(200)));
                    }
                    Ok(Err(e)) => {
                        done.confirm_errors += 1;
                        done.failed(format!("confirm of {}: {e}", messages[index].message_id));
                        again.push_back((index, Instant::now()));
                        if link.as_ref().is_some_and(|(_, ch)| !ch.status().connected()) {
                            leave(&mut link, &mut node);
                        }
                    }
                    Err(()) => {
                        done.confirm_timeouts += 1;
                        done.failed(format!(
                            "no confirm of {} within {CONFIRM_TIMEOUT:?}",
                            messages[index].message_id
                        ));
                        again.push_back((index, Instant::now()));
                        leave(&mut link, &mut node);
                    }
                }
            }
            _ = tokio::time::sleep_until(due.into()), if can_publish => {
                let (index, republish) = match again.pop_front() {
                    Some((index, _)) => (index, true),
                    None => {
                        next += 1;
                        (next - 1, false)
                    }
                };
                if confirmed_messages[index] {
                    continue;
                }
                let Some((_, channel)) = &link else {
                    again.push_front((index, Instant::now()));
                    continue;
                };
                let message = &messages[index];
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(message.message_id.as_str().into());
                match channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                        &body(&message.order),
                        properties,
                    )
                    .await
                {
                    Ok(confirm) => {
                        done.publishes += 1;
                        done.first_sent
                            .entry(message.order.clone())
                            .or_insert_with(|| backstop::retry::now_ms() as i64);
                        if republish {
                            done.republished += 1;
                        }
                        in_flight.push(Box::pin(async move {
                            (index, tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await.map_err(|_| ()))
                        }));
                    }
                    Err(e) => {
                        done.publish_errors += 1;
                        done.failed(format!("publishing {}: {e}", message.message_id));
                        again.push_front((index, Instant::now()));
                        leave(&mut link, &mut node);
                    }
                }
            }
            else => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    if let Some((connection, _)) = link.take() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.close(200, "published".into()),
        )
        .await;
    }
    done
}

/// Drops the current connection (closing it in the background) and moves
/// to the next node.
fn leave(link: &mut Option<(Connection, Channel)>, node: &mut usize) {
    if let Some((connection, _)) = link.take() {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                connection.close(200, "moving to another node".into()),
            )
            .await;
        });
    }
    *node += 1;
}

async fn open(n: u8) -> Result<(Connection, Channel), String> {
    let attempt = async {
        let connection = Connection::connect(
            &cluster::node_url(n),
            ConnectionProperties::default().with_connection_name("backstop-chaos-publisher".into()),
        )
        .await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, lapin::Error>((connection, channel))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_paces_orders_and_repeats_a_share() {
        let messages = plan("r1", 1_000, 50, 3);
        let orders: std::collections::HashSet<&str> =
            messages.iter().map(|m| m.order.as_str()).collect();
        assert_eq!(orders.len(), 1_000);
        let repeats = messages.len() - 1_000;
        assert!((40..=110).contains(&repeats), "{repeats} repeats");
        assert!(messages.windows(2).all(|w| w[0].at <= w[1].at));
        let last = messages.iter().map(|m| m.at).max().unwrap_or_default();
        assert!(last >= Duration::from_millis(19_980), "{last:?}");
        assert!(last < Duration::from_secs(23), "{last:?}");
        assert_eq!(plan("r1", 1_000, 50, 3), messages);
    }
}
