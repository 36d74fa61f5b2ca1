//! The `Group.CallbackAfterReadReceipt` body parser, as `/callback` runs it on what
//! Tencent (or anyone who can reach the port) posts.
//!
//! Properties: no panic; an accepted body is a JSON object with a valid `GroupId` and a
//! `GroupMsgReceiptList` array, and the items taken are all of that list's entries or
//! none (an event older than anything the process could hold).
#![no_main]

use libfuzzer_sys::fuzz_target;
use receipt_gateway::callback::parse_read_receipts;
use receipt_gateway::domain::GroupId;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(items) = parse_read_receipts(data) else { return };
    // Accepted bodies are JSON, and (serde refuses duplicate fields) their GroupId and
    // list are the ones a Value tree holds.
    let value: Value = serde_json::from_slice(data).expect("an accepted callback body is JSON");
    let group = value.get("GroupId").and_then(Value::as_str).expect("an accepted body has a string GroupId");
    assert!(GroupId::parse(group).is_ok(), "an invalid GroupId was accepted: {group:?}");
    let list = value.get("GroupMsgReceiptList").and_then(Value::as_array).expect("an accepted body has a list");
    assert!(items == 0 || items == list.len(), "{items} items taken from a list of {}", list.len());
});
