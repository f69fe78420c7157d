//! In-conversation commands (`/otr …`, also `!otr …` for clients that eat
//! slash commands) and the control contact (DESIGN §6). Commands never
//! leave the proxy.

use crate::otr::conversation::Action;
use crate::otr::crypto::Fingerprint;
use crate::otr::policy::Policy;
use crate::proxy::Outgoing;
use crate::store::Trust;

use super::connection::Router;
use super::notice::PREFIX;

/// A parsed `/otr` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start or refresh OTR.
    Start,
    /// End the private conversation.
    End,
    /// Show the conversation's state.
    Status,
    /// Show our and their fingerprints.
    Fingerprint,
    /// Mark the peer's current fingerprint as verified.
    Trust,
    /// Mark it as not trusted.
    Distrust,
    /// Socialist Millionaires' Protocol (arguments as typed).
    Smp(String),
    /// Change the policy for this peer.
    Policy(String),
    /// Show help.
    Help,
    /// Anything else.
    Unknown(String),
}

const HELP: &str = "commands: /otr start | end | status | fingerprint | trust | distrust | smp [<question>?] <secret> | smp abort | policy manual|opportunistic|always | help (also !otr …)";

impl Command {
    /// Parse a message body; `None` if it is not a command.
    pub fn parse(body: &str) -> Option<Command> {
        let t = body.trim();
        let rest = t.strip_prefix("/otr").or_else(|| t.strip_prefix("!otr"))?;
        if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
            return None;
        }
        let rest = rest.trim();
        let (word, args) = match rest.split_once(char::is_whitespace) {
            Some((w, a)) => (w, a.trim()),
            None => (rest, ""),
        };
        Some(match word.to_ascii_lowercase().as_str() {
            "" | "help" => Command::Help,
            "start" | "init" => Command::Start,
            "end" | "finish" | "stop" => Command::End,
            "status" | "info" => Command::Status,
            "fingerprint" | "fpr" => Command::Fingerprint,
            "trust" | "verify" => Command::Trust,
            "distrust" | "untrust" => Command::Distrust,
            "smp" => Command::Smp(args.to_string()),
            "policy" => Command::Policy(args.to_string()),
            other => Command::Unknown(other.to_string()),
        })
    }
}

/// Run a command in the conversation with `peer`. Replies are pushed to
/// `out`; core actions (query, end) are returned for the router to apply.
pub(crate) fn run(
    r: &mut Router,
    peer: &str,
    cmd: Command,
    now: u64,
    out: &mut Vec<Outgoing>,
) -> Option<Vec<Action>> {
    let mut say = |r: &mut Router, text: String| {
        let n = r.notice_to_client(peer, &format!("{PREFIX} {text}"));
        out.push(n);
    };
    match cmd {
        Command::Help => say(r, HELP.into()),
        Command::Unknown(w) => say(r, format!("unknown command {w:?}; {HELP}")),
        Command::Start => {
            say(r, format!("starting a private conversation with {peer}…"));
            return r.peer(peer, now).map(|p| p.conv.handle_start(now));
        }
        Command::End => {
            let mut rng = std::mem::replace(&mut r.rng, rand::make_rng());
            let actions = r.peer(peer, now).map(|p| p.conv.handle_end(now, &mut rng));
            r.rng = rng;
            if actions.as_ref().is_some_and(|a| a.is_empty()) {
                say(r, format!("no private conversation with {peer} to end."));
            }
            return actions;
        }
        Command::Status => {
            let text = status_text(r, peer, now);
            say(r, text);
        }
        Command::Fingerprint => {
            let ours = r
                .account
                .as_ref()
                .map(|a| a.identity.key.public_key().fingerprint().to_string())
                .unwrap_or_else(|| "(not logged in)".into());
            let theirs = r
                .peer(peer, now)
                .and_then(|p| p.conv.peer_fingerprint())
                .map(|f| f.to_string())
                .unwrap_or_else(|| "(no private session)".into());
            say(r, format!("your fingerprint: {ours}; {peer}'s: {theirs}"));
        }
        Command::Trust | Command::Distrust => {
            let trust = if cmd == Command::Trust {
                Trust::Verified
            } else {
                Trust::Distrusted
            };
            let fpr = r.peer(peer, now).and_then(|p| p.conv.peer_fingerprint());
            let account = r.account.as_ref().map(|a| a.bare.clone());
            match (fpr, account) {
                (Some(f), Some(acc)) => {
                    let res = r
                        .shared
                        .store()
                        .set_fingerprint(&acc, peer, &f.0, trust, now);
                    match res {
                        Ok(()) => say(
                            r,
                            format!(
                                "{peer}'s fingerprint {f} is now {}.",
                                if trust == Trust::Verified {
                                    "verified"
                                } else {
                                    "distrusted"
                                }
                            ),
                        ),
                        Err(e) => say(r, format!("could not save trust: {e}")),
                    }
                }
                _ => say(
                    r,
                    format!(
                        "no private session with {peer}: nothing to {}.",
                        if trust == Trust::Verified {
                            "trust"
                        } else {
                            "distrust"
                        }
                    ),
                ),
            }
        }
        Command::Smp(args) => return smp(r, peer, &args, now, &mut say),
        Command::Policy(p) => match p.parse::<Policy>() {
            Ok(policy) => {
                r.policies.insert(peer.to_string(), policy);
                if let Some(c) = r.peer(peer, now) {
                    c.conv.set_policy(policy);
                }
                say(
                    r,
                    format!("policy for {peer} is now {policy} (until this connection ends)."),
                );
            }
            Err(e) => say(r, e.to_string()),
        },
    }
    None
}

/// What `/otr smp …` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmpRequest {
    /// `/otr smp abort`.
    Abort,
    /// Answer the peer's pending request with this secret.
    Answer(String),
    /// Start SMP with this secret and optional question.
    Start {
        /// The question shown to the peer (up to and including the first
        /// '?').
        question: Option<String>,
        /// The secret.
        secret: String,
    },
}

impl SmpRequest {
    /// Interpret the arguments of `/otr smp`. With a request from the peer
    /// pending, everything typed is the answer; otherwise `<question>?
    /// <secret>` (the question ends at the first '?') or `<secret>`.
    /// `None` for empty arguments.
    pub fn parse(args: &str, answering: bool) -> Option<SmpRequest> {
        let args = args.trim();
        if args.is_empty() {
            return None;
        }
        if args.eq_ignore_ascii_case("abort") {
            return Some(SmpRequest::Abort);
        }
        if answering {
            return Some(SmpRequest::Answer(args.to_string()));
        }
        if let Some(i) = args.find('?') {
            let (q, rest) = args.split_at(i + 1);
            let secret = rest.trim();
            if !secret.is_empty() {
                return Some(SmpRequest::Start {
                    question: Some(q.trim().to_string()),
                    secret: secret.to_string(),
                });
            }
        }
        Some(SmpRequest::Start {
            question: None,
            secret: args.to_string(),
        })
    }
}

/// `/otr smp …`: start, answer or abort SMP with `peer`.
fn smp(
    r: &mut Router,
    peer: &str,
    args: &str,
    now: u64,
    say: &mut impl FnMut(&mut Router, String),
) -> Option<Vec<Action>> {
    let (private, pending) = match r.peer(peer, now) {
        Some(p) => (p.conv.is_private(), p.conv.smp_pending_request()),
        None => {
            say(r, format!("{peer}: not logged in"));
            return None;
        }
    };
    let Some(req) = SmpRequest::parse(args, pending.is_some()) else {
        say(
            r,
            "usage: /otr smp <secret> | /otr smp <question>? <secret> | /otr smp <answer> (to a question) | /otr smp abort".into(),
        );
        return None;
    };
    if !private && req != SmpRequest::Abort {
        say(
            r,
            format!(
                "no private conversation with {peer}: start one with /otr start before verifying."
            ),
        );
        return None;
    }
    let mut rng = std::mem::replace(&mut r.rng, rand::make_rng());
    let actions = r.peer(peer, now).map(|p| match &req {
        SmpRequest::Abort => p.conv.handle_smp_abort(now, &mut rng),
        SmpRequest::Answer(secret) => p.conv.handle_smp_answer(secret, now, &mut rng),
        SmpRequest::Start { question, secret } => {
            p.conv
                .handle_smp_start(secret, question.as_deref(), now, &mut rng)
        }
    });
    r.rng = rng;
    let sent = actions.as_ref().is_some_and(|a| !a.is_empty());
    let text = match (&req, sent) {
        (SmpRequest::Abort, true) => format!("SMP with {peer} aborted."),
        (SmpRequest::Abort, false) => format!("no SMP with {peer} to abort."),
        (SmpRequest::Answer(_), true) => {
            format!("answer sent; waiting for {peer}'s SMP result…")
        }
        (
            SmpRequest::Start {
                question: Some(q), ..
            },
            true,
        ) => {
            format!("asked {peer} to verify: {q} (waiting for their answer)")
        }
        (SmpRequest::Start { question: None, .. }, true) => {
            format!("SMP verification started; {peer} must type the same secret.")
        }
        (_, false) => format!("could not start SMP with {peer}."),
    };
    say(r, text);
    actions
}

/// SMP succeeded with `peer`: mark `fpr` verified in the store, like
/// `/otr trust`. Returns the error text if that failed.
pub(crate) fn smp_verified(
    r: &mut Router,
    account: &str,
    peer: &str,
    fpr: &Fingerprint,
    now: u64,
) -> Option<String> {
    let res = r
        .shared
        .store()
        .set_fingerprint(account, peer, &fpr.0, Trust::Verified, now);
    match res {
        Ok(()) => None,
        Err(e) => {
            tracing::error!(peer, cause = %e, "could not save SMP verification");
            Some(e.to_string())
        }
    }
}

fn status_text(r: &mut Router, peer: &str, now: u64) -> String {
    let policy = r.policies.get(peer).copied().unwrap_or(r.shared.cfg.policy);
    let Some(p) = r.peer(peer, now) else {
        return format!("{peer}: not logged in");
    };
    let mut parts = Vec::new();
    for st in p.conv.status() {
        let mut s = format!("instance {:08x}: {}", st.instance, st.state);
        if let Some(v) = st.version {
            s.push_str(&format!(", {v:?}"));
        }
        if let Some((o, t)) = st.keyids {
            s.push_str(&format!(", keyids ours {o} theirs {t}"));
        }
        if let Some(f) = st.fingerprint {
            s.push_str(&format!(", fingerprint {f}"));
        }
        parts.push(s);
    }
    if parts.is_empty() {
        parts.push("no OTR session".into());
    }
    format!(
        "{peer}: {} (policy {policy}; {} held)",
        parts.join("; "),
        p.conv.held_count()
    )
}

/// Answer a message sent to the control contact.
pub(crate) fn control(r: &mut Router, text: &str, now: u64) -> String {
    let t = text.trim();
    let (word, args) = match t.split_once(char::is_whitespace) {
        Some((w, a)) => (w.to_ascii_lowercase(), a.trim().to_string()),
        None => (t.to_ascii_lowercase(), String::new()),
    };
    let account = r.account.as_ref().map(|a| a.bare.clone());
    match word.as_str() {
        "status" => format!(
            "o2tr-proxy: account {}; default policy {}; {} conversation(s) open on this connection.",
            account.unwrap_or_else(|| "(not bound)".into()),
            r.shared.cfg.policy,
            r.peers.len()
        ),
        "fingerprint" => r
            .account
            .as_ref()
            .map(|a| format!("your fingerprint: {}", a.identity.key.public_key().fingerprint()))
            .unwrap_or_else(|| "not logged in".into()),
        "sessions" => {
            let Some(acc) = account else {
                return "not logged in".into();
            };
            match r.shared.store().snapshots() {
                Ok(list) => {
                    let lines: Vec<String> = list
                        .iter()
                        .filter(|s| s.key.account == acc)
                        .map(|s| {
                            format!(
                                "{} instance {:08x}: {:?}, updated {}s ago",
                                s.key.peer,
                                s.key.instance,
                                s.state,
                                now.saturating_sub(s.updated_at)
                            )
                        })
                        .collect();
                    if lines.is_empty() {
                        "no saved sessions".into()
                    } else {
                        lines.join("\n")
                    }
                }
                Err(e) => format!("store error: {e}"),
            }
        }
        "trust" => {
            let mut it = args.split_whitespace();
            let (Some(peer), Some(acc)) = (it.next(), account) else {
                return "usage: trust <peer-jid> <fingerprint>".into();
            };
            let hex: String = it.collect();
            match crate::otr::crypto::Fingerprint::from_hex(&hex) {
                Some(f) => match r
                    .shared
                    .store()
                    .set_fingerprint(&acc, peer, &f.0, Trust::Verified, now)
                {
                    Ok(()) => format!("{peer}'s fingerprint {f} is now verified."),
                    Err(e) => format!("store error: {e}"),
                },
                None => "usage: trust <peer-jid> <fingerprint: 40 hex digits>".into(),
            }
        }
        "policy" => match args.parse::<Policy>() {
            Ok(p) => {
                let peers: Vec<String> = r.peers.keys().cloned().collect();
                for peer in peers {
                    r.policies.insert(peer, p);
                }
                for peer in r.peers.values_mut() {
                    peer.conv.set_policy(p);
                }
                format!("policy {p} applied to open conversations (new ones use the configured default {}).", r.shared.cfg.policy)
            }
            Err(e) => e.to_string(),
        },
        _ => "control commands: help | status | sessions | fingerprint | trust <peer> <fingerprint> | policy manual|opportunistic|always".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_with_either_prefix() {
        assert_eq!(Command::parse("/otr start"), Some(Command::Start));
        assert_eq!(Command::parse("  !otr END "), Some(Command::End));
        assert_eq!(Command::parse("/otr"), Some(Command::Help));
        assert_eq!(
            Command::parse("/otr policy always"),
            Some(Command::Policy("always".into()))
        );
        assert_eq!(Command::parse("/otrx"), None);
        assert_eq!(Command::parse("hello /otr start"), None);
        assert_eq!(
            Command::parse("/otr smp where did we meet? Paris"),
            Some(Command::Smp("where did we meet? Paris".into()))
        );
    }

    #[test]
    fn parses_smp_arguments() {
        assert_eq!(SmpRequest::parse("  ", false), None);
        assert_eq!(SmpRequest::parse("Abort", false), Some(SmpRequest::Abort));
        assert_eq!(SmpRequest::parse("abort", true), Some(SmpRequest::Abort));
        assert_eq!(
            SmpRequest::parse("correct horse", false),
            Some(SmpRequest::Start {
                question: None,
                secret: "correct horse".into()
            })
        );
        assert_eq!(
            SmpRequest::parse("where did we meet? in Paris? yes", false),
            Some(SmpRequest::Start {
                question: Some("where did we meet?".into()),
                secret: "in Paris? yes".into()
            })
        );
        // A '?' with nothing after it is part of the secret.
        assert_eq!(
            SmpRequest::parse("really?", false),
            Some(SmpRequest::Start {
                question: None,
                secret: "really?".into()
            })
        );
        // Answering: everything typed is the answer.
        assert_eq!(
            SmpRequest::parse("Paris? yes", true),
            Some(SmpRequest::Answer("Paris? yes".into()))
        );
    }
}
