//! Telling HTTP/1.1 from h2c (prior knowledge) by a connection's first bytes.
//!
//! The bytes are peeked, not read, so the connection's own parser sees them; and the
//! socket's readiness, not a timer, says when to peek again (docs/operations.md#connection-limits):
//! a connection holding a partial first line costs nothing until more bytes arrive, and a
//! peer that stops sending (end of stream) is let go at once.

use std::io;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// The protocol a connection speaks, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    /// h2 with prior knowledge (h2c): the connection starts with the preface.
    Http2,
}

/// What a connection's first bytes came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sniffed {
    Spoke(Protocol),
    /// The peer closed (or shut its sending side) before saying enough to serve.
    Closed,
    /// Not enough within the first-bytes timeout.
    Silent,
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

/// Waits, at most `timeout`, until the peer has sent enough first bytes to tell its
/// protocol.
pub(super) async fn first_bytes(stream: &TcpStream, timeout: Duration) -> Sniffed {
    match tokio::time::timeout(timeout, sniff(stream, &mut 0)).await {
        Ok(Some(protocol)) => Sniffed::Spoke(protocol),
        Ok(None) => Sniffed::Closed,
        Err(_) => Sniffed::Silent,
    }
}

/// Peeks whenever the socket becomes readable, until the bytes tell the protocol
/// (`None`: the peer closed first, or the socket failed); `peeks` counts the peeks.
///
/// Readiness is edge-triggered and a peek consumes nothing: after a peek that did not
/// decide, the readiness it saw is cleared (the closure's `WouldBlock`, see
/// `TcpStream::try_io`), so the next wait lasts until new bytes arrive. Bytes arriving
/// during the peek raise a new readiness that the clearing leaves alone.
async fn sniff(stream: &TcpStream, peeks: &mut u32) -> Option<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let ready = stream.ready(Interest::READABLE).await.ok()?;
        let peeked = stream.try_io(Interest::READABLE, || {
            *peeks += 1;
            let (n, _) = rustix::net::recv(stream, &mut buf, rustix::net::RecvFlags::PEEK)?;
            match protocol(&buf[..n]) {
                Some(protocol) => Ok(Some(protocol)),
                // The end of the stream, before or after a partial first line: the
                // request can never be complete. (Closed states stay ready, so waiting
                // on would spin.)
                None if n == 0 || ready.is_read_closed() => Ok(None),
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        });
        match peeked {
            Ok(decided) => return decided,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

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

    /// A connected pair on loopback: (the client's end, the server's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connects"), server.expect("accepts").0)
    }

    /// Bounds a step that should be quick, so a regression fails instead of hanging.
    async fn soon<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f).await.expect("in time")
    }

    #[tokio::test]
    async fn a_partial_first_line_is_peeked_once_per_arrival_not_polled() {
        let (mut client, server) = pair().await;
        soon(client.write_all(b"GET / HT")).await.expect("writes");
        let mut peeks = 0;
        // Nothing more arrives for 300 ms: the partial line is peeked once (or twice, if
        // the bytes came in two segments), then sniffing waits for readiness. A sniffer
        // that polled (a peek every few milliseconds) would have peeked dozens of times.
        let waited = tokio::time::timeout(Duration::from_millis(300), sniff(&server, &mut peeks)).await;
        assert!(waited.is_err(), "undecided yet");
        assert!((1..=2).contains(&peeks), "peeked {peeks} times");
        // The rest of the line: told at once, with one more peek per arrival.
        soon(client.write_all(b"TP/1.1\r\n")).await.expect("writes");
        let mut more = 0;
        assert_eq!(soon(sniff(&server, &mut more)).await, Some(Protocol::Http1));
        assert!((1..=3).contains(&more), "peeked {more} times");
    }

    #[tokio::test]
    async fn a_peer_that_sent_part_of_a_line_and_closed_is_let_go_at_once() {
        for partial in [&b"P"[..], &H2_PREFACE[..10], b"GET / HT", b""] {
            let (mut client, server) = pair().await;
            soon(client.write_all(partial)).await.expect("writes");
            drop(client);
            // Within the bound, far below the hour of timeout given: the end is seen.
            let sniffed = soon(first_bytes(&server, Duration::from_secs(3600))).await;
            assert_eq!(sniffed, Sniffed::Closed, "after {partial:?}");
        }
    }

    #[tokio::test]
    async fn the_preface_in_pieces_is_h2() {
        let (mut client, server) = pair().await;
        let sniffing = tokio::spawn(async move { first_bytes(&server, Duration::from_secs(3600)).await });
        for piece in H2_PREFACE.chunks(5) {
            soon(client.write_all(piece)).await.expect("writes");
            soon(client.flush()).await.expect("flushes");
        }
        assert_eq!(soon(sniffing).await.expect("sniffs"), Sniffed::Spoke(Protocol::Http2));
    }
}
