//! XMPP stream handling, sans-IO (RFC 6120 and the XEPs named per module):
//! framing a byte stream into stanzas, a small element tree, message
//! helpers and rewriting, stream feature filtering, and JIDs.
//!
//! Nothing here touches sockets or clocks; [`crate::proxy`] drives it.

pub mod element;
pub mod features;
pub mod framer;
pub mod jid;
pub mod ns;
pub mod stanza;

#[cfg(test)]
pub(crate) mod testdata;

pub use element::{Element, Node};
pub use framer::{Frame, Framer, FramerConfig, FramerError, StreamHeader};
pub use jid::Jid;
