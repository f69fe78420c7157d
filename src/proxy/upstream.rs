//! The upstream leg: resolve (RFC 6120 §3.2: `_xmpp-client._tcp` SRV, then
//! the domain on 5222), connect, STARTTLS (RFC 6120 §5) with certificate
//! verification against the XMPP domain.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;

use super::Shared;
use super::connection::{Ctx, Leg, stream_header};
use crate::xmpp::element::NsScope;
use crate::xmpp::{Element, Frame, features, ns};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Candidate `(host, port)` pairs, best first.
async fn candidates(shared: &Shared, domain: &str) -> Vec<(String, u16)> {
    if let Some((h, p)) = &shared.config.upstream {
        return vec![(h.clone(), *p)];
    }
    let mut out = Vec::new();
    match hickory_resolver::TokioResolver::builder_tokio() {
        Ok(b) => {
            let resolver = b.build();
            match resolver
                .srv_lookup(format!("_xmpp-client._tcp.{domain}."))
                .await
            {
                Ok(lookup) => {
                    let mut recs: Vec<_> = lookup.iter().cloned().collect();
                    recs.sort_by_key(|r| (r.priority(), std::cmp::Reverse(r.weight())));
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
        Err(e) => tracing::debug!(cause = %e, "no system resolver"),
    }
    out.push((domain.to_owned(), 5222));
    out
}

async fn connect_tcp(shared: &Shared, domain: &str) -> Result<TcpStream, String> {
    let mut last = String::from("no candidate");
    for (host, port) in candidates(shared, domain).await {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port))).await
        {
            Ok(Ok(s)) => {
                tracing::info!("upstream connected to {host}:{port}");
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("{host}:{port}: {e}"),
            Err(_) => last = format!("{host}:{port}: timed out"),
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
