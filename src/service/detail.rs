//! The detail API (docs/design.md#detail-api): `get_group_msg_receipt_detail`, who has read one
//! message and who has not, paged by `Cursor`.
//!
//! One call answers one request, so there is nothing to batch; the rest is as for
//! receipts. Per app it has its **own budget** (its own governor or Redis GCRA key) and
//! its own queue and dispatcher ([`Engine`] with one token per call), so a flood of
//! receipt requests never refuses a detail request and the other way round. A request
//! passes, in this order:
//!
//! 1. the cache ([`Keyed`], judged by the receipt cache's lifetimes): answers are kept
//!    for `cache.ttl` (then `cache.stale` as a fallback) keyed by the whole request (app, GroupId, MsgSeq, Filter, Cursor, Count), and a
//!    fresh one acceptable to the caller's `Cache-Control` is a `HIT`;
//! 2. the in-flight table ([`Flights`]): an identical request already being fetched is joined
//!    (`MISS`, one call for all of them; with `no-cache`, only a fetch that started
//!    after the request arrived);
//! 3. admission: the caller's client's line of the detail queue, scaled by its fair
//!    share, must drain before the deadline, else 429 with `Retry-After` (or the stale
//!    answer);
//! 4. the fetch, in its own task: one token per attempt, retried like every upstream call
//!    ([`Attempts`]), Tencent's
//!    body stored and passed through unchanged (`IsFinish` or `IsFinished`, whichever it
//!    sent; answers about the group or the request are passed through as in 2.1).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus::Histogram;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::budget::Budget;
use crate::cache::{Freshness, Keyed, KeyedAnswer, XCache};
use crate::clients::ClientSlot;
use crate::engine::Engine;
use crate::engine::batch::Served;
use crate::engine::flights::{Flights, Lead, Place};
use crate::engine::queue::Billing;
use crate::error::GatewayError;
use crate::tencent::domain::GroupId;
use crate::upstream::retry::{Attempts, Next, Trouble};
use crate::upstream::{Passed, Upstream};

/// The most members one page may ask for (Tencent's limit).
pub const MAX_COUNT: u64 = 200;
/// The longest `Cursor` accepted (Tencent's are short opaque strings).
const MAX_CURSOR_BYTES: usize = 1024;
/// Answers kept, per app.
pub const MAX_ANSWERS: u64 = 100_000;

/// A validated detail request: the whole of it is the cache key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DetailRequest {
    pub group: GroupId,
    pub seq: u64,
    /// 0: read members; 1: unread members.
    pub filter: u8,
    pub cursor: String,
    pub count: u32,
}

impl DetailRequest {
    /// Parses and validates a body: 60003 for one that is not JSON, else 10004 naming
    /// the field (docs/design.md#errors).
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| GatewayError::NotJson(format!("body is not valid JSON: {e}")))?;
        Self::fields(value).map_err(GatewayError::BadRequest)
    }

    /// The request a JSON value holds; the error names the field.
    fn fields(value: Value) -> Result<Self, String> {
        let Value::Object(object) = value else { return Err("body must be a JSON object".into()) };
        let group = match object.get("GroupId") {
            None | Some(Value::Null) => return Err("GroupId is required".into()),
            Some(Value::String(s)) => GroupId::parse(s).map_err(|why| format!("GroupId {why}"))?,
            Some(_) => return Err("GroupId must be a string".into()),
        };
        let seq = object
            .get("MsgSeq")
            .ok_or("MsgSeq is required")?
            .as_u64()
            .ok_or("MsgSeq must be an integer from 0 to 18446744073709551615")?;
        let filter = match object.get("Filter") {
            None | Some(Value::Null) => 0,
            Some(v) => match v.as_u64() {
                Some(f @ (0 | 1)) => f as u8,
                _ => return Err("Filter must be 0 (read members) or 1 (unread members)".into()),
            },
        };
        let cursor = match object.get("Cursor") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) if s.len() <= MAX_CURSOR_BYTES => s.clone(),
            Some(Value::String(_)) => return Err(format!("Cursor is longer than {MAX_CURSOR_BYTES} bytes")),
            Some(_) => return Err("Cursor must be a string".into()),
        };
        let count = match object.get("Count") {
            None | Some(Value::Null) => return Err("Count is required".into()),
            Some(v) => match v.as_u64() {
                Some(n @ 1..=MAX_COUNT) => n as u32,
                _ => return Err(format!("Count must be an integer from 1 to {MAX_COUNT}")),
            },
        };
        Ok(Self { group, seq, filter, cursor, count })
    }

    /// The body Tencent expects for this request.
    pub fn to_body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(rename = "GroupId")]
            group: &'a str,
            #[serde(rename = "MsgSeq")]
            seq: u64,
            #[serde(rename = "Filter")]
            filter: u8,
            #[serde(rename = "Cursor")]
            cursor: &'a str,
            #[serde(rename = "Count")]
            count: u32,
        }
        let body = Body {
            group: self.group.as_str(),
            seq: self.seq,
            filter: self.filter,
            cursor: &self.cursor,
            count: self.count,
        };
        // Strings and integers only: serialisation cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// What a caller asks of one detail request beyond its body.
#[derive(Clone, Copy, Debug)]
pub struct DetailQuery {
    pub freshness: Freshness,
    pub arrived: Instant,
    pub deadline: Instant,
    pub client: ClientSlot,
}

/// Tencent's answer to pass through, with cache headers.
#[derive(Debug)]
pub struct DetailAnswer {
    pub body: Bytes,
    pub x_cache: XCache,
    pub age: u64,
}

/// How a fetch ended, for everyone waiting on it.
#[derive(Clone, Debug)]
enum Fetched {
    Answer(Arc<KeyedAnswer>),
    Failed(GatewayError),
}

/// The detail API of one app. Shared (`Arc`) by its requests and their fetch tasks.
pub struct Detail {
    upstream: Upstream,
    pub engine: Arc<Engine>,
    pub budget: Arc<Budget>,
    /// `receipt_gateway_budget_wait_seconds` for this app's detail API.
    pub budget_wait: Histogram,
    /// Answers by the whole request, judged by the cache's lifetimes.
    answers: Keyed<DetailRequest>,
    flights: Flights<DetailRequest, Fetched>,
    max_retries: u32,
}

impl Detail {
    pub fn new(
        upstream: Upstream,
        engine: Engine,
        budget: Budget,
        budget_wait: Histogram,
        answers: Keyed<DetailRequest>,
        max_retries: u32,
    ) -> Self {
        Self {
            upstream,
            engine: Arc::new(engine),
            budget: Arc::new(budget),
            budget_wait,
            answers,
            flights: Flights::default(),
            max_retries,
        }
    }

    /// Answers one request (see the module docs for the order).
    pub async fn answer(
        self: &Arc<Self>,
        req: DetailRequest,
        q: DetailQuery,
        request_id: &str,
    ) -> Result<DetailAnswer, GatewayError> {
        let now = Instant::now();
        let found = self.answers.get(&req, q.freshness, now).await;
        if let Some(answer) = found.acceptable {
            let age = now.saturating_duration_since(answer.fetched_at).as_secs();
            return Ok(DetailAnswer { body: answer.body.clone(), x_cache: XCache::Hit, age });
        }
        let since = (q.freshness == Freshness::NoCache).then_some(q.arrived);
        let admit = || {
            self.engine
                .admit_permit(q.deadline, q.client, self.budget.estimate())
                .map_err(|o| GatewayError::Overloaded { retry_after: o.retry_after })
        };
        let mut outcome = match self.flights.join_or_start(&req, since, request_id, admit) {
            Ok(Place::Joined(outcome)) => outcome,
            Ok(Place::Lead { outcome, lead, with: permit }) => {
                tokio::spawn(self.clone().fetch(req, permit, q, lead));
                outcome
            }
            Err(e) => return serve_stale(found.stale, e),
        };
        let waited = tokio::time::timeout_at(q.deadline, outcome.wait_for(Option::is_some)).await;
        // Nothing when the deadline came first (or the fetch task ended without a word).
        let fetched = match waited {
            Ok(Ok(fetched)) => fetched.clone(),
            Ok(Err(_)) | Err(_) => None,
        };
        match fetched {
            Some(Fetched::Answer(answer)) => {
                Ok(DetailAnswer { body: answer.body.clone(), x_cache: XCache::Miss, age: 0 })
            }
            Some(Fetched::Failed(e)) => serve_stale(found.stale, e),
            None => serve_stale(found.stale, GatewayError::DeadlineExceeded),
        }
    }

    /// Fetches `req` for everyone waiting, stores the answer, and lands the flight.
    async fn fetch(
        self: Arc<Self>,
        req: DetailRequest,
        permit: oneshot::Receiver<()>,
        q: DetailQuery,
        lead: Lead<DetailRequest, Fetched>,
    ) {
        let fetched = self.attempts(&req, permit, q, &lead.served).await;
        if let Fetched::Answer(answer) = &fetched {
            self.answers.insert(req, answer.clone()).await;
        }
        self.flights.land(lead, fetched);
    }

    /// One token per attempt; retried as every upstream call is ([`Attempts`]).
    async fn attempts(
        &self,
        req: &DetailRequest,
        mut permit: oneshot::Receiver<()>,
        q: DetailQuery,
        served: &Served,
    ) -> Fetched {
        let body = req.to_body();
        let mut attempts = Attempts::new(self.max_retries);
        loop {
            // A token that cannot come while an answer could still reach the caller is
            // no use: give the place up (the dispatcher drops it unpaid).
            let latest = q.deadline.checked_sub(self.engine.estimates().reach()).unwrap_or(q.deadline);
            if !matches!(tokio::time::timeout_at(latest, &mut permit).await, Ok(Ok(()))) {
                let retry_after = self.engine.backlog(self.budget.estimate());
                return Fetched::Failed(GatewayError::Overloaded { retry_after });
            }
            let stamp = self.budget.before_send().await;
            let sent = Instant::now();
            let outcome = match self.upstream.get_detail(body.clone(), served, stamp, attempts.retry_on()).await {
                Passed::Answer(body) => {
                    self.engine.estimates().observe_latency(sent.elapsed());
                    return Fetched::Answer(Arc::new(KeyedAnswer { body, fetched_at: Instant::now() }));
                }
                Passed::Failed(outcome) => outcome,
            };
            let failure = match attempts.judge(outcome, self.upstream.signer(), &self.budget) {
                Ok(Next::RetryNow) => {
                    permit = self.engine.permit(q.deadline, q.client, Billing::Now);
                    continue;
                }
                Ok(Next::RetryLater(Trouble::Throttled)) => {
                    GatewayError::Overloaded { retry_after: Duration::from_secs(1) }
                }
                Ok(Next::RetryLater(Trouble::Unavailable(reason))) => {
                    GatewayError::Upstream(format!("upstream failing: {reason}"))
                }
                Ok(Next::Fail(reason)) => return Fetched::Failed(GatewayError::Upstream(reason)),
                // `get_detail` passes answers through: these never come from it.
                Err(_) => return Fetched::Failed(GatewayError::Upstream("unexpected answer".into())),
            };
            if !attempts.back_off(q.deadline, self.budget.interval()).await {
                return Fetched::Failed(failure);
            }
            permit = self.engine.permit(q.deadline, q.client, Billing::Now);
        }
    }
}

/// The stale answer if there is one, else the error.
fn serve_stale(stale: Option<Arc<KeyedAnswer>>, e: GatewayError) -> Result<DetailAnswer, GatewayError> {
    match stale {
        Some(answer) => {
            let age = answer.fetched_at.elapsed().as_secs();
            Ok(DetailAnswer { body: answer.body.clone(), x_cache: XCache::Stale, age })
        }
        None => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_body_is_the_whole_key_and_round_trips() {
        let r =
            DetailRequest::parse(br#"{"GroupId":"g","MsgSeq":7,"Filter":1,"Cursor":"c2","Count":100,"X":1}"#).unwrap();
        assert_eq!(
            r,
            DetailRequest { group: GroupId::parse("g").unwrap(), seq: 7, filter: 1, cursor: "c2".into(), count: 100 }
        );
        assert_eq!(DetailRequest::parse(&r.to_body()).unwrap(), r);
        let first = DetailRequest::parse(br#"{"GroupId":"g","MsgSeq":7,"Count":1}"#).unwrap();
        assert_eq!((first.filter, first.cursor.as_str()), (0, ""));
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases = [
            ("nope", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"MsgSeq":1,"Count":1}"#, "GroupId is required"),
            (r#"{"GroupId":"","MsgSeq":1,"Count":1}"#, "GroupId"),
            (r#"{"GroupId":"g","Count":1}"#, "MsgSeq is required"),
            (r#"{"GroupId":"g","MsgSeq":-1,"Count":1}"#, "MsgSeq must be"),
            (r#"{"GroupId":"g","MsgSeq":1,"Filter":2,"Count":1}"#, "Filter"),
            (r#"{"GroupId":"g","MsgSeq":1,"Cursor":5,"Count":1}"#, "Cursor"),
            (r#"{"GroupId":"g","MsgSeq":1}"#, "Count is required"),
            (r#"{"GroupId":"g","MsgSeq":1,"Count":0}"#, "Count must be"),
            (r#"{"GroupId":"g","MsgSeq":1,"Count":201}"#, "Count must be"),
        ];
        for (body, expected) in cases {
            let err = DetailRequest::parse(body.as_bytes()).unwrap_err();
            let code = if expected == "not valid JSON" { 60003 } else { 10004 };
            assert_eq!(err.code().0, code, "{body}: {err}");
            assert!(err.to_string().contains(expected), "{body}: {err}");
        }
    }
}
