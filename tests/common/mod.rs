//! Shared helpers for the integration tests (`mod common;` in each test
//! crate). Each test crate uses a subset, hence `dead_code` is allowed.
#![allow(dead_code)]

pub mod ejabberd;
pub mod interop;
pub mod pair;
pub mod peer;
pub mod proxy;
pub mod relay;
pub mod tamper_relay;
pub mod xmpp_client;
