//! End to end: real slixmpp clients → o2tr-proxy (in-process, router over
//! SQLite) → a real ejabberd on loopback, as a user runs it (issue 4).

mod common;

use std::time::Duration;

use common::ejabberd::Ejabberd;
use common::ejabberd::free_port;
use common::peer::{PeerKind, PeerOptions, PeerPolicy, PeerProcess};
use common::proxy::{ProxyProcess, TestProxy, bodies, collect, temp_dir};
use common::xmpp_client::{KEEP_OFFLINE_STORAGE, XmppClient};
use o2tr_proxy::otr::policy::Policy;

const T: Duration = Duration::from_secs(30);

fn token() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}", n ^ u128::from(std::process::id()))
}

/// D-H Commit messages (v3 `?OTR:AAMC`, v2 `?OTR:AAIC`) in the server log.
fn commits_in_log(ej: &Ejabberd) -> usize {
    let log = ej.log_contents();
    log.matches("?OTR:AAMC").count() + log.matches("?OTR:AAIC").count()
}

/// Send a plaintext marker directly (no proxy) and wait until the server's
/// debug log shows it: the log is written late and in chunks, so only after
/// this does "not in the log" mean anything. It is also the control that a
/// plaintext *is* found when present.
fn flush_server_log(ej: &Ejabberd, user: &str, password: &str, tok: &str) {
    let mut direct = XmppClient::direct(ej, user, password);
    let marker = format!("plain-marker {tok}");
    direct.send(&ej.jid(user), &marker);
    assert!(ej.wait_log_contains(&marker, T), "control marker logged");
}

#[test]
fn private_conversation_through_two_proxies_leaks_nothing() {
    let ej = Ejabberd::start_debug();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let pa = TestProxy::start(&ej, &temp_dir("alice-proxy"), Policy::Always);
    let pb = TestProxy::start(&ej, &temp_dir("bob-proxy"), Policy::Always);
    let mut alice = pa.client(&ej, "alice", "pw-a");
    let mut bob = pb.client(&ej, "bob", "pw-b");
    let tok = token();

    // The first message is held until private, then delivered.
    alice.send_with(
        &ej.jid("bob"),
        &format!("first {tok}"),
        &["xhtml", "oob", "subject"],
    );
    let (got, _) = collect(&mut bob, 1, T);
    assert_eq!(bodies(&got), vec![format!("first {tok}")]);
    let (_, notices) = collect(&mut alice, 0, Duration::from_millis(500));
    assert!(
        notices.iter().any(|n| n.contains("Private conversation")),
        "alice told it is private: {notices:?}"
    );

    let n = 50;
    for i in 0..n {
        alice.send(&ej.jid("bob"), &format!("a2b {tok} {i}"));
        bob.send(&ej.jid("alice"), &format!("b2a {tok} {i}"));
    }
    let (to_bob, _) = collect(&mut bob, n, T);
    let (to_alice, _) = collect(&mut alice, n, T);
    let expect_b: Vec<String> = (0..n).map(|i| format!("a2b {tok} {i}")).collect();
    let expect_a: Vec<String> = (0..n).map(|i| format!("b2a {tok} {i}")).collect();
    assert_eq!(bodies(&to_bob), expect_b);
    assert_eq!(bodies(&to_alice), expect_a);

    // A marker in plaintext, sent directly, proves the log is complete
    // enough that "not found" means something.
    flush_server_log(&ej, "alice", "pw-a", &tok);
    let log = ej.log_contents();
    let db = ej.dump_db();
    for i in 0..n {
        for p in [format!("a2b {tok} {i}"), format!("b2a {tok} {i}")] {
            assert!(!log.contains(&p), "server log has plaintext {p}");
            assert!(!db.contains(&p), "server db has plaintext {p}");
        }
    }
    assert!(!log.contains(&format!("first {tok}")));
    assert!(
        !log.contains("jabber.org/protocol/xhtml-im") || !log.contains(&format!("first {tok}"))
    );
    assert!(log.contains("?OTR:AAM"), "ciphertext crossed the server");
    assert!(log.contains("urn:xmpp:eme:0"));
}

#[test]
fn offline_messages_are_recovered_without_new_ake() {
    let ej = Ejabberd::start_debug();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let pa = TestProxy::start(&ej, &temp_dir("alice-proxy"), Policy::Always);
    let bob_dir = temp_dir("bob-proxy");
    let mut pb = TestProxy::start(&ej, &bob_dir, Policy::Always);
    let mut alice = pa.client(&ej, "alice", "pw-a");
    let mut bob = pb.client(&ej, "bob", "pw-b");
    let tok = token();
    alice.send(&ej.jid("bob"), &format!("hello {tok}"));
    assert_eq!(collect(&mut bob, 1, T).0.len(), 1);
    bob.send(&ej.jid("alice"), &format!("hi {tok}"));
    assert_eq!(collect(&mut alice, 1, T).0.len(), 1);
    let commits = commits_in_log(&ej);
    assert!(commits >= 1);

    // Variant 1: bob's client disconnects; alice writes 10.
    bob.close();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..10 {
        alice.send(&ej.jid("bob"), &format!("offline1 {tok} {i}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    bob.reconnect();
    let (got, notices) = collect(&mut bob, 10, T);
    assert_eq!(
        bodies(&got),
        (0..10)
            .map(|i| format!("offline1 {tok} {i}"))
            .collect::<Vec<_>>(),
        "notices: {notices:?}"
    );
    assert!(got.iter().all(|m| m.stamp.is_some()), "delay stamps kept");

    // Variant 2: bob's proxy crashes; alice writes 10; a new proxy process
    // over the same state directory recovers them.
    drop(bob);
    drop(pb);
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..10 {
        alice.send(&ej.jid("bob"), &format!("offline2 {tok} {i}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    pb = TestProxy::start(&ej, &bob_dir, Policy::Always);
    let mut bob = pb.client(&ej, "bob", "pw-b");
    let (got, notices) = collect(&mut bob, 10, T);
    assert_eq!(
        bodies(&got),
        (0..10)
            .map(|i| format!("offline2 {tok} {i}"))
            .collect::<Vec<_>>(),
        "notices: {notices:?}"
    );
    // The conversation continues both ways.
    bob.send(&ej.jid("alice"), &format!("back {tok}"));
    let (got, _) = collect(&mut alice, 1, T);
    assert_eq!(bodies(&got), vec![format!("back {tok}")]);
    alice.send(&ej.jid("bob"), &format!("welcome {tok}"));
    assert_eq!(
        bodies(&collect(&mut bob, 1, T).0),
        vec![format!("welcome {tok}")]
    );
    // Make sure the log has caught up, then: no new AKE.
    flush_server_log(&ej, "alice", "pw-a", &tok);
    assert_eq!(
        commits_in_log(&ej),
        commits,
        "no D-H Commit after reconnection"
    );
}

/// Alice uses the proxy; bob uses an ordinary OTR stack (libotr) on a plain
/// slixmpp client with no proxy; then only alice's side restarts.
#[test]
fn mixed_peer_libotr_and_offline_restart() {
    let ej = Ejabberd::start_debug();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let alice_dir = temp_dir("alice-proxy");
    let mut pa = TestProxy::start(&ej, &alice_dir, Policy::Always);
    let mut alice = pa.client(&ej, "alice", "pw-a");
    let mut bob = XmppClient::direct(&ej, "bob", "pw-b");
    let mut otr = PeerProcess::spawn_cached(
        PeerKind::Libotr,
        "e2e-bob",
        &ej.jid("bob"),
        &ej.jid("alice"),
        &PeerOptions::policy(PeerPolicy::V23),
    )
    .unwrap();
    let tok = token();
    let alice_jid = ej.jid("alice");

    // Bob's "client": ferry wire bodies between his XMPP client and libotr.
    let mut plain_for_bob: Vec<String> = Vec::new();
    let mut pump = |bob: &mut XmppClient, otr: &mut PeerProcess, want: usize| {
        let deadline = std::time::Instant::now() + T;
        while plain_for_bob.len() < want && std::time::Instant::now() < deadline {
            for m in bob.recv() {
                let Some(body) = m.body else { continue };
                let out = otr.receive(&body);
                plain_for_bob.extend(out.plain.iter().cloned());
                for w in &out.wire {
                    bob.send(&alice_jid, w);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        plain_for_bob.clone()
    };

    alice.send(&ej.jid("bob"), &format!("to libotr {tok}"));
    let got = pump(&mut bob, &mut otr, 1);
    assert_eq!(got, vec![format!("to libotr {tok}")]);
    for w in otr.send_text(&format!("from libotr {tok}")) {
        bob.send(&alice_jid, &w);
    }
    let (got, _) = collect(&mut alice, 1, T);
    assert_eq!(bodies(&got), vec![format!("from libotr {tok}")]);

    // Alice's proxy crashes; libotr keeps its session and writes 5.
    drop(alice);
    drop(pa);
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        for w in otr.send_text(&format!("while away {tok} {i}")) {
            bob.send(&alice_jid, &w);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    pa = TestProxy::start(&ej, &alice_dir, Policy::Always);
    let mut alice = pa.client(&ej, "alice", "pw-a");
    let (got, notices) = collect(&mut alice, 5, T);
    assert_eq!(
        bodies(&got),
        (0..5)
            .map(|i| format!("while away {tok} {i}"))
            .collect::<Vec<_>>(),
        "notices: {notices:?}"
    );
    alice.send(&ej.jid("bob"), &format!("resumed {tok}"));
    let got = pump(&mut bob, &mut otr, 2);
    assert_eq!(got.last(), Some(&format!("resumed {tok}")));
    let st = otr.status();
    assert_eq!(format!("{:?}", st.state), "Encrypted");
}

/// Policy `always`, peer without OTR: nothing leaves in plaintext, the user
/// is told, and the held message goes out once the peer runs OTR.
#[test]
fn always_policy_holds_until_peer_runs_otr() {
    let ej = Ejabberd::start_debug();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let pa = TestProxy::start(&ej, &temp_dir("alice-proxy"), Policy::Always);
    let mut alice = pa.client(&ej, "alice", "pw-a");
    let mut bob = XmppClient::direct(&ej, "bob", "pw-b");
    let tok = token();
    let secret = format!("held secret {tok}");
    alice.send(&ej.jid("bob"), &secret);
    let (got, _) = collect(&mut bob, 1, T);
    let first = bodies(&got);
    assert!(
        first[0].starts_with("?OTRv"),
        "bob only sees a query: {first:?}"
    );
    assert!(!first.iter().any(|b| b.contains(&secret)));
    let (_, notices) = collect(&mut alice, 0, Duration::from_millis(800));
    assert!(notices.iter().any(|n| n.contains("held")), "{notices:?}");

    // Bob starts an OTR client now and answers the query.
    let mut otr = PeerProcess::spawn_cached(
        PeerKind::Libotr,
        "e2e-bob-late",
        &ej.jid("bob"),
        &ej.jid("alice"),
        &PeerOptions::policy(PeerPolicy::V23),
    )
    .unwrap();
    let alice_jid = ej.jid("alice");
    let mut plain = Vec::new();
    let mut queue: Vec<String> = first.clone();
    let deadline = std::time::Instant::now() + T;
    while plain.is_empty() && std::time::Instant::now() < deadline {
        for body in queue.drain(..) {
            let out = otr.receive(&body);
            plain.extend(out.plain.iter().cloned());
            for w in &out.wire {
                bob.send(&alice_jid, w);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        queue.extend(bob.recv().into_iter().filter_map(|m| m.body));
    }
    assert_eq!(plain, vec![secret.clone()]);
    flush_server_log(&ej, "bob", "pw-b", &tok);
    assert!(
        !ej.log_contents().contains(&secret),
        "never in plaintext on the server"
    );
}

/// The binary itself, killed with SIGKILL between (and during) messages:
/// after a restart over the same state directory bob reads everything alice
/// wrote meanwhile, and the conversation goes on without a new AKE.
#[test]
fn proxy_binary_killed_with_sigkill_recovers_offline_messages() {
    let ej = Ejabberd::start_debug();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let pa = TestProxy::start(&ej, &temp_dir("alice-proxy"), Policy::Always);
    let bob_dir = temp_dir("bob-proxy-bin");
    let port = free_port();
    let pb = ProxyProcess::start(&ej, &bob_dir, port);
    let mut alice = pa.client(&ej, "alice", "pw-a");
    let mut bob = pb.client(&ej, "bob", "pw-b");
    let tok = token();
    alice.send(&ej.jid("bob"), &format!("hello {tok}"));
    assert_eq!(collect(&mut bob, 1, T).0.len(), 1);
    bob.send(&ej.jid("alice"), &format!("hi {tok}"));
    assert_eq!(collect(&mut alice, 1, T).0.len(), 1);
    let commits = commits_in_log(&ej);

    let mut pb = pb;
    for round in 0..3 {
        // SIGKILL while alice keeps writing: some messages reach the dying
        // connection, the rest go to offline storage.
        alice.send(&ej.jid("bob"), &format!("r{round} before {tok}"));
        std::thread::sleep(Duration::from_millis(150));
        pb.kill9();
        let seen_before = bodies(&collect(&mut bob, 0, Duration::from_millis(300)).0);
        drop(bob);
        for i in 0..5 {
            alice.send(&ej.jid("bob"), &format!("r{round} offline {i} {tok}"));
        }
        std::thread::sleep(Duration::from_millis(500));
        pb = ProxyProcess::start(&ej, &bob_dir, port);
        bob = pb.client(&ej, "bob", "pw-b");
        let (got, notices) = collect(&mut bob, 5, T);
        let got = bodies(&got);
        let want: Vec<String> = (0..5)
            .map(|i| format!("r{round} offline {i} {tok}"))
            .collect();
        // "before" was either shown before the kill or is recovered now.
        let tail: Vec<String> = got
            .iter()
            .filter(|b| !b.contains("before"))
            .cloned()
            .collect();
        assert_eq!(tail, want, "round {round}; notices {notices:?}");
        let before = format!("r{round} before {tok}");
        assert!(
            seen_before.contains(&before) || got.contains(&before),
            "round {round}: the message sent just before the kill was lost"
        );
        bob.send(&ej.jid("alice"), &format!("r{round} back {tok}"));
        assert_eq!(
            bodies(&collect(&mut alice, 1, T).0),
            vec![format!("r{round} back {tok}")]
        );
    }
    flush_server_log(&ej, "alice", "pw-a", &tok);
    assert_eq!(
        commits_in_log(&ej),
        commits,
        "no D-H Commit after any restart"
    );
    drop(pb);
}

/// Commands and the control contact are answered by the proxy and never
/// reach the server.
#[test]
fn commands_and_control_contact_stay_local() {
    let ej = Ejabberd::start_debug();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let pa = TestProxy::start(&ej, &temp_dir("alice-proxy"), Policy::Always);
    let pb = TestProxy::start(&ej, &temp_dir("bob-proxy"), Policy::Always);
    let mut alice = pa.client(&ej, "alice", "pw-a");
    let mut bob = pb.client(&ej, "bob", "pw-b");
    let tok = token();
    alice.send("control@o2tr.localhost", &format!("status {tok}"));
    let (replies, _) = collect(&mut alice, 1, Duration::from_secs(5));
    assert!(
        replies
            .iter()
            .any(|m| m.from.starts_with("control@o2tr.localhost")
                && m.body
                    .as_deref()
                    .is_some_and(|b| b.contains("account alice@example.test"))),
        "{replies:?}"
    );
    alice.send(&ej.jid("bob"), "/otr start");
    alice.send(&ej.jid("bob"), &format!("after start {tok}"));
    assert_eq!(
        bodies(&collect(&mut bob, 1, T).0),
        vec![format!("after start {tok}")]
    );
    alice.send(&ej.jid("bob"), &format!("!otr status {tok}"));
    alice.send(&ej.jid("bob"), "/otr fingerprint");
    let mut notices = Vec::new();
    let deadline = std::time::Instant::now() + T;
    while !notices
        .iter()
        .any(|n: &String| n.contains("your fingerprint"))
        && std::time::Instant::now() < deadline
    {
        notices.extend(collect(&mut alice, 0, Duration::ZERO).1);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        notices.iter().any(|n| n.contains("encrypted")),
        "{notices:?}"
    );
    assert!(
        notices.iter().any(|n| n.contains("your fingerprint")),
        "{notices:?}"
    );
    flush_server_log(&ej, "alice", "pw-a", &tok);
    let log = ej.log_contents();
    assert!(
        !log.contains(&format!("status {tok}")),
        "a command reached the server"
    );
    assert!(!log.contains("/otr fingerprint"));
}

/// ejabberd's flush of offline storage at the initial presence races its
/// store (a message stored meanwhile stays until the next login, or is
/// deleted unread: docs/chaos.md), so the proxy reads storage itself with
/// XEP-0013 at login. Here bob's client makes the server keep storage
/// (a XEP-0013 disco#info before its presence) so that only the proxy's
/// fetch can deliver: the stored message is shown, then the live one, in
/// sending order with no "missing" notice, and storage is emptied.
#[test]
fn a_message_in_offline_storage_is_fetched_at_login() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a"), ("bob", "pw-b")]);
    let pa = TestProxy::start(&ej, &temp_dir("alice-proxy"), Policy::Always);
    let pb = TestProxy::start(&ej, &temp_dir("bob-proxy"), Policy::Always);
    let mut alice = pa.client(&ej, "alice", "pw-a");
    let mut bob = pb.client(&ej, "bob", "pw-b");
    let tok = token();
    alice.send(&ej.jid("bob"), &format!("hello {tok}"));
    assert_eq!(collect(&mut bob, 1, T).0.len(), 1);
    bob.send(&ej.jid("alice"), &format!("hi {tok}"));
    assert_eq!(collect(&mut alice, 1, T).0.len(), 1);

    bob.close();
    std::thread::sleep(Duration::from_millis(500));
    let stuck = format!("stuck {tok}");
    alice.send(&ej.jid("bob"), &stuck);
    assert_eq!(ej.wait_offline_count("bob", 1, T), 1);

    let mut opts = pb.client_options(&ej, "bob", "pw-b");
    opts.before_presence = Some(KEEP_OFFLINE_STORAGE.into());
    let mut bob = XmppClient::connect(opts);
    assert_eq!(
        ej.wait_offline_count("bob", 0, T),
        0,
        "fetched at login and removed from storage"
    );
    let live = format!("live {tok}");
    alice.send(&ej.jid("bob"), &live);
    let (got, notices) = collect(&mut bob, 2, T);
    assert_eq!(bodies(&got), vec![stuck, live], "notices: {notices:?}");
    assert!(
        !notices.iter().any(|n| n.contains("missing")),
        "{notices:?}"
    );
    assert_eq!(ej.offline_count("bob"), 0);
}
