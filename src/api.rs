//! Tencent's wire format for the read-receipt call, shared by the server (what callers
//! send us), the upstream client (what we send Tencent and read back) and the simulator
//! (which plays Tencent).
//!
//! Parsing is strict where the SPEC is (every rule names the field it checks) and lenient
//! where Tencent is: unknown fields are ignored in both directions.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::code::ErrorCode;
use crate::domain::{GroupId, MsgSeq, Receipt};

/// The path of the receipt call, on Tencent and on the gateway alike.
pub const RECEIPT_PATH: &str = "/v4/group_open_http_svc/get_group_msg_receipt";

/// The path of the detail call ("who has read"), on Tencent and on the gateway alike.
pub const DETAIL_PATH: &str = "/v4/group_open_http_svc/get_group_msg_receipt_detail";

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

/// The common body, read straight into types with the group id borrowed (no
/// `serde_json::Value` tree): anything it does not take — escapes, nulls, odd types,
/// duplicate keys — goes to the general path, which names what is wrong. Objects only:
/// serde's derived structs would also take a JSON array of the fields in order, which
/// the general path refuses (found by the fuzzer).
#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(rename = "GroupId", borrow)]
    group: &'a str,
    #[serde(rename = "MsgSeqList")]
    seqs: Vec<TypedSeq>,
}

/// `{"MsgSeq": n}` and nothing else shaped like it (not `[n]`).
struct TypedSeq {
    seq: u64,
}

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
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "MsgSeq" {
                        if seq.is_some() {
                            return Err(serde::de::Error::duplicate_field("MsgSeq"));
                        }
                        seq = Some(map.next_value::<u64>()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                seq.map(|seq| TypedSeq { seq }).ok_or_else(|| serde::de::Error::missing_field("MsgSeq"))
            }
        }
        deserializer.deserialize_map(Entry)
    }
}

impl ReceiptRequest {
    /// Parses and validates a body; `max_seqs` bounds the `MsgSeqList` length.
    pub fn parse(body: &[u8], max_seqs: usize) -> Result<Self, InvalidBody> {
        let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if object
            && let Ok(typed) = serde_json::from_slice::<Typed<'_>>(body)
            && !typed.seqs.is_empty()
            && typed.seqs.len() <= max_seqs
            && let Ok(group) = GroupId::parse(typed.group)
        {
            return Ok(Self { group, seqs: typed.seqs.iter().map(|s| MsgSeq(s.seq)).collect() });
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
    #[serde(rename = "ActionStatus", default)]
    pub action_status: String,
    #[serde(rename = "ErrorCode", default)]
    pub error_code: ErrorCode,
    #[serde(rename = "ErrorInfo", default)]
    pub error_info: String,
    #[serde(rename = "GroupMsgReceiptList", default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<ReceiptItem>>,
}

impl ReceiptResponse {
    pub fn ok(items: Vec<ReceiptItem>) -> Self {
        Self { action_status: "OK".into(), error_code: ErrorCode::OK, error_info: String::new(), items: Some(items) }
    }

    /// Tencent's bare acknowledgement (a callback's reply).
    pub fn ok_empty() -> Self {
        Self { action_status: "OK".into(), error_code: ErrorCode::OK, error_info: String::new(), items: None }
    }

    pub fn fail(code: ErrorCode, info: impl Into<String>) -> Self {
        Self { action_status: "FAIL".into(), error_code: code, error_info: info.into(), items: None }
    }

    /// The JSON body, written directly (every answer is one; this is the hit path's
    /// serialisation): the same bytes `serde_json` writes for this struct.
    pub fn to_bytes(&self) -> Vec<u8> {
        let items = self.items.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(64 + self.error_info.len() + items.len() * 56);
        let mut int = itoa::Buffer::new();
        out.extend_from_slice(b"{\"ActionStatus\":");
        string(&mut out, &self.action_status);
        out.extend_from_slice(b",\"ErrorCode\":");
        out.extend_from_slice(int.format(self.error_code.0).as_bytes());
        out.extend_from_slice(b",\"ErrorInfo\":");
        string(&mut out, &self.error_info);
        if let Some(items) = &self.items {
            out.extend_from_slice(b",\"GroupMsgReceiptList\":[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"Code\":");
                out.extend_from_slice(int.format(item.code.0).as_bytes());
                out.extend_from_slice(b",\"MsgSeq\":");
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
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ReceiptRequest, InvalidBody> {
        ReceiptRequest::parse(body.as_bytes(), 3)
    }

    #[test]
    fn a_valid_body_keeps_order_and_duplicates() {
        let r = parse(r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":2},{"MsgSeq":1},{"MsgSeq":2}],"X":1}"#).unwrap();
        assert_eq!(r.group.as_str(), "g");
        assert_eq!(r.seqs, vec![MsgSeq(2), MsgSeq(1), MsgSeq(2)]);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases = [
            ("nope", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"MsgSeqList":[{"MsgSeq":1}]}"#, "GroupId is required"),
            (r#"{"GroupId":7,"MsgSeqList":[{"MsgSeq":1}]}"#, "GroupId must be a string"),
            (r#"{"GroupId":"","MsgSeqList":[{"MsgSeq":1}]}"#, "GroupId must not be empty"),
            (r#"{"GroupId":"g"}"#, "MsgSeqList is required"),
            (r#"{"GroupId":"g","MsgSeqList":{}}"#, "MsgSeqList must be an array"),
            (r#"{"GroupId":"g","MsgSeqList":[]}"#, "must not be empty"),
            (r#"{"GroupId":"g","MsgSeqList":[1]}"#, "MsgSeqList[0]"),
            (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":-1}]}"#, "MsgSeqList[0].MsgSeq"),
            (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":1.5}]}"#, "MsgSeqList[1].MsgSeq"),
            (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":"1"}]}"#, "MsgSeqList[0].MsgSeq"),
            (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":18446744073709551616}]}"#, "MsgSeqList[0].MsgSeq"),
            (r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":1},{"MsgSeq":1},{"MsgSeq":1}]}"#, "at most 3"),
        ];
        for (body, expected) in cases {
            let err = parse(body).unwrap_err().to_string();
            assert!(err.contains(expected), "{body}: {err}");
        }
    }

    #[test]
    fn the_typed_and_the_general_path_agree() {
        let bodies = [
            r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":2},{"MsgSeq":1},{"MsgSeq":2}],"X":1}"#,
            r#"{"X":{"y":[1,2]},"MsgSeqList":[{"MsgSeq":7,"Z":null}],"GroupId":"g"}"#,
            r#"{"GroupId":"g\u0041","MsgSeqList":[{"MsgSeq":1}]}"#,
            r#"{"GroupId":"g","GroupId":"h","MsgSeqList":[{"MsgSeq":1}]}"#,
            r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1.0}]}"#,
            r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":2},{"MsgSeq":3},{"MsgSeq":4}]}"#,
            r#"{"GroupId":"a\tb","MsgSeqList":[{"MsgSeq":1}]}"#,
            r#"{"GroupId":null,"MsgSeqList":[{"MsgSeq":1}]}"#,
            r#"{"GroupId":"g","MsgSeqList":[]}"#,
            // Found by the fuzzer: arrays in the shape of the structs.
            r#"["g",[{"MsgSeq":1}]]"#,
            r#"{"GroupId":"g","MsgSeqList":[[1]]}"#,
            r#" {"GroupId":"g","MsgSeqList":[{"MsgSeq":1,"MsgSeq":2}]}"#,
        ];
        for body in bodies {
            assert_eq!(parse(body), ReceiptRequest::parse_general(body.as_bytes(), 3), "{body}");
        }
    }

    #[test]
    fn the_largest_msgseq_is_accepted() {
        let r = parse(r#"{"GroupId":"g","MsgSeqList":[{"MsgSeq":18446744073709551615}]}"#).unwrap();
        assert_eq!(r.seqs, vec![MsgSeq(u64::MAX)]);
    }

    #[test]
    fn upstream_answers_parse_with_unknown_fields_and_round_trip() {
        let raw = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","New":true,
            "GroupMsgReceiptList":[{"Code":0,"MsgSeq":1,"ReadNum":1,"UnreadNum":6},{"Code":10062,"MsgSeq":9}]}"#;
        let reply: ReceiptResponse = serde_json::from_str(raw).unwrap();
        let items = reply.items.clone().unwrap();
        assert_eq!(items[1], ReceiptItem { code: ErrorCode::NO_RECEIPT, seq: 9, read: None, unread: None });
        let again: ReceiptResponse = serde_json::from_slice(&reply.to_bytes()).unwrap();
        assert_eq!(again, reply);
        assert_eq!(reply.to_bytes(), serde_json::to_vec(&reply).unwrap(), "the same bytes as serde_json");
        let odd = ReceiptResponse::fail(ErrorCode(-1), "quote \" backslash \\ newline \n tab \t é");
        assert_eq!(odd.to_bytes(), serde_json::to_vec(&odd).unwrap());
        assert_eq!(ReceiptResponse::ok_empty().to_bytes(), serde_json::to_vec(&ReceiptResponse::ok_empty()).unwrap());
        let fail: ReceiptResponse =
            serde_json::from_str(r#"{"ActionStatus":"FAIL","ErrorCode":10010,"ErrorInfo":"x"}"#).unwrap();
        assert_eq!(fail, ReceiptResponse::fail(ErrorCode::GROUP_NOT_FOUND, "x"));
    }
}
