//! One confirm-mode channel that carries many publishes at once, each
//! matched to its own confirm, nack or return.
//!
//! **Why lapin's pairing is not enough.** lapin resolves each publish's
//! [`PublisherConfirm`] from the delivery tags of `basic.ack`/`basic.nack`,
//! which is exact. But it hands a `basic.return` to whichever confirm of the
//! channel it resolves next (and resolves the tags of a multiple-ack in no
//! set order), so the returned message may ride on another publish's
//! confirm. Read as lapin gives it, an unroutable message can look
//! confirmed.
//!
//! **How a lane matches them.** Every confirm of the lane goes to one
//! collector task, which reads the returned message's own identity instead
//! of trusting which confirm carried it:
//! - every publish carries a message-id (the [`Publisher`](super::Publisher)
//!   generates one when missing), and the broker returns the message with
//!   its properties;
//! - a return marks *every* unsettled publish of the lane with that
//!   message-id, exchange and routing key as returned. Two publishes in
//!   flight with the same id (a client's retry) are both reported
//!   unroutable, one of them perhaps wrongly: a spurious failure the caller
//!   retries, never a loss;
//! - the broker sends a message's return before the ack of its delivery
//!   tag, and lapin attaches it to the first confirm it resolves after the
//!   return is complete: the owner's own, or one resolved before it. The
//!   collector takes every confirm that is ready, and reads all their returns
//!   before it settles any of them, so an owner is marked before it is
//!   settled. A return for a publish not yet registered (its confirm came
//!   before `basic_publish` returned to the sender) is kept until it is.
//!
//! A lane is exclusive while a sender holds it (the pool's guard), so
//! publishes enter the channel, and the collector, in delivery-tag order.

use crate::connection::LiveConnection;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// How a publish on a lane ended, as the broker told it.
#[derive(Debug)]
pub(crate) enum Settled {
    /// Confirmed, not returned.
    Ack,
    /// Returned as unroutable (then confirmed or nacked). `ambiguous`: the
    /// return matched several publishes in flight with the same message-id,
    /// so this one may have been routed and stored.
    Returned {
        /// Several publishes shared the returned identity.
        ambiguous: bool,
    },
    /// `basic.nack`.
    Nack,
    /// The channel failed before the confirm.
    Failed(lapin::Error),
}

/// A publish handed to the collector.
struct Sent {
    message_id: Option<String>,
    exchange: String,
    routing_key: String,
    confirm: PublisherConfirm,
    reply: oneshot::Sender<Settled>,
}

/// A publish the collector waits on.
struct Waiting {
    message_id: Option<String>,
    exchange: String,
    routing_key: String,
    returned: bool,
    /// A return matched this publish and another in flight with the same
    /// identity: only one of them was returned.
    ambiguous: bool,
    /// The confirm, once lapin resolved it.
    result: Option<lapin::Result<Confirmation>>,
    reply: oneshot::Sender<Settled>,
}

/// One confirm channel and its collector.
pub(crate) struct Lane {
    channel: lapin::Channel,
    live: LiveConnection,
    sent: mpsc::UnboundedSender<Sent>,
    /// Set when a send was abandoned between `basic_publish` and handing its
    /// confirm to the collector: the lane must not carry another publish.
    tainted: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
}

impl Lane {
    /// Opens a confirm channel on `live` and starts its collector.
    pub(crate) async fn open(live: LiveConnection) -> Result<Lane, String> {
        if live.is_blocked() {
            return Err("the broker blocked the publishing connection (a resource alarm)".into());
        }
        let channel = live.create_channel().await.map_err(|e| e.to_string())?;
        let selected = tokio::time::timeout(
            crate::connection::CHANNEL_TIMEOUT,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        match selected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(format!(
                    "confirm.select: {}",
                    crate::connection::describe(&e)
                ));
            }
            Err(_) => return Err("confirm.select: no answer".into()),
        }
        debug!(
            channel = channel.id(),
            connection = live.generation(),
            "publisher channel opened"
        );
        let (sent, rx) = mpsc::unbounded_channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        tokio::spawn(collect(rx, in_flight.clone()));
        Ok(Lane {
            channel,
            live,
            sent,
            tainted: Arc::new(AtomicBool::new(false)),
            in_flight,
        })
    }

    /// True while the lane may carry another publish.
    pub(crate) fn is_usable(&self) -> bool {
        !self.tainted.load(Ordering::Acquire)
            && self.channel.status().connected()
            && self.live.is_connected()
    }

    /// True while the broker holds the lane's connection blocked.
    pub(crate) fn is_blocked(&self) -> bool {
        self.live.is_blocked()
    }

    /// The connection the lane lives on.
    pub(crate) fn live(&self) -> &LiveConnection {
        &self.live
    }

    /// Publishes on the lane. `Ok` once the frames are written, with the
    /// receiver of the publish's settlement; `Err` when the channel refused
    /// the publish before sending it.
    ///
    /// Cancelled between the write and the hand-over to the collector, it
    /// taints the lane (see [`Lane::is_usable`]).
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<oneshot::Receiver<Settled>, lapin::Error> {
        let message_id = properties.message_id().as_ref().map(|id| id.to_string());
        let taint = Taint(Some(self.tainted.clone()));
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
            .await?;
        taint.disarm();
        let (reply, settled) = oneshot::channel();
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let sent = Sent {
            message_id,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            confirm,
            reply,
        };
        if let Err(mpsc::error::SendError(sent)) = self.sent.send(sent) {
            // The collector is gone (it never ends while a sender is alive):
            // answer from the confirm alone, as a failure.
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            let _ = sent.reply.send(Settled::Failed(
                lapin::ErrorKind::InvalidChannelState(
                    lapin::ChannelState::Closed,
                    "the publisher's collector stopped",
                )
                .into(),
            ));
        }
        Ok(settled)
    }

    /// Closes the lane's channel in the background. Publishes still in flight
    /// on it fail with the channel.
    pub(crate) fn close(self) {
        let channel = self.channel;
        if !channel.status().connected() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let close = channel.close(200, "backstop: publisher channel given up".into());
            let _ = tokio::time::timeout(crate::connection::CHANNEL_TIMEOUT, close).await;
        });
    }

    /// Closes the lane's channel and waits for the broker's answer, bounded.
    pub(crate) async fn close_now(self) {
        if self.channel.status().connected() {
            let close = self.channel.close(200, "backstop: publisher closed".into());
            let _ = tokio::time::timeout(crate::connection::CHANNEL_TIMEOUT, close).await;
        }
    }
}

/// Taints a lane when dropped armed: a send cancelled after lapin may have
/// registered its delivery tag.
struct Taint(Option<Arc<AtomicBool>>);

impl Taint {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Taint {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, Ordering::Release);
        }
    }
}

type ConfirmFuture = Pin<Box<dyn Future<Output = (u64, lapin::Result<Confirmation>)> + Send>>;

/// The most returns kept for publishes not registered yet; more means the
/// bookkeeping is wrong, and the lane's publishes fail instead.
const MAX_ORPHANS: usize = 4096;

/// Settles every publish of a lane: see the module's documentation.
///
/// Publishes are settled in delivery-tag order: one whose confirm came is
/// held until every earlier publish of the lane has its confirm too. On
/// RabbitMQ the confirm carrying a return is never later, in tag order,
/// than the return's owner (the broker sends the return, then acks the
/// tags up to the owner), so by the time the owner is settled the carrier
/// has been read, whatever order `FuturesUnordered` yields them in.
async fn collect(mut rx: mpsc::UnboundedReceiver<Sent>, in_flight: Arc<AtomicUsize>) {
    let mut confirms: FuturesUnordered<ConfirmFuture> = FuturesUnordered::new();
    let mut waiting: BTreeMap<u64, Waiting> = BTreeMap::new();
    // Returns whose publish was not registered yet: (id, exchange, key).
    let mut orphans: Vec<(Option<String>, String, String)> = Vec::new();
    let mut next = 0u64;
    let mut senders_gone = false;
    loop {
        let ready = std::future::poll_fn(|cx| {
            let mut registered = Vec::new();
            if !senders_gone {
                loop {
                    match rx.poll_recv(cx) {
                        Poll::Ready(Some(sent)) => registered.push(sent),
                        Poll::Ready(None) => {
                            senders_gone = true;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
            }
            let any_registered = !registered.is_empty();
            for sent in registered {
                let seq = next;
                next += 1;
                let confirm = sent.confirm;
                confirms.push(Box::pin(async move { (seq, confirm.await) }));
                waiting.insert(
                    seq,
                    Waiting {
                        message_id: sent.message_id,
                        exchange: sent.exchange,
                        routing_key: sent.routing_key,
                        returned: false,
                        ambiguous: false,
                        result: None,
                        reply: sent.reply,
                    },
                );
            }
            let mut done = Vec::new();
            while let Poll::Ready(Some(item)) = confirms.poll_next_unpin(cx) {
                done.push(item);
            }
            if !done.is_empty() || (any_registered && !orphans.is_empty()) {
                Poll::Ready(Some(done))
            } else if senders_gone && confirms.is_empty() {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await;
        let Some(done) = ready else {
            return;
        };
        // Orphans first: a publish registered in this round may own one.
        orphans.retain(|(id, exchange, key)| !mark_returned(&mut waiting, id, exchange, key));
        // Every return of the round, before any settlement.
        for (seq, mut result) in done {
            let returned = match &mut result {
                Ok(Confirmation::Ack(message)) | Ok(Confirmation::Nack(message)) => message.take(),
                _ => None,
            };
            if let Some(message) = returned {
                let id = message
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.to_string());
                let exchange = message.delivery.exchange.to_string();
                let key = message.delivery.routing_key.to_string();
                if !mark_returned(&mut waiting, &id, &exchange, &key) {
                    orphans.push((id, exchange, key));
                }
            }
            if let Some(w) = waiting.get_mut(&seq) {
                w.result = Some(result);
            }
        }
        if orphans.len() > MAX_ORPHANS {
            warn!(
                orphans = orphans.len(),
                "returned messages match no publish of the channel: failing its publishes"
            );
            for w in waiting.values_mut() {
                w.returned = true;
                w.ambiguous = true;
            }
            orphans.clear();
        }
        // Settle from the oldest, while the oldest has its confirm.
        while let Some(entry) = waiting.first_entry() {
            if entry.get().result.is_none() {
                break;
            }
            let w = entry.remove();
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let settled = match w.result {
                Some(Ok(_)) if w.returned => Settled::Returned {
                    ambiguous: w.ambiguous,
                },
                Some(Ok(Confirmation::Ack(_))) => Settled::Ack,
                Some(Ok(Confirmation::Nack(_))) => Settled::Nack,
                Some(Ok(Confirmation::NotRequested)) | None => Settled::Failed(
                    lapin::ErrorKind::InvalidChannelState(
                        lapin::ChannelState::Closed,
                        "the channel is not in confirm mode",
                    )
                    .into(),
                ),
                Some(Err(e)) => Settled::Failed(e),
            };
            // The publisher may have stopped waiting (its deadline passed).
            let _ = w.reply.send(settled);
        }
    }
}

/// Marks every waiting publish with this identity as returned; true when
/// one was. A return without a message-id (none of ours) marks them all.
/// When several match, each is marked ambiguous: one of them was returned.
fn mark_returned(
    waiting: &mut BTreeMap<u64, Waiting>,
    id: &Option<String>,
    exchange: &str,
    key: &str,
) -> bool {
    let mut matched = Vec::new();
    for (seq, w) in waiting.iter() {
        let same = match id {
            Some(id) => {
                w.message_id.as_deref() == Some(id.as_str())
                    && w.exchange == exchange
                    && w.routing_key == key
            }
            None => true,
        };
        if same {
            matched.push(*seq);
        }
    }
    let ambiguous = matched.len() > 1;
    for seq in &matched {
        if let Some(w) = waiting.get_mut(seq) {
            w.returned = true;
            w.ambiguous |= ambiguous;
        }
    }
    !matched.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(id: Option<&str>, exchange: &str, key: &str) -> Waiting {
        Waiting {
            message_id: id.map(str::to_owned),
            exchange: exchange.into(),
            routing_key: key.into(),
            returned: false,
            ambiguous: false,
            result: None,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn a_return_marks_only_publishes_with_its_identity() {
        let mut w = BTreeMap::new();
        w.insert(1, waiting(Some("a"), "x", "k"));
        w.insert(2, waiting(Some("b"), "x", "k"));
        w.insert(3, waiting(Some("a"), "x", "other"));
        assert!(mark_returned(&mut w, &Some("a".into()), "x", "k"));
        assert!(w[&1].returned);
        assert!(!w[&2].returned);
        assert!(!w[&3].returned);
        assert!(!mark_returned(&mut w, &Some("c".into()), "x", "k"));
    }

    #[test]
    fn publishes_sharing_an_id_are_all_marked() {
        let mut w = BTreeMap::new();
        w.insert(1, waiting(Some("a"), "x", "k"));
        w.insert(2, waiting(Some("a"), "x", "k"));
        assert!(mark_returned(&mut w, &Some("a".into()), "x", "k"));
        assert!(w.values().all(|w| w.returned && w.ambiguous));
    }

    #[test]
    fn a_return_without_an_id_marks_every_publish() {
        let mut w = BTreeMap::new();
        w.insert(1, waiting(Some("a"), "x", "k"));
        w.insert(2, waiting(None, "y", "j"));
        assert!(mark_returned(&mut w, &None, "x", "k"));
        assert!(w.values().all(|w| w.returned));
    }
}
