//! How a gateway-made error is sent (docs/design.md#errors): by default as Tencent sends its
//! own — HTTP 200 with the Tencent body — with the table's status in `X-Gateway-Status` and
//! `Retry-After` on 60007; the table's statuses with `server.error_status = "http"` or a
//! client's own `error_status`; metrics always count the table's status; `/callback` and the
//! admin port keep HTTP statuses.

use http::StatusCode;

use crate::support::{Reply, Setup, TestApp, body};

const DETAIL: &str = "/v4/group_open_http_svc/get_group_msg_receipt_detail";

/// `sdk` and `plain` with a quota of one request a second; `plain` wants HTTP statuses.
const CLIENTS: &str = "[[clients]]\nid = \"sdk\"\nrequests_per_second = 1\n\n\
                       [[clients]]\nid = \"plain\"\nrequests_per_second = 1\nerror_status = \"http\"\n";

fn requests(client: &str, status: &str, cause: &str) -> String {
    format!(
        "receipt_gateway_requests_total{{app=\"1400000000\",cause=\"{cause}\",client=\"{client}\",status=\"{status}\"}}"
    )
}

/// Requests as `client` until its quota refuses one (the first is admitted; the next,
/// sent at once, falls in the same second unless the machine stalls for a second);
/// the refusal.
async fn over_quota(app: &TestApp, client: &str) -> Reply {
    let b = body(&format!("g-quota-{client}"), &[1]);
    for _ in 0..20 {
        let reply = app.post_with("", &b, &[("x-client-id", client)]).await;
        if reply.code() == 60007 {
            return reply;
        }
        assert_eq!((reply.status, reply.code(), reply.header("x-gateway-status")), (StatusCode::OK, 0, None));
    }
    panic!("{client}'s quota of 1 a second never refused");
}

fn retry_after(reply: &Reply) -> u64 {
    reply.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn by_default_an_error_is_http_200_with_tencents_body_and_the_outcome_in_x_gateway_status() {
    let app = TestApp::spawn_with(Setup::sections(CLIENTS)).await;

    let over = over_quota(&app, "sdk").await;
    let not_json = app.post("{\"GroupId\": nope").await;
    let wrong_type = app.post(r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":"1"}]}"#).await;
    let detail_not_json = app.post_to(DETAIL, "not json", &[]).await;
    let detail_wrong = app.post_to(DETAIL, r#"{"GroupId":"g","MsgSeq":1,"Count":"ten"}"#, &[]).await;

    assert_eq!((over.status, over.code(), over.body["ActionStatus"].as_str()), (StatusCode::OK, 60007, Some("FAIL")));
    assert_eq!(over.header("x-gateway-status"), Some("429"));
    assert!(retry_after(&over) >= 1, "{over:?}");
    for (reply, code, named) in [
        (&not_json, 60003, "JSON"),
        (&wrong_type, 10004, "MsgSeqList[0].MsgSeq"),
        (&detail_not_json, 60003, "JSON"),
        (&detail_wrong, 10004, "Count"),
    ] {
        assert_eq!((reply.status, reply.code(), reply.header("x-gateway-status")), (StatusCode::OK, code, Some("400")));
        assert!(reply.body["ErrorInfo"].as_str().unwrap_or_default().contains(named), "{reply:?}");
        assert!(reply.header("retry-after").is_none());
    }
    // Metrics count the outcome, not the 200 sent.
    let refused = app.metric(&requests("sdk", "429", "caller")).await;
    assert!(refused >= 1.0);
    assert_eq!(app.metric("receipt_gateway_client_rejected_total{client=\"sdk\",reason=\"quota\"}").await, refused);
    assert_eq!(app.metric(&requests("default", "400", "caller")).await, 4.0);
    assert_eq!(app.metric(&requests("sdk", "200", "caller")).await, 0.0);
    assert_eq!(app.metric(&requests("default", "200", "caller")).await, 0.0);
    // The admin port is not a Tencent route.
    assert_eq!(app.admin_get("/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.sim.call_count(), 1, "only the admitted request went upstream");
}

#[tokio::test]
async fn server_error_status_http_sends_the_tables_statuses_unless_a_client_says_tencent() {
    let clients = CLIENTS.replace("error_status = \"http\"", "").replace(
        "id = \"sdk\"\nrequests_per_second = 1\n",
        "id = \"sdk\"\nrequests_per_second = 1\nerror_status = \"tencent\"\n",
    );
    let app = TestApp::spawn_with(Setup::sections(&format!("[server]\nerror_status = \"http\"\n{clients}"))).await;

    let plain = over_quota(&app, "plain").await;
    let sdk = over_quota(&app, "sdk").await;
    let not_json = app.post("{nope").await;
    let unknown_path = app.post_to("/v4/other", "{}", &[]).await;
    let sdk_unknown_path = app.post_to("/v4/other", "{}", &[("x-client-id", "sdk")]).await;
    let sdk_no_app =
        app.post_to(&format!("{}?sdkappid=123", crate::support::RECEIPT), "{}", &[("x-client-id", "sdk")]).await;

    assert_eq!((plain.status, plain.header("x-gateway-status")), (StatusCode::TOO_MANY_REQUESTS, Some("429")));
    assert!(retry_after(&plain) >= 1, "{plain:?}");
    assert_eq!((sdk.status, sdk.header("x-gateway-status")), (StatusCode::OK, Some("429")), "its own setting");
    assert_eq!((not_json.status, not_json.code()), (StatusCode::BAD_REQUEST, 60003));
    assert_eq!(not_json.header("x-gateway-status"), Some("400"));
    assert_eq!((unknown_path.status, unknown_path.code()), (StatusCode::NOT_FOUND, 60009));
    // Found before the caller is identified: the client the header names decides, on
    // the Tencent routes; any other path gets HTTP's status whoever asks.
    assert_eq!((sdk_no_app.status, sdk_no_app.outcome()), (StatusCode::OK, StatusCode::BAD_REQUEST));
    assert_eq!((sdk_unknown_path.status, sdk_unknown_path.outcome()), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
}

#[tokio::test]
async fn a_clients_own_error_status_applies_to_that_caller_only() {
    let app = TestApp::spawn_with(Setup::sections(CLIENTS)).await;

    let (plain, sdk) = tokio::join!(over_quota(&app, "plain"), over_quota(&app, "sdk"));
    let get = |client: &'static str| {
        let request =
            http::Request::get(format!("{}{}", app.url, crate::support::RECEIPT)).header("x-client-id", client);
        app.send(request.body(http_body_util::Full::new(bytes::Bytes::new())).expect("request"))
    };
    let (plain_get, sdk_get) = (get("plain").await, get("sdk").await);

    assert_eq!(
        (plain.status, plain.code(), plain.header("x-gateway-status")),
        (StatusCode::TOO_MANY_REQUESTS, 60007, Some("429"))
    );
    assert_eq!((sdk.status, sdk.code(), sdk.header("x-gateway-status")), (StatusCode::OK, 60007, Some("429")));
    assert!(retry_after(&plain) >= 1 && retry_after(&sdk) >= 1);
    assert_eq!((plain_get.status, plain_get.code()), (StatusCode::METHOD_NOT_ALLOWED, 60002));
    assert_eq!(
        (sdk_get.status, sdk_get.outcome(), sdk_get.code()),
        (StatusCode::OK, StatusCode::METHOD_NOT_ALLOWED, 60002)
    );
    for client in ["plain", "sdk"] {
        assert!(app.metric(&requests(client, "429", "caller")).await >= 1.0, "{client}");
    }
    // The method is checked before the app and the caller: counted as neither.
    let wrong_method = requests("default", "405", "caller").replace("1400000000", "none");
    assert_eq!(app.metric(&wrong_method).await, 2.0);
}
