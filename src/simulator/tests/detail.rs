//! The detail API: member lists that match the receipt counts, paging, its own limit.

use super::*;

#[tokio::test]
async fn the_detail_lists_match_the_receipt_counts_and_page_by_cursor_to_the_end() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    let counts = call_ok(&client, &url, "g1", &[1]).await.items.expect("items")[0];
    let (read, unread) = (counts.read.expect("read"), counts.unread.expect("unread"));

    let (readers, read_pages) = walk(&client, &url, "g1", 1, 0, 3).await;
    let (others, unread_pages) = walk(&client, &url, "g1", 1, 1, 50).await;

    assert_eq!((read, unread), (4, 165), "pinned by rules::default_receipt");
    assert_eq!(readers, members(0..read));
    assert_eq!(others, members(read..read + unread));
    assert_eq!((read_pages, unread_pages), (2, 4));
    assert_eq!((sim.call_count(), sim.detail_call_count()), (1, 6));
    let detail_calls = sim.detail_calls();
    assert!(detail_calls.iter().all(|c| c.api == SimApi::Detail && c.seqs == [1] && c.error_code == ErrorCode::OK));
    assert_eq!(detail_calls[0].group.as_deref(), Some("g1"));
    assert_eq!(sim.all_calls().len(), 7);
}

#[tokio::test]
async fn an_override_shapes_the_member_lists() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    sim.set_receipt("g", 2_000_000, 2, 1);

    let (readers, _) = walk(&client, &url, "g", 2_000_000, 0, 200).await;
    let (others, pages) = walk(&client, &url, "g", 2_000_000, 1, 1).await;

    assert_eq!(readers, members(0..2));
    assert_eq!((others, pages), (members(2..3), 1));
}

#[tokio::test]
async fn detail_calls_have_their_own_rate_limit() {
    let (sim, url, _server) = Simulator::spawn(SimOptions { limit_per_second: 2, ..options() }).await.expect("spawn");
    let client = client();

    let mut receipt_codes = Vec::new();
    let mut detail_codes = Vec::new();
    for _ in 0..3 {
        receipt_codes.push(call_ok(&client, &url, "g", &[1]).await.error_code);
        let (_, page) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 10)).await;
        detail_codes.push(ErrorCode(page["ErrorCode"].as_i64().expect("a code")));
    }

    let expected = [0, 0, 60007].map(ErrorCode);
    assert_eq!((receipt_codes, detail_codes), (expected.to_vec(), expected.to_vec()));
    assert_eq!((sim.call_count(), sim.detail_call_count()), (3, 3));
    assert_eq!(sim.count_code(ErrorCode::RATE_LIMITED), 1);
    assert_eq!(sim.count_code_to(SimApi::Detail, ErrorCode::RATE_LIMITED), 1);
    let second = Duration::from_secs(1);
    assert_eq!(sim.max_in_any_window(second), 2);
    assert_eq!(sim.max_in_any_window_to(SimApi::Detail, second), 2);
    assert_eq!(sim.max_arrivals_in_any_window_to(SimApi::Detail, second), 3);
}

#[tokio::test]
async fn detail_calls_get_tencents_codes_for_bad_input() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    let bad_sig = signed_query(KEY, ADMIN, 1_000_000);
    let cases = [
        (good_query(), detail_body("g", 1, 0, "", 0), 10004, "Count"),
        (good_query(), detail_body("g", 1, 0, "", 201), 10004, "Count"),
        (good_query(), detail_body("g", 1, 2, "", 10), 10004, "Filter"),
        (good_query(), detail_body("g", 1, 0, "nope", 10), 10004, "Cursor"),
        (good_query(), "{}".to_owned(), 10004, "GroupId"),
        (good_query(), detail_body("missing-1", 1, 0, "", 10), 10010, "missing-1"),
        (good_query(), detail_body("invalid-1", 1, 0, "", 10), 10015, "invalid-1"),
        (good_query(), detail_body("g", 1_000_001, 0, "", 10), 10062, "no read receipt"),
        (bad_sig, detail_body("g", 1, 0, "", 10), 70001, "expired"),
        (good_query().replace("&random=12345", ""), detail_body("g", 1, 0, "", 10), 60003, "random"),
    ];

    for (query, body, code, info) in &cases {
        let (status, reply) = detail(&client, &url, query, body.clone()).await;
        assert_eq!((status, reply["ActionStatus"].as_str()), (StatusCode::OK, Some("FAIL")), "{body}");
        assert_eq!(reply["ErrorCode"], *code, "{body}: {reply}");
        assert!(reply["ErrorInfo"].as_str().unwrap_or_default().contains(info), "{body}: {reply}");
    }
    assert_eq!((sim.detail_call_count(), sim.call_count()), (cases.len(), 0));
    // The ledger shows what was asked even when it was refused.
    assert_eq!(sim.detail_calls()[0].seqs, [1]);
}

#[tokio::test]
async fn the_finish_flag_can_be_named_is_finished() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    sim.set_receipt("g", 1, 1, 0);

    let (_, default) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 10)).await;
    sim.set_finish_field(FinishField::IsFinished);
    let (_, renamed) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 10)).await;

    assert_eq!((default["IsFinish"].as_u64(), default.get("IsFinished")), (Some(1), None));
    assert_eq!((renamed["IsFinished"].as_u64(), renamed.get("IsFinish")), (Some(1), None));
    assert_eq!(renamed["ReadList"], serde_json::json!([{"Read_Account": "member-0"}]));
}
