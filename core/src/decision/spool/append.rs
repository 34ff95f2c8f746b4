//! Writing entries: chaining a record onto the written head, writing it in
//! place into the active segment, and moving to a new preallocated segment
//! (the spare, zero-filled in the background) when the next entry does not
//! fit.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Segment, Shared, SpoolConfig, SpoolError, State, io, segment_name, sync_dir};
use crate::decision::chain;

/// The prepared segment's file name (never a segment name: those are
/// `seg-<20 digits>.jsonl`).
pub(super) const SPARE_FILE: &str = "spare";

/// The active segment and the head of what was written to it.
pub(super) struct Writer {
    pub(super) file: Arc<File>,
    /// Bytes of entries in the active segment.
    pub(super) offset: u64,
    /// Its preallocated length: an entry that would end past it goes to a new segment.
    capacity: u64,
    /// The last entry written, durable or not.
    pub(super) seq: u64,
    pub(super) hash: String,
}

impl Writer {
    /// Starts segment `first` (whose first entry links to `prev_hash`),
    /// preallocated to at least `needed` bytes: the spare file if one is
    /// given, else a new file zero-filled now.
    pub(super) fn create(
        cfg: &SpoolConfig,
        first: u64,
        prev_hash: &str,
        needed: u64,
        spare: Option<PathBuf>,
    ) -> Result<(Writer, Segment), SpoolError> {
        let dir = &cfg.dir;
        let path = dir.join(segment_name(first));
        let capacity = cfg.segment_bytes.max(needed);
        let from_spare = spare.and_then(|s| match fs::rename(&s, &path) {
            Ok(()) => Some(()),
            Err(e) => {
                tracing::warn!(target: "elevate::decision", path = %s.display(), error = %e, "decision spool: cannot use the spare segment; zero-filling a new one");
                None
            }
        });
        let file = if from_spare.is_some() {
            OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path, "open a segment"))?
        } else {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io(&path, "create a segment"))?;
            zero_fill(&f, 0, capacity)
                .and_then(|()| f.sync_all())
                .map_err(io(&path, "preallocate a segment"))?;
            f
        };
        let capacity = file
            .metadata()
            .map_err(io(&path, "read a segment's size"))?
            .len();
        sync_dir(dir)?;
        let writer = Writer {
            file: Arc::new(file),
            offset: 0,
            capacity,
            seq: first - 1,
            hash: prev_hash.to_string(),
        };
        let segment = Segment {
            first_seq: first,
            last_seq: first - 1,
            bytes: 0,
            path,
        };
        Ok((writer, segment))
    }

    /// Goes on writing the last segment found at open (its entries end at
    /// `last.bytes`, zeros follow: the scan made sure), zero-filling it up to
    /// `segment_bytes` if it is shorter (a spool written before segments were
    /// preallocated, or a file cut at a crash).
    pub(super) fn resume(
        cfg: &SpoolConfig,
        last: &Segment,
        head_hash: &str,
    ) -> Result<Writer, SpoolError> {
        let path = &last.path;
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path, "open the active segment"))?;
        let len = file.metadata().map_err(io(path, "read its size"))?.len();
        let capacity = len.max(cfg.segment_bytes);
        if len < capacity {
            zero_fill(&file, len, capacity)
                .and_then(|()| file.sync_all())
                .map_err(io(path, "preallocate the active segment"))?;
        }
        Ok(Writer {
            file: Arc::new(file),
            offset: last.bytes,
            capacity,
            seq: last.last_seq,
            hash: head_hash.to_string(),
        })
    }
}

/// What [`Shared::append`] did with a record.
pub(super) struct Appended {
    /// Its position in the stream.
    pub(super) seq: u64,
    /// Stored already (no `fsync` configured, or a segment change flushed it).
    pub(super) durable: bool,
}

/// The background-prepared segment.
pub(super) enum Spare {
    /// None ready and none being made.
    Missing,
    /// A thread is zero-filling one.
    Preparing,
    /// `spare` holds a zero-filled file of this many bytes.
    Ready(u64),
}

impl Spare {
    /// Removes what an earlier process left (a spare it made, or half of
    /// one): this spool makes its own.
    pub(super) fn discard_stale(dir: &Path) -> Spare {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name == SPARE_FILE || (name.starts_with("spare-") && name.ends_with(".tmp")) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Spare::Missing
    }
}

impl Shared {
    /// Chains `json` onto the written head and writes it (moving to a new
    /// segment first when it does not fit); refuses it when the spool is
    /// full, broken or closed. Runs on the caller's task: one `pwrite`.
    pub(super) fn append(&self, json: &[u8]) -> Result<Appended, String> {
        let cfg = &self.cfg;
        let mut st = self.state.lock();
        if let Some(b) = &st.broken {
            return Err(b.clone());
        }
        if st.closed {
            return Err("the spool is closed".into());
        }
        let seq = st.writer.seq + 1;
        let mut buf = Vec::with_capacity(json.len() + 200);
        chain::write_entry(&mut buf, &self.stream, seq, &st.writer.hash, json);
        let hash = chain::entry_hash(&buf);
        buf.push(b'\n');
        let len = buf.len() as u64;
        let all_shipped = st.shipped_seq >= st.writer.seq;
        let mut flushed = false;
        if st.writer.offset + len > st.writer.capacity
            || (st.writer.offset > 0 && all_shipped && st.used + len > cfg.max_bytes)
        {
            if let Err(e) = self.next_segment(&mut st, len) {
                let head = st.head_seq;
                drop(st);
                self.publish_durable(head);
                return Err(format!("cannot start a new segment: {e}"));
            }
            flushed = true;
        }
        if st.used + len > cfg.max_bytes {
            self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
            let err = format!(
                "the spool is full ({} of {} bytes; shipped up to seq {} of {}): waiting for the remote node",
                st.used, cfg.max_bytes, st.shipped_seq, st.writer.seq
            );
            let head = st.head_seq;
            drop(st);
            if flushed {
                self.publish_durable(head);
            }
            return Err(err);
        }
        let at = st.writer.offset;
        if let Err(e) = write_all_at(&st.writer.file, &buf, at) {
            let reason = format!("write failed: {e}");
            // Zero what part of it reached the file, so that no later, shorter
            // entry is followed by its remains.
            if let Err(e2) = zero_fill(&st.writer.file, at, at + len) {
                st.broken = Some(format!(
                    "{reason}; zeroing the partial write failed too: {e2}"
                ));
            }
            return Err(reason);
        }
        st.writer.offset += len;
        st.writer.seq = seq;
        st.writer.hash = hash;
        st.used += len;
        self.counters.records.fetch_add(1, Ordering::Relaxed);
        if cfg.fsync {
            let head = st.head_seq;
            let wake = st.flusher_idle || seq - head >= super::FLUSH_GROUP_MAX;
            drop(st);
            if wake {
                self.written.notify_one();
            }
            if flushed {
                self.publish_durable(head);
            }
            return Ok(Appended {
                seq,
                durable: false,
            });
        }
        mark_durable(&mut st);
        drop(st);
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.publish_durable(seq);
        Ok(Appended { seq, durable: true })
    }

    /// Closes the active segment at its last entry (flushed first: entries
    /// of a closed segment are durable) and starts the next one, taking the
    /// spare when it is big enough; deletes the closed segments already shipped.
    fn next_segment(&self, st: &mut State, needed: u64) -> Result<(), SpoolError> {
        let path = st
            .segments
            .back()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        if self.cfg.fsync
            && let Err(e) = st.writer.file.sync_data()
        {
            let reason =
                format!("fdatasync failed: {e}; the spool refuses records until it is reopened");
            st.broken = Some(reason);
            return Err(io(&path, "flush the active segment")(e));
        }
        mark_durable(st);
        if st.writer.capacity > st.writer.offset {
            match st.writer.file.set_len(st.writer.offset) {
                Ok(()) => st.writer.capacity = st.writer.offset,
                // Harmless: a segment's zero tail is not an entry.
                Err(e) => {
                    tracing::warn!(target: "elevate::decision", path = %path.display(), error = %e, "decision spool: cannot cut a closed segment to its entries");
                }
            }
        }
        let first = st.writer.seq + 1;
        let spare = self.take_spare(needed);
        let (writer, segment) = Writer::create(&self.cfg, first, &st.writer.hash, needed, spare)?;
        st.writer = writer;
        st.segments.push_back(segment);
        let shipped = st.shipped_seq;
        let mut removed = Vec::new();
        while st.segments.len() > 1 && st.segments.front().is_some_and(|s| s.last_seq <= shipped) {
            if let Some(s) = st.segments.pop_front() {
                st.used -= s.bytes;
                removed.push(s.path);
            }
        }
        for p in removed {
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!(target: "elevate::decision", path = %p.display(), error = %e, "decision spool: cannot delete a shipped segment");
            }
        }
        self.prepare_spare();
        Ok(())
    }

    fn take_spare(&self, needed: u64) -> Option<PathBuf> {
        let mut spare = self.spare.lock();
        match *spare {
            Spare::Ready(len) if len >= needed => {
                *spare = Spare::Missing;
                Some(self.cfg.dir.join(SPARE_FILE))
            }
            _ => None,
        }
    }

    /// Starts zero-filling the next segment on a thread of its own, unless
    /// one is ready or being made.
    pub(super) fn prepare_spare(&self) {
        let mut spare = self.spare.lock();
        if !matches!(*spare, Spare::Missing) {
            return;
        }
        *spare = Spare::Preparing;
        let slot = self.spare.clone();
        let dir = self.cfg.dir.clone();
        let len = self.cfg.segment_bytes;
        let started = std::thread::Builder::new()
            .name("elevate-spool-spare".into())
            .spawn(move || {
                let made = make_spare(&dir, len);
                if let Err(e) = &made {
                    tracing::warn!(target: "elevate::decision", dir = %dir.display(), error = %e, "decision spool: cannot prepare the next segment; it will be zero-filled when needed");
                }
                *slot.lock() = made.map_or(Spare::Missing, |()| Spare::Ready(len));
            });
        if started.is_err() {
            *spare = Spare::Missing;
        }
    }
}

/// The active segment's written entries are durable: the shipper may read them.
pub(super) fn mark_durable(st: &mut State) {
    let (seq, offset) = (st.writer.seq, st.writer.offset);
    if seq > st.head_seq {
        st.head_seq = seq;
        st.head_hash.clone_from(&st.writer.hash);
        if let Some(s) = st.segments.back_mut() {
            s.bytes = offset;
            s.last_seq = seq;
        }
    }
}

/// Writes a zero-filled `spare` of `len` bytes (through a temporary file, so
/// that `spare` is always whole).
fn make_spare(dir: &Path, len: u64) -> Result<(), SpoolError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("spare-{}-{n}.tmp", std::process::id()));
    let made = File::create(&tmp)
        .and_then(|f| zero_fill(&f, 0, len).and_then(|()| f.sync_all()))
        .map_err(io(&tmp, "zero-fill a spare segment"))
        .and_then(|()| fs::rename(&tmp, dir.join(SPARE_FILE)).map_err(io(&tmp, "rename")));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
}

/// Writes zeros over `[from, to)` of `file`.
pub(super) fn zero_fill(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(usize::try_from(to.saturating_sub(from)).unwrap_or(CHUNK))];
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).map_or(zeros.len(), |r| r.min(zeros.len()));
        write_all_at(file, &zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Writes all of `buf` at `offset` (`pwrite`: no shared file position).
pub(super) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_write(file, buf, offset) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
