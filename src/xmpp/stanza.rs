//! `<message>` helpers on [`Element`] (RFC 6121 §5) and the outgoing
//! encrypted-message rewrite of DESIGN §3.
//!
//! Covers: message type, addressing, body, carbons (XEP-0280) and MAM
//! (XEP-0313) unwrapping, delayed delivery (XEP-0203), receipts
//! (XEP-0184), and [`rewrite_for_encryption`], which keeps only a
//! known-safe allowlist of children and adds EME (XEP-0380), carbons
//! `<private/>` and the XEP-0334 hints `<no-copy/>` and
//! `<no-permanent-store/>` — never `<no-store/>`.

use super::element::Element;
use super::jid::Jid;
use super::ns;

/// The `type` of a message (RFC 6121 §5.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// One-to-one chat.
    Chat,
    /// Standalone message (also the default when `type` is absent).
    Normal,
    /// Multi-user chat.
    Groupchat,
    /// An error reply.
    Error,
    /// An alert, no reply expected.
    Headline,
}

/// True for a `<message/>` in `jabber:client`.
pub fn is_message(el: &Element) -> bool {
    el.is("message", ns::CLIENT)
}

/// Whether `el` is an `<iq>` carrying a roster query (RFC 6121 §2).
pub fn is_roster_iq(el: &Element) -> bool {
    el.is("iq", ns::CLIENT) && el.has_child("query", ns::ROSTER)
}

/// Whether the relay hands `el` to the router hook after bind: messages,
/// roster iqs, and iq results or errors that may answer a roster request
/// (an empty roster result under XEP-0237, or a client's reply to the
/// proxy's own roster push). Everything else is relayed byte for byte.
pub fn is_hooked(el: &Element) -> bool {
    is_message(el)
        || is_roster_iq(el)
        || (el.is("iq", ns::CLIENT)
            && matches!(el.attr("type"), Some("result" | "error"))
            && (el.children().next().is_none()
                || el.attr("id").is_some_and(|i| i.starts_with("o2tr-"))))
}

/// [`is_hooked`] for a stanza the client sent, plus directed presences
/// (those with a `to`): a subscription to the control contact must be
/// answered by the proxy, not relayed (DESIGN §6); and available
/// broadcasts (no `to`, no `type`): the initial presence waits for the
/// login's fetch of offline storage (`router::fetch`). Other broadcasts
/// (unavailable) are still relayed byte for byte.
pub fn is_hooked_from_client(el: &Element) -> bool {
    is_hooked(el)
        || (el.is("presence", ns::CLIENT) && (el.attr("to").is_some() || el.attr("type").is_none()))
}

/// The message type; absent or unknown values are `normal` (RFC 6121 §5.2.2).
pub fn message_type(el: &Element) -> MessageType {
    match el.attr("type") {
        Some("chat") => MessageType::Chat,
        Some("groupchat") => MessageType::Groupchat,
        Some("error") => MessageType::Error,
        Some("headline") => MessageType::Headline,
        _ => MessageType::Normal,
    }
}

/// `from` as a JID, if present and valid.
pub fn from(el: &Element) -> Option<Jid> {
    el.attr("from").and_then(|s| Jid::parse(s).ok())
}

/// `to` as a JID, if present and valid.
pub fn to(el: &Element) -> Option<Jid> {
    el.attr("to").and_then(|s| Jid::parse(s).ok())
}

/// `id`, if present.
pub fn id(el: &Element) -> Option<&str> {
    el.attr("id")
}

/// The text of the first `<body/>` (in the message's namespace).
pub fn body(el: &Element) -> Option<String> {
    el.get_child("body", el.ns()).map(Element::text)
}

/// Replaces every `<body/>` (all languages) with one holding `text`.
pub fn set_body(el: &mut Element, text: &str) {
    let ns = el.ns().to_owned();
    let pos = el
        .nodes()
        .iter()
        .position(|n| matches!(n, super::Node::Element(e) if e.is("body", &ns)));
    remove_body(el);
    let body = super::Node::Element(Element::new("body", &ns).with_text(text));
    let nodes = el.nodes_mut();
    let at = pos.unwrap_or(nodes.len()).min(nodes.len());
    nodes.insert(at, body);
}

/// Removes every `<body/>`; returns how many there were.
pub fn remove_body(el: &mut Element) -> usize {
    let ns = el.ns().to_owned();
    el.remove_children(|c| c.is("body", &ns))
}

/// Direction of a carbon copy (XEP-0280 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CarbonDirection {
    /// `<received/>`: a message another resource of ours received.
    Received,
    /// `<sent/>`: a message another resource of ours sent.
    Sent,
}

/// The forwarded message inside a carbon copy, if `el` is one.
pub fn carbon(el: &Element) -> Option<(CarbonDirection, &Element)> {
    let (dir, wrap) = if let Some(w) = el.get_child("received", ns::CARBONS) {
        (CarbonDirection::Received, w)
    } else {
        (CarbonDirection::Sent, el.get_child("sent", ns::CARBONS)?)
    };
    let m = wrap
        .get_child("forwarded", ns::FORWARD)?
        .get_child("message", ns::CLIENT)?;
    Some((dir, m))
}

/// A carbon is only trustworthy from our own bare JID (XEP-0280 §11).
pub fn carbon_from_own_account(el: &Element, own: &Jid) -> bool {
    match from(el) {
        Some(f) => f == own.bare(),
        None => true,
    }
}

/// A message archive result (XEP-0313 §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MamResult<'a> {
    /// `queryid` of the query this answers.
    pub query_id: Option<&'a str>,
    /// The archive id.
    pub id: Option<&'a str>,
    /// `<delay stamp>` of the forwarded message.
    pub stamp: Option<&'a str>,
    /// The archived message.
    pub message: &'a Element,
}

/// The archived message inside a MAM `<result/>`, if `el` is one.
pub fn mam_result(el: &Element) -> Option<MamResult<'_>> {
    let r = el.get_child("result", ns::MAM2)?;
    let f = r.get_child("forwarded", ns::FORWARD)?;
    Some(MamResult {
        query_id: r.attr("queryid"),
        id: r.attr("id"),
        stamp: f
            .get_child("delay", ns::DELAY)
            .and_then(|d| d.attr("stamp")),
        message: f.get_child("message", ns::CLIENT)?,
    })
}

/// The XEP-0203 `<delay stamp>` of a message, if any.
pub fn delay_stamp(el: &Element) -> Option<&str> {
    el.get_child("delay", ns::DELAY)
        .and_then(|d| d.attr("stamp"))
}

/// The XEP-0203 `<delay stamp>` of a message as unix seconds (fraction
/// dropped), if present and well-formed.
pub fn delay_unix(el: &Element) -> Option<u64> {
    delay_stamp(el).and_then(datetime_unix)
}

/// An XEP-0082 DateTime (`CCYY-MM-DDThh:mm:ss[.sss](Z|±hh:mm)`) as unix
/// seconds; `None` if malformed or before 1970.
pub fn datetime_unix(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let d = b.get(r)?;
        if d.is_empty() || !d.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(d).ok()?.parse().ok()
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    if sep(i, b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i) {
        Some(b'Z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) if i + 6 == b.len() && sep(i + 3, b':') => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            let o = oh * 3600 + om * 60;
            if c == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days from 1970-01-01 to the civil date (H. Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    u64::try_from(t).ok()
}

/// True if the message asks for a delivery receipt (XEP-0184 `<request/>`).
pub fn receipt_requested(el: &Element) -> bool {
    el.has_child("request", ns::RECEIPTS)
}

/// The id acknowledged by a XEP-0184 `<received id/>`, if present.
pub fn receipt_received(el: &Element) -> Option<&str> {
    el.get_child("received", ns::RECEIPTS)
        .and_then(|r| r.attr("id"))
}

/// A receipt for message `id` addressed to `to` (XEP-0184 §5).
pub fn make_receipt(to: &str, id: &str) -> Element {
    Element::new("message", ns::CLIENT)
        .with_attr("to", to)
        .with_child(Element::new("received", ns::RECEIPTS).with_attr("id", id))
}

/// True if a child may stay on an encrypted message (DESIGN §3 allowlist):
/// receipts, chat states, chat markers, `origin-id`, `delay`, and the
/// hints we add ourselves (never `no-store`/`no-storage`/`store`).
pub fn is_safe_child(c: &Element) -> bool {
    match c.ns() {
        ns::RECEIPTS => matches!(c.name(), "request" | "received"),
        ns::CHATSTATES => true,
        ns::CHAT_MARKERS => true,
        ns::SID => c.name() == "origin-id",
        ns::DELAY => c.name() == "delay",
        // `no-store`/`no-storage` would make the server bounce offline
        // messages; `store` contradicts the `no-permanent-store` we add.
        ns::HINTS => matches!(c.name(), "no-copy" | "no-permanent-store"),
        _ => false,
    }
}

/// Rewrites an outgoing message for an encrypted conversation (DESIGN §3):
/// the body becomes `ciphertext`; every child not on the allowlist (HTML,
/// subject, OOB, reply, fallback, correction, thread, …) is removed, as
/// are `no-store`/`no-storage` hints, and the kept children are emptied
/// (attributes stay); EME `<encryption namespace='urn:xmpp:otr:0'/>`,
/// carbons `<private/>`, `<no-copy/>` and `<no-permanent-store/>` are added
/// once. `to`, `type`, `id` and other attributes are kept.
pub fn rewrite_for_encryption(el: &mut Element, ciphertext: &str) {
    let ns_msg = el.ns().to_owned();
    el.retain_nodes(|n| match n {
        super::Node::Element(c) => is_safe_child(c),
        super::Node::Text(_) => false,
    });
    // Allowed children keep their attributes only. They are empty by their
    // XEPs (a `<delay>` reason is the server's, not the client's); any text
    // or element inside one would otherwise ride along unencrypted (found
    // by the stanza_rewrite fuzz target).
    for c in el.children_mut() {
        c.retain_nodes(|_| false);
    }
    // Drop what we are about to add, so nothing is doubled.
    el.remove_children(|c| c.is("no-copy", ns::HINTS) || c.is("no-permanent-store", ns::HINTS));
    el.append_child(Element::new("body", &ns_msg).with_text(ciphertext));
    el.append_child(Element::new("encryption", ns::EME).with_attr("namespace", ns::OTR));
    el.append_child(Element::new("private", ns::CARBONS));
    el.append_child(Element::new("no-copy", ns::HINTS));
    el.append_child(Element::new("no-permanent-store", ns::HINTS));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::element::NsScope;
    use crate::xmpp::testdata::*;

    fn parse(s: &str) -> Element {
        Element::parse(s.as_bytes(), &NsScope::client_stream()).unwrap()
    }

    #[test]
    fn basic_fields() {
        let m = parse(EJABBERD_OFFLINE_MESSAGE);
        assert!(is_message(&m));
        assert_eq!(message_type(&m), MessageType::Chat);
        assert_eq!(from(&m).unwrap().to_string(), "alice@example.org/laptop");
        assert_eq!(to(&m).unwrap().to_string(), "bob@example.org");
        assert_eq!(id(&m), Some("m1"));
        assert_eq!(body(&m).unwrap(), "?OTR:AAMDabc&def<x>.");
        assert_eq!(delay_stamp(&m), Some("2023-11-14T22:13:20.000000Z"));
        assert_eq!(delay_unix(&m), Some(1_700_000_000));
        assert_eq!(message_type(&parse("<message/>")), MessageType::Normal);
        assert_eq!(body(&parse("<message/>")), None);
    }

    #[test]
    fn xep0082_datetimes() {
        assert_eq!(datetime_unix("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(datetime_unix("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(
            datetime_unix("2026-11-22T10:34:22.420049Z"),
            Some(1_795_343_662)
        );
        assert_eq!(
            datetime_unix("2023-11-15T00:13:20+02:00"),
            Some(1_700_000_000)
        );
        assert_eq!(
            datetime_unix("2023-11-14T21:13:20-01:00"),
            Some(1_700_000_000)
        );
        assert_eq!(datetime_unix("2024-02-29T00:00:00Z"), Some(1_709_164_800));
        for bad in [
            "",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.Z",
            "2023-13-14T22:13:20Z",
            "2023-11-14T22:13:20Zjunk",
            "2023-11-14 22:13:20Z",
            "1969-12-31T23:59:59Z",
            "+023-11-14T22:13:20Z",
            "2023-11-14T22:13:20+0200",
        ] {
            assert_eq!(datetime_unix(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn set_body_replaces_all_languages() {
        let mut m = parse(
            "<message><subject>s</subject><body>a</body><body xml:lang='de'>b</body><x/></message>",
        );
        set_body(&mut m, "c");
        assert_eq!(
            m.to_xml(&NsScope::client_stream()),
            "<message><subject>s</subject><body>c</body><x/></message>"
        );
        let mut m = parse("<message/>");
        set_body(&mut m, "z");
        assert_eq!(body(&m).as_deref(), Some("z"));
    }

    #[test]
    fn carbons_and_mam() {
        let c = parse(EJABBERD_SENT_CARBON);
        let (dir, inner) = carbon(&c).unwrap();
        assert_eq!(dir, CarbonDirection::Sent);
        assert_eq!(body(inner).unwrap(), "hi there");
        let own = Jid::parse("bob@example.org/phone").unwrap();
        assert!(carbon_from_own_account(&c, &own));
        let forged = parse(
            "<message from='eve@evil.test'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client'/></forwarded></received></message>",
        );
        assert_eq!(carbon(&forged).unwrap().0, CarbonDirection::Received);
        assert!(!carbon_from_own_account(&forged, &own));
        let r = parse(EJABBERD_MAM_RESULT);
        let mam = mam_result(&r).unwrap();
        assert_eq!(mam.query_id, Some("q1"));
        assert_eq!(mam.id, Some("28482-98726-73623"));
        assert_eq!(mam.stamp, Some("2010-07-10T23:08:25Z"));
        assert_eq!(body(mam.message).unwrap(), "archived");
        assert!(carbon(&r).is_none());
        assert!(mam_result(&c).is_none());
    }

    #[test]
    fn receipts() {
        let m = parse("<message id='x'><request xmlns='urn:xmpp:receipts'/></message>");
        assert!(receipt_requested(&m));
        let r = make_receipt("a@b/c", "x");
        assert_eq!(receipt_received(&r), Some("x"));
        assert_eq!(
            r.to_xml(&NsScope::client_stream()),
            "<message to='a@b/c'><received id='x' xmlns='urn:xmpp:receipts'/></message>"
        );
    }

    #[test]
    fn encryption_rewrite_keeps_only_the_allowlist() {
        let mut m = parse(concat!(
            "<message to='alice@example.org' type='chat' id='k1'>",
            "<body>secret</body><body xml:lang='de'>geheim</body>",
            "<subject>secret subject</subject><thread>t1</thread>",
            "<html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'>secret</body></html>",
            "<x xmlns='jabber:x:oob'><url>https://secret</url></x>",
            "<reply xmlns='urn:xmpp:reply:0' id='p'/><fallback xmlns='urn:xmpp:fallback:0'/>",
            "<replace xmlns='urn:xmpp:message-correct:0' id='old'/>",
            "<request xmlns='urn:xmpp:receipts'/><active xmlns='http://jabber.org/protocol/chatstates'/>",
            "<markable xmlns='urn:xmpp:chat-markers:0'/><origin-id xmlns='urn:xmpp:sid:0' id='o1'/>",
            "<stanza-id xmlns='urn:xmpp:sid:0' id='s1' by='x'/>",
            "<no-store xmlns='urn:xmpp:hints'/><no-storage xmlns='urn:xmpp:hints'/><store xmlns='urn:xmpp:hints'/>",
            "<no-copy xmlns='urn:xmpp:hints'/>",
            "</message>"
        ));
        rewrite_for_encryption(&mut m, "?OTR:AAMD.");
        let xml = m.to_xml(&NsScope::client_stream());
        assert!(!xml.contains("secret"), "{xml}");
        assert!(!xml.contains("geheim"), "{xml}");
        assert!(!xml.contains("no-store"), "{xml}");
        assert_eq!(
            xml,
            concat!(
                "<message to='alice@example.org' type='chat' id='k1'>",
                "<request xmlns='urn:xmpp:receipts'/><active xmlns='http://jabber.org/protocol/chatstates'/>",
                "<markable xmlns='urn:xmpp:chat-markers:0'/><origin-id xmlns='urn:xmpp:sid:0' id='o1'/>",
                "<body>?OTR:AAMD.</body>",
                "<encryption namespace='urn:xmpp:otr:0' xmlns='urn:xmpp:eme:0'/>",
                "<private xmlns='urn:xmpp:carbons:2'/>",
                "<no-copy xmlns='urn:xmpp:hints'/>",
                "<no-permanent-store xmlns='urn:xmpp:hints'/>",
                "</message>"
            )
        );
        // Idempotent on the added elements.
        rewrite_for_encryption(&mut m, "?OTR:AAMD.");
        assert_eq!(m.to_xml(&NsScope::client_stream()), xml);
    }

    #[test]
    fn encryption_rewrite_empties_allowed_children() {
        // Found by fuzz/stanza_rewrite: content nested in an allowed child
        // survived the rewrite in clear.
        let mut m = parse(concat!(
            "<message to='bob@example.org' type='chat' id='m1'>",
            "<composing xmlns='http://jabber.org/protocol/chatstates'><body>the secret body text</body></composing>",
            "<received xmlns='urn:xmpp:receipts' id='r1'>the secret body text</received>",
            "<delay xmlns='urn:xmpp:delay' stamp='2023-11-14T22:13:20Z'>Offline storage</delay>",
            "<body>the secret body text</body></message>"
        ));
        rewrite_for_encryption(&mut m, "?OTR:AAMD.");
        let xml = m.to_xml(&NsScope::client_stream());
        assert!(!xml.contains("secret"), "{xml}");
        assert!(!xml.contains("Offline"), "{xml}");
        assert!(
            xml.starts_with(concat!(
                "<message to='bob@example.org' type='chat' id='m1'>",
                "<composing xmlns='http://jabber.org/protocol/chatstates'/>",
                "<received xmlns='urn:xmpp:receipts' id='r1'/>",
                "<delay xmlns='urn:xmpp:delay' stamp='2023-11-14T22:13:20Z'/>",
                "<body>?OTR:AAMD.</body>"
            )),
            "{xml}"
        );
    }
}
