//! Messages async-nats cannot read, dead-lettered from the stream.
//!
//! async-nats 0.51 parses the header block of every `HMSG` in its connection
//! task (`Connection::try_read_op`). A header block that is not UTF-8, a
//! header line without `:`, a header name with a space or a non-ASCII byte, or
//! a version line other than `NATS/1.0` is an I/O error there: the client drops
//! the connection and reconnects, and the message never reaches the
//! subscriber. A bare CR inside a value is worse: `HeaderValue::from(String)`
//! asserts, the connection task panics and the client is dead for good. A
//! version line with a status (`NATS/1.0 408`) parses, but the message is then
//! taken for a server status and never handed out as a message. The server
//! accepts all of these from any publisher (it does not parse header blocks),
//! so one such message on a guarded subject used to be redelivered every
//! `ack_wait`, forever, disturbing the consumer's connection each time.
//!
//! The JetStream guard cannot receive such a message, so it reads it from the
//! stream instead: the stream API's `STREAM.MSG.GET` answers with JSON and the
//! header block base64-encoded, which async-nats does not parse. A sweep runs
//! when the guard starts, after every reconnect of the client and every
//! [`UnreadableMessages::every`]: it reads the consumer's window of delivered,
//! possibly unacknowledged messages (from the ack floor up to the last
//! delivered stream sequence), checks each header block with [`refusal`] (the
//! rules of async-nats 0.51's parser, mirrored), and for each one async-nats
//! refuses: records a decision, publishes a dead letter (reason
//! [`MALFORMED_MESSAGE`], its headers made representable, see
//! [`readable_headers`]), and only once the dead letter is stored terminates
//! the message (`+TERM` on its ack subject, rebuilt from the stream sequence).
//! A failed step leaves the message for the next sweep.
//!
//! What stays: the first delivery of such a message still costs the client one
//! reconnect (async-nats offers no hook before its parser), and messages that
//! were in the same read buffer behind it are redelivered after `ack_wait`.
//! A bare CR kills the client: the guard then ends with
//! [`crate::Error::ClientClosed`], and a guard restarted on a new client
//! dead-letters the message in its first sweep, before it pulls anything.

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::RawMessage;
use async_nats::jetstream::{self, ErrorCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use elevate_core::message::{Headers, InboundMessage};
use elevate_core::settle::{Processor, TransportError};

use crate::headers::NATS_MSG_ID;

/// The reason code dead letters of unreadable messages carry (`ztauth-reason`).
pub const MALFORMED_MESSAGE: &str = "malformed-message";

/// Dead-letter header: what async-nats refused, and which headers were escaped.
pub use elevate_core::deadletter::H_MALFORMED;

/// Dead-letter header name for a header line that has no usable name.
pub const H_MALFORMED_LINE: &str = "ztauth-malformed-line";

/// Why async-nats 0.51 cannot deliver a message with a given header block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The block is not UTF-8: async-nats drops the connection.
    #[error("header block is not UTF-8 (byte {byte:#04x} at offset {offset})")]
    NotUtf8 {
        /// Offset of the first invalid byte in the block.
        offset: usize,
        /// That byte.
        byte: u8,
    },
    /// The block is empty or does not start with `NATS/1.0`: async-nats drops the connection.
    #[error("header block does not start with NATS/1.0")]
    BadVersionLine,
    /// The version line carries a status or description: async-nats either
    /// drops the connection (unparsable status) or takes the message for a
    /// server status (a pull consumer never hands it out).
    #[error("header version line carries a status: {0:?}")]
    Status(String),
    /// A header line has no `:`: async-nats drops the connection.
    #[error("header line {line} has no ':'")]
    NoColon {
        /// 1-based line number after the version line.
        line: usize,
    },
    /// A name async-nats refuses (empty is allowed; space, control character,
    /// non-ASCII or DEL is not): async-nats drops the connection.
    #[error("header name {0:?} is not a valid NATS header name")]
    InvalidName(String),
    /// A value with a bare CR: async-nats 0.51 panics in its connection task
    /// (`HeaderValue::from(String)` asserts) and the client stops for good.
    #[error("value of header {0:?} contains a bare CR")]
    BareCarriageReturn(String),
}

/// Checks a header block (`NATS/1.0\r\n...\r\n\r\n`, as stored) the way
/// async-nats 0.51's `Connection::try_read_op` parses an `HMSG`; `None` when
/// async-nats delivers the message as a plain message.
///
/// Mirrors async-nats 0.51.0 `src/connection.rs` lines 334-394; check it again
/// when async-nats is upgraded (a parser that accepts more only makes this
/// stricter than needed: such messages are then dead-lettered, never lost).
pub fn refusal(block: &[u8]) -> Option<Refusal> {
    let text = match std::str::from_utf8(block) {
        Ok(t) => t,
        Err(e) => {
            let offset = e.valid_up_to();
            return Some(Refusal::NotUtf8 {
                offset,
                byte: block.get(offset).copied().unwrap_or_default(),
            });
        }
    };
    let mut lines = text.lines().peekable();
    let suffix = lines
        .next()
        .and_then(|v| v.strip_prefix("NATS/1.0"))
        .map(str::trim);
    let Some(suffix) = suffix else {
        return Some(Refusal::BadVersionLine);
    };
    if !suffix.is_empty() {
        return Some(Refusal::Status(suffix.to_string()));
    }
    let mut n = 0;
    while let Some(line) = lines.next() {
        n += 1;
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Some(Refusal::NoColon { line: n });
        };
        if HeaderName::from_str(name).is_err() {
            return Some(Refusal::InvalidName(name.to_string()));
        }
        let mut value = value.trim_start().to_owned();
        while let Some(v) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            n += 1;
            value.push_str(v);
        }
        value.truncate(value.trim_end().len());
        if HeaderValue::from_str(&value).is_err() {
            return Some(Refusal::BareCarriageReturn(name.to_string()));
        }
    }
    None
}

/// Headers of a header block async-nats refused, made representable in NATS
/// so that the dead letter can be published (names ASCII without `:`, values
/// UTF-8 without CR/LF) and credential headers are still found by name.
///
/// The version line (`NATS/...`) is dropped (the refusal says what it was). Continuation
/// lines are joined to their header with one space. Per line, name and value
/// are split at the first `:` and trimmed of ASCII whitespace; a line whose
/// trimmed name and value are valid is kept as is; otherwise its name and
/// value are percent-encoded (every byte that is not printable ASCII or valid
/// non-control UTF-8, and `%` itself, becomes `%XX`), and a line without `:`
/// or with an empty name is kept whole under [`H_MALFORMED_LINE`]. Returns the
/// headers and the names of the escaped ones.
pub fn readable_headers(block: &[u8]) -> (Headers, Vec<String>) {
    let mut joined: Vec<Vec<u8>> = Vec::new();
    let mut lines = block
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .peekable();
    // the version line; a block without one keeps its first line as a header
    let _ = lines.next_if(|l| l.starts_with(b"NATS/"));
    for line in lines {
        if line.trim_ascii().is_empty() {
            continue;
        }
        if matches!(line.first(), Some(b' ' | b'\t'))
            && let Some(last) = joined.last_mut()
        {
            last.push(b' ');
            last.extend_from_slice(line.trim_ascii());
            continue;
        }
        joined.push(line.to_vec());
    }
    let mut out = Headers::new();
    let mut escaped = Vec::new();
    for line in &joined {
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => (line[..i].trim_ascii(), line[i + 1..].trim_ascii()),
            None => (&[][..], line.trim_ascii()),
        };
        let clean_name = std::str::from_utf8(name)
            .ok()
            .filter(|n| !n.is_empty() && HeaderName::from_str(n).is_ok());
        let clean_value = std::str::from_utf8(value)
            .ok()
            .filter(|v| HeaderValue::from_str(v).is_ok());
        match (clean_name, clean_value) {
            (Some(n), Some(v)) => out.append(n, v),
            _ if name.is_empty() => {
                escaped.push(H_MALFORMED_LINE.to_string());
                out.append(H_MALFORMED_LINE, escape_value(line));
            }
            _ => {
                let n = escape_name(name);
                escaped.push(n.clone());
                out.append(n, escape_value(value));
            }
        }
    }
    (out, escaped)
}

/// `%XX` for every byte outside printable ASCII, and for `%` and `:`.
fn escape_name(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for &b in name {
        if b.is_ascii_graphic() && b != b'%' && b != b':' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Valid UTF-8 text kept; `%XX` for invalid bytes, control characters and `%`.
fn escape_value(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for chunk in value.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' || c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "%{b:02X}");
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Whether `subject` matches the NATS subject filter `filter` (`*`, `>`).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// How the JetStream guard finds and dead-letters messages async-nats cannot
/// read (module docs); give it to [`crate::GuardedConsumer::unreadable`].
#[derive(Clone)]
pub struct UnreadableMessages {
    js: jetstream::Context,
    every: Duration,
    limit: usize,
}

impl std::fmt::Debug for UnreadableMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnreadableMessages")
            .field("every", &self.every)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Stream reads (`STREAM.MSG.GET` requests).
    pub read: usize,
    /// Stream sequences dead-lettered and terminated.
    pub dead_lettered: Vec<u64>,
}

/// A sweep stopped; whatever it had not settled is left for the next sweep.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SweepError {
    /// The consumer's info could not be read.
    #[error("consumer info: {0}")]
    ConsumerInfo(String),
    /// A stored message could not be read or decoded.
    #[error("reading stream sequence {seq}: {reason}")]
    Read {
        /// Stream sequence.
        seq: u64,
        /// What failed.
        reason: String,
    },
    /// The decision could not be recorded: nothing published, nothing terminated.
    #[error("recording the decision for stream sequence {seq}: {reason}")]
    DecisionLog {
        /// Stream sequence.
        seq: u64,
        /// What the decision sink said.
        reason: String,
    },
    /// The dead-letter publisher does not store what it confirms: nothing is terminated.
    #[error("dead letters of unreadable messages must go to a JetStream stream")]
    NotDurable,
    /// The dead letter was not confirmed: the message is not terminated.
    #[error("dead letter for stream sequence {seq}: {error}")]
    DeadLetter {
        /// Stream sequence.
        seq: u64,
        /// The publisher's failure.
        error: TransportError,
    },
    /// The dead letter is stored but the server did not confirm the `+TERM`.
    #[error("terminating stream sequence {seq}: {reason}")]
    Term {
        /// Stream sequence.
        seq: u64,
        /// What failed.
        reason: String,
    },
}

#[derive(serde::Deserialize)]
struct MsgGet {
    message: RawMessage,
}

/// How long the server has to confirm a `+TERM`.
const TERM_TIMEOUT: Duration = Duration::from_secs(5);

impl UnreadableMessages {
    /// Reads stored messages through `js`, which must be a context on the
    /// client the consumer was created from (its reconnects trigger a sweep);
    /// dead letters go through the guard's processor, whose publisher must be
    /// durable ([`crate::NatsDeadLetters::jetstream`]: the message is
    /// terminated once its dead letter is stored).
    ///
    /// The client needs to publish on `$JS.API.STREAM.MSG.GET.<stream>` and
    /// `$JS.API.CONSUMER.INFO.<stream>.<consumer>` besides its acks.
    pub fn new(js: jetstream::Context) -> Self {
        UnreadableMessages {
            js,
            every: Duration::from_secs(30),
            limit: 1000,
        }
    }

    /// Also sweeps this often without a reconnect (a message the server no
    /// longer redelivers, a sweep that failed); default 30 s.
    pub fn every(mut self, d: Duration) -> Self {
        self.every = d.max(Duration::from_millis(100));
        self
    }

    /// At most `n` stream reads per sweep (from the ack floor up); default 1,000.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n.max(1);
        self
    }

    /// How many times the client has connected so far.
    fn connects(&self) -> u64 {
        self.js
            .client()
            .statistics()
            .connects
            .load(Ordering::Relaxed)
    }

    /// Runs one sweep of `consumer`'s delivered, unacknowledged window now:
    /// every message in it async-nats refuses is dead-lettered (decision
    /// recorded through `processor`'s guard) and terminated.
    ///
    /// # Errors
    ///
    /// Returns [`SweepError::NotDurable`] if `processor`'s dead letters are not durable,
    /// [`SweepError::ConsumerInfo`] if the consumer's info cannot be read, [`SweepError::Read`] if
    /// a stored message cannot be read or decoded, [`SweepError::DeadLetter`] if the dead letter
    /// is not confirmed, and [`SweepError::Term`] if the server does not confirm the `+TERM`.
    /// Messages dead-lettered before the failing one stay so; the failing one is not terminated.
    pub async fn sweep(
        &self,
        consumer: &PullConsumer,
        processor: &Processor,
    ) -> Result<Swept, SweepError> {
        if !processor.dead_letters_durable() {
            return Err(SweepError::NotDurable);
        }
        let info = consumer
            .get_info()
            .await
            .map_err(|e| SweepError::ConsumerInfo(e.to_string()))?;
        let mut swept = Swept::default();
        if info.num_ack_pending == 0 {
            return Ok(swept);
        }
        let mut filters: Vec<&str> = info
            .config
            .filter_subjects
            .iter()
            .map(String::as_str)
            .collect();
        if !info.config.filter_subject.is_empty() {
            filters.push(&info.config.filter_subject);
        }
        let next_by = match filters.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        let last = info.delivered.stream_sequence;
        let mut seq = info.ack_floor.stream_sequence.saturating_add(1);
        while seq <= last && swept.read < self.limit {
            swept.read += 1;
            let Some(stored) = self.read(&info.stream_name, seq, next_by).await? else {
                if next_by.is_some() {
                    break;
                }
                seq += 1;
                continue;
            };
            if stored.sequence > last || stored.sequence < seq {
                break;
            }
            seq = stored.sequence + 1;
            if !filters.is_empty() && !filters.iter().any(|f| subject_matches(f, &stored.subject)) {
                continue;
            }
            let Some(encoded) = stored.headers.as_deref().filter(|h| !h.is_empty()) else {
                continue;
            };
            let block = STANDARD.decode(encoded).map_err(|e| SweepError::Read {
                seq: stored.sequence,
                reason: format!("headers are not base64: {e}"),
            })?;
            let Some(refusal) = refusal(&block) else {
                continue;
            };
            self.dead_letter(
                &info.stream_name,
                &info.name,
                &stored,
                &block,
                &refusal,
                processor,
            )
            .await?;
            swept.dead_lettered.push(stored.sequence);
        }
        Ok(swept)
    }

    /// The stored message at `seq` (or the next one on `next_by`); `None` when there is none.
    async fn read(
        &self,
        stream: &str,
        seq: u64,
        next_by: Option<&str>,
    ) -> Result<Option<RawMessage>, SweepError> {
        let request = match next_by {
            Some(subject) => serde_json::json!({ "seq": seq, "next_by_subj": subject }),
            None => serde_json::json!({ "seq": seq }),
        };
        let response: Response<MsgGet> = self
            .js
            .request(format!("STREAM.MSG.GET.{stream}"), &request)
            .await
            .map_err(|e| SweepError::Read {
                seq,
                reason: e.to_string(),
            })?;
        match response {
            Response::Ok(MsgGet { message }) => Ok(Some(message)),
            Response::Err { error } if error.error_code() == ErrorCode::NO_MESSAGE_FOUND => {
                Ok(None)
            }
            Response::Err { error } => Err(SweepError::Read {
                seq,
                reason: error.to_string(),
            }),
        }
    }

    /// Records the decision, stores the dead letter, then terminates the message.
    async fn dead_letter(
        &self,
        stream: &str,
        consumer: &str,
        stored: &RawMessage,
        block: &[u8],
        refusal: &Refusal,
        processor: &Processor,
    ) -> Result<(), SweepError> {
        let seq = stored.sequence;
        let payload = STANDARD
            .decode(&stored.payload)
            .map_err(|e| SweepError::Read {
                seq,
                reason: format!("payload is not base64: {e}"),
            })?;
        let (headers, escaped) = readable_headers(block);
        let mut detail = format!("{MALFORMED_MESSAGE}: {refusal}");
        if !escaped.is_empty() {
            let _ = write!(detail, "; percent-encoded: {}", escaped.join(", "));
        }
        let detail = escape_value(detail.as_bytes());
        let message_id = headers.get_str(NATS_MSG_ID).map(str::to_string);
        // The server's delivery count is not in the stream; this is not a delivery.
        let mut msg = InboundMessage::new(
            crate::jetstream::stream_coordinates(stream, seq, &stored.subject),
            stored.subject.clone(),
            headers,
            Bytes::from(payload),
        );
        msg.message_id = message_id;
        msg.published_at_ms = i64::try_from(stored.time.unix_timestamp_nanos() / 1_000_000).ok();
        let id = processor
            .dead_letter_malformed(&msg, &detail)
            .await
            .map_err(|error| SweepError::DeadLetter { seq, error })?;
        tracing::warn!(stream, consumer, seq, subject = %stored.subject, decision_id = %id, %refusal,
            "message async-nats cannot read: dead-lettered {MALFORMED_MESSAGE} from the stream");
        self.terminate(stream, consumer, seq).await
    }

    /// `+TERM` on the message's ack subject, rebuilt in the v1 form
    /// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`
    /// (every server since 2.2 subscribes to it): the server settles the
    /// pending message by its stream sequence and takes the consumer sequence
    /// from its own pending record, so the other numbers are placeholders.
    async fn terminate(&self, stream: &str, consumer: &str, seq: u64) -> Result<(), SweepError> {
        let subject = format!("$JS.ACK.{stream}.{consumer}.1.{seq}.0.0.0");
        let term: Bytes = jetstream::AckKind::Term.into();
        let client = self.js.client();
        match tokio::time::timeout(TERM_TIMEOUT, client.request(subject, term)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(SweepError::Term {
                seq,
                reason: e.to_string(),
            }),
            Err(_) => Err(SweepError::Term {
                seq,
                reason: "no confirmation from the server".into(),
            }),
        }
    }
}

/// When the guard sweeps: at start, after a reconnect, and every `every`.
pub(crate) struct Sweeper {
    config: UnreadableMessages,
    connects: u64,
    last: Option<Instant>,
}

impl Sweeper {
    pub(crate) fn new(config: UnreadableMessages) -> Self {
        Sweeper {
            connects: config.connects(),
            config,
            last: None,
        }
    }

    pub(crate) fn due(&self) -> bool {
        match self.last {
            None => true,
            Some(at) => {
                self.config.connects() != self.connects || at.elapsed() >= self.config.every
            }
        }
    }

    /// Why the client stopped for good (its connection task is gone, so every
    /// command fails at once), or `None` while it is alive or reconnecting.
    pub(crate) async fn client_closed(&self) -> Option<String> {
        use async_nats::client::FlushErrorKind;
        let client = self.config.js.client();
        match tokio::time::timeout(Duration::from_millis(200), client.flush()).await {
            Ok(Err(e)) if e.kind() == FlushErrorKind::SendError => Some(e.to_string()),
            _ => None,
        }
    }

    /// Sweeps once; a failure is logged and retried at the next trigger.
    pub(crate) async fn run(&mut self, consumer: &PullConsumer, processor: &Processor) {
        // read before sweeping: a reconnect during the sweep triggers another
        self.connects = self.config.connects();
        self.last = Some(Instant::now());
        match self.config.sweep(consumer, processor).await {
            Ok(s) if !s.dead_lettered.is_empty() => {
                tracing::info!(read = s.read, dead_lettered = ?s.dead_lettered, "unreadable messages dead-lettered")
            }
            Ok(s) => tracing::debug!(read = s.read, "sweep: no unreadable message"),
            Err(e) => {
                tracing::warn!(error = %e, "sweep for unreadable messages failed: retried at the next reconnect or interval")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::to_nats_headers;

    #[test]
    fn what_async_nats_reads_is_not_refused() {
        for block in [
            &b"NATS/1.0\r\n\r\n"[..],
            b"NATS/1.0\r\nX-A: 1\r\nNats-Msg-Id: abc\r\n\r\n",
            b"NATS/1.0 \r\nX: v\r\n\r\n",
            b"NATS/1.0\r\nX: folded\r\n  on two lines\r\n\r\n",
            b"NATS/1.0\r\n: empty name\r\n\r\n",
            b"NATS/1.0\r\nX: trailing cr\r\r\n\r\n",
            "NATS/1.0\r\nX: caf\u{e9} \u{1f600}\r\n\r\n".as_bytes(),
            b"NATS/1.0\nX: bare newlines\n\n",
        ] {
            assert_eq!(refusal(block), None, "{:?}", String::from_utf8_lossy(block));
        }
    }

    #[test]
    fn every_class_async_nats_refuses() {
        let cases: [(&[u8], Refusal); 9] = [
            (
                b"NATS/1.0\r\nX-Bad: \xff\r\n\r\n",
                Refusal::NotUtf8 {
                    offset: 17,
                    byte: 0xff,
                },
            ),
            (b"", Refusal::BadVersionLine),
            (b"NATS/2.0\r\nX: v\r\n\r\n", Refusal::BadVersionLine),
            (b"HTTP/1.1\r\n\r\n", Refusal::BadVersionLine),
            (b"NATS/1.0 abc\r\n\r\n", Refusal::Status("abc".into())),
            (
                b"NATS/1.0 408 Request Timeout\r\n\r\n",
                Refusal::Status("408 Request Timeout".into()),
            ),
            (b"NATS/1.0\r\nX-Bad\r\n\r\n", Refusal::NoColon { line: 1 }),
            (
                b"NATS/1.0\r\nX Bad: v\r\n\r\n",
                Refusal::InvalidName("X Bad".into()),
            ),
            (
                b"NATS/1.0\r\nX: a\rb\r\n\r\n",
                Refusal::BareCarriageReturn("X".into()),
            ),
        ];
        for (block, want) in cases {
            assert_eq!(
                refusal(block),
                Some(want),
                "{:?}",
                String::from_utf8_lossy(block)
            );
        }
        // a trailing space before ':' or a continuation at the start is a bad name too
        assert!(matches!(
            refusal(b"NATS/1.0\r\nAuthorization : x\r\n\r\n"),
            Some(Refusal::InvalidName(_))
        ));
        assert!(matches!(
            refusal(b"NATS/1.0\r\n X: v\r\n\r\n"),
            Some(Refusal::InvalidName(_))
        ));
        assert!(matches!(
            refusal("NATS/1.0\r\nNa\u{ef}ve: v\r\n\r\n".as_bytes()),
            Some(Refusal::InvalidName(_))
        ));
        // a truncated UTF-8 sequence at the very end is reported, not a panic
        assert!(matches!(
            refusal(b"NATS/1.0\r\nX: \xe2\x82"),
            Some(Refusal::NotUtf8 { offset: 13, .. })
        ));
    }

    #[test]
    fn readable_headers_can_be_published_and_keep_credentials_by_name() {
        let block = b"NATS/1.0 408\r\nX-Bad: \xff\xfe ok\r\nAuthorization : Bearer opaque\r\nNats-Msg-Id: m-1\r\nno colon \x01 here\r\nX Sp\xc3\xa9: 100%\r\nX-Fold: a\r\n\tb\r\nX-Cr: a\rb\r\n\r\n";
        let (headers, escaped) = readable_headers(block);
        assert!(to_nats_headers(&headers).is_ok(), "{headers:?}");
        assert_eq!(headers.get_str("x-bad"), Some("%FF%FE ok"));
        assert_eq!(headers.get_str("authorization"), Some("Bearer opaque"));
        assert_eq!(headers.get_str(NATS_MSG_ID), Some("m-1"));
        assert_eq!(headers.get_str(H_MALFORMED_LINE), Some("no colon %01 here"));
        assert_eq!(headers.get_str("X%20Sp%C3%A9"), Some("100%25"));
        assert_eq!(headers.get_str("x-fold"), Some("a b"));
        assert_eq!(headers.get_str("x-cr"), Some("a%0Db"));
        assert_eq!(
            escaped,
            vec!["X-Bad", H_MALFORMED_LINE, "X%20Sp%C3%A9", "X-Cr"]
        );
        // without a version line, the first line is a header like the others
        let (headers, _) = readable_headers(b"X-First: 1\r\nX-Second: \xff\r\n\r\n");
        assert_eq!(headers.get_str("x-first"), Some("1"));
        assert_eq!(headers.get_str("x-second"), Some("%FF"));
        // the credential policy finds the credential by name, so the dead letter drops it
        let policy = elevate_core::strip::CredentialPolicy::default();
        let mut stripped = headers.clone();
        policy.strip_headers(&mut stripped);
        assert!(stripped.get("authorization").is_none());
    }

    #[test]
    fn escaping_is_reversible_text() {
        assert_eq!(
            escape_value("caf\u{e9} 50% \u{1}".as_bytes()),
            "caf\u{e9} 50%25 %01"
        );
        assert_eq!(escape_value(b"\xff\r\n"), "%FF%0D%0A");
        assert_eq!(escape_name(b"a:b%\xff"), "a%3Ab%25%FF");
    }

    #[test]
    fn subject_filters() {
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
    }
}
