//! Tencent's `get_group_msg_receipt_detail` ("who has read"), as pure functions: how a
//! body is read and judged, who the members of a message are, and how their list is paged.
//!
//! The members are derived from the counts the receipt API reports for the same
//! (group, seq), so the two APIs can never disagree: a message with `read + unread`
//! members has the accounts [`member_account`]`(0..read + unread)`, and the first `read`
//! of them are the ones who have read it. A played read (see `player`) makes member
//! `read` read, which keeps that true.
//!
//! The `Cursor` is the index of the next member to return, as a decimal string. Because a
//! member only ever moves from unread to read, and the readers come first, an index stays
//! meaningful while counts change between pages: no member is returned twice in one
//! list, and none that was in the list when paging began is skipped.

use std::ops::Range;

use serde_json::{Map, Value, json};

use crate::tencent::code::ErrorCode;
use crate::tencent::domain::GroupId;

use super::rules::Fail;

/// The most accounts one page may ask for (`Count`), Tencent's documented maximum.
pub const MAX_DETAIL_COUNT: u64 = 200;

/// The account id of the group's `index`-th member (from 0), e.g. `member-0`.
pub fn member_account(index: u64) -> String {
    format!("member-{index}")
}

/// Which list a detail call asks for (`Filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Filter: 0`: the members who have read the message (`ReadList`).
    Read,
    /// `Filter: 1`: the members who have not (`UnreadList`).
    Unread,
}

/// The name the answer gives the "last page" flag. Tencent's reference describes
/// `IsFinish`; SDKs built against its live answers read `IsFinished`. The gateway accepts
/// either (it passes the body through), and a test can make the simulator send the other one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FinishField {
    #[default]
    IsFinish,
    IsFinished,
}

impl FinishField {
    pub fn name(self) -> &'static str {
        match self {
            Self::IsFinish => "IsFinish",
            Self::IsFinished => "IsFinished",
        }
    }
}

/// A detail body as parsed, before its `Count` is judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DetailRequest {
    pub group: GroupId,
    pub seq: u64,
    pub filter: Filter,
    /// `""` for the first page, else the `Cursor` of the page before.
    pub cursor: String,
    pub count: u64,
}

/// Reads a body: 10004 naming the field for anything Tencent would refuse. `Cursor` may
/// be left out (the first page); the other fields are required.
pub(super) fn parse(body: &[u8]) -> Result<DetailRequest, Fail> {
    let bad = |info: String| Fail::new(ErrorCode::INVALID_PARAMETER, info);
    let value: Value = serde_json::from_slice(body).map_err(|e| bad(format!("body is not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(bad("body must be a JSON object".into()));
    };
    let group = match object.get("GroupId") {
        Some(Value::String(s)) => GroupId::parse(s).map_err(|e| bad(format!("GroupId {e}")))?,
        None | Some(Value::Null) => return Err(bad("GroupId is required".into())),
        Some(_) => return Err(bad("GroupId must be a string".into())),
    };
    let integer = |name: &str| {
        object.get(name).and_then(Value::as_u64).ok_or_else(|| bad(format!("{name} must be a non-negative integer")))
    };
    let seq = integer("MsgSeq")?;
    let filter = match integer("Filter")? {
        0 => Filter::Read,
        1 => Filter::Unread,
        other => return Err(bad(format!("Filter must be 0 (read) or 1 (unread), not {other}"))),
    };
    let cursor = match object.get("Cursor") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("Cursor must be a string".into())),
    };
    let count = integer("Count")?;
    Ok(DetailRequest { group, seq, filter, cursor, count })
}

/// A body that parsed must also ask for 1 to [`MAX_DETAIL_COUNT`] accounts (10004).
pub(super) fn check_count(request: DetailRequest) -> Result<DetailRequest, Fail> {
    if !(1..=MAX_DETAIL_COUNT).contains(&request.count) {
        let info = format!("Count must be from 1 to {MAX_DETAIL_COUNT}, not {}", request.count);
        return Err(Fail::new(ErrorCode::INVALID_PARAMETER, info));
    }
    Ok(request)
}

/// One page of a member list: the member indexes it holds and where the next page starts
/// (`None` on the last page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Page {
    pub members: Range<u64>,
    pub next: Option<u64>,
}

/// The page `request` asks for, of a message with these counts. A `Cursor` that is not
/// one the simulator issued (not a decimal index) is 10004; an index outside the list is
/// moved to its nearest end, which is where a member that changed lists leaves it.
pub(super) fn page(request: &DetailRequest, read: u64, unread: u64) -> Result<Page, Fail> {
    let list = match request.filter {
        Filter::Read => 0..read,
        Filter::Unread => read..read.saturating_add(unread),
    };
    let start = if request.cursor.is_empty() {
        list.start
    } else {
        let index = request.cursor.parse::<u64>().map_err(|_| {
            let info = format!("Cursor {:?} is not one this API returned", request.cursor);
            Fail::new(ErrorCode::INVALID_PARAMETER, info)
        })?;
        index.clamp(list.start, list.end)
    };
    let end = start.saturating_add(request.count).min(list.end);
    Ok(Page { members: start..end, next: (end < list.end).then_some(end) })
}

/// Tencent's answer for one page: `MsgSeq`, the finish flag, the next `Cursor` (`""` on
/// the last page) and `ReadList` `[{"Read_Account": …}]` or `UnreadList`
/// `[{"Unread_Account": …}]`.
pub(super) fn answer_body(request: &DetailRequest, page: &Page, finish: FinishField) -> Vec<u8> {
    let (list, field) = match request.filter {
        Filter::Read => ("ReadList", "Read_Account"),
        Filter::Unread => ("UnreadList", "Unread_Account"),
    };
    let accounts: Vec<Value> = page.members.clone().map(|i| json!({ field: member_account(i) })).collect();
    let mut answer = Map::new();
    answer.insert("ActionStatus".into(), "OK".into());
    answer.insert("ErrorCode".into(), 0.into());
    answer.insert("ErrorInfo".into(), "".into());
    answer.insert("GroupId".into(), request.group.as_str().into());
    answer.insert("MsgSeq".into(), request.seq.into());
    answer.insert(finish.name().into(), u8::from(page.next.is_none()).into());
    answer.insert("Cursor".into(), page.next.map(|n| n.to_string()).unwrap_or_default().into());
    answer.insert(list.into(), accounts.into());
    // A map of strings, integers and arrays of them: serialisation cannot fail.
    serde_json::to_vec(&Value::Object(answer)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(filter: Filter, cursor: &str, count: u64) -> DetailRequest {
        let group = GroupId::parse("g").unwrap_or_else(|e| panic!("{e}"));
        DetailRequest { group, seq: 1, filter, cursor: cursor.into(), count }
    }

    #[test]
    fn a_body_parses_and_each_bad_field_is_named() {
        let ok = parse(br#"{"GroupId":"g","MsgSeq":3,"Filter":1,"Cursor":"","Count":100,"X":1}"#);
        assert_eq!(ok.map_err(|f| f.info), Ok(DetailRequest { seq: 3, ..request(Filter::Unread, "", 100) }));
        let no_cursor = parse(br#"{"GroupId":"g","MsgSeq":1,"Filter":0,"Count":1}"#).map(|r| r.cursor);
        assert_eq!(no_cursor.map_err(|f| f.info), Ok(String::new()));
        let cases: [(&[u8], &str); 8] = [
            (b"nope", "not valid JSON"),
            (b"[]", "JSON object"),
            (br#"{"MsgSeq":1,"Filter":0,"Count":1}"#, "GroupId is required"),
            (br#"{"GroupId":"","MsgSeq":1,"Filter":0,"Count":1}"#, "GroupId must not be empty"),
            (br#"{"GroupId":"g","MsgSeq":-1,"Filter":0,"Count":1}"#, "MsgSeq"),
            (br#"{"GroupId":"g","MsgSeq":1,"Filter":2,"Count":1}"#, "Filter must be 0"),
            (br#"{"GroupId":"g","MsgSeq":1,"Filter":0,"Cursor":5,"Count":1}"#, "Cursor must be a string"),
            (br#"{"GroupId":"g","MsgSeq":1,"Filter":0}"#, "Count"),
        ];
        for (body, expected) in cases {
            let fail = parse(body).map(|_| ()).unwrap_err();
            assert_eq!(fail.code, ErrorCode::INVALID_PARAMETER);
            assert!(fail.info.contains(expected), "{}: {}", String::from_utf8_lossy(body), fail.info);
        }
    }

    #[test]
    fn count_must_be_from_1_to_200() {
        for (count, ok) in [(0, false), (1, true), (200, true), (201, false)] {
            assert_eq!(check_count(request(Filter::Read, "", count)).is_ok(), ok, "{count}");
        }
    }

    #[test]
    fn pages_walk_the_list_and_the_last_one_has_no_cursor() {
        let first = page(&request(Filter::Read, "", 3), 7, 4).map_err(|f| f.info);
        assert_eq!(first, Ok(Page { members: 0..3, next: Some(3) }));
        let last = page(&request(Filter::Read, "6", 3), 7, 4).map_err(|f| f.info);
        assert_eq!(last, Ok(Page { members: 6..7, next: None }));
        let unread = page(&request(Filter::Unread, "", 200), 7, 4).map_err(|f| f.info);
        assert_eq!(unread, Ok(Page { members: 7..11, next: None }));
        let nobody = page(&request(Filter::Read, "", 5), 0, 4).map_err(|f| f.info);
        assert_eq!(nobody, Ok(Page { members: 0..0, next: None }));
    }

    #[test]
    fn a_cursor_survives_a_member_reading_between_pages() {
        // Unread members 7..11; one page of 2 taken; then member 7 reads.
        let second = page(&request(Filter::Unread, "9", 2), 8, 3).map_err(|f| f.info);
        assert_eq!(second, Ok(Page { members: 9..11, next: None }));
        // A cursor behind the list's start (members that have since read) moves up to it.
        let behind = page(&request(Filter::Unread, "7", 2), 9, 2).map_err(|f| f.info);
        assert_eq!(behind, Ok(Page { members: 9..11, next: None }));
        let forged = page(&request(Filter::Read, "x", 2), 9, 2).map(|_| ()).unwrap_err();
        assert_eq!(forged.code, ErrorCode::INVALID_PARAMETER);
    }

    #[test]
    fn the_answer_uses_tencents_field_names() {
        let r = request(Filter::Unread, "", 2);
        let body = answer_body(&r, &Page { members: 7..9, next: Some(9) }, FinishField::IsFinish);
        let value: Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(
            value,
            json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","GroupId":"g","MsgSeq":1,"IsFinish":0,
                   "Cursor":"9","UnreadList":[{"Unread_Account":"member-7"},{"Unread_Account":"member-8"}]})
        );
        let done = answer_body(&r, &Page { members: 9..9, next: None }, FinishField::IsFinished);
        let value: Value = serde_json::from_slice(&done).unwrap_or_default();
        assert_eq!((value["IsFinished"].as_u64(), value.get("IsFinish")), (Some(1), None));
        assert_eq!(value["Cursor"], "");
    }
}
