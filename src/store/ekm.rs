//! Glue between the OTR core's actions and the store: the atomic "EKM
//! commit" that makes O2TR's *persist before release* rule (DESIGN §5, O2TR
//! paper §4) lose nothing when the process dies.
//!
//! # Why an inbox
//!
//! The core emits, for an incoming data message, `Persist(snapshot)` then
//! `Deliver(text)`. The snapshot has already consumed the message (its
//! receive counter moved past it, possibly its keys rotated), so once it is
//! durable the same ciphertext is a replay and will be rejected forever. If
//! the process dies after the snapshot is stored but before the plaintext
//! reached the client, the message is **lost**. Delivering before persisting
//! is no answer either: a crash after delivery would restore the old
//! counters, and the message (or a replay of it by an attacker) would be
//! accepted a second time.
//!
//! The fix is to make "this message was consumed" and "this plaintext is
//! owed to the client" one fact: the decrypted text is written to an
//! *inbox* table in the **same transaction** as the snapshot
//! ([`Store::commit_step`]). After the commit, the text is handed to the
//! client and only then acknowledged ([`Store::ack_inbox`], which deletes
//! and wipes it). After a crash the unacknowledged inbox entries are handed
//! over again, in order ([`Store::inbox`]). Delivery to the client is thus
//! *at least once*; a consumer that remembers the highest inbox id it has
//! seen (the ids increase and are never reused) makes it *exactly once*.
//!
//! Effects that leave the proxy (ciphertext upstream, notices, plaintext to
//! the client) are performed only after the commit. `ReleaseHeld` is applied
//! after the sends it accounts for ([`release_oldest_held`]): a crash in
//! between re-sends those held messages (with fresh counters) rather than
//! losing them.
//!
//! # Why an outbox
//!
//! The sending side has the mirror problem: encrypting a message advances
//! the sending counter in the snapshot, which is committed before the
//! ciphertext leaves. A crash between the commit and the write loses the
//! message. So the router also commits each encrypted *data* stanza (and
//! the AKE's Signature, [`Step::outbox_sends`]) as a [`DurableOp::Outbox`] entry in the same
//! transaction, and with it the release of the held plaintexts it
//! encrypted ([`Step::release_in_commit`]); the entry is acknowledged
//! ([`Store::ack_outbox`]) once written to the server, and after a restart
//! the unacknowledged entries are sent again before anything new
//! ([`Store::outbox`]). At least once: a duplicate is dropped by the peer's
//! counter check (ours silently, libotr with an "unreadable" error reply).
//! Partially reassembled incoming fragments are committed the same way
//! ([`DurableOp::Fragments`]) and restored by [`restore_peer`].
//!
//! [`split`] turns one batch of [`Action`]s (the result of one `handle_*`
//! call) into that plan; [`restore_peer`] rebuilds a [`Conversation`] from
//! the store after a restart, wiping expired or unreadable snapshots.
//!
//! # Use
//!
//! ```text
//! let step = ekm::split(conv.handle_incoming(body, now, rng));
//! let receipt = store.commit_step(account, peer, &step.durable, now)?;  // on Err: stop, release nothing
//! for effect in step.effects {
//!     Send(body)               => send upstream
//!     Deliver { slot, delivery } => write to the client; once written,
//!                                 store.ack_inbox(account, peer, receipt.inbox_ids[slot])
//!     Notify(n)                => tell the user
//! }
//! ekm::release_oldest_held(store, account, peer, step.release_held)?;
//! // After a restart: restore_peer(..) and hand `pending` to the client first.
//! ```
//!
//! Several steps that are ready together (the stanzas of one read) can
//! share one transaction, [`Store::commit_steps`] (group commit: one fsync
//! for all); their effects are then performed, in order, after it.

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::{ConversationKey, Result, SessionState, Store};
use crate::otr::conversation::{Action, Config, Conversation, Delivery, Notice};
use crate::otr::crypto::{DsaPrivateKey, SecretBytes};
use crate::otr::fragment::parse_fragment;
use crate::otr::offline::EncryptedSession;

/// A plaintext owed to the client, written in the same transaction as the
/// snapshot that consumed its ciphertext. `Debug` does not print `text`.
#[derive(Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// The peer instance it came from (0 for plaintext / v2).
    pub instance: u32,
    /// The message text.
    pub text: Zeroizing<String>,
    /// Whether it arrived encrypted and verified.
    pub encrypted: bool,
    /// Whether it was recovered from a suspended session (OMD).
    pub offline: bool,
}

impl InboxEntry {
    /// The entry for a core [`Delivery`].
    pub fn from_delivery(d: &Delivery) -> Self {
        InboxEntry {
            instance: d.instance,
            text: Zeroizing::new(d.text.clone()),
            encrypted: d.encrypted,
            offline: d.offline,
        }
    }

    /// The [`Delivery`] to hand to the client.
    pub fn to_delivery(&self) -> Delivery {
        Delivery {
            text: self.text.to_string(),
            encrypted: self.encrypted,
            instance: self.instance,
            offline: self.offline,
            order: None,
        }
    }
}

impl fmt::Debug for InboxEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxEntry")
            .field("instance", &self.instance)
            .field(
                "text",
                &format_args!("<{} bytes redacted>", self.text.len()),
            )
            .field("encrypted", &self.encrypted)
            .field("offline", &self.offline)
            .finish()
    }
}

/// A stored inbox entry. `Debug` does not print the text.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct InboxMessage {
    /// Store-assigned id, increasing in commit order, never reused.
    pub id: i64,
    /// Local account.
    pub account: String,
    /// Peer bare JID.
    pub peer: String,
    /// The entry.
    pub entry: InboxEntry,
    /// When it was committed (unix seconds).
    pub received_at: u64,
}

/// One durable change of a [`Store::commit_step`], applied in order.
#[derive(Clone, PartialEq, Eq)]
pub enum DurableOp {
    /// Save (insert or replace) the snapshot of an instance.
    SaveSnapshot {
        /// Their instance tag.
        instance: u32,
        /// The state to record.
        state: SessionState,
        /// The serialized EKM snapshot (secret).
        data: SecretBytes,
    },
    /// Delete (and wipe) the snapshot of an instance.
    DeleteSnapshot {
        /// Their instance tag.
        instance: u32,
    },
    /// Hold an outgoing user message.
    Hold(Zeroizing<String>),
    /// Append a plaintext to the inbox.
    Inbox(InboxEntry),
    /// Queue an encrypted outgoing stanza (its XML) in the outbox: it is
    /// sent after the commit and acknowledged ([`Store::ack_outbox`]) once
    /// written to the server, so a crash in between re-sends it instead
    /// of losing it. Only ciphertext goes here.
    Outbox(String),
    /// Release (delete and wipe) the `n` oldest held messages of the peer:
    /// they were encrypted into this step's outbox entries.
    ReleaseHeld(usize),
    /// Replace the peer's partially reassembled incoming fragments (each a
    /// fragment's text, see [`Conversation::partial_fragments`]); empty
    /// clears them.
    Fragments(Vec<String>),
    /// Save (insert or replace) the record of our handshake with an
    /// instance that waits for its Signature
    /// ([`Action::PersistHandshake`]).
    SaveHandshake {
        /// Their instance tag.
        instance: u32,
        /// The record (secret).
        data: SecretBytes,
    },
    /// Delete (and wipe) the handshake record of an instance.
    DeleteHandshake {
        /// Their instance tag.
        instance: u32,
    },
}

impl fmt::Debug for DurableOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurableOp::SaveSnapshot {
                instance,
                state,
                data,
            } => f
                .debug_struct("SaveSnapshot")
                .field("instance", instance)
                .field("state", state)
                .field("bytes", &data.len())
                .finish(),
            DurableOp::DeleteSnapshot { instance } => f
                .debug_struct("DeleteSnapshot")
                .field("instance", instance)
                .finish(),
            DurableOp::Hold(t) => write!(f, "Hold(<{} bytes redacted>)", t.len()),
            DurableOp::Inbox(e) => f.debug_tuple("Inbox").field(e).finish(),
            DurableOp::Outbox(x) => write!(f, "Outbox(<{} bytes>)", x.len()),
            DurableOp::ReleaseHeld(n) => f.debug_tuple("ReleaseHeld").field(n).finish(),
            DurableOp::Fragments(v) => write!(f, "Fragments(<{} fragments>)", v.len()),
            DurableOp::SaveHandshake { instance, data } => f
                .debug_struct("SaveHandshake")
                .field("instance", instance)
                .field("bytes", &data.len())
                .finish(),
            DurableOp::DeleteHandshake { instance } => f
                .debug_struct("DeleteHandshake")
                .field("instance", instance)
                .finish(),
        }
    }
}

/// One peer's part of a group commit ([`Store::commit_steps`]): the
/// durable ops of one [`Step`] for (`account`, `peer`).
#[derive(Clone, Copy, Debug)]
pub struct PeerStep<'a> {
    /// Peer bare JID.
    pub peer: &'a str,
    /// The ops, applied in order.
    pub ops: &'a [DurableOp],
}

/// What a [`Store::commit_step`] assigned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitReceipt {
    /// Ids of the inbox entries, in the order of the [`DurableOp::Inbox`] ops.
    pub inbox_ids: Vec<i64>,
    /// Ids of the held messages, in the order of the [`DurableOp::Hold`] ops.
    pub held_ids: Vec<i64>,
    /// Ids of the outbox entries, in the order of the [`DurableOp::Outbox`] ops.
    pub outbox_ids: Vec<i64>,
}

/// A stored outbox entry: an encrypted stanza committed with the snapshot
/// that produced it and not yet acknowledged as written to the server.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct OutboxMessage {
    /// Store-assigned id, increasing in commit order, never reused.
    pub id: i64,
    /// Local account.
    pub account: String,
    /// Peer bare JID.
    pub peer: String,
    /// The stanza's XML (ciphertext body; no plaintext).
    pub stanza: String,
    /// When it was committed (unix seconds).
    pub queued_at: u64,
}

/// An effect to perform after the commit, in order.
#[derive(Debug)]
pub enum Effect {
    /// Send this body upstream.
    Send(String),
    /// Hand inbox entry number `slot` of this step (index into
    /// [`CommitReceipt::inbox_ids`]) to the client, then acknowledge it.
    Deliver {
        /// Index of the entry among this step's inbox ops.
        slot: usize,
        /// The text for the client.
        delivery: Delivery,
    },
    /// Tell the user.
    Notify(Notice),
}

/// One batch of core actions, planned for crash safety: commit `durable`
/// atomically, perform `effects` in order, then release `release_held`
/// held messages with [`release_oldest_held`].
#[derive(Debug, Default)]
pub struct Step {
    /// Committed first, in one transaction.
    pub durable: Vec<DurableOp>,
    /// Performed after the commit.
    pub effects: Vec<Effect>,
    /// Held messages to drop after the effects (oldest first).
    pub release_held: usize,
}

impl Step {
    /// Whether there is nothing to commit.
    pub fn needs_commit(&self) -> bool {
        !self.durable.is_empty()
    }

    /// For each [`Effect::Send`], in order, whether it belongs in the
    /// outbox ([`DurableOp::Outbox`]), committed with the snapshot and
    /// re-sent after a crash: an OTR data message (whole, or a fragment of
    /// one) — it consumed a sending counter — or the AKE's Signature
    /// message — the responder is private once it is committed, so if the
    /// message were lost the initiator would never be, and could read
    /// nothing sent in the session (found by the chaos campaign: a proxy
    /// SIGKILLed between the commit and the write). Re-sent to a peer that
    /// has it, or has moved on, it is ignored (spec: a Signature message
    /// counts only in AUTHSTATE_AWAITING_SIG). Queries, other AKE messages
    /// and error messages are not kept: re-sending them after a restart
    /// would only confuse.
    pub fn outbox_sends(&self) -> Vec<bool> {
        let mut in_kept = false;
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(body) => Some(body.as_str()),
                _ => None,
            })
            .map(|body| {
                if body.starts_with("?OTR|") || body.starts_with("?OTR,") {
                    match parse_fragment(body) {
                        Ok(f) if f.k == 1 => in_kept = is_kept(&f.piece),
                        Ok(_) => {}
                        Err(_) => in_kept = false,
                    }
                    in_kept
                } else {
                    in_kept = false;
                    is_kept(body)
                }
            })
            .collect()
    }

    /// Move the held-message release into the commit: the caller put the
    /// ciphertexts of those messages in this step's outbox, so dropping
    /// the plaintexts in the same transaction neither loses them nor
    /// sends them twice.
    pub fn release_in_commit(&mut self) {
        if self.release_held > 0 {
            self.durable.push(DurableOp::ReleaseHeld(std::mem::take(
                &mut self.release_held,
            )));
        }
    }
}

/// Whether `body` is an armoured OTR data message: v3 (`00 03 03`) or v2
/// (`00 02 03`) in base64.
fn is_data_message(body: &str) -> bool {
    body.starts_with("?OTR:AAMD") || body.starts_with("?OTR:AAID")
}

/// A data message or an AKE Signature message (see [`Step::outbox_sends`]).
fn is_kept(body: &str) -> bool {
    is_data_message(body) || body.starts_with("?OTR:AAMS") || body.starts_with("?OTR:AAIS")
}

/// Whether a stanza body is a data message or a data message's first
/// fragment: what a peer answers with an "unreadable" error when it is a
/// duplicate (libotr), unlike a repeated Signature message, which it
/// ignores.
pub fn begins_data_message(body: &str) -> bool {
    if body.starts_with("?OTR|") || body.starts_with("?OTR,") {
        parse_fragment(body).is_ok_and(|f| f.k == 1 && is_data_message(&f.piece))
    } else {
        is_data_message(body)
    }
}

/// Plan one batch of core actions (the result of one `handle_*` call).
///
/// Every state change (`Persist`, `Forget`, `Hold`) and every plaintext
/// (`Deliver`, as an inbox entry) goes to the durable part; sends, deliveries
/// and notices keep their relative order in `effects`; `ReleaseHeld` counts
/// are summed and applied last.
pub fn split(actions: Vec<Action>) -> Step {
    let mut step = Step::default();
    let mut slots = 0;
    for a in actions {
        match a {
            Action::Send(s) => step.effects.push(Effect::Send(s)),
            Action::Deliver(d) => {
                step.durable
                    .push(DurableOp::Inbox(InboxEntry::from_delivery(&d)));
                step.effects.push(Effect::Deliver {
                    slot: slots,
                    delivery: d,
                });
                slots += 1;
            }
            Action::Notify(n) => step.effects.push(Effect::Notify(n)),
            Action::Persist(p) => step.durable.push(DurableOp::SaveSnapshot {
                instance: p.instance,
                state: SessionState::Live,
                data: p.snapshot,
            }),
            Action::Forget { instance } => {
                step.durable.push(DurableOp::DeleteSnapshot { instance })
            }
            Action::PersistHandshake(p) => step.durable.push(DurableOp::SaveHandshake {
                instance: p.instance,
                data: p.snapshot,
            }),
            Action::ForgetHandshake { instance } => {
                step.durable.push(DurableOp::DeleteHandshake { instance })
            }
            Action::Hold(t) => step.durable.push(DurableOp::Hold(t)),
            Action::ReleaseHeld { count } => step.release_held += count,
        }
    }
    step
}

/// Release (delete and wipe) the `count` oldest held messages of
/// (`account`, `peer`); returns how many existed.
pub fn release_oldest_held(
    store: &mut dyn Store,
    account: &str,
    peer: &str,
    count: usize,
) -> Result<usize> {
    let mut n = 0;
    for m in store.held_messages(account, peer)?.into_iter().take(count) {
        if store.release_held(m.id)? {
            n += 1;
        }
    }
    Ok(n)
}

/// A conversation rebuilt from the store after a restart.
pub struct Restored {
    /// The conversation, with every usable snapshot restored as a suspended
    /// session and the held messages queued.
    pub conversation: Conversation,
    /// Instances restored.
    pub restored: Vec<u32>,
    /// Instances whose snapshot had expired and was wiped.
    pub expired: Vec<u32>,
    /// Instances whose snapshot could not be read and was wiped.
    pub discarded: Vec<u32>,
    /// Instances whose handshake (our Reveal Signature sent, waiting for
    /// the Signature) was restored from its record.
    pub handshakes: Vec<u32>,
    /// Plaintexts committed but not yet acknowledged by the client, oldest
    /// first: hand them over before anything new.
    pub pending: Vec<InboxMessage>,
}

impl fmt::Debug for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Restored")
            .field("restored", &self.restored)
            .field("expired", &self.expired)
            .field("discarded", &self.discarded)
            .field("handshakes", &self.handshakes)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// Rebuild the conversation of (`account`, `peer`) from the store: restore
/// every snapshot not older than `lifetime` seconds at `now` (older ones
/// and unreadable ones are deleted and wiped), then the handshake records
/// (the same rule), queue the held messages, restore the partially
/// reassembled incoming fragments, and list the inbox entries still owed
/// to the client.
pub fn restore_peer(
    store: &mut dyn Store,
    account: &str,
    peer: &str,
    cfg: Config,
    long_term: Arc<DsaPrivateKey>,
    now: u64,
    lifetime: u64,
) -> Result<Restored> {
    let mut conversation = Conversation::new(cfg, long_term);
    let mut restored = Vec::new();
    let mut expired = Vec::new();
    let mut discarded = Vec::new();
    for rec in store.snapshots_for_peer(account, peer)? {
        if rec.state == SessionState::Finished {
            continue; // ended explicitly: not resumable
        }
        let instance = rec.key.instance;
        let usable = match EncryptedSession::restore(&rec.data) {
            Ok(s) if s.is_expired(now, lifetime) => {
                expired.push(instance);
                false
            }
            Ok(_) => match conversation.restore(&rec.data) {
                Ok(_) => {
                    restored.push(instance);
                    true
                }
                Err(e) => {
                    tracing::warn!(account, peer, instance, cause = %e, "snapshot not restorable; wiping it");
                    discarded.push(instance);
                    false
                }
            },
            Err(e) => {
                tracing::warn!(account, peer, instance, cause = %e, "unreadable snapshot; wiping it");
                discarded.push(instance);
                false
            }
        };
        if !usable {
            store.delete_snapshot(&ConversationKey::new(account, peer, instance))?;
        }
    }
    let mut handshakes = Vec::new();
    for rec in store.handshakes(account, peer)? {
        match conversation.restore_handshake(&rec.data, now, lifetime) {
            Ok(tag) => handshakes.push(tag),
            Err(e) => {
                tracing::warn!(account, peer, instance = rec.instance, cause = %e, "handshake record not restorable; wiping it");
                store.commit_step(
                    account,
                    peer,
                    &[DurableOp::DeleteHandshake {
                        instance: rec.instance,
                    }],
                    now,
                )?;
            }
        }
    }
    conversation.restore_held(
        store
            .held_messages(account, peer)?
            .into_iter()
            .map(|m| m.text),
    );
    conversation.restore_fragments(&store.fragments(account, peer)?);
    let pending = store.inbox(account, peer)?;
    Ok(Restored {
        conversation,
        restored,
        expired,
        discarded,
        handshakes,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, SqliteStore};

    const A: &str = "alice@x";
    const P: &str = "bob@y";

    fn entry(text: &str) -> InboxEntry {
        InboxEntry {
            instance: 0x100,
            text: Zeroizing::new(text.to_owned()),
            encrypted: true,
            offline: false,
        }
    }

    fn save(instance: u32, data: &[u8]) -> DurableOp {
        DurableOp::SaveSnapshot {
            instance,
            state: SessionState::Live,
            data: SecretBytes::from_slice(data),
        }
    }

    fn texts(s: &dyn Store) -> Vec<String> {
        s.inbox(A, P)
            .unwrap()
            .iter()
            .map(|m| m.entry.text.to_string())
            .collect()
    }

    fn suite(s: &mut dyn Store) {
        let r = s
            .commit_step(
                A,
                P,
                &[
                    save(0x100, b"s1"),
                    DurableOp::Inbox(entry("one")),
                    DurableOp::Hold(Zeroizing::new("h".into())),
                    DurableOp::Inbox(entry("two")),
                ],
                10,
            )
            .unwrap();
        assert_eq!(r.inbox_ids.len(), 2);
        assert_eq!(r.held_ids.len(), 1);
        assert!(r.inbox_ids[0] < r.inbox_ids[1]);
        assert_eq!(texts(s), ["one", "two"]);
        let snap = s.snapshot(&ConversationKey::new(A, P, 0x100)).unwrap();
        assert_eq!(snap.unwrap().data.as_slice(), b"s1");
        assert_eq!(s.held_messages(A, P).unwrap().len(), 1);
        assert!(s.inbox("other@x", P).unwrap().is_empty());
        let m = &s.inbox(A, P).unwrap()[0];
        assert_eq!((m.received_at, m.entry.instance), (10, 0x100));

        // Ack through the first id only.
        assert_eq!(s.ack_inbox(A, P, r.inbox_ids[0]).unwrap(), 1);
        assert_eq!(texts(s), ["two"]);
        assert_eq!(s.ack_inbox(A, P, r.inbox_ids[0]).unwrap(), 0);

        // Save then delete within one step; ids keep increasing.
        let r2 = s
            .commit_step(
                A,
                P,
                &[
                    save(0x200, b"s2"),
                    DurableOp::DeleteSnapshot { instance: 0x100 },
                    DurableOp::Inbox(entry("three")),
                ],
                11,
            )
            .unwrap();
        assert!(r2.inbox_ids[0] > r.inbox_ids[1]);
        let insts: Vec<u32> = s
            .snapshots_for_peer(A, P)
            .unwrap()
            .iter()
            .map(|r| r.key.instance)
            .collect();
        assert_eq!(insts, [0x200]);
        assert_eq!(s.ack_inbox(A, P, i64::MAX).unwrap(), 2);
        assert!(s.all_inbox().unwrap().is_empty());
        let r3 = s
            .commit_step(A, P, &[DurableOp::Inbox(entry("four"))], 12)
            .unwrap();
        assert!(r3.inbox_ids[0] > r2.inbox_ids[0], "ids never reused");
    }

    fn outbox_suite(s: &mut dyn Store) {
        s.hold_message(A, P, "held-1", 1).unwrap();
        s.hold_message(A, P, "held-2", 1).unwrap();
        s.hold_message(A, "carol@z", "other", 1).unwrap();
        let r = s
            .commit_step(
                A,
                P,
                &[
                    save(0x100, b"s1"),
                    DurableOp::Outbox("<message>c1</message>".into()),
                    DurableOp::Outbox("<message>c2</message>".into()),
                    DurableOp::ReleaseHeld(1),
                    DurableOp::Fragments(vec!["f1".into(), "f2".into()]),
                ],
                20,
            )
            .unwrap();
        assert_eq!(r.outbox_ids.len(), 2);
        assert!(r.outbox_ids[0] < r.outbox_ids[1]);
        let held: Vec<String> = s
            .held_messages(A, P)
            .unwrap()
            .iter()
            .map(|m| m.text.to_string())
            .collect();
        assert_eq!(held, ["held-2"], "the oldest held message is released");
        assert_eq!(s.held_messages(A, "carol@z").unwrap().len(), 1);
        assert_eq!(s.fragments(A, P).unwrap(), ["f1", "f2"]);
        assert!(s.fragments(A, "carol@z").unwrap().is_empty());
        // Another peer's entry lands between: the account's list is by id.
        let r2 = s
            .commit_step(A, "carol@z", &[DurableOp::Outbox("c3".into())], 21)
            .unwrap();
        let list = s.outbox(A).unwrap();
        let stanzas: Vec<&str> = list.iter().map(|m| m.stanza.as_str()).collect();
        assert_eq!(
            stanzas,
            ["<message>c1</message>", "<message>c2</message>", "c3"]
        );
        assert_eq!(
            (list[0].peer.as_str(), list[0].queued_at),
            (P, 20),
            "peer and time recorded"
        );
        assert!(s.outbox("other@x").unwrap().is_empty());
        assert!(s.ack_outbox(r.outbox_ids[0]).unwrap());
        assert!(!s.ack_outbox(r.outbox_ids[0]).unwrap());
        assert_eq!(s.outbox(A).unwrap().len(), 2);
        // Fragments are replaced, then cleared, with the step.
        s.commit_step(A, P, &[DurableOp::Fragments(vec!["g".into()])], 22)
            .unwrap();
        assert_eq!(s.fragments(A, P).unwrap(), ["g"]);
        s.commit_step(A, P, &[DurableOp::Fragments(Vec::new())], 23)
            .unwrap();
        assert!(s.fragments(A, P).unwrap().is_empty());
        // Releasing more than is held releases what there is.
        s.commit_step(A, P, &[DurableOp::ReleaseHeld(5)], 24)
            .unwrap();
        assert!(s.held_messages(A, P).unwrap().is_empty());
        let r3 = s
            .commit_step(A, P, &[DurableOp::Outbox("c4".into())], 25)
            .unwrap();
        assert!(r3.outbox_ids[0] > r2.outbox_ids[0], "ids never reused");
        // Handshake records: by instance, replaced, deleted, per peer.
        let hs = |data: &[u8], instance| DurableOp::SaveHandshake {
            instance,
            data: SecretBytes::from_slice(data),
        };
        s.commit_step(A, P, &[hs(b"h1", 2), hs(b"h0", 1)], 26)
            .unwrap();
        s.commit_step(A, P, &[hs(b"h1b", 2)], 27).unwrap();
        let got: Vec<(u32, Vec<u8>)> = s
            .handshakes(A, P)
            .unwrap()
            .into_iter()
            .map(|r| (r.instance, r.data.to_vec()))
            .collect();
        assert_eq!(got, [(1, b"h0".to_vec()), (2, b"h1b".to_vec())]);
        assert!(s.handshakes(A, "carol@z").unwrap().is_empty());
        s.commit_step(A, P, &[DurableOp::DeleteHandshake { instance: 1 }], 28)
            .unwrap();
        assert_eq!(s.handshakes(A, P).unwrap().len(), 1);
    }

    #[test]
    fn memory_store_inbox() {
        suite(&mut MemoryStore::new());
    }

    #[test]
    fn memory_store_outbox() {
        outbox_suite(&mut MemoryStore::new());
    }

    #[test]
    fn sqlite_store_outbox() {
        let dir = tempfile::tempdir().unwrap();
        outbox_suite(&mut SqliteStore::open(&dir.path().join("s")).unwrap());
    }

    #[test]
    fn failed_commit_keeps_outbox_and_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("s")).unwrap();
        s.hold_message(A, P, "h", 1).unwrap();
        assert!(
            s.commit_step(
                A,
                P,
                &[DurableOp::Outbox("c".into()), DurableOp::ReleaseHeld(1)],
                u64::MAX
            )
            .is_err()
        );
        assert!(s.outbox(A).unwrap().is_empty());
        assert_eq!(s.held_messages(A, P).unwrap().len(), 1);
    }

    #[test]
    fn failed_group_commit_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("s")).unwrap();
        s.commit_step(A, P, &[save(1, b"old")], 1).unwrap();
        let first = [save(1, b"new"), DurableOp::Outbox("c".into())];
        let second = [DurableOp::Inbox(entry("x"))];
        let steps = [
            PeerStep {
                peer: P,
                ops: &first,
            },
            PeerStep {
                peer: "carol@z",
                ops: &second,
            },
        ];
        assert!(s.commit_steps(A, &steps, u64::MAX).is_err());
        let snap = s.snapshot(&ConversationKey::new(A, P, 1)).unwrap().unwrap();
        assert_eq!(snap.data.as_slice(), b"old");
        assert!(s.outbox(A).unwrap().is_empty());
        assert!(s.all_inbox().unwrap().is_empty());
    }

    #[test]
    fn outbox_sends_marks_data_and_signature_messages_and_their_fragments() {
        let step = Step {
            effects: vec![
                Effect::Send("?OTR:AAMDxyz.".into()),
                Effect::Send("?OTR:AAMSsig.".into()),
                Effect::Send("?OTR:AAMRrevealsig.".into()),
                Effect::Send("?OTR|00000100|00000200,00001,00002,?OTR:AAISab,".into()),
                Effect::Send("?OTR|00000100|00000200,00002,00002,cd.,".into()),
                Effect::Notify(Notice::Ended),
                Effect::Send("?OTRv3?".into()),
                Effect::Send("?OTR:AAIDv2data.".into()),
                Effect::Send("?OTR:AAMKdhcommit.".into()),
                Effect::Send("?OTR|00000100|00000200,00001,00002,?OTR:AAMDab,".into()),
                Effect::Send("?OTR|00000100|00000200,00002,00002,cd.,".into()),
                Effect::Send("?OTR,00001,00002,?OTR:AAIKab,".into()),
                Effect::Send("?OTR,00002,00002,cd.,".into()),
                Effect::Send("?OTR Error: x".into()),
            ],
            ..Step::default()
        };
        assert_eq!(
            step.outbox_sends(),
            [
                true, true, false, true, true, false, true, false, true, true, false, false, false
            ]
        );
        assert!(begins_data_message("?OTR:AAMDxyz."));
        assert!(begins_data_message("?OTR,00001,00002,?OTR:AAIDab,"));
        assert!(!begins_data_message("?OTR,00002,00002,?OTR:AAIDab,"));
        assert!(!begins_data_message("?OTR:AAMSsig."));
    }

    #[test]
    fn release_moves_into_the_commit() {
        let mut step = split(vec![
            Action::Send("?OTR:AAMDx.".into()),
            Action::ReleaseHeld { count: 2 },
        ]);
        step.release_in_commit();
        assert_eq!(step.release_held, 0);
        assert!(matches!(step.durable[..], [DurableOp::ReleaseHeld(2)]));
    }

    #[test]
    fn sqlite_store_inbox() {
        let dir = tempfile::tempdir().unwrap();
        suite(&mut SqliteStore::open(&dir.path().join("s")).unwrap());
    }

    #[test]
    fn failed_commit_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("s")).unwrap();
        s.commit_step(A, P, &[save(1, b"old")], 1).unwrap();
        // `now` beyond i64 fails the whole step.
        assert!(
            s.commit_step(
                A,
                P,
                &[save(1, b"new"), DurableOp::Inbox(entry("x"))],
                u64::MAX
            )
            .is_err()
        );
        let snap = s.snapshot(&ConversationKey::new(A, P, 1)).unwrap().unwrap();
        assert_eq!(snap.data.as_slice(), b"old");
        assert!(s.inbox(A, P).unwrap().is_empty());
    }

    #[test]
    fn split_orders_durable_before_effects() {
        use crate::otr::conversation::Persist;
        let d = Delivery {
            text: "zqx-secret".into(),
            encrypted: true,
            instance: 7,
            offline: true,
            order: None,
        };
        let step = split(vec![
            Action::Persist(Persist {
                instance: 7,
                snapshot: SecretBytes::from_slice(b"snap"),
            }),
            Action::Notify(Notice::Resumed { instance: 7 }),
            Action::Deliver(d.clone()),
            Action::Send("reply".into()),
            Action::ReleaseHeld { count: 2 },
            Action::Forget { instance: 9 },
        ]);
        assert_eq!(step.durable.len(), 3);
        assert!(matches!(
            step.durable[0],
            DurableOp::SaveSnapshot { instance: 7, .. }
        ));
        assert!(matches!(&step.durable[1], DurableOp::Inbox(e) if e.to_delivery() == d));
        assert!(matches!(
            step.durable[2],
            DurableOp::DeleteSnapshot { instance: 9 }
        ));
        assert_eq!(step.release_held, 2);
        assert!(matches!(step.effects[0], Effect::Notify(_)));
        assert!(
            matches!(&step.effects[1], Effect::Deliver { slot: 0, delivery } if *delivery == d)
        );
        assert!(matches!(&step.effects[2], Effect::Send(s) if s == "reply"));
        assert!(!format!("{:?}", step.durable).contains("zqx"));
    }
}
