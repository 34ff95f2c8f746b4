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
#[non_exhaustive]
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
    /// The last failure's cause and when it happened (kept while the circuit is open).
    last_cause: Option<(String, Instant)>,
}

/// Why a request was refused without being sent: the circuit is open.
#[derive(Debug, Clone)]
pub struct Open {
    /// How long until a probe is allowed.
    pub wait: Duration,
    /// Consecutive failures so far.
    pub failures: u32,
    /// The last underlying failure (refused, timeout, 5xx, which endpoint).
    pub last_cause: Option<String>,
    /// How long ago it happened.
    pub since: Option<Duration>,
}

impl std::fmt::Display for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "circuit open after {} consecutive failure(s)",
            self.failures
        )?;
        if let (Some(cause), Some(since)) = (&self.last_cause, self.since) {
            write!(f, "; last: {cause} ({:.1} s ago)", since.as_secs_f32())?;
        }
        write!(f, "; next probe in {:.1} s", self.wait.as_secs_f32())
    }
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
    pub fn failure(self) {
        self.failure_because("unspecified failure")
    }

    /// As [`Permit::failure`], keeping `cause` (what failed, at which
    /// endpoint) for the refusals while the circuit is open.
    pub fn failure_because(mut self, cause: impl Into<String>) {
        self.done = true;
        let mut s = self.breaker.inner.lock();
        s.last_cause = Some((cause.into(), Instant::now()));
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

    /// Asks to send a request: a permit, or why not ([`Open`]: how long
    /// until a probe is allowed, and the last failure's cause).
    ///
    /// # Errors
    ///
    /// Returns [`Open`] while the breaker is open (before its cool-down ends), or while another
    /// caller's probe is in flight; it says how long to wait and the last failure's cause.
    pub fn acquire(&self) -> Result<Permit<'_>, Open> {
        let mut s = self.inner.lock();
        let Some(until) = s.open_until else {
            return Ok(Permit {
                breaker: self,
                probe: false,
                done: false,
            });
        };
        let now = Instant::now();
        let open = |wait| Open {
            wait,
            failures: s.failures,
            last_cause: s.last_cause.as_ref().map(|(c, _)| c.clone()),
            since: s.last_cause.as_ref().map(|(_, at)| now - *at),
        };
        if now < until {
            return Err(open(until - now));
        }
        if s.probing {
            return Err(open(self.config.cool_down.min(Duration::from_millis(100))));
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
    fn refusals_keep_the_last_cause() {
        let b = CircuitBreaker::new(BreakerConfig {
            threshold: 2,
            cool_down: Duration::from_secs(5),
        });
        b.acquire()
            .unwrap()
            .failure_because("timeout at POST http://tts/token");
        b.acquire()
            .unwrap()
            .failure_because("connection refused or unreachable at POST http://tts/token");
        let open = b.acquire().unwrap_err();
        assert_eq!(open.failures, 2);
        let shown = open.to_string();
        assert!(shown.contains("last: connection refused"), "{shown}");
        assert!(shown.contains("http://tts/token"), "{shown}");
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
