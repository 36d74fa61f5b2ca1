//! One fetch in flight per key, for answers fetched whole (the detail API's, keyed by
//! the whole request): an identical request joins the fetch under way instead of
//! starting its own — unless it wants only answers from calls that started after it
//! arrived and this one started before.
//!
//! Receipt items do not use it: their keys ride in batches, and [`inflight`](super::inflight)
//! keeps which batch carries each. Both keep the same rule, *never two fetches in flight
//! for one key*, and both hand out the same kind of waiter (a `watch` that turns `Some`).
//!
//! Invariant: a key has at most one flight; it leaves the table when its leader lands it,
//! and only the leader of the flight in the table can remove it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;
use tokio::time::Instant;

use super::batch::{Served, note};

/// One fetch under way.
struct Flight<T> {
    started: Instant,
    outcome: watch::Receiver<Option<T>>,
    /// The request ids it serves, for the call's log line.
    served: Served,
}

/// Where a request stands: joined a flight, or leading a new one.
pub enum Place<K, T, P> {
    Joined(watch::Receiver<Option<T>>),
    Lead { outcome: watch::Receiver<Option<T>>, lead: Lead<K, T>, with: P },
}

/// The right and the duty to land one flight.
pub struct Lead<K, T> {
    key: K,
    tx: watch::Sender<Option<T>>,
    /// Whom the flight serves (joiners add themselves).
    pub served: Served,
}

/// The flights of one (app, API).
pub struct Flights<K, T> {
    map: Mutex<HashMap<K, Flight<T>>>,
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Self { map: Mutex::default() }
    }
}

impl<K: Hash + Eq + Clone, T: Clone> Flights<K, T> {
    /// Joins `key`'s flight if one started at or after `since` (any flight with `None`),
    /// noting `request` among those it serves; else asks `start` whether a new flight
    /// may start (admission), and starts it with `request` as its first. The table is
    /// locked throughout, so no second flight can start meanwhile.
    pub fn join_or_start<P, E>(
        &self,
        key: &K,
        since: Option<Instant>,
        request: &str,
        start: impl FnOnce() -> Result<P, E>,
    ) -> Result<Place<K, T, P>, E> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = map.get(key)
            && since.is_none_or(|since| flight.started >= since)
        {
            note(&flight.served, request);
            return Ok(Place::Joined(flight.outcome.clone()));
        }
        let with = start()?;
        let (tx, outcome) = watch::channel(None);
        let served = Served::default();
        note(&served, request);
        let flight = Flight { started: Instant::now(), outcome: outcome.clone(), served: served.clone() };
        map.insert(key.clone(), flight);
        Ok(Place::Lead { outcome, lead: Lead { key: key.clone(), tx, served }, with })
    }

    /// Ends `lead`'s flight with `value`, for everyone waiting on it.
    pub fn land(&self, lead: Lead<K, T>, value: T) {
        {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            // A `no-cache` request may have put a flight of its own in this one's place.
            if map.get(&lead.key).is_some_and(|f| f.outcome.same_channel(&lead.tx.subscribe())) {
                map.remove(&lead.key);
            }
        }
        lead.tx.send_replace(Some(value));
    }

    /// Flights in the table.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Table = Flights<&'static str, u32>;

    fn lead(place: Place<&'static str, u32, ()>) -> (watch::Receiver<Option<u32>>, Lead<&'static str, u32>) {
        match place {
            Place::Lead { outcome, lead, .. } => (outcome, lead),
            Place::Joined(_) => panic!("expected to lead"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_identical_request_joins_and_a_landed_flight_leaves() {
        let table = Table::default();
        let ok = || Ok::<(), ()>(());
        let (rx, first) = lead(table.join_or_start(&"k", None, "r1", ok).unwrap());
        let Ok(Place::Joined(joined)) = table.join_or_start(&"k", None, "r2", ok) else { panic!("expected to join") };
        assert!(joined.same_channel(&rx));
        assert_eq!(table.len(), 1);
        table.land(first, 7);
        assert_eq!(*rx.borrow(), Some(7));
        assert!(table.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_wants_a_later_start_leads_its_own_and_the_old_leader_leaves_it() {
        let table = Table::default();
        let ok = || Ok::<(), ()>(());
        let (_, old) = lead(table.join_or_start(&"k", None, "r1", ok).unwrap());
        tokio::time::advance(std::time::Duration::from_millis(5)).await;
        let since = Some(Instant::now());
        let (rx, new) = lead(table.join_or_start(&"k", since, "r2", ok).unwrap());
        table.land(old, 1);
        assert_eq!(table.len(), 1, "the newer flight stays");
        table.land(new, 2);
        assert_eq!((*rx.borrow(), table.len()), (Some(2), 0));
    }

    #[test]
    fn a_refused_start_leaves_nothing_behind() {
        let table = Table::default();
        assert!(matches!(table.join_or_start(&"k", None, "r1", || Err::<(), _>("busy")), Err("busy")));
        assert!(table.is_empty());
    }
}
