//! Who is calling (docs/design.md#callers): the configured client named by the client id header, or
//! the `default` client; its bearer token, checked in constant time; and its quota of
//! requests per rolling second, which refuses at once (429) rather than making anyone
//! wait.
//!
//! Tokens never leave this module: they are kept as SHA-256 digests, compared digest to
//! digest, and never logged, counted or echoed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, header};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::{ClientConfig, Config, ErrorStatus};
use crate::error::GatewayError;

/// The id of the client every unconfigured caller is.
pub const DEFAULT: &str = "default";

/// The rolling window of a quota.
const QUOTA_WINDOW: Duration = Duration::from_secs(1);

/// A client's place in the engines' fair-share tables: stable for the process's life
/// (a reload keeps every id's slot; a new id gets a new one), so work queued before a
/// reload keeps its client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientSlot(pub u16);

impl ClientSlot {
    /// The `default` client's.
    pub const DEFAULT: ClientSlot = ClientSlot(0);
}

/// One calling service.
pub struct Client {
    /// A configured id, or [`DEFAULT`]: the `client` metric label.
    pub id: String,
    pub slot: ClientSlot,
    /// Its share of the upstream budget when contended (docs/design.md#callers).
    pub weight: u32,
    /// How its gateway-made errors are sent: its own `error_status`, else the server's
    /// (docs/design.md#errors).
    pub error_status: ErrorStatus,
    token: Option<[u8; 32]>,
    quota: Option<Arc<Quota>>,
}

/// At most `limit` requests in any rolling second: the times of the last `limit` admitted
/// requests, exactly (a token bucket with a burst lets up to twice the limit into one
/// second).
struct Quota {
    limit: usize,
    admitted: Mutex<VecDeque<Instant>>,
}

impl Quota {
    /// Admits a request at `now`, or says how long until one would be admitted.
    fn admit(&self, now: Instant) -> Result<(), Duration> {
        let mut admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        while admitted.front().is_some_and(|&t| now.saturating_duration_since(t) >= QUOTA_WINDOW) {
            admitted.pop_front();
        }
        if admitted.len() < self.limit {
            admitted.push_back(now);
            return Ok(());
        }
        // Full: the oldest admission leaves the window first.
        let oldest = admitted.front().copied().unwrap_or(now);
        Err((oldest + QUOTA_WINDOW).saturating_duration_since(now))
    }
}

/// Why a caller was turned away (`receipt_gateway_client_rejected_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    Auth,
    Quota,
    Deadline,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Auth => "auth",
            Rejection::Quota => "quota",
            Rejection::Deadline => "deadline",
        }
    }
}

/// Every configured client, by id.
pub struct Clients {
    by_id: HashMap<String, Arc<Client>>,
    default: Arc<Client>,
    header: HeaderName,
    require_auth: bool,
    /// Every id that ever had a slot, by slot (ids a reload removed keep theirs).
    slots: Vec<String>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equal digests, compared in constant time.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(&a[..], &b[..]))
}

impl Client {
    /// The client `config` describes, in `slot`; its quota's window carries over from
    /// `before` (the same client before a reload) when the limit is unchanged.
    fn new(config: &ClientConfig, slot: ClientSlot, before: Option<&Client>, server: ErrorStatus) -> Self {
        let limit = config.requests_per_second.map(|n| n.get() as usize);
        let kept = before.and_then(|c| c.quota.clone()).filter(|q| Some(q.limit) == limit);
        Self {
            id: config.id.clone(),
            slot,
            weight: config.weight.get(),
            error_status: config.error_status.unwrap_or(server),
            token: config.token.as_ref().map(|t| digest(t.expose().as_bytes())),
            quota: kept.or_else(|| {
                limit.map(|limit| {
                    Arc::new(Quota { limit, admitted: Mutex::new(VecDeque::with_capacity(limit.min(4096))) })
                })
            }),
        }
    }

    fn unconfigured_default(error_status: ErrorStatus) -> Self {
        Self { id: DEFAULT.to_owned(), slot: ClientSlot::DEFAULT, weight: 1, error_status, token: None, quota: None }
    }

    /// Checks the caller's `Authorization: Bearer` against this client's token.
    fn authenticate(&self, headers: &HeaderMap) -> Result<(), GatewayError> {
        let Some(expected) = &self.token else { return Ok(()) };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match presented {
            Some(token) if same(&digest(token.as_bytes()), expected) => Ok(()),
            Some(_) => Err(GatewayError::Unauthorized(format!("the bearer token of client {} is wrong", self.id))),
            None => Err(GatewayError::Unauthorized(format!("client {} must send Authorization: Bearer", self.id))),
        }
    }

    /// Counts one request against the quota; 429 with a truthful `Retry-After` over it.
    pub fn admit(&self, now: Instant) -> Result<(), GatewayError> {
        match &self.quota {
            None => Ok(()),
            Some(quota) => quota.admit(now).map_err(|retry_after| GatewayError::QuotaExceeded { retry_after }),
        }
    }
}

impl Clients {
    pub fn new(config: &Config) -> Self {
        Self::build(config, None)
    }

    /// The clients of a reloaded `config`: slots and quota windows carry over by id.
    pub fn reload(&self, config: &Config) -> Self {
        Self::build(config, Some(self))
    }

    fn build(config: &Config, before: Option<&Clients>) -> Self {
        let mut slots = before.map_or_else(|| vec![DEFAULT.to_owned()], |b| b.slots.clone());
        let mut by_id = HashMap::with_capacity(config.clients.len());
        for c in &config.clients {
            let slot = match slots.iter().position(|id| *id == c.id) {
                Some(i) => ClientSlot(i as u16),
                None => {
                    slots.push(c.id.clone());
                    // Past 65,535 ids ever configured, the newest share the last slot.
                    ClientSlot(u16::try_from(slots.len() - 1).unwrap_or(u16::MAX))
                }
            };
            let old = before.and_then(|b| b.by_id.get(&c.id)).map(Arc::as_ref);
            by_id.insert(c.id.clone(), Arc::new(Client::new(c, slot, old, config.server.error_status)));
        }
        let default = by_id
            .get(DEFAULT)
            .cloned()
            .unwrap_or_else(|| Arc::new(Client::unconfigured_default(config.server.error_status)));
        Self {
            by_id,
            default,
            header: config.server.client_id_header.clone(),
            require_auth: config.server.require_client_auth,
            slots,
        }
    }

    /// Every slot's client id and weight, by slot (an id a reload removed: weight 1,
    /// for the work it left queued).
    pub fn shares(&self) -> Vec<(&str, u32)> {
        self.slots
            .iter()
            .map(|id| {
                (
                    id.as_str(),
                    self.by_id.get(id).map_or(if id == DEFAULT { self.default.weight } else { 1 }, |c| c.weight),
                )
            })
            .collect()
    }

    /// How a gateway-made error is sent to the caller the client id header names (a
    /// configured client, whether or not it authenticated), else to the `default` client:
    /// for errors found before the caller is identified (docs/design.md#errors).
    pub fn error_status(&self, headers: &HeaderMap) -> ErrorStatus {
        let named = headers.get(&self.header).and_then(|v| v.to_str().ok()).and_then(|id| self.by_id.get(id.trim()));
        named.unwrap_or(&self.default).error_status
    }

    /// The caller of a request: who it says it is, if configured, and authenticated. The
    /// client is returned with the error too, for the metrics.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Arc<Client>, (Arc<Client>, GatewayError)> {
        let named = headers.get(&self.header).and_then(|v| v.to_str().ok()).and_then(|id| self.by_id.get(id.trim()));
        let client = match named {
            Some(client) => client.clone(),
            None if self.require_auth => {
                let e = GatewayError::Forbidden(format!("callers must name a configured client in {}", self.header));
                return Err((self.default.clone(), e));
            }
            None => self.default.clone(),
        };
        match client.authenticate(headers) {
            Ok(()) => Ok(client),
            Err(e) => Err((client, e)),
        }
    }
}

/// The clients every request reads, swapped whole by a reload.
/// Read by every request from every core: an `ArcSwap`, whose loads write nothing
/// shared (a lock or a reference count would bounce between the cores).
pub struct ClientsCell(ArcSwap<Clients>);

impl ClientsCell {
    pub fn new(clients: Clients) -> Self {
        Self(ArcSwap::from_pointee(clients))
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<Clients>> {
        self.0.load()
    }

    /// Puts `clients` in place for every request from now on.
    pub fn replace(&self, clients: Clients) {
        self.0.store(Arc::new(clients));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_quota_admits_its_limit_in_any_rolling_second_and_says_when_to_retry() {
        let quota = Quota { limit: 3, admitted: Mutex::new(VecDeque::new()) };
        let t = Instant::now();
        let ms = Duration::from_millis;

        let first: Vec<bool> = (0..4).map(|i| quota.admit(t + ms(i * 100)).is_ok()).collect();
        let refused = quota.admit(t + ms(400)).unwrap_err();
        let after = quota.admit(t + ms(1000)).is_ok();

        assert_eq!(first, [true, true, true, false]);
        assert_eq!(refused, ms(600), "the first admission leaves the window at 1 s");
        assert!(after);
        assert!(quota.admit(t + ms(1050)).is_err(), "100 ms and 200 ms are still in the window");
    }

    #[test]
    fn digests_compare_equal_only_when_equal() {
        assert!(same(&digest(b"token"), &digest(b"token")));
        assert!(!same(&digest(b"token"), &digest(b"tokem")));
    }
}
