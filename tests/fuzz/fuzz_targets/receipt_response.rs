//! Tencent's answer to a receipt call: `ReceiptResponse` read from the wire, classified
//! as the upstream client does, and written back by the gateway's hand-rolled
//! serialiser (`to_bytes`, the hit path's).
//!
//! Each input is used twice: as a JSON body Tencent might send, and as raw material for
//! a response built field by field (strings full of quotes, backslashes, control
//! characters and non-ASCII, which the JSON route rarely produces). Properties:
//! - no panic;
//! - `to_bytes` writes exactly the bytes `serde_json::to_vec` writes, and they parse
//!   back to an equal response;
//! - `classify` turns an error answer into a decision that keeps its code: never a
//!   success or a transport failure, `Group`/`Throttled`/`Final` carry the code given.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use receipt_gateway::tencent::wire::{ReceiptItem, ReceiptResponse};
use receipt_gateway::tencent::code::ErrorCode;
use receipt_gateway::upstream::{Outcome, classify};

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = serde_json::from_slice::<ReceiptResponse>(data) {
        writes_like_serde(&reply);
        classified(&reply);
    }
    if let Ok(built) = build(&mut Unstructured::new(data)) {
        writes_like_serde(&built);
        classified(&built);
    }
});

fn writes_like_serde(reply: &ReceiptResponse) {
    let written = reply.to_bytes();
    // A struct of strings, integers and a list of them always serialises.
    let expected = serde_json::to_vec(reply).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&written),
        String::from_utf8_lossy(&expected),
        "to_bytes and serde_json disagree"
    );
    assert_eq!(written, expected, "to_bytes and serde_json disagree (bytes)");
    let back: ReceiptResponse = serde_json::from_slice(&written).expect("to_bytes wrote unreadable JSON");
    assert_eq!(&back, reply, "to_bytes does not parse back to the same response");
}

/// What the upstream client does with an answer that is not a success.
fn classified(reply: &ReceiptResponse) {
    if reply.error_code.is_ok() && reply.action_status == "OK" {
        return;
    }
    let code = if reply.error_code.is_ok() { ErrorCode::NONE } else { reply.error_code };
    match classify(code, reply.error_info.clone()) {
        Outcome::Items(_) => panic!("ErrorCode {code} classified as a success"),
        Outcome::NoAnswer { .. } => panic!("ErrorCode {code} classified as no answer"),
        Outcome::Group { code: c, .. } | Outcome::Throttled { code: c } | Outcome::Final { code: c, .. } => {
            assert_eq!(c, code, "the classified code is not the one given");
        }
        Outcome::InvalidParameter { .. } => assert_eq!(code, ErrorCode::INVALID_PARAMETER),
        Outcome::UserSigExpired => assert_eq!(code, ErrorCode::USERSIG_EXPIRED),
        Outcome::SigningLocked => assert_eq!(code, ErrorCode::SIGNING_LOCKED),
        Outcome::Retryable { reason } => assert!(reason.contains(&code.to_string()), "{reason}"),
    }
}

/// A response from raw bytes, field by field.
fn build(u: &mut Unstructured<'_>) -> Result<ReceiptResponse> {
    let action_status = u.arbitrary::<String>()?;
    let error_code = ErrorCode(u.arbitrary()?);
    let error_info = u.arbitrary::<String>()?;
    let items = if u.arbitrary()? {
        let n = u.int_in_range(0..=64)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(ReceiptItem {
                code: ErrorCode(u.arbitrary()?),
                seq: u.arbitrary()?,
                read: u.arbitrary()?,
                unread: u.arbitrary()?,
            });
        }
        Some(items)
    } else {
        None
    };
    Ok(ReceiptResponse { action_status: action_status.into(), error_code, error_info, items })
}
