//! What the consumer holds unacked on its channel, for the metrics: how many
//! deliveries (received and not yet settled on the wire) and since when the
//! oldest of them waits for its outcome.
//!
//! Both are gauges in [`ConsumerStats`], maintained by the runtime task
//! alone. When a session ends its channel closes and the broker takes back
//! everything it held, so both drop to zero; completions of that session
//! arriving later change nothing.

use super::ConsumerStats;
use crate::retry::now_ms;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

/// The deliveries of the current session whose outcome is not decided yet,
/// with the time each was received.
#[derive(Debug, Default)]
pub(crate) struct HeldDeliveries {
    /// `(tag, received at in ms since the epoch)` of the undecided ones, in
    /// tag order. Only undecided deliveries are kept, so one that never
    /// finishes does not make this grow with every delivery behind it: the
    /// prefetch bounds it. Most decisions come in order and pop the front.
    window: VecDeque<(u64, u64)>,
}

impl HeldDeliveries {
    /// A delivery was received: one more held.
    pub(crate) fn received(&mut self, tag: u64, stats: &ConsumerStats) {
        stats.unacked.fetch_add(1, Ordering::Relaxed);
        let at = now_ms();
        if self.window.is_empty() {
            stats.oldest_unacked_ms.store(at, Ordering::Relaxed);
        }
        self.window.push_back((tag, at));
    }

    /// The outcome of `tag` is decided; its ack, reject or nack follows at
    /// once (an ack within the coalescer's flush interval).
    pub(crate) fn decided(&mut self, tag: u64, stats: &ConsumerStats) {
        if self.window.front().is_some_and(|(t, _)| *t == tag) {
            self.window.pop_front();
            let oldest = self.window.front().map_or(0, |(_, at)| *at);
            stats.oldest_unacked_ms.store(oldest, Ordering::Relaxed);
        } else if let Ok(index) = self.window.binary_search_by_key(&tag, |(t, _)| *t) {
            self.window.remove(index);
        }
    }

    /// `n` deliveries were settled on the wire (acked, rejected, nacked).
    pub(crate) fn settled(stats: &ConsumerStats, n: u64) {
        let _ = stats
            .unacked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(n))
            });
    }

    /// The session's channel is closed: the broker holds all of it again.
    pub(crate) fn released(&mut self, stats: &ConsumerStats) {
        self.window.clear();
        stats.unacked.store(0, Ordering::Relaxed);
        stats.oldest_unacked_ms.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(stats: &ConsumerStats) -> (u64, bool) {
        let report = stats.snapshot();
        (report.unacked, report.oldest_unacked.is_some())
    }

    #[test]
    fn counts_until_settled_and_tracks_the_oldest_undecided() {
        let stats = ConsumerStats::default();
        let mut held = HeldDeliveries::default();
        assert_eq!(gauges(&stats), (0, false));
        for tag in 1..=3 {
            held.received(tag, &stats);
        }
        let first = stats.oldest_unacked_ms.load(Ordering::Relaxed);
        assert_ne!(first, 0);
        // Deciding a later one keeps the oldest where it is.
        held.decided(2, &stats);
        assert_eq!(stats.oldest_unacked_ms.load(Ordering::Relaxed), first);
        assert_eq!(held.window.len(), 2);
        // Deciding the front drops it; the oldest is now the next undecided.
        held.decided(1, &stats);
        assert_eq!(held.window.len(), 1);
        assert_eq!(held.window.front().map(|w| w.0), Some(3));
        HeldDeliveries::settled(&stats, 2);
        assert_eq!(gauges(&stats), (1, true));
        held.decided(3, &stats);
        HeldDeliveries::settled(&stats, 1);
        assert_eq!(gauges(&stats), (0, false));
        // A late or unknown tag changes nothing, and never underflows.
        held.decided(7, &stats);
        HeldDeliveries::settled(&stats, 5);
        assert_eq!(gauges(&stats), (0, false));
    }

    #[test]
    fn a_closed_session_holds_nothing() {
        let stats = ConsumerStats::default();
        let mut held = HeldDeliveries::default();
        held.received(1, &stats);
        held.received(2, &stats);
        held.released(&stats);
        assert_eq!(gauges(&stats), (0, false));
        assert!(held.window.is_empty());
    }

    #[test]
    fn one_undecided_delivery_does_not_grow_it() {
        let stats = ConsumerStats::default();
        let mut held = HeldDeliveries::default();
        held.received(1, &stats);
        let first = stats.oldest_unacked_ms.load(Ordering::Relaxed);
        for tag in 2..=100_000 {
            held.received(tag, &stats);
            held.decided(tag, &stats);
        }
        assert_eq!(held.window.len(), 1);
        assert_eq!(stats.oldest_unacked_ms.load(Ordering::Relaxed), first);
    }
}
