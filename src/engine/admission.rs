//! Admission (docs/design.md#budget-and-dispatch): when would this caller's batches be answered,
//! and what to tell a caller turned away (`Retry-After`).
//!
//! It owns the estimators, kept in atomics so the request path reads them without a lock:
//! the reach of one call (how long from sending a batch until its callers hold the
//! answer: the upstream latency, plus what the gateway adds to it on a busy machine), and
//! the queue's real drain rate (the time between tokens while work was waiting, which a
//! busy machine or other replicas sharing a Redis budget make slower than the configured
//! pace). The decisions themselves are pure functions of a [`Forecast`], testable without
//! a runtime.
//!
//! Invariant: the reach never exceeds the upstream timeout (plus [`MARGIN`]), and fades
//! without samples, so a high estimate cannot lock admission shut (with no call sent, no
//! sample could ever bring it down); a sample starts from what the silence before it left
//! of the estimate, so the next call cannot bring back what silence forgot. Upstream's
//! time is counted once, by the latency: a stalled upstream (calls held or timing out)
//! raises no estimate of the gateway's own part. The drain interval is forgotten whenever
//! the queue is idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::Estimate;

/// The least slack admission and dispatch keep beyond the measured reach of a call: the
/// answer's write back to the caller, which no estimate sees.
pub const MARGIN: Duration = Duration::from_millis(30);

/// What a request keeps of its deadline to write its answer: its waits end this much
/// before the deadline, whatever the queue has not answered by then. Less than
/// [`MARGIN`], so a batch sent on time lands before its callers stop waiting. 20 ms, not
/// less: when a thousand callers are settled in the same few milliseconds (the first
/// second of an upstream hang) on a saturated machine, their timers fire and their
/// answers are written up to about 15 ms late (docs/benchmarks.md#upstream-hang).
pub const WRITE_BACK: Duration = Duration::from_millis(20);

/// What admission plans with: the budget's pace, the observed drain interval and the
/// reach of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forecast {
    pub pace: Estimate,
    /// Smoothed time between tokens while work waited (zero: no evidence yet).
    pub observed_interval: Duration,
    /// A high percentile of the time from sending a batch to its callers holding the
    /// answer, with the [`MARGIN`] ([`Estimators::reach`]).
    pub reach: Duration,
}

impl Forecast {
    /// The time between tokens: the pace, or the slower drain actually observed.
    pub fn interval(&self) -> Duration {
        self.pace.interval.max(self.observed_interval)
    }
}

/// When an answer could arrive for a caller whose last batch has `ahead` entries queued
/// before it: after the batch window, one token per interval for everything ahead, then
/// one call's reach.
pub fn expected_answer(now: Instant, ahead: u32, forecast: Forecast, window: Duration) -> Instant {
    let first = forecast.pace.next_token.max(window);
    now + first + forecast.interval() * ahead + forecast.reach
}

/// How long until `queued` callers' entries have drained: a truthful `Retry-After` for a
/// caller turned away now.
pub fn retry_after(forecast: Forecast, queued: u32) -> Duration {
    forecast.pace.next_token + forecast.interval() * queued + forecast.reach
}

/// The estimators of one (app, API).
///
/// Two spreads are kept as TCP keeps its RTT (smoothed value and mean deviation; plans
/// use `smoothed + 4 × deviation`, a high percentile, since a batch sent too late for its
/// callers is a 504 instead of an early 429): the latency of one upstream call, and what
/// the gateway adds to it — from a batch's dispatch to a caller holding the answer, less
/// the call's own time on the wire (the task's start, the send-time check, the fleet's
/// round trip, the cache fill, waking the callers). Admission and dispatch plan with
/// their sum plus [`MARGIN`]: on an idle machine that is about the call, on a loaded one
/// the call and the measured delay, instead of a fixed slack that is too small for the
/// one and wastes budget on the other. Upstream's time is kept out of the second spread
/// so that a stall upstream counts once, in the latency, which the next answered calls
/// bring back down; counted in both, it stayed in the one fed only by callers that
/// admission, planning with it, had stopped letting in.
pub struct Estimators {
    latency: Spread,
    added: Spread,
    epoch: Instant,
    /// Smoothed time between tokens while work was waiting (µs).
    interval_us: AtomicU64,
    /// No call takes longer than the upstream timeout, so no estimate needs to either.
    cap: Duration,
}

impl Estimators {
    pub fn new(cap: Duration) -> Self {
        Self {
            latency: Spread::default(),
            added: Spread::default(),
            epoch: Instant::now(),
            interval_us: AtomicU64::new(0),
            cap,
        }
    }

    /// The forecast for now, given the budget's `pace`.
    pub fn forecast(&self, pace: Estimate) -> Forecast {
        Forecast { pace, observed_interval: self.observed_interval(), reach: self.reach() }
    }

    /// Feeds the latency estimate with the duration of a call that got an answer
    /// (timeouts and transport failures say nothing about answer latency).
    pub fn observe_latency(&self, d: Duration) {
        self.latency.observe(d, self.cap, self.now());
    }

    /// Feeds the estimate of what the gateway adds to a call: the time from a batch's
    /// dispatch to one of its callers holding the answer, less the first call's time on
    /// the wire, for a batch answered by its first call (retries and splits are the
    /// fetch loop's business, with deadlines of their own).
    pub fn observe_added(&self, d: Duration) {
        self.added.observe(d, self.cap, self.now());
    }

    /// A high-percentile estimate of one call's latency.
    pub fn latency(&self) -> Duration {
        self.latency.estimate(self.now()).min(self.cap)
    }

    /// How long before a caller's deadline its batch must leave: a high percentile of
    /// the latency and of what the gateway adds to it, plus [`MARGIN`].
    pub fn reach(&self) -> Duration {
        let now = self.now();
        (self.latency.estimate(now) + self.added.estimate(now)).min(self.cap) + MARGIN
    }

    /// Feeds the drain-rate estimate with the time between two tokens taken back to back.
    pub fn observe_interval(&self, d: Duration) {
        ewma(&self.interval_us, d);
    }

    /// Forgets the drain rate: once nothing waits, whatever slowed the queue down before
    /// (other replicas, a Redis outage) is no evidence about the next burst.
    pub fn forget_interval(&self) {
        self.interval_us.store(0, Ordering::Relaxed);
    }

    fn observed_interval(&self) -> Duration {
        Duration::from_micros(self.interval_us.load(Ordering::Relaxed))
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }
}

/// How fast an estimate without samples fades (seconds to halve).
///
/// After an upstream hang the calls it held are answered at once, and their latencies (up
/// to the upstream timeout) become the estimate. Admission then lets in only the callers
/// whose deadlines are longer, and the samples that could bring the estimate down come
/// from their calls and from background batches — which, in a fleet, wait while the other
/// replicas spend the shared budget. With the smoothed value halving every ten seconds, a
/// fleet of three still refused a fifth of its 1 s callers five seconds after a 3 s hang
/// (tests/gateway/recovery.rs); halving every second, an estimate at the upstream timeout
/// is below a 1 s deadline within two seconds and below 250 ms within about four, even if
/// no call is answered meanwhile. With calls answered every few milliseconds, the fade
/// between two samples is small.
const HALF_LIFE: f64 = 1.0;

/// A smoothed duration and its mean deviation (µs), in atomics so the request path reads
/// them without a lock, with the time of the last sample: without samples both halve
/// every [`HALF_LIFE`] seconds, so a high estimate cannot lock admission shut (with no
/// batch sent, no sample could ever bring it down). A sample is folded into what the
/// silence before it left of them: folded into the values as they were, the few samples
/// that still came after a hang each brought back what the silence had faded (measured:
/// between two refusals a quarter second apart, an estimate went from 3.5 s back to 7.4 s).
#[derive(Default)]
struct Spread {
    smoothed_us: AtomicU64,
    deviation_us: AtomicU64,
    /// When the last sample came (µs after the estimators' epoch).
    at_us: AtomicU64,
}

impl Spread {
    /// Folds in a sample of `d`. Nothing it estimates takes longer than `cap`, so the
    /// estimate is kept at most `cap` too: a fade then starts from there.
    fn observe(&self, d: Duration, cap: Duration, now: Duration) {
        let (smoothed, deviation) = self.faded(now);
        self.at_us.store(micros(now), Ordering::Relaxed);
        let (sample, cap) = (micros(d.min(cap)), micros(cap));
        let new = if smoothed == 0 { sample } else { (smoothed * 7 + sample) / 8 };
        let spread = ((deviation * 3 + smoothed.abs_diff(sample)) / 4).min(cap.saturating_sub(new) / 4);
        self.smoothed_us.store(new, Ordering::Relaxed);
        self.deviation_us.store(spread, Ordering::Relaxed);
    }

    fn estimate(&self, now: Duration) -> Duration {
        let (smoothed, deviation) = self.faded(now);
        Duration::from_micros(smoothed + 4 * deviation)
    }

    /// The smoothed value and the deviation (µs) that the silence since the last sample
    /// leaves.
    fn faded(&self, now: Duration) -> (u64, u64) {
        let at = Duration::from_micros(self.at_us.load(Ordering::Relaxed));
        let left = 0.5f64.powf(now.saturating_sub(at).as_secs_f64() / HALF_LIFE);
        let fade = |cell: &AtomicU64| (cell.load(Ordering::Relaxed) as f64 * left) as u64;
        (fade(&self.smoothed_us), fade(&self.deviation_us))
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// An exponential moving average (weight 1/8) kept in an atomic, in µs.
fn ewma(cell: &AtomicU64, sample: Duration) {
    let sample = micros(sample);
    let old = cell.load(Ordering::Relaxed);
    let new = if old == 0 { sample } else { (old * 7 + sample) / 8 };
    cell.store(new, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn forecast(next_token_ms: u32, interval_ms: u32, observed_ms: u32, reach_ms: u32) -> Forecast {
        Forecast {
            pace: Estimate { next_token: MS * next_token_ms, interval: MS * interval_ms },
            observed_interval: MS * observed_ms,
            reach: MS * reach_ms,
        }
    }

    #[test]
    fn an_answer_is_expected_after_the_window_the_queue_ahead_and_one_call() {
        let now = Instant::now();
        // Next token in 1 ms, but the batch window (2 ms) comes later; 10 ahead at 5 ms.
        let at = expected_answer(now, 10, forecast(1, 5, 0, 20), 2 * MS);
        assert_eq!(at, now + 2 * MS + 50 * MS + 20 * MS);
        // A slower drain than the pace is what counts.
        let slow = expected_answer(now, 10, forecast(1, 5, 8, 20), 2 * MS);
        assert_eq!(slow, now + 2 * MS + 80 * MS + 20 * MS);
    }

    #[test]
    fn retry_after_is_the_time_to_drain_the_callers_queue() {
        assert_eq!(retry_after(forecast(3, 5, 0, 20), 100), 3 * MS + 500 * MS + 20 * MS);
        assert_eq!(retry_after(forecast(0, 5, 10, 0), 100), 1000 * MS);
    }

    #[test]
    fn the_latency_estimate_is_a_high_percentile_capped_at_the_upstream_timeout() {
        let e = Estimators::new(100 * MS);
        assert_eq!(e.latency(), Duration::ZERO);
        e.observe_latency(10 * MS);
        e.observe_latency(30 * MS);
        let estimate = e.latency();
        // Smoothed 12.5 ms, mean deviation 6.875 ms: 40 ms, far above the mean.
        assert!(estimate > 39 * MS && estimate <= 40 * MS, "{estimate:?}");
        e.observe_latency(Duration::from_secs(10));
        assert!(e.latency() <= 100 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reach_is_the_call_and_what_the_gateway_adds_plus_the_margin() {
        let e = Estimators::new(Duration::from_secs(3));
        assert_eq!(e.reach(), MARGIN, "nothing measured yet");
        // Smoothed 4 ms, mean deviation 1 ms: 4 + 4 x 1.
        e.observe_latency(4 * MS);
        assert_eq!(e.reach(), 8 * MS + MARGIN);
        // A busy machine: the callers held their answers 20 ms after the call's (smoothed
        // 20 ms, deviation 5 ms).
        e.observe_added(20 * MS);
        assert_eq!(e.reach(), 8 * MS + 40 * MS + MARGIN);
        assert_eq!(e.latency(), 8 * MS, "the call's own latency is unchanged");
        e.observe_added(Duration::from_secs(10));
        assert_eq!(e.reach(), Duration::from_secs(3) + MARGIN, "capped at the upstream timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn estimates_halve_every_second_without_samples() {
        let e = Estimators::new(Duration::from_secs(3));
        e.observe_latency(100 * MS);
        e.observe_latency(300 * MS);
        let fresh = e.latency();

        tokio::time::advance(Duration::from_secs(1)).await;

        let faded = e.latency();
        assert!(faded.abs_diff(fresh / 2) <= Duration::from_micros(2), "{fresh:?} -> {faded:?}");
    }

    /// The calls a hang held are answered at once when it ends, with latencies up to the
    /// upstream timeout; with no call answered after them, the reach is under a 1 s
    /// deadline within two seconds and under 250 ms within about four.
    #[tokio::test(start_paused = true)]
    async fn after_a_hang_the_reach_falls_under_the_deadlines_within_seconds_without_a_sample() {
        let e = Estimators::new(Duration::from_secs(3));
        e.observe_latency(MS);
        for held in 0..50u32 {
            e.observe_latency(Duration::from_secs(3) * held / 50);
        }
        assert!(e.reach() >= Duration::from_secs(3), "at the upstream timeout: {:?}", e.reach());

        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(e.reach() < Duration::from_secs(1), "{:?}", e.reach());
        tokio::time::advance(Duration::from_millis(2300)).await;
        assert!(e.reach() < Duration::from_millis(250), "{:?}", e.reach());
    }

    /// A call answered after a silence is folded into what the silence left: it does not
    /// bring back the estimate of seconds ago.
    #[tokio::test(start_paused = true)]
    async fn a_sample_after_a_silence_starts_from_what_the_silence_left() {
        let e = Estimators::new(Duration::from_secs(10));
        e.observe_latency(Duration::from_secs(3));
        e.observe_latency(Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(4)).await;
        let faded = e.latency();

        e.observe_latency(MS);

        assert!(faded < Duration::from_millis(400), "{faded:?}");
        assert!(e.latency() < Duration::from_millis(500), "{:?} after a 1 ms call", e.latency());
    }

    #[test]
    fn the_drain_interval_is_smoothed_and_forgotten_when_idle() {
        let e = Estimators::new(Duration::from_secs(3));
        e.observe_interval(8 * MS);
        e.observe_interval(16 * MS);
        assert_eq!(e.forecast(Estimate { next_token: MS, interval: 5 * MS }).interval(), 9 * MS);
        e.forget_interval();
        assert_eq!(e.forecast(Estimate { next_token: MS, interval: 5 * MS }).interval(), 5 * MS);
    }
}
