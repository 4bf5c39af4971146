//! Network faults on loopback, the first piece of the harness's network-fault tooling: silently
//! dropping one TCP connection's packets (a link that stops carrying data without a reset, as a
//! cable pulled or a stateful firewall losing its state would), with `iptables` rules on `lo`.
//!
//! Every rule the harness adds is tagged with a comment naming the process that added it
//! (`myha-harness:<pid>`), removed when its [`LinkDrop`] guard drops (also while unwinding), and
//! rules whose process is gone (a killed run) are removed before any new one is added. Only
//! loopback is touched: the rules match `-i lo`, so nothing leaves this machine.

use std::collections::HashSet;

use crate::error::{HarnessError, Result};
use crate::util::{pid_alive, run_tool};

const TAG: &str = "myha-harness:";

fn iptables(args: &[&str]) -> Result<String> {
    run_tool(
        "iptables",
        args,
        "package iptables; scripts/dev installs it",
    )
}

/// The harness's rules in the INPUT chain, as `iptables -S` prints them, with the pid that added
/// each.
fn tagged_rules() -> Result<Vec<(u32, String)>> {
    let rules = iptables(&["-S", "INPUT"])?;
    Ok(rules
        .lines()
        .filter_map(|l| {
            let at = l.find(TAG)?;
            let pid: String = l[at + TAG.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            Some((pid.parse().ok()?, l.to_string()))
        })
        .collect())
}

/// Deletes a rule given as `iptables -S` prints it (`-A INPUT ...`).
fn delete_rule(rule: &str) -> Result<()> {
    let Some(spec) = rule.strip_prefix("-A ") else {
        return Ok(());
    };
    // `-S` quotes the comment; the tag has no spaces, so splitting on whitespace and dropping
    // the quotes gives the arguments back.
    let args: Vec<String> = std::iter::once("-D".to_string())
        .chain(
            spec.split_whitespace()
                .map(|a| a.trim_matches('"').to_string()),
        )
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    iptables(&refs).map(|_| ())
}

/// Removes the rules of harness processes that no longer run (a killed test run).
pub fn remove_stale_rules() -> Result<usize> {
    let mut n = 0;
    for (pid, rule) in tagged_rules()? {
        if pid != std::process::id() && !pid_alive(pid) {
            delete_rule(&rule)?;
            n += 1;
        }
    }
    Ok(n)
}

/// A silently dropped loopback TCP connection, one or both directions, until dropped.
#[derive(Debug)]
pub struct LinkDrop {
    rules: Vec<Vec<String>>,
    what: String,
}

impl LinkDrop {
    /// Drops every packet sent from local port `from` to local port `to` on loopback (one
    /// direction of one connection, e.g. a primary's mysqld port to a replica's ephemeral port:
    /// the replica then receives nothing, not even the reset when the primary dies).
    pub fn one_way(from: u16, to: u16) -> Result<LinkDrop> {
        Self::add(
            vec![ports(Some(from), Some(to))],
            format!("127.0.0.1:{from} -> 127.0.0.1:{to}"),
        )
    }

    /// Both directions of the connection between local ports `a` and `b`.
    pub fn both_ways(a: u16, b: u16) -> Result<LinkDrop> {
        Self::add(
            vec![ports(Some(a), Some(b)), ports(Some(b), Some(a))],
            format!("127.0.0.1:{a} <-> 127.0.0.1:{b}"),
        )
    }

    /// Every packet to or from local port `port` (e.g. a mysqld's TCP port: every client and
    /// replica loses it silently, while its unix socket still answers).
    pub fn port(port: u16) -> Result<LinkDrop> {
        Self::add(
            vec![ports(None, Some(port)), ports(Some(port), None)],
            format!("127.0.0.1:{port} (both directions, every peer)"),
        )
    }

    fn add(matches: Vec<Vec<String>>, what: String) -> Result<LinkDrop> {
        remove_stale_rules()?;
        let tag = format!("{TAG}{}", std::process::id());
        let mut drop = LinkDrop {
            rules: Vec::new(),
            what,
        };
        for m in matches {
            let mut rule: Vec<String> = ["INPUT", "-i", "lo", "-p", "tcp"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            rule.extend(m);
            rule.extend(
                ["-m", "comment", "--comment", &tag, "-j", "DROP"]
                    .iter()
                    .map(|s| s.to_string()),
            );
            let mut args = vec!["-I".to_string()];
            args.extend(rule.iter().cloned());
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            // On failure `drop` (holding the rules added so far) removes them.
            iptables(&refs)?;
            drop.rules.push(rule);
        }
        Ok(drop)
    }

    /// What is dropped, for messages.
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Heals the link now (also done on drop).
    pub fn heal(mut self) -> Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> Result<()> {
        let mut first_err = None;
        for rule in self.rules.drain(..) {
            let mut args = vec!["-D".to_string()];
            args.extend(rule);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = iptables(&refs) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for LinkDrop {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("harness: could not heal {}: {e}", self.what);
        }
    }
}

/// `--sport`/`--dport` matches.
fn ports(sport: Option<u16>, dport: Option<u16>) -> Vec<String> {
    let mut m = Vec::new();
    if let Some(p) = sport {
        m.extend(["--sport".to_string(), p.to_string()]);
    }
    if let Some(p) = dport {
        m.extend(["--dport".to_string(), p.to_string()]);
    }
    m
}

/// The socket inodes process `pid` holds open.
fn socket_inodes(pid: u32) -> Result<HashSet<u64>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| HarnessError::Io {
        what: format!("list {dir}"),
        source,
    })?;
    Ok(entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect())
}

/// `ADDR:PORT` of `/proc/net/tcp` (hex, the address in host byte order): the port.
fn hex_port(field: &str) -> Option<u16> {
    u16::from_str_radix(field.rsplit(':').next()?, 16).ok()
}

/// The local ports of `pid`'s established IPv4 TCP connections to local port `remote_port`
/// (e.g. a replica mysqld's IO-thread connection to its primary's port).
pub fn local_ports_to(pid: u32, remote_port: u16) -> Result<Vec<u16>> {
    let inodes = socket_inodes(pid)?;
    let table = std::fs::read_to_string("/proc/net/tcp").map_err(|source| HarnessError::Io {
        what: "read /proc/net/tcp".into(),
        source,
    })?;
    const ESTABLISHED: &str = "01";
    let mut ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, state, inode) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(9)?);
            let inode: u64 = inode.parse().ok()?;
            (*state == ESTABLISHED
                && inodes.contains(&inode)
                && hex_port(remote) == Some(remote_port))
            .then(|| hex_port(local))
            .flatten()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_of_proc_net_tcp() {
        assert_eq!(hex_port("0100007F:0CEA"), Some(3306));
        assert_eq!(hex_port("00000000:0000"), Some(0));
        assert_eq!(hex_port("junk"), None);
    }

    #[test]
    fn finds_its_own_loopback_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mine = c.local_addr().expect("addr").port();
        let found = local_ports_to(std::process::id(), port).expect("read /proc");
        assert_eq!(found, vec![mine]);
    }
}
