//! Dead-letter publishing to a Kafka topic (default `<source topic>.dlq`),
//! returning only after the broker acknowledged the record.

use std::time::Duration;

use bytes::Bytes;
use elevate_core::Coordinates;
use elevate_core::deadletter::DeadLetter;
use elevate_core::settle::{DeadLetterPublisher, TransportError};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaResult;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::headers::to_kafka;

/// Suffix of the default dead-letter topic: `<source topic>.dlq`.
pub const DEFAULT_DLQ_SUFFIX: &str = ".dlq";

tokio::task_local! {
    /// The Kafka key of the record being processed by the guarded consumer on this task.
    pub(crate) static SOURCE_KEY: Option<Bytes>;
}

#[derive(Debug, Clone)]
enum Target {
    Suffix(String),
    Fixed(String),
}

/// Publishes dead letters with a `FutureProducer` (configure it with `acks=all`).
///
/// The dead letter keeps the original record's key when it is published from
/// inside [`crate::GuardedConsumer`], so per-key order carries over.
pub struct KafkaDeadLetters<C: ClientContext + 'static = DefaultClientContext> {
    producer: FutureProducer<C>,
    target: Target,
    timeout: Duration,
}

impl KafkaDeadLetters<DefaultClientContext> {
    /// Creates its own producer from `config` with `acks=all` and idempotence forced on.
    pub fn from_config(config: &ClientConfig) -> KafkaResult<Self> {
        let mut config = config.clone();
        config.set("acks", "all").set("enable.idempotence", "true");
        Ok(Self::new(config.create()?))
    }
}

impl<C: ClientContext + 'static> KafkaDeadLetters<C> {
    /// Uses the application's producer (it should have `acks=all`).
    pub fn new(producer: FutureProducer<C>) -> Self {
        KafkaDeadLetters {
            producer,
            target: Target::Suffix(DEFAULT_DLQ_SUFFIX.to_string()),
            timeout: Duration::from_secs(30),
        }
    }

    /// Sends every dead letter to one topic instead of `<source topic>.dlq`.
    pub fn to_topic(mut self, topic: impl Into<String>) -> Self {
        self.target = Target::Fixed(topic.into());
        self
    }

    /// Uses `<source topic><suffix>` as the dead-letter topic.
    pub fn with_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.target = Target::Suffix(suffix.into());
        self
    }

    /// Bounds the wait for the broker's acknowledgement (default 30 s); past it the publish fails.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The dead-letter topic for records read from `source_topic`.
    pub fn topic_for(&self, source_topic: &str) -> String {
        match &self.target {
            Target::Fixed(t) => t.clone(),
            Target::Suffix(s) => format!("{source_topic}{s}"),
        }
    }
}

#[async_trait::async_trait]
impl<C: ClientContext + 'static> DeadLetterPublisher for KafkaDeadLetters<C> {
    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        let source = match &letter.source {
            Coordinates::Kafka { topic, .. } => topic.as_str(),
            _ => letter.original_destination.as_str(),
        };
        let topic = self.topic_for(source);
        let key = SOURCE_KEY.try_with(|k| k.clone()).ok().flatten();
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
            .payload(letter.payload.as_ref())
            .headers(to_kafka(&letter.headers));
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        // The queue timeout bounds local buffering; `message.timeout.ms` bounds delivery.
        let send = self.producer.send(record, self.timeout);
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(TransportError::new("dead-letter publish", e)),
            Err(_) => Err(TransportError::new(
                "dead-letter publish",
                format!(
                    "no acknowledgement from the broker within {:?}",
                    self.timeout
                ),
            )),
        }
    }
}
