//! The three ways load is driven:
//!
//! - [`closed_loop`]: `connections` workers, each sending its next request as soon as the
//!   last one was answered — the most a target can answer (throughput).
//! - [`open_loop`]: requests at fixed intervals whatever the answers do. The schedule is
//!   a numbered list of send times (`start + n / rate`); whichever of the `connections`
//!   workers is free takes the next number, waits for its time and sends. When every
//!   connection is busy the next request goes late, and its latency is counted from its
//!   *scheduled* time, so a stalled target cannot hide its stall by slowing the client
//!   down (no coordinated omission). Workers keep their own records, so nothing is shared
//!   per request but one atomic counter.
//! - [`fill`]: every group once with all its latest MsgSeqs, to fill the cache.
//!
//! Requests scheduled during the warm-up are sent but not recorded. With several gateways
//! (a fleet), requests go round-robin over them: the open loop by ticket number, the
//! closed loop by each worker's running count (offset by the worker), the fill by group.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::task::JoinSet;

use crate::client::{HttpClient, Targets};
use crate::mix::Mix;
use crate::record::{Recorder, Sample};

/// The resolution of tokio's timer.
const TIMER_GRAIN: Duration = Duration::from_millis(1);

/// When a run starts, when its measurement starts and when it ends.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub start: Instant,
    pub measure_from: Instant,
    pub end: Instant,
}

impl Schedule {
    pub fn starting_now(warmup: Duration, duration: Duration) -> Schedule {
        let start = Instant::now();
        Schedule { start, measure_from: start + warmup, end: start + warmup + duration }
    }

    pub fn measured(&self) -> Duration {
        self.end - self.measure_from
    }

    pub fn is_measured(&self, at: Instant) -> bool {
        at >= self.measure_from && at < self.end
    }
}

/// What every request of a run shares.
#[derive(Clone)]
pub struct Load {
    pub client: HttpClient,
    pub targets: Arc<Targets>,
    pub mix: Arc<Mix>,
    pub connections: usize,
    pub seed: u64,
}

impl Load {
    /// A distinct, reproducible random stream per worker.
    fn rng(&self, worker: usize) -> SmallRng {
        SmallRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(worker as u64))
    }
}

/// An open loop at `rate` requests per second, or a closed loop without one.
pub async fn run(load: &Load, rate: Option<f64>, schedule: Schedule) -> Recorder {
    match rate {
        Some(rate) => open_loop(load, rate, schedule).await,
        None => closed_loop(load, schedule).await,
    }
}

pub async fn closed_loop(load: &Load, schedule: Schedule) -> Recorder {
    let mut workers = JoinSet::new();
    for worker in 0..load.connections {
        let (load, mut rng) = (load.clone(), load.rng(worker));
        workers.spawn(async move {
            let mut recorder = Recorder::default();
            for n in worker as u64.. {
                let body = load.mix.next_body(&mut rng);
                let sent = Instant::now();
                if sent >= schedule.end {
                    break;
                }
                let outcome = load.targets.pick(n).send(&load.client, body).await;
                if schedule.is_measured(sent) {
                    let took = sent.elapsed();
                    let sample = Sample { outcome, sent, latency: took, service: took, queued: Duration::ZERO };
                    recorder.record(sample, load.targets.deadline());
                }
            }
            recorder
        });
    }
    merge_workers(workers).await
}

pub async fn open_loop(load: &Load, rate: f64, schedule: Schedule) -> Recorder {
    let next_ticket = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for worker in 0..load.connections {
        let (load, next_ticket, mut rng) = (load.clone(), next_ticket.clone(), load.rng(worker));
        workers.spawn(async move {
            let mut recorder = Recorder::default();
            loop {
                let ticket = next_ticket.fetch_add(1, Ordering::Relaxed);
                let at = schedule.start + Duration::from_secs_f64(ticket as f64 / rate);
                if at >= schedule.end {
                    return recorder;
                }
                let body = load.mix.next_body(&mut rng);
                wait_for_turn(at).await;
                let sent = Instant::now();
                let outcome = load.targets.pick(ticket).send(&load.client, body).await;
                let done = Instant::now();
                if schedule.is_measured(at) {
                    let sample = Sample {
                        outcome,
                        sent,
                        latency: done.duration_since(at.min(sent)),
                        service: done - sent,
                        queued: sent.saturating_duration_since(at),
                    };
                    recorder.record(sample, load.targets.deadline());
                }
            }
        });
    }
    merge_workers(workers).await
}

/// Sleeps until about `at`. tokio's timer wakes on whole milliseconds (rounding up), so
/// waiting for `at` itself would send every request up to 1 ms late; waking in the
/// millisecond before it sends up to 1 ms early instead, which [`open_loop`] does not
/// count as latency. A request whose time has passed goes at once.
pub async fn wait_for_turn(at: Instant) {
    if let Some(early) = at.checked_sub(TIMER_GRAIN).filter(|&early| early > Instant::now()) {
        tokio::time::sleep_until(early.into()).await;
    }
}

/// Asks for every group's latest MsgSeqs once, `connections` requests at a time.
pub async fn fill(load: &Load) -> Recorder {
    let next_group = Arc::new(AtomicUsize::new(0));
    let groups = load.mix.group_count();
    let mut workers = JoinSet::new();
    for _ in 0..load.connections {
        let (load, next_group) = (load.clone(), next_group.clone());
        workers.spawn(async move {
            let mut recorder = Recorder::default();
            loop {
                let group = next_group.fetch_add(1, Ordering::Relaxed);
                if group >= groups {
                    return recorder;
                }
                let sent = Instant::now();
                let outcome = load.targets.pick(group as u64).send(&load.client, load.mix.fill_body(group)).await;
                let took = sent.elapsed();
                let sample = Sample { outcome, sent, latency: took, service: took, queued: Duration::ZERO };
                recorder.record(sample, load.targets.deadline());
            }
        });
    }
    merge_workers(workers).await
}

/// Waits for every worker and merges what they recorded (a worker that panicked is
/// reported and left out).
pub async fn merge_workers(mut workers: JoinSet<Recorder>) -> Recorder {
    let mut total = Recorder::default();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(recorder) => total.merge(recorder),
            Err(e) => eprintln!("  a load worker failed: {e}"),
        }
    }
    total
}
