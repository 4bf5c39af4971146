//! Terms and the self-fencing decision. Pure: the agent's tasks feed in what they saw.
//!
//! Invariant: a mysqld promoted under term T must stop taking writes as soon as its agent
//! learns that the shard record names another primary at a term > T.

use std::time::Duration;

use myha_mutants::{self as mutants, Mutant};
use myha_proto::agent as pb;
use serde::{Deserialize, Serialize};
use topo::{ShardRecord, Term};

/// What the agent knows about terms; persisted so a restarted agent still fences.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermState {
    /// Highest term seen in etcd or in an accepted RPC.
    pub known_term: Term,
    /// Term under which this mysqld was last promoted; 0 when it is not a promoted primary.
    pub promoted_term: Term,
    /// Highest shard-lock epoch accepted in an RPC at `known_term` (0: none yet at this term).
    /// Reset when the known term rises.
    #[serde(default)]
    pub known_epoch: u64,
}

/// Why an RPC's fencing token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaleTerm {
    #[error("stale term {requested} < known term {known}")]
    Term { requested: Term, known: Term },
    /// Same term, an older lock holder: the caller lost the shard lock to the holder of
    /// `known_epoch`, who already acted at this term.
    #[error("stale term {term}: lock epoch {epoch} < epoch {known_epoch} already accepted at this term (the caller lost the shard lock)")]
    Holder {
        term: Term,
        epoch: u64,
        known_epoch: u64,
    },
}

impl StaleTerm {
    /// The refusal as the gRPC contract carries it (`StaleTermRefusal` in the status details);
    /// `epoch` is the refused request's lock epoch.
    pub fn refusal(&self, epoch: u64) -> pb::StaleTermRefusal {
        match *self {
            StaleTerm::Term { requested, known } => pb::StaleTermRefusal {
                requested_term: requested.get(),
                requested_epoch: epoch,
                known_term: known.get(),
                known_epoch: 0,
            },
            StaleTerm::Holder {
                term,
                epoch,
                known_epoch,
            } => pb::StaleTermRefusal {
                requested_term: term.get(),
                requested_epoch: epoch,
                known_term: term.get(),
                known_epoch,
            },
        }
    }
}

impl TermState {
    /// Admits an RPC acting under (`term`, `epoch`): refuses a stale term, or an older lock
    /// holder's epoch at the known term; raises the known term (and epoch) otherwise. Returns
    /// whether the known term rose.
    pub fn admit(&mut self, term: Term, epoch: u64) -> Result<bool, StaleTerm> {
        if term < self.known_term {
            return Err(StaleTerm::Term {
                requested: term,
                known: self.known_term,
            });
        }
        if term == self.known_term
            && epoch < self.known_epoch
            && !mutants::active(Mutant::EqualTermOtherHolder)
        {
            return Err(StaleTerm::Holder {
                term,
                epoch,
                known_epoch: self.known_epoch,
            });
        }
        let changed = term > self.known_term;
        if changed {
            self.known_epoch = 0;
        }
        self.known_term = term;
        self.known_epoch = self.known_epoch.max(epoch);
        Ok(changed)
    }

    /// Folds in the shard record; returns whether anything changed (to persist).
    pub fn observe_shard(&mut self, alias: &str, shard: &ShardRecord) -> bool {
        let before = self.clone();
        if shard.term > self.known_term {
            self.known_epoch = 0;
        }
        self.known_term = self.known_term.max(shard.term);
        // The record naming us at a term is a promotion under that term (e.g. the bootstrap).
        if shard.primary.as_deref() == Some(alias) && shard.term > self.promoted_term {
            self.promoted_term = shard.term;
        }
        *self != before
    }
}

/// What etcd says about the shard when a mutating action arrives, read linearizably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerView {
    /// The highest term the shard record has given or reserved (`max(term, reserved_term)`;
    /// zero when there is no record).
    pub reserved: Term,
    /// The epoch of the shard lock's current holder (`None`: nobody holds it), and who.
    pub holder: Option<(u64, String)>,
}

/// Whether an action at `term` by the holder of lock epoch `epoch` may be admitted, given
/// what etcd shows (`view`) and the agent's known term `known`.
///
/// - The caller must be the shard lock's holder in etcd now. Only the holder may act on a
///   shard; a deposed holder (its lease expired while it was paused or partitioned) may still
///   carry a term this agent has not seen superseded, and the term alone would admit it.
/// - A term more than one above the known term must also be reserved in the shard record: a
///   legitimate recovery reserves its term under the lock before it acts. Otherwise an
///   allowed but confused (or stolen) identity could push this tablet's persisted term far
///   ahead, after which every real recovery's term would be refused as stale.
///
/// Stale terms are not judged here: [`TermState::admit`] refuses them with the structured
/// refusal callers read.
pub fn check_caller(term: Term, epoch: u64, known: Term, view: &CallerView) -> Result<(), String> {
    match &view.holder {
        Some((e, _)) if *e == epoch => {}
        Some((e, who)) => {
            return Err(format!(
                "the caller's lock epoch {epoch} is not the shard lock's holder in etcd (epoch \
                 {e}, {who}): only the holder acts on a shard"
            ))
        }
        None => {
            return Err(format!(
                "nobody holds the shard lock in etcd (the caller claims epoch {epoch}): only \
                 the holder acts on a shard"
            ))
        }
    }
    if term > known.next() && term > view.reserved {
        return Err(format!(
            "term {term} is more than one above the known term {known} and no recovery \
             reserved it (the shard record has given or reserved up to term {})",
            view.reserved
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceDecision {
    /// Nothing to do, with why (for the record).
    Keep,
    /// Make mysqld read-only and kill its clients.
    Fence { reason: String },
}

/// Whether this tablet's mysqld must be fenced now.
///
/// `writable` is `None` when mysqld could not be read: then nothing can be done this round,
/// and the decision is taken again on the next poll.
pub fn decide(
    alias: &str,
    terms: &TermState,
    shard: Option<&ShardRecord>,
    writable: Option<bool>,
) -> FenceDecision {
    let Some(shard) = shard else {
        return FenceDecision::Keep;
    };
    if terms.promoted_term.is_zero() || writable != Some(true) {
        return FenceDecision::Keep;
    }
    match shard.primary.as_deref() {
        Some(p) if p != alias && shard.term > terms.promoted_term => FenceDecision::Fence {
            reason: format!(
                "shard {}/{} names {p} primary at term {} > term {} this mysqld was promoted under",
                shard.keyspace, shard.shard, shard.term, terms.promoted_term
            ),
        },
        _ => FenceDecision::Keep,
    }
}

/// What the isolation rule (see [`topo::SELF_DEMOTE_PEER_WINDOW`]) looks at, on a writable
/// primary promoted under a term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isolation {
    /// What is left of the registration lease by the local deadline (zero once past it, lost,
    /// or never granted).
    pub lease_left: Duration,
    /// How long since another tablet of the shard last answered; `None` when the shard has no
    /// other tablet on record (nobody could be promoted instead: nothing to guard against).
    pub peers_silent_for: Option<Duration>,
}

/// Whether an isolated primary must make its mysqld read-only now: its lease is within
/// `margin` of running out (so others may soon see it gone) and no other tablet has answered it
/// for `window`. A primary cut from etcd alone (P16) keeps serving: its replicas answer.
pub fn decide_isolation(i: &Isolation, margin: Duration, window: Duration) -> FenceDecision {
    match i.peers_silent_for {
        Some(silent) if i.lease_left <= margin && silent >= window => FenceDecision::Fence {
            reason: format!(
                "isolated: etcd has not renewed this tablet's registration ({} ms of its lease \
                 left) and no other tablet of the shard has answered for {} ms: another may be \
                 promoted once the lease expires, so this primary stops taking writes first",
                i.lease_left.as_millis(),
                silent.as_millis()
            ),
        },
        _ => FenceDecision::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(primary: Option<&str>, term: u64) -> ShardRecord {
        let term = Term::new(term);
        let mut s = ShardRecord::new("commerce", "0");
        s.primary = primary.map(str::to_string);
        s.term = term;
        s
    }

    #[test]
    fn only_the_lock_holder_acts_and_a_term_jump_needs_a_reservation() {
        let known = Term::new(5);
        let view = |reserved: u64, holder: Option<u64>| CallerView {
            reserved: Term::new(reserved),
            holder: holder.map(|e| (e, format!("orchestrator epoch {e}"))),
        };
        // The holder at the known or the next term: admitted, whatever the reservation.
        assert_eq!(
            check_caller(Term::new(6), 40, known, &view(0, Some(40))),
            Ok(())
        );
        assert_eq!(
            check_caller(Term::new(5), 40, known, &view(0, Some(40))),
            Ok(())
        );
        // Not the holder, even at the next term: refused with both epochs named.
        let e = check_caller(Term::new(6), 39, known, &view(6, Some(40))).unwrap_err();
        assert!(e.contains("epoch 39") && e.contains("epoch 40"), "{e}");
        let e = check_caller(Term::new(5), 0, known, &view(5, None)).unwrap_err();
        assert!(e.contains("nobody holds") && e.contains("epoch 0"), "{e}");
        // Further than the next term: reserved, and by the caller as holder.
        assert_eq!(
            check_caller(Term::new(8), 40, known, &view(8, Some(40))),
            Ok(())
        );
        let e = check_caller(Term::new(9), 40, known, &view(8, Some(40))).unwrap_err();
        assert!(
            e.contains("no recovery reserved it") && e.contains("up to term 8"),
            "{e}"
        );
        let e = check_caller(Term::new(8), 39, known, &view(8, Some(40))).unwrap_err();
        assert!(e.contains("epoch 39") && e.contains("epoch 40"), "{e}");
        let e = check_caller(Term::new(8), 40, known, &view(8, None)).unwrap_err();
        assert!(e.contains("nobody holds"), "{e}");
        // The maximum term: the attack that would end failover for good.
        assert!(check_caller(Term::new(u64::MAX), 40, known, &view(8, Some(40))).is_err());
    }

    #[test]
    fn stale_terms_are_refused_and_newer_raise_known() {
        let mut t = TermState {
            known_term: Term::new(5),
            promoted_term: Term::ZERO,
            known_epoch: 0,
        };
        assert_eq!(
            t.admit(Term::new(4), 0),
            Err(StaleTerm::Term {
                requested: Term::new(4),
                known: Term::new(5)
            })
        );
        assert_eq!(t.admit(Term::new(5), 0), Ok(false));
        assert_eq!(t.admit(Term::new(7), 0), Ok(true));
        assert_eq!(t.known_term, Term::new(7));
        assert!(t
            .admit(Term::new(6), 0)
            .unwrap_err()
            .to_string()
            .contains("stale term 6 < known term 7"));
    }

    #[test]
    fn an_older_lock_holder_is_refused_at_an_equal_term() {
        let mut t = TermState::default();
        assert_eq!(t.admit(Term::new(3), 200), Ok(true));
        // The same holder again, and a newer one: admitted.
        assert_eq!(t.admit(Term::new(3), 200), Ok(false));
        assert_eq!(t.admit(Term::new(3), 300), Ok(false));
        // The holder of epoch 200 lost the lock to 300: refused at term 3, with both epochs.
        let e = t.admit(Term::new(3), 200).unwrap_err();
        assert_eq!(
            e,
            StaleTerm::Holder {
                term: Term::new(3),
                epoch: 200,
                known_epoch: 300
            }
        );
        assert!(e.to_string().contains("lost the shard lock"), "{e}");
        // A caller without a lock cannot act next to a holder either.
        assert!(t.admit(Term::new(3), 0).is_err());
        // A newer term starts over: any epoch is admitted, then ordered again.
        assert_eq!(t.admit(Term::new(4), 100), Ok(true));
        assert_eq!(t.known_epoch, 100);
        let mut t2 = t.clone();
        assert!(t2.observe_shard("zone1-101", &shard(Some("zone1-102"), 5)));
        assert_eq!((t2.known_term, t2.known_epoch), (Term::new(5), 0));
        assert_eq!(t2.admit(Term::new(5), 1), Ok(false));
    }

    #[test]
    fn being_named_primary_records_the_promotion_term() {
        let mut t = TermState::default();
        assert!(t.observe_shard("zone1-101", &shard(Some("zone1-101"), 1)));
        assert_eq!(
            t,
            TermState {
                known_term: Term::new(1),
                promoted_term: Term::new(1),
                known_epoch: 0,
            }
        );
        assert!(!t.observe_shard("zone1-101", &shard(Some("zone1-101"), 1)));
        assert!(t.observe_shard("zone1-101", &shard(Some("zone1-102"), 2)));
        assert_eq!(
            t,
            TermState {
                known_term: Term::new(2),
                promoted_term: Term::new(1),
                known_epoch: 0,
            }
        );
    }

    #[test]
    fn fences_only_a_writable_promoted_primary_superseded_by_a_newer_term() {
        let old = TermState {
            known_term: Term::new(2),
            promoted_term: Term::new(1),
            known_epoch: 0,
        };
        let newer = shard(Some("zone1-102"), 2);
        let d = decide("zone1-101", &old, Some(&newer), Some(true));
        assert!(
            matches!(d, FenceDecision::Fence { ref reason } if reason.contains("zone1-102") && reason.contains("term 2"))
        );
        // Already read-only: nothing to do.
        assert_eq!(
            decide("zone1-101", &old, Some(&newer), Some(false)),
            FenceDecision::Keep
        );
        // Unknown mysqld state: decide again later.
        assert_eq!(
            decide("zone1-101", &old, Some(&newer), None),
            FenceDecision::Keep
        );
        // Never promoted (a replica): not this mechanism's business.
        let replica = TermState {
            known_term: Term::new(2),
            promoted_term: Term::ZERO,
            known_epoch: 0,
        };
        assert_eq!(
            decide("zone1-103", &replica, Some(&newer), Some(true)),
            FenceDecision::Keep
        );
        // Still the named primary.
        let cur = TermState {
            known_term: Term::new(2),
            promoted_term: Term::new(2),
            known_epoch: 0,
        };
        assert_eq!(
            decide("zone1-102", &cur, Some(&newer), Some(true)),
            FenceDecision::Keep
        );
        // Same term naming someone else cannot happen legitimately; do not fence on it.
        let same = shard(Some("zone1-102"), 1);
        assert_eq!(
            decide("zone1-101", &old, Some(&same), Some(true)),
            FenceDecision::Keep
        );
        // No shard record known.
        assert_eq!(
            decide("zone1-101", &old, None, Some(true)),
            FenceDecision::Keep
        );
        // Shard with no primary named.
        assert_eq!(
            decide("zone1-101", &old, Some(&shard(None, 3)), Some(true)),
            FenceDecision::Keep
        );
    }

    #[test]
    fn an_isolated_primary_demotes_before_its_lease_runs_out_and_not_while_a_replica_answers() {
        let m = Duration::from_millis(400);
        let w = Duration::from_secs(1);
        let at = |left_ms: u64, silent_ms: Option<u64>| Isolation {
            lease_left: Duration::from_millis(left_ms),
            peers_silent_for: silent_ms.map(Duration::from_millis),
        };
        // Cut from everything: demote once the lease is within the margin and the peers have
        // been silent for the window, not before either.
        assert!(matches!(
            decide_isolation(&at(400, Some(1000)), m, w),
            FenceDecision::Fence { reason } if reason.contains("isolated") && reason.contains("1000 ms")
        ));
        assert_eq!(
            decide_isolation(&at(401, Some(5000)), m, w),
            FenceDecision::Keep
        );
        assert_eq!(
            decide_isolation(&at(0, Some(999)), m, w),
            FenceDecision::Keep
        );
        // P16: etcd lost (lease gone) but the replicas answer: keep serving.
        assert_eq!(
            decide_isolation(&at(0, Some(100)), m, w),
            FenceDecision::Keep
        );
        // No other tablet at all: nobody could be promoted, nothing to stop.
        assert_eq!(decide_isolation(&at(0, None), m, w), FenceDecision::Keep);
    }
}
