//! Measuring: what one consumer (raw or guarded) saw, by the sequence number
//! and publish time each message carries, and the process's CPU time.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use elevate_core::Headers;
use parking_lot::Mutex;

/// Header: the message's sequence number in its row.
pub const H_SEQ: &str = "x-bench-seq";
/// Header: publish time, microseconds since the epoch (set just before the send).
pub const H_TS: &str = "x-bench-ts";

/// Microseconds since the epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// `headers` with the publish time set to now.
pub fn stamp(headers: &Headers) -> Headers {
    let mut h = headers.clone();
    h.insert(H_TS, now_us().to_string());
    h
}

/// CPU time (user + system) of the whole process so far.
#[allow(unsafe_code)] // getrusage(2): the one libc call the benchmark makes
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage writes a plain C struct we own; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What one consumer (raw or guarded) saw.
#[derive(Default)]
pub struct Tally {
    /// Messages of the throughput phase (seq < n).
    n: usize,
    seen: Mutex<HashSet<u64>>,
    in_phase: AtomicUsize,
    handled: AtomicUsize,
    dead: AtomicUsize,
    duplicates: AtomicUsize,
    malformed: AtomicUsize,
    first: Mutex<Option<Instant>>,
    done: Mutex<Option<Instant>>,
    latencies_us: Mutex<Vec<u64>>,
}

impl Tally {
    /// A tally for a row of `n` throughput messages.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Tally {
            n,
            ..Default::default()
        })
    }

    /// Records one message by its headers (from the handler, or a dead letter).
    pub fn mark(&self, headers: &Headers, dead: bool) {
        let now = Instant::now();
        let at_us = now_us();
        let seq = headers.get_str(H_SEQ).and_then(|s| s.parse::<u64>().ok());
        let ts = headers.get_str(H_TS).and_then(|s| s.parse::<u64>().ok());
        let Some(seq) = seq else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !self.seen.lock().insert(seq) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if dead {
            self.dead.fetch_add(1, Ordering::Relaxed);
        } else {
            self.handled.fetch_add(1, Ordering::Relaxed);
        }
        if (seq as usize) < self.n {
            self.first.lock().get_or_insert(now);
            if self.in_phase.fetch_add(1, Ordering::Relaxed) + 1 == self.n {
                *self.done.lock() = Some(now);
            }
        } else if let Some(ts) = ts {
            self.latencies_us.lock().push(at_us.saturating_sub(ts));
        }
    }

    /// Distinct messages seen (handled or dead-lettered).
    pub fn count(&self) -> usize {
        self.seen.lock().len()
    }

    /// Messages handed to the handler.
    pub fn handled(&self) -> usize {
        self.handled.load(Ordering::Relaxed)
    }

    /// Messages dead-lettered.
    pub fn dead(&self) -> usize {
        self.dead.load(Ordering::Relaxed)
    }

    /// Messages seen again after the first time.
    pub fn duplicates(&self) -> usize {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Messages without a sequence number.
    pub fn malformed(&self) -> usize {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Drain throughput, first to last throughput message, in messages per second.
    pub fn throughput(&self) -> Option<f64> {
        let first = (*self.first.lock())?;
        let done = (*self.done.lock())?;
        let secs = done.duration_since(first).as_secs_f64();
        if self.n <= 1 || secs <= 0.0 {
            return None;
        }
        Some((self.n - 1) as f64 / secs)
    }

    /// The `p` quantile of the trickle's publish-to-handler latencies, in µs.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let mut v = self.latencies_us.lock().clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(idx.min(v.len() - 1)).map(|x| *x as f64)
    }

    /// Waits until `n` messages were seen, or `timeout`; returns whether they were.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        elevate_testing::wait::poll_until(timeout, Duration::from_millis(5), || self.count() >= n)
            .await
    }
}
