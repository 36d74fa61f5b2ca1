//! The routes: what each request is for, and the only stage that sees every other one.
//!
//! May import: every stage. Nothing imports it but `lib.rs` and `reload`.

pub mod admin;
pub mod app;
pub mod callback;
pub mod detail;
pub mod receipts;
