//! Thin I/O over mysql_async: connect with a deadline, run text queries, hand rows back as
//! [`flavor::Row`]. Every call is bounded because a frozen mysqld accepts TCP but never answers.

use std::time::Duration;

use flavor::{Dialect, Row};
use mysql_async::prelude::Queryable;
use mysql_async::{ClientIdentity, Conn, OptsBuilder, SslOpts};

use crate::config::{MysqlSection, MysqlTls};

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
    /// `[mysql.tls]`, for every TCP connection (this one unless it uses the socket, and those
    /// made by [`Endpoint::towards`]).
    tls: Option<SslOpts>,
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
        let tls = cfg.tls.as_ref().map(ssl_opts);
        let addr = match &cfg.socket {
            // No TLS over the socket: it does not leave the host, and mysql_async would announce
            // TLS in the handshake without running it there.
            Some(s) => {
                b = b.socket(Some(s.to_string_lossy().into_owned()));
                s.display().to_string()
            }
            None => {
                b = b.ssl_opts(tls.clone());
                format!("{}:{}", cfg.host, cfg.port)
            }
        };
        Endpoint {
            opts: b.into(),
            tls,
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
            .prefer_socket(false)
            .ssl_opts(self.tls.clone());
        Endpoint {
            opts: opts.into(),
            tls: self.tls.clone(),
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

/// `[mysql.tls]` as mysql_async's options: the configured CA is the only one trusted (not the
/// built-in web roots). Over TLS mysql_async sends a `caching_sha2_password` password inside the
/// encrypted channel and never asks for the server's RSA key; over plaintext it always asks (it
/// has no setting for it), which is the client side of MySQL's public-key retrieval.
fn ssl_opts(t: &MysqlTls) -> SslOpts {
    let identity = t
        .cert_file
        .clone()
        .zip(t.key_file.clone())
        .map(|(cert, key)| ClientIdentity::new(cert.into(), key.into()));
    SslOpts::default()
        .with_root_certs(vec![t.ca_file.clone().into()])
        .with_disable_built_in_roots(true)
        .with_danger_skip_domain_validation(!t.verify_identity)
        .with_client_identity(identity)
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
    use crate::config::AgentConfig;

    /// TLS goes on every TCP connection and never on the socket; the configured CA is the only
    /// root, and `verify_identity = false` skips the name check only.
    #[test]
    fn tls_on_tcp_connections_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "pem").expect("write");
        let cfg = |extra: &str, tls: &str| {
            AgentConfig::parse(&format!(
                "[tablet]\ncell = \"z\"\nuid = 1\nkeyspace = \"k\"\nshard = \"0\"\n\
                 [mysql]\nport = 3306\nuser = \"a\"\nrepl_user = \"r\"\n{extra}\n{tls}\n\
                 [etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n"
            ))
            .expect("parses")
            .mysql
        };
        let tls = format!("[mysql.tls]\nca_file = {:?}", ca.display().to_string());
        let ep = super::Endpoint::new(&cfg("", &tls));
        let ssl = ep.opts.ssl_opts().expect("TCP connection over TLS");
        assert!(ssl.disable_built_in_roots());
        assert!(!ssl.skip_domain_validation());
        assert_eq!(ssl.root_certs(), [ca.clone().into()]);

        let ep = super::Endpoint::new(&cfg("socket = \"/run/mysqld.sock\"", &tls));
        assert!(ep.opts.ssl_opts().is_none(), "no TLS over the socket");
        let probe = ep.towards("10.0.0.5", 3306, std::time::Duration::from_secs(1));
        assert!(
            probe.opts.ssl_opts().is_some(),
            "the probe of the primary uses TLS"
        );

        let ep = super::Endpoint::new(&cfg("", &format!("{tls}\nverify_identity = false")));
        let ssl = ep.opts.ssl_opts().expect("TLS");
        assert!(ssl.skip_domain_validation() && !ssl.accept_invalid_certs());

        let ep = super::Endpoint::new(&cfg("", ""));
        assert!(ep.opts.ssl_opts().is_none());
        assert!(ep
            .towards("10.0.0.5", 3306, std::time::Duration::from_secs(1))
            .opts
            .ssl_opts()
            .is_none());
    }

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
