//! The data-message key ratchet (spec §"Key management", §"Computing AES
//! keys, MAC keys…" and §"Revealing MAC keys").
//!
//! [`KeyRatchet`] keeps exactly what the spec keeps — our two most recent DH
//! key pairs and their two most recent public keys — plus, per key pairing,
//! the send counter, the highest counter received, and the receiving MAC
//! key once it has verified a message (so it can be revealed when the pairing
//! is forgotten, without recomputing the shared secret).
//!
//! Session keys are derived lazily and cached in memory; the cache is never
//! persisted. This is also the O2TR EKM state: [`KeyRatchet::encode`] writes
//! everything needed to verify, decrypt and answer messages after a restart.

use rand_core::CryptoRng;
use zeroize::{Zeroize, Zeroizing};

use super::codec::{Reader, Writer};
use super::crypto::{AesCtrKey, DhKeyPair, DhPublicKey, HmacSha1Key, ct_eq, h1, h2, sha1};
use super::error::{Error, PeerMisbehaved};
use super::message::{DataMessage, Header, MacScratch};

/// Length of one revealed MAC key.
pub const MAC_KEY_BYTES: usize = 20;

/// Keys for one (our key, their key) pairing, prepared for use: the AES
/// key schedules and HMAC states are computed once here, not per message.
struct SessionKeys {
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
        let send_mac = Zeroizing::new(sha1(&*send_aes));
        let recv_mac = Zeroizing::new(sha1(&*recv_aes));
        SessionKeys {
            send_aes: AesCtrKey::new(&send_aes),
            send_mac: HmacSha1Key::new(&*send_mac),
            recv_aes: AesCtrKey::new(&recv_aes),
            recv_mac: HmacSha1Key::new(&*recv_mac),
            recv_mac_key: *recv_mac,
            extra: *h2(0xff, &s),
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
    /// The receiving MAC key, once it verified a message.
    used_recv_mac: Option<[u8; 20]>,
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
}

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
    /// Receiving MAC keys to reveal in the next data message we send.
    to_reveal: Zeroizing<Vec<u8>>,
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
            to_reveal: Zeroizing::new(Vec::new()),
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
        }
        Ok(())
    }

    /// Encrypt `plaintext` as a data message (spec "When you send a Data
    /// Message"). Advances the send counter; the caller must persist the
    /// ratchet before the message leaves.
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

    /// Verify and decrypt a data message (spec "When you receive a Data
    /// Message"), then rotate keys as the spec says. Nothing changes unless
    /// every check passes.
    pub fn decrypt<R: CryptoRng + ?Sized>(
        &mut self,
        header: &Header,
        msg: &DataMessage,
        rng: &mut R,
    ) -> Result<Received, Error> {
        let i = if msg.recipient_keyid == self.our_keyid {
            1
        } else if Some(msg.recipient_keyid) == self.our_keyid.checked_sub(1) {
            0
        } else {
            return Err(PeerMisbehaved::UnknownKeyids.into());
        };
        let j = if msg.sender_keyid == self.their_keyid {
            1
        } else if Some(msg.sender_keyid) == self.their_keyid.checked_sub(1)
            && self.their_previous.is_some()
        {
            0
        } else {
            return Err(PeerMisbehaved::UnknownKeyids.into());
        };
        if msg.sender_keyid == 0 || msg.recipient_keyid == 0 {
            return Err(PeerMisbehaved::ZeroKeyid.into());
        }
        self.derive_keys(i, j)?;
        let Some(keys) = self.cache[i][j].as_deref() else {
            return Err(PeerMisbehaved::UnknownKeyids.into());
        };
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
        if ctr <= self.pairings[i][j].recv_ctr {
            return Err(PeerMisbehaved::CounterNotIncreasing.into());
        }
        // Validate their next key before changing anything.
        let next = if j == 1 {
            Some(DhPublicKey::from_mpi(&msg.next_dh)?)
        } else {
            None
        };
        let mut plaintext = Zeroizing::new(msg.encrypted.clone());
        keys.recv_aes.apply(&msg.ctr, &mut plaintext);
        let recv_mac = keys.recv_mac_key;
        let extra_key = Zeroizing::new(keys.extra);
        let pairing = &mut self.pairings[i][j];
        let skipped = ctr - pairing.recv_ctr - 1;
        pairing.recv_ctr = ctr;
        pairing.used_recv_mac = Some(recv_mac);

        let rotated_ours = i == 1;
        if rotated_ours {
            self.rotate_ours(rng);
        }
        let rotated_theirs = next.is_some();
        if let Some(next) = next {
            self.rotate_theirs(next);
        }
        Ok(Received {
            plaintext,
            rotated_ours,
            rotated_theirs,
            extra_key,
            skipped,
        })
    }

    /// He has seen our newest key: forget our previous one.
    fn rotate_ours<R: CryptoRng + ?Sized>(&mut self, rng: &mut R) {
        for j in 0..2 {
            if let Some(mac) = self.pairings[0][j].used_recv_mac.take() {
                self.to_reveal.extend_from_slice(&mac);
            }
        }
        let [prev, cur] = &mut self.pairings;
        std::mem::swap(prev, cur);
        *cur = Default::default();
        let [cprev, ccur] = &mut self.cache;
        std::mem::swap(cprev, ccur);
        *ccur = Default::default();
        let fresh = DhKeyPair::generate(rng);
        self.our_previous = std::mem::replace(&mut self.our_current, fresh);
        self.our_keyid += 1;
    }

    /// He advanced his key: forget his previous one.
    fn rotate_theirs(&mut self, next: DhPublicKey) {
        for i in 0..2 {
            if let Some(mac) = self.pairings[i][0].used_recv_mac.take() {
                self.to_reveal.extend_from_slice(&mac);
            }
            let row = &mut self.pairings[i];
            row.swap(0, 1);
            row[1] = Pairing::default();
            let crow = &mut self.cache[i];
            crow.swap(0, 1);
            crow[1] = None;
        }
        self.their_previous = Some(std::mem::replace(&mut self.their_current, next));
        self.their_keyid += 1;
    }

    /// Serialize the ratchet for the EKM snapshot (format 2: each of our
    /// key pairs as its secret followed by its public value, so restoring
    /// needs no exponentiation). Contains secrets: the caller keeps the
    /// result in zeroizing memory.
    pub fn encode(&self, w: &mut Writer) {
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
        for row in &self.pairings {
            for p in row {
                w.raw(&p.send_ctr.to_be_bytes());
                w.raw(&p.recv_ctr.to_be_bytes());
                match &p.used_recv_mac {
                    Some(k) => {
                        w.byte(1).raw(k);
                    }
                    None => {
                        w.byte(0);
                    }
                }
            }
        }
        w.data(&self.to_reveal);
    }

    /// Inverse of [`KeyRatchet::encode`]. `with_publics` is false for
    /// format-1 snapshots, which hold only our secrets: their public values
    /// are recomputed (two fixed-base exponentiations).
    pub fn decode(r: &mut Reader<'_>, with_publics: bool) -> Result<Self, Error> {
        let our_keyid = r.int("our_keyid")?;
        if our_keyid < 2 {
            return Err(Error::Snapshot("our keyid below 2"));
        }
        let mut read_pair = |what: &'static str| -> Result<DhKeyPair, Error> {
            let secret = r.data(what)?;
            if with_publics {
                let public = DhPublicKey::from_mpi(r.mpi(what)?)?;
                Ok(DhKeyPair::from_stored(secret, public)?)
            } else {
                Ok(DhKeyPair::from_secret_bytes(secret)?)
            }
        };
        let our_current = read_pair("our_current")?;
        let our_previous = read_pair("our_previous")?;
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
                p.used_recv_mac = match r.byte("mac?")? {
                    0 => None,
                    1 => Some(r.array("used_recv_mac")?),
                    _ => return Err(Error::Snapshot("bad option flag")),
                };
            }
        }
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
            cache: Default::default(),
            to_reveal: Zeroizing::new(reveal.to_vec()),
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
        let mut w = Writer::with_capacity(1024);
        k.encode(&mut w);
        w.into_vec()
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
    fn encoding_round_trips_in_both_formats() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let k = ratchet(&mut rng);
        let v2 = encoded(&k);
        let back = KeyRatchet::decode(&mut Reader::new(&v2), true).unwrap();
        assert_eq!(encoded(&back), v2);
        assert_eq!(back.our_current.public(), k.our_current.public());
        assert_eq!(back.our_previous.public(), k.our_previous.public());

        // A format-1 encoding recomputes the same public values.
        let v1 = without_publics(&v2);
        assert!(v1.len() < v2.len());
        let old = KeyRatchet::decode(&mut Reader::new(&v1), false).unwrap();
        assert_eq!(encoded(&old), v2);
    }

    #[test]
    fn restored_ratchet_talks_to_the_original_peer() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let a_ake = DhKeyPair::generate(&mut rng);
        let b_ake = DhKeyPair::generate(&mut rng);
        let mut a = KeyRatchet::after_ake(a_ake.clone(), b_ake.public().clone(), 1, &mut rng);
        let b = KeyRatchet::after_ake(b_ake, a_ake.public().clone(), 1, &mut rng);
        // Bob restored from his snapshot decrypts what Alice sends.
        let mut b = KeyRatchet::decode(&mut Reader::new(&encoded(&b)), true).unwrap();
        let header = Header {
            version: super::super::message::Version::V3,
            sender_tag: 0x100,
            receiver_tag: 0x101,
        };
        let msg = a.encrypt(&header, 0, b"hello");
        let got = b.decrypt(&header, &msg, &mut rng).unwrap();
        assert_eq!(&got.plaintext[..], b"hello");
    }
}
