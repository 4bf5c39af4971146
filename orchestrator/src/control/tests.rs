use super::*;

fn entry(at_ms: u64, action: &str, outcome: &str) -> AuditEntry {
    AuditEntry {
        at_ms,
        term: Term::new(1),
        actor: "orchestrator@test:1".into(),
        action: action.into(),
        tablet: None,
        outcome: outcome.into(),
        detail: String::new(),
        duration_ms: None,
    }
}

const MIN: u64 = 60_000;

#[test]
fn flapping_counts_successful_reparents_within_the_window() {
    let window = Duration::from_secs(600);
    let now = 100 * MIN;
    let ers = |at| entry(at, ACTION_EMERGENCY_REPARENT, OUTCOME_OK);
    // Two reparents: below the limit of 3 (a second failure right after one is recovered).
    let two = vec![ers(now - 5 * MIN), ers(now - MIN)];
    assert_eq!(flapping(&two, None, now, 3, window), None);
    // A third one within the window: flapping.
    let mut three = two.clone();
    three.push(ers(now - 1000));
    let f = flapping(&three, None, now, 3, window).expect("flapping");
    assert_eq!((f.count, f.limit, f.window_ms), (3, 3, 600_000));
    assert_eq!((f.since_ms, f.last_ms), (now - 5 * MIN, now - 1000));
    let reason = f.reason("ks", "0");
    assert!(
        reason.contains("flapping") && reason.contains("ack ks/0"),
        "{reason}"
    );
    assert!(reason.contains("10m"), "{reason}");
    // Order does not matter.
    three.reverse();
    assert!(flapping(&three, None, now, 3, window).is_some());
}

#[test]
fn flapping_ignores_old_failed_and_other_entries() {
    let window = Duration::from_secs(600);
    let now = 100 * MIN;
    let entries = vec![
        entry(now - 11 * MIN, ACTION_EMERGENCY_REPARENT, OUTCOME_OK), // outside the window
        entry(now - 2 * MIN, ACTION_EMERGENCY_REPARENT, "failed"),
        entry(now - 2 * MIN, ACTION_EMERGENCY_REPARENT, "refused"),
        entry(now - 2 * MIN, ACTION_EMERGENCY_REPARENT, "skipped"),
        entry(now - 2 * MIN, "promote", OUTCOME_OK), // a step, not a summary
        entry(now - 2 * MIN, "replica_not_replicating", OUTCOME_OK),
        entry(now - MIN, ACTION_EMERGENCY_REPARENT, OUTCOME_OK),
        entry(now - 10 * MIN, ACTION_EMERGENCY_REPARENT, OUTCOME_OK), // exactly at the edge: in
    ];
    assert_eq!(flapping(&entries, None, now, 3, window), None);
    let f = flapping(&entries, None, now, 2, window).expect("2 in the window");
    assert_eq!(f.count, 2);
    assert_eq!(f.since_ms, now - 10 * MIN);
    assert_eq!(
        flapping(&entries, None, now, 0, window),
        None,
        "limit 0: never"
    );
}

#[test]
fn ack_resets_the_count() {
    let window = Duration::from_secs(600);
    let now = 100 * MIN;
    let ers = |at| entry(at, ACTION_EMERGENCY_REPARENT, OUTCOME_OK);
    let entries = vec![ers(now - 4 * MIN), ers(now - 3 * MIN), ers(now - 2 * MIN)];
    assert!(flapping(&entries, None, now, 3, window).is_some());
    // Acknowledged after the third: nothing counts.
    assert_eq!(
        flapping(&entries, Some(now - 2 * MIN), now, 3, window),
        None
    );
    // Acknowledged between: only the later ones count.
    assert_eq!(
        flapping(&entries, Some(now - 3 * MIN - 1), now, 2, window).map(|f| f.count),
        Some(2)
    );
    let mut more = entries.clone();
    more.push(ers(now - MIN));
    more.push(ers(now - 500));
    let f = flapping(&more, Some(now - 2 * MIN), now, 2, window).expect("2 after the ack");
    assert_eq!(f.acked_at_ms, Some(now - 2 * MIN));
    assert_eq!(f.count, 2);
}

fn raw(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[test]
fn control_state_decodes_the_watched_keys() {
    let keys = Keys::new("/myha");
    let control = raw(&[
        (
            "/myha/control/recoveries",
            r#"{"disabled":false,"reason":"","at_ms":1,"by":"op"}"#,
        ),
        (
            "/myha/control/shards/ks/0",
            r#"{"disabled":true,"reason":"maintenance","at_ms":5,"by":"alice","acked_at_ms":7}"#,
        ),
        (
            "/myha/control/shards/ks/-80",
            r#"{"disabled":false,"acked_at_ms":9}"#,
        ),
        ("/myha/control/shards/ks/bad", "not json"),
    ]);
    let quarantine = raw(&[(
        "/myha/quarantine/zone1-103",
        r#"{"reason":"errant 0-103-1","at_ms":3,"term":2}"#,
    )]);
    let keyspaces = raw(&[
        (
            "/myha/keyspaces/ks",
            r#"{"name":"ks","durability":"semi_sync"}"#,
        ),
        (
            "/myha/keyspaces/other",
            r#"{"name":"other","durability":"none"}"#,
        ),
    ]);
    let st = ControlState::from_raw(&keys, &control, &quarantine, &keyspaces, true);
    assert!(st.synced);
    assert_eq!(st.global.as_ref().map(|g| g.disabled), Some(false));
    assert_eq!(st.shards.len(), 2, "{:?}", st.shards);
    assert_eq!(st.durability("ks"), Some(Durability::SemiSync));
    assert_eq!(st.durability("other"), Some(Durability::None));
    assert_eq!(st.durability("nope"), None);
    assert_eq!(st.acked_at_ms("ks", "0"), Some(7));
    assert_eq!(st.acked_at_ms("ks", "-80"), Some(9));
    assert_eq!(st.acked_at_ms("ks", "80-"), None);
    let r = st.disabled_reason("ks", "0").expect("disabled");
    assert!(
        r.contains("alice") && r.contains("maintenance") && r.contains("ks/0"),
        "{r}"
    );
    assert_eq!(st.disabled_reason("ks", "-80"), None);
    let q = st.quarantined(["zone1-101", "zone1-103"]);
    assert_eq!(q.len(), 1);
    assert!(q["zone1-103"].contains("errant 0-103-1"), "{q:?}");

    // Global wins, and names who and why.
    let control = raw(&[(
        "/myha/control/recoveries",
        r#"{"disabled":true,"reason":"incident 42","at_ms":1,"by":"bob"}"#,
    )]);
    let st = ControlState::from_raw(&keys, &control, &BTreeMap::new(), &BTreeMap::new(), false);
    let r = st.disabled_reason("ks", "-80").expect("disabled globally");
    assert!(
        r.contains("globally") && r.contains("bob") && r.contains("incident 42"),
        "{r}"
    );
    assert!(!st.synced);
}

#[test]
fn keys_follow_the_layout() {
    let keys = Keys::new("/p");
    assert_eq!(global_key(&keys), "/p/control/recoveries");
    assert_eq!(shard_key(&keys, "ks", "-80"), "/p/control/shards/ks/-80");
    assert_eq!(
        quarantine_key(&keys, "zone1-101"),
        "/p/quarantine/zone1-101"
    );
    assert_eq!(control_prefix(&keys), "/p/control/");
    assert_eq!(quarantine_prefix(&keys), "/p/quarantine/");
}

#[test]
fn records_round_trip() {
    let r = ControlRecord {
        disabled: true,
        reason: "x".into(),
        at_ms: 1,
        by: "me".into(),
        acked_at_ms: None,
    };
    let json = serde_json::to_string(&r).expect("encodes");
    assert!(!json.contains("acked_at_ms"), "{json}");
    assert_eq!(
        serde_json::from_str::<ControlRecord>(&json).expect("decodes"),
        r
    );
    let q = QuarantineRecord {
        reason: "errant".into(),
        at_ms: 2,
        term: Term::new(3),
        by: None,
    };
    let json = serde_json::to_string(&q).expect("encodes");
    assert_eq!(json, r#"{"reason":"errant","at_ms":2,"term":3}"#);
}

#[test]
fn operator_requested_reparents_do_not_count_as_flapping() {
    let window = Duration::from_secs(600);
    let now = 100 * MIN;
    let by_operator = |at| AuditEntry {
        actor: "operator:alice@orchestrator@test:1".into(),
        ..entry(at, ACTION_EMERGENCY_REPARENT, OUTCOME_OK)
    };
    let entries = vec![
        by_operator(now - 3 * MIN),
        by_operator(now - 2 * MIN),
        by_operator(now - MIN),
        entry(
            now - MIN,
            crate::recovery::ACTION_PLANNED_REPARENT,
            OUTCOME_OK,
        ),
    ];
    assert_eq!(flapping(&entries, None, now, 1, window), None);
    assert!(!counts_for_flapping(&entries[0]));
    assert!(counts_for_flapping(&entry(
        now,
        ACTION_EMERGENCY_REPARENT,
        OUTCOME_OK
    )));
}
