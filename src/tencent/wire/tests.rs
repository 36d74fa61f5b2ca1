use super::*;

fn parse(body: &str) -> Result<ReceiptRequest, InvalidBody> {
    ReceiptRequest::parse(body.as_bytes(), 3)
}

/// Where the hand-written scan answers, the general path answers the same.
fn scan_agrees(body: &[u8], max: usize) -> bool {
    match scan(body, max) {
        Some(scanned) => ReceiptRequest::parse_general(body, max) == Ok(scanned),
        None => true,
    }
}

#[test]
fn the_scan_reads_the_usual_body_and_leaves_the_rest_to_serde() {
    let scanned = |body: &str| scan(body.as_bytes(), 3);
    let usual = r#"{"GroupId":"@TGS#1","MsgSeqList":[{"MsgSeq":2},{"MsgSeq":1},{"MsgSeq":2}]}"#;
    assert_eq!(scanned(usual), Some(parse(usual).unwrap()));
    let spaced = " {\r\n \"MsgSeqList\" : [ { \"MsgSeq\" : 0 } ] ,\t\"GroupId\" : \"g\" } \n";
    assert_eq!(scanned(spaced).map(|r| r.seqs), Some(vec![MsgSeq(0)]));
    let max = r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":18446744073709551615}]}"#;
    assert_eq!(scanned(max).map(|r| r.seqs), Some(vec![MsgSeq(u64::MAX)]));
    for other in [
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":18446744073709551616}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":01}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":-1}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1.0}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1e2}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1,"X":2}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1}],"X":1}"#,
        r#"{"GroupId":"g","GroupId":"h","MsgSeqList":[{"MsgSeq":1}]}"#,
        r#"{"GroupId":"g\u0041","MsgSeqList":[{"MsgSeq":1}]}"#,
        r#"{"GroupId":"","MsgSeqList":[{"MsgSeq":1}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":2},{"MsgSeq":3},{"MsgSeq":4}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1}]} x"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1},]}"#,
        "{\"GroupId\":\"g\",\"MsgSeqList\":[{\"MsgSeq\":1}]}\u{c}",
    ] {
        assert_eq!(scanned(other), None, "{other}");
        assert!(scan_agrees(other.as_bytes(), 3), "{other}");
    }
}

proptest::proptest! {
    /// Bodies near the usual one, cut, spliced and mistyped: the scan never answers
    /// other than the general path.
    #[test]
    fn the_scan_agrees_with_the_general_path(
        parts in proptest::collection::vec(proptest::sample::select(vec![
            "{", "}", "[", "]", ",", ":", " ", "\n", "\"", "\\", "\"GroupId\"", "\"MsgSeqList\"",
            "\"MsgSeq\"", "\"g\"", "\"\u{7f}\"", "\"\u{85}\"", "0", "1", "01", "-", ".", "e", "7",
            "18446744073709551615", "18446744073709551616", "\"é\"", "\u{1}",
        ]), 0..40),
        max in 1usize..4,
    ) {
        let body = parts.concat();
        proptest::prop_assert!(scan_agrees(body.as_bytes(), max), "{}", body);
    }

    /// The usual body with one fragment put in anywhere: mostly near misses.
    #[test]
    fn the_scan_agrees_on_the_usual_body_with_a_fragment_put_in(
        at in 0usize..80,
        part in proptest::sample::select(vec![
            " ", "\n", "\u{c}", ",", ":", "0", "-", ".5", "e1", "\\", "\"", "{}", "[]", "\"X\":1,", ",\"X\":1",
            "{\"MsgSeq\":3},", "\u{85}", "\u{1}", "é", "null", "\"GroupId\":\"h\",",
        ]),
        max in 1usize..4,
    ) {
        let usual = r#"{"GroupId":"@TGS#g","MsgSeqList":[{"MsgSeq":12},{"MsgSeq":3}]}"#;
        let at = at.min(usual.len());
        let body = format!("{}{part}{}", &usual[..at], &usual[at..]);
        proptest::prop_assert!(scan_agrees(body.as_bytes(), max), "{}", body);
    }

    #[test]
    fn the_scan_agrees_on_usual_bodies_with_any_seqs(seqs in proptest::collection::vec(proptest::num::u64::ANY, 1..6), max in 1usize..8) {
        let list: Vec<String> = seqs.iter().map(|s| format!("{{\"MsgSeq\":{s}}}")).collect();
        let body = format!("{{\"GroupId\":\"@TGS#g\",\"MsgSeqList\":[{}]}}", list.join(","));
        proptest::prop_assert!(scan_agrees(body.as_bytes(), max));
        proptest::prop_assert_eq!(scan(body.as_bytes(), max).is_some(), seqs.len() <= max);
    }
}

#[test]
fn a_valid_body_keeps_order_and_duplicates() {
    let r = parse(r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":2},{"MsgSeq":1},{"MsgSeq":2}],"X":1}"#).unwrap();
    assert_eq!(r.group.as_str(), "g");
    assert_eq!(r.seqs, vec![MsgSeq(2), MsgSeq(1), MsgSeq(2)]);
}

#[test]
fn each_rule_names_its_field() {
    let cases = [
        ("nope", "not valid JSON"),
        ("[]", "JSON object"),
        (r#"{"MsgSeqList":[{"MsgSeq":1}]}"#, "GroupId is required"),
        (r#"{"GroupId":7,"MsgSeqList":[{"MsgSeq":1}]}"#, "GroupId must be a string"),
        (r#"{"GroupId":"","MsgSeqList":[{"MsgSeq":1}]}"#, "GroupId must not be empty"),
        (r#"{"GroupId":"g"}"#, "MsgSeqList is required"),
        (r#"{"GroupId":"g","MsgSeqList":{}}"#, "MsgSeqList must be an array"),
        (r#"{"GroupId":"g","MsgSeqList":[]}"#, "must not be empty"),
        (r#"{"GroupId":"g","MsgSeqList":[1]}"#, "MsgSeqList[0]"),
        (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":-1}]}"#, "MsgSeqList[0].MsgSeq"),
        (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":1.5}]}"#, "MsgSeqList[1].MsgSeq"),
        (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":"1"}]}"#, "MsgSeqList[0].MsgSeq"),
        (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":18446744073709551616}]}"#, "MsgSeqList[0].MsgSeq"),
        (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":1},{"MsgSeq":1},{"MsgSeq":1}]}"#, "at most 3"),
    ];
    for (body, expected) in cases {
        let err = parse(body).unwrap_err().to_string();
        assert!(err.contains(expected), "{body}: {err}");
    }
}

#[test]
fn the_typed_and_the_general_path_agree() {
    let bodies = [
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":2},{"MsgSeq":1},{"MsgSeq":2}],"X":1}"#,
        r#"{"X":{"y":[1,2]},"MsgSeqList":[{"MsgSeq":7,"Z":null}],"GroupId":"g"}"#,
        r#"{"GroupId":"g\u0041","MsgSeqList":[{"MsgSeq":1}]}"#,
        r#"{"GroupId":"g","GroupId":"h","MsgSeqList":[{"MsgSeq":1}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1.0}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":2},{"MsgSeq":3},{"MsgSeq":4}]}"#,
        r#"{"GroupId":"a\tb","MsgSeqList":[{"MsgSeq":1}]}"#,
        r#"{"GroupId":null,"MsgSeqList":[{"MsgSeq":1}]}"#,
        r#"{"GroupId":"g","MsgSeqList":[]}"#,
        // Found by the fuzzer: arrays in the shape of the structs.
        r#"["g",[{"MsgSeq":1}]]"#,
        r#"{"GroupId":"g","MsgSeqList":[[1]]}"#,
        r#" {"GroupId":"g","MsgSeqList":[{"MsgSeq":1,"MsgSeq":2}]}"#,
    ];
    for body in bodies {
        assert_eq!(parse(body), ReceiptRequest::parse_general(body.as_bytes(), 3), "{body}");
    }
}

#[test]
fn the_largest_msgseq_is_accepted() {
    let r = parse(r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":18446744073709551615}]}"#).unwrap();
    assert_eq!(r.seqs, vec![MsgSeq(u64::MAX)]);
}

#[test]
fn upstream_answers_parse_with_unknown_fields_and_round_trip() {
    let raw = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","New":true,
        "GroupMsgReceiptList":[{"Code":0,"MsgSeq":1,"ReadNum":1,"UnreadNum":6},{"Code":10062,"MsgSeq":9}]}"#;
    let reply: ReceiptResponse = serde_json::from_str(raw).unwrap();
    let items = reply.items.clone().unwrap();
    assert_eq!(items[1], ReceiptItem { code: ErrorCode::NO_RECEIPT, seq: 9, read: None, unread: None });
    let again: ReceiptResponse = serde_json::from_slice(&reply.to_bytes()).unwrap();
    assert_eq!(again, reply);
    assert_eq!(reply.to_bytes(), serde_json::to_vec(&reply).unwrap(), "the same bytes as serde_json");
    let odd = ReceiptResponse::fail(ErrorCode(-1), "quote \" backslash \\ newline \n tab \t é");
    assert_eq!(odd.to_bytes(), serde_json::to_vec(&odd).unwrap());
    assert_eq!(ReceiptResponse::ok_empty().to_bytes(), serde_json::to_vec(&ReceiptResponse::ok_empty()).unwrap());
    let fail: ReceiptResponse =
        serde_json::from_str(r#"{"ActionStatus":"FAIL","ErrorCode":10010,"ErrorInfo":"x"}"#).unwrap();
    assert_eq!(fail, ReceiptResponse::fail(ErrorCode::GROUP_NOT_FOUND, "x"));
}
