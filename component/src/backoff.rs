//! Exponential backoff with full jitter, for reconnecting to peers that may
//! not be up yet. Jitter keeps a fleet of sinks from reconnecting in lockstep
//! when their source restarts.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt: a random duration between `min`
    /// and `min * 2^attempt`, capped at `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let span = ceiling.saturating_sub(self.min).as_millis() as u64;
        self.min + Duration::from_millis(fastrand::u64(0..=span))
    }

    /// Waits for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Called after a success, so the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_bounded_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
        assert_eq!(b.next_delay(), Duration::from_millis(10));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(200));
        }
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}
