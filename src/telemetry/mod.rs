//! What the gateway tells its operators: the Prometheus families ([`metrics`], created
//! once per gateway from one registry, no global state), the request log line
//! ([`logline`]), and episodes of trouble logged at their start and end ([`episode`]).
//!
//! May import: `tencent`, `clients`. Stages receive metric handles; telemetry never calls
//! into a stage.
//!
//! Invariant: labels are bounded — never a group id, a MsgSeq, a token or a UserSig.

pub mod episode;
pub mod logline;
pub mod metrics;
