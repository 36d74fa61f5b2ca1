//! The upstream call budget of one (app, API) (docs/design.md#budget-and-dispatch): where tokens
//! come from, and how fast they are handed out.
//!
//! The invariant: calls stay at or below `budget.per_second` in *every* rolling second,
//! retries included. Tokens are paced (GCRA) at `(1 s + GUARD) / per_second` (and at low
//! rates with at least one whole token spare), so a second holds a few tokens fewer than
//! `per_second`: a scheduling hiccup that bunches calls on their way to Tencent still
//! cannot put `per_second + 1` of them into one second of Tencent's clock. A token taken
//! up to about a millisecond late keeps its place in the schedule (see [`tolerance`]), so
//! timer lateness costs no rate.
//!
//! Tokens come from an in-process governor limiter (`backend = "local"`) or from one
//! GCRA state in Redis shared by every replica (`backend = "redis"`), taken a few at a
//! time ahead of need ([`lease`]) so that tokens do not wait on Redis round trips; while
//! Redis cannot be reached, or answers slower than [`REDIS_CALL_TIMEOUT`] (hung, or too
//! far for leases to keep up), a replica paces itself on `fallback_per_second` instead,
//! never unlimited. After the tier follows a Sentinel failover, each replica also holds
//! to its fallback for [`FAILOVER_WINDOW`], its tokens still counted in the new master's
//! state: the promoted replica may have missed the last grants
//! (docs/design.md#redis-connections).
//!
//! On top of that hard limit sits the *effective rate*: throttling answers from Tencent
//! halve it, and it recovers linearly to the full rate over `RECOVERY`.
//!
//! Which waiting call gets the next token is not decided here but by the dispatcher
//! (the engine's dispatcher), the only caller of [`Budget::acquire`] for its (app, API).
//!
//! May import: `config`, `redis_tier`, `telemetry`. Imported by `engine` (the dispatcher), `upstream` (the send-time
//! check, throttling) and `service` (admission's pace).

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus::{Gauge, IntGauge};
use tokio::time::Instant;

use self::lease::{Lease, Next};
use crate::config::{BudgetBackend, BudgetConfig};
use crate::redis_tier::RedisTier;
use crate::telemetry::episode::Episode;

/// Slack added to every second of budget, absorbing delivery jitter (see module docs).
pub const GUARD: Duration = Duration::from_millis(30);
/// Time for the effective rate to climb back from its floor to the full rate.
const RECOVERY: Duration = Duration::from_secs(20);
/// Throttling answers closer together than this count as one (they were in flight at once).
const DECREASE_HOLDOFF: Duration = Duration::from_secs(1);
/// After a Redis failure, how long a replica stays on its fallback before trying again.
const REDIS_RETRY: Duration = Duration::from_secs(1);
/// A budget call to Redis slower than this counts as a failure: Redis is hung, or too
/// slow for the budget to be spent through it. Leases reach 1 s ahead at most
/// ([`lease`]): a round trip of up to about half that still spends the whole budget.
pub const REDIS_CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failover, how long each replica stays on `fallback_per_second`: one budget
/// window, the rolling second the promoted master's state may be missing grants of.
pub const FAILOVER_WINDOW: Duration = Duration::from_secs(1);
/// The least share of the budget admission assumes a replica gets, however busy the
/// others look (their rate is an estimate; a replica must still be able to admit).
const MIN_SHARE: f64 = 0.05;
/// Two grants further apart than this say nothing about the others' rate now.
const OTHERS_HORIZON: Duration = Duration::from_secs(2);
/// The estimate of the others' rate is an average over about this much of the recent
/// past, however often this replica takes tokens (see [`Others::grant`]).
const OTHERS_MEMORY: Duration = Duration::from_millis(250);

/// The interval between tokens that keeps `per_second` in every rolling second: the
/// guard's slack, and at low rates (where 30 ms is less than one token) at least one
/// whole token of slack.
pub fn pacing_interval(per_second: NonZeroU32) -> Duration {
    let guarded = (Duration::from_secs(1) + GUARD) / per_second.get();
    match per_second.get() - 1 {
        0 => guarded,
        // `fewer` calls must span a second plus the most lateness `tolerance` forgives.
        fewer => guarded.max((Duration::from_secs(1) + LATENESS) / fewer),
    }
}

/// How late a token may be taken without the lateness being lost. The dispatcher's
/// timers wake a little late; GCRA without tolerance then restarts the schedule from the
/// late instant and loses that time on every token (measured: 189.8 instead of 194
/// calls/s at 200/s; with 1 ms of tolerance, rolling seconds still dipped to 189). Up to
/// `BURST_ABOVE` calls a second the tolerance is up to `LATENESS`, which the guard's
/// slack covers, so no rolling second gains a call from it. Above that, intervals approach timer
/// granularity, and half the guard's slack, in whole tokens, becomes the tolerance.
pub fn tolerance(per_second: NonZeroU32) -> Duration {
    let interval = pacing_interval(per_second);
    if per_second.get() <= BURST_ABOVE {
        let cell = interval / cells(per_second);
        return cell * (LATENESS.as_nanos() / cell.as_nanos().max(1)).max(1) as u32;
    }
    let in_a_second = 1_000_000_000u128.div_ceil(interval.as_nanos()) as u32;
    let slack = per_second.get().saturating_sub(in_a_second);
    interval * (slack / 2)
}

/// Rates above which the tolerance is counted in whole tokens.
const BURST_ABOVE: u32 = 1000;

/// The most lateness forgiven at rates up to [`BURST_ABOVE`].
const LATENESS: Duration = Duration::from_millis(3);
/// governor counts whole cells, so a call takes `cells` cells of about this size, and the
/// tolerance is a few cells of burst.
const CELL: Duration = Duration::from_micros(500);

fn cells(per_second: NonZeroU32) -> u32 {
    let per_cell = pacing_interval(per_second).as_nanos() / CELL.as_nanos();
    if per_second.get() > BURST_ABOVE { 1 } else { per_cell.clamp(1, 1_000_000) as u32 }
}

/// The governor quota for `per_second`, and how many cells one call takes from it.
fn quota(per_second: NonZeroU32) -> (Quota, NonZeroU32) {
    let cells = NonZeroU32::new(cells(per_second)).unwrap_or(NonZeroU32::MIN);
    let cell = pacing_interval(per_second) / cells.get();
    let tolerance_cells = (tolerance(per_second).as_nanos() / cell.as_nanos().max(1)) as u32;
    let burst = NonZeroU32::new(cells.get() + tolerance_cells).unwrap_or(cells);
    // `with_period` only refuses a zero period, and a cell is about 1 µs even at the
    // highest configurable rate (1,000,000/s); the fallback still paces at one call per
    // second.
    let quota = Quota::with_period(cell).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst);
    (quota, cells)
}

/// A local limiter for `per_second`, and how many cells one call takes from it.
fn limiter(per_second: NonZeroU32) -> (DefaultDirectRateLimiter, NonZeroU32) {
    let (quota, cells) = quota(per_second);
    (RateLimiter::direct(quota), cells)
}

/// Waits until `limiter` grants one call's cells.
async fn take(limiter: &(DefaultDirectRateLimiter, NonZeroU32)) {
    // The burst always holds a call's cells, so capacity cannot be insufficient; if it
    // were, one cell still paces calls rather than letting them through unpaced.
    if limiter.0.until_n_ready(limiter.1).await.is_err() {
        limiter.0.until_ready().await;
    }
}

/// Empties `limiter`'s saved-up burst, so that its next grant is one interval away.
fn drain(limiter: &(DefaultDirectRateLimiter, NonZeroU32)) {
    while limiter.0.check_n(limiter.1).is_ok_and(|granted| granted.is_ok()) {}
}

/// A forecast of token hand-outs, for admission control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Until the next token.
    pub next_token: Duration,
    /// Between tokens after that.
    pub interval: Duration,
}

/// One (app, API)'s budget.
pub struct Budget {
    source: Source,
    /// Replaced whole by a reload ([`Budget::set_rates`]).
    rates: Mutex<Arc<Rates>>,
    state: Mutex<Pace>,
    rate_gauge: Gauge,
    /// When this gateway's calls of the last second were sent ([`Budget::before_send`]).
    sent: Mutex<VecDeque<Instant>>,
    /// The throttling under way, logged when it starts and when the rate is back.
    throttling: Episode,
}

/// One call in this many of a second is kept free at the moment of sending, for the
/// jitter between our clock and Tencent's ([`Budget::before_send`]); below 100 calls a
/// second, pacing's own spare token is the slack.
const SEND_SLACK_PER: u32 = 100;

enum Source {
    Local,
    Redis(Arc<RedisSource>),
}

/// What follows from `per_second` and `fallback_per_second`: the local limiters and the
/// GCRA parameters.
struct Rates {
    per_second: NonZeroU32,
    /// The limiter with `backend = "local"`.
    local: (DefaultDirectRateLimiter, NonZeroU32),
    /// GCRA in Redis, in µs. Rounded up: rounding down would eat the guard at very high
    /// rates.
    interval_us: u64,
    tolerance_us: u64,
    /// While Redis is down.
    fallback: (DefaultDirectRateLimiter, NonZeroU32),
    fallback_interval: Duration,
}

impl Rates {
    fn new(per_second: NonZeroU32, fallback_per_second: NonZeroU32) -> Self {
        Self {
            per_second,
            local: limiter(per_second),
            interval_us: pacing_interval(per_second).as_nanos().div_ceil(1000) as u64,
            tolerance_us: tolerance(per_second).as_micros() as u64,
            fallback: limiter(fallback_per_second),
            fallback_interval: pacing_interval(fallback_per_second),
        }
    }
}

/// Effective-rate bookkeeping (AIMD) and the pacing slot it implies.
struct Pace {
    rate: f64,
    updated: Instant,
    last_decrease: Option<Instant>,
    next_slot: Instant,
}

impl Budget {
    /// `key` names this budget in Redis (e.g. `<prefix>:<sdkappid>:<api>`); `rate_gauge`
    /// shows its effective rate, `backend_up` whether its Redis answers; `redis` is the
    /// process's Redis connection (needed with `backend = "redis"`).
    pub fn new(
        config: &BudgetConfig,
        key: String,
        rate_gauge: Gauge,
        backend_up: IntGauge,
        redis: Option<&Arc<RedisTier>>,
    ) -> Result<Self, redis::RedisError> {
        let per_second = config.per_second;
        let source = match (&config.backend, redis) {
            (BudgetBackend::Local, _) => Source::Local,
            (BudgetBackend::Redis { .. }, None) => {
                return Err(redis::RedisError::from(std::io::Error::other(
                    "budget.backend = \"redis\" without [redis]",
                )));
            }
            (BudgetBackend::Redis { key_prefix }, Some(tier)) => Source::Redis(Arc::new(RedisSource {
                tier: tier.clone(),
                script: redis::Script::new(GCRA),
                key: format!("{key_prefix}:{key}"),
                down_until: Mutex::new(None),
                up: backend_up,
                outage: Episode::default(),
                others: Mutex::new(Others::default()),
                lease: Mutex::new(Lease::default()),
                answered: tokio::sync::Notify::new(),
            })),
        };
        rate_gauge.set(per_second.get() as f64);
        let now = Instant::now();
        Ok(Self {
            source,
            rates: Mutex::new(Arc::new(Rates::new(per_second, config.fallback_per_second))),
            state: Mutex::new(Pace {
                rate: per_second.get() as f64,
                updated: now,
                last_decrease: None,
                next_slot: now,
            }),
            rate_gauge,
            throttling: Episode::default(),
            sent: Mutex::new(VecDeque::new()),
        })
    }

    /// Called just before a paid call is sent: waits, if need be, until it leaves at most
    /// `per_second` less one in [`SEND_SLACK_PER`] calls in the rolling second that ends with it, by the
    /// time they were sent. Pacing keeps calls well below that when each is sent as its
    /// token is taken; but on a busy machine a call's task can start late and go out in a
    /// bunch with the next ones (measured: 201-203 calls in one second of the simulator's
    /// clock in the debug-build burst test), and this is the last point before the wire.
    /// Per replica: with the Redis budget the fleet's pacing is Redis's alone.
    ///
    /// Returns the send instant it recorded, which the call carries upstream
    /// ([`SENT_AT_HEADER`](crate::tencent::wire::SENT_AT_HEADER)).
    pub async fn before_send(&self) -> Instant {
        let per_second = self.per_second().get();
        let most = (per_second - per_second / SEND_SLACK_PER) as usize;
        loop {
            let wait = {
                let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                while sent.front().is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(1)) {
                    sent.pop_front();
                }
                // A reload may have lowered the rate: only the newest `most` matter.
                while sent.len() > most {
                    sent.pop_front();
                }
                match sent.front() {
                    Some(oldest) if sent.len() == most => *oldest + Duration::from_secs(1) - now,
                    _ => {
                        sent.push_back(now);
                        return now;
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn rates(&self) -> Arc<Rates> {
        self.rates.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn per_second(&self) -> NonZeroU32 {
        self.rates().per_second
    }

    /// A reloaded `budget.per_second` and `fallback_per_second` (the backend is not
    /// reloaded). The limit applies from the next token; with Redis, the fleet's GCRA
    /// state carries over, so the fleet stays within the new limit at once; a local
    /// limiter starts afresh, so a lowered limit holds in every rolling second from one
    /// second after the reload. The effective rate starts at the new limit.
    pub fn set_rates(&self, per_second: NonZeroU32, fallback_per_second: NonZeroU32) {
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        *rates = Arc::new(Rates::new(per_second, fallback_per_second));
        drop(rates);
        if let Source::Redis(redis) = &self.source {
            redis.lease().clear();
        }
        let rate = self.pace(|p| {
            p.rate = per_second.get() as f64;
            p.rate
        });
        self.rate_gauge.set(rate);
    }

    /// Waits for the next token. Only the dispatcher calls this, one call at a time.
    pub async fn acquire(&self) {
        let rates = self.rates();
        let (slot, throttled) = self.pace(|p| (p.next_slot, p.rate < rates.per_second.get() as f64));
        if throttled {
            // Below the full rate, space tokens out ourselves; the hard limit still applies.
            tokio::time::sleep_until(slot).await;
        }
        match &self.source {
            Source::Local => take(&rates.local).await,
            Source::Redis(redis) => redis.acquire(&rates).await,
        }
        let interval = self.interval();
        self.pace(|p| p.next_slot = Instant::now() + interval);
    }

    /// When this replica expects to hand out tokens: the next one, then one per interval.
    /// Admission control plans with it. With Redis, the interval is this replica's share
    /// of what the other replicas leave of the effective rate: admission counts the
    /// tokens the other replicas take (docs/design.md#budget-and-dispatch).
    pub fn estimate(&self) -> Estimate {
        let next_slot = self.pace(|p| p.next_slot);
        let interval = match &self.source {
            Source::Redis(redis) if !redis.is_down() => {
                let rate = self.effective_rate();
                let left = (rate - redis.others_rate()).max(rate * MIN_SHARE);
                self.interval().max(Duration::from_secs_f64(1.0 / left.max(0.1)))
            }
            _ => self.interval(),
        };
        Estimate { next_token: next_slot.saturating_duration_since(Instant::now()), interval }
    }

    /// Whether other replicas are spending the shared budget now, so that a token taken
    /// here for work nobody waits for (a background batch) would be taken from them.
    pub fn contended(&self) -> bool {
        match &self.source {
            Source::Redis(redis) => redis.others_rate() > self.per_second().get() as f64 * MIN_SHARE,
            Source::Local => false,
        }
    }

    /// The time between tokens at the current effective rate (never shorter than the
    /// hard limit's pacing).
    pub fn interval(&self) -> Duration {
        let rate = self.effective_rate();
        let rates = self.rates();
        let hard = match &self.source {
            Source::Redis(redis) if redis.is_down() || redis.after_failover() => rates.fallback_interval,
            _ => pacing_interval(rates.per_second),
        };
        hard.max(Duration::from_secs_f64(1.0 / rate.max(0.1)))
    }

    /// Calls per second currently allowed.
    pub fn effective_rate(&self) -> f64 {
        self.pace(|p| p.rate)
    }

    /// Tencent said "slow down": halve the effective rate (once per burst of answers).
    pub fn throttled(&self) {
        let rate = self.pace(|p| {
            let now = Instant::now();
            if p.last_decrease.is_some_and(|t| now.duration_since(t) < DECREASE_HOLDOFF) {
                return p.rate;
            }
            p.last_decrease = Some(now);
            p.rate = (p.rate / 2.0).max(1.0);
            p.rate
        });
        self.rate_gauge.set(rate);
        if self.throttling.event() {
            tracing::warn!(effective_rate = rate, "upstream throttled; lowering the effective rate");
        }
    }

    /// Runs `f` on the pacing state after applying recovery up to now.
    fn pace<T>(&self, f: impl FnOnce(&mut Pace) -> T) -> T {
        let max = self.per_second().get() as f64;
        let mut p = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let mut recovered = false;
        if p.rate < max {
            let dt = now.duration_since(p.updated).as_secs_f64();
            p.rate = (p.rate + max * dt / RECOVERY.as_secs_f64()).min(max);
            self.rate_gauge.set(p.rate);
            recovered = p.rate >= max;
        }
        p.updated = now;
        let out = f(&mut p);
        drop(p);
        if recovered && let Some(ended) = self.throttling.end() {
            tracing::info!(
                throttled_answers = ended.events,
                lasted_ms = ended.lasted.as_millis() as u64,
                "effective rate back to budget.per_second"
            );
        }
        out
    }
}

/// GCRA in Redis, with Redis's own clock so replicas need not agree on time, taking a
/// lease of several grants at once (docs/design.md#leases). ARGV: the interval and the
/// burst tolerance in µs, how many grants at most, and the horizon in µs: no grant lies
/// further than that ahead of Redis's clock. The key holds `tat:grants`, the theoretical
/// arrival time and a count of every token the fleet took (the format of one grant per
/// call, so replicas of either kind can share a key during a rolling update). Returns
/// {µs to wait before a grant lies within the horizon (0 when granted), grants, then each
/// grant's instant in µs after Redis's clock}; the count tells a replica how many tokens
/// the others took between two of its calls. With one grant and no horizon this is the
/// GCRA of one token per call.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3]) or 1
local horizon = tonumber(ARGV[4]) or 0
local tat, grants = 0, 0
local held = redis.call('GET', KEYS[1])
if held then
  local a, b = string.match(held, '^([%d.e+]+):?(%d*)$')
  tat = tonumber(a) or 0
  grants = tonumber(b) or 0
end
local out = {0, grants}
while #out - 2 < want do
  local at = math.max(tat - tolerance, now)
  if at - now > horizon then
    break
  end
  tat = math.max(tat, at) + interval
  grants = grants + 1
  out[#out + 1] = at - now
end
if #out == 2 then
  out[1] = math.max(tat - tolerance, now) - now - horizon
  return out
end
out[2] = grants
local next = string.format('%.0f', tat) .. ':' .. string.format('%.0f', grants)
redis.call('SET', KEYS[1], next, 'PX', math.floor((tat - now) / 1000) + 1000)
return out
"#;

/// What this replica knows of the other replicas' use of the shared budget.
#[derive(Default)]
struct Others {
    /// The fleet's grant count at this replica's last token, and when.
    last: Option<(u64, Instant)>,
    /// Tokens per second the others took, smoothed.
    rate: f64,
    sampled: Option<Instant>,
}

impl Others {
    /// This replica took `taken` tokens in one lease, the last the fleet's `grants`-th: the
    /// others took the rest of the grants since its last lease. The sample weighs by the
    /// time it covers, so the estimate follows the others' calls within about
    /// [`OTHERS_MEMORY`] whatever this replica's own pace: its leases a few milliseconds
    /// apart (each sample a few grants of the others) average out, and one half a second
    /// after the last is mostly what the others take now. With a fixed weight of a quarter per sample, a replica taking a
    /// token every half second — one that refuses most of its callers — went on seeing
    /// for seconds the rate another had drained a backlog at (140/s half a second after
    /// the others went from 180/s to 18/s; see the budget's tests), and planned with what
    /// that left it.
    fn grant(&mut self, grants: u64, taken: u64, now: Instant) {
        if let Some((before, at)) = self.last {
            let dt = now.saturating_duration_since(at);
            // A smaller count: the key expired (the fleet was idle) and started over.
            if dt <= OTHERS_HORIZON && grants > before && !dt.is_zero() {
                let sample = grants.saturating_sub(before + taken) as f64 / dt.as_secs_f64();
                let fresh = self.sampled.is_some_and(|t| now.saturating_duration_since(t) <= OTHERS_HORIZON);
                let weight = 1.0 - (-dt.as_secs_f64() / OTHERS_MEMORY.as_secs_f64()).exp();
                self.rate = if fresh { self.rate + (sample - self.rate) * weight } else { sample };
                self.sampled = Some(now);
            }
        }
        self.last = Some((grants, now));
    }

    fn rate(&self, now: Instant) -> f64 {
        match self.sampled {
            Some(t) if now.saturating_duration_since(t) <= OTHERS_HORIZON => self.rate,
            _ => 0.0,
        }
    }
}

struct RedisSource {
    /// The process's Redis connection, shared with the fleet tier.
    tier: Arc<RedisTier>,
    /// The GCRA script, hashed once; sent by SHA and reloaded by the crate on NOSCRIPT.
    script: redis::Script,
    key: String,
    /// While set and in the future, tokens come from the fallback limiter without asking
    /// Redis.
    down_until: Mutex<Option<Instant>>,
    /// `receipt_gateway_budget_backend_up`: 1 after Redis answered, 0 after it failed.
    up: IntGauge,
    /// The outage under way, logged when it starts and ends, not per failed call.
    outage: Episode,
    others: Mutex<Others>,
    /// Grants taken from Redis ahead of need.
    lease: Mutex<Lease>,
    /// A script call ended (with grants, a wait, or an error).
    answered: tokio::sync::Notify,
}

/// The longest the dispatcher waits for a script call's end before looking again (the
/// connection's own timeouts end every call sooner).
const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// One answer of the script: the wait, the fleet's grant count and the grants' offsets.
type LeaseAnswer = (Duration, u64, Vec<Duration>);

impl RedisSource {
    fn is_down(&self) -> bool {
        self.down_until.lock().map(|d| d.is_some_and(|t| Instant::now() < t)).unwrap_or(false)
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Within [`FAILOVER_WINDOW`] of following a failover.
    fn after_failover(&self) -> bool {
        self.tier.switched_within(FAILOVER_WINDOW)
    }

    /// Hands out the next leased grant at its instant, asking Redis for more ahead of need
    /// in a task of its own; on the fallback while Redis is down, and paced by it as well
    /// for a window after a failover.
    async fn acquire(self: &Arc<Self>, rates: &Arc<Rates>) {
        if self.after_failover() && !self.is_down() {
            // Paced by the fallback, and still counted in the shared state below.
            take(&rates.fallback).await;
        }
        loop {
            if self.is_down() {
                return take(&rates.fallback).await;
            }
            let now = Instant::now();
            let (next, ask) = self.lease().next(now);
            if let Some(ask) = ask {
                let source = Arc::clone(self);
                let rates = Arc::clone(rates);
                tokio::spawn(async move { source.refill(&rates, ask.want, ask.horizon).await });
            }
            match next {
                Next::At(at) => {
                    tokio::time::sleep_until(at).await;
                    if self.lease().take(at, Instant::now()) {
                        return;
                    }
                }
                Next::Refilling => {
                    let _ = tokio::time::timeout(ANSWER_WAIT, self.answered.notified()).await;
                }
                Next::After(after) => {
                    let _ = tokio::time::timeout_at(after, self.answered.notified()).await;
                }
            }
        }
    }

    /// One script call for up to `want` grants within `horizon`; its answer goes into the
    /// lease, and the dispatcher is woken.
    async fn refill(&self, rates: &Rates, want: u32, horizon: Duration) {
        let sent = Instant::now();
        let answer = self.try_lease(rates, want, horizon).await;
        let received = Instant::now();
        self.up.set(answer.is_ok().into());
        if answer.is_ok()
            && let Some(ended) = self.outage.end()
        {
            tracing::info!(
                failed_calls = ended.events,
                lasted_ms = ended.lasted.as_millis() as u64,
                "redis budget answers again"
            );
        }
        match answer {
            Ok((wait, grants, offsets)) => {
                if !offsets.is_empty()
                    && let Ok(mut others) = self.others.lock()
                {
                    others.grant(grants, offsets.len() as u64, received);
                }
                self.lease().answered(sent, received, &offsets, wait);
            }
            Err(e) => {
                if self.outage.event() {
                    tracing::warn!(error = %e, "redis budget unreachable; pacing on budget.fallback_per_second");
                    // Coming off the shared budget, whose last second may be full:
                    // the fallback's first token waits one interval like the rest.
                    drain(&rates.fallback);
                }
                if let Ok(mut d) = self.down_until.lock() {
                    *d = Some(Instant::now() + REDIS_RETRY);
                }
                self.lease().failed();
            }
        }
        self.answered.notify_one();
    }

    /// Tokens per second the other replicas are taking, as last seen.
    fn others_rate(&self) -> f64 {
        self.others.lock().map(|o| o.rate(Instant::now())).unwrap_or(0.0)
    }

    async fn try_lease(&self, rates: &Rates, want: u32, horizon: Duration) -> redis::RedisResult<LeaseAnswer> {
        let mut call = self.script.key(&self.key);
        call.arg(rates.interval_us).arg(rates.tolerance_us).arg(want).arg(horizon.as_micros() as u64);
        let leased = self.tier.call("budget", |mut c| async move { call.invoke_async::<Vec<i64>>(&mut c).await });
        let answer = match tokio::time::timeout(REDIS_CALL_TIMEOUT, leased).await {
            Ok(answer) => answer?,
            Err(_) => {
                self.tier.suspect();
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("redis budget did not answer within {} ms", REDIS_CALL_TIMEOUT.as_millis()),
                )));
            }
        };
        let micros = |v: i64| Duration::from_micros(v.max(0) as u64);
        match answer.as_slice() {
            [wait, grants, offsets @ ..] => {
                Ok((micros(*wait), (*grants).max(0) as u64, offsets.iter().map(|o| micros(*o)).collect()))
            }
            _ => Err(redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "budget script answered short"))),
        }
    }
}

/// The scripts to load on every new Redis connection.
pub fn redis_scripts() -> [redis::Script; 1] {
    [redis::Script::new(GCRA)]
}

mod lease;

#[cfg(test)]
mod tests;
