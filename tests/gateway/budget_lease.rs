//! Budget leases (docs/design.md#leases): replicas take their grants of the shared budget a
//! few at a time ahead of need, so a Redis a round trip of 20 ms away (behind a
//! [`LatencyProxy`]) still lets the fleet spend its whole budget, and no rolling second
//! holds more than `budget.per_second` calls.

use std::time::Duration;

use http::StatusCode;

use crate::redis::RedisServer;
use crate::support::{LatencyProxy, Setup, TestApp, busiest_second_sent, within};

/// The fleet's budget: modest, so two debug-build replicas and the load stay light on two
/// cores, and above what two replicas could take with a Redis round trip (or two) per
/// token at 20 ms.
const PER_SECOND: u32 = 100;

/// Requests for distinct groups at `per_second` to `app` for `duration`; their statuses.
async fn load(app: &TestApp, tag: &str, per_second: u32, duration: Duration) -> Vec<Option<StatusCode>> {
    let headers = [("x-request-timeout-ms", "1000")];
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0.. {
        tick.tick().await;
        if start.elapsed() >= duration {
            break;
        }
        tasks.push(app.post_in_background(crate::support::body(&format!("g-{tag}-{i}"), &[1]), &headers));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(within(task).await.expect("request task"));
    }
    statuses
}

/// Two replicas over a Redis 20 ms away (10 ms added each way), each asked for distinct
/// groups at the whole budget's rate (twice what the fleet may send): over the steady
/// three seconds, the fleet sends at least 90 % of `per_second` (the pacing itself allows
/// about 97 %: `(1 s + 30 ms)` per `per_second` tokens). Not load-sensitive: the load is
/// twice the budget, so both dispatchers always have work, and what they send is set by
/// the grants they hold; with a Redis round trip per token, two replicas could send at
/// most 2 / 20 ms = 100 a second, and measured about half that. No rolling second of the
/// calls' send instants holds more than `per_second`, and every request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_spend_the_whole_budget_over_a_redis_20_ms_away() {
    let dir = std::env::temp_dir().join(format!("receipt-gateway-lease-{}", std::process::id()));
    let redis = RedisServer::start(&dir).await;
    let proxy = LatencyProxy::start(dir.join("redis.sock"), Duration::ZERO).await;
    let sections = format!(
        "[budget]\nbackend = \"redis\"\nper_second = {PER_SECOND}\nfallback_per_second = 5\n\
         [redis]\nurl = \"redis://{}\"\nkey_prefix = \"lease-{}\"\n",
        proxy.addr,
        std::process::id()
    );
    let one = TestApp::spawn_with(Setup { sim_limit: 100_000, ..Setup::sections(&sections) }).await;
    let two = TestApp::spawn_with(Setup {
        shared_sim: Some((one.sim.clone(), one.sim_url.clone())),
        ..Setup::sections(&sections)
    })
    .await;

    // Redis moves away after the replicas' first calls measured it close: the leases
    // follow the round trip they measure.
    one.post(&crate::support::body("g-warm-one", &[1])).await;
    two.post(&crate::support::body("g-warm-two", &[1])).await;
    proxy.set_delay(Duration::from_millis(10));
    let seconds = Duration::from_secs(5);
    let (a, b) = tokio::join!(load(&one, "a", PER_SECOND, seconds), load(&two, "b", PER_SECOND, seconds));
    let calls = one.sim.calls();
    let up =
        (one.metric("receipt_gateway_budget_backend_up").await, two.metric("receipt_gateway_budget_backend_up").await);
    drop(redis);

    let mut sent: Vec<u64> = calls.iter().filter_map(|c| c.sent_at_us).collect();
    sent.sort_unstable();
    let first = sent.first().copied().unwrap_or_default();
    let steady = sent.iter().filter(|t| (first + 1_000_000..first + 4_000_000).contains(*t)).count();
    let busiest = busiest_second_sent(&calls);
    let ok = |s: &[Option<StatusCode>]| s.iter().filter(|s| **s == Some(StatusCode::OK)).count();
    let answered = |s: &[Option<StatusCode>]| {
        s.iter()
            .all(|s| matches!(*s, Some(StatusCode::OK | StatusCode::TOO_MANY_REQUESTS | StatusCode::GATEWAY_TIMEOUT)))
    };
    eprintln!(
        "{} calls, {steady} in the steady 3 s ({:.1}/s), busiest second {busiest}; 200s: {} + {}; up: {up:?}",
        calls.len(),
        steady as f64 / 3.0,
        ok(&a),
        ok(&b)
    );
    assert!(busiest <= PER_SECOND as usize, "{busiest} calls in one rolling second");
    assert!(steady as f64 >= 0.9 * 3.0 * PER_SECOND as f64, "{steady} calls in the steady 3 s");
    assert!(ok(&a) > 0 && ok(&b) > 0, "both replicas were served");
    assert!(answered(&a) && answered(&b), "every request answered 200, 429 or 504");
    assert_eq!(up, (1.0, 1.0), "Redis answered in time throughout");
}

/// Throttling still lowers the effective rate with leased grants: a Tencent that allows 40
/// calls a second answers the rest 60007, the replica halves its rate (its dispatcher asks
/// for grants more slowly, so its leases shrink and the grants it skips expire), and after
/// the first second it sends well under the 97 a second its grants would allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_lowers_the_rate_of_a_replica_on_leased_grants() {
    let dir = std::env::temp_dir().join(format!("receipt-gateway-lease-throttle-{}", std::process::id()));
    let redis = RedisServer::start(&dir).await;
    let proxy = LatencyProxy::start(dir.join("redis.sock"), Duration::from_millis(10)).await;
    let sections = format!(
        "[budget]\nbackend = \"redis\"\nper_second = {PER_SECOND}\nfallback_per_second = 5\n\
         [redis]\nurl = \"redis://{}\"\nkey_prefix = \"lease-throttle-{}\"\n",
        proxy.addr,
        std::process::id()
    );
    let app = TestApp::spawn_with(Setup { sim_limit: 40, ..Setup::sections(&sections) }).await;

    let statuses = load(&app, "t", PER_SECOND, Duration::from_secs(4)).await;
    let calls = app.sim.calls();
    let rate = app
        .metric(&format!(
            "receipt_gateway_budget_effective_rate{{api=\"get_group_msg_receipt\",app=\"{}\"}}",
            crate::support::APP
        ))
        .await;
    drop(redis);

    let mut sent: Vec<u64> = calls.iter().filter_map(|c| c.sent_at_us).collect();
    sent.sort_unstable();
    let first = sent.first().copied().unwrap_or_default();
    let later = sent.iter().filter(|t| (first + 1_500_000..first + 3_500_000).contains(*t)).count();
    let throttled = calls.iter().filter(|c| c.error_code.0 == 60007).count();
    eprintln!("{} calls ({throttled} answered 60007), {later} in seconds 1.5-3.5; effective rate {rate}", calls.len());
    assert!(throttled > 0, "the simulator throttled");
    assert!(rate < PER_SECOND as f64, "the effective rate is lowered: {rate}");
    assert!(later <= 2 * 60, "{later} calls in two seconds after the first throttling");
    assert!(statuses.iter().all(Option::is_some), "every request answered");
}
