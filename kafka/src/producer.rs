//! The credential-stripping producer: every record goes through
//! [`ProducerGuard::prepare`] (producer PDP check, stripping, a context
//! reference bound to the topic and payload) before it reaches the broker.

use std::time::Duration;

use elevate_core::OutboundMessage;
use elevate_core::producer::{ProducerGuard, PublishError, PublishRequest};
use elevate_core::strip::Finding;
use rdkafka::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::headers::to_kafka;

/// Where a published record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The topic (also the reference's `dst`).
    pub topic: String,
    /// Partition the broker wrote to.
    pub partition: i32,
    /// Offset the broker assigned.
    pub offset: i64,
    /// `jti` of the context reference attached.
    pub reference_id: String,
    /// What was stripped (names and paths only, never values).
    pub stripped: Vec<Finding>,
}

/// A `FutureProducer` that only sends what the producer guard prepared.
pub struct KafkaProducer<C: ClientContext + 'static = DefaultClientContext> {
    producer: FutureProducer<C>,
    guard: ProducerGuard,
    queue_timeout: Duration,
}

impl<C: ClientContext + 'static> KafkaProducer<C> {
    /// Wraps the producer the application already configured.
    pub fn new(producer: FutureProducer<C>, guard: ProducerGuard) -> Self {
        KafkaProducer {
            producer,
            guard,
            queue_timeout: Duration::from_secs(5),
        }
    }

    /// How long a send may wait for room in librdkafka's local queue (default 5 s).
    pub fn with_queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = timeout;
        self
    }

    /// The wrapped producer (for flushing or metadata; sending through it bypasses the guard).
    pub fn inner(&self) -> &FutureProducer<C> {
        &self.producer
    }

    /// The producer guard.
    pub fn guard(&self) -> &ProducerGuard {
        &self.guard
    }

    /// Checks, strips, signs and sends one record to `topic`, waiting for the delivery report.
    ///
    /// The reference is bound to `topic` whatever `req.destination` says.
    /// A refusal (`Denied`, `ScopeInsufficient`, `Refused`...) returns before
    /// anything is sent; a broker failure is `PublishError::Broker`.
    pub async fn publish(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let req = PublishRequest {
            destination: topic,
            ..req.clone()
        };
        let prepared = self.guard.prepare(&req, msg).await?;
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .payload(prepared.payload.as_slice())
            .headers(to_kafka(&prepared.headers));
        if let Some(k) = key {
            record = record.key(k);
        }
        match self.producer.send(record, self.queue_timeout).await {
            Ok(d) => Ok(Receipt {
                topic: topic.to_string(),
                partition: d.partition,
                offset: d.offset,
                reference_id: prepared.reference.claims.jti.clone(),
                stripped: prepared.stripped,
            }),
            Err((e, _)) => Err(PublishError::Broker(e.to_string())),
        }
    }
}
