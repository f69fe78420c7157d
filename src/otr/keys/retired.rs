//! Key generations a ratchet step retired, kept a short while for late
//! messages.
//!
//! OTR forgets a key as soon as the peer's next message shows it moved on,
//! and reveals the MAC keys of the pairings that used it. Servers do not
//! keep order across a reconnection: ejabberd re-routes a dead session's
//! unacknowledged stanzas after the new session's live traffic (chaos seed
//! 20261330, trial 37: a message under keys 17/18 arrived 0.1 s after the
//! peer's 18/19 had made us rotate), so the older message would be
//! unreadable. Here the retired key pairs (ours) and public keys (theirs)
//! stay for [`RETIRED_SECS`], at most [`MAX_RETIRED`] generations per side,
//! with the state of every pairing that uses one of them (counters and
//! replay window, so a copy is still refused).
//!
//! The cost is forward secrecy over that window: a device captured within
//! it can read the late messages' keys. The MAC keys of a retired pairing
//! are revealed only when it is dropped — revealed earlier, the server
//! could forge exactly the late messages these keys accept.

use zeroize::Zeroizing;

use super::super::codec::{Reader, Writer};
use super::super::crypto::{DhKeyPair, DhPublicKey};
use super::super::error::Error;
use super::{Pairing, SessionKeys};

/// How long a retired key generation still reads late messages (seconds):
/// a dead session's stanzas are re-routed once the server notices, within
/// its ping timeout plus a reconnection.
pub const RETIRED_SECS: u64 = 120;

/// Most retired generations kept per side, whatever their age: a fast
/// exchange steps the ratchet every round trip.
pub const MAX_RETIRED: usize = 3;

/// Most retired pairings with state: every combination of a kept key of
/// ours and one of theirs, one of them retired.
const MAX_PAIRINGS: usize = (MAX_RETIRED + 2) * (MAX_RETIRED + 2) - 4;

/// One of our key pairs, retired.
struct Ours {
    keyid: u32,
    pair: DhKeyPair,
    until: u64,
}

/// One of their public keys, retired.
struct Theirs {
    keyid: u32,
    key: DhPublicKey,
    until: u64,
}

/// A pairing one of whose keys is retired.
pub(super) struct RetiredPairing {
    pub(super) our_keyid: u32,
    pub(super) their_keyid: u32,
    pub(super) state: Pairing,
    /// Derived keys, in memory only (derived again after a restore).
    pub(super) keys: Option<Box<SessionKeys>>,
}

/// The retired generations of both sides and their pairings.
#[derive(Default)]
pub(super) struct Retired {
    ours: Vec<Ours>,
    theirs: Vec<Theirs>,
    pairings: Vec<RetiredPairing>,
}

impl Retired {
    /// Whether nothing is kept (the common case: no ratchet step yet, or
    /// everything expired).
    pub(super) fn is_empty(&self) -> bool {
        self.ours.is_empty() && self.theirs.is_empty() && self.pairings.is_empty()
    }

    /// Our key pair `keyid`, retired until `until`.
    pub(super) fn retire_ours(&mut self, keyid: u32, pair: DhKeyPair, until: u64) {
        self.ours.push(Ours { keyid, pair, until });
    }

    /// Their public key `keyid`, retired until `until`.
    pub(super) fn retire_theirs(&mut self, keyid: u32, key: DhPublicKey, until: u64) {
        self.theirs.push(Theirs { keyid, key, until });
    }

    /// Keeps the state of a pairing whose key was just retired if it
    /// received a message (a copy must still be refused). Its derived keys
    /// are not kept: a late message is rare, one exponentiation derives
    /// them again, and a busy conversation would hold a score of them.
    pub(super) fn keep_pairing(&mut self, our_keyid: u32, their_keyid: u32, state: Pairing) {
        if state.recv_ctr == 0 && state.used_recv_mac.is_none() {
            return;
        }
        self.pairings.push(RetiredPairing {
            our_keyid,
            their_keyid,
            state,
            keys: None,
        });
    }

    /// Our retired key pair `keyid`.
    pub(super) fn our_pair(&self, keyid: u32) -> Option<&DhKeyPair> {
        self.ours.iter().find(|o| o.keyid == keyid).map(|o| &o.pair)
    }

    /// Their retired public key `keyid`.
    pub(super) fn their_key(&self, keyid: u32) -> Option<&DhPublicKey> {
        self.theirs
            .iter()
            .find(|t| t.keyid == keyid)
            .map(|t| &t.key)
    }

    /// The kept state of pairing (ours, theirs).
    pub(super) fn pairing(&self, our_keyid: u32, their_keyid: u32) -> Option<&RetiredPairing> {
        self.pairings
            .iter()
            .find(|p| p.our_keyid == our_keyid && p.their_keyid == their_keyid)
    }

    /// [`Retired::pairing`], to update.
    pub(super) fn pairing_mut(
        &mut self,
        our_keyid: u32,
        their_keyid: u32,
    ) -> Option<&mut RetiredPairing> {
        self.pairings
            .iter_mut()
            .find(|p| p.our_keyid == our_keyid && p.their_keyid == their_keyid)
    }

    /// Keeps the derived keys of pairing (ours, theirs), adding the
    /// pairing without state if it has none yet (a late message under keys
    /// never paired; written to snapshots only once it has state).
    pub(super) fn set_keys(&mut self, our_keyid: u32, their_keyid: u32, keys: Box<SessionKeys>) {
        if let Some(p) = self.pairing_mut(our_keyid, their_keyid) {
            p.keys = Some(keys);
        } else if self.pairings.len() < MAX_PAIRINGS {
            self.pairings.push(RetiredPairing {
                our_keyid,
                their_keyid,
                state: Pairing::default(),
                keys: Some(keys),
            });
        }
    }

    /// The pairings a snapshot keeps: those that received a message (a
    /// copy must still be refused after a restart). Derived keys are
    /// derived again.
    fn durable(&self) -> impl Iterator<Item = &RetiredPairing> {
        self.pairings
            .iter()
            .filter(|p| p.state.recv_ctr > 0 || p.state.used_recv_mac.is_some())
    }

    /// Drops the generations past their time or beyond [`MAX_RETIRED`]
    /// (oldest first) and every pairing left without one of its keys,
    /// appending the receiving MAC keys those pairings used to `reveal`.
    /// `live_ours` and `live_theirs` are the keyids the ratchet itself
    /// holds. Returns whether anything was dropped.
    pub(super) fn expire(
        &mut self,
        now: u64,
        live_ours: [u32; 2],
        live_theirs: [Option<u32>; 2],
        reveal: &mut Zeroizing<Vec<u8>>,
    ) -> bool {
        let before = (self.ours.len(), self.theirs.len(), self.pairings.len());
        self.ours.retain(|o| o.until > now);
        self.theirs.retain(|t| t.until > now);
        // Pushed in retirement order: the oldest are first.
        let extra = self.ours.len().saturating_sub(MAX_RETIRED);
        self.ours.drain(..extra);
        let extra = self.theirs.len().saturating_sub(MAX_RETIRED);
        self.theirs.drain(..extra);
        let (ours, theirs) = (&self.ours, &self.theirs);
        self.pairings.retain_mut(|p| {
            let kept = (live_ours.contains(&p.our_keyid)
                || ours.iter().any(|o| o.keyid == p.our_keyid))
                && (live_theirs.contains(&Some(p.their_keyid))
                    || theirs.iter().any(|t| t.keyid == p.their_keyid));
            if !kept && let Some(mac) = p.state.used_recv_mac.take() {
                reveal.extend_from_slice(&mac);
            }
            kept
        });
        before != (self.ours.len(), self.theirs.len(), self.pairings.len())
    }

    /// Writes the retired generations (snapshot format 5): our key pairs
    /// (keyid, secret, public value, until), their keys (keyid, key,
    /// until), then the states of the pairings that received a message
    /// (keyids, receiving counter, replay window, used MAC key).
    pub(super) fn encode(&self, w: &mut Writer) {
        // Each list is bounded far below 256 (see `decode`).
        w.byte(u8::try_from(self.ours.len()).unwrap_or(u8::MAX));
        for o in &self.ours {
            w.int(o.keyid);
            w.data(&o.pair.dangerous_secret_bytes());
            w.mpi(o.pair.public().as_mpi());
            w.raw(&o.until.to_be_bytes());
        }
        w.byte(u8::try_from(self.theirs.len()).unwrap_or(u8::MAX));
        for t in &self.theirs {
            w.int(t.keyid);
            w.mpi(t.key.as_mpi());
            w.raw(&t.until.to_be_bytes());
        }
        w.byte(u8::try_from(self.durable().count()).unwrap_or(u8::MAX));
        for p in self.durable() {
            w.int(p.our_keyid).int(p.their_keyid);
            w.raw(&p.state.recv_ctr.to_be_bytes());
            w.raw(&p.state.seen.to_be_bytes());
            match &p.state.used_recv_mac {
                Some(k) => w.byte(1).raw(k),
                None => w.byte(0),
            };
        }
    }

    /// Length of [`Retired::encode`]'s output.
    pub(super) fn encoded_len(&self) -> usize {
        let field = |len: usize| 4 + len;
        let ours: usize = self
            .ours
            .iter()
            .map(|o| 4 + field(DhKeyPair::SECRET_LEN) + field(o.pair.public().as_mpi().len()) + 8)
            .sum();
        let theirs: usize = self
            .theirs
            .iter()
            .map(|t| 4 + field(t.key.as_mpi().len()) + 8)
            .sum();
        let pairings: usize = self
            .durable()
            .map(|p| 4 + 4 + 8 + 8 + 1 + p.state.used_recv_mac.map_or(0, |m| m.len()))
            .sum();
        3 + ours + theirs + pairings
    }

    /// Inverse of [`Retired::encode`].
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let mut out = Retired::default();
        let n = usize::from(r.byte("retired ours")?);
        if n > MAX_RETIRED {
            return Err(Error::Snapshot("too many retired keys"));
        }
        for _ in 0..n {
            let keyid = r.int("retired keyid")?;
            let secret = r.data("retired secret")?;
            let public = DhPublicKey::from_mpi(r.mpi("retired public")?)?;
            let pair = DhKeyPair::from_stored(secret, public)?;
            let until = u64::from_be_bytes(r.array("retired until")?);
            out.ours.push(Ours { keyid, pair, until });
        }
        let n = usize::from(r.byte("retired theirs")?);
        if n > MAX_RETIRED {
            return Err(Error::Snapshot("too many retired keys"));
        }
        for _ in 0..n {
            let keyid = r.int("retired keyid")?;
            let key = DhPublicKey::from_mpi(r.mpi("retired key")?)?;
            let until = u64::from_be_bytes(r.array("retired until")?);
            out.theirs.push(Theirs { keyid, key, until });
        }
        let n = usize::from(r.byte("retired pairings")?);
        if n > MAX_PAIRINGS {
            return Err(Error::Snapshot("too many retired pairings"));
        }
        for _ in 0..n {
            let our_keyid = r.int("retired our keyid")?;
            let their_keyid = r.int("retired their keyid")?;
            let state = Pairing {
                send_ctr: 0,
                recv_ctr: u64::from_be_bytes(r.array("retired recv_ctr")?),
                seen: u64::from_be_bytes(r.array("retired seen")?),
                used_recv_mac: match r.byte("mac?")? {
                    0 => None,
                    1 => Some(r.array("retired mac")?),
                    _ => return Err(Error::Snapshot("bad option flag")),
                },
            };
            out.pairings.push(RetiredPairing {
                our_keyid,
                their_keyid,
                state,
                keys: None,
            });
        }
        Ok(out)
    }
}
