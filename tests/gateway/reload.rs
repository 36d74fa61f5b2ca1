//! Reloading the configuration (docs/configuration.md#command-line) of a gateway process: SIGHUP,
//! or the file's content changing, applies new clients, tokens, quotas, weights, TTLs and budget
//! without a failed request; an invalid file, or one that changes what needs a restart, changes
//! nothing.

use std::time::Duration;

use http::StatusCode;

use crate::fleet::{Fixture, Replica, metric, post};
use crate::support::{body, heavy, within};

/// Two clients and a budget of 40 calls a second; `weight` for `checkout`.
fn sections(weight: u32) -> String {
    format!(
        "[budget]\nper_second = 40\n\n[[clients]]\nid = \"checkout\"\nweight = {weight}\n\n\
         [[clients]]\nid = \"nightly\"\nweight = 1\n"
    )
}

fn reloads(result: &str) -> String {
    format!("receipt_gateway_config_reloads_total{{result=\"{result}\"}}")
}

fn calls_for(client: &str) -> String {
    format!(
        "receipt_gateway_budget_calls_total{{api=\"get_group_msg_receipt\",app=\"1400000000\",client=\"{client}\"}}"
    )
}

/// Rewrites `replica`'s file with `to` in place of `from`.
fn rewrite(replica: &Replica, from: &str, to: &str) {
    let text = std::fs::read_to_string(&replica.config).expect("config readable");
    assert!(text.contains(from), "the file holds what is replaced");
    write(replica, &text.replacen(from, to, 1));
}

/// Replaces `replica`'s file at once (a rename), so that the gateway's watcher never
/// reads it half written.
fn write(replica: &Replica, text: &str) {
    let next = replica.config.with_extension("next");
    std::fs::write(&next, text).expect("config writable");
    std::fs::rename(&next, &replica.config).expect("config replaced");
}

/// Waits until `sample` reads at least `value`.
async fn until_at_least(f: &Fixture, replica: &Replica, sample: &str, value: f64) {
    within(async {
        while metric(&f.client, replica, sample).await < value {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Both clients send `per_second` requests a second each, for `seconds`, every one for a
/// group nobody asked for; every status.
async fn both_flood(
    f: &Fixture,
    replica: &Replica,
    tag: &str,
    per_second: u32,
    seconds: u32,
) -> Vec<Option<StatusCode>> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    let mut sent = Vec::new();
    for i in 0..per_second * seconds {
        tick.tick().await;
        for client in ["checkout", "nightly"] {
            let (c, url, b) = (f.client.clone(), replica.url.clone(), body(&format!("{tag}-{client}-{i}"), &[1]));
            sent.push(tokio::spawn(async move {
                let headers = [("x-client-id", client), ("x-request-timeout-ms", "1000")];
                Some(post(&c, &url, &b, &headers).await.outcome())
            }));
        }
    }
    let mut statuses = Vec::new();
    for task in sent {
        statuses.push(within(task).await.ok().flatten());
    }
    statuses
}

/// Calls spent for checkout and nightly since `before`.
async fn split(f: &Fixture, replica: &Replica, before: (f64, f64)) -> (f64, f64) {
    let a = metric(&f.client, replica, &calls_for("checkout")).await - before.0;
    let b = metric(&f.client, replica, &calls_for("nightly")).await - before.1;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_weight_under_load_without_a_failed_request() {
    let _heavy = heavy().await;
    let f = Fixture::new("reload-weight", 40).await;
    let replica = Replica::start(&f.dir, "weights", &f.sim_url, &sections(1));

    let equal = both_flood(&f, &replica, "equal", 120, 2).await;
    let (a, b) = split(&f, &replica, (0.0, 0.0)).await;
    assert!((0.8..=1.25).contains(&(a / b)), "weights 1 : 1 split {a} : {b}");

    rewrite(&replica, "weight = 1\n\n[[clients]]\nid = \"nightly\"", "weight = 3\n\n[[clients]]\nid = \"nightly\"");
    let load = both_flood(&f, &replica, "weighted", 120, 3);
    let reload = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        replica.hangup();
        // The file's watcher may have applied it first; then the signal reloads it again.
        until_at_least(&f, &replica, &reloads("ok"), 1.0).await;
        split(&f, &replica, (0.0, 0.0)).await
    };
    let (weighted, at_reload) = tokio::join!(load, reload);
    let signalled = || {
        let log = replica.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().any(|l| l.contains("configuration reloaded") && l.contains("\"signalled\":true"))
    };
    within(async {
        while !signalled() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    let (a, b) = split(&f, &replica, at_reload).await;
    assert!((2.4..=3.6).contains(&(a / b)), "after the reload, weights 3 : 1 split {a} : {b}");
    let failed =
        equal.iter().chain(&weighted).filter(|s| !matches!(s, Some(StatusCode::OK | StatusCode::TOO_MANY_REQUESTS)));
    assert_eq!(failed.count(), 0, "every request answered 200 or 429 across the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_restart_only_change_keeps_the_running_configuration() {
    let _heavy = heavy().await;
    let f = Fixture::new("reload-refused", 200).await;
    let replica = Replica::start(&f.dir, "refused", &f.sim_url, &format!("{}\n[cache]\nttl_ms = 60000\n", sections(1)));
    let quota = "id = \"nightly\"\nweight = 1\n";
    let ask = |client: &'static str| {
        let (c, url) = (f.client.clone(), replica.url.clone());
        async move { post(&c, &url, &body("g-reload", &[1]), &[("x-client-id", client)]).await.outcome() }
    };
    assert_eq!(ask("nightly").await, StatusCode::OK);

    // Not TOML: logged, counted, nothing changes.
    let good = std::fs::read_to_string(&replica.config).expect("config readable");
    write(&replica, "[[clients]\nid = ");
    replica.hangup();
    until_at_least(&f, &replica, &reloads("invalid"), 1.0).await;
    assert_eq!(ask("nightly").await, StatusCode::OK);

    // A quota for nightly, with a cache size change that needs a restart: refused as a
    // whole.
    let refused_text = good.replacen(quota, &format!("{quota}requests_per_second = 1\n"), 1).replacen(
        "ttl_ms = 60000",
        "ttl_ms = 60000\nmax_entries = 5000",
        1,
    );
    write(&replica, &refused_text);
    replica.hangup();
    until_at_least(&f, &replica, &reloads("refused"), 1.0).await;
    let refused = [ask("nightly").await, ask("nightly").await];
    assert_eq!(refused, [StatusCode::OK; 2], "the quota did not apply");
    let logged = replica.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
    assert!(logged.contains("configuration reload refused") && logged.contains("cache.max_entries"), "names the key");

    // The quota with a shorter TTL and a lower budget, picked up from the file's change
    // without a signal.
    let calls = f.sim.call_count();
    let applied = refused_text.replacen("ttl_ms = 60000\nmax_entries = 5000", "ttl_ms = 1", 1).replacen(
        "per_second = 40",
        "per_second = 30",
        1,
    );
    write(&replica, &applied);
    until_at_least(&f, &replica, &reloads("ok"), 1.0).await;
    let statuses = [ask("nightly").await, ask("nightly").await, ask("nightly").await];
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "the quota of 1 a second applies: {statuses:?}");
    assert_eq!(ask("checkout").await, StatusCode::OK);
    assert!(f.sim.call_count() > calls, "cached for 60 s at start, stale after 1 ms now: fetched again");
    let rate = "receipt_gateway_budget_effective_rate{api=\"get_group_msg_receipt\",app=\"1400000000\"}";
    assert_eq!(metric(&f.client, &replica, rate).await, 30.0, "the new budget");
}

/// A client's `error_status` and `server.error_status` are applied by a reload, like the
/// other client settings (docs/design.md#errors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_new_error_status() {
    let f = Fixture::new("reload-error-status", 200).await;
    let replica = Replica::start(&f.dir, "error-status", &f.sim_url, "[[clients]]\nid = \"sdk\"\n");
    // A body that is not JSON, as `client`: the status sent (the outcome is always 400).
    let sent = |client: &'static str| {
        let (c, url) = (f.client.clone(), replica.url.clone());
        async move {
            let reply = post(&c, &url, "{nope", &[("x-client-id", client)]).await;
            assert_eq!((reply.outcome(), reply.code()), (StatusCode::BAD_REQUEST, 60003));
            reply.status
        }
    };
    // Until the reload has been applied: the file's watcher or the signal, whichever first.
    let until_sent = |client: &'static str, status: StatusCode| {
        let sent = &sent;
        within(async move {
            while sent(client).await != status {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    assert_eq!((sent("sdk").await, sent("other").await), (StatusCode::OK, StatusCode::OK), "Tencent's by default");

    rewrite(&replica, "id = \"sdk\"\n", "id = \"sdk\"\nerror_status = \"http\"\n");
    replica.hangup();
    until_sent("sdk", StatusCode::BAD_REQUEST).await;
    assert_eq!(sent("other").await, StatusCode::OK, "that client only");

    rewrite(
        &replica,
        "[[clients]]\nid = \"sdk\"\nerror_status = \"http\"\n",
        "error_status = \"http\"\n[[clients]]\nid = \"sdk\"\nerror_status = \"tencent\"\n",
    );
    replica.hangup();
    until_sent("other", StatusCode::BAD_REQUEST).await;
    assert_eq!(sent("sdk").await, StatusCode::OK, "its own setting over the server's");
    assert_eq!(metric(&f.client, &replica, &reloads("refused")).await, 0.0);
}
