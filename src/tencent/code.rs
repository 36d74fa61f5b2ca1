//! Tencent's ErrorCodes, as one newtype with named constants.
//!
//! The upstream classifier, the fetch loop, the gateway's own errors (which reuse
//! Tencent's meanings: docs/design.md#errors) and the simulator all speak these names, so
//! a code's meaning is written down once. The per-item `Code` of a receipt is the same kind of number.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An `ErrorCode` (call level) or `Code` (per item) as Tencent sends it; absent is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub i64);

impl ErrorCode {
    /// Success.
    pub const OK: Self = Self(0);
    /// Not an answer Tencent gave: no code, or an HTTP-level failure.
    pub const NONE: Self = Self(-1);

    /// Internal server error; retried.
    pub const INTERNAL: Self = Self(10002);
    /// Invalid command word: the gateway's request, not the caller's.
    pub const INVALID_COMMAND: Self = Self(10003);
    /// Invalid parameter: a bad body, or (upstream) a MsgSeq Tencent refuses.
    pub const INVALID_PARAMETER: Self = Self(10004);
    /// Operation frequency limit: throttling.
    pub const FREQUENCY_LIMIT: Self = Self(10006);
    /// No permission for the operation, about the whole group.
    pub const NO_PERMISSION: Self = Self(10007);
    /// The group does not exist or was deleted.
    pub const GROUP_NOT_FOUND: Self = Self(10010);
    /// The group id is invalid (or the group type has no receipts).
    pub const GROUP_INVALID: Self = Self(10015);
    /// Per item: no read receipt exists for this message.
    pub const NO_RECEIPT: Self = Self(10062);

    /// Method not allowed.
    pub const METHOD_NOT_ALLOWED: Self = Self(60002);
    /// A query parameter is missing or malformed.
    pub const BAD_QUERY: Self = Self(60003);
    /// The request body is not JSON: the same code as [`Self::BAD_QUERY`], Tencent's
    /// "the request is malformed".
    pub const NOT_JSON: Self = Self(60003);
    /// Not authenticated or not allowed.
    pub const UNAUTHORIZED: Self = Self(60004);
    /// The SDKAppID is missing or not configured.
    pub const UNKNOWN_APP: Self = Self(60006);
    /// Request rate over the limit: slow down.
    pub const RATE_LIMITED: Self = Self(60007);
    /// The server timed out.
    pub const TIMEOUT: Self = Self(60008);
    /// Unknown path.
    pub const UNKNOWN_PATH: Self = Self(60009);
    /// The identifier is not an App admin.
    pub const NOT_ADMIN: Self = Self(60010);
    /// Further throttling answers (per-second, per-app and per-API limits).
    pub const THROTTLED_60011: Self = Self(60011);
    pub const THROTTLED_60018: Self = Self(60018);
    pub const THROTTLED_60019: Self = Self(60019);

    /// The UserSig expired: sign anew.
    pub const USERSIG_EXPIRED: Self = Self(70001);
    /// The UserSig does not verify.
    pub const USERSIG_INVALID: Self = Self(70009);
    /// Further signature defects that are the gateway's credentials' fault.
    pub const USERSIG_MISMATCH: Self = Self(70016);
    pub const USERSIG_APP_MISMATCH: Self = Self(70020);
    /// Too many signature failures: signing is locked for a while.
    pub const SIGNING_LOCKED: Self = Self(70050);
    /// Transient internal errors; retried.
    pub const TRANSIENT_70169: Self = Self(70169);
    pub const TRANSIENT_70500: Self = Self(70500);

    pub fn is_ok(self) -> bool {
        self == Self::OK
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
