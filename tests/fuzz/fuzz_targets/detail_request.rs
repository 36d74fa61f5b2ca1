//! The detail request parser and validator (`DetailRequest::parse`).
//!
//! Properties: no panic; an accepted request has `Count` 1..=200, `Filter` 0 or 1, a
//! `Cursor` of at most 1024 bytes and a valid `GroupId`, and its upstream body
//! (`to_body`) parses back to the same request (the whole request is the cache key, so a
//! lossy round trip would split or merge cache entries).
#![no_main]

use libfuzzer_sys::fuzz_target;
use receipt_gateway::service::detail::{DetailRequest, MAX_COUNT};
use receipt_gateway::tencent::domain::GroupId;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = DetailRequest::parse(data) else { return };
    assert!((1..=MAX_COUNT).contains(&u64::from(req.count)), "Count {} accepted", req.count);
    assert!(req.filter <= 1, "Filter {} accepted", req.filter);
    assert!(req.cursor.len() <= 1024, "a Cursor of {} bytes accepted", req.cursor.len());
    assert!(GroupId::parse(req.group.as_str()).is_ok(), "an invalid GroupId was accepted: {:?}", req.group);
    assert_eq!(DetailRequest::parse(&req.to_body()), Ok(req), "to_body does not parse back to the same request");
});
