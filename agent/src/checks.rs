//! Health checks for load balancers (HAProxy `option httpchk`, ProxySQL, cloud LBs) on the
//! agent's HTTP listener, for users who route with their own proxy instead of myha-gateway.
//! Paths follow Patroni's where they exist: `/primary` and `/read-write`, `/replica`,
//! `/read-only`, `/health`. Pure: judged from the agent's last health and an explicit `now`.
//!
//! Invariant: `/primary` answers 200 only while the shard record this agent last read names
//! this tablet, its mysqld is writable, and the agent has not fenced it. A deposed primary
//! (fenced, or read-only after a newer term) therefore drops out of a write pool at the next
//! check, whatever its mysqld still accepts.

use std::time::Duration;

use myha_proto::agent as pb;
use serde::Serialize;

/// What a load balancer asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// mysqld answers the agent.
    Health,
    /// The shard's writable primary (`/primary`, `/read-write`).
    Primary,
    /// A replicating replica, within `max_lag` when given (`/replica`).
    Replica { max_lag: Option<Duration> },
    /// Anything that serves reads: the primary, or a replica as for `Replica` (`/read-only`).
    ReadOnly { max_lag: Option<Duration> },
}

impl Check {
    pub fn name(&self) -> &'static str {
        match self {
            Check::Health => "health",
            Check::Primary => "primary",
            Check::Replica { .. } => "replica",
            Check::ReadOnly { .. } => "read-only",
        }
    }
}

/// The answer: the HTTP status follows `ok` (200 or 503); the body is this, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub check: &'static str,
    pub ok: bool,
    /// Why (also when `ok`): what a person reading the LB's logs needs.
    pub reason: String,
    pub alias: String,
    /// `primary` or `replica` as the shard record says; `unknown` before it was read.
    pub role: &'static str,
    pub term: u64,
    pub mysql_reachable: bool,
    pub read_only: Option<bool>,
    pub fenced: bool,
    pub lag_ms: Option<u64>,
    /// How old the health judged is.
    pub age_ms: u64,
}

/// Parses `max_lag` (`"5s"`, `"500ms"`, or a number of seconds): the query parameter of
/// `/replica` and `/read-only`.
pub fn parse_max_lag(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        if (0.0..1e9).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(v).map_err(|e| {
        format!("max_lag {v:?}: {e} (a duration such as \"5s\" or \"500ms\", or seconds)")
    })
}

/// Judges `check` on the agent's last health `h`, polled at `h.polled_at_ms`; a health older
/// than `stale_after` at `now_ms` fails every check (the agent's poll loop is stuck, so nothing
/// it says is current).
pub fn judge(check: Check, h: &pb::Health, now_ms: u64, stale_after: Duration) -> Verdict {
    let age_ms = now_ms.saturating_sub(h.polled_at_ms);
    let role = match pb::TabletType::try_from(h.tablet_type) {
        Ok(pb::TabletType::Primary) => "primary",
        Ok(pb::TabletType::Replica) => "replica",
        _ => "unknown",
    };
    let read_only = h.mysql.as_ref().map(|m| m.read_only);
    let verdict = |ok: bool, reason: String| Verdict {
        check: check.name(),
        ok,
        reason,
        alias: h.alias.clone(),
        role,
        term: h.term,
        mysql_reachable: h.mysql_reachable,
        read_only,
        fenced: h.fenced,
        lag_ms: h.lag_ms,
        age_ms,
    };
    if u128::from(age_ms) > stale_after.as_millis() {
        return verdict(
            false,
            format!("the agent's last poll of mysqld is {age_ms} ms old (bound {stale_after:?})"),
        );
    }
    if !h.mysql_reachable {
        return verdict(false, format!("mysqld unreachable: {}", h.mysql_error));
    }
    let result = match check {
        Check::Health => Ok("mysqld answers".to_string()),
        Check::Primary => primary(h, role, read_only),
        Check::Replica { max_lag } => replica(h, role, max_lag),
        Check::ReadOnly { max_lag } => match primary(h, role, read_only) {
            Ok(why) => Ok(why),
            Err(not_primary) => replica(h, role, max_lag)
                .map_err(|not_replica| format!("{not_primary}; {not_replica}")),
        },
    };
    match result {
        Ok(why) => verdict(true, why),
        Err(why) => verdict(false, why),
    }
}

fn primary(h: &pb::Health, role: &str, read_only: Option<bool>) -> Result<String, String> {
    if h.fenced {
        return Err(format!("fenced: {}", h.fence_reason));
    }
    if role != "primary" {
        return Err(format!(
            "not the primary: the shard record names this tablet {role}"
        ));
    }
    match read_only {
        Some(false) => Ok(format!("the writable primary at term {}", h.term)),
        Some(true) => Err("named primary, but mysqld is read-only".into()),
        None => Err("named primary, read_only not known yet".into()),
    }
}

fn replica(h: &pb::Health, role: &str, max_lag: Option<Duration>) -> Result<String, String> {
    if role != "replica" {
        return Err(format!(
            "not a replica: the shard record names this tablet {role}"
        ));
    }
    let running = |s: i32| s == pb::ThreadState::Running as i32;
    let r = h.replication.as_ref();
    match r {
        Some(r) if r.configured && running(r.io_state) && running(r.sql_state) => {}
        Some(r) if r.configured => {
            return Err(format!(
                "replication not running (IO {:?}, SQL {:?}){}",
                pb::ThreadState::try_from(r.io_state).unwrap_or_default(),
                pb::ThreadState::try_from(r.sql_state).unwrap_or_default(),
                [&r.last_io_error, &r.last_sql_error]
                    .iter()
                    .filter(|e| !e.is_empty())
                    .map(|e| format!(": {e}"))
                    .collect::<String>()
            ))
        }
        _ => return Err("no replication configured".into()),
    }
    match (max_lag, h.lag_ms) {
        (None, _) => Ok("replicating".into()),
        (Some(max), Some(lag)) if u128::from(lag) <= max.as_millis() => {
            Ok(format!("replicating, {lag} ms behind (bound {max:?})"))
        }
        (Some(max), Some(lag)) => Err(format!("{lag} ms behind, above max_lag {max:?}")),
        (Some(_), None) => Err("lag unknown (no heartbeat from the primary measured)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(3);
    const NOW: u64 = 1_000_000;

    /// A fresh health of a reachable mysqld at term 3.
    fn health(alias: &str, role: pb::TabletType, read_only: bool) -> pb::Health {
        pb::Health {
            alias: alias.into(),
            tablet_type: role as i32,
            polled_at_ms: NOW - 100,
            mysql_reachable: true,
            mysql: Some(pb::MysqlStatus {
                read_only,
                ..Default::default()
            }),
            term: 3,
            ..Default::default()
        }
    }

    fn primary_health() -> pb::Health {
        health("zone1-101", pb::TabletType::Primary, false)
    }

    fn replica_health(lag_ms: Option<u64>) -> pb::Health {
        pb::Health {
            replication: Some(pb::Replication {
                configured: true,
                io_state: pb::ThreadState::Running as i32,
                sql_state: pb::ThreadState::Running as i32,
                ..Default::default()
            }),
            lag_ms,
            ..health("zone1-102", pb::TabletType::Replica, true)
        }
    }

    fn ok(check: Check, h: &pb::Health) -> bool {
        judge(check, h, NOW, STALE).ok
    }

    #[test]
    fn the_writable_named_primary_is_primary_and_nothing_else_is() {
        let p = primary_health();
        assert!(ok(Check::Primary, &p));
        assert!(ok(Check::ReadOnly { max_lag: None }, &p));
        assert!(ok(Check::Health, &p));
        assert!(!ok(Check::Replica { max_lag: None }, &p));
        // Fenced, read-only, or not named: out of the write pool, each with its reason.
        let mut fenced = p.clone();
        fenced.fenced = true;
        fenced.fence_reason = "term 4 names zone1-102".into();
        let v = judge(Check::Primary, &fenced, NOW, STALE);
        assert!(
            !v.ok && v.reason.contains("term 4 names zone1-102"),
            "{v:?}"
        );
        let mut ro = p.clone();
        ro.mysql = Some(pb::MysqlStatus {
            read_only: true,
            ..Default::default()
        });
        assert!(!ok(Check::Primary, &ro));
        assert!(!ok(Check::Primary, &replica_health(Some(0))));
        let mut unknown = p.clone();
        unknown.tablet_type = 0;
        let v = judge(Check::Primary, &unknown, NOW, STALE);
        assert!(!v.ok && v.reason.contains("unknown"), "{v:?}");
    }

    #[test]
    fn replicas_pass_within_the_lag_bound_while_replicating() {
        let r = replica_health(Some(800));
        assert!(ok(Check::Replica { max_lag: None }, &r));
        assert!(ok(
            Check::Replica {
                max_lag: Some(Duration::from_secs(1))
            },
            &r
        ));
        let v = judge(
            Check::Replica {
                max_lag: Some(Duration::from_millis(500)),
            },
            &r,
            NOW,
            STALE,
        );
        assert!(!v.ok && v.reason.contains("800 ms behind"), "{v:?}");
        assert!(!ok(
            Check::Replica {
                max_lag: Some(Duration::from_secs(1))
            },
            &replica_health(None)
        ));
        let mut stopped = r.clone();
        if let Some(rep) = stopped.replication.as_mut() {
            rep.sql_state = pb::ThreadState::Stopped as i32;
            rep.last_sql_error = "Duplicate entry".into();
        }
        let v = judge(Check::ReadOnly { max_lag: None }, &stopped, NOW, STALE);
        assert!(!v.ok && v.reason.contains("Duplicate entry"), "{v:?}");
        assert!(!ok(Check::Primary, &r));
    }

    #[test]
    fn an_unreachable_mysqld_or_a_stale_poll_fails_everything() {
        let mut down = replica_health(Some(0));
        down.mysql_reachable = false;
        down.mysql_error = "Connection refused".into();
        for check in [
            Check::Health,
            Check::Primary,
            Check::Replica { max_lag: None },
            Check::ReadOnly { max_lag: None },
        ] {
            let v = judge(check, &down, NOW, STALE);
            assert!(!v.ok && v.reason.contains("Connection refused"), "{v:?}");
            let mut old = primary_health();
            old.polled_at_ms = NOW - 5_000;
            let v = judge(check, &old, NOW, STALE);
            assert!(!v.ok && v.reason.contains("5000 ms old"), "{v:?}");
        }
    }

    #[test]
    fn max_lag_parses_durations_and_seconds() {
        assert_eq!(parse_max_lag("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_max_lag("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_max_lag("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_max_lag("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_max_lag("-1").is_err());
        assert!(parse_max_lag("soon").unwrap_err().contains("max_lag"));
    }
}
