//! The speed-of-light reference: a trivial hyper HTTP/1.1 server that reads each request
//! and answers a fixed body as large as the gateway's answer, in its own process (like the
//! gateway) so both are measured under the same conditions. The loadgen starts it by
//! running itself with the hidden `--serve-baseline PORT` flag; the child prints the
//! address it bound on its first line of output.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Result;

const STARTED_WITHIN: Duration = Duration::from_secs(10);

/// The baseline server process, killed when dropped.
pub struct Baseline {
    child: Child,
    pub addr: SocketAddr,
}

impl Baseline {
    pub async fn start(body_bytes: usize) -> Result<Baseline> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--serve-baseline", "0", "--body-bytes", &body_bytes.to_string()])
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
pub fn serve_forever(port: u16, body_bytes: usize) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("baseline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(port, fixed_body(body_bytes))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(port: u16, body: Bytes) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let service = service_fn(move |req| answer(req, body.clone()));
        tokio::spawn(async move {
            // A client closing its connection is the normal end; nothing to report.
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Reads the request body (the gateway has to as well) and answers the fixed body.
async fn answer(req: Request<Incoming>, body: Bytes) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let _ = req.into_body().collect().await;
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// A Tencent-shaped body padded to exactly `size` bytes (when `size` allows).
fn fixed_body(size: usize) -> Bytes {
    let head = r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","Padding":""#;
    let tail = r#""}"#;
    let padding = size.saturating_sub(head.len() + tail.len());
    Bytes::from(format!("{head}{}{tail}", "x".repeat(padding)))
}
