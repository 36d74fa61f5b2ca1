//! Tencent's webhooks (callbacks): the commands the gateway reads, and the `Sign` that
//! proves a callback came from Tencent: `hex(sha256(token + RequestTime))`.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The path Tencent's callback URL points at, on the gateway.
pub const CALLBACK_PATH: &str = "/callback";

/// The command that carries read receipts.
pub const AFTER_READ_RECEIPT: &str = "Group.CallbackAfterReadReceipt";
/// Tencent's warning at 80 % of an API's rate limit.
pub const REQUEST_OVER_LIMIT: &str = "Alert.RequestOverLimit";

/// Tencent's callback signature for `request_time` (Unix seconds, as sent).
pub fn sign(token: &[u8], request_time: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(token);
    hash.update(request_time.as_bytes());
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `given` is the `Sign` for `request_time` (hex of either case), compared in
/// constant time: digests of both, so that the length leaks nothing either.
pub fn verify(token: &[u8], request_time: &str, given: &str) -> bool {
    let expected = Sha256::digest(sign(token, request_time).as_bytes());
    let given = Sha256::digest(given.to_ascii_lowercase().as_bytes());
    expected.ct_eq(&given).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tencents_documented_sign_vector() {
        assert_eq!(sign(b"xxxxyyyy", "1669872112"), "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061");
    }

    #[test]
    fn verify_takes_either_case_and_refuses_another_time_or_token() {
        let sign = sign(b"xxxxyyyy", "1669872112");
        assert!(verify(b"xxxxyyyy", "1669872112", &sign));
        assert!(verify(b"xxxxyyyy", "1669872112", &sign.to_ascii_uppercase()));
        assert!(!verify(b"xxxxyyyy", "1669872113", &sign));
        assert!(!verify(b"other", "1669872112", &sign));
        assert!(!verify(b"xxxxyyyy", "1669872112", ""));
    }
}
