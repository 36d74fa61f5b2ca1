//! Draining and stopping (SIGTERM in Kubernetes).
//!
//! The order, written once: on the signal the gateway starts *draining* — `/readyz`
//! answers 503 and new data requests get 503 so the mesh sends them elsewhere — and waits
//! for the requests in flight to finish, at most `server.shutdown_grace_ms`. Then the
//! servers stop accepting, open connections are closed gracefully, and the background
//! tasks (dispatchers, housekeeping) are aborted by the `JoinSet` that owns them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use prometheus::IntGauge;
use tokio::sync::Notify;

/// Whether the gateway is draining, and how many data requests are in flight. The
/// `receipt_gateway_inflight_requests` gauge is set from the count when it is scraped
/// ([`Drain::publish`]), not per request: one shared counter per request is enough.
pub struct Drain {
    draining: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
    gauge: IntGauge,
}

/// Held while a data request is answered; dropping it counts the request out.
pub struct InFlight<'a>(&'a Drain);

impl Drain {
    pub fn new(gauge: IntGauge) -> Arc<Self> {
        Arc::new(Self { draining: AtomicBool::new(false), inflight: AtomicUsize::new(0), idle: Notify::new(), gauge })
    }

    /// Counts a request in, unless the gateway is draining.
    pub fn enter(&self) -> Option<InFlight<'_>> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self);
        if self.is_draining() {
            return None;
        }
        Some(guard)
    }

    /// Sets the in-flight gauge from the count (before a scrape).
    pub fn publish(&self) {
        self.gauge.set(self.inflight.load(Ordering::SeqCst).try_into().unwrap_or(i64::MAX));
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.idle.notify_waiters();
    }

    /// Resolves once draining has started and no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.is_draining() && self.inflight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.is_draining() {
            self.0.idle.notify_waiters();
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_the_last_request_and_refuses_new_ones() {
        let drain = Drain::new(IntGauge::new("g", "g").unwrap());
        let request = drain.enter().unwrap();
        drain.start();
        assert!(drain.enter().is_none());
        let still_busy = tokio::time::timeout(Duration::from_millis(50), drain.idle()).await;
        assert!(still_busy.is_err(), "idle while a request is in flight");
        drop(request);
        tokio::time::timeout(Duration::from_secs(5), drain.idle()).await.unwrap();
        drain.publish();
        assert_eq!(drain.gauge.get(), 0);
        let _again = drain.inflight.fetch_add(1, Ordering::SeqCst);
        drain.publish();
        assert_eq!(drain.gauge.get(), 1, "the gauge shows the count when published");
    }
}
