//! Answers as HTTP: a receipt answer with `X-Cache` and `Age` (headers cloned from
//! templates made once), and the one place a gateway error becomes HTTP.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use super::receipts::Answer;
use crate::cache::XCache;
use crate::config::ErrorStatus;
use crate::error::GatewayError;
use crate::http::json;
use crate::tencent::wire::ReceiptResponse;

/// `X-Cache` (docs/design.md#receipt-api); a name given as text would be parsed and allocated per
/// answer.
pub(super) const X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// The request id header (docs/design.md#receipt-api, #logs).
pub(super) const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The status of the error table on every gateway-made error, whichever status is sent
/// (docs/design.md#errors).
pub const X_GATEWAY_STATUS: http::HeaderName = http::HeaderName::from_static("x-gateway-status");

pub(super) fn answer_response(answer: Answer) -> Response<Full<Bytes>> {
    cached_response(Bytes::from(answer.body.to_bytes()), answer.x_cache, answer.age)
}

/// An answer with `X-Cache` and `Age`, its headers cloned from [`ANSWER_HEADERS`].
pub(super) fn cached_response(body: Bytes, x_cache: XCache, age: u64) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    let kind = XCache::ALL.iter().position(|&x| x == x_cache);
    let young = usize::try_from(age).ok().filter(|&a| a < TEMPLATE_AGES);
    let template = kind.zip(young).and_then(|(kind, age)| ANSWER_HEADERS.get(kind * TEMPLATE_AGES + age));
    *response.headers_mut() = match template {
        Some(template) => template.clone(),
        None => answer_headers(x_cache, HeaderValue::from(age)),
    };
    response
}

/// Ages (whole seconds) with headers of their own in [`ANSWER_HEADERS`]: every fresh
/// answer at the default TTL; an older one's are made for it.
const TEMPLATE_AGES: usize = 10;

/// Their values, static: a clone of a formatted one would count references, on a cache
/// line every core writes.
const AGES: [&str; TEMPLATE_AGES] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// An answer's headers for every `X-Cache` (in [`XCache::ALL`]'s order) and age under
/// [`TEMPLATE_AGES`], made once: cloning a map costs an answer a third of building one
/// (hashing each name, growing the map; callgrind, `benches/callgrind.sh`).
static ANSWER_HEADERS: std::sync::LazyLock<Vec<HeaderMap>> = std::sync::LazyLock::new(|| {
    let each_age = |x_cache| AGES.map(|age| answer_headers(x_cache, HeaderValue::from_static(age)));
    XCache::ALL.into_iter().flat_map(each_age).collect()
});

/// An answer's headers, with an `X-Request-Id` placeholder that [`handle`] replaces in
/// place for every answer (an insert into a clone without room would grow it).
fn answer_headers(x_cache: XCache, age: HeaderValue) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_CACHE, HeaderValue::from_static(x_cache.as_str()));
    headers.insert(header::AGE, age);
    headers.insert(X_REQUEST_ID, HeaderValue::from_static("unknown"));
    headers
}

/// The one place a gateway error becomes HTTP (docs/design.md#errors): the Tencent body;
/// HTTP 200 as Tencent answers its own errors (`ErrorStatus::Tencent`) or the table's
/// status (`ErrorStatus::Http`); the table's status in `X-Gateway-Status` either way;
/// `Retry-After` where it applies.
pub fn error_response(e: &GatewayError, mode: ErrorStatus) -> Response<Full<Bytes>> {
    let status = e.status();
    let sent = match mode {
        ErrorStatus::Tencent => StatusCode::OK,
        ErrorStatus::Http => status,
    };
    let mut response = json(sent, ReceiptResponse::fail(e.code(), e.to_string()).to_bytes());
    response.headers_mut().insert(X_GATEWAY_STATUS, HeaderValue::from(status.as_u16()));
    if let Some(secs) = e.retry_after() {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_error_is_sent_as_tencent_would_or_with_the_tables_status() {
        let e = GatewayError::QuotaExceeded { retry_after: Duration::from_millis(2100) };
        for (mode, sent) in [(ErrorStatus::Tencent, 200), (ErrorStatus::Http, 429)] {
            let r = error_response(&e, mode);
            assert_eq!(r.status().as_u16(), sent, "{mode:?}");
            assert_eq!(r.headers()[X_GATEWAY_STATUS], "429", "{mode:?}");
            assert_eq!(r.headers()[header::RETRY_AFTER], "3", "{mode:?}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json", "{mode:?}");
        }
        let r = error_response(&GatewayError::NotFound, ErrorStatus::Tencent);
        assert_eq!((r.status(), &r.headers()[X_GATEWAY_STATUS]), (StatusCode::OK, &HeaderValue::from_static("404")));
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn an_answer_has_its_own_x_cache_and_age_and_room_for_its_request_id() {
        for x_cache in XCache::ALL {
            for age in [0, 1, 9, 10, 11, 86_400] {
                let mut response = cached_response(Bytes::from_static(b"{}"), x_cache, age);
                let h = response.headers();
                assert_eq!(h.get(X_CACHE).unwrap(), x_cache.as_str(), "{x_cache:?} at {age} s");
                assert_eq!(h.get(header::AGE).unwrap(), age.to_string().as_str(), "{x_cache:?} at {age} s");
                assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), "application/json");
                let (room, len) = (h.capacity(), h.len());
                // What `handle` does to every answer: the id replaces the placeholder.
                response.headers_mut().insert(X_REQUEST_ID, HeaderValue::from_static("id-1"));
                let h = response.headers();
                assert_eq!(h.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), ["id-1"]);
                assert_eq!((h.len(), h.capacity()), (len, room), "no growth");
            }
        }
    }
}
