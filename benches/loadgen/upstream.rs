//! The Tencent side: the simulator, in this process, and what its call ledger says about a
//! measured interval — calls per second, the most and the fewest calls in any rolling
//! second, 60007 answers, how many MsgSeqs each call carried and how many calls each group
//! took. The simulator stamps each
//! call with an `Instant` of this process, so the interval is the client's own.
//!
//! With a [`CallbackPlayer`] the simulator's members read, and [`Upstream::reads`] says
//! when each read was applied — again an `Instant` of this process. Its listener can be
//! bound first ([`Reserved`]) so that the gateway, which needs the simulator's URL, can be
//! started before the player, which needs the gateway's.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use receipt_gateway::simulator::{
    CallRecord, CallbackPlayer, PlayedRead, SimApp, SimOptions, Simulator, max_in_window,
};
use receipt_gateway::tencent::code::ErrorCode;
use receipt_gateway::tencent::domain::AppId;
use receipt_gateway::tencent::usersig::SecretKey;

use crate::Result;
use crate::cli::SimSettings;

/// The one app the benchmark configures, on both sides.
pub const SDKAPPID: u64 = 1_400_000_000;
pub const IDENTIFIER: &str = "administrator";
/// Known to the simulator and (through `LOADGEN_SECRET`) to the gateway; protects nothing.
pub const SECRET: &str = "receipt-loadgen-key-not-a-secret";
/// The app's callback token: the simulator's player and the load generator sign with it,
/// the gateway (through `LOADGEN_CALLBACK_TOKEN`) checks it. Protects nothing either.
pub const CALLBACK_TOKEN: &str = "receipt-loadgen-callback-token-not-a-secret";

const ROLLING: Duration = Duration::from_secs(1);

pub struct Upstream {
    sim: Simulator,
    url: String,
    /// Serves until dropped.
    _server: Serving,
}

/// The simulator's listener, bound before the simulator serves on it.
pub struct Reserved {
    listener: TcpListener,
    url: String,
}

impl Reserved {
    pub async fn bind() -> Result<Reserved> {
        let listener =
            TcpListener::bind(("127.0.0.1", 0)).await.map_err(|e| format!("cannot bind the simulator: {e}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        Ok(Reserved { listener, url })
    }

    /// The base URL the simulator will answer on.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// The simulator's serving task: stopped when dropped (its player with it).
struct Serving {
    _stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The simulator's view of one measured interval.
pub struct UpstreamStats {
    pub calls: usize,
    pub per_second: f64,
    /// The most calls sent in any rolling second inside the interval.
    pub max_rolling: usize,
    /// The fewest calls in any rolling second that lies wholly inside the interval.
    pub min_rolling: Option<usize>,
    pub rate_limited: usize,
    pub mean_seqs: f64,
    /// Calls by ErrorCode (-1: an HTTP fault or a dropped connection).
    pub codes: BTreeMap<ErrorCode, usize>,
}

impl Upstream {
    pub async fn start(s: &SimSettings) -> Result<Upstream> {
        Ok(Upstream::serve(Reserved::bind().await?, s, None))
    }

    /// The simulator on `reserved`, its members reading as `player` says (none: nobody
    /// reads).
    pub fn serve(reserved: Reserved, s: &SimSettings, player: Option<CallbackPlayer>) -> Upstream {
        let app = SimApp { app: AppId(SDKAPPID), identifier: IDENTIFIER.into(), key: SecretKey::new(SECRET) };
        let options =
            SimOptions { limit_per_second: s.limit, max_seqs: s.max_seqs, player, ..SimOptions::new(vec![app]) };
        let sim = Simulator::new(options);
        sim.set_latency(s.latency);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            // A dropped sender means the guard is gone: stop as well.
            let _ = stopped.await;
        };
        let task = tokio::spawn(sim.clone().serve(reserved.listener, shutdown));
        Upstream { sim, url: reserved.url, _server: Serving { _stop: stop, task } }
    }

    /// Makes the members read `seqs` of `group` (see [`Simulator::play_group`]).
    pub fn play_group(&self, group: &str, seqs: impl IntoIterator<Item = u64>) {
        self.sim.play_group(group, seqs);
    }

    /// Every read the members made so far, with the instant each was applied.
    pub fn reads(&self) -> Vec<PlayedRead> {
        self.sim.reads()
    }

    /// The player's callbacks so far: (answered 2xx, failed or refused).
    pub fn callbacks(&self) -> (usize, usize) {
        (self.sim.callbacks_delivered(), self.sim.callbacks_failed())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Holds every call from now on, unanswered, until [`Upstream::release_calls`] (an
    /// upstream that hangs).
    pub fn hold_calls(&self) {
        self.sim.hold_calls();
    }

    /// Answers every held call, and every later one at once.
    pub fn release_calls(&self) {
        self.sim.release_calls();
    }

    /// 60007 answers since the simulator started (warm-ups included).
    pub fn rate_limited_total(&self) -> usize {
        self.sim.count_code(ErrorCode::RATE_LIMITED)
    }

    pub fn call_count(&self) -> usize {
        self.sim.call_count()
    }

    pub fn stats(&self, from: std::time::Instant, to: std::time::Instant) -> UpstreamStats {
        let (from, to) = (Instant::from_std(from), Instant::from_std(to));
        let calls = self.calls_between(from, to);
        let arrivals: Vec<Instant> = calls.iter().map(|c| c.at).collect();
        let mut codes = BTreeMap::new();
        for call in &calls {
            *codes.entry(call.error_code).or_default() += 1;
        }
        let seqs: usize = calls.iter().map(|c| distinct(&c.seqs)).sum();
        UpstreamStats {
            calls: calls.len(),
            per_second: calls.len() as f64 / (to - from).as_secs_f64().max(f64::EPSILON),
            max_rolling: max_in_window(&arrivals, ROLLING),
            min_rolling: min_rolling(&arrivals, from, to),
            rate_limited: codes.get(&ErrorCode::RATE_LIMITED).copied().unwrap_or(0),
            mean_seqs: if calls.is_empty() { 0.0 } else { seqs as f64 / calls.len() as f64 },
            codes,
        }
    }

    /// Calls in `[from, to)` by the group they asked about.
    pub fn calls_by_group(&self, from: std::time::Instant, to: std::time::Instant) -> BTreeMap<String, usize> {
        let calls = self.calls_between(Instant::from_std(from), Instant::from_std(to));
        per_group(&calls)
    }

    fn calls_between(&self, from: Instant, to: Instant) -> Vec<CallRecord> {
        self.sim.calls().into_iter().filter(|c| c.at >= from && c.at < to).collect()
    }
}

/// How many of `calls` each group took (`?` for a call whose body did not parse).
fn per_group(calls: &[CallRecord]) -> BTreeMap<String, usize> {
    let mut groups = BTreeMap::new();
    for call in calls {
        *groups.entry(call.group.clone().unwrap_or_else(|| "?".to_owned())).or_default() += 1;
    }
    groups
}

fn distinct(seqs: &[u64]) -> usize {
    let mut seqs = seqs.to_vec();
    seqs.sort_unstable();
    seqs.dedup();
    seqs.len()
}

/// Calls in `[t, t + 1 s)`, `arrivals` sorted.
fn in_second(arrivals: &[Instant], t: Instant) -> usize {
    let first = arrivals.partition_point(|&a| a < t);
    let past = arrivals.partition_point(|&a| a < t + ROLLING);
    past - first
}

/// The quietest rolling second inside `[from, to)`: its count only drops when its start
/// passes an arrival, so the candidates are `from` and just after each arrival.
fn min_rolling(arrivals: &[Instant], from: Instant, to: Instant) -> Option<usize> {
    let last_start = to.checked_sub(ROLLING).filter(|&t| t >= from)?;
    let just_after = arrivals.iter().map(|&a| a + Duration::from_nanos(1));
    std::iter::once(from).chain(just_after).filter(|&t| t <= last_start).map(|t| in_second(arrivals, t)).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_seconds_find_the_busiest_and_quietest_windows() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let arrivals = [at(0), at(100), at(900), at(1000), at(1950), at(2500)];
        assert_eq!(max_in_window(&arrivals, ROLLING), 3);
        // [0, 3000): the window starting just after 1000 ms holds only 1950.
        assert_eq!(min_rolling(&arrivals, at(0), at(3000)), Some(1));
        assert_eq!(min_rolling(&arrivals, at(0), at(900)), None);
    }

    #[test]
    fn calls_are_counted_per_group() {
        let call = |group: Option<&str>| CallRecord {
            at: Instant::now(),
            api: receipt_gateway::simulator::SimApi::Receipt,
            app: Some(AppId(SDKAPPID)),
            group: group.map(str::to_owned),
            seqs: vec![1, 2],
            error_code: ErrorCode::OK,
            http_status: 200,
            sent_at_us: None,
        };
        let calls = [call(Some("loadgen-1")), call(Some("loadgen-2")), call(Some("loadgen-1")), call(None)];
        let groups = per_group(&calls);
        assert_eq!(groups.get("loadgen-1"), Some(&2));
        assert_eq!(groups.get("loadgen-2"), Some(&1));
        assert_eq!(groups.get("?"), Some(&1));
    }
}
