use super::*;

fn row(pairs: &[(&str, Option<&str>)]) -> Row {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        .collect()
}

fn vars(pairs: &[(&str, &str)]) -> Vec<Row> {
    pairs
        .iter()
        .map(|(k, v)| row(&[("Variable_name", Some(k)), ("Value", Some(v))]))
        .collect()
}

/// `SHOW SLAVE STATUS` of a MariaDB 10.11.19 replica, recorded here (trimmed of columns myha
/// does not read is not needed: the parser ignores extra columns, so the row is complete).
fn mariadb_replica_row() -> Row {
    row(&[
        ("Slave_IO_State", Some("Waiting for master to send event")),
        ("Master_Host", Some("127.0.0.1")),
        ("Master_User", Some("myha_repl")),
        ("Master_Port", Some("41237")),
        ("Connect_Retry", Some("1")),
        ("Master_Log_File", Some("mysql-bin.000002")),
        ("Read_Master_Log_Pos", Some("2154")),
        ("Relay_Log_File", Some("relay-bin.000002")),
        ("Relay_Log_Pos", Some("2453")),
        ("Relay_Master_Log_File", Some("mysql-bin.000002")),
        ("Slave_IO_Running", Some("Yes")),
        ("Slave_SQL_Running", Some("Yes")),
        ("Last_Errno", Some("0")),
        ("Last_Error", Some("")),
        ("Skip_Counter", Some("0")),
        ("Exec_Master_Log_Pos", Some("2154")),
        ("Seconds_Behind_Master", Some("0")),
        ("SQL_Delay", Some("30")),
        ("Last_IO_Errno", Some("0")),
        ("Last_IO_Error", Some("")),
        ("Last_SQL_Errno", Some("0")),
        ("Last_SQL_Error", Some("")),
        ("Master_Server_Id", Some("101")),
        ("Using_Gtid", Some("Slave_Pos")),
        ("Gtid_IO_Pos", Some("0-101-12")),
        (
            "Slave_SQL_Running_State",
            Some("Slave has read all relay log; waiting for more updates"),
        ),
    ])
}

/// `SHOW REPLICA STATUS` of a MySQL 8.0.36 replica (column names as that server prints them).
fn mysql_replica_row() -> Row {
    row(&[
        ("Replica_IO_State", Some("Waiting for source to send event")),
        ("Source_Host", Some("10.0.0.5")),
        ("Source_User", Some("repl")),
        ("Source_Port", Some("3306")),
        ("Connect_Retry", Some("60")),
        ("Source_Log_File", Some("binlog.000003")),
        ("Read_Source_Log_Pos", Some("1520")),
        ("Replica_IO_Running", Some("Connecting")),
        ("Replica_SQL_Running", Some("Yes")),
        ("Last_Errno", Some("0")),
        ("Seconds_Behind_Source", None),
        ("Last_IO_Errno", Some("2003")),
        (
            "Last_IO_Error",
            Some("error connecting to source 'repl@10.0.0.5:3306' - retry-time: 60 retries: 1 message: Can't connect to MySQL server on '10.0.0.5:3306' (111)"),
        ),
        ("Last_SQL_Errno", Some("0")),
        ("Last_SQL_Error", Some("")),
        ("Source_UUID", Some("3e11fa47-71ca-11e1-9e33-c80aa9429562")),
        (
            "Retrieved_Gtid_Set",
            Some("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-57,\n4f22ab58-71ca-11e1-9e33-c80aa9429562:1-3"),
        ),
        (
            "Executed_Gtid_Set",
            Some("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-57,\n4f22ab58-71ca-11e1-9e33-c80aa9429562:1-3"),
        ),
        ("Auto_Position", Some("1")),
    ])
}

#[test]
fn detects_dialects() {
    let d = Dialect::detect("10.11.19-MariaDB-0+deb12u1-log").unwrap();
    assert_eq!(d.flavor, Flavor::MariaDb);
    assert_eq!(d.version, (10, 11, 19));
    let d = Dialect::detect("8.0.36").unwrap();
    assert_eq!(
        d,
        Dialect {
            flavor: Flavor::MySql,
            version: (8, 0, 36)
        }
    );
    let d = Dialect::detect("8.4.3-commercial").unwrap();
    assert_eq!(d.version, (8, 4, 3));
    assert!(Dialect::detect("garbage").is_err());
    assert!(Dialect::detect("").is_err());
}

#[test]
fn parses_mariadb_replica_status() {
    let d = Dialect::MARIADB_10_11;
    let st = d
        .parse_replica_status(Some(&mariadb_replica_row()))
        .unwrap();
    assert!(st.configured);
    assert!(st.replicating());
    assert_eq!(st.source_host, "127.0.0.1");
    assert_eq!(st.source_port, 41237);
    assert_eq!(st.gtid_io_pos, "0-101-12");
    assert!(st.using_gtid);
    assert_eq!(st.seconds_behind, Some(0));
    assert_eq!(st.sql_delay_secs, 30);
    assert_eq!(
        (st.relay_log_file.as_str(), st.relay_log_pos),
        ("relay-bin.000002", 2453)
    );
}

#[test]
fn lifting_the_delay_names_the_relay_log_position_so_it_is_kept() {
    assert_eq!(
        Dialect::MARIADB_10_11.lift_apply_delay("relay-bin.000002", 22042),
        "CHANGE MASTER TO MASTER_USE_GTID = no, MASTER_DELAY = 0, \
         RELAY_LOG_FILE = 'relay-bin.000002', RELAY_LOG_POS = 22042"
    );
    assert_eq!(
        Dialect::MYSQL_8_0.lift_apply_delay("r'.1", 4),
        "CHANGE REPLICATION SOURCE TO SOURCE_AUTO_POSITION = 0, SOURCE_DELAY = 0, \
         RELAY_LOG_FILE = 'r''.1', RELAY_LOG_POS = 4"
    );
}

#[test]
fn parses_mysql_replica_status_with_new_column_names() {
    let d = Dialect::MYSQL_8_0;
    let st = d.parse_replica_status(Some(&mysql_replica_row())).unwrap();
    assert!(st.configured);
    assert_eq!(st.io_state, ThreadState::Connecting);
    assert_eq!(st.sql_state, ThreadState::Running);
    assert!(!st.replicating());
    assert_eq!(st.source_host, "10.0.0.5");
    assert_eq!(st.source_port, 3306);
    assert_eq!(st.last_io_errno, 2003);
    assert!(st.last_io_error.contains("Can't connect"));
    assert_eq!(
        st.seconds_behind, None,
        "NULL while the IO thread is not connected"
    );
    assert_eq!(
        st.gtid_io_pos,
        "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-57,4f22ab58-71ca-11e1-9e33-c80aa9429562:1-3"
    );
    assert!(gtid::GtidSet::parse(Flavor::MySql, &st.gtid_io_pos).is_ok());
    assert!(st.using_gtid);
}

#[test]
fn parses_mysql_57_style_columns() {
    let mut r = mysql_replica_row();
    let renames = [
        ("Replica_IO_Running", "Slave_IO_Running"),
        ("Replica_SQL_Running", "Slave_SQL_Running"),
        ("Source_Host", "Master_Host"),
        ("Source_Port", "Master_Port"),
        ("Seconds_Behind_Source", "Seconds_Behind_Master"),
    ];
    for (new, old) in renames {
        let v = r.remove(new).unwrap();
        r.insert(old.to_string(), v);
    }
    let d = Dialect {
        flavor: Flavor::MySql,
        version: (5, 7, 44),
    };
    let st = d.parse_replica_status(Some(&r)).unwrap();
    assert_eq!(st.source_port, 3306);
    assert_eq!(st.io_state, ThreadState::Connecting);
}

#[test]
fn no_row_means_not_configured() {
    let st = Dialect::MARIADB_10_11.parse_replica_status(None).unwrap();
    assert!(!st.configured);
    assert!(!st.replicating());
}

#[test]
fn missing_or_bad_columns_are_errors_not_panics() {
    let d = Dialect::MARIADB_10_11;
    let mut r = mariadb_replica_row();
    r.remove("Slave_IO_Running");
    let err = d.parse_replica_status(Some(&r)).unwrap_err();
    assert!(err.to_string().contains("Slave_IO_Running"), "{err}");

    let mut r = mariadb_replica_row();
    r.insert("Slave_IO_Running".into(), Some("Maybe".into()));
    let err = d.parse_replica_status(Some(&r)).unwrap_err();
    assert!(err.to_string().contains("Maybe"), "{err}");

    let mut r = mariadb_replica_row();
    r.insert("Master_Port".into(), Some("port".into()));
    assert!(d.parse_replica_status(Some(&r)).is_err());
}

#[test]
fn parses_mariadb_variables() {
    let d = Dialect::MARIADB_10_11;
    let rows = vars(&[
        ("gtid_binlog_pos", "0-101-12"),
        ("gtid_current_pos", "0-101-12"),
        ("gtid_slave_pos", ""),
        ("read_only", "OFF"),
        ("rpl_semi_sync_master_enabled", "ON"),
        ("rpl_semi_sync_master_timeout", "2592000000"),
        ("rpl_semi_sync_master_wait_point", "AFTER_SYNC"),
        ("rpl_semi_sync_master_wait_no_slave", "ON"),
        ("rpl_semi_sync_slave_enabled", "OFF"),
        ("server_id", "101"),
        ("version", "10.11.19-MariaDB-0+deb12u1-log"),
    ]);
    let v = d.parse_variables(&rows).unwrap();
    assert_eq!(v.server_id, 101);
    assert!(!v.read_only);
    assert!(!v.super_read_only);
    assert_eq!(v.gtid_position, "0-101-12");
    assert!(v.semi_sync_primary_enabled);
    assert!(!v.semi_sync_replica_enabled);
    assert_eq!(v.semi_sync_timeout_ms, 2_592_000_000);
    assert_eq!(v.semi_sync_wait_point, "AFTER_SYNC");
    assert_eq!(v.semi_sync_wait_no_replica, Some(true));
}

#[test]
fn parses_mysql_variables_with_source_names() {
    let d = Dialect::MYSQL_8_0;
    let rows = vars(&[
        (
            "gtid_executed",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-57,\n4f22ab58-71ca-11e1-9e33-c80aa9429562:1-3",
        ),
        ("read_only", "ON"),
        ("super_read_only", "ON"),
        ("rpl_semi_sync_source_enabled", "OFF"),
        ("rpl_semi_sync_replica_enabled", "ON"),
        ("server_id", "7"),
        ("server_uuid", "4f22ab58-71ca-11e1-9e33-c80aa9429562"),
        ("version", "8.0.36"),
    ]);
    let v = d.parse_variables(&rows).unwrap();
    assert!(v.super_read_only);
    assert!(v.semi_sync_replica_enabled);
    assert!(!v.semi_sync_primary_enabled);
    assert!(!v.gtid_position.contains('\n'));
    assert_eq!(v.server_uuid, "4f22ab58-71ca-11e1-9e33-c80aa9429562");
}

#[test]
fn bad_variable_values_are_errors() {
    let d = Dialect::MARIADB_10_11;
    let err = d
        .parse_variables(&vars(&[("read_only", "MAYBE")]))
        .unwrap_err();
    assert!(err.to_string().contains("MAYBE"));
    let err = d
        .parse_variables(&vars(&[("server_id", "-1")]))
        .unwrap_err();
    assert!(err.to_string().contains("server_id"));
}

#[test]
fn parses_semi_sync_status_both_flavors() {
    let rows = vars(&[
        ("Rpl_semi_sync_master_clients", "2"),
        ("Rpl_semi_sync_master_status", "ON"),
        ("Rpl_semi_sync_master_yes_tx", "40"),
        ("Rpl_semi_sync_master_no_tx", "0"),
        ("Rpl_semi_sync_slave_status", "OFF"),
        ("Uptime", "3600"),
    ]);
    let s = Dialect::MARIADB_10_11
        .parse_semi_sync_status(&rows)
        .unwrap();
    assert_eq!(s.uptime_s, Some(3600));
    assert_eq!(s.primary_clients, 2);
    assert!(s.primary_active);
    assert_eq!(s.primary_yes_tx, 40);
    let rows = vars(&[
        ("Rpl_semi_sync_source_clients", "1"),
        ("Rpl_semi_sync_source_status", "OFF"),
        ("Rpl_semi_sync_replica_status", "ON"),
    ]);
    let s = Dialect::MYSQL_8_0.parse_semi_sync_status(&rows).unwrap();
    assert_eq!(s.primary_clients, 1);
    assert!(s.replica_active);
    // Plugin not loaded: no rows, everything off.
    let s = Dialect::MYSQL_8_0.parse_semi_sync_status(&[]).unwrap();
    assert_eq!(s, SemiSyncStatus::default());
}

#[test]
fn statements_per_flavor() {
    let m = Dialect::MARIADB_10_11;
    let y = Dialect::MYSQL_8_0;
    assert_eq!(m.stop_replication(Scope::IoOnly), "STOP SLAVE IO_THREAD");
    assert_eq!(y.stop_replication(Scope::Both), "STOP REPLICA");
    assert_eq!(m.reset_replication_all(), "RESET SLAVE ALL");
    assert_eq!(y.reset_replication_all(), "RESET REPLICA ALL");
    assert_eq!(m.replica_status_query(), "SHOW SLAVE STATUS");
    assert_eq!(y.replica_status_query(), "SHOW REPLICA STATUS");
    assert_eq!(
        m.set_read_only(true, true),
        vec!["SET GLOBAL read_only = ON"]
    );
    assert_eq!(
        y.set_read_only(true, true),
        vec![
            "SET GLOBAL read_only = ON",
            "SET GLOBAL super_read_only = ON"
        ]
    );
    assert_eq!(
        y.set_read_only(false, false)[0],
        "SET GLOBAL super_read_only = OFF"
    );
    let semi = m.set_semi_sync_primary(true, 1000);
    assert!(semi.iter().any(|s| s.contains("wait_point = AFTER_SYNC")));
    assert!(semi.iter().any(|s| s.contains("wait_no_slave = ON")));
    assert_eq!(
        semi.last().unwrap(),
        "SET GLOBAL rpl_semi_sync_master_enabled = ON"
    );
    let semi = y.set_semi_sync_primary(true, 1000);
    assert!(semi.iter().all(|s| s.contains("rpl_semi_sync_source_")));
    assert!(semi
        .iter()
        .any(|s| s.contains("wait_for_replica_count = 1")));
    // MySQL 8.0.26+ renamed wait_no_slave: set under its new name.
    assert!(semi
        .iter()
        .any(|s| s == "SET GLOBAL rpl_semi_sync_source_wait_no_replica = ON"));
    assert!(y
        .variables_query()
        .contains("'rpl_semi_sync_source_wait_no_replica'"));
    assert_eq!(
        y.set_semi_sync_replica(true),
        "SET GLOBAL rpl_semi_sync_replica_enabled = ON"
    );
    assert!(m
        .wait_for_position("0-1-5", 0.5)
        .starts_with("SELECT MASTER_GTID_WAIT('0-1-5', 0.500)"));
    assert!(y
        .wait_for_position("u:1-5", 2.0)
        .starts_with("SELECT WAIT_FOR_EXECUTED_GTID_SET"));
    assert!(m.wait_reached(Some("0")));
    assert!(!m.wait_reached(Some("-1")));
    assert!(!y.wait_reached(Some("1")));
    assert!(!y.wait_reached(None));
}

#[test]
fn change_source_quotes_untrusted_text() {
    let src = SourceSpec {
        host: "db'1".into(),
        port: 3307,
        user: "repl".into(),
        password: "p'w\\d".into(),
        connect_retry_secs: 1,
        heartbeat_period_secs: 0.5,
    };
    let m = Dialect::MARIADB_10_11.change_source(&src);
    assert_eq!(m[0], "SET GLOBAL gtid_slave_pos = @@gtid_current_pos");
    assert!(m[1].contains("MASTER_HOST = 'db''1'"), "{}", m[1]);
    assert!(m[1].contains("MASTER_PASSWORD = 'p''w\\\\d'"), "{}", m[1]);
    assert!(m[1].contains("MASTER_USE_GTID = slave_pos"));
    assert!(m[1].contains("MASTER_HEARTBEAT_PERIOD = 0.500"));
    let y = Dialect::MYSQL_8_0.change_source(&src);
    assert_eq!(y.len(), 1);
    assert!(y[0].starts_with("CHANGE REPLICATION SOURCE TO SOURCE_HOST = 'db''1'"));
    assert!(y[0].contains("SOURCE_AUTO_POSITION = 1"));
}

#[test]
fn killable_sessions_spare_replication_and_system_threads() {
    let rows = vec![
        row(&[
            ("ID", Some("1")),
            ("USER", Some("system user")),
            ("COMMAND", Some("Daemon")),
        ]),
        row(&[
            ("ID", Some("5")),
            ("USER", Some("myha_repl")),
            ("COMMAND", Some("Binlog Dump")),
        ]),
        row(&[
            ("ID", Some("6")),
            ("USER", Some("app")),
            ("COMMAND", Some("Query")),
        ]),
        row(&[
            ("ID", Some("7")),
            ("USER", Some("app")),
            ("COMMAND", Some("Sleep")),
        ]),
        row(&[
            ("ID", Some("8")),
            ("USER", Some("myha_agent")),
            ("COMMAND", Some("Sleep")),
        ]),
        row(&[
            ("ID", Some("9")),
            ("USER", Some("root")),
            ("COMMAND", Some("Slave_IO")),
        ]),
    ];
    let ids = Dialect::MARIADB_10_11.killable_sessions(&rows, &[]);
    assert_eq!(ids, vec![6, 7, 8]);
    let ids = Dialect::MARIADB_10_11.killable_sessions(&rows, &["myha_agent"]);
    assert_eq!(ids, vec![6, 7]);
}

#[test]
fn quote_escapes() {
    assert_eq!(quote("a'b"), "'a''b'");
    assert_eq!(quote("a\\b"), "'a\\\\b'");
    assert_eq!(quote(""), "''");
}

#[test]
fn io_thread_sessions_are_found_on_mariadb_only() {
    let q = Dialect::MARIADB_10_11.io_thread_sessions_query().unwrap();
    assert!(q.contains("'Slave_IO'"), "{q}");
    assert_eq!(Dialect::MYSQL_8_0.io_thread_sessions_query(), None);
}

#[test]
fn redaction_hides_the_whole_password_literal_whatever_it_holds() {
    // The agent's old rule cut at the first ", ": the tail of this password leaked.
    let s = "CHANGE MASTER TO MASTER_HOST = 'h', MASTER_PASSWORD = 'a, b, MASTER_USE_GTID', MASTER_USE_GTID = slave_pos";
    assert_eq!(
        redact_secrets(s),
        "CHANGE MASTER TO MASTER_HOST = 'h', MASTER_PASSWORD = '***', MASTER_USE_GTID = slave_pos"
    );
    // The launcher's old rule cut at the first quote: doubled and escaped quotes leaked.
    let s = "CREATE USER 'a'@'%' IDENTIFIED BY 'it''s \\' secret'";
    assert_eq!(redact_secrets(s), "CREATE USER 'a'@'%' IDENTIFIED BY '***'");
    // Every password of the statement, any case, `=` with or without blanks, quotes of both
    // kinds; what `quote` writes is hidden too.
    let s = format!(
        "change replication source to SOURCE_USER='r',source_password={}, x = \"y\"; SET PASSWORD = PASSWORD(\"p\")",
        quote("p'w\\d, q")
    );
    assert_eq!(
        redact_secrets(&s),
        "change replication source to SOURCE_USER='r',source_password='***', x = \"y\"; SET PASSWORD = PASSWORD('***')"
    );
    // Key words inside other literals are not keys; statements without passwords are kept.
    let s = "INSERT INTO t VALUES ('MASTER_PASSWORD', 'IDENTIFIED BY', 'x')";
    assert_eq!(redact_secrets(s), s);
    assert_eq!(redact_secrets("STOP SLAVE"), "STOP SLAVE");
    // An unterminated literal is hidden to the end.
    assert_eq!(
        redact_secrets("MASTER_PASSWORD='abc"),
        "MASTER_PASSWORD='***'"
    );
}

fn source(password: &str) -> SourceSpec {
    SourceSpec {
        host: "10.0.0.5".into(),
        port: 3306,
        user: "repl".into(),
        password: password.into(),
        connect_retry_secs: 1,
        heartbeat_period_secs: 0.5,
    }
}

fn tls(client: bool, verify: bool) -> SourceTls {
    SourceTls {
        ca_file: "/etc/myha/tls/ca.pem".into(),
        client_cert: client.then(|| {
            (
                "/etc/myha/tls/replica.pem".to_string(),
                "/etc/myha/tls/replica-key.pem".to_string(),
            )
        }),
        verify_server_cert: verify,
    }
}

#[test]
fn change_source_over_tls_names_every_tls_option_and_still_hides_the_password() {
    let m = Dialect::MARIADB_10_11.change_source_tls(&source("s3cr'et"), Some(&tls(false, true)));
    assert_eq!(m.len(), 2);
    assert!(
        m[1].ends_with(
            "MASTER_HEARTBEAT_PERIOD = 0.500, MASTER_SSL = 1, \
             MASTER_SSL_CA = '/etc/myha/tls/ca.pem', MASTER_SSL_CERT = '', MASTER_SSL_KEY = '', \
             MASTER_SSL_VERIFY_SERVER_CERT = 1"
        ),
        "{}",
        m[1]
    );
    // The redacted statement keeps the paths (not secrets) and hides the password only.
    let r = redact_secrets(&m[1]);
    assert!(!r.contains("s3cr"), "{r}");
    assert!(r.contains("MASTER_PASSWORD = '***'"), "{r}");
    assert!(r.contains("MASTER_SSL_CA = '/etc/myha/tls/ca.pem'"), "{r}");

    let m = Dialect::MARIADB_10_11.change_source_tls(&source("pw"), Some(&tls(true, false)));
    assert!(
        m[1].contains(
            "MASTER_SSL_CERT = '/etc/myha/tls/replica.pem', \
             MASTER_SSL_KEY = '/etc/myha/tls/replica-key.pem', MASTER_SSL_VERIFY_SERVER_CERT = 0"
        ),
        "{}",
        m[1]
    );
    // Without TLS no TLS option is named (the server keeps what it has).
    let plain = Dialect::MARIADB_10_11.change_source(&source("pw"));
    assert!(!plain[1].contains("SSL"), "{}", plain[1]);
    assert_eq!(
        plain,
        Dialect::MARIADB_10_11.change_source_tls(&source("pw"), None)
    );
}

#[test]
fn mysql_public_key_retrieval_only_without_tls() {
    let y = Dialect::MYSQL_8_0;
    let plain = &y.change_source(&source("pw"))[0];
    assert!(plain.ends_with(", GET_SOURCE_PUBLIC_KEY = 1"), "{plain}");
    let secure = &y.change_source_tls(&source("pw"), Some(&tls(true, true)))[0];
    assert!(!secure.contains("PUBLIC_KEY"), "{secure}");
    assert!(
        secure.contains(
            "SOURCE_SSL = 1, SOURCE_SSL_CA = '/etc/myha/tls/ca.pem', \
             SOURCE_SSL_CERT = '/etc/myha/tls/replica.pem'"
        ),
        "{secure}"
    );
    assert!(
        secure.ends_with("SOURCE_SSL_VERIFY_SERVER_CERT = 1"),
        "{secure}"
    );
    // Before 8.0.22: the MASTER_ words; the key option exists from 8.0.4, not in 5.7.
    let old = Dialect::detect("8.0.20").unwrap();
    let plain = &old.change_source(&source("pw"))[0];
    assert!(plain.ends_with(", GET_MASTER_PUBLIC_KEY = 1"), "{plain}");
    let secure = &old.change_source_tls(&source("pw"), Some(&tls(false, true)))[0];
    assert!(!secure.contains("PUBLIC_KEY"), "{secure}");
    assert!(secure.contains("MASTER_SSL = 1"), "{secure}");
    let v57 = Dialect::detect("5.7.44-log").unwrap();
    assert!(!v57.change_source(&source("pw"))[0].contains("PUBLIC_KEY"));
    // MariaDB has no such option either way.
    assert!(!Dialect::MARIADB_10_11.change_source(&source("pw"))[1].contains("PUBLIC_KEY"));
}

#[test]
fn agent_grants_are_least_privilege_and_documented() {
    let account = "'myha_agent'@'%'";
    let m = Dialect::MARIADB_10_11.agent_grants(account);
    assert_eq!(
        m,
        [
            "GRANT RELOAD, PROCESS, CONNECTION ADMIN, READ_ONLY ADMIN, REPLICATION SLAVE ADMIN, \
             REPLICATION MASTER ADMIN, SLAVE MONITOR ON *.* TO 'myha_agent'@'%'",
            "GRANT SELECT, INSERT, UPDATE, CREATE ON `_myha`.* TO 'myha_agent'@'%'",
        ]
    );
    for g in m.iter().chain(&Dialect::MYSQL_8_0.agent_grants(account)) {
        assert!(!g.contains("ALL") && !g.contains("SUPER") && !g.contains("GRANT OPTION"));
    }
    // The documented SQL blocks are these statements, word for word, and every privilege's
    // reason is there.
    let doc = include_str!("../../docs/mysql-grants.md");
    let statements: Vec<String> = m
        .iter()
        .chain(&Dialect::MYSQL_8_0.agent_grants(account))
        .cloned()
        .chain(Dialect::MARIADB_10_11.replication_grants("'myha_repl'@'%'", true))
        .collect();
    for s in statements {
        assert!(
            doc.contains(&format!("{s};")),
            "docs/mysql-grants.md lacks `{s};`"
        );
    }
    for d in [Dialect::MARIADB_10_11, Dialect::MYSQL_8_0] {
        for p in d.agent_privileges() {
            assert!(
                doc.contains(&format!("`{}`", p.name)),
                "docs/mysql-grants.md does not explain `{}`",
                p.name
            );
        }
    }
    assert_eq!(
        Dialect::MARIADB_10_11.replication_grants("'r'@'%'", false),
        ["GRANT REPLICATION SLAVE ON *.* TO 'r'@'%'"]
    );
}
