//! Thin I/O over mysql_async: connect with a deadline, run text queries, hand rows back as
//! [`flavor::Row`]. Every call is bounded because a frozen mysqld accepts TCP but never answers.

use std::time::Duration;

use flavor::{Dialect, Row};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};

use crate::config::MysqlSection;

#[derive(Debug, thiserror::Error)]
pub enum MysqlError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: mysql_async::Error,
    },
    #[error("connect to {addr}: no answer within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("`{sql}`: {source}")]
    Query {
        sql: String,
        source: mysql_async::Error,
    },
    #[error("`{sql}`: no answer within {timeout:?}")]
    QueryTimeout { sql: String, timeout: Duration },
    #[error("cannot understand the server's answer: {0}")]
    Parse(#[from] flavor::FlavorError),
}

impl MysqlError {
    /// The server itself answered (with an error such as access denied): it is alive.
    pub fn server_answered(&self) -> bool {
        matches!(
            self,
            MysqlError::Connect {
                source: mysql_async::Error::Server(_),
                ..
            } | MysqlError::Query {
                source: mysql_async::Error::Server(_),
                ..
            }
        )
    }

    /// MySQL error code when the server answered with an error.
    pub fn server_code(&self) -> Option<u16> {
        match self {
            MysqlError::Query {
                source: mysql_async::Error::Server(e),
                ..
            } => Some(e.code),
            _ => None,
        }
    }
}

/// How to reach one mysqld as the agent.
#[derive(Clone, Debug)]
pub struct Endpoint {
    opts: mysql_async::Opts,
    addr: String,
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
}

impl Endpoint {
    pub fn new(cfg: &MysqlSection) -> Endpoint {
        let mut b = OptsBuilder::default()
            .ip_or_hostname(cfg.host.clone())
            .tcp_port(cfg.port)
            .user(Some(cfg.user.clone()))
            .pass(Some(cfg.password.expose().to_string()))
            .prefer_socket(false)
            .stmt_cache_size(0);
        let addr = match &cfg.socket {
            Some(s) => {
                b = b.socket(Some(s.to_string_lossy().into_owned()));
                s.display().to_string()
            }
            None => format!("{}:{}", cfg.host, cfg.port),
        };
        Endpoint {
            opts: b.into(),
            addr,
            connect_timeout: cfg.connect_timeout,
            query_timeout: cfg.query_timeout,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The same credentials, towards another server over TCP (the primary, for the probe).
    pub fn towards(&self, host: &str, port: u16, timeout: Duration) -> Endpoint {
        let opts = OptsBuilder::from_opts(self.opts.clone())
            .ip_or_hostname(host.to_string())
            .tcp_port(port)
            .socket(None::<String>)
            .prefer_socket(false);
        Endpoint {
            opts: opts.into(),
            addr: format!("{host}:{port}"),
            connect_timeout: timeout,
            query_timeout: timeout,
        }
    }

    pub async fn connect(&self) -> Result<Conn, MysqlError> {
        match tokio::time::timeout(self.connect_timeout, Conn::new(self.opts.clone())).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(source)) => Err(MysqlError::Connect {
                addr: self.addr.clone(),
                source,
            }),
            Err(_) => Err(MysqlError::ConnectTimeout {
                addr: self.addr.clone(),
                timeout: self.connect_timeout,
            }),
        }
    }
}

fn value_text(v: &mysql_async::Value) -> Option<String> {
    use mysql_async::Value;
    match v {
        Value::NULL => None,
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Int(i) => Some(i.to_string()),
        Value::UInt(u) => Some(u.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Double(d) => Some(d.to_string()),
        other => Some(other.as_sql(true)),
    }
}

/// Runs `sql` and returns its rows by column name, within `timeout`.
pub async fn query_rows(
    conn: &mut Conn,
    sql: &str,
    timeout: Duration,
) -> Result<Vec<Row>, MysqlError> {
    let fut = conn.query::<mysql_async::Row, _>(sql);
    let rows = match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(source)) => {
            return Err(MysqlError::Query {
                sql: sql.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(MysqlError::QueryTimeout {
                sql: sql.to_string(),
                timeout,
            })
        }
    };
    Ok(rows
        .iter()
        .map(|r| {
            r.columns_ref()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name_str().into_owned(), r.as_ref(i).and_then(value_text)))
                .collect()
        })
        .collect())
}

/// First column of the first row.
pub async fn query_scalar(
    conn: &mut Conn,
    sql: &str,
    timeout: Duration,
) -> Result<Option<String>, MysqlError> {
    let rows = conn.query::<mysql_async::Row, _>(sql);
    match tokio::time::timeout(timeout, rows).await {
        Ok(Ok(rows)) => Ok(rows.first().and_then(|r| r.as_ref(0)).and_then(value_text)),
        Ok(Err(source)) => Err(MysqlError::Query {
            sql: sql.to_string(),
            source,
        }),
        Err(_) => Err(MysqlError::QueryTimeout {
            sql: sql.to_string(),
            timeout,
        }),
    }
}

pub async fn exec(conn: &mut Conn, sql: &str, timeout: Duration) -> Result<(), MysqlError> {
    match tokio::time::timeout(timeout, conn.query_drop(sql)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(MysqlError::Query {
            sql: redact(sql),
            source,
        }),
        Err(_) => Err(MysqlError::QueryTimeout {
            sql: redact(sql),
            timeout,
        }),
    }
}

/// Statements can carry the replication password; never echo it into errors or logs.
pub fn redact(sql: &str) -> String {
    flavor::redact_secrets(sql)
}

/// The server's dialect from `SELECT @@version`.
pub async fn detect_dialect(conn: &mut Conn, timeout: Duration) -> Result<Dialect, MysqlError> {
    let v = query_scalar(conn, "SELECT @@version", timeout)
        .await?
        .unwrap_or_default();
    Ok(Dialect::detect(&v)?)
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords() {
        let s = "CHANGE MASTER TO MASTER_HOST = 'h', MASTER_PASSWORD = 's3cr''et', MASTER_USE_GTID = slave_pos";
        let r = redact(s);
        assert!(!r.contains("s3cr"), "{r}");
        assert!(r.contains("MASTER_USE_GTID"), "{r}");
        assert_eq!(redact("STOP SLAVE"), "STOP SLAVE");
        // A password holding ", " (the rule used to stop there, leaking the rest).
        let s =
            "CHANGE MASTER TO MASTER_PASSWORD = 'x, tail-of-secret', MASTER_USE_GTID = slave_pos";
        let r = redact(s);
        assert!(!r.contains("tail-of-secret"), "{r}");
    }
}
