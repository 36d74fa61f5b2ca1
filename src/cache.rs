//! The per-message cache (SPEC 5.1): one entry per (sdkappid, GroupId, MsgSeq), plus
//! group-level negative answers (10010/10015) per (sdkappid, GroupId).
//!
//! It owns freshness: an entry is *fresh* for `ttl` (or `negative_ttl` for a 10062)
//! after the upstream answer arrived, then *servable as stale* for `stale` more, then
//! gone. Whether a caller may take a fresh entry (its `Cache-Control`) and whether stale
//! is allowed (the deadline) is decided by the caller, not here. Only answers go in:
//! transient failures are never cached.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use crate::config::CacheConfig;
use crate::domain::{AppId, GroupId, MsgSeq, Receipt};

/// The key of one message's receipt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ItemKey {
    pub app: AppId,
    pub group: GroupId,
    pub seq: MsgSeq,
}

/// A cached receipt and when it was fetched.
#[derive(Debug)]
pub struct Entry {
    pub receipt: Receipt,
    /// When the upstream answer arrived; `Age` and freshness count from here.
    pub fetched_at: Instant,
    pub fresh_until: Instant,
    /// When moka drops it: the end of the stale window.
    lifetime: Instant,
    /// Whether anyone has read the entry since it was fetched: group cohorts (SPEC 5.2)
    /// refresh only messages someone reads, and this lets the first read tell them once.
    read: AtomicBool,
}

impl Entry {
    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.fetched_at)
    }

    /// True the first time it is called after the entry was fetched.
    pub fn first_read(&self) -> bool {
        // Load first: after the first read this stays a shared, read-only cache line.
        !self.read.load(Ordering::Relaxed) && !self.read.swap(true, Ordering::Relaxed)
    }
}

/// A group-level answer that applies to every MsgSeq of the group.
#[derive(Debug, Clone)]
pub struct GroupAnswer {
    pub code: i64,
    pub info: String,
    pub fetched_at: Instant,
}

/// Time-to-live of each value, decided when it is stored.
struct Lifetime;

impl Expiry<ItemKey, Arc<Entry>> for Lifetime {
    fn expire_after_create(&self, _: &ItemKey, v: &Arc<Entry>, now: Instant) -> Option<Duration> {
        Some(v.lifetime.saturating_duration_since(now))
    }

    fn expire_after_update(&self, _: &ItemKey, v: &Arc<Entry>, now: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(v.lifetime.saturating_duration_since(now))
    }
}

/// The item cache and the group-answer cache, cheap to clone.
#[derive(Clone)]
pub struct ReceiptCache {
    items: Cache<ItemKey, Arc<Entry>>,
    groups: Cache<(AppId, GroupId), Arc<GroupAnswer>>,
    config: CacheConfig,
}

impl ReceiptCache {
    pub fn new(config: &CacheConfig) -> Self {
        let items = Cache::builder().max_capacity(config.max_entries).expire_after(Lifetime).build();
        let groups = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.negative_ttl.max(Duration::from_millis(1)))
            .build();
        Self { items, groups, config: config.clone() }
    }

    pub async fn get(&self, key: &ItemKey) -> Option<Arc<Entry>> {
        self.items.get(key).await
    }

    /// Stores fresh answers for one group, all fetched at `fetched_at`.
    pub async fn insert(&self, app: AppId, group: &GroupId, answers: &[(MsgSeq, Receipt)], fetched_at: Instant) {
        for &(seq, receipt) in answers {
            let ttl = if receipt.is_negative() { self.config.negative_ttl } else { self.config.ttl };
            let fresh_until = fetched_at + ttl;
            let entry = Entry {
                receipt,
                fetched_at,
                fresh_until,
                lifetime: fresh_until + self.config.stale,
                read: AtomicBool::new(false),
            };
            let key = ItemKey { app, group: group.clone(), seq };
            self.items.insert(key, Arc::new(entry)).await;
        }
    }

    /// A cached group-level answer (10010 / 10015) if one is fresh.
    pub async fn group_answer(&self, app: AppId, group: &GroupId) -> Option<Arc<GroupAnswer>> {
        self.groups.get(&(app, group.clone())).await
    }

    pub async fn insert_group_answer(&self, app: AppId, group: &GroupId, answer: GroupAnswer) {
        if !self.config.negative_ttl.is_zero() {
            self.groups.insert((app, group.clone()), Arc::new(answer)).await;
        }
    }

    /// Entries held, for the `receipt_gateway_cache_entries` gauge (moka's count lags a
    /// little behind inserts, which is fine for a gauge).
    pub fn entry_count(&self) -> u64 {
        self.items.entry_count()
    }

    /// Runs moka's deferred maintenance; the housekeeping task calls it so the entry
    /// count and evictions keep up even when traffic is idle.
    pub async fn run_pending_tasks(&self) {
        self.items.run_pending_tasks().await;
        self.groups.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ttl_ms: u64, stale_ms: u64, negative_ms: u64) -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_millis(ttl_ms),
            stale: Duration::from_millis(stale_ms),
            negative_ttl: Duration::from_millis(negative_ms),
            max_entries: 100,
        }
    }

    fn key(seq: u64) -> ItemKey {
        ItemKey { app: AppId(1), group: GroupId::parse("g").unwrap(), seq: MsgSeq(seq) }
    }

    const OK: Receipt = Receipt { code: 0, read: Some(1), unread: Some(2) };
    const NONE: Receipt = Receipt { code: 10062, read: None, unread: None };

    #[tokio::test]
    async fn entries_are_fresh_for_ttl_and_negative_ones_for_negative_ttl() {
        let cache = ReceiptCache::new(&config(1000, 60_000, 100));
        let t0 = Instant::now();
        let group = GroupId::parse("g").unwrap();
        cache.insert(AppId(1), &group, &[(MsgSeq(1), OK), (MsgSeq(2), NONE)], t0).await;
        let ok = cache.get(&key(1)).await.unwrap();
        let none = cache.get(&key(2)).await.unwrap();
        assert!(ok.is_fresh(t0 + Duration::from_millis(999)));
        assert!(!ok.is_fresh(t0 + Duration::from_millis(1000)));
        assert!(none.is_fresh(t0 + Duration::from_millis(99)));
        assert!(!none.is_fresh(t0 + Duration::from_millis(100)));
        assert_eq!(ok.age(t0 + Duration::from_millis(2500)), Duration::from_millis(2500));
        assert!(cache.get(&key(3)).await.is_none());
    }

    #[tokio::test]
    async fn entries_leave_after_the_stale_window() {
        let cache = ReceiptCache::new(&config(5, 5, 5));
        let group = GroupId::parse("g").unwrap();
        cache.insert(AppId(1), &group, &[(MsgSeq(1), OK)], Instant::now()).await;
        assert!(cache.get(&key(1)).await.is_some());
        // Polled rather than slept-for: moka expires on its own clock.
        let gone = tokio::time::timeout(Duration::from_secs(5), async {
            while cache.get(&key(1)).await.is_some() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        assert!(gone.await.is_ok());
    }

    #[tokio::test]
    async fn first_read_is_reported_once_per_fetch() {
        let cache = ReceiptCache::new(&config(1000, 1000, 1000));
        let group = GroupId::parse("g").unwrap();
        cache.insert(AppId(1), &group, &[(MsgSeq(1), OK)], Instant::now()).await;
        let e = cache.get(&key(1)).await.unwrap();
        assert!(e.first_read());
        assert!(!e.first_read());
        cache.insert(AppId(1), &group, &[(MsgSeq(1), OK)], Instant::now()).await;
        assert!(cache.get(&key(1)).await.unwrap().first_read());
    }
}
