//! MySQL GTID sets (`uuid[:tag]:interval[:interval]...` lists). See the crate documentation for the model.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::{fragment, parse_decimal, parse_error, split_elements, trim_ws, GtidError};
use crate::{Flavor, SetOrdering};

/// Largest transaction number (GNO). MySQL stores GNOs as signed 64-bit integers; keeping every bound
/// at or below this also means `last + 1` never overflows in the interval arithmetic below.
pub const MAX_GNO: u64 = i64::MAX as u64;

/// Longest tag MySQL accepts.
pub const MAX_TAG_LEN: usize = 32;

/// A server UUID (`source_id`). Parsed case-insensitively from the 8-4-4-4-12 form, printed lowercase.
/// Ordering is byte order, which is also the order of the printed text and the order MySQL prints sets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid([u8; 16]);

impl Uuid {
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Uuid(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// Byte offsets of the `-` separators in the textual form.
const UUID_DASHES: [usize; 4] = [8, 13, 18, 23];
const UUID_TEXT_LEN: usize = 36;

impl FromStr for Uuid {
    type Err = GtidError;

    fn from_str(s: &str) -> Result<Self, GtidError> {
        let bad = || {
            parse_error(
                Flavor::MySql,
                s,
                "a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hexadecimal digits)",
            )
        };
        let text = s.as_bytes();
        if text.len() != UUID_TEXT_LEN {
            return Err(bad());
        }
        let mut nibbles = [0u8; 32];
        let mut n = 0;
        for (i, &c) in text.iter().enumerate() {
            if UUID_DASHES.contains(&i) {
                if c != b'-' {
                    return Err(bad());
                }
                continue;
            }
            let value = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(bad()),
            };
            // 36 bytes minus 4 dashes is exactly 32 nibbles, so `n` stays in range.
            let slot = nibbles.get_mut(n).ok_or_else(bad)?;
            *slot = value;
            n += 1;
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(nibbles.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
        Ok(Uuid(bytes))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A GTID tag (MySQL 8.3+): `[a-z_][a-z0-9_]{0,31}`. Tags are case-insensitive; the stored form is
/// lowercase, as the server prints it, so derived equality and ordering match the server's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = GtidError;

    fn from_str(s: &str) -> Result<Self, GtidError> {
        let valid = s.len() <= MAX_TAG_LEN
            && s.bytes()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
            && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if !valid {
            return Err(parse_error(
                Flavor::MySql,
                s,
                format!(
                    "a tag: a letter or `_` followed by up to {} letters, digits or `_`",
                    MAX_TAG_LEN - 1
                ),
            ));
        }
        Ok(Tag(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Transaction source identifier: the UUID plus the optional tag. Transactions of the same UUID with
/// different tags are independent sequences. Ordering (UUID, then untagged before tags in byte order) is
/// the order MySQL prints them in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tsid {
    pub uuid: Uuid,
    pub tag: Option<Tag>,
}

impl Tsid {
    pub fn untagged(uuid: Uuid) -> Self {
        Tsid { uuid, tag: None }
    }

    pub fn tagged(uuid: Uuid, tag: Tag) -> Self {
        Tsid {
            uuid,
            tag: Some(tag),
        }
    }
}

impl fmt::Display for Tsid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tag {
            None => write!(f, "{}", self.uuid),
            Some(tag) => write!(f, "{}:{tag}", self.uuid),
        }
    }
}

/// An inclusive range of transaction numbers. Invariant: `1 <= first <= last <= MAX_GNO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GnoInterval {
    first: u64,
    last: u64,
}

impl GnoInterval {
    pub fn new(first: u64, last: u64) -> Result<Self, GtidError> {
        if first == 0 || first > last || last > MAX_GNO {
            return Err(GtidError::InvalidInterval { first, last });
        }
        Ok(GnoInterval { first, last })
    }

    pub fn first(&self) -> u64 {
        self.first
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    pub fn transaction_count(&self) -> u64 {
        self.last - self.first + 1
    }
}

impl fmt::Display for GnoInterval {
    /// `first-last`, or just `first` for a single transaction, as MySQL prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Operations on interval lists in normal form: sorted, disjoint and non-adjacent
/// (`a.last + 1 < b.first` for consecutive `a`, `b`).
mod intervals {
    use super::GnoInterval;

    pub(super) fn normalize(mut list: Vec<GnoInterval>) -> Vec<GnoInterval> {
        list.sort_unstable();
        let mut out: Vec<GnoInterval> = Vec::with_capacity(list.len());
        for next in list {
            match out.last_mut() {
                // `last + 1` cannot overflow: last <= MAX_GNO < u64::MAX.
                Some(cur) if next.first <= cur.last + 1 => cur.last = cur.last.max(next.last),
                _ => out.push(next),
            }
        }
        out
    }

    pub(super) fn union(a: &[GnoInterval], b: &[GnoInterval]) -> Vec<GnoInterval> {
        normalize(a.iter().chain(b).copied().collect())
    }

    pub(super) fn intersection(a: &[GnoInterval], b: &[GnoInterval]) -> Vec<GnoInterval> {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while let (Some(x), Some(y)) = (a.get(i), b.get(j)) {
            let first = x.first.max(y.first);
            let last = x.last.min(y.last);
            if first <= last {
                out.push(GnoInterval { first, last });
            }
            if x.last < y.last {
                i += 1;
            } else {
                j += 1;
            }
        }
        out
    }

    pub(super) fn difference(a: &[GnoInterval], b: &[GnoInterval]) -> Vec<GnoInterval> {
        let mut out = Vec::new();
        // Index of the first interval of `b` that can still overlap the current or a later `a` interval.
        let mut j = 0;
        for x in a {
            while b.get(j).is_some_and(|y| y.last < x.first) {
                j += 1;
            }
            let mut start = x.first;
            for y in b[j..].iter().take_while(|y| y.first <= x.last) {
                if y.first > start {
                    out.push(GnoInterval {
                        first: start,
                        last: y.first - 1,
                    });
                }
                start = start.max(y.last + 1);
                if start > x.last {
                    break;
                }
            }
            if start <= x.last {
                out.push(GnoInterval {
                    first: start,
                    last: x.last,
                });
            }
        }
        out
    }

    /// `a ⊇ b`. Since `a` is non-adjacent, every interval of `b` must fit inside a single one of `a`.
    pub(super) fn contains(a: &[GnoInterval], b: &[GnoInterval]) -> bool {
        let mut i = 0;
        b.iter().all(|y| {
            while a.get(i).is_some_and(|x| x.last < y.first) {
                i += 1;
            }
            a.get(i)
                .is_some_and(|x| x.first <= y.first && y.last <= x.last)
        })
    }

    pub(super) fn count(list: &[GnoInterval]) -> u64 {
        list.iter()
            .fold(0u64, |acc, iv| acc.saturating_add(iv.transaction_count()))
    }
}

/// A MySQL GTID set (`gtid_executed`, `gtid_purged`, `Retrieved_Gtid_Set`, ...).
///
/// Invariant: every interval list is in normal form (sorted, disjoint, non-adjacent) and non-empty, so
/// derived equality is set equality.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MySqlGtidSet {
    sets: BTreeMap<Tsid, Vec<GnoInterval>>,
}

impl MySqlGtidSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `uuid[:tag]:interval[:interval]...[:tag:interval...]` elements separated by commas.
    /// Whitespace (including newlines) is allowed around separators; UUIDs and tags are
    /// case-insensitive; intervals may overlap, repeat or come in any order.
    pub fn parse(s: &str) -> Result<Self, GtidError> {
        let mut raw: BTreeMap<Tsid, Vec<GnoInterval>> = BTreeMap::new();
        for element in split_elements(Flavor::MySql, s)? {
            parse_element(element, &mut raw)?;
        }
        let sets = raw
            .into_iter()
            .map(|(tsid, list)| (tsid, intervals::normalize(list)))
            .collect();
        Ok(MySqlGtidSet { sets })
    }

    /// Adds `first..=last` of `tsid`.
    pub fn insert(&mut self, tsid: Tsid, first: u64, last: u64) -> Result<(), GtidError> {
        let interval = GnoInterval::new(first, last)?;
        let list = self.sets.entry(tsid).or_default();
        *list = intervals::union(list, &[interval]);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Interval lists in print order; every list is non-empty and in normal form.
    pub fn iter(&self) -> impl Iterator<Item = (&Tsid, &[GnoInterval])> + '_ {
        self.sets.iter().map(|(tsid, list)| (tsid, list.as_slice()))
    }

    pub fn contains_gtid(&self, tsid: &Tsid, gno: u64) -> bool {
        self.sets
            .get(tsid)
            .is_some_and(|list| list.iter().any(|iv| iv.first <= gno && gno <= iv.last))
    }

    /// `self ⊇ other`.
    pub fn contains(&self, other: &MySqlGtidSet) -> bool {
        other.sets.iter().all(|(tsid, theirs)| {
            self.sets
                .get(tsid)
                .is_some_and(|ours| intervals::contains(ours, theirs))
        })
    }

    pub fn is_subset(&self, other: &MySqlGtidSet) -> bool {
        other.contains(self)
    }

    pub fn compare(&self, other: &MySqlGtidSet) -> SetOrdering {
        SetOrdering::from_containment(self.contains(other), other.contains(self))
    }

    pub fn union(&self, other: &MySqlGtidSet) -> MySqlGtidSet {
        let mut sets = self.sets.clone();
        for (tsid, theirs) in &other.sets {
            let list = sets.entry(tsid.clone()).or_default();
            *list = intervals::union(list, theirs);
        }
        MySqlGtidSet { sets }
    }

    pub fn intersection(&self, other: &MySqlGtidSet) -> MySqlGtidSet {
        let sets = self
            .sets
            .iter()
            .filter_map(|(tsid, ours)| {
                let theirs = other.sets.get(tsid)?;
                let list = intervals::intersection(ours, theirs);
                (!list.is_empty()).then(|| (tsid.clone(), list))
            })
            .collect();
        MySqlGtidSet { sets }
    }

    /// Transactions in `self` that are not in `other` (MySQL's `GTID_SUBTRACT(self, other)`).
    pub fn difference(&self, other: &MySqlGtidSet) -> MySqlGtidSet {
        let sets = self
            .sets
            .iter()
            .filter_map(|(tsid, ours)| {
                let list = match other.sets.get(tsid) {
                    Some(theirs) => intervals::difference(ours, theirs),
                    None => ours.clone(),
                };
                (!list.is_empty()).then(|| (tsid.clone(), list))
            })
            .collect();
        MySqlGtidSet { sets }
    }

    /// Number of transactions in the set, saturating at `u64::MAX`.
    pub fn transaction_count(&self) -> u64 {
        self.sets
            .values()
            .fold(0u64, |acc, list| acc.saturating_add(intervals::count(list)))
    }
}

/// Parses one comma-separated element into `raw` (un-normalised interval lists).
fn parse_element(
    element: &str,
    raw: &mut BTreeMap<Tsid, Vec<GnoInterval>>,
) -> Result<(), GtidError> {
    let flavor = Flavor::MySql;
    let mut parts = element.split(':').map(trim_ws);
    let uuid_text = parts.next().unwrap_or_default();
    let uuid = Uuid::from_str(uuid_text).map_err(|_| {
        parse_error(
            flavor,
            element,
            format!(
                "a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx before the first `:`, found `{}`",
                fragment(uuid_text)
            ),
        )
    })?;
    let mut tsid = Tsid::untagged(uuid);
    // Whether the current tsid already got an interval. A tag must be followed by at least one; the
    // untagged part may be empty when the element starts with a tag.
    let mut has_interval = false;
    let mut any_part = false;
    for part in parts {
        any_part = true;
        match part.bytes().next() {
            Some(c) if c.is_ascii_digit() => {
                let interval = parse_interval(element, part)?;
                raw.entry(tsid.clone()).or_default().push(interval);
                has_interval = true;
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                if let (Some(tag), false) = (&tsid.tag, has_interval) {
                    return Err(missing_interval(element, tag.as_str()));
                }
                let tag = Tag::from_str(part).map_err(|_| {
                    parse_error(
                        flavor,
                        element,
                        format!(
                            "a tag of at most {MAX_TAG_LEN} letters, digits or `_` starting with a letter or `_`, found `{}`",
                            fragment(part)
                        ),
                    )
                })?;
                tsid = Tsid::tagged(uuid, tag);
                has_interval = false;
            }
            _ => {
                return Err(parse_error(
                    flavor,
                    element,
                    format!(
                    "an interval `first-last`, a transaction number or a tag after `:`, found `{}`",
                    fragment(part)
                ),
                ))
            }
        }
    }
    if !any_part {
        return Err(parse_error(
            flavor,
            element,
            "`:` and at least one interval after the UUID",
        ));
    }
    match &tsid.tag {
        Some(tag) if !has_interval => Err(missing_interval(element, tag.as_str())),
        _ => Ok(()),
    }
}

fn missing_interval(element: &str, tag: &str) -> GtidError {
    parse_error(
        Flavor::MySql,
        element,
        format!("at least one interval after tag `{}`", fragment(tag)),
    )
}

fn parse_interval(element: &str, part: &str) -> Result<GnoInterval, GtidError> {
    let flavor = Flavor::MySql;
    let mut bounds = part.split('-').map(trim_ws);
    let (first, last) = match (bounds.next(), bounds.next(), bounds.next()) {
        (Some(single), None, None) => (single, single),
        (Some(first), Some(last), None) => (first, last),
        _ => {
            return Err(parse_error(
                flavor,
                element,
                format!("an interval `first-last`, found `{}`", fragment(part)),
            ))
        }
    };
    let first = parse_decimal(flavor, element, first, "a transaction number", MAX_GNO)?;
    let last = parse_decimal(flavor, element, last, "a transaction number", MAX_GNO)?;
    if first == 0 || first > last {
        return Err(parse_error(
            flavor,
            element,
            format!(
                "an interval `first-last` with 1 <= first <= last, found `{}`",
                fragment(part)
            ),
        ));
    }
    Ok(GnoInterval { first, last })
}

impl fmt::Display for MySqlGtidSet {
    /// MySQL's canonical text: per UUID, the untagged intervals, then each tag followed by its intervals;
    /// UUIDs in ascending order separated by `,`. The alternate form (`{:#}`) separates UUIDs with `,\n`
    /// as `@@gtid_executed` and `SHOW REPLICA STATUS` do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let separator = if f.alternate() { ",\n" } else { "," };
        let mut previous: Option<Uuid> = None;
        for (tsid, list) in &self.sets {
            if previous != Some(tsid.uuid) {
                if previous.is_some() {
                    f.write_str(separator)?;
                }
                write!(f, "{}", tsid.uuid)?;
                previous = Some(tsid.uuid);
            }
            if let Some(tag) = &tsid.tag {
                write!(f, ":{tag}")?;
            }
            for interval in list {
                write!(f, ":{interval}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const U1: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
    const U2: &str = "896e7882-18fe-11ef-ab88-22222d34d411";

    fn set(s: &str) -> MySqlGtidSet {
        MySqlGtidSet::parse(s).unwrap()
    }

    fn uuid(s: &str) -> Uuid {
        s.parse().unwrap()
    }

    #[test]
    fn uuid_round_trip_and_case() {
        let u = uuid("3E11FA47-71CA-11E1-9E33-C80AA9429562");
        assert_eq!(u.to_string(), U1);
        assert_eq!(u, uuid(U1));
        assert_eq!(u.as_bytes()[0], 0x3e);
        assert_eq!(u.as_bytes()[15], 0x62);
        assert_eq!(Uuid::from_bytes(*u.as_bytes()), u);
        for bad in [
            "",
            "3e11fa47-71ca-11e1-9e33-c80aa942956",
            "3e11fa47-71ca-11e1-9e33-c80aa94295622",
            "3e11fa4771ca11e19e33c80aa9429562",
            "3e11fa47_71ca-11e1-9e33-c80aa9429562",
            "3e11fa47-71ca-11e1-9e33-c80aa942956g",
            "{3e11fa47-71ca-11e1-9e33-c80aa94295}",
            "3e11fa47-71ca-11e1-9e33-c80aa94295é",
        ] {
            assert!(bad.parse::<Uuid>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags() {
        assert_eq!("Domain_1".parse::<Tag>().unwrap().as_str(), "domain_1");
        assert!("_x".parse::<Tag>().is_ok());
        assert!("a".repeat(32).parse::<Tag>().is_ok());
        for bad in ["", "1abc", "a-b", "a b", "é", &"a".repeat(33)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_real_server_output() {
        let s = set("3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5");
        assert_eq!(s.to_string(), format!("{U1}:1-5"));
        assert_eq!(s.transaction_count(), 5);

        // SHOW REPLICA STATUS / @@gtid_executed put a newline after each comma.
        let text = format!("{U2}:1-3,\n{U1}:1-5:11-18");
        let s = set(&text);
        assert_eq!(s.to_string(), format!("{U1}:1-5:11-18,{U2}:1-3"));
        assert_eq!(format!("{s:#}"), format!("{U1}:1-5:11-18,\n{U2}:1-3"));
        assert_eq!(set(&format!("{s:#}")), s);

        assert!(set("").is_empty());
        assert!(set(" \n ").is_empty());
        assert_eq!(set("").to_string(), "");
    }

    #[test]
    fn normalises_intervals() {
        assert_eq!(
            set(&format!("{U1}:7:1-3:4-5:2")).to_string(),
            format!("{U1}:1-5:7")
        );
        assert_eq!(
            set(&format!("{U1}:1-5,{U1}:6-9")).to_string(),
            format!("{U1}:1-9")
        );
        assert_eq!(set(&format!("{U1}:3-3")).to_string(), format!("{U1}:3"));
        assert_eq!(
            set(&format!("{U1}:1-10:2-3")).to_string(),
            format!("{U1}:1-10")
        );
        assert_eq!(
            set(&format!("{U1} : 1 - 5 : 7")).to_string(),
            format!("{U1}:1-5:7")
        );
        assert_eq!(
            set(&format!("{U1}:{MAX_GNO}")).to_string(),
            format!("{U1}:{MAX_GNO}")
        );
    }

    #[test]
    fn tagged_sets_print_like_mysql() {
        // From MySQL 9.1: input with mixed-case tags, output lowercased and grouped under one UUID.
        let s = set(
            "3E11FA47-71CA-11E1-9E33-C80AA9429562:Domain_1:1-3:15-21, \n    3E11FA47-71CA-11E1-9E33-C80AA9429562:Domain_2:8-52",
        );
        assert_eq!(
            s.to_string(),
            format!("{U1}:domain_1:1-3:15-21:domain_2:8-52")
        );

        let s = set(&format!("{U2}:x:1,{U2}:1-4:abc:1-3:aaaa:1,{U1}:t:5"));
        assert_eq!(
            s.to_string(),
            format!("{U1}:t:5,{U2}:1-4:aaaa:1:abc:1-3:x:1")
        );
        assert_eq!(set(&s.to_string()), s);
        assert_eq!(s.transaction_count(), 1 + 4 + 1 + 3 + 1);

        // Tagged and untagged transactions of one UUID are different transactions.
        let tagged = set(&format!("{U1}:t:1-5"));
        let untagged = set(&format!("{U1}:1-5"));
        assert_eq!(tagged.compare(&untagged), SetOrdering::Diverged);
        assert!(tagged.intersection(&untagged).is_empty());
        let t = Tsid::tagged(uuid(U1), "T".parse().unwrap());
        assert!(tagged.contains_gtid(&t, 3));
        assert!(!tagged.contains_gtid(&Tsid::untagged(uuid(U1)), 3));
    }

    #[test]
    fn malformed_input_is_rejected_with_context() {
        let cases = [
            (format!("{U1}:1-5,,{U2}:1"), "empty elements"),
            (format!("{U1}:1-5,"), "empty elements"),
            (U1.to_string(), "at least one interval after the UUID"),
            (format!("{U1}:"), "after `:`"),
            (format!("{U1}:1-5:"), "after `:`"),
            (format!("{U1}::1"), "after `:`"),
            (format!("{U1}:0"), "1 <= first <= last"),
            (format!("{U1}:0-5"), "1 <= first <= last"),
            (format!("{U1}:5-3"), "1 <= first <= last"),
            (format!("{U1}:1-"), "transaction number as a decimal"),
            (format!("{U1}:1-2-3"), "interval `first-last`"),
            (format!("{U1}:1-x"), "transaction number as a decimal"),
            (
                format!("{U1}:9223372036854775808"),
                "at most 9223372036854775807",
            ),
            (
                format!("{U1}:1-99999999999999999999"),
                "at most 9223372036854775807",
            ),
            (format!("{U1}:tag"), "at least one interval after tag `tag`"),
            (
                format!("{U1}:tag:other:1"),
                "at least one interval after tag `tag`",
            ),
            (
                format!("{U1}:1:tag"),
                "at least one interval after tag `tag`",
            ),
            (format!("{U1}:{}:1", "a".repeat(33)), "a tag of at most 32"),
            (format!("{U1}:ta-g:1"), "a tag of at most 32"),
            (format!("{U1}:-1"), "after `:`"),
            ("3e11fa47-71ca-11e1-9e33:1-5".to_string(), "a UUID"),
            ("0-1-5".to_string(), "a UUID"),
            ("1-5".to_string(), "a UUID"),
        ];
        for (input, expected) in cases {
            let err = MySqlGtidSet::parse(&input).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(
                    err,
                    GtidError::Parse {
                        flavor: Flavor::MySql,
                        ..
                    }
                ),
                "{input:?}: {err:?}"
            );
            assert!(text.contains(expected), "{input:?}: {text}");
        }
    }

    #[test]
    fn algebra_examples() {
        let primary = set(&format!("{U1}:1-100,{U2}:1-7"));
        let replica = set(&format!("{U1}:1-90,{U2}:1-7:9"));
        assert_eq!(replica.difference(&primary).to_string(), format!("{U2}:9"));
        assert_eq!(
            primary.difference(&replica).to_string(),
            format!("{U1}:91-100")
        );
        assert_eq!(primary.compare(&replica), SetOrdering::Diverged);
        assert_eq!(
            primary.union(&replica).to_string(),
            format!("{U1}:1-100,{U2}:1-7:9")
        );
        assert_eq!(
            primary.intersection(&replica).to_string(),
            format!("{U1}:1-90,{U2}:1-7")
        );
        assert_eq!(
            set(&format!("{U1}:1-10"))
                .difference(&set(&format!("{U1}:2:4-5:10")))
                .to_string(),
            format!("{U1}:1:3:6-9")
        );
        let caught_up = set(&format!("{U1}:1-90"));
        assert_eq!(caught_up.compare(&primary), SetOrdering::Subset);
        assert_eq!(primary.compare(&caught_up), SetOrdering::Superset);
        assert_eq!(primary.compare(&primary.clone()), SetOrdering::Equal);
    }

    #[test]
    fn insert_and_counts() {
        let mut s = MySqlGtidSet::new();
        let t = Tsid::untagged(uuid(U1));
        s.insert(t.clone(), 5, 9).unwrap();
        s.insert(t.clone(), 1, 4).unwrap();
        assert_eq!(s.to_string(), format!("{U1}:1-9"));
        assert_eq!(
            s.insert(t.clone(), 0, 4),
            Err(GtidError::InvalidInterval { first: 0, last: 4 })
        );
        assert!(s.insert(t.clone(), 5, 4).is_err());
        assert!(s.insert(t.clone(), 1, MAX_GNO + 1).is_err());
        s.insert(t.clone(), 1, MAX_GNO).unwrap();
        assert_eq!(s.transaction_count(), MAX_GNO);
        s.insert(Tsid::untagged(uuid(U2)), 1, MAX_GNO).unwrap();
        s.insert(Tsid::tagged(uuid(U2), "a".parse().unwrap()), 1, MAX_GNO)
            .unwrap();
        assert_eq!(s.transaction_count(), u64::MAX);
    }

    // --- property tests against a reference model: a set of (tsid, gno) pairs over a small universe ---

    const GNO_LIMIT: u64 = 40;

    fn tsid_pool() -> Vec<Tsid> {
        let (a, b) = (uuid(U1), uuid(U2));
        vec![
            Tsid::untagged(a),
            Tsid::tagged(a, "tag_1".parse().unwrap()),
            Tsid::untagged(b),
            Tsid::tagged(b, "a".parse().unwrap()),
            Tsid::tagged(b, "b".parse().unwrap()),
        ]
    }

    /// Raw intervals (tsid index, first, last), possibly overlapping and unordered.
    fn arb_raw() -> impl Strategy<Value = Vec<(usize, u64, u64)>> {
        proptest::collection::vec(
            (0usize..5, 1u64..=GNO_LIMIT, 0u64..6)
                .prop_map(|(t, first, len)| (t, first, (first + len).min(GNO_LIMIT))),
            0..8,
        )
    }

    fn build(raw: &[(usize, u64, u64)]) -> MySqlGtidSet {
        let pool = tsid_pool();
        let mut s = MySqlGtidSet::new();
        for &(t, first, last) in raw {
            s.insert(pool[t].clone(), first, last).unwrap();
        }
        s
    }

    fn arb_set() -> impl Strategy<Value = MySqlGtidSet> {
        arb_raw().prop_map(|raw| build(&raw))
    }

    fn model(s: &MySqlGtidSet) -> BTreeSet<(Tsid, u64)> {
        s.iter()
            .flat_map(|(tsid, list)| {
                list.iter()
                    .flat_map(move |iv| (iv.first()..=iv.last()).map(move |g| (tsid.clone(), g)))
            })
            .collect()
    }

    fn assert_normal_form(s: &MySqlGtidSet) -> Result<(), TestCaseError> {
        for (_, list) in s.iter() {
            prop_assert!(!list.is_empty());
            for iv in list {
                prop_assert!(1 <= iv.first() && iv.first() <= iv.last() && iv.last() <= MAX_GNO);
            }
            for pair in list.windows(2) {
                prop_assert!(pair[0].last() + 1 < pair[1].first());
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn print_parse_round_trip(a in arb_set()) {
            prop_assert_eq!(MySqlGtidSet::parse(&a.to_string()).unwrap(), a.clone());
            prop_assert_eq!(MySqlGtidSet::parse(&format!("{a:#}")).unwrap(), a);
        }

        #[test]
        fn parse_of_messy_text_matches_model(
            raw in arb_raw(),
            upper in any::<bool>(),
            ws in prop::sample::select(vec!["", " ", "\n", "\n  "]),
        ) {
            // One element per raw interval, in generation order (unsorted, overlapping, repeated UUIDs).
            let pool = tsid_pool();
            let elements: Vec<String> = raw
                .iter()
                .map(|&(t, first, last)| {
                    let text = format!("{}:{first}-{last}", pool[t]);
                    if upper { text.to_uppercase() } else { text }
                })
                .collect();
            let text = format!("{ws}{}{ws}", elements.join(&format!(",{ws}")));
            let parsed = MySqlGtidSet::parse(&text).unwrap();
            assert_normal_form(&parsed)?;
            let expected: BTreeSet<(Tsid, u64)> = raw
                .iter()
                .flat_map(|&(t, first, last)| (first..=last).map(move |g| (tsid_pool()[t].clone(), g)))
                .collect();
            prop_assert_eq!(model(&parsed), expected.clone());
            prop_assert_eq!(parsed.transaction_count(), expected.len() as u64);
        }

        #[test]
        fn operations_match_model(a in arb_set(), b in arb_set()) {
            let (ma, mb) = (model(&a), model(&b));
            let union = a.union(&b);
            let inter = a.intersection(&b);
            let diff = a.difference(&b);
            for s in [&union, &inter, &diff] {
                assert_normal_form(s)?;
            }
            prop_assert_eq!(model(&union), ma.union(&mb).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(model(&inter), ma.intersection(&mb).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(model(&diff), ma.difference(&mb).cloned().collect::<BTreeSet<_>>());
            prop_assert_eq!(a.contains(&b), ma.is_superset(&mb));
            prop_assert_eq!(a.transaction_count(), ma.len() as u64);
        }

        #[test]
        fn union_laws(a in arb_set(), b in arb_set(), c in arb_set()) {
            prop_assert_eq!(a.union(&b), b.union(&a));
            prop_assert_eq!(a.union(&b).union(&c), a.union(&b.union(&c)));
            prop_assert_eq!(a.union(&a), a.clone());
            prop_assert!(a.is_subset(&a.union(&b)));
            prop_assert_eq!(
                a.union(&b).transaction_count() + a.intersection(&b).transaction_count(),
                a.transaction_count() + b.transaction_count()
            );
        }

        #[test]
        fn difference_laws(a in arb_set(), b in arb_set()) {
            let diff = a.difference(&b);
            prop_assert!(diff.intersection(&b).is_empty());
            prop_assert_eq!(diff.union(&a.intersection(&b)), a.clone());
            prop_assert_eq!(a.is_subset(&b), diff.is_empty());
            let expected = match (a.contains(&b), b.contains(&a)) {
                (true, true) => SetOrdering::Equal,
                (true, false) => SetOrdering::Superset,
                (false, true) => SetOrdering::Subset,
                (false, false) => SetOrdering::Diverged,
            };
            prop_assert_eq!(a.compare(&b), expected);
            prop_assert_eq!(b.compare(&a), expected.reverse());
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            if let Ok(p) = MySqlGtidSet::parse(&s) {
                prop_assert_eq!(MySqlGtidSet::parse(&p.to_string()).unwrap(), p);
            }
        }

        #[test]
        fn parse_never_panics_on_mutated_text(
            a in arb_set(),
            edits in proptest::collection::vec(
                (
                    any::<prop::sample::Index>(),
                    prop::option::of(prop::sample::select(vec![',', ':', '-', '0', '9', 'a', 'G', '_', ' ', '\n', 'é'])),
                ),
                1..4,
            ),
        ) {
            // Delete or insert characters in valid text to land close to the grammar.
            let mut chars: Vec<char> = a.to_string().chars().collect();
            for (at, c) in edits {
                let i = at.index(chars.len() + 1);
                match c {
                    Some(c) => chars.insert(i, c),
                    None if i < chars.len() => {
                        chars.remove(i);
                    }
                    None => {}
                }
            }
            let text: String = chars.into_iter().collect();
            if let Ok(p) = MySqlGtidSet::parse(&text) {
                assert_normal_form(&p)?;
                prop_assert_eq!(MySqlGtidSet::parse(&p.to_string()).unwrap(), p);
            }
        }
    }
}
