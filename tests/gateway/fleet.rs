//! The fleet (docs/design.md#fleet-tier): gateway *processes* (the release of `cargo test`'s build
//! of the binary) on one real `redis-server` and one simulator behave as one gateway. Savings are
//! proven by counting the simulator's calls.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use receipt_gateway::simulator::{SimApp, SimOptions, Simulator};
use receipt_gateway::tencent::domain::AppId;
use receipt_gateway::tencent::usersig::SecretKey;
use serde_json::Value;
use tokio::time::Instant;

use crate::redis::RedisServer;
use crate::support::{
    APP, Light, RECEIPT, Reply, SimThread, body, busiest_second_sent, heavy, light, outcome, until, within,
};

const KEY: &str = "fleet-test-key";
/// The bearer token of a client some tests configure.
const TOKEN: &str = "fleet-test-bearer-token-4711";

/// One gateway process, killed (SIGKILL) on drop.
pub struct Replica {
    child: Child,
    /// Its configuration file (rewrite it and [`hangup`](Replica::hangup) to reload).
    pub config: PathBuf,
    pub url: String,
    pub admin: String,
    /// Every line it logged (JSON), for assertions about its logs.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    /// Starts the gateway binary with `sections` in front of the simulator at `sim_url`,
    /// on port 0, and waits until it says where it listens.
    pub fn start(dir: &Path, name: &str, sim_url: &str, sections: &str) -> Replica {
        Self::start_logging(dir, name, sim_url, sections, "info")
    }

    /// Like [`Replica::start`], with `RUST_LOG` set to `rust_log`.
    pub fn start_logging(dir: &Path, name: &str, sim_url: &str, sections: &str, rust_log: &str) -> Replica {
        Self::start_with_env(dir, name, sim_url, sections, rust_log, &[])
    }

    /// Like [`Replica::start_logging`], with more environment variables (its own, not
    /// the test process's).
    pub fn start_with_env(
        dir: &Path,
        name: &str,
        sim_url: &str,
        sections: &str,
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> Replica {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join(format!("{name}.toml"));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{sections}\n\
             [[apps]]\nsdkappid = {APP}\nregion = \"singapore\"\nidentifier = \"administrator\"\n\
             secret_key_env = \"FLEET_TEST_KEY\"\nendpoint = \"{sim_url}\"\n"
        );
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_receipt-gateway"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("FLEET_TEST_KEY", KEY)
            .env("FLEET_TEST_TOKEN", TOKEN)
            .env("RECEIPT_GATEWAY_LOG_FORMAT", "json")
            .env("RUST_LOG", rust_log)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the gateway binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        // Drains stdout for the process's whole life (a full pipe would block it).
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "serving"
                {
                    let _ = tx.send((v["listen"].as_str().map(str::to_owned), v["admin"].as_str().map(str::to_owned)));
                }
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let (listen, admin) = rx.recv_timeout(Duration::from_secs(20)).expect("the gateway says where it listens");
        Replica {
            child,
            config,
            url: format!("http://{}", listen.expect("listen address")),
            admin: format!("http://{}", admin.expect("admin address")),
            log,
        }
    }

    /// Whether a line it logged so far contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|l| l.contains(needle))
    }

    /// How many lines it logged so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|l| l.contains(needle)).count()
    }

    /// How many lines it logged so far.
    pub fn lines(&self) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// How many times, from its line `since` on, it logged going without Redis for a
    /// request or a call: a Redis round trip slower than the fleet's CALL_TIMEOUT (15 ms,
    /// which a busy machine exceeds) or failing. By design that request or call then
    /// acts as a lone replica would, and may cost a call of its own. Logged at debug, as
    /// `fleet…` messages: start the replica with [`Replica::start_logging`] and
    /// [`FLEET_DEBUG`].
    pub fn went_alone(&self, since: usize) -> usize {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter()
            .skip(since)
            .filter(|l| l.contains("\"level\":\"DEBUG\"") && l.contains("\"message\":\"fleet"))
            .count()
    }

    /// The process id (for reading its memory).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGHUP: reload the configuration file.
    pub fn hangup(&self) {
        let status = Command::new("kill").arg("-HUP").arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -HUP");
    }

    /// SIGKILL: no draining, no cleanup, claims left behind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A simulator serving the test app, and a client for the replicas.
pub struct Fixture {
    pub sim: Simulator,
    pub sim_url: String,
    /// Tencent's stand-in on a thread and runtime of its own, as Tencent runs on machines
    /// of its own: on the test's runtime, beside hundreds of the test's own callers, its
    /// answers can come late enough on a loaded machine for a call to miss its deadline.
    _sim: SimThread,
    /// A light test's share of the machine (none in a heavy test): its replicas are
    /// gateways too.
    _light: Option<Light>,
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub dir: PathBuf,
}

impl Fixture {
    pub async fn new(name: &str, limit: u32) -> Fixture {
        let app = SimApp { app: AppId(APP), identifier: "administrator".into(), key: SecretKey::new(KEY) };
        let options = SimOptions { limit_per_second: limit, max_seqs: 50, ..SimOptions::new(vec![app]) };
        let light = light().await;
        let (sim, sim_url, thread) = SimThread::start(options);
        let dir = std::env::temp_dir().join(format!("receipt-gateway-fleet-{}-{name}", std::process::id()));
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build_http();
        Fixture { sim, sim_url, _sim: thread, _light: light, client, dir }
    }

    /// A replica sharing `redis` (fleet and budget), with `extra` sections.
    pub fn replica(&self, name: &str, redis: &RedisServer, extra: &str) -> Replica {
        Replica::start(&self.dir, name, &self.sim_url, &fleet_sections(redis, extra))
    }

    /// Like [`Fixture::replica`], logging when it goes without Redis ([`Replica::went_alone`]).
    pub fn replica_telling(&self, name: &str, redis: &RedisServer, extra: &str) -> Replica {
        Replica::start_logging(&self.dir, name, &self.sim_url, &fleet_sections(redis, extra), FLEET_DEBUG)
    }

    pub async fn post(&self, replica: &Replica, body: &str, headers: &[(&str, &str)]) -> Reply {
        post(&self.client, &replica.url, body, headers).await
    }
}

pub async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut builder = Request::post(format!("{url}{RECEIPT}"));
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    within(async {
        let response = client.request(request).await.expect("the replica answers");
        let (status, headers) = (response.status(), response.headers().clone());
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        Reply { status, headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
    })
    .await
}

/// One sample of a replica's metrics, e.g. `receipt_gateway_inflight_requests`.
pub async fn metric(client: &Client<HttpConnector, Full<Bytes>>, replica: &Replica, sample: &str) -> f64 {
    let request = Request::get(format!("{}/metrics", replica.admin)).body(Full::new(Bytes::new())).unwrap();
    let text = within(async {
        let response = client.request(request).await.expect("admin answers");
        response.into_body().collect().await.expect("body").to_bytes()
    })
    .await;
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Waits, within the support's bound, until `sample` on `replica` reads `value`.
pub async fn until_metric(f: &Fixture, replica: &Replica, sample: &str, value: f64) {
    within(async {
        while metric(&f.client, replica, sample).await != value {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// `RUST_LOG` for replicas whose test must know when they went without Redis.
pub const FLEET_DEBUG: &str = "info,receipt_gateway=debug";

const SHARED_HIT: &str = "receipt_gateway_fleet_items_total{app=\"1400000000\",source=\"shared_hit\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_item_asked_of_three_replicas_at_once_costs_exactly_one_call() {
    let _heavy = heavy().await;
    let f = Fixture::new("once", 200).await;
    let redis = RedisServer::start(&f.dir.join("redis")).await;
    let replicas: Vec<Replica> = ["a", "b", "c"].iter().map(|n| f.replica_telling(n, &redis, "")).collect();
    // Each replica connects to Redis on first use; a first round trip slower than the
    // fleet's CALL_TIMEOUT (a freshly built binary on a busy machine) makes that request
    // go alone, by design. Warm the connections first.
    for (i, r) in replicas.iter().enumerate() {
        assert_eq!(f.post(r, &body(&format!("g-warm-{i}"), &[1]), &[]).await.outcome(), StatusCode::OK);
    }
    let warm_up = f.sim.call_count();
    let since: Vec<usize> = replicas.iter().map(Replica::lines).collect();
    f.sim.hold_calls();

    let once = body("g-once", &[7]);
    let asks = replicas.iter().map(|r| f.post(r, &once, &[("x-request-timeout-ms", "10000")]));
    let release = async {
        // One call, or more when a replica went without Redis (see below).
        until(|| f.sim.held_calls() >= 1).await;
        for r in &replicas {
            until_metric(&f, r, "receipt_gateway_inflight_requests", 1.0).await;
        }
        f.sim.release_calls();
    };
    let (replies, ()) = tokio::join!(futures_util::future::join_all(asks), release);

    for reply in &replies {
        assert_eq!(reply.outcome(), StatusCode::OK, "{reply:?}");
        assert_eq!(reply.items(), replies[0].items());
    }
    // Exactly one call while every replica's Redis round trips were in time; each that
    // was not (a busy machine; logged) may have cost one of its own. Each replica logs a
    // request's line after anything it logged on the way, in order: once both of its
    // requests are logged, so is any going without Redis.
    for r in &replicas {
        until(|| r.count("\"message\":\"request\"") >= 2).await;
    }
    let alone: usize = replicas.iter().zip(&since).map(|(r, since)| r.went_alone(*since)).sum();
    let calls = f.sim.call_count() - warm_up;
    assert!(
        calls == 1 || (calls > 1 && calls <= 1 + alone),
        "{calls} calls, {alone} without Redis: {:?}",
        f.sim.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_into_a_warm_fleet_answers_from_shared_items_without_a_call() {
    let _heavy = heavy().await;
    let f = Fixture::new("warm", 200).await;
    let redis = RedisServer::start(&f.dir.join("redis")).await;
    let first = f.replica("first", &redis, "[cache]\nttl_ms = 60000\n");
    for g in 0..5 {
        let reply = f.post(&first, &body(&format!("g-warm-{g}"), &[1, 2, 3]), &[]).await;
        assert_eq!(reply.outcome(), StatusCode::OK);
    }
    let calls = f.sim.call_count();

    let late = f.replica_telling("late", &redis, "[cache]\nttl_ms = 60000\n");
    let mut replies = Vec::new();
    for g in 0..5 {
        replies.push(f.post(&late, &body(&format!("g-warm-{g}"), &[3, 1]), &[]).await);
    }

    // Every answer shared, unless the replica went without Redis for it (its first use
    // of Redis, on a busy machine, can take longer than the fleet's CALL_TIMEOUT): such
    // a request acts as a lone replica's would, and may cost a call.
    until(|| late.count("\"message\":\"request\"") >= 5).await;
    let alone = late.went_alone(0);
    let shared = replies.iter().filter(|r| r.outcome() == StatusCode::OK && r.header("x-cache") == Some("HIT")).count();
    assert!(shared + alone >= 5, "{shared} shared of 5, {alone} without Redis: {replies:?}");
    assert!(f.sim.call_count() <= calls + alone, "an upstream call for the new replica ({alone} without Redis)");
    let shared_items = metric(&f.client, &late, SHARED_HIT).await;
    assert!(shared_items == 10.0 || (alone > 0 && shared_items >= (10 - 2 * alone) as f64), "{shared_items} shared");
    // And now from its own memory: no more shared hits.
    f.post(&late, &body("g-warm-0", &[1]), &[]).await;
    assert_eq!(metric(&f.client, &late, SHARED_HIT).await, shared_items);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_fetching_delays_its_group_by_at_most_the_upstream_timeout() {
    let _heavy = heavy().await;
    let f = Fixture::new("kill", 200).await;
    let redis = RedisServer::start(&f.dir.join("redis")).await;
    let timeout = Duration::from_millis(1000);
    let sections = "[upstream]\ntimeout_ms = 1000\nmax_retries = 0\n";
    let mut doomed = Replica::start(&f.dir, "doomed", &f.sim_url, &fleet_sections(&redis, sections));
    let survivor = f.replica("survivor", &redis, sections);
    f.sim.hold_calls();
    let client = f.client.clone();
    let url = doomed.url.clone();
    let abandoned = tokio::spawn(async move {
        let request =
            Request::post(format!("{url}{RECEIPT}")).body(Full::new(Bytes::from(body("g-kill", &[4])))).unwrap();
        let _ = client.request(request).await;
    });
    until(|| f.sim.held_calls() == 1).await;
    // The claim the doomed replica holds expires, on Redis's clock, within the upstream
    // timeout (and the batch window, 2 ms) of now: that bounds how long it can delay the
    // group. (When the survivor then notices is a matter of polling and scheduling.)
    let claim_left = claim_left_ms(&redis, "g-kill", 4).await;

    doomed.kill();
    f.sim.release_calls();
    let reply = f.post(&survivor, &body("g-kill", &[4]), &[("x-request-timeout-ms", "10000")]).await;

    assert!(claim_left <= timeout.as_millis() as u64 + 2, "the claim lasts {claim_left} ms more");
    assert_eq!(reply.outcome(), StatusCode::OK, "{reply:?}");
    assert_eq!(f.sim.call_count(), 2, "the dead replica's call and the survivor's own");
    abandoned.abort();
}

/// How long, in Redis's milliseconds, the fetch claim on (`group`, `seq`) still lasts: its
/// `inflight` field is `owner,expires_ms` (src/fleet/scripts.rs).
async fn claim_left_ms(redis: &RedisServer, group: &str, seq: u64) -> u64 {
    let mut conn = within(redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection()).await.unwrap();
    let prefix = format!("fleet-{}", std::process::id());
    let base = receipt_gateway::fleet::group_key(
        &prefix,
        AppId(APP),
        &receipt_gateway::tencent::domain::GroupId::parse(group).unwrap(),
    );
    let held: Option<String> =
        within(redis::cmd("HGET").arg(format!("{base}:inflight")).arg(seq).query_async(&mut conn)).await.unwrap();
    let (secs, micros): (u64, u64) = within(redis::cmd("TIME").query_async(&mut conn)).await.unwrap();
    let held = held.expect("a claim is held");
    let expires: u64 = held.rsplit(',').next().and_then(|ms| ms.parse().ok()).expect("owner,expires_ms");
    expires.saturating_sub(secs * 1000 + micros / 1000)
}

fn fleet_sections(redis: &RedisServer, extra: &str) -> String {
    format!(
        "{extra}\n[fleet]\nbackend = \"redis\"\n[budget]\nbackend = \"redis\"\n[redis]\nurl = \"{}\"\nkey_prefix = \"fleet-{}\"\n",
        redis.url(),
        std::process::id()
    )
}

/// Requests at `rate` per second for `duration`, round-robin over `replicas`, for
/// `groups` groups, 5 of the latest 50 MsgSeqs each (deterministically spread), each
/// with a deadline of `deadline_ms`; the replies' statuses.
async fn load(
    f: &Fixture,
    replicas: &[&Replica],
    tag: &str,
    groups: usize,
    rate: u32,
    duration: Duration,
    deadline_ms: &'static str,
) -> Vec<StatusCode> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    let mut i = 0usize;
    let told = Arc::new(AtomicUsize::new(0));
    while Instant::now() < end {
        tick.tick().await;
        let replica = replicas[i % replicas.len()];
        let group = format!("g-{tag}-{}", (i * 7) % groups);
        let seqs: Vec<u64> = (0..5).map(|k| 1 + ((i * 13 + k * 11) % 50) as u64).collect();
        let (client, url, told) = (f.client.clone(), replica.url.clone(), told.clone());
        tasks.push(tokio::spawn(async move {
            let reply = post(&client, &url, &body(&group, &seqs), &[("x-request-timeout-ms", deadline_ms)]).await;
            if reply.outcome() != StatusCode::OK && told.fetch_add(1, Ordering::Relaxed) < 5 {
                // Shown when a test fails: which request, and what it was told.
                eprintln!("{group} at {url}: {} {:?} {}", reply.outcome(), reply.header("retry-after"), reply.body);
            }
            reply.outcome()
        }));
        i += 1;
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(within(t).await.unwrap());
    }
    statuses
}

/// The fleet's budget key in Redis (the GCRA state, src/budget.rs) for the receipt API.
fn budget_key() -> String {
    format!("fleet-{}:{APP}:get_group_msg_receipt", std::process::id())
}

// How many calls three replicas make beside one under the same load (within 1.25x), and
// how many 200s they answer over the limit beside one (at least 0.9x), are figures of a
// machine's load: `receipt-loadgen --replicas 3` measures them in release builds (the
// `under` and `over` scenarios). Debug builds sharing two cores measured 0.89-1.0x here,
// and a bound of 0.85x still failed on a fresh clone's first CI run.

/// Over the limit (1,000 groups at 250 requests a second for a budget of 50 a second),
/// three replicas spend one budget: Redis grants at most 50 tokens in any rolling second
/// of its clock, no call goes upstream without a token, and every caller is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_three_replicas_spend_one_budget_and_answer_everyone() {
    let _heavy = heavy().await;
    // The simulator's own limit out of the way: how the machine bunches deliveries on
    // its clock is not the fleet's doing, and a 60007 would change what the fleet does.
    let f = Fixture::new("over", 100_000).await;
    let redis = RedisServer::start(&f.dir.join("redis")).await;
    let grants = redis.grants(&budget_key(), 50).await;
    let sections =
        fleet_sections(&redis, "").replace("[budget]\n", "[budget]\nper_second = 50\nfallback_per_second = 10\n");
    let fleet: Vec<Replica> =
        ["a", "b", "c"].iter().map(|n| Replica::start(&f.dir, n, &f.sim_url, &sections)).collect();

    let statuses = load(&f, &fleet.iter().collect::<Vec<_>>(), "over", 1000, 250, Duration::from_secs(4), "1000").await;
    // Killed: no replica takes another token or makes another call.
    let fell_back = fleet.iter().any(|r| r.logged("redis budget unreachable"));
    drop(fleet);
    let granted = grants.until_now().await;
    let calls = f.sim.call_count();

    eprintln!("{:?}; {} tokens granted, {calls} calls; fell back: {fell_back}", by_status(&statuses), granted.len());
    let count = |status: StatusCode| statuses.iter().filter(|s| **s == status).count();
    let (ok, refused) = (count(StatusCode::OK), count(StatusCode::TOO_MANY_REQUESTS));
    // A 504 is an answer at the deadline, when a call's answer came too late (a stalled
    // machine); anything else is not an answer the fleet may give here.
    let late = count(StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(ok + refused + late, statuses.len(), "200, 429 or 504 only: {:?}", by_status(&statuses));
    assert!(ok > 0 && refused > 0, "{:?}", by_status(&statuses));
    let busiest = crate::support::busiest_second(&granted);
    assert!(busiest <= 50, "Redis granted {busiest} tokens in one second of its clock");
    // While Redis answers, every token is Redis's (on a replica's fallback, which a
    // Redis call slower than 250 ms starts, they would be the replica's own).
    if !fell_back {
        assert!(calls <= granted.len(), "{calls} calls for {} tokens", granted.len());
    }
}

/// How many of `statuses` there are of each.
fn by_status(statuses: &[StatusCode]) -> std::collections::BTreeMap<u16, usize> {
    let mut by = std::collections::BTreeMap::new();
    for status in statuses {
        *by.entry(status.as_u16()).or_insert(0) += 1;
    }
    by
}

const FLEET_UP: &str = "receipt_gateway_fleet_backend_up";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_every_request_is_answered_on_the_fallback_and_the_fleet_rejoins() {
    let _heavy = heavy().await;
    let f = Fixture::new("outage", 200).await;
    let dir = f.dir.join("redis");
    let redis = RedisServer::start(&dir).await;
    let sections = fleet_sections(&redis, "").replace("[budget]\n", "[budget]\nfallback_per_second = 10\n");
    let fleet: Vec<Replica> =
        ["a", "b", "c"].iter().map(|n| Replica::start(&f.dir, n, &f.sim_url, &sections)).collect();
    let all: Vec<&Replica> = fleet.iter().collect();
    load(&f, &all, "outage", 20, 100, Duration::from_secs(1), "1000").await;

    drop(redis);
    f.sim.reset_calls();
    let during = load(&f, &all, "outage", 20, 100, Duration::from_secs(3), "1000").await;
    // On the replicas' own send instants: each paces itself (at most 10 a second by its
    // clock), and the three clocks are the one machine's.
    let peak = busiest_second_sent(&f.sim.calls());
    let up_during = metric(&f.client, &fleet[0], FLEET_UP).await;
    let redis = RedisServer::start(&dir).await;
    // Traffic brings a replica back to Redis a second after its last failure.
    within(async {
        let mut i = 0;
        while metric(&f.client, &fleet[0], FLEET_UP).await != 1.0 {
            f.post(&fleet[0], &body(&format!("g-probe-{i}"), &[1]), &[]).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            i += 1;
        }
    })
    .await;
    let shared_before = metric(&f.client, &fleet[1], SHARED_HIT).await;
    let reply = within(async {
        for i in 0.. {
            // What one replica fetched, another finds in Redis again (once it stopped
            // skipping Redis, up to a second after its last failure).
            let group = format!("g-after-{i}");
            f.post(&fleet[0], &body(&group, &[1, 2]), &[]).await;
            let reply = f.post(&fleet[1], &body(&group, &[1, 2]), &[]).await;
            if metric(&f.client, &fleet[1], SHARED_HIT).await > shared_before {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unreachable!("the loop only ends by returning")
    })
    .await;
    drop(redis);

    let answered = |s: &StatusCode| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS;
    let odd: Vec<u16> = during.iter().filter(|s| !answered(s)).map(|s| s.as_u16()).collect();
    assert!(odd.is_empty(), "every request answered during the outage, not {odd:?}");
    assert!(peak <= 30, "{peak} calls in a second on 3 replicas with a fallback of 10");
    assert_eq!(up_during, 0.0);
    assert_eq!(reply.outcome(), StatusCode::OK);
}

#[tokio::test]
async fn a_large_groups_items_past_their_stale_window_are_pruned_when_it_is_written() {
    let _heavy = heavy().await;
    let dir = std::env::temp_dir().join(format!("receipt-gateway-fleet-{}-prune", std::process::id()));
    let redis = RedisServer::start(&dir).await;
    let mut conn = within(redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection()).await.unwrap();
    let scripts = receipt_gateway::fleet::Scripts::new();
    let base = receipt_gateway::fleet::group_key(
        "prune",
        AppId(APP),
        &receipt_gateway::tencent::domain::GroupId::parse("g").unwrap(),
    );
    let keys: Vec<String> =
        ["items", "inflight", "lease", "wanted", "group"].iter().map(|k| format!("{base}:{k}")).collect();
    let store = |age_ms: u64, seqs: std::ops::Range<u64>| {
        let mut call = scripts.store.prepare_invoke();
        call.key(&keys[..]).arg("me").arg(age_ms).arg(61_000).arg("prune:fleet:stored").arg("m").arg("").arg(1000);
        call.arg(seqs.end - seqs.start);
        for seq in seqs {
            call.arg(seq).arg("0,1,2");
        }
        call
    };

    let _: i64 = within(store(100_000, 0..200).invoke_async(&mut conn)).await.unwrap();
    let before: usize = within(redis::cmd("HLEN").arg(&keys[0]).query_async(&mut conn)).await.unwrap();
    let _: i64 = within(store(0, 200..300).invoke_async(&mut conn)).await.unwrap();
    let after: usize = within(redis::cmd("HLEN").arg(&keys[0]).query_async(&mut conn)).await.unwrap();

    assert_eq!((before, after), (200, 100), "past 256 items, the 200 past their stale window go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line() {
    let _heavy = heavy().await;
    let f = Fixture::new("secrets", 200).await;
    let clients = "[[clients]]\nid = \"billing\"\ntoken_env = \"FLEET_TEST_TOKEN\"\n";
    let replica = Replica::start(&f.dir, "secrets", &f.sim_url, clients);
    let bearer = format!("Bearer {TOKEN}");
    let b = body("g-secrets", &[1, 2]);

    let right = f.post(&replica, &b, &[("x-client-id", "billing"), ("authorization", &bearer)]).await;
    let wrong = f.post(&replica, &b, &[("x-client-id", "billing"), ("authorization", "Bearer guess")]).await;
    let spoofed = format!("{}{RECEIPT}?usersig=caller-usersig-xyz&identifier=admin", replica.url);
    let request = Request::post(spoofed).body(Full::new(Bytes::from(b.clone()))).unwrap();
    let ignored = within(f.client.request(request)).await.unwrap();
    let ignored = outcome(ignored.status(), ignored.headers());
    // Wait until the last request's line is logged.
    until(|| replica.log.lock().unwrap().iter().filter(|l| l.contains("\"message\":\"request\"")).count() >= 3).await;

    assert_eq!((right.outcome(), wrong.outcome(), ignored), (StatusCode::OK, StatusCode::UNAUTHORIZED, StatusCode::OK));
    let log = replica.log.lock().unwrap().join("\n");
    for secret in [TOKEN, KEY, "caller-usersig-xyz", "guess"] {
        assert!(!log.contains(secret), "{secret:?} appears in the log");
    }
    assert!(log.contains("\"client\":\"billing\""), "the client id is logged");
    assert!(log.contains("upstream call"), "the upstream call was logged (with its signed URL's endpoint only)");
}

/// A signed-less callback (the test app has no callback token) to `replica`.
async fn callback(f: &Fixture, replica: &Replica, body: String) -> StatusCode {
    let query = format!("SdkAppid={APP}&CallbackCommand=Group.CallbackAfterReadReceipt&contenttype=json");
    let request =
        Request::post(format!("{}/callback?{query}", replica.url)).body(Full::new(Bytes::from(body))).unwrap();
    within(f.client.request(request)).await.expect("the replica answers").status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_taken_by_one_replica_reaches_every_replicas_answers_without_a_call() {
    let _heavy = heavy().await;
    let f = Fixture::new("callback", 200).await;
    let redis = RedisServer::start(&f.dir.join("redis")).await;
    let sections = "[cache]\nttl_ms = 60000\n";
    let (a, b) = (f.replica("a", &redis, sections), f.replica("b", &redis, sections));
    // Both hold the item, fresh for a minute, as Tencent first answered it.
    let fetched = f.post(&a, &body("g-cb", &[1]), &[]).await;
    assert_eq!(f.post(&b, &body("g-cb", &[1]), &[]).await.body, fetched.body);
    assert_eq!(f.sim.call_count(), 1);
    let (read, unread) = (fetched.items()[0].1 + 1, fetched.items()[0].2.saturating_sub(1));
    // Pub/sub keeps no message for a subscriber not there yet: both replicas listen first
    // (each subscribes in the background as it starts).
    let channel = format!("fleet-{}:fleet:callbacks", std::process::id());
    let mut conn = within(redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection()).await.unwrap();
    within(async {
        loop {
            let counts: Vec<(String, u64)> =
                redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).query_async(&mut conn).await.unwrap();
            if counts.first().is_some_and(|(_, n)| *n >= 2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    let event_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let reads = format!(
        r#"{{"GroupId":"g-cb","EventTime":{event_ms},"GroupMsgReceiptList":[{{"MsgSeq":1,"ReadNum":{read},"UnreadNum":{unread}}}]}}"#
    );
    assert_eq!(callback(&f, &a, reads).await, StatusCode::OK);
    let told = Instant::now();
    // b's answer, from its own memory, shows the read: pushed to it through Redis, since
    // b's own copy is fresh for a minute and no call was made. (How soon —
    // docs/design.md#fleet-tier says within 100 ms — is a figure of the machine's load; it is
    // printed here.)
    within(async {
        loop {
            let reply = f.post(&b, &body("g-cb", &[1]), &[]).await;
            if reply.items()[0].1 == read {
                assert_eq!(reply.header("x-cache"), Some("HIT"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    eprintln!("b answered the callback's count {:?} after it was taken by a", told.elapsed());
    // And a replica started now finds it in Redis, fresh for callback_ttl_ms.
    let c = f.replica("c", &redis, sections);
    let reply = f.post(&c, &body("g-cb", &[1]), &[]).await;
    assert_eq!((reply.header("x-cache"), reply.items()[0].1), (Some("HIT"), read));
    assert_eq!(f.sim.call_count(), 1, "callbacks cost no upstream call");
}
