//! The per-message cache (docs/design.md#cache): one item per (sdkappid, GroupId, MsgSeq), plus
//! group-level negative answers (10010/10015) per (sdkappid, GroupId).
//!
//! It owns freshness: an item is *fresh* for `ttl` (or `negative_ttl` for a 10062, or
//! `callback_ttl` for one kept current by callbacks: [`KeptBy`]) after the upstream
//! answer arrived (or the read a callback reported happened), then *servable as stale*
//! for `stale` more, then gone. An older answer never replaces a newer one.
//! What a caller's `Cache-Control` accepts is [`Freshness`]; whether a stale item may
//! stand in (the deadline) is the caller's decision, not this module's. Only answers go
//! in: transient failures are never cached.
//!
//! Items are stored by group: moka holds one [`Page`] per (sdkappid, GroupId), and the
//! page holds its group's items. A moka entry costs about 320 bytes of bookkeeping, which
//! per item would put a million items far over the memory budget; per group it is
//! shared by all of the group's messages, a request reads all its items with one lookup,
//! and the group's cohort (who was read lately, what is due for refresh) is right there
//! for the dispatcher. Capacity still counts items: a page weighs as many items as it holds.
//!
//! May import: `config`, `tencent`. Imported by `engine`, `fleet`, `upstream`, `service`.
//!
//! Invariant: an older answer never replaces a newer one, and nothing but answers is
//! stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use moka::future::Cache;
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, GroupId, MsgSeq, Receipt};

mod freshness;
mod keyed;
mod recent;
pub use freshness::{Freshness, XCache};
pub use keyed::{Keyed, KeyedAnswer};
pub use recent::RECHECK;
use recent::Recent;

/// What keeps an item current, which decides how long it is fresh (docs/design.md#cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeptBy {
    /// Only polling: fresh for `cache.ttl`.
    Polling,
    /// Written by a callback, or fetched for an app whose callbacks reach the gateway:
    /// every read is pushed, so it is fresh for `cache.callback_ttl`.
    Callbacks,
}

impl KeptBy {
    /// How long `receipt` is fresh: a negative answer for `negative_ttl` however it came.
    pub fn fresh_for(
        self,
        receipt: &Receipt,
        ttl: Duration,
        negative_ttl: Duration,
        callback_ttl: Duration,
    ) -> Duration {
        match (receipt.is_negative(), self) {
            (true, _) => negative_ttl,
            (false, KeptBy::Polling) => ttl,
            (false, KeptBy::Callbacks) => callback_ttl,
        }
    }
}

/// One cached item.
#[derive(Clone, Copy, Debug)]
struct Stored {
    receipt: Receipt,
    kept_by: KeptBy,
    /// When the upstream answer arrived; `Age` and freshness count from here.
    fetched_at: Instant,
    /// The last read, kept across refreshes: cohort membership is "read lately", not
    /// "read since the last fetch" (see `BatchPolicy::cohort_memory`).
    last_read: Option<Instant>,
}

/// An item as a reader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cached {
    pub receipt: Receipt,
    pub fetched_at: Instant,
    pub fresh_until: Instant,
}

impl Cached {
    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.fetched_at)
    }
}

/// A group-level answer that applies to every MsgSeq of the group.
#[derive(Debug, Clone)]
pub struct GroupAnswer {
    pub code: ErrorCode,
    pub info: String,
    pub fetched_at: Instant,
}

/// Lifetimes, as one snapshot.
#[derive(Debug, Clone, Copy)]
struct Lifetimes {
    ttl: Duration,
    negative_ttl: Duration,
    callback_ttl: Duration,
    stale: Duration,
}

impl Lifetimes {
    fn of(config: &CacheConfig) -> Self {
        Self {
            ttl: config.ttl,
            negative_ttl: config.negative_ttl,
            callback_ttl: config.callback_ttl,
            stale: config.stale,
        }
    }

    fn fresh_for(&self, receipt: &Receipt, kept_by: KeptBy) -> Duration {
        kept_by.fresh_for(receipt, self.ttl, self.negative_ttl, self.callback_ttl)
    }

    /// The longest any item is fresh.
    fn longest(&self) -> Duration {
        self.ttl.max(self.negative_ttl).max(self.callback_ttl)
    }
}

/// The lifetimes every page reads, in atomics (µs) so a reload can change them and a
/// read costs four loads.
#[derive(Debug, Default)]
struct SharedLifetimes {
    ttl_us: AtomicU64,
    negative_ttl_us: AtomicU64,
    callback_ttl_us: AtomicU64,
    stale_us: AtomicU64,
}

impl SharedLifetimes {
    fn get(&self) -> Lifetimes {
        let us = |a: &AtomicU64| Duration::from_micros(a.load(Ordering::Relaxed));
        Lifetimes {
            ttl: us(&self.ttl_us),
            negative_ttl: us(&self.negative_ttl_us),
            callback_ttl: us(&self.callback_ttl_us),
            stale: us(&self.stale_us),
        }
    }

    fn set(&self, l: Lifetimes) {
        let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.ttl_us.store(us(l.ttl), Ordering::Relaxed);
        self.negative_ttl_us.store(us(l.negative_ttl), Ordering::Relaxed);
        self.callback_ttl_us.store(us(l.callback_ttl), Ordering::Relaxed);
        self.stale_us.store(us(l.stale), Ordering::Relaxed);
    }
}

/// How long moka keeps an entry after its last write, by the lifetimes at that write (so
/// that a reload applies from each entry's next write): a page outlives its newest item's
/// stale window and no longer; a group answer, the negative TTL; a keyed answer, its
/// TTL and stale window.
struct KeepFor {
    lifetimes: Arc<SharedLifetimes>,
    /// Which of them: a page's, or a group answer's.
    of: fn(Lifetimes) -> Duration,
}

impl KeepFor {
    fn pages(lifetimes: &Arc<SharedLifetimes>) -> Self {
        Self { lifetimes: lifetimes.clone(), of: |l| l.longest() + l.stale }
    }

    fn group_answers(lifetimes: &Arc<SharedLifetimes>) -> Self {
        Self { lifetimes: lifetimes.clone(), of: |l| l.negative_ttl.max(Duration::from_millis(1)) }
    }

    fn answers(lifetimes: &Arc<SharedLifetimes>) -> Self {
        Self { lifetimes: lifetimes.clone(), of: |l| l.ttl + l.stale }
    }

    fn now(&self) -> Option<Duration> {
        Some((self.of)(self.lifetimes.get()))
    }
}

// moka's clock is std's: its instants are ignored here, the lifetimes alone decide.
impl<K, V> moka::Expiry<K, V> for KeepFor {
    fn expire_after_create(&self, _: &K, _: &V, _: std::time::Instant) -> Option<Duration> {
        self.now()
    }

    fn expire_after_update(&self, _: &K, _: &V, _: std::time::Instant, _: Option<Duration>) -> Option<Duration> {
        self.now()
    }
}

/// The pages read since the fleet tier last shared their reads: with several replicas,
/// a group's cohort is what *any* replica read (docs/design.md#fleet-tier), and reads never touch
/// Redis on the request path, so they are collected here and shared in the background.
#[derive(Debug, Default)]
pub struct ReadLog {
    pages: Mutex<Vec<Arc<Page>>>,
}

impl ReadLog {
    /// The pages read since the last call (each at most once).
    pub fn drain(&self) -> Vec<Arc<Page>> {
        std::mem::take(&mut *self.pages.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A page's items by MsgSeq. Hashed with foldhash, randomly seeded per process: SipHash
/// was a sixth of a cached answer's instructions (callgrind, `benches/callgrind.sh`), and
/// the keys are integers Tencent confirmed, bounded per page.
type Items = HashMap<MsgSeq, Stored, foldhash::fast::RandomState>;

/// One group's items. Locked briefly, never across an `.await`.
#[derive(Debug)]
pub struct Page {
    items: Mutex<Items>,
    lifetimes: Arc<SharedLifetimes>,
    /// Which group it is, for the read log.
    key: (AppId, GroupId),
    log: Option<Arc<ReadLog>>,
    /// Set once it is in the read log, until the log is drained.
    logged: AtomicBool,
}

impl Page {
    fn items(&self) -> MutexGuard<'_, Items> {
        // Every critical section leaves the map consistent, so a poisoned lock is usable.
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks up `seqs` (sorted, distinct) and records that they were read at `now`.
    pub fn read(self: &Arc<Self>, seqs: &[MsgSeq], now: Instant) -> Vec<Option<Cached>> {
        let found: Vec<Option<Cached>> = {
            let mut items = self.items();
            let lifetimes = self.lifetimes.get();
            seqs.iter()
                .map(|seq| {
                    let stored = items.get_mut(seq)?;
                    let fresh_until = stored.fetched_at + lifetimes.fresh_for(&stored.receipt, stored.kept_by);
                    if now >= fresh_until + lifetimes.stale {
                        return None;
                    }
                    stored.last_read = Some(now);
                    Some(Cached { receipt: stored.receipt, fetched_at: stored.fetched_at, fresh_until })
                })
                .collect()
        };
        // Load before swap: a hot page is read from every core, and a write per read would
        // bounce its cache line between them.
        if let Some(log) = &self.log
            && !self.logged.load(Ordering::Relaxed)
            && found.iter().any(Option::is_some)
            && !self.logged.swap(true, Ordering::Relaxed)
        {
            log.pages.lock().unwrap_or_else(|p| p.into_inner()).push(self.clone());
        }
        found
    }

    /// Whether the page holds `seq` (fresh or not).
    pub fn holds(&self, seq: MsgSeq) -> bool {
        self.items().contains_key(&seq)
    }

    pub fn key(&self) -> &(AppId, GroupId) {
        &self.key
    }

    /// The highest MsgSeq the page holds a receipt for: a message Tencent confirmed.
    pub fn highest_answered(&self) -> Option<MsgSeq> {
        self.items().iter().filter(|(_, s)| !s.receipt.is_negative()).map(|(seq, _)| *seq).max()
    }

    /// The items read since `since`, with when; the page may enter the read log again.
    pub fn reads_since(&self, since: Instant) -> Vec<(MsgSeq, Instant)> {
        self.logged.store(false, Ordering::Relaxed);
        let items = self.items();
        items.iter().filter_map(|(seq, s)| s.last_read.filter(|&t| t >= since).map(|t| (*seq, t))).collect()
    }

    /// The group's cohort due for refresh (docs/design.md#single-flight-and-batching): positive
    /// items read within `memory`, expiring before `horizon`, accepted by `eligible`; the oldest
    /// first, at most `room`.
    pub fn due_for_refresh(
        &self,
        now: Instant,
        horizon: Instant,
        memory: Duration,
        room: usize,
        mut eligible: impl FnMut(MsgSeq) -> bool,
    ) -> Vec<MsgSeq> {
        let items = self.items();
        let lifetimes = self.lifetimes.get();
        let mut due: Vec<(Instant, MsgSeq)> = items
            .iter()
            .filter(|(_, s)| {
                !s.receipt.is_negative() && s.fetched_at + lifetimes.fresh_for(&s.receipt, s.kept_by) <= horizon
            })
            .filter(|(_, s)| s.last_read.is_some_and(|read| now.saturating_duration_since(read) <= memory))
            .filter(|(seq, _)| eligible(**seq))
            .map(|(seq, s)| (s.fetched_at, *seq))
            .collect();
        drop(items);
        due.sort_unstable();
        due.into_iter().take(room).map(|(_, seq)| seq).collect()
    }

    fn len(&self) -> usize {
        self.items().len()
    }
}

/// One answer to store: what is known of `seq` as of `fetched_at`.
#[derive(Clone, Copy, Debug)]
pub struct Known {
    pub seq: MsgSeq,
    pub receipt: Receipt,
    /// When the answer arrived, or when the read a callback reported happened.
    pub fetched_at: Instant,
    pub kept_by: KeptBy,
}

/// The item pages and the group-answer cache, cheap to clone.
#[derive(Clone)]
pub struct ReceiptCache {
    pages: Cache<(AppId, GroupId), Arc<Page>>,
    /// With the fleet tier: where read pages are noted.
    log: Option<Arc<ReadLog>>,
    groups: Cache<(AppId, GroupId), Arc<GroupAnswer>>,
    /// When the newest group answer was stored, as nanoseconds after `epoch` (0: never).
    /// None is alive a negative TTL after it, so a hit need not look them up.
    group_answered: Arc<AtomicU64>,
    epoch: Instant,
    lifetimes: Arc<SharedLifetimes>,
    /// The pages each thread found lately, for answers wholly from cache.
    recent: Arc<Recent>,
}

impl ReceiptCache {
    pub fn new(config: &CacheConfig) -> Self {
        let lifetimes = Arc::new(SharedLifetimes::default());
        lifetimes.set(Lifetimes::of(config));
        let pages = Cache::builder()
            .max_capacity(config.max_entries)
            // A page weighs its items (at its last fill), so capacity counts items.
            .weigher(|_, page: &Arc<Page>| page.len().try_into().unwrap_or(u32::MAX).max(1))
            // Every fill re-inserts its page, so a page outlives its newest item's
            // stale window and no longer.
            .expire_after(KeepFor::pages(&lifetimes))
            .build();
        let groups = Cache::builder().max_capacity(100_000).expire_after(KeepFor::group_answers(&lifetimes)).build();
        Self {
            pages,
            groups,
            group_answered: Arc::default(),
            epoch: Instant::now(),
            lifetimes,
            log: None,
            recent: Arc::default(),
        }
    }

    /// Reloaded lifetimes (docs/configuration.md#command-line): items are fresh and stale by them
    /// from now on, whenever they were fetched; a page is kept by them from its group's next fill
    /// (until then, by the lifetimes of its last one).
    pub fn set_lifetimes(&self, config: &CacheConfig) {
        self.lifetimes.set(Lifetimes::of(config));
    }

    /// A cache of whole answers by key (the detail API's), kept and judged by this
    /// cache's lifetimes, so that a reload changes both at once.
    pub fn keyed<K>(&self, capacity: u64) -> Keyed<K>
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
    {
        let answers = Cache::builder().max_capacity(capacity).expire_after(KeepFor::answers(&self.lifetimes)).build();
        Keyed::new(answers, self.lifetimes.clone())
    }

    /// Notes read pages in `log` (the fleet tier shares their reads).
    pub fn with_read_log(mut self, log: Arc<ReadLog>) -> Self {
        self.log = Some(log);
        self
    }

    /// The group's page, if any of its items is cached.
    pub async fn page(&self, app: AppId, group: &GroupId) -> Option<Arc<Page>> {
        let ticket = self.recent.ticket(app, group);
        let page = self.pages.get(&(app, group.clone())).await;
        self.recent.remember(ticket, page.as_ref());
        page
    }

    /// The group's page as this thread last found it with [`page`](Self::page), if no
    /// write to the cache came since and it is not due for a recheck in moka (one hit in
    /// [`RECHECK`]): for an answer wholly from cache, which is what it may serve (see
    /// `cache/recent.rs`). `None` says to ask [`page`](Self::page).
    pub fn recent_page(&self, app: AppId, group: &GroupId) -> Option<Arc<Page>> {
        self.recent.recall(app, group)
    }

    /// Stores fresh answers for one group, all fetched at `fetched_at`; returns its page.
    pub async fn insert(
        &self,
        app: AppId,
        group: &GroupId,
        answers: &[(MsgSeq, Receipt)],
        fetched_at: Instant,
        kept_by: KeptBy,
    ) -> Arc<Page> {
        let each = answers.iter().map(|&(seq, receipt)| Known { seq, receipt, fetched_at, kept_by });
        self.insert_newer(app, group, each, None).await
    }

    /// Stores an upstream call's answers (arrived at `fetched_at`), except over an item
    /// known as of after `sent_at`: a callback that reported a read while the call was
    /// on its way knows more than the call's answer, which may predate the read.
    pub async fn insert_fetched(
        &self,
        app: AppId,
        group: &GroupId,
        answers: &[(MsgSeq, Receipt)],
        (sent_at, fetched_at): (Instant, Instant),
        kept_by: KeptBy,
    ) -> Arc<Page> {
        let each = answers.iter().map(|&(seq, receipt)| Known { seq, receipt, fetched_at, kept_by });
        self.insert_newer(app, group, each, Some(sent_at)).await
    }

    /// Stores answers of different times (another replica's, from the fleet tier; a
    /// callback's reads); an item never replaces a newer one. Returns the group's page.
    pub async fn insert_each(
        &self,
        app: AppId,
        group: &GroupId,
        answers: impl IntoIterator<Item = Known>,
    ) -> Arc<Page> {
        self.insert_newer(app, group, answers, None).await
    }

    /// Stores `answers`, skipping any whose item is held as of a later time than the
    /// answer's (or than `known_as_of`, when given).
    async fn insert_newer(
        &self,
        app: AppId,
        group: &GroupId,
        answers: impl IntoIterator<Item = Known>,
        known_as_of: Option<Instant>,
    ) -> Arc<Page> {
        let key = (app, group.clone());
        let shared = self.lifetimes.clone();
        let lifetimes = shared.get();
        let (page_key, log) = (key.clone(), self.log.clone());
        let page = self
            .pages
            .get_with(key.clone(), async move {
                Arc::new(Page {
                    items: Mutex::default(),
                    lifetimes: shared,
                    key: page_key,
                    log,
                    logged: AtomicBool::new(false),
                })
            })
            .await;
        {
            let mut items = page.items();
            let now = Instant::now();
            // Items past their stale window leave as the group is refreshed.
            items.retain(|_, s| now < s.fetched_at + lifetimes.fresh_for(&s.receipt, s.kept_by) + lifetimes.stale);
            for Known { seq, receipt, fetched_at, kept_by } in answers {
                let held = items.get(&seq);
                if held.is_some_and(|s| s.fetched_at > known_as_of.unwrap_or(fetched_at)) {
                    continue;
                }
                let last_read = held.and_then(|s| s.last_read);
                items.insert(seq, Stored { receipt, kept_by, fetched_at, last_read });
            }
        }
        // Re-inserting renews the page's lifetime and re-weighs it.
        self.pages.insert(key, page.clone()).await;
        // After the insert: a page remembered before it is looked up again.
        self.recent.written();
        page
    }

    /// A cached group-level answer (10010 / 10015) if one is fresh.
    pub async fn group_answer(&self, app: AppId, group: &GroupId) -> Option<Arc<GroupAnswer>> {
        let negative_ttl = self.lifetimes.get().negative_ttl;
        // Every group answer was fetched before it was stored: none stored within a
        // negative TTL means none is alive, and the common case asks moka nothing.
        let newest = self.group_answered.load(Ordering::Relaxed);
        if newest == 0 || self.epoch + Duration::from_nanos(newest) + negative_ttl <= Instant::now() {
            return None;
        }
        let answer = self.groups.get(&(app, group.clone())).await?;
        // moka keeps it for the negative TTL at start; a reload may have shortened it.
        (answer.fetched_at.elapsed() < negative_ttl).then_some(answer)
    }

    pub async fn insert_group_answer(&self, app: AppId, group: &GroupId, answer: GroupAnswer) {
        if !self.lifetimes.get().negative_ttl.is_zero() {
            let stored = self.epoch.elapsed().as_nanos().try_into().unwrap_or(u64::MAX).max(1);
            self.group_answered.fetch_max(stored, Ordering::Relaxed);
            self.groups.insert((app, group.clone()), Arc::new(answer)).await;
        }
    }

    /// Items held, for the `receipt_gateway_cache_entries` gauge (moka's count lags a
    /// little behind inserts, which is fine for a gauge).
    /// How long a negative answer is believed (`cache.negative_ttl_ms`, as reloaded).
    pub fn negative_ttl(&self) -> Duration {
        self.lifetimes.get().negative_ttl
    }

    pub fn entry_count(&self) -> u64 {
        self.pages.weighted_size()
    }

    /// Runs moka's deferred maintenance; the housekeeping task calls it so the entry
    /// count and evictions keep up even when traffic is idle.
    pub async fn run_pending_tasks(&self) {
        self.pages.run_pending_tasks().await;
        self.groups.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests;
