//! Stream features (RFC 6120 §4.3.2) as the proxy shows them to the client.
//!
//! The proxy terminates TLS on both legs, so server features are filtered
//! before they reach the client (DESIGN §3):
//!
//! * SASL mechanisms ending in `-PLUS` — channel binding (RFC 5929) binds
//!   to the TLS connection, which differs on each leg;
//!   the XEP-0440 `<sasl-channel-binding/>` advertisement likewise;
//! * stream compression (XEP-0138);
//! * SASL2 (XEP-0388) and Bind 2 (XEP-0386), which would carry
//!   authentication and binding inline where the proxy does not look;
//! * stream management (XEP-0198, `sm:2` and `sm:3`): the proxy swallows
//!   and injects stanzas, so end-to-end SM counters would be wrong. SM is
//!   never offered to the client (the proxy answers a stray client
//!   `<enable/>` itself with `<failed/>`); the proxy can terminate it on
//!   the upstream leg itself (`proxy::ProxyConfig::upstream_sm`).
//!
//! Everything else is kept; when nothing is removed the original bytes are
//! forwarded unchanged.

use super::element::{Element, ElementError, NsScope};
use super::ns;

/// True for a feature element the client must not see.
fn is_stripped_feature(c: &Element) -> bool {
    matches!(
        c.ns(),
        ns::COMPRESS_FEATURE | ns::SASL2 | ns::BIND2 | ns::SM2 | ns::SM3 | ns::SASL_CB | ns::FAST
    )
}

/// Removes what the proxy cannot carry through; returns true if anything changed.
pub fn filter_features(features: &mut Element) -> bool {
    let mut changed = features.remove_children(is_stripped_feature) > 0;
    if let Some(mechs) = features.get_child_mut("mechanisms", ns::SASL) {
        let n = mechs
            .remove_children(|m| m.is("mechanism", ns::SASL) && m.text().trim().ends_with("-PLUS"));
        changed |= n > 0;
    }
    changed
}

/// Filters a raw `<stream:features>` frame. Returns the original bytes if
/// nothing was removed, else the re-serialised element.
pub fn filter_features_raw(raw: &[u8], scope: &NsScope) -> Result<Vec<u8>, ElementError> {
    let mut el = Element::parse(raw, scope)?;
    if filter_features(&mut el) {
        Ok(el.to_xml(scope).into_bytes())
    } else {
        Ok(raw.to_vec())
    }
}

/// True if the element is `<stream:features>`.
pub fn is_features(el: &Element) -> bool {
    el.is("features", ns::STREAMS)
}

/// True if the features offer STARTTLS.
pub fn offers_starttls(features: &Element) -> bool {
    features.has_child("starttls", ns::TLS)
}

/// The SASL mechanisms offered.
pub fn mechanisms(features: &Element) -> Vec<String> {
    features
        .get_child("mechanisms", ns::SASL)
        .map(|m| {
            m.children()
                .filter(|c| c.is("mechanism", ns::SASL))
                .map(|c| c.text().trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The features the proxy itself offers the client before TLS:
/// STARTTLS, `<required/>` unless plaintext is allowed.
pub fn proxy_starttls_features(required: bool) -> String {
    if required {
        format!(
            "<stream:features><starttls xmlns='{}'><required/></starttls></stream:features>",
            ns::TLS
        )
    } else {
        format!(
            "<stream:features><starttls xmlns='{}'/></stream:features>",
            ns::TLS
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::testdata::*;

    fn parse(s: &str) -> Element {
        Element::parse(s.as_bytes(), &NsScope::client_stream()).unwrap()
    }

    #[test]
    fn strips_plus_mechanisms_of_ejabberd() {
        let mut f = parse(EJABBERD_SASL_FEATURES);
        assert!(filter_features(&mut f));
        assert_eq!(
            mechanisms(&f),
            [
                "DIGEST-MD5",
                "PLAIN",
                "SCRAM-SHA-1",
                "SCRAM-SHA-256",
                "SCRAM-SHA-512",
                "X-OAUTH2"
            ]
        );
        assert!(f.has_child("c", ns::CAPS));
        assert!(f.has_child("register", "http://jabber.org/features/iq-register"));
        let raw = filter_features_raw(EJABBERD_SASL_FEATURES.as_bytes(), &NsScope::client_stream())
            .unwrap();
        let s = String::from_utf8(raw).unwrap();
        assert!(!s.contains("-PLUS"));
        assert!(s.starts_with("<stream:features><c xmlns='http://jabber.org/protocol/caps'"));
        assert!(s.ends_with("</stream:features>"));
    }

    #[test]
    fn strips_sm_after_auth_and_keeps_the_rest() {
        let mut f = parse(EJABBERD_BIND_FEATURES);
        assert!(filter_features(&mut f));
        assert!(f.has_child("bind", ns::BIND));
        assert!(f.has_child("session", ns::SESSION));
        assert!(f.has_child("ver", ns::ROSTERVER));
        assert!(f.has_child("csi", ns::CSI));
        assert!(!f.has_child("sm", ns::SM2));
        assert!(!f.has_child("sm", ns::SM3));
    }

    #[test]
    fn strips_compression_sasl2_bind2_channel_binding() {
        let mut f = parse(concat!(
            "<stream:features>",
            "<compression xmlns='http://jabber.org/features/compress'><method>zlib</method></compression>",
            "<authentication xmlns='urn:xmpp:sasl:2'><mechanism>SCRAM-SHA-256</mechanism>",
            "<inline><bind xmlns='urn:xmpp:bind:0'/></inline></authentication>",
            "<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'><channel-binding type='tls-exporter'/></sasl-channel-binding>",
            "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256-PLUS</mechanism><mechanism>PLAIN</mechanism></mechanisms>",
            "</stream:features>"
        ));
        assert!(filter_features(&mut f));
        assert_eq!(
            f.to_xml(&NsScope::client_stream()),
            "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms></stream:features>"
        );
    }

    #[test]
    fn unchanged_features_are_byte_identical() {
        let raw = b"<stream:features ><bind   xmlns=\"urn:ietf:params:xml:ns:xmpp-bind\"/></stream:features>";
        assert_eq!(
            filter_features_raw(raw, &NsScope::client_stream()).unwrap(),
            raw.to_vec()
        );
        let f = parse(EJABBERD_PRE_TLS.split_once("'jabber:client'>").unwrap().1);
        assert!(offers_starttls(&f));
    }

    #[test]
    fn proxy_features_parse() {
        let f = parse(&proxy_starttls_features(true));
        assert!(offers_starttls(&f));
        assert!(
            f.get_child("starttls", ns::TLS)
                .unwrap()
                .has_child("required", ns::TLS)
        );
        let f = parse(&proxy_starttls_features(false));
        assert!(
            !f.get_child("starttls", ns::TLS)
                .unwrap()
                .has_child("required", ns::TLS)
        );
    }
}
