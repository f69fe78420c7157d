//! A real XMPP client for end-to-end tests: drives
//! `tests/clients/xmpp_client.py` (slixmpp) over its line protocol.
//!
//! Every read from the client has a timeout; a client that does not answer
//! fails the test with the client's stderr in the panic message. The Python
//! interpreter is `$O2TR_PYTHON` (default `python3`) and needs `slixmpp`
//! (`python3 -m pip install slixmpp`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::ejabberd::Ejabberd;

/// Timeout for one command's answer (WAIT adds its own timeout on top).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for login up to `READY` (the client itself gives up after 20 s).
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(40);

/// For [`ClientOptions::before_presence`]: XEP-0013's disco#info on the
/// offline node, after which ejabberd keeps offline storage instead of
/// flushing it at the initial presence (what its store/flush race does to
/// a message by accident, docs/chaos.md).
#[allow(dead_code)]
pub const KEEP_OFFLINE_STORAGE: &str = "<iq type='get' id='d1'><query xmlns='http://jabber.org/protocol/disco#info' \
     node='http://jabber.org/protocol/offline'/></iq>";

/// How to start a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bare or full JID to log in as.
    pub jid: String,
    /// Account password.
    pub password: String,
    /// Address to connect to (the server, or the proxy).
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// CA to trust for STARTTLS (required unless `plaintext`).
    pub ca: Option<PathBuf>,
    /// No TLS at all (only for a proxy on loopback configured so).
    pub plaintext: bool,
    /// Record every message stanza with its XML ([`Message::xml`]).
    pub raw: bool,
    /// Enable XEP-0280 carbons after login.
    pub carbons: bool,
    /// Enable XEP-0198 stream management.
    pub sm: bool,
    /// slixmpp debug log on the client's stderr.
    pub debug: bool,
    /// Raw XML the client sends after its roster request and before its
    /// initial presence (e.g. a XEP-0013 disco#info, which makes ejabberd
    /// keep offline storage instead of flushing it at that presence).
    pub before_presence: Option<String>,
}

impl ClientOptions {
    /// Options for logging in to `ej` directly, with STARTTLS and its CA.
    pub fn direct(ej: &Ejabberd, user: &str, password: &str) -> Self {
        ClientOptions {
            jid: ej.jid(user),
            password: password.to_string(),
            host: "127.0.0.1".to_string(),
            port: ej.port,
            ca: Some(ej.ca_pem.clone()),
            plaintext: false,
            raw: false,
            carbons: false,
            sm: false,
            debug: false,
            before_presence: None,
        }
    }
}

/// A received message stanza.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The `from` attribute.
    pub from: String,
    /// The `<body>` text, if any (non-empty).
    pub body: Option<String>,
    /// The `<delay stamp>` (offline messages), if any.
    pub stamp: Option<String>,
    /// The stanza `id`, if any.
    pub id: Option<String>,
    /// The `type` attribute (`normal` when absent).
    pub mtype: String,
    /// The stanza's XML as slixmpp parsed it (only with `raw`).
    pub xml: Option<String>,
}

/// One message from the MAM archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MamMessage {
    /// The archived message's `from`.
    pub from: String,
    /// The archived message's `to`.
    pub to: String,
    /// Its body, if any.
    pub body: Option<String>,
    /// The whole `<forwarded>` element (message + delay).
    pub xml: String,
}

/// A running slixmpp client process.
pub struct XmppClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    full_jid: String,
    label: String,
}

/// Path of the Python client script.
pub fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/xmpp_client.py")
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(s: &str) -> String {
    let bytes = B64
        .decode(s)
        .unwrap_or_else(|e| panic!("client sent bad base64 {s:?}: {e}"));
    String::from_utf8(bytes).unwrap_or_else(|e| panic!("client sent non-UTF-8: {e}"))
}

fn opt_b64(s: &str) -> Option<String> {
    (s != "-").then(|| unb64(s))
}

fn opt(s: &str) -> Option<String> {
    (s != "-").then(|| s.to_string())
}

impl XmppClient {
    /// Log in directly to `ej` as `user` (STARTTLS, trusting its CA).
    pub fn direct(ej: &Ejabberd, user: &str, password: &str) -> Self {
        Self::connect(ClientOptions::direct(ej, user, password))
    }

    /// Start a client and wait until it is logged in, has sent its initial
    /// presence and seen the server's echo of it (`READY`).
    pub fn connect(opts: ClientOptions) -> Self {
        let python = std::env::var("O2TR_PYTHON").unwrap_or_else(|_| "python3".to_string());
        let mut cmd = Command::new(&python);
        cmd.arg("-u")
            .arg(client_script())
            .arg("--jid")
            .arg(&opts.jid)
            .arg("--password")
            .arg(&opts.password)
            .arg("--host")
            .arg(&opts.host)
            .arg("--port")
            .arg(opts.port.to_string());
        if let Some(ca) = &opts.ca {
            cmd.arg("--ca").arg(ca);
        }
        if let Some(xml) = &opts.before_presence {
            cmd.arg("--before-presence").arg(xml);
        }
        for (on, flag) in [
            (opts.plaintext, "--plaintext"),
            (opts.raw, "--raw"),
            (opts.carbons, "--carbons"),
            (opts.sm, "--sm"),
            (opts.debug, "--debug"),
        ] {
            if on {
                cmd.arg(flag);
            }
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {python} (set O2TR_PYTHON to a python3 with slixmpp): {e}")
        });
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stderr_pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut s) = sink.lock() {
                            s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                }
            }
        });
        let mut client = XmppClient {
            child,
            stdin,
            lines: rx,
            stderr,
            full_jid: String::new(),
            label: opts.jid.clone(),
        };
        let line = client.read_line(LOGIN_TIMEOUT, "READY");
        match line.strip_prefix("READY ") {
            Some(jid) => client.full_jid = jid.to_string(),
            None => client.fail(&format!("login failed: {line}")),
        }
        client
    }

    /// The full JID the server bound.
    pub fn full_jid(&self) -> &str {
        &self.full_jid
    }

    /// The bare JID.
    pub fn bare_jid(&self) -> &str {
        self.full_jid.split('/').next().unwrap_or(&self.full_jid)
    }

    /// Everything the client wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Give the stderr thread a moment to drain.
        std::thread::sleep(Duration::from_millis(100));
        panic!(
            "xmpp client {}: {what}\n--- client stderr ---\n{}",
            self.label,
            self.stderr()
        );
    }

    fn read_line(&mut self, timeout: Duration, waiting_for: &str) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => self.fail(&format!(
                "no answer within {timeout:?} (waiting for {waiting_for})"
            )),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                self.fail(&format!(
                    "client exited ({status:?}) while waiting for {waiting_for}"
                ))
            }
        }
    }

    fn write_line(&mut self, line: &str) {
        let res = match self.stdin.as_mut() {
            Some(w) => w
                .write_all(line.as_bytes())
                .and_then(|_| w.write_all(b"\n"))
                .and_then(|_| w.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        if let Err(e) = res {
            self.fail(&format!("cannot write command {line:?}: {e}"));
        }
    }

    /// Send one command; returns (data lines, final line without `OK`).
    /// Panics on `ERR`.
    fn command(&mut self, line: &str, timeout: Duration) -> (Vec<String>, String) {
        match self.try_command(line, timeout) {
            Ok(r) => r,
            Err(e) => self.fail(&format!("{line:?} failed: {e}")),
        }
    }

    /// Like `command`, but returns `Err(reason)` on an `ERR` answer.
    fn try_command(
        &mut self,
        line: &str,
        timeout: Duration,
    ) -> Result<(Vec<String>, String), String> {
        self.write_line(line);
        let mut data = Vec::new();
        loop {
            let l = self.read_line(timeout, line);
            if l == "OK" || l.starts_with("OK ") {
                return Ok((data, l.get(3..).unwrap_or("").to_string()));
            }
            if l == "ERR" || l.starts_with("ERR ") {
                return Err(l.get(4..).unwrap_or("").to_string());
            }
            data.push(l);
        }
    }

    /// Send a chat message; returns its stanza id.
    pub fn send(&mut self, to: &str, body: &str) -> String {
        self.send_with(to, body, &[])
    }

    /// Send a chat message with extra children/hints: any of `xhtml`,
    /// `oob`, `subject` (each repeats the body: leak tests), `receipt`,
    /// `chatstate`, `nostore`, `nopermstore`, `normal` (type normal).
    pub fn send_with(&mut self, to: &str, body: &str, flags: &[&str]) -> String {
        let mut line = format!("SEND {to} {}", b64(body));
        if !flags.is_empty() {
            line.push(' ');
            line.push_str(&flags.join(","));
        }
        self.command(&line, COMMAND_TIMEOUT).1
    }

    /// Like [`send`](Self::send), but `Err` (not a panic) when the client
    /// refuses, e.g. because it knows it is disconnected.
    pub fn try_send(&mut self, to: &str, body: &str) -> Result<String, String> {
        let line = format!("SEND {to} {}", b64(body));
        self.try_command(&line, COMMAND_TIMEOUT).map(|(_, id)| id)
    }

    /// Send a raw stanza as is.
    pub fn send_raw(&mut self, xml: &str) {
        self.command(&format!("SENDRAW {}", b64(xml)), COMMAND_TIMEOUT);
    }

    /// Wait until `n` messages with a body were received in total since
    /// login. `Err(count)` on timeout.
    pub fn try_wait_for(&mut self, n: usize, timeout: Duration) -> Result<usize, usize> {
        let line = format!("WAIT {n} {}", timeout.as_secs_f64());
        match self.try_command(&line, timeout + COMMAND_TIMEOUT) {
            Ok((_, rest)) => Ok(rest.trim().parse().unwrap_or(n)),
            Err(e) => Err(e
                .strip_prefix("timeout ")
                .and_then(|c| c.trim().parse().ok())
                .unwrap_or_else(|| self.fail(&format!("WAIT failed: {e}")))),
        }
    }

    /// Like [`try_wait_for`](Self::try_wait_for) but panics on timeout.
    pub fn wait_for(&mut self, n: usize, timeout: Duration) {
        if let Err(got) = self.try_wait_for(n, timeout) {
            self.fail(&format!(
                "expected {n} messages within {timeout:?}, got {got}"
            ));
        }
    }

    /// Messages received and not returned yet, in arrival order (only ones
    /// with a body unless the client runs with `raw`).
    pub fn recv(&mut self) -> Vec<Message> {
        let (lines, _) = self.command("RECV", COMMAND_TIMEOUT);
        lines
            .iter()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                if f.len() < 6 || f[0] != "MSG" {
                    self.fail(&format!("bad RECV line {l:?}"));
                }
                Message {
                    from: f[1].to_string(),
                    body: opt_b64(f[2]),
                    stamp: opt(f[3]),
                    id: opt(f[4]),
                    mtype: f[5].to_string(),
                    xml: f.get(6).map(|x| unb64(x)),
                }
            })
            .collect()
    }

    /// Wait until `total` messages with a body were received since login,
    /// then return the ones not returned yet.
    pub fn recv_until(&mut self, total: usize, timeout: Duration) -> Vec<Message> {
        self.wait_for(total, timeout);
        self.recv()
    }

    /// Messages with a body received since login.
    pub fn count(&mut self) -> usize {
        let (_, rest) = self.command("COUNT", COMMAND_TIMEOUT);
        rest.trim().parse().unwrap_or(0)
    }

    /// Our own MAM archive (up to 250 messages), optionally only with one
    /// peer.
    pub fn mam(&mut self, with: Option<&str>) -> Vec<MamMessage> {
        let line = match with {
            Some(w) => format!("MAM {w}"),
            None => "MAM".to_string(),
        };
        let (lines, _) = self.command(&line, COMMAND_TIMEOUT);
        lines
            .iter()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                if f.len() != 5 || f[0] != "MAMMSG" {
                    self.fail(&format!("bad MAM line {l:?}"));
                }
                MamMessage {
                    from: f[1].to_string(),
                    to: f[2].to_string(),
                    body: opt_b64(f[3]),
                    xml: unb64(f[4]),
                }
            })
            .collect()
    }

    /// The roster (JID, subscription) as the client knows it.
    pub fn roster(&mut self) -> Vec<(String, String)> {
        let (lines, _) = self.command("ROSTER", COMMAND_TIMEOUT);
        lines
            .iter()
            .filter_map(|l| {
                let mut f = l.split(' ');
                (f.next() == Some("ROSTERITEM")).then(|| {
                    (
                        f.next().unwrap_or("").to_owned(),
                        f.next().unwrap_or("").to_owned(),
                    )
                })
            })
            .collect()
    }

    /// Remove `jid` from the roster; waits for the answer.
    pub fn remove_roster_item(&mut self, jid: &str) {
        self.command(&format!("UNROSTER {jid}"), COMMAND_TIMEOUT);
    }

    /// Send available presence again.
    pub fn presence(&mut self) {
        self.command("PRESENCE", COMMAND_TIMEOUT);
    }

    /// Whether the client is logged in.
    pub fn is_connected(&mut self) -> bool {
        let (_, rest) = self.command("STATUS", COMMAND_TIMEOUT);
        rest.starts_with("connected")
    }

    /// Close the stream cleanly (`</stream:stream>`), keep the process.
    pub fn close(&mut self) {
        self.command("CLOSE", COMMAND_TIMEOUT);
    }

    /// Drop the TCP connection without closing the stream.
    pub fn abort(&mut self) {
        self.command("ABORT", COMMAND_TIMEOUT);
    }

    /// Log in again after [`close`](Self::close) / [`abort`](Self::abort);
    /// returns the new full JID.
    pub fn reconnect(&mut self) -> String {
        let (_, jid) = self.command("CONNECT", LOGIN_TIMEOUT);
        self.full_jid = jid.trim().to_string();
        self.full_jid.clone()
    }

    /// Like [`reconnect`](Self::reconnect), but a failed login is an
    /// `Err` instead of a panic (the process stays usable).
    pub fn try_reconnect(&mut self) -> Result<String, String> {
        let (_, jid) = self.try_command("CONNECT", LOGIN_TIMEOUT)?;
        self.full_jid = jid.trim().to_string();
        Ok(self.full_jid.clone())
    }

    /// Disconnect and end the process.
    pub fn quit(mut self) {
        self.shutdown();
    }

    /// Kill the process (SIGKILL): the TCP connection drops without a
    /// stream close.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin = None;
    }

    fn shutdown(&mut self) {
        if let Some(mut w) = self.stdin.take()
            && matches!(self.child.try_wait(), Ok(None))
        {
            let _ = w.write_all(b"QUIT\n").and_then(|_| w.flush());
            let _ = self.lines.recv_timeout(Duration::from_secs(5));
            drop(w);
            for _ in 0..50 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for XmppClient {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Do not block a failing test; just make sure nothing lingers.
            let _ = self.child.kill();
            let _ = self.child.wait();
        } else {
            self.shutdown();
        }
    }
}
