//! Dead-letter publishing: to a JetStream dead-letter stream (waits for the
//! stream's ack) or, where no JetStream is available, to a plain subject
//! (waits for the server to have received it; core NATS cannot confirm more).

use async_nats::Client;
use async_nats::jetstream;
use elevate_core::deadletter::DeadLetter;
use elevate_core::message::Coordinates;
use elevate_core::settle::{DeadLetterPublisher, TransportError};

use crate::headers::{NATS_MSG_ID, to_nats_headers};

/// Header: the original message's `Nats-Msg-Id`, kept when the dead letter gets its own.
pub const H_ORIGINAL_MSG_ID: &str = "ztauth-original-msg-id";

#[derive(Clone)]
enum Target {
    JetStream(jetstream::Context),
    Core(Client),
}

/// Publishes Elevate dead letters to NATS.
#[derive(Clone)]
pub struct NatsDeadLetters {
    target: Target,
    subject: String,
}

impl std::fmt::Debug for NatsDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDeadLetters")
            .field("subject", &self.subject)
            .field("jetstream", &matches!(self.target, Target::JetStream(_)))
            .finish()
    }
}

impl NatsDeadLetters {
    /// Dead letters go to `subject`, which a JetStream stream must capture; each
    /// publish waits for the stream's ack.
    pub fn jetstream(jetstream: jetstream::Context, subject: impl Into<String>) -> Self {
        NatsDeadLetters {
            target: Target::JetStream(jetstream),
            subject: subject.into(),
        }
    }

    /// Dead letters go to a core NATS `subject` (at-most-once: a publish is
    /// "confirmed" once the server received it, not once anyone stored it).
    pub fn core(client: Client, subject: impl Into<String>) -> Self {
        NatsDeadLetters {
            target: Target::Core(client),
            subject: subject.into(),
        }
    }

    /// JetStream when a stream captures `subject`; core NATS only when the
    /// server answered that no stream does. Any other failure of the lookup
    /// (timeout, connection) is an error: a passing fault must not quietly
    /// downgrade dead letters to at-most-once. A server without JetStream
    /// answers with an error too: use [`NatsDeadLetters::core`] there.
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

    /// The dead-letter subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

/// A de-duplication id unique to the source message, so that a message
/// dead-lettered twice (its settle failed after the dead letter was stored)
/// leaves one entry in the dead-letter stream.
fn dead_letter_msg_id(letter: &DeadLetter) -> String {
    match &letter.source {
        Coordinates::Nats {
            stream: Some(stream),
            stream_seq: Some(seq),
            ..
        } => format!("ztauth-dl:{stream}:{seq}"),
        _ => format!("ztauth-dl:{}", letter.decision_id),
    }
}

#[async_trait::async_trait]
impl DeadLetterPublisher for NatsDeadLetters {
    fn durable(&self) -> bool {
        matches!(self.target, Target::JetStream(_))
    }

    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        const OP: &str = "dead-letter publish";
        let mut headers = letter.headers.clone();
        let original: Vec<Vec<u8>> = headers.get_all(NATS_MSG_ID).map(<[u8]>::to_vec).collect();
        headers.remove(NATS_MSG_ID);
        for id in original {
            headers.append(H_ORIGINAL_MSG_ID, id);
        }
        headers.append(NATS_MSG_ID, dead_letter_msg_id(letter));
        let map = to_nats_headers(&headers).map_err(|e| TransportError::new(OP, e))?;
        match &self.target {
            Target::JetStream(js) => {
                let ack = js
                    .publish_with_headers(self.subject.clone(), map, letter.payload.clone())
                    .await
                    .map_err(|e| TransportError::new(OP, e))?
                    .await
                    .map_err(|e| TransportError::new(OP, e))?;
                tracing::debug!(decision_id = %letter.decision_id, stream = %ack.stream, seq = ack.sequence, duplicate = ack.duplicate, "dead letter stored");
                Ok(())
            }
            Target::Core(client) => {
                client
                    .publish_with_headers(self.subject.clone(), map, letter.payload.clone())
                    .await
                    .map_err(|e| TransportError::new(OP, e))?;
                client
                    .flush()
                    .await
                    .map_err(|e| TransportError::new(OP, e))?;
                Ok(())
            }
        }
    }
}
