//! The receipt API: counts, overrides, Tencent's codes for bad calls, the rate limit.

use super::*;

#[tokio::test]
async fn a_signed_call_gets_deterministic_counts_in_request_order() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");

    let (status, reply) = call(&client(), &url, &good_query(), body("g1", &[3, 1, 3, 2])).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply, ReceiptResponse::ok(vec![item("g1", 3), item("g1", 1), item("g1", 3), item("g1", 2)]));
    let calls = sim.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].app, Some(APP));
    assert_eq!(calls[0].group.as_deref(), Some("g1"));
    assert_eq!(calls[0].seqs, vec![3, 1, 3, 2]);
    assert_eq!((calls[0].error_code, calls[0].http_status), (ErrorCode::OK, 200));
}

#[tokio::test]
async fn overrides_change_later_answers_and_high_seqs_have_no_receipt() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();

    sim.set_receipt("g", 7, 5, 9);
    let reply = call_ok(&client, &url, "g", &[7, 1_000_000, 1_000_001]).await;

    let items = reply.items.expect("items");
    assert_eq!(items[0], ReceiptItem { code: ErrorCode::OK, seq: 7, read: Some(5), unread: Some(9) });
    assert_eq!(items[1], item("g", 1_000_000));
    assert_eq!(items[1].code, ErrorCode::OK);
    assert_eq!(items[2], ReceiptItem { code: ErrorCode::NO_RECEIPT, seq: 1_000_001, read: None, unread: None });
}

#[tokio::test]
async fn missing_and_invalid_groups_fail_the_whole_call() {
    let (_sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();

    let missing = call_ok(&client, &url, "missing-1", &[1]).await;
    let invalid = call_ok(&client, &url, "invalid-1", &[1]).await;

    assert_eq!((missing.action_status.as_ref(), missing.error_code), ("FAIL", ErrorCode(10010)));
    assert_eq!((invalid.action_status.as_ref(), invalid.error_code), ("FAIL", ErrorCode(10015)));
    assert!(missing.items.is_none());
}

#[tokio::test]
async fn bad_credentials_and_parameters_get_tencents_codes() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    let other_key = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
    let no_random = good_query().replace("&random=12345", "");
    let cases = [
        (signed_query(other_key, ADMIN, unix_now()), 70009, "signature"),
        (signed_query(KEY, ADMIN, 1_000_000), 70001, "expired"),
        (good_query().replace("usersig=", "usersig=x"), 70009, "well-formed"),
        (signed_query(KEY, "bob", unix_now()), 60010, "admin"),
        (no_random, 60003, "random"),
        (good_query().replace("random=12345", "random=99999999999"), 60003, "random"),
        (good_query().replace("contenttype=json", "contenttype=xml"), 60003, "contenttype"),
        (good_query().replace("sdkappid=1400000000", "sdkappid=1400000001"), 60006, "1400000001"),
        (good_query().replace("sdkappid=1400000000", "sdkappid=abc"), 60003, "sdkappid"),
        ("identifier=administrator".to_owned(), 60003, "sdkappid"),
    ];

    for (query, code, info) in &cases {
        let (status, reply) = call(&client, &url, query, body("g", &[1])).await;
        assert_eq!((status, reply.error_code), (StatusCode::OK, ErrorCode(*code)), "{query}");
        assert!(reply.error_info.contains(info), "{query}: {}", reply.error_info);
    }
    assert_eq!(sim.call_count(), cases.len());
}

#[tokio::test]
async fn bad_bodies_and_too_many_seqs_get_10004() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    let fifty_one: Vec<u64> = (1..=51).collect();

    let (_, not_json) = call(&client, &url, &good_query(), "nope".into()).await;
    let (_, too_many) = call(&client, &url, &good_query(), body("g", &fifty_one)).await;
    let fifty = call_ok(&client, &url, "g", &fifty_one[..50]).await;
    let (_, huge) = call(&client, &url, &good_query(), " ".repeat(MAX_BODY_BYTES + 1)).await;

    assert_eq!(not_json.error_code, ErrorCode(10004));
    assert_eq!(huge.error_code, ErrorCode(10004));
    assert_eq!(too_many.error_code, ErrorCode(10004));
    assert!(too_many.error_info.contains("at most 50"), "{}", too_many.error_info);
    assert_eq!(fifty.items.map(|i| i.len()), Some(50));
    // The ledger shows what was asked even when it was refused.
    assert_eq!(sim.calls()[1].seqs.len(), 51);
    assert_eq!(sim.calls()[0].group, None);
}

#[tokio::test]
async fn calls_beyond_the_limit_in_a_rolling_second_get_60007() {
    let (sim, url, _server) = Simulator::spawn(SimOptions { limit_per_second: 5, ..options() }).await.expect("spawn");
    let client = client();

    let mut codes = Vec::new();
    for seq in 0..6 {
        codes.push(call_ok(&client, &url, "g", &[seq]).await.error_code);
    }

    assert_eq!(codes, [0, 0, 0, 0, 0, 60007].map(ErrorCode));
    assert_eq!(sim.count_code(ErrorCode::RATE_LIMITED), 1);
    assert_eq!(sim.max_in_any_window(Duration::from_secs(1)), 5);
    assert_eq!(sim.max_arrivals_in_any_window(Duration::from_secs(1)), 6);
    assert_eq!(sim.call_count(), 6);
}

#[tokio::test]
async fn msgseqs_past_the_rejection_point_fail_the_whole_call_with_10004() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    sim.reject_from(1_000);

    let below = call_ok(&client, &url, "g", &[998, 999]).await;
    let mixed = call_ok(&client, &url, "g", &[1, 1_000]).await;

    assert_eq!(below.error_code, ErrorCode::OK);
    assert_eq!((mixed.action_status.as_ref(), mixed.error_code), ("FAIL", ErrorCode(10004)));
    assert!(mixed.error_info.contains("1000"), "{}", mixed.error_info);
}
