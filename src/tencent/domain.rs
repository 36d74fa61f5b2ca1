//! The identifiers and values every other module speaks in.
//!
//! Each type has a validating constructor, so a value that exists is a valid one: a
//! `GroupId` is never empty, never longer than Tencent allows and never holds control
//! characters. Nothing here does I/O.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::tencent::code::ErrorCode;

/// An app's `SDKAppID`, which selects credentials, region and budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AppId(pub u64);

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A group's id. Cheap to clone: every cache key of a group shares one allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(Arc<str>);

/// The longest `GroupId` accepted, in bytes (Tencent's own limit for custom group ids
/// is lower; 128 leaves room without letting a caller send kilobytes of key).
pub const MAX_GROUP_ID_BYTES: usize = 128;

impl GroupId {
    /// Accepts a non-empty string of at most [`MAX_GROUP_ID_BYTES`] with no control
    /// characters; the error says which rule was broken.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("must not be empty");
        }
        if raw.len() > MAX_GROUP_ID_BYTES {
            return Err("must be at most 128 bytes");
        }
        if raw.chars().any(char::is_control) {
            return Err("must not contain control characters");
        }
        Ok(Self(Arc::from(raw)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message's sequence number within its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MsgSeq(pub u64);

/// One message's read receipt as Tencent reports it. `code` is the per-item error code
/// (0, or e.g. 10062 when no receipt exists); the counts are absent when Tencent omits
/// them and are then omitted in our answer too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub code: ErrorCode,
    pub read: Option<u64>,
    pub unread: Option<u64>,
}

impl Receipt {
    /// A negative answer: cached for `negative_ttl`, not `ttl`.
    pub fn is_negative(&self) -> bool {
        self.code == ErrorCode::NO_RECEIPT
    }
}

/// The data centre an app lives in, which decides the upstream domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Region {
    China,
    Singapore,
    Seoul,
    Tokyo,
    Frankfurt,
    SiliconValley,
    Jakarta,
}

impl Region {
    pub const ALL: [Region; 7] = [
        Region::China,
        Region::Singapore,
        Region::Seoul,
        Region::Tokyo,
        Region::Frankfurt,
        Region::SiliconValley,
        Region::Jakarta,
    ];

    /// Tencent's REST domain for this region (docs/design.md#domains-and-failover).
    pub fn domain(self) -> &'static str {
        match self {
            Region::China => "console.tim.qq.com",
            Region::Singapore => "adminapisgp.im.qcloud.com",
            Region::Seoul => "adminapikr.im.qcloud.com",
            Region::Tokyo => "adminapijpn.im.qcloud.com",
            Region::Frankfurt => "adminapiger.im.qcloud.com",
            Region::SiliconValley => "adminapiusa.im.qcloud.com",
            Region::Jakarta => "adminapiidn.im.qcloud.com",
        }
    }

    /// The backup domain Tencent documents for this region, for when the primary cannot
    /// be reached (DNS hijacking, a broken route): `*.my-imcloud.com`.
    pub fn backup_domain(self) -> &'static str {
        match self {
            Region::China => "adminapi.my-imcloud.com",
            Region::Singapore => "adminapisgp.my-imcloud.com",
            Region::Seoul => "adminapikr.my-imcloud.com",
            Region::Tokyo => "adminapijpn.my-imcloud.com",
            Region::Frankfurt => "adminapiger.my-imcloud.com",
            Region::SiliconValley => "adminapiusa.my-imcloud.com",
            Region::Jakarta => "adminapiidn.my-imcloud.com",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Region::China => "china",
            Region::Singapore => "singapore",
            Region::Seoul => "seoul",
            Region::Tokyo => "tokyo",
            Region::Frankfurt => "frankfurt",
            Region::SiliconValley => "silicon-valley",
            Region::Jakarta => "jakarta",
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_id_rules_are_enforced() {
        assert!(GroupId::parse("@TGS#2TTV7VSII").is_ok());
        assert!(GroupId::parse("").is_err());
        assert!(GroupId::parse(&"g".repeat(128)).is_ok());
        assert!(GroupId::parse(&"g".repeat(129)).is_err());
        assert!(GroupId::parse("a\nb").is_err());
        assert!(GroupId::parse("a\u{7f}b").is_err());
        assert!(GroupId::parse("中文群").is_ok());
    }

    #[test]
    fn every_region_has_its_documented_domain() {
        let names: Vec<_> = Region::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, ["china", "singapore", "seoul", "tokyo", "frankfurt", "silicon-valley", "jakarta"]);
        assert_eq!(Region::SiliconValley.domain(), "adminapiusa.im.qcloud.com");
        let table: Vec<_> = Region::ALL.iter().map(|r| (r.domain(), r.backup_domain())).collect();
        assert_eq!(
            table,
            [
                ("console.tim.qq.com", "adminapi.my-imcloud.com"),
                ("adminapisgp.im.qcloud.com", "adminapisgp.my-imcloud.com"),
                ("adminapikr.im.qcloud.com", "adminapikr.my-imcloud.com"),
                ("adminapijpn.im.qcloud.com", "adminapijpn.my-imcloud.com"),
                ("adminapiger.im.qcloud.com", "adminapiger.my-imcloud.com"),
                ("adminapiusa.im.qcloud.com", "adminapiusa.my-imcloud.com"),
                ("adminapiidn.im.qcloud.com", "adminapiidn.my-imcloud.com"),
            ]
        );
    }
}
