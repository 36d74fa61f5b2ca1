//! The receipt request parser and validator (`ReceiptRequest::parse`), as the server
//! runs it on every caller's body.
//!
//! Properties, for every `MsgSeqList` bound the gateway could be configured with:
//! - no panic;
//! - an accepted request has 1..=max MsgSeqs and a valid `GroupId`, and its upstream
//!   body (`to_body`) parses back to the same request;
//! - an accepted body has the shape docs/design.md#receipt-api allows, "anything else is a 400": an
//!   object with a string `GroupId` and a `MsgSeqList` array of objects (checked where
//!   `serde_json::Value` can read the body);
//! - accepted under a bound means accepted, identically, under any larger bound;
//! - the answer depends only on the JSON value: the fast typed path (borrowed group id,
//!   no `Value` tree) and the general path agree, so the body re-serialised through
//!   `serde_json::Value` (escapes resolved, duplicate keys collapsed to the last, as the
//!   general path reads them) gets the same answer, error included.
//!
//! Not asserted, a known leniency: the typed path skips the strings of fields it does
//! not read without checking their UTF-8 or surrogate escapes, so
//! `{"GroupId":"g","MsgSeqList":[{"MsgSeq":1}],"X":"\xff"}` is accepted, while the same
//! bytes with a duplicate key (general path) are refused as not JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use receipt_gateway::tencent::wire::ReceiptRequest;
use receipt_gateway::tencent::domain::GroupId;
use serde_json::Value;

/// 1 and 3 make the length rule bite; 50 and 1000 are the batch and server defaults;
/// 100_000 is the largest `server.max_request_seqs`.
const BOUNDS: [usize; 5] = [1, 3, 50, 1000, 100_000];

fuzz_target!(|data: &[u8]| {
    let value = serde_json::from_slice::<Value>(data);
    // Serialising a Value into a Vec cannot fail.
    let canonical = value.as_ref().map(|v| serde_json::to_vec(v).unwrap());
    let mut accepted: Option<ReceiptRequest> = None;
    for max in BOUNDS {
        let parsed = ReceiptRequest::parse(data, max);
        if let Ok(req) = &parsed {
            assert!((1..=max).contains(&req.seqs.len()), "{} MsgSeqs accepted under a bound of {max}", req.seqs.len());
            assert!(GroupId::parse(req.group.as_str()).is_ok(), "an invalid GroupId was accepted: {:?}", req.group);
            if let Ok(value) = &value {
                shaped_as_the_spec_says(value);
            }
            let again = ReceiptRequest::parse(&req.to_body(), max);
            assert_eq!(again.as_ref(), Ok(req), "to_body does not parse back to the same request");
        }
        if let Some(before) = &accepted {
            assert_eq!(parsed.as_ref(), Ok(before), "accepted under a smaller bound, not under {max}");
        }
        if let Ok(canonical) = &canonical {
            assert_eq!(ReceiptRequest::parse(canonical, max), parsed, "the same JSON value got another answer");
        }
        accepted = parsed.ok();
    }
});

/// docs/design.md#receipt-api's body: `{"GroupId": "...", "MsgSeqList": [{"MsgSeq": 1}, ...]}`.
fn shaped_as_the_spec_says(value: &Value) {
    let object = value.as_object().expect("a body that is not a JSON object was accepted");
    assert!(object.get("GroupId").is_some_and(Value::is_string), "accepted without a string GroupId");
    let list = object.get("MsgSeqList").and_then(Value::as_array).expect("accepted without a MsgSeqList array");
    assert!(list.iter().all(Value::is_object), "a MsgSeqList entry that is not an object was accepted");
}
