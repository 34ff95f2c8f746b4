//! Dead-letter publishing with confirms.
//!
//! Letters always fit: [`AmqpDeadLetters`] measures a letter's content header
//! frame against the connection's `frame_max` (the body is split into frames
//! by the client, so only the header frame is bounded), and core trims its
//! headers until it fits. A publish the broker refuses for good (unroutable,
//! too large) is reported as permanent, and core sends the minimal letter.

use elevate_core::deadletter::{DeadLetter, Excess};
use elevate_core::settle::{DeadLetterPublisher, TransportError};
use lapin::{BasicProperties, Channel};

use crate::headers;
use crate::publish::{
    ConfirmChannel, PERSISTENT, carried_properties, now_secs, properties_from_names, short,
};
use crate::{Error, X_DEATH};

/// Header under which an original `x-death` history travels in a dead letter
/// (a dead letter is a new message: the broker's own `x-death` must not be faked).
pub const H_ORIGINAL_X_DEATH: &str = "x-elevate-original-x-death";

/// Publishes dead-letter envelopes to an exchange/routing key (by default a
/// durable `<queue>.dlq` on the default exchange) and returns only after the broker
/// confirmed them. The letter keeps the original message's properties
/// (content type, message id, correlation id, ...), except `expiration` (a dead
/// letter must not expire) and `user-id` (the broker checks it against the
/// publishing connection); it is always persistent.
#[derive(Clone, Debug)]
pub struct AmqpDeadLetters {
    channel: ConfirmChannel,
    exchange: String,
    routing_key: String,
}

impl AmqpDeadLetters {
    /// Dead letters to `exchange` with `routing_key`, over `channel` (put in confirm mode).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Lapin`] if the broker refuses to put `channel` in confirm mode or the
    /// channel is closed.
    pub async fn new(
        channel: Channel,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Result<Self, Error> {
        Ok(Self::with_confirm_channel(
            ConfirmChannel::new(channel).await?,
            exchange,
            routing_key,
        ))
    }

    /// Dead letters straight to `queue` (default exchange).
    ///
    /// # Errors
    ///
    /// The same as [`new`](Self::new): [`Error::Lapin`] if `channel` cannot be put in confirm mode.
    pub async fn to_queue(channel: Channel, queue: impl Into<String>) -> Result<Self, Error> {
        Self::new(channel, "", queue).await
    }

    /// Reuses a confirming channel.
    pub fn with_confirm_channel(
        channel: ConfirmChannel,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        AmqpDeadLetters {
            channel,
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }
    }

    /// Where dead letters go, as a destination string.
    pub fn target(&self) -> String {
        crate::publish::destination(&self.exchange, &self.routing_key)
    }

    fn properties(&self, letter: &DeadLetter) -> Result<BasicProperties, Error> {
        // The delivery recorded its properties on the message: they travel with the letter.
        let original = properties_from_names(&letter.properties);
        let mut hdrs = letter.headers.clone();
        let deaths: Vec<Vec<u8>> = hdrs.get_all(X_DEATH).map(<[u8]>::to_vec).collect();
        if !deaths.is_empty() {
            hdrs.remove(X_DEATH);
            for d in deaths {
                hdrs.append(H_ORIGINAL_X_DEATH, d);
            }
        }
        let table = headers::encode(&hdrs)?;
        let mut props = carried_properties(&original)
            .with_headers(table)
            .with_delivery_mode(PERSISTENT);
        if original.timestamp().is_none() {
            props = props.with_timestamp(now_secs());
        }
        if original.message_id().is_none() {
            props = props.with_message_id(short("message id", &letter.decision_id)?);
        }
        Ok(props)
    }
}

fn transport(e: Error) -> TransportError {
    const OP: &str = "dead-letter publish";
    if e.is_permanent() {
        TransportError::permanent(OP, e)
    } else {
        TransportError::new(OP, e)
    }
}

#[async_trait::async_trait]
impl DeadLetterPublisher for AmqpDeadLetters {
    fn measure(&self, letter: &DeadLetter) -> Excess {
        let frame_max = self.channel.frame_max() as usize;
        let size = match self.properties(letter) {
            Ok(props) => crate::publish::header_frame_len(&props, letter.payload.len()),
            // A header name AMQP cannot carry: shrink until it is gone.
            Err(_) => frame_max.saturating_add(1),
        };
        Excess {
            headers: size.saturating_sub(frame_max),
            total: 0,
        }
    }

    async fn publish(&self, letter: &DeadLetter) -> Result<(), TransportError> {
        let props = self.properties(letter).map_err(transport)?;
        self.channel
            .publish(&self.exchange, &self.routing_key, &letter.payload, props)
            .await
            .map_err(transport)
    }
}
