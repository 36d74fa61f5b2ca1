//! Injected faults and latency, on both APIs.

use tokio::time::Instant;

use super::*;

#[tokio::test]
async fn faulted_calls_spend_the_budget_unless_they_play_60007() {
    let (sim, url, _server) = Simulator::spawn(SimOptions { limit_per_second: 2, ..options() }).await.expect("spawn");
    let client = client();
    sim.inject(Fault::ErrorCode(ErrorCode::RATE_LIMITED), 1);
    sim.inject(Fault::HttpStatus(500), 1);

    let path = format!("{RECEIPT_PATH}?{}", good_query());
    for _ in 0..2 {
        send(&client, &url, Method::POST, &path, body("g", &[1])).await.expect("an answer");
    }
    let codes =
        [call_ok(&client, &url, "g", &[1]).await, call_ok(&client, &url, "g", &[1]).await].map(|r| r.error_code);

    assert_eq!(codes, [0, 60007].map(ErrorCode));
    assert_eq!(sim.max_in_any_window(Duration::from_secs(1)), 2);
}

#[tokio::test]
async fn faults_are_played_in_order_and_recorded() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    sim.inject(Fault::ErrorCode(ErrorCode::TRANSIENT_70169), 1);
    sim.inject(Fault::HttpStatus(503), 2);
    sim.inject(Fault::Drop, 1);
    sim.inject(Fault::Latency(Duration::from_millis(150)), 1);
    let path = format!("{RECEIPT_PATH}?{}", good_query());
    let post = || send(&client, &url, Method::POST, &path, body("g", &[1]));

    let coded = post().await.expect("an answer");
    let first_503 = post().await.expect("an answer");
    let second_503 = post().await.expect("an answer");
    let dropped = post().await;
    let started = Instant::now();
    let slow = post().await.expect("an answer");
    let slow_took = started.elapsed();
    let normal = post().await.expect("an answer");

    let reply: ReceiptResponse = serde_json::from_slice(&coded.1).expect("json");
    assert_eq!((coded.0, reply.error_code), (StatusCode::OK, ErrorCode(70169)));
    assert_eq!(first_503.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second_503.0, StatusCode::SERVICE_UNAVAILABLE);
    assert!(dropped.is_err(), "the connection should have been closed");
    assert_eq!(slow.0, StatusCode::OK);
    assert!(slow_took >= Duration::from_millis(150), "{slow_took:?}");
    let slow_reply: ReceiptResponse = serde_json::from_slice(&slow.1).expect("json");
    assert_eq!(slow_reply, ReceiptResponse::ok(vec![item("g", 1)]));
    assert_eq!(normal.0, StatusCode::OK);
    let seen: Vec<(ErrorCode, u16)> = sim.calls().iter().map(|c| (c.error_code, c.http_status)).collect();
    assert_eq!(
        seen,
        [
            (ErrorCode(70169), 200),
            (NO_ERROR_CODE, 503),
            (NO_ERROR_CODE, 503),
            (NO_ERROR_CODE, 0),
            (ErrorCode::OK, 200),
            (ErrorCode::OK, 200)
        ]
    );
}

#[tokio::test]
async fn base_latency_delays_every_call() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    sim.set_latency(Duration::from_millis(100));

    let started = Instant::now();
    let reply = call_ok(&client(), &url, "g", &[1]).await;

    assert_eq!(reply.error_code, ErrorCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(100));
}
#[tokio::test]
async fn faults_apply_to_detail_calls_too() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();
    sim.inject(Fault::HttpStatus(503), 1);
    sim.inject(Fault::ErrorCode(ErrorCode::INTERNAL), 1);
    let path = format!("{DETAIL_PATH}?{}", good_query());

    let (status, _) = send(&client, &url, Method::POST, &path, detail_body("g", 1, 0, "", 5)).await.expect("answer");
    let (_, coded) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 5)).await;
    let (_, normal) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 5)).await;

    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(coded["ErrorCode"], 10002);
    assert_eq!(normal["ErrorCode"], 0);
    let seen: Vec<(ErrorCode, u16)> = sim.detail_calls().iter().map(|c| (c.error_code, c.http_status)).collect();
    assert_eq!(seen, [(NO_ERROR_CODE, 503), (ErrorCode(10002), 200), (ErrorCode::OK, 200)]);
    assert_eq!(sim.call_count(), 0);
}
