//! The router: joins the proxy's per-connection [`StanzaHook`] to the OTR
//! core, per account and per peer conversation (DESIGN §2, §3, §5, §6).

use std::sync::{Arc, Mutex};

use crate::otr::policy::Policy;
use crate::proxy::{HookFactory, PassThrough, StanzaHook};
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
        }
    }
}

/// Makes one router hook per client connection.
pub struct RouterFactory {
    #[allow(dead_code)]
    cfg: Arc<RouterConfig>,
    #[allow(dead_code)]
    store: SharedStore,
}

impl RouterFactory {
    /// A factory over `store`.
    pub fn new(cfg: RouterConfig, store: SharedStore) -> Self {
        RouterFactory {
            cfg: Arc::new(cfg),
            store,
        }
    }
}

impl HookFactory for RouterFactory {
    fn new_hook(&self) -> Box<dyn StanzaHook> {
        Box::new(PassThrough)
    }
}
