//! etcd secured as the harness (and the sandbox) runs it: TLS on the client port with client
//! certificates required, authentication on, the `myha` user's role limited to its prefix.
//! Each way in that must be refused is, with an error that says why, while a legitimate
//! client keeps working; daemons and myhactl name the setting at fault.
//!
//! Real etcd processes (the harness's, one per test, on free loopback ports).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use pki::issue::{Authority, Leaf};
use pki::TlsFiles;
use topo::{CellRecord, EtcdAccess, EtcdUser, Refusal, Topo, TopoError};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const KEYS: pki::TlsKeys = ["ca", "cert", "key"];

struct TestEtcd {
    etcd: harness::Etcd,
    dir: tempfile::TempDir,
}

impl TestEtcd {
    async fn start() -> TestEtcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let etcd = harness::Etcd::launch(&dir.path().join("etcd"), false)
            .await
            .expect("start etcd");
        TestEtcd { etcd, dir }
    }

    fn security(&self) -> &harness::EtcdSecurity {
        self.etcd.security().expect("the harness's etcd is secured")
    }

    /// The operator's certificate and the `myha` user: the legitimate client.
    fn access(&self) -> EtcdAccess {
        self.etcd.access().expect("access")
    }

    async fn connect(&self, access: &EtcdAccess) -> Result<Topo, TopoError> {
        Topo::connect_with([self.etcd.endpoint()], "/myha", SECS(2), access).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.etcd.log_path()).unwrap_or_default()
    }
}

/// A write and a read through `t`, which must both work.
async fn still_works(t: &Topo, n: usize) {
    let name = format!("cell{n}");
    t.put_cell(&CellRecord { name: name.clone() })
        .await
        .unwrap_or_else(|e| panic!("the legitimate client's write {n} failed: {e}"));
    let cells = t.list_cells().await.expect("legitimate read");
    assert!(cells.iter().any(|c| c.name == name), "{cells:?}");
}

fn refused(r: Result<Topo, TopoError>, kind: Refusal, words: &[&str]) -> String {
    let e = match r {
        Ok(_) => panic!("connected, but a {kind} refusal was expected"),
        Err(e) => e,
    };
    assert_eq!(e.refusal(), Some(kind), "{e}");
    let text = e.to_string();
    eprintln!("refused as expected: {text}");
    for w in words {
        assert!(text.contains(w), "expected {w:?} in: {text}");
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_required_and_must_be_of_the_cluster_ca() {
    let etcd = TestEtcd::start().await;
    let good = etcd
        .connect(&etcd.access())
        .await
        .expect("legitimate client");
    still_works(&good, 0).await;

    // No client certificate: the handshake is refused (etcd says why in its log; a client of
    // ours always has one, myhactl refuses --ca without --cert and --key).
    let ca_pem = std::fs::read(etcd.security().certs().ca_file()).unwrap();
    let tls = topo::etcd_client::TlsOptions::new()
        .ca_certificate(topo::etcd_client::Certificate::from_pem(&ca_pem));
    let options = topo::etcd_client::ConnectOptions::new()
        .with_connect_timeout(SECS(2))
        .with_timeout(SECS(2))
        .with_tls(tls);
    let raw = topo::etcd_client::Client::connect([etcd.etcd.endpoint()], Some(options))
        .await
        .expect("lazy connect");
    let r = raw.kv_client().get("/myha/", None).await;
    assert!(r.is_err(), "a client without a certificate read etcd");
    let deadline = tokio::time::Instant::now() + SECS(5);
    while !etcd.log().contains("client didn't provide a certificate") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "etcd did not log the refusal: {}",
            etcd.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_works(&good, 1).await;

    // A client certificate of another CA (with the right CA to verify etcd).
    let dir = etcd.dir.path().join("other-ca");
    std::fs::create_dir_all(&dir).unwrap();
    let other = Authority::new("some other CA").unwrap();
    let other_files = other
        .issue(&Leaf::client("myhactl"))
        .unwrap()
        .write(&dir, "intruder", &other)
        .unwrap();
    let mixed = TlsFiles {
        ca_file: etcd.security().certs().ca_file(),
        ..other_files.clone()
    }
    .load(KEYS)
    .unwrap();
    let r = etcd
        .connect(&EtcdAccess {
            tls: Some(mixed),
            user: etcd.access().user,
        })
        .await;
    refused(
        r,
        Refusal::Tls,
        &[
            "(TLS)",
            "etcd rejected this client's certificate",
            "BadCertificate",
        ],
    );

    // Trusting another CA: etcd's own certificate is not believed.
    let r = etcd
        .connect(&EtcdAccess {
            tls: Some(other_files.load(KEYS).unwrap()),
            user: etcd.access().user,
        })
        .await;
    refused(
        r,
        Refusal::Tls,
        &["etcd's server certificate is not signed by the CA this client trusts"],
    );

    // Plaintext to the TLS port, and TLS settings on an http:// endpoint.
    let plain = Topo::connect(
        [etcd.etcd.endpoint().replace("https://", "http://")],
        "/myha",
        SECS(1),
    )
    .await
    .expect("lazy");
    assert!(plain.list_cells().await.is_err(), "plaintext read etcd");
    let e = Topo::connect_with(
        [etcd.etcd.endpoint().replace("https://", "http://")],
        "/myha",
        SECS(1),
        &etcd.access(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("must be https://"), "{e}");

    still_works(&good, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_passwords_and_roles_are_enforced_with_clear_errors() {
    let etcd = TestEtcd::start().await;
    let good = etcd
        .connect(&etcd.access())
        .await
        .expect("legitimate client");
    still_works(&good, 0).await;
    let operator = etcd.access().tls;

    // No user: etcd takes the certificate's common name as the user, which has no role.
    let r = etcd
        .connect(&EtcdAccess {
            tls: operator.clone(),
            user: None,
        })
        .await;
    refused(
        r,
        Refusal::Permission,
        &[
            "permission denied",
            "no etcd user given",
            "common name \"myhactl\"",
        ],
    );

    // A wrong password, and a user etcd does not know: the same answer, by design.
    for user in [
        EtcdUser::new("myha", "not-the-password"),
        EtcdUser::new("mallory", "whatever"),
    ] {
        let name = user.name().to_string();
        let r = etcd
            .connect(&EtcdAccess {
                tls: operator.clone(),
                user: Some(user),
            })
            .await;
        let text = refused(
            r,
            Refusal::Authentication,
            &[
                "refused authenticate",
                &format!("user name or password of user {name:?}"),
                "authentication failed",
            ],
        );
        assert!(!text.contains("not-the-password"), "{text}");
    }

    // The right user outside its prefix.
    let outside =
        Topo::connect_with([etcd.etcd.endpoint()], "/other", SECS(2), &etcd.access()).await;
    refused(
        outside,
        Refusal::Permission,
        &[
            "permission denied",
            "etcd user \"myha\" has no role granting",
        ],
    );
    still_works(&good, 1).await;

    // Users and roles change (a new user, a role granted): the legitimate client, already
    // authenticated, keeps working.
    let root = etcd
        .security()
        .root_topo(&[etcd.etcd.endpoint()])
        .await
        .expect("root");
    let mut auth = root.client().auth_client();
    auth.user_add("reader", "reader-pw", None).await.unwrap();
    auth.role_add("reader").await.unwrap();
    auth.role_grant_permission(
        "reader",
        topo::etcd_client::Permission::read("/myha").with_prefix(),
    )
    .await
    .unwrap();
    auth.user_grant_role("reader", "reader").await.unwrap();
    still_works(&good, 2).await;
    // The new read-only user reads, and is refused a write with the reason.
    let reader = etcd
        .connect(&EtcdAccess {
            tls: operator.clone(),
            user: Some(EtcdUser::new("reader", "reader-pw")),
        })
        .await
        .expect("reader connects");
    assert!(reader.list_cells().await.unwrap().len() >= 3);
    let e = reader
        .put_cell(&CellRecord {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.refusal(), Some(Refusal::Permission), "{e}");
    assert!(
        e.to_string()
            .contains("permission denied: etcd user \"reader\" has no role granting"),
        "{e}"
    );
    still_works(&good, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_etcd_forgets_tokens_and_clients_authenticate_again() {
    let etcd = TestEtcd::start().await;
    let good = etcd
        .connect(&etcd.access())
        .await
        .expect("legitimate client");
    still_works(&good, 0).await;
    etcd.etcd.kill().unwrap();
    etcd.etcd.start().await.expect("restart");
    // The first calls may meet the restart; within a few seconds it works again, on a new
    // token (etcd's simple tokens live in memory).
    let deadline = tokio::time::Instant::now() + SECS(10);
    loop {
        match good.list_cells().await {
            Ok(_) => break,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    still_works(&good, 1).await;
}

/// The output of `bin args...` (stdout and stderr), and whether it succeeded; bounded.
async fn run(bin: &str, args: &[&str], env: &[(&str, String)]) -> (bool, String) {
    let path = harness::find_myha_bin(bin).unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .env("MYHA_SANDBOX_DIR", "/nonexistent/myha-sandbox")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    for var in [
        "MYHA_ETCD",
        "MYHA_CA",
        "MYHA_CERT",
        "MYHA_KEY",
        "MYHA_ETCD_USER",
        "MYHA_ETCD_PASSWORD",
        "MYHA_ETCD_PASSWORD_FILE",
        "MYHA_ORCHESTRATOR",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let out: Output = tokio::time::timeout(SECS(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} did not exit within 30 s"))
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_and_myhactl_name_the_etcd_setting_at_fault() {
    let etcd = TestEtcd::start().await;
    let good = etcd
        .connect(&etcd.access())
        .await
        .expect("legitimate client");
    let dir = etcd.dir.path();
    let endpoints = vec![etcd.etcd.endpoint()];
    let section = etcd
        .etcd
        .daemon_section_toml(endpoints.clone(), "/myha", "myha-orchestrator")
        .unwrap();
    let gw_section = etcd
        .etcd
        .daemon_section_toml(endpoints.clone(), "/myha", "myha-gateway")
        .unwrap();
    let agent_head = "[tablet]\ncell = \"zone1\"\nuid = 1\nkeyspace = \"ks\"\nshard = \"0\"\n\
                      [mysql]\nport = 4000\nuser = \"u\"\nrepl_user = \"r\"\n";
    let ca = etcd.security().certs().ca_file().display().to_string();

    // --check-config: the legitimate configs pass, a missing CA file is named by its key.
    for (bin, text) in [
        ("myha-orchestrator", section.clone()),
        ("myha-gateway", gw_section.clone()),
        ("myha-agent", format!("{agent_head}{section}")),
    ] {
        let cfg = write(&dir.join(format!("{bin}.toml")), &text);
        let (ok, out) = run(bin, &["--config", &cfg, "--check-config"], &[]).await;
        assert!(ok, "{bin}: {out}");
        let broken = text.replace(&format!("{ca:?}"), "\"/nonexistent/etcd-ca.pem\"");
        assert_ne!(broken, text);
        let cfg = write(&dir.join(format!("{bin}-bad.toml")), &broken);
        let (ok, out) = run(bin, &["--config", &cfg, "--check-config"], &[]).await;
        assert!(
            !ok && out.contains("etcd.tls.ca_file")
                && out.contains("cannot read /nonexistent/etcd-ca.pem"),
            "{bin}: {out}"
        );
    }

    // A password file that is not there: named at start.
    let no_pw = section.replace(
        &format!("{:?}", etcd.security().password_file()),
        "\"/nonexistent/etcd-password\"",
    );
    assert_ne!(no_pw, section);
    let cfg = write(&dir.join("orch-no-pw.toml"), &no_pw);
    let (ok, out) = run(
        "myha-orchestrator",
        &["--config", &cfg, "--check-config"],
        &[],
    )
    .await;
    assert!(
        !ok && out.contains("etcd.password_file") && out.contains("/nonexistent/etcd-password"),
        "{out}"
    );

    // A wrong password: the orchestrator does not start, and says etcd refused the user;
    // the password itself is printed nowhere.
    let wrong = dir.join("wrong-password");
    std::fs::write(&wrong, "wrong-secret-123\n").unwrap();
    let text = section.replace(
        &format!("{:?}", etcd.security().password_file()),
        &format!("{wrong:?}"),
    );
    let cfg = write(&dir.join("orch-wrong-pw.toml"), &text);
    let (ok, out) = run("myha-orchestrator", &["--config", &cfg], &[]).await;
    assert!(
        !ok && out.contains("etcd refused authenticate")
            && out.contains("user name or password of user \"myha\""),
        "{out}"
    );
    assert!(!out.contains("wrong-secret-123"), "{out}");

    // myhactl: the etcd user and certificate from flags or environment.
    let files = etcd.security().operator_files();
    let path = |p: &Path| p.display().to_string();
    let mut env: Vec<(&str, String)> = vec![
        ("MYHA_ETCD", etcd.etcd.endpoint()),
        ("MYHA_CA", path(&files.ca_file)),
        ("MYHA_CERT", path(&files.cert_file)),
        ("MYHA_KEY", path(&files.key_file)),
        ("MYHA_ETCD_USER", "myha".into()),
        (
            "MYHA_ETCD_PASSWORD_FILE",
            path(etcd.security().password_file()),
        ),
    ];
    let (ok, out) = run("myhactl", &["status", "--json"], &env).await;
    assert!(ok, "{out}");
    // The audit, from etcd (no orchestrator answers on port 1).
    let (ok, out) = run(
        "myhactl",
        &["audit", "--json", "--orchestrator", "127.0.0.1:1"],
        &env,
    )
    .await;
    assert!(ok && out.contains("\"source\": \"etcd\""), "{out}");
    env.retain(|(k, _)| *k != "MYHA_ETCD_PASSWORD_FILE");
    let (ok, out) = run("myhactl", &["status"], &env).await;
    assert!(
        !ok && out.contains("--etcd-user \"myha\" needs its password"),
        "{out}"
    );
    env.push(("MYHA_ETCD_PASSWORD", "wrong-secret-123".into()));
    let (ok, out) = run("myhactl", &["status"], &env).await;
    assert!(
        !ok && out.contains("connecting to etcd")
            && out.contains("user name or password of user \"myha\""),
        "{out}"
    );
    assert!(!out.contains("wrong-secret-123"), "{out}");
    let (ok, out) = run(
        "myhactl",
        &["status", "--etcd", &etcd.etcd.endpoint(), "--ca", &ca],
        &[],
    )
    .await;
    assert!(!ok && out.contains("--cert, --key missing"), "{out}");
    // No user at all: etcd refuses, and says the certificate's name stood in for one.
    let no_user: Vec<(&str, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("MYHA_ETCD_") || *k == "MYHA_ETCD")
        .cloned()
        .collect();
    let (ok, out) = run("myhactl", &["status"], &no_user).await;
    assert!(
        !ok && out.contains("permission denied") && out.contains("common name \"myhactl\""),
        "{out}"
    );

    still_works(&good, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_by_etcd_keeps_running_and_reports_why() {
    let c = harness::Cluster::start(harness::ClusterOptions {
        tablets: 1,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let dir = c.dir().join("refused-agent");
    let mut cfg = c.agent_config(0).unwrap();
    cfg.tablet.uid = 902;
    cfg.agent.state_dir = dir.join("state");
    // Not the tablet's agent: it must not act on the tablet's mysqld (a wrong MySQL password
    // keeps it off), only show how it takes etcd's refusal.
    cfg.mysql.password_file =
        Some(harness::write_secret(&dir.join("secrets"), "mysql", "wrong").unwrap());
    cfg.etcd.password_file =
        Some(harness::write_secret(&dir.join("secrets"), "etcd", "wrong-etcd-secret").unwrap());
    let agent = harness::AgentProc::launch(cfg, &dir, false)
        .await
        .expect("the agent starts without etcd");
    let mut client = agent.client().await.expect("gRPC client");
    let deadline = tokio::time::Instant::now() + SECS(20);
    let health = loop {
        let h = client
            .full_status(myha_proto::agent::FullStatusRequest {})
            .await
            .expect("FullStatus")
            .into_inner();
        if h.etcd_error.contains("refused") {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal reported: {:?}",
            h.etcd_error
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!health.etcd_connected);
    assert!(
        health
            .etcd_error
            .contains("user name or password of user \"myha\""),
        "{}",
        health.etcd_error
    );
    assert!(!health.etcd_error.contains("wrong-etcd-secret"));
    assert!(agent.is_running(), "the agent keeps running");
    // The cluster's own clients are unaffected.
    c.topo().list_cells().await.expect("legitimate client");
}
