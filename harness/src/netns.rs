//! Hosts in network namespaces: the ground for the real network faults of the fault catalog
//! (P4, P6, P16 and the partial partitions), beside the loopback rules of [`crate::net`].
//!
//! A [`Network`] is a set of named hosts. Each host is a network namespace with one veth
//! (`eth0`) whose peer sits in a bridge; the bridge lives in a namespace of its own (the
//! network's "switch"), so the hosts' addresses (`10.99.0.0/24`) exist only inside the
//! namespaces this network made: the machine's own namespace gets neither a route nor an address
//! in that range, and nothing a test sends there can leave the machine.
//!
//! Names carry the creating process's pid (`myha<pid>n<k>-<host>`): the namespaces are deleted
//! when the [`Network`] drops (also while unwinding from a failed test), and those of a process
//! that is gone (a killed run) are deleted before any new network is made.
//!
//! Faults are `iptables` rules in the INPUT chain of the namespace where the packets arrive
//! (never OUTPUT: a sender would see EPERM, which no pulled cable gives), tagged with the host
//! the fault is about: [`Network::cut`] drops what crosses between a host and chosen others (both
//! directions, or one), [`Network::isolate`] cuts it from every other host, [`Network::lossy`]
//! drops a random share of what it receives, [`Network::heal`] removes a host's faults.
//!
//! Delay and jitter need `tc netem`, which this machine's kernel lacks
//! (`CONFIG_NET_SCH_NETEM` is not set: "Specified qdisc kind is unknown"); they are not offered
//! here rather than offered and failing.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{HarnessError, Result};
use crate::util::{pid_alive, run_tool};

/// Prefix of every namespace this harness makes.
const PREFIX: &str = "myha";
const SUBNET: [u8; 3] = [10, 99, 0];
/// Host addresses start here (`.1` is left free for a future gateway).
const FIRST_HOST: u8 = 10;

static NETWORKS: AtomicU32 = AtomicU32::new(0);

/// Which packets a cut drops, seen from the cut host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Nothing crosses either way.
    Both,
    /// The host receives nothing from the others (its own packets still leave).
    Inbound,
    /// Nothing the host sends reaches the others (it still receives).
    Outbound,
}

/// One host: a network namespace with one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// The namespace's name (`ip netns exec <ns> ...`).
    pub ns: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// `program` run inside this host's namespace (through `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs `f` on a thread that entered this host's namespace: sockets it opens belong to the
    /// host (a network namespace is entered per thread).
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.ns);
        let ns = self.ns.clone();
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).map_err(|source| HarnessError::Io {
                what: format!("open {path}"),
                source,
            })?;
            // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(HarnessError::Io {
                    what: format!("enter network namespace {ns}"),
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .map_err(|_| HarnessError::Invalid(format!("a thread in namespace {} panicked", self.ns)))?
    }
}

/// A set of hosts on one bridge. Dropping it deletes every namespace it made.
#[derive(Debug)]
pub struct Network {
    switch: String,
    hosts: Vec<Host>,
}

fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    run_tool(
        program,
        args,
        "packages iproute2 and iptables; scripts/dev installs them",
    )
}

/// The pid a namespace name of ours carries (`myha<pid>n<k>-...`).
fn owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('n') {
        return None;
    }
    digits.parse().ok()
}

/// Our namespaces (`ip netns list`).
fn our_namespaces() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| owner_pid(n).is_some())
        .map(str::to_string)
        .collect())
}

/// Deletes the namespaces of harness processes that are gone (a killed run). Returns how many.
pub fn remove_stale() -> Result<usize> {
    let mut removed = 0;
    for ns in our_namespaces()? {
        if owner_pid(&ns).is_some_and(|p| !pid_alive(p)) && ip(&["netns", "del", &ns]).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

impl Network {
    /// Makes one namespace per name in `hosts`, each with an address on a bridge of its own.
    pub fn create(hosts: &[&str]) -> Result<Network> {
        if hosts.is_empty() || hosts.len() > usize::from(u8::MAX - FIRST_HOST) {
            return Err(HarnessError::Invalid(format!(
                "a network has 1 to {} hosts, not {}",
                u8::MAX - FIRST_HOST,
                hosts.len()
            )));
        }
        for (i, h) in hosts.iter().enumerate() {
            let valid = !h.is_empty()
                && h.len() <= 32
                && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !valid || hosts[..i].contains(h) {
                return Err(HarnessError::Invalid(format!(
                    "host name {h:?}: unique, 1-32 of [A-Za-z0-9-]"
                )));
            }
        }
        remove_stale()?;
        let k = NETWORKS.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}n{k}", std::process::id());
        let switch = format!("{base}-sw");
        // From here on, Drop deletes whatever was made, also when a later step fails.
        let mut net = Network {
            switch: switch.clone(),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, name) in hosts.iter().enumerate() {
            let ns = format!("{base}-{name}");
            let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], FIRST_HOST + i as u8);
            ip(&["netns", "add", &ns])?;
            net.hosts.push(Host {
                name: name.to_string(),
                ns: ns.clone(),
                addr,
            });
            let port = format!("h{i}");
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            let cidr = format!("{addr}/24");
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| HarnessError::Invalid(format!("no host {name:?} in this network")))
    }

    fn iptables(&self, host: &Host, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", host.ns.as_str(), "iptables", "-w"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Appends `-A INPUT <matches> -j DROP` on `at`, tagged with the host the fault is about.
    fn drop_rule(&self, at: &Host, matches: &[&str], about: &str) -> Result<()> {
        let tag = format!("{PREFIX}:{about}");
        let mut args = vec!["-A", "INPUT"];
        args.extend_from_slice(matches);
        args.extend(["-m", "comment", "--comment", tag.as_str(), "-j", "DROP"]);
        self.iptables(at, &args).map(drop)
    }

    /// Drops, on `at`, what arrives from `from`.
    fn drop_from(&self, at: &Host, from: &Host, about: &str) -> Result<()> {
        self.drop_rule(at, &["-s", &from.addr.to_string()], about)
    }

    /// Drops what crosses between `host` and each of `others`, in `dir` as seen from `host`.
    /// Silent for both ends: every packet is dropped where it arrives (an outbound cut on the
    /// others' side), so no sender sees an error, no reset, no ICMP (a pulled cable).
    pub fn cut(&self, host: &str, others: &[&str], dir: Direction) -> Result<()> {
        let h = self.host(host)?;
        for o in others {
            let o = self.host(o)?;
            if matches!(dir, Direction::Both | Direction::Inbound) {
                self.drop_from(h, o, host)?;
            }
            if matches!(dir, Direction::Both | Direction::Outbound) {
                self.drop_from(o, h, host)?;
            }
        }
        Ok(())
    }

    /// Cuts `host` from every other host of the network.
    pub fn isolate(&self, host: &str, dir: Direction) -> Result<()> {
        let others: Vec<&str> = self
            .hosts
            .iter()
            .map(|h| h.name.as_str())
            .filter(|n| *n != host)
            .collect();
        self.cut(host, &others, dir)
    }

    /// Drops a random `share` (0 < share < 1) of the packets `host` receives from the others.
    pub fn lossy(&self, host: &str, share: f64) -> Result<()> {
        if !(share > 0.0 && share < 1.0) {
            return Err(HarnessError::Invalid(format!(
                "a loss share is between 0 and 1, not {share}"
            )));
        }
        let h = self.host(host)?;
        let p = format!("{share:.4}");
        let m = [
            "-i",
            "eth0",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &p,
        ];
        self.drop_rule(h, &m, host)
    }

    /// Removes every fault about `host` (its cuts, on whichever host they were placed, and its
    /// loss).
    pub fn heal(&self, host: &str) -> Result<()> {
        self.host(host)?;
        let tag = format!("{PREFIX}:{host}");
        for h in &self.hosts {
            let rules = self.iptables(h, &["-S", "INPUT"])?;
            for rule in rules.lines() {
                // `iptables -S` prints the comment quoted: `--comment "myha:a"`.
                let words: Vec<&str> = rule
                    .split_whitespace()
                    .map(|w| w.trim_matches('"'))
                    .collect();
                let ours = words.windows(2).any(|w| w[0] == "--comment" && w[1] == tag);
                if !ours || words.first() != Some(&"-A") {
                    continue;
                }
                let mut args = vec!["-D"];
                args.extend(&words[1..]);
                self.iptables(h, &args)?;
            }
        }
        Ok(())
    }

    /// Removes every fault of every host.
    pub fn heal_all(&self) -> Result<()> {
        for h in &self.hosts {
            self.iptables(h, &["-F", "INPUT"])?;
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids_are_read_from_our_names_only() {
        assert_eq!(owner_pid("myha123n0-sw"), Some(123));
        assert_eq!(owner_pid("myha4242n17-primary"), Some(4242));
        assert_eq!(owner_pid("myha-probe"), None);
        assert_eq!(owner_pid("myhaXn0-a"), None);
        assert_eq!(owner_pid("myha12-a"), None);
        assert_eq!(owner_pid("other123n0-a"), None);
    }
}
