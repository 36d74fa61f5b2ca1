//! The routes: what each data request is for, and the only stage that sees every other
//! one. [`handle`] takes a request from the [`http`](crate::http) front through, in this
//! order: drain check → route → app (`sdkappid`) → client (who, its token, its quota) →
//! deadline and `Cache-Control` → body → validation → the route's handler
//! ([`receipts`], [`detail`], [`callback`]) → response, metrics and one log line.
//! Errors become HTTP in exactly one place, [`respond::error_response`].
//!
//! May import: every stage. Imported by `lib.rs` and `reload` only.
//!
//! Invariant: every request is answered once and logged once — a caller that went away
//! first is counted as 499 — and nothing a caller sends reaches upstream unvalidated.

pub mod admin;
pub mod app;
pub mod callback;
pub mod detail;
mod front;
pub mod receipts;
pub mod respond;

use std::collections::HashMap;
use std::sync::Arc;

pub use front::handle;

use crate::clients::ClientsCell;
use crate::config::ServerConfig;
use crate::error::GatewayError;
use crate::shutdown::Drain;
use crate::telemetry::metrics::Metrics;
use crate::tencent::domain::AppId;
use app::AppRuntime;

/// The configured apps by sdkappid (looked up on every request; the keys are the
/// configuration's, so foldhash's speed costs no safety).
pub type Apps = HashMap<AppId, Arc<AppRuntime>, foldhash::fast::RandomState>;

/// What every data request shares.
pub struct Gateway {
    pub apps: Apps,
    /// Swapped whole by a configuration reload.
    pub clients: ClientsCell,
    pub config: ServerConfig,
    pub metrics: Metrics,
    pub drain: Arc<Drain>,
}

/// How a route names its app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppParam {
    /// The data APIs' `sdkappid` query parameter, which may be left out when exactly one
    /// app is configured. The caller's `identifier` and `usersig` are never read.
    Query,
    /// A callback's `SdkAppid`, always required.
    Callback,
}

impl AppParam {
    fn name(self) -> &'static str {
        match self {
            AppParam::Query => "sdkappid",
            AppParam::Callback => "SdkAppid",
        }
    }
}

impl Gateway {
    /// The app `raw` (the value of `param`, if sent) names.
    pub fn app(&self, raw: Option<&str>, param: AppParam) -> Result<&Arc<AppRuntime>, GatewayError> {
        let name = param.name();
        let Some(raw) = raw else {
            return match self.apps.values().next() {
                Some(only) if param == AppParam::Query && self.apps.len() == 1 => Ok(only),
                _ if param == AppParam::Query => {
                    Err(GatewayError::UnknownApp(format!("{name} is required: several apps are configured")))
                }
                _ => Err(GatewayError::UnknownApp(format!("{name} is required"))),
            };
        };
        let id =
            raw.parse::<u64>().map_err(|_| GatewayError::UnknownApp(format!("{name} must be a decimal number")))?;
        self.apps
            .get(&AppId(id))
            .ok_or_else(|| GatewayError::UnknownApp(format!("{name} {id} is not configured on this gateway")))
    }
}
