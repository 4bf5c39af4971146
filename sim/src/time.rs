//! The simulation's virtual clock. Nothing in the simulator reads the wall clock: every model
//! is advanced by the driver to an explicit [`SimTime`], so a run is a pure function of its
//! seed.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};
use std::time::Duration;

/// An instant of virtual time: microseconds since the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SimTime(u64);

impl SimTime {
    pub const ZERO: SimTime = SimTime(0);

    pub fn from_micros(us: u64) -> SimTime {
        SimTime(us)
    }

    pub fn from_millis(ms: u64) -> SimTime {
        SimTime(ms.saturating_mul(1000))
    }

    pub fn as_micros(self) -> u64 {
        self.0
    }

    pub fn as_millis(self) -> u64 {
        self.0 / 1000
    }

    /// Time elapsed since `earlier`; zero when `earlier` is later.
    /// `self - d`, or zero.
    pub fn saturating_sub(self, d: Duration) -> SimTime {
        SimTime::from_micros(self.as_micros().saturating_sub(d.as_micros() as u64))
    }

    pub fn saturating_since(self, earlier: SimTime) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Add<Duration> for SimTime {
    type Output = SimTime;
    fn add(self, d: Duration) -> SimTime {
        SimTime(self.0.saturating_add(micros(d)))
    }
}

impl AddAssign<Duration> for SimTime {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl Sub<SimTime> for SimTime {
    type Output = Duration;
    fn sub(self, earlier: SimTime) -> Duration {
        self.saturating_since(earlier)
    }
}

impl fmt::Display for SimTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_displays_seconds() {
        let t = SimTime::from_millis(1500);
        assert_eq!(t + Duration::from_millis(500), SimTime::from_millis(2000));
        assert_eq!(SimTime::ZERO - t, Duration::ZERO);
        assert_eq!(t - SimTime::from_millis(500), Duration::from_secs(1));
        assert_eq!(t.to_string(), "1.500000s");
        assert_eq!(
            SimTime::from_micros(u64::MAX) + Duration::from_secs(1),
            SimTime::from_micros(u64::MAX)
        );
    }
}
