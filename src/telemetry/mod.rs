//! What the gateway tells its operators: the Prometheus families ([`metrics`], created
//! once per gateway from one registry, no global state) and the request log line
//! ([`logline`]).
//!
//! May import: `tencent`, `clients`. Stages receive metric handles; telemetry never calls
//! into a stage.
//!
//! Invariant: labels are bounded — never a group id, a MsgSeq, a token or a UserSig.

pub mod logline;
pub mod metrics;
