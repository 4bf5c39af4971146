//! The Ansible playbooks (`playbooks/`) deploy a working fleet: run for real with
//! `ansible-playbook` against local "hosts" (one per tablet of a harness cluster, the
//! orchestrator and gateway on the same machine), into a temp root with services left to the
//! test. The test then starts the *deployed* binaries with the *rendered* configs and checks that
//! they work: the agents register with the MySQL accounts the playbook created, the orchestrator
//! sees a healthy shard, the gateway routes a write. A second run must change nothing.
//!
//! Needs `ansible-playbook` (package ansible-core, installed by `scripts/dev`) and the binaries
//! (`MYHA_BIN_DIR`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{find_myha_bin, free_port, Cluster, ClusterOptions, ConfigDaemon};
use mysql_async::prelude::Queryable;
use serde_json::Value;

const BOUND: Duration = Duration::from_secs(30);

fn playbooks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("playbooks")
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

/// `ansible-playbook site.yml` with `inventory`; returns the PLAY RECAP's `changed=` per host.
fn run_playbook(inventory: &Path, log: &Path) -> Vec<(String, u32)> {
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
    assert!(out.status.success(), "ansible-playbook failed:\n{text}");
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

    // Accounts the playbook must create (the harness made its own with other names).
    let agent_pw = harness::random_password();
    let repl_pw = harness::random_password();
    let orch_port = free_port().expect("port");
    let gw_admin = free_port().expect("port");
    let gw_rw = free_port().expect("port");
    let gw_ro = free_port().expect("port");
    let local = "ansible_connection: local, ansible_python_interpreter: /usr/bin/python3";
    let mut tablets = String::new();
    for (i, t) in c.tablets().iter().enumerate() {
        tablets.push_str(&format!(
            "        t{i}: {{ {local}, myha_cell: {}, myha_uid: {}, myha_keyspace: {}, \
             myha_shard: \"{}\", myha_mysql_port: {}, myha_mysql_socket: {:?}, \
             myha_server_id: {}, myha_bootstrap_users: {}, \
             myha_mariadb_cnf: /etc/mysql/mariadb.conf.d/60-myha-{}.cnf, \
             myha_agent_grpc_listen: \"127.0.0.1:0\", myha_agent_http_listen: \"127.0.0.1:0\", \
             myha_agent_advertise_host: 127.0.0.1 }}\n",
            t.cell(),
            t.uid(),
            c.keyspace(),
            c.shard(),
            t.mysqld().port(),
            t.mysqld().socket().display().to_string(),
            t.mysqld().server_id(),
            i == 0,
            t.alias(),
        ));
    }
    let inventory = work.path().join("inventory.yml");
    std::fs::write(
        &inventory,
        format!(
            "all:\n  vars:\n    myha_root: {root:?}\n    myha_manage_services: false\n    \
             myha_create_user: false\n    myha_become: false\n    myha_bin_src: {bin:?}\n    \
             myha_etcd_endpoints: [{etcd:?}]\n    myha_etcd_prefix: {prefix:?}\n    \
             myha_log_format: human\n    myha_no_log: false\n    \
             myha_mysql_agent_user: pb_agent\n    myha_mysql_agent_password: {agent_pw:?}\n    \
             myha_mysql_repl_user: pb_repl\n    myha_mysql_repl_password: {repl_pw:?}\n  \
             children:\n    myha_tablets:\n      hosts:\n{tablets}    \
             myha_orchestrators:\n      hosts:\n        o1: {{ {local}, \
             myha_orchestrator_http_listen: \"127.0.0.1:{orch_port}\" }}\n    \
             myha_gateways:\n      hosts:\n        g1:\n          {local_block}\n          \
             myha_gateway_admin_listen: \"127.0.0.1:{gw_admin}\"\n          \
             myha_gateway_listeners:\n            - {{ keyspace: {ks}, shard: \"{shard}\", \
             rw: \"127.0.0.1:{gw_rw}\", ro: \"127.0.0.1:{gw_ro}\" }}\n",
            root = root.display().to_string(),
            bin = bin_src.display().to_string(),
            etcd = c.etcd().endpoint(),
            prefix = c.options().prefix,
            local_block =
                "ansible_connection: local\n          ansible_python_interpreter: /usr/bin/python3",
            ks = c.keyspace(),
            shard = c.shard(),
        ),
    )
    .expect("inventory");

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

    // What was rendered.
    let etc = root.join("etc/myha");
    for t in c.tablets() {
        let cfg = std::fs::read_to_string(etc.join(format!("agent-{}.toml", t.alias())))
            .expect("agent config rendered");
        assert!(cfg.contains("user = \"pb_agent\""), "{cfg}");
        assert!(root
            .join(format!("var/lib/myha/agent-{}", t.alias()))
            .is_dir());
    }
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
    // replicas a moment after the playbook saw them committed).
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
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut last = String::new();
    loop {
        for a in &agents {
            a.check_alive().unwrap_or_else(|e| panic!("{e}"));
        }
        orch.check_alive().unwrap_or_else(|e| panic!("{e}"));
        gw.check_alive().unwrap_or_else(|e| panic!("{e}"));
        let registered = c
            .topo()
            .list_tablets(Some(c.keyspace()), Some(c.shard()))
            .await
            .map(|v| v.len())
            .unwrap_or(0);
        let shard: Option<Value> = match http
            .get(format!("http://127.0.0.1:{orch_port}/api/v1/shards"))
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
            "deployed fleet not healthy after {BOUND:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "deployed agents registered and shard healthy in {:.1} s ({last})",
        started.elapsed().as_secs_f64()
    );

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
                    "no write through the deployed gateway: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(server_id, c.initial_primary().mysqld().server_id());
}
