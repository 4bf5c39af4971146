//! One recovery under the shard lock: the fresh shard, the term its actions run under, and the
//! typed, recorded, audited RPC steps.

use super::steps::{AgentAction, AgentApi, TopoApi};
use super::*;
use topo::{PromotionRecord, Term};

/// One recovery under the shard lock: the fresh shard, the term actions run under, and the
/// steps so far. Every typed RPC helper is one step: bounded, timed, recorded and audited.
#[derive(Debug)]
pub struct RecoveryContext {
    pub deps: Deps,
    pub keyspace: String,
    pub shard: String,
    /// The problem being recovered, as re-found under the lock.
    pub problem: Problem,
    pub job: Job,
    pub fresh: FreshShard,
    lock: ShardLock,
    /// The term actions run under unless they name another ([`RecoveryContext::act_at`] and
    /// the other `_at` helpers). Fixed for the whole run: a procedure that moves to a new
    /// term says so at every call, so no call's term depends on what ran before it.
    term: Term,
    /// The newest term any step of this run was audited under (a record of what happened,
    /// never an input to a call).
    newest: Mutex<Term>,
    steps: Mutex<Vec<StepRecord>>,
    started: Instant,
    observer: Option<StepObserver>,
}

impl RecoveryContext {
    pub fn new(deps: Deps, job: Job, problem: Problem, fresh: FreshShard, lock: ShardLock) -> Self {
        let term = fresh.action_term();
        RecoveryContext {
            deps,
            keyspace: job.keyspace.clone(),
            shard: job.shard.clone(),
            problem,
            job,
            fresh,
            lock,
            term,
            newest: Mutex::new(term),
            steps: Mutex::default(),
            started: Instant::now(),
            observer: None,
        }
    }

    /// Every step recorded from now on is also given to `observer`.
    pub fn with_observer(mut self, observer: StepObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn cfg(&self) -> &RecoveryConfig {
        &self.deps.cfg
    }

    /// The term actions run under unless they name another: [`FreshShard::action_term`].
    pub fn term(&self) -> Term {
        self.term
    }

    /// The newest term any step of this run was audited under (at least [`Self::term`]): a
    /// run that promoted at a new term, or acted under one before it failed, ends under it,
    /// and its summary is audited under it.
    pub fn newest_term(&self) -> Term {
        self.newest.lock().map(|t| *t).unwrap_or(self.term)
    }

    /// The held shard lock (for lock-conditional writes: [`ShardLock::update_shard`]).
    pub fn lock(&self) -> &ShardLock {
        &self.lock
    }

    pub fn durability(&self) -> Durability {
        self.fresh.durability
    }

    /// When the recovery started (after the lock was taken).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A registered tablet of the shard.
    pub fn tablet(&self, alias: &str) -> Result<&TabletRecord, RecoveryError> {
        self.fresh
            .tablets
            .get(alias)
            .ok_or_else(|| RecoveryError::UnknownTablet(alias.to_string()))
    }

    /// The fresh `FullStatus` of a tablet (None: its agent did not answer).
    pub fn status(&self, alias: &str) -> Option<&pb::Health> {
        self.fresh.statuses.get(alias)
    }

    /// The `ActionContext` of an action under `term` now.
    fn action_context(&self, term: Term, timeout: Duration) -> pb::ActionContext {
        pb::ActionContext {
            term: term.get(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            requester: self.deps.actor.to_string(),
            lock_epoch: self.lock.epoch(),
        }
    }

    /// The steps recorded so far.
    pub fn steps(&self) -> Vec<StepRecord> {
        self.steps.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Appends one entry to the shard's audit log under [`RecoveryContext::term`].
    pub fn audit(
        &self,
        action: &str,
        tablet: Option<&str>,
        outcome: &str,
        detail: impl Into<String>,
        duration: Option<Duration>,
    ) {
        self.audit_at(self.term(), action, tablet, outcome, detail, duration)
    }

    /// Appends one entry to the shard's audit log (queued; see [`AuditSink`]).
    pub fn audit_at(
        &self,
        term: Term,
        action: &str,
        tablet: Option<&str>,
        outcome: &str,
        detail: impl Into<String>,
        duration: Option<Duration>,
    ) {
        if let Ok(mut newest) = self.newest.lock() {
            *newest = (*newest).max(term);
        }
        self.deps.audit.append(
            &self.keyspace,
            &self.shard,
            AuditEntry {
                at_ms: topo::now_ms(),
                term,
                actor: self.deps.actor.to_string(),
                action: action.to_string(),
                tablet: tablet.map(str::to_string),
                outcome: outcome.to_string(),
                detail: detail.into(),
                duration_ms: duration.map(millis),
            },
        );
    }

    /// Records (and audits) a step that already ran, under [`RecoveryContext::term`].
    pub fn record_step(
        &self,
        name: &str,
        tablet: Option<&str>,
        ok: bool,
        detail: impl Into<String>,
        duration: Duration,
    ) {
        self.record_step_at(self.term(), name, tablet, ok, detail, duration)
    }

    /// Records (and audits under `term`) a step that already ran.
    pub fn record_step_at(
        &self,
        term: Term,
        name: &str,
        tablet: Option<&str>,
        ok: bool,
        detail: impl Into<String>,
        duration: Duration,
    ) {
        let detail = detail.into();
        let outcome = if ok { OUTCOME_OK } else { OUTCOME_FAILED };
        self.audit_at(term, name, tablet, outcome, detail.clone(), Some(duration));
        let record = StepRecord {
            name: name.to_string(),
            tablet: tablet.map(str::to_string),
            ok,
            detail,
            at_ms: topo::now_ms(),
            duration_ms: millis(duration),
        };
        if let Some(o) = &self.observer {
            (o.0)(&record);
        }
        if let Ok(mut s) = self.steps.lock() {
            s.push(record);
        }
    }

    /// Records `name` as a failed step with `why` and returns the refusal carrying it.
    pub fn refuse(&self, name: &str, tablet: Option<&str>, why: String) -> RecoveryError {
        self.record_step(name, tablet, false, why.clone(), Duration::ZERO);
        RecoveryError::Refused(why)
    }

    /// Runs `fut` as one step named `name` under [`RecoveryContext::term`].
    pub async fn step<T, F>(
        &self,
        name: &str,
        tablet: Option<&str>,
        fut: F,
        describe: impl FnOnce(&T) -> String,
    ) -> Result<T, RecoveryError>
    where
        F: Future<Output = Result<T, RecoveryError>>,
    {
        self.step_at(self.term(), name, tablet, fut, describe).await
    }

    /// Runs `fut` as one step named `name`: timed, recorded and audited under `term`.
    /// `describe` turns a success into the step's detail.
    pub async fn step_at<T, F>(
        &self,
        term: Term,
        name: &str,
        tablet: Option<&str>,
        fut: F,
        describe: impl FnOnce(&T) -> String,
    ) -> Result<T, RecoveryError>
    where
        F: Future<Output = Result<T, RecoveryError>>,
    {
        let started = Instant::now();
        let r = fut.await;
        let took = started.elapsed();
        match &r {
            Ok(v) => self.record_step_at(term, name, tablet, true, describe(v), took),
            Err(e) => self.record_step_at(term, name, tablet, false, e.to_string(), took),
        }
        r
    }

    /// One agent action under `term` as a step: the client, the bound, the error mapping.
    async fn action<Fut>(
        &self,
        term: Term,
        rpc: &'static str,
        step: &str,
        alias: &str,
        timeout: Duration,
        call: impl FnOnce(AgentClient<Channel>, pb::ActionContext) -> Fut,
    ) -> Result<pb::ActionResponse, RecoveryError>
    where
        Fut: Future<Output = Result<tonic::Response<pb::ActionResponse>, tonic::Status>>,
    {
        let fut = self.call_agent(term, rpc, alias, timeout, call);
        self.step_at(term, step, Some(alias), fut, |r: &pb::ActionResponse| {
            format!(
                "{} (term {}, position {})",
                r.steps.join("; "),
                r.term,
                r.gtid_position
            )
        })
        .await
    }

    /// One agent action under `term`, not recorded: the client, the bound, the error mapping.
    async fn call_agent<Fut>(
        &self,
        term: Term,
        rpc: &'static str,
        alias: &str,
        timeout: Duration,
        call: impl FnOnce(AgentClient<Channel>, pb::ActionContext) -> Fut,
    ) -> Result<pb::ActionResponse, RecoveryError>
    where
        Fut: Future<Output = Result<tonic::Response<pb::ActionResponse>, tonic::Status>>,
    {
        // Never act for a lock we may no longer hold: another instance may own the shard now.
        // The local lease deadline is checked right before sending, since the keep-alive task
        // only notices a loss after a round trip (a freeze past the TTL wakes both at once).
        if let Err(e) = self.lock.check_deadline(LOCK_DEADLINE_MARGIN) {
            let why =
                format!("shard lock not certainly held before {rpc} on {alias}: {e}; stopping");
            self.record_step_at(
                term,
                "lock_deadline",
                Some(alias),
                false,
                why.clone(),
                Duration::ZERO,
            );
            return Err(RecoveryError::Refused(why));
        }
        let client = self.deps.agents.client(self.tablet(alias)?)?;
        let ctx = self.action_context(term, timeout);
        // The agent bounds the action itself; our bound only covers a silent agent.
        let bound = timeout + Duration::from_millis(500);
        match tokio::time::timeout(bound, call(client, ctx)).await {
            Err(_) => Err(RecoveryError::AgentTimeout {
                rpc,
                tablet: alias.to_string(),
                after: bound,
            }),
            Ok(Err(status)) => Err(agent_error(rpc, alias, &status)),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }

    /// Performs one agent action under `term`: the one place each request is built.
    pub async fn act_at(
        &self,
        term: Term,
        alias: &str,
        action: AgentAction,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let t = self.cfg().action_timeout;
        match action {
            AgentAction::StopReplication { io_only } => {
                let name = if io_only { "stop_io_thread" } else { "stop_replication" };
                let scope = scope(io_only);
                self.action(term, "StopReplication", name, alias, t, |mut c, ctx| async move {
                    c.stop_replication(pb::StopReplicationRequest {
                        ctx: Some(ctx),
                        scope,
                    })
                    .await
                })
                .await
            }
            AgentAction::StartReplication { io_only } => {
                let name = if io_only { "start_io_thread" } else { "start_replication" };
                let scope = scope(io_only);
                self.action(term, "StartReplication", name, alias, t, |mut c, ctx| async move {
                    c.start_replication(pb::StartReplicationRequest {
                        ctx: Some(ctx),
                        scope,
                    })
                    .await
                })
                .await
            }
            AgentAction::WaitForPosition {
                step,
                position,
                bound,
            } => {
                self.action(term, "WaitForPosition", step, alias, bound, |mut c, ctx| async move {
                    c.wait_for_position(pb::WaitForPositionRequest {
                        ctx: Some(ctx),
                        gtid_position: position,
                        lift_delay: false,
                    })
                    .await
                })
                .await
            }
            AgentAction::ApplyReceived { received, bound } => {
                self.apply_received_at(term, alias, &received, bound).await
            }
            AgentAction::SetReadOnly { read_only } => {
                let name = if read_only {
                    "set_read_only_on"
                } else {
                    "set_read_only_off"
                };
                self.action(term, "SetReadOnly", name, alias, t, |mut c, ctx| async move {
                    c.set_read_only(pb::SetReadOnlyRequest {
                        ctx: Some(ctx),
                        read_only,
                        super_read_only: read_only,
                    })
                    .await
                })
                .await
            }
            AgentAction::SetReplicationSource {
                step,
                source,
                semi_sync,
                start_replication,
            } => {
                let host = source.mysql_host.clone();
                let port = u32::from(source.mysql_port);
                self.action(
                    term,
                    "SetReplicationSource",
                    step,
                    alias,
                    t,
                    |mut c, ctx| async move {
                        c.set_replication_source(pb::SetReplicationSourceRequest {
                            ctx: Some(ctx),
                            host,
                            port,
                            semi_sync,
                            start_replication,
                        })
                        .await
                    },
                )
                .await
            }
            AgentAction::ResetReplication => {
                self.action(
                    term,
                    "ResetReplication",
                    "reset_replication",
                    alias,
                    t,
                    |mut c, ctx| async move {
                        c.reset_replication(pb::ResetReplicationRequest { ctx: Some(ctx) })
                            .await
                    },
                )
                .await
            }
            AgentAction::SetSemiSync { primary, replica } => {
                self.action(
                    term,
                    "SetSemiSync",
                    "set_semi_sync",
                    alias,
                    t,
                    |mut c, ctx| async move {
                        c.set_semi_sync(pb::SetSemiSyncRequest {
                            ctx: Some(ctx),
                            primary,
                            replica,
                        })
                        .await
                    },
                )
                .await
            }
            AgentAction::Promote => {
                let durability = match self.durability() {
                    Durability::None => pb::Durability::None,
                    Durability::SemiSync => pb::Durability::SemiSync,
                } as i32;
                self.action(term, "Promote", "promote", alias, t, |mut c, ctx| async move {
                    c.promote(pb::PromoteRequest {
                        ctx: Some(ctx),
                        durability,
                    })
                    .await
                })
                .await
            }
            AgentAction::Demote { bound } => {
                self.action(term, "Demote", "demote", alias, bound, |mut c, ctx| async move {
                    c.demote(pb::DemoteRequest { ctx: Some(ctx) }).await
                })
                .await
            }
            AgentAction::UndoDemote => {
                self.action(
                    term,
                    "UndoDemote",
                    "undo_demote",
                    alias,
                    t,
                    |mut c, ctx| async move {
                        c.undo_demote(pb::UndoDemoteRequest { ctx: Some(ctx) })
                            .await
                    },
                )
                .await
            }
            AgentAction::FenceServer {
                target,
                addr,
                bound,
            } => {
                let (host, port) = addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_string(), p.parse::<u32>().ok()?)))
                    .ok_or_else(|| RecoveryError::Failed(format!("bad mysqld address {addr:?}")))?;
                self.action(
                    term,
                    "FenceServer",
                    "fence_old_primary",
                    alias,
                    bound,
                    |mut c, ctx| async move {
                        c.fence_server(pb::FenceServerRequest {
                            ctx: Some(ctx),
                            host,
                            port,
                            alias: target,
                        })
                        .await
                    },
                )
                .await
            }
        }
    }

    /// [`RecoveryContext::act_at`] under [`RecoveryContext::term`].
    pub async fn act(
        &self,
        alias: &str,
        action: AgentAction,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        self.act_at(self.term(), alias, action).await
    }

    /// Applies everything `alias` received (`received`, its IO thread stopped), lifting a
    /// replication delay, within `bound` (`relay_log_wait`). Waits in slices of
    /// [`APPLY_PROGRESS_EVERY`] and audits the applied position after each one, so that a large
    /// transaction's progress shows; one `apply_relay_log` step records the outcome.
    async fn apply_received_at(
        &self,
        term: Term,
        alias: &str,
        received: &str,
        bound: Duration,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let started = Instant::now();
        let mut slices = 0u32;
        let r = loop {
            let left = bound.saturating_sub(started.elapsed());
            let slice = left.min(APPLY_PROGRESS_EVERY);
            let pos = received.to_string();
            let r = self
                .call_agent(
                    term,
                    "WaitForPosition",
                    alias,
                    slice,
                    |mut c, ctx| async move {
                        c.wait_for_position(pb::WaitForPositionRequest {
                            ctx: Some(ctx),
                            gtid_position: pos,
                            lift_delay: true,
                        })
                        .await
                    },
                )
                .await;
            slices += 1;
            let timed_out = matches!(&r, Err(RecoveryError::Agent { code, .. }) if *code == tonic::Code::DeadlineExceeded)
                || matches!(&r, Err(RecoveryError::AgentTimeout { .. }));
            if !timed_out || started.elapsed() + Duration::from_millis(10) >= bound {
                break r;
            }
            let at = self
                .full_status(alias)
                .await
                .ok()
                .and_then(|h| h.mysql.map(|m| m.gtid_position))
                .unwrap_or_else(|| "unknown".into());
            self.record_step_at(
                term,
                "apply_relay_log_progress",
                Some(alias),
                true,
                format!(
                    "applying what it received: at {at}, target {received}, {:.1} s of {:?}",
                    started.elapsed().as_secs_f64(),
                    bound
                ),
                started.elapsed(),
            );
        };
        let took = started.elapsed();
        match &r {
            Ok(v) => self.record_step_at(
                term,
                "apply_relay_log",
                Some(alias),
                true,
                format!(
                    "applied everything received up to {received}: {} (position {}, {slices} wait(s))",
                    v.steps.join("; "),
                    v.gtid_position
                ),
                took,
            ),
            Err(e) => self.record_step_at(
                term,
                "apply_relay_log",
                Some(alias),
                false,
                format!("not applied within {bound:?}: {e}"),
                took,
            ),
        }
        r
    }

    /// `FullStatus`, bounded by `status_timeout`; not a step (it changes nothing).
    pub async fn full_status(&self, alias: &str) -> Result<pb::Health, RecoveryError> {
        full_status(
            &self.deps.agents,
            self.tablet(alias)?,
            self.cfg().status_timeout,
        )
        .await
    }

    /// Points every tablet of `targets` at `source` (replication started, semi-sync replica side
    /// per `semi_sync`) in parallel, one `repoint` step each: (repointed, "alias: error" of the
    /// failed ones). A failure is not an error of the reparent: the new primary is in place and
    /// the repairs finish the rest.
    pub async fn repoint_all(
        &self,
        term: Term,
        targets: &[String],
        source: &TabletRecord,
        semi_sync: bool,
    ) -> (Vec<String>, Vec<String>) {
        let results = futures::future::join_all(targets.iter().map(|a| async move {
            let r = self
                .act_at(
                    term,
                    a,
                    AgentAction::SetReplicationSource {
                        step: "repoint",
                        source: source.clone(),
                        semi_sync,
                        start_replication: true,
                    },
                )
                .await;
            (a.clone(), r)
        }))
        .await;
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (a, r) in results {
            match r {
                Ok(_) => ok.push(a),
                Err(e) => failed.push(format!("{a}: {e}")),
            }
        }
        (ok, failed)
    }

    /// Reserves `term` in the shard record (conditional on the lock) before acting with it.
    pub async fn reserve_term(&self, term: Term) -> Result<(), RecoveryError> {
        let record = self.reserved_record(term);
        self.write_shard_record(&record).await.map(drop)
    }

    /// The fresh record with `term` reserved (see [`RecoveryContext::reserve_term`]).
    pub fn reserved_record(&self, term: Term) -> ShardRecord {
        let mut record = self
            .fresh
            .record
            .clone()
            .unwrap_or_else(|| ShardRecord::new(self.keyspace.clone(), self.shard.clone()));
        record.reserved_term = record.reserved_term.max(term);
        record
    }

    /// Writes the shard record, conditional on holding the lock (a step).
    pub async fn write_shard_record(&self, record: &ShardRecord) -> Result<i64, RecoveryError> {
        self.write_shard_record_as("write_shard_record", record)
            .await
    }

    /// [`RecoveryContext::write_shard_record`] as a step named `step`.
    pub async fn write_shard_record_as(
        &self,
        step: &str,
        record: &ShardRecord,
    ) -> Result<i64, RecoveryError> {
        self.write_shard_record_at(self.term(), step, record).await
    }

    /// [`RecoveryContext::write_shard_record_as`] audited under `term`.
    pub async fn write_shard_record_at(
        &self,
        term: Term,
        step: &str,
        record: &ShardRecord,
    ) -> Result<i64, RecoveryError> {
        let fut = async {
            self.lock
                .update_shard(record)
                .await
                .map_err(RecoveryError::topo("write the shard record under the lock"))
        };
        self.step_at(term, step, record.primary.as_deref(), fut, |rev| {
            format!(
                "primary {} term {}{} (etcd revision {rev})",
                record.primary.as_deref().unwrap_or("none"),
                record.term,
                record
                    .reparent_in_progress
                    .as_deref()
                    .map(|m| format!(", reparent in progress: {m}"))
                    .unwrap_or_default()
            )
        })
        .await
    }

    /// Gives the lock back (to release it).
    pub fn into_lock(self) -> ShardLock {
        self.lock
    }
}

fn scope(io_only: bool) -> i32 {
    if io_only {
        pb::ReplicationScope::IoOnly as i32
    } else {
        pb::ReplicationScope::Both as i32
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl AgentApi for RecoveryContext {
    fn act(
        &self,
        tablet: &str,
        term: Term,
        action: AgentAction,
    ) -> impl Future<Output = Result<pb::ActionResponse, RecoveryError>> + Send {
        self.act_at(term, tablet, action)
    }

    fn full_status(
        &self,
        tablet: &str,
    ) -> impl Future<Output = Result<pb::Health, RecoveryError>> + Send {
        RecoveryContext::full_status(self, tablet)
    }
}

impl TopoApi for RecoveryContext {
    fn write_shard_record(
        &self,
        step: &'static str,
        term: Term,
        record: &ShardRecord,
    ) -> impl Future<Output = Result<i64, RecoveryError>> + Send {
        self.write_shard_record_at(term, step, record)
    }

    async fn get_promotion(&self, term: Term) -> Result<Option<PromotionRecord>, RecoveryError> {
        self.deps
            .topo
            .get_promotion(&self.keyspace, &self.shard, term)
            .await
            .map_err(RecoveryError::topo("etcd read"))
    }

    async fn get_tablet(&self, alias: &str) -> Result<Option<TabletRecord>, RecoveryError> {
        self.deps
            .topo
            .get_tablet(alias)
            .await
            .map_err(RecoveryError::topo("etcd read"))
    }

    fn registration_last_seen(&self, alias: &str) -> Option<u64> {
        self.deps.registrations.last_seen(alias)
    }

    async fn quarantine(&self, term: Term, alias: &str, reason: &str) -> Result<(), RecoveryError> {
        let control = crate::control::Control::new(self.deps.topo.clone());
        self.step_at(
            term,
            "quarantine",
            Some(alias),
            async {
                control
                    .quarantine(alias, reason, term)
                    .await
                    .map_err(|e| RecoveryError::Failed(e.to_string()))
            },
            |_| reason.to_string(),
        )
        .await
        .map(drop)
    }
}
