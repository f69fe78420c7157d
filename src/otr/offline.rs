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

use super::codec::{Reader, Writer};
use super::crypto::{DsaPublicKey, Fingerprint, SecretBytes};
use super::error::Error;
use super::keys::KeyRatchet;
use super::message::Version;

const MAGIC: &[u8; 8] = b"O2TR-EKM";
/// The snapshot format written. Format 2 adds our DH public values next to
/// their secrets (restoring then needs no exponentiation); format 3 adds
/// the derived session keys and our pre-generated next key pair (the first
/// message after a restore then needs none either); format 4 adds the
/// replay window of each key pairing (a late message is accepted once).
/// Formats 1 to 3 are still read.
const FORMAT: u8 = 4;
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

    /// The EKM snapshot: contains secret keys and is zeroized on drop
    /// (word-wise: it is made for every message, see [`SecretBytes`]).
    pub fn snapshot(&self) -> SecretBytes {
        // About 1.6 KiB, allocated once at its exact size: a regrowth would
        // copy for nothing (it wipes the old buffer), and spare capacity
        // would be wiped on drop for nothing.
        let mut w = Writer::secret(
            HEADER_LEN + self.their_long_term.encoded_len() + self.ratchet.encoded_len(),
        );
        w.raw(MAGIC).byte(FORMAT);
        w.short(self.version.number());
        w.int(self.our_tag).int(self.their_tag);
        w.raw(&self.ssid).byte(u8::from(self.we_initiated));
        w.raw(&self.created_at.to_be_bytes());
        w.raw(&self.last_sent.to_be_bytes());
        w.raw(&self.last_received.to_be_bytes());
        w.int(self.sent_since_answer);
        self.their_long_term.encode(&mut w);
        self.ratchet.encode(&mut w);
        w.into_secret()
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
