//! The service's metrics in the Prometheus text format (`GET /metrics`):
//! exchanges by outcome and error code, exchange latency, shared-store
//! latency and errors, and the age of the replica's copy of the shared state.
//!
//! A handful of counters and two fixed-bucket histograms, kept with atomics;
//! no registry crate is needed for that.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Histogram bucket bounds, seconds.
const BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BOUNDS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BOUNDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The service's counters and histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    exchanges: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    exchange_latency: Histogram,
    store_latency: Histogram,
    store_errors: AtomicU64,
    syncs: AtomicU64,
}

impl Metrics {
    /// Counts one exchange: `code` is `None` when a token was issued.
    pub fn exchange(&self, code: Option<&'static str>, took: Duration) {
        let key = match code {
            None => ("issued", "none"),
            Some(c) => ("refused", c),
        };
        *self.exchanges.lock().entry(key).or_default() += 1;
        self.exchange_latency.observe(took);
    }

    /// Records one shared-store call.
    pub fn store_call(&self, took: Duration, ok: bool) {
        self.store_latency.observe(took);
        if !ok {
            self.store_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one reload of the shared state.
    pub fn synced(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Issued and refused exchanges so far.
    pub fn exchanges_total(&self) -> u64 {
        self.exchanges.lock().values().sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP tts_exchanges_total Token exchanges by outcome and OAuth error code.\n\
             # TYPE tts_exchanges_total counter\n",
        );
        for ((outcome, code), n) in self.exchanges.lock().iter() {
            let _ = writeln!(
                out,
                "tts_exchanges_total{{outcome=\"{outcome}\",code=\"{code}\"}} {n}"
            );
        }
        self.exchange_latency.render(
            &mut out,
            "tts_exchange_duration_seconds",
            "Time to answer a token exchange.",
        );
        self.store_latency.render(
            &mut out,
            "tts_store_duration_seconds",
            "Time of a shared-store call (jti claim, reload, change).",
        );
        let _ = writeln!(
            out,
            "# HELP tts_store_errors_total Shared-store calls that failed.\n# TYPE tts_store_errors_total counter\ntts_store_errors_total {}",
            self.store_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tts_state_reloads_total Reloads of the shared state.\n# TYPE tts_state_reloads_total counter\ntts_state_reloads_total {}",
            self.syncs.load(Ordering::Relaxed)
        );
        out
    }
}
