//! Backpressure during an outage: an outage must cost time, not messages.
//!
//! When a dependency of the guard is unavailable (the TTS, the PDP, the
//! decision log, the replay store: every `unavailable`-class verdict), the
//! [`Admission`] gate closes and every consumer loop stops taking new
//! deliveries instead of spending their retries. When the wait is over, one
//! delivery is let through as a probe; its verdict opens the gate (any
//! verdict but an `unavailable` Retry) or closes it again for longer. A probe
//! whose verdict never comes back (its task died) is replaced after
//! [`PROBE_TIMEOUT`].

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::retry::RetryPolicy;
use crate::verdict::Reason;

/// How long a probe may stay out before another is let through.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Admission::wait`] grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Admit {
    /// The gate is open: take deliveries as usual.
    Open,
    /// The gate is closed and this caller may take exactly one delivery to probe it.
    Probe,
}

#[derive(Debug, Default)]
struct Gate {
    /// Closed until then (`None` = open).
    closed_until: Option<Instant>,
    /// Consecutive unavailable verdicts since the gate last opened.
    failures: u32,
    /// When the outstanding probe was let through.
    probe_since: Option<Instant>,
    /// When the gate closed, and why (for the log line when it opens).
    closed_at: Option<(Instant, Reason)>,
    /// Deliveries already taken that wait to try again ([`Admission::wait_retry`]):
    /// they probe before any new delivery is taken.
    retrying: u32,
}

/// The gate every consumer loop of one processor waits on before taking a delivery.
#[derive(Debug)]
pub struct Admission {
    gate: Mutex<Gate>,
    changed: Notify,
    backoff: RetryPolicy,
}

impl Admission {
    /// A gate that backs off like `backoff` (its delays, not its attempt limit).
    pub fn new(backoff: RetryPolicy) -> Self {
        Admission {
            gate: Mutex::new(Gate::default()),
            changed: Notify::new(),
            backoff,
        }
    }

    /// True when deliveries flow.
    pub fn is_open(&self) -> bool {
        self.gate.lock().closed_until.is_none()
    }

    /// Waits until a new delivery may be taken. While the gate is closed,
    /// deliveries waiting to try again ([`Admission::wait_retry`]) probe first.
    pub async fn wait(&self) -> Admit {
        self.wait_as(false).await
    }

    /// Waits until a delivery already taken (an in-place retry) may try
    /// again; such deliveries take the probe before new ones.
    pub async fn wait_retry(&self) -> Admit {
        self.gate.lock().retrying += 1;
        let _counted = Retrying(self);
        self.wait_as(true).await
    }

    async fn wait_as(&self, retry: bool) -> Admit {
        loop {
            let notified = self.changed.notified();
            let until = {
                let mut g = self.gate.lock();
                let Some(until) = g.closed_until else {
                    return Admit::Open;
                };
                let now = Instant::now();
                let probe_free = g.probe_since.is_none_or(|t| now - t >= PROBE_TIMEOUT)
                    && (retry || g.retrying == 0);
                if now >= until && probe_free {
                    g.probe_since = Some(now);
                    return Admit::Probe;
                }
                if now >= until {
                    g.probe_since.map(|t| t + PROBE_TIMEOUT).unwrap_or(now)
                } else {
                    until
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    /// A verdict said a dependency is unavailable (`reason`, with the
    /// server's `retry_after` hint): close the gate, or keep it closed longer.
    pub fn unavailable(&self, reason: Reason, retry_after: Option<Duration>) {
        let mut g = self.gate.lock();
        g.failures = g.failures.saturating_add(1);
        let wait = self.backoff.delay(g.failures, retry_after);
        let now = Instant::now();
        let until = now + wait;
        if g.closed_until.is_none() {
            tracing::warn!(%reason, ?wait, "dependency unavailable: taking no new deliveries until it recovers (backpressure)");
            g.closed_at = Some((now, reason));
        }
        g.closed_until = Some(g.closed_until.map_or(until, |u| u.max(until)));
        g.probe_since = None;
        drop(g);
        self.changed.notify_waiters();
    }

    /// A probe granted by [`Admission::wait`] found no delivery to try (the
    /// source had nothing): let the next waiter probe at once, instead of
    /// after [`PROBE_TIMEOUT`].
    pub fn release_probe(&self) {
        let mut g = self.gate.lock();
        if g.closed_until.is_some() {
            g.probe_since = None;
        }
        drop(g);
        self.changed.notify_waiters();
    }

    /// A verdict came back that needs no unavailable dependency: open the gate.
    pub fn available(&self) {
        let mut g = self.gate.lock();
        if g.closed_until.is_none() {
            return;
        }
        if let Some((at, reason)) = g.closed_at.take() {
            tracing::info!(%reason, after = ?at.elapsed(), probes = g.failures, "dependency recovered: taking deliveries again");
        }
        *g = Gate {
            retrying: g.retrying,
            ..Gate::default()
        };
        drop(g);
        self.changed.notify_waiters();
    }
}

/// Counts a retry waiting at the gate for as long as it waits.
struct Retrying<'a>(&'a Admission);

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        let mut g = self.0.gate.lock();
        g.retrying = g.retrying.saturating_sub(1);
        drop(g);
        self.0.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Admission {
        Admission::new(RetryPolicy {
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(20),
            jitter: false,
            ..RetryPolicy::default()
        })
    }

    #[tokio::test]
    async fn closes_probes_once_and_reopens() {
        let a = gate();
        assert_eq!(a.wait().await, Admit::Open);
        a.unavailable(Reason::TtsUnavailable, None);
        assert!(!a.is_open());
        let started = Instant::now();
        assert_eq!(a.wait().await, Admit::Probe);
        assert!(started.elapsed() >= Duration::from_millis(15));
        // a second caller waits while the probe is out
        let second = tokio::time::timeout(Duration::from_millis(60), a.wait()).await;
        assert!(second.is_err(), "only one probe at a time");
        // the probe failed: closed again, then one more probe
        a.unavailable(Reason::TtsUnavailable, None);
        assert_eq!(a.wait().await, Admit::Probe);
        a.available();
        assert_eq!(a.wait().await, Admit::Open);
    }

    #[tokio::test]
    async fn a_waiting_retry_probes_before_any_new_delivery() {
        let a = std::sync::Arc::new(gate());
        a.unavailable(Reason::TtsUnavailable, None);
        let retry = tokio::spawn({
            let a = a.clone();
            async move { a.wait_retry().await }
        });
        tokio::task::yield_now().await;
        // a new delivery does not get the probe while a retry waits for it
        let new = tokio::time::timeout(Duration::from_millis(80), a.wait()).await;
        assert!(
            new.is_err(),
            "a new delivery took the probe from a waiting retry"
        );
        assert_eq!(retry.await.unwrap(), Admit::Probe);
        // the probe is out: nobody else; its verdict reopens the gate
        a.available();
        assert_eq!(a.wait().await, Admit::Open);
    }

    #[tokio::test]
    async fn waiters_wake_when_the_gate_opens() {
        let a = std::sync::Arc::new(Admission::new(RetryPolicy {
            max_delay: Duration::from_secs(120),
            ..RetryPolicy::default()
        }));
        a.unavailable(Reason::PdpUnavailable, Some(Duration::from_secs(60)));
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.wait().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.available();
        let got = tokio::time::timeout(Duration::from_secs(1), waiter).await;
        assert_eq!(got.unwrap().unwrap(), Admit::Open);
    }
}
