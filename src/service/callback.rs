//! Tencent's webhooks (docs/design.md#callbacks): `POST /callback`.
//!
//! Tencent pushes every read of a group message as a `Group.CallbackAfterReadReceipt`
//! with the new counts. Taken here, they keep the cache current without spending budget:
//! each item becomes fresh for `cache.callback_ttl` ([`KeptBy::Callbacks`]), in this
//! replica's cache and, with the fleet tier, in Redis and every other replica's cache.
//! A callback never waits for the budget and never calls upstream.
//!
//! A callback passes, in this order: app (`SdkAppid`) → `Sign` and `RequestTime` (when
//! the app has `callback_token_env`) → body (size-capped) → the command:
//! - `Group.CallbackAfterReadReceipt`: the counts go into the cache, unless the cache
//!   holds a newer answer for the item (`EventTime` against the answer's time);
//! - `Alert.RequestOverLimit` for an API the gateway fronts: that API's effective rate
//!   is lowered, as a throttling answer lowers it (alerts about other APIs are none of
//!   the gateway's business);
//! - anything else: acknowledged.
//!
//! With `callback_forward_url` (the *tee*), the callback, once its `Sign` is checked, is
//! also forwarded unchanged to the company's own handler, whose answer is relayed to
//! Tencent; the receipts are cached either way. Without it the gateway answers Tencent's
//! `OK` itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::time::Instant;

use crate::cache::{KeptBy, Known};
use crate::config::Forward;
use crate::error::GatewayError;
use crate::service::app::AppRuntime;
use crate::service::{AppParam, Gateway};
use crate::telemetry::metrics::{API_DETAIL, API_RECEIPT};
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, GroupId, MsgSeq, Receipt};
use crate::tencent::webhook::{self, AFTER_READ_RECEIPT, REQUEST_OVER_LIMIT};
use crate::tencent::wire::ReceiptResponse;

pub use crate::tencent::webhook::CALLBACK_PATH;

/// How far a callback's `RequestTime` may be from now (seconds).
pub const MAX_CLOCK_SKEW_S: u64 = 60;

/// The most of a forwarded handler's answer relayed to Tencent.
const MAX_RELAYED_BYTES: usize = 64 * 1024;

/// What the request log line and `receipt_gateway_callbacks_total` say of a callback.
#[derive(Debug, Default)]
pub struct Taken {
    pub app: Option<AppId>,
    /// The command's label: a known command, else `other`.
    pub command: &'static str,
    pub group: Option<String>,
    pub items: usize,
}

/// How a callback ended, for `receipt_gateway_callbacks_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallbackResult {
    Ok,
    BadSign,
    BadBody,
    ForwardError,
}

impl CallbackResult {
    fn label(self) -> &'static str {
        match self {
            CallbackResult::Ok => "ok",
            CallbackResult::BadSign => "bad_sign",
            CallbackResult::BadBody => "bad_body",
            CallbackResult::ForwardError => "forward_error",
        }
    }
}

/// The callback's query parameters the gateway reads.
#[derive(Debug, Default)]
struct Params<'a> {
    app: Option<&'a str>,
    command: Option<&'a str>,
    sign: Option<&'a str>,
    request_time: Option<&'a str>,
}

impl<'a> Params<'a> {
    fn parse(query: &'a str) -> Self {
        let mut params = Self::default();
        for (name, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
            match name {
                "SdkAppid" => params.app = Some(value),
                "CallbackCommand" => params.command = Some(value),
                "Sign" => params.sign = Some(value),
                "RequestTime" => params.request_time = Some(value),
                _ => {}
            }
        }
        params
    }
}

/// Answers one callback; `deadline` bounds reading the body.
pub async fn handle(
    head: &http::request::Parts,
    body: Incoming,
    gw: &Gateway,
    deadline: Instant,
    taken: &mut Taken,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    if head.method != Method::POST {
        return Err(GatewayError::MethodNotAllowed);
    }
    let query = head.uri.query().unwrap_or("").to_owned();
    let params = Params::parse(&query);
    taken.command = command_label(params.command);
    let app = gw.app(params.app, AppParam::Callback)?;
    taken.app = Some(app.id);
    let counted = |outcome: CallbackResult| {
        gw.metrics
            .callbacks
            .with_label_values(&[app.receipts.metrics.app_label.as_str(), taken.command, outcome.label()])
            .inc();
    };
    if let Some(token) = &app.callbacks.token
        && let Err(e) = verify(token.expose().as_bytes(), &params, unix_now())
    {
        counted(CallbackResult::BadSign);
        return Err(e);
    }
    let content_type = head.headers.get(header::CONTENT_TYPE).cloned();
    let body = crate::http::read_body(&head.headers, body, gw.config.max_body_bytes, deadline).await?;
    let applied = apply(app, params.command, &body, taken).await;
    if let Some(forward) = &app.callbacks.forward {
        let relayed = forward_to(app, forward, &query, content_type, body).await;
        counted(match (&relayed, &applied) {
            (Err(_), _) => CallbackResult::ForwardError,
            (Ok(_), Err(_)) => CallbackResult::BadBody,
            (Ok(_), Ok(())) => CallbackResult::Ok,
        });
        return relayed;
    }
    match applied {
        Ok(()) => {
            counted(CallbackResult::Ok);
            Ok(crate::http::json(StatusCode::OK, ReceiptResponse::ok_empty().to_bytes()))
        }
        Err(e) => {
            counted(CallbackResult::BadBody);
            Err(e)
        }
    }
}

/// A known command's label, else `other` (labels stay bounded).
fn command_label(command: Option<&str>) -> &'static str {
    match command {
        Some(AFTER_READ_RECEIPT) => AFTER_READ_RECEIPT,
        Some(REQUEST_OVER_LIMIT) => REQUEST_OVER_LIMIT,
        _ => "other",
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks `Sign` against the token and `RequestTime` against the clock (`now`, Unix s).
fn verify(token: &[u8], params: &Params<'_>, now: u64) -> Result<(), GatewayError> {
    let refused = |why: &str| GatewayError::Unauthorized(format!("callback refused: {why}"));
    let time = params.request_time.ok_or_else(|| refused("RequestTime is required"))?;
    let at = time.parse::<u64>().map_err(|_| refused("RequestTime must be Unix seconds"))?;
    if at.abs_diff(now) > MAX_CLOCK_SKEW_S {
        return Err(refused("RequestTime is more than 60 s from now"));
    }
    let sign = params.sign.ok_or_else(|| refused("Sign is required"))?;
    if !webhook::verify(token, time, sign) {
        return Err(refused("Sign does not match"));
    }
    Ok(())
}

/// Carries out the command; an error is a malformed body (nothing changed).
async fn apply(app: &AppRuntime, command: Option<&str>, body: &[u8], taken: &mut Taken) -> Result<(), GatewayError> {
    match command {
        Some(AFTER_READ_RECEIPT) => {
            let (group, answers) = read_receipts(body, SystemTime::now(), Instant::now())?;
            taken.group = Some(group.to_string());
            taken.items = answers.len();
            if answers.is_empty() {
                return Ok(());
            }
            app.receipts.cache.insert_each(app.id, &group, answers.iter().copied()).await;
            if let Some(tier) = &app.receipts.fleet
                && let Err(e) = tier.fleet.callback(app.id, &group, &answers, tier.lifetimes()).await
            {
                tracing::debug!(error = %e, "fleet: callback items not shared");
            }
            Ok(())
        }
        Some(REQUEST_OVER_LIMIT) => {
            let alert: Alert = serde_json::from_slice(body)
                .map_err(|e| GatewayError::BadRequest(format!("callback body is not valid: {e}")))?;
            let budget = match alert.command.as_str() {
                API_RECEIPT => &app.receipts.budget,
                API_DETAIL => &app.detail.budget,
                _ => return Ok(()),
            };
            tracing::warn!(api = %alert.command, request = alert.request, limit = alert.limit, "Tencent warns: calls near the limit");
            budget.throttled();
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `Alert.RequestOverLimit`: which API is near its limit.
#[derive(Deserialize)]
struct Alert {
    #[serde(rename = "Command", default)]
    command: String,
    #[serde(rename = "Request", default)]
    request: u64,
    #[serde(rename = "Limit", default)]
    limit: u64,
}

#[derive(Deserialize)]
struct ReadReceipts {
    #[serde(rename = "GroupId")]
    group: String,
    #[serde(rename = "GroupMsgReceiptList")]
    list: Vec<ReadReceipt>,
    #[serde(rename = "EventTime", default)]
    event_time: Option<EventTime>,
}

#[derive(Deserialize)]
struct ReadReceipt {
    #[serde(rename = "MsgSeq")]
    seq: u64,
    #[serde(rename = "ReadNum")]
    read: u64,
    #[serde(rename = "UnreadNum")]
    unread: u64,
}

/// Tencent sends `EventTime` (ms) as a number or as a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum EventTime {
    Number(u64),
    Text(String),
}

/// Reads a `Group.CallbackAfterReadReceipt` body into the group and its items, each
/// known as of the event (`wall` and `now` are the same moment on the two clocks; an
/// event in the future counts as now). Items older than the process are dropped.
fn read_receipts(body: &[u8], wall: SystemTime, now: Instant) -> Result<(GroupId, Vec<Known>), GatewayError> {
    let bad = |why: String| GatewayError::BadRequest(format!("callback body is not valid: {why}"));
    // Objects only: serde's derived structs would also take arrays of their fields.
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let objects = value.as_object().is_some_and(|o| {
        o.get("GroupMsgReceiptList").and_then(|l| l.as_array()).is_none_or(|l| l.iter().all(|i| i.is_object()))
    });
    if !objects {
        return Err(bad("the body and each GroupMsgReceiptList entry must be JSON objects".into()));
    }
    let parsed: ReadReceipts = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let group = GroupId::parse(&parsed.group).map_err(|why| bad(format!("GroupId {why}")))?;
    let event_ms = match parsed.event_time {
        None => None,
        Some(EventTime::Number(ms)) => Some(ms),
        Some(EventTime::Text(text)) => {
            Some(text.trim().parse::<u64>().map_err(|_| bad("EventTime must be milliseconds".into()))?)
        }
    };
    let wall_ms = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let age = Duration::from_millis(event_ms.map_or(0, |ms| wall_ms.saturating_sub(ms)));
    let Some(at) = now.checked_sub(age) else {
        return Ok((group, Vec::new()));
    };
    let answers = parsed
        .list
        .iter()
        .map(|r| Known {
            seq: MsgSeq(r.seq),
            receipt: Receipt { code: ErrorCode::OK, read: Some(r.read), unread: Some(r.unread) },
            fetched_at: at,
            kept_by: KeptBy::Callbacks,
        })
        .collect();
    Ok((group, answers))
}

/// Parses a `Group.CallbackAfterReadReceipt` body as `/callback` does; the item count
/// (for fuzzing and tests).
pub fn parse_read_receipts(body: &[u8]) -> Result<usize, GatewayError> {
    read_receipts(body, SystemTime::now(), Instant::now()).map(|(_, answers)| answers.len())
}

/// Forwards the callback unchanged to the company's handler and relays its answer; a
/// handler that does not answer in time, or cannot be reached, is 502.
async fn forward_to(
    app: &AppRuntime,
    forward: &Forward,
    query: &str,
    content_type: Option<HeaderValue>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    let unreachable = |why: String| GatewayError::Upstream(format!("the callback handler {why}"));
    let url = forward_url(&forward.url, query);
    let mut request = Request::builder().method(Method::POST).uri(url);
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request.body(Full::new(body)).map_err(|e| unreachable(format!("URL is not usable: {e}")))?;
    let exchange = async {
        let response =
            app.fetcher.upstream.client().request(request).await.map_err(|e| unreachable(format!("failed: {e}")))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RELAYED_BYTES)
            .collect()
            .await
            .map_err(|e| unreachable(format!("answer could not be read: {e}")))?
            .to_bytes();
        Ok::<_, GatewayError>((parts, body))
    };
    let (parts, body) = tokio::time::timeout(forward.timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("did not answer within {} ms", forward.timeout.as_millis())))??;
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = parts.status;
    if let Some(content_type) = parts.headers.get(header::CONTENT_TYPE) {
        response.headers_mut().insert(header::CONTENT_TYPE, content_type.clone());
    }
    Ok(response)
}

/// The handler's URL with the callback's query appended.
fn forward_url(base: &http::Uri, query: &str) -> String {
    let base = base.to_string();
    match (query.is_empty(), base.contains('?')) {
        (true, _) => base,
        (false, true) => format!("{base}&{query}"),
        (false, false) => format!("{base}?{query}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params<'a>(sign: Option<&'a str>, time: Option<&'a str>) -> Params<'a> {
        Params { app: Some("1"), command: Some(AFTER_READ_RECEIPT), sign, request_time: time }
    }

    #[test]
    fn sign_and_request_time_are_checked() {
        let good = "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061";
        let now = 1_669_872_112;
        assert!(verify(b"xxxxyyyy", &params(Some(good), Some("1669872112")), now).is_ok());
        assert!(verify(b"xxxxyyyy", &params(Some(&good.to_uppercase()), Some("1669872112")), now + 60).is_ok());
        let refused = [
            (params(Some(good), Some("1669872112")), now + 61, "more than 60 s"),
            (params(Some(good), Some("1669872112")), now - 61, "more than 60 s"),
            (params(Some(good), None), now, "RequestTime is required"),
            (params(None, Some("1669872112")), now, "Sign is required"),
            (params(Some(&good[1..]), Some("1669872112")), now, "does not match"),
            (params(Some(good), Some("1669872113")), now, "does not match"),
            (params(Some(good), Some("soon")), now, "Unix seconds"),
        ];
        for (p, at, why) in refused {
            let e = verify(b"xxxxyyyy", &p, at).unwrap_err();
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
            assert!(e.to_string().contains(why), "{e}");
        }
        assert!(verify(b"other", &params(Some(good), Some("1669872112")), now).is_err());
    }

    #[test]
    fn read_receipts_take_event_time_as_a_number_or_a_string() {
        let wall = UNIX_EPOCH + Duration::from_millis(1_700_000_010_000);
        let now = Instant::now() + Duration::from_secs(3600);
        for event in ["1700000000000", "\"1700000000000\""] {
            let body = format!(
                r#"{{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"g","EventTime":{event},
                "GroupMsgReceiptList":[{{"MsgSeq":7,"ReadNum":3,"UnreadNum":4,"ReadReceiptMembers":["a"]}}]}}"#
            );
            let (group, answers) = read_receipts(body.as_bytes(), wall, now).unwrap();
            assert_eq!(group.as_str(), "g");
            assert_eq!(answers.len(), 1);
            assert_eq!(answers[0].seq, MsgSeq(7));
            assert_eq!(answers[0].receipt, Receipt { code: ErrorCode::OK, read: Some(3), unread: Some(4) });
            assert_eq!(answers[0].fetched_at, now - Duration::from_secs(10), "as of the event");
        }
        let future = br#"{"GroupId":"g","EventTime":1800000000000,"GroupMsgReceiptList":[{"MsgSeq":1,"ReadNum":1,"UnreadNum":0}]}"#;
        assert_eq!(read_receipts(future, wall, now).unwrap().1[0].fetched_at, now, "a future event counts as now");
    }

    #[test]
    fn malformed_read_receipts_are_refused_naming_why() {
        let wall = SystemTime::now();
        let cases = [
            ("nope", "not valid"),
            (r#"{"GroupMsgReceiptList":[]}"#, "GroupId"),
            (r#"{"GroupId":"","GroupMsgReceiptList":[]}"#, "GroupId"),
            (r#"{"GroupId":"g"}"#, "GroupMsgReceiptList"),
            (r#"{"GroupId":"g","GroupMsgReceiptList":[{"MsgSeq":1,"ReadNum":-1,"UnreadNum":0}]}"#, "expected u64"),
            (r#"{"GroupId":"g","EventTime":"later","GroupMsgReceiptList":[]}"#, "EventTime"),
            // Found by the fuzzer: arrays in the shape of the structs.
            (r#"["G",[]]"#, "JSON objects"),
            (r#"{"GroupId":"g","GroupMsgReceiptList":[[7,3,4]]}"#, "JSON objects"),
        ];
        for (body, why) in cases {
            let e = read_receipts(body.as_bytes(), wall, Instant::now()).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert!(e.to_string().contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn the_callback_query_is_appended_to_the_handler_url() {
        let base: http::Uri = "http://h:8080/tencent".parse().unwrap();
        assert_eq!(forward_url(&base, "SdkAppid=1"), "http://h:8080/tencent?SdkAppid=1");
        let with: http::Uri = "http://h/cb?x=1".parse().unwrap();
        assert_eq!(forward_url(&with, "SdkAppid=1"), "http://h/cb?x=1&SdkAppid=1");
        assert_eq!(forward_url(&base, ""), "http://h:8080/tencent");
    }

    #[test]
    fn commands_are_bounded_labels() {
        assert_eq!(command_label(Some(AFTER_READ_RECEIPT)), AFTER_READ_RECEIPT);
        assert_eq!(command_label(Some("Group.CallbackAfterSendMsg")), "other");
        assert_eq!(command_label(None), "other");
    }
}
