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

/// CA + leaf for the proxy's client leg, made by the same code as
/// `o2tr-proxy certs` (`ca.pem`, `cert.pem`, `key.pem` in `dir`).
fn client_leg_pki(dir: &Path, domain: &str) {
    let generated = o2tr_proxy::certs::generate(domain, time::OffsetDateTime::now_utc()).unwrap();
    o2tr_proxy::certs::write(dir, &generated, true).unwrap();
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
        Self::launch(ej, state_dir, policy, ej.port, &ej.ca_pem, true)
    }

    /// Like [`start`](Self::start), but the upstream is `127.0.0.1:upstream_port`
    /// (a tampering relay in front of `ej`) trusted through `upstream_ca`.
    /// Upstream SM is off: the relay injects and drops stanzas without
    /// rewriting XEP-0198 counters (a real server's counts stay consistent
    /// with what it sends), so SM would end the stream on a count mismatch.
    pub fn start_via(
        ej: &Ejabberd,
        state_dir: &Path,
        policy: Policy,
        upstream_port: u16,
        upstream_ca: &Path,
    ) -> Self {
        Self::launch(ej, state_dir, policy, upstream_port, upstream_ca, false)
    }

    fn launch(
        ej: &Ejabberd,
        state_dir: &Path,
        policy: Policy,
        upstream_port: u16,
        upstream_ca: &Path,
        upstream_sm: bool,
    ) -> Self {
        let pki_dir = state_dir.with_extension("pki");
        if !pki_dir.join("ca.pem").exists() {
            client_leg_pki(&pki_dir, &ej.domain);
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
        cfg.upstream = Some(("127.0.0.1".into(), upstream_port));
        cfg.upstream_ca = Some(upstream_ca.to_path_buf());
        cfg.upstream_sm = upstream_sm;
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
        XmppClient::connect(self.client_options(ej, user, password))
    }

    /// What [`TestProxy::client`] connects with, to adjust first.
    #[allow(dead_code)]
    pub fn client_options(&self, ej: &Ejabberd, user: &str, password: &str) -> ClientOptions {
        let mut o = ClientOptions::direct(ej, user, password);
        o.host = "127.0.0.1".into();
        o.port = self.port;
        o.ca = Some(self.pki_dir.join("ca.pem"));
        o
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

/// The `o2tr-proxy run` binary as a child process (for SIGKILL tests).
pub struct ProxyProcess {
    pub port: u16,
    pub pki_dir: PathBuf,
    child: std::process::Child,
}

impl ProxyProcess {
    pub fn start(ej: &Ejabberd, state_dir: &Path, port: u16) -> Self {
        Self::start_with(ej, state_dir, port, ej.port, &[])
    }

    /// Like [`start`](Self::start), with the upstream at
    /// `127.0.0.1:upstream_port` (e.g. a relay) and extra `run` flags.
    pub fn start_with(
        ej: &Ejabberd,
        state_dir: &Path,
        port: u16,
        upstream_port: u16,
        extra: &[String],
    ) -> Self {
        use std::io::{BufRead, BufReader};
        let pki_dir = state_dir.with_extension("pki");
        if !pki_dir.join("ca.pem").exists() {
            client_leg_pki(&pki_dir, &ej.domain);
        }
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_o2tr-proxy"))
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream_port}")])
            .arg("--upstream-ca")
            .arg(&ej.ca_pem)
            .arg("--tls-cert")
            .arg(pki_dir.join("cert.pem"))
            .arg("--tls-key")
            .arg(pki_dir.join("key.pem"))
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--policy", "always", "--log-format", "human"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("O2TR_TEST_PROXY_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn o2tr-proxy");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => break,
                Ok(_) => {}
                Err(_) => panic!("o2tr-proxy did not log `listening on` within 30 s"),
            }
        }
        // Keep draining stderr so the child never blocks on a full pipe;
        // O2TR_TEST_PROXY_LOG=FILE keeps the lines (prefixed with the port).
        let keep = std::env::var_os("O2TR_TEST_PROXY_LOG").and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        std::thread::spawn(move || {
            use std::io::Write;
            let mut keep = keep;
            while let Ok(line) = rx.recv() {
                if let Some(f) = keep.as_mut() {
                    let _ = writeln!(f, "[{port}] {line}");
                }
            }
        });
        ProxyProcess {
            port,
            pki_dir,
            child,
        }
    }

    pub fn client(&self, ej: &Ejabberd, user: &str, password: &str) -> XmppClient {
        let mut o = ClientOptions::direct(ej, user, password);
        o.host = "127.0.0.1".into();
        o.port = self.port;
        o.ca = Some(self.pki_dir.join("ca.pem"));
        XmppClient::connect(o)
    }

    /// SIGKILL: no stream close, no store flush, nothing.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
