//! The admin API (docs/design.md#admin-api) on its own port: `/metrics`, `/healthz`, `/readyz`.
//! Kept off the data port so the mesh can expose one and not the other. `/readyz` turns
//! 200 once the upstream warm-up has had its first try (docs/design.md#upstream-connections),
//! and 503 again while draining.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use tokio::sync::watch;

use crate::cache::ReceiptCache;
use crate::shutdown::Drain;
use crate::telemetry::metrics::Metrics;

/// What the admin endpoints read.
pub struct Admin {
    pub metrics: Metrics,
    pub cache: ReceiptCache,
    pub drain: Arc<Drain>,
    /// True once every app's first upstream connection was opened, or failed to be.
    pub warmed: watch::Receiver<bool>,
}

pub async fn handle(req: Request<Incoming>, admin: Arc<Admin>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body): (StatusCode, &'static str, Bytes) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            admin.metrics.cache_entries.set(admin.cache.entry_count() as i64);
            admin.drain.publish();
            (StatusCode::OK, "text/plain; version=0.0.4", Bytes::from(admin.metrics.render()))
        }
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        (&Method::GET, "/readyz") if admin.drain.is_draining() => {
            (StatusCode::SERVICE_UNAVAILABLE, "text/plain", Bytes::from_static(b"draining\n"))
        }
        (&Method::GET, "/readyz") if !*admin.warmed.borrow() => {
            (StatusCode::SERVICE_UNAVAILABLE, "text/plain", Bytes::from_static(b"opening upstream connections\n"))
        }
        (&Method::GET, "/readyz") => (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n")),
        (_, "/metrics" | "/healthz" | "/readyz") => {
            (StatusCode::METHOD_NOT_ALLOWED, "text/plain", Bytes::from_static(b"use GET\n"))
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"not found\n")),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}
