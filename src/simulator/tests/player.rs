//! The member player: paced reads, signed callbacks, and both APIs following the reads.

use http::Response;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::*;

const TOKEN: &str = "callback-token";
const AFTER: &str = crate::tencent::webhook::AFTER_READ_RECEIPT;

/// A stand-in for the gateway's `/callback` on `127.0.0.1:0`: every callback's query
/// and body go to `seen`, and each is answered `OK`.
struct Receiver {
    url: String,
    seen: tokio::sync::mpsc::UnboundedReceiver<(String, Bytes)>,
    task: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let url = format!("http://{}/callback", listener.local_addr().expect("an address"));
        let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let query = req.uri().query().unwrap_or_default().to_owned();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let _ = tx.send((query, body));
                        let ok = r#"{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}"#;
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(ok.as_bytes()))))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                connections.spawn(conn);
            }
        });
        Receiver { url, seen, task }
    }

    /// The next callback: its query parameters and its JSON body.
    async fn next(&mut self) -> (QueryParams, serde_json::Value) {
        let (query, body) = within(self.seen.recv()).await.expect("the receiver runs");
        (QueryParams::parse(&query), serde_json::from_slice(&body).expect("a JSON callback"))
    }
}

fn with_player(player: CallbackPlayer) -> SimOptions {
    SimOptions { player: Some(player), ..options() }
}

fn player(url: &str, reads_per_second: f64) -> CallbackPlayer {
    CallbackPlayer::new(url, reads_per_second).expect("a valid player")
}

#[tokio::test]
async fn the_player_delivers_signed_reads_and_both_apis_follow() {
    let mut receiver = Receiver::start().await;
    let player = player(&receiver.url, 50.0).with_token(SecretKey::new(TOKEN));
    let started = Instant::now();
    let (sim, url, _server) = Simulator::spawn(with_player(player)).await.expect("spawn");
    sim.set_receipt("g", 1, 2, 3);
    sim.play_group("g", [1]);

    let mut seen = Vec::new();
    for _ in 0..3 {
        let (query, body) = receiver.next().await;
        let request_time = query.get("RequestTime").expect("a RequestTime").to_owned();
        assert_eq!(query.get("Sign"), Some(crate::tencent::webhook::sign(TOKEN.as_bytes(), &request_time).as_str()));
        assert_eq!(query.get("SdkAppid"), Some("1400000000"));
        assert_eq!(query.get("CallbackCommand"), Some("Group.CallbackAfterReadReceipt"));
        assert_eq!((query.get("contenttype"), query.get("OptPlatform")), (Some("json"), Some("RESTAPI")));
        assert!(request_time.parse::<u64>().is_ok_and(|t| t.abs_diff(unix_now()) <= 5), "{request_time}");
        assert_eq!((body["CallbackCommand"].as_str(), body["GroupId"].as_str()), (Some(AFTER), Some("g")));
        assert!(body["EventTime"].as_u64().is_some(), "{body}");
        let item = &body["GroupMsgReceiptList"][0];
        let member = item["ReadReceiptMembers"][0]["Member_Account"].as_str().unwrap_or_default().to_owned();
        seen.push((item["MsgSeq"].as_u64(), item["ReadNum"].as_u64(), item["UnreadNum"].as_u64(), member));
    }
    let settled = within(sim.wait_for_callbacks(3)).await;

    let expected: Vec<_> = [(3, 2), (4, 1), (5, 0)]
        .into_iter()
        .map(|(read, unread)| (Some(1), Some(read), Some(unread), member_account(read - 1)))
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(settled, Deliveries { delivered: 3, failed: 0 });
    let items = call_ok(&client(), &url, "g", &[1]).await.items.expect("items");
    assert_eq!((items[0].read, items[0].unread), (Some(5), Some(0)));
    let (readers, _) = walk(&client(), &url, "g", 1, 0, 200).await;
    assert_eq!(readers, members(0..5));
    let reads = sim.reads();
    assert_eq!(reads.iter().map(|r| (r.read, r.unread)).collect::<Vec<_>>(), [(3, 2), (4, 1), (5, 0)]);
    // Evenly paced: the third read cannot come before three periods have passed.
    assert!(reads[2].at.duration_since(started) >= Duration::from_millis(60), "{:?}", reads[2].at - started);
    assert!(reads.windows(2).all(|w| w[0].at <= w[1].at));
}

#[tokio::test]
async fn messages_the_receipt_api_answered_become_playable() {
    let mut receiver = Receiver::start().await;
    let (sim, url, _server) = Simulator::spawn(with_player(player(&receiver.url, 100.0))).await.expect("spawn");
    sim.set_receipt("g", 9, 0, 1);

    call_ok(&client(), &url, "g", &[9, 2_000_000]).await;
    let (query, body) = receiver.next().await;

    assert_eq!((query.get("Sign"), query.get("RequestTime")), (None, None), "no token, no signature");
    let item = &body["GroupMsgReceiptList"][0];
    assert_eq!(
        (item["MsgSeq"].as_u64(), item["ReadNum"].as_u64(), item["UnreadNum"].as_u64()),
        (Some(9), Some(1), Some(0))
    );
    assert_eq!(sim.reads().len(), 1, "2000000 has no receipt, and 9 has no one left to read it");
}

#[tokio::test]
async fn failed_deliveries_are_counted_and_the_player_goes_on() {
    // A port that was just free: connecting to it is refused.
    let closed = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
    let url = format!("http://{}/callback", closed.local_addr().expect("an address"));
    drop(closed);
    let player = player(&url, 100.0).with_timeout(Duration::from_millis(500));
    let (sim, sim_url, _server) = Simulator::spawn(with_player(player)).await.expect("spawn");
    sim.set_receipt("g", 1, 0, 10);
    sim.play_group("g", [1]);

    let settled = within(sim.wait_for_callbacks(2)).await;

    assert_eq!(settled.delivered, 0);
    // Each failure is of one read, and the reads went on regardless.
    let failed = sim.callbacks_failed();
    assert!(failed >= 2 && failed <= sim.reads().len(), "{failed} failed, {} reads", sim.reads().len());
    let items = call_ok(&client(), &sim_url, "g", &[1]).await.items.expect("items");
    assert!(items[0].read >= Some(2), "{items:?}");
}
