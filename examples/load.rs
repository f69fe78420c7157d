//! Load test: message latency and throughput directly through ejabberd and
//! through two in-process o2tr-proxies (OTR, policy Always), connection
//! set-up time, and resident memory per idle proxied connection.
//!
//! Starts its own ejabberd on a free loopback port with
//! `scripts/ejabberd/ejabberd-test.sh` (stopped at the end, also on error)
//! and drives it with a raw XMPP client (STARTTLS, SASL PLAIN, bind).
//!
//! ```text
//! cargo run --release --example load -- [--pairs N] [--messages M] [--idle K] [--stub] [--memory-store]
//! ```
//!
//! `--memory-store` gives the proxies a `MemoryStore` instead of the
//! on-disk `SqliteStore`, to separate the proxies' work from fsync waits;
//! `--wipe-immediately` makes the `SqliteStore` run its TRUNCATE checkpoint
//! inside every call that supersedes secret content (the behaviour before
//! issue 8; the shipped store defers it to the once-a-second maintenance),
//! to show what that checkpoint costs.
//!
//! With `--stub`, an in-process stub XMPP server (module `stub`) replaces
//! ejabberd: the figures are then the proxies' own latency and throughput,
//! not the server's. Idle connections are measured at 1, 100 and 1,000 (up
//! to K), directly and through proxy A, so the proxy's share per
//! connection is the difference.
//!
//! Results are in docs/performance.md, section "Load test".

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use o2tr_proxy::otr::policy::Policy;
use o2tr_proxy::proxy::{self, ProxyConfig};
use o2tr_proxy::router::{RouterConfig, RouterFactory, SharedStore};
use o2tr_proxy::store::{MemoryStore, SqliteStore, Store};
use o2tr_proxy::xmpp::element::{NsScope, escape_attr};
use o2tr_proxy::xmpp::{Element, Frame, Framer, FramerConfig, features, ns};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};

/// XMPP domain of the test server.
const DOMAIN: &str = "example.test";
/// Bound on every single wait (read, login, script run).
const T: Duration = Duration::from_secs(60);
/// ejabberd's `max_user_sessions` in the test config.
const SESSIONS_PER_USER: usize = 10;

/// Process-wide time origin: bodies carry their send time relative to it.
fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ns() -> u128 {
    epoch().elapsed().as_nanos()
}

// ------------------------------------------------------------ arguments

struct Args {
    pairs: usize,
    messages: usize,
    idle: usize,
    stub: bool,
    /// Proxies keep their state in memory (no fsync): `--memory-store`.
    memory_store: bool,
    /// SqliteStore with the TRUNCATE checkpoint inside every wiping call:
    /// `--wipe-immediately` (NOT the shipped behaviour; shows what the
    /// checkpoint costs).
    wipe_now: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        pairs: 4,
        messages: 200,
        idle: 100,
        stub: false,
        memory_store: false,
        wipe_now: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = |name: &str| -> Result<usize> {
            it.next()
                .ok_or_else(|| anyhow!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} wants a number"))
        };
        match flag.as_str() {
            "--pairs" => a.pairs = val("--pairs")?,
            "--messages" => a.messages = val("--messages")?,
            "--idle" => a.idle = val("--idle")?,
            "--stub" => a.stub = true,
            "--memory-store" => a.memory_store = true,
            "--wipe-immediately" => a.wipe_now = true,
            "-h" | "--help" => {
                println!(
                    "usage: load [--pairs N (4)] [--messages M (200)] [--idle K (100)] [--stub] [--memory-store] [--wipe-immediately]"
                );
                std::process::exit(0);
            }
            f => bail!("unknown argument {f:?}"),
        }
    }
    if !(1..=50).contains(&a.pairs) || !(1..=10_000).contains(&a.messages) || a.idle > 2000 {
        bail!("bounds: 1 <= pairs <= 50, 1 <= messages <= 10000, idle <= 2000");
    }
    Ok(a)
}

// ------------------------------------------------------------ ejabberd

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_script(args: &[&str]) -> Result<String> {
    let script = repo_root().join("scripts/ejabberd/ejabberd-test.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("EJ_WATCH_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(stdout),
        _ => bail!("ejabberd-test.sh {args:?} failed ({status:?}):\n{stdout}\n{stderr}"),
    }
}

/// A running ejabberd; dropping it stops it and removes its directory.
struct Ejabberd {
    dir: PathBuf,
    port: u16,
    ca: PathBuf,
}

impl Ejabberd {
    fn start(dir: PathBuf) -> Result<Ejabberd> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let ej = Ejabberd {
            ca: dir.join("certs/ca.pem"),
            dir,
            port,
        };
        // Constructed first so a failed start still stops a half-started node.
        run_script(&["start", ej.dir_str()?, &port.to_string(), DOMAIN])?;
        Ok(ej)
    }

    fn dir_str(&self) -> Result<&str> {
        self.dir.to_str().context("non-UTF-8 dir")
    }

    fn register_all(&self, users: &[String]) -> Result<()> {
        let dir = self.dir_str()?;
        // A few at a time: each registration boots a small Erlang VM.
        for chunk in users.chunks(4) {
            std::thread::scope(|s| {
                let hs: Vec<_> = chunk
                    .iter()
                    .map(|u| s.spawn(move || run_script(&["register", dir, u, &password(u)])))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().map_err(|_| anyhow!("register thread panicked"))?)
                    .collect::<Result<Vec<_>>>()
            })?;
        }
        Ok(())
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        if let Ok(d) = self.dir_str()
            && let Err(e) = run_script(&["stop", d])
        {
            eprintln!("stopping ejabberd failed, killing it: {e}");
            let _ = run_script(&["kill", d]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn password(user: &str) -> String {
    format!("pw-{user}")
}

fn jid(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

// ------------------------------------------------------------ proxies

/// CA + leaf for a proxy's client leg; returns (ca.pem, cert.pem, key.pem).
fn client_leg_pki(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "o2tr-proxy load CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec![
        DOMAIN.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, DOMAIN);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, leaf.pem())?;
    std::fs::write(&paths.2, leaf_key.serialize_pem())?;
    Ok(paths)
}

/// An in-process proxy (policy Always, its own SqliteStore).
struct Proxy {
    port: u16,
    ca: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Proxy {
    async fn start(up: (u16, &Path), dir: &Path, args: &Args) -> Result<Proxy> {
        let (ca, cert, key) = client_leg_pki(&dir.join("pki"))?;
        let store: Box<dyn Store> = if args.memory_store {
            Box::new(MemoryStore::new())
        } else {
            let mut s = SqliteStore::open(&dir.join("state"))?;
            s.set_wipe_immediately(args.wipe_now);
            Box::new(s)
        };
        let store: SharedStore = Arc::new(Mutex::new(store));
        let router = RouterFactory::new(
            RouterConfig {
                policy: Policy::Always,
                ..RouterConfig::default()
            },
            store,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut cfg = ProxyConfig::new();
        cfg.listen = listener.local_addr()?;
        cfg.upstream = Some(("127.0.0.1".into(), up.0));
        cfg.upstream_ca = Some(up.1.to_path_buf());
        cfg.tls_cert = Some(cert);
        cfg.tls_key = Some(key);
        cfg.max_connections = 4096;
        cfg.hooks = Arc::new(router);
        let port = cfg.listen.port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = proxy::serve(listener, cfg, rx).await {
                eprintln!("proxy failed: {e}");
            }
        });
        Ok(Proxy {
            port,
            ca,
            stop: Some(tx),
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

// ------------------------------------------------------------ raw client

fn client_tls(ca: &Path) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// A framed XMPP stream, hand-driven.
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

    async fn send(&mut self, s: &str) -> Result<()> {
        self.io.write_all(s.as_bytes()).await?;
        self.io.flush().await?;
        Ok(())
    }

    async fn frame(&mut self) -> Result<Frame> {
        let mut buf = [0u8; 16384];
        loop {
            if let Some(f) = self.framer.next()? {
                return Ok(f);
            }
            let n = tokio::time::timeout(T, self.io.read(&mut buf))
                .await
                .context("read timed out")??;
            if n == 0 {
                bail!("connection closed");
            }
            self.framer.push(&buf[..n]);
        }
    }

    async fn header(&mut self) -> Result<()> {
        loop {
            match self.frame().await? {
                Frame::StreamHeader(h) => {
                    self.scope = NsScope::from_header(&h);
                    return Ok(());
                }
                Frame::XmlDecl(_) | Frame::Whitespace(_) => {}
                f => bail!("expected stream header, got {f:?}"),
            }
        }
    }

    async fn stanza(&mut self) -> Result<Element> {
        loop {
            match self.frame().await? {
                Frame::Stanza(raw) => return Ok(Element::parse(&raw, &self.scope)?),
                Frame::StreamEnd(_) => bail!("stream closed by peer"),
                _ => {}
            }
        }
    }

    async fn until(&mut self, what: &str, pred: impl Fn(&Element) -> bool) -> Result<Element> {
        loop {
            let el = self
                .stanza()
                .await
                .with_context(|| format!("waiting for {what}"))?;
            if pred(&el) {
                return Ok(el);
            }
        }
    }
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A logged-in client.
struct Client {
    xs: Xs<TlsStream>,
}

fn header() -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
}

/// STARTTLS, SASL PLAIN, bind `resource`, initial presence and its echo.
async fn login(port: u16, ca: &Path, user: &str, resource: &str) -> Result<Client> {
    use base64::Engine as _;
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let mut xs = Xs::new(tcp);
    xs.send(&header()).await?;
    xs.header().await?;
    let f = xs.stanza().await?;
    if !features::offers_starttls(&f) {
        bail!("no STARTTLS offered");
    }
    xs.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await?;
    if !xs.stanza().await?.is("proceed", ns::TLS) {
        bail!("STARTTLS refused");
    }
    if xs.framer.buffered() != 0 {
        bail!("data after <proceed/>");
    }
    let tls = client_tls(ca)?
        .connect(ServerName::try_from(DOMAIN.to_owned())?, xs.io)
        .await?;
    let mut xs = Xs::new(tls);
    xs.send(&header()).await?;
    xs.header().await?;
    xs.stanza().await?;
    let plain =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{}", password(user)));
    xs.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"
    ))
    .await?;
    let s = xs.stanza().await?;
    if !s.is("success", ns::SASL) {
        bail!("SASL failed for {user}: {s:?}");
    }
    xs.framer.reset();
    xs.send(&header()).await?;
    xs.header().await?;
    xs.stanza().await?;
    xs.send(&format!("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await?;
    let r = xs
        .until("bind result", |e| e.attr("id") == Some("bind1"))
        .await?;
    let full = r
        .get_child("bind", ns::BIND)
        .and_then(|b| b.get_child("jid", ns::BIND))
        .map(|j| j.text().to_string())
        .ok_or_else(|| anyhow!("bind failed: {r:?}"))?;
    xs.send("<presence/>").await?;
    xs.until("presence echo", move |e| {
        e.name() == "presence" && e.attr("from") == Some(full.as_str())
    })
    .await?;
    Ok(Client { xs })
}

impl Client {
    /// Sends one chat message stamped with the send time.
    async fn send_stamped(&mut self, to: &str, tag: &str, seq: usize) -> Result<()> {
        self.xs
            .send(&format!(
                "<message type='chat' to='{to}'><body>{tag} {seq} {}</body></message>",
                now_ns()
            ))
            .await
    }

    /// Next stamped message with `tag`: (seq, latency). `[o2tr]` notices
    /// and other stanzas are skipped.
    async fn recv_stamped(&mut self, tag: &str) -> Result<(usize, Duration)> {
        loop {
            let el = self.xs.stanza().await?;
            if el.name() != "message" {
                continue;
            }
            let Some(body) = el.get_child("body", ns::CLIENT).map(|b| b.text()) else {
                continue;
            };
            if body.starts_with("[o2tr]") {
                continue;
            }
            let now = now_ns();
            let mut f = body.split(' ');
            if f.next() != Some(tag) {
                continue;
            }
            let seq: usize = f.next().and_then(|s| s.parse().ok()).context("bad seq")?;
            let sent: u128 = f.next().and_then(|s| s.parse().ok()).context("bad stamp")?;
            let ns = u64::try_from(now.saturating_sub(sent)).unwrap_or(u64::MAX);
            return Ok((seq, Duration::from_nanos(ns)));
        }
    }
}

// ------------------------------------------------------------ stub upstream

/// A minimal in-process XMPP server standing in for ejabberd in `--stub`
/// mode, so the proxies' own cost is measured without the server's: it
/// answers STARTTLS, accepts any SASL PLAIN login, binds the requested
/// resource, echoes initial presence, routes `<message/>` and directed
/// `<presence/>` by JID (adding `from`), and answers any other `<iq/>`
/// addressed to the server with an empty result. No roster, no offline
/// storage, no stream management: a fast stub, not a server.
mod stub {
    use super::*;
    use std::collections::HashMap;
    use tokio::io::{ReadHalf, WriteHalf};
    use tokio::sync::mpsc;
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::pki_types::PrivateKeyDer;

    type Tx = mpsc::UnboundedSender<String>;
    /// Bare JID → (full JID, outgoing queue) of each bound session.
    type Routes = Arc<Mutex<HashMap<String, Vec<(String, Tx)>>>>;

    pub struct Stub {
        pub port: u16,
        pub ca: PathBuf,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl Drop for Stub {
        fn drop(&mut self) {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
        }
    }

    fn server_header() -> String {
        format!(
            "<?xml version='1.0'?><stream:stream from='{DOMAIN}' id='stub' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
        )
    }

    pub async fn start(dir: &Path) -> Result<Stub> {
        let (ca, cert, key) = client_leg_pki(dir)?;
        let certs = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&key)?;
        let cfg =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let routes: Routes = Arc::default();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    acc = listener.accept() => {
                        let Ok((tcp, _)) = acc else { continue };
                        let (acceptor, routes) = (acceptor.clone(), Arc::clone(&routes));
                        // A session ends with an error when its client just
                        // closes the connection too: nothing to report.
                        tokio::spawn(async move {
                            let _ = session(tcp, acceptor, routes).await;
                        });
                    }
                }
            }
        });
        Ok(Stub {
            port,
            ca,
            stop: Some(tx),
        })
    }

    async fn session(
        tcp: TcpStream,
        acceptor: tokio_rustls::TlsAcceptor,
        routes: Routes,
    ) -> Result<()> {
        tcp.set_nodelay(true)?;
        let mut xs = Xs::new(tcp);
        xs.header().await?;
        xs.send(&format!(
            "{}<stream:features><starttls xmlns='{}'><required/></starttls></stream:features>",
            server_header(),
            ns::TLS
        ))
        .await?;
        if !xs.stanza().await?.is("starttls", ns::TLS) {
            bail!("expected <starttls/>");
        }
        xs.send(&format!("<proceed xmlns='{}'/>", ns::TLS)).await?;
        let tls = acceptor.accept(xs.io).await?;
        let mut xs = Xs::new(tls);
        xs.header().await?;
        xs.send(&format!(
            "{}<stream:features><mechanisms xmlns='{}'><mechanism>PLAIN</mechanism></mechanisms></stream:features>",
            server_header(),
            ns::SASL
        ))
        .await?;
        let auth = xs.until("auth", |e| e.is("auth", ns::SASL)).await?;
        use base64::Engine as _;
        let plain = base64::engine::general_purpose::STANDARD.decode(auth.text().trim())?;
        let user = plain
            .split(|&b| b == 0)
            .nth(1)
            .map(|u| String::from_utf8_lossy(u).into_owned())
            .context("bad PLAIN")?;
        xs.send(&format!("<success xmlns='{}'/>", ns::SASL)).await?;
        xs.framer.reset();
        xs.header().await?;
        xs.send(&format!(
            "{}<stream:features><bind xmlns='{}'/></stream:features>",
            server_header(),
            ns::BIND
        ))
        .await?;
        let bind = xs.until("bind", |e| e.name() == "iq").await?;
        let resource = bind
            .get_child("bind", ns::BIND)
            .and_then(|b| b.get_child("resource", ns::BIND))
            .map(|r| r.text())
            .unwrap_or_else(|| "stub".into());
        let bare = format!("{user}@{DOMAIN}");
        let full = format!("{bare}/{resource}");
        xs.send(&format!(
            "<iq type='result' id='{}'><bind xmlns='{}'><jid>{full}</jid></bind></iq>",
            escape_attr(bind.attr("id").unwrap_or("")),
            ns::BIND
        ))
        .await?;

        // Bound: one task writes, this one reads and routes.
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        routes
            .lock()
            .map_err(|_| anyhow!("routes poisoned"))?
            .entry(bare.clone())
            .or_default()
            .push((full.clone(), tx.clone()));
        let Xs { io, framer, scope } = xs;
        let (rd, mut wr): (ReadHalf<_>, WriteHalf<_>) = tokio::io::split(io);
        let writer = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Coalesce what is queued into one write.
                let mut out = first;
                while let Ok(more) = rx.try_recv() {
                    out.push_str(&more);
                }
                if wr.write_all(out.as_bytes()).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
        });
        let res = route_loop(rd, framer, scope, &full, &tx, &routes).await;
        if let Ok(mut r) = routes.lock()
            && let Some(v) = r.get_mut(&bare)
        {
            v.retain(|(f, _)| f != &full);
        }
        drop(tx);
        writer.abort();
        res
    }

    async fn route_loop<R: AsyncRead + Unpin>(
        mut rd: R,
        mut framer: Framer,
        scope: NsScope,
        full: &str,
        own: &Tx,
        routes: &Routes,
    ) -> Result<()> {
        let out_scope = NsScope::client_stream();
        let mut buf = vec![0u8; 16384];
        loop {
            let frame = match framer.next()? {
                Some(f) => f,
                None => {
                    let n = rd.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    framer.push(&buf[..n]);
                    continue;
                }
            };
            let raw = match frame {
                Frame::Stanza(raw) => raw,
                Frame::StreamEnd(_) => return Ok(()),
                _ => continue,
            };
            let mut el = Element::parse(&raw, &scope)?;
            let to = el.attr("to").map(str::to_owned);
            match (el.name(), to) {
                ("presence", None) => {
                    el.set_attr("from", full);
                    let _ = own.send(el.to_xml(&out_scope));
                }
                ("message" | "presence", Some(to)) => {
                    el.set_attr("from", full);
                    deliver(routes, &to, el.to_xml(&out_scope));
                }
                ("iq", to) if to.as_deref().is_none_or(|t| t == DOMAIN || t == full) => {
                    let t = el.attr("type").unwrap_or("");
                    if t == "get" || t == "set" {
                        let _ = own.send(format!(
                            "<iq type='result' id='{}' to='{}'/>",
                            escape_attr(el.attr("id").unwrap_or("")),
                            escape_attr(full)
                        ));
                    }
                }
                ("iq", Some(to)) => {
                    el.set_attr("from", full);
                    deliver(routes, &to, el.to_xml(&out_scope));
                }
                _ => {}
            }
        }
    }

    /// To the session with that full JID, or (bare JID) the first bound one.
    fn deliver(routes: &Routes, to: &str, xml: String) {
        let bare = to.split('/').next().unwrap_or(to);
        let Ok(r) = routes.lock() else { return };
        if let Some(v) = r.get(bare) {
            let pick = v.iter().find(|(f, _)| f == to).or_else(|| v.first());
            if let Some((_, tx)) = pick {
                let _ = tx.send(xml);
            }
        }
    }
}

// ------------------------------------------------------------ measurements

/// Figures of one scenario.
#[derive(Default)]
struct Figures {
    login: Vec<Duration>,
    relogin: Vec<Duration>,
    setup: Vec<Duration>,
    alt: Vec<Duration>,
    alt_rate: f64,
    /// One way a→b, one message at a time: no DH ratchet step.
    oneway: Vec<Duration>,
    burst: Vec<Duration>,
    burst_rate: f64,
    burst_elapsed: Duration,
    burst_sent: Vec<Duration>,
}

struct Pair {
    a: Client,
    b: Client,
    a_jid: String,
    b_jid: String,
}

/// Logs in the pairs one after the other (so login times do not overlap).
async fn login_pairs(
    n: usize,
    a_end: (u16, &Path),
    b_end: (u16, &Path),
    login_times: &mut Vec<Duration>,
) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for i in 0..n {
        let (an, bn) = (format!("alice{i}"), format!("bob{i}"));
        let t = Instant::now();
        let a = login(a_end.0, a_end.1, &an, "load").await?;
        login_times.push(t.elapsed());
        let t = Instant::now();
        let b = login(b_end.0, b_end.1, &bn, "load").await?;
        login_times.push(t.elapsed());
        pairs.push(Pair {
            a,
            b,
            a_jid: jid(&an),
            b_jid: jid(&bn),
        });
    }
    Ok(pairs)
}

/// Logs in each pair's users three times more (accounts known to the proxy),
/// one after the other, with another resource; closes those sessions.
async fn relogin(
    n: usize,
    a_end: (u16, &Path),
    b_end: (u16, &Path),
    times: &mut Vec<Duration>,
) -> Result<()> {
    for i in (0..n).cycle().take(3 * n) {
        for (end, user) in [(a_end, format!("alice{i}")), (b_end, format!("bob{i}"))] {
            let t = Instant::now();
            let mut c = login(end.0, end.1, &user, "again").await?;
            times.push(t.elapsed());
            c.xs.send("</stream:stream>").await?;
        }
    }
    Ok(())
}

/// Alternating a→b, b→a… then a one-way burst a→b, all pairs in parallel.
async fn exchange(pairs: Vec<Pair>, m: usize, fig: &mut Figures) -> Result<Vec<Pair>> {
    // Alternating: every message waits for the previous one.
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut p in pairs {
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(m);
            for i in 0..m {
                let (from, to, to_jid) = if i % 2 == 0 {
                    (&mut p.a, &mut p.b, &p.b_jid)
                } else {
                    (&mut p.b, &mut p.a, &p.a_jid)
                };
                from.send_stamped(to_jid, "alt", i).await?;
                let (seq, d) = to.recv_stamped("alt").await?;
                if seq != i {
                    bail!("alternating: expected {i}, got {seq}");
                }
                lat.push(d);
            }
            Ok::<_, anyhow::Error>((p, lat))
        });
    }
    let mut pairs = Vec::new();
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        let (p, lat) = r??;
        total += lat.len();
        fig.alt.extend(lat);
        pairs.push(p);
    }
    fig.alt_rate = total as f64 / t0.elapsed().as_secs_f64();

    // One way, one at a time: a→b, each sent after the previous arrived.
    // After the first, no message takes a DH ratchet step.
    let mut tasks = tokio::task::JoinSet::new();
    for mut p in pairs {
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(m);
            for i in 0..m {
                p.a.send_stamped(&p.b_jid, "oneway", i).await?;
                let (seq, d) = p.b.recv_stamped("oneway").await?;
                if seq != i {
                    bail!("one-way: expected {i}, got {seq}");
                }
                lat.push(d);
            }
            Ok::<_, anyhow::Error>((p, lat))
        });
    }
    let mut pairs = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (p, lat) = r??;
        fig.oneway.extend(lat.into_iter().skip(1));
        pairs.push(p);
    }

    // Burst: a sends m messages back to back while b receives.
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut p in pairs {
        tasks.spawn(async move {
            let Pair { a, b, b_jid, .. } = &mut p;
            let send = async {
                for i in 0..m {
                    a.send_stamped(b_jid, "burst", i).await?;
                }
                Ok::<_, anyhow::Error>(t0.elapsed())
            };
            let recv = async {
                let mut lat = Vec::with_capacity(m);
                for i in 0..m {
                    let (seq, d) = b.recv_stamped("burst").await?;
                    if seq != i {
                        bail!("burst: expected {i}, got {seq}");
                    }
                    lat.push(d);
                }
                Ok(lat)
            };
            let (s, lat) = tokio::join!(send, recv);
            Ok::<_, anyhow::Error>((p, lat?, s?))
        });
    }
    let mut pairs = Vec::new();
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        let (p, lat, sent) = r??;
        total += lat.len();
        fig.burst.extend(lat);
        fig.burst_sent.push(sent);
        pairs.push(p);
    }
    fig.burst_elapsed = t0.elapsed();
    fig.burst_rate = total as f64 / fig.burst_elapsed.as_secs_f64();
    Ok(pairs)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn signed_ms(s: f64) -> String {
    format!("{:+.2} ms", s * 1e3)
}

fn vm_rss_kib() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

// ------------------------------------------------------------ main

fn main() -> Result<()> {
    let args = parse_args()?;
    epoch();
    let started = Instant::now();
    let base = repo_root().join("target/tmp");
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new().prefix("load-").tempdir_in(&base)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    raise_fd_limit();
    let idle_users = args.idle.div_ceil(SESSIONS_PER_USER);
    let res = if args.stub {
        eprintln!("starting the in-process stub upstream…");
        rt.block_on(async {
            let stub = stub::start(&work.path().join("stub")).await?;
            run(&args, (stub.port, stub.ca.as_path()), work.path()).await
        })
    } else {
        eprintln!("starting ejabberd…");
        let ej = Ejabberd::start(work.path().join("ejabberd"))?;
        let mut users = Vec::new();
        for i in 0..args.pairs {
            users.push(format!("alice{i}"));
            users.push(format!("bob{i}"));
        }
        for side in ["d", "p"] {
            users.extend((0..idle_users).map(|i| format!("idle{side}{i}")));
        }
        eprintln!("registering {} users…", users.len());
        ej.register_all(&users)?;
        let res = rt.block_on(run(&args, (ej.port, ej.ca.as_path()), work.path()));
        // Proxies and clients end with the runtime, before ejabberd stops.
        drop(rt);
        drop(ej);
        res
    };
    let (direct, proxied, mem) = res?;
    report(&args, direct, proxied, mem, started.elapsed());
    Ok(())
}

/// Raises the soft limit on open files to the hard one: every proxied
/// idle connection holds up to four descriptors in this process (client,
/// proxy client leg, proxy upstream leg, and the stub's end).
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            eprintln!("could not raise the open-files limit: {e}");
        }
    }
}

/// (idle connections, RSS delta KiB direct, RSS delta KiB through proxy A).
type Mem = Vec<(usize, i64, i64)>;

async fn run(args: &Args, up: (u16, &Path), work: &Path) -> Result<(Figures, Figures, Mem)> {
    let (n, m) = (args.pairs, args.messages);

    eprintln!("direct: {n} pairs × {m} messages…");
    let mut direct = Figures::default();
    let ej_end = up;
    let pairs = login_pairs(n, ej_end, ej_end, &mut direct.login).await?;
    drop(exchange(pairs, m, &mut direct).await?);
    relogin(n, ej_end, ej_end, &mut direct.relogin).await?;

    eprintln!("through two proxies: {n} pairs × {m} messages…");
    let pa = Proxy::start(up, &work.join("proxy-a"), args).await?;
    let pb = Proxy::start(up, &work.join("proxy-b"), args).await?;
    let mut proxied = Figures::default();
    let mut pairs = login_pairs(
        n,
        (pa.port, pa.ca.as_path()),
        (pb.port, pb.ca.as_path()),
        &mut proxied.login,
    )
    .await?;
    // First message of each pair: held by proxy A until the AKE is done.
    for p in &mut pairs {
        let t = Instant::now();
        p.a.send_stamped(&p.b_jid, "first", 0).await?;
        p.b.recv_stamped("first").await?;
        proxied.setup.push(t.elapsed());
    }
    drop(exchange(pairs, m, &mut proxied).await?);
    relogin(
        n,
        (pa.port, pa.ca.as_path()),
        (pb.port, pb.ca.as_path()),
        &mut proxied.relogin,
    )
    .await?;

    let mut mem = Vec::new();
    if args.idle > 0 {
        let steps: Vec<usize> = [1, 100, 1000]
            .into_iter()
            .filter(|&k| k < args.idle)
            .chain([args.idle])
            .collect();
        // Direct first, then through proxy A, all held open to the end so
        // the second set cannot reuse memory the first one freed.
        let mut held = Vec::new();
        let mut deltas = Vec::new();
        for (side, end) in [("d", up), ("p", (pa.port, pa.ca.as_path()))] {
            eprintln!(
                "memory: up to {} idle connections {}…",
                args.idle,
                if side == "d" {
                    "directly"
                } else {
                    "through proxy A"
                }
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rss0 = vm_rss_kib()?;
            let mut row = Vec::new();
            let mut k = 0;
            for &target in &steps {
                let mut tasks = tokio::task::JoinSet::new();
                while k < target {
                    let (user, res) = (
                        format!("idle{side}{}", k / SESSIONS_PER_USER),
                        format!("r{}", k % SESSIONS_PER_USER),
                    );
                    let ca = end.1.to_path_buf();
                    let port = end.0;
                    tasks.spawn(async move { login(port, &ca, &user, &res).await });
                    k += 1;
                    // At most 10 logins in flight.
                    if tasks.len() >= 10 {
                        held.push(tasks.join_next().await.context("join")???);
                    }
                }
                while let Some(c) = tasks.join_next().await {
                    held.push(c??);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                row.push(vm_rss_kib()? as i64 - rss0 as i64);
            }
            deltas.push(row);
        }
        for (i, &k) in steps.iter().enumerate() {
            mem.push((k, deltas[0][i], deltas[1][i]));
        }
        drop(held);
    }
    drop((pa, pb));
    Ok((direct, proxied, mem))
}

fn report(args: &Args, mut d: Figures, mut p: Figures, mem: Mem, total: Duration) {
    let (n, m) = (args.pairs, args.messages);
    println!();
    println!("o2tr-proxy load test: {n} pairs, {m} alternating + {m} burst messages per pair");
    if args.stub {
        println!(
            "(loopback, an in-process STUB upstream instead of a server — not ejabberd —, \
             two in-process proxies with OTR policy Always)"
        );
    } else {
        println!("(loopback, one ejabberd, two in-process proxies with OTR policy Always)");
    }
    println!(
        "(proxy state: {})",
        if args.memory_store {
            "MemoryStore, nothing written to disk"
        } else if args.wipe_now {
            "SqliteStore on disk, synchronous=FULL, checkpoint inside every wiping call"
        } else {
            "SqliteStore on disk, synchronous=FULL (acks NORMAL), wipe checkpoint each tick"
        }
    );
    println!();
    println!("| figure | direct | through 2 proxies | added |");
    println!("|---|---|---|---|");
    let row = |name: &str, a: Duration, b: Duration| {
        println!(
            "| {name} | {} | {} | {} |",
            ms(a),
            ms(b),
            signed_ms(b.as_secs_f64() - a.as_secs_f64())
        );
    };
    let (d50, p50) = (pct(&mut d.alt, 0.5), pct(&mut p.alt, 0.5));
    let (d99, p99) = (pct(&mut d.alt, 0.99), pct(&mut p.alt, 0.99));
    row("alternating latency p50", d50, p50);
    row("alternating latency p99", d99, p99);
    let (d50, p50) = (pct(&mut d.oneway, 0.5), pct(&mut p.oneway, 0.5));
    let (d99, p99) = (pct(&mut d.oneway, 0.99), pct(&mut p.oneway, 0.99));
    row(
        "one-way, one at a time (no ratchet step) latency p50",
        d50,
        p50,
    );
    row(
        "one-way, one at a time (no ratchet step) latency p99",
        d99,
        p99,
    );
    let (d50, p50) = (pct(&mut d.burst, 0.5), pct(&mut p.burst, 0.5));
    let (d99, p99) = (pct(&mut d.burst, 0.99), pct(&mut p.burst, 0.99));
    row("burst latency p50", d50, p50);
    row("burst latency p99", d99, p99);
    row(
        "login, first of the account (proxy: + OTR key generation), median",
        pct(&mut d.login, 0.5),
        pct(&mut p.login, 0.5),
    );
    row(
        "login, account known, median",
        pct(&mut d.relogin, 0.5),
        pct(&mut p.relogin, 0.5),
    );
    println!(
        "| alternating throughput ({n} pairs in parallel) | {:.0} msg/s | {:.0} msg/s | |",
        d.alt_rate, p.alt_rate
    );
    println!(
        "| burst throughput ({n} pairs in parallel) | {:.0} msg/s | {:.0} msg/s | |",
        d.burst_rate, p.burst_rate
    );
    println!(
        "| burst: last message sent / last received (after burst start) | {} / {} | {} / {} | |",
        ms(pct(&mut d.burst_sent, 1.0)),
        ms(d.burst_elapsed),
        ms(pct(&mut p.burst_sent, 1.0)),
        ms(p.burst_elapsed)
    );
    println!(
        "| OTR set-up: AKE + first message, median / max of {} | | {} / {} | |",
        p.setup.len(),
        ms(pct(&mut p.setup, 0.5)),
        ms(pct(&mut p.setup, 1.0))
    );
    if !mem.is_empty() {
        println!();
        println!(
            "| idle connections | RSS delta direct | through proxy A | proxy's share per connection |"
        );
        println!("|---|---|---|---|");
        for (k, d, p) in &mem {
            println!(
                "| {k} | {d} KiB | {p} KiB | {:.1} KiB |",
                (p - d) as f64 / (*k).max(1) as f64
            );
        }
    }
    println!();
    println!(
        "samples: {} latencies per cell; first logins: {} direct, {} proxied; \
         repeat logins: {} direct, {} proxied; run took {:.1} s",
        n * m,
        d.login.len(),
        p.login.len(),
        d.relogin.len(),
        p.relogin.len(),
        total.as_secs_f64()
    );
}
