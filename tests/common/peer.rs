//! Harness driving real OTR implementations as child processes.
//!
//! Two peer programs speak one line protocol on stdin/stdout (described in
//! `tests/peers/README.md`):
//!
//! * [`PeerKind::Libotr`]: `tests/peers/libotr_peer.c`, libotr 4.1.1 (OTR v2
//!   and v3), compiled on first use into `target/test-peers/libotr_peer` by
//!   `tests/peers/build.sh`;
//! * [`PeerKind::Potr`]: `tests/peers/potr_peer.py`, python-potr 1.0.2 (OTR
//!   v2 only), run with `$O2TR_POTR_PYTHON` (default
//!   `/opt/potr-venv/bin/python`).
//!
//! The test is the network: it takes the `WIRE` lines a peer emits and hands
//! them to the other side (our core, or another peer). Every read has a
//! timeout ([`DEFAULT_TIMEOUT`]), so a stuck peer fails the test instead of
//! hanging it. The convenience methods panic with the peer's stderr tail on
//! any protocol error; [`PeerProcess::command`] returns the error instead.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// How long to wait for any single line from a peer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of a peer's stderr is kept for error messages.
const STDERR_KEEP: usize = 16 * 1024;

/// Which real OTR implementation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerKind {
    /// libotr 4.1.1, the C reference implementation (OTR v2 + v3).
    Libotr,
    /// python-potr 1.0.2 (OTR v2 only, no instance tags).
    Potr,
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerKind::Libotr => "libotr",
            PeerKind::Potr => "potr",
        })
    }
}

/// Which OTR protocol versions a peer allows (`--policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Version 2 only.
    V2,
    /// Version 3 only (potr then allows nothing).
    V3,
    /// Versions 2 and 3.
    V23,
}

impl PeerPolicy {
    fn arg(self) -> &'static str {
        match self {
            PeerPolicy::V2 => "v2",
            PeerPolicy::V3 => "v3",
            PeerPolicy::V23 => "v23",
        }
    }
}

/// Start-up options of a peer.
#[derive(Clone, Debug, Default)]
pub struct PeerOptions {
    /// Allowed versions; `None` = the peer's default (libotr v23, potr v2).
    pub policy: Option<PeerPolicy>,
    /// Maximum wire message size; larger messages are fragmented. `None` or
    /// `Some(0)` = no fragmentation.
    pub fragment_size: Option<usize>,
    /// REQUIRE_ENCRYPTION policy (libotr's OTRL_POLICY_ALWAYS).
    pub always: bool,
}

impl PeerOptions {
    /// Options with the given version policy.
    pub fn policy(policy: PeerPolicy) -> Self {
        Self {
            policy: Some(policy),
            ..Self::default()
        }
    }

    /// Sets the fragment size.
    pub fn with_fragment_size(mut self, size: usize) -> Self {
        self.fragment_size = Some(size);
        self
    }

    /// Sets REQUIRE_ENCRYPTION.
    pub fn with_always(mut self) -> Self {
        self.always = true;
        self
    }
}

/// Everything a peer printed in answer to one command (before `OK`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerOutput {
    /// Wire messages to put on the network, decoded, in order (each
    /// fragment separately).
    pub wire: Vec<String>,
    /// Text shown to the user, decoded.
    pub plain: Vec<String>,
    /// `(name, detail)` of every `EVENT` line, in order; `detail` is the raw
    /// rest of the line (base64 for free text, see [`Self::event_text`]).
    pub events: Vec<(String, String)>,
    /// Any other line (`STATUS`, `FPR`, `TIMER`, ...), verbatim.
    pub other: Vec<String>,
}

impl PeerOutput {
    /// Whether an event of this name was reported.
    pub fn has_event(&self, name: &str) -> bool {
        self.events.iter().any(|(n, _)| n == name)
    }

    /// Raw detail of the first event of this name.
    pub fn event(&self, name: &str) -> Option<&str> {
        self.events
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_str())
    }

    /// Detail of the first event of this name, base64-decoded to text (for
    /// `smp_request`, `otr_error`, `unencrypted`, `setup_error`).
    pub fn event_text(&self, name: &str) -> Option<String> {
        self.event(name).map(|d| decode_text(d).unwrap_or_default())
    }

    /// Names of all events, in order.
    pub fn event_names(&self) -> Vec<&str> {
        self.events.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Appends `other`'s lines to ours.
    pub fn extend(&mut self, other: PeerOutput) {
        self.wire.extend(other.wire);
        self.plain.extend(other.plain);
        self.events.extend(other.events);
        self.other.extend(other.other);
    }
}

/// Message state of a peer's conversation (`STATUS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgState {
    /// No private conversation.
    Plaintext,
    /// Private conversation established.
    Encrypted,
    /// The other side ended the private conversation.
    Finished,
}

/// Answer to `STATUS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// Message state.
    pub state: MsgState,
    /// Fingerprint (40 lowercase hex) of the other side, when encrypted.
    pub peer_fingerprint: Option<String>,
    /// Protocol version in use, when encrypted.
    pub version: Option<u8>,
    /// The other side's instance tag (libotr, v3 only).
    pub their_instag: Option<u32>,
}

/// A running peer program.
pub struct PeerProcess {
    kind: PeerKind,
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<io::Result<String>>,
    stderr: Arc<Mutex<String>>,
    fingerprint: String,
    timeout: Duration,
}

impl fmt::Debug for PeerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerProcess")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl PeerProcess {
    /// Starts a peer for `account` talking to `peer`, keeping its key,
    /// instance tag and known fingerprints in `dir` (created if missing; a key
    /// is generated only when `dir` has none). Waits for `READY`.
    pub fn spawn(
        kind: PeerKind,
        account: &str,
        peer: &str,
        dir: &Path,
        opts: &PeerOptions,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut cmd = match kind {
            PeerKind::Libotr => Command::new(libotr_peer_path()?),
            PeerKind::Potr => {
                let mut c = Command::new(potr_python());
                c.arg(potr_script());
                c
            }
        };
        cmd.arg("--account")
            .arg(account)
            .arg("--peer")
            .arg(peer)
            .arg("--dir")
            .arg(dir);
        if let Some(p) = opts.policy {
            cmd.arg("--policy").arg(p.arg());
        }
        if let Some(n) = opts.fragment_size {
            cmd.arg("--fragment-size").arg(n.to_string());
        }
        if opts.always {
            cmd.arg("--always");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot start {kind} peer ({e}); run scripts/install-test-deps.sh \
                     (or set O2TR_POTR_PYTHON / O2TR_LIBOTR_PEER)"
                ),
            )
        })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or_else(|| other("no stdout pipe"))?;
        let stderr_pipe = child.stderr.take().ok_or_else(|| other("no stderr pipe"))?;

        let (tx, lines) = mpsc::channel();
        thread::Builder::new()
            .name(format!("{kind}-{account}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let stop = line.is_err();
                    if tx.send(line).is_err() || stop {
                        break;
                    }
                }
            })?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_sink = Arc::clone(&stderr);
        thread::Builder::new()
            .name(format!("{kind}-{account}-stderr"))
            .spawn(move || {
                let mut r = BufReader::new(stderr_pipe);
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut s = stderr_sink.lock().unwrap_or_else(|p| p.into_inner());
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if s.len() > 2 * STDERR_KEEP {
                        let cut = s.len() - STDERR_KEEP;
                        let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                        s.drain(..cut);
                    }
                }
            })?;

        let mut p = PeerProcess {
            kind,
            name: format!("{kind}:{account}"),
            child,
            stdin,
            lines,
            stderr,
            fingerprint: String::new(),
            timeout: DEFAULT_TIMEOUT,
        };
        // Key generation happens before READY: allow it more time.
        let ready = p.read_line(Duration::from_secs(120))?;
        match ready.strip_prefix("READY ") {
            Some(fpr) if is_fingerprint(fpr) => p.fingerprint = fpr.to_owned(),
            _ => return Err(p.fail(&format!("expected READY <fingerprint>, got {ready:?}"))),
        }
        Ok(p)
    }

    /// Starts a peer whose key lives in the shared per-machine cache
    /// `target/test-peers/keys/<key_name>` (see [`keys_dir`]).
    pub fn spawn_cached(
        kind: PeerKind,
        key_name: &str,
        account: &str,
        peer: &str,
        opts: &PeerOptions,
    ) -> io::Result<Self> {
        Self::spawn(kind, account, peer, &keys_dir(key_name), opts)
    }

    /// Which implementation this is.
    pub fn kind(&self) -> PeerKind {
        self.kind
    }

    /// Our long-term DSA key fingerprint, 40 lowercase hex digits.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Changes the per-line read timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// What the peer wrote on stderr so far (last 16 KiB or more).
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends one raw command line and collects the answer up to `OK`.
    /// `ERR <text>`, a timeout or the peer's exit are errors.
    pub fn command(&mut self, line: &str) -> io::Result<PeerOutput> {
        debug_assert!(!line.contains('\n'));
        let stdin = self.stdin.as_mut().ok_or_else(|| other("stdin closed"))?;
        if let Err(e) = stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.write_all(b"\n"))
            .and_then(|()| stdin.flush())
        {
            return Err(self.fail(&format!("writing command: {e}")));
        }
        let mut out = PeerOutput::default();
        loop {
            let l = self.read_line(self.timeout)?;
            let (tag, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            match tag {
                "OK" if rest.is_empty() => return Ok(out),
                "ERR" => {
                    let cmd: String = line.chars().take(40).collect();
                    return Err(self.fail(&format!("command {cmd:?} failed: {rest}")));
                }
                "WIRE" => out.wire.push(self.decode(rest)?),
                "PLAIN" => out.plain.push(self.decode(rest)?),
                "EVENT" => {
                    let (n, d) = rest.split_once(' ').unwrap_or((rest, ""));
                    out.events.push((n.to_owned(), d.to_owned()));
                }
                _ => out.other.push(l),
            }
        }
    }

    fn run(&mut self, line: &str) -> PeerOutput {
        match self.command(line) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        }
    }

    /// The user typed `text`: returns everything the peer answered (wire
    /// messages, and events such as `connection_ended`).
    pub fn send(&mut self, text: &str) -> PeerOutput {
        self.run(&format!("SEND {}", B64.encode(text)))
    }

    /// The user typed `text`: returns the wire messages to deliver.
    pub fn send_text(&mut self, text: &str) -> Vec<String> {
        self.send(text).wire
    }

    /// A wire message arrived from the network.
    pub fn receive(&mut self, wire: &str) -> PeerOutput {
        self.run(&format!("RECV {}", B64.encode(wire)))
    }

    /// Starts OTR: returns the query message.
    pub fn query(&mut self) -> Vec<String> {
        self.run("QUERY").wire
    }

    /// Ends the private conversation: returns the wire messages (the
    /// disconnected TLV, when encrypted).
    pub fn end(&mut self) -> Vec<String> {
        self.run("END").wire
    }

    /// Current message state.
    pub fn status(&mut self) -> PeerStatus {
        let out = self.run("STATUS");
        let mut st = PeerStatus {
            state: MsgState::Plaintext,
            peer_fingerprint: None,
            version: None,
            their_instag: None,
        };
        let mut seen = false;
        for l in &out.other {
            let (tag, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            match tag {
                "STATUS" => {
                    seen = true;
                    st.state = match rest {
                        "plaintext" => MsgState::Plaintext,
                        "encrypted" => MsgState::Encrypted,
                        "finished" => MsgState::Finished,
                        _ => panic!("{}: bad STATUS line {l:?}", self.name),
                    }
                }
                "PEERFPR" => st.peer_fingerprint = Some(rest.to_owned()),
                "VERSION" => st.version = rest.parse().ok(),
                "THEIRINSTAG" => st.their_instag = u32::from_str_radix(rest, 16).ok(),
                _ => {}
            }
        }
        assert!(seen, "{}: no STATUS line in {out:?}", self.name);
        st
    }

    /// Our instance tag (libotr only; `None` for potr).
    pub fn instag(&mut self) -> Option<u32> {
        let out = self.command("INSTAG").ok()?;
        out.other
            .iter()
            .find_map(|l| l.strip_prefix("INSTAG "))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    }

    /// Starts SMP with `secret`: returns the wire messages.
    pub fn smp_start(&mut self, secret: &str) -> Vec<String> {
        self.run(&format!("SMP {}", B64.encode(secret))).wire
    }

    /// Starts SMP with a question shown to the other side.
    pub fn smp_start_with_question(&mut self, question: &str, secret: &str) -> Vec<String> {
        self.run(&format!(
            "SMPQ {} {}",
            B64.encode(question),
            B64.encode(secret)
        ))
        .wire
    }

    /// Answers an incoming SMP request (`smp_request` event) with `secret`.
    pub fn smp_answer(&mut self, secret: &str) -> Vec<String> {
        self.run(&format!("SMPANSWER {}", B64.encode(secret))).wire
    }

    /// Aborts SMP.
    pub fn smp_abort(&mut self) -> Vec<String> {
        self.run("SMPABORT").wire
    }

    /// Runs the library's periodic work (libotr `otrl_message_poll`).
    pub fn tick(&mut self) -> PeerOutput {
        self.run("TICK")
    }

    /// Asks the peer to exit and waits for it.
    pub fn quit(mut self) -> io::Result<ExitStatus> {
        self.command("QUIT")?;
        self.stdin = None;
        self.child.wait()
    }

    fn read_line(&mut self, timeout: Duration) -> io::Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(e)) => Err(self.fail(&format!("reading: {e}"))),
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                self.describe(&format!("no answer within {timeout:?}")),
            )),
            Err(RecvTimeoutError::Disconnected) => {
                // Give the stderr thread a moment to collect the last words.
                thread::sleep(Duration::from_millis(100));
                let status = self.child.try_wait().ok().flatten();
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    self.describe(&format!("peer exited ({status:?})")),
                ))
            }
        }
    }

    fn decode(&self, b64: &str) -> io::Result<String> {
        decode_text(b64).ok_or_else(|| self.fail(&format!("bad base64 from peer: {b64:?}")))
    }

    fn describe(&self, what: &str) -> String {
        let err = self.stderr();
        let tail: String = {
            let start = err.len().saturating_sub(2000);
            let start = (start..err.len())
                .find(|&i| err.is_char_boundary(i))
                .unwrap_or(0);
            err[start..].to_owned()
        };
        if tail.trim().is_empty() {
            format!("{}: {what}", self.name)
        } else {
            format!("{}: {what}\n--- peer stderr ---\n{tail}", self.name)
        }
    }

    fn fail(&self, what: &str) -> io::Error {
        other(&self.describe(what))
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Delivers `from_a` (wire messages `a` emitted) to `b`, then everything
/// each side answers to the other, until nobody has anything left to send.
/// Returns what `a` and `b` reported while receiving, accumulated. Panics
/// after 1000 deliveries (a ping-pong loop).
pub fn ferry(
    a: &mut PeerProcess,
    b: &mut PeerProcess,
    from_a: Vec<String>,
) -> (PeerOutput, PeerOutput) {
    ferry_both(a, b, from_a, Vec::new())
}

/// Like [`ferry`], with messages pending in both directions; `a`'s are
/// delivered first.
pub fn ferry_both(
    a: &mut PeerProcess,
    b: &mut PeerProcess,
    from_a: Vec<String>,
    from_b: Vec<String>,
) -> (PeerOutput, PeerOutput) {
    let mut out_a = PeerOutput::default();
    let mut out_b = PeerOutput::default();
    let mut to_b: std::collections::VecDeque<String> = from_a.into();
    let mut to_a: std::collections::VecDeque<String> = from_b.into();
    let mut steps = 0;
    while !to_a.is_empty() || !to_b.is_empty() {
        steps += 1;
        assert!(steps <= 1000, "ferry: more than 1000 deliveries");
        if let Some(m) = to_b.pop_front() {
            let o = b.receive(&m);
            to_a.extend(o.wire.iter().cloned());
            out_b.extend(o);
        } else if let Some(m) = to_a.pop_front() {
            let o = a.receive(&m);
            to_b.extend(o.wire.iter().cloned());
            out_a.extend(o);
        }
    }
    (out_a, out_b)
}

fn other(msg: &str) -> io::Error {
    io::Error::other(msg.to_owned())
}

fn is_fingerprint(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn decode_text(b64: &str) -> Option<String> {
    let bytes = B64.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

/// The repository root (where Cargo.toml lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/test-peers` (honours `CARGO_TARGET_DIR`).
pub fn test_peers_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() {
                repo_root().join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("test-peers")
}

/// Key cache directory for a named test identity:
/// `target/test-peers/keys/<name>`. Keys are generated once per machine.
pub fn keys_dir(name: &str) -> PathBuf {
    test_peers_dir().join("keys").join(name)
}

/// Path of the libotr peer binary: `$O2TR_LIBOTR_PEER` if set, else
/// `target/test-peers/libotr_peer`, built (once per process, atomically
/// across processes) by `tests/peers/build.sh` when missing or stale.
pub fn libotr_peer_path() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("O2TR_LIBOTR_PEER") {
        return Ok(PathBuf::from(p));
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out_dir = test_peers_dir();
            let script = repo_root().join("tests/peers/build.sh");
            let res = Command::new("sh")
                .arg(&script)
                .arg(&out_dir)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("running {}: {e}", script.display()))?;
            if !res.status.success() {
                return Err(format!(
                    "building the libotr peer failed ({}); is libotr5-dev installed? \
                     (scripts/install-test-deps.sh)\n{}{}",
                    res.status,
                    String::from_utf8_lossy(&res.stdout),
                    String::from_utf8_lossy(&res.stderr)
                ));
            }
            Ok(out_dir.join("libotr_peer"))
        })
        .clone()
        .map_err(|e| other(&e))
}

/// Python interpreter with python-potr: `$O2TR_POTR_PYTHON`, default
/// `/opt/potr-venv/bin/python`.
pub fn potr_python() -> PathBuf {
    std::env::var_os("O2TR_POTR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/potr-venv/bin/python"))
}

/// Path of `tests/peers/potr_peer.py`.
pub fn potr_script() -> PathBuf {
    repo_root().join("tests/peers/potr_peer.py")
}
