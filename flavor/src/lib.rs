//! MySQL-family dialects: the SQL myha sends and the parsing of what servers answer.
//!
//! Pure: callers run the statements and hand back rows as `column name -> Option<String>`
//! (`None` for SQL NULL). Columns are always read by name, never by position, because
//! MySQL 8.0.22 renamed the replication columns (`Slave_IO_Running` -> `Replica_IO_Running`,
//! `Master_Host` -> `Source_Host`, ...) and MariaDB kept the old names.

use std::collections::HashMap;
use std::fmt;

pub use gtid::Flavor;

/// One result row: column name to value, `None` for NULL.
pub type Row = HashMap<String, Option<String>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlavorError {
    #[error("column `{column}` missing from {what}")]
    MissingColumn { what: &'static str, column: String },
    #[error("column `{column}` of {what}: cannot parse `{value}` as {expected}")]
    BadValue {
        what: &'static str,
        column: String,
        value: String,
        expected: &'static str,
    },
    #[error("unrecognised server version `{0}`")]
    BadVersion(String),
}

/// A server's dialect: flavor plus the version facts that change the SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    pub flavor: Flavor,
    pub version: (u32, u32, u32),
}

impl Dialect {
    pub const MARIADB_10_11: Dialect = Dialect {
        flavor: Flavor::MariaDb,
        version: (10, 11, 0),
    };
    pub const MYSQL_8_0: Dialect = Dialect {
        flavor: Flavor::MySql,
        version: (8, 0, 36),
    };

    /// From `SELECT @@version` (`10.11.19-MariaDB-0+deb12u1-log`, `8.0.36`, `8.4.3-commercial`).
    pub fn detect(version: &str) -> Result<Dialect, FlavorError> {
        let flavor = if version.to_ascii_lowercase().contains("mariadb") {
            Flavor::MariaDb
        } else {
            Flavor::MySql
        };
        let numeric: String = version
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = numeric.split('.').map(|p| p.parse::<u32>());
        let mut next = || -> Result<u32, FlavorError> {
            match parts.next() {
                Some(Ok(n)) => Ok(n),
                Some(Err(_)) => Err(FlavorError::BadVersion(version.to_string())),
                None => Ok(0),
            }
        };
        let major = next()?;
        let minor = next()?;
        let patch = next()?;
        if major == 0 {
            return Err(FlavorError::BadVersion(version.to_string()));
        }
        Ok(Dialect {
            flavor,
            version: (major, minor, patch),
        })
    }

    pub fn name(&self) -> &'static str {
        match self.flavor {
            Flavor::MariaDb => "mariadb",
            Flavor::MySql => "mysql",
        }
    }

    fn is_mysql_at_least(&self, v: (u32, u32, u32)) -> bool {
        self.flavor == Flavor::MySql && self.version >= v
    }

    /// MySQL 8.0.22 introduced `REPLICA` statements and `Source_*` columns.
    fn replica_words(&self) -> bool {
        self.is_mysql_at_least((8, 0, 22))
    }

    /// MySQL 8.0.26 renamed the semi-sync plugins' variables to `rpl_semi_sync_source_*`/`replica_*`.
    fn semi_sync_source_words(&self) -> bool {
        self.is_mysql_at_least((8, 0, 26))
    }

    /// The primary-side variable that keeps commits waiting with no replica attached.
    fn semi_wait_no_replica_variable(&self) -> String {
        let p = self.semi_primary_prefix();
        if self.semi_sync_source_words() {
            format!("{p}_wait_no_replica")
        } else {
            format!("{p}_wait_no_slave")
        }
    }

    pub fn has_super_read_only(&self) -> bool {
        self.flavor == Flavor::MySql
    }

    fn semi_primary_prefix(&self) -> &'static str {
        if self.semi_sync_source_words() {
            "rpl_semi_sync_source"
        } else {
            "rpl_semi_sync_master"
        }
    }

    fn semi_replica_prefix(&self) -> &'static str {
        if self.semi_sync_source_words() {
            "rpl_semi_sync_replica"
        } else {
            "rpl_semi_sync_slave"
        }
    }

    fn semi_status_primary_prefix(&self) -> &'static str {
        if self.semi_sync_source_words() {
            "Rpl_semi_sync_source"
        } else {
            "Rpl_semi_sync_master"
        }
    }

    fn semi_status_replica_prefix(&self) -> &'static str {
        if self.semi_sync_source_words() {
            "Rpl_semi_sync_replica"
        } else {
            "Rpl_semi_sync_slave"
        }
    }

    // ---- statements --------------------------------------------------------------------

    /// Variables the agent reads every poll. `SHOW GLOBAL VARIABLES WHERE ... IN (...)` is
    /// used instead of `SELECT @@x` because it tolerates variables a server lacks (semi-sync
    /// plugin not loaded, `super_read_only` on MariaDB).
    pub fn variables_query(&self) -> String {
        let p = self.semi_primary_prefix();
        let r = self.semi_replica_prefix();
        let mut names = vec![
            "server_id".to_string(),
            "server_uuid".into(),
            "version".into(),
            "read_only".into(),
            "super_read_only".into(),
            "gtid_executed".into(),
            "gtid_current_pos".into(),
            "gtid_binlog_pos".into(),
            "gtid_binlog_state".into(),
            "gtid_slave_pos".into(),
            format!("{p}_enabled"),
            format!("{p}_timeout"),
            format!("{p}_wait_point"),
            self.semi_wait_no_replica_variable(),
            format!("{r}_enabled"),
        ];
        names.iter_mut().for_each(|n| *n = format!("'{n}'"));
        format!(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ({})",
            names.join(", ")
        )
    }

    pub fn semi_sync_status_query(&self) -> &'static str {
        "SHOW GLOBAL STATUS WHERE Variable_name LIKE 'Rpl_semi_sync%' OR Variable_name = 'Uptime'"
    }

    pub fn replica_status_query(&self) -> &'static str {
        if self.replica_words() {
            "SHOW REPLICA STATUS"
        } else {
            "SHOW SLAVE STATUS"
        }
    }

    pub fn stop_replication(&self, scope: Scope) -> String {
        let word = if self.replica_words() {
            "REPLICA"
        } else {
            "SLAVE"
        };
        match scope {
            Scope::IoOnly => format!("STOP {word} IO_THREAD"),
            Scope::Both => format!("STOP {word}"),
        }
    }

    pub fn start_replication(&self, scope: Scope) -> String {
        let word = if self.replica_words() {
            "REPLICA"
        } else {
            "SLAVE"
        };
        match scope {
            Scope::IoOnly => format!("START {word} IO_THREAD"),
            Scope::Both => format!("START {word}"),
        }
    }

    /// Starts the SQL (applier) thread alone.
    pub fn start_sql_thread(&self) -> &'static str {
        if self.replica_words() {
            "START REPLICA SQL_THREAD"
        } else {
            "START SLAVE SQL_THREAD"
        }
    }

    pub fn reset_replication_all(&self) -> &'static str {
        if self.replica_words() {
            "RESET REPLICA ALL"
        } else {
            "RESET SLAVE ALL"
        }
    }

    /// Statements that point replication at `src` over a plaintext connection: see
    /// [`Dialect::change_source_tls`] with no TLS.
    pub fn change_source(&self, src: &SourceSpec) -> Vec<String> {
        self.change_source_tls(src, None)
    }

    /// Statements that point replication at `src`, over TLS when `tls` is given. Replication
    /// must be stopped first.
    ///
    /// MariaDB: `gtid_slave_pos` is first set to `gtid_current_pos` so a former primary resumes
    /// from what it wrote itself, not from the stale position it last replicated to.
    ///
    /// With `tls`, every TLS option is named, the client certificate and key as `''` when none
    /// is given: a `CHANGE MASTER` keeps the options it does not name (and MariaDB 10.11 keeps
    /// `MASTER_SSL` and `MASTER_SSL_CA` even through `RESET SLAVE ALL`, measured, while it resets
    /// `MASTER_SSL_VERIFY_SERVER_CERT`), so what an earlier configuration left must not survive.
    /// MySQL's public-key retrieval (`GET_SOURCE_PUBLIC_KEY`) is then left out: over TLS the
    /// password goes in the clear inside the encrypted channel and no RSA key is needed. Without
    /// `tls` no TLS option is named, so whatever the server was given by other means stays.
    pub fn change_source_tls(&self, src: &SourceSpec, tls: Option<&SourceTls>) -> Vec<String> {
        let host = quote(&src.host);
        let user = quote(&src.user);
        let password = quote(&src.password);
        let retry = src.connect_retry_secs.max(1);
        let heartbeat = format!("{:.3}", src.heartbeat_period_secs);
        // `MASTER_SSL...` or `SOURCE_SSL...`, with the separator before it.
        let tls_options = |word: &str| match tls {
            None => String::new(),
            Some(t) => {
                let (cert, key) = match &t.client_cert {
                    Some((c, k)) => (quote(c), quote(k)),
                    None => (quote(""), quote("")),
                };
                format!(
                    ", {word}_SSL = 1, {word}_SSL_CA = {}, {word}_SSL_CERT = {cert}, \
                     {word}_SSL_KEY = {key}, {word}_SSL_VERIFY_SERVER_CERT = {}",
                    quote(&t.ca_file),
                    u8::from(t.verify_server_cert)
                )
            }
        };
        match self.flavor {
            Flavor::MariaDb => vec![
                "SET GLOBAL gtid_slave_pos = @@gtid_current_pos".into(),
                format!(
                    "CHANGE MASTER TO MASTER_HOST = {host}, MASTER_PORT = {}, MASTER_USER = {user}, \
                     MASTER_PASSWORD = {password}, MASTER_USE_GTID = slave_pos, \
                     MASTER_CONNECT_RETRY = {retry}, MASTER_HEARTBEAT_PERIOD = {heartbeat}{}",
                    src.port,
                    tls_options("MASTER")
                ),
            ],
            Flavor::MySql if self.replica_words() => vec![format!(
                "CHANGE REPLICATION SOURCE TO SOURCE_HOST = {host}, SOURCE_PORT = {}, \
                 SOURCE_USER = {user}, SOURCE_PASSWORD = {password}, SOURCE_AUTO_POSITION = 1, \
                 SOURCE_CONNECT_RETRY = {retry}, SOURCE_HEARTBEAT_PERIOD = {heartbeat}{}",
                src.port,
                match tls {
                    Some(_) => tls_options("SOURCE"),
                    // caching_sha2_password (MySQL 8's default) over plaintext: the replica
                    // must fetch the server's RSA key to send the password.
                    None => ", GET_SOURCE_PUBLIC_KEY = 1".into(),
                }
            )],
            Flavor::MySql => vec![format!(
                "CHANGE MASTER TO MASTER_HOST = {host}, MASTER_PORT = {}, MASTER_USER = {user}, \
                 MASTER_PASSWORD = {password}, MASTER_AUTO_POSITION = 1, \
                 MASTER_CONNECT_RETRY = {retry}, MASTER_HEARTBEAT_PERIOD = {heartbeat}{}",
                src.port,
                match tls {
                    Some(_) => tls_options("MASTER"),
                    // As above; GET_MASTER_PUBLIC_KEY exists from 8.0.4 (caching_sha2_password's
                    // arrival), not in 5.7.
                    None if self.is_mysql_at_least((8, 0, 4)) => {
                        ", GET_MASTER_PUBLIC_KEY = 1".into()
                    }
                    None => String::new(),
                }
            )],
        }
    }

    /// Lifts the replication apply delay while keeping the relay log, so that what was received
    /// is applied now. Both threads must be stopped and `relay_file`/`relay_pos` must be the
    /// SQL thread's position (`Relay_Log_File`/`Relay_Log_Pos`) read after the stop.
    ///
    /// TRAP (measured on MariaDB 10.11): with `MASTER_USE_GTID = slave_pos` every CHANGE MASTER,
    /// even one naming only `MASTER_DELAY`, deletes the relay logs, and with them every received
    /// transaction not applied yet. Naming the relay log position keeps them, and that is refused
    /// under GTID auto-positioning, so the replica switches to file/position mode for the apply;
    /// its next repoint (or its promotion) sets GTID mode again. MySQL refuses RELAY_LOG_FILE
    /// with auto-positioning in the same way.
    pub fn lift_apply_delay(&self, relay_file: &str, relay_pos: u64) -> String {
        let file = quote(relay_file);
        match self.flavor {
            Flavor::MariaDb => format!(
                "CHANGE MASTER TO MASTER_USE_GTID = no, MASTER_DELAY = 0, \
                 RELAY_LOG_FILE = {file}, RELAY_LOG_POS = {relay_pos}"
            ),
            Flavor::MySql if self.replica_words() => format!(
                "CHANGE REPLICATION SOURCE TO SOURCE_AUTO_POSITION = 0, SOURCE_DELAY = 0, \
                 RELAY_LOG_FILE = {file}, RELAY_LOG_POS = {relay_pos}"
            ),
            Flavor::MySql => format!(
                "CHANGE MASTER TO MASTER_AUTO_POSITION = 0, MASTER_DELAY = 0, \
                 RELAY_LOG_FILE = {file}, RELAY_LOG_POS = {relay_pos}"
            ),
        }
    }

    /// A query returning one row, one column: see [`Dialect::wait_reached`].
    pub fn wait_for_position(&self, position: &str, timeout_secs: f64) -> String {
        let pos = quote(position);
        let secs = format!("{:.3}", timeout_secs.max(0.001));
        match self.flavor {
            Flavor::MariaDb => format!("SELECT MASTER_GTID_WAIT({pos}, {secs})"),
            Flavor::MySql => format!("SELECT WAIT_FOR_EXECUTED_GTID_SET({pos}, {secs})"),
        }
    }

    /// Interprets the result of [`Dialect::wait_for_position`]: MariaDB answers 0 when reached
    /// and -1 on timeout; MySQL answers 0 when reached and 1 on timeout.
    pub fn wait_reached(&self, value: Option<&str>) -> bool {
        value.map(str::trim) == Some("0")
    }

    pub fn set_read_only(&self, read_only: bool, super_read_only: bool) -> Vec<String> {
        let on = |b: bool| if b { "ON" } else { "OFF" };
        if self.has_super_read_only() {
            if read_only {
                let mut v = vec!["SET GLOBAL read_only = ON".to_string()];
                if super_read_only {
                    v.push("SET GLOBAL super_read_only = ON".into());
                }
                v
            } else {
                // super_read_only=OFF must come first: read_only=OFF would fail while it is ON
                // on some versions, and the reverse order leaves a window with both off anyway.
                vec![
                    "SET GLOBAL super_read_only = OFF".into(),
                    "SET GLOBAL read_only = OFF".into(),
                ]
            }
        } else {
            vec![format!("SET GLOBAL read_only = {}", on(read_only))]
        }
    }

    /// Primary-side semi-sync. Enabling also makes it lossless: AFTER_SYNC, a timeout so long
    /// that no async fallback happens in practice, and waiting even with no replica attached.
    pub fn set_semi_sync_primary(&self, enabled: bool, timeout_ms: u64) -> Vec<String> {
        let p = self.semi_primary_prefix();
        if !enabled {
            return vec![format!("SET GLOBAL {p}_enabled = OFF")];
        }
        // Keep waiting with no replica attached (never fall back to async): wait_no_slave,
        // renamed wait_no_replica in MySQL 8.0.26; MySQL also needs one ack per commit.
        let mut out = vec![
            format!("SET GLOBAL {p}_wait_point = AFTER_SYNC"),
            format!("SET GLOBAL {p}_timeout = {timeout_ms}"),
            format!("SET GLOBAL {} = ON", self.semi_wait_no_replica_variable()),
        ];
        if self.flavor == Flavor::MySql {
            out.push(format!("SET GLOBAL {p}_wait_for_replica_count = 1"));
        }
        out.push(format!("SET GLOBAL {p}_enabled = ON"));
        out
    }

    pub fn set_semi_sync_replica(&self, enabled: bool) -> String {
        let r = self.semi_replica_prefix();
        format!(
            "SET GLOBAL {r}_enabled = {}",
            if enabled { "ON" } else { "OFF" }
        )
    }

    /// Other sessions, for fencing: `ID, USER, COMMAND`.
    pub fn processlist_query(&self) -> &'static str {
        "SELECT ID, USER, COMMAND FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
    }

    /// Sessions of this server's replication IO threads, to kill before `STOP SLAVE`: on MariaDB
    /// a stop waits for an IO thread blocked reading from a frozen source in 2 s rounds, while
    /// killing its session closes the socket at once. `None` where no such shortcut is known.
    pub fn io_thread_sessions_query(&self) -> Option<&'static str> {
        match self.flavor {
            Flavor::MariaDb => Some(
                "SELECT ID, STATE FROM information_schema.PROCESSLIST WHERE COMMAND = 'Slave_IO'",
            ),
            Flavor::MySql => None,
        }
    }

    pub fn kill_connection(&self, id: u64) -> String {
        format!("KILL CONNECTION {id}")
    }

    // ---- accounts ----------------------------------------------------------------------

    /// The least privileges the agent's user needs for every statement above, each with why
    /// (`docs/mysql-grants.md` is written from these). MariaDB's are live-tested: the test
    /// harness creates the agent's user with exactly these; MySQL's come from its manual.
    pub fn agent_privileges(&self) -> &'static [Privilege] {
        match self.flavor {
            Flavor::MariaDb => MARIADB_AGENT_PRIVILEGES,
            Flavor::MySql => MYSQL_AGENT_PRIVILEGES,
        }
    }

    /// `GRANT` statements giving `account` (an account as SQL, e.g. `'myha_agent'@'%'`)
    /// [`Dialect::agent_privileges`]: one per object, in the order the privileges are listed.
    pub fn agent_grants(&self, account: &str) -> Vec<String> {
        let mut objects: Vec<(&str, Vec<&str>)> = Vec::new();
        for p in self.agent_privileges() {
            match objects.iter_mut().find(|(on, _)| *on == p.on) {
                Some((_, names)) => names.push(p.name),
                None => objects.push((p.on, vec![p.name])),
            }
        }
        objects
            .into_iter()
            .map(|(on, names)| format!("GRANT {} ON {on} TO {account}", names.join(", ")))
            .collect()
    }

    /// The replication user's grant (`REPLICATION SLAVE`: what a replica's IO thread needs,
    /// semi-sync acks included), and with `require_tls` an `ALTER USER ... REQUIRE SSL`, so that
    /// a replica configured without TLS is refused (error 1045) instead of sending the
    /// replication stream in the clear.
    pub fn replication_grants(&self, account: &str, require_tls: bool) -> Vec<String> {
        let mut v = vec![format!("GRANT REPLICATION SLAVE ON *.* TO {account}")];
        if require_tls {
            v.push(format!("ALTER USER {account} REQUIRE SSL"));
        }
        v
    }

    // ---- parsing -----------------------------------------------------------------------

    /// Rows of `SHOW GLOBAL VARIABLES` (`Variable_name`, `Value`) into [`ServerVariables`].
    pub fn parse_variables(&self, rows: &[Row]) -> Result<ServerVariables, FlavorError> {
        let map = name_value_map(rows, "SHOW GLOBAL VARIABLES")?;
        let get = |k: &str| map.get(&k.to_ascii_lowercase()).cloned();
        let what = "server variables";
        let p = self.semi_primary_prefix();
        let r = self.semi_replica_prefix();
        let server_id = parse_num::<u32>(what, "server_id", get("server_id"))?.unwrap_or(0);
        let (gtid_position, gtid_binlog_pos, gtid_slave_pos) = match self.flavor {
            Flavor::MariaDb => (
                get("gtid_current_pos").unwrap_or_default(),
                get("gtid_binlog_pos").unwrap_or_default(),
                get("gtid_slave_pos").unwrap_or_default(),
            ),
            Flavor::MySql => {
                let executed = get("gtid_executed").unwrap_or_default();
                (executed.clone(), executed, String::new())
            }
        };
        Ok(ServerVariables {
            server_id,
            server_uuid: get("server_uuid").unwrap_or_default(),
            version: get("version").unwrap_or_default(),
            read_only: parse_bool(what, "read_only", get("read_only"))?.unwrap_or(false),
            super_read_only: parse_bool(what, "super_read_only", get("super_read_only"))?
                .unwrap_or(false),
            gtid_position: normalise_gtid_text(&gtid_position),
            gtid_binlog_pos: normalise_gtid_text(&gtid_binlog_pos),
            gtid_binlog_state: normalise_gtid_text(&get("gtid_binlog_state").unwrap_or_default()),
            gtid_slave_pos: normalise_gtid_text(&gtid_slave_pos),
            semi_sync_primary_enabled: parse_bool(
                what,
                "semi primary",
                get(&format!("{p}_enabled")),
            )?
            .unwrap_or(false),
            semi_sync_replica_enabled: parse_bool(
                what,
                "semi replica",
                get(&format!("{r}_enabled")),
            )?
            .unwrap_or(false),
            semi_sync_timeout_ms: parse_num::<u64>(
                what,
                "semi timeout",
                get(&format!("{p}_timeout")),
            )?
            .unwrap_or(0),
            semi_sync_wait_point: get(&format!("{p}_wait_point")).unwrap_or_default(),
            semi_sync_wait_no_replica: parse_bool(
                what,
                "semi wait no replica",
                get(&self.semi_wait_no_replica_variable()),
            )?,
        })
    }

    /// Rows of the semi-sync `SHOW GLOBAL STATUS` query.
    pub fn parse_semi_sync_status(&self, rows: &[Row]) -> Result<SemiSyncStatus, FlavorError> {
        let map = name_value_map(rows, "SHOW GLOBAL STATUS")?;
        let what = "semi-sync status";
        let ps = self.semi_status_primary_prefix();
        let rs = self.semi_status_replica_prefix();
        let get = |k: String| map.get(&k.to_ascii_lowercase()).cloned();
        Ok(SemiSyncStatus {
            primary_active: parse_bool(what, "primary status", get(format!("{ps}_status")))?
                .unwrap_or(false),
            primary_clients: parse_num::<u32>(what, "clients", get(format!("{ps}_clients")))?
                .unwrap_or(0),
            primary_yes_tx: parse_num::<u64>(what, "yes_tx", get(format!("{ps}_yes_tx")))?
                .unwrap_or(0),
            primary_no_tx: parse_num::<u64>(what, "no_tx", get(format!("{ps}_no_tx")))?
                .unwrap_or(0),
            replica_active: parse_bool(what, "replica status", get(format!("{rs}_status")))?
                .unwrap_or(false),
            uptime_s: parse_num::<u64>("server status", "Uptime", get("Uptime".to_string()))?,
        })
    }

    /// The row of `SHOW SLAVE STATUS` / `SHOW REPLICA STATUS`; `None` when the server
    /// returned no row (no replication configured).
    pub fn parse_replica_status(&self, row: Option<&Row>) -> Result<ReplicaStatus, FlavorError> {
        let Some(row) = row else {
            return Ok(ReplicaStatus::default());
        };
        let what = "replica status";
        let col = |names: &[&str]| -> Option<String> {
            names.iter().find_map(|n| row.get(*n).cloned()).flatten()
        };
        let require = |names: &[&str]| -> Result<(), FlavorError> {
            if names.iter().any(|n| row.contains_key(*n)) {
                Ok(())
            } else {
                Err(FlavorError::MissingColumn {
                    what,
                    column: names.join(" / "),
                })
            }
        };
        require(&["Slave_IO_Running", "Replica_IO_Running"])?;
        require(&["Slave_SQL_Running", "Replica_SQL_Running"])?;
        require(&["Master_Host", "Source_Host"])?;
        let io_state = ThreadState::parse(
            what,
            "IO_Running",
            col(&["Slave_IO_Running", "Replica_IO_Running"]),
        )?;
        let sql_state = ThreadState::parse(
            what,
            "SQL_Running",
            col(&["Slave_SQL_Running", "Replica_SQL_Running"]),
        )?;
        let (gtid_io_pos, using_gtid) = match self.flavor {
            Flavor::MariaDb => {
                let using = col(&["Using_Gtid"]).unwrap_or_default();
                (
                    col(&["Gtid_IO_Pos"]).unwrap_or_default(),
                    !using.is_empty() && !using.eq_ignore_ascii_case("no"),
                )
            }
            Flavor::MySql => (
                col(&["Retrieved_Gtid_Set"]).unwrap_or_default(),
                col(&["Auto_Position"]).as_deref() == Some("1"),
            ),
        };
        Ok(ReplicaStatus {
            configured: true,
            source_host: col(&["Master_Host", "Source_Host"]).unwrap_or_default(),
            source_port: parse_num::<u32>(what, "port", col(&["Master_Port", "Source_Port"]))?
                .unwrap_or(0),
            io_state,
            sql_state,
            last_io_errno: parse_num::<u32>(what, "Last_IO_Errno", col(&["Last_IO_Errno"]))?
                .unwrap_or(0),
            last_io_error: col(&["Last_IO_Error"]).unwrap_or_default(),
            last_sql_errno: parse_num::<u32>(what, "Last_SQL_Errno", col(&["Last_SQL_Errno"]))?
                .unwrap_or(0),
            last_sql_error: col(&["Last_SQL_Error"]).unwrap_or_default(),
            gtid_io_pos: normalise_gtid_text(&gtid_io_pos),
            using_gtid,
            seconds_behind: parse_num::<u64>(
                what,
                "Seconds_Behind",
                col(&["Seconds_Behind_Master", "Seconds_Behind_Source"]),
            )?,
            sql_delay_secs: parse_num::<u64>(what, "SQL_Delay", col(&["SQL_Delay"]))?.unwrap_or(0),
            relay_log_file: col(&["Relay_Log_File"]).unwrap_or_default(),
            relay_log_pos: parse_num::<u64>(what, "Relay_Log_Pos", col(&["Relay_Log_Pos"]))?
                .unwrap_or(0),
        })
    }

    /// Connections fencing must kill: clients, not replication or server threads.
    pub fn killable_sessions(&self, rows: &[Row], keep_users: &[&str]) -> Vec<u64> {
        rows.iter()
            .filter_map(|r| {
                let id = r.get("ID").cloned().flatten()?.parse::<u64>().ok()?;
                let user = r.get("USER").cloned().flatten().unwrap_or_default();
                let command = r.get("COMMAND").cloned().flatten().unwrap_or_default();
                let system = matches!(
                    user.as_str(),
                    "system user" | "event_scheduler" | "system_user"
                ) || command.starts_with("Binlog Dump")
                    || command.starts_with("Slave_")
                    || command == "Daemon";
                (!system && !keep_users.contains(&user.as_str())).then_some(id)
            })
            .collect()
    }
}

/// What to stop or start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    IoOnly,
    Both,
}

/// TLS for a replica's connection to its source (`MASTER_SSL` and its options). The paths are
/// read by the replica's mysqld: they are on the replica's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTls {
    /// The CA the source's certificate must chain to.
    pub ca_file: String,
    /// The replica's own certificate and key, when the source asks for one.
    pub client_cert: Option<(String, String)>,
    /// The source's certificate must name the host replication connects to
    /// (`MASTER_SSL_VERIFY_SERVER_CERT`). MariaDB 10.11 checks the chain to `ca_file` either
    /// way (measured: a replica given another CA fails with error 2026).
    pub verify_server_cert: bool,
}

/// A privilege the agent's user needs: see [`Dialect::agent_privileges`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privilege {
    /// As `GRANT` spells it.
    pub name: &'static str,
    /// What it is granted on: `*.*`, or the agent's own schema.
    pub on: &'static str,
    /// The statements that need it, and what happens without it.
    pub why: &'static str,
}

/// The schema of the agent's heartbeat table (`_myha.heartbeat`), as a grant names it.
const MYHA_SCHEMA: &str = "`_myha`.*";

/// MariaDB 10.11 (its privileges split from SUPER in 10.5). Each entry was checked on 10.11.19
/// by revoking it: the statement named fails (or, for PROCESS, silently sees nothing).
const MARIADB_AGENT_PRIVILEGES: &[Privilege] = &[
    Privilege {
        name: "RELOAD",
        on: "*.*",
        why: "RESET SLAVE ALL (promotion, ResetReplication): error 1227 without it",
    },
    Privilege {
        name: "PROCESS",
        on: "*.*",
        why: "information_schema.PROCESSLIST beyond its own sessions: the client sessions \
              fencing kills and the replication IO thread a stop kills first. Without it \
              the list is silently empty and fencing kills nobody",
    },
    Privilege {
        name: "CONNECTION ADMIN",
        on: "*.*",
        why: "KILL CONNECTION of other users' sessions (fencing, demotion) and of the \
              replication IO thread: error 1095 without it",
    },
    Privilege {
        name: "READ_ONLY ADMIN",
        on: "*.*",
        why: "SET GLOBAL read_only (fencing, Demote, Promote): error 1227 without it. It also \
              lets the agent write past read_only; its heartbeat write checks read_only itself",
    },
    Privilege {
        name: "REPLICATION SLAVE ADMIN",
        on: "*.*",
        why: "START/STOP SLAVE, CHANGE MASTER, SET GLOBAL gtid_slave_pos and \
              rpl_semi_sync_slave_enabled: error 1227 without it",
    },
    Privilege {
        name: "REPLICATION MASTER ADMIN",
        on: "*.*",
        why: "SET GLOBAL rpl_semi_sync_master_* (Promote, SetSemiSync, a repointed \
              former primary): error 1227 without it",
    },
    Privilege {
        name: "SLAVE MONITOR",
        on: "*.*",
        why: "SHOW SLAVE STATUS (every poll and most actions): error 1227 without it",
    },
    Privilege {
        name: "SELECT",
        on: MYHA_SCHEMA,
        why: "reads its heartbeat row (replication lag)",
    },
    Privilege {
        name: "INSERT",
        on: MYHA_SCHEMA,
        why: "writes its heartbeat row on the primary",
    },
    Privilege {
        name: "UPDATE",
        on: MYHA_SCHEMA,
        why: "the heartbeat write's ON DUPLICATE KEY UPDATE",
    },
    Privilege {
        name: "CREATE",
        on: MYHA_SCHEMA,
        why: "creates the schema and the heartbeat table on first start",
    },
];

/// MySQL 8.0: the same statements' privileges per its manual; not live-tested (no MySQL
/// server here).
const MYSQL_AGENT_PRIVILEGES: &[Privilege] = &[
    Privilege {
        name: "RELOAD",
        on: "*.*",
        why: "RESET REPLICA ALL",
    },
    Privilege {
        name: "PROCESS",
        on: "*.*",
        why: "information_schema.PROCESSLIST beyond its own sessions (fencing)",
    },
    Privilege {
        name: "CONNECTION_ADMIN",
        on: "*.*",
        why: "KILL CONNECTION of other users' sessions (fencing). It also lets the agent \
              write past read_only (not past super_read_only)",
    },
    Privilege {
        name: "SYSTEM_VARIABLES_ADMIN",
        on: "*.*",
        why: "SET GLOBAL read_only, super_read_only and the semi-sync variables",
    },
    Privilege {
        name: "REPLICATION_SLAVE_ADMIN",
        on: "*.*",
        why: "START/STOP REPLICA, CHANGE REPLICATION SOURCE",
    },
    Privilege {
        name: "REPLICATION CLIENT",
        on: "*.*",
        why: "SHOW REPLICA STATUS",
    },
    Privilege {
        name: "SELECT",
        on: MYHA_SCHEMA,
        why: "reads its heartbeat row (replication lag)",
    },
    Privilege {
        name: "INSERT",
        on: MYHA_SCHEMA,
        why: "writes its heartbeat row on the primary",
    },
    Privilege {
        name: "UPDATE",
        on: MYHA_SCHEMA,
        why: "the heartbeat write's ON DUPLICATE KEY UPDATE",
    },
    Privilege {
        name: "CREATE",
        on: MYHA_SCHEMA,
        why: "creates the schema and the heartbeat table on first start",
    },
];

/// Where a replica replicates from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub connect_retry_secs: u32,
    pub heartbeat_period_secs: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerVariables {
    pub server_id: u32,
    pub server_uuid: String,
    pub version: String,
    pub read_only: bool,
    pub super_read_only: bool,
    /// Everything applied or written here (MariaDB `gtid_current_pos`, MySQL `gtid_executed`).
    pub gtid_position: String,
    pub gtid_binlog_pos: String,
    /// MariaDB: the last GTID of every (domain, server) in the binlog. Unlike a position it shows
    /// a transaction another server never had even when that server has since written higher
    /// sequence numbers of its own.
    pub gtid_binlog_state: String,
    pub gtid_slave_pos: String,
    pub semi_sync_primary_enabled: bool,
    pub semi_sync_replica_enabled: bool,
    pub semi_sync_timeout_ms: u64,
    pub semi_sync_wait_point: String,
    /// wait_no_slave / wait_no_replica (`None`: the plugin is not loaded).
    pub semi_sync_wait_no_replica: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SemiSyncStatus {
    pub primary_active: bool,
    pub primary_clients: u32,
    pub primary_yes_tx: u64,
    pub primary_no_tx: u64,
    pub replica_active: bool,
    /// `Uptime` (seconds since mysqld started), read with the same query; `None` if absent.
    pub uptime_s: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ThreadState {
    #[default]
    Stopped,
    Connecting,
    Running,
}

impl ThreadState {
    fn parse(
        what: &'static str,
        column: &str,
        value: Option<String>,
    ) -> Result<ThreadState, FlavorError> {
        match value.as_deref() {
            None | Some("No") | Some("") => Ok(ThreadState::Stopped),
            Some("Yes") => Ok(ThreadState::Running),
            // MariaDB shows "Preparing" briefly while the IO thread sets up.
            Some("Connecting") | Some("Preparing") => Ok(ThreadState::Connecting),
            Some(other) => Err(FlavorError::BadValue {
                what,
                column: column.to_string(),
                value: other.to_string(),
                expected: "Yes, No, Connecting or Preparing",
            }),
        }
    }
}

impl fmt::Display for ThreadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThreadState::Stopped => "stopped",
            ThreadState::Connecting => "connecting",
            ThreadState::Running => "running",
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub configured: bool,
    pub source_host: String,
    pub source_port: u32,
    pub io_state: ThreadState,
    pub sql_state: ThreadState,
    pub last_io_errno: u32,
    pub last_io_error: String,
    pub last_sql_errno: u32,
    pub last_sql_error: String,
    pub gtid_io_pos: String,
    pub using_gtid: bool,
    pub seconds_behind: Option<u64>,
    /// The configured apply delay (`MASTER_DELAY` / `SOURCE_DELAY`), seconds; 0 when none.
    pub sql_delay_secs: u64,
    /// The SQL thread's position in the relay log (`Relay_Log_File`, `Relay_Log_Pos`).
    pub relay_log_file: String,
    pub relay_log_pos: u64,
}

impl ReplicaStatus {
    pub fn replicating(&self) -> bool {
        self.io_state == ThreadState::Running && self.sql_state == ThreadState::Running
    }
}

/// SQL string literal with backslashes and quotes escaped (default sql_mode).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A statement fit for an error or a log: the string literal given to a password
/// (`MASTER_PASSWORD`, `SOURCE_PASSWORD`, `PASSWORD`, `IDENTIFIED BY`; `=`, `(` and blanks
/// between) becomes `'***'`, whatever it holds: commas, doubled or backslash-escaped quotes,
/// the key words themselves. The statement is read as SQL: key words inside other literals are
/// not keys, and every other literal is kept as it is.
pub fn redact_secrets(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.char_indices().peekable();
    // The last word read outside literals, upper-cased, and whether a password literal is
    // expected next.
    let mut last_word = String::new();
    let mut expect_secret = false;
    while let Some((i, c)) = chars.next() {
        if c == '\'' || c == '"' {
            let end = literal_end(sql, i, c);
            if expect_secret {
                out.push_str("'***'");
            } else {
                out.push_str(&sql[i..end]);
            }
            expect_secret = false;
            last_word.clear();
            while chars.peek().is_some_and(|(j, _)| *j < end) {
                chars.next();
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let word = sql[i..end].to_ascii_uppercase();
            expect_secret = matches!(
                word.as_str(),
                "MASTER_PASSWORD" | "SOURCE_PASSWORD" | "PASSWORD"
            ) || (word == "BY" && last_word == "IDENTIFIED");
            out.push_str(&sql[i..end]);
            last_word = word;
            continue;
        }
        // Blanks, `=` and `(` may stand between a key and its literal; anything else ends
        // the expectation.
        if !(c.is_whitespace() || c == '=' || c == '(') {
            expect_secret = false;
        }
        out.push(c);
    }
    out
}

/// The byte index just past the string literal opened by `quote` at `start` (the end of `sql`
/// when it is not closed): a backslash escapes the next character, a doubled quote is one.
fn literal_end(sql: &str, start: usize, quote: char) -> usize {
    let mut it = sql[start + quote.len_utf8()..].char_indices();
    let base = start + quote.len_utf8();
    while let Some((j, c)) = it.next() {
        if c == '\\' {
            it.next();
        } else if c == quote {
            let after = base + j + c.len_utf8();
            if sql[after..].starts_with(quote) {
                it.next();
            } else {
                return after;
            }
        }
    }
    sql.len()
}

/// Servers print multi-element GTID sets with newlines after commas.
fn normalise_gtid_text(s: &str) -> String {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// `Variable_name`/`Value` rows keyed by the lower-cased name (servers differ in case:
/// `Rpl_semi_sync_master_status` vs `rpl_semi_sync_master_enabled`).
fn name_value_map(
    rows: &[Row],
    what: &'static str,
) -> Result<HashMap<String, String>, FlavorError> {
    let column = |row: &Row, name: &str| -> Result<String, FlavorError> {
        row.get(name)
            .map(|v| v.clone().unwrap_or_default())
            .ok_or(FlavorError::MissingColumn {
                what,
                column: name.into(),
            })
    };
    rows.iter()
        .map(|row| {
            Ok((
                column(row, "Variable_name")?.to_ascii_lowercase(),
                column(row, "Value")?,
            ))
        })
        .collect()
}

fn parse_bool(
    what: &'static str,
    column: &str,
    value: Option<String>,
) -> Result<Option<bool>, FlavorError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("on") || v == "1" || v.eq_ignore_ascii_case("yes") => {
            Ok(Some(true))
        }
        Some(v) if v.eq_ignore_ascii_case("off") || v == "0" || v.eq_ignore_ascii_case("no") => {
            Ok(Some(false))
        }
        Some(v) => Err(FlavorError::BadValue {
            what,
            column: column.to_string(),
            value: v.to_string(),
            expected: "ON/OFF",
        }),
    }
}

fn parse_num<T: std::str::FromStr>(
    what: &'static str,
    column: &str,
    value: Option<String>,
) -> Result<Option<T>, FlavorError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<T>().map(Some).map_err(|_| FlavorError::BadValue {
            what,
            column: column.to_string(),
            value: v.to_string(),
            expected: "a number",
        }),
    }
}

#[cfg(test)]
mod tests;
