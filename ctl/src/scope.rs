//! The `keyspace/shard` arguments, parsed by clap (`value_parser`) so that a malformed one is a
//! usage error (exit 2) before anything is asked, like any other bad argument.

use std::fmt;
use std::str::FromStr;

/// One shard: `keyspace/shard`, e.g. `commerce/0` or `commerce/-80`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRef {
    pub keyspace: String,
    pub shard: String,
}

impl fmt::Display for ShardRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.keyspace, self.shard)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("`{0}` is not keyspace/shard (e.g. commerce/0)")]
    NotAShard(String),
    #[error("`{0}` is not a keyspace or keyspace/shard (e.g. commerce or commerce/0)")]
    NotAScope(String),
    /// A name etcd keys could not hold (the same rule as the orchestrator's).
    #[error("{0}")]
    BadName(String),
}

fn check(what: &str, name: &str) -> Result<(), ScopeError> {
    topo::validate_name(what, name).map_err(ScopeError::BadName)
}

impl FromStr for ShardRef {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (keyspace, shard) = s
            .split_once('/')
            .filter(|(k, sh)| !k.is_empty() && !sh.is_empty())
            .ok_or_else(|| ScopeError::NotAShard(s.to_string()))?;
        check("keyspace", keyspace)?;
        check("shard", shard)?;
        Ok(ShardRef {
            keyspace: keyspace.to_string(),
            shard: shard.to_string(),
        })
    }
}

/// A keyspace, or one shard of it: `commerce` or `commerce/0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub keyspace: String,
    pub shard: Option<String>,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shard {
            Some(s) => write!(f, "{}/{s}", self.keyspace),
            None => f.write_str(&self.keyspace),
        }
    }
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.contains('/') {
            if s.is_empty() {
                return Err(ScopeError::NotAScope(s.to_string()));
            }
            check("keyspace", s)?;
            return Ok(Scope {
                keyspace: s.to_string(),
                shard: None,
            });
        }
        let r: ShardRef = s.parse().map_err(|e| match e {
            ScopeError::NotAShard(s) => ScopeError::NotAScope(s),
            e => e,
        })?;
        Ok(Scope {
            keyspace: r.keyspace,
            shard: Some(r.shard),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse() {
        let r: ShardRef = "commerce/-80".parse().unwrap();
        assert_eq!((r.keyspace.as_str(), r.shard.as_str()), ("commerce", "-80"));
        assert_eq!(r.to_string(), "commerce/-80");
        for bad in ["commerce", "/0", "commerce/", "", "a/b/c", "com merce/0"] {
            assert!(bad.parse::<ShardRef>().is_err(), "{bad}");
        }
        assert_eq!(
            "commerce".parse::<ShardRef>().unwrap_err().to_string(),
            "`commerce` is not keyspace/shard (e.g. commerce/0)"
        );
    }

    #[test]
    fn scopes_parse() {
        let s: Scope = "commerce".parse().unwrap();
        assert_eq!(s.shard, None);
        let s: Scope = "commerce/0".parse().unwrap();
        assert_eq!(s.shard.as_deref(), Some("0"));
        assert_eq!(s.to_string(), "commerce/0");
        for bad in ["", "/0", "commerce/", "a/b/c", "a\tb"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }
}
