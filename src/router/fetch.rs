//! Reading offline storage with XEP-0013 instead of the server's flush.
//!
//! ejabberd flushes offline storage once, at the session's initial
//! presence, and its store races that flush: a message stored while the
//! flush runs — the sender's proxy wrote to the receiver's old full JID
//! just before the new session's presence — is either left in storage
//! until the *next* login, or (its write landing between the flush's read
//! and its delete of the whole spool) deleted unread: lost at the server,
//! though the sender's server had acknowledged it (both seen in the chaos
//! campaign, docs/chaos.md). So the router reads storage itself:
//!
//! * at login it holds the client's initial presence, sends a XEP-0013
//!   `<fetch/>` (which also tells ejabberd not to flush at the presence)
//!   and lets the presence go when the fetch is answered (or after
//!   [`LOGIN_FETCH_WAIT_SECS`]; a server without XEP-0013 answers with an
//!   error and flushes as before), then fetches once more for what was
//!   stored meanwhile;
//! * each message a fetch delivers is handled like any other and then
//!   removed from storage by its node — one message at a time, never the
//!   whole spool, so a message stored meanwhile stays for the next fetch;
//! * when a gap stays open for [`FETCH_AFTER_SECS`] — a counter missing
//!   in the reorder hold ([`super::reorder`]), or a message waiting for a
//!   fragment — it fetches again.
//!
//! The `<offline/>` marker is taken off before the client sees a message;
//! the fetches' results and the removals' results stay in the proxy.

use crate::xmpp::stanza;
use crate::xmpp::{Element, ns};

/// XEP-0013's namespace.
pub(crate) const NS: &str = "http://jabber.org/protocol/offline";

/// How long a gap stays open before offline storage is fetched again
/// (well inside [`super::reorder::HOLD_SECS`], so what the fetch finds
/// still fills the gap in order).
pub(crate) const FETCH_AFTER_SECS: u64 = 2;

/// How long the client's initial presence waits for the login's fetch
/// to be answered (a server without XEP-0013 answers with an error).
pub(crate) const LOGIN_FETCH_WAIT_SECS: u64 = 5;

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
