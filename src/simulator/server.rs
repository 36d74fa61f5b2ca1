//! Serving HTTP: the listener, HTTP/1.1 and h2c on one port, routing (phase 1), reading
//! bodies and writing answers. Every call past routing is handed to `call`, which decides
//! the answer; this module only delivers it.
//!
//! It owns the tasks it starts: connection tasks and the member player end with
//! [`Simulator::serve`], even when it is aborted, and [`SimServer`] ends a spawned server
//! when it is dropped.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types};

use crate::tencent::code::ErrorCode;
use crate::tencent::wire::{ReceiptResponse, SENT_AT_HEADER};

use super::call::Outcome;
use super::fault::{Dropped, fault_response};
use super::rules::Fail;
use super::{SimApi, SimOptions, Simulator, player};

/// Bodies are read whole; a cap keeps a broken client from filling memory.
pub(super) const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long [`Simulator::serve`] lets open connections finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Simulator {
    /// Binds `127.0.0.1:0`, serves there on the current runtime and returns the handle,
    /// the base URL (`http://127.0.0.1:PORT`) and the guard that owns the server.
    pub async fn spawn(options: SimOptions) -> io::Result<(Simulator, String, SimServer)> {
        Self::spawn_on(options, None).await
    }

    /// [`Self::spawn`] over HTTPS (h2 or HTTP/1.1 by ALPN) with the certificate `chain`
    /// and its `key`, as a company's TLS-inspecting egress or a private endpoint would
    /// present one; the base URL is `https://127.0.0.1:PORT` (the certificate needs that
    /// IP address among its names).
    pub async fn spawn_tls(
        options: SimOptions,
        chain: Vec<pki_types::CertificateDer<'static>>,
        key: pki_types::PrivateKeyDer<'static>,
    ) -> io::Result<(Simulator, String, SimServer)> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .map_err(io::Error::other)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::spawn_on(options, Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn spawn_on(options: SimOptions, tls: Option<TlsAcceptor>) -> io::Result<(Simulator, String, SimServer)> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let sim = Simulator::new(options);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            // A dropped sender means the guard is gone: stop as well.
            let _ = stopped.await;
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(sim.clone().serve_on(listener, tls, shutdown));
        let server = SimServer { addr, stop: Some(stop), task: Some(task) };
        Ok((sim, format!("{scheme}://{addr}"), server))
    }

    /// Serves (and runs the member player, when configured) until `shutdown` resolves;
    /// then stops the player, stops accepting, gives open connections a second to finish
    /// and closes whatever is left.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        self.serve_on(listener, None, shutdown).await
    }

    async fn serve_on(
        self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Without a timer hyper's header-read timeout (the slowloris guard) does nothing.
        builder.http1().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        // Owning the connection tasks (and the player) means they end with `serve`, even
        // if it is aborted.
        let mut connections = JoinSet::new();
        let mut player = JoinSet::new();
        if let Some(config) = self.inner.player.clone() {
            player.spawn(player::run(self.clone(), config));
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        self.inner.connections.fetch_add(1, Ordering::SeqCst);
                        let sim = self.clone();
                        let service = service_fn(move |req| sim.clone().handle(req));
                        match &tls {
                            None => {
                                let conn = builder.serve_connection(TokioIo::new(stream), service);
                                connections.spawn(graceful.watch(conn.into_owned()));
                            }
                            Some(acceptor) => {
                                let (acceptor, builder, watcher) = (acceptor.clone(), builder.clone(), graceful.watcher());
                                connections.spawn(async move {
                                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                                    let Ok(Ok(stream)) = handshake.await else {
                                        // A client that does not trust the certificate.
                                        return Ok(());
                                    };
                                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                                    watcher.watch(conn.into_owned()).await
                                });
                            }
                        }
                    }
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "simulator accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        player.shutdown().await;
        drop(listener);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
        Ok(())
    }

    /// One call: routing, then the phases (`call`), the gate and any delay, then the answer.
    async fn handle(self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
        let api = SimApi::at_path(req.uri().path()).filter(|_| req.method() == Method::POST);
        let Some(api) = api else {
            let (method, path) = (req.method(), req.uri().path());
            tracing::debug!(%method, path, "simulator: unknown path");
            let info = format!("no API at {method} {path}");
            let body = ReceiptResponse::fail(ErrorCode::UNKNOWN_PATH, info).to_bytes();
            return Ok(json_response(StatusCode::NOT_FOUND, body));
        };
        let agent = req.headers().get(USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        self.state().user_agents.push(agent);
        let query = req.uri().query().unwrap_or_default().to_owned();
        let sent_at_us = req.headers().get(SENT_AT_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
        let body = read_body(req.into_body()).await;
        let checked = self.check(api, &query, body).sent_at(sent_at_us);
        let (outcome, delay) = self.decide(checked);
        self.pass_gate().await;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match outcome {
            Outcome::Answer { body, .. } => Ok(json_response(StatusCode::OK, body)),
            Outcome::HttpStatus(status) => Ok(fault_response(status)),
            Outcome::Drop => Err(Dropped),
        }
    }
}

/// Owns a server started by [`Simulator::spawn`]. Dropping it stops the server at once
/// (listener closed, open connections cut, player stopped); [`SimServer::shutdown`]
/// stops it gently.
pub struct SimServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl SimServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open connections finish (briefly) and waits for the server.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, Fail> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(Fail::new(ErrorCode::INVALID_PARAMETER, format!("body could not be read: {e}"))),
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let json = HeaderValue::from_static("application/json");
    response.headers_mut().insert(CONTENT_TYPE, json);
    response
}
