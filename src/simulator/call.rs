//! One call, phase by phase (phases 2 to 8 of the list in the module docs): what it is
//! answered and what the ledger records of it, for both APIs.
//!
//! The work is split around the one lock: [`Simulator::check`] does everything that
//! needs only the request and the fixed options (the UserSig above all) before the lock
//! is taken; [`Simulator::decide`] then plays a queued fault, the rate limit, the group and
//! MsgSeq rules and the answer under one short critical section, and records the call in
//! the same section, so the ledger and the rate windows always agree.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::StatusCode;
use tokio::time::Instant;

use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, MsgSeq};
use crate::tencent::wire::{ReceiptItem, ReceiptRequest, ReceiptResponse};

use super::detail::{self, DetailRequest};
use super::ledger::State;
use super::rules::{self, Fail, QueryParams};
use super::{CallRecord, Fault, NO_ERROR_CODE, SimApi, Simulator};

/// What the simulator decided to do with a call.
pub(super) enum Outcome {
    /// HTTP 200 with this JSON body, which carries this ErrorCode.
    Answer {
        code: ErrorCode,
        body: Vec<u8>,
    },
    HttpStatus(StatusCode),
    Drop,
}

impl Outcome {
    fn fail(fail: Fail) -> Self {
        Self::Answer { code: fail.code, body: ReceiptResponse::fail(fail.code, fail.info).to_bytes() }
    }

    fn ok(body: Vec<u8>) -> Self {
        Self::Answer { code: ErrorCode::OK, body }
    }
}

/// A body as parsed, of the API the call went to.
#[derive(Clone)]
enum Body {
    Receipt(ReceiptRequest),
    Detail(DetailRequest),
}

impl Body {
    fn group(&self) -> &str {
        match self {
            Self::Receipt(r) => r.group.as_str(),
            Self::Detail(d) => d.group.as_str(),
        }
    }

    fn seqs(&self) -> Vec<u64> {
        match self {
            Self::Receipt(r) => r.seqs.iter().map(|s| s.0).collect(),
            Self::Detail(d) => vec![d.seq],
        }
    }
}

/// Everything about a call that can be worked out without the shared state. Computed
/// before taking the lock, so UserSig verification never holds other calls up.
pub(super) struct Checked {
    api: SimApi,
    /// Phase 3 and, when it passed, phases 5 and 6.
    call: Result<AppCall, Fail>,
    /// The sdkappid named, for the ledger.
    named_app: Option<AppId>,
    /// The body as parsed without its limits (MsgSeqs, Count), for the ledger.
    parsed: Option<Body>,
    /// When the gateway says it sent the call ([`SENT_AT_HEADER`]), for the ledger.
    ///
    /// [`SENT_AT_HEADER`]: crate::tencent::wire::SENT_AT_HEADER
    sent_at_us: Option<u64>,
}

impl Checked {
    /// The call as checked, with the send instant its caller stamped on it.
    pub(super) fn sent_at(self, sent_at_us: Option<u64>) -> Self {
        Self { sent_at_us, ..self }
    }
}

/// A call for a configured app, and what its parameters, UserSig and body came to.
struct AppCall {
    app: AppId,
    request: Result<Body, Fail>,
}

impl Simulator {
    /// Phases 3, 5 and 6, which depend only on the request and the fixed options.
    pub(super) fn check(&self, api: SimApi, query: &str, body: Result<Bytes, Fail>) -> Checked {
        let params = QueryParams::parse(query);
        let body = body.and_then(|b| parse_body(api, &b));
        let parsed = body.as_ref().ok().cloned();
        let call = rules::check_app(&params, &self.inner.apps).map(|app| AppCall {
            app: app.app,
            request: rules::check_caller(&params, app, unix_now()).and_then(|()| self.check_limits(body?)),
        });
        Checked { api, call, named_app: params.sdkappid(), parsed, sent_at_us: None }
    }

    /// The body rules beyond parsing (part of phase 6).
    fn check_limits(&self, body: Body) -> Result<Body, Fail> {
        match body {
            Body::Receipt(r) => rules::check_seq_count(r, self.inner.max_seqs).map(Body::Receipt),
            Body::Detail(d) => detail::check_count(d).map(Body::Detail),
        }
    }

    /// Phases 2, 4, 7 and 8, under the lock; records the call. Returns the outcome and
    /// how long to wait before delivering it.
    pub(super) fn decide(&self, checked: Checked) -> (Outcome, Duration) {
        let mut state = self.state();
        let at = Instant::now();
        let mut delay = state.base_latency;
        let outcome = match state.faults.pop_front() {
            None => self.answer(&mut state, &checked, at),
            Some(Fault::Latency(extra)) => {
                delay = delay.saturating_add(extra);
                self.answer(&mut state, &checked, at)
            }
            Some(Fault::ErrorCode(code)) => {
                preempt(&mut state, &checked, at, Outcome::fail(Fail::new(code, "simulated fault")))
            }
            Some(Fault::HttpStatus(status)) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                preempt(&mut state, &checked, at, Outcome::HttpStatus(status))
            }
            Some(Fault::Drop) => preempt(&mut state, &checked, at, Outcome::Drop),
        };
        let record = record(at, &checked, &outcome);
        tracing::debug!(
            api = record.api.path(),
            app = ?record.app,
            group = record.group.as_deref().unwrap_or(""),
            seqs = record.seqs.len(),
            error_code = record.error_code.0,
            http_status = record.http_status,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "simulator call"
        );
        state.calls.push(record);
        (outcome, delay)
    }

    /// Tencent's own answer (phases 3 to 8).
    fn answer(&self, state: &mut State, checked: &Checked, at: Instant) -> Outcome {
        let limit = self.inner.limit_per_second;
        let result = checked.call.as_ref().map_err(Fail::clone).and_then(|call| {
            if !state.admit(call.app, checked.api, at, limit) {
                let info = format!("more than {limit} calls per second to this API");
                return Err(Fail::new(ErrorCode::RATE_LIMITED, info));
            }
            let request = call.request.as_ref().map_err(Fail::clone)?;
            rules::check_group(request.group())?;
            if let Some(bad) = request.seqs().into_iter().find(|s| state.rejected.contains(s)) {
                return Err(Fail::new(ErrorCode::INVALID_PARAMETER, format!("MsgSeq {bad} is invalid")));
            }
            let past_the_end = |s: &u64| state.rejected_from.is_some_and(|from| *s >= from);
            if let Some(bad) = request.seqs().into_iter().find(past_the_end) {
                return Err(Fail::new(ErrorCode::INVALID_PARAMETER, format!("MsgSeq {bad} is out of range")));
            }
            match request {
                Body::Receipt(r) => Ok(self.receipts(state, call.app, r)),
                Body::Detail(d) => detail_page(state, d),
            }
        });
        match result {
            Ok(body) => Outcome::ok(body),
            Err(fail) => Outcome::fail(fail),
        }
    }

    /// The receipt API's items; with a player, the (group, seq)s that have a receipt
    /// become playable.
    fn receipts(&self, state: &mut State, app: AppId, request: &ReceiptRequest) -> Vec<u8> {
        let group = request.group.as_str();
        let items: Vec<ReceiptItem> =
            request.seqs.iter().map(|&MsgSeq(seq)| ReceiptItem::new(MsgSeq(seq), state.receipt(group, seq))).collect();
        if self.inner.player.is_some() {
            for item in items.iter().filter(|i| i.code == ErrorCode::OK) {
                state.playable.offer(app, group, item.seq);
            }
        }
        ReceiptResponse::ok(items).to_bytes()
    }
}

/// The detail API's page: the members of a message, consistent with its receipt.
fn detail_page(state: &State, request: &DetailRequest) -> Result<Vec<u8>, Fail> {
    let receipt = state.receipt(request.group.as_str(), request.seq);
    if receipt.code != ErrorCode::OK {
        let info = format!("MsgSeq {} has no read receipt", request.seq);
        return Err(Fail::new(receipt.code, info));
    }
    let page = detail::page(request, receipt.read.unwrap_or(0), receipt.unread.unwrap_or(0))?;
    Ok(detail::answer_body(request, &page, state.finish_field))
}

/// A body parsed by the rules of `api`, without its limits.
fn parse_body(api: SimApi, bytes: &[u8]) -> Result<Body, Fail> {
    match api {
        SimApi::Receipt => ReceiptRequest::parse(bytes, usize::MAX)
            .map(Body::Receipt)
            .map_err(|e| Fail::new(ErrorCode::INVALID_PARAMETER, e.to_string())),
        SimApi::Detail => detail::parse(bytes).map(Body::Detail),
    }
}

/// A fault that replaces Tencent's answer (phase 2). It still spends the app's budget
/// for the API, unless it plays 60007, to keep the ledger's invariant (see `ledger`).
fn preempt(state: &mut State, checked: &Checked, at: Instant, outcome: Outcome) -> Outcome {
    let refused = matches!(&outcome, Outcome::Answer { code, .. } if *code == ErrorCode::RATE_LIMITED);
    if let (Ok(call), false) = (&checked.call, refused) {
        state.spend(call.app, checked.api, at);
    }
    outcome
}

fn record(at: Instant, checked: &Checked, outcome: &Outcome) -> CallRecord {
    let (error_code, http_status) = match outcome {
        Outcome::Answer { code, .. } => (*code, StatusCode::OK.as_u16()),
        Outcome::HttpStatus(status) => (NO_ERROR_CODE, status.as_u16()),
        Outcome::Drop => (NO_ERROR_CODE, 0),
    };
    let parsed = checked.parsed.as_ref();
    CallRecord {
        at,
        api: checked.api,
        app: checked.named_app,
        group: parsed.map(|b| b.group().to_owned()),
        seqs: parsed.map(Body::seqs).unwrap_or_default(),
        error_code,
        http_status,
        sent_at_us: checked.sent_at_us,
    }
}

/// Seconds since the Unix epoch, the clock UserSigs are judged by.
pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}
