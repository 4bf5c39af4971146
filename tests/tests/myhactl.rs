//! `myhactl` as an operator runs it, real processes throughout: sandbox up (with its
//! orchestrator), status, sql, down; usage errors and shell completions; recoveries
//! disable/enable, ack and the audit log (from the orchestrator, and from etcd when the
//! orchestrator is dead) against a cluster whose orchestrator wants a token; planned and
//! emergency reparents end to end; and the reparent stream's rendering (live lines, `--json`,
//! a lost connection) against a scripted stand-in for the orchestrator; the sandbox writer across
//! a primary kill, and `sandbox restart` bringing the killed primary back as a replica.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use myha_tests::ctl::text;
use serde_json::Value;

fn myhactl(args: &[&str], env_dir: &Path) -> Output {
    let bin = harness::find_myha_bin("myhactl").expect("myhactl binary");
    Command::new(bin)
        .args(args)
        .env("MYHA_SANDBOX_DIR", env_dir)
        .env_remove("MYHA_ETCD")
        .env_remove("MYHA_ORCHESTRATOR")
        .output()
        .expect("run myhactl")
}

/// Stops the sandbox even when an assertion fails half-way.
struct Down<'a>(&'a Path);
impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = myhactl(
            &["sandbox", "down", "--dir", &self.0.to_string_lossy()],
            self.0,
        );
    }
}

/// `myhactl sandbox up --json` in a new temp dir: (the temp dir, the sandbox dir, the JSON).
/// The caller arms `Down` right away.
fn sandbox_up() -> (tempfile::TempDir, PathBuf, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sb");
    let out = myhactl(
        &["sandbox", "up", "--dir", &dir.to_string_lossy(), "--json"],
        &dir,
    );
    if !out.status.success() {
        // Whatever did start is stopped before failing.
        drop(Down(&dir));
        panic!("{}", text(&out));
    }
    let up: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (tmp, dir, up)
}

#[test]
fn sandbox_up_status_sql_down() {
    let (_tmp, dir, up) = sandbox_up();
    let _down = Down(&dir);
    let d = dir.to_string_lossy().to_string();
    for key in [
        "dir",
        "etcd",
        "orchestrator_http",
        "keyspace",
        "shard",
        "app_user",
        "app_password",
        "database",
        "tablets",
    ] {
        assert!(!up[key].is_null(), "missing `{key}` in {up}");
    }
    let tablets = up["tablets"].as_array().unwrap();
    assert_eq!(tablets.len(), 3);
    for t in tablets {
        for key in [
            "alias",
            "mysql",
            "socket",
            "mysqld_pid",
            "agent_pid",
            "agent_grpc",
            "agent_http",
        ] {
            assert!(!t[key].is_null(), "missing `{key}` in {t}");
        }
        let pid = t["mysqld_pid"].as_u64().unwrap() as u32;
        assert!(
            harness::pid_alive(pid),
            "mysqld {pid} runs after `up` returned"
        );
    }

    // The sandbox's orchestrator answers, over HTTPS (a certificate of the sandbox's CA) and
    // only with its token.
    let orch = up["orchestrator_http"].as_str().unwrap().to_string();
    assert!(orch.starts_with("https://"), "{orch}");
    let state = harness::SandboxState::read(&dir)
        .expect("state file")
        .expect("a sandbox");
    let token = state.orchestrator_token().expect("the sandbox's API token");
    pki::install_crypto_provider();
    let ca = std::fs::read(dir.join("tls").join("ca.pem")).expect("CA");
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("CA PEM")])
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let get = |path: &str, token: Option<&str>| {
        let mut req = https.get(format!("{orch}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let r = req.send().await.expect("HTTPS request");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(get("/health", None)).0, 200);
    // Ready once its watches have synced the topology, which `up` waited for.
    let (code, body) = rt.block_on(get("/health/ready", None));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"ready\":true"), "{body}");
    // Each tablet's load-balancer checks at its `agent_http`: the first is the primary.
    let lb = |addr: &str, path: &str| {
        let url = format!("http://{addr}{path}");
        rt.block_on(async move {
            reqwest::get(url)
                .await
                .expect("agent HTTP")
                .status()
                .as_u16()
        })
    };
    for (i, t) in tablets.iter().enumerate() {
        let addr = t["agent_http"].as_str().unwrap();
        let primary = if i == 0 { 200 } else { 503 };
        assert_eq!(lb(addr, "/primary"), primary, "{t}");
        assert_eq!(lb(addr, "/health"), 200, "{t}");
    }
    assert_eq!(rt.block_on(get("/api/v1/shards", None)).0, 401);
    let (code, body) = rt.block_on(get("/api/v1/shards", Some(&token)));
    assert_eq!(code, 200, "{body}");
    let shards: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(shards["shards"].is_array(), "{shards}");

    // A second `up` on the same dir is refused, saying how to stop the first.
    let again = myhactl(&["sandbox", "up", "--dir", &d], &dir);
    assert!(!again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("sandbox down"), "{}", text(&again));

    // SQL through the sandbox helper goes to the primary and replicates.
    let out = myhactl(
        &[
            "sandbox",
            "sql",
            "--dir",
            &d,
            "CREATE TABLE demo (id INT AUTO_INCREMENT PRIMARY KEY, v INT)",
            "INSERT INTO demo (v) VALUES (1), (2), (3)",
            "SELECT COUNT(*) AS n FROM demo",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\n3\n"),
        "{}",
        text(&out)
    );

    // Status: one writable primary, two replicating read-only replicas with live lag figures,
    // and the orchestrator (found through the sandbox) sees no problem.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = myhactl(&["status", "--json"], &dir);
        assert!(out.status.success(), "{}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ts = v["shards"][0]["tablets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ready = ts.len() == 3
            && v["orchestrator"]["reachable"] == true
            && v["orchestrator"]["analysed"] == true
            && v["shards"][0]["problems"] == serde_json::json!([])
            && ts.iter().all(|t| t["healthy"] == true)
            && ts
                .iter()
                .filter(|t| t["role"] == "replica")
                .all(|t| t["lag_ms"].is_u64());
        if ready {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed a healthy shard: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let shard = &status["shards"][0];
    assert_eq!(shard["keyspace"], "commerce");
    assert_eq!(shard["problems_source"], "orchestrator");
    assert!(shard.get("last_recovery").is_some(), "{shard}");
    assert_eq!(shard["term"], 1);
    let primary = shard["primary"].as_str().unwrap();
    let tablets = shard["tablets"].as_array().unwrap();
    let roles: Vec<&str> = tablets
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "primary").count(),
        1,
        "{status:#}"
    );
    for t in tablets {
        let is_primary = t["alias"] == primary;
        assert_eq!(t["read_only"], !is_primary, "{t}");
        assert_eq!(t["replicating"], !is_primary, "{t}");
        assert_eq!(t["semi_sync"]["primary"], is_primary, "{t}");
        assert_eq!(t["semi_sync"]["replica"], !is_primary, "{t}");
        assert!(
            t["gtid_position"].as_str().unwrap().starts_with("0-101-"),
            "{t}"
        );
        if !is_primary {
            assert_eq!(
                t["source"],
                tablets.iter().find(|x| x["alias"] == primary).unwrap()["mysql"]
            );
            assert!(t["lag_ms"].as_u64().unwrap() < 5_000, "{t}");
        }
    }
    // The human table says the same.
    let out = myhactl(&["status"], &dir);
    let human = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        human.contains(&format!("commerce/0  primary {primary}  term 1")),
        "{human}"
    );
    assert!(human.contains("problems: none"), "{human}");

    // With the orchestrator unreachable, status says so and still answers.
    let out = Command::new(harness::find_myha_bin("myhactl").unwrap())
        .args(["status", "--json", "--orchestrator", "127.0.0.1:1"])
        .env("MYHA_SANDBOX_DIR", &dir)
        .env_remove("MYHA_ETCD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["orchestrator"]["reachable"], false, "{v}");
    assert_eq!(v["shards"][0]["last_recovery_source"], "etcd", "{v}");
    assert!(v["shards"][0]["problems"].is_array(), "{v}");

    let mut pids: Vec<u32> = tablets_pids(&up);
    let orch_pid = std::fs::read_to_string(dir.join("sandbox.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["orchestrator_pid"].as_u64())
        .expect("orchestrator_pid in sandbox.json") as u32;
    assert!(harness::pid_alive(orch_pid));
    pids.push(orch_pid);
    let out = myhactl(&["sandbox", "down", "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|p| harness::pid_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "processes survived `sandbox down`"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = myhactl(&["sandbox", "down", "--dir", &d], &dir);
    assert!(
        !out.status.success(),
        "down without a sandbox fails: {}",
        text(&out)
    );
    let out = myhactl(&["status"], &dir);
    assert!(!out.status.success());
    assert!(text(&out).contains("no sandbox"), "{}", text(&out));
}

fn tablets_pids(up: &Value) -> Vec<u32> {
    up["tablets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| [t["mysqld_pid"].as_u64(), t["agent_pid"].as_u64()])
        .flatten()
        .map(|p| p as u32)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shared helpers of the tests below.

/// myhactl with nothing found by accident: no sandbox, and no orchestrator, etcd or token from
/// the environment of whoever runs the tests.
fn clean(args: &[&str]) -> Command {
    let mut c = Command::new(harness::find_myha_bin("myhactl").expect("myhactl binary"));
    c.args(args)
        .env("MYHA_SANDBOX_DIR", "/nonexistent/myha-sandbox")
        .env_remove("MYHA_ETCD")
        .env_remove("MYHA_ORCHESTRATOR")
        .env_remove("MYHA_API_TOKEN");
    for var in [
        "MYHA_CA",
        "MYHA_CERT",
        "MYHA_KEY",
        "MYHA_ETCD_USER",
        "MYHA_ETCD_PASSWORD",
        "MYHA_ETCD_PASSWORD_FILE",
    ] {
        c.env_remove(var);
    }
    c
}

fn out_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Usage errors and completions (no cluster).

#[test]
fn usage_errors_exit_2_and_completions() {
    for args in [
        &["reparent", "planned", "commerce"][..],
        &[
            "reparent",
            "planned",
            "commerce/0",
            "--wait-timeout",
            "soon",
        ],
        &["reparent", "planned", "commerce/0", "--max-lag", "-1s"],
        &["reparent", "emergency", "/0"],
        &["reparent", "sideways", "commerce/0"],
        &["recoveries", "disable", "commerce/"],
        &["ack"],
        &["ack", "commerce"],
        &["audit", "--limit", "0"],
        &["audit", "a/b/c"],
        &["completions", "tcsh"],
        &["no-such-command"],
    ] {
        let out = clean(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(!err_text(&out).is_empty(), "{args:?}: {}", text(&out));
    }
    // Nothing to ask is a failure with a reason (1), not a usage error.
    let out = clean(&["ack", "commerce/0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(err_text(&out).contains("--orchestrator"), "{}", text(&out));

    for shell in ["bash", "zsh", "fish"] {
        let out = clean(&["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = out_text(&out);
        assert!(
            script.len() > 1000 && script.contains("reparent") && script.contains("recoveries"),
            "{shell}: {script}"
        );
        if shell == "bash" {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("myhactl.bash");
            std::fs::write(&path, &script).unwrap();
            match Command::new("bash").arg("-n").arg(&path).output() {
                Ok(check) => assert!(check.status.success(), "bash -n: {}", text(&check)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("no bash here: the script's syntax is not checked")
                }
                Err(e) => panic!("bash -n: {e}"),
            }
        }
    }
    let out = clean(&["reparent", "planned", "--help"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(out_text(&out).contains("Examples:"), "{}", text(&out));
}

// ---------------------------------------------------------------------------------------------
// The reparent stream against a scripted stand-in for the orchestrator: what is shown, and
// when (deterministically: the stand-in holds the rest of the stream until the test has seen
// the first step on myhactl's stdout).

/// What the stand-in received.
struct Seen {
    head: String,
    body: Value,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Answers one `POST`: a chunked 200 with the `before` chunks, then (with a `gate`) waits for
/// the test's go, then the `after` chunks; then ends the response properly (`clean_end`) or
/// drops the connection mid-stream, as a crashed orchestrator would.
fn fake_orchestrator(
    before: Vec<String>,
    gate: Option<std::sync::mpsc::Receiver<()>>,
    after: Vec<String>,
    clean_end: bool,
) -> (String, std::thread::JoinHandle<Seen>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let (head, body) = loop {
            if let Some(i) = find(&raw, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..i]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if raw.len() >= i + 4 + len {
                    break (head, raw[i + 4..i + 4 + len].to_vec());
                }
            }
            let n = s.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "request cut short: {}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&buf[..n]);
        };
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        // Best effort: myhactl stops reading at the done event and may be gone before the
        // stream's end is written; what it printed is what the tests judge.
        let chunk = |s: &mut std::net::TcpStream, c: &str| {
            let _ = write!(s, "{:x}\r\n{c}\r\n", c.len());
            let _ = s.flush();
        };
        for c in &before {
            chunk(&mut s, c);
        }
        if let Some(g) = gate {
            g.recv_timeout(Duration::from_secs(60))
                .expect("the test never said go");
        }
        for c in &after {
            chunk(&mut s, c);
        }
        if clean_end {
            let _ = s.write_all(b"0\r\n\r\n");
        }
        Seen {
            head,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        }
    });
    (addr, handle)
}

const WAITING: &str =
    r#"{"event":"waiting_lock","holder":"orchestrator@h:1","purpose":"emergency_reparent"}"#;
const DEMOTE: &str = r#"{"event":"step","name":"demote","tablet":"zone1-101","ok":true,"detail":"read-only, position 0-101-42","duration_ms":12,"at_ms":1700000000000}"#;
const WAIT_POS: &str = r#"{"event":"step","name":"wait_for_position","tablet":"zone1-102","ok":true,"detail":"","duration_ms":3,"at_ms":1700000000012}"#;
const DONE: &str = r#"{"event":"done","ok":true,"mode":"planned","old_primary":"zone1-101","new_primary":"zone1-102","term":5,"total_ms":143,"detail":""}"#;

#[test]
fn reparent_steps_show_live() {
    let (go, gate) = std::sync::mpsc::channel();
    // The step line arrives split across two chunks (and after another line in the same
    // chunk): lines are cut on newlines, not on chunks.
    let before = vec![
        format!("{WAITING}\n{}", &DEMOTE[..20]),
        format!("{}\n", &DEMOTE[20..]),
    ];
    let after = vec![format!("{WAIT_POS}\n"), format!("{DONE}\n")];
    let (addr, server) = fake_orchestrator(before, Some(gate), after, true);
    let mut child = clean(&[
        "reparent",
        "planned",
        "commerce/0",
        "--to",
        "zone1-102",
        "--wait-timeout",
        "1500ms",
        "--orchestrator",
        &addr,
        "--token",
        "s3cret",
        "--requester",
        "tester",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    use std::io::{BufRead, Read};
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let l = lines
            .next()
            .unwrap_or_else(|| panic!("stdout ended before the demote step: {seen:#?}"))
            .unwrap();
        seen.push(l.clone());
        if l.trim_start().starts_with("demote") {
            break;
        }
    }
    // The step is on screen while the operation still runs: the stand-in has not sent the
    // rest yet, so myhactl cannot have finished.
    assert!(child.try_wait().unwrap().is_none(), "{seen:#?}");
    go.send(()).unwrap();
    for l in lines {
        seen.push(l.unwrap());
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let req = server.join().unwrap();
    assert!(status.success(), "{seen:#?}\n{stderr}");
    assert!(
        seen[0].starts_with("planned reparent commerce/0 to zone1-102 via http://127.0.0.1:"),
        "{seen:#?}"
    );
    assert_eq!(
        seen[1],
        "  waiting for the shard lock held by orchestrator@h:1 (emergency_reparent)"
    );
    let demote = &seen[2];
    let wait = &seen[3];
    assert!(
        demote.contains("zone1-101") && demote.contains(" ok ") && demote.contains("12 ms"),
        "{demote}"
    );
    assert!(demote.ends_with("read-only, position 0-101-42"), "{demote}");
    assert_eq!(
        demote.find("zone1-101"),
        wait.find("zone1-102"),
        "aligned:\n{demote}\n{wait}"
    );
    assert_eq!(
        seen.last().unwrap(),
        "planned reparent commerce/0: zone1-101 -> zone1-102, term 5, 143 ms"
    );
    // The request, per the contract.
    assert!(
        req.head
            .starts_with("POST /api/v1/shards/commerce/0/reparent HTTP/1.1"),
        "{}",
        req.head
    );
    assert!(
        req.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v.trim() == "Bearer s3cret"),
        "{}",
        req.head
    );
    assert_eq!(
        req.body,
        serde_json::json!({"mode": "planned", "to": "zone1-102", "wait_timeout": "1s 500ms",
                           "requester": "tester"})
    );
}

/// One scripted reparent without a gate: myhactl's output.
fn scripted(lines: &[&str], clean_end: bool, extra: &[&str]) -> Output {
    let chunks = lines.iter().map(|l| format!("{l}\n")).collect();
    let (addr, server) = fake_orchestrator(chunks, None, Vec::new(), clean_end);
    let mut args = vec![
        "reparent",
        "emergency",
        "commerce/0",
        "--orchestrator",
        &addr,
    ];
    args.extend_from_slice(extra);
    let out = clean(&args).output().unwrap();
    let req = server.join().unwrap();
    assert_eq!(req.body["mode"], "emergency", "{}", req.body);
    // No token given, none sent.
    assert!(
        !req.head.to_ascii_lowercase().contains("authorization:"),
        "{}",
        req.head
    );
    out
}

#[test]
fn reparent_failures_json_and_lost_streams() {
    // A failure after the demotion: exit 1, the reason on stderr, saying it was undone.
    let failed = r#"{"event":"done","ok":false,"mode":"planned","kind":"failed","error":"wait_for_position on zone1-102: timed out after 5s","old_primary":"zone1-101","undone":true,"total_ms":5020}"#;
    let out = scripted(&[DEMOTE, failed], true, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = err_text(&out);
    assert!(
        err.contains("failed: wait_for_position on zone1-102: timed out"),
        "{err}"
    );
    assert!(
        err.contains("the demotion was undone: zone1-101 is the primary and writable again"),
        "{err}"
    );
    assert!(out_text(&out).contains("demote"), "{}", text(&out));

    // --json: every stdout line is the orchestrator's JSON, the last the done event; the exit
    // status follows it.
    for (done, code) in [(DONE, 0), (failed, 1)] {
        let out = scripted(&[WAITING, DEMOTE, WAIT_POS, done], true, &["--json"]);
        assert_eq!(out.status.code(), Some(code), "{}", text(&out));
        let events: Vec<Value> = out_text(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(events.len(), 4, "{}", text(&out));
        assert_eq!(events[0]["event"], "waiting_lock");
        assert_eq!(events[3]["event"], "done");
        assert_eq!(events[3]["ok"], code == 0);
    }

    // The stream ends, or the connection drops, without a done event: exit 1, and the
    // operator is sent to the audit log.
    for clean_end in [true, false] {
        for json in [false, true] {
            let extra: &[&str] = if json { &["--json"] } else { &[] };
            let out = scripted(&[DEMOTE], clean_end, extra);
            assert_eq!(out.status.code(), Some(1), "{}", text(&out));
            assert!(
                err_text(&out).contains(
                    "connection to the orchestrator lost mid-operation; check `myhactl audit commerce/0`"
                ),
                "{}",
                text(&out)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Against a real cluster whose orchestrator wants a token.

const TOKEN: &str = "t0ken-for-myhactl";
/// A `read` token of the same orchestrator.
const READ_TOKEN: &str = "read-t0ken-for-myhactl";

async fn cluster_with_orchestrator(tablets: usize) -> harness::Cluster {
    harness::Cluster::start(harness::ClusterOptions {
        tablets,
        start_orchestrator: true,
        orchestrator_config: Some(std::sync::Arc::new(
            |cfg: &mut harness::OrchestratorConfig| {
                cfg.orchestrator.api_token = Some(TOKEN.into());
                cfg.orchestrator.api_tokens = vec![harness::ApiTokenConfig {
                    name: "viewer".into(),
                    role: harness::ApiRole::Read,
                    token: Some(READ_TOKEN.into()),
                    token_file: None,
                }];
            },
        )),
        ..harness::ClusterOptions::default()
    })
    .await
    .expect("cluster starts")
}

/// myhactl pointed at `o` through `$MYHA_ORCHESTRATOR`, the token (if any) through
/// `$MYHA_API_TOKEN`.
async fn ctl(o: &harness::OrchestratorProc, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = tokio::process::Command::from(clean(args));
    c.envs(o.ctl_env());
    if let Some(t) = token {
        c.env("MYHA_API_TOKEN", t);
    }
    c.output().await.expect("run myhactl")
}

async fn wait_shard(
    o: &harness::OrchestratorProc,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = o.shards().await.expect("GET /api/v1/shards");
        if ok(&v["shards"][0]) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: never true in {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn healthy(s: &Value, tablets: usize) -> bool {
    s["problems"] == serde_json::json!([])
        && s["reparent_in_progress"].is_null()
        && s["tablets"]
            .as_array()
            .is_some_and(|t| t.len() == tablets && t.iter().all(|t| t["fresh"] == true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoveries_ack_and_audit() {
    let c = cluster_with_orchestrator(2).await;
    let o = c.orchestrator().expect("orchestrator started");
    wait_shard(o, "healthy shard", |s| healthy(s, 2)).await;
    let shard = format!("{}/{}", c.keyspace(), c.shard());

    // Without the token: the orchestrator's 401, its reason, exit 1.
    let out = ctl(o, None, &["ack", &shard]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(err_text(&out).contains("401"), "{}", text(&out));
    assert!(err_text(&out).contains("--token"), "{}", text(&out));
    let out = ctl(o, Some("wrong"), &["recoveries", "disable", &shard]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        err_text(&out).contains("wrong bearer token"),
        "{}",
        text(&out)
    );
    // A `read` token: 403 naming the token and the role needed, exit 1.
    let out = ctl(o, Some(READ_TOKEN), &["recoveries", "disable", &shard]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = err_text(&out);
    assert!(
        err.contains("403") && err.contains("`viewer`") && err.contains("`operate` role"),
        "{err}"
    );

    // An unknown shard: 404 with the reason, exit 1.
    for args in [&["ack", "nope/0"][..], &["recoveries", "disable", "nope/0"]] {
        let out = ctl(o, Some(TOKEN), args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        let err = err_text(&out);
        assert!(
            err.contains("404") && err.contains("nope/0"),
            "{args:?}: {err}"
        );
    }

    // Disable the shard; the orchestrator's shard view says so, with the reason.
    let out = ctl(
        o,
        Some(TOKEN),
        &["recoveries", "disable", &shard, "--reason", "disk swap"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        out_text(&out).trim(),
        format!("automatic recoveries disabled for {shard} (reason: disk swap)")
    );
    let v = wait_shard(o, "shard disabled", |s| s["recovery"]["enabled"] == false).await;
    let reason = v["shards"][0]["recovery"]["disabled_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("disk swap"), "{v:#}");
    // Enable again, the token given as a flag this time.
    let out = ctl(o, None, &["recoveries", "enable", &shard, "--token", TOKEN]).await;
    assert!(out.status.success(), "{}", text(&out));
    wait_shard(o, "shard enabled", |s| s["recovery"]["enabled"] == true).await;

    // Globally, with --json.
    let out = ctl(
        o,
        Some(TOKEN),
        &["recoveries", "disable", "--reason", "freeze", "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let answer: Value = serde_json::from_str(&out_text(&out)).unwrap();
    assert_eq!(
        (answer["action"].as_str(), answer["scope"].as_str()),
        (Some("disable"), Some("global"))
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while o.shards().await.unwrap()["recoveries_enabled"] != false {
        assert!(Instant::now() < deadline, "global disable never shown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = ctl(o, Some(TOKEN), &["recoveries", "enable"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out_text(&out).contains("enabled globally"),
        "{}",
        text(&out)
    );
    while o.shards().await.unwrap()["recoveries_enabled"] != true {
        assert!(Instant::now() < deadline, "global enable never shown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = ctl(o, Some(TOKEN), &["ack", &shard, "--reason", "looked at it"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out_text(&out).starts_with(&format!("acknowledged {shard}")),
        "{}",
        text(&out)
    );

    // The audit log from the orchestrator (a `read` token is enough; none is a 401, not a
    // reason to read etcd instead)...
    let out = ctl(o, None, &["audit", &shard]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(err_text(&out).contains("401"), "{}", text(&out));
    let out = ctl(o, Some(READ_TOKEN), &["audit", &shard, "--json"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let from_orch: Value = serde_json::from_str(&out_text(&out)).unwrap();
    assert_eq!(from_orch["source"], "orchestrator", "{from_orch:#}");
    let actions = |v: &Value| -> Vec<String> {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    for want in ["recoveries_disabled", "recoveries_enabled", "ack"] {
        assert!(
            actions(&from_orch).iter().any(|a| a == want),
            "{want}: {from_orch:#}"
        );
    }
    // The actor of every change is the token's name (the legacy `api_token`'s is `api_token`).
    for e in from_orch["entries"].as_array().unwrap() {
        if ["recoveries_disabled", "recoveries_enabled", "ack"]
            .contains(&e["action"].as_str().unwrap_or_default())
        {
            assert_eq!(e["actor"], "token:api_token from 127.0.0.1", "{e}");
        }
    }
    let out = ctl(o, Some(TOKEN), &["audit", &shard, "--limit", "3"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let human = out_text(&out);
    let lines: Vec<&str> = human.lines().collect();
    assert!(
        lines[0].starts_with("source: orchestrator https://"),
        "{human}"
    );
    assert!(lines[1].starts_with("TIME (UTC)"), "{human}");
    assert_eq!(lines.len(), 5, "3 entries: {human}");
    assert!(
        lines[2].contains(&shard) && lines[2].contains("ack"),
        "{human}"
    );

    // ... and, with the orchestrator on a dead port, straight from etcd, saying so.
    let etcd = c.etcd().endpoint();
    let args = [
        "audit",
        shard.as_str(),
        "--json",
        "--orchestrator",
        "127.0.0.1:1",
        "--etcd",
        &etcd,
    ];
    // The cluster's etcd wants the operator's certificate and the etcd user.
    let security = c.ctl_env().unwrap();
    let out = clean(&args).envs(security.clone()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let from_etcd: Value = serde_json::from_str(&out_text(&out)).unwrap();
    assert_eq!(from_etcd["source"], "etcd", "{from_etcd:#}");
    assert!(from_etcd["fallback_reason"].is_string(), "{from_etcd:#}");
    for want in ["recoveries_disabled", "recoveries_enabled", "ack"] {
        assert!(
            actions(&from_etcd).iter().any(|a| a == want),
            "{want}: {from_etcd:#}"
        );
    }
    let out = clean(&["audit", "--orchestrator", "127.0.0.1:1", "--etcd", &etcd])
        .envs(security)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let human = out_text(&out);
    assert!(
        human.starts_with(&format!("source: etcd {etcd} (orchestrator not used: ")),
        "{human}"
    );
    assert!(human.contains("recoveries_disabled"), "{human}");
}

/// `planned reparent commerce/0: zone1-101 -> zone1-102, term 2, 143 ms` -> (old, new, term).
fn summary(line: &str, mode: &str, shard: &str) -> (String, String, u64) {
    let rest = line
        .strip_prefix(&format!("{mode} reparent {shard}: "))
        .unwrap_or_else(|| panic!("not a summary: {line}"));
    let (old, rest) = rest.split_once(" -> ").unwrap();
    let (new, rest) = rest.split_once(", term ").unwrap();
    let (term, ms) = rest.split_once(", ").unwrap();
    assert!(ms.ends_with(" ms"), "{line}");
    (old.into(), new.into(), term.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reparents_end_to_end() {
    let c = cluster_with_orchestrator(3).await;
    let o = c.orchestrator().expect("orchestrator started");
    wait_shard(o, "healthy shard", |s| healthy(s, 3)).await;
    let shard = format!("{}/{}", c.keyspace(), c.shard());
    let first = c.initial_primary().alias().to_string();

    // Planned, the orchestrator's choice of candidate: steps, then the summary.
    let out = ctl(o, Some(TOKEN), &["reparent", "planned", &shard]).await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = out_text(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with(&format!("planned reparent {shard} via https://")),
        "{stdout}"
    );
    let steps: Vec<&&str> = lines[1..lines.len() - 1]
        .iter()
        .filter(|l| l.starts_with("  ") && !l.starts_with("  waiting") && !l.starts_with("  note"))
        .collect();
    assert!(steps.len() >= 3, "{stdout}");
    assert!(
        steps
            .iter()
            .all(|l| l.contains(" ok ") && l.contains(" ms")),
        "{stdout}"
    );
    let (old, new, term) = summary(lines.last().unwrap(), "planned", &shard);
    assert_eq!(old, first, "{stdout}");
    assert_ne!(new, first, "{stdout}");
    assert_eq!(term, 2, "{stdout}");
    assert!(
        steps.iter().any(|l| l.contains(&first)),
        "the demotion: {stdout}"
    );
    println!("{stdout}");
    let v = wait_shard(o, "healthy after the planned reparent", |s| {
        healthy(s, 3) && s["primary"] == new.as_str()
    })
    .await;
    assert_eq!(v["shards"][0]["term"], 2);

    // Back to the first primary, for scripts: JSON lines ending with the done event.
    let out = ctl(
        o,
        Some(TOKEN),
        &["reparent", "planned", &shard, "--to", &first, "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let events: Vec<Value> = out_text(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(events.iter().any(|e| e["event"] == "step"), "{events:#?}");
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done", "{events:#?}");
    assert_eq!(done["ok"], true, "{done}");
    assert_eq!(done["new_primary"], first.as_str(), "{done}");
    assert_eq!(done["old_primary"], new.as_str(), "{done}");
    assert_eq!(done["term"], 3, "{done}");
    wait_shard(o, "healthy after the planned reparent back", |s| {
        healthy(s, 3) && s["primary"] == first.as_str()
    })
    .await;

    // Refused before anything changes: the candidate is the primary. Unknown alias and
    // shard: the orchestrator's 404. Each exit 1 with the reason.
    let out = ctl(
        o,
        Some(TOKEN),
        &["reparent", "planned", &shard, "--to", &first],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(err_text(&out).contains("refused"), "{}", text(&out));
    let out = ctl(
        o,
        Some(TOKEN),
        &["reparent", "planned", &shard, "--to", "zone1-999"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(err_text(&out).contains("zone1-999"), "{}", text(&out));
    let out = ctl(o, Some(TOKEN), &["reparent", "emergency", "nope/0"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(err_text(&out).contains("404"), "{}", text(&out));
    // And without the token: 401.
    let out = ctl(o, None, &["reparent", "planned", &shard]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(err_text(&out).contains("401"), "{}", text(&out));
    let v = o.shards().await.unwrap();
    assert_eq!(v["shards"][0]["term"], 3, "nothing changed: {v:#}");

    // Emergency, to a chosen replica.
    let target = c
        .tablets()
        .iter()
        .map(|t| t.alias().to_string())
        .find(|a| *a != first && *a != new)
        .unwrap();
    let out = ctl(
        o,
        Some(TOKEN),
        &["reparent", "emergency", &shard, "--to", &target],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = out_text(&out);
    println!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 3, "{stdout}");
    let (old, promoted, term) = summary(lines.last().unwrap(), "emergency", &shard);
    assert_eq!(
        (old.as_str(), promoted.as_str()),
        (first.as_str(), target.as_str()),
        "{stdout}"
    );
    assert!(term >= 4, "{stdout}");
    let v = wait_shard(o, "the emergency reparent in the record", |s| {
        s["primary"] == target.as_str()
    })
    .await;
    assert_eq!(v["shards"][0]["term"], term, "{v:#}");

    // All of it is in the audit log (the orchestrator appends a reparent's summary in the
    // background, so the last one may land a moment after its `done`).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = ctl(o, Some(READ_TOKEN), &["audit", &shard, "--limit", "200"]).await;
        assert!(out.status.success(), "{}", text(&out));
        let human = out_text(&out);
        if human.contains("planned_reparent") && human.contains("emergency_reparent") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reparents are not all in the audit log: {human}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The sandbox demo: a client writing through the gateway's RW port across a primary kill.

/// `server_id N` in a line of `myhactl sandbox write`.
fn server_id_in(line: &str) -> Option<u32> {
    let rest = &line[line.find("server_id ")? + "server_id ".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn sandbox_writer_survives_a_primary_kill() {
    let (_tmp, dir, up) = sandbox_up();
    let _down = Down(&dir);
    let d = dir.to_string_lossy().to_string();
    let first = &up["tablets"][0];
    assert_eq!(first["alias"], "zone1-101", "{up}");
    let first_pid = first["mysqld_pid"].as_u64().unwrap() as u32;

    // Usage errors: an unknown fault or target.
    let out = myhactl(
        &["sandbox", "fault", "explode", "primary", "--dir", &d],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = myhactl(
        &["sandbox", "fault", "kill", "zone9-999", "--dir", &d],
        &dir,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        err_text(&out).contains("no tablet zone9-999"),
        "{}",
        text(&out)
    );

    let mut writer = Command::new(harness::find_myha_bin("myhactl").expect("myhactl binary"))
        .args(["sandbox", "write", "--dir", &d, "--duration", "6s"])
        .env("MYHA_SANDBOX_DIR", &dir)
        .env_remove("MYHA_ETCD")
        .env_remove("MYHA_ORCHESTRATOR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the writer");
    // Its stdout line by line: the kill comes once the first write is acknowledged (by the
    // first primary), however long the writer took to get there.
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let reader = {
        use std::io::BufRead;
        let stdout = writer.stdout.take().expect("the writer's stdout");
        std::thread::spawn(move || {
            let mut all = Vec::new();
            for l in std::io::BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                let _ = line_tx.send(l.clone());
                all.push(l);
            }
            all
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut early = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match line_rx.recv_timeout(left) {
            Ok(l) => {
                let first_ack = l.starts_with("writes ok");
                early.push(l);
                if first_ack {
                    break;
                }
            }
            Err(e) => {
                let _ = writer.kill();
                panic!("no acknowledged write before the kill ({e}): {early:#?}");
            }
        }
    }
    let out = myhactl(&["sandbox", "fault", "kill", "primary", "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out_text(&out).contains(&format!(
            "killed mysqld of zone1-101 (pid {first_pid}), the primary of commerce/0 at term 1"
        )),
        "{}",
        text(&out)
    );
    assert!(!harness::pid_alive(first_pid), "mysqld {first_pid} is gone");

    // The writer is bounded on its own (6 s, then the read-back); this is only a watchdog.
    let deadline = Instant::now() + Duration::from_secs(90);
    while writer.try_wait().expect("wait for the writer").is_none() {
        if Instant::now() > deadline {
            let _ = writer.kill();
            let out = writer.wait_with_output().unwrap();
            panic!("the writer did not end within 90 s: {}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = writer.wait_with_output().expect("the writer's output");
    let stdout = reader.join().expect("the writer's stdout").join("\n");
    let out = Output {
        stdout: stdout.clone().into_bytes(),
        ..out
    };
    println!("{}", text(&out));
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<&str> = stdout.lines().collect();

    // Writes went to zone1-101 first, then resumed on another server. (The first ack is
    // "writes ok again" when attempts failed before it.)
    let first_ok = lines
        .iter()
        .position(|l| l.starts_with("writes ok"))
        .unwrap_or_else(|| panic!("no first ack: {stdout}"));
    assert_eq!(server_id_in(lines[first_ok]), Some(101), "{stdout}");
    let resumed = lines[first_ok + 1..]
        .iter()
        .find(|l| l.starts_with("writes ok again at ") || l.starts_with("writes moved to "))
        .unwrap_or_else(|| panic!("writes never resumed elsewhere: {stdout}"));
    let new_server = server_id_in(resumed).unwrap_or_else(|| panic!("{resumed}"));
    assert!([102, 103].contains(&new_server), "{stdout}");
    let by = lines
        .iter()
        .find(|l| l.trim_start().starts_with("acknowledged by"))
        .unwrap_or_else(|| panic!("no summary: {stdout}"));
    assert!(by.contains("server_id 101 (zone1-101)"), "{stdout}");
    assert!(by.contains(&format!("server_id {new_server} ")), "{stdout}");

    // Every acknowledged write is on the new primary, the one etcd names.
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("all ")
            && last.contains(" acknowledged writes are on the current primary, ")
            && server_id_in(last) == Some(new_server),
        "{stdout}"
    );
    let n: u64 = last
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert!(n > 10, "{stdout}");
    let out = myhactl(&["status", "--json"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["shards"][0]["primary"],
        format!("zone1-{new_server}"),
        "{v:#}"
    );

    let out = myhactl(&["sandbox", "down", "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
}

// ---------------------------------------------------------------------------------------------
// `sandbox restart`: a killed primary comes back and rejoins as a replica.

/// Polls `myhactl status --json` (every 200 ms, up to `bound`) until `done` says yes; the last
/// report in the panic otherwise.
fn poll_status(
    dir: &Path,
    what: &str,
    bound: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let out = myhactl(&["status", "--json"], dir);
        if out.status.success() {
            if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                if done(&v) {
                    println!("{what} after {:.1} s", start.elapsed().as_secs_f64());
                    return v;
                }
                last = format!("{v:#}");
            }
        } else {
            last = text(&out);
        }
        if start.elapsed() > bound {
            panic!("not {what} within {bound:?}; last status: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Tablet `alias` in a `status --json` report.
fn status_tablet<'a>(v: &'a Value, alias: &str) -> Option<&'a Value> {
    v["shards"][0]["tablets"]
        .as_array()?
        .iter()
        .find(|t| t["alias"] == alias)
}

/// The mysqld pid of `alias` that sandbox.json records now.
fn recorded_mysqld_pid(dir: &Path, alias: &str) -> Option<u32> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sandbox.json")).ok()?).ok()?;
    v["tablets"]
        .as_array()?
        .iter()
        .find(|t| t["alias"] == alias)?["mysqld_pid"]
        .as_u64()
        .map(|p| p as u32)
}

#[test]
fn sandbox_restart_brings_a_killed_primary_back_as_a_replica() {
    let (_tmp, dir, up) = sandbox_up();
    let _down = Down(&dir);
    let d = dir.to_string_lossy().to_string();
    let old = "zone1-101";
    assert_eq!(up["tablets"][0]["alias"], old, "{up}");
    let old_pid = up["tablets"][0]["mysqld_pid"].as_u64().unwrap() as u32;
    let mysql_of = |alias: &str| -> String {
        up["tablets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["alias"] == alias)
            .and_then(|t| t["mysql"].as_str())
            .unwrap_or_else(|| panic!("no tablet {alias}: {up}"))
            .to_string()
    };

    // A running mysqld is not restarted.
    let out = myhactl(&["sandbox", "restart", "zone1-102", "--dir", &d], &dir);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(err_text(&out).contains("still running"), "{}", text(&out));

    let out = myhactl(&["sandbox", "fault", "kill", "primary", "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out_text(&out).contains(&format!("sandbox restart {old}")),
        "{}",
        text(&out)
    );
    assert!(!harness::pid_alive(old_pid), "mysqld {old_pid} is gone");

    // Failover: etcd names another primary, and it is writable.
    let v = poll_status(&dir, "failed over", Duration::from_secs(60), |v| {
        let p = v["shards"][0]["primary"].as_str().unwrap_or(old);
        p != old
            && status_tablet(v, p).is_some_and(|t| t["healthy"] == true && t["read_only"] == false)
    });
    let new_primary = v["shards"][0]["primary"].as_str().unwrap().to_string();
    let new_mysql = mysql_of(&new_primary);

    let out = myhactl(&["sandbox", "restart", old, "--dir", &d], &dir);
    println!("{}", text(&out));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out_text(&out).contains(&format!("restarted mysqld of {old} (pid ")),
        "{}",
        text(&out)
    );
    // Its agent never died (the agent outlives its mysqld): only mysqld was started.
    assert!(
        out_text(&out).contains("only mysqld was restarted"),
        "{}",
        text(&out)
    );
    let new_pid = recorded_mysqld_pid(&dir, old).expect("the new pid in sandbox.json");
    assert_ne!(new_pid, old_pid);
    assert!(
        harness::pid_alive(new_pid),
        "restarted mysqld {new_pid} runs"
    );

    // It rejoins as a replica of the new primary, or (if the kill left it with a transaction
    // the new primary never had) is quarantined with the reason: both are the repairs' answer.
    let v = poll_status(
        &dir,
        "the old primary rejoined (or quarantined)",
        Duration::from_secs(60),
        |v| {
            status_tablet(v, old).is_some_and(|t| {
                let quarantined = t["quarantined"].as_str().is_some_and(|r| !r.is_empty());
                let rejoined = t["role"] == "replica"
                    && t["healthy"] == true
                    && t["replicating"] == true
                    && t["source"].as_str() == Some(new_mysql.as_str());
                quarantined || rejoined
            })
        },
    );
    let t = status_tablet(&v, old).unwrap();
    println!("{old} after its restart: {t:#}");
    assert_eq!(v["shards"][0]["primary"], new_primary.as_str(), "{v:#}");
    let out = myhactl(&["status", "--dir", &d], &dir);
    println!("{}", text(&out));

    // Restarting it again is refused: it runs.
    let out = myhactl(&["sandbox", "restart", old, "--dir", &d], &dir);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        err_text(&out).contains(&format!("still running (pid {new_pid})")),
        "{}",
        text(&out)
    );
    // Frozen is not down: restart says to thaw it.
    let out = myhactl(&["sandbox", "fault", "stop", old, "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let out = myhactl(&["sandbox", "restart", old, "--dir", &d], &dir);
    let thaw = myhactl(&["sandbox", "fault", "cont", old, "--dir", &d], &dir);
    assert!(thaw.status.success(), "{}", text(&thaw));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        err_text(&out).contains("frozen")
            && err_text(&out).contains(&format!("sandbox fault cont {old}")),
        "{}",
        text(&out)
    );

    let out = myhactl(&["sandbox", "down", "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !harness::pid_alive(new_pid),
        "down stops the restarted mysqld"
    );
}

#[test]
fn sandbox_on_netns_hosts_runs_a_host_per_process_and_down_removes_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sb");
    let d = dir.to_string_lossy().to_string();
    let out = myhactl(
        &["sandbox", "up", "--dir", &d, "--json", "--hosts", "netns"],
        &dir,
    );
    let _down = Down(&dir);
    assert!(out.status.success(), "{}", text(&out));
    let up: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let network = up["network"].as_str().expect("a network name").to_string();
    // Each tablet on its own address of the network's subnet, the orchestrator too.
    let addrs: Vec<String> = up["tablets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["mysql"]
                .as_str()
                .unwrap()
                .rsplit_once(':')
                .unwrap()
                .0
                .to_string()
        })
        .collect();
    assert!(addrs.iter().all(|a| a.starts_with("10.99.")), "{addrs:?}");
    let mut distinct = addrs.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{addrs:?}");
    let orch = up["orchestrator_http"].as_str().unwrap().to_string();
    // HTTPS with a certificate naming the orchestrator's host: the reparent below goes
    // through it.
    assert!(orch.starts_with("https://10.99."), "{orch}");
    let namespaces = || {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(namespaces().contains(&network), "{}", namespaces());
    // The orchestrator reaches the agents across hosts: a planned reparent succeeds.
    let out = myhactl(&["reparent", "planned", "commerce/0", "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let out = myhactl(&["sandbox", "down", "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !namespaces().contains(&network),
        "left behind: {}",
        namespaces()
    );
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    let name = network.trim_start_matches("myha-");
    assert!(!links.contains(&format!("mh-{name}")), "{links}");
}
