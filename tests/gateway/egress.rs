//! The way out to Tencent (docs/design.md#domains-and-failover, #upstream-connections,
//! docs/operations.md#behind-an-egress-proxy): the backup domain when the primary cannot be
//! reached and the return to the primary; a real egress proxy (Debian's `tinyproxy`,
//! started here on a free port) and `NO_PROXY`; a company CA in `upstream.ca_file`; the
//! connection opened before `/readyz`, and the `User-Agent` of every call.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use receipt_gateway::simulator::Simulator;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::support::{APP, Reply, Setup, TestApp, WAIT, body, closed_port, expected, sim_options, until, within};

fn active(endpoint: &str) -> String {
    format!("receipt_gateway_upstream_endpoint_active{{app=\"{APP}\",endpoint=\"{endpoint}\"}}")
}

/// A gateway-made upstream failure (10002), whichever HTTP status `server.error_status`
/// sends it with (502, or 200 with `X-Gateway-Status: 502`).
fn upstream_failed(reply: &Reply) -> bool {
    let status = reply.status == StatusCode::BAD_GATEWAY
        || (reply.status == StatusCode::OK && reply.header("x-gateway-status") == Some("502"));
    status && reply.code() == 10002
}

/// A test's own directory under the system's temporary one.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("receipt-gateway-egress-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[tokio::test]
async fn every_request_is_answered_through_the_backup_when_the_primary_refuses_connections() {
    let (sim, backup, _server) = Simulator::spawn(sim_options()).await.expect("simulator");
    let app = TestApp::spawn_with(Setup {
        sections: "[upstream]\nfailover_after = 3\nprimary_retry_s = 60\n".into(),
        endpoint: Some(format!("http://127.0.0.1:{}", closed_port())),
        app: format!("backup_endpoint = \"{backup}\"\n"),
        shared_sim: Some((sim.clone(), backup)),
        ..Setup::default()
    })
    .await;

    let mut first = None;
    for i in 0..10 {
        let started = Instant::now();
        let reply = app.post(&body(&format!("g{i}"), &[1, 2])).await;
        first.get_or_insert(started.elapsed());
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_eq!(reply.items(), vec![expected(&format!("g{i}"), 1), expected(&format!("g{i}"), 2)]);
    }

    assert_eq!(sim.call_count(), 10, "each request answered by one call, through the backup");
    assert_eq!((app.metric(&active("primary")).await, app.metric(&active("backup")).await), (0.0, 1.0));
    // The detail API of the app follows it there.
    let detail = r#"{"GroupId":"g0","MsgSeq":1,"Filter":0,"Cursor":"","Count":10}"#;
    let reply = app.post_to("/v4/group_open_http_svc/get_group_msg_receipt_detail", detail, &[]).await;
    assert_eq!((reply.status, reply.body["ActionStatus"].as_str()), (StatusCode::OK, Some("OK")), "{:?}", reply.body);
    assert_eq!(sim.detail_call_count(), 1);
    // Not asserted (machine-dependent): the first request met the refusing primary and
    // was answered through the backup within the same call's attempts.
    eprintln!("failover: first request, primary refused -> answered through the backup in {:?}", first.unwrap());
}

/// A primary that takes connections and never answers: each timeout before any byte of
/// answer is a failure to reach it, so the call's own retries reach the backup once
/// `failover_after` of them have passed.
#[tokio::test]
async fn a_primary_that_never_answers_is_left_after_failover_after_timeouts() {
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let (sim, backup, _server) = Simulator::spawn(sim_options()).await.expect("simulator");
    let app = TestApp::spawn_with(Setup {
        sections: "[upstream]\ntimeout_ms = 300\nfailover_after = 2\nprimary_retry_s = 60\n".into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        app: format!("backup_endpoint = \"{backup}\"\n"),
        shared_sim: Some((sim.clone(), backup)),
        ..Setup::default()
    })
    .await;

    let started = Instant::now();
    let reply = app.post(&body("silent", &[1])).await;
    let took = started.elapsed();
    assert_eq!(reply.items(), vec![expected("silent", 1)], "{:?}", reply.body);
    assert_eq!((sim.call_count(), app.metric(&active("backup")).await), (1, 1.0));
    eprintln!("failover: primary silent (timeout_ms 300, failover_after 2) -> answered through the backup in {took:?}");
}

#[tokio::test]
async fn calls_return_to_the_primary_once_it_answers_again() {
    let (backup_sim, backup, _backup_server) = Simulator::spawn(sim_options()).await.expect("simulator");
    let port = closed_port();
    let app = TestApp::spawn_with(Setup {
        sections: "[upstream]\nfailover_after = 1\nprimary_retry_s = 1\n".into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        app: format!("backup_endpoint = \"{backup}\"\n"),
        shared_sim: Some((backup_sim.clone(), backup)),
        ..Setup::default()
    })
    .await;
    assert_eq!(app.post(&body("before", &[1])).await.status, StatusCode::OK);
    app.until_metric(&active("backup"), 1.0).await;
    let before = backup_sim.call_count();
    assert!(before >= 1, "answered through the backup");

    // The primary comes back on its port.
    let primary = Simulator::new(sim_options());
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("the primary's port is free again");
    let _primary = tokio::spawn(primary.clone().serve(listener, std::future::pending()));

    let mut n = 0;
    within(async {
        while primary.call_count() == 0 {
            n += 1;
            assert_eq!(app.post(&body(&format!("during{n}"), &[1])).await.status, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    app.until_metric(&active("primary"), 1.0).await;
    assert_eq!(app.metric(&active("backup")).await, 0.0);

    let (at_primary, at_backup) = (primary.call_count(), backup_sim.call_count());
    for i in 0..3 {
        assert_eq!(app.post(&body(&format!("after{i}"), &[1])).await.status, StatusCode::OK);
    }
    assert_eq!(primary.call_count(), at_primary + 3, "back on the primary");
    assert_eq!(backup_sim.call_count(), at_backup, "nothing more through the backup");
}

/// A `tinyproxy` on a free port of its own, allowing `CONNECT` to one port; killed on drop.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Tinyproxy {
    async fn start(dir: &Path, connect_port: u16, basic_auth: Option<(&str, &str)>) -> Tinyproxy {
        let port = closed_port();
        let log = dir.join("tinyproxy.log");
        let _ = std::fs::remove_file(&log);
        let auth = basic_auth.map_or(String::new(), |(user, password)| format!("BasicAuth {user} {password}\n"));
        let conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Info\nMaxClients 100\n\
             Allow 127.0.0.1\nConnectPort {connect_port}\nDisableViaHeader Yes\n{auth}",
            log.display()
        );
        let path = dir.join("tinyproxy.conf");
        std::fs::write(&path, conf).expect("tinyproxy.conf");
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed (.ci/run installs it with apt)");
        let proxy = Tinyproxy { child, port, log };
        until(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
        proxy
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `CONNECT`s to `port` it logged.
    fn tunnels_to(&self, port: u16) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter(|l| l.contains(&format!("CONNECT 127.0.0.1:{port} "))).count()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.kill();
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the URL")
}

#[tokio::test]
async fn calls_leave_through_the_egress_proxy_unless_no_proxy_names_the_host() {
    let dir = scratch("proxy");
    let (sim, url, _server) = Simulator::spawn(sim_options()).await.expect("simulator");
    let sim_port = port_of(&url);
    let proxy = Tinyproxy::start(&dir, sim_port, None).await;
    let env = vec![("http_proxy", proxy.url()), ("HTTPS_PROXY", proxy.url())];
    let app = TestApp::spawn_with(Setup {
        shared_sim: Some((sim.clone(), url.clone())),
        env: env.clone(),
        ..Setup::default()
    })
    .await;
    // Warmed through the proxy before the first request.
    until(|| proxy.tunnels_to(sim_port) == 1).await;

    for i in 0..3 {
        let reply = app.post(&body(&format!("p{i}"), &[7])).await;
        assert_eq!(reply.items(), vec![expected(&format!("p{i}"), 7)]);
    }
    assert_eq!(sim.call_count(), 3);
    assert_eq!(proxy.tunnels_to(sim_port), 1, "one tunnel, kept alive and reused");
    drop(app);

    let mut env = env;
    env.push(("NO_PROXY", "localhost, 127.0.0.1".into()));
    let direct = TestApp::spawn_with(Setup { shared_sim: Some((sim.clone(), url)), env, ..Setup::default() }).await;
    let reply = direct.post(&body("direct", &[7])).await;
    assert_eq!(reply.items(), vec![expected("direct", 7)]);
    assert_eq!(sim.call_count(), 4);
    assert_eq!(proxy.tunnels_to(sim_port), 1, "NO_PROXY: straight to the host");
}

#[tokio::test]
async fn https_goes_through_the_proxy_s_tunnel_with_tls_end_to_end() {
    let dir = scratch("proxy-tls");
    let (ca_pem, chain, key) = company_ca();
    let ca_file = dir.join("company-roots.pem");
    std::fs::write(&ca_file, ca_pem).expect("ca file");
    let (sim, url, _server) = Simulator::spawn_tls(sim_options(), chain, key).await.expect("HTTPS simulator");
    let proxy = Tinyproxy::start(&dir, port_of(&url), None).await;
    let app = TestApp::spawn_with(Setup {
        sections: format!("[upstream]\nca_file = \"{}\"\n", ca_file.display()),
        shared_sim: Some((sim.clone(), url.clone())),
        env: vec![("HTTPS_PROXY", proxy.url())],
        ..Setup::default()
    })
    .await;
    let reply = app.post(&body("tls", &[3])).await;
    assert_eq!(reply.items(), vec![expected("tls", 3)]);
    assert_eq!((sim.call_count(), proxy.tunnels_to(port_of(&url))), (1, 1));
}

#[tokio::test]
async fn proxy_credentials_come_from_proxy_auth_env_and_a_wrong_one_is_a_clean_502() {
    let dir = scratch("proxy-auth");
    let (sim, url, _server) = Simulator::spawn(sim_options()).await.expect("simulator");
    let sim_port = port_of(&url);
    let proxy = Tinyproxy::start(&dir, sim_port, Some(("gateway", "s3cret"))).await;
    let sections = format!("[upstream]\nproxy = \"{}\"\nproxy_auth_env = \"EGRESS_PROXY_AUTH\"\n", proxy.url());
    let spawn = |password: &str| {
        TestApp::spawn_with(Setup {
            sections: sections.clone(),
            shared_sim: Some((sim.clone(), url.clone())),
            env: vec![("EGRESS_PROXY_AUTH", format!("gateway:{password}"))],
            ..Setup::default()
        })
    };

    let app = spawn("s3cret").await;
    assert_eq!(app.post(&body("auth", &[1])).await.items(), vec![expected("auth", 1)]);
    drop(app);

    let refused = spawn("wrong").await;
    let reply = refused.post(&body("noauth", &[1])).await;
    assert!(upstream_failed(&reply), "{reply:?}");
    assert_eq!(sim.call_count(), 1, "the refused tunnel never reached upstream");
}

#[tokio::test]
async fn a_proxy_that_refuses_or_dies_gives_a_clean_502_within_the_deadline() {
    let dir = scratch("proxy-dies");
    let (sim, url, _server) = Simulator::spawn(sim_options()).await.expect("simulator");
    let sections = "[server]\nrequest_timeout_ms = 1500\n[upstream]\nproxy = \"http://127.0.0.1:";

    // Refuses: nothing listens where the proxy should be.
    let refusing = TestApp::spawn_with(Setup {
        sections: format!("{sections}{}\"\n", closed_port()),
        shared_sim: Some((sim.clone(), url.clone())),
        ..Setup::default()
    })
    .await;
    let started = Instant::now();
    let reply = refusing.post(&body("refused", &[1])).await;
    assert!(upstream_failed(&reply), "{reply:?}");
    assert!(started.elapsed() < Duration::from_millis(1500) + Duration::from_secs(1), "{:?}", started.elapsed());
    drop(refusing);

    // Dies: it worked, then it is gone.
    let mut proxy = Tinyproxy::start(&dir, port_of(&url), None).await;
    let app = TestApp::spawn_with(Setup {
        sections: format!("{sections}{}\"\n", proxy.port),
        shared_sim: Some((sim.clone(), url)),
        ..Setup::default()
    })
    .await;
    assert_eq!(app.post(&body("alive", &[1])).await.items(), vec![expected("alive", 1)]);
    proxy.kill();
    let started = Instant::now();
    let reply = app.post(&body("dead", &[1])).await;
    assert!(upstream_failed(&reply), "{reply:?}");
    assert!(started.elapsed() < Duration::from_millis(1500) + Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(sim.call_count(), 1);
}

/// A company CA, and a certificate it issued for 127.0.0.1: (the CA's PEM, chain, key).
fn company_ca() -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Example Corp TLS Inspection Root");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("server params");
    let cert = server.signed_by(&server_key, &issuer).expect("server certificate");
    let key = PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    (ca_cert.pem(), vec![cert.der().clone()], key)
}

#[tokio::test]
async fn a_company_ca_is_trusted_only_when_ca_file_names_it() {
    let dir = scratch("ca");
    let (ca_pem, chain, key) = company_ca();
    let ca_file = dir.join("company-roots.pem");
    std::fs::write(&ca_file, ca_pem).expect("ca file");
    let (sim, url, _server) = Simulator::spawn_tls(sim_options(), chain, key).await.expect("HTTPS simulator");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    let without = TestApp::spawn_with(Setup { shared_sim: Some((sim.clone(), url.clone())), ..Setup::default() }).await;
    let reply = without.post(&body("untrusted", &[1])).await;
    assert!(upstream_failed(&reply), "{reply:?}");
    assert_eq!(sim.call_count(), 0, "no call was ever accepted over the untrusted connection");
    drop(without);

    let connections = sim.connections();
    let with = TestApp::spawn_with(Setup {
        sections: format!("[upstream]\nca_file = \"{}\"\n", ca_file.display()),
        shared_sim: Some((sim.clone(), url)),
        ..Setup::default()
    })
    .await;
    assert_eq!(sim.connections(), connections + 1, "the TLS connection was opened before /readyz");
    let reply = with.post(&body("trusted", &[1, 2])).await;
    assert_eq!(reply.items(), vec![expected("trusted", 1), expected("trusted", 2)]);
    assert_eq!((sim.call_count(), sim.connections()), (1, connections + 1), "over the warmed connection");
}

#[tokio::test]
async fn the_first_connection_is_opened_before_readiness_and_every_call_says_who_it_is() {
    let app = TestApp::spawn().await;
    // `spawn` returned once /readyz said 200.
    assert_eq!((app.sim.connections(), app.sim.call_count()), (1, 0), "a bare connection, no call");

    let reply = app.post(&body("g", &[1])).await;
    assert_eq!(reply.items(), vec![expected("g", 1)]);
    let reply = app
        .post_to(
            "/v4/group_open_http_svc/get_group_msg_receipt_detail",
            r#"{"GroupId":"g","MsgSeq":1,"Filter":0,"Cursor":"","Count":10}"#,
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);

    assert_eq!(app.sim.connections(), 1, "both calls on the warmed connection");
    let agent = format!("receipt-gateway/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(app.sim.user_agents(), vec![agent.clone(), agent]);
}

/// `check-config` shows the proxy it resolved from the environment without its
/// credentials, and a `ca_file` that is not there stops it with 64, naming the key.
#[test]
fn check_config_shows_the_proxy_without_credentials_and_refuses_a_missing_ca_file() {
    let dir = scratch("check-config");
    let app = "[[apps]]\nsdkappid = 1\nregion = \"tokyo\"\nidentifier = \"a\"\n";
    let good = dir.join("proxy.toml");
    std::fs::write(&good, app).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_receipt-gateway"))
        .args(["check-config", "--config"])
        .arg(&good)
        .env("TENCENT_IM_SECRET_KEY", "k")
        .env("HTTPS_PROXY", "http://gw:pr0xy-Passw0rd@egress.internal:3128")
        .env_remove("https_proxy")
        .output()
        .expect("check-config runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("https via http://egress.internal:3128/ (with credentials)"), "{stdout}");
    assert!(!stdout.contains("pr0xy-Passw0rd") && !stdout.contains("gw:"), "{stdout}");

    let bad = dir.join("ca.toml");
    std::fs::write(&bad, format!("[upstream]\nca_file = \"{}\"\n{app}", dir.join("none.pem").display()))
        .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_receipt-gateway"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .env("TENCENT_IM_SECRET_KEY", "k")
        .output()
        .expect("check-config runs");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.ca_file"), "{out:?}");
}

/// A start-up that cannot reach upstream is ready anyway, once the warm-up's first try has
/// failed (bounded by `upstream.timeout_ms`).
#[tokio::test]
async fn an_unreachable_upstream_does_not_keep_the_gateway_unready() {
    let started = Instant::now();
    let app = TestApp::spawn_with(Setup {
        endpoint: Some(format!("http://127.0.0.1:{}", closed_port())),
        ..Setup::default()
    })
    .await;
    assert!(started.elapsed() < WAIT);
    let reply = app.post(&body("g", &[1])).await;
    assert!(upstream_failed(&reply), "{reply:?}");
}

/// What the proxy adds to a call on loopback (p50 / p99), printed, not asserted:
/// `cargo test --test gateway proxy_latency -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, run by hand"]
async fn proxy_latency_on_loopback() {
    let dir = scratch("proxy-latency");
    let (sim, url, _server) = Simulator::spawn(sim_options()).await.expect("simulator");
    let proxy = Tinyproxy::start(&dir, port_of(&url), None).await;
    let sections = "[budget]\nper_second = 100000\n";
    let mut results = Vec::new();
    for (name, env) in [("direct", vec![]), ("tinyproxy", vec![("HTTP_PROXY", proxy.url())])] {
        let app = TestApp::spawn_with(Setup {
            sections: sections.into(),
            shared_sim: Some((sim.clone(), url.clone())),
            env,
            ..Setup::default()
        })
        .await;
        let mut took = Vec::new();
        for i in 0..600 {
            let started = Instant::now();
            let reply = app.post(&body(&format!("{name}{i}"), &[1])).await;
            took.push(started.elapsed());
            assert_eq!(reply.status, StatusCode::OK);
            // Under the simulator's 200 calls a second.
            tokio::time::sleep(Duration::from_millis(6)).await;
        }
        took.drain(..100);
        took.sort();
        let pct = |p: f64| took[((took.len() as f64 - 1.0) * p) as usize];
        results.push((name, pct(0.5), pct(0.99)));
    }
    for (name, p50, p99) in results {
        eprintln!("{name}: p50 {p50:?} p99 {p99:?} (request through the gateway, one upstream call each)");
    }
}
