//! The router hook of one client connection (DESIGN §3, §5).
//!
//! Outgoing chat bodies go through the peer's [`Conversation`]; incoming
//! bodies likewise. The core's actions are carried out in order, and an
//! EKM snapshot is written to the store before anything that follows it
//! leaves the proxy — if the write fails, nothing after it is released.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;

use super::Shared;
use super::account::{Identity, load_or_create};
use super::command::{self, Command};
use super::notice;
use crate::otr::conversation::{Action, Config, Conversation, Notice};
use crate::otr::offline::EncryptedSession;
use crate::otr::policy::Policy;
use crate::proxy::{Outgoing, StanzaHook};
use crate::store::{ConversationKey, SessionState, Trust};
use crate::xmpp::stanza::{self, MessageType};
use crate::xmpp::{Element, Jid, ns};

/// Unix seconds.
pub(crate) fn unix(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) struct Peer {
    pub(crate) conv: Conversation,
    /// Full JID to send encrypted messages to, once seen.
    full_jid: Option<String>,
    /// Snapshots that were wiped because they expired; told on next message.
    expired: usize,
}

pub(crate) struct AccountCtx {
    pub(crate) jid: Jid,
    pub(crate) bare: String,
    pub(crate) identity: Identity,
}

/// The hook for one client connection.
pub struct Router {
    pub(crate) shared: Arc<Shared>,
    pub(crate) account: Option<AccountCtx>,
    pub(crate) peers: HashMap<String, Peer>,
    pub(crate) policies: HashMap<String, Policy>,
    pub(crate) rng: StdRng,
    next_id: u64,
}

impl Router {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Router {
            shared,
            account: None,
            peers: HashMap::new(),
            policies: HashMap::new(),
            rng: rand::make_rng(),
            next_id: 0,
        }
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("o2tr-{}", self.next_id)
    }

    /// A notice injected into the conversation with `peer`.
    pub(crate) fn notice_to_client(&mut self, peer: &str, text: &str) -> Outgoing {
        let id = self.new_id();
        let mut el = Element::new("message", ns::CLIENT)
            .with_attr("from", peer)
            .with_attr("type", "chat")
            .with_attr("id", &id)
            .with_child(Element::new("body", ns::CLIENT).with_text(text));
        if let Some(acc) = &self.account {
            el.set_attr("to", &acc.jid.to_string());
        }
        Outgoing::ToClient(el)
    }

    /// The conversation with `peer` (bare JID), restoring suspended
    /// sessions and held messages from the store on first use.
    pub(crate) fn peer(&mut self, peer: &str, now: u64) -> Option<&mut Peer> {
        if !self.peers.contains_key(peer) {
            let acc = self.account.as_ref()?;
            if self.peers.len() >= self.shared.cfg.max_conversations {
                tracing::warn!(
                    limit = self.shared.cfg.max_conversations,
                    "conversation limit reached; message passed through untouched"
                );
                return None;
            }
            let cfg = &self.shared.cfg;
            let mut c = Config::new(acc.bare.clone(), acc.identity.tag);
            c.policy = self.policies.get(peer).copied().unwrap_or(cfg.policy);
            c.max_message_bytes = cfg.fragment_size;
            c.heartbeat_secs = cfg.heartbeat_secs;
            c.max_unanswered = cfg.max_unanswered;
            let mut conv = Conversation::new(c, Arc::clone(&acc.identity.key));
            let mut expired = 0;
            let account = acc.bare.clone();
            let mut store = self.shared.store();
            match store.snapshots_for_peer(&account, peer) {
                Ok(records) => {
                    for rec in records {
                        if rec.state == SessionState::Finished {
                            continue;
                        }
                        let stale = match EncryptedSession::restore(&rec.data) {
                            Ok(s) => s.is_expired(now, cfg.snapshot_lifetime_secs),
                            Err(e) => {
                                tracing::warn!(peer, cause = %e, "unreadable snapshot wiped");
                                true
                            }
                        };
                        if stale {
                            expired += 1;
                            if let Err(e) = store.delete_snapshot(&rec.key) {
                                tracing::error!(cause = %e, "could not wipe snapshot");
                            }
                            continue;
                        }
                        if let Err(e) = conv.restore(&rec.data) {
                            tracing::warn!(peer, cause = %e, "snapshot not restored");
                        }
                    }
                }
                Err(e) => tracing::error!(peer, cause = %e, "could not read snapshots"),
            }
            match store.held_messages(&account, peer) {
                Ok(held) => conv.restore_held(held.into_iter().map(|h| h.text)),
                Err(e) => tracing::error!(peer, cause = %e, "could not read held messages"),
            }
            drop(store);
            self.peers.insert(
                peer.to_string(),
                Peer {
                    conv,
                    full_jid: None,
                    expired,
                },
            );
        }
        self.peers.get_mut(peer)
    }

    /// Carry out the core's actions for the conversation with `peer`.
    /// `template` is the stanza that caused them (its other children are
    /// kept on deliveries).
    pub(crate) fn apply(
        &mut self,
        peer: &str,
        actions: Vec<Action>,
        template: Option<&Element>,
        now: u64,
        out: &mut Vec<Outgoing>,
    ) {
        let Some(account) = self.account.as_ref().map(|a| a.bare.clone()) else {
            return;
        };
        let to = self
            .peers
            .get(peer)
            .and_then(|p| p.full_jid.clone())
            .unwrap_or_else(|| peer.to_string());
        let mut sent_parts = 0usize;
        for action in actions {
            match action {
                Action::Persist(p) => {
                    let key = ConversationKey::new(&account, peer, p.instance);
                    let r = self.shared.store().save_snapshot(
                        &key,
                        SessionState::Live,
                        &p.snapshot,
                        now,
                    );
                    if let Err(e) = r {
                        // Persist-before-release: nothing after this may go out.
                        tracing::error!(peer, cause = %e, "could not persist EKM snapshot");
                        let text = format!(
                            "{} Could not save the session keys ({e}); nothing was sent or shown.",
                            notice::PREFIX
                        );
                        out.push(self.notice_to_client(peer, &text));
                        return;
                    }
                }
                Action::Forget { instance } => {
                    let key = ConversationKey::new(&account, peer, instance);
                    if let Err(e) = self.shared.store().delete_snapshot(&key) {
                        tracing::error!(peer, cause = %e, "could not wipe snapshot");
                    }
                }
                Action::Hold(text) => {
                    if let Err(e) = self.shared.store().hold_message(&account, peer, &text, now) {
                        tracing::error!(peer, cause = %e, "could not store held message");
                    }
                }
                Action::ReleaseHeld { count } => {
                    let mut store = self.shared.store();
                    match store.held_messages(&account, peer) {
                        Ok(held) => {
                            for h in held.into_iter().take(count) {
                                if let Err(e) = store.release_held(h.id) {
                                    tracing::error!(peer, cause = %e, "could not release held");
                                }
                            }
                        }
                        Err(e) => tracing::error!(peer, cause = %e, "could not read held"),
                    }
                }
                Action::Send(body) => {
                    let el = self.wire_stanza(&to, &body, template, sent_parts);
                    sent_parts += 1;
                    out.push(Outgoing::ToServer(el));
                }
                Action::Deliver(d) => {
                    let mut el = match template {
                        Some(t) => t.clone(),
                        None => Element::new("message", ns::CLIENT)
                            .with_attr("from", peer)
                            .with_attr("type", "chat"),
                    };
                    el.remove_children(|c| c.is("encryption", ns::EME));
                    stanza::set_body(&mut el, &d.text);
                    out.push(Outgoing::ToClient(el));
                }
                Action::Notify(n) => {
                    let trust = match &n {
                        Notice::GoneSecure { fingerprint, .. } => {
                            Some(self.record_fingerprint(&account, peer, &fingerprint.0, now))
                        }
                        Notice::SmpSucceeded { fingerprint } => {
                            command::smp_verified(self, &account, peer, fingerprint, now)
                        }
                        _ => None,
                    };
                    let text = notice::render(&n, peer, trust.as_deref());
                    out.push(self.notice_to_client(peer, &text));
                }
            }
        }
    }

    /// A message stanza to the server carrying an OTR body.
    fn wire_stanza(
        &mut self,
        to: &str,
        body: &str,
        template: Option<&Element>,
        part: usize,
    ) -> Element {
        let is_otr =
            body.starts_with("?OTR:") || body.starts_with("?OTR|") || body.starts_with("?OTR,");
        let mut el = match template {
            // The user's own stanza: keep its id (receipts), type and safe children.
            Some(t) if part == 0 && stanza::is_message(t) && t.attr("to").is_some() => {
                let mut el = t.clone();
                el.set_attr("to", to);
                el
            }
            _ => {
                let id = self.new_id();
                Element::new("message", ns::CLIENT)
                    .with_attr("to", to)
                    .with_attr("type", "chat")
                    .with_attr("id", &id)
            }
        };
        el.remove_attr("from");
        if is_otr {
            stanza::rewrite_for_encryption(&mut el, body);
        } else {
            // Query, error or whitespace-tagged plaintext: nothing else rides along.
            el.retain_nodes(|_| false);
            el.append_child(Element::new("body", ns::CLIENT).with_text(body));
        }
        el
    }

    /// Record a fingerprint seen in an AKE; returns the trust text.
    fn record_fingerprint(
        &mut self,
        account: &str,
        peer: &str,
        fpr: &[u8; 20],
        now: u64,
    ) -> String {
        let mut store = self.shared.store();
        let known = match store.fingerprints(account, peer) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(cause = %e, "could not read fingerprints");
                return "trust unknown (store error)".into();
            }
        };
        if let Some(rec) = known.iter().find(|r| &r.fingerprint == fpr) {
            return match rec.trust {
                Trust::Verified => "verified".into(),
                Trust::Unverified => "unverified (type /otr trust after checking it)".into(),
                Trust::Distrusted => "DISTRUSTED: you marked this key as not theirs".into(),
            };
        }
        if let Err(e) = store.set_fingerprint(account, peer, fpr, Trust::Unverified, now) {
            tracing::error!(cause = %e, "could not record fingerprint");
        }
        if known.is_empty() {
            "unverified, first time seen (check it with your peer, then /otr trust)".into()
        } else {
            "WARNING: a NEW key for this contact, different from the one seen before — verify it before trusting anything".into()
        }
    }

    fn handle_client_message(&mut self, mut el: Element, now: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let Some(to) = stanza::to(&el) else {
            return vec![Outgoing::ToServer(el)];
        };
        let peer = to.bare().to_string();
        if peer == self.shared.cfg.control_jid {
            let text = stanza::body(&el).unwrap_or_default();
            let reply = command::control(self, &text, now);
            let control = self.shared.cfg.control_jid.clone();
            out.push(self.notice_to_client(&control, &reply));
            return out;
        }
        let kind = stanza::message_type(&el);
        let body = stanza::body(&el);
        let (Some(body), MessageType::Chat | MessageType::Normal) = (body, kind) else {
            return vec![Outgoing::ToServer(el)];
        };
        if to.local().is_none() || self.account.is_none() {
            return vec![Outgoing::ToServer(el)];
        }
        if let Some(cmd) = Command::parse(&body) {
            let actions = command::run(self, &peer, cmd, now, &mut out);
            if let Some(actions) = actions {
                self.apply(&peer, actions, None, now, &mut out);
            }
            return out;
        }
        if to.resource().is_some() {
            if let Some(p) = self.peer(&peer, now) {
                p.full_jid = Some(to.to_string());
            }
        }
        let mut rng = std::mem::replace(&mut self.rng, rand::make_rng());
        let actions = match self.peer(&peer, now) {
            Some(p) => {
                let expired = std::mem::take(&mut p.expired);
                let a = p.conv.handle_outgoing(&body, now, &mut rng);
                Some((expired, a))
            }
            None => None,
        };
        self.rng = rng;
        let Some((expired, actions)) = actions else {
            return vec![Outgoing::ToServer(el)];
        };
        if expired > 0 {
            let text = format!(
                "{} The saved private session with {peer} had expired and was wiped; a new handshake is needed.",
                notice::PREFIX
            );
            out.push(self.notice_to_client(&peer, &text));
        }
        el.remove_attr("from");
        self.apply(&peer, actions, Some(&el), now, &mut out);
        out
    }

    fn handle_server_message(&mut self, mut el: Element, now: u64) -> Vec<Outgoing> {
        let kind = stanza::message_type(&el);
        // Carbons and archive results: we cannot decrypt another device's
        // session; never show base64 noise.
        let own = self.account.as_ref().map(|a| a.jid.clone());
        if let Some(own) = own {
            let forwarded_otr = stanza::carbon(&el)
                .filter(|_| stanza::carbon_from_own_account(&el, &own))
                .map(|(_, m)| m)
                .or_else(|| stanza::mam_result(&el).map(|r| r.message))
                .and_then(stanza::body)
                .is_some_and(|b| b.contains("?OTR"));
            if forwarded_otr {
                replace_forwarded_body(
                    &mut el,
                    &format!(
                        "{} An encrypted message copy (another device or the archive) cannot be shown here.",
                        notice::PREFIX
                    ),
                );
                return vec![Outgoing::ToClient(el)];
            }
        }
        let body = stanza::body(&el);
        let from = stanza::from(&el);
        let (Some(body), Some(from), MessageType::Chat | MessageType::Normal) = (body, from, kind)
        else {
            return vec![Outgoing::ToClient(el)];
        };
        if from.local().is_none() {
            return vec![Outgoing::ToClient(el)];
        }
        let peer = from.bare().to_string();
        let mut rng = std::mem::replace(&mut self.rng, rand::make_rng());
        let actions = match self.peer(&peer, now) {
            Some(p) => {
                if from.resource().is_some() {
                    p.full_jid = Some(from.to_string());
                }
                Some(p.conv.handle_incoming(&body, now, &mut rng))
            }
            None => None,
        };
        self.rng = rng;
        let Some(actions) = actions else {
            return vec![Outgoing::ToClient(el)];
        };
        let mut out = Vec::new();
        self.apply(&peer, actions, Some(&el), now, &mut out);
        out
    }
}

/// Replace the body of the message forwarded inside a carbon or MAM result.
fn replace_forwarded_body(el: &mut Element, text: &str) {
    for wrap in el.children_mut() {
        for fwd in wrap.children_mut() {
            if fwd.is("forwarded", ns::FORWARD) {
                for m in fwd.children_mut() {
                    if m.is("message", ns::CLIENT) {
                        m.remove_children(|c| c.is("encryption", ns::EME));
                        stanza::set_body(m, text);
                    }
                }
            }
        }
    }
}

impl StanzaHook for Router {
    fn bound(&mut self, jid: &Jid) {
        let bare = jid.bare().to_string();
        let mut rng = std::mem::replace(&mut self.rng, rand::make_rng());
        let identity = {
            let mut store = self.shared.store();
            load_or_create(store.as_mut(), &bare, &mut rng)
        };
        self.rng = rng;
        match identity {
            Ok(identity) => {
                tracing::info!(account = %bare, fingerprint = %identity.key.public_key().fingerprint(), "account bound");
                self.account = Some(AccountCtx {
                    jid: jid.clone(),
                    bare,
                    identity,
                });
            }
            Err(e) => {
                tracing::error!(account = %bare, cause = %e, "no OTR identity: messages pass through unencrypted is NOT allowed; they will be dropped");
            }
        }
    }

    fn from_client(&mut self, stanza: Element, now: SystemTime) -> Vec<Outgoing> {
        let now = unix(now);
        if self.account.is_none() && stanza::body(&stanza).is_some() {
            // No identity: never let a body out in plaintext.
            return Vec::new();
        }
        self.handle_client_message(stanza, now)
    }

    fn from_server(&mut self, stanza: Element, now: SystemTime) -> Vec<Outgoing> {
        let now = unix(now);
        self.handle_server_message(stanza, now)
    }

    fn tick(&mut self, _now: SystemTime) -> Vec<Outgoing> {
        Vec::new()
    }

    fn disconnected(&mut self, now: SystemTime) {
        let now = unix(now);
        let Some(account) = self.account.as_ref().map(|a| a.bare.clone()) else {
            return;
        };
        let mut store = self.shared.store();
        for (peer, p) in &mut self.peers {
            p.conv.suspend();
            for st in p.conv.status() {
                if st.state == "suspended" {
                    let key = ConversationKey::new(&account, peer, st.instance);
                    if let Err(e) = store.set_snapshot_state(&key, SessionState::Suspended, now) {
                        tracing::warn!(peer, cause = %e, "could not mark session suspended");
                    }
                }
            }
        }
        tracing::info!(
            account,
            conversations = self.peers.len(),
            "connection over; sessions suspended"
        );
    }
}
