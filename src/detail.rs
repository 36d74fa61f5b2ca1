//! The detail API (SPEC 2.2): `get_group_msg_receipt_detail`, who has read one message
//! and who has not, paged by `Cursor`.
//!
//! One call answers one request, so there is nothing to batch; the rest is as for
//! receipts. Per app it has its **own budget** (its own governor or Redis GCRA key) and
//! its own queue and dispatcher ([`Engine`] with one token per call), so a flood of
//! receipt requests never refuses a detail request and the other way round. A request
//! passes, in this order:
//!
//! 1. the cache: answers are kept for `cache.ttl` (then `cache.stale` as a fallback)
//!    keyed by the whole request (app, GroupId, MsgSeq, Filter, Cursor, Count), and a
//!    fresh one acceptable to the caller's `Cache-Control` is a `HIT`;
//! 2. the in-flight table: an identical request already being fetched is joined
//!    (`MISS`, one call for all of them; with `no-cache`, only a fetch that started
//!    after the request arrived);
//! 3. admission: the caller's client's line of the detail queue, scaled by its fair
//!    share, must drain before the deadline, else 429 with `Retry-After` (or the stale
//!    answer);
//! 4. the fetch, in its own task: one token per attempt, retries per SPEC 5.4, Tencent's
//!    body stored and passed through unchanged (`IsFinish` or `IsFinished`, whichever it
//!    sent; answers about the group or the request are passed through as in 2.1).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;
use prometheus::Histogram;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::batch::{Served, note};
use crate::budget::Budget;
use crate::clients::ClientSlot;
use crate::config::CacheConfig;
use crate::domain::GroupId;
use crate::engine::Engine;
use crate::error::GatewayError;
use crate::fetch;
use crate::receipts::{Freshness, XCache};
use crate::upstream::{Outcome, Passed, Upstream};

/// The most members one page may ask for (Tencent's limit).
pub const MAX_COUNT: u64 = 200;
/// The longest `Cursor` accepted (Tencent's are short opaque strings).
const MAX_CURSOR_BYTES: usize = 1024;
/// Answers kept, per app.
const MAX_ANSWERS: u64 = 100_000;

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
    /// Parses and validates a body; the error names the field.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
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

/// One stored answer.
#[derive(Debug)]
struct Stored {
    body: Bytes,
    fetched_at: Instant,
}

/// How a fetch ended, for everyone waiting on it.
#[derive(Clone, Debug)]
enum Fetched {
    Answer(Arc<Stored>),
    Failed(GatewayError),
}

/// An identical request being fetched: when it started, and where its outcome appears.
struct InFlight {
    started: Instant,
    outcome: watch::Receiver<Option<Fetched>>,
    /// The request ids it serves, for the call's log line.
    served: Served,
}

/// The lifetimes, in atomics (µs) so that a reload can change them.
#[derive(Debug, Default)]
struct Lifetimes {
    ttl_us: AtomicU64,
    stale_us: AtomicU64,
}

impl Lifetimes {
    fn set(&self, config: &CacheConfig) {
        let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.ttl_us.store(us(config.ttl), Ordering::Relaxed);
        self.stale_us.store(us(config.stale), Ordering::Relaxed);
    }

    fn ttl(&self) -> Duration {
        Duration::from_micros(self.ttl_us.load(Ordering::Relaxed))
    }

    fn stale(&self) -> Duration {
        Duration::from_micros(self.stale_us.load(Ordering::Relaxed))
    }
}

/// Keeps an answer until its stale window ends, by the lifetimes at its write.
struct KeepFor(Arc<Lifetimes>);

impl moka::Expiry<DetailRequest, Arc<Stored>> for KeepFor {
    fn expire_after_create(&self, _: &DetailRequest, _: &Arc<Stored>, _: std::time::Instant) -> Option<Duration> {
        Some(self.0.ttl() + self.0.stale())
    }
}

/// The detail API of one app. Shared (`Arc`) by its requests and their fetch tasks.
pub struct Detail {
    upstream: Upstream,
    pub engine: Arc<Engine>,
    pub budget: Arc<Budget>,
    /// `receipt_gateway_budget_wait_seconds` for this app's detail API.
    pub budget_wait: Histogram,
    answers: Cache<DetailRequest, Arc<Stored>>,
    inflight: Mutex<HashMap<DetailRequest, InFlight>>,
    lifetimes: Arc<Lifetimes>,
    max_retries: u32,
}

impl Detail {
    pub fn new(
        upstream: Upstream,
        engine: Engine,
        budget: Budget,
        budget_wait: Histogram,
        cache: &CacheConfig,
        max_retries: u32,
    ) -> Self {
        let lifetimes = Arc::new(Lifetimes::default());
        lifetimes.set(cache);
        let answers = Cache::builder().max_capacity(MAX_ANSWERS).expire_after(KeepFor(lifetimes.clone())).build();
        Self {
            upstream,
            engine: Arc::new(engine),
            budget: Arc::new(budget),
            budget_wait,
            answers,
            inflight: Mutex::default(),
            lifetimes,
            max_retries,
        }
    }

    /// Reloaded lifetimes (SPEC 6.1), for answers read from now on.
    pub fn set_lifetimes(&self, cache: &CacheConfig) {
        self.lifetimes.set(cache);
    }

    /// Answers one request (see the module docs for the order).
    pub async fn answer(
        self: &Arc<Self>,
        req: DetailRequest,
        q: DetailQuery,
        request_id: &str,
    ) -> Result<DetailAnswer, GatewayError> {
        let now = Instant::now();
        let cached = self.answers.get(&req).await;
        if let Some(stored) = &cached
            && self.acceptable(stored, q.freshness, now)
        {
            let age = now.saturating_duration_since(stored.fetched_at).as_secs();
            return Ok(DetailAnswer { body: stored.body.clone(), x_cache: XCache::Hit, age });
        }
        let stale = cached.filter(|s| now < s.fetched_at + self.lifetimes.ttl() + self.lifetimes.stale());
        let mut outcome = match self.join_or_fetch(&req, q, request_id) {
            Ok(outcome) => outcome,
            Err(e) => return serve_stale(stale, e),
        };
        let waited = tokio::time::timeout_at(q.deadline, outcome.wait_for(Option::is_some)).await;
        // Nothing when the deadline came first (or the fetch task ended without a word).
        let fetched = match waited {
            Ok(Ok(fetched)) => fetched.clone(),
            Ok(Err(_)) | Err(_) => None,
        };
        match fetched {
            Some(Fetched::Answer(stored)) => {
                Ok(DetailAnswer { body: stored.body.clone(), x_cache: XCache::Miss, age: 0 })
            }
            Some(Fetched::Failed(e)) => serve_stale(stale, e),
            None => serve_stale(stale, GatewayError::DeadlineExceeded),
        }
    }

    fn acceptable(&self, stored: &Stored, freshness: Freshness, now: Instant) -> bool {
        let age = now.saturating_duration_since(stored.fetched_at);
        match freshness {
            Freshness::Default => age < self.lifetimes.ttl(),
            Freshness::NoCache => false,
            Freshness::MaxAge(max) => age <= max,
        }
    }

    /// Joins the identical request in flight, or admits this one and starts its fetch.
    fn join_or_fetch(
        self: &Arc<Self>,
        req: &DetailRequest,
        q: DetailQuery,
        request_id: &str,
    ) -> Result<watch::Receiver<Option<Fetched>>, GatewayError> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = inflight.get(req)
            && (q.freshness != Freshness::NoCache || running.started >= q.arrived)
        {
            note(&running.served, request_id);
            return Ok(running.outcome.clone());
        }
        let permit = self
            .engine
            .admit_permit(q.deadline, q.client, self.budget.estimate())
            .map_err(|o| GatewayError::Overloaded { retry_after: o.retry_after })?;
        let (tx, rx) = watch::channel(None);
        let started = Instant::now();
        let served = Served::default();
        note(&served, request_id);
        inflight.insert(req.clone(), InFlight { started, outcome: rx.clone(), served: served.clone() });
        drop(inflight);
        tokio::spawn(self.clone().fetch(req.clone(), permit, q, tx, served));
        Ok(rx)
    }

    /// Fetches `req` for everyone waiting, stores the answer, and tells them.
    async fn fetch(
        self: Arc<Self>,
        req: DetailRequest,
        permit: oneshot::Receiver<()>,
        q: DetailQuery,
        tx: watch::Sender<Option<Fetched>>,
        served: Served,
    ) {
        let fetched = self.attempts(&req, permit, q, &served).await;
        if let Fetched::Answer(stored) = &fetched {
            self.answers.insert(req.clone(), stored.clone()).await;
        }
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            // A no-cache request may have replaced this entry with its own fetch.
            if inflight.get(&req).is_some_and(|f| f.outcome.same_channel(&tx.subscribe())) {
                inflight.remove(&req);
            }
        }
        tx.send_replace(Some(fetched));
    }

    /// One token per attempt; retries per SPEC 5.4, each within the deadline.
    async fn attempts(
        &self,
        req: &DetailRequest,
        mut permit: oneshot::Receiver<()>,
        q: DetailQuery,
        served: &Served,
    ) -> Fetched {
        let body = req.to_body();
        let mut retries = 0;
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
            let failure = match self.upstream.get_detail(body.clone(), served, stamp).await {
                Passed::Answer(body) => {
                    self.engine.estimates().observe_latency(sent.elapsed());
                    return Fetched::Answer(Arc::new(Stored { body, fetched_at: Instant::now() }));
                }
                Passed::Failed(outcome) => match outcome {
                    Outcome::Throttled { .. } => {
                        self.budget.throttled();
                        GatewayError::Overloaded { retry_after: Duration::from_secs(1) }
                    }
                    Outcome::Retryable { reason } | Outcome::NoAnswer { reason } => {
                        GatewayError::Upstream(format!("upstream failing: {reason}"))
                    }
                    Outcome::UserSigExpired if self.upstream.signer().renew_after_expiry() => {
                        GatewayError::Upstream("upstream rejected the UserSig as expired".into())
                    }
                    Outcome::UserSigExpired => {
                        return Fetched::Failed(GatewayError::Upstream(
                            "upstream rejected the UserSig as expired; signing is locked (70050)".into(),
                        ));
                    }
                    Outcome::SigningLocked => {
                        self.upstream.signer().lock_out();
                        return Fetched::Failed(GatewayError::Upstream(
                            "upstream locked signing after repeated failures (70050)".into(),
                        ));
                    }
                    Outcome::Final { code, info } => {
                        return Fetched::Failed(GatewayError::Upstream(format!(
                            "upstream refused the call (ErrorCode {code}): {info}"
                        )));
                    }
                    Outcome::Items(_) | Outcome::Group { .. } | Outcome::InvalidParameter { .. } => {
                        return Fetched::Failed(GatewayError::Upstream("unexpected answer".into()));
                    }
                },
            };
            let backoff = fetch::backoff(retries);
            if retries >= self.max_retries || Instant::now() + backoff + self.budget.interval() >= q.deadline {
                return Fetched::Failed(failure);
            }
            retries += 1;
            tokio::time::sleep(backoff).await;
            permit = self.engine.permit(q.deadline, q.client);
        }
    }
}

/// The stale answer if there is one, else the error.
fn serve_stale(stale: Option<Arc<Stored>>, e: GatewayError) -> Result<DetailAnswer, GatewayError> {
    match stale {
        Some(stored) => {
            let age = stored.fetched_at.elapsed().as_secs();
            Ok(DetailAnswer { body: stored.body.clone(), x_cache: XCache::Stale, age })
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
            assert!(err.contains(expected), "{body}: {err}");
        }
    }
}
