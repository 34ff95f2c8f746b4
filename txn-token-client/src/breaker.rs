//! A small circuit breaker: after `threshold` consecutive transient failures
//! the circuit opens for `cool_down`, answering at once; then one probe is let
//! through (half-open) and its outcome closes or re-opens the circuit.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub threshold: u32,
    /// How long the circuit stays open before a probe is allowed.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            threshold: 5,
            cool_down: Duration::from_secs(5),
        }
    }
}

/// The state a caller can observe (for metrics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests are refused until the cool-down ends.
    Open,
    /// One probe request is in flight or allowed.
    HalfOpen,
}

#[derive(Debug, Default)]
struct Inner {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// The breaker; share it behind the client.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

/// Permission to send one request; report its outcome or drop it (= no outcome).
#[derive(Debug)]
#[must_use]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    done: bool,
}

impl Permit<'_> {
    /// The service answered (any answer, refusals included).
    pub fn success(mut self) {
        self.done = true;
        let mut s = self.breaker.inner.lock();
        *s = Inner::default();
    }

    /// The service could not be reached or was overloaded.
    pub fn failure(mut self) {
        self.done = true;
        let mut s = self.breaker.inner.lock();
        s.failures = s.failures.saturating_add(1);
        if self.probe || s.failures >= self.breaker.config.threshold {
            s.open_until = Some(Instant::now() + self.breaker.config.cool_down);
        }
        s.probing = false;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.inner.lock().probing = false;
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Asks to send a request: a permit, or how long until a probe is allowed.
    pub fn acquire(&self) -> Result<Permit<'_>, Duration> {
        let mut s = self.inner.lock();
        let Some(until) = s.open_until else {
            return Ok(Permit {
                breaker: self,
                probe: false,
                done: false,
            });
        };
        let now = Instant::now();
        if now < until {
            return Err(until - now);
        }
        if s.probing {
            return Err(self.config.cool_down.min(Duration::from_millis(100)));
        }
        s.probing = true;
        Ok(Permit {
            breaker: self,
            probe: true,
            done: false,
        })
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        let s = self.inner.lock();
        match s.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_half_opens() {
        let b = CircuitBreaker::new(BreakerConfig {
            threshold: 2,
            cool_down: Duration::from_millis(50),
        });
        b.acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.acquire().is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.acquire().unwrap();
        assert!(b.acquire().is_err(), "only one probe at a time");
        probe.failure();
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(60));
        b.acquire().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn dropped_probe_frees_the_slot() {
        let b = CircuitBreaker::new(BreakerConfig {
            threshold: 1,
            cool_down: Duration::from_millis(10),
        });
        b.acquire().unwrap().failure();
        std::thread::sleep(Duration::from_millis(15));
        drop(b.acquire().unwrap());
        assert!(b.acquire().is_ok());
    }
}
