//! The errors the gateway itself answers with (docs/design.md#errors), and the one place that maps
//! each to an HTTP status and a Tencent ErrorCode. ErrorCodes reuse Tencent's meanings so an
//! existing client reacts correctly (60007: slow down).

use std::time::Duration;

use http::StatusCode;

use crate::tencent::code::ErrorCode;

/// Who caused an error: what the request log line and `receipt_gateway_requests_total`
/// label it with, so an operator sees at once whether to look at callers, at Tencent or
/// at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The request was wrong (body, headers, path, app).
    Caller,
    /// Tencent failed, refused the gateway's call, or did not answer in time.
    Upstream,
    /// The gateway chose not to serve: budget exhausted or shutting down.
    Gateway,
}

impl Blame {
    pub fn label(self) -> &'static str {
        match self {
            Blame::Caller => "caller",
            Blame::Upstream => "upstream",
            Blame::Gateway => "gateway",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The body is not JSON at all (Tencent's 60003); the text says where it breaks.
    #[error("{0}")]
    NotJson(String),
    /// The body or a header is wrong; the text names the field.
    #[error("{0}")]
    BadRequest(String),
    #[error("body is larger than server.max_body_bytes ({0} bytes)")]
    BodyTooLarge(usize),
    /// `sdkappid` missing (several apps configured), malformed or not configured.
    #[error("{0}")]
    UnknownApp(String),
    /// A configured client's bearer token is missing or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// `server.require_client_auth` and no configured client id.
    #[error("{0}")]
    Forbidden(String),
    /// The client's `requests_per_second` is spent.
    #[error("this client's quota of requests per second is spent; retry after {}s", retry_after_secs(*.retry_after))]
    QuotaExceeded { retry_after: Duration },
    #[error("no such path")]
    NotFound,
    #[error("method not allowed: use POST")]
    MethodNotAllowed,
    /// The budget cannot serve the request before its deadline.
    #[error("the upstream budget cannot serve this request before its deadline; retry after {}s", retry_after_secs(*.retry_after))]
    Overloaded { retry_after: Duration },
    /// Upstream unreachable or failing after retries, and nothing servable in the cache.
    #[error("upstream unavailable: {0}")]
    Upstream(String),
    #[error("deadline passed while waiting for upstream")]
    DeadlineExceeded,
    /// The request body did not arrive before the deadline.
    #[error("the request body did not arrive before the deadline")]
    BodyTimeout,
    #[error("the gateway is shutting down; retry on another replica")]
    Draining,
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotJson(_) | Self::BadRequest(_) | Self::UnknownApp(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Tencent's ErrorCode for the situation.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotJson(_) => ErrorCode::NOT_JSON,
            Self::BadRequest(_) | Self::BodyTooLarge(_) => ErrorCode::INVALID_PARAMETER,
            Self::UnknownApp(_) => ErrorCode::UNKNOWN_APP,
            Self::Unauthorized(_) | Self::Forbidden(_) => ErrorCode::UNAUTHORIZED,
            Self::QuotaExceeded { .. } => ErrorCode::RATE_LIMITED,
            Self::NotFound => ErrorCode::UNKNOWN_PATH,
            Self::MethodNotAllowed => ErrorCode::METHOD_NOT_ALLOWED,
            Self::Overloaded { .. } => ErrorCode::RATE_LIMITED,
            Self::Upstream(_) | Self::Draining => ErrorCode::INTERNAL,
            Self::DeadlineExceeded | Self::BodyTimeout => ErrorCode::TIMEOUT,
        }
    }

    /// Who caused it.
    pub fn blame(&self) -> Blame {
        match self {
            Self::NotJson(_)
            | Self::BadRequest(_)
            | Self::BodyTooLarge(_)
            | Self::UnknownApp(_)
            | Self::Unauthorized(_)
            | Self::Forbidden(_)
            | Self::QuotaExceeded { .. }
            | Self::NotFound
            | Self::MethodNotAllowed
            | Self::BodyTimeout => Blame::Caller,
            Self::Upstream(_) | Self::DeadlineExceeded => Blame::Upstream,
            Self::Overloaded { .. } | Self::Draining => Blame::Gateway,
        }
    }

    /// The `Retry-After` value, for the errors that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded { retry_after } | Self::QuotaExceeded { retry_after } => {
                Some(retry_after_secs(*retry_after))
            }
            Self::Draining => Some(1),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_spec_table() {
        let rows = [
            (GatewayError::NotJson("x".into()), 400, 60003),
            (GatewayError::BadRequest("x".into()), 400, 10004),
            (GatewayError::BodyTooLarge(1), 413, 10004),
            (GatewayError::UnknownApp("x".into()), 400, 60006),
            (GatewayError::Unauthorized("x".into()), 401, 60004),
            (GatewayError::Forbidden("x".into()), 403, 60004),
            (GatewayError::QuotaExceeded { retry_after: Duration::from_millis(10) }, 429, 60007),
            (GatewayError::NotFound, 404, 60009),
            (GatewayError::MethodNotAllowed, 405, 60002),
            (GatewayError::Overloaded { retry_after: Duration::from_millis(1500) }, 429, 60007),
            (GatewayError::Upstream("x".into()), 502, 10002),
            (GatewayError::DeadlineExceeded, 504, 60008),
            (GatewayError::BodyTimeout, 408, 60008),
            (GatewayError::Draining, 503, 10002),
        ];
        for (e, status, code) in rows {
            assert_eq!((e.status().as_u16(), e.code()), (status, ErrorCode(code)), "{e:?}");
        }
        assert_eq!(GatewayError::BodyTooLarge(1).blame(), Blame::Caller);
        assert_eq!(GatewayError::DeadlineExceeded.blame(), Blame::Upstream);
        assert_eq!(GatewayError::Overloaded { retry_after: Duration::ZERO }.blame(), Blame::Gateway);
        assert_eq!(GatewayError::Overloaded { retry_after: Duration::from_millis(1500) }.retry_after(), Some(2));
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
