//! The metric names are the contract with `deploy/` (docs/design.md#metrics): a gateway process
//! that has seen real traffic is scraped, `promtool check metrics` lints the scrape, and every
//! metric name that the PrometheusRule (alerts and recording rules), its unit tests' input series
//! or the Grafana dashboard uses must be a family of that scrape (a `# TYPE` line).
//!
//! The gateway is the binary (the fleet tests' [`Replica`]), not the in-process harness:
//! `receipt_gateway_config_reloads_total` only exists once a reload happened, and only a
//! gateway started from a config file reloads. It runs with `fleet.backend` and
//! `budget.backend = "redis"` on a private `redis-server`, as `overlays/redis` does, so the
//! fleet families are exported too.
//!
//! `promtool` comes from Debian's `prometheus` (`.ci/deploy-tools.sh` installs it). Without
//! it the lint is skipped with a notice, except under `CI=true`, where that is a failure.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::fleet::{Fixture, Replica, metric};
use crate::redis::RedisServer;
use crate::support::{APP, RECEIPT, body, outcome, within};

const DETAIL: &str = "/v4/group_open_http_svc/get_group_msg_receipt_detail";
const RULES: &str = "deploy/kubernetes/base/prometheusrule.yaml";
const DASHBOARD: &str = "deploy/grafana/receipt-gateway.json";
/// The alerts' unit tests (`promtool test rules`): their input series must be real ones too.
const ALERT_TESTS: &str = "deploy/tests/alerts.test.yaml";

/// Series the alerts or the dashboard use that no gateway exports, each with the reason.
/// Nothing else is left out.
const NOT_THE_GATEWAYS: &[(&str, &str)] = &[("up", "Prometheus writes it for every scrape target")];

/// Names the extraction below looks for: the gateway's own families and the process
/// collector's.
const PREFIXES: &[&str] = &["receipt_gateway_", "process_"];

fn strict() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// POSTs `body` to `path` on `replica`: (its outcome, body text).
async fn post(
    f: &Fixture,
    replica: &Replica,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut builder = Request::post(format!("{}{path}", replica.url));
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder.body(Full::new(Bytes::from(body.to_owned()))).expect("request");
    within(async {
        let response = f.client.request(request).await.expect("the gateway answers");
        let status = outcome(response.status(), response.headers());
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    })
    .await
}

async fn scrape(f: &Fixture, replica: &Replica) -> String {
    let request = Request::get(format!("{}/metrics", replica.admin)).body(Full::new(Bytes::new())).expect("request");
    within(async {
        let response = f.client.request(request).await.expect("admin answers");
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("the exposition is UTF-8")
    })
    .await
}

/// `promtool check metrics` on the scrape, written to `dir`.
fn promtool_check(scrape: &str, dir: &Path) {
    let file = dir.join("metrics.prom");
    std::fs::write(&file, scrape).expect("scrape written");
    let stdin = std::fs::File::open(&file).expect("scrape readable");
    let out = match Command::new("promtool").args(["check", "metrics"]).stdin(stdin).stderr(Stdio::piped()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                !strict(),
                "promtool is not installed, and under CI=true the lint may not be skipped \
                 (bash .ci/deploy-tools.sh installs it: Debian's prometheus)"
            );
            eprintln!(
                "SKIP: promtool check metrics: promtool not installed (apt-get install prometheus, or \
                 bash .ci/deploy-tools.sh); the metric names are still checked"
            );
            return;
        }
        Err(e) => panic!("promtool: {e}"),
    };
    assert!(
        out.status.success(),
        "promtool check metrics {} failed ({}):\n{}{}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `expr` of every rule of a PrometheusRule manifest. The file is YAML, and the test
/// crate has no YAML parser: this reads the two forms the rules use, `expr: <one line>`
/// and a block scalar (`expr: |`) whose lines are indented deeper than the key. Each rule
/// (`- alert:` or `- record:`) must have yielded exactly one expression.
fn rule_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some(value) = line.trim_start().trim_start_matches("- ").strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let key = indent(line);
            let mut block = Vec::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > key) {
                block.push(lines[i].trim());
                i += 1;
            }
            exprs.push(block.join("\n"));
        } else {
            let unquoted = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(value);
            exprs.push(unquoted.to_owned());
        }
    }
    let rules = lines
        .iter()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:")
        })
        .count();
    assert_eq!(exprs.len(), rules, "{RULES}: one expr per alert / record rule");
    exprs
}

/// Every query of the dashboard: each `expr` (panel targets, at any depth, rows included)
/// and the variables' queries (`label_values(<selector>, label)`).
fn dashboard_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The metric names a PromQL expression selects (those with one of [`PREFIXES`], and
/// `up`), outside string literals (label values, regexes).
fn metric_names(expr: &str, names: &mut BTreeSet<String>) {
    let mut code = String::with_capacity(expr.len());
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                code.push(' ');
            }
            None if c == '"' || c == '\'' || c == '`' => {
                quote = Some(c);
                code.push(' ');
            }
            None => code.push(c),
        }
    }
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for word in code.split(|c: char| !is_name(c)) {
        if PREFIXES.iter().any(|p| word.starts_with(p)) || NOT_THE_GATEWAYS.iter().any(|(n, _)| *n == word) {
            names.insert(word.to_owned());
        }
    }
}

/// The metric name of each input series of a `promtool test rules` file
/// (`- series: 'name{labels}'`).
fn test_series(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim_start().trim_start_matches("- ").strip_prefix("series:"))
        .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"'))
        .map(|v| v.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

/// The families of a scrape: name -> type, from its `# TYPE` lines.
fn families(scrape: &str) -> std::collections::BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// The family a series name belongs to: `x_bucket`, `x_sum` and `x_count` are the
/// histogram (or summary) `x` when the scrape has one.
fn family_of<'a>(name: &'a str, types: &std::collections::BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram" || (t == "summary" && suffix != "_bucket"))
        {
            return base;
        }
    }
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported_and_promtool_accepts_the_scrape() {
    let f = Fixture::new("metric-names", 200).await;
    let redis = RedisServer::start(&f.dir.join("redis")).await;
    // A client with a token, for a refused caller (receipt_gateway_client_rejected_total).
    let clients = "[[clients]]\nid = \"billing\"\ntoken_env = \"FLEET_TEST_TOKEN\"\n";
    let gw = f.replica("names", &redis, clients);

    // A miss (an upstream call: calls, duration, batch size, budget wait), then a hit.
    let receipt = body("g-names", &[1, 2, 3]);
    let (status, miss) = post(&f, &gw, RECEIPT, &receipt, &[]).await;
    assert_eq!(status, StatusCode::OK, "{miss}");
    let (status, hit) = post(&f, &gw, RECEIPT, &receipt, &[]).await;
    assert_eq!((status, &hit), (StatusCode::OK, &miss), "the same answer, from the cache");
    // A bad request, and a caller refused for a wrong token.
    let (status, _) = post(&f, &gw, RECEIPT, r#"{"GroupId":"g-names","MsgSeqList":"#, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let refused = [("x-client-id", "billing"), ("authorization", "Bearer not-the-token")];
    let (status, _) = post(&f, &gw, RECEIPT, &receipt, &refused).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The detail API (its own budget: api="get_group_msg_receipt_detail").
    let detail = r#"{"GroupId":"g","MsgSeq":1,"Filter":0,"Cursor":"","Count":10}"#;
    let (status, answer) = post(&f, &gw, DETAIL, detail, &[]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // A read-receipt callback (the app has no callback token: unsigned callbacks are taken).
    let event_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let reads = format!(
        r#"{{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"g-names","EventTime":{event_ms},"GroupMsgReceiptList":[{{"MsgSeq":1,"ReadNum":9,"UnreadNum":1}}]}}"#
    );
    let callback = format!("/callback?SdkAppid={APP}&CallbackCommand=Group.CallbackAfterReadReceipt&contenttype=json");
    let (status, answer) = post(&f, &gw, &callback, &reads, &[("content-type", "application/json")]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // A reload (SIGHUP, the file unchanged).
    gw.hangup();
    within(async {
        while metric(&f.client, &gw, "receipt_gateway_config_reloads_total{result=\"ok\"}").await < 1.0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;

    let scrape = scrape(&f, &gw).await;
    drop(gw);
    drop(redis);
    promtool_check(&scrape, &f.dir);

    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(repo.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mut used: Vec<(String, &str)> = Vec::new();
    for expr in rule_exprs(&read(RULES)) {
        let mut names = BTreeSet::new();
        metric_names(&expr, &mut names);
        used.extend(names.into_iter().map(|n| (n, RULES)));
    }
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 40, "{DASHBOARD}: {} queries found, expected every panel's", exprs.len());
    for expr in exprs {
        let mut names = BTreeSet::new();
        metric_names(&expr, &mut names);
        used.extend(names.into_iter().map(|n| (n, DASHBOARD)));
    }

    let series = test_series(&read(ALERT_TESTS));
    assert!(series.len() >= 40, "{ALERT_TESTS}: {} input series found", series.len());
    used.extend(series.into_iter().map(|n| (n, ALERT_TESTS)));

    let types = families(&scrape);
    let mut missing = BTreeSet::new();
    let mut checked = BTreeSet::new();
    for (name, file) in &used {
        if NOT_THE_GATEWAYS.iter().any(|(n, _)| n == name) {
            continue;
        }
        let family = family_of(name, &types);
        if types.contains_key(family) {
            checked.insert(family.to_owned());
        } else {
            missing.insert(format!("{name} (used in {file})"));
        }
    }
    assert!(missing.is_empty(), "used by deploy/ but not in the gateway's scrape: {missing:#?}\n\nscrape:\n{scrape}");
    eprintln!(
        "{} families used by {RULES}, {ALERT_TESTS} and {DASHBOARD}, all in the scrape: {checked:?}",
        checked.len()
    );
    // The extraction found the families it must (a parser that finds nothing passes the
    // loop above vacuously).
    for family in [
        "receipt_gateway_requests_total",
        "receipt_gateway_upstream_calls_total",
        "receipt_gateway_budget_wait_seconds",
        "receipt_gateway_fleet_items_total",
        "receipt_gateway_callbacks_total",
        "receipt_gateway_config_reloads_total",
        "receipt_gateway_client_rejected_total",
        "process_resident_memory_bytes",
    ] {
        assert!(checked.contains(family), "{family} was not found among the names deploy/ uses: {checked:#?}");
    }
}
