//! Known classes of reparent bugs, re-introducible one at a time (issue 11, point 5): the
//! simulator shows that an invariant catches each one within a stated seed budget.
//!
//! The hooks sit in the real code of the orchestrator, the agent and `topo` (and, for the two
//! agent behaviours the simulator models rather than runs, in its agent model). [`active`] is
//! a constant `false` unless this crate's `enabled` feature is on. Only the simulator's tests
//! and examples turn it on (a dev-dependency feature), so the daemons' release builds
//! (`cargo build --release --bins`) never contain a live mutant; in a workspace test build the
//! hooks are compiled in but inert until a test thread calls [`set`]. Per thread, so parallel
//! tests do not see each other's mutant.

/// One re-introduced bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutant {
    /// Rank candidates on what they applied, ignoring what they only received (under
    /// AFTER_SYNC an acknowledged write may exist only in a relay log).
    RankOnApplied,
    /// Promote the candidate before it applied what it received (and the agent does not refuse
    /// a promotion over unapplied relay log events): the reset discards them.
    PromoteBeforeApplied,
    /// Proceed without having stopped replication on R - K + 1 replicas.
    SkipRevocation,
    /// Promote under the record's term instead of a new one: the deposed primary's agent never
    /// sees a newer term and does not fence it.
    ReuseTerm,
    /// Call the primary dead on its own agent's word (it cannot reach its mysqld) without the
    /// replicas' probes: a primary that serves its clients and replicas is failed over.
    TrustColocatedAgent,
    /// Promote before semi-sync is lossless: the new primary's agent makes it writable first
    /// and turns its semi-sync primary side on (AFTER_SYNC, no async fallback) only after the
    /// history record write it awaits (the simulator's agent model: the real agent's
    /// `actions::promote` keeps `read_only` on until the very last step). Meanwhile any client
    /// connection to it, such as one the gateway's read-only port made to the replica it was,
    /// has commits acknowledged that no replica holds.
    WritableBeforeSemiSync,
    /// The agent admits an action at the term it knows from an older lock holder (a lower
    /// lock epoch) than the one it last obeyed at that term (`myha_agent::fence::TermState::
    /// admit`): a deposed orchestrator's late request undoes its successor's.
    EqualTermOtherHolder,
    /// Act under the shard lock without checking the local lease deadline
    /// (`topo::lock::lease_left`): an orchestrator frozen or cut from etcd past its lease TTL
    /// acts while another holds the lock.
    SkipLeaseDeadline,
}

impl Mutant {
    pub const ALL: [Mutant; 8] = [
        Mutant::RankOnApplied,
        Mutant::PromoteBeforeApplied,
        Mutant::SkipRevocation,
        Mutant::ReuseTerm,
        Mutant::TrustColocatedAgent,
        Mutant::WritableBeforeSemiSync,
        Mutant::EqualTermOtherHolder,
        Mutant::SkipLeaseDeadline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::RankOnApplied => "rank-on-applied",
            Mutant::PromoteBeforeApplied => "promote-before-applied",
            Mutant::SkipRevocation => "skip-revocation",
            Mutant::ReuseTerm => "reuse-term",
            Mutant::TrustColocatedAgent => "trust-colocated-agent",
            Mutant::WritableBeforeSemiSync => "writable-before-semi-sync",
            Mutant::EqualTermOtherHolder => "equal-term-other-holder",
            Mutant::SkipLeaseDeadline => "skip-lease-deadline",
        }
    }

    pub fn parse(name: &str) -> Option<Mutant> {
        Mutant::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Mutant::RankOnApplied => "rank candidates on executed instead of received GTIDs",
            Mutant::PromoteBeforeApplied => {
                "promote before what was received is applied (the agent's relay-log check off)"
            }
            Mutant::SkipRevocation => "proceed without reaching R - K + 1 replicas",
            Mutant::ReuseTerm => "promote under the old term (the deposed primary is never fenced)",
            Mutant::TrustColocatedAgent => {
                "trust the co-located agent over every replica (no probe confirmation)"
            }
            Mutant::WritableBeforeSemiSync => {
                "promote before semi-sync is lossless (writable before the semi-sync primary side is on)"
            }
            Mutant::EqualTermOtherHolder => "accept an equal term from another (older) lock holder",
            Mutant::SkipLeaseDeadline => "skip the lease deadline check before acting under the lock",
        }
    }
}

#[cfg(feature = "enabled")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutant>> = const { std::cell::Cell::new(None) };
}

/// Selects the mutant of this thread (`None`: the real code). Without the `enabled` feature it
/// changes nothing.
pub fn set(m: Option<Mutant>) {
    #[cfg(feature = "enabled")]
    ACTIVE.with(|a| a.set(m));
    #[cfg(not(feature = "enabled"))]
    let _ = m;
}

/// Whether `m` is this thread's mutant.
#[inline]
pub fn active(m: Mutant) -> bool {
    #[cfg(feature = "enabled")]
    return ACTIVE.with(|a| a.get() == Some(m));
    #[cfg(not(feature = "enabled"))]
    {
        let _ = m;
        false
    }
}

/// Whether the hooks are compiled in.
pub const ENABLED: bool = cfg!(feature = "enabled");
