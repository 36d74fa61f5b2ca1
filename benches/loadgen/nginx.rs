//! The peer a team would put in front of Tencent instead of the gateway: nginx as a
//! caching proxy (`proxy_cache`) in front of the same simulator, as a subprocess.
//!
//! It gets a config generated into a temporary directory ([`config`]): two worker
//! processes, the cache, its temporary files, pid and error log all in that directory;
//! the cache keyed on the URI, the app and the request body (`$request_body`, which needs
//! the body in memory: `client_body_buffer_size` above any body the benchmark sends), POST
//! answers cached, a lock so that concurrent misses make one upstream call, and HTTP/1.1
//! keep-alive to the upstream. `X-Cache` carries `$upstream_cache_status`, so the client
//! sees HIT or MISS as it does from the gateway. nginx keeps the caller's query when it
//! forwards a miss, so a request to it must carry a UserSig the simulator accepts (the
//! gateway signs its own and ignores the caller's).
//!
//! nginx runs in the foreground (`daemon off`) as this process's child; its CPU time is
//! the sum over its worker processes ([`Nginx::cpu_time`]). It is stopped with SIGTERM
//! (the master then stops its workers), killed with them if it does not stop.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Result;
use crate::gateway::{self, cpu_time, log_tail};
use crate::tools;

/// Worker processes: one per core of the 2-core machine the targets are set on.
pub const WORKERS: usize = 2;
/// Larger than any request body of the benchmark, so nginx keeps the body in memory
/// (`$request_body` is empty for a body written to a temporary file).
const BODY_BUFFER: &str = "64k";
/// Idle keep-alive connections nginx keeps to the simulator.
const UPSTREAM_KEEPALIVE: usize = 32;
const READY_WITHIN: Duration = Duration::from_secs(10);
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// Whether nginx logs every request, as the logging comparison wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    /// The `combined` format, unbuffered, to `access.log` in nginx's directory.
    File,
}

/// What the config is generated from.
pub struct Conf<'a> {
    pub dir: &'a Path,
    pub listen: SocketAddr,
    /// The simulator.
    pub upstream: SocketAddr,
    pub access_log: AccessLog,
    /// Workers run as root when the master does (else as `nobody`, who cannot write the
    /// cache in a directory root created).
    pub as_root: bool,
    /// The temporary-file directives of modules this nginx was built with (see
    /// [`temp_path_directives`]).
    pub temp_paths: Vec<&'static str>,
}

/// The `*_temp_path` directives to point into the temporary directory: nginx creates the
/// directories of every module it was built with at start, and the compiled-in ones
/// (`/var/lib/nginx/...`) may not exist or be writable. A module built `--without-…`
/// rejects its directive, so those are left out. `nginx_v` is the output of `nginx -V`.
pub fn temp_path_directives(nginx_v: &str) -> Vec<&'static str> {
    let optional = [
        ("fastcgi_temp_path", "--without-http_fastcgi_module"),
        ("uwsgi_temp_path", "--without-http_uwsgi_module"),
        ("scgi_temp_path", "--without-http_scgi_module"),
    ];
    let mut directives = vec!["client_body_temp_path", "proxy_temp_path"];
    directives.extend(optional.iter().filter(|(_, without)| !nginx_v.contains(without)).map(|(d, _)| *d));
    directives
}

/// The whole `nginx.conf`.
pub fn config(c: &Conf<'_>) -> String {
    let dir = c.dir.display();
    let user = if c.as_root { "user root;\n" } else { "" };
    let access_log = match c.access_log {
        AccessLog::Off => "access_log off;".to_owned(),
        AccessLog::File => format!("access_log {dir}/access.log combined;"),
    };
    let temp_paths: String =
        c.temp_paths.iter().map(|d| format!("    {d} {dir}/{};\n", d.trim_end_matches("_path"))).collect();
    format!(
        r#"# Written by receipt-loadgen for one benchmark run.
daemon off;
master_process on;
{user}worker_processes {WORKERS};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    {access_log}
{temp_paths}    proxy_cache_path {dir}/cache levels=1:2 keys_zone=receipts:16m max_size=256m inactive=1h use_temp_path=off;
    # Keep-alive as generous as the gateway's (nginx's default closes a connection
    # after 1,000 requests): the peer is not to be slowed by reconnects.
    keepalive_requests 1000000;
    keepalive_timeout 65s;

    upstream tencent {{
        server {upstream};
        keepalive {UPSTREAM_KEEPALIVE};
    }}

    server {{
        listen {listen};
        client_body_buffer_size {BODY_BUFFER};
        client_max_body_size {BODY_BUFFER};
        client_body_in_single_buffer on;

        location / {{
            proxy_pass http://tencent;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache receipts;
            proxy_cache_methods POST;
            proxy_cache_key "$uri|$arg_sdkappid|$request_body";
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"#,
        upstream = c.upstream,
        listen = c.listen,
    )
}

/// A running nginx, stopped (and its directory removed) when dropped.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    workers: Vec<u32>,
    dir: PathBuf,
    keep_dir: bool,
}

impl Nginx {
    /// Writes the config, starts nginx and waits until its workers are up and it accepts.
    pub async fn start(bin: &Path, upstream: SocketAddr, access_log: AccessLog, keep_temp: bool) -> Result<Nginx> {
        let dir = gateway::temp_dir()?;
        let version = Command::new(bin).arg("-V").output().map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let (port, hold) = gateway::free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf = Conf {
            dir: &dir,
            listen: addr,
            upstream,
            access_log,
            as_root: tools::is_root(),
            temp_paths: temp_path_directives(&String::from_utf8_lossy(&version.stderr)),
        };
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, config(&conf))?;
        let out = File::create(dir.join("nginx.out"))?;
        let err = out.try_clone()?;
        drop(hold);
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut nginx = Nginx { child, addr, workers: Vec::new(), dir, keep_dir: keep_temp };
        nginx.wait_ready().await?;
        Ok(nginx)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if let Some(status) = self.child.try_wait()? {
                return Err(self.failure(&format!("nginx exited ({status}) before it was ready")));
            }
            self.workers = worker_pids(self.child.id());
            if self.workers.len() == WORKERS && tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(self.failure(&format!("nginx was not ready within {READY_WITHIN:?}")))
    }

    fn failure(&mut self, what: &str) -> crate::Error {
        self.keep_dir = true;
        let log = self.dir.join("error.log");
        format!("{what}; {}:\n{}\n{}", log.display(), log_tail(&log), log_tail(&self.dir.join("nginx.out"))).into()
    }

    /// The CPU time (user + system) its worker processes have spent so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        self.workers.iter().map(|&pid| cpu_time(pid)).sum()
    }

    /// The access log (with [`AccessLog::File`]).
    pub fn access_log(&self) -> PathBuf {
        self.dir.join("access.log")
    }

    /// SIGTERM to the master, which stops its workers; killed with them if it does not
    /// stop in time.
    pub async fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < STOP_WITHIN {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("  nginx did not stop within {STOP_WITHIN:?} of SIGTERM; killing it");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Killing the master alone would leave its workers running: they go first.
            for pid in &self.workers {
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if self.keep_dir {
            eprintln!("  nginx config and logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The pids of `master`'s worker processes (its children titled `nginx: worker process`;
/// the cache manager and loader are left out).
fn worker_pids(master: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| parent(&s)) == Some(master))
        .filter(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"nginx: worker process")))
        .collect()
}

/// The parent pid (field 4) of a `/proc/<pid>/stat` line, counted past the command name.
fn parent(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(dir: &Path, access_log: AccessLog) -> String {
        config(&Conf {
            dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            upstream: SocketAddr::from(([127, 0, 0, 1], 9000)),
            access_log,
            as_root: true,
            temp_paths: temp_path_directives(""),
        })
    }

    #[test]
    fn the_config_caches_post_answers_keyed_on_uri_app_and_body_with_two_workers() {
        let text = conf(Path::new("/tmp/lg"), AccessLog::Off);
        for line in [
            "worker_processes 2;",
            "daemon off;",
            "user root;",
            "access_log off;",
            "proxy_cache_path /tmp/lg/cache ",
            "proxy_cache_methods POST;",
            r#"proxy_cache_key "$uri|$arg_sdkappid|$request_body";"#,
            "proxy_cache_valid 200 1h;",
            "proxy_cache_lock on;",
            "keepalive 32;",
            "server 127.0.0.1:9000;",
            "listen 127.0.0.1:8080;",
            "proxy_http_version 1.1;",
            r#"proxy_set_header Connection "";"#,
            "client_body_buffer_size 64k;",
            "add_header X-Cache $upstream_cache_status;",
            "pid /tmp/lg/nginx.pid;",
            "client_body_temp_path /tmp/lg/client_body_temp;",
            "scgi_temp_path /tmp/lg/scgi_temp;",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(text.matches('{').count(), text.matches('}').count(), "balanced blocks");
    }

    #[test]
    fn the_logging_variant_writes_an_access_log_into_the_directory() {
        let text = conf(Path::new("/tmp/lg"), AccessLog::File);
        assert!(text.contains("access_log /tmp/lg/access.log combined;"));
        assert!(!text.contains("access_log off;"));
        let as_user = config(&Conf { as_root: false, ..dummy(Path::new("/tmp/lg")) });
        assert!(!as_user.contains("user "), "the user directive only when the master is root");
    }

    fn dummy(dir: &Path) -> Conf<'_> {
        Conf {
            dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 1)),
            upstream: SocketAddr::from(([127, 0, 0, 1], 2)),
            access_log: AccessLog::Off,
            as_root: true,
            temp_paths: Vec::new(),
        }
    }

    #[test]
    fn temp_paths_leave_out_modules_built_without() {
        let all = temp_path_directives("nginx version: nginx/1.22.1\nconfigure arguments: --with-http_ssl_module");
        assert_eq!(
            all,
            ["client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path"]
        );
        let light = temp_path_directives("--without-http_uwsgi_module --without-http_scgi_module");
        assert_eq!(light, ["client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path"]);
    }

    #[test]
    fn the_parent_pid_is_read_past_the_command_name() {
        assert_eq!(parent("4243 (nginx: worker) S 4242 4242 4242 0 -1"), Some(4242));
        assert_eq!(parent("4243 (nginx)"), None);
    }
}
