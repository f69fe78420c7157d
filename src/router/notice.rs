//! What the user reads: `[o2tr]` notices rendered from core events
//! (DESIGN §6). Notices never contain key material or plaintext of other
//! messages.

use crate::otr::conversation::Notice;
use crate::otr::message::Version;

/// Prefix of every notice the proxy injects.
pub const PREFIX: &str = "[o2tr]";

/// Prefix of a plaintext shown while encryption was expected (the server
/// or anyone on the path could have written it, DESIGN §6): it can never
/// pass for a decrypted message or for an `[o2tr]` notice.
pub const UNENCRYPTED_MARK: &str = "[UNENCRYPTED]";

fn version(v: Version) -> &'static str {
    match v {
        Version::V2 => "OTR v2",
        Version::V3 => "OTR v3",
    }
}

/// Render a core notice for the conversation with `peer`. `trust` is the
/// text describing the fingerprint's trust, supplied by the router for
/// [`Notice::GoneSecure`]; for [`Notice::SmpSucceeded`] it is the error
/// text if saving the verification failed.
pub fn render(n: &Notice, peer: &str, trust: Option<&str>) -> String {
    let body = match n {
        Notice::GoneSecure {
            version: v,
            fingerprint,
            ssid,
            refreshed,
            ..
        } => format!(
            "{} conversation with {peer} ({}). Their fingerprint: {fingerprint} — {}. Session id: {ssid}",
            if *refreshed {
                "Refreshed private"
            } else {
                "Private"
            },
            version(*v),
            trust.unwrap_or("unverified"),
        ),
        Notice::Resumed { .. } => {
            format!("Private conversation with {peer} resumed from saved keys (no new handshake).")
        }
        Notice::PeerEnded => format!(
            "{peer} ended the private conversation. Your messages are held until you type /otr end or /otr start."
        ),
        Notice::Ended => format!("You ended the private conversation with {peer}."),
        Notice::ReceivedUnencrypted => {
            format!("The next message from {peer} was received UNENCRYPTED.")
        }
        Notice::Unreadable { replayed: true, .. } => format!(
            "An encrypted message from {peer} arrived a second time (a duplicate, or replayed by the server), or too far out of order to be checked, and was not shown."
        ),
        Notice::Unreadable { reason, .. } => format!(
            "An encrypted message from {peer} could not be read and was not shown ({reason})."
        ),
        Notice::Missing { count } => format!(
            "{count} encrypted message(s) from {peer} sent before the following one are missing (lost, or withheld or delayed by the server)."
        ),
        // OTR error messages are plaintext: say who could have written it.
        Notice::PeerError(text) => format!(
            "{peer}'s OTR software reported an error (unauthenticated: the server could also have sent it): {text}"
        ),
        Notice::Malformed(e) => format!("A malformed OTR message from {peer} was ignored ({e})."),
        Notice::Held { waiting } => format!(
            "Message held: the conversation with {peer} is not private yet ({waiting} waiting). It will be sent encrypted once it is."
        ),
        Notice::HeldSent { count } => {
            format!("{count} held message(s) sent encrypted to {peer}.")
        }
        Notice::CannotSendFinished => format!(
            "{peer} ended the private conversation; your message was held. Type /otr start to restart it."
        ),
        Notice::UnansweredLimit { limit } => format!(
            "{limit} messages were sent to {peer} without an answer under one key; further messages are held until {peer} answers or a new handshake completes."
        ),
        Notice::HeldQueueFull => {
            format!("Too many held messages for {peer}: this message was NOT kept.")
        }
        Notice::AkeFailed { reason } => format!(
            "A private conversation with {peer} could not be set up: their handshake message failed verification ({reason})."
        ),
        Notice::TooManyInstances { limit } => format!(
            "{peer} is using more than {limit} OTR instances (clients) at once; a message from a new one was ignored."
        ),
        Notice::SmpRequested { question: Some(q) } => format!(
            "{peer} asks you to verify: {q} — answer with /otr smp <answer> (or /otr smp abort)"
        ),
        Notice::SmpRequested { question: None } => format!(
            "{peer} wants to verify you with a shared secret (SMP) — answer with /otr smp <secret> (or /otr smp abort)"
        ),
        Notice::SmpInProgress => {
            format!("{peer} answered your SMP request; checking the secrets…")
        }
        Notice::SmpSucceeded { fingerprint } => match trust {
            None => format!(
                "{peer} verified with SMP: both sides entered the same secret. Fingerprint {fingerprint} is now marked verified."
            ),
            Some(err) => format!(
                "{peer} verified with SMP: both sides entered the same secret, but marking fingerprint {fingerprint} verified failed ({err})."
            ),
        },
        Notice::SmpFailed => format!(
            "SMP failed: the secrets differ. {peer} is NOT verified (the conversation stays private but may be intercepted)."
        ),
        Notice::SmpAborted => format!("{peer} aborted SMP verification."),
        Notice::SmpError { reason } => {
            format!("SMP with {peer} was aborted: their SMP message was invalid ({reason}).")
        }
        Notice::ExtraKeyRequested { usage } => format!(
            "{peer} wants to use the OTR extra symmetric key (use {usage:#x}); this proxy does not use it."
        ),
        Notice::NotPrivate => format!(
            "{peer} answered in plaintext: their client may not support OTR. Held messages stay held."
        ),
    };
    format!("{PREFIX} {body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otr::crypto::Fingerprint;

    #[test]
    fn renders_smp_notices() {
        let ask = render(
            &Notice::SmpRequested {
                question: Some("Where did we meet?".into()),
            },
            "bob@example.org",
            None,
        );
        assert_eq!(
            ask,
            "[o2tr] bob@example.org asks you to verify: Where did we meet? — answer with /otr smp <answer> (or /otr smp abort)"
        );
        let ok = render(
            &Notice::SmpSucceeded {
                fingerprint: Fingerprint([0xab; 20]),
            },
            "bob",
            None,
        );
        assert!(
            ok.contains("verified with SMP") && ok.contains("ABABABAB"),
            "{ok}"
        );
        let ok_unsaved = render(
            &Notice::SmpSucceeded {
                fingerprint: Fingerprint([0xab; 20]),
            },
            "bob",
            Some("disk full"),
        );
        assert!(ok_unsaved.contains("failed (disk full)"), "{ok_unsaved}");
        assert!(render(&Notice::SmpFailed, "bob", None).contains("SMP failed: the secrets differ"));
        assert!(render(&Notice::SmpAborted, "bob", None).contains("aborted"));
    }

    #[test]
    fn renders_tampering_notices() {
        let replay = render(
            &Notice::Unreadable {
                reason: "counter did not increase".into(),
                replayed: true,
            },
            "bob",
            None,
        );
        assert!(replay.contains("a second time"), "{replay}");
        let bad = render(
            &Notice::Unreadable {
                reason: "bad MAC".into(),
                replayed: false,
            },
            "bob",
            None,
        );
        assert!(
            bad.contains("could not be read") && bad.contains("bad MAC"),
            "{bad}"
        );
        let gap = render(&Notice::Missing { count: 2 }, "bob", None);
        assert_eq!(
            gap,
            "[o2tr] 2 encrypted message(s) from bob sent before the following one are missing (lost, or withheld or delayed by the server)."
        );
    }

    #[test]
    fn renders_failure_and_limit_notices() {
        let ake = render(
            &Notice::AkeFailed {
                reason: "AKE MAC mismatch".into(),
            },
            "bob@example.org",
            None,
        );
        assert!(
            ake.starts_with(
                "[o2tr] A private conversation with bob@example.org could not be set up"
            ) && ake.ends_with("(AKE MAC mismatch)."),
            "{ake}"
        );
        let inst = render(&Notice::TooManyInstances { limit: 32 }, "bob", None);
        assert!(inst.contains("more than 32 OTR instances"), "{inst}");
    }
}
