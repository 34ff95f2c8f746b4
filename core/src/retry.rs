//! Bounded retry with exponential backoff and jitter (delays from `backon`).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How often and how patiently a Retry verdict (or a transient handler error) is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Total deliveries allowed before the message is dead-lettered `retries-exhausted`.
    pub max_attempts: u32,
    /// First delay.
    pub min_delay: Duration,
    /// Cap on any delay.
    pub max_delay: Duration,
    /// Growth factor.
    pub factor: f32,
    /// Randomise delays (recommended: spreads an outage's retries).
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            factor: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Delay before redelivering after failed attempt number `attempt` (1-based),
    /// never shorter than the server's `retry_after` hint.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let mut b = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .with_max_times(attempt.max(1) as usize);
        if self.jitter {
            b = b.with_jitter();
        }
        let d = b
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        match retry_after {
            Some(r) => d.max(r.min(self.max_delay)),
            None => d,
        }
    }

    /// True when attempt number `attempt` (1-based) was the last one allowed.
    pub fn exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy {
            jitter: false,
            ..Default::default()
        };
        let close = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_millis(1);
        assert!(close(p.delay(1, None), Duration::from_millis(200)));
        assert!(close(p.delay(2, None), Duration::from_millis(400)));
        assert!(close(p.delay(3, None), Duration::from_millis(800)));
        assert_eq!(p.delay(30, None), Duration::from_secs(30));
        assert!(close(
            p.delay(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        ));
        assert!(p.exhausted(8) && !p.exhausted(7));
        let jittered = RetryPolicy::default();
        for a in 1..12 {
            assert!(jittered.delay(a, None) <= jittered.max_delay);
        }
    }
}
