//! `o2tr-proxy run`: resolve and validate the configuration, open the
//! store, build the router, serve until SIGINT/SIGTERM (a second signal
//! exits at once with status 130).

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

use o2tr_proxy::config::{self, ClientTls};
use o2tr_proxy::proxy::{self, ProxyError};
use o2tr_proxy::router::{RouterFactory, SharedStore};
use o2tr_proxy::store::{SqliteStore, Store};
use o2tr_proxy::telemetry;

use super::{Failure, RunArgs, layers};

/// Runs the proxy.
pub fn run(config_flag: Option<&Path>, args: &RunArgs) -> Result<(), Failure> {
    let layers = layers(config_flag, args.to_raw())?;
    let cfg = config::resolve(&layers)?;
    if args.check_config {
        print!("{}", cfg.render());
        println!("# configuration OK");
        return Ok(());
    }

    telemetry::init(cfg.log_format, &cfg.log_level, cfg.debug_packets);
    if cfg.upstream_insecure {
        tracing::warn!(
            "!!! --upstream-insecure: the upstream server's certificate is NOT verified. \
             Anyone between this proxy and the server can read and change your traffic, \
             including your password. Use --upstream-ca instead. !!!"
        );
    }
    if cfg.log_plaintext {
        tracing::warn!(
            "--log-plaintext: message bodies and credentials will be written to the logs"
        );
    }
    match &cfg.client_tls {
        ClientTls::Files {
            cert,
            from_state_dir,
            ..
        } => tracing::info!(
            cert = %cert.display(),
            "client leg: STARTTLS{}",
            if *from_state_dir { " (certificate from the state directory)" } else { "" }
        ),
        ClientTls::Plaintext => {
            tracing::warn!("client leg: plaintext (loopback only, --allow-plaintext-client)")
        }
    }

    let store = SqliteStore::open(&cfg.state_dir)?;
    let accounts = store.accounts()?;
    tracing::info!(
        state_dir = %cfg.state_dir.display(),
        accounts = accounts.len(),
        policy = %cfg.policy,
        "store opened"
    );
    let boxed: Box<dyn Store> = Box::new(store);
    let shared: SharedStore = Arc::new(Mutex::new(boxed));
    let factory = RouterFactory::new(cfg.router_config(), shared);
    let proxy_cfg = cfg.proxy_config(Arc::new(factory));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::failed(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let shutdown = shutdown_signal()?;
        let listener = tokio::net::TcpListener::bind(proxy_cfg.listen)
            .await
            .map_err(|e| Failure::failed(format!("cannot listen on {}: {e}", proxy_cfg.listen)))?;
        match proxy::serve(listener, proxy_cfg, shutdown).await {
            Ok(()) => {
                tracing::info!("stopped");
                Ok(())
            }
            Err(ProxyError::Config(m)) => Err(Failure::usage(m)),
            Err(e) => Err(Failure::failed(e.to_string())),
        }
    })
}

/// Registers the signal handlers now (so a signal arriving once we listen
/// is never fatal) and returns the future that completes at the first
/// SIGINT/SIGTERM. A second signal exits the process with status 130.
fn shutdown_signal() -> Result<impl Future<Output = ()>, Failure> {
    let mut signals = Signals::new()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let name = signals.next().await;
        tracing::info!("{name}: shutting down (send it again to exit at once)");
        let _ = tx.send(());
        let name = signals.next().await;
        tracing::warn!("{name} again: exiting now");
        std::process::exit(130);
    });
    Ok(async move {
        let _ = rx.await;
    })
}

#[cfg(unix)]
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> Result<Self, Failure> {
        use tokio::signal::unix::{SignalKind, signal};
        let err = |e: std::io::Error| Failure::failed(format!("cannot handle signals: {e}"));
        Ok(Signals {
            int: signal(SignalKind::interrupt()).map_err(err)?,
            term: signal(SignalKind::terminate()).map_err(err)?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> Result<Self, Failure> {
        Ok(Signals)
    }

    async fn next(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
