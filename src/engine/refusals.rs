//! What Tencent refused, per group (docs/design.md#msgseqs-tencent-refuses): the MsgSeqs it
//! refused on their own, and, when one of them lies far above anything the group is known to
//! hold, every MsgSeq from there up. A request for one of them is refused at once, without a
//! call, and no top-up adds one.
//!
//! A refusal close to the group's known messages may be a caller that asked for a message a
//! moment before it was posted, so it is believed only for `cache.negative_ttl_ms`, like
//! Tencent's other negative answers. One far above them ([`FAR_ABOVE`]) cannot become a
//! message that soon: it is believed for [`FAR_MEMORY`], for itself and everything above.
//!
//! Invariant: memory is bounded: at most [`MAX_SEQS`] MsgSeqs and one "from here up" per
//! group, at most [`MAX_GROUPS`] groups; what expires is forgotten.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::tencent::domain::{GroupId, MsgSeq};

/// How far above the highest MsgSeq a group is known to hold a refused MsgSeq must be for
/// everything from it up to be refused: more messages than the busiest group posts in
/// [`FAR_MEMORY`].
pub const FAR_ABOVE: u64 = 10_000;

/// How long a far refusal is believed.
pub const FAR_MEMORY: Duration = Duration::from_secs(60);

/// Refused MsgSeqs remembered per group (the soonest to expire makes room).
pub const MAX_SEQS: usize = 16;

/// Groups remembered (the soonest to expire makes room).
pub const MAX_GROUPS: usize = 10_000;

/// The longest ErrorInfo kept with a refusal.
const MAX_INFO: usize = 160;

/// Why a request is refused at once: the MsgSeq, and what Tencent said of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub seq: MsgSeq,
    pub info: Arc<str>,
}

/// One refused MsgSeq, or the first of a refused range, and until when it is believed.
#[derive(Debug, Clone)]
struct Entry {
    seq: MsgSeq,
    until: Instant,
    info: Arc<str>,
}

/// One group's refusals.
#[derive(Debug, Default)]
pub struct Refused {
    /// Everything from this MsgSeq up.
    from: Option<Entry>,
    /// Single MsgSeqs.
    seqs: Vec<Entry>,
}

impl Refused {
    /// What refuses `seq` at `now`, if anything.
    fn find(&self, seq: MsgSeq, now: Instant) -> Option<&Entry> {
        let from = self.from.as_ref().filter(|e| e.until > now && seq >= e.seq);
        from.or_else(|| self.seqs.iter().find(|e| e.until > now && e.seq == seq))
    }

    /// Whether `seq` is refused at `now` (no top-up adds it).
    pub fn refuses(&self, seq: MsgSeq, now: Instant) -> bool {
        self.find(seq, now).is_some()
    }

    fn forget_expired(&mut self, now: Instant) {
        self.from = self.from.take().filter(|e| e.until > now);
        self.seqs.retain(|e| e.until > now);
    }

    fn is_empty(&self) -> bool {
        self.from.is_none() && self.seqs.is_empty()
    }

    /// When the last of its entries expires.
    fn until(&self) -> Option<Instant> {
        self.seqs.iter().chain(&self.from).map(|e| e.until).max()
    }
}

/// One (app, API)'s refusals, by group.
#[derive(Debug, Default)]
pub struct Refusals {
    groups: HashMap<GroupId, Refused>,
}

impl Refusals {
    /// The first of `seqs` of `group` that is refused at `now`.
    pub fn check(&mut self, group: &GroupId, seqs: &[MsgSeq], now: Instant) -> Option<Refusal> {
        let refused = self.groups.get(group)?;
        let found = seqs.iter().find_map(|&s| refused.find(s, now).map(|e| Refusal { seq: s, info: e.info.clone() }));
        if found.is_none() && refused.until().is_none_or(|t| t <= now) {
            self.groups.remove(group);
        }
        found
    }

    /// The group's refusals, for a top-up.
    pub fn of(&self, group: &GroupId) -> Option<&Refused> {
        self.groups.get(group)
    }

    /// Tencent refused `seq` of `group` on its own, saying `info`. `known` is the highest
    /// MsgSeq the group is known to hold (it was answered), if any; `near` how long a
    /// refusal close to it is believed (zero: not at all).
    pub fn remember(
        &mut self,
        group: &GroupId,
        seq: MsgSeq,
        info: &str,
        known: Option<MsgSeq>,
        near: Duration,
        now: Instant,
    ) {
        let far = seq.0 > known.map_or(0, |k| k.0).saturating_add(FAR_ABOVE);
        if !far && near.is_zero() {
            return;
        }
        self.make_room(group, now);
        let refused = self.groups.entry(group.clone()).or_default();
        refused.forget_expired(now);
        let info: Arc<str> = truncate(info, MAX_INFO).into();
        if far {
            let lower = refused.from.as_ref().is_none_or(|e| seq <= e.seq);
            if lower {
                refused.from = Some(Entry { seq, until: now + FAR_MEMORY, info });
            }
            return;
        }
        refused.seqs.retain(|e| e.seq != seq);
        if refused.seqs.len() >= MAX_SEQS
            && let Some(soonest) = refused.seqs.iter().enumerate().min_by_key(|(_, e)| e.until).map(|(i, _)| i)
        {
            refused.seqs.swap_remove(soonest);
        }
        refused.seqs.push(Entry { seq, until: now + near, info });
    }

    /// Room for one more group, if `group` is new: what expired goes first, then the
    /// group whose refusals expire soonest.
    fn make_room(&mut self, group: &GroupId, now: Instant) {
        if self.groups.len() < MAX_GROUPS || self.groups.contains_key(group) {
            return;
        }
        self.groups.retain(|_, r| {
            r.forget_expired(now);
            !r.is_empty()
        });
        if self.groups.len() < MAX_GROUPS {
            return;
        }
        let soonest = self.groups.iter().min_by_key(|(_, r)| r.until()).map(|(g, _)| g.clone());
        if let Some(g) = soonest {
            self.groups.remove(&g);
        }
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn g(name: &str) -> GroupId {
        GroupId::parse(name).unwrap()
    }

    #[test]
    fn a_far_refusal_refuses_everything_above_it_for_a_minute() {
        let now = Instant::now();
        let mut r = Refusals::default();
        r.remember(&g("a"), MsgSeq(5_000_000_000), "out of range", Some(MsgSeq(3)), S, now);

        let refused = r.check(&g("a"), &[MsgSeq(1), MsgSeq(5_000_000_007)], now + 59 * S);

        assert_eq!(refused.map(|x| x.seq), Some(MsgSeq(5_000_000_007)));
        assert!(r.check(&g("a"), &[MsgSeq(1), MsgSeq(4_999_999_999)], now).is_none());
        assert!(r.check(&g("b"), &[MsgSeq(5_000_000_000)], now).is_none(), "per group");
        assert!(r.check(&g("a"), &[MsgSeq(5_000_000_000)], now + FAR_MEMORY).is_none());
        assert!(r.is_empty(), "forgotten once expired");
    }

    #[test]
    fn a_refusal_near_the_groups_messages_refuses_only_that_msgseq_for_the_negative_ttl() {
        let now = Instant::now();
        let mut r = Refusals::default();
        r.remember(&g("a"), MsgSeq(20_000), "out of range", Some(MsgSeq(19_999)), S, now);
        r.remember(&g("a"), MsgSeq(9_000), "out of range", None, Duration::ZERO, now);

        assert_eq!(r.check(&g("a"), &[MsgSeq(20_000)], now).map(|x| x.seq), Some(MsgSeq(20_000)));
        assert!(r.check(&g("a"), &[MsgSeq(20_001), MsgSeq(9_000)], now).is_none());
        assert!(r.check(&g("a"), &[MsgSeq(20_000)], now + S).is_none());
    }

    #[test]
    fn memory_is_bounded_per_group_and_in_total() {
        let now = Instant::now();
        let mut r = Refusals::default();
        for i in 0..(MAX_SEQS as u64 + 4) {
            r.remember(&g("a"), MsgSeq(i), "bad", None, S + Duration::from_millis(i), now);
        }
        let per_group = r.of(&g("a")).map(|x| x.seqs.len());
        for i in 0..(MAX_GROUPS as u64 + 4) {
            r.remember(&g(&format!("g{i}")), MsgSeq(1), "bad", None, S, now);
        }

        assert_eq!(per_group, Some(MAX_SEQS));
        assert!(r.check(&g("a"), &[MsgSeq(0)], now).is_none(), "the soonest to expire made room");
        assert!(r.check(&g("a"), &[MsgSeq(MAX_SEQS as u64 + 3)], now).is_some());
        assert_eq!(r.len(), MAX_GROUPS);
        assert!(r.of(&g(&format!("g{}", MAX_GROUPS + 3))).is_some(), "the newest group is kept");
    }

    #[test]
    fn long_infos_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
