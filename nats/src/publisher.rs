//! The guarded publisher: producer PDP check, credential stripping and the
//! signed context reference (all in [`ProducerGuard::prepare`]), then a core
//! NATS or JetStream publish of exactly what the guard returned.

use async_nats::Client;
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;
use elevate_core::producer::{
    DerivedPublish, PreparedMessage, ProducerGuard, PublishError, PublishRequest, Receipt,
};
use elevate_core::{AuthContext, OutboundMessage};

use crate::headers::{NATS_MSG_ID, to_nats_headers};

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

    /// Core NATS publish (at-most-once) to `req.destination` (the subject).
    /// Returns once the client accepted the message; call
    /// [`NatsPublisher::flush`] to wait until the server has it.
    ///
    /// # Errors
    /// Refused by the producer guard, or not accepted by the client.
    pub async fn publish(
        &self,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let prepared = self.guard.prepare(req, msg).await?;
        self.send_core(req.destination, prepared).await
    }

    /// JetStream publish to `req.destination` (the subject); returns after
    /// the stream acknowledged the message, with its stream and sequence in
    /// [`Receipt::at`]. `Nats-Msg-Id` is the application's own or else the
    /// reference id, so a retried publish is de-duplicated by the stream.
    ///
    /// # Errors
    /// Refused by the producer guard, or not acknowledged by the stream.
    pub async fn publish_jetstream(
        &self,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let prepared = self.guard.prepare(req, msg).await?;
        self.send_jetstream(req.destination, prepared).await
    }

    /// Core NATS publish from a permitted handler to `next.destination`: the
    /// reference is derived from `auth` (this workload joins the `act`
    /// chain, scope may only narrow, see [`ProducerGuard::prepare_derived`]).
    ///
    /// # Errors
    /// As [`NatsPublisher::publish`].
    pub async fn publish_derived(
        &self,
        auth: &AuthContext,
        next: &DerivedPublish<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let prepared = self.guard.prepare_derived(auth, next, msg).await?;
        self.send_core(next.destination, prepared).await
    }

    /// JetStream publish from a permitted handler to `next.destination` (see
    /// [`NatsPublisher::publish_derived`] and [`NatsPublisher::publish_jetstream`]).
    ///
    /// # Errors
    /// As [`NatsPublisher::publish_jetstream`].
    pub async fn publish_derived_jetstream(
        &self,
        auth: &AuthContext,
        next: &DerivedPublish<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        let prepared = self.guard.prepare_derived(auth, next, msg).await?;
        self.send_jetstream(next.destination, prepared).await
    }

    async fn send_core(
        &self,
        subject: &str,
        prepared: PreparedMessage,
    ) -> Result<Receipt, PublishError> {
        let (mut prepared, message_id) = with_message_id(prepared);
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
        Ok(receipt(subject, &prepared, message_id, None))
    }

    async fn send_jetstream(
        &self,
        subject: &str,
        prepared: PreparedMessage,
    ) -> Result<Receipt, PublishError> {
        let (mut prepared, message_id) = with_message_id(prepared);
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
        Ok(receipt(subject, &prepared, message_id, Some(ack)))
    }

    /// Waits until the server has received everything published so far (core NATS).
    ///
    /// # Errors
    ///
    /// Returns [`PublishError::Broker`] if the flush fails (the connection is closed or the flush
    /// times out).
    pub async fn flush(&self) -> Result<(), PublishError> {
        self.client
            .flush()
            .await
            .map_err(|e| PublishError::Broker(e.to_string()))
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
    prepared: &PreparedMessage,
    message_id: String,
    ack: Option<PublishAck>,
) -> Receipt {
    let mut r = Receipt::new(subject, prepared);
    r.message_id = Some(message_id);
    if let Some(ack) = ack {
        r.duplicate = ack.duplicate;
        r.at = Some(crate::jetstream::stream_coordinates(
            &ack.stream,
            ack.sequence,
            subject,
        ));
    }
    r
}
