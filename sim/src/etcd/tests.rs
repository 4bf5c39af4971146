use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn at(s: u64) -> SimTime {
    SimTime::ZERO + secs(s)
}

fn store() -> Etcd {
    Etcd::new(EtcdConfig::default(), SimTime::ZERO)
}

fn prefix(p: &str) -> KeyRange {
    KeyRange::Prefix(p.to_string())
}

/// Every (watch, revision, events) output queued so far.
fn watch_outputs(etcd: &mut Etcd) -> Vec<(WatchId, Revision, Vec<Event>)> {
    etcd.drain_outputs()
        .into_iter()
        .map(|o| match o {
            Output::Watch {
                watch,
                revision,
                events,
            } => (watch, revision, events),
        })
        .collect()
}

#[test]
fn put_get_delete_keep_etcd_revisions() {
    let mut e = store();
    assert_eq!(e.revision(), 1, "an empty etcd is at revision 1");
    let r = e.put("/a", "1", None, at(0)).unwrap();
    assert_eq!((r.revision, r.prev), (2, None));
    let r = e.put("/a", "2", None, at(0)).unwrap();
    assert_eq!(r.revision, 3);
    assert_eq!(r.prev.map(|p| p.value), Some(b"1".to_vec()));
    e.put("/b", "x", None, at(0)).unwrap();
    let a = e.get("/a", at(0)).kv.unwrap();
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version, a.value),
        (2, 3, 2, b"2".to_vec())
    );
    // Deleting a missing key changes nothing, not even the revision.
    let d = e.delete("/missing", at(0));
    assert_eq!((d.revision, d.prev), (4, None));
    let d = e.delete("/a", at(0));
    assert_eq!(d.revision, 5);
    assert!(d.prev.is_some());
    assert_eq!(e.get("/a", at(0)).kv, None);
    // Re-created: a new create revision, version 1.
    e.put("/a", "3", None, at(0)).unwrap();
    let a = e.get("/a", at(0)).kv.unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (6, 6, 1));
    let keys: Vec<String> = e
        .range(&prefix("/"), at(0))
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, vec!["/a", "/b"]);
    assert_eq!(e.range(&KeyRange::Key("/b".into()), at(0)).kvs.len(), 1);
    assert_eq!(e.range(&prefix("/c"), at(0)).kvs.len(), 0);
}

#[test]
fn txn_compares_every_target_and_op() {
    let mut e = store();
    e.put("/k", "m", None, at(0)).unwrap(); // rev 2
    e.put("/k", "n", None, at(0)).unwrap(); // rev 3, version 2
    let lease = e.grant(secs(10), at(0));
    e.put("/l", "v", Some(lease.id), at(0)).unwrap(); // rev 4
    let cases: Vec<(Compare, bool)> = vec![
        (Compare::create_revision("/k", CompareOp::Equal, 2), true),
        (
            Compare::create_revision("/k", CompareOp::NotEqual, 2),
            false,
        ),
        (Compare::create_revision("/k", CompareOp::Less, 3), true),
        (Compare::create_revision("/k", CompareOp::Greater, 2), false),
        (Compare::mod_revision("/k", CompareOp::Equal, 3), true),
        (Compare::mod_revision("/k", CompareOp::Equal, 2), false),
        (Compare::mod_revision("/k", CompareOp::Greater, 2), true),
        (Compare::mod_revision("/k", CompareOp::Less, 3), false),
        (Compare::version("/k", CompareOp::Equal, 2), true),
        (Compare::version("/k", CompareOp::NotEqual, 2), false),
        (Compare::version("/k", CompareOp::Less, 3), true),
        (Compare::value("/k", CompareOp::Equal, "n"), true),
        (Compare::value("/k", CompareOp::Equal, "m"), false),
        (Compare::value("/k", CompareOp::NotEqual, "m"), true),
        (Compare::value("/k", CompareOp::Greater, "m"), true),
        (Compare::value("/k", CompareOp::Less, "m"), false),
        (Compare::lease("/l", CompareOp::Equal, lease.id), true),
        (Compare::lease("/k", CompareOp::Equal, 0), true),
        (Compare::lease("/k", CompareOp::Equal, lease.id), false),
        // A missing key: revisions, version and lease are 0; a value compare always fails.
        (Compare::create_revision("/none", CompareOp::Equal, 0), true),
        (Compare::version("/none", CompareOp::Equal, 0), true),
        (Compare::mod_revision("/none", CompareOp::Greater, 0), false),
        (Compare::lease("/none", CompareOp::Equal, lease.id), false),
        (Compare::value("/none", CompareOp::Equal, ""), false),
        (Compare::value("/none", CompareOp::NotEqual, "x"), false),
    ];
    for (compare, expected) in cases {
        let rev = e.revision();
        let txn = Txn::new()
            .when([compare.clone()])
            .and_then([TxnOp::get("/k")])
            .or_else([TxnOp::get("/l")]);
        let resp = e.txn(txn, at(0)).unwrap();
        assert_eq!(resp.succeeded, expected, "{compare:?}");
        let read = resp.kvs()[0].key.clone();
        assert_eq!(read, if expected { "/k" } else { "/l" });
        assert_eq!(
            resp.revision, rev,
            "a read-only txn does not move the revision"
        );
    }
    // All compares must hold.
    let txn = Txn::new()
        .when([
            Compare::version("/k", CompareOp::Equal, 2),
            Compare::version("/k", CompareOp::Equal, 3),
        ])
        .and_then([TxnOp::put("/x", "s", None)])
        .or_else([TxnOp::put("/x", "f", None)]);
    let resp = e.txn(txn, at(0)).unwrap();
    assert!(!resp.succeeded);
    assert_eq!(e.get("/x", at(0)).kv.unwrap().value, b"f".to_vec());
}

#[test]
fn txn_ops_apply_at_one_revision_in_order_or_not_at_all() {
    let mut e = store();
    e.put("/a", "0", None, at(0)).unwrap();
    let w = e.watch(prefix("/"), 0, at(0)).unwrap();
    let txn = Txn::new().and_then([
        TxnOp::put("/b", "1", None),
        TxnOp::get("/b"),
        TxnOp::delete("/a"),
        TxnOp::put("/c", "2", None),
    ]);
    let resp = e.txn(txn, at(0)).unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.revision, 3);
    assert_eq!(
        resp.kvs()[0].mod_revision,
        3,
        "a get sees the branch's earlier put"
    );
    let out = watch_outputs(&mut e);
    assert_eq!(out.len(), 1);
    let (watch, rev, events) = &out[0];
    assert_eq!((*watch, *rev), (w, 3));
    let got: Vec<(EventKind, &str)> = events.iter().map(|e| (e.kind, e.kv.key.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (EventKind::Put, "/b"),
            (EventKind::Delete, "/a"),
            (EventKind::Put, "/c")
        ]
    );

    // Refused requests change nothing.
    let dup = Txn::new().and_then([TxnOp::put("/d", "1", None), TxnOp::delete("/d")]);
    assert_eq!(e.txn(dup, at(0)), Err(EtcdError::DuplicateKey("/d".into())));
    let bad_lease =
        Txn::new().and_then([TxnOp::put("/d", "1", None), TxnOp::put("/e", "1", Some(77))]);
    assert_eq!(e.txn(bad_lease, at(0)), Err(EtcdError::LeaseNotFound(77)));
    assert_eq!(
        e.put("/d", "1", Some(77), at(0)),
        Err(EtcdError::LeaseNotFound(77))
    );
    assert_eq!(e.revision(), 3);
    assert_eq!(e.get("/d", at(0)).kv, None);
    assert!(watch_outputs(&mut e).is_empty());
}

#[test]
fn leases_round_up_renew_expire_and_revoke() {
    let mut e = store();
    assert_eq!(
        e.grant(Duration::from_millis(100), at(0)).ttl,
        secs(2),
        "raised to the minimum"
    );
    assert_eq!(
        e.grant(Duration::from_millis(4200), at(0)).ttl,
        secs(5),
        "whole seconds"
    );
    let mut e = store();
    let a = e.grant(secs(5), at(0));
    let b = e.grant(secs(5), at(0));
    e.put("/a1", "", Some(a.id), at(0)).unwrap();
    e.put("/a2", "", Some(a.id), at(0)).unwrap();
    e.put("/b", "", Some(b.id), at(0)).unwrap();
    e.put("/plain", "", None, at(0)).unwrap();
    // A put without a lease detaches the key.
    e.put("/a2", "", None, at(0)).unwrap();
    assert_eq!(e.poll_timeout(), Some(at(5)));
    assert_eq!(e.keep_alive(b.id, at(3)).unwrap().ttl, secs(5));
    assert_eq!(e.time_to_live(b.id, at(4)), Some(secs(4)));
    assert_eq!(e.poll_timeout(), Some(at(5)));
    e.watch(prefix("/"), 0, at(4)).unwrap();
    let rev = e.revision();
    e.handle_timeout(at(5));
    // a expired at 5 s: its one attached key deleted at one new revision.
    assert_eq!(e.revision(), rev + 1);
    assert_eq!(e.get("/a1", at(5)).kv, None);
    assert!(e.get("/a2", at(5)).kv.is_some());
    assert_eq!(
        e.keep_alive(a.id, at(5)),
        Err(EtcdError::LeaseNotFound(a.id))
    );
    assert_eq!(e.poll_timeout(), Some(at(8)));
    // A keep-alive that comes after the deadline fails even if the timer was not fired.
    assert_eq!(
        e.keep_alive(b.id, at(8)),
        Err(EtcdError::LeaseNotFound(b.id))
    );
    assert_eq!(e.get("/b", at(8)).kv, None);
    let deleted: Vec<(Revision, String)> = watch_outputs(&mut e)
        .into_iter()
        .flat_map(|(_, rev, evs)| evs.into_iter().map(move |ev| (rev, ev.kv.key)))
        .collect();
    assert_eq!(
        deleted,
        vec![(rev + 1, "/a1".to_string()), (rev + 2, "/b".to_string())]
    );

    let c = e.grant(secs(5), at(9));
    e.put("/c1", "", Some(c.id), at(9)).unwrap();
    e.put("/c2", "", Some(c.id), at(9)).unwrap();
    let rev = e.revision();
    assert_eq!(e.revoke(c.id, at(9)), Ok(rev + 1));
    assert_eq!(e.range(&prefix("/c"), at(9)).kvs.len(), 0);
    assert_eq!(e.revoke(c.id, at(9)), Err(EtcdError::LeaseNotFound(c.id)));
    assert_eq!(e.poll_timeout(), None);
}

#[test]
fn watches_deliver_every_event_in_revision_order_from_their_start() {
    let mut e = store();
    e.put("/w/a", "1", None, at(0)).unwrap(); // 2
    e.put("/other", "1", None, at(0)).unwrap(); // 3
    e.put("/w/b", "1", None, at(0)).unwrap(); // 4
                                              // From a past revision: replayed at once, one output per revision, only the range's keys.
    let past = e.watch(prefix("/w/"), 2, at(0)).unwrap();
    let key = e.watch(KeyRange::Key("/w/a".into()), 1, at(0)).unwrap();
    let now_on = e.watch(prefix("/w/"), 0, at(0)).unwrap();
    let future = e.watch(prefix("/w/"), 7, at(0)).unwrap();
    e.put("/w/a", "2", None, at(0)).unwrap(); // 5
    e.delete("/w/b", at(0)); // 6
    e.put("/other", "2", None, at(0)).unwrap(); // 7
    e.put("/w/c", "1", None, at(0)).unwrap(); // 8
    assert!(e.cancel_watch(key));
    assert!(!e.cancel_watch(key));
    e.put("/w/a", "3", None, at(0)).unwrap(); // 9
    let out = watch_outputs(&mut e);
    let revs =
        |w: WatchId| -> Vec<Revision> { out.iter().filter(|o| o.0 == w).map(|o| o.1).collect() };
    assert_eq!(revs(past), vec![2, 4, 5, 6, 8, 9]);
    assert_eq!(revs(key), vec![2, 5]);
    assert_eq!(revs(now_on), vec![5, 6, 8, 9]);
    assert_eq!(revs(future), vec![8, 9]);
    for (_, rev, events) in &out {
        assert!(events.iter().all(|ev| ev.revision() == *rev));
    }
    let del = &out.iter().find(|o| o.0 == now_on && o.1 == 6).unwrap().2[0];
    assert_eq!(del.kind, EventKind::Delete);
    assert_eq!(
        (del.kv.key.as_str(), del.kv.mod_revision, del.kv.version),
        ("/w/b", 6, 0)
    );
    let put = &out.iter().find(|o| o.0 == now_on && o.1 == 5).unwrap().2[0];
    assert_eq!(
        (
            put.kind,
            put.kv.create_revision,
            put.kv.version,
            put.kv.value.as_slice()
        ),
        (EventKind::Put, 2, 2, b"2".as_slice())
    );
}

#[test]
fn watching_below_the_compaction_floor_fails_with_compacted() {
    let mut e = store();
    for i in 0..5 {
        e.put("/k", format!("{i}"), None, at(0)).unwrap(); // revisions 2..=6
    }
    e.compact(4, at(0)).unwrap();
    assert_eq!(e.compact_revision(), 4);
    assert_eq!(
        e.watch(prefix("/"), 3, at(0)),
        Err(EtcdError::Compacted {
            requested: 3,
            compact_revision: 4
        })
    );
    let w = e.watch(prefix("/"), 4, at(0)).unwrap();
    let revs: Vec<Revision> = watch_outputs(&mut e).into_iter().map(|o| o.1).collect();
    assert_eq!(revs, vec![4, 5, 6]);
    assert!(
        e.watch(prefix("/"), 0, at(0)).is_ok(),
        "from now is always fine"
    );
    assert_eq!(
        e.compact(4, at(0)),
        Err(EtcdError::Compacted {
            requested: 4,
            compact_revision: 4
        })
    );
    assert_eq!(
        e.compact(7, at(0)),
        Err(EtcdError::FutureRevision {
            requested: 7,
            current: 6
        })
    );
    // A live watch is not affected by a later compaction.
    e.compact(6, at(0)).unwrap();
    e.put("/k", "x", None, at(0)).unwrap();
    assert!(watch_outputs(&mut e).iter().any(|o| o.0 == w && o.1 == 7));
}

#[test]
fn requests_through_handle() {
    let mut e = store();
    let Ok(Response::Lease(lease)) = e.handle(Request::Grant { ttl: secs(3) }, at(0)) else {
        panic!("grant");
    };
    let put = Request::Put {
        key: "/k".into(),
        value: b"v".to_vec(),
        lease: Some(lease.id),
    };
    assert!(matches!(
        e.handle(put, at(0)),
        Ok(Response::Put(PutResponse { revision: 2, .. }))
    ));
    assert!(matches!(
        e.handle(Request::Get { key: "/k".into() }, at(1)),
        Ok(Response::Get(GetResponse { kv: Some(_), .. }))
    ));
    assert!(matches!(
        e.handle(Request::KeepAlive { lease: lease.id }, at(2)),
        Ok(Response::Lease(_))
    ));
    assert_eq!(
        e.handle(Request::Revoke { lease: lease.id }, at(2)),
        Ok(Response::Revoked(3))
    );
    assert_eq!(
        e.handle(Request::KeepAlive { lease: lease.id }, at(2)),
        Err(EtcdError::LeaseNotFound(lease.id))
    );
    assert_eq!(
        e.handle(Request::Compact { revision: 2 }, at(2)),
        Ok(Response::Compacted)
    );
}

// ----- The lock recipe -----

const LOCK: &str = "/myha/locks/ks/0/";
const SHARD: &str = "/myha/shards/ks/0";

fn two_contenders(e: &mut Etcd) -> (ShardLockRecipe, Contender, Contender) {
    let lock = ShardLockRecipe::new(LOCK);
    let l1 = e.grant(secs(10), at(0));
    let l2 = e.grant(secs(10), at(0));
    let c1 = lock.enter(e, l1.id, "orc-1", at(0)).unwrap();
    let c2 = lock.enter(e, l2.id, "orc-2", at(0)).unwrap();
    (lock, c1, c2)
}

#[test]
fn two_contenders_one_holder() {
    let mut e = store();
    let (lock, c1, c2) = two_contenders(&mut e);
    assert_eq!(c1.key, format!("{LOCK}{:x}", c1.lease));
    assert!(c1.epoch < c2.epoch);
    assert!(lock.holds(&mut e, &c1, at(1)));
    assert!(!lock.holds(&mut e, &c2, at(1)));
    assert_eq!(
        lock.holder(&mut e, at(1)).map(|kv| kv.key),
        Some(c1.key.clone())
    );
    assert_eq!(
        lock.predecessor(&mut e, &c2, at(1)).map(|kv| kv.key),
        Some(c1.key.clone())
    );
    // Entering again with the same lease finds the same key and epoch.
    assert_eq!(lock.enter(&mut e, c2.lease, "orc-2", at(1)).unwrap(), c2);
    // Releasing hands the lock on.
    lock.release(&mut e, &c1, at(2)).unwrap();
    assert!(lock.holds(&mut e, &c2, at(2)));
    lock.release(&mut e, &c1, at(2)).unwrap();
}

#[test]
fn holder_lease_expiry_hands_the_lock_to_the_next() {
    let mut e = store();
    let (lock, c1, c2) = two_contenders(&mut e);
    // c2 waits as topo does: a watch on its predecessor from the next revision.
    let pred = lock.predecessor(&mut e, &c2, at(0)).unwrap();
    let rev = e.revision();
    let w = e
        .watch(KeyRange::Key(pred.key.clone()), rev + 1, at(0))
        .unwrap();
    // c1 dies (no keep-alive); c2 keeps its lease alive.
    let mut t = 0;
    while t < 12 {
        t += 3;
        e.keep_alive(c2.lease, at(t)).unwrap();
    }
    assert_eq!(e.get(&c1.key, at(t)).kv, None);
    let out = watch_outputs(&mut e);
    assert!(out
        .iter()
        .any(|o| o.0 == w && o.2.iter().any(|ev| ev.kind == EventKind::Delete)));
    assert!(lock.holds(&mut e, &c2, at(t)));
    assert!(!lock.holds(&mut e, &c1, at(t)));
    assert_eq!(
        lock.holder(&mut e, at(t)).map(|kv| kv.key),
        Some(c2.key.clone())
    );
}

#[test]
fn a_write_conditional_on_a_lost_lock_fails() {
    let mut e = store();
    let (lock, c1, _c2) = two_contenders(&mut e);
    let rev = lock
        .write_under_lock(&mut e, &c1, SHARD, "term 1", None, at(1))
        .unwrap();
    assert_eq!(e.get(SHARD, at(1)).kv.unwrap().mod_revision, rev);
    // The lease expires (10 s after the grant at 0).
    assert_eq!(
        lock.write_under_lock(&mut e, &c1, SHARD, "term 2", None, at(10)),
        Err(LockError::LockLost {
            key: c1.key.clone()
        })
    );
    // Also with a record revision that would match: the lock comes first.
    assert_eq!(
        lock.write_under_lock(&mut e, &c1, SHARD, "term 2", Some(rev), at(10)),
        Err(LockError::LockLost {
            key: c1.key.clone()
        })
    );
    assert_eq!(e.get(SHARD, at(10)).kv.unwrap().value, b"term 1".to_vec());
}

#[test]
fn a_write_conditional_on_the_records_mod_revision_fails_after_another_write() {
    let mut e = store();
    let (lock, c1, _c2) = two_contenders(&mut e);
    let rev = lock
        .write_under_lock(&mut e, &c1, SHARD, "term 1", None, at(1))
        .unwrap();
    // Someone else (a bootstrap, an operator) writes the record.
    let other = e
        .put(SHARD, "term 1, edited", None, at(2))
        .unwrap()
        .revision;
    assert_eq!(
        lock.write_under_lock(&mut e, &c1, SHARD, "term 2", Some(rev), at(3)),
        Err(LockError::Conflict {
            key: SHARD.to_string(),
            expected: rev
        })
    );
    assert_eq!(
        e.get(SHARD, at(3)).kv.unwrap().value,
        b"term 1, edited".to_vec()
    );
    // With the record's current revision it goes through.
    let now_rev = lock
        .write_under_lock(&mut e, &c1, SHARD, "term 2", Some(other), at(3))
        .unwrap();
    assert_eq!(e.get(SHARD, at(3)).kv.unwrap().mod_revision, now_rev);
}

// ----- Seeded random history -----

/// The content of a range as a key → key-value map.
fn content(e: &mut Etcd, range: &KeyRange, now: SimTime) -> BTreeMap<String, KeyValue> {
    e.range(range, now)
        .kvs
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect()
}

/// Applies one watch output to a replica map; checks the output's own invariants.
fn apply(
    map: &mut BTreeMap<String, KeyValue>,
    last_rev: &mut Revision,
    rev: Revision,
    events: &[Event],
) {
    assert!(rev > *last_rev, "revision {rev} after {last_rev}");
    *last_rev = rev;
    assert!(!events.is_empty());
    for ev in events {
        assert_eq!(ev.revision(), rev);
        match ev.kind {
            EventKind::Put => {
                map.insert(ev.kv.key.clone(), ev.kv.clone());
            }
            EventKind::Delete => {
                assert!(
                    map.remove(&ev.kv.key).is_some(),
                    "delete of a key never put: {ev:?}"
                );
            }
        }
    }
}

fn random_history(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let config = EtcdConfig {
        min_lease_ttl: secs(1),
    };
    let mut e = Etcd::new(config, SimTime::ZERO);
    let range = prefix("/r/");
    let from_start = e.watch(range.clone(), 0, SimTime::ZERO).unwrap();
    let mut replica = BTreeMap::new();
    let mut replica_rev = 0;
    // A second watcher that joins late, as topo's PrefixWatch does: read the range, then watch
    // from the next revision.
    let mut late: Option<(WatchId, BTreeMap<String, KeyValue>, Revision)> = None;
    let mut leases: Vec<LeaseId> = Vec::new();
    let key = |rng: &mut StdRng| -> String {
        if rng.random_bool(0.1) {
            "/s/outside".to_string()
        } else {
            format!("/r/{}", rng.random_range(0..6))
        }
    };
    let mut now = SimTime::ZERO;
    let mut expired_some = false;
    for step in 0..2000 {
        now += Duration::from_millis(rng.random_range(0..300));
        let rev_before = e.revision();
        match rng.random_range(0..10) {
            0..=2 => {
                let lease = if rng.random_bool(0.5) && !leases.is_empty() {
                    Some(leases[rng.random_range(0..leases.len())])
                } else {
                    None
                };
                let k = key(&mut rng);
                match e.put(k, format!("v{step}"), lease, now) {
                    Ok(r) => assert_eq!(r.revision, e.revision()),
                    // A lease from the list that has since expired.
                    Err(EtcdError::LeaseNotFound(_)) => {}
                    Err(err) => panic!("{err}"),
                }
            }
            3 => {
                let k = key(&mut rng);
                e.delete(&k, now);
            }
            4..=5 => {
                let k = key(&mut rng);
                let kv = e.get(&k, now).kv;
                let op = [
                    CompareOp::Equal,
                    CompareOp::NotEqual,
                    CompareOp::Less,
                    CompareOp::Greater,
                ][rng.random_range(0..4)];
                let probe = kv.as_ref().map_or(0, |kv| kv.mod_revision) + rng.random_range(-1..=1);
                let compare = match rng.random_range(0..4) {
                    0 => Compare::create_revision(k.as_str(), op, probe),
                    1 => Compare::mod_revision(k.as_str(), op, probe),
                    2 => Compare::version(k.as_str(), op, rng.random_range(0..3)),
                    _ => Compare::value(
                        k.as_str(),
                        op,
                        format!("v{}", rng.random_range(0..step + 1)),
                    ),
                };
                let expected = compare.holds(kv.as_ref());
                let (a, b) = (key(&mut rng), key(&mut rng));
                let mut success = vec![TxnOp::put(a.as_str(), format!("t{step}"), None)];
                if b != a {
                    success.push(TxnOp::delete(b.as_str()));
                }
                let failure = vec![TxnOp::delete(a.as_str()), TxnOp::get(b.as_str())];
                let resp = e
                    .txn(
                        Txn::new()
                            .when([compare])
                            .and_then(success)
                            .or_else(failure),
                        now,
                    )
                    .unwrap();
                assert_eq!(resp.succeeded, expected);
                if resp.succeeded {
                    assert_eq!(
                        e.get(&a, now).kv.map(|kv| kv.mod_revision),
                        Some(resp.revision)
                    );
                } else {
                    assert_eq!(e.get(&a, now).kv, None);
                }
            }
            6 => leases.push(
                e.grant(Duration::from_millis(rng.random_range(500..4000)), now)
                    .id,
            ),
            7 => {
                if !leases.is_empty() {
                    let id = leases[rng.random_range(0..leases.len())];
                    let _ = e.keep_alive(id, now);
                }
            }
            8 => {
                if !leases.is_empty() && rng.random_bool(0.3) {
                    let id = leases.swap_remove(rng.random_range(0..leases.len()));
                    let _ = e.revoke(id, now);
                } else {
                    let before = e.poll_timeout();
                    e.handle_timeout(now);
                    expired_some |= before.is_some_and(|t| t <= now);
                }
            }
            _ => {
                if rng.random_bool(0.2) && e.revision() > e.compact_revision() {
                    let floor = rng.random_range(e.compact_revision() + 1..=e.revision());
                    e.compact(floor, now).unwrap();
                }
            }
        }
        assert!(e.revision() >= rev_before, "the revision never goes back");
        if step == 700 {
            let snap = e.range(&range, now);
            let w = e.watch(range.clone(), snap.revision + 1, now).unwrap();
            let map = snap
                .kvs
                .into_iter()
                .map(|kv| (kv.key.clone(), kv))
                .collect();
            late = Some((w, map, snap.revision));
        }
        for (w, rev, events) in watch_outputs(&mut e) {
            if w == from_start {
                apply(&mut replica, &mut replica_rev, rev, &events);
            } else if let Some((lw, map, last)) = &mut late {
                assert_eq!(w, *lw);
                apply(map, last, rev, &events);
            }
            assert!(events.iter().all(|ev| range.contains(&ev.kv.key)));
        }
    }
    // Let every lease run out.
    now += secs(10);
    e.handle_timeout(now);
    for (w, rev, events) in watch_outputs(&mut e) {
        if w == from_start {
            apply(&mut replica, &mut replica_rev, rev, &events);
        } else if let Some((_, map, last)) = &mut late {
            apply(map, last, rev, &events);
        }
    }
    assert!(expired_some, "seed {seed}: no lease expired during the run");
    assert!(e.compact_revision() > 0, "seed {seed}: never compacted");
    let state = content(&mut e, &range, now);
    assert!(state.values().all(|kv| kv.lease.is_none()));
    assert_eq!(replica, state, "seed {seed}: watcher from the start");
    let (_, late_map, _) = late.unwrap();
    assert_eq!(late_map, state, "seed {seed}: late watcher");
}

#[test]
fn seeded_random_history_replays_to_the_store_state() {
    for seed in 0..20 {
        random_history(seed);
    }
}
