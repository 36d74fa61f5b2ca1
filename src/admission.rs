//! Admission (SPEC 5.3): when would this caller's batches be answered, and what to tell
//! a caller turned away (`Retry-After`).
//!
//! It owns two estimators, kept in atomics so the request path reads them without a lock:
//! the latency of one upstream call, and the queue's real drain rate (the time between
//! tokens while work was waiting, which a busy machine or other replicas sharing a Redis
//! budget make slower than the configured pace). The decisions themselves are pure
//! functions of a [`Forecast`], testable without a runtime.
//!
//! Invariant: the latency estimate never exceeds the upstream timeout, and fades without
//! samples, so a high estimate cannot lock admission shut (with no call sent, no sample
//! could ever bring it down); the drain interval is forgotten whenever the queue is idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::Estimate;

/// Slack in admission and dispatch decisions for what the estimates do not see
/// (scheduling delays, the answer's way back to the caller).
pub const MARGIN: Duration = Duration::from_millis(50);

/// What admission plans with: the budget's pace, the observed drain interval and the
/// latency estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forecast {
    pub pace: Estimate,
    /// Smoothed time between tokens while work waited (zero: no evidence yet).
    pub observed_interval: Duration,
    /// A high percentile of one call's latency.
    pub latency: Duration,
}

impl Forecast {
    /// The time between tokens: the pace, or the slower drain actually observed.
    pub fn interval(&self) -> Duration {
        self.pace.interval.max(self.observed_interval)
    }
}

/// When an answer could arrive for a caller whose last batch has `ahead` entries queued
/// before it: after the batch window, one token per interval for everything ahead, then
/// one call.
pub fn expected_answer(now: Instant, ahead: u32, forecast: Forecast, window: Duration) -> Instant {
    let first = forecast.pace.next_token.max(window);
    now + first + forecast.interval() * ahead + forecast.latency + MARGIN
}

/// How long until `queued` callers' entries have drained: a truthful `Retry-After` for a
/// caller turned away now.
pub fn retry_after(forecast: Forecast, queued: u32) -> Duration {
    forecast.pace.next_token + forecast.interval() * queued + forecast.latency
}

/// The two estimators of one (app, API).
pub struct Estimators {
    /// Upstream call latency and its mean deviation (µs), smoothed as TCP keeps its RTT:
    /// plans use `smoothed + 4 × deviation`, a high percentile, since a batch sent too
    /// late for its callers is a 504 instead of an early 429.
    latency_us: AtomicU64,
    latency_dev_us: AtomicU64,
    /// When the last latency sample came (µs after `epoch`).
    latency_at_us: AtomicU64,
    epoch: Instant,
    /// Smoothed time between tokens while work was waiting (µs).
    interval_us: AtomicU64,
    /// No call takes longer than the upstream timeout, so no estimate needs to either.
    latency_cap: Duration,
}

impl Estimators {
    pub fn new(latency_cap: Duration) -> Self {
        Self {
            latency_us: AtomicU64::new(0),
            latency_dev_us: AtomicU64::new(0),
            latency_at_us: AtomicU64::new(0),
            epoch: Instant::now(),
            interval_us: AtomicU64::new(0),
            latency_cap,
        }
    }

    /// The forecast for now, given the budget's `pace`.
    pub fn forecast(&self, pace: Estimate) -> Forecast {
        Forecast { pace, observed_interval: self.observed_interval(), latency: self.latency() }
    }

    /// Feeds the latency estimate with the duration of a call that got an answer
    /// (timeouts and transport failures say nothing about answer latency).
    pub fn observe_latency(&self, d: Duration) {
        let d = d.min(self.latency_cap);
        self.latency_at_us.store(micros(self.epoch.elapsed()), Ordering::Relaxed);
        let deviation = self.latency_us.load(Ordering::Relaxed).abs_diff(micros(d));
        ewma(&self.latency_us, d);
        let old = self.latency_dev_us.load(Ordering::Relaxed);
        self.latency_dev_us.store((old * 3 + deviation) / 4, Ordering::Relaxed);
    }

    /// A high-percentile estimate of one call's latency: the deviation term halves every
    /// second without a sample, the smoothed one every ten seconds.
    pub fn latency(&self) -> Duration {
        let smoothed = self.latency_us.load(Ordering::Relaxed) as f64;
        let deviation = self.latency_dev_us.load(Ordering::Relaxed) as f64;
        let at = Duration::from_micros(self.latency_at_us.load(Ordering::Relaxed));
        let silence = self.epoch.elapsed().saturating_sub(at).as_secs_f64();
        let estimate = smoothed * 0.5f64.powf(silence / 10.0) + 4.0 * deviation * 0.5f64.powf(silence);
        Duration::from_micros(estimate as u64).min(self.latency_cap)
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

    fn forecast(next_token_ms: u32, interval_ms: u32, observed_ms: u32, latency_ms: u32) -> Forecast {
        Forecast {
            pace: Estimate { next_token: MS * next_token_ms, interval: MS * interval_ms },
            observed_interval: MS * observed_ms,
            latency: MS * latency_ms,
        }
    }

    #[test]
    fn an_answer_is_expected_after_the_window_the_queue_ahead_and_one_call() {
        let now = Instant::now();
        // Next token in 1 ms, but the batch window (2 ms) comes later; 10 ahead at 5 ms.
        let at = expected_answer(now, 10, forecast(1, 5, 0, 20), 2 * MS);
        assert_eq!(at, now + 2 * MS + 50 * MS + 20 * MS + MARGIN);
        // A slower drain than the pace is what counts.
        let slow = expected_answer(now, 10, forecast(1, 5, 8, 20), 2 * MS);
        assert_eq!(slow, now + 2 * MS + 80 * MS + 20 * MS + MARGIN);
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
