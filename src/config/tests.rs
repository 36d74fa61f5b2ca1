use super::*;
use std::collections::HashMap;

struct FakeSecrets(HashMap<&'static str, &'static str>);

impl SecretSource for FakeSecrets {
    /// Every variable is set except `NOPE` and the proxy variables (unless given).
    fn env(&self, name: &str) -> Option<String> {
        if let Some(value) = self.0.get(name) {
            return Some(value.to_string());
        }
        (name != "NOPE" && !name.to_ascii_uppercase().ends_with("_PROXY")).then(|| "k0".to_string())
    }
    fn file(&self, path: &Path) -> std::io::Result<String> {
        self.0
            .get(path.to_str().unwrap_or_default())
            .map(|v| format!("{v}\n"))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

fn secrets() -> FakeSecrets {
    FakeSecrets(HashMap::from([("TENCENT_IM_SECRET_KEY", "k1"), ("/run/key", "k2")]))
}

const MINIMAL: &str = r#"
    [[apps]]
    sdkappid = 1400000000
    region = "singapore"
    identifier = "administrator"
"#;

fn error_of(text: &str) -> String {
    Config::parse(text, &secrets()).unwrap_err().to_string()
}

#[test]
fn a_toml_error_names_the_place_but_never_quotes_the_line() {
    let e = Config::parse("[server]\nlisten = \"a\"\ntoken = s3cr3t-value\n", &FakeSecrets(HashMap::new()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3"), "{e}");
    assert!(!e.contains("s3cr3t"), "{e}");
}

#[test]
fn defaults_match_the_spec() {
    let c = Config::parse(MINIMAL, &secrets()).unwrap();
    assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.server.admin_listen, "0.0.0.0:9090".parse().unwrap());
    assert_eq!(c.server.request_timeout, Duration::from_millis(2000));
    assert_eq!((c.server.max_body_bytes, c.server.max_request_seqs), (65536, 1000));
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(20));
    assert_eq!(c.server.client_id_header.as_str(), "x-client-id");
    assert_eq!(c.server.error_status, ErrorStatus::Tencent);
    assert_eq!(c.cache.ttl, Duration::from_millis(1000));
    assert_eq!(c.cache.stale, Duration::from_secs(60));
    assert_eq!(c.cache.negative_ttl, Duration::from_millis(1000));
    assert_eq!(c.cache.max_entries, 1_000_000);
    assert_eq!((c.batch.window, c.batch.max_seqs), (Duration::from_millis(2), 50));
    assert_eq!((c.upstream.timeout, c.upstream.max_retries), (Duration::from_secs(3), 2));
    assert_eq!(c.budget.per_second.get(), 200);
    assert_eq!(c.budget.fallback_per_second.get(), 50);
    assert_eq!(c.budget.backend, BudgetBackend::Local);
    assert_eq!((c.upstream.failover_after, c.upstream.primary_retry), (3, Duration::from_secs(30)));
    assert!(c.upstream.egress.https.is_none() && c.upstream.egress.http.is_none());
    assert!(c.upstream.ca_file.is_none() && c.upstream.extra_roots.is_empty());
    let app = &c.apps[0];
    assert_eq!(app.endpoint, "https://adminapisgp.im.qcloud.com");
    assert_eq!(app.backup_endpoint.as_deref(), Some("https://adminapisgp.my-imcloud.com"));
    assert_eq!(app.usersig_ttl, Duration::from_secs(86400));
}

#[test]
fn every_region_resolves_to_its_domain() {
    for region in Region::ALL {
        let text = MINIMAL.replace("singapore", region.name());
        let c = Config::parse(&text, &secrets()).unwrap();
        assert_eq!(c.apps[0].endpoint, format!("https://{}", region.domain()));
        assert_eq!(c.apps[0].backup_endpoint, Some(format!("https://{}", region.backup_domain())));
    }
}

/// An `endpoint` override (a test, a private link) has no backup unless one is named:
/// it must not fail over to Tencent's public domain on its own.
#[test]
fn backup_endpoints_follow_the_primary() {
    let only_primary = format!("{MINIMAL}endpoint = \"http://127.0.0.1:18080\"\n");
    assert_eq!(Config::parse(&only_primary, &secrets()).unwrap().apps[0].backup_endpoint, None);
    let both = format!("{only_primary}backup_endpoint = \"http://127.0.0.1:18081/\"\n");
    let c = Config::parse(&both, &secrets()).unwrap();
    assert_eq!(c.apps[0].backup_endpoint.as_deref(), Some("http://127.0.0.1:18081"));
    let region_only = format!("{MINIMAL}backup_endpoint = \"https://private-backup.example\"\n");
    let c = Config::parse(&region_only, &secrets()).unwrap();
    assert_eq!(c.apps[0].backup_endpoint.as_deref(), Some("https://private-backup.example"));
    let same = format!("{MINIMAL}endpoint = \"http://a:1\"\nbackup_endpoint = \"http://a:1\"\n");
    assert!(error_of(&same).contains("apps[0].backup_endpoint"));
    assert!(error_of(&format!("{MINIMAL}backup_endpoint = \"ftp://x\"\n")).contains("apps[0].backup_endpoint"));
}

#[test]
fn a_ca_file_must_hold_pem_roots() {
    let text = format!("[upstream]\nca_file = \"/missing.pem\"\n{MINIMAL}");
    assert!(error_of(&text).starts_with("upstream.ca_file: cannot read /missing.pem"), "{}", error_of(&text));
    let text = format!("[upstream]\nca_file = \"/run/key\"\n{MINIMAL}");
    assert!(error_of(&text).contains("holds no PEM certificate"), "{}", error_of(&text));
}

#[test]
fn secrets_come_from_the_named_variable_or_file() {
    let text = format!("{MINIMAL}secret_key_file = \"/run/key\"\n");
    let c = Config::parse(&text, &secrets()).unwrap();
    assert!(format!("{:?}", c.apps[0].secret).contains("redacted"));
    let text = format!("{MINIMAL}secret_key_env = \"NOPE\"\n");
    assert_eq!(error_of(&text), "apps[0].secret_key_env: environment variable NOPE is not set");
}

#[test]
fn errors_name_the_key() {
    let cases = [
        ("[server]\nlisten = \"nope\"\n", "server.listen"),
        ("[server]\nbogus = 1\n", "unknown field `bogus`"),
        ("[cache]\nttl_ms = 0\n", "cache.ttl_ms"),
        ("[cache]\nstale_ms = 999999999999\n", "cache.stale_ms"),
        ("[server]\nrequest_timeout_ms = 60001\n", "server.request_timeout_ms"),
        ("[batch]\nmax_seqs = 0\n", "batch.max_seqs"),
        ("[budget]\nbackend = \"memcached\"\n", "budget.backend"),
        ("[budget]\nbackend = \"redis\"\nper_second = 10\nfallback_per_second = 20\n", "budget.fallback_per_second"),
        ("[server]\nclient_id_header = \"bad header\"\n", "server.client_id_header"),
        ("[redis]\nurl = \"http://redis:6379\"\n", "redis.url"),
        ("[redis]\nkey_prefix = \"\"\n", "redis.key_prefix"),
        ("[redis]\nkey_prefix = \"a{b}\"\n", "redis.key_prefix"),
        ("[fleet]\nbackend = \"gossip\"\n", "fleet.backend"),
        ("[[clients]]\nweight = 2\n", "clients[0].id"),
        ("[[clients]]\nid = \"has space\"\n", "clients[0].id"),
        ("[[clients]]\nid = \"a\"\n[[clients]]\nid = \"a\"\n", "clients[1].id: \"a\" is configured twice"),
        ("[[clients]]\nid = \"a\"\ntoken_env = \"NOPE\"\n", "clients[0].token_env"),
        ("[[clients]]\nid = \"a\"\nweight = 0\n", "clients[0].weight"),
        ("[[clients]]\nid = \"a\"\nrequests_per_second = 0\n", "clients[0].requests_per_second"),
        ("[budget]\nredis_url = \"redis://x\"\n", "unknown field `redis_url`"),
        ("[server]\nerror_status = \"HTTP\"\n", "server.error_status: \"HTTP\" is neither"),
        ("[[clients]]\nid = \"a\"\nerror_status = \"200\"\n", "clients[0].error_status"),
        ("[upstream]\nfailover_after = 0\n", "upstream.failover_after"),
        ("[upstream]\nprimary_retry_s = 0\n", "upstream.primary_retry_s"),
        ("[upstream]\nproxy = \"https://p:3128\"\n", "upstream.proxy"),
        ("[upstream]\nproxy = \"http://p:3128\"\nproxy_auth_env = \"NOPE\"\n", "upstream.proxy_auth_env"),
    ];
    for (prefix, expected) in cases {
        let err = error_of(&format!("{prefix}{MINIMAL}"));
        assert!(err.contains(expected), "{prefix}: {err}");
    }
    assert!(error_of("").contains("apps"));
    assert!(error_of("[[apps]]\nsdkappid = 1\nidentifier = \"a\"\n").contains("apps[0].region"));
    assert!(error_of(&format!("{MINIMAL}{MINIMAL}")).contains("configured twice"));
    let endpoint = format!("{MINIMAL}endpoint = \"ftp://x\"\n");
    assert!(error_of(&endpoint).contains("apps[0].endpoint"));
    let secret = format!("{MINIMAL}endpoint = \"https://user:pw@proxy:3128\"\n");
    assert!(error_of(&secret).contains("credentials"));
}

#[test]
fn error_status_is_server_wide_and_per_client() {
    let text = format!(
        "[server]\nerror_status = \"http\"\n[[clients]]\nid = \"sdk\"\nerror_status = \"tencent\"\n\
         [[clients]]\nid = \"plain\"\n{MINIMAL}"
    );
    let c = Config::parse(&text, &secrets()).unwrap();
    assert_eq!(c.server.error_status, ErrorStatus::Http);
    let of = |id: &str| c.clients.iter().find(|k| k.id == id).map(|k| k.error_status);
    assert_eq!((of("sdk"), of("plain")), (Some(Some(ErrorStatus::Tencent)), Some(None)));
}

#[test]
fn an_endpoint_overrides_the_region() {
    let text = format!("{MINIMAL}endpoint = \"http://127.0.0.1:18080/\"\n");
    let c = Config::parse(&text, &secrets()).unwrap();
    assert_eq!(c.apps[0].endpoint, "http://127.0.0.1:18080");
}

/// Every `.toml` below `dir`, recursively.
fn toml_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
}

#[test]
fn every_shipped_config_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    toml_files(&root.join("config"), &mut files);
    toml_files(&root.join("deploy"), &mut files);
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        Config::parse(&text, &secrets()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    assert!(files.len() >= 4, "expected the reference, demo and cluster configs: {files:?}");
}

#[test]
fn redis_is_one_of_a_url_sentinels_or_cluster_nodes() {
    let with = |redis: &str| format!("[fleet]\nbackend = \"redis\"\n[redis]\n{redis}\n{MINIMAL}");
    let both = error_of(&with("url = \"redis://a:1\"\ncluster_nodes = [\"b:2\"]"));
    assert!(both.starts_with("redis.url:") && both.contains("redis.cluster_nodes"), "{both}");
    let e = error_of(&with("sentinels = [\"a:26379\"]"));
    assert!(e.starts_with("redis.sentinel_master:"), "{e}");
    let e = error_of(&with("url = \"redis://a:1\"\nsentinel_master = \"m\""));
    assert!(e.starts_with("redis.sentinel_master:"), "{e}");
    let e = error_of(&with("cluster_nodes = [\"no-port\"]"));
    assert!(e.starts_with("redis.cluster_nodes:"), "{e}");
    let e = error_of(&with("cluster_nodes = []"));
    assert!(e.starts_with("redis.cluster_nodes:"), "{e}");

    let parse = |redis: &str| Config::parse(&with(redis), &secrets()).unwrap().redis;
    assert_eq!(parse("").topology, RedisTopology::Url("redis://127.0.0.1:6379/0".into()));
    let sentinel = parse("sentinels = [\"s0:26379\", \"s1:26379\"]\nsentinel_master = \"mymaster\"");
    assert_eq!(
        sentinel.topology,
        RedisTopology::Sentinel { sentinels: vec!["s0:26379".into(), "s1:26379".into()], master: "mymaster".into() }
    );
    let cluster = parse("cluster_nodes = [\"r0:6379\", \"rediss://r1:6379\"]\nconnect_timeout_ms = 250");
    assert_eq!(cluster.topology, RedisTopology::Cluster(vec!["r0:6379".into(), "rediss://r1:6379".into()]));
    assert_eq!(cluster.connect_timeout, Duration::from_millis(250));
}

#[test]
fn the_redis_password_comes_from_the_environment_and_never_prints() {
    let secrets = FakeSecrets(HashMap::from([("REDIS_PW", "pw-s3cret"), ("/ca.pem", "-----BEGIN CERTIFICATE-----")]));
    let text = format!(
        "[budget]\nbackend = \"redis\"\n[redis]\nurl = \"rediss://gw:url-s3cret@r:6380\"\nusername = \"gw\"\n\
         password_env = \"REDIS_PW\"\nca_file = \"/ca.pem\"\n{MINIMAL}"
    );
    let config = Config::parse(&text, &secrets).unwrap();
    assert_eq!(config.redis.password.as_ref().map(|p| p.expose()), Some("pw-s3cret"));
    assert!(config.redis.ca_pem.is_some());
    let printed = format!("{config:?} {}", config.redis.describe());
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("rediss://gw:***@r:6380"), "{printed}");
    let e = error_of(&format!("[fleet]\nbackend = \"redis\"\n[redis]\npassword_env = \"NOPE\"\n{MINIMAL}"));
    assert!(e.starts_with("redis.password_env:"), "{e}");
}
