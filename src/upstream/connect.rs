//! How upstream connections are made (docs/design.md#upstream-connections): straight to
//! Tencent, or through the egress proxy's `CONNECT` tunnel (for `https://` and `http://`
//! upstreams alike, so TLS stays end to end with Tencent); TLS by rustls with the bundled
//! web PKI roots plus `upstream.ca_file`'s; and the warm-up, which opens a connection
//! (DNS, TCP, the proxy's tunnel, TLS) before any call needs it.
//!
//! hyper-util's pooled client cannot take a connection made outside it, so the warm-up
//! parks the connection here and the connector hands it to the pool the first time the
//! pool asks for a connection to that address: no request is made, so it costs no budget.
//! A parked connection unused for [`PARKED_FOR`] is dropped (servers close silent
//! connections) and the next call opens its own, as it would without a warm-up.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Uri};
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use crate::config::{Proxy, UpstreamConfig};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Tcp = TokioIo<TcpStream>;
/// A connection as the pool gets it: TLS or plain, straight or tunnelled.
pub type Stream = MaybeHttpsStream<Tcp>;
type Connecting<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// How long a warmed connection waits for the pool before it is dropped.
pub const PARKED_FOR: Duration = Duration::from_secs(20);

/// The pooled client every app's calls (and the callback tee) share.
pub type HttpClient = Client<Warm, Full<Bytes>>;

/// The shared client and the warm-up's way into it.
#[derive(Clone)]
pub struct Pool {
    pub client: HttpClient,
    warm: Warm,
}

impl Pool {
    /// The client for `upstream`'s proxy and roots: h2 or HTTP/1.1 by ALPN, keep-alive.
    /// Plain HTTP only ever reaches an `endpoint` override (tests, private links).
    pub fn new(upstream: &UpstreamConfig) -> Result<Self, rustls::Error> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for cert in &upstream.extra_roots {
            roots.add(cert.clone())?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut direct = HttpConnector::new();
        // TLS is the next layer's: this one gets https:// addresses too.
        direct.enforce_http(false);
        direct.set_nodelay(true);
        // Half an attempt's time for TCP: a domain that swallows packets (DNS hijacked to a
        // black hole) is then a failure to connect, which leaves the call time to be
        // retried at once on the other domain (docs/design.md#domains-and-failover).
        direct.set_connect_timeout(Some(upstream.timeout / 2));
        let egress = upstream.egress.clone();
        let mut no_proxy = Matcher::builder().no(egress.no_proxy.as_str());
        if let Some(p) = &egress.https {
            no_proxy = no_proxy.https(p.url.to_string());
        }
        if let Some(p) = &egress.http {
            no_proxy = no_proxy.http(p.url.to_string());
        }
        let proxied = Proxied {
            direct,
            routes: Arc::new(Routes {
                matcher: no_proxy.build(),
                https: egress.https.as_ref().map(authorization),
                http: egress.http.as_ref().map(authorization),
            }),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(proxied);
        let warm = Warm { inner: https, parked: Arc::new(Mutex::new(Vec::new())) };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(warm.clone());
        Ok(Self { client, warm })
    }

    /// Opens a connection to `base` (an endpoint's base URL) and parks it for the pool's
    /// first call there; the error says what failed (DNS, connect, proxy, TLS).
    pub async fn warm(&self, base: &str) -> Result<(), String> {
        let uri: Uri = base.parse().map_err(|e| format!("{base:?}: {e}"))?;
        let key = key(&uri).ok_or_else(|| format!("{base:?} has no host"))?;
        let stream = self.warm.inner.clone().call(uri).await.map_err(|e| super::error_chain(&*e))?;
        let mut parked = self.warm.lock();
        parked.retain(|p| p.key != key && p.at.elapsed() < PARKED_FOR);
        parked.push(Parked { key, at: Instant::now(), stream });
        Ok(())
    }
}

/// The `Proxy-Authorization` value of a proxy, and its address.
fn authorization(proxy: &Proxy) -> (Uri, Option<HeaderValue>) {
    let value = proxy.authorization.as_ref().and_then(|a| HeaderValue::from_str(a.expose()).ok()).map(|mut v| {
        v.set_sensitive(true);
        v
    });
    (proxy.url.clone(), value)
}

/// Which destinations go through which proxy.
struct Routes {
    /// `NO_PROXY` and the proxies' addresses, by curl's rules.
    matcher: Matcher,
    https: Option<(Uri, Option<HeaderValue>)>,
    http: Option<(Uri, Option<HeaderValue>)>,
}

/// TCP straight to the destination, or to the proxy and through its `CONNECT` tunnel.
#[derive(Clone)]
pub struct Proxied {
    direct: HttpConnector,
    routes: Arc<Routes>,
}

impl Service<Uri> for Proxied {
    type Response = Tcp;
    type Error = BoxError;
    type Future = Connecting<Tcp>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The HttpConnector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut direct = self.direct.clone();
        let via = match self.routes.matcher.intercept(&dst) {
            None => None,
            Some(_) if dst.scheme_str() == Some("https") => self.routes.https.clone(),
            Some(_) => self.routes.http.clone(),
        };
        match via {
            None => Box::pin(async move { direct.call(dst).await.map_err(Into::into) }),
            Some((proxy, auth)) => {
                let mut tunnel = Tunnel::new(proxy, direct);
                if let Some(auth) = auth {
                    tunnel = tunnel.with_auth(auth);
                }
                // The tunnel assumes port 443 when the address names none.
                let dst = with_port(dst);
                Box::pin(async move { tunnel.call(dst).await.map_err(Into::into) })
            }
        }
    }
}

/// `dst` with its scheme's default port written out.
fn with_port(dst: Uri) -> Uri {
    if dst.port().is_some() {
        return dst;
    }
    let (Some(host), Some(scheme)) = (dst.host(), dst.scheme_str()) else { return dst };
    let port = if scheme == "http" { 80 } else { 443 };
    format!("{scheme}://{host}:{port}/").parse().unwrap_or(dst)
}

/// `scheme://host:port` of `uri`, the default port written out.
fn key(uri: &Uri) -> Option<String> {
    let scheme = uri.scheme_str()?;
    let port = uri.port_u16().unwrap_or(if scheme == "http" { 80 } else { 443 });
    Some(format!("{scheme}://{}:{port}", uri.host()?))
}

/// A connection the warm-up opened, waiting for the pool.
struct Parked {
    key: String,
    at: Instant,
    stream: Stream,
}

/// The connector the pool calls: a parked connection to the destination if there is a
/// fresh one, else a new one (TLS over [`Proxied`]).
#[derive(Clone)]
pub struct Warm {
    inner: HttpsConnector<Proxied>,
    parked: Arc<Mutex<Vec<Parked>>>,
}

impl Warm {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        // Nothing panics while holding it.
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, dst: &Uri) -> Option<Stream> {
        let key = key(dst)?;
        let mut parked = self.lock();
        parked.retain(|p| p.at.elapsed() < PARKED_FOR);
        let at = parked.iter().position(|p| p.key == key)?;
        Some(parked.swap_remove(at).stream)
    }
}

impl Service<Uri> for Warm {
    type Response = Stream;
    type Error = BoxError;
    type Future = Connecting<Stream>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        if let Some(stream) = self.take(&dst) {
            tracing::debug!(%dst, "upstream: a warmed connection goes to the pool");
            return Box::pin(async move { Ok(stream) });
        }
        Box::pin(self.inner.call(dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_their_scheme_s_default_port() {
        assert_eq!(with_port("https://a.example".parse().unwrap()), "https://a.example:443/");
        assert_eq!(with_port("http://a.example/x".parse().unwrap()), "http://a.example:80/");
        assert_eq!(with_port("http://a.example:8080".parse().unwrap()), "http://a.example:8080/");
        assert_eq!(key(&"https://a.example/v4".parse().unwrap()).unwrap(), "https://a.example:443");
    }
}
