//! What the client saw: every measured request's latency (all samples are kept, so the
//! percentiles are exact, also per `X-Cache` and per HTTP status), counts by HTTP status and `X-Cache`, when
//! the first request went out, and the failures the
//! targets care about (429 without `Retry-After`, answers after the deadline, hung
//! requests, transport errors).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::client::{Outcome, XCache};

/// One finished request.
pub struct Sample {
    pub outcome: Outcome,
    /// When the request went out.
    pub sent: Instant,
    /// To the whole answer from the scheduled send time, or from the send if that was
    /// earlier or there was no schedule (closed loop): what the caller experienced.
    pub latency: Duration,
    /// From the send to the whole answer: what the gateway's deadline is measured against.
    pub service: Duration,
    /// How late after its scheduled time the request was sent (open loop): every
    /// connection was busy, or the client was short of CPU.
    pub queued: Duration,
}

#[derive(Default)]
pub struct Recorder {
    /// Latencies of answered requests, in microseconds.
    latencies_us: Vec<u32>,
    /// The same, by the answer's `X-Cache`.
    latencies_by_x_cache_us: BTreeMap<XCache, Vec<u32>>,
    /// The same, by HTTP status (a 429 is answered at once, a 200 may have waited).
    latencies_by_status_us: BTreeMap<u16, Vec<u32>>,
    /// Client-side queueing of every request, in microseconds.
    queued_us: Vec<u32>,
    pub statuses: BTreeMap<u16, u64>,
    pub x_cache: BTreeMap<XCache, u64>,
    pub without_retry_after: u64,
    /// 200 and 429 answers that arrived after the request's deadline (and
    /// [`CLIENT_SLACK`]).
    pub late: u64,
    pub hung: u64,
    pub failed: u64,
    /// 200s and 429s with `Retry-After`, answered within the deadline.
    in_time: u64,
    /// Size of the last answer body (to size the baseline's).
    pub last_body_bytes: usize,
    /// When the earliest recorded request went out.
    pub first_sent: Option<Instant>,
}

/// Latency percentiles of the answered requests.
pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

/// What the client's own clock adds to the gateway's: the gateway counts a deadline from
/// the request's arrival, the client from its send, and on a shared two-core machine the
/// kernel and the client's scheduling sit in between (measured: answers the gateway sent
/// in time arriving up to 7 ms after the deadline by the client's clock, with three
/// gateways and Redis on the same cores).
pub const CLIENT_SLACK: Duration = Duration::from_millis(10);

impl Recorder {
    pub fn record(&mut self, sample: Sample, deadline: Duration) {
        self.queued_us.push(micros(sample.queued));
        self.first_sent = Some(self.first_sent.map_or(sample.sent, |first| first.min(sample.sent)));
        let answer = match sample.outcome {
            Outcome::Hung => return self.hung += 1,
            Outcome::Failed => return self.failed += 1,
            Outcome::Answered(answer) => answer,
        };
        self.latencies_us.push(micros(sample.latency));
        self.latencies_by_x_cache_us.entry(answer.x_cache).or_default().push(micros(sample.latency));
        self.latencies_by_status_us.entry(answer.status).or_default().push(micros(sample.latency));
        *self.statuses.entry(answer.status).or_default() += 1;
        *self.x_cache.entry(answer.x_cache).or_default() += 1;
        self.last_body_bytes = answer.body_bytes;
        if answer.status == 429 && !answer.retry_after {
            self.without_retry_after += 1;
        }
        let allowed = answer.status == 200 || (answer.status == 429 && answer.retry_after);
        match (matches!(answer.status, 200 | 429), sample.service > deadline + CLIENT_SLACK) {
            (true, true) => self.late += 1,
            (true, false) if allowed => self.in_time += 1,
            _ => {}
        }
    }

    pub fn merge(&mut self, other: Recorder) {
        self.latencies_us.extend(other.latencies_us);
        for (x_cache, latencies) in other.latencies_by_x_cache_us {
            self.latencies_by_x_cache_us.entry(x_cache).or_default().extend(latencies);
        }
        for (status, latencies) in other.latencies_by_status_us {
            self.latencies_by_status_us.entry(status).or_default().extend(latencies);
        }
        self.queued_us.extend(other.queued_us);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        for (x_cache, n) in other.x_cache {
            *self.x_cache.entry(x_cache).or_default() += n;
        }
        self.without_retry_after += other.without_retry_after;
        self.late += other.late;
        self.hung += other.hung;
        self.failed += other.failed;
        self.in_time += other.in_time;
        self.last_body_bytes = self.last_body_bytes.max(other.last_body_bytes);
        self.first_sent = match (self.first_sent, other.first_sent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Requests that got an HTTP answer, whatever its status.
    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn sent(&self) -> u64 {
        self.answered() + self.hung + self.failed
    }

    pub fn status(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Requests that did not end as the over-the-limit target allows: anything but a 200
    /// or a 429 with `Retry-After` in time.
    pub fn failures(&self) -> u64 {
        self.sent() - self.in_time
    }

    pub fn percentiles(&mut self) -> Option<Percentiles> {
        percentiles(&mut self.latencies_us)
    }

    /// Latency percentiles of the requests answered with `x_cache`.
    pub fn percentiles_of(&mut self, x_cache: XCache) -> Option<Percentiles> {
        percentiles(self.latencies_by_x_cache_us.get_mut(&x_cache)?)
    }

    /// Latency percentiles of the requests answered with HTTP `status`.
    pub fn percentiles_of_status(&mut self, status: u16) -> Option<Percentiles> {
        percentiles(self.latencies_by_status_us.get_mut(&status)?)
    }

    /// The 99th percentile of how late requests were sent: large values mean that
    /// `--connections` is too small for the rate (or the client is short of CPU) and the
    /// latencies include the client's own queue.
    pub fn queued_p99(&mut self) -> Option<Duration> {
        percentiles(&mut self.queued_us).map(|p| p.p99)
    }
}

fn percentiles(samples: &mut [u32]) -> Option<Percentiles> {
    samples.sort_unstable();
    let max = *samples.last()?;
    let at = |q: f64| {
        // The smallest sample with at least q of all samples at or below it.
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        Duration::from_micros(u64::from(samples[rank - 1]))
    };
    Some(Percentiles { p50: at(0.50), p99: at(0.99), p999: at(0.999), max: Duration::from_micros(u64::from(max)) })
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// `12.3 ms` style, with three significant digits where it matters.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 { format!("{ms:.2} ms") } else { format!("{ms:.1} ms") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Answer;

    fn answered(sent: Instant, x_cache: XCache, latency_ms: u64) -> Sample {
        let answer = Answer { status: 200, x_cache, retry_after: false, body_bytes: 10 };
        let latency = Duration::from_millis(latency_ms);
        Sample { outcome: Outcome::Answered(answer), sent, latency, service: latency, queued: Duration::ZERO }
    }

    #[test]
    fn latencies_are_kept_per_x_cache_and_the_first_send_across_merges() {
        let t0 = Instant::now();
        let deadline = Duration::from_secs(1);
        let (mut a, mut b) = (Recorder::default(), Recorder::default());
        a.record(answered(t0 + Duration::from_millis(5), XCache::Hit, 1), deadline);
        a.record(answered(t0 + Duration::from_millis(6), XCache::Miss, 30), deadline);
        b.record(answered(t0 + Duration::from_millis(2), XCache::Miss, 10), deadline);
        b.record(answered(t0 + Duration::from_millis(3), XCache::Miss, 20), deadline);
        a.merge(b);
        assert_eq!(a.first_sent, Some(t0 + Duration::from_millis(2)));
        let miss = a.percentiles_of(XCache::Miss).expect("misses");
        assert_eq!((miss.p50, miss.p99), (Duration::from_millis(20), Duration::from_millis(30)));
        let hit = a.percentiles_of(XCache::Hit).expect("hits");
        assert_eq!(hit.max, Duration::from_millis(1));
        assert!(a.percentiles_of(XCache::Stale).is_none());
        assert_eq!(a.percentiles_of_status(200).map(|p| p.p50), Some(Duration::from_millis(10)));
        assert!(a.percentiles_of_status(429).is_none());
        assert_eq!(a.percentiles().map(|p| p.max), Some(Duration::from_millis(30)));
        assert!(Recorder::default().first_sent.is_none());
    }
}
