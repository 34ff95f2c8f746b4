//! The core NATS subscriber guard: the same pipeline over a plain
//! [`Subscriber`] (including queue-group subscribers).
//!
//! Delivery semantics: **at-most-once**. Core NATS has no acknowledgements
//! and no redelivery: a message is gone once the server pushed it to this
//! process. If the process dies, the connection drops, or the subscriber's
//! buffer overflows (slow consumer), messages in it are lost; messages
//! published while no subscriber is connected are never seen. What the guard
//! still guarantees: nothing reaches the handler without a Permit; denied and
//! invalid messages are dead-lettered (to a JetStream dead-letter stream when
//! one is configured, see [`crate::NatsDeadLetters::auto`]); a Retry verdict
//! (TTS/PDP outage) is retried **in place** by core (the message holds one
//! concurrency slot while it waits) and dead-lettered `retries-exhausted`
//! after the retry policy's `max_attempts`. Use JetStream where a message must
//! not be lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subscriber;
use elevate_core::message::{Coordinates, InboundMessage};
use elevate_core::runtime::{Limits, RunError, Runtime, Source};
use elevate_core::settle::{Delivery, Processor, RedeliveryMode, TransportError};
use futures::{FutureExt, StreamExt};

use crate::Error;
use crate::headers::{NATS_MSG_ID, from_nats_headers};

/// Guards a core NATS subscriber (at-most-once; see the module docs).
pub struct GuardedSubscriber {
    subscriber: Subscriber,
    processor: Arc<Processor>,
    concurrency: usize,
}

impl std::fmt::Debug for GuardedSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedSubscriber")
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl GuardedSubscriber {
    /// Wraps a subscriber from `client.subscribe(..)` or `client.queue_subscribe(..)`.
    pub fn new(subscriber: Subscriber, processor: Arc<Processor>) -> Self {
        GuardedSubscriber {
            subscriber,
            processor,
            concurrency: elevate_core::runtime::DEFAULT_CONCURRENCY,
        }
    }

    /// At most `n` messages in flight; default 32.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Runs until `shutdown` completes or the subscription ends; on shutdown the
    /// subscription is drained (messages already buffered are still processed).
    /// Core's [`Runtime`] drives it (concurrency, backpressure, panics).
    ///
    /// # Errors
    ///
    /// Returns [`Error::Runtime`] if core's runtime refuses to start (a start check fails) or a
    /// message's task panics. The subscription ending (unsubscribed, client closed) is not an
    /// error: `run` returns `Ok(())`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (runtime, source, processor) = self.into_parts();
        match runtime.run(source, processor, shutdown).await {
            // The subscription ended (unsubscribed, client closed): not an error of the guard.
            Err(RunError::Source(Error::SubscriptionEnded)) => Ok(()),
            other => other.map_err(RunError::flatten),
        }
    }

    /// The subscriber taken apart: core's [`Runtime`] as configured, the
    /// subscription as a [`Source`], and the processor; [`run`](Self::run)
    /// is `runtime.run(source, processor, shutdown)`. The parts let an
    /// application run the source in a runtime of its own.
    pub fn into_parts(self) -> (Runtime, CoreSource, Arc<Processor>) {
        let source = CoreSource {
            subscriber: self.subscriber,
        };
        (
            Runtime::new().concurrency(self.concurrency),
            source,
            self.processor,
        )
    }
}

/// The subscription as a [`Source`] for core's runtime: at-most-once, no
/// destination to check dead letters for. Made by
/// [`GuardedSubscriber::into_parts`].
pub struct CoreSource {
    subscriber: Subscriber,
}

/// How long one receive waits before the runtime looks around.
const RECEIVE_IDLE: Duration = Duration::from_millis(500);

#[async_trait::async_trait]
impl Source for CoreSource {
    type Delivery = CoreDelivery;
    type Error = Error;

    fn names(&self) -> Vec<String> {
        Vec::new()
    }

    fn limits(&self) -> Limits {
        Limits::at_most_once()
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<CoreDelivery>, Error> {
        let mut out = Vec::new();
        match tokio::time::timeout(RECEIVE_IDLE, self.subscriber.next()).await {
            Err(_) => return Ok(out),
            Ok(None) => return Err(Error::SubscriptionEnded),
            Ok(Some(m)) => out.push(CoreDelivery::new(m)),
        }
        while out.len() < max {
            match self.subscriber.next().now_or_never() {
                Some(Some(m)) => out.push(CoreDelivery::new(m)),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Settling needs no connection on core NATS (there is nothing to ack).
    fn can_settle_after(&self, _: &Error) -> bool {
        true
    }

    /// What the server already pushed is lost unless processed: drain it.
    async fn drain(&mut self) -> bool {
        match self.subscriber.drain().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot drain the subscription: stopping now");
                false
            }
        }
    }
}

/// One core NATS message: no acknowledgements, retried in place.
#[derive(Debug)]
pub struct CoreDelivery {
    msg: InboundMessage,
}

impl CoreDelivery {
    /// Wraps a received core NATS message.
    pub fn new(msg: async_nats::Message) -> Self {
        CoreDelivery {
            msg: inbound_from_core(&msg),
        }
    }
}

/// Maps a core NATS message to the broker-neutral message.
pub fn inbound_from_core(msg: &async_nats::Message) -> InboundMessage {
    let headers = from_nats_headers(msg.headers.as_ref());
    let message_id = headers.get_str(NATS_MSG_ID).map(str::to_string);
    let subject = msg.subject.as_str();
    // Core NATS never redelivers: every receipt is its own position, kept
    // across the in-place retries of that receipt.
    let receipt = uuid::Uuid::now_v7().to_string();
    let position = format!("nats:{subject}#{receipt}");
    let coordinates = Coordinates::new("nats", subject)
        .with("subject", subject)
        .with("receipt", receipt);
    let mut inbound = InboundMessage::new(coordinates, subject, headers, msg.payload.clone());
    inbound.message_id = message_id;
    inbound.position = position;
    inbound
}

#[async_trait::async_trait]
impl Delivery for CoreDelivery {
    fn message(&self) -> &InboundMessage {
        &self.msg
    }

    /// Core NATS has nothing to acknowledge.
    async fn ack(self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Never called: core NATS retries in place.
    async fn redeliver(self, _delay: Duration) -> Result<(), TransportError> {
        Err(TransportError::new(
            "redeliver",
            "core NATS cannot redeliver a message",
        ))
    }

    fn redelivery_mode(&self) -> RedeliveryMode {
        RedeliveryMode::InPlace
    }
}
