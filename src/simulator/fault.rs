//! What a test can make the simulator do besides answering as Tencent would: injected
//! [`Fault`]s, a base latency on every answer, and a gate that holds calls until the test
//! lets them go.
//!
//! Faults form one queue shared by both APIs and are played on the next calls in
//! injection order, one fault per call (see `call` for where they enter the phases). A
//! faulted call is still recorded, and still spends its app's budget unless it plays 60007.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::tencent::code::ErrorCode;

use super::Simulator;

/// A misbehaviour to play instead of (or before) the normal answer; see [`Simulator::inject`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Wait this long, then answer normally (a slow upstream).
    Latency(Duration),
    /// Answer HTTP 200 `FAIL` with this ErrorCode (e.g. 10002, 70169).
    ErrorCode(ErrorCode),
    /// Answer with this HTTP status (500 if it is not a valid status) and a small HTML
    /// body, as a failing load balancer in front of Tencent would.
    HttpStatus(u16),
    /// Close the connection without answering (a transport error).
    Drop,
}

/// Returned by the service to make hyper close the connection without an answer
/// ([`Fault::Drop`]).
#[derive(Debug, thiserror::Error)]
#[error("simulated dropped connection")]
pub(super) struct Dropped;

impl Simulator {
    /// Plays `fault` on each of the next `times` calls (to either API), after every fault
    /// injected before.
    pub fn inject(&self, fault: Fault, times: usize) {
        self.state().faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Delays every answer by `latency` (on top of any injected [`Fault::Latency`]).
    pub fn set_latency(&self, latency: Duration) {
        self.state().base_latency = latency;
    }

    /// Holds every later call after it is recorded (decided, counted against the limit)
    /// and before it is answered, until [`Self::release_calls`]: while held, "a fetch is
    /// in flight" is a fact a test can rely on rather than a window made by latency.
    pub fn hold_calls(&self) {
        self.inner.gate.send_replace(true);
    }

    /// Lets every held call (and every later one) be answered.
    pub fn release_calls(&self) {
        self.inner.gate.send_replace(false);
    }

    /// How many calls are held at the gate now.
    pub fn held_calls(&self) -> usize {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Waits while calls are held; the count stays right if the caller goes away.
    pub(super) async fn pass_gate(&self) {
        struct Held<'a>(&'a AtomicUsize);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let mut gate = self.inner.gate.subscribe();
        if !*gate.borrow_and_update() {
            return;
        }
        self.inner.held.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.inner.held);
        // The sender lives as long as the simulator; if it were gone, nothing could hold.
        let _ = gate.wait_for(|holding| !holding).await;
    }
}

/// The answer of a [`Fault::HttpStatus`]: an HTML page, not Tencent's JSON.
pub(super) fn fault_response(status: StatusCode) -> Response<Full<Bytes>> {
    let body = format!("<html><body><h1>{status}</h1>simulated fault</body></html>");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let html = HeaderValue::from_static("text/html");
    response.headers_mut().insert(CONTENT_TYPE, html);
    response
}
