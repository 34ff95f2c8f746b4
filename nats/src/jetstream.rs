//! The JetStream pull-consumer guard: fetches in batches from a durable,
//! explicit-ack consumer the application created, runs every message through
//! core's [`Processor`] with bounded concurrency, and settles with JetStream
//! acks: `+ACK` (handled), `+TERM` (dead letter confirmed), `-NAK {delay}`
//! (retry later), `+WPI` (still working, while waiting on the TTS or handler).
//!
//! Delivery semantics: at-least-once. A message is acked only after its
//! handler succeeded or its dead letter was stored; anything unsettled (crash,
//! lost connection, failed ack) is redelivered by the server after `ack_wait`.
//! The delivery count is the server's (`delivered` in the message info).
//!
//! Limits: the consumer's `max_deliver` must be larger than the number of
//! deliveries the processor's retry policies can use (or unlimited, `-1`):
//! core dead-letters `retries-exhausted` at its own bound (a count, or for
//! outages a duration, see [`elevate_core::retry::RetryPolicy`]). If the
//! server hit `max_deliver` first it would stop redelivering: the message
//! would stay in the stream, unacked and not dead-lettered (the server only
//! emits a `MAX_DELIVERIES` advisory). [`GuardedConsumer::run`] refuses to
//! start on such a consumer.
//!
//! Backpressure: while a dependency of the guard is down
//! ([`elevate_core::Processor::admission`]) the guard pulls one message at a
//! time, as a probe, instead of a batch.
//!
//! Unreadable messages: a message whose header block async-nats cannot parse
//! (not UTF-8, a bad name, no `:`, a status line, a bare CR) never reaches the
//! guard; async-nats drops the connection on it (or, for a bare CR, panics).
//! With [`GuardedConsumer::unreadable`] the guard reads such messages from the
//! stream and dead-letters them `malformed-message` (see [`crate::unreadable`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, Subject};
use bytes::Bytes;
use elevate_core::admission::Admit;
use elevate_core::message::{Coordinates, InboundMessage};
use elevate_core::settle::{Delivery, Processor, TransportError};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Error;
use crate::headers::{NATS_MSG_ID, from_nats_headers};
use crate::unreadable::{Sweeper, UnreadableMessages};

/// Guards a JetStream pull consumer.
pub struct GuardedConsumer {
    consumer: PullConsumer,
    processor: Arc<Processor>,
    concurrency: usize,
    batch: usize,
    fetch_expires: Duration,
    confirm_settlement: bool,
    settle_timeout: Duration,
    unreadable: Option<UnreadableMessages>,
}

impl std::fmt::Debug for GuardedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedConsumer")
            .field("consumer", &self.consumer.cached_info().name)
            .field("stream", &self.consumer.cached_info().stream_name)
            .field("concurrency", &self.concurrency)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl GuardedConsumer {
    /// Wraps a pull consumer (durable, `AckPolicy::Explicit`); dead letters go
    /// wherever the processor's [`elevate_core::DeadLetterPublisher`] sends them
    /// (use [`crate::NatsDeadLetters::jetstream`]).
    pub fn new(consumer: PullConsumer, processor: Arc<Processor>) -> Self {
        GuardedConsumer {
            consumer,
            processor,
            concurrency: 32,
            batch: 64,
            fetch_expires: Duration::from_secs(1),
            confirm_settlement: true,
            settle_timeout: Duration::from_secs(5),
            unreadable: None,
        }
    }

    /// At most `n` messages in flight (verdict, handler, settlement); default 32.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// At most `n` messages per pull request (never more than the free slots); default 64.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// How long one pull request waits for messages; bounds shutdown latency; default 1 s.
    pub fn fetch_expires(mut self, d: Duration) -> Self {
        self.fetch_expires = d.max(Duration::from_millis(100));
        self
    }

    /// Wait for the server to confirm each ack/term/nak (double ack); default on.
    /// Off: settlements are fire-and-forget (faster; a lost ack means a redelivery).
    pub fn confirm_settlement(mut self, on: bool) -> Self {
        self.confirm_settlement = on;
        self
    }

    /// How long to wait for a settlement confirmation; default 5 s.
    pub fn settle_timeout(mut self, d: Duration) -> Self {
        self.settle_timeout = d;
        self
    }

    /// Dead-letters the messages async-nats cannot read, reading them from the
    /// stream (at start, after each reconnect, and periodically; see
    /// [`crate::unreadable`]). Without it, such a message is redelivered every
    /// `ack_wait`, forever, and costs the client a reconnect each time. It also
    /// makes [`GuardedConsumer::run`] end with [`Error::ClientClosed`] when the
    /// client stopped for good (async-nats panicked), instead of retrying forever.
    pub fn unreadable(mut self, unreadable: UnreadableMessages) -> Self {
        self.unreadable = Some(unreadable);
        self
    }

    /// Runs until `shutdown` completes, then finishes the current pull and
    /// waits for the messages in flight. Errors on a misconfigured consumer, and
    /// (with [`GuardedConsumer::unreadable`]) when the client stopped for good.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let info = self.consumer.cached_info();
        if info.config.ack_policy != AckPolicy::Explicit {
            return Err(Error::Config(format!(
                "consumer {} on stream {} must use AckPolicy::Explicit (has {:?})",
                info.name, info.stream_name, info.config.ack_policy
            )));
        }
        if !self.processor.dead_letters_durable() {
            return Err(Error::Config(format!(
                "consumer {} on stream {}: dead letters must go to a JetStream stream \
                 (NatsDeadLetters::jetstream); a core NATS subject would lose a letter \
                 whose message is then terminated",
                info.name, info.stream_name
            )));
        }
        check_limits(&info.config, &self.processor)?;
        match self.processor.preflight(&info.stream_name).await {
            Ok(()) => {}
            Err(e) if e.is_permanent() => return Err(Error::Config(e.to_string())),
            Err(e) => tracing::warn!(error = %e, "dead-letter destination not checked at start"),
        }
        let mut sweeper = match self.unreadable.clone() {
            Some(u) => Some(Sweeper::new(u)),
            None => {
                tracing::warn!(consumer = %info.name, stream = %info.stream_name,
                    "no GuardedConsumer::unreadable: a message whose headers async-nats cannot parse \
                     is redelivered forever and disconnects the client on each delivery");
                None
            }
        };
        let mut ended = Ok(());
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        let mut backoff = Duration::from_millis(100);
        tokio::pin!(shutdown);
        tracing::info!(consumer = %info.name, stream = %info.stream_name, concurrency = self.concurrency, "JetStream guard started");
        'pull: loop {
            reap(&mut tasks);
            if let Some(s) = sweeper.as_mut()
                && s.due()
            {
                tokio::select! {
                    _ = &mut shutdown => break 'pull,
                    _ = s.run(&self.consumer, &self.processor) => {}
                }
            }
            let admit = tokio::select! {
                _ = &mut shutdown => break 'pull,
                a = self.processor.admission().wait() => a,
            };
            let batch_size = if admit == Admit::Open { self.batch } else { 1 };
            let first = tokio::select! {
                _ = &mut shutdown => break 'pull,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'pull,
                },
            };
            let mut slots = vec![first];
            while slots.len() < batch_size {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => slots.push(p),
                    Err(_) => break,
                }
            }
            let request = self
                .consumer
                .batch()
                .max_messages(slots.len())
                .expires(self.fetch_expires)
                .messages();
            let mut batch = tokio::select! {
                _ = &mut shutdown => break 'pull,
                b = request => match b {
                    Ok(b) => b,
                    Err(e) => {
                        if let Some(s) = &sweeper
                            && let Some(why) = s.client_closed().await
                        {
                            tracing::error!(error = %e, closed = %why, "the NATS client stopped for good: guard ending");
                            ended = Err(Error::ClientClosed(why));
                            break 'pull;
                        }
                        tracing::warn!(error = %e, ?backoff, "pull request failed: retrying");
                        drop(slots);
                        tokio::select! {
                            _ = &mut shutdown => break 'pull,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue 'pull;
                    }
                },
            };
            let mut failed = false;
            // The batch ends within `fetch_expires` (+5 s if the server goes silent);
            // shutdown is honoured after it so nothing already delivered sits unread.
            while let Some(item) = batch.next().await {
                match item {
                    Ok(msg) => {
                        let Some(slot) = slots.pop() else {
                            tracing::error!("server delivered more messages than requested");
                            break;
                        };
                        let processor = self.processor.clone();
                        let settle = Settle {
                            confirm: self.confirm_settlement,
                            timeout: self.settle_timeout,
                        };
                        tasks.spawn(async move {
                            handle(msg, &processor, settle).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "pull batch ended with an error: retrying");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                drop(slots);
                if let Some(s) = &sweeper
                    && let Some(why) = s.client_closed().await
                {
                    tracing::error!(closed = %why, "the NATS client stopped for good: guard ending");
                    ended = Err(Error::ClientClosed(why));
                    break 'pull;
                }
                tokio::select! {
                    _ = &mut shutdown => break 'pull,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            } else {
                backoff = Duration::from_millis(100);
            }
        }
        tracing::info!(
            in_flight = tasks.len(),
            "JetStream guard stopping: waiting for messages in flight"
        );
        while let Some(r) = tasks.join_next().await {
            log_join(r);
        }
        ended
    }
}

/// Refuses a `max_deliver` the retry policy can outlive (the server would stop
/// redelivering a message before it is dead-lettered: it would sit unacked in
/// the stream, a silent drop); warns about a keep-alive slower than `ack_wait`.
fn check_limits(
    config: &async_nats::jetstream::consumer::Config,
    processor: &Processor,
) -> Result<(), Error> {
    let needed = processor
        .retry_policy()
        .deliveries_needed()
        .saturating_add(processor.handler_retry_policy().deliveries_needed());
    if config.max_deliver > 0 && config.max_deliver as u64 <= needed {
        return Err(Error::Config(format!(
            "consumer max_deliver {} is not above the {needed} deliveries the retry policies \
             can use: the server would stop redelivering before the message is dead-lettered; \
             leave max_deliver unlimited (-1) or raise it",
            config.max_deliver
        )));
    }
    if config.ack_wait > Duration::ZERO && processor.keep_alive_every() >= config.ack_wait {
        tracing::warn!(
            ack_wait = ?config.ack_wait,
            keep_alive_every = ?processor.keep_alive_every(),
            "processor keep-alive interval is not shorter than the consumer's ack_wait: slow messages may be redelivered while still in progress"
        );
    }
    Ok(())
}

fn reap(tasks: &mut JoinSet<()>) {
    while let Some(r) = tasks.try_join_next() {
        log_join(r);
    }
}

fn log_join(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r
        && e.is_panic()
    {
        tracing::error!(error = %e, "message task panicked: the message is left unsettled for redelivery");
    }
}

async fn handle(msg: jetstream::Message, processor: &Processor, settle: Settle) {
    let delivery = match JetStreamDelivery::new(msg, settle) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "not a JetStream consumer message: skipped");
            return;
        }
    };
    let coordinates = delivery.msg.coordinates.clone();
    match processor.process(delivery).await {
        Ok(outcome) => tracing::debug!(%coordinates, ?outcome, "message settled"),
        Err(e) => {
            tracing::warn!(%coordinates, error = %e, "settlement failed: the server redelivers after ack_wait")
        }
    }
}

#[derive(Clone)]
struct Settle {
    confirm: bool,
    timeout: Duration,
}

/// One JetStream message awaiting settlement.
pub struct JetStreamDelivery {
    msg: InboundMessage,
    reply: Subject,
    client: Client,
    settle: Settle,
}

impl std::fmt::Debug for JetStreamDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamDelivery")
            .field("coordinates", &self.msg.coordinates)
            .field("attempt", &self.msg.delivery_attempt)
            .finish_non_exhaustive()
    }
}

impl JetStreamDelivery {
    fn new(msg: jetstream::Message, settle: Settle) -> Result<Self, Error> {
        let inbound = inbound_from_jetstream(&msg)?;
        let client = msg.context.client();
        let reply = msg
            .message
            .reply
            .clone()
            .ok_or_else(|| Error::NotJetStream("no reply subject".into()))?;
        Ok(JetStreamDelivery {
            msg: inbound,
            reply,
            client,
            settle,
        })
    }

    async fn send(&self, op: &'static str, kind: AckKind) -> Result<(), TransportError> {
        let payload: Bytes = kind.into();
        let client = &self.client;
        if self.settle.confirm {
            let req = client.request(self.reply.clone(), payload);
            match tokio::time::timeout(self.settle.timeout, req).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(TransportError::new(op, e)),
                Err(_) => Err(TransportError::new(op, "no confirmation from the server")),
            }
        } else {
            client
                .publish(self.reply.clone(), payload)
                .await
                .map_err(|e| TransportError::new(op, e))
        }
    }
}

/// Maps a JetStream message to the broker-neutral message.
pub fn inbound_from_jetstream(msg: &jetstream::Message) -> Result<InboundMessage, Error> {
    let info = msg.info().map_err(|e| Error::NotJetStream(e.to_string()))?;
    let headers = from_nats_headers(msg.message.headers.as_ref());
    let message_id = headers.get_str(NATS_MSG_ID).map(str::to_string);
    let published_at_ms = i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok();
    Ok(InboundMessage {
        coordinates: Coordinates::Nats {
            subject: msg.message.subject.to_string(),
            stream: Some(info.stream.to_string()),
            stream_seq: Some(info.stream_sequence),
            receipt: None,
        },
        destination: msg.message.subject.to_string(),
        message_id,
        delivery_attempt: u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
        published_at_ms,
        headers,
        payload: msg.message.payload.clone(),
    })
}

#[async_trait::async_trait]
impl Delivery for JetStreamDelivery {
    fn message(&self) -> &InboundMessage {
        &self.msg
    }

    async fn ack(self) -> Result<(), TransportError> {
        self.send("ack", AckKind::Ack).await
    }

    async fn ack_dead_lettered(self) -> Result<(), TransportError> {
        self.send("term", AckKind::Term).await
    }

    async fn redeliver(self, delay: Duration) -> Result<(), TransportError> {
        self.send("nak", AckKind::Nak(Some(delay))).await
    }

    async fn keep_alive(&self) -> Result<(), TransportError> {
        // Progress is never confirmed: it is repeated, and a lost one only shortens the deadline.
        self.client
            .publish(self.reply.clone(), AckKind::Progress.into())
            .await
            .map_err(|e| TransportError::new("progress", e))
    }
}
