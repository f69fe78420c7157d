//! O2TR: the Emergency Key Management (EKM) snapshot of an encrypted
//! session, and the rules for Offline Message Detection (OMD) and
//! resumption (O2TR paper §4; DESIGN.md §5).
//!
//! An [`EncryptedSession`] is everything an encrypted OTR session needs to
//! verify, decrypt and answer data messages: the key ratchet (our two latest
//! DH key pairs, their two latest public keys, counters, MAC keys still to
//! reveal), the peer's long-term key, the ssid and timestamps. Its snapshot
//! ([`EncryptedSession::snapshot`]) is written durably before any effect of
//! a state change leaves the proxy. After a disconnection or a restart the
//! snapshot is restored as a *suspended* session; a data message whose
//! instance tags and keyids match it is verified and decrypted with the
//! stored keys (OMD), and the session continues from that message's
//! `next_dh` (resumption) — the peer never notices.
//!
//! The conversation takes its snapshots with
//! [`EncryptedSession::snapshot_cached`]: the same bytes as
//! [`EncryptedSession::snapshot`], but between key changes the previous
//! snapshot, kept in the ratchet, is patched (timestamps, counters, replay
//! windows, keys to reveal) and copied instead of encoded again.

use super::codec::{Overwriter, Reader, Sink, Writer};
use super::crypto::{DsaPublicKey, Fingerprint, SecretBytes};
use super::error::Error;
use super::keys::KeyRatchet;
use super::message::Version;

const MAGIC: &[u8; 8] = b"O2TR-EKM";
/// The snapshot format written. Format 2 adds our DH public values next to
/// their secrets (restoring then needs no exponentiation); format 3 adds
/// the derived session keys and our pre-generated next key pair (the first
/// message after a restore then needs none either); format 4 adds the
/// replay window of each key pairing (a late message is accepted once);
/// format 5 the generations a ratchet step retired (a message the server
/// delivers after a newer one that stepped the ratchet is still read).
/// Formats 1 to 4 are still read.
const FORMAT: u8 = 5;
/// The oldest format still read.
const FORMAT_V1: u8 = 1;
/// Bytes before the peer's public key: magic, format, version, tags, ssid,
/// initiator flag, three timestamps, unanswered count.
const HEADER_LEN: usize = 8 + 1 + 2 + 4 + 4 + 8 + 1 + 3 * 8 + 4;

/// An encrypted (live or suspended) OTR session.
pub struct EncryptedSession {
    /// Protocol version in use.
    pub version: Version,
    /// Our instance tag (0 for v2).
    pub our_tag: u32,
    /// Their instance tag (0 for v2).
    pub their_tag: u32,
    /// The DH ratchet.
    pub ratchet: KeyRatchet,
    /// Their long-term public key, authenticated in the AKE.
    pub their_long_term: DsaPublicKey,
    /// The secure session id.
    pub ssid: [u8; 8],
    /// Whether we sent the Reveal Signature message.
    pub we_initiated: bool,
    /// When the AKE completed (unix seconds).
    pub created_at: u64,
    /// When we last sent a data message.
    pub last_sent: u64,
    /// When we last received a data message.
    pub last_received: u64,
    /// Data messages sent since the peer last answered (the paper's `k`).
    pub sent_since_answer: u32,
    /// True when restored from a snapshot and not yet confirmed live by a
    /// message from the peer.
    pub suspended: bool,
}

impl EncryptedSession {
    /// The peer's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.their_long_term.fingerprint()
    }

    /// Time of the last activity either way.
    pub fn last_activity(&self) -> u64 {
        self.last_sent.max(self.last_received).max(self.created_at)
    }

    /// Whether the snapshot is older than `lifetime` seconds at `now`.
    pub fn is_expired(&self, now: u64, lifetime: u64) -> bool {
        now.saturating_sub(self.last_activity()) > lifetime
    }

    /// The EKM snapshot, encoded afresh: contains secret keys and is
    /// zeroized on drop (see [`SecretBytes`]). The conversation uses
    /// [`EncryptedSession::snapshot_cached`].
    pub fn snapshot(&self) -> SecretBytes {
        self.encode().0
    }

    /// [`EncryptedSession::snapshot`] (the same bytes), reusing the last
    /// snapshot taken this way while the ratchet's keys did not change:
    /// the header, the peer's key and the ratchet's counters are rewritten
    /// over it and the result copied (one allocation, no encoding). The
    /// kept copy lives in the ratchet, which drops (wipes) it on every key
    /// change.
    pub fn snapshot_cached(&mut self) -> SecretBytes {
        // Not secret: versions, tags, ssid, times, a count.
        let mut header = [0u8; HEADER_LEN];
        let mut out = Overwriter::new(&mut header);
        put_header(self, &mut out);
        let header_fits = out.finish();
        let long_term = self.their_long_term.encoding();
        let prefix_len = HEADER_LEN + long_term.len();
        if header_fits && let Some(kept) = self.ratchet.patched_snapshot(prefix_len) {
            let mut out = Overwriter::new(kept.get_mut(..prefix_len).unwrap_or_default());
            out.put_raw(&header);
            out.put_raw(long_term);
            if out.finish() {
                let snapshot = kept.clone();
                debug_assert!(snapshot == self.snapshot(), "patched snapshot differs");
                return snapshot;
            }
        }
        let (snapshot, marks) = self.encode();
        self.ratchet
            .keep_snapshot(snapshot.clone(), prefix_len, marks);
        snapshot
    }

    fn encode(&self) -> (SecretBytes, super::keys::SnapshotMarks) {
        // About 1.6 KiB, sized once: a regrowth would copy for nothing (it
        // wipes the old buffer).
        let mut w = Writer::secret(
            HEADER_LEN + self.their_long_term.encoded_len() + self.ratchet.encoded_len(),
        );
        put_header(self, &mut w);
        self.their_long_term.encode(&mut w);
        let marks = self.ratchet.encode_marked(&mut w);
        (w.into_secret(), marks)
    }

    /// Restore a snapshot as a suspended session.
    pub fn restore(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        if r.array::<8>("magic")? != *MAGIC {
            return Err(Error::Snapshot("not an EKM snapshot"));
        }
        let format = r.byte("format")?;
        if !(FORMAT_V1..=FORMAT).contains(&format) {
            return Err(Error::Snapshot("unknown snapshot format"));
        }
        let version = match r.short("version")? {
            2 => Version::V2,
            3 => Version::V3,
            _ => return Err(Error::Snapshot("unknown protocol version")),
        };
        let our_tag = r.int("our_tag")?;
        let their_tag = r.int("their_tag")?;
        let ssid = r.array("ssid")?;
        let we_initiated = r.byte("we_initiated")? != 0;
        let created_at = u64::from_be_bytes(r.array("created_at")?);
        let last_sent = u64::from_be_bytes(r.array("last_sent")?);
        let last_received = u64::from_be_bytes(r.array("last_received")?);
        let sent_since_answer = r.int("sent_since_answer")?;
        let their_long_term = DsaPublicKey::decode(&mut r)?;
        let ratchet = KeyRatchet::decode(&mut r, format)?;
        r.finish()?;
        Ok(EncryptedSession {
            version,
            our_tag,
            their_tag,
            ratchet,
            their_long_term,
            ssid,
            we_initiated,
            created_at,
            last_sent,
            last_received,
            sent_since_answer,
            suspended: true,
        })
    }
}

/// Writes the snapshot's first [`HEADER_LEN`] bytes.
fn put_header(s: &EncryptedSession, out: &mut impl Sink) {
    out.put_raw(MAGIC);
    out.put_raw(&[FORMAT]);
    out.put_raw(&s.version.number().to_be_bytes());
    out.put_raw(&s.our_tag.to_be_bytes());
    out.put_raw(&s.their_tag.to_be_bytes());
    out.put_raw(&s.ssid);
    out.put_raw(&[u8::from(s.we_initiated)]);
    out.put_raw(&s.created_at.to_be_bytes());
    out.put_raw(&s.last_sent.to_be_bytes());
    out.put_raw(&s.last_received.to_be_bytes());
    out.put_raw(&s.sent_since_answer.to_be_bytes());
}

/// What a snapshot says about itself without exposing keys (for listings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Protocol version.
    pub version: Version,
    /// Their instance tag.
    pub their_tag: u32,
    /// Our newest keyid.
    pub our_keyid: u32,
    /// Their newest keyid.
    pub their_keyid: u32,
    /// The peer's fingerprint.
    pub fingerprint: Fingerprint,
    /// Last activity (unix seconds).
    pub last_activity: u64,
}

impl SnapshotInfo {
    /// Describe a snapshot.
    pub fn of(bytes: &[u8]) -> Result<Self, Error> {
        let s = EncryptedSession::restore(bytes)?;
        Ok(SnapshotInfo {
            version: s.version,
            their_tag: s.their_tag,
            our_keyid: s.ratchet.our_keyid(),
            their_keyid: s.ratchet.their_keyid(),
            fingerprint: s.fingerprint(),
            last_activity: s.last_activity(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otr::crypto::{DhKeyPair, DsaPrivateKey};
    use crate::otr::message::{Body, EncodedMessage, Header};
    use rand_chacha::ChaCha20Rng;
    use rand_core::{Rng, SeedableRng};

    fn session(
        ours: DhKeyPair,
        theirs: &DhKeyPair,
        key: &DsaPublicKey,
        rng: &mut ChaCha20Rng,
    ) -> EncryptedSession {
        EncryptedSession {
            version: Version::V3,
            our_tag: 0x101,
            their_tag: 0x102,
            ratchet: KeyRatchet::after_ake(ours, theirs.public().clone(), 1, rng),
            their_long_term: key.clone(),
            ssid: [7; 8],
            we_initiated: true,
            created_at: 1,
            last_sent: 1,
            last_received: 1,
            sent_since_answer: 0,
            suspended: false,
        }
    }

    fn send(s: &mut EncryptedSession, now: u64, prepare: bool, rng: &mut ChaCha20Rng) -> Vec<u8> {
        let h = Header::v3(s.our_tag, s.their_tag);
        s.ratchet.expire_retired(now);
        let bytes = s.ratchet.encrypt_encoded(&h, 0, b"some text", Vec::new());
        if prepare {
            s.ratchet.prepare_answer(rng);
        }
        s.last_sent = now;
        s.sent_since_answer += 1;
        bytes
    }

    /// Receives `bytes`; a replay or a message from a forgotten pairing is
    /// refused and must change nothing.
    fn receive(s: &mut EncryptedSession, bytes: &[u8], now: u64, rng: &mut ChaCha20Rng) {
        let Ok(EncodedMessage {
            header,
            body: Body::Data(d),
        }) = EncodedMessage::decode(bytes)
        else {
            panic!("not a data message")
        };
        if s.ratchet.decrypt_owned(&header, d, now, rng).is_ok() {
            s.last_received = now;
            s.sent_since_answer = 0;
        }
    }

    /// Snapshots taken with [`EncryptedSession::snapshot_cached`] (patched
    /// in place between key changes) are byte for byte fresh encodings,
    /// over a random run of sends (with and without preparing for an
    /// answer), receipts out of order, replays, answers (ratchet steps)
    /// and restores, checked after a random subset of the steps.
    #[test]
    fn cached_snapshots_are_fresh_encodings() {
        let mut rng = ChaCha20Rng::seed_from_u64(41);
        let dsa = DsaPrivateKey::generate(&mut rng);
        let key = dsa.public_key();
        let a_ake = DhKeyPair::generate(&mut rng);
        let b_ake = DhKeyPair::generate(&mut rng);
        let mut a = session(a_ake.clone(), &b_ake, key, &mut rng);
        let mut b = session(b_ake.clone(), &a_ake, key, &mut rng);
        b.we_initiated = false;
        b.our_tag = 0x102;
        b.their_tag = 0x101;
        let (mut to_b, mut to_a): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
        let (mut checks, mut patched) = (0, 0);
        for now in 2..3000u64 {
            match rng.next_u32() % 16 {
                0..=4 => {
                    let prepare = rng.next_u32() % 4 != 0;
                    to_b.push(send(&mut a, now, prepare, &mut rng));
                }
                5 | 6 => {
                    let prepare = rng.next_u32() % 4 != 0;
                    to_a.push(send(&mut b, now, prepare, &mut rng));
                }
                7..=10 if !to_b.is_empty() => {
                    // Mostly in order, sometimes a later one first.
                    let i = if rng.next_u32() % 4 == 0 {
                        rng.next_u32() as usize % to_b.len()
                    } else {
                        0
                    };
                    let m = to_b.remove(i);
                    receive(&mut b, &m, now, &mut rng);
                    if rng.next_u32() % 8 == 0 {
                        receive(&mut b, &m, now, &mut rng);
                    }
                }
                11 | 12 if !to_a.is_empty() => {
                    let m = to_a.remove(0);
                    receive(&mut a, &m, now, &mut rng);
                }
                13 => {
                    // Lost messages.
                    to_b.truncate(to_b.len().saturating_sub(1));
                }
                14 if rng.next_u32() % 16 == 0 => {
                    // A restart: the restored session has nothing kept.
                    let mut restored = EncryptedSession::restore(&a.snapshot()).unwrap();
                    restored.suspended = false;
                    a = restored;
                }
                _ => {}
            }
            for s in [&mut a, &mut b] {
                if rng.next_u32() % 3 != 0 {
                    patched += usize::from(s.ratchet.has_kept_snapshot());
                    checks += 1;
                    assert!(s.snapshot_cached() == s.snapshot(), "step {now}");
                }
            }
        }
        let keyids = (a.ratchet.our_keyid(), b.ratchet.our_keyid());
        assert!(
            keyids.0 > 10 && keyids.1 > 10,
            "{keyids:?} {patched} of {checks}"
        );
        // Most snapshots were patched, not encoded afresh.
        assert!(patched * 2 > checks, "{patched} of {checks}");
    }
}
