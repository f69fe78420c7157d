//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod ejabberd;
pub mod xmpp_client;
