//! `myhactl reparent planned|emergency <keyspace/shard>`: asks the orchestrator to move the
//! primary (`POST /api/v1/shards/{ks}/{shard}/reparent`) and shows its ndjson event stream as
//! it arrives: one aligned line per step, the shard lock's holder while we wait for it, and a
//! one-line summary (or the reason on stderr and exit 1). `--json` passes the event lines
//! through untouched for scripts.
//!
//! The stream is read chunk by chunk and split on newlines here (not collected) because the
//! point is to see a slow step while it is slow. A stream that ends without its `done` event
//! leaves the outcome unknown to us; the orchestrator finishes the operation regardless (a
//! disconnect does not cancel it), so we point at the audit log rather than guess.

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::{Api, ApiArgs, ApiError};
use crate::scope::ShardRef;

/// Silence from the orchestrator longer than this (on top of the operation's own lock and
/// wait timeouts, during which it may legitimately say nothing) means it is stuck or gone.
const STREAM_IDLE_SLACK: Duration = Duration::from_secs(120);
/// The server's defaults (`[recovery] planned_lock_timeout`, `planned_wait_timeout`), used
/// only to size the idle bound when the operator gives none.
const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReparentError {
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The orchestrator said no, or the operation failed: its reason (already explained).
    #[error("{0}")]
    Failed(String),
    #[error(
        "connection to the orchestrator lost mid-operation; check `myhactl audit {shard}` \
         ({detail})"
    )]
    Lost { shard: String, detail: String },
    #[error(
        "interrupted: the orchestrator finishes the reparent on its own (leaving does not cancel \
         it); check `myhactl audit {shard}` and `myhactl status`"
    )]
    Interrupted { shard: String },
    #[error("writing the output")]
    Output(#[source] std::io::Error),
}

#[derive(clap::Subcommand, Debug)]
pub enum ReparentCommand {
    /// Move the primary of a healthy shard to a replica without losing a transaction.
    #[command(long_about = PLANNED_LONG, after_long_help = PLANNED_EXAMPLES)]
    Planned(PlannedArgs),
    /// Promote a replica now, whether or not the primary looks dead.
    #[command(long_about = EMERGENCY_LONG, after_long_help = EMERGENCY_EXAMPLES)]
    Emergency(EmergencyArgs),
}

const PLANNED_LONG: &str = "\
Move the primary of a healthy shard to a replica without losing a transaction.

The orchestrator takes the shard lock, checks the candidate (the one given with --to, else the
best replica: answering, replicating, not quarantined, not must_not, same cell preferred, then
least lag), demotes the primary (read-only, in-flight commits finished), waits for the candidate
to reach exactly the primary's position, promotes it under a new term and repoints the others.
It refuses before changing anything when the candidate lags more than --max-lag. When a step
after the demotion fails, the demotion is undone: the old primary is writable again.

Each step is shown as it happens (step, tablet, ok/FAILED, duration, detail), then a summary.
Exit status: 0 done, 1 refused or failed (reason on stderr), 2 usage error.";

const PLANNED_EXAMPLES: &str = "\
Examples:
  myhactl reparent planned commerce/0
  myhactl reparent planned commerce/0 --to zone1-102 --wait-timeout 10s
  myhactl reparent planned commerce/-80 --max-lag 500ms --json | jq -c 'select(.event==\"done\")'
  MYHA_ORCHESTRATOR=orch1:15000 MYHA_API_TOKEN=s3cret myhactl reparent planned commerce/0";

const EMERGENCY_LONG: &str = "\
Promote a replica now, whether or not the primary looks dead.

The orchestrator's emergency reparent, on request: the old primary is set read-only first when
its agent still answers (best effort), every replica applies what it received, errant GTIDs are
checked, the candidate (--to, or the best one) is caught up from the most advanced replica and
promoted under a new term, and the others are repointed. Use it when the primary is gone and
automatic recovery is disabled, or to force a choice of candidate.

Exit status: 0 done, 1 refused or failed (reason on stderr), 2 usage error.";

const EMERGENCY_EXAMPLES: &str = "\
Examples:
  myhactl reparent emergency commerce/0
  myhactl reparent emergency commerce/0 --to zone1-103 --lock-timeout 30s
  myhactl reparent emergency commerce/0 --json";

/// A tablet alias (`zone1-102`): checked for shape only; whether it exists is the
/// orchestrator's answer (404).
fn parse_alias(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{s}` is not a tablet alias (cell-uid, e.g. zone1-102)"
        ));
    }
    Ok(s.to_string())
}

/// What both modes take first: the shard, the candidate, the lock wait.
#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// The shard: keyspace/shard, e.g. commerce/0.
    #[arg(value_name = "KEYSPACE/SHARD")]
    pub shard: ShardRef,
    /// The tablet to promote (default: the orchestrator picks the best replica).
    #[arg(long, value_name = "ALIAS", value_parser = parse_alias)]
    pub to: Option<String>,
    /// How long to wait for the shard lock when another operation holds it (humantime, e.g.
    /// 30s; default: the orchestrator's, 10s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub lock_timeout: Option<Duration>,
}

/// What both modes take last: output, who asks, where the orchestrator is.
#[derive(clap::Args, Debug)]
pub struct OutputArgs {
    /// Print the orchestrator's events as received, one JSON object per line (the last is
    /// `{"event":"done",...}`); the exit status still says whether it worked.
    #[arg(long)]
    pub json: bool,
    /// Whom the reparent is for, a note in the reparent mark and the lock purpose as
    /// `(on behalf of NAME)` (default: $USER); the audit's actor is whom the orchestrator
    /// authenticated (the token's name).
    #[arg(long, value_name = "NAME")]
    pub requester: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct PlannedArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// How long the candidate may take to reach the demoted primary's position before the
    /// demotion is undone (humantime; default: the orchestrator's, 5s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub wait_timeout: Option<Duration>,
    /// Refuse up front when the candidate lags more than this (humantime; default: the
    /// orchestrator's, 5s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_lag: Option<Duration>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(clap::Args, Debug)]
pub struct EmergencyArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Promote even when a replica that could not be reached may hold the only copy of
    /// acknowledged writes (those writes are then lost). Without it such a reparent is refused
    /// with the tablets named. Audited with them.
    #[arg(long)]
    pub may_lose_acknowledged_writes: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// The request body (durations as humantime text, as the API takes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReparentRequest {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub may_lose_acknowledged_writes: bool,
}

fn duration_text(d: Option<Duration>) -> Option<String> {
    d.map(|d| humantime::format_duration(d).to_string())
}

/// The name the operator goes by: the flag, else the login name. Sent as the body's
/// `requester`, which the orchestrator records as a note (`on behalf of`), never as the actor.
fn requester(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_string)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// One event of the stream. Fields are lenient (defaults) so that a server adding or omitting
/// an optional field does not make us lose the stream; an unknown event is passed over.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    WaitingLock {
        #[serde(default)]
        holder: String,
        #[serde(default)]
        purpose: String,
    },
    Step(Step),
    Done(Done),
    /// The orchestrator could not render an event (its fallback line): the stream goes on.
    Error {
        #[serde(default)]
        error: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Step {
    pub name: String,
    #[serde(default)]
    pub tablet: Option<String>,
    pub ok: bool,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Done {
    pub ok: bool,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub old_primary: Option<String>,
    #[serde(default)]
    pub new_primary: Option<String>,
    #[serde(default)]
    pub term: Option<u64>,
    #[serde(default)]
    pub total_ms: Option<u64>,
    #[serde(default)]
    pub detail: Option<String>,
    /// `refused`, `lock_held` or `failed`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// A demotion was rolled back (the old primary is writable again).
    #[serde(default)]
    pub undone: Option<bool>,
}

/// What one line of the stream makes us print.
#[derive(Debug, Default, PartialEq)]
pub struct Rendered {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    /// The stream's result, when this line was its `done` event.
    pub done: Option<Done>,
}

/// Turns event lines into output; pure, so that the formatting is tested without a server.
#[derive(Debug)]
pub struct Renderer {
    pub json: bool,
    pub mode: &'static str,
    pub shard: String,
}

fn ms(v: Option<u64>) -> String {
    v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into())
}

impl Renderer {
    /// The first line, before anything is asked (human output only).
    pub fn header(&self, to: Option<&str>, url: &str) -> Option<String> {
        if self.json {
            return None;
        }
        let to = to.map(|t| format!(" to {t}")).unwrap_or_default();
        Some(format!(
            "{} reparent {}{to} via {url}",
            self.mode, self.shard
        ))
    }

    pub fn line(&self, raw: &str) -> Rendered {
        let mut out = Rendered::default();
        let line = raw.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return out;
        }
        let event = match serde_json::from_str::<serde_json::Value>(line) {
            Err(e) => {
                out.stderr.push(format!(
                    "myhactl: the orchestrator sent a line that is not JSON ({e}): {line}"
                ));
                return out;
            }
            Ok(v) => serde_json::from_value::<Event>(v),
        };
        if self.json {
            // Passthrough as received: scripts see exactly the orchestrator's events.
            out.stdout.push(line.to_string());
        }
        match event {
            Err(e) => out.stderr.push(format!(
                "myhactl: the orchestrator sent an event we cannot read ({e}): {line}"
            )),
            Ok(Event::WaitingLock { holder, purpose }) => {
                if !self.json {
                    let purpose = if purpose.is_empty() {
                        String::new()
                    } else {
                        format!(" ({purpose})")
                    };
                    out.stdout.push(format!(
                        "  waiting for the shard lock held by {holder}{purpose}"
                    ));
                }
            }
            Ok(Event::Step(s)) => {
                if !self.json {
                    out.stdout.push(self.step_line(&s));
                }
            }
            Ok(Event::Done(d)) => {
                if !self.json && d.ok {
                    if let Some(detail) = d.detail.as_deref().filter(|d| !d.is_empty()) {
                        out.stdout.push(format!("  note: {detail}"));
                    }
                    out.stdout.push(self.summary(&d));
                }
                out.done = Some(d);
            }
            Ok(Event::Error { error }) => out
                .stderr
                .push(format!("myhactl: the orchestrator reported: {error}")),
            Ok(Event::Other) => {}
        }
        out
    }

    /// `  demote                zone1-101     ok          12 ms  read_only set, position 0-101-9`.
    pub fn step_line(&self, s: &Step) -> String {
        let line = format!(
            "  {:<24} {:<14} {:<6} {:>9}  {}",
            s.name,
            s.tablet.as_deref().unwrap_or("-"),
            if s.ok { "ok" } else { "FAILED" },
            ms(s.duration_ms),
            s.detail
        );
        line.trim_end().to_string()
    }

    fn mode_of<'a>(&'a self, d: &'a Done) -> &'a str {
        d.mode.as_deref().unwrap_or(self.mode)
    }

    /// `planned reparent commerce/0: zone1-101 -> zone1-102, term 5, 143 ms`.
    pub fn summary(&self, d: &Done) -> String {
        format!(
            "{} reparent {}: {} -> {}, term {}, {}",
            self.mode_of(d),
            self.shard,
            d.old_primary.as_deref().unwrap_or("(none)"),
            d.new_primary.as_deref().unwrap_or("(none)"),
            d.term.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
            ms(d.total_ms)
        )
    }

    /// Why a `done` with `ok=false`: refused, lock held, or failed (and whether the demotion
    /// was undone, which is what the operator needs to know first).
    pub fn failure(&self, d: &Done) -> String {
        let what = match d.kind.as_deref() {
            Some("refused") => "refused",
            Some("lock_held") => "not started (shard lock held)",
            _ => "failed",
        };
        let mut text = format!(
            "{} reparent {} {what}: {}",
            self.mode_of(d),
            self.shard,
            d.error.as_deref().unwrap_or("no reason given")
        );
        match (d.undone, d.old_primary.as_deref()) {
            (Some(true), Some(old)) => text.push_str(&format!(
                "; the demotion was undone: {old} is the primary and writable again"
            )),
            (Some(true), None) => text.push_str("; the demotion was undone"),
            // After a demotion that could not be undone the shard may have no writable
            // primary: say where to look.
            (_, _) if d.kind.as_deref() == Some("failed") => {
                text.push_str("; nothing was undone, check `myhactl status`")
            }
            _ => {}
        }
        if let Some(t) = d.total_ms {
            text.push_str(&format!(" ({t} ms)"));
        }
        text
    }
}

pub async fn run(cmd: ReparentCommand) -> Result<(), ReparentError> {
    let (target, output, request, wait) = match cmd {
        ReparentCommand::Planned(a) => {
            let req = ReparentRequest {
                mode: "planned",
                to: a.target.to.clone(),
                wait_timeout: duration_text(a.wait_timeout),
                lock_timeout: duration_text(a.target.lock_timeout),
                max_lag: duration_text(a.max_lag),
                requester: requester(a.output.requester.as_deref()),
                may_lose_acknowledged_writes: false,
            };
            (a.target, a.output, req, a.wait_timeout)
        }
        ReparentCommand::Emergency(a) => {
            let req = ReparentRequest {
                mode: "emergency",
                to: a.target.to.clone(),
                wait_timeout: None,
                lock_timeout: duration_text(a.target.lock_timeout),
                max_lag: None,
                requester: requester(a.output.requester.as_deref()),
                may_lose_acknowledged_writes: a.may_lose_acknowledged_writes,
            };
            (a.target, a.output, req, None)
        }
    };
    let idle = target.lock_timeout.unwrap_or(DEFAULT_LOCK_TIMEOUT)
        + wait.unwrap_or(DEFAULT_WAIT_TIMEOUT)
        + STREAM_IDLE_SLACK;
    let api = Api::from_args(&output.api)?;
    let renderer = Renderer {
        json: output.json,
        mode: request.mode,
        shard: target.shard.to_string(),
    };
    let mut stdout = std::io::stdout();
    if let Some(h) = renderer.header(target.to.as_deref(), api.base()) {
        writeln!(stdout, "{h}").map_err(ReparentError::Output)?;
        stdout.flush().map_err(ReparentError::Output)?;
    }
    let path = format!(
        "/api/v1/shards/{}/{}/reparent",
        crate::api::encode(&target.shard.keyspace),
        crate::api::encode(&target.shard.shard)
    );
    let mut resp = api.post_stream(&path, &request).await?;
    let lost = |detail: String| ReparentError::Lost {
        shard: renderer.shard.clone(),
        detail,
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut ended = false;
    loop {
        // Whole lines only: a chunk may end mid-line (or hold several).
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if let Some(done) = emit(&renderer, &line)? {
                return finish(&renderer, &done);
            }
        }
        if ended {
            break;
        }
        let next = tokio::select! {
            r = tokio::time::timeout(idle, resp.chunk()) => r,
            // Ctrl-C cannot stop the operation (it runs under the lock in the orchestrator):
            // say so rather than vanish mid-stream as if it had been stopped.
            _ = tokio::signal::ctrl_c() => {
                return Err(ReparentError::Interrupted {
                    shard: renderer.shard.clone(),
                })
            }
        };
        match next {
            Err(_) => {
                return Err(lost(format!(
                    "no word from the orchestrator for {}",
                    humantime::format_duration(idle)
                )))
            }
            Ok(Err(e)) => {
                return Err(lost(format!(
                    "reading the stream: {}",
                    crate::api::chain(&e)
                )))
            }
            Ok(Ok(Some(bytes))) => buf.extend_from_slice(&bytes),
            Ok(Ok(None)) => {
                // A last line without its newline still counts.
                if !buf.is_empty() {
                    buf.push(b'\n');
                }
                ended = true;
            }
        }
    }
    Err(lost("the stream ended without a result".into()))
}

/// Prints what one line renders to; its `done`, if it was that.
fn emit(renderer: &Renderer, line: &[u8]) -> Result<Option<Done>, ReparentError> {
    let r = renderer.line(&String::from_utf8_lossy(line));
    let mut stdout = std::io::stdout().lock();
    for l in &r.stdout {
        writeln!(stdout, "{l}").map_err(ReparentError::Output)?;
    }
    // Live: each step shows while the next runs, also when stdout is a pipe.
    stdout.flush().map_err(ReparentError::Output)?;
    drop(stdout);
    for l in &r.stderr {
        eprintln!("{l}");
    }
    Ok(r.done)
}

fn finish(renderer: &Renderer, done: &Done) -> Result<(), ReparentError> {
    if done.ok {
        Ok(())
    } else {
        Err(ReparentError::Failed(renderer.failure(done)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn human() -> Renderer {
        Renderer {
            json: false,
            mode: "planned",
            shard: "commerce/0".into(),
        }
    }

    #[test]
    fn request_body_follows_the_contract() {
        let req = ReparentRequest {
            mode: "planned",
            to: Some("zone1-102".into()),
            wait_timeout: duration_text(Some(Duration::from_millis(1500))),
            lock_timeout: None,
            max_lag: duration_text(Some(Duration::from_secs(5))),
            requester: Some("alice".into()),
            may_lose_acknowledged_writes: false,
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"mode": "planned", "to": "zone1-102", "wait_timeout": "1s 500ms",
                               "max_lag": "5s", "requester": "alice"})
        );
        // The server parses what we send.
        assert_eq!(
            humantime::parse_duration(v["wait_timeout"].as_str().unwrap()).unwrap(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn steps_and_summary_are_one_line_each() {
        let r = human();
        let out = r.line(
            r#"{"event":"step","name":"demote","tablet":"zone1-101","ok":true,"detail":"position 0-101-9","duration_ms":12,"at_ms":1}"#,
        );
        assert_eq!(out.stdout.len(), 1);
        let l = &out.stdout[0];
        assert!(l.starts_with("  demote "), "{l}");
        assert!(l.contains(" zone1-101 "), "{l}");
        assert!(l.contains(" ok "), "{l}");
        assert!(l.contains("12 ms  position 0-101-9"), "{l}");
        // Aligned: the tablet column starts at the same place for any step name.
        let other = r.step_line(&Step {
            name: "wait_for_position".into(),
            tablet: Some("zone1-102".into()),
            ok: false,
            detail: String::new(),
            duration_ms: None,
        });
        assert_eq!(l.find("zone1-101"), other.find("zone1-102"), "{l}\n{other}");
        assert!(other.contains("FAILED"), "{other}");

        let out = r.line(r#"{"event":"waiting_lock","holder":"orchestrator@h:1","purpose":"emergency_reparent"}"#);
        assert_eq!(
            out.stdout,
            vec!["  waiting for the shard lock held by orchestrator@h:1 (emergency_reparent)"]
        );

        let out = r.line(
            r#"{"event":"done","ok":true,"mode":"planned","old_primary":"zone1-101","new_primary":"zone1-102","term":5,"total_ms":143,"detail":""}"#,
        );
        assert_eq!(
            out.stdout,
            vec!["planned reparent commerce/0: zone1-101 -> zone1-102, term 5, 143 ms"]
        );
        assert!(out.done.unwrap().ok);
    }

    #[test]
    fn failures_say_whether_the_demotion_was_undone() {
        let r = human();
        let out = r.line(
            r#"{"event":"done","ok":false,"mode":"planned","kind":"failed","error":"WaitForPosition timed out","old_primary":"zone1-101","undone":true,"total_ms":5100}"#,
        );
        assert!(out.stdout.is_empty());
        let text = r.failure(&out.done.unwrap());
        assert_eq!(
            text,
            "planned reparent commerce/0 failed: WaitForPosition timed out; the demotion was undone: zone1-101 is the primary and writable again (5100 ms)"
        );
        let d: Done = serde_json::from_str(
            r#"{"ok":false,"kind":"refused","error":"zone1-103 lags 9s > 5s","undone":false}"#,
        )
        .unwrap();
        assert_eq!(
            r.failure(&d),
            "planned reparent commerce/0 refused: zone1-103 lags 9s > 5s"
        );
        let d: Done = serde_json::from_str(
            r#"{"ok":false,"kind":"lock_held","error":"held by orchestrator@h:1 (emergency_reparent)"}"#,
        )
        .unwrap();
        assert!(r
            .failure(&d)
            .contains("not started (shard lock held): held by"));
    }

    #[test]
    fn json_mode_passes_lines_through() {
        let r = Renderer {
            json: true,
            ..human()
        };
        let line = r#"{"event":"step","name":"promote","tablet":"zone1-102","ok":true,"detail":"","duration_ms":3,"at_ms":1,"extra":1}"#;
        let out = r.line(&format!("{line}\r\n"));
        assert_eq!(out.stdout, vec![line.to_string()]);
        assert!(out.stderr.is_empty());
        // Unknown events pass too; garbage goes to stderr, never to stdout.
        assert_eq!(r.line(r#"{"event":"new_kind"}"#).stdout.len(), 1);
        let out = r.line("not json");
        assert!(out.stdout.is_empty() && out.stderr.len() == 1);
        assert_eq!(r.line("   ").stdout.len(), 0);
        let out = human().line(r#"{"event":"error","error":"unprintable"}"#);
        assert!(out.stdout.is_empty());
        assert_eq!(
            out.stderr,
            vec!["myhactl: the orchestrator reported: unprintable"]
        );
    }
}
