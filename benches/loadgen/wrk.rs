//! wrk, the reference client: a closed loop of `threads` × `connections` for a fixed time,
//! driven by a Lua script. Every script this benchmark writes ends with [`DONE_HOOK`], which
//! prints one machine-readable `wrk-result` line (requests, duration, p50/p99 latency,
//! non-2xx answers, socket errors), so nothing depends on wrk's human-readable summary.
//!
//! [`post_script`] sends one fixed POST over and over (the `warm` scenario); the
//! `callbacks` scenario writes its own `request()` function and appends the same hook.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long past its `-d` a wrk run may take before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// wrk's `done` callback: the figures of the run on one line.
pub const DONE_HOOK: &str = r#"function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("wrk-result requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d socket=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"#;

/// A script that POSTs `body` with `headers` on every request (the URL, query included,
/// is wrk's argument).
pub fn post_script(body: &str, headers: &[(&str, &str)]) -> String {
    let mut script =
        format!("-- Written by receipt-loadgen: one fixed POST.\nwrk.method = \"POST\"\nwrk.body = {}\n", lua(body));
    for (name, value) in headers {
        script.push_str(&format!("wrk.headers[{}] = {}\n", lua(name), lua(value)));
    }
    script.push_str(DONE_HOOK);
    script
}

/// `text` as a single-quoted Lua string literal.
fn lua(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('\'');
    for c in text.chars() {
        match c {
            '\\' => quoted.push_str("\\\\"),
            '\'' => quoted.push_str("\\'"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

/// One wrk run: its shape and where it goes.
pub struct Run<'a> {
    pub threads: usize,
    pub connections: usize,
    pub seconds: u64,
    pub script: &'a Path,
    /// The whole URL, query included.
    pub url: &'a str,
}

/// The figures of wrk's `done` line.
#[derive(Clone, Debug, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub duration: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

impl WrkResult {
    pub fn parse(output: &str) -> Option<WrkResult> {
        let line = output.lines().find_map(|l| l.strip_prefix("wrk-result "))?;
        let field = |name: &str| -> Option<u64> {
            line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?.parse().ok()
        };
        Some(WrkResult {
            requests: field("requests")?,
            duration: Duration::from_micros(field("duration_us")?),
            p50: Duration::from_micros(field("p50_us")?),
            p99: Duration::from_micros(field("p99_us")?),
            non_2xx: field("non2xx")?,
            socket_errors: field("socket")?,
        })
    }

    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64().max(f64::EPSILON)
    }
}

/// Runs `bin` (wrk) to its end (killed if it overruns by [`GRACE`]) and reads its result.
/// wrk blocks no runtime thread: this polls for its exit.
pub async fn run(bin: &Path, run: &Run<'_>) -> std::result::Result<WrkResult, String> {
    let spawned = Command::new(bin)
        .args(["-t", &run.threads.to_string(), "-c", &run.connections.to_string()])
        .args(["-d", &format!("{}s", run.seconds), "--timeout", "2s", "-s"])
        .arg(run.script)
        .arg(run.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("not installed (Debian package wrk)".into());
        }
        Err(e) => return Err(format!("cannot start it: {e}")),
    };
    let until = Instant::now() + Duration::from_secs(run.seconds) + GRACE;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < until => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {} s + {GRACE:?}; killed", run.seconds));
            }
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
    // It has exited: its (small) output is all in the pipes.
    let output = child.wait_with_output().map_err(|e| format!("cannot read its output: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    WrkResult::parse(&stdout).ok_or_else(|| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        format!("no result line ({}): {}{}", output.status, stdout.trim(), stderr.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrks_result_line_is_read_and_a_missing_one_is_none() {
        let out = "Running 4s test\nwrk-result requests=24000 duration_us=4000000 p50_us=510 p99_us=2300 non2xx=3 \
                   socket=1\n";
        let r = WrkResult::parse(out).expect("a result");
        assert_eq!(
            (r.requests, r.p50, r.p99, r.non_2xx, r.socket_errors),
            (24_000, Duration::from_micros(510), Duration::from_micros(2300), 3, 1)
        );
        assert_eq!(r.per_second(), 6000.0);
        assert!(WrkResult::parse("Running 4s test\n").is_none());
        assert!(WrkResult::parse("wrk-result requests=1 duration_us=x\n").is_none(), "a field that is not a number");
    }

    #[test]
    fn the_post_script_sends_the_body_and_headers_and_reports_with_the_hook() {
        let script = post_script(r#"{"GroupId":"g"}"#, &[("Content-Type", "application/json"), ("X-A", "1")]);
        assert!(script.contains("wrk.method = \"POST\"\n"));
        assert!(script.contains(r#"wrk.body = '{"GroupId":"g"}'"#));
        assert!(script.contains("wrk.headers['Content-Type'] = 'application/json'\n"));
        assert!(script.contains("wrk.headers['X-A'] = '1'\n"));
        assert_eq!(lua("it's a \\ and a\nline"), r"'it\'s a \\ and a\nline'");
        assert!(script.ends_with(DONE_HOOK));
    }
}
