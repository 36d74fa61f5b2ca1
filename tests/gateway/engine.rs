//! The engine (docs/design.md#request-pipeline): cache, single-flight, batching, cohorts, the
//! budget queue, isolation. Savings are proven by counting the simulator's calls.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use receipt_gateway::simulator::Fault;
use receipt_gateway::tencent::code::ErrorCode;

use crate::support::{RECEIPT, Reply, Setup, TestApp, body, busiest_second_sent, expected, outcome, until, within};

/// Sends every (group, seqs) at once over one h2 connection; replies in the same order.
async fn concurrently(app: &TestApp, requests: &[(String, Vec<u64>)], headers: &[(&str, &str)]) -> Vec<Reply> {
    let each: Vec<_> = requests.iter().map(|(group, seqs)| (group.clone(), seqs.clone(), headers)).collect();
    concurrently_with(app, &each).await
}

/// Request headers, as (name, value).
type Headers<'a> = &'a [(&'a str, &'a str)];

/// Sends every (group, seqs) with its own headers at once over one h2 connection;
/// replies in the same order.
async fn concurrently_with(app: &TestApp, requests: &[(String, Vec<u64>, Headers<'_>)]) -> Vec<Reply> {
    let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let tasks: Vec<_> = requests
        .iter()
        .map(|(group, seqs, headers)| {
            let mut builder = Request::post(format!("{}{RECEIPT}", app.url));
            for (k, v) in *headers {
                builder = builder.header(*k, *v);
            }
            let request = builder.body(Full::new(Bytes::from(body(group, seqs)))).unwrap();
            let h2 = h2.clone();
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                let response = within(h2.request(request)).await.expect("answered");
                let (status, headers) = (response.status(), response.headers().clone());
                let bytes = within(response.into_body().collect()).await.expect("body").to_bytes();
                Reply { status, headers, body: serde_json::from_slice(&bytes).unwrap_or_default() }
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(within(task).await.unwrap());
    }
    replies
}

#[tokio::test]
async fn a_hundred_concurrent_requests_for_a_group_cost_one_call_per_max_seqs_and_a_repeat_costs_none() {
    let _heavy = crate::support::heavy().await;
    // A wide window lets every request land before the batches may leave.
    let app = TestApp::spawn_with(Setup::sections("[batch]\nwindow_ms = 1000\n[cache]\nttl_ms = 60000\n")).await;
    let requests: Vec<(String, Vec<u64>)> =
        (0..100u64).map(|i| ("g-hundred".to_owned(), (0..10).map(|k| (i * 7 + k * 13) % 120 + 1).collect())).collect();
    let distinct: std::collections::BTreeSet<u64> = requests.iter().flat_map(|r| r.1.clone()).collect();

    let first = concurrently(&app, &requests, &[]).await;
    let calls_after_first = app.sim.call_count();
    let again = concurrently(&app, &requests, &[]).await;

    for (reply, (group, seqs)) in first.iter().zip(&requests) {
        assert_eq!(reply.outcome(), StatusCode::OK);
        assert_eq!(reply.items(), seqs.iter().map(|&s| expected(group, s)).collect::<Vec<_>>());
    }
    assert_eq!(calls_after_first, distinct.len().div_ceil(50), "{:?}", app.sim.calls());
    let mut fetched: Vec<u64> = app.sim.calls().iter().flat_map(|c| c.seqs.clone()).collect();
    fetched.sort_unstable();
    assert_eq!(fetched, distinct.into_iter().collect::<Vec<_>>(), "every MsgSeq fetched exactly once");
    assert!(again.iter().all(|r| r.header("x-cache") == Some("HIT")));
    assert_eq!(app.sim.call_count(), calls_after_first, "a repeat within ttl_ms costs no call");
}

#[tokio::test]
async fn a_key_in_flight_is_never_fetched_twice_and_new_keys_go_in_their_own_call() {
    let app = TestApp::spawn().await;
    app.sim.hold_calls();
    let first = app.post_in_background(body("g-sf", &[1, 2, 3]), &[]);
    until(|| app.sim.held_calls() == 1).await;
    // 1, 2, 3 are on the wire now: the second caller joins them and fetches 4.
    let later = body("g-sf", &[2, 3, 4]);
    let (second, ()) = tokio::join!(app.post(&later), async {
        until(|| app.sim.held_calls() == 2).await;
        app.sim.release_calls();
    });

    assert_eq!(within(first).await.unwrap(), Some(StatusCode::OK));
    assert_eq!(second.outcome(), StatusCode::OK);
    assert_eq!(second.header("x-cache"), Some("MISS"), "joined the in-flight fetch and fetched the rest");
    let seqs: Vec<Vec<u64>> = app.sim.calls().iter().map(|c| c.seqs.clone()).collect();
    assert_eq!(seqs, vec![vec![1, 2, 3], vec![4]]);
    assert_eq!(second.items(), vec![expected("g-sf", 2), expected("g-sf", 3), expected("g-sf", 4)]);
}

#[tokio::test]
async fn a_caller_that_goes_away_does_not_cancel_the_call_others_wait_on() {
    let app = TestApp::spawn().await;
    let inflight = "receipt_gateway_inflight_requests";
    let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let send = |group: &str| {
        let request = Request::post(format!("{}{RECEIPT}", app.url)).body(Full::new(Bytes::from(body(group, &[5]))));
        let h2 = h2.clone();
        tokio::spawn(async move {
            within(h2.request(request.unwrap())).await.map(|r| outcome(r.status(), r.headers())).ok()
        })
    };
    app.sim.hold_calls();
    let leaver = send("g-away");
    until(|| app.sim.held_calls() == 1).await;
    let stayer = send("g-away");
    app.until_metric(inflight, 2.0).await;

    // The leaver resets its stream while the call it started is still held upstream.
    leaver.abort();
    app.until_metric(inflight, 1.0).await;
    let still_held = app.sim.held_calls();
    app.sim.release_calls();

    assert_eq!(still_held, 1, "the gateway saw the caller leave before upstream answered");
    assert_eq!(within(stayer).await.unwrap(), Some(StatusCode::OK));
    assert_eq!(app.sim.call_count(), 1);
    let cached = app.post(&body("g-away", &[5])).await;
    assert_eq!(cached.header("x-cache"), Some("HIT"), "the call completed and filled the cache");
}

#[tokio::test]
async fn no_cache_asks_upstream_again_and_max_age_accepts_older_items() {
    let app = TestApp::spawn_with(Setup::sections("[cache]\nttl_ms = 500\nstale_ms = 60000\n")).await;
    let first = app.post(&body("g-cc", &[1])).await;
    app.sim.set_receipt("g-cc", 1, 42, 1);

    let cached = app.post(&body("g-cc", &[1])).await;
    let no_cache = app.post_with("", &body("g-cc", &[1]), &[("cache-control", "no-cache")]).await;
    // Let the entry age past ttl_ms (time passing is the subject here, not a sync).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let old_ok = app.post_with("", &body("g-cc", &[1]), &[("cache-control", "max-age=60")]).await;
    let calls_before_default = app.sim.call_count();
    let refreshed = app.post(&body("g-cc", &[1])).await;

    assert_eq!(cached.items(), first.items());
    assert_eq!(cached.header("x-cache"), Some("HIT"));
    assert_eq!((no_cache.header("x-cache"), no_cache.items()[0].1), (Some("MISS"), 42));
    assert_eq!((old_ok.header("x-cache"), old_ok.items()[0].1), (Some("HIT"), 42));
    assert_eq!(calls_before_default, 2, "max-age was answered from the cache");
    assert_eq!((refreshed.header("x-cache"), app.sim.call_count()), (Some("MISS"), 3));
}

#[tokio::test]
async fn stale_items_stand_in_when_upstream_fails_but_not_for_no_cache() {
    let app =
        TestApp::spawn_with(Setup::sections("[cache]\nttl_ms = 50\nstale_ms = 60000\n[upstream]\nmax_retries = 0\n"))
            .await;
    let fresh = app.post(&body("g-stale", &[1, 2])).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    app.sim.inject(Fault::HttpStatus(503), 2);

    let stale = app.post(&body("g-stale", &[2, 1])).await;
    let strict = app.post_with("", &body("g-stale", &[1]), &[("cache-control", "no-cache")]).await;

    assert_eq!(stale.outcome(), StatusCode::OK);
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    assert!(stale.header("age").is_some());
    assert_eq!(stale.items(), vec![fresh.items()[1], fresh.items()[0]]);
    assert_eq!((strict.outcome(), strict.code()), (StatusCode::BAD_GATEWAY, 10002));
}

#[tokio::test]
async fn negative_answers_are_cached_for_negative_ttl() {
    let app = TestApp::spawn_with(Setup::sections("[cache]\nnegative_ttl_ms = 60000\n")).await;

    for _ in 0..3 {
        let none = app.post(&body("g-neg", &[2_000_000])).await;
        let missing = app.post(&body("missing-neg", &[1, 2])).await;
        assert_eq!(none.items()[0].3, 10062);
        assert_eq!(missing.code(), 10010);
    }

    assert_eq!(app.sim.call_count(), 2, "one call each; the rest from the cache");
}

/// Read messages due within half a TTL ride along with their group's next call, so the
/// group refreshes together. The gateway decides by its clock; this test's clock brackets
/// each decision, and an attempt whose brackets cannot tell (a stalled machine: each step
/// has 400 ms to spare) is made again on another group.
#[tokio::test]
async fn a_group_refreshes_as_one_cohort() {
    let app = TestApp::spawn_with(Setup::sections("[cache]\nttl_ms = 1000\n")).await;
    for attempt in 0..3 {
        if cohort_refreshes(&app, &format!("g-cohort-{attempt}")).await {
            return;
        }
    }
    panic!("three attempts too slow to tell");
}

/// One attempt of [`a_group_refreshes_as_one_cohort`] on `group`; false if it cannot tell.
async fn cohort_refreshes(app: &TestApp, group: &str) -> bool {
    let ttl = Duration::from_millis(1000);
    let seqs: Vec<u64> = (1..=10).collect();
    let before_fetch = Instant::now();
    app.post(&body(group, &seqs)).await;
    let read = app.post(&body(group, &seqs)).await;
    let after_read = Instant::now();
    // Past half the TTL, the read messages are due for refresh with the group's next call.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before_miss = Instant::now();
    let miss = app.post(&body(group, &[11])).await;
    let after_miss = Instant::now();
    // Past the first fetch's expiry: only the cohort refresh can make these fresh.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = app.post(&body(group, &seqs)).await;
    let after_later = Instant::now();

    // The read and the miss came before the first fetch expired, and the last answer
    // within a TTL of the miss's call: else this attempt cannot tell.
    if after_read - before_fetch >= ttl || after_miss - before_fetch >= ttl || after_later - before_miss >= ttl {
        return false;
    }
    assert_eq!(read.header("x-cache"), Some("HIT"));
    assert_eq!(miss.items(), vec![expected(group, 11)]);
    let calls: Vec<_> = app.sim.calls().into_iter().filter(|c| c.group.as_deref() == Some(group)).collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let mut topped_up = calls[1].seqs.clone();
    topped_up.sort_unstable();
    assert_eq!(topped_up, (1..=11).collect::<Vec<_>>(), "the miss carried the group's read messages");
    assert_eq!(later.header("x-cache"), Some("HIT"), "refreshed by the cohort call, not expired");
    true
}

#[tokio::test]
async fn when_the_budget_cannot_make_the_deadline_callers_get_429_with_retry_after() {
    let app = TestApp::spawn_with(Setup { sim_limit: 100_000, ..Setup::sections("[budget]\nper_second = 5\n") }).await;
    let requests: Vec<(String, Vec<u64>)> = (0..30).map(|i| (format!("g-busy-{i}"), vec![1])).collect();

    let replies = concurrently(&app, &requests, &[("x-request-timeout-ms", "1000")]).await;

    let ok = replies.iter().filter(|r| r.outcome() == StatusCode::OK).count();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.outcome() == StatusCode::TOO_MANY_REQUESTS).collect();
    // A 504 is the deadline's answer to a call that came back too late (a stalled machine).
    let late = replies.iter().filter(|r| r.outcome() == StatusCode::GATEWAY_TIMEOUT).count();
    assert_eq!(ok + refused.len() + late, 30);
    assert!(ok <= 7, "{ok} answered at 5/s within 1 s");
    assert!(refused.len() >= 30 - 7 - late, "{} refused", refused.len());
    for r in &refused {
        assert_eq!(r.code(), 60007);
        let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(retry >= 1, "{r:?}");
    }
    // Refused by admission, as they arrived (not held until their deadline).
    let by_admission =
        app.metric("receipt_gateway_client_rejected_total{client=\"default\",reason=\"deadline\"}").await;
    assert_eq!(by_admission, refused.len() as f64);
    let busiest = busiest_second_sent(&app.sim.calls());
    assert!(busiest <= 5, "{busiest} calls sent in one second");
}

#[tokio::test]
async fn throttling_lowers_the_effective_rate_and_is_retried() {
    let app = TestApp::spawn().await;
    app.sim.inject(Fault::ErrorCode(ErrorCode(60007)), 1);

    let reply = app.post(&body("g-throttled", &[1])).await;
    let rate =
        app.metric("receipt_gateway_budget_effective_rate{api=\"get_group_msg_receipt\",app=\"1400000000\"}").await;

    assert_eq!(reply.outcome(), StatusCode::OK);
    assert_eq!(app.sim.call_count(), 2);
    assert!((100.0..200.0).contains(&rate), "effective rate {rate}");
}

#[tokio::test]
async fn a_bad_msgseq_fails_only_the_caller_who_sent_it() {
    let app = TestApp::spawn_with(Setup::sections("[batch]\nwindow_ms = 200\n")).await;
    app.sim.reject_seq(666);
    let requests =
        vec![("g-iso".to_owned(), vec![1, 2, 3]), ("g-iso".to_owned(), vec![666, 4]), ("g-iso".to_owned(), vec![5, 6])];

    let replies = concurrently(&app, &requests, &[]).await;

    assert_eq!(replies[0].items(), vec![expected("g-iso", 1), expected("g-iso", 2), expected("g-iso", 3)]);
    assert_eq!(replies[2].items(), vec![expected("g-iso", 5), expected("g-iso", 6)]);
    assert_eq!((replies[1].outcome(), replies[1].code()), (StatusCode::BAD_REQUEST, 10004), "the caller's fault");
    assert!(replies[1].body["ErrorInfo"].as_str().unwrap_or_default().contains("666"));
    let first = &app.sim.calls()[0].seqs;
    assert!(
        [1, 2, 3, 666, 4, 5, 6].iter().all(|s| first.contains(s)),
        "the three callers were merged first: {first:?}"
    );
}

#[tokio::test]
async fn a_10004_about_the_whole_call_costs_a_bounded_number_of_splits() {
    let app = TestApp::spawn().await;
    // Every call refused with 10004, whatever it carries.
    app.sim.inject(Fault::ErrorCode(ErrorCode(10004)), 1000);
    let seqs: Vec<u64> = (1..=50).collect();

    let reply = app.post(&body("g-all-bad", &seqs)).await;

    // Tencent would refuse this request whole: the caller's input is wrong.
    assert_eq!((reply.outcome(), reply.code()), (StatusCode::BAD_REQUEST, 10004));
    // Halving to single MsgSeqs would take 99 calls; the split allowance (docs/design.md#upstream-calls: four
    // split calls per halving level, 24 for 50 MsgSeqs) stops at exactly 1 + 24.
    assert_eq!(app.sim.call_count(), 25, "{:?}", app.sim.calls());
}

/// Two clients, one of which sends MsgSeqs Tencent refuses.
const POISON_CLIENTS: &str = "[[clients]]\nid = \"innocent\"\n\n[[clients]]\nid = \"poison\"\n";

/// Tencent refuses every MsgSeq from this one up, as it refuses MsgSeqs past a group's
/// last message.
const PAST_THE_END: u64 = 1_000_000_000;

fn budget_calls(client: &str) -> String {
    format!(
        "receipt_gateway_budget_calls_total{{api=\"get_group_msg_receipt\",app=\"1400000000\",client=\"{client}\"}}"
    )
}

#[tokio::test]
async fn three_callers_of_a_cold_group_one_sending_a_msgseq_tencent_refuses_each_get_their_own_answer() {
    // A window wide enough that the three ride in one batch, whose neighbourhood (the 44
    // MsgSeqs below 5,000,000,000) Tencent refuses too.
    let app = TestApp::spawn_with(Setup::sections(&format!("[batch]\nwindow_ms = 200\n{POISON_CLIENTS}"))).await;
    app.sim.reject_from(PAST_THE_END);
    let (innocent, poison): (Headers<'_>, Headers<'_>) = (&[("x-client-id", "innocent")], &[("x-client-id", "poison")]);
    let requests = vec![
        ("g-three".to_owned(), vec![1, 2, 3], innocent),
        ("g-three".to_owned(), vec![5_000_000_000], poison),
        ("g-three".to_owned(), vec![4, 5], &[][..]),
    ];

    let replies = concurrently_with(&app, &requests).await;
    let calls = app.sim.calls();
    let again = concurrently_with(&app, &requests).await;

    assert_eq!(replies[0].items(), vec![expected("g-three", 1), expected("g-three", 2), expected("g-three", 3)]);
    assert_eq!(replies[2].items(), vec![expected("g-three", 4), expected("g-three", 5)]);
    let refused = &replies[1];
    assert_eq!((refused.outcome(), refused.code()), (StatusCode::BAD_REQUEST, 10004), "{refused:?}");
    assert!(refused.body["ErrorInfo"].as_str().unwrap_or_default().contains("5000000000"), "{refused:?}");
    // The merged call with its neighbourhood; the callers' six MsgSeqs alone; then halves
    // of them, sorted: [1,2,3] [4,5,5e9], [4] [5,5e9], [5] [5e9].
    let seqs: Vec<Vec<u64>> = calls.iter().map(|c| c.seqs.clone()).collect();
    assert_eq!(calls.len(), 8, "{seqs:?}");
    assert_eq!(seqs[0].len(), 50, "the first call carried the neighbourhood");
    let mut alone = seqs[1].clone();
    alone.sort_unstable();
    assert_eq!(alone, vec![1, 2, 3, 4, 5, 5_000_000_000], "then the callers' MsgSeqs alone");
    // The seven calls that isolated it are the poison client's.
    let (poison_calls, others) = (
        app.metric(&budget_calls("poison")).await,
        app.metric(&budget_calls("innocent")).await + app.metric(&budget_calls("default")).await,
    );
    assert!(poison_calls >= 7.0 && poison_calls + others == 8.0, "poison {poison_calls}, others {others}");
    // Asked again: the refusal is remembered, the others' items are cached.
    assert_eq!(app.sim.call_count(), 8, "{:?}", app.sim.calls());
    assert_eq!((again[1].outcome(), again[1].code()), (StatusCode::BAD_REQUEST, 10004));
    assert_eq!((again[0].header("x-cache"), again[2].header("x-cache")), (Some("HIT"), Some("HIT")));
}

#[tokio::test]
async fn a_client_sending_refused_msgseqs_costs_two_calls_then_none_and_never_fails_another_client() {
    let app = TestApp::spawn_with(Setup::sections(POISON_CLIENTS)).await;
    app.sim.reject_from(PAST_THE_END);
    let group = "g-flood";
    let seconds = Duration::from_secs(3);

    // 20 requests a second for 3 s, each a new MsgSeq past the group's end; meanwhile
    // another client reads the group's first messages 10 times a second.
    let poison = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut replies = Vec::new();
        for i in 0..(20 * seconds.as_secs()) {
            tick.tick().await;
            let seq = 5_000_000_000 + i;
            let reply = app.post_with("", &body(group, &[seq]), &[("x-client-id", "poison")]).await;
            replies.push((seq, reply));
        }
        replies
    };
    let innocent = async {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut replies = Vec::new();
        for _ in 0..(10 * seconds.as_secs()) {
            tick.tick().await;
            replies.push(app.post_with("", &body(group, &[1, 2, 3]), &[("x-client-id", "innocent")]).await);
        }
        replies
    };
    let (poisoned, innocent) = tokio::join!(poison, innocent);

    for (seq, reply) in &poisoned {
        assert_eq!((reply.outcome(), reply.code()), (StatusCode::BAD_REQUEST, 10004), "{seq}: {reply:?}");
        assert!(reply.body["ErrorInfo"].as_str().unwrap_or_default().contains(&seq.to_string()), "{reply:?}");
    }
    for reply in &innocent {
        assert_eq!(reply.items(), vec![expected(group, 1), expected(group, 2), expected(group, 3)], "{reply:?}");
    }
    let refused: Vec<_> = app.sim.calls().into_iter().filter(|c| c.seqs.iter().any(|&s| s >= PAST_THE_END)).collect();
    // The first request: its call with the neighbourhood, then its MsgSeq alone. Then
    // everything from 5,000,000,000 up is refused without a call.
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[1].seqs, vec![5_000_000_000]);
}

#[tokio::test]
async fn a_caller_that_joined_a_msgseq_the_gateway_added_is_answered_when_tencent_refuses_the_call() {
    let app = TestApp::spawn().await;
    // 95 is in the neighbourhood of both requests below, and Tencent refuses it.
    app.sim.reject_seq(95);
    app.sim.hold_calls();
    let first = app.post_in_background(body("g-joined", &[100]), &[]);
    until(|| app.sim.held_calls() == 1).await;
    // 97 is on the wire, added to the first call: this caller joins it there.
    let joined = app.post_in_background(body("g-joined", &[97]), &[]);
    app.until_metric("receipt_gateway_inflight_requests", 2.0).await;
    app.sim.release_calls();

    assert_eq!(within(first).await.unwrap(), Some(StatusCode::OK));
    assert_eq!(within(joined).await.unwrap(), Some(StatusCode::OK), "asked again, not failed");
    let calls: Vec<(usize, i64)> = app.sim.calls().iter().map(|c| (c.seqs.len(), c.error_code.0)).collect();
    // Each with its neighbourhood, refused; then the asked MsgSeq alone.
    assert_eq!(calls, vec![(50, 10004), (1, 0), (50, 10004), (1, 0)]);
    let cached = app.post(&body("g-joined", &[97, 100])).await;
    assert_eq!(cached.items(), vec![expected("g-joined", 97), expected("g-joined", 100)]);
}

#[tokio::test]
async fn a_thousand_callers_refused_and_gone_cost_at_most_fifty_calls() {
    let _heavy = crate::support::heavy().await;
    let app = TestApp::spawn().await;
    // Ten h2 connections of a hundred requests each (within the gateway's streams per
    // connection), each request a miss of a group of its own.
    let mut connections = Vec::new();
    let mut requests = Vec::new();
    for c in 0..10 {
        let tcp = within(tokio::net::TcpStream::connect(app.url.trim_start_matches("http://"))).await.expect("connect");
        let (sender, connection) =
            within(hyper::client::conn::http2::handshake(TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)))
                .await
                .expect("h2");
        connections.push(tokio::spawn(connection));
        for i in 0..100 {
            let request = Request::post(format!("{}{RECEIPT}", app.url))
                .body(Full::new(Bytes::from(body(&format!("g-gone-{c}-{i}"), &[1]))))
                .unwrap();
            let mut sender = sender.clone();
            requests.push(tokio::spawn(async move { sender.send_request(request).await.map(|r| r.status()) }));
        }
    }
    // Every request has reached the gateway: answered (429 at once, mostly), or waiting.
    let arrived = || async {
        let (_, text) = app.admin_get("/metrics").await;
        let count = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let answered: f64 = text.lines().filter(|l| l.starts_with("receipt_gateway_requests_total{")).map(count).sum();
        let waiting: f64 =
            text.lines().filter(|l| l.starts_with("receipt_gateway_inflight_requests ")).map(count).sum();
        answered + waiting
    };
    within(async {
        while arrived().await < 1000.0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;

    // Every caller goes away at once.
    for task in &requests {
        task.abort();
    }
    for connection in &connections {
        connection.abort();
    }
    let at_disconnect = app.sim.call_count();
    app.until_metric("receipt_gateway_inflight_requests", 0.0).await;
    // Whatever was queued for them has gone or been dropped after the longest a refused
    // caller's misses may wait (four TTLs of 1 s).
    tokio::time::sleep(Duration::from_millis(4500)).await;

    let calls = app.sim.call_count();
    assert!(calls <= 50, "{calls} upstream calls for callers who were gone ({at_disconnect} before they left)");
}

#[tokio::test]
async fn a_group_level_error_reaches_only_that_groups_callers() {
    let app = TestApp::spawn().await;
    let requests = vec![("missing-iso".to_owned(), vec![1]), ("g-fine".to_owned(), vec![1])];

    let replies = concurrently(&app, &requests, &[]).await;

    assert_eq!(replies[0].code(), 10010);
    assert_eq!((replies[1].code(), replies[1].items()), (0, vec![expected("g-fine", 1)]));
}

#[tokio::test]
async fn metrics_count_items_by_source() {
    let app = TestApp::spawn().await;
    app.post(&body("g-metrics", &[1, 2])).await;
    app.post(&body("g-metrics", &[1, 2, 3])).await;

    let hit = app.metric("receipt_gateway_items_total{app=\"1400000000\",source=\"hit\"}").await;
    let fetched = app.metric("receipt_gateway_items_total{app=\"1400000000\",source=\"fetched\"}").await;
    let calls = app
        .metric("receipt_gateway_upstream_calls_total{api=\"get_group_msg_receipt\",app=\"1400000000\",result=\"ok\"}")
        .await;

    assert_eq!((hit, fetched, calls), (2.0, 3.0, 2.0));
    let (_, text) = app.admin_get("/metrics").await;
    assert!(!text.contains("g-metrics"), "group ids never become labels");
    app.stop().await;
}

mod mixes {
    //! Random concurrent mixes: every caller gets exactly its items, in its order, with
    //! the simulator's values; no key is fetched twice; no rolling second over budget.

    use super::*;
    use proptest::prelude::*;

    fn mix() -> impl Strategy<Value = Vec<(String, Vec<u64>)>> {
        let request =
            (0..3usize, proptest::collection::vec(1..60u64, 1..8)).prop_map(|(g, seqs)| (format!("g-mix-{g}"), seqs));
        proptest::collection::vec(request, 1..40)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
        #[test]
        fn every_caller_gets_its_own_items_and_each_key_is_fetched_once(requests in mix(), latency_ms in 0u64..40) {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async {
                let _heavy = crate::support::heavy().await;
                // The simulator's limit out of the way: its clock sees deliveries a busy
                // machine bunched, and a 60007 would be retried. The budget is checked on
                // the gateway's send instants.
                let app = TestApp::spawn_with(Setup { sim_limit: 100_000, ..Setup::sections("[budget]\nper_second = 40\n[cache]\nttl_ms = 86400000\n") }).await;
                app.sim.set_latency(Duration::from_millis(latency_ms));

                let replies = concurrently(&app, &requests, &[("x-request-timeout-ms", "10000")]).await;

                for (reply, (group, seqs)) in replies.iter().zip(&requests) {
                    prop_assert_eq!(reply.outcome(), StatusCode::OK);
                    prop_assert_eq!(reply.items(), seqs.iter().map(|&s| expected(group, s)).collect::<Vec<_>>());
                }
                let mut seen: HashMap<(String, u64), usize> = HashMap::new();
                for call in app.sim.calls() {
                    for seq in call.seqs {
                        *seen.entry((call.group.clone().unwrap_or_default(), seq)).or_default() += 1;
                    }
                }
                prop_assert!(seen.values().all(|&n| n == 1), "a key was fetched twice: {:?}", seen);
                prop_assert!(busiest_second_sent(&app.sim.calls()) <= 40);
                Ok(())
            })?;
        }
    }
}
