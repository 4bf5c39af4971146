//! GTID-set algebra for both MySQL-family flavors. Pure: no I/O, no global state.
//!
//! An HA orchestrator asks three questions of GTID sets: is candidate A at least as advanced as B
//! ([`GtidSet::contains_set`] / [`GtidSet::compare`]), does replica R hold transactions the primary P
//! lacks (errant transactions: [`GtidSet::difference`] of R minus P is non-empty), and what does the
//! whole shard hold ([`GtidSet::union`]). The two flavors answer them from very different data.
//!
//! # MariaDB: positions
//!
//! A MariaDB GTID is `domain-server_id-seq_no`. A *position* such as `0-1-57,1-2-3` keeps one GTID per
//! replication domain. Under `gtid_strict_mode` seq_nos within a domain are strictly increasing and gapless
//! on every server, so a transaction is identified by `(domain, seq_no)` and the entry `D-S-N` stands for
//! transactions `1..=N` of domain `D`, the last of which was written by server `S`. Only the last writer
//! is known; earlier history is assumed shared.
//!
//! Per domain, entry `a` is contained in entry `b` when `a.seq < b.seq`, or when the seqs are equal and
//! so are the server_ids. Equal seqs with different server_ids mean the two servers committed different
//! transactions at that seq: the positions have *diverged* and neither contains the other. A missing
//! domain is contained in everything. [`MariaDbPosition::difference`] reports, per domain, a
//! [`MariaDbRange`]: seqs `other.seq+1..=self.seq` when ahead, `1..=self.seq` when `other` lacks the
//! domain, and just the diverging seq (`N..=N`) on divergence. So a difference is empty exactly when
//! `other ⊇ self`, and a diverged pair has a non-empty difference in both directions. A union or
//! intersection of a diverged domain is not a position and is reported as [`GtidError::Diverged`].
//!
//! `gtid_binlog_state`-style lists with several entries per domain are accepted and normalised to the
//! entry with the highest seq_no; if different servers tie at that highest seq_no the effective position
//! is ambiguous and parsing fails with [`GtidError::ConflictingDomain`]. Entries with seq_no 0 hold no transaction and are dropped.
//!
//! # MySQL: sets
//!
//! A MySQL GTID is `uuid:gno` (or `uuid:tag:gno` from 8.3 on, tags being independent sequences of the
//! same UUID). GNOs may have gaps, so a [`MySqlGtidSet`] is a true set: per [`Tsid`] (UUID plus optional
//! tag) a sorted list of disjoint, non-adjacent inclusive intervals. All operations are exact set
//! operations. Printing follows the server: UUIDs lowercase and ascending, untagged intervals first,
//! then each tag (lowercase, ascending) followed by its intervals, e.g.
//! `3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7:blue:1-3`.
//!
//! # Invariants common to both
//!
//! Values are kept in normal form, so derived `==` is set equality and `Display` output parses back to an
//! equal value. Malformed text is a [`GtidError`], never a panic. Combining flavors is
//! [`GtidError::FlavorMismatch`].
//!
//! ```
//! use gtid::{Flavor, GtidSet, SetOrdering};
//!
//! let primary = GtidSet::parse(Flavor::MariaDb, "0-1-10,1-2-3")?;
//! let replica = GtidSet::parse(Flavor::MariaDb, "0-1-7,\n1-2-3")?;
//! assert_eq!(replica.compare(&primary)?, SetOrdering::Subset);
//! assert!(replica.difference(&primary)?.is_empty()); // no errant transactions
//! assert_eq!(primary.difference(&replica)?.to_string(), "0-1-8..10");
//!
//! let a = GtidSet::parse(Flavor::MySql, "3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5:7-9")?;
//! let b = GtidSet::parse(Flavor::MySql, "3e11fa47-71ca-11e1-9e33-c80aa9429562:6")?;
//! assert_eq!(a.union(&b)?.to_string(), "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-9");
//! # Ok::<(), gtid::GtidError>(())
//! ```

mod error;
mod mariadb;
mod mysql;

use std::fmt;
use std::str::FromStr;

pub use error::GtidError;
pub use mariadb::{MariaDbDifference, MariaDbGtid, MariaDbPosition, MariaDbRange};
pub use mysql::{GnoInterval, MySqlGtidSet, Tag, Tsid, Uuid, MAX_GNO, MAX_TAG_LEN};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    MariaDb,
    MySql,
}

impl Flavor {
    /// The spelling used in configuration files (`flavor = "mariadb"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Flavor::MariaDb => "mariadb",
            Flavor::MySql => "mysql",
        }
    }
}

impl fmt::Display for Flavor {
    /// The product name, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::MariaDb => "MariaDB",
            Flavor::MySql => "MySQL",
        })
    }
}

impl FromStr for Flavor {
    type Err = GtidError;

    /// Accepts `mariadb` or `mysql`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, GtidError> {
        if s.eq_ignore_ascii_case("mariadb") {
            Ok(Flavor::MariaDb)
        } else if s.eq_ignore_ascii_case("mysql") {
            Ok(Flavor::MySql)
        } else {
            Err(GtidError::UnknownFlavor {
                text: error::fragment(s),
            })
        }
    }
}

/// How `self` relates to `other` as sets of transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetOrdering {
    Equal,
    /// `self ⊂ other`: other has everything self has, and more.
    Subset,
    /// `self ⊃ other`.
    Superset,
    /// Neither contains the other: each side has transactions the other lacks.
    Diverged,
}

impl SetOrdering {
    pub(crate) fn from_containment(self_contains_other: bool, other_contains_self: bool) -> Self {
        match (self_contains_other, other_contains_self) {
            (true, true) => SetOrdering::Equal,
            (true, false) => SetOrdering::Superset,
            (false, true) => SetOrdering::Subset,
            (false, false) => SetOrdering::Diverged,
        }
    }

    /// The ordering seen from the other operand.
    pub fn reverse(self) -> Self {
        match self {
            SetOrdering::Subset => SetOrdering::Superset,
            SetOrdering::Superset => SetOrdering::Subset,
            same => same,
        }
    }

    /// `self ⊇ other`.
    pub fn is_superset_or_equal(self) -> bool {
        matches!(self, SetOrdering::Equal | SetOrdering::Superset)
    }
}

/// A GTID set of either flavor. Binary operations require both operands to be of the same flavor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GtidSet {
    MariaDb(MariaDbPosition),
    MySql(MySqlGtidSet),
}

impl From<MariaDbPosition> for GtidSet {
    fn from(p: MariaDbPosition) -> Self {
        GtidSet::MariaDb(p)
    }
}

impl From<MySqlGtidSet> for GtidSet {
    fn from(s: MySqlGtidSet) -> Self {
        GtidSet::MySql(s)
    }
}

/// Both operands of a binary operation, once their flavors are known to agree.
enum Pair<'a> {
    MariaDb(&'a MariaDbPosition, &'a MariaDbPosition),
    MySql(&'a MySqlGtidSet, &'a MySqlGtidSet),
}

impl GtidSet {
    /// Parses server or operator text of the given flavor. Blank text is the empty set.
    pub fn parse(flavor: Flavor, s: &str) -> Result<GtidSet, GtidError> {
        Ok(match flavor {
            Flavor::MariaDb => GtidSet::MariaDb(MariaDbPosition::parse(s)?),
            Flavor::MySql => GtidSet::MySql(MySqlGtidSet::parse(s)?),
        })
    }

    pub fn empty(flavor: Flavor) -> GtidSet {
        match flavor {
            Flavor::MariaDb => GtidSet::MariaDb(MariaDbPosition::new()),
            Flavor::MySql => GtidSet::MySql(MySqlGtidSet::new()),
        }
    }

    pub fn flavor(&self) -> Flavor {
        match self {
            GtidSet::MariaDb(_) => Flavor::MariaDb,
            GtidSet::MySql(_) => Flavor::MySql,
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            GtidSet::MariaDb(p) => p.is_empty(),
            GtidSet::MySql(s) => s.is_empty(),
        }
    }

    pub fn as_mariadb(&self) -> Option<&MariaDbPosition> {
        match self {
            GtidSet::MariaDb(p) => Some(p),
            GtidSet::MySql(_) => None,
        }
    }

    pub fn as_mysql(&self) -> Option<&MySqlGtidSet> {
        match self {
            GtidSet::MySql(s) => Some(s),
            GtidSet::MariaDb(_) => None,
        }
    }

    fn pair<'a>(&'a self, other: &'a GtidSet) -> Result<Pair<'a>, GtidError> {
        match (self, other) {
            (GtidSet::MariaDb(a), GtidSet::MariaDb(b)) => Ok(Pair::MariaDb(a, b)),
            (GtidSet::MySql(a), GtidSet::MySql(b)) => Ok(Pair::MySql(a, b)),
            _ => Err(GtidError::FlavorMismatch {
                left: self.flavor(),
                right: other.flavor(),
            }),
        }
    }

    /// `self ⊇ other`: a server at `self` has applied everything a server at `other` has.
    pub fn contains_set(&self, other: &GtidSet) -> Result<bool, GtidError> {
        Ok(match self.pair(other)? {
            Pair::MariaDb(a, b) => a.contains(b),
            Pair::MySql(a, b) => a.contains(b),
        })
    }

    /// `self ⊆ other`.
    pub fn is_subset(&self, other: &GtidSet) -> Result<bool, GtidError> {
        other.contains_set(self)
    }

    pub fn compare(&self, other: &GtidSet) -> Result<SetOrdering, GtidError> {
        Ok(match self.pair(other)? {
            Pair::MariaDb(a, b) => a.compare(b),
            Pair::MySql(a, b) => a.compare(b),
        })
    }

    /// Everything in either set. For MariaDB, fails with [`GtidError::Diverged`] if a domain diverged.
    pub fn union(&self, other: &GtidSet) -> Result<GtidSet, GtidError> {
        Ok(match self.pair(other)? {
            Pair::MariaDb(a, b) => GtidSet::MariaDb(a.union(b)?),
            Pair::MySql(a, b) => GtidSet::MySql(a.union(b)),
        })
    }

    /// What both sets have. For MariaDB, fails with [`GtidError::Diverged`] if a domain diverged.
    pub fn intersection(&self, other: &GtidSet) -> Result<GtidSet, GtidError> {
        Ok(match self.pair(other)? {
            Pair::MariaDb(a, b) => GtidSet::MariaDb(a.intersection(b)?),
            Pair::MySql(a, b) => GtidSet::MySql(a.intersection(b)),
        })
    }

    /// Transactions in `self` that are not in `other`; with `self` a replica and `other` its primary,
    /// these are the replica's errant transactions. Empty exactly when `other ⊇ self`.
    pub fn difference(&self, other: &GtidSet) -> Result<GtidDifference, GtidError> {
        Ok(match self.pair(other)? {
            Pair::MariaDb(a, b) => GtidDifference::MariaDb(a.difference(b)),
            Pair::MySql(a, b) => GtidDifference::MySql(a.difference(b)),
        })
    }

    /// Number of transactions, saturating at `u64::MAX`; for ranking candidates of the same lineage.
    /// MariaDB: the sum of seq_nos over domains.
    pub fn transaction_count(&self) -> u64 {
        match self {
            GtidSet::MariaDb(p) => p.transaction_count(),
            GtidSet::MySql(s) => s.transaction_count(),
        }
    }
}

impl fmt::Display for GtidSet {
    /// The canonical text, which [`GtidSet::parse`] reads back to an equal value. For MySQL, `{:#}`
    /// separates UUIDs with `,\n` like the server.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GtidSet::MariaDb(p) => fmt::Display::fmt(p, f),
            GtidSet::MySql(s) => fmt::Display::fmt(s, f),
        }
    }
}

/// The result of [`GtidSet::difference`]. For MySQL it is itself a set; for MariaDB it is a list of
/// seq ranges (see [`MariaDbDifference`]), because "seqs 8..=10 of domain 0" is not a position.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GtidDifference {
    MariaDb(MariaDbDifference),
    MySql(MySqlGtidSet),
}

impl GtidDifference {
    pub fn flavor(&self) -> Flavor {
        match self {
            GtidDifference::MariaDb(_) => Flavor::MariaDb,
            GtidDifference::MySql(_) => Flavor::MySql,
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            GtidDifference::MariaDb(d) => d.is_empty(),
            GtidDifference::MySql(s) => s.is_empty(),
        }
    }

    pub fn transaction_count(&self) -> u64 {
        match self {
            GtidDifference::MariaDb(d) => d.transaction_count(),
            GtidDifference::MySql(s) => s.transaction_count(),
        }
    }
}

impl fmt::Display for GtidDifference {
    /// MariaDB: `domain-server-first..last` ranges joined by `,`; MySQL: the set's canonical text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GtidDifference::MariaDb(d) => fmt::Display::fmt(d, f),
            GtidDifference::MySql(s) => fmt::Display::fmt(s, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const U1: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";

    #[test]
    fn flavor_names() {
        assert_eq!("MariaDB".parse::<Flavor>(), Ok(Flavor::MariaDb));
        assert_eq!("mysql".parse::<Flavor>(), Ok(Flavor::MySql));
        assert!("postgres".parse::<Flavor>().is_err());
        assert_eq!(Flavor::MariaDb.as_str(), "mariadb");
        assert_eq!(Flavor::MySql.to_string(), "MySQL");
    }

    #[test]
    fn unified_api_mariadb() {
        let primary = GtidSet::parse(Flavor::MariaDb, "0-1-10").unwrap();
        let replica = GtidSet::parse(Flavor::MariaDb, "0-1-7").unwrap();
        let errant = GtidSet::parse(Flavor::MariaDb, "0-2-10").unwrap();
        assert_eq!(primary.flavor(), Flavor::MariaDb);
        assert!(primary.contains_set(&replica).unwrap());
        assert!(replica.is_subset(&primary).unwrap());
        assert_eq!(replica.compare(&primary).unwrap(), SetOrdering::Subset);
        assert!(replica.difference(&primary).unwrap().is_empty());
        assert_eq!(errant.compare(&primary).unwrap(), SetOrdering::Diverged);
        let d = errant.difference(&primary).unwrap();
        assert_eq!(d.to_string(), "0-2-10..10");
        assert_eq!(d.transaction_count(), 1);
        assert_eq!(d.flavor(), Flavor::MariaDb);
        assert!(matches!(
            errant.union(&primary),
            Err(GtidError::Diverged { domain: 0, .. })
        ));
        assert_eq!(primary.union(&replica).unwrap(), primary);
        assert_eq!(primary.intersection(&replica).unwrap(), replica);
        assert_eq!(primary.transaction_count(), 10);
        assert!(GtidSet::empty(Flavor::MariaDb).is_empty());
        assert!(primary.as_mariadb().is_some() && primary.as_mysql().is_none());
    }

    #[test]
    fn unified_api_mysql() {
        let primary = GtidSet::parse(Flavor::MySql, &format!("{U1}:1-100")).unwrap();
        let replica = GtidSet::parse(
            Flavor::MySql,
            &format!("{U1}:1-90,\nf00dcafe-0000-0000-0000-000000000001:1"),
        )
        .unwrap();
        let d = replica.difference(&primary).unwrap();
        assert_eq!(d.to_string(), "f00dcafe-0000-0000-0000-000000000001:1");
        assert_eq!(d.flavor(), Flavor::MySql);
        assert_eq!(replica.compare(&primary).unwrap(), SetOrdering::Diverged);
        let all = replica.union(&primary).unwrap();
        assert_eq!(
            all.to_string(),
            format!("{U1}:1-100,f00dcafe-0000-0000-0000-000000000001:1")
        );
        assert_eq!(
            format!("{all:#}"),
            format!("{U1}:1-100,\nf00dcafe-0000-0000-0000-000000000001:1")
        );
        assert_eq!(all.transaction_count(), 101);
        assert_eq!(
            all.intersection(&primary)
                .unwrap()
                .compare(&primary)
                .unwrap(),
            SetOrdering::Equal
        );
        assert!(GtidSet::empty(Flavor::MySql).is_subset(&primary).unwrap());
    }

    #[test]
    fn mixing_flavors_is_an_error() {
        let m = GtidSet::parse(Flavor::MariaDb, "0-1-1").unwrap();
        let y = GtidSet::parse(Flavor::MySql, &format!("{U1}:1")).unwrap();
        let mismatch = Err(GtidError::FlavorMismatch {
            left: Flavor::MariaDb,
            right: Flavor::MySql,
        });
        assert_eq!(m.contains_set(&y), mismatch);
        assert_eq!(m.compare(&y).map(|_| ()), mismatch.map(|_: bool| ()));
        assert!(m.union(&y).is_err());
        assert!(m.intersection(&y).is_err());
        assert!(m.difference(&y).is_err());
        assert!(matches!(
            y.is_subset(&m),
            Err(GtidError::FlavorMismatch {
                left: Flavor::MariaDb,
                right: Flavor::MySql
            })
        ));
        assert_eq!(
            m.union(&y).unwrap_err().to_string(),
            "cannot combine a MariaDB GTID set with a MySQL one"
        );
        // Each flavor refuses the other's text.
        assert!(GtidSet::parse(Flavor::MariaDb, &format!("{U1}:1-5")).is_err());
        assert!(GtidSet::parse(Flavor::MySql, "0-1-5").is_err());
    }

    fn arb_flavor() -> impl Strategy<Value = Flavor> {
        prop_oneof![Just(Flavor::MariaDb), Just(Flavor::MySql)]
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(flavor in arb_flavor(), s in "\\PC*") {
            if let Ok(set) = GtidSet::parse(flavor, &s) {
                prop_assert_eq!(GtidSet::parse(flavor, &set.to_string()).unwrap(), set);
            }
        }

        #[test]
        fn parse_never_panics_on_grammar_alphabet(
            flavor in arb_flavor(),
            s in "[0-9a-fA-F:,\\- \n_xyz]{0,60}",
        ) {
            if let Ok(set) = GtidSet::parse(flavor, &s) {
                prop_assert_eq!(set.flavor(), flavor);
                prop_assert_eq!(GtidSet::parse(flavor, &set.to_string()).unwrap(), set);
            }
        }
    }
}
