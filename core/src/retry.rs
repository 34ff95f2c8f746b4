//! Bounded retry with exponential backoff and jitter (delays from `backon`).
//!
//! Two bounds: a count of attempts (`max_attempts`, for transient handler
//! errors) and a duration (`max_elapsed`, for dependency outages: a TTS that
//! is down for a minute must cost a message a minute, not its retries).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How often and how patiently a Retry verdict (or a transient handler error) is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Total deliveries allowed before the message is dead-lettered
    /// `retries-exhausted` (`u32::MAX`: no count limit).
    pub max_attempts: u32,
    /// How long after its first failed attempt a message keeps being retried
    /// (`None`: no time limit). A context reference's expiry bounds it too:
    /// past `exp` the message is denied `expired`.
    pub max_elapsed: Option<Duration>,
    /// First delay.
    pub min_delay: Duration,
    /// Cap on any delay.
    pub max_delay: Duration,
    /// Growth factor.
    pub factor: f32,
    /// Randomise delays (recommended: spreads an outage's retries).
    pub jitter: bool,
}

/// The default time budget for `unavailable`-class retries: 30 minutes.
pub const DEFAULT_OUTAGE_BUDGET: Duration = Duration::from_secs(30 * 60);

impl Default for RetryPolicy {
    /// The policy for dependency outages (Retry verdicts): no count limit,
    /// [`DEFAULT_OUTAGE_BUDGET`], 200 ms doubling to 30 s with jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: u32::MAX,
            max_elapsed: Some(DEFAULT_OUTAGE_BUDGET),
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

    /// The policy for transient handler errors: 3 attempts, no time limit.
    pub fn handler_default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            max_elapsed: None,
            ..RetryPolicy::default()
        }
    }

    /// True when attempt number `attempt` (1-based) was the last one allowed.
    pub fn exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// True when the attempt count or the time since the first failure
    /// (`elapsed`) reached its bound.
    pub fn exhausted_after(&self, attempt: u32, elapsed: Duration) -> bool {
        self.exhausted(attempt) || self.max_elapsed.is_some_and(|m| elapsed >= m)
    }

    /// The most deliveries a message can take under this policy: its
    /// `max_attempts`, or with a time budget the attempts that fit in it at
    /// the shortest (jitter-free) delays. A broker with its own delivery
    /// limit (JetStream `max_deliver`, a quorum queue's `delivery-limit`)
    /// must allow more.
    pub fn deliveries_needed(&self) -> u64 {
        let by_count = u64::from(self.max_attempts);
        let Some(budget) = self.max_elapsed else {
            return by_count;
        };
        let floor = RetryPolicy {
            jitter: false,
            ..*self
        };
        let (mut spent, mut n) = (Duration::ZERO, 1u32);
        while spent < budget && u64::from(n) < by_count {
            spent += floor.delay(n, None).max(Duration::from_millis(1));
            n = n.saturating_add(1);
        }
        u64::from(n).min(by_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy {
            jitter: false,
            max_attempts: 8,
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
        let outage = RetryPolicy::default();
        assert!(!outage.exhausted_after(1_000_000, Duration::from_secs(60)));
        assert!(outage.exhausted_after(2, DEFAULT_OUTAGE_BUDGET));
        // 200 ms doubling to 30 s: 8 steps to the cap (≈ 51 s), then 30 s each for 30 min
        let n = outage.deliveries_needed();
        assert!((60..=70).contains(&n), "{n}");
        assert_eq!(RetryPolicy::handler_default().deliveries_needed(), 3);
        let jittered = RetryPolicy::default();
        for a in 1..12 {
            assert!(jittered.delay(a, None) <= jittered.max_delay);
        }
    }
}
