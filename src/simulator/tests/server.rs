//! Serving: routing, h2c, reset and shutdown.

use super::*;

#[tokio::test]
async fn unknown_paths_are_404_and_not_recorded() {
    let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let client = client();

    let (status, bytes) = send(&client, &url, Method::POST, "/v4/nope", String::new()).await.expect("answer");
    let (get_status, _) = send(&client, &url, Method::GET, RECEIPT_PATH, String::new()).await.expect("answer");

    let reply: ReceiptResponse = serde_json::from_slice(&bytes).expect("json");
    assert_eq!((status, reply.error_code), (StatusCode::NOT_FOUND, ErrorCode(60009)));
    assert_eq!(get_status, StatusCode::NOT_FOUND);
    assert_eq!(sim.call_count(), 0);
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served() {
    let (_sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
    let h2: HttpClient = Client::builder(TokioExecutor::new()).http2_only(true).build_http();

    let reply = call_ok(&h2, &url, "g", &[1, 2]).await;

    assert_eq!(reply, ReceiptResponse::ok(vec![item("g", 1), item("g", 2)]));
}

#[tokio::test]
async fn reset_forgets_calls_and_shutdown_stops_the_server() {
    let (sim, url, server) = Simulator::spawn(options()).await.expect("spawn");
    call_ok(&client(), &url, "g", &[1]).await;
    sim.reset_calls();
    assert_eq!(sim.call_count(), 0);

    within(server.shutdown()).await.expect("a clean stop");

    let fresh = client();
    let refused = send(&fresh, &url, Method::POST, RECEIPT_PATH, String::new()).await;
    assert!(refused.is_err());
}
