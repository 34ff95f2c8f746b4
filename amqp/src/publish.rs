//! Confirmed publishing (shared by the guarded publisher, dead letters and retries)
//! and the credential-stripping [`AmqpPublisher`].

use elevate_core::producer::{
    DerivedPublish, PreparedMessage, ProducerGuard, PublishError, PublishRequest, Receipt,
};
use elevate_core::{AuthContext, OutboundMessage};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use std::time::Duration;

use crate::Error;
use crate::headers;

/// AMQP `delivery_mode` for a message the broker writes to disk.
pub const PERSISTENT: u8 = 2;

/// The destination string a context reference is bound to: the routing key
/// (= queue name) for the default exchange `""`, else `<exchange>/<routing_key>`.
pub fn destination(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        routing_key.to_string()
    } else {
        format!("{exchange}/{routing_key}")
    }
}

/// The exchange and routing key a destination string names (the inverse of
/// [`destination`]): `<exchange>/<routing_key>` splits at the first `/`, a
/// string without one is a queue on the default exchange. An exchange whose
/// name holds a `/` cannot be addressed this way (its destination would be
/// ambiguous to the consumer too).
pub fn address(destination: &str) -> (&str, &str) {
    destination.split_once('/').unwrap_or(("", destination))
}

pub(crate) fn short(what: &'static str, s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s).map_err(|_| Error::InvalidName { what, len: s.len() })
}

/// RabbitMQ's default `frame_max` (128 KiB), assumed when the connection's is not known.
pub const DEFAULT_FRAME_MAX: u32 = 131_072;

/// How long a publish may wait for its confirm before it counts as failed
/// (the connection may be gone without lapin noticing yet).
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of the content header frame that carries `properties` (frame
/// header and end octet included), as lapin will send it.
pub fn header_frame_len(properties: &BasicProperties, body_len: usize) -> usize {
    use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, gen_frame};
    let frame = AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: body_len as u64,
            properties: properties.clone(),
        },
    );
    cookie_factory::gen_simple(gen_frame(&frame), Vec::new())
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// A channel in publisher-confirm mode; every publish is `mandatory` and waits
/// for its confirm (bounded by a timeout), and no publish whose header frame
/// exceeds the connection's `frame_max` is ever sent (RabbitMQ answers one by
/// closing the whole connection with FRAME_ERROR).
#[derive(Clone, Debug)]
pub struct ConfirmChannel {
    channel: Channel,
    frame_max: u32,
    confirm_timeout: Duration,
}

impl ConfirmChannel {
    /// Puts `channel` in confirm mode (`confirm.select`; harmless if it
    /// already is). Its connection's `frame_max` is assumed to be RabbitMQ's
    /// default ([`DEFAULT_FRAME_MAX`]): prefer [`ConfirmChannel::open`], which
    /// reads the negotiated one, or set it with [`ConfirmChannel::with_frame_max`].
    ///
    /// # Errors
    ///
    /// Returns [`Error::Lapin`] if `confirm.select` fails (the channel or connection is closed, or
    /// the broker refuses).
    pub async fn new(channel: Channel) -> Result<Self, Error> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(ConfirmChannel {
            channel,
            frame_max: DEFAULT_FRAME_MAX,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        })
    }

    /// Opens a channel on `connection` in confirm mode, sized for the
    /// connection's negotiated `frame_max`.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Lapin`] if the channel cannot be opened on `connection` or put in confirm
    /// mode.
    pub async fn open(connection: &lapin::Connection) -> Result<Self, Error> {
        let frame_max = connection.configuration().frame_max();
        Ok(Self::new(connection.create_channel().await?)
            .await?
            .with_frame_max(frame_max))
    }

    /// The connection's negotiated `frame_max` (0 means unlimited).
    pub fn with_frame_max(mut self, frame_max: u32) -> Self {
        self.frame_max = if frame_max == 0 { u32::MAX } else { frame_max };
        self
    }

    /// Bounds the wait for each confirm (default [`DEFAULT_CONFIRM_TIMEOUT`]).
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// The largest content header frame this channel sends.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Whether a message with `properties` and a body of `body_len` bytes can be sent.
    ///
    /// # Errors
    ///
    /// Returns [`Error::HeaderFrameTooLarge`] if the encoded content header frame is larger than
    /// the connection's `frame_max`.
    pub fn header_fits(&self, properties: &BasicProperties, body_len: usize) -> Result<(), Error> {
        let size = header_frame_len(properties, body_len);
        if size > self.frame_max as usize {
            return Err(Error::HeaderFrameTooLarge {
                size,
                frame_max: self.frame_max,
            });
        }
        Ok(())
    }

    /// The underlying lapin channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes with `mandatory: true` and waits for the broker: only an ack for a
    /// routed message is a success; a nack or a `basic.return` (unroutable) is an error.
    ///
    /// # Errors
    ///
    /// Returns [`Error::HeaderFrameTooLarge`] if the header frame would exceed `frame_max`,
    /// [`Error::InvalidName`] if `exchange` or `routing_key` is longer than 255 bytes,
    /// [`Error::Lapin`] if the publish fails on the channel, [`Error::ConfirmTimeout`] if no
    /// confirm arrives in time, [`Error::Unroutable`] if the broker returns the message,
    /// [`Error::Nacked`] if it nacks it, and [`Error::ConfirmsOff`] if the channel is not in
    /// confirm mode.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), Error> {
        self.header_fits(&properties, payload.len())?;
        let publish = async {
            self.channel
                .basic_publish(
                    short("exchange", exchange)?,
                    short("routing key", routing_key)?,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    payload,
                    properties,
                )
                .await?
                .await
                .map_err(Error::from)
        };
        let confirm = tokio::time::timeout(self.confirm_timeout, publish)
            .await
            .map_err(|_| Error::ConfirmTimeout(self.confirm_timeout))??;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(Error::Unroutable {
                    code: returned.reply_code,
                    text: returned.reply_text.to_string(),
                })
            }
            Confirmation::Nack(None) => Err(Error::Nacked),
            Confirmation::NotRequested => Err(Error::ConfirmsOff),
        }
    }
}

/// Publishes through a [`ProducerGuard`] on a confirming channel: producer PDP
/// check, credential stripping (the properties' header table included), a context
/// reference bound to `<exchange>/<routing_key>` (or the queue name on the default
/// exchange) and the payload, a `mandatory` persistent publish, and the broker's confirm.
#[derive(Clone)]
pub struct AmqpPublisher {
    channel: ConfirmChannel,
    guard: ProducerGuard,
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("workload", &self.guard.workload())
            .finish_non_exhaustive()
    }
}

impl AmqpPublisher {
    /// Wraps a channel the application opened (it is put in confirm mode).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Lapin`] if `channel` cannot be put in confirm mode.
    pub async fn new(channel: Channel, guard: ProducerGuard) -> Result<Self, Error> {
        Ok(AmqpPublisher {
            channel: ConfirmChannel::new(channel).await?,
            guard,
        })
    }

    /// Reuses a channel already in confirm mode.
    pub fn with_confirm_channel(channel: ConfirmChannel, guard: ProducerGuard) -> Self {
        AmqpPublisher { channel, guard }
    }

    /// The confirming channel.
    pub fn channel(&self) -> &ConfirmChannel {
        &self.channel
    }

    /// The producer guard.
    pub fn guard(&self) -> &ProducerGuard {
        &self.guard
    }

    /// Publishes `msg` to `req.destination` (`<exchange>/<routing_key>`, or
    /// a queue name on the default exchange, see [`address`]) with default
    /// properties (persistent, fresh message id), and waits for the confirm.
    ///
    /// # Errors
    /// Refused by the producer guard, or not confirmed by the broker.
    pub async fn publish(
        &self,
        req: &PublishRequest<'_>,
        msg: OutboundMessage,
    ) -> Result<Receipt, PublishError> {
        self.publish_with_properties(req, msg, BasicProperties::default())
            .await
    }

    /// Publishes with the caller's properties. Any header table in `properties` is
    /// merged into `msg.headers` first (so it is stripped too); `message_id` defaults to
    /// a UUID, `delivery_mode` to persistent and `timestamp` to now.
    ///
    /// # Errors
    /// As [`AmqpPublisher::publish`].
    pub async fn publish_with_properties(
        &self,
        req: &PublishRequest<'_>,
        mut msg: OutboundMessage,
        properties: BasicProperties,
    ) -> Result<Receipt, PublishError> {
        merge_header_table(&mut msg, &properties);
        let prepared = self.guard.prepare(req, msg).await?;
        self.send(req.destination, prepared, properties).await
    }

    /// Publishes from a permitted handler to `next.destination`: the
    /// reference is derived from `auth` (this workload joins the `act`
    /// chain, scope may only narrow, see [`ProducerGuard::prepare_derived`]).
    /// Properties as in [`AmqpPublisher::publish_with_properties`].
    ///
    /// # Errors
    /// As [`AmqpPublisher::publish`].
    pub async fn publish_derived(
        &self,
        auth: &AuthContext,
        next: &DerivedPublish<'_>,
        mut msg: OutboundMessage,
        properties: BasicProperties,
    ) -> Result<Receipt, PublishError> {
        merge_header_table(&mut msg, &properties);
        let prepared = self.guard.prepare_derived(auth, next, msg).await?;
        self.send(next.destination, prepared, properties).await
    }

    async fn send(
        &self,
        dst: &str,
        prepared: PreparedMessage,
        properties: BasicProperties,
    ) -> Result<Receipt, PublishError> {
        let (exchange, routing_key) = address(dst);
        let table =
            headers::encode(&prepared.headers).map_err(|e| PublishError::Broker(e.to_string()))?;
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut props = properties
            .clone()
            .with_headers(table)
            .with_message_id(short("message id", &message_id).map_err(broker)?);
        if props.delivery_mode().is_none() {
            props = props.with_delivery_mode(PERSISTENT);
        }
        if props.timestamp().is_none() {
            props = props.with_timestamp(now_secs());
        }
        self.channel
            .publish(exchange, routing_key, &prepared.payload, props)
            .await
            .map_err(broker)?;
        let mut receipt = Receipt::new(dst, &prepared);
        receipt.message_id = Some(message_id);
        Ok(receipt)
    }
}

/// A header table in `properties` travels as message headers (so the guard strips it too).
fn merge_header_table(msg: &mut OutboundMessage, properties: &BasicProperties) {
    if let Some(table) = properties.headers() {
        for (n, v) in headers::decode(Some(table)).iter() {
            msg.headers.append(n, v);
        }
    }
}

fn broker(e: Error) -> PublishError {
    PublishError::Broker(e.to_string())
}

/// The original properties a copy (retry or dead letter) keeps: everything but the
/// header table, `delivery_mode`, `expiration` (a copy must not inherit a TTL) and
/// `user_id` (the broker checks it against the publishing connection's user).
pub(crate) fn carried_properties(o: &BasicProperties) -> BasicProperties {
    let mut p = BasicProperties::default();
    macro_rules! keep {
        ($get:ident, $set:ident) => {
            if let Some(v) = o.$get() {
                p = p.$set(v.clone());
            }
        };
    }
    keep!(content_type, with_content_type);
    keep!(content_encoding, with_content_encoding);
    keep!(priority, with_priority);
    keep!(correlation_id, with_correlation_id);
    keep!(reply_to, with_reply_to);
    keep!(message_id, with_message_id);
    keep!(timestamp, with_timestamp);
    keep!(kind, with_type);
    keep!(app_id, with_app_id);
    keep!(cluster_id, with_cluster_id);
    p
}

/// The carried properties of a delivery by AMQP name, for a dead letter
/// to keep ([`elevate_core::InboundMessage::properties`]).
pub(crate) fn properties_by_name(o: &BasicProperties) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut put = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            out.push((name.to_string(), v));
        }
    };
    put(
        "content-type",
        o.content_type().as_ref().map(|v| v.to_string()),
    );
    put(
        "content-encoding",
        o.content_encoding().as_ref().map(|v| v.to_string()),
    );
    put("priority", o.priority().map(|v| v.to_string()));
    put(
        "correlation-id",
        o.correlation_id().as_ref().map(|v| v.to_string()),
    );
    put("reply-to", o.reply_to().as_ref().map(|v| v.to_string()));
    put("message-id", o.message_id().as_ref().map(|v| v.to_string()));
    put("timestamp", o.timestamp().map(|v| v.to_string()));
    put("type", o.kind().as_ref().map(|v| v.to_string()));
    put("app-id", o.app_id().as_ref().map(|v| v.to_string()));
    put("cluster-id", o.cluster_id().as_ref().map(|v| v.to_string()));
    out
}

/// The properties [`properties_by_name`] recorded, back as AMQP properties
/// (a value AMQP cannot carry, such as a short string over 255 bytes, is left out).
pub(crate) fn properties_from_names(props: &[(String, String)]) -> BasicProperties {
    let mut p = BasicProperties::default();
    for (name, value) in props {
        let short = || ShortString::try_new(value.as_str()).ok();
        p = match name.as_str() {
            "content-type" => match short() {
                Some(v) => p.with_content_type(v),
                None => p,
            },
            "content-encoding" => match short() {
                Some(v) => p.with_content_encoding(v),
                None => p,
            },
            "priority" => match value.parse() {
                Ok(v) => p.with_priority(v),
                Err(_) => p,
            },
            "correlation-id" => match short() {
                Some(v) => p.with_correlation_id(v),
                None => p,
            },
            "reply-to" => match short() {
                Some(v) => p.with_reply_to(v),
                None => p,
            },
            "message-id" => match short() {
                Some(v) => p.with_message_id(v),
                None => p,
            },
            "timestamp" => match value.parse() {
                Ok(v) => p.with_timestamp(v),
                Err(_) => p,
            },
            "type" => match short() {
                Some(v) => p.with_type(v),
                None => p,
            },
            "app-id" => match short() {
                Some(v) => p.with_app_id(v),
                None => p,
            },
            "cluster-id" => match short() {
                Some(v) => p.with_cluster_id(v),
                None => p,
            },
            _ => p,
        };
    }
    p
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(destination("", "jobs"), "jobs");
        assert_eq!(
            destination("billing", "invoice.create"),
            "billing/invoice.create"
        );
    }
}
