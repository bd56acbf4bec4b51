//! Delivery accounting for one subscription (one subscriber on one topic).
//!
//! Offsets are contiguous per topic and epoch (DESIGN §2), so a subscriber that started
//! at cursor `e:o` is owed exactly the offsets `o+1 ..= final` of epoch `e`. The tracker
//! checks each received offset against that:
//!
//! - the next offset: delivered;
//! - beyond the next: delivered, and the offsets jumped over are a *gap* (missing);
//! - inside a gap: delivered late, counted as *reordered* (no longer missing);
//! - anything else at or below what was already seen: a *duplicate*.
//!
//! A `reset` (history lost: new epoch or cursor out of retention) closes the current
//! segment and opens another at the cursor the server gives; what the server said it
//! skipped (`skipped` under conflation, or a reset) is *signalled*, not lost. When the
//! run ends, [`TopicTrack::finish`] closes the books against the topic's final cursor:
//! `expected = delivered + lost`, where lost counts the gaps never filled plus the tail
//! between the last offset seen and the final offset.
//!
//! A reset is a signal, not an excuse: what it made the subscriber skip is counted as
//! `reset_dropped` — history the server lost and said so, as opposed to `lost`, which it
//! lost silently. That is the old epoch's tail (the offsets published after the last one
//! received, when the publishers know how far the epoch went: their `201` answers carry
//! epoch and offset) plus the new cursor's lead (a new epoch's offsets up to the cursor
//! the reset gave, or the offsets a retention reset jumped over).
//!
//! The tracker keeps at most [`MAX_MISSING_RANGES`] open gaps; older ones are written off
//! as lost (a reorder that late is not worth remembering), and at most
//! [`MAX_CLOSED_SEGMENTS`] closed segments.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_proto::Cursor;

/// Open gaps remembered per subscription before the oldest are written off as lost.
pub const MAX_MISSING_RANGES: usize = 4096;
/// Closed segments (one per reset) remembered for `reset_dropped`.
pub const MAX_CLOSED_SEGMENTS: usize = 64;

/// What one received offset was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next offset, or one past a gap.
    New,
    /// An offset that had been missing (arrived after a later one).
    Reordered,
    /// Already seen, or before the subscription's start.
    Duplicate,
    /// The subscription has not started (no subscribe reply or state read yet).
    Unstarted,
}

/// Totals of a subscription, or of many added together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Offsets the subscriber was owed (signalled skips excluded).
    pub expected: u64,
    /// Distinct owed offsets received (including reordered ones).
    pub delivered: u64,
    /// Owed offsets never received.
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Resets received (history lost, signalled by the server).
    pub resets: u64,
    /// Offsets the server said it skipped (conflation).
    pub skipped: u64,
    /// Subscriptions that ended on an epoch other than the topic's final one without
    /// having been told of the change.
    pub stale: u64,
    /// Events received before the subscription had started.
    pub unstarted: u64,
    /// Offsets published in an epoch that a reset ended before they were received.
    #[serde(default)]
    pub reset_dropped: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.resets += o.resets;
        self.skipped += o.skipped;
        self.stale += o.stale;
        self.unstarted += o.unstarted;
        self.reset_dropped += o.reset_dropped;
    }
}

/// The accounting of one subscription.
#[derive(Debug, Clone, Default)]
pub struct TopicTrack {
    /// Epoch of the current segment; `None` until started.
    epoch: Option<String>,
    /// Offset the current segment starts after (its cursor at subscribe/reset time).
    start: u64,
    /// The next offset expected in order.
    next: u64,
    /// Open gaps: first offset → last offset (inclusive).
    missing: BTreeMap<u64, u64>,
    missing_count: u64,
    /// Owed offsets of closed segments (before resets).
    closed_span: u64,
    /// Gaps written off (closed segments, or too many open ranges).
    written_off: u64,
    /// Epoch and last in-order offset of each closed segment.
    closed: Vec<(String, u64)>,
    counts: Counts,
}

impl TopicTrack {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_started(&self) -> bool {
        self.epoch.is_some()
    }

    /// The cursor to resume with: everything up to the last in-order offset.
    pub fn cursor(&self) -> Option<Cursor> {
        self.epoch
            .as_ref()
            .map(|e| Cursor::new(e.clone(), self.next - 1))
    }

    /// Offsets currently missing (gaps not yet filled).
    pub fn missing(&self) -> u64 {
        self.missing_count
    }

    /// The counts so far (without the tail that only [`finish`](Self::finish) knows).
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Starts (or restarts) accounting at the cursor `epoch:offset` — a first subscribe
    /// reply or state read. On an already started subscription this is a resume reply:
    /// a cursor of the same epoch ahead of what was seen opens a gap; another epoch is
    /// a reset.
    pub fn start(&mut self, epoch: &str, offset: u64) {
        match &self.epoch {
            None => self.open(epoch, offset),
            Some(e) if e == epoch => self.advance_to(offset),
            Some(_) => self.reset(epoch, offset),
        }
    }

    /// The server said the cursor is gone: count a reset and continue from `epoch:offset`.
    pub fn reset(&mut self, epoch: &str, offset: u64) {
        if let Some(old) = self.epoch.clone() {
            // What the reset makes the subscriber skip besides the old epoch's tail: a
            // new epoch's events up to the cursor (it starts at 0), or, in the same
            // epoch (retention), the offsets between the last seen and the cursor.
            self.counts.reset_dropped += if old == epoch {
                offset.saturating_sub(self.next - 1)
            } else {
                offset
            };
            self.close_segment();
            self.counts.resets += 1;
        }
        self.open(epoch, offset);
    }

    /// A resume reply said the topic is at `offset`: whatever lies between the last
    /// offset seen and `offset` will never be pushed, so it is a gap.
    pub fn advance_to(&mut self, offset: u64) {
        if self.epoch.is_some() && offset >= self.next {
            self.gap(self.next, offset);
            self.next = offset + 1;
        }
    }

    /// One received event of the current epoch.
    pub fn event(&mut self, offset: u64) -> Verdict {
        if self.epoch.is_none() {
            self.counts.unstarted += 1;
            return Verdict::Unstarted;
        }
        if offset == self.next {
            self.next += 1;
            self.counts.delivered += 1;
            Verdict::New
        } else if offset > self.next {
            self.gap(self.next, offset - 1);
            self.next = offset + 1;
            self.counts.delivered += 1;
            Verdict::New
        } else if offset > self.start && self.fill(offset) {
            self.counts.reordered += 1;
            self.counts.delivered += 1;
            Verdict::Reordered
        } else {
            self.counts.duplicates += 1;
            Verdict::Duplicate
        }
    }

    /// One received event whose epoch the transport tells (SSE ids, envelopes). An epoch
    /// change nobody signalled is treated as a reset to the start of the new epoch.
    pub fn event_in_epoch(&mut self, epoch: &str, offset: u64) -> Verdict {
        match &self.epoch {
            Some(e) if e != epoch => self.reset(epoch, 0),
            _ => {}
        }
        self.event(offset)
    }

    /// The server skipped `from ..= to` (conflation); the next event is `to + 1`.
    pub fn skipped(&mut self, from: u64, to: u64) {
        if self.epoch.is_none() || to < self.next || from > to {
            return;
        }
        let from = from.max(self.next);
        if from > self.next {
            self.gap(self.next, from - 1);
        }
        self.counts.skipped += to - from + 1;
        self.next = to + 1;
    }

    /// Whether everything up to `last` (the topic's final cursor) has arrived.
    pub fn caught_up(&self, last: &Cursor) -> bool {
        self.epoch.as_deref() == Some(last.epoch.as_str())
            && self.next > last.offset
            && self.missing_count == 0
    }

    /// Closes the books against the topic's final cursor (`None` when it could not be
    /// read: then the last offset seen is taken as the end). `epoch_end` tells the last
    /// offset published in an epoch, when known, for the segments resets closed.
    pub fn finish(&self, last: Option<&Cursor>, epoch_end: impl Fn(&str) -> Option<u64>) -> Counts {
        let mut c = self.counts;
        for (epoch, seen) in &self.closed {
            if let Some(end) = epoch_end(epoch) {
                c.reset_dropped += end.saturating_sub(*seen);
            }
        }
        let Some(epoch) = &self.epoch else {
            return c;
        };
        let seen = self.next - 1;
        let end = match last {
            Some(l) if &l.epoch == epoch => l.offset.max(seen),
            Some(_) => {
                c.stale += 1;
                seen
            }
            None => seen,
        };
        let span = self.closed_span + (end - self.start);
        c.lost = self.written_off + self.missing_count + (end - seen);
        c.expected = span - c.skipped;
        c
    }

    fn open(&mut self, epoch: &str, offset: u64) {
        self.epoch = Some(epoch.to_owned());
        self.start = offset;
        self.next = offset + 1;
        self.missing.clear();
        self.missing_count = 0;
    }

    fn close_segment(&mut self) {
        self.closed_span += (self.next - 1) - self.start;
        if let Some(epoch) = &self.epoch {
            if self.closed.len() < MAX_CLOSED_SEGMENTS {
                self.closed.push((epoch.clone(), self.next - 1));
            }
        }
        self.written_off += self.missing_count;
        self.missing.clear();
        self.missing_count = 0;
    }

    fn gap(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        self.missing.insert(first, last);
        self.missing_count += last - first + 1;
        while self.missing.len() > MAX_MISSING_RANGES {
            if let Some((f, l)) = self.missing.pop_first() {
                self.missing_count -= l - f + 1;
                self.written_off += l - f + 1;
            }
        }
    }

    /// Removes `offset` from the open gaps; false when it was not missing.
    fn fill(&mut self, offset: u64) -> bool {
        let Some((&first, &last)) = self.missing.range(..=offset).next_back() else {
            return false;
        };
        if offset > last {
            return false;
        }
        self.missing.remove(&first);
        if first < offset {
            self.missing.insert(first, offset - 1);
        }
        if offset < last {
            self.missing.insert(offset + 1, last);
        }
        self.missing_count -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(epoch: &str, offset: u64) -> TopicTrack {
        let mut t = TopicTrack::new();
        t.start(epoch, offset);
        t
    }

    fn fin(t: &TopicTrack, epoch: &str, offset: u64) -> Counts {
        t.finish(Some(&Cursor::new(epoch, offset)), |_| None)
    }

    #[test]
    fn in_order_stream_is_clean() {
        let mut t = started("e", 10);
        for o in 11..=20 {
            assert_eq!(t.event(o), Verdict::New);
        }
        let c = fin(&t, "e", 20);
        assert_eq!((c.expected, c.delivered, c.lost), (10, 10, 0));
        assert_eq!((c.duplicates, c.reordered, c.resets), (0, 0, 0));
        assert!(t.caught_up(&Cursor::new("e", 20)));
        assert_eq!(t.cursor(), Some(Cursor::new("e", 20)));
    }

    #[test]
    fn detects_an_injected_gap() {
        let mut t = started("e", 0);
        for o in [1, 2, 3, 6, 7] {
            assert_eq!(t.event(o), Verdict::New);
        }
        assert_eq!(t.missing(), 2);
        assert!(!t.caught_up(&Cursor::new("e", 7)));
        let c = fin(&t, "e", 7);
        assert_eq!((c.expected, c.delivered, c.lost), (7, 5, 2));
    }

    #[test]
    fn detects_a_duplicate() {
        let mut t = started("e", 0);
        for o in [1, 2, 3] {
            t.event(o);
        }
        assert_eq!(t.event(2), Verdict::Duplicate);
        assert_eq!(t.event(0), Verdict::Duplicate, "before the start");
        let c = fin(&t, "e", 3);
        assert_eq!(
            (c.expected, c.delivered, c.lost, c.duplicates),
            (3, 3, 0, 2)
        );
    }

    #[test]
    fn detects_reordering_and_does_not_call_it_loss() {
        let mut t = started("e", 0);
        for o in [1, 2, 5, 3, 4, 6] {
            t.event(o);
        }
        let c = fin(&t, "e", 6);
        assert_eq!((c.expected, c.delivered, c.lost, c.reordered), (6, 6, 0, 2));
        assert_eq!(
            t.event(4),
            Verdict::Duplicate,
            "a filled gap is not refilled"
        );
        assert!(t.caught_up(&Cursor::new("e", 6)));
    }

    #[test]
    fn gap_split_in_the_middle() {
        let mut t = started("e", 0);
        t.event(1);
        t.event(10); // gap 2..=9
        assert_eq!(t.event(5), Verdict::Reordered);
        assert_eq!(t.missing(), 7);
        assert_eq!(t.event(2), Verdict::Reordered);
        assert_eq!(t.event(9), Verdict::Reordered);
        assert_eq!(t.event(5), Verdict::Duplicate);
        assert_eq!(t.missing(), 5);
        assert_eq!(fin(&t, "e", 10).lost, 5);
    }

    #[test]
    fn tail_loss_counts_against_the_final_cursor() {
        let mut t = started("e", 4);
        t.event(5);
        t.event(6);
        let c = fin(&t, "e", 9);
        assert_eq!((c.expected, c.delivered, c.lost), (5, 2, 3));
    }

    #[test]
    fn reset_is_signalled_not_lost() {
        let mut t = started("e1", 0);
        t.event(1);
        t.event(2);
        t.reset("e2", 0);
        t.event(1);
        let c = fin(&t, "e2", 1);
        assert_eq!((c.expected, c.delivered, c.lost, c.resets), (3, 3, 0, 1));
        // A resume reply of another epoch is a reset too.
        t.start("e3", 5);
        assert_eq!(t.counts().resets, 2);
        assert_eq!(t.cursor(), Some(Cursor::new("e3", 5)));
    }

    #[test]
    fn events_an_epoch_took_with_it_are_reset_dropped() {
        let mut t = started("e1", 0);
        t.event(1);
        t.event(2);
        t.reset("e2", 0);
        t.event(1);
        // The publishers saw e1 reach offset 5: 3, 4 and 5 went down with the epoch.
        let c = t.finish(Some(&Cursor::new("e2", 1)), |e| (e == "e1").then_some(5));
        assert_eq!((c.lost, c.reset_dropped, c.resets), (0, 3, 1));
        let c = t.finish(Some(&Cursor::new("e2", 1)), |_| None);
        assert_eq!(c.reset_dropped, 0, "unknown epoch end: nothing claimed");
        // A reset into an epoch that already has 4 events skips them.
        t.reset("e3", 4);
        t.event(5);
        let c = t.finish(Some(&Cursor::new("e3", 5)), |_| None);
        assert_eq!((c.resets, c.reset_dropped, c.lost), (2, 4, 0));
        // A retention reset in the same epoch skips from the last seen to the cursor.
        t.reset("e3", 9);
        let c = t.finish(Some(&Cursor::new("e3", 9)), |_| None);
        assert_eq!((c.resets, c.reset_dropped), (3, 4 + 4));
    }

    #[test]
    fn gaps_before_a_reset_stay_lost() {
        let mut t = started("e1", 0);
        t.event(1);
        t.event(4);
        t.reset("e2", 0);
        let c = fin(&t, "e2", 0);
        assert_eq!((c.expected, c.delivered, c.lost), (4, 2, 2));
    }

    #[test]
    fn resume_reply_ahead_opens_a_gap() {
        let mut t = started("e", 0);
        t.event(1);
        t.start("e", 4); // resumed, but the server says it is at 4 and pushes from 5
        t.event(5);
        let c = fin(&t, "e", 5);
        assert_eq!((c.expected, c.delivered, c.lost), (5, 2, 3));
        assert_eq!(c.resets, 0);
    }

    #[test]
    fn unsignalled_epoch_change_counts_as_reset() {
        let mut t = started("e1", 0);
        assert_eq!(t.event_in_epoch("e1", 1), Verdict::New);
        assert_eq!(t.event_in_epoch("e2", 1), Verdict::New);
        let c = fin(&t, "e2", 1);
        assert_eq!((c.resets, c.delivered, c.lost), (1, 2, 0));
    }

    #[test]
    fn skipped_is_neither_delivered_nor_lost() {
        let mut t = started("e", 0);
        t.event(1);
        t.skipped(2, 5);
        t.event(6);
        let c = fin(&t, "e", 6);
        assert_eq!((c.expected, c.delivered, c.lost, c.skipped), (2, 2, 0, 4));
    }

    #[test]
    fn stale_epoch_at_the_end() {
        let mut t = started("e1", 0);
        t.event(1);
        let c = fin(&t, "e2", 7);
        assert_eq!((c.stale, c.expected, c.lost), (1, 1, 0));
        assert!(!t.caught_up(&Cursor::new("e2", 7)));
    }

    #[test]
    fn events_before_start_are_flagged() {
        let mut t = TopicTrack::new();
        assert_eq!(t.event(3), Verdict::Unstarted);
        assert_eq!(t.finish(None, |_| None).unstarted, 1);
        assert_eq!(t.cursor(), None);
    }

    #[test]
    fn open_gaps_are_bounded() {
        let mut t = started("e", 0);
        let mut o = 1;
        for _ in 0..(MAX_MISSING_RANGES + 10) {
            t.event(o);
            o += 2; // leaves a one-offset gap every time
        }
        assert!(t.missing.len() <= MAX_MISSING_RANGES);
        let c = fin(&t, "e", o - 2);
        assert_eq!(c.delivered + c.lost, c.expected);
        assert_eq!(c.lost, (MAX_MISSING_RANGES + 9) as u64);
    }
}
