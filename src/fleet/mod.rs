//! The fleet tier (docs/design.md#fleet-tier): N replicas behave as one gateway by sharing, through
//! Redis, the cached items, the in-flight fetches, the per-group batches and the cohorts.
//!
//! Each replica's in-memory cache stays the first tier: hits never touch Redis. On a miss
//! the request asks Redis once for its group ([`Fleet::claim`]): items another replica
//! fetched are served from there (`shared_hit`); items another replica is fetching, or
//! that the replica *leading* the group will take into its next call, are waited for
//! (`shared_wait`, woken by pub/sub with polling as the fallback, never past the caller's
//! deadline); the rest are claimed and fetched here (`miss`), through the local engine as
//! before. The leader's call, just before it leaves, takes what the others wait for
//! ([`Fleet::take`]); its answer is stored for everyone ([`Fleet::store`]). Claims and
//! leases expire after the upstream timeout, so a replica that dies holding one delays
//! its group by at most that.
//!
//! Redis is never load-bearing: a call that fails or takes longer than [`CALL_TIMEOUT`]
//! is abandoned for that request, which then behaves as a lone replica would; after a
//! failure, or [`SLOW_STREAK`](crate::redis_tier::SLOW_STREAK) calls in a row that took too
//! long (a hung or slowed Redis), the tier is skipped for [`RETRY_AFTER_FAILURE`], and
//! `receipt_gateway_fleet_backend_up` says which state it is in. The connection is the
//! process's one [`RedisTier`] (docs/design.md#redis-connections).
//!
//! May import: `cache`, `engine` (batch outcomes), `config`, `redis_tier`, `telemetry`, `tencent`. Imported by
//! `upstream` (a batch takes and shares through it) and `service` (a request's fleet
//! round).

pub mod scripts;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;
use tokio::time::Instant;

pub use scripts::Scripts;

use crate::cache::{KeptBy, Known, Page, ReadLog, ReceiptCache};
use crate::config::RedisConfig;
use crate::engine::batch::{Failure, Items};
use crate::redis_tier::{Health, Link, RedisTier, SLOW_STREAK};
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, GroupId, MsgSeq, Receipt};

/// The longest a request waits for one Redis round trip before going on alone.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(15);
/// The least time worth giving a Redis round trip: a call with less slack than this
/// leaves without asking Redis for other replicas' MsgSeqs.
pub const SHORTEST_CALL: Duration = Duration::from_millis(2);
/// After a Redis failure, how long the tier is skipped before it is tried again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// How often a waiting request looks again if no message came (a lost message, a
/// subscription being re-established).
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// What every replica must agree on for an app: the lifetimes that decide freshness
/// (by how an item is kept current) and how long a claim lasts.
#[derive(Clone, Copy, Debug)]
pub struct Agreed {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale: Duration,
    /// Claims and leases last this long (the upstream timeout plus the batch window).
    pub claim: Duration,
    /// How long a read keeps a message in its group's cohort.
    pub cohort_memory: Duration,
    /// How far below a call's highest MsgSeq its neighbourhood reaches (`batch.max_seqs`).
    pub neighbourhood: usize,
    /// How long items kept current by callbacks are fresh (`cache.callback_ttl_ms`).
    pub callback_ttl: Duration,
    /// What keeps the app's fetched items current (`apps.callbacks`).
    pub fetched: KeptBy,
}

impl Agreed {
    /// How long a group's items stay in Redis after its last write: past the stale
    /// window of the longest-lived.
    fn keep(&self) -> Duration {
        self.ttl.max(self.negative_ttl).max(self.callback_ttl) + self.stale
    }

    /// How long an item is fresh after it was fetched.
    pub fn fresh_for(&self, receipt: &Receipt, kept_by: KeptBy) -> Duration {
        kept_by.fresh_for(receipt, self.ttl, self.negative_ttl, self.callback_ttl)
    }
}

/// One item as another replica stored it, its fetch time translated to this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedItem {
    pub receipt: Receipt,
    pub fetched_at: Instant,
    pub fresh: bool,
    pub kept_by: KeptBy,
}

/// What Redis said about a request's misses.
#[derive(Debug, Default)]
pub struct Claim {
    /// A group-level answer (10010 / 10015) someone cached: answer every MsgSeq with it.
    pub group: Option<(ErrorCode, String, Instant)>,
    /// Items Redis holds (fresh or not), by MsgSeq.
    pub items: Vec<(MsgSeq, SharedItem)>,
    /// Claimed for this replica: fetch them here.
    pub mine: Vec<MsgSeq>,
    /// Fetched (or about to be) by another replica: wait, then ask again.
    pub wait: Vec<MsgSeq>,
    /// When a claim or lease that blocks `wait` expires, at the latest.
    pub retry_at: Option<Instant>,
}

/// What a leaving call took from Redis.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// MsgSeqs other replicas' callers wait for.
    pub wanted: Vec<MsgSeq>,
    /// The fleet's cohort and the group's neighbourhood, which nobody asked for.
    pub added: Vec<MsgSeq>,
}

/// Why the tier could not answer: the request goes on alone.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {} ms", CALL_TIMEOUT.as_millis())]
    Timeout,
    #[error("skipped after a recent failure")]
    Down,
    #[error("unexpected reply from a fleet script")]
    Reply,
}

/// Where L1 misses went (`receipt_gateway_fleet_items_total{source}`), per app.
#[derive(Clone)]
pub struct FleetCounters {
    pub shared_hit: IntCounter,
    pub shared_wait: IntCounter,
    pub miss: IntCounter,
}

/// The fleet tier as one app uses it: the shared [`Fleet`], the app's counters, and the
/// lifetimes every replica must agree on (replaced by a reload).
pub struct SharedTier {
    pub fleet: Arc<Fleet>,
    pub counters: FleetCounters,
    lifetimes: std::sync::Mutex<Agreed>,
}

impl SharedTier {
    pub fn new(fleet: Arc<Fleet>, counters: FleetCounters, lifetimes: Agreed) -> Self {
        Self { fleet, counters, lifetimes: std::sync::Mutex::new(lifetimes) }
    }

    /// The lifetimes every replica must agree on, now.
    pub fn lifetimes(&self) -> Agreed {
        *self.lifetimes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reload's lifetimes, for what is shared from now on.
    pub fn set_lifetimes(&self, lifetimes: Agreed) {
        *self.lifetimes.lock().unwrap_or_else(|p| p.into_inner()) = lifetimes;
    }
}

/// The shared tier of one gateway process, for all its apps. Cheap to share (`Arc`).
pub struct Fleet {
    tier: Arc<RedisTier>,
    scripts: Scripts,
    prefix: String,
    /// This replica's name in claims and leases: random per process.
    me: String,
    channel: String,
    /// Where callbacks' items go to every replica (see [`Fleet::callback`]).
    callbacks_channel: String,
    /// Up, or marked down (unreachable, hung, too slow); its outage logged when it starts
    /// and ends, not per failed call.
    health: Health,
    /// Requests waiting on another replica's answer, by `<app>:<group>`.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Fleet {
    pub fn new(config: &RedisConfig, tier: Arc<RedisTier>, up: IntGauge) -> Self {
        let scripts = Scripts::new();
        tier.preload(scripts.all());
        Self {
            tier,
            scripts,
            prefix: config.key_prefix.clone(),
            me: format!("{:016x}", rand::random::<u64>()),
            channel: format!("{}:fleet:stored", config.key_prefix),
            callbacks_channel: format!("{}:fleet:callbacks", config.key_prefix),
            health: Health::new(up, RETRY_AFTER_FAILURE),
            waiters: Mutex::new(HashMap::new()),
        }
    }

    /// The keys of one group: items, inflight, lease, wanted, group answer, reads.
    fn keys(&self, app: AppId, group: &GroupId) -> [String; 6] {
        let base = group_key(&self.prefix, app, group);
        ["items", "inflight", "lease", "wanted", "group", "reads"].map(|k| format!("{base}:{k}"))
    }

    /// Asks Redis about `misses` of `group` and claims what nobody fetches.
    pub async fn claim(
        &self,
        app: AppId,
        group: &GroupId,
        misses: &[MsgSeq],
        lifetimes: Agreed,
    ) -> Result<Claim, FleetError> {
        let keys = self.keys(app, group);
        let mut call = self.scripts.claim.prepare_invoke();
        call.key(&keys[..5]);
        call.arg(&self.me).arg(ms(lifetimes.ttl)).arg(ms(lifetimes.negative_ttl)).arg(ms(lifetimes.claim));
        call.arg(misses.len()).arg(misses.iter().map(|s| s.0).collect::<Vec<_>>());
        let reply: Vec<redis::Value> =
            self.run("claim", |mut c| async move { call.invoke_async(&mut c).await }).await?;
        decode_claim(&reply, misses, Instant::now()).ok_or(FleetError::Reply)
    }

    /// Just before the leader's call for `group` leaves with `seqs`: renews their claims
    /// and takes up to `room` MsgSeqs other replicas wait for, then of the fleet's cohort
    /// and the group's neighbourhood.
    pub async fn take(
        &self,
        app: AppId,
        group: &GroupId,
        seqs: &[MsgSeq],
        room: usize,
        lifetimes: Agreed,
    ) -> Result<Taken, FleetError> {
        let keys = self.keys(app, group);
        let mut call = self.scripts.take.prepare_invoke();
        call.key(&keys[..4]).key(&keys[5]);
        call.arg(&self.me).arg(ms(lifetimes.ttl)).arg(ms(lifetimes.negative_ttl)).arg(ms(lifetimes.claim));
        call.arg(room).arg(ms(lifetimes.cohort_memory)).arg(lifetimes.neighbourhood);
        call.arg(seqs.iter().map(|s| s.0).collect::<Vec<_>>());
        let reply: Vec<u64> = self.run("take", |mut c| async move { call.invoke_async(&mut c).await }).await?;
        let (&wanted, taken) = reply.split_first().ok_or(FleetError::Reply)?;
        let wanted = usize::try_from(wanted).unwrap_or(usize::MAX).min(taken.len());
        let (wanted, added) = taken.split_at(wanted);
        Ok(Taken {
            wanted: wanted.iter().copied().map(MsgSeq).collect(),
            added: added.iter().copied().map(MsgSeq).collect(),
        })
    }

    /// A call's outcome (`items` sorted, answered at `fetched_at`): stores the answers,
    /// releases every claim of the call, and wakes the replicas waiting for the group.
    pub async fn store(
        &self,
        app: AppId,
        group: &GroupId,
        items: &Items,
        fetched_at: Instant,
        lifetimes: Agreed,
    ) -> Result<(), FleetError> {
        let keys = self.keys(app, group);
        let mut stored = Vec::new();
        let mut released = Vec::new();
        let mut group_answer = String::new();
        for (seq, result) in items {
            match result {
                Ok(receipt) => stored.push((seq.0, encode(receipt, lifetimes.fetched, lifetimes))),
                Err(Failure::Group { code, info })
                    if matches!(*code, ErrorCode::GROUP_NOT_FOUND | ErrorCode::GROUP_INVALID) =>
                {
                    group_answer = format!("{code},{info}");
                    released.push(seq.0);
                }
                Err(_) => released.push(seq.0),
            }
        }
        let mut call = self.scripts.store.prepare_invoke();
        call.key(&keys[..5]);
        call.arg(&self.me).arg(ms(fetched_at.elapsed())).arg(ms(lifetimes.keep()));
        call.arg(&self.channel).arg(waiter_key(app, group));
        call.arg(group_answer).arg(ms(lifetimes.negative_ttl));
        call.arg(stored.len());
        for (seq, value) in &stored {
            call.arg(seq).arg(value);
        }
        call.arg(released);
        let _: i64 = self.run("store", |mut c| async move { call.invoke_async(&mut c).await }).await?;
        Ok(())
    }

    /// A callback's items for `group` (each known as of its `fetched_at`): stored in
    /// Redis unless it holds newer ones, and sent to every replica's own cache, so that
    /// every replica answers with them at once (docs/design.md#callbacks, #fleet-tier).
    pub async fn callback(
        &self,
        app: AppId,
        group: &GroupId,
        items: &[Known],
        lifetimes: Agreed,
    ) -> Result<(), FleetError> {
        let now = Instant::now();
        let age = |a: &Known| ms(now.saturating_duration_since(a.fetched_at));
        let message = CallbackMessage {
            from: self.me.clone(),
            app: app.0,
            group: group.as_str().to_owned(),
            items: items
                .iter()
                .map(|a| (a.seq.0, age(a), a.receipt.code.0, a.receipt.read, a.receipt.unread))
                .collect(),
        };
        let Ok(message) = serde_json::to_string(&message) else { return Err(FleetError::Reply) };
        let keys = self.keys(app, group);
        let mut call = self.scripts.callback.prepare_invoke();
        call.key(&keys[0]).arg(ms(lifetimes.keep())).arg(&self.channel).arg(waiter_key(app, group));
        call.arg(&self.callbacks_channel).arg(message);
        for a in items {
            call.arg(a.seq.0).arg(age(a)).arg(encode(&a.receipt, KeptBy::Callbacks, lifetimes));
        }
        let _: i64 = self.run("callback", |mut c| async move { call.invoke_async(&mut c).await }).await?;
        Ok(())
    }

    /// Puts another replica's callback items in this replica's cache.
    async fn take_callback(&self, payload: &str, cache: &ReceiptCache) {
        let Ok(message) = serde_json::from_str::<CallbackMessage>(payload) else {
            return tracing::debug!("fleet: unreadable callback message");
        };
        let Ok(group) = GroupId::parse(&message.group) else { return };
        if message.from == self.me {
            return;
        }
        let now = Instant::now();
        let answers = message.items.iter().map(|&(seq, age_ms, code, read, unread)| Known {
            seq: MsgSeq(seq),
            receipt: Receipt { code: ErrorCode(code), read, unread },
            fetched_at: now.checked_sub(Duration::from_millis(age_ms)).unwrap_or(now),
            kept_by: KeptBy::Callbacks,
        });
        cache.insert_each(AppId(message.app), &group, answers.collect::<Vec<_>>()).await;
    }

    /// Gives up this replica's claims on `seqs` (its caller was refused): other replicas
    /// need not wait for them to expire.
    pub async fn release(&self, app: AppId, group: &GroupId, seqs: &[MsgSeq], lifetimes: Agreed) {
        let items: Items = seqs.iter().map(|&s| (s, Err(Failure::Expired))).collect();
        if let Err(e) = self.store(app, group, &items, Instant::now(), lifetimes).await {
            tracing::debug!(error = %e, "fleet: could not release claims");
        }
    }

    /// Waits until another replica stores an answer for `group`, `retry_at` (a blocking
    /// claim expires), [`POLL_EVERY`], or `deadline`, whichever comes first.
    pub async fn wait(&self, app: AppId, group: &GroupId, retry_at: Option<Instant>, deadline: Instant) {
        let key = waiter_key(app, group);
        let notify = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            waiters.entry(key.clone()).or_default().clone()
        };
        let until = retry_at.map_or(deadline, |t| t.min(deadline)).min(Instant::now() + POLL_EVERY);
        let _ = tokio::time::timeout_at(until, notify.notified()).await;
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // The map's own reference and ours: nobody else waits, so forget the group.
        if waiters.get(&key).is_some_and(|n| Arc::strong_count(n) <= 2) {
            waiters.remove(&key);
        }
    }

    /// Wakes the requests waiting on `message` (`<app>:<group>`), from the subscription.
    fn wake(&self, message: &str) {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(notify) = waiters.get(message) {
            notify.notify_waiters();
        }
    }

    /// Shares this replica's reads with the fleet every `every`, so that the replica
    /// leading a group refreshes what any replica read (docs/design.md#fleet-tier). Forever; owned
    /// and aborted by the gateway's task set.
    pub async fn share_reads(self: Arc<Self>, log: Arc<ReadLog>, every: Duration, keep: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since = Instant::now();
        loop {
            tick.tick().await;
            let now = Instant::now();
            let pages = log.drain();
            let writes = pages.iter().map(|page| self.write_reads(page, since, now, keep));
            for result in futures_util::future::join_all(writes).await {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "fleet: reads not shared");
                    break;
                }
            }
            since = now;
        }
    }

    async fn write_reads(&self, page: &Page, since: Instant, now: Instant, keep: Duration) -> Result<(), FleetError> {
        let reads = page.reads_since(since);
        if reads.is_empty() {
            return Ok(());
        }
        let (app, group) = page.key();
        let key = format!("{}:reads", group_key(&self.prefix, *app, group));
        let mut call = self.scripts.reads.prepare_invoke();
        call.key(key).arg(ms(keep));
        for (seq, at) in reads {
            call.arg(seq.0).arg(ms(now.saturating_duration_since(at)));
        }
        let _: i64 = self.run("reads", |mut c| async move { call.invoke_async(&mut c).await }).await?;
        Ok(())
    }

    /// Listens for stored answers, waking waiting requests, and for other replicas'
    /// callbacks, putting their items in `cache`; forever, reconnecting after a failure.
    /// Owned and aborted by the gateway's task set.
    pub async fn subscribe(self: Arc<Self>, cache: ReceiptCache) {
        use futures_util::StreamExt;
        loop {
            match self.tier.pubsub().await {
                Ok(mut pubsub) => {
                    let channels = [self.channel.as_str(), self.callbacks_channel.as_str()];
                    if pubsub.subscribe(&channels).await.is_ok() {
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            let Ok(payload) = message.get_payload::<String>() else { continue };
                            if message.get_channel_name() == self.callbacks_channel {
                                self.take_callback(&payload, &cache).await;
                            } else {
                                self.wake(&payload);
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "fleet: subscription failed"),
            }
            tokio::time::sleep(RETRY_AFTER_FAILURE).await;
        }
    }

    /// Runs one script call on the shared connection, within [`CALL_TIMEOUT`], keeping
    /// the up/down state: a failure, or a streak of calls that took too long, marks Redis
    /// down for [`RETRY_AFTER_FAILURE`].
    async fn run<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, FleetError>
    where
        F: FnOnce(Link) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.health.usable() {
            return Err(FleetError::Down);
        }
        match tokio::time::timeout(CALL_TIMEOUT, self.tier.call(op, call)).await {
            Err(_) => {
                self.tier.suspect();
                if self.health.slow() {
                    tracing::warn!(
                        slow_calls = SLOW_STREAK,
                        call_timeout_ms = CALL_TIMEOUT.as_millis() as u64,
                        "fleet: redis too slow (hung, or slower than the tier can use); each replica caches and batches on its own"
                    );
                }
                Err(FleetError::Timeout)
            }
            Ok(Ok(value)) => {
                if let Some(ended) = self.health.answered() {
                    tracing::info!(
                        failed_calls = ended.events,
                        lasted_ms = ended.lasted.as_millis() as u64,
                        "fleet: redis answers again; sharing items, fetches and batches"
                    );
                }
                Ok(value)
            }
            Ok(Err(e)) => {
                if self.health.failed() {
                    tracing::warn!(error = %e, "fleet: redis unreachable; each replica caches and batches on its own");
                }
                Err(e.into())
            }
        }
    }
}

/// A callback's items as sent to every replica; ages in ms, at the time of sending.
#[derive(serde::Serialize, serde::Deserialize)]
struct CallbackMessage {
    /// The replica that took the callback (and has the items already).
    from: String,
    app: u64,
    group: String,
    items: Vec<SentItem>,
}

/// One item of a [`CallbackMessage`]: MsgSeq, age_ms, code, read, unread.
type SentItem = (u64, u64, i64, Option<u64>, Option<u64>);

/// `<prefix>:{<app>:<group>}`: every key of a group shares the `{…}` hash tag, and so one
/// Redis Cluster slot.
pub fn group_key(prefix: &str, app: AppId, group: &GroupId) -> String {
    format!("{prefix}:{{{app}:{group}}}")
}

/// The pub/sub message (and waiter key) of a group.
fn waiter_key(app: AppId, group: &GroupId) -> String {
    format!("{app}:{group}")
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// `code,read,unread`, the counts empty when absent; then, for an item kept current by
/// callbacks, `,c<fresh_ms>`: every replica (and script) reads its kept_by from it.
fn encode(r: &Receipt, kept_by: KeptBy, lifetimes: Agreed) -> String {
    let count = |c: Option<u64>| c.map(|n| n.to_string()).unwrap_or_default();
    let kept = match kept_by {
        KeptBy::Polling => String::new(),
        KeptBy::Callbacks => format!(",c{}", ms(lifetimes.callback_ttl)),
    };
    format!("{},{},{}{kept}", r.code, count(r.read), count(r.unread))
}

/// `fetched_ms,code,read,unread[,c<fresh_ms>]` → the receipt, its fetch time in Redis ms
/// and what keeps it current.
fn decode(value: &str) -> Option<(u64, Receipt, KeptBy)> {
    let (value, kept_by) = match value.rsplit_once(",c") {
        Some((rest, life)) if life.parse::<u64>().is_ok() => (rest, KeptBy::Callbacks),
        _ => (value, KeptBy::Polling),
    };
    let mut parts = value.split(',');
    let fetched = parts.next()?.parse().ok()?;
    let code = ErrorCode(parts.next()?.parse().ok()?);
    let count = |p: Option<&str>| -> Option<Option<u64>> {
        match p? {
            "" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    let read = count(parts.next())?;
    let unread = count(parts.next())?;
    if parts.next().is_some() {
        return None;
    }
    Some((fetched, Receipt { code, read, unread }, kept_by))
}

fn text(v: &redis::Value) -> Option<String> {
    redis::from_redis_value::<String>(v.clone()).ok()
}

fn int(v: &redis::Value) -> Option<u64> {
    redis::from_redis_value::<u64>(v.clone()).ok()
}

/// Reads the claim script's reply (see `scripts::CLAIM`); Redis ms become instants
/// relative to `now` (the reply's own time is Redis's now).
pub fn decode_claim(reply: &[redis::Value], misses: &[MsgSeq], now: Instant) -> Option<Claim> {
    let redis_now = int(reply.first()?)?;
    let at = |ms: u64| now.checked_sub(Duration::from_millis(redis_now.saturating_sub(ms))).unwrap_or(now);
    let answer = text(reply.get(1)?)?;
    if !answer.is_empty() {
        let mut parts = answer.splitn(3, ',');
        let fetched = parts.next()?.parse().ok()?;
        let code = ErrorCode(parts.next()?.parse().ok()?);
        let info = parts.next().unwrap_or_default().to_owned();
        return Some(Claim { group: Some((code, info, at(fetched))), ..Claim::default() });
    }
    let roles = text(reply.get(2 + misses.len())?)?;
    let retry = int(reply.get(3 + misses.len())?)?;
    let mut claim = Claim {
        retry_at: (retry > 0).then(|| now + Duration::from_millis(retry.saturating_sub(redis_now))),
        ..Claim::default()
    };
    for (i, (&seq, role)) in misses.iter().zip(roles.bytes()).enumerate() {
        if let Some((fetched, receipt, kept_by)) = text(reply.get(2 + i)?).as_deref().and_then(decode) {
            let item = SharedItem { receipt, fetched_at: at(fetched), fresh: role == b'f', kept_by };
            claim.items.push((seq, item));
        }
        match role {
            b'm' => claim.mine.push(seq),
            b'w' => claim.wait.push(seq),
            _ => {}
        }
    }
    Some(claim)
}

#[cfg(test)]
mod tests;
