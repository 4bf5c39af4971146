//! The one candidate ranking, shared by the emergency reparent
//! ([`crate::analysis::choose_candidate`]) and the planned one
//! ([`crate::recovery::planned::choose_planned`]). Each procedure decides which tablets are
//! eligible (errant, `must_not`, quarantined, unreachable, lagging past the bound are out);
//! among the eligible the best is the least [`Rank`], compared field by field:
//!
//! 1. the promotion rule: `prefer` before `neutral`. An operator's explicit choice outranks
//!    locality: a `prefer` tablet in another cell is where the operator said the primary goes;
//! 2. the old primary's cell before another cell: clients and replicas stay near the primary;
//! 3. holding everything the most advanced tablet holds before lacking some of it: no
//!    catch-up step before the promotion;
//! 4. the least backlog, what the tablet still has to apply before it can take writes: in an
//!    emergency the transactions it received but has not applied; in a planned reparent its
//!    replication lag in milliseconds (the live primary's position is what everyone reaches);
//! 5. the alias, so that equal candidates are chosen the same way every time.

use topo::PromotionRule;

/// A candidate's place in the ranking; the least is the best. Field order is the ranking
/// order (the derived `Ord` compares fields in declaration order).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    rule: u8,
    other_cell: bool,
    lacks_most_advanced: bool,
    backlog: u64,
    alias: String,
}

impl Rank {
    pub fn new(
        alias: &str,
        rule: PromotionRule,
        other_cell: bool,
        lacks_most_advanced: bool,
        backlog: u64,
    ) -> Rank {
        Rank {
            rule: rule_rank(rule),
            other_cell,
            lacks_most_advanced,
            backlog,
            alias: alias.to_string(),
        }
    }
}

/// `prefer` < `neutral` < `must_not` (never eligible, ranked last should a caller keep it).
pub fn rule_rank(r: PromotionRule) -> u8 {
    match r {
        PromotionRule::Prefer => 0,
        PromotionRule::Neutral => 1,
        PromotionRule::MustNot => 2,
    }
}

/// The best of `items` by `rank`; `None` when there is none.
pub fn best<T>(items: impl IntoIterator<Item = T>, rank: impl Fn(&T) -> Rank) -> Option<T> {
    items.into_iter().min_by_key(|t| rank(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_beats_the_cell_which_beats_progress_which_beats_the_backlog() {
        use PromotionRule::{Neutral, Prefer};
        let r = |alias: &str, rule, other_cell, lacks, backlog| {
            Rank::new(alias, rule, other_cell, lacks, backlog)
        };
        // Each pair: the first wins on the first field that differs, whatever the later ones.
        let pairs = [
            (
                r("z-9", Prefer, true, true, 99),
                r("z-1", Neutral, false, false, 0),
            ),
            (
                r("z-9", Neutral, false, true, 99),
                r("z-1", Neutral, true, false, 0),
            ),
            (
                r("z-9", Neutral, false, false, 99),
                r("z-1", Neutral, false, true, 0),
            ),
            (
                r("z-9", Neutral, false, false, 1),
                r("z-1", Neutral, false, false, 2),
            ),
            (
                r("z-1", Neutral, false, false, 1),
                r("z-9", Neutral, false, false, 1),
            ),
        ];
        for (better, worse) in pairs {
            assert!(better < worse, "{better:?} should beat {worse:?}");
            assert_eq!(
                best([worse.clone(), better.clone()], |x| x.clone()),
                Some(better)
            );
        }
    }
}
