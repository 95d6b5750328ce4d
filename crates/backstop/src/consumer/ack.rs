//! The ack coalescer: turns many per-delivery completions into few
//! `basic.ack(multiple=true)` frames.
//!
//! Delivery tags on a channel start at 1 and rise by one per delivery. The
//! coalescer keeps a window of slots above `base`, the highest tag below which
//! every delivery is settled. When completions close the gap at the front, the
//! window slides and one multiple-ack covers the whole contiguous run.
//!
//! Failures (reject, nack) are settled one tag at a time by the consumer
//! *before* they are recorded here, so a later multiple-ack never covers them:
//! once rejected, a tag is no longer outstanding on the channel.
//!
//! A slow handler at the front would hold back every ack behind it and so
//! starve the prefetch window. When the front has been blocked for longer than
//! `gap_timeout`, the completed tags behind it are acked one by one instead.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Open,
    Acked,
    Settled,
}

/// What the consumer should send now.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Flush {
    /// Send `basic.ack(tag, multiple=true)`.
    pub(crate) multiple_up_to: Option<u64>,
    /// Send `basic.ack(tag, multiple=false)` for each.
    pub(crate) singles: Vec<u64>,
}

impl Flush {
    pub(crate) fn is_empty(&self) -> bool {
        self.multiple_up_to.is_none() && self.singles.is_empty()
    }

    pub(crate) fn tags(&self) -> usize {
        self.singles.len() + usize::from(self.multiple_up_to.is_some())
    }
}

#[derive(Debug)]
pub(crate) struct AckCoalescer {
    /// Every tag `<= base` is settled (acked in the window or failed).
    base: u64,
    /// Slots for tags `base + 1 ..`.
    window: VecDeque<Slot>,
    /// Acked slots at or below `base` not yet sent.
    ready: usize,
    /// The highest of those. The multiple-ack names this tag rather than
    /// `base`, because the broker requires the named tag to be outstanding and
    /// `base` may be a tag already rejected or acked singly.
    ready_top: u64,
    /// Acked slots above `base` (behind the gap).
    behind_gap: usize,
    /// When the front slot started blocking acks behind it.
    gap_since: Option<Instant>,
    /// When the oldest unsent contiguous ack was recorded.
    ready_since: Option<Instant>,
    batch: usize,
    flush_after: Duration,
    gap_timeout: Duration,
}

impl AckCoalescer {
    pub(crate) fn new(batch: usize, flush_after: Duration, gap_timeout: Duration) -> Self {
        AckCoalescer {
            base: 0,
            window: VecDeque::new(),
            ready: 0,
            ready_top: 0,
            behind_gap: 0,
            gap_since: None,
            ready_since: None,
            batch: batch.max(1),
            flush_after,
            gap_timeout,
        }
    }

    /// Records the outcome of `tag`: `acked` for success, otherwise the tag
    /// was already settled on the wire (rejected or nacked).
    ///
    /// Returns false when the tag was already recorded or is below the window;
    /// the caller must never settle such a tag twice.
    pub(crate) fn complete(&mut self, tag: u64, acked: bool, now: Instant) -> bool {
        if tag <= self.base {
            return false;
        }
        let index = (tag - self.base - 1) as usize;
        if self.window.len() <= index {
            self.window.resize(index + 1, Slot::Open);
        }
        if self.window[index] != Slot::Open {
            return false;
        }
        self.window[index] = if acked { Slot::Acked } else { Slot::Settled };
        if acked {
            self.behind_gap += 1;
        }
        self.slide(now);
        true
    }

    fn slide(&mut self, now: Instant) {
        let mut moved = false;
        while let Some(front) = self.window.front().copied() {
            if front == Slot::Open {
                break;
            }
            self.window.pop_front();
            self.base += 1;
            moved = true;
            if front == Slot::Acked {
                self.behind_gap -= 1;
                self.ready += 1;
                self.ready_top = self.base;
                self.ready_since.get_or_insert(now);
            }
        }
        if moved || self.behind_gap == 0 {
            self.gap_since = (self.behind_gap > 0).then_some(now);
        } else {
            self.gap_since.get_or_insert(now);
        }
    }

    /// True when a batch is full and should be sent without waiting.
    pub(crate) fn batch_full(&self) -> bool {
        self.ready >= self.batch
    }

    /// The instant by which the consumer should call [`flush`](Self::flush), if any.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let ready = self.ready_since.map(|t| t + self.flush_after);
        let gap = self.gap_since.map(|t| t + self.gap_timeout);
        match (ready, gap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What to send now; the caller sends it and the coalescer assumes it was sent.
    pub(crate) fn flush(&mut self, now: Instant) -> Flush {
        let mut flush = Flush::default();
        if self.ready > 0 {
            flush.multiple_up_to = Some(self.ready_top);
            self.ready = 0;
            self.ready_since = None;
        }
        if let Some(since) = self.gap_since
            && now >= since + self.gap_timeout
        {
            for (offset, slot) in self.window.iter_mut().enumerate() {
                if *slot == Slot::Acked {
                    *slot = Slot::Settled;
                    flush.singles.push(self.base + 1 + offset as u64);
                }
            }
            self.behind_gap = 0;
            self.gap_since = None;
        }
        flush
    }

    /// Tags recorded as acked but not yet sent (contiguous and behind a gap).
    pub(crate) fn unsent(&self) -> usize {
        self.ready + self.behind_gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coalescer(batch: usize) -> AckCoalescer {
        AckCoalescer::new(batch, Duration::from_millis(5), Duration::from_millis(200))
    }

    #[test]
    fn contiguous_acks_become_one_multiple_ack() {
        let now = Instant::now();
        let mut c = coalescer(100);
        for tag in [3, 1, 2, 5, 4] {
            assert!(c.complete(tag, true, now));
        }
        assert_eq!(
            c.flush(now),
            Flush {
                multiple_up_to: Some(5),
                singles: vec![]
            }
        );
        assert!(c.flush(now).is_empty());
    }

    #[test]
    fn a_gap_holds_back_the_acks_behind_it() {
        let now = Instant::now();
        let mut c = coalescer(100);
        c.complete(1, true, now);
        c.complete(3, true, now);
        assert_eq!(c.flush(now).multiple_up_to, Some(1));
        c.complete(2, true, now);
        assert_eq!(c.flush(now).multiple_up_to, Some(3));
    }

    #[test]
    fn the_multiple_ack_names_the_highest_acked_tag_not_a_rejected_one() {
        let now = Instant::now();
        let mut c = coalescer(100);
        c.complete(1, true, now);
        c.complete(2, false, now);
        assert_eq!(c.flush(now).multiple_up_to, Some(1));
    }

    #[test]
    fn failed_tags_are_never_covered_twice_but_do_not_block() {
        let now = Instant::now();
        let mut c = coalescer(100);
        c.complete(1, false, now);
        // Nothing acked yet: no ack frame at all.
        assert!(c.flush(now).is_empty());
        c.complete(2, true, now);
        assert_eq!(c.flush(now).multiple_up_to, Some(2));
    }

    #[test]
    fn a_tag_is_recorded_once() {
        let now = Instant::now();
        let mut c = coalescer(100);
        assert!(c.complete(2, true, now));
        assert!(!c.complete(2, true, now));
        assert!(c.complete(1, true, now));
        assert!(!c.complete(1, false, now));
        assert_eq!(c.flush(now).multiple_up_to, Some(2));
        assert!(!c.complete(2, true, now));
    }

    #[test]
    fn a_full_batch_asks_for_an_immediate_flush() {
        let now = Instant::now();
        let mut c = coalescer(3);
        c.complete(1, true, now);
        c.complete(2, true, now);
        assert!(!c.batch_full());
        c.complete(3, true, now);
        assert!(c.batch_full());
    }

    #[test]
    fn the_deadline_follows_the_oldest_unsent_ack() {
        let now = Instant::now();
        let mut c = coalescer(100);
        assert_eq!(c.deadline(), None);
        c.complete(1, true, now);
        assert_eq!(c.deadline(), Some(now + Duration::from_millis(5)));
        c.flush(now);
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn a_long_gap_acks_the_tags_behind_it_singly() {
        let start = Instant::now();
        let mut c = coalescer(100);
        c.complete(2, true, start);
        c.complete(3, true, start);
        assert_eq!(c.deadline(), Some(start + Duration::from_millis(200)));
        assert!(c.flush(start).is_empty());
        let later = start + Duration::from_millis(250);
        assert_eq!(
            c.flush(later),
            Flush {
                multiple_up_to: None,
                singles: vec![2, 3]
            }
        );
        assert_eq!(c.unsent(), 0);
        // When the slow one finishes, the ack names tag 1: 2 and 3 are no
        // longer outstanding, and the broker refuses a tag it does not hold.
        c.complete(1, true, later);
        assert_eq!(c.flush(later).multiple_up_to, Some(1));
    }
}
