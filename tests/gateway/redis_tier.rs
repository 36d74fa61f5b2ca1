//! Redis as companies run it (docs/design.md#redis-connections), with real servers started
//! here on free ports: TLS with an ACL user and the default user off; a Redis down at
//! start; a slowed (proxy) and a hung (SIGSTOP) Redis marked down and taken back; a
//! Sentinel failover under load, with the budget kept. Gateways run as processes
//! ([`Replica`]), so their logs and environment are their own.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::fleet::{Fixture, Replica, metric, post};
use crate::support::{LatencyProxy, body, busiest_second_sent, heavy, within};

const BUDGET_UP: &str = "receipt_gateway_budget_backend_up";
const FLEET_UP: &str = "receipt_gateway_fleet_backend_up";
const FAILOVERS: &str = "receipt_gateway_redis_failovers_total";
const PASSWORD: &str = "acl-pass-7f3a9c1e5b";

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A redis-server on a TCP port (killed on drop).
pub struct TcpRedis {
    child: Child,
    pub port: u16,
}

impl TcpRedis {
    /// Starts `redis-server` with `args` (after the common ones) and `--port port`, unless
    /// `args` sets the ports itself.
    pub fn spawn(dir: &Path, port: u16, args: &[String]) -> TcpRedis {
        std::fs::create_dir_all(dir).unwrap();
        let mut command = Command::new("redis-server");
        if !args.iter().any(|a| a == "--port") {
            command.args(["--port", &port.to_string()]);
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(args)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it with apt)");
        TcpRedis { child, port }
    }

    /// Starts a plain server and waits until it answers PING.
    pub async fn start(dir: &Path) -> TcpRedis {
        let server = Self::spawn(dir, free_port(), &[]);
        until_cli(server.port, &["ping"], "PONG").await;
        server
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().expect("kill runs");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for TcpRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `redis-cli -p port args…` prints `expected`.
pub async fn until_cli(port: u16, args: &[&str], expected: &str) {
    within(async {
        loop {
            if cli(port, args).contains(expected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("receipt-gateway-tier-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Fleet and budget on Redis, with `redis` the `[redis]` keys.
fn sections(per_second: u32, fallback: u32, redis: &str) -> String {
    format!(
        "[budget]\nbackend = \"redis\"\nper_second = {per_second}\nfallback_per_second = {fallback}\n\
         [fleet]\nbackend = \"redis\"\n[redis]\n{redis}\n"
    )
}

/// Posts one request for a fresh group at a time until `sample` reads `value` on `replica`;
/// every answer must be 200 (served, from Redis or on the fallback). Returns how long it took.
async fn until_metric_posting(f: &Fixture, replica: &Replica, sample: &str, value: f64, tag: &str) -> Duration {
    let started = Instant::now();
    within(async {
        for i in 0.. {
            let reply = f.post(replica, &body(&format!("{tag}-{i}"), &[1]), &[]).await;
            assert_eq!(reply.status, StatusCode::OK, "answered while Redis is {tag}");
            if metric(&f.client, replica, sample).await == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    started.elapsed()
}

/// A CA and a server certificate for `localhost` / 127.0.0.1, made with the openssl CLI.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[&["req", "-x509"], &ec[..], &["-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca", "-days", "2"]]
        .concat());
    run(&[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]].concat());
    std::fs::write(dir.join("san.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_an_acl_user_with_the_password_from_the_environment_and_never_printed() {
    let f = Fixture::new("tls", 1000).await;
    let dir = scratch("tls");
    certificates(&dir);
    let port = free_port();
    let path = |name: &str| dir.join(name).display().to_string();
    let args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &path("server.crt"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.crt"),
        "--tls-auth-clients",
        "no",
    ]
    .map(str::to_owned)
    .to_vec();
    let _redis = TcpRedis::spawn(&dir, port, &args);
    let tls = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &path("ca.crt"), "-h", "localhost", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    within(async {
        while !tls(&["ping"]).contains("PONG") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(tls(&["ACL", "SETUSER", "gateway", "on", &format!(">{PASSWORD}"), "~*", "&*", "+@all"]).contains("OK"));
    assert!(tls(&["ACL", "SETUSER", "default", "off"]).contains("OK"));
    let as_gateway =
        |args: &[&str]| tls(&[&["--user", "gateway", "--pass", PASSWORD, "--no-auth-warning"], args].concat());

    let redis = format!(
        "url = \"rediss://localhost:{port}/0\"\nusername = \"gateway\"\npassword_env = \"REDIS_TEST_PASSWORD\"\n\
         ca_file = \"{}\"\n",
        path("ca.crt")
    );
    let replica = Replica::start_with_env(
        &f.dir,
        "tls",
        &f.sim_url,
        &sections(40, 10, &redis),
        "debug",
        &[("REDIS_TEST_PASSWORD", PASSWORD)],
    );
    let reply = f.post(&replica, &body("g-tls", &[1, 2]), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(metric(&f.client, &replica, BUDGET_UP).await, 1.0, "the budget's tokens come over TLS");
    assert_eq!(metric(&f.client, &replica, FLEET_UP).await, 1.0, "the fleet tier works over TLS");
    let keys = as_gateway(&["--scan", "--pattern", "receipt-gateway:*"]);
    assert!(keys.lines().count() >= 2, "the budget and the group's keys are in Redis: {keys:?}");

    // The password is in no log line, no metric, and not in check-config's output.
    let metrics = {
        let request = http::Request::get(format!("{}/metrics", replica.admin))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let response = within(f.client.request(request)).await.unwrap();
        let bytes = within(http_body_util::BodyExt::collect(response.into_body())).await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    assert!(metrics.contains("receipt_gateway_redis_call_duration_seconds_count{op=\"claim\"}"));
    assert!(!metrics.contains(PASSWORD));
    assert!(replica.lines() > 3 && !replica.logged(PASSWORD), "the password is in no log line");
    let in_url = dir.join("url.toml");
    std::fs::write(
        &in_url,
        std::fs::read_to_string(&replica.config).unwrap().replace(
            &format!("rediss://localhost:{port}/0"),
            &format!("rediss://gateway:{PASSWORD}@localhost:{port}/0"),
        ),
    )
    .unwrap();
    for config in [&replica.config, &in_url] {
        let out = Command::new(env!("CARGO_BIN_EXE_receipt-gateway"))
            .args(["check-config", "--config"])
            .arg(config)
            .env("REDIS_TEST_PASSWORD", PASSWORD)
            .env("FLEET_TEST_KEY", "k")
            .output()
            .expect("check-config runs");
        let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{printed}");
        assert!(printed.contains("redis=") && !printed.contains(PASSWORD), "{printed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowed_or_hung_redis_is_marked_down_served_around_and_taken_back() {
    let f = Fixture::new("slow", 1000).await;
    let dir = scratch("slow");
    let redis = TcpRedis::start(&dir).await;
    let proxy = LatencyProxy::start(redis.addr(), Duration::ZERO).await;
    let url = format!("url = \"redis://{}/0\"\n", proxy.addr);
    let replica = Replica::start_logging(&f.dir, "slow", &f.sim_url, &sections(200, 100, &url), "info");
    assert_eq!(f.post(&replica, &body("warm", &[1]), &[]).await.status, StatusCode::OK);
    for sample in [FLEET_UP, BUDGET_UP] {
        assert_eq!(metric(&f.client, &replica, sample).await, 1.0);
    }

    // 600 ms more per round trip: past what the fleet tier (15 ms) and the budget
    // (redis_call_timeout, 500 ms) can use.
    proxy.set_delay(Duration::from_millis(300));
    let fleet_down = until_metric_posting(&f, &replica, FLEET_UP, 0.0, "slow").await;
    let budget_down = until_metric_posting(&f, &replica, BUDGET_UP, 0.0, "slow").await;
    assert!(fleet_down < Duration::from_secs(5) && budget_down < Duration::from_secs(5));
    assert_eq!(replica.count("redis too slow"), 1, "logged once");
    proxy.set_delay(Duration::ZERO);
    until_metric_posting(&f, &replica, FLEET_UP, 1.0, "fast").await;
    until_metric_posting(&f, &replica, BUDGET_UP, 1.0, "fast").await;

    redis.signal("-STOP");
    until_metric_posting(&f, &replica, FLEET_UP, 0.0, "hung").await;
    until_metric_posting(&f, &replica, BUDGET_UP, 0.0, "hung").await;
    redis.signal("-CONT");
    until_metric_posting(&f, &replica, FLEET_UP, 1.0, "back").await;
    until_metric_posting(&f, &replica, BUDGET_UP, 1.0, "back").await;
    let durations = "receipt_gateway_redis_call_duration_seconds_count{op=\"budget\"}";
    assert!(metric(&f.client, &replica, durations).await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_down_at_start_delays_nothing_and_is_joined_when_it_comes() {
    let f = Fixture::new("late", 1000).await;
    let dir = scratch("late");
    let port = free_port();
    let url = format!("url = \"redis://127.0.0.1:{port}/0\"\nconnect_timeout_ms = 200\n");
    let started = Instant::now();
    let replica = Replica::start_logging(&f.dir, "late", &f.sim_url, &sections(200, 100, &url), "info");
    assert!(started.elapsed() < Duration::from_secs(5), "serving without waiting for Redis");
    assert_eq!(f.post(&replica, &body("alone", &[1]), &[]).await.status, StatusCode::OK);
    assert_eq!(replica.count("redis not reachable"), 1, "logged once");
    let _redis = TcpRedis::spawn(&dir, port, &[]);
    until_metric_posting(&f, &replica, FLEET_UP, 1.0, "joined").await;
    until_metric_posting(&f, &replica, BUDGET_UP, 1.0, "joined").await;

    // A fresh replica's connection is open (and its scripts loaded) before its first
    // request: that request's Redis round trip is within the call timeout, so its misses
    // are claimed in Redis (`miss`), not fetched alone.
    let fresh = Replica::start_logging(&f.dir, "fresh", &f.sim_url, &sections(200, 100, &url), "info");
    assert_eq!(f.post(&fresh, &body("fresh", &[1, 2, 3]), &[]).await.status, StatusCode::OK);
    let missed = "receipt_gateway_fleet_items_total{app=\"1400000000\",source=\"miss\"}";
    assert_eq!(metric(&f.client, &fresh, missed).await, 3.0);
}

/// A master, a replica of it and three sentinels, on free ports.
struct Sentinels {
    master: TcpRedis,
    _replica: TcpRedis,
    sentinels: Vec<TcpRedis>,
}

impl Sentinels {
    async fn start(dir: &Path) -> Sentinels {
        let master = TcpRedis::start(&dir.join("master")).await;
        let replica_port = free_port();
        let replica = TcpRedis::spawn(
            &dir.join("replica"),
            replica_port,
            &["--replicaof".into(), "127.0.0.1".into(), master.port.to_string()],
        );
        until_cli(replica_port, &["info", "replication"], "master_link_status:up").await;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let sdir = dir.join(format!("sentinel-{i}"));
            std::fs::create_dir_all(&sdir).unwrap();
            let conf = sdir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    master.port
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .args(["--sentinel", "--dir"])
                .arg(&sdir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs as a sentinel");
            sentinels.push(TcpRedis { child, port });
        }
        for s in &sentinels {
            until_cli(s.port, &["sentinel", "ckquorum", "mymaster"], "OK 3 usable").await;
            until_cli(s.port, &["sentinel", "replicas", "mymaster"], &replica_port.to_string()).await;
        }
        Sentinels { master, _replica: replica, sentinels }
    }

    fn config(&self) -> String {
        let list: Vec<String> = self.sentinels.iter().map(|s| format!("\"127.0.0.1:{}\"", s.port)).collect();
        format!("sentinels = [{}]\nsentinel_master = \"mymaster\"\n", list.join(", "))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_keeps_the_budget_and_both_replicas_rejoin() {
    let _heavy = heavy().await;
    let f = Fixture::new("sentinel", 1000).await;
    let dir = scratch("sentinel");
    let setup = Sentinels::start(&dir).await;
    let config = sections(40, 10, &setup.config());
    let a = Replica::start_logging(&f.dir, "a", &f.sim_url, &config, "info");
    let b = Replica::start_logging(&f.dir, "b", &f.sim_url, &config, "info");
    for r in [&a, &b] {
        assert_eq!(f.post(r, &body("warm", &[1]), &[]).await.status, StatusCode::OK);
    }

    // Load: four callers per replica, each asking a fresh group at a time (every request
    // a miss), more than the budget allows.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for (r, url) in [("a", a.url.clone()), ("b", b.url.clone())] {
        for c in 0..4 {
            let (client, url, stop) = (f.client.clone(), url.clone(), stop.clone());
            callers.spawn(async move {
                let mut statuses = Vec::new();
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let asked = Instant::now();
                    let headers = [("x-request-timeout-ms", "1000")];
                    let reply = post(&client, &url, &body(&format!("load-{r}-{c}-{i}"), &[1, 2]), &headers).await;
                    assert!(asked.elapsed() < Duration::from_secs(3), "answered by its deadline, no hang");
                    statuses.push(reply.status.as_u16());
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                statuses
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    setup.master.signal("-KILL");
    let killed = Instant::now();
    within(async {
        loop {
            let mut rejoined = true;
            for r in [&a, &b] {
                rejoined &= metric(&f.client, r, FAILOVERS).await >= 1.0
                    && metric(&f.client, r, BUDGET_UP).await == 1.0
                    && metric(&f.client, r, FLEET_UP).await == 1.0;
            }
            if rejoined {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let rejoin = killed.elapsed();
    // Load goes on past the failover window on the new master.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(done) = callers.join_next().await {
        for s in done.expect("a caller finished") {
            *statuses.entry(s).or_insert(0) += 1;
        }
    }
    let busiest = busiest_second_sent(&f.sim.calls());
    eprintln!("failover: busiest rolling second {busiest} calls, answers {statuses:?}, rejoined in {rejoin:?}");
    assert!(busiest <= 40, "{busiest} calls in one rolling second, over budget.per_second = 40");
    assert!(statuses.keys().all(|s| *s == 200 || *s == 429), "only 200 (fresh or stale) and 429: {statuses:?}");
    assert!(rejoin < Duration::from_secs(20), "rejoined in {rejoin:?}");
    for r in [&a, &b] {
        assert_eq!(r.count("following it (failover)"), 1, "the switch is logged once");
    }
}
