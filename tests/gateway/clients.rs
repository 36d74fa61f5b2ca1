//! Callers (SPEC 6.5): who is calling, bearer tokens, `require_client_auth`, quotas that
//! refuse at once, and the `client` label of the request metrics.

use http::StatusCode;

use crate::support::{BILLING_TOKEN, Setup, TestApp, body};

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

    assert_eq!((missing.status, missing.code()), (StatusCode::UNAUTHORIZED, 60004));
    assert_eq!((wrong.status, wrong.code()), (StatusCode::UNAUTHORIZED, 60004));
    assert_eq!((right.status, right.code()), (StatusCode::OK, 0));
    assert_eq!(anonymous.status, StatusCode::OK, "unknown callers are the default client");
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

    assert_eq!((anonymous.status, anonymous.code()), (StatusCode::FORBIDDEN, 60004));
    assert_eq!((unknown.status, unknown.code()), (StatusCode::FORBIDDEN, 60004));
    assert_eq!(known.status, StatusCode::OK);
}

#[tokio::test]
async fn a_quota_admits_no_more_than_its_requests_per_second_and_refuses_at_once() {
    let app = TestApp::spawn_with(setup("")).await;
    let b = body("g-quota", &[1, 2]);
    app.post(&b).await;
    let calls = app.sim.call_count();

    let mut replies = Vec::new();
    let started = tokio::time::Instant::now();
    for _ in 0..60 {
        replies.push(app.post_with("", &b, &[("x-client-id", "search")]).await);
    }
    let took = started.elapsed();

    let ok = replies.iter().filter(|r| r.status == StatusCode::OK).count();
    let refused: Vec<_> = replies.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert!(took < std::time::Duration::from_secs(1), "the burst took {took:?}: the window must hold it");
    assert_eq!((ok, refused.len()), (20, 40), "exactly the quota in one rolling second, the rest refused");
    for r in &refused {
        assert_eq!(r.code(), 60007);
        let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(retry >= 1, "{r:?}");
    }
    assert_eq!(app.sim.call_count(), calls, "served from the cache: the budget was idle");
    assert_eq!(app.metric("receipt_gateway_client_rejected_total{client=\"search\",reason=\"quota\"}").await, 40.0);
    let other = app.post(&b).await;
    assert_eq!(other.status, StatusCode::OK, "another client's quota is its own");
}
