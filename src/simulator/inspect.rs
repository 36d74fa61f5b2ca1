//! What a test can ask a simulator afterwards: the calls in its ledger (per API), how
//! many were answered with a code, the busiest window of arrivals, the reads the member
//! player made and how its callbacks fared. This is how a test proves what the gateway
//! saved or that it kept its budget.
//!
//! Every query copies what it needs under the lock and lets it go at once; only
//! [`Simulator::wait_for_callbacks`] waits, and it waits on a watch, not on the lock.
//! The receipt API has the short names (`calls`, `call_count`, ...); the `_to` forms take
//! the [`SimApi`].

use std::time::Duration;

use crate::tencent::code::ErrorCode;

use super::{CallRecord, Deliveries, PlayedRead, SimApi, Simulator, max_in_window};

impl Simulator {
    /// Every call that reached the receipt route, in arrival order. (Detail calls are in
    /// [`Self::detail_calls`]; [`Self::calls_to`] takes the API.)
    pub fn calls(&self) -> Vec<CallRecord> {
        self.calls_to(SimApi::Receipt)
    }

    /// How many calls reached the receipt route.
    pub fn call_count(&self) -> usize {
        self.call_count_to(SimApi::Receipt)
    }

    /// How many receipt calls were answered with this ErrorCode (0 counts OK answers).
    pub fn count_code(&self, code: ErrorCode) -> usize {
        self.count_code_to(SimApi::Receipt, code)
    }

    /// The most *served* receipt calls (all but those answered 60007, across all apps)
    /// whose arrivals fit in one window of this length. The limiter counts the same
    /// calls, so without injected faults this never exceeds the limit: to prove that a
    /// client kept its budget, check `count_code(ErrorCode(60007)) == 0` or
    /// [`Self::max_arrivals_in_any_window`].
    pub fn max_in_any_window(&self, window: Duration) -> usize {
        self.max_in_any_window_to(SimApi::Receipt, window)
    }

    /// Like [`Self::max_in_any_window`], but counting every recorded receipt call,
    /// refused ones too: what a client actually sent.
    pub fn max_arrivals_in_any_window(&self, window: Duration) -> usize {
        self.max_arrivals_in_any_window_to(SimApi::Receipt, window)
    }

    /// Every call that reached the detail route, in arrival order.
    pub fn detail_calls(&self) -> Vec<CallRecord> {
        self.calls_to(SimApi::Detail)
    }

    /// How many calls reached the detail route.
    pub fn detail_call_count(&self) -> usize {
        self.call_count_to(SimApi::Detail)
    }

    /// Every call to `api`, in arrival order.
    pub fn calls_to(&self, api: SimApi) -> Vec<CallRecord> {
        self.state().calls.iter().filter(|c| c.api == api).cloned().collect()
    }

    /// Every call to either API, in arrival order.
    pub fn all_calls(&self) -> Vec<CallRecord> {
        self.state().calls.clone()
    }

    pub fn call_count_to(&self, api: SimApi) -> usize {
        self.state().calls.iter().filter(|c| c.api == api).count()
    }

    /// How many calls to `api` were answered with this ErrorCode.
    pub fn count_code_to(&self, api: SimApi, code: ErrorCode) -> usize {
        self.state().calls.iter().filter(|c| c.api == api && c.error_code == code).count()
    }

    /// [`Self::max_in_any_window`] for `api`.
    pub fn max_in_any_window_to(&self, api: SimApi, window: Duration) -> usize {
        let times = self.state().arrivals(|c| c.api == api && c.error_code != ErrorCode::RATE_LIMITED);
        max_in_window(&times, window)
    }

    /// [`Self::max_arrivals_in_any_window`] for `api`.
    pub fn max_arrivals_in_any_window_to(&self, api: SimApi, window: Duration) -> usize {
        max_in_window(&self.state().arrivals(|c| c.api == api), window)
    }

    /// Forgets the ledger of calls (not the rate windows, overrides, faults or played
    /// reads), e.g. after warm-up.
    pub fn reset_calls(&self) {
        self.state().calls.clear();
    }

    /// The `User-Agent` of every call that reached an API's route, in arrival order
    /// (empty when the call had none).
    pub fn user_agents(&self) -> Vec<String> {
        self.state().user_agents.clone()
    }

    /// How many connections the simulator accepted (TCP, before any TLS handshake):
    /// with [`Self::call_count`], what tells a warmed connection from a call.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every read the member player made, in order, with the instant it was applied.
    pub fn reads(&self) -> Vec<PlayedRead> {
        self.state().reads.clone()
    }

    /// Callbacks answered with a 2xx status.
    pub fn callbacks_delivered(&self) -> usize {
        self.inner.deliveries.borrow().delivered
    }

    /// Callbacks that timed out, failed to connect or got another status.
    pub fn callbacks_failed(&self) -> usize {
        self.inner.deliveries.borrow().failed
    }

    /// Waits until at least `settled` callbacks have been delivered or have failed, and
    /// says how they fared. (Pending forever if the player never gets that far: wrap it
    /// in a timeout.)
    pub async fn wait_for_callbacks(&self, settled: usize) -> Deliveries {
        let mut deliveries = self.inner.deliveries.subscribe();
        // The sender lives as long as the simulator, so this cannot end in an error.
        let _ = deliveries.wait_for(|d| d.settled() >= settled).await;
        *deliveries.borrow()
    }
}
