//! Shipping the decision spool to a JetStream stream: one message per batch
//! (the JSON array of chained entries) on a subject the stream stores, with
//! the batch headers and `Nats-Msg-Id` = the batch's idempotency key, so the
//! stream's duplicate window drops a batch sent twice. Acknowledged means
//! the stream's publish ack.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use elevate_core::decision::Batch;
use elevate_core::decision::ship::{ShipError, Shipper, batch_headers};

use crate::headers::NATS_MSG_ID;

/// A [`Shipper`] to a JetStream subject.
#[derive(Clone)]
pub struct JetStreamDecisionShipper {
    jetstream: jetstream::Context,
    subject: String,
}

impl std::fmt::Debug for JetStreamDecisionShipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamDecisionShipper")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl JetStreamDecisionShipper {
    /// Ships to `subject`, which a stream must store (the publish is refused otherwise).
    pub fn new(jetstream: jetstream::Context, subject: impl Into<String>) -> Self {
        JetStreamDecisionShipper {
            jetstream,
            subject: subject.into(),
        }
    }
}

#[async_trait::async_trait]
impl Shipper for JetStreamDecisionShipper {
    fn target(&self) -> String {
        format!("nats://{}", self.subject)
    }

    async fn ship(&self, batch: &Batch) -> Result<(), ShipError> {
        let err = |e: String| ShipError {
            target: self.target(),
            reason: e,
        };
        let mut headers = HeaderMap::new();
        for (k, v) in batch_headers(batch) {
            headers.insert(k, v.as_str());
        }
        headers.insert(NATS_MSG_ID, batch.idempotency_key().as_str());
        self.jetstream
            .publish_with_headers(self.subject.clone(), headers, Bytes::from(batch.to_json()))
            .await
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(())
    }
}
