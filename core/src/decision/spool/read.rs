//! The shipper's side of the spool: reading batches from the cursor (every
//! link checked again) and moving the cursor once a batch is acknowledged.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::{CURSOR_FILE, Cursor, ReadPos, Shared, SpoolError, corrupt, io, write_atomic};
use crate::decision::chain::{self, Batch};

impl Shared {
    /// Reads the next batch at `pos` (at most `max_records` entries and
    /// about `max_bytes`), checking every link; advances `pos`.
    pub(crate) fn read_batch(
        &self,
        pos: &mut ReadPos,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Batch, SpoolError> {
        let segments: Vec<(u64, PathBuf, u64)> = {
            let st = self.state.lock();
            st.segments
                .iter()
                .filter(|s| s.first_seq >= pos.seg_first)
                .map(|s| (s.first_seq, s.path.clone(), s.bytes))
                .collect()
        };
        let first_seq = pos.next_seq;
        let prev = pos.prev.clone();
        let mut entries: Vec<Vec<u8>> = Vec::new();
        let mut total = 0usize;
        let max_records = max_records.max(1);
        'segments: for (first, path, committed) in segments {
            if first > pos.seg_first {
                if first != pos.next_seq {
                    return Err(corrupt(
                        &path,
                        format!("starts at seq {first}, {} expected", pos.next_seq),
                    ));
                }
                pos.seg_first = first;
                pos.offset = 0;
            } else if first < pos.seg_first {
                continue;
            }
            while pos.offset < committed {
                let room = committed - pos.offset;
                let want = room.min(max_bytes.max(64 * 1024) as u64);
                let mut chunk = read_range(&path, pos.offset, want)?;
                if !chunk.contains(&b'\n') && want < room {
                    chunk = read_range(&path, pos.offset, room)?;
                }
                let mut at = 0usize;
                let mut progressed = false;
                while let Some(n) = chunk[at..].iter().position(|b| *b == b'\n') {
                    let line = &chunk[at..at + n];
                    if !entries.is_empty()
                        && (entries.len() >= max_records || total + line.len() > max_bytes)
                    {
                        break 'segments;
                    }
                    let h = chain::parse_entry(line)
                        .map_err(|e| corrupt(&path, format!("seq {}: {e}", pos.next_seq)))?;
                    if h.stream != self.stream || h.seq != pos.next_seq || h.prev != pos.prev {
                        return Err(corrupt(
                            &path,
                            format!(
                                "seq {}: does not link to the entry before it (edited after it was written)",
                                pos.next_seq
                            ),
                        ));
                    }
                    entries.push(line.to_vec());
                    total += line.len() + 1;
                    pos.offset += (n + 1) as u64;
                    pos.next_seq += 1;
                    pos.prev = h.hash;
                    at += n + 1;
                    progressed = true;
                }
                if !progressed {
                    return Err(corrupt(
                        &path,
                        format!(
                            "seq {}: no complete entry where one was written",
                            pos.next_seq
                        ),
                    ));
                }
                if entries.len() >= max_records {
                    break 'segments;
                }
            }
        }
        Ok(Batch::new(
            self.stream.clone(),
            first_seq,
            prev,
            pos.prev.clone(),
            entries,
        ))
    }

    /// The remote node acknowledged `batch`: persist the cursor, delete the
    /// segments it completed (never the active one).
    pub(crate) fn mark_shipped(&self, batch: &Batch) -> Result<(), SpoolError> {
        let dir = &self.cfg.dir;
        let cursor = serde_json::to_vec(&Cursor {
            seq: batch.last_seq(),
            hash: batch.last_hash().to_string(),
        })
        .map_err(|e| corrupt(dir, e.to_string()))?;
        write_atomic(dir, &dir.join(CURSOR_FILE), &cursor)?;
        let mut removed = Vec::new();
        {
            let mut st = self.state.lock();
            st.shipped_seq = batch.last_seq();
            st.last_ship_error = None;
            while st.segments.len() > 1
                && st
                    .segments
                    .front()
                    .is_some_and(|s| s.last_seq <= batch.last_seq())
            {
                if let Some(s) = st.segments.pop_front() {
                    st.used -= s.bytes;
                    removed.push(s.path);
                }
            }
        }
        self.counters
            .batches_shipped
            .fetch_add(1, Ordering::Relaxed);
        self.shipped.notify_waiters();
        for p in removed {
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!(target: "elevate::decision", path = %p.display(), error = %e, "decision spool: cannot delete a shipped segment");
            }
        }
        Ok(())
    }
}

fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, SpoolError> {
    let mut f = File::open(path).map_err(io(path, "open to ship"))?;
    f.seek(SeekFrom::Start(offset)).map_err(io(path, "seek"))?;
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(len)
        .read_to_end(&mut buf)
        .map_err(io(path, "read to ship"))?;
    Ok(buf)
}
