//! The `warm` scenario's servers: started once in front of one simulator, their caches
//! filled, and each one's answer checked before anything is measured.
//!
//! Every request of the run is prepared here: [`BODY_POOL`] bodies of the mix (the own
//! client takes them in turn; wrk sends the first), all POSTed to the receipt path with a
//! query Tencent would accept — `sdkappid`, `identifier`, a UserSig signed for the
//! simulator's app, `random`, `contenttype`. The gateway ignores the caller's UserSig and
//! signs its own; nginx forwards the query as it is, so without a valid one its cache
//! would hold the simulator's 70009 refusal.
//!
//! What each answer must be is known without asking anyone: the simulator answers
//! `default_receipt` for every MsgSeq, serialised as [`ReceiptResponse::to_bytes`] does,
//! and the gateway, nginx (a cached copy) and the parsing hyper server must answer those
//! very bytes; the fixed-body server as many bytes.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use receipt_gateway::simulator::default_receipt;
use receipt_gateway::tencent::domain::AppId;
use receipt_gateway::tencent::usersig::{self, SecretKey};
use receipt_gateway::tencent::wire::{RECEIPT_PATH, ReceiptItem, ReceiptRequest, ReceiptResponse};

use super::Server;
use crate::Result;
use crate::baseline::Baseline;
use crate::cli::{BaselineKind, GatewaySettings, LogFormat, Settings};
use crate::client::{Targets, http_client};
use crate::conn::{self, Requests};
use crate::drive::{self, Load};
use crate::gateway::{self, Gateway};
use crate::mix::Mix;
use crate::nginx::{AccessLog, Nginx};
use crate::tools;
use crate::upstream::{IDENTIFIER, SDKAPPID, SECRET, Upstream};
use crate::wrk;

/// Distinct request bodies of a run: every one is in nginx's cache before it is measured.
pub const BODY_POOL: usize = 100;

/// nginx's cache is filled at this many requests a second, each a call to the simulator,
/// which allows 200 in any rolling second (and answers a 60007 over that, with HTTP 200,
/// which nginx would cache).
const NGINX_FILL_PER_SECOND: f64 = 100.0;

/// Before each fill, the simulator's rolling second of the previous one runs out.
const ROLLING_SECOND: Duration = Duration::from_millis(1100);

/// How long the UserSig of the run is valid.
const USERSIG_SECONDS: u64 = 86_400;

const PROBE_WITHIN: Duration = Duration::from_secs(5);

/// A server of the run.
pub enum Running {
    Gateway(Gateway),
    Nginx(Nginx),
    Baseline(Baseline),
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Running::Gateway(g) => g.data,
            Running::Nginx(n) => n.addr,
            Running::Baseline(b) => b.addr,
        }
    }

    /// CPU time spent so far (nginx: its workers').
    pub fn cpu_time(&self) -> Result<Duration> {
        match self {
            Running::Gateway(g) => g.cpu_time(),
            Running::Nginx(n) => n.cpu_time(),
            Running::Baseline(b) => gateway::cpu_time(b.pid()),
        }
    }

    async fn stop(self) {
        match self {
            Running::Gateway(g) => g.stop().await,
            Running::Nginx(n) => n.stop().await,
            Running::Baseline(b) => drop(b),
        }
    }
}

pub struct Peers {
    /// Serves until dropped.
    _upstream: Upstream,
    servers: Vec<(Server, Running)>,
    path_and_query: String,
    bodies: Vec<Bytes>,
    deadline: Duration,
    /// The wrk script's directory (removed at the end).
    dir: PathBuf,
    wrk_script: PathBuf,
    /// Log files of the logging comparison and their size once the cache was filled.
    logs: Vec<(Server, PathBuf, u64)>,
    keep_temp: bool,
}

impl Peers {
    /// Starts the `wanted` servers that can run here (nginx skipped, with the reason, when
    /// it is neither installed nor installable), fills their caches and checks each one's
    /// answer.
    pub async fn start(bin: &Path, s: &Settings, wanted: &[Server]) -> Result<Peers> {
        let upstream = Upstream::start(&s.sim).await?;
        let sim: SocketAddr = upstream.url().trim_start_matches("http://").parse()?;
        let mix = Mix::new(&s.mix);
        let mut rng = SmallRng::seed_from_u64(s.mix.seed);
        let bodies: Vec<Bytes> = (0..BODY_POOL).map(|_| mix.next_body(&mut rng)).collect();
        let expected: Vec<Bytes> =
            bodies.iter().map(|b| expected_answer(b, s.gateway.max_seqs)).collect::<Result<_>>()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let dir = gateway::temp_dir()?;
        let wrk_script = dir.join("warm.lua");
        let deadline_ms = s.load.deadline.as_millis().to_string();
        let body0 = String::from_utf8_lossy(&bodies[0]).into_owned();
        fs::write(
            &wrk_script,
            wrk::post_script(&body0, &[("Content-Type", "application/json"), ("X-Request-Timeout-Ms", &deadline_ms)]),
        )?;
        let mut peers = Peers {
            _upstream: upstream,
            servers: Vec::new(),
            path_and_query: signed_path_and_query(now),
            bodies,
            deadline: s.load.deadline,
            dir,
            wrk_script,
            logs: Vec::new(),
            keep_temp: s.gateway.keep_temp,
        };
        println!("\n-- the servers, each answer checked: {} request bodies; the answer to the first:", BODY_POOL);
        let mut nginx_bin: Option<std::result::Result<PathBuf, String>> = None;
        for &server in wanted {
            if !peers.servers.is_empty() {
                tokio::time::sleep(ROLLING_SECOND).await;
            }
            let running = match server {
                Server::Gateway | Server::GatewayLogging => {
                    let settings = match server {
                        Server::GatewayLogging => GatewaySettings {
                            log_level: "info".into(),
                            log_format: LogFormat::Json,
                            ..s.gateway.clone()
                        },
                        _ => s.gateway.clone(),
                    };
                    Running::Gateway(peers.gateway(bin, &settings, s).await?)
                }
                Server::Nginx | Server::NginxLogging => {
                    let found = nginx_bin.get_or_insert_with(|| tools::find_or_install(tools::NGINX));
                    let nginx = match found {
                        Ok(path) => path.clone(),
                        Err(why) => {
                            println!("{:<38} skipped: {why}", server.label());
                            continue;
                        }
                    };
                    let log = if server == Server::NginxLogging { AccessLog::File } else { AccessLog::Off };
                    let nginx = Nginx::start(&nginx, sim, log, s.gateway.keep_temp).await?;
                    peers.fill_nginx(&nginx, &expected).await?;
                    Running::Nginx(nginx)
                }
                Server::Hyper => Running::Baseline(Baseline::start(BaselineKind::Parsing, 0).await?),
                Server::HyperFixed => Running::Baseline(Baseline::start(BaselineKind::Fixed, expected[0].len()).await?),
            };
            let check = peers.check(server, &running, &expected[0]).await;
            match check {
                Ok(line) => println!("{:<38} {line}", server.label()),
                Err(e) => {
                    running.stop().await;
                    return Err(format!("{}: {e}", server.label()).into());
                }
            }
            match (&running, server) {
                (Running::Gateway(g), Server::GatewayLogging) => peers.mark_log(server, g.log().to_path_buf()),
                (Running::Nginx(n), Server::NginxLogging) => peers.mark_log(server, n.access_log()),
                _ => {}
            }
            peers.servers.push((server, running));
        }
        Ok(peers)
    }

    /// A gateway on the run's simulator, every group's latest MsgSeqs in its cache.
    async fn gateway(&self, bin: &Path, settings: &GatewaySettings, s: &Settings) -> Result<Gateway> {
        let admin = http_client(2);
        let gateway = Gateway::start(bin, settings, self._upstream.url(), None, &admin).await?;
        let load = Load {
            client: http_client(s.load.connections),
            targets: Arc::new(Targets::one(gateway.data, s.load.deadline)?),
            mix: Arc::new(Mix::new(&s.mix)),
            connections: s.load.connections,
            seed: s.mix.seed,
        };
        let filled = drive::fill(&load).await;
        if filled.status(200) != filled.sent() || filled.sent() == 0 {
            return Err(format!("filling the gateway's cache: {}", super::super::status_line(&filled)).into());
        }
        Ok(gateway)
    }

    /// Every body once through nginx, paced for the simulator's limit; each answer must be
    /// the simulator's OK answer (a refusal would be cached as it is).
    async fn fill_nginx(&self, nginx: &Nginx, expected: &[Bytes]) -> Result<()> {
        let requests = self.requests_to(nginx.addr)?;
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / NGINX_FILL_PER_SECOND));
        for (n, want) in expected.iter().enumerate() {
            pace.tick().await;
            let (status, _, body) = conn::probe(&requests, n, PROBE_WITHIN).await?;
            if status != 200 || body != *want {
                let got = String::from_utf8_lossy(&body);
                return Err(format!("filling nginx's cache: body {n} answered {status} {got}").into());
            }
        }
        Ok(())
    }

    /// The first body's answer: 200, the right `X-Cache`, the simulator's bytes (the
    /// fixed-body server: as many bytes). A line that says so, or what is wrong.
    async fn check(&self, server: Server, running: &Running, expected: &Bytes) -> Result<String> {
        let requests = self.requests_to(running.addr())?;
        let (status, x_cache, body) = conn::probe(&requests, 0, PROBE_WITHIN).await?;
        let answer: Option<ReceiptResponse> = serde_json::from_slice(&body).ok();
        let items = answer.as_ref().and_then(|a| a.items.as_ref()).map_or(0, Vec::len);
        let same = match server {
            Server::HyperFixed => body.len() == expected.len(),
            _ => body == *expected,
        };
        let line = format!(
            "{}: {status}, X-Cache {}, {} bytes{}",
            running.addr(),
            x_cache.label(),
            body.len(),
            match server {
                Server::HyperFixed => " (padding, as many as the gateway's answer)".to_owned(),
                _ => format!(
                    ", ActionStatus {}, {items} items",
                    answer.as_ref().map_or("?", |a| a.action_status.as_ref())
                ),
            }
        );
        if status != 200 || x_cache != server.expected_x_cache() || !same {
            let want =
                format!("200, X-Cache {}, the simulator's {} bytes", server.expected_x_cache().label(), expected.len());
            return Err(format!("{line}: not {want}: {}", String::from_utf8_lossy(&body)).into());
        }
        let same_bytes = if server == Server::HyperFixed { "" } else { " = the simulator's (and gateway's) bytes" };
        Ok(format!("{line}{same_bytes}"))
    }

    fn mark_log(&mut self, server: Server, path: PathBuf) {
        let size = fs::metadata(&path).map_or(0, |m| m.len());
        self.logs.push((server, path, size));
    }

    pub fn get(&self, server: Server) -> Option<&Running> {
        self.servers.iter().find(|(s, _)| *s == server).map(|(_, r)| r)
    }

    pub fn running(&self) -> impl Iterator<Item = (Server, &Running)> {
        self.servers.iter().map(|(s, r)| (*s, r))
    }

    /// The run's requests, aimed at `addr`.
    pub fn requests_to(&self, addr: SocketAddr) -> Result<Requests> {
        Requests::new(addr, &self.path_and_query, self.bodies.clone(), self.deadline)
    }

    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    pub fn wrk_script(&self) -> &Path {
        &self.wrk_script
    }

    /// How much the logging comparison's logs grew over the measurements, and whether the
    /// gateway's is JSON: that the logging was on and what it wrote.
    pub fn print_log_growth(&self) {
        for (server, path, at_start) in &self.logs {
            let now = fs::metadata(path).map_or(0, |m| m.len());
            let json = match server {
                Server::GatewayLogging => match last_line_is_json(path) {
                    true => ", JSON lines",
                    false => ", NOT JSON",
                },
                _ => "",
            };
            println!(
                "{}: {} grew {:.1} MiB during the measurements{json}",
                server.label(),
                path.display(),
                now.saturating_sub(*at_start) as f64 / (1024.0 * 1024.0)
            );
        }
    }

    pub async fn stop(self) {
        for (_, running) in self.servers {
            running.stop().await;
        }
        if self.keep_temp {
            eprintln!("  wrk script kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The query Tencent wants beside the receipt path, signed for the simulator's app at
/// `now` (Unix seconds).
fn signed_path_and_query(now: u64) -> String {
    let sig = usersig::sign(AppId(SDKAPPID), &SecretKey::new(SECRET), IDENTIFIER, now, USERSIG_SECONDS);
    format!(
        "{RECEIPT_PATH}?sdkappid={SDKAPPID}&identifier={IDENTIFIER}&usersig={}&random=1&contenttype=json",
        sig.expose()
    )
}

/// What the simulator (and so the gateway and nginx) answers to `body`.
fn expected_answer(body: &[u8], max_seqs: usize) -> Result<Bytes> {
    let request = ReceiptRequest::parse(body, max_seqs).map_err(|e| format!("a body of the mix: {e}"))?;
    let group = request.group.as_str();
    let items = request.seqs.iter().map(|&seq| ReceiptItem::new(seq, default_receipt(group, seq.0))).collect();
    Ok(Bytes::from(ReceiptResponse::ok(items).to_bytes()))
}

/// Whether the last whole line of a log parses as JSON.
fn last_line_is_json(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = fs::File::open(path) else { return false };
    let len = file.metadata().map_or(0, |m| m.len());
    let mut tail = Vec::new();
    let read = file.seek(SeekFrom::Start(len.saturating_sub(8192))).and_then(|_| file.read_to_end(&mut tail));
    if read.is_err() {
        return false;
    }
    let text = String::from_utf8_lossy(&tail);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_carries_a_usersig_the_simulator_accepts() {
        let now = 1_700_000_000;
        let path = signed_path_and_query(now);
        let query = path.strip_prefix(&format!("{RECEIPT_PATH}?")).expect("the receipt path");
        let param = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
        assert_eq!(param("sdkappid"), Some("1400000000"));
        assert_eq!(param("identifier"), Some(IDENTIFIER));
        assert_eq!((param("random"), param("contenttype")), (Some("1"), Some("json")));
        let sig = param("usersig").expect("a usersig");
        let verified = usersig::verify(sig, AppId(SDKAPPID), IDENTIFIER, &SecretKey::new(SECRET), now + 60);
        assert!(verified.is_ok(), "{verified:?}");
    }

    #[test]
    fn the_expected_answer_is_the_simulators_for_every_msgseq_in_order() {
        let answer = expected_answer(br#"{"GroupId":"loadgen-3","MsgSeqList":[{"MsgSeq":9},{"MsgSeq":2}]}"#, 50)
            .expect("an answer");
        let parsed: ReceiptResponse = serde_json::from_slice(&answer).expect("json");
        assert_eq!(parsed.action_status, "OK");
        let items = parsed.items.expect("items");
        assert_eq!(items.iter().map(|i| i.seq).collect::<Vec<_>>(), [9, 2]);
        assert_eq!(items[0].receipt(), default_receipt("loadgen-3", 9));
        assert!(expected_answer(b"{}", 50).is_err());
    }
}
