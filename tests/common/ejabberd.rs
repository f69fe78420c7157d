//! A real ejabberd on loopback for end-to-end tests.
//!
//! [`Ejabberd::start`] runs `scripts/ejabberd/ejabberd-test.sh` on a fresh
//! directory: a small CA + leaf certificate, `docker/ejabberd/ejabberd.yml`
//! with the test's paths and a free port substituted in, a self-contained node
//! (no systemd, no epmd). Dropping the value stops the node; a watchdog also
//! stops it if the test process dies without dropping it.
//!
//! ejabberd is required: when it is not installed the harness panics with the
//! install command instead of letting a test pass without a server.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The XMPP domain the tests use unless told otherwise.
pub const DEFAULT_DOMAIN: &str = "example.test";

/// How long one script invocation may take (the script itself gives up on
/// readiness after 30 s and prints the log tail).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

static INSTANCE: AtomicUsize = AtomicUsize::new(0);

/// Options for [`Ejabberd::start_with`].
#[derive(Clone, Debug)]
pub struct EjabberdOptions {
    /// The single virtual host.
    pub domain: String,
    /// `info` or `debug` (`debug` logs every stanza, losslessly: what a
    /// curious server sees).
    pub loglevel: String,
    /// XEP-0198 resumption window in seconds.
    pub sm_resume_timeout: u32,
}

impl Default for EjabberdOptions {
    fn default() -> Self {
        EjabberdOptions {
            domain: DEFAULT_DOMAIN.to_string(),
            loglevel: "info".to_string(),
            sm_resume_timeout: 300,
        }
    }
}

/// A running ejabberd instance owned by one test.
#[derive(Debug)]
pub struct Ejabberd {
    /// Instance directory (config, certificates, Mnesia, logs).
    pub dir: PathBuf,
    /// c2s port on 127.0.0.1 (STARTTLS required).
    pub port: u16,
    /// The XMPP domain.
    pub domain: String,
    /// CA certificate (PEM) that issued the server's certificate: trust it.
    pub ca_pem: PathBuf,
    /// The main ejabberd log (every stanza when started with `debug`).
    pub log_path: PathBuf,
    opts: EjabberdOptions,
    running: bool,
}

/// Path of the control script in this repository.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ejabberd/ejabberd-test.sh")
}

fn ejabberdctl_path() -> PathBuf {
    std::env::var_os("EJABBERDCTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/ejabberdctl"))
}

/// Panics (never skips) if ejabberd is not installed.
pub fn require_ejabberd() {
    let ctl = ejabberdctl_path();
    assert!(
        ctl.exists(),
        "ejabberd is required for the end-to-end tests but {} does not exist.\n\
         Install it: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ejabberd",
        ctl.display()
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A fresh directory for an instance: under cargo's target tmp dir when its
/// path is plain enough for the shell-sourced ejabberdctl cfg, else /tmp.
fn fresh_dir() -> PathBuf {
    let plain = |p: &Path| {
        p.is_absolute()
            && p.to_str().is_some_and(|s| {
                s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./+-".contains(c))
            })
    };
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let base = if plain(&target) {
        target
    } else {
        PathBuf::from("/tmp")
    };
    let n = INSTANCE.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = base.join(format!(
        "ejabberd-{}-{}-{:08x}",
        std::process::id(),
        n,
        nanos
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Output of a finished script run.
struct ScriptOutput {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run_script(args: &[&str], envs: &[(&str, String)]) -> ScriptOutput {
    let mut cmd = Command::new("bash");
    cmd.arg(script_path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script_path().display()));
    // Read both pipes on threads so a chatty script cannot block on a full
    // pipe while we wait for it.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
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
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
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
    let mut stderr = t_err.join().unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!(
            "\n[harness] script timed out after {SCRIPT_TIMEOUT:?}"
        ));
    }
    ScriptOutput {
        ok: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
    }
}

fn check(what: &str, out: ScriptOutput) -> String {
    assert!(
        out.ok,
        "ejabberd-test.sh {what} failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout, out.stderr
    );
    out.stdout
}

impl Ejabberd {
    /// Start an instance with default options (domain `example.test`,
    /// loglevel info) and wait until it accepts XMPP streams.
    pub fn start() -> Self {
        Self::start_with(EjabberdOptions::default())
    }

    /// Start an instance that logs every stanza (loglevel debug, lossless):
    /// for checks that the server never saw a plaintext.
    pub fn start_debug() -> Self {
        Self::start_with(EjabberdOptions {
            loglevel: "debug".to_string(),
            ..EjabberdOptions::default()
        })
    }

    /// Start an instance with the given options.
    pub fn start_with(opts: EjabberdOptions) -> Self {
        require_ejabberd();
        let dir = fresh_dir();
        let port = free_port();
        let mut ej = Ejabberd {
            ca_pem: dir.join("certs/ca.pem"),
            log_path: dir.join("logs/ejabberd.log"),
            dir,
            port,
            domain: opts.domain.clone(),
            opts,
            running: false,
        };
        ej.run_start();
        ej
    }

    /// Runs the script's `start` (same port, domain and data). It picks a
    /// fresh Erlang distribution port on each start; a concurrent test may
    /// take it between the pick and the bind, so `eaddrinuse` is retried.
    fn run_start(&mut self) {
        let port_s = self.port.to_string();
        let start = || {
            run_script(
                &["start", self.dir_str(), &port_s, &self.domain],
                &self.start_env(),
            )
        };
        let mut out = start();
        for _ in 0..3 {
            if out.ok || !out.stderr.contains("eaddrinuse") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
            out = start();
        }
        check("start", out);
        self.running = true;
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn start_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("EJ_LOGLEVEL", self.opts.loglevel.clone()),
            (
                "EJ_SM_RESUME_TIMEOUT",
                self.opts.sm_resume_timeout.to_string(),
            ),
            ("EJ_WATCH_PID", std::process::id().to_string()),
        ]
    }

    /// `127.0.0.1:port` of the c2s listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `user@domain`.
    pub fn jid(&self, user: &str) -> String {
        format!("{user}@{}", self.domain)
    }

    /// Create an account `user@domain` (about 0.4 s).
    pub fn register(&self, user: &str, password: &str) {
        let out = run_script(&["register", self.dir_str(), user, password], &[]);
        check("register", out);
    }

    /// Create several accounts at once (in parallel: each `ejabberdctl`
    /// call boots a small Erlang VM).
    pub fn register_all(&self, users: &[(&str, &str)]) {
        std::thread::scope(|s| {
            let handles: Vec<_> = users
                .iter()
                .map(|(u, p)| s.spawn(move || run_script(&["register", self.dir_str(), u, p], &[])))
                .collect();
            for h in handles {
                check("register", h.join().unwrap());
            }
        });
    }

    /// Run any `ejabberdctl` command against this node; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut a = vec!["ctl", self.dir_str()];
        a.extend_from_slice(args);
        check(&format!("ctl {args:?}"), run_script(&a, &[]))
    }

    /// Number of messages waiting in `user`'s offline storage.
    pub fn offline_count(&self, user: &str) -> usize {
        let out = self.ctl(&["get_offline_count", user, &self.domain]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("get_offline_count answered {out:?}"))
    }

    /// Polls [`Ejabberd::offline_count`] until it is `want` or `timeout`
    /// passed (routing and storage are asynchronous); returns the last
    /// count.
    #[allow(dead_code)]
    pub fn wait_offline_count(&self, user: &str, want: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.offline_count(user);
            if n == want || Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The whole Mnesia database as Erlang terms (`ejabberdctl dump`):
    /// offline storage (`offline_msg`), the MAM archive (`archive_msg`),
    /// rosters... Text appears as `<<"...">>` binaries; ASCII needles are
    /// found verbatim.
    pub fn dump_db(&self) -> String {
        let file = self.dir.join(format!(
            "dump-{}.txt",
            INSTANCE.fetch_add(1, Ordering::SeqCst)
        ));
        let out = run_script(&["dump", self.dir_str(), file.to_str().unwrap()], &[]);
        check("dump", out);
        let text = std::fs::read(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        String::from_utf8_lossy(&text).into_owned()
    }

    /// The main log so far (lossy UTF-8).
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Wait until the log contains `needle` (the logger writes
    /// asynchronously). Returns whether it was found in time.
    pub fn wait_log_contains(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_contents().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the log contains every needle; returns the ones still
    /// missing at the timeout (empty: all found). The logger writes
    /// asynchronously and in chunks, so a negative check ("the server never
    /// logged X") must first wait for a later control message to show up.
    pub fn wait_log_contains_all(&self, needles: &[&str], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_contents();
            let missing: Vec<String> = needles
                .iter()
                .filter(|n| !log.contains(**n))
                .map(|n| n.to_string())
                .collect();
            if missing.is_empty() || Instant::now() >= deadline {
                return missing;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the node gracefully (data kept).
    pub fn stop(&mut self) {
        check("stop", run_script(&["stop", self.dir_str()], &[]));
        self.running = false;
    }

    /// Kill the node with SIGKILL (crash; data as Mnesia left it).
    pub fn kill(&mut self) {
        check("kill", run_script(&["kill", self.dir_str()], &[]));
        self.running = false;
    }

    /// Start a stopped/killed node again: same port, domain, certificates,
    /// accounts and stored messages.
    pub fn start_again(&mut self) {
        assert!(!self.running, "start_again on a running node");
        self.run_start();
    }

    /// Stop and start again (same port and data).
    pub fn restart(&mut self) {
        if self.running {
            self.stop();
        }
        self.start_again();
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        let keep = std::thread::panicking() || std::env::var_os("O2TR_KEEP_EJABBERD").is_some();
        // A directory about to be deleted needs no graceful shutdown: SIGKILL
        // saves ~1 s per test. A kept one is stopped cleanly (flushed logs).
        let how = if keep { "stop" } else { "kill" };
        if self.running {
            let out = run_script(&[how, self.dir_str()], &[]);
            if !out.ok {
                eprintln!(
                    "[ejabberd harness] {how} failed for {}: {}",
                    self.dir.display(),
                    out.stderr
                );
            }
        }
        if keep {
            eprintln!(
                "[ejabberd harness] kept {} (logs in {}/logs)",
                self.dir.display(),
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
