//! Hosts in network namespaces (launcher::netns) on the real kernel: addresses reachable between
//! the hosts and nowhere else, silent cuts (both ways and one way), random loss, healing, and
//! cleanup on drop and of a killed run's namespaces. Needs root (as CI runs).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use launcher::netns::{remove_stale, Direction, Host, Network};

fn namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace host's namespace name.
fn ns_of(h: &Host) -> String {
    h.ns.clone().expect("a host in a namespace of its own")
}

/// Runs `f` with the host's address on a thread inside the host's namespace.
fn on_host<T, F>(net: &Network, host: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Ipv4Addr) -> T + Send + 'static,
{
    let h = net.host(host).expect("host");
    let addr = h.addr;
    h.run_in(move || f(addr)).expect("thread in the namespace")
}

/// Connects from `net`'s host `from` to `to` within `t`: Ok, or the error's kind.
fn connect(
    net: &Network,
    from: &str,
    to: SocketAddr,
    t: Duration,
) -> Result<(), std::io::ErrorKind> {
    on_host(net, from, move |_| {
        TcpStream::connect_timeout(&to, t)
            .map(drop)
            .map_err(|e| e.kind())
    })
}

fn listen(net: &Network, on: &str) -> (TcpListener, SocketAddr) {
    let l = on_host(net, on, |addr| TcpListener::bind((addr, 0)).expect("bind"));
    let a = l.local_addr().expect("addr");
    // Accept (and drop) whatever connects, for the test's duration.
    let l2 = l.try_clone().expect("clone listener");
    std::thread::spawn(move || for _ in l2.incoming() {});
    (l, a)
}

/// A UDP socket bound on `host`.
fn udp(net: &Network, host: &str) -> UdpSocket {
    let s = on_host(net, host, |addr| {
        UdpSocket::bind((addr, 0)).expect("bind udp")
    });
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    s
}

/// Datagrams `from` sends to `to` that arrive (of `n`).
fn delivered(from: &UdpSocket, to: &UdpSocket, n: usize) -> usize {
    let dst = to.local_addr().expect("addr");
    for i in 0..n {
        from.send_to(&(i as u32).to_be_bytes(), dst).expect("send");
    }
    let mut got = 0;
    let mut buf = [0u8; 16];
    while to.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    got
}

const T: Duration = Duration::from_millis(500);

#[test]
fn hosts_reach_each_other_only_inside_their_network_and_cuts_are_silent_and_heal() {
    let net = Network::create(&["primary", "replica", "client"]).expect("network");
    let names = namespaces();
    for h in net.hosts() {
        assert!(names.contains(&ns_of(h)), "{h:?} missing from: {names}");
    }
    let (_l, primary) = listen(&net, "primary");
    assert_eq!(connect(&net, "replica", primary, T), Ok(()));
    assert_eq!(connect(&net, "client", primary, T), Ok(()));
    // The range exists only inside the network: the machine's own namespace has no address or
    // route in it (never connect there from outside: that would go to the default route), and
    // a host has no route anywhere else.
    let own = Command::new("ip")
        .args(["-4", "route"])
        .output()
        .expect("ip route");
    let own = String::from_utf8_lossy(&own.stdout).into_owned()
        + &String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-4", "addr"])
                .output()
                .expect("ip addr")
                .stdout,
        );
    assert!(
        !own.contains("10.99.0."),
        "the host range leaked into the machine's namespace: {own}"
    );
    let routes = net
        .host("client")
        .expect("host")
        .command("ip")
        .args(["-4", "route"])
        .output()
        .expect("ip route in the host");
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(
        !routes.contains("default"),
        "a host has a default route: {routes}"
    );

    // A cut drops silently: the connection attempt times out (no reset, no ICMP).
    net.cut("primary", &["replica"], Direction::Both)
        .expect("cut");
    assert_eq!(
        connect(&net, "replica", primary, T),
        Err(std::io::ErrorKind::TimedOut)
    );
    assert_eq!(
        connect(&net, "client", primary, T),
        Ok(()),
        "only replica is cut"
    );
    net.heal("primary").expect("heal");
    assert_eq!(connect(&net, "replica", primary, T), Ok(()));

    // Isolated from everyone.
    net.isolate("primary", Direction::Both).expect("isolate");
    for from in ["replica", "client"] {
        assert_eq!(
            connect(&net, from, primary, T),
            Err(std::io::ErrorKind::TimedOut),
            "{from}"
        );
    }
    net.heal_all().expect("heal all");
    assert_eq!(connect(&net, "client", primary, T), Ok(()));
    let gone: Vec<String> = net.hosts().iter().map(ns_of).collect();
    drop(net);
    let names = namespaces();
    for ns in gone {
        assert!(!names.contains(&ns), "{ns} left behind: {names}");
    }
}

#[test]
fn one_way_cuts_drop_one_direction_and_loss_drops_a_share() {
    let net = Network::create(&["a", "b"]).expect("network");
    let a = udp(&net, "a");
    let b = udp(&net, "b");
    assert_eq!(delivered(&a, &b, 20), 20);
    assert_eq!(delivered(&b, &a, 20), 20);
    // b receives nothing from a; what b sends still arrives.
    net.cut("b", &["a"], Direction::Inbound)
        .expect("cut inbound");
    assert_eq!(delivered(&a, &b, 20), 0, "a -> b crossed an inbound cut");
    assert_eq!(delivered(&b, &a, 20), 20, "b -> a was cut too");
    net.heal("b").expect("heal");
    // Nothing a sends reaches b; a still receives.
    net.cut("a", &["b"], Direction::Outbound)
        .expect("cut outbound");
    assert_eq!(delivered(&a, &b, 20), 0, "a -> b crossed an outbound cut");
    assert_eq!(delivered(&b, &a, 20), 20, "b -> a was cut too");
    net.heal("a").expect("heal");
    // Half of what b receives is dropped (400 datagrams: the share is far from 0 and 400).
    net.lossy("b", 0.5).expect("lossy");
    let got = delivered(&a, &b, 400);
    println!("with 50 % loss: {got} of 400 delivered");
    assert!((100..=300).contains(&got), "{got} of 400 delivered");
    assert!(net.lossy("b", 1.5).is_err());
}

#[test]
fn a_killed_runs_namespaces_are_removed() {
    // A pid above pid_max (4194304 at most on Linux) is never alive.
    let stale = "myha4194999n0-x";
    let _ = Command::new("ip").args(["netns", "del", stale]).status();
    let st = Command::new("ip")
        .args(["netns", "add", stale])
        .status()
        .expect("ip netns add");
    assert!(st.success());
    assert!(namespaces().contains(stale));
    let removed = remove_stale().expect("remove stale");
    assert!(removed >= 1);
    assert!(!namespaces().contains(stale), "{}", namespaces());
    // Our own live networks are kept.
    let net = Network::create(&["x"]).expect("network");
    remove_stale().expect("remove stale");
    assert!(namespaces().contains(&ns_of(net.host("x").expect("host"))));
}

#[test]
fn a_failing_test_leaves_no_namespace_behind() {
    let made = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = Network::create(&["p", "q"]).expect("network");
        made.lock()
            .expect("lock")
            .extend(net.hosts().iter().map(ns_of));
        panic!("a test assertion fails while the network is up");
    }));
    assert!(r.is_err());
    let made = made.into_inner().expect("lock");
    assert_eq!(made.len(), 2);
    let names = namespaces();
    for ns in made {
        assert!(!names.contains(&ns), "{ns} left behind: {names}");
    }
}

/// The machine's INPUT rules as `iptables -S` prints them.
fn machine_rules() -> String {
    let out = Command::new("iptables")
        .args(["-w", "-S", "INPUT"])
        .output()
        .expect("iptables -S");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_machine_joins_as_a_host_on_a_subnet_of_its_own_and_is_cut_and_healed_like_the_others() {
    let net = Network::create_with_machine(&["db", "other"], "client").expect("network");
    let client = net.host("client").expect("client host").clone();
    assert_eq!(client.ns, None, "the machine's own namespace");
    let db = net.host("db").expect("db host").addr;
    assert_eq!(client.addr.octets()[3], 1);
    assert_ne!(
        client.addr.octets()[2],
        0,
        "10.99.0.0/24 is for networks without the machine"
    );
    assert_eq!(client.addr.octets()[..3], db.octets()[..3], "one subnet");
    // A second such network (another test, another run) gets another subnet.
    let net2 = Network::create_with_machine(&["z"], "client").expect("second network");
    let z = net2.host("z").expect("z").addr;
    assert_ne!(z.octets()[2], db.octets()[2]);
    drop(net2);

    // This process, on the machine, reaches a host by its address, and back.
    let (_l, at_db) = listen(&net, "db");
    TcpStream::connect_timeout(&at_db, T).expect("machine -> db");
    let (_l2, at_client) = listen(&net, "client");
    assert_eq!(connect(&net, "db", at_client, T), Ok(()));

    // Cut the machine from db: both ends silent; the rules on the machine name this network.
    net.cut("client", &["db"], Direction::Both).expect("cut");
    assert_eq!(
        TcpStream::connect_timeout(&at_db, T)
            .map_err(|e| e.kind())
            .map(drop),
        Err(std::io::ErrorKind::TimedOut)
    );
    assert_eq!(
        connect(&net, "db", at_client, T),
        Err(std::io::ErrorKind::TimedOut)
    );
    assert_eq!(
        connect(&net, "other", at_client, T),
        Ok(()),
        "only db is cut"
    );
    let rules = machine_rules();
    assert!(rules.contains(&format!("-s {db}/32")), "{rules}");
    net.heal_all().expect("heal all");
    TcpStream::connect_timeout(&at_db, T).expect("healed");
    assert!(
        !machine_rules().contains(&format!("-s {db}/32")),
        "{}",
        machine_rules()
    );

    // Dropped: no rule, address or route of it is left on the machine.
    net.isolate("client", Direction::Inbound).expect("isolate");
    let prefix = format!("{}.{}.{}.", db.octets()[0], db.octets()[1], db.octets()[2]);
    drop(net);
    let rules = machine_rules();
    assert!(!rules.contains(&prefix), "rules left behind: {rules}");
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .expect("ip addr");
    let addrs = String::from_utf8_lossy(&addrs.stdout).into_owned();
    assert!(!addrs.contains(&prefix), "address left behind: {addrs}");
}

/// The median round trip of `n` UDP echoes from `from` to an echo server on `to`.
fn median_rtt(net: &Network, from: &str, to: &str, n: usize) -> Duration {
    let server = udp(net, to);
    let dst = server.local_addr().expect("addr");
    let echo = server.try_clone().expect("clone");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((len, peer)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..len], peer);
            }
        }
    });
    let client = udp(net, from);
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..n {
        let sent = std::time::Instant::now();
        client
            .send_to(&(i as u32).to_be_bytes(), dst)
            .expect("send");
        if client.recv_from(&mut buf).is_ok() {
            rtts.push(sent.elapsed());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = t.join();
    assert!(
        rtts.len() * 10 >= n * 9,
        "{} of {n} echoes came back",
        rtts.len()
    );
    rtts.sort();
    rtts[rtts.len() / 2]
}

#[test]
fn a_delayed_host_waits_its_delay_each_way_and_heals() {
    let net = Network::create_with_machine(&["a", "b", "c"], "client").expect("network");
    let base = median_rtt(&net, "a", "b", 50);
    net.delay("a", Duration::from_millis(2), Duration::ZERO)
        .expect("delay a");
    let delayed = median_rtt(&net, "a", "b", 50);
    // b and c are not delayed: only the link of a counts, once each way.
    let other = median_rtt(&net, "c", "b", 50);
    // The machine's own namespace can be delayed too.
    net.delay("client", Duration::from_millis(1), Duration::from_millis(1))
        .expect("delay the machine");
    let machine = median_rtt(&net, "client", "b", 50);
    // A cut still drops a delayed host's packets (drops come before the queue).
    net.cut("a", &["b"], Direction::Both).expect("cut");
    let s = udp(&net, "b");
    let a = udp(&net, "a");
    assert_eq!(
        delivered(&a, &s, 10),
        0,
        "a cut delayed host still delivered"
    );
    net.heal_all().expect("heal all");
    let healed = median_rtt(&net, "a", "b", 50);
    println!(
        "median UDP round trip a-b: {base:?} before, {delayed:?} with 2 ms on a's link, \
         {healed:?} healed; c-b meanwhile {other:?}; machine-b with 1 ms + 0-1 ms jitter: {machine:?}"
    );
    assert!(
        delayed >= Duration::from_micros(3800) && delayed < Duration::from_millis(40),
        "{delayed:?}"
    );
    assert!(other < Duration::from_millis(2), "{other:?}");
    assert!(
        machine >= Duration::from_micros(1900) && machine < Duration::from_millis(40),
        "{machine:?}"
    );
    assert!(healed < Duration::from_millis(2), "{healed:?}");
    // Nothing of it is left on the machine (queue rules sit in INPUT and OUTPUT).
    drop(net);
    let all = Command::new("iptables")
        .args(["-w", "-S"])
        .output()
        .expect("iptables -S");
    let all = String::from_utf8_lossy(&all.stdout).into_owned();
    assert!(!all.contains("NFQUEUE"), "{all}");
}
