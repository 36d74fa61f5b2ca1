//! The member player: the simulator's group members reading messages.
//!
//! When [`SimOptions::player`](super::SimOptions) is set, [`Simulator::serve`] runs one
//! task that, every `1 / reads_per_second` seconds, picks the next playable (group, seq)
//! in turn, makes its next unread member read it (`ReadNum + 1`, `UnreadNum - 1`; a
//! message everyone has read is dropped from the turn) and delivers that read to the
//! callback URL as a signed `Group.CallbackAfterReadReceipt`, the way Tencent does.
//!
//! Playable are the (group, seq)s the receipt API answered with a receipt, and those a
//! test names with [`Simulator::play_group`]. The new counts are stored as overrides
//! before the callback is sent, so both APIs answer them from the instant in
//! [`PlayedRead::at`]: a benchmark measures from there how long the gateway took to show
//! a read.
//!
//! Deliveries run concurrently (at most [`MAX_IN_FLIGHT`]), each bounded by the player's
//! timeout; one that fails or gets no 2xx is counted in [`Simulator::callbacks_failed`]
//! and never stops the player. The task and its deliveries end with `serve`.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::tencent::domain::AppId;
use crate::tencent::usersig::SecretKey;
use crate::tencent::webhook::AFTER_READ_RECEIPT;

use super::Simulator;

/// How many (group, seq)s the player keeps in its turn; later ones are not played. A
/// load test asks about far more keys than a player at a few hundred reads a second
/// could ever get round to, and the set must not grow with every one of them.
pub const MAX_PLAYABLE: usize = 100_000;

/// Deliveries waiting for an answer at once; at the cap the player waits for one to end
/// before making the next read, so a stalled receiver slows it instead of piling up tasks.
pub const MAX_IN_FLIGHT: usize = 256;

/// The fastest pace accepted: beyond it the one task could not keep the even spacing.
pub const MAX_READS_PER_SECOND: f64 = 100_000.0;

/// How long one delivery may take unless [`CallbackPlayer::with_timeout`] says otherwise
/// (Tencent waits about as long for an app's callback).
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how fast the members read, and how the callbacks are signed.
#[derive(Clone, Debug)]
pub struct CallbackPlayer {
    url: Uri,
    reads_per_second: f64,
    /// The app's callback token (`Sign = hex(sha256(token + RequestTime))`); without one
    /// the callbacks carry no `Sign` and `RequestTime`, as with callback auth off.
    token: Option<SecretKey>,
    timeout: Duration,
}

/// Why a player configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlayerError {
    #[error("callback URL {0:?} must be an absolute http:// or https:// URL")]
    BadUrl(String),
    #[error("reads per second must be a number above 0 and at most {MAX_READS_PER_SECOND}, not {0}")]
    BadRate(f64),
}

impl CallbackPlayer {
    /// A player that delivers to `url` (`http://` or `https://`) at `reads_per_second`
    /// (above 0, at most [`MAX_READS_PER_SECOND`]), unsigned, with the default timeout.
    pub fn new(url: &str, reads_per_second: f64) -> Result<Self, PlayerError> {
        let parsed: Uri = url.parse().map_err(|_| PlayerError::BadUrl(url.to_owned()))?;
        let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
        if !scheme_ok || parsed.host().is_none_or(str::is_empty) {
            return Err(PlayerError::BadUrl(url.to_owned()));
        }
        if !(reads_per_second > 0.0 && reads_per_second <= MAX_READS_PER_SECOND) {
            return Err(PlayerError::BadRate(reads_per_second));
        }
        Ok(Self { url: parsed, reads_per_second, token: None, timeout: DEFAULT_DELIVERY_TIMEOUT })
    }

    /// Signs every callback with the app's callback token.
    pub fn with_token(self, token: SecretKey) -> Self {
        Self { token: Some(token), ..self }
    }

    /// Bounds each delivery by `timeout` instead of [`DEFAULT_DELIVERY_TIMEOUT`].
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    pub fn reads_per_second(&self) -> f64 {
        self.reads_per_second
    }

    /// The time between two reads; never zero (a zero period would make the timer panic).
    fn period(&self) -> Duration {
        let period = Duration::try_from_secs_f64(1.0 / self.reads_per_second).unwrap_or(Duration::from_secs(1));
        period.max(Duration::from_micros(1))
    }
}

/// One read the player made: who read which message, the counts after it, and when it
/// was applied (from then on both APIs answer these counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlayedRead {
    /// The app whose callback carried it (the one that asked about the message).
    pub app: AppId,
    pub group: String,
    pub seq: u64,
    /// The account that read (see [`super::member_account`]).
    pub member: String,
    /// `ReadNum` after the read.
    pub read: u64,
    /// `UnreadNum` after the read.
    pub unread: u64,
    pub at: Instant,
}

/// How the callbacks fared so far: each delivery ends as exactly one of the two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deliveries {
    /// Answered with a 2xx status.
    pub delivered: usize,
    /// Not answered in time, not answered at all, or answered with another status.
    pub failed: usize,
}

impl Deliveries {
    pub fn settled(&self) -> usize {
        self.delivered + self.failed
    }
}

/// The player's turn: playable (group, seq)s in the order they became playable, visited
/// round-robin, each with the app that asked about it.
#[derive(Debug, Default)]
pub(super) struct Playable {
    keys: Vec<(AppId, String, u64)>,
    known: HashSet<(String, u64)>,
    next: usize,
}

impl Playable {
    /// Adds (group, seq) to the turn unless it is in it already or the turn is full.
    pub fn offer(&mut self, app: AppId, group: &str, seq: u64) {
        if self.keys.len() >= MAX_PLAYABLE {
            return;
        }
        if self.known.insert((group.to_owned(), seq)) {
            self.keys.push((app, group.to_owned(), seq));
        }
    }

    /// The next key whose `unread` is above 0, dropping the ones passed over on the way
    /// (a dropped key becomes playable again if it is offered again).
    pub fn pick(&mut self, unread: impl Fn(&str, u64) -> u64) -> Option<(AppId, String, u64)> {
        while !self.keys.is_empty() {
            if self.next >= self.keys.len() {
                self.next = 0;
            }
            let (app, group, seq) = &self.keys[self.next];
            if unread(group, *seq) > 0 {
                let picked = (*app, group.clone(), *seq);
                self.next += 1;
                return Some(picked);
            }
            let (_, group, seq) = self.keys.swap_remove(self.next);
            self.known.remove(&(group, seq));
        }
        None
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

type CallbackClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The player task; see the module docs. Returns only if no HTTP client can be built.
pub(super) async fn run(sim: Simulator, player: CallbackPlayer) {
    let client = match client() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "simulator: no HTTP client for callbacks; the members will not read");
            return;
        }
    };
    let period = player.period();
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    // Late ticks are not made up in a burst: the reads stay evenly spaced.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut deliveries = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = deliveries.join_next() => {}
            _ = ticks.tick() => {
                while deliveries.len() >= MAX_IN_FLIGHT {
                    let _ = deliveries.join_next().await;
                }
                let Some(read) = sim.state().play_read(Instant::now()) else { continue };
                let request = callback_request(&player, &read, SystemTime::now());
                deliveries.spawn(deliver(sim.clone(), client.clone(), request, player.timeout));
            }
        }
    }
}

fn client() -> Result<CallbackClient, rustls::Error> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// The callback for one read, as Tencent sends it: `POST URL?SdkAppid=…&CallbackCommand=
/// Group.CallbackAfterReadReceipt&contenttype=json&ClientIP=…&OptPlatform=…`, plus
/// `RequestTime` and `Sign` when there is a token, with the new counts and the reader.
fn callback_request(
    player: &CallbackPlayer,
    read: &PlayedRead,
    now: SystemTime,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut query = format!(
        "SdkAppid={}&CallbackCommand={AFTER_READ_RECEIPT}&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI",
        read.app
    );
    if let Some(token) = &player.token {
        let request_time = since_epoch.as_secs().to_string();
        let sign = crate::tencent::webhook::sign(token.expose().as_bytes(), &request_time);
        query.push_str(&format!("&RequestTime={request_time}&Sign={sign}"));
    }
    let separator = if player.url.query().is_some() { '&' } else { '?' };
    let event_time = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX);
    let body = json!({
        "CallbackCommand": AFTER_READ_RECEIPT,
        "GroupId": read.group,
        "Type": "Public",
        "GroupMsgReceiptList": [{
            "MsgSeq": read.seq,
            "ReadNum": read.read,
            "UnreadNum": read.unread,
            "ReadReceiptMembers": [{ "Member_Account": read.member }],
        }],
        "EventTime": event_time,
    });
    Request::builder()
        .method(Method::POST)
        .uri(format!("{}{separator}{query}", player.url))
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(Full::new(Bytes::from(body.to_string())))
}

/// Sends one callback and counts how it ended.
async fn deliver(
    sim: Simulator,
    client: CallbackClient,
    request: Result<Request<Full<Bytes>>, http::Error>,
    timeout: Duration,
) {
    let attempt = async {
        let response = client.request(request.map_err(|e| e.to_string())?).await.map_err(|e| e.to_string())?;
        let status = response.status();
        // Read the answer whole so the connection can be reused.
        response.into_body().collect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(status)
    };
    let ok = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(status)) if status.is_success() => true,
        Ok(Ok(status)) => {
            tracing::debug!(status = status.as_u16(), "simulator: callback refused");
            false
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "simulator: callback failed");
            false
        }
        Err(_) => {
            tracing::debug!(timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), "callback timed out");
            false
        }
    };
    sim.inner.deliveries.send_modify(|d| if ok { d.delivered += 1 } else { d.failed += 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_player_needs_an_http_url_and_a_sane_rate() {
        assert!(CallbackPlayer::new("http://127.0.0.1:8080/callback", 10.0).is_ok());
        assert!(CallbackPlayer::new("https://example.com/cb?x=1", 0.5).is_ok());
        for url in ["127.0.0.1:8080", "ftp://example.com/", "/callback", "http://"] {
            assert_eq!(CallbackPlayer::new(url, 1.0).map(|_| ()), Err(PlayerError::BadUrl(url.into())), "{url}");
        }
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, MAX_READS_PER_SECOND * 2.0] {
            assert!(matches!(CallbackPlayer::new("http://h/", rate), Err(PlayerError::BadRate(_))), "{rate}");
        }
    }

    #[test]
    fn the_period_spaces_reads_evenly() {
        let player = CallbackPlayer::new("http://h/", 4.0).map(|p| p.period());
        assert_eq!(player, Ok(Duration::from_millis(250)));
    }

    #[test]
    fn the_turn_is_round_robin_without_duplicates_and_bounded() {
        let mut turn = Playable::default();
        turn.offer(AppId(1), "a", 1);
        turn.offer(AppId(1), "b", 1);
        turn.offer(AppId(2), "a", 1);
        let picks: Vec<String> = (0..4).filter_map(|_| turn.pick(|_, _| 1)).map(|(_, g, _)| g).collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
        // Exhausted keys leave the turn and can come back.
        assert_eq!(turn.pick(|g, _| u64::from(g == "b")).map(|(_, g, _)| g), Some("b".into()));
        assert_eq!(turn.len(), 1);
        assert_eq!(turn.pick(|_, _| 0), None);
        turn.offer(AppId(1), "a", 1);
        assert_eq!(turn.len(), 1);
        for seq in 0..(MAX_PLAYABLE as u64 + 10) {
            turn.offer(AppId(1), "many", seq);
        }
        assert_eq!(turn.len(), MAX_PLAYABLE);
    }

    #[tokio::test]
    async fn a_callback_is_signed_and_shaped_like_tencents() {
        let player =
            CallbackPlayer::new("http://127.0.0.1:9/callback", 1.0).map(|p| p.with_token(SecretKey::new("tok")));
        let Ok(player) = player else { panic!("a valid player") };
        let read = PlayedRead {
            app: AppId(1_400_000_000),
            group: "g".into(),
            seq: 7,
            member: "member-3".into(),
            read: 4,
            unread: 2,
            at: Instant::now(),
        };
        let now = UNIX_EPOCH + Duration::from_millis(1_670_574_414_123);

        let Ok(request) = callback_request(&player, &read, now) else { panic!("a valid request") };

        let sign = crate::tencent::webhook::sign(b"tok", "1670574414");
        let expected = format!(
            "http://127.0.0.1:9/callback?SdkAppid=1400000000&CallbackCommand=Group.CallbackAfterReadReceipt\
             &contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI&RequestTime=1670574414&Sign={sign}"
        );
        assert_eq!(request.uri().to_string(), expected);
        assert_eq!(request.method(), Method::POST);
        let Ok(body) = request.into_body().collect().await.map(|b| b.to_bytes());
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(
            value,
            json!({"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"g","Type":"Public",
                   "GroupMsgReceiptList":[{"MsgSeq":7,"ReadNum":4,"UnreadNum":2,
                                           "ReadReceiptMembers":[{"Member_Account":"member-3"}]}],
                   "EventTime":1_670_574_414_123_u64})
        );
    }
}
