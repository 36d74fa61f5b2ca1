use std::time::Duration;

use super::*;
use crate::cache::ReceiptCache;
use crate::config::CacheConfig;
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, Receipt};
use batch::{BatchKind, Failure, Neighbourhood};
use queue::Share;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

fn engine(max_seqs: usize) -> Engine {
    Engine::new(BatchPolicy {
        window: 2 * MS,
        max_seqs,
        ttl: S,
        upstream_timeout: 3 * S,
        neighbourhood: Neighbourhood::Here,
    })
}

fn group(name: &str) -> GroupId {
    GroupId::parse(name).unwrap()
}

fn seqs(r: std::ops::Range<u64>) -> Vec<MsgSeq> {
    r.map(MsgSeq).collect()
}

fn pace(interval: Duration) -> Estimate {
    Estimate { next_token: Duration::ZERO, interval }
}

fn hist() -> Histogram {
    Histogram::with_opts(prometheus::HistogramOpts::new("h", "h")).unwrap()
}

fn cache() -> ReceiptCache {
    ReceiptCache::new(&CacheConfig { ttl: S, stale: 60 * S, negative_ttl: S, callback_ttl: 10 * S, max_entries: 100 })
}

thread_local! {
    /// The callers' waiters: a caller that went away abandons its batch, so the
    /// tests' callers keep waiting (paused-time tests run on one thread).
    static WAITING: std::cell::RefCell<Vec<Waiter>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keeps the callers of `joined` waiting for the rest of the test.
fn keep(joined: Vec<(MsgSeq, Waiter, Joined)>) -> Vec<(MsgSeq, Waiter, Joined)> {
    WAITING.with(|w| w.borrow_mut().extend(joined.iter().map(|(_, waiter, _)| waiter.clone())));
    joined
}

/// Joins `misses` of `name` for a caller with `deadline` (no page, no lookup time),
/// who keeps waiting.
fn join(
    e: &Engine,
    name: &str,
    misses: &[MsgSeq],
    deadline: Instant,
    pace: Estimate,
) -> Result<Vec<(MsgSeq, Waiter, Joined)>, Overloaded> {
    let g = group(name);
    e.join(
        Ask { group: &g, page: None, misses, fetched_since: None, deadline, client: ClientSlot::DEFAULT, request: "" },
        pace,
    )
    .map(keep)
}

fn kinds(joined: &[(MsgSeq, Waiter, Joined)]) -> Vec<Joined> {
    joined.iter().map(|(_, _, j)| *j).collect()
}

#[tokio::test(start_paused = true)]
async fn a_batch_whose_callers_all_went_away_leaves_unpaid_and_does_not_linger() {
    let e = engine(50);
    let deadline = Instant::now() + S;
    let g = group("gone");
    let ask = Ask {
        group: &g,
        page: None,
        misses: &seqs(1..4),
        fetched_since: None,
        deadline,
        client: ClientSlot::DEFAULT,
        request: "",
    };
    let gone = e.join(ask, pace(Duration::ZERO)).unwrap();
    let kept = join(&e, "stays", &seqs(1..2), deadline, pace(Duration::ZERO)).unwrap();
    drop(gone);
    tokio::time::advance(3 * MS).await;

    let Some(Job::Batch(sent)) = e.pop(Instant::now(), &hist(), true) else { panic!("the waited-for batch goes") };
    assert_eq!(sent.group, group("stays"));
    assert!(e.pop(Instant::now(), &hist(), true).is_none(), "the abandoned one is not paid for");
    assert_eq!(e.take_dropped(), vec![(group("gone"), seqs(1..4))], "its fleet claims are given up");
    assert_eq!(e.sizes(), (0, 0, 1), "and nothing of it stays queued or in flight");
    drop(kept);
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_for_a_group_share_batches_of_max_seqs() {
    let e = engine(4);
    let far = Instant::now() + 10 * S;

    let a = join(&e, "g", &seqs(0..3), far, pace(Duration::ZERO)).unwrap();
    let b = join(&e, "g", &seqs(2..6), far, pace(Duration::ZERO)).unwrap();

    assert_eq!(kinds(&a), [Joined::Fetched; 3]);
    assert_eq!(kinds(&b), [Joined::Coalesced, Joined::Fetched, Joined::Fetched, Joined::Fetched]);
    // 6 distinct MsgSeqs in batches of at most 4: two batches, no key twice.
    assert_eq!(e.sizes(), (2, 0, 6));
}

#[tokio::test(start_paused = true)]
async fn the_most_urgent_ready_batch_goes_first() {
    let e = engine(1);
    let now = Instant::now();
    join(&e, "late", &seqs(0..1), now + 9 * S, pace(Duration::ZERO)).unwrap();
    join(&e, "soon", &seqs(0..1), now + 5 * S, pace(Duration::ZERO)).unwrap();

    let Some(Job::Batch(first)) = e.pop(Instant::now(), &hist(), true) else { panic!("no batch") };

    assert_eq!(first.group, group("soon"));
    assert_eq!(first.window.urgency, now + 5 * S);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_make_its_deadline_is_refused_with_a_retry_after() {
    let e = engine(1);
    let now = Instant::now();
    for i in 0..10 {
        join(&e, &format!("g{i}"), &seqs(0..1), now + 5 * S, pace(Duration::ZERO)).unwrap();
    }

    let urgent = join(&e, "new", &seqs(0..1), now + 500 * MS, pace(100 * MS));
    let late = join(&e, "new2", &seqs(0..1), now + 6 * S, pace(S));

    assert!(urgent.is_ok(), "nothing is ahead of an earlier deadline");
    // Eleven callers' batches queued at one token a second, then one call's reach
    // (no call measured yet: the margin).
    assert_eq!(late.unwrap_err().retry_after, 11 * S + admission::MARGIN);
}

/// An engine with five batches due within 5 s at one token a second, and a caller for
/// MsgSeqs 0..3 of group `g` that cannot wait behind them (true if it was refused).
fn crowded() -> (Engine, Instant, Estimate, bool) {
    let e = engine(10);
    let now = Instant::now();
    let slow = pace(S);
    for i in 0..5 {
        join(&e, &format!("busy{i}"), &seqs(0..1), now + 5 * S, slow).unwrap();
    }
    // Five batches due first at 1 s each: a little more than this caller has.
    let refused = join(&e, "g", &seqs(0..3), now + 5010 * MS, slow).is_err();
    (e, now, slow, refused)
}

#[tokio::test(start_paused = true)]
async fn a_refused_callers_misses_wait_in_a_background_batch_that_the_next_caller_promotes() {
    let (e, now, slow, refused) = crowded();
    let (open, _, inflight) = e.sizes();

    let later = join(&e, "g", &seqs(2..4), now + 30 * S, slow).unwrap();

    assert!(refused);
    assert_eq!((open, inflight), (6, 8), "the refused MsgSeqs wait in a sixth, background batch");
    assert_eq!(kinds(&later), [Joined::Coalesced, Joined::Fetched], "the next caller joins it");
    let tables = e.lock();
    let (id, batch) = tables.queue.open_batches().find(|(_, b)| b.group == group("g")).unwrap();
    assert_eq!(batch.kind, BatchKind::for_caller(now + 30 * S));
    assert_eq!(batch.seqs, seqs(0..4));
    assert!(tables.queue.queues_for_callers_at(*id, now + 30 * S, ClientSlot::DEFAULT));
}

#[tokio::test(start_paused = true)]
async fn a_background_batch_nobody_joins_is_dropped_after_its_lifetime() {
    let (e, _, _, refused) = crowded();
    assert!(refused);
    assert_eq!(e.sizes(), (6, 0, 8));

    // Four TTLs (the policy's TTL is 1 s) later.
    tokio::time::advance(4500 * MS).await;
    let next = {
        let mut t = e.lock();
        let Tables { groups, queue, .. } = &mut *t;
        queue.next(groups, Instant::now(), 10, Duration::ZERO, true)
    };

    assert!(matches!(next, Next::Ready), "the busy batches are still due");
    assert_eq!(e.sizes(), (5, 0, 5), "the background batch and its keys are gone");
}

#[tokio::test(start_paused = true)]
async fn batches_nobody_waits_for_are_dropped_without_a_token() {
    let e = engine(1);
    let joined = join(&e, "g", &seqs(0..1), Instant::now() + 80 * MS, pace(Duration::ZERO)).unwrap();

    // Less than the margin (30 ms, no call measured yet) before the deadline: no
    // answer could reach the caller in time.
    tokio::time::advance(75 * MS).await;
    let job = e.pop(Instant::now(), &hist(), true);

    assert!(job.is_none());
    let outcome = joined[0].1.borrow().clone().unwrap();
    assert_eq!(outcome.items, vec![(MsgSeq(0), Err(Failure::Expired))]);
    assert_eq!(e.sizes(), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn an_item_fetched_after_the_callers_lookup_is_not_fetched_again() {
    let e = engine(10);
    let g = group("g");
    let looked = Instant::now();
    let deadline = looked + 5 * S;
    // Between the caller's lookup and its join, a batch fetched MsgSeq 1.
    let receipt = Receipt { code: ErrorCode::OK, read: Some(4), unread: Some(5) };
    let page =
        cache().insert(AppId(1), &g, &[(MsgSeq(1), receipt)], Instant::now(), crate::cache::KeptBy::Polling).await;
    let ask = Ask {
        group: &g,
        page: Some(&page),
        misses: &[MsgSeq(7)],
        fetched_since: None,
        deadline,
        client: ClientSlot::DEFAULT,
        request: "",
    };
    keep(e.join(ask, pace(Duration::ZERO)).unwrap());

    let misses = [MsgSeq(1), MsgSeq(2)];
    let ask = Ask {
        group: &g,
        page: None,
        misses: &misses,
        fetched_since: Some(looked),
        deadline,
        client: ClientSlot::DEFAULT,
        request: "",
    };
    let joined = keep(e.join(ask, pace(Duration::ZERO)).unwrap());

    let (seq, waiter, how) = &joined[0];
    assert_eq!((*seq, *how), (MsgSeq(1), Joined::Coalesced));
    assert_eq!(waiter.borrow().as_ref().unwrap().get(MsgSeq(1)), Some(&Ok(receipt)));
    assert_eq!(joined[1].2, Joined::Fetched);
    assert_eq!(e.sizes(), (1, 0, 2), "only 7 and 2 are in flight");
}

#[tokio::test(start_paused = true)]
async fn dispatch_tops_up_with_read_messages_near_expiry_then_uncached_neighbours() {
    let e = engine(10);
    let g = group("g");
    let now = Instant::now();
    let cache = cache();
    let receipt = Receipt { code: ErrorCode::OK, read: Some(1), unread: Some(1) };
    let app = AppId(1);
    cache.insert(app, &g, &[(MsgSeq(1), receipt)], now - 700 * MS, crate::cache::KeptBy::Polling).await;
    cache.insert(app, &g, &[(MsgSeq(2), receipt)], now - 100 * MS, crate::cache::KeptBy::Polling).await;
    let page = cache.insert(app, &g, &[(MsgSeq(3), receipt)], now - 700 * MS, crate::cache::KeptBy::Polling).await;
    // 1 is read and expires within half a TTL: topped up. 2 is read but fresh for long,
    // 3 is due but nobody read it: not.
    page.read(&[MsgSeq(1), MsgSeq(2)], now);
    let deadline = now + 5 * S;
    let ask = Ask {
        group: &g,
        page: Some(&page),
        misses: &[MsgSeq(9)],
        fetched_since: None,
        deadline,
        client: ClientSlot::DEFAULT,
        request: "",
    };
    keep(e.join(ask, pace(Duration::ZERO)).unwrap());
    tokio::time::advance(5 * MS).await;

    let Some(Job::Batch(d)) = e.pop(Instant::now(), &hist(), true) else { panic!("no batch") };

    // The cohort first (1), then the neighbourhood below 9 the group has not cached.
    assert_eq!(d.seqs, [9, 1, 8, 7, 6, 5, 4].map(MsgSeq).to_vec());
    assert_eq!(d.added, [1, 8, 7, 6, 5, 4].map(MsgSeq).to_vec(), "nobody asked for these");
    assert_eq!(d.askers, vec![(MsgSeq(9), ClientSlot::DEFAULT)]);
    // The topped-up key is now in flight: a caller joins this batch.
    let j = join(&e, "g", &[MsgSeq(1)], deadline, pace(Duration::ZERO)).unwrap();
    assert_eq!(j[0].2, Joined::Coalesced);
}

#[tokio::test(start_paused = true)]
async fn retry_permits_queue_by_urgency_among_batches_and_abandoned_ones_cost_nothing() {
    let e = engine(1);
    let now = Instant::now();
    join(&e, "batch", &seqs(0..1), now + 5 * S, pace(Duration::ZERO)).unwrap();
    let urgent = e.permit(now + 2 * S, ClientSlot::DEFAULT, queue::Billing::Now);
    let abandoned = e.permit(now + S, ClientSlot::DEFAULT, queue::Billing::Now);
    drop(abandoned);

    let first = e.pop(now, &hist(), true);
    let second = e.pop(now, &hist(), true);

    assert!(matches!(first, Some(Job::Permit(_))), "the live permit is more urgent than the batch");
    assert!(matches!(second, Some(Job::Batch(_))));
    assert_eq!(e.sizes(), (0, 0, 1));
    drop(urgent);
}

/// An engine whose client 0 has weight 3 and client 1 weight 1, each with `n` ready
/// batches of distinct groups due at the same time.
fn two_clients(n: usize) -> (Engine, Instant) {
    let e = engine(1);
    e.set_shares(vec![Share { weight: 3, calls: None }, Share { weight: 1, calls: None }]);
    let deadline = Instant::now() + 100 * S;
    for i in 0..n {
        for client in [ClientSlot(0), ClientSlot(1)] {
            queue_for(&e, client, i..i + 1, deadline, pace(Duration::ZERO));
        }
    }
    (e, deadline)
}

/// Joins one miss of each group `c<client>-<i>` for `i` in `range`, as `client`.
fn queue_for(e: &Engine, client: ClientSlot, range: std::ops::Range<usize>, deadline: Instant, pace: Estimate) {
    for i in range {
        let g = group(&format!("c{}-{i}", client.0));
        let ask =
            Ask { group: &g, page: None, misses: &seqs(0..1), fetched_since: None, deadline, client, request: "" };
        keep(e.join(ask, pace).unwrap());
    }
}

/// Pops `n` batches and counts them by the client whose group they carry.
fn pop_clients(e: &Engine, n: usize) -> [usize; 2] {
    let mut served = [0; 2];
    for _ in 0..n {
        let Some(Job::Batch(d)) = e.pop(Instant::now(), &hist(), true) else { panic!("no batch") };
        served[usize::from(d.group.to_string().starts_with("c1-"))] += 1;
    }
    served
}

#[tokio::test(start_paused = true)]
async fn contended_tokens_split_by_weight_and_an_idle_client_banks_no_credit() {
    let (e, _) = two_clients(40);
    tokio::time::advance(5 * MS).await;

    assert_eq!(pop_clients(&e, 40), [30, 10], "weights 3 : 1");

    // Client 0 alone for a while: client 1 does not come back with credit saved up.
    let (e, deadline) = two_clients(0);
    queue_for(&e, ClientSlot(0), 0..40, deadline, pace(Duration::ZERO));
    tokio::time::advance(5 * MS).await;
    assert_eq!(pop_clients(&e, 20), [20, 0], "work conserving: the only client gets every token");
    queue_for(&e, ClientSlot(1), 0..20, deadline, pace(Duration::ZERO));
    tokio::time::advance(5 * MS).await;
    assert_eq!(pop_clients(&e, 8), [6, 2], "3 : 1 again at once, not 0 : 8");
}

#[tokio::test(start_paused = true)]
async fn a_batch_two_clients_share_waits_in_the_line_that_serves_it_first() {
    let (e, deadline) = two_clients(0);
    // Client 0 (weight 3) has 30 batches due before the shared group's.
    queue_for(&e, ClientSlot(0), 0..30, deadline, pace(Duration::ZERO));
    let g = group("shared");
    let later = deadline + S;
    for (client, at) in [(ClientSlot(0), later), (ClientSlot(1), later + S)] {
        let ask =
            Ask { group: &g, page: None, misses: &seqs(0..1), fetched_since: None, deadline: at, client, request: "" };
        keep(e.join(ask, pace(Duration::ZERO)).unwrap());
    }
    tokio::time::advance(5 * MS).await;

    let order: Vec<String> = (0..2)
        .map(|_| match e.pop(Instant::now(), &hist(), true) {
            Some(Job::Batch(d)) => d.group.to_string(),
            _ => String::new(),
        })
        .collect();

    // Client 1's empty line serves it at client 1's first turn, not after client 0's 30.
    assert_eq!(order, ["c0-0", "shared"]);
}

#[tokio::test(start_paused = true)]
async fn admission_counts_a_callers_own_line_by_its_share() {
    let (e, _) = two_clients(0);
    let now = Instant::now();
    // Admitted while tokens came every 10 ms: client 0 (weight 3) floods, 30 batches
    // due in 2 s; client 1 has 5.
    queue_for(&e, ClientSlot(0), 0..30, now + 2 * S, pace(10 * MS));
    queue_for(&e, ClientSlot(1), 0..5, now + 2 * S, pace(10 * MS));
    let slow = pace(100 * MS);
    let ask = |name: &str, client| {
        let g = group(name);
        let deadline = now + 3500 * MS;
        e.join(
            Ask { group: &g, page: None, misses: &seqs(0..1), fetched_since: None, deadline, client, request: "" },
            slow,
        )
    };

    // Client 1's caller: its 5, and client 0's 3 per one of them (15): 2 s at 10
    // tokens a second, in time.
    assert!(ask("b", ClientSlot(1)).is_ok());
    // Client 0's caller: its 30 and client 1's 6 (at most 10 while client 0 drains 30):
    // 3.6 s, past its 3.5 s; alone, 3 s would have been in time.
    let refused = ask("a", ClientSlot(0)).unwrap_err();
    assert_eq!(refused.retry_after, 36 * 100 * MS + admission::MARGIN);
}

#[tokio::test(start_paused = true)]
async fn at_equal_deadlines_work_queues_in_the_order_it_was_created() {
    let e = engine(1);
    let deadline = Instant::now() + 5 * S;
    let early_permit = e.permit(deadline, ClientSlot::DEFAULT, queue::Billing::Now);
    join(&e, "g", &seqs(0..1), deadline, pace(Duration::ZERO)).unwrap();
    let late_permit = e.permit(deadline, ClientSlot::DEFAULT, queue::Billing::Now);

    let order: Vec<bool> =
        (0..3).map(|_| matches!(e.pop(Instant::now(), &hist(), true), Some(Job::Permit(_)))).collect();

    assert_eq!(order, [true, false, true], "permit, batch, permit");
    drop((early_permit, late_permit));
}

#[tokio::test(start_paused = true)]
async fn the_top_up_never_adds_a_msgseq_tencent_refused_lately_and_requests_for_one_are_refused() {
    let e = engine(50);
    let g = group("g");
    let refused = [(MsgSeq(5), "MsgSeq 5 is invalid".to_owned()), (MsgSeq(7), "MsgSeq 7 is invalid".to_owned())];
    e.remember_refused(&g, &refused, None, S);
    join(&e, "g", &[MsgSeq(9)], Instant::now() + 5 * S, pace(Duration::ZERO)).unwrap();
    tokio::time::advance(5 * MS).await;

    let Some(Job::Batch(d)) = e.pop(Instant::now(), &hist(), true) else { panic!("no batch") };

    assert_eq!(d.added, [8, 6, 4, 3, 2, 1].map(MsgSeq).to_vec(), "the neighbourhood without 5 and 7");
    let refusal = e.refused(&g, &[MsgSeq(1), MsgSeq(7)]).map(|r| r.seq);
    assert_eq!(refusal, Some(MsgSeq(7)));
    assert!(e.refused(&group("other"), &[MsgSeq(7)]).is_none());
    tokio::time::advance(S).await;
    assert!(e.refused(&g, &[MsgSeq(7)]).is_none(), "believed for the negative TTL given");
}

#[tokio::test(start_paused = true)]
async fn background_calls_for_refused_callers_stay_within_their_clients_allowance() {
    let (e, now, slow, _) = crowded();
    let refused_as = |client: ClientSlot, i: usize| {
        let g = group(&format!("gone-{}-{i}", client.0));
        let ask = Ask {
            group: &g,
            page: None,
            misses: &seqs(0..1),
            fetched_since: None,
            deadline: now + 5010 * MS,
            client,
            request: "",
        };
        e.join(ask, slow).is_err()
    };
    // Twenty refused callers of the default client, parked (`crowded` parked one).
    assert!((0..19).all(|i| refused_as(ClientSlot::DEFAULT, i)));
    // Another client, with enough queued in its own line to be refused too.
    queue_for(&e, ClientSlot(1), 0..3, now + 5 * S, slow);
    assert!(refused_as(ClientSlot(1), 0));
    tokio::time::advance(5 * MS).await;
    let pop = || match e.pop(Instant::now(), &hist(), true) {
        Some(Job::Batch(d)) => Some(d.group.to_string()),
        _ => None,
    };
    let next = || {
        let mut t = e.lock();
        let Tables { groups, queue, .. } = &mut *t;
        queue.next(groups, Instant::now(), 10, Duration::ZERO, true)
    };

    let sent: Vec<String> = std::iter::from_fn(pop).collect();

    // `crowded` parked the default client's caller of "g".
    let parked = |client: u16, g: &str| g.starts_with(&format!("gone-{client}-")) || (client == 0 && g == "g");
    let background = |client: u16| sent.iter().filter(|g| parked(client, g)).count();
    assert_eq!(sent.len() - background(0) - background(1), 8, "the callers' batches first");
    assert_eq!(background(0), fair::BACKGROUND_BURST as usize, "then the default client's allowance");
    assert_eq!(background(1), 1, "the other client's allowance is its own");
    let refill = Duration::from_secs_f64(1.0 / fair::BACKGROUND_RATE);
    assert!(matches!(next(), Next::At(t) if t == Instant::now() + refill), "nothing is ready until it refills");
    tokio::time::advance(refill).await;
    assert!(pop().is_some_and(|g| g.starts_with("gone-0-")) && pop().is_none(), "one call per refill");
}

/// Shares of weight 1 for clients 0 and 1, with counters of the calls charged to them.
fn counted_shares(e: &Engine) -> [prometheus::IntCounter; 2] {
    let calls = [0, 1].map(|i| prometheus::IntCounter::new(format!("calls_{i}"), "calls").unwrap());
    e.set_shares(calls.iter().map(|c| Share { weight: 1, calls: Some(c.clone()) }).collect());
    calls
}

#[tokio::test(start_paused = true)]
async fn a_background_batch_is_charged_to_the_client_whose_refused_caller_it_serves() {
    let e = engine(10);
    let calls = counted_shares(&e);
    let now = Instant::now();
    let slow = pace(S);
    queue_for(&e, ClientSlot(0), 0..5, now + 5 * S, slow);
    queue_for(&e, ClientSlot(1), 0..3, now + 5 * S, slow);
    let g = group("refused");
    let ask = Ask {
        group: &g,
        page: None,
        misses: &seqs(0..1),
        fetched_since: None,
        deadline: now + 5010 * MS,
        client: ClientSlot(1),
        request: "",
    };
    assert!(e.join(ask, slow).is_err());
    tokio::time::advance(5 * MS).await;

    let popped = (0..9).filter(|_| matches!(e.pop(Instant::now(), &hist(), true), Some(Job::Batch(_)))).count();

    assert_eq!(popped, 9, "eight callers' batches, then the background one on spare budget");
    assert_eq!([calls[0].get(), calls[1].get()], [5, 4]);
    // Client 1's turns were charged four calls, not three: client 0 goes first now.
    queue_for(&e, ClientSlot(0), 10..12, now + 20 * S, slow);
    queue_for(&e, ClientSlot(1), 10..12, now + 20 * S, slow);
    tokio::time::advance(5 * MS).await;
    assert_eq!(pop_clients(&e, 1), [1, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_permit_billed_later_is_charged_to_whom_the_bill_names_and_shifts_its_turns() {
    let e = engine(1);
    let calls = counted_shares(&e);
    let deadline = Instant::now() + 100 * S;
    let permit = e.permit(deadline, ClientSlot(0), queue::Billing::Later);

    let granted = matches!(e.pop(Instant::now(), &hist(), true), Some(Job::Permit(_)));
    let uncharged = [calls[0].get(), calls[1].get()];
    e.bill(ClientSlot(1), 3);
    for client in [ClientSlot(0), ClientSlot(1)] {
        queue_for(&e, client, 0..4, deadline, pace(Duration::ZERO));
    }
    tokio::time::advance(5 * MS).await;

    assert!(granted);
    assert_eq!(uncharged, [0, 0], "nobody is charged when it is granted");
    assert_eq!(pop_clients(&e, 3), [3, 0], "client 1 paid for three calls: client 0 goes first");
    assert_eq!([calls[0].get(), calls[1].get()], [3, 3]);
    drop(permit);
}
