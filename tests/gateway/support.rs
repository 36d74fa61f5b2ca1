//! Spawns the real gateway on 127.0.0.1:0 in front of the simulator on 127.0.0.1:0, and a
//! client to talk to it. Every network await is bounded by [`WAIT`].

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use receipt_gateway::config::{Config, SecretSource};
use receipt_gateway::simulator::{CallRecord, SimApp, SimOptions, Simulator};
use receipt_gateway::tencent::domain::AppId;
use receipt_gateway::tencent::usersig::SecretKey;
use receipt_gateway::{Listeners, RunError};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const APP: u64 = 1_400_000_000;
pub const APP2: u64 = 1_400_000_001;
pub const RECEIPT: &str = "/v4/group_open_http_svc/get_group_msg_receipt";
/// The longest any single network step may take before a test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(20);

const KEY: &str = "test-key-of-app-one";
const KEY2: &str = "test-key-of-app-two";
/// The bearer token of the test config's `billing` client.
pub const BILLING_TOKEN: &str = "billing-secret-token-0123";

/// The callback token of Tencent's documented Sign example (`apps.callback_token_env =
/// "CALLBACK_TOKEN"`).
pub const CALLBACK_TOKEN: &str = "xxxxyyyy";

/// Secrets for the test config: each app's key under its own variable, and the test's
/// own environment (`HTTPS_PROXY`, ...: tests share one process, so they never set its
/// variables). Files are read for real only if they end in `.pem` (`upstream.ca_file`).
#[derive(Default)]
pub struct TestSecrets {
    pub env: Vec<(&'static str, String)>,
}

impl SecretSource for TestSecrets {
    fn env(&self, name: &str) -> Option<String> {
        match name {
            "KEY_ONE" => Some(KEY.into()),
            "KEY_TWO" => Some(KEY2.into()),
            "BILLING_TOKEN" => Some(BILLING_TOKEN.into()),
            "CALLBACK_TOKEN" => Some(CALLBACK_TOKEN.into()),
            _ => self.env.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()),
        }
    }

    fn file(&self, path: &Path) -> std::io::Result<String> {
        if path.extension().is_some_and(|e| e == "pem") {
            return std::fs::read_to_string(path);
        }
        Err(std::io::Error::new(std::io::ErrorKind::NotFound, path.display().to_string()))
    }
}

/// What to start: config sections for the gateway and the simulator's limits.
pub struct Setup {
    /// TOML sections ([server], [cache], ...) placed before the apps.
    pub sections: String,
    pub two_apps: bool,
    pub sim_limit: u32,
    pub sim_max_seqs: usize,
    /// Another gateway's simulator to share (a second replica), instead of a new one.
    pub shared_sim: Option<(Simulator, String)>,
    /// The simulator on a thread and runtime of its own, as Tencent runs on machines of
    /// its own: the arrivals it counts are then stamped when they arrive, not when a
    /// runtime shared with a burst of the test's and the gateway's tasks gets to them
    /// (which bunches them and can show 201 calls in a second of its clock that the
    /// gateway sent at 194 a second).
    pub sim_thread: bool,
    /// More keys for the first app (`callbacks = true`, ...).
    pub app: String,
    /// The first app's `endpoint`, instead of the simulator's URL.
    pub endpoint: Option<String>,
    /// The environment the configuration is resolved with (`HTTPS_PROXY`, ...).
    pub env: Vec<(&'static str, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            sections: String::new(),
            two_apps: false,
            sim_limit: 200,
            sim_max_seqs: 50,
            shared_sim: None,
            sim_thread: false,
            app: String::new(),
            endpoint: None,
            env: Vec::new(),
        }
    }
}

impl Setup {
    pub fn sections(sections: &str) -> Self {
        Self { sections: sections.into(), ..Self::default() }
    }
}

/// A running gateway and simulator. Dropping it stops both.
pub struct TestApp {
    pub url: String,
    pub admin: String,
    pub sim: Simulator,
    pub sim_url: String,
    pub client: Client<HttpConnector, Full<Bytes>>,
    stop: Option<oneshot::Sender<()>>,
    gateway: Option<JoinHandle<Result<(), RunError>>>,
    _sim_server: Option<receipt_gateway::simulator::SimServer>,
    _sim_thread: Option<SimThread>,
    _light: Option<Light>,
}

/// One answer: status, headers and the JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

/// What an answer came to: the status of the gateway's error table, which
/// `X-Gateway-Status` carries on every gateway-made error (sent as HTTP 200 by default,
/// as Tencent sends its own errors: docs/design.md#errors), else the status sent.
pub fn outcome(status: StatusCode, headers: &HeaderMap) -> StatusCode {
    let table = headers.get("x-gateway-status").and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
    match table.and_then(|t| StatusCode::from_u16(t).ok()) {
        Some(table) => {
            assert!(status == StatusCode::OK || status == table, "sent {status}, X-Gateway-Status {table}");
            table
        }
        None => status,
    }
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The answer's [`outcome`].
    pub fn outcome(&self) -> StatusCode {
        outcome(self.status, &self.headers)
    }

    pub fn code(&self) -> i64 {
        self.body["ErrorCode"].as_i64().unwrap_or(-1)
    }

    /// (MsgSeq, ReadNum, UnreadNum, Code) of each item, in order.
    pub fn items(&self) -> Vec<(u64, u64, u64, i64)> {
        self.body["GroupMsgReceiptList"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        (
                            i["MsgSeq"].as_u64().unwrap_or(u64::MAX),
                            i["ReadNum"].as_u64().unwrap_or(0),
                            i["UnreadNum"].as_u64().unwrap_or(0),
                            i["Code"].as_i64().unwrap_or(-1),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Tests that load the machine (several gateway processes, bursts of a thousand
/// requests) take it for writing, so that on a small machine nothing else starves their
/// timing: they run alone. Every other test's gateway ([`TestApp`], a
/// [`Fixture`](crate::fleet::Fixture)'s replicas, the demo's) holds it for reading.
static HEAVY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

thread_local! {
    /// Set while this thread's test holds [`HEAVY`] for writing (its own `TestApp`s must
    /// not wait for a read).
    static HOLDS_HEAVY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set while one of this thread's `TestApp`s holds [`HEAVY`] for reading: a second one
    /// must not queue behind a waiting writer (that would deadlock).
    static HOLDS_LIGHT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A light test's share of the machine.
pub struct Light {
    _share: tokio::sync::RwLockReadGuard<'static, ()>,
}

impl Drop for Light {
    fn drop(&mut self) {
        HOLDS_LIGHT.with(|h| h.set(false));
    }
}

/// A heavy test's exclusive turn.
pub struct Heavy {
    _turn: tokio::sync::RwLockWriteGuard<'static, ()>,
}

impl Drop for Heavy {
    fn drop(&mut self) {
        HOLDS_HEAVY.with(|h| h.set(false));
    }
}

pub async fn heavy() -> Heavy {
    let turn = HEAVY.write().await;
    HOLDS_HEAVY.with(|h| h.set(true));
    Heavy { _turn: turn }
}

/// A light test's share of the machine, unless its thread holds one already or is a
/// heavy test's.
pub async fn light() -> Option<Light> {
    if HOLDS_HEAVY.with(|h| h.get()) || HOLDS_LIGHT.with(|h| h.get()) {
        return None;
    }
    let share = HEAVY.read().await;
    HOLDS_LIGHT.with(|h| h.set(true));
    Some(Light { _share: share })
}

/// Bounds a future by [`WAIT`].
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("no answer within {WAIT:?}"),
    }
}

/// Waits, within [`WAIT`], until `condition` holds (polled every few milliseconds).
pub async fn until(mut condition: impl FnMut() -> bool) {
    within(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// The most of `calls` that the gateway sent within one rolling second (less than a
/// second apart, as the simulator's limiter counts), by the send stamps they carry
/// ([`SENT_AT_HEADER`](receipt_gateway::tencent::wire::SENT_AT_HEADER)). This is what the budget
/// controls: when a call arrives at the simulator depends on how a busy machine
/// schedules the delivery, and a test that counted arrivals failed on it (201 calls in a
/// second of the simulator's clock from a gateway that sent fewer than 200). Panics if a
/// call carries no stamp: every upstream call must say when it was sent.
pub fn busiest_second_sent(calls: &[CallRecord]) -> usize {
    let mut sent: Vec<u64> =
        calls.iter().map(|c| c.sent_at_us.unwrap_or_else(|| panic!("a call without a send stamp: {c:?}"))).collect();
    sent.sort_unstable();
    busiest_second(&sent)
}

/// The most of the sorted instants `us` (microseconds) that lie less than a second apart.
pub fn busiest_second(us: &[u64]) -> usize {
    let mut first = 0;
    let mut best = 0;
    for (last, t) in us.iter().enumerate() {
        while t - us[first] >= 1_000_000 {
            first += 1;
        }
        best = best.max(last + 1 - first);
    }
    best
}

/// The simulator options [`TestApp::spawn_with`] uses for one app: for a simulator a test
/// starts itself (another port, HTTPS) and hands over as [`Setup::shared_sim`].
pub fn sim_options() -> SimOptions {
    SimOptions::new(vec![SimApp { app: AppId(APP), identifier: "administrator".into(), key: SecretKey::new(KEY) }])
}

/// A port nothing listens on (bound, then let go): connections to it are refused.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A receipt body for `group` and `seqs`.
pub fn body(group: &str, seqs: &[u64]) -> String {
    let list: Vec<String> = seqs.iter().map(|s| format!(r#"{{"MsgSeq":{s}}}"#)).collect();
    format!(r#"{{"GroupId":"{group}","MsgSeqList":[{}]}}"#, list.join(","))
}

/// What the simulator answers for (group, seq) by default, as an item tuple.
pub fn expected(group: &str, seq: u64) -> (u64, u64, u64, i64) {
    let r = receipt_gateway::simulator::default_receipt(group, seq);
    (seq, r.read.unwrap_or(0), r.unread.unwrap_or(0), r.code.0)
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Setup::default()).await
    }

    pub async fn spawn_with(setup: Setup) -> Self {
        let light = light().await;
        let mut apps = vec![SimApp { app: AppId(APP), identifier: "administrator".into(), key: SecretKey::new(KEY) }];
        if setup.two_apps {
            apps.push(SimApp { app: AppId(APP2), identifier: "admin2".into(), key: SecretKey::new(KEY2) });
        }
        let options =
            SimOptions { limit_per_second: setup.sim_limit, max_seqs: setup.sim_max_seqs, ..SimOptions::new(apps) };
        let mut sim_thread = None;
        let (sim, sim_url, sim_server) = match setup.shared_sim {
            Some((sim, url)) => (sim, url, None),
            None if setup.sim_thread => {
                let (sim, url, thread) = SimThread::start(options);
                sim_thread = Some(thread);
                (sim, url, None)
            }
            None => {
                let (sim, url, server) = Simulator::spawn(options).await.expect("simulator starts");
                (sim, url, Some(server))
            }
        };
        let mut text = setup.sections.clone();
        text.push_str(&format!(
            "\n[[apps]]\nsdkappid = {APP}\nregion = \"singapore\"\nidentifier = \"administrator\"\n\
             secret_key_env = \"KEY_ONE\"\nendpoint = \"{}\"\n{}\n",
            setup.endpoint.as_deref().unwrap_or(&sim_url),
            setup.app
        ));
        if setup.two_apps {
            text.push_str(&format!(
                "\n[[apps]]\nsdkappid = {APP2}\nregion = \"tokyo\"\nidentifier = \"admin2\"\n\
                 secret_key_env = \"KEY_TWO\"\nendpoint = \"{sim_url}\"\n"
            ));
        }
        let config = Config::parse(&text, &TestSecrets { env: setup.env }).expect("test config is valid");
        let data = TcpListener::bind("127.0.0.1:0").await.expect("bind data");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let url = format!("http://{}", data.local_addr().expect("addr"));
        let admin_url = format!("http://{}", admin.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let gateway = tokio::spawn(receipt_gateway::run(config, Listeners { data, admin }, async move {
            let _ = stopped.await;
        }));
        let app = Self {
            url,
            admin: admin_url,
            sim,
            sim_url,
            client: Client::builder(TokioExecutor::new()).pool_max_idle_per_host(2048).build_http(),
            stop: Some(stop),
            gateway: Some(gateway),
            _sim_server: sim_server,
            _sim_thread: sim_thread,
            _light: light,
        };
        // As a Kubernetes Service would: callers come once it is ready (its upstream
        // connections opened, or tried).
        within(async {
            while app.admin_get("/readyz").await.0 != StatusCode::OK {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        app
    }

    /// POSTs `body` to the receipt path with `query` and extra headers.
    pub async fn post_with(&self, query: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        self.post_to(&format!("{RECEIPT}{query}"), body, headers).await
    }

    /// POSTs `body` to `path` (with its query) and extra headers.
    pub async fn post_to(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut builder = Request::post(format!("{}{path}", self.url));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(Bytes::from(body.to_owned()))).expect("request");
        self.send(request).await
    }

    /// Sends a receipt request from a task of its own (to overlap it with others, or
    /// abandon it); resolves to the answer's [`outcome`], or None if the connection failed.
    pub fn post_in_background(&self, body: String, headers: &[(&str, &str)]) -> JoinHandle<Option<StatusCode>> {
        let mut builder = Request::post(format!("{}{RECEIPT}", self.url));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(Bytes::from(body))).expect("request");
        let client = self.client.clone();
        tokio::spawn(
            async move { within(client.request(request)).await.ok().map(|r| outcome(r.status(), r.headers())) },
        )
    }

    pub async fn post(&self, body: &str) -> Reply {
        self.post_with("", body, &[]).await
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        within(async {
            let response = self.client.request(request).await.expect("gateway answers");
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = response.into_body().collect().await.expect("body").to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Reply { status, headers, body }
        })
        .await
    }

    /// GETs an admin path; (status, body text).
    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        let request = Request::get(format!("{}{path}", self.admin)).body(Full::new(Bytes::new())).expect("request");
        within(async {
            let response = self.client.request(request).await.expect("admin answers");
            let status = response.status();
            let bytes = response.into_body().collect().await.expect("body").to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        })
        .await
    }

    /// Waits, within [`WAIT`], until the metric sample reads `value`.
    pub async fn until_metric(&self, sample: &str, value: f64) {
        within(async {
            while self.metric(sample).await != value {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
    }

    /// The value of one metric sample line, e.g. `receipt_gateway_items_total{app="1",source="hit"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
    }

    /// Stops the gateway as SIGTERM would, and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(gateway) = self.gateway.take() {
            within(gateway).await.expect("gateway task").expect("gateway ran");
        }
    }

    /// Sends the stop signal without waiting (to observe draining).
    pub fn begin_stop(&mut self) -> JoinHandle<Result<(), RunError>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.gateway.take().expect("gateway still running")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.abort();
        }
    }
}

/// A simulator serving from a thread with a runtime of its own; stopped when dropped.
pub struct SimThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimThread {
    pub fn start(options: SimOptions) -> (Simulator, String, SimThread) {
        let (started, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let (sim, url, server) = Simulator::spawn(options).await.expect("simulator starts");
                let _ = started.send((sim, url));
                let _ = stopped.await;
                let _ = tokio::time::timeout(WAIT, server.shutdown()).await;
            });
        });
        let (sim, url) = ready.recv_timeout(WAIT).expect("the simulator's thread started it");
        (sim, url, SimThread { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for SimThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Not joined: a drop on a runtime thread must not block it; the thread ends on
        // its own once the server has shut down.
        drop(self.thread.take());
    }
}

/// A TCP proxy on 127.0.0.1:0 in front of a test's `redis-server` (its Unix socket or
/// its TCP address) that holds every chunk it forwards, in each direction, for a
/// settable delay before passing it on (chunks keep their order and are not held back by
/// each other: the delay adds latency, not a bandwidth limit): fault injection for a
/// Redis far away or slow. Stops accepting and drops its connections when dropped.
pub struct LatencyProxy {
    pub addr: std::net::SocketAddr,
    delay_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    accept: JoinHandle<()>,
}

impl LatencyProxy {
    /// Starts forwarding to `target` with `each_way` added in each direction.
    pub async fn start(target: impl Into<ProxyTarget>, each_way: Duration) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("addr");
        let delay_us = Arc::new(AtomicU64::new(each_way.as_micros() as u64));
        let delay = delay_us.clone();
        let target = target.into();
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let (delay, target) = (delay.clone(), target.clone());
                connections.spawn(async move {
                    let (client_read, client_write) = client.into_split();
                    match target {
                        ProxyTarget::Unix(path) => {
                            let Ok(server) = tokio::net::UnixStream::connect(&path).await else { return };
                            let (server_read, server_write) = server.into_split();
                            tokio::join!(
                                delayed(client_read, server_write, delay.clone()),
                                delayed(server_read, client_write, delay)
                            );
                        }
                        ProxyTarget::Tcp(addr) => {
                            let Ok(server) = TcpStream::connect(addr).await else { return };
                            let _ = server.set_nodelay(true);
                            let (server_read, server_write) = server.into_split();
                            tokio::join!(
                                delayed(client_read, server_write, delay.clone()),
                                delayed(server_read, client_write, delay)
                            );
                        }
                    }
                });
            }
        });

        /// Copies `from` to `to`, each chunk `delay` after it was read.
        async fn delayed(
            mut from: impl tokio::io::AsyncRead + Unpin,
            mut to: impl tokio::io::AsyncWrite + Unpin,
            delay: Arc<AtomicU64>,
        ) {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            let read = async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = from.read(&mut buf).await {
                    let due = tokio::time::Instant::now() + Duration::from_micros(delay.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
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

        Self { addr, delay_us, accept }
    }

    /// The delay added in each direction from now on (a round trip gains twice this).
    pub fn set_delay(&self, each_way: Duration) {
        self.delay_us.store(each_way.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where a [`LatencyProxy`] forwards to.
#[derive(Clone)]
pub enum ProxyTarget {
    Unix(std::path::PathBuf),
    Tcp(std::net::SocketAddr),
}

impl From<std::path::PathBuf> for ProxyTarget {
    fn from(path: std::path::PathBuf) -> Self {
        ProxyTarget::Unix(path)
    }
}

impl From<std::net::SocketAddr> for ProxyTarget {
    fn from(addr: std::net::SocketAddr) -> Self {
        ProxyTarget::Tcp(addr)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        // The accept task owns the connections' JoinSet: aborting it drops them.
        self.accept.abort();
    }
}
