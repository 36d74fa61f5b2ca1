//! Episodes of trouble — a burst of throttling answers, a Redis outage — logged when they
//! start and when they end, with how many events and how long, never once per event: a
//! replica answering hundreds of 60007s in a second writes two lines, not hundreds.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// One kind of trouble's episode, if one is under way.
#[derive(Debug, Default)]
pub struct Episode {
    /// Whether one is under way: read without the lock on every success.
    on: AtomicBool,
    /// When it started and how many events it has had.
    state: Mutex<Option<(Instant, u64)>>,
}

/// How an episode went, for its closing line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub events: u64,
    pub lasted: Duration,
}

impl Episode {
    /// Notes one event; true when it starts an episode (the moment to log it).
    pub fn event(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            Some((_, events)) => {
                *events += 1;
                false
            }
            None => {
                *state = Some((Instant::now(), 1));
                self.on.store(true, Ordering::Relaxed);
                true
            }
        }
    }

    /// Ends the episode under way, if any: what it came to (the moment to log that).
    pub fn end(&self) -> Option<Ended> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.on.store(false, Ordering::Relaxed);
        state.take().map(|(started, events)| Ended { events, lasted: started.elapsed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_episode_starts_once_counts_its_events_and_ends_once() {
        let e = Episode::default();
        assert_eq!(e.end(), None, "nothing under way");
        assert!(e.event(), "the first event starts it");
        assert!(!e.event() && !e.event(), "later ones only count");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(e.end(), Some(Ended { events: 3, lasted: Duration::from_secs(3) }));
        assert_eq!(e.end(), None, "ended once");
        assert!(e.event(), "the next event starts a new one");
    }
}
