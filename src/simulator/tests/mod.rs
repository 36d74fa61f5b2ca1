//! The simulator as a client sees it: every test starts a real simulator on
//! `127.0.0.1:0` and talks HTTP to it, so routing, the phases and the ledger are tested
//! together. Helpers shared by the test files live here; each file tests one part.

mod detail;
mod fault;
mod player;
mod receipt;
mod server;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::call::unix_now;
use super::rules::QueryParams;
use super::server::MAX_BODY_BYTES;
use super::{
    CallbackPlayer, Deliveries, Fault, FinishField, NO_ERROR_CODE, SimApi, SimApp, SimOptions, Simulator,
    default_receipt, member_account,
};
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, MsgSeq};
use crate::tencent::usersig::{self, SecretKey};
use crate::tencent::wire::{DETAIL_PATH, RECEIPT_PATH, ReceiptItem, ReceiptResponse};

const APP: AppId = AppId(1_400_000_000);
const ADMIN: &str = "administrator";
const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(2);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn options() -> SimOptions {
    SimOptions::new(vec![SimApp { app: APP, identifier: ADMIN.into(), key: SecretKey::new(KEY) }])
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(value) => value,
        Err(_) => panic!("no answer within {WAIT:?}"),
    }
}

fn signed_query(key: &str, identifier: &str, time: u64) -> String {
    let sig = usersig::sign(APP, &SecretKey::new(key), identifier, time, 86_400);
    format!("sdkappid={APP}&identifier={identifier}&usersig={}&random=12345&contenttype=json", sig.expose())
}

fn good_query() -> String {
    signed_query(KEY, ADMIN, unix_now())
}

fn body(group: &str, seqs: &[u64]) -> String {
    let list: Vec<String> = seqs.iter().map(|s| format!(r#"{{"MsgSeq":{s}}}"#)).collect();
    format!(r#"{{"GroupId":"{group}","MsgSeqList":[{}]}}"#, list.join(","))
}

/// Sends one call; the answer's status and raw body.
async fn send(
    client: &HttpClient,
    url: &str,
    method: Method,
    path_and_query: &str,
    body: String,
) -> Result<(StatusCode, Bytes), hyper_util::client::legacy::Error> {
    let request = Request::builder()
        .method(method)
        .uri(format!("{url}{path_and_query}"))
        .body(Full::new(Bytes::from(body)))
        .expect("a valid test request");
    let response = within(client.request(request)).await?;
    let status = response.status();
    let bytes = within(response.into_body().collect()).await.expect("a whole body").to_bytes();
    Ok((status, bytes))
}

/// A receipt call that must be answered with JSON.
async fn call(client: &HttpClient, url: &str, query: &str, body: String) -> (StatusCode, ReceiptResponse) {
    let (status, bytes) =
        send(client, url, Method::POST, &format!("{RECEIPT_PATH}?{query}"), body).await.expect("an answer");
    let reply = serde_json::from_slice(&bytes).expect("a Tencent-shaped body");
    (status, reply)
}

async fn call_ok(client: &HttpClient, url: &str, group: &str, seqs: &[u64]) -> ReceiptResponse {
    call(client, url, &good_query(), body(group, seqs)).await.1
}

fn item(group: &str, seq: u64) -> ReceiptItem {
    ReceiptItem::new(MsgSeq(seq), default_receipt(group, seq))
}

fn detail_body(group: &str, seq: u64, filter: u8, cursor: &str, count: u64) -> String {
    format!(r#"{{"GroupId":"{group}","MsgSeq":{seq},"Filter":{filter},"Cursor":"{cursor}","Count":{count}}}"#)
}

/// A detail call that must be answered with JSON.
async fn detail(client: &HttpClient, url: &str, query: &str, body: String) -> (StatusCode, serde_json::Value) {
    let (status, bytes) =
        send(client, url, Method::POST, &format!("{DETAIL_PATH}?{query}"), body).await.expect("an answer");
    (status, serde_json::from_slice(&bytes).expect("a JSON body"))
}

/// Walks every page of one list; the accounts in order, and how many pages it took.
async fn walk(client: &HttpClient, url: &str, group: &str, seq: u64, filter: u8, count: u64) -> (Vec<String>, usize) {
    let (list, field) = if filter == 0 { ("ReadList", "Read_Account") } else { ("UnreadList", "Unread_Account") };
    let (mut accounts, mut cursor, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let (_, page) = detail(client, url, &good_query(), detail_body(group, seq, filter, &cursor, count)).await;
        assert_eq!(page["ErrorCode"], 0, "{page}");
        assert_eq!((page["GroupId"].as_str(), page["MsgSeq"].as_u64()), (Some(group), Some(seq)));
        pages += 1;
        let entries = page[list].as_array().cloned().unwrap_or_default();
        assert!(entries.len() as u64 <= count, "{page}");
        accounts.extend(entries.iter().filter_map(|e| e[field].as_str()).map(str::to_owned));
        cursor = page["Cursor"].as_str().unwrap_or_default().to_owned();
        match page["IsFinish"].as_u64() {
            Some(1) => {
                assert_eq!(cursor, "", "the last page has no next cursor");
                return (accounts, pages);
            }
            Some(0) => assert!(!cursor.is_empty(), "{page}"),
            _ => panic!("no IsFinish in {page}"),
        }
        assert!(pages < 1000, "paging does not end");
    }
}

fn members(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(member_account).collect()
}
