//! What a simulator is configured with: the apps it knows and Tencent's limits. Fixed
//! for the simulator's lifetime; what a test changes while it runs (overrides, faults,
//! latency) lives in the shared state instead (see `ledger`).

use crate::tencent::domain::AppId;
use crate::tencent::usersig::SecretKey;

use super::CallbackPlayer;

/// One app the simulator knows: its admin account and the key UserSigs must be signed with.
#[derive(Clone, Debug)]
pub struct SimApp {
    pub app: AppId,
    pub identifier: String,
    pub key: SecretKey,
}

/// What the simulator is configured with; fixed for its lifetime. Start from
/// [`SimOptions::new`] and override fields with `..SimOptions::new(apps)`.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub apps: Vec<SimApp>,
    /// Calls served per rolling second per (sdkappid, API); more are answered 60007.
    /// Each API gets this many: a detail call never spends the receipt API's budget.
    pub limit_per_second: u32,
    /// The most MsgSeqs one receipt call may carry; more are answered 10004.
    pub max_seqs: usize,
    /// The member player; `None` (the default) makes no one read anything.
    pub player: Option<CallbackPlayer>,
}

impl SimOptions {
    /// Tencent's documented limit for each of the two APIs.
    pub const DEFAULT_LIMIT_PER_SECOND: u32 = 200;
    /// Tencent's documented maximum of MsgSeqs per receipt call.
    pub const DEFAULT_MAX_SEQS: usize = 50;

    /// Options with Tencent's own limits and no member player.
    pub fn new(apps: Vec<SimApp>) -> Self {
        Self { apps, limit_per_second: Self::DEFAULT_LIMIT_PER_SECOND, max_seqs: Self::DEFAULT_MAX_SEQS, player: None }
    }
}
