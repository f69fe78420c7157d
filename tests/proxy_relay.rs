//! The proxy between a fake XMPP client and a fake XMPP server, both
//! written here (STARTTLS on both legs, SASL PLAIN, bind), all on 127.0.0.1.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use o2tr_proxy::proxy::{self, ProxyConfig};
use o2tr_proxy::xmpp::element::NsScope;
use o2tr_proxy::xmpp::{Element, Frame, Framer, FramerConfig, features, ns, stanza};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};

const DOMAIN: &str = "example.test";

struct Pki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    key_pem: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec![DOMAIN.to_string(), "localhost".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "o2tr-proxy-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("leaf.key"), leaf_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca: ca_cert.der().clone(),
        leaf: leaf.der().clone(),
        key_pem: leaf_key.serialize_pem(),
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_tls(p: &Pki) -> tokio_rustls::TlsAcceptor {
    let key = PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).unwrap();
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![p.leaf.clone(), p.ca.clone()], key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

fn client_tls(p: &Pki) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(p.ca.clone()).unwrap();
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A framed XMPP stream for the fakes.
struct Xs<S> {
    io: S,
    framer: Framer,
    scope: NsScope,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Xs<S> {
    fn new(io: S) -> Self {
        Xs {
            io,
            framer: Framer::new(FramerConfig::default()),
            scope: NsScope::client_stream(),
        }
    }
    async fn send(&mut self, s: &str) {
        self.io.write_all(s.as_bytes()).await.unwrap();
        self.io.flush().await.unwrap();
    }
    /// Next frame; `None` on EOF.
    async fn frame(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 4096];
        loop {
            match self.framer.next() {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("framer: {e}"),
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut buf))
                .await
                .expect("read timed out")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.framer.push(&buf[..n]);
        }
    }
    /// Skips to the next header.
    async fn header(&mut self) {
        loop {
            match self.frame().await.expect("eof before header") {
                Frame::StreamHeader(h) => {
                    self.scope = NsScope::from_header(&h);
                    return;
                }
                Frame::XmlDecl(_) | Frame::Whitespace(_) => {}
                f => panic!("expected header, got {f:?}"),
            }
        }
    }
    /// Next stanza as an element; `Err(true)` for stream end, `Err(false)` for EOF.
    async fn stanza(&mut self) -> Result<Element, bool> {
        loop {
            match self.frame().await {
                None => return Err(false),
                Some(Frame::Stanza(raw)) => return Ok(Element::parse(&raw, &self.scope).unwrap()),
                Some(Frame::StreamEnd(_)) => return Err(true),
                Some(_) => {}
            }
        }
    }
    fn into_inner(self) -> S {
        assert_eq!(self.framer.buffered(), 0);
        self.io
    }
}

fn header_to_server() -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
}

fn header_from_server(id: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream id='{id}' version='1.0' xml:lang='en' xmlns:stream='http://etherx.jabber.org/streams' from='{DOMAIN}' xmlns='jabber:client'>"
    )
}

const SASL_FEATURES: &str = "<stream:features><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='http://www.process-one.net/en/ejabberd/' ver='x'/><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>SCRAM-SHA-1-PLUS</mechanism><mechanism>SCRAM-SHA-256-PLUS</mechanism></mechanisms><register xmlns='http://jabber.org/features/iq-register'/></stream:features>";
const BIND_FEATURES: &str = "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session><sm xmlns='urn:xmpp:sm:2'/><sm xmlns='urn:xmpp:sm:3'/><csi xmlns='urn:xmpp:csi:0'/></stream:features>";

/// The fake server: STARTTLS, PLAIN success, bind, then echoes messages.
async fn fake_server(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    let mut n = 0;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        n += 1;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut xs = Xs::new(tcp);
            xs.header().await;
            xs.send(&header_from_server("s1")).await;
            xs.send("<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>").await;
            let st = xs.stanza().await.unwrap();
            assert!(st.is("starttls", ns::TLS));
            xs.send("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                .await;
            let Ok(tls) = acceptor.accept(xs.into_inner()).await else {
                return;
            };
            let mut xs = Xs::new(tls);
            xs.header().await;
            xs.send(&header_from_server("s2")).await;
            xs.send(SASL_FEATURES).await;
            let auth = xs.stanza().await.unwrap();
            assert!(auth.is("auth", ns::SASL));
            assert_eq!(auth.attr("mechanism"), Some("PLAIN"));
            xs.send("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
                .await;
            xs.framer.reset();
            xs.header().await;
            xs.send(&header_from_server("s3")).await;
            xs.send(BIND_FEATURES).await;
            let bind = xs.stanza().await.unwrap();
            assert!(bind.has_child("bind", ns::BIND));
            let id = bind.attr("id").unwrap().to_owned();
            let jid = format!("user{n}@{DOMAIN}/res");
            xs.send(&format!("<iq id='{id}' type='result'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{jid}</jid></bind></iq>")).await;
            loop {
                match xs.stanza().await {
                    Ok(el) if stanza::is_message(&el) => {
                        let body = stanza::body(&el).unwrap_or_default();
                        let reply = Element::new("message", ns::CLIENT)
                            .with_attr("from", &format!("peer@{DOMAIN}/x"))
                            .with_attr("to", &jid)
                            .with_attr("type", "chat")
                            .with_child(
                                Element::new("body", ns::CLIENT)
                                    .with_text(&format!("echo: {body}")),
                            );
                        xs.send(&reply.to_xml(&xs.scope.clone())).await;
                    }
                    Ok(_) => {}
                    Err(true) => {
                        xs.send("</stream:stream>").await;
                        return;
                    }
                    Err(false) => return,
                }
            }
        });
    }
}

struct Setup {
    pki: Pki,
    proxy_addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn setup(max_stanza_bytes: usize) -> Setup {
    let pki = pki();
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_port = server.local_addr().unwrap().port();
    tokio::spawn(fake_server(server, server_tls(&pki)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let mut cfg = ProxyConfig::new();
    cfg.listen = proxy_addr;
    cfg.upstream = Some(("127.0.0.1".into(), server_port));
    cfg.upstream_ca = Some(pki.dir.join("ca.pem"));
    cfg.tls_cert = Some(pki.dir.join("leaf.pem"));
    cfg.tls_key = Some(pki.dir.join("leaf.key"));
    cfg.max_stanza_bytes = max_stanza_bytes;
    cfg.debug_packets = true;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        proxy::serve(listener, cfg, stopped).await.unwrap();
    });
    Setup {
        pki,
        proxy_addr,
        _stop: stop,
    }
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Logs in through the proxy; returns the stream and the mechanisms and
/// post-auth features seen.
async fn login(s: &Setup) -> (Xs<ClientStream>, Vec<String>, Element) {
    let tcp = TcpStream::connect(s.proxy_addr).await.unwrap();
    let mut xs = Xs::new(tcp);
    xs.send(&header_to_server()).await;
    xs.header().await;
    let f = xs.stanza().await.unwrap();
    assert!(features::offers_starttls(&f));
    xs.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await;
    assert!(xs.stanza().await.unwrap().is("proceed", ns::TLS));
    let tls = client_tls(&s.pki)
        .connect(ServerName::try_from(DOMAIN).unwrap(), xs.into_inner())
        .await
        .unwrap();
    let mut xs = Xs::new(tls);
    xs.send(&header_to_server()).await;
    xs.header().await;
    let f = xs.stanza().await.unwrap();
    let mechs = features::mechanisms(&f);
    xs.send(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AHVzZXIAcGFzcw==</auth>",
    )
    .await;
    assert!(xs.stanza().await.unwrap().is("success", ns::SASL));
    xs.framer.reset();
    xs.send(&header_to_server()).await;
    xs.header().await;
    let post = xs.stanza().await.unwrap();
    xs.send("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>res</resource></bind></iq>").await;
    let r = xs.stanza().await.unwrap();
    assert_eq!(r.attr("type"), Some("result"));
    (xs, mechs, post)
}

async fn chat(xs: &mut Xs<ClientStream>, text: &str) -> String {
    xs.send(&format!(
        "<message to='peer@{DOMAIN}' type='chat' id='m'><body>{text}</body></message>"
    ))
    .await;
    let reply = xs.stanza().await.unwrap();
    stanza::body(&reply).unwrap()
}

#[tokio::test]
async fn relays_messages_both_ways_and_filters_features() {
    let s = setup(1 << 20).await;
    let (mut xs, mechs, post) = login(&s).await;
    assert_eq!(mechs, ["PLAIN", "SCRAM-SHA-1"]);
    assert!(post.has_child("bind", ns::BIND));
    assert!(post.has_child("csi", ns::CSI));
    assert!(!post.has_child("sm", ns::SM3), "SM must be stripped");
    assert!(!post.has_child("sm", ns::SM2), "SM must be stripped");
    assert_eq!(
        chat(&mut xs, "hello &amp; more").await,
        "echo: hello & more"
    );
    assert_eq!(chat(&mut xs, "second").await, "echo: second");
    // SM enable is answered by the proxy, not forwarded.
    xs.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await;
    let failed = xs.stanza().await.unwrap();
    assert!(failed.is("failed", ns::SM3));
    // Clean close goes through.
    xs.send("</stream:stream>").await;
    assert!(xs.stanza().await.unwrap_err(), "expected stream end");
}

#[tokio::test]
async fn oversized_stanza_ends_only_that_connection() {
    let s = setup(8 * 1024).await;
    let (mut a, _, _) = login(&s).await;
    let (mut b, _, _) = login(&s).await;
    assert_eq!(chat(&mut b, "before").await, "echo: before");
    let big = "x".repeat(20 * 1024);
    a.send(&format!(
        "<message to='peer@{DOMAIN}'><body>{big}</body></message>"
    ))
    .await;
    let err = a.stanza().await.unwrap();
    assert!(err.is("error", ns::STREAMS), "{err:?}");
    assert!(err.has_child("policy-violation", ns::STREAM_ERRORS));
    assert!(a.stanza().await.unwrap_err(), "expected stream end");
    assert_eq!(chat(&mut b, "after").await, "echo: after");
}

#[tokio::test]
async fn malformed_xml_ends_only_that_connection() {
    let s = setup(1 << 20).await;
    let (mut a, _, _) = login(&s).await;
    let (mut b, _, _) = login(&s).await;
    a.send("<message><body>x</message>").await;
    let err = a.stanza().await.unwrap();
    assert!(
        err.has_child("not-well-formed", ns::STREAM_ERRORS),
        "{err:?}"
    );
    assert_eq!(chat(&mut b, "still here").await, "echo: still here");
    // A DTD on a third connection.
    let (mut c, _, _) = login(&s).await;
    c.send("<!DOCTYPE x [<!ENTITY a 'b'>]>").await;
    let err = c.stanza().await.unwrap();
    assert!(
        err.has_child("restricted-xml", ns::STREAM_ERRORS),
        "{err:?}"
    );
    assert_eq!(chat(&mut b, "and now").await, "echo: and now");
}

#[tokio::test]
async fn unreachable_upstream_gives_remote_connection_failed() {
    let pki = pki();
    // A port with nothing listening.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = ProxyConfig::new();
    cfg.upstream = Some(("127.0.0.1".into(), dead_port));
    cfg.upstream_ca = Some(pki.dir.join("ca.pem"));
    cfg.tls_cert = Some(pki.dir.join("leaf.pem"));
    cfg.tls_key = Some(pki.dir.join("leaf.key"));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(proxy::serve(listener, cfg, stopped));
    let mut xs = Xs::new(TcpStream::connect(addr).await.unwrap());
    xs.send(&header_to_server()).await;
    xs.header().await;
    let err = xs.stanza().await.unwrap();
    assert!(
        err.has_child("remote-connection-failed", ns::STREAM_ERRORS),
        "{err:?}"
    );
}

#[tokio::test]
async fn wrong_upstream_ca_is_refused() {
    let s = setup(1 << 20).await;
    let other = pki();
    // A proxy that trusts another CA than the fake server's.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = ProxyConfig::new();
    // Reuse the running fake server by asking the first proxy's config? No:
    // start a fresh fake server for clarity.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(fake_server(server, server_tls(&s.pki)));
    cfg.upstream = Some(("127.0.0.1".into(), port));
    cfg.upstream_ca = Some(other.dir.join("ca.pem"));
    cfg.tls_cert = Some(s.pki.dir.join("leaf.pem"));
    cfg.tls_key = Some(s.pki.dir.join("leaf.key"));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(proxy::serve(listener, cfg, stopped));
    let mut xs = Xs::new(TcpStream::connect(addr).await.unwrap());
    xs.send(&header_to_server()).await;
    xs.header().await;
    let err = xs.stanza().await.unwrap();
    assert!(
        err.has_child("remote-connection-failed", ns::STREAM_ERRORS),
        "{err:?}"
    );
}

/// A hook that tags client bodies and records the bound JID.
struct Tagger(Arc<std::sync::Mutex<Vec<String>>>);

impl proxy::StanzaHook for Tagger {
    fn bound(&mut self, jid: &o2tr_proxy::xmpp::Jid) {
        self.0.lock().unwrap().push(format!("bound {jid}"));
    }
    fn from_client(&mut self, mut m: Element, _now: std::time::SystemTime) -> Vec<proxy::Outgoing> {
        let b = stanza::body(&m).unwrap_or_default();
        stanza::set_body(&mut m, &format!("[tagged] {b}"));
        vec![proxy::Outgoing::ToServer(m)]
    }
    fn from_server(&mut self, m: Element, _now: std::time::SystemTime) -> Vec<proxy::Outgoing> {
        let note = Element::new("message", ns::CLIENT)
            .with_child(Element::new("body", ns::CLIENT).with_text("notice"));
        vec![
            proxy::Outgoing::ToClient(note),
            proxy::Outgoing::ToClient(m),
        ]
    }
    fn tick(&mut self, _now: std::time::SystemTime) -> Vec<proxy::Outgoing> {
        Vec::new()
    }
    fn disconnected(&mut self, _now: std::time::SystemTime) {
        self.0.lock().unwrap().push("disconnected".into());
    }
}

struct TaggerFactory(Arc<std::sync::Mutex<Vec<String>>>);

impl proxy::HookFactory for TaggerFactory {
    fn new_hook(&self) -> Box<dyn proxy::StanzaHook> {
        Box::new(Tagger(Arc::clone(&self.0)))
    }
}

#[tokio::test]
async fn hook_sees_messages_after_bind() {
    let pki = pki();
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_port = server.local_addr().unwrap().port();
    tokio::spawn(fake_server(server, server_tls(&pki)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut cfg = ProxyConfig::new();
    cfg.upstream = Some(("127.0.0.1".into(), server_port));
    cfg.upstream_ca = Some(pki.dir.join("ca.pem"));
    cfg.tls_cert = Some(pki.dir.join("leaf.pem"));
    cfg.tls_key = Some(pki.dir.join("leaf.key"));
    cfg.hooks = Arc::new(TaggerFactory(Arc::clone(&events)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(proxy::serve(listener, cfg, stopped));
    let s = Setup {
        pki,
        proxy_addr,
        _stop: tokio::sync::oneshot::channel().0,
    };
    let (mut xs, _, _) = login(&s).await;
    xs.send(&format!(
        "<message to='peer@{DOMAIN}' type='chat'><body>hi</body></message>"
    ))
    .await;
    let first = xs.stanza().await.unwrap();
    assert_eq!(stanza::body(&first).unwrap(), "notice");
    let echo = xs.stanza().await.unwrap();
    assert_eq!(stanza::body(&echo).unwrap(), "echo: [tagged] hi");
    // Shutdown closes the client with system-shutdown and ends serve().
    stop.send(()).unwrap();
    let err = xs.stanza().await.unwrap();
    assert!(
        err.has_child("system-shutdown", ns::STREAM_ERRORS),
        "{err:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), proxy_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ev = events.lock().unwrap().clone();
    assert_eq!(ev, ["bound user1@example.test/res", "disconnected"]);
}
