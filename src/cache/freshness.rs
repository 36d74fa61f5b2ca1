//! What a caller accepts from the cache (its `Cache-Control`), and what an answer says
//! of where its items came from (`X-Cache`): the same for every API the gateway caches.

use std::time::Duration;

/// What the caller's `Cache-Control` allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Fresh cache entries; stale ones when nothing fresh can arrive in time.
    Default,
    /// Only answers from upstream calls that started after the request arrived.
    NoCache,
    /// Entries up to this old.
    MaxAge(Duration),
}

impl Freshness {
    /// Whether an answer `age` old, `fresh` or not by its lifetimes, is acceptable.
    pub fn accepts(self, age: Duration, fresh: bool) -> bool {
        match self {
            Freshness::Default => fresh,
            Freshness::NoCache => false,
            Freshness::MaxAge(max) => age <= max,
        }
    }
}

/// `X-Cache` (docs/design.md#receipt-api).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XCache {
    Hit,
    Miss,
    Partial,
    Stale,
}

impl XCache {
    /// Every value, for tables by value.
    pub const ALL: [XCache; 4] = [XCache::Hit, XCache::Miss, XCache::Partial, XCache::Stale];

    pub fn as_str(self) -> &'static str {
        match self {
            XCache::Hit => "HIT",
            XCache::Miss => "MISS",
            XCache::Partial => "PARTIAL",
            XCache::Stale => "STALE",
        }
    }
}
