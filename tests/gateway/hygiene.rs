//! Connection hygiene (issues 11 and 23): silent connections cannot take the ports (a full
//! port makes room by closing one that is not answering a request), connections of either
//! protocol that stop making progress are closed, a peer that half-sends a first line and
//! goes is let go at once, request heads are bounded, h2 clients that never read or reset
//! accepted requests in a loop cannot hurt, a body that does not arrive in time is a 408,
//! and an HTTP/1.1 request names one valid `Host`.

use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{RECEIPT, Setup, TestApp, WAIT, body, outcome, until, within};

/// The data port's limit in the admission tests.
const MAX: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_past_the_limit_make_room_for_new_callers_and_go_at_the_first_bytes_timeout() {
    let sections = format!("[server]\nmax_connections = {MAX}\nfirst_bytes_timeout_ms = 3000\n");
    let app = TestApp::spawn_with(Setup::sections(&sections)).await;
    // A caller already connected (the client's pool keeps the connection).
    assert_eq!(app.post(&body("hygiene", &[1])).await.outcome(), StatusCode::OK);

    // Twice the limit of silent connections: each one past the limit takes the place of
    // the oldest silent one (it has completed no request head), never the pooled caller's
    // (it has: it is idle, and goes only when no silent one is left).
    let data = app.url.trim_start_matches("http://").to_owned();
    let mut silent = Vec::new();
    for _ in 0..2 * MAX {
        silent.push(within(TcpStream::connect(&data)).await.expect("connects"));
    }
    let evicted = "receipt_gateway_connections_refused_total{port=\"data\",reason=\"evicted\"}";
    app.until_metric(evicted, (MAX + 1) as f64).await;

    // A new caller is answered: its connection takes the place of the oldest silent one.
    // (How fast, beside 400 silent connections, is benches/hostile.sh's `evict`: well
    // under 100 ms. Here the bound is only WAIT's.)
    let started = Instant::now();
    let mut caller = within(TcpStream::connect(&data)).await.expect("connects");
    let answer = exchange(&mut caller, &request(&body("hygiene", &[1]))).await;
    eprintln!("a new caller beside {} silent connections answered in {:?}", 2 * MAX, started.elapsed());
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("x-cache: HIT"), "{answer}");
    assert_eq!(app.metric(evicted).await, (MAX + 2) as f64);
    // The pooled caller kept its connection, and the admin port is apart.
    let (status, _) = app.admin_get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let reply = app.post(&body("hygiene", &[1])).await;
    assert_eq!((reply.outcome(), reply.header("x-cache")), (StatusCode::OK, Some("HIT")));
    let refused = "receipt_gateway_connections_refused_total{port=\"data\",reason=\"limit\"}";
    assert_eq!(app.metric(refused).await, 0.0, "nobody was refused: every connection closed was silent");

    // Every silent connection is closed: the oldest at once, the rest at the timeout.
    for conn in &mut silent {
        let mut byte = [0u8; 1];
        let read = within(conn.read(&mut byte)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "closed, not left open: {read:?}");
    }
    let timed_out = "receipt_gateway_connections_refused_total{port=\"data\",reason=\"silent\"}";
    assert_eq!(app.metric(timed_out).await, (2 * MAX - (MAX + 2)) as f64);
    // Left open: the pooled caller and the new one.
    app.until_metric("receipt_gateway_connections_open{port=\"data\"}", 2.0).await;
}

/// An HTTP/1.1 POST of `body` to the receipt path, for raw connections.
fn request(body: &str) -> String {
    format!(
        "POST {RECEIPT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-timeout-ms: 30000\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Writes `request` on `conn` and reads the answer's first bytes (one read: the answers
/// here are small).
async fn exchange(conn: &mut TcpStream, request: &str) -> String {
    within(conn.write_all(request.as_bytes())).await.expect("writes");
    read_some(conn).await
}

async fn read_some(conn: &mut TcpStream) -> String {
    let mut answer = vec![0u8; 16 * 1024];
    let n = within(conn.read(&mut answer)).await.unwrap_or(0);
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_port_closes_the_oldest_headless_then_the_oldest_idle_connection_and_refuses_only_when_all_are_busy() {
    let sections = "[server]\nmax_connections = 3\n\n[upstream]\ntimeout_ms = 30000\n";
    let app = TestApp::spawn_with(Setup::sections(sections)).await;
    let data = app.url.trim_start_matches("http://").to_owned();
    let connect = || async { within(TcpStream::connect(&data)).await.expect("connects") };
    let count =
        |reason: &str| format!("receipt_gateway_connections_refused_total{{port=\"data\",reason=\"{reason}\"}}");
    let open = "receipt_gateway_connections_open{port=\"data\"}";

    // The oldest has been answered and is idle; then a silent one; then one waiting for
    // its answer (the simulator holds the call).
    let mut idle = connect().await;
    assert!(exchange(&mut idle, &request(&body("cached", &[1]))).await.starts_with("HTTP/1.1 200"));
    let mut silent = connect().await;
    app.until_metric(open, 2.0).await;
    app.sim.hold_calls();
    let mut busy = vec![connect().await];
    within(busy[0].write_all(request(&body("busy-0", &[1])).as_bytes())).await.expect("writes");
    until(|| app.sim.held_calls() == 1).await;

    // Full. The next one takes the silent one's place, though the idle one is older.
    busy.push(connect().await);
    app.until_metric(&count("evicted"), 1.0).await;
    assert_eq!(until_closed(&mut silent).await, 0, "the silent one is closed, unanswered");
    within(busy[1].write_all(request(&body("busy-1", &[1])).as_bytes())).await.expect("writes");
    until(|| app.sim.held_calls() == 2).await;
    // No silent one left: the next takes the idle one's place.
    busy.push(connect().await);
    app.until_metric(&count("evicted"), 2.0).await;
    until_closed(&mut idle).await;
    within(busy[2].write_all(request(&body("busy-2", &[1])).as_bytes())).await.expect("writes");
    until(|| app.sim.held_calls() == 3).await;

    // Every connection is answering a request: a new one is refused, closed at once.
    let mut refused = connect().await;
    assert_eq!(until_closed(&mut refused).await, 0);
    assert_eq!(app.metric(&count("limit")).await, 1.0);
    assert_eq!(app.metric(&count("evicted")).await, 2.0, "no busy connection was closed");
    app.sim.release_calls();
    for conn in &mut busy {
        let answer = read_some(conn).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

#[tokio::test]
async fn a_body_that_does_not_arrive_before_the_deadline_is_408() {
    let app = TestApp::spawn().await;
    let data = app.url.trim_start_matches("http://").to_owned();
    let mut conn = within(TcpStream::connect(&data)).await.expect("connects");
    let head = format!(
        "POST {RECEIPT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\
         x-request-timeout-ms: 200\r\n\r\n{{\"GroupId\":"
    );
    within(conn.write_all(head.as_bytes())).await.expect("writes");
    let mut answer = vec![0u8; 4096];
    let n = within(conn.read(&mut answer)).await.expect("answers");
    let text = String::from_utf8_lossy(&answer[..n]);
    // Sent as Tencent would (HTTP 200); the outcome in X-Gateway-Status and the metric.
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.to_ascii_lowercase().contains("\r\nx-gateway-status: 408\r\n"), "{text}");
    assert!(text.contains("\"ErrorCode\":60008"), "{text}");
    let sample =
        "receipt_gateway_requests_total{app=\"1400000000\",cause=\"caller\",client=\"default\",status=\"408\"}";
    assert_eq!(app.metric(sample).await, 1.0);
    assert_eq!(app.sim.call_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_generated_and_logged_with_the_traceparent() {
    use crate::fleet::{Fixture, Replica};
    let f = Fixture::new("request-id", 200).await;
    let gateway = Replica::start(&f.dir, "request-id", &f.sim_url, "");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mine =
        f.post(&gateway, &body("ids", &[1]), &[("x-request-id", "caller-id-42"), ("traceparent", traceparent)]).await;
    assert_eq!(mine.header("x-request-id"), Some("caller-id-42"));
    let generated = f.post(&gateway, &body("ids", &[1]), &[]).await;
    let id = generated.header("x-request-id").expect("generated").to_owned();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    // A header that is no sane id is replaced.
    let odd = f.post(&gateway, &body("ids", &[1]), &[("x-request-id", "")]).await;
    assert_eq!(odd.header("x-request-id").map(str::len), Some(32));

    let logged = |needle: &str| {
        let lines = gateway.log.lock().unwrap();
        lines.iter().any(|l| l.contains("\"message\":\"request\"") && l.contains(needle))
    };
    within(async {
        while !(logged("\"request_id\":\"caller-id-42\"") && logged(&id)) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(logged(&format!("\"traceparent\":\"{traceparent}\"")));
    // The upstream call that answered the first request names it.
    let lines = gateway.log.lock().unwrap();
    let call = lines.iter().find(|l| l.contains("\"message\":\"upstream call\"")).expect("an upstream call was logged");
    assert!(call.contains("\"request_ids\":\"caller-id-42\""), "{call}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_go_away_cost_only_the_calls_already_on_the_wire_and_are_counted_499() {
    const CALLERS: usize = 500;
    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    // 20 calls a second: 500 callers of uncached groups queue for 25 seconds. Two h2
    // connections (each takes at most 256 streams at once), 250 callers on each.
    let app = TestApp::spawn_with(Setup::sections("[budget]\nper_second = 20\n")).await;
    let started = std::time::Instant::now();
    let connections =
        [(); 2].map(|()| Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>());
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let request = Request::post(format!("{}{RECEIPT}", app.url))
                .header("x-request-timeout-ms", "40000")
                .body(Full::new(Bytes::from(body(&format!("gone-{i}"), &[1, 2]))))
                .unwrap();
            let h2 = connections[i % 2].clone();
            tokio::spawn(async move { h2.request(request).await })
        })
        .collect();
    // Every caller reached the gateway (and waits, or was answered) before they all go;
    // one whose request failed on the client's side (none expected) never reaches it.
    let arrived_by = std::time::Instant::now() + WAIT;
    loop {
        let (inflight, counted) = requests(&app).await;
        let failed_here =
            callers.iter().filter(|c| c.is_finished()).count() as f64 - counted.get("200").unwrap_or(&0.0);
        if inflight + counted.values().sum::<f64>() + failed_here.max(0.0) >= CALLERS as f64 {
            break;
        }
        assert!(
            std::time::Instant::now() < arrived_by,
            "callers not all seen in {WAIT:?}: {inflight} in flight, {counted:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for caller in &callers {
        caller.abort();
    }
    // What the budget allowed until they went: one call every 51.5 ms, plus one.
    let allowed = 2 + (started.elapsed().as_secs_f64() * 20.0) as usize;
    // Every stream reset reaches the gateway: the callers not answered by then are gone.
    within(async {
        while requests(&app).await.0 > 0.0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let on_the_wire = app.sim.call_count() + app.sim.held_calls();
    // A second of budget later (20 tokens; time passing is the subject), nothing more was
    // spent on them — but for the callers refused with 429 (a busy machine makes
    // admission refuse some): their misses are fetched in the background with budget
    // nobody waits for (SPEC 5.2), one call each at most.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, counted) = requests(&app).await;
    let count = |status: &str| counted.get(status).copied().unwrap_or(0.0);
    let (gone, answered, refused) = (count("499"), count("200"), count("429"));
    let calls = app.sim.call_count();
    assert!(calls <= on_the_wire + 1 + refused as usize, "{calls} calls after {on_the_wire}: {counted:?}");
    assert!(on_the_wire <= allowed, "only what the budget could send before they went: {on_the_wire} > {allowed}");
    assert!(counted.values().sum::<f64>() <= CALLERS as f64, "each counted once: {counted:?}");
    assert!(gone >= (CALLERS - 10) as f64 - answered - refused, "the callers that went are 499s: {counted:?}");
}

/// The data requests in flight, and those answered by status, from `/metrics`.
async fn requests(app: &TestApp) -> (f64, std::collections::BTreeMap<String, f64>) {
    let (_, text) = app.admin_get("/metrics").await;
    let mut counted = std::collections::BTreeMap::new();
    let mut inflight = 0.0;
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if name == "receipt_gateway_inflight_requests" {
            inflight = value;
        } else if let Some(labels) = name.strip_prefix("receipt_gateway_requests_total{") {
            let status = labels.split("status=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("?");
            *counted.entry(status.to_owned()).or_insert(0.0) += value;
        }
    }
    (inflight, counted)
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_never_reads_cannot_push_memory_past_the_bound() {
    use crate::fleet::{Fixture, Replica};
    let _heavy = crate::support::heavy().await;
    let f = Fixture::new("no-read", 200).await;
    // The item stays cached however long the streams take to set up: every answer a hit.
    let gateway = Replica::start(&f.dir, "no-read", &f.sim_url, "[cache]\nttl_ms = 86400000\n");
    // 1,000 cached items: each answer is about 60 KB.
    let seqs: Vec<u64> = (1..=1000).collect();
    let big = body("big", &seqs);
    assert_eq!(f.post(&gateway, &big, &[]).await.outcome(), StatusCode::OK);
    let before = rss_kib(gateway.pid());

    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    let mut clients = Vec::new();
    let mut sent = 0;
    // The streams the gateway takes at once (its SETTINGS); the client queues the rest.
    let mut taken = 0;
    for _ in 0..3 {
        let tcp = within(TcpStream::connect(&addr)).await.expect("connects");
        // A window of 0: the gateway may not send a byte of any answer.
        let (client, connection) =
            within(h2::client::Builder::new().initial_window_size(0).handshake::<_, bytes::Bytes>(tcp))
                .await
                .expect("h2");
        tokio::spawn(connection);
        let mut on_this = 0;
        for _ in 0..300 {
            // Past the gateway's 256 streams the client queues its requests itself.
            let mut ready = within(client.clone().ready()).await.expect("h2 ready");
            let request = http::Request::post(format!("{}{RECEIPT}", gateway.url)).body(()).unwrap();
            let Ok((response, mut stream)) = ready.send_request(request, false) else { break };
            if stream.send_data(bytes::Bytes::from(big.clone()), true).is_err() {
                break;
            }
            held.push((response, stream));
            on_this += 1;
        }
        sent += on_this;
        taken += on_this.min(256);
        clients.push(client);
    }
    // Wait until the gateway has answered every stream it took (256 a connection) into its
    // send buffers, besides the first request: 768 answers of 60 KB, which a debug build
    // on a loaded machine (other builds) took longer than WAIT to write.
    let answered =
        "receipt_gateway_requests_total{app=\"1400000000\",cause=\"none\",client=\"default\",status=\"200\"}";
    let waited = tokio::time::timeout(3 * WAIT, async {
        while crate::fleet::metric(&f.client, &gateway, answered).await < (1 + taken) as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if waited.is_err() {
        let inflight = crate::fleet::metric(&f.client, &gateway, "receipt_gateway_inflight_requests").await;
        let done = crate::fleet::metric(&f.client, &gateway, answered).await;
        panic!("{done} answered of {taken} + 1 taken ({sent} sent), {inflight} in flight");
    }
    let after = rss_kib(gateway.pid());
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("{sent} streams held on 3 connections: RSS {before} KiB -> {after} KiB (+{grown_mib} MiB)");
    assert!(sent > 3 * 256, "the client asked for more than the gateway takes at once: {sent}");
    // 256 streams x a 60 KB unsent answer per connection is 15 MiB; with the request
    // bodies, hyper's buffers and what the allocator keeps, measured 18-42 MiB each
    // (debug build): the bound is 64 MiB per connection.
    assert!(grown_mib < 3 * 64, "RSS grew by {grown_mib} MiB");
    // And the gateway still answers others.
    assert_eq!(f.post(&gateway, &body("big", &[1]), &[]).await.outcome(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_resetting_accepted_requests_in_a_loop_gets_goaway() {
    // Held calls stay held however long the loop takes on a busy machine: no upstream
    // timeout or deadline answers one of them first (which would earn a reset back), and
    // the cached item outlives the test (the default TTL, 1 s, once made it STALE).
    let app =
        TestApp::spawn_with(Setup::sections("[upstream]\ntimeout_ms = 60000\n\n[cache]\nttl_ms = 86400000\n")).await;
    assert_eq!(app.post(&body("cached", &[1])).await.outcome(), StatusCode::OK);
    // Every request waits for its call, which the simulator holds: reset after acceptance.
    app.sim.hold_calls();
    let before = app.sim.call_count();
    let addr = app.url.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    let tcp = within(TcpStream::connect(&addr)).await.expect("connects");
    let (client, connection) = within(h2::client::handshake(tcp)).await.expect("h2");
    let connection = tokio::spawn(connection);
    let mut reset = 0;
    for i in 0..1000 {
        let Ok(Ok(mut ready)) = tokio::time::timeout(WAIT, client.clone().ready()).await else {
            break;
        };
        let request = http::Request::post(format!("{}{RECEIPT}", app.url)).body(()).unwrap();
        let Ok((mut response, mut stream)) = ready.send_request(request, false) else { break };
        if stream.send_data(bytes::Bytes::from(body(&format!("reset-{i}"), &[1])), true).is_err() {
            break;
        }
        // Accepted and waiting for its call at the simulator: then reset. Unless the
        // gateway's final GOAWAY crossed this request on the wire: then it was never
        // accepted, and its answer is the refusal (it used to wait for a call that never
        // came; 2 runs in 10 failed so before issue 23's changes too).
        let accepted = within(async {
            tokio::select! {
                () = async {
                    while app.sim.call_count() - before <= i {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                } => true,
                _ = &mut response => false,
            }
        })
        .await;
        if !accepted {
            break;
        }
        stream.send_reset(h2::Reason::CANCEL);
        reset += 1;
        if connection.is_finished() {
            break;
        }
    }
    // The connection ends (GOAWAY, then closed) after the allowance of 100 in a burst,
    // plus what it earned back at 10 a second while the loop ran (nothing was answered).
    within(connection).await.expect("the connection task").ok();
    let earned = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!((100..=101 + earned).contains(&reset), "closed after {reset} resets (allowance 100 + {earned} earned)");
    let closed = "receipt_gateway_connections_refused_total{port=\"data\",reason=\"resets\"}";
    assert_eq!(app.metric(closed).await, 1.0);
    // Another caller is untouched. (Its answer is cached: one for a new group would be
    // planned with the latency the held calls just showed, which is the test's own doing.)
    let answer = app.post(&body("cached", &[1])).await;
    assert_eq!(answer.outcome(), StatusCode::OK, "{:?} {}", answer.headers, answer.body);
    assert_eq!(answer.header("x-cache"), Some("HIT"));
    app.sim.release_calls();
}

/// Reads from `conn` until it is closed, within [`within`]'s bound; the bytes read.
async fn until_closed(conn: &mut TcpStream) -> usize {
    within(async {
        let (mut total, mut buf) = (0, vec![0u8; 64 * 1024]);
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
}

const HEADER_TIMEOUT: Duration = Duration::from_millis(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connections_without_a_request_head_in_time_are_closed_but_long_answers_are_not() {
    let app = TestApp::spawn_with(Setup::sections("[server]\nheader_timeout_ms = 600\n")).await;
    let data = app.url.trim_start_matches("http://").to_owned();
    assert_eq!(app.post(&body("cached", &[1])).await.outcome(), StatusCode::OK);
    let request = |group: &str| {
        let body = body(group, &[1]);
        format!(
            "POST {RECEIPT} HTTP/1.1\r\nhost: x\r\nx-request-timeout-ms: 5000\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };

    // Slow headers (slowloris): a request line and one header, then nothing.
    let started = Instant::now();
    let mut slow = within(TcpStream::connect(&data)).await.expect("connects");
    within(slow.write_all(format!("POST {RECEIPT} HTTP/1.1\r\nhost: x\r\n").as_bytes())).await.expect("writes");
    // An idle keep-alive connection: one answered request, then nothing.
    let mut idle = within(TcpStream::connect(&data)).await.expect("connects");
    within(idle.write_all(request("cached").as_bytes())).await.expect("writes");
    let mut answer = vec![0u8; 4096];
    let n = within(idle.read(&mut answer)).await.expect("reads");
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..n]));
    // A request whose answer takes longer than the timeout: its call is held.
    app.sim.hold_calls();
    let mut long = within(TcpStream::connect(&data)).await.expect("connects");
    within(long.write_all(request("uncached").as_bytes())).await.expect("writes");
    within(async {
        while app.sim.held_calls() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    assert_eq!(until_closed(&mut slow).await, 0, "closed without an answer");
    assert_eq!(until_closed(&mut idle).await, 0, "closed when idle");
    let closed_after = started.elapsed();
    assert!(closed_after >= HEADER_TIMEOUT, "not before the timeout: {closed_after:?}");
    // (That the watchdog closes them by 4/3 of the timeout is its unit test's, in paused
    // time: src/server.rs.)

    // The long request is still being answered two timeouts later (time passing is the
    // subject here), and gets its answer.
    tokio::time::sleep(2 * HEADER_TIMEOUT).await;
    app.sim.release_calls();
    let n = within(long.read(&mut answer)).await.expect("reads");
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..n]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_peer_that_never_reads_its_answers_is_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(Setup::sections("[server]\nheader_timeout_ms = 600\n")).await;
    let seqs: Vec<u64> = (1..=1000).collect();
    let big = body("stall", &seqs);
    assert_eq!(app.post(&big).await.outcome(), StatusCode::OK);
    // Pipelined requests for 60 KB answers, never read: the socket's buffers fill, the
    // answer being written cannot finish, and no next request head is read.
    let data = app.url.trim_start_matches("http://").to_owned();
    // The pooled caller's connection, idle, is closed by the same timeout first: then
    // only the connection under test is open.
    let open = "receipt_gateway_connections_open{port=\"data\"}";
    within(async {
        while app.metric(open).await > 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let before = 0.0;
    let mut conn = within(TcpStream::connect(&data)).await.expect("connects");
    let request = format!(
        "POST {RECEIPT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{big}",
        big.len()
    );
    let started = Instant::now();
    for _ in 0..400 {
        // The gateway stops reading once it cannot write: stop when our writes block too.
        match tokio::time::timeout(Duration::from_millis(200), conn.write_all(request.as_bytes())).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    // (Whether it is still open now depends on how long those writes took: not asked.)
    within(async {
        while app.metric(open).await > before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(started.elapsed() >= HEADER_TIMEOUT, "not before the timeout: {:?}", started.elapsed());
    // What was written before the close can still be read, then the end.
    until_closed(&mut conn).await;
}

/// A frame of HTTP/2 (RFC 9113, 4.1), for peers the h2 crate will not play.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connections_without_a_stream_get_goaway_and_are_closed_but_long_answers_are_not() {
    let sections = "[server]\nheader_timeout_ms = 600\n\n[upstream]\ntimeout_ms = 30000\n";
    let app = TestApp::spawn_with(Setup::sections(sections)).await;
    let data = app.url.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    // A well-behaved client that opens no stream (it answers PINGs and GOAWAY).
    let tcp = within(TcpStream::connect(&data)).await.expect("connects");
    let (_idle, connection) = within(h2::client::handshake(tcp)).await.expect("h2");
    let idle = tokio::spawn(connection);
    // A peer stuck in a header block: HEADERS without END_HEADERS, then nothing. No
    // other frame may come before its CONTINUATION, so it cannot even answer a PING.
    let mut stuck = within(TcpStream::connect(&data)).await.expect("connects");
    let mut opening = H2_PREFACE.to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[]));
    // :method POST, :scheme http (HPACK static table), and no end of the block.
    opening.extend(h2_frame(0x1, 0, 1, &[0x83, 0x86]));
    within(stuck.write_all(&opening)).await.expect("writes");
    // A client whose one request waits for its answer longer than the timeout.
    app.sim.hold_calls();
    let tcp = within(TcpStream::connect(&data)).await.expect("connects");
    let (client, connection) = within(h2::client::handshake(tcp)).await.expect("h2");
    let long = tokio::spawn(connection);
    let mut ready = within(client.ready()).await.expect("ready");
    let request =
        http::Request::post(format!("{}{RECEIPT}", app.url)).header("x-request-timeout-ms", "30000").body(()).unwrap();
    let (response, mut stream) = ready.send_request(request, false).expect("sends");
    stream.send_data(bytes::Bytes::from(body("long-h2", &[1])), true).expect("sends the body");
    until(|| app.sim.held_calls() == 1).await;

    // The idle one: GOAWAY, and the client closes.
    within(idle).await.expect("the connection task").expect("closed cleanly, after GOAWAY");
    // The stuck one: GOAWAY, then dropped a third of the timeout later.
    until_closed(&mut stuck).await;
    let closed_after = started.elapsed();
    assert!(closed_after >= HEADER_TIMEOUT, "not before the timeout: {closed_after:?}");
    let idle = "receipt_gateway_connections_refused_total{port=\"data\",reason=\"idle\"}";
    assert_eq!(app.metric(idle).await, 2.0);

    // The long request is still being answered two timeouts later, and gets its answer.
    tokio::time::sleep(2 * HEADER_TIMEOUT).await;
    assert!(!long.is_finished(), "a connection answering a request stays open");
    app.sim.release_calls();
    let response = within(response).await.expect("answered");
    assert_eq!(outcome(response.status(), response.headers()), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_answers_whatever_its_64_connections_do() {
    // The data port's header timeout is long; the admin port's is at most 5 s.
    let app = TestApp::spawn_with(Setup::sections("[server]\nheader_timeout_ms = 600000\n")).await;
    let admin = app.admin.trim_start_matches("http://").to_owned();
    // 64 idle h2 connections (answering PINGs) fill the admin port.
    let mut idle = Vec::new();
    for _ in 0..64 {
        let tcp = within(TcpStream::connect(&admin)).await.expect("connects");
        let (client, connection) = within(h2::client::handshake(tcp)).await.expect("h2");
        idle.push((client, tokio::spawn(connection)));
    }
    // A probe is answered: its connection takes the place of the oldest idle one.
    let (status, _) = app.admin_get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let evicted = "receipt_gateway_connections_refused_total{port=\"admin\",reason=\"evicted\"}";
    assert!(app.metric(evicted).await >= 1.0, "made room");
    // And the idle ones are closed by the admin port's own, shorter, header timeout.
    let (_client, youngest) = idle.pop().expect("64 of them");
    let started = Instant::now();
    within(youngest).await.expect("the connection task").expect("closed cleanly, after GOAWAY");
    eprintln!("an idle admin h2 connection closed after {:?} more", started.elapsed());
    let closed = "receipt_gateway_connections_refused_total{port=\"admin\",reason=\"idle\"}";
    assert!(app.metric(closed).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sent_part_of_a_first_line_and_closed_is_let_go_at_once() {
    // An hour to send the first line: only the end of the stream can close these soon.
    let app = TestApp::spawn_with(Setup::sections("[server]\nfirst_bytes_timeout_ms = 60000\n")).await;
    let data = app.url.trim_start_matches("http://").to_owned();
    let open = "receipt_gateway_connections_open{port=\"data\"}";
    let mut peers = Vec::new();
    for partial in [&b"P"[..], &H2_PREFACE[..10], b"GET / HT"] {
        let mut peer = within(TcpStream::connect(&data)).await.expect("connects");
        within(peer.write_all(partial)).await.expect("writes");
        peers.push(peer);
    }
    app.until_metric(open, 3.0).await;
    drop(peers);
    // Far sooner than the 60 s timeout (WAIT is 20 s).
    app.until_metric(open, 0.0).await;
    let silent = "receipt_gateway_connections_refused_total{port=\"data\",reason=\"silent\"}";
    assert_eq!(app.metric(silent).await, 0.0, "closed by the peer, not timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_are_bounded_to_64_kib_on_both_protocols() {
    let app = TestApp::spawn().await;
    let data = app.url.trim_start_matches("http://").to_owned();
    assert_eq!(app.post(&body("heads", &[1])).await.outcome(), StatusCode::OK);
    let filler = |bytes: usize| "a".repeat(bytes);

    // HTTP/1.1: a head under 64 KiB is served, one over it is 431 (a slow head holds
    // no more than that), be it in many headers or one.
    let head = |headers: &str| {
        let body = body("heads", &[1]);
        format!("POST {RECEIPT} HTTP/1.1\r\nhost: x\r\n{headers}content-length: {}\r\n\r\n{body}", body.len())
    };
    let mut conn = within(TcpStream::connect(&data)).await.expect("connects");
    let answer = exchange(&mut conn, &head(&format!("x-filler: {}\r\n", filler(60_000)))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for headers in [format!("x-filler: {}\r\n", filler(70_000)), format!("x-filler: {}\r\n", filler(1000)).repeat(70)] {
        let mut conn = within(TcpStream::connect(&data)).await.expect("connects");
        // The gateway answers, and closes, before it has read all: write what it takes.
        let _ = within(conn.write_all(head(&headers).as_bytes())).await;
        let answer = read_some(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{}", &answer[..answer.len().min(200)]);
    }

    // h2: the same bound on the decoded header list (hyper's own default was 16 KiB).
    let tcp = within(TcpStream::connect(&data)).await.expect("connects");
    let (client, connection) = within(h2::client::handshake(tcp)).await.expect("h2");
    tokio::spawn(connection);
    for (bytes, status) in [(40_000, StatusCode::OK), (70_000, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)] {
        let mut ready = within(client.clone().ready()).await.expect("ready");
        let request =
            http::Request::post(format!("{}{RECEIPT}", app.url)).header("x-filler", filler(bytes)).body(()).unwrap();
        let (response, mut stream) = ready.send_request(request, false).expect("sends");
        let _ = stream.send_data(bytes::Bytes::from(body("heads", &[1])), true);
        let response = within(response).await.expect("answered");
        assert_eq!(response.status(), status, "{bytes} bytes of header");
    }
}

#[tokio::test]
async fn http1_requests_without_exactly_one_valid_host_are_400() {
    let app = TestApp::spawn().await;
    let data = app.url.trim_start_matches("http://").to_owned();
    let body = body("host", &[1]);
    for (hosts, why) in [
        ("", "missing"),
        ("host: a\r\nhost: a\r\n", "repeated"),
        ("host: user@gateway\r\n", "not a valid"),
        ("host: gate way\r\n", "not a valid"),
    ] {
        let request = format!("POST {RECEIPT} HTTP/1.1\r\n{hosts}content-length: {}\r\n\r\n{body}", body.len());
        let mut conn = within(TcpStream::connect(&data)).await.expect("connects");
        let answer = exchange(&mut conn, &request).await;
        // HTTP refuses it (RFC 9112 3.2), and says so in HTTP's terms in either mode.
        assert!(answer.starts_with("HTTP/1.1 400"), "{hosts:?}: {answer}");
        assert!(answer.to_ascii_lowercase().contains("\r\nx-gateway-status: 400\r\n"), "{hosts:?}: {answer}");
        assert!(
            answer.contains("\"ErrorCode\":10004") && answer.contains(&format!("the Host header is {why}")),
            "{answer}"
        );
    }
    assert_eq!(app.sim.call_count(), 0);
    // HTTP/1.0 may leave it out.
    let request = format!("POST {RECEIPT} HTTP/1.0\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let mut conn = within(TcpStream::connect(&data)).await.expect("connects");
    let answer = exchange(&mut conn, &request).await;
    assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.to_ascii_lowercase().contains("x-gateway-status"), "not an error: {answer}");
}
