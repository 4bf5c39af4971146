//! GTID text as servers and operators write it: every public parser of the `gtid` crate, the
//! round trip of everything that has a `Display`, and the set algebra on two parsed sets.

use std::str::FromStr;

use gtid::{Flavor, GtidSet, MariaDbGtid, SetOrdering, Tag, Uuid};

/// An error message quotes at most two truncated fragments of the input (see `gtid::GtidError`):
/// a message that grows with the input would put kilobytes of server output in every log line.
const MAX_ERROR_CHARS: usize = 600;

/// The input as text: every flavor's set parser, the single-GTID, UUID, tag and flavor parsers;
/// then, split at the first `|`, both sides as sets of each flavor for the algebra.
pub fn gtid_sets(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let mut accepted = false;
    for flavor in [Flavor::MariaDb, Flavor::MySql] {
        accepted |= set_round_trip(flavor, &text);
    }
    accepted |= single_round_trip::<MariaDbGtid>(&text);
    accepted |= single_round_trip::<Uuid>(&text);
    accepted |= single_round_trip::<Tag>(&text);
    if let Ok(f) = Flavor::from_str(&text) {
        assert_eq!(Flavor::from_str(f.as_str()), Ok(f));
        accepted = true;
    }
    if let Some((left, right)) = text.split_once('|') {
        for flavor in [Flavor::MariaDb, Flavor::MySql] {
            if let (Ok(a), Ok(b)) = (GtidSet::parse(flavor, left), GtidSet::parse(flavor, right)) {
                algebra(&a, &b);
                algebra(&b, &a);
                accepted = true;
            }
        }
    }
    accepted
}

/// Parses `text` as a set of `flavor`: what is accepted prints (in both forms) to text that
/// parses back to an equal set; what is refused has a short message.
fn set_round_trip(flavor: Flavor, text: &str) -> bool {
    match GtidSet::parse(flavor, text) {
        Ok(set) => {
            assert_eq!(set.flavor(), flavor);
            for printed in [set.to_string(), format!("{set:#}")] {
                assert_eq!(
                    GtidSet::parse(flavor, &printed).as_ref(),
                    Ok(&set),
                    "{flavor} set {text:?} printed as {printed:?} does not parse back"
                );
            }
            assert_eq!(set.is_empty(), set.transaction_count() == 0);
            true
        }
        Err(e) => {
            check_message(&e.to_string());
            false
        }
    }
}

fn single_round_trip<T>(text: &str) -> bool
where
    T: FromStr<Err = gtid::GtidError> + std::fmt::Display + PartialEq + std::fmt::Debug,
{
    match T::from_str(text) {
        Ok(v) => {
            let printed = v.to_string();
            assert_eq!(
                T::from_str(&printed).as_ref(),
                Ok(&v),
                "{text:?} printed as {printed:?} does not parse back"
            );
            true
        }
        Err(e) => {
            check_message(&e.to_string());
            false
        }
    }
}

fn check_message(message: &str) {
    assert!(!message.is_empty());
    assert!(
        message.chars().count() <= MAX_ERROR_CHARS,
        "error message of {} chars: {message}",
        message.chars().count()
    );
}

/// The relations the orchestrator relies on between two sets of one flavor.
fn algebra(a: &GtidSet, b: &GtidSet) {
    let a_has_b = a.contains_set(b).expect("same flavor");
    let b_has_a = b.contains_set(a).expect("same flavor");
    let ordering = a.compare(b).expect("same flavor");
    assert_eq!(
        ordering,
        match (a_has_b, b_has_a) {
            (true, true) => SetOrdering::Equal,
            (true, false) => SetOrdering::Superset,
            (false, true) => SetOrdering::Subset,
            (false, false) => SetOrdering::Diverged,
        },
        "{a} vs {b}"
    );
    assert_eq!(b.compare(a).expect("same flavor"), ordering.reverse());
    assert_eq!(ordering == SetOrdering::Equal, a == b, "{a} vs {b}");
    // Errant transactions: none exactly when the other side has everything.
    let diff = a.difference(b).expect("same flavor");
    assert_eq!(diff.is_empty(), b_has_a, "{a} minus {b} = {diff}");
    assert!(
        diff.transaction_count() <= a.transaction_count(),
        "{a} minus {b} = {diff}"
    );
    let _ = diff.to_string();
    match a.union(b) {
        Ok(u) => {
            assert!(u.contains_set(a).expect("same flavor"), "{a} ∪ {b} = {u}");
            assert!(u.contains_set(b).expect("same flavor"), "{a} ∪ {b} = {u}");
            assert_eq!(GtidSet::parse(u.flavor(), &u.to_string()).as_ref(), Ok(&u));
        }
        // Only MariaDB positions that diverged have no union.
        Err(e) => assert!(
            a.flavor() == Flavor::MariaDb && ordering == SetOrdering::Diverged,
            "{a} ∪ {b}: {e}"
        ),
    }
    match a.intersection(b) {
        Ok(i) => {
            assert!(a.contains_set(&i).expect("same flavor"), "{a} ∩ {b} = {i}");
            assert!(b.contains_set(&i).expect("same flavor"), "{a} ∩ {b} = {i}");
        }
        Err(e) => assert!(
            a.flavor() == Flavor::MariaDb && ordering == SetOrdering::Diverged,
            "{a} ∩ {b}: {e}"
        ),
    }
    if let (Some(x), Some(y)) = (a.as_mysql(), b.as_mysql()) {
        // A MySQL set is the disjoint union of what it shares and what it alone has.
        assert_eq!(x.difference(y).union(&x.intersection(y)), *x, "{x} / {y}");
    }
}
