//! One app's signer (docs/design.md#signing, #budget-and-dispatch): the UserSig every call carries,
//! its renewal, and the 70050 lockout.
//!
//! It signs once at start and keeps the UserSig in memory; it signs anew at 80 % of
//! `usersig_ttl_s`, or when Tencent says the UserSig expired (70001) — unless Tencent
//! locked signing after repeated failures (70050), in which case no signing-related
//! retry is made for [`LOCKOUT`]. The UserSig itself never leaves this module except into
//! the upstream request's query string: it is never logged.

use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::Gauge;
use tokio::time::Instant;

use crate::config::AppConfig;
use crate::tencent::domain::AppId;
use crate::tencent::usersig::{self, SecretKey, UserSig};

/// After 70050, no signing-related retries for this long (docs/design.md#budget-and-dispatch).
pub const LOCKOUT: Duration = Duration::from_secs(60);

/// The UserSig and when to replace it.
struct Signed {
    sig: UserSig,
    renew_at: SystemTime,
}

pub struct Signer {
    app: AppId,
    identifier: String,
    secret: SecretKey,
    ttl: Duration,
    signed: RwLock<Signed>,
    locked_until: Mutex<Option<Instant>>,
    /// `receipt_gateway_usersig_expiry_timestamp_seconds` for this app.
    expiry: Gauge,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Signer {
    /// A signer for `app`, signed once already.
    pub fn new(app: &AppConfig, expiry: Gauge) -> Self {
        let signer = Self {
            app: app.id,
            identifier: app.identifier.clone(),
            secret: app.secret.clone(),
            ttl: app.usersig_ttl,
            signed: RwLock::new(Signed { sig: usersig::sign(app.id, &app.secret, "", 0, 0), renew_at: UNIX_EPOCH }),
            locked_until: Mutex::new(None),
            expiry,
        };
        signer.resign();
        signer
    }

    pub fn identifier(&self) -> &str {
        &self.identifier
    }

    /// The current UserSig, signed anew first if it is due.
    pub fn usersig(&self) -> UserSig {
        let due = self.signed.read().map(|s| SystemTime::now() >= s.renew_at).unwrap_or(true);
        if due {
            self.resign();
        }
        self.signed.read().map(|s| s.sig.clone()).unwrap_or_else(|p| p.into_inner().sig.clone())
    }

    /// Tencent said the UserSig expired (70001): signs anew, unless signing is locked.
    /// True if the call may be retried with the new UserSig.
    pub fn renew_after_expiry(&self) -> bool {
        if self.is_locked() {
            return false;
        }
        self.resign();
        true
    }

    /// Tencent locked signing (70050): no signing-related retries for [`LOCKOUT`].
    pub fn lock_out(&self) {
        if let Ok(mut until) = self.locked_until.lock() {
            *until = Some(Instant::now() + LOCKOUT);
        }
    }

    fn is_locked(&self) -> bool {
        self.locked_until.lock().map(|until| until.is_some_and(|t| Instant::now() < t)).unwrap_or(false)
    }

    /// Signs a fresh UserSig now.
    fn resign(&self) {
        let now = SystemTime::now();
        let sig = usersig::sign(self.app, &self.secret, &self.identifier, unix_secs(now), self.ttl.as_secs());
        let renew_at = now + self.ttl.mul_f64(0.8);
        self.expiry.set((unix_secs(now) + self.ttl.as_secs()) as f64);
        if let Ok(mut signed) = self.signed.write() {
            *signed = Signed { sig, renew_at };
        }
        tracing::info!(sdkappid = %self.app, expires_in_s = self.ttl.as_secs(), "signed a new UserSig");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An app for tests, its UserSigs living `ttl_s`.
    pub(crate) fn app(ttl_s: u64) -> AppConfig {
        AppConfig {
            id: AppId(1_400_000_000),
            region: None,
            identifier: "administrator".into(),
            secret: SecretKey::new("k"),
            endpoint: "http://127.0.0.1:9".into(),
            backup_endpoint: None,
            callbacks: false,
            callback_token: None,
            callback_forward: None,
            usersig_ttl: Duration::from_secs(ttl_s),
        }
    }

    fn gauge() -> Gauge {
        Gauge::new("expiry", "expiry").unwrap()
    }

    #[test]
    fn the_usersig_is_signed_once_and_renewed_at_80_percent_of_its_life() {
        let expiry = gauge();
        let signer = Signer::new(&app(1000), expiry.clone());
        let renew_at = |s: &Signer| s.signed.read().unwrap().renew_at;
        let first = renew_at(&signer);
        let until = first.duration_since(SystemTime::now()).unwrap();
        assert!(until > Duration::from_secs(790) && until <= Duration::from_secs(800), "{until:?}");

        let sig = signer.usersig();

        assert_eq!(renew_at(&signer), first, "not re-signed before it is due");
        let now = unix_secs(SystemTime::now());
        let doc = usersig::verify(sig.expose(), AppId(1_400_000_000), "administrator", &SecretKey::new("k"), now);
        assert_eq!(doc.unwrap().expire, 1000);
        assert!((expiry.get() - (now + 1000) as f64).abs() <= 2.0);
        // Once due, the next call signs anew.
        signer.signed.write().unwrap().renew_at = UNIX_EPOCH;
        signer.usersig();
        assert!(renew_at(&signer) > UNIX_EPOCH + Duration::from_secs(1_000_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_70050_lockout_refuses_renewal_for_a_minute() {
        let signer = Signer::new(&app(1000), gauge());
        assert!(signer.renew_after_expiry());

        signer.lock_out();

        assert!(!signer.renew_after_expiry());
        tokio::time::advance(LOCKOUT - Duration::from_millis(1)).await;
        assert!(!signer.renew_after_expiry());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(signer.renew_after_expiry());
    }
}
