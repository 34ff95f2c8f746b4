//! Shipping the decision spool to a Kafka topic: one record per batch (the
//! JSON array of chained entries), keyed by the spool's stream id so one
//! stream stays in one partition and in order, with the batch headers
//! (`Idempotency-Key`, stream, seq range, `prev`). Acknowledged means
//! written with `acks=all`; the topic's retention is the remote log.

use std::time::Duration;

use elevate_core::decision::Batch;
use elevate_core::decision::ship::{ShipError, Shipper, batch_headers};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// A [`Shipper`] to a Kafka topic.
pub struct KafkaDecisionShipper {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl KafkaDecisionShipper {
    /// Creates its own producer from `config` (`acks=all`, idempotence on,
    /// lz4 compression unless `compression.type` is set) for `topic`.
    ///
    /// # Errors
    /// The [`rdkafka::error::KafkaError`] librdkafka gives for an invalid configuration.
    pub fn from_config(config: &ClientConfig, topic: impl Into<String>) -> KafkaResult<Self> {
        let mut config = config.clone();
        config.set("acks", "all").set("enable.idempotence", "true");
        if config.get("compression.type").is_none() {
            config.set("compression.type", "lz4");
        }
        Ok(Self::new(config.create()?, topic))
    }

    /// Uses the application's producer (it should have `acks=all`).
    pub fn new(producer: FutureProducer, topic: impl Into<String>) -> Self {
        KafkaDecisionShipper {
            producer,
            topic: topic.into(),
            timeout: Duration::from_secs(30),
        }
    }

    /// How long one batch may wait for its delivery report (default 30 s).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

#[async_trait::async_trait]
impl Shipper for KafkaDecisionShipper {
    fn target(&self) -> String {
        format!("kafka://{}", self.topic)
    }

    async fn ship(&self, batch: &Batch) -> Result<(), ShipError> {
        let body = batch.to_json();
        let headers =
            batch_headers(batch)
                .iter()
                .fold(OwnedHeaders::new_with_capacity(4), |h, (k, v)| {
                    h.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    })
                });
        let record = FutureRecord::to(&self.topic)
            .key(batch.stream())
            .payload(body.as_slice())
            .headers(headers);
        let send = self.producer.send(record, self.timeout);
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(ShipError {
                target: self.target(),
                reason: e.to_string(),
            }),
            Err(_) => Err(ShipError {
                target: self.target(),
                reason: format!("no delivery report within {:?}", self.timeout),
            }),
        }
    }
}
