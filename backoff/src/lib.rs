//! The one retry backoff of myha: each delay doubles from `min` up to `max`, and a success
//! resets it. Pure: it reads no clock and draws no randomness; a caller that wants jitter
//! passes its own fraction to [`Backoff::next_delay_jittered`] (the simulator passes a seeded
//! one, a daemon one from its clock).
//!
//! Invariant: every delay returned lies in `[min, max]`, and `min >= 1 ms` so that a retry loop
//! can never spin.

use std::time::Duration;

/// The smallest floor accepted: a zero floor would retry in a busy loop.
pub const MIN_FLOOR: Duration = Duration::from_millis(1);

/// Doubling delay between `min` and `max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `min` (at least [`MIN_FLOOR`]); `max` is raised to `min` if lower.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(MIN_FLOOR);
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay to wait now; the next one doubles (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }

    /// As [`Backoff::next_delay`], lengthened by up to `jitter` (clamped to 0-1) of itself, never
    /// past `max`: instances retrying in step drift apart.
    pub fn next_delay_jittered(&mut self, jitter: f64) -> Duration {
        let d = self.next_delay();
        let j = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        (d + d.mul_f64(j)).min(self.max)
    }

    /// Back to `min` (after a success).
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay after `failures` consecutive failures (0 and 1 give `min`), without state.
    pub fn after_failures(failures: u32, min: Duration, max: Duration) -> Duration {
        let mut b = Backoff::new(min, max);
        let mut d = b.min;
        // 32 doublings exceed any Duration anyone configures; the cap is reached well before.
        for _ in 0..failures.clamp(1, 32) {
            d = b.next_delay();
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(100 * MS, 450 * MS);
        let got: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(got, [100 * MS, 200 * MS, 400 * MS, 450 * MS, 450 * MS]);
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);
    }

    #[test]
    fn a_zero_floor_is_raised_and_a_low_cap_follows_the_floor() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.next_delay(), MIN_FLOOR);
        assert_eq!(b.next_delay(), MIN_FLOOR);
    }

    #[test]
    fn jitter_stays_within_the_cap_and_bad_fractions_are_ignored() {
        let mut b = Backoff::new(100 * MS, 150 * MS);
        assert_eq!(b.next_delay_jittered(0.2), 120 * MS);
        assert_eq!(
            b.next_delay_jittered(1.0),
            150 * MS,
            "200 ms capped, jitter too"
        );
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        assert_eq!(b.next_delay_jittered(f64::NAN), 100 * MS);
        assert_eq!(b.next_delay_jittered(-3.0), 200 * MS);
    }

    #[test]
    fn after_failures_matches_the_stateful_sequence() {
        let (min, max) = (250 * MS, Duration::from_secs(5));
        assert_eq!(Backoff::after_failures(0, min, max), min);
        assert_eq!(Backoff::after_failures(1, min, max), min);
        assert_eq!(Backoff::after_failures(2, min, max), 500 * MS);
        assert_eq!(Backoff::after_failures(3, min, max), 1000 * MS);
        assert_eq!(Backoff::after_failures(100, min, max), max);
    }
}
