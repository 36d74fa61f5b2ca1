//! Tencent's wire format for the read-receipt call, shared by the server (what callers
//! send us), the upstream client (what we send Tencent and read back) and the simulator
//! (which plays Tencent).
//!
//! Parsing is strict where the API contract is (every rule names the field it checks) and lenient
//! where Tencent is: unknown fields are ignored in both directions.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{GroupId, MsgSeq, Receipt};

/// The path of the receipt call, on Tencent and on the gateway alike.
pub const RECEIPT_PATH: &str = "/v4/group_open_http_svc/get_group_msg_receipt";

/// The path of the detail call ("who has read"), on Tencent and on the gateway alike.
pub const DETAIL_PATH: &str = "/v4/group_open_http_svc/get_group_msg_receipt_detail";

/// The header on every upstream call that says when the gateway sent it: microseconds
/// since the Unix epoch, read on a monotonic clock anchored to Unix time once per process
/// (so a process's stamps never jump with the wall clock, and those of processes on one
/// machine agree to within clock drift). The send instant is the gateway's to control,
/// the arrival at Tencent is not: the simulator records this stamp so that tests can
/// check the budget on the gateway's own clock. Tencent ignores unknown headers.
pub const SENT_AT_HEADER: &str = "x-receipt-gateway-sent-at-us";

/// A validated receipt query: one group, the MsgSeqs in the caller's order (duplicates
/// kept, because the answer repeats them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptRequest {
    pub group: GroupId,
    pub seqs: Vec<MsgSeq>,
}

/// Why a request body was refused. `Display` names the field, which is what a caller
/// needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBody {
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body must be a JSON object")]
    NotObject,
    #[error("GroupId is required")]
    MissingGroupId,
    #[error("GroupId must be a string")]
    GroupIdNotString,
    #[error("GroupId {0}")]
    BadGroupId(&'static str),
    #[error("MsgSeqList is required")]
    MissingSeqList,
    #[error("MsgSeqList must be an array")]
    SeqListNotArray,
    #[error("MsgSeqList must not be empty")]
    EmptySeqList,
    #[error("MsgSeqList has {got} entries; at most {max} are allowed")]
    TooManySeqs { got: usize, max: usize },
    #[error("MsgSeqList[{0}] must be an object with an integer MsgSeq")]
    SeqEntryNotObject(usize),
    #[error("MsgSeqList[{0}].MsgSeq must be an integer from 0 to 18446744073709551615")]
    BadSeq(usize),
}

/// What [`scan`] leaves (extra keys, escapes in keys, whitespace it does not know), read
/// straight into types with the group id borrowed (no `serde_json::Value` tree):
/// anything it does not take — escapes, nulls, odd types,
/// duplicate keys — goes to the general path, which names what is wrong. Objects only:
/// serde's derived structs would also take a JSON array of the fields in order, which
/// the general path refuses (found by the fuzzer).
#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(rename = "GroupId", borrow)]
    group: &'a str,
    #[serde(rename = "MsgSeqList", deserialize_with = "seq_list")]
    seqs: Vec<MsgSeq>,
}

/// `MsgSeqList` read straight into MsgSeqs, with room for a usual list from the start
/// (JSON gives no length ahead).
fn seq_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<MsgSeq>, D::Error> {
    struct List;
    impl<'de> serde::de::Visitor<'de> for List {
        type Value = Vec<MsgSeq>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of objects with an integer MsgSeq")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut list: A) -> Result<Vec<MsgSeq>, A::Error> {
            let mut seqs = Vec::with_capacity(16);
            while let Some(TypedSeq(seq)) = list.next_element()? {
                seqs.push(seq);
            }
            Ok(seqs)
        }
    }
    deserializer.deserialize_seq(List)
}

/// `{"MsgSeq": n}` and nothing else shaped like it (not `[n]`).
struct TypedSeq(MsgSeq);

impl<'de> Deserialize<'de> for TypedSeq {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = TypedSeq;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with an integer MsgSeq")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TypedSeq, A::Error> {
                let mut seq = None;
                while let Some(key) = map.next_key::<SeqKey>()? {
                    match key {
                        SeqKey::MsgSeq if seq.is_some() => return Err(serde::de::Error::duplicate_field("MsgSeq")),
                        SeqKey::MsgSeq => seq = Some(map.next_value::<u64>()?),
                        SeqKey::Other => drop(map.next_value::<serde::de::IgnoredAny>()?),
                    }
                }
                seq.map(|seq| TypedSeq(MsgSeq(seq))).ok_or_else(|| serde::de::Error::missing_field("MsgSeq"))
            }
        }
        deserializer.deserialize_map(Entry)
    }
}

/// A key of a `MsgSeqList` entry, told apart without copying it.
enum SeqKey {
    MsgSeq,
    Other,
}

impl<'de> Deserialize<'de> for SeqKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Key;
        impl serde::de::Visitor<'_> for Key {
            type Value = SeqKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<SeqKey, E> {
                Ok(if key == "MsgSeq" { SeqKey::MsgSeq } else { SeqKey::Other })
            }
        }
        deserializer.deserialize_identifier(Key)
    }
}

/// The body every client sends, read by hand in one pass: an object with exactly the
/// keys `GroupId` (a string without escapes) and `MsgSeqList` (objects with only a plain
/// integer `MsgSeq`), in either order, JSON whitespace anywhere. Anything else — escapes,
/// other keys, duplicates, numbers with a sign, fraction or exponent, a list that is
/// empty or too long, an invalid `GroupId` — is `None`, and the serde paths decide (with
/// the error that names the field). Where it answers, it answers what they would: a
/// unit test and the `receipt_request` fuzz target compare them. serde_json took 15 % of
/// a cached answer's instructions for this body (callgrind, `benches/callgrind.sh`).
fn scan(body: &[u8], max_seqs: usize) -> Option<ReceiptRequest> {
    let mut s = Scan { body, at: 0 };
    let (mut group, mut seqs) = (None, None);
    s.expect(b'{')?;
    loop {
        let key = s.plain_string()?;
        s.expect(b':')?;
        match key {
            b"GroupId" if group.is_none() => group = Some(std::str::from_utf8(s.plain_string()?).ok()?),
            b"MsgSeqList" if seqs.is_none() => seqs = Some(s.seq_list(max_seqs)?),
            _ => return None,
        }
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.skip_whitespace();
    let seqs = seqs.filter(|seqs| s.at == body.len() && !seqs.is_empty())?;
    Some(ReceiptRequest { group: GroupId::parse(group?).ok()?, seqs })
}

/// A cursor over a body for [`scan`]; every read skips the JSON whitespace before it.
struct Scan<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.body.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, consumed.
    fn next(&mut self) -> Option<u8> {
        self.skip_whitespace();
        let b = *self.body.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// A string's bytes when it has no escape and no control character (so they are its
    /// value); its UTF-8 is the caller's to check.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let rest = &self.body[self.at..];
        let len = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        (rest[len] == b'"').then_some(())?;
        self.at += len + 1;
        Some(&rest[..len])
    }

    /// `[{"MsgSeq": n}, ...]`, at most `max` entries.
    fn seq_list(&mut self, max: usize) -> Option<Vec<MsgSeq>> {
        self.expect(b'[')?;
        let mut seqs = Vec::with_capacity(16);
        self.skip_whitespace();
        if self.body.get(self.at) == Some(&b']') {
            self.at += 1;
            return Some(seqs);
        }
        loop {
            self.expect(b'{')?;
            (self.plain_string()? == b"MsgSeq").then_some(())?;
            self.expect(b':')?;
            seqs.push(MsgSeq(self.integer()?));
            self.expect(b'}')?;
            if seqs.len() > max {
                return None;
            }
            match self.next()? {
                b',' => continue,
                b']' => return Some(seqs),
                _ => return None,
            }
        }
    }

    /// A JSON integer from 0 to `u64::MAX`: digits, no leading zero, no sign, fraction
    /// or exponent.
    fn integer(&mut self) -> Option<u64> {
        self.skip_whitespace();
        let digits = self.body[self.at..].iter().take_while(|b| b.is_ascii_digit()).count();
        let text = &self.body[self.at..self.at + digits];
        if digits == 0 || (digits > 1 && text[0] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.body.get(self.at + digits) {
            return None;
        }
        let n = text.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))?;
        self.at += digits;
        Some(n)
    }
}

impl ReceiptRequest {
    /// Parses and validates a body; `max_seqs` bounds the `MsgSeqList` length.
    pub fn parse(body: &[u8], max_seqs: usize) -> Result<Self, InvalidBody> {
        if let Some(request) = scan(body, max_seqs) {
            return Ok(request);
        }
        let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if object
            && let Ok(typed) = serde_json::from_slice::<Typed<'_>>(body)
            && !typed.seqs.is_empty()
            && typed.seqs.len() <= max_seqs
            && let Ok(group) = GroupId::parse(typed.group)
        {
            return Ok(Self { group, seqs: typed.seqs });
        }
        Self::parse_general(body, max_seqs)
    }

    /// Every body, with the error that names the field (the typed path's fallback).
    fn parse_general(body: &[u8], max_seqs: usize) -> Result<Self, InvalidBody> {
        let value: Value = serde_json::from_slice(body).map_err(|e| InvalidBody::NotJson(e.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(InvalidBody::NotObject);
        };
        let group = match object.remove("GroupId") {
            None | Some(Value::Null) => return Err(InvalidBody::MissingGroupId),
            Some(Value::String(s)) => GroupId::parse(&s).map_err(InvalidBody::BadGroupId)?,
            Some(_) => return Err(InvalidBody::GroupIdNotString),
        };
        let list = match object.remove("MsgSeqList") {
            None | Some(Value::Null) => return Err(InvalidBody::MissingSeqList),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(InvalidBody::SeqListNotArray),
        };
        if list.is_empty() {
            return Err(InvalidBody::EmptySeqList);
        }
        if list.len() > max_seqs {
            return Err(InvalidBody::TooManySeqs { got: list.len(), max: max_seqs });
        }
        let seqs = list
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let Value::Object(entry) = entry else {
                    return Err(InvalidBody::SeqEntryNotObject(i));
                };
                entry.get("MsgSeq").and_then(Value::as_u64).map(MsgSeq).ok_or(InvalidBody::BadSeq(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { group, seqs })
    }

    /// The body Tencent expects for this query.
    pub fn to_body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Seq {
            #[serde(rename = "MsgSeq")]
            seq: u64,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(rename = "GroupId")]
            group: &'a str,
            #[serde(rename = "MsgSeqList")]
            seqs: Vec<Seq>,
        }
        let body = Body { group: self.group.as_str(), seqs: self.seqs.iter().map(|s| Seq { seq: s.0 }).collect() };
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// One item of `GroupMsgReceiptList`, as Tencent writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptItem {
    #[serde(rename = "Code", default)]
    pub code: ErrorCode,
    #[serde(rename = "MsgSeq")]
    pub seq: u64,
    #[serde(rename = "ReadNum", default, skip_serializing_if = "Option::is_none")]
    pub read: Option<u64>,
    #[serde(rename = "UnreadNum", default, skip_serializing_if = "Option::is_none")]
    pub unread: Option<u64>,
}

impl ReceiptItem {
    pub fn new(seq: MsgSeq, receipt: Receipt) -> Self {
        Self { code: receipt.code, seq: seq.0, read: receipt.read, unread: receipt.unread }
    }

    pub fn receipt(&self) -> Receipt {
        Receipt { code: self.code, read: self.read, unread: self.unread }
    }
}

/// A whole Tencent answer: the success shape, or any error shape (no list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptResponse {
    /// "OK" or "FAIL" from this gateway (no allocation), anything from Tencent.
    #[serde(rename = "ActionStatus", default)]
    pub action_status: Cow<'static, str>,
    #[serde(rename = "ErrorCode", default)]
    pub error_code: ErrorCode,
    #[serde(rename = "ErrorInfo", default)]
    pub error_info: String,
    #[serde(rename = "GroupMsgReceiptList", default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<ReceiptItem>>,
}

impl ReceiptResponse {
    pub fn ok(items: Vec<ReceiptItem>) -> Self {
        Self {
            action_status: Cow::Borrowed("OK"),
            error_code: ErrorCode::OK,
            error_info: String::new(),
            items: Some(items),
        }
    }

    /// Tencent's bare acknowledgement (a callback's reply).
    pub fn ok_empty() -> Self {
        Self { action_status: Cow::Borrowed("OK"), error_code: ErrorCode::OK, error_info: String::new(), items: None }
    }

    pub fn fail(code: ErrorCode, info: impl Into<String>) -> Self {
        Self { action_status: Cow::Borrowed("FAIL"), error_code: code, error_info: info.into(), items: None }
    }

    /// The JSON body, written directly (every answer is one; this is the hit path's
    /// serialisation): the same bytes `serde_json` writes for this struct.
    pub fn to_bytes(&self) -> Vec<u8> {
        let items = self.items.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(64 + self.error_info.len() + items.len() * 56);
        let mut int = itoa::Buffer::new();
        // The usual head and item starts in one piece each: fewer, longer copies.
        if self.action_status == "OK" && self.error_code == ErrorCode::OK && self.error_info.is_empty() {
            out.extend_from_slice(br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"""#);
        } else {
            out.extend_from_slice(b"{\"ActionStatus\":");
            string(&mut out, &self.action_status);
            out.extend_from_slice(b",\"ErrorCode\":");
            out.extend_from_slice(int.format(self.error_code.0).as_bytes());
            out.extend_from_slice(b",\"ErrorInfo\":");
            string(&mut out, &self.error_info);
        }
        if let Some(items) = &self.items {
            out.extend_from_slice(b",\"GroupMsgReceiptList\":[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if item.code == ErrorCode::OK {
                    out.extend_from_slice(br#"{"Code":0,"MsgSeq":"#);
                } else {
                    out.extend_from_slice(b"{\"Code\":");
                    out.extend_from_slice(int.format(item.code.0).as_bytes());
                    out.extend_from_slice(b",\"MsgSeq\":");
                }
                out.extend_from_slice(int.format(item.seq).as_bytes());
                if let Some(read) = item.read {
                    out.extend_from_slice(b",\"ReadNum\":");
                    out.extend_from_slice(int.format(read).as_bytes());
                }
                if let Some(unread) = item.unread {
                    out.extend_from_slice(b",\"UnreadNum\":");
                    out.extend_from_slice(int.format(unread).as_bytes());
                }
                out.push(b'}');
            }
            out.push(b']');
        }
        out.push(b'}');
        out
    }
}

/// A JSON string: as is when nothing needs escaping (the usual "OK" and ""), else
/// through `serde_json`.
fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Serialising a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests;
