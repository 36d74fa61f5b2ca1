//! The `callbacks` scenario's ingest phase: how many callbacks `POST /callback` takes,
//! and how fast (issue 9: ≥ 5,000 callbacks/s with p99 < 5 ms).
//!
//! A fresh gateway (`apps.callbacks = true`, with a callback token) and no read load. This
//! process sends signed `Group.CallbackAfterReadReceipt` callbacks, one item each, every
//! one for a group no other callback named (`ingest-<n>`), as an open loop at
//! `--callback-rate`: latency counted from each callback's scheduled send time, so a
//! stall cannot hide. Reported: the rate answered 200, latency, non-200 answers, and the
//! gateway's CPU time per callback (`/proc/<pid>/stat` over the measured interval).
//!
//! Then a cross-check with `wrk` when it is installed: a closed loop (wrk cannot hold a
//! rate) for a few seconds, its own Lua script sending the same callbacks for groups
//! `wrk-<thread>-<n>`. Its rate is the most the gateway takes beside wrk on this machine;
//! its latencies are under that saturation, not at the open loop's rate.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Uri;
use tokio::task::JoinSet;

use receipt_gateway::tencent::webhook::{AFTER_READ_RECEIPT, CALLBACK_PATH, sign};

use super::super::{Check, Verdict, or_dash, share, status_line};
use crate::Result;
use crate::cli::{CallbackAuth, GatewaySettings, Settings};
use crate::client::{HttpClient, Outcome, http_client, post_json};
use crate::drive::{self, Schedule, wait_for_turn};
use crate::gateway::{self, Gateway};
use crate::record::{Recorder, Sample, ms};
use crate::upstream::{CALLBACK_TOKEN, SDKAPPID, Upstream};
use crate::wrk;

const WARMUP: Duration = Duration::from_secs(1);
const MEASURED: Duration = Duration::from_secs(4);

/// Callbacks in flight at most (the open loop's workers).
const CONNECTIONS: usize = 128;

/// A callback not answered within this counts as hung.
const TIMEOUT: Duration = Duration::from_secs(1);

/// The issue's targets.
const RATE_TARGET: f64 = 5000.0;
const P99_TARGET: Duration = Duration::from_millis(5);

/// Of the callbacks offered, the share that must be answered 200 for the rate to count
/// as handled.
const ANSWERED_AT_LEAST: f64 = 0.999;

/// wrk's run: threads, connections, seconds.
const WRK_THREADS: usize = 2;
const WRK_CONNECTIONS: usize = 16;
const WRK_SECONDS: u64 = 4;

pub(super) async fn ingest(bin: &Path, s: &Settings) -> Result<Verdict> {
    let rate = s.callbacks.ingest_rate;
    println!(
        "\n-- ingest: signed {AFTER_READ_RECEIPT} callbacks (one item, every one a new group) straight to POST \
         {CALLBACK_PATH}, open loop {rate:.0}/s on {CONNECTIONS} connections, {:.0} s warm-up + {:.0} s measured; a \
         fresh gateway with apps.callbacks = true and callback_token_env, no read load",
        WARMUP.as_secs_f64(),
        MEASURED.as_secs_f64()
    );
    let upstream = Upstream::start(&s.sim).await?;
    let admin = http_client(2);
    let settings = GatewaySettings { callbacks: CallbackAuth::Signed, ..s.gateway.clone() };
    let gateway = Gateway::start(bin, &settings, upstream.url(), None, &admin).await?;
    let load =
        Arc::new(CallbackLoad { client: http_client(CONNECTIONS), base: format!("http://{}", gateway.data), rate });
    let schedule = Schedule::starting_now(WARMUP, MEASURED);
    let samples = async {
        tokio::time::sleep_until(schedule.measure_from.into()).await;
        let before = (gateway.cpu_time(), gateway.metrics(&admin).await);
        tokio::time::sleep_until(schedule.end.into()).await;
        let after = (gateway.cpu_time(), gateway.metrics(&admin).await);
        (before, after)
    };
    let (mut recorder, ((cpu_before, metrics_before), (cpu_after, metrics_after))) =
        tokio::join!(load.run(schedule), samples);
    let cpu = cpu_after?.saturating_sub(cpu_before?);
    let run = IngestRun { recorder: &mut recorder, offered: rate, cpu };
    let verdict = run.print_and_judge();
    match (metrics_before, metrics_after) {
        (Ok(before), Ok(after)) => println!(
            "gateway: receipt_gateway_callbacks_total over the measured interval: {}",
            super::callback_counts(&after.callbacks_since(&before))
        ),
        (Err(e), _) | (_, Err(e)) => println!("gateway: cannot read /metrics: {e}"),
    }
    cross_check_with_wrk(&gateway, &admin).await;
    gateway.stop().await;
    Ok(verdict)
}

/// The open loop of callbacks.
struct CallbackLoad {
    client: HttpClient,
    /// `http://<gateway data address>`.
    base: String,
    rate: f64,
}

impl CallbackLoad {
    async fn run(self: &Arc<Self>, schedule: Schedule) -> Recorder {
        let next_ticket = Arc::new(AtomicU64::new(0));
        let mut workers = JoinSet::new();
        for _ in 0..CONNECTIONS {
            let (load, next_ticket) = (self.clone(), next_ticket.clone());
            workers.spawn(async move { load.worker(&next_ticket, schedule).await });
        }
        drive::merge_workers(workers).await
    }

    async fn worker(&self, next_ticket: &AtomicU64, schedule: Schedule) -> Recorder {
        let mut recorder = Recorder::default();
        loop {
            let ticket = next_ticket.fetch_add(1, Ordering::Relaxed);
            let at = schedule.start + Duration::from_secs_f64(ticket as f64 / self.rate);
            if at >= schedule.end {
                return recorder;
            }
            wait_for_turn(at).await;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let uri = format!("{}{}", self.base, signed_path(now.as_secs()));
            let event_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            let body = callback_body(&format!("ingest-{ticket}"), event_ms);
            let sent = Instant::now();
            let outcome = match uri.parse::<Uri>() {
                Ok(uri) => post_json(&self.client, uri, body, TIMEOUT).await,
                // The address and the query are this module's own: cannot happen.
                Err(_) => Outcome::Failed,
            };
            let done = Instant::now();
            if at >= schedule.measure_from {
                let sample = Sample {
                    outcome,
                    sent,
                    latency: done.duration_since(at.min(sent)),
                    service: done - sent,
                    queued: sent.saturating_duration_since(at),
                };
                recorder.record(sample, TIMEOUT);
            }
        }
    }
}

/// `/callback?…` as Tencent sends it, signed for `request_time` (Unix seconds).
fn signed_path(request_time: u64) -> String {
    let time = request_time.to_string();
    let sign = sign(CALLBACK_TOKEN.as_bytes(), &time);
    format!(
        "{CALLBACK_PATH}?SdkAppid={SDKAPPID}&CallbackCommand={AFTER_READ_RECEIPT}&contenttype=json\
         &ClientIP=127.0.0.1&OptPlatform=RESTAPI&RequestTime={time}&Sign={sign}"
    )
}

/// One read of MsgSeq 1 of `group`, as the simulator's player sends it.
fn callback_body(group: &str, event_ms: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"CallbackCommand":"{AFTER_READ_RECEIPT}","GroupId":"{group}","Type":"Public","GroupMsgReceiptList":[{{"MsgSeq":1,"ReadNum":1,"UnreadNum":9,"ReadReceiptMembers":[{{"Member_Account":"member-0"}}]}}],"EventTime":{event_ms}}}"#
    ))
}

/// What the open loop saw, and the gateway's CPU time over the measured interval.
struct IngestRun<'a> {
    recorder: &'a mut Recorder,
    offered: f64,
    cpu: Duration,
}

impl IngestRun<'_> {
    fn print_and_judge(self) -> Verdict {
        let seconds = MEASURED.as_secs_f64();
        let r = self.recorder;
        let ok = r.status(200);
        println!(
            "answered: {} of {} sent; 200: {:.0}/s of {:.0}/s offered; non-200 answers: {}",
            r.answered(),
            r.sent(),
            ok as f64 / seconds,
            self.offered,
            r.answered() - ok
        );
        println!("status: {}", status_line(r));
        let p = r.percentiles();
        let pick = |f: fn(&crate::record::Percentiles) -> Duration| or_dash(p.as_ref().map(f));
        println!(
            "latency (from the scheduled send): p50 {}, p99 {}, p99.9 {}, max {}",
            pick(|p| p.p50),
            pick(|p| p.p99),
            pick(|p| p.p999),
            pick(|p| p.max)
        );
        if let Some(queued) = r.queued_p99().filter(|q| *q > Duration::from_millis(1)) {
            println!("  note: p99 of callbacks were sent up to {} late: this client short of CPU", ms(queued));
        }
        println!(
            "gateway CPU: {} over the measured interval = {} per callback answered",
            ms(self.cpu),
            per_item(self.cpu, r.answered())
        );
        verdict(self.offered, r.sent(), ok, p.map(|p| p.p99))
    }
}

/// `12.3 us` of `cpu` per one of `n`.
fn per_item(cpu: Duration, n: u64) -> String {
    if n == 0 { "-".to_owned() } else { format!("{:.1} us", cpu.as_secs_f64() * 1e6 / n as f64) }
}

/// The issue's targets: the offered rate at least 5,000/s and (nearly) all of it answered
/// 200; p99 under 5 ms.
fn verdict(offered: f64, sent: u64, ok: u64, p99: Option<Duration>) -> Verdict {
    let answered = share(ok, sent);
    Verdict::new(vec![
        Check::new(
            format!(">= {RATE_TARGET:.0} callbacks/s: all offered answered 200"),
            format!("{:.2} % of {sent} at {offered:.0}/s offered", answered * 100.0),
            offered >= RATE_TARGET && sent > 0 && answered >= ANSWERED_AT_LEAST,
        ),
        Check::new(
            format!("p99 < {} ms at that rate", P99_TARGET.as_millis()),
            or_dash(p99),
            p99.is_some_and(|p| p < P99_TARGET),
        ),
    ])
}

// ---------------------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------------------

/// Runs wrk against the gateway's `/callback` and prints what it and the gateway's CPU
/// say; a missing or failing wrk is reported and skipped.
async fn cross_check_with_wrk(gateway: &Gateway, admin: &HttpClient) {
    let dir = match gateway::temp_dir() {
        Ok(dir) => dir,
        Err(e) => return println!("wrk: skipped, {e}"),
    };
    let script = dir.join("callbacks.lua");
    let request_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if let Err(e) = std::fs::write(&script, wrk_script(&signed_path(request_time), request_time * 1000)) {
        let _ = std::fs::remove_dir_all(&dir);
        return println!("wrk: skipped, cannot write {}: {e}", script.display());
    }
    let before = (gateway.cpu_time(), gateway.metrics(admin).await);
    let url = format!("http://{}{CALLBACK_PATH}", gateway.data);
    let run = wrk::Run {
        threads: WRK_THREADS,
        connections: WRK_CONNECTIONS,
        seconds: WRK_SECONDS,
        script: &script,
        url: &url,
    };
    let outcome = wrk::run(Path::new("wrk"), &run).await.map_err(|e| format!("{e}; cross-check skipped"));
    let after = (gateway.cpu_time(), gateway.metrics(admin).await);
    let _ = std::fs::remove_dir_all(&dir);
    let result = match outcome {
        Ok(result) => result,
        Err(e) => return println!("wrk: {e}"),
    };
    let cpu = match (before.0, after.0) {
        (Ok(before), Ok(after)) => per_item(after.saturating_sub(before), result.requests),
        _ => "-".to_owned(),
    };
    let counted = match (before.1, after.1) {
        (Ok(before), Ok(after)) => super::callback_counts(&after.callbacks_since(&before)),
        _ => "-".to_owned(),
    };
    println!(
        "wrk (closed loop, {WRK_THREADS} threads, {WRK_CONNECTIONS} connections, {WRK_SECONDS} s, on the same two \
         cores): {} callbacks = {:.0}/s; latency p50 {}, p99 {}; non-2xx {}, socket errors {}; gateway CPU {cpu} per \
         callback; receipt_gateway_callbacks_total {counted}",
        result.requests,
        result.per_second(),
        ms(result.p50),
        ms(result.p99),
        result.non_2xx,
        result.socket_errors
    );
}

/// wrk's Lua script: each thread numbers its own groups; the signature (for the run's
/// start, valid for a minute) and the body's shape are those of the open loop.
fn wrk_script(path: &str, event_ms: u64) -> String {
    let body_head = format!(
        r#"{{"CallbackCommand":"{AFTER_READ_RECEIPT}","Type":"Public","GroupMsgReceiptList":[{{"MsgSeq":1,"ReadNum":1,"UnreadNum":9,"ReadReceiptMembers":[{{"Member_Account":"member-0"}}]}}],"EventTime":{event_ms},"GroupId":"wrk-"#
    );
    format!(
        r#"-- Written by receipt-loadgen: signed callbacks, one new group each.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
local n = 0
local headers = {{ ["Content-Type"] = "application/json" }}
function request()
  n = n + 1
  return wrk.format("POST", "{path}", headers, '{body_head}' .. id .. "-" .. n .. '"}}')
end
{done}"#,
        done = wrk::DONE_HOOK
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn met(v: &Verdict) -> Vec<bool> {
        v.checks.iter().map(|c| c.met).collect()
    }

    #[test]
    fn the_ingest_verdict_wants_5000_per_second_answered_and_a_p99_under_5_ms() {
        let p99 = |us| Some(Duration::from_micros(us));
        assert_eq!(met(&verdict(5000.0, 20_000, 20_000, p99(4_999))), [true, true]);
        assert_eq!(met(&verdict(5000.0, 20_000, 19_980, p99(5_000))), [true, false]);
        assert_eq!(met(&verdict(5000.0, 20_000, 19_979, p99(900))), [false, true]);
        assert_eq!(met(&verdict(4000.0, 16_000, 16_000, p99(900))), [false, true], "a lower offered rate proves less");
        assert_eq!(met(&verdict(5000.0, 0, 0, None)), [false, false]);
    }

    #[test]
    fn callbacks_are_signed_as_the_gateway_checks_and_shaped_as_the_player_sends() {
        let path = signed_path(1_669_872_112);
        let query = path.strip_prefix("/callback?").unwrap_or_default();
        let param = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
        assert_eq!(param("SdkAppid"), Some("1400000000"));
        assert_eq!(param("CallbackCommand"), Some(AFTER_READ_RECEIPT));
        assert_eq!(param("RequestTime"), Some("1669872112"));
        assert_eq!(param("Sign").map(str::to_owned), Some(sign(CALLBACK_TOKEN.as_bytes(), "1669872112")));
        let body: serde_json::Value =
            serde_json::from_slice(&callback_body("ingest-7", 1_669_872_112_000)).expect("json");
        assert_eq!(body["GroupId"], "ingest-7");
        assert_eq!(body["EventTime"], 1_669_872_112_000_u64);
        assert_eq!(body["GroupMsgReceiptList"][0]["ReadNum"], 1);
    }

    #[test]
    fn the_wrk_script_posts_the_signed_path_with_a_group_per_request() {
        let script = wrk_script("/callback?SdkAppid=1&Sign=ab", 5);
        assert!(script.contains(r#"wrk.format("POST", "/callback?SdkAppid=1&Sign=ab", headers,"#));
        assert!(script.contains(r#""GroupId":"wrk-' .. id .. "-" .. n .. '"}'"#));
        assert!(script.ends_with(wrk::DONE_HOOK));
    }
}
