//! The tokio part: listener, STARTTLS on both legs, one task per client
//! connection, and the relay that calls the [`StanzaHook`] (DESIGN §2, §3).
//!
//! Shaped like mini-redis: [`run`] binds and calls [`serve`], which takes
//! the listener and a shutdown future. A [`tokio::sync::Semaphore`] caps
//! connections, a broadcast channel tells every handler to stop, and an mpsc
//! sender held by each handler (the drop guard) tells `serve` when the last
//! one has finished. Accept errors are retried with exponential backoff. A
//! failing connection is logged and ends alone.
//!
//! Per connection (see `connection.rs`): read the client's stream header,
//! connect upstream (configured host, else `_xmpp-client._tcp` SRV, else
//! the domain on 5222), STARTTLS upstream with verification, offer STARTTLS
//! to the client with our certificate, then relay frames both ways,
//! filtering stream features, restarting both framers at SASL success, and
//! handing `<message>` stanzas after bind to the hook. XEP-0198 is never
//! offered to the client; with [`ProxyConfig::upstream_sm`] the proxy
//! enables it with the server after bind and acknowledges what it received,
//! so stanzas lost in a link that died without a FIN are not acknowledged
//! and the server re-routes them (offline storage on ejabberd).

mod connection;
mod hook;
mod tls;
mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc};

pub use hook::{HookFactory, Incoming, Outgoing, PassThrough, StanzaHook};

/// Default idle time before the proxy pings a silent upstream.
pub const DEFAULT_UPSTREAM_PING_INTERVAL: Duration = Duration::from_secs(60);
/// Default time a ping may go unanswered before the link counts as dead.
pub const DEFAULT_UPSTREAM_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Proxy settings.
#[derive(Clone)]
pub struct ProxyConfig {
    /// Where to listen for clients.
    pub listen: SocketAddr,
    /// Fixed upstream `(host, port)`; `None` → SRV, then domain:5222.
    pub upstream: Option<(String, u16)>,
    /// PEM file of CA certificates trusted for the upstream; `None` → the
    /// bundled web PKI roots.
    pub upstream_ca: Option<PathBuf>,
    /// Do not verify the upstream certificate (logged loudly). Never default.
    pub dangerous_upstream_insecure: bool,
    /// DNS server for the SRV lookup and the SRV targets' addresses;
    /// `None` → the system's resolver configuration.
    pub dns_server: Option<SocketAddr>,
    /// PEM certificate chain for the client leg.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the client leg.
    pub tls_key: Option<PathBuf>,
    /// Allow a plaintext client leg; only honoured without a certificate and
    /// on a loopback listener.
    pub allow_plaintext_client: bool,
    /// Maximum stanza size on either leg.
    pub max_stanza_bytes: usize,
    /// Maximum concurrent client connections.
    pub max_connections: usize,
    /// Log every frame on both legs at debug level.
    pub debug_packets: bool,
    /// With `debug_packets`, do not redact bodies and SASL payloads.
    pub log_plaintext: bool,
    /// Terminate XEP-0198 stream management on the upstream leg: after
    /// bind the proxy enables SM (without resumption) with the server itself,
    /// answers its `<r/>` with its own count and sends a final `<a/>`
    /// before a clean close. The server then knows which stanzas never
    /// reached the proxy when the link dies without a FIN, and (ejabberd
    /// `resend_on_timeout: if_offline`) sends them to offline storage
    /// instead of losing them. The proxy does not resume sessions (that
    /// would need the password). SM is never offered to the client.
    pub upstream_sm: bool,
    /// Dead-link detection: after the upstream has been silent this long
    /// (after bind), the proxy asks for a sign of life — an XEP-0199 ping,
    /// or an SM `<r/>` when upstream SM is on. `Duration::ZERO` turns it
    /// off. A link cut without a FIN otherwise looks alive for as long as
    /// the kernel keeps retransmitting (many minutes).
    pub upstream_ping_interval: Duration,
    /// How long to wait for any data after such a ping before treating the
    /// link as dead: the client gets `remote-connection-failed` and the
    /// hook's sessions are suspended, exactly as when the server closed.
    pub upstream_ping_timeout: Duration,
    /// Makes the per-connection message hook.
    pub hooks: Arc<dyn HookFactory>,
}

impl ProxyConfig {
    /// Defaults: listen on 127.0.0.1:5222, resolve upstream, verify with
    /// the web PKI, no certificate, 1 MiB stanzas, 256 connections,
    /// upstream SM on, ping a silent upstream after 60 s and give up 20 s
    /// later,
    /// [`PassThrough`] hook.
    pub fn new() -> ProxyConfig {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 5222)),
            upstream: None,
            upstream_ca: None,
            dangerous_upstream_insecure: false,
            dns_server: None,
            tls_cert: None,
            tls_key: None,
            allow_plaintext_client: false,
            max_stanza_bytes: crate::xmpp::framer::DEFAULT_MAX_STANZA_BYTES,
            max_connections: 256,
            debug_packets: false,
            log_plaintext: false,
            upstream_sm: true,
            upstream_ping_interval: DEFAULT_UPSTREAM_PING_INTERVAL,
            upstream_ping_timeout: DEFAULT_UPSTREAM_PING_TIMEOUT,
            hooks: Arc::new(PassThrough),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig::new()
    }
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("upstream_ca", &self.upstream_ca)
            .field("dns_server", &self.dns_server)
            .field(
                "dangerous_upstream_insecure",
                &self.dangerous_upstream_insecure,
            )
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("allow_plaintext_client", &self.allow_plaintext_client)
            .field("max_stanza_bytes", &self.max_stanza_bytes)
            .field("max_connections", &self.max_connections)
            .field("debug_packets", &self.debug_packets)
            .field("log_plaintext", &self.log_plaintext)
            .field("upstream_sm", &self.upstream_sm)
            .field("upstream_ping_interval", &self.upstream_ping_interval)
            .field("upstream_ping_timeout", &self.upstream_ping_timeout)
            .finish_non_exhaustive()
    }
}

/// Why the proxy (not one connection) failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Invalid configuration (certificates, plaintext off loopback, …).
    #[error("configuration: {0}")]
    Config(String),
    /// Binding or accepting failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything a connection needs, built once.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) connector: tokio_rustls::TlsConnector,
}

fn build_shared(config: ProxyConfig, local: SocketAddr) -> Result<Shared, ProxyError> {
    let acceptor = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(c, k)?)),
        (None, None) => {
            if !config.allow_plaintext_client {
                return Err(ProxyError::Config(
                    "no client certificate configured and plaintext clients not allowed".into(),
                ));
            }
            if !local.ip().is_loopback() {
                return Err(ProxyError::Config(
                    "a plaintext client leg is only allowed on a loopback listener".into(),
                ));
            }
            tracing::warn!("client leg is plaintext (loopback only)");
            None
        }
        _ => {
            return Err(ProxyError::Config(
                "tls_cert and tls_key must be given together".into(),
            ));
        }
    };
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(
        config.upstream_ca.as_deref(),
        config.dangerous_upstream_insecure,
    )?);
    Ok(Shared {
        config,
        acceptor,
        connector,
    })
}

/// Binds `config.listen` and serves until `shutdown` completes.
pub async fn run(config: ProxyConfig, shutdown: impl Future) -> Result<(), ProxyError> {
    let listener = TcpListener::bind(config.listen).await?;
    serve(listener, config, shutdown).await
}

/// Serves clients from an already bound `listener` until `shutdown`
/// completes, then tells every connection to close and waits for them.
/// Logs `listening on ADDR` at info level once ready.
pub async fn serve(
    listener: TcpListener,
    config: ProxyConfig,
    shutdown: impl Future,
) -> Result<(), ProxyError> {
    let local = listener.local_addr()?;
    let max = config.max_connections.max(1);
    let shared = Arc::new(build_shared(config, local)?);
    let (notify_shutdown, _) = broadcast::channel::<()>(1);
    let (shutdown_complete_tx, mut shutdown_complete_rx) = mpsc::channel::<()>(1);
    let mut server = Listener {
        listener,
        limit: Arc::new(Semaphore::new(max)),
        shared,
        notify_shutdown,
        shutdown_complete_tx,
    };
    tracing::info!("listening on {local}");
    let result = tokio::select! {
        res = server.accept_loop() => res,
        _ = shutdown => {
            tracing::info!("shutting down");
            Ok(())
        }
    };
    let Listener {
        notify_shutdown,
        shutdown_complete_tx,
        ..
    } = server;
    drop(notify_shutdown);
    drop(shutdown_complete_tx);
    let _ = shutdown_complete_rx.recv().await;
    result
}

struct Listener {
    listener: TcpListener,
    limit: Arc<Semaphore>,
    shared: Arc<Shared>,
    notify_shutdown: broadcast::Sender<()>,
    shutdown_complete_tx: mpsc::Sender<()>,
}

impl Listener {
    async fn accept_loop(&mut self) -> Result<(), ProxyError> {
        let mut next_id: u64 = 1;
        loop {
            let permit = Arc::clone(&self.limit)
                .acquire_owned()
                .await
                .map_err(|_| ProxyError::Config("connection semaphore closed".into()))?;
            let (socket, peer) = self.accept().await?;
            let id = next_id;
            next_id += 1;
            let shared = Arc::clone(&self.shared);
            let shutdown = self.notify_shutdown.subscribe();
            let guard = self.shutdown_complete_tx.clone();
            tokio::spawn(async move {
                connection::handle(id, socket, peer, shared, shutdown).await;
                drop(permit);
                drop(guard);
            });
        }
    }

    async fn accept(&mut self) -> Result<(TcpStream, SocketAddr), ProxyError> {
        let mut backoff = 1;
        loop {
            match self.listener.accept().await {
                Ok(s) => return Ok(s),
                Err(err) => {
                    if backoff > 64 {
                        return Err(err.into());
                    }
                    tracing::warn!(cause = %err, "accept failed, retrying in {backoff}s");
                }
            }
            tokio::time::sleep(Duration::from_secs(backoff)).await;
            backoff *= 2;
        }
    }
}
