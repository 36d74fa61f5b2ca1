//! Retrying an upstream call within its caller's deadline, the same for every API:
//! exponential backoff with jitter, at most `upstream.max_retries` times and never past
//! what the deadline leaves room for; a UserSig Tencent calls expired is signed anew
//! once; throttling lowers the budget's effective rate; 70050 locks signing; an attempt
//! that could not connect is retried at once on the app's other domain
//! (docs/design.md#domains-and-failover), as one of its retries.

use std::time::Duration;

use tokio::time::Instant;

use super::Outcome;
use super::endpoints::Which;
use super::signer::Signer;
use crate::budget::Budget;

/// First retry delay; doubled per attempt, with jitter, capped at `BACKOFF_MAX`.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The delay before retry number `retries + 1`: exponential from [`BACKOFF_BASE`],
/// capped at [`BACKOFF_MAX`], with jitter (half to all of it).
pub fn backoff(retries: u32) -> Duration {
    let full = BACKOFF_BASE.saturating_mul(1 << retries.min(16)).min(BACKOFF_MAX);
    full.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// One call's attempts so far.
#[derive(Debug)]
pub struct Attempts {
    retries: u32,
    max_retries: u32,
    resigned: bool,
    /// Where the next attempt goes, when the last could not connect where it went.
    retry_on: Option<Which>,
}

/// What a failed attempt calls for, whatever the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Signed anew: try again at once.
    RetryNow,
    /// Back off and try again if the deadline allows; else fail so.
    RetryLater(Trouble),
    /// Not worth another attempt.
    Fail(String),
}

/// Why an attempt is to be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trouble {
    Throttled,
    Unavailable(String),
}

impl Attempts {
    pub fn new(max_retries: u32) -> Self {
        Self { retries: 0, max_retries, resigned: false, retry_on: None }
    }

    /// The domain the next attempt must go to, if the last one could not connect: once.
    pub fn retry_on(&mut self) -> Option<Which> {
        self.retry_on.take()
    }

    /// What `outcome` calls for when it is about the call rather than its answer
    /// (signing, throttling, transport, a final refusal); `Err` hands back an outcome
    /// only the API's own code can judge (items, a group, 10004).
    pub fn judge(&mut self, outcome: Outcome, signer: &Signer, budget: &Budget) -> Result<Next, Outcome> {
        Ok(match outcome {
            Outcome::UserSigExpired if !std::mem::replace(&mut self.resigned, true) => {
                if signer.renew_after_expiry() {
                    return Ok(Next::RetryNow);
                }
                Next::Fail("upstream rejected the UserSig as expired; signing is locked (70050)".into())
            }
            Outcome::UserSigExpired => Next::Fail("upstream rejected the UserSig as expired".into()),
            Outcome::SigningLocked => {
                signer.lock_out();
                Next::Fail("upstream locked signing after repeated failures (70050)".into())
            }
            Outcome::Final { code, info } => {
                Next::Fail(format!("upstream refused the call (ErrorCode {code}): {info}"))
            }
            Outcome::Throttled { code } => {
                budget.throttled();
                tracing::debug!(%code, "upstream throttled");
                Next::RetryLater(Trouble::Throttled)
            }
            Outcome::NoAnswer { elsewhere: Some(other), .. } if self.retries < self.max_retries => {
                self.retries += 1;
                self.retry_on = Some(other);
                Next::RetryNow
            }
            Outcome::Retryable { reason } | Outcome::NoAnswer { reason, .. } => {
                Next::RetryLater(Trouble::Unavailable(reason))
            }
            other @ (Outcome::Items(_) | Outcome::Group { .. } | Outcome::InvalidParameter { .. }) => {
                return Err(other);
            }
        })
    }

    /// Sleeps an exponential, jittered backoff if `upstream.max_retries` allows another
    /// attempt and it still fits before `deadline` (with `interval`, the budget's pace,
    /// for its token).
    pub async fn back_off(&mut self, deadline: Instant, interval: Duration) -> bool {
        if self.retries >= self.max_retries {
            return false;
        }
        let backoff = backoff(self.retries);
        if Instant::now() + backoff + interval >= deadline {
            return false;
        }
        self.retries += 1;
        tokio::time::sleep(backoff).await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for retries in 0..20 {
            let full = BACKOFF_BASE.saturating_mul(1 << retries.min(16)).min(BACKOFF_MAX);
            let d = backoff(retries);
            assert!(d >= full / 2 && d <= full, "retry {retries}: {d:?}");
        }
    }

    /// Only Tencent's "slow down" lowers the effective rate: a call that got no answer, or
    /// a failing one, says nothing about how many calls Tencent takes, and is retried at
    /// the full rate (after an upstream hang, every call that was held timed out).
    #[tokio::test]
    async fn timeouts_and_failures_are_retried_without_lowering_the_effective_rate() {
        use crate::config::{BudgetBackend, BudgetConfig};
        use crate::tencent::code::ErrorCode;
        use prometheus::{Gauge, IntGauge};

        let per_second = std::num::NonZeroU32::new(200).unwrap();
        let config = BudgetConfig { per_second, backend: BudgetBackend::Local, fallback_per_second: per_second };
        let gauge = |name: &str| Gauge::new(name, name).unwrap();
        let budget = Budget::new(&config, "k".into(), gauge("rate"), IntGauge::new("up", "up").unwrap(), None).unwrap();
        let app = crate::upstream::signer::tests::app(86_400);
        let signer = Signer::new(&app, gauge("expiry"));
        let mut attempts = Attempts::new(2);

        for outcome in [
            Outcome::NoAnswer { reason: "no answer within 3000 ms".into(), elsewhere: None },
            Outcome::Retryable { reason: "HTTP 502".into() },
        ] {
            let next = attempts.judge(outcome, &signer, &budget);
            assert!(matches!(next, Ok(Next::RetryLater(Trouble::Unavailable(_)))), "{next:?}");
        }
        assert_eq!(budget.effective_rate(), 200.0);

        let next = attempts.judge(Outcome::Throttled { code: ErrorCode::RATE_LIMITED }, &signer, &budget);
        assert_eq!(next.ok(), Some(Next::RetryLater(Trouble::Throttled)));
        assert!(budget.effective_rate() < 101.0, "halved by a 60007");

        // Could not connect, and the app has another domain: there at once, as a retry.
        let unconnected = || Outcome::NoAnswer { reason: "refused".into(), elsewhere: Some(Which::Backup) };
        let mut attempts = Attempts::new(1);
        assert_eq!(attempts.judge(unconnected(), &signer, &budget).ok(), Some(Next::RetryNow));
        assert_eq!((attempts.retry_on(), attempts.retry_on()), (Some(Which::Backup), None));
        let next = attempts.judge(unconnected(), &signer, &budget);
        assert!(matches!(next, Ok(Next::RetryLater(_))), "max_retries spent: {next:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_limit_or_before_the_deadline() {
        let far = Instant::now() + Duration::from_secs(60);
        let mut attempts = Attempts::new(2);
        assert!(attempts.back_off(far, Duration::ZERO).await);
        assert!(attempts.back_off(far, Duration::ZERO).await);
        assert!(!attempts.back_off(far, Duration::ZERO).await, "max_retries = 2");
        let mut attempts = Attempts::new(5);
        let near = Instant::now() + Duration::from_millis(10);
        assert!(!attempts.back_off(near, Duration::ZERO).await, "no backoff fits in 10 ms");
    }
}
