//! The `Group.CallbackAfterReadReceipt` body parser, as `/callback` runs it on what
//! Tencent (or anyone who can reach the port) posts.
//!
//! Properties: no panic; an accepted body is a JSON object (malformed bodies are 400:
//! docs/design.md#callbacks) with a valid `GroupId` and a `GroupMsgReceiptList` array of objects,
//! and the items taken are all of that list's entries or none (an event from before the monotonic
//! clock's range).
//!
//! The parser reads a `serde_json::Value` first, so an accepted body is always one
//! (serde's typed reader alone took arrays shaped like its structs, and skipped strings
//! without checking their UTF-8 or escapes: see `artifacts-found/callback_body/` and the
//! `*_in_ignored_field` seeds).
#![no_main]

use libfuzzer_sys::fuzz_target;
use receipt_gateway::service::callback::parse_read_receipts;
use receipt_gateway::tencent::domain::GroupId;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(items) = parse_read_receipts(data) else { return };
    let value: Value = serde_json::from_slice(data).expect("an accepted callback body is JSON");
    let object = value.as_object().expect("a callback body that is not a JSON object was accepted");
    let group = object.get("GroupId").and_then(Value::as_str).expect("accepted without a string GroupId");
    assert!(GroupId::parse(group).is_ok(), "an invalid GroupId was accepted: {group:?}");
    let list = object.get("GroupMsgReceiptList").and_then(Value::as_array).expect("accepted without a list");
    assert!(list.iter().all(Value::is_object), "a GroupMsgReceiptList entry that is not an object was accepted");
    assert!(items == 0 || items == list.len(), "{items} items taken from a list of {}", list.len());
});
