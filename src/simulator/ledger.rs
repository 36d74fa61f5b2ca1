//! What the simulator remembers between calls: the ledger of calls, the rolling-second
//! windows of the rate limit, queued faults, receipt overrides, and the member player's
//! candidates and the reads it played.
//!
//! Invariant: a call enters its (app, API) rate window exactly when it is recorded with
//! an `error_code` other than 60007, so the limit the simulator enforces and
//! [`max_in_window`] over the ledger's calls to that API always agree.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, Receipt};
use crate::tencent::wire::{DETAIL_PATH, RECEIPT_PATH};

use super::Fault;
use super::detail::{FinishField, member_account};
use super::player::{Playable, PlayedRead};
use super::rules::default_receipt;

/// The `error_code` recorded for calls answered with an HTTP fault or not answered.
pub const NO_ERROR_CODE: ErrorCode = ErrorCode::NONE;

/// The rolling window of the rate limit.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// The APIs the simulator answers. Tencent limits each one separately, so each has its
/// own rate window, and the ledger says which one a call went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimApi {
    /// `get_group_msg_receipt`: read counts of several messages.
    Receipt,
    /// `get_group_msg_receipt_detail`: who has (not) read one message, paged.
    Detail,
}

impl SimApi {
    pub fn path(self) -> &'static str {
        match self {
            Self::Receipt => RECEIPT_PATH,
            Self::Detail => DETAIL_PATH,
        }
    }

    /// The API served at `path`, if any.
    pub fn at_path(path: &str) -> Option<Self> {
        [Self::Receipt, Self::Detail].into_iter().find(|api| api.path() == path)
    }
}

/// One call that reached an API's route, as the simulator saw and answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    /// When the whole request had arrived (the rate limit looks at the same instant).
    pub at: Instant,
    /// Which API the call went to.
    pub api: SimApi,
    /// The `sdkappid` the call named, configured or not; `None` if absent or not a number.
    pub app: Option<AppId>,
    /// The body's `GroupId`, when the body parsed.
    pub group: Option<String>,
    /// The body's MsgSeqs in order, when the body parsed (even if there were too many);
    /// a detail call's one `MsgSeq`.
    pub seqs: Vec<u64>,
    /// The ErrorCode answered: 0 for OK, [`NO_ERROR_CODE`] for HTTP faults and drops.
    pub error_code: ErrorCode,
    /// The HTTP status answered; 0 when the connection was dropped instead.
    pub http_status: u16,
    /// When the caller says it sent the call, in µs since the Unix epoch on its clock
    /// ([`SENT_AT_HEADER`](crate::tencent::wire::SENT_AT_HEADER), which the gateway sets); `None`
    /// without that header. Unlike `at`, it does not move with delivery delays.
    pub sent_at_us: Option<u64>,
}

/// Everything that changes per call, behind the simulator's one lock.
#[derive(Default)]
pub(super) struct State {
    pub calls: Vec<CallRecord>,
    pub faults: VecDeque<Fault>,
    pub overrides: HashMap<(String, u64), (u64, u64)>,
    /// MsgSeqs that make a whole call fail with 10004 (see `Simulator::reject_seq`).
    pub rejected: std::collections::HashSet<u64>,
    /// Every MsgSeq from this one up makes a whole call fail with 10004 (see
    /// `Simulator::reject_from`).
    pub rejected_from: Option<u64>,
    pub base_latency: Duration,
    /// How detail answers name their "last page" flag.
    pub finish_field: FinishField,
    /// The (group, seq)s the member player may make someone read next.
    pub playable: Playable,
    /// Every read the member player made, in order.
    pub reads: Vec<PlayedRead>,
    /// The `User-Agent` of every call that reached an API's route, in arrival order
    /// (empty when the call had none).
    pub user_agents: Vec<String>,
    /// Arrivals counted against each (app, API) budget within the last second. The API
    /// is part of the key because Tencent limits each API separately.
    windows: HashMap<(AppId, SimApi), VecDeque<Instant>>,
}

impl State {
    /// Lets a call arriving `at` through if fewer than `limit` calls were let through in
    /// the second before it. Only calls let through enter the window: Tencent counts what
    /// it served, so a client that backs off after 60007 gets its budget back one second
    /// after its served calls, however often it was refused meanwhile.
    pub fn admit(&mut self, app: AppId, api: SimApi, at: Instant, limit: usize) -> bool {
        let window = self.window(app, api, at);
        if window.len() >= limit {
            return false;
        }
        window.push_back(at);
        true
    }

    /// Counts a call against the budget without asking (a fault that pre-empted the
    /// limiter still reached Tencent's front door).
    pub fn spend(&mut self, app: AppId, api: SimApi, at: Instant) {
        self.window(app, api, at).push_back(at);
    }

    /// The receipt to report: an override (the test's, or the player's) if one is set,
    /// else the default.
    pub fn receipt(&self, group: &str, seq: u64) -> Receipt {
        receipt_in(&self.overrides, group, seq)
    }

    /// Makes the next unread member of the next playable (group, seq) read it, `at`:
    /// `ReadNum + 1`, `UnreadNum - 1`, stored as an override so that both APIs answer
    /// the new counts from now on. `None` when nothing is left to read.
    pub fn play_read(&mut self, at: Instant) -> Option<PlayedRead> {
        let overrides = &self.overrides;
        let (app, group, seq) = self.playable.pick(|g, s| unread_in(overrides, g, s))?;
        let receipt = self.receipt(&group, seq);
        let read = receipt.read.unwrap_or(0);
        // `pick` chose it for having an unread member, so this subtraction succeeds.
        let unread = receipt.unread.unwrap_or(0).checked_sub(1)?;
        let played =
            PlayedRead { app, group, seq, member: member_account(read), read: read.saturating_add(1), unread, at };
        self.overrides.insert((played.group.clone(), seq), (played.read, unread));
        self.reads.push(played.clone());
        Some(played)
    }

    /// The ledger's arrival times of the calls `keep` selects, sorted.
    pub fn arrivals(&self, keep: impl Fn(&CallRecord) -> bool) -> Vec<Instant> {
        let mut times: Vec<Instant> = self.calls.iter().filter(|c| keep(c)).map(|c| c.at).collect();
        // Recorded in arrival order already; sorting keeps the sweep right regardless.
        times.sort_unstable();
        times
    }

    /// The (app, API) window, with arrivals a second or more before `now` dropped.
    fn window(&mut self, app: AppId, api: SimApi, now: Instant) -> &mut VecDeque<Instant> {
        let window = self.windows.entry((app, api)).or_default();
        while window.front().is_some_and(|&t| now.duration_since(t) >= RATE_WINDOW) {
            window.pop_front();
        }
        window
    }
}

fn receipt_in(overrides: &HashMap<(String, u64), (u64, u64)>, group: &str, seq: u64) -> Receipt {
    match overrides.get(&(group.to_owned(), seq)) {
        Some(&(read, unread)) => Receipt { code: ErrorCode::OK, read: Some(read), unread: Some(unread) },
        None => default_receipt(group, seq),
    }
}

/// How many members have yet to read (group, seq); 0 when it has no receipt.
fn unread_in(overrides: &HashMap<(String, u64), (u64, u64)>, group: &str, seq: u64) -> u64 {
    let receipt = receipt_in(overrides, group, seq);
    if receipt.code == ErrorCode::OK { receipt.unread.unwrap_or(0) } else { 0 }
}

/// The most instants (sorted) that span less than `window`: a two-pointer sweep. "Less
/// than" matches the limiter, which forgets an arrival exactly one window later.
pub fn max_in_window(times: &[Instant], window: Duration) -> usize {
    // An empty window holds nothing; this also keeps `first` from passing `last` below.
    if window.is_zero() {
        return 0;
    }
    let mut best = 0;
    let mut first = 0;
    for (last, &t) in times.iter().enumerate() {
        while t.duration_since(times[first]) >= window {
            first += 1;
        }
        best = best.max(last + 1 - first);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_sweep_counts_instants_spanning_less_than_the_window() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let times = [at(0), at(10), at(500), at(999), at(1000), at(1001), at(3000)];
        assert_eq!(max_in_window(&times, Duration::from_secs(1)), 5);
        assert_eq!(max_in_window(&[], Duration::from_secs(1)), 0);
        assert_eq!(max_in_window(&times, Duration::from_millis(1)), 1);
        assert_eq!(max_in_window(&times, Duration::ZERO), 0);
    }

    #[test]
    fn the_limiter_forgets_a_call_one_second_later() {
        let mut state = State::default();
        let app = AppId(1);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let receipt = SimApi::Receipt;
        assert!(state.admit(app, receipt, at(0), 2));
        assert!(state.admit(app, receipt, at(500), 2));
        assert!(!state.admit(app, receipt, at(999), 2));
        assert!(state.admit(app, receipt, at(1000), 2));
        assert!(!state.admit(app, receipt, at(1499), 2));
        // Another app, and another API of the same app, have their own budgets.
        assert!(state.admit(AppId(2), receipt, at(1499), 2));
        assert!(state.admit(app, SimApi::Detail, at(1499), 2));
        assert!(state.admit(app, SimApi::Detail, at(1499), 2));
        assert!(!state.admit(app, SimApi::Detail, at(1499), 2));
    }

    #[test]
    fn apis_are_found_by_path() {
        assert_eq!(SimApi::at_path(RECEIPT_PATH), Some(SimApi::Receipt));
        assert_eq!(SimApi::at_path(DETAIL_PATH), Some(SimApi::Detail));
        assert_eq!(SimApi::at_path("/v4/nope"), None);
    }

    #[test]
    fn a_played_read_moves_one_member_and_stops_when_all_have_read() {
        let mut state = State::default();
        let t0 = Instant::now();
        state.overrides.insert(("g".into(), 1), (2, 2));
        state.playable.offer(AppId(1), "g", 1);
        state.playable.offer(AppId(1), "g", 2_000_000);

        let first = state.play_read(t0).map(|r| (r.member, r.read, r.unread));
        let second = state.play_read(t0).map(|r| (r.member, r.read, r.unread));
        let none = state.play_read(t0);

        assert_eq!(first, Some(("member-2".into(), 3, 1)));
        assert_eq!(second, Some(("member-3".into(), 4, 0)));
        assert_eq!(none, None, "everyone has read, and 2000000 has no receipt");
        let now = state.receipt("g", 1);
        assert_eq!((now.read, now.unread), (Some(4), Some(0)));
        assert_eq!(state.reads.len(), 2);
    }

    #[test]
    fn overrides_win_over_the_default() {
        let mut state = State::default();
        state.overrides.insert(("g".into(), 2_000_000), (1, 2));
        let over = state.receipt("g", 2_000_000);
        assert_eq!((over.code, over.read, over.unread), (ErrorCode::OK, Some(1), Some(2)));
        assert_eq!(state.receipt("g", 3), default_receipt("g", 3));
    }
}
