//! The proxy in-process (loopback, plaintext client leg) in front of a fake
//! XMPP server written here (STARTTLS, SASL PLAIN, bind, echo). Hostile
//! bytes from the client leg and from the server leg — entity expansion,
//! oversized or deeply nested stanzas, invalid UTF-8, unclosed tags, stray
//! stream headers, `<starttls/>` after TLS, `<proceed/>` and SASL
//! `<success/>` nobody asked for — end that connection with the right
//! stream error (and a log line), while another connection served by the
//! same proxy keeps relaying.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use o2tr_proxy::otr::policy::Policy;
use o2tr_proxy::proxy::{self, ProxyConfig};
use o2tr_proxy::router::{RouterConfig, RouterFactory, SharedStore};
use o2tr_proxy::store::{MemoryStore, Store};
use o2tr_proxy::xmpp::element::NsScope;
use o2tr_proxy::xmpp::{Element, Frame, Framer, FramerConfig, ns, stanza};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::support::{log, log_mark, logged_since};
use crate::xml::laughs;

const DOMAIN: &str = "example.test";
const LIMIT: usize = 64 * 1024;

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

/// A framed XMPP stream.
struct Xs<S> {
    io: S,
    framer: Framer,
    scope: NsScope,
    /// How long a read may wait.
    patience: Duration,
}

/// What came instead of a stanza.
#[derive(Debug, PartialEq)]
enum End {
    /// `<stream:error>` with this condition.
    Error(String),
    /// `</stream:stream>`.
    Closed,
    /// EOF or a read error.
    Eof,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Xs<S> {
    fn new(io: S) -> Self {
        Xs {
            io,
            framer: Framer::new(FramerConfig {
                max_stanza_bytes: 8 * LIMIT,
                max_depth: 100_000,
            }),
            scope: NsScope::client_stream(),
            patience: Duration::from_secs(20),
        }
    }
    async fn send(&mut self, b: &[u8]) {
        // The peer may have closed already: that is for the reader to see.
        let _ = self.io.write_all(b).await;
        let _ = self.io.flush().await;
    }
    /// The next stanza, or how the stream ended. Headers are taken in.
    async fn next(&mut self) -> Result<Element, End> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match self.framer.next() {
                Ok(Some(Frame::StreamHeader(h))) => self.scope = NsScope::from_header(&h),
                Ok(Some(Frame::Stanza(raw))) => {
                    let el = Element::parse(&raw, &self.scope).map_err(|_| End::Eof)?;
                    if el.is("error", ns::STREAMS) {
                        let cond = el
                            .children()
                            .next()
                            .map(|c| c.name().to_string())
                            .unwrap_or_default();
                        return Err(End::Error(cond));
                    }
                    return Ok(el);
                }
                Ok(Some(Frame::StreamEnd(_))) => return Err(End::Closed),
                Ok(Some(_)) => {}
                Ok(None) => {
                    let n = tokio::time::timeout(self.patience, self.io.read(&mut buf))
                        .await
                        .map_err(|_| End::Eof)?
                        .unwrap_or(0);
                    if n == 0 {
                        return Err(End::Eof);
                    }
                    self.framer.push(&buf[..n]);
                }
                Err(_) => return Err(End::Eof),
            }
        }
    }
    /// Reads until a stream header arrives; `None` on EOF or error.
    async fn header(&mut self) -> Option<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match self.framer.next() {
                Ok(Some(Frame::StreamHeader(h))) => {
                    self.scope = NsScope::from_header(&h);
                    return Some(());
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let n = tokio::time::timeout(self.patience, self.io.read(&mut buf))
                        .await
                        .ok()?
                        .ok()?;
                    if n == 0 {
                        return None;
                    }
                    self.framer.push(&buf[..n]);
                }
                Err(_) => return None,
            }
        }
    }
    /// Skips stanzas until the stream ends; returns how.
    async fn end(&mut self) -> End {
        loop {
            match self.next().await {
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }
}

/// How the fake server treats one connection.
#[derive(Clone)]
enum Mode {
    Normal,
    /// Send these bytes right after the SASL features, before any `<auth/>`.
    BeforeAuth(Vec<u8>),
}

#[derive(Default)]
struct ServerLog {
    /// Stream errors the proxy sent to the server.
    errors: Vec<String>,
    /// Every message body received.
    bodies: Vec<String>,
    /// The connection is over.
    done: bool,
}

/// Server-leg injections, by index, triggered by a message `inject:N`.
fn server_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    vec![
        (
            "server: billion laughs",
            format!("{}<message><body>&lol9;</body></message>", laughs()).into_bytes(),
            "restricted-xml",
        ),
        (
            "server: stanza over the size limit",
            format!(
                "<message from='peer@{DOMAIN}/x' type='chat'><body>{}</body></message>",
                "a".repeat(LIMIT)
            )
            .into_bytes(),
            "policy-violation",
        ),
        (
            "server: nesting too deep",
            format!("<message>{}", "<x>".repeat(100)).into_bytes(),
            "policy-violation",
        ),
        (
            "server: invalid UTF-8",
            b"<message><body>\xff\xfe</body></message>".to_vec(),
            "unsupported-encoding",
        ),
        (
            "server: mismatched end tag",
            b"<message><body>hi</message>".to_vec(),
            "not-well-formed",
        ),
        (
            "server: SASL success after bind",
            b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>".to_vec(),
            "policy-violation",
        ),
        (
            "server: <proceed/> nobody asked for",
            b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>".to_vec(),
            "policy-violation",
        ),
        (
            "server: second stream header mid-stream",
            header_from_server("again").as_bytes()[21..].to_vec(),
            "not-well-formed",
        ),
    ]
}

struct Fake {
    modes: Arc<Mutex<VecDeque<Mode>>>,
    logs: Arc<Mutex<Vec<Arc<Mutex<ServerLog>>>>>,
}

async fn fake_server(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, fake: Arc<Fake>) {
    let mut n = 0;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        n += 1;
        let mode = fake
            .modes
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Mode::Normal);
        let slog = Arc::new(Mutex::new(ServerLog::default()));
        fake.logs.lock().unwrap().push(Arc::clone(&slog));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = serve_one(tcp, acceptor, n, mode, Arc::clone(&slog)).await;
            slog.lock().unwrap().done = true;
        });
    }
}

const STARTTLS_FEATURES: &str = "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>";
const SASL_FEATURES: &str = "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms></stream:features>";
const BIND_FEATURES: &str =
    "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>";

async fn serve_one(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    n: usize,
    mode: Mode,
    slog: Arc<Mutex<ServerLog>>,
) -> Option<()> {
    let record = |e: End| {
        if let End::Error(c) = e {
            slog.lock().unwrap().errors.push(c);
        }
    };
    let mut xs = Xs::new(tcp);
    xs.header().await?;
    xs.send(format!("{}{STARTTLS_FEATURES}", header_from_server("s1")).as_bytes())
        .await;
    let st = xs.next().await.ok()?;
    if !st.is("starttls", ns::TLS) {
        return None;
    }
    xs.send(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await;
    let tls = acceptor.accept(xs.io).await.ok()?;
    let mut xs = Xs::new(tls);
    xs.patience = Duration::from_secs(600);
    xs.header().await?;
    xs.send(format!("{}{SASL_FEATURES}", header_from_server("s2")).as_bytes())
        .await;
    if let Mode::BeforeAuth(bytes) = &mode {
        xs.send(bytes).await;
        record(xs.end().await);
        return Some(());
    }
    let auth = match xs.next().await {
        Ok(a) => a,
        Err(e) => {
            record(e);
            return None;
        }
    };
    if !auth.is("auth", ns::SASL) {
        return None;
    }
    xs.send(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
        .await;
    xs.framer.reset();
    xs.header().await?;
    xs.send(format!("{}{BIND_FEATURES}", header_from_server("s3")).as_bytes())
        .await;
    let bind = xs.next().await.ok()?;
    let id = bind.attr("id")?.to_owned();
    let jid = format!("user{n}@{DOMAIN}/res");
    xs.send(format!("<iq id='{id}' type='result'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{jid}</jid></bind></iq>").as_bytes()).await;
    loop {
        match xs.next().await {
            Ok(el) if stanza::is_message(&el) => {
                let body = stanza::body(&el).unwrap_or_default();
                slog.lock().unwrap().bodies.push(body.clone());
                if let Some(i) = body.strip_prefix("inject:") {
                    let i: usize = i.parse().ok()?;
                    xs.send(&server_cases()[i].1).await;
                    record(xs.end().await);
                    return Some(());
                }
                if body.starts_with("echo-me") {
                    let reply = format!(
                        "<message from='peer@{DOMAIN}/x' to='{jid}' type='chat'><body>echo: {body}</body></message>"
                    );
                    xs.send(reply.as_bytes()).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                record(e);
                return Some(());
            }
        }
    }
}

struct Setup {
    addr: std::net::SocketAddr,
    fake: Arc<Fake>,
    _dir: tempfile::TempDir,
}

async fn setup(hooks: Option<RouterConfig>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let g = o2tr_proxy::certs::generate(DOMAIN, time::OffsetDateTime::now_utc()).unwrap();
    let w = o2tr_proxy::certs::write(dir.path(), &g, true).unwrap();
    let key = PrivateKeyDer::from_pem_slice(g.key_pem.as_bytes()).unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(g.cert_pem.as_bytes())
        .chain(CertificateDer::pem_slice_iter(g.ca_pem.as_bytes()))
        .collect::<Result<_, _>>()
        .unwrap();
    let scfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(scfg));
    let fake = Arc::new(Fake {
        modes: Default::default(),
        logs: Default::default(),
    });
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_port = server.local_addr().unwrap().port();
    tokio::spawn(fake_server(server, acceptor, Arc::clone(&fake)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = ProxyConfig::new();
    cfg.listen = addr;
    cfg.upstream = Some(("127.0.0.1".into(), server_port));
    cfg.upstream_ca = Some(w.ca.clone());
    cfg.allow_plaintext_client = true;
    cfg.max_stanza_bytes = LIMIT;
    if let Some(rc) = hooks {
        let store: Box<dyn Store> = Box::new(MemoryStore::new());
        let store: SharedStore = Arc::new(Mutex::new(store));
        cfg.hooks = Arc::new(RouterFactory::new(rc, store));
    }
    tokio::spawn(async move {
        let _ = proxy::serve(listener, cfg, std::future::pending::<()>()).await;
    });
    Setup {
        addr,
        fake,
        _dir: dir,
    }
}

async fn connect(s: &Setup) -> Xs<TcpStream> {
    Xs::new(TcpStream::connect(s.addr).await.unwrap())
}

/// Logs in (SASL PLAIN, bind) through the proxy.
async fn login(s: &Setup) -> Result<Xs<TcpStream>, String> {
    let mut xs = connect(s).await;
    xs.send(header_to_server().as_bytes()).await;
    let f = xs.next().await.map_err(|e| format!("features: {e:?}"))?;
    if !f.has_child("mechanisms", ns::SASL) {
        return Err("no SASL features".into());
    }
    xs.send(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AHVzZXIAcGFzcw==</auth>",
    )
    .await;
    let ok = xs.next().await.map_err(|e| format!("auth: {e:?}"))?;
    if !ok.is("success", ns::SASL) {
        return Err("no SASL success".into());
    }
    xs.framer.reset();
    xs.send(header_to_server().as_bytes()).await;
    xs.next()
        .await
        .map_err(|e| format!("bind features: {e:?}"))?;
    xs.send(b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>res</resource></bind></iq>").await;
    let r = xs.next().await.map_err(|e| format!("bind: {e:?}"))?;
    if r.attr("type") != Some("result") {
        return Err("bind failed".into());
    }
    Ok(xs)
}

/// The long-lived connection still relays both ways.
async fn still_serving(keep: &mut Xs<TcpStream>, tag: &str) -> Result<(), String> {
    let body = format!("echo-me {}", tag.replace(['<', '>', '&'], "_"));
    keep.send(
        format!("<message to='peer@{DOMAIN}' type='chat' id='k'><body>{body}</body></message>")
            .as_bytes(),
    )
    .await;
    loop {
        match keep.next().await {
            Ok(el) if stanza::body(&el).as_deref() == Some(&format!("echo: {body}")) => {
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => return Err(format!("the other connection ended: {e:?}")),
        }
    }
}

#[derive(Clone, Copy)]
enum When {
    /// Instead of a stream header.
    Start,
    /// After the SASL features, before authenticating.
    PreAuth,
    /// After bind.
    Bound,
}

struct ClientCase {
    name: &'static str,
    when: When,
    bytes: fn() -> Vec<u8>,
    condition: &'static str,
}

fn client_cases() -> Vec<ClientCase> {
    use When::*;
    vec![
        ClientCase {
            name: "client: billion laughs before the header",
            when: Start,
            bytes: || {
                format!(
                    "<?xml version='1.0'?>{}{}",
                    laughs(),
                    &header_to_server()[21..]
                )
                .into_bytes()
            },
            condition: "restricted-xml",
        },
        ClientCase {
            name: "client: text instead of a header",
            when: Start,
            bytes: || b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            condition: "not-well-formed",
        },
        ClientCase {
            name: "client: header without 'to'",
            when: Start,
            bytes: || {
                b"<stream:stream version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>".to_vec()
            },
            condition: "host-unknown",
        },
        ClientCase {
            name: "client: stanza over the size limit before auth",
            when: PreAuth,
            bytes: || {
                format!(
                    "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
                    "A".repeat(LIMIT)
                )
                .into_bytes()
            },
            condition: "policy-violation",
        },
        ClientCase {
            name: "client: stream reopened without a restart",
            when: PreAuth,
            bytes: || header_to_server().as_bytes()[21..].to_vec(),
            condition: "not-well-formed",
        },
        ClientCase {
            name: "client: SASL success sent by the client",
            when: PreAuth,
            bytes: || b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>".to_vec(),
            condition: "policy-violation",
        },
        ClientCase {
            name: "client: <starttls/> after TLS",
            when: PreAuth,
            bytes: || b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>".to_vec(),
            condition: "policy-violation",
        },
        ClientCase {
            name: "client: billion laughs after bind",
            when: Bound,
            bytes: || format!("{}<message><body>&lol9;</body></message>", laughs()).into_bytes(),
            condition: "restricted-xml",
        },
        ClientCase {
            name: "client: entity reference in a body",
            when: Bound,
            bytes: || {
                format!("<message to='peer@{DOMAIN}' type='chat'><body>&xxe;</body></message>")
                    .into_bytes()
            },
            condition: "restricted-xml",
        },
        ClientCase {
            name: "client: stanza over the size limit",
            when: Bound,
            bytes: || {
                format!(
                    "<message to='peer@{DOMAIN}' type='chat'><body>{}</body></message>",
                    "a".repeat(LIMIT)
                )
                .into_bytes()
            },
            condition: "policy-violation",
        },
        ClientCase {
            name: "client: nesting too deep",
            when: Bound,
            bytes: || format!("<message>{}", "<x>".repeat(1000)).into_bytes(),
            condition: "policy-violation",
        },
        ClientCase {
            name: "client: invalid UTF-8",
            when: Bound,
            bytes: || b"<message><body>\xc3\x28</body></message>".to_vec(),
            condition: "unsupported-encoding",
        },
        ClientCase {
            name: "client: unclosed tags",
            when: Bound,
            bytes: || b"<message><body>hi</message>".to_vec(),
            condition: "not-well-formed",
        },
        ClientCase {
            name: "client: second stream header after bind",
            when: Bound,
            bytes: || header_to_server().as_bytes()[21..].to_vec(),
            condition: "not-well-formed",
        },
        ClientCase {
            name: "client: <starttls/> after bind",
            when: Bound,
            bytes: || b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>".to_vec(),
            condition: "policy-violation",
        },
        ClientCase {
            name: "client: <proceed/> from the client",
            when: Bound,
            bytes: || b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>".to_vec(),
            condition: "policy-violation",
        },
        ClientCase {
            name: "client: SASL success after bind",
            when: Bound,
            bytes: || b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>".to_vec(),
            condition: "policy-violation",
        },
    ]
}

/// Waits until the fake server's connection `i` is over; returns the
/// stream error it was sent, if any.
async fn server_error(s: &Setup, i: usize) -> Option<String> {
    for _ in 0..400 {
        let log = s.fake.logs.lock().unwrap().get(i).cloned();
        if let Some(l) = log {
            let l = l.lock().unwrap();
            if l.done {
                return l.errors.first().cloned();
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Some("(the server connection did not end)".into())
}

/// Whether a line with all of `needles` is logged after `mark` within 10 s
/// (the connection logs its end after closing both legs).
async fn eventually_logged(mark: usize, needles: &[&str]) -> bool {
    for _ in 0..500 {
        if logged_since(mark, needles) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn run_client_case(
    s: &Setup,
    keep: &mut Xs<TcpStream>,
    c: &ClientCase,
) -> Result<(), String> {
    let mark = log_mark();
    let conns = s.fake.logs.lock().unwrap().len();
    let mut xs = match c.when {
        When::Start => connect(s).await,
        When::PreAuth => {
            let mut xs = connect(s).await;
            xs.send(header_to_server().as_bytes()).await;
            xs.next().await.map_err(|e| format!("features: {e:?}"))?;
            xs
        }
        When::Bound => login(s).await?,
    };
    xs.send(&(c.bytes)()).await;
    let end = xs.end().await;
    if end != End::Error(c.condition.to_string()) {
        return Err(format!(
            "the client saw {end:?}, want a {} stream error",
            c.condition
        ));
    }
    // The server leg is closed too (with a clean stream end, not an error
    // blamed on the server), when it was open.
    if !matches!(c.when, When::Start) && server_error(s, conns).await.is_some() {
        return Err("the server was sent a stream error for the client's fault".into());
    }
    if !eventually_logged(mark, &["connection ended", c.condition]).await {
        return Err("no 'connection ended' log line naming the condition".into());
    }
    still_serving(keep, c.name).await
}

async fn run_server_case(
    s: &Setup,
    keep: &mut Xs<TcpStream>,
    i: usize,
    name: &str,
    cond: &str,
) -> Result<(), String> {
    let mark = log_mark();
    let conns = s.fake.logs.lock().unwrap().len();
    let mut xs = login(s).await?;
    xs.send(
        format!("<message to='peer@{DOMAIN}' type='chat' id='i'><body>inject:{i}</body></message>")
            .as_bytes(),
    )
    .await;
    let end = xs.end().await;
    if end != End::Error("remote-connection-failed".into()) {
        return Err(format!(
            "the client saw {end:?}, want remote-connection-failed"
        ));
    }
    match server_error(s, conns).await {
        Some(c) if c == cond => {}
        other => return Err(format!("the server got {other:?}, want {cond}")),
    }
    if !eventually_logged(
        mark,
        &["connection ended", "server protocol violation", cond],
    )
    .await
    {
        return Err("no 'connection ended' log line naming the condition".into());
    }
    still_serving(keep, name).await
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn hostile_streams_end_only_their_connection() {
    let _ = log();
    rt().block_on(async {
        let s = setup(None).await;
        let mut keep = login(&s).await.expect("login");
        still_serving(&mut keep, "start").await.expect("relays");
        let mut failures = Vec::new();
        let cases = client_cases();
        for c in &cases {
            if let Err(e) = run_client_case(&s, &mut keep, c).await {
                failures.push(format!("  {}: {e}", c.name));
            }
        }
        let scases = server_cases();
        for (i, (name, _, cond)) in scases.iter().enumerate() {
            if let Err(e) = run_server_case(&s, &mut keep, i, name, cond).await {
                failures.push(format!("  {name}: {e}"));
            }
        }
        // A SASL success before any <auth/>.
        let name = "server: SASL success injected before auth";
        let conns = s.fake.logs.lock().unwrap().len();
        s.fake.modes.lock().unwrap().push_back(Mode::BeforeAuth(
            b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>".to_vec(),
        ));
        let mut xs = connect(&s).await;
        xs.send(header_to_server().as_bytes()).await;
        let end = xs.end().await;
        let got = server_error(&s, conns).await;
        if end != End::Error("remote-connection-failed".into())
            || got.as_deref() != Some("policy-violation")
        {
            failures.push(format!("  {name}: client saw {end:?}, server got {got:?}"));
        } else if let Err(e) = still_serving(&mut keep, name).await {
            failures.push(format!("  {name}: {e}"));
        }
        let total = cases.len() + scases.len() + 1;
        assert!(
            failures.is_empty(),
            "{} of {total} stream cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    });
}

/// Resource bound: conversations per connection. Past the limit a user
/// message is NOT sent (never in plaintext), the user is told, and the
/// limit is logged.
#[test]
fn conversation_limit_never_leaks_plaintext() {
    let _ = log();
    rt().block_on(async {
        let s = setup(Some(RouterConfig { policy: Policy::Always, max_conversations: 2, ..RouterConfig::default() })).await;
        let mark = log_mark();
        let mut xs = login(&s).await.expect("login");
        for i in 1..=3 {
            xs.send(format!("<message to='peer{i}@{DOMAIN}' type='chat' id='m{i}'><body>secret-{i}</body></message>").as_bytes()).await;
        }
        let mut told = false;
        for _ in 0..30 {
            match xs.next().await {
                Ok(el) => {
                    let b = stanza::body(&el).unwrap_or_default();
                    if b.starts_with("[o2tr] Too many conversations") && b.contains("peer3@") && b.contains("NOT sent") {
                        told = true;
                        break;
                    }
                }
                Err(e) => panic!("connection ended: {e:?}"),
            }
        }
        assert!(told, "no notice about the conversation limit");
        assert!(logged_since(mark, &["conversation limit reached", "limit=2"]), "no log line at the limit");
        // Still serving: the first peer's conversation still answers.
        xs.send(format!("<message to='peer1@{DOMAIN}' type='chat' id='m4'><body>secret-4</body></message>").as_bytes()).await;
        let mut held = false;
        for _ in 0..30 {
            let el = xs.next().await.expect("still connected");
            if stanza::body(&el).is_some_and(|b| b.contains("Message held")) {
                held = true;
                break;
            }
        }
        assert!(held, "the first conversation no longer answers");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let bodies: Vec<String> = s.fake.logs.lock().unwrap().iter().flat_map(|l| l.lock().unwrap().bodies.clone()).collect();
        assert!(bodies.iter().all(|b| !b.contains("secret")), "plaintext reached the server: {bodies:?}");
        assert!(bodies.iter().any(|b| b.starts_with("?OTR")), "no OTR query reached the server: {bodies:?}");
    });
}
