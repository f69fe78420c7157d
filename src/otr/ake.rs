//! The OTR authenticated key exchange (spec §"Authenticated Key Exchange",
//! §"Authentication state" and the D-H Commit / D-H Key / Reveal Signature /
//! Signature receiving rules).
//!
//! States use the spec's names. Each transition consumes the old state, so a
//! state's secrets (`r`, the DH private key, the derived AES and MAC keys)
//! are dropped — and zeroized — as soon as it is left.
//!
//! Roles: the *initiator* sends D-H Commit and Reveal Signature (Bob in the
//! spec), the *responder* sends D-H Key and Signature (Alice).

use rand_core::CryptoRng;
use zeroize::{Zeroize, Zeroizing};

use super::codec::{Reader, Writer};
use super::crypto::{
    DhKeyPair, DhPublicKey, DsaPrivateKey, DsaPublicKey, SecretBytes, SharedSecret, aes128_ctr,
    ct_eq, h2, hmac_sha256, hmac_sha256_160, sha256,
};
use super::error::{Error, PeerMisbehaved};
use super::message::{
    Body, DhCommit, DhKey, EncodedMessage, Header, RevealSignature, Signature, Version,
};

/// The keyid our AKE DH key gets (libotr always uses 1 for a fresh AKE).
pub const AKE_KEYID: u32 = 1;

/// Keys derived from the AKE shared secret (spec §"Computing AES keys, MAC
/// keys, and the secure session id").
struct AkeKeys {
    ssid: [u8; 8],
    c: [u8; 16],
    c_prime: [u8; 16],
    m1: [u8; 32],
    m2: [u8; 32],
    m1_prime: [u8; 32],
    m2_prime: [u8; 32],
}

impl AkeKeys {
    fn derive(s: &SharedSecret) -> Self {
        let h0 = h2(0x00, s);
        let h1 = h2(0x01, s);
        let mut keys = AkeKeys {
            ssid: [0; 8],
            c: [0; 16],
            c_prime: [0; 16],
            m1: *h2(0x02, s),
            m2: *h2(0x03, s),
            m1_prime: *h2(0x04, s),
            m2_prime: *h2(0x05, s),
        };
        keys.ssid.copy_from_slice(&h0[..8]);
        keys.c.copy_from_slice(&h1[..16]);
        keys.c_prime.copy_from_slice(&h1[16..]);
        keys
    }
}

impl Drop for AkeKeys {
    fn drop(&mut self) {
        self.ssid.zeroize();
        self.c.zeroize();
        self.c_prime.zeroize();
        self.m1.zeroize();
        self.m2.zeroize();
        self.m1_prime.zeroize();
        self.m2_prime.zeroize();
    }
}

/// What a completed AKE hands to the data-message layer.
pub struct AkeComplete {
    /// Protocol version the AKE ran under.
    pub version: Version,
    /// The secure session id.
    pub ssid: [u8; 8],
    /// Whether we sent the Reveal Signature message (decides which half of
    /// the ssid is shown in bold, spec).
    pub we_initiated: bool,
    /// Our DH key pair used in the AKE (keyid [`AKE_KEYID`]).
    pub our_dh: DhKeyPair,
    /// Their DH public key from the AKE.
    pub their_dh: DhPublicKey,
    /// The keyid they gave that key.
    pub their_keyid: u32,
    /// Their long-term public key, authenticated by the AKE.
    pub their_long_term: DsaPublicKey,
}

impl std::fmt::Debug for AkeComplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AkeComplete")
            .field("version", &self.version)
            .field("their_keyid", &self.their_keyid)
            .field("fingerprint", &self.their_long_term.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The authentication state (spec §"Authentication state").
#[derive(Default)]
pub enum AuthState {
    /// No AKE in progress.
    #[default]
    None,
    /// We sent a D-H Commit and wait for the D-H Key.
    AwaitingDhKey(Box<AwaitingDhKey>),
    /// We sent a D-H Key and wait for the Reveal Signature.
    AwaitingRevealSig(Box<AwaitingRevealSig>),
    /// We sent a Reveal Signature and wait for the Signature.
    AwaitingSig(Box<AwaitingSig>),
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Initiator, after sending D-H Commit.
pub struct AwaitingDhKey {
    version: Version,
    our_dh: DhKeyPair,
    r: Zeroizing<[u8; 16]>,
    hashed_gx: [u8; 32],
    commit: EncodedMessage,
}

/// Responder, after sending D-H Key.
pub struct AwaitingRevealSig {
    version: Version,
    our_dh: DhKeyPair,
    their_encrypted_gx: Vec<u8>,
    their_hashed_gx: Vec<u8>,
    dh_key: EncodedMessage,
}

/// Initiator, after sending Reveal Signature.
pub struct AwaitingSig {
    version: Version,
    our_dh: DhKeyPair,
    their_dh: DhPublicKey,
    keys: AkeKeys,
    reveal_sig: EncodedMessage,
}

/// Start of a durable handshake record ([`AuthState::awaiting_sig_record`]).
const RECORD_MAGIC: &[u8; 8] = b"O2TR-AKE";
/// The record format written (and the only one read).
const RECORD_FORMAT: u8 = 1;

/// A handshake restored from its durable record
/// ([`AuthState::from_awaiting_sig_record`]).
pub struct RestoredAke {
    /// The state: always [`AuthState::AwaitingSig`].
    pub state: AuthState,
    /// The header of the Reveal Signature we sent: its instance tags say
    /// whose handshake it is.
    pub header: Header,
    /// When the record was written (unix seconds).
    pub saved_at: u64,
}

impl std::fmt::Debug for RestoredAke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoredAke")
            .field("state", &self.state)
            .field("header", &self.header)
            .field("saved_at", &self.saved_at)
            .finish()
    }
}

/// The result of feeding one AKE message to the state machine.
#[derive(Debug, Default)]
pub struct AkeStep {
    /// A message to send back, if any.
    pub reply: Option<EncodedMessage>,
    /// Set when the AKE finished successfully.
    pub complete: Option<AkeComplete>,
    /// Why an incoming message was ignored, when it was (for logs).
    pub ignored: Option<&'static str>,
}

impl AkeStep {
    fn reply(m: EncodedMessage) -> Self {
        Self {
            reply: Some(m),
            ..Self::default()
        }
    }
    fn ignored(why: &'static str) -> Self {
        Self {
            ignored: Some(why),
            ..Self::default()
        }
    }
}

/// Instance tags for outgoing AKE messages.
#[derive(Clone, Copy, Debug)]
pub struct Tags {
    /// Ours.
    pub ours: u32,
    /// Theirs (0 when not known yet).
    pub theirs: u32,
}

fn header(version: Version, tags: Tags) -> Header {
    match version {
        Version::V2 => Header {
            version,
            sender_tag: 0,
            receiver_tag: 0,
        },
        Version::V3 => Header {
            version,
            sender_tag: tags.ours,
            receiver_tag: tags.theirs,
        },
    }
}

fn mpi_bytes(magnitude: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(magnitude.len() + 4);
    w.mpi(magnitude);
    w.into_vec()
}

impl AuthState {
    /// The spec's name of the state.
    pub fn name(&self) -> &'static str {
        match self {
            AuthState::None => "AUTHSTATE_NONE",
            AuthState::AwaitingDhKey(_) => "AUTHSTATE_AWAITING_DHKEY",
            AuthState::AwaitingRevealSig(_) => "AUTHSTATE_AWAITING_REVEALSIG",
            AuthState::AwaitingSig(_) => "AUTHSTATE_AWAITING_SIG",
        }
    }

    /// Whether an AKE is in progress.
    pub fn in_progress(&self) -> bool {
        !matches!(self, AuthState::None)
    }

    /// The durable record of an initiator's handshake that sent its Reveal
    /// Signature and waits for the Signature (`None` in any other state).
    /// The peer commits its new session when it sends the Signature and
    /// encrypts its next messages under it at once, so if we forgot this
    /// state in a crash those messages could never be read (found by the
    /// chaos campaign: an initiator SIGKILLed right after its Reveal
    /// Signature). Holds our AKE secret exponent: wiped on drop.
    pub fn awaiting_sig_record(&self, now: u64) -> Option<SecretBytes> {
        let AuthState::AwaitingSig(st) = self else {
            return None;
        };
        let secret = st.our_dh.dangerous_secret_bytes();
        let ours = st.our_dh.public().to_mpi();
        let theirs = st.their_dh.to_mpi();
        let reveal = st.reveal_sig.encode();
        let mut w = Writer::secret(
            8 + 1 + 2 + 8 + 3 * 4 + 4 + secret.len() + ours.len() + theirs.len() + reveal.len(),
        );
        w.raw(RECORD_MAGIC).byte(RECORD_FORMAT);
        w.short(st.version.number());
        w.raw(&now.to_be_bytes());
        w.data(&secret).mpi(&ours).mpi(&theirs).data(&reveal);
        Some(w.into_secret())
    }

    /// Rebuild the state of [`AuthState::awaiting_sig_record`] (after a
    /// restart). The session keys are derived again from the two D-H
    /// values (one exponentiation).
    pub fn from_awaiting_sig_record(bytes: &[u8]) -> Result<RestoredAke, Error> {
        let mut r = Reader::new(bytes);
        if r.array::<8>("magic")? != *RECORD_MAGIC {
            return Err(Error::Snapshot("not a handshake record"));
        }
        if r.byte("format")? != RECORD_FORMAT {
            return Err(Error::Snapshot("unknown handshake record format"));
        }
        let version = Version::from_number(r.short("version")?)
            .ok_or(Error::Snapshot("unknown protocol version"))?;
        let saved_at = u64::from_be_bytes(r.array::<8>("saved_at")?);
        let secret = Zeroizing::new(r.data("secret")?.to_vec());
        let ours = DhPublicKey::from_mpi(r.mpi("our public value")?)?;
        let our_dh = DhKeyPair::from_stored(&secret, ours)?;
        let their_dh = DhPublicKey::from_mpi(r.mpi("their public value")?)?;
        let reveal_sig = EncodedMessage::decode(r.data("reveal signature")?)
            .map_err(|_| Error::Snapshot("unreadable Reveal Signature in handshake record"))?;
        r.finish()?;
        if reveal_sig.header.version != version
            || !matches!(reveal_sig.body, Body::RevealSignature(_))
        {
            return Err(Error::Snapshot(
                "handshake record does not hold a Reveal Signature",
            ));
        }
        let keys = AkeKeys::derive(&our_dh.shared_secret(&their_dh));
        let header = reveal_sig.header;
        Ok(RestoredAke {
            state: AuthState::AwaitingSig(Box::new(AwaitingSig {
                version,
                our_dh,
                their_dh,
                keys,
                reveal_sig,
            })),
            header,
            saved_at,
        })
    }

    /// Start an AKE as initiator: returns the new state and the D-H Commit to send.
    pub fn start<R: CryptoRng + ?Sized>(
        version: Version,
        tags: Tags,
        rng: &mut R,
    ) -> (AuthState, EncodedMessage) {
        let our_dh = DhKeyPair::generate(rng);
        let mut r = Zeroizing::new([0u8; 16]);
        rng.fill_bytes(&mut r[..]);
        let mut gxmpi = mpi_bytes(&our_dh.public().to_mpi());
        let hashed_gx = sha256(&gxmpi);
        aes128_ctr(&r, &[0; 8], &mut gxmpi);
        let commit = EncodedMessage {
            header: header(version, tags),
            body: Body::DhCommit(DhCommit {
                encrypted_gx: gxmpi,
                hashed_gx: hashed_gx.to_vec(),
            }),
        };
        let state = AuthState::AwaitingDhKey(Box::new(AwaitingDhKey {
            version,
            our_dh,
            r,
            hashed_gx,
            commit: commit.clone(),
        }));
        (state, commit)
    }

    /// Handle a received D-H Commit message.
    pub fn handle_dh_commit<R: CryptoRng + ?Sized>(
        self,
        version: Version,
        tags: Tags,
        msg: &DhCommit,
        rng: &mut R,
    ) -> (AuthState, AkeStep) {
        match self {
            AuthState::AwaitingDhKey(ours) => {
                // Commit collision: the higher hashed gx wins (spec, "the
                // trickiest transition in the whole protocol").
                if ours.hashed_gx.as_slice() > msg.hashed_gx.as_slice() {
                    let resend = ours.commit.clone();
                    (AuthState::AwaitingDhKey(ours), AkeStep::reply(resend))
                } else {
                    drop(ours);
                    Self::respond_to_commit(version, tags, msg, rng)
                }
            }
            AuthState::AwaitingRevealSig(mut st) => {
                // Retransmit the same D-H Key, but remember the new commit.
                st.their_encrypted_gx = msg.encrypted_gx.clone();
                st.their_hashed_gx = msg.hashed_gx.clone();
                let mut reply = st.dh_key.clone();
                // The peer's instance may only now be known.
                reply.header = header(st.version, tags);
                st.dh_key = reply.clone();
                (AuthState::AwaitingRevealSig(st), AkeStep::reply(reply))
            }
            AuthState::None | AuthState::AwaitingSig(_) => {
                Self::respond_to_commit(version, tags, msg, rng)
            }
        }
    }

    fn respond_to_commit<R: CryptoRng + ?Sized>(
        version: Version,
        tags: Tags,
        msg: &DhCommit,
        rng: &mut R,
    ) -> (AuthState, AkeStep) {
        let our_dh = DhKeyPair::generate(rng);
        let dh_key = EncodedMessage {
            header: header(version, tags),
            body: Body::DhKey(DhKey {
                gy: our_dh.public().to_mpi(),
            }),
        };
        let state = AuthState::AwaitingRevealSig(Box::new(AwaitingRevealSig {
            version,
            our_dh,
            their_encrypted_gx: msg.encrypted_gx.clone(),
            their_hashed_gx: msg.hashed_gx.clone(),
            dh_key: dh_key.clone(),
        }));
        (state, AkeStep::reply(dh_key))
    }

    /// Handle a received D-H Key message.
    pub fn handle_dh_key<R: CryptoRng + ?Sized>(
        self,
        tags: Tags,
        msg: &DhKey,
        our_long_term: &DsaPrivateKey,
        rng: &mut R,
    ) -> Result<(AuthState, AkeStep), (AuthState, Error)> {
        match self {
            AuthState::AwaitingDhKey(st) => {
                let their_dh = match DhPublicKey::from_mpi(&msg.gy) {
                    Ok(k) => k,
                    Err(e) => return Err((AuthState::AwaitingDhKey(st), Error::Crypto(e))),
                };
                let AwaitingDhKey {
                    version, our_dh, r, ..
                } = *st;
                let s = our_dh.shared_secret(&their_dh);
                let keys = AkeKeys::derive(&s);
                let gx = our_dh.public().to_mpi();
                let gy = their_dh.to_mpi();
                let (enc, mac) =
                    sign_and_encrypt(&keys.m1, &keys.m2, &keys.c, &gx, &gy, our_long_term, rng);
                let reveal_sig = EncodedMessage {
                    header: header(version, tags),
                    body: Body::RevealSignature(RevealSignature {
                        revealed_key: r.to_vec(),
                        encrypted_sig: enc,
                        mac,
                    }),
                };
                let st = AwaitingSig {
                    version,
                    our_dh,
                    their_dh,
                    keys,
                    reveal_sig: reveal_sig.clone(),
                };
                Ok((
                    AuthState::AwaitingSig(Box::new(st)),
                    AkeStep::reply(reveal_sig),
                ))
            }
            AuthState::AwaitingSig(st) => {
                // Same D-H Key as before: our Reveal Signature was lost.
                let same = DhPublicKey::from_mpi(&msg.gy)
                    .map(|k| k == st.their_dh)
                    .unwrap_or(false);
                if same {
                    let resend = st.reveal_sig.clone();
                    Ok((AuthState::AwaitingSig(st), AkeStep::reply(resend)))
                } else {
                    Ok((
                        AuthState::AwaitingSig(st),
                        AkeStep::ignored("D-H Key differs from the one we answered"),
                    ))
                }
            }
            other => Ok((other, AkeStep::ignored("unexpected D-H Key"))),
        }
    }

    /// Handle a received Reveal Signature message.
    pub fn handle_reveal_signature<R: CryptoRng + ?Sized>(
        self,
        tags: Tags,
        msg: &RevealSignature,
        our_long_term: &DsaPrivateKey,
        rng: &mut R,
    ) -> Result<(AuthState, AkeStep), Error> {
        let st = match self {
            AuthState::AwaitingRevealSig(st) => st,
            other => {
                return Ok((other, AkeStep::ignored("unexpected Reveal Signature")));
            }
        };
        // Whatever happens next, the AKE ends here (spec: authstate goes to
        // NONE regardless of whether verification succeeds).
        let AwaitingRevealSig {
            version,
            our_dh,
            their_encrypted_gx,
            their_hashed_gx,
            ..
        } = *st;
        let r: [u8; 16] = msg
            .revealed_key
            .as_slice()
            .try_into()
            .map_err(|_| PeerMisbehaved::BadRevealedKey)?;
        let r = Zeroizing::new(r);
        let mut gxmpi = Zeroizing::new(their_encrypted_gx);
        aes128_ctr(&r, &[0; 8], &mut gxmpi);
        if !ct_eq(&sha256(&gxmpi), &their_hashed_gx) {
            return Err(PeerMisbehaved::CommitmentMismatch.into());
        }
        let mut reader = Reader::new(&gxmpi);
        let gx_mag = reader.mpi("gx")?;
        reader.finish()?;
        let their_dh = DhPublicKey::from_mpi(gx_mag)?;
        let s = our_dh.shared_secret(&their_dh);
        let keys = AkeKeys::derive(&s);
        let gx = their_dh.to_mpi();
        let gy = our_dh.public().to_mpi();
        let (their_long_term, their_keyid) = verify_and_decrypt(
            &keys.m1,
            &keys.m2,
            &keys.c,
            &gx,
            &gy,
            &msg.encrypted_sig,
            &msg.mac,
        )?;
        let (enc, mac) = sign_and_encrypt(
            &keys.m1_prime,
            &keys.m2_prime,
            &keys.c_prime,
            &gy,
            &gx,
            our_long_term,
            rng,
        );
        let reply = EncodedMessage {
            header: header(version, tags),
            body: Body::Signature(Signature {
                encrypted_sig: enc,
                mac,
            }),
        };
        let complete = AkeComplete {
            version,
            ssid: keys.ssid,
            we_initiated: false,
            our_dh,
            their_dh,
            their_keyid,
            their_long_term,
        };
        Ok((
            AuthState::None,
            AkeStep {
                reply: Some(reply),
                complete: Some(complete),
                ignored: None,
            },
        ))
    }

    /// Handle a received Signature message.
    pub fn handle_signature(self, msg: &Signature) -> Result<(AuthState, AkeStep), Error> {
        let st = match self {
            AuthState::AwaitingSig(st) => st,
            other => return Ok((other, AkeStep::ignored("unexpected Signature"))),
        };
        let AwaitingSig {
            version,
            our_dh,
            their_dh,
            keys,
            ..
        } = *st;
        let gy = their_dh.to_mpi();
        let gx = our_dh.public().to_mpi();
        let (their_long_term, their_keyid) = verify_and_decrypt(
            &keys.m1_prime,
            &keys.m2_prime,
            &keys.c_prime,
            &gy,
            &gx,
            &msg.encrypted_sig,
            &msg.mac,
        )?;
        let complete = AkeComplete {
            version,
            ssid: keys.ssid,
            we_initiated: true,
            our_dh,
            their_dh,
            their_keyid,
            their_long_term,
        };
        Ok((
            AuthState::None,
            AkeStep {
                reply: None,
                complete: Some(complete),
                ignored: None,
            },
        ))
    }
}

/// M = HMAC-SHA256(m1, MPI(a) || MPI(b) || PUB || INT keyid).
fn authenticator(m1: &[u8; 32], a: &[u8], b: &[u8], public: &DsaPublicKey, keyid: u32) -> [u8; 32] {
    let mut w = Writer::with_capacity(512);
    w.mpi(a).mpi(b);
    public.encode(&mut w);
    w.int(keyid);
    hmac_sha256(m1, w.as_slice())
}

/// Build X = PUB || keyid || sig(M), encrypt it with `c` and MAC the DATA
/// encoding with `m2` (spec: Reveal Signature / Signature "Encrypted
/// signature" and "MAC'd signature").
fn sign_and_encrypt<R: CryptoRng + ?Sized>(
    m1: &[u8; 32],
    m2: &[u8; 32],
    c: &[u8; 16],
    ours: &[u8],
    theirs: &[u8],
    key: &DsaPrivateKey,
    rng: &mut R,
) -> (Vec<u8>, [u8; 20]) {
    let public = key.public_key();
    let m = authenticator(m1, ours, theirs, public, AKE_KEYID);
    let sig = key.sign(&m, rng);
    let mut x = Writer::with_capacity(512);
    public.encode(&mut x);
    x.int(AKE_KEYID).raw(&sig);
    let mut enc = x.into_vec();
    aes128_ctr(c, &[0; 8], &mut enc);
    let mut data = Writer::with_capacity(enc.len() + 4);
    data.data(&enc);
    let mac = hmac_sha256_160(m2, data.as_slice());
    (enc, mac)
}

/// Verify the MAC (before decrypting anything), decrypt X, and verify the
/// signature over M. Returns the peer's long-term key and DH keyid.
fn verify_and_decrypt(
    m1: &[u8; 32],
    m2: &[u8; 32],
    c: &[u8; 16],
    theirs: &[u8],
    ours: &[u8],
    encrypted: &[u8],
    mac: &[u8; 20],
) -> Result<(DsaPublicKey, u32), Error> {
    let mut data = Writer::with_capacity(encrypted.len() + 4);
    data.data(encrypted);
    if !ct_eq(&hmac_sha256_160(m2, data.as_slice()), mac) {
        return Err(PeerMisbehaved::AkeMacMismatch.into());
    }
    let mut x = Zeroizing::new(encrypted.to_vec());
    aes128_ctr(c, &[0; 8], &mut x);
    let mut r = Reader::new(&x);
    let public = DsaPublicKey::decode(&mut r)?;
    let keyid = r.int("keyid")?;
    if keyid == 0 {
        return Err(PeerMisbehaved::ZeroKeyid.into());
    }
    let sig = r.rest();
    let m = authenticator(m1, theirs, ours, &public, keyid);
    if !public.verify(&m, sig) {
        return Err(PeerMisbehaved::BadSignature.into());
    }
    Ok((public, keyid))
}
