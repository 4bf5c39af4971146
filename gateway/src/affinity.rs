//! Pinning proxy threads to CPUs (`[gateway] proxy_cpus`), the gateway's `cpu-map`.
//!
//! Why: a proxy thread that the scheduler moves between cores loses its warm caches and wakes
//! on a core other than the one its sockets' softirqs ran on; on a small machine shared with
//! mysqld and the clients this was the measured difference between the gateway and HAProxy
//! (same CPU per query, ten times the migrations). Pinning is opt-in: on a busy shared host
//! the scheduler's freedom can matter more than cache warmth.

use std::collections::BTreeSet;

/// Highest CPU number a `cpu_set_t` can name.
pub const MAX_CPU: usize = libc::CPU_SETSIZE as usize - 1;

/// The CPUs this process may run on (its affinity mask, as set by taskset, cgroups or systemd
/// `CPUAffinity=`).
pub fn allowed_cpus() -> std::io::Result<BTreeSet<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads the set within bounds for cpu <= MAX_CPU.
    Ok((0..=MAX_CPU)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu > MAX_CPU {
        return Err(std::io::Error::other(format!(
            "CPU {cpu} is beyond {MAX_CPU}"
        )));
    }
    // SAFETY: as above; pid 0 is the calling thread for sched_setaffinity.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU of each proxy thread: thread `i` gets `cpus[i % cpus.len()]`.
pub fn plan(cpus: &[usize], threads: usize) -> Vec<usize> {
    if cpus.is_empty() {
        return Vec::new();
    }
    (0..threads).map(|i| cpus[i % cpus.len()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_take_the_cpus_in_turn() {
        assert_eq!(plan(&[0, 1], 4), vec![0, 1, 0, 1]);
        assert_eq!(plan(&[3], 2), vec![3, 3]);
        assert_eq!(plan(&[2, 5, 7], 2), vec![2, 5]);
        assert!(plan(&[], 3).is_empty());
    }

    #[test]
    fn a_thread_can_be_pinned_to_an_allowed_cpu_and_not_beyond_the_set() {
        let allowed = allowed_cpus().expect("sched_getaffinity");
        let first = *allowed.iter().next().expect("at least one CPU");
        let t = std::thread::spawn(move || {
            pin_current_thread(first).expect("pin");
            allowed_cpus().expect("read back")
        });
        assert_eq!(t.join().expect("thread"), BTreeSet::from([first]));
        assert!(pin_current_thread(MAX_CPU + 1).is_err());
    }
}
