//! A tampering "server": a loopback XMPP relay that sits between an
//! o2tr-proxy's upstream leg and a real ejabberd and changes, drops,
//! reorders, replays and injects `<message>` stanzas carrying OTR, on a
//! script the test arms (issue 9).
//!
//! The relay forwards the pre-TLS exchange byte for byte until ejabberd
//! answers `<proceed/>`; then it terminates TLS on both sides: as a server
//! to the proxy with its own CA (made by `o2tr_proxy::certs`; the proxy
//! trusts it through `ProxyConfig::upstream_ca`) and as a client to
//! ejabberd (trusting the test server's CA). After TLS both directions are
//! cut into frames by the library's [`Framer`]; both framers restart at
//! SASL `<success/>` like the proxy's do. Frames that are not OTR message
//! stanzas pass through unchanged.
//!
//! XEP-0198 is not rewritten: the test proxies do not enable upstream
//! stream management (`ProxyConfig::upstream_sm` is off), so dropping or
//! injecting a stanza cannot upset stanza counters.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use o2tr_proxy::otr::message::{Body, EncodedMessage};
use o2tr_proxy::xmpp::element::NsScope;
use o2tr_proxy::xmpp::{Element, Frame, Framer, FramerConfig, ns, stanza};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::ejabberd::Ejabberd;

/// Which way a stanza travels through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Proxy → ejabberd (what the relayed account sends).
    ToServer,
    /// ejabberd → proxy (what the relayed account receives).
    ToClient,
}

/// One scripted change, applied to the next OTR data message
/// (`?OTR:AAMD` / `?OTR:AAID`) travelling in the armed direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Flip one bit of the AES-CTR ciphertext.
    FlipCiphertext,
    /// Flip one bit of the data message's MAC.
    FlipMac,
    /// Do not forward it.
    Drop,
    /// Hold it back and forward it right after the next data message in
    /// the same direction (swaps two messages).
    Reorder,
    /// Remove the storage/carbons/EME hints (`no-copy`,
    /// `no-permanent-store`, the carbons `<private/>`, `<encryption/>`).
    StripHints,
    /// Add `<no-store/>` (and `<no-storage/>`).
    AddNoStore,
}

/// The OTR kind of a message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtrKind {
    /// Query message (`?OTRv…?`).
    Query,
    /// D-H Commit.
    DhCommit,
    /// D-H Key.
    DhKey,
    /// Reveal Signature.
    RevealSig,
    /// Signature.
    Signature,
    /// Data message.
    Data,
    /// `?OTR Error:`.
    Error,
    /// A fragment (`?OTR|` / `?OTR,`).
    Fragment,
    /// Anything else with a body.
    Other,
}

impl OtrKind {
    /// Classify a body the way a peer would.
    pub fn of(body: &str) -> OtrKind {
        let Some(at) = body.find("?OTR") else {
            return OtrKind::Other;
        };
        let tail = &body[at..];
        if tail.starts_with("?OTR Error:") {
            return OtrKind::Error;
        }
        if tail.starts_with("?OTR|") || tail.starts_with("?OTR,") {
            return OtrKind::Fragment;
        }
        if tail.starts_with("?OTRv") || tail.starts_with("?OTR?") {
            return OtrKind::Query;
        }
        if !tail.starts_with("?OTR:") {
            return OtrKind::Other;
        }
        match EncodedMessage::from_armored(tail).map(|m| m.body) {
            Ok(Body::DhCommit(_)) => OtrKind::DhCommit,
            Ok(Body::DhKey(_)) => OtrKind::DhKey,
            Ok(Body::RevealSignature(_)) => OtrKind::RevealSig,
            Ok(Body::Signature(_)) => OtrKind::Signature,
            Ok(Body::Data(_)) => OtrKind::Data,
            Err(_) => OtrKind::Other,
        }
    }
}

/// A message stanza carrying a body that passed the relay (as received,
/// before any change).
#[derive(Clone, Debug)]
pub struct Seen {
    /// Direction.
    pub dir: Dir,
    /// OTR kind of the body.
    pub kind: OtrKind,
    /// The stanza exactly as it arrived at the relay.
    pub raw: Vec<u8>,
    /// The rule applied to it, if any.
    pub tampered: Option<Rule>,
    /// Which relayed connection (1, 2, … in accept order) it crossed.
    pub connection: usize,
}

impl Seen {
    /// The stanza parsed.
    pub fn element(&self) -> Element {
        Element::parse(&self.raw, &NsScope::client_stream()).expect("seen stanzas parse")
    }

    /// Its body.
    pub fn body(&self) -> String {
        stanza::body(&self.element()).unwrap_or_default()
    }
}

#[derive(Default)]
struct State {
    armed: VecDeque<(Dir, Rule)>,
    seen: Vec<Seen>,
    /// Injection channel of the newest relayed connection once its TLS is up.
    inject: Option<mpsc::UnboundedSender<(Dir, Vec<u8>)>>,
    connections: usize,
    errors: Vec<String>,
}

/// The running relay. Dropping it stops it.
pub struct TamperRelay {
    /// Port the proxy connects to (127.0.0.1).
    pub port: u16,
    /// The relay's CA: give it to the proxy as its upstream CA.
    pub ca_pem: PathBuf,
    state: Arc<Mutex<State>>,
    rt: Option<tokio::runtime::Runtime>,
}

struct Tls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    domain: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TamperRelay {
    /// Start a relay in front of `ej`, with its certificates under `dir`.
    pub fn start(ej: &Ejabberd, dir: &std::path::Path) -> Self {
        let generated =
            o2tr_proxy::certs::generate(&ej.domain, time::OffsetDateTime::now_utc()).unwrap();
        let written = o2tr_proxy::certs::write(dir, &generated, true).unwrap();
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(generated.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(generated.key_pem.as_bytes()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ej.ca_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = Arc::new(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            domain: ej.domain.clone(),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let upstream = ej.addr();
        let st = Arc::clone(&state);
        rt.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let st = Arc::clone(&st);
                let tls = Arc::clone(&tls);
                tokio::spawn(async move {
                    let n = {
                        let mut s = st.lock().unwrap();
                        s.connections += 1;
                        s.connections
                    };
                    if let Err(e) = relay(sock, upstream, &tls, &st, n).await {
                        st.lock()
                            .unwrap()
                            .errors
                            .push(format!("connection {n}: {e}"));
                    }
                });
            }
        });
        TamperRelay {
            port,
            ca_pem: written.ca,
            state,
            rt: Some(rt),
        }
    }

    /// Apply `rule` to the next data message going `dir` (rules armed for
    /// one direction apply in the order armed).
    pub fn arm(&self, dir: Dir, rule: Rule) {
        self.state.lock().unwrap().armed.push_back((dir, rule));
    }

    /// Rules armed but not applied yet.
    pub fn armed(&self) -> usize {
        self.state.lock().unwrap().armed.len()
    }

    /// Every message stanza with a body seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The message stanzas of `kind` seen going `dir`.
    pub fn seen_kind(&self, dir: Dir, kind: OtrKind) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.dir == dir && s.kind == kind)
            .collect()
    }

    /// Relayed connections so far.
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Connection-level failures (TLS, framing) so far.
    pub fn errors(&self) -> Vec<String> {
        self.state.lock().unwrap().errors.clone()
    }

    /// Write `xml` into the newest relayed stream going `dir`, between two
    /// frames. Waits (up to 10 s) until a connection is up.
    pub fn inject(&self, dir: Dir, xml: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(tx) = self.state.lock().unwrap().inject.clone() {
                if tx.send((dir, xml.to_vec())).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no relayed connection to inject into"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until every armed rule has been applied; `false` on timeout.
    pub fn wait_applied(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.armed() > 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

impl Drop for TamperRelay {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// One proxy connection: plaintext until `<proceed/>`, then TLS on both
/// sides and the framed, tampering relay.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    tls: &Tls,
    st: &Arc<Mutex<State>>,
    conn: usize,
) -> Result<(), BoxErr> {
    let mut server = TcpStream::connect(upstream).await?;
    // Pre-TLS: the exchange is strictly request/answer, so raw forwarding
    // until the server's `<proceed/>` leaves nothing buffered on either side.
    let mut from_server = Vec::new();
    let mut cbuf = [0u8; 4096];
    let mut sbuf = [0u8; 4096];
    loop {
        tokio::select! {
            n = client.read(&mut cbuf) => {
                let n = n?;
                if n == 0 { return Ok(()); }
                server.write_all(&cbuf[..n]).await?;
            }
            n = server.read(&mut sbuf) => {
                let n = n?;
                if n == 0 { return Ok(()); }
                client.write_all(&sbuf[..n]).await?;
                from_server.extend_from_slice(&sbuf[..n]);
                if String::from_utf8_lossy(&from_server).contains("<proceed") {
                    break;
                }
            }
        }
    }
    let client = tls.acceptor.accept(client).await?;
    let name = ServerName::try_from(tls.domain.clone())?;
    let server = tls.connector.connect(name, server).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    st.lock().unwrap().inject = Some(tx);
    framed(client, server, rx, st, conn).await
}

struct Side<R> {
    rd: R,
    framer: Framer,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Side<R> {
    fn new(rd: R) -> Self {
        Side {
            rd,
            framer: Framer::new(FramerConfig::default()),
            buf: vec![0u8; 16 * 1024],
        }
    }

    /// Read once; `false` at EOF. A TLS peer that vanished without
    /// close_notify (a proxy that crashed, as tests make it) is an EOF too.
    async fn fill(&mut self) -> Result<bool, BoxErr> {
        let n = match self.rd.read(&mut self.buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.into()),
        };
        self.framer.push(&self.buf[..n]);
        Ok(n > 0)
    }
}

async fn framed<C, S>(
    client: C,
    server: S,
    mut inject: mpsc::UnboundedReceiver<(Dir, Vec<u8>)>,
    st: &Arc<Mutex<State>>,
    conn: usize,
) -> Result<(), BoxErr>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (crd, mut cwr) = tokio::io::split(client);
    let (srd, mut swr) = tokio::io::split(server);
    let mut c = Side::new(crd);
    let mut s = Side::new(srd);
    let mut held: Option<(Dir, Vec<u8>)> = None;
    loop {
        // Handle every complete frame before reading more.
        loop {
            let mut progressed = false;
            while let Some(f) = c.framer.next()? {
                progressed = true;
                let out = on_frame(Dir::ToServer, f, st, conn, &mut held);
                for b in out.bytes {
                    swr.write_all(&b).await?;
                }
            }
            while let Some(f) = s.framer.next()? {
                progressed = true;
                let out = on_frame(Dir::ToClient, f, st, conn, &mut held);
                for b in out.bytes {
                    cwr.write_all(&b).await?;
                }
                if out.restart {
                    // SASL success: both streams restart (RFC 6120 §6.4.6).
                    c.framer.reset();
                    s.framer.reset();
                }
            }
            if !progressed {
                break;
            }
        }
        tokio::select! {
            more = c.fill() => if !more? { let _ = swr.shutdown().await; return Ok(()); },
            more = s.fill() => if !more? { let _ = cwr.shutdown().await; return Ok(()); },
            Some((dir, bytes)) = inject.recv() => match dir {
                Dir::ToServer => swr.write_all(&bytes).await?,
                Dir::ToClient => cwr.write_all(&bytes).await?,
            },
        }
    }
}

struct Out {
    bytes: Vec<Vec<u8>>,
    restart: bool,
}

fn on_frame(
    dir: Dir,
    f: Frame,
    st: &Arc<Mutex<State>>,
    conn: usize,
    held: &mut Option<(Dir, Vec<u8>)>,
) -> Out {
    let raw = match f {
        Frame::XmlDecl(b) | Frame::Whitespace(b) | Frame::StreamEnd(b) => {
            return Out {
                bytes: vec![b],
                restart: false,
            };
        }
        Frame::StreamHeader(h) => {
            return Out {
                bytes: vec![h.raw],
                restart: false,
            };
        }
        Frame::Stanza(b) => b,
    };
    let pass = |raw: Vec<u8>| Out {
        bytes: vec![raw],
        restart: false,
    };
    let Ok(el) = Element::parse(&raw, &NsScope::client_stream()) else {
        return pass(raw);
    };
    if dir == Dir::ToClient && el.is("success", ns::SASL) {
        return Out {
            bytes: vec![raw],
            restart: true,
        };
    }
    if !el.is("message", ns::CLIENT) {
        return pass(raw);
    }
    let Some(body) = stanza::body(&el) else {
        return pass(raw);
    };
    let kind = OtrKind::of(&body);
    let mut state = st.lock().unwrap();
    let rule = if kind == OtrKind::Data {
        state
            .armed
            .iter()
            .position(|(d, _)| *d == dir)
            .and_then(|i| state.armed.remove(i))
            .map(|(_, r)| r)
    } else {
        None
    };
    state.seen.push(Seen {
        dir,
        kind,
        raw: raw.clone(),
        tampered: rule,
        connection: conn,
    });
    drop(state);
    let mut bytes = Vec::new();
    match rule {
        None => bytes.push(raw),
        Some(Rule::Drop) => {}
        Some(Rule::Reorder) => {
            *held = Some((dir, raw));
            return Out {
                bytes,
                restart: false,
            };
        }
        Some(r) => bytes.push(tamper(el, &body, r).into_bytes()),
    }
    // A held message goes out right after the next data message its way.
    if kind == OtrKind::Data && held.as_ref().is_some_and(|(d, _)| *d == dir) {
        if let Some((_, h)) = held.take() {
            bytes.push(h);
        }
    }
    Out {
        bytes,
        restart: false,
    }
}

/// The changed stanza for `rule`.
fn tamper(mut el: Element, body: &str, rule: Rule) -> String {
    match rule {
        Rule::FlipCiphertext | Rule::FlipMac => {
            let at = body.find("?OTR:").unwrap_or(0);
            let mut m = EncodedMessage::from_armored(&body[at..]).expect("a data message");
            if let Body::Data(d) = &mut m.body {
                if rule == Rule::FlipCiphertext && !d.encrypted.is_empty() {
                    d.encrypted[0] ^= 0x01;
                } else {
                    d.mac[0] ^= 0x01;
                }
            }
            stanza::set_body(&mut el, &m.to_armored());
        }
        Rule::StripHints => {
            el.remove_children(|c| {
                c.ns() == ns::HINTS || c.is("encryption", ns::EME) || c.is("private", ns::CARBONS)
            });
        }
        Rule::AddNoStore => {
            el.append_child(Element::new("no-store", ns::HINTS));
            el.append_child(Element::new("no-storage", ns::HINTS));
        }
        Rule::Drop | Rule::Reorder => unreachable!("handled by the caller"),
    }
    el.to_xml(&NsScope::client_stream())
}
