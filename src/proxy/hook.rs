//! The seam between the relay and the OTR router (DESIGN §2).
//!
//! The relay calls a [`StanzaHook`] only for `<message>` stanzas, roster
//! `<iq>`s and bare iq results after resource binding (RFC 6120 §7; see
//! [`crate::xmpp::stanza::is_hooked`]), and for the client's directed and
//! available presences ([`crate::xmpp::stanza::is_hooked_from_client`]); everything else, and all traffic
//! before binding, is forwarded byte for byte without calling it. The hook returns
//! what to send — including the unchanged message if it does not touch it.

use std::time::SystemTime;

use crate::xmpp::{Element, Jid};

/// A stanza the hook wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Send to the local client.
    ToClient(Element),
    /// Send to the XMPP server.
    ToServer(Element),
}

/// A hooked stanza as read, with its direction (for [`StanzaHook::batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// From the local client.
    FromClient(Element),
    /// From the XMPP server.
    FromServer(Element),
}

/// Per-connection message processor. One instance per client connection;
/// called from that connection's task only.
// `from_client`/`from_server` name the direction, not a conversion.
#[allow(clippy::wrong_self_convention)]
pub trait StanzaHook: Send {
    /// Resource binding succeeded: `jid` is the account's full JID. Called
    /// once, before any other method but [`StanzaHook::disconnected`].
    fn bound(&mut self, jid: &Jid);
    /// A `<message>`, roster iq or directed presence from the client
    /// (after bind).
    fn from_client(&mut self, stanza: Element, now: SystemTime) -> Vec<Outgoing>;
    /// A `<message>` (or roster iq) from the server (after bind).
    fn from_server(&mut self, stanza: Element, now: SystemTime) -> Vec<Outgoing>;
    /// Several hooked stanzas that arrived together (one read of either
    /// leg, or both drained before the relay waits again), in arrival
    /// order; returns what to send for all of them, in order. The relay
    /// calls this instead of `from_client`/`from_server` so a hook can
    /// make one durable commit for the whole batch (group commit); a
    /// single stanza comes as a batch of one. The default handles them
    /// one by one (so a hook that relies on a call's output being written
    /// before its next call must override it).
    fn batch(&mut self, stanzas: Vec<Incoming>, now: SystemTime) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for s in stanzas {
            out.extend(match s {
                Incoming::FromClient(el) => self.from_client(el, now),
                Incoming::FromServer(el) => self.from_server(el, now),
            });
        }
        out
    }
    /// Called about once a second after bind (timers, retries).
    fn tick(&mut self, now: SystemTime) -> Vec<Outgoing>;
    /// Everything the last `from_*`/`tick` call returned was written and
    /// flushed to the sockets (the router acknowledges durable deliveries
    /// here). The default does nothing.
    fn flushed(&mut self) {}
    /// Like [`StanzaHook::flushed`], with XEP-0198 on the upstream leg: the
    /// stanzas written to the server so far carry counts up to `sent`
    /// (stanzas since `<enable/>`, mod 2^32). Written is not stored: the
    /// link may be dead without a FIN, so what went to the server is only
    /// known to be there once [`StanzaHook::server_acked`] reports a count
    /// at or past `sent`. The default treats it as [`StanzaHook::flushed`].
    fn flushed_upstream(&mut self, sent: u32) {
        let _ = sent;
        self.flushed();
    }
    /// The server acknowledged every stanza up to count `h` (its `<a h/>`).
    /// The default does nothing.
    fn server_acked(&mut self, h: u32) {
        let _ = h;
    }
    /// Upstream XEP-0198 ended on a live link (the server refused
    /// `<enable/>`): no ack will come, so what was written counts as sent,
    /// as without SM. The default does nothing.
    fn server_acks_off(&mut self) {}
    /// The connection is over (either side, or proxy shutdown). Called
    /// exactly once, also when the connection never reached bind.
    fn disconnected(&mut self, now: SystemTime);
}

/// Makes one [`StanzaHook`] per accepted connection.
pub trait HookFactory: Send + Sync {
    /// A fresh hook for a new connection.
    fn new_hook(&self) -> Box<dyn StanzaHook>;
}

/// A hook that forwards every message unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThrough;

impl StanzaHook for PassThrough {
    fn bound(&mut self, _jid: &Jid) {}
    fn from_client(&mut self, stanza: Element, _now: SystemTime) -> Vec<Outgoing> {
        vec![Outgoing::ToServer(stanza)]
    }
    fn from_server(&mut self, stanza: Element, _now: SystemTime) -> Vec<Outgoing> {
        vec![Outgoing::ToClient(stanza)]
    }
    fn tick(&mut self, _now: SystemTime) -> Vec<Outgoing> {
        Vec::new()
    }
    fn disconnected(&mut self, _now: SystemTime) {}
}

impl HookFactory for PassThrough {
    fn new_hook(&self) -> Box<dyn StanzaHook> {
        Box::new(PassThrough)
    }
}
