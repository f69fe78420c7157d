//! Putting a peer's encrypted messages back in sending order.
//!
//! Servers do not keep order: ejabberd hands a reconnecting client the
//! messages that arrive live (after the session is bound) before those it
//! flushes from offline storage (after the initial presence). The OTR core
//! accepts such a late message once (its replay window, [`crate::otr::keys`])
//! and reports where each message stands in the sender's order and how many
//! right before it have not arrived ([`Order`]). A message that arrives
//! after such a gap is held here — already committed to the inbox, so a
//! crash cannot lose it — for at most [`HOLD_SECS`], until the gap fills;
//! then everything goes out in order. When the time is up the held messages
//! go out anyway, and the user is told how many are still missing. A
//! missing message that turns up later still is shown when it comes.

use std::collections::{BTreeMap, BTreeSet};

use crate::otr::conversation::Order;
use crate::otr::keys::{Position, REPLAY_WINDOW};

/// How long a message waits for the ones missing before it. Covers a
/// client's reconnection: bind, roster, initial presence, then the
/// server's offline flush.
pub(crate) const HOLD_SECS: u64 = 5;

/// Most messages held behind one gap; a peer that sends more within the
/// hold gets them all shown at once (bounds memory; they are in the inbox
/// anyway).
pub(crate) const MAX_HELD: usize = 256;

/// One peer's messages waiting for a gap to fill.
pub(crate) struct Reorder<T> {
    /// The session the held positions belong to.
    ssid: Option<[u8; 8]>,
    held: BTreeMap<Position, T>,
    /// Positions reported missing and not arrived yet.
    missing: BTreeSet<Position>,
    /// When the held messages go out regardless (unix seconds).
    deadline: Option<u64>,
    /// Missing messages no longer waited for because too many were held,
    /// still to be reported at the next [`Reorder::expire`].
    given_up: u64,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Reorder {
            ssid: None,
            held: BTreeMap::new(),
            missing: BTreeSet::new(),
            deadline: None,
            given_up: 0,
        }
    }
}

impl<T> Reorder<T> {
    /// A message arrived (`order` from its [`crate::otr::conversation::Delivery`]);
    /// returns what goes out now, in sending order. A message without an
    /// order (plaintext, or from the inbox after a restart) or from another
    /// session goes out after everything held.
    pub(crate) fn arrive(&mut self, order: Option<&Order>, item: T, now: u64) -> Vec<T> {
        let Some(o) = order else {
            let mut out = self.flush();
            out.push(item);
            return out;
        };
        let mut out = Vec::new();
        if self.ssid != Some(o.ssid) {
            out = self.flush();
            self.ssid = Some(o.ssid);
        }
        self.missing.remove(&o.position);
        // Only the newest REPLAY_WINDOW counters below it can still be
        // accepted by the core; older ones are not worth waiting for.
        let first = o.position.ctr - o.skipped.min(REPLAY_WINDOW);
        for ctr in first..o.position.ctr {
            self.missing.insert(Position { ctr, ..o.position });
        }
        self.held.insert(o.position, item);
        while let Some(entry) = self.held.first_entry() {
            if self.missing.first().is_some_and(|m| m < entry.key()) {
                break;
            }
            out.push(entry.remove());
        }
        if self.held.len() > MAX_HELD {
            tracing::warn!(
                limit = MAX_HELD,
                "too many messages held behind a gap; showing them now"
            );
            self.given_up += self.missing.len() as u64;
            out.extend(self.flush());
            // Reported at the next tick.
            self.deadline = Some(now);
        } else if self.missing.is_empty() {
            self.deadline = None;
        } else if self.deadline.is_none() {
            self.deadline = Some(now + HOLD_SECS);
        }
        out
    }

    /// Since when the current gap has been open (unix seconds).
    pub(crate) fn open_since(&self) -> Option<u64> {
        if self.missing.is_empty() {
            return None;
        }
        self.deadline.map(|d| d.saturating_sub(HOLD_SECS))
    }

    /// Whether something is held.
    #[cfg(test)]
    fn is_waiting(&self) -> bool {
        !self.held.is_empty()
    }

    /// At the deadline: everything held, in order, and how many messages
    /// are still missing (given up on). `None` before it.
    pub(crate) fn expire(&mut self, now: u64) -> Option<(Vec<T>, u64)> {
        if self.deadline.is_none_or(|d| now < d) {
            return None;
        }
        let missing = self.missing.len() as u64 + std::mem::take(&mut self.given_up);
        Some((self.flush(), missing))
    }

    /// Everything held, in order; stops waiting for the missing ones.
    fn flush(&mut self) -> Vec<T> {
        self.missing.clear();
        self.deadline = None;
        std::mem::take(&mut self.held).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSID: [u8; 8] = [1; 8];

    fn order(sender_keyid: u32, ctr: u64, skipped: u64, late: bool) -> Order {
        Order {
            ssid: SSID,
            position: Position {
                sender_keyid,
                recipient_keyid: 2,
                ctr,
            },
            skipped,
            late,
        }
    }

    #[test]
    fn in_order_messages_go_out_at_once() {
        let mut r = Reorder::default();
        for ctr in 1..=3 {
            assert_eq!(r.arrive(Some(&order(1, ctr, 0, false)), ctr, 0), [ctr]);
        }
        assert!(!r.is_waiting());
        assert_eq!(r.expire(100), None);
    }

    /// ejabberd's order after a reconnection: 3 and 4 live, then 1 and 2
    /// from offline storage.
    #[test]
    fn a_gap_holds_later_messages_until_it_fills() {
        let mut r = Reorder::default();
        assert!(r.arrive(Some(&order(1, 3, 2, false)), 3, 10).is_empty());
        assert!(r.arrive(Some(&order(1, 4, 0, false)), 4, 10).is_empty());
        assert!(r.is_waiting());
        assert_eq!(r.arrive(Some(&order(1, 1, 0, true)), 1, 11), [1]);
        assert_eq!(r.arrive(Some(&order(1, 2, 0, true)), 2, 11), [2, 3, 4]);
        assert!(!r.is_waiting());
        assert_eq!(r.expire(100), None);
    }

    #[test]
    fn late_messages_in_reverse_order_are_put_back_in_order() {
        let mut r = Reorder::default();
        assert!(r.arrive(Some(&order(1, 4, 3, false)), 4, 0).is_empty());
        assert!(r.arrive(Some(&order(1, 3, 0, true)), 3, 0).is_empty());
        assert!(r.arrive(Some(&order(1, 2, 0, true)), 2, 0).is_empty());
        assert_eq!(r.arrive(Some(&order(1, 1, 0, true)), 1, 0), [1, 2, 3, 4]);
    }

    /// A message the server really lost: the later ones wait for the hold
    /// time only, then go out with the count of the missing.
    #[test]
    fn the_hold_ends_at_the_deadline() {
        let mut r = Reorder::default();
        assert!(r.arrive(Some(&order(1, 3, 2, false)), 3, 10).is_empty());
        assert_eq!(r.arrive(Some(&order(1, 1, 0, true)), 1, 11), [1]);
        assert!(r.arrive(Some(&order(1, 4, 0, false)), 4, 12).is_empty());
        assert_eq!(r.expire(10 + HOLD_SECS - 1), None);
        assert_eq!(r.expire(10 + HOLD_SECS), Some((vec![3, 4], 1)));
        assert!(!r.is_waiting());
        // The lost one turns up after all: shown when it comes.
        assert_eq!(r.arrive(Some(&order(1, 2, 0, true)), 2, 20), [2]);
        assert_eq!(r.arrive(Some(&order(1, 5, 0, false)), 5, 20), [5]);
    }

    #[test]
    fn positions_order_across_key_changes() {
        // The sender's key 1, counter 3 (1 and 2 missing), then its next
        // key's first message: that one waits behind the gap too.
        let mut r = Reorder::default();
        assert!(r.arrive(Some(&order(1, 3, 2, false)), 13, 0).is_empty());
        assert!(r.arrive(Some(&order(2, 1, 0, false)), 21, 0).is_empty());
        assert_eq!(r.arrive(Some(&order(1, 1, 0, true)), 11, 0), [11]);
        assert_eq!(r.arrive(Some(&order(1, 2, 0, true)), 12, 0), [12, 13, 21]);
    }

    #[test]
    fn unordered_or_other_session_messages_flush_what_is_held() {
        let mut r = Reorder::default();
        assert!(r.arrive(Some(&order(1, 3, 2, false)), 3, 0).is_empty());
        assert_eq!(r.arrive(None, 100, 0), [3, 100]);
        assert!(!r.is_waiting());
        assert!(r.arrive(Some(&order(1, 6, 2, false)), 6, 0).is_empty());
        let other = Order {
            ssid: [2; 8],
            ..order(1, 1, 0, false)
        };
        assert_eq!(r.arrive(Some(&other), 200, 0), [6, 200]);
        assert_eq!(r.expire(100), None);
    }

    /// A huge counter jump (a hostile or buggy sender) waits for at most a
    /// window's worth of positions.
    #[test]
    fn waiting_is_bounded() {
        let mut r = Reorder::default();
        assert!(
            r.arrive(Some(&order(1, 1 << 40, (1 << 40) - 1, false)), 0, 0)
                .is_empty()
        );
        assert_eq!(r.missing.len() as u64, REPLAY_WINDOW);
        assert_eq!(r.expire(HOLD_SECS), Some((vec![0], REPLAY_WINDOW)));
    }

    /// A flood behind a gap: past MAX_HELD everything goes out, and the
    /// missing count is reported at the next tick.
    #[test]
    fn the_hold_is_bounded_in_messages() {
        let mut r = Reorder::default();
        assert!(r.arrive(Some(&order(1, 3, 2, false)), 3, 0).is_empty());
        let mut out = Vec::new();
        for ctr in 4..(4 + MAX_HELD as u64) {
            out = r.arrive(Some(&order(1, ctr, 0, false)), ctr, 0);
            if !out.is_empty() {
                break;
            }
        }
        assert_eq!(out.len(), MAX_HELD + 1);
        assert!(out.windows(2).all(|w| w[0] < w[1]));
        assert!(!r.is_waiting());
        assert_eq!(r.open_since(), None);
        assert_eq!(r.expire(0), Some((vec![], 2)));
        assert_eq!(r.expire(100), None);
    }
}
