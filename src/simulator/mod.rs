//! A local stand-in for Tencent Cloud Chat's read-receipt REST APIs,
//! `get_group_msg_receipt` and `get_group_msg_receipt_detail`, and for the group members
//! whose reads Tencent pushes as callbacks (docs/design.md#simulator).
//!
//! Integration tests, the demo, the load generator and `receipt-gateway simulate` point
//! the gateway's upstream at it. It is a real HTTP server (HTTP/1.1 and h2c on one port)
//! that plays Tencent's documented rules and keeps a ledger of every call it received, so
//! a test can prove what the gateway saved or that it kept its budget.
//!
//! What it owns: the answers of both APIs, the per-(sdkappid, API) rolling-second limit,
//! the call ledger, receipt overrides, injected faults, and the member player. What it
//! does not own: anything the gateway decides (retries, caching, signing, what a
//! callback does to the cache).
//!
//! A call passes these phases, each of which can end it (the first that applies wins):
//!
//! 1. routing — anything but `POST` [`RECEIPT_PATH`](crate::tencent::wire::RECEIPT_PATH) or `POST`
//!    [`DETAIL_PATH`](crate::tencent::wire::DETAIL_PATH) is HTTP 404 / 60009 and is *not*
//!    recorded; every call past this point is recorded in the ledger under its [`SimApi`];
//! 2. an injected [`Fault`] (latency only delays, the others replace the answer); the
//!    faults form one queue, played on the next calls to either API;
//! 3. `sdkappid` — missing or not a number: 60003; not configured: 60006;
//! 4. the rate limit of the app *for this API* — 60007 (each API has its own window);
//! 5. the other query parameters — 60003; the UserSig — 70001 expired, 70009 otherwise;
//!    a genuine UserSig of an account that is not the app's admin — 60010;
//! 6. the body — 10004 (not parseable; more than `max_seqs` MsgSeqs; for the detail API
//!    a `Filter` other than 0 or 1, or a `Count` outside 1..=200);
//! 7. the group — 10010 for ids starting `missing`, 10015 for `invalid`; a MsgSeq made
//!    invalid by [`Simulator::reject_seq`] or [`Simulator::reject_from`] — 10004;
//! 8. the answer. Receipt API: one item per requested MsgSeq in order, an override, else
//!    [`default_receipt`]. Detail API: 10062 for the whole call if the message has no
//!    receipt, 10004 for a `Cursor` it never issued, else one page of the member list
//!    that matches the receipt API's counts (see `detail`).
//!
//! The member player (see `player`), when configured, runs beside the server: it makes
//! the members of the messages asked about read them, one at a time at a fixed pace,
//! stores the new counts as overrides (so phase 8 of both APIs answers them) and
//! delivers each read as a signed `Group.CallbackAfterReadReceipt`.
//!
//! Like Tencent, it answers API errors with HTTP 200; only injected faults and unknown
//! paths produce another status.
//!
//! # Layout
//!
//! This file holds the [`Simulator`] handle (shared state, construction, receipt
//! overrides and the other data a test scripts). The rest, in the order a call meets it:
//!
//! - `options` — [`SimOptions`] and [`SimApp`]: what a simulator is configured with;
//! - `server` — [`Simulator::spawn`], [`Simulator::serve`], [`SimServer`]: the listener
//!   (plain, or HTTPS with a certificate the test made: [`Simulator::spawn_tls`]),
//!   routing (phase 1), bodies in and answers out;
//! - `call` — phases 2 to 8 for both APIs, under one lock, and the call's ledger record;
//! - `rules` and `detail` — Tencent's rules as pure functions (query, UserSig, body,
//!   group, default counts; the detail API's members and pages);
//! - `fault` — [`Fault`], base latency and the gate that holds calls;
//! - `ledger` — what is remembered between calls (calls, rate windows, overrides,
//!   faults, playable messages, played reads);
//! - `inspect` — what a test reads back: calls, counts, windows, reads, deliveries;
//! - `player` — the member player and its callbacks;
//! - [`demo`] — `receipt-gateway demo`: the simulator and the gateway side by side.
//! - `tests` — the simulator driven over HTTP, one file per part above.
//!
//! # Invariants
//!
//! - It records every call past routing exactly once, and a call for a configured app
//!   spends its (app, API) rate window exactly when it is recorded with a code other than
//!   60007, so the limit it enforces and [`max_in_window`] over the ledger agree (see
//!   `ledger`).
//! - It never holds a lock across an `.await` (one short critical section per call
//!   decides the answer and writes the ledger; one per played read).
//! - No input can panic a request (there is no `unwrap` on the request path).
//! - It never reaches into the gateway: from the rest of the crate it uses only
//!   `tencent` (wire types, codes, UserSig, webhook signing), and the demo also
//!   `config`, `shutdown` and the gateway's `run`.

mod call;
pub mod demo;
mod detail;
mod fault;
mod inspect;
mod ledger;
mod options;
mod player;
mod rules;
mod server;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::tencent::domain::AppId;

use ledger::State;

pub use detail::{FinishField, MAX_DETAIL_COUNT, member_account};
pub use fault::Fault;
pub use ledger::{CallRecord, NO_ERROR_CODE, SimApi, max_in_window};
pub use options::{SimApp, SimOptions};
pub use player::{
    CallbackPlayer, DEFAULT_DELIVERY_TIMEOUT, Deliveries, MAX_IN_FLIGHT, MAX_PLAYABLE, MAX_READS_PER_SECOND,
    PlayedRead, PlayerError,
};
pub use rules::{MAX_SEQ_WITH_RECEIPT, default_receipt};
pub use server::SimServer;

/// A handle on a simulator: cheap to clone, shared by its server and the test driving it.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    apps: HashMap<AppId, SimApp>,
    /// The first configured app: the one [`Simulator::play_group`] delivers callbacks for.
    first_app: Option<AppId>,
    limit_per_second: usize,
    max_seqs: usize,
    player: Option<CallbackPlayer>,
    /// One lock, held briefly and never across an `.await`, so the ledger and the rate
    /// windows always agree.
    state: Mutex<State>,
    /// True while calls are held (see [`Simulator::hold_calls`]).
    gate: watch::Sender<bool>,
    /// Calls recorded and waiting at the gate now.
    held: AtomicUsize,
    /// Connections accepted so far.
    connections: AtomicUsize,
    /// How the player's callbacks fared; a watch so that tests can wait for them.
    deliveries: watch::Sender<Deliveries>,
}

impl Simulator {
    pub fn new(options: SimOptions) -> Self {
        let inner = Inner {
            first_app: options.apps.first().map(|a| a.app),
            apps: options.apps.into_iter().map(|a| (a.app, a)).collect(),
            limit_per_second: usize::try_from(options.limit_per_second).unwrap_or(usize::MAX),
            max_seqs: options.max_seqs,
            player: options.player,
            state: Mutex::new(State::default()),
            gate: watch::Sender::new(false),
            held: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            deliveries: watch::Sender::new(Deliveries::default()),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Makes later calls for (`group`, `seq`) report these counts (item Code 0), and the
    /// detail API list members to match. An override is an explicit wish of the test, so
    /// it wins even above [`MAX_SEQ_WITH_RECEIPT`]. The member player changes it as
    /// members read.
    pub fn set_receipt(&self, group: &str, seq: u64, read: u64, unread: u64) {
        self.state().overrides.insert((group.to_owned(), seq), (read, unread));
    }

    /// Makes every later call that carries `seq` (either API) fail as a whole with
    /// 10004, the way Tencent refuses a call with one bad parameter: for testing that a
    /// gateway isolates the caller who sent it.
    pub fn reject_seq(&self, seq: u64) {
        self.state().rejected.insert(seq);
    }

    /// Makes every later call that carries a MsgSeq of `seq` or above (either API) fail
    /// as a whole with 10004, the way Tencent refuses MsgSeqs past a group's last
    /// message: for testing what a gateway spends on such requests.
    pub fn reject_from(&self, seq: u64) {
        self.state().rejected_from = Some(seq);
    }

    /// Names the detail API's "last page" flag `field` in later answers (the default is
    /// [`FinishField::IsFinish`], the name Tencent's reference gives it).
    pub fn set_finish_field(&self, field: FinishField) {
        self.state().finish_field = field;
    }

    /// Makes (`group`, each of `seqs`) playable: the member player will make their
    /// members read them, and deliver those reads for the first configured app. (The
    /// (group, seq)s the receipt API answers with a receipt become playable by
    /// themselves while a player is configured.)
    pub fn play_group(&self, group: &str, seqs: impl IntoIterator<Item = u64>) {
        let Some(app) = self.inner.first_app else { return };
        let mut state = self.state();
        for seq in seqs {
            state.playable.offer(app, group, seq);
        }
    }

    /// The shared state, for one short critical section; never held across an `.await`.
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, and the state stays consistent even
        // if something did, so a poisoned lock is simply taken over.
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
