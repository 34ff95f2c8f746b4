//! Opening a spool: walking every segment's chain against the cursor, and
//! the read-only check of a spool directory.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::path::Path;

use super::{
    CURSOR_FILE, Cursor, ReadPos, STREAM_FILE, Segment, SpoolError, SpoolStats, append, corrupt,
    io, parse_segment_name, read_cursor, segment_name, valid_stream_id,
};
use crate::decision::chain;

pub(super) struct Scan {
    pub(super) segments: VecDeque<Segment>,
    pub(super) head_seq: u64,
    pub(super) head_hash: String,
    pub(super) resume: Option<ReadPos>,
    pub(super) torn_tail_bytes: u64,
}

/// Walks every segment's chain (see the module docs for what is refused).
pub(super) fn scan(
    dir: &Path,
    stream: &str,
    cursor: &Cursor,
    repair: bool,
) -> Result<Scan, SpoolError> {
    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir, "list"))? {
        let entry = entry.map_err(io(dir, "list"))?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    let genesis = chain::genesis(stream);
    let mut out = Scan {
        segments: VecDeque::new(),
        head_seq: cursor.seq,
        head_hash: if cursor.seq == 0 {
            genesis.clone()
        } else {
            cursor.hash.clone()
        },
        resume: None,
        torn_tail_bytes: 0,
    };
    let mut expected_seq = 0u64;
    let mut prev: Option<String> = None;
    let mut cursor_seen = cursor.seq == 0;
    let count = firsts.len();
    for (i, first) in firsts.into_iter().enumerate() {
        let path = dir.join(segment_name(first));
        let last_segment = i + 1 == count;
        if i == 0 {
            expected_seq = first;
            if first == 0 {
                return Err(corrupt(&path, "a segment cannot start at seq 0"));
            }
            prev = if first == 1 {
                Some(genesis.clone())
            } else if cursor.seq + 1 == first {
                Some(cursor.hash.clone())
            } else if cursor.seq + 1 < first {
                return Err(corrupt(
                    &path,
                    format!(
                        "entries {}..={} are missing: removed before they were shipped",
                        cursor.seq + 1,
                        first - 1
                    ),
                ));
            } else {
                // The cursor lies inside this segment: its hash is checked there.
                None
            };
        } else if first != expected_seq {
            return Err(corrupt(
                &path,
                format!(
                    "the segment starts at seq {first}, the previous one ends at {}: a segment is missing",
                    expected_seq - 1
                ),
            ));
        }
        let mut bytes = fs::read(&path).map_err(io(&path, "read"))?;
        // Entries never hold a NUL byte: the first one ends the segment (a
        // preallocated segment is zero-filled past its entries). Anything
        // but zeros after it is what a crash leaves in the last segment (a
        // later page of an entry reached the disk, an earlier one did not),
        // and an edit anywhere else.
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let stray_end = bytes[end..]
            .iter()
            .rposition(|b| *b != 0)
            .map(|i| (end + i + 1) as u64);
        if stray_end.is_some() && !last_segment {
            return Err(corrupt(
                &path,
                format!("bytes after the segment's end (offset {end}): edited"),
            ));
        }
        bytes.truncate(end);
        let mut torn_end = stray_end;
        let mut offset = 0usize;
        let mut line_no = 0usize;
        while offset < bytes.len() {
            line_no += 1;
            let (line, complete) = match bytes[offset..].iter().position(|b| *b == b'\n') {
                Some(n) => (&bytes[offset..offset + n], true),
                None => (&bytes[offset..], false),
            };
            let line_len = line.len();
            let head = chain::parse_entry(line);
            let links = match &head {
                Ok(h) => {
                    h.stream == stream
                        && h.seq == expected_seq
                        && prev.as_ref().is_none_or(|p| *p == h.prev)
                }
                Err(_) => false,
            };
            if !complete {
                if !last_segment {
                    return Err(corrupt(
                        &path,
                        "the segment does not end with a complete entry: truncated",
                    ));
                }
                if !links {
                    // A crash during the last write: never acknowledged.
                    torn_end = Some(torn_end.unwrap_or(0).max(bytes.len() as u64));
                    bytes.truncate(offset);
                    break;
                }
                // A complete entry whose newline did not make it.
                if repair {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io(&path, "open to end the last line"))?;
                    append::write_all_at(&f, b"\n", bytes.len() as u64)
                        .and_then(|()| f.sync_all())
                        .map_err(io(&path, "end the last line"))?;
                }
                bytes.push(b'\n');
            }
            let h = head.map_err(|e| corrupt(&path, format!("line {line_no}: {e}")))?;
            if h.stream != stream {
                return Err(corrupt(
                    &path,
                    format!("line {line_no}: entry of stream {}, not {stream}", h.stream),
                ));
            }
            if h.seq != expected_seq {
                return Err(corrupt(
                    &path,
                    format!(
                        "line {line_no}: seq {} where {expected_seq} was expected: an entry was removed or reordered",
                        h.seq
                    ),
                ));
            }
            if !links {
                return Err(corrupt(
                    &path,
                    format!(
                        "line {line_no} (seq {}): does not link to the entry before it: edited, or an entry was removed",
                        h.seq
                    ),
                ));
            }
            if h.seq == cursor.seq {
                if h.hash != cursor.hash {
                    return Err(corrupt(
                        &path,
                        format!("seq {}: changed after it was shipped", h.seq),
                    ));
                }
                cursor_seen = true;
            }
            if h.seq == cursor.seq + 1 {
                out.resume = Some(ReadPos {
                    seg_first: first,
                    offset: offset as u64,
                    next_seq: h.seq,
                    prev: h.prev.clone(),
                });
            }
            offset += line_len + 1;
            expected_seq += 1;
            out.head_seq = h.seq;
            out.head_hash = h.hash.clone();
            prev = Some(h.hash);
        }
        if let Some(torn_end) = torn_end.filter(|e| *e > offset as u64) {
            let torn = torn_end - offset as u64;
            tracing::warn!(target: "elevate::decision", path = %path.display(), bytes = torn, "decision spool: cutting off an incomplete last entry (a crash during a write, or a truncated file)");
            out.torn_tail_bytes = torn;
            if repair {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path, "open to cut the torn tail"))?;
                append::zero_fill(&f, offset as u64, torn_end)
                    .and_then(|()| f.sync_all())
                    .map_err(io(&path, "cut the torn tail"))?;
            }
        }
        out.segments.push_back(Segment {
            first_seq: first,
            last_seq: expected_seq - 1,
            bytes: offset as u64,
            path,
        });
    }
    if !cursor_seen && out.head_seq < cursor.seq {
        return Err(corrupt(
            &dir.join(CURSOR_FILE),
            format!(
                "seq {} was shipped but the spool ends at seq {}: truncated",
                cursor.seq, out.head_seq
            ),
        ));
    }
    Ok(out)
}

/// Checks a spool directory without opening it for writing (the command
/// line's `decisions verify DIR`): the same walk as [`Spool::open`], but a
/// torn tail is reported, not cut off.
///
/// # Errors
/// As [`Spool::open`]; a torn tail is [`SpoolError::Corrupt`] here.
pub fn verify_dir(dir: &Path) -> Result<SpoolStats, SpoolError> {
    let stream = {
        let path = dir.join(STREAM_FILE);
        let s = fs::read_to_string(&path).map_err(io(&path, "read"))?;
        let s = s.trim().to_string();
        if !valid_stream_id(&s) {
            return Err(corrupt(&path, "the stream id is not 1-64 of [A-Za-z0-9_-]"));
        }
        s
    };
    let cursor = read_cursor(dir)?;
    let scan = scan(dir, &stream, &cursor, false)?;
    if scan.torn_tail_bytes > 0 {
        return Err(corrupt(
            dir,
            format!(
                "the last segment ends in {} bytes that are not a complete entry (a crash during a write, or truncated)",
                scan.torn_tail_bytes
            ),
        ));
    }
    Ok(SpoolStats {
        stream,
        head_seq: scan.head_seq,
        shipped_seq: cursor.seq,
        used_bytes: scan.segments.iter().map(|s| s.bytes).sum(),
        max_bytes: 0,
        segments: scan.segments.len(),
        commits: 0,
        records: 0,
        rejected_full: 0,
        batches_shipped: 0,
        ship_failures: 0,
        last_ship_error: None,
        torn_tail_bytes: 0,
        broken: None,
    })
}
