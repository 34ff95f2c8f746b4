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
use elevate_core::settle::{Delivery, Processor, RedeliveryMode, TransportError};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

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
            concurrency: 32,
        }
    }

    /// At most `n` messages in flight; default 32.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Runs until `shutdown` completes or the subscription ends; on shutdown the
    /// subscription is drained (messages already buffered are still processed).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let GuardedSubscriber {
            mut subscriber,
            processor,
            concurrency,
        } = self;
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tasks = JoinSet::new();
        let mut draining = false;
        tokio::pin!(shutdown);
        loop {
            while let Some(r) = tasks.try_join_next() {
                log_join(r);
            }
            let slot = tokio::select! {
                _ = &mut shutdown, if !draining => {
                    draining = true;
                    if let Err(e) = subscriber.drain().await {
                        tracing::warn!(error = %e, "cannot drain the subscription: stopping now");
                        break;
                    }
                    continue;
                }
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            // Backpressure during a dependency outage: one message at a time.
            if !draining {
                tokio::select! {
                    _ = &mut shutdown => {
                        draining = true;
                        if let Err(e) = subscriber.drain().await {
                            tracing::warn!(error = %e, "cannot drain the subscription: stopping now");
                            break;
                        }
                    }
                    _ = processor.admission().wait() => {}
                }
            }
            let msg = tokio::select! {
                _ = &mut shutdown, if !draining => {
                    draining = true;
                    if let Err(e) = subscriber.drain().await {
                        tracing::warn!(error = %e, "cannot drain the subscription: stopping now");
                        break;
                    }
                    continue;
                }
                m = subscriber.next() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let processor = processor.clone();
            tasks.spawn(async move {
                let delivery = CoreDelivery::new(msg);
                let coordinates = delivery.msg.coordinates.clone();
                match processor.process(delivery).await {
                    Ok(outcome) => tracing::debug!(%coordinates, ?outcome, "message settled"),
                    Err(e) => {
                        tracing::error!(%coordinates, error = %e, "core NATS message could not be settled and cannot be redelivered: lost")
                    }
                }
                drop(slot);
            });
        }
        while let Some(r) = tasks.join_next().await {
            log_join(r);
        }
        Ok(())
    }
}

fn log_join(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r
        && e.is_panic()
    {
        tracing::error!(error = %e, "message task panicked (core NATS: the message is lost)");
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
    InboundMessage {
        coordinates: Coordinates::Nats {
            subject: msg.subject.to_string(),
            stream: None,
            stream_seq: None,
            receipt: Some(uuid::Uuid::now_v7().to_string()),
        },
        destination: msg.subject.to_string(),
        message_id,
        delivery_attempt: 1,
        published_at_ms: None,
        headers,
        payload: msg.payload.clone(),
    }
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
