//! A model of the network between the simulated parties: messages in flight with a delivery
//! time on the virtual clock, per-link delay, jitter and loss, and partitions.
//!
//! # Shape (sans-IO)
//!
//! [`Network::send`] schedules a message at `now`; [`Network::poll_timeout`] says when the next
//! one is due and [`Network::poll_deliver`] hands out every message due by `now`, earliest
//! first. The network never reads a clock and never calls a party: the driver takes each
//! delivered message to its recipient.
//!
//! # Randomness
//!
//! One seeded [`StdRng`] decides, per message and in send order, whether it is lost (per-link
//! probability) and its jitter (uniform in `0..=jitter`, in microseconds), and nothing else.
//! So a run is a pure function of the seed and the schedule of calls.
//!
//! # Modelling choices
//!
//! - **FIFO per link.** A link behaves like one TCP connection: messages from `a` to `b` are
//!   delivered in the order they were sent, whatever the jitter (a message is never delivered
//!   before one sent earlier on the same link; it waits for it). Different links are
//!   independent, so messages of different senders interleave freely.
//! - **A cut loses what is in flight.** Partitioning a link (or isolating a party) drops every
//!   message in flight on it at once, as a broken TCP connection loses its buffers; healing
//!   does not bring them back. A message sent on a cut link is dropped.
//! - **Loss is per message.** A lost message simply vanishes (think: the connection was reset
//!   and its buffer lost). Parties that need a stream notice the gap themselves (the MariaDB
//!   model numbers its replication stream and reconnects on a gap).
//! - **Ties.** Messages due at the same instant are delivered in send order (a global sequence
//!   number), so delivery order is total and deterministic.
//!
//! # Not modelled
//!
//! Duplication, corruption, bandwidth and queueing (a message's delay does not depend on how
//! much else is in flight), connection set-up cost, and a party being down (the driver drops
//! what a down party receives).

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::mariadb::ServerId;
use crate::time::SimTime;

/// A party's address on the network. MariaDB servers use their `server_id` (so the MariaDB
/// model's [`crate::mariadb::Output::Send`] routes as is); the driver gives every other party
/// (etcd, orchestrators, agents, clients) an id outside the servers' range.
pub type NodeId = ServerId;

/// The conditions of one directed link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Fixed one-way latency.
    pub delay: Duration,
    /// Each message gets an extra delay uniform in `0..=jitter` (FIFO still holds).
    pub jitter: Duration,
    /// Probability that a message is lost, in `0.0..=1.0`.
    pub loss: f64,
}

impl LinkConfig {
    /// A LAN: 500 µs, 200 µs jitter, no loss.
    pub const LAN: LinkConfig = LinkConfig {
        delay: Duration::from_micros(500),
        jitter: Duration::from_micros(200),
        loss: 0.0,
    };

    /// Instant delivery, no loss.
    pub const INSTANT: LinkConfig = LinkConfig {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
    };

    fn validate(&self) -> Result<(), NetError> {
        if (0.0..=1.0).contains(&self.loss) {
            Ok(())
        } else {
            Err(NetError::InvalidLoss(self.loss))
        }
    }
}

/// A refused configuration.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum NetError {
    #[error("loss probability {0} is not in 0.0..=1.0")]
    InvalidLoss(f64),
}

/// What became of a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SendOutcome {
    /// In flight, to be delivered at this instant.
    Scheduled(SimTime),
    /// Dropped by the link's loss probability.
    Lost,
    /// Dropped: the link is partitioned or an end is isolated.
    Cut,
}

/// Counters over the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    /// Dropped by the loss probability.
    pub lost: u64,
    /// Dropped by a partition or isolation (at send, or in flight when the cut came).
    pub cut: u64,
}

#[derive(Debug, Clone)]
struct InFlight<M> {
    from: NodeId,
    to: NodeId,
    message: M,
}

/// The network: messages in flight plus the current faults. See the module documentation.
#[derive(Debug, Clone)]
pub struct Network<M> {
    rng: StdRng,
    default_link: LinkConfig,
    /// Per directed link overrides of `default_link`.
    links: BTreeMap<(NodeId, NodeId), LinkConfig>,
    /// Directed links that are cut.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Parties cut from everyone (including themselves).
    isolated: BTreeSet<NodeId>,
    /// Keyed by (delivery time, send sequence number): iteration order is delivery order.
    in_flight: BTreeMap<(SimTime, u64), InFlight<M>>,
    /// Per directed link, the delivery time of the latest message scheduled on it. Invariant:
    /// a later send on the link is scheduled no earlier (FIFO per link).
    last_scheduled: BTreeMap<(NodeId, NodeId), SimTime>,
    next_seq: u64,
    stats: NetStats,
}

impl<M> Network<M> {
    /// An empty network whose links all start as `default_link`, with its RNG seeded by `seed`.
    pub fn new(seed: u64, default_link: LinkConfig) -> Result<Network<M>, NetError> {
        default_link.validate()?;
        Ok(Network {
            rng: StdRng::seed_from_u64(seed),
            default_link,
            links: BTreeMap::new(),
            cut: BTreeSet::new(),
            isolated: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            last_scheduled: BTreeMap::new(),
            next_seq: 0,
            stats: NetStats::default(),
        })
    }

    // ----- Messages -----

    /// Sends `message` from `from` to `to` at `now`. The RNG is consulted for loss only when
    /// the link's loss is positive, and for jitter only when its jitter is positive.
    pub fn send(&mut self, from: NodeId, to: NodeId, message: M, now: SimTime) -> SendOutcome {
        self.stats.sent += 1;
        if !self.is_connected(from, to) {
            self.stats.cut += 1;
            return SendOutcome::Cut;
        }
        let link = self.link(from, to);
        if link.loss > 0.0 && self.rng.random_bool(link.loss) {
            self.stats.lost += 1;
            return SendOutcome::Lost;
        }
        let jitter_us = u64::try_from(link.jitter.as_micros()).unwrap_or(u64::MAX);
        let jitter = if jitter_us > 0 {
            Duration::from_micros(self.rng.random_range(0..=jitter_us))
        } else {
            Duration::ZERO
        };
        let mut at = now + link.delay + jitter;
        if let Some(&last) = self.last_scheduled.get(&(from, to)) {
            // FIFO: never overtake an earlier message of the link. At an equal instant the
            // sequence number keeps the send order.
            at = at.max(last);
        }
        self.last_scheduled.insert((from, to), at);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight
            .insert((at, seq), InFlight { from, to, message });
        SendOutcome::Scheduled(at)
    }

    /// When the next message is due; None when nothing is in flight.
    pub fn poll_timeout(&self) -> Option<SimTime> {
        self.in_flight.keys().next().map(|&(at, _)| at)
    }

    /// The next message due by `now` (earliest delivery time first, then send order), as
    /// `(from, to, message)`.
    pub fn poll_deliver(&mut self, now: SimTime) -> Option<(NodeId, NodeId, M)> {
        let (&(at, _), _) = self.in_flight.first_key_value()?;
        if at > now {
            return None;
        }
        let (_, m) = self.in_flight.pop_first()?;
        self.stats.delivered += 1;
        Some((m.from, m.to, m.message))
    }

    /// How many messages are in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    // ----- Faults -----

    /// Whether a message sent now from `from` to `to` can get through (loss aside).
    pub fn is_connected(&self, from: NodeId, to: NodeId) -> bool {
        !self.cut.contains(&(from, to))
            && !self.isolated.contains(&from)
            && !self.isolated.contains(&to)
    }

    /// Cuts the link both ways; messages in flight on it are lost.
    pub fn partition(&mut self, a: NodeId, b: NodeId) {
        self.partition_one_way(a, b);
        self.partition_one_way(b, a);
    }

    /// Cuts `from → to` only (`to → from` still works); messages in flight from `from` to `to`
    /// are lost.
    pub fn partition_one_way(&mut self, from: NodeId, to: NodeId) {
        self.cut.insert((from, to));
        self.drop_in_flight(|f, t| f == from && t == to);
    }

    /// Restores the link both ways (an isolation of either end still holds).
    pub fn heal(&mut self, a: NodeId, b: NodeId) {
        self.heal_one_way(a, b);
        self.heal_one_way(b, a);
    }

    /// Restores `from → to` only.
    pub fn heal_one_way(&mut self, from: NodeId, to: NodeId) {
        self.cut.remove(&(from, to));
    }

    /// Cuts `a` from every party, both ways; everything in flight to or from it is lost.
    pub fn isolate(&mut self, a: NodeId) {
        self.isolated.insert(a);
        self.drop_in_flight(|f, t| f == a || t == a);
    }

    /// Whether `a` is isolated from every party.
    pub fn is_isolated(&self, a: NodeId) -> bool {
        self.isolated.contains(&a)
    }

    /// Ends the isolation of `a` (partitions of its links still hold).
    pub fn rejoin(&mut self, a: NodeId) {
        self.isolated.remove(&a);
    }

    /// Ends every fault: partitions, isolations and per-link overrides (every link is back to
    /// the default). Messages already in flight keep their delivery time.
    pub fn heal_all(&mut self) {
        self.cut.clear();
        self.isolated.clear();
        self.links.clear();
    }

    /// The conditions of `from → to` now.
    pub fn link(&self, from: NodeId, to: NodeId) -> LinkConfig {
        self.links
            .get(&(from, to))
            .copied()
            .unwrap_or(self.default_link)
    }

    /// Sets the conditions of `from → to` for messages sent from now on (those in flight keep
    /// their delivery time).
    pub fn set_link(&mut self, from: NodeId, to: NodeId, link: LinkConfig) -> Result<(), NetError> {
        link.validate()?;
        self.links.insert((from, to), link);
        Ok(())
    }

    /// [`Network::set_link`] both ways.
    pub fn set_link_both(
        &mut self,
        a: NodeId,
        b: NodeId,
        link: LinkConfig,
    ) -> Result<(), NetError> {
        self.set_link(a, b, link)?;
        self.set_link(b, a, link)
    }

    /// Puts `from → to` back to the default conditions.
    pub fn reset_link(&mut self, from: NodeId, to: NodeId) {
        self.links.remove(&(from, to));
    }

    fn drop_in_flight(&mut self, on_cut_link: impl Fn(NodeId, NodeId) -> bool) {
        let before = self.in_flight.len();
        self.in_flight.retain(|_, m| !on_cut_link(m.from, m.to));
        let dropped = before - self.in_flight.len();
        self.stats.cut += u64::try_from(dropped).unwrap_or(u64::MAX);
    }
}
