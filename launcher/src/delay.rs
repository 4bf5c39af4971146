//! [`Delayer`]: delay and jitter for the packets one network namespace queues to userspace
//! (iptables `NFQUEUE`), by holding each packet's verdict until it is due.
//!
//! This machine's kernel has no `tc netem` (`CONFIG_NET_SCH_NETEM` is not set), but it has
//! NFQUEUE: a rule hands each matching packet to a netlink socket and the kernel keeps it until
//! that socket says `ACCEPT` (or `DROP`). Verdicts may come in any order, so holding each one
//! for `delay + uniform(0, jitter)` delays the packet by that much (and, with jitter, reorders
//! packets as netem does). The packet itself never leaves the kernel: checksums, offloads and
//! GSO are untouched (unlike a raw-socket forwarder, which would see the partial checksums of
//! veth's offloads). An ACCEPT verdict ends the packet's walk of its chain, so the rules that
//! queue it must come after any rule that drops (see `netns`).
//!
//! The netlink protocol is nfnetlink_queue's (`linux/netfilter/nfnetlink_queue.h`), spoken by
//! hand: bind a queue number with metadata-only copies, read `NFQNL_MSG_PACKET`, answer
//! `NFQNL_MSG_VERDICT`.

use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::error::{HarnessError, Result};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;

/// Holds the verdicts of one NFQUEUE queue for `delay + uniform(0, jitter)`. Stops (accepting
/// whatever it still holds) when dropped.
#[derive(Debug)]
pub struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn io_err(what: impl Into<String>) -> HarnessError {
    HarnessError::Io {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// Appends one netlink attribute (4-byte aligned).
fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// One nfnetlink_queue message for queue `queue`: header, `nfgenmsg`, then `attrs`.
fn message(msg: u16, flags: u16, seq: u32, queue: u16, attrs: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + 4 + attrs.len());
    let len = (NLMSG_HDRLEN + 4 + attrs.len()) as u32;
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version 0, res_id = queue (big endian).
    m.push(0);
    m.push(0);
    m.extend_from_slice(&queue.to_be_bytes());
    m.extend_from_slice(attrs);
    m
}

fn send(fd: &OwnedFd, m: &[u8]) -> std::io::Result<()> {
    // SAFETY: a plain send of an initialised buffer on a socket we own.
    let n = unsafe { libc::send(fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends a config message and waits for its ack (an error number from the kernel is an error).
fn configure(fd: &OwnedFd, seq: u32, queue: u16, attrs: &[u8]) -> Result<()> {
    let m = message(
        NFQNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        queue,
        attrs,
    );
    send(fd, &m).map_err(|source| HarnessError::Io {
        what: format!("nfqueue {queue}: send config"),
        source,
    })?;
    let mut buf = vec![0u8; 8192];
    // SAFETY: recv into a buffer we own, bounded by its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < NLMSG_HDRLEN as isize + 4 {
        return Err(io_err(format!("nfqueue {queue}: no ack to the config")));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if ty != NLMSG_ERROR || errno != 0 {
        return Err(HarnessError::Io {
            what: format!("nfqueue {queue}: config refused (type {ty})"),
            source: std::io::Error::from_raw_os_error(-errno),
        });
    }
    Ok(())
}

/// The packet ids of the `NFQNL_MSG_PACKET` messages in one datagram.
fn packet_ids(buf: &[u8]) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            let mut a = off + NLMSG_HDRLEN + 4;
            while a + 4 <= off + len {
                let alen = u16::from_ne_bytes([buf[a], buf[a + 1]]) as usize;
                let aty = u16::from_ne_bytes([buf[a + 2], buf[a + 3]]) & 0x3fff;
                if alen < 4 || a + alen > off + len {
                    break;
                }
                if aty == NFQA_PACKET_HDR && alen >= 8 {
                    ids.push(u32::from_be_bytes([
                        buf[a + 4],
                        buf[a + 5],
                        buf[a + 6],
                        buf[a + 7],
                    ]));
                }
                a += (alen + 3) & !3;
            }
        }
        off += (len + 3) & !3;
    }
    ids
}

fn verdict(fd: &OwnedFd, queue: u16, id: u32) -> std::io::Result<()> {
    let mut a = Vec::new();
    let mut hdr = Vec::with_capacity(8);
    hdr.extend_from_slice(&NF_ACCEPT.to_be_bytes());
    hdr.extend_from_slice(&id.to_be_bytes());
    attr(&mut a, NFQA_VERDICT_HDR, &hdr);
    send(fd, &message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, queue, &a))
}

/// Opens and binds queue `queue` in the calling thread's network namespace.
fn open_queue(queue: u16) -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if raw < 0 {
        return Err(io_err("open a netfilter netlink socket"));
    }
    // SAFETY: raw is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed sockaddr_nl is valid (pid 0: the kernel assigns one).
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: binding our own socket to a properly sized address.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io_err("bind the netfilter netlink socket"));
    }
    let mut cmd = Vec::new();
    attr(&mut cmd, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]);
    configure(&fd, 1, queue, &cmd)?;
    // Metadata only: the verdict needs the id, not the payload.
    let mut params = Vec::new();
    let mut p = 0u32.to_be_bytes().to_vec();
    p.push(NFQNL_COPY_META);
    attr(&mut params, NFQA_CFG_PARAMS, &p);
    configure(&fd, 2, queue, &params)?;
    Ok(fd)
}

impl Delayer {
    /// Serves queue `queue` of network namespace `ns` (`None`: this process's own) from a
    /// thread of its own; returns once the queue is bound.
    pub fn start(
        ns: Option<&str>,
        queue: u16,
        delay: Duration,
        jitter: Duration,
    ) -> Result<Delayer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let ns = ns.map(str::to_string);
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            if let Some(ns) = &ns {
                if let Err(e) = crate::netns::enter(ns) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            }
            let fd = match open_queue(queue) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            serve(&fd, queue, delay, jitter, &stop2);
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Delayer {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(HarnessError::Invalid(format!(
                "the delayer of queue {queue} stopped before binding it"
            ))),
        }
    }
}

/// Holds each packet until due, then accepts it; at stop, accepts what is still held.
fn serve(fd: &OwnedFd, queue: u16, delay: Duration, jitter: Duration, stop: &AtomicBool) {
    let mut held: BinaryHeap<std::cmp::Reverse<(Instant, u32)>> = BinaryHeap::new();
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while let Some(std::cmp::Reverse((due, id))) = held.peek().copied() {
            if due > now {
                break;
            }
            held.pop();
            let _ = verdict(fd, queue, id);
        }
        // Sleep until the next verdict is due (at most 20 ms: the stop flag is checked).
        let wait = held
            .peek()
            .map(|std::cmp::Reverse((due, _))| due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(20))
            .min(Duration::from_millis(20));
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of ours, a valid timespec, no signal mask change.
        let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if n <= 0 {
            continue;
        }
        // SAFETY: non-blocking recv into a buffer we own, bounded by its length.
        let got = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if got <= 0 {
            continue;
        }
        let arrived = Instant::now();
        for id in packet_ids(&buf[..got as usize]) {
            let extra = if jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_nanos(rng.random_range(0..=jitter.as_nanos() as u64))
            };
            held.push(std::cmp::Reverse((arrived + delay + extra, id)));
        }
    }
    while let Some(std::cmp::Reverse((_, id))) = held.pop() {
        let _ = verdict(fd, queue, id);
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_are_laid_out_as_nfnetlink_expects() {
        let mut a = Vec::new();
        attr(&mut a, NFQA_CFG_PARAMS, &[0, 0, 0, 0, NFQNL_COPY_META]);
        // 4 header bytes + 5 payload bytes, padded to 12.
        assert_eq!(a.len(), 12);
        assert_eq!(u16::from_ne_bytes([a[0], a[1]]), 9);
        let m = message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 7, 300, &a);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), (3 << 8) | 1);
        assert_eq!(
            u16::from_be_bytes([m[18], m[19]]),
            300,
            "queue number, big endian"
        );
    }

    #[test]
    fn packet_ids_are_read_from_packet_messages_only() {
        let mut a = Vec::new();
        attr(&mut a, NFQA_PACKET_HDR, &[0, 0, 1, 2, 8, 0, 1]);
        let mut two = message(NFQNL_MSG_PACKET, 0, 0, 1, &a);
        two.extend(message(NFQNL_MSG_CONFIG, 0, 0, 1, &a));
        two.extend(message(NFQNL_MSG_PACKET, 0, 0, 1, &a));
        assert_eq!(packet_ids(&two), vec![0x0102, 0x0102]);
        assert!(packet_ids(&[1, 2, 3]).is_empty());
    }
}
