//! Dead-letter publishing: to a JetStream dead-letter stream (waits for the
//! stream's ack) or, where no JetStream is available, to a plain subject
//! (waits for the server to have received it; core NATS cannot confirm more).
//!
//! Letters always fit: [`NatsDeadLetters::measure`] sizes a letter against
//! the server's `max_payload` (headers and payload together) and the header
//! block limit, and core trims it (`elevate_core::deadletter::fit`); a
//! payload too large for a letter goes to a JetStream Object Store bucket
//! (the claim check, default [`DEFAULT_CLAIM_BUCKET`]) under the letter's
//! idempotency key. Each letter's `Nats-Msg-Id` is its idempotency key, so
//! the stream's duplicate window drops a second letter of the same original.

use async_nats::Client;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use elevate_core::Headers;
use elevate_core::deadletter::{DeadLetter, Excess, PayloadAt};
use elevate_core::settle::{DeadLetterPublisher, TransportError};
use tokio::sync::OnceCell;

use crate::headers::{NATS_MSG_ID, to_nats_headers};

/// Header: the original message's `Nats-Msg-Id`, kept when the dead letter gets its own.
pub const H_ORIGINAL_MSG_ID: &str = "ztauth-original-msg-id";

/// The Object Store bucket that takes payloads too large for a dead letter.
pub const DEFAULT_CLAIM_BUCKET: &str = "ELEVATE_CLAIMS";

/// The largest header block a letter may have: a stored JetStream message
/// keeps its header length in 16 bits.
pub const MAX_HEADER_BLOCK: usize = 65_535;

#[derive(Clone)]
enum Target {
    JetStream(jetstream::Context),
    Core(Client),
}

/// Where a letter goes.
#[derive(Clone, Debug)]
enum Subject {
    /// Every letter to one subject.
    Fixed(String),
    /// A letter of `<subject>` to `<subject><suffix>`; `filters` are the
    /// source consumer's filter subjects (empty: the stream's subjects),
    /// checked at start.
    Suffix {
        suffix: String,
        filters: Vec<String>,
    },
}

/// Publishes Elevate dead letters to NATS.
#[derive(Clone)]
pub struct NatsDeadLetters {
    target: Target,
    subject: Subject,
    claim_bucket: String,
    claims: std::sync::Arc<OnceCell<jetstream::object_store::ObjectStore>>,
}

impl std::fmt::Debug for NatsDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDeadLetters")
            .field("subject", &self.subject)
            .field("jetstream", &matches!(self.target, Target::JetStream(_)))
            .field("claim_bucket", &self.claim_bucket)
            .finish()
    }
}

impl NatsDeadLetters {
    fn with_target(target: Target, subject: Subject) -> Self {
        NatsDeadLetters {
            target,
            subject,
            claim_bucket: DEFAULT_CLAIM_BUCKET.to_string(),
            claims: Default::default(),
        }
    }

    /// Dead letters go to `subject`, which a JetStream stream must capture; each
    /// publish waits for the stream's ack.
    pub fn jetstream(jetstream: jetstream::Context, subject: impl Into<String>) -> Self {
        Self::with_target(Target::JetStream(jetstream), Subject::Fixed(subject.into()))
    }

    /// A letter of a message on `<subject>` goes to `<subject><suffix>`
    /// (`orders.created` → `orders.created.dlq`), stored by a JetStream
    /// stream; each publish waits for the stream's ack. `filters` are the
    /// guarded consumer's filter subjects (empty: all of its stream's
    /// subjects). The start check refuses a filter whose dead-letter
    /// subjects no stream captures, or the source stream itself captures
    /// (the letters would be consumed again), and a filter ending in `>`
    /// (its dead-letter subjects match it): give those a fixed subject with
    /// [`NatsDeadLetters::jetstream`].
    pub fn jetstream_by_subject(
        jetstream: jetstream::Context,
        suffix: impl Into<String>,
        filters: Vec<String>,
    ) -> Self {
        Self::with_target(
            Target::JetStream(jetstream),
            Subject::Suffix {
                suffix: suffix.into(),
                filters,
            },
        )
    }

    /// Dead letters go to a core NATS `subject` (at-most-once: a publish is
    /// "confirmed" once the server received it, not once anyone stored it).
    pub fn core(client: Client, subject: impl Into<String>) -> Self {
        Self::with_target(Target::Core(client), Subject::Fixed(subject.into()))
    }

    /// Stores oversized payloads in this Object Store bucket (created on first
    /// use, file storage) instead of [`DEFAULT_CLAIM_BUCKET`].
    pub fn with_claim_bucket(mut self, bucket: impl Into<String>) -> Self {
        self.claim_bucket = bucket.into();
        self.claims = Default::default();
        self
    }

    /// JetStream when a stream captures `subject`; core NATS only when the
    /// server answered that no stream does. Any other failure of the lookup
    /// (timeout, connection) is an error: a passing fault must not quietly
    /// downgrade dead letters to at-most-once. A server without JetStream
    /// answers with an error too: use [`NatsDeadLetters::core`] there.
    ///
    /// # Errors
    ///
    /// Returns the lookup's [`GetStreamByNameError`](jetstream::context::GetStreamByNameError) for
    /// any failure other than "no stream captures `subject`": a timeout, a lost connection, or a
    /// server without JetStream.
    pub async fn auto(
        client: Client,
        subject: impl Into<String>,
    ) -> Result<Self, jetstream::context::GetStreamByNameError> {
        use jetstream::context::GetStreamByNameErrorKind;
        let subject = subject.into();
        let js = jetstream::new(client.clone());
        match js.stream_by_subject(subject.clone()).await {
            Ok(stream) => {
                tracing::info!(%subject, %stream, "dead letters go to a JetStream stream");
                Ok(Self::jetstream(js, subject))
            }
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                tracing::warn!(%subject, "no JetStream stream captures the dead-letter subject: publishing with core NATS (at-most-once)");
                Ok(Self::core(client, subject))
            }
            Err(e) => Err(e),
        }
    }

    /// The dead-letter subject, when every letter goes to one
    /// (`None` for [`NatsDeadLetters::jetstream_by_subject`]).
    pub fn subject(&self) -> Option<&str> {
        match &self.subject {
            Subject::Fixed(s) => Some(s),
            Subject::Suffix { .. } => None,
        }
    }

    /// The subject `letter` is published to.
    fn letter_subject(&self, letter: &DeadLetter) -> String {
        match &self.subject {
            Subject::Fixed(s) => s.clone(),
            Subject::Suffix { suffix, .. } => {
                let source = letter
                    .source
                    .field_str("subject")
                    .unwrap_or(&letter.original_destination);
                format!("{source}{suffix}")
            }
        }
    }

    /// The dead-letter subjects to check at start for letters of `stream`:
    /// one fixed subject, or each filter with the suffix.
    async fn subjects_to_check(
        &self,
        js: &jetstream::Context,
        stream: &str,
    ) -> Result<Vec<String>, TransportError> {
        const OP: &str = "dead-letter preflight";
        let (suffix, filters) = match &self.subject {
            Subject::Fixed(s) => return Ok(vec![s.clone()]),
            Subject::Suffix { suffix, filters } => (suffix, filters.clone()),
        };
        let filters = if filters.is_empty() {
            let mut s = js
                .get_stream(stream)
                .await
                .map_err(|e| TransportError::new(OP, e))?;
            s.info()
                .await
                .map_err(|e| TransportError::new(OP, e))?
                .config
                .subjects
                .clone()
        } else {
            filters
        };
        filters
            .iter()
            .map(|f| {
                if f.split('.').any(|t| t == ">") {
                    Err(TransportError::permanent(
                        OP,
                        format!(
                            "the filter {f} of stream {stream} ends in `>`: its dead-letter subjects \
                             ({f}{suffix}) would match it again; give the guard a fixed dead-letter \
                             subject (NatsDeadLetters::jetstream)"
                        ),
                    ))
                } else {
                    Ok(format!("{f}{suffix}"))
                }
            })
            .collect()
    }

    fn client(&self) -> Client {
        match &self.target {
            Target::JetStream(js) => js.client(),
            Target::Core(c) => c.clone(),
        }
    }

    async fn claim_store(&self) -> Result<&jetstream::object_store::ObjectStore, TransportError> {
        const OP: &str = "claim check";
        let Target::JetStream(js) = &self.target else {
            return Err(TransportError::permanent(
                OP,
                "core NATS dead letters have no claim-check store",
            ));
        };
        self.claims
            .get_or_try_init(|| async {
                match js.get_object_store(&self.claim_bucket).await {
                    Ok(store) => Ok(store),
                    Err(_) => js
                        .create_object_store(jetstream::object_store::Config {
                            bucket: self.claim_bucket.clone(),
                            description: Some(
                                "Elevate dead-letter payloads too large for a letter".into(),
                            ),
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| TransportError::new(OP, e)),
                }
            })
            .await
    }
}

/// The headers a letter goes out with: the original `Nats-Msg-Id`s moved
/// aside, the letter's idempotency key as its own.
fn wire_headers(letter: &DeadLetter) -> Headers {
    let mut headers = letter.headers.clone();
    let original: Vec<Vec<u8>> = headers.get_all(NATS_MSG_ID).map(<[u8]>::to_vec).collect();
    headers.remove(NATS_MSG_ID);
    for id in original {
        headers.append(H_ORIGINAL_MSG_ID, id);
    }
    headers.append(NATS_MSG_ID, format!("ztauth-dl:{}", letter.idempotency_key));
    headers
}

/// Bytes of the NATS header block for `headers` (`NATS/1.0\r\n`, one
/// `name: value\r\n` per value, `\r\n`), as the client serializes it.
fn header_block_len(headers: &Headers) -> usize {
    12 + headers
        .iter()
        .map(|(n, v)| n.len() + 2 + v.len() + 2)
        .sum::<usize>()
}

#[async_trait::async_trait]
impl DeadLetterPublisher for NatsDeadLetters {
    fn durable(&self) -> bool {
        matches!(self.target, Target::JetStream(_))
    }

    /// A stream must capture the dead-letter subject (JetStream target); a
    /// memory-storage stream keeps nothing across a server restart (warned).
    async fn preflight(&self, source: &str) -> Result<(), TransportError> {
        const OP: &str = "dead-letter preflight";
        let Target::JetStream(js) = &self.target else {
            return Ok(());
        };
        use jetstream::context::GetStreamByNameErrorKind;
        for subject in self.subjects_to_check(js, source).await? {
            let name = match js.stream_by_subject(subject.clone()).await {
                Ok(name) => name,
                Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                    return Err(TransportError::permanent(
                        OP,
                        format!(
                            "no stream captures the dead-letter subject {subject} (letters of {source}): create one"
                        ),
                    ));
                }
                Err(e) => return Err(TransportError::new(OP, e)),
            };
            if name == source && matches!(self.subject, Subject::Suffix { .. }) {
                return Err(TransportError::permanent(
                    OP,
                    format!(
                        "the dead-letter subject {subject} is captured by the source stream {source} \
                         itself: its letters would be consumed again; store them in a stream of their own"
                    ),
                ));
            }
            let mut stream = js
                .get_stream(&name)
                .await
                .map_err(|e| TransportError::new(OP, e))?;
            let info = stream
                .info()
                .await
                .map_err(|e| TransportError::new(OP, e))?;
            if info.config.storage == jetstream::stream::StorageType::Memory {
                tracing::warn!(stream = %name, %subject,
                    "the dead-letter stream uses memory storage: its letters do not survive a server restart");
            }
        }
        Ok(())
    }

    fn measure(&self, letter: &DeadLetter) -> Excess {
        let block = header_block_len(&wire_headers(letter));
        let max_payload = self.client().server_info().max_payload.max(1);
        Excess {
            headers: block.saturating_sub(MAX_HEADER_BLOCK),
            total: (block + letter.payload.len()).saturating_sub(max_payload),
        }
    }

    async fn store_claim(&self, letter: &DeadLetter) -> Result<PayloadAt, TransportError> {
        let store = self.claim_store().await?;
        let name = format!("ztauth-dl-{}", letter.idempotency_key);
        let mut data: &[u8] = letter.claim_payload();
        let info = store
            .put(name.as_str(), &mut data)
            .await
            .map_err(|e| TransportError::new("claim check", e))?;
        Ok(PayloadAt::ClaimCheck {
            store: "nats-object-store".into(),
            location: format!("{}/{}", self.claim_bucket, info.name),
            chunks: u32::try_from(info.chunks).unwrap_or(u32::MAX),
        })
    }

    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        const OP: &str = "dead-letter publish";
        // A header NATS cannot carry is a refusal a retry cannot change.
        let map =
            to_nats_headers(&wire_headers(letter)).map_err(|e| TransportError::permanent(OP, e))?;
        let subject = self.letter_subject(letter);
        match &self.target {
            Target::JetStream(js) => {
                let sent =
                    js.publish_with_headers(subject, map, letter.payload.clone())
                        .await
                        .map_err(|e| match e.kind() {
                            PublishErrorKind::MaxPayloadExceeded
                            | PublishErrorKind::StreamNotFound => TransportError::permanent(OP, e),
                            _ => TransportError::new(OP, e),
                        })?;
                let ack = sent.await.map_err(|e| match e.kind() {
                    PublishErrorKind::StreamNotFound => TransportError::permanent(OP, e),
                    _ => TransportError::new(OP, e),
                })?;
                tracing::debug!(decision_id = %letter.decision_id, stream = %ack.stream, seq = ack.sequence, duplicate = ack.duplicate, "dead letter stored");
                Ok(())
            }
            Target::Core(client) => {
                client
                    .publish_with_headers(subject, map, letter.payload.clone())
                    .await
                    .map_err(|e| match e.kind() {
                        async_nats::client::PublishErrorKind::Send => TransportError::new(OP, e),
                        _ => TransportError::permanent(OP, e),
                    })?;
                client
                    .flush()
                    .await
                    .map_err(|e| TransportError::new(OP, e))?;
                Ok(())
            }
        }
    }
}
