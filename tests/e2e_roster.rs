//! The control contact in the client's roster (DESIGN §6), end to end:
//! slixmpp through the proxy to a real ejabberd on loopback. The client's
//! roster shows `control@o2tr.localhost`; removing it is answered by the
//! proxy, and so is a presence subscription to it; the server's roster
//! never holds it.

mod common;

use common::ejabberd::Ejabberd;
use common::proxy::{TestProxy, temp_dir};
use common::xmpp_client::XmppClient;
use o2tr_proxy::otr::policy::Policy;

const CONTROL: &str = "control@o2tr.localhost";

#[test]
fn control_contact_is_in_the_roster_and_never_on_the_server() {
    let ej = Ejabberd::start();
    ej.register_all(&[("alice", "pw-a")]);

    let proxy = TestProxy::start(&ej, &temp_dir("roster-proxy"), Policy::Always);
    let mut alice = proxy.client(&ej, "alice", "pw-a");
    let roster = alice.roster();
    assert!(
        roster.iter().any(|(j, s)| j == CONTROL && s == "both"),
        "control contact missing from the roster: {roster:?}"
    );
    // Removing it is answered locally (the command waits for the result).
    alice.remove_roster_item(CONTROL);
    assert!(alice.is_connected());
    // A presence subscription to it is answered by the proxy too; were it
    // relayed, the server would add the contact with `ask='subscribe'`.
    alice.send_raw(&format!("<presence to='{CONTROL}' type='subscribe'/>"));
    alice.send_raw(&format!("<presence to='{CONTROL}' type='subscribed'/>"));
    // A round trip through the same stream: the presences went first.
    let _ = alice.roster();
    assert!(alice.is_connected());

    // The server's roster, seen without the proxy, never had it.
    let mut direct = XmppClient::direct(&ej, "alice", "pw-a");
    let server_side = direct.roster();
    assert!(
        server_side.iter().all(|(j, _)| j != CONTROL),
        "the control contact reached the server: {server_side:?}"
    );
    direct.quit();
    alice.quit();
}
