//! The gateway under test: the release binary as a subprocess, as it runs in production.
//!
//! It gets a fresh config in a temporary directory (the simulator as its one app's
//! endpoint, the scenario's cache and budget settings), logs there, and is stopped with
//! SIGTERM at the end (killed if it does not stop, or if the benchmark bails out early).
//! [`Snapshot`] reads the counters of `/metrics` the report needs; [`Memory`] reads the
//! resident set from `/proc`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::Result;
use crate::cli::GatewaySettings;
use crate::client::{self, HttpClient};
use crate::upstream::{IDENTIFIER, SDKAPPID, SECRET};

/// The variable the generated config names for the secret key.
const SECRET_ENV: &str = "LOADGEN_SECRET";
const READY_WITHIN: Duration = Duration::from_secs(15);
const STOP_WITHIN: Duration = Duration::from_secs(5);

pub struct Gateway {
    child: Child,
    pub data: SocketAddr,
    pub admin: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    keep_dir: bool,
}

/// The gateway binary: `--gateway-bin`, else `receipt-gateway` next to this binary.
pub fn binary(flag: Option<&Path>) -> Result<PathBuf> {
    let bin = match flag {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()?.with_file_name("receipt-gateway"),
    };
    if !bin.is_file() {
        let hint = "build it first: cargo build --release --bins (or name it with --gateway-bin)";
        return Err(format!("no gateway binary at {}; {hint}", bin.display()).into());
    }
    Ok(bin)
}

impl Gateway {
    /// Writes the config, starts the binary and waits until `/readyz` answers 200.
    pub async fn start(bin: &Path, s: &GatewaySettings, sim_url: &str, admin: &HttpClient) -> Result<Gateway> {
        let dir = temp_dir()?;
        // Ports must be known before the subprocess binds them: ask the OS for two free
        // ones and release them just before the spawn. Another process could take one in
        // between (a tiny race); the gateway then fails to bind and we say so below.
        let (data_port, admin_port) = free_ports()?;
        let data = SocketAddr::from(([127, 0, 0, 1], data_port.0));
        let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port.0));
        let config = dir.join("receipt-gateway.toml");
        fs::write(&config, config_toml(s, data, admin_addr, sim_url))?;
        let log = dir.join("gateway.log");
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        drop((data_port.1, admin_port.1));
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env(SECRET_ENV, SECRET)
            .env("RUST_LOG", &s.log_level)
            .env_remove("RECEIPT_GATEWAY_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut gateway = Gateway { child, data, admin: admin_addr, dir, log, keep_dir: s.keep_temp };
        gateway.wait_ready(admin).await?;
        Ok(gateway)
    }

    async fn wait_ready(&mut self, admin: &HttpClient) -> Result<()> {
        let url = format!("http://{}/readyz", self.admin);
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if let Some(status) = self.child.try_wait()? {
                return Err(self.failure(&format!("the gateway exited ({status}) before it was ready")));
            }
            if let Ok((200, _)) = client::get(admin, &url).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(self.failure(&format!("the gateway was not ready within {READY_WITHIN:?}")))
    }

    /// An error with the end of the gateway's log; the directory is kept for a look.
    fn failure(&mut self, what: &str) -> crate::Error {
        self.keep_dir = true;
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("{what}; log {}:\n{tail}", self.log.display()).into()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn metrics(&self, admin: &HttpClient) -> Result<Snapshot> {
        let (status, body) = client::get(admin, &format!("http://{}/metrics", self.admin)).await?;
        if status != 200 {
            return Err(format!("/metrics answered {status}").into());
        }
        Ok(Snapshot::parse(&String::from_utf8_lossy(&body)))
    }

    pub fn memory(&self) -> Result<Memory> {
        Memory::of(self.pid())
    }

    /// SIGTERM, then a kill if it has not stopped within a few seconds.
    pub async fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < STOP_WITHIN {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("  the gateway did not stop within {STOP_WITHIN:?} of SIGTERM; killing it");
        self.keep_dir = true;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Harmless if it already exited; makes sure no gateway outlives the benchmark.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep_dir {
            eprintln!("  gateway config and log kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn temp_dir() -> Result<PathBuf> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("receipt-loadgen-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Two distinct free ports, each with the listener that holds it until dropped.
fn free_ports() -> Result<((u16, TcpListener), (u16, TcpListener))> {
    let hold = || -> Result<(u16, TcpListener)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        Ok((listener.local_addr()?.port(), listener))
    };
    Ok((hold()?, hold()?))
}

fn config_toml(s: &GatewaySettings, data: SocketAddr, admin: SocketAddr, sim_url: &str) -> String {
    format!(
        r#"# Written by receipt-loadgen for one benchmark run.
[server]
listen = "{data}"
admin_listen = "{admin}"
request_timeout_ms = {timeout}
shutdown_grace_ms = 1000

[cache]
ttl_ms = {ttl}
stale_ms = {stale}
max_entries = {max_entries}

[batch]
max_seqs = {max_seqs}

[budget]
per_second = {per_second}

[[apps]]
sdkappid = {SDKAPPID}
identifier = "{IDENTIFIER}"
secret_key_env = "{SECRET_ENV}"
endpoint = "{sim_url}"
"#,
        timeout = s.request_timeout_ms,
        ttl = s.ttl_ms,
        stale = s.stale_ms,
        max_entries = s.max_entries,
        max_seqs = s.max_seqs,
        per_second = s.per_second,
    )
}

/// The `/metrics` figures the report uses.
#[derive(Default)]
pub struct Snapshot {
    /// `receipt_gateway_items_total` summed over apps, by `source`.
    pub items: BTreeMap<String, f64>,
    pub cache_entries: Option<f64>,
}

impl Snapshot {
    fn parse(text: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            if series == "receipt_gateway_cache_entries" {
                snapshot.cache_entries = Some(value);
            } else if let Some(labels) = series.strip_prefix("receipt_gateway_items_total{") {
                let source = label(labels, "source").unwrap_or("?").to_owned();
                *snapshot.items.entry(source).or_default() += value;
            }
        }
        snapshot
    }

    /// Items by source counted between `before` and `self`.
    pub fn items_since(&self, before: &Snapshot) -> BTreeMap<String, f64> {
        let was = |source: &str| before.items.get(source).copied().unwrap_or(0.0);
        self.items.iter().map(|(source, &now)| (source.clone(), now - was(source))).collect()
    }
}

/// The value of `name="value"` in a Prometheus label set.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// Resident memory of a process, from `/proc/<pid>/status` (Linux).
pub struct Memory {
    pub rss_kib: u64,
    /// The peak resident set so far.
    pub hwm_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()
        };
        match (field("VmRSS:"), field("VmHWM:")) {
            (Some(rss_kib), Some(hwm_kib)) => Ok(Memory { rss_kib, hwm_kib }),
            _ => Err(format!("no VmRSS/VmHWM in {path}").into()),
        }
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_reads_items_by_source_and_the_cache_gauge() {
        let text = "# HELP x\nreceipt_gateway_items_total{app=\"1\",source=\"hit\"} 7\n\
                    receipt_gateway_items_total{app=\"2\",source=\"hit\"} 3\n\
                    receipt_gateway_items_total{app=\"1\",source=\"fetched\"} 2\n\
                    receipt_gateway_cache_entries 1000000\n";
        let snapshot = Snapshot::parse(text);
        assert_eq!(snapshot.items.get("hit"), Some(&10.0));
        assert_eq!(snapshot.items.get("fetched"), Some(&2.0));
        assert_eq!(snapshot.cache_entries, Some(1_000_000.0));
    }
}
