//! What the daemons read back from etcd: every record type decoded as `topo` decodes values
//! (`serde_json::from_slice`, in `Topo`'s reads and watches, tabletwatch and the orchestrator's
//! control watch), the orchestrator's control state built from raw watch contents, and the key
//! layout's parsers (`Keys::parse_*`, `parse_alias`, `validate_name`, `prefix_range_end`).
//!
//! Input: the whole input is a value; its lines are also read as keys, the first line being
//! the cluster prefix.

use std::collections::BTreeMap;

use myha_agent::fence::TermState;
use myha_orchestrator::control::{ControlRecord, ControlState};
use serde::de::DeserializeOwned;
use serde::Serialize;
use topo::{
    alias, parse_alias, prefix_range_end, validate_name, AuditEntry, CellRecord, Keys,
    KeyspaceRecord, LockInfo, PromotionRecord, QuarantineRecord, ShardRecord, TabletRecord, Term,
};

pub fn etcd_records(data: &[u8]) -> bool {
    let mut accepted = false;
    for ok in [
        record::<CellRecord>(data),
        record::<KeyspaceRecord>(data),
        record::<ShardRecord>(data),
        record::<PromotionRecord>(data),
        record::<LockInfo>(data),
        record::<AuditEntry>(data),
        record::<Term>(data),
        record::<ControlRecord>(data),
        // The agent's term state file, written and read back with the same encoding.
        record::<TermState>(data),
    ] {
        accepted |= ok;
    }
    if let Ok(t) = serde_json::from_slice::<TabletRecord>(data) {
        accepted |= round_trip(&t);
        // Consumers split the alias a registration names.
        let _ = parse_alias(&t.alias).map_err(|e| e.to_string());
    }
    if let Ok(q) = serde_json::from_slice::<QuarantineRecord>(data) {
        accepted |= round_trip(&q);
        let _ = q.describe();
    }
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let keys = Keys::new(lines.next().unwrap_or_default());
    // Normalisation is idempotent: a prefix read back from a config is the same prefix.
    assert_eq!(Keys::new(keys.prefix()), keys, "prefix {:?}", keys.prefix());
    let lines: Vec<&str> = lines.collect();
    for line in &lines {
        accepted |= key_parsers(&keys, line);
    }
    control_state(&keys, &lines, data);
    accepted
}

/// A record decodes as `topo` decodes it; what decodes encodes back to the same value.
fn record<T>(data: &[u8]) -> bool
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    match serde_json::from_slice::<T>(data) {
        Ok(v) => round_trip(&v),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

fn round_trip<T>(v: &T) -> bool
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_vec(v).expect("records encode");
    assert_eq!(
        serde_json::from_slice::<T>(&json).ok().as_ref(),
        Some(v),
        "{}",
        String::from_utf8_lossy(&json)
    );
    true
}

/// One line as a key and as a name: every parser is the inverse of its builder.
fn key_parsers(keys: &Keys, line: &str) -> bool {
    let mut accepted = false;
    if let Some(a) = keys.parse_tablet_key(line) {
        assert_eq!(keys.tablet(a), line);
        accepted = true;
    }
    if let Some(a) = keys.parse_quarantine_key(line) {
        assert_eq!(keys.quarantine(a), line);
        accepted = true;
    }
    if let Some((ks, shard)) = keys.parse_shard_key(line) {
        assert_eq!(keys.shard(ks, shard), line);
        accepted = true;
    }
    // Any single path segment is a tablet key's alias.
    let segment = !line.is_empty() && !line.contains('/');
    assert_eq!(
        keys.parse_tablet_key(&keys.tablet(line)),
        segment.then_some(line)
    );
    match parse_alias(line) {
        Ok((cell, uid)) => {
            assert_eq!(parse_alias(&alias(&cell, uid)), Ok((cell, uid)));
            accepted = true;
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if validate_name("shard", line).is_ok() {
        // A valid keyspace and shard name make a shard key that parses back to them.
        assert_eq!(
            keys.parse_shard_key(&keys.shard(line, line)),
            Some((line, line))
        );
    }
    // The end of a prefix scan is above every key that starts with the prefix.
    let end = prefix_range_end(line.as_bytes());
    if line.bytes().all(|b| b == 0xff) {
        assert_eq!(end, vec![0]);
    } else {
        let mut longest = line.as_bytes().to_vec();
        longest.extend_from_slice(&[0xff; 8]);
        assert!(line.as_bytes() < end.as_slice() && longest.as_slice() < end.as_slice());
    }
    accepted
}

/// The orchestrator's control state from raw watch contents: the input as the value of the
/// global and shard control keys, of a quarantine key and of a keyspace key, and of every line
/// read as a key.
fn control_state(keys: &Keys, lines: &[&str], value: &[u8]) {
    let mut control = BTreeMap::new();
    control.insert(myha_orchestrator::control::global_key(keys), value.to_vec());
    control.insert(
        myha_orchestrator::control::shard_key(keys, "commerce", "0"),
        value.to_vec(),
    );
    let mut quarantine = BTreeMap::new();
    quarantine.insert(keys.quarantine("zone1-101"), value.to_vec());
    let mut keyspaces = BTreeMap::new();
    keyspaces.insert(keys.keyspace("commerce"), value.to_vec());
    for line in lines {
        control.insert(line.to_string(), value.to_vec());
        quarantine.insert(line.to_string(), value.to_vec());
        keyspaces.insert(line.to_string(), value.to_vec());
    }
    let state = ControlState::from_raw(keys, &control, &quarantine, &keyspaces, true);
    let _ = state.disabled_reason("commerce", "0");
    let _ = state.acked_at_ms("commerce", "0");
    let _ = state.durability("commerce");
    let _ = state.quarantined(lines.iter().copied().chain(["zone1-101"]));
}
