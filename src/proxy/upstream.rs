//! The upstream leg: resolve (RFC 6120 §3.2: `_xmpp-client._tcp` SRV, then
//! the domain on 5222; with the system's resolver or a configured DNS
//! server), connect, STARTTLS (RFC 6120 §5) with certificate
//! verification against the XMPP domain.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;

use super::Shared;
use super::connection::{Ctx, Leg, stream_header};
use crate::xmpp::element::NsScope;
use crate::xmpp::{Element, Frame, features, ns};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The resolver for the upstream lookup: the configured DNS server, else
/// the system's configuration.
fn resolver(shared: &Shared) -> Option<TokioResolver> {
    match shared.config.dns_server {
        Some(addr) => {
            let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            let config = ResolverConfig::from_parts(None, Vec::new(), group);
            Some(
                TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                    .build(),
            )
        }
        None => match TokioResolver::builder_tokio() {
            Ok(b) => Some(b.build()),
            Err(e) => {
                tracing::debug!(cause = %e, "no system resolver");
                None
            }
        },
    }
}

/// Candidate `(host, port)` pairs, best first: the SRV targets of
/// `_xmpp-client._tcp.DOMAIN` by priority (lowest first), then weight
/// (highest first; the proxy serves one user, so it does not spread load
/// with RFC 2782's weighted random choice), then `DOMAIN:5222` (RFC 6120
/// §3.2.1 fallback). A `.` target means the service is not offered there.
pub(crate) async fn candidates(
    resolver: Option<&TokioResolver>,
    domain: &str,
) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    if let Some(resolver) = resolver {
        match resolver
            .srv_lookup(format!("_xmpp-client._tcp.{domain}."))
            .await
        {
            Ok(lookup) => {
                let mut recs: Vec<_> = lookup.iter().cloned().collect();
                recs.sort_by_key(|r| (r.priority(), std::cmp::Reverse(r.weight())));
                if recs.len() == 1 && recs[0].target().is_root() {
                    tracing::warn!(
                        "{domain} says it offers no XMPP client service (SRV target '.')"
                    );
                    return Vec::new();
                }
                for r in recs {
                    let target = r.target().to_utf8();
                    let target = target.trim_end_matches('.');
                    if !target.is_empty() {
                        out.push((target.to_owned(), r.port()));
                    }
                }
            }
            Err(e) => tracing::debug!(cause = %e, "no SRV record for {domain}"),
        }
    }
    out.push((domain.to_owned(), 5222));
    out
}

/// The addresses of `host`: an IP literal as is; with a configured DNS
/// server, its A/AAAA answers; otherwise the system's resolver.
async fn addresses(
    shared: &Shared,
    resolver: Option<&TokioResolver>,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    match (shared.config.dns_server, resolver) {
        (Some(_), Some(r)) => r
            .lookup_ip(format!("{host}."))
            .await
            .map(|l| l.iter().map(|ip| SocketAddr::new(ip, port)).collect())
            .map_err(|e| format!("{host}: {e}")),
        _ => tokio::net::lookup_host((host, port))
            .await
            .map(|a| a.collect())
            .map_err(|e| format!("{host}: {e}")),
    }
}

async fn connect_tcp(shared: &Shared, domain: &str) -> Result<TcpStream, String> {
    let (resolver, list) = match &shared.config.upstream {
        Some((h, p)) => (None, vec![(h.clone(), *p)]),
        None => {
            let r = resolver(shared);
            let list = candidates(r.as_ref(), domain).await;
            (r, list)
        }
    };
    let mut last = String::from("no candidate");
    for (host, port) in list {
        let addrs = match addresses(shared, resolver.as_ref(), &host, port).await {
            Ok(a) => a,
            Err(e) => {
                last = e;
                continue;
            }
        };
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tracing::info!("upstream connected to {host}:{port} ({addr})");
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = format!("{host}:{port} ({addr}): {e}"),
                Err(_) => last = format!("{host}:{port} ({addr}): timed out"),
            }
        }
    }
    Err(last)
}

/// Connects to the server for `domain` and completes STARTTLS. The
/// returned leg's framer expects a new stream header (the caller sends
/// ours first).
pub(crate) async fn connect(
    ctx: &Ctx,
    shared: &Shared,
    domain: &str,
    lang: Option<&str>,
) -> Result<Leg<tokio_rustls::client::TlsStream<TcpStream>>, String> {
    let tcp = connect_tcp(shared, domain).await?;
    let fcfg = ctx.framer_config();
    let mut leg = Leg::new(tcp, fcfg);
    let header = stream_header(Some(domain), None, None, lang);
    ctx.log_frame("P→S", header.as_bytes());
    leg.send(header.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut scope = NsScope::client_stream();
    // Header, then features.
    let features = loop {
        let f = leg.next_frame().await.map_err(|e| e.to_string())?;
        ctx.log_frame_of("S→P", &f);
        match f {
            Frame::XmlDecl(_) | Frame::Whitespace(_) => {}
            Frame::StreamHeader(h) => scope = NsScope::from_header(&h),
            Frame::Stanza(raw) => {
                let el = Element::parse(&raw, &scope).map_err(|e| e.to_string())?;
                if features::is_features(&el) {
                    break el;
                }
                if el.is("error", ns::STREAMS) {
                    return Err(format!("server stream error: {}", el.to_xml(&scope)));
                }
            }
            Frame::StreamEnd(_) => return Err("server closed the stream".into()),
        }
    };
    if !features::offers_starttls(&features) {
        return Err("server does not offer STARTTLS; refusing a plaintext upstream".into());
    }
    let starttls = format!("<starttls xmlns='{}'/>", ns::TLS);
    ctx.log_frame("P→S", starttls.as_bytes());
    leg.send(starttls.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let f = leg.next_frame().await.map_err(|e| e.to_string())?;
        ctx.log_frame_of("S→P", &f);
        match f {
            Frame::Whitespace(_) => {}
            Frame::Stanza(raw) => {
                let el = Element::parse(&raw, &scope).map_err(|e| e.to_string())?;
                if el.is("proceed", ns::TLS) {
                    break;
                }
                return Err(format!("STARTTLS refused: {}", el.to_xml(&scope)));
            }
            _ => return Err("unexpected frame instead of <proceed/>".into()),
        }
    }
    let (tcp, framer) = leg.into_parts();
    if framer.buffered() != 0 {
        return Err("server sent plaintext after <proceed/>".into());
    }
    let name = ServerName::try_from(domain.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, shared.connector.connect(name, tcp))
        .await
        .map_err(|_| "upstream TLS handshake timed out".to_string())?
        .map_err(|e| format!("upstream TLS: {e}"))?;
    tracing::info!("upstream TLS established");
    Ok(Leg::new(tls, fcfg))
}
