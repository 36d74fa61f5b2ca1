//! The fleet's shared tier: a private `redis-server` (no port, no persistence) on a Unix
//! socket in a temporary directory, started once for the whole benchmark when
//! `--replicas` is above 1 and killed at the end (or when the benchmark bails out). Each
//! fleet run gets a fresh key prefix, and the server is flushed before it, so no run reads
//! an earlier one's state.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::Result;
use crate::gateway::{self, SharedTier};
use crate::latency_proxy::LatencyProxy;

const READY_WITHIN: Duration = Duration::from_secs(10);
/// Every command to the private server is local and small.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// `sun_path` holds 108 bytes on Linux, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

pub struct RedisServer {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    url: String,
    client: redis::Client,
    keep_dir: bool,
    /// With `--redis-delay-ms`: what the replicas connect to instead of the socket.
    proxy: Option<LatencyProxy>,
}

impl RedisServer {
    /// Starts `bin` on `<temp dir>/redis.sock` and waits until it answers PING.
    pub async fn start(bin: &Path, keep_temp: bool) -> Result<RedisServer> {
        let dir = gateway::temp_dir()?;
        let socket = dir.join("redis.sock");
        let log = dir.join("redis.log");
        let url = format!("unix://{}", socket.display());
        let spawned = redis::Client::open(url.as_str())
            .map_err(|e| format!("bad Redis URL {url}: {e}").into())
            .and_then(|client| Ok((client, spawn(bin, &dir, &socket, &log)?)));
        let (client, child) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut server = RedisServer { child, dir, socket, log, url, client, keep_dir: keep_temp, proxy: None };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut last_error = String::from("no answer yet");
        while started.elapsed() < READY_WITHIN {
            if let Some(status) = self.child.try_wait()? {
                return Err(self.failure(&format!("redis-server exited ({status}) before it answered PING")));
            }
            match self.command::<String>(redis::cmd("PING")).await {
                Ok(pong) if pong == "PONG" => return Ok(()),
                Ok(other) => last_error = format!("PING answered {other:?}"),
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(self.failure(&format!("redis-server did not answer PING within {READY_WITHIN:?} ({last_error})")))
    }

    /// An error with the end of the server's log; the directory is kept for a look.
    fn failure(&mut self, what: &str) -> crate::Error {
        self.keep_dir = true;
        format!("{what}; log {}:\n{}", self.log.display(), gateway::log_tail(&self.log)).into()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// From now on the replicas reach this server through a proxy adding `round_trip` to
    /// every round trip (`--redis-delay-ms`).
    pub async fn delay(&mut self, round_trip: Duration) -> Result<()> {
        let proxy = LatencyProxy::start(&self.socket, round_trip).await?;
        println!(
            "  --redis-delay-ms: the replicas reach redis-server through {} (+{round_trip:?} a round trip)",
            proxy.url()
        );
        self.proxy = Some(proxy);
        Ok(())
    }

    /// What a fleet of `replicas` shares: this server under a prefix of its own.
    pub fn tier(&self, key_prefix: String, replicas: usize) -> SharedTier {
        let url = self.proxy.as_ref().map_or(self.url.as_str(), |p| p.url()).to_owned();
        SharedTier { url, key_prefix, replicas }
    }

    /// Drops every key, so the next fleet starts from an empty shared tier.
    pub async fn flush(&self) -> Result<()> {
        self.command::<()>(redis::cmd("FLUSHALL")).await.map_err(|e| format!("Redis FLUSHALL: {e}").into())
    }

    /// How many keys the server holds.
    pub async fn key_count(&self) -> Result<u64> {
        self.command::<u64>(redis::cmd("DBSIZE")).await.map_err(|e| format!("Redis DBSIZE: {e}").into())
    }

    /// One command on a fresh connection, within [`COMMAND_TIMEOUT`].
    async fn command<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T> {
        let exchange = async {
            let mut conn: MultiplexedConnection = self.client.get_multiplexed_async_connection().await?;
            cmd.query_async::<T>(&mut conn).await
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(format!("no answer from {} within {COMMAND_TIMEOUT:?}", self.url).into()),
        }
    }
}

fn spawn(bin: &Path, dir: &Path, socket: &Path, log: &Path) -> Result<Child> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        let hint = "set TMPDIR to a shorter directory";
        return Err(format!("the socket path {} is too long for a Unix socket; {hint}", socket.display()).into());
    }
    let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(bin)
        .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocketperm", "700"])
        .arg("--unixsocket")
        .arg(socket)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| {
            let hint = "apt-get install redis-server, or name it with --redis-server";
            format!("cannot start {} ({hint}): {e}", bin.display())
        })?;
    Ok(child)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Nothing to save (no persistence): kill it outright, and make sure it is gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep_dir {
            eprintln!("  redis-server log kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs `redis-server` on the PATH, as the gateway's own Redis tests do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_private_server_answers_flushes_and_is_gone_when_dropped() {
        let server = RedisServer::start(Path::new("redis-server"), false).await.expect("redis-server starts");
        let socket = server.socket().to_path_buf();
        assert!(socket.exists());
        let mut set = redis::cmd("SET");
        set.arg("loadgen-test").arg(1);
        server.command::<()>(set).await.expect("SET");
        assert_eq!(server.key_count().await.expect("DBSIZE"), 1);
        server.flush().await.expect("FLUSHALL");
        assert_eq!(server.key_count().await.expect("DBSIZE"), 0);
        let tier = server.tier("loadgen-1-cold".into(), 3);
        assert_eq!(tier.url, format!("unix://{}", socket.display()));
        drop(server);
        assert!(!socket.exists(), "the temporary directory is removed");
    }

    #[tokio::test]
    async fn a_missing_binary_is_an_error_not_a_hang() {
        let missing = Path::new("/nonexistent/redis-server");
        let error = RedisServer::start(missing, false).await.err().expect("no server");
        assert!(error.to_string().contains("cannot start /nonexistent/redis-server"), "{error}");
    }
}
