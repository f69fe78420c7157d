//! OTR messages on the wire (spec §"Unencoded messages", §"Encoded
//! messages", §"Instance Tags", the four AKE messages and §"Data Message").
//!
//! Two layers live here:
//!
//! * [`EncodedMessage`]: the binary form of the D-H Commit, D-H Key, Reveal
//!   Signature, Signature and Data messages for protocol versions 2 (no
//!   instance tags) and 3, with [`EncodedMessage::encode`] /
//!   [`EncodedMessage::decode`] and the `?OTR:…​.` base-64 armour;
//!   [`encode_data`] writes a data message we send straight into its
//!   encoding (the caller's closures encrypt and MAC it in place).
//! * [`parse`]: classification of any received text into plaintext (with an
//!   optional whitespace tag), query, error, encoded message or fragment, in
//!   the order libotr 4.1.1 applies (the first `?OTR` marker decides; a
//!   fragment marker is checked before the others).
//!
//! Nothing here does cryptography itself: MPIs are carried as big-endian
//! magnitudes, encrypted fields and MACs as raw bytes. Version 1 is never
//! supported: a version-1 encoded message is an [`MessageError::UnknownVersion`]
//! and a version-1-only query offers no version.

use thiserror::Error;

use super::codec::{CodecError, Reader, Writer};
use super::fragment::{self, Fragment};

/// An OTR protocol version this crate speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// OTR version 2: no instance tags.
    V2,
    /// OTR version 3: instance tags in every message.
    V3,
}

impl Version {
    /// The protocol version number as it appears on the wire (2 or 3).
    pub fn number(self) -> u16 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }

    /// The version for a wire number, if we speak it.
    pub fn from_number(n: u16) -> Option<Self> {
        match n {
            2 => Some(Version::V2),
            3 => Some(Version::V3),
            _ => None,
        }
    }

    /// The digit that stands for this version in a query message.
    fn query_digit(self) -> char {
        match self {
            Version::V2 => '2',
            Version::V3 => '3',
        }
    }

    /// The 8-byte whitespace tag advertising this version (spec §"Tagged
    /// plaintext messages").
    pub fn whitespace_tag(self) -> &'static str {
        match self {
            Version::V2 => WHITESPACE_TAG_V2,
            Version::V3 => WHITESPACE_TAG_V3,
        }
    }
}

/// The smallest valid instance tag (spec §"Instance Tags").
pub const MIN_INSTANCE_TAG: u32 = 0x100;

/// Message type byte of the D-H Commit message.
pub const TYPE_DH_COMMIT: u8 = 0x02;
/// Message type byte of the Data message.
pub const TYPE_DATA: u8 = 0x03;
/// Message type byte of the D-H Key message.
pub const TYPE_DH_KEY: u8 = 0x0a;
/// Message type byte of the Reveal Signature message.
pub const TYPE_REVEAL_SIGNATURE: u8 = 0x11;
/// Message type byte of the Signature message.
pub const TYPE_SIGNATURE: u8 = 0x12;

/// Data message flag: ignore the message silently if it cannot be read.
pub const FLAG_IGNORE_UNREADABLE: u8 = 0x01;

/// The 16-byte base whitespace tag every tagged plaintext carries.
pub const WHITESPACE_TAG_BASE: &str =
    "\x20\x09\x20\x20\x09\x09\x09\x09\x20\x09\x20\x09\x20\x09\x20\x20";
/// The 8-byte whitespace tag for version 1 (recognised, never offered).
pub const WHITESPACE_TAG_V1: &str = "\x20\x09\x20\x09\x20\x20\x09\x20";
/// The 8-byte whitespace tag for version 2.
pub const WHITESPACE_TAG_V2: &str = "\x20\x20\x09\x09\x20\x20\x09\x20";
/// The 8-byte whitespace tag for version 3.
pub const WHITESPACE_TAG_V3: &str = "\x20\x20\x09\x09\x20\x20\x09\x09";

/// Prefix of every base-64 armoured binary message.
pub const ENCODED_PREFIX: &str = "?OTR:";
/// Prefix of an OTR error message.
pub const ERROR_PREFIX: &str = "?OTR Error:";

/// The common start of every OTR marker.
const OTR_MARKER: &str = "?OTR";

/// Anything wrong with a received OTR message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// The binary form was truncated, had trailing bytes or an oversized
    /// field.
    #[error("malformed message: {0}")]
    Codec(#[from] CodecError),
    /// The text between `?OTR:` and `.` is not valid base-64.
    #[error("invalid base-64 in an encoded message")]
    Base64,
    /// The protocol version is one we do not speak (1, or unknown).
    #[error("unsupported protocol version {0}")]
    UnknownVersion(u16),
    /// The message type byte is not one of the five encoded messages.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// `?OTR:` without the terminating `.`.
    #[error("encoded message has no terminating '.'")]
    Unterminated,
    /// A version 3 sender tag below 0x100, or a receiver tag in 1..0x100.
    #[error("invalid instance tags: sender {sender:#010x}, receiver {receiver:#010x}")]
    InvalidInstanceTag {
        /// The sender instance tag as received.
        sender: u32,
        /// The receiver instance tag as received.
        receiver: u32,
    },
    /// An MPI that the MAC covers had leading zero bytes: re-encoding it
    /// would not reproduce the authenticated bytes.
    #[error("{0} is not a minimally encoded MPI")]
    NonMinimalMpi(&'static str),
    /// A `?OTR|` or `?OTR,` fragment that does not follow the fragment
    /// format.
    #[error("malformed fragment: {0}")]
    MalformedFragment(&'static str),
}

/// The header every encoded message starts with.
///
/// Version 2 messages carry no instance tags: both tags are 0 after
/// decoding and are not written by [`EncodedMessage::encode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Protocol version.
    pub version: Version,
    /// Sender instance tag (v3 only; 0 for v2).
    pub sender_tag: u32,
    /// Receiver instance tag (v3 only; 0 when unknown or for v2).
    pub receiver_tag: u32,
}

impl Header {
    /// A version 2 header (no instance tags).
    pub fn v2() -> Self {
        Self {
            version: Version::V2,
            sender_tag: 0,
            receiver_tag: 0,
        }
    }

    /// A version 3 header with the given instance tags.
    pub fn v3(sender_tag: u32, receiver_tag: u32) -> Self {
        Self {
            version: Version::V3,
            sender_tag,
            receiver_tag,
        }
    }

    fn write(&self, w: &mut Writer, typ: u8) {
        w.short(self.version.number()).byte(typ);
        if self.version == Version::V3 {
            w.int(self.sender_tag).int(self.receiver_tag);
        }
    }
}

/// Checks the spec's instance tag rules for a version 3 message: the
/// sender tag must be at least [`MIN_INSTANCE_TAG`], the receiver tag 0 or
/// at least [`MIN_INSTANCE_TAG`].
pub fn check_instance_tags(sender: u32, receiver: u32) -> Result<(), MessageError> {
    if sender < MIN_INSTANCE_TAG || (receiver != 0 && receiver < MIN_INSTANCE_TAG) {
        return Err(MessageError::InvalidInstanceTag { sender, receiver });
    }
    Ok(())
}

/// The D-H Commit message (type 0x02).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhCommit {
    /// AES-CTR encryption of g^x as an MPI, under the key r.
    pub encrypted_gx: Vec<u8>,
    /// SHA-256 of the g^x MPI.
    pub hashed_gx: Vec<u8>,
}

/// The D-H Key message (type 0x0a).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhKey {
    /// g^y as a big-endian magnitude (the MPI without its length).
    pub gy: Vec<u8>,
}

/// The Reveal Signature message (type 0x11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevealSignature {
    /// The AES key r committed to in the D-H Commit.
    pub revealed_key: Vec<u8>,
    /// The encrypted X_B structure.
    pub encrypted_sig: Vec<u8>,
    /// SHA256-HMAC-160 over the encrypted signature DATA field.
    pub mac: [u8; 20],
}

/// The Signature message (type 0x12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// The encrypted X_A structure.
    pub encrypted_sig: Vec<u8>,
    /// SHA256-HMAC-160 over the encrypted signature DATA field.
    pub mac: [u8; 20],
}

/// The Data message (type 0x03).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataMessage {
    /// Bitwise OR of flags ([`FLAG_IGNORE_UNREADABLE`]).
    pub flags: u8,
    /// The sender's key id used for this message.
    pub sender_keyid: u32,
    /// The recipient's key id used for this message.
    pub recipient_keyid: u32,
    /// The sender's next D-H public key, as a big-endian magnitude.
    pub next_dh: Vec<u8>,
    /// Top half of the AES-CTR counter.
    pub ctr: [u8; 8],
    /// The encrypted plaintext (with its TLVs).
    pub encrypted: Vec<u8>,
    /// SHA1-HMAC over [`DataMessage::authenticated_bytes`].
    pub mac: [u8; 20],
    /// Old MAC keys revealed: concatenated 20-byte keys.
    pub revealed_mac_keys: Vec<u8>,
}

/// The bytes of a v3 data message besides `next_dh`, the ciphertext and
/// the revealed keys: header 11, flags 1, keyids 8, three lengths 12,
/// counter 8, MAC 20.
const DATA_FIXED_BYTES: usize = 60;

/// The fields of a data message we send that precede its ciphertext, for
/// [`encode_data`].
#[derive(Clone, Copy, Debug)]
pub struct DataFields<'a> {
    /// Bitwise OR of flags.
    pub flags: u8,
    /// The sender's key id.
    pub sender_keyid: u32,
    /// The recipient's key id.
    pub recipient_keyid: u32,
    /// The sender's next D-H public key (minimal big-endian magnitude).
    pub next_dh: &'a [u8],
    /// Top half of the AES-CTR counter.
    pub ctr: [u8; 8],
}

/// The binary encoding of a data message we send, built in one buffer:
/// `plaintext` is copied where the ciphertext goes and `encrypt` turns it
/// into the ciphertext there; `mac` gets the authenticated bytes (they are
/// contiguous in the encoding, see [`DataMessage::authenticated_bytes`])
/// and returns the MAC; `revealed_mac_keys` follow it. The same bytes as
/// [`EncodedMessage::encode`] of the equivalent [`DataMessage`], without
/// building one (no buffer for the ciphertext and `next_dh`, no copy of
/// the ciphertext, no MAC input assembled in pieces).
///
/// The encoding goes into `buf`, emptied first: a sender that keeps the
/// buffer between messages reuses its allocation.
pub fn encode_data(
    header: &Header,
    fields: &DataFields<'_>,
    plaintext: &[u8],
    revealed_mac_keys: &[u8],
    encrypt: impl FnOnce(&mut [u8]),
    mac: impl FnOnce(&[u8]) -> [u8; 20],
    buf: Vec<u8>,
) -> Vec<u8> {
    let mut w = Writer::reusing(
        buf,
        DATA_FIXED_BYTES + fields.next_dh.len() + plaintext.len() + revealed_mac_keys.len(),
    );
    header.write(&mut w, TYPE_DATA);
    w.byte(fields.flags)
        .int(fields.sender_keyid)
        .int(fields.recipient_keyid)
        .mpi(fields.next_dh)
        .raw(&fields.ctr)
        .data(plaintext);
    let mut bytes = w.into_vec();
    let start = bytes.len() - plaintext.len();
    encrypt(&mut bytes[start..]);
    let tag = mac(&bytes);
    bytes.extend_from_slice(&tag);
    // Our own revealed keys: a few 20-byte keys, far below 4 GiB.
    bytes.extend_from_slice(
        &u32::try_from(revealed_mac_keys.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    bytes.extend_from_slice(revealed_mac_keys);
    bytes
}

impl DataMessage {
    /// The bytes the data-message MAC covers: everything from the protocol
    /// version to the end of the encrypted message (spec §"Data Message"),
    /// for the given header.
    ///
    /// Because [`EncodedMessage::decode`] rejects a non-minimal `next_dh`
    /// MPI, for a decoded message these are exactly the bytes received.
    pub fn authenticated_bytes(&self, header: &Header) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.next_dh.len() + self.encrypted.len());
        self.write_authenticated(&mut w, header);
        w.into_vec()
    }

    /// The MAC input for the given header ([`authenticated_bytes`]) as
    /// three short pieces on the stack plus the two long fields borrowed
    /// from the message: the MAC is computed over them in turn, without
    /// copying the ciphertext into one buffer first.
    ///
    /// [`authenticated_bytes`]: DataMessage::authenticated_bytes
    pub fn mac_input<'a>(&'a self, header: &Header, scratch: &'a mut MacScratch) -> [&'a [u8]; 4] {
        // Same leading-zero rule as Writer::mpi.
        let start = self
            .next_dh
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(self.next_dh.len());
        let next_dh = &self.next_dh[start..];
        let head = &mut scratch.head;
        let mut n = 0;
        let mut put = |bytes: &[u8]| {
            head[n..n + bytes.len()].copy_from_slice(bytes);
            n += bytes.len();
        };
        put(&header.version.number().to_be_bytes());
        put(&[TYPE_DATA]);
        if header.version == Version::V3 {
            put(&header.sender_tag.to_be_bytes());
            put(&header.receiver_tag.to_be_bytes());
        }
        put(&[self.flags]);
        put(&self.sender_keyid.to_be_bytes());
        put(&self.recipient_keyid.to_be_bytes());
        // Lengths of our own or decoded fields, far below 4 GiB.
        put(&u32::try_from(next_dh.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes());
        let mid = &mut scratch.mid;
        mid[..8].copy_from_slice(&self.ctr);
        mid[8..].copy_from_slice(
            &u32::try_from(self.encrypted.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        [
            &scratch.head[..n],
            next_dh,
            &scratch.mid[..],
            &self.encrypted,
        ]
    }

    fn write_authenticated(&self, w: &mut Writer, header: &Header) {
        header.write(w, TYPE_DATA);
        w.byte(self.flags)
            .int(self.sender_keyid)
            .int(self.recipient_keyid)
            .mpi(&self.next_dh)
            .raw(&self.ctr)
            .data(&self.encrypted);
    }

    /// Whether the IGNORE_UNREADABLE flag is set.
    pub fn ignore_unreadable(&self) -> bool {
        self.flags & FLAG_IGNORE_UNREADABLE != 0
    }
}

/// Stack space for [`DataMessage::mac_input`]: the fixed fields before
/// `next_dh` (at most 24 bytes) and the counter plus the ciphertext
/// length (12 bytes).
#[derive(Default)]
pub struct MacScratch {
    head: [u8; 24],
    mid: [u8; 12],
}

/// The body of an encoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// AKE message 1.
    DhCommit(DhCommit),
    /// AKE message 2.
    DhKey(DhKey),
    /// AKE message 3.
    RevealSignature(RevealSignature),
    /// AKE message 4.
    Signature(Signature),
    /// An encrypted data message.
    Data(DataMessage),
}

impl Body {
    /// The message type byte.
    pub fn message_type(&self) -> u8 {
        match self {
            Body::DhCommit(_) => TYPE_DH_COMMIT,
            Body::DhKey(_) => TYPE_DH_KEY,
            Body::RevealSignature(_) => TYPE_REVEAL_SIGNATURE,
            Body::Signature(_) => TYPE_SIGNATURE,
            Body::Data(_) => TYPE_DATA,
        }
    }

    /// A short human name of the message kind.
    pub fn name(&self) -> &'static str {
        match self {
            Body::DhCommit(_) => "D-H Commit",
            Body::DhKey(_) => "D-H Key",
            Body::RevealSignature(_) => "Reveal Signature",
            Body::Signature(_) => "Signature",
            Body::Data(_) => "Data",
        }
    }
}

/// A binary OTR message: header and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedMessage {
    /// Version and instance tags.
    pub header: Header,
    /// The message proper.
    pub body: Body,
}

impl EncodedMessage {
    /// The binary encoding. For version 2 the instance tags are not
    /// written.
    pub fn encode(&self) -> Vec<u8> {
        // Sized for a data message (the hot path) so the buffer never
        // regrows; AKE messages are smaller than this bound or rare.
        let cap = match &self.body {
            Body::Data(m) => {
                DATA_FIXED_BYTES + m.next_dh.len() + m.encrypted.len() + m.revealed_mac_keys.len()
            }
            _ => 0,
        };
        let mut w = Writer::with_capacity(cap);
        match &self.body {
            Body::DhCommit(m) => {
                self.header.write(&mut w, TYPE_DH_COMMIT);
                w.data(&m.encrypted_gx).data(&m.hashed_gx);
            }
            Body::DhKey(m) => {
                self.header.write(&mut w, TYPE_DH_KEY);
                w.mpi(&m.gy);
            }
            Body::RevealSignature(m) => {
                self.header.write(&mut w, TYPE_REVEAL_SIGNATURE);
                w.data(&m.revealed_key).data(&m.encrypted_sig).raw(&m.mac);
            }
            Body::Signature(m) => {
                self.header.write(&mut w, TYPE_SIGNATURE);
                w.data(&m.encrypted_sig).raw(&m.mac);
            }
            Body::Data(m) => {
                m.write_authenticated(&mut w, &self.header);
                w.raw(&m.mac).data(&m.revealed_mac_keys);
            }
        }
        w.into_vec()
    }

    /// Decodes the binary form. Rejects versions other than 2 and 3,
    /// unknown message types, invalid v3 instance tags, truncation and
    /// trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        Self::decode_fields(bytes, true).map(|(m, _)| m)
    }

    /// [`EncodedMessage::decode`] of a buffer we own: a data message's
    /// ciphertext stays in it (moved to its start) instead of being copied
    /// into a new one.
    fn decode_vec(mut bytes: Vec<u8>) -> Result<Self, MessageError> {
        let (mut m, ciphertext) = Self::decode_fields(&bytes, false)?;
        if let (Body::Data(d), Some(at)) = (&mut m.body, ciphertext) {
            let len = at.len();
            bytes.copy_within(at, 0);
            bytes.truncate(len);
            d.encrypted = bytes;
        }
        Ok(m)
    }

    /// The decoder. Unless `copy_ciphertext`, a data message is returned
    /// with its ciphertext empty and where it is in `bytes`.
    fn decode_fields(
        bytes: &[u8],
        copy_ciphertext: bool,
    ) -> Result<(Self, Option<std::ops::Range<usize>>), MessageError> {
        let mut ciphertext = None;
        let mut r = Reader::new(bytes);
        let number = r.short("protocol version")?;
        let version = Version::from_number(number).ok_or(MessageError::UnknownVersion(number))?;
        let typ = r.byte("message type")?;
        if !matches!(
            typ,
            TYPE_DH_COMMIT | TYPE_DH_KEY | TYPE_REVEAL_SIGNATURE | TYPE_SIGNATURE | TYPE_DATA
        ) {
            return Err(MessageError::UnknownType(typ));
        }
        let header = match version {
            Version::V2 => Header::v2(),
            Version::V3 => {
                let sender = r.int("sender instance tag")?;
                let receiver = r.int("receiver instance tag")?;
                check_instance_tags(sender, receiver)?;
                Header::v3(sender, receiver)
            }
        };
        let body = match typ {
            TYPE_DH_COMMIT => Body::DhCommit(DhCommit {
                encrypted_gx: r.data("encrypted gx")?.to_vec(),
                hashed_gx: r.data("hashed gx")?.to_vec(),
            }),
            TYPE_DH_KEY => Body::DhKey(DhKey {
                gy: r.mpi("gy")?.to_vec(),
            }),
            TYPE_REVEAL_SIGNATURE => Body::RevealSignature(RevealSignature {
                revealed_key: r.data("revealed key")?.to_vec(),
                encrypted_sig: r.data("encrypted signature")?.to_vec(),
                mac: r.array("signature MAC")?,
            }),
            TYPE_SIGNATURE => Body::Signature(Signature {
                encrypted_sig: r.data("encrypted signature")?.to_vec(),
                mac: r.array("signature MAC")?,
            }),
            _ => {
                let flags = r.byte("flags")?;
                let sender_keyid = r.int("sender keyid")?;
                let recipient_keyid = r.int("recipient keyid")?;
                let next_dh = r.data("next DH key")?;
                if next_dh.first() == Some(&0) {
                    return Err(MessageError::NonMinimalMpi("next DH key"));
                }
                let ctr = r.array("counter")?;
                let enc = r.data("encrypted message")?;
                let encrypted = if copy_ciphertext {
                    enc.to_vec()
                } else {
                    let end = bytes.len() - r.remaining();
                    ciphertext = Some(end - enc.len()..end);
                    Vec::new()
                };
                Body::Data(DataMessage {
                    flags,
                    sender_keyid,
                    recipient_keyid,
                    next_dh: next_dh.to_vec(),
                    ctr,
                    encrypted,
                    mac: r.array("data MAC")?,
                    revealed_mac_keys: r.data("revealed MAC keys")?.to_vec(),
                })
            }
        };
        r.finish()?;
        Ok((Self { header, body }, ciphertext))
    }

    /// The armoured text form: `"?OTR:" + base64(encode()) + "."`.
    pub fn to_armored(&self) -> String {
        armor(&self.encode())
    }

    /// Decodes an armoured message: `?OTR:` anywhere in `text`, base-64 up
    /// to the next `.`.
    pub fn from_armored(text: &str) -> Result<Self, MessageError> {
        let start = text
            .find(ENCODED_PREFIX)
            .ok_or(MessageError::Unterminated)?;
        decode_armored_at(&text[start..])
    }
}

/// `"?OTR:" + base64(bytes) + "."`.
pub fn armor(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(ENCODED_PREFIX.len() + bytes.len().div_ceil(3) * 4 + 1);
    s.push_str(ENCODED_PREFIX);
    // SIMD base-64 (runtime CPU detection): the body of every data message
    // goes through here, and the scalar `base64` engine was ~10 % of a
    // burst message.
    base64_simd::STANDARD.encode_append(bytes, &mut s);
    s.push('.');
    s
}

/// Decodes standard-alphabet base-64 with padding optional (libotr and potr
/// both pad, but being lenient costs nothing) and nothing else lenient: no
/// whitespace or other foreign byte, `=` only at the end of the last group
/// of four (one or two of them after three or two symbols), no non-zero
/// bits after the last byte.
fn b64_decode(b64: &[u8]) -> Option<Vec<u8>> {
    // `STANDARD` takes a multiple of four, the last group possibly padded;
    // `STANDARD_NO_PAD` the other lengths without `=`. A short last group
    // of two symbols and one `=` ("QQ=") is accepted too, as the scalar
    // `base64` engine with `DecodePaddingMode::Indifferent` that this
    // replaces did; a test compares the two.
    let (b64, engine) = match b64.len() % 4 {
        0 => (b64, &base64_simd::STANDARD),
        3 if b64.last() == Some(&b'=') => (&b64[..b64.len() - 1], &base64_simd::STANDARD_NO_PAD),
        _ => (b64, &base64_simd::STANDARD_NO_PAD),
    };
    engine.decode_to_vec(b64).ok()
}

/// Decodes base-64 text between `?OTR:` and `.`; `text` starts at `?OTR:`.
/// ASCII whitespace inside the base-64 (a client wrapping long lines) is
/// ignored.
fn decode_armored_at(text: &str) -> Result<EncodedMessage, MessageError> {
    let body = &text[ENCODED_PREFIX.len()..];
    // The base-64 ends at the first `.`, which is nearly always the last
    // byte: try the last `.` first (found at once from the end). If what
    // precedes it decodes, it holds no `.` (not a base-64 symbol), so the
    // last `.` is the first; otherwise search from the start as before.
    let last = memchr::memrchr(b'.', body.as_bytes()).ok_or(MessageError::Unterminated)?;
    if let Some(bytes) = b64_decode(&body.as_bytes()[..last]) {
        return EncodedMessage::decode_vec(bytes);
    }
    // SIMD search: the terminator ends a ~1.4 KiB body (core's byte
    // search was ~2.5 % of a burst message).
    let end = memchr::memchr(b'.', body.as_bytes()).ok_or(MessageError::Unterminated)?;
    let b64 = &body.as_bytes()[..end];
    // Whitespace inside the base-64 (some clients wrap lines) is rare:
    // decode directly and compact only when that fails, so the common case
    // scans the body once.
    let direct = if end == last { None } else { b64_decode(b64) };
    let bytes = match direct {
        Some(bytes) => bytes,
        None if b64.iter().any(|b| b.is_ascii_whitespace()) => {
            let compact: Vec<u8> = b64
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            b64_decode(&compact).ok_or(MessageError::Base64)?
        }
        None => return Err(MessageError::Base64),
    };
    EncodedMessage::decode_vec(bytes)
}

/// Classification of any received text (spec §"The protocol state
/// machine", receiving rules).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Not an OTR message. A whitespace tag, if present, is removed from
    /// `text`; `tag` then lists the versions it offered that we speak
    /// (empty if it only offered version 1 or nothing).
    Plaintext {
        /// The text with any whitespace tag removed.
        text: String,
        /// `None` if there was no whitespace tag.
        tag: Option<Vec<Version>>,
    },
    /// A query message; `versions` are the offered versions we speak,
    /// ascending and without duplicates (empty for a v1-only query).
    Query {
        /// Offered versions we speak.
        versions: Vec<Version>,
    },
    /// An OTR error message; `text` is what followed `?OTR Error:` (one
    /// leading space removed).
    Error {
        /// The human-readable error text.
        text: String,
    },
    /// A base-64 armoured binary message.
    Encoded(EncodedMessage),
    /// One fragment of a longer message.
    Fragment(Fragment),
}

/// Byte offset of the first `?OTR` in `text`, as `str::find` gives it: a
/// `?` found with `memchr`, then the three letters (core's substring
/// search sets up a two-way searcher per call, ~0.7 % of a burst message).
fn find_marker(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(p) = memchr::memchr(b'?', bytes.get(from..)?) {
        let at = from + p;
        if bytes[at..].starts_with(OTR_MARKER.as_bytes()) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Classifies received text.
///
/// Like libotr 4.1.1, the first occurrence of `?OTR` followed by a known
/// marker decides: `|` or `,` a fragment, `:` an encoded message, `?` or
/// `v` a query, ` Error:` an error message. Text without any such marker is
/// plaintext, possibly whitespace-tagged. Text around an encoded message
/// (before `?OTR:` and after the `.`) is ignored.
pub fn parse(text: &str) -> Result<Message, MessageError> {
    let mut search_from = 0;
    while let Some(pos) = find_marker(&text[search_from..]) {
        let at = search_from + pos;
        let tail = &text[at..];
        let after = &tail[OTR_MARKER.len()..];
        match after.as_bytes().first() {
            Some(b'|') | Some(b',') => {
                return fragment::parse_fragment(tail).map(Message::Fragment);
            }
            Some(b':') => return decode_armored_at(tail).map(Message::Encoded),
            Some(b'?') | Some(b'v') => {
                return Ok(Message::Query {
                    versions: parse_query_versions(after),
                });
            }
            _ if tail.starts_with(ERROR_PREFIX) => {
                let rest = &tail[ERROR_PREFIX.len()..];
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                return Ok(Message::Error {
                    text: rest.to_string(),
                });
            }
            _ => search_from = at + OTR_MARKER.len(),
        }
    }
    let (text, tag) = strip_whitespace_tag(text);
    Ok(Message::Plaintext { text, tag })
}

/// Versions offered by the query whose text follows `?OTR` (spec §"OTR
/// Query Messages"): an optional `?` (version 1), then optionally `v` and
/// version digits up to the next `?`. Unknown digits and version 1 are
/// ignored.
fn parse_query_versions(after_marker: &str) -> Vec<Version> {
    let mut rest = after_marker;
    if let Some(r) = rest.strip_prefix('?') {
        rest = r;
    }
    let mut versions = Vec::new();
    if let Some(digits) = rest.strip_prefix('v') {
        for c in digits.chars().take_while(|&c| c != '?') {
            let v = match c {
                '2' => Version::V2,
                '3' => Version::V3,
                _ => continue,
            };
            if !versions.contains(&v) {
                versions.push(v);
            }
        }
    }
    versions.sort();
    versions
}

/// Finds and removes a whitespace tag (the base tag then any number of
/// 8-character groups of spaces and tabs, as libotr reads it). Returns the
/// text without the tag and the offered versions we speak.
fn strip_whitespace_tag(text: &str) -> (String, Option<Vec<Version>>) {
    let Some(start) = text.find(WHITESPACE_TAG_BASE) else {
        return (text.to_string(), None);
    };
    let mut end = start + WHITESPACE_TAG_BASE.len();
    let mut versions = Vec::new();
    while let Some(group) = text.get(end..end + 8) {
        if !group.bytes().all(|b| b == b' ' || b == b'\t') {
            break;
        }
        let v = match group {
            WHITESPACE_TAG_V2 => Some(Version::V2),
            WHITESPACE_TAG_V3 => Some(Version::V3),
            _ => None,
        };
        if let Some(v) = v
            && !versions.contains(&v)
        {
            versions.push(v);
        }
        end += 8;
    }
    versions.sort();
    let mut stripped = String::with_capacity(text.len() - (end - start));
    stripped.push_str(&text[..start]);
    stripped.push_str(&text[end..]);
    (stripped, Some(versions))
}

fn sorted_unique(versions: &[Version]) -> Vec<Version> {
    let mut v = versions.to_vec();
    v.sort();
    v.dedup();
    v
}

/// A query message offering `versions`, followed by libotr's explanatory
/// text for people without OTR. With no versions this is the spec's
/// "bizarre claim" `?OTRv?`. The account name is HTML-escaped.
pub fn query_message(versions: &[Version], account_name: &str) -> String {
    let mut tag = String::from("?OTRv");
    for v in sorted_unique(versions) {
        tag.push(v.query_digit());
    }
    tag.push('?');
    format!(
        "{tag}\n<b>{}</b> has requested an \
         <a href=\"https://otr.cypherpunks.ca/\">Off-the-Record private conversation</a>.  \
         However, you do not have a plugin to support that.\n\
         See <a href=\"https://otr.cypherpunks.ca/\">https://otr.cypherpunks.ca/</a> \
         for more information.",
        html_escape(account_name)
    )
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The whitespace tag offering `versions`: the base tag, then the 8-byte
/// tag of each version (ascending). With no versions only the base tag.
pub fn whitespace_tag(versions: &[Version]) -> String {
    let mut s = String::from(WHITESPACE_TAG_BASE);
    for v in sorted_unique(versions) {
        s.push_str(v.whitespace_tag());
    }
    s
}

/// An OTR error message: `"?OTR Error: " + text`.
pub fn error_message(text: &str) -> String {
    format!("{ERROR_PREFIX} {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> Header {
        Header::v3(0x1234_5678, 0x9abc_def0)
    }

    fn data_msg() -> DataMessage {
        DataMessage {
            flags: FLAG_IGNORE_UNREADABLE,
            sender_keyid: 1,
            recipient_keyid: 2,
            next_dh: vec![0xc0; 192],
            ctr: [0, 0, 0, 0, 0, 0, 0, 1],
            encrypted: b"ciphertext".to_vec(),
            mac: [7; 20],
            revealed_mac_keys: vec![9; 40],
        }
    }

    fn all_bodies() -> Vec<Body> {
        vec![
            Body::DhCommit(DhCommit {
                encrypted_gx: vec![1; 196],
                hashed_gx: vec![2; 32],
            }),
            Body::DhKey(DhKey { gy: vec![3; 192] }),
            Body::RevealSignature(RevealSignature {
                revealed_key: vec![4; 16],
                encrypted_sig: vec![5; 100],
                mac: [6; 20],
            }),
            Body::Signature(Signature {
                encrypted_sig: vec![5; 99],
                mac: [8; 20],
            }),
            Body::Data(data_msg()),
        ]
    }

    #[test]
    fn round_trips_every_message_type_v2_and_v3() {
        for header in [Header::v2(), v3(), Header::v3(0x100, 0)] {
            for body in all_bodies() {
                let m = EncodedMessage { header, body };
                let bytes = m.encode();
                assert_eq!(EncodedMessage::decode(&bytes).unwrap(), m);
                let armored = m.to_armored();
                assert!(armored.starts_with("?OTR:") && armored.ends_with('.'));
                assert_eq!(parse(&armored).unwrap(), Message::Encoded(m.clone()));
            }
        }
    }

    #[test]
    fn find_marker_agrees_with_str_find() {
        for text in [
            "",
            "?",
            "?OT",
            "?OTR",
            "a?OTR",
            "??OTR?OTR",
            "?OT?OTR:",
            "é?OTR",
            "x?o?OTRv",
            "no marker ? here",
        ] {
            assert_eq!(find_marker(text), text.find(OTR_MARKER), "{text:?}");
        }
    }

    #[test]
    fn armored_prefixes_match_libotr_message_types() {
        // libotr classifies by the first base-64 characters: AAMC/AAIC
        // commit, AAMK key, AAMR reveal, AAMS signature, AAMD/AAID data.
        let expect = ["C", "K", "R", "S", "D"];
        for (body, letter) in all_bodies().into_iter().zip(expect) {
            let m3 = EncodedMessage {
                header: v3(),
                body: body.clone(),
            };
            assert!(m3.to_armored().starts_with(&format!("?OTR:AAM{letter}")));
            let m2 = EncodedMessage {
                header: Header::v2(),
                body,
            };
            assert!(m2.to_armored().starts_with(&format!("?OTR:AAI{letter}")));
        }
    }

    #[test]
    fn dh_key_layout_is_exact() {
        let m = EncodedMessage {
            header: Header::v3(0x101, 0x102),
            body: Body::DhKey(DhKey {
                gy: vec![0xab, 0xcd],
            }),
        };
        assert_eq!(
            m.encode(),
            [0, 3, 0x0a, 0, 0, 1, 1, 0, 0, 1, 2, 0, 0, 0, 2, 0xab, 0xcd]
        );
        let m2 = EncodedMessage {
            header: Header::v2(),
            body: Body::DhKey(DhKey { gy: vec![0xab] }),
        };
        assert_eq!(m2.encode(), [0, 2, 0x0a, 0, 0, 0, 1, 0xab]);
    }

    #[test]
    fn authenticated_bytes_are_a_prefix_ending_after_the_ciphertext() {
        let d = data_msg();
        let m = EncodedMessage {
            header: v3(),
            body: Body::Data(d.clone()),
        };
        let full = m.encode();
        let auth = d.authenticated_bytes(&m.header);
        assert_eq!(&full[..auth.len()], &auth[..]);
        assert_eq!(&full[auth.len()..auth.len() + 20], &d.mac);
        assert_eq!(full.len(), auth.len() + 20 + 4 + 40);
        assert!(auth.ends_with(b"ciphertext"));
    }

    #[test]
    fn mac_input_pieces_concatenate_to_the_authenticated_bytes() {
        let mut d = data_msg();
        for header in [v3(), Header::v2()] {
            for next_dh in [vec![1u8, 2, 3], vec![0, 0, 7, 8], vec![]] {
                d.next_dh = next_dh;
                let mut scratch = MacScratch::default();
                let joined: Vec<u8> = d.mac_input(&header, &mut scratch).concat();
                assert_eq!(joined, d.authenticated_bytes(&header));
            }
        }
    }

    #[test]
    fn decodes_the_spec_fragment_example() {
        let text = "?OTR:AAMDJ+MVmSfjFZcAAAAAAQAAAAIAAADA1g5IjD1ZGLDVQEyCgCyn9hb\
rL3KAbGDdzE2ZkMyTKl7XfkSxh8YJnudstiB74i4BzT0W2haClg6dMary/jo\
9sMudwmUdlnKpIGEKXWdvJKT+hQ26h9nzMgEditLB8vjPEWAJ6gBXvZrY6ZQ\
rx3gb4v0UaSMOMiR5sB7Eaulb2Yc6RmRnnlxgUUC2alosg4WIeFN951PLjSc\
ajVba6dqlDi+q1H5tPvI5SWMN7PCBWIJ41+WvF+5IAZzQZYgNaVLbAAAAAAA\
AAAEAAAAHwNiIi5Ms+4PsY/L2ipkTtquknfx6HodLvk3RAAAAAA==.";
        let Message::Encoded(m) = parse(text).unwrap() else {
            panic!("not encoded");
        };
        assert_eq!(m.header, Header::v3(0x27e3_1599, 0x27e3_1597));
        let Body::Data(d) = &m.body else {
            panic!("not data")
        };
        assert_eq!((d.flags, d.sender_keyid, d.recipient_keyid), (0, 1, 2));
        assert_eq!(d.next_dh.len(), 192);
        assert_eq!(d.encrypted.len(), 7);
        assert!(d.revealed_mac_keys.is_empty());
        assert_eq!(m.to_armored(), text);
    }

    #[test]
    fn rejects_bad_headers() {
        let mut bytes = EncodedMessage {
            header: v3(),
            body: Body::DhKey(DhKey { gy: vec![1] }),
        }
        .encode();
        let ok = bytes.clone();
        bytes[1] = 1;
        assert_eq!(
            EncodedMessage::decode(&bytes),
            Err(MessageError::UnknownVersion(1))
        );
        bytes[1] = 4;
        assert_eq!(
            EncodedMessage::decode(&bytes),
            Err(MessageError::UnknownVersion(4))
        );
        let mut bytes = ok.clone();
        bytes[2] = 0x42;
        assert_eq!(
            EncodedMessage::decode(&bytes),
            Err(MessageError::UnknownType(0x42))
        );
        let mut bytes = ok.clone();
        bytes.push(0);
        assert!(matches!(
            EncodedMessage::decode(&bytes),
            Err(MessageError::Codec(CodecError::TrailingBytes(1)))
        ));
        for n in 0..ok.len() {
            assert!(matches!(
                EncodedMessage::decode(&ok[..n]),
                Err(MessageError::Codec(CodecError::Truncated { .. }))
            ));
        }
    }

    #[test]
    fn rejects_invalid_instance_tags() {
        let enc = |s, r| {
            EncodedMessage {
                header: Header::v3(s, r),
                body: Body::DhKey(DhKey { gy: vec![1] }),
            }
            .encode()
        };
        assert!(EncodedMessage::decode(&enc(0x100, 0)).is_ok());
        assert!(EncodedMessage::decode(&enc(0x100, 0x100)).is_ok());
        for (s, r) in [(0, 0), (0xff, 0x100), (0x100, 1), (0x100, 0xff)] {
            assert_eq!(
                EncodedMessage::decode(&enc(s, r)),
                Err(MessageError::InvalidInstanceTag {
                    sender: s,
                    receiver: r
                })
            );
        }
    }

    #[test]
    fn rejects_non_minimal_next_dh() {
        let mut w = Writer::new();
        w.short(2)
            .byte(TYPE_DATA)
            .byte(0)
            .int(1)
            .int(1)
            .data(&[0, 5]);
        w.raw(&[0; 8]).data(b"x").raw(&[0; 20]).data(&[]);
        assert_eq!(
            EncodedMessage::decode(w.as_slice()),
            Err(MessageError::NonMinimalMpi("next DH key"))
        );
    }

    /// The decoding rules before the SIMD decoder: the scalar `base64`
    /// engine, standard alphabet, padding indifferent.
    fn b64_decode_scalar(b64: &[u8]) -> Option<Vec<u8>> {
        use base64::Engine as _;
        use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
        const LENIENT: GeneralPurpose = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        LENIENT.decode(b64).ok()
    }

    #[test]
    fn base64_accepts_and_rejects_as_before() {
        // Padding, its absence, misplaced or partial padding, non-zero
        // trailing bits, foreign bytes, lengths around the SIMD widths.
        let mut cases: Vec<Vec<u8>> = [
            "",
            "=",
            "==",
            "===",
            "====",
            "Q",
            "QQ",
            "QQ=",
            "QQ==",
            "QQ===",
            "Q==",
            "QR=",
            "QUJDQQ=",
            "QR==",
            "QR",
            "QUI",
            "QUI=",
            "QUJ=",
            "QUJ",
            "QUJD",
            "QUJD=",
            "QUJD====",
            "QQ==QQ==",
            "QQ=A",
            "Q===",
            "QUJD QUJD",
            "QUJD\nQUJD",
            "QUJ-",
            "QUJ_",
            "QUJ\u{0}",
            "Ã©Ã©",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        for len in 0..200 {
            let text = armor(&vec![0xa5; len]);
            let b64 = text.as_bytes()[ENCODED_PREFIX.len()..text.len() - 1].to_vec();
            cases.push(b64.iter().copied().filter(|&b| b != b'=').collect());
            let mut bad = b64.clone();
            if let Some(b) = bad.get_mut(len / 2) {
                *b = b'*';
            }
            cases.push(bad);
            let mut tail = b64.clone();
            tail.push(b'=');
            cases.push(tail);
            cases.push(b64);
        }
        for c in &cases {
            assert_eq!(
                b64_decode(c),
                b64_decode_scalar(c),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        #[test]
        fn base64_agrees_with_the_scalar_decoder(
            // Mostly symbols whose low bits are zero (so short texts are
            // often valid), plus '/' (low bits set), '=', a space, a '*'.
            text in proptest::collection::vec(
                proptest::sample::select(b"AQgwAQgwAQgw+/==  *".to_vec()), 0..40)
        ) {
            proptest::prop_assert_eq!(b64_decode(&text), b64_decode_scalar(&text));
        }

        #[test]
        fn base64_round_trips(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let text = armor(&bytes);
            let b64 = &text.as_bytes()[ENCODED_PREFIX.len()..text.len() - 1];
            proptest::prop_assert_eq!(b64_decode(b64), Some(bytes.clone()));
            let scalar = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes);
            proptest::prop_assert_eq!(b64, scalar.as_bytes());
        }
    }

    #[test]
    fn armour_errors_are_typed() {
        assert_eq!(parse("?OTR:AAMK"), Err(MessageError::Unterminated));
        assert_eq!(parse("?OTR:!!!!."), Err(MessageError::Base64));
        assert!(matches!(parse("?OTR:."), Err(MessageError::Codec(_))));
        // A v1 key exchange (libotr "?OTR:AAEK") is version 1.
        assert_eq!(
            parse("?OTR:AAEKAAAA."),
            Err(MessageError::UnknownVersion(1))
        );
    }

    #[test]
    fn armour_tolerates_missing_padding_whitespace_and_surroundings() {
        let m = EncodedMessage {
            header: Header::v2(),
            body: Body::DhKey(DhKey {
                gy: vec![1, 2, 3, 4],
            }),
        };
        let a = m.to_armored();
        let unpadded = a.replace('=', "");
        assert_eq!(parse(&unpadded).unwrap(), Message::Encoded(m.clone()));
        let wrapped = format!("<p>{}\n{} trailing", &a[..8], &a[8..]);
        assert_eq!(parse(&wrapped).unwrap(), Message::Encoded(m.clone()));
        // The base-64 ends at the first `.`, whatever follows (the last
        // `.` is tried first, then the first).
        for tail in [". more.", "...", " x.y.z", ".", "\n."] {
            let text = format!("{a}{tail}");
            assert_eq!(
                parse(&text).unwrap(),
                Message::Encoded(m.clone()),
                "{tail:?}"
            );
            let wrapped = format!("<p>{}\n{}{tail}", &a[..8], &a[8..]);
            assert_eq!(
                parse(&wrapped).unwrap(),
                Message::Encoded(m.clone()),
                "{tail:?}"
            );
        }
        let (body, _) = a.split_at(a.len() - 1);
        let cut = format!("{}.{}.", &body[..12], &body[12..]);
        assert_eq!(parse(&cut), parse(&format!("{}.", &body[..12])));
        assert!(parse(&cut).is_err());
    }

    #[test]
    fn parses_query_forms() {
        use Version::*;
        let q = |s: &str| match parse(s).unwrap() {
            Message::Query { versions } => versions,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(q("?OTR?"), vec![]);
        assert_eq!(q("?OTRv2?"), vec![V2]);
        assert_eq!(q("?OTRv23?"), vec![V2, V3]);
        assert_eq!(q("?OTRv32?"), vec![V2, V3]);
        assert_eq!(q("?OTR?v2?"), vec![V2]);
        assert_eq!(q("?OTR?v23?"), vec![V2, V3]);
        assert_eq!(q("?OTRv24x?"), vec![V2]);
        assert_eq!(q("?OTR?v24x?"), vec![V2]);
        assert_eq!(q("?OTR?v?"), vec![]);
        assert_eq!(q("?OTRv?"), vec![]);
        assert_eq!(q("?OTRv3"), vec![V3]);
        assert_eq!(q("hello ?OTRv3? there"), vec![V3]);
        // Digits after the closing '?' are not versions.
        assert_eq!(q("?OTRv2?3"), vec![V2]);
        // libotr's and potr's own query messages.
        assert_eq!(
            q(&query_message(&[V2, V3], "alice@example.org")),
            vec![V2, V3]
        );
        assert_eq!(
            q("?OTRv2?\nbob has requested an Off-the-Record private conversation."),
            vec![V2]
        );
    }

    #[test]
    fn query_message_looks_like_libotr() {
        let q = query_message(&[Version::V3, Version::V2, Version::V3], "a<b>");
        assert!(q.starts_with("?OTRv23?\n<b>a&lt;b&gt;</b> has requested an "));
        assert!(q.contains("Off-the-Record private conversation</a>.  However"));
        assert!(q.starts_with(&query_message(&[], "x")[..0]));
        assert!(query_message(&[], "x").starts_with("?OTRv?\n"));
    }

    #[test]
    fn parses_error_messages() {
        assert_eq!(
            parse(&error_message("boom")).unwrap(),
            Message::Error {
                text: "boom".into()
            }
        );
        // potr writes no space after the colon.
        assert_eq!(
            parse("?OTR Error:You sent encrypted data").unwrap(),
            Message::Error {
                text: "You sent encrypted data".into()
            }
        );
    }

    #[test]
    fn whitespace_tags_have_the_spec_bytes_and_are_stripped() {
        assert_eq!(WHITESPACE_TAG_BASE.len(), 16);
        let tag = whitespace_tag(&[Version::V3, Version::V2]);
        assert_eq!(
            tag.as_bytes(),
            b" \t  \t\t\t\t \t \t \t    \t\t  \t   \t\t  \t\t"
        );
        let text = format!("Hello{tag} world");
        assert_eq!(
            parse(&text).unwrap(),
            Message::Plaintext {
                text: "Hello world".into(),
                tag: Some(vec![Version::V2, Version::V3])
            }
        );
        // v1 only (potr with ALLOW_V1) and base only.
        let v1 = format!("x{WHITESPACE_TAG_BASE}{WHITESPACE_TAG_V1}");
        assert_eq!(
            parse(&v1).unwrap(),
            Message::Plaintext {
                text: "x".into(),
                tag: Some(vec![])
            }
        );
        assert_eq!(
            parse(&format!("{WHITESPACE_TAG_BASE}y")).unwrap(),
            Message::Plaintext {
                text: "y".into(),
                tag: Some(vec![])
            }
        );
        // potr's tag: text + base + v1 + v2.
        let potr = format!("hi{WHITESPACE_TAG_BASE}{WHITESPACE_TAG_V1}{WHITESPACE_TAG_V2}");
        assert_eq!(
            parse(&potr).unwrap(),
            Message::Plaintext {
                text: "hi".into(),
                tag: Some(vec![Version::V2])
            }
        );
        assert_eq!(
            parse("plain ?OTR but not a marker").unwrap(),
            Message::Plaintext {
                text: "plain ?OTR but not a marker".into(),
                tag: None
            }
        );
    }

    #[test]
    fn whitespace_tag_next_to_multibyte_text_is_safe() {
        let text = format!("é{}é", whitespace_tag(&[Version::V3]));
        assert_eq!(
            parse(&text).unwrap(),
            Message::Plaintext {
                text: "éé".into(),
                tag: Some(vec![Version::V3])
            }
        );
        let text = format!("{WHITESPACE_TAG_BASE}  \t\t  \té");
        assert!(matches!(parse(&text).unwrap(), Message::Plaintext { .. }));
    }
}
