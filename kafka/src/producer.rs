//! The credential-stripping producer: every record goes through
//! [`ProducerGuard::prepare`] (producer PDP check, stripping, a context
//! reference bound to the topic and payload) before it reaches the broker.

use std::time::Duration;

use elevate_core::producer::{
    DerivedPublish, PreparedMessage, ProducerGuard, PublishError, PublishRequest, Receipt,
};
use elevate_core::{AuthContext, Coordinates, OutboundMessage};
use rdkafka::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::headers::to_kafka;

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

    /// Checks, strips, signs and sends one record to `req.destination` (the
    /// topic), waiting for the delivery report. A refusal (`Denied`,
    /// `ScopeInsufficient`, `Refused`...) returns before anything is sent; a
    /// broker failure is `PublishError::Broker`.
    ///
    /// # Errors
    /// Refused by the producer guard, or not stored by the broker.
    pub async fn publish(
        &self,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        self.publish_keyed(None, req, msg).await
    }

    /// [`KafkaProducer::publish`] with a record key (partitioning, order per key).
    ///
    /// # Errors
    /// As [`KafkaProducer::publish`].
    pub async fn publish_keyed(
        &self,
        key: Option<&[u8]>,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let prepared = self.guard.prepare(req, msg).await?;
        self.send(req.destination, key, prepared).await
    }

    /// Publishes from a permitted handler to `next.destination`: the
    /// reference is derived from `auth` (this workload joins the `act`
    /// chain, scope may only narrow, see [`ProducerGuard::prepare_derived`]).
    ///
    /// # Errors
    /// As [`KafkaProducer::publish`].
    pub async fn publish_derived(
        &self,
        key: Option<&[u8]>,
        auth: &AuthContext,
        next: &DerivedPublish<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let prepared = self.guard.prepare_derived(auth, next, msg).await?;
        self.send(next.destination, key, prepared).await
    }

    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        prepared: PreparedMessage,
    ) -> Result<Receipt, PublishError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .payload(prepared.payload.as_slice())
            .headers(to_kafka(&prepared.headers));
        if let Some(k) = key {
            record = record.key(k);
        }
        match self.producer.send(record, self.queue_timeout).await {
            Ok(d) => {
                let mut receipt = Receipt::new(topic, &prepared);
                receipt.at = Some(
                    Coordinates::new("kafka", format!("{topic}/{}/{}", d.partition, d.offset))
                        .with("topic", topic)
                        .with("partition", d.partition)
                        .with("offset", d.offset),
                );
                Ok(receipt)
            }
            Err((e, _)) => Err(PublishError::Broker(e.to_string())),
        }
    }
}
