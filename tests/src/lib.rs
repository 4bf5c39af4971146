//! Shared helpers of the failure tests (`tests/tests/failover.rs`, `tests/tests/repairs.rs`) and
//! the failover benchmark (`tests/benches/failover.rs`): a cluster with an orchestrator on short
//! TTLs, waiting on the shard record, reading the orchestrator's API and audit log, and checking
//! the shard's replication topology on the real mysqld. `bench` holds what the benchmarks share
//! (percentiles, arguments, HAProxy, sysbench).

pub mod bench;
pub mod chaos;

/// Runs the future `make` returns to completion on a two-worker runtime, polled on a thread
/// of its own with a 16 MiB stack. For the longest scenarios (one async fn driving a whole
/// cluster through many steps): in a debug build the frame of such a future's poll function
/// outgrew the 2 MiB of a test thread (a stack overflow at start) once the clients it holds
/// carried TLS state. A panic inside is re-raised here, so the test fails with its message.
pub fn block_on_big_stack<F, Fut>(make: F) -> Fut::Output
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future,
    Fut::Output: Send + 'static,
{
    let scenario = std::thread::Builder::new()
        .name("scenario".into())
        .stack_size(16 << 20)
        .spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(make())
        })
        .expect("spawn the scenario's thread");
    match scenario.join() {
        Ok(out) => out,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

pub mod ha {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use harness::{
        global_var, slave_status, Cluster, ClusterOptions, OrchestratorProc, Tablet, Writer,
        WriterOptions,
    };
    use mysql_async::prelude::Queryable;
    use serde_json::Value;
    use topo::{AuditEntry, ShardRecord, Term};

    /// The bound for anything the orchestrator has to do (never a timing assertion).
    pub const BOUND: Duration = Duration::from_secs(15);

    /// The orchestrator's leases (its shard locks) in tests: a killed orchestrator's lock
    /// expires after this.
    pub const ORCH_LEASE_TTL: Duration = Duration::from_secs(3);

    /// How long "no failover" must hold: well past the agent lease (2 s), the health staleness
    /// (1.5 s) and the orchestrator's lock TTL (3 s).
    pub const NO_FAILOVER_WINDOW: Duration = Duration::from_secs(8);

    pub async fn writer(c: &Cluster) -> Writer {
        let w = Writer::start(c, WriterOptions::default())
            .await
            .expect("writer starts");
        w.wait_more_acks(20, BOUND)
            .await
            .expect("the writer gets acks before the fault");
        w
    }

    /// After a fault marked on `w`: a new primary (not `old`) at a newer term, the first ack after
    /// the fault from it, every running tablet but `skip` replicating from it. Prints the times.
    ///
    /// The tests mark a primary's fault once it is in effect (a killed mysqld reaped, a frozen one
    /// with every thread stopped): an insert sent after the mark can then only be acknowledged by
    /// a successor, whereas one sent between a mark and the kill may still be acknowledged by the
    /// old primary.
    pub async fn expect_failover(
        c: &Cluster,
        w: &Writer,
        old: &str,
        old_term: Term,
        skip: &[&str],
    ) -> ShardRecord {
        let fault = w.fault().expect("fault marked");
        let (rec, _) = wait_new_primary(c, old, old_term, BOUND).await;
        let record_after = Duration::from_millis(rec.term_start_ms.saturating_sub(fault.at_ms));
        let (ack, unavailable) = w
            .wait_ack_after(fault.at, BOUND)
            .await
            .unwrap_or_else(|e| panic!("no write acknowledged after the failover: {e}"));
        assert_eq!(
            Some(ack.tablet.as_str()),
            rec.primary.as_deref(),
            "the first ack after the fault came from {} (term {}), not the new primary {:?}",
            ack.tablet,
            ack.term,
            rec.primary
        );
        let mut skips: Vec<&str> = skip.to_vec();
        skips.push(old);
        let healthy = wait_shard_healthy(c, &skips, BOUND).await;
        println!(
            "failover {old} -> {:?} term {} -> {}: new shard record {:.3} s after the fault, \
             first acknowledged write {:.3} s after the fault; replicas repointed {:.3} s later",
            rec.primary,
            old_term,
            rec.term,
            record_after.as_secs_f64(),
            unavailable.as_secs_f64(),
            healthy.as_secs_f64()
        );
        rec
    }

    /// The emergency reparent's summary entry (outcome ok) of `term`, from the audit log.
    pub async fn reparent_entry(c: &Cluster, term: Term) -> topo::AuditEntry {
        let start = Instant::now();
        loop {
            let a = audit(c).await;
            if let Some(e) = a
                .iter()
                .find(|e| e.action == "emergency_reparent" && e.outcome == "ok" && e.term == term)
            {
                return e.clone();
            }
            if start.elapsed() > BOUND {
                panic!(
                    "no successful emergency_reparent audit entry for term {term}:\n{}",
                    audit_text(&a)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn alias_of(c: &Cluster, i: usize) -> String {
        c.tablet(i).alias().to_string()
    }

    /// The summary entry of a refused emergency reparent after `since_ms`.
    pub async fn refused_reparent(c: &Cluster, since_ms: u64) -> topo::AuditEntry {
        let start = Instant::now();
        loop {
            let a = audit(c).await;
            if let Some(e) = a.iter().find(|e| {
                e.action == "emergency_reparent" && e.outcome == "refused" && e.at_ms >= since_ms
            }) {
                return e.clone();
            }
            assert!(
                start.elapsed() < BOUND,
                "no refused emergency_reparent in the audit log:\n{}",
                audit_text(&a)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A cluster of `tablets` (semi_sync) with one orchestrator on short TTLs.
    pub fn ha_options(tablets: usize) -> ClusterOptions {
        ClusterOptions {
            tablets,
            start_orchestrator: true,
            orchestrator_config: Some(Arc::new(|cfg: &mut harness::OrchestratorConfig| {
                cfg.etcd.lease_ttl = ORCH_LEASE_TTL;
                cfg.recovery.lock_ttl = ORCH_LEASE_TTL;
            })),
            ..ClusterOptions::default()
        }
    }

    /// [`ha_options`] with `more` applied to each orchestrator's config after its short TTLs.
    pub fn ha_options_with(
        tablets: usize,
        more: impl Fn(&mut harness::OrchestratorConfig) + Send + Sync + 'static,
    ) -> ClusterOptions {
        ClusterOptions {
            orchestrator_config: Some(Arc::new(move |cfg: &mut harness::OrchestratorConfig| {
                cfg.etcd.lease_ttl = ORCH_LEASE_TTL;
                cfg.recovery.lock_ttl = ORCH_LEASE_TTL;
                more(cfg);
            })),
            ..ha_options(tablets)
        }
    }

    pub async fn start(opts: ClusterOptions) -> Cluster {
        let started = Instant::now();
        let c = Cluster::start(opts).await.expect("cluster starts");
        println!("cluster up in {:.1} s", started.elapsed().as_secs_f64());
        c
    }

    pub fn orch(c: &Cluster) -> &OrchestratorProc {
        c.orchestrator()
            .expect("cluster started with an orchestrator")
    }

    pub async fn record(c: &Cluster) -> ShardRecord {
        c.topo()
            .get_shard(c.keyspace(), c.shard())
            .await
            .expect("read shard record")
            .expect("shard record exists")
            .0
    }

    /// Polls the shard record (every 10 ms) until `pred` holds; returns it and how long it took.
    pub async fn wait_record(
        c: &Cluster,
        what: &str,
        bound: Duration,
        pred: impl Fn(&ShardRecord) -> bool,
    ) -> (ShardRecord, Duration) {
        let start = Instant::now();
        let mut last: Option<String>;
        loop {
            match c.topo().get_shard(c.keyspace(), c.shard()).await {
                Ok(Some((r, _))) if pred(&r) => return (r, start.elapsed()),
                Ok(r) => last = Some(format!("{r:?}")),
                Err(e) => last = Some(format!("etcd: {e}")),
            }
            if start.elapsed() > bound {
                panic!(
                    "{what}: not within {bound:?}; last shard record: {}\n{}",
                    last.unwrap_or_default(),
                    diagnostics(c).await
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for a new term naming a primary other than `old_primary`, with no reparent marked
    /// in progress.
    pub async fn wait_new_primary(
        c: &Cluster,
        old_primary: &str,
        old_term: Term,
        bound: Duration,
    ) -> (ShardRecord, Duration) {
        wait_record(c, "a new primary in the shard record", bound, |r| {
            r.term > old_term
                && r.primary.is_some()
                && r.primary.as_deref() != Some(old_primary)
                && r.reparent_in_progress.is_none()
        })
        .await
    }

    /// Asserts the shard record stays as `expected` (primary and term) for `window`.
    pub async fn assert_record_stays(c: &Cluster, expected: &ShardRecord, window: Duration) {
        let start = Instant::now();
        while start.elapsed() < window {
            let r = record(c).await;
            assert!(
                r.term == expected.term && r.primary == expected.primary,
                "the shard record changed after {:?} (expected primary {:?} term {}): {r:?}\n{}",
                start.elapsed(),
                expected.primary,
                expected.term,
                diagnostics(c).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /api/v1/shards`, this cluster's shard.
    pub async fn shard_json(o: &OrchestratorProc, c: &Cluster) -> Value {
        let all = o.shards().await.expect("GET /api/v1/shards");
        all["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["keyspace"] == c.keyspace() && s["shard"] == c.shard())
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The problems the orchestrator reports for this shard: (code, tablet, detail).
    pub fn problems(shard: &Value) -> Vec<(String, Option<String>, String)> {
        shard["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["code"].as_str().unwrap_or_default().to_string(),
                    p["tablet"].as_str().map(str::to_string),
                    p["detail"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// Waits until the orchestrator reports a problem `code` (for `tablet`, when given);
    /// returns its detail and the shard JSON.
    pub async fn wait_problem(
        o: &OrchestratorProc,
        c: &Cluster,
        code: &str,
        tablet: Option<&str>,
        bound: Duration,
    ) -> (String, Value) {
        wait_any_problem(o, c, &[code], tablet, bound).await
    }

    /// Waits until the orchestrator reports one of `codes` (for `tablet`, when given); returns
    /// its detail and the shard JSON. Right after a recovery the analysis may still show the
    /// recovered problem for a round, so assertions on what follows a recovery must poll.
    pub async fn wait_any_problem(
        o: &OrchestratorProc,
        c: &Cluster,
        codes: &[&str],
        tablet: Option<&str>,
        bound: Duration,
    ) -> (String, Value) {
        let code = codes.join("|");
        let start = Instant::now();
        let mut last: Value;
        loop {
            match o.shards().await {
                Ok(all) => {
                    let s = all["shards"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|s| s["keyspace"] == c.keyspace() && s["shard"] == c.shard())
                        .cloned()
                        .unwrap_or(Value::Null);
                    let hit = problems(&s).into_iter().find(|(cd, t, _)| {
                        codes.contains(&cd.as_str())
                            && tablet.is_none_or(|want| t.as_deref() == Some(want))
                    });
                    if let Some((_, _, detail)) = hit {
                        return (detail, s);
                    }
                    last = s;
                }
                Err(e) => last = Value::String(e.to_string()),
            }
            if start.elapsed() > bound {
                panic!(
                    "problem {code} ({tablet:?}) not reported within {bound:?}; last shard: {}\n{}",
                    serde_json::to_string(&last).unwrap_or_default(),
                    diagnostics(c).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The shard's audit log, oldest first.
    pub async fn audit(c: &Cluster) -> Vec<AuditEntry> {
        let mut v = c
            .topo()
            .list_audit(c.keyspace(), Some(c.shard()), 0)
            .await
            .expect("read audit log");
        v.reverse();
        v
    }

    /// Polls the shard's audit log (oldest first) until `pred` holds and returns it. The
    /// orchestrator appends its entries in the background, after the change they describe is
    /// already visible, so an entry may only land a moment after its effect.
    pub async fn wait_audit(
        c: &Cluster,
        what: &str,
        bound: Duration,
        pred: impl Fn(&[AuditEntry]) -> bool,
    ) -> Vec<AuditEntry> {
        let start = Instant::now();
        loop {
            let a = audit(c).await;
            if pred(&a) {
                return a;
            }
            if start.elapsed() > bound {
                panic!(
                    "{what}: not in the audit log within {bound:?}:\n{}",
                    audit_text(&a)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn audit_line(e: &AuditEntry) -> String {
        format!(
            "{} term={} {} {} {:?} {} ({}){}",
            e.at_ms,
            e.term,
            e.actor,
            e.action,
            e.tablet,
            e.outcome,
            e.detail,
            e.duration_ms
                .map(|d| format!(" {d} ms"))
                .unwrap_or_default()
        )
    }

    /// The first entry of `entries` matching `pred`, printed; panics with `what` and the whole
    /// log when there is none.
    pub fn audited<'a>(
        entries: &'a [AuditEntry],
        what: &str,
        pred: impl Fn(&AuditEntry) -> bool,
    ) -> &'a AuditEntry {
        let e = entries
            .iter()
            .find(|e| pred(e))
            .unwrap_or_else(|| panic!("{what}:\n{}", audit_text(entries)));
        println!("{}", audit_line(e));
        e
    }

    pub fn audit_text(entries: &[AuditEntry]) -> String {
        entries
            .iter()
            .map(audit_line)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Record, audit log, API view and each tablet's SQL state, for failure messages.
    pub async fn diagnostics(c: &Cluster) -> String {
        let mut out = String::new();
        if let Ok(Some((r, _))) = c.topo().get_shard(c.keyspace(), c.shard()).await {
            out.push_str(&format!("shard record: {r:?}\n"));
        }
        if let Ok(mut a) = c.topo().list_audit(c.keyspace(), Some(c.shard()), 30).await {
            a.reverse();
            out.push_str(&format!("audit (newest 30):\n{}\n", audit_text(&a)));
        }
        if let Some(o) = c.orchestrator() {
            if let Ok(v) = tokio::time::timeout(Duration::from_secs(3), o.shards()).await {
                match v {
                    Ok(v) => out.push_str(&format!(
                        "api: {}\n",
                        serde_json::to_string(&v).unwrap_or_default()
                    )),
                    Err(e) => out.push_str(&format!("api: {e}\n")),
                }
            }
        }
        for t in c.tablets() {
            out.push_str(&format!("{}: {}\n", t.alias(), sql_state(t).await));
        }
        out
    }

    /// One line about a tablet's mysqld: read_only, source, threads, GTID position.
    pub async fn sql_state(t: &Tablet) -> String {
        if !t.mysqld().is_running() {
            return "mysqld not running".into();
        }
        let fut = async {
            let mut c = t.root_conn().await.map_err(|e| e.to_string())?;
            let ro = global_var(&mut c, "read_only")
                .await
                .map_err(|e| e.to_string())?;
            let pos = global_var(&mut c, "gtid_current_pos")
                .await
                .map_err(|e| e.to_string())?;
            let st = slave_status(&mut c).await.map_err(|e| e.to_string())?;
            let _ = c.disconnect().await;
            let repl = match st {
                None => "no source".to_string(),
                Some(s) => format!(
                    "source {}:{} io={} sql={} {}{}",
                    col(&s, "Master_Host"),
                    col(&s, "Master_Port"),
                    col(&s, "Slave_IO_Running"),
                    col(&s, "Slave_SQL_Running"),
                    col(&s, "Last_IO_Error"),
                    col(&s, "Last_SQL_Error"),
                ),
            };
            Ok::<_, String>(format!("read_only={ro:?} pos={pos:?} {repl}"))
        };
        match tokio::time::timeout(Duration::from_secs(2), fut).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "no answer within 2 s (frozen?)".into(),
        }
    }

    pub fn col(s: &HashMap<String, Option<String>>, name: &str) -> String {
        s.get(name).cloned().flatten().unwrap_or_default()
    }

    /// `@@read_only` of a tablet (root over the socket, 2 s bound).
    pub async fn read_only(t: &Tablet) -> Result<bool, String> {
        let fut = async {
            let mut c = t.root_conn().await.map_err(|e| e.to_string())?;
            let v = global_var(&mut c, "read_only")
                .await
                .map_err(|e| e.to_string())?;
            let _ = c.disconnect().await;
            Ok(matches!(v.as_deref(), Some("1") | Some("ON")))
        };
        tokio::time::timeout(Duration::from_secs(2), fut)
            .await
            .unwrap_or_else(|_| Err("no answer within 2 s".into()))
    }

    /// One SQL statement as root on a tablet.
    pub async fn sql(t: &Tablet, stmt: &str) {
        let mut c = t.root_conn().await.expect("root conn");
        c.query_drop(stmt)
            .await
            .unwrap_or_else(|e| panic!("{}: `{stmt}`: {e}", t.alias()));
        let _ = c.disconnect().await;
    }

    /// The tablet replicates from `source` with both threads running.
    pub async fn replicates_from(t: &Tablet, source: &Tablet) -> Result<(), String> {
        let fut = async {
            let mut c = t.root_conn().await.map_err(|e| e.to_string())?;
            let st = slave_status(&mut c).await.map_err(|e| e.to_string())?;
            let _ = c.disconnect().await;
            let s = st.ok_or_else(|| "no replication source".to_string())?;
            let port = col(&s, "Master_Port");
            let (io, sqlt) = (col(&s, "Slave_IO_Running"), col(&s, "Slave_SQL_Running"));
            if port != source.mysqld().port().to_string() {
                return Err(format!(
                    "replicates from port {port}, not {} ({})",
                    source.mysqld().port(),
                    source.alias()
                ));
            }
            if io != "Yes" || sqlt != "Yes" {
                return Err(format!(
                    "io={io} sql={sqlt} {}{}",
                    col(&s, "Last_IO_Error"),
                    col(&s, "Last_SQL_Error")
                ));
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(2), fut)
            .await
            .unwrap_or_else(|_| Err("no answer within 2 s".into()))
    }

    /// Polls `check` (every 50 ms) until it is `Ok`; panics with the last error and the
    /// diagnostics after `bound`. Returns how long it took.
    pub async fn wait_ok<F, Fut>(c: &Cluster, what: &str, bound: Duration, check: F) -> Duration
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let start = Instant::now();
        loop {
            let last = match check().await {
                Ok(()) => return start.elapsed(),
                Err(e) => e,
            };
            if start.elapsed() > bound {
                panic!(
                    "{what}: not within {bound:?}: {last}\n{}",
                    diagnostics(c).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The scenarios' "writable": the record's primary is the only running tablet with
    /// read_only off, and every other running tablet (except `skip`) replicates from it.
    pub async fn shard_healthy(c: &Cluster, skip: &[&str]) -> Result<String, String> {
        let r = c
            .topo()
            .get_shard(c.keyspace(), c.shard())
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no shard record")?
            .0;
        let p_alias = r.primary.clone().ok_or("the record names no primary")?;
        if r.reparent_in_progress.is_some() {
            return Err(format!(
                "reparent in progress: {:?}",
                r.reparent_in_progress
            ));
        }
        let p = c
            .tablet_by_alias(&p_alias)
            .ok_or_else(|| format!("{p_alias} is not a tablet of this cluster"))?;
        for t in c.tablets() {
            if !t.mysqld().is_running() || skip.contains(&t.alias()) {
                continue;
            }
            let ro = read_only(t)
                .await
                .map_err(|e| format!("{}: {e}", t.alias()))?;
            if t.alias() == p_alias {
                if ro {
                    return Err(format!("primary {p_alias} is read-only"));
                }
            } else {
                if !ro {
                    return Err(format!("{} is writable but not the primary", t.alias()));
                }
                replicates_from(t, p)
                    .await
                    .map_err(|e| format!("{}: {e}", t.alias()))?;
            }
        }
        Ok(p_alias)
    }

    pub async fn wait_shard_healthy(c: &Cluster, skip: &[&str], bound: Duration) -> Duration {
        wait_ok(
            c,
            "the shard writable and every replica replicating from the primary",
            bound,
            || async { shard_healthy(c, skip).await.map(drop) },
        )
        .await
    }

    /// No failover for the window, `problem` (if any) reported about the primary, writes continue
    /// on the primary without a gap of 3 s or more.
    pub async fn expect_no_failover_writes_continue(
        c: &Cluster,
        w: &Writer,
        primary: &str,
        problem: Option<&str>,
    ) {
        let before = record(c).await;
        let fault = w.fault().expect("fault marked");
        if let Some(code) = problem {
            let (detail, _) = wait_problem(orch(c), c, code, Some(primary), BOUND).await;
            println!(
                "reported after {:.3} s: {code}: {detail}",
                fault.at.elapsed().as_secs_f64()
            );
        }
        let left = NO_FAILOVER_WINDOW.saturating_sub(fault.at.elapsed());
        assert_record_stays(c, &before, left).await;
        // Writes continued all along, on the same primary.
        w.wait_more_acks(20, Duration::from_secs(5))
            .await
            .expect("writes continue");
        let acks = w.acks();
        let after: Vec<_> = acks.iter().filter(|a| a.acked_at > fault.at).collect();
        assert!(
            after.iter().all(|a| a.tablet == primary),
            "a write after the fault was acked elsewhere than {primary}"
        );
        let mut gaps: Vec<Duration> = after
            .windows(2)
            .map(|p| p[1].acked_at.saturating_duration_since(p[0].acked_at))
            .collect();
        gaps.sort();
        let max_gap = gaps.last().copied().unwrap_or_default();
        println!(
            "{} writes acked by {primary} during the {:.1} s after the fault; longest gap {:.3} s",
            after.len(),
            fault.at.elapsed().as_secs_f64(),
            max_gap.as_secs_f64()
        );
        assert!(
            max_gap < Duration::from_secs(3),
            "writes stalled for {max_gap:?} although the primary was healthy"
        );
        assert!(
            !problems(&shard_json(orch(c), c).await)
                .iter()
                .any(|(code, _, _)| code.starts_with("dead_primary")),
            "the primary was called dead"
        );
    }

    /// For `window` after the primary (tablet 0) died with etcd unavailable: tablets 1 and 2
    /// stay read-only, and the shard's recovery state in the orchestrator's API says why
    /// nothing happens (it names etcd or the shard lock). Returns what it said.
    pub async fn expect_no_promotion_without_etcd(c: &Cluster, window: Duration) -> String {
        let o = orch(c);
        let start = Instant::now();
        let mut reason = String::new();
        let mut last_api = String::new();
        while start.elapsed() < window {
            for i in [1, 2] {
                assert!(
                    read_only(c.tablet(i)).await.expect("replica answers"),
                    "{} was made writable while etcd was unavailable",
                    alias_of(c, i)
                );
            }
            match o.shards().await {
                Ok(all) => {
                    let why =
                        serde_json::to_string(&all["shards"][0]["recovery"]).unwrap_or_default();
                    if why.contains("etcd") || why.contains("shard lock") {
                        reason = why;
                    }
                    last_api = serde_json::to_string(&all).unwrap_or_default();
                }
                Err(e) => last_api = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            !reason.is_empty(),
            "the orchestrator does not show why it is not recovering (the shard's recovery \
             state in /api/v1/shards names neither etcd nor the shard lock); last answer: \
             {last_api}\n--- orchestrator log ---\n{}",
            harness::log_tail(o.log_path(), 30)
        );
        reason
    }

    /// After a deposed primary `old` comes back (resumed or healed at `since`): it rejoins as
    /// a replica of `new_primary` when everything it wrote is on the new primary, else it is
    /// quarantined with a reason. Prints which, and when.
    ///
    /// MariaDB positions keep only the last GTID per domain, so a transaction the new primary
    /// never had can hide behind its own higher sequence numbers: the binlog states are
    /// compared, which keep the last GTID per (domain, server).
    pub async fn expect_rejoin_or_quarantine(
        c: &Cluster,
        old: &Tablet,
        new_primary: &Tablet,
        since: Instant,
    ) {
        let mut oc = old.root_conn().await.expect("old primary conn");
        let old_pos = global_var(&mut oc, "gtid_binlog_state")
            .await
            .expect("old primary's binlog state")
            .unwrap_or_default();
        let mut nc = new_primary.root_conn().await.expect("new primary conn");
        let new_pos = global_var(&mut nc, "gtid_binlog_state")
            .await
            .expect("new primary's binlog state")
            .unwrap_or_default();
        let entries = |s: &str| -> Vec<(u32, u32, u64)> {
            s.split(',')
                .filter(|e| !e.trim().is_empty())
                .map(|e| {
                    let n: Vec<&str> = e.trim().split('-').collect();
                    let num = |i: usize| n.get(i).and_then(|v| v.parse::<u64>().ok());
                    match (num(0), num(1), num(2)) {
                        (Some(d), Some(srv), Some(seq)) => (d as u32, srv as u32, seq),
                        _ => panic!("bad GTID {e:?} in {s:?}"),
                    }
                })
                .collect()
        };
        let on_new = entries(&new_pos);
        let subset = entries(&old_pos).iter().all(|(d, srv, seq)| {
            on_new
                .iter()
                .any(|(d2, s2, q2)| d2 == d && s2 == srv && q2 >= seq)
        });
        println!("old primary at {old_pos}, new primary at {new_pos}: subset={subset}");
        if subset {
            let took = wait_ok(
                c,
                "the old primary to rejoin as a replica",
                BOUND,
                || async { replicates_from(old, new_primary).await },
            )
            .await;
            println!(
                "old primary rejoined as a replica {:.3} s after it came back ({:.3} s after \
                 the wait began)",
                since.elapsed().as_secs_f64(),
                took.as_secs_f64()
            );
            wait_shard_healthy(c, &[], BOUND).await;
        } else {
            let (detail, _) =
                wait_problem(orch(c), c, "quarantined", Some(old.alias()), BOUND).await;
            println!(
                "old primary quarantined {:.3} s after it came back: {detail}",
                since.elapsed().as_secs_f64()
            );
            assert!(!detail.trim().is_empty(), "quarantined without a reason");
        }
    }

    /// Waits (up to [`BOUND`]) until `t`'s mysqld is read-only; how long that took.
    pub async fn wait_read_only(c: &Cluster, t: &Tablet, what: &str) -> Duration {
        wait_ok(c, what, BOUND, || async {
            match read_only(t).await {
                Ok(true) => Ok(()),
                Ok(false) => Err("read_only is OFF".into()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// A write as `app` directly on a tablet, bounded: `Ok` only if it was acknowledged.
    pub async fn try_app_write(t: &Tablet, bound: Duration) -> Result<(), String> {
        let fut = async {
            let mut c = t.app_conn().await.map_err(|e| e.to_string())?;
            c.query_drop(
                "CREATE TABLE IF NOT EXISTS probe (id INT AUTO_INCREMENT PRIMARY KEY, at BIGINT)",
            )
            .await
            .map_err(|e| e.to_string())?;
            c.query_drop(format!(
                "INSERT INTO probe (at) VALUES ({})",
                topo::now_ms()
            ))
            .await
            .map_err(|e| e.to_string())?;
            Ok(())
        };
        tokio::time::timeout(bound, fut)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {bound:?}")))
    }

    /// `POST /api/v1/shards/{ks}/{shard}/reparent` of the cluster's shard.
    pub fn reparent_path(c: &Cluster) -> String {
        format!("/api/v1/shards/{}/{}/reparent", c.keyspace(), c.shard())
    }

    /// Sends a reparent request (`body` as in design.md, the configured token) and reads its
    /// ndjson events to the end, each with its arrival time after the send. An answer other than
    /// 200 ndjson, a line that is not JSON or a broken stream is an error with what was read.
    pub async fn reparent_events(
        c: &Cluster,
        body: &Value,
        bound: Duration,
    ) -> Result<Vec<(Duration, Value)>, String> {
        let sent = Instant::now();
        let mut st = orch(c)
            .post_stream(&reparent_path(c), body, bound)
            .await
            .map_err(|e| format!("POST reparent {body}: {e}"))?;
        let status = st.status();
        let ndjson = st.content_type() == "application/x-ndjson";
        let mut events = Vec::new();
        let mut raw = String::new();
        while let Some(line) = st
            .next_line()
            .await
            .map_err(|e| format!("reparent {body}: stream broken after {raw:?}: {e}"))?
        {
            raw.push_str(&line);
            raw.push('\n');
            if status == 200 && ndjson {
                let v: Value = serde_json::from_str(&line)
                    .map_err(|e| format!("reparent {body}: not a JSON line ({e}): {line:?}"))?;
                events.push((sent.elapsed(), v));
            }
        }
        if status != 200 || !ndjson {
            return Err(format!(
                "reparent {body}: status {status}, not an event stream: {raw}"
            ));
        }
        Ok(events)
    }

    /// Waits until the orchestrator reports no problem for the shard (a clean start).
    pub async fn wait_quiet(o: &OrchestratorProc, c: &Cluster, bound: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let s = shard_json(o, c).await;
            let p = problems(&s);
            if s != Value::Null && p.is_empty() {
                return start.elapsed();
            }
            if start.elapsed() > bound {
                panic!(
                    "the orchestrator still reports problems after {bound:?}: {p:?}\n{}",
                    diagnostics(c).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The audit entries of one action kind (substring of `action`, case-insensitive).
    pub fn entries_with<'a>(entries: &'a [AuditEntry], action: &str) -> Vec<&'a AuditEntry> {
        let a = action.to_ascii_lowercase();
        entries
            .iter()
            .filter(|e| e.action.to_ascii_lowercase().contains(&a))
            .collect()
    }
}

/// What the gateway tests share: application connections through it, and its routing as the
/// orchestrator's changes reach it.
pub mod gw {
    use std::net::SocketAddr;
    use std::time::Duration;

    use harness::{Cluster, GatewayProc, Writer, WriterOptions};
    use mysql_async::OptsBuilder;
    use serde_json::Value;

    /// Connection options of the application user through `addr` (a gateway port).
    pub fn app_opts(c: &Cluster, addr: SocketAddr) -> OptsBuilder {
        let creds = c.credentials();
        OptsBuilder::default()
            .ip_or_hostname(addr.ip().to_string())
            .tcp_port(addr.port())
            .user(Some(creds.app_user.clone()))
            .pass(Some(creds.app_password.clone()))
            .db_name(Some(creds.database.clone()))
            // Never switch to the server's unix socket: that would bypass the gateway.
            .prefer_socket(false)
    }

    /// The aliases of a routing list (`ro` of `/routing`), sorted: comparisons ask which
    /// replicas, not in which order.
    pub fn aliases(list: &Value) -> Vec<String> {
        let mut v: Vec<String> = list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["alias"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Waits until `g` routes writes to tablet 0 and reads to tablets 1 and 2 (the cluster as
    /// started).
    pub async fn wait_shard_routes(c: &Cluster, g: &GatewayProc) {
        wait_routes(
            c,
            g,
            c.tablet(0).alias(),
            &[c.tablet(1).alias(), c.tablet(2).alias()],
            crate::ha::BOUND,
        )
        .await;
    }

    /// Once the gateway routes to the first primary and the orchestrator is quiet: a writer
    /// through the RW port with 50 writes acknowledged.
    pub async fn writer_through_rw(c: &Cluster, g: &GatewayProc) -> Writer {
        wait_shard_routes(c, g).await;
        crate::ha::wait_quiet(crate::ha::orch(c), c, crate::ha::BOUND).await;
        let rw = g.rw_addr().expect("the gateway has an RW listener");
        let w = Writer::start(
            c,
            WriterOptions {
                via: Some(rw),
                // Above the gateway's buffer window (5 s): a held connect is the point.
                connect_timeout: Duration::from_secs(10),
                max_duration: Duration::from_secs(120),
                ..WriterOptions::default()
            },
        )
        .await
        .expect("writer");
        w.wait_more_acks(50, crate::ha::BOUND)
            .await
            .expect("writes through the RW port");
        w
    }

    /// Waits (up to `bound`) until the gateway routes writes to `primary` and reads to exactly
    /// `replicas`; returns the shard's routing.
    pub async fn wait_routes(
        c: &Cluster,
        g: &GatewayProc,
        primary: &str,
        replicas: &[&str],
        bound: Duration,
    ) -> Value {
        let mut want: Vec<String> = replicas.iter().map(|s| s.to_string()).collect();
        want.sort();
        g.wait_shard_routing(
            c.keyspace(),
            c.shard(),
            &format!("rw {primary}, ro {want:?}"),
            bound,
            |s| s["rw"]["alias"] == primary && aliases(&s["ro"]) == want,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits (up to `bound`) until the gateway routes reads to no replica; returns the shard's
    /// routing.
    pub async fn wait_no_replicas(
        c: &Cluster,
        g: &GatewayProc,
        what: &str,
        bound: Duration,
    ) -> Value {
        g.wait_shard_routing(c.keyspace(), c.shard(), what, bound, |s| {
            aliases(&s["ro"]).is_empty()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// What the tests running `myhactl` share.
pub mod ctl {
    use std::process::Output;

    /// A finished command's status, stdout and stderr, for assertion messages.
    pub fn text(o: &Output) -> String {
        format!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}
