//! OTR version 3 (and 2) protocol core, sans-IO.
//!
//! Nothing here opens sockets, reads the clock or owns a global RNG: `now`
//! and `rng` are parameters, and every state change is returned as an
//! action for the caller to carry out.

pub mod codec;
pub mod decode;
pub mod fragment;
pub mod message;
pub mod tlv;
