//! The speed-of-light references: trivial hyper HTTP/1.1 servers, each in its own process
//! (like the gateway) so all are measured under the same conditions.
//!
//! - [`BaselineKind::Fixed`] reads each request and answers a fixed body as large as the
//!   gateway's answer: what HTTP alone costs.
//! - [`BaselineKind::Parsing`] parses the request JSON (serde, into types, the group id
//!   borrowed) and serialises the answer the simulator would give for it (serde_json,
//!   `default_receipt` for every MsgSeq): the same bytes the gateway answers from its
//!   cache, without a cache, a budget, metrics or logs. What a hand-written handler of the
//!   API costs.
//!
//! Both run on tokio's default multi-thread runtime with the gateway's allocator
//! (mimalloc), as the gateway does, so neither side of a comparison gains by those.
//!
//! The loadgen starts one by running itself with the hidden `--serve-baseline PORT` flag
//! (and `--baseline-kind`); the child prints the address it bound on its first line of
//! output.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::time::Duration;

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;

use receipt_gateway::simulator::default_receipt;
use receipt_gateway::tencent::code::ErrorCode;
use receipt_gateway::tencent::domain::MsgSeq;
use receipt_gateway::tencent::wire::{ReceiptItem, ReceiptResponse};

use crate::Result;
use crate::cli::BaselineKind;

const STARTED_WITHIN: Duration = Duration::from_secs(10);

/// The baseline server process, killed when dropped.
pub struct Baseline {
    child: Child,
    pub addr: SocketAddr,
}

impl Baseline {
    /// A baseline of `kind`; `body_bytes` sizes the fixed one's body.
    pub async fn start(kind: BaselineKind, body_bytes: usize) -> Result<Baseline> {
        let kind_flag = match kind {
            BaselineKind::Fixed => "fixed",
            BaselineKind::Parsing => "parsing",
        };
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--serve-baseline", "0", "--body-bytes", &body_bytes.to_string(), "--baseline-kind", kind_flag])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the baseline server: {e}"))?;
        let stdout = child.stdout.take().ok_or("the baseline server has no stdout")?;
        let first_line = tokio::task::spawn_blocking(move || read_line(stdout));
        let addr = match tokio::time::timeout(STARTED_WITHIN, first_line).await {
            Ok(Ok(Ok(line))) => line.trim().parse::<SocketAddr>().map_err(|e| format!("baseline said {line:?}: {e}")),
            Ok(Ok(Err(e))) => Err(format!("cannot read the baseline's address: {e}")),
            Ok(Err(e)) => Err(format!("cannot read the baseline's address: {e}")),
            Err(_) => Err(format!("the baseline server did not start within {STARTED_WITHIN:?}")),
        };
        match addr {
            Ok(addr) => Ok(Baseline { child, addr }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.into())
            }
        }
    }
}

impl Baseline {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_line(stdout: ChildStdout) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok(line)
}

/// The child's side: serve until killed. Uses tokio's default multi-thread runtime, as the
/// gateway's `main` does.
pub fn serve_forever(port: u16, kind: BaselineKind, body_bytes: usize) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("baseline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(port, kind, fixed_body(body_bytes))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(port: u16, kind: BaselineKind, body: Bytes) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let service = service_fn(move |req| answer(req, kind, body.clone()));
        tokio::spawn(async move {
            // A client closing its connection is the normal end; nothing to report.
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Reads the request body (the gateway has to as well) and answers the fixed body, or
/// the parsed request's answer.
async fn answer(
    req: Request<Incoming>,
    kind: BaselineKind,
    fixed: Bytes,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let request = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let (status, body) = match kind {
        BaselineKind::Fixed => (StatusCode::OK, fixed),
        BaselineKind::Parsing => match parsed_answer(&request) {
            Some(answer) => (StatusCode::OK, Bytes::from(answer)),
            None => {
                let fail = ReceiptResponse::fail(ErrorCode::INVALID_PARAMETER, "the body is not a receipt query");
                (StatusCode::BAD_REQUEST, Bytes::from(fail.to_bytes()))
            }
        },
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Tencent's request body, as a hand-written handler would parse it.
#[derive(Deserialize)]
struct Query<'a> {
    #[serde(rename = "GroupId", borrow)]
    group: Cow<'a, str>,
    #[serde(rename = "MsgSeqList")]
    seqs: Vec<Seq>,
}

#[derive(Deserialize)]
struct Seq {
    #[serde(rename = "MsgSeq")]
    seq: u64,
}

/// The simulator's answer to a request body, serialised by serde_json; `None` for a body
/// that is not a receipt query.
fn parsed_answer(body: &[u8]) -> Option<Vec<u8>> {
    let query: Query<'_> = serde_json::from_slice(body).ok()?;
    let items = query.seqs.iter().map(|s| ReceiptItem::new(MsgSeq(s.seq), default_receipt(&query.group, s.seq)));
    serde_json::to_vec(&ReceiptResponse::ok(items.collect())).ok()
}

/// A Tencent-shaped body padded to exactly `size` bytes (when `size` allows).
fn fixed_body(size: usize) -> Bytes {
    let head = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","Padding":""#;
    let tail = r#""}"#;
    let padding = size.saturating_sub(head.len() + tail.len());
    Bytes::from(format!("{head}{}{tail}", "x".repeat(padding)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parsing_baseline_answers_the_simulators_bytes_and_refuses_what_is_not_a_query() {
        let body = br#"{"GroupId":"loadgen-7","MsgSeqList":[{"MsgSeq":3},{"MsgSeq":9}]}"#;
        let answer = parsed_answer(body).expect("an answer");
        let items = vec![
            ReceiptItem::new(MsgSeq(3), default_receipt("loadgen-7", 3)),
            ReceiptItem::new(MsgSeq(9), default_receipt("loadgen-7", 9)),
        ];
        assert_eq!(answer, ReceiptResponse::ok(items).to_bytes(), "what the simulator (and the gateway) answer");
        assert!(parsed_answer(b"{}").is_none());
        assert!(parsed_answer(b"not json").is_none());
    }

    #[test]
    fn the_fixed_body_is_padded_to_the_size_asked_for() {
        assert_eq!(fixed_body(300).len(), 300);
        let small = fixed_body(10);
        assert!(serde_json::from_slice::<serde_json::Value>(&small).is_ok(), "too small to pad: still JSON");
    }
}
