//! Fetching offline storage again when a gap does not fill (XEP-0013).
//!
//! ejabberd flushes offline storage once, at the session's initial
//! presence. A message stored while that flush runs — the sender's proxy
//! wrote to the receiver's old full JID just before the new session's
//! presence, and the store was slow — stays in storage until the *next*
//! login (seen in the chaos campaign, docs/chaos.md). The reorder hold
//! ([`super::reorder`]) sees it as a gap. So when a gap has been open for
//! [`FETCH_AFTER_SECS`], the router asks the server for what it still holds
//! (XEP-0013 `<fetch/>`, which ejabberd serves); each message it gets that
//! way is handled like any other and then removed from storage by its node
//! (so the next login does not deliver it again). The `<offline/>` marker
//! is taken off before the client sees the message; the fetch's result and
//! the removals' results stay in the proxy.

use crate::xmpp::stanza;
use crate::xmpp::{Element, ns};

/// XEP-0013's namespace.
pub(crate) const NS: &str = "http://jabber.org/protocol/offline";

/// How long a gap stays open before offline storage is fetched again
/// (well inside [`super::reorder::HOLD_SECS`], so what the fetch finds
/// still fills the gap in order).
pub(crate) const FETCH_AFTER_SECS: u64 = 2;

/// Id prefix of the proxy's XEP-0013 requests (results stay here).
pub(crate) const ID_PREFIX: &str = "o2tr-offline-";

/// The request for every message offline storage still holds.
pub(crate) fn fetch_request(id: &str) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", id)
        .with_child(Element::new("offline", NS).with_child(Element::new("fetch", NS)))
}

/// The request removing the fetched message `node` from offline storage.
pub(crate) fn remove_request(id: &str, node: &str) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", id)
        .with_child(
            Element::new("offline", NS).with_child(
                Element::new("item", NS)
                    .with_attr("action", "remove")
                    .with_attr("node", node),
            ),
        )
}

/// If `el` is a message delivered by a fetch, takes its `<offline/>`
/// marker off and returns the node that removes it from storage.
pub(crate) fn take_node(el: &mut Element) -> Option<String> {
    if !stanza::is_message(el) {
        return None;
    }
    let node = el
        .get_child("offline", NS)?
        .get_child("item", NS)?
        .attr("node")?
        .to_string();
    el.remove_children(|c| c.is("offline", NS));
    Some(node)
}

/// Whether `el` answers one of the proxy's XEP-0013 requests.
pub(crate) fn is_answer(el: &Element) -> bool {
    el.is("iq", ns::CLIENT)
        && matches!(el.attr("type"), Some("result" | "error"))
        && el.attr("id").is_some_and(|i| i.starts_with(ID_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::element::NsScope;

    fn parse(xml: &str) -> Element {
        Element::parse(xml.as_bytes(), &NsScope::client_stream()).unwrap()
    }

    #[test]
    fn requests_are_xep_0013() {
        let scope = NsScope::client_stream();
        assert_eq!(
            fetch_request("o2tr-offline-1").to_xml(&scope),
            "<iq type='get' id='o2tr-offline-1'><offline xmlns='http://jabber.org/protocol/offline'><fetch/></offline></iq>"
        );
        assert_eq!(
            remove_request("o2tr-offline-2", "2026-11-22T11:14:14.444Z").to_xml(&scope),
            "<iq type='set' id='o2tr-offline-2'><offline xmlns='http://jabber.org/protocol/offline'><item action='remove' node='2026-11-22T11:14:14.444Z'/></offline></iq>"
        );
    }

    #[test]
    fn a_fetched_message_loses_its_marker() {
        let mut el = parse(
            "<message from='a@x/r' type='chat'><body>?OTR:AAMD.</body>\
             <offline xmlns='http://jabber.org/protocol/offline'><item node='n1'/></offline></message>",
        );
        assert_eq!(take_node(&mut el).as_deref(), Some("n1"));
        assert!(el.get_child("offline", NS).is_none());
        assert_eq!(stanza::body(&el).as_deref(), Some("?OTR:AAMD."));
        // An ordinary message, or a marker without a node: nothing.
        let mut plain = parse("<message from='a@x/r'><body>hi</body></message>");
        assert_eq!(take_node(&mut plain), None);
        let mut bare = parse(
            "<message><offline xmlns='http://jabber.org/protocol/offline'><item/></offline></message>",
        );
        assert_eq!(take_node(&mut bare), None);
    }

    #[test]
    fn only_our_answers_are_recognised() {
        assert!(is_answer(&parse("<iq type='result' id='o2tr-offline-3'/>")));
        assert!(is_answer(&parse("<iq type='error' id='o2tr-offline-3'/>")));
        assert!(!is_answer(&parse("<iq type='result' id='o2tr-roster-3'/>")));
        assert!(!is_answer(&parse("<iq type='get' id='o2tr-offline-3'/>")));
    }
}
