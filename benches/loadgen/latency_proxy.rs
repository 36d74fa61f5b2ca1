//! `--redis-delay-ms`: a TCP proxy on 127.0.0.1:0 in front of the private redis-server's
//! Unix socket that holds every chunk it forwards, in each direction, for half the given
//! round trip before passing it on (in order, without holding chunks back behind each
//! other: latency, not a bandwidth limit). The fleet's replicas reach Redis through it, as
//! they would a managed Redis in another zone; the loadgen's own commands (FLUSHALL,
//! DBSIZE) do not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::Result;

pub struct LatencyProxy {
    url: String,
    accept: JoinHandle<()>,
}

impl LatencyProxy {
    /// Listens on a free loopback port, forwarding to `socket` with `round_trip` added.
    pub async fn start(socket: &Path, round_trip: Duration) -> Result<LatencyProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("redis://{}", listener.local_addr()?);
        let socket: PathBuf = socket.to_owned();
        let each_way = round_trip / 2;
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let socket = socket.clone();
                connections.spawn(async move {
                    let Ok(server) = UnixStream::connect(&socket).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        delayed(client_read, server_write, each_way),
                        delayed(server_read, client_write, each_way)
                    );
                });
            }
        });
        Ok(LatencyProxy { url, accept })
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn delayed(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, delay: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        // The accept task owns the connections: aborting it drops them.
        self.accept.abort();
    }
}
