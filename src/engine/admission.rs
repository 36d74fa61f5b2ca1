//! Admission (docs/design.md#budget-and-dispatch): when would this caller's batches be answered,
//! and what to tell a caller turned away (`Retry-After`).
//!
//! It owns the estimators, kept in atomics so the request path reads them without a lock:
//! the reach of one call (how long from sending a batch until its callers hold the
//! answer: the upstream latency, or the delivery measured at the callers when the machine
//! adds more), and the queue's real drain rate (the time between tokens while work was
//! waiting, which a busy machine or other replicas sharing a Redis budget make slower
//! than the configured pace). The decisions themselves are pure functions of a
//! [`Forecast`], testable without a runtime.
//!
//! Invariant: the reach never exceeds the upstream timeout (plus [`MARGIN`]), and fades
//! without samples, so a high estimate cannot lock admission shut (with no call sent, no
//! sample could ever bring it down); the drain interval is forgotten whenever the queue
//! is idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::Estimate;

/// The least slack admission and dispatch keep beyond the measured reach of a call: the
/// answer's write back to the caller, which no estimate sees.
pub const MARGIN: Duration = Duration::from_millis(25);

/// What a request keeps of its deadline to write its answer: its waits end this much
/// before the deadline, whatever the queue has not answered by then. Less than
/// [`MARGIN`], so a batch sent on time lands before its callers stop waiting.
pub const WRITE_BACK: Duration = Duration::from_millis(10);

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
/// callers is a 504 instead of an early 429): the latency of one upstream call, and the
/// delivery of a batch — from its dispatch to a caller holding the answer, which adds to
/// the call what a busy machine adds (the task's start, the cache fill, waking the
/// callers). Admission and dispatch plan with the larger of the two plus [`MARGIN`]: on
/// an idle machine that is about the call, on a loaded one the measured delay, instead of
/// a fixed slack that is too small for the one and wastes budget on the other.
pub struct Estimators {
    latency: Spread,
    delivery: Spread,
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
            delivery: Spread::default(),
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
        self.latency.observe(d.min(self.cap), self.now());
    }

    /// Feeds the delivery estimate with the time from a batch's dispatch to one of its
    /// callers holding the answer, for a batch answered by its first call (retries and
    /// splits are the fetch loop's business, with deadlines of their own).
    pub fn observe_delivery(&self, d: Duration) {
        self.delivery.observe(d.min(self.cap), self.now());
    }

    /// A high-percentile estimate of one call's latency.
    pub fn latency(&self) -> Duration {
        self.latency.estimate(self.now()).min(self.cap)
    }

    /// How long before a caller's deadline its batch must leave: a high percentile of
    /// the latency or of the delivery, whichever is longer, plus [`MARGIN`].
    pub fn reach(&self) -> Duration {
        let now = self.now();
        self.latency.estimate(now).max(self.delivery.estimate(now)).min(self.cap) + MARGIN
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

/// A smoothed duration and its mean deviation (µs), in atomics so the request path reads
/// them without a lock, with the time of the last sample: without samples the deviation
/// term halves every second and the smoothed one every ten, so a high estimate cannot
/// lock admission shut (with no batch sent, no sample could ever bring it down).
#[derive(Default)]
struct Spread {
    smoothed_us: AtomicU64,
    deviation_us: AtomicU64,
    /// When the last sample came (µs after the estimators' epoch).
    at_us: AtomicU64,
}

impl Spread {
    fn observe(&self, d: Duration, now: Duration) {
        self.at_us.store(micros(now), Ordering::Relaxed);
        let deviation = self.smoothed_us.load(Ordering::Relaxed).abs_diff(micros(d));
        ewma(&self.smoothed_us, d);
        let old = self.deviation_us.load(Ordering::Relaxed);
        self.deviation_us.store((old * 3 + deviation) / 4, Ordering::Relaxed);
    }

    fn estimate(&self, now: Duration) -> Duration {
        let smoothed = self.smoothed_us.load(Ordering::Relaxed) as f64;
        let deviation = self.deviation_us.load(Ordering::Relaxed) as f64;
        let at = Duration::from_micros(self.at_us.load(Ordering::Relaxed));
        let silence = now.saturating_sub(at).as_secs_f64();
        let estimate = smoothed * 0.5f64.powf(silence / 10.0) + 4.0 * deviation * 0.5f64.powf(silence);
        Duration::from_micros(estimate as u64)
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
    async fn the_reach_is_the_slower_of_the_call_and_its_delivery_plus_the_margin() {
        let e = Estimators::new(Duration::from_secs(3));
        assert_eq!(e.reach(), MARGIN, "nothing measured yet");
        // Smoothed 4 ms, mean deviation 1 ms: 4 + 4 x 1.
        e.observe_latency(4 * MS);
        assert_eq!(e.reach(), 8 * MS + MARGIN);
        // A busy machine: the callers held their answers 20 ms after dispatch (smoothed
        // 20 ms, deviation 5 ms).
        e.observe_delivery(20 * MS);
        assert_eq!(e.reach(), 40 * MS + MARGIN);
        assert_eq!(e.latency(), 8 * MS, "the call's own latency is unchanged");
        e.observe_delivery(Duration::from_secs(10));
        assert_eq!(e.reach(), Duration::from_secs(3) + MARGIN, "capped at the upstream timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn estimates_fade_without_samples() {
        let e = Estimators::new(Duration::from_secs(3));
        e.observe_latency(100 * MS);
        e.observe_latency(300 * MS);
        let fresh = e.latency();

        tokio::time::advance(Duration::from_secs(10)).await;

        let faded = e.latency();
        assert!(faded < fresh / 2, "{fresh:?} -> {faded:?}");
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
