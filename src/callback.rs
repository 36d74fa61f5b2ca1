//! Tencent's webhooks (SPEC 2.3): `POST /callback`.
//!
//! Tencent pushes every read of a group message as a `Group.CallbackAfterReadReceipt`
//! with the new counts; taken here, they keep the cache current without spending budget.

use sha2::{Digest, Sha256};

/// The path Tencent's callback URL points at.
pub const CALLBACK_PATH: &str = "/callback";

/// The command that carries read receipts.
pub const AFTER_READ_RECEIPT: &str = "Group.CallbackAfterReadReceipt";
/// Tencent's warning at 80 % of an API's rate limit.
pub const REQUEST_OVER_LIMIT: &str = "Alert.RequestOverLimit";

/// How far a callback's `RequestTime` may be from now (seconds).
pub const MAX_CLOCK_SKEW_S: u64 = 60;

/// Tencent's callback signature: `hex(sha256(token + RequestTime))`.
pub fn sign(token: &[u8], request_time: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(token);
    hash.update(request_time.as_bytes());
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tencents_documented_sign_vector() {
        assert_eq!(sign(b"xxxxyyyy", "1669872112"), "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061");
    }
}
