//! Every XML namespace the proxy looks at, in one place (as xmpp-rs
//! `parsers/src/ns.rs` does). Each constant names its RFC or XEP.

/// RFC 6120 §4: the stream envelope (`stream:` prefix).
pub const STREAMS: &str = "http://etherx.jabber.org/streams";
/// RFC 6120 §4.9.3: stream error conditions.
pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// RFC 6120 §4.8.2: the default namespace of a client-to-server stream.
pub const CLIENT: &str = "jabber:client";
/// RFC 6120 §8.3.3: stanza error conditions.
pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// RFC 6120 §5: STARTTLS.
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
/// RFC 6120 §6: SASL.
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// RFC 6120 §7: resource binding.
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// RFC 3921 §3 (kept by many servers): session establishment.
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// XEP-0198: stream management, version 2.
pub const SM2: &str = "urn:xmpp:sm:2";
/// XEP-0198: stream management, version 3.
pub const SM3: &str = "urn:xmpp:sm:3";
/// XEP-0280: message carbons.
pub const CARBONS: &str = "urn:xmpp:carbons:2";
/// XEP-0297: stanza forwarding (used by carbons and MAM).
pub const FORWARD: &str = "urn:xmpp:forward:0";
/// XEP-0380: explicit message encryption.
pub const EME: &str = "urn:xmpp:eme:0";
/// XEP-0380: the EME namespace value that names OTR.
pub const OTR: &str = "urn:xmpp:otr:0";
/// XEP-0334: message processing hints.
pub const HINTS: &str = "urn:xmpp:hints";
/// XEP-0184: message delivery receipts.
pub const RECEIPTS: &str = "urn:xmpp:receipts";
/// XEP-0085: chat state notifications.
pub const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
/// XEP-0333: chat markers.
pub const CHAT_MARKERS: &str = "urn:xmpp:chat-markers:0";
/// XEP-0203: delayed delivery.
pub const DELAY: &str = "urn:xmpp:delay";
/// XEP-0091 (legacy delayed delivery, still seen in the wild).
pub const LEGACY_DELAY: &str = "jabber:x:delay";
/// XEP-0313: message archive management, version 2.
pub const MAM2: &str = "urn:xmpp:mam:2";
/// XEP-0359: unique and stable stanza IDs (`origin-id`, `stanza-id`).
pub const SID: &str = "urn:xmpp:sid:0";
/// XEP-0071: XHTML-IM wrapper.
pub const XHTML_IM: &str = "http://jabber.org/protocol/xhtml-im";
/// XEP-0071: the XHTML body namespace.
pub const XHTML: &str = "http://www.w3.org/1999/xhtml";
/// XEP-0066: out-of-band data (`jabber:x:oob`).
pub const OOB: &str = "jabber:x:oob";
/// XEP-0461: message replies.
pub const REPLY: &str = "urn:xmpp:reply:0";
/// XEP-0428: fallback indication.
pub const FALLBACK: &str = "urn:xmpp:fallback:0";
/// XEP-0308: last message correction.
pub const MESSAGE_CORRECT: &str = "urn:xmpp:message-correct:0";
/// XEP-0138: stream compression, as a stream feature.
pub const COMPRESS_FEATURE: &str = "http://jabber.org/features/compress";
/// XEP-0138: stream compression protocol.
pub const COMPRESS: &str = "http://jabber.org/protocol/compress";
/// XEP-0388: extensible SASL profile (SASL2).
pub const SASL2: &str = "urn:xmpp:sasl:2";
/// XEP-0386: Bind 2.
pub const BIND2: &str = "urn:xmpp:bind:0";
/// XEP-0484: fast authentication streamlining tokens (inside SASL2).
pub const FAST: &str = "urn:xmpp:fast:0";
/// XEP-0440: SASL channel-binding type capability.
pub const SASL_CB: &str = "urn:xmpp:sasl-cb:0";
/// XEP-0199: XMPP ping.
pub const PING: &str = "urn:xmpp:ping";
/// XEP-0352: client state indication.
pub const CSI: &str = "urn:xmpp:csi:0";
/// XEP-0115: entity capabilities.
pub const CAPS: &str = "http://jabber.org/protocol/caps";
/// XEP-0237: roster versioning stream feature.
pub const ROSTER: &str = "jabber:iq:roster";
/// Roster versioning stream feature (XEP-0237).
pub const ROSTERVER: &str = "urn:xmpp:features:rosterver";
/// XML namespace bound to the `xml:` prefix.
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
