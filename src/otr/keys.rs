//! The data-message key ratchet (spec §"Key management", §"Computing AES
//! keys, MAC keys…" and §"Revealing MAC keys").
//!
//! [`KeyRatchet`] keeps what the spec keeps — our two most recent DH key
//! pairs and their two most recent public keys — plus, per key pairing,
//! the send counter, the highest counter received, a replay window, and the
//! receiving MAC key once it has verified a message (so it can be revealed
//! when the pairing is forgotten, without recomputing the shared secret).
//! Unlike the spec, a key a ratchet step retires is kept a short while for
//! messages the server hands over late, and the MAC keys of its pairings are
//! revealed only when it goes ([`retired`]).
//!
//! Session keys are derived lazily and cached in memory; the cache is never
//! persisted. This is also the O2TR EKM state: [`KeyRatchet::encode`] writes
//! everything needed to verify, decrypt and answer messages after a restart.
//!
//! The ratchet also keeps the last EKM snapshot encoded from it (by
//! [`EncryptedSession::snapshot_cached`](super::offline::EncryptedSession::snapshot_cached)):
//! between two key changes only the counters, replay windows, used MAC keys
//! and the keys to reveal change, so the next snapshot rewrites those in
//! place instead of encoding ~1.6 KiB field by field. Every change of
//! anything else (a rotation, a derived pairing, the next key pair) drops
//! the kept snapshot first, which also wipes the secrets it held.

use std::borrow::Cow;

use rand_core::CryptoRng;
use zeroize::{Zeroize, Zeroizing};

use super::codec::{Overwriter, Reader, Sink, Writer};
use super::crypto::{
    AesCtrKey, DhKeyPair, DhPublicKey, HmacSha1Key, SecretBytes, ct_eq, h1, h2, sha1,
};
use super::error::{Error, PeerMisbehaved};
use super::message::{DataFields, DataMessage, Header, MacScratch, encode_data};

pub mod retired;

use retired::{RETIRED_SECS, Retired, RetiredPairing};

/// Length of one revealed MAC key.
pub const MAC_KEY_BYTES: usize = 20;

/// Keys for one (our key, their key) pairing, prepared for use: the AES
/// key schedules and HMAC states are computed once here, not per message.
struct SessionKeys {
    /// The raw keys everything else is computed from (format-3 snapshots
    /// store these three).
    send_aes_key: [u8; 16],
    recv_aes_key: [u8; 16],
    send_aes: AesCtrKey,
    send_mac: HmacSha1Key,
    recv_aes: AesCtrKey,
    recv_mac: HmacSha1Key,
    /// The receiving MAC key itself, revealed once the pairing is forgotten.
    recv_mac_key: [u8; 20],
    extra: [u8; 32],
}

impl Drop for SessionKeys {
    fn drop(&mut self) {
        // The prepared AES and HMAC states wipe themselves.
        self.send_aes_key.zeroize();
        self.recv_aes_key.zeroize();
        self.recv_mac_key.zeroize();
        self.extra.zeroize();
    }
}

impl SessionKeys {
    fn derive(ours: &DhKeyPair, theirs: &DhPublicKey) -> Self {
        let s = ours.shared_secret(theirs);
        let (send_byte, recv_byte) = if ours.public() > theirs {
            (0x01, 0x02)
        } else {
            (0x02, 0x01)
        };
        let mut send_aes = Zeroizing::new([0u8; 16]);
        let mut recv_aes = Zeroizing::new([0u8; 16]);
        send_aes.copy_from_slice(&h1(send_byte, &s)[..16]);
        recv_aes.copy_from_slice(&h1(recv_byte, &s)[..16]);
        Self::from_raw(&send_aes, &recv_aes, &h2(0xff, &s))
    }

    /// The spec's MAC keys are SHA-1 of the AES keys; everything else is
    /// prepared from the three raw keys.
    fn from_raw(send_aes: &[u8; 16], recv_aes: &[u8; 16], extra: &[u8; 32]) -> Self {
        let send_mac = Zeroizing::new(sha1(send_aes));
        let recv_mac = Zeroizing::new(sha1(recv_aes));
        SessionKeys {
            send_aes_key: *send_aes,
            recv_aes_key: *recv_aes,
            send_aes: AesCtrKey::new(send_aes),
            send_mac: HmacSha1Key::new(&*send_mac),
            recv_aes: AesCtrKey::new(recv_aes),
            recv_mac: HmacSha1Key::new(&*recv_mac),
            recv_mac_key: *recv_mac,
            extra: *extra,
        }
    }
}

/// Durable per-pairing state.
#[derive(Clone, Default)]
struct Pairing {
    /// Top half of the last counter we sent under this pairing.
    send_ctr: u64,
    /// Highest counter received under this pairing.
    recv_ctr: u64,
    /// Which of the [`REPLAY_WINDOW`] counters below `recv_ctr` were
    /// received: bit `k` stands for `recv_ctr - 1 - k`. A message older
    /// than the newest one is accepted once if its bit is clear, because
    /// servers do not keep order (ejabberd hands a reconnecting client the
    /// messages that arrive live before those it flushes from offline
    /// storage); the bit refuses its replay. Its MAC key is still secret:
    /// a pairing's key is revealed only when the pairing is forgotten.
    seen: u64,
    /// The receiving MAC key, once it verified a message.
    used_recv_mac: Option<[u8; 20]>,
}

impl Pairing {
    /// Whether `ctr` may be accepted: newer than every counter received,
    /// or within the window and not received yet. Returns whether it is
    /// late and the window after accepting it; changes nothing.
    fn check_counter(&self, ctr: u64) -> Result<(bool, u64), PeerMisbehaved> {
        if ctr > self.recv_ctr {
            let shift = ctr - self.recv_ctr;
            // The old newest counter becomes bit `shift - 1` (none before
            // the first message: counters start at 1).
            let moved = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            let newest = if self.recv_ctr > 0 && shift <= REPLAY_WINDOW {
                1u64 << (shift - 1)
            } else {
                0
            };
            return Ok((false, moved | newest));
        }
        let age = self.recv_ctr - ctr;
        if age == 0 || age > REPLAY_WINDOW {
            return Err(PeerMisbehaved::CounterReused);
        }
        let bit = 1u64 << (age - 1);
        if self.seen & bit != 0 {
            return Err(PeerMisbehaved::CounterReused);
        }
        Ok((true, self.seen | bit))
    }
}

impl Drop for Pairing {
    fn drop(&mut self) {
        if let Some(k) = self.used_recv_mac.as_mut() {
            k.zeroize();
        }
    }
}

/// A decrypted data message and what it changed.
pub struct Received {
    /// The decrypted plaintext (human part, NUL, TLVs).
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Whether our key was acknowledged and rotated.
    pub rotated_ours: bool,
    /// Whether their key advanced.
    pub rotated_theirs: bool,
    /// The extra symmetric key of the pairing that carried the message.
    pub extra_key: Zeroizing<[u8; 32]>,
    /// Counter values skipped under this key pairing: senders count 1, 2,
    /// 3… per pairing (libotr, python-potr and this crate), so a jump means
    /// that many messages before this one never arrived (a lower bound:
    /// losses just before a key change cannot be seen).
    pub skipped: u64,
    /// Whether a newer message under the same pairing was received before
    /// this one (it fills a gap that `skipped` once reported).
    pub late: bool,
    /// Where the message stands in the peer's sending order.
    pub position: Position,
}

/// A data message's place in its sender's order within one session:
/// (sender keyid, recipient keyid, counter). The sender's two keyids never
/// decrease and its counter increases within a pairing, so comparing
/// positions compares sending times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The sender's keyid.
    pub sender_keyid: u32,
    /// Our keyid the sender used.
    pub recipient_keyid: u32,
    /// The counter.
    pub ctr: u64,
}

/// How many counters below the newest one a pairing remembers (see
/// `Pairing::seen`); an older message is refused as a replay.
pub const REPLAY_WINDOW: u64 = 64;

/// Our two latest DH key pairs, their two latest public keys, counters.
pub struct KeyRatchet {
    our_keyid: u32,
    our_current: DhKeyPair,
    our_previous: DhKeyPair,
    their_keyid: u32,
    their_current: DhPublicKey,
    their_previous: Option<DhPublicKey>,
    /// `[i][j]`: i = 0 → our previous key, 1 → our current; j likewise for theirs.
    pairings: [[Pairing; 2]; 2],
    cache: [[Option<Box<SessionKeys>>; 2]; 2],
    /// Our next DH key pair, generated when we send (see
    /// [`KeyRatchet::encrypt`]) so that the rotation on receipt — for a
    /// restored session, on its first offline message — needs no key
    /// generation. As secret as our current keys, wiped the same way.
    next: Option<DhKeyPair>,
    /// Generations a ratchet step retired, still reading late messages
    /// (see [`retired`]).
    retired: Retired,
    /// Receiving MAC keys to reveal in the next data message we send.
    to_reveal: Zeroizing<Vec<u8>>,
    /// The last EKM snapshot encoded from this ratchet, while only its
    /// counters and keys to reveal can have changed (see the module docs).
    kept: Option<KeptSnapshot>,
}

/// A whole EKM snapshot (session fields, then the ratchet's encoding) and
/// where the parts of the ratchet that change between key changes lie.
struct KeptSnapshot {
    bytes: SecretBytes,
    /// Length of what the session writes before the ratchet.
    prefix_len: usize,
    /// Where the pairings (counters, replay windows, used MAC keys) are.
    pairings_at: usize,
    pairings_len: usize,
    /// Where the keys to reveal (a DATA field, the last one) start.
    reveal_at: usize,
}

/// Where, in an encoding written by [`KeyRatchet::encode_marked`], the
/// parts that change between key changes start (offsets in the writer).
#[derive(Clone, Copy, Debug)]
pub struct SnapshotMarks {
    pairings_at: usize,
    reveal_at: usize,
}

/// Writes the pairings (format 4: counters, replay window, used MAC key).
fn put_pairings(pairings: &[[Pairing; 2]; 2], out: &mut impl Sink) {
    for p in pairings.iter().flatten() {
        // The counters, window and flag in one piece (none is secret):
        // this is rewritten for every message.
        let mut fixed = [0u8; 25];
        fixed[..8].copy_from_slice(&p.send_ctr.to_be_bytes());
        fixed[8..16].copy_from_slice(&p.recv_ctr.to_be_bytes());
        fixed[16..24].copy_from_slice(&p.seen.to_be_bytes());
        fixed[24] = u8::from(p.used_recv_mac.is_some());
        out.put_raw(&fixed);
        if let Some(k) = &p.used_recv_mac {
            out.put_raw(k);
        }
    }
}

/// Length of [`put_pairings`]' output.
fn pairings_len(pairings: &[[Pairing; 2]; 2]) -> usize {
    pairings
        .iter()
        .flatten()
        .map(|p| 24 + 1 + p.used_recv_mac.map_or(0, |m| m.len()))
        .sum()
}

/// Writes the MAC keys to reveal as a DATA field.
fn put_reveal(to_reveal: &[u8], out: &mut impl Sink) {
    // Our own buffer, far below 4 GiB (as `Writer::data`).
    out.put_raw(
        &u32::try_from(to_reveal.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.put_raw(to_reveal);
}

impl KeyRatchet {
    /// The state right after an AKE: our AKE key becomes `our_dh[1]`, a
    /// fresh key `our_dh[2]`, their AKE key `their_y[their_keyid]`.
    pub fn after_ake<R: CryptoRng + ?Sized>(
        our_ake_dh: DhKeyPair,
        their_dh: DhPublicKey,
        their_keyid: u32,
        rng: &mut R,
    ) -> Self {
        KeyRatchet {
            our_keyid: super::ake::AKE_KEYID + 1,
            our_current: DhKeyPair::generate(rng),
            our_previous: our_ake_dh,
            their_keyid,
            their_current: their_dh,
            their_previous: None,
            pairings: Default::default(),
            cache: Default::default(),
            next: None,
            retired: Retired::default(),
            to_reveal: Zeroizing::new(Vec::new()),
            kept: None,
        }
    }

    /// Our most recent keyid.
    pub fn our_keyid(&self) -> u32 {
        self.our_keyid
    }

    /// Their most recent keyid.
    pub fn their_keyid(&self) -> u32 {
        self.their_keyid
    }

    /// Counter of the last message sent under the current sending pairing.
    pub fn send_counter(&self) -> u64 {
        self.pairings[0][1].send_ctr
    }

    fn keys(&mut self, i: usize, j: usize) -> Result<&SessionKeys, Error> {
        self.derive_keys(i, j)?;
        self.cache[i][j]
            .as_deref()
            .ok_or(Error::Peer(PeerMisbehaved::UnknownKeyids))
    }

    /// Derives and caches the keys of pairing `[i][j]` unless cached.
    fn derive_keys(&mut self, i: usize, j: usize) -> Result<(), Error> {
        if self.cache[i][j].is_none() {
            let ours = if i == 1 {
                &self.our_current
            } else {
                &self.our_previous
            };
            let theirs = if j == 1 {
                &self.their_current
            } else {
                self.their_previous
                    .as_ref()
                    .ok_or(PeerMisbehaved::UnknownKeyids)?
            };
            self.cache[i][j] = Some(Box::new(SessionKeys::derive(ours, theirs)));
            self.kept = None;
        }
        Ok(())
    }

    /// Encrypt `plaintext` as a data message (spec "When you send a Data
    /// Message"). Advances the send counter; the caller must persist the
    /// ratchet before the message leaves. Callers that expect an answer
    /// call [`KeyRatchet::prepare_answer`] next.
    pub fn encrypt(&mut self, header: &Header, flags: u8, plaintext: &[u8]) -> DataMessage {
        let ctr_value = self.pairings[0][1].send_ctr.wrapping_add(1);
        self.pairings[0][1].send_ctr = ctr_value;
        let ctr = ctr_value.to_be_bytes();
        let next_dh = self.our_current.public().to_mpi();
        let sender_keyid = self.our_keyid - 1;
        let recipient_keyid = self.their_keyid;
        let revealed = std::mem::take(&mut *self.to_reveal);
        // Pairing (our previous, their current) always exists.
        let keys = match self.keys(0, 1) {
            Ok(k) => k,
            Err(_) => unreachable_pairing(),
        };
        let mut encrypted = plaintext.to_vec();
        keys.send_aes.apply(&ctr, &mut encrypted);
        let mut msg = DataMessage {
            flags,
            sender_keyid,
            recipient_keyid,
            next_dh,
            ctr,
            encrypted,
            mac: [0; 20],
            revealed_mac_keys: revealed,
        };
        let mut scratch = MacScratch::default();
        let mac = keys.send_mac.mac(&msg.mac_input(header, &mut scratch));
        msg.mac = mac;
        msg
    }

    /// [`KeyRatchet::encrypt`] straight to the binary encoding (see
    /// [`encode_data`]): the same bytes as encoding the message `encrypt`
    /// returns, with one buffer and one copy of the text. The data path
    /// of [`Conversation`](super::conversation::Conversation) uses this.
    /// The encoding goes into `buf` (emptied first; see [`encode_data`]).
    pub fn encrypt_encoded(
        &mut self,
        header: &Header,
        flags: u8,
        plaintext: &[u8],
        buf: Vec<u8>,
    ) -> Vec<u8> {
        let ctr_value = self.pairings[0][1].send_ctr.wrapping_add(1);
        self.pairings[0][1].send_ctr = ctr_value;
        let ctr = ctr_value.to_be_bytes();
        let revealed = std::mem::take(&mut *self.to_reveal);
        // Pairing (our previous, their current) always exists.
        if self.derive_keys(0, 1).is_err() {
            unreachable_pairing();
        }
        let Some(keys) = self.cache[0][1].as_deref() else {
            unreachable_pairing()
        };
        let fields = DataFields {
            flags,
            sender_keyid: self.our_keyid - 1,
            recipient_keyid: self.their_keyid,
            next_dh: self.our_current.public().as_mpi(),
            ctr,
        };
        encode_data(
            header,
            &fields,
            plaintext,
            &revealed,
            |ciphertext| keys.send_aes.apply(&ctr, ciphertext),
            |authenticated| keys.send_mac.mac(&[authenticated]),
            buf,
        )
    }

    /// Prepares for the peer's answer to what we sent: that answer comes
    /// under (our current key, their current key) — the key we announce as
    /// `next_dh`, and theirs — so those session keys are derived now unless
    /// they are already, and our next key pair is generated unless there is
    /// one (the receipt of the answer rotates to it). Both go into the
    /// snapshot persisted with the message, so when we go offline now the
    /// first offline message needs no exponentiation and no key generation.
    /// Live traffic does the same work as before (the receipt would have
    /// derived that pairing and generated that key), only earlier; in a
    /// one-way burst it is done once.
    pub fn prepare_answer<R: CryptoRng + ?Sized>(&mut self, rng: &mut R) {
        // Pairing (our current, their current) always exists.
        if self.derive_keys(1, 1).is_err() {
            unreachable_pairing();
        }
        if self.next.is_none() {
            self.next = Some(DhKeyPair::generate(rng));
            self.kept = None;
        }
    }

    /// Verify and decrypt a data message (spec "When you receive a Data
    /// Message"), then rotate keys as the spec says. Nothing changes unless
    /// every check passes, except that retired generations past their time
    /// at `now` (unix seconds) are dropped (see [`retired`]). A message
    /// under a retired generation is read too, and rotates nothing.
    pub fn decrypt<R: CryptoRng + ?Sized>(
        &mut self,
        header: &Header,
        msg: &DataMessage,
        now: u64,
        rng: &mut R,
    ) -> Result<Received, Error> {
        self.open(header, Cow::Borrowed(msg), now, rng)
    }

    /// [`KeyRatchet::decrypt`] of a message we own: its ciphertext buffer
    /// becomes the plaintext (decrypted in place, not copied).
    pub fn decrypt_owned<R: CryptoRng + ?Sized>(
        &mut self,
        header: &Header,
        msg: DataMessage,
        now: u64,
        rng: &mut R,
    ) -> Result<Received, Error> {
        self.open(header, Cow::Owned(msg), now, rng)
    }

    /// Drops the retired generations past their time at `now` and reveals
    /// the MAC keys of their pairings in the next message. Senders call
    /// this before encrypting. Returns whether anything was dropped.
    pub fn expire_retired(&mut self, now: u64) -> bool {
        if self.retired.is_empty() {
            return false;
        }
        let live_ours = [self.our_keyid, self.our_keyid - 1];
        let live_theirs = [
            Some(self.their_keyid),
            self.their_previous
                .as_ref()
                .and(self.their_keyid.checked_sub(1)),
        ];
        let dropped = self
            .retired
            .expire(now, live_ours, live_theirs, &mut self.to_reveal);
        if dropped {
            self.kept = None;
        }
        dropped
    }

    /// Where the live pairing for these keyids is in `pairings`.
    fn live_pairing(&self, msg: &DataMessage) -> Option<(usize, usize)> {
        let i = if msg.recipient_keyid == self.our_keyid {
            1
        } else if Some(msg.recipient_keyid) == self.our_keyid.checked_sub(1) {
            0
        } else {
            return None;
        };
        let j = if msg.sender_keyid == self.their_keyid {
            1
        } else if Some(msg.sender_keyid) == self.their_keyid.checked_sub(1)
            && self.their_previous.is_some()
        {
            0
        } else {
            return None;
        };
        Some((i, j))
    }

    fn open<R: CryptoRng + ?Sized>(
        &mut self,
        header: &Header,
        msg: Cow<'_, DataMessage>,
        now: u64,
        rng: &mut R,
    ) -> Result<Received, Error> {
        self.expire_retired(now);
        let Some((i, j)) = self.live_pairing(&msg) else {
            // No retired key has keyid 0 either.
            return self.open_retired(header, msg);
        };
        if msg.sender_keyid == 0 || msg.recipient_keyid == 0 {
            return Err(PeerMisbehaved::ZeroKeyid.into());
        }
        self.derive_keys(i, j)?;
        let Some(keys) = self.cache[i][j].as_deref() else {
            return Err(PeerMisbehaved::UnknownKeyids.into());
        };
        let checked = check(keys, &self.pairings[i][j], header, &msg)?;
        // Validate their next key before changing anything.
        let next = if j == 1 {
            Some(DhPublicKey::from_mpi(&msg.next_dh)?)
        } else {
            None
        };
        let mut received = accept(keys, &mut self.pairings[i][j], msg, checked);

        let rotated_ours = i == 1;
        if rotated_ours {
            self.rotate_ours(now, rng);
        }
        let rotated_theirs = next.is_some();
        if let Some(next) = next {
            self.rotate_theirs(next, now);
        }
        received.rotated_ours = rotated_ours;
        received.rotated_theirs = rotated_theirs;
        Ok(received)
    }

    /// A message under keys a ratchet step retired (see [`retired`]):
    /// verified and decrypted like any other, its counter checked against
    /// the kept pairing's window; no key moves.
    fn open_retired(
        &mut self,
        header: &Header,
        msg: Cow<'_, DataMessage>,
    ) -> Result<Received, Error> {
        let (ours_id, theirs_id) = (msg.recipient_keyid, msg.sender_keyid);
        let ours = if ours_id == self.our_keyid {
            Some(&self.our_current)
        } else if ours_id == self.our_keyid - 1 {
            Some(&self.our_previous)
        } else {
            self.retired.our_pair(ours_id)
        };
        let theirs = if theirs_id == self.their_keyid {
            Some(&self.their_current)
        } else if Some(theirs_id) == self.their_keyid.checked_sub(1) {
            self.their_previous.as_ref()
        } else {
            None
        }
        .or_else(|| self.retired.their_key(theirs_id));
        let (Some(ours), Some(theirs)) = (ours, theirs) else {
            return Err(PeerMisbehaved::UnknownKeyids.into());
        };
        // Derived now if this pairing has no kept keys (a rare path: one
        // exponentiation per late pairing) and kept in memory even if the
        // message is forged, so forgeries cost no more than one each.
        let fresh = match self.retired.pairing(ours_id, theirs_id) {
            Some(p) if p.keys.is_some() => None,
            _ => Some(Box::new(SessionKeys::derive(ours, theirs))),
        };
        if let Some(keys) = fresh {
            self.retired.set_keys(ours_id, theirs_id, keys);
        }
        let Some(RetiredPairing {
            state,
            keys: Some(keys),
            ..
        }) = self.retired.pairing_mut(ours_id, theirs_id)
        else {
            return Err(PeerMisbehaved::UnknownKeyids.into());
        };
        let checked = check(keys, state, header, &msg)?;
        let received = accept(keys, state, msg, checked);
        self.kept = None;
        tracing::debug!(
            sender_keyid = theirs_id,
            recipient_keyid = ours_id,
            "a late message read under a retired key generation"
        );
        Ok(received)
    }

    /// He has seen our newest key: our previous one retires (see
    /// [`retired`]).
    fn rotate_ours<R: CryptoRng + ?Sized>(&mut self, now: u64, rng: &mut R) {
        // It holds the key pair retired here: wiped now.
        self.kept = None;
        let retiring = self.our_keyid - 1;
        let old = std::mem::take(&mut self.pairings[0]);
        self.pairings[0] = std::mem::take(&mut self.pairings[1]);
        self.cache[0] = std::mem::take(&mut self.cache[1]);
        let their_ids = [
            self.their_previous
                .as_ref()
                .and(self.their_keyid.checked_sub(1)),
            Some(self.their_keyid),
        ];
        for (state, theirs) in old.into_iter().zip(their_ids) {
            if let Some(theirs) = theirs {
                self.retired.keep_pairing(retiring, theirs, state);
            }
        }
        let fresh = match self.next.take() {
            Some(k) => k,
            None => DhKeyPair::generate(rng),
        };
        let current = std::mem::replace(&mut self.our_current, fresh);
        let previous = std::mem::replace(&mut self.our_previous, current);
        self.retired
            .retire_ours(retiring, previous, now.saturating_add(RETIRED_SECS));
        self.our_keyid += 1;
        self.expire_retired(now);
    }

    /// He advanced his key: his previous one retires.
    fn rotate_theirs(&mut self, next: DhPublicKey, now: u64) {
        self.kept = None;
        let retiring = self.their_keyid.saturating_sub(1);
        let our_ids = [self.our_keyid - 1, self.our_keyid];
        for (i, ours) in our_ids.into_iter().enumerate() {
            let state = std::mem::take(&mut self.pairings[i][0]);
            self.cache[i][0] = None;
            self.retired.keep_pairing(ours, retiring, state);
            let row = &mut self.pairings[i];
            row.swap(0, 1);
            let crow = &mut self.cache[i];
            crow.swap(0, 1);
        }
        let current = std::mem::replace(&mut self.their_current, next);
        if let Some(previous) = self.their_previous.replace(current) {
            self.retired
                .retire_theirs(retiring, previous, now.saturating_add(RETIRED_SECS));
        }
        self.their_keyid += 1;
        self.expire_retired(now);
    }

    /// Serialize the ratchet for the EKM snapshot (format 5). Format 2:
    /// each of our key pairs as its secret followed by its public value, so
    /// restoring needs no exponentiation. Format 3 adds, between the
    /// pairings and the MAC keys to reveal, the derived session keys of
    /// each pairing that has them (flag byte, then the sending and
    /// receiving AES keys and the extra symmetric key; the MAC keys are
    /// their SHA-1) and our pre-generated next key pair (flag byte, then
    /// secret and public value), so the first message after a restore
    /// needs no exponentiation either. Format 4 adds each pairing's replay
    /// window after its receiving counter. Format 5 adds, before the MAC
    /// keys to reveal, the retired generations (see [`retired`]).
    /// Contains secrets: the caller
    /// keeps the result in zeroizing memory.
    pub fn encode(&self, w: &mut Writer) {
        self.encode_marked(w);
    }

    /// [`KeyRatchet::encode`], returning where the parts that change
    /// between key changes start (for [`KeyRatchet::keep_snapshot`]).
    pub fn encode_marked(&self, w: &mut Writer) -> SnapshotMarks {
        w.int(self.our_keyid);
        for pair in [&self.our_current, &self.our_previous] {
            w.data(&pair.dangerous_secret_bytes());
            w.mpi(pair.public().as_mpi());
        }
        w.int(self.their_keyid);
        w.mpi(self.their_current.as_mpi());
        match &self.their_previous {
            Some(k) => {
                w.byte(1).mpi(k.as_mpi());
            }
            None => {
                w.byte(0);
            }
        }
        let pairings_at = w.as_slice().len();
        put_pairings(&self.pairings, w);
        for row in &self.cache {
            for k in row {
                match k {
                    Some(k) => {
                        w.byte(1)
                            .raw(&k.send_aes_key)
                            .raw(&k.recv_aes_key)
                            .raw(&k.extra);
                    }
                    None => {
                        w.byte(0);
                    }
                }
            }
        }
        match &self.next {
            Some(pair) => {
                w.byte(1).data(&pair.dangerous_secret_bytes());
                w.mpi(pair.public().as_mpi());
            }
            None => {
                w.byte(0);
            }
        }
        self.retired.encode(w);
        let reveal_at = w.as_slice().len();
        put_reveal(&self.to_reveal, w);
        SnapshotMarks {
            pairings_at,
            reveal_at,
        }
    }

    /// Keeps `bytes`, a whole EKM snapshot whose ratchet part was written
    /// by [`KeyRatchet::encode_marked`] after `prefix_len` bytes, for
    /// [`KeyRatchet::patched_snapshot`].
    pub fn keep_snapshot(&mut self, bytes: SecretBytes, prefix_len: usize, marks: SnapshotMarks) {
        self.kept = Some(KeptSnapshot {
            bytes,
            prefix_len,
            pairings_at: marks.pairings_at,
            pairings_len: pairings_len(&self.pairings),
            reveal_at: marks.reveal_at,
        });
    }

    /// The kept snapshot with this ratchet's part brought up to date (its
    /// bytes are then those [`KeyRatchet::encode`] writes now), if there
    /// is one for a prefix of `prefix_len` bytes and nothing but counters
    /// and keys to reveal changed since it was kept. The caller rewrites
    /// the prefix. Otherwise the kept snapshot is dropped and `None`
    /// returned: encode afresh.
    pub fn patched_snapshot(&mut self, prefix_len: usize) -> Option<&mut SecretBytes> {
        if !self.patch_kept(prefix_len) {
            self.kept = None;
            return None;
        }
        self.kept.as_mut().map(|k| &mut k.bytes)
    }

    /// Whether a snapshot is kept (tests: patching is exercised).
    #[cfg(test)]
    pub(crate) fn has_kept_snapshot(&self) -> bool {
        self.kept.is_some()
    }

    fn patch_kept(&mut self, prefix_len: usize) -> bool {
        let Some(k) = self.kept.as_mut() else {
            return false;
        };
        // The layout depends on which used MAC keys are present and on how
        // many keys there are to reveal; the rest cannot change while kept.
        if k.prefix_len != prefix_len
            || k.pairings_len != pairings_len(&self.pairings)
            || k.bytes.len() != k.reveal_at + 4 + self.to_reveal.len()
        {
            return false;
        }
        let Some((head, reveal)) = k.bytes.as_mut_slice().split_at_mut_checked(k.reveal_at) else {
            return false;
        };
        let Some(pairings) = head.get_mut(k.pairings_at..k.pairings_at + k.pairings_len) else {
            return false;
        };
        let mut out = Overwriter::new(pairings);
        put_pairings(&self.pairings, &mut out);
        if !out.finish() {
            return false;
        }
        let mut out = Overwriter::new(reveal);
        put_reveal(&self.to_reveal, &mut out);
        out.finish()
    }

    /// Length of [`KeyRatchet::encode`]'s output, so the snapshot buffer is
    /// allocated once at its final size: a regrowth would leave a copy of
    /// the secrets in freed memory, and spare capacity is wiped on drop
    /// for nothing.
    pub fn encoded_len(&self) -> usize {
        // A DATA field or an MPI (our public values are minimal).
        let field = |len: usize| 4 + len;
        let pair = |k: &DhKeyPair| field(DhKeyPair::SECRET_LEN) + field(k.public().as_mpi().len());
        let pairings = pairings_len(&self.pairings);
        let cached: usize = self
            .cache
            .iter()
            .flatten()
            .map(|k| 1 + k.as_ref().map_or(0, |_| 16 + 16 + 32))
            .sum();
        4 + pair(&self.our_current)
            + pair(&self.our_previous)
            + 4
            + field(self.their_current.as_mpi().len())
            + 1
            + self
                .their_previous
                .as_ref()
                .map_or(0, |k| field(k.as_mpi().len()))
            + pairings
            + cached
            + 1
            + self.next.as_ref().map_or(0, pair)
            + self.retired.encoded_len()
            + field(self.to_reveal.len())
    }

    /// Inverse of [`KeyRatchet::encode`] for snapshot `format` 1 to 5.
    /// Format-1 snapshots hold only our secrets: their public values are
    /// recomputed (two fixed-base exponentiations). Formats 1 and 2 have no
    /// derived keys and no next key pair: they are derived and generated
    /// when first needed, as before.
    pub fn decode(r: &mut Reader<'_>, format: u8) -> Result<Self, Error> {
        let with_publics = format >= 2;
        let our_keyid = r.int("our_keyid")?;
        if our_keyid < 2 {
            return Err(Error::Snapshot("our keyid below 2"));
        }
        let read_pair = |r: &mut Reader<'_>, what: &'static str| -> Result<DhKeyPair, Error> {
            let secret = r.data(what)?;
            if with_publics {
                let public = DhPublicKey::from_mpi(r.mpi(what)?)?;
                Ok(DhKeyPair::from_stored(secret, public)?)
            } else {
                Ok(DhKeyPair::from_secret_bytes(secret)?)
            }
        };
        let our_current = read_pair(r, "our_current")?;
        let our_previous = read_pair(r, "our_previous")?;
        let their_keyid = r.int("their_keyid")?;
        if their_keyid == 0 {
            return Err(Error::Snapshot("their keyid 0"));
        }
        let their_current = DhPublicKey::from_mpi(r.mpi("their_current")?)?;
        let their_previous = match r.byte("their_previous?")? {
            0 => None,
            1 => Some(DhPublicKey::from_mpi(r.mpi("their_previous")?)?),
            _ => return Err(Error::Snapshot("bad option flag")),
        };
        let mut pairings: [[Pairing; 2]; 2] = Default::default();
        for row in &mut pairings {
            for p in row.iter_mut() {
                p.send_ctr = u64::from_be_bytes(r.array("send_ctr")?);
                p.recv_ctr = u64::from_be_bytes(r.array("recv_ctr")?);
                // Before format 4 only newer counters were accepted.
                if format >= 4 {
                    p.seen = u64::from_be_bytes(r.array("seen")?);
                }
                p.used_recv_mac = match r.byte("mac?")? {
                    0 => None,
                    1 => Some(r.array("used_recv_mac")?),
                    _ => return Err(Error::Snapshot("bad option flag")),
                };
            }
        }
        let mut cache: [[Option<Box<SessionKeys>>; 2]; 2] = Default::default();
        let mut next = None;
        if format >= 3 {
            for row in &mut cache {
                for k in row.iter_mut() {
                    *k = match r.byte("keys?")? {
                        0 => None,
                        1 => {
                            let send = Zeroizing::new(r.array::<16>("send_aes")?);
                            let recv = Zeroizing::new(r.array::<16>("recv_aes")?);
                            let extra = Zeroizing::new(r.array::<32>("extra_key")?);
                            Some(Box::new(SessionKeys::from_raw(&send, &recv, &extra)))
                        }
                        _ => return Err(Error::Snapshot("bad option flag")),
                    };
                }
            }
            next = match r.byte("next?")? {
                0 => None,
                1 => Some(read_pair(r, "next")?),
                _ => return Err(Error::Snapshot("bad option flag")),
            };
        }
        let retired = if format >= 5 {
            Retired::decode(r)?
        } else {
            Retired::default()
        };
        let reveal = r.data("to_reveal")?;
        if reveal.len() % MAC_KEY_BYTES != 0 {
            return Err(Error::Snapshot("revealed keys not a multiple of 20"));
        }
        Ok(KeyRatchet {
            our_keyid,
            our_current,
            our_previous,
            their_keyid,
            their_current,
            their_previous,
            pairings,
            cache,
            next,
            retired,
            to_reveal: Zeroizing::new(reveal.to_vec()),
            kept: None,
        })
    }

    /// Whether the session keys a message with these keyids needs are
    /// already derived (the O2TR "non-first offline message" case).
    pub fn has_cached_keys(&self, sender_keyid: u32, recipient_keyid: u32) -> bool {
        let i = if recipient_keyid == self.our_keyid {
            1
        } else {
            0
        };
        let j = if sender_keyid == self.their_keyid {
            1
        } else {
            0
        };
        self.cache[i][j].is_some()
    }

    /// The extra symmetric key of the current sending pairing (spec
    /// §"Extra symmetric key").
    pub fn sending_extra_key(&mut self) -> Zeroizing<[u8; 32]> {
        match self.keys(0, 1) {
            Ok(k) => Zeroizing::new(k.extra),
            Err(_) => unreachable_pairing(),
        }
    }
}

/// A data message's counter and what accepting it does to its pairing's
/// replay window (from [`check`]).
struct Checked {
    ctr: u64,
    late: bool,
    seen: u64,
}

/// Verifies a data message's MAC under one pairing's keys and checks its
/// counter against the pairing's state; changes nothing.
fn check(
    keys: &SessionKeys,
    state: &Pairing,
    header: &Header,
    msg: &DataMessage,
) -> Result<Checked, Error> {
    let mut scratch = MacScratch::default();
    if !ct_eq(
        &keys.recv_mac.mac(&msg.mac_input(header, &mut scratch)),
        &msg.mac,
    ) {
        return Err(PeerMisbehaved::DataMacMismatch.into());
    }
    let ctr = u64::from_be_bytes(msg.ctr);
    if ctr == 0 {
        return Err(PeerMisbehaved::ZeroCounter.into());
    }
    let (late, seen) = state.check_counter(ctr)?;
    Ok(Checked { ctr, late, seen })
}

/// Decrypts a message [`check`] passed and records its receipt in the
/// pairing's state. No key moves (the caller rotates).
fn accept(
    keys: &SessionKeys,
    state: &mut Pairing,
    msg: Cow<'_, DataMessage>,
    Checked { ctr, late, seen }: Checked,
) -> Received {
    let position = Position {
        sender_keyid: msg.sender_keyid,
        recipient_keyid: msg.recipient_keyid,
        ctr,
    };
    let ctr_top = msg.ctr;
    let mut plaintext = Zeroizing::new(match msg {
        Cow::Borrowed(m) => m.encrypted.clone(),
        Cow::Owned(m) => m.encrypted,
    });
    keys.recv_aes.apply(&ctr_top, &mut plaintext);
    let skipped = if late { 0 } else { ctr - state.recv_ctr - 1 };
    state.recv_ctr = state.recv_ctr.max(ctr);
    state.seen = seen;
    state.used_recv_mac = Some(keys.recv_mac_key);
    Received {
        plaintext,
        rotated_ours: false,
        rotated_theirs: false,
        extra_key: Zeroizing::new(keys.extra),
        skipped,
        late,
        position,
    }
}

/// The sending pairing (our previous, their current) always has both keys:
/// `their_current` is never absent. Kept as a function so the invariant is
/// stated once.
#[cold]
fn unreachable_pairing() -> ! {
    unreachable!("the sending pairing always has both keys")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn ratchet(rng: &mut ChaCha20Rng) -> KeyRatchet {
        let ours = DhKeyPair::generate(rng);
        let theirs = DhKeyPair::generate(rng);
        KeyRatchet::after_ake(ours, theirs.public().clone(), 1, rng)
    }

    fn encoded(k: &KeyRatchet) -> Vec<u8> {
        let mut w = Writer::with_capacity(k.encoded_len());
        k.encode(&mut w);
        w.into_vec()
    }

    /// Where, in an encoding of `format` 3 or 4, each pairing's format-4
    /// replay window lies, and where the format-3 section (derived keys,
    /// next key pair) starts and ends.
    fn layout(enc: &[u8], format: u8) -> (Vec<usize>, usize, usize) {
        let mut r = Reader::new(enc);
        r.int("keyid").unwrap();
        for _ in 0..2 {
            r.data("secret").unwrap();
            r.mpi("public").unwrap();
        }
        r.int("their keyid").unwrap();
        r.mpi("their current").unwrap();
        if r.byte("flag").unwrap() == 1 {
            r.mpi("their previous").unwrap();
        }
        let mut windows = Vec::new();
        for _ in 0..4 {
            r.take(16, "counters").unwrap();
            if format >= 4 {
                windows.push(r.position());
                r.take(8, "window").unwrap();
            }
            if r.byte("flag").unwrap() == 1 {
                r.take(20, "mac").unwrap();
            }
        }
        let start = r.position();
        for _ in 0..4 {
            if r.byte("flag").unwrap() == 1 {
                r.take(64, "keys").unwrap();
            }
        }
        if r.byte("flag").unwrap() == 1 {
            r.data("secret").unwrap();
            r.mpi("public").unwrap();
        }
        (windows, start, r.position())
    }

    /// The format-4 encoding: the format-5 one without its retired
    /// generations (which lie between the format-3 section and the keys to
    /// reveal).
    fn as_format4(v5: &[u8]) -> Vec<u8> {
        let (_, _, end) = layout(v5, 4);
        let mut r = Reader::new(&v5[end..]);
        Retired::decode(&mut r).unwrap();
        let len = r.position();
        [&v5[..end], &v5[end + len..]].concat()
    }

    /// The format-3 encoding: the format-4 one without replay windows.
    fn as_format3(v4: &[u8]) -> Vec<u8> {
        let (windows, _, _) = layout(v4, 4);
        let mut out = v4.to_vec();
        for at in windows.iter().rev() {
            out.drain(*at..at + 8);
        }
        out
    }

    /// The format-2 encoding: the format-3 one without its section.
    fn as_format2(v3: &[u8]) -> Vec<u8> {
        let (_, start, end) = layout(v3, 3);
        [&v3[..start], &v3[end..]].concat()
    }

    fn header() -> Header {
        Header {
            version: super::super::message::Version::V3,
            sender_tag: 0x100,
            receiver_tag: 0x101,
        }
    }

    /// The format-1 encoding of the same ratchet: our key pairs as secrets
    /// only (what older snapshots hold).
    fn without_publics(v2: &[u8]) -> Vec<u8> {
        let mut r = Reader::new(v2);
        let mut w = Writer::with_capacity(v2.len());
        w.int(r.int("keyid").unwrap());
        for _ in 0..2 {
            w.data(r.data("secret").unwrap());
            r.mpi("public").unwrap();
        }
        w.raw(r.rest());
        w.into_vec()
    }

    #[test]
    fn encoding_round_trips_in_all_formats() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut k = ratchet(&mut rng);
        // Derived keys of two pairings and a next key pair, as after a send.
        k.encrypt(&header(), 0, b"x");
        k.prepare_answer(&mut rng);
        k.pairings[0][1].recv_ctr = 9;
        k.pairings[0][1].seen = 0b1011;
        let v5 = encoded(&k);
        let back = KeyRatchet::decode(&mut Reader::new(&v5), 5).unwrap();
        assert_eq!(encoded(&back), v5);
        assert_eq!(back.pairings[0][1].seen, 0b1011);

        // A format-4 encoding has no retired generations.
        let v4 = as_format4(&v5);
        assert_eq!(v4.len(), v5.len() - 3);
        let back = KeyRatchet::decode(&mut Reader::new(&v4), 4).unwrap();
        assert_eq!(as_format4(&encoded(&back)), v4);

        // A format-3 encoding has no replay windows: nothing older than
        // the newest counter is accepted until newer ones arrive.
        let v3 = as_format3(&v4);
        assert_eq!(v3.len(), v4.len() - 4 * 8);
        let back = KeyRatchet::decode(&mut Reader::new(&v3), 3).unwrap();
        assert_eq!(back.pairings[0][1].seen, 0);
        assert_eq!(back.pairings[0][1].recv_ctr, 9);
        assert_eq!(as_format3(&as_format4(&encoded(&back))), v3);
        assert_eq!(back.our_current.public(), k.our_current.public());
        assert_eq!(back.our_previous.public(), k.our_previous.public());
        assert!(back.cache[0][1].is_some() && back.cache[1][1].is_some());
        assert!(back.cache[0][0].is_none() && back.cache[1][0].is_none());
        assert_eq!(
            back.next.as_ref().map(|n| n.public().clone()),
            k.next.as_ref().map(|n| n.public().clone())
        );

        // A format-2 encoding has neither derived keys nor a next key.
        let v2 = as_format2(&v3);
        assert!(v2.len() < v3.len());
        let old2 = KeyRatchet::decode(&mut Reader::new(&v2), 2).unwrap();
        assert!(old2.next.is_none() && old2.cache.iter().flatten().all(Option::is_none));
        assert_eq!(as_format2(&as_format3(&as_format4(&encoded(&old2)))), v2);

        // A format-1 encoding recomputes the same public values.
        let v1 = without_publics(&v2);
        assert!(v1.len() < v2.len());
        let old1 = KeyRatchet::decode(&mut Reader::new(&v1), 1).unwrap();
        assert_eq!(as_format2(&as_format3(&as_format4(&encoded(&old1)))), v2);
    }

    #[test]
    fn encoded_length_is_exact() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut k = ratchet(&mut rng);
        k.rotate_theirs(DhKeyPair::generate(&mut rng).public().clone(), 0);
        for (i, j) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            k.derive_keys(i, j).unwrap();
            k.pairings[i][j].used_recv_mac = Some([7; 20]);
        }
        k.prepare_answer(&mut rng);
        k.to_reveal.extend_from_slice(&[1; 60]);
        assert_eq!(encoded(&k).len(), k.encoded_len());
        // And with nothing optional present.
        let fresh = ratchet(&mut rng);
        assert_eq!(encoded(&fresh).len(), fresh.encoded_len());
    }

    #[test]
    fn restored_sender_answers_without_exponentiation() {
        let mut rng = ChaCha20Rng::seed_from_u64(10);
        let a_ake = DhKeyPair::generate(&mut rng);
        let b_ake = DhKeyPair::generate(&mut rng);
        let mut a = KeyRatchet::after_ake(a_ake.clone(), b_ake.public().clone(), 1, &mut rng);
        let mut b = KeyRatchet::after_ake(b_ake, a_ake.public().clone(), 1, &mut rng);
        // Bob sends and persists; Alice receives and answers while he is away.
        let to_alice = b.encrypt(&header(), 0, b"bye");
        b.prepare_answer(&mut rng);
        let snapshot = encoded(&b);
        a.decrypt(&header(), &to_alice, 0, &mut rng).unwrap();
        let offline = a.encrypt(&header(), 0, b"while you were out");
        // Bob restarts from the snapshot: the pairing of the offline message
        // is already derived and the key he rotates to already generated.
        let mut b = KeyRatchet::decode(&mut Reader::new(&snapshot), 5).unwrap();
        assert!(b.has_cached_keys(offline.sender_keyid, offline.recipient_keyid));
        let next = b.next.as_ref().map(|k| k.public().clone()).unwrap();
        let got = b.decrypt(&header(), &offline, 0, &mut rng).unwrap();
        assert_eq!(&got.plaintext[..], b"while you were out");
        assert!(got.rotated_ours);
        assert_eq!(b.our_current.public(), &next);
        assert!(b.next.is_none());
        // His answer still reaches Alice.
        let answer = b.encrypt(&header(), 0, b"back");
        let got = a.decrypt(&header(), &answer, 0, &mut rng).unwrap();
        assert_eq!(&got.plaintext[..], b"back");
    }

    #[test]
    fn restored_ratchet_talks_to_the_original_peer() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let a_ake = DhKeyPair::generate(&mut rng);
        let b_ake = DhKeyPair::generate(&mut rng);
        let mut a = KeyRatchet::after_ake(a_ake.clone(), b_ake.public().clone(), 1, &mut rng);
        let b = KeyRatchet::after_ake(b_ake, a_ake.public().clone(), 1, &mut rng);
        // Bob restored from his snapshot decrypts what Alice sends.
        let mut b = KeyRatchet::decode(&mut Reader::new(&encoded(&b)), 5).unwrap();
        let msg = a.encrypt(&header(), 0, b"hello");
        let got = b.decrypt(&header(), &msg, 0, &mut rng).unwrap();
        assert_eq!(&got.plaintext[..], b"hello");
    }

    /// A one-way burst: `n` messages from `a` to `b`, not yet received.
    fn burst(a: &mut KeyRatchet, n: usize) -> Vec<DataMessage> {
        (0..n)
            .map(|i| a.encrypt(&header(), 0, format!("m{}", i + 1).as_bytes()))
            .collect()
    }

    fn pair(seed: u64) -> (KeyRatchet, KeyRatchet, ChaCha20Rng) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let a_ake = DhKeyPair::generate(&mut rng);
        let b_ake = DhKeyPair::generate(&mut rng);
        let a = KeyRatchet::after_ake(a_ake.clone(), b_ake.public().clone(), 1, &mut rng);
        let b = KeyRatchet::after_ake(b_ake, a_ake.public().clone(), 1, &mut rng);
        (a, b, rng)
    }

    /// The direct encoding of the data path is byte for byte the encoding
    /// of the message `encrypt` builds: both versions, empty, short and
    /// multi-block texts, before and after key changes (revealed MAC keys).
    #[test]
    fn encrypt_encoded_is_the_encoding_of_encrypt() {
        use super::super::message::{Body, EncodedMessage};
        // Twin pairs from one seed take the same steps; in each, alice
        // builds messages one way and the twin the other.
        let (mut a1, mut b1, mut r1) = pair(11);
        let (mut a2, mut b2, mut r2) = pair(11);
        let long = [0x61u8; 1031];
        let mut revealed_some = false;
        for round in 0..4 {
            for text in [&b""[..], b"hi", &long[..]] {
                for h in [header(), Header::v2()] {
                    let m = a1.encrypt(&h, 1, text);
                    revealed_some |= !m.revealed_mac_keys.is_empty();
                    let want = EncodedMessage {
                        header: h,
                        body: Body::Data(m),
                    }
                    .encode();
                    assert_eq!(
                        a2.encrypt_encoded(&h, 1, text, Vec::new()),
                        want,
                        "round {round}"
                    );
                }
            }
            // Bob reads one and answers: both sides' keys move on. The
            // generations retired a round before expire now, so the next
            // round's messages reveal their MAC keys.
            let t = (round + 1) * RETIRED_SECS;
            let m1 = a1.encrypt(&header(), 0, b"x");
            b1.decrypt(&header(), &m1, t, &mut r1).unwrap();
            let m2 = a2.encrypt(&header(), 0, b"x");
            b2.decrypt(&header(), &m2, t, &mut r2).unwrap();
            let back1 = b1.encrypt(&header(), 0, b"back");
            a1.decrypt(&header(), &back1, t, &mut r1).unwrap();
            let back2 = b2.encrypt(&header(), 0, b"back");
            a2.decrypt(&header(), &back2, t, &mut r2).unwrap();
        }
        assert!(revealed_some);
    }

    fn reused(r: Result<Received, Error>) -> bool {
        matches!(r, Err(Error::Peer(PeerMisbehaved::CounterReused)))
    }

    /// The server hands over m3 and m4 before m1 and m2 (ejabberd: live
    /// messages before the offline ones): all four are read, each once, and
    /// their positions give back the sending order.
    #[test]
    fn late_messages_are_read_once_and_ordered_by_position() {
        let (mut a, mut b, mut rng) = pair(11);
        // Bob spoke first, so Alice's burst uses his current key too.
        let hello = b.encrypt(&header(), 0, b"hello");
        a.decrypt(&header(), &hello, 0, &mut rng).unwrap();
        let m = burst(&mut a, 4);
        let third = b.decrypt(&header(), &m[2], 0, &mut rng).unwrap();
        assert_eq!((third.skipped, third.late), (2, false));
        assert!(third.rotated_ours && third.rotated_theirs);
        let fourth = b.decrypt(&header(), &m[3], 0, &mut rng).unwrap();
        assert_eq!((fourth.skipped, fourth.late), (0, false));
        // Keys rotated since; m1 and m2 are under the kept previous pairing.
        let first = b.decrypt(&header(), &m[0], 0, &mut rng).unwrap();
        assert_eq!(&first.plaintext[..], b"m1");
        assert_eq!((first.skipped, first.late), (0, true));
        assert!(!first.rotated_ours && !first.rotated_theirs);
        let second = b.decrypt(&header(), &m[1], 0, &mut rng).unwrap();
        assert!(second.late);
        let mut order = [&third, &fourth, &first, &second].map(|r| r.position);
        order.sort();
        assert_eq!(
            order,
            [&first, &second, &third, &fourth].map(|r| r.position)
        );
        for msg in &m {
            assert!(reused(b.decrypt(&header(), msg, 0, &mut rng)));
        }
        // The conversation goes on both ways.
        let answer = b.encrypt(&header(), 0, b"back");
        assert_eq!(
            &a.decrypt(&header(), &answer, 0, &mut rng)
                .unwrap()
                .plaintext[..],
            b"back"
        );
    }

    /// Only the last [`REPLAY_WINDOW`] counters below the newest are
    /// remembered; anything older is refused.
    #[test]
    fn the_replay_window_is_bounded() {
        let (mut a, mut b, mut rng) = pair(12);
        let n = REPLAY_WINDOW as usize + 6;
        let m = burst(&mut a, n);
        let last = b.decrypt(&header(), &m[n - 1], 0, &mut rng).unwrap();
        assert_eq!(last.skipped, n as u64 - 1);
        // Counter n - 1 - 64 is the oldest still inside the window.
        let oldest = n - 1 - REPLAY_WINDOW as usize;
        assert!(reused(b.decrypt(&header(), &m[oldest - 1], 0, &mut rng)));
        assert!(b.decrypt(&header(), &m[oldest], 0, &mut rng).unwrap().late);
        assert!(reused(b.decrypt(&header(), &m[oldest], 0, &mut rng)));
        assert!(b.decrypt(&header(), &m[n - 2], 0, &mut rng).unwrap().late);
    }

    /// The window is part of the snapshot: after a restart a late message
    /// is still accepted and a received one still refused.
    #[test]
    fn the_replay_window_survives_a_snapshot() {
        let (mut a, mut b, mut rng) = pair(13);
        let m = burst(&mut a, 3);
        b.decrypt(&header(), &m[2], 0, &mut rng).unwrap();
        b.decrypt(&header(), &m[0], 0, &mut rng).unwrap();
        let mut b = KeyRatchet::decode(&mut Reader::new(&encoded(&b)), 5).unwrap();
        assert!(reused(b.decrypt(&header(), &m[0], 0, &mut rng)));
        assert!(reused(b.decrypt(&header(), &m[2], 0, &mut rng)));
        let second = b.decrypt(&header(), &m[1], 0, &mut rng).unwrap();
        assert_eq!(&second.plaintext[..], b"m2");
        assert!(second.late);
    }

    /// Alice's `stale` message, sent before the exchanges in `steps`, is
    /// handed to Bob only after them (a re-routed stanza of a dead session):
    /// Bob's keys for it have been retired. Returns the stale message.
    fn late_across_steps(
        a: &mut KeyRatchet,
        b: &mut KeyRatchet,
        rng: &mut ChaCha20Rng,
        now: u64,
    ) -> DataMessage {
        let hello = a.encrypt(&header(), 0, b"hello");
        b.decrypt(&header(), &hello, now, rng).unwrap();
        let stale = a.encrypt(&header(), 0, b"sent before the answer");
        // Bob's answer crosses it; Alice's next message steps Bob's ratchet
        // (both keys), twice over.
        for _ in 0..2 {
            let answer = b.encrypt(&header(), 0, b"answer");
            a.decrypt(&header(), &answer, now, rng).unwrap();
            let newer = a.encrypt(&header(), 0, b"newer");
            let got = b.decrypt(&header(), &newer, now, rng).unwrap();
            assert!(got.rotated_ours && got.rotated_theirs);
        }
        assert!(b.live_pairing(&stale).is_none(), "its keys are retired");
        stale
    }

    /// Chaos seed 20261330, trial 37: a message older than a ratchet step,
    /// delivered after it, is read once; its MAC key stays secret until
    /// the retired generation is dropped, then it is unreadable.
    #[test]
    fn a_message_older_than_a_ratchet_step_is_read_once() {
        let (mut a, mut b, mut rng) = pair(21);
        let stale = late_across_steps(&mut a, &mut b, &mut rng, 1000);
        let got = b.decrypt(&header(), &stale, 1010, &mut rng).unwrap();
        assert_eq!(&got.plaintext[..], b"sent before the answer");
        assert!(!got.rotated_ours && !got.rotated_theirs);
        assert_eq!(
            got.position,
            Position {
                sender_keyid: stale.sender_keyid,
                recipient_keyid: stale.recipient_keyid,
                ctr: u64::from_be_bytes(stale.ctr),
            }
        );
        assert!(reused(b.decrypt(&header(), &stale, 1011, &mut rng)));
        // Its pairing's MAC key is not revealed while it reads late ones.
        let mac = sha1(&got_recv_aes(&mut b, &stale));
        let to_a = b.encrypt(&header(), 0, b"still here");
        assert!(!contains_key(&to_a.revealed_mac_keys, &mac));
        // Past its time it is dropped and the key goes out.
        b.expire_retired(1000 + RETIRED_SECS);
        let to_a = b.encrypt(&header(), 0, b"later");
        assert!(contains_key(&to_a.revealed_mac_keys, &mac));
        assert!(matches!(
            b.decrypt(&header(), &stale, 1000 + RETIRED_SECS, &mut rng),
            Err(Error::Peer(PeerMisbehaved::UnknownKeyids))
        ));
        // The conversation goes on.
        let got = a.decrypt(&header(), &to_a, 1000 + RETIRED_SECS, &mut rng);
        assert_eq!(&got.unwrap().plaintext[..], b"later");
    }

    /// The receiving AES key of the retired pairing `msg` used, from Bob's
    /// kept pairing.
    fn got_recv_aes(b: &mut KeyRatchet, msg: &DataMessage) -> [u8; 16] {
        let p = b
            .retired
            .pairing(msg.recipient_keyid, msg.sender_keyid)
            .expect("pairing kept");
        p.keys.as_ref().expect("keys derived").recv_aes_key
    }

    fn contains_key(revealed: &[u8], key: &[u8; 20]) -> bool {
        revealed.chunks(MAC_KEY_BYTES).any(|k| k == key)
    }

    /// The retired generations are in the snapshot: after a restart the
    /// late message is read, and a copy of one read before is refused.
    #[test]
    fn retired_generations_survive_a_snapshot() {
        let (mut a, mut b, mut rng) = pair(22);
        let stale = late_across_steps(&mut a, &mut b, &mut rng, 1000);
        let enc = encoded(&b);
        assert_eq!(enc.len(), b.encoded_len());
        let mut restored = KeyRatchet::decode(&mut Reader::new(&enc), 5).unwrap();
        assert_eq!(encoded(&restored), enc);
        let got = restored.decrypt(&header(), &stale, 1001, &mut rng).unwrap();
        assert_eq!(&got.plaintext[..], b"sent before the answer");
        let enc = encoded(&restored);
        assert_eq!(enc.len(), restored.encoded_len());
        let mut again = KeyRatchet::decode(&mut Reader::new(&enc), 5).unwrap();
        assert!(reused(again.decrypt(&header(), &stale, 1002, &mut rng)));
        // Past their time the restored generations go too.
        assert!(matches!(
            again.decrypt(&header(), &stale, 1000 + RETIRED_SECS, &mut rng),
            Err(Error::Peer(PeerMisbehaved::UnknownKeyids))
        ));
    }

    /// However recent, at most [`retired::MAX_RETIRED`] generations per
    /// side are kept: a fast exchange drops the oldest.
    #[test]
    fn retired_generations_are_bounded() {
        let (mut a, mut b, mut rng) = pair(23);
        let stale = late_across_steps(&mut a, &mut b, &mut rng, 1000);
        for _ in 0..retired::MAX_RETIRED {
            let answer = b.encrypt(&header(), 0, b"answer");
            a.decrypt(&header(), &answer, 1000, &mut rng).unwrap();
            let newer = a.encrypt(&header(), 0, b"newer");
            b.decrypt(&header(), &newer, 1000, &mut rng).unwrap();
        }
        assert!(matches!(
            b.decrypt(&header(), &stale, 1000, &mut rng),
            Err(Error::Peer(PeerMisbehaved::UnknownKeyids))
        ));
        let enc = encoded(&b);
        assert_eq!(enc.len(), b.encoded_len());
    }

    /// A forged message under retired keys changes nothing.
    #[test]
    fn a_forgery_under_retired_keys_changes_nothing() {
        let (mut a, mut b, mut rng) = pair(24);
        let mut stale = late_across_steps(&mut a, &mut b, &mut rng, 1000);
        let before = encoded(&b);
        stale.encrypted[0] ^= 1;
        assert!(matches!(
            b.decrypt(&header(), &stale, 1001, &mut rng),
            Err(Error::Peer(PeerMisbehaved::DataMacMismatch))
        ));
        assert_eq!(encoded(&b), before);
        stale.encrypted[0] ^= 1;
        assert!(b.decrypt(&header(), &stale, 1001, &mut rng).is_ok());
    }
}
