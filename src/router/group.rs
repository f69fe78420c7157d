//! Group commit (issue 8): one durable commit for every stanza of a batch.
//!
//! With the on-disk store each commit costs an fsync, which capped the
//! proxy at ~1,900 messages/s. When several stanzas arrive together (one
//! read of either leg), the relay hands them to the router as one batch
//! ([`StanzaHook::batch`](crate::proxy::StanzaHook::batch)). The router
//! plans each stanza as before, but [`Router::apply`] *defers* its step
//! instead of committing it: the outputs of the hook call become a list of
//! [`Part`]s, ready outputs and planned steps in order. At the end of the
//! call (or at a barrier, see below) every planned step is committed in
//! **one** transaction ([`Store::commit_steps`](crate::store::Store::commit_steps))
//! and only then released, in order.
//!
//! O2TR persist-before-release still holds: nothing a planned step produced
//! (ciphertext, plaintext, notices) is in the returned outputs before the
//! group's commit succeeded, and the relay writes nothing of a batch before
//! the hook returns. A crash before the commit loses the whole group's key
//! state (the server re-delivers what it did not get acknowledged; the
//! client gets no ciphertext of it upstream); a crash after it leaves every
//! message in the outbox/inbox, re-sent on restart. A single stanza is a
//! group of one: no waiting for more messages, so latency is unchanged.
//!
//! Barrier: control commands read the store directly, so the pending group
//! is committed before one runs ([`Router::commit_group`]).

use std::time::SystemTime;

use super::connection::{Router, unix};
use super::notice;
use crate::proxy::{Incoming, Outgoing};
use crate::store::ekm::Step;
use crate::store::{CommitReceipt, PeerStep};
use crate::xmpp::Element;

/// One stanza's step, planned (core actions taken, wire stanzas rendered)
/// but neither committed nor released.
pub(crate) struct Planned {
    pub(crate) peer: String,
    pub(crate) account: String,
    pub(crate) step: Step,
    /// The rendered wire stanzas of the step's sends, in order.
    pub(crate) stanzas: Vec<Element>,
    /// Per stanza: its index among the step's outbox ops, if a data message.
    pub(crate) outbox_slots: Vec<Option<usize>>,
    /// The stanza that caused the step.
    pub(crate) template: Option<Element>,
    pub(crate) now: u64,
}

/// The outputs of one hook call, in order.
pub(crate) enum Part {
    /// May leave once everything before it may.
    Ready(Vec<Outgoing>),
    /// Leaves after the group commit that covers it.
    Pending(Box<Planned>),
}

impl Router {
    /// The router's side of [`StanzaHook::batch`](crate::proxy::StanzaHook::batch)
    /// (and of `from_client`/`from_server`, as batches of one).
    pub(crate) fn handle_batch(
        &mut self,
        stanzas: Vec<Incoming>,
        now: SystemTime,
    ) -> Vec<Outgoing> {
        self.settle();
        let now = unix(now);
        for s in stanzas {
            let out = match s {
                Incoming::FromClient(el) => self.handle_from_client(el, now),
                Incoming::FromServer(el) => self.handle_from_server(el, now),
            };
            self.parts.push(Part::Ready(out));
        }
        self.finish_group(Vec::new(), now)
    }

    /// Commit the steps deferred so far (and `out`, the outputs after the
    /// last of them), then hand back every output in order.
    pub(crate) fn finish_group(&mut self, out: Vec<Outgoing>, now: u64) -> Vec<Outgoing> {
        self.parts.push(Part::Ready(out));
        self.commit_group(now);
        std::mem::take(&mut self.parts)
            .into_iter()
            .flat_map(|p| match p {
                Part::Ready(out) => out,
                // commit_group released every pending step.
                Part::Pending(_) => Vec::new(),
            })
            .collect()
    }

    /// Queue `planned` after what `out` holds so far (the outputs of the
    /// same stanza that precede the step).
    pub(crate) fn defer(&mut self, out: &mut Vec<Outgoing>, planned: Planned) {
        self.parts.push(Part::Ready(std::mem::take(out)));
        self.parts.push(Part::Pending(Box::new(planned)));
    }

    /// Commit every pending step in one transaction, then release them in
    /// order. On failure nothing of the group is released: each step's
    /// peer is told, as for a failed single commit.
    pub(crate) fn commit_group(&mut self, now: u64) {
        let Some(account) = self.account.as_ref().map(|a| a.bare.clone()) else {
            return;
        };
        if !self.parts.iter().any(|p| matches!(p, Part::Pending(_))) {
            return;
        }
        let parts = std::mem::take(&mut self.parts);
        let steps: Vec<PeerStep<'_>> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Pending(p) if p.step.needs_commit() => Some(PeerStep {
                    peer: &p.peer,
                    ops: &p.step.durable,
                }),
                _ => None,
            })
            .collect();
        let committed = if steps.is_empty() {
            Ok(Vec::new())
        } else {
            self.shared.store().commit_steps(&account, &steps, now)
        };
        drop(steps);
        let mut receipts = committed.map(Vec::into_iter).map_err(|e| {
            tracing::error!(cause = %e, "could not persist EKM state");
            e.to_string()
        });
        for part in parts {
            let planned = match part {
                Part::Ready(out) => {
                    self.parts.push(Part::Ready(out));
                    continue;
                }
                Part::Pending(p) => *p,
            };
            let mut out = Vec::new();
            match &mut receipts {
                Ok(r) => {
                    let receipt = if planned.step.needs_commit() {
                        r.next().unwrap_or_default()
                    } else {
                        CommitReceipt::default()
                    };
                    self.release(planned, receipt, &mut out);
                }
                Err(cause) => {
                    let text = format!(
                        "{} Could not save the session state ({cause}); nothing was sent or shown.",
                        notice::PREFIX
                    );
                    out.push(self.notice_to_client(&planned.peer, &text));
                }
            }
            self.parts.push(Part::Ready(out));
        }
    }
}
