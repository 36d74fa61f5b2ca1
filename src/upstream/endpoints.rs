//! An app's two Tencent domains and which one its calls use
//! (docs/design.md#domains-and-failover).
//!
//! After `upstream.failover_after` consecutive failures to reach the primary (DNS,
//! connect, TLS, or a timeout before any byte of answer — never an answer, whatever it
//! says) the app's calls go to the backup; while they do, one real call every
//! `upstream.primary_retry_s` tries the primary again, and the first answer from it takes
//! it back. A call that could not connect is retried at once on the other domain
//! ([`Attempts`](super::retry::Attempts) carries that over to its next attempt). Both
//! APIs of an app share one `Endpoints`.
//!
//! Invariant: the gauge `receipt_gateway_upstream_endpoint_active{app,endpoint}` reads 1
//! for exactly the domain calls go to, and each switch is logged once.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{IntGauge, IntGaugeVec};
use tokio::time::Instant;

use crate::config::{AppConfig, UpstreamConfig};
use crate::telemetry::episode::Episode;
use crate::tencent::domain::AppId;

/// One of an app's two domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Primary,
    Backup,
}

impl Which {
    /// The `endpoint` label.
    pub fn label(self) -> &'static str {
        match self {
            Which::Primary => "primary",
            Which::Backup => "backup",
        }
    }
}

/// What an attempt told about the domain it went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// An HTTP answer came back (whatever its status or ErrorCode).
    Answered,
    /// DNS, connect, proxy, TLS, or nothing at all before the timeout.
    Unreachable,
}

/// An app's domains and the failover state between them.
pub struct Endpoints {
    app: AppId,
    primary: String,
    backup: Option<String>,
    failover_after: u32,
    primary_retry: Duration,
    state: Mutex<State>,
    /// The backup's time in use: started by the switch, ended by the return.
    on_backup: Episode,
    /// `receipt_gateway_upstream_endpoint_active` for primary and backup.
    gauges: [IntGauge; 2],
}

struct State {
    active: Which,
    /// Consecutive failures to reach the primary.
    failures: u32,
    /// While on the backup: when the next call goes to the primary.
    next_probe: Instant,
}

impl Endpoints {
    pub fn new(app: &AppConfig, upstream: &UpstreamConfig, gauge: &IntGaugeVec) -> Self {
        let label = app.id.to_string();
        let gauges = [Which::Primary, Which::Backup].map(|w| gauge.with_label_values(&[label.as_str(), w.label()]));
        gauges[0].set(1);
        gauges[1].set(0);
        Self {
            app: app.id,
            primary: app.endpoint.clone(),
            backup: app.backup_endpoint.clone(),
            failover_after: upstream.failover_after,
            primary_retry: upstream.primary_retry,
            state: Mutex::new(State { active: Which::Primary, failures: 0, next_probe: Instant::now() }),
            on_backup: Episode::default(),
            gauges,
        }
    }

    /// The base URL of `which` (the primary's when there is no backup).
    pub fn base(&self, which: Which) -> &str {
        match (which, &self.backup) {
            (Which::Backup, Some(backup)) => backup,
            _ => &self.primary,
        }
    }

    /// The domain that is not `which`, if the app has two.
    pub fn other(&self, which: Which) -> Option<Which> {
        self.backup.as_ref()?;
        Some(match which {
            Which::Primary => Which::Backup,
            Which::Backup => Which::Primary,
        })
    }

    /// The domain in use now.
    pub fn active(&self) -> Which {
        self.lock().active
    }

    /// Where the next attempt goes: `retry_on` when its call's previous attempt could not
    /// connect, else the domain in use — but the primary, once per `primary_retry_s`,
    /// while the backup is in use.
    pub fn pick(&self, retry_on: Option<Which>) -> Which {
        if let Some(which) = retry_on {
            return which;
        }
        let mut state = self.lock();
        if state.active == Which::Backup {
            let now = Instant::now();
            if now < state.next_probe {
                self.on_backup.event();
                return Which::Backup;
            }
            state.next_probe = now + self.primary_retry;
            return Which::Primary;
        }
        Which::Primary
    }

    /// Notes what an attempt to `which` came to: switches to the backup after enough
    /// consecutive failures to reach the primary, and back at the primary's first answer.
    pub fn report(&self, which: Which, reach: Reach) {
        if which != Which::Primary || self.backup.is_none() {
            return;
        }
        let mut state = self.lock();
        match (reach, state.active) {
            (Reach::Answered, Which::Primary) => state.failures = 0,
            (Reach::Answered, Which::Backup) => {
                state.failures = 0;
                state.active = Which::Primary;
                drop(state);
                self.show(Which::Primary);
                let ended = self.on_backup.end();
                tracing::info!(
                    sdkappid = %self.app,
                    endpoint = %self.primary,
                    calls_through_backup = ended.map_or(0, |e| e.events),
                    backup_for_s = ended.map_or(0.0, |e| e.lasted.as_secs_f64()),
                    "upstream: the primary domain answers again; calls are back on it"
                );
            }
            (Reach::Unreachable, Which::Primary) => {
                state.failures += 1;
                if state.failures >= self.failover_after {
                    state.active = Which::Backup;
                    state.next_probe = Instant::now() + self.primary_retry;
                    let failures = state.failures;
                    drop(state);
                    self.show(Which::Backup);
                    self.on_backup.event();
                    tracing::warn!(
                        sdkappid = %self.app,
                        primary = %self.primary,
                        backup = %self.base(Which::Backup),
                        failures,
                        retry_primary_every_s = self.primary_retry.as_secs(),
                        "upstream: the primary domain cannot be reached; calls go to the backup domain"
                    );
                }
            }
            // A failed try of the primary while on the backup: the next comes in its time.
            (Reach::Unreachable, Which::Backup) => {}
        }
    }

    fn show(&self, active: Which) {
        self.gauges[0].set(i64::from(active == Which::Primary));
        self.gauges[1].set(i64::from(active == Which::Backup));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SecretSource};

    struct Key;

    impl SecretSource for Key {
        fn env(&self, name: &str) -> Option<String> {
            (name == "KEY").then(|| "k".to_owned())
        }
        fn file(&self, _: &std::path::Path) -> std::io::Result<String> {
            Err(std::io::ErrorKind::NotFound.into())
        }
    }

    fn endpoints(backup: bool) -> (Endpoints, IntGaugeVec) {
        let backup = if backup { "backup_endpoint = \"http://127.0.0.1:2\"\n" } else { "" };
        let text = format!(
            "[upstream]\nfailover_after = 2\nprimary_retry_s = 5\n[[apps]]\nsdkappid = 1\nidentifier = \"a\"\n\
             secret_key_env = \"KEY\"\nendpoint = \"http://127.0.0.1:1\"\n{backup}"
        );
        let config = Config::parse(&text, &Key).unwrap();
        let gauge = IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["app", "endpoint"]).unwrap();
        (Endpoints::new(&config.apps[0], &config.upstream, &gauge), gauge)
    }

    fn shown(gauge: &IntGaugeVec) -> (i64, i64) {
        (gauge.with_label_values(&["1", "primary"]).get(), gauge.with_label_values(&["1", "backup"]).get())
    }

    #[tokio::test(start_paused = true)]
    async fn failures_to_reach_switch_to_the_backup_and_an_answer_brings_the_primary_back() {
        let (e, gauge) = endpoints(true);
        assert_eq!((e.pick(None), shown(&gauge)), (Which::Primary, (1, 0)));
        e.report(Which::Primary, Reach::Unreachable);
        e.report(Which::Primary, Reach::Answered);
        e.report(Which::Primary, Reach::Unreachable);
        assert_eq!(e.active(), Which::Primary, "not consecutive");
        e.report(Which::Primary, Reach::Unreachable);
        assert_eq!((e.active(), shown(&gauge)), (Which::Backup, (0, 1)));
        assert_eq!(e.pick(None), Which::Backup);
        assert_eq!(e.pick(Some(Which::Primary)), Which::Primary, "a call that failed on the backup");

        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(e.pick(None), Which::Primary, "one try of the primary");
        assert_eq!(e.pick(None), Which::Backup, "only one");
        e.report(Which::Primary, Reach::Unreachable);
        assert_eq!(e.active(), Which::Backup);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(e.pick(None), Which::Primary);
        e.report(Which::Primary, Reach::Answered);
        assert_eq!((e.active(), shown(&gauge), e.pick(None)), (Which::Primary, (1, 0), Which::Primary));
    }

    #[test]
    fn without_a_backup_there_is_nowhere_to_go() {
        let (e, gauge) = endpoints(false);
        for _ in 0..5 {
            e.report(Which::Primary, Reach::Unreachable);
        }
        assert_eq!((e.active(), e.other(Which::Primary), shown(&gauge)), (Which::Primary, None, (1, 0)));
    }
}
