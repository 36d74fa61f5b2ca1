//! Who pays for each call: the clients' weighted shares of the budget (start-time fair
//! queuing over the clients whose callers wait) and each client's allowance of
//! background calls made for nobody in particular.

use std::time::Duration;

use prometheus::IntCounter;
use tokio::time::Instant;

use crate::clients::ClientSlot;

/// Each client's allowance of background calls (docs/design.md#admission): calls for its
/// refused callers' misses that no caller has joined since. A refused caller may come
/// back for them, or may be gone for good; nothing tells which, so what is spent on them
/// for nobody is bounded: at most [`BACKGROUND_BURST`] at once, refilled at
/// [`BACKGROUND_RATE`] a second. A background batch a caller joins is a caller's batch,
/// outside the allowance.
pub const BACKGROUND_BURST: f64 = 8.0;

/// See [`BACKGROUND_BURST`].
pub const BACKGROUND_RATE: f64 = 1.0;

/// One client's background allowance: a token bucket.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Allowance {
    /// Tokens at `at`; before the first call, a full bucket.
    tokens: f64,
    at: Option<Instant>,
}

impl Allowance {
    pub(super) fn level(&self, now: Instant) -> f64 {
        match self.at {
            None => BACKGROUND_BURST,
            Some(at) => {
                let refilled = BACKGROUND_RATE * now.saturating_duration_since(at).as_secs_f64();
                (self.tokens + refilled).min(BACKGROUND_BURST)
            }
        }
    }

    /// When it next holds a whole call.
    pub(super) fn ready_at(&self, now: Instant) -> Instant {
        let missing = 1.0 - self.level(now);
        if missing <= 0.0 {
            return now;
        }
        now + Duration::from_secs_f64(missing / BACKGROUND_RATE)
    }

    pub(super) fn spend(&mut self, now: Instant) {
        self.tokens = self.level(now) - 1.0;
        self.at = Some(now);
    }
}

/// One client's share of this (app, API)'s budget (docs/design.md#budget-and-dispatch, #callers):
/// its weight, and the counter of the calls spent for it (`receipt_gateway_budget_calls_total`).
#[derive(Clone)]
pub struct Share {
    pub weight: u32,
    pub calls: Option<IntCounter>,
}

/// Start-time fair queuing over the clients whose callers wait: each client's next call
/// starts at the later of the virtual time and the end of its last call, and lasts
/// `1 / weight`; the ready client that starts first is served. A client that was idle
/// starts at the virtual time, so idleness banks no credit.
#[derive(Default)]
pub(super) struct Fair {
    pub(super) shares: Vec<Share>,
    /// Virtual time: the start of the call last served.
    now: f64,
    /// Per client slot: when its last call ends, in virtual time.
    finish: Vec<f64>,
}

impl Fair {
    pub(super) fn weight(&self, client: ClientSlot) -> u32 {
        self.shares.get(client.0 as usize).map_or(1, |s| s.weight.max(1))
    }

    pub(super) fn start(&self, client: ClientSlot) -> f64 {
        self.finish.get(client.0 as usize).copied().unwrap_or(0.0).max(self.now)
    }

    /// `client` was served: its call is charged.
    pub(super) fn serve(&mut self, client: ClientSlot) {
        let i = client.0 as usize;
        let start = self.start(client);
        if self.finish.len() <= i {
            self.finish.resize(i + 1, 0.0);
        }
        self.now = start;
        self.finish[i] = start + 1.0 / f64::from(self.weight(client));
    }

    /// `client`'s calls counter (`receipt_gateway_budget_calls_total`) counts `n` more.
    pub(super) fn charge(&self, client: ClientSlot, n: u32) {
        if let Some(calls) = self.shares.get(client.0 as usize).and_then(|s| s.calls.as_ref()) {
            calls.inc_by(u64::from(n));
        }
    }

    /// `client` is charged `n` calls made earlier for it: its next call starts that much
    /// later, without moving the virtual time the other clients start from.
    pub(super) fn bill(&mut self, client: ClientSlot, n: u32) {
        let i = client.0 as usize;
        let start = self.start(client);
        if self.finish.len() <= i {
            self.finish.resize(i + 1, 0.0);
        }
        self.finish[i] = start + f64::from(n) / f64::from(self.weight(client));
        self.charge(client, n);
    }
}
