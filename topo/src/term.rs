//! [`Term`]: a shard's fencing token.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A shard's term: the fencing token every mutating RPC, every lock-dependent etcd write and
/// every routing snapshot carries. It only grows: each new primary gets a higher term than any
/// the shard ever recorded or reserved, and an agent refuses a request below the highest term
/// it knows. 0 means no primary ever.
///
/// A newtype, so that a term cannot be mixed up with an epoch, a lag or a timestamp (all
/// `u64` on the wire). The gRPC contract carries it as a plain `uint64`; convert at that
/// boundary with [`Term::new`] and [`Term::get`]. In JSON (etcd records, the HTTP API) it is
/// the bare number (`serde(transparent)`), so records written before the newtype still read.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Term(u64);

impl Term {
    /// No primary ever.
    pub const ZERO: Term = Term(0);

    pub const fn new(n: u64) -> Term {
        Term(n)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The term after this one. Saturates at `u64::MAX`: an agent refuses any term above
    /// `known + 1`, so a term can only get there by someone writing it on purpose; a shard at
    /// the maximum then fails every reparent with a stale-term refusal, visibly, instead of
    /// wrapping around to a term every agent would accept as new.
    pub const fn next(self) -> Term {
        Term(self.0.saturating_add(1))
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_is_its_number_in_json_and_saturates() {
        assert_eq!(serde_json::to_string(&Term::new(7)).unwrap(), "7");
        assert_eq!(serde_json::from_str::<Term>("7").unwrap(), Term::new(7));
        assert_eq!(Term::new(7).next(), Term::new(8));
        assert_eq!(Term::new(u64::MAX).next(), Term::new(u64::MAX));
        assert!(Term::ZERO < Term::new(1) && Term::ZERO.is_zero());
        assert_eq!(Term::new(3).to_string(), "3");
    }
}
