//! The decision chain: the format of a spooled (and shipped) decision, its
//! hash chain, batches, and the receiver-side check that walks a chain.
//!
//! Every decision becomes one *entry*, one JSON line:
//!
//! ```json
//! {"v":1,"stream":"0193…","seq":42,"prev":"<hex SHA-256 of entry 41's line>","record":{…}}
//! ```
//!
//! `stream` names the spool that wrote it (one per workload instance, made
//! when the spool is created), `seq` counts from 1 without holes, and `prev`
//! is the SHA-256 of the exact bytes of the previous entry's line (for
//! `seq` 1, of `elevate-decision-chain/v1\n<stream>`). An entry's hash is the
//! SHA-256 of its own line, so every entry commits to everything before it:
//! a removed, inserted, reordered or edited entry breaks the next link.
//!
//! A *batch* is a run of consecutive entries shipped together, as a JSON
//! array of the entries' exact lines. Its first entry's `prev` is the hash of
//! the previous batch's last entry, so each batch carries the SHA-256 of
//! the one before it and the receiver detects a gap between batches as well
//! as inside one. Entries are identified by `(stream, seq)`: a re-shipped
//! entry is byte-identical, so the receiver drops it as a duplicate.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::RangeInclusive;

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// The entry format version this crate writes and reads.
pub const ENTRY_VERSION: u32 = 1;

/// The `prev` of a stream's first entry: SHA-256 of
/// `elevate-decision-chain/v1\n<stream>`, so a chain is bound to its stream.
pub fn genesis(stream: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"elevate-decision-chain/v1\n");
    h.update(stream.as_bytes());
    hex::encode(h.finalize())
}

/// The hash of one entry: SHA-256 of its line (without the newline), lowercase hex.
pub fn entry_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// Writes entry `seq` of `stream` around an already serialized
/// [`crate::decision::DecisionRecord`] (`record_json`) into `out`.
pub(crate) fn write_entry(
    out: &mut Vec<u8>,
    stream: &str,
    seq: u64,
    prev: &str,
    record_json: &[u8],
) {
    // The stream id and hashes are plain ASCII (checked when a spool is
    // opened), so no escaping is needed; the record is JSON already.
    let _ = write!(
        out,
        "{{\"v\":{ENTRY_VERSION},\"stream\":\"{stream}\",\"seq\":{seq},\"prev\":\"{prev}\",\"record\":"
    );
    out.extend_from_slice(record_json);
    out.push(b'}');
}

/// The chain fields of an entry, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHead {
    /// The stream that wrote it.
    pub stream: String,
    /// Its position in the stream, from 1.
    pub seq: u64,
    /// Hash of the previous entry (or [`genesis`]).
    pub prev: String,
    /// The decision id inside the record.
    pub decision_id: String,
    /// Hash of this entry's line.
    pub hash: String,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    v: u32,
    #[serde(borrow)]
    stream: std::borrow::Cow<'a, str>,
    seq: u64,
    #[serde(borrow)]
    prev: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    record: &'a RawValue,
}

#[derive(Deserialize)]
struct RecordId {
    decision_id: String,
}

/// An entry that is not one: not JSON, an unknown version, fields missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed decision entry: {0}")]
pub struct MalformedEntry(pub String);

/// Reads the chain fields of one entry line.
///
/// # Errors
/// [`MalformedEntry`] if the line is not a version-1 entry holding a
/// record with a `decision_id`, or its `prev` is not a SHA-256 in hex.
pub fn parse_entry(line: &[u8]) -> Result<EntryHead, MalformedEntry> {
    let raw: RawEntry<'_> =
        serde_json::from_slice(line).map_err(|e| MalformedEntry(e.to_string()))?;
    if raw.v != ENTRY_VERSION {
        return Err(MalformedEntry(format!("unknown entry version {}", raw.v)));
    }
    if !is_sha256_hex(&raw.prev) {
        return Err(MalformedEntry("`prev` is not a SHA-256 in hex".into()));
    }
    if raw.seq == 0 {
        return Err(MalformedEntry("`seq` starts at 1".into()));
    }
    let id: RecordId = serde_json::from_str(raw.record.get())
        .map_err(|e| MalformedEntry(format!("record: {e}")))?;
    Ok(EntryHead {
        stream: raw.stream.into_owned(),
        seq: raw.seq,
        prev: raw.prev.into_owned(),
        decision_id: id.decision_id,
        hash: entry_hash(line),
    })
}

/// The decision record inside an entry line.
///
/// # Errors
/// [`MalformedEntry`] if the line is not an entry or its record does not parse.
pub fn entry_record(line: &[u8]) -> Result<crate::decision::DecisionRecord, MalformedEntry> {
    let raw: RawEntry<'_> =
        serde_json::from_slice(line).map_err(|e| MalformedEntry(e.to_string()))?;
    serde_json::from_str(raw.record.get()).map_err(|e| MalformedEntry(format!("record: {e}")))
}

/// Whether `s` is 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A run of consecutive entries of one stream, shipped as one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    stream: String,
    first_seq: u64,
    prev: String,
    last_hash: String,
    entries: Vec<Vec<u8>>,
    bytes: usize,
}

impl Batch {
    /// A batch of `entries` (exact lines, without newlines) starting at
    /// `first_seq`, whose first entry links to `prev`, ending with the entry
    /// hashed `last_hash`. Only the spool reader builds one (after checking
    /// the links).
    pub(crate) fn new(
        stream: String,
        first_seq: u64,
        prev: String,
        last_hash: String,
        entries: Vec<Vec<u8>>,
    ) -> Self {
        let bytes = entries.iter().map(|e| e.len() + 1).sum::<usize>() + 1;
        Batch {
            stream,
            first_seq,
            prev,
            last_hash,
            entries,
            bytes,
        }
    }

    /// The stream the entries belong to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The first entry's `seq`.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The last entry's `seq`.
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.entries.len().saturating_sub(1) as u64
    }

    /// The hash of the entry before this batch (the previous batch's last
    /// entry, or the stream's [`genesis`]).
    pub fn prev(&self) -> &str {
        &self.prev
    }

    /// The hash of this batch's last entry (the next batch's `prev`).
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// The entries' exact lines.
    pub fn entries(&self) -> &[Vec<u8>] {
        &self.entries
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The batch's idempotency key, `<stream>:<first seq>-<last seq>`
    /// (HTTP `Idempotency-Key`, JetStream `Nats-Msg-Id`, a Kafka header).
    /// Entries are de-duplicated by `(stream, seq)` in any case, since a
    /// batch re-cut after a restart may span other entries.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}-{}", self.stream, self.first_seq, self.last_seq())
    }

    /// The decision ids in the batch, in order (each entry's record's
    /// `decision_id`; a disposition record shares its decision's id).
    pub fn decision_ids(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|e| parse_entry(e).ok().map(|h| h.decision_id))
            .collect()
    }

    /// The JSON array of the entries' exact lines (what a receiver hashes).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes);
        out.push(b'[');
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(e);
        }
        out.push(b']');
        out
    }

    /// [`Batch::to_json`], gzipped (the HTTP shipper's body).
    ///
    /// # Errors
    /// The encoder's I/O error (none in practice: it writes to memory).
    pub fn to_gzip_json(&self) -> std::io::Result<Vec<u8>> {
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(self.bytes / 4),
            flate2::Compression::fast(),
        );
        enc.write_all(&self.to_json())?;
        enc.finish()
    }
}

/// What a receiver learnt about one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// The stream.
    pub stream: String,
    /// Lowest and highest `seq` received (0, 0 when none).
    pub first_seq: u64,
    /// Highest `seq` received.
    pub last_seq: u64,
    /// Distinct entries received.
    pub entries: u64,
    /// Entries received again, byte-identical (at-least-once shipping).
    pub duplicates: u64,
    /// Missing runs of `seq` (from 1 to the highest received).
    pub gaps: Vec<RangeInclusive<u64>>,
    /// Entries whose `prev` is not the hash of the entry before them (an
    /// edited, reordered or forged entry; checked where both are present).
    pub broken_links: Vec<u64>,
    /// Positions received twice with different contents (a rewritten spool).
    pub conflicts: Vec<u64>,
}

impl StreamReport {
    /// No gap, no broken link, no conflict.
    pub fn is_intact(&self) -> bool {
        self.gaps.is_empty() && self.broken_links.is_empty() && self.conflicts.is_empty()
    }
}

/// What a receiver learnt about every stream it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainReport {
    /// One report per stream, ordered by stream id.
    pub streams: Vec<StreamReport>,
    /// Lines or batches that were not entries, with why.
    pub malformed: Vec<String>,
}

impl ChainReport {
    /// Every stream intact and nothing malformed.
    pub fn is_intact(&self) -> bool {
        self.malformed.is_empty() && self.streams.iter().all(StreamReport::is_intact)
    }

    /// Total duplicates over every stream.
    pub fn duplicates(&self) -> u64 {
        self.streams.iter().map(|s| s.duplicates).sum()
    }
}

impl std::fmt::Display for ChainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.streams {
            write!(
                f,
                "stream {}: seq {}..={}, {} entries, {} duplicates",
                s.stream, s.first_seq, s.last_seq, s.entries, s.duplicates
            )?;
            if s.is_intact() {
                writeln!(f, ": intact")?;
            } else {
                writeln!(
                    f,
                    ": gaps {:?}, broken links at {:?}, conflicts at {:?}",
                    s.gaps, s.broken_links, s.conflicts
                )?;
            }
        }
        for m in &self.malformed {
            writeln!(f, "malformed: {m}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct StreamState {
    /// seq → (hash, prev)
    entries: BTreeMap<u64, (String, String)>,
    duplicates: u64,
    conflicts: Vec<u64>,
}

/// The receiver-side check: feed it every batch (or entry) received, in
/// any order and with duplicates, then ask for the [`ChainReport`].
#[derive(Default)]
pub struct ChainVerifier {
    streams: BTreeMap<String, StreamState>,
    malformed: Vec<String>,
}

impl ChainVerifier {
    /// An empty verifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one entry line; a malformed one is counted in the report.
    pub fn add_entry(&mut self, line: &[u8]) {
        match parse_entry(line) {
            Ok(head) => self.add_head(head),
            Err(e) => self.malformed.push(e.to_string()),
        }
    }

    /// Adds one shipped batch (a JSON array of entries); a batch that is not
    /// one is counted as malformed.
    pub fn add_batch(&mut self, json_array: &[u8]) {
        match serde_json::from_slice::<Vec<&RawValue>>(json_array) {
            Ok(entries) => {
                for e in entries {
                    self.add_entry(e.get().as_bytes());
                }
            }
            Err(e) => self
                .malformed
                .push(format!("batch is not a JSON array: {e}")),
        }
    }

    /// Adds a gzipped batch (the HTTP body).
    pub fn add_gzip_batch(&mut self, gz: &[u8]) {
        let mut json = Vec::new();
        match std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut json) {
            Ok(_) => self.add_batch(&json),
            Err(e) => self.malformed.push(format!("batch is not gzip: {e}")),
        }
    }

    /// Adds what a receiver stored: a gzipped batch (the HTTP body as
    /// received), or lines that are each a batch (a JSON array: one
    /// Kafka or JetStream message per line) or an entry.
    pub fn add_stored(&mut self, bytes: &[u8]) {
        if bytes.starts_with(&[0x1f, 0x8b]) {
            return self.add_gzip_batch(bytes);
        }
        for line in bytes.split(|b| *b == b'\n') {
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            if line.starts_with(b"[") {
                self.add_batch(line);
            } else {
                self.add_entry(line);
            }
        }
    }

    fn add_head(&mut self, head: EntryHead) {
        let s = self.streams.entry(head.stream).or_default();
        match s.entries.get(&head.seq) {
            Some((hash, _)) if *hash == head.hash => s.duplicates += 1,
            Some(_) => s.conflicts.push(head.seq),
            None => {
                s.entries.insert(head.seq, (head.hash, head.prev));
            }
        }
    }

    /// Walks every stream's chain from seq 1: gaps, broken links, conflicts.
    pub fn report(&self) -> ChainReport {
        let streams = self
            .streams
            .iter()
            .map(|(stream, s)| {
                let mut gaps = Vec::new();
                let mut broken = Vec::new();
                let mut expected_seq = 1u64;
                let mut expected_prev = Some(genesis(stream));
                for (&seq, (hash, prev)) in &s.entries {
                    if seq > expected_seq {
                        gaps.push(expected_seq..=seq - 1);
                        expected_prev = None;
                    }
                    if let Some(p) = &expected_prev
                        && p != prev
                    {
                        broken.push(seq);
                    }
                    expected_seq = seq + 1;
                    expected_prev = Some(hash.clone());
                }
                let mut conflicts = s.conflicts.clone();
                conflicts.sort_unstable();
                conflicts.dedup();
                StreamReport {
                    stream: stream.clone(),
                    first_seq: s.entries.keys().next().copied().unwrap_or(0),
                    last_seq: s.entries.keys().next_back().copied().unwrap_or(0),
                    entries: s.entries.len() as u64,
                    duplicates: s.duplicates,
                    gaps,
                    broken_links: broken,
                    conflicts,
                }
            })
            .collect();
        ChainReport {
            streams,
            malformed: self.malformed.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(stream: &str, n: u64) -> Vec<Vec<u8>> {
        let mut prev = genesis(stream);
        (1..=n)
            .map(|seq| {
                let mut line = Vec::new();
                let rec = format!(r#"{{"decision_id":"d{seq}"}}"#);
                write_entry(&mut line, stream, seq, &prev, rec.as_bytes());
                prev = entry_hash(&line);
                line
            })
            .collect()
    }

    fn batch(stream: &str, lines: &[Vec<u8>], first: u64) -> Batch {
        let prev = parse_entry(&lines[0]).unwrap().prev;
        let last = entry_hash(lines.last().unwrap());
        Batch::new(stream.into(), first, prev, last, lines.to_vec())
    }

    #[test]
    fn an_intact_chain_with_duplicates_is_intact() {
        let lines = chain("s", 10);
        let mut v = ChainVerifier::new();
        v.add_batch(&batch("s", &lines[0..4], 1).to_json());
        v.add_batch(&batch("s", &lines[2..7], 3).to_json());
        v.add_gzip_batch(&batch("s", &lines[7..10], 8).to_gzip_json().unwrap());
        let r = v.report();
        assert!(r.is_intact(), "{r}");
        assert_eq!(r.streams[0].entries, 10);
        assert_eq!(r.duplicates(), 2);
    }

    #[test]
    fn a_gap_a_broken_link_and_a_conflict_are_reported() {
        let lines = chain("s", 10);
        let mut v = ChainVerifier::new();
        for l in lines[0..3].iter().chain(&lines[5..10]) {
            v.add_entry(l);
        }
        let r = v.report();
        assert_eq!(r.streams[0].gaps, vec![4..=5]);
        assert!(!r.is_intact());

        let mut edited = lines.clone();
        let text = String::from_utf8(edited[4].clone()).unwrap();
        edited[4] = text.replace("d5", "d6").into_bytes();
        let mut v = ChainVerifier::new();
        for l in &edited {
            v.add_entry(l);
        }
        v.add_entry(&lines[4]);
        let r = v.report();
        // entry 6 no longer links to the edited 5; the original 5 conflicts
        assert_eq!(r.streams[0].broken_links, vec![6]);
        assert_eq!(r.streams[0].conflicts, vec![5]);
    }

    #[test]
    fn malformed_input_is_reported_not_trusted() {
        let mut v = ChainVerifier::new();
        v.add_batch(b"{not an array");
        v.add_entry(br#"{"v":1,"stream":"s","seq":1,"prev":"zz","record":{"decision_id":"x"}}"#);
        v.add_gzip_batch(b"plain");
        let r = v.report();
        assert_eq!(r.malformed.len(), 3);
        assert!(!r.is_intact());
    }
}
