//! An o2tr-proxy running in-process (library, port 0) in front of a test
//! ejabberd, with the OTR router over a SQLite store in its own directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use o2tr_proxy::otr::policy::Policy;
use o2tr_proxy::proxy::{self, ProxyConfig};
use o2tr_proxy::router::{RouterConfig, RouterFactory, SharedStore};
use o2tr_proxy::store::{SqliteStore, Store};

use super::ejabberd::Ejabberd;
use super::xmpp_client::{ClientOptions, Message, XmppClient};

/// CA + leaf for the proxy's client leg.
pub struct ClientLegPki {
    pub dir: PathBuf,
}

impl ClientLegPki {
    pub fn new(dir: &Path, domain: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL takes a leaf whose issuer equals its
        // subject for self-signed.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "o2tr-proxy test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec![
            domain.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, domain);
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
        ClientLegPki {
            dir: dir.to_path_buf(),
        }
    }
}

/// A proxy instance. Dropping it stops it abruptly (like a crash: no
/// stream close is sent, no disconnected TLV).
pub struct TestProxy {
    pub port: u16,
    pub state_dir: PathBuf,
    pub pki_dir: PathBuf,
    rt: Option<tokio::runtime::Runtime>,
}

impl TestProxy {
    pub fn start(ej: &Ejabberd, state_dir: &Path, policy: Policy) -> Self {
        let pki_dir = state_dir.with_extension("pki");
        if !pki_dir.join("ca.pem").exists() {
            ClientLegPki::new(&pki_dir, &ej.domain);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store: Box<dyn Store> = Box::new(SqliteStore::open(state_dir).unwrap());
        let store: SharedStore = Arc::new(Mutex::new(store));
        let router = RouterFactory::new(
            RouterConfig {
                policy,
                ..RouterConfig::default()
            },
            store,
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut cfg = ProxyConfig::new();
        cfg.listen = listener.local_addr().unwrap();
        cfg.upstream = Some(("127.0.0.1".into(), ej.port));
        cfg.upstream_ca = Some(ej.ca_pem.clone());
        cfg.tls_cert = Some(pki_dir.join("cert.pem"));
        cfg.tls_key = Some(pki_dir.join("key.pem"));
        cfg.hooks = Arc::new(router);
        rt.spawn(async move {
            let _ = proxy::serve(listener, cfg, std::future::pending::<()>()).await;
        });
        TestProxy {
            port,
            state_dir: state_dir.to_path_buf(),
            pki_dir,
            rt: Some(rt),
        }
    }

    /// Client options to log in as `user` through this proxy.
    pub fn client(&self, ej: &Ejabberd, user: &str, password: &str) -> XmppClient {
        let mut o = ClientOptions::direct(ej, user, password);
        o.host = "127.0.0.1".into();
        o.port = self.port;
        o.ca = Some(self.pki_dir.join("ca.pem"));
        XmppClient::connect(o)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub fn is_notice(m: &Message) -> bool {
    m.body.as_deref().is_some_and(|b| b.starts_with("[o2tr]"))
}

/// Collect messages until `n` non-notice bodies arrived (or time out).
/// Returns (user messages, notices).
pub fn collect(c: &mut XmppClient, n: usize, timeout: Duration) -> (Vec<Message>, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut msgs = Vec::new();
    let mut notices = Vec::new();
    loop {
        for m in c.recv() {
            if is_notice(&m) {
                notices.push(m.body.clone().unwrap_or_default());
            } else {
                msgs.push(m);
            }
        }
        if msgs.len() >= n || Instant::now() > deadline {
            return (msgs, notices);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn bodies(msgs: &[Message]) -> Vec<String> {
    msgs.iter().filter_map(|m| m.body.clone()).collect()
}

/// A fresh directory under target/tmp.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tmp")
        .join(format!("{name}-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir_all(d.parent().unwrap()).unwrap();
    d
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
