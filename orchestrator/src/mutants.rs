//! Known classes of reparent bugs, re-introducible one at a time (issue 11, point 5): the
//! simulator shows that an invariant catches each one within a stated seed budget.
//!
//! [`active`] is a constant `false` unless the `mutants` feature is on. Only the simulator's
//! tests and examples turn it on (a dev-dependency feature), so the daemons' release builds
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
}

impl Mutant {
    pub const ALL: [Mutant; 5] = [
        Mutant::RankOnApplied,
        Mutant::PromoteBeforeApplied,
        Mutant::SkipRevocation,
        Mutant::ReuseTerm,
        Mutant::TrustColocatedAgent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::RankOnApplied => "rank-on-applied",
            Mutant::PromoteBeforeApplied => "promote-before-applied",
            Mutant::SkipRevocation => "skip-revocation",
            Mutant::ReuseTerm => "reuse-term",
            Mutant::TrustColocatedAgent => "trust-colocated-agent",
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
        }
    }
}

#[cfg(feature = "mutants")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutant>> = const { std::cell::Cell::new(None) };
}

/// Selects the mutant of this thread (`None`: the real code). Without the `mutants` feature it
/// changes nothing.
pub fn set(m: Option<Mutant>) {
    #[cfg(feature = "mutants")]
    ACTIVE.with(|a| a.set(m));
    #[cfg(not(feature = "mutants"))]
    let _ = m;
}

/// Whether `m` is this thread's mutant.
#[inline]
pub fn active(m: Mutant) -> bool {
    #[cfg(feature = "mutants")]
    return ACTIVE.with(|a| a.get() == Some(m));
    #[cfg(not(feature = "mutants"))]
    {
        let _ = m;
        false
    }
}

/// Whether the hooks are compiled in.
pub const ENABLED: bool = cfg!(feature = "mutants");
