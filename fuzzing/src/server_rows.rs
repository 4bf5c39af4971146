//! What servers answer, as the agent hands it to the `flavor` crate: the version string and
//! result rows (`SHOW GLOBAL VARIABLES`, the semi-sync `SHOW GLOBAL STATUS`, `SHOW SLAVE STATUS`,
//! the process list), then the GTID text found in them, as the agent parses it next. Also the
//! redaction of the statements that carry replication passwords.
//!
//! Input format (the seeds are real MariaDB 10.11 answers in it): the first line is
//! `@@version`; then rows, one `Column=value` a line (`Column` alone is SQL NULL), rows
//! separated by a blank line.

use flavor::{redact_secrets, Dialect, Row, SourceSpec};
use gtid::GtidSet;

pub fn server_rows(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let (version, rows) = parse_input(&text);
    let mut accepted = false;
    let detected = Dialect::detect(version);
    if let Err(e) = &detected {
        assert!(!e.to_string().is_empty());
    }
    for dialect in detected
        .iter()
        .copied()
        .chain([Dialect::MARIADB_10_11, Dialect::MYSQL_8_0])
    {
        accepted |= answers(dialect, &rows);
        redaction(dialect, &text);
    }
    accepted
}

/// `(version, rows)` from the input format above.
fn parse_input(text: &str) -> (&str, Vec<Row>) {
    let (version, rest) = text.split_once('\n').unwrap_or((text, ""));
    let mut rows = Vec::new();
    let mut row = Row::new();
    for line in rest.split('\n') {
        if line.is_empty() {
            if !row.is_empty() {
                rows.push(std::mem::take(&mut row));
            }
            continue;
        }
        match line.split_once('=') {
            Some((column, value)) => row.insert(column.to_string(), Some(value.to_string())),
            None => row.insert(line.to_string(), None),
        };
    }
    if !row.is_empty() {
        rows.push(row);
    }
    (version, rows)
}

/// Every parser of server answers, and the GTID parsing of the positions they return. Accepted:
/// rows that one of them read (no rows at all is no answer).
fn answers(dialect: Dialect, rows: &[Row]) -> bool {
    if rows.is_empty() {
        let _ = dialect.parse_replica_status(None);
        return false;
    }
    let mut accepted = false;
    match dialect.parse_variables(rows) {
        Ok(v) => {
            accepted = true;
            for text in [
                &v.gtid_position,
                &v.gtid_binlog_pos,
                &v.gtid_binlog_state,
                &v.gtid_slave_pos,
            ] {
                let _ = GtidSet::parse(dialect.flavor, text).map_err(|e| e.to_string());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match dialect.parse_semi_sync_status(rows) {
        Ok(_) => accepted = true,
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match dialect.parse_replica_status(rows.first()) {
        Ok(status) => {
            accepted = true;
            let _ = GtidSet::parse(dialect.flavor, &status.gtid_io_pos).map_err(|e| e.to_string());
            let _ = status.replicating();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let _ = dialect.killable_sessions(rows, &["myha_agent"]);
    accepted |= !dialect.killable_sessions(rows, &[]).is_empty();
    if let Some(value) = rows.first().and_then(|r| r.values().next()) {
        let _ = dialect.wait_reached(value.as_deref());
    }
    accepted
}

/// A replication password, whatever it holds, is replaced by `'***'` and nothing else in the
/// statement changes: the host, user and password come from the input's first three lines.
fn redaction(dialect: Dialect, text: &str) {
    let _ = redact_secrets(text);
    let mut lines = text.splitn(3, '\n');
    let host = lines.next().unwrap_or_default().to_string();
    let user = lines.next().unwrap_or_default().to_string();
    let password = lines.next().unwrap_or_default().to_string();
    let spec = |password: String| SourceSpec {
        host: host.clone(),
        port: 3306,
        user: user.clone(),
        password,
        connect_retry_secs: 1,
        heartbeat_period_secs: 0.5,
    };
    let redacted: Vec<String> = dialect
        .change_source(&spec(password))
        .iter()
        .map(|s| redact_secrets(s))
        .collect();
    assert_eq!(
        redacted,
        dialect.change_source(&spec("***".into())),
        "the redacted statements of host {host:?}, user {user:?}"
    );
}
