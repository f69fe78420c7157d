//! One local account talking to one peer (bare JID): the OTR message state
//! machine of the spec's §"The protocol state machine", over all of the
//! peer's instances, plus O2TR suspension and resumption.
//!
//! Inputs are `handle_*` calls with `now` (unix seconds) and `rng`; each
//! returns an ordered list of [`Action`]s. The caller performs them in order:
//! a [`Action::Persist`] must be durable before any later action runs (that
//! is the O2TR rule "persist before release").

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use rand_core::CryptoRng;
use zeroize::Zeroizing;

use super::ake::{AuthState, Tags};
use super::crypto::{DsaPrivateKey, Fingerprint};
use super::error::{Error, PeerMisbehaved};
use super::fragment::{Assembly, Fragment, FragmentError, Reassembler, Verdict, fragment};
use super::keys::{KeyRatchet, Position};
use super::message::{
    self, Body, DataMessage, EncodedMessage, FLAG_IGNORE_UNREADABLE, Header, Message, Version,
};
use super::offline::EncryptedSession;
use super::policy::Policy;
use super::smp::{Smp, SmpContext, SmpEvent};
use super::tlv::{self, Tlv};

/// Text libotr sends for an unreadable data message.
pub const UNREADABLE_ERROR: &str = "You transmitted an unreadable encrypted message.";

/// Marks a stored fragment text as one held piece (see
/// [`Conversation::partial_fragments`]); texts without it are the
/// cumulative partial messages of earlier versions. Never the start of a
/// fragment. (The name is from when only pieces ahead of a gap had it.)
pub const AHEAD_MARK: &str = "+";

/// Settings for a conversation.
#[derive(Clone, Debug)]
pub struct Config {
    /// The local account (used in the query message's explanation).
    pub account: String,
    /// Our instance tag (>= 0x100), stable across restarts.
    pub our_tag: u32,
    /// Policy for this peer.
    pub policy: Policy,
    /// Largest message body we send; longer OTR messages are fragmented.
    /// 0 disables fragmentation.
    pub max_message_bytes: usize,
    /// Send a heartbeat after receiving a data message when we have not
    /// sent anything for this long (seconds). 0 disables heartbeats.
    pub heartbeat_secs: u64,
    /// The paper's bound `k`: data messages sent under one key pairing
    /// without an answer before further messages are held.
    pub max_unanswered: u32,
    /// Upper bound on memory used to reassemble fragments, per instance.
    pub max_reassembly_bytes: usize,
    /// Most messages held while the session is not private.
    pub max_held: usize,
    /// Most sender instances with a partial fragmented message at once
    /// (each holds up to `max_reassembly_bytes`).
    pub max_reassembly_senders: usize,
    /// Most instances of the peer tracked at once (each D-H Commit from a
    /// new instance tag costs a key pair and memory).
    pub max_instances: usize,
    /// With messages held for a private conversation that has not come
    /// about: seconds without AKE progress before the handshake is started
    /// over with a new query (then twice, four times… as long, at most
    /// [`MAX_AKE_RETRIES`] times). 0 never.
    pub ake_retry_secs: u64,
}

/// Most data messages kept while waiting for a Signature message (see
/// `Conversation::early_data`).
const MAX_EARLY_DATA: usize = 16;

/// How many times [`Conversation::handle_tick`] starts a stalled handshake
/// over before it waits for the user to send again (an offline peer gets
/// each query from its server's offline storage; 10 s doubling six times
/// covers about ten minutes).
pub const MAX_AKE_RETRIES: u32 = 6;

impl Config {
    /// Defaults for `account` with instance tag `our_tag`.
    pub fn new(account: impl Into<String>, our_tag: u32) -> Self {
        Config {
            account: account.into(),
            our_tag,
            policy: Policy::Always,
            max_message_bytes: 0,
            heartbeat_secs: 60,
            max_unanswered: 1024,
            max_reassembly_bytes: 256 * 1024,
            max_held: 1000,
            max_reassembly_senders: 8,
            max_instances: 32,
            ake_retry_secs: 10,
        }
    }
}

/// Work for the caller, in order.
#[derive(Debug)]
pub enum Action {
    /// Send this body to the peer (one message stanza each).
    Send(String),
    /// Show this text to the user.
    Deliver(Delivery),
    /// Tell the user something.
    Notify(Notice),
    /// Durably store this EKM snapshot before doing anything that follows.
    Persist(Persist),
    /// Wipe the stored snapshot of this instance.
    Forget {
        /// Their instance tag.
        instance: u32,
    },
    /// Durably store this record of our handshake with the instance
    /// (replacing any earlier one) before doing anything that follows: we
    /// sent our Reveal Signature and wait for the Signature, and the peer
    /// is private as soon as it sends that (see
    /// [`Conversation::restore_handshake`]).
    PersistHandshake(Persist),
    /// Wipe the stored handshake record of this instance (the handshake
    /// completed, failed or was started over).
    ForgetHandshake {
        /// Their instance tag.
        instance: u32,
    },
    /// A user message was held (not sent); keep it durably until
    /// [`Action::ReleaseHeld`].
    Hold(Zeroizing<String>),
    /// The `count` oldest held messages were sent (encrypted); drop them.
    ReleaseHeld {
        /// How many.
        count: usize,
    },
}

/// Text for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message text.
    pub text: String,
    /// Whether it arrived encrypted and verified.
    pub encrypted: bool,
    /// The peer instance it came from (0 for plaintext / v2).
    pub instance: u32,
    /// True when it was recovered from an interrupted session (OMD).
    pub offline: bool,
    /// For an encrypted message, its place in the sender's order: the
    /// server may hand messages over out of order, which the core accepts
    /// (a replay window); the caller puts them back in order.
    pub order: Option<Order>,
}

/// Where a decrypted message stands in its sender's order (see
/// [`Delivery::order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    /// The session (its ssid): positions compare only within one.
    pub ssid: [u8; 8],
    /// The position in the sender's order.
    pub position: Position,
    /// How many messages right before this one, under its key pairing,
    /// have not arrived (yet); `Notice::Missing` reports the same count.
    pub skipped: u64,
    /// Whether it arrived after a newer message (it fills such a gap).
    pub late: bool,
}

/// A snapshot to persist.
pub struct Persist {
    /// Their instance tag.
    pub instance: u32,
    /// Serialized EKM snapshot (secret).
    pub snapshot: crate::otr::crypto::SecretBytes,
}

impl std::fmt::Debug for Persist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persist")
            .field("instance", &self.instance)
            .field("bytes", &self.snapshot.len())
            .finish()
    }
}

/// Something the user should know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// The session is now private.
    GoneSecure {
        /// Peer instance.
        instance: u32,
        /// Protocol version.
        version: Version,
        /// Peer's fingerprint.
        fingerprint: Fingerprint,
        /// Secure session id, as the spec displays it.
        ssid: String,
        /// True if this refreshed an already private session.
        refreshed: bool,
    },
    /// A suspended session was resumed by an offline message or by our
    /// own message, without a new AKE.
    Resumed {
        /// Peer instance.
        instance: u32,
    },
    /// The peer ended the private conversation.
    PeerEnded,
    /// We ended the private conversation.
    Ended,
    /// A plaintext message arrived while we expected encryption.
    ReceivedUnencrypted,
    /// An encrypted message could not be read.
    Unreadable {
        /// Why.
        reason: String,
        /// Its counter did not increase: a duplicate (e.g. re-sent by the
        /// peer's proxy from its outbox after a crash), a replay, or a
        /// message delivered out of order.
        replayed: bool,
    },
    /// Messages from the peer are missing: the counter of the one just
    /// read skipped `count` values (dropped, or still delayed, by the
    /// server).
    Missing {
        /// How many counter values were skipped.
        count: u64,
    },
    /// The peer sent an OTR error message.
    PeerError(String),
    /// A message arrived that could not be parsed.
    Malformed(String),
    /// A user message is held until the session is private.
    Held {
        /// Number of messages now waiting.
        waiting: usize,
    },
    /// Held messages were sent encrypted.
    HeldSent {
        /// How many.
        count: usize,
    },
    /// The peer ended the session: the message cannot be sent now.
    CannotSendFinished,
    /// Too many messages sent without an answer under one key (bound `k`).
    UnansweredLimit {
        /// The bound.
        limit: u32,
    },
    /// The held-message queue is full; the message was dropped.
    HeldQueueFull,
    /// An authenticated key exchange started by the peer failed a check
    /// (bad MAC, signature, commitment or D-H value): no private session
    /// was set up from it.
    AkeFailed {
        /// What was wrong (the error's text).
        reason: String,
    },
    /// The peer used more instance tags than we track; the message from a
    /// new instance was ignored.
    TooManyInstances {
        /// The bound.
        limit: usize,
    },
    /// The peer asks to verify us with a shared secret (SMP); answer with
    /// [`Conversation::handle_smp_answer`].
    SmpRequested {
        /// The peer's question, if they sent one (SMP message 1Q).
        question: Option<String>,
    },
    /// The peer answered our SMP request; the exchange continues.
    SmpInProgress,
    /// SMP succeeded: both sides entered the same secret, so this
    /// fingerprint belongs to the person who knows it.
    SmpSucceeded {
        /// The peer's fingerprint that is now verified.
        fingerprint: Fingerprint,
    },
    /// SMP completed and the secrets differ.
    SmpFailed,
    /// The peer aborted SMP.
    SmpAborted,
    /// The peer's SMP message was invalid or unexpected; we answered with
    /// an abort. The session itself is unaffected.
    SmpError {
        /// What was wrong.
        reason: String,
    },
    /// The peer announced use of the extra symmetric key.
    ExtraKeyRequested {
        /// The 4-byte use indicator.
        usage: u32,
    },
    /// The peer does not appear to support OTR (we got plaintext after
    /// asking).
    NotPrivate,
}

/// The message state of one instance (spec §"Message state").
enum MsgState {
    Plaintext,
    Encrypted(Box<EncryptedSession>),
    Finished,
}

struct Instance {
    ake: AuthState,
    msg: MsgState,
    /// SMP on the encrypted session (reset whenever `msg` changes; never
    /// persisted).
    smp: Smp,
}

impl Instance {
    fn new() -> Self {
        Instance {
            ake: AuthState::None,
            msg: MsgState::Plaintext,
            smp: Smp::new(),
        }
    }
}

/// Summary of an instance for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Peer instance tag.
    pub instance: u32,
    /// "plaintext", "encrypted", "suspended" or "finished".
    pub state: &'static str,
    /// Version when encrypted.
    pub version: Option<Version>,
    /// Fingerprint when encrypted.
    pub fingerprint: Option<Fingerprint>,
    /// Our and their newest keyids when encrypted.
    pub keyids: Option<(u32, u32)>,
}

/// Handshakes under way, moved from one connection's conversation to the
/// next ([`Conversation::take_akes`]). Memory only: the secrets in them are
/// wiped with them.
pub struct PendingAkes {
    master: AuthState,
    instances: Vec<(u32, AuthState)>,
}

impl std::fmt::Debug for PendingAkes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAkes")
            .field("master", &self.master)
            .field("instances", &self.instances.len())
            .finish()
    }
}

/// One account ↔ one peer.
pub struct Conversation {
    cfg: Config,
    long_term: Arc<DsaPrivateKey>,
    instances: BTreeMap<u32, Instance>,
    /// An AKE we started before knowing which instance will answer.
    master_ake: AuthState,
    reassembly: BTreeMap<u32, Reassembler>,
    /// When the latest fragment arrived while a reassembler held a piece
    /// no message has used ([`Reassembler::waiting`]).
    fragments_waiting: Option<u64>,
    /// Set while handling a message the server marked as stored earlier
    /// (its XEP-0203 delay stamp, unix seconds), see
    /// [`Conversation::handle_incoming_delayed`].
    delayed_from: Option<u64>,
    /// Set while handling a message put together by the reassembler
    /// ([`Reassembler::push_with`]): one that fails its MAC, or (for a
    /// guess, not one run received in order) does not parse or cannot be
    /// checked, is then refused without a trace (no notice, no OTR error,
    /// no state change) and its pieces wait for another combination.
    guessing: bool,
    /// The message being handled is one run of fragments received in
    /// order: a failure other than its MAC is the sender's (handled as
    /// for any message: notice, OTR error), not a wrong guess.
    guess_plain: bool,
    /// Set when the guess being handled was refused.
    guess_refused: bool,
    /// Set when the message being handled (one run in order) was an
    /// authentic copy of one read already ([`Verdict::Copy`]).
    guess_copy: bool,
    /// Guesses refused while handling one fragment, and how many of them
    /// were refused as copies of messages already read (see `on_data`):
    /// when those are all, no "mixed fragments" notice is due.
    guess_refusals: (u32, u32),
    /// Data messages that arrived, per instance, while we waited for that
    /// instance's Signature message (we sent our Reveal Signature): the
    /// peer is private already and the server may hand its first messages
    /// over before the Signature (ejabberd re-routing a dead session's
    /// stanzas after newer ones). Read once the Signature completes the
    /// session; reported unreadable if the handshake is started over.
    early_data: Vec<(u32, Header, DataMessage)>,
    held: VecDeque<Zeroizing<String>>,
    /// The instance user messages go to.
    selected: Option<u32>,
    /// Whether we saw plaintext since entering plaintext (whitespace tag rule).
    received_plaintext: bool,
    /// When we last sent a query (unix seconds), to avoid floods.
    last_query: Option<u64>,
    /// When an AKE message last arrived from the peer (unix seconds).
    ake_activity: Option<u64>,
    /// Handshakes started over by [`Conversation::handle_tick`] since the
    /// user last sent or the session last became private.
    ake_retries: u32,
    /// Instances whose handshake record may be in the durable store
    /// ([`Action::PersistHandshake`]); each is wiped
    /// ([`Action::ForgetHandshake`]) once its AKE is no longer waiting for
    /// the Signature.
    durable_akes: BTreeSet<u32>,
    /// The buffer the last user message was encoded in (ciphertext, not
    /// secret), reused for the next one: one allocation less per message
    /// in a burst. Not kept above [`MAX_KEPT_WIRE_BUFFER`].
    wire_buf: Vec<u8>,
}

/// Largest encoding buffer a conversation keeps for reuse.
const MAX_KEPT_WIRE_BUFFER: usize = 64 * 1024;

type Out = Vec<Action>;

impl Conversation {
    /// A new conversation with no session.
    pub fn new(cfg: Config, long_term: Arc<DsaPrivateKey>) -> Self {
        Conversation {
            cfg,
            long_term,
            instances: BTreeMap::new(),
            master_ake: AuthState::None,
            reassembly: BTreeMap::new(),
            delayed_from: None,
            guessing: false,
            guess_plain: false,
            guess_copy: false,
            fragments_waiting: None,
            guess_refused: false,
            guess_refusals: (0, 0),
            early_data: Vec::new(),
            held: VecDeque::new(),
            selected: None,
            received_plaintext: false,
            last_query: None,
            ake_activity: None,
            ake_retries: 0,
            durable_akes: BTreeSet::new(),
            wire_buf: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Change the policy.
    pub fn set_policy(&mut self, policy: Policy) {
        self.cfg.policy = policy;
    }

    /// Restore an EKM snapshot as a suspended session (O2TR). Returns the
    /// peer instance it belongs to.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<u32, Error> {
        let session = EncryptedSession::restore(snapshot)?;
        if session.our_tag != 0 && session.our_tag != self.cfg.our_tag {
            return Err(Error::Snapshot("snapshot belongs to another instance tag"));
        }
        let tag = session.their_tag;
        let inst = self.instances.entry(tag).or_insert_with(Instance::new);
        inst.msg = MsgState::Encrypted(Box::new(session));
        inst.smp.reset();
        self.select_best();
        Ok(tag)
    }

    /// Queue messages held before a restart (from the durable store).
    pub fn restore_held(&mut self, texts: impl IntoIterator<Item = Zeroizing<String>>) {
        self.held.extend(texts);
    }

    /// The partially reassembled incoming messages, for durable storage:
    /// a crash between fragments must not lose what the server already
    /// considers delivered. Every held piece as one fragment text marked
    /// with [`AHEAD_MARK`] ([`Reassembler::held`]), in arrival order.
    pub fn partial_fragments(&self) -> Vec<String> {
        self.reassembly
            .values()
            .flat_map(Reassembler::held)
            .map(|f| format!("{AHEAD_MARK}{}", f.to_text()))
            .collect()
    }

    /// Since when (the latest fragment's arrival) a message has been
    /// waiting for a piece: a reassembler holds a piece that no message
    /// used. The router fetches offline storage again for it, as for a gap
    /// in the counters (ejabberd keeps a piece stored just as the session
    /// came online until the next login). `None` when nothing waits.
    pub fn fragments_waiting_since(&self) -> Option<u64> {
        self.fragments_waiting
            .filter(|_| self.reassembly.values().any(Reassembler::waiting))
    }

    /// Restore what [`Conversation::partial_fragments`] returned (after a
    /// restart). Texts without the mark are what versions before the
    /// candidate reassembly stored for a message received in sequence (one
    /// cumulative fragment: [`Reassembler::split_cumulative`]). Texts that
    /// do not parse or exceed the reassembly bounds are dropped; returns
    /// how many were restored.
    pub fn restore_fragments<S: AsRef<str>>(&mut self, texts: &[S]) -> usize {
        let max = self.cfg.max_reassembly_bytes;
        let mut n = 0;
        // Cumulative states first, as the earlier versions restored them.
        let (marked, cumulative): (Vec<&str>, Vec<&str>) = texts
            .iter()
            .map(AsRef::as_ref)
            .partition(|t| t.starts_with(AHEAD_MARK));
        let fragments =
            cumulative
                .iter()
                .filter_map(|t| super::fragment::parse_fragment(t).ok())
                .filter_map(|f| Reassembler::split_cumulative(&f))
                .flatten()
                .chain(marked.iter().filter_map(|t| {
                    super::fragment::parse_fragment(t.strip_prefix(AHEAD_MARK)?).ok()
                }));
        for f in fragments {
            let key = if f.version == Version::V3 {
                f.sender_tag
            } else {
                0
            };
            let r = self
                .reassembly
                .entry(key)
                .or_insert_with(|| Reassembler::new(max));
            if r.hold(&f) {
                n += 1;
            }
        }
        self.reassembly.retain(|_, r| !r.is_empty());
        n
    }

    /// Take the handshakes under way out of this conversation (they are
    /// left empty), so that the account's next connection can finish them
    /// ([`Conversation::restore_akes`]): when the client's connection drops
    /// between our Reveal Signature and the peer's Signature, the peer is
    /// already private and sends under keys only this state can derive.
    /// `None` when no AKE is under way.
    pub fn take_akes(&mut self) -> Option<PendingAkes> {
        let master = std::mem::take(&mut self.master_ake);
        let instances: Vec<(u32, AuthState)> = self
            .instances
            .iter_mut()
            .filter(|(_, i)| i.ake.in_progress())
            .map(|(tag, i)| (*tag, std::mem::take(&mut i.ake)))
            .collect();
        (master.in_progress() || !instances.is_empty()).then_some(PendingAkes { master, instances })
    }

    /// Put back handshakes taken from this account's previous connection
    /// with the same peer (nothing is replaced that is already under way).
    pub fn restore_akes(&mut self, akes: PendingAkes) {
        if !self.master_ake.in_progress() {
            self.master_ake = akes.master;
        }
        for (tag, state) in akes.instances {
            // Its record may be in the store (written by the last
            // connection): wiped with the state.
            if matches!(state, AuthState::AwaitingSig(_)) {
                self.durable_akes.insert(tag);
            }
            let inst = self.instances.entry(tag).or_insert_with(Instance::new);
            if !inst.ake.in_progress() {
                inst.ake = state;
            }
        }
    }

    /// Restore a handshake record ([`Action::PersistHandshake`]) after a
    /// restart: we had sent our Reveal Signature, so the peer may be
    /// private already, and the Signature and its first messages wait in
    /// the server's offline storage; with the state back they are read as
    /// if we never stopped. A record older than `lifetime` seconds at `now`
    /// is refused, as is one for another instance tag of ours. Returns the
    /// peer instance. The handshake counts as progress at `now`, so
    /// [`Conversation::handle_tick`] gives the Signature its usual time
    /// before starting over.
    pub fn restore_handshake(
        &mut self,
        record: &[u8],
        now: u64,
        lifetime: u64,
    ) -> Result<u32, Error> {
        let restored = AuthState::from_awaiting_sig_record(record)?;
        if now.saturating_sub(restored.saved_at) > lifetime {
            return Err(Error::Snapshot("handshake record expired"));
        }
        let h = restored.header;
        let tag = match h.version {
            Version::V2 => 0,
            Version::V3 if h.sender_tag == self.cfg.our_tag => h.receiver_tag,
            Version::V3 => {
                return Err(Error::Snapshot(
                    "handshake record belongs to another instance tag",
                ));
            }
        };
        let inst = self.instances.entry(tag).or_insert_with(Instance::new);
        if !inst.ake.in_progress() {
            inst.ake = restored.state;
        }
        self.durable_akes.insert(tag);
        self.ake_activity = Some(now);
        Ok(tag)
    }

    /// Wipe the records of handshakes no longer waiting for the Signature
    /// (called at the end of every input that can move an AKE).
    fn forget_stale_handshakes(&mut self, out: &mut Out) {
        let instances = &self.instances;
        self.durable_akes.retain(|tag| {
            let waiting = instances
                .get(tag)
                .is_some_and(|i| matches!(i.ake, AuthState::AwaitingSig(_)));
            if !waiting {
                out.push(Action::ForgetHandshake { instance: *tag });
            }
            waiting
        });
    }

    /// The account's connection ended: keep encrypted sessions, mark them
    /// suspended, abandon AKEs. No disconnected TLV is sent (O2TR).
    pub fn suspend(&mut self) {
        self.master_ake = AuthState::None;
        self.reassembly.clear();
        for inst in self.instances.values_mut() {
            inst.ake = AuthState::None;
            inst.smp.reset();
            if let MsgState::Encrypted(s) = &mut inst.msg {
                s.suspended = true;
            }
        }
    }

    /// Whether user messages would be sent encrypted now.
    pub fn is_private(&self) -> bool {
        self.selected_session().is_some()
    }

    /// Number of held messages.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Status of every known instance.
    pub fn status(&self) -> Vec<InstanceStatus> {
        self.instances
            .iter()
            .map(|(tag, inst)| match &inst.msg {
                MsgState::Plaintext => InstanceStatus {
                    instance: *tag,
                    state: "plaintext",
                    version: None,
                    fingerprint: None,
                    keyids: None,
                },
                MsgState::Finished => InstanceStatus {
                    instance: *tag,
                    state: "finished",
                    version: None,
                    fingerprint: None,
                    keyids: None,
                },
                MsgState::Encrypted(s) => InstanceStatus {
                    instance: *tag,
                    state: if s.suspended {
                        "suspended"
                    } else {
                        "encrypted"
                    },
                    version: Some(s.version),
                    fingerprint: Some(s.fingerprint()),
                    keyids: Some((s.ratchet.our_keyid(), s.ratchet.their_keyid())),
                },
            })
            .collect()
    }

    /// The fingerprint of the peer in the selected encrypted session.
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        self.selected_session().map(|s| s.fingerprint())
    }

    /// The secure session id of the selected session, as the spec shows it.
    pub fn ssid(&self) -> Option<String> {
        self.selected_session()
            .map(|s| format_ssid(&s.ssid, s.we_initiated))
    }

    fn selected_session(&self) -> Option<&EncryptedSession> {
        let tag = self.selected?;
        match &self.instances.get(&tag)?.msg {
            MsgState::Encrypted(s) => Some(s),
            _ => None,
        }
    }

    /// Pick the instance user messages go to: the encrypted one with the
    /// most recent activity (libotr's "best" instance).
    fn select_best(&mut self) {
        self.selected = self
            .instances
            .iter()
            .filter_map(|(tag, inst)| match &inst.msg {
                MsgState::Encrypted(s) => Some((s.last_activity(), !s.suspended, *tag)),
                _ => None,
            })
            .max()
            .map(|(_, _, tag)| tag);
    }

    fn tags(&self, version: Version, theirs: u32) -> Tags {
        match version {
            Version::V2 => Tags { ours: 0, theirs: 0 },
            Version::V3 => Tags {
                ours: self.cfg.our_tag,
                theirs,
            },
        }
    }

    /// Encode, armour and fragment an OTR message for sending.
    fn push_encoded(&self, msg: &EncodedMessage, out: &mut Out) {
        self.push_binary(&msg.header, &msg.encode(), out);
    }

    /// [`Conversation::push_encoded`] for a data message we encrypted.
    fn push_sealed(&self, msg: &Sealed, out: &mut Out) {
        self.push_binary(&msg.header, &msg.bytes, out);
    }

    /// Armour and fragment the binary encoding of a message with `header`.
    fn push_binary(&self, header: &Header, bytes: &[u8], out: &mut Out) {
        let armored = message::armor(bytes);
        if self.cfg.max_message_bytes == 0 || armored.len() <= self.cfg.max_message_bytes {
            out.push(Action::Send(armored));
            return;
        }
        match fragment(
            &armored,
            self.cfg.max_message_bytes,
            header.version,
            header.sender_tag,
            header.receiver_tag,
        ) {
            Ok(pieces) => out.extend(pieces.into_iter().map(Action::Send)),
            // A size too small for any fragment: send whole rather than nothing.
            Err(_) => out.push(Action::Send(armored)),
        }
    }

    fn send_query(&mut self, now: u64, out: &mut Out) {
        self.last_query = Some(now);
        out.push(Action::Send(message::query_message(
            &self.cfg.policy.versions(),
            &self.cfg.account,
        )));
    }

    /// The user asks to start (or refresh) OTR: send a query message.
    pub fn handle_start(&mut self, now: u64) -> Out {
        let mut out = Vec::new();
        self.send_query(now, &mut out);
        out
    }

    /// Time passed (the router calls this about once a second). Messages
    /// held for a private conversation must not wait forever for a
    /// handshake that stalled: when the peer's connection died in the middle
    /// of an AKE, its half died with it and nothing will answer ours; when
    /// our query was lost, nobody saw it. So with messages held, no private
    /// session, and no AKE progress for `ake_retry_secs` (doubling with each
    /// retry), the AKE state is dropped and a new query sent, at most
    /// [`MAX_AKE_RETRIES`] times until the user sends again.
    ///
    /// Key generations a ratchet step retired go when their time is up
    /// (see [`keys::retired`](super::keys::retired)): a new snapshot
    /// without them is persisted, so they leave the disk too.
    pub fn handle_tick(&mut self, now: u64) -> Out {
        let mut out = Vec::new();
        for (tag, inst) in &mut self.instances {
            if let MsgState::Encrypted(s) = &mut inst.msg
                && s.ratchet.expire_retired(now)
            {
                out.push(Action::Persist(Persist {
                    instance: *tag,
                    snapshot: s.snapshot_cached(),
                }));
            }
        }
        let base = self.cfg.ake_retry_secs;
        if base == 0
            || self.held.is_empty()
            || self.is_private()
            || self.ake_retries >= MAX_AKE_RETRIES
            || !self.cfg.policy.require_encryption()
            || self
                .instances
                .values()
                .any(|i| matches!(i.msg, MsgState::Finished))
        {
            return out;
        }
        let last = self.last_query.max(self.ake_activity);
        let wait = base.saturating_mul(1 << self.ake_retries.min(16));
        if last.is_some_and(|t| now.saturating_sub(t) < wait) {
            return out;
        }
        tracing::info!(
            retry = self.ake_retries + 1,
            held = self.held.len(),
            ake = self.master_ake.name(),
            "no private conversation yet; starting the handshake over"
        );
        self.master_ake = AuthState::None;
        for inst in self.instances.values_mut() {
            inst.ake = AuthState::None;
        }
        for _ in std::mem::take(&mut self.early_data) {
            out.push(Action::Notify(Notice::Unreadable {
                reason: "sent in a handshake that never completed".into(),
                replayed: false,
            }));
        }
        self.ake_retries += 1;
        self.forget_stale_handshakes(&mut out);
        self.send_query(now, &mut out);
        out
    }

    /// The user asks to end the private conversation: send the disconnected
    /// TLV on every encrypted instance and forget its keys.
    pub fn handle_end<R: CryptoRng + ?Sized>(&mut self, now: u64, rng: &mut R) -> Out {
        let _ = rng;
        let mut out = Vec::new();
        let tags: Vec<u32> = self.instances.keys().copied().collect();
        for tag in tags {
            let Some(inst) = self.instances.get_mut(&tag) else {
                continue;
            };
            inst.smp.reset();
            match std::mem::replace(&mut inst.msg, MsgState::Plaintext) {
                MsgState::Encrypted(mut s) => {
                    let body = tlv::join_plaintext(
                        b"",
                        &[Tlv {
                            typ: tlv::types::DISCONNECTED,
                            value: Vec::new(),
                        }],
                    );
                    // The session ends with this message: nothing to prepare
                    // for an answer.
                    let msg = encrypt_last(&mut s, FLAG_IGNORE_UNREADABLE, &body, now, Vec::new());
                    out.push(Action::Forget { instance: tag });
                    self.push_sealed(&msg, &mut out);
                    out.push(Action::Notify(Notice::Ended));
                }
                MsgState::Finished => out.push(Action::Forget { instance: tag }),
                MsgState::Plaintext => {}
            }
        }
        self.selected = None;
        self.received_plaintext = false;
        out
    }

    /// Forget every session with this peer without telling the peer (the
    /// `forget` command, or an expired snapshot).
    pub fn forget(&mut self) -> Out {
        let mut out = Vec::new();
        for (tag, inst) in &mut self.instances {
            if !matches!(inst.msg, MsgState::Plaintext) {
                out.push(Action::Forget { instance: *tag });
            }
            inst.msg = MsgState::Plaintext;
            inst.ake = AuthState::None;
            inst.smp.reset();
        }
        self.selected = None;
        self.forget_stale_handshakes(&mut out);
        out
    }

    /// The user typed `text` for the peer.
    pub fn handle_outgoing<R: CryptoRng + ?Sized>(
        &mut self,
        text: &str,
        now: u64,
        rng: &mut R,
    ) -> Out {
        let mut out = Vec::new();
        if let Some(tag) = self.selected {
            let limit = self.cfg.max_unanswered;
            let over = match self.instances.get(&tag).map(|i| &i.msg) {
                Some(MsgState::Encrypted(s)) => s.sent_since_answer >= limit,
                _ => false,
            };
            if over {
                out.push(Action::Notify(Notice::UnansweredLimit { limit }));
                self.hold(text, &mut out);
                if self.may_query(now) {
                    self.send_query(now, &mut out);
                }
                return out;
            }
            if self.encrypt_user_text(tag, text, now, rng, &mut out) {
                return out;
            }
        }
        let finished = self
            .instances
            .values()
            .any(|i| matches!(i.msg, MsgState::Finished));
        if finished {
            out.push(Action::Notify(Notice::CannotSendFinished));
            self.hold(text, &mut out);
            return out;
        }
        if self.cfg.policy.require_encryption() {
            self.hold(text, &mut out);
            if self.may_query(now) {
                self.send_query(now, &mut out);
            }
            return out;
        }
        let mut body = text.to_string();
        if self.cfg.policy.send_whitespace_tag() && !self.received_plaintext {
            body.push_str(&message::whitespace_tag(&self.cfg.policy.versions()));
        }
        out.push(Action::Send(body));
        out
    }

    /// The AKE state a D-H Commit or D-H Key from instance `tag` continues:
    /// the instance's own, unless we sent a D-H Commit of our own to an
    /// unknown instance (`master_ake`, answering the peer's query) and the
    /// instance is not waiting for a D-H Key. Such a commit is newer than
    /// any handshake the instance has under way — that one would have
    /// taken over `master_ake` otherwise — and the peer, which asked for
    /// a new AKE, answers it; the stale state is dropped.
    fn take_ake_for_dh(&mut self, tag: u32) -> AuthState {
        let inst = self.instances.entry(tag).or_insert_with(Instance::new);
        let state = std::mem::take(&mut inst.ake);
        let ours_newer = matches!(self.master_ake, AuthState::AwaitingDhKey(_))
            && !matches!(state, AuthState::AwaitingDhKey(_));
        if ours_newer || (!state.in_progress() && self.master_ake.in_progress()) {
            if state.in_progress() {
                tracing::debug!(
                    stale = state.name(),
                    "our newer D-H Commit supersedes the instance's handshake"
                );
            }
            return std::mem::take(&mut self.master_ake);
        }
        state
    }

    /// A new query restarts the peer's AKE, so none while one is under
    /// way — with an unknown instance (`master_ake`) or a known one (we
    /// answered its D-H Commit) — nor within 10 s of the last.
    fn may_query(&self, now: u64) -> bool {
        !self.master_ake.in_progress()
            && !self.instances.values().any(|i| i.ake.in_progress())
            && self.last_query.is_none_or(|t| now.saturating_sub(t) >= 10)
    }

    fn hold(&mut self, text: &str, out: &mut Out) {
        if self.held.len() >= self.cfg.max_held {
            tracing::warn!(
                limit = self.cfg.max_held,
                "held-message queue full; message dropped"
            );
            out.push(Action::Notify(Notice::HeldQueueFull));
            return;
        }
        let text = Zeroizing::new(text.to_string());
        self.held.push_back(text.clone());
        self.ake_retries = 0;
        out.push(Action::Hold(text));
        out.push(Action::Notify(Notice::Held {
            waiting: self.held.len(),
        }));
    }

    /// Encrypt and queue a user message on instance `tag`. Returns false if
    /// that instance is not encrypted.
    fn encrypt_user_text<R: CryptoRng + ?Sized>(
        &mut self,
        tag: u32,
        text: &str,
        now: u64,
        rng: &mut R,
        out: &mut Out,
    ) -> bool {
        let Some(inst) = self.instances.get_mut(&tag) else {
            return false;
        };
        let MsgState::Encrypted(s) = &mut inst.msg else {
            return false;
        };
        let resumed = std::mem::replace(&mut s.suspended, false);
        let buf = std::mem::take(&mut self.wire_buf);
        let msg = encrypt(s, 0, text.as_bytes(), now, rng, buf);
        s.sent_since_answer = s.sent_since_answer.saturating_add(1);
        let snapshot = s.snapshot_cached();
        out.push(Action::Persist(Persist {
            instance: tag,
            snapshot,
        }));
        if resumed {
            out.push(Action::Notify(Notice::Resumed { instance: tag }));
        }
        self.push_sealed(&msg, out);
        if msg.bytes.capacity() <= MAX_KEPT_WIRE_BUFFER {
            self.wire_buf = msg.bytes;
        }
        true
    }

    /// Send every held message on the selected encrypted instance.
    fn flush_held<R: CryptoRng + ?Sized>(&mut self, now: u64, rng: &mut R, out: &mut Out) {
        let Some(tag) = self.selected else { return };
        let mut count = 0;
        while let Some(text) = self.held.front().cloned() {
            if !self.encrypt_user_text(tag, &text, now, rng, out) {
                break;
            }
            self.held.pop_front();
            count += 1;
        }
        if count > 0 {
            self.ake_retries = 0;
            out.push(Action::ReleaseHeld { count });
            out.push(Action::Notify(Notice::HeldSent { count }));
        }
    }

    /// A message body arrived from the peer.
    pub fn handle_incoming<R: CryptoRng + ?Sized>(
        &mut self,
        text: &str,
        now: u64,
        rng: &mut R,
    ) -> Out {
        let mut out = Vec::new();
        self.incoming(text, now, rng, &mut out, false);
        self.forget_stale_handshakes(&mut out);
        out
    }

    /// [`Conversation::handle_incoming`] for a message the server says it
    /// stored at `stamp` (unix seconds, its XEP-0203 delay; unauthenticated,
    /// like everything the server says). A server restarted after a crash
    /// may hand out again an offline message it had already delivered (the
    /// deletion from its spool did not reach the disk): a data message
    /// stored before the session last received one and naming keys that
    /// have rotated away since is such a copy, and gets no OTR error (which
    /// would make the peer start a new AKE, losing what is in flight).
    pub fn handle_incoming_delayed<R: CryptoRng + ?Sized>(
        &mut self,
        text: &str,
        stamp: Option<u64>,
        now: u64,
        rng: &mut R,
    ) -> Out {
        self.delayed_from = stamp;
        let out = self.handle_incoming(text, now, rng);
        self.delayed_from = None;
        out
    }

    fn incoming<R: CryptoRng + ?Sized>(
        &mut self,
        text: &str,
        now: u64,
        rng: &mut R,
        out: &mut Out,
        reassembled: bool,
    ) {
        let parsed = match message::parse(text) {
            Ok(m) => m,
            Err(_) if self.guessing && !self.guess_plain => {
                self.guess_refused = true;
                return;
            }
            Err(e) => {
                out.push(Action::Notify(Notice::Malformed(e.to_string())));
                return;
            }
        };
        match parsed {
            Message::Plaintext { text, tag } => self.on_plaintext(text, tag, now, rng, out),
            Message::Query { versions } => {
                if let Some(v) = self.cfg.policy.choose(&versions) {
                    self.start_ake(v, rng, out);
                }
            }
            Message::Error { text } => {
                out.push(Action::Notify(Notice::PeerError(text)));
                if self.cfg.policy.error_start_ake() && self.may_query(now) {
                    self.send_query(now, out);
                }
            }
            Message::Fragment(f) if !reassembled => self.on_fragment(f, now, rng, out),
            Message::Fragment(_) if self.guessing && !self.guess_plain => {
                self.guess_refused = true;
            }
            Message::Fragment(_) => out.push(Action::Notify(Notice::Malformed(
                "a fragment contained another fragment".into(),
            ))),
            Message::Encoded(m) => self.on_encoded(m, now, rng, out),
        }
    }

    fn on_fragment<R: CryptoRng + ?Sized>(
        &mut self,
        f: Fragment,
        now: u64,
        rng: &mut R,
        out: &mut Out,
    ) {
        if f.version == Version::V3 && f.receiver_tag != 0 && f.receiver_tag != self.cfg.our_tag {
            return; // for another instance of our account
        }
        if !self.cfg.policy.allows(f.version) {
            return;
        }
        let key = if f.version == Version::V3 {
            f.sender_tag
        } else {
            0
        };
        let max = self.cfg.max_reassembly_bytes;
        if !self.reassembly.contains_key(&key) {
            self.reassembly.retain(|_, r| !r.is_empty());
            if self.reassembly.len() >= self.cfg.max_reassembly_senders {
                // Make room by dropping another sender's partial message:
                // a flood can delay a genuine fragmented message but not
                // lock it out for the rest of the session.
                if let Some(victim) = self.reassembly.keys().next().copied() {
                    self.reassembly.remove(&victim);
                }
                let e = FragmentError::TooManySenders {
                    max: self.cfg.max_reassembly_senders,
                };
                tracing::warn!(sender = key, cause = %e, "fragment buffer limit reached");
                out.push(Action::Notify(Notice::Malformed(e.to_string())));
            }
        }
        // Out of the map while guesses are handled, which needs `self`.
        let mut r = self
            .reassembly
            .remove(&key)
            .unwrap_or_else(|| Reassembler::new(max));
        self.guess_refusals = (0, 0);
        let result = r.push_with(&f, message_age, |whole, plain| {
            self.try_guess(whole, plain, now, rng, out)
        });
        if !r.is_empty() {
            self.reassembly.insert(key, r);
        }
        self.fragments_waiting = self
            .reassembly
            .values()
            .any(Reassembler::waiting)
            .then_some(now);
        match result {
            Ok(Assembly::Pending | Assembly::Verified(_)) => {}
            Ok(Assembly::Unverified { tried })
                if self.guess_refusals.0 > 0 && self.guess_refusals.0 == self.guess_refusals.1 =>
            {
                // Only copies of messages read already (a stale piece that
                // the server handed over again): nothing to tell.
                tracing::debug!(sender = key, tried, "fragments of copies kept");
            }
            Ok(Assembly::Unverified { tried }) => {
                // One notice for the fragment, none per guess; no OTR
                // error (libotr answers one with a new AKE, which would
                // defeat resumption), and the pieces wait.
                tracing::debug!(
                    sender = key,
                    tried,
                    "no reassembly of interleaved fragments verified"
                );
                out.push(Action::Notify(Notice::Unreadable {
                    reason: format!(
                        "its fragments are mixed with another message's and none of {tried} \
                         combinations verified yet; they are kept for the fragments to come"
                    ),
                    replayed: false,
                }));
            }
            Err(e) => {
                if matches!(
                    e,
                    FragmentError::TooLarge { .. } | FragmentError::TooManyPieces { .. }
                ) {
                    tracing::warn!(sender = key, cause = %e, "fragment buffer limit reached");
                }
                out.push(Action::Notify(Notice::Malformed(e.to_string())));
            }
        }
    }

    /// Handles a message the reassembler put together (`plain`: one run
    /// received in order); returns [`Verdict::Refused`], with nothing
    /// changed and nothing added to `out`, if it is refused (see
    /// [`Conversation::guessing`]), [`Verdict::Copy`] for a copy of a
    /// message read already.
    fn try_guess<R: CryptoRng + ?Sized>(
        &mut self,
        whole: &str,
        plain: bool,
        now: u64,
        rng: &mut R,
        out: &mut Out,
    ) -> Verdict {
        let mut guess_out = Out::new();
        self.guessing = true;
        self.guess_plain = plain;
        self.guess_refused = false;
        self.guess_copy = false;
        self.incoming(whole, now, rng, &mut guess_out, true);
        self.guessing = false;
        self.guess_plain = false;
        if std::mem::take(&mut self.guess_refused) {
            self.guess_refusals.0 += 1;
            return Verdict::Refused;
        }
        out.extend(guess_out);
        if std::mem::take(&mut self.guess_copy) {
            Verdict::Copy
        } else {
            Verdict::Accepted
        }
    }

    fn on_plaintext<R: CryptoRng + ?Sized>(
        &mut self,
        text: String,
        tag: Option<Vec<Version>>,
        now: u64,
        rng: &mut R,
        out: &mut Out,
    ) {
        let _ = now;
        let expecting = self.cfg.policy.require_encryption()
            || self
                .instances
                .values()
                .any(|i| !matches!(i.msg, MsgState::Plaintext));
        if !text.is_empty() {
            if expecting {
                out.push(Action::Notify(Notice::ReceivedUnencrypted));
            }
            out.push(Action::Deliver(Delivery {
                text,
                encrypted: false,
                instance: 0,
                offline: false,
                order: None,
            }));
        }
        self.received_plaintext = true;
        if let Some(versions) = tag {
            if self.cfg.policy.whitespace_start_ake() {
                if let Some(v) = self.cfg.policy.choose(&versions) {
                    self.start_ake(v, rng, out);
                }
            }
        } else if self.cfg.policy.require_encryption() && !self.held.is_empty() {
            // We asked for OTR and the peer answered in plaintext.
            out.push(Action::Notify(Notice::NotPrivate));
        }
    }

    fn start_ake<R: CryptoRng + ?Sized>(&mut self, version: Version, rng: &mut R, out: &mut Out) {
        // Our new D-H Commit supersedes any exchange we initiated earlier:
        // the peer answers the newest commit (spec: a responder keeps only
        // the latest one), so a stale initiator state left by a lost or
        // damaged message must not capture that answer.
        for inst in self.instances.values_mut() {
            if matches!(
                inst.ake,
                AuthState::AwaitingDhKey(_) | AuthState::AwaitingSig(_)
            ) {
                inst.ake = AuthState::None;
            }
        }
        let (state, commit) = AuthState::start(version, self.tags(version, 0), rng);
        self.master_ake = state;
        self.push_encoded(&commit, out);
    }

    fn on_encoded<R: CryptoRng + ?Sized>(
        &mut self,
        m: EncodedMessage,
        now: u64,
        rng: &mut R,
        out: &mut Out,
    ) {
        let h = m.header;
        if !self.cfg.policy.allows(h.version) {
            return;
        }
        let tag = match h.version {
            Version::V2 => 0,
            Version::V3 => {
                let commit = matches!(m.body, Body::DhCommit(_));
                if h.receiver_tag != self.cfg.our_tag && !(commit && h.receiver_tag == 0) {
                    tracing::debug!(receiver = h.receiver_tag, "message for another instance");
                    return;
                }
                h.sender_tag
            }
        };
        if !self.instances.contains_key(&tag) && self.instances.len() >= self.cfg.max_instances {
            // Make room by forgetting instances that hold nothing worth
            // keeping (no session, no handshake under way).
            self.instances
                .retain(|_, i| !matches!(i.msg, MsgState::Plaintext) || i.ake.in_progress());
            if self.instances.len() >= self.cfg.max_instances {
                tracing::warn!(
                    limit = self.cfg.max_instances,
                    instance = tag,
                    "instance limit reached; message ignored"
                );
                out.push(Action::Notify(Notice::TooManyInstances {
                    limit: self.cfg.max_instances,
                }));
                return;
            }
        }
        let tags = self.tags(h.version, tag);
        if !matches!(m.body, Body::Data(_)) {
            self.ake_activity = Some(now);
        }
        match m.body {
            Body::Data(d) => self.on_data(&h, tag, d, now, rng, out),
            Body::DhCommit(c) => {
                let state = self.take_ake_for_dh(tag);
                let (state, step) = state.handle_dh_commit(h.version, tags, &c, rng);
                self.set_ake(tag, state);
                if let Some(reply) = step.reply {
                    self.push_encoded(&reply, out);
                }
            }
            Body::DhKey(k) => {
                let state = self.take_ake_for_dh(tag);
                let was_waiting = matches!(state, AuthState::AwaitingSig(_));
                let lt = Arc::clone(&self.long_term);
                match state.handle_dh_key(tags, &k, &lt, rng) {
                    Ok((state, step)) => {
                        // Persist before release: the Reveal Signature makes
                        // the peer private (`restore_handshake`). A re-sent
                        // one is on disk already.
                        if !was_waiting {
                            if let Some(record) = state.awaiting_sig_record(now) {
                                out.push(Action::PersistHandshake(Persist {
                                    instance: tag,
                                    snapshot: record,
                                }));
                                self.durable_akes.insert(tag);
                            }
                        }
                        self.set_ake(tag, state);
                        if let Some(reply) = step.reply {
                            self.push_encoded(&reply, out);
                        }
                    }
                    Err((state, e)) => {
                        self.set_ake(tag, state);
                        tracing::info!(cause = %e, "D-H Key rejected");
                        out.push(Action::Notify(Notice::AkeFailed {
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Body::RevealSignature(rs) => {
                let state = self.take_ake(tag);
                let lt = Arc::clone(&self.long_term);
                match state.handle_reveal_signature(tags, &rs, &lt, rng) {
                    Ok((state, step)) => {
                        self.set_ake(tag, state);
                        // The Signature makes the peer go encrypted and send
                        // data at once: our new session must be durable
                        // first, or a crash right after sending it leaves
                        // the peer's messages unreadable (found by the
                        // chaos campaign). go_encrypted starts with that
                        // Persist; the Signature goes right after it, before
                        // the held messages it releases.
                        let mut done_out = Out::new();
                        if let Some(done) = step.complete {
                            self.go_encrypted(tag, done, now, rng, &mut done_out);
                        }
                        let persists = done_out
                            .iter()
                            .take_while(|a| matches!(a, Action::Persist(_)))
                            .count();
                        let rest = done_out.split_off(persists);
                        out.extend(done_out);
                        if let Some(reply) = step.reply {
                            self.push_encoded(&reply, out);
                        }
                        out.extend(rest);
                    }
                    Err(e) => {
                        tracing::info!(cause = %e, "AKE failed at Reveal Signature");
                        out.push(Action::Notify(Notice::AkeFailed {
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Body::Signature(sig) => {
                let state = self.take_ake(tag);
                match state.handle_signature(&sig) {
                    Ok((state, step)) => {
                        self.set_ake(tag, state);
                        if let Some(done) = step.complete {
                            self.go_encrypted(tag, done, now, rng, out);
                            let (early, rest): (Vec<_>, Vec<_>) =
                                std::mem::take(&mut self.early_data)
                                    .into_iter()
                                    .partition(|(t, _, _)| *t == tag);
                            self.early_data = rest;
                            for (_, h, d) in early {
                                self.on_data(&h, tag, d, now, rng, out);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::info!(cause = %e, "AKE failed at Signature");
                        out.push(Action::Notify(Notice::AkeFailed {
                            reason: e.to_string(),
                        }));
                    }
                }
            }
        }
    }

    fn take_ake(&mut self, tag: u32) -> AuthState {
        self.instances
            .get_mut(&tag)
            .map(|i| std::mem::take(&mut i.ake))
            .unwrap_or_default()
    }

    fn set_ake(&mut self, tag: u32, state: AuthState) {
        self.instances.entry(tag).or_insert_with(Instance::new).ake = state;
    }

    fn go_encrypted<R: CryptoRng + ?Sized>(
        &mut self,
        tag: u32,
        done: super::ake::AkeComplete,
        now: u64,
        rng: &mut R,
        out: &mut Out,
    ) {
        let inst = self.instances.entry(tag).or_insert_with(Instance::new);
        let refreshed = matches!(inst.msg, MsgState::Encrypted(_));
        let fingerprint = done.their_long_term.fingerprint();
        let ssid = format_ssid(&done.ssid, done.we_initiated);
        let mut session = EncryptedSession {
            version: done.version,
            our_tag: if done.version == Version::V3 {
                self.cfg.our_tag
            } else {
                0
            },
            their_tag: tag,
            ratchet: KeyRatchet::after_ake(done.our_dh, done.their_dh, done.their_keyid, rng),
            their_long_term: done.their_long_term,
            ssid: done.ssid,
            we_initiated: done.we_initiated,
            created_at: now,
            last_sent: now,
            last_received: now,
            sent_since_answer: 0,
            suspended: false,
        };
        out.push(Action::Persist(Persist {
            instance: tag,
            snapshot: session.snapshot_cached(),
        }));
        inst.msg = MsgState::Encrypted(Box::new(session));
        inst.smp.reset();
        self.selected = Some(tag);
        out.push(Action::Notify(Notice::GoneSecure {
            instance: tag,
            version: done.version,
            fingerprint,
            ssid,
            refreshed,
        }));
        self.flush_held(now, rng, out);
    }

    fn on_data<R: CryptoRng + ?Sized>(
        &mut self,
        h: &Header,
        tag: u32,
        d: DataMessage,
        now: u64,
        rng: &mut R,
        out: &mut Out,
    ) {
        let ignore_unreadable = d.flags & FLAG_IGNORE_UNREADABLE != 0;
        // For the log only (keyids and counter are not secret).
        let keyids = (d.sender_keyid, d.recipient_keyid, u64::from_be_bytes(d.ctr));
        let awaiting_sig = self
            .instances
            .get(&tag)
            .is_some_and(|i| matches!(i.ake, AuthState::AwaitingSig(_)));
        let mut stale = false;
        // `d` is moved into `decrypt` (which decrypts its buffer in place)
        // when there is a session, else here, for `early_data`.
        let mut kept = None;
        let result = match self.instances.get_mut(&tag) {
            Some(Instance {
                msg: MsgState::Encrypted(s),
                smp,
                ..
            }) => {
                // Both tests: the keyids alone cannot tell a copy from a
                // message of a newer session whose AKE we lost in a crash
                // (it starts again at keyid 1), which needs the OTR error
                // for the peer to start over; that one was sent after
                // everything the session received.
                stale = self.delayed_from.is_some_and(|t| t < s.last_received)
                    && predates_keys(&s.ratchet, &d);
                s.ratchet.decrypt_owned(h, d, now, rng).map(|r| (r, s, smp))
            }
            _ => {
                kept = Some(d);
                Err(Error::Peer(PeerMisbehaved::NotEncrypted))
            }
        };
        let (received, session, smp_state) = match result {
            Ok(x) => x,
            // Reassembled from fragments and not this session's authentic
            // message: refused, decrypt changed nothing. Even one run in
            // order may be the head of one message and the tail of another
            // (a stored partial message and a re-routed tail after a
            // crash): a bad MAC is refused, not answered with an OTR error
            // (libotr answers one with a new AKE, defeating resumption).
            // A run in order without a session for its keys is the
            // sender's problem and answered as usual. Errors found after
            // the MAC (a replayed counter) belong to an authentic message.
            Err(Error::Peer(PeerMisbehaved::DataMacMismatch)) if self.guessing => {
                self.guess_refused = true;
                return;
            }
            // An authentic copy of a message read already, put together
            // from pieces that did not arrive in one run: under the same
            // keys the first pieces of a burst are identical, so a stale
            // last piece the server handed over again plus the first piece
            // of the *next* message is that copy. Consuming them would
            // leave the next message without its first piece (lost; chaos
            // seed 20261230, trials 64 and 73): refused, the pieces wait
            // for their own partners (bounded like every piece).
            Err(Error::Peer(PeerMisbehaved::CounterReused))
                if self.guessing && !self.guess_plain =>
            {
                self.guess_refused = true;
                self.guess_refusals.1 += 1;
                return;
            }
            Err(Error::Peer(
                PeerMisbehaved::NotEncrypted
                | PeerMisbehaved::UnknownKeyids
                | PeerMisbehaved::ZeroKeyid,
            )) if self.guessing && !self.guess_plain => {
                self.guess_refused = true;
                return;
            }
            Err(Error::Peer(PeerMisbehaved::NotEncrypted))
                if awaiting_sig && self.early_data.len() < MAX_EARLY_DATA =>
            {
                if let Some(d) = kept {
                    tracing::debug!(instance = tag, "data message before the Signature; kept");
                    self.early_data.push((tag, *h, d));
                }
                return;
            }
            Err(e) => {
                if self.guessing && matches!(e, Error::Peer(PeerMisbehaved::CounterReused)) {
                    // Its first piece may be another message's (see
                    // Verdict::Copy).
                    self.guess_copy = true;
                }
                if !ignore_unreadable {
                    // An authentic message we already consumed (the server
                    // re-delivering after a crash, or a replay): no OTR
                    // error, since libotr answers one with a new AKE, which
                    // would defeat resumption. Its keys may be gone already
                    // (a stored copy from before the last key rotations, see
                    // handle_incoming_delayed): still a copy, not a fault.
                    let replay = matches!(e, Error::Peer(PeerMisbehaved::CounterReused))
                        || (stale && matches!(e, Error::Peer(PeerMisbehaved::UnknownKeyids)));
                    tracing::debug!(
                        instance = tag,
                        keyids = ?keyids,
                        delayed_from = ?self.delayed_from,
                        guessing = self.guessing,
                        replay,
                        cause = %e,
                        "unreadable data message"
                    );
                    out.push(Action::Notify(Notice::Unreadable {
                        reason: e.to_string(),
                        replayed: replay,
                    }));
                    if !replay {
                        out.push(Action::Send(message::error_message(UNREADABLE_ERROR)));
                    }
                }
                return;
            }
        };
        let was_suspended = std::mem::replace(&mut session.suspended, false);
        session.last_received = now;
        session.sent_since_answer = 0;
        // The human part is moved, not copied, into the delivered text (the
        // delivered String was never wiped anyway; the TLV bytes are).
        let mut received = received;
        let (human, tlvs) = match tlv::take_plaintext(&mut received.plaintext) {
            Ok(x) => x,
            Err(e) => {
                // Authentic but malformed TLVs: keep the text, drop the TLVs.
                tracing::debug!(cause = %e, "malformed TLVs in an authentic message");
                let human = received
                    .plaintext
                    .split(|&b| b == 0)
                    .next()
                    .unwrap_or_default()
                    .to_vec();
                (human, Vec::new())
            }
        };
        let disconnected = tlvs.iter().any(|t| t.typ == tlv::types::DISCONNECTED);
        // SMP TLVs drive the SMP state machine; its replies go out in one
        // data message (empty human part, IGNORE_UNREADABLE).
        let mut smp_reply = Vec::new();
        let mut smp_notices = Vec::new();
        if !disconnected {
            for t in tlvs
                .iter()
                .filter(|t| (tlv::types::SMP1..=tlv::types::SMP1Q).contains(&t.typ))
            {
                let step = smp_state.handle_tlv(t, rng);
                smp_reply.extend(step.reply);
                if let Some(ev) = step.event {
                    // Only here: the fingerprint is a SHA-1 over the
                    // peer's public key, not worth doing per message.
                    smp_notices.push(smp_notice(ev, &session.fingerprint()));
                }
            }
        } else {
            smp_state.reset();
        }
        let smp = !smp_reply.is_empty();
        let extra = tlvs
            .iter()
            .find(|t| t.typ == tlv::types::EXTRA_SYMMETRIC_KEY)
            .map(|t| {
                t.value
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0)
            });

        // Heartbeat or SMP answer, encrypted under the rotated keys.
        let mut replies = Vec::new();
        if !disconnected {
            if smp {
                let body = tlv::join_plaintext(b"", &smp_reply);
                replies.push(encrypt(
                    session,
                    FLAG_IGNORE_UNREADABLE,
                    &body,
                    now,
                    rng,
                    Vec::new(),
                ));
            } else if self.cfg.heartbeat_secs > 0
                && now.saturating_sub(session.last_sent) >= self.cfg.heartbeat_secs
            {
                replies.push(encrypt(
                    session,
                    FLAG_IGNORE_UNREADABLE,
                    b"",
                    now,
                    rng,
                    Vec::new(),
                ));
            }
        }
        if disconnected {
            out.push(Action::Forget { instance: tag });
        } else {
            out.push(Action::Persist(Persist {
                instance: tag,
                snapshot: session.snapshot_cached(),
            }));
        }
        if was_suspended {
            out.push(Action::Notify(Notice::Resumed { instance: tag }));
        }
        if received.skipped > 0 {
            out.push(Action::Notify(Notice::Missing {
                count: received.skipped,
            }));
        }
        if !human.is_empty() {
            out.push(Action::Deliver(Delivery {
                text: utf8_text(human),
                encrypted: true,
                instance: tag,
                offline: was_suspended,
                order: Some(Order {
                    ssid: session.ssid,
                    position: received.position,
                    skipped: received.skipped,
                    late: received.late,
                }),
            }));
        }
        for r in &replies {
            self.push_sealed(r, out);
        }
        out.extend(smp_notices.into_iter().map(Action::Notify));
        if let Some(usage) = extra {
            out.push(Action::Notify(Notice::ExtraKeyRequested { usage }));
        }
        if disconnected {
            if let Some(inst) = self.instances.get_mut(&tag) {
                inst.msg = MsgState::Finished;
            }
            out.push(Action::Notify(Notice::PeerEnded));
            self.select_best();
        } else {
            self.selected = Some(tag);
            if was_suspended {
                self.flush_held(now, rng, out);
            }
        }
    }
}

/// SMP (spec §"The SMP state machine"): user requests. Each runs on one
/// encrypted instance; its messages go out as data messages with an empty
/// human part and IGNORE_UNREADABLE, after an [`Action::Persist`]. The SMP
/// state is not part of the EKM snapshot: an exchange in progress is
/// abandoned when the session is suspended, restored, refreshed or ended.
impl Conversation {
    /// The user starts SMP on the selected encrypted session with `secret`
    /// (and optionally a question shown to the peer). Sends SMP message 1
    /// (or 1Q), preceded by an abort if an exchange was under way. Returns
    /// nothing if no session is private.
    pub fn handle_smp_start<R: CryptoRng + ?Sized>(
        &mut self,
        secret: &str,
        question: Option<&str>,
        now: u64,
        rng: &mut R,
    ) -> Out {
        let mut out = Vec::new();
        let Some(tag) = self.selected else {
            return out;
        };
        let Some(ctx) = self.smp_context(tag) else {
            return out;
        };
        let Some(inst) = self.instances.get_mut(&tag) else {
            return out;
        };
        let tlvs = inst.smp.start(&ctx, secret.as_bytes(), question, rng);
        self.send_smp(tag, &tlvs, now, rng, &mut out);
        out
    }

    /// The user answers the peer's SMP request with `secret`: sends SMP
    /// message 2. Returns nothing if no request waits for an answer (see
    /// [`Self::smp_pending_request`]).
    pub fn handle_smp_answer<R: CryptoRng + ?Sized>(
        &mut self,
        secret: &str,
        now: u64,
        rng: &mut R,
    ) -> Out {
        let mut out = Vec::new();
        let Some(tag) = self.smp_request_instance() else {
            return out;
        };
        let Some(ctx) = self.smp_context(tag) else {
            return out;
        };
        let Some(inst) = self.instances.get_mut(&tag) else {
            return out;
        };
        match inst.smp.answer(&ctx, secret.as_bytes(), rng) {
            Ok(tlvs) => self.send_smp(tag, &tlvs, now, rng, &mut out),
            Err(e) => tracing::debug!(cause = %e, "SMP answer refused"),
        }
        out
    }

    /// The user aborts SMP: sends an SMP abort on every encrypted instance
    /// with an exchange under way (or, if none, on the selected one) and
    /// resets their SMP state.
    pub fn handle_smp_abort<R: CryptoRng + ?Sized>(&mut self, now: u64, rng: &mut R) -> Out {
        let _ = rng;
        let mut out = Vec::new();
        let mut tags: Vec<u32> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                matches!(i.msg, MsgState::Encrypted(_))
                    && i.smp.phase() != super::smp::SmpPhase::Expect1
            })
            .map(|(t, _)| *t)
            .collect();
        if tags.is_empty() {
            tags.extend(self.selected);
        }
        for tag in tags {
            let Some(inst) = self.instances.get_mut(&tag) else {
                continue;
            };
            let tlvs = inst.smp.abort();
            self.send_smp(tag, &tlvs, now, rng, &mut out);
        }
        out
    }

    /// Whether a peer's SMP request waits for our answer, and its question
    /// (`Some(None)`: a request without a question).
    pub fn smp_pending_request(&self) -> Option<Option<String>> {
        let tag = self.smp_request_instance()?;
        let smp = &self.instances.get(&tag)?.smp;
        Some(smp.pending_question().map(str::to_owned))
    }

    /// Whether an SMP exchange is under way on any instance.
    pub fn smp_in_progress(&self) -> bool {
        self.instances
            .values()
            .any(|i| i.smp.phase() != super::smp::SmpPhase::Expect1)
    }

    /// The instance whose SMP request awaits an answer: the selected one
    /// if it has one, else any.
    fn smp_request_instance(&self) -> Option<u32> {
        let waiting = |tag: &u32| {
            self.instances.get(tag).is_some_and(|i| {
                matches!(i.msg, MsgState::Encrypted(_)) && i.smp.is_awaiting_secret()
            })
        };
        self.selected
            .filter(waiting)
            .or_else(|| self.instances.keys().copied().find(waiting))
    }

    /// Fingerprints and ssid of the encrypted session on `tag`.
    fn smp_context(&self, tag: u32) -> Option<SmpContext> {
        let MsgState::Encrypted(s) = &self.instances.get(&tag)?.msg else {
            return None;
        };
        Some(SmpContext {
            our_fingerprint: self.long_term.public_key().fingerprint().0,
            their_fingerprint: s.fingerprint().0,
            ssid: s.ssid,
        })
    }

    /// Encrypt `tlvs` (empty human part, IGNORE_UNREADABLE) on `tag`:
    /// persist, then send.
    fn send_smp<R: CryptoRng + ?Sized>(
        &mut self,
        tag: u32,
        tlvs: &[Tlv],
        now: u64,
        rng: &mut R,
        out: &mut Out,
    ) {
        let Some(inst) = self.instances.get_mut(&tag) else {
            return;
        };
        let MsgState::Encrypted(s) = &mut inst.msg else {
            return;
        };
        let resumed = std::mem::replace(&mut s.suspended, false);
        let body = tlv::join_plaintext(b"", tlvs);
        let msg = encrypt(s, FLAG_IGNORE_UNREADABLE, &body, now, rng, Vec::new());
        out.push(Action::Persist(Persist {
            instance: tag,
            snapshot: s.snapshot_cached(),
        }));
        if resumed {
            out.push(Action::Notify(Notice::Resumed { instance: tag }));
        }
        self.push_sealed(&msg, out);
    }
}

/// The user-facing notice for an SMP event on a session with `theirs`.
fn smp_notice(ev: SmpEvent, theirs: &Fingerprint) -> Notice {
    match ev {
        SmpEvent::Requested { question } => Notice::SmpRequested { question },
        SmpEvent::InProgress => Notice::SmpInProgress,
        SmpEvent::Succeeded => Notice::SmpSucceeded {
            fingerprint: *theirs,
        },
        SmpEvent::Failed => Notice::SmpFailed,
        SmpEvent::Aborted => Notice::SmpAborted,
        SmpEvent::Invalid(e) => Notice::SmpError {
            reason: e.to_string(),
        },
    }
}

/// Whether a data message names keys older than the two of each side the
/// ratchet still holds, so that the peer sent it before a message we already
/// read. The peer's keyids never go back: it sends with its newest key we
/// acknowledged and to our newest key it has seen, and we only rotate ours
/// when a message names our newest one. Within one session such a message
/// is a late copy (a server re-delivering after a crash), never something
/// the peer sends now. Keyids start over with every AKE, so the caller also
/// needs to know the message is older than the session's last receipt.
/// (Keyid 0 is no key at all: malformed, not old.)
fn predates_keys(ratchet: &KeyRatchet, d: &DataMessage) -> bool {
    d.sender_keyid != 0
        && d.recipient_keyid != 0
        && (d.recipient_keyid.saturating_add(1) < ratchet.our_keyid()
            || d.sender_keyid.saturating_add(1) < ratchet.their_keyid())
}

fn data_header(version: Version, ours: u32, theirs: u32) -> Header {
    match version {
        Version::V2 => Header {
            version,
            sender_tag: 0,
            receiver_tag: 0,
        },
        Version::V3 => Header {
            version,
            sender_tag: ours,
            receiver_tag: theirs,
        },
    }
}

/// The delivered text: the bytes as they are when they are valid UTF-8
/// (the common case, validated without copying), else with U+FFFD for
/// each invalid sequence.
fn utf8_text(human: Vec<u8>) -> String {
    match String::from_utf8(human) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// A data message we encrypted, in its binary encoding
/// ([`KeyRatchet::encrypt_encoded`]), with the header it was encoded for.
struct Sealed {
    header: Header,
    bytes: Vec<u8>,
}

/// Encrypt `plaintext` on `s` as an encoded data message, in `buf`
/// (emptied first; its allocation is reused).
fn encrypt<R: CryptoRng + ?Sized>(
    s: &mut EncryptedSession,
    flags: u8,
    plaintext: &[u8],
    now: u64,
    rng: &mut R,
    buf: Vec<u8>,
) -> Sealed {
    let msg = encrypt_last(s, flags, plaintext, now, buf);
    s.ratchet.prepare_answer(rng);
    msg
}

/// [`encrypt`] without preparing for an answer (the session's last
/// message).
fn encrypt_last(
    s: &mut EncryptedSession,
    flags: u8,
    plaintext: &[u8],
    now: u64,
    buf: Vec<u8>,
) -> Sealed {
    let header = data_header(s.version, s.our_tag, s.their_tag);
    s.ratchet.expire_retired(now);
    let bytes = s.ratchet.encrypt_encoded(&header, flags, plaintext, buf);
    s.last_sent = now;
    Sealed { header, bytes }
}

/// Where a reassembled text stands among the peer's data messages (keyids,
/// then counter; texts that are not data messages last), so that two
/// messages completed by one fragment are handled oldest first: the
/// counter check refuses an older one after a newer.
fn message_age(whole: &str) -> (bool, u32, u32, u64) {
    match message::parse(whole) {
        Ok(Message::Encoded(EncodedMessage {
            body: Body::Data(d),
            ..
        })) => (
            false,
            d.sender_keyid,
            d.recipient_keyid,
            u64::from_be_bytes(d.ctr),
        ),
        _ => (true, 0, 0, 0),
    }
}

/// The ssid as two 32-bit hex words; the half the user reads aloud is
/// marked with asterisks (the spec shows it in bold).
pub fn format_ssid(ssid: &[u8; 8], we_initiated: bool) -> String {
    let a = hex(&ssid[..4]);
    let b = hex(&ssid[4..]);
    if we_initiated {
        format!("*{a}* {b}")
    } else {
        format!("{a} *{b}*")
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
