use super::*;

fn config(ttl_ms: u64, stale_ms: u64, negative_ms: u64) -> CacheConfig {
    CacheConfig {
        ttl: Duration::from_millis(ttl_ms),
        stale: Duration::from_millis(stale_ms),
        negative_ttl: Duration::from_millis(negative_ms),
        callback_ttl: Duration::from_millis(10 * ttl_ms),
        max_entries: 100,
    }
}

fn group() -> GroupId {
    GroupId::parse("g").unwrap()
}

const APP: AppId = AppId(1);
const OK: Receipt = Receipt { code: ErrorCode::OK, read: Some(1), unread: Some(2) };
const NONE: Receipt = Receipt { code: ErrorCode::NO_RECEIPT, read: None, unread: None };

#[tokio::test]
async fn reloaded_lifetimes_apply_to_cached_items() {
    let cache = ReceiptCache::new(&config(1000, 60_000, 100));
    let t0 = Instant::now();
    cache.insert(APP, &group(), &[(MsgSeq(1), OK)], t0, KeptBy::Polling).await;
    let page = cache.page(APP, &group()).await.unwrap();

    cache.set_lifetimes(&config(500, 1000, 100));
    let item = page.read(&[MsgSeq(1)], t0)[0].unwrap();
    assert!(!item.is_fresh(t0 + Duration::from_millis(500)), "the shorter TTL applies to an item cached before");
    assert!(page.read(&[MsgSeq(1)], t0 + Duration::from_millis(1500))[0].is_none(), "and the shorter stale window");
    cache.set_lifetimes(&config(5000, 60_000, 100));
    let item = page.read(&[MsgSeq(1)], t0)[0].unwrap();
    assert!(item.is_fresh(t0 + Duration::from_millis(4999)), "a longer TTL too");
}

#[tokio::test]
async fn items_are_fresh_for_ttl_and_negative_ones_for_negative_ttl() {
    let cache = ReceiptCache::new(&config(1000, 60_000, 100));
    let t0 = Instant::now();
    cache.insert(APP, &group(), &[(MsgSeq(1), OK), (MsgSeq(2), NONE)], t0, KeptBy::Polling).await;
    let page = cache.page(APP, &group()).await.unwrap();
    let found = page.read(&[MsgSeq(1), MsgSeq(2), MsgSeq(3)], t0);
    let (ok, none) = (found[0].unwrap(), found[1].unwrap());
    assert!(found[2].is_none());
    assert!(ok.is_fresh(t0 + Duration::from_millis(999)));
    assert!(!ok.is_fresh(t0 + Duration::from_millis(1000)));
    assert!(none.is_fresh(t0 + Duration::from_millis(99)));
    assert!(!none.is_fresh(t0 + Duration::from_millis(100)));
    assert_eq!(ok.age(t0 + Duration::from_millis(2500)), Duration::from_millis(2500));
    assert_eq!(ok.receipt, OK);
}

#[tokio::test]
async fn a_call_answered_after_a_callback_does_not_undo_the_callbacks_read() {
    let cache = ReceiptCache::new(&config(1000, 60_000, 100));
    let sent = Instant::now();
    let read = Receipt { code: ErrorCode::OK, read: Some(5), unread: Some(1) };
    let at = |ms| sent + Duration::from_millis(ms);
    let callback = Known { seq: MsgSeq(1), receipt: read, fetched_at: at(5), kept_by: KeptBy::Callbacks };
    cache.insert_each(APP, &group(), [callback]).await;
    // The call left before the read and is answered after the callback.
    let both = [(MsgSeq(1), OK), (MsgSeq(2), OK)];
    let page = cache.insert_fetched(APP, &group(), &both, (sent, at(9)), KeptBy::Polling).await;
    let found = page.read(&[MsgSeq(1), MsgSeq(2)], at(10));
    assert_eq!(found[0].unwrap().receipt, read, "the callback's newer count stays");
    assert_eq!(found[1].unwrap().receipt, OK);
    // A call sent after the callback replaces it.
    cache.insert_fetched(APP, &group(), &[(MsgSeq(1), OK)], (at(10), at(11)), KeptBy::Polling).await;
    assert_eq!(page.read(&[MsgSeq(1)], at(12))[0].unwrap().receipt, OK);
}

#[tokio::test]
async fn items_past_their_stale_window_are_not_served() {
    let cache = ReceiptCache::new(&config(10, 20, 10));
    let t0 = Instant::now();
    cache.insert(APP, &group(), &[(MsgSeq(1), OK)], t0, KeptBy::Polling).await;
    let page = cache.page(APP, &group()).await.unwrap();
    assert!(page.read(&[MsgSeq(1)], t0 + Duration::from_millis(29))[0].is_some());
    assert!(page.read(&[MsgSeq(1)], t0 + Duration::from_millis(30))[0].is_none());
}

#[tokio::test]
async fn the_cohort_is_read_items_near_expiry() {
    let cache = ReceiptCache::new(&config(1000, 60_000, 1000));
    let t0 = Instant::now();
    let seqs = [(MsgSeq(1), OK), (MsgSeq(2), OK), (MsgSeq(3), NONE), (MsgSeq(4), OK)];
    let page = cache.insert(APP, &group(), &seqs, t0, KeptBy::Polling).await;
    page.read(&[MsgSeq(1), MsgSeq(2), MsgSeq(3)], t0 + Duration::from_millis(10));
    let memory = Duration::from_secs(4);
    let at = |ms| t0 + Duration::from_millis(ms);
    // Not yet within half a TTL of expiry.
    assert!(page.due_for_refresh(at(400), at(400) + Duration::from_millis(500), memory, 10, |_| true).is_empty());
    // Read and due: 1 and 2; never 3 (negative) or 4 (unread); `eligible` and `room` apply.
    let due = page.due_for_refresh(at(600), at(1100), memory, 10, |_| true);
    assert_eq!(due.len(), 2);
    assert_eq!(page.due_for_refresh(at(600), at(1100), memory, 10, |s| s != MsgSeq(1)), vec![MsgSeq(2)]);
    assert_eq!(page.due_for_refresh(at(600), at(1100), memory, 1, |_| true).len(), 1);
    // Read too long ago: forgotten.
    assert!(page.due_for_refresh(at(5000), at(5500), memory, 10, |_| true).is_empty());
    // A refresh keeps the last read: 1 stays in the cohort for its next refresh.
    cache.insert(APP, &group(), &[(MsgSeq(1), OK)], at(700), KeptBy::Polling).await;
    assert_eq!(page.due_for_refresh(at(1300), at(1800), memory, 10, |_| true), vec![MsgSeq(2), MsgSeq(1)]);
}

#[tokio::test]
async fn capacity_counts_items_and_a_refill_prunes_expired_ones() {
    let cache = ReceiptCache::new(&config(10, 10, 10));
    let t0 = Instant::now();
    let many: Vec<_> = (0..30).map(|s| (MsgSeq(s), OK)).collect();
    cache.insert(APP, &group(), &many, t0 - Duration::from_millis(50), KeptBy::Polling).await;
    let page = cache.insert(APP, &group(), &[(MsgSeq(99), OK)], t0, KeptBy::Polling).await;
    cache.run_pending_tasks().await;
    assert_eq!(page.len(), 1);
    assert_eq!(cache.entry_count(), 1);
}

/// How many times in a row `recent_page` serves the group's page, up to `limit`.
fn recalled(cache: &ReceiptCache, group: &GroupId, limit: u32) -> (u32, Option<Arc<Page>>) {
    let mut last = None;
    for served in 0..limit {
        match cache.recent_page(APP, group) {
            Some(page) => last = Some(page),
            None => return (served, last),
        }
    }
    (limit, last)
}

#[tokio::test]
async fn a_page_found_in_moka_is_served_by_the_thread_until_its_recheck() {
    let cache = ReceiptCache::new(&config(1000, 60_000, 100));
    cache.insert(APP, &group(), &[(MsgSeq(1), OK)], Instant::now(), KeptBy::Polling).await;
    assert!(cache.recent_page(APP, &group()).is_none(), "not looked up yet: nothing to recall");

    let page = cache.page(APP, &group()).await.unwrap();
    let (served, last) = recalled(&cache, &group(), 100);
    assert_eq!(served, RECHECK - 1, "every RECHECKth hit asks moka");
    assert!(Arc::ptr_eq(&last.unwrap(), &page));
    let again = cache.page(APP, &group()).await.unwrap();
    assert!(Arc::ptr_eq(&again, &page));
    assert_eq!(recalled(&cache, &group(), 100).0, RECHECK - 1, "moka's answer is remembered anew");

    let other = GroupId::parse("other").unwrap();
    assert!(cache.recent_page(APP, &other).is_none(), "another group is not served this group's page");
    assert!(cache.recent_page(AppId(2), &group()).is_none(), "nor another app");
}

#[tokio::test]
async fn any_write_makes_remembered_pages_be_looked_up_again() {
    let cache = ReceiptCache::new(&config(1000, 60_000, 100));
    let now = Instant::now();
    cache.insert(APP, &group(), &[(MsgSeq(1), OK)], now, KeptBy::Polling).await;
    cache.page(APP, &group()).await.unwrap();
    assert!(cache.recent_page(APP, &group()).is_some());

    let other = GroupId::parse("other").unwrap();
    cache.insert(APP, &other, &[(MsgSeq(7), OK)], now, KeptBy::Polling).await;
    assert!(cache.recent_page(APP, &group()).is_none(), "a write to another group counts too");
    cache.page(APP, &group()).await.unwrap();
    assert!(cache.recent_page(APP, &group()).is_some());

    // A page moka dropped (here: invalidated) and made anew by the next write is never
    // served in place of the new one; the dropped one, which no write replaced, at
    // most until its recheck.
    let dropped = cache.page(APP, &group()).await.unwrap();
    cache.pages.invalidate(&(APP, group())).await;
    let (served, last) = recalled(&cache, &group(), 100);
    assert_eq!(served, RECHECK - 1);
    assert!(Arc::ptr_eq(&last.unwrap(), &dropped));
    assert!(cache.page(APP, &group()).await.is_none(), "the recheck finds moka's answer: none");
    assert!(cache.recent_page(APP, &group()).is_none(), "and remembers it");

    cache.page(APP, &other).await.unwrap();
    cache
        .insert_each(
            APP,
            &group(),
            [Known { seq: MsgSeq(1), receipt: OK, fetched_at: now, kept_by: KeptBy::Callbacks }],
        )
        .await;
    let made_anew = cache.page(APP, &group()).await.unwrap();
    assert!(!Arc::ptr_eq(&made_anew, &dropped));
    assert!(Arc::ptr_eq(&cache.recent_page(APP, &group()).unwrap(), &made_anew));
    assert!(cache.recent_page(APP, &other).is_none(), "the callback's write made the other group's page stale");
}

#[tokio::test]
async fn caches_do_not_serve_each_others_pages() {
    let (a, b) = (ReceiptCache::new(&config(1000, 60_000, 100)), ReceiptCache::new(&config(1000, 60_000, 100)));
    let now = Instant::now();
    a.insert(APP, &group(), &[(MsgSeq(1), OK)], now, KeptBy::Polling).await;
    b.insert(APP, &group(), &[(MsgSeq(1), NONE)], now, KeptBy::Polling).await;
    let page_a = a.page(APP, &group()).await.unwrap();
    assert!(b.recent_page(APP, &group()).is_none(), "same key, same thread, another cache");
    let page_b = b.page(APP, &group()).await.unwrap();
    assert!(Arc::ptr_eq(&b.recent_page(APP, &group()).unwrap(), &page_b));
    assert!(!Arc::ptr_eq(&page_a, &page_b));
}
