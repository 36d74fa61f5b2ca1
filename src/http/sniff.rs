//! Telling HTTP/1.1 from h2c (prior knowledge) by a connection's first bytes.

use std::time::Duration;

/// The protocol a connection speaks, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    /// h2 with prior knowledge (h2c): the connection starts with the preface.
    Http2,
}

/// The HTTP/2 connection preface (RFC 9113, 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What `peeked`, the first bytes of a connection, say: HTTP/2 once the whole preface is
/// there, HTTP/1.1 once they cannot be its start and hold a line's end or as many bytes,
/// else `None` (wait for more).
pub(super) fn protocol(peeked: &[u8]) -> Option<Protocol> {
    if H2_PREFACE.starts_with(peeked) {
        // A prefix of the preface (it holds a "\r\n" of its own): wait for all of it.
        return (peeked.len() == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let enough = peeked.len() >= H2_PREFACE.len() || peeked.windows(2).any(|w| w == b"\r\n");
    enough.then_some(Protocol::Http1)
}

/// Waits until the peer has sent enough first bytes to tell its protocol, at most
/// `timeout`; `None` for a silent peer or one that closed. Peeked, not read: the
/// connection's parser sees them.
pub(super) async fn first_bytes(stream: &tokio::net::TcpStream, timeout: Duration) -> Option<Protocol> {
    let wait = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => match protocol(&buf[..n]) {
                    Some(protocol) => return Some(protocol),
                    // Some bytes, not yet enough: wait for more without spinning.
                    None => tokio::time::sleep(Duration::from_millis(5)).await,
                },
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_told_from_the_first_bytes() {
        assert_eq!(protocol(H2_PREFACE), Some(Protocol::Http2));
        // The preface holds a line's end of its own: a part of it is not HTTP/1.1 yet.
        assert_eq!(protocol(&H2_PREFACE[..16]), None);
        assert_eq!(protocol(b"PRI"), None);
        assert_eq!(protocol(b"POST /v4/x HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(protocol(b"GET / HT"), None);
        assert_eq!(protocol(&[b'x'; 24]), Some(Protocol::Http1));
        assert_eq!(protocol(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"), Some(Protocol::Http1), "not the preface");
    }
}
