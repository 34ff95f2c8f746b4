//! The durable decision spool: a directory of JSON Lines segments holding
//! the hash-chained entries of [`super::chain`], written in place into
//! preallocated segments, flushed by group commit, bounded, read by the
//! shipper from a persisted cursor.
//!
//! - **Written on the caller's task, flushed in groups.** A record is
//!   serialized, chained and written (`pwrite`, a few µs) by the task that
//!   decided, under the spool's lock: no queue, no thread hop. With
//!   [`SpoolConfig::fsync`] one flusher thread then runs `fdatasync` over
//!   everything written since its last one while callers wait
//!   ([`DecisionSink::commit`], asynchronously) — writes go on during a
//!   flush, so one flush serves every record that arrived meanwhile. A
//!   record is durable before the guard's verdict is returned, so before its
//!   message is dispatched or dead-lettered; the shipper reads only durable
//!   entries. [`DecisionSink::record`] blocks instead.
//! - **Preallocated.** A segment is zero-filled to [`SpoolConfig::segment_bytes`]
//!   before it is written (a spare is prepared in the background), so an
//!   `fdatasync` has only data to flush: appending to a growing file makes
//!   every flush journal the new size too, which cost 3–25× more on this
//!   project's VMs (docs/BENCHMARKS.md). Entries never contain a NUL byte,
//!   so the first NUL of a segment is its end; a closed segment is cut to
//!   its entries.
//! - **Bounded.** The entries on disk never exceed [`SpoolConfig::max_bytes`]
//!   (plus the unwritten rest of the active segment and one spare); a record
//!   that does not fit is refused ([`SinkError`], so the guard answers Retry
//!   `decision-log-unavailable`): nothing is dispatched without its record,
//!   nothing is dropped. Fully shipped segments are deleted.
//! - **Checked.** Opening a spool walks every segment's chain and refuses a
//!   damaged one ([`SpoolError::Corrupt`]: an edited or reordered entry, a
//!   missing or truncated segment, bytes after a segment's end, a cursor
//!   past the end or not matching the entry it names). An incomplete last
//!   entry — what a crash during a write leaves, a record never
//!   acknowledged — is cut off and counted ([`SpoolStats::torn_tail_bytes`],
//!   with a warning). The shipper checks the links again as it reads; a
//!   break stops shipping and recording.
//!
//! Layout: `stream` (the stream id), `cursor.json` (the last shipped entry:
//! `{"seq":…,"hash":…}`, replaced atomically), `seg-<first seq, 20
//! digits>.jsonl`, `spare` (a zero-filled segment waiting to be used).

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::chain;
use super::{DecisionRecord, DecisionSink, SinkError};

/// Default bound of the spool on disk: 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Default least time between two flushes: 2 ms (see [`SpoolConfig::flush_interval`]).
pub const DEFAULT_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

/// Most written records the flusher lets wait while it paces: past this it
/// flushes at once.
const FLUSH_GROUP_MAX: u64 = 1024;

/// How a spool is laid out and bounded.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// The spool directory (created if missing).
    pub dir: PathBuf,
    /// Bound of all segments on disk, shipped or not (default 256 MiB).
    pub max_bytes: u64,
    /// The size a segment is preallocated to; a new one is started when the
    /// next entry does not fit (default an eighth of `max_bytes`, between
    /// 4 KiB and 16 MiB), and also when the spool is full and the active
    /// segment is all shipped, so that it can go.
    pub segment_bytes: u64,
    /// `fdatasync` before a record counts as stored (default true; one flush
    /// serves every record written while the previous one ran). Without it
    /// a record is stored once written to the OS, which survives a process
    /// crash but not a machine crash.
    pub fsync: bool,
    /// Least time between the starts of two `fdatasync`s (default 2 ms).
    /// A record written while the spool is quiet is flushed at once; under
    /// load the flushes are paced so that each serves every record of the
    /// interval: one `fdatasync` cost ≈ 115 µs of CPU on this project's VMs
    /// (and 0.4–1.5 ms of wall time), which, paid per handful of records,
    /// cost more than the whole decision. Zero flushes as often as records
    /// come.
    pub flush_interval: std::time::Duration,
}

impl SpoolConfig {
    /// The defaults for a spool in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            segment_bytes: segment_bytes_for(DEFAULT_MAX_BYTES),
            fsync: true,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
        }
    }

    /// Bounds the spool at `max_bytes` (and sizes segments for it).
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self.segment_bytes = segment_bytes_for(max_bytes);
        self
    }
}

fn segment_bytes_for(max: u64) -> u64 {
    (max / 8).clamp(4 * 1024, 16 * 1024 * 1024)
}

/// A spool that cannot be opened, written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The file system refused.
    #[error("decision spool {path}: {what}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The spool was edited, truncated or reordered: its chain does not hold.
    #[error("decision spool {path}: damaged or tampered with: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What does not hold, and where.
        what: String,
    },
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> SpoolError {
    SpoolError::Corrupt {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Counters and positions of a spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpoolStats {
    /// The stream id.
    pub stream: String,
    /// The last entry written (0: none).
    pub head_seq: u64,
    /// The last entry the remote node acknowledged (0: none).
    pub shipped_seq: u64,
    /// Bytes of the segments on disk.
    pub used_bytes: u64,
    /// The bound.
    pub max_bytes: u64,
    /// Segments on disk.
    pub segments: usize,
    /// Group commits: `fdatasync`s (with `fsync`), else writes.
    pub commits: u64,
    /// Records written.
    pub records: u64,
    /// Records refused because the spool was full.
    pub rejected_full: u64,
    /// Batches the remote node acknowledged.
    pub batches_shipped: u64,
    /// Failed shipping attempts (each retried).
    pub ship_failures: u64,
    /// The last shipping failure, if the last attempt failed.
    pub last_ship_error: Option<String>,
    /// Bytes of an incomplete last line cut off at open (a crash mid-write).
    pub torn_tail_bytes: u64,
    /// Why the spool refuses every record (a damaged chain, a failed rollback).
    pub broken: Option<String>,
}

/// Where the shipper reads next.
#[derive(Debug, Clone)]
pub(crate) struct ReadPos {
    seg_first: u64,
    offset: u64,
    next_seq: u64,
    prev: String,
}

impl ReadPos {
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// One segment file. `bytes` and `last_seq` are what is durable (what the
/// shipper may read); the active segment's written end is [`append::Writer`]'s.
struct Segment {
    first_seq: u64,
    last_seq: u64,
    bytes: u64,
    path: PathBuf,
}

struct State {
    segments: VecDeque<Segment>,
    /// The last durable entry.
    head_seq: u64,
    head_hash: String,
    /// Bytes of entries written to all segments on disk (the bound).
    used: u64,
    shipped_seq: u64,
    resume: ReadPos,
    broken: Option<String>,
    last_ship_error: Option<String>,
    /// The active segment and the written (not yet durable) head.
    writer: append::Writer,
    /// Every [`Spool`] handle is gone: the flusher ends.
    closed: bool,
    /// The flusher waits for a first written entry (an append wakes it);
    /// false while it flushes or paces (see [`SpoolConfig::flush_interval`]).
    flusher_idle: bool,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    records: AtomicU64,
    rejected_full: AtomicU64,
    batches_shipped: AtomicU64,
    ship_failures: AtomicU64,
    torn_tail_bytes: AtomicU64,
}

pub(crate) struct Shared {
    cfg: SpoolConfig,
    stream: String,
    state: Mutex<State>,
    /// Wakes the flusher when something was written.
    written: Condvar,
    /// How far the entries are durable (waiters of [`DecisionSink::commit`]).
    durable: tokio::sync::watch::Sender<flush::Durable>,
    spare: Arc<Mutex<append::Spare>>,
    counters: Counters,
    /// Signalled when entries became durable up to [`Shared::ship_wake_at`]
    /// (the shipper waits on it).
    pub(crate) committed: tokio::sync::Notify,
    /// The durable seq at which the shipper wants [`Shared::committed`]: the
    /// first entry when it has none, a full batch when it is waiting out
    /// its interval. Not waking it per record keeps a task wake and a timer
    /// off every decision.
    pub(crate) ship_wake_at: AtomicU64,
    /// Signalled after every acknowledged batch.
    shipped: tokio::sync::Notify,
    ship_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Ends the flusher and the ship task when the last [`Spool`] handle goes.
struct Life(Arc<Shared>);

impl Drop for Life {
    fn drop(&mut self) {
        self.0.state.lock().closed = true;
        self.0.written.notify_all();
        if let Some(t) = self.0.ship_task.lock().take() {
            t.abort();
        }
    }
}

/// The durable, bounded, hash-chained decision spool (see the module docs).
/// Cheap to clone; the flusher thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    _life: Arc<Life>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.cfg.dir)
            .field("stream", &self.shared.stream)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Cursor {
    seq: u64,
    hash: String,
}

const STREAM_FILE: &str = "stream";
const CURSOR_FILE: &str = "cursor.json";

fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.jsonl")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".jsonl")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn valid_stream_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync the directory.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp, "create"))?;
    f.write_all(bytes).map_err(io(&tmp, "write"))?;
    f.sync_all().map_err(io(&tmp, "fsync"))?;
    fs::rename(&tmp, path).map_err(io(path, "rename"))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync the directory"))
}

impl Spool {
    /// Opens (or creates) the spool in `cfg.dir`, checks every segment's
    /// chain against the shipping cursor, and starts the committer thread.
    ///
    /// # Errors
    /// [`SpoolError::Io`] if the directory or a file cannot be created or
    /// read; [`SpoolError::Corrupt`] if the chain does not hold (see the
    /// module docs): the spool must be inspected, not silently reused.
    pub fn open(cfg: SpoolConfig) -> Result<Spool, SpoolError> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(io(&dir, "create the directory"))?;
        let stream = open_stream_id(&dir)?;
        let cursor = read_cursor(&dir)?;
        let scan = scan::scan(&dir, &stream, &cursor, true)?;
        let counters = Counters::default();
        counters
            .torn_tail_bytes
            .store(scan.torn_tail_bytes, Ordering::Relaxed);
        let mut segments = scan.segments;
        let spare = append::Spare::discard_stale(&dir);
        let writer = match segments.back() {
            Some(last) => append::Writer::resume(&cfg, last, &scan.head_hash)?,
            None => {
                let first = scan.head_seq + 1;
                let (writer, seg) = append::Writer::create(&cfg, first, &scan.head_hash, 0, None)?;
                segments.push_back(seg);
                writer
            }
        };
        let used = segments.iter().map(|s| s.bytes).sum();
        let resume = scan.resume.unwrap_or_else(|| {
            let last = segments.back();
            ReadPos {
                seg_first: last.map_or(1, |s| s.first_seq),
                offset: last.map_or(0, |s| s.bytes),
                next_seq: scan.head_seq + 1,
                prev: scan.head_hash.clone(),
            }
        });
        let (durable, _) = tokio::sync::watch::channel(flush::Durable {
            seq: scan.head_seq,
            failed: None,
        });
        let fsync = cfg.fsync;
        let shared = Arc::new(Shared {
            stream,
            state: Mutex::new(State {
                segments,
                head_seq: scan.head_seq,
                head_hash: scan.head_hash,
                used,
                shipped_seq: cursor.seq,
                resume,
                broken: None,
                last_ship_error: None,
                writer,
                closed: false,
                flusher_idle: false,
            }),
            written: Condvar::new(),
            durable,
            spare: Arc::new(Mutex::new(spare)),
            counters,
            committed: tokio::sync::Notify::new(),
            ship_wake_at: AtomicU64::new(0),
            shipped: tokio::sync::Notify::new(),
            ship_task: Mutex::new(None),
            cfg,
        });
        shared.prepare_spare();
        if fsync {
            let flusher = shared.clone();
            std::thread::Builder::new()
                .name("elevate-decision-spool".into())
                .spawn(move || flusher.run_flusher())
                .map_err(io(&dir, "start the flusher thread"))?;
        }
        Ok(Spool {
            _life: Arc::new(Life(shared.clone())),
            shared,
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.shared.cfg.dir
    }

    /// The stream id (made when the spool was created).
    pub fn stream(&self) -> &str {
        &self.shared.stream
    }

    /// Counters and positions.
    pub fn stats(&self) -> SpoolStats {
        let st = self.shared.state.lock();
        let c = &self.shared.counters;
        SpoolStats {
            stream: self.shared.stream.clone(),
            head_seq: st.head_seq,
            shipped_seq: st.shipped_seq,
            used_bytes: st.used,
            max_bytes: self.shared.cfg.max_bytes,
            segments: st.segments.len(),
            commits: c.commits.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            rejected_full: c.rejected_full.load(Ordering::Relaxed),
            batches_shipped: c.batches_shipped.load(Ordering::Relaxed),
            ship_failures: c.ship_failures.load(Ordering::Relaxed),
            last_ship_error: st.last_ship_error.clone(),
            torn_tail_bytes: c.torn_tail_bytes.load(Ordering::Relaxed),
            broken: st.broken.clone(),
        }
    }

    /// Waits until every entry written before the call has been shipped, or
    /// `timeout` passed; returns whether it was.
    pub async fn wait_shipped(&self, timeout: std::time::Duration) -> bool {
        let target = self.shared.state.lock().head_seq;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.shipped.notified();
            if self.shared.state.lock().shipped_seq >= target {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.shared.state.lock().shipped_seq >= target;
            }
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn sink_error(&self, reason: String) -> SinkError {
        SinkError {
            sink: format!("spool {}", self.shared.cfg.dir.display()),
            reason,
        }
    }
}

impl DecisionSink for Spool {
    fn record(&self, rec: &DecisionRecord) -> Result<(), SinkError> {
        let appended = self.append(rec)?;
        if appended.durable {
            return Ok(());
        }
        futures::executor::block_on(self.shared.wait_durable(appended.seq))
            .map_err(|r| self.sink_error(r))
    }

    fn commit<'a>(&'a self, rec: &'a DecisionRecord) -> BoxFuture<'a, Result<(), SinkError>> {
        let appended = self.append(rec);
        Box::pin(async move {
            let appended = appended?;
            if appended.durable {
                return Ok(());
            }
            self.shared
                .wait_durable(appended.seq)
                .await
                .map_err(|r| self.sink_error(r))
        })
    }

    fn spool(&self) -> Option<Spool> {
        Some(self.clone())
    }
}

impl Spool {
    /// Serializes, chains and writes `rec` on the caller's thread.
    fn append(&self, rec: &DecisionRecord) -> Result<append::Appended, SinkError> {
        let json = serde_json::to_vec(rec).map_err(|e| self.sink_error(e.to_string()))?;
        self.shared.append(&json).map_err(|r| self.sink_error(r))
    }
}

fn open_stream_id(dir: &Path) -> Result<String, SpoolError> {
    let path = dir.join(STREAM_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => {
            let s = s.trim().to_string();
            if valid_stream_id(&s) {
                Ok(s)
            } else {
                Err(corrupt(&path, "the stream id is not 1-64 of [A-Za-z0-9_-]"))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::now_v7().to_string();
            write_atomic(dir, &path, format!("{id}\n").as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(io(&path, "read")(e)),
    }
}

fn read_cursor(dir: &Path) -> Result<Cursor, SpoolError> {
    let path = dir.join(CURSOR_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let c: Cursor = serde_json::from_slice(&bytes)
                .map_err(|e| corrupt(&path, format!("not a cursor: {e}")))?;
            if !chain::is_sha256_hex(&c.hash) {
                return Err(corrupt(&path, "the cursor's hash is not a SHA-256 in hex"));
            }
            Ok(c)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Cursor {
            seq: 0,
            hash: String::new(),
        }),
        Err(e) => Err(io(&path, "read")(e)),
    }
}

impl Shared {
    pub(crate) fn stream(&self) -> &str {
        &self.stream
    }

    pub(crate) fn head_seq(&self) -> u64 {
        self.state.lock().head_seq
    }

    pub(crate) fn resume_pos(&self) -> ReadPos {
        self.state.lock().resume.clone()
    }

    /// Refuses every record from now on (a damaged chain found while shipping).
    pub(crate) fn mark_broken(&self, reason: String) {
        let mut st = self.state.lock();
        if st.broken.is_none() {
            st.broken = Some(reason);
        }
    }

    pub(crate) fn note_ship_failure(&self, error: Option<String>) {
        if error.is_some() {
            self.counters.ship_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.state.lock().last_ship_error = error;
    }

    pub(crate) fn set_ship_task(&self, task: tokio::task::JoinHandle<()>) -> bool {
        let mut t = self.ship_task.lock();
        if t.as_ref().is_some_and(|t| !t.is_finished()) {
            task.abort();
            return false;
        }
        *t = Some(task);
        true
    }

    pub(crate) fn stop_ship_task(&self) {
        if let Some(t) = self.ship_task.lock().take() {
            t.abort();
        }
    }
}

mod append;
mod flush;
mod read;
mod scan;
#[cfg(test)]
mod tests;

pub use scan::verify_dir;
