use super::*;

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn at_ms(m: u64) -> SimTime {
    SimTime::from_millis(m)
}

fn jittery() -> LinkConfig {
    LinkConfig {
        delay: ms(1),
        jitter: ms(20),
        loss: 0.0,
    }
}

/// Delivers everything due by `now`.
fn deliver_all(net: &mut Network<u64>, now: SimTime) -> Vec<(NodeId, NodeId, u64)> {
    let mut out = Vec::new();
    while let Some(d) = net.poll_deliver(now) {
        out.push(d);
    }
    out
}

/// Runs the network until nothing is in flight, recording (delivery time, from, to, message).
fn run_to_end(net: &mut Network<u64>) -> Vec<(SimTime, NodeId, NodeId, u64)> {
    let mut trace = Vec::new();
    while let Some(t) = net.poll_timeout() {
        for (from, to, m) in deliver_all(net, t) {
            trace.push((t, from, to, m));
        }
    }
    trace
}

/// A fixed schedule: three parties sending to each other every millisecond, with a lossy link.
fn scheduled_trace(seed: u64) -> Vec<(SimTime, NodeId, NodeId, u64)> {
    let mut net = Network::new(
        seed,
        LinkConfig {
            loss: 0.1,
            ..jittery()
        },
    )
    .unwrap();
    let mut trace = Vec::new();
    let mut msg = 0;
    for step in 0..200 {
        let now = at_ms(step);
        for (from, to, m) in deliver_all(&mut net, now) {
            trace.push((now, from, to, m));
        }
        for (from, to) in [(1, 2), (2, 3), (3, 1), (1, 3)] {
            net.send(from, to, msg, now);
            msg += 1;
        }
    }
    trace.extend(run_to_end(&mut net));
    trace
}

#[test]
fn same_seed_same_trace_different_seed_differs() {
    let a = scheduled_trace(7);
    let b = scheduled_trace(7);
    assert!(!a.is_empty());
    assert_eq!(a, b);
    let c = scheduled_trace(8);
    assert_ne!(a, c);
}

#[test]
fn fifo_per_link_under_jitter_and_delivery_in_time_order() {
    let mut net = Network::new(42, jittery()).unwrap();
    // Two links sending interleaved, many messages per millisecond.
    for i in 0..1000u64 {
        let now = SimTime::from_micros(i * 100);
        net.send(1, 2, i, now);
        net.send(3, 2, i, now);
    }
    let trace = run_to_end(&mut net);
    assert_eq!(trace.len(), 2000);
    for link_from in [1, 3] {
        let seq: Vec<u64> = trace
            .iter()
            .filter(|(_, f, _, _)| *f == link_from)
            .map(|(_, _, _, m)| *m)
            .collect();
        assert_eq!(seq, (0..1000).collect::<Vec<_>>(), "link from {link_from}");
    }
    // Delivery times never go back.
    assert!(trace.windows(2).all(|w| w[0].0 <= w[1].0));
    // The two links did interleave differently from the send order (jitter is real).
    let from_1_first: Vec<bool> = trace.iter().map(|(_, f, _, _)| *f == 1).collect();
    let alternating: Vec<bool> = (0..2000).map(|i| i % 2 == 0).collect();
    assert_ne!(from_1_first, alternating);
}

#[test]
fn delivery_waits_for_its_time_and_ties_keep_send_order() {
    let mut net = Network::new(1, LinkConfig::INSTANT).unwrap();
    net.set_link(
        1,
        2,
        LinkConfig {
            delay: ms(10),
            ..LinkConfig::INSTANT
        },
    )
    .unwrap();
    assert_eq!(
        net.send(1, 2, 1, at_ms(0)),
        SendOutcome::Scheduled(at_ms(10))
    );
    assert_eq!(
        net.send(3, 2, 2, at_ms(10)),
        SendOutcome::Scheduled(at_ms(10))
    );
    assert_eq!(
        net.send(4, 2, 3, at_ms(10)),
        SendOutcome::Scheduled(at_ms(10))
    );
    assert_eq!(net.poll_timeout(), Some(at_ms(10)));
    assert_eq!(net.poll_deliver(at_ms(9)), None);
    let got: Vec<u64> = deliver_all(&mut net, at_ms(10))
        .into_iter()
        .map(|d| d.2)
        .collect();
    assert_eq!(got, vec![1, 2, 3]);
    assert_eq!(net.poll_timeout(), None);
}

#[test]
fn one_way_partition_cuts_one_direction_and_drops_in_flight() {
    let mut net = Network::new(
        3,
        LinkConfig {
            delay: ms(5),
            ..LinkConfig::INSTANT
        },
    )
    .unwrap();
    net.send(1, 2, 10, at_ms(0));
    net.send(2, 1, 20, at_ms(0));
    net.partition_one_way(1, 2);
    assert!(!net.is_connected(1, 2));
    assert!(net.is_connected(2, 1));
    assert_eq!(net.send(1, 2, 11, at_ms(1)), SendOutcome::Cut);
    assert!(matches!(
        net.send(2, 1, 21, at_ms(1)),
        SendOutcome::Scheduled(_)
    ));
    let got = run_to_end(&mut net);
    // 10 was in flight on the cut link: lost with it. 2 → 1 is untouched.
    assert_eq!(
        got.iter().map(|d| (d.1, d.2, d.3)).collect::<Vec<_>>(),
        vec![(2, 1, 20), (2, 1, 21)]
    );
    assert_eq!(net.stats().cut, 2);
}

#[test]
fn heal_restores_links_but_not_lost_messages() {
    let mut net = Network::new(
        3,
        LinkConfig {
            delay: ms(5),
            ..LinkConfig::INSTANT
        },
    )
    .unwrap();
    net.send(1, 2, 1, at_ms(0));
    net.partition(1, 2);
    assert_eq!(net.send(2, 1, 2, at_ms(1)), SendOutcome::Cut);
    net.heal(1, 2);
    assert!(net.is_connected(1, 2) && net.is_connected(2, 1));
    net.send(1, 2, 3, at_ms(2));
    let got: Vec<u64> = run_to_end(&mut net).into_iter().map(|d| d.3).collect();
    assert_eq!(got, vec![3]);

    // Isolation cuts every link of a party until it rejoins; heal_all ends everything.
    net.isolate(2);
    assert_eq!(net.send(3, 2, 4, at_ms(3)), SendOutcome::Cut);
    assert_eq!(net.send(2, 3, 5, at_ms(3)), SendOutcome::Cut);
    assert!(net.is_connected(1, 3));
    net.heal(2, 3);
    assert!(!net.is_connected(2, 3), "heal does not end an isolation");
    net.rejoin(2);
    assert!(net.is_connected(2, 3));
    net.isolate(2);
    net.partition_one_way(1, 3);
    net.set_link(
        1,
        3,
        LinkConfig {
            loss: 1.0,
            ..LinkConfig::INSTANT
        },
    )
    .unwrap();
    net.heal_all();
    assert!(net.is_connected(2, 3) && net.is_connected(1, 3));
    assert_eq!(
        net.link(1, 3),
        LinkConfig {
            delay: ms(5),
            ..LinkConfig::INSTANT
        }
    );
}

#[test]
fn loss_rate_is_roughly_as_configured() {
    let mut net = Network::new(99, LinkConfig::INSTANT).unwrap();
    net.set_link(
        1,
        2,
        LinkConfig {
            loss: 0.3,
            ..LinkConfig::INSTANT
        },
    )
    .unwrap();
    let n = 10_000u64;
    let mut lost = 0u64;
    for i in 0..n {
        if net.send(1, 2, i, at_ms(i)) == SendOutcome::Lost {
            lost += 1;
        }
        // The other direction keeps the default: no loss.
        assert!(matches!(
            net.send(2, 1, i, at_ms(i)),
            SendOutcome::Scheduled(_)
        ));
    }
    assert!((2_500..=3_500).contains(&lost), "lost {lost} of {n}");
    assert_eq!(net.stats().lost, lost);
    assert_eq!(usize::try_from(2 * n - lost).unwrap(), net.in_flight());
}

#[test]
fn invalid_loss_is_refused() {
    let bad = LinkConfig {
        loss: 1.5,
        ..LinkConfig::INSTANT
    };
    assert!(matches!(
        Network::<u64>::new(0, bad),
        Err(NetError::InvalidLoss(_))
    ));
    let mut net = Network::<u64>::new(0, LinkConfig::LAN).unwrap();
    assert_eq!(net.set_link(1, 2, bad), Err(NetError::InvalidLoss(1.5)));
    assert_eq!(net.link(1, 2), LinkConfig::LAN);
}
