//! The ack coalescer: turns many per-delivery completions into few
//! `basic.ack(multiple=true)` frames.
//!
//! Delivery tags on a channel start at 1 and rise by one per delivery. The
//! coalescer keeps `base`, the highest tag below which every delivery is
//! settled. When completions close the gap at the front, `base` moves up and
//! one multiple-ack covers the whole contiguous run.
//!
//! Failures (reject, nack) are settled one tag at a time by the consumer
//! *before* they are recorded here, so a later multiple-ack never covers them:
//! once rejected, a tag is no longer outstanding on the channel.
//!
//! A slow handler at the front would hold back every ack behind it and so
//! starve the prefetch window. When the front has been blocked for longer than
//! `gap_timeout`, the completed tags behind it are acked one by one instead.
//!
//! What lies above `base` is kept compactly, so that one stuck tag cannot
//! make it grow with every delivery behind it: tags settled on the wire
//! (rejected, nacked, acked singly) as merged runs, and only the acked tags
//! not yet sent one by one. The acked-unsent tags are unacked on the wire, so
//! the prefetch bounds them; every run but the last ends at a tag that is
//! still open, and open tags are unacked too, so the prefetch bounds the runs
//! as well. A flush costs O(runs + tags sent), never O(tags since the gap).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

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
    /// Every tag `<= base` is settled (acked here or failed).
    base: u64,
    /// Tags above `base + 1` whose handler succeeded and whose ack is not
    /// sent yet: they wait behind the gap.
    behind: BTreeSet<u64>,
    /// Tags above `base + 1` already settled on the wire, as inclusive runs
    /// `start -> end`; adjacent runs are merged.
    settled: BTreeMap<u64, u64>,
    /// Acked tags at or below `base` not yet sent.
    ready: usize,
    /// The highest of those. The multiple-ack names this tag rather than
    /// `base`, because the broker requires the named tag to be outstanding and
    /// `base` may be a tag already rejected or acked singly.
    ready_top: u64,
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
            behind: BTreeSet::new(),
            settled: BTreeMap::new(),
            ready: 0,
            ready_top: 0,
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
        if tag == self.base + 1 {
            // The common case, completions in order: no set is touched.
            self.advance(tag, acked, now);
            self.slide(now);
            self.track_gap(true, now);
            return true;
        }
        if self.behind.contains(&tag) || self.is_settled(tag) {
            return false;
        }
        if acked {
            self.behind.insert(tag);
        } else {
            self.insert_settled(tag);
        }
        self.track_gap(false, now);
        true
    }

    /// `base` moves to `tag`, which was `base + 1`.
    fn advance(&mut self, tag: u64, acked: bool, now: Instant) {
        self.base = tag;
        if acked {
            self.ready += 1;
            self.ready_top = tag;
            self.ready_since.get_or_insert(now);
        }
    }

    /// Moves `base` over what was recorded right above it.
    fn slide(&mut self, now: Instant) {
        loop {
            let next = self.base + 1;
            if self.behind.first() == Some(&next) {
                self.behind.pop_first();
                self.advance(next, true, now);
            } else if let Some(end) = self.settled.remove(&next) {
                self.base = end;
            } else {
                break;
            }
        }
    }

    fn track_gap(&mut self, moved: bool, now: Instant) {
        if moved || self.behind.is_empty() {
            self.gap_since = (!self.behind.is_empty()).then_some(now);
        } else {
            self.gap_since.get_or_insert(now);
        }
    }

    fn is_settled(&self, tag: u64) -> bool {
        self.settled
            .range(..=tag)
            .next_back()
            .is_some_and(|(_, end)| *end >= tag)
    }

    /// Adds `tag` (not recorded yet, above `base + 1`) to the settled runs.
    fn insert_settled(&mut self, tag: u64) {
        let start = match self.settled.range(..tag).next_back() {
            Some((start, end)) if *end + 1 == tag => *start,
            _ => tag,
        };
        let end = self.settled.remove(&(tag + 1)).unwrap_or(tag);
        self.settled.insert(start, end);
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
            let behind = std::mem::take(&mut self.behind);
            flush.singles.reserve(behind.len());
            for tag in behind {
                self.insert_settled(tag);
                flush.singles.push(tag);
            }
            self.gap_since = None;
        }
        flush
    }

    /// Tags recorded as acked but not yet sent (contiguous and behind a gap).
    pub(crate) fn unsent(&self) -> usize {
        self.ready + self.behind.len()
    }

    /// How many entries the coalescer holds above `base`: the measure of
    /// its memory, bounded by the prefetch.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.behind.len() + self.settled.len()
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

    #[test]
    fn one_stuck_tag_keeps_the_coalescer_small_over_a_million_deliveries() {
        let start = Instant::now();
        let mut c = coalescer(100);
        let mut now = start;
        let mut sent = 0usize;
        // Tag 1 never completes; a million tags behind it do, in bursts
        // of 100 with a gap flush after each, as the prefetch allows.
        for burst in 0..10_000u64 {
            for i in 0..100 {
                let tag = 2 + burst * 100 + i;
                // Some fail: settled on the wire, recorded as not acked.
                assert!(c.complete(tag, tag % 7 != 0, now));
            }
            now += Duration::from_millis(300);
            let flush = c.flush(now);
            assert_eq!(flush.multiple_up_to, None, "tag 1 is still open");
            sent += flush.singles.len();
            // Everything behind the stuck tag is one run: O(1) entries,
            // where a slot per tag held a million.
            assert_eq!(c.held(), 1, "after burst {burst}");
        }
        assert_eq!(sent, 1_000_000 - 1_000_000 / 7);
        assert_eq!(c.unsent(), 0);
        // A tag already settled is never settled again.
        assert!(!c.complete(500_000, true, now));
        // The stuck one finishes: the base jumps over the whole run and
        // the multiple-ack names only tag 1, the one still outstanding.
        assert!(c.complete(1, true, now));
        assert_eq!(c.flush(now).multiple_up_to, Some(1));
        assert_eq!(c.held(), 0);
        assert!(c.complete(1_000_002, true, now));
        assert_eq!(c.flush(now).multiple_up_to, Some(1_000_002));
    }

    #[test]
    fn runs_are_bounded_by_the_open_tags_between_them() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let mut c = coalescer(100);
        // Open tags 1, 10, 20, 30; everything else completes out of order.
        let open = [1u64, 10, 20, 30];
        for tag in (2..=40).rev().filter(|t| !open.contains(t)) {
            assert!(c.complete(tag, tag % 2 == 0, now));
        }
        let flush = c.flush(later);
        assert_eq!(
            flush.singles.len(),
            (2..=40).filter(|t| !open.contains(t) && t % 2 == 0).count()
        );
        assert_eq!(c.held(), open.len());
        // Acks behind the gap wait as single tags; once the front closes,
        // the base slides over them and the runs in one go.
        for tag in [20, 10] {
            assert!(c.complete(tag, true, later));
        }
        assert_eq!(c.held(), open.len() + 2);
        assert!(c.complete(1, true, later));
        assert_eq!(c.held(), 1);
        assert_eq!(c.flush(later).multiple_up_to, Some(20));
        assert!(c.complete(30, false, later));
        assert_eq!(c.held(), 0);
        assert!(c.complete(41, true, later));
        assert_eq!(c.flush(later).multiple_up_to, Some(41));
    }
}
