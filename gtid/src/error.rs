use crate::mariadb::MariaDbGtid;
use crate::Flavor;

/// Everything that can go wrong in this crate. Malformed input is always reported through this type,
/// never a panic, because GTID text comes from servers and operators and must not take a daemon down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GtidError {
    /// The text is not a GTID set of the given flavor. `fragment` is the offending element (or the whole
    /// input when the problem is the list structure), truncated to a readable length.
    #[error("invalid {flavor} GTID text `{fragment}`: expected {expected}")]
    Parse {
        flavor: Flavor,
        fragment: String,
        expected: String,
    },

    /// A `gtid_binlog_state`-style list has entries from different servers at a domain's highest
    /// seq_no, so the domain's effective position is ambiguous. `first` has the lower server_id.
    #[error("conflicting entries for domain {domain}: `{first}` and `{second}` have the same seq_no but different server_ids")]
    ConflictingDomain {
        domain: u32,
        first: MariaDbGtid,
        second: MariaDbGtid,
    },

    /// A MySQL interval built through the API rather than parsed is out of range.
    #[error("invalid GNO interval {first}-{last}: expected 1 <= first <= last <= {max}", max = crate::mysql::MAX_GNO)]
    InvalidInterval { first: u64, last: u64 },

    /// A flavor name other than `mariadb` or `mysql`.
    #[error("unknown flavor `{text}`: expected `mariadb` or `mysql`")]
    UnknownFlavor { text: String },

    /// The two operands are of different flavors; there is no meaningful way to relate them.
    #[error("cannot combine a {left} GTID set with a {right} one")]
    FlavorMismatch { left: Flavor, right: Flavor },

    /// Two MariaDB positions hold different transactions at the same seq_no of a domain, so the requested
    /// result (a union or intersection) is not expressible as a single position.
    #[error("MariaDB positions diverged in domain {domain} (`{left}` vs `{right}`): their {operation} is not representable as a position")]
    Diverged {
        domain: u32,
        left: MariaDbGtid,
        right: MariaDbGtid,
        operation: &'static str,
    },
}

/// Longest fragment quoted in an error; server output can be kilobytes long.
const MAX_FRAGMENT_CHARS: usize = 96;

pub(crate) fn fragment(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(MAX_FRAGMENT_CHARS).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

pub(crate) fn parse_error(flavor: Flavor, text: &str, expected: impl Into<String>) -> GtidError {
    GtidError::Parse {
        flavor,
        fragment: fragment(text),
        expected: expected.into(),
    }
}

/// Whitespace servers put around list separators (`SHOW REPLICA STATUS` prints `,\n`).
pub(crate) fn trim_ws(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_whitespace())
}

/// Splits a comma-separated list into trimmed, non-empty elements. Blank input is the empty list;
/// an empty element anywhere (including a trailing comma) is an error, since it usually means the
/// text was truncated or mangled on the way.
pub(crate) fn split_elements(flavor: Flavor, input: &str) -> Result<Vec<&str>, GtidError> {
    if trim_ws(input).is_empty() {
        return Ok(Vec::new());
    }
    input
        .split(',')
        .enumerate()
        .map(|(i, element)| {
            let element = trim_ws(element);
            if element.is_empty() {
                Err(parse_error(
                    flavor,
                    input,
                    format!(
                        "a GTID as element {} of the comma-separated list (empty elements and trailing commas are not allowed)",
                        i + 1
                    ),
                ))
            } else {
                Ok(element)
            }
        })
        .collect()
}

/// Parses an unsigned decimal made only of ASCII digits (no sign, no spaces) that is at most `max`.
/// `context` is the element quoted in the error; `what` names the field.
pub(crate) fn parse_decimal(
    flavor: Flavor,
    context: &str,
    text: &str,
    what: &str,
    max: u64,
) -> Result<u64, GtidError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(parse_error(
            flavor,
            context,
            format!("{what} as a decimal number, found `{}`", fragment(text)),
        ));
    }
    let too_big = || {
        parse_error(
            flavor,
            context,
            format!("{what} of at most {max}, found `{}`", fragment(text)),
        )
    };
    let mut value: u64 = 0;
    for digit in text.bytes().map(|b| u64::from(b - b'0')) {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(digit))
            .ok_or_else(too_big)?;
    }
    if value > max {
        return Err(too_big());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_truncates_on_char_boundaries() {
        let long = "é".repeat(200);
        let f = fragment(&long);
        assert_eq!(f.chars().count(), MAX_FRAGMENT_CHARS + 1);
        assert!(f.ends_with('…'));
        assert_eq!(fragment("short"), "short");
    }

    #[test]
    fn decimal_rejects_signs_spaces_and_overflow() {
        let p = |t: &str| parse_decimal(Flavor::MariaDb, t, t, "seq_no", u64::MAX);
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("007"), Ok(7));
        assert_eq!(p("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "",
            "+5",
            "-5",
            " 5",
            "5 ",
            "1_000",
            "18446744073709551616",
            "٣",
        ] {
            assert!(p(bad).is_err(), "{bad:?} should be rejected");
        }
        let err = parse_decimal(
            Flavor::MariaDb,
            "0-4294967296-1",
            "4294967296",
            "server_id",
            4294967295,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server_id of at most 4294967295"), "{err}");
        assert!(err.contains("0-4294967296-1"), "{err}");
    }

    #[test]
    fn split_rejects_empty_elements() {
        let f = Flavor::MariaDb;
        assert_eq!(split_elements(f, ""), Ok(vec![]));
        assert_eq!(split_elements(f, " \n\t"), Ok(vec![]));
        assert_eq!(split_elements(f, "a,\n b "), Ok(vec!["a", "b"]));
        for bad in ["a,,b", "a,", ",a", ",", "a, ,b"] {
            let err = split_elements(f, bad).unwrap_err().to_string();
            assert!(err.contains("empty elements"), "{bad:?}: {err}");
        }
    }
}
