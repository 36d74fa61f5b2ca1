//! One integration test binary: the real gateway on 127.0.0.1:0 in front of the
//! simulator on 127.0.0.1:0. Tests prove what the gateway saved by counting the
//! simulator's calls.

mod api;
mod budget_lease;
mod callbacks;
mod cli;
mod clients;
mod cluster;
mod detail;
mod egress;
mod engine;
mod errors;
mod fleet;
mod hygiene;
mod metrics_names;
mod recovery;
mod redis;
mod redis_tier;
mod reload;
mod support;
