//! Decision records (one JSON line per decision, Permit included) and sinks.
//!
//! A record never holds a token, only its SHA-256. A sink that cannot write
//! returns an error, and the pipeline turns that into a Retry: nothing is
//! dispatched or dead-lettered without its decision on record.
//!
//! For shipping off the host, [`spool::Spool`] is a durable, bounded,
//! hash-chained spool ([`chain`] has the format and the receiver-side
//! check) and [`ship`] sends it to a remote node at least once.

pub mod chain;
pub mod ship;
pub mod spool;

pub use chain::{Batch, ChainReport, ChainVerifier, StreamReport};
pub use ship::{ShipConfig, ShipError, Shipper};
pub use spool::{Spool, SpoolConfig, SpoolError, SpoolStats};

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::message::Coordinates;
use crate::verdict::{Reason, Verdict};

/// One decision, as logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Unique decision id (UUIDv7), also on the dead letter.
    pub decision_id: String,
    /// RFC 3339 time of the decision.
    pub time: String,
    /// What the guard decided for the message (permit, deny, retry).
    pub verdict: Verdict,
    /// Reason code.
    pub reason: Reason,
    /// Human-readable detail (never a token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Target identity, when known.
    pub subject: Option<String>,
    /// The consuming workload.
    pub workload: String,
    /// Signer of the context reference, when known.
    pub producer: Option<String>,
    /// Action evaluated, when reached.
    pub action: Option<String>,
    /// Resource evaluated, when reached.
    pub resource: Option<String>,
    /// Origin transaction id, when known.
    pub txn: Option<String>,
    /// Delegation chain, origin first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// Broker coordinates.
    pub source: Coordinates,
    /// Delivery attempt the decision was made on.
    pub attempt: u32,
    /// Content hash of the policy bundle in force.
    pub policy_version: String,
    /// Revision of the signed policy bundle in force (absent for an
    /// unsigned development directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_revision: Option<u64>,
    /// Time spent deciding, microseconds.
    pub latency_us: u64,
    /// Trace id (W3C traceparent trace id when the message carried one).
    pub trace_id: String,
    /// SHA-256 of the context reference, when present.
    pub ctx_ref_sha256: Option<String>,
    /// SHA-256 of the Txn-Token, when one was obtained.
    pub txn_token_sha256: Option<String>,
}

/// A decision could not be recorded.
#[derive(Debug, thiserror::Error)]
#[error("decision log write failed ({sink}): {reason}")]
pub struct SinkError {
    /// Which sink.
    pub sink: String,
    /// Why the record could not be written (the underlying I/O or encoding error).
    pub reason: String,
}

/// Where decision records go.
pub trait DecisionSink: Send + Sync {
    /// Records one decision durably enough for this sink, or fails loudly.
    ///
    /// # Errors
    ///
    /// Returns a [`SinkError`] if the record could not be written (serialized, written and flushed,
    /// or sent) so that it is durable for this sink; the caller must then not act on the decision.
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError>;

    /// Records one decision and resolves once it is durable; the guard's
    /// path. A group-committing sink ([`Spool`]) shares one write and flush
    /// among every caller waiting; the default calls [`DecisionSink::record`].
    ///
    /// # Errors
    ///
    /// As [`DecisionSink::record`].
    fn commit<'a>(&'a self, rec: &'a DecisionRecord) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(std::future::ready(self.record(rec)))
    }

    /// The spool behind this sink, if any (to start shipping it or read its
    /// counters from a sink built by configuration).
    fn spool(&self) -> Option<Spool> {
        None
    }
}

/// JSON Lines file sink: one record per line, flushed per record.
pub struct FileSink {
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
}

impl FileSink {
    /// Opens (creating or appending to) a JSON Lines file.
    ///
    /// # Errors
    ///
    /// Returns a [`SinkError`] if the file cannot be opened or created for appending (missing
    /// directory, permissions).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| SinkError {
                sink: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(FileSink {
            path,
            out: Mutex::new(BufWriter::new(file)),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl DecisionSink for FileSink {
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError> {
        let err = |e: std::io::Error| SinkError {
            sink: self.path.display().to_string(),
            reason: e.to_string(),
        };
        let mut line = serde_json::to_vec(rec).map_err(|e| SinkError {
            sink: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        let mut out = self.out.lock();
        out.write_all(&line).map_err(err)?;
        out.flush().map_err(err)
    }
}

/// Emits each record as a `tracing` event (target `elevate::decision`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingSink;

impl DecisionSink for TracingSink {
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError> {
        let json = serde_json::to_string(rec).unwrap_or_default();
        if rec.verdict == Verdict::Permit {
            tracing::info!(target: "elevate::decision", decision = %json);
        } else {
            tracing::warn!(target: "elevate::decision", decision = %json);
        }
        Ok(())
    }
}

/// Keeps records in memory (tests, the demo).
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<DecisionRecord>>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of every record so far.
    pub fn records(&self) -> Vec<DecisionRecord> {
        self.records.lock().clone()
    }
}

impl DecisionSink for MemorySink {
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError> {
        self.records.lock().push(rec.clone());
        Ok(())
    }
}

/// Writes to every inner sink; fails if any fails.
#[derive(Clone, Default)]
pub struct TeeSink {
    sinks: Vec<Arc<dyn DecisionSink>>,
}

impl TeeSink {
    /// A tee over the given sinks.
    pub fn new(sinks: Vec<Arc<dyn DecisionSink>>) -> Self {
        TeeSink { sinks }
    }
}

impl DecisionSink for TeeSink {
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError> {
        for s in &self.sinks {
            s.record(rec)?;
        }
        Ok(())
    }

    fn commit<'a>(&'a self, rec: &'a DecisionRecord) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            for s in &self.sinks {
                s.commit(rec).await?;
            }
            Ok(())
        })
    }

    fn spool(&self) -> Option<Spool> {
        self.sinks.iter().find_map(|s| s.spool())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> DecisionRecord {
        DecisionRecord {
            decision_id: "d1".into(),
            time: "2026-01-01T00:00:00Z".into(),
            verdict: Verdict::Deny,
            reason: Reason::SubjectDenied,
            detail: None,
            subject: Some("alice".into()),
            workload: "w".into(),
            producer: None,
            action: None,
            resource: None,
            txn: None,
            chain: vec![],
            source: crate::memory::coordinates("q", 1),
            attempt: 1,
            policy_version: "v".into(),
            bundle_revision: None,
            latency_us: 3,
            trace_id: "t".into(),
            ctx_ref_sha256: None,
            txn_token_sha256: None,
        }
    }

    #[test]
    fn file_sink_writes_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let s = FileSink::open(&p).unwrap();
        s.record(&rec()).unwrap();
        s.record(&rec()).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<DecisionRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, vec![rec(), rec()]);
    }

    #[test]
    fn file_sink_failure_is_an_error() {
        // /dev/full accepts the open and fails every write.
        if let Ok(s) = FileSink::open("/dev/full") {
            assert!(s.record(&rec()).is_err());
        }
    }
}
