//! The proxy against a real ejabberd (Debian 23.01) with real slixmpp
//! clients and a raw client written here: STARTTLS on both legs, SASL
//! (SCRAM from slixmpp, PLAIN from the raw client) with the `-PLUS`
//! mechanisms hidden, bind, message exchange with a direct client, the
//! message hook on real traffic, offline storage, carbons, disconnects,
//! a server crash and restart, hostile input, and the `--debug-packets`
//! log with its redaction (DESIGN §3).
//!
//! Needs Debian's `ejabberd` and python3 with `slixmpp` (see
//! tests/common/ejabberd.rs and tests/common/xmpp_client.rs).

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use common::ejabberd::Ejabberd;
use common::xmpp_client::{ClientOptions, XmppClient};
use o2tr_proxy::proxy::{self, HookFactory, Outgoing, ProxyConfig, StanzaHook};
use o2tr_proxy::xmpp::element::NsScope;
use o2tr_proxy::xmpp::{Element, Frame, Framer, FramerConfig, Jid, features, ns, stanza};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};

const T: Duration = Duration::from_secs(15);

/// A token unique to this run and call.
fn token() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{:x}{n}", nanos ^ u128::from(std::process::id()))
}

// ------------------------------------------------------------ log capture

/// Everything the proxy logged in this test process (all tests share one
/// global subscriber; tests search for their own unique tokens).
fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("o2tr_proxy=debug"))
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        if std::env::var_os("O2TR_SHOW_PROXY_LOG").is_some() {
            std::io::stderr().write_all(b)?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

/// Log lines of connection `conn`.
fn conn_lines(log: &str, conn: u64) -> Vec<String> {
    let tag = format!("conn={conn}");
    log.lines()
        .filter(|l| l.split([' ', ':', '{', '}']).any(|w| w == tag))
        .map(str::to_owned)
        .collect()
}

// ------------------------------------------------------------ certificates

/// The proxy's own client-leg PKI: a CA and a leaf for the domain.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(domain: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "o2tr-proxy test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec![
            domain.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("proxy-pki-{}", token()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("leaf.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("leaf.key"), leaf_key.serialize_pem()).unwrap();
        Pki { dir }
    }
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------ hooks

/// Uppercases the bodies of messages from the client.
struct Upper;

impl StanzaHook for Upper {
    fn bound(&mut self, _jid: &Jid) {}
    fn from_client(&mut self, mut m: Element, _now: SystemTime) -> Vec<Outgoing> {
        if let Some(b) = stanza::body(&m) {
            stanza::set_body(&mut m, &b.to_uppercase());
        }
        vec![Outgoing::ToServer(m)]
    }
    fn from_server(&mut self, m: Element, _now: SystemTime) -> Vec<Outgoing> {
        vec![Outgoing::ToClient(m)]
    }
    fn tick(&mut self, _now: SystemTime) -> Vec<Outgoing> {
        Vec::new()
    }
    fn disconnected(&mut self, _now: SystemTime) {}
}

impl HookFactory for Upper {
    fn new_hook(&self) -> Box<dyn StanzaHook> {
        Box::new(Upper)
    }
}

/// Turns client bodies into fake "ciphertext": `?OTR:` + hex of the
/// uppercased body, as the OTR router would send an OTR data message.
struct FakeOtr;

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

impl StanzaHook for FakeOtr {
    fn bound(&mut self, _jid: &Jid) {}
    fn from_client(&mut self, mut m: Element, _now: SystemTime) -> Vec<Outgoing> {
        if let Some(b) = stanza::body(&m) {
            stanza::set_body(&mut m, &format!("?OTR:{}.", hex(&b.to_uppercase())));
        }
        vec![Outgoing::ToServer(m)]
    }
    fn from_server(&mut self, m: Element, _now: SystemTime) -> Vec<Outgoing> {
        vec![Outgoing::ToClient(m)]
    }
    fn tick(&mut self, _now: SystemTime) -> Vec<Outgoing> {
        Vec::new()
    }
    fn disconnected(&mut self, _now: SystemTime) {}
}

impl HookFactory for FakeOtr {
    fn new_hook(&self) -> Box<dyn StanzaHook> {
        Box::new(FakeOtr)
    }
}

// ------------------------------------------------------------ the proxy

/// A proxy running in this process in front of one ejabberd.
struct Proxy {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    pki: Pki,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), proxy::ProxyError>>>,
}

impl Proxy {
    fn start(ej: &Ejabberd, tweak: impl FnOnce(&mut ProxyConfig)) -> Proxy {
        log_buffer();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pki = Pki::new(&ej.domain);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = ProxyConfig::new();
        cfg.listen = addr;
        cfg.upstream = Some(("127.0.0.1".into(), ej.port));
        cfg.upstream_ca = Some(ej.ca_pem.clone());
        cfg.tls_cert = Some(pki.dir.join("leaf.pem"));
        cfg.tls_key = Some(pki.dir.join("leaf.key"));
        cfg.debug_packets = true;
        tweak(&mut cfg);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(proxy::serve(listener, cfg, stopped));
        Proxy {
            rt,
            addr,
            pki,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Options for a slixmpp client logging in through this proxy.
    fn client_opts(&self, ej: &Ejabberd, user: &str, pw: &str) -> ClientOptions {
        let mut o = ClientOptions::direct(ej, user, pw);
        o.host = "127.0.0.1".into();
        o.port = self.addr.port();
        o.ca = Some(self.pki.ca());
        o
    }

    fn client(&self, ej: &Ejabberd, user: &str, pw: &str) -> XmppClient {
        XmppClient::connect(self.client_opts(ej, user, pw))
    }

    /// The proxy task has not ended (no panic, no error).
    fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            self.rt
                .block_on(async { tokio::time::timeout(T, t).await })
                .expect("proxy did not shut down")
                .expect("proxy task panicked")
                .expect("proxy failed");
        }
    }
}

// ------------------------------------------------------------ raw client

fn client_tls(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A framed XMPP stream, hand-driven.
struct Xs<S> {
    io: S,
    framer: Framer,
    scope: NsScope,
}

/// What came instead of a stanza.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// `</stream:stream>`.
    StreamEnd,
    /// TCP/TLS closed.
    Eof,
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
    async fn frame(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 8192];
        loop {
            match self.framer.next() {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("framer: {e}"),
            }
            let n = tokio::time::timeout(T, self.io.read(&mut buf))
                .await
                .expect("read timed out")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.framer.push(&buf[..n]);
        }
    }
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
    async fn stanza(&mut self) -> Result<Element, End> {
        loop {
            match self.frame().await {
                None => return Err(End::Eof),
                Some(Frame::Stanza(raw)) => return Ok(Element::parse(&raw, &self.scope).unwrap()),
                Some(Frame::StreamEnd(_)) => return Err(End::StreamEnd),
                Some(_) => {}
            }
        }
    }
    /// Skips stanzas until one matches.
    async fn until(&mut self, what: &str, pred: impl Fn(&Element) -> bool) -> Element {
        loop {
            match self.stanza().await {
                Ok(el) if pred(&el) => return el,
                Ok(_) => {}
                Err(e) => panic!("{e:?} while waiting for {what}"),
            }
        }
    }
    /// Skips stanzas until the stream ends; returns the stream error, if any.
    async fn stream_error(&mut self) -> Option<Element> {
        let mut err = None;
        loop {
            match self.stanza().await {
                Ok(el) if el.is("error", ns::STREAMS) => err = Some(el),
                Ok(_) => {}
                Err(_) => return err,
            }
        }
    }
    fn into_inner(self) -> S {
        assert_eq!(self.framer.buffered(), 0);
        self.io
    }
}

type RawStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A raw client session through the proxy.
struct Raw {
    xs: Xs<RawStream>,
    /// SASL mechanisms offered to the client.
    mechanisms: Vec<String>,
    /// Features after SASL.
    post_auth: Element,
    jid: String,
}

fn header_to(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
}

/// Logs in through the proxy with SASL PLAIN, binds, sends presence and
/// waits for its echo.
async fn raw_login(
    addr: SocketAddr,
    ca: &std::path::Path,
    domain: &str,
    user: &str,
    pw: &str,
) -> Raw {
    use base64::Engine as _;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut xs = Xs::new(tcp);
    xs.send(&header_to(domain)).await;
    xs.header().await;
    let f = xs.stanza().await.unwrap();
    assert!(features::offers_starttls(&f), "{f:?}");
    xs.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await;
    assert!(xs.stanza().await.unwrap().is("proceed", ns::TLS));
    let tls = client_tls(ca)
        .connect(
            ServerName::try_from(domain.to_owned()).unwrap(),
            xs.into_inner(),
        )
        .await
        .unwrap();
    let mut xs = Xs::new(tls);
    xs.send(&header_to(domain)).await;
    xs.header().await;
    let f = xs.stanza().await.unwrap();
    let mechanisms = features::mechanisms(&f);
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pw}"));
    xs.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"
    ))
    .await;
    let s = xs.stanza().await.unwrap();
    assert!(s.is("success", ns::SASL), "{s:?}");
    xs.framer.reset();
    xs.send(&header_to(domain)).await;
    xs.header().await;
    let post_auth = xs.stanza().await.unwrap();
    xs.send("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>raw</resource></bind></iq>").await;
    let r = xs
        .until("bind result", |e| e.attr("id") == Some("bind1"))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r:?}");
    let jid = r
        .get_child("bind", ns::BIND)
        .and_then(|b| b.get_child("jid", ns::BIND))
        .map(|j| j.text().to_string())
        .unwrap();
    xs.send("<presence/>").await;
    let own = jid.clone();
    xs.until("presence echo", move |e| {
        e.name() == "presence" && e.attr("from") == Some(own.as_str())
    })
    .await;
    Raw {
        xs,
        mechanisms,
        post_auth,
        jid,
    }
}

// ------------------------------------------------------------ tests

fn bodies(msgs: &[common::xmpp_client::Message]) -> Vec<String> {
    msgs.iter()
        .map(|m| m.body.clone().unwrap_or_default())
        .collect()
}

/// slixmpp through the proxy (SCRAM, the best mechanism left once the
/// `-PLUS` ones are hidden) exchanges messages with a direct client, and
/// the hook path rewrites real traffic.
#[test]
fn slixmpp_through_proxy_exchanges_with_direct_client_and_hook_rewrites() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b"), ("carol", "pw-c")]);
    let plain = Proxy::start(&ej, |_| {});
    let upper = Proxy::start(&ej, |c| c.hooks = Arc::new(Upper));
    let tok = token();

    let mut alice = plain.client(&ej, "alice", "pw-a");
    let mut carol = upper.client(&ej, "carol", "pw-c");
    let mut bob = XmppClient::direct(&ej, "bob", "pw-b");
    assert!(
        alice.full_jid().starts_with("alice@example.test/"),
        "{}",
        alice.full_jid()
    );
    assert!(carol.full_jid().starts_with("carol@example.test/"));

    let n = 10;
    for i in 0..n {
        alice.send(&ej.jid("bob"), &format!("a2b {tok} #{i} <&>"));
        bob.send(alice.full_jid(), &format!("b2a {tok} #{i}"));
    }
    let at_bob = bob.recv_until(n, T);
    let at_alice = alice.recv_until(n, T);
    let want_b: Vec<String> = (0..n).map(|i| format!("a2b {tok} #{i} <&>")).collect();
    let want_a: Vec<String> = (0..n).map(|i| format!("b2a {tok} #{i}")).collect();
    assert_eq!(bodies(&at_bob), want_b);
    assert_eq!(bodies(&at_alice), want_a);
    assert!(at_bob.iter().all(|m| m.from == alice.full_jid()));
    assert!(
        at_alice
            .iter()
            .all(|m| m.from == bob.full_jid() && m.mtype == "chat")
    );

    // The hook: carol's outgoing bodies are uppercased, incoming untouched.
    carol.send(&ej.jid("bob"), &format!("shout {tok}"));
    bob.send(carol.full_jid(), &format!("quiet {tok}"));
    let got = bob.recv_until(n + 1, T);
    assert_eq!(bodies(&got), [format!("SHOUT {}", tok.to_uppercase())]);
    let got = carol.recv_until(1, T);
    assert_eq!(bodies(&got), [format!("quiet {tok}")]);

    // slixmpp chose SCRAM (PLAIN is only its fallback) and never saw a
    // -PLUS mechanism.
    let log = log_text();
    assert!(
        log.contains("mechanism='SCRAM-SHA-") || log.contains("mechanism=\"SCRAM-SHA-"),
        "no SCRAM auth in the proxy log"
    );
    for line in log.lines().filter(|l| l.contains("P→C")) {
        assert!(!line.contains("-PLUS"), "-PLUS offered to a client: {line}");
        assert!(
            !line.contains("urn:xmpp:sm:"),
            "SM reached a client: {line}"
        );
    }

    alice.quit();
    carol.quit();
    bob.quit();
    assert!(plain.is_running() && upper.is_running());
    plain.shutdown();
    upper.shutdown();
}

/// The raw client: PLAIN through the proxy, no `-PLUS` and no SM offered,
/// bind result and chat with a direct client.
#[test]
fn plain_login_features_filtered_and_chat() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let p = Proxy::start(&ej, |_| {});
    let mut bob = XmppClient::direct(&ej, "bob", "pw-b");
    let tok = token();
    let domain = ej.domain.clone();
    let bob_jid = bob.full_jid().to_string();
    let mut raw =
        p.rt.block_on(raw_login(p.addr, &p.pki.ca(), &domain, "alice", "pw-a"));
    let (mechs, post, jid) = (
        raw.mechanisms.clone(),
        raw.post_auth.clone(),
        raw.jid.clone(),
    );
    assert!(!mechs.is_empty());
    assert!(mechs.iter().all(|m| !m.ends_with("-PLUS")), "{mechs:?}");
    assert!(mechs.iter().any(|m| m == "PLAIN"), "{mechs:?}");
    assert!(
        mechs.iter().any(|m| m.starts_with("SCRAM-SHA-")),
        "{mechs:?}"
    );
    assert!(post.has_child("bind", ns::BIND), "{post:?}");
    assert!(
        !post.has_child("sm", ns::SM2) && !post.has_child("sm", ns::SM3),
        "{post:?}"
    );
    assert!(jid.starts_with("alice@example.test/raw"), "{jid}");

    // Whitespace keepalives (RFC 6120 §4.6.1) pass, before and between stanzas.
    p.rt.block_on(raw.xs.send(&format!(
        " \n\t<message to='{bob_jid}' type='chat' id='m1'><body>raw {tok} &amp; more</body></message>\n"
    )));
    let got = bob.recv_until(1, T);
    assert_eq!(bodies(&got), [format!("raw {tok} & more")]);
    assert_eq!(got[0].from, jid);
    bob.send(&jid, &format!("back {tok}"));
    let reply = p.rt.block_on(raw.xs.until("reply", |e| {
        e.name() == "message" && stanza::body(e).is_some()
    }));
    assert_eq!(stanza::body(&reply).unwrap(), format!("back {tok}"));
    // A clean close: a stanza the server sends meanwhile still arrives, then
    // the server's close comes through the proxy.
    bob.send(&jid, &format!("late {tok}"));
    std::thread::sleep(Duration::from_millis(300));
    let mut late = false;
    p.rt.block_on(async {
        raw.xs.send("</stream:stream>").await;
        loop {
            match raw.xs.stanza().await {
                Ok(el) => late |= stanza::body(&el) == Some(format!("late {tok}")),
                Err(e) => {
                    assert_eq!(e, End::StreamEnd);
                    break;
                }
            }
        }
    });
    assert!(late, "the stanza sent before the close was lost");
    bob.quit();
    p.shutdown();
}

/// Poll `cond` until true or `T` passes.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Offline storage through the proxy: a client that closed its stream gets
/// the stored messages on its next login, in order, with delay stamps.
#[test]
fn offline_storage_through_proxy() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let p = Proxy::start(&ej, |_| {});
    let tok = token();
    let mut bob = p.client(&ej, "bob", "pw-b");
    let mut alice = XmppClient::direct(&ej, "alice", "pw-a");
    bob.close();
    assert!(!bob.is_connected());
    let sent: Vec<String> = (0..5).map(|i| format!("offline {tok} #{i}")).collect();
    for body in &sent {
        alice.send_with(&ej.jid("bob"), body, &["receipt", "chatstate"]);
    }
    eventually("5 offline messages", || ej.offline_count("bob") == 5);
    let jid = bob.reconnect();
    assert!(jid.starts_with("bob@example.test/"), "{jid}");
    let got = bob.recv_until(5, T);
    assert_eq!(bodies(&got), sent);
    for m in &got {
        assert!(m.from.starts_with("alice@example.test/"), "{}", m.from);
        assert!(
            m.stamp.as_deref().is_some_and(|s| s.ends_with('Z')),
            "no delay stamp: {m:?}"
        );
    }
    assert_eq!(ej.offline_count("bob"), 0);
    alice.quit();
    bob.quit();
    p.shutdown();
}

/// Carbons (XEP-0280) enabled by a client behind the proxy: it gets the
/// `<sent>` copy of what its other resource sends and the `<received>`
/// copy of what reaches that resource.
#[test]
fn carbons_through_proxy() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let p = Proxy::start(&ej, |_| {});
    let tok = token();
    let mut opts = p.client_opts(&ej, "alice", "pw-a");
    opts.carbons = true;
    opts.raw = true;
    let mut alice1 = XmppClient::connect(opts);
    let mut direct = ClientOptions::direct(&ej, "alice", "pw-a");
    direct.carbons = true;
    let mut alice2 = XmppClient::connect(direct);
    let mut bob = XmppClient::direct(&ej, "bob", "pw-b");

    alice2.send(&ej.jid("bob"), &format!("from a2 {tok}"));
    bob.send(alice2.full_jid(), &format!("to a2 {tok}"));
    bob.recv_until(1, T);
    alice2.recv_until(1, T);
    let mut seen = Vec::new();
    eventually("two carbons at alice1", || {
        seen.extend(alice1.recv());
        seen.len() >= 2
    });
    let xml: Vec<String> = seen.iter().map(|m| m.xml.clone().unwrap()).collect();
    let sent = xml
        .iter()
        .find(|x| x.contains("<sent xmlns=\"urn:xmpp:carbons:2\""))
        .unwrap_or_else(|| panic!("no sent carbon: {xml:#?}"));
    assert!(sent.contains(&format!("from a2 {tok}")), "{sent}");
    let recvd = xml
        .iter()
        .find(|x| x.contains("<received xmlns=\"urn:xmpp:carbons:2\""))
        .unwrap_or_else(|| panic!("no received carbon: {xml:#?}"));
    assert!(recvd.contains(&format!("to a2 {tok}")), "{recvd}");
    alice1.quit();
    alice2.quit();
    bob.quit();
    p.shutdown();
}

/// Connected resources of `user` according to ejabberd.
fn sessions(ej: &Ejabberd, user: &str) -> usize {
    ej.ctl(&["user_resources", user, &ej.domain])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// A client that closes its stream, or is killed, ends its upstream
/// session at once (the proxy closes the server leg), and messages sent
/// afterwards go to offline storage instead of a dead session.
#[test]
fn client_disconnect_closes_upstream() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let p = Proxy::start(&ej, |_| {});
    let mut alice = XmppClient::direct(&ej, "alice", "pw-a");
    let tok = token();

    let mut bob = p.client(&ej, "bob", "pw-b");
    assert_eq!(sessions(&ej, "bob"), 1);
    bob.close();
    eventually("bob's session to end after close", || {
        sessions(&ej, "bob") == 0
    });

    bob.reconnect();
    assert_eq!(sessions(&ej, "bob"), 1);
    bob.kill();
    eventually("bob's session to end after kill", || {
        sessions(&ej, "bob") == 0
    });
    alice.send(&ej.jid("bob"), &format!("after {tok}"));
    eventually("offline storage", || ej.offline_count("bob") == 1);

    // The proxy logged a clean end for both connections.
    let log = log_text();
    assert!(
        log.contains("client closed the stream"),
        "no clean close logged"
    );
    assert!(p.is_running());
    alice.quit();
    p.shutdown();
}

/// Log in, retrying with a new client process a few times (the server was
/// just restarted).
fn login_retrying(login: impl Fn() -> XmppClient) -> XmppClient {
    for _ in 0..9 {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&login)) {
            Ok(c) => return c,
            Err(_) => {
                eprintln!("[proxy_ejabberd] login after restart failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    login()
}

/// ejabberd dies: the client behind the proxy gets a stream error and the
/// stream end; the proxy keeps running, and after ejabberd is back new
/// clients log in through the same proxy.
#[test]
fn server_crash_then_restart() {
    let mut ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let p = Proxy::start(&ej, |_| {});
    let domain = ej.domain.clone();
    let mut raw =
        p.rt.block_on(raw_login(p.addr, &p.pki.ca(), &domain, "alice", "pw-a"));
    let mut bob = p.client(&ej, "bob", "pw-b");
    ej.kill();
    let err = p.rt.block_on(raw.xs.stream_error());
    let err = err.expect("no stream error after the server died");
    assert!(
        err.has_child("remote-connection-failed", ns::STREAM_ERRORS),
        "{err:?}"
    );
    eventually("slixmpp to notice", || !bob.is_connected());
    // While the server is down, a new client gets a stream error too.
    let refused = p.rt.block_on(async {
        let mut xs = Xs::new(TcpStream::connect(p.addr).await.unwrap());
        xs.send(&header_to(&domain)).await;
        xs.header().await;
        xs.stream_error().await
    });
    assert!(
        refused.is_some_and(|e| e.has_child("remote-connection-failed", ns::STREAM_ERRORS)),
        "no remote-connection-failed while the server is down"
    );
    assert!(p.is_running());

    ej.start_again();
    // Accounts registered seconds before the SIGKILL may not have reached
    // Mnesia's disk log; make sure they exist again.
    let users = ej.ctl(&["registered_users", &ej.domain]);
    for (u, pw) in [("alice", "pw-a"), ("bob", "pw-b")] {
        if !users.lines().any(|l| l.trim() == u) {
            eprintln!("[proxy_ejabberd] {u} lost by the SIGKILL; registering again");
            ej.register(u, pw);
        }
    }
    let tok = token();
    // Fresh client processes, retried: after a SIGKILL ejabberd answers
    // streams before it accepts logins again (seen: SASL failures for a few
    // seconds), and slixmpp never retries a mechanism that failed once.
    drop(bob);
    let mut bob = login_retrying(|| p.client(&ej, "bob", "pw-b"));
    let mut alice = login_retrying(|| p.client(&ej, "alice", "pw-a"));
    alice.send(bob.full_jid(), &format!("back {tok}"));
    assert_eq!(bodies(&bob.recv_until(1, T)), [format!("back {tok}")]);
    alice.quit();
    bob.quit();
    p.shutdown();
}

/// Hostile input from one client ends that client's connection with the
/// right stream error; a slixmpp client on the same proxy keeps working.
#[test]
fn bad_client_input_ends_only_that_connection() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b"), ("eve", "pw-e")]);
    let p = Proxy::start(&ej, |c| c.max_stanza_bytes = 16 * 1024);
    let domain = ej.domain.clone();
    let mut alice = p.client(&ej, "alice", "pw-a");
    let mut bob = XmppClient::direct(&ej, "bob", "pw-b");
    let tok = token();
    let bob_jid = bob.full_jid().to_string();
    let cases = [
        (
            format!(
                "<message to='{bob_jid}'><body>{}</body></message>",
                "x".repeat(40 * 1024)
            ),
            "policy-violation",
        ),
        (
            format!("<message to='{bob_jid}'><body>x</message>"),
            "not-well-formed",
        ),
        (
            "<!DOCTYPE x [<!ENTITY a 'b'>]>".to_string(),
            "restricted-xml",
        ),
        (
            format!("<message to='{bob_jid}'><body>&a;</body></message>"),
            "restricted-xml",
        ),
        ("<?evil pi?>".to_string(), "restricted-xml"),
    ];
    for (i, (input, condition)) in cases.iter().enumerate() {
        let err = p.rt.block_on(async {
            let mut raw = raw_login(p.addr, &p.pki.ca(), &domain, "eve", "pw-e").await;
            raw.xs.send(input).await;
            raw.xs.stream_error().await
        });
        let err = err.unwrap_or_else(|| panic!("case {i}: no stream error"));
        assert!(
            err.has_child(condition, ns::STREAM_ERRORS),
            "case {i}: {err:?}"
        );
        alice.send(&bob_jid, &format!("still here {tok} #{i}"));
        let got = bob.recv_until(i + 1, T);
        assert_eq!(bodies(&got), [format!("still here {tok} #{i}")]);
    }
    // eve's sessions are all gone; nothing of the bad input reached bob.
    eventually("eve's sessions to end", || sessions(&ej, "eve") == 0);
    assert_eq!(bob.count(), cases.len());
    assert!(p.is_running());
    alice.quit();
    bob.quit();
    p.shutdown();
}

/// `--debug-packets`: every stanza on both legs is logged with the
/// connection id and an arrow, before (C→P) and after (P→S) the hook;
/// plaintext bodies and SASL payloads are redacted unless `log_plaintext`,
/// while the hook's OTR ciphertext is shown.
#[test]
fn debug_packets_log_redacts_plaintext_but_shows_ciphertext() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b"), ("carol", "pw-c")]);
    let redacting = Proxy::start(&ej, |c| c.hooks = Arc::new(FakeOtr));
    let verbose = Proxy::start(&ej, |c| {
        c.hooks = Arc::new(FakeOtr);
        c.log_plaintext = true;
    });
    let mut bob = XmppClient::direct(&ej, "bob", "pw-b");
    let bob_jid = bob.full_jid().to_string();
    let domain = ej.domain.clone();

    let secret = format!("secret-{}", token());
    let cipher = format!("?OTR:{}.", hex(&secret.to_uppercase()));
    let reply = format!("reply-{}", token());
    let mut alice = redacting.rt.block_on(raw_login(
        redacting.addr,
        &redacting.pki.ca(),
        &domain,
        "alice",
        "pw-a",
    ));
    redacting.rt.block_on(alice.xs.send(&format!(
        "<message to='{bob_jid}' type='chat'><body>{secret}</body></message>"
    )));
    assert_eq!(bodies(&bob.recv_until(1, T)), [cipher.as_str()]);
    bob.send(&alice.jid, &reply);
    redacting.rt.block_on(alice.xs.until("reply", |e| {
        stanza::body(e).as_deref() == Some(reply.as_str())
    }));

    let verbose_secret = format!("verbose-{}", token());
    let verbose_cipher = format!("?OTR:{}.", hex(&verbose_secret.to_uppercase()));
    let mut carol = verbose.rt.block_on(raw_login(
        verbose.addr,
        &verbose.pki.ca(),
        &domain,
        "carol",
        "pw-c",
    ));
    verbose.rt.block_on(carol.xs.send(&format!(
        "<message to='{bob_jid}' type='chat'><body>{verbose_secret}</body></message>"
    )));
    assert_eq!(bodies(&bob.recv_until(2, T)), [verbose_cipher.as_str()]);

    let log = log_text();
    let with = |needle: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(needle)).collect() };
    // Redacting proxy: the plaintext never appears, the ciphertext does on
    // the server leg, the reply from the server is redacted, SASL too.
    assert!(
        with(&secret).is_empty(),
        "plaintext logged: {:?}",
        with(&secret)
    );
    let c = with(&cipher);
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(c[0].contains("P→S") && c[0].contains("conn="), "{}", c[0]);
    assert!(
        with(&reply).is_empty(),
        "incoming plaintext logged: {:?}",
        with(&reply)
    );
    use base64::Engine as _;
    let plain_auth = base64::engine::general_purpose::STANDARD.encode("\0alice\0pw-a");
    assert!(with(&plain_auth).is_empty(), "SASL payload logged");
    // The client's message before the hook is there, redacted.
    let conn = c[0]
        .split("conn=")
        .nth(1)
        .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap();
    let lines = conn_lines(&log, conn);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("C→P") && l.contains("<message") && l.contains("[redacted")),
        "no redacted C→P message for conn {conn}: {lines:#?}"
    );
    assert!(lines.iter().any(|l| l.contains("S→P")), "no S→P lines");
    assert!(lines.iter().any(|l| l.contains("P→C")), "no P→C lines");
    // Verbose proxy: plaintext before the hook, ciphertext after.
    let v = with(&verbose_secret);
    assert!(v.iter().any(|l| l.contains("C→P")), "{v:?}");
    assert!(with(&verbose_cipher).iter().any(|l| l.contains("P→S")));

    bob.quit();
    redacting.shutdown();
    verbose.shutdown();
}

/// A TCP relay between the proxy and ejabberd that can freeze (stop
/// reading either side: what the server writes sits unread, as in a link
/// cut without a FIN) and then drop the frozen connections (the server
/// gets a reset, the proxy an EOF).
struct Blackhole {
    port: u16,
    state: tokio::sync::watch::Sender<u8>,
    _rt: tokio::runtime::Runtime,
}

impl Blackhole {
    fn start(upstream: SocketAddr) -> Blackhole {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, _) = tokio::sync::watch::channel(0u8);
        let tx = state.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let mut st = tx.subscribe();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let (mut b1, mut b2) = (vec![0u8; 16384], vec![0u8; 16384]);
                    loop {
                        tokio::select! {
                            r = cr.read(&mut b1) => match r {
                                Ok(n) if n > 0 => if sw.write_all(&b1[..n]).await.is_err() { break },
                                _ => break,
                            },
                            r = sr.read(&mut b2) => match r {
                                Ok(n) if n > 0 => if cw.write_all(&b2[..n]).await.is_err() { break },
                                _ => break,
                            },
                            c = st.changed() => {
                                if c.is_err() { break }
                                if *st.borrow() == 1 {
                                    // Frozen until told otherwise, then dropped.
                                    let _ = st.changed().await;
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Blackhole {
            port,
            state,
            _rt: rt,
        }
    }
    fn freeze(&self) {
        self.state.send_replace(1);
    }
    fn drop_frozen(&self) {
        self.state.send_replace(0);
    }
}

/// XEP-0198 terminated on the upstream leg: messages ejabberd wrote into
/// a connection that died without a FIN were never acknowledged by the
/// proxy, so ejabberd sends them to offline storage after the resumption
/// window, and they reach the client on its next login. The control
/// (SM stripped, the old behaviour) loses them.
#[test]
fn upstream_sm_recovers_stanzas_written_into_a_dead_link() {
    let ej = Ejabberd::start_with(common::ejabberd::EjabberdOptions {
        sm_resume_timeout: 2,
        ..Default::default()
    });
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b"), ("carol", "pw-c")]);
    let mut bob = XmppClient::direct(&ej, "bob", "pw-b");
    let tok = token();
    let mut run = |user: &str, pw: &str, sm: bool| -> (usize, Option<XmppClient>) {
        let hole = Blackhole::start(ej.addr());
        let p = Proxy::start(&ej, |c| {
            c.upstream_sm = sm;
            c.upstream = Some(("127.0.0.1".into(), hole.port));
        });
        let mut client = p.client(&ej, user, pw);
        // Traffic before the cut is delivered and acknowledged.
        bob.send(client.full_jid(), &format!("before {tok}"));
        assert_eq!(bodies(&client.recv_until(1, T)), [format!("before {tok}")]);
        std::thread::sleep(Duration::from_millis(500));
        hole.freeze();
        let sent: Vec<String> = (0..3)
            .map(|i| format!("into the void {sm} {tok} #{i}"))
            .collect();
        for b in &sent {
            bob.send_with(&ej.jid(user), b, &["nopermstore"]);
        }
        std::thread::sleep(Duration::from_millis(500));
        hole.drop_frozen();
        eventually("the client to lose its connection", || {
            !client.is_connected()
        });
        // The resumption window (2 s) passes; ejabberd decides.
        std::thread::sleep(Duration::from_secs(4));
        let stored = ej.offline_count(user);
        if stored == 0 {
            client.quit();
            p.shutdown();
            return (0, None);
        }
        client.reconnect();
        let got = client.recv_until(1 + stored, T);
        assert_eq!(bodies(&got), sent, "recovered messages");
        assert!(got.iter().all(|m| m.stamp.is_some()), "{got:?}");
        p.shutdown();
        (stored, Some(client))
    };
    let (with_sm, client) = run("alice", "pw-a", true);
    assert_eq!(
        with_sm, 3,
        "with upstream SM the cut messages are stored offline"
    );
    client.unwrap().quit();
    let (without, _) = run("carol", "pw-c", false);
    assert_eq!(without, 0, "control: without SM they are lost");
    let log = log_text();
    assert!(log.contains("upstream stream management enabled"));
    for line in log.lines().filter(|l| l.contains("P→C")) {
        assert!(
            !line.contains("urn:xmpp:sm:"),
            "SM reached a client: {line}"
        );
    }
    bob.quit();
}

/// Dead-link detection: the relay between the proxy and ejabberd stops
/// forwarding (no FIN, no RST). The proxy pings the silent upstream (an SM
/// `<r/>` with upstream SM, else an XEP-0199 ping), gets no answer and
/// ends the client's stream with `remote-connection-failed` within seconds
/// instead of waiting for TCP to give up. While the link is alive its pings
/// are answered and the answers never reach the client.
#[test]
fn dead_upstream_link_is_detected_by_ping() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    for (user, pw, sm) in [("alice", "pw-a", true), ("bob", "pw-b", false)] {
        let hole = Blackhole::start(ej.addr());
        let p = Proxy::start(&ej, |c| {
            c.upstream = Some(("127.0.0.1".into(), hole.port));
            c.upstream_sm = sm;
            c.upstream_ping_interval = Duration::from_secs(1);
            c.upstream_ping_timeout = Duration::from_secs(2);
        });
        let domain = ej.domain.clone();
        let mut raw =
            p.rt.block_on(raw_login(p.addr, &p.pki.ca(), &domain, user, pw));
        // Idle long enough for a ping to be sent and answered.
        let (ping, answer) = if sm {
            ("<r xmlns='urn:xmpp:sm:3'/>", "S→P <a ")
        } else {
            ("urn:xmpp:ping", "o2tr-ping-1")
        };
        eventually("a ping answered while the link is alive", || {
            let log = log_text();
            let mut sent = false;
            for l in log.lines() {
                if l.contains("P→S") && l.contains(ping) {
                    sent = true;
                }
                if sent && l.contains("S→P") && l.contains(answer) {
                    return true;
                }
            }
            false
        });
        hole.freeze();
        let started = std::time::Instant::now();
        let err = p.rt.block_on(raw.xs.stream_error());
        let err = err.expect("no stream error after the link died");
        assert!(
            err.has_child("remote-connection-failed", ns::STREAM_ERRORS),
            "{err:?}"
        );
        eprintln!(
            "[proxy_ejabberd] sm={sm}: dead link detected {:.1} s after the freeze",
            started.elapsed().as_secs_f64()
        );
        assert!(p.is_running());
        hole.drop_frozen();
        p.shutdown();
    }
    let log = log_text();
    assert!(log.contains("upstream link dead"), "reason logged");
    for line in log.lines().filter(|l| l.contains("P→C")) {
        assert!(
            !line.contains("o2tr-ping") && !line.contains("urn:xmpp:sm:"),
            "a ping or its answer reached a client: {line}"
        );
    }
}
