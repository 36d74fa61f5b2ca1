//! Reading a request body within a size and a deadline, and the JSON response every
//! handler answers with.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::error::GatewayError;

/// Reads the body, refusing more than `max` bytes and giving up at the deadline.
pub async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    max: usize,
    deadline: Instant,
) -> Result<Bytes, GatewayError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(GatewayError::BodyTooLarge(max));
    }
    let mut gathered = std::pin::pin!(gather(body, max));
    // A small body has usually arrived with the headers: no timer for it.
    if let Some(gathered) = futures_util::FutureExt::now_or_never(&mut gathered) {
        return gathered;
    }
    // The timer only for a body still on its way, boxed so that the usual request's
    // future does not carry it.
    let timer = Box::pin(tokio::time::sleep_until(deadline));
    tokio::select! {
        biased;
        gathered = gathered => gathered,
        () = timer => Err(GatewayError::BodyTimeout),
    }
}

/// The body's data, refusing more than `max` bytes. A body in one frame (the usual
/// small one) is passed on as it is, without a copy or a list of frames.
async fn gather(mut body: Incoming, max: usize) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| GatewayError::BadRequest(format!("could not read the request body: {e}")))?;
        // Trailers carry nothing the APIs read.
        let Ok(data) = frame.into_data() else { continue };
        let held = joined.as_ref().map_or_else(|| first.as_ref().map_or(0, Bytes::len), |j| j.len());
        if held + data.len() > max {
            return Err(GatewayError::BodyTooLarge(max));
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(one), None) => {
                let mut both = bytes::BytesMut::with_capacity(one.len() + data.len());
                both.extend_from_slice(one);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
            (Some(_), Some(more)) => more.extend_from_slice(&data),
        }
    }
    Ok(joined.map(bytes::BytesMut::freeze).or(first).unwrap_or_default())
}

/// A response with a JSON body.
pub fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
