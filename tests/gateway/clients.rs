//! Callers (docs/design.md#callers): who is calling, bearer tokens, `require_client_auth`, quotas
//! that refuse at once, and the `client` label of the request metrics.

use std::time::Duration;

use http::StatusCode;

use crate::support::{BILLING_TOKEN, Setup, TestApp, body, busiest_second_sent, heavy, within};

const CLIENTS: &str = "[[clients]]\nid = \"billing\"\ntoken_env = \"BILLING_TOKEN\"\n\n\
                       [[clients]]\nid = \"search\"\nrequests_per_second = 20\n";

fn setup(server: &str) -> Setup {
    Setup::sections(&format!("{server}\n[cache]\nttl_ms = 60000\n{CLIENTS}"))
}

#[tokio::test]
async fn a_client_with_a_token_must_send_it_and_the_right_one() {
    let app = TestApp::spawn_with(setup("")).await;
    let b = body("g-auth", &[1]);
    let bearer = format!("Bearer {BILLING_TOKEN}");

    let missing = app.post_with("", &b, &[("x-client-id", "billing")]).await;
    let wrong = app.post_with("", &b, &[("x-client-id", "billing"), ("authorization", "Bearer nope")]).await;
    let right = app.post_with("", &b, &[("x-client-id", "billing"), ("authorization", &bearer)]).await;
    let anonymous = app.post(&b).await;

    assert_eq!((missing.outcome(), missing.code()), (StatusCode::UNAUTHORIZED, 60004));
    assert_eq!((wrong.outcome(), wrong.code()), (StatusCode::UNAUTHORIZED, 60004));
    assert_eq!((right.outcome(), right.code()), (StatusCode::OK, 0));
    assert_eq!(anonymous.outcome(), StatusCode::OK, "unknown callers are the default client");
    for reply in [&missing, &wrong] {
        assert!(!reply.body.to_string().contains(BILLING_TOKEN), "the token is never echoed");
    }
    let sample = |client: &str, status: &str, cause: &str| {
        format!(
            "receipt_gateway_requests_total{{app=\"1400000000\",cause=\"{cause}\",client=\"{client}\",status=\"{status}\"}}"
        )
    };
    assert_eq!(app.metric(&sample("billing", "401", "caller")).await, 2.0);
    assert_eq!(app.metric(&sample("billing", "200", "none")).await, 1.0);
    assert_eq!(app.metric(&sample("default", "200", "none")).await, 1.0);
    assert_eq!(app.metric("receipt_gateway_client_rejected_total{client=\"billing\",reason=\"auth\"}").await, 2.0);
    let (_, metrics) = app.admin_get("/metrics").await;
    assert!(!metrics.contains(BILLING_TOKEN));
}

#[tokio::test]
async fn require_client_auth_refuses_callers_without_a_configured_id() {
    let app = TestApp::spawn_with(setup("[server]\nrequire_client_auth = true\n")).await;
    let b = body("g-required", &[1]);

    let anonymous = app.post(&b).await;
    let unknown = app.post_with("", &b, &[("x-client-id", "stranger")]).await;
    let known = app.post_with("", &b, &[("x-client-id", "search")]).await;

    assert_eq!((anonymous.outcome(), anonymous.code()), (StatusCode::FORBIDDEN, 60004));
    assert_eq!((unknown.outcome(), unknown.code()), (StatusCode::FORBIDDEN, 60004));
    assert_eq!(known.outcome(), StatusCode::OK);
}

#[tokio::test]
async fn a_quota_admits_no_more_than_its_requests_per_second_and_refuses_at_once() {
    let app = TestApp::spawn_with(setup("")).await;
    let b = body("g-quota", &[1, 2]);
    app.post(&b).await;
    let calls = app.sim.call_count();

    // Each reply with when it came, from the first request's sending.
    let mut replies = Vec::new();
    let started = tokio::time::Instant::now();
    for _ in 0..60 {
        let reply = app.post_with("", &b, &[("x-client-id", "search")]).await;
        replies.push((reply, started.elapsed()));
    }

    // The first 20 are admitted. Every later one answered within a second of the first's
    // sending was decided within a second of the first's admission, by the gateway's
    // clock: refused. (On a machine slow enough to take longer, the later ones meet a
    // window that has moved on, as they should: nothing is said about them.)
    let second = Duration::from_secs(1);
    let (first, rest) = replies.split_at(20);
    assert!(first.iter().all(|(r, _)| r.outcome() == StatusCode::OK), "the quota's 20: {first:?}");
    let within_the_second: Vec<_> = rest.iter().filter(|(_, at)| *at < second).map(|(r, _)| r).collect();
    assert!(within_the_second.iter().all(|r| r.outcome() == StatusCode::TOO_MANY_REQUESTS), "{within_the_second:?}");
    let refused: Vec<_> =
        replies.iter().map(|(r, _)| r).filter(|r| r.outcome() == StatusCode::TOO_MANY_REQUESTS).collect();
    for r in &refused {
        assert_eq!(r.code(), 60007);
        let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(retry >= 1, "{r:?}");
    }
    assert_eq!(app.sim.call_count(), calls, "served from the cache: the budget was idle");
    let rejected = app.metric("receipt_gateway_client_rejected_total{client=\"search\",reason=\"quota\"}").await;
    assert_eq!(rejected, refused.len() as f64);
    let other = app.post(&b).await;
    assert_eq!(other.outcome(), StatusCode::OK, "another client's quota is its own");
}

/// Two clients of weights 3 and 1 on a budget of 40 calls a second.
const WEIGHTED: &str = "[budget]\nper_second = 40\n\n[[clients]]\nid = \"checkout\"\nweight = 3\n\n\
                        [[clients]]\nid = \"nightly\"\nweight = 1\n";

/// Sends `per_second` requests a second for `seconds` as `client`, each for a group
/// nobody asked for before (one upstream call each); the answers' statuses.
async fn flood(app: &TestApp, client: &'static str, per_second: u32, seconds: u32) -> Vec<Option<StatusCode>> {
    let every = Duration::from_secs(1) / per_second;
    let mut tick = tokio::time::interval(every);
    let mut sent = Vec::new();
    for i in 0..per_second * seconds {
        tick.tick().await;
        let headers = [("x-client-id", client), ("x-request-timeout-ms", "1000")];
        sent.push(app.post_in_background(body(&format!("{client}-{i}"), &[1]), &headers));
    }
    let mut statuses = Vec::new();
    for task in sent {
        statuses.push(within(task).await.ok().flatten());
    }
    statuses
}

fn calls_for(client: &str) -> String {
    format!(
        "receipt_gateway_budget_calls_total{{api=\"get_group_msg_receipt\",app=\"1400000000\",client=\"{client}\"}}"
    )
}

fn ok(statuses: &[Option<StatusCode>]) -> usize {
    statuses.iter().filter(|s| **s == Some(StatusCode::OK)).count()
}

/// Both clients ask for four times the budget: the gateway gives them calls 3 : 1, and
/// never sends more than the budget in a rolling second (by its own send instants).
/// (That the budget is spent in full, and the split per 10 s window within 10 %, the
/// `clients` benchmark measures in release builds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contended_budget_is_shared_by_weight() {
    let _heavy = heavy().await;
    let app = TestApp::spawn_with(Setup { sim_thread: true, sim_limit: 100_000, ..Setup::sections(WEIGHTED) }).await;

    let (checkout, nightly) = tokio::join!(flood(&app, "checkout", 160, 3), flood(&app, "nightly", 160, 3));

    let (a, b) = (app.metric(&calls_for("checkout")).await, app.metric(&calls_for("nightly")).await);
    assert!((2.55..=3.45).contains(&(a / b)), "calls split {a} : {b}, not 3 : 1 within 15 %");
    let busiest = busiest_second_sent(&app.sim.calls());
    assert!(busiest <= 40, "{busiest} calls sent in one second");
    assert!(checkout.iter().chain(&nightly).all(answered), "{checkout:?} {nightly:?}");
}

/// 200, 429, or 504 at the deadline (a call answered too late on a stalled machine).
fn answered(status: &Option<StatusCode>) -> bool {
    matches!(status, Some(StatusCode::OK | StatusCode::TOO_MANY_REQUESTS | StatusCode::GATEWAY_TIMEOUT))
}

/// With the weight-3 client idle, the weight-1 client gets more than its share of the
/// budget (a quarter); and while it floods, a client asking for less than its share gets
/// everything it asks for. (How close to the whole budget the first gets, and how fast
/// the second is answered, the `clients` benchmark measures in release builds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_share_is_lent_and_a_modest_client_is_isolated_from_a_flood() {
    let _heavy = heavy().await;
    let app = TestApp::spawn_with(Setup { sim_thread: true, sim_limit: 100_000, ..Setup::sections(WEIGHTED) }).await;

    let alone = flood(&app, "nightly", 160, 2).await;
    assert!(ok(&alone) > 0);
    // Its own share is 10 a second; lent the idle one's, up to 40.
    let busiest = busiest_second_sent(&app.sim.calls());
    assert!((16..=40).contains(&busiest), "{busiest} calls sent in one second for the only client");

    // The modest client asks for 10 % of the budget (4 uncached groups a second, as 20
    // would be of 200) while the other floods at ten times the budget: every request of
    // the modest one answered 200 (in order of deadlines alone, the flood's queue would
    // have it refused).
    let (modest, _) = tokio::join!(timed(&app, "checkout", 4, 3), flood(&app, "nightly", 400, 3));
    assert!(modest.iter().all(|(s, _)| *s == Some(StatusCode::OK)), "{modest:?}");
}

/// Like [`flood`], but each answer with how long it took.
async fn timed(
    app: &TestApp,
    client: &'static str,
    per_second: u32,
    seconds: u32,
) -> Vec<(Option<StatusCode>, Duration)> {
    let every = Duration::from_secs(1) / per_second;
    let mut tick = tokio::time::interval(every);
    let mut answers = Vec::new();
    for i in 0..per_second * seconds {
        tick.tick().await;
        let headers = [("x-client-id", client), ("x-request-timeout-ms", "1000")];
        let begun = tokio::time::Instant::now();
        let status =
            within(app.post_in_background(body(&format!("{client}-{i}"), &[1]), &headers)).await.ok().flatten();
        answers.push((status, begun.elapsed()));
    }
    answers
}
