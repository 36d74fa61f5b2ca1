//! Grant times leased from the shared budget in Redis (docs/design.md#leases): what a
//! replica holds, when it asks for more, and how much.
//!
//! One script call takes several grants of the fleet's GCRA schedule at once, each an
//! instant at which one call may leave, up to [`Lease::horizon`] ahead of Redis's clock. A
//! replica asks again before its lease runs out, so its dispatcher sleeps until grant times
//! instead of waiting on Redis round trips. A grant not taken by [`LATE`] after its
//! instant is dropped, never used later: used late, it would bunch with the next grants.
//!
//! Pure state: the caller (the Redis source in this folder) runs the script and feeds the
//! answers in.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How late after its instant a leased grant may still be used: as late as a token may be
/// taken from the local limiter without losing its place. Grants used up to this late
/// bunch with the ones after them; the pacing's guard covers it, with room left for calls
/// sent later than their grant (see the budget's tests). Measured with two debug-build
/// replicas on a busy machine: 10 ms put 101 calls into a rolling second of a 100/s
/// budget's send instants, 3 ms at most 99, at the same rate.
pub const LATE: Duration = super::LATENESS;
/// The shortest lease horizon, however fast Redis answers.
const MIN_AHEAD: Duration = Duration::from_millis(20);
/// The longest: grants promised further ahead are lost if this replica's demand stops.
const MAX_AHEAD: Duration = Duration::from_secs(1);
/// Asked for again this long before the lease would run out, beyond one round trip.
const MARGIN: Duration = Duration::from_millis(5);
/// Demand is the tokens handed out over about this much of the recent past.
const DEMAND_MEMORY: Duration = Duration::from_millis(250);
/// The most grants one script call takes.
const MAX_GRANTS: u32 = 256;
/// The first round trip is assumed this long, until one is measured.
const FIRST_RTT: Duration = Duration::from_millis(1);

/// One replica's leased grants and what sizes its next lease.
#[derive(Debug)]
pub struct Lease {
    /// Grant instants not yet handed out, in order.
    grants: VecDeque<Instant>,
    /// A script call is under way.
    refilling: bool,
    /// Redis said no grant lies within the horizon before this.
    ask_after: Option<Instant>,
    /// The script call's round trip, smoothed.
    rtt: Option<Duration>,
    /// Tokens handed out, as a count decaying over [`DEMAND_MEMORY`] (so per second it is
    /// this divided by the memory), as of `demand_at`.
    demand: f64,
    demand_at: Option<Instant>,
    /// The dispatcher found the lease empty since the last call was sized.
    starved: bool,
    /// Grants asked for by the last call.
    last_want: u32,
}

/// What to ask Redis for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub want: u32,
    pub horizon: Duration,
}

/// The next grant, or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Sleep until this instant, then [`Lease::take`] it.
    At(Instant),
    /// A script call is under way: wait for its answer.
    Refilling,
    /// Redis said no grant lies within the horizon before this instant.
    After(Instant),
}

impl Default for Lease {
    fn default() -> Self {
        Self {
            grants: VecDeque::new(),
            refilling: false,
            ask_after: None,
            rtt: None,
            demand: 0.0,
            demand_at: None,
            starved: false,
            last_want: 0,
        }
    }
}

impl Lease {
    fn rtt(&self) -> Duration {
        self.rtt.unwrap_or(FIRST_RTT)
    }

    /// How far ahead of Redis's clock a lease reaches: two round trips and a margin, so one
    /// call per round trip or less keeps the dispatcher supplied.
    pub fn horizon(&self) -> Duration {
        (self.rtt() * 2 + MARGIN * 2).clamp(MIN_AHEAD, MAX_AHEAD)
    }

    /// Tokens handed out per second lately.
    pub fn demand(&self, now: Instant) -> f64 {
        let Some(at) = self.demand_at else { return 0.0 };
        let age = now.saturating_duration_since(at).as_secs_f64();
        self.demand * (-age / DEMAND_MEMORY.as_secs_f64()).exp() / DEMAND_MEMORY.as_secs_f64()
    }

    /// The next grant to hand out at `now`; grants more than [`LATE`] past are dropped. If
    /// the lease needs refilling, returns the call to make (and counts it as under way).
    pub fn next(&mut self, now: Instant) -> (Next, Option<Ask>) {
        while self.grants.front().is_some_and(|at| *at + LATE < now) {
            self.grants.pop_front();
        }
        if self.grants.is_empty() {
            self.starved = true;
        }
        let ask = self.due(now).then(|| {
            self.refilling = true;
            self.size(now)
        });
        let next = match (self.grants.front(), self.ask_after) {
            (Some(at), _) => Next::At(*at),
            (None, _) if self.refilling => Next::Refilling,
            (None, Some(after)) => Next::After(after),
            // Not reached: an empty lease with no call under way and none refused is due.
            (None, None) => Next::After(now),
        };
        (next, ask)
    }

    /// Whether to ask Redis now: the lease is empty, or will be within a round trip and
    /// this replica's demand would likely use a grant in that time.
    fn due(&self, now: Instant) -> bool {
        if self.refilling || self.ask_after.is_some_and(|t| now < t) {
            return false;
        }
        let soon = self.rtt() + MARGIN;
        match self.grants.back() {
            None => true,
            Some(last) => *last < now + soon && self.demand(now) * soon.as_secs_f64() >= 0.5,
        }
    }

    /// How many grants to ask for: one and a half times what the recent demand would use
    /// within the horizon, or twice the last call's if the dispatcher found the lease empty
    /// since (the demand measured while short of grants understates it) — unless this
    /// replica handed out no token lately: after an idle spell it starts again from one.
    fn size(&mut self, now: Instant) -> Ask {
        let horizon = self.horizon();
        let by_demand = (self.demand(now) * horizon.as_secs_f64() * 1.5).ceil() as u32;
        let lately = self.demand_at.is_some_and(|t| now.saturating_duration_since(t) <= DEMAND_MEMORY);
        let last = if lately { self.last_want } else { 0 };
        let want = if self.starved { by_demand.max(last.saturating_mul(2)) } else { by_demand };
        let want = want.clamp(1, MAX_GRANTS);
        self.starved = false;
        self.last_want = want;
        Ask { want, horizon }
    }

    /// Hands out the front grant if it is still `at` (a reload or an outage may have
    /// emptied the lease meanwhile).
    pub fn take(&mut self, at: Instant, now: Instant) -> bool {
        if self.grants.front() != Some(&at) {
            return false;
        }
        self.grants.pop_front();
        let decayed = self.demand(now) * DEMAND_MEMORY.as_secs_f64();
        self.demand = decayed + 1.0;
        self.demand_at = Some(now);
        true
    }

    /// Redis answered a call sent at `sent` at `received`: `offsets` are the grants'
    /// instants after Redis's clock at the call, or if there are none, `wait` is how long
    /// until one lies within the horizon. The grants are placed after `received`: Redis
    /// read its clock before then, so a grant can be late by the answer's way back, never
    /// early (docs/design.md#leases).
    pub fn answered(&mut self, sent: Instant, received: Instant, offsets: &[Duration], wait: Duration) {
        self.refilling = false;
        let rtt = received.saturating_duration_since(sent);
        self.rtt = Some(match self.rtt {
            Some(before) => (before * 3 + rtt) / 4,
            None => rtt,
        });
        if offsets.is_empty() {
            // Asked again when a grant will lie within the horizon as the call arrives.
            self.ask_after = Some(received + wait.saturating_sub(self.rtt() / 2));
        } else {
            self.ask_after = None;
            self.grants.extend(offsets.iter().map(|o| received + *o));
        }
    }

    /// The call failed, or the rates changed: the grants are dropped (never used late or at
    /// another rate), and the next call may be made at once.
    pub fn clear(&mut self) {
        self.grants.clear();
        self.ask_after = None;
    }

    /// The call under way ended without an answer.
    pub fn failed(&mut self) {
        self.refilling = false;
        self.clear();
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.grants.len()
    }
}
