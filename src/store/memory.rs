//! [`MemoryStore`]: the in-memory [`Store`] for tests (DESIGN §2).
//!
//! Same semantics and orderings as the SQLite store, nothing durable.

use std::collections::BTreeMap;
use std::fmt;

use zeroize::Zeroizing;

use crate::otr::crypto::SecretBytes;

use super::{
    CommitReceipt, ConversationKey, DurableOp, FingerprintRecord, HandshakeRecord, HeldMessage,
    InboxMessage, OutboxMessage, PeerStep, Result, SessionState, SnapshotRecord, Store, Trust,
};

#[derive(Default)]
struct Account {
    key: Option<Zeroizing<Vec<u8>>>,
    instance_tag: Option<u32>,
}

/// Fingerprint map key: (account, peer, fingerprint).
type FprKey = (String, String, [u8; 20]);

/// A [`Store`] kept in memory; for tests. `Debug` prints counts only.
#[derive(Default)]
pub struct MemoryStore {
    accounts: BTreeMap<String, Account>,
    fingerprints: BTreeMap<FprKey, (Trust, u64)>,
    snapshots: BTreeMap<ConversationKey, SnapshotRecord>,
    held: BTreeMap<i64, HeldMessage>,
    last_held_id: i64,
    inbox: BTreeMap<i64, InboxMessage>,
    last_inbox_id: i64,
    outbox: BTreeMap<i64, OutboxMessage>,
    last_outbox_id: i64,
    fragments: BTreeMap<(String, String), Vec<String>>,
    handshakes: BTreeMap<ConversationKey, SecretBytes>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn touch(&mut self, account: &str) -> &mut Account {
        self.accounts.entry(account.to_owned()).or_default()
    }

    /// One step of [`Store::commit_steps`], applied in place.
    fn apply_step(
        &mut self,
        account: &str,
        peer: &str,
        ops: &[DurableOp],
        now: u64,
    ) -> Result<CommitReceipt> {
        let mut receipt = CommitReceipt::default();
        for op in ops {
            match op {
                DurableOp::SaveSnapshot {
                    instance,
                    state,
                    data,
                } => {
                    let key = ConversationKey::new(account, peer, *instance);
                    self.save_snapshot(&key, *state, data, now)?;
                }
                DurableOp::DeleteSnapshot { instance } => {
                    self.delete_snapshot(&ConversationKey::new(account, peer, *instance))?;
                }
                DurableOp::Hold(text) => {
                    receipt
                        .held_ids
                        .push(self.hold_message(account, peer, text, now)?);
                }
                DurableOp::Inbox(entry) => {
                    self.last_inbox_id += 1;
                    let id = self.last_inbox_id;
                    self.inbox.insert(
                        id,
                        InboxMessage {
                            id,
                            account: account.to_owned(),
                            peer: peer.to_owned(),
                            entry: entry.clone(),
                            received_at: now,
                        },
                    );
                    receipt.inbox_ids.push(id);
                }
                DurableOp::Outbox(stanza) => {
                    self.last_outbox_id += 1;
                    let id = self.last_outbox_id;
                    self.outbox.insert(
                        id,
                        OutboxMessage {
                            id,
                            account: account.to_owned(),
                            peer: peer.to_owned(),
                            stanza: stanza.clone(),
                            queued_at: now,
                        },
                    );
                    receipt.outbox_ids.push(id);
                }
                DurableOp::ReleaseHeld(n) => {
                    for m in self.held_messages(account, peer)?.into_iter().take(*n) {
                        self.held.remove(&m.id);
                    }
                }
                DurableOp::Fragments(texts) => {
                    let k = (account.to_owned(), peer.to_owned());
                    if texts.is_empty() {
                        self.fragments.remove(&k);
                    } else {
                        self.fragments.insert(k, texts.clone());
                    }
                }
                DurableOp::SaveHandshake { instance, data } => {
                    let key = ConversationKey::new(account, peer, *instance);
                    self.handshakes.insert(key, data.clone());
                }
                DurableOp::DeleteHandshake { instance } => {
                    self.handshakes
                        .remove(&ConversationKey::new(account, peer, *instance));
                }
            }
        }
        Ok(receipt)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("accounts", &self.accounts.len())
            .field("fingerprints", &self.fingerprints.len())
            .field("snapshots", &self.snapshots.len())
            .field("held", &self.held.len())
            .field("inbox", &self.inbox.len())
            .field("outbox", &self.outbox.len())
            .finish()
    }
}

fn fpr_record(k: &FprKey, v: &(Trust, u64)) -> FingerprintRecord {
    FingerprintRecord {
        account: k.0.clone(),
        peer: k.1.clone(),
        fingerprint: k.2,
        trust: v.0,
        first_seen: v.1,
    }
}

fn sort_fprs(v: &mut [FingerprintRecord]) {
    v.sort_by(|a, b| {
        (&a.account, &a.peer, a.first_seen, a.fingerprint).cmp(&(
            &b.account,
            &b.peer,
            b.first_seen,
            b.fingerprint,
        ))
    });
}

impl Store for MemoryStore {
    fn account_key(&self, account: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
        Ok(self.accounts.get(account).and_then(|a| a.key.clone()))
    }

    fn set_account_key(&mut self, account: &str, key: &[u8]) -> Result<()> {
        self.touch(account).key = Some(Zeroizing::new(key.to_vec()));
        Ok(())
    }

    fn accounts(&self) -> Result<Vec<String>> {
        // Every write goes through `touch`, so `accounts` knows them all.
        Ok(self.accounts.keys().cloned().collect())
    }

    fn instance_tag(&self, account: &str) -> Result<Option<u32>> {
        Ok(self.accounts.get(account).and_then(|a| a.instance_tag))
    }

    fn set_instance_tag(&mut self, account: &str, tag: u32) -> Result<()> {
        self.touch(account).instance_tag = Some(tag);
        Ok(())
    }

    fn fingerprints(&self, account: &str, peer: &str) -> Result<Vec<FingerprintRecord>> {
        let mut v: Vec<_> = self
            .fingerprints
            .iter()
            .filter(|(k, _)| k.0 == account && k.1 == peer)
            .map(|(k, v)| fpr_record(k, v))
            .collect();
        sort_fprs(&mut v);
        Ok(v)
    }

    fn all_fingerprints(&self) -> Result<Vec<FingerprintRecord>> {
        let mut v: Vec<_> = self
            .fingerprints
            .iter()
            .map(|(k, v)| fpr_record(k, v))
            .collect();
        sort_fprs(&mut v);
        Ok(v)
    }

    fn set_fingerprint(
        &mut self,
        account: &str,
        peer: &str,
        fingerprint: &[u8; 20],
        trust: Trust,
        now: u64,
    ) -> Result<()> {
        self.touch(account);
        self.fingerprints
            .entry((account.to_owned(), peer.to_owned(), *fingerprint))
            .and_modify(|v| v.0 = trust)
            .or_insert((trust, now));
        Ok(())
    }

    fn remove_fingerprint(
        &mut self,
        account: &str,
        peer: &str,
        fingerprint: &[u8; 20],
    ) -> Result<bool> {
        Ok(self
            .fingerprints
            .remove(&(account.to_owned(), peer.to_owned(), *fingerprint))
            .is_some())
    }

    fn snapshot(&self, key: &ConversationKey) -> Result<Option<SnapshotRecord>> {
        Ok(self.snapshots.get(key).cloned())
    }

    fn snapshots_for_peer(&self, account: &str, peer: &str) -> Result<Vec<SnapshotRecord>> {
        Ok(self
            .snapshots
            .values()
            .filter(|s| s.key.account == account && s.key.peer == peer)
            .cloned()
            .collect())
    }

    fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        Ok(self.snapshots.values().cloned().collect())
    }

    fn save_snapshot(
        &mut self,
        key: &ConversationKey,
        state: SessionState,
        data: &[u8],
        now: u64,
    ) -> Result<()> {
        self.touch(&key.account);
        let created_at = self.snapshots.get(key).map_or(now, |s| s.created_at);
        self.snapshots.insert(
            key.clone(),
            SnapshotRecord {
                key: key.clone(),
                state,
                data: SecretBytes::from_slice(data),
                created_at,
                updated_at: now,
            },
        );
        Ok(())
    }

    fn set_snapshot_state(
        &mut self,
        key: &ConversationKey,
        state: SessionState,
        now: u64,
    ) -> Result<bool> {
        Ok(match self.snapshots.get_mut(key) {
            Some(s) => {
                s.state = state;
                s.updated_at = now;
                true
            }
            None => false,
        })
    }

    fn delete_snapshot(&mut self, key: &ConversationKey) -> Result<bool> {
        Ok(self.snapshots.remove(key).is_some())
    }

    fn expire_snapshots(&mut self, older_than: u64) -> Result<Vec<ConversationKey>> {
        let old: Vec<ConversationKey> = self
            .snapshots
            .values()
            .filter(|s| s.updated_at < older_than)
            .map(|s| s.key.clone())
            .collect();
        for k in &old {
            self.snapshots.remove(k);
        }
        Ok(old)
    }

    fn hold_message(&mut self, account: &str, peer: &str, text: &str, now: u64) -> Result<i64> {
        self.touch(account);
        self.last_held_id += 1;
        let id = self.last_held_id;
        self.held.insert(
            id,
            HeldMessage {
                id,
                account: account.to_owned(),
                peer: peer.to_owned(),
                text: Zeroizing::new(text.to_owned()),
                queued_at: now,
            },
        );
        Ok(id)
    }

    fn held_messages(&self, account: &str, peer: &str) -> Result<Vec<HeldMessage>> {
        Ok(self
            .held
            .values()
            .filter(|m| m.account == account && m.peer == peer)
            .cloned()
            .collect())
    }

    fn all_held_messages(&self) -> Result<Vec<HeldMessage>> {
        Ok(self.held.values().cloned().collect())
    }

    fn held_peers(&self, account: &str) -> Result<Vec<String>> {
        let peers: std::collections::BTreeSet<&str> = self
            .held
            .values()
            .filter(|m| m.account == account)
            .map(|m| m.peer.as_str())
            .collect();
        Ok(peers.into_iter().map(str::to_string).collect())
    }

    fn release_held(&mut self, id: i64) -> Result<bool> {
        Ok(self.held.remove(&id).is_some())
    }

    fn commit_steps(
        &mut self,
        account: &str,
        steps: &[PeerStep<'_>],
        now: u64,
    ) -> Result<Vec<CommitReceipt>> {
        // Nothing in `apply_step` fails (the store calls it makes are
        // infallible here), so applying in place is atomic.
        self.touch(account);
        let mut receipts = Vec::with_capacity(steps.len());
        for step in steps {
            receipts.push(self.apply_step(account, step.peer, step.ops, now)?);
        }
        Ok(receipts)
    }

    fn inbox(&self, account: &str, peer: &str) -> Result<Vec<InboxMessage>> {
        Ok(self
            .inbox
            .values()
            .filter(|m| m.account == account && m.peer == peer)
            .cloned()
            .collect())
    }

    fn all_inbox(&self) -> Result<Vec<InboxMessage>> {
        Ok(self.inbox.values().cloned().collect())
    }

    fn ack_inbox(&mut self, account: &str, peer: &str, through: i64) -> Result<usize> {
        let before = self.inbox.len();
        self.inbox
            .retain(|id, m| !(*id <= through && m.account == account && m.peer == peer));
        Ok(before - self.inbox.len())
    }

    fn outbox(&self, account: &str) -> Result<Vec<OutboxMessage>> {
        Ok(self
            .outbox
            .values()
            .filter(|m| m.account == account)
            .cloned()
            .collect())
    }

    fn ack_outbox(&mut self, id: i64) -> Result<bool> {
        Ok(self.outbox.remove(&id).is_some())
    }

    fn fragments(&self, account: &str, peer: &str) -> Result<Vec<String>> {
        Ok(self
            .fragments
            .get(&(account.to_owned(), peer.to_owned()))
            .cloned()
            .unwrap_or_default())
    }

    fn handshakes(&self, account: &str, peer: &str) -> Result<Vec<HandshakeRecord>> {
        Ok(self
            .handshakes
            .iter()
            .filter(|(k, _)| k.account == account && k.peer == peer)
            .map(|(k, data)| HandshakeRecord {
                instance: k.instance,
                data: data.clone(),
            })
            .collect())
    }
}
