//! Shipping the spool to a remote node, at least once: the [`Shipper`]
//! trait (one batch → one acknowledgement) the broker crates and the HTTP
//! client implement, and the loop that reads batches from the spool's
//! cursor, retries each until it is acknowledged, then moves the cursor.
//!
//! The loop never drops a batch: while the remote node is down it retries
//! with backoff (200 ms doubling to 30 s, jitter) and the spool keeps
//! filling; once full, new decisions turn into Retry
//! `decision-log-unavailable`. A batch acknowledged but whose cursor could
//! not be saved is shipped again after a restart (a duplicate the receiver
//! drops by `(stream, seq)`).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::chain::Batch;
use super::spool::{Shared, Spool};

/// Header: the batch's idempotency key ([`Batch::idempotency_key`]).
pub const H_IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Header: the stream id.
pub const H_STREAM: &str = "Elevate-Decision-Stream";
/// Header: `<first seq>-<last seq>`.
pub const H_SEQ: &str = "Elevate-Decision-Seq";
/// Header: the hash of the entry before the batch (the previous batch's last).
pub const H_PREV: &str = "Elevate-Decision-Prev";

/// The headers every shipper puts on a batch (HTTP headers, Kafka record
/// headers, NATS headers): idempotency key, stream, seq range, `prev`. The
/// body alone is enough to verify; these let a receiver route and dedupe
/// without parsing it.
pub fn batch_headers(batch: &Batch) -> [(&'static str, String); 4] {
    [
        (H_IDEMPOTENCY_KEY, batch.idempotency_key()),
        (H_STREAM, batch.stream().to_string()),
        (H_SEQ, format!("{}-{}", batch.first_seq(), batch.last_seq())),
        (H_PREV, batch.prev().to_string()),
    ]
}

/// A batch could not be delivered (the loop retries it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("shipping decisions to {target} failed: {reason}")]
pub struct ShipError {
    /// Where it was going (never a credential).
    pub target: String,
    /// Why (the transport's error, an HTTP status).
    pub reason: String,
}

/// Sends one batch to the remote node and returns once the node
/// acknowledged it (Kafka `acks=all`, a JetStream ack, an HTTP 2xx).
#[async_trait::async_trait]
pub trait Shipper: Send + Sync {
    /// Where batches go, for logs: `kafka://topic`, `nats://subject`, a URL
    /// without credentials.
    fn target(&self) -> String;

    /// Delivers `batch`; `Ok` only once the remote node has it.
    ///
    /// # Errors
    /// A [`ShipError`] if the node did not acknowledge the batch (down,
    /// refused, timed out); the loop sends it again later.
    async fn ship(&self, batch: &Batch) -> Result<(), ShipError>;
}

/// How batches are cut and retried.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// Most entries per batch (default 500).
    pub max_records: usize,
    /// About the most bytes per batch, uncompressed (default 512 KiB; one
    /// larger entry still goes alone). Keep it under the broker's message
    /// limit (Kafka `message.max.bytes`, NATS `max_payload`, both 1 MB by default).
    pub max_bytes: usize,
    /// Longest wait before a partial batch goes (default 1 s).
    pub interval: Duration,
    /// First retry delay (default 200 ms).
    pub min_backoff: Duration,
    /// Longest retry delay (default 30 s).
    pub max_backoff: Duration,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            max_records: 500,
            max_bytes: 512 * 1024,
            interval: Duration::from_secs(1),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl Spool {
    /// Starts shipping this spool with `shipper` on the current tokio
    /// runtime, from the persisted cursor. Stops when [`Spool::stop_shipping`]
    /// is called or the last handle of the spool is dropped.
    ///
    /// # Errors
    /// [`AlreadyShipping`] if a ship task is already running for this spool.
    pub fn start_shipping(
        &self,
        shipper: Arc<dyn Shipper>,
        cfg: ShipConfig,
    ) -> Result<(), AlreadyShipping> {
        let shared = self.shared().clone();
        let task = tokio::spawn(run(shared.clone(), shipper, cfg));
        if shared.set_ship_task(task) {
            Ok(())
        } else {
            Err(AlreadyShipping)
        }
    }

    /// Stops the ship task (a batch in flight is shipped again next time).
    pub fn stop_shipping(&self) {
        self.shared().stop_ship_task();
    }
}

/// A spool ships to one remote node at a time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this decision spool is already being shipped")]
pub struct AlreadyShipping;

async fn run(shared: Arc<Shared>, shipper: Arc<dyn Shipper>, cfg: ShipConfig) {
    let target = shipper.target();
    let mut pos = shared.resume_pos();
    let max_records = cfg.max_records.max(1) as u64;
    loop {
        // Wait for a full batch, or for `interval` after the first pending entry.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let notified = shared.committed.notified();
            let pending = (shared.head_seq() + 1).saturating_sub(pos.next_seq());
            let now = tokio::time::Instant::now();
            if pending >= max_records || (pending > 0 && deadline.is_some_and(|d| now >= d)) {
                break;
            }
            if pending > 0 && deadline.is_none() {
                deadline = Some(now + cfg.interval);
            }
            // Be woken at the first entry, or at a full batch; then look
            // again, so that an entry made durable in between is not missed.
            let wake_at = if pending == 0 {
                pos.next_seq()
            } else {
                pos.next_seq() + max_records - 1
            };
            shared
                .ship_wake_at
                .store(wake_at, std::sync::atomic::Ordering::SeqCst);
            if shared.head_seq() >= wake_at {
                continue;
            }
            match deadline {
                Some(d) => {
                    let _ = tokio::time::timeout_at(d, notified).await;
                }
                None => notified.await,
            }
        }
        let batch = match shared.read_batch(&mut pos, cfg.max_records, cfg.max_bytes) {
            Ok(b) if b.is_empty() => continue,
            Ok(b) => b,
            Err(e) => {
                tracing::error!(target: "elevate::decision", error = %e, "decision spool damaged: shipping stopped, decisions turn into Retry until it is repaired");
                shared.mark_broken(e.to_string());
                return;
            }
        };
        let mut delay = cfg.min_backoff;
        let mut failures = 0u32;
        loop {
            match shipper.ship(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(target: "elevate::decision", %target, first_seq = batch.first_seq(), last_seq = batch.last_seq(), failures, error = %e, "decision batch not acknowledged: retrying");
                    }
                    shared.note_ship_failure(Some(e.to_string()));
                    let jitter = rand::rng().random_range(0.5..1.0);
                    tokio::time::sleep(delay.mul_f64(jitter)).await;
                    delay = (delay * 2).min(cfg.max_backoff);
                }
            }
        }
        if let Err(e) = shared.mark_shipped(&batch) {
            tracing::error!(target: "elevate::decision", error = %e, "decision batch shipped but the cursor was not saved: it will be shipped again after a restart");
        }
        tracing::debug!(target: "elevate::decision", stream = shared.stream(), first_seq = batch.first_seq(), last_seq = batch.last_seq(), "decision batch shipped");
    }
}
