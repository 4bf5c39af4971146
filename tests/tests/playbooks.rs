//! The Ansible playbooks (`playbooks/`) deploy a working, secured fleet: run for real with
//! `ansible-playbook` against local "hosts" (one per tablet of a harness cluster, the
//! orchestrator and gateway on the same machine), into a temp root with services left to the
//! test. The test then starts the *deployed* binaries with the *rendered* configs and checks that
//! they work: the agents register with the MySQL accounts the playbook created, the orchestrator
//! sees a healthy shard through its token-protected API, the gateway routes a write. A second run
//! must change nothing.
//!
//! Security (docs/security.md, playbooks/README.md):
//! - every certificate the play distributes is issued with the openssl commands of
//!   docs/security.md (the blocks marked `<!-- test:... -->`, run here as written), signed by
//!   the harness's CA (which etcd and the harness's mysqld trust); the deployed `ca_file` also
//!   holds a second CA made with the doc's CA command, first: a CA rollover's first step;
//! - etcd with TLS and users: the agents and the orchestrator as the harness's read-write user,
//!   the gateway as a read-only user made here;
//! - the rendered configs hold no secret (only file names), key and secret files are 0600, and
//!   no secret shows in ansible's output;
//! - the play refuses, naming the variable and before changing anything, the placeholder
//!   passwords of the defaults, an orchestrator without an API token, and an agent gRPC port
//!   off loopback without TLS.
//!
//! Needs `ansible-playbook` (package ansible-core, installed by `scripts/dev`), `openssl` and the
//! binaries (`MYHA_BIN_DIR`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{find_myha_bin, free_port, Cluster, ClusterOptions, ConfigDaemon};
use mysql_async::prelude::Queryable;
use serde_json::{json, Map, Value};

const BOUND: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn playbooks_dir() -> PathBuf {
    workspace().join("playbooks")
}

/// A binary the playbook deployed into `root`, started with a config it rendered.
fn deployed(root: &Path, bin: &str, config: &Path) -> ConfigDaemon {
    let name = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| bin.to_string());
    ConfigDaemon::start(
        &root.join("usr/local/bin").join(bin),
        config,
        root.join(format!("{name}.log")),
    )
    .unwrap_or_else(|e| panic!("start deployed {bin}: {e}"))
}

/// `ansible-playbook site.yml` with `inventory` (and `extra` arguments): whether it succeeded,
/// and its output (also written to `log`).
fn ansible(inventory: &Path, log: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new("ansible-playbook")
        .current_dir(playbooks_dir())
        .env("ANSIBLE_CONFIG", playbooks_dir().join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env(
            "ANSIBLE_LOCAL_TEMP",
            inventory.parent().expect("dir").join("ansible-tmp"),
        )
        .arg("-i")
        .arg(inventory)
        .args(extra)
        .arg("site.yml")
        .stdin(Stdio::null())
        .output()
        .expect("run ansible-playbook (package ansible-core; scripts/dev installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(log, &text).expect("write playbook log");
    (out.status.success(), text)
}

/// A run that must succeed; returns the PLAY RECAP's `changed=` per host.
fn run_playbook(inventory: &Path, log: &Path) -> Vec<(String, u32)> {
    let (ok, text) = ansible(inventory, log, &[]);
    assert!(ok, "ansible-playbook failed:\n{text}");
    let recap = text
        .split("PLAY RECAP")
        .nth(1)
        .unwrap_or_else(|| panic!("no PLAY RECAP in:\n{text}"));
    let hosts: Vec<(String, u32)> = recap
        .lines()
        .filter(|l| l.contains("changed="))
        .map(|l| {
            let host = l.split_whitespace().next().unwrap_or("").to_string();
            let changed = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("changed="))
                .and_then(|n| n.parse().ok())
                .expect("changed=N");
            let failed = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("failed="))
                .and_then(|n| n.parse::<u32>().ok())
                .expect("failed=N");
            assert_eq!(failed, 0, "{l}");
            (host, changed)
        })
        .collect();
    assert!(!hosts.is_empty(), "empty recap:\n{text}");
    hosts
}

/// The shell block of docs/security.md marked `<!-- test:<name> -->`.
fn doc_block(name: &str) -> String {
    let doc = std::fs::read_to_string(workspace().join("docs/security.md"))
        .expect("read docs/security.md");
    let marker = format!("<!-- test:{name} -->");
    let after = doc
        .split_once(&marker)
        .unwrap_or_else(|| panic!("docs/security.md has no {marker}"))
        .1;
    let body = after
        .trim_start()
        .strip_prefix("```sh\n")
        .unwrap_or_else(|| panic!("{marker} is not followed by a ```sh block"));
    body.split_once("```")
        .unwrap_or_else(|| panic!("{marker}: unterminated block"))
        .0
        .to_string()
}

/// Runs a doc block with bash in `dir`; `first_line` replaces the block's first line (its
/// settings, e.g. `CN=... SAN=...`), which must start like it.
fn run_doc_block(dir: &Path, name: &str, first_line: Option<&str>) {
    let mut script = doc_block(name);
    if let Some(line) = first_line {
        let (first, rest) = script.split_once('\n').expect("a multi-line block");
        let key = line.split('=').next().expect("NAME=...");
        assert!(
            first.starts_with(&format!("{key}=")),
            "docs/security.md block {name} starts with {first:?}, not {key}=..."
        );
        script = format!("{line}\n{rest}");
    }
    let out = Command::new("bash")
        .arg("-euc")
        .arg(&script)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "docs/security.md block {name} failed in {}:\n{script}\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// The inventory as YAML (JSON is YAML): `vars` for all, one host per tablet, `o1`, `g1`.
fn write_inventory(
    path: &Path,
    vars: &Map<String, Value>,
    tablets: &[Value],
    orch: Value,
    gw: Value,
) {
    let local = json!({
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
    });
    let with_local = |v: &Value| {
        let mut m = local.as_object().expect("object").clone();
        m.extend(v.as_object().expect("host vars").clone());
        Value::Object(m)
    };
    let tablet_hosts: Map<String, Value> = tablets
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("t{i}"), with_local(t)))
        .collect();
    let inv = json!({
        "all": {
            "vars": vars,
            "children": {
                "myha_tablets": { "hosts": tablet_hosts },
                "myha_orchestrators": { "hosts": { "o1": with_local(&orch) } },
                "myha_gateways": { "hosts": { "g1": with_local(&gw) } },
            }
        }
    });
    std::fs::write(path, serde_json::to_string_pretty(&inv).expect("json")).expect("inventory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playbooks_deploy_a_working_fleet() {
    let c = Cluster::start(ClusterOptions {
        start_agents: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    let bin_src = find_myha_bin("myha-agent")
        .expect("binaries built (MYHA_BIN_DIR)")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let prefix = c.options().prefix.clone();

    // --- Certificates, made on the "controller" with docs/security.md's commands. ---
    let pki = work.path().join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    // The leaves are signed by the harness's CA: etcd and the harness's mysqld trust it.
    let authority = c.certs().authority();
    std::fs::write(pki.join("ca.pem"), authority.cert_pem()).expect("ca.pem");
    std::fs::write(pki.join("ca-key.pem"), authority.key_pem()).expect("ca-key.pem");
    std::fs::set_permissions(
        pki.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    // A new CA from the doc's command, first in the deployed ca_file (a rollover's first step:
    // both trusted, every certificate still from the old one).
    let new_ca = work.path().join("pki-new");
    std::fs::create_dir_all(&new_ca).expect("pki-new dir");
    run_doc_block(&new_ca, "ca", None);
    assert_eq!(
        mode(&new_ca.join("ca-key.pem")),
        0o600,
        "the CA key is 0600"
    );
    let bundle = pki.join("ca-bundle.pem");
    std::fs::write(
        &bundle,
        format!(
            "{}{}",
            std::fs::read_to_string(new_ca.join("ca.pem")).expect("new ca"),
            authority.cert_pem()
        ),
    )
    .expect("bundle");
    for t in c.tablets() {
        for cn in [
            format!("agent-{}", t.alias()),
            format!("mysql-{}", t.alias()),
        ] {
            run_doc_block(
                &pki,
                "server",
                Some(&format!("CN={cn} SAN=\"IP:127.0.0.1\"")),
            );
        }
    }
    for cn in ["myha-orchestrator", "myha-gateway"] {
        run_doc_block(&pki, "client", Some(&format!("CN={cn}")));
    }
    let pem = |name: &str| pki.join(name).display().to_string();

    // --- Secrets. ---
    let agent_pw = harness::random_password();
    let repl_pw = harness::random_password();
    let ops_token = harness::random_password();
    let read_token = harness::random_password();
    let security = c.etcd().security().expect("the harness's etcd is secured");
    let etcd_pw = security.password().expose().to_string();
    // The gateway's etcd user may only read (docs/security.md#etcd).
    let read_pw = harness::random_password();
    {
        let rootc = security
            .root_topo(&c.etcd_endpoints())
            .await
            .expect("etcd as root");
        let mut auth = rootc.client().auth_client();
        auth.role_add("pb-read").await.expect("role");
        auth.role_grant_permission(
            "pb-read",
            topo::etcd_client::Permission::read(format!("{}/", prefix.trim_end_matches('/')))
                .with_prefix(),
        )
        .await
        .expect("grant read");
        auth.user_add("pb-read", read_pw.as_str(), None)
            .await
            .expect("user");
        auth.user_grant_role("pb-read", "pb-read")
            .await
            .expect("grant role");
    }
    let secrets = [
        ("the agent's MySQL password", agent_pw.as_str()),
        ("the replication password", repl_pw.as_str()),
        ("the ops token", ops_token.as_str()),
        ("the read token", read_token.as_str()),
        ("the etcd password", etcd_pw.as_str()),
        ("the gateway's etcd password", read_pw.as_str()),
    ];
    let leaks = |what: &str, text: &str| {
        for (name, s) in secrets {
            assert!(!text.contains(s), "{what} contains {name}");
        }
    };

    // --- The inventory. ---
    let orch_port = free_port().expect("port");
    let gw_admin = free_port().expect("port");
    let gw_rw = free_port().expect("port");
    let gw_ro = free_port().expect("port");
    let vars = json!({
        "myha_root": root.display().to_string(),
        "myha_manage_services": false,
        "myha_create_user": false,
        "myha_become": false,
        "myha_bin_src": bin_src.display().to_string(),
        "myha_etcd_endpoints": c.etcd_endpoints(),
        "myha_etcd_prefix": prefix,
        "myha_etcd_username": security.user(),
        "myha_etcd_password": etcd_pw,
        "myha_gateway_etcd_username": "pb-read",
        "myha_gateway_etcd_password": read_pw,
        "myha_log_format": "human",
        "myha_mysql_agent_user": "pb_agent",
        "myha_mysql_agent_password": agent_pw,
        "myha_mysql_repl_user": "pb_repl",
        "myha_mysql_repl_password": repl_pw,
        "myha_orchestrator_api_tokens": [
            { "name": "ops", "role": "operate", "token": ops_token },
            { "name": "grafana", "role": "read", "token": read_token },
        ],
        "myha_tls_ca_src": bundle.display().to_string(),
        "myha_mysql_tls_ca_src": pem("ca.pem"),
    })
    .as_object()
    .expect("object")
    .clone();
    let tablets: Vec<Value> = c
        .tablets()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({
                "myha_cell": t.cell(),
                "myha_uid": t.uid(),
                "myha_keyspace": c.keyspace(),
                "myha_shard": c.shard(),
                "myha_mysql_port": t.mysqld().port(),
                "myha_mysql_socket": t.mysqld().socket().display().to_string(),
                "myha_server_id": t.mysqld().server_id(),
                "myha_bootstrap_users": i == 0,
                "myha_mariadb_cnf": format!("/etc/mysql/mariadb.conf.d/60-myha-{}.cnf", t.alias()),
                // One "host" per tablet shares this root: each its own mysqld TLS directory.
                "myha_mariadb_tls_dir": format!("/etc/mysql/tls-{}", t.alias()),
                "myha_mariadb_tls_cert_src": pem(&format!("mysql-{}.pem", t.alias())),
                "myha_mariadb_tls_key_src": pem(&format!("mysql-{}-key.pem", t.alias())),
                // Every address, as the playbook's default: allowed because of TLS.
                "myha_agent_grpc_listen": "0.0.0.0:0",
                "myha_agent_http_listen": "127.0.0.1:0",
                "myha_agent_advertise_host": "127.0.0.1",
                "myha_agent_tls_cert_src": pem(&format!("agent-{}.pem", t.alias())),
                "myha_agent_tls_key_src": pem(&format!("agent-{}-key.pem", t.alias())),
            })
        })
        .collect();
    let orch = json!({
        "myha_orchestrator_http_listen": format!("127.0.0.1:{orch_port}"),
        "myha_orchestrator_tls_cert_src": pem("myha-orchestrator.pem"),
        "myha_orchestrator_tls_key_src": pem("myha-orchestrator-key.pem"),
    });
    let gw = json!({
        "myha_gateway_admin_listen": format!("127.0.0.1:{gw_admin}"),
        "myha_gateway_listeners": [{
            "keyspace": c.keyspace(), "shard": c.shard(),
            "rw": format!("127.0.0.1:{gw_rw}"), "ro": format!("127.0.0.1:{gw_ro}"),
        }],
        "myha_gateway_tls_cert_src": pem("myha-gateway.pem"),
        "myha_gateway_tls_key_src": pem("myha-gateway-key.pem"),
    });

    // --- Refusals: each names the variable, before any host is changed. ---
    let refused = |name: &str, vars: &Map<String, Value>, tablets: &[Value], expect: &str| {
        let inv = work.path().join(format!("inventory-{name}.yml"));
        write_inventory(&inv, vars, tablets, orch.clone(), gw.clone());
        let (ok, text) = ansible(&inv, &work.path().join(format!("playbook-{name}.log")), &[]);
        assert!(!ok, "{name}: the play must fail:\n{text}");
        assert!(text.contains(expect), "{name}: no {expect:?} in:\n{text}");
        assert!(
            !root.join("usr").exists() && !root.join("etc").exists(),
            "{name}: nothing may be deployed before the refusal"
        );
        leaks(&format!("the output of the refused run {name}"), &text);
    };
    let mut placeholders = vars.clone();
    placeholders.remove("myha_mysql_agent_password");
    placeholders.remove("myha_mysql_repl_password");
    refused(
        "placeholder-passwords",
        &placeholders,
        &tablets,
        "myha_mysql_agent_password is empty or a placeholder",
    );
    let mut no_token = vars.clone();
    no_token.remove("myha_orchestrator_api_tokens");
    refused(
        "no-api-token",
        &no_token,
        &tablets,
        "myha_orchestrator_api_token is empty and myha_orchestrator_api_tokens lists none",
    );
    let mut no_tls = vars.clone();
    no_tls.remove("myha_tls_ca_src");
    no_tls.insert(
        "myha_etcd_endpoints".into(),
        json!(["http://127.0.0.1:2379"]),
    );
    let plain_tablets: Vec<Value> = tablets
        .iter()
        .map(|t| {
            let mut t = t.as_object().expect("object").clone();
            t.remove("myha_agent_tls_cert_src");
            t.remove("myha_agent_tls_key_src");
            Value::Object(t)
        })
        .collect();
    let mut plain_orch = orch.clone();
    let mut plain_gw = gw.clone();
    for (h, k) in [
        (&mut plain_orch, "orchestrator"),
        (&mut plain_gw, "gateway"),
    ] {
        let m = h.as_object_mut().expect("object");
        m.remove(&format!("myha_{k}_tls_cert_src"));
        m.remove(&format!("myha_{k}_tls_key_src"));
    }
    {
        let inv = work.path().join("inventory-no-tls.yml");
        write_inventory(&inv, &no_tls, &plain_tablets, plain_orch, plain_gw);
        let (ok, text) = ansible(&inv, &work.path().join("playbook-no-tls.log"), &[]);
        assert!(!ok, "gRPC on every address without TLS must fail:\n{text}");
        assert!(
            text.contains("myha_agent_grpc_listen 0.0.0.0:0 is not a loopback address and no TLS"),
            "{text}"
        );
        assert!(!root.join("usr").exists() && !root.join("etc").exists());
        leaks("the output of the refused run without TLS", &text);
    }

    // --- The deployment. ---
    let inventory = work.path().join("inventory.yml");
    write_inventory(&inventory, &vars, &tablets, orch.clone(), gw.clone());
    let t0 = Instant::now();
    let first = run_playbook(&inventory, &work.path().join("playbook-1.log"));
    println!("first run {:.1} s: {first:?}", t0.elapsed().as_secs_f64());
    assert!(
        first.iter().all(|(_, changed)| *changed > 0),
        "every host got something on the first run: {first:?}"
    );
    let t1 = Instant::now();
    let second = run_playbook(&inventory, &work.path().join("playbook-2.log"));
    println!("second run {:.1} s: {second:?}", t1.elapsed().as_secs_f64());
    assert!(
        second.iter().all(|(_, changed)| *changed == 0),
        "a second run changes nothing: {second:?}\n{}",
        std::fs::read_to_string(work.path().join("playbook-2.log")).unwrap_or_default()
    );
    for log in ["playbook-1.log", "playbook-2.log"] {
        let text = std::fs::read_to_string(work.path().join(log)).expect("log");
        leaks(&format!("ansible's output ({log})"), &text);
    }

    // What was rendered: file names, never secrets.
    let etc = root.join("etc/myha");
    let tls_dir = etc.join("tls");
    let secrets_dir = etc.join("secrets");
    for t in c.tablets() {
        let cfg = std::fs::read_to_string(etc.join(format!("agent-{}.toml", t.alias())))
            .expect("agent config rendered");
        for want in [
            "user = \"pb_agent\"".to_string(),
            format!(
                "password_file = \"{}\"",
                secrets_dir.join("mysql-agent-password").display()
            ),
            format!(
                "repl_password_file = \"{}\"",
                secrets_dir.join("mysql-repl-password").display()
            ),
            "grpc_allowed_clients = [\"myha-orchestrator\"]".into(),
            "\n[tls]\n".into(),
            format!(
                "key_file = \"{}\"",
                tls_dir
                    .join(format!("agent-{}-key.pem", t.alias()))
                    .display()
            ),
            "\n[etcd.tls]\n".into(),
            format!("username = \"{}\"", security.user()),
            format!(
                "password_file = \"{}\"",
                secrets_dir.join("etcd-password").display()
            ),
            "\n[mysql.tls]\n".into(),
            "repl_tls = true".into(),
        ] {
            assert!(cfg.contains(&want), "agent config lacks {want:?}:\n{cfg}");
        }
        assert!(root
            .join(format!("var/lib/myha/agent-{}", t.alias()))
            .is_dir());
        let cnf = std::fs::read_to_string(root.join(format!(
            "etc/mysql/mariadb.conf.d/60-myha-{}.cnf",
            t.alias()
        )))
        .expect("mariadb settings");
        assert!(cnf.contains("ssl_cert") && cnf.contains("ssl_ca"), "{cnf}");
        assert_eq!(
            mode(&root.join(format!("etc/mysql/tls-{}/server-key.pem", t.alias()))),
            0o600,
            "mysqld's key"
        );
    }
    let orch_cfg = std::fs::read_to_string(etc.join("orchestrator.toml")).expect("orchestrator");
    for want in [
        format!(
            "token_file = \"{}\"",
            secrets_dir.join("api-token-ops").display()
        ),
        "role = \"read\"".to_string(),
        "\n[tls]\n".into(),
        "\n[etcd.tls]\n".into(),
    ] {
        assert!(
            orch_cfg.contains(&want),
            "orchestrator config lacks {want:?}:\n{orch_cfg}"
        );
    }
    let gw_cfg = std::fs::read_to_string(etc.join("gateway.toml")).expect("gateway");
    for want in [
        "username = \"pb-read\"".to_string(),
        format!(
            "password_file = \"{}\"",
            secrets_dir.join("gateway-etcd-password").display()
        ),
        "\n[tls]\n".into(),
    ] {
        assert!(
            gw_cfg.contains(&want),
            "gateway config lacks {want:?}:\n{gw_cfg}"
        );
    }
    // No secret anywhere but in the secret files; no inline secret setting.
    for f in files_under(&root) {
        if f.starts_with(&secrets_dir)
            || f.starts_with(root.join("usr"))
            || f.extension().is_some_and(|e| e == "log")
        {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        leaks(&f.display().to_string(), &text);
        if f.extension().is_some_and(|e| e == "toml") {
            for line in text.lines() {
                let key = line.split('=').next().unwrap_or("").trim();
                assert!(
                    !["password", "repl_password", "token", "api_token"].contains(&key),
                    "{}: inline secret setting {line:?}",
                    f.display()
                );
            }
        }
    }
    // Secret files and keys: 0600 (the directory of secrets 0700).
    assert_eq!(mode(&secrets_dir), 0o700);
    let expected = [
        ("mysql-agent-password", agent_pw.as_str()),
        ("mysql-repl-password", repl_pw.as_str()),
        ("etcd-password", etcd_pw.as_str()),
        ("gateway-etcd-password", read_pw.as_str()),
        ("api-token-ops", ops_token.as_str()),
        ("api-token-grafana", read_token.as_str()),
    ];
    for (name, value) in expected {
        let p = secrets_dir.join(name);
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        assert_eq!(
            std::fs::read_to_string(&p).expect("secret"),
            value,
            "{name}"
        );
    }
    assert_eq!(files_under(&secrets_dir).len(), expected.len());
    let keys: Vec<PathBuf> = files_under(&tls_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("-key.pem"))
        .collect();
    assert_eq!(keys.len(), c.tablets().len() + 2, "{keys:?}");
    for k in &keys {
        assert_eq!(mode(k), 0o600, "{}", k.display());
    }
    assert_eq!(
        std::fs::read(tls_dir.join("ca.pem")).expect("ca"),
        std::fs::read(&bundle).expect("bundle")
    );
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/myha-agent@.service"))
        .expect("agent unit");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/myha-agent --config /etc/myha/agent-%i.toml"),
        "{unit}"
    );
    for u in ["myha-orchestrator.service", "myha-gateway.service"] {
        assert!(root.join("etc/systemd/system").join(u).is_file(), "{u}");
    }
    // One "host" per tablet shares this root: each got its own settings file.
    let primary = c.initial_primary();
    let cnf = std::fs::read_to_string(root.join(format!(
        "etc/mysql/mariadb.conf.d/60-myha-{}.cnf",
        primary.alias()
    )))
    .expect("mariadb settings");
    assert!(
        cnf.contains(&format!(
            "server_id                = {}",
            primary.mysqld().server_id()
        )),
        "{cnf}"
    );
    assert!(
        cnf.contains("rpl_semi_sync_master_wait_point = AFTER_SYNC"),
        "{cnf}"
    );

    // The accounts exist on every tablet (created on the primary, replicated: applied on the
    // replicas a moment after the playbook saw them committed), with the least privileges.
    c.wait_replicated(BOUND)
        .await
        .expect("the replicas apply the primary's binlog");
    for t in c.tablets() {
        let mut conn = t.root_conn().await.expect("root conn");
        let n: Option<u64> = conn
            .query_first(
                "SELECT COUNT(*) FROM mysql.user WHERE user IN ('pb_agent','pb_repl') \
                 AND host IN ('%','localhost')",
            )
            .await
            .expect("count users");
        assert_eq!(n, Some(4), "{}: accounts replicated", t.alias());
        let grants: Vec<String> = conn
            .query("SHOW GRANTS FOR 'pb_agent'@'%'")
            .await
            .expect("grants");
        let grants = grants.join("\n");
        assert!(
            !grants.contains("ALL PRIVILEGES") && !grants.contains("GRANT OPTION"),
            "{grants}"
        );
        let ssl: Option<String> = conn
            .query_first("SELECT ssl_type FROM mysql.user WHERE user = 'pb_repl' AND host = '%'")
            .await
            .expect("ssl_type");
        assert_eq!(ssl.as_deref(), Some("ANY"), "pb_repl is REQUIRE SSL");
    }

    // The deployed daemons work with the rendered configs.
    let agents: Vec<ConfigDaemon> = c
        .tablets()
        .iter()
        .map(|t| {
            deployed(
                &root,
                "myha-agent",
                &etc.join(format!("agent-{}.toml", t.alias())),
            )
        })
        .collect();
    let orch = deployed(&root, "myha-orchestrator", &etc.join("orchestrator.toml"));
    let gw = deployed(&root, "myha-gateway", &etc.join("gateway.toml"));
    // reqwest is built without a default TLS provider (see pki::install_crypto_provider).
    pki::install_crypto_provider();
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{orch_port}/api/v1");
    let started = Instant::now();
    let mut last = String::new();
    loop {
        for a in &agents {
            a.check_alive()
                .unwrap_or_else(|e| panic!("{e}\n{}", a.log_tail(30)));
        }
        orch.check_alive()
            .unwrap_or_else(|e| panic!("{e}\n{}", orch.log_tail(30)));
        gw.check_alive()
            .unwrap_or_else(|e| panic!("{e}\n{}", gw.log_tail(30)));
        let registered = c
            .topo()
            .list_tablets(Some(c.keyspace()), Some(c.shard()))
            .await
            .map(|v| v.len())
            .unwrap_or(0);
        let shard: Option<Value> = match http
            .get(format!("{api}/shards"))
            .bearer_auth(&read_token)
            .send()
            .await
        {
            Ok(r) => r.json::<Value>().await.ok().and_then(|v| {
                v["shards"].as_array().and_then(|s| {
                    s.iter()
                        .find(|s| s["keyspace"] == c.keyspace() && s["shard"] == c.shard())
                        .cloned()
                })
            }),
            Err(_) => None,
        };
        let healthy = shard.as_ref().is_some_and(|s| {
            s["primary"] == c.initial_primary().alias()
                && s["problems"].as_array().is_some_and(|p| p.is_empty())
                && s["tablets"].as_array().is_some_and(|t| t.len() == 3)
        });
        if registered == 3 && healthy {
            break;
        }
        last = format!("registered {registered}, shard {shard:?}");
        assert!(
            started.elapsed() < BOUND,
            "deployed fleet not healthy after {BOUND:?}: {last}\n--- orchestrator ---\n{}\n--- agent 0 ---\n{}",
            orch.log_tail(30),
            agents[0].log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "deployed agents registered and shard healthy in {:.1} s ({last})",
        started.elapsed().as_secs_f64()
    );
    // The API: no token 401, a read token may not change anything (403).
    let r = http.get(format!("{api}/shards")).send().await.expect("GET");
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let r = http
        .post(format!("{api}/recoveries/disable"))
        .bearer_auth(&read_token)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), reqwest::StatusCode::FORBIDDEN);

    // A write through the deployed gateway's RW port reaches the primary.
    let creds = c.credentials();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(gw_rw)
        .user(Some(creds.app_user.clone()))
        .pass(Some(creds.app_password.clone()))
        .db_name(Some(creds.database.clone()));
    let started = Instant::now();
    let server_id: u32 = loop {
        let attempt = async {
            let mut conn = mysql_async::Conn::new(opts.clone()).await?;
            conn.query_drop("CREATE TABLE IF NOT EXISTS pb (id INT PRIMARY KEY)")
                .await?;
            conn.query_drop("REPLACE INTO pb VALUES (1)").await?;
            let id: Option<u32> = conn.query_first("SELECT @@server_id").await?;
            conn.disconnect().await?;
            Ok::<_, mysql_async::Error>(id.unwrap_or(0))
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(id)) => break id,
            other => {
                gw.check_alive().unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    started.elapsed() < BOUND,
                    "no write through the deployed gateway: {other:?}\n{}",
                    gw.log_tail(30)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(server_id, c.initial_primary().mysqld().server_id());

    // A planned reparent through the API with the `operate` token: the orchestrator calls the
    // agents' reparent actions with its certificate (its CN on the allow-list the play
    // rendered), and the replicas repoint with the play's replication account, over TLS
    // (REQUIRE SSL) verified against the CA the play installed.
    let target = c.tablet(1).alias().to_string();
    let r = http
        .post(format!(
            "{api}/shards/{}/{}/reparent",
            c.keyspace(),
            c.shard()
        ))
        .bearer_auth(&ops_token)
        .json(&json!({ "mode": "planned", "to": target }))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("POST reparent");
    let status = r.status();
    let events = r.text().await.unwrap_or_default();
    assert!(status.is_success(), "reparent: {status}: {events}");
    let started = Instant::now();
    loop {
        let shard: Option<Value> = match http
            .get(format!("{api}/shards"))
            .bearer_auth(&read_token)
            .send()
            .await
        {
            Ok(r) => r.json::<Value>().await.ok().and_then(|v| {
                v["shards"].as_array().and_then(|s| {
                    s.iter()
                        .find(|s| s["keyspace"] == c.keyspace() && s["shard"] == c.shard())
                        .cloned()
                })
            }),
            Err(_) => None,
        };
        if shard.as_ref().is_some_and(|s| {
            s["primary"] == target.as_str()
                && s["problems"].as_array().is_some_and(|p| p.is_empty())
        }) {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "no healthy shard under {target} after the reparent: {shard:?}\n{events}\n{}",
            orch.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in c.tablets().iter().filter(|t| t.alias() != target) {
        let started = Instant::now();
        loop {
            let mut conn = t.root_conn().await.expect("root conn");
            let s = harness::slave_status(&mut conn)
                .await
                .expect("slave status")
                .unwrap_or_default();
            let get = |k: &str| s.get(k).cloned().flatten().unwrap_or_default();
            if get("Slave_IO_Running") == "Yes" && get("Slave_SQL_Running") == "Yes" {
                assert_eq!(get("Master_User"), "pb_repl", "{}", t.alias());
                assert_eq!(
                    get("Master_SSL_Allowed"),
                    "Yes",
                    "{}: replication over TLS",
                    t.alias()
                );
                assert_eq!(get("Master_SSL_Verify_Server_Cert"), "Yes", "{}", t.alias());
                break;
            }
            assert!(
                started.elapsed() < BOUND,
                "{} does not replicate from {target}: {s:?}",
                t.alias()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The audit names the token, not a name from the request.
    let audit: Value = http
        .get(format!(
            "{api}/recoveries?keyspace={}&shard={}",
            c.keyspace(),
            c.shard()
        ))
        .bearer_auth(&read_token)
        .send()
        .await
        .expect("GET recoveries")
        .json()
        .await
        .expect("audit json");
    assert!(
        audit["recoveries"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["actor"]
                .as_str()
                .is_some_and(|s| s.contains("token:ops from 127.0.0.1")))),
        "{audit:#}"
    );
    // Nothing the daemons logged holds a secret.
    for d in agents.iter().chain([&orch, &gw]) {
        leaks(&d.log_path().display().to_string(), &d.log_text());
    }
}
