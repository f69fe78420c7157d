//! The `o2tr-proxy` command line, run as a process (assert_cmd): every
//! subcommand's happy path and its errors (exit codes, one-line messages),
//! configuration precedence, and interop with libotr's key files.

#[path = "common/pair.rs"]
mod pair;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use tempfile::TempDir;

use o2tr_proxy::otr::crypto::Fingerprint;
use o2tr_proxy::store::{ConversationKey, SessionState, SqliteStore, Store, Trust};

const BIN: &str = env!("CARGO_BIN_EXE_o2tr-proxy");

/// A temporary home: XDG directories point inside it and no `O2TR_*`
/// variable of the caller leaks in.
struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Env { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn state(&self) -> PathBuf {
        self.path().join("state")
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("O2TR_") {
                c.env_remove(k);
            }
        }
        c.env_remove("RUST_LOG")
            .env("XDG_DATA_HOME", self.path().join("data"))
            .env("XDG_CONFIG_HOME", self.path().join("config"));
        c
    }

    /// `cmd` with the subcommand `args[0]`, `--state-dir STATE`, the rest.
    fn state_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.cmd();
        c.arg(args[0])
            .arg("--state-dir")
            .arg(self.state())
            .args(&args[1..]);
        c
    }
}

fn stdout_of(c: &mut Command) -> String {
    let out = c.assert().success().get_output().stdout.clone();
    String::from_utf8(out).unwrap()
}

/// Asserts exit `code` and a single-line stderr containing every needle.
fn fails(c: &mut Command, code: i32, needles: &[&str]) {
    let out = c.assert().code(code).get_output().clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err:?}");
    }
}

// ---------------------------------------------------------------- help

#[test]
fn help_lists_every_subcommand() {
    let e = Env::new();
    let out = stdout_of(e.cmd().arg("--help"));
    for sub in [
        "run",
        "keygen",
        "fingerprint",
        "trust",
        "distrust",
        "sessions",
        "forget",
        "decode",
        "certs",
        "import-libotr",
    ] {
        assert!(out.contains(sub), "{sub}");
    }
    let out = stdout_of(e.cmd().args(["run", "--help"]));
    assert!(out.contains("--check-config") && out.contains("--upstream-insecure"));
    e.cmd().arg("frobnicate").assert().code(2);
    e.cmd().arg("keygen").assert().code(2); // --account missing
}

// ---------------------------------------------------------------- run: config

#[test]
fn precedence_flag_env_file_default() {
    let e = Env::new();
    let file = e.path().join("o2tr.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:1001\"\npolicy = \"manual\"\nfragment_size = 300\n\
             allow_plaintext_client = true\nstate_dir = \"{}\"\n",
            e.state().display()
        ),
    )
    .unwrap();
    let out = stdout_of(
        e.cmd()
            .env("O2TR_LISTEN", "127.0.0.1:1002")
            .env("O2TR_POLICY", "opportunistic")
            .args([
                "run",
                "--check-config",
                "--listen",
                "127.0.0.1:1003",
                "--config",
            ])
            .arg(&file),
    );
    assert!(
        out.contains("listen = \"127.0.0.1:1003\"  # --listen"),
        "{out}"
    );
    assert!(
        out.contains("policy = \"opportunistic\"  # O2TR_POLICY"),
        "{out}"
    );
    assert!(
        out.contains("fragment_size = 300  # fragment_size in"),
        "{out}"
    );
    assert!(
        out.contains("max_stanza_bytes = 1048576  # default"),
        "{out}"
    );
    assert!(out.contains("# configuration OK"));

    // Without the flag the variable wins; without both, the file.
    let out = stdout_of(
        e.cmd()
            .env("O2TR_LISTEN", "127.0.0.1:1002")
            .env("O2TR_CONFIG", &file)
            .args(["run", "--check-config"]),
    );
    assert!(
        out.contains("listen = \"127.0.0.1:1002\"  # O2TR_LISTEN"),
        "{out}"
    );
    let out = stdout_of(e.cmd().env("O2TR_CONFIG", &file).args(["run", "--dry-run"]));
    assert!(
        out.contains("listen = \"127.0.0.1:1001\"  # listen in"),
        "{out}"
    );

    // Boolean flags can be switched off explicitly over the file.
    let out = stdout_of(
        e.cmd()
            .args(["run", "--check-config", "--debug-packets", "--config"])
            .arg(&file),
    );
    assert!(
        out.contains("debug_packets = true  # --debug-packets"),
        "{out}"
    );
    fails(
        e.cmd()
            .args([
                "run",
                "--check-config",
                "--allow-plaintext-client=false",
                "--config",
            ])
            .arg(&file),
        2,
        &["o2tr-proxy certs"],
    );

    // The default file under XDG_CONFIG_HOME is read when present.
    let dflt = e.path().join("config/o2tr-proxy");
    std::fs::create_dir_all(&dflt).unwrap();
    std::fs::copy(&file, dflt.join("config.toml")).unwrap();
    let out = stdout_of(e.cmd().args(["run", "--check-config"]));
    assert!(out.contains("127.0.0.1:1001"), "{out}");
}

#[test]
fn config_errors_are_one_line_and_exit_2() {
    let e = Env::new();
    let st = e.state();
    let st = st.to_str().unwrap();
    let file = e.path().join("bad.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:5222\"\nlisten_address = \"x\"\n",
    )
    .unwrap();
    fails(
        e.cmd()
            .args(["run", "--check-config", "--config"])
            .arg(&file),
        2,
        &["listen_address", "bad.toml"],
    );
    std::fs::write(&file, "max_stanza_bytes = \"big\"\n").unwrap();
    fails(
        e.cmd().args(["run", "--config"]).arg(&file),
        2,
        &["max_stanza_bytes"],
    );
    fails(
        e.cmd().args(["run", "--config", "/nonexistent/o2tr.toml"]),
        2,
        &["/nonexistent/o2tr.toml"],
    );
    let plain = ["run", "--allow-plaintext-client", "--state-dir", st];
    fails(
        e.cmd().args(plain).args(["--listen", "localhost:5222"]),
        2,
        &["--listen", "localhost:5222"],
    );
    fails(
        e.cmd().args(plain).env("O2TR_LISTEN", "nope"),
        2,
        &["O2TR_LISTEN"],
    );
    fails(
        e.cmd().args(plain).args(["--upstream", "example.org"]),
        2,
        &["--upstream", "HOST:PORT"],
    );
    fails(
        e.cmd().args(plain).args(["--policy", "sometimes"]),
        2,
        &["--policy", "sometimes"],
    );
    fails(
        e.cmd().args(plain).env("O2TR_MAX_STANZA_BYTES", "lots"),
        2,
        &["O2TR_MAX_STANZA_BYTES"],
    );
    fails(
        e.cmd().args(plain).args(["--listen", "0.0.0.0:5222"]),
        2,
        &["non-loopback", "0.0.0.0:5222"],
    );
    fails(
        e.cmd()
            .args(plain)
            .args(["--tls-cert", "/nonexistent/cert.pem"]),
        2,
        &["--tls-cert", "--tls-key"],
    );
    fails(
        e.cmd().args(plain).args([
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ]),
        2,
        &["/nonexistent/cert.pem"],
    );
    fails(
        e.cmd()
            .args(plain)
            .args(["--upstream-ca", "/nonexistent/ca.pem"]),
        2,
        &["upstream_ca", "/nonexistent/ca.pem"],
    );
    // No certificate anywhere and plaintext not allowed.
    fails(
        e.cmd().args(["run", "--state-dir", st]),
        2,
        &["o2tr-proxy certs", "--allow-plaintext-client"],
    );
    // A state directory others can write to.
    std::fs::create_dir_all(e.state()).unwrap();
    set_mode(&e.state(), 0o777);
    fails(e.cmd().args(plain), 2, &["state_dir", "0777"]);
    fails(&mut e.state_cmd(&["fingerprint"]), 2, &["0777"]);
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------- run: process

/// Starts `run`, waits for "listening on", sends SIGTERM, expects exit 0.
fn run_until_listening(e: &Env, extra: &[&str]) -> String {
    run_with_client(e, extra, None)
}

/// Like [`run_until_listening`]; with `client = Some(bytes)`, connects once
/// listening, sends the bytes and waits for the `C→P` log line of the
/// stream header.
fn run_with_client(e: &Env, extra: &[&str], client: Option<&[u8]>) -> String {
    let mut child = std::process::Command::new(BIN)
        .env_remove("RUST_LOG")
        .env("XDG_DATA_HOME", e.path().join("data"))
        .env("XDG_CONFIG_HOME", e.path().join("config"))
        .args(["run", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(e.state())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("no 'listening on' line; log so far:\n{log}")
            });
        log.push_str(&line);
        log.push('\n');
        if let Some(addr) = line.split("listening on ").nth(1) {
            let Some(bytes) = client else { break };
            let addr = addr.trim().to_owned();
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            std::io::Write::write_all(&mut s, bytes).unwrap();
            std::mem::forget(s); // keep it open until the process ends
        }
        if client.is_some() && line.contains("C→P") && line.contains("stream:stream") {
            break;
        }
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not stop on SIGTERM:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        log.push_str(&line);
        log.push('\n');
    }
    assert_eq!(code, Some(0), "{log}");
    log
}

#[test]
fn run_starts_and_stops_on_sigterm() {
    let e = Env::new();
    let log = run_until_listening(&e, &["--allow-plaintext-client", "--log-format", "json"]);
    assert!(log.contains("\"level\":\"INFO\""), "{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    // The store was created private.
    assert_eq!(mode_of(&e.state()), 0o700);

    // With certificates made by `certs`, the state directory's are used.
    e.state_cmd(&["certs", "--domain", "example.test"])
        .assert()
        .success();
    let log = run_until_listening(&e, &["--debug-packets"]);
    assert!(log.contains("STARTTLS"), "{log}");
}

#[test]
fn debug_packets_logs_frames_of_the_proxy_only() {
    let e = Env::new();
    let header = b"<?xml version='1.0'?><stream:stream to='example.test' version='1.0' \
        xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
    let log = run_with_client(
        &e,
        &[
            "--allow-plaintext-client",
            "--debug-packets",
            "--upstream",
            "127.0.0.1:9",
        ],
        Some(header),
    );
    let frame = log
        .lines()
        .find(|l| l.contains("C→P") && l.contains("stream:stream"))
        .unwrap();
    assert!(
        frame.contains("DEBUG") && frame.contains("o2tr_proxy::proxy"),
        "{frame}"
    );
    assert!(!log.contains('\u{1b}'), "no colours when not a terminal");
    // Nothing else is raised to debug.
    for l in log.lines().filter(|l| l.contains("DEBUG")) {
        assert!(l.contains("o2tr_proxy::proxy"), "{l}");
    }
}

// ---------------------------------------------------------------- keys, trust, sessions

#[test]
fn keygen_fingerprint_trust_sessions_forget() {
    let e = Env::new();
    let out = stdout_of(&mut e.state_cmd(&["keygen", "--account", "Alice@Example.test/Phone"]));
    let (account, fpr) = out.trim().split_once('\t').unwrap();
    assert_eq!(account, "alice@example.test");
    assert!(Fingerprint::from_hex(fpr).is_some(), "{fpr}");
    assert_eq!(fpr.split(' ').count(), 5);
    assert_eq!(mode_of(&e.state()), 0o700);
    assert_eq!(mode_of(&e.state().join("o2tr.db")), 0o600);

    // Refuses to replace the key, unless --force.
    fails(
        &mut e.state_cmd(&["keygen", "--account", "alice@example.test"]),
        1,
        &["already has a key", "--force"],
    );
    let out = stdout_of(&mut e.state_cmd(&["fingerprint", "--account", "alice@example.test"]));
    assert_eq!(out.trim(), fpr);
    let out = stdout_of(&mut e.state_cmd(&["fingerprint"]));
    assert_eq!(out.trim(), format!("alice@example.test\t{fpr}"));
    fails(
        &mut e.state_cmd(&["fingerprint", "--account", "nobody@example.test"]),
        1,
        &["no key for nobody@example.test"],
    );
    fails(
        &mut e.state_cmd(&["keygen", "--account", "not a jid"]),
        2,
        &["invalid account"],
    );

    // Trust, then distrust, a peer fingerprint.
    let bob = pair::keys().1.public_key().fingerprint();
    let out = stdout_of(&mut e.state_cmd(&[
        "trust",
        "--account",
        "alice@example.test",
        "--peer",
        "bob@example.test",
        "--fingerprint",
        &bob.to_hex(),
    ]));
    assert!(out.contains("verified"), "{out}");
    let peers = stdout_of(&mut e.state_cmd(&["fingerprint", "--peers"]));
    assert!(
        peers.contains(&format!(
            "alice@example.test\tbob@example.test\t{bob}\tverified"
        )),
        "{peers}"
    );
    fails(
        &mut e.state_cmd(&[
            "trust",
            "--account",
            "alice@example.test",
            "--peer",
            "bob@example.test",
            "--fingerprint",
            "abcd",
        ]),
        2,
        &["invalid fingerprint"],
    );

    // A real session: Alice's snapshot after an AKE and one message each way.
    let mut p = pair::Pair::new();
    p.establish();
    p.alice.send("hello bob", p.now);
    p.run();
    p.bob.send("hello alice", p.now);
    p.run();
    assert!(!p.alice.snapshots.is_empty());
    {
        let mut store = SqliteStore::open(&e.state()).unwrap();
        for (instance, snap) in &p.alice.snapshots {
            let key = ConversationKey::new("alice@example.test", "bob@example.test", *instance);
            store
                .save_snapshot(&key, SessionState::Suspended, snap, p.now)
                .unwrap();
        }
        // And a handshake of Alice's waiting for a Signature (a refresh).
        store
            .commit_step(
                "alice@example.test",
                "bob@example.test",
                &[o2tr_proxy::store::DurableOp::SaveHandshake {
                    instance: pair::BOB_TAG,
                    data: o2tr_proxy::otr::crypto::SecretBytes::from_slice(b"O2TR-AKE record"),
                }],
                p.now,
            )
            .unwrap();
    }
    let out = stdout_of(&mut e.state_cmd(&["sessions"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("ACCOUNT"), "{out}");
    let row = lines[1];
    for needle in [
        "alice@example.test",
        "bob@example.test",
        &format!("{:08x}", pair::BOB_TAG),
        "suspended",
        "v3",
        &bob.to_string(),
        "verified",
    ] {
        assert!(row.contains(needle), "{needle:?} not in {row:?}");
    }

    let out = stdout_of(&mut e.state_cmd(&[
        "distrust",
        "--account",
        "alice@example.test",
        "--peer",
        "bob@example.test",
        "--fingerprint",
        &bob.to_string(),
    ]));
    assert!(out.contains("distrusted"), "{out}");
    let out = stdout_of(&mut e.state_cmd(&["sessions"]));
    assert!(out.contains("distrusted"), "{out}");

    let out = stdout_of(&mut e.state_cmd(&[
        "forget",
        "--account",
        "alice@example.test",
        "--peer",
        "bob@example.test",
    ]));
    assert!(out.contains("wiped 1 session"), "{out}");
    assert!(out.contains("1 unfinished handshake"), "{out}");
    let out = stdout_of(&mut e.state_cmd(&["sessions"]));
    assert_eq!(out.trim(), "no sessions");
    let store = SqliteStore::open(&e.state()).unwrap();
    assert!(
        store
            .handshakes("alice@example.test", "bob@example.test")
            .unwrap()
            .is_empty()
    );
    drop(store);

    // --force replaces the key.
    let out =
        stdout_of(&mut e.state_cmd(&["keygen", "--account", "alice@example.test", "--force"]));
    assert!(!out.contains(fpr), "{out}");
}

#[test]
fn read_commands_do_not_create_a_state_dir() {
    let e = Env::new();
    fails(
        &mut e.state_cmd(&["fingerprint"]),
        1,
        &["no store", "keygen"],
    );
    fails(&mut e.state_cmd(&["sessions"]), 1, &["no store"]);
    assert!(!e.state().exists());
    // O2TR_STATE_DIR is honoured by every subcommand.
    let mut c = e.cmd();
    c.env("O2TR_STATE_DIR", e.state())
        .args(["keygen", "--account", "carol@example.test"]);
    c.assert().success();
    assert!(e.state().join("o2tr.db").exists());
}

// ---------------------------------------------------------------- decode

#[test]
fn decode_real_messages() {
    let e = Env::new();
    let mut p = pair::Pair::new();
    p.establish();
    p.alice.send("hello bob", p.now);
    let data = p.alice.outbox.back().cloned().unwrap();
    assert!(data.starts_with("?OTR:AAMD"), "{data}");
    let out = stdout_of(e.cmd().args(["decode", &data]));
    assert!(out.contains("Data message"), "{out}");
    assert!(!out.contains("hello bob"));
    // From stdin.
    let out = stdout_of(
        e.cmd()
            .args(["decode", "-"])
            .write_stdin(format!("{data}\n")),
    );
    assert!(out.contains("Data message"), "{out}");
    let out = stdout_of(e.cmd().args(["decode", "?OTRv23?"]));
    assert!(
        out.contains("Query message") && out.contains("v2, v3"),
        "{out}"
    );
    // The first message of the AKE (DH commit).
    let q = pair::Pair::new();
    let mut bob = q.bob;
    bob.receive("?OTRv3?", q.now);
    let commit = bob.outbox.pop_front().unwrap();
    let out = stdout_of(e.cmd().args(["decode", &commit]));
    assert!(out.to_lowercase().contains("commit"), "{out}");

    fails(
        e.cmd().args(["decode", "?OTR:AAMDnonsense."]),
        1,
        &["malformed OTR message"],
    );
}

// ---------------------------------------------------------------- certs

#[test]
fn certs_make_a_ca_and_a_leaf_that_verifies() {
    use o2tr_proxy::certs::{CA_FILE, CERT_FILE, KEY_FILE};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::client::danger::ServerCertVerifier;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let e = Env::new();
    let out_dir = e.path().join("mycerts");
    let out = stdout_of(
        e.cmd()
            .args(["certs", "--domain", "example.test", "--out"])
            .arg(&out_dir),
    );
    assert!(out.contains("update-ca-certificates"), "{out}");
    assert!(out.contains("SHA-256"), "{out}");
    assert_eq!(mode_of(&out_dir.join(KEY_FILE)), 0o600);
    assert_eq!(mode_of(&out_dir), 0o700);

    let ca = CertificateDer::from_pem_file(out_dir.join(CA_FILE)).unwrap();
    let leaf = CertificateDer::from_pem_file(out_dir.join(CERT_FILE)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    for name in ["example.test", "localhost", "127.0.0.1", "::1"] {
        let sn = ServerName::try_from(name).unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &sn, &[], UnixTime::now())
            .unwrap_or_else(|err| panic!("{name}: {err}"));
    }
    let other = ServerName::try_from("other.test").unwrap();
    assert!(
        verifier
            .verify_server_cert(&leaf, &[], &other, &[], UnixTime::now())
            .is_err()
    );

    // The files work as --tls-cert/--tls-key.
    let out = stdout_of(
        e.cmd()
            .args(["run", "--check-config", "--state-dir"])
            .arg(e.state())
            .arg("--tls-cert")
            .arg(out_dir.join(CERT_FILE))
            .arg("--tls-key")
            .arg(out_dir.join(KEY_FILE)),
    );
    assert!(out.contains("tls_cert = "), "{out}");
    // A mismatched pair is refused.
    fails(
        e.cmd()
            .args(["run", "--check-config", "--state-dir"])
            .arg(e.state())
            .arg("--tls-cert")
            .arg(out_dir.join(CA_FILE))
            .arg("--tls-key")
            .arg(out_dir.join(KEY_FILE)),
        2,
        &["tls_key"],
    );

    fails(
        e.cmd()
            .args(["certs", "--domain", "example.test", "--out"])
            .arg(&out_dir),
        1,
        &["already exists", "--force"],
    );
    e.cmd()
        .args(["certs", "--force", "--domain", "example.test", "--out"])
        .arg(&out_dir)
        .assert()
        .success();
    fails(
        e.cmd().args(["certs", "--domain", "not a domain"]),
        2,
        &["invalid domain"],
    );
}

// ---------------------------------------------------------------- import-libotr

/// A key written by libotr 4.1.1 (`otrl_privkey_generate`, account
/// "alice@example.test/Home", protocol prpl-jabber) and the fingerprint
/// libotr printed for it (`otrl_privkey_fingerprint`).
const LIBOTR_KEY: &str = r#"(privkeys
 (account
(name "alice@example.test/Home")
(protocol prpl-jabber)
(private-key 
 (dsa 
  (p #00E1093AFBAF507E160F7B491787113D4BD898A23CA7A4133BC2106C0BA6FE94A6DB1D07BD42642C4796AF223F82658641B0A8C449D424DDA97742963DE893CF57A689FD8BE9BE1FF1EAD4BE85C46837F557392A0E55FE9D35B42B300E0E92FF50E95D5A898348AC4D681E27E84233A2F1EC8311417C2A38FB570D8E769F515217#)
  (q #00E7B8D081E6D525E3595143EE0FBB30496BE00297#)
  (g #00C28515192B39FB44E2E09FCE6C90D3075371D4488196232A7B3ABA7CBCEA01440E5304D99B2433DFCD3A07B1862DD154C6BA0BB28A668499550648F23B75242B91A1736858C9DC7D7C47282778EA921002738085843E6AA1CBFAB94462ECB194E11B988E5EE554CBEE54050FDFF4FA61503C1E912D04CFCF55809B765EB4223F#)
  (y #00B882D3601BF9A4C2515685581E5BC313E0FEB84DEDB81473CF0D0D1618EDD8FC3B3B4D86889212A58AF99D84CDF866EBDCDE064F4A6A6EA2FB2619FC40F59DF8FA80A5E04D50ACBF755378F047C1596514B037FB9A0AC02443C3A01ECE2014CD4B8B83AFDCE9E519BC261F45EF76B0CD9C2BD9E369D717189EB9E30CF9E8A05D#)
  (x #00BF4E22BE6C36944FEBED015D02763E64DFB399EC#)
  )
 )
 )
)
"#;
const LIBOTR_FPR: &str = "4C3F3FFB 245347D9 6737EBFA F737BB4B 74C8A68F";
const LIBOTR_TAGS: &str = "# WARNING! You shouldn't copy this file to another computer. \
It is unnecessary and can cause problems.\nalice@example.test/Home\tprpl-jabber\t844aab3f\n";
const LIBOTR_FPRS: &str = "bob@example.test\talice@example.test/Home\tprpl-jabber\t\
101112131415161718191a1b1c1d1e1f20212223\tverified\n\
carol@example.test\talice@example.test/Home\tprpl-jabber\t\
ee1112131415161718191a1b1c1d1e1f20212223\t\n";

/// Imports the libotr files in `dir` and checks our fingerprint, instance
/// tag and trust against `fpr` / `tag`.
fn check_import(e: &Env, dir: &Path, fpr: &str, tag: u32) {
    let out = stdout_of(
        e.state_cmd(&["import-libotr", "--private-key"])
            .arg(dir.join("otr.private_key")),
    );
    assert_eq!(out.trim(), format!("alice@example.test\t{fpr}"));
    let out = stdout_of(&mut e.state_cmd(&["fingerprint", "--account", "alice@example.test"]));
    assert_eq!(out.trim(), fpr);
    let store = SqliteStore::open(&e.state()).unwrap();
    assert_eq!(store.instance_tag("alice@example.test").unwrap(), Some(tag));
    let f = store
        .fingerprints("alice@example.test", "bob@example.test")
        .unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].trust, Trust::Verified);
    let f = store
        .fingerprints("alice@example.test", "carol@example.test")
        .unwrap();
    assert_eq!(f[0].trust, Trust::Unverified);
}

#[test]
fn import_libotr_fixture() {
    let e = Env::new();
    let dir = e.path().join("purple");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("otr.private_key"), LIBOTR_KEY).unwrap();
    std::fs::write(dir.join("otr.instance_tags"), LIBOTR_TAGS).unwrap();
    std::fs::write(dir.join("otr.fingerprints"), LIBOTR_FPRS).unwrap();
    check_import(&e, &dir, LIBOTR_FPR, 0x844a_ab3f);

    // A second import of the same key is fine; a different key needs --force.
    e.state_cmd(&["import-libotr", "--private-key"])
        .arg(dir.join("otr.private_key"))
        .assert()
        .success();
    let e2 = Env::new();
    e2.state_cmd(&["keygen", "--account", "alice@example.test"])
        .assert()
        .success();
    fails(
        e2.state_cmd(&["import-libotr", "--private-key"])
            .arg(dir.join("otr.private_key")),
        1,
        &["already has a different key", "--force"],
    );
    // --account filters.
    fails(
        e2.state_cmd(&[
            "import-libotr",
            "--account",
            "zed@example.test",
            "--private-key",
        ])
        .arg(dir.join("otr.private_key")),
        1,
        &["no XMPP key for zed@example.test"],
    );
    // Bad input.
    std::fs::write(dir.join("broken"), "(privkeys (account (name \"a@b\")").unwrap();
    fails(
        e2.state_cmd(&["import-libotr", "--private-key"])
            .arg(dir.join("broken")),
        1,
        &["broken", "S-expression"],
    );
    fails(
        &mut e2.state_cmd(&[
            "import-libotr",
            "--private-key",
            "/nonexistent/otr.private_key",
        ]),
        2,
        &["/nonexistent/otr.private_key"],
    );
}

/// A tiny libotr program: generates a key and an instance tag for
/// `alice@example.test/Home` (prpl-jabber), writes a fingerprints file with
/// bob (verified) and carol (unverified), prints libotr's human fingerprint
/// and the tag.
const LIBOTR_GEN_C: &str = r#"
#include <stdio.h>
#include <gcrypt.h>
#include <libotr/proto.h>
#include <libotr/privkey.h>
#include <libotr/instag.h>
#include <libotr/context.h>
int main(int argc, char **argv) {
    char kf[4096], tf[4096], ff[4096];
    char human[OTRL_PRIVKEY_FPRINT_HUMAN_LEN];
    unsigned char fp[20];
    const char *acc = "alice@example.test/Home", *proto = "prpl-jabber";
    OtrlUserState us; OtrlInsTag *tag; ConnContext *ctx; Fingerprint *f; int i;
    if (argc != 2) return 2;
    OTRL_INIT;
    us = otrl_userstate_create();
    snprintf(kf, sizeof kf, "%s/otr.private_key", argv[1]);
    snprintf(tf, sizeof tf, "%s/otr.instance_tags", argv[1]);
    snprintf(ff, sizeof ff, "%s/otr.fingerprints", argv[1]);
    if (otrl_privkey_generate(us, kf, acc, proto)) return 1;
    if (otrl_instag_generate(us, tf, acc, proto)) return 1;
    for (i = 0; i < 20; i++) fp[i] = (unsigned char)(0x10 + i);
    ctx = otrl_context_find(us, "bob@example.test", acc, proto, OTRL_INSTAG_MASTER, 1, NULL, NULL, NULL);
    f = otrl_context_find_fingerprint(ctx, fp, 1, NULL);
    otrl_context_set_trust(f, "verified");
    fp[0] = 0xee;
    ctx = otrl_context_find(us, "carol@example.test", acc, proto, OTRL_INSTAG_MASTER, 1, NULL, NULL, NULL);
    otrl_context_find_fingerprint(ctx, fp, 1, NULL);
    if (otrl_privkey_write_fingerprints(us, ff)) return 1;
    if (!otrl_privkey_fingerprint(us, human, acc, proto)) return 1;
    tag = otrl_instag_find(us, acc, proto);
    printf("%s\n%08x\n", human, tag ? tag->instag : 0);
    return 0;
}
"#;

/// Compiles [`LIBOTR_GEN_C`]; `None` (test skipped) when gcc or libotr's
/// headers are missing.
fn build_libotr_gen(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("gen.c");
    let bin = dir.join("gen");
    std::fs::write(&src, LIBOTR_GEN_C).unwrap();
    let flags = std::process::Command::new("pkg-config")
        .args(["--cflags", "--libs", "libotr"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "-lotr".into());
    let status = std::process::Command::new("gcc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .args(flags.split_whitespace())
        .args(["-lgcrypt", "-lgpg-error"])
        .stderr(Stdio::null())
        .status()
        .ok()?;
    status.success().then_some(bin)
}

#[test]
fn import_libotr_fresh_key_matches_libotr_fingerprint() {
    let e = Env::new();
    let Some(gen_bin) = build_libotr_gen(e.path()) else {
        eprintln!("SKIP: gcc or libotr5-dev not available");
        return;
    };
    let dir = e.path().join("libotr");
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(gen_bin)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = String::from_utf8(out.stdout).unwrap();
    let mut lines = out.lines();
    let fpr = lines.next().unwrap().to_owned();
    let tag = u32::from_str_radix(lines.next().unwrap(), 16).unwrap();
    check_import(&e, &dir, &fpr, tag);
}
