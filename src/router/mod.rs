//! The router: joins the proxy's per-connection [`StanzaHook`] to the OTR
//! core, per account and per peer conversation (DESIGN §2, §3, §5, §6).
//!
//! * [`connection`] — the hook for one client connection: rewrites
//!   `<message>` stanzas, runs one [`Conversation`] per peer, persists EKM
//!   snapshots before anything leaves, suspends sessions on disconnect.
//! * [`command`] — `/otr …` commands and the control contact.
//! * [`notice`] — the `[o2tr]` texts the user reads.
//! * [`account`] — the account's long-term key and instance tag.
//! * `reorder` — holds a peer's message that arrived after a gap until the
//!   gap fills, so the client sees the sender's order; `fetch` asks the
//!   server's offline storage again when a gap stays open (XEP-0013).
//!
//! [`Conversation`]: crate::otr::conversation::Conversation

pub mod account;
pub mod command;
pub mod connection;
mod fetch;
mod group;
pub mod notice;
mod reorder;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::otr::conversation::PendingAkes;
use crate::otr::policy::Policy;
use crate::proxy::{HookFactory, StanzaHook};
use crate::store::Store;

/// The store shared by every connection.
pub type SharedStore = Arc<Mutex<Box<dyn Store>>>;

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Default OTR policy.
    pub policy: Policy,
    /// Largest body sent upstream; longer OTR messages are fragmented (0 = never).
    pub fragment_size: usize,
    /// Heartbeat interval in seconds (0 = off).
    pub heartbeat_secs: u64,
    /// The O2TR bound `k`.
    pub max_unanswered: u32,
    /// EKM snapshot lifetime in seconds.
    pub snapshot_lifetime_secs: u64,
    /// The control contact's JID.
    pub control_jid: String,
    /// Most conversations one connection keeps in memory.
    pub max_conversations: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            policy: Policy::Always,
            fragment_size: 0,
            heartbeat_secs: 60,
            max_unanswered: 1024,
            snapshot_lifetime_secs: 7 * 24 * 3600,
            control_jid: "control@o2tr.localhost".into(),
            max_conversations: 10_000,
        }
    }
}

/// State shared by every connection's router.
pub(crate) struct Shared {
    pub(crate) cfg: RouterConfig,
    store: SharedStore,
    /// Handshakes a connection left unfinished, per (account, peer), with
    /// when it ended: the account's next connection takes them over.
    akes: Mutex<HashMap<(String, String), (u64, PendingAkes)>>,
}

/// How long an unfinished handshake waits for the account's next
/// connection (seconds); older ones are dropped (the peer starts over).
pub(crate) const AKE_HANDOVER_SECS: u64 = 120;

impl Shared {
    /// Lock the store. A poisoned lock means a panic happened while a
    /// connection held it; SQLite's transactions kept the data consistent,
    /// so carry on with the inner value.
    pub(crate) fn store(&self) -> MutexGuard<'_, Box<dyn Store>> {
        match self.store.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A new `Shared` over `store`.
    pub(crate) fn new(cfg: RouterConfig, store: SharedStore) -> Self {
        Shared {
            cfg,
            store,
            akes: Mutex::new(HashMap::new()),
        }
    }

    fn akes(&self) -> MutexGuard<'_, HashMap<(String, String), (u64, PendingAkes)>> {
        match self.akes.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Keep `akes` for the account's next connection (dropping any that
    /// waited too long).
    pub(crate) fn park_akes(&self, account: &str, peer: &str, akes: PendingAkes, now: u64) {
        let mut m = self.akes();
        m.retain(|_, (at, _)| now.saturating_sub(*at) <= AKE_HANDOVER_SECS);
        m.insert((account.to_owned(), peer.to_owned()), (now, akes));
    }

    /// The handshakes the account's last connection left with `peer`, if
    /// recent enough.
    pub(crate) fn take_akes(&self, account: &str, peer: &str, now: u64) -> Option<PendingAkes> {
        let (at, akes) = self.akes().remove(&(account.to_owned(), peer.to_owned()))?;
        (now.saturating_sub(at) <= AKE_HANDOVER_SECS).then_some(akes)
    }
}

/// Makes one router hook per client connection.
pub struct RouterFactory {
    shared: Arc<Shared>,
}

impl RouterFactory {
    /// A factory over `store`.
    pub fn new(cfg: RouterConfig, store: SharedStore) -> Self {
        RouterFactory {
            shared: Arc::new(Shared::new(cfg, store)),
        }
    }
}

impl HookFactory for RouterFactory {
    fn new_hook(&self) -> Box<dyn StanzaHook> {
        Box::new(connection::Router::new(Arc::clone(&self.shared)))
    }
}
