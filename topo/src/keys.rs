//! The etcd key layout (see `docs/design.md`, "etcd key layout").
//!
//! Every prefix used for a range scan ends with `/`, so that keyspace `commerce` never matches
//! `commerce2` and shard `0` never matches `0-80`.

use crate::term::Term;

/// The default cluster prefix.
pub const DEFAULT_PREFIX: &str = "/myha";

/// Key builder for one cluster prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    /// Normalises `prefix`: surrounding whitespace and trailing slashes are removed and a
    /// leading slash is added, so `myha`, `/myha` and `/myha/` are the same prefix.
    /// An empty prefix (or `/`) puts the layout at the root: `/cells/...`.
    /// Whitespace and slashes are trimmed together at the end (`/myha /` is `/myha`), so that
    /// a normalised prefix normalises to itself.
    pub fn new(prefix: &str) -> Self {
        let p = prefix
            .trim_start()
            .trim_end_matches(|c: char| c == '/' || c.is_whitespace());
        let prefix = if p.is_empty() {
            String::new()
        } else if p.starts_with('/') {
            p.to_string()
        } else {
            format!("/{p}")
        };
        Keys { prefix }
    }

    /// The normalised prefix (no trailing slash; empty for the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything of this cluster: `{p}/`.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// `{p}/cells/{cell}`.
    pub fn cell(&self, cell: &str) -> String {
        format!("{}/cells/{cell}", self.prefix)
    }

    /// `{p}/cells/`.
    pub fn cells_prefix(&self) -> String {
        format!("{}/cells/", self.prefix)
    }

    /// `{p}/keyspaces/{ks}`.
    pub fn keyspace(&self, ks: &str) -> String {
        format!("{}/keyspaces/{ks}", self.prefix)
    }

    /// `{p}/keyspaces/`.
    pub fn keyspaces_prefix(&self) -> String {
        format!("{}/keyspaces/", self.prefix)
    }

    /// `{p}/shards/{ks}/{shard}`.
    pub fn shard(&self, ks: &str, shard: &str) -> String {
        format!("{}/shards/{ks}/{shard}", self.prefix)
    }

    /// `{p}/shards/{ks}/`: the shards of one keyspace.
    pub fn shards_prefix(&self, ks: &str) -> String {
        format!("{}/shards/{ks}/", self.prefix)
    }

    /// `{p}/shards/`: the shards of all keyspaces.
    pub fn all_shards_prefix(&self) -> String {
        format!("{}/shards/", self.prefix)
    }

    /// `{p}/tablets/{alias}`.
    pub fn tablet(&self, alias: &str) -> String {
        format!("{}/tablets/{alias}", self.prefix)
    }

    /// `{p}/tablets/`.
    pub fn tablets_prefix(&self) -> String {
        format!("{}/tablets/", self.prefix)
    }

    /// `{p}/locks/{ks}/{shard}`: the lock's name (as the etcd Lock service would take it).
    pub fn lock(&self, ks: &str, shard: &str) -> String {
        format!("{}/locks/{ks}/{shard}", self.prefix)
    }

    /// `{p}/locks/{ks}/{shard}/`: where the contenders' keys live.
    pub fn lock_prefix(&self, ks: &str, shard: &str) -> String {
        format!("{}/locks/{ks}/{shard}/", self.prefix)
    }

    /// `{p}/locks/{ks}/{shard}/{lease_id:x}`: one contender's key (the etcd Lock recipe's naming).
    pub fn lock_owner(&self, ks: &str, shard: &str, lease_id: i64) -> String {
        format!("{}/locks/{ks}/{shard}/{lease_id:x}", self.prefix)
    }

    /// `{p}/audit/{ks}/{shard}/{ms:020}-{seq}`.
    pub fn audit(&self, ks: &str, shard: &str, ms: u64, seq: u64) -> String {
        format!("{}/audit/{ks}/{shard}/{ms:020}-{seq}", self.prefix)
    }

    /// `{p}/audit/{ks}/{shard}/`.
    pub fn audit_prefix(&self, ks: &str, shard: &str) -> String {
        format!("{}/audit/{ks}/{shard}/", self.prefix)
    }

    /// `{p}/audit/{ks}/`: the audit of every shard of a keyspace.
    pub fn audit_keyspace_prefix(&self, ks: &str) -> String {
        format!("{}/audit/{ks}/", self.prefix)
    }

    /// `{p}/history/{ks}/{shard}/{term:020}`: the promotion that started `term`.
    pub fn promotion(&self, ks: &str, shard: &str, term: Term) -> String {
        format!("{}/history/{ks}/{shard}/{:020}", self.prefix, term.get())
    }

    /// `{p}/history/{ks}/{shard}/`: every promotion of a shard, in term order.
    pub fn history_prefix(&self, ks: &str, shard: &str) -> String {
        format!("{}/history/{ks}/{shard}/", self.prefix)
    }

    /// `{p}/quarantine/{alias}`.
    pub fn quarantine(&self, alias: &str) -> String {
        format!("{}/quarantine/{alias}", self.prefix)
    }

    /// `{p}/quarantine/`.
    pub fn quarantine_prefix(&self) -> String {
        format!("{}/quarantine/", self.prefix)
    }

    /// Inverse of [`Keys::quarantine`].
    pub fn parse_quarantine_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.quarantine_prefix())
            .filter(|a| !a.is_empty() && !a.contains('/'))
    }

    /// Inverse of [`Keys::tablet`].
    pub fn parse_tablet_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.tablets_prefix())
            .filter(|a| !a.is_empty() && !a.contains('/'))
    }

    /// Inverse of [`Keys::shard`]: `(keyspace, shard)`.
    pub fn parse_shard_key<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key.strip_prefix(&self.all_shards_prefix())?;
        let (ks, shard) = rest.split_once('/')?;
        (!ks.is_empty() && !shard.is_empty() && !shard.contains('/')).then_some((ks, shard))
    }
}

/// Checks a cell, keyspace or shard name: non-empty, no `/`, no whitespace or control
/// characters (they are used verbatim in keys).
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{what} name {name:?} contains {c:?}"));
    }
    Ok(())
}

/// The smallest key greater than every key starting with `prefix` (etcd's `range_end` for a
/// prefix scan).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): scan to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        let k = Keys::default();
        assert_eq!(k.prefix(), "/myha");
        assert_eq!(k.root(), "/myha/");
        assert_eq!(k.cell("zone1"), "/myha/cells/zone1");
        assert_eq!(k.cells_prefix(), "/myha/cells/");
        assert_eq!(k.keyspace("commerce"), "/myha/keyspaces/commerce");
        assert_eq!(k.keyspaces_prefix(), "/myha/keyspaces/");
        assert_eq!(k.shard("commerce", "-80"), "/myha/shards/commerce/-80");
        assert_eq!(k.shards_prefix("commerce"), "/myha/shards/commerce/");
        assert_eq!(k.all_shards_prefix(), "/myha/shards/");
        assert_eq!(k.tablet("zone1-101"), "/myha/tablets/zone1-101");
        assert_eq!(k.tablets_prefix(), "/myha/tablets/");
        assert_eq!(k.lock("commerce", "0"), "/myha/locks/commerce/0");
        assert_eq!(k.lock_prefix("commerce", "0"), "/myha/locks/commerce/0/");
        assert_eq!(
            k.lock_owner("commerce", "0", 0x694d_7a3b_2c1d),
            "/myha/locks/commerce/0/694d7a3b2c1d"
        );
        assert_eq!(
            k.audit("commerce", "0", 1_700_000_000_123, 7),
            "/myha/audit/commerce/0/00000001700000000123-7"
        );
        assert_eq!(
            k.audit_prefix("commerce", "80-"),
            "/myha/audit/commerce/80-/"
        );
        assert_eq!(k.audit_keyspace_prefix("commerce"), "/myha/audit/commerce/");
        assert_eq!(k.quarantine("zone1-101"), "/myha/quarantine/zone1-101");
        assert_eq!(k.quarantine_prefix(), "/myha/quarantine/");
    }

    #[test]
    fn prefix_normalisation() {
        for p in ["/myha", "/myha/", "myha", "myha//", " /myha/ "] {
            assert_eq!(Keys::new(p).prefix(), "/myha", "{p:?}");
            assert_eq!(Keys::new(p).cell("z"), "/myha/cells/z", "{p:?}");
        }
        assert_eq!(Keys::new("/a/b/").tablet("z-1"), "/a/b/tablets/z-1");
        for p in ["", "/", "//", " / ", "/\u{b}/"] {
            assert_eq!(Keys::new(p).prefix(), "", "{p:?}");
            assert_eq!(Keys::new(p).tablets_prefix(), "/tablets/", "{p:?}");
            assert_eq!(Keys::new(p).root(), "/", "{p:?}");
        }
    }

    /// Found by fuzzing (myha-fuzzing, etcd_records): `/myha\u{b}/` normalised to `/myha\u{b}`
    /// (the whitespace was trimmed before the slash), which normalises again to `/myha`: the
    /// same configured text named two prefixes depending on how often it was normalised.
    #[test]
    fn prefix_normalisation_is_idempotent() {
        for p in [
            "/myha\u{b}/",
            "/myha /",
            "/myha/ /",
            " myha \t/\n",
            "/a b/ ",
        ] {
            let once = Keys::new(p);
            assert_eq!(Keys::new(once.prefix()), once, "{p:?}");
            assert!(!once.prefix().ends_with(char::is_whitespace), "{p:?}");
        }
        assert_eq!(Keys::new("/myha /").prefix(), "/myha");
        assert_eq!(Keys::new("/a b/ ").prefix(), "/a b");
    }

    #[test]
    fn scan_prefixes_do_not_leak_into_neighbours() {
        let k = Keys::new("/myha");
        assert!(!k
            .shard("commerce2", "0")
            .starts_with(&k.shards_prefix("commerce")));
        assert!(k
            .shard("commerce", "0")
            .starts_with(&k.shards_prefix("commerce")));
        assert!(!k
            .audit("commerce2", "0", 1, 0)
            .starts_with(&k.audit_keyspace_prefix("commerce")));
        assert!(!k
            .audit("commerce", "0-80", 1, 0)
            .starts_with(&k.audit_prefix("commerce", "0")));
        assert!(!k
            .lock_owner("commerce", "0-80", 1)
            .starts_with(&k.lock_prefix("commerce", "0")));
        assert!(k
            .lock_owner("commerce", "0", 1)
            .starts_with(&k.lock_prefix("commerce", "0")));
        // Another cluster whose prefix extends ours is not inside ours.
        let other = Keys::new("/myha2");
        assert!(!other.tablet("z-1").starts_with(&k.root()));
        assert!(!other.tablet("z-1").starts_with(&k.tablets_prefix()));
        for p in [
            k.cells_prefix(),
            k.keyspaces_prefix(),
            k.all_shards_prefix(),
            k.tablets_prefix(),
            k.quarantine_prefix(),
            k.root(),
        ] {
            assert!(p.ends_with('/') && !p.ends_with("//"), "{p}");
        }
    }

    #[test]
    fn key_parsing() {
        let k = Keys::default();
        assert_eq!(
            k.parse_tablet_key("/myha/tablets/zone1-101"),
            Some("zone1-101")
        );
        assert_eq!(k.parse_tablet_key("/myha/tablets/"), None);
        assert_eq!(k.parse_tablet_key("/other/tablets/zone1-101"), None);
        assert_eq!(
            k.parse_shard_key("/myha/shards/commerce/-80"),
            Some(("commerce", "-80"))
        );
        assert_eq!(k.parse_shard_key("/myha/shards/commerce"), None);
        assert_eq!(k.parse_shard_key("/myha/shards/commerce/0/x"), None);
        assert_eq!(
            k.parse_quarantine_key("/myha/quarantine/zone1-101"),
            Some("zone1-101")
        );
        assert_eq!(k.parse_quarantine_key("/myha/quarantine/"), None);
        assert_eq!(k.parse_quarantine_key("/myha/tablets/zone1-101"), None);
    }

    #[test]
    fn names() {
        assert!(validate_name("keyspace", "commerce").is_ok());
        assert!(validate_name("shard", "-80").is_ok());
        assert!(validate_name("shard", "").is_err());
        assert!(validate_name("keyspace", "a/b")
            .unwrap_err()
            .contains("'/'"));
        assert!(validate_name("cell", "a b").is_err());
    }

    #[test]
    fn range_end() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff"), vec![0]);
        assert_eq!(prefix_range_end(b""), vec![0]);
    }
}
