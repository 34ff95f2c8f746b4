//! The guarded publisher: producer PDP check, credential stripping and the
//! signed context reference (all in [`ProducerGuard::prepare`]), then a core
//! NATS or JetStream publish of exactly what the guard returned.

use async_nats::Client;
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;
use elevate_core::producer::{
    DerivedPublish, PreparedMessage, ProducerGuard, PublishError, PublishRequest,
};
use elevate_core::strip::Finding;
use elevate_core::{AuthContext, OutboundMessage};

use crate::headers::{NATS_MSG_ID, to_nats_headers};

/// What a successful guarded publish produced.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The subject the message went to (the reference's `dst`).
    pub subject: String,
    /// The context reference id (`jti`).
    pub reference_id: String,
    /// The `Nats-Msg-Id` sent (the application's own, or the reference id).
    pub message_id: String,
    /// What was stripped from the message (names and paths only).
    pub stripped: Vec<Finding>,
    /// The stream's acknowledgement (JetStream publishes only).
    pub ack: Option<PublishAck>,
}

/// Publishes through a [`ProducerGuard`] on a client the application already has.
#[derive(Clone)]
pub struct NatsPublisher {
    client: Client,
    jetstream: jetstream::Context,
    guard: ProducerGuard,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("workload", &self.guard.workload())
            .finish_non_exhaustive()
    }
}

impl NatsPublisher {
    /// Wraps a connected client; JetStream publishes use `async_nats::jetstream::new(client)`.
    pub fn new(client: Client, guard: ProducerGuard) -> Self {
        let jetstream = jetstream::new(client.clone());
        NatsPublisher {
            client,
            jetstream,
            guard,
        }
    }

    /// Uses this JetStream context (domain, API prefix, timeout) for JetStream publishes.
    pub fn with_jetstream(mut self, jetstream: jetstream::Context) -> Self {
        self.jetstream = jetstream;
        self
    }

    /// The producer guard.
    pub fn guard(&self) -> &ProducerGuard {
        &self.guard
    }

    /// Core NATS publish (at-most-once): the reference is bound to `subject`
    /// (`req.destination` is ignored). Returns once the client accepted the
    /// message; call [`NatsPublisher::flush`] to wait until the server has it.
    pub async fn publish(
        &self,
        subject: &str,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let (mut prepared, message_id) = self.prepare(subject, req, msg).await?;
        let headers =
            to_nats_headers(&prepared.headers).map_err(|e| PublishError::Broker(e.to_string()))?;
        self.client
            .publish_with_headers(
                subject.to_string(),
                headers,
                Bytes::from(std::mem::take(&mut prepared.payload)),
            )
            .await
            .map_err(|e| PublishError::Broker(e.to_string()))?;
        Ok(receipt(subject, prepared, message_id, None))
    }

    /// JetStream publish: the reference is bound to `subject` (`req.destination`
    /// is ignored); returns after the stream acknowledged the message, with its
    /// [`PublishAck`] (stream, sequence, duplicate flag) in the receipt.
    /// `Nats-Msg-Id` is the application's own or else the reference id, so a
    /// retried publish is de-duplicated by the stream.
    pub async fn publish_jetstream(
        &self,
        subject: &str,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let (prepared, message_id) = self.prepare(subject, req, msg).await?;
        self.send_jetstream(subject, prepared, message_id).await
    }

    /// JetStream publish from a permitted handler: the reference is derived
    /// from `auth` (this workload joins the `act` chain, scope may only narrow,
    /// see [`ProducerGuard::prepare_derived`]) and bound to `subject`
    /// (`next.destination` is ignored).
    pub async fn publish_derived_jetstream(
        &self,
        subject: &str,
        auth: &AuthContext,
        next: &DerivedPublish<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let next = DerivedPublish {
            destination: subject,
            ..next.clone()
        };
        let prepared = self.guard.prepare_derived(auth, &next, msg).await?;
        let (prepared, message_id) = with_message_id(prepared);
        self.send_jetstream(subject, prepared, message_id).await
    }

    async fn send_jetstream(
        &self,
        subject: &str,
        mut prepared: PreparedMessage,
        message_id: String,
    ) -> Result<Receipt, PublishError> {
        let headers =
            to_nats_headers(&prepared.headers).map_err(|e| PublishError::Broker(e.to_string()))?;
        let ack = self
            .jetstream
            .publish_with_headers(
                subject.to_string(),
                headers,
                Bytes::from(std::mem::take(&mut prepared.payload)),
            )
            .await
            .map_err(|e| PublishError::Broker(e.to_string()))?
            .await
            .map_err(|e| PublishError::Broker(e.to_string()))?;
        Ok(receipt(subject, prepared, message_id, Some(ack)))
    }

    /// Waits until the server has received everything published so far (core NATS).
    pub async fn flush(&self) -> Result<(), PublishError> {
        self.client
            .flush()
            .await
            .map_err(|e| PublishError::Broker(e.to_string()))
    }

    async fn prepare(
        &self,
        subject: &str,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<(PreparedMessage, String), PublishError> {
        let req = PublishRequest {
            destination: subject,
            ..req.clone()
        };
        let prepared = self.guard.prepare(&req, msg).await?;
        Ok(with_message_id(prepared))
    }
}

/// Keeps the application's `Nats-Msg-Id`, else uses the reference id.
fn with_message_id(mut prepared: PreparedMessage) -> (PreparedMessage, String) {
    let message_id = match prepared.headers.get_str(NATS_MSG_ID) {
        Some(id) if !id.trim().is_empty() => id.to_string(),
        _ => {
            let id = prepared.reference.claims.jti.clone();
            prepared.headers.insert(NATS_MSG_ID, id.as_str());
            id
        }
    };
    (prepared, message_id)
}

fn receipt(
    subject: &str,
    prepared: PreparedMessage,
    message_id: String,
    ack: Option<PublishAck>,
) -> Receipt {
    Receipt {
        subject: subject.to_string(),
        reference_id: prepared.reference.claims.jti,
        message_id,
        stripped: prepared.stripped,
        ack,
    }
}
