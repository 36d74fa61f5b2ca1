//! Staleness: how long after a member's read the gateway's answers showed it, worked out
//! from two lists this process holds — the reads the simulator applied ([`Read`], each
//! with the instant from which upstream answered the new count) and the answers the load
//! generator received ([`Seen`], one per item). Both are stamped with this process's
//! monotonic clock (the simulator runs in-process); the gateway's clock is never used.
//! Pure: no I/O, no clock of its own.
//!
//! For each read, two figures:
//! - **shown after**: from the read to the first answer *received* after it whose
//!   `ReadNum` is at least the read's. What a caller sees; it includes the wait for the
//!   next request about that message, so it is an upper bound of the gateway's delay.
//! - **old until**: from the read to the last request *sent* after it (and before that
//!   first showing answer arrived) that still got a lower count; zero when there was none.
//!   The gateway produced that answer after the request was sent, so this is a lower bound
//!   of the gateway's own delay, free of the wait for the next request.
//!
//! A read that no answer showed is counted apart, and in the percentiles it ranks above
//! every shown one (it is not dropped: dropping would flatter the tail).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A message: (group number, MsgSeq).
pub type Key = (u32, u64);

/// A read the simulator applied: from `at` on, upstream answers `read` (or more).
#[derive(Clone, Copy, Debug)]
pub struct Read {
    pub key: Key,
    pub at: Instant,
    pub read: u64,
}

/// One item of one answer the gateway gave.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub key: Key,
    pub sent: Instant,
    pub received: Instant,
    pub read: u64,
}

/// The figures of a set of reads against a set of answers.
#[derive(Debug, Default)]
pub struct Staleness {
    /// Of every read some answer showed, its "shown after"; sorted.
    shown_after: Vec<Duration>,
    /// Of every read, its "old until"; sorted.
    old_until: Vec<Duration>,
    /// Reads no answer showed.
    pub never_shown: usize,
    /// Answers showing a lower count than an answer for the same message received before
    /// they were sent: the gateway went back to an older count it had already replaced.
    pub went_back: usize,
}

impl Staleness {
    /// Every read against the answers in `seen` (in any order).
    pub fn measure(reads: &[Read], seen: &[Seen]) -> Staleness {
        let mut by_key: HashMap<Key, Vec<Seen>> = HashMap::new();
        for s in seen {
            by_key.entry(s.key).or_default().push(*s);
        }
        for answers in by_key.values_mut() {
            answers.sort_by_key(|s| s.received);
        }
        let mut staleness =
            Staleness { went_back: by_key.values().map(|a| went_back(a)).sum(), ..Staleness::default() };
        for read in reads {
            let answers = by_key.get(&read.key).map_or(&[][..], Vec::as_slice);
            let (shown, old) = first_showing(answers, read);
            staleness.old_until.push(old);
            match shown {
                Some(after) => staleness.shown_after.push(after),
                None => staleness.never_shown += 1,
            }
        }
        staleness.shown_after.sort_unstable();
        staleness.old_until.sort_unstable();
        staleness
    }

    /// Reads measured, shown or not.
    pub fn reads(&self) -> usize {
        self.shown_after.len() + self.never_shown
    }

    /// The `q` quantile of "shown after" over every read; `None` when it falls among the
    /// reads never shown (or there are no reads).
    pub fn shown_after(&self, q: f64) -> Option<Duration> {
        let rank = rank(q, self.reads())?;
        self.shown_after.get(rank - 1).copied()
    }

    /// The `q` quantile of "old until" over every read.
    pub fn old_until(&self, q: f64) -> Option<Duration> {
        let rank = rank(q, self.old_until.len())?;
        self.old_until.get(rank - 1).copied()
    }
}

/// The 1-based rank of the `q` quantile among `n` samples (the smallest sample with at
/// least `q` of all at or below it), or `None` for no samples.
fn rank(q: f64, n: usize) -> Option<usize> {
    (n > 0).then(|| ((q * n as f64).ceil() as usize).clamp(1, n))
}

/// For one read and its message's answers (sorted by receipt): "shown after" (`None`:
/// never) and "old until".
fn first_showing(answers: &[Seen], read: &Read) -> (Option<Duration>, Duration) {
    let from = answers.partition_point(|s| s.received <= read.at);
    let mut old = Duration::ZERO;
    for s in &answers[from..] {
        if s.read >= read.read {
            return (Some(s.received - read.at), old);
        }
        if s.sent >= read.at {
            old = old.max(s.sent - read.at);
        }
    }
    (None, old)
}

/// Answers (sorted by receipt) showing less than an answer received before they were sent.
fn went_back(answers: &[Seen]) -> usize {
    // The highest count among the first i answers, for every i.
    let mut highest = Vec::with_capacity(answers.len() + 1);
    highest.push(0);
    for s in answers {
        let last = highest.last().copied().unwrap_or(0);
        highest.push(last.max(s.read));
    }
    answers
        .iter()
        .filter(|s| {
            let before = answers.partition_point(|earlier| earlier.received < s.sent);
            highest[before] > s.read
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// An answer for `key` sent at `sent` ms and received at `received` ms after `t0`.
    fn seen(t0: Instant, key: Key, sent: u64, received: u64, read: u64) -> Seen {
        Seen { key, sent: at(t0, sent), received: at(t0, received), read }
    }

    #[test]
    fn a_read_is_shown_by_the_first_answer_received_after_it_with_its_count_or_more() {
        let t0 = Instant::now();
        let read = Read { key: (1, 5), at: t0 + 100 * MS, read: 8 };
        let answers = [
            seen(t0, (1, 5), 90, 101, 8),  // sent before the read: a fetch that saw it anyway
            seen(t0, (1, 5), 80, 95, 7),   // received before the read: not a candidate
            seen(t0, (2, 5), 110, 111, 9), // another message
            seen(t0, (1, 6), 110, 111, 9),
        ];
        let s = Staleness::measure(&[read], &answers);
        assert_eq!((s.reads(), s.never_shown), (1, 0));
        assert_eq!(s.shown_after(0.5), Some(MS));
    }

    #[test]
    fn old_answers_to_requests_sent_after_the_read_bound_the_gateways_own_delay() {
        let t0 = Instant::now();
        let read = Read { key: (1, 1), at: t0 + 100 * MS, read: 3 };
        let answers = [
            seen(t0, (1, 1), 99, 105, 2),  // sent before the read: says nothing of the gateway
            seen(t0, (1, 1), 140, 142, 2), // the gateway still had the old count at 140 ms
            seen(t0, (1, 1), 190, 192, 4), // shown (a later read's count covers this one)
            seen(t0, (1, 1), 300, 302, 2), // after it was shown: counted as going back, not here
        ];
        let s = Staleness::measure(&[read], &answers);
        assert_eq!(s.shown_after(0.99), Some(92 * MS));
        assert_eq!(s.old_until(0.99), Some(40 * MS));
        assert_eq!(s.went_back, 1);
    }

    #[test]
    fn reads_never_shown_are_counted_and_rank_above_every_shown_read() {
        let t0 = Instant::now();
        let key = (0, 1);
        let reads: Vec<Read> = (1..=4).map(|n| Read { key, at: at(t0, n * 10), read: n }).collect();
        // Counts 1 and 2 are shown 5 ms after their reads; 3 and 4 never are.
        let answers = [seen(t0, key, 12, 15, 1), seen(t0, key, 21, 25, 2), seen(t0, key, 45, 50, 2)];
        let s = Staleness::measure(&reads, &answers);
        assert_eq!((s.reads(), s.never_shown), (4, 2));
        assert_eq!(s.shown_after(0.5), Some(5 * MS));
        assert_eq!(s.shown_after(0.51), None, "the rank falls among the reads never shown");
        assert_eq!(s.shown_after(0.99), None);
        // Read 3 at 30 ms: the request sent at 45 ms still got 2.
        assert_eq!(s.old_until(1.0), Some(15 * MS));
        assert_eq!(s.went_back, 0);
    }

    #[test]
    fn quantiles_are_exact_ranks_and_empty_sets_have_none() {
        let t0 = Instant::now();
        let reads: Vec<Read> = (0..100).map(|n| Read { key: (n, 1), at: t0, read: 1 }).collect();
        let answers: Vec<Seen> = (0..100).map(|n| seen(t0, (n, 1), 0, u64::from(n) + 1, 1)).collect();
        let s = Staleness::measure(&reads, &answers);
        assert_eq!(s.shown_after(0.5), Some(50 * MS));
        assert_eq!(s.shown_after(0.99), Some(99 * MS));
        assert_eq!(s.shown_after(1.0), Some(100 * MS));
        assert_eq!(s.old_until(0.99), Some(Duration::ZERO));
        let none = Staleness::measure(&[], &answers);
        assert_eq!((none.reads(), none.shown_after(0.5), none.old_until(0.5)), (0, None, None));
    }

    #[test]
    fn an_answer_sent_before_a_higher_count_arrived_is_not_going_back() {
        let t0 = Instant::now();
        let key = (3, 3);
        // Two requests in flight together: the first answered 5 later than the second's 6.
        let answers = [seen(t0, key, 10, 12, 6), seen(t0, key, 11, 13, 5), seen(t0, key, 20, 21, 5)];
        let s = Staleness::measure(&[], &answers);
        assert_eq!(s.went_back, 1, "only the request sent at 20 ms, after 6 was answered");
    }
}
