//! The Redis-held budget (docs/design.md#budget-and-dispatch): replicas share one budget through a
//! real `redis-server` that the test starts on a private Unix socket (no port to collide on), and a
//! replica that cannot reach Redis paces itself on `fallback_per_second`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::support::{Setup, TestApp, busiest_second_sent, until, within};

/// A private redis-server, killed on drop.
pub struct RedisServer {
    child: Child,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts redis-server on `<dir>/redis.sock` and waits until it answers PING.
    pub async fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocketperm", "700"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it with apt)");
        let server = Self { child, dir: dir.to_owned() };
        let client = redis::Client::open(server.url()).unwrap();
        within(async {
            loop {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        server
    }

    pub fn url(&self) -> String {
        socket_url(&self.dir)
    }
}

/// The fleet's budget grants for one key, on Redis's clock (µs since the Unix epoch), read
/// from `MONITOR`: the GCRA script (src/budget/mod.rs) SETs its key to `tat:grants` once per
/// call that took grants (a lease of one or more), and the count says how many it took.
/// Each grant is placed at its theoretical arrival time: the lease's new `tat` less one
/// interval per grant after it. These are what the fleet's budget decides, on the clock it
/// decides by; when the calls then reach the simulator is up to the machine.
pub struct Grants {
    key: String,
    /// The pacing interval of the budget, in µs.
    interval_us: u64,
    /// Every line MONITOR sent so far.
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
    /// Where ECHO markers are sent from (see [`Grants::until_now`]).
    client: redis::Client,
}

impl RedisServer {
    /// Starts watching the grants of the budget held under `key`, of `per_second`.
    pub async fn grants(&self, key: &str, per_second: u32) -> Grants {
        let rate = std::num::NonZeroU32::new(per_second).expect("a budget of at least 1/s");
        let interval_us = receipt_gateway::budget::pacing_interval(rate).as_nanos().div_ceil(1000) as u64;
        let socket = self.dir.join("redis.sock");
        let mut stream = within(tokio::net::UnixStream::connect(&socket)).await.expect("redis answers");
        within(stream.write_all(b"MONITOR\r\n")).await.expect("MONITOR sent");
        let mut reader = BufReader::new(stream);
        let mut ok = String::new();
        within(reader.read_line(&mut ok)).await.expect("MONITOR answered");
        assert_eq!(ok.trim_end(), "+OK", "MONITOR");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        let reader = tokio::spawn(async move {
            let mut lines = reader.lines();
            while let Ok(Some(line)) = lines.next_line().await {
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Grants { key: key.to_owned(), interval_us, lines, reader, client: redis::Client::open(self.url()).unwrap() }
    }
}

impl Grants {
    /// Every grant so far, in order: a marker sent now through another connection is
    /// shown by MONITOR after every command Redis ran before it.
    pub async fn until_now(&self) -> Vec<u64> {
        static MARKERS: AtomicUsize = AtomicUsize::new(0);
        let marker = format!("grants-marker-{}", MARKERS.fetch_add(1, Ordering::Relaxed));
        let mut conn = within(self.client.get_multiplexed_async_connection()).await.expect("redis answers");
        let echoed: String = within(redis::cmd("ECHO").arg(&marker).query_async(&mut conn)).await.expect("ECHO");
        assert_eq!(echoed, marker);
        let quoted = format!("\"{marker}\"");
        until(|| self.lines.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|l| l.contains(&quoted))).await;
        let set = format!(" lua] \"SET\" \"{}\" \"", self.key);
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let mut grants = Vec::new();
        let mut count = 0;
        for line in lines.iter().take_while(|l| !l.contains(&quoted)) {
            let Some((_, value)) = line.split_once(&set) else { continue };
            let value = value.split('"').next().unwrap_or_default();
            let (tat, total) =
                value.split_once(':').unwrap_or_else(|| panic!("a budget value without its count: {line}"));
            let (tat, total): (u64, u64) = (tat.parse().unwrap(), total.parse().unwrap());
            // A smaller count: the key expired (the fleet was idle) and started over.
            let taken = if total > count { total - count } else { total };
            count = total;
            grants.extend((1..=taken).rev().map(|k| tat - k * self.interval_us));
        }
        grants
    }
}

impl Drop for Grants {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn socket_url(dir: &Path) -> String {
    format!("unix://{}", dir.join("redis.sock").display())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("receipt-gateway-redis-{}-{name}", std::process::id()))
}

fn redis_config(url: &str, per_second: u32, fallback: u32) -> String {
    format!(
        "[budget]\nbackend = \"redis\"\nper_second = {per_second}\nfallback_per_second = {fallback}\n\
         [redis]\nurl = \"{url}\"\nkey_prefix = \"test-{}\"\n",
        std::process::id()
    )
}

/// Fires `n` requests for distinct groups at `app`; how many were answered 200.
async fn burst(app: &TestApp, tag: &str, n: usize) -> usize {
    let headers = [("x-request-timeout-ms", "1500")];
    let tasks: Vec<_> =
        (0..n).map(|i| app.post_in_background(crate::support::body(&format!("g-{tag}-{i}"), &[1]), &headers)).collect();
    let mut ok = 0;
    for task in tasks {
        if within(task).await.unwrap() == Some(StatusCode::OK) {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_redis_budget() {
    let dir = scratch("shared");
    let redis = RedisServer::start(&dir).await;
    let grants =
        redis.grants(&format!("test-{}:{}:get_group_msg_receipt", std::process::id(), crate::support::APP), 10).await;
    let sections = redis_config(&redis.url(), 10, 5);
    let one = TestApp::spawn_with(Setup { sim_limit: 1000, ..Setup::sections(&sections) }).await;
    let two = TestApp::spawn_with(Setup {
        shared_sim: Some((one.sim.clone(), one.sim_url.clone())),
        ..Setup::sections(&sections)
    })
    .await;

    let (a, b) = tokio::join!(burst(&one, "a", 20), burst(&two, "b", 20));
    // Every request answered: no more tokens are taken for them.
    let granted = grants.until_now().await;
    let calls = one.sim.call_count();

    // Two local budgets would have granted 20 tokens a second; one shared budget grants
    // at most 10, on Redis's clock.
    let busiest = crate::support::busiest_second(&granted);
    assert!(busiest <= 10, "Redis granted {busiest} tokens in one second to both replicas");
    assert!(a > 0 && b > 0, "both replicas were served: {a} + {b}");
    assert!(calls >= a + b);
    // The tokens came from Redis. (Not necessarily all: a Redis answer slower than 250 ms
    // puts a replica on its fallback for a second, by design.)
    assert!(!granted.is_empty(), "{calls} calls, no token from Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_replica_paces_on_its_fallback_and_recovers_when_redis_returns() {
    let dir = scratch("outage");
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(dir.join("redis.sock"));
    let app =
        TestApp::spawn_with(Setup { sim_limit: 1000, ..Setup::sections(&redis_config(&socket_url(&dir), 40, 4)) })
            .await;

    let during_outage = burst(&app, "down", 20).await;
    // By the gateway's send instants (arrivals at the simulator are the machine's doing).
    let outage_peak = busiest_second_sent(&app.sim.calls());
    let up_during_outage = app.metric("receipt_gateway_budget_backend_up").await;
    let redis = RedisServer::start(&dir).await;
    // The replica retries Redis a second after its last failure: wait until a call's
    // token came from Redis again (its budget key exists).
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    within(async {
        for i in 0.. {
            app.post(&crate::support::body(&format!("g-probe-{i}"), &[1])).await;
            let keys: Vec<String> = redis::cmd("KEYS").arg("test-*").query_async(&mut conn).await.unwrap();
            if !keys.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    app.sim.reset_calls();
    let recovered = burst(&app, "up", 20).await;
    let recovered_peak = busiest_second_sent(&app.sim.calls());
    let keys: Vec<String> = redis::cmd("KEYS").arg("test-*").query_async(&mut conn).await.unwrap();
    let up_after = app.metric("receipt_gateway_budget_backend_up").await;

    assert!(during_outage > 0, "served during the outage");
    assert!(outage_peak <= 4, "{outage_peak} calls in a second on a fallback of 4");
    assert!(recovered_peak > 4 && recovered_peak <= 40, "{recovered_peak} calls in a second after recovery");
    assert_eq!(recovered, 20);
    assert!(!keys.is_empty(), "the budget lives in Redis again");
    assert_eq!((up_during_outage, up_after), (0.0, 1.0), "receipt_gateway_budget_backend_up follows Redis");
}
