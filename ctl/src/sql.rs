//! `myhactl sandbox sql`: run statements as the sandbox's application user on the current
//! primary (as named by the etcd shard record) or on a given tablet.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use mysql_async::prelude::Queryable;
use topo::Topo;

#[derive(clap::Args, Debug)]
pub struct SqlArgs {
    /// Sandbox directory (default: $MYHA_SANDBOX_DIR, else $HOME/.myha/sandbox).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run on this tablet instead of the current primary.
    #[arg(long)]
    pub tablet: Option<String>,
    /// Statements, run in order; result rows are printed tab-separated.
    #[arg(required = true)]
    pub statements: Vec<String>,
}

pub async fn run(args: SqlArgs) -> anyhow::Result<()> {
    let dir = args.dir.unwrap_or_else(crate::sandbox::default_dir);
    let state = crate::sandbox::read_state(&dir)?;
    let alias = match args.tablet {
        Some(a) => a,
        None => {
            let access = crate::security::from_sandbox(&state)?.etcd_access();
            let topo = Topo::connect_with(
                [state.etcd.as_str()],
                &state.prefix,
                Duration::from_secs(2),
                &access,
            )
            .await
            .with_context(|| format!("connecting to the sandbox's etcd at {}", state.etcd))?;
            let (shard, _) = topo
                .get_shard(&state.keyspace, &state.shard)
                .await?
                .with_context(|| {
                    format!("no shard record for {}/{}", state.keyspace, state.shard)
                })?;
            shard
                .primary
                .with_context(|| format!("{}/{} has no primary", state.keyspace, state.shard))?
        }
    };
    let tablet = state
        .tablets
        .iter()
        .find(|t| t.alias == alias)
        .with_context(|| format!("no tablet {alias} in the sandbox"))?;
    let (host, port) = tablet
        .mysql
        .rsplit_once(':')
        .with_context(|| format!("bad address {}", tablet.mysql))?;
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(host.to_string())
        .tcp_port(port.parse().context("port")?)
        .user(Some(state.app_user.clone()))
        .pass(Some(state.app_password.clone()))
        .db_name(Some(state.database.clone()));
    let mut conn = mysql_async::Conn::new(opts)
        .await
        .with_context(|| format!("connecting to {alias} at {}", tablet.mysql))?;
    for stmt in &args.statements {
        let rows: Vec<mysql_async::Row> = conn
            .query(stmt.as_str())
            .await
            .with_context(|| format!("on {alias}: `{stmt}`"))?;
        if let Some(first) = rows.first() {
            let header: Vec<String> = first
                .columns_ref()
                .iter()
                .map(|c| c.name_str().into_owned())
                .collect();
            println!("{}", header.join("\t"));
        }
        for row in &rows {
            let cells: Vec<String> = (0..row.len())
                .map(|i| match row.as_ref(i) {
                    None | Some(mysql_async::Value::NULL) => "NULL".to_string(),
                    Some(mysql_async::Value::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(v) => v.as_sql(true),
                })
                .collect();
            println!("{}", cells.join("\t"));
        }
        if rows.is_empty() {
            println!("ok ({alias}): {} row(s) affected", conn.affected_rows());
        }
    }
    conn.disconnect().await.ok();
    Ok(())
}
