//! The disruption campaign (issue 9): randomized trials against a real
//! ejabberd on loopback, two `o2tr-proxy run` processes (one per side, each
//! behind a loopback relay that can cut its upstream link without a FIN)
//! and real slixmpp clients.
//!
//! Each trial picks a conversation (a pair from a pool whose AKE is done,
//! or a fresh pair for the AKE fault), exchanges a few messages, injects one
//! fault at a random moment — with messages in flight — and sends more
//! during and after it. Faults: client disconnect, proxy SIGKILL and
//! restart, upstream TCP cut without a FIN (the proxy must notice by its
//! pings), ejabberd restart, both sides offline at once, a fault during an
//! AKE, a fault between fragments (every proxy fragments at 300 bytes; those
//! trials send long bodies).
//!
//! "Sent" means the client accepted the message (`SEND` answered `OK` while
//! it believed it was online). Checks per trial: every sent message
//! delivered to the other client exactly once, in order per sender, and
//! decrypted (never `?OTR...`); no plaintext in the server's debug log (made
//! complete by a plaintext marker that must show up) or, at the end, in its
//! database; no D-H Commit crossing the server when the session could be
//! resumed. A loss is "explained" only for a named cause outside the proxy's
//! control that the harness knows it provoked (see [`Risk`]); any other loss,
//! a duplicate, an undecrypted body, a plaintext or an unneeded AKE fails
//! the test, after the table is printed.
//!
//! `O2TR_CHAOS_TRIALS` (default 50), `O2TR_CHAOS_SEED` (default: the clock;
//! printed), `O2TR_CHAOS_UPSTREAM_SM` (`true`/`false`; default: the proxy's
//! default), `O2TR_CHAOS_ONLY` (e.g. `2,5`: only those kinds, by index in
//! [`FAULTS`]), `O2TR_TEST_PROXY_LOG=FILE` keeps the proxies' logs (with a
//! line at each trial's start and each failing trial's verdict),
//! `O2TR_CHAOS_FRAGMENT_SIZE` (default 0, the product's default: no
//! fragmentation; `scripts/chaos.sh` sets 300), `O2TR_CHAOS_PROXY_ARGS` adds flags to both proxies (e.g.
//! `--debug-packets` with `O2TR_TEST_PROXY_RUST_LOG=debug`). `scripts/chaos.sh` runs it in release mode.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::ejabberd::{Ejabberd, EjabberdOptions, free_port};
use common::proxy::{ProxyProcess, is_notice, temp_dir};
use common::relay::Relay;
use common::xmpp_client::{ClientOptions, Message, XmppClient};

/// Waiting for the last expected message of a trial.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a trial waits for messages with a known risk of loss.
const AT_RISK_WAIT: Duration = Duration::from_secs(8);
/// The proxies ping a silent upstream after this many seconds…
const PING_SECS: u64 = 1;
/// …and give up after this many more.
const PING_TIMEOUT_SECS: u64 = 2;
/// ejabberd's XEP-0198 resumption window in this campaign.
const SM_RESUME_SECS: u32 = 2;
/// Every proxy fragments OTR messages above this size: 0 (never, the
/// product's default) unless `O2TR_CHAOS_FRAGMENT_SIZE` says otherwise;
/// `scripts/chaos.sh` sets 300, which fragments every message (short ones
/// into two pieces) to put fragments under every fault.
const FRAGMENT_SIZE: usize = 0;

fn fragment_size() -> usize {
    env_usize("O2TR_CHAOS_FRAGMENT_SIZE", FRAGMENT_SIZE)
}

// ------------------------------------------------------------ rng

/// splitmix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

// ------------------------------------------------------------ faults

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    ClientDisconnect,
    ProxyKill,
    TcpCut,
    EjabberdRestart,
    BothOffline,
    DuringAke,
    BetweenFragments,
}

const FAULTS: [Fault; 7] = [
    Fault::ClientDisconnect,
    Fault::ProxyKill,
    Fault::TcpCut,
    Fault::EjabberdRestart,
    Fault::BothOffline,
    Fault::DuringAke,
    Fault::BetweenFragments,
];

/// Fault kinds that still lose a message in some trials (issue 9,
/// docs/chaos.md): none at present. Kinds left the list as their causes
/// were fixed — client disconnect (the replay window and the reorder
/// hold), ejabberd restart (a stored copy is a replay; messages the server
/// acknowledged before dying are [`Risk::ServerDown`]), between fragments
/// (candidate reassembly) — and the CI run covers every kind. It runs
/// without fragmentation (the product's default), so that it stays a test
/// that must pass on a loaded machine; `scripts/chaos.sh` runs all kinds
/// with fragments of 300 bytes.
const OPEN_BUGS: [Fault; 0] = [];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::ClientDisconnect => "client disconnect",
            Fault::ProxyKill => "proxy SIGKILL+restart",
            Fault::TcpCut => "upstream TCP cut (no FIN)",
            Fault::EjabberdRestart => "ejabberd restart",
            Fault::BothOffline => "both sides offline",
            Fault::DuringAke => "fault during AKE",
            Fault::BetweenFragments => "fault between fragments",
        }
    }
}

/// The single-side disruptions the composite faults are built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hit {
    ClientAbort,
    ClientClose,
    ProxyKill,
    TcpCut,
}

/// Why a message may be lost for a reason the harness provoked on purpose
/// and that the proxy cannot repair (reported, never counted as a pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Risk {
    /// The victim's own client handed it to its proxy just before the proxy
    /// was SIGKILLed (the proxy may not have read or sent it: the outbox).
    SenderProxyKilled,
    /// The victim's proxy wrote it into the cut link and upstream SM was
    /// off, so nobody knows the server never got it (with SM the outbox
    /// entry waits for the server's ack and is re-sent).
    SenderWroteIntoDeadLink,
    /// The server wrote it into the cut link and upstream SM was off, so
    /// nobody knows it was not received.
    ServerWroteIntoDeadLinkNoSm,
    /// It was on its way to a client whose TCP connection dropped (abort):
    /// the client leg has no SM, so a message the proxy wrote into that
    /// socket counts as handed over (like any XMPP client without SM); with
    /// upstream SM off, what the server had written to the proxy is lost too.
    ClientDropped,
    /// ejabberd was stopped or SIGKILLed with it in flight: the server may
    /// have acknowledged it (XEP-0198: the sender's outbox entry is done)
    /// and gone down before writing it to the recipient (its routing and SM
    /// queues are in memory, and a stop does not drain them: seen with a
    /// graceful stop too) or, killed, before its offline spool reached the
    /// disk. Only an end-to-end receipt could recover that.
    ServerDown,
}

impl Risk {
    fn name(self) -> &'static str {
        match self {
            Risk::SenderProxyKilled => "sender's proxy SIGKILLed right after the client sent",
            Risk::SenderWroteIntoDeadLink => {
                "sender's proxy wrote into the cut link, upstream SM off"
            }
            Risk::ServerWroteIntoDeadLinkNoSm => "server wrote into the cut link, upstream SM off",
            Risk::ClientDropped => "receiving client's TCP dropped (no SM on the client leg)",
            Risk::ServerDown => {
                "ejabberd stopped or killed with it in flight (acked, not delivered)"
            }
        }
    }
}

// ------------------------------------------------------------ bookkeeping

#[derive(Clone, Debug)]
struct Sent {
    body: String,
    phase: &'static str,
    after_fault: bool,
    risk: Option<Risk>,
}

#[derive(Default, Debug)]
struct Stats {
    trials: usize,
    sent: usize,
    exactly_once_in_order: usize,
    after_fault: usize,
    after_fault_recovered: usize,
    lost_explained: BTreeMap<Risk, usize>,
    lost_unexplained: usize,
    duplicated: usize,
    out_of_order: usize,
    undecrypted: usize,
    akes_when_resumable: usize,
    plaintext_leaks: usize,
    seconds: f64,
}

/// One account of the campaign and its client process.
struct User {
    name: String,
    side: usize,
    client: Option<XmppClient>,
    got: Vec<Message>,
}

impl User {
    fn password(name: &str) -> String {
        format!("pw-{name}")
    }
    fn drain(&mut self) {
        if let Some(c) = self.client.as_mut() {
            self.got.extend(c.recv());
        }
    }
}

struct Side {
    relay: Relay,
    dir: PathBuf,
    port: u16,
    proxy: Option<ProxyProcess>,
}

struct Campaign {
    ej: Ejabberd,
    sides: [Side; 2],
    marker: XmppClient,
    marker_n: usize,
    flags: Vec<String>,
    upstream_sm: bool,
    tok: String,
    log_offset: u64,
    pool: Vec<(String, String)>,
    fresh: usize,
    stats: BTreeMap<Fault, Stats>,
    failures: Vec<String>,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Writes a campaign line into the proxies' kept log
/// (`O2TR_TEST_PROXY_LOG`), so a failing trial's lines can be cut out of a
/// long run's log afterwards.
fn proxy_log_mark(line: &str) {
    use std::io::Write;
    if let Some(path) = std::env::var_os("O2TR_TEST_PROXY_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "[chaos] {line}");
        }
    }
}

fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// Runs `f` and turns a panic (a harness helper failing) into `None`.
fn attempt<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}

/// Logs in with `o`, retried: after a restart the server or the proxy may
/// refuse for a moment.
fn login_with(o: ClientOptions) -> Option<XmppClient> {
    for _ in 0..10 {
        let opts = o.clone();
        if let Some(c) = attempt(move || XmppClient::connect(opts)) {
            return Some(c);
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    None
}

impl Campaign {
    fn start(upstream_sm: Option<bool>, tok: String) -> Campaign {
        let ej = Ejabberd::start_with(EjabberdOptions {
            loglevel: "debug".into(),
            sm_resume_timeout: SM_RESUME_SECS,
            ..EjabberdOptions::default()
        });
        ej.register_all(&[("marker", "pw-marker")]);
        let mut flags: Vec<String> = vec![
            "--fragment-size".into(),
            fragment_size().to_string(),
            "--upstream-ping-secs".into(),
            PING_SECS.to_string(),
            "--upstream-ping-timeout-secs".into(),
            PING_TIMEOUT_SECS.to_string(),
        ];
        if let Some(sm) = upstream_sm {
            flags.push(format!("--upstream-sm={sm}"));
        }
        // For diagnosis, e.g. `--debug-packets` (with O2TR_TEST_PROXY_LOG
        // and O2TR_TEST_PROXY_RUST_LOG=debug).
        if let Ok(extra) = std::env::var("O2TR_CHAOS_PROXY_ARGS") {
            flags.extend(extra.split_whitespace().map(String::from));
        }
        let effective_sm =
            upstream_sm.unwrap_or_else(|| o2tr_proxy::proxy::ProxyConfig::new().upstream_sm);
        let sides = [0, 1].map(|i| {
            let relay = Relay::start(ej.addr());
            let dir = temp_dir(&format!("chaos-proxy-{i}"));
            let port = free_port();
            let proxy = ProxyProcess::start_with(&ej, &dir, port, relay.port, &flags);
            Side {
                relay,
                dir,
                port,
                proxy: Some(proxy),
            }
        });
        let marker = XmppClient::direct(&ej, "marker", "pw-marker");
        let log_offset = std::fs::metadata(&ej.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        Campaign {
            ej,
            sides,
            marker,
            marker_n: 0,
            flags,
            upstream_sm: effective_sm,
            tok,
            log_offset,
            pool: Vec::new(),
            fresh: 0,
            stats: BTreeMap::new(),
            failures: Vec::new(),
        }
    }

    /// Registers `n` new pairs (alice-side user on proxy 0, bob-side on 1).
    fn new_pairs(&mut self, n: usize) -> Vec<(String, String)> {
        let pairs: Vec<(String, String)> = (0..n)
            .map(|_| {
                self.fresh += 1;
                (format!("a{}", self.fresh), format!("b{}", self.fresh))
            })
            .collect();
        let creds: Vec<(String, String)> = pairs
            .iter()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .map(|u| {
                let p = User::password(&u);
                (u, p)
            })
            .collect();
        let refs: Vec<(&str, &str)> = creds
            .iter()
            .map(|(u, p)| (u.as_str(), p.as_str()))
            .collect();
        self.ej.register_all(&refs);
        pairs
    }

    fn client_opts(&self, side: usize, user: &str) -> ClientOptions {
        let mut o = ClientOptions::direct(&self.ej, user, &User::password(user));
        o.port = self.sides[side].port;
        o.ca = Some(self.sides[side].dir.with_extension("pki").join("ca.pem"));
        o
    }

    /// A logged-in client for `user` through its side's proxy, retried
    /// (after a restart the server or proxy may refuse for a moment).
    fn login(&self, side: usize, user: &str) -> Option<XmppClient> {
        login_with(self.client_opts(side, user))
    }

    fn login_pair(&self, a: &str, b: &str) -> (User, User) {
        let (oa, ob) = (self.client_opts(0, a), self.client_opts(1, b));
        let (ca, cb) = std::thread::scope(|s| {
            let ha = s.spawn(move || login_with(oa));
            let hb = s.spawn(move || login_with(ob));
            (ha.join().ok().flatten(), hb.join().ok().flatten())
        });
        (
            User {
                name: a.into(),
                side: 0,
                client: ca,
                got: Vec::new(),
            },
            User {
                name: b.into(),
                side: 1,
                client: cb,
                got: Vec::new(),
            },
        )
    }

    /// Brings `u` back online: CONNECT on the same process, else a new one.
    fn reconnect(&self, u: &mut User) {
        u.drain();
        if let Some(c) = u.client.as_mut() {
            for _ in 0..3 {
                if attempt(|| c.is_connected()).unwrap_or(false) {
                    return;
                }
                if c.try_reconnect().is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(700));
            }
        }
        // slixmpp does not retry a SASL mechanism that failed once in the
        // same process: start a fresh one.
        if let Some(c) = u.client.take() {
            c.kill();
        }
        u.client = self.login(u.side, &u.name);
    }

    fn wait_disconnected(&self, u: &mut User) -> bool {
        let Some(c) = u.client.as_mut() else {
            return true;
        };
        eventually(Duration::from_secs(20), || {
            !attempt(|| c.is_connected()).unwrap_or(false)
        })
    }

    /// New bytes of the server log since the last call.
    fn log_segment(&mut self) -> String {
        let mut out = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.ej.log_path) {
            if f.seek(SeekFrom::Start(self.log_offset)).is_ok() {
                let _ = f.read_to_end(&mut out);
            }
        }
        self.log_offset += out.len() as u64;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Sends a plaintext marker directly and waits until the server's
    /// debug log shows it; returns the log since the previous flush. Only
    /// then does "not in the log" mean anything.
    fn flush_log(&mut self) -> Option<String> {
        self.marker_n += 1;
        let marker = format!("plain-marker {}", self.marker_n);
        let to = self.ej.jid("marker");
        if attempt(|| self.marker.try_send(&to, &marker))
            .and_then(|r| r.ok())
            .is_none()
        {
            let _ = attempt(|| self.marker.try_reconnect());
            attempt(|| self.marker.try_send(&to, &marker)).and_then(|r| r.ok())?;
        }
        let mut seg = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            seg.push_str(&self.log_segment());
            if seg.contains(&marker) {
                return Some(seg);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Registers again every campaign account the server lost.
    fn reregister_missing(&mut self) {
        let users = self.ej.ctl(&["registered_users", &self.ej.domain]);
        let known: Vec<&str> = users.lines().map(str::trim).collect();
        let mut all = vec!["marker".to_string()];
        for i in 1..=self.fresh {
            all.push(format!("a{i}"));
            all.push(format!("b{i}"));
        }
        for u in all {
            if !known.contains(&u.as_str()) {
                eprintln!("[chaos] {u} lost by the ejabberd SIGKILL; registering again");
                self.ej.register(&u, &User::password(&u));
            }
        }
    }

    fn proxy_kill(&mut self, side: usize) {
        if let Some(p) = self.sides[side].proxy.take() {
            p.kill9();
        }
    }

    fn proxy_restart(&mut self, side: usize) {
        let s = &self.sides[side];
        let p = ProxyProcess::start_with(&self.ej, &s.dir, s.port, s.relay.port, &self.flags);
        self.sides[side].proxy = Some(p);
    }
}

// ------------------------------------------------------------ one trial

struct Trial<'a> {
    c: &'a mut Campaign,
    n: usize,
    users: [User; 2],
    /// Messages sent by user i to the other, in order.
    sent: [Vec<Sent>; 2],
    after_fault: bool,
    long: bool,
    notes: Vec<String>,
    /// What the next sends are (for failure reports).
    phase: &'static str,
}

impl Trial<'_> {
    fn body(&self, from: usize, seq: usize) -> String {
        let dir = if from == 0 { "a2b" } else { "b2a" };
        let mut b = format!("chaos-{} t{} {dir} {seq}", self.c.tok, self.n);
        if self.long {
            b.push(' ');
            // ~1.5 KB: about ten OTR fragments of 300 bytes.
            for i in 0..150 {
                b.push_str(&format!("{:09} ", i * 7919 % 1_000_000_000));
            }
        }
        b
    }

    /// User `from` sends `k` messages to the other. Returns how many the
    /// client accepted.
    fn send(&mut self, from: usize, k: usize, risk: Option<Risk>) -> usize {
        let mut ok = 0;
        let to = self.c.ej.jid(&self.users[1 - from].name);
        for _ in 0..k {
            let body = self.body(from, self.sent[from].len());
            let Some(client) = self.users[from].client.as_mut() else {
                break;
            };
            match attempt(|| client.try_send(&to, &body)) {
                Some(Ok(_)) => {
                    self.sent[from].push(Sent {
                        body,
                        phase: self.phase,
                        after_fault: self.after_fault,
                        risk,
                    });
                    ok += 1;
                }
                _ => {
                    self.notes.push(format!("user {from}: SEND refused"));
                    break;
                }
            }
        }
        ok
    }

    fn received(&self, to: usize) -> Vec<String> {
        let mine = format!("chaos-{} t{} ", self.c.tok, self.n);
        self.users[to]
            .got
            .iter()
            .filter(|m| !is_notice(m))
            .filter_map(|m| m.body.clone())
            .filter(|b| b.starts_with(&mine) || b.starts_with("?OTR"))
            .collect()
    }

    /// Waits until both sides got everything sent to them (or times out).
    fn wait_delivered(&mut self, timeout: Duration) {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            for u in self.users.iter_mut() {
                u.drain();
            }
            // Done when everything arrived; after AT_RISK_WAIT, also when
            // only messages with a known risk are missing.
            let settled_after = started.elapsed() > AT_RISK_WAIT;
            let done = (0..2).all(|to| {
                let got = self.received(to);
                self.sent[1 - to]
                    .iter()
                    .all(|s| got.contains(&s.body) || (settled_after && s.risk.is_some()))
            });
            if done || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn hit(&mut self, victim: usize, hit: Hit) {
        self.notes.push(format!("hit user {victim}: {hit:?}"));
        self.phase = "during";
        match hit {
            Hit::ClientAbort => {
                if let Some(c) = self.users[victim].client.as_mut() {
                    let _ = attempt(|| c.abort());
                }
            }
            Hit::ClientClose => {
                if let Some(c) = self.users[victim].client.as_mut() {
                    let _ = attempt(|| c.close());
                }
            }
            Hit::ProxyKill => self.c.proxy_kill(self.users[victim].side),
            Hit::TcpCut => self.c.sides[self.users[victim].side].relay.freeze(),
        }
        self.after_fault = true;
    }

    /// Undo `hit` and bring the victim back; `peer_during` messages are
    /// sent by the other side while the victim is away, `victim_during`
    /// by the victim into the cut link (TcpCut only).
    fn recover(&mut self, victim: usize, hit: Hit, peer_during: usize, victim_during: usize) {
        let peer = 1 - victim;
        let side = self.users[victim].side;
        match hit {
            Hit::ClientAbort | Hit::ClientClose => {
                std::thread::sleep(Duration::from_millis(200));
                self.send(peer, peer_during, None);
                let u = &mut self.users[victim];
                self.c.reconnect(u);
            }
            Hit::ProxyKill => {
                let u = &mut self.users[victim];
                if !self.c.wait_disconnected(u) {
                    self.notes
                        .push("victim never noticed the proxy kill".into());
                }
                self.send(peer, peer_during, None);
                self.c.proxy_restart(side);
                let u = &mut self.users[victim];
                self.c.reconnect(u);
            }
            Hit::TcpCut => {
                let server_risk =
                    (!self.c.upstream_sm).then_some(Risk::ServerWroteIntoDeadLinkNoSm);
                self.send(peer, peer_during, server_risk);
                // With upstream SM the proxy keeps them in its outbox until
                // the server acknowledges them, and re-sends them.
                let victim_risk = (!self.c.upstream_sm).then_some(Risk::SenderWroteIntoDeadLink);
                self.send(victim, victim_during, victim_risk);
                let u = &mut self.users[victim];
                if !self.c.wait_disconnected(u) {
                    self.notes
                        .push("the proxy did not detect the dead upstream link".into());
                }
                // The server's TCP stack notices the dead peer (here: at
                // once), before the victim is back; with upstream SM the
                // stanzas it wrote into the dead link were never
                // acknowledged and go to offline storage
                // (resend_on_timeout: if_offline; the proxy does not ask
                // for resumption, so there is no window to wait out).
                self.c.sides[side].relay.drop_frozen();
                std::thread::sleep(Duration::from_millis(1000));
                let u = &mut self.users[victim];
                self.c.reconnect(u);
            }
        }
    }

    fn random_hit(rng: &mut Rng) -> Hit {
        [
            Hit::ClientAbort,
            Hit::ClientClose,
            Hit::ProxyKill,
            Hit::TcpCut,
        ][rng.below(4)]
    }

    fn run(&mut self, fault: Fault, rng: &mut Rng) {
        let (a, b) = (0usize, 1usize);
        if fault != Fault::DuringAke {
            // Live session first.
            self.send(a, rng.range(1, 2), None);
            self.send(b, rng.range(1, 2), None);
            self.wait_delivered(DELIVERY_TIMEOUT);
        }
        self.phase = "in flight";
        match fault {
            Fault::ClientDisconnect | Fault::ProxyKill | Fault::TcpCut => {
                let victim = rng.below(2);
                let peer = 1 - victim;
                let hit = match fault {
                    Fault::ClientDisconnect if rng.coin() => Hit::ClientAbort,
                    Fault::ClientDisconnect => Hit::ClientClose,
                    Fault::ProxyKill => Hit::ProxyKill,
                    _ => Hit::TcpCut,
                };
                // In flight at the fault: from the peer, and (proxy kill)
                // from the victim itself.
                let risk = (hit == Hit::ClientAbort).then_some(Risk::ClientDropped);
                self.send(peer, rng.range(0, 3), risk);
                if hit == Hit::ProxyKill {
                    self.send(victim, rng.range(0, 2), Some(Risk::SenderProxyKilled));
                }
                std::thread::sleep(Duration::from_millis(rng.range(0, 300) as u64));
                self.hit(victim, hit);
                let victim_during = if hit == Hit::TcpCut {
                    rng.range(0, 2)
                } else {
                    0
                };
                self.recover(victim, hit, rng.range(1, 4), victim_during);
            }
            Fault::EjabberdRestart => {
                self.send(a, rng.range(0, 2), None);
                self.send(b, rng.range(0, 2), None);
                std::thread::sleep(Duration::from_millis(rng.range(0, 300) as u64));
                self.after_fault = true;
                // Marked only now, so that the schedule of a seed stays
                // what it was.
                for s in self.sent.iter_mut().flatten() {
                    if s.phase == "in flight" && s.risk.is_none() {
                        s.risk = Some(Risk::ServerDown);
                    }
                }
                if rng.coin() {
                    self.notes.push("ejabberd SIGKILL".into());
                    self.c.ej.kill();
                    self.c.ej.start_again();
                    // Accounts registered just before may not have reached
                    // Mnesia's disk log.
                    self.c.reregister_missing();
                } else {
                    self.notes.push("ejabberd stop/start".into());
                    self.c.ej.restart();
                }
                for i in 0..2 {
                    let u = &mut self.users[i];
                    self.c.wait_disconnected(u);
                }
                let _ = attempt(|| self.c.marker.try_reconnect());
                for i in 0..2 {
                    let u = &mut self.users[i];
                    self.c.reconnect(u);
                }
            }
            Fault::BothOffline => {
                // b leaves; a writes to offline b and leaves; b comes back
                // (gets them) and answers offline a, leaves; a comes back.
                let hit_b = if rng.coin() {
                    Hit::ClientAbort
                } else {
                    Hit::ClientClose
                };
                self.hit(b, hit_b);
                std::thread::sleep(Duration::from_millis(200));
                self.send(a, rng.range(1, 3), None);
                std::thread::sleep(Duration::from_millis(rng.range(0, 300) as u64));
                let hit_a = if rng.coin() {
                    Hit::ClientAbort
                } else {
                    Hit::ClientClose
                };
                self.hit(a, hit_a);
                std::thread::sleep(Duration::from_millis(300));
                let u = &mut self.users[b];
                self.c.reconnect(u);
                self.send(b, rng.range(1, 3), None);
                std::thread::sleep(Duration::from_millis(rng.range(0, 300) as u64));
                self.hit(b, Hit::ClientClose);
                std::thread::sleep(Duration::from_millis(300));
                let u = &mut self.users[a];
                self.c.reconnect(u);
                let u = &mut self.users[b];
                self.c.reconnect(u);
            }
            Fault::DuringAke => {
                // The first message of a new pair (policy always): held
                // while the AKE runs; the fault hits either side.
                // (An initiator killed right after its Reveal Signature
                // restores the handshake from its durable record.) The
                // sender's own proxy killed may not have read what the
                // client had just written, as in `Fault::ProxyKill`.
                let victim = rng.below(2);
                let hit = Self::random_hit(rng);
                // A receiver whose client aborted may have had the first
                // message written into its dropped socket, as in
                // `Fault::ClientDisconnect`.
                let risk = match hit {
                    Hit::ProxyKill if victim == a => Some(Risk::SenderProxyKilled),
                    Hit::ClientAbort if victim == b => Some(Risk::ClientDropped),
                    _ => None,
                };
                self.send(a, rng.range(1, 2), risk);
                std::thread::sleep(Duration::from_millis(rng.range(0, 400) as u64));
                self.hit(victim, hit);
                self.recover(victim, hit, 0, 0);
            }
            Fault::BetweenFragments => {
                self.long = true;
                let victim = rng.below(2);
                let peer = 1 - victim;
                let hit = Self::random_hit(rng);
                let risk = (hit == Hit::ClientAbort).then_some(Risk::ClientDropped);
                self.send(peer, rng.range(1, 3), risk);
                std::thread::sleep(Duration::from_millis(rng.range(0, 150) as u64));
                self.hit(victim, hit);
                self.recover(victim, hit, rng.range(0, 2), 0);
            }
        }
        // After recovery, both ways.
        self.phase = "after";
        self.long = false;
        self.send(a, rng.range(1, 3), None);
        self.send(b, rng.range(1, 3), None);
        self.wait_delivered(DELIVERY_TIMEOUT);
    }

    /// Scores the trial into `st`; returns failure descriptions.
    fn score(&mut self, st: &mut Stats, log: Option<&str>, resumable: bool) -> Vec<String> {
        let mut fails = Vec::new();
        for from in 0..2 {
            let got = self.received(1 - from);
            let sent = &self.sent[from];
            st.sent += sent.len();
            let undecrypted = got.iter().filter(|b| b.starts_with("?OTR")).count();
            st.undecrypted += undecrypted;
            if undecrypted > 0 {
                fails.push(format!(
                    "{undecrypted} undecrypted bodies to user {}",
                    1 - from
                ));
            }
            // Order of first deliveries must follow the send order.
            let mut idx: Vec<usize> = Vec::new();
            for b in &got {
                if let Some(i) = sent.iter().position(|s| &s.body == b) {
                    if !idx.contains(&i) {
                        idx.push(i);
                    }
                }
            }
            let in_order = idx.windows(2).all(|w| w[0] < w[1]);
            if !in_order {
                st.out_of_order += 1;
                fails.push(format!("user {from}'s messages out of order: {idx:?}"));
            }
            for (i, s) in sent.iter().enumerate() {
                let n = got.iter().filter(|b| **b == s.body).count();
                if s.after_fault {
                    st.after_fault += 1;
                    if n >= 1 {
                        st.after_fault_recovered += 1;
                    }
                }
                match (n, s.risk) {
                    (1, _) => {
                        if in_order {
                            st.exactly_once_in_order += 1;
                        }
                    }
                    (0, Some(r)) => *st.lost_explained.entry(r).or_default() += 1,
                    (0, None) => {
                        st.lost_unexplained += 1;
                        fails.push(format!("lost: user {from} message #{i} ({})", s.phase));
                    }
                    (n, _) => {
                        st.duplicated += 1;
                        fails.push(format!("user {from} message #{i} delivered {n} times"));
                    }
                }
            }
        }
        match log {
            Some(log) => {
                let needle = format!("chaos-{}", self.c.tok);
                if log.contains(&needle) {
                    st.plaintext_leaks += 1;
                    fails.push("plaintext in the server log".into());
                }
                let commits = log.matches("?OTR:AAMC").count() + log.matches("?OTR:AAIC").count();
                if resumable && commits > 0 {
                    st.akes_when_resumable += commits;
                    fails.push(format!("{commits} D-H Commit(s) although resumable"));
                }
            }
            None => fails.push("the server log never showed the marker".into()),
        }
        fails
    }
}

fn print_table(c: &Campaign, seed: u64, trials: usize) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "chaos campaign: {trials} trials, seed {seed}, upstream SM {}, ping {PING_SECS}s/{PING_TIMEOUT_SECS}s, fragment {}\n",
        if c.upstream_sm { "on" } else { "off" },
        fragment_size()
    ));
    out.push_str(&format!(
        "{:<27} {:>6} {:>5} {:>9} {:>11} {:>9} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6} {:>6}\n",
        "fault",
        "trials",
        "sent",
        "once+ord",
        "after:rcv/n",
        "lost:expl",
        "unexp",
        "dup",
        "order",
        "undec",
        "AKEs",
        "leaks",
        "s/tr"
    ));
    let mut causes: BTreeMap<Risk, usize> = BTreeMap::new();
    for (f, s) in &c.stats {
        let expl: usize = s.lost_explained.values().sum();
        for (r, n) in &s.lost_explained {
            *causes.entry(*r).or_default() += n;
        }
        out.push_str(&format!(
            "{:<27} {:>6} {:>5} {:>9} {:>11} {:>9} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6} {:>6.1}\n",
            f.name(),
            s.trials,
            s.sent,
            s.exactly_once_in_order,
            format!("{}/{}", s.after_fault_recovered, s.after_fault),
            expl,
            s.lost_unexplained,
            s.duplicated,
            s.out_of_order,
            s.undecrypted,
            s.akes_when_resumable,
            s.plaintext_leaks,
            s.seconds / s.trials.max(1) as f64,
        ));
    }
    for (r, n) in causes {
        out.push_str(&format!("  explained losses, {}: {n}\n", r.name()));
    }
    out
}

#[test]
fn chaos_campaign() {
    let trials = env_usize("O2TR_CHAOS_TRIALS", 50);
    let seed: u64 = std::env::var("O2TR_CHAOS_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000_007)
                .unwrap_or(1)
        });
    let upstream_sm = std::env::var("O2TR_CHAOS_UPSTREAM_SM")
        .ok()
        .and_then(|v| o2tr_proxy::config::parse_bool(&v));
    eprintln!(
        "[chaos] seed {seed} (O2TR_CHAOS_SEED={seed} reproduces the schedule), {trials} trials"
    );
    let mut rng = Rng(seed);
    let tok = format!("{:x}", rng.next() & 0xffff_ffff);
    let mut c = Campaign::start(upstream_sm, tok);
    let started = Instant::now();

    // A pool of conversations whose AKE is done before the campaign.
    let pool = c.new_pairs(3);
    for (a, b) in &pool {
        let (mut ua, mut ub) = c.login_pair(a, b);
        let (ja, jb) = (c.ej.jid(a), c.ej.jid(b));
        let ca = ua.client.as_mut().expect("pool login");
        ca.send(&jb, "warm-up");
        ub.client
            .as_mut()
            .expect("pool login")
            .wait_for(1, Duration::from_secs(30));
        ub.client.as_mut().unwrap().send(&ja, "warm-up");
        ua.client
            .as_mut()
            .unwrap()
            .wait_for(1, Duration::from_secs(30));
    }
    c.pool = pool;
    c.flush_log().expect("server log flush");

    // O2TR_CHAOS_ONLY=2,5: only these fault kinds (indexes into FAULTS).
    // Unset: the kinds without an open bug (see OPEN_BUGS); scripts/chaos.sh
    // runs all seven.
    let only: Option<Vec<Fault>> = match std::env::var("O2TR_CHAOS_ONLY") {
        Ok(v) => Some(
            v.split(',')
                .filter_map(|i| i.trim().parse::<usize>().ok())
                .filter_map(|i| FAULTS.get(i).copied())
                .collect(),
        ),
        Err(_) => Some(
            FAULTS
                .iter()
                .copied()
                .filter(|f| !OPEN_BUGS.contains(f))
                .collect(),
        ),
    };
    // O2TR_CHAOS_BUDGET_SECS: start no new trial after this long.
    let budget = std::env::var("O2TR_CHAOS_BUDGET_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_secs);
    let mut done = 0;
    let mut order: Vec<Fault> = Vec::new();
    for t in 0..trials {
        if order.is_empty() {
            order = FAULTS
                .iter()
                .copied()
                .filter(|f| only.as_ref().is_none_or(|o| o.contains(f)))
                .collect();
            // Fisher-Yates: every kind once per block of seven.
            for i in (1..order.len()).rev() {
                let j = rng.below(i + 1);
                order.swap(i, j);
            }
        }
        let fault = order.pop().unwrap_or(Fault::ClientDisconnect);
        let t0 = Instant::now();
        let (a, b) = if fault == Fault::DuringAke {
            c.new_pairs(1).remove(0)
        } else {
            c.pool[rng.below(c.pool.len())].clone()
        };
        proxy_log_mark(&format!("trial {t} ({}) {a} {b}: start", fault.name()));
        let (ua, ub) = c.login_pair(&a, &b);
        let mut trial = Trial {
            c: &mut c,
            n: t,
            users: [ua, ub],
            sent: [Vec::new(), Vec::new()],
            after_fault: false,
            long: false,
            notes: Vec::new(),
            phase: "before",
        };
        let logged_in = trial.users.iter().all(|u| u.client.is_some());
        if logged_in {
            trial.run(fault, &mut rng);
        } else {
            trial.notes.push("login failed before the trial".into());
        }
        for u in trial.users.iter_mut() {
            u.drain();
        }
        let notes = std::mem::take(&mut trial.notes);
        for u in trial.users.iter_mut() {
            if let Some(cl) = u.client.take() {
                cl.quit();
            }
        }
        let log = trial.c.flush_log();
        let mut st = std::mem::take(trial.c.stats.entry(fault).or_default());
        st.trials += 1;
        let resumable = fault != Fault::DuringAke;
        let mut fails = trial.score(&mut st, log.as_deref(), resumable);
        if !logged_in {
            fails.push("login failed".into());
        }
        st.seconds += t0.elapsed().as_secs_f64();
        c.stats.insert(fault, st);
        if !fails.is_empty() || !notes.is_empty() {
            let line = format!(
                "trial {t} ({}): {} | notes: {}",
                fault.name(),
                fails.join("; "),
                notes.join("; ")
            );
            eprintln!("[chaos] {line}");
            proxy_log_mark(&line);
            if !fails.is_empty() {
                c.failures.push(line);
            }
        }
        done = t + 1;
        if done % 10 == 0 {
            eprintln!(
                "[chaos] {done} trials done in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        if done % 50 == 0 {
            eprintln!("{}", print_table(&c, seed, done));
        }
        if budget.is_some_and(|b| started.elapsed() > b) {
            eprintln!("[chaos] time budget spent after {done} of {trials} trials");
            break;
        }
    }
    // The offline spool and archive never saw a plaintext either.
    let db = c.ej.dump_db();
    let db_leak = db.contains(&format!("chaos-{}", c.tok));
    let table = print_table(&c, seed, done);
    eprintln!(
        "{table}total {:.0} s; server database plaintext: {}",
        started.elapsed().as_secs_f64(),
        if db_leak { "FOUND" } else { "none" }
    );
    if let Ok(path) = std::env::var("O2TR_CHAOS_REPORT") {
        let _ = std::fs::write(path, &table);
    }
    assert!(!db_leak, "plaintext in the server database");
    assert!(
        c.failures.is_empty(),
        "{} failing trials (seed {seed}):\n{}",
        c.failures.len(),
        c.failures.join("\n")
    );
}
