//! `get_group_msg_receipt_detail` (docs/design.md#detail-api) end to end: validation, Tencent's
//! body passed through, paging, the cache, coalescing of identical requests, and a budget of its
//! own that a receipt flood cannot take.

use futures_util::future::join_all;
use http::StatusCode;
use receipt_gateway::simulator::FinishField;
use serde_json::Value;

use crate::support::{Reply, Setup, TestApp, body, within};

const DETAIL: &str = "/v4/group_open_http_svc/get_group_msg_receipt_detail";

fn detail(group: &str, seq: u64, filter: u8, cursor: &str, count: u32) -> String {
    format!(r#"{{"GroupId":"{group}","MsgSeq":{seq},"Filter":{filter},"Cursor":"{cursor}","Count":{count}}}"#)
}

async fn ask(app: &TestApp, body: &str) -> Reply {
    app.post_to(DETAIL, body, &[]).await
}

fn accounts(reply: &Reply, list: &str, field: &str) -> Vec<String> {
    reply.body[list]
        .as_array()
        .map_or(Vec::new(), |l| l.iter().map(|m| m[field].as_str().unwrap().to_owned()).collect())
}

#[tokio::test]
async fn members_page_through_to_the_read_count_and_pages_are_cached() {
    let app = TestApp::spawn().await;
    app.sim.set_receipt("team", 9, 7, 3);

    let mut read = Vec::new();
    let mut cursor = String::new();
    loop {
        let reply = ask(&app, &detail("team", 9, 0, &cursor, 3)).await;
        assert_eq!((reply.outcome(), reply.code()), (StatusCode::OK, 0), "{:?}", reply.body);
        assert_eq!(reply.header("x-cache"), Some("MISS"));
        read.extend(accounts(&reply, "ReadList", "Read_Account"));
        if reply.body["IsFinish"] == 1 {
            break;
        }
        cursor = reply.body["Cursor"].as_str().unwrap().to_owned();
        assert!(read.len() < 100, "paging ends");
    }
    assert_eq!(read.len(), 7, "as many readers as the receipt's ReadNum");
    let unread = ask(&app, &detail("team", 9, 1, "", 100)).await;
    assert_eq!(accounts(&unread, "UnreadList", "Unread_Account").len(), 3);
    let calls = app.sim.detail_call_count();
    assert_eq!(calls, 4);

    // The same page again: from the cache, byte for byte Tencent's answer.
    let first = ask(&app, &detail("team", 9, 0, "", 3)).await;
    assert_eq!((first.header("x-cache"), app.sim.detail_call_count()), (Some("HIT"), calls));
    assert_eq!(accounts(&first, "ReadList", "Read_Account"), read[..3]);
    assert_eq!(app.sim.call_count(), 0, "no receipt API call");
}

#[tokio::test]
async fn a_hundred_identical_concurrent_requests_make_one_upstream_call() {
    let app = TestApp::spawn().await;
    app.sim.hold_calls();
    let request = detail("crowd", 5, 0, "", 100);
    let asks: Vec<_> = (0..100).map(|_| ask(&app, &request)).collect();
    let replies = within(async {
        let all = join_all(asks);
        tokio::pin!(all);
        // Release the one call once every request waits on it.
        loop {
            tokio::select! {
                replies = &mut all => break replies,
                () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                    if app.sim.held_calls() > 0 && app.metric("receipt_gateway_inflight_requests").await >= 100.0 {
                        app.sim.release_calls();
                    }
                }
            }
        }
    })
    .await;
    assert!(replies.iter().all(|r| r.outcome() == StatusCode::OK), "every caller answered");
    let bodies: Vec<&Value> = replies.iter().map(|r| &r.body).collect();
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "one answer for all");
    assert_eq!(app.sim.detail_call_count(), 1);
}

#[tokio::test]
async fn the_detail_api_has_a_budget_of_its_own() {
    // 20 calls a second for each API; receipt callers ask for far more.
    let app = TestApp::spawn_with(Setup::sections("[budget]\nper_second = 20\n")).await;
    let headers = [("x-request-timeout-ms", "1000")];
    let flood: Vec<_> = (0..200).map(|g| app.post_in_background(body(&format!("flood-{g}"), &[1]), &headers)).collect();
    let bodies: Vec<String> = (0..10).map(|i| detail(&format!("d-{i}"), 1, 0, "", 10)).collect();
    let details: Vec<_> = bodies.iter().map(|b| ask(&app, b)).collect();
    let details = within(join_all(details)).await;
    let flood = within(join_all(flood)).await;
    let refused = flood.iter().filter(|r| matches!(r, Ok(Some(StatusCode::TOO_MANY_REQUESTS)))).count();
    assert!(refused > 0, "the receipt flood is refused in part");
    for reply in &details {
        assert_eq!((reply.outcome(), reply.header("x-cache")), (StatusCode::OK, Some("MISS")), "{:?}", reply.body);
    }
    assert_eq!(app.sim.detail_call_count(), 10);
}

#[tokio::test]
async fn tencents_answers_pass_through_and_bad_requests_never_leave() {
    let app = TestApp::spawn().await;
    app.sim.set_finish_field(FinishField::IsFinished);
    let reply = ask(&app, &detail("g", 1, 0, "", 200)).await;
    assert_eq!(reply.body["IsFinished"], 1, "whichever field upstream sent: {:?}", reply.body);
    assert!(reply.body.get("IsFinish").is_none());

    let missing = ask(&app, &detail("missing-group", 1, 0, "", 10)).await;
    assert_eq!(
        (missing.outcome(), missing.body["ActionStatus"].as_str(), missing.code()),
        (StatusCode::OK, Some("FAIL"), 10010)
    );
    let calls = app.sim.detail_call_count();

    for bad in [
        r#"{"GroupId":"g","MsgSeq":1,"Count":0}"#,
        r#"{"GroupId":"g","MsgSeq":1,"Filter":2,"Count":10}"#,
        r#"{"GroupId":"g","Count":10}"#,
        "not json",
    ] {
        let reply = ask(&app, bad).await;
        let code = if bad == "not json" { 60003 } else { 10004 };
        assert_eq!((reply.outcome(), reply.code()), (StatusCode::BAD_REQUEST, code), "{bad}");
    }
    assert_eq!(app.sim.detail_call_count(), calls, "nothing invalid was sent");
}

#[tokio::test]
async fn callers_quotas_apply_to_the_detail_api() {
    let app = TestApp::spawn_with(Setup::sections("[[clients]]\nid = \"pager\"\nrequests_per_second = 2\n")).await;
    let who = [("x-client-id", "pager")];
    for i in 0..2 {
        let reply = app.post_to(DETAIL, &detail(&format!("q-{i}"), 1, 0, "", 10), &who).await;
        assert_eq!(reply.outcome(), StatusCode::OK);
    }
    let over = app.post_to(DETAIL, &detail("q-2", 1, 0, "", 10), &who).await;
    assert_eq!((over.outcome(), over.code()), (StatusCode::TOO_MANY_REQUESTS, 60007));
    assert!(over.header("retry-after").is_some());
    assert_eq!(app.sim.detail_call_count(), 2, "refused before anything was queued");
    let sample =
        "receipt_gateway_budget_calls_total{api=\"get_group_msg_receipt_detail\",app=\"1400000000\",client=\"pager\"}";
    assert_eq!(app.metric(sample).await, 2.0, "its calls are charged to it");
}
