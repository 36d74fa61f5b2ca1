//! What Tencent speaks: the wire types of the two receipt APIs and their scanner and
//! serialiser ([`wire`]), Tencent's error codes ([`code`]), the domain newtypes every
//! stage passes around ([`domain`]), UserSig signing and verification ([`usersig`]), and
//! its webhooks' commands and `Sign` ([`webhook`]).
//!
//! May import: nothing else in the crate. Everything else may import it.
//!
//! Invariant: these types validate on construction (`GroupId::parse`, `MsgSeq`, …), so a
//! value of them that reaches another stage is already known good.

pub mod code;
pub mod domain;
pub mod usersig;
pub mod webhook;
pub mod wire;
