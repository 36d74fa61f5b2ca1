//! Whole answers cached by key (the detail API's pages, keyed by the whole request):
//! fresh for `cache.ttl`, then servable as stale for `cache.stale`, by the same
//! lifetimes as the receipt items.

use std::hash::Hash;
use std::sync::Arc;

use bytes::Bytes;
use moka::future::Cache;
use tokio::time::Instant;

use super::{Freshness, SharedLifetimes};

/// One stored answer: Tencent's body as it came, and when it arrived.
#[derive(Debug)]
pub struct KeyedAnswer {
    pub body: Bytes,
    pub fetched_at: Instant,
}

/// What a lookup found: an answer the caller accepts, or one it may fall back to.
#[derive(Debug, Default)]
pub struct Found {
    pub acceptable: Option<Arc<KeyedAnswer>>,
    /// Within its stale window (fresh ones too): what stands in when nothing fresh comes.
    pub stale: Option<Arc<KeyedAnswer>>,
}

/// Answers by `K`, cheap to clone.
pub struct Keyed<K> {
    answers: Cache<K, Arc<KeyedAnswer>>,
    lifetimes: Arc<SharedLifetimes>,
}

impl<K: Hash + Eq + Send + Sync + 'static> Keyed<K> {
    pub(super) fn new(answers: Cache<K, Arc<KeyedAnswer>>, lifetimes: Arc<SharedLifetimes>) -> Self {
        Self { answers, lifetimes }
    }

    /// The answer for `key` as `freshness` sees it at `now`.
    pub async fn get(&self, key: &K, freshness: Freshness, now: Instant) -> Found {
        let Some(answer) = self.answers.get(key).await else { return Found::default() };
        let lifetimes = self.lifetimes.get();
        let age = now.saturating_duration_since(answer.fetched_at);
        let acceptable = freshness.accepts(age, age < lifetimes.ttl).then(|| answer.clone());
        let stale = (age < lifetimes.ttl + lifetimes.stale).then_some(answer);
        Found { acceptable, stale }
    }

    pub async fn insert(&self, key: K, answer: Arc<KeyedAnswer>) {
        self.answers.insert(key, answer).await;
    }
}
