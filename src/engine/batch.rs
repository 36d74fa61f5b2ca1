//! What a batch is: the MsgSeqs of one group that will ride in one upstream call, who
//! waits for them, and what the call came to (docs/design.md#single-flight-and-batching).
//!
//! A batch is *open* while it can still take MsgSeqs of its group; it is *ready* once it
//! holds `max_seqs` or `window` has passed since it opened; it is *dispatched* when the
//! dispatcher spends a token on it. Its [`BatchKind`] says why it exists:
//! - [`BatchKind::Callers`]: callers wait for it; it queues by their earliest deadline and
//!   is dropped unsent if even the latest would pass before an answer could arrive;
//! - [`BatchKind::Background`]: only refused callers' misses ride in it (docs/design.md#admission).
//!   It spends only budget no caller is waiting for, within its client's background allowance,
//!   is dropped unsent when it expires, and becomes a `Callers` batch the moment a caller joins it.
//!
//! Everyone who waits for a batch holds a [`Waiter`] on one watch channel, so its outcome
//! is computed once and shared.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::clients::ClientSlot;
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{GroupId, MsgSeq, Receipt};

/// How batches are formed and how long their parts live.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// How long a batch waits for more MsgSeqs after its first.
    pub window: Duration,
    pub max_seqs: usize,
    /// Cache TTL: top-up takes messages within half of it from expiry.
    pub ttl: Duration,
    /// No call takes longer, so no estimate needs to either.
    pub upstream_timeout: Duration,
    pub neighbourhood: Neighbourhood,
}

/// Who fills a leaving call's neighbourhood (the uncached MsgSeqs below its highest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Neighbourhood {
    /// The dispatcher, from this replica's cache.
    Here,
    /// The fleet tier, from what the whole fleet holds.
    Fleet,
}

/// How long a read keeps a message in its group's cohort (the cache page keeps the last
/// read across refreshes): four TTLs, not "since the last fetch", which with reads
/// arriving at random drops a few messages of every group out of each refresh, each then
/// costing a call of its own; nobody-read messages still drop out
/// (docs/design.md#cohorts-remember-reads-for-four-ttls, and the `under` benchmark's
/// figures in docs/benchmarks.md).
const COHORT_MEMORY_TTLS: u32 = 4;

/// The least a background batch waits for a caller or a spare token before it is dropped;
/// it waits as long as a read keeps a message in its cohort (four TTLs) if that is longer,
/// so the group's next caller usually finds it (measured in `over`: 55 % answered 200,
/// against 43 % with one TTL of lifetime and 67 % with no limit at all).
const BACKGROUND_LIFETIME: Duration = Duration::from_secs(1);

impl BatchPolicy {
    /// How long ago a read may be for its message to join the group's refreshes.
    pub fn cohort_memory(&self) -> Duration {
        Self::cohort_memory_for(self.ttl)
    }

    /// The cohort memory for a cache TTL.
    pub fn cohort_memory_for(ttl: Duration) -> Duration {
        ttl * COHORT_MEMORY_TTLS
    }

    /// How long a background batch waits before it is dropped unsent.
    pub fn background_lifetime(&self) -> Duration {
        self.cohort_memory().max(BACKGROUND_LIFETIME)
    }
}

/// A batch's identity in its app's queue (never reused within a process).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub(crate) u64);

/// Why an item could not be answered from upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Tencent's answer about the whole group (10007, 10010, 10015): passed through.
    Group { code: ErrorCode, info: String },
    /// Tencent refused this MsgSeq on its own (a 10004 isolated by splitting): the
    /// caller's input was wrong.
    Rejected { code: ErrorCode, info: String },
    /// The gateway added this MsgSeq to a call (cohort, neighbourhood) that Tencent
    /// refused, and left it out when asking again: nobody asked for it, and a caller that
    /// joined it meanwhile asks again.
    LeftOut,
    /// Tencent kept throttling until the deadline.
    Throttled,
    /// A retry or split half found no token before the deadline.
    NoBudget,
    /// Tencent refused a call of `part` with 10004 and the split allowance ran out before
    /// the offending MsgSeqs were found. A caller that asked for every MsgSeq of `part`
    /// sent one of them (Tencent would refuse its request alone): 10004. Any other may be
    /// innocent and is not told its input was wrong: an upstream failure.
    Unisolated { info: String, part: Arc<[MsgSeq]> },
    /// Transport errors, 5xx or retryable codes until retries or the deadline ran out,
    /// or a code that is not retried.
    Unavailable(String),
    /// Its callers' deadlines would pass before an answer could arrive, so the batch was
    /// never sent (and no token spent on it).
    Expired,
}

/// One result per MsgSeq, sorted by MsgSeq once complete.
pub type Items = Vec<(MsgSeq, Result<Receipt, Failure>)>;

/// The result of one batch, shared by every caller that waited for it.
#[derive(Debug)]
pub struct BatchOutcome {
    /// When the (first) call of the batch started; `no-cache` callers need a later one.
    pub started: Instant,
    /// When the answer arrived; `Age` counts from here.
    pub fetched_at: Instant,
    /// Sorted by MsgSeq.
    pub items: Items,
    /// Answered by the batch's first call (no retry, no split): its callers' wait, less
    /// the call's time on the wire (`upstream`), measures what the gateway adds to a
    /// call ([`Estimators::observe_added`]), once — the first caller to see it takes
    /// `sampled`.
    ///
    /// [`Estimators::observe_added`]: crate::engine::admission::Estimators::observe_added
    pub first_call: bool,
    /// How long the first call was on the wire: upstream's part of the wait.
    pub upstream: Duration,
    pub sampled: AtomicBool,
}

impl BatchOutcome {
    /// An outcome of `items` (in any order), all settled at `at`.
    pub fn settled(mut items: Items, at: Instant) -> Self {
        items.sort_unstable_by_key(|(s, _)| *s);
        Self {
            started: at,
            fetched_at: at,
            items,
            first_call: false,
            upstream: Duration::ZERO,
            sampled: AtomicBool::new(false),
        }
    }

    pub fn get(&self, seq: MsgSeq) -> Option<&Result<Receipt, Failure>> {
        self.items.binary_search_by_key(&seq, |(s, _)| *s).ok().map(|i| &self.items[i].1)
    }
}

/// A caller's handle on the batch that will answer one of its MsgSeqs.
pub type Waiter = watch::Receiver<Option<Arc<BatchOutcome>>>;

/// The sending side of a batch's outcome.
pub type Outcome = watch::Sender<Option<Arc<BatchOutcome>>>;

/// A caller joining a batch: when it stops waiting, and whose share pays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub deadline: Instant,
    pub client: ClientSlot,
}

/// A refused caller's misses riding along without it (docs/design.md#budget-and-dispatch): whose
/// refused caller they were, and when they are no longer worth a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parked {
    pub client: ClientSlot,
    pub expires: Instant,
}

/// Did this caller put the MsgSeq in a batch, or join one that already had it?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joined {
    Fetched,
    Coalesced,
}

/// Why a batch exists, and so where it queues and when it is dropped unsent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    /// Callers wait for it: it queues by the earliest deadline, retries stop at the latest.
    Callers { earliest: Instant, latest: Instant },
    /// Only refused callers' misses: dropped unsent at `expires` unless a caller joins.
    Background { expires: Instant },
}

impl BatchKind {
    pub fn for_caller(deadline: Instant) -> Self {
        Self::Callers { earliest: deadline, latest: deadline }
    }

    /// The kind once a caller with `deadline` waits for it too.
    pub fn with_caller(self, deadline: Instant) -> Self {
        match self {
            Self::Callers { earliest, latest } => {
                Self::Callers { earliest: earliest.min(deadline), latest: latest.max(deadline) }
            }
            Self::Background { .. } => Self::for_caller(deadline),
        }
    }

    /// After this, nobody can use its answer: it leaves the queue unsent.
    pub fn useless_after(self) -> Instant {
        match self {
            Self::Callers { latest, .. } => latest,
            Self::Background { expires } => expires,
        }
    }
}

/// The most request ids one upstream call's log line lists; the rest are counted.
pub const MAX_LOGGED_REQUESTS: usize = 16;

/// The request ids of the callers a batch serves, for its call's log line (docs/design.md#logs).
#[derive(Debug, Default)]
pub struct RequestIds {
    ids: Vec<Arc<str>>,
    more: usize,
}

impl RequestIds {
    /// Notes `id` (once; an empty id is not noted).
    pub fn add(&mut self, id: &str) {
        if id.is_empty() || self.ids.iter().any(|known| &**known == id) {
            return;
        }
        if self.ids.len() < MAX_LOGGED_REQUESTS {
            self.ids.push(id.into());
        } else {
            self.more += 1;
        }
    }
}

impl std::fmt::Display for RequestIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, id) in self.ids.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(id)?;
        }
        if self.more > 0 {
            write!(f, " (+{} more)", self.more)?;
        }
        Ok(())
    }
}

/// A batch's request ids, shared by its queue entry, its group's record of it on the
/// wire (for callers joining it there) and its call.
pub type Served = Arc<std::sync::Mutex<RequestIds>>;

/// Notes `request` in `served`.
pub fn note(served: &Served, request: &str) {
    served.lock().unwrap_or_else(|p| p.into_inner()).add(request);
}

/// A batch that can still take MsgSeqs of its group, waiting for a token.
pub struct OpenBatch {
    pub group: GroupId,
    /// Distinct MsgSeqs, in the order callers brought them.
    pub seqs: Vec<MsgSeq>,
    /// When it becomes ready: `window` after opening, or when it filled up.
    pub ready_at: Instant,
    pub kind: BatchKind,
    /// The client whose share pays for it and in whose line it waits: among its callers'
    /// clients, the one whose line serves it first (the client whose refused caller
    /// opened a background batch, until a caller joins).
    pub client: ClientSlot,
    /// The client that first asked for each of `seqs`, in the same order: whose share
    /// pays for isolating one Tencent refuses.
    pub askers: Vec<ClientSlot>,
    pub outcome: Outcome,
    /// Its callers' request ids.
    pub served: Served,
}

impl OpenBatch {
    pub fn new(group: GroupId, kind: BatchKind, ready_at: Instant, client: ClientSlot) -> Self {
        let (outcome, _) = watch::channel(None);
        Self { group, seqs: Vec::new(), ready_at, kind, client, askers: Vec::new(), outcome, served: Served::default() }
    }

    pub fn has_room(&self, max_seqs: usize) -> bool {
        self.seqs.len() < max_seqs
    }

    pub fn is_ready(&self, now: Instant, max_seqs: usize) -> bool {
        self.ready_at <= now || !self.has_room(max_seqs)
    }

    /// Adds `seq`, asked for by `client`; a batch that fills up is ready at once. Returns
    /// the new waiter.
    pub fn push(&mut self, seq: MsgSeq, client: ClientSlot, now: Instant, max_seqs: usize) -> Waiter {
        self.seqs.push(seq);
        self.askers.push(client);
        if !self.has_room(max_seqs) {
            self.ready_at = self.ready_at.min(now);
        }
        self.outcome.subscribe()
    }

    /// Resolves the batch unsent: every MsgSeq is [`Failure::Expired`].
    pub fn expire(self, now: Instant) {
        let items = self.seqs.iter().map(|&s| (s, Err(Failure::Expired))).collect();
        let _ = self.outcome.send(Some(Arc::new(BatchOutcome::settled(items, now))));
    }
}

/// The window a dispatched batch's retries live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// The earliest deadline among its callers: its retries queue by it.
    pub urgency: Instant,
    /// The latest deadline among its callers: retries stop there.
    pub deadline: Instant,
    /// The client it was dispatched for: its retries are paid from that client's share.
    pub client: ClientSlot,
}

impl Window {
    /// A batch's window when dispatched at `now`. A background batch's retries (a caller
    /// may still join it on the wire) queue like a caller whose deadline is the upstream
    /// timeout.
    pub fn of(kind: BatchKind, client: ClientSlot, now: Instant, upstream_timeout: Duration) -> Self {
        match kind {
            BatchKind::Callers { earliest, latest } => Self { urgency: earliest, deadline: latest, client },
            BatchKind::Background { .. } => {
                let deadline = now + upstream_timeout;
                Self { urgency: deadline, deadline, client }
            }
        }
    }
}

/// A batch the dispatcher has paid a token for, ready to be sent.
#[derive(Debug)]
pub struct Dispatch {
    pub id: BatchId,
    pub group: GroupId,
    /// Distinct MsgSeqs: those callers asked for first, then the top-up, then (with the
    /// fleet tier) what it took for other replicas.
    pub seqs: Vec<MsgSeq>,
    /// Which of `seqs` the gateway added on its own (cohort, neighbourhood), which nobody
    /// asked for: left out if Tencent refuses the call (docs/design.md#msgseqs-tencent-refuses).
    pub added: Vec<MsgSeq>,
    /// The client that first asked for each MsgSeq this replica's callers (or refused
    /// callers) asked for.
    pub askers: Vec<(MsgSeq, ClientSlot)>,
    pub window: Window,
    pub outcome: Outcome,
    /// When the dispatcher took it off the queue (its delivery counts from here).
    pub dispatched: Instant,
    /// Its callers' request ids, joiners on the wire included.
    pub served: Served,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_calls_request_ids_are_listed_up_to_sixteen_then_counted() {
        let mut ids = RequestIds::default();
        ids.add("a");
        ids.add("a");
        ids.add("");
        ids.add("b");
        assert_eq!(ids.to_string(), "a,b");
        for i in 0..20 {
            ids.add(&format!("r{i}"));
        }
        let shown = ids.to_string();
        assert_eq!(shown.split(',').count(), MAX_LOGGED_REQUESTS);
        assert!(shown.ends_with(" (+6 more)"), "{shown}");
    }

    use super::*;

    #[test]
    fn a_caller_turns_a_background_batch_into_a_callers_batch_and_widens_deadlines() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let background = BatchKind::Background { expires: t + 4 * s };
        assert_eq!(background.useless_after(), t + 4 * s);

        let joined = background.with_caller(t + 2 * s);
        let widened = joined.with_caller(t + s).with_caller(t + 3 * s);

        assert_eq!(joined, BatchKind::Callers { earliest: t + 2 * s, latest: t + 2 * s });
        assert_eq!(widened, BatchKind::Callers { earliest: t + s, latest: t + 3 * s });
        assert_eq!(widened.useless_after(), t + 3 * s);
    }

    #[test]
    fn a_full_batch_is_ready_at_once_and_an_expired_one_answers_every_seq() {
        let t = Instant::now();
        let mut batch = OpenBatch::new(
            GroupId::parse("g").unwrap(),
            BatchKind::for_caller(t),
            t + Duration::from_secs(1),
            ClientSlot::DEFAULT,
        );
        let waiter = batch.push(MsgSeq(2), ClientSlot::DEFAULT, t, 2);
        assert!(!batch.is_ready(t, 2));
        batch.push(MsgSeq(1), ClientSlot::DEFAULT, t, 2);
        assert!(batch.is_ready(t, 2));

        batch.expire(t);

        let outcome = waiter.borrow().clone().unwrap();
        assert_eq!(outcome.items, vec![(MsgSeq(1), Err(Failure::Expired)), (MsgSeq(2), Err(Failure::Expired))]);
    }
}
