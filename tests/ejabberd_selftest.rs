//! Self-test of the end-to-end harness, without the proxy: a real ejabberd
//! on loopback and real slixmpp clients. If these fail, the proxy's
//! end-to-end tests cannot be trusted either.
//!
//! Needs Debian's `ejabberd` and python3 with `slixmpp` (see
//! tests/common/ejabberd.rs and tests/common/xmpp_client.rs).

mod common;

use std::time::{Duration, Instant};

use common::ejabberd::Ejabberd;
use common::xmpp_client::{ClientOptions, KEEP_OFFLINE_STORAGE, XmppClient};

const T: Duration = Duration::from_secs(15);

/// A token unique to this run, so a body found in a log or archive cannot
/// come from anything but this test.
fn token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}", nanos ^ u128::from(std::process::id()))
}

#[test]
fn direct_exchange_is_ordered_and_debug_log_is_lossless() {
    let t0 = Instant::now();
    let ej = Ejabberd::start_debug();
    ej.register_all(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let started = t0.elapsed();

    let mut alice = XmppClient::direct(&ej, "alice", "alice-pw");
    let mut bob = XmppClient::direct(&ej, "bob", "bob-pw");
    assert!(alice.full_jid().starts_with("alice@example.test/"));
    let tok = token();
    let n = 20;
    for i in 0..n {
        alice.send(&ej.jid("bob"), &format!("a2b {tok} #{i}"));
        bob.send(&ej.jid("alice"), &format!("b2a {tok} #{i}"));
    }
    let at_bob = bob.recv_until(n, T);
    let at_alice = alice.recv_until(n, T);
    let bodies = |msgs: &[common::xmpp_client::Message]| -> Vec<String> {
        msgs.iter().map(|m| m.body.clone().unwrap()).collect()
    };
    let want_b: Vec<String> = (0..n).map(|i| format!("a2b {tok} #{i}")).collect();
    let want_a: Vec<String> = (0..n).map(|i| format!("b2a {tok} #{i}")).collect();
    assert_eq!(bodies(&at_bob), want_b);
    assert_eq!(bodies(&at_alice), want_a);
    assert!(at_bob.iter().all(|m| m.from == alice.full_jid()));
    assert!(
        at_bob
            .iter()
            .all(|m| m.stamp.is_none() && m.mtype == "chat")
    );
    assert!(at_alice.iter().all(|m| m.from == bob.full_jid()));

    // Control for "the server never saw a plaintext" checks: with loglevel
    // debug every one of the 40 bodies sent in a burst is in the log (the
    // default logger would have dropped most of them).
    let all: Vec<&str> = want_a.iter().chain(&want_b).map(String::as_str).collect();
    let missing = ej.wait_log_contains_all(&all, T);
    assert!(missing.is_empty(), "log lost bodies: {missing:?}");
    let log = ej.log_contents();
    assert!(!log.contains(&format!("never-sent {tok}")));

    // The MAM archive (second server-side record) has them too.
    let archive = alice.mam(Some(&ej.jid("bob")));
    assert_eq!(archive.len(), 2 * n);
    assert!(
        archive
            .iter()
            .any(|m| m.body.as_deref() == Some(want_b[0].as_str()))
    );

    alice.quit();
    bob.quit();
    eprintln!(
        "direct exchange: ejabberd up + 2 users in {started:?}, total {:?}",
        t0.elapsed()
    );
}

#[test]
fn offline_messages_survive_disconnect_and_server_restart() {
    let t0 = Instant::now();
    let mut ej = Ejabberd::start();
    ej.register_all(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let tok = token();

    let mut alice = XmppClient::direct(&ej, "alice", "alice-pw");
    let mut bob = XmppClient::direct(&ej, "bob", "bob-pw");
    bob.close();
    assert!(!bob.is_connected());

    let sent: Vec<String> = (0..5).map(|i| format!("offline {tok} #{i}")).collect();
    for body in &sent {
        alice.send_with(&ej.jid("bob"), body, &["receipt", "chatstate"]);
    }
    // The server holds them (poll: routing is asynchronous).
    assert_eq!(ej.wait_offline_count("bob", 5, T), 5);
    // Offline storage is visible in a database dump (control for dump-based
    // leak checks).
    assert!(ej.dump_db().contains(&sent[0]));
    alice.quit();

    // Restart the server: accounts and offline storage persist, same port.
    let t_restart = Instant::now();
    ej.restart();
    let restart = t_restart.elapsed();
    assert_eq!(ej.offline_count("bob"), 5);

    let reconnected = bob.reconnect();
    assert!(reconnected.starts_with("bob@example.test/"));
    let got = bob.recv_until(5, T);
    let bodies: Vec<String> = got.iter().map(|m| m.body.clone().unwrap()).collect();
    assert_eq!(bodies, sent, "offline messages out of order or missing");
    for m in &got {
        assert!(m.from.starts_with("alice@example.test/"), "from {}", m.from);
        assert!(
            m.stamp.as_deref().is_some_and(|s| s.ends_with('Z')),
            "offline message without delay stamp: {m:?}"
        );
    }
    // Stamps are non-decreasing (ISO 8601 UTC sorts as text).
    let stamps: Vec<&str> = got.iter().map(|m| m.stamp.as_deref().unwrap()).collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    assert_eq!(ej.offline_count("bob"), 0);
    bob.quit();
    eprintln!(
        "offline: restart took {restart:?}, total {:?}",
        t0.elapsed()
    );
}

#[test]
fn raw_mode_shows_children_and_a_killed_client_goes_offline() {
    let ej = Ejabberd::start();
    ej.register("alice", "pw-a");
    ej.register("bob", "pw-b");
    assert!(ej.ctl(&["registered_users", &ej.domain]).contains("bob"));
    let mut opts = common::xmpp_client::ClientOptions::direct(&ej, "bob", "pw-b");
    opts.raw = true;
    let mut bob = XmppClient::connect(opts);
    let mut alice = XmppClient::direct(&ej, "alice", "pw-a");
    let tok = token();
    let body = format!("rich {tok}");
    alice.send_with(&ej.jid("bob"), &body, &["xhtml", "oob", "subject"]);
    let got = bob.recv_until(1, T);
    assert_eq!(got.len(), 1);
    let xml = got[0].xml.as_deref().unwrap();
    assert!(xml.contains("http://jabber.org/protocol/xhtml-im"), "{xml}");
    assert!(xml.contains("jabber:x:oob"), "{xml}");
    assert!(xml.contains(&format!("<subject>{body}</subject>")), "{xml}");

    // SIGKILL: the TCP connection drops without </stream>; the server notices
    // and later messages go to offline storage.
    bob.kill();
    let deadline = Instant::now() + T;
    let mut stored = false;
    let mut i = 0;
    while !stored && Instant::now() < deadline {
        alice.send(&ej.jid("bob"), &format!("after kill {tok} #{i}"));
        i += 1;
        std::thread::sleep(Duration::from_millis(200));
        stored = ej.offline_count("bob") > 0;
    }
    assert!(
        stored,
        "messages to a killed client never reached offline storage"
    );
    alice.quit();
}

/// What the proxy's gap fetch relies on (`src/router/fetch.rs`): ejabberd
/// serves XEP-0013 to an available session. A message still in offline
/// storage comes back on a `<fetch/>`, routed to the session and marked
/// with its node; fetching leaves it stored, removing that node empties
/// storage (so the next login does not deliver it again). The session
/// keeps the message in storage past its initial presence the way a
/// XEP-0013 client does (disco#info on the offline node first): the race
/// the proxy meets (docs/chaos.md) cannot be provoked at will.
#[test]
fn offline_storage_can_be_fetched_again_and_emptied_by_node() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "alice-pw"), ("bob", "bob-pw")]);
    let mut alice = XmppClient::direct(&ej, "alice", "alice-pw");
    let body = format!("stored {}", token());
    alice.send(&ej.jid("bob"), &body);
    assert_eq!(ej.wait_offline_count("bob", 1, T), 1);

    let mut opts = ClientOptions::direct(&ej, "bob", "bob-pw");
    opts.raw = true;
    opts.before_presence = Some(KEEP_OFFLINE_STORAGE.into());
    let mut bob = XmppClient::connect(opts);
    std::thread::sleep(Duration::from_millis(500));
    assert!(bob.recv().is_empty(), "kept in storage past the presence");
    assert_eq!(ej.offline_count("bob"), 1);

    bob.send_raw(
        "<iq type='get' id='f1'><offline xmlns='http://jabber.org/protocol/offline'><fetch/></offline></iq>",
    );
    let got = bob.recv_until(1, T);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].body.as_deref(), Some(body.as_str()));
    let xml = got[0].xml.clone().unwrap_or_default();
    assert!(xml.contains("http://jabber.org/protocol/offline"), "{xml}");
    let node = xml
        .split("node=")
        .nth(1)
        .and_then(|rest| rest.get(1..))
        .and_then(|rest| rest.split(['"', '\'']).next())
        .unwrap_or_default()
        .to_string();
    assert!(!node.is_empty(), "no node in {xml}");
    // Fetching leaves it stored; removing it by node does not.
    assert_eq!(ej.offline_count("bob"), 1);
    bob.send_raw(&format!(
        "<iq type='set' id='f2'><offline xmlns='http://jabber.org/protocol/offline'>\
         <item action='remove' node='{node}'/></offline></iq>"
    ));
    assert_eq!(ej.wait_offline_count("bob", 0, T), 0);
    alice.quit();
    bob.quit();
}
