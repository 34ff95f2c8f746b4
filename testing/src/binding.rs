//! The small broker-binding trait the conformance suite is written against.
//! Each broker (memory, Kafka, AMQP, NATS) implements it once; every scenario
//! in [`crate::conformance`] then runs unchanged on it.

use std::sync::Arc;
use std::time::Duration;

use elevate_core::Headers;
use elevate_core::OutboundMessage;
use elevate_core::producer::{ProducerGuard, PublishRequest};
use elevate_core::settle::Processor;

/// Result type of binding operations (errors are messages for the test report).
pub type BindResult<T> = Result<T, String>;

/// One isolated destination for a scenario.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Unique name (topic, queue, stream) created for the scenario.
    pub name: String,
    /// The destination string references are bound to (what `InboundMessage::destination` will be).
    pub destination: String,
    /// Where dead letters go.
    pub dead_letter: String,
}

/// A running guarded consumer; dropping it or calling `stop` ends it.
pub struct ConsumerHandle {
    /// Signals the consumer loop to stop.
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The consumer task.
    pub task: tokio::task::JoinHandle<()>,
}

impl ConsumerHandle {
    /// Stops the consumer and waits for it (bounded).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
        self.task.abort();
    }

    /// Kills the consumer abruptly (simulated crash): nothing in flight is settled.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// A raw message as read back from a broker.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// The message headers as the broker returned them, to check what was stripped or attached.
    pub headers: Headers,
    /// The message body as the broker returned it.
    pub payload: Vec<u8>,
}

/// How large a message a plain producer can publish to a binding's
/// endpoints (the broker's limits), for the oversized-letter scenario.
#[derive(Debug, Clone, Copy)]
pub struct InboundLimits {
    /// A header value this long (plus a small payload) is accepted.
    pub header_bytes: usize,
    /// A payload this long (with no other header) is accepted, when the
    /// broker bounds the whole message (NATS `max_payload`, Kafka
    /// `message.max.bytes`); `None` where only headers are bounded.
    pub payload_bytes: Option<usize>,
    /// Whether the binding's dead letters keep oversized payloads in a claim check.
    pub claim_check: bool,
    /// Whether the broker enforces these limits (a letter of an original at
    /// them must be trimmed); false for the in-memory transport.
    pub enforced: bool,
}

/// What a broker must provide to run the conformance suite.
#[async_trait::async_trait]
pub trait BrokerBinding: Send + Sync {
    /// Short name for reports (`memory`, `kafka`, `amqp`, `nats`).
    fn name(&self) -> &'static str;

    /// The largest messages a plain producer can publish (see [`InboundLimits`]).
    fn limits(&self) -> InboundLimits;

    /// Creates a fresh, empty destination and dead-letter destination for a scenario.
    async fn setup(&self, scenario: &str) -> BindResult<Endpoint>;

    /// Publishes through the binding's guarded producer (PDP check, stripping, reference).
    async fn publish_guarded(
        &self,
        ep: &Endpoint,
        producer: &ProducerGuard,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> BindResult<()>;

    /// Publishes exactly these headers and payload with the plain client (legacy or hostile producer).
    async fn publish_raw(
        &self,
        ep: &Endpoint,
        headers: Headers,
        payload: Vec<u8>,
    ) -> BindResult<()>;

    /// Starts the binding's guarded consumer on the endpoint with this processor.
    /// The processor's dead-letter publisher is `UnboundDeadLetters` (refuses
    /// everything); the binding binds its own with `processor.with_dead_letters(..)`
    /// pointing at `ep.dead_letter`.
    async fn start_consumer(
        &self,
        ep: &Endpoint,
        processor: Arc<Processor>,
    ) -> BindResult<ConsumerHandle>;

    /// Reads dead letters with a plain client, waiting until `expected` arrived or `timeout`.
    async fn dead_letters(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>>;

    /// Reads what is on the wire at the destination with a plain client
    /// (every message published so far, without consuming it from the guarded consumer).
    async fn read_raw(
        &self,
        ep: &Endpoint,
        expected: usize,
        timeout: Duration,
    ) -> BindResult<Vec<RawMessage>>;
}
