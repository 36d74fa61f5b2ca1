//! Back within seconds of an upstream hang (docs/design.md#admission, #fleet-tier): under a
//! steady load of callers with 1 s deadlines the simulator holds every call for 3 s, then
//! answers at once again; one gateway, then a fleet of three on one Redis budget, must be
//! back to what they did before the hang within 5 s of the release.
//!
//! Every request asks for a group nobody asked for before: each needs a call of its own,
//! and no stale item can stand in, so a caller is either admitted and answered from a call
//! (200) or refused (429) — or, while upstream holds its call, answered 504. The tests
//! judge what the gateway decides (the share of callers it admits, the calls it
//! dispatches) over whole seconds, not latencies: a busy machine makes the test slower,
//! not wrong. Each prints its time series and the seconds it took to be back.

use std::future::Future;
use std::time::Duration;

use http::StatusCode;
use receipt_gateway::simulator::Simulator;
use tokio::time::Instant;

use crate::fleet::{Fixture, Replica, metric, post};
use crate::redis::RedisServer;
use crate::support::{TestApp, body, heavy, within};

/// The callers' deadline.
const DEADLINE: &str = "1000";
/// Requests per second: a quarter of the default budget.
const RATE: u32 = 50;
/// The steady state before the hang (its first second, connections opening, is not
/// judged).
const STEADY: Duration = Duration::from_secs(3);
const HANG: Duration = Duration::from_secs(3);
/// How long after the release the load goes on.
const AFTER: Duration = Duration::from_secs(6);
/// The target: back within this long of the release.
const BACK_WITHIN: Duration = Duration::from_secs(5);
/// The resolution of the printed series and of the recovery time.
const BIN: Duration = Duration::from_millis(500);
/// Of the callers asking in a second, the share admitted when the gateway is back.
const BACK_AT: f64 = 0.9;

const DISPATCHED: &str =
    "receipt_gateway_budget_calls_total{api=\"get_group_msg_receipt\",app=\"1400000000\",client=\"default\"}";

/// What one caller got.
struct Asked {
    at: Instant,
    /// Which gateway it asked (by the order they were given).
    gateway: usize,
    status: StatusCode,
}

/// When the phases start.
#[derive(Clone, Copy)]
struct Timeline {
    start: Instant,
    hold: Instant,
    release: Instant,
    end: Instant,
}

impl Timeline {
    fn now() -> Timeline {
        let start = Instant::now();
        Timeline { start, hold: start + STEADY, release: start + STEADY + HANG, end: start + STEADY + HANG + AFTER }
    }

    /// The steady state judged: its last two seconds before the hang.
    fn steady(&self) -> (Instant, Instant) {
        (self.start + Duration::from_secs(1), self.hold)
    }

    /// The second in which the gateway must be back: the last before [`BACK_WITHIN`].
    fn judged(&self) -> (Instant, Instant) {
        (self.release + BACK_WITHIN - Duration::from_secs(1), self.release + BACK_WITHIN)
    }
}

/// [`RATE`] requests a second over `gateways` gateways in turn, each for a fresh group,
/// from the timeline's start to its end; the simulator holds every call from `hold` to
/// `release`. `post(gateway, body)` sends one request and gives its status.
async fn hang_under_load<F, Fut>(sim: &Simulator, t: Timeline, gateways: usize, tag: &str, post: F) -> Vec<Asked>
where
    F: Fn(usize, String) -> Fut,
    Fut: Future<Output = StatusCode> + Send + 'static,
{
    let fault = async {
        tokio::time::sleep_until(t.hold).await;
        sim.hold_calls();
        tokio::time::sleep_until(t.release).await;
        sim.release_calls();
    };
    let load = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
        let mut asked = Vec::new();
        for n in 0.. {
            let at = tick.tick().await;
            if at >= t.end {
                break;
            }
            let gateway = n % gateways;
            let status = post(gateway, body(&format!("g-{tag}-{n}"), &[1]));
            asked.push((at, gateway, tokio::spawn(status)));
        }
        let mut answered = Vec::new();
        for (at, gateway, status) in asked {
            answered.push(Asked { at, gateway, status: within(status).await.expect("the caller's task") });
        }
        answered
    };
    let ((), asked) = tokio::join!(fault, load);
    asked
}

/// Of the callers of `gateway` (all: None) asking in `[from, to)`, the share answered 200.
fn admitted(asked: &[Asked], gateway: Option<usize>, (from, to): (Instant, Instant)) -> f64 {
    let callers: Vec<&Asked> =
        asked.iter().filter(|a| a.at >= from && a.at < to && gateway.is_none_or(|g| a.gateway == g)).collect();
    callers.iter().filter(|a| a.status == StatusCode::OK).count() as f64 / callers.len().max(1) as f64
}

/// The simulator's calls in `[from, to)`.
fn calls(sim: &Simulator, (from, to): (Instant, Instant)) -> usize {
    sim.calls().iter().filter(|c| c.at >= from && c.at < to).count()
}

/// Prints the series (per [`BIN`] from the hang: the simulator's calls, callers answered
/// 200 / 429 / 504) and returns the time from the release to the end of the last bin in
/// which less than [`BACK_AT`] of the callers were admitted (for a look: the assertions
/// judge whole seconds).
fn report(name: &str, sim: &Simulator, asked: &[Asked], t: Timeline) -> Duration {
    eprintln!("{name}: per {} ms from the hang (t = 0 at the release): calls, 200/429/504", BIN.as_millis());
    let mut back_after = Duration::ZERO;
    let mut from = t.hold;
    while from < t.end {
        let bin = (from, from + BIN);
        let count = |s: StatusCode| asked.iter().filter(|a| a.at >= bin.0 && a.at < bin.1 && a.status == s).count();
        let since_release = from.saturating_duration_since(t.release);
        eprintln!(
            "  {:>5.1} s  {:>3} calls  {}/{}/{}",
            from.duration_since(t.hold).as_secs_f64() - HANG.as_secs_f64(),
            calls(sim, bin),
            count(StatusCode::OK),
            count(StatusCode::TOO_MANY_REQUESTS),
            count(StatusCode::GATEWAY_TIMEOUT)
        );
        if from >= t.release && admitted(asked, None, bin) < BACK_AT {
            back_after = since_release + BIN;
        }
        from += BIN;
    }
    back_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_admits_its_callers_again_within_seconds_of_an_upstream_hang() {
    let _heavy = heavy().await;
    let app = TestApp::spawn().await;
    let t = Timeline::now();

    let asked = hang_under_load(&app.sim, t, 1, "hang", |_, body| {
        let reply = app.post_in_background(body, &[("x-request-timeout-ms", DEADLINE)]);
        async move { reply.await.ok().flatten().unwrap_or(StatusCode::BAD_GATEWAY) }
    })
    .await;

    let back_after = report("one gateway", &app.sim, &asked, t);
    let steady_calls = calls(&app.sim, t.steady()) as f64 / 2.0;
    assert!(admitted(&asked, None, t.steady()) >= 0.95, "the steady state admits its callers");
    let admitted_then = admitted(&asked, None, t.judged());
    assert!(admitted_then >= BACK_AT, "{:.0} % admitted in the 5th second after the release", admitted_then * 100.0);
    let calls_then = calls(&app.sim, t.judged()) as f64;
    assert!(calls_then >= 0.8 * steady_calls, "{calls_then} calls in the 5th second, {steady_calls}/s before");
    eprintln!("one gateway: back {:.1} s after the release", back_after.as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_three_admits_its_callers_again_within_seconds_of_an_upstream_hang() {
    let _heavy = heavy().await;
    let f = Fixture::new("hang", 200).await;
    let redis = RedisServer::start(&f.dir.join("redis")).await;
    let fleet: Vec<Replica> = ["a", "b", "c"].iter().map(|n| f.replica(n, &redis, "")).collect();
    // Each replica opens its Redis connections with its first requests.
    for (i, r) in fleet.iter().enumerate() {
        assert_eq!(f.post(r, &body(&format!("g-warm-{i}"), &[1]), &[]).await.outcome(), StatusCode::OK);
    }
    let t = Timeline::now();
    let dispatched_at = |at: Instant| {
        let (fleet, client) = (&fleet, f.client.clone());
        async move {
            tokio::time::sleep_until(at).await;
            let mut each = Vec::new();
            for r in fleet {
                each.push(metric(&client, r, DISPATCHED).await);
            }
            each
        }
    };
    let urls: Vec<String> = fleet.iter().map(|r| r.url.clone()).collect();

    let (asked, before, after) = tokio::join!(
        hang_under_load(&f.sim, t, fleet.len(), "hang", |gateway, body| {
            let (client, url) = (f.client.clone(), urls[gateway].clone());
            async move { post(&client, &url, &body, &[("x-request-timeout-ms", DEADLINE)]).await.outcome() }
        }),
        dispatched_at(t.judged().0),
        dispatched_at(t.judged().1),
    );

    let back_after = report("fleet of 3", &f.sim, &asked, t);
    let steady_calls = calls(&f.sim, t.steady()) as f64 / 2.0;
    for (i, (before, after)) in before.iter().zip(&after).enumerate() {
        let own = admitted(&asked, Some(i), t.judged());
        assert!(admitted(&asked, Some(i), t.steady()) >= 0.95, "replica {i} admits its callers in the steady state");
        assert!(own >= BACK_AT, "replica {i}: {:.0} % admitted in the 5th second after the release", own * 100.0);
        // Its callers are a third of the load, and each needs a call.
        let sent = after - before;
        assert!(sent >= 0.8 * steady_calls / 3.0, "replica {i} dispatched {sent} calls in the 5th second");
    }
    eprintln!("fleet of 3: back {:.1} s after the release", back_after.as_secs_f64());
}
