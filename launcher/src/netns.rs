//! Hosts in network namespaces: the ground for the real network faults of the fault catalog
//! (P4, P6, P16 and the partial partitions), beside the loopback rules of [`crate::net`].
//!
//! A [`Network`] is a set of named hosts. Each host is a network namespace with one veth
//! (`eth0`) whose peer sits in a bridge; the bridge lives in a namespace of its own (the
//! network's "switch"), so the hosts' addresses (`10.99.0.0/24`) exist only inside the
//! namespaces this network made: the machine's own namespace gets neither a route nor an address
//! in that range, and nothing a test sends there can leave the machine.
//!
//! A network may also attach the machine's own namespace as one more host
//! ([`Network::create_with_machine`]): a veth from the machine into the bridge with the address
//! `.1` of the network's subnet. That is where the test process, its writers and its etcd client
//! run, so that they reach every host by its address and can be cut like any other host. Such a
//! network gets a subnet of its own (`10.99.<n>.0/24`, n >= 1, picked under a lock file so that
//! concurrent runs never share one); the machine then has a route to that subnet, and only to
//! the bridge: nothing sent there can leave the machine. A network without the machine uses
//! `10.99.0.0/24`, which then exists only inside its namespaces.
//!
//! Names carry the creating process's pid (`myha<pid>n<k>-<host>`): the namespaces are deleted
//! when the [`Network`] drops (also while unwinding from a failed test), and those of a process
//! that is gone (a killed run) are deleted before any new network is made, with the fault rules
//! such a run left in the machine's own namespace.
//!
//! Faults are `iptables` rules in the INPUT chain of the namespace where the packets arrive
//! (never OUTPUT: a sender would see EPERM, which no pulled cable gives), tagged with the
//! network and the host the fault is about (`myha<pid>n<k>:<host>`; on the machine's own
//! namespace the rules match only this network's addresses and only tagged rules are ever
//! removed): [`Network::cut`] drops what crosses between a host and chosen others (both
//! directions, or one), [`Network::isolate`] cuts it from every other host, [`Network::lossy`]
//! drops a random share of what it receives, [`Network::heal`] removes a host's faults.
//!
//! Delay and jitter ([`Network::delay`]) would be `tc netem`, which this machine's kernel lacks
//! (`CONFIG_NET_SCH_NETEM` is not set: "Specified qdisc kind is unknown"): the host's packets to
//! and from the network are queued to userspace instead (iptables `NFQUEUE`) and released when
//! due by a [`Delayer`]. Such rules come after every drop rule (drops are inserted at the
//! chain's head, queues appended), because a released packet skips the rest of its chain.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::delay::Delayer;
use crate::error::{HarnessError, Result};
use crate::util::{pid_alive, run_tool};

/// Prefix of every namespace this harness makes.
const PREFIX: &str = "myha";
/// Every network's addresses are in `10.99.0.0/16`; one `/24` per network.
const SUBNET_PREFIX: [u8; 2] = [10, 99];
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
    /// The namespace's name (`ip netns exec <ns> ...`); `None` for the machine's own namespace
    /// ([`Network::create_with_machine`]).
    pub ns: Option<String>,
    pub addr: Ipv4Addr,
}

impl Host {
    /// `program` run inside this host's namespace (through `ip netns exec`, which enters the
    /// namespace and then execs `program`: the child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// Runs `f` on a thread that entered this host's namespace: sockets it opens belong to the
    /// host (a network namespace is entered per thread).
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let Some(ns) = self.ns.clone() else {
            return std::thread::spawn(f)
                .join()
                .map_err(|_| HarnessError::Invalid("a thread on the machine panicked".into()));
        };
        let ns2 = ns.clone();
        std::thread::spawn(move || -> Result<T> {
            enter(&ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| HarnessError::Invalid(format!("a thread in namespace {ns2} panicked")))?
    }
}

/// Moves the calling thread into network namespace `ns` (one of `ip netns`): the sockets it
/// opens from then on belong to it.
pub(crate) fn enter(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
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
    Ok(())
}

/// A set of hosts on one bridge. Dropping it deletes every namespace it made and the fault
/// rules it left in the machine's namespace.
#[derive(Debug)]
pub struct Network {
    /// `myha<pid>n<k>`: the namespaces' prefix and the fault rules' tag.
    base: String,
    switch: String,
    hosts: Vec<Host>,
    /// The machine's end of its veth, when attached.
    machine_link: Option<String>,
    /// The delayed hosts' delayers, by host name.
    delayers: Mutex<HashMap<String, Delayer>>,
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

/// The pid a namespace name or rule tag of ours carries (`myha<pid>n<k>...`).
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

/// The comment of an `iptables -S` rule line (printed quoted: `--comment "myha1n0:a"`), and the
/// rule's words after `-A` for a `-D`.
fn rule_comment(rule: &str) -> Option<(String, Vec<String>)> {
    let words: Vec<String> = rule
        .split_whitespace()
        .map(|w| w.trim_matches('"').to_string())
        .collect();
    if words.first().map(String::as_str) != Some("-A") {
        return None;
    }
    let comment = words
        .windows(2)
        .find(|w| w[0] == "--comment")
        .map(|w| w[1].clone())?;
    Some((comment, words[1..].to_vec()))
}

/// Runs `iptables -w args` in `ns` (`None`: the machine's own namespace).
fn iptables_in(ns: Option<&str>, args: &[&str]) -> Result<String> {
    match ns {
        Some(ns) => {
            let mut full = vec!["netns", "exec", ns, "iptables", "-w"];
            full.extend_from_slice(args);
            run("ip", &full)
        }
        None => {
            let mut full = vec!["-w"];
            full.extend_from_slice(args);
            run("iptables", &full)
        }
    }
}

/// Deletes the INPUT and OUTPUT rules in `ns` whose comment satisfies `pred`.
fn delete_rules(ns: Option<&str>, pred: impl Fn(&str) -> bool) -> Result<()> {
    let mut rules = iptables_in(ns, &["-S", "INPUT"])?;
    rules.push_str(&iptables_in(ns, &["-S", "OUTPUT"])?);
    for rule in rules.lines() {
        let Some((comment, words)) = rule_comment(rule) else {
            continue;
        };
        if pred(&comment) {
            let mut args = vec!["-D"];
            args.extend(words.iter().map(String::as_str));
            iptables_in(ns, &args)?;
        }
    }
    Ok(())
}

/// Deletes the namespaces of harness processes that are gone (a killed run), and the fault rules
/// such runs left in the machine's namespace (their veths went with their namespaces). Returns
/// how many namespaces.
pub fn remove_stale() -> Result<usize> {
    let mut removed = 0;
    for ns in our_namespaces()? {
        if owner_pid(&ns).is_some_and(|p| !pid_alive(p)) && ip(&["netns", "del", &ns]).is_ok() {
            removed += 1;
        }
    }
    delete_rules(None, |c| owner_pid(c).is_some_and(|p| !pid_alive(p)))?;
    Ok(removed)
}

/// What a network's namespaces and machine link are called.
struct Names {
    /// Prefix of its namespaces, tag of its rules.
    base: String,
    /// The machine's end of its veth (at most 15 bytes).
    machine_link: String,
}

impl Names {
    /// This process's next network: `myha<pid>n<k>`, machine link `my<pid>n<k>`.
    fn next() -> Names {
        let k = NETWORKS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        Names {
            base: format!("{PREFIX}{pid}n{k}"),
            machine_link: format!("my{pid}n{k}"),
        }
    }
}

fn kept_names(name: &str) -> Names {
    Names {
        base: format!("{PREFIX}-{name}"),
        machine_link: format!("mh-{name}"),
    }
}

/// Removes a network left by [`Network::detach`] (named by what it returned): its namespaces,
/// the machine's link and the rules tagged with it on the machine. Nothing left is not an
/// error.
pub fn remove_kept(base: &str) -> Result<()> {
    let name = base
        .strip_prefix(&format!("{PREFIX}-"))
        .ok_or_else(|| HarnessError::Invalid(format!("{base:?} is not a kept network's name")))?;
    let names = kept_names(name);
    let ours = format!("{}:", names.base);
    delete_rules(None, |c| c.starts_with(&ours))?;
    let _ = ip(&["link", "del", &names.machine_link]);
    let prefix = format!("{}-", names.base);
    for ns in ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
    {
        let _ = ip(&["netns", "del", ns]);
    }
    Ok(())
}

/// Serialises the choice of a subnet between processes: held while one is picked and its
/// machine-side address added.
struct SubnetLock {
    _file: std::fs::File,
}

impl SubnetLock {
    fn take() -> Result<SubnetLock> {
        let path = "/run/lock/myha-netns.lock";
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| HarnessError::Io {
                what: format!("open {path}"),
                source,
            })?;
        // SAFETY: flock on an fd we own; released when the file closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(HarnessError::Io {
                what: format!("lock {path}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(SubnetLock { _file: f })
    }
}

/// The lowest `n >= 1` such that the machine has no address in `10.99.n.0/24`.
fn free_subnet() -> Result<u8> {
    let addrs = ip(&["-4", "-o", "addr", "show"])?;
    (1..=254u8)
        .find(|n| {
            let p = format!("{}.{}.{n}.", SUBNET_PREFIX[0], SUBNET_PREFIX[1]);
            !addrs.contains(&format!(" {p}"))
        })
        .ok_or_else(|| HarnessError::Invalid("no free 10.99.n.0/24 subnet left".into()))
}

fn check_names(hosts: &[&str]) -> Result<()> {
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
    Ok(())
}

impl Network {
    /// Makes one namespace per name in `hosts`, each with an address in `10.99.0.0/24` on a
    /// bridge of its own; the machine's namespace gets nothing.
    pub fn create(hosts: &[&str]) -> Result<Network> {
        Network::build(Names::next(), hosts, None)
    }

    /// As [`Network::create`], plus the machine's own namespace attached as host `machine`
    /// (address `.1`), on a subnet no other live network of this machine uses.
    pub fn create_with_machine(hosts: &[&str], machine: &str) -> Result<Network> {
        Network::build(Names::next(), hosts, Some(machine))
    }

    /// As [`Network::create_with_machine`], for a network meant to outlive this process (the
    /// sandbox): named `myha-<name>-...` (no pid, so never taken for a killed run's), left in
    /// place by [`Network::detach`] and removed by [`remove_kept`]. `name`: 1-10 of
    /// `[a-z0-9]`.
    pub fn create_kept(name: &str, hosts: &[&str], machine: &str) -> Result<Network> {
        if name.is_empty()
            || name.len() > 10
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(HarnessError::Invalid(format!(
                "kept network name {name:?}: 1-10 of [a-z0-9]"
            )));
        }
        Network::build(kept_names(name), hosts, Some(machine))
    }

    /// Leaves the namespaces, the machine's link and the fault rules in place (the delays
    /// stop: their threads are this process's) and returns the network's name for
    /// [`remove_kept`].
    pub fn detach(self) -> String {
        self.delayers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let base = self.base.clone();
        std::mem::forget(self);
        base
    }

    fn build(names: Names, hosts: &[&str], machine: Option<&str>) -> Result<Network> {
        let mut all: Vec<&str> = hosts.to_vec();
        all.extend(machine);
        check_names(&all)?;
        remove_stale()?;
        let Names { base, machine_link } = names;
        let switch = format!("{base}-sw");
        // From here on, Drop deletes whatever was made, also when a later step fails.
        let mut net = Network {
            base: base.clone(),
            switch: switch.clone(),
            hosts: Vec::new(),
            machine_link: None,
            delayers: Mutex::new(HashMap::new()),
        };
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        let mut lock = None;
        let subnet = match machine {
            None => 0,
            Some(_) => {
                lock = Some(SubnetLock::take()?);
                free_subnet()?
            }
        };
        let addr_of =
            |i: u8| Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], subnet, FIRST_HOST + i);
        if let Some(name) = machine {
            // The machine's end lives in its own namespace (at most 15 bytes: `my<pid>n<k>`)
            // and goes when its peer in the switch namespace is deleted.
            let link = machine_link;
            let addr = Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], subnet, 1);
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "machine", "netns", &switch,
            ])?;
            net.machine_link = Some(link.clone());
            ip(&[
                "-n", &switch, "link", "set", "machine", "master", "br0", "up",
            ])?;
            ip(&["addr", "add", &format!("{addr}/24"), "dev", &link])?;
            ip(&["link", "set", &link, "up"])?;
            net.hosts.push(Host {
                name: name.to_string(),
                ns: None,
                addr,
            });
        }
        drop(lock);
        for (i, name) in hosts.iter().enumerate() {
            let ns = format!("{base}-{name}");
            let addr = addr_of(i as u8);
            ip(&["netns", "add", &ns])?;
            net.hosts.push(Host {
                name: name.to_string(),
                ns: Some(ns.clone()),
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

    /// The host that has `addr`.
    pub fn host_at(&self, addr: Ipv4Addr) -> Option<&Host> {
        self.hosts.iter().find(|h| h.addr == addr)
    }

    fn tag(&self, about: &str) -> String {
        format!("{}:{about}", self.base)
    }

    /// Inserts `-I INPUT 1 <matches> -j DROP` on `at`, tagged with the host the fault is about:
    /// at the chain's head, before any delay's queue rule (a queued packet, once released,
    /// would skip it).
    fn drop_rule(&self, at: &Host, matches: &[&str], about: &str) -> Result<()> {
        let tag = self.tag(about);
        let mut args = vec!["-I", "INPUT", "1"];
        args.extend_from_slice(matches);
        args.extend(["-m", "comment", "--comment", tag.as_str(), "-j", "DROP"]);
        iptables_in(at.ns.as_deref(), &args).map(drop)
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
        let subnet = format!("{}/24", Ipv4Addr::from(u32::from(h.addr) & 0xffff_ff00));
        // Only this network's packets: on the machine's namespace nothing else is touched.
        let m = [
            "-s",
            &subnet,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &p,
        ];
        self.drop_rule(h, &m, host)
    }

    /// Delays every packet `host` sends to or receives from the other hosts by `one_way` plus
    /// a uniform random share of `jitter` (so a round trip to an undelayed host takes twice
    /// that; between two hosts delayed alike, four times). Replaces an earlier delay of the
    /// host; [`Network::heal`] removes it with the host's other faults.
    pub fn delay(&self, host: &str, one_way: Duration, jitter: Duration) -> Result<()> {
        let index = self
            .hosts
            .iter()
            .position(|h| h.name == host)
            .ok_or_else(|| HarnessError::Invalid(format!("no host {host:?} in this network")))?;
        let h = &self.hosts[index];
        self.undelay(host)?;
        // Queue numbers are per namespace; on the machine's, keep clear of anyone else's.
        let queue = match h.ns {
            Some(_) => 1,
            None => 40_000 + (std::process::id() % 20_000) as u16,
        };
        let delayer = Delayer::start(h.ns.as_deref(), queue, one_way, jitter)?;
        let tag = self.tag(&format!("{host}:delay"));
        let subnet = format!("{}/24", Ipv4Addr::from(u32::from(h.addr) & 0xffff_ff00));
        let q = queue.to_string();
        for (chain, iface, dir) in [("INPUT", "-i", "-s"), ("OUTPUT", "-o", "-d")] {
            let args = [
                "-A",
                chain,
                "!",
                iface,
                "lo",
                dir,
                &subnet,
                "-m",
                "comment",
                "--comment",
                &tag,
                "-j",
                "NFQUEUE",
                "--queue-num",
                &q,
                "--queue-bypass",
            ];
            iptables_in(h.ns.as_deref(), &args)?;
        }
        self.delayers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), delayer);
        Ok(())
    }

    /// Limits what `host` receives over TCP from source ports `ports` (of any host) to `kbit`
    /// kbit/s, queueing the excess (HTB on the bridge's port towards the host): a slow or
    /// congested link for those streams (replication from a primary, say) while everything
    /// else to the host goes at full speed. Replaces an earlier limit; [`Network::heal`]
    /// removes it.
    pub fn throttle(&self, host: &str, ports: &[u16], kbit: u32) -> Result<()> {
        let index = self.port_index(host)?;
        let dev = format!("h{index}");
        self.unthrottle(host)?;
        let tc = |args: &[&str]| -> Result<String> {
            let mut full = vec!["netns", "exec", self.switch.as_str(), "tc"];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        let rate = format!("{kbit}kbit");
        tc(&[
            "qdisc", "add", "dev", &dev, "root", "handle", "1:", "htb", "default", "10",
        ])?;
        tc(&[
            "class", "add", "dev", &dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit",
        ])?;
        tc(&[
            "class", "add", "dev", &dev, "parent", "1:", "classid", "1:20", "htb", "rate", &rate,
            "ceil", &rate,
        ])?;
        // A deep queue: the excess waits (a slow link), it is not dropped (a lossy one).
        tc(&[
            "qdisc", "add", "dev", &dev, "parent", "1:20", "handle", "20:", "pfifo", "limit",
            "100000",
        ])?;
        for p in ports {
            let p = p.to_string();
            tc(&[
                "filter", "add", "dev", &dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "protocol", "6", "0xff", "match", "ip", "sport", &p, "0xffff",
                "flowid", "1:20",
            ])?;
        }
        Ok(())
    }

    /// Removes `host`'s rate limit, if any.
    fn unthrottle(&self, host: &str) -> Result<()> {
        let Ok(index) = self.port_index(host) else {
            return Ok(());
        };
        let dev = format!("h{index}");
        // "No such file or directory" when there is none: nothing to remove.
        let _ = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.switch,
                "tc",
                "qdisc",
                "del",
                "dev",
                &dev,
                "root",
            ],
        );
        Ok(())
    }

    /// The index of `host`'s port on the bridge (`h<i>`); the machine has none of that name.
    fn port_index(&self, host: &str) -> Result<usize> {
        self.hosts
            .iter()
            .filter(|h| h.ns.is_some())
            .position(|h| h.name == host)
            .ok_or_else(|| {
                HarnessError::Invalid(format!("no namespace host {host:?} in this network"))
            })
    }

    /// Removes `host`'s delay (its queue rules first: a packet queued with nobody to release
    /// it would be accepted anyway, `--queue-bypass`, but late).
    fn undelay(&self, host: &str) -> Result<()> {
        let h = self.host(host)?;
        let tag = self.tag(&format!("{host}:delay"));
        delete_rules(h.ns.as_deref(), |c| c == tag)?;
        self.delayers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host);
        Ok(())
    }

    /// Removes every fault about `host` (its cuts, on whichever host they were placed, its
    /// loss and its delay).
    pub fn heal(&self, host: &str) -> Result<()> {
        self.host(host)?;
        let tag = self.tag(host);
        for h in &self.hosts {
            delete_rules(h.ns.as_deref(), |c| c == tag)?;
        }
        self.unthrottle(host)?;
        self.undelay(host)
    }

    /// Removes every fault of every host (only this network's rules).
    pub fn heal_all(&self) -> Result<()> {
        let ours = format!("{}:", self.base);
        for h in &self.hosts {
            delete_rules(h.ns.as_deref(), |c| c.starts_with(&ours))?;
            if h.ns.is_some() {
                self.unthrottle(&h.name)?;
            }
        }
        self.delayers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let ours = format!("{}:", self.base);
        for h in &self.hosts {
            match &h.ns {
                Some(ns) => {
                    let _ = ip(&["netns", "del", ns]);
                }
                None => {
                    let _ = delete_rules(None, |c| c.starts_with(&ours));
                }
            }
        }
        // Deleted here, not left to the switch's namespace going away: that happens later, in
        // the kernel's own time, and the address would linger on the machine until then.
        if let Some(link) = &self.machine_link {
            let _ = ip(&["link", "del", link]);
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
        assert_eq!(owner_pid("myha77n3:primary"), Some(77));
    }

    #[test]
    fn rule_comments_are_read_from_iptables_listings() {
        let (c, words) =
            rule_comment("-A INPUT -s 10.99.1.12/32 -m comment --comment \"myha9n0:p\" -j DROP")
                .expect("a tagged rule");
        assert_eq!(c, "myha9n0:p");
        assert_eq!(words[0], "INPUT");
        assert_eq!(words.last().map(String::as_str), Some("DROP"));
        assert!(rule_comment("-P INPUT ACCEPT").is_none());
        assert!(rule_comment("-A INPUT -s 10.0.0.1/32 -j DROP").is_none());
    }
}
