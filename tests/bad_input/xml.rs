//! The XMPP stream framer (`xmpp::framer`) on hostile XML: DTDs and
//! entity expansion (billion laughs), deep nesting, oversized stanzas,
//! invalid UTF-8, unclosed or mismatched tags, stray headers and
//! declarations. Each must end the stream with a typed error whose RFC 6120
//! stream error condition is the right one, and the framer must stay
//! failed (nothing after the violation is framed).

use o2tr_proxy::xmpp::{Frame, Framer, FramerConfig, FramerError as X};

use crate::support::run_table;

pub const HEADER: &str = "<?xml version='1.0'?><stream:stream to='example.test' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

/// A 10-level billion-laughs DTD.
pub fn laughs() -> String {
    let mut s = String::from("<!DOCTYPE lolz [<!ENTITY lol0 \"lol\">");
    for i in 1..10 {
        s.push_str(&format!(
            "<!ENTITY lol{i} \"{}\">",
            format!("&lol{};", i - 1).repeat(10)
        ));
    }
    s.push_str("]>");
    s
}

pub const LIMIT: usize = 4096;

pub struct Case {
    pub name: &'static str,
    /// Whether the bytes follow a valid stream header.
    pub after_header: bool,
    pub bytes: fn() -> Vec<u8>,
    pub want: fn(&X) -> bool,
    pub condition: &'static str,
}

fn nest(n: usize) -> Vec<u8> {
    format!("<message>{}", "<x>".repeat(n)).into_bytes()
}

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "xml: billion laughs before the stream header",
            after_header: false,
            bytes: || format!("<?xml version='1.0'?>{}{}", laughs(), &HEADER[21..]).into_bytes(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: billion laughs inside the stream",
            after_header: true,
            bytes: || format!("{}<message><body>&lol9;</body></message>", laughs()).into_bytes(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: entity declaration inside a stanza",
            after_header: true,
            bytes: || b"<message><!ENTITY x 'y'><body>&x;</body></message>".to_vec(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: undeclared entity reference in a body",
            after_header: true,
            bytes: || b"<message><body>&lol9;</body></message>".to_vec(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: external entity reference (XXE)",
            after_header: true,
            bytes: || b"<message><body>&xxe;</body></message>".to_vec(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: entity reference in an attribute",
            after_header: true,
            bytes: || b"<message to='&lol;'/>".to_vec(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: processing instruction inside the stream",
            after_header: true,
            bytes: || b"<?evil run='me'?>".to_vec(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: processing instruction inside a stanza",
            after_header: true,
            bytes: || b"<message><?evil x?></message>".to_vec(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: second XML declaration",
            after_header: true,
            bytes: || b"<?xml version='1.0'?>".to_vec(),
            want: |e| matches!(e, X::Restricted(_)),
            condition: "restricted-xml",
        },
        Case {
            name: "xml: nesting one level too deep",
            after_header: true,
            bytes: || nest(64),
            want: |e| matches!(e, X::TooDeep { limit: 64 }),
            condition: "policy-violation",
        },
        Case {
            name: "xml: 100000 nested open tags",
            after_header: true,
            bytes: || nest(100_000),
            want: |e| matches!(e, X::TooDeep { limit: 64 } | X::TooLarge { limit: LIMIT }),
            condition: "policy-violation",
        },
        Case {
            name: "xml: stanza over the size limit",
            after_header: true,
            bytes: || format!("<message><body>{}</body></message>", "a".repeat(LIMIT)).into_bytes(),
            want: |e| matches!(e, X::TooLarge { limit: LIMIT }),
            condition: "policy-violation",
        },
        Case {
            name: "xml: a start tag that never ends",
            after_header: true,
            bytes: || format!("<message to='{}", "a".repeat(2 * LIMIT)).into_bytes(),
            want: |e| matches!(e, X::TooLarge { limit: LIMIT }),
            condition: "policy-violation",
        },
        Case {
            name: "xml: a comment that never ends",
            after_header: true,
            bytes: || format!("<message><!--{}", "a".repeat(2 * LIMIT)).into_bytes(),
            want: |e| matches!(e, X::TooLarge { limit: LIMIT }),
            condition: "policy-violation",
        },
        Case {
            name: "xml: invalid UTF-8 in a body",
            after_header: true,
            bytes: || b"<message><body>\xff\xfe</body></message>".to_vec(),
            want: |e| matches!(e, X::InvalidUtf8),
            condition: "unsupported-encoding",
        },
        Case {
            name: "xml: invalid UTF-8 in an attribute",
            after_header: true,
            bytes: || b"<message to='\xc3\x28'/>".to_vec(),
            want: |e| matches!(e, X::InvalidUtf8),
            condition: "unsupported-encoding",
        },
        Case {
            name: "xml: overlong UTF-8 encoding of '/'",
            after_header: true,
            bytes: || b"<message><body>\xc0\xaf</body></message>".to_vec(),
            want: |e| matches!(e, X::InvalidUtf8),
            condition: "unsupported-encoding",
        },
        Case {
            name: "xml: UTF-8 encoded surrogate",
            after_header: true,
            bytes: || b"<message><body>\xed\xa0\x80</body></message>".to_vec(),
            want: |e| matches!(e, X::InvalidUtf8),
            condition: "unsupported-encoding",
        },
        Case {
            name: "xml: invalid UTF-8 in the stream header",
            after_header: false,
            bytes: || {
                b"<stream:stream to='\xff' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>".to_vec()
            },
            want: |e| matches!(e, X::InvalidUtf8),
            condition: "unsupported-encoding",
        },
        Case {
            name: "xml: unclosed child (mismatched end tag)",
            after_header: true,
            bytes: || b"<message><body>hi</message>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: stanza left open at the stream end",
            after_header: true,
            bytes: || b"<message><body>hi</stream:stream>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: '<' inside a tag",
            after_header: true,
            bytes: || b"<message <body/>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: unquoted attribute value",
            after_header: true,
            bytes: || b"<message to=bob/>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: duplicate attribute",
            after_header: true,
            bytes: || b"<message to='a' to='b'/>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: character reference to NUL",
            after_header: true,
            bytes: || b"<message><body>&#0;</body></message>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: character reference to a surrogate",
            after_header: true,
            bytes: || b"<message><body>&#xD800;</body></message>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: text at stream level",
            after_header: true,
            bytes: || b"hello<message/>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: CDATA at stream level",
            after_header: true,
            bytes: || b"<![CDATA[x]]>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: second stream header inside the stream",
            after_header: true,
            bytes: || HEADER.as_bytes()[21..].to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: data after the stream end",
            after_header: true,
            bytes: || b"</stream:stream><message/>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: end tag before the stream header",
            after_header: false,
            bytes: || b"</stream:stream>".to_vec(),
            want: |e| matches!(e, X::NotWellFormed(_)),
            condition: "not-well-formed",
        },
        Case {
            name: "xml: stream header in the wrong namespace",
            after_header: false,
            bytes: || {
                b"<stream:stream to='example.test' xmlns='jabber:client' xmlns:stream='urn:evil'>"
                    .to_vec()
            },
            want: |e| matches!(e, X::BadStreamHeader(_)),
            condition: "invalid-namespace",
        },
        Case {
            name: "xml: self-closed stream header",
            after_header: false,
            bytes: || {
                b"<stream:stream to='example.test' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'/>".to_vec()
            },
            want: |e| matches!(e, X::BadStreamHeader(_)),
            condition: "invalid-namespace",
        },
    ]
}

/// Frames `input` in small reads (as a network delivers it); returns the
/// error, or `None` if the framer only ever asked for more bytes.
pub fn first_error(input: &[u8]) -> Option<(X, Framer)> {
    let mut f = Framer::new(FramerConfig {
        max_stanza_bytes: LIMIT,
        max_depth: 64,
    });
    for chunk in input.chunks(97) {
        f.push(chunk);
        loop {
            match f.next() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Some((e, f)),
            }
        }
    }
    None
}

#[test]
fn framer_rejects_hostile_xml() {
    let cases = cases();
    run_table(
        "XML",
        &cases,
        |c| c.name,
        |_, c| {
            let mut input = Vec::new();
            if c.after_header {
                input.extend_from_slice(HEADER.as_bytes());
            }
            input.extend_from_slice(&(c.bytes)());
            let Some((e, mut f)) = first_error(&input) else {
                return Err("accepted (or waited for more) instead of failing".into());
            };
            if !(c.want)(&e) {
                return Err(format!("failed with {e:?}"));
            }
            if !c.condition.is_empty() && e.condition() != c.condition {
                return Err(format!("condition {}, want {}", e.condition(), c.condition));
            }
            // Failed for good: even valid bytes are not framed after it.
            f.push(b"<message/>");
            match f.next() {
                Err(again) if again == e => Ok(()),
                other => Err(format!("after the error the framer gave {other:?}")),
            }
        },
    );
    // The header itself is fine.
    let mut f = Framer::new(FramerConfig::default());
    f.push(HEADER.as_bytes());
    assert!(matches!(f.next(), Ok(Some(Frame::XmlDecl(_)))));
    assert!(matches!(f.next(), Ok(Some(Frame::StreamHeader(_)))));
}
