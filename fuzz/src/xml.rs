//! Bodies of the XMPP targets: `xml_framer` (the incremental framer
//! against the element parser) and `stanza_rewrite` (the outgoing
//! encrypted-message rewrite and the incoming unwrapping helpers).

use o2tr_proxy::xmpp::element::{ElementError, NsScope};
use o2tr_proxy::xmpp::framer::validate_stanza;
use o2tr_proxy::xmpp::stanza::{self, is_safe_child, rewrite_for_encryption};
use o2tr_proxy::xmpp::{Element, Frame, Framer, FramerConfig, Node, ns};

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use o2tr_proxy::otr::message::{Body, EncodedMessage, Header};
use o2tr_proxy::proxy::{HookFactory, Outgoing, StanzaHook};
use o2tr_proxy::router::{RouterConfig, RouterFactory, SharedStore};
use o2tr_proxy::store::{ConversationKey, MemoryStore, SessionState, Store};
use o2tr_proxy::xmpp::Jid;

use super::fixture::{ALICE_TAG, BOB_TAG, Input, T0, fixture};

/// Runs a framer over `chunks`; returns the frames (adjacent whitespace
/// merged, since a keepalive run may be cut anywhere) and whether it failed.
fn frame_all<'a>(
    cfg: FramerConfig,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Frame>, bool) {
    let mut f = Framer::new(cfg);
    let mut frames: Vec<Frame> = Vec::new();
    for c in chunks {
        f.push(c);
        loop {
            match f.next() {
                Ok(Some(Frame::Whitespace(w))) => {
                    if let Some(Frame::Whitespace(prev)) = frames.last_mut() {
                        prev.extend(w);
                    } else {
                        frames.push(Frame::Whitespace(w));
                    }
                }
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => {
                    // Whitespace before the error may or may not have been
                    // flushed, depending on where the input was cut.
                    while matches!(frames.last(), Some(Frame::Whitespace(_))) {
                        frames.pop();
                    }
                    return (frames, true);
                }
            }
        }
    }
    (frames, false)
}

/// Serialises `el` and checks the result is a fixpoint of parse∘serialise,
/// passes the framer's own well-formedness check, and frames as exactly one
/// stanza.
fn check_serialisation(el: &Element, scope: &NsScope) -> String {
    let xml = el.to_xml(scope);
    validate_stanza(xml.as_bytes())
        .unwrap_or_else(|e| panic!("serialised element rejected by the framer ({e}): {xml}"));
    let again = Element::parse(xml.as_bytes(), scope)
        .unwrap_or_else(|e| panic!("serialised element does not parse ({e}): {xml}"));
    assert_eq!(again.to_xml(scope), xml, "serialisation is not stable");
    let header =
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
    let (frames, failed) = frame_all(FramerConfig::default(), [header.as_bytes(), xml.as_bytes()]);
    assert!(!failed, "framer rejects a serialised element: {xml}");
    assert!(
        matches!(frames.as_slice(), [Frame::StreamHeader(_), Frame::Stanza(s)] if s == xml.as_bytes()),
        "serialised element is not one stanza: {xml}"
    );
    xml
}

/// First byte: limits; second: how to cut the input into chunks. The
/// frames must not depend on the cut; every stanza the framer emits must
/// parse with the element parser (an unbound prefix is a namespace error,
/// not a framing one) and re-serialise to a stanza the framer accepts.
pub fn xml_framer(data: &[u8]) {
    let mut input = Input::new(data);
    let limits = input.byte();
    let cfg = if limits & 0x80 == 0 {
        FramerConfig::default()
    } else {
        FramerConfig {
            max_stanza_bytes: 16 + usize::from(limits & 0x3f) * 8,
            max_depth: 1 + usize::from(limits & 0x07),
        }
    };
    let cut = usize::from(input.byte() % 16) + 1;
    let bytes = input.rest();
    let (whole, whole_failed) = frame_all(cfg, [bytes]);
    let (pieces, pieces_failed) = frame_all(cfg, bytes.chunks(cut));
    assert_eq!(whole_failed, pieces_failed, "chunking changed the verdict");
    assert_eq!(whole, pieces, "chunking changed the frames");

    let mut scope = NsScope::client_stream();
    for f in &whole {
        match f {
            Frame::StreamHeader(h) => scope = NsScope::from_header(h),
            Frame::Stanza(raw) => match Element::parse(raw, &scope) {
                Ok(el) => {
                    check_serialisation(&el, &scope);
                }
                Err(ElementError::UnboundPrefix(_)) => {}
                Err(e) => panic!(
                    "framer emitted a stanza the parser rejects ({e}): {:?}",
                    String::from_utf8_lossy(raw)
                ),
            },
            Frame::XmlDecl(_) | Frame::Whitespace(_) | Frame::StreamEnd(_) => {}
        }
    }
}

/// The ciphertext the rewrite puts in the body.
const CIPHERTEXT: &str = "?OTR:AAMDZnV6eg==.";

/// The children the rewrite adds itself.
fn is_added(c: &Element) -> bool {
    c.is("encryption", ns::EME)
        || c.is("private", ns::CARBONS)
        || c.is("no-copy", ns::HINTS)
        || c.is("no-permanent-store", ns::HINTS)
}

/// Every text node in the tree, depth first.
fn texts(el: &Element, out: &mut Vec<String>) {
    for n in el.nodes() {
        match n {
            Node::Text(t) => out.push(t.clone()),
            Node::Element(e) => texts(e, out),
        }
    }
}

/// The outgoing rewrite's guarantees on one message.
fn check_rewrite(original: &Element) {
    let mut el = original.clone();
    rewrite_for_encryption(&mut el, CIPHERTEXT);
    assert_eq!(el.attrs(), original.attrs(), "attributes changed");
    let msg_ns = el.ns().to_owned();
    let mut bodies = 0;
    for n in el.nodes() {
        let Node::Element(c) = n else {
            panic!("text left at the top of an encrypted message");
        };
        if c.is("body", &msg_ns) {
            bodies += 1;
            assert_eq!(c.text(), CIPHERTEXT);
            continue;
        }
        assert!(
            is_safe_child(c) || is_added(c),
            "child outside the allowlist: {}",
            c.to_xml(&NsScope::client_stream())
        );
        assert!(
            !c.is("no-store", ns::HINTS) && !c.is("store", ns::HINTS),
            "storage hint kept"
        );
    }
    assert_eq!(bodies, 1, "not exactly one body");
    for (name, n) in [
        ("encryption", ns::EME),
        ("private", ns::CARBONS),
        ("no-copy", ns::HINTS),
        ("no-permanent-store", ns::HINTS),
    ] {
        assert_eq!(
            el.children().filter(|c| c.is(name, n)).count(),
            1,
            "{name} not added exactly once"
        );
    }
    // Nothing but the ciphertext is left as text anywhere in the tree (so
    // neither the original body nor HTML, subject, thread… can leak), and
    // no element hides inside an allowlisted one.
    let mut all = Vec::new();
    texts(&el, &mut all);
    assert_eq!(all, [CIPHERTEXT], "text other than the ciphertext survives");
    for c in el.children() {
        assert!(
            c.is("body", &msg_ns) || c.children().next().is_none(),
            "an element survives inside an allowed child: {}",
            c.to_xml(&NsScope::client_stream())
        );
    }
    check_serialisation(&el, &NsScope::client_stream());
}

/// The incoming helpers (carbons, MAM, body replacement) on any stanza.
fn check_incoming(el: &Element) {
    let _ = (
        stanza::message_type(el),
        stanza::from(el),
        stanza::to(el),
        stanza::id(el),
        stanza::delay_stamp(el),
        stanza::receipt_requested(el),
        stanza::receipt_received(el),
    );
    if let Some((_, m)) = stanza::carbon(el) {
        assert!(stanza::is_message(m));
        let _ = stanza::body(m);
    }
    if let Some(r) = stanza::mam_result(el) {
        assert!(stanza::is_message(r.message));
        let _ = stanza::body(r.message);
    }
    // What a delivery does to the server's stanza: drop EME, set the body.
    let mut d = el.clone();
    d.remove_children(|c| c.is("encryption", ns::EME));
    stanza::set_body(&mut d, "decrypted text");
    assert_eq!(stanza::body(&d).as_deref(), Some("decrypted text"));
    let ns_msg = d.ns().to_owned();
    assert_eq!(d.children().filter(|c| c.is("body", &ns_msg)).count(), 1);
    check_serialisation(&d, &NsScope::client_stream());
}

const ACCOUNT: &str = "alice@fuzz.example";
const PEER: &str = "bob@fuzz.example";
const USER_TEXT: &str = "the user's secret text";
const PEER_TEXT: &str = "bob's secret text";

/// The real router of one connection, bound to Alice's account, whose
/// store holds her identity and the fixture session with Bob.
fn router() -> Box<dyn StanzaHook> {
    let fx = fixture();
    let mut store = MemoryStore::new();
    let setup = (|| {
        store.set_account_key(ACCOUNT, &fx.alice_key.to_bytes())?;
        store.set_instance_tag(ACCOUNT, ALICE_TAG)?;
        store.save_snapshot(
            &ConversationKey::new(ACCOUNT, PEER, BOB_TAG),
            SessionState::Suspended,
            &fx.alice_snapshot,
            T0,
        )
    })();
    setup.expect("memory store");
    let store: SharedStore = Arc::new(Mutex::new(Box::new(store)));
    let mut hook = RouterFactory::new(RouterConfig::default(), store).new_hook();
    hook.bound(&Jid::parse(&format!("{ACCOUNT}/fuzz")).expect("jid"));
    hook
}

/// The router's outgoing path: the client sends a chat message to Bob
/// with `children`; what goes to the server must be the rewrite (body =
/// ciphertext, allowlist only, nothing else as text) and nothing may
/// reach the server with the user's text.
fn check_router_outgoing(children: &str) {
    let xml = format!(
        "<message to='{PEER}/laptop' type='chat' id='c1'>{children}<body>{USER_TEXT}</body></message>"
    );
    let Some(el) = framed(&xml) else { return };
    let scope = NsScope::client_stream();
    let mut hook = router();
    let now = UNIX_EPOCH + Duration::from_secs(T0 + 10);
    for out in hook.from_client(el, now) {
        let Outgoing::ToServer(s) = out else { continue };
        let xml = s.to_xml(&scope);
        assert!(
            !xml.contains(USER_TEXT),
            "user text sent to the server: {xml}"
        );
        let body = stanza::body(&s).unwrap_or_default();
        if body.starts_with("?OTR:") {
            let mut all = Vec::new();
            texts(&s, &mut all);
            assert_eq!(all, [body], "text besides the ciphertext: {xml}");
            for c in s.children() {
                assert!(
                    c.is("body", ns::CLIENT) || is_safe_child(c) || is_added(c),
                    "child outside the allowlist: {xml}"
                );
            }
        }
    }
}

/// The router's incoming path: an authentic data message from Bob,
/// wrapped in a server stanza with `children`; the client gets exactly
/// one body, the plaintext, and no EME element.
fn check_router_incoming(children: &str) {
    let fx = fixture();
    let mut bob = fx.bob_session();
    let header = Header::v3(BOB_TAG, ALICE_TAG);
    let data = bob.ratchet.encrypt(&header, 0, PEER_TEXT.as_bytes());
    let armored = EncodedMessage {
        header,
        body: Body::Data(data),
    }
    .to_armored();
    let xml = format!(
        "<message from='{PEER}/laptop' to='{ACCOUNT}/fuzz' type='chat' id='s1'>{children}<body>{armored}</body></message>"
    );
    let Some(el) = framed(&xml) else { return };
    let carbon_or_mam = stanza::carbon(&el).is_some() || stanza::mam_result(&el).is_some();
    let first_body = stanza::body(&el);
    let mut hook = router();
    let now = UNIX_EPOCH + Duration::from_secs(T0 + 10);
    let mut delivered = 0;
    for out in hook.from_server(el, now) {
        let Outgoing::ToClient(c) = out else { continue };
        if c.attr("from").is_some_and(|f| f.starts_with(PEER))
            && stanza::body(&c).as_deref() == Some(PEER_TEXT)
        {
            delivered += 1;
            let ns_msg = c.ns().to_owned();
            assert_eq!(c.children().filter(|b| b.is("body", &ns_msg)).count(), 1);
            assert!(!c.has_child("encryption", ns::EME));
        }
        for m in stanza::carbon(&c)
            .map(|(_, m)| m)
            .into_iter()
            .chain(stanza::mam_result(&c).map(|r| r.message))
        {
            let b = stanza::body(m).unwrap_or_default();
            assert!(
                !b.contains("?OTR"),
                "a forwarded OTR body reached the client"
            );
        }
    }
    // The body the router reads is the first one; when it is Bob's
    // message (and no carbon/MAM wrapper takes precedence) it is shown once.
    if !carbon_or_mam && first_body.as_deref() == Some(armored.as_str()) {
        assert_eq!(delivered, 1, "Bob's message not delivered once");
    }
}

/// `xml` as the proxy would see it: framed, then parsed.
fn framed(xml: &str) -> Option<Element> {
    let header =
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
    let (frames, _) = frame_all(FramerConfig::default(), [header.as_bytes(), xml.as_bytes()]);
    let Some(Frame::Stanza(raw)) = frames.get(1) else {
        return None;
    };
    Element::parse(raw, &NsScope::client_stream()).ok()
}

/// First byte (mod 4): 0 → the rest is one stanza; 1 → the rest is the
/// children of a chat message with a secret body; the stanza (if the
/// framer accepts it and it parses) goes through the rewrite and the
/// incoming helpers. 2 and 3 → the rest is the children of a message the
/// real router sends to, or receives from, a peer with an encrypted
/// session.
pub fn stanza_rewrite(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.byte();
    let rest = String::from_utf8_lossy(input.rest()).into_owned();
    // Modes 2 and 3: the same children through the real router.
    match mode % 4 {
        2 => return check_router_outgoing(&rest),
        3 => return check_router_incoming(&rest),
        _ => {}
    }
    let xml = if mode % 4 == 0 {
        rest
    } else {
        format!(
            "<message to='bob@example.org' type='chat' id='m1'>{rest}<body>the secret body text</body></message>"
        )
    };
    // As in the proxy: only what the framer emits reaches the parser.
    let Some(el) = framed(&xml) else {
        return;
    };
    check_incoming(&el);
    if stanza::is_message(&el) {
        check_rewrite(&el);
    }
}
