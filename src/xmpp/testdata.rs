//! Byte samples shaped like what ejabberd 23.01 sends (see
//! shared/notes/ejabberd.md), shared by the unit tests.

/// Server stream header and pre-TLS features.
pub const EJABBERD_PRE_TLS: &str = "<?xml version='1.0'?><stream:stream id='2836532947313353445' version='1.0' xml:lang='en' xmlns:stream='http://etherx.jabber.org/streams' from='example.org' xmlns='jabber:client'><stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>";

/// Features after TLS, before SASL.
pub const EJABBERD_SASL_FEATURES: &str = "<stream:features><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='http://www.process-one.net/en/ejabberd/' ver='1Kx+OmyQkamzYXkqThQT/PPmJyY='/><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>DIGEST-MD5</mechanism><mechanism>PLAIN</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>SCRAM-SHA-1-PLUS</mechanism><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-256-PLUS</mechanism><mechanism>SCRAM-SHA-512</mechanism><mechanism>SCRAM-SHA-512-PLUS</mechanism><mechanism>X-OAUTH2</mechanism></mechanisms><register xmlns='http://jabber.org/features/iq-register'/></stream:features>";

/// Features after SASL success.
pub const EJABBERD_BIND_FEATURES: &str = "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='http://www.process-one.net/en/ejabberd/' ver='1Kx+OmyQkamzYXkqThQT/PPmJyY='/><sm xmlns='urn:xmpp:sm:2'/><sm xmlns='urn:xmpp:sm:3'/><ver xmlns='urn:xmpp:features:rosterver'/><csi xmlns='urn:xmpp:csi:0'/></stream:features>";

/// An offline message flushed after the initial presence.
pub const EJABBERD_OFFLINE_MESSAGE: &str = "<message xml:lang='en' to='bob@example.org' from='alice@example.org/laptop' type='chat' id='m1'><archived by='bob@example.org' xmlns='urn:xmpp:mam:tmp' id='1700000000000000'/><stanza-id by='bob@example.org' xmlns='urn:xmpp:sid:0' id='1700000000000000'/><body>?OTR:AAMDabc&amp;def&lt;x&gt;.</body><delay xmlns='urn:xmpp:delay' from='example.org' stamp='2023-11-14T22:13:20.000000Z'>Offline storage</delay></message>";

/// A carbon copy of a message sent by another resource.
pub const EJABBERD_SENT_CARBON: &str = "<message from='bob@example.org' to='bob@example.org/phone' type='chat'><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='bob@example.org/laptop' to='alice@example.org' type='chat' id='c1'><body>hi there</body></message></forwarded></sent></message>";

/// A MAM result.
pub const EJABBERD_MAM_RESULT: &str = "<message from='bob@example.org' to='bob@example.org/phone'><result xmlns='urn:xmpp:mam:2' queryid='q1' id='28482-98726-73623'><forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2010-07-10T23:08:25Z'/><message xmlns='jabber:client' from='alice@example.org/laptop' to='bob@example.org' type='chat'><body>archived</body></message></forwarded></result></message>";

/// A whole server→client session as one byte string.
pub fn ejabberd_session() -> String {
    format!(
        "{EJABBERD_PRE_TLS}{EJABBERD_SASL_FEATURES}<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>dj1ybUlhQ2J3cFFMZGYyYnFpMzJLSFNNQT09</success>\
         <iq id='b1' type='result'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>bob@example.org/phone</jid></bind></iq>\n \
         <r xmlns='urn:xmpp:sm:3'/>{EJABBERD_OFFLINE_MESSAGE}{EJABBERD_SENT_CARBON}<!-- c --><message to='b@x'><body><![CDATA[a <b> ]] > c]]></body><x a='q&apos;\">'/></message>{EJABBERD_MAM_RESULT}</stream:stream>"
    )
}
