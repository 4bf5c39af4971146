//! Network faults on real processes (loopback, iptables rules of [`harness::net`]): links that
//! go silent without a reset. Scenario P20 of the fault catalog.
//!
//! The tests share the machine with everything else: they run one at a time (`SERIAL`).

use std::time::{Duration, Instant};
use topo::Term;

use harness::net::LinkDrop;
use harness::{Writer, WriterOptions};
use myha_tests::ha::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// P20: the primary's mysqld TCP port silently dropped. Its agent still reaches it over the
/// local socket (and reaches etcd), so the orchestrator sees it healthy; every replica's probe
/// and replication stream have lost it. Expected: failover within the silent-host bound, the
/// old primary fenced by its own agent, and after the heal it rejoins or is quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p20_primary_cut_off_from_every_replica_fails_over_and_is_fenced() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    // An insert stuck on the cut primary is given up after 1 s (then the record is re-read).
    let w = Writer::start(
        &c,
        WriterOptions {
            attempt_timeout: Duration::from_secs(1),
            ..WriterOptions::default()
        },
    )
    .await
    .expect("writer starts");
    w.wait_more_acks(20, BOUND).await.expect("acks before");
    let old = alias_of(&c, 0);
    let cut = LinkDrop::port(c.tablet(0).mysqld().port()).expect("iptables rule");
    let fault_at = Instant::now();
    w.mark_fault();
    println!("dropping {}", cut.describe());

    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    let e = reparent_entry(&c, rec.term).await;
    println!("{}", audit_line(&e));
    assert!(
        e.detail.contains("isolated"),
        "not failed over as an isolated primary: {}",
        audit_line(&e)
    );
    // Fenced by its own agent on the new term (checked over the local socket).
    wait_ok(
        &c,
        "the cut-off old primary to be read-only",
        BOUND,
        || async {
            match read_only(c.tablet(0)).await {
                Ok(true) => Ok(()),
                Ok(false) => Err("still writable".to_string()),
                Err(e) => Err(e),
            }
        },
    )
    .await;
    println!(
        "old primary fenced {:.3} s after the cut",
        fault_at.elapsed().as_secs_f64()
    );

    // Heal: it rejoins as a replica of the new primary, or is quarantined with the reason.
    cut.heal().expect("heal");
    let new = c
        .tablet_by_alias(rec.primary.as_deref().unwrap_or_default())
        .expect("the new primary is a tablet");
    wait_ok(
        &c,
        "the old primary to rejoin or be quarantined",
        BOUND,
        || async {
            if replicates_from(c.tablet(0), new).await.is_ok() {
                return Ok(());
            }
            let s = shard_json(o, &c).await;
            let quarantined = problems(&s)
                .iter()
                .any(|(code, t, _)| code == "quarantined" && t.as_deref() == Some(old.as_str()));
            if quarantined {
                Ok(())
            } else {
                Err(format!("neither: {}", problems(&s).len()))
            }
        },
    )
    .await;
    w.verify(&c).await;
}
