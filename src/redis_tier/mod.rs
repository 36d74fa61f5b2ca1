//! The one connection layer to Redis (docs/design.md#redis-connections) that the fleet tier
//! and the shared budget both use: one server or a managed endpoint (`redis://`,
//! `rediss://` with rustls, `unix://`), a Sentinel-managed master followed through
//! failovers, or a Redis Cluster (MOVED/ASK handled by the client); the ACL user and the
//! password from `[redis]`; every call timed in
//! `receipt_gateway_redis_call_duration_seconds{op}`.
//!
//! Connections are opened when the gateway starts, within `redis.connect_timeout_ms`
//! ([`RedisTier::open`]); a Redis that is not there is logged once and tried again in the
//! background ([`RedisTier::maintain`]), while calls fail at once (their users serve on
//! their fallbacks), so no request ever waits for a connection to be made. With Sentinel,
//! the same task asks the sentinels for the master every [`FOLLOW_EVERY`], and at once when
//! a call meets a connection error or `-READONLY`; a new master is connected, counted in
//! `receipt_gateway_redis_failovers_total` and logged once ([`RedisTier::switched_within`]
//! lets the budget hold its fallback for a window after it).
//!
//! [`Health`] is how a user of the tier marks Redis down — unreachable, hung, or
//! persistently slower than that user can wait — and takes it back when it answers in
//! time again.
//!
//! The invariant: the password is only ever handed to the redis client; it is in no log
//! line, metric or error text: a connection is described by its address alone, and a
//! configured URL is printed only through [`redact_url`](crate::config::redact_url).
//!
//! May import: `config`, `telemetry`. Imported by `fleet` and `budget` (their calls), and the
//! crate root (which builds and opens it).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{HistogramVec, IntCounter, IntGauge};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult, TlsCertificates};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{RedisConfig, RedisTopology};
use crate::telemetry::episode::Episode;

/// How often the sentinels are asked for the master when nothing went wrong.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How long after a call's trouble the sentinels are asked every [`RECONNECT_EVERY`].
const TROUBLE_MEMORY: Duration = Duration::from_secs(10);
/// How often a connection is tried while there is none.
const RECONNECT_EVERY: Duration = Duration::from_millis(200);
/// The least time between two rounds of asking the sentinels (or reconnecting).
const FOLLOW_AT_MOST_EVERY: Duration = Duration::from_millis(100);
/// How long a connection's reply may take before the connection reports an error (the
/// tier's users give up on a call much sooner).
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
/// A call slower than its user's limit this many times in a row marks Redis down ([`Health`]).
pub const SLOW_STREAK: u32 = 3;

/// The connection every call goes through: cheap to clone (a handle).
#[derive(Clone)]
pub enum Link {
    /// One server (directly, or the master Sentinel named).
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// What the `[redis]` keys say about reaching one server.
#[derive(Clone)]
struct Access {
    username: Option<String>,
    password: Option<String>,
    ca_pem: Option<Vec<u8>>,
}

impl Access {
    /// A client for `info`, with the ACL user, the password and the private CA applied.
    fn client(&self, info: ConnectionInfo) -> RedisResult<Client> {
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        let info = info.set_redis_settings(settings);
        match (&self.ca_pem, info.addr()) {
            (Some(ca), ConnectionAddr::TcpTls { .. }) => {
                Client::build_with_tls(info, TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) })
            }
            _ => Client::open(info),
        }
    }
}

/// `host:port` as a `redis://` URL; URLs as they are.
fn node_url(node: &str) -> String {
    if node.contains("://") { node.to_owned() } else { format!("redis://{node}") }
}

/// How the tier reaches Redis.
enum Target {
    Single(Client),
    Sentinel {
        sentinels: Vec<Client>,
        master: String,
        /// Whether the master is reached over TLS (the sentinels' entries are `rediss://`).
        tls: bool,
        access: Access,
    },
    Cluster {
        client: Box<ClusterClient>,
        /// Plain clients of the seed nodes, for pub/sub (a PUBLISH reaches every node).
        nodes: Vec<Client>,
    },
}

/// The Redis connection of one gateway process. Share it as `Arc<RedisTier>`.
pub struct RedisTier {
    target: Target,
    link: Mutex<Option<Link>>,
    /// With Sentinel: the master the link goes to (`host:port`) and a client for it.
    master: Mutex<Option<(String, Client)>>,
    connect_timeout: Duration,
    durations: HistogramVec,
    failovers: IntCounter,
    /// A call met trouble (a connection error, `-READONLY`, a timeout): look now.
    trouble: Notify,
    /// When a call last met trouble: the sentinels are asked often for a while after.
    troubled_at: Mutex<Option<Instant>>,
    switched_at: Mutex<Option<Instant>>,
    /// No connection could be made: logged when it starts and ends.
    unreachable: Episode,
    /// Scripts loaded on every new connection, so that a first call is one round trip.
    scripts: Mutex<Vec<redis::Script>>,
}

impl RedisTier {
    /// Builds the clients `config` describes; connects nothing yet (see [`RedisTier::open`]).
    pub fn new(config: &RedisConfig, durations: HistogramVec, failovers: IntCounter) -> RedisResult<Self> {
        let access = Access {
            username: config.username.clone(),
            password: config.password.as_ref().map(|p| p.expose().to_owned()),
            ca_pem: config.ca_pem.clone(),
        };
        let target = match &config.topology {
            RedisTopology::Url(url) => Target::Single(access.client(url.as_str().into_connection_info()?)?),
            RedisTopology::Sentinel { sentinels, master } => Target::Sentinel {
                sentinels: sentinels
                    .iter()
                    .map(|s| {
                        // The sentinels are asked without the data user's ACL (see docs).
                        let plain = Access { username: None, password: None, ca_pem: access.ca_pem.clone() };
                        plain.client(node_url(s).into_connection_info()?)
                    })
                    .collect::<RedisResult<_>>()?,
                master: master.clone(),
                tls: sentinels.iter().any(|s| s.starts_with("rediss://")),
                access,
            },
            RedisTopology::Cluster(nodes) => {
                let urls: Vec<String> = nodes.iter().map(|n| node_url(n)).collect();
                let mut builder = ClusterClient::builder(urls.clone())
                    .connection_timeout(config.connect_timeout)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(1);
                if let Some(user) = &access.username {
                    builder = builder.username(user);
                }
                if let Some(password) = &access.password {
                    builder = builder.password(password);
                }
                if let Some(ca) = &access.ca_pem {
                    builder = builder.certs(TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) });
                }
                let nodes = urls
                    .iter()
                    .map(|u| access.client(u.as_str().into_connection_info()?))
                    .collect::<RedisResult<_>>()?;
                Target::Cluster { client: Box::new(builder.build()?), nodes }
            }
        };
        Ok(Self {
            target,
            link: Mutex::new(None),
            master: Mutex::new(None),
            connect_timeout: config.connect_timeout,
            durations,
            failovers,
            trouble: Notify::new(),
            troubled_at: Mutex::new(None),
            switched_at: Mutex::new(None),
            unreachable: Episode::default(),
            scripts: Mutex::new(Vec::new()),
        })
    }

    /// Scripts to load on every new connection (before the first call needs them).
    pub fn preload(&self, scripts: impl IntoIterator<Item = redis::Script>) {
        self.scripts.lock().unwrap_or_else(|p| p.into_inner()).extend(scripts);
    }

    /// Opens the connection at start, within `redis.connect_timeout_ms`; when Redis is not
    /// there, logs it once and leaves the retrying to [`RedisTier::maintain`].
    pub async fn open(&self) {
        match self.connect().await {
            Ok(()) => tracing::info!(redis = %self.describe(), "redis connected"),
            Err(e) => self.not_reached(&e),
        }
    }

    /// Keeps the connection: reconnects while there is none, and with Sentinel follows the
    /// master. Forever; owned and aborted by the gateway's task set.
    pub async fn maintain(self: std::sync::Arc<Self>) {
        loop {
            let connected = self.link.lock().map(|l| l.is_some()).unwrap_or(false);
            // Unconnected, try often: the budget and the fleet try again a second after a
            // failure, and should find the connection made by then.
            // With Sentinel, look often while calls fail: the replicas should all move
            // to a new master within moments of each other (the budget's failover window).
            let troubled =
                self.troubled_at.lock().map(|t| t.is_some_and(|t| t.elapsed() < TROUBLE_MEMORY)).unwrap_or(false);
            let wait = if connected && !troubled { FOLLOW_EVERY } else { RECONNECT_EVERY };
            let _ = tokio::time::timeout(wait, self.trouble.notified()).await;
            if !connected {
                match self.connect().await {
                    Ok(()) => {
                        if let Some(ended) = self.unreachable.end() {
                            tracing::info!(lasted_ms = ended.lasted.as_millis() as u64, redis = %self.describe(), "redis connected");
                        }
                    }
                    Err(e) => self.not_reached(&e),
                }
            } else if matches!(self.target, Target::Sentinel { .. }) {
                self.follow().await;
            }
            tokio::time::sleep(FOLLOW_AT_MOST_EVERY).await;
        }
    }

    fn not_reached(&self, e: &RedisError) {
        if self.unreachable.event() {
            tracing::warn!(
                error = %e,
                redis = %self.describe(),
                "redis not reachable; serving on the fallbacks and connecting in the background"
            );
        }
    }

    /// Where Redis is, fit to print.
    fn describe(&self) -> String {
        match &self.target {
            Target::Single(c) => match c.get_connection_info().addr() {
                ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}"),
                ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}"),
                ConnectionAddr::Unix(path) => format!("unix://{}", path.display()),
                _ => "redis".to_owned(),
            },
            Target::Sentinel { master, .. } => {
                let at = self.master.lock().ok().and_then(|m| m.as_ref().map(|(a, _)| a.clone()));
                format!("sentinel master {master:?} at {}", at.as_deref().unwrap_or("(unknown)"))
            }
            Target::Cluster { nodes, .. } => format!("cluster of {} seed nodes", nodes.len()),
        }
    }

    /// Makes the connection, within the connect timeout.
    async fn connect(&self) -> RedisResult<()> {
        let attempt = async {
            let link = match &self.target {
                Target::Single(client) => Link::Single(self.manager(client).await?),
                Target::Cluster { client, .. } => Link::Cluster(client.get_async_connection().await?),
                Target::Sentinel { .. } => {
                    let (addr, client) = self.ask_sentinels().await?;
                    let link = Link::Single(self.manager(&client).await?);
                    *self.master.lock().unwrap_or_else(|p| p.into_inner()) = Some((addr, client));
                    link
                }
            };
            self.load_scripts(link.clone()).await;
            Ok::<_, RedisError>(link)
        };
        let link = tokio::time::timeout(self.connect_timeout, attempt).await.map_err(|_| timed_out("connecting"))??;
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(link);
        Ok(())
    }

    async fn manager(&self, client: &Client) -> RedisResult<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1);
        client.get_connection_manager_with_config(config).await
    }

    async fn load_scripts(&self, mut link: Link) {
        let scripts = self.scripts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for script in scripts {
            if let Err(e) = script.prepare_invoke().load_async(&mut link).await {
                tracing::debug!(error = %e, "redis: script not preloaded");
            }
        }
    }

    /// The master's address as the first sentinel that answers names it, and a client for it.
    async fn ask_sentinels(&self) -> RedisResult<(String, Client)> {
        let Target::Sentinel { sentinels, master, tls, access } = &self.target else {
            return Err(timed_out("asking sentinels of no sentinel setup"));
        };
        let mut last = timed_out("asking the sentinels");
        for sentinel in sentinels {
            let ask = async {
                let mut c = sentinel.get_multiplexed_async_connection().await?;
                let (host, port): (String, u16) =
                    redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(master).query_async(&mut c).await?;
                Ok::<_, RedisError>((host, port))
            };
            match tokio::time::timeout(self.connect_timeout, ask).await {
                Ok(Ok((host, port))) => {
                    let addr = if *tls {
                        ConnectionAddr::TcpTls { host: host.clone(), port, insecure: false, tls_params: None }
                    } else {
                        ConnectionAddr::Tcp(host.clone(), port)
                    };
                    let info = format!("redis://{host}:{port}").into_connection_info()?.set_addr(addr);
                    return Ok((format!("{host}:{port}"), access.client(info)?));
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = timed_out("asking a sentinel"),
            }
        }
        Err(last)
    }

    /// Asks the sentinels for the master; a new one is connected and the link moved to it.
    async fn follow(&self) {
        let Ok((addr, client)) = self.ask_sentinels().await else { return };
        let current = self.master.lock().ok().and_then(|m| m.as_ref().map(|(a, _)| a.clone()));
        if current.as_deref() == Some(addr.as_str()) {
            return;
        }
        let connected = tokio::time::timeout(self.connect_timeout, self.manager(&client)).await;
        let Ok(Ok(manager)) = connected else { return };
        let link = Link::Single(manager);
        self.load_scripts(link.clone()).await;
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(link);
        *self.master.lock().unwrap_or_else(|p| p.into_inner()) = Some((addr.clone(), client));
        *self.switched_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.failovers.inc();
        tracing::warn!(
            from = current.as_deref().unwrap_or("(none)"),
            to = %addr,
            "redis: the sentinels name a new master; following it (failover)"
        );
    }

    /// Whether the tier followed Redis to a new master within `window`.
    pub fn switched_within(&self, window: Duration) -> bool {
        self.switched_at.lock().map(|s| s.is_some_and(|t| t.elapsed() < window)).unwrap_or(false)
    }

    /// Runs one call on the link, timed as `op`. Fails at once while there is no
    /// connection. A connection error or `-READONLY` wakes [`RedisTier::maintain`].
    pub async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> RedisResult<T>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        // Observed when dropped: a call abandoned by its user counts with the time it had.
        let _timer = self.durations.with_label_values(&[op]).start_timer();
        let Some(link) = self.link.lock().ok().and_then(|l| l.clone()) else {
            // Connect now rather than at the next round (at most every FOLLOW_AT_MOST_EVERY).
            self.trouble.notify_one();
            return Err(timed_out("not connected yet"));
        };
        let result = call(link).await;
        if let Err(e) = &result
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)))
        {
            self.troubled();
        }
        result
    }

    fn troubled(&self) {
        if let Ok(mut t) = self.troubled_at.lock() {
            *t = Some(Instant::now());
        }
        self.trouble.notify_one();
    }

    /// A call took longer than its user could wait: Redis may be hung or gone (with
    /// Sentinel, the master is looked up again).
    pub fn suspect(&self) {
        self.troubled();
    }

    /// A pub/sub connection: to the server, the current master, or a cluster node (a
    /// `PUBLISH` reaches every node of a cluster).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let clients: Vec<Client> = match &self.target {
            Target::Single(client) => vec![client.clone()],
            Target::Sentinel { .. } => {
                self.master.lock().ok().and_then(|m| m.as_ref().map(|(_, c)| c.clone())).into_iter().collect()
            }
            Target::Cluster { nodes, .. } => nodes.clone(),
        };
        let mut last = timed_out("no master known yet");
        for client in clients {
            match tokio::time::timeout(self.connect_timeout, client.get_async_pubsub()).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(e)) => last = e,
                Err(_) => last = timed_out("connecting for pub/sub"),
            }
        }
        Err(last)
    }
}

fn timed_out(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// One user's view of whether Redis is usable (the fleet tier's, the budget's): up while
/// it answers in time; marked down by a failure or by [`SLOW_STREAK`] calls in a row
/// slower than the user can wait (a hung Redis, one a proxy or a far zone slows), and
/// then skipped for `retry` before one call tries it again. The gauge
/// (`*_backend_up`) follows; the episode is logged by the user when it starts and ends.
pub struct Health {
    up: IntGauge,
    pub outage: Episode,
    retry: Duration,
    state: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    down_until: Option<Instant>,
    slow: u32,
}

impl Health {
    pub fn new(up: IntGauge, retry: Duration) -> Self {
        Self { up, outage: Episode::default(), retry, state: Mutex::new(HealthState::default()) }
    }

    /// Whether to call Redis now (not marked down, or its retry time has come).
    pub fn usable(&self) -> bool {
        self.state.lock().map(|s| s.down_until.is_none_or(|t| Instant::now() >= t)).unwrap_or(true)
    }

    /// Redis answered in time: up. Returns the outage this ends, if any, to log.
    pub fn answered(&self) -> Option<crate::telemetry::episode::Ended> {
        if let Ok(mut s) = self.state.lock() {
            s.slow = 0;
            s.down_until = None;
        }
        self.up.set(1);
        self.outage.end()
    }

    /// Redis failed: marked down. True when this starts an outage (the moment to log it).
    pub fn failed(&self) -> bool {
        if let Ok(mut s) = self.state.lock() {
            s.down_until = Some(Instant::now() + self.retry);
        }
        self.up.set(0);
        self.outage.event()
    }

    /// A call took longer than the user could wait: after [`SLOW_STREAK`] in a row (or
    /// the first since Redis was marked down), marked down like a failure. True when this
    /// starts an outage.
    pub fn slow(&self) -> bool {
        let down = self.state.lock().map(|mut s| {
            s.slow = s.slow.saturating_add(1);
            s.slow >= SLOW_STREAK
        });
        if down.unwrap_or(true) { self.failed() } else { false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slow_calls_in_a_row_mark_redis_down_and_one_answer_in_time_takes_it_back() {
        let up = IntGauge::new("up", "up").unwrap();
        up.set(1);
        let health = Health::new(up.clone(), Duration::from_secs(1));
        assert!(!health.slow());
        assert!(!health.slow());
        assert!(health.usable());
        assert!(health.slow(), "the third slow call in a row starts the outage");
        assert_eq!(up.get(), 0);
        assert!(!health.usable());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(health.usable(), "tried again after the retry time");
        assert!(!health.slow(), "still slow: down again, the same outage");
        assert!(!health.usable());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(health.answered().is_some_and(|e| e.events == 2));
        assert_eq!(up.get(), 1);
        assert!(!health.slow(), "a streak starts over after an answer in time");
    }

    #[test]
    fn a_password_in_a_url_is_never_printed() {
        use crate::config::redact_url;
        assert_eq!(
            redact_url("rediss://gateway:s3cret@redis.internal:6380/0"),
            "rediss://gateway:***@redis.internal:6380/0"
        );
        assert_eq!(redact_url("redis://:s3cret@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("unix:///run/redis.sock"), "unix:///run/redis.sock");
    }
}
