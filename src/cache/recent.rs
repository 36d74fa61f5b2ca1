//! The pages each worker thread found lately, so that a request answered wholly from the
//! cache need not ask moka.
//!
//! A moka lookup was the largest single cost left in a cached answer: about 1,150
//! instructions, 50 data-cache and 100 instruction-cache misses of the 23,700
//! instructions, 375 and 1,350 misses the whole answer took (callgrind with its cache
//! simulation, `benches/callgrind.sh`): hashing with SipHash, the concurrent table, the
//! entry's expiry check, and the read recorded in moka's channel for its eviction policy
//! (once 64 are queued, the reader's thread runs moka's maintenance).
//!
//! Each thread keeps a small direct-mapped table of the pages it found in moka. Such a
//! page is served again only while both hold:
//!
//! - **No page was written since it was found.** Every write to the cache (a fill, a
//!   callback's read, another replica's items) bumps the cache's generation after it is
//!   in moka, and a page remembered at an older generation is asked of moka again. So
//!   a group's page that moka dropped and made anew is never served in place of the new
//!   one: making it anew is a write.
//! - **It is not due for a recheck.** Every [`RECHECK`]th hit on a remembered page goes to
//!   moka after all, so moka's eviction policy still sees the page read (its frequency
//!   sketch and its LRU order), and a page moka evicted for room (which no write
//!   replaced) is served at most `RECHECK - 1` more times per thread, from items that are
//!   still within their lifetimes: every item's freshness is checked on every read, as
//!   for a page from moka.
//!
//! Only the all-hit answer uses it (see `receipts::answer`); any request with a miss
//! looks its page up in moka, as the miss path always did. The table holds at most
//! [`SLOTS`] pages per worker thread.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Page;
use crate::tencent::domain::{AppId, GroupId};

/// Pages remembered per thread: a handful of hot groups take most hits.
const SLOTS: usize = 64;

/// One hit in this many on a remembered page asks moka.
pub const RECHECK: u32 = 16;

/// Which cache a remembered page is of (tests and benchmarks run several in a process).
static NEXT_CACHE: AtomicU64 = AtomicU64::new(1);

struct Remembered {
    cache: u64,
    generation: u64,
    page: Arc<Page>,
    hits: u32,
}

thread_local! {
    static TABLE: RefCell<[Option<Remembered>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

/// A cache's side of the table: its identity, its generation and the slot hash.
#[derive(Debug)]
pub struct Recent {
    cache: u64,
    generation: AtomicU64,
    /// Seeded per process: which slot a group takes is not for a caller to choose.
    hasher: foldhash::fast::RandomState,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            cache: NEXT_CACHE.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

/// Where a lookup in moka should be remembered: the slot and the generation read before
/// the lookup (a write after it makes what was found stale).
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    slot: usize,
    generation: u64,
}

impl Recent {
    /// The group's page if this thread found it since the cache's last write and it is
    /// not due for a recheck.
    pub fn recall(&self, app: AppId, group: &GroupId) -> Option<Arc<Page>> {
        let Ticket { slot, generation } = self.ticket(app, group);
        TABLE.with_borrow_mut(|table| {
            let r = table[slot].as_mut()?;
            let same = r.cache == self.cache && r.generation == generation && r.page.key.0 == app;
            if !same || r.page.key.1 != *group {
                return None;
            }
            r.hits += 1;
            (r.hits < RECHECK).then(|| r.page.clone())
        })
    }

    /// Where to remember the group's page that a lookup in moka is about to find: taken
    /// before the lookup, so that a write during it makes the page found stale.
    pub fn ticket(&self, app: AppId, group: &GroupId) -> Ticket {
        let slot = (self.hasher.hash_one((app, group.as_str())) % SLOTS as u64) as usize;
        Ticket { slot, generation: self.generation.load(Ordering::Acquire) }
    }

    /// Notes what moka answered for the ticket's lookup (forgetting the slot's page if
    /// moka has none).
    pub fn remember(&self, ticket: Ticket, page: Option<&Arc<Page>>) {
        TABLE.with_borrow_mut(|table| {
            table[ticket.slot] = page.map(|page| Remembered {
                cache: self.cache,
                generation: ticket.generation,
                page: page.clone(),
                hits: 0,
            });
        });
    }

    /// A write is in moka: every page remembered before it is asked of moka again.
    pub fn written(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }
}
