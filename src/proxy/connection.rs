//! One client connection: negotiation, then the two-way relay.
//!
//! Negotiation: the client's first header names the domain; the upstream is
//! connected and secured; the client gets our header and STARTTLS-only
//! features and does its TLS handshake. Relay: the client's post-TLS header
//! is forwarded to the server as a header we build with its attributes; the
//! server's header and (filtered) features come back; SASL passes through;
//! at `<success/>` both framers restart in the same step (the xmpp-rs
//! stream-reset race); the bind result gives the account JID; after that
//! `<message>` stanzas go through the hook.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tracing::Instrument;

use super::hook::{Incoming, Outgoing, StanzaHook};
use super::{Shared, upstream};
use crate::xmpp::element::{NsScope, escape_attr};
use crate::xmpp::{
    Element, Frame, Framer, FramerConfig, FramerError, Jid, StreamHeader, features, ns, stanza,
};

const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Any byte stream.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LegError {
    #[error("connection closed")]
    Closed,
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Framer(#[from] FramerError),
}

/// One side of the proxy: a byte stream and its framer.
pub(crate) struct Leg<S> {
    io: S,
    pub(crate) framer: Framer,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leg<S> {
    pub(crate) fn new(io: S, cfg: FramerConfig) -> Leg<S> {
        Leg {
            io,
            framer: Framer::new(cfg),
            buf: vec![0u8; 16 * 1024],
        }
    }

    /// Reads once and feeds the framer. Cancel-safe. `Ok(0)` is EOF.
    pub(crate) async fn read_some(&mut self) -> io::Result<usize> {
        let n = self.io.read(&mut self.buf).await?;
        if let Some(b) = self.buf.get(..n) {
            self.framer.push(b);
        }
        Ok(n)
    }

    pub(crate) async fn next_frame(&mut self) -> Result<Frame, LegError> {
        loop {
            if let Some(f) = self.framer.next()? {
                return Ok(f);
            }
            if self.read_some().await? == 0 {
                return Err(LegError::Closed);
            }
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    pub(crate) fn into_parts(self) -> (S, Framer) {
        (self.io, self.framer)
    }

    /// Best effort: write `bytes`, then close (TLS close_notify), bounded in time.
    async fn close_with(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let _ = self.send(bytes).await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// Per-connection context for logging.
pub(crate) struct Ctx {
    id: u64,
    debug: bool,
    plaintext: bool,
    fcfg: FramerConfig,
}

impl Ctx {
    pub(crate) fn framer_config(&self) -> FramerConfig {
        self.fcfg
    }

    pub(crate) fn log_frame(&self, arrow: &str, bytes: &[u8]) {
        if self.debug && tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(conn = self.id, "{arrow} {}", redact(bytes, self.plaintext));
        }
    }

    pub(crate) fn log_frame_of(&self, arrow: &str, f: &Frame) {
        if self.debug && tracing::enabled!(tracing::Level::DEBUG) {
            match f {
                Frame::StreamHeader(h) => self.log_frame(arrow, &h.raw),
                Frame::XmlDecl(b)
                | Frame::Stanza(b)
                | Frame::Whitespace(b)
                | Frame::StreamEnd(b) => self.log_frame(arrow, b),
            }
        }
    }
}

/// A stanza for the log: bodies, subjects and SASL payloads redacted
/// unless `plaintext`.
fn redact(bytes: &[u8], plaintext: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    if plaintext || !text.starts_with('<') || text.starts_with("<?") || text.starts_with("</") {
        return text.into_owned();
    }
    let scope = NsScope::client_stream();
    match Element::parse(bytes, &scope) {
        Ok(mut el) => {
            redact_el(&mut el);
            el.to_xml(&scope)
        }
        // Headers and anything unparsable: say how long, not what.
        Err(_) if text.contains("stream") && !text.ends_with("/>") => text.into_owned(),
        Err(_) => format!("[unparsed {} bytes]", bytes.len()),
    }
}

/// OTR messages (data, fragments, queries, errors) are ciphertext or
/// protocol text: safe to log, and what one wants to see when debugging.
fn is_otr_text(text: &str) -> bool {
    text.trim_start().starts_with("?OTR")
}

fn redact_el(el: &mut Element) {
    let plaintext_carrier = match el.name() {
        "body" | "subject" => !is_otr_text(&el.text()),
        // XHTML-IM repeats the body; OOB carries a URL and description.
        "html" => el.ns() == ns::XHTML_IM,
        "x" => el.ns() == ns::OOB,
        _ => false,
    };
    let secret = plaintext_carrier
        || (el.ns() == ns::SASL
            && matches!(el.name(), "auth" | "response" | "challenge" | "success"));
    if secret {
        let n = el.text().len();
        if n > 0 || el.children().next().is_some() {
            el.set_text(&format!("[redacted {n} bytes]"));
        }
        return;
    }
    for c in el.children_mut() {
        redact_el(c);
    }
}

/// A stream header we send, with `xmlns='jabber:client'` and `stream:`.
pub(crate) fn stream_header(
    to: Option<&str>,
    from: Option<&str>,
    id: Option<&str>,
    lang: Option<&str>,
) -> String {
    let mut s = format!(
        "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' version='1.0'",
        ns::CLIENT,
        ns::STREAMS
    );
    for (k, v) in [("to", to), ("from", from), ("id", id), ("xml:lang", lang)] {
        if let Some(v) = v {
            s.push_str(&format!(" {k}='{}'", escape_attr(v)));
        }
    }
    s.push('>');
    s
}

fn stream_error(condition: &str, text: Option<&str>) -> String {
    let mut s = format!("<stream:error><{condition} xmlns='{}'/>", ns::STREAM_ERRORS);
    if let Some(t) = text {
        s.push_str(&format!(
            "<text xmlns='{}'>{}</text>",
            ns::STREAM_ERRORS,
            crate::xmpp::element::escape_text(t)
        ));
    }
    s.push_str("</stream:error></stream:stream>");
    s
}

fn random_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:016x}", h.finish())
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("client closed the connection")]
    ClientGone,
    #[error("client I/O: {0}")]
    ClientIo(io::Error),
    #[error("client protocol violation ({1}): {0}")]
    ClientProtocol(String, &'static str),
    #[error("server closed the connection")]
    ServerGone,
    #[error("server I/O: {0}")]
    ServerIo(io::Error),
    #[error("server protocol violation ({1}): {0}")]
    ServerProtocol(String, &'static str),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("client TLS: {0}")]
    ClientTls(io::Error),
    #[error("timed out during negotiation")]
    Timeout,
    #[error("upstream link dead: no answer to a ping within {0:?}")]
    ServerSilent(Duration),
}

fn client_leg_err(e: LegError) -> ConnError {
    match e {
        LegError::Closed => ConnError::ClientGone,
        LegError::Io(e) => ConnError::ClientIo(e),
        LegError::Framer(f) => ConnError::ClientProtocol(f.to_string(), f.condition()),
    }
}

/// Runs one connection to its end; never panics the proxy.
pub(crate) async fn handle(
    id: u64,
    socket: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let span = tracing::info_span!("conn", conn = id);
    async move {
        tracing::info!(%peer, "client connected");
        let _ = socket.set_nodelay(true);
        let mut hook = shared.config.hooks.new_hook();
        let ctx = Ctx {
            id,
            debug: shared.config.debug_packets,
            plaintext: shared.config.log_plaintext,
            fcfg: FramerConfig {
                max_stanza_bytes: shared.config.max_stanza_bytes,
                ..FramerConfig::default()
            },
        };
        let res = tokio::select! {
            r = negotiate(&ctx, socket, &shared) => match r {
                Ok((client, server, pending)) => {
                    let mut relay = Relay {
                        ctx: &ctx,
                        hook: &mut *hook,
                        client,
                        server,
                        client_scope: NsScope::client_stream(),
                        to_client_scope: NsScope::client_stream(),
                        bind_ids: Vec::new(),
                        sasl_pending: false,
                        bound: None,
                        want_sm: shared.config.upstream_sm,
                        sm_offered: false,
                        sm: None,
                        liveness: Liveness::new(
                            shared.config.upstream_ping_interval,
                            shared.config.upstream_ping_timeout,
                        ),
                        batch: Vec::new(),
                    };
                    relay.run(pending, &mut shutdown).await
                }
                Err(e) => Err(e),
            },
            _ = shutdown.recv() => Ok("shutdown during negotiation"),
        };
        hook.disconnected(SystemTime::now());
        match res {
            Ok(why) => tracing::info!("connection closed: {why}"),
            Err(e) => tracing::warn!(cause = %e, "connection ended"),
        }
    }
    .instrument(span)
    .await
}

type BoxLeg = Leg<Box<dyn Io>>;

async fn with_timeout<T>(
    f: impl std::future::Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    tokio::time::timeout(NEGOTIATION_TIMEOUT, f)
        .await
        .map_err(|_| ConnError::Timeout)?
}

async fn negotiate(
    ctx: &Ctx,
    socket: TcpStream,
    shared: &Shared,
) -> Result<(BoxLeg, BoxLeg, Option<StreamHeader>), ConnError> {
    let mut client = Leg::new(socket, ctx.fcfg);
    let header = with_timeout(async {
        loop {
            let f = client.next_frame().await.map_err(client_leg_err)?;
            ctx.log_frame_of("C→P", &f);
            if let Frame::StreamHeader(h) = f {
                return Ok(h);
            }
        }
    })
    .await;
    let header = match header {
        Ok(h) => h,
        Err(e) => {
            if let ConnError::ClientProtocol(_, cond) = &e {
                let msg = format!(
                    "{}{}",
                    stream_header(None, None, Some(&random_id()), None),
                    stream_error(cond, None)
                );
                client.close_with(msg.as_bytes()).await;
            }
            return Err(e);
        }
    };
    let domain = header.to().and_then(|t| Jid::parse(t).ok());
    let domain = match domain {
        Some(j) if j.local().is_none() && j.resource().is_none() => j.domain().to_owned(),
        _ => {
            let msg = format!(
                "{}{}",
                stream_header(None, None, Some(&random_id()), None),
                stream_error(
                    "host-unknown",
                    Some("the stream header needs to='your domain'")
                )
            );
            client.close_with(msg.as_bytes()).await;
            return Err(ConnError::ClientProtocol(
                "no usable 'to'".into(),
                "host-unknown",
            ));
        }
    };
    let our_header = stream_header(None, Some(&domain), Some(&random_id()), Some("en"));
    let server = match upstream::connect(ctx, shared, &domain, header.lang()).await {
        Ok(s) => s,
        Err(e) => {
            let msg = format!(
                "{our_header}{}",
                stream_error(
                    "remote-connection-failed",
                    Some("the proxy could not reach your server")
                )
            );
            ctx.log_frame("P→C", msg.as_bytes());
            client.close_with(msg.as_bytes()).await;
            return Err(ConnError::Upstream(e));
        }
    };
    let server: BoxLeg = Leg::new(Box::new(server.into_parts().0), ctx.fcfg);
    let Some(acceptor) = &shared.acceptor else {
        // Plaintext loopback client: its first header goes straight through.
        let (io, framer) = client.into_parts();
        let client = Leg {
            io: Box::new(io) as Box<dyn Io>,
            framer,
            buf: vec![0u8; 16 * 1024],
        };
        return Ok((client, server, Some(header)));
    };
    let offer = format!("{our_header}{}", features::proxy_starttls_features(true));
    ctx.log_frame("P→C", offer.as_bytes());
    client
        .send(offer.as_bytes())
        .await
        .map_err(ConnError::ClientIo)?;
    let step = with_timeout(async {
        loop {
            let f = client.next_frame().await.map_err(client_leg_err)?;
            ctx.log_frame_of("C→P", &f);
            match f {
                Frame::Whitespace(_) | Frame::XmlDecl(_) => {}
                Frame::Stanza(raw) => {
                    let el = Element::parse(&raw, &NsScope::from_header(&header))
                        .map_err(|e| ConnError::ClientProtocol(e.to_string(), e.condition()))?;
                    if el.is("starttls", ns::TLS) {
                        return Ok(());
                    }
                    return Err(ConnError::ClientProtocol(
                        "STARTTLS required".into(),
                        "policy-violation",
                    ));
                }
                Frame::StreamHeader(_) | Frame::StreamEnd(_) => return Err(ConnError::ClientGone),
            }
        }
    })
    .await;
    if let Err(e) = step {
        if let ConnError::ClientProtocol(_, cond) = &e {
            client.close_with(stream_error(cond, None).as_bytes()).await;
        }
        return Err(e);
    }
    let proceed = format!("<proceed xmlns='{}'/>", ns::TLS);
    ctx.log_frame("P→C", proceed.as_bytes());
    client
        .send(proceed.as_bytes())
        .await
        .map_err(ConnError::ClientIo)?;
    let (tcp, framer) = client.into_parts();
    if framer.buffered() != 0 {
        return Err(ConnError::ClientProtocol(
            "plaintext after <starttls/>".into(),
            "policy-violation",
        ));
    }
    let tls = tokio::time::timeout(NEGOTIATION_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| ConnError::Timeout)?
        .map_err(ConnError::ClientTls)?;
    tracing::info!("client TLS established");
    let client: BoxLeg = Leg::new(Box::new(tls), ctx.fcfg);
    Ok((client, server, None))
}

struct Relay<'a> {
    ctx: &'a Ctx,
    hook: &'a mut dyn StanzaHook,
    client: BoxLeg,
    server: BoxLeg,
    /// Bindings of the client's stream (for parsing its stanzas).
    client_scope: NsScope,
    /// Bindings of the header the client received (the server's).
    to_client_scope: NsScope,
    bind_ids: Vec<String>,
    /// The client sent `<auth/>` and no `<success/>` or `<failure/>` has
    /// come back yet: the only time a SASL success may restart the streams.
    sasl_pending: bool,
    bound: Option<Jid>,
    /// `ProxyConfig::upstream_sm`.
    want_sm: bool,
    /// The server's post-auth features offered `urn:xmpp:sm:3`.
    sm_offered: bool,
    /// Upstream SM state once the proxy sent `<enable/>`.
    sm: Option<UpstreamSm>,
    /// Dead-link detection on the upstream leg.
    liveness: Liveness,
    /// Hooked stanzas read but not yet handed to the hook: they go as one
    /// [`StanzaHook::batch`] (one durable commit for all, issue 8) once
    /// both framers are drained, or before anything else is written, so
    /// the order of what leaves the proxy is the order things came in.
    batch: Vec<Incoming>,
}

/// How many ping ids are remembered so that late answers are still
/// consumed (never shown to the client).
const PING_IDS_KEPT: usize = 8;

/// Upstream dead-link detection: ping after `interval` of silence, give up
/// `timeout` after a ping that nothing answered. Any byte from the server
/// counts as an answer (a busy link needs no ping).
#[derive(Debug)]
struct Liveness {
    interval: Duration,
    timeout: Duration,
    /// When the server last sent anything.
    last_heard: Instant,
    /// When the unanswered ping was sent.
    pinged_at: Option<Instant>,
    /// Ids of our XEP-0199 pings, newest last, whose results are consumed.
    ids: VecDeque<String>,
    next_id: u64,
}

/// What the relay should do about the upstream's silence.
#[derive(Debug, PartialEq, Eq)]
enum LivenessStep {
    Nothing,
    Ping,
    Dead,
}

impl Liveness {
    fn new(interval: Duration, timeout: Duration) -> Liveness {
        Liveness {
            interval,
            timeout,
            last_heard: Instant::now(),
            pinged_at: None,
            ids: VecDeque::new(),
            next_id: 1,
        }
    }

    fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.pinged_at = None;
    }

    fn step(&self, now: Instant) -> LivenessStep {
        if self.interval.is_zero() {
            return LivenessStep::Nothing;
        }
        match self.pinged_at {
            Some(at) if now.saturating_duration_since(at) >= self.timeout => LivenessStep::Dead,
            Some(_) => LivenessStep::Nothing,
            None if now.saturating_duration_since(self.last_heard) >= self.interval => {
                LivenessStep::Ping
            }
            None => LivenessStep::Nothing,
        }
    }

    /// Records a ping sent now; returns the id for an XEP-0199 ping.
    fn pinged(&mut self, now: Instant) -> String {
        self.pinged_at = Some(now);
        let id = format!("o2tr-ping-{}-{}", self.next_id, random_id());
        self.next_id += 1;
        if self.ids.len() == PING_IDS_KEPT {
            self.ids.pop_front();
        }
        self.ids.push_back(id.clone());
        id
    }

    /// True (and forgotten) if `el` answers one of our pings.
    fn consume_answer(&mut self, el: &Element) -> bool {
        if !el.is("iq", ns::CLIENT) || !matches!(el.attr("type"), Some("result" | "error")) {
            return false;
        }
        let Some(id) = el.attr("id") else {
            return false;
        };
        match self.ids.iter().position(|i| i == id) {
            Some(pos) => {
                self.ids.remove(pos);
                true
            }
            None => false,
        }
    }
}

/// XEP-0198 counters of the upstream leg (the proxy is the SM client).
#[derive(Debug, Default)]
struct UpstreamSm {
    /// The server answered `<enabled/>`.
    enabled: bool,
    /// Stanzas received from the server since `<enabled/>` (mod 2^32).
    h_in: u32,
    /// Stanzas sent to the server since `<enable/>` (mod 2^32).
    h_out: u32,
    /// The server's last acknowledged count.
    acked_out: u32,
}

impl UpstreamSm {
    /// The count to acknowledge: everything received. The hook committed
    /// each stanza before the next one is read, incoming OTR fragments
    /// included (the store's fragment table), so nothing acknowledged is
    /// lost with the proxy. Holding acks back until a fragment run is
    /// complete made the server re-route fragments already stored after a
    /// crash, and ejabberd re-routes them concurrently with the sender's
    /// newer messages: two fragment runs interleaved, neither reassembled,
    /// both messages lost (chaos campaign, fault between fragments).
    fn ack_h(&self) -> u32 {
        self.h_in
    }

    /// Counts one inbound stanza.
    fn count_in(&mut self) {
        self.h_in = self.h_in.wrapping_add(1);
    }
}

/// True for a stanza XEP-0198 counts.
fn is_counted_stanza(el: &Element) -> bool {
    el.ns() == ns::CLIENT && matches!(el.name(), "message" | "presence" | "iq")
}

enum Flow {
    Go,
    Stop(&'static str),
}

impl Relay<'_> {
    async fn run(
        &mut self,
        pending: Option<StreamHeader>,
        shutdown: &mut broadcast::Receiver<()>,
    ) -> Result<&'static str, ConnError> {
        let res = self.relay(pending, shutdown).await;
        if let Err(e) = &res {
            // Stanzas read before the failure are handled as they would
            // have been one by one (best effort: a leg may be gone).
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.flush_batch()).await;
            self.cleanup(e).await;
        }
        res
    }

    async fn cleanup(&mut self, e: &ConnError) {
        let end = b"</stream:stream>";
        match e {
            ConnError::ClientGone | ConnError::ClientIo(_) => {
                // What the proxy received was written to the client.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.send_ack()).await;
                self.ctx.log_frame("P→S", end);
                self.server.close_with(end).await;
            }
            ConnError::ClientProtocol(_, cond) => {
                let se = stream_error(cond, None);
                self.ctx.log_frame("P→C", se.as_bytes());
                self.client.close_with(se.as_bytes()).await;
                self.ctx.log_frame("P→S", end);
                self.server.close_with(end).await;
            }
            ConnError::ServerProtocol(_, cond) => {
                let to_server = stream_error(cond, None);
                self.ctx.log_frame("P→S", to_server.as_bytes());
                self.server.close_with(to_server.as_bytes()).await;
                let se = stream_error("remote-connection-failed", None);
                self.ctx.log_frame("P→C", se.as_bytes());
                self.client.close_with(se.as_bytes()).await;
            }
            _ => {
                let se = stream_error("remote-connection-failed", None);
                self.ctx.log_frame("P→C", se.as_bytes());
                self.client.close_with(se.as_bytes()).await;
            }
        }
    }

    async fn relay(
        &mut self,
        pending: Option<StreamHeader>,
        shutdown: &mut broadcast::Receiver<()>,
    ) -> Result<&'static str, ConnError> {
        if let Some(h) = pending {
            self.client_header(&h).await?;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            while let Some(f) = self
                .client
                .framer
                .next()
                .map_err(|e| ConnError::ClientProtocol(e.to_string(), e.condition()))?
            {
                self.ctx.log_frame_of("C→P", &f);
                if let Flow::Stop(why) = self.on_client(f).await? {
                    return Ok(why);
                }
            }
            while let Some(f) = self
                .server
                .framer
                .next()
                .map_err(|e| ConnError::ServerProtocol(e.to_string(), e.condition()))?
            {
                self.ctx.log_frame_of("S→P", &f);
                if let Flow::Stop(why) = self.on_server(f).await? {
                    return Ok(why);
                }
            }
            // Everything read so far is parsed: one hook call (one commit)
            // for the hooked stanzas among it, before waiting for more.
            self.flush_batch().await?;
            tokio::select! {
                r = self.client.read_some() => match r {
                    Ok(0) => return Err(ConnError::ClientGone),
                    Ok(_) => {}
                    Err(e) => return Err(ConnError::ClientIo(e)),
                },
                r = self.server.read_some() => match r {
                    Ok(0) => return Err(ConnError::ServerGone),
                    Ok(_) => self.liveness.heard(Instant::now()),
                    Err(e) => return Err(ConnError::ServerIo(e)),
                },
                _ = tick.tick() => {
                    if self.bound.is_some() {
                        self.check_liveness().await?;
                        let outs = self.hook.tick(SystemTime::now());
                        self.dispatch(outs).await?;
                    }
                }
                _ = shutdown.recv() => {
                    let se = stream_error("system-shutdown", None);
                    self.ctx.log_frame("P→C", se.as_bytes());
                    self.client.close_with(se.as_bytes()).await;
                    self.ctx.log_frame("P→S", b"</stream:stream>");
                    self.server.close_with(b"</stream:stream>").await;
                    return Ok("proxy shutdown");
                }
            }
        }
    }

    /// The client closed its stream (RFC 6120 §4.4): the server may still
    /// send stanzas until it closes too. Relay them (hook included) until
    /// the server's `</stream:stream>`, EOF or a short timeout, then close
    /// both legs. With upstream SM, messages are not relayed: a client that
    /// closed its stream may never show them, and left unacknowledged the
    /// server re-routes them (to offline storage) when the session ends.
    async fn drain_server_after_client_close(&mut self) {
        let sm_on = self.sm.as_ref().is_some_and(|sm| sm.enabled);
        let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
            loop {
                let f = match self.server.next_frame().await {
                    Ok(f) => f,
                    Err(_) => return,
                };
                self.ctx.log_frame_of("S→P", &f);
                if let Frame::StreamEnd(b) = f {
                    self.ctx.log_frame("P→C", &b);
                    let _ = self.client.send(&b).await;
                    return;
                }
                if sm_on && self.bound.is_some() {
                    if let Frame::Stanza(raw) = &f {
                        let is_msg = Element::parse(raw, &self.to_client_scope)
                            .is_ok_and(|el| stanza::is_message(&el));
                        if is_msg {
                            tracing::debug!("message after the client's close left unacknowledged");
                            continue;
                        }
                    }
                }
                // One by one here: the next read may wait for the timeout.
                if self.on_server(f).await.is_err() || self.flush_batch().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::debug!("server did not close its stream in time");
            self.ctx.log_frame("P→C", b"</stream:stream>");
            let _ = self.client.send(b"</stream:stream>").await;
        }
        self.server.close_with(b"").await;
        self.client.close_with(b"").await;
    }

    /// Pings a silent upstream, or gives up on one that did not answer.
    async fn check_liveness(&mut self) -> Result<(), ConnError> {
        let now = Instant::now();
        match self.liveness.step(now) {
            LivenessStep::Nothing => Ok(()),
            LivenessStep::Dead => Err(ConnError::ServerSilent(self.liveness.timeout)),
            LivenessStep::Ping => {
                if self.sm.as_ref().is_some_and(|sm| sm.enabled) {
                    // The server must answer `<r/>` with `<a/>` (consumed
                    // in on_server_sm); no stanza counted.
                    self.liveness.pinged(now);
                    return self.request_ack().await;
                }
                let id = self.liveness.pinged(now);
                let to = self
                    .bound
                    .as_ref()
                    .map(|j| format!(" to='{}'", escape_attr(j.domain())))
                    .unwrap_or_default();
                let ping = format!(
                    "<iq type='get' id='{id}'{to}><ping xmlns='{}'/></iq>",
                    ns::PING
                );
                if let Some(sm) = self.sm.as_mut() {
                    sm.h_out = sm.h_out.wrapping_add(1);
                }
                self.send_server(ping.as_bytes()).await
            }
        }
    }

    fn count_out(&mut self, el: &Element) {
        if is_counted_stanza(el) {
            if let Some(sm) = self.sm.as_mut() {
                sm.h_out = sm.h_out.wrapping_add(1);
            }
        }
    }

    /// After bind: enable XEP-0198 upstream if configured and offered.
    async fn enable_upstream_sm(&mut self) -> Result<(), ConnError> {
        if !self.want_sm || !self.sm_offered || self.sm.is_some() {
            return Ok(());
        }
        // No resume='true': the proxy never resumes (a reconnecting client
        // gets a new session), and a session kept for resumption makes
        // ejabberd, when the window ends while the user's new session is
        // online, bounce the unacknowledged messages back to their senders
        // (resend_on_timeout: if_offline) instead of storing them. Without
        // resumption the dead session ends at once and they go to offline
        // storage (found by the chaos campaign).
        let enable = format!("<enable xmlns='{}'/>", ns::SM3);
        self.send_server(enable.as_bytes()).await?;
        self.sm = Some(UpstreamSm::default());
        Ok(())
    }

    /// Sends `<a h/>` with the inbound count, if SM is on.
    async fn send_ack(&mut self) -> Result<(), ConnError> {
        let Some(h) = self
            .sm
            .as_ref()
            .filter(|sm| sm.enabled)
            .map(|sm| sm.ack_h())
        else {
            return Ok(());
        };
        let a = format!("<a xmlns='{}' h='{h}'/>", ns::SM3);
        self.send_server(a.as_bytes()).await
    }

    /// Consumes the server's XEP-0198 nonzas (they never reach the client,
    /// which is not offered SM). `Some` if `el` was one.
    async fn on_server_sm(&mut self, el: &Element) -> Result<Option<Flow>, ConnError> {
        if el.ns() != ns::SM3 && el.ns() != ns::SM2 {
            return Ok(None);
        }
        match (el.name(), self.sm.as_mut()) {
            ("enabled", Some(sm)) => {
                sm.enabled = true;
                tracing::info!(
                    resume = el.attr("resume").unwrap_or("false"),
                    max = el.attr("max").unwrap_or("-"),
                    "upstream stream management enabled"
                );
            }
            ("failed", Some(_)) => {
                tracing::warn!("the server refused stream management");
                self.sm = None;
                self.hook.server_acks_off();
            }
            ("r", Some(_)) => self.send_ack().await?,
            ("a", Some(sm)) => {
                match el.attr("h").and_then(|h| h.parse::<u32>().ok()) {
                    // h may not run ahead of what we sent (mod 2^32).
                    Some(h) if sm.h_out.wrapping_sub(h) <= sm.h_out.wrapping_sub(sm.acked_out) => {
                        sm.acked_out = h;
                        self.hook.server_acked(h);
                    }
                    _ => {
                        return Err(ConnError::ServerProtocol(
                            "bad stream management ack".into(),
                            "undefined-condition",
                        ));
                    }
                }
            }
            _ => tracing::debug!(name = el.name(), "stream management nonza dropped"),
        }
        Ok(Some(Flow::Go))
    }

    /// Writes to the server, after the pending batch (order is kept).
    async fn send_server(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.flush_batch().await?;
        self.write_server(bytes).await
    }

    /// Writes to the client, after the pending batch (order is kept).
    async fn send_client(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.flush_batch().await?;
        self.write_client(bytes).await
    }

    async fn write_server(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.ctx.log_frame("P→S", bytes);
        self.server.send(bytes).await.map_err(ConnError::ServerIo)
    }

    async fn write_client(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.ctx.log_frame("P→C", bytes);
        self.client.send(bytes).await.map_err(ConnError::ClientIo)
    }

    /// Hands the pending hooked stanzas to the hook as one batch and
    /// writes what it returns.
    async fn flush_batch(&mut self) -> Result<(), ConnError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let outs = self.hook.batch(batch, SystemTime::now());
        self.dispatch(outs).await
    }

    async fn dispatch(&mut self, outs: Vec<Outgoing>) -> Result<(), ConnError> {
        let mut to_server = false;
        for o in outs {
            match o {
                Outgoing::ToClient(el) => {
                    let xml = el.to_xml(&self.to_client_scope);
                    self.write_client(xml.as_bytes()).await?;
                }
                Outgoing::ToServer(el) => {
                    let xml = el.to_xml(&NsScope::client_stream());
                    self.count_out(&el);
                    self.write_server(xml.as_bytes()).await?;
                    to_server = true;
                }
            }
        }
        match self.sm.as_ref() {
            // With SM, written is not delivered (a link can die without a
            // FIN): the hook learns what the server holds from its acks,
            // asked for at once so that they follow the messages closely.
            Some(sm) => {
                let (sent, enabled) = (sm.h_out, sm.enabled);
                self.hook.flushed_upstream(sent);
                if to_server && enabled {
                    // Written directly: the batch this came from is out.
                    let r = format!("<r xmlns='{}'/>", ns::SM3);
                    self.write_server(r.as_bytes()).await?;
                }
            }
            None => self.hook.flushed(),
        }
        Ok(())
    }

    /// Sends `<r/>`: the server answers with `<a h/>` (on_server_sm).
    async fn request_ack(&mut self) -> Result<(), ConnError> {
        let r = format!("<r xmlns='{}'/>", ns::SM3);
        self.send_server(r.as_bytes()).await
    }

    async fn client_header(&mut self, h: &StreamHeader) -> Result<(), ConnError> {
        self.client_scope = NsScope::from_header(h);
        let out = stream_header(h.to(), h.from(), None, h.lang());
        self.send_server(out.as_bytes()).await
    }

    async fn on_client(&mut self, f: Frame) -> Result<Flow, ConnError> {
        match f {
            Frame::XmlDecl(_) => {}
            Frame::StreamHeader(h) => self.client_header(&h).await?,
            Frame::Whitespace(b) => self.send_server(&b).await?,
            Frame::StreamEnd(_) => {
                // A clean end: acknowledge everything first, so the server
                // does not re-route what the client already got; and ask
                // for the server's count, so that what it holds of ours is
                // not re-sent by the next connection (its ack arrives
                // while draining).
                self.send_ack().await?;
                if self.sm.as_ref().is_some_and(|sm| sm.enabled) {
                    self.request_ack().await?;
                }
                self.send_server(b"</stream:stream>").await?;
                self.drain_server_after_client_close().await;
                return Ok(Flow::Stop("client closed the stream"));
            }
            Frame::Stanza(raw) => {
                let el = Element::parse(&raw, &self.client_scope)
                    .map_err(|e| ConnError::ClientProtocol(e.to_string(), e.condition()))?;
                if el.ns() == ns::SM2 || el.ns() == ns::SM3 {
                    // SM is stripped (see xmpp::features); never let it through.
                    if matches!(el.name(), "enable" | "resume") {
                        let failed = format!(
                            "<failed xmlns='{}'><feature-not-implemented xmlns='{}'/></failed>",
                            el.ns(),
                            ns::STANZAS
                        );
                        self.send_client(failed.as_bytes()).await?;
                    }
                    return Ok(Flow::Go);
                }
                // TLS is already up on both legs and the server speaks
                // SASL, not the client: these would desynchronise the
                // streams (RFC 6120 §5.4.3.3, §6.4).
                if el.ns() == ns::TLS
                    || (el.ns() == ns::SASL
                        && matches!(el.name(), "success" | "challenge" | "failure"))
                {
                    return Err(ConnError::ClientProtocol(
                        format!("unexpected <{}/> from the client", el.name()),
                        "policy-violation",
                    ));
                }
                if el.is("auth", ns::SASL) {
                    self.sasl_pending = self.bound.is_none();
                }
                if el.is("iq", ns::CLIENT)
                    && el.attr("type") == Some("set")
                    && el.has_child("bind", ns::BIND)
                {
                    if let Some(id) = el.attr("id") {
                        self.bind_ids.push(id.to_owned());
                    }
                }
                if self.bound.is_some() && stanza::is_hooked_from_client(&el) {
                    self.batch.push(Incoming::FromClient(el));
                } else {
                    self.count_out(&el);
                    self.send_server(&raw).await?;
                }
            }
        }
        Ok(Flow::Go)
    }

    async fn on_server(&mut self, f: Frame) -> Result<Flow, ConnError> {
        match f {
            Frame::XmlDecl(b) => self.send_client(&b).await?,
            Frame::StreamHeader(h) => {
                self.to_client_scope = NsScope::from_header(&h);
                self.send_client(&h.raw).await?;
            }
            Frame::Whitespace(b) => self.send_client(&b).await?,
            Frame::StreamEnd(b) => {
                self.flush_batch().await?;
                self.ctx.log_frame("P→C", &b);
                self.client.close_with(&b).await;
                self.server.close_with(b"</stream:stream>").await;
                return Ok(Flow::Stop("server closed the stream"));
            }
            Frame::Stanza(raw) => {
                let el = Element::parse(&raw, &self.to_client_scope)
                    .map_err(|e| ConnError::ServerProtocol(e.to_string(), e.condition()))?;
                if let Some(flow) = self.on_server_sm(&el).await? {
                    return Ok(flow);
                }
                if self.sm.as_ref().is_some_and(|sm| sm.enabled) && is_counted_stanza(&el) {
                    if let Some(sm) = self.sm.as_mut() {
                        sm.count_in();
                    }
                }
                if self.liveness.consume_answer(&el) {
                    // Our own ping's answer: the client never asked.
                    return Ok(Flow::Go);
                }
                if el.ns() == ns::TLS {
                    // The proxy never forwards <starttls/>: a <proceed/> or
                    // TLS <failure/> now is out of protocol.
                    return Err(ConnError::ServerProtocol(
                        format!("unexpected <{}/> from the server", el.name()),
                        "policy-violation",
                    ));
                }
                if el.is("failure", ns::SASL) {
                    self.sasl_pending = false;
                }
                if features::is_features(&el) {
                    self.sm_offered = el.has_child("sm", ns::SM3);
                    let mut el = el;
                    if features::filter_features(&mut el) {
                        let xml = el.to_xml(&self.to_client_scope);
                        self.send_client(xml.as_bytes()).await?;
                    } else {
                        self.send_client(&raw).await?;
                    }
                } else if el.is("success", ns::SASL) {
                    if !std::mem::take(&mut self.sasl_pending) {
                        // A success nobody asked for would restart the
                        // streams under the client's feet.
                        return Err(ConnError::ServerProtocol(
                            "SASL success without a pending <auth/>".into(),
                            "policy-violation",
                        ));
                    }
                    self.send_client(&raw).await?;
                    // Both streams restart here, in one step (RFC 6120 §6.4.6).
                    self.server.framer.reset();
                    self.client.framer.reset();
                    tracing::info!("SASL success; streams restart");
                } else if el.is("iq", ns::CLIENT) && el.attr("type") == Some("result") {
                    if self.bound.is_none()
                        && el
                            .attr("id")
                            .is_some_and(|i| self.bind_ids.iter().any(|b| b == i))
                    {
                        let jid = el
                            .get_child("bind", ns::BIND)
                            .and_then(|b| b.get_child("jid", ns::BIND))
                            .and_then(|j| Jid::parse(j.text().trim()).ok());
                        if let Some(jid) = jid {
                            tracing::info!(%jid, "resource bound");
                            self.hook.bound(&jid);
                            self.bound = Some(jid);
                            self.send_client(&raw).await?;
                            return self.enable_upstream_sm().await.map(|()| Flow::Go);
                        }
                    }
                    if self.bound.is_some() && stanza::is_hooked(&el) {
                        self.batch.push(Incoming::FromServer(el));
                    } else {
                        self.send_client(&raw).await?;
                    }
                } else if self.bound.is_some() && stanza::is_hooked(&el) {
                    self.batch.push(Incoming::FromServer(el));
                } else {
                    self.send_client(&raw).await?;
                }
            }
        }
        Ok(Flow::Go)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_bodies_and_sasl() {
        let m = redact(
            b"<message to='a@b'><body>secret words</body><thread>t</thread></message>",
            false,
        );
        assert!(!m.contains("secret"), "{m}");
        assert!(m.contains("[redacted 12 bytes]"), "{m}");
        let a = redact(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGJvYgBwYXNz</auth>",
            false,
        );
        assert!(!a.contains("AGJvYgBwYXNz"), "{a}");
        let c = redact(b"<message><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client'><body>inner</body></message></forwarded></sent></message>", false);
        assert!(!c.contains("inner"), "{c}");
        let p = redact(b"<message><body>shown</body></message>", true);
        assert!(p.contains("shown"));
        let o = redact(b"<message><body>?OTR:AAMDabc.</body></message>", false);
        assert!(o.contains("?OTR:AAMDabc."), "{o}");
        let x = redact(b"<message><body>?OTR:AAMD.</body><html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'><p>leak1</p></body></html><x xmlns='jabber:x:oob'><url>https://x/leak2</url></x></message>", false);
        assert!(!x.contains("leak1") && !x.contains("leak2"), "{x}");
    }

    #[test]
    fn liveness_pings_after_silence_and_gives_up_after_timeout() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Liveness::new(s(60), s(20));
        l.heard(t0);
        assert_eq!(l.step(t0 + s(59)), LivenessStep::Nothing);
        assert_eq!(l.step(t0 + s(60)), LivenessStep::Ping);
        let id = l.pinged(t0 + s(60));
        assert_eq!(l.step(t0 + s(79)), LivenessStep::Nothing);
        assert_eq!(l.step(t0 + s(80)), LivenessStep::Dead);
        // Any data clears the pending ping.
        l.heard(t0 + s(70));
        assert_eq!(l.step(t0 + s(80)), LivenessStep::Nothing);
        let scope = NsScope::client_stream();
        let answer = |typ: &str, id: &str| {
            Element::parse(format!("<iq type='{typ}' id='{id}'/>").as_bytes(), &scope).unwrap()
        };
        assert!(!l.consume_answer(&answer("result", "someone-else")));
        assert!(!l.consume_answer(&answer("get", &id)));
        assert!(l.consume_answer(&answer("error", &id)));
        assert!(!l.consume_answer(&answer("result", &id)), "consumed once");
        // Off when the interval is zero.
        let off = Liveness::new(Duration::ZERO, s(1));
        assert_eq!(off.step(t0 + s(3600)), LivenessStep::Nothing);
    }

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

    /// Reads from `io` until the text read so far contains `needle`;
    /// returns everything read.
    async fn read_until(io: &mut tokio::io::DuplexStream, seen: &mut String, needle: &str) {
        let mut buf = [0u8; 4096];
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while !seen.contains(needle) {
                let n = io.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
        .await;
        assert!(
            found.is_ok() && seen.contains(needle),
            "no {needle:?} in {seen:?}"
        );
    }

    /// Runs a bound relay between two in-memory legs, with `sm` as the
    /// upstream SM state, while `script` plays client and server.
    async fn with_relay<F, Fut>(sm: Option<UpstreamSm>, script: F) -> Result<&'static str, String>
    where
        F: FnOnce(tokio::io::DuplexStream, tokio::io::DuplexStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        with_relay_hook(sm, &mut super::super::PassThrough, script).await
    }

    /// [`with_relay`] with `hook` as the stanza hook.
    async fn with_relay_hook<F, Fut>(
        sm: Option<UpstreamSm>,
        hook: &mut dyn StanzaHook,
        script: F,
    ) -> Result<&'static str, String>
    where
        F: FnOnce(tokio::io::DuplexStream, tokio::io::DuplexStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (client_near, client_far) = tokio::io::duplex(64 * 1024);
        let (server_near, server_far) = tokio::io::duplex(64 * 1024);
        let ctx = Ctx {
            id: 1,
            debug: false,
            plaintext: false,
            fcfg: FramerConfig::default(),
        };
        let mut relay = Relay {
            ctx: &ctx,
            hook,
            client: Leg::new(Box::new(client_near) as Box<dyn Io>, ctx.fcfg),
            server: Leg::new(Box::new(server_near) as Box<dyn Io>, ctx.fcfg),
            client_scope: NsScope::client_stream(),
            to_client_scope: NsScope::client_stream(),
            bind_ids: Vec::new(),
            bound: Jid::parse("alice@example.test/r1").ok(),
            want_sm: sm.is_some(),
            sm_offered: sm.is_some(),
            sm,
            liveness: Liveness::new(Duration::from_millis(300), Duration::from_millis(300)),
            sasl_pending: false,
            batch: Vec::new(),
        };
        let (_stop, mut shutdown) = broadcast::channel::<()>(1);
        let (res, ()) = tokio::join!(
            relay.run(None, &mut shutdown),
            script(client_far, server_far)
        );
        res.map_err(|e| e.to_string())
    }

    /// Passes stanzas through and records the size of every batch.
    struct Recording(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

    impl StanzaHook for Recording {
        fn bound(&mut self, _jid: &Jid) {}
        fn from_client(&mut self, stanza: Element, _now: SystemTime) -> Vec<Outgoing> {
            vec![Outgoing::ToServer(stanza)]
        }
        fn from_server(&mut self, stanza: Element, _now: SystemTime) -> Vec<Outgoing> {
            vec![Outgoing::ToClient(stanza)]
        }
        fn batch(&mut self, stanzas: Vec<Incoming>, now: SystemTime) -> Vec<Outgoing> {
            if let Ok(mut b) = self.0.lock() {
                b.push(stanzas.len());
            }
            let mut out = Vec::new();
            for s in stanzas {
                out.extend(match s {
                    Incoming::FromClient(el) => self.from_client(el, now),
                    Incoming::FromServer(el) => self.from_server(el, now),
                });
            }
            out
        }
        fn tick(&mut self, _now: SystemTime) -> Vec<Outgoing> {
            Vec::new()
        }
        fn disconnected(&mut self, _now: SystemTime) {}
    }

    /// Messages that arrive in one read reach the hook as one batch (one
    /// commit in the router); a stanza the hook does not see ends the
    /// batch first, so nothing overtakes anything.
    #[tokio::test]
    async fn one_read_is_one_batch_and_order_is_kept() {
        let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut hook = Recording(std::sync::Arc::clone(&batches));
        let _ = with_relay_hook(None, &mut hook, |mut client, mut server| async move {
            client.write_all(HEADER.as_bytes()).await.unwrap();
            server.write_all(HEADER.as_bytes()).await.unwrap();
            let mut from_proxy = String::new();
            read_until(&mut server, &mut from_proxy, "<stream:stream").await;
            let m = |t: &str| {
                format!("<message to='bob@example.test' type='chat'><body>{t}</body></message>")
            };
            let burst = format!(
                "{}{}{}<iq type='get' id='between'><ping xmlns='urn:xmpp:ping'/></iq>{}",
                m("one"),
                m("two"),
                m("three"),
                m("four")
            );
            client.write_all(burst.as_bytes()).await.unwrap();
            read_until(&mut server, &mut from_proxy, "four").await;
            let at = |t: &str| from_proxy.find(t).unwrap_or(usize::MAX);
            assert!(
                at("one") < at("two")
                    && at("two") < at("three")
                    && at("three") < at("between")
                    && at("between") < at("four"),
                "{from_proxy}"
            );
        })
        .await;
        assert_eq!(*batches.lock().unwrap(), [3, 1]);
    }

    #[tokio::test]
    async fn silent_upstream_gets_pinged_answers_are_consumed_and_silence_ends_it() {
        let res = with_relay(None, |mut client, mut server| async move {
            client.write_all(HEADER.as_bytes()).await.unwrap();
            server.write_all(HEADER.as_bytes()).await.unwrap();
            let mut from_proxy = String::new();
            read_until(&mut server, &mut from_proxy, "urn:xmpp:ping").await;
            assert!(from_proxy.contains("to='example.test'"), "{from_proxy}");
            let id = from_proxy
                .split("id='")
                .nth(1)
                .and_then(|r| r.split('\'').next())
                .unwrap()
                .to_owned();
            let answer = format!(
                "<iq type='result' id='{id}' from='example.test'/>\
                 <message from='bob@example.test/x' to='alice@example.test/r1'>\
                 <body>after the ping</body></message>"
            );
            server.write_all(answer.as_bytes()).await.unwrap();
            let mut to_client = String::new();
            read_until(&mut client, &mut to_client, "after the ping").await;
            // Still alive, so it pings again after more silence; this time
            // nobody answers.
            from_proxy.clear();
            read_until(&mut server, &mut from_proxy, "urn:xmpp:ping").await;
            read_until(&mut client, &mut to_client, "remote-connection-failed").await;
            assert!(!to_client.contains("o2tr-ping"), "{to_client}");
            assert!(!to_client.contains("urn:xmpp:ping"), "{to_client}");
        })
        .await;
        let err = res.unwrap_err();
        assert!(err.contains("upstream link dead"), "{err}");
    }

    #[tokio::test]
    async fn with_upstream_sm_the_ping_is_an_ack_request() {
        let sm = UpstreamSm {
            enabled: true,
            ..UpstreamSm::default()
        };
        let res = with_relay(Some(sm), |mut client, mut server| async move {
            client.write_all(HEADER.as_bytes()).await.unwrap();
            server.write_all(HEADER.as_bytes()).await.unwrap();
            let mut from_proxy = String::new();
            read_until(&mut server, &mut from_proxy, "<r xmlns='urn:xmpp:sm:3'/>").await;
            assert!(!from_proxy.contains("urn:xmpp:ping"), "{from_proxy}");
            server
                .write_all(b"<a xmlns='urn:xmpp:sm:3' h='0'/>")
                .await
                .unwrap();
            from_proxy.clear();
            read_until(&mut server, &mut from_proxy, "<r xmlns='urn:xmpp:sm:3'/>").await;
            let mut to_client = String::new();
            read_until(&mut client, &mut to_client, "remote-connection-failed").await;
            assert!(!to_client.contains("urn:xmpp:sm"), "{to_client}");
        })
        .await;
        assert!(res.unwrap_err().contains("upstream link dead"));
    }

    /// Passes stanzas through and records what the relay reports about
    /// the upstream's acks.
    struct AckLog(Vec<String>);

    impl StanzaHook for AckLog {
        fn bound(&mut self, _jid: &Jid) {}
        fn from_client(&mut self, stanza: Element, _now: SystemTime) -> Vec<Outgoing> {
            vec![Outgoing::ToServer(stanza)]
        }
        fn from_server(&mut self, stanza: Element, _now: SystemTime) -> Vec<Outgoing> {
            vec![Outgoing::ToClient(stanza)]
        }
        fn tick(&mut self, _now: SystemTime) -> Vec<Outgoing> {
            Vec::new()
        }
        fn flushed(&mut self) {
            self.0.push("flushed".into());
        }
        fn flushed_upstream(&mut self, sent: u32) {
            self.0.push(format!("written {sent}"));
        }
        fn server_acked(&mut self, h: u32) {
            self.0.push(format!("acked {h}"));
        }
        fn server_acks_off(&mut self) {
            self.0.push("acks off".into());
        }
        fn disconnected(&mut self, _now: SystemTime) {}
    }

    /// With upstream SM, a message written to the server is reported with
    /// its stanza count, followed at once by `<r/>`, and the server's
    /// `<a h/>` reaches the hook: the router acknowledges its outbox entry
    /// only then (a link cut without a FIN swallows what was written).
    #[tokio::test]
    async fn with_upstream_sm_the_hook_learns_the_servers_acks() {
        let sm = UpstreamSm {
            enabled: true,
            h_out: 4,
            acked_out: 4,
            ..UpstreamSm::default()
        };
        let mut hook = AckLog(Vec::new());
        let res = with_relay_hook(Some(sm), &mut hook, |mut client, mut server| async move {
            client.write_all(HEADER.as_bytes()).await.unwrap();
            server.write_all(HEADER.as_bytes()).await.unwrap();
            client
                .write_all(b"<message to='bob@example.test'><body>m1</body></message>")
                .await
                .unwrap();
            let mut from_proxy = String::new();
            read_until(&mut server, &mut from_proxy, "<r xmlns='urn:xmpp:sm:3'/>").await;
            assert!(from_proxy.contains("m1"), "{from_proxy}");
            server
                .write_all(b"<a xmlns='urn:xmpp:sm:3' h='5'/></stream:stream>")
                .await
                .unwrap();
            // Keep the client until the proxy passed the end on.
            let mut to_client = String::new();
            read_until(&mut client, &mut to_client, "</stream:stream>").await;
        })
        .await;
        assert_eq!(res, Ok("server closed the stream"));
        assert_eq!(hook.0, ["written 5", "acked 5"]);
    }

    /// Without SM, written counts as sent (the behaviour before SM).
    #[tokio::test]
    async fn without_upstream_sm_written_is_flushed() {
        let mut hook = AckLog(Vec::new());
        let res = with_relay_hook(None, &mut hook, |mut client, mut server| async move {
            client.write_all(HEADER.as_bytes()).await.unwrap();
            server.write_all(HEADER.as_bytes()).await.unwrap();
            client
                .write_all(b"<message to='bob@example.test'><body>m1</body></message>")
                .await
                .unwrap();
            let mut from_proxy = String::new();
            read_until(&mut server, &mut from_proxy, "m1").await;
            server.write_all(b"</stream:stream>").await.unwrap();
            let mut to_client = String::new();
            read_until(&mut client, &mut to_client, "</stream:stream>").await;
        })
        .await;
        assert_eq!(res, Ok("server closed the stream"));
        // One flush per write that reached the socket: how the writes are
        // batched depends on scheduling (two under load), never an ack.
        assert!(
            !hook.0.is_empty() && hook.0.iter().all(|e| e == "flushed"),
            "{:?}",
            hook.0
        );
    }

    #[test]
    fn acks_cover_unfinished_otr_fragment_runs() {
        let mut sm = UpstreamSm {
            enabled: true,
            ..UpstreamSm::default()
        };
        // A message, two fragments of three, a presence: all stored or
        // handed on, all acknowledged.
        for _ in 0..4 {
            sm.count_in();
        }
        assert_eq!((sm.h_in, sm.ack_h()), (4, 4));
    }

    #[test]
    fn headers_and_errors_are_well_formed() {
        let h = stream_header(Some("ex'ample.org"), None, Some("1"), Some("en"));
        assert!(h.contains("to='ex&apos;ample.org'"));
        let mut f = Framer::new(FramerConfig::default());
        f.push(h.as_bytes());
        f.push(stream_error("policy-violation", Some("too <big>")).as_bytes());
        assert!(matches!(f.next(), Ok(Some(Frame::XmlDecl(_)))));
        assert!(matches!(f.next(), Ok(Some(Frame::StreamHeader(_)))));
        assert!(matches!(f.next(), Ok(Some(Frame::Stanza(_)))));
        assert!(matches!(f.next(), Ok(Some(Frame::StreamEnd(_)))));
    }
}
