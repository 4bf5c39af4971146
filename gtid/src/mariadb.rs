//! MariaDB GTID positions (`domain-server_id-seq_no` lists). See the crate documentation for the model.

use std::cmp::Ordering;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::{parse_error, split_elements, GtidError};
use crate::{Flavor, SetOrdering};

/// One MariaDB GTID `domain-server_id-seq_no`. As an element of a position it stands for seqs
/// `1..=seq` of `domain`, the last of which was written by `server_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MariaDbGtid {
    pub domain: u32,
    pub server_id: u32,
    pub seq: u64,
}

impl MariaDbGtid {
    pub const fn new(domain: u32, server_id: u32, seq: u64) -> Self {
        MariaDbGtid {
            domain,
            server_id,
            seq,
        }
    }
}

impl fmt::Display for MariaDbGtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server_id, self.seq)
    }
}

impl FromStr for MariaDbGtid {
    type Err = GtidError;

    /// Parses exactly one `domain-server_id-seq_no`, without surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, GtidError> {
        let flavor = Flavor::MariaDb;
        let mut parts = s.split('-');
        let (Some(domain), Some(server_id), Some(seq), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(parse_error(
                flavor,
                s,
                "exactly three `-`-separated numbers `domain-server_id-seq_no`",
            ));
        };
        let number = |text, what, max| crate::error::parse_decimal(flavor, s, text, what, max);
        Ok(MariaDbGtid {
            domain: u32::try_from(number(domain, "a domain_id", u64::from(u32::MAX))?)
                .map_err(|_| parse_error(flavor, s, "a domain_id that fits in 32 bits"))?,
            server_id: u32::try_from(number(server_id, "a server_id", u64::from(u32::MAX))?)
                .map_err(|_| parse_error(flavor, s, "a server_id that fits in 32 bits"))?,
            seq: number(seq, "a seq_no", u64::MAX)?,
        })
    }
}

/// How two entries of the same domain relate.
enum DomainOrder {
    Equal,
    Behind,
    Ahead,
    /// Same seq_no, different server_id: the transaction at that seq differs.
    Diverged,
}

fn domain_order(a: MariaDbGtid, b: MariaDbGtid) -> DomainOrder {
    match a.seq.cmp(&b.seq) {
        Ordering::Less => DomainOrder::Behind,
        Ordering::Greater => DomainOrder::Ahead,
        Ordering::Equal if a.server_id == b.server_id => DomainOrder::Equal,
        Ordering::Equal => DomainOrder::Diverged,
    }
}

/// A MariaDB GTID position (`gtid_current_pos`, `gtid_slave_pos`, `gtid_binlog_pos`, or a normalised
/// `gtid_binlog_state`).
///
/// Invariants: at most one entry per domain, keyed by that domain; every entry has `seq >= 1` (an entry
/// with seq 0 holds no transaction and is dropped). Because of that normal form, derived equality is set
/// equality.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MariaDbPosition {
    domains: BTreeMap<u32, MariaDbGtid>,
}

impl MariaDbPosition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a comma-separated list. Several entries for one domain (as in `gtid_binlog_state`) are
    /// reduced to the one with the highest seq_no; a tie at that highest seq_no between different
    /// server_ids is a [`GtidError::ConflictingDomain`].
    pub fn parse(s: &str) -> Result<Self, GtidError> {
        let gtids = split_elements(Flavor::MariaDb, s)?
            .into_iter()
            .map(MariaDbGtid::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_gtids(gtids)
    }

    /// Builds a position with the same normalisation as [`MariaDbPosition::parse`]. The result does not
    /// depend on the order of `gtids`.
    pub fn from_gtids(gtids: impl IntoIterator<Item = MariaDbGtid>) -> Result<Self, GtidError> {
        // Per domain: the entries with the lowest and highest server_id among those at the highest seq
        // seen so far. They differ only when that seq is tied, which is the one ambiguous case; ties
        // below the highest seq do not affect the effective position.
        let mut top: BTreeMap<u32, (MariaDbGtid, MariaDbGtid)> = BTreeMap::new();
        for gtid in gtids.into_iter().filter(|g| g.seq > 0) {
            let (lo, hi) = top.entry(gtid.domain).or_insert((gtid, gtid));
            if gtid.seq > lo.seq {
                (*lo, *hi) = (gtid, gtid);
            } else if gtid.seq == lo.seq {
                // Same domain and seq, so the derived order compares server_ids.
                *lo = (*lo).min(gtid);
                *hi = (*hi).max(gtid);
            }
        }
        let mut domains = BTreeMap::new();
        for (domain, (lo, hi)) in top {
            if lo != hi {
                return Err(GtidError::ConflictingDomain {
                    domain,
                    first: lo,
                    second: hi,
                });
            }
            domains.insert(domain, lo);
        }
        Ok(MariaDbPosition { domains })
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The entry for `domain`, if any transaction of it is in the position.
    pub fn get(&self, domain: u32) -> Option<MariaDbGtid> {
        self.domains.get(&domain).copied()
    }

    /// Entries in ascending domain order.
    pub fn iter(&self) -> impl Iterator<Item = MariaDbGtid> + '_ {
        self.domains.values().copied()
    }

    /// `self ⊇ other`: every domain of `other` is in `self` at a higher seq_no, or at the same seq_no
    /// written by the same server.
    pub fn contains(&self, other: &MariaDbPosition) -> bool {
        other.domains.values().all(|theirs| {
            self.domains.get(&theirs.domain).is_some_and(|ours| {
                matches!(
                    domain_order(*ours, *theirs),
                    DomainOrder::Equal | DomainOrder::Ahead
                )
            })
        })
    }

    pub fn is_subset(&self, other: &MariaDbPosition) -> bool {
        other.contains(self)
    }

    pub fn compare(&self, other: &MariaDbPosition) -> SetOrdering {
        SetOrdering::from_containment(self.contains(other), other.contains(self))
    }

    /// The most advanced entry of each domain. Fails with [`GtidError::Diverged`] when a domain has the
    /// same seq_no from different servers on the two sides: the union then holds two different
    /// transactions at that seq_no, which no position can express.
    pub fn union(&self, other: &MariaDbPosition) -> Result<MariaDbPosition, GtidError> {
        let mut domains = self.domains.clone();
        for theirs in other.domains.values() {
            match domains.entry(theirs.domain) {
                Entry::Vacant(slot) => {
                    slot.insert(*theirs);
                }
                Entry::Occupied(mut slot) => match domain_order(*slot.get(), *theirs) {
                    DomainOrder::Equal | DomainOrder::Ahead => {}
                    DomainOrder::Behind => {
                        slot.insert(*theirs);
                    }
                    DomainOrder::Diverged => {
                        return Err(self.diverged(slot.get(), theirs, "union"));
                    }
                },
            }
        }
        Ok(MariaDbPosition { domains })
    }

    /// The least advanced entry of each domain present on both sides. Fails with
    /// [`GtidError::Diverged`] when a domain diverged: the common history is then `1..seq` with an
    /// unknown last writer.
    pub fn intersection(&self, other: &MariaDbPosition) -> Result<MariaDbPosition, GtidError> {
        let mut domains = BTreeMap::new();
        for ours in self.domains.values() {
            let Some(theirs) = other.domains.get(&ours.domain) else {
                continue;
            };
            let kept = match domain_order(*ours, *theirs) {
                DomainOrder::Equal | DomainOrder::Behind => ours,
                DomainOrder::Ahead => theirs,
                DomainOrder::Diverged => return Err(self.diverged(ours, theirs, "intersection")),
            };
            domains.insert(kept.domain, *kept);
        }
        Ok(MariaDbPosition { domains })
    }

    /// Transactions of `self` that are not in `other`, one range per domain. Never empty unless
    /// `other ⊇ self`; in particular a diverged domain yields at least the diverging seq_no.
    pub fn difference(&self, other: &MariaDbPosition) -> MariaDbDifference {
        let ranges = self
            .domains
            .values()
            .filter_map(|ours| {
                let first_seq = match other.domains.get(&ours.domain) {
                    None => 1,
                    Some(theirs) => match domain_order(*ours, *theirs) {
                        DomainOrder::Equal | DomainOrder::Behind => return None,
                        DomainOrder::Ahead => theirs.seq + 1,
                        DomainOrder::Diverged => ours.seq,
                    },
                };
                Some(MariaDbRange {
                    domain: ours.domain,
                    server_id: ours.server_id,
                    first_seq,
                    last_seq: ours.seq,
                })
            })
            .collect();
        MariaDbDifference { ranges }
    }

    /// Sum of seq_nos over domains: the number of transactions the position stands for.
    pub fn transaction_count(&self) -> u64 {
        self.domains
            .values()
            .fold(0u64, |acc, g| acc.saturating_add(g.seq))
    }

    fn diverged(
        &self,
        ours: &MariaDbGtid,
        theirs: &MariaDbGtid,
        operation: &'static str,
    ) -> GtidError {
        GtidError::Diverged {
            domain: ours.domain,
            left: *ours,
            right: *theirs,
            operation,
        }
    }
}

impl fmt::Display for MariaDbPosition {
    /// `domain-server-seq` entries in ascending domain order, joined by `,` as MariaDB prints them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, gtid) in self.domains.values().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{gtid}")?;
        }
        Ok(())
    }
}

/// Transactions `first_seq..=last_seq` of `domain`. `server_id` is the server that wrote `last_seq`;
/// the writers of earlier seqs are not known from a position.
///
/// Invariant: `1 <= first_seq <= last_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MariaDbRange {
    pub domain: u32,
    pub server_id: u32,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl MariaDbRange {
    pub fn transaction_count(&self) -> u64 {
        // Cannot overflow: first_seq >= 1.
        self.last_seq - self.first_seq + 1
    }
}

impl fmt::Display for MariaDbRange {
    /// `domain-server-first..last`; always with `..` so it cannot be mistaken for a position.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}..{}",
            self.domain, self.server_id, self.first_seq, self.last_seq
        )
    }
}

/// The result of [`MariaDbPosition::difference`]: at most one range per domain, ascending by domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MariaDbDifference {
    ranges: Vec<MariaDbRange>,
}

impl MariaDbDifference {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[MariaDbRange] {
        &self.ranges
    }

    pub fn transaction_count(&self) -> u64 {
        self.ranges
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.transaction_count()))
    }
}

impl fmt::Display for MariaDbDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pos(s: &str) -> MariaDbPosition {
        MariaDbPosition::parse(s).unwrap()
    }

    fn g(domain: u32, server_id: u32, seq: u64) -> MariaDbGtid {
        MariaDbGtid::new(domain, server_id, seq)
    }

    #[test]
    fn parses_real_server_output() {
        let p = pos("0-101-42");
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![g(0, 101, 42)]);
        assert_eq!(p.to_string(), "0-101-42");

        // Multi-domain, as printed by gtid_current_pos, including the `,\n` some versions emit.
        let p = pos("1-2-3,\n0-1-57");
        assert_eq!(p.get(0), Some(g(0, 1, 57)));
        assert_eq!(p.get(1), Some(g(1, 2, 3)));
        assert_eq!(p.get(2), None);
        assert_eq!(p.to_string(), "0-1-57,1-2-3");
        assert_eq!(pos(" 0-1-5 ,\r\n 1-2-3\n"), pos("0-1-5,1-2-3"));

        assert_eq!(
            pos("0-4294967295-18446744073709551615").get(0),
            Some(g(0, u32::MAX, u64::MAX))
        );
    }

    #[test]
    fn empty_and_seq_zero() {
        assert!(pos("").is_empty());
        assert!(pos("  \n").is_empty());
        assert_eq!(pos("").to_string(), "");
        // seq 0 stands for no transaction of the domain.
        assert!(pos("0-1-0").is_empty());
        assert_eq!(pos("0-1-0,1-1-4"), pos("1-1-4"));
    }

    #[test]
    fn binlog_state_is_normalised_to_highest_seq() {
        // gtid_binlog_state keeps the last GTID of every (domain, server) pair.
        let p = pos("0-1-100,0-2-250,0-3-7,1-1-9");
        assert_eq!(p.to_string(), "0-2-250,1-1-9");
        // Exact duplicates are harmless.
        assert_eq!(pos("0-1-5,0-1-5"), pos("0-1-5"));
        let err = MariaDbPosition::parse("0-1-5,0-2-5").unwrap_err();
        assert_eq!(
            err,
            GtidError::ConflictingDomain {
                domain: 0,
                first: g(0, 1, 5),
                second: g(0, 2, 5)
            }
        );
        assert!(err.to_string().contains("conflicting entries for domain 0"));
        // A tie below the effective position does not make it ambiguous, in any order.
        assert_eq!(pos("0-1-5,0-2-5,0-3-9"), pos("0-3-9"));
        assert_eq!(pos("0-3-9,0-1-5,0-2-5"), pos("0-3-9"));
        assert_eq!(
            MariaDbPosition::parse("0-2-5,1-1-1,0-1-5").unwrap_err(),
            MariaDbPosition::parse("0-1-5,1-1-1,0-2-5").unwrap_err()
        );
    }

    #[test]
    fn malformed_input_is_rejected_with_context() {
        let cases = [
            ("0-1-5,,1-2-3", "empty elements"),
            ("0-1-5,", "empty elements"),
            (",0-1-5", "empty elements"),
            ("0-1", "three"),
            ("0-1-5-6", "three"),
            ("0--5", "server_id as a decimal"),
            ("-1-5", "domain_id as a decimal"),
            ("0-1-", "seq_no as a decimal"),
            ("0-1-x", "seq_no as a decimal"),
            ("0-1-+5", "seq_no as a decimal"),
            ("0-1-5 1-2-3", "three"),
            ("0-1-5 x", "seq_no as a decimal"),
            ("0-1-5\u{a0}", "seq_no as a decimal"),
            ("0 -1-5", "domain_id as a decimal"),
            ("4294967296-1-5", "domain_id of at most 4294967295"),
            ("0-4294967296-5", "server_id of at most 4294967295"),
            (
                "0-1-18446744073709551616",
                "seq_no of at most 18446744073709551615",
            ),
            ("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5", "three"),
        ];
        for (input, expected) in cases {
            let err = MariaDbPosition::parse(input).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(
                    err,
                    GtidError::Parse {
                        flavor: Flavor::MariaDb,
                        ..
                    }
                ),
                "{input:?}: {err:?}"
            );
            assert!(text.contains(expected), "{input:?}: {text}");
        }
        let text = MariaDbPosition::parse("0-1-5,0-x-2")
            .unwrap_err()
            .to_string();
        assert!(text.contains("`0-x-2`"), "{text}");
    }

    #[test]
    fn containment_and_divergence() {
        let primary = pos("0-1-10");
        let behind = pos("0-1-7");
        assert!(primary.contains(&behind));
        assert!(!behind.contains(&primary));
        assert_eq!(behind.compare(&primary), SetOrdering::Subset);
        assert_eq!(primary.compare(&behind), SetOrdering::Superset);
        assert_eq!(primary.compare(&pos("0-1-10")), SetOrdering::Equal);

        // A failover to server 3 continues the domain's numbering: still ahead, not diverged.
        assert_eq!(pos("0-3-12").compare(&primary), SetOrdering::Superset);

        // Same seq, different writer: the transaction at seq 8 differs.
        let a = pos("0-3-8");
        let b = pos("0-1-8");
        assert_eq!(a.compare(&b), SetOrdering::Diverged);
        assert!(!a.contains(&b) && !b.contains(&a));

        // Each side ahead in a different domain.
        assert_eq!(
            pos("0-1-5,1-1-3").compare(&pos("0-1-4,1-1-9")),
            SetOrdering::Diverged
        );
        // A missing domain is behind every entry of it.
        assert_eq!(
            pos("0-1-5").compare(&pos("0-1-5,1-2-1")),
            SetOrdering::Subset
        );
        assert_eq!(pos("").compare(&pos("")), SetOrdering::Equal);
        assert!(pos("0-1-1").contains(&pos("")));
    }

    #[test]
    fn difference_examples() {
        let d = pos("0-1-10").difference(&pos("0-1-7"));
        assert_eq!(
            d.ranges(),
            &[MariaDbRange {
                domain: 0,
                server_id: 1,
                first_seq: 8,
                last_seq: 10
            }]
        );
        assert_eq!(d.to_string(), "0-1-8..10");
        assert_eq!(d.transaction_count(), 3);

        // Diverged at the same seq: the diverging transaction on each side.
        assert_eq!(
            pos("0-3-8").difference(&pos("0-1-8")).to_string(),
            "0-3-8..8"
        );
        assert_eq!(
            pos("0-1-8").difference(&pos("0-3-8")).to_string(),
            "0-1-8..8"
        );

        // A domain the other side never saw is errant in full.
        assert_eq!(
            pos("0-1-10,5-7-3").difference(&pos("0-1-10")).to_string(),
            "5-7-1..3"
        );
        assert!(pos("0-1-7").difference(&pos("0-1-10")).is_empty());
        assert!(pos("0-1-7").difference(&pos("0-1-7")).is_empty());
        assert_eq!(pos("0-1-7").difference(&pos("0-1-7")).to_string(), "");
        assert!(pos("").difference(&pos("0-1-7")).is_empty());
    }

    #[test]
    fn union_and_intersection() {
        let a = pos("0-1-10,1-2-3");
        let b = pos("0-3-12,2-5-1");
        assert_eq!(a.union(&b).unwrap().to_string(), "0-3-12,1-2-3,2-5-1");
        assert_eq!(a.intersection(&b).unwrap().to_string(), "0-1-10");
        let err = pos("0-3-8").union(&pos("0-1-8")).unwrap_err();
        assert_eq!(
            err,
            GtidError::Diverged {
                domain: 0,
                left: g(0, 3, 8),
                right: g(0, 1, 8),
                operation: "union"
            }
        );
        assert!(pos("0-3-8").intersection(&pos("0-1-8")).is_err());
    }

    #[test]
    fn transaction_count_sums_seqs() {
        assert_eq!(pos("0-1-57,1-2-3").transaction_count(), 60);
        assert_eq!(pos("").transaction_count(), 0);
        assert_eq!(
            pos("0-1-18446744073709551615,1-1-5").transaction_count(),
            u64::MAX
        );
    }

    fn arb_gtid() -> impl Strategy<Value = MariaDbGtid> {
        // Few domains, servers and seqs so that ties and divergence are common.
        (0u32..3, 1u32..4, 0u64..6).prop_map(|(d, s, n)| g(d, s, n))
    }

    fn arb_position() -> impl Strategy<Value = MariaDbPosition> {
        proptest::collection::vec(arb_gtid(), 0..4).prop_map(|gtids| {
            // One entry per domain so that construction never hits a conflict.
            let mut by_domain = BTreeMap::new();
            for gtid in gtids {
                by_domain.insert(gtid.domain, gtid);
            }
            MariaDbPosition::from_gtids(by_domain.into_values()).unwrap()
        })
    }

    proptest! {
        #[test]
        fn print_parse_round_trip(a in arb_position()) {
            prop_assert_eq!(MariaDbPosition::parse(&a.to_string()).unwrap(), a);
        }

        #[test]
        fn compare_is_consistent_with_contains(a in arb_position(), b in arb_position()) {
            let (ab, ba) = (a.contains(&b), b.contains(&a));
            let expected = match (ab, ba) {
                (true, true) => SetOrdering::Equal,
                (true, false) => SetOrdering::Superset,
                (false, true) => SetOrdering::Subset,
                (false, false) => SetOrdering::Diverged,
            };
            prop_assert_eq!(a.compare(&b), expected);
            prop_assert_eq!(b.compare(&a), expected.reverse());
            prop_assert_eq!(a.is_subset(&b), ba);
            prop_assert_eq!(ab && ba, a == b);
        }

        #[test]
        fn difference_is_empty_iff_contained(a in arb_position(), b in arb_position()) {
            prop_assert_eq!(a.difference(&b).is_empty(), b.contains(&a));
            if a.compare(&b) == SetOrdering::Diverged {
                prop_assert!(!a.difference(&b).is_empty());
                prop_assert!(!b.difference(&a).is_empty());
            }
            if a.contains(&b) {
                prop_assert_eq!(
                    a.difference(&b).transaction_count(),
                    a.transaction_count() - b.transaction_count()
                );
            }
            for r in a.difference(&b).ranges() {
                prop_assert!(1 <= r.first_seq && r.first_seq <= r.last_seq);
            }
        }

        #[test]
        fn union_is_a_least_upper_bound(a in arb_position(), b in arb_position(), c in arb_position()) {
            let ab = a.union(&b);
            prop_assert_eq!(ab.is_ok(), b.union(&a).is_ok());
            prop_assert_eq!(a.union(&a).unwrap(), a.clone());
            if let (Ok(ab), Ok(ba)) = (&ab, b.union(&a)) {
                prop_assert_eq!(ab, &ba);
                prop_assert!(ab.contains(&a) && ab.contains(&b));
                prop_assert!(a.is_subset(ab));
                // Least: any common upper bound contains the union.
                if c.contains(&a) && c.contains(&b) {
                    prop_assert!(c.contains(ab));
                }
            }
            if let (Ok(ab), Ok(bc)) = (&ab, b.union(&c)) {
                if let (Ok(left), Ok(right)) = (ab.union(&c), a.union(&bc)) {
                    prop_assert_eq!(left, right);
                }
            }
            // A union fails only when a domain diverged.
            if ab.is_err() {
                prop_assert_eq!(a.compare(&b), SetOrdering::Diverged);
            }
        }

        #[test]
        fn intersection_is_a_greatest_lower_bound(a in arb_position(), b in arb_position()) {
            prop_assert_eq!(a.intersection(&a).unwrap(), a.clone());
            if let Ok(i) = a.intersection(&b) {
                prop_assert_eq!(&i, &b.intersection(&a).unwrap());
                prop_assert!(a.contains(&i) && b.contains(&i));
            }
        }

        #[test]
        fn binlog_state_keeps_highest_seq(gtids in proptest::collection::vec(arb_gtid(), 0..8)) {
            let result = MariaDbPosition::from_gtids(gtids.clone());
            prop_assert_eq!(&result, &MariaDbPosition::from_gtids(gtids.iter().rev().copied()));
            if let Ok(p) = result {
                for gtid in gtids.iter().filter(|g| g.seq > 0) {
                    let kept = p.get(gtid.domain).unwrap();
                    prop_assert!(kept.seq >= gtid.seq);
                }
                let text = gtids.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
                prop_assert_eq!(MariaDbPosition::parse(&text).unwrap(), p);
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            if let Ok(p) = MariaDbPosition::parse(&s) {
                prop_assert_eq!(MariaDbPosition::parse(&p.to_string()).unwrap(), p);
            }
        }

        #[test]
        fn parse_never_panics_on_near_miss_text(s in "[0-9 \\-,\n+x]{0,40}") {
            if let Ok(p) = MariaDbPosition::parse(&s) {
                prop_assert_eq!(MariaDbPosition::parse(&p.to_string()).unwrap(), p);
            }
        }
    }
}
